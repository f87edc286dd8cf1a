//! The compressed runtime: swaps a compressed model's dequantized linears for the packed forms the kernels run
//! directly (int2/3/4/8 with group scales, 2:4 sparse with f16 or 4-bit values), so chat and decode benchmarks use
//! the stored bits, never full float matrices. Layers a kernel layout cannot hold stay dense, and are reported.

use crate::compress::QuantizedLinear;
use crate::compress_model::weight_f32;
use crate::model::{Model, LINEAR_KINDS};
use std::collections::BTreeMap;
use whittle_kernels::packed::QuantParts;
use whittle_kernels::sparse24::{Sparse24Values, Sparse24Weight};
use whittle_kernels::{PackedWeight, Weight};

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
            let (rows, cols) = (lin.weight.rows(), lin.weight.cols());
            let packed = match quantized.get(&name) {
                Some(q) if q.mask.is_some() => {
                    let mask = q.mask.as_ref().expect("checked");
                    Sparse24Weight::from_quantized(parts(q), mask).map(Weight::Sparse24).map_err(|e| e.to_string())
                }
                Some(q) => PackedWeight::new(parts(q)).map(Weight::Packed).map_err(|e| e.to_string()),
                None => {
                    let Weight::Dense(_) = &lin.weight else { continue };
                    let w = weight_f32(&lin.weight);
                    if w.iter().all(|v| *v != 0.0) || !is_two_of_four(&w, rows, cols) {
                        continue;
                    }
                    Sparse24Weight::new(rows, cols, &w, Sparse24Values::F16).map(Weight::Sparse24).map_err(|e| e.to_string())
                }
            };
            match packed {
                Ok(w) => {
                    if matches!(w, Weight::Sparse24(_)) {
                        report.sparse24 += 1;
                    } else {
                        report.packed += 1;
                    }
                    lin.weight = w;
                }
                Err(e) => report.dense.push((name, e)),
            }
        }
    }
    report
}

/// Bytes of all weights the forward pass reads (linears, embedding, head, norms).
pub fn weight_bytes(model: &Model) -> usize {
    let linears: usize = model.blocks.iter().flat_map(|b| b.linears.iter()).map(|l| l.weight.resident_bytes()).sum();
    let norms: usize = model.blocks.iter().map(|b| (b.attn_norm.len() + b.mlp_norm.len()) * 4).sum();
    linears + model.embed.bytes().len() + model.lm_head.weight.resident_bytes() + norms + model.norm.len() * 4
}
