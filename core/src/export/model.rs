//! Exporting a whole (compressed) model to a new folder that vLLM, transformers and GPTQModel load: GPTQ v1,
//! compressed-tensors, or dense f16/bf16. This is the one entry point the CLI (`whittle export`) and the GUI's
//! Export pane share, so both get the same checks and the same files.
//!
//! Why it is shaped this way:
//! * **Everything is checked before anything is written.** The target folder, the per-layer format checks
//!   ([`check_layer`]) and the packing of every layer all run first; only then is the folder written, through
//!   [`write_atomic_dir`], so a refused, failed or killed export never leaves a folder at the final path.
//! * **One decoder layer at a time.** The first pass keeps only each tensor's name, dtype and shape; the second
//!   packs each layer again while its tensors stream into the shards ([`QuantizedSource`] can read the integer
//!   forms from a compression checkpoint), so a 7B export holds one layer's codes and tensors, not the model's.
//! * **Codes, not floats, are exported.** Quantized layers are packed from the [`QuantizedLinear`]s the compressor
//!   (or an import) produced, so the checkpoint decodes to exactly the weights the in-memory model ran.
//! * **Everything that is not a linear is copied byte for byte** from the source checkpoint (embeddings, norms,
//!   biases, and any tensor Whittle does not model), in its own dtype; only the f16/bf16 formats convert floats.
//! * Dense linears are written in the model dtype (the dtype of the source embedding), which is what the formats'
//!   loaders expect; a wider in-memory weight (a pruned layer computed in f32) is rounded, and the export says so.
//!
//! The submodules: [`layers`] decides how each linear is stored and builds its tensors, [`files`] writes
//! config.json / quantize_config.json and copies tokenizer files, [`card`] renders the README model card, and
//! [`precheck`] checks a plan against a format before compressing ([`check_plan`]).

mod card;
mod files;
mod layers;
mod precheck;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use card::ModelCard;
pub use precheck::check_plan;

use super::config::LayerDigest;
use super::{
    check_layer, kernel_warnings, write_atomic_dir, write_safetensors_streamed, ExportError, ExportFormat, FloatDtype,
    RawTensor, TensorMeta,
};
use crate::compress::types::QuantizedLinear;
use crate::error::{Result, WhittleError};
use crate::model::LoadedModel;

/// The checkpoint layout of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelFormat {
    /// GPTQ v1 (AutoGPTQ / GPTQModel / vLLM `gptq`); mixed settings through GPTQModel's `dynamic`.
    Gptq,
    /// compressed-tensors (`pack-quantized`, `sparse-24-bitmask`, dense).
    CompressedTensors,
    /// Every weight dense in f16 (quantized layers dequantized).
    F16,
    /// Every weight dense in bf16 (quantized layers dequantized).
    Bf16,
}

impl ModelFormat {
    pub const ALL: [ModelFormat; 4] =
        [ModelFormat::Gptq, ModelFormat::CompressedTensors, ModelFormat::F16, ModelFormat::Bf16];

    /// The name the CLI takes and reports.
    pub fn name(self) -> &'static str {
        match self {
            ModelFormat::Gptq => "gptq",
            ModelFormat::CompressedTensors => "compressed-tensors",
            ModelFormat::F16 => "f16",
            ModelFormat::Bf16 => "bf16",
        }
    }

    /// Parses a format name (`ct` is accepted for compressed-tensors).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gptq" => Some(ModelFormat::Gptq),
            "compressed-tensors" | "compressed_tensors" | "ct" => Some(ModelFormat::CompressedTensors),
            "f16" | "fp16" | "float16" => Some(ModelFormat::F16),
            "bf16" | "bfloat16" => Some(ModelFormat::Bf16),
            _ => None,
        }
    }

    /// How this format stores a model whose float dtype is `model_dtype`.
    fn layout(self, model_dtype: FloatDtype) -> Layout {
        match self {
            ModelFormat::Gptq => Layout::Packed(ExportFormat::Gptq),
            ModelFormat::CompressedTensors => Layout::Packed(ExportFormat::CompressedTensors { dtype: model_dtype }),
            ModelFormat::F16 => Layout::Dense(FloatDtype::F16),
            ModelFormat::Bf16 => Layout::Dense(FloatDtype::BF16),
        }
    }
}

/// A packed checkpoint format (codes written as they are), or every weight dense in one float dtype.
#[derive(Clone, Copy, Debug)]
enum Layout {
    Packed(ExportFormat),
    Dense(FloatDtype),
}

impl std::fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ModelFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::parse(s).ok_or_else(|| format!("unknown format `{s}`: expected gptq, compressed-tensors, f16 or bf16"))
    }
}

/// The default shard limit: transformers' `max_shard_size` default.
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// What to export, where, and what the model card says.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub format: ModelFormat,
    /// The folder to create.
    pub out: PathBuf,
    /// Replace `out` if it exists (atomically: the old folder stays until the new one is complete).
    pub force: bool,
    /// Largest safetensors file; more tensors go to further shards plus `model.safetensors.index.json`.
    pub max_shard_bytes: u64,
    pub card: ModelCard,
}

impl ExportOptions {
    pub fn new(format: ModelFormat, out: impl Into<PathBuf>) -> Self {
        Self { format, out: out.into(), force: false, max_shard_bytes: DEFAULT_SHARD_BYTES, card: ModelCard::default() }
    }
}

/// What an export wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    pub out: PathBuf,
    pub format: ModelFormat,
    /// Every file in the exported folder, sorted.
    pub files: Vec<PathBuf>,
    /// Total bytes of those files.
    pub bytes: u64,
    /// Stored bits per weight of the compressible linear layers (codes, scales, zero points, g_idx, bitmasks as
    /// written; a float LM head is not counted), comparable with a plan's `avg_bits`.
    pub bits_per_weight_estimate: f64,
    pub quantized_layers: usize,
    pub dense_layers: usize,
    pub sparse24_layers: usize,
    /// Layers that will miss fast kernels in some loaders, values rounded to the model dtype, and similar notes.
    pub warnings: Vec<String>,
}

/// Parses a size such as `2GB`, `500MB`, `1.5GiB`, `4096` (bytes). Decimal units are powers of 1000 (as
/// transformers' `max_shard_size`), binary units (`KiB`, `MiB`, `GiB`) powers of 1024.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let value: f64 = num.parse().map_err(|_| format!("`{text}` is not a size (e.g. 2GB, 500MB, 4GiB)"))?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (B, KB, MB, GB, TB, KiB, MiB, GiB)")),
    };
    let bytes = (value * scale).round();
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{text}`: a shard size must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

/// Refuses an export target before any work: an existing path without `force`, or the folder the model is loaded
/// from (replacing it would delete the checkpoint being read). Callers that compress first (CLI, GUI) call this
/// up front so the user does not wait for a compression whose export is refused; [`export_model`] calls it again.
pub fn check_target(opts: &ExportOptions, source_dir: &Path) -> Result<()> {
    let out = &opts.out;
    if std::fs::symlink_metadata(out).is_ok() {
        if !opts.force {
            return Err(ExportError::TargetExists { path: out.clone() }.into());
        }
        // Replacing the source folder, or a folder that contains it, would delete the checkpoint being read.
        let holds_source = match (out.canonicalize(), source_dir.canonicalize()) {
            (Ok(o), Ok(src)) => src.starts_with(&o),
            _ => false,
        };
        if holds_source {
            return Err(WhittleError::file(
                out,
                "is (or contains) the folder the model was loaded from; export to another folder (replacing it \
                 would delete the checkpoint being exported)",
            ));
        }
    }
    if opts.max_shard_bytes == 0 {
        return Err(WhittleError::Invalid("the shard size must be at least 1 byte".into()));
    }
    Ok(())
}

/// Where an export gets the integer forms of the quantized linears: a map in memory, or a compression checkpoint
/// read one decoder layer at a time, so an export of a 7B model holds one layer's codes, not all of them.
pub trait QuantizedSource {
    /// (module, rows, cols) of every linear with an integer form.
    fn shapes(&self) -> Result<Vec<(String, usize, usize)>>;
    /// The integer forms of decoder layer `layer`'s linears (`None`: of the linears outside the blocks, the LM head).
    fn forms(&self, layer: Option<usize>) -> Result<BTreeMap<String, QuantizedLinear>>;
}

impl QuantizedSource for BTreeMap<String, QuantizedLinear> {
    fn shapes(&self) -> Result<Vec<(String, usize, usize)>> {
        Ok(self.iter().map(|(n, q)| (n.clone(), q.rows, q.cols)).collect())
    }
    fn forms(&self, layer: Option<usize>) -> Result<BTreeMap<String, QuantizedLinear>> {
        Ok(self.iter().filter(|(n, _)| layers::group_of(n) == layer).map(|(n, q)| (n.clone(), q.clone())).collect())
    }
}

/// Exports `loaded` (a compressed model whose quantized linears hold their dequantized weights, or an imported
/// checkpoint) with the integer form of its quantized linears, `quantized` (from `compress_model` or
/// `LoadedModel::quantized`). `progress(done, total)` is called as layers are packed and when the files are written.
///
/// Nothing is written unless every layer can be stored in the format; the error then names every failing layer
/// and why.
pub fn export_model(
    loaded: &LoadedModel,
    quantized: &BTreeMap<String, QuantizedLinear>,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExportReport> {
    export_model_from(loaded, quantized, opts, progress)
}

/// One group of linears (a decoder block, or the LM head) decided, checked and packed.
struct GroupBuilt {
    tensors: Tensors,
    rows: Vec<layers::LayerRow>,
    digests: Vec<LayerDigest>,
    errors: Vec<ExportError>,
    any_sparse24: bool,
    rounded: Vec<String>,
    dense_24: Vec<String>,
    warnings: Vec<String>,
}

fn build_group(
    loaded: &LoadedModel,
    source: &dyn QuantizedSource,
    group: Option<usize>,
    layout: Layout,
    model_dtype: FloatDtype,
    any_quantized: bool,
) -> Result<GroupBuilt> {
    let forms = source.forms(group)?;
    let linears = layers::model_linears_of(loaded, group, &forms);
    let mut out = GroupBuilt {
        tensors: Vec::new(),
        rows: Vec::new(),
        digests: Vec::new(),
        errors: Vec::new(),
        any_sparse24: false,
        rounded: Vec::new(),
        dense_24: Vec::new(),
        warnings: Vec::new(),
    };
    let built = match layout {
        Layout::Packed(format) => {
            let decided = layers::decide(&linears, format, model_dtype, any_quantized, &mut out.dense_24)?;
            let refs = layers::refs(&linears, &decided);
            out.errors = refs.iter().filter_map(|(n, r)| check_layer(format, n, r, any_quantized).err()).collect();
            out.warnings = kernel_warnings(format, &refs);
            out.digests = refs.iter().map(|(n, r)| LayerDigest::of(n, r)).collect();
            out.any_sparse24 = refs.iter().any(|(_, r)| matches!(r, super::LayerRef::Sparse24(_)));
            if !out.errors.is_empty() {
                return Ok(out);
            }
            layers::packed_tensors(&linears, &decided, format, model_dtype)?
        }
        Layout::Dense(dtype) => layers::dense_tensors(&linears, dtype)?,
    };
    out.tensors = built.tensors;
    out.rows = built.summary.layers;
    out.rounded = built.rounded;
    Ok(out)
}

/// [`export_model`] with the integer forms from any [`QuantizedSource`]. The export runs in two passes over the
/// groups of linears (each decoder block, then the LM head): the first decides, checks and packs every group to
/// learn every tensor's size, the second packs each group again while its tensors are streamed into the files.
/// So memory holds one group's integer forms and tensors at a time, plus one copied tensor.
pub fn export_model_from(
    loaded: &LoadedModel,
    source: &dyn QuantizedSource,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExportReport> {
    check_target(opts, &loaded.dir)?;
    let model_dtype = layers::model_dtype(loaded);
    let shapes = source.shapes()?;
    layers::check_forms(loaded, &shapes)?;
    let any_quantized = !shapes.is_empty();
    let layout = opts.format.layout(model_dtype);
    let groups = layers::groups(loaded);
    let total = 2 * groups.len() + 1;

    // Pass 1: decide, check and pack every group; keep only what describes it.
    let mut warnings = Vec::new();
    let (mut errors, mut digests, mut rows, mut rounded, mut dense_24) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut any_sparse24 = false;
    let mut metas = Vec::new();
    let mut group_of_tensor: HashMap<String, usize> = HashMap::new();
    for (i, &g) in groups.iter().enumerate() {
        let built = build_group(loaded, source, g, layout, model_dtype, any_quantized)?;
        errors.extend(built.errors);
        warnings.extend(built.warnings);
        digests.extend(built.digests);
        rows.extend(built.rows);
        rounded.extend(built.rounded);
        dense_24.extend(built.dense_24);
        any_sparse24 |= built.any_sparse24;
        for (name, t) in &built.tensors {
            metas.push(TensorMeta::of(name, t));
            group_of_tensor.insert(name.clone(), i);
        }
        progress(i + 1, total);
    }
    let nothing = match layout {
        Layout::Packed(ExportFormat::Gptq) => !any_quantized,
        Layout::Packed(ExportFormat::CompressedTensors { .. }) => !any_quantized && !any_sparse24,
        Layout::Dense(_) => false,
    };
    if nothing && errors.is_empty() {
        errors.push(ExportError::layer("(model)", "no layer is quantized or 2:4 compressed; export it as a dense model"));
    }
    ExportError::collect(errors)?;
    warnings.extend(layers::dense_24_note(&dense_24, any_quantized));
    let rounded_dtype = match layout {
        Layout::Dense(d) => d,
        Layout::Packed(_) => model_dtype,
    };
    warnings.extend(layers::rounded_note(&rounded, rounded_dtype));
    let quantization_config = match layout {
        Layout::Packed(ExportFormat::Gptq) => Some(super::config::gptq_quantization_config_of(&digests, &Default::default())?),
        Layout::Packed(ExportFormat::CompressedTensors { .. }) => Some(super::config::compressed_tensors_quantization_config_of(&digests)?),
        Layout::Dense(_) => None,
    };
    let summary = layers::Summary { quantization_config, layers: rows };

    let (convert, out_dtype) = match layout {
        Layout::Dense(d) => (Some(d), d),
        Layout::Packed(_) => (None, model_dtype),
    };
    let all_linears = layers::linear_names(loaded);
    let linear_names: HashSet<&str> = all_linears.iter().map(String::as_str).collect();
    for name in layers::other_tensor_names(loaded, &linear_names) {
        metas.push(layers::other_tensor_meta(loaded, &name, convert)?);
    }
    metas.sort_by_cached_key(|m| layers::order_key(&m.name));

    let config = files::config_json(&loaded.model.config.raw, summary.quantization_config.as_ref(), out_dtype)?;
    let readme = card::render(
        &opts.card,
        &card::Facts {
            source: &loaded.dir,
            format: opts.format,
            dtype: out_dtype,
            layers: &summary.layers,
            bits_per_weight: summary.bits_per_weight(),
            warnings: &warnings,
        },
    );
    let metadata = BTreeMap::from([("producer".to_string(), format!("whittle {}", env!("CARGO_PKG_VERSION")))]);

    let quantize_config = match (opts.format, &summary.quantization_config) {
        (ModelFormat::Gptq, Some(qc)) => Some(files::pretty(&super::gptq_quantize_config_file(qc))?),
        _ => None,
    };

    // Pass 2: stream the tensors into the files in shard order, packing each group again when its first tensor is due.
    let mut current: Option<(usize, HashMap<String, RawTensor>)> = None;
    let mut groups_written = 0;
    let mut feed = |meta: &TensorMeta| -> std::result::Result<RawTensor, ExportError> {
        let Some(&g) = group_of_tensor.get(&meta.name) else {
            return layers::other_tensor(loaded, &meta.name, convert).map_err(|e| ExportError::tensor(&meta.name, e.to_string()));
        };
        if current.as_ref().map(|(c, _)| *c) != Some(g) {
            let built = build_group(loaded, source, groups[g], layout, model_dtype, any_quantized)
                .map_err(|e| ExportError::tensor(&meta.name, e.to_string()))?;
            current = Some((g, built.tensors.into_iter().collect()));
            groups_written += 1;
            progress(groups.len() + groups_written, total);
        }
        let (_, tensors) = current.as_mut().expect("just built");
        tensors.remove(&meta.name).ok_or_else(|| ExportError::tensor(&meta.name, "was not built again by its layer"))
    };
    let (out, ()) = write_atomic_dir(&opts.out, opts.force, |dir| {
        write_safetensors_streamed(dir, metas, opts.max_shard_bytes, &metadata, &mut feed)?;
        files::write(dir, "config.json", &config)?;
        if let Some(text) = &quantize_config {
            files::write(dir, "quantize_config.json", text)?;
        }
        files::copy_side_files(&loaded.dir, dir)?;
        files::write(dir, "README.md", &readme)
    })?;
    let (files, bytes) = files::listing(&out)?;
    progress(total, total);
    Ok(ExportReport {
        out,
        format: opts.format,
        files,
        bytes,
        bits_per_weight_estimate: summary.bits_per_weight(),
        quantized_layers: summary.count("quantized"),
        dense_layers: summary.count("dense"),
        sparse24_layers: summary.count("sparse24"),
        warnings,
    })
}

/// Named tensors, in the order the writer puts them into shards.
type Tensors = Vec<(String, RawTensor)>;

#[cfg(test)]
mod tests;
