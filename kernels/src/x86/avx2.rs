//! AVX2 + FMA + F16C kernels (8 f32 lanes). The 16-lane words of the packed layouts are handled as two halves, so
//! the same stored weights run here and on AVX-512.

use crate::cpu::{token_tiles, Isa, OutRows, Scratch, ROW_SCRATCH};
use crate::dense::{DType, DenseWeight};
use crate::packed::PackedWeight;
use crate::sparse24::{pos_shift, Sparse24Weight};
use core::arch::x86_64::*;
use half::f16;

/// f16 → f32 with `vcvtph2ps`, 8 at a time.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn widen_f16(src: &[f16], out: &mut [f32]) {
    let n = src.len().min(out.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 ≤ n ≤ both lengths; unaligned loads/stores.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for j in i..n {
        out[j] = src[j].to_f32();
    }
}

/// Sum of the 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// Σ a·b over equal-length slices.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    // SAFETY (all loads below): indices stay below n, which bounds both slices.
    unsafe {
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i)), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i + 8)), _mm256_loadu_ps(b.as_ptr().add(i + 8)), s1);
            i += 16;
        }
        if i + 8 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i)), s0);
            i += 8;
        }
    }
    let mut s = hsum(_mm256_add_ps(s0, s1));
    for j in i..n {
        s += a[j] * b[j];
    }
    s
}

/// `c[k] = s[k]·(2^b + z[k])`, each group's coefficient of Σx (zero point plus the 1.0 the magic-number decode
/// adds), then `s[k] *= 2^b`, the multiplier of the decoded sum (exact: a power of two).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn zero_coeffs(s: &mut [f32], z: &[u8], two_b: f32, c: &mut [f32]) {
    let n = s.len().min(z.len()).min(c.len());
    let tb = _mm256_set1_ps(two_b);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 ≤ n bounds all three slices (8 zero-point bytes via a 64-bit load).
        unsafe {
            let zi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(z.as_ptr().add(i) as *const __m128i));
            let zf = _mm256_add_ps(_mm256_cvtepi32_ps(zi), tb);
            let sv = _mm256_loadu_ps(s.as_ptr().add(i));
            _mm256_storeu_ps(c.as_mut_ptr().add(i), _mm256_mul_ps(sv, zf));
            _mm256_storeu_ps(s.as_mut_ptr().add(i), _mm256_mul_ps(sv, tb));
        }
        i += 8;
    }
    for j in i..n {
        c[j] = s[j] * (two_b + z[j] as f32);
        s[j] *= two_b;
    }
}

/// Rows `r0..r1` of a packed GEMM. Safety: caller checked AVX2/FMA/F16C and the slice lengths (see `x86::packed_rows`).
#[target_feature(enable = "avx2,fma,f16c")]
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

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn packed_rows_b<const B: u32>(
    w: &PackedWeight,
    xp: &[f32],
    sx: &[f32],
    n: usize,
    r0: usize,
    r1: usize,
    out: OutRows,
) {
    debug_assert_eq!(w.layout.per_word, (32 / B) as usize);
    let ng = w.layout.group_slices.len();
    let mut scratch = Scratch::take(&ROW_SCRATCH, 2 * 2 * ng);
    // 16 registers: at most 2 rows per pass, and tiles of 4 tokens (8-token tiles run as two).
    for (t0, tw) in token_tiles(n) {
        let mut r = r0;
        while r < r1 {
            let left = r1 - r;
            // SAFETY: rows r..r+R ≤ r1 ≤ rows and tokens ≤ n, as the tiles require; lengths checked by the caller.
            unsafe {
                r += match (tw, left) {
                    (8, _) => {
                        packed_tile::<B, 1, 4, 1>(w, r, xp, sx, t0, &mut scratch, out);
                        packed_tile::<B, 1, 4, 1>(w, r, xp, sx, t0 + 4, &mut scratch, out)
                    }
                    (4, _) => packed_tile::<B, 1, 4, 1>(w, r, xp, sx, t0, &mut scratch, out),
                    (2, 2..) => packed_tile::<B, 2, 2, 1>(w, r, xp, sx, t0, &mut scratch, out),
                    (2, _) => packed_tile::<B, 1, 2, 2>(w, r, xp, sx, t0, &mut scratch, out),
                    (_, 2..) => packed_tile::<B, 2, 1, 2>(w, r, xp, sx, t0, &mut scratch, out),
                    (_, _) => packed_tile::<B, 1, 1, 2>(w, r, xp, sx, t0, &mut scratch, out),
                };
            }
        }
    }
}

/// `R` rows × `T` tokens starting at row `r`, token `t0`; returns `R`. A 16-lane word is two 8-lane halves;
/// `A` accumulators per (row, token) alternate between them to hide the FMA latency.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn packed_tile<const B: u32, const R: usize, const T: usize, const A: usize>(
    w: &PackedWeight,
    r: usize,
    xp: &[f32],
    sx: &[f32],
    t0: usize,
    scratch: &mut [f32],
    out: OutRows,
) -> usize {
    let l = &*w.layout;
    let (nw, ng, padded) = (l.words, l.group_slices.len(), l.padded);
    let pw = (32 / B) as usize;
    // Codes are moved to mantissa bits [23−B, 23) of 1.0f32: the float is then exactly 1 + code/2^B.
    let target = 23 - B;
    let mask = _mm256_set1_epi32((((1u32 << B) - 1) << target) as i32);
    let magic = _mm256_set1_epi32(0x3F80_0000);
    // Per row: m = 2^B·s (the group multiplier) and c = s·(2^B + z) (the Σx coefficient).
    for i in 0..R {
        let (m, c) = scratch[i * 2 * ng..(i + 1) * 2 * ng].split_at_mut(ng);
        w.scales.widen(Isa::Avx2, (r + i) * ng, m);
        // SAFETY: m, c and the zeros row all have ng entries.
        unsafe { zero_coeffs(m, &w.zeros[(r + i) * ng..(r + i + 1) * ng], (1u32 << B) as f32, c) };
    }
    let scratch = &*scratch;
    // SAFETY (pointer arithmetic and loads in this function): rows r..r+R each have nw·16 words; tokens t0..t0+T
    // each have `padded` activations, and slice wi·pw + P reads 16 at 16·(wi·pw + P) < padded = nw·pw·16.
    let words: [*const u32; R] = core::array::from_fn(|i| unsafe { w.words.as_ptr().add((r + i) * nw * 16) });
    let xs: [*const f32; T] = core::array::from_fn(|t| unsafe { xp.as_ptr().add((t0 + t) * padded) });
    let mut tot = [[_mm256_setzero_ps(); T]; R];
    let mut acc = [[[_mm256_setzero_ps(); A]; T]; R];
    let mut k = 0usize;
    for wi in 0..nw {
        let v: [[__m256i; 2]; R] = core::array::from_fn(|i| unsafe {
            let p = words[i].add(wi * 16);
            [_mm256_loadu_si256(p as *const __m256i), _mm256_loadu_si256(p.add(8) as *const __m256i)]
        });
        let fm = l.flush_masks[wi];
        let xo = wi * pw * 16;
        unroll16!(P => {
            if P < pw {
                let o = P as u32 * B;
                let f: [[__m256; 2]; R] = core::array::from_fn(|i| {
                    core::array::from_fn(|h| {
                        let d = if o <= target {
                            _mm256_sll_epi32(v[i][h], _mm_cvtsi32_si128((target - o) as i32))
                        } else {
                            _mm256_srl_epi32(v[i][h], _mm_cvtsi32_si128((o - target) as i32))
                        };
                        _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(d, mask), magic))
                    })
                });
                for t in 0..T {
                    for h in 0..2 {
                        let xv = unsafe { _mm256_loadu_ps(xs[t].add(xo + P * 16 + 8 * h)) };
                        for i in 0..R {
                            acc[i][t][(2 * P + h) % A] = _mm256_fmadd_ps(f[i][h], xv, acc[i][t][(2 * P + h) % A]);
                        }
                    }
                }
                if fm >> P & 1 != 0 {
                    // End of a group: scale its partial sums once; the Σx part is subtracted at the end.
                    for i in 0..R {
                        let m = _mm256_set1_ps(scratch[i * 2 * ng + k]);
                        for t in 0..T {
                            let mut a = acc[i][t][0];
                            for j in 1..A {
                                a = _mm256_add_ps(a, acc[i][t][j]);
                            }
                            tot[i][t] = _mm256_fmadd_ps(m, a, tot[i][t]);
                            acc[i][t] = [_mm256_setzero_ps(); A];
                        }
                    }
                    k += 1;
                }
            }
        });
    }
    for i in 0..R {
        let c = &scratch[i * 2 * ng + ng..(i + 1) * 2 * ng];
        for t in 0..T {
            // SAFETY: c and the sx row have ng entries; row r+i and token t0+t are this task's.
            unsafe {
                let off = dot(c, &sx[(t0 + t) * ng..(t0 + t + 1) * ng]);
                out.write(t0 + t, r + i, hsum(tot[i][t]) - off);
            }
        }
    }
    R
}

/// Value storage of a sparse weight, as a const parameter so each kernel is specialized.
pub(crate) const SP_F32: u8 = 0;
pub(crate) const SP_F16: u8 = 1;
pub(crate) const SP_Q4: u8 = 2;

/// Per row pair, the group coefficients the sparse kernels broadcast: `[16·s_A | 16·s_B | 1+z_A/16 | 1+z_B/16]`.
pub(crate) fn sparse_pair_coeffs(isa: Isa, w: &Sparse24Weight, pair: usize, buf: &mut [f32]) {
    let ng = w.groups;
    let scales = w.scales.as_ref().expect("quantized sparse weights have scales");
    let (sa, rest) = buf.split_at_mut(ng);
    let (sb, rest) = rest.split_at_mut(ng);
    let (za, zb) = rest.split_at_mut(ng);
    scales.widen(isa, 2 * pair * ng, sa);
    scales.widen(isa, (2 * pair + 1) * ng, sb);
    for k in 0..ng {
        sa[k] *= 16.0;
        sb[k] *= 16.0;
        za[k] = 1.0 + w.zeros[2 * pair * ng + k] as f32 / 16.0;
        zb[k] = 1.0 + w.zeros[(2 * pair + 1) * ng + k] as f32 / 16.0;
    }
}

/// Row pairs `p0..p1` of a 2:4 sparse GEMM. Safety: caller checked AVX2/FMA/F16C and the slice lengths.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn sparse_pairs(w: &Sparse24Weight, xp: &[f32], n: usize, p0: usize, p1: usize, out: OutRows) {
    let mut scratch = Scratch::take(&ROW_SCRATCH, 4 * w.groups.max(1));
    for pair in p0..p1 {
        if w.is_quantized() {
            sparse_pair_coeffs(Isa::Avx2, w, pair, &mut scratch);
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
#[target_feature(enable = "avx2,fma,f16c")]
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
            8 => {
                sparse_tile::<K, 4, 1>(w, pair, xp, t0, coef, out);
                sparse_tile::<K, 4, 1>(w, pair, xp, t0 + 4, coef, out);
            }
            4 => sparse_tile::<K, 4, 1>(w, pair, xp, t0, coef, out),
            2 => sparse_tile::<K, 2, 2>(w, pair, xp, t0, coef, out),
            _ => sparse_tile::<K, 1, 2>(w, pair, xp, t0, coef, out),
        }
    }
}

/// One row pair × `T` tokens; the 16 lanes of a window are two 8-lane halves (column groups 0-1 and 2-3).
#[target_feature(enable = "avx2,fma,f16c")]
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
    let mask = _mm256_set1_epi32(0xF << 19);
    let magic = _mm256_set1_epi32(0x3F80_0000);
    // Lanes of the pair's second row within each 128-bit lane: j % 4 ∈ {2, 3}.
    const ROW_B: i32 = 0xCC;
    let coeff = |k: usize| {
        let (sa, sb, za, zb) = (coef[k], coef[ng + k], coef[2 * ng + k], coef[3 * ng + k]);
        (
            _mm256_blend_ps::<ROW_B>(_mm256_set1_ps(sa), _mm256_set1_ps(sb)),
            _mm256_blend_ps::<ROW_B>(_mm256_set1_ps(za), _mm256_set1_ps(zb)),
        )
    };
    // SAFETY (pointer arithmetic and loads below): the pair's records span blocks·rec u32; each token's padded
    // activations span blocks·256 floats and window W of block b reads 16 at 256·b + 16·W.
    let data = unsafe { w.data.as_ptr().add(pair * blocks * rec) };
    let xs: [*const f32; T] = core::array::from_fn(|t| unsafe { xp.as_ptr().add((t0 + t) * padded) });
    let mut tot = [_mm256_setzero_ps(); T];
    let mut acc = [[_mm256_setzero_ps(); A]; T];
    let (mut sv, mut zv) = if K == SP_Q4 { coeff(0) } else { (_mm256_setzero_ps(), _mm256_setzero_ps()) };
    let mut k = 0usize;
    for b in 0..blocks {
        let base = unsafe { data.add(b * rec) };
        let (pos0, pos1) = unsafe {
            (_mm256_loadu_si256(base as *const __m256i), _mm256_loadu_si256(base.add(8) as *const __m256i))
        };
        let fm = if K == SP_Q4 { w.flush[b] } else { 0 };
        let xo = b * BLOCK_COLS;
        unroll16!(W => {
            let (i0, i1) = (_mm256_srli_epi32::<{ pos_shift(W) as i32 }>(pos0), _mm256_srli_epi32::<{ pos_shift(W) as i32 }>(pos1));
            let (v0, v1) = unsafe {
                if K == SP_Q4 {
                    let cw = base.add(16 + (W / 8) * 16);
                    let (c0, c1) = (_mm256_loadu_si256(cw as *const __m256i), _mm256_loadu_si256(cw.add(8) as *const __m256i));
                    // Code W%8 to mantissa bits 19..23: value (1 + q/16) − (1 + z/16) = (q − z)/16, exact.
                    let (d0, d1) = if 4 * (W % 8) <= 19 {
                        (_mm256_slli_epi32::<{ if 4 * (W % 8) <= 19 { 19 - 4 * (W % 8) as i32 } else { 0 } }>(c0), _mm256_slli_epi32::<{ if 4 * (W % 8) <= 19 { 19 - 4 * (W % 8) as i32 } else { 0 } }>(c1))
                    } else {
                        (_mm256_srli_epi32::<{ if 4 * (W % 8) > 19 { 4 * (W % 8) as i32 - 19 } else { 0 } }>(c0), _mm256_srli_epi32::<{ if 4 * (W % 8) > 19 { 4 * (W % 8) as i32 - 19 } else { 0 } }>(c1))
                    };
                    (
                        _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(d0, mask), magic)), zv),
                        _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(d1, mask), magic)), zv),
                    )
                } else if K == SP_F16 {
                    let h = base.add(16 + W * 8);
                    (_mm256_cvtph_ps(_mm_loadu_si128(h as *const __m128i)), _mm256_cvtph_ps(_mm_loadu_si128(h.add(4) as *const __m128i)))
                } else {
                    let f = base.add(16 + W * 16) as *const f32;
                    (_mm256_loadu_ps(f), _mm256_loadu_ps(f.add(8)))
                }
            };
            for t in 0..T {
                let (x0, x1) = unsafe {
                    let p = xs[t].add(xo + 16 * W);
                    (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
                };
                // vpermilps: each 128-bit lane picks the kept activations of its column group by position.
                let (s0, s1) = (_mm256_permutevar_ps(x0, i0), _mm256_permutevar_ps(x1, i1));
                acc[t][W % A] = _mm256_fmadd_ps(v0, s0, acc[t][W % A]);
                acc[t][(W + 1) % A] = _mm256_fmadd_ps(v1, s1, acc[t][(W + 1) % A]);
            }
            if K == SP_Q4 && fm >> W & 1 != 0 {
                for t in 0..T {
                    let mut a = acc[t][0];
                    for j in 1..A {
                        a = _mm256_add_ps(a, acc[t][j]);
                    }
                    tot[t] = _mm256_fmadd_ps(sv, a, tot[t]);
                    acc[t] = [_mm256_setzero_ps(); A];
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
                tot[t] = _mm256_add_ps(tot[t], acc[t][j]);
            }
        }
        let ra = hsum(_mm256_blend_ps::<ROW_B>(tot[t], _mm256_setzero_ps()));
        let rb = hsum(_mm256_blend_ps::<ROW_B>(_mm256_setzero_ps(), tot[t]));
        // SAFETY: the pair's rows belong to this task; the padded odd row is skipped.
        unsafe {
            out.write(t0 + t, 2 * pair, ra);
            if 2 * pair + 1 < w.rows {
                out.write(t0 + t, 2 * pair + 1, rb);
            }
        }
    }
}

/// Rows `r0..r1` of a dense GEMM (f32, f16 via F16C, bf16 via a 16-bit shift). Safety: caller checked the ISA and
/// that the weight holds rows·cols values and x holds n·cols.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dense_rows(w: &DenseWeight, x: &[f32], n: usize, r0: usize, r1: usize, out: OutRows) {
    for r in r0..r1 {
        for (t0, tw) in token_tiles(n) {
            // SAFETY: forwarded contract; r < rows, t0 + tw ≤ n.
            unsafe {
                match (w.dtype, tw) {
                    (DType::F32, 8) => {
                        dense_tile::<0, 4, 1>(w, r, x, t0, out);
                        dense_tile::<0, 4, 1>(w, r, x, t0 + 4, out);
                    }
                    (DType::F32, 4) => dense_tile::<0, 4, 1>(w, r, x, t0, out),
                    (DType::F32, 2) => dense_tile::<0, 2, 2>(w, r, x, t0, out),
                    (DType::F32, _) => dense_tile::<0, 1, 4>(w, r, x, t0, out),
                    (DType::F16, 8) => {
                        dense_tile::<1, 4, 1>(w, r, x, t0, out);
                        dense_tile::<1, 4, 1>(w, r, x, t0 + 4, out);
                    }
                    (DType::F16, 4) => dense_tile::<1, 4, 1>(w, r, x, t0, out),
                    (DType::F16, 2) => dense_tile::<1, 2, 2>(w, r, x, t0, out),
                    (DType::F16, _) => dense_tile::<1, 1, 4>(w, r, x, t0, out),
                    (DType::BF16, 8) => {
                        dense_tile::<2, 4, 1>(w, r, x, t0, out);
                        dense_tile::<2, 4, 1>(w, r, x, t0 + 4, out);
                    }
                    (DType::BF16, 4) => dense_tile::<2, 4, 1>(w, r, x, t0, out),
                    (DType::BF16, 2) => dense_tile::<2, 2, 2>(w, r, x, t0, out),
                    (DType::BF16, _) => dense_tile::<2, 1, 4>(w, r, x, t0, out),
                }
            }
        }
    }
}

/// Loads 8 weights starting at element `i` of a row as f32 (`D`: 0 = f32, 1 = f16, 2 = bf16).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<const D: u8>(row: *const u8, i: usize) -> __m256 {
    // SAFETY: the caller guarantees elements i..i+8 of the row exist.
    unsafe {
        match D {
            0 => _mm256_loadu_ps((row as *const f32).add(i)),
            1 => _mm256_cvtph_ps(_mm_loadu_si128((row as *const u16).add(i) as *const __m128i)),
            _ => {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128((row as *const u16).add(i) as *const __m128i));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dense_tile<const D: u8, const T: usize, const A: usize>(
    w: &DenseWeight,
    r: usize,
    x: &[f32],
    t0: usize,
    out: OutRows,
) {
    let cols = w.cols;
    let es = w.dtype.size();
    // SAFETY (loads below): row r spans cols elements of `es` bytes; token t0+t spans cols floats of x.
    let row = unsafe { w.bytes().as_ptr().add(r * cols * es) };
    let xs: [*const f32; T] = core::array::from_fn(|t| unsafe { x.as_ptr().add((t0 + t) * cols) });
    let mut acc = [[_mm256_setzero_ps(); A]; T];
    let mut i = 0;
    // Two 8-wide steps per iteration so even T = 4, A = 1 has two FMAs in flight per token.
    while i + 16 <= cols {
        let (w0, w1) = unsafe { (load8::<D>(row, i), load8::<D>(row, i + 8)) };
        for t in 0..T {
            let (x0, x1) = unsafe { (_mm256_loadu_ps(xs[t].add(i)), _mm256_loadu_ps(xs[t].add(i + 8))) };
            acc[t][0] = _mm256_fmadd_ps(w0, x0, acc[t][0]);
            acc[t][1 % A] = _mm256_fmadd_ps(w1, x1, acc[t][1 % A]);
        }
        i += 16;
    }
    if i + 8 <= cols {
        let w0 = unsafe { load8::<D>(row, i) };
        for t in 0..T {
            let x0 = unsafe { _mm256_loadu_ps(xs[t].add(i)) };
            acc[t][0] = _mm256_fmadd_ps(w0, x0, acc[t][0]);
        }
        i += 8;
    }
    let mut tail = [0.0f32; 8];
    for (j, c) in (i..cols).enumerate() {
        tail[j] = match D {
            0 => f32::from_le_bytes(w.bytes()[(r * cols + c) * 4..(r * cols + c) * 4 + 4].try_into().unwrap()),
            1 => f16::from_le_bytes([w.bytes()[(r * cols + c) * 2], w.bytes()[(r * cols + c) * 2 + 1]]).to_f32(),
            _ => half::bf16::from_le_bytes([w.bytes()[(r * cols + c) * 2], w.bytes()[(r * cols + c) * 2 + 1]])
                .to_f32(),
        };
    }
    for t in 0..T {
        let mut a = acc[t][0];
        for j in 1..A {
            a = _mm256_add_ps(a, acc[t][j]);
        }
        let mut s = hsum(a);
        for (j, c) in (i..cols).enumerate() {
            s += tail[j] * x[(t0 + t) * cols + c];
        }
        // SAFETY: r and t0+t belong to this task.
        unsafe { out.write(t0 + t, r, s) };
    }
}
