//! x86-64 SIMD kernels, one file per instruction-set level. This module only dispatches: callers pass the `Isa`
//! they checked with `Isa::is_supported`, and each entry point is `#[target_feature]` so the intrinsics inline.
//!
//! On other architectures the same entry points exist but are unreachable, because `Isa::is_supported` is false
//! for every x86 level there and callers then pick the scalar kernels.

use crate::cpu::{Isa, OutRows};
use crate::dense::DenseWeight;
use crate::packed::PackedWeight;
use crate::sparse24::Sparse24Weight;
use half::f16;

/// Expands `$body` 16 times with `$p` bound to the constants 0..16, so per-position shift counts and
/// accumulator indices are compile-time constants (LLVM does not reliably fully unroll these loops on its own, and
/// a rolled loop would keep the accumulator arrays in memory).
macro_rules! unroll16 {
    ($p:ident => $body:block) => {{
        { const $p: usize = 0; $body }
        { const $p: usize = 1; $body }
        { const $p: usize = 2; $body }
        { const $p: usize = 3; $body }
        { const $p: usize = 4; $body }
        { const $p: usize = 5; $body }
        { const $p: usize = 6; $body }
        { const $p: usize = 7; $body }
        { const $p: usize = 8; $body }
        { const $p: usize = 9; $body }
        { const $p: usize = 10; $body }
        { const $p: usize = 11; $body }
        { const $p: usize = 12; $body }
        { const $p: usize = 13; $body }
        { const $p: usize = 14; $body }
        { const $p: usize = 15; $body }
    }};
}

// The unrolled bodies compare compile-time positions (`4 * (W % 8) <= 19` is always true for W = 0) and index
// register arrays by constant loop counters on purpose: both fold away after unrolling.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::absurd_extreme_comparisons, clippy::needless_range_loop)]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
#[allow(clippy::absurd_extreme_comparisons, clippy::needless_range_loop)]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod vnni;

/// Whether this CPU runs the int4 × int8 VNNI kernels (AVX-512F + AVX-512 VNNI).
pub(crate) fn q8_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        vnni::supported()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs the 2:4 q8 kernel.
pub(crate) fn q8_sparse_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        vnni::sparse_supported()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// See `vnni::quantize_act_sparse`.
pub(crate) fn quantize_sparse_q8(x: &[f32], cols: usize, blocks: usize, xq: &mut [u32], sxh: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    vnni::quantize_act_sparse(x, cols, blocks, xq, sxh);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, cols, blocks, xq, sxh);
        unreachable!("q8_sparse_supported() is false on this architecture")
    }
}

/// See `vnni::quantize_act_sparse16`.
pub(crate) fn quantize_sparse_q16(x: &[f32], cols: usize, blocks: usize, xq: &mut [u32], sxh: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    vnni::quantize_act_sparse16(x, cols, blocks, xq, sxh);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, cols, blocks, xq, sxh);
        unreachable!("q8_sparse_supported() is false on this architecture")
    }
}

/// Row pairs `p0..p1` of a single-token 2:4 GEMV with int16 activations. Callers checked `q8_sparse_supported()`.
pub(crate) fn sparse_pairs_q16(w: &Sparse24Weight, xq: &[u32], sxh: &[f32], p0: usize, p1: usize, out: OutRows) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(q8_sparse_supported() && p1 <= w.rows.div_ceil(2));
        // SAFETY: CPU support asserted; lengths asserted inside.
        unsafe { vnni::sparse_pairs_q16(w, xq, sxh, p0, p1, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, xq, sxh, p0, p1, out);
        unreachable!("q8_sparse_supported() is false on this architecture")
    }
}

/// Row pairs `p0..p1` of a single-token 2:4 q8 GEMV. Callers checked `q8_sparse_supported()`.
pub(crate) fn sparse_pairs_q8(w: &Sparse24Weight, xq: &[u32], sxh: &[f32], p0: usize, p1: usize, out: OutRows) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(q8_sparse_supported() && p1 <= w.rows.div_ceil(2));
        // SAFETY: CPU support asserted; lengths asserted inside.
        unsafe { vnni::sparse_pairs_q8(w, xq, sxh, p0, p1, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, xq, sxh, p0, p1, out);
        unreachable!("q8_sparse_supported() is false on this architecture")
    }
}

/// A task over rows `r0..r1` writing through `OutRows`, as `cpu::for_row_blocks` runs it.
pub(crate) type RowTask<'a> = dyn Fn(usize, usize, OutRows) + Sync + 'a;

/// One token of a q8 GEMV (see `vnni`): quantizes `xp` into `q8` scratch, then runs rows in parallel via `rows`.
/// Returns false (doing nothing) when the CPU lacks VNNI.
/// `wide`: int16 activations (`vpdpwssd`) instead of int8; `q8` must then hold `words·65 + groups` floats.
pub(crate) fn packed_q8(
    w: &PackedWeight,
    xp: &[f32],
    q8: &mut [f32],
    wide: bool,
    run: &mut dyn FnMut(&RowTask<'_>),
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !q8_supported() {
            return false;
        }
        let l = &*w.layout;
        let (nw, ng) = (l.words, l.group_slices.len());
        let (xq, rest) = q8.split_at_mut(nw * if wide { 64 } else { 32 });
        let (sxw, xhat) = rest.split_at_mut(nw);
        let xq: &mut [u32] = bytemuck::cast_slice_mut(xq);
        // SAFETY: VNNI/AVX-512 support checked above; lengths asserted inside.
        unsafe { vnni::quantize_act(w, xp, xq, sxw, &mut xhat[..ng], wide) };
        let (xq, sxw, xhat) = (&*xq, &*sxw, &xhat[..ng]);
        // SAFETY: as above.
        run(&|r0, r1, out| unsafe { vnni::packed_rows_q8(w, xq, sxw, xhat, r0, r1, out, wide) });
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, xp, q8, wide, run);
        false
    }
}

/// Widens f16 to f32 (F16C when `isa` has it).
pub(crate) fn widen_f16(isa: Isa, src: &[f16], out: &mut [f32]) {
    assert_eq!(src.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && isa.is_supported() {
        // SAFETY: every non-scalar level includes F16C and the caller checked support.
        unsafe { avx2::widen_f16(src, out) };
        return;
    }
    let _ = isa;
    for (o, s) in out.iter_mut().zip(src) {
        *o = s.to_f32();
    }
}

/// Rows `r0..r1` of a packed GEMM (see `PackedWeight`), with activations already prepared.
#[allow(clippy::too_many_arguments)]
pub(crate) fn packed_rows(
    isa: Isa,
    w: &PackedWeight,
    xp: &[f32],
    sx: &[f32],
    n: usize,
    r0: usize,
    r1: usize,
    out: OutRows,
) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(isa.is_supported());
        assert!(r1 <= w.rows && xp.len() >= n * w.layout.padded && sx.len() >= n * w.layout.group_slices.len());
        // SAFETY: the CPU supports `isa` (asserted), and the slices have the lengths the kernels index up to.
        unsafe {
            match isa {
                Isa::Avx512 => avx512::packed_rows(w, xp, sx, n, r0, r1, out),
                Isa::Avx2 => avx2::packed_rows(w, xp, sx, n, r0, r1, out),
                Isa::Scalar => unreachable!("scalar rows are handled by the caller"),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, xp, sx, n, r0, r1, out);
        unreachable!("no x86 ISA is supported on this architecture, so callers never ask for {isa:?}")
    }
}

/// Row pairs `p0..p1` of a 2:4 sparse GEMM, with activations padded to whole blocks.
pub(crate) fn sparse_pairs(isa: Isa, w: &Sparse24Weight, xp: &[f32], n: usize, p0: usize, p1: usize, out: OutRows) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(isa.is_supported());
        assert!(p1 <= w.rows.div_ceil(2) && xp.len() >= n * w.blocks * crate::sparse24::BLOCK_COLS);
        // SAFETY: the CPU supports `isa` (asserted), and the slices have the lengths the kernels index up to.
        unsafe {
            match isa {
                Isa::Avx512 => avx512::sparse_pairs(w, xp, n, p0, p1, out),
                Isa::Avx2 => avx2::sparse_pairs(w, xp, n, p0, p1, out),
                Isa::Scalar => unreachable!("scalar rows are handled by the caller"),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, xp, n, p0, p1, out);
        unreachable!("no x86 ISA is supported on this architecture, so callers never ask for {isa:?}")
    }
}

/// Rows `r0..r1` of a dense GEMM. Dense layers are memory-bound at 16 or 32 bits per weight even with 8-lane
/// vectors, so AVX-512 runs the AVX2 kernel.
pub(crate) fn dense_rows(isa: Isa, w: &DenseWeight, x: &[f32], n: usize, r0: usize, r1: usize, out: OutRows) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(isa.is_supported() && isa != Isa::Scalar);
        assert!(r1 <= w.rows && x.len() >= n * w.cols && w.bytes().len() == w.rows * w.cols * w.dtype.size());
        // SAFETY: AVX2/FMA/F16C are part of every supported non-scalar level; lengths asserted above.
        unsafe { avx2::dense_rows(w, x, n, r0, r1, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, x, n, r0, r1, out);
        unreachable!("no x86 ISA is supported on this architecture, so callers never ask for {isa:?}")
    }
}
