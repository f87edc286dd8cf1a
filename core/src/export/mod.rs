//! Checkpoint formats the ecosystem loads: GPTQ v1 (AutoGPTQ / GPTQModel / vLLM `gptq`) and compressed-tensors
//! (vLLM / llm-compressor `pack-quantized`, `sparse-24-bitmask`), byte layouts per `docs/formats.md`.
//!
//! The module is split by job so each piece can be tested on its own and the model-level export/import code only
//! wires them together:
//! * [`gptq`], [`compressed_tensors`]: pure pack/unpack of one layer between [`QuantizedLinear`] (or a 2:4 dense
//!   [`Matrix`]) and the format's tensors. No file I/O, so byte layouts are tested against hand-computed words.
//! * [`config`]: build `quantization_config` JSON for an export, and parse one back into a per-module scheme.
//! * [`shards`]: write tensors as (sharded) safetensors; [`atomic`]: write a whole folder so that an interrupted
//!   export never leaves anything at the final path.
//! * [`check_exportable`] runs every per-layer check of a format **before anything is written**, and lists all
//!   failing layers at once; [`kernel_warnings`] lists layers that load but will miss the fast kernels.
//!
//! A layer is always written exactly: pruned weights of a quantized layer become their zero point, scales must be
//! representable in the stored dtype, and anything a loader would decode differently is an error naming the layer,
//! never a silent approximation.

pub mod atomic;
pub(crate) mod bits;
pub mod compressed_tensors;
pub mod config;
pub mod error;
pub mod gptq;
pub mod import;
pub mod model;
pub mod shards;
pub mod tensor;
#[cfg(test)]
pub(crate) mod testutil;

use std::collections::{HashMap, HashSet};

pub use atomic::{write_atomic_dir, AtomicDir};
pub use compressed_tensors::{
    check_pack_quantized, check_sparse24, pack_compressed_tensors, pack_sparse24_bitmask, unpack_compressed_tensors,
    unpack_sparse24_bitmask, CtPackedTensors, Sparse24Tensors,
};
pub use config::{
    compressed_tensors_quantization_config, exact_name_regex, gptq_quantization_config, gptq_quantize_config_file,
    parse_quantization_config, resolve_all, GptqConfigOptions, ModuleScheme, QuantConfig, QuantParams,
};
pub use error::{ExportError, Result};
pub use model::{
    check_plan, check_target, export_model, export_model_from, parse_size, ExportOptions, ExportReport, ModelCard, ModelFormat,
    QuantizedSource,
};
pub use gptq::{check_gptq, pack_gptq, unpack_gptq, GptqTensors, GPTQ_BITS};
pub use shards::{write_safetensors_sharded, write_safetensors_streamed, TensorMeta, INDEX_FILE, SINGLE_FILE};
pub use tensor::{Dtype, FloatDtype, Packed, RawTensor, TensorOut};

use crate::compress::types::{Matrix, QuantizedLinear};

/// The checkpoint format of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// GPTQ v1: `qweight`/`qzeros`/`scales`/`g_idx`, scales F16.
    Gptq,
    /// compressed-tensors; `dtype` is the model dtype that scales and dense values are stored in.
    CompressedTensors { dtype: FloatDtype },
}

/// One linear layer as the exporter sees it.
#[derive(Clone, Copy, Debug)]
pub enum LayerRef<'a> {
    /// Integer codes (optionally with a keep-mask for sparse+quantized).
    Quantized(&'a QuantizedLinear),
    /// Kept in the model dtype (unquantized, or unstructured sparse with zeros stored).
    Dense(&'a Matrix),
    /// 2:4 sparse with dense values (pruned weights exactly 0): sparse-24-bitmask in compressed-tensors, dense in GPTQ.
    Sparse24(&'a Matrix),
}

impl LayerRef<'_> {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            LayerRef::Quantized(q) => (q.rows, q.cols),
            LayerRef::Dense(m) | LayerRef::Sparse24(m) => (m.rows, m.cols),
        }
    }
    pub fn quantized(&self) -> Option<&QuantizedLinear> {
        match self {
            LayerRef::Quantized(q) => Some(q),
            _ => None,
        }
    }
}

/// Checks every layer against `format` before anything is written. All failing layers are reported together
/// ([`ExportError::Several`]) so one run tells the user everything to fix.
pub fn check_exportable(format: ExportFormat, layers: &[(String, LayerRef<'_>)]) -> Result<()> {
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let any_quantized = layers.iter().any(|(_, l)| matches!(l, LayerRef::Quantized(_)));
    for (name, layer) in layers {
        if name.is_empty() {
            errors.push(ExportError::layer("(unnamed layer)", "every exported layer needs its module name"));
            continue;
        }
        if !seen.insert(name.as_str()) {
            errors.push(ExportError::layer(name, "listed twice"));
            continue;
        }
        if let Err(e) = check_layer(format, name, layer, any_quantized) {
            errors.push(e);
        }
    }
    let nothing = match format {
        ExportFormat::Gptq => !any_quantized,
        ExportFormat::CompressedTensors { .. } => {
            !layers.iter().any(|(_, l)| matches!(l, LayerRef::Quantized(_) | LayerRef::Sparse24(_)))
        }
    };
    if nothing && errors.is_empty() {
        errors
            .push(ExportError::layer("(model)", "no layer is quantized or 2:4 compressed; export it as a dense model"));
    }
    ExportError::collect(errors)
}

/// The per-layer part of [`check_exportable`]; `any_quantized`: whether the export holds any quantized layer.
pub(crate) fn check_layer(format: ExportFormat, name: &str, layer: &LayerRef<'_>, any_quantized: bool) -> Result<()> {
    match (format, layer) {
        (ExportFormat::Gptq, LayerRef::Quantized(q)) => check_gptq(name, q),
        (ExportFormat::CompressedTensors { dtype }, LayerRef::Quantized(q)) => check_pack_quantized(name, q, dtype),
        (ExportFormat::CompressedTensors { dtype }, LayerRef::Sparse24(m)) => {
            compressed_tensors::check_sparse24_alongside(name, any_quantized)
                .and_then(|_| check_sparse24(name, m, dtype).map(|_| ()))
        }
        (_, LayerRef::Dense(m)) | (ExportFormat::Gptq, LayerRef::Sparse24(m)) => check_matrix(name, m),
    }
}

fn check_matrix(layer: &str, m: &Matrix) -> Result<()> {
    if m.rows == 0 || m.cols == 0 || m.data.len() != m.rows * m.cols {
        return Err(ExportError::layer(
            layer,
            format!("weight has {} values but claims {}×{}", m.data.len(), m.rows, m.cols),
        ));
    }
    Ok(())
}

/// Layers that export fine but will not run on the fast kernels (or not load at all) in some loaders. One line per
/// finding, naming the layer; for the model card and the export log.
pub fn kernel_warnings(format: ExportFormat, layers: &[(String, LayerRef<'_>)]) -> Vec<String> {
    let mut out = Vec::new();
    for (name, layer) in layers {
        let Some(q) = layer.quantized() else { continue };
        let (r, c, b) = (q.rows, q.cols, q.bits as u32);
        let per_channel = q.group_size >= c;
        if let ExportFormat::Gptq = format {
            let padded = bits::stream_padded_len(c, b);
            if padded != c {
                out.push(format!(
                    "{name}: in_features {c} is padded to {padded} with zero codes ({} qweight rows); GPTQModel loads \
                     it, loaders that derive the shape from in_features·bits/32 (vLLM, AutoGPTQ) do not",
                    bits::stream_words(c, b)
                ));
            }
            if !per_channel && c % q.group_size != 0 {
                out.push(format!(
                    "{name}: group size {} does not divide in_features {c}; the last group is short, which Exllama \
                     and vLLM GPTQ kernels (in_features // group_size groups) do not expect",
                    q.group_size
                ));
            }
        } else if !matches!(b, 4 | 8) {
            out.push(format!("{name}: {b}-bit pack-quantized loads in compressed-tensors/transformers, but vLLM's WNA16 kernels take only 4 and 8 bits"));
        }
        if !q.sym && !matches!(format, ExportFormat::Gptq) {
            out.push(format!("{name}: asymmetric pack-quantized needs a vLLM with zero-point WNA16 support; older versions refuse it"));
        }
        let mut why = Vec::new();
        if !q.sym {
            why.push("asymmetric".to_string());
        }
        if !matches!(b, 4 | 8) {
            why.push(format!("{b} bits"));
        }
        if !per_channel && ![32, 64, 128].contains(&q.group_size) {
            why.push(format!("group size {}", q.group_size));
        }
        if c % 128 != 0 {
            why.push(format!("in_features {c} not divisible by 128"));
        }
        if r % 64 != 0 {
            why.push(format!("out_features {r} not divisible by 64"));
        }
        if !why.is_empty() {
            out.push(format!(
                "{name}: not eligible for Marlin kernels ({}); vLLM falls back to slower kernels",
                why.join(", ")
            ));
        }
    }
    out.extend(fused_mismatches(layers));
    out
}

/// vLLM fuses q/k/v_proj and gate/up_proj of one block into one linear, which needs a single scheme.
fn fused_mismatches(layers: &[(String, LayerRef<'_>)]) -> Vec<String> {
    let scheme = |l: &LayerRef<'_>| match l {
        LayerRef::Quantized(q) => Some(QuantParams::of(q)),
        _ => None,
    };
    // (parent module, which fused set) → members with their schemes
    type Sets<'a> = HashMap<(String, usize), Vec<(&'a str, Option<QuantParams>)>>;
    let mut groups: Sets<'_> = HashMap::new();
    for (name, layer) in layers {
        for (set, members) in [(0usize, &["q_proj", "k_proj", "v_proj"][..]), (1, &["gate_proj", "up_proj"][..])] {
            if let Some((parent, leaf)) = name.rsplit_once('.') {
                if members.contains(&leaf) {
                    groups.entry((parent.to_string(), set)).or_default().push((name, scheme(layer)));
                }
            }
        }
    }
    let mut out: Vec<String> = groups
        .into_values()
        .filter(|m| m.windows(2).any(|w| w[0].1 != w[1].1))
        .map(|m| {
            let names: Vec<&str> = m.iter().map(|(n, _)| *n).collect();
            format!(
                "{}: vLLM fuses these into one layer and needs one quantization scheme for all of them",
                names.join(", ")
            )
        })
        .collect();
    out.sort();
    out
}

/// Structural checks every format needs: the QuantizedLinear is self-consistent (its producer is other code, and
/// a wrong length here would otherwise be a panic or a silently wrong file).
pub(crate) fn validate_quantized(layer: &str, q: &QuantizedLinear) -> Result<()> {
    let bad = |reason: String| Err(ExportError::layer(layer, reason));
    if q.rows == 0 || q.cols == 0 {
        return bad(format!("shape {}×{} is empty", q.rows, q.cols));
    }
    if !(1..=8).contains(&q.bits) {
        return bad(format!("{} bits is outside 1..=8", q.bits));
    }
    if q.group_size == 0 {
        return bad("group size 0".into());
    }
    let (r, c, ng) = (q.rows, q.cols, q.n_groups());
    if q.codes.len() != r * c {
        return bad(format!("{} codes for a {r}×{c} layer", q.codes.len()));
    }
    if q.scales.len() != r * ng || q.zeros.len() != r * ng {
        return bad(format!("{} scales and {} zeros, expected {r}×{ng} groups", q.scales.len(), q.zeros.len()));
    }
    if let Some(g) = &q.g_idx {
        if g.len() != c {
            return bad(format!("g_idx has {} entries for {c} inputs", g.len()));
        }
        if let Some((i, v)) = g.iter().enumerate().find(|(_, &v)| v as usize >= ng) {
            return bad(format!("g_idx[{i}] = {v} is outside the {ng} groups"));
        }
    }
    if let Some(m) = &q.mask {
        if m.len() != r * c {
            return bad(format!("mask has {} entries for a {r}×{c} layer", m.len()));
        }
    }
    let maxq = ((1u32 << q.bits) - 1) as u8;
    if let Some(i) = q.codes.iter().position(|&v| v > maxq) {
        return bad(format!("code {} at row {}, column {} exceeds {maxq}", q.codes[i], i / c, i % c));
    }
    if let Some(i) = q.zeros.iter().position(|&v| v > maxq) {
        return bad(format!("zero point {} at row {}, group {} exceeds {maxq}", q.zeros[i], i / ng, i % ng));
    }
    if let Some(i) =
        q.scales.iter().position(|s| !s.is_finite() || half::f16::from_f32(*s).to_f32().to_bits() != s.to_bits())
    {
        return bad(format!(
            "scale {:e} at row {}, group {} is not a finite f16 value (QuantizedLinear promises f16-exact scales)",
            q.scales[i],
            i / ng,
            i % ng
        ));
    }
    Ok(())
}

/// A symmetric layer's zero point is 2^(b−1) everywhere: sym checkpoints either store no zero point
/// (compressed-tensors) or kernels ignore the stored one (Marlin), so any other value would be decoded wrongly.
pub(crate) fn check_sym_zeros(layer: &str, q: &QuantizedLinear) -> Result<()> {
    if !q.sym {
        return Ok(());
    }
    let want = 1u8 << (q.bits - 1);
    let ng = q.n_groups();
    match q.zeros.iter().position(|&z| z != want) {
        Some(i) => Err(ExportError::layer(
            layer,
            format!(
                "is marked symmetric but output row {}, group {} has zero point {}; symmetric {}-bit checkpoints imply \
                 zero point {want}. Mark the layer asymmetric or requantize it",
                i / ng,
                i % ng,
                q.zeros[i],
                q.bits
            ),
        )),
        None => Ok(()),
    }
}

/// Pruned weights (mask false) are written as their group's zero point, which dequantizes to exactly 0.
pub(crate) fn apply_mask(q: &QuantizedLinear, codes: &mut [u8]) {
    let Some(mask) = &q.mask else { return };
    let (c, ng) = (q.cols, q.n_groups());
    for (k, keep) in mask.iter().enumerate() {
        if !keep {
            let (o, i) = (k / c, k % c);
            codes[k] = q.zeros[o * ng + q.group_of(i)];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::testutil::simple_layer;

    #[test]
    fn check_exportable_lists_every_failing_layer() {
        let ok = simple_layer(64, 128, 4, 32, true);
        let ragged = simple_layer(64, 172, 4, 32, true);
        let five = simple_layer(64, 128, 5, 32, true);
        let layers = vec![
            ("a".to_string(), LayerRef::Quantized(&ok)),
            ("model.layers.0.mlp.down_proj".to_string(), LayerRef::Quantized(&ragged)),
            ("c".to_string(), LayerRef::Quantized(&five)),
        ];
        // GPTQ pads the ragged layer but has no 5-bit format.
        let err = check_exportable(ExportFormat::Gptq, &layers).unwrap_err().to_string();
        assert!(err.starts_with("c: 5 bits"), "{err}");
        // compressed-tensors takes 5 bits but refuses the ragged group.
        let ct = ExportFormat::CompressedTensors { dtype: FloatDtype::F16 };
        let err = check_exportable(ct, &layers).unwrap_err().to_string();
        assert!(
            err.starts_with("model.layers.0.mlp.down_proj: group size 32 does not divide in_features 172"),
            "{err}"
        );
        let mut sym_bad = ok.clone();
        sym_bad.zeros[3] = 7;
        let both = vec![
            ("x".to_string(), LayerRef::Quantized(&sym_bad)),
            ("model.layers.0.mlp.down_proj".to_string(), LayerRef::Quantized(&ragged)),
        ];
        let err = check_exportable(ct, &both).unwrap_err();
        assert!(matches!(&err, ExportError::Several(v) if v.len() == 2), "{err}");
        assert!(err.to_string().contains("x: is marked symmetric"), "{err}");
    }

    #[test]
    fn check_exportable_refuses_duplicates_bitmask_next_to_quantized_and_empty_exports() {
        let q = simple_layer(8, 8, 4, 8, true);
        let w = Matrix::from_vec(1, 4, vec![1., 0., 2., 0.]);
        let ct = ExportFormat::CompressedTensors { dtype: FloatDtype::F16 };
        let dup = vec![("a".to_string(), LayerRef::Quantized(&q)), ("a".to_string(), LayerRef::Dense(&w))];
        assert!(check_exportable(ct, &dup).unwrap_err().to_string().contains("a: listed twice"));
        let mixed = vec![("a".to_string(), LayerRef::Quantized(&q)), ("b".to_string(), LayerRef::Sparse24(&w))];
        let err = check_exportable(ct, &mixed).unwrap_err().to_string();
        assert!(err.starts_with("b: a dense-valued 2:4 layer cannot be sparse-24-bitmask compressed"), "{err}");
        // GPTQ stores the same 2:4 layer dense, which is fine.
        assert!(check_exportable(ExportFormat::Gptq, &mixed).is_ok());
        let sparse_only = vec![("b".to_string(), LayerRef::Sparse24(&w))];
        assert!(check_exportable(ct, &sparse_only).is_ok());
        assert!(check_exportable(ExportFormat::Gptq, &sparse_only)
            .unwrap_err()
            .to_string()
            .contains("no layer is quantized"));
    }

    #[test]
    fn kernel_warnings_name_padded_and_fused_mismatched_layers() {
        let down = simple_layer(64, 172, 4, 32, true);
        let q4 = simple_layer(128, 128, 4, 128, true);
        let q8 = simple_layer(128, 128, 8, 128, true);
        let layers = vec![
            ("m.layers.0.mlp.down_proj".to_string(), LayerRef::Quantized(&down)),
            ("m.layers.0.self_attn.q_proj".to_string(), LayerRef::Quantized(&q4)),
            ("m.layers.0.self_attn.k_proj".to_string(), LayerRef::Quantized(&q8)),
            ("m.layers.0.self_attn.v_proj".to_string(), LayerRef::Quantized(&q4)),
        ];
        let w = kernel_warnings(ExportFormat::Gptq, &layers);
        assert!(
            w.iter().any(|l| l.starts_with("m.layers.0.mlp.down_proj: in_features 172 is padded to 176")),
            "{w:#?}"
        );
        assert!(w.iter().any(|l| l.starts_with("m.layers.0.mlp.down_proj: not eligible for Marlin")), "{w:#?}");
        assert!(
            w.iter().any(|l| l.contains("self_attn.q_proj, m.layers.0.self_attn.k_proj") && l.contains("fuses")),
            "{w:#?}"
        );
        assert!(!w.iter().any(|l| l.starts_with("m.layers.0.self_attn.q_proj: not eligible")), "{w:#?}");
    }

    #[test]
    fn validate_names_inconsistent_fields() {
        let mut q = simple_layer(2, 8, 4, 4, false);
        q.codes[9] = 16;
        assert_eq!(validate_quantized("l", &q).unwrap_err().to_string(), "l: code 16 at row 1, column 1 exceeds 15");
        let mut q = simple_layer(2, 8, 4, 4, false);
        q.g_idx = Some(vec![0, 0, 0, 0, 1, 1, 1, 2]);
        assert!(validate_quantized("l", &q).unwrap_err().to_string().contains("g_idx[7] = 2"));
        let mut q = simple_layer(2, 8, 4, 4, false);
        q.scales[1] = 0.1;
        assert!(validate_quantized("l", &q).unwrap_err().to_string().contains("not a finite f16 value"));
    }
}
