//! SparseGPT (algorithms.md §4; Frantar & Alistarh 2023, reference IST-DASLab/sparsegpt): the GPTQ sweep with
//! pruning decisions made on the fly. The mask is adaptive: chosen per block (unstructured) or per M-chunk (N:M)
//! by w²/U_jj² on the weights *after* the error feedback of earlier columns, so later columns absorb earlier pruning.
//! With a quant spec, kept weights are quantized in the same pass (joint sparsify + quantize, e.g. 2:4 + 4-bit);
//! pruned weights are exactly 0, recorded in the keep-mask, and their codes are the zero point.

use super::grid::Grid;
use super::linalg::{inverse_cholesky_upper_f32, zero_dead_columns};
use super::sweep::{sweep, Groups, QuantSweep, SweepSpec};
use super::{check_calibrated, check_inputs, CompressError, Compressed, Compressor, Hessian, Matrix, QuantSpec, QuantizedLinear, Sparsity};

/// SparseGPT settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseGpt {
    pub sparsity: Sparsity,
    /// Joint quantization of the kept weights (act-order is not used by SparseGPT).
    pub quant: Option<QuantSpec>,
    pub damp: f64,
    /// Columns per lazy batch and per adaptive-mask block (rounded down to a multiple of M for N:M).
    pub block_size: usize,
}

impl SparseGpt {
    pub fn new(sparsity: Sparsity) -> Self {
        Self { sparsity, quant: None, damp: 0.01, block_size: 128 }
    }
}

impl Compressor for SparseGpt {
    fn compress(&self, w: &Matrix, h: &Hessian, cancel: &dyn Fn() -> bool) -> Result<Compressed, CompressError> {
        check_inputs(w, h)?;
        check_calibrated(h)?;
        let (rows, c) = (w.rows, w.cols);
        let mut wk = w.clone();
        let dead = zero_dead_columns(&mut wk, h);
        if cancel() {
            return Err(CompressError::Cancelled);
        }
        let (u, damp_used) = inverse_cholesky_upper_f32(&h.data, c, &dead, self.damp)?;

        let quant = self.quant.as_ref().map(|s| {
            let g = s.group_size(c);
            let groups = if g >= c {
                // Per-channel: fitted up front on the whole (dense) row, as the reference does.
                let grids = (0..rows).map(|r| Grid::fit(wk.row(r), s.bits, s.sym, s.mse)).collect();
                Groups::Fixed { grids, n_groups: 1, col_group: vec![0; c] }
            } else {
                Groups::Dynamic { g }
            };
            QuantSweep { bits: s.bits, sym: s.sym, mse: s.mse, groups }
        });
        let out = sweep(
            &mut wk,
            SweepSpec { u: &u, block: self.block_size, quant, prune: Some(self.sparsity) },
            cancel,
        )?;
        let quant = self.quant.as_ref().map(|s| QuantizedLinear {
            rows,
            cols: c,
            bits: s.bits,
            group_size: s.group_size(c),
            sym: s.sym,
            codes: out.codes,
            scales: out.grids.iter().map(|g| g.scale).collect(),
            zeros: out.grids.iter().map(|g| g.zero).collect(),
            g_idx: None,
            mask: Some(out.keep),
        });
        Ok(Compressed { weight: wk, quant, damp_used: Some(damp_used) })
    }
}

#[cfg(test)]
mod tests {
    use super::super::magnitude::Magnitude;
    use super::super::{relative_error, testutil};
    use super::*;

    fn sgpt(w: &Matrix, h: &Hessian, s: Sparsity, q: Option<QuantSpec>) -> Compressed {
        SparseGpt { quant: q, ..SparseGpt::new(s) }.compress(w, h, &|| false).unwrap()
    }

    #[test]
    fn sparsegpt_error_le_magnitude() {
        let (w, h) = testutil::layer(48, 160, 51);
        for s in [Sparsity::Unstructured(0.5), Sparsity::Unstructured(0.6), Sparsity::NM { n: 2, m: 4 }, Sparsity::NM { n: 4, m: 8 }]
        {
            let e_s = relative_error(&w, &sgpt(&w, &h, s, None).weight, &h);
            let mag = Magnitude { sparsity: s, quant: None }.compress(&w, &h, &|| false).unwrap();
            let e_m = relative_error(&w, &mag.weight, &h);
            assert!(e_s < e_m, "{s:?}: sparsegpt {e_s} ≥ magnitude {e_m}");
        }
        // Joint 2:4 + 4-bit against magnitude 2:4 then RTN.
        let q = QuantSpec { bits: 4, group: Some(32), sym: false, ..Default::default() };
        let s = Sparsity::NM { n: 2, m: 4 };
        let e_s = relative_error(&w, &sgpt(&w, &h, s, Some(q.clone())).weight, &h);
        let mag = Magnitude { sparsity: s, quant: Some(q) }.compress(&w, &h, &|| false).unwrap();
        let e_m = relative_error(&w, &mag.weight, &h);
        assert!(e_s < e_m, "joint: sparsegpt {e_s} ≥ magnitude+rtn {e_m}");
    }

    #[test]
    fn sparsegpt_error_monotone_in_sparsity() {
        let (w, h) = testutil::layer(32, 128, 52);
        let errs: Vec<f64> = [0.1f32, 0.3, 0.5, 0.7, 0.9]
            .iter()
            .map(|&p| relative_error(&w, &sgpt(&w, &h, Sparsity::Unstructured(p), None).weight, &h))
            .collect();
        assert!(errs.windows(2).all(|p| p[1] > p[0]), "{errs:?}");
    }

    #[test]
    fn unstructured_prunes_exact_count_per_row() {
        let (w, h) = testutil::layer(7, 172, 53);
        for p in [0.5f32, 0.6] {
            let c = sgpt(&w, &h, Sparsity::Unstructured(p), None);
            let want = (p as f64 * 172.0).round() as usize;
            for r in 0..7 {
                assert_eq!(c.weight.row(r).iter().filter(|&&v| v == 0.0).count(), want, "p {p} row {r}");
            }
        }
    }

    #[test]
    fn two_of_four_mask_exact() {
        // 174 columns: 43 full chunks and a dense ragged tail of 2; block 30 is rounded to 28 (multiple of 4).
        let (w, h) = testutil::layer(9, 174, 54);
        for q in [None, Some(QuantSpec { bits: 4, group: Some(32), sym: true, ..Default::default() })] {
            let c = SparseGpt { quant: q.clone(), block_size: 30, ..SparseGpt::new(Sparsity::NM { n: 2, m: 4 }) }
                .compress(&w, &h, &|| false)
                .unwrap();
            // Pruned = zero in the float case; with quantization a kept weight may round to 0, so the keep-mask
            // is the pattern to check there.
            let pruned: Vec<bool> = match &c.quant {
                None => c.weight.data.iter().map(|&v| v == 0.0).collect(),
                Some(ql) => ql.mask.as_ref().unwrap().iter().map(|&k| !k).collect(),
            };
            for r in 0..9 {
                let pr = &pruned[r * 174..(r + 1) * 174];
                for (k, chunk) in pr[..172].chunks(4).enumerate() {
                    assert_eq!(chunk.iter().filter(|&&p| p).count(), 2, "row {r} chunk {k}");
                }
                assert!(pr[172..].iter().all(|&p| !p), "ragged tail stays dense");
            }
            if let Some(ql) = c.quant {
                let mask = ql.mask.as_ref().unwrap();
                assert!(mask.iter().zip(&c.weight.data).all(|(&k, &v)| k || v == 0.0));
                assert_eq!(mask.iter().filter(|&&k| !k).count(), 9 * 43 * 2);
                // Codes of pruned positions are the zero point.
                let ng = ql.n_groups();
                for (i, &k) in mask.iter().enumerate() {
                    if !k {
                        assert_eq!(ql.codes[i], ql.zeros[(i / 174) * ng + (i % 174) / 32]);
                    }
                }
                assert_eq!(ql.dequantize(), c.weight);
            }
        }
    }

    #[test]
    fn joint_unstructured_quant_dequantizes_to_weight() {
        let (w, h) = testutil::layer(6, 172, 55);
        for group in [None, Some(32)] {
            let q = QuantSpec { bits: 3, group, sym: false, ..Default::default() };
            let c = sgpt(&w, &h, Sparsity::Unstructured(0.5), Some(q));
            let ql = c.quant.as_ref().unwrap();
            assert_eq!(ql.dequantize(), c.weight);
            assert_eq!(ql.mask.as_ref().unwrap().iter().filter(|&&k| !k).count(), 6 * 86);
        }
    }
}
