//! How each linear of a model is stored in an export, and its tensors.
//!
//! A linear with a [`QuantizedLinear`] is written from its codes. Any other linear is float: in compressed-tensors
//! a float layer with the exact 2:4 pattern becomes `sparse-24-bitmask` (unless the checkpoint also holds quantized
//! layers, which compressed-tensors cannot combine with bitmask layers), everything else a plain `weight` in the
//! model dtype, zeros included (unstructured sparsity is stored as zeros). Every tensor that is not a linear weight
//! is copied from the source checkpoint as stored.

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;
use whittle_kernels::{DType, SharedBytes, Weight};

use super::super::{
    check_sparse24, pack_compressed_tensors, pack_gptq, pack_sparse24_bitmask, Dtype, ExportError, ExportFormat,
    FloatDtype, LayerRef, QuantParams, RawTensor,
};
use super::Tensors;
use crate::export::TensorMeta;
use crate::compress::types::{Matrix, QuantizedLinear};
use crate::error::{Result, WhittleError};
use crate::model::{LoadedModel, Model, LINEAR_KINDS};

/// One linear of the model being exported.
pub(super) struct ModelLinear<'a> {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub weight: &'a Weight,
    pub quant: Option<&'a QuantizedLinear>,
}

/// How an export stores one linear.
pub(super) enum Stored<'a> {
    Quantized(&'a QuantizedLinear),
    Dense(Matrix),
    Sparse24(Matrix),
}

/// One row of the model card's layer table and of the bits/weight estimate.
#[derive(Clone, Debug)]
pub(super) struct LayerRow {
    pub name: String,
    /// "quantized", "dense" or "sparse24".
    pub kind: &'static str,
    /// How it is stored, for people: "GPTQ 4-bit g128 sym", "dense F16, 50.0% zeros", …
    pub stored: String,
    pub params: usize,
    /// Bytes of the layer's weight tensors as written (bias excluded).
    pub bytes: usize,
}

#[derive(Clone, Debug, Default)]
pub(super) struct Summary {
    pub quantization_config: Option<Value>,
    pub layers: Vec<LayerRow>,
}

impl Summary {
    /// Stored bits per weight over the layers a plan compresses: the blocks' linears, and the LM head only when it
    /// is quantized (a float head is outside every plan, and on a small model it would swamp the figure), so the
    /// estimate compares with the plan's `avg_bits`.
    pub fn bits_per_weight(&self) -> f64 {
        let counted = || self.layers.iter().filter(|l| l.name != "lm_head" || l.kind == "quantized");
        let params: usize = counted().map(|l| l.params).sum();
        let bytes: usize = counted().map(|l| l.bytes).sum();
        if params == 0 {
            0.0
        } else {
            bytes as f64 * 8.0 / params as f64
        }
    }
    pub fn count(&self, kind: &str) -> usize {
        self.layers.iter().filter(|l| l.kind == kind).count()
    }
}

pub(super) struct Built {
    pub tensors: Tensors,
    pub summary: Summary,
    /// Layers whose values were rounded to the stored dtype (see [`rounded_note`]).
    pub rounded: Vec<String>,
}

fn float_dtype(d: DType) -> FloatDtype {
    match d {
        DType::F32 => FloatDtype::F32,
        DType::F16 => FloatDtype::F16,
        DType::BF16 => FloatDtype::BF16,
    }
}

/// The model dtype: the stored dtype of the embedding, which compression never changes.
pub(super) fn model_dtype(loaded: &LoadedModel) -> FloatDtype {
    float_dtype(loaded.model.embed.dtype)
}

/// Whether the checkpoint has its own LM head (otherwise the head is the tied embedding and is not written).
fn lm_head_stored(loaded: &LoadedModel) -> bool {
    !loaded.model.config.tie_word_embeddings || loaded.store.names().any(|n| n.starts_with("lm_head."))
}

/// The export's groups of linears, in model order: each decoder block, then the LM head when the checkpoint stores
/// one (`None`). A streaming export holds one group's integer forms and tensors at a time.
pub(super) fn groups(loaded: &LoadedModel) -> Vec<Option<usize>> {
    let mut out: Vec<Option<usize>> = (0..loaded.model.blocks.len()).map(Some).collect();
    if lm_head_stored(loaded) {
        out.push(None);
    }
    out
}

/// The group a linear belongs to (see [`groups`]), from its module name.
pub(super) fn group_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.").and_then(|rest| rest.split_once('.')).and_then(|(n, _)| n.parse().ok())
}

/// The linears of one group in model order, each with its integer form if `forms` has one.
pub(super) fn model_linears_of<'a>(
    loaded: &'a LoadedModel,
    group: Option<usize>,
    forms: &'a BTreeMap<String, QuantizedLinear>,
) -> Vec<ModelLinear<'a>> {
    let model = &loaded.model;
    match group {
        Some(l) => LINEAR_KINDS
            .iter()
            .zip(&model.blocks[l].linears)
            .map(|(kind, lin)| {
                let name = Model::module_name(l, kind);
                let (rows, cols) = (lin.weight.rows(), lin.weight.cols());
                ModelLinear { quant: forms.get(&name), name, rows, cols, weight: &lin.weight }
            })
            .collect(),
        None => {
            let w = &model.lm_head.weight;
            vec![ModelLinear { name: "lm_head".into(), rows: w.rows(), cols: w.cols(), weight: w, quant: forms.get("lm_head") }]
        }
    }
}

/// Names of every linear the export writes (the blocks' and a stored LM head).
pub(super) fn linear_names(loaded: &LoadedModel) -> Vec<String> {
    let mut out: Vec<String> =
        (0..loaded.model.blocks.len()).flat_map(|l| LINEAR_KINDS.iter().map(move |k| Model::module_name(l, k))).collect();
    if lm_head_stored(loaded) {
        out.push("lm_head".into());
    }
    out
}

/// Refuses integer forms (name, rows, cols) that name no linear of the model or disagree with its shape: they
/// come from another model or plan, and exporting them would write a checkpoint that decodes to something else.
pub(super) fn check_forms(loaded: &LoadedModel, forms: &[(String, usize, usize)]) -> Result<()> {
    let model = &loaded.model;
    let shape_of = |name: &str| -> Option<(usize, usize)> {
        if name == "lm_head" {
            return lm_head_stored(loaded).then(|| (model.lm_head.weight.rows(), model.lm_head.weight.cols()));
        }
        let l = group_of(name)?;
        let block = model.blocks.get(l)?;
        LINEAR_KINDS
            .iter()
            .zip(&block.linears)
            .find(|(k, _)| Model::module_name(l, k) == name)
            .map(|(_, lin)| (lin.weight.rows(), lin.weight.cols()))
    };
    let mut errors = Vec::new();
    for (name, rows, cols) in forms {
        match shape_of(name) {
            None => errors.push(ExportError::layer(name, "has a quantized form but is not a linear of this model")),
            Some((r, c)) if (r, c) != (*rows, *cols) => errors.push(ExportError::layer(
                name,
                format!("quantized form is {rows}×{cols} but the model's layer is {r}×{c}"),
            )),
            Some(_) => {}
        }
    }
    ExportError::collect(errors)?;
    Ok(())
}

/// The float values of a linear without a quantized form.
fn float_values(l: &ModelLinear<'_>) -> Result<Vec<f32>> {
    match l.weight {
        Weight::Dense(d) => Ok(d.to_f32_vec()),
        Weight::Sparse24(s) => Ok(s.to_dense()),
        Weight::Packed(_) => Err(ExportError::layer(
            &l.name,
            "runs packed codes but no quantized form was given for it; pass the model's quantized layers",
        )
        .into()),
    }
}

/// True when every run of 4 inputs of every row has at least 2 exact zeros.
fn looks_2_4(m: &Matrix) -> bool {
    m.cols.is_multiple_of(4) && m.data.chunks_exact(4).all(|g| g.iter().filter(|v| **v == 0.0).count() >= 2)
}

/// Decides how each linear is stored in a packed format (see the module docs).
/// `any_quantized`: whether the whole export holds a quantized layer. Layers with the 2:4 pattern that must stay
/// dense are added to `dense_24` (see [`dense_24_note`]).
pub(super) fn decide<'a>(
    linears: &[ModelLinear<'a>],
    format: ExportFormat,
    dtype: FloatDtype,
    any_quantized: bool,
    dense_24: &mut Vec<String>,
) -> Result<Vec<Stored<'a>>> {
    let ct = matches!(format, ExportFormat::CompressedTensors { .. });
    let mut out = Vec::with_capacity(linears.len());
    for l in linears {
        if let Some(q) = l.quant {
            out.push(Stored::Quantized(q));
            continue;
        }
        let m = Matrix { rows: l.rows, cols: l.cols, data: float_values(l)? };
        if ct && looks_2_4(&m) {
            if !any_quantized && check_sparse24(&l.name, &m, dtype).is_ok() {
                out.push(Stored::Sparse24(m));
                continue;
            }
            dense_24.push(l.name.clone());
        }
        out.push(Stored::Dense(m));
    }
    Ok(out)
}

/// The warning for 2:4 layers [`decide`] kept dense, if any.
pub(super) fn dense_24_note(dense_24: &[String], any_quantized: bool) -> Option<String> {
    (!dense_24.is_empty()).then(|| {
        format!(
            "{}: 2:4 sparse but stored dense with zeros ({}); compressed-tensors cannot hold bitmask-compressed \
             layers next to quantized ones",
            dense_24.join(", "),
            if any_quantized { "the checkpoint also holds quantized layers" } else { "a kept value rounds to 0" }
        )
    })
}

/// The layers as the format checks and config builders take them.
pub(super) fn refs<'a>(linears: &[ModelLinear<'_>], stored: &'a [Stored<'a>]) -> Vec<(String, LayerRef<'a>)> {
    linears
        .iter()
        .zip(stored)
        .map(|(l, s)| {
            let r = match s {
                Stored::Quantized(q) => LayerRef::Quantized(q),
                Stored::Dense(m) => LayerRef::Dense(m),
                Stored::Sparse24(m) => LayerRef::Sparse24(m),
            };
            (l.name.clone(), r)
        })
        .collect()
}

fn same_dtype(d: DType, f: FloatDtype) -> bool {
    float_dtype(d) == f
}

/// `{name}.weight` in `dtype`: the stored bytes themselves when the model already holds this dtype, else `values`
/// rounded. Returns whether rounding changed any value.
fn weight_tensor(l: &ModelLinear<'_>, values: Option<&[f32]>, dtype: FloatDtype) -> Result<(RawTensor, bool)> {
    let name = format!("{}.weight", l.name);
    if let (Weight::Dense(d), None) = (l.weight, l.quant) {
        if same_dtype(d.dtype, dtype) {
            let t = RawTensor::from_bytes(&name, dtype.into(), vec![l.rows, l.cols], d.bytes().to_vec())?;
            return Ok((t, false));
        }
    }
    let owned;
    let values = match values {
        Some(v) => v,
        None => {
            owned = match l.quant {
                Some(q) => q.dequantize().data,
                None => float_values(l)?,
            };
            &owned
        }
    };
    let rounded = values.iter().any(|v| dtype.round(*v).to_bits() != v.to_bits());
    Ok((RawTensor::from_f32_rounded(dtype, vec![l.rows, l.cols], values), rounded))
}

fn describe_quant(prefix: &str, q: &QuantizedLinear) -> String {
    let p = QuantParams::of(q);
    let mut s = format!("{prefix} {}-bit", p.bits);
    match p.group_size {
        Some(g) => s.push_str(&format!(" g{g}")),
        None => s.push_str(" per-channel"),
    }
    s.push_str(if p.sym { " sym" } else { " asym" });
    if p.act_order {
        s.push_str(" act-order");
    }
    if q.mask.is_some() {
        s.push_str(", pruned weights at the zero point");
    }
    s
}

fn describe_dense(dtype: FloatDtype, values: &[f32]) -> String {
    let zeros = values.iter().filter(|v| **v == 0.0).count();
    let frac = zeros as f64 / values.len().max(1) as f64;
    if frac >= 0.01 {
        format!("dense {}, {:.1}% zeros", Dtype::from(dtype), 100.0 * frac)
    } else {
        format!("dense {}", Dtype::from(dtype))
    }
}

fn bytes_of(t: &Tensors) -> usize {
    t.iter().map(|(_, t)| t.data.len()).sum()
}

pub(super) fn rounded_note(names: &[String], dtype: FloatDtype) -> Option<String> {
    (!names.is_empty()).then(|| {
        format!(
            "{}: values rounded to {} (the in-memory weights are wider), so this checkpoint is not bit-identical to \
             the compressed model for these layers",
            names.join(", "),
            Dtype::from(dtype)
        )
    })
}

/// The tensors of every linear in a packed format, after [`super::check_exportable`] accepted them.
pub(super) fn packed_tensors(
    linears: &[ModelLinear<'_>],
    stored: &[Stored<'_>],
    format: ExportFormat,
    dtype: FloatDtype,
) -> Result<Built> {
    let mut tensors = Vec::new();
    let mut summary = Summary::default();
    let mut rounded = Vec::new();
    for (l, s) in linears.iter().zip(stored) {
        let name = &l.name;
        let (layer, kind, desc): (Tensors, _, _) = match (s, format) {
            (Stored::Quantized(q), ExportFormat::Gptq) => {
                (pack_gptq(name, q)?.into_tensors(name), "quantized", describe_quant("GPTQ", q))
            }
            (Stored::Quantized(q), ExportFormat::CompressedTensors { dtype }) => (
                pack_compressed_tensors(name, q, dtype)?.into_tensors(name),
                "quantized",
                describe_quant("pack-quantized", q),
            ),
            (Stored::Dense(m), _) => {
                let (t, r) = weight_tensor(l, Some(&m.data), dtype)?;
                if r {
                    rounded.push(name.clone());
                }
                (vec![(format!("{name}.weight"), t)], "dense", describe_dense(dtype, &m.data))
            }
            (Stored::Sparse24(m), _) => (
                pack_sparse24_bitmask(name, m, dtype)?.into_tensors(name),
                "sparse24",
                format!("sparse-24-bitmask {}", Dtype::from(dtype)),
            ),
        };
        summary.layers.push(LayerRow {
            name: name.clone(),
            kind,
            stored: desc,
            params: l.rows * l.cols,
            bytes: bytes_of(&layer),
        });
        tensors.extend(layer);
    }
    Ok(Built { tensors, summary, rounded })
}

/// The tensors of every linear as dense `dtype` weights (quantized layers dequantized).
pub(super) fn dense_tensors(linears: &[ModelLinear<'_>], dtype: FloatDtype) -> Result<Built> {
    let mut tensors = Vec::new();
    let mut summary = Summary::default();
    let mut rounded = Vec::new();
    for l in linears {
        let (t, r) = weight_tensor(l, None, dtype)?;
        if r {
            rounded.push(l.name.clone());
        }
        let values = t.to_f32(&l.name)?;
        let desc = match l.quant {
            Some(q) => format!("{} (dequantized from {}-bit)", describe_dense(dtype, &values), q.bits),
            None => describe_dense(dtype, &values),
        };
        summary.layers.push(LayerRow {
            name: l.name.clone(),
            kind: "dense",
            stored: desc,
            params: l.rows * l.cols,
            bytes: t.data.len(),
        });
        tensors.push((format!("{}.weight", l.name), t));
    }
    Ok(Built { tensors, summary, rounded })
}

/// Every stored tensor that is not a linear's weight (embeddings, norms, biases, buffers).
pub(super) fn other_tensor_names(loaded: &LoadedModel, linear_names: &HashSet<&str>) -> Vec<String> {
    loaded
        .store
        .names()
        .filter(|name| match name.rsplit_once('.') {
            Some((owner, suffix)) => !(linear_names.contains(owner) && suffix != "bias"),
            None => true,
        })
        .cloned()
        .collect()
}

/// One of [`other_tensor_names`] as stored: its dtype, shape and bytes (mapped, not copied).
fn stored(loaded: &LoadedModel, name: &str) -> Result<(Dtype, Vec<usize>, SharedBytes)> {
    let store = &loaded.store;
    let (dt, shape, bytes) = store.raw(name)?;
    let dtype = Dtype::from_safetensors(dt).ok_or_else(|| {
        WhittleError::field(store.path_of(name), name, format!("dtype {dt:?} cannot be copied into an export"))
    })?;
    Ok((dtype, shape, bytes))
}

/// The dtype a tensor stored as `stored` is written in: floats converted to `convert` (the f16/bf16 formats),
/// everything else as stored.
fn written_dtype(stored: Dtype, convert: Option<FloatDtype>) -> Dtype {
    match convert {
        Some(to) if matches!(stored, Dtype::F32 | Dtype::F16 | Dtype::BF16) => to.into(),
        _ => stored,
    }
}

/// What [`other_tensor`] will write, without copying the tensor.
pub(super) fn other_tensor_meta(loaded: &LoadedModel, name: &str, convert: Option<FloatDtype>) -> Result<TensorMeta> {
    let (stored, shape, _) = stored(loaded, name)?;
    let dtype = written_dtype(stored, convert);
    let bytes = shape.iter().product::<usize>() * dtype.size();
    Ok(TensorMeta { name: name.to_string(), dtype, shape, bytes })
}

/// One of [`other_tensor_names`] as stored, or with floats converted to `convert` for the f16/bf16 formats.
pub(super) fn other_tensor(loaded: &LoadedModel, name: &str, convert: Option<FloatDtype>) -> Result<RawTensor> {
    let (stored, shape, bytes) = stored(loaded, name)?;
    let t = RawTensor::from_bytes(name, stored, shape, bytes.as_slice().to_vec())
        .map_err(|e| WhittleError::file(loaded.store.path_of(name), e.to_string()))?;
    Ok(match (convert, written_dtype(stored, convert)) {
        (Some(to), written) if written != stored => RawTensor::from_f32_rounded(to, t.shape.clone(), &t.to_f32(name)?),
        _ => t,
    })
}

/// Shard order: the embedding, then block by block (numerically, so block 10 follows block 9), then the rest; a
/// layer's tensors stay together.
pub(super) fn order_key(name: &str) -> (usize, String) {
    let block = name
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(n, _)| n.parse::<usize>().ok());
    let rank = match block {
        Some(i) => i.saturating_add(1),
        None if name.starts_with("model.embed_tokens.") => 0,
        None => usize::MAX,
    };
    (rank, name.to_string())
}
