//! The README model card of an export: what was done to the model (plan, calibration), what it costs (measured
//! ppl/KL, bits per weight), how every layer is stored, and where loaders will be slow or refuse, so a person who
//! finds the folder later can tell what it is without Whittle.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::files::dtype_name;
use super::layers::LayerRow;
use super::ModelFormat;
use crate::export::FloatDtype;

/// What the caller knows about how the model was made and measured; every field is optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// Plan name (or a description of the shorthand flags used).
    pub plan_name: Option<String>,
    /// The plan as TOML, reproduced in the card so the compression can be repeated.
    pub plan_toml: Option<String>,
    /// Calibration data, e.g. "128 windows of 256 tokens from tinystories_train_calib.txt".
    pub calibration: Option<String>,
    /// The text ppl/KL were measured on, with the window setup.
    pub eval_data: Option<String>,
    /// Perplexity of the compressed model.
    pub ppl: Option<f64>,
    /// Perplexity of the original model on the same text.
    pub base_ppl: Option<f64>,
    /// Mean KL(original ‖ compressed) per token, nats.
    pub kl: Option<f64>,
}

/// What the exporter knows.
pub(super) struct Facts<'a> {
    pub source: &'a Path,
    pub format: ModelFormat,
    pub dtype: FloatDtype,
    pub layers: &'a [LayerRow],
    pub bits_per_weight: f64,
    pub warnings: &'a [String],
}

fn format_line(f: ModelFormat) -> &'static str {
    match f {
        ModelFormat::Gptq => {
            "GPTQ v1 checkpoint (`qweight`/`qzeros`/`scales`/`g_idx`, `checkpoint_format: gptq`): loads in GPTQModel, \
             AutoGPTQ, transformers (with optimum + a GPTQ backend) and vLLM (`gptq`, `gptq_marlin`). Layers with \
             other settings than the top-level ones are listed in `quantization_config.dynamic`."
        }
        ModelFormat::CompressedTensors => {
            "compressed-tensors checkpoint (vLLM / llm-compressor): loads in vLLM and in transformers with the \
             `compressed-tensors` package."
        }
        ModelFormat::F16 | ModelFormat::Bf16 => {
            "Dense checkpoint: loads anywhere a Hugging Face Llama-family model does."
        }
    }
}

/// Layers grouped by how they are stored, in first-seen order.
fn grouped(layers: &[LayerRow]) -> Vec<(&str, Vec<&str>)> {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for l in layers {
        match groups.iter_mut().find(|(s, _)| *s == l.stored) {
            Some((_, names)) => names.push(&l.name),
            None => groups.push((&l.stored, vec![&l.name])),
        }
    }
    groups
}

fn names_cell(names: &[&str]) -> String {
    const SHOWN: usize = 6;
    let mut s = names.iter().take(SHOWN).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        let _ = write!(s, " and {} more", names.len() - SHOWN);
    }
    s
}

/// The README text.
pub(super) fn render(card: &ModelCard, f: &Facts<'_>) -> String {
    let mut s = String::new();
    let tag = match f.format {
        ModelFormat::Gptq => "gptq",
        ModelFormat::CompressedTensors => "compressed-tensors",
        ModelFormat::F16 | ModelFormat::Bf16 => "dense",
    };
    let _ = writeln!(s, "---\nlibrary_name: transformers\ntags:\n- whittle\n- {tag}\n---\n");
    let name = f.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let _ = writeln!(s, "# {name} ({})\n", f.format);
    let _ = writeln!(
        s,
        "Exported by Whittle {} from `{}`. The licence and intended use are those of the source model.\n",
        env!("CARGO_PKG_VERSION"),
        f.source.display()
    );
    let _ = writeln!(s, "## Format\n\n{}\n", format_line(f.format));
    let _ = writeln!(
        s,
        "Float tensors are {}. Linear layers store {:.3} bits per weight on average (codes, scales, zero points and \
         indices as written).\n",
        dtype_name(f.dtype),
        f.bits_per_weight
    );

    let _ = writeln!(s, "## Compression\n");
    match (&card.plan_name, &card.plan_toml) {
        (None, None) => {
            let _ = writeln!(s, "Exported as loaded; no compression plan was applied in this export.\n");
        }
        (name, toml) => {
            if let Some(n) = name {
                let _ = writeln!(s, "Plan: **{n}**\n");
            }
            if let Some(t) = toml {
                let _ = writeln!(s, "```toml\n{}\n```\n", t.trim_end());
            }
        }
    }
    if let Some(c) = &card.calibration {
        let _ = writeln!(s, "Calibration data: {c}\n");
    }

    let _ = writeln!(s, "## Quality\n");
    if card.ppl.is_none() && card.kl.is_none() && card.base_ppl.is_none() {
        let _ = writeln!(s, "Not measured at export time.\n");
    } else {
        if let Some(d) = &card.eval_data {
            let _ = writeln!(s, "Measured on {d}.\n");
        }
        let _ = writeln!(s, "| metric | value |\n|---|---|");
        if let Some(p) = card.base_ppl {
            let _ = writeln!(s, "| perplexity, original | {p:.4} |");
        }
        if let Some(p) = card.ppl {
            let _ = writeln!(s, "| perplexity, this model | {p:.4} |");
        }
        if let Some(k) = card.kl {
            let _ = writeln!(s, "| KL(original ‖ this model), nats/token | {k:.6} |");
        }
        s.push('\n');
    }

    let _ = writeln!(s, "## Layers\n\n| stored as | count | layers |\n|---|---|---|");
    for (stored, names) in grouped(f.layers) {
        let _ = writeln!(s, "| {stored} | {} | {} |", names.len(), names_cell(&names));
    }
    s.push('\n');

    if !f.warnings.is_empty() {
        let _ = writeln!(s, "## Loader notes\n");
        for w in f.warnings {
            let _ = writeln!(s, "- {w}");
        }
        s.push('\n');
    }
    s
}
