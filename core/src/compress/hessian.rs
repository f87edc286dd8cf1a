//! Accumulates a layer's Hessian H = 2/m Σ x xᵀ from calibration batches (algorithms.md §1).
//!
//! Blocked summation: each batch is cut into blocks of at most [`F32_BLOCK_ROWS`] tokens, a block's XᵀX is made
//! in f32 GEMMs (lower triangle only: about half the flops; a panel of rows at a time), and the blocks are summed
//! in f64. Every entry of a block
//! product sums at most 512 products of the *same* two channels, so an f32 block is accurate to ~2⁻²⁴·√512 ≈ 1e-6
//! relative to that entry's own scale (worst case 512·2⁻²⁴ ≈ 3e-5), small channels included, and the f64 total
//! keeps that over any number of tokens (hundreds of thousands for a 7B calibration). Tests check 1e-5 against a
//! naive f64 sum. This runs at the f32 GEMM rate, twice the f64 one.

use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::{CompressError, Hessian};

/// Most tokens summed in f32 before their block joins the f64 total (see the module docs for the error bound).
pub(crate) const F32_BLOCK_ROWS: usize = 512;

/// Parallelism for a product of `mul_adds` multiply-adds: below ~16M (a few milliseconds on one core) waking the
/// pool and faer's barriers cost more than the second core gives back, and calibration already runs windows in
/// parallel around these calls.
pub(crate) fn par_for(mul_adds: usize) -> Par {
    if mul_adds >= 1 << 24 {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// Bytes of the f32 panel a block product is computed in: rows of the n×n product are made a panel at a time, so
/// a 7B down_proj (n = 11008, a 485 MB product) needs 8 MiB beside its f64 sums, not another n² buffer.
const PANEL_BYTES: usize = 8 << 20;

/// sum[i, j] += Σ_t a[t, i] · b[t, j] for one block of `t` tokens (`a`, `b` row-major t × n, t ≤
/// [`F32_BLOCK_ROWS`]): an f32 GEMM per panel of rows of the product, each panel added into the f64 `sum`
/// (row-major n × n). With `lower_only`, only j ≤ i is computed and added (a Hessian's lower triangle).
pub(crate) fn add_block_products(sum: &mut [f64], a: &[f32], b: &[f32], t: usize, n: usize, lower_only: bool, panel: &mut Vec<f32>) {
    // Lower triangle: at least 4 panels, so the panels above the diagonal are skipped (5/8 of the full product's
    // flops at 4 panels); one panel would compute the whole square.
    let most = if lower_only { n.div_ceil(4) } else { n };
    let rows = (PANEL_BYTES / (n.max(1) * 4)).min(most).max(16);
    let am = MatRef::from_row_major_slice(a, t, n);
    let bm = MatRef::from_row_major_slice(b, t, n);
    for i0 in (0..n).step_by(rows) {
        let i1 = (i0 + rows).min(n);
        let cols = if lower_only { i1 } else { n };
        panel.resize((i1 - i0) * cols, 0.0);
        let dst = MatMut::from_row_major_slice_mut(&mut panel[..], i1 - i0, cols);
        let (lhs, rhs) = (am.subcols(i0, i1 - i0).transpose(), bm.subcols(0, cols));
        faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, par_for(t * (i1 - i0) * cols));
        for (i, prow) in (i0..i1).zip(panel.chunks_exact(cols)) {
            let end = if lower_only { i + 1 } else { n };
            for (s, &p) in sum[i * n..i * n + end].iter_mut().zip(&prow[..end]) {
                *s += p as f64;
            }
        }
    }
    whittle_kernels::cpu::clear_upper_vector_state();
}

/// Bytes of per-batch f64 partial sums one call may hold to compute its batches on separate cores.
const PARALLEL_PARTIALS_BYTES: usize = 32 << 20;

/// Adds the products of `batches` batches into `sum` (n × n f64), `product(i, target, panel)` adding batch i's
/// into `target`. When every batch's partial sum fits in [`PARALLEL_PARTIALS_BYTES`] (small layers), the batches
/// run on separate cores into partial sums that are then added in batch order: calibration computes a chunk of
/// windows in parallel, and the products of a small layer are too small for a parallel GEMM, so they would
/// otherwise run on one core while the others wait. Larger layers run one batch after another (their GEMMs are
/// parallel themselves). Either way the result depends only on the batches, not on scheduling.
pub(crate) fn add_batch_products(
    sum: &mut [f64],
    n: usize,
    batches: usize,
    product: impl Fn(usize, &mut [f64], &mut Vec<f32>) + Sync,
) {
    if batches > 1 && batches * n * n * 8 <= PARALLEL_PARTIALS_BYTES {
        // Taken out of the thread-local pools (not borrowed) for the call: a nested call on this thread, from work
        // rayon runs while it waits, then starts from empty pools instead of finding them borrowed.
        let mut partials = PARTIALS.take();
        if partials.len() < batches {
            partials.resize_with(batches, Vec::new);
        }
        partials[..batches].par_iter_mut().enumerate().for_each(|(i, part)| {
            part.clear();
            part.resize(n * n, 0.0);
            let mut panel = PANEL.take();
            product(i, part, &mut panel);
            PANEL.set(panel);
        });
        for part in &partials[..batches] {
            sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
        }
        PARTIALS.set(partials);
    } else {
        let mut panel = PANEL.take();
        (0..batches).for_each(|i| product(i, sum, &mut panel));
        PANEL.set(panel);
    }
}

thread_local! {
    /// The per-batch partial sums of [`add_batch_products`] (at most [`PARALLEL_PARTIALS_BYTES`]) and the f32 panels
    /// of [`add_block_products`] (at most [`PANEL_BYTES`]), kept per thread between calls: fresh pages for them cost
    /// a page fault each, and a partial sum is read before it is first written, so its fault also flushed the other
    /// cores' TLBs (about a twentieth of a small model's whole compression).
    static PARTIALS: std::cell::Cell<Vec<Vec<f64>>> = const { std::cell::Cell::new(Vec::new()) };
    static PANEL: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `len` zeros, written rather than calloc'ed: the sums are read before they are first written, and reading a
/// calloc'ed page maps the shared zero page, whose copy-on-write at the first write flushes every core's TLB.
pub(crate) fn zeroed(len: usize) -> Vec<f64> {
    let mut v = Vec::with_capacity(len);
    v.resize(len, 0.0);
    v
}

/// The first non-finite value of a batch, as an error naming its row and feature.
pub(crate) fn check_finite(x: &[f32], n: usize, what: &str) -> Result<(), CompressError> {
    // A branch-free pass first (it vectorizes; a search with an early exit does not), the position only on failure.
    if x.iter().fold(true, |ok, v| ok & v.is_finite()) {
        return Ok(());
    }
    match x.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(CompressError::Numerical(format!("{what} (batch row {}, feature {}) is {}", i / n, i % n, x[i]))),
        None => Ok(()),
    }
}

/// Hessian of one layer's inputs: an f64 sum of XᵀX over every token added so far.
#[derive(Clone, Debug)]
pub struct HessianAccumulator {
    n: usize,
    /// Row-major n×n Σ x xᵀ; only the lower triangle (i ≥ j) is maintained until `finish`.
    sum: Vec<f64>,
    samples: usize,
}

impl HessianAccumulator {
    /// An empty accumulator for inputs of `n` features (the layer's in_features).
    pub fn new(n: usize) -> Self {
        Self { n, sum: zeroed(n * n), samples: 0 }
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
        self.add_batches(&[(x, n_rows)])
    }

    /// [`Self::add_batch`] for several batches (a chunk of calibration windows), added in order; small layers
    /// compute them on separate cores (see `add_batch_products`). On error nothing is added.
    pub fn add_batches(&mut self, batches: &[(&[f32], usize)]) -> Result<(), CompressError> {
        let n = self.n;
        for &(x, n_rows) in batches {
            if x.len() != n_rows * n {
                return Err(CompressError::Shape(format!(
                    "calibration batch has {} values, expected {n_rows} rows × {n} features = {}",
                    x.len(),
                    n_rows * n
                )));
            }
            check_finite(x, n, "calibration input")?;
        }
        add_batch_products(&mut self.sum, n, batches.len(), |i, target, panel| {
            for rows in batches[i].0.chunks(F32_BLOCK_ROWS * n.max(1)) {
                add_block_products(target, rows, rows, rows.len() / n.max(1), n, true, panel);
            }
        });
        self.samples += batches.iter().map(|b| b.1).sum::<usize>();
        Ok(())
    }

    /// The symmetric Hessian 2/m Σ x xᵀ (all zeros if no batch was added).
    pub fn finish(self) -> Hessian {
        let n = self.n;
        let scale = if self.samples == 0 { 0.0 } else { 2.0 / self.samples as f64 };
        let mut data = self.sum;
        for i in 0..n {
            for j in 0..=i {
                data[i * n + j] *= scale;
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
        // The blocked f32 sum is ~1e-6 relative per entry (module docs); 1e-5 still catches a dropped or doubled
        // block (an error of order 1e-1) and a running sum in f32 over many blocks.
        assert!((diff / norm).sqrt() < 1e-5, "relative error {}", (diff / norm).sqrt());
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
