//! Error feedback across layers for sequential calibration (the asymmetric-calibration idea of GPTAQ, Li et al.
//! 2025, in its closed form). A layer calibrated sequentially sees inputs X_q produced by the already-compressed
//! layers before it, while the dense model computes W X_d. Plain GPTQ minimizes ‖(W − Ŵ) X_q‖², which ignores the
//! error already in X_q. The objective that matters is ‖W X_d − Ŵ X_q‖². Its unconstrained minimizer is
//!   W' = W X_d X_qᵀ (X_q X_qᵀ)⁻¹ = W + W D H⁻¹,  with D = 2/n Σ (x_d − x_q) x_qᵀ and H = 2/n Σ x_q x_qᵀ,
//! and since the least-squares residual is orthogonal to X_q, ‖W X_d − Ŵ X_q‖² = ‖(W' − Ŵ) X_q‖² + const.
//! So compressing W' against H with any Hessian-based method (GPTQ, SparseGPT, OBC) minimizes the true
//! objective. H⁻¹ is damped exactly as GPTQ damps it (the same λ), which also keeps the shift small where the
//! calibration data says little.

use super::hessian::{add_batch_products, add_block_products, check_finite, zeroed, F32_BLOCK_ROWS};
use super::linalg::{gemm_f64, solve_right_damped};
use super::{CompressError, Hessian, Matrix};

/// D = 2/n Σ (x_d − x_q) x_qᵀ, summed like the Hessian (f32 blocks of at most `F32_BLOCK_ROWS` tokens, f64
/// across blocks) and scaled the same way, so the two combine exactly.
pub struct CrossAccumulator {
    n: usize,
    sum: Vec<f64>,
    samples: usize,
}

impl CrossAccumulator {
    pub fn new(n: usize) -> Self {
        Self { n, sum: zeroed(n * n), samples: 0 }
    }

    /// Adds `rows` paired inputs: `xq` as the compressed model computed them, `xd` as the dense model did.
    pub fn add_batch(&mut self, xq: &[f32], xd: &[f32], rows: usize) -> Result<(), CompressError> {
        self.add_batches(&[(xq, xd, rows)])
    }

    /// [`Self::add_batch`] for several pairs of batches, added in order (like `HessianAccumulator::add_batches`).
    pub fn add_batches(&mut self, batches: &[(&[f32], &[f32], usize)]) -> Result<(), CompressError> {
        let n = self.n;
        for &(xq, xd, rows) in batches {
            if xq.len() != rows * n || xd.len() != rows * n {
                return Err(CompressError::Shape(format!("paired calibration batch must be {rows}×{n}")));
            }
            check_finite(xd, n, "dense-path calibration input")?;
        }
        let block_len = F32_BLOCK_ROWS * n.max(1);
        add_batch_products(&mut self.sum, n, batches.len(), |i, target, panel| {
            let (xq, xd, _) = batches[i];
            let mut delta = Vec::with_capacity(block_len.min(xq.len()));
            for (q, d) in xq.chunks(block_len).zip(xd.chunks(block_len)) {
                delta.clear();
                delta.extend(d.iter().zip(q).map(|(d, q)| d - q));
                // Dᵀ-layout product: (x_d − x_q)ᵀ (n×t) times x_q (t×n).
                add_block_products(target, &delta, q, q.len() / n.max(1), n, false, panel);
            }
        });
        self.samples += batches.iter().map(|b| b.2).sum::<usize>();
        Ok(())
    }

    pub fn finish(self) -> Vec<f64> {
        let scale = if self.samples == 0 { 0.0 } else { 2.0 / self.samples as f64 };
        let mut d = self.sum;
        d.iter_mut().for_each(|v| *v *= scale);
        d
    }
}

/// W' = W + W D (H + λI)⁻¹, λ = damp · mean diag(H) (raised like GPTQ's when the factorization fails).
pub fn shifted_target(w: &Matrix, d: &[f64], h: &Hessian, damp: f64) -> Result<Matrix, CompressError> {
    shift_by(w, cross_product(w, d), h, damp)
}

/// W D in f64 (r×c): the part of the shift that reads D, so a caller can drop D (c×c) before the solve. W is
/// widened to f64 a block of rows at a time, not whole (0.36 GB for a 7B down_proj at the solve's memory peak).
pub fn cross_product(w: &Matrix, d: &[f64]) -> Vec<f64> {
    const ROWS: usize = 512;
    let (r, c) = (w.rows, w.cols);
    let mut a = vec![0.0; r * c];
    let mut block = Vec::with_capacity(ROWS.min(r) * c);
    for (wr, ar) in w.data.chunks(ROWS * c.max(1)).zip(a.chunks_mut(ROWS * c.max(1))) {
        block.clear();
        block.extend(wr.iter().map(|&v| v as f64));
        gemm_f64(ar, &block, d, wr.len() / c.max(1), c, c, 1.0);
    }
    a
}

/// W + A (H + λI)⁻¹ for A = [`cross_product`]`(W, D)`.
pub fn shift_by(w: &Matrix, mut a: Vec<f64>, h: &Hessian, damp: f64) -> Result<Matrix, CompressError> {
    let (r, c) = (w.rows, w.cols);
    if a.len() != r * c || h.n != c {
        return Err(CompressError::Shape(format!("error-feedback shift of a {r}×{c} weight needs a {r}×{c} product and a {c}×{c} Hessian")));
    }
    solve_right_damped(&mut a, r, &h.data, c, damp)?;
    Ok(Matrix::from_vec(r, c, w.data.iter().zip(&a).map(|(&v, &s)| (v as f64 + s) as f32).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::HessianAccumulator;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// With (almost) no damping, the shifted target is the least-squares fit of the dense outputs from the
    /// compressed path's inputs: it removes an invertible distortion entirely, and no perturbation improves on it.
    #[test]
    fn shifted_target_is_the_least_squares_fit_to_dense_outputs() {
        let mut rng = StdRng::seed_from_u64(3);
        let (r, c, n) = (5, 8, 200);
        let w = Matrix::from_vec(r, c, (0..r * c).map(|_| rng.random_range(-1.0..1.0)).collect());
        let xd: Vec<f32> = (0..n * c).map(|_| rng.random_range(-1.0..1.0)).collect();
        // The compressed path distorts its inputs by a fixed near-identity map M (x_q = M x_d); then W' = W M⁻¹
        // reproduces the dense outputs exactly, and the least-squares target must find it.
        let m: Vec<f32> = (0..c * c).map(|i| if i % (c + 1) == 0 { 1.0 } else { 0.0 } + rng.random_range(-0.15..0.15)).collect();
        let xq: Vec<f32> = (0..n * c).map(|k| (0..c).map(|j| m[(k % c) * c + j] * xd[(k / c) * c + j]).sum()).collect();
        let mut ha = HessianAccumulator::new(c);
        ha.add_batch(&xq, n).unwrap();
        let h = ha.finish();
        let mut ca = CrossAccumulator::new(c);
        ca.add_batch(&xq[..100 * c], &xd[..100 * c], 100).unwrap();
        ca.add_batch(&xq[100 * c..], &xd[100 * c..], 100).unwrap();
        let d = ca.finish();
        let shifted = shifted_target(&w, &d, &h, 1e-9).unwrap();
        let err = |m: &Matrix| -> f64 {
            let mut s = 0.0;
            for t in 0..n {
                for o in 0..r {
                    let want: f32 = (0..c).map(|i| w.get(o, i) * xd[t * c + i]).sum();
                    let got: f32 = (0..c).map(|i| m.get(o, i) * xq[t * c + i]).sum();
                    s += ((want - got) as f64).powi(2);
                }
            }
            s
        };
        let (before, after) = (err(&w), err(&shifted));
        // 1e-6: f32 inputs and the damp of 1e-9 leave only rounding-level residue.
        assert!(after < 1e-6 * before, "least-squares shift should remove the output error: {before} -> {after}");
        // And no other small perturbation does better (first-order optimality), checked on random directions.
        for _ in 0..5 {
            let mut p = shifted.clone();
            for v in p.data.iter_mut() {
                *v += rng.random_range(-1e-2..1e-2);
            }
            assert!(err(&p) >= after * (1.0 - 1e-6));
        }
    }
}
