//! Dense linear algebra the Hessian-based compressors share, on top of faer: dead-input handling, dampening with
//! automatic retry, the upper Cholesky factor of H⁻¹ (algorithms.md §3 steps 1, 3, 4), and row-major GEMM wrappers.
//!
//! U (H⁻¹ = UᵀU, U upper) is computed with one Cholesky and one triangular inverse instead of the reference's
//! three factorizations: with J the reversal permutation, J H J = L Lᵀ gives H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and
//! J L⁻¹ J is upper triangular with a positive diagonal, hence *the* upper Cholesky factor of H⁻¹. For a row-major
//! buffer, M ↦ J M J is just reversing the buffer. Everything is f64: H can be badly conditioned.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch, LltRegularization};
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::linalg::triangular_solve::{solve_lower_triangular_in_place, solve_upper_triangular_in_place};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::{CompressError, Hessian, Matrix};

/// Dampening retries: multiply by this factor after a failed Cholesky ...
const DAMP_STEP: f64 = 10.0;
/// ... at most this many times ...
const DAMP_RETRIES: usize = 4;
/// ... starting from at least this much when the requested damp is 0.
const DAMP_FLOOR: f64 = 1e-4;

/// Algorithms.md §3 step 1: where H_ii = 0 the input never fires; its weight column is zeroed here (the compressor
/// then outputs 0 there) and the returned mask tells the factorization to use H_ii = 1 so it is defined.
pub(crate) fn zero_dead_columns(w: &mut Matrix, h: &Hessian) -> Vec<bool> {
    let n = h.n;
    let dead: Vec<bool> = (0..n).map(|i| h.data[i * n + i] == 0.0).collect();
    if dead.iter().any(|&d| d) {
        w.data.par_chunks_mut(w.cols).for_each(|row| {
            row.iter_mut().zip(&dead).filter(|(_, &d)| d).for_each(|(v, _)| *v = 0.0);
        });
    }
    dead
}

/// [`zero_dead_columns`] plus a copy of H with H_ii = 1 at dead inputs, for callers that need H itself.
pub(crate) fn fix_dead_inputs(w: &mut Matrix, h: &Hessian) -> Vec<f64> {
    let dead = zero_dead_columns(w, h);
    let n = h.n;
    let mut hd = h.data.clone();
    for i in (0..n).filter(|&i| dead[i]) {
        hd[i * n + i] = 1.0;
    }
    hd
}

/// The upper Cholesky factor U of (H + λI)⁻¹, row-major n×n (lower part zero), with λ = damp · mean(diag H).
/// If the factorization fails the damp is raised ×10 (up to 4 times). Returns (U, damp actually used).
pub(crate) fn inverse_cholesky_upper(h: &[f64], n: usize, damp: f64) -> Result<(Vec<f64>, f64), CompressError> {
    inverse_cholesky_upper_as::<f64>(h, n, &[], damp)
}

/// [`inverse_cholesky_upper`] for the f32 column sweep, with H_ii taken as 1 where `dead[i]` (empty = none), which
/// saves the sweep a c×c copy of H. The Cholesky factorization (where definiteness is decided) stays f64; the
/// triangular inverse runs in f32: the sweep consumes U in f32 anyway, triangular inversion is forward stable
/// (relative error ~ κ(L)·2⁻²⁴, κ(L) = √κ(H + λI) ≲ 10³ with damp ≥ 0.01), and it halves the O(c³) part that
/// otherwise dominates GPTQ on square layers.
pub(crate) fn inverse_cholesky_upper_f32(
    h: &[f64],
    n: usize,
    dead: &[bool],
    damp: f64,
) -> Result<(Vec<f32>, f64), CompressError> {
    inverse_cholesky_upper_as::<f32>(h, n, dead, damp)
}

/// Precision of the triangular inverse.
trait InvScalar: faer::traits::ComplexField + Copy + Send + Sync + PartialOrd + bytemuck::Pod {
    fn of(v: f64) -> Self;
    fn finite(self) -> bool;
    fn finite_positive(self) -> bool {
        self.finite() && self > Self::of(0.0)
    }
    /// The factor in this precision; may reuse the factor's buffer.
    fn factor_values(factor: Vec<f64>) -> FactorValues<Self>;
}

/// A factor converted to the inverse's precision: its own buffer (f64), or the f64 buffer narrowed in place (f32).
enum FactorValues<T> {
    Own(Vec<T>),
    Narrowed(Vec<f64>, usize),
}

impl<T: bytemuck::Pod> FactorValues<T> {
    fn as_slice(&self) -> &[T] {
        match self {
            FactorValues::Own(v) => v,
            FactorValues::Narrowed(v, n) => &bytemuck::cast_slice::<f64, T>(v)[..*n],
        }
    }
}

impl InvScalar for f64 {
    fn of(v: f64) -> Self {
        v
    }
    fn finite(self) -> bool {
        self.is_finite()
    }
    fn factor_values(factor: Vec<f64>) -> FactorValues<Self> {
        FactorValues::Own(factor)
    }
}

impl InvScalar for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
    fn finite(self) -> bool {
        self.is_finite()
    }
    fn factor_values(factor: Vec<f64>) -> FactorValues<Self> {
        let n = factor.len();
        FactorValues::Narrowed(narrow_in_place(factor), n)
    }
}

/// Rounds every f64 of `v` to f32, storing element i in the first half of the same buffer, then gives the second
/// half back to the allocator. Why not a new Vec<f32>: for the 11008-column down_proj of a 7B model this is the
/// difference between holding 1.45 GB (f64 factor + f32 copy) and 0.97 GB at the peak of its GPTQ solve.
fn narrow_in_place(mut v: Vec<f64>) -> Vec<f64> {
    let n = v.len();
    for i in 0..n {
        let x = v[i] as f32;
        // f32 slot i lies in f64 slot i/2 ≤ i, which has been read already; slot i itself is read just above.
        bytemuck::cast_slice_mut::<f64, f32>(&mut v)[i] = x;
    }
    v.truncate(n.div_ceil(2));
    v.shrink_to_fit();
    v
}

/// Factors J (H + λI) J = L Lᵀ (J the reversal; H_ii taken as 1 where `dead[i]`), λ = damp · mean(diag H), and hands
/// the row-major factor (lower triangle = L, upper triangle unspecified) to `finish`. If the factorization fails,
/// a pivot is too small, or `finish` returns `None` (its result overflowed), the damp is raised ×10 (up to 4 times).
/// Returns what `finish` made and the damp used.
fn with_damped_reversed_factor<R>(
    h: &[f64],
    n: usize,
    dead: &[bool],
    damp: f64,
    mut finish: impl FnMut(Vec<f64>) -> Option<R>,
) -> Result<(R, f64), CompressError> {
    let diag = |i: usize| if dead.get(i) == Some(&true) { 1.0 } else { h[i * n + i] };
    let mean_diag = if n == 0 { 0.0 } else { (0..n).map(diag).sum::<f64>() / n as f64 };
    let par = Par::rayon(0);
    let mut d = damp;
    for attempt in 0..=DAMP_RETRIES {
        if attempt > 0 {
            d = (d * DAMP_STEP).max(DAMP_FLOOR);
        }
        let lambda = d * mean_diag;
        // J (H + λI) J: row i of the reversal is row n−1−i of H, reversed.
        let mut a = vec![0f64; n * n];
        a.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            let src = &h[(n - 1 - i) * n..(n - i) * n];
            row.iter_mut().zip(src.iter().rev()).for_each(|(x, &y)| *x = y);
            row[i] = diag(n - 1 - i) + lambda;
        });
        let ok = {
            let mut mem = MemBuffer::new(cholesky_in_place_scratch::<f64>(n, par, Default::default()));
            let stack = MemStack::new(&mut mem);
            let view = MatMut::from_row_major_slice_mut(&mut a, n, n);
            cholesky_in_place(view, LltRegularization::default(), par, stack, Default::default()).is_ok()
        };
        // For PSD H every pivot² of H + λI is ≥ λ (a pivot² is 1/[(Schur block)⁻¹]₁₁ ≥ its smallest eigenvalue).
        // A smaller pivot means H is not PSD (broken accumulation) or round-off dominates: the factor would
        // amplify noise, so treat it as a failure and damp more.
        if !ok || (0..n).any(|i| a[i * n + i] * a[i * n + i] < 0.5 * lambda) {
            continue;
        }
        if let Some(r) = finish(a) {
            return Ok((r, d));
        }
    }
    Err(CompressError::CholeskyFailed { damp: d })
}

fn inverse_cholesky_upper_as<T: InvScalar>(
    h: &[f64],
    n: usize,
    dead: &[bool],
    damp: f64,
) -> Result<(Vec<T>, f64), CompressError> {
    let par = Par::rayon(0);
    with_damped_reversed_factor(h, n, dead, damp, |a| {
        // Only the lower triangle is read by the inversion; the upper one still holds H and is converted unread.
        let l = T::factor_values(a);
        let mut inv = vec![T::of(0.0); n * n];
        invert_lower_triangular(
            MatMut::from_row_major_slice_mut(&mut inv, n, n),
            MatRef::from_row_major_slice(l.as_slice(), n, n),
            par,
        );
        drop(l);
        // J L⁻¹ J: reverse the buffer, swapping row i with row n−1−i reversed, in parallel.
        let (top, bottom) = inv.split_at_mut((n / 2) * n);
        let (middle, bottom) = bottom.split_at_mut((n % 2) * n);
        middle.reverse();
        top.par_chunks_mut(n).zip(bottom.par_chunks_mut(n).rev()).for_each(|(x, y)| {
            x.iter_mut().zip(y.iter_mut().rev()).for_each(|(p, q)| std::mem::swap(p, q));
        });
        // A "successful" factorization of a nearly singular matrix can still overflow in the inverse: the upper
        // triangle must be finite and the diagonal positive.
        let sane = inv.par_chunks(n).enumerate().all(|(i, row)| {
            row[i].finite_positive() && row[i + 1..].iter().all(|v| v.finite())
        });
        sane.then_some(inv)
    })
}

/// X = A (H + λI)⁻¹ for row-major `a` (m×n), overwriting `a`, with λ and its automatic increase as in
/// [`inverse_cholesky_upper`]; returns the damp used. Two triangular solves against the Cholesky factor instead of
/// the explicit inverse: one n×n buffer besides H rather than three, which is what lets error feedback run on a
/// 7b down_proj (n = 11008, 0.97 GB per f64 n×n) within a desktop's memory, and solves are the more accurate route.
pub(crate) fn solve_right_damped(a: &mut [f64], m: usize, h: &[f64], n: usize, damp: f64) -> Result<f64, CompressError> {
    assert_eq!(a.len(), m * n, "solve_right_damped: A must be m×n");
    let par = Par::rayon(0);
    let (finite, d) = with_damped_reversed_factor(h, n, &[], damp, |l| {
        // With J(H+λI)J = L Lᵀ and Z = X J: Z L Lᵀ = A J, i.e. L Lᵀ Zᵀ = (A J)ᵀ. Reverse each row of A (A J), solve
        // L Y = (AJ)ᵀ, then Lᵀ Zᵀ = Y, and reverse each row of Z back into X.
        a.par_chunks_mut(n).for_each(|row| row.reverse());
        let factor = MatRef::from_row_major_slice(&l, n, n);
        let rhs = MatMut::from_row_major_slice_mut(a, m, n).transpose_mut();
        solve_lower_triangular_in_place(factor, rhs, par);
        let rhs = MatMut::from_row_major_slice_mut(a, m, n).transpose_mut();
        solve_upper_triangular_in_place(factor.transpose(), rhs, par);
        a.par_chunks_mut(n).for_each(|row| row.reverse());
        Some(a.par_iter().all(|v| v.is_finite()))
    })?;
    // Every pivot² ≥ λ/2 bounds ‖X‖ by ‖A‖·2/λ, so only non-finite A gets here; A is consumed, so no retry.
    if !finite {
        return Err(CompressError::Numerical("the error-feedback shift is not finite (non-finite inputs?)".into()));
    }
    Ok(d)
}

/// C(m×n) = beta·C + alpha · A(m×k) · B(k×n); all row-major with leading dimensions (row strides) lda, ldb, ldc.
/// `accumulate` false overwrites C.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided<T: faer::traits::ComplexField + Copy>(
    c: &mut [T],
    ldc: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    (m, k, n): (usize, usize, usize),
    alpha: T,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Not `MatMut::from_row_major_slice_with_stride_mut`: in faer 0.24.4 it builds a *column*-major view (row stride
    // 1, column stride ldc), so GEMMs write out of bounds. The transpose of a column-major view is correct.
    let dst = MatMut::from_column_major_slice_with_stride_mut(c, n, m, ldc).transpose_mut();
    let lhs = MatRef::from_row_major_slice_with_stride(a, m, k, lda);
    let rhs = MatRef::from_row_major_slice_with_stride(b, k, n, ldb);
    let beta = if accumulate { Accum::Add } else { Accum::Replace };
    faer::linalg::matmul::matmul(dst, beta, lhs, rhs, alpha, Par::rayon(0));
}

/// C += alpha · A·B for contiguous row-major f32 matrices, A m×k, B k×n, C m×n, on all cores: the GEMM the GPTQ
/// trailing update uses, exposed so benchmarks can measure the reference rate with the same code path.
pub fn gemm_f32(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, alpha: f32) {
    assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n, "gemm_f32: slice lengths disagree with m, k, n");
    gemm_strided(c, n, a, k, b, n, (m, k, n), alpha, true);
}

/// f64 version of [`gemm_f32`] (the precision of Hessian accumulation and the error metric).
pub fn gemm_f64(c: &mut [f64], a: &[f64], b: &[f64], m: usize, k: usize, n: usize, alpha: f64) {
    assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n, "gemm_f64: slice lengths disagree with m, k, n");
    gemm_strided(c, n, a, k, b, n, (m, k, n), alpha, true);
}

#[cfg(test)]
mod tests {
    use super::super::testutil;
    use super::*;

    #[test]
    fn inverse_cholesky_upper_factors_damped_inverse() {
        let (_, h) = testutil::layer(4, 40, 7);
        let n = h.n;
        let (u, d) = inverse_cholesky_upper(&h.data, n, 0.01).unwrap();
        assert_eq!(d, 0.01);
        let mean = (0..n).map(|i| h.get(i, i)).sum::<f64>() / n as f64;
        // UᵀU (H + λI) = I.
        let mut utu = vec![0f64; n * n];
        let mut ut = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                ut[i * n + j] = u[j * n + i];
                if i > j {
                    assert_eq!(u[i * n + j], 0.0, "U must be upper triangular");
                }
            }
        }
        gemm_f64(&mut utu, &ut, &u, n, n, n, 1.0);
        let mut hd = h.data.clone();
        for i in 0..n {
            hd[i * n + i] += 0.01 * mean;
        }
        let mut prod = vec![0f64; n * n];
        gemm_f64(&mut prod, &utu, &hd, n, n, n, 1.0);
        for i in 0..n {
            for j in 0..n {
                let want = if i == j { 1.0 } else { 0.0 };
                // κ(H+λI) ≤ ~1e4 here, so f64 round-off leaves ≤ ~1e-10; 1e-8 catches any transposition slip.
                assert!((prod[i * n + j] - want).abs() < 1e-8, "({i},{j}) = {}", prod[i * n + j]);
            }
        }
    }

    #[test]
    fn narrowing_in_place_rounds_every_value() {
        for n in [0usize, 1, 2, 7, 1000] {
            let v: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37 - 11.0) / 3.0).collect();
            let want: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            let narrowed = narrow_in_place(v);
            assert_eq!(&bytemuck::cast_slice::<f64, f32>(&narrowed)[..n], &want[..]);
        }
    }

    #[test]
    fn right_solve_matches_the_explicit_damped_inverse() {
        let (_, h) = testutil::layer(3, 40, 5);
        let (m, n) = (7, 40);
        let a: Vec<f64> = (0..m * n).map(|i| ((i * 37 % 101) as f64 - 50.0) / 17.0).collect();
        let (u, d_inv) = inverse_cholesky_upper(&h.data, n, 0.01).unwrap();
        let mut ut = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                ut[j * n + i] = u[i * n + j];
            }
        }
        // (H+λI)⁻¹ = UᵀU, so A (H+λI)⁻¹ = (A Uᵀ) U.
        let mut au = vec![0f64; m * n];
        gemm_f64(&mut au, &a, &ut, m, n, n, 1.0);
        let mut want = vec![0f64; m * n];
        gemm_f64(&mut want, &au, &u, m, n, n, 1.0);
        let mut got = a.clone();
        let d_solve = solve_right_damped(&mut got, m, &h.data, n, 0.01).unwrap();
        assert_eq!(d_inv, d_solve);
        // 1e-9 relative: both are backward-stable f64 routes on a matrix with κ ≲ 1e4 after damping.
        let scale = want.iter().fold(0f64, |s, v| s.max(v.abs()));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-9 * scale, "{g} vs {w}");
        }
    }

    #[test]
    fn f32_inverse_factor_agrees_with_f64() {
        let (_, h) = testutil::layer(4, 64, 8);
        let (u64_, d64) = inverse_cholesky_upper(&h.data, 64, 0.01).unwrap();
        let (u32_, d32) = inverse_cholesky_upper_f32(&h.data, 64, &[], 0.01).unwrap();
        assert_eq!(d64, d32);
        let scale = u64_.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = u64_.iter().zip(&u32_).map(|(a, &b)| (a - b as f64).abs()).fold(0f64, f64::max);
        // f32 inversion of a factor with κ(L) ~ 10²: ~1e-5 of the largest entry; 1e-3 would flag a wrong layout.
        assert!(worst <= 1e-4 * scale, "max deviation {worst} vs max entry {scale}");
    }

    #[test]
    fn dead_mask_equals_unit_diagonal() {
        // Passing the dead mask must give exactly the factor of H with H_ii = 1 there (what OBC builds).
        let (mut w, mut h) = testutil::layer(3, 20, 9);
        let n = h.n;
        for k in 0..n {
            h.data[5 * n + k] = 0.0;
            h.data[k * n + 5] = 0.0;
        }
        let hd = fix_dead_inputs(&mut w.clone(), &h);
        let dead = zero_dead_columns(&mut w, &h);
        assert!(dead[5] && dead.iter().filter(|&&d| d).count() == 1);
        assert!((0..3).all(|r| w.get(r, 5) == 0.0));
        let (a, da) = inverse_cholesky_upper_f32(&h.data, n, &dead, 0.01).unwrap();
        let (b, db) = inverse_cholesky_upper_f32(&hd, n, &[], 0.01).unwrap();
        assert_eq!((a, da), (b, db));
    }

    #[test]
    fn gemm_strided_respects_row_major_strides() {
        // Regression for the faer 0.24.4 strided row-major MatMut bug: C is a 3×5 window (stride 9) of a larger
        // buffer; everything outside the window must stay untouched.
        let (m, k, n, ldc) = (3usize, 4usize, 5usize, 9usize);
        let a: Vec<f32> = (0..m * 6).map(|i| i as f32 * 0.5).collect(); // lda 6
        let b: Vec<f32> = (0..k * 7).map(|i| 1.0 - i as f32 * 0.25).collect(); // ldb 7
        let mut c = vec![100f32; m * ldc + 8];
        gemm_strided(&mut c, ldc, &a, 6, &b, 7, (m, k, n), 2.0f32, true);
        for i in 0..m {
            for j in 0..ldc {
                let got = c[i * ldc + j];
                if j < n {
                    let want = 100.0 + 2.0 * (0..k).map(|t| a[i * 6 + t] * b[t * 7 + j]).sum::<f32>();
                    assert!((got - want).abs() < 1e-4, "({i},{j}) {got} vs {want}");
                } else {
                    assert_eq!(got, 100.0, "({i},{j}) outside the window was written");
                }
            }
        }
        assert!(c[m * ldc..].iter().all(|&v| v == 100.0));
    }

    #[test]
    fn damp_is_raised_when_cholesky_fails() {
        // Indefinite H: eigenvalues 3 and −1, mean diag 1. Damp 0.01 and 0.1 fail, 1.0 → H + I is PSD-singular,
        // 10 → positive definite.
        let h = vec![1.0, 2.0, 2.0, 1.0];
        let (_, d) = inverse_cholesky_upper(&h, 2, 0.01).unwrap();
        assert!(d > 1.0 && d <= 10.0 + 1e-9, "damp used {d}");
        let strongly_indefinite = vec![1.0, 1e6, 1e6, 1.0];
        assert!(matches!(
            inverse_cholesky_upper(&strongly_indefinite, 2, 0.01),
            Err(CompressError::CholeskyFailed { .. })
        ));
    }
}
