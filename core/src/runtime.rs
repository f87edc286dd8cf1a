//! The compressed runtime: swaps a compressed model's dequantized linears for the packed forms the kernels run
//! directly (int2/3/4/8 with group scales, 2:4 sparse with f16 or 4-bit values), so chat and decode benchmarks use
//! the stored bits, never full float matrices. Layers a kernel layout cannot hold stay dense, and are reported.

use crate::compress::{compress_data_free, Matrix, QuantizedLinear};
use crate::compress_model::weight_f32;
use crate::error::{Result, WhittleError};
use crate::plan::{ModulePlan, ResolvedPlan};
use crate::model::{Linear, Model, LINEAR_KINDS};
use std::collections::BTreeMap;
use std::sync::Arc;
use whittle_kernels::cuda::{CudaDevice, CudaLinear};
use whittle_kernels::packed::QuantParts;
use whittle_kernels::sparse24::{Sparse24Values, Sparse24Weight};
use whittle_kernels::{DenseWeight, PackedWeight, Weight};

/// What `pack_model` did with each linear.
#[derive(Clone, Debug, Default)]
pub struct PackReport {
    pub packed: usize,
    pub sparse24: usize,
    /// (module, reason) for linears left dense.
    pub dense: Vec<(String, String)>,
}

fn parts(q: &QuantizedLinear) -> QuantParts<'_> {
    QuantParts {
        rows: q.rows,
        cols: q.cols,
        bits: q.bits,
        group_size: q.group_size,
        codes: &q.codes,
        scales: &q.scales,
        zeros: &q.zeros,
        g_idx: q.g_idx.as_deref(),
    }
}

/// True when every run of 4 columns of every row holds at least 2 zeros (the 2:4 pattern).
fn is_two_of_four(w: &[f32], rows: usize, cols: usize) -> bool {
    cols.is_multiple_of(4)
        && (0..rows).all(|r| w[r * cols..(r + 1) * cols].chunks_exact(4).all(|c| c.iter().filter(|v| **v == 0.0).count() >= 2))
}

/// Replaces each compressed linear of `model` by its packed form. `quantized` holds the integer form of each
/// quantized linear by module name (from `compress_model` or an import).
pub fn pack_model(model: &mut Model, quantized: &BTreeMap<String, QuantizedLinear>) -> PackReport {
    let mut report = PackReport::default();
    for l in 0..model.blocks.len() {
        for (k, kind) in LINEAR_KINDS.iter().enumerate() {
            let name = Model::module_name(l, kind);
            let lin = &mut model.blocks[l].linears[k];
            if let Some(packed) = packed_form(&lin.weight, quantized.get(&name)) {
                report.put(name, lin, packed);
            }
        }
    }
    report
}

/// The packed form of one linear: its integer form when given (2:4 with 4-bit values when it carries a 2:4 keep
/// mask), else a dense weight with the 2:4 pattern as 2:4 sparse with f16 values; `None` when it stays as it is.
fn packed_form(weight: &Weight, quantized: Option<&QuantizedLinear>) -> Option<Result<Weight, String>> {
    let (rows, cols) = (weight.rows(), weight.cols());
    Some(match quantized {
        Some(q) => match &q.mask {
            Some(mask) => Sparse24Weight::from_quantized(parts(q), mask).map(Weight::Sparse24).map_err(|e| e.to_string()),
            None => PackedWeight::new(parts(q)).map(Weight::Packed).map_err(|e| e.to_string()),
        },
        None => {
            let Weight::Dense(_) = weight else { return None };
            let w = weight_f32(weight);
            if w.iter().all(|v| *v != 0.0) || !is_two_of_four(&w, rows, cols) {
                return None;
            }
            Sparse24Weight::new(rows, cols, &w, Sparse24Values::F16).map(Weight::Sparse24).map_err(|e| e.to_string())
        }
    })
}

impl PackReport {
    /// Installs a packed weight (dropping any GPU mirror of the old one) or records why the linear stays dense.
    fn put(&mut self, name: String, lin: &mut Linear, packed: Result<Weight, String>) {
        match packed {
            Ok(w) => {
                if matches!(w, Weight::Sparse24(_)) {
                    self.sparse24 += 1;
                } else {
                    self.packed += 1;
                }
                lin.weight = w;
                lin.cuda = None;
            }
            Err(e) => self.dense.push((name, e)),
        }
    }
}

/// Applies a plan of data-free methods only (RTN, magnitude; see `compress::compress_data_free`) at load, linear by
/// linear, and packs each result at once: memory holds the packed model plus one linear in f32, where
/// `compress_model` would hold the whole model in f32 and run a calibration pass it does not need. This is how a
/// 7b-shaped model is quantized for the runtime on a desktop. `release(prefix)` is called with `model.layers.{l}.`
/// after decoder layer `l`, so a memory-mapped source can give back the pages of the original weights.
pub fn pack_data_free(model: &mut Model, plan: &ResolvedPlan, release: &dyn Fn(&str)) -> Result<PackReport> {
    let by_name: BTreeMap<&str, &ModulePlan> = plan.modules.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut report = PackReport::default();
    for l in 0..model.blocks.len() {
        for (k, kind) in LINEAR_KINDS.iter().enumerate() {
            let name = Model::module_name(l, kind);
            let Some(job) = by_name.get(name.as_str()).and_then(|m| m.job.as_ref()) else { continue };
            let lin = &mut model.blocks[l].linears[k];
            let w = Matrix::from_vec(lin.weight.rows(), lin.weight.cols(), weight_f32(&lin.weight));
            let c = compress_data_free(job, &w)
                .ok_or_else(|| {
                    WhittleError::Invalid(format!(
                        "{name}: method {} needs calibration data; only rtn and magnitude plans apply at load",
                        job.method
                    ))
                })?
                .map_err(|e| WhittleError::Invalid(format!("{name}: {e}")))?;
            drop(w);
            let packed = match &c.quant {
                Some(q) => packed_form(&lin.weight, Some(q)),
                None => {
                    let dense = Weight::Dense(DenseWeight::from_f32(c.weight.rows, c.weight.cols, c.weight.data));
                    let packed = packed_form(&dense, None);
                    if packed.is_none() {
                        lin.weight = dense;
                        lin.cuda = None;
                        report.dense.push((name.clone(), "pruned without a 2:4 pattern: runs dense with zeros".into()));
                    }
                    packed
                }
            };
            if let Some(p) = packed {
                report.put(name, lin, p);
            }
        }
        release(&format!("model.layers.{l}."));
    }
    Ok(report)
}

/// Whether every compressed module of `plan` uses a data-free method, so [`pack_data_free`] can apply it.
pub fn is_data_free(plan: &ResolvedPlan) -> bool {
    plan.modules.iter().filter_map(|m| m.job.as_ref()).all(|j| !j.method.uses_hessian())
}

/// Bytes of all weights the forward pass reads (linears, embedding, head, norms).
pub fn weight_bytes(model: &Model) -> usize {
    let linears: usize = model.blocks.iter().flat_map(|b| b.linears.iter()).map(|l| l.weight.resident_bytes()).sum();
    let norms: usize = model.blocks.iter().map(|b| (b.attn_norm.len() + b.mlp_norm.len()) * 4).sum();
    linears + model.embed.bytes().len() + model.lm_head.weight.resident_bytes() + norms + model.norm.len() * 4
}

/// What [`offload_cuda`] put on the GPU.
#[derive(Clone, Debug, Default)]
pub struct OffloadReport {
    /// Linears whose forward now runs on the GPU.
    pub on_gpu: usize,
    /// Bytes of weights in device memory.
    pub device_bytes: usize,
    /// (module, reason) for linears that stay on the CPU.
    pub on_cpu: Vec<(String, String)>,
}

/// Uploads every linear a CUDA kernel runs (4-bit packed, 2:4 with 4-bit values, f16 dense) so the forward pass runs it on `dev`; norms,
/// attention, the embedding and the other linears stay on the CPU. Call it after packing or compressing: a linear
/// whose weight is replaced later must drop its `cuda` mirror. An upload that fails (out of device memory) leaves
/// that linear on the CPU and is reported with the rest.
pub fn offload_cuda(model: &mut Model, dev: &Arc<CudaDevice>) -> OffloadReport {
    let mut report = OffloadReport::default();
    let mut place = |name: String, lin: &mut Linear| match CudaLinear::upload(dev, &lin.weight) {
        Ok(c) => {
            report.on_gpu += 1;
            report.device_bytes += c.device_bytes();
            lin.cuda = Some(Arc::new(c));
        }
        Err(why) => report.on_cpu.push((name, why)),
    };
    for l in 0..model.blocks.len() {
        for (k, kind) in LINEAR_KINDS.iter().enumerate() {
            place(Model::module_name(l, kind), &mut model.blocks[l].linears[k]);
        }
    }
    place("lm_head".into(), &mut model.lm_head);
    report
}
