//! Round-to-nearest (algorithms.md §6): quantize every group with the grid of §2 and no error feedback. The baseline
//! every Hessian-based method must beat; also the quantizer behind `Magnitude` + quant (prune, then RTN).

use rayon::prelude::*;

use super::grid::Grid;
use super::magnitude::magnitude_keep_mask;
use super::{check_inputs, CompressError, Compressed, Compressor, Hessian, Matrix, QuantSpec, QuantizedLinear, Sparsity};

/// RTN quantization, optionally after magnitude pruning.
#[derive(Clone, Debug, PartialEq)]
pub struct Rtn {
    pub quant: QuantSpec,
    /// Prune by magnitude first; pruned weights stay exactly 0 and are recorded in the keep-mask.
    pub sparsity: Option<Sparsity>,
}

/// Quantize `w` group by group; `keep` (row-major, true = kept) zeroes the pruned weights first, and their codes
/// are the zero point. Returns the dequantized weight and its integer form.
pub(crate) fn rtn_quantize(w: &Matrix, spec: &QuantSpec, keep: Option<Vec<bool>>) -> (Matrix, QuantizedLinear) {
    let (rows, cols) = (w.rows, w.cols);
    let g = spec.group_size(cols);
    let ng = cols.div_ceil(g);
    let mut out = w.clone();
    let mut codes = vec![0u8; rows * cols];
    let mut grids = vec![Grid { scale: 0.0, zero: 0, maxq: 0 }; rows * ng];
    out.data
        .par_chunks_mut(cols.max(1))
        .zip(codes.par_chunks_mut(cols.max(1)))
        .zip(grids.par_chunks_mut(ng.max(1)))
        .enumerate()
        .for_each(|(r, ((wr, cr), gr))| {
            if let Some(k) = &keep {
                for (v, &kept) in wr.iter_mut().zip(&k[r * cols..(r + 1) * cols]) {
                    if !kept {
                        *v = 0.0;
                    }
                }
            }
            for (gi, start) in (0..cols).step_by(g).enumerate() {
                let end = (start + g).min(cols);
                let grid = Grid::fit(&wr[start..end], spec.bits, spec.sym, spec.mse);
                gr[gi] = grid;
                for (v, c) in wr[start..end].iter_mut().zip(&mut cr[start..end]) {
                    // Pruned weights are 0 and 0 is exactly the zero point on every grid.
                    *c = grid.quantize(*v);
                    *v = grid.dequantize(*c);
                }
            }
        });
    let q = QuantizedLinear {
        rows,
        cols,
        bits: spec.bits,
        group_size: g,
        sym: spec.sym,
        codes,
        scales: grids.iter().map(|g| g.scale).collect(),
        zeros: grids.iter().map(|g| g.zero).collect(),
        g_idx: None,
        mask: keep,
    };
    (out, q)
}

impl Compressor for Rtn {
    fn compress(&self, w: &Matrix, h: &Hessian, cancel: &dyn Fn() -> bool) -> Result<Compressed, CompressError> {
        check_inputs(w, h)?;
        if cancel() {
            return Err(CompressError::Cancelled);
        }
        Ok(self.apply(w))
    }
}

impl Rtn {
    /// The compression itself, which reads no calibration data.
    pub(crate) fn apply(&self, w: &Matrix) -> Compressed {
        let keep = self.sparsity.map(|s| magnitude_keep_mask(w, s));
        let (weight, q) = rtn_quantize(w, &self.quant, keep);
        Compressed { weight, quant: Some(q), damp_used: None }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil;
    use super::*;

    #[test]
    fn rtn_dequantize_matches_weight_with_ragged_groups() {
        let (w, h) = testutil::layer(6, 172, 21);
        for sym in [false, true] {
            let spec = QuantSpec { bits: 3, group: Some(32), sym, ..Default::default() };
            let c = Rtn { quant: spec, sparsity: None }.compress(&w, &h, &|| false).unwrap();
            let q = c.quant.unwrap();
            assert_eq!(q.n_groups(), 6);
            assert_eq!(q.dequantize(), c.weight);
        }
    }

    #[test]
    fn rtn_with_sparsity_keeps_pruned_weights_zero() {
        let (w, h) = testutil::layer(4, 64, 22);
        let spec = QuantSpec { bits: 4, group: Some(16), sym: false, ..Default::default() };
        let c = Rtn { quant: spec, sparsity: Some(Sparsity::NM { n: 2, m: 4 }) }.compress(&w, &h, &|| false).unwrap();
        let q = c.quant.unwrap();
        let mask = q.mask.clone().unwrap();
        for (i, &kept) in mask.iter().enumerate() {
            if !kept {
                assert_eq!(c.weight.data[i], 0.0);
                assert_eq!(q.codes[i], q.zeros[(i / 64) * 4 + (i % 64) / 16]);
            }
        }
        assert_eq!(q.dequantize(), c.weight);
    }
}
