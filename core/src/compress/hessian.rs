//! Accumulates a layer's Hessian H = 2/m Σ x xᵀ from calibration batches (algorithms.md §1) as a running mean.
//!
//! Why f64 all the way: c reaches 28k and m hundreds of thousands of tokens, with activation channels whose
//! magnitudes differ by orders; an f32 sum loses the small channels' contribution. So each f32 batch is widened to
//! f64 and multiplied with a faer f64 GEMM; the result matches a naive f64 sum to ~1e-12 relative (tests check
//! 1e-9), at half the f32 GEMM rate. Only the lower triangle is computed (a SYRK: half the flops) and mirrored in
//! [`HessianAccumulator::finish`].

use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};

use super::{CompressError, Hessian};

/// Running-mean Hessian of one layer's inputs.
#[derive(Clone, Debug)]
pub struct HessianAccumulator {
    n: usize,
    /// Row-major n×n; only the lower triangle (i ≥ j) is maintained until `finish`.
    h: Vec<f64>,
    samples: usize,
    /// Reused f64 copy of the current batch.
    scratch: Vec<f64>,
}

impl HessianAccumulator {
    /// An empty accumulator for inputs of `n` features (the layer's in_features).
    pub fn new(n: usize) -> Self {
        Self { n, h: vec![0.0; n * n], samples: 0, scratch: Vec::new() }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Input vectors accumulated so far.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Add a batch of `n_rows` input vectors, `x` row-major `n_rows × n` (one token per row).
    /// On error (wrong length, NaN/Inf) the accumulator is left unchanged.
    pub fn add_batch(&mut self, x: &[f32], n_rows: usize) -> Result<(), CompressError> {
        let n = self.n;
        if x.len() != n_rows * n {
            return Err(CompressError::Shape(format!(
                "calibration batch has {} values, expected {n_rows} rows × {n} features = {}",
                x.len(),
                n_rows * n
            )));
        }
        if n_rows == 0 {
            return Ok(());
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(CompressError::Numerical(format!(
                "calibration input (batch row {}, feature {}) is {}",
                i / n,
                i % n,
                x[i]
            )));
        }
        self.scratch.clear();
        self.scratch.extend(x.iter().map(|&v| v as f64));

        // Running mean: H ← H·m/(m+t), then H += 2/(m+t) · XᵀX.
        let m = self.samples as f64;
        let total = self.samples + n_rows;
        let keep = m / total as f64;
        for i in 0..n {
            for v in &mut self.h[i * n..i * n + i + 1] {
                *v *= keep;
            }
        }
        let xm = MatRef::from_row_major_slice(&self.scratch, n_rows, n);
        let dst = MatMut::from_row_major_slice_mut(&mut self.h, n, n);
        triangular::matmul(
            dst,
            BlockStructure::TriangularLower,
            Accum::Add,
            xm.transpose(),
            BlockStructure::Rectangular,
            xm,
            BlockStructure::Rectangular,
            2.0 / total as f64,
            Par::rayon(0),
        );
        self.samples = total;
        Ok(())
    }

    /// The symmetric Hessian (all zeros if no batch was added).
    pub fn finish(self) -> Hessian {
        let n = self.n;
        let mut data = self.h;
        for i in 0..n {
            for j in 0..i {
                data[j * n + i] = data[i * n + j];
            }
        }
        Hessian { n, data, samples: self.samples }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn hessian_accumulator_matches_naive_f64_sum() {
        let mut rng = StdRng::seed_from_u64(11);
        let n = 37;
        let mut acc = HessianAccumulator::new(n);
        let mut naive = vec![0f64; n * n];
        let mut m = 0usize;
        // Uneven batch sizes (incl. 1 and an empty one) exercise the running-mean rescaling.
        for t in [5usize, 1, 0, 64, 13, 200] {
            // Channels with magnitudes spread over 4 orders, like real activations.
            let x: Vec<f32> =
                (0..t * n).map(|i| rng.random_range(-1.0f32..1.0) * 10f32.powi((i % n) as i32 % 5 - 2)).collect();
            acc.add_batch(&x, t).unwrap();
            for r in 0..t {
                let row = &x[r * n..(r + 1) * n];
                for i in 0..n {
                    for j in 0..n {
                        naive[i * n + j] += row[i] as f64 * row[j] as f64;
                    }
                }
            }
            m += t;
        }
        let h = acc.finish();
        assert_eq!(h.samples, m);
        let scale = 2.0 / m as f64;
        let mut diff = 0f64;
        let mut norm = 0f64;
        for (&got, &sum) in h.data.iter().zip(&naive) {
            let want = sum * scale;
            diff += (got - want).powi(2);
            norm += want.powi(2);
        }
        // f64 round-off over ~300 samples is ~1e-14 relative; 1e-9 would still catch any f32 shortcut (~1e-7).
        assert!((diff / norm).sqrt() < 1e-9, "relative error {}", (diff / norm).sqrt());
        for i in 0..n {
            for j in 0..n {
                assert_eq!(h.data[i * n + j], h.data[j * n + i]);
            }
        }
    }

    #[test]
    fn hessian_accumulator_rejects_nan_and_bad_length_without_changing_state() {
        let mut acc = HessianAccumulator::new(3);
        acc.add_batch(&[1.0, 2.0, 3.0], 1).unwrap();
        let before = acc.clone();
        let err = acc.add_batch(&[1.0, f32::NAN, 0.0, 1.0, 1.0, f32::INFINITY], 2).unwrap_err();
        assert!(matches!(&err, CompressError::Numerical(m) if m.contains("batch row 0, feature 1")), "{err}");
        assert!(matches!(acc.add_batch(&[1.0, 2.0], 1), Err(CompressError::Shape(_))));
        assert_eq!(acc.samples(), before.samples());
        assert_eq!(acc.finish().data, before.finish().data);
    }
}
