//! AVX-512F kernels (16 f32 lanes): one 64-byte word of the packed layouts is exactly one register, a code is
//! decoded with one rotate and one `vpternlogd` (mask + OR of the 1.0 exponent in a single instruction), and 32
//! registers leave room for 8 tokens' accumulators.

use crate::cpu::{token_tiles, Isa, OutRows, Scratch, ROW_SCRATCH};
use crate::packed::PackedWeight;
use crate::sparse24::{pos_shift, Sparse24Weight};
use crate::x86::avx2::{dot, sparse_pair_coeffs, zero_coeffs, SP_F16, SP_F32, SP_Q4};
use core::arch::x86_64::*;

/// `vpternlogd` truth table for `(a & b) | c`.
const AND_OR: i32 = 0xEA;

/// Rows `r0..r1` of a packed GEMM. Safety: caller checked AVX-512F (+AVX2/FMA/F16C) and the slice lengths.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn packed_rows(
    w: &PackedWeight,
    xp: &[f32],
    sx: &[f32],
    n: usize,
    r0: usize,
    r1: usize,
    out: OutRows,
) {
    // SAFETY: same contract, forwarded.
    unsafe {
        match w.bits {
            2 => packed_rows_b::<2>(w, xp, sx, n, r0, r1, out),
            3 => packed_rows_b::<3>(w, xp, sx, n, r0, r1, out),
            4 => packed_rows_b::<4>(w, xp, sx, n, r0, r1, out),
            8 => packed_rows_b::<8>(w, xp, sx, n, r0, r1, out),
            b => unreachable!("bits are validated at construction, got {b}"),
        }
    }
}

/// Activation floats per token a column tile may span: the tile's activations (× tokens) stay within 16 KB, half
/// of L1, so they are read from L1 for every row of the task instead of from L2.
const TILE_FLOATS: usize = 4096;

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn packed_rows_b<const B: u32>(
    w: &PackedWeight,
    xp: &[f32],
    sx: &[f32],
    n: usize,
    r0: usize,
    r1: usize,
    out: OutRows,
) {
    let l = &*w.layout;
    debug_assert_eq!(l.per_word, (32 / B) as usize);
    let ng = l.group_slices.len();
    // Per row: m = 2^B·s (group multipliers) and c = s·(2^B + z) (Σx coefficients), then partial sums (16 floats
    // per row and token of the current tile) carried from one column tile to the next. Rows go in sub-blocks of
    // SUB so this scratch stays a few KB (in L1) however many rows the task has.
    const SUB: usize = 16;
    let mut scratch = Scratch::take(&ROW_SCRATCH, SUB * 2 * ng + SUB * 8 * 16);
    let (coef, state) = scratch.split_at_mut(SUB * 2 * ng);
    let mut s0 = r0;
    while s0 < r1 {
        let s1 = (s0 + SUB).min(r1);
        for i in 0..s1 - s0 {
            let (m, c) = coef[i * 2 * ng..(i + 1) * 2 * ng].split_at_mut(ng);
            w.scales.widen(Isa::Avx512, (s0 + i) * ng, m);
            // SAFETY: m, c and the zeros row all have ng entries.
            unsafe { zero_coeffs(m, &w.zeros[(s0 + i) * ng..(s0 + i + 1) * ng], (1u32 << B) as f32, c) };
        }
        // SAFETY: forwarded contract; rows s0..s1 are within r0..r1.
        unsafe { packed_sub_block::<B>(w, xp, sx, n, s0, s1, coef, state, out) };
        s0 = s1;
    }
}

/// Rows `s0..s1` (≤ 16) with their coefficients in `coef`: token tiles × column tiles × row groups.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn packed_sub_block<const B: u32>(
    w: &PackedWeight,
    xp: &[f32],
    sx: &[f32],
    n: usize,
    s0: usize,
    s1: usize,
    coef: &[f32],
    state: &mut [f32],
    out: OutRows,
) {
    let l = &*w.layout;
    let ng = l.group_slices.len();
    // Few tokens: several rows per pass, so each activation load feeds several rows and there are enough
    // independent FMA chains; many tokens: one row, up to 8 tokens (the decoded weights are reused per token).
    for (t0, tw) in token_tiles(n) {
        let words_per_tile = (TILE_FLOATS / (tw * l.per_word * 16)).max(1);
        let mut w0 = 0;
        while w0 < l.words {
            let w1 = (w0 + words_per_tile).min(l.words);
            let tile = Tile { w0, w1, first: w0 == 0, last: w1 == l.words };
            let mut r = s0;
            while r < s1 {
                let left = s1 - r;
                let i = r - s0;
                let st = &mut state[i * 8 * 16..];
                let cf = &coef[i * 2 * ng..];
                // SAFETY: rows r..r+R ≤ s1 ≤ rows and tokens t0..t0+tw ≤ n, as the tiles require; `st` and `cf`
                // hold R rows' state and coefficients; lengths of w, xp, sx checked by the caller.
                unsafe {
                    r += match (tw, left) {
                        (8, _) => packed_tile::<B, 1, 8, 1>(w, r, xp, sx, t0, cf, st, tile, out),
                        (4, 2..) => packed_tile::<B, 2, 4, 1>(w, r, xp, sx, t0, cf, st, tile, out),
                        (4, _) => packed_tile::<B, 1, 4, 2>(w, r, xp, sx, t0, cf, st, tile, out),
                        (2, 4..) => packed_tile::<B, 4, 2, 1>(w, r, xp, sx, t0, cf, st, tile, out),
                        (2, _) => packed_tile::<B, 1, 2, 2>(w, r, xp, sx, t0, cf, st, tile, out),
                        (_, 4..) => packed_tile::<B, 4, 1, 2>(w, r, xp, sx, t0, cf, st, tile, out),
                        (_, _) => packed_tile::<B, 1, 1, 4>(w, r, xp, sx, t0, cf, st, tile, out),
                    };
                }
            }
            w0 = w1;
        }
    }
}

/// A range of words (a column tile) and whether it starts or ends the row.
#[derive(Clone, Copy)]
struct Tile {
    w0: usize,
    w1: usize,
    first: bool,
    last: bool,
}

/// `R` rows × `T` tokens over the words of one column tile, starting at row `r`, token `t0`; returns `R`.
/// `A` independent accumulators per (row, token) hide the FMA latency when `R·T` is small. Partial sums carry
/// between tiles through `state` (row i, token t at floats `(i·8 + t)·16`); a group cut by a tile boundary is
/// scaled in two parts, which is exact algebra (s·(a+b) = s·a + s·b) and only changes rounding.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn packed_tile<const B: u32, const R: usize, const T: usize, const A: usize>(
    w: &PackedWeight,
    r: usize,
    xp: &[f32],
    sx: &[f32],
    t0: usize,
    coef: &[f32],
    state: &mut [f32],
    tile: Tile,
    out: OutRows,
) -> usize {
    let l = &*w.layout;
    let (nw, ng, padded) = (l.words, l.group_slices.len(), l.padded);
    let pw = (32 / B) as usize;
    let target = 23 - B;
    let mask = _mm512_set1_epi32((((1u32 << B) - 1) << target) as i32);
    let magic = _mm512_set1_epi32(0x3F80_0000);
    // SAFETY (pointer arithmetic and loads in this function): rows r..r+R each have nw·16 words; tokens
    // t0..t0+T each have `padded` activations, and slice wi·pw + P reads 16 at 16·(wi·pw + P) < nw·pw·16;
    // `state` holds R·8·16 floats.
    let words: [*const u32; R] = core::array::from_fn(|i| unsafe { w.words.as_ptr().add((r + i) * nw * 16) });
    let xs: [*const f32; T] = core::array::from_fn(|t| unsafe { xp.as_ptr().add((t0 + t) * padded) });
    let st = |i: usize, t: usize| (i * 8 + t) * 16;
    let mut tot: [[__m512; T]; R] = core::array::from_fn(|i| {
        core::array::from_fn(|t| {
            if tile.first {
                _mm512_setzero_ps()
            } else {
                unsafe { _mm512_loadu_ps(state.as_ptr().add(st(i, t))) }
            }
        })
    });
    let mut acc = [[[_mm512_setzero_ps(); A]; T]; R];
    let mut k = l.word_group[tile.w0] as usize;
    for wi in tile.w0..tile.w1 {
        let v: [__m512i; R] = core::array::from_fn(|i| unsafe { _mm512_loadu_si512(words[i].add(wi * 16) as *const _) });
        let fm = l.flush_masks[wi];
        let xo = wi * pw * 16;
        unroll16!(P => {
            if P < pw {
                // Rotate code P to mantissa bits [23−B, 23) and OR in 1.0's exponent: the float is 1 + code/2^B.
                let rot = _mm512_set1_epi32((target as i32 - (P as u32 * B) as i32).rem_euclid(32));
                let f: [__m512; R] = core::array::from_fn(|i| {
                    _mm512_castsi512_ps(_mm512_ternarylogic_epi32::<AND_OR>(_mm512_rolv_epi32(v[i], rot), mask, magic))
                });
                for t in 0..T {
                    let xv = unsafe { _mm512_loadu_ps(xs[t].add(xo + P * 16)) };
                    for i in 0..R {
                        acc[i][t][P % A] = _mm512_fmadd_ps(f[i], xv, acc[i][t][P % A]);
                    }
                }
                if fm >> P & 1 != 0 {
                    // End of a group: scale its partial sums once; the Σx part is subtracted at the end.
                    for i in 0..R {
                        let m = _mm512_set1_ps(coef[i * 2 * ng + k]);
                        for t in 0..T {
                            let mut a = acc[i][t][0];
                            for j in 1..A {
                                a = _mm512_add_ps(a, acc[i][t][j]);
                            }
                            tot[i][t] = _mm512_fmadd_ps(m, a, tot[i][t]);
                            acc[i][t] = [_mm512_setzero_ps(); A];
                        }
                    }
                    k += 1;
                }
            }
        });
    }
    // A group still open at the tile's end (it continues in the next tile) is scaled now.
    if k < ng && !tile.last {
        for i in 0..R {
            let m = _mm512_set1_ps(coef[i * 2 * ng + k]);
            for t in 0..T {
                let mut a = acc[i][t][0];
                for j in 1..A {
                    a = _mm512_add_ps(a, acc[i][t][j]);
                }
                tot[i][t] = _mm512_fmadd_ps(m, a, tot[i][t]);
            }
        }
    }
    for i in 0..R {
        let c = &coef[i * 2 * ng + ng..(i + 1) * 2 * ng];
        for t in 0..T {
            if tile.last {
                // SAFETY: c and the sx row have ng entries; row r+i and token t0+t are this task's.
                unsafe {
                    let off = dot(c, &sx[(t0 + t) * ng..(t0 + t + 1) * ng]);
                    out.write(t0 + t, r + i, _mm512_reduce_add_ps(tot[i][t]) - off);
                }
            } else {
                unsafe { _mm512_storeu_ps(state.as_mut_ptr().add(st(i, t)), tot[i][t]) };
            }
        }
    }
    R
}

/// Row pairs `p0..p1` of a 2:4 sparse GEMM. Safety: caller checked AVX-512F (+AVX2/FMA/F16C) and the lengths.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn sparse_pairs(w: &Sparse24Weight, xp: &[f32], n: usize, p0: usize, p1: usize, out: OutRows) {
    let mut scratch = Scratch::take(&ROW_SCRATCH, 4 * w.groups.max(1));
    for pair in p0..p1 {
        if w.is_quantized() {
            sparse_pair_coeffs(Isa::Avx512, w, pair, &mut scratch);
        }
        for (t0, tw) in token_tiles(n) {
            // SAFETY: pair < pairs, t0 + tw ≤ n, lengths checked by the caller.
            unsafe {
                match (w.is_quantized(), w.is_f16()) {
                    (true, _) => sparse_tiles::<SP_Q4>(w, pair, xp, t0, tw, &scratch, out),
                    (false, true) => sparse_tiles::<SP_F16>(w, pair, xp, t0, tw, &scratch, out),
                    (false, false) => sparse_tiles::<SP_F32>(w, pair, xp, t0, tw, &scratch, out),
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn sparse_tiles<const K: u8>(
    w: &Sparse24Weight,
    pair: usize,
    xp: &[f32],
    t0: usize,
    tw: usize,
    coef: &[f32],
    out: OutRows,
) {
    // SAFETY: forwarded contract.
    unsafe {
        match tw {
            8 => sparse_tile::<K, 8, 1>(w, pair, xp, t0, coef, out),
            4 => sparse_tile::<K, 4, 1>(w, pair, xp, t0, coef, out),
            2 => sparse_tile::<K, 2, 2>(w, pair, xp, t0, coef, out),
            _ => sparse_tile::<K, 1, 4>(w, pair, xp, t0, coef, out),
        }
    }
}

/// One row pair × `T` tokens (see `sparse24` for the lane layout).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn sparse_tile<const K: u8, const T: usize, const A: usize>(
    w: &Sparse24Weight,
    pair: usize,
    xp: &[f32],
    t0: usize,
    coef: &[f32],
    out: OutRows,
) {
    use crate::sparse24::BLOCK_COLS;
    let (ng, rec, blocks) = (w.groups, w.rec, w.blocks);
    let padded = blocks * BLOCK_COLS;
    let mask = _mm512_set1_epi32(0xF << 19);
    let magic = _mm512_set1_epi32(0x3F80_0000);
    // Lanes of the pair's second row: j % 4 ∈ {2, 3}.
    const ROW_B: __mmask16 = 0xCCCC;
    let coeff = |k: usize| {
        let (sa, sb, za, zb) = (coef[k], coef[ng + k], coef[2 * ng + k], coef[3 * ng + k]);
        (
            _mm512_mask_blend_ps(ROW_B, _mm512_set1_ps(sa), _mm512_set1_ps(sb)),
            _mm512_mask_blend_ps(ROW_B, _mm512_set1_ps(za), _mm512_set1_ps(zb)),
        )
    };
    // SAFETY (pointer arithmetic and loads below): as in the AVX2 kernel.
    let data = unsafe { w.data.as_ptr().add(pair * blocks * rec) };
    let xs: [*const f32; T] = core::array::from_fn(|t| unsafe { xp.as_ptr().add((t0 + t) * padded) });
    let mut tot = [_mm512_setzero_ps(); T];
    let mut acc = [[_mm512_setzero_ps(); A]; T];
    let (mut sv, mut zv) = if K == SP_Q4 { coeff(0) } else { (_mm512_setzero_ps(), _mm512_setzero_ps()) };
    let mut k = 0usize;
    for b in 0..blocks {
        let base = unsafe { data.add(b * rec) };
        let pos = unsafe { _mm512_loadu_si512(base as *const _) };
        let (cw0, cw1) = if K == SP_Q4 {
            unsafe { (_mm512_loadu_si512(base.add(16) as *const _), _mm512_loadu_si512(base.add(32) as *const _)) }
        } else {
            (_mm512_setzero_si512(), _mm512_setzero_si512())
        };
        let fm = if K == SP_Q4 { w.flush[b] } else { 0 };
        let xo = b * BLOCK_COLS;
        unroll16!(W => {
            // vpermilps only reads bits 1:0 of each index, so the shifted position word needs no mask.
            let idx = _mm512_srli_epi32::<{ pos_shift(W) }>(pos);
            let v = unsafe {
                if K == SP_Q4 {
                    let cw = if W < 8 { cw0 } else { cw1 };
                    let d = _mm512_rol_epi32::<{ (19 - 4 * (W % 8) as i32).rem_euclid(32) }>(cw);
                    _mm512_sub_ps(_mm512_castsi512_ps(_mm512_ternarylogic_epi32::<AND_OR>(d, mask, magic)), zv)
                } else if K == SP_F16 {
                    _mm512_cvtph_ps(_mm256_loadu_si256(base.add(16 + W * 8) as *const __m256i))
                } else {
                    _mm512_loadu_ps(base.add(16 + W * 16) as *const f32)
                }
            };
            for t in 0..T {
                let xv = unsafe { _mm512_loadu_ps(xs[t].add(xo + 16 * W)) };
                acc[t][W % A] = _mm512_fmadd_ps(v, _mm512_permutevar_ps(xv, idx), acc[t][W % A]);
            }
            if K == SP_Q4 && fm >> W & 1 != 0 {
                for t in 0..T {
                    let mut a = acc[t][0];
                    for j in 1..A {
                        a = _mm512_add_ps(a, acc[t][j]);
                    }
                    tot[t] = _mm512_fmadd_ps(sv, a, tot[t]);
                    acc[t] = [_mm512_setzero_ps(); A];
                }
                k += 1;
                if k < ng {
                    (sv, zv) = coeff(k);
                }
            }
        });
    }
    for t in 0..T {
        if K != SP_Q4 {
            for j in 0..A {
                tot[t] = _mm512_add_ps(tot[t], acc[t][j]);
            }
        }
        let ra = _mm512_reduce_add_ps(_mm512_maskz_mov_ps(!ROW_B, tot[t]));
        let rb = _mm512_reduce_add_ps(_mm512_maskz_mov_ps(ROW_B, tot[t]));
        // SAFETY: the pair's rows belong to this task; the padded odd row is skipped.
        unsafe {
            out.write(t0 + t, 2 * pair, ra);
            if 2 * pair + 1 < w.rows {
                out.write(t0 + t, 2 * pair + 1, rb);
            }
        }
    }
}
