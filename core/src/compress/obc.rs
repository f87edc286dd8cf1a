//! OBC / exact greedy OBS (algorithms.md §5): per row, repeatedly compress the single weight whose compression
//! costs least, (w_q − ŵ_q)² / [H⁻¹]_qq, update the rest of the row optimally, and remove q from H⁻¹ by one
//! Gaussian-elimination step. O(c³) per row, so only for small layers (c ≤ [`OBC_MAX_COLS`]); it is the ground
//! truth GPTQ/SparseGPT approximate (they fix the order instead of choosing greedily).
//!
//! Pruning and quantization can be combined: first prune greedily down to the target (unstructured or N:M), then
//! quantize the survivors greedily, with pruned weights held at 0. The quantization grids are fixed up front on the
//! original weights (per row, or per group), like GPTQ's per-channel grids, since OBC's order is data dependent.

use rayon::prelude::*;

use super::grid::Grid;
use super::linalg::{fix_dead_inputs, gemm_f64, inverse_cholesky_upper};
use super::{
    check_calibrated, check_inputs, prune_count, CompressError, Compressed, Compressor, Hessian, Matrix, QuantSpec, QuantizedLinear,
    Sparsity, OBC_MAX_COLS,
};

/// OBC settings: quantization, pruning, or both.
#[derive(Clone, Debug, PartialEq)]
pub struct Obc {
    pub quant: Option<QuantSpec>,
    pub sparsity: Option<Sparsity>,
    pub damp: f64,
}

/// Rows processed between two cancel checks.
const ROWS_PER_CANCEL_CHECK: usize = 16;

/// The result of one row.
struct RowOut {
    w: Vec<f32>,
    codes: Vec<u8>,
    keep: Vec<bool>,
}

/// Remove index q from the inverse Hessian: H⁻¹ ← H⁻¹ − H⁻¹[:, q] H⁻¹[q, :] / H⁻¹[q, q].
fn eliminate(hinv: &mut [f64], n: usize, q: usize) {
    let d = hinv[q * n + q];
    let col: Vec<f64> = (0..n).map(|i| hinv[i * n + q]).collect();
    for (i, &ci) in col.iter().enumerate() {
        if ci == 0.0 {
            continue;
        }
        let f = ci / d;
        for (v, &cj) in hinv[i * n..(i + 1) * n].iter_mut().zip(&col) {
            *v -= f * cj;
        }
    }
}

/// Apply the optimal compensation for moving w_q to `target`: w += −(w_q − target)/H⁻¹_qq · H⁻¹[:, q] on the
/// weights still free, then pin w_q to `target` exactly and eliminate q.
fn commit(w: &mut [f64], alive: &mut [bool], hinv: &mut [f64], n: usize, q: usize, target: f64) {
    let f = (w[q] - target) / hinv[q * n + q];
    for i in 0..n {
        if alive[i] {
            w[i] -= f * hinv[i * n + q];
        }
    }
    w[q] = target;
    alive[q] = false;
    eliminate(hinv, n, q);
}

impl Obc {
    fn compress_row(&self, row: &[f32], hinv0: &[f64], grids: &[Grid], g: usize) -> RowOut {
        let n = row.len();
        let mut hinv = hinv0.to_vec();
        let mut w: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        let mut alive = vec![true; n];
        let mut keep = vec![true; n];
        let mut codes = vec![0u8; n];

        // Phase 1: greedy pruning. `eligible` encodes the pattern: any weight, or only in full N:M chunks that
        // still have fewer than N zeros.
        if let Some(s) = self.sparsity {
            let (k, chunk) = match s {
                Sparsity::Unstructured(p) => (prune_count(p, n), None),
                Sparsity::NM { n: pn, m } => ((n / m) * pn, Some((pn, m))),
            };
            let mut pruned_in_chunk = vec![0usize; chunk.map_or(0, |(_, m)| n / m)];
            for _ in 0..k {
                let eligible = |i: usize| {
                    alive[i]
                        && chunk.is_none_or(|(pn, m)| i / m < pruned_in_chunk.len() && pruned_in_chunk[i / m] < pn)
                };
                let best = (0..n)
                    .filter(|&i| eligible(i))
                    .map(|i| (w[i] * w[i] / hinv[i * n + i], i))
                    .min_by(|a, b| a.0.total_cmp(&b.0));
                let Some((_, q)) = best else { break };
                if let Some((_, m)) = chunk {
                    pruned_in_chunk[q / m] += 1;
                }
                keep[q] = false;
                commit(&mut w, &mut alive, &mut hinv, n, q, 0.0);
            }
        }

        // Phase 2: greedy quantization of the survivors on the fixed grids.
        if self.quant.is_some() {
            for i in 0..n {
                if !keep[i] {
                    codes[i] = grids[i / g].zero;
                }
            }
            loop {
                // (cost, index, code, target, squared rounding error) of every free weight.
                let cands = (0..n).filter(|&i| alive[i]).map(|i| {
                    let code = grids[i / g].quantize(w[i] as f32);
                    let target = grids[i / g].dequantize(code) as f64;
                    let e2 = (w[i] - target).powi(2);
                    (e2 / hinv[i * n + i], i, code, target, e2)
                });
                // Outlier rule of the reference implementation (IST-DASLab/OBC trueobs.py): a weight that updates
                // pushed more than half a step outside its grid (rounding error² > scale²/4) is quantized at once,
                // largest first. Left to the greedy order it would wait until the end, keep drifting, and be
                // clamped with few weights left to compensate.
                let outlier = cands
                    .clone()
                    .filter(|c| c.4 > 0.25 * (grids[c.1 / g].scale as f64).powi(2))
                    .max_by(|a, b| a.4.total_cmp(&b.4));
                let best = outlier.or_else(|| cands.min_by(|a, b| a.0.total_cmp(&b.0)));
                let Some((_, q, code, target, _)) = best else { break };
                codes[q] = code;
                commit(&mut w, &mut alive, &mut hinv, n, q, target);
            }
        }
        RowOut { w: w.iter().map(|&v| v as f32).collect(), codes, keep }
    }
}

impl Compressor for Obc {
    fn compress(&self, w: &Matrix, h: &Hessian, cancel: &dyn Fn() -> bool) -> Result<Compressed, CompressError> {
        check_inputs(w, h)?;
        let (rows, n) = (w.rows, w.cols);
        if n > OBC_MAX_COLS {
            return Err(CompressError::InvalidSpec(format!(
                "OBC costs O(c³) per row and is limited to {OBC_MAX_COLS} input columns; this layer has {n} (use gptq or sparsegpt)"
            )));
        }
        check_calibrated(h)?;
        if self.quant.is_none() && self.sparsity.is_none() {
            return Err(CompressError::InvalidSpec("method obc needs a quant spec, a sparsity setting, or both".into()));
        }
        let mut w0 = w.clone();
        let hd = fix_dead_inputs(&mut w0, h);
        let (u, damp_used) = inverse_cholesky_upper(&hd, n, self.damp)?;
        // H⁻¹ = UᵀU.
        let mut ut = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                ut[i * n + j] = u[j * n + i];
            }
        }
        let mut hinv = vec![0f64; n * n];
        gemm_f64(&mut hinv, &ut, &u, n, n, n, 1.0);

        // Grids fixed up front on the original (dead-fixed) weights.
        let g = self.quant.as_ref().map_or(n, |s| s.group_size(n));
        let ng = n.div_ceil(g);
        let grids: Vec<Grid> = match &self.quant {
            Some(s) => (0..rows)
                .flat_map(|r| {
                    let row = w0.row(r);
                    (0..ng).map(move |gi| Grid::fit(&row[gi * g..((gi + 1) * g).min(n)], s.bits, s.sym, s.mse))
                })
                .collect(),
            None => vec![Grid { scale: 1.0, zero: 0, maxq: 1 }; rows * ng],
        };

        let mut outs: Vec<RowOut> = Vec::with_capacity(rows);
        for start in (0..rows).step_by(ROWS_PER_CANCEL_CHECK) {
            if cancel() {
                return Err(CompressError::Cancelled);
            }
            let end = (start + ROWS_PER_CANCEL_CHECK).min(rows);
            let chunk: Vec<RowOut> = (start..end)
                .into_par_iter()
                .map(|r| self.compress_row(w0.row(r), &hinv, &grids[r * ng..(r + 1) * ng], g))
                .collect();
            outs.extend(chunk);
        }

        let weight = Matrix::from_vec(rows, n, outs.iter().flat_map(|o| o.w.iter().copied()).collect());
        let keep: Vec<bool> = outs.iter().flat_map(|o| o.keep.iter().copied()).collect();
        let quant = self.quant.as_ref().map(|s| QuantizedLinear {
            rows,
            cols: n,
            bits: s.bits,
            group_size: g,
            sym: s.sym,
            codes: outs.iter().flat_map(|o| o.codes.iter().copied()).collect(),
            scales: grids.iter().map(|g| g.scale).collect(),
            zeros: grids.iter().map(|g| g.zero).collect(),
            g_idx: None,
            mask: self.sparsity.map(|_| keep),
        });
        Ok(Compressed { weight, quant, damp_used: Some(damp_used) })
    }
}

#[cfg(test)]
mod tests {
    use super::super::gptq::Gptq;
    use super::super::sparsegpt::SparseGpt;
    use super::super::{relative_error, testutil};
    use super::*;

    #[test]
    fn obc_error_le_gptq() {
        // Pruning 50%: exact greedy OBS must beat SparseGPT's fixed-order approximation on every layer (measured
        // margins are 25-50%), on the default strongly-coupled, heterogeneous-scale inputs.
        for seed in 0..4 {
            let (w, h) = testutil::layer(16, 24, 60 + seed);
            let s = Sparsity::Unstructured(0.5);
            let obc = Obc { quant: None, sparsity: Some(s), damp: 0.01 }.compress(&w, &h, &|| false).unwrap();
            let sg = SparseGpt::new(s).compress(&w, &h, &|| false).unwrap();
            let (eo, es) = (relative_error(&w, &obc.weight, &h), relative_error(&w, &sg.weight, &h));
            assert!(eo <= es, "seed {seed}: prune obc {eo} > sparsegpt {es}");
            for r in 0..16 {
                assert_eq!(obc.weight.row(r).iter().filter(|&&v| v == 0.0).count(), 12);
            }
        }
        // Quantization, per-channel 3-bit, same up-front grids and damp. The greedy order pays off when inputs are
        // comparably scaled and correlated (σ = 0, mixing 0.9): summed over 10 layers OBC must not lose to GPTQ
        // (measured: OBC/GPTQ = 0.89, OBC ahead on 9 of 10). Caveat measured on the default fixture (log-normal
        // channel scales σ = 1): there the greedy defers the important inputs (small [H⁻¹]_qq, high cost) to the
        // end where nothing is left to absorb their rounding error, and OBC is ~1.3× GPTQ's error.
        let q = QuantSpec { bits: 3, group: None, sym: false, ..Default::default() };
        let (mut sum_o, mut sum_g) = (0f64, 0f64);
        for seed in 0..10 {
            let (w, h) = testutil::layer_with(16, 24, 70 + seed, 0.0, 0.9);
            let obc = Obc { quant: Some(q.clone()), sparsity: None, damp: 0.01 }.compress(&w, &h, &|| false).unwrap();
            let gptq = Gptq::new(q.clone()).compress(&w, &h, &|| false).unwrap();
            sum_o += relative_error(&w, &obc.weight, &h);
            sum_g += relative_error(&w, &gptq.weight, &h);
            assert_eq!(obc.quant.unwrap().dequantize(), obc.weight);
        }
        assert!(sum_o <= sum_g, "quant: obc {sum_o} > gptq {sum_g} summed over 10 layers");
    }

    /// Solve A x = b (A small SPD) by Gaussian elimination, for the closed-form check below.
    fn solve(mut a: Vec<f64>, mut b: Vec<f64>) -> Vec<f64> {
        let n = b.len();
        for p in 0..n {
            for r in p + 1..n {
                let f = a[r * n + p] / a[p * n + p];
                for c in p..n {
                    a[r * n + c] -= f * a[p * n + c];
                }
                b[r] -= f * b[p];
            }
        }
        let mut x = vec![0f64; n];
        for p in (0..n).rev() {
            let s: f64 = (p + 1..n).map(|c| a[p * n + c] * x[c]).sum();
            x[p] = (b[p] - s) / a[p * n + p];
        }
        x
    }

    #[test]
    fn obc_pruning_matches_closed_form_optimum_for_its_mask() {
        // Whatever mask the greedy picks, the surviving weights must be the exact minimizer of
        // (w − w0) Ĥ (w − w0)ᵀ with the pruned ones fixed at 0: w_F = w0_F + Ĥ_FF⁻¹ Ĥ_FP w0_P (Ĥ = damped H).
        let (w, h) = testutil::layer(3, 12, 66);
        let n = 12;
        let c = Obc { quant: None, sparsity: Some(Sparsity::Unstructured(0.5)), damp: 0.01 }
            .compress(&w, &h, &|| false)
            .unwrap();
        let mean = (0..n).map(|i| h.get(i, i)).sum::<f64>() / n as f64;
        let hd = |i: usize, j: usize| h.get(i, j) + if i == j { 0.01 * mean } else { 0.0 };
        for r in 0..3 {
            let row = c.weight.row(r);
            let f: Vec<usize> = (0..n).filter(|&i| row[i] != 0.0).collect();
            let p: Vec<usize> = (0..n).filter(|&i| row[i] == 0.0).collect();
            assert_eq!(p.len(), 6);
            let a: Vec<f64> = f.iter().flat_map(|&i| f.iter().map(move |&j| hd(i, j))).collect();
            let b: Vec<f64> = f.iter().map(|&i| p.iter().map(|&j| hd(i, j) * w.get(r, j) as f64).sum()).collect();
            let x = solve(a, b);
            for (t, &i) in f.iter().enumerate() {
                let want = w.get(r, i) as f64 + x[t];
                // OBC accumulates in f64 and rounds to f32 once; 1e-4 relative covers the f32 output rounding
                // and the mild conditioning of Ĥ_FF.
                assert!((row[i] as f64 - want).abs() <= 1e-4 * want.abs().max(1e-2), "row {r} col {i}: {} vs {want}", row[i]);
            }
        }
    }

    #[test]
    fn obc_two_of_four_and_joint_quant() {
        let (w, h) = testutil::layer(8, 26, 65);
        let q = QuantSpec { bits: 4, group: Some(8), sym: true, ..Default::default() };
        let c = Obc { quant: Some(q), sparsity: Some(Sparsity::NM { n: 2, m: 4 }), damp: 0.01 }
            .compress(&w, &h, &|| false)
            .unwrap();
        let ql = c.quant.as_ref().unwrap();
        assert_eq!(ql.dequantize(), c.weight);
        // Check the keep-mask, not zeros: a kept weight may legitimately quantize to 0.
        let mask = ql.mask.as_ref().unwrap();
        for r in 0..8 {
            let mr = &mask[r * 26..(r + 1) * 26];
            for chunk in mr[..24].chunks(4) {
                assert_eq!(chunk.iter().filter(|&&k| !k).count(), 2);
            }
            assert_eq!(mr[24..], [true, true]);
        }
        assert!(mask.iter().zip(&c.weight.data).all(|(&k, &v)| k || v == 0.0));
    }

    #[test]
    fn obc_rejects_large_layers() {
        let w = Matrix::zeros(1, OBC_MAX_COLS + 1);
        let h = Hessian::zeros(OBC_MAX_COLS + 1);
        let err = Obc { quant: Some(QuantSpec::default()), sparsity: None, damp: 0.01 }
            .compress(&w, &h, &|| false)
            .unwrap_err();
        assert!(matches!(&err, CompressError::InvalidSpec(m) if m.contains("1024")), "{err}");
    }
}
