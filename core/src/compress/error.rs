//! The per-layer quality number of algorithms.md §1: err = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), 0 for a lossless layer and ~1
//! for Ŵ = 0. Computed as Σ (ΔW H) ∘ ΔW with an f64 GEMM over chunks of rows, so memory stays at one chunk while
//! the work runs at GEMM speed; f64 because H is f64 and the numerator can be 1e-6 of the denominator.

use rayon::prelude::*;

use super::linalg::gemm_f64;
use super::{Hessian, Matrix};

/// Rows per GEMM chunk: large enough for GEMM efficiency, small enough that the f64 chunk stays modest.
const CHUNK_ROWS: usize = 256;

/// Σ_rows d H dᵀ for the rows of `d(r)` (a closure producing row r's f64 values).
fn quadratic_form_sum(rows: usize, h: &Hessian, row: impl Fn(usize, &mut [f64]) + Sync) -> f64 {
    let n = h.n;
    let mut total = 0f64;
    let mut d = vec![0f64; CHUNK_ROWS.min(rows) * n];
    let mut p = vec![0f64; d.len()];
    for start in (0..rows).step_by(CHUNK_ROWS) {
        let m = CHUNK_ROWS.min(rows - start);
        let (d, p) = (&mut d[..m * n], &mut p[..m * n]);
        d.par_chunks_mut(n).enumerate().for_each(|(i, dr)| row(start + i, dr));
        p.fill(0.0);
        gemm_f64(p, d, &h.data, m, n, n, 1.0);
        total += d.par_iter().zip(p.par_iter()).map(|(a, b)| a * b).sum::<f64>();
    }
    total
}

/// Relative reconstruction error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ); 0 when the denominator is 0.
///
/// # Panics
/// If the shapes disagree (compressors return Ŵ of W's shape, and `compress_layer` checks H against W).
pub fn relative_error(w: &Matrix, w_hat: &Matrix, h: &Hessian) -> f64 {
    assert!(
        w.rows == w_hat.rows && w.cols == w_hat.cols && h.n == w.cols,
        "relative_error: W {}×{}, Ŵ {}×{}, H {}×{}",
        w.rows,
        w.cols,
        w_hat.rows,
        w_hat.cols,
        h.n,
        h.n
    );
    let den = quadratic_form_sum(w.rows, h, |r, out| {
        out.iter_mut().zip(w.row(r)).for_each(|(o, &a)| *o = a as f64);
    });
    if den == 0.0 {
        return 0.0;
    }
    let num = quadratic_form_sum(w.rows, h, |r, out| {
        out.iter_mut().zip(w.row(r).iter().zip(w_hat.row(r))).for_each(|(o, (&a, &b))| *o = a as f64 - b as f64);
    });
    num / den
}

#[cfg(test)]
mod tests {
    use super::super::testutil;
    use super::*;

    fn naive(w: &Matrix, w_hat: &Matrix, h: &Hessian) -> f64 {
        let n = h.n;
        let (mut num, mut den) = (0f64, 0f64);
        for r in 0..w.rows {
            for i in 0..n {
                for j in 0..n {
                    let (a, b) = (w.get(r, i) as f64, w.get(r, j) as f64);
                    let (da, db) = (a - w_hat.get(r, i) as f64, b - w_hat.get(r, j) as f64);
                    num += da * h.get(i, j) * db;
                    den += a * h.get(i, j) * b;
                }
            }
        }
        num / den
    }

    #[test]
    fn relative_error_matches_naive_trace_formula() {
        // 300 rows spans two chunks.
        let (w, h) = testutil::layer(300, 20, 3);
        let mut w_hat = w.clone();
        for (i, v) in w_hat.data.iter_mut().enumerate() {
            *v *= if i % 3 == 0 { 0.9 } else { 1.05 };
        }
        let got = relative_error(&w, &w_hat, &h);
        let want = naive(&w, &w_hat, &h);
        // Summation order differs; both are f64 sums of ~1e5 terms: 1e-10 relative is ample.
        assert!((got - want).abs() <= 1e-10 * want.abs(), "{got} vs {want}");
    }

    #[test]
    fn relative_error_is_zero_for_lossless_and_one_for_zero_weights() {
        let (w, h) = testutil::layer(8, 16, 4);
        assert_eq!(relative_error(&w, &w, &h), 0.0);
        let z = Matrix::zeros(8, 16);
        assert!((relative_error(&w, &z, &h) - 1.0).abs() < 1e-12);
        assert_eq!(relative_error(&z, &z, &h), 0.0);
    }
}
