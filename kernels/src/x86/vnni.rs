//! AVX-512 VNNI int4 × int16 GEMV (the decode default, `PackedWeight::matmul_q16`: activations rounded to int16 per
//! 128 columns, `vpdpwssd`) and int4 × int8 GEMV (llama.cpp-style, opt-in through `PackedWeight::matmul_q8`): the activations are
//! quantized to int8 once per call, one scale per 128-column word (`s_x = max|x| / 127`), and each 64-byte word of
//! 4-bit codes is multiplied with two `vpdpbusd` (u8 codes × i8 activations → i32, 64 products each), then scaled
//! once in f32. Per 128 weights that is ~8 instructions instead of ~24 on the f32 path, so the GEMV becomes
//! memory-bound.
//!
//! It runs the packed layout unchanged (`packed.rs`): lane `j` of word `w` holds at nibble `p` the code of stream
//! column `128w + 16p + j`. Byte `b` of a lane holds nibbles `2b` (low) and `2b+1` (high), so `v & 0x0F` gives the
//! codes of slices 0, 2, 4, 6 and `(v >> 4) & 0x0F` those of slices 1, 3, 5, 7 — one AND, or one shift and one AND,
//! for 64 codes. The activations are laid out to match: `xq[w][lo][j]` packs slices 0, 2, 4, 6 of lane `j` into
//! bytes 0..4, `xq[w][hi][j]` slices 1, 3, 5, 7. Since `vpdpbusd` sums over all 8 slices of a word, every word must
//! lie in one quantization group: groups must start at word boundaries (`PackedWeight::q8_layout_ok`).
//!
//! Per row: `y = Σ_w s_g(w)·s_x(w)·Σ q·x_q − Σ_g s_g·z_g·X̂_g`, with `X̂_g = Σ_{w∈g} s_x(w)·Σ x_q` (the zero point
//! uses the same rounded activations, so it cancels exactly against the codes).

use crate::cpu::{OutRows, Scratch, ROW_SCRATCH};
use crate::packed::PackedWeight;
use core::arch::x86_64::*;

/// Whether this CPU runs the kernels of this module.
pub(crate) fn supported() -> bool {
    crate::cpu::Isa::Avx512.is_supported() && is_x86_feature_detected!("avx512vnni")
}

/// Quantizes one token's prepared activations `xp` (`words·128` floats, stream order) into `xq` (`words·32` u32:
/// per word 16 lanes of low-slice bytes then 16 of high-slice bytes), `sxw` (`words` scales) and `xhat`
/// (per stream group, Σ of the dequantized activations). Safety: AVX-512F; lengths as stated.
///
/// With `wide` the activations are int16 instead (`s_x = max|x| / 32767`, `words·64` u32: per word 4 registers, `k`
/// holding slice `k` in the low and slice `k + 4` in the high half of each lane), for `vpdpwssd`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn quantize_act(w: &PackedWeight, xp: &[f32], xq: &mut [u32], sxw: &mut [f32], xhat: &mut [f32], wide: bool) {
    let l = &*w.layout;
    let nw = l.words;
    let per_word = if wide { 64 } else { 32 };
    let qmax = if wide { 32767.0 } else { 127.0 };
    assert!(xp.len() >= nw * 128 && xq.len() >= nw * per_word && sxw.len() >= nw && xhat.len() >= l.group_slices.len());
    xhat.fill(0.0);
    let ff = _mm512_set1_epi32(0xFF);
    let ffff = _mm512_set1_epi32(0xFFFF);
    for wi in 0..nw {
        // SAFETY: wi < nw, so the 128 floats at 128·wi and the 32 words at 32·wi are in bounds (asserted above).
        unsafe {
            let base = xp.as_ptr().add(wi * 128);
            let xs: [__m512; 8] = core::array::from_fn(|p| _mm512_loadu_ps(base.add(16 * p)));
            let mut a = _mm512_abs_ps(xs[0]);
            for x in &xs[1..] {
                a = _mm512_max_ps(a, _mm512_abs_ps(*x));
            }
            let amax = _mm512_reduce_max_ps(a);
            let (s, inv) = if amax > 0.0 { (amax / qmax, qmax / amax) } else { (0.0, 0.0) };
            let iv = _mm512_set1_ps(inv);
            // Round to nearest even; |x·inv| ≤ qmax up to one rounding, which still rounds to ±qmax.
            let q: [__m512i; 8] = core::array::from_fn(|p| _mm512_cvtps_epi32(_mm512_mul_ps(xs[p], iv)));
            let dst = xq.as_mut_ptr().add(wi * per_word);
            if wide {
                for k in 0..4 {
                    let pair = _mm512_or_si512(_mm512_and_si512(q[k], ffff), _mm512_slli_epi32::<16>(q[k + 4]));
                    _mm512_storeu_si512(dst.add(16 * k) as *mut _, pair);
                }
            } else {
                let pack = |a: __m512i, b: __m512i, c: __m512i, d: __m512i| {
                    let lo = _mm512_or_si512(_mm512_and_si512(a, ff), _mm512_slli_epi32::<8>(_mm512_and_si512(b, ff)));
                    let hi = _mm512_or_si512(_mm512_slli_epi32::<16>(_mm512_and_si512(c, ff)), _mm512_slli_epi32::<24>(d));
                    _mm512_or_si512(lo, hi)
                };
                _mm512_storeu_si512(dst as *mut _, pack(q[0], q[2], q[4], q[6]));
                _mm512_storeu_si512(dst.add(16) as *mut _, pack(q[1], q[3], q[5], q[7]));
            }
            let mut sum = q[0];
            for v in &q[1..] {
                sum = _mm512_add_epi32(sum, *v);
            }
            sxw[wi] = s;
            // Words lie in one group each (checked at construction), the one open at their start.
            xhat[l.word_group[wi] as usize] += s * _mm512_reduce_add_epi32(sum) as f32;
        }
    }
}

/// Rows `r0..r1` of a single-token q8 GEMV. Safety: `supported()`; `xq`, `sxw`, `xhat` from `quantize_act`.
/// `wide`: int16 activations from `quantize_act(.., true)`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn packed_rows_q8(
    w: &PackedWeight,
    xq: &[u32],
    sxw: &[f32],
    xhat: &[f32],
    r0: usize,
    r1: usize,
    out: OutRows,
    wide: bool,
) {
    if wide {
        // SAFETY: forwarded.
        unsafe { packed_rows::<true>(w, xq, sxw, xhat, r0, r1, out) }
    } else {
        // SAFETY: forwarded.
        unsafe { packed_rows::<false>(w, xq, sxw, xhat, r0, r1, out) }
    }
}

#[target_feature(enable = "avx512f,avx512vnni,avx2,fma,f16c")]
unsafe fn packed_rows<const WIDE: bool>(
    w: &PackedWeight,
    xq: &[u32],
    sxw: &[f32],
    xhat: &[f32],
    r0: usize,
    r1: usize,
    out: OutRows,
) {
    let l = &*w.layout;
    let ng = l.group_slices.len();
    let per_word = if WIDE { 64 } else { 32 };
    assert!(r1 <= w.rows && xq.len() >= l.words * per_word && sxw.len() >= l.words && xhat.len() >= ng);
    const R: usize = 4;
    let mut scratch = Scratch::take(&ROW_SCRATCH, R * ng);
    let mut r = r0;
    while r < r1 {
        // SAFETY: rows r..r+R (resp. r) are < r1 ≤ rows; scratch holds R·ng floats.
        unsafe {
            if r1 - r >= R {
                rows_tile::<R, WIDE>(w, r, xq, sxw, xhat, &mut scratch, out);
                r += R;
            } else {
                rows_tile::<1, WIDE>(w, r, xq, sxw, xhat, &mut scratch, out);
                r += 1;
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512vnni,avx2,fma,f16c")]
#[inline]
#[allow(clippy::needless_range_loop)] // wi indexes the words of R rows, word_group and sxw alike
unsafe fn rows_tile<const R: usize, const WIDE: bool>(
    w: &PackedWeight,
    r: usize,
    xq: &[u32],
    sxw: &[f32],
    xhat: &[f32],
    scales: &mut [f32],
    out: OutRows,
) {
    let l = &*w.layout;
    let (nw, ng) = (l.words, l.group_slices.len());
    // Per row: f32 group scales, and the zero-point term Σ_g s_g·z_g·X̂_g.
    let mut off = [0.0f32; R];
    for i in 0..R {
        let s = &mut scales[i * ng..(i + 1) * ng];
        w.scales.widen(crate::Isa::Avx512, (r + i) * ng, s);
        let z = &w.zeros[(r + i) * ng..(r + i + 1) * ng];
        let mut acc = _mm512_setzero_ps();
        let mut k = 0;
        // SAFETY: k + 16 ≤ ng bounds s, z and xhat (xhat has ≥ ng entries).
        unsafe {
            while k + 16 <= ng {
                let zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(z.as_ptr().add(k) as *const _)));
                let sz = _mm512_mul_ps(_mm512_loadu_ps(s.as_ptr().add(k)), zf);
                acc = _mm512_fmadd_ps(sz, _mm512_loadu_ps(xhat.as_ptr().add(k)), acc);
                k += 16;
            }
        }
        let mut o = _mm512_reduce_add_ps(acc);
        for k in k..ng {
            o += s[k] * z[k] as f32 * xhat[k];
        }
        off[i] = o;
    }
    let low = _mm512_set1_epi32(0x0F0F_0F0F);
    let nib16 = _mm512_set1_epi32(0x000F_000F);
    // SAFETY (pointers and loads below): rows r..r+R each have nw·16 words; xq has nw·32 (WIDE: nw·64) words.
    let rows: [*const u32; R] = core::array::from_fn(|i| unsafe { w.words.as_ptr().add((r + i) * nw * 16) });
    let mut tot = [_mm512_setzero_ps(); R];
    // Software prefetch of the tile after the next one (rows r+2R..r+3R, contiguous): R lines per word step, so it
    // is all requested by the end of this tile. The hardware prefetcher alone sees R short interleaved streams per
    // tile and ramps up too late (without this prefetch the GEMV runs at ~60% of the bandwidth). Two tiles ahead
    // rather than one measured 1-7% faster on both 7b shapes (in-process A/B, 2 threads).
    let next = w.words.as_ptr().wrapping_add((r + 2 * R) * nw * 16) as *const i8;
    let next_end = w.words.as_ptr().wrapping_add(w.words.len()) as *const i8;
    for wi in 0..nw {
        for j in 0..R {
            let p = next.wrapping_add((wi * R + j) * 64);
            if p < next_end {
                // SAFETY: prefetch of an address inside the weight array never faults.
                _mm_prefetch::<_MM_HINT_T1>(p);
            }
        }
        let k = l.word_group[wi] as usize;
        let sx = sxw[wi];
        if WIDE {
            // Four int16 pair registers; the codes of slices k and k + 4 sit at bits 4k and 16 + 4k of a lane, so
            // one shift and one AND (0x000F000F) give the matching u16 pairs for `vpdpwssd` (codes ≤ 15 are
            // non-negative as i16; 8 products of ≤ 15·32767 per lane cannot overflow i32).
            let xs: [__m512i; 4] = core::array::from_fn(|j| unsafe { _mm512_loadu_si512(xq.as_ptr().add(wi * 64 + 16 * j) as *const _) });
            for i in 0..R {
                let v = unsafe { _mm512_loadu_si512(rows[i].add(wi * 16) as *const _) };
                // Two short chains instead of one of four: `vpdpwssd` latency, not throughput, bounds a row.
                let d0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, nib16), xs[0]);
                let d1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi32::<4>(v), nib16), xs[1]);
                let d0 = _mm512_dpwssd_epi32(d0, _mm512_and_si512(_mm512_srli_epi32::<8>(v), nib16), xs[2]);
                let d1 = _mm512_dpwssd_epi32(d1, _mm512_and_si512(_mm512_srli_epi32::<12>(v), nib16), xs[3]);
                let d = _mm512_add_epi32(d0, d1);
                let m = _mm512_set1_ps(scales[i * ng + k] * sx);
                tot[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), m, tot[i]);
            }
            continue;
        }
        let (xlo, xhi) = unsafe {
            let p = xq.as_ptr().add(wi * 32);
            (_mm512_loadu_si512(p as *const _), _mm512_loadu_si512(p.add(16) as *const _))
        };
        for i in 0..R {
            let v = unsafe { _mm512_loadu_si512(rows[i].add(wi * 16) as *const _) };
            let lo = _mm512_and_si512(v, low);
            let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(v), low);
            let d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo);
            let d = _mm512_dpbusd_epi32(d, hi, xhi);
            let m = _mm512_set1_ps(scales[i * ng + k] * sx);
            tot[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), m, tot[i]);
        }
    }
    for i in 0..R {
        // SAFETY: row r + i belongs to this task; single token.
        unsafe { out.write(0, r + i, _mm512_reduce_add_ps(tot[i]) - off[i]) };
    }
}

/// Whether this CPU runs the 2:4 q8 kernel (also needs AVX-512BW for the byte shuffle).
pub(crate) fn sparse_supported() -> bool {
    supported() && is_x86_feature_detected!("avx512bw")
}

/// Lays out one token's activations `x` (`cols` floats) for the 2:4 q8 kernel: per 256-column block, 4 *sets* of
/// 64 int8 (set `s` = code word `s/2`, nibble parity `s%2`: windows `8·(s/2) + 2b + s%2` for `b` = 0..4), where
/// 128-bit lane `c` of a set holds at bytes `4b..4b+4` the columns `4c..4c+4` of window `b` of the set; and one
/// scale per 128 columns (sets 0-1 and 2-3 of a block). `xq`: `blocks·64` u32, `sxh`: `blocks·2`.
pub(crate) fn quantize_act_sparse(x: &[f32], cols: usize, blocks: usize, xq: &mut [u32], sxh: &mut [f32]) {
    assert!(x.len() >= cols && xq.len() >= blocks * 64 && sxh.len() >= blocks * 2);
    assert!(supported(), "callers check sparse_supported()");
    // SAFETY: AVX-512F asserted.
    unsafe { quantize_act_sparse_avx512(x, cols, blocks, xq, sxh) }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn quantize_act_sparse_avx512(x: &[f32], cols: usize, blocks: usize, xq: &mut [u32], sxh: &mut [f32]) {
    for b in 0..blocks {
        for h in 0..2 {
            let c0 = b * 256 + h * 128;
            // The 8 windows of this half, 16 columns each; columns past `cols` read as 0 (masked loads).
            let xs: [__m512; 8] = core::array::from_fn(|p| {
                let start = c0 + 16 * p;
                let left = cols.saturating_sub(start).min(16);
                let m: __mmask16 = if left >= 16 { 0xFFFF } else { ((1u32 << left) - 1) as u16 };
                // SAFETY: the mask only enables lanes below `cols`, which bounds `x`.
                unsafe { _mm512_maskz_loadu_ps(m, x.as_ptr().wrapping_add(start)) }
            });
            let mut a = _mm512_abs_ps(xs[0]);
            for v in &xs[1..] {
                a = _mm512_max_ps(a, _mm512_abs_ps(*v));
            }
            let amax = _mm512_reduce_max_ps(a);
            let (s, inv) = if amax > 0.0 { (amax / 127.0, 127.0 / amax) } else { (0.0, 0.0) };
            sxh[2 * b + h] = s;
            let iv = _mm512_set1_ps(inv);
            // Window p's 16 int8 as 4 u32 chunks (chunk c = columns 4c..4c+4).
            let wq: [__m128i; 8] = core::array::from_fn(|p| _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(xs[p], iv))));
            for par in 0..2 {
                // Set s = 2h + par: slot bb is window 2bb + par of this half; lane c gathers chunk c of each.
                let (w0, w1, w2, w3) = (wq[par], wq[2 + par], wq[4 + par], wq[6 + par]);
                let t0 = _mm_unpacklo_epi32(w0, w1);
                let t1 = _mm_unpacklo_epi32(w2, w3);
                let t2 = _mm_unpackhi_epi32(w0, w1);
                let t3 = _mm_unpackhi_epi32(w2, w3);
                let rows = [
                    _mm_unpacklo_epi64(t0, t1),
                    _mm_unpackhi_epi64(t0, t1),
                    _mm_unpacklo_epi64(t2, t3),
                    _mm_unpackhi_epi64(t2, t3),
                ];
                let dst = xq[b * 64 + (2 * h + par) * 16..].as_mut_ptr();
                for (c, r) in rows.iter().enumerate() {
                    // SAFETY: 16 u32 per set, inside this block's 64.
                    unsafe { _mm_storeu_si128(dst.add(4 * c) as *mut __m128i, *r) };
                }
            }
        }
    }
}

/// Row pairs `p0..p1` of a single-token 2:4 q8 GEMV (4-bit values). Safety: `sparse_supported()`; `xq`, `sxh`
/// from `quantize_act_sparse`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn sparse_pairs_q8(
    w: &crate::sparse24::Sparse24Weight,
    xq: &[u32],
    sxh: &[f32],
    p0: usize,
    p1: usize,
    out: OutRows,
) {
    let (ng, rec, blocks) = (w.groups, w.rec, w.blocks);
    assert!(rec == 48 && xq.len() >= blocks * 64 && sxh.len() >= blocks * 2);
    assert!(p1 * 2 * ng <= w.zeros.len() && p1 * blocks * rec <= w.data.len());
    let scales = w.scales.as_ref().expect("quantized 2:4 weights have scales");
    let mut sc = Scratch::take(&ROW_SCRATCH, 2 * ng);
    // Lanes of the pair's second row: j % 4 ∈ {2, 3}.
    const ROW_B: __mmask16 = 0xCCCC;
    let low = _mm512_set1_epi32(0x0F0F_0F0F);
    let three = _mm512_set1_epi32(0x0303_0303);
    let base_idx = _mm512_set1_epi32(0x0C08_0400);
    let data_end = w.data.as_ptr().wrapping_add(w.data.len()) as *const i8;
    for pair in p0..p1 {
        scales.widen(crate::Isa::Avx512, 2 * pair * ng, &mut sc[..2 * ng]);
        let (sa, sb) = sc.split_at(ng);
        let (za, zb) = (&w.zeros[2 * pair * ng..(2 * pair + 1) * ng], &w.zeros[(2 * pair + 1) * ng..(2 * pair + 2) * ng]);
        // SAFETY (pointers and loads below): the pair's record spans blocks·rec u32 (asserted); xq has blocks·64.
        let data = unsafe { w.data.as_ptr().add(pair * blocks * rec) };
        // Prefetch the pair `ahead` pairs on, at least ~8 KB ahead: one short pair (3 KB at 4096 columns) ahead is
        // less than a DRAM latency's worth of streaming.
        let ahead = (8192usize).div_ceil(blocks * rec * 4).max(1);
        let next = data.wrapping_add(ahead * blocks * rec) as *const i8;
        let mut tot = _mm512_setzero_ps();
        for b in 0..blocks {
            for j in 0..3 {
                let p = next.wrapping_add((b * 3 + j) * 64);
                if p < data_end {
                    // SAFETY: prefetch of an address inside the weight array never faults.
                    _mm_prefetch::<_MM_HINT_T1>(p);
                }
            }
            let (pos, cw) = unsafe {
                let base = data.add(b * rec);
                (
                    _mm512_loadu_si512(base as *const _),
                    [_mm512_loadu_si512(base.add(16) as *const _), _mm512_loadu_si512(base.add(32) as *const _)],
                )
            };
            for h in 0..2 {
                // This half-block lies in one group: its scales and zero points per row (lanes of row B blended).
                let k = w.win_group_of((b * 256 + h * 128) / 16);
                let sx = sxh[2 * b + h];
                let m = _mm512_mask_mov_ps(_mm512_set1_ps(sa[k] * sx), ROW_B, _mm512_set1_ps(sb[k] * sx));
                let zv = _mm512_mask_set1_epi32(
                    _mm512_set1_epi32(za[k] as i32 * 0x0101_0101),
                    ROW_B,
                    zb[k] as i32 * 0x0101_0101,
                );
                let (mut d, mut e) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for par in 0..2 {
                    let s = 2 * h + par;
                    let xs = unsafe { _mm512_loadu_si512(xq.as_ptr().add(b * 64 + s * 16) as *const _) };
                    // Byte b of lane j: 4b + position of window b of the set → the activation in lane j's group.
                    let sh = _mm512_srlv_epi32(pos, _mm512_set1_epi32(2 * s as i32));
                    let idx = _mm512_ternarylogic_epi32::<0xEA>(sh, three, base_idx);
                    let xg = _mm512_shuffle_epi8(xs, idx);
                    let codes = if par == 0 {
                        _mm512_and_si512(cw[h], low)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi32::<4>(cw[h]), low)
                    };
                    // Σ q·x and Σ z·x over the same gathered activations (zeros ≤ 15 fit the u8 operand).
                    d = _mm512_dpbusd_epi32(d, codes, xg);
                    e = _mm512_dpbusd_epi32(e, zv, xg);
                }
                tot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d, e)), m, tot);
            }
        }
        let ra = _mm512_reduce_add_ps(_mm512_maskz_mov_ps(!ROW_B, tot));
        let rb = _mm512_reduce_add_ps(_mm512_maskz_mov_ps(ROW_B, tot));
        // SAFETY: the pair's rows belong to this task; the padded odd row is skipped.
        unsafe {
            out.write(0, 2 * pair, ra);
            if 2 * pair + 1 < w.rows {
                out.write(0, 2 * pair + 1, rb);
            }
        }
    }
}

/// The int16 form of one token's activations for [`sparse_pairs_q16`]: per 256-column block and 128-column half `h`,
/// 4 registers of 32 int16, register `k` holding window `8h + k` (16 columns) then window `8h + k + 4`, with one
/// scale `max|x|/32767` per half. `xq`: `blocks·128` u32, `sxh`: `blocks·2`.
pub(crate) fn quantize_act_sparse16(x: &[f32], cols: usize, blocks: usize, xq: &mut [u32], sxh: &mut [f32]) {
    assert!(x.len() >= cols && xq.len() >= blocks * 128 && sxh.len() >= blocks * 2);
    assert!(sparse_supported(), "callers check sparse_supported()");
    // SAFETY: AVX-512F/BW asserted.
    unsafe { quantize_act_sparse16_avx512(x, cols, blocks, xq, sxh) }
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn quantize_act_sparse16_avx512(x: &[f32], cols: usize, blocks: usize, xq: &mut [u32], sxh: &mut [f32]) {
    for b in 0..blocks {
        for h in 0..2 {
            let c0 = b * 256 + h * 128;
            let xs: [__m512; 8] = core::array::from_fn(|p| {
                let start = c0 + 16 * p;
                let left = cols.saturating_sub(start).min(16);
                let m: __mmask16 = if left >= 16 { 0xFFFF } else { ((1u32 << left) - 1) as u16 };
                // SAFETY: the mask only enables lanes below `cols`, which bounds `x`.
                unsafe { _mm512_maskz_loadu_ps(m, x.as_ptr().wrapping_add(start)) }
            });
            let mut a = _mm512_abs_ps(xs[0]);
            for v in &xs[1..] {
                a = _mm512_max_ps(a, _mm512_abs_ps(*v));
            }
            let amax = _mm512_reduce_max_ps(a);
            let (s, inv) = if amax > 0.0 { (amax / 32767.0, 32767.0 / amax) } else { (0.0, 0.0) };
            sxh[2 * b + h] = s;
            let iv = _mm512_set1_ps(inv);
            let q: [__m256i; 8] = core::array::from_fn(|p| _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(xs[p], iv))));
            for k in 0..4 {
                let table = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q[k]), q[k + 4]);
                // SAFETY: 16 u32 per register, 8 registers per block: inside `xq` (asserted).
                unsafe { _mm512_storeu_si512(xq.as_mut_ptr().add((b * 8 + h * 4 + k) * 16) as *mut _, table) };
            }
        }
    }
}

/// Row pairs `p0..p1` of a single-token 2:4 GEMV with int16 activations (4-bit values): the decode default on
/// VNNI CPUs. Per 128-column half and `k` = 0..3, one shift and one mask of the code word give, in each lane, the
/// codes of windows `8h + k` (low u16) and `8h + k + 4` (high u16); their 2-bit positions sit 16 bits apart in the
/// position lane (`pos_shift`), so one shift and one mask-or give both gather indices, and `vpermw` fetches the two
/// int16 activations from the 32-entry register of those windows. `vpdpwssd` then sums code × activation and zero
/// point × activation per lane. Safety: `sparse_supported()`; `xq`, `sxh` from `quantize_act_sparse16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn sparse_pairs_q16(
    w: &crate::sparse24::Sparse24Weight,
    xq: &[u32],
    sxh: &[f32],
    p0: usize,
    p1: usize,
    out: OutRows,
) {
    let (ng, rec, blocks) = (w.groups, w.rec, w.blocks);
    assert!(rec == 48 && xq.len() >= blocks * 128 && sxh.len() >= blocks * 2);
    assert!(p1 * 2 * ng <= w.zeros.len() && p1 * blocks * rec <= w.data.len());
    let scales = w.scales.as_ref().expect("quantized 2:4 weights have scales");
    let mut sc = Scratch::take(&ROW_SCRATCH, 2 * ng);
    const ROW_B: __mmask16 = 0xCCCC;
    let nib16 = _mm512_set1_epi32(0x000F_000F);
    let three16 = _mm512_set1_epi32(0x0003_0003);
    // Lane j gathers from column group j/4 of each window: entry 4·(j/4) (low half) and 16 + 4·(j/4) (high half).
    let base: [i32; 16] = core::array::from_fn(|j| (4 * (j / 4) as i32) | ((16 + 4 * (j / 4) as i32) << 16));
    let base = _mm512_loadu_si512(base.as_ptr() as *const _);
    let data_end = w.data.as_ptr().wrapping_add(w.data.len()) as *const i8;
    for pair in p0..p1 {
        scales.widen(crate::Isa::Avx512, 2 * pair * ng, &mut sc[..2 * ng]);
        let (sa, sb) = sc.split_at(ng);
        let (za, zb) = (&w.zeros[2 * pair * ng..(2 * pair + 1) * ng], &w.zeros[(2 * pair + 1) * ng..(2 * pair + 2) * ng]);
        // SAFETY (pointers and loads below): the pair's record spans blocks·rec u32 (asserted); xq has blocks·128.
        let data = unsafe { w.data.as_ptr().add(pair * blocks * rec) };
        let ahead = (8192usize).div_ceil(blocks * rec * 4).max(1);
        let next = data.wrapping_add(ahead * blocks * rec) as *const i8;
        let mut tot = _mm512_setzero_ps();
        for b in 0..blocks {
            for j in 0..3 {
                let p = next.wrapping_add((b * 3 + j) * 64);
                if p < data_end {
                    // SAFETY: prefetch of an address inside the weight array never faults.
                    _mm_prefetch::<_MM_HINT_T1>(p);
                }
            }
            let (pos, cw) = unsafe {
                let base = data.add(b * rec);
                (
                    _mm512_loadu_si512(base as *const _),
                    [_mm512_loadu_si512(base.add(16) as *const _), _mm512_loadu_si512(base.add(32) as *const _)],
                )
            };
            for h in 0..2 {
                let g = w.win_group_of((b * 256 + h * 128) / 16);
                let sx = sxh[2 * b + h];
                let m = _mm512_mask_mov_ps(_mm512_set1_ps(sa[g] * sx), ROW_B, _mm512_set1_ps(sb[g] * sx));
                let zv = _mm512_mask_set1_epi32(
                    _mm512_set1_epi32(za[g] as i32 * 0x0001_0001),
                    ROW_B,
                    zb[g] as i32 * 0x0001_0001,
                );
                let (mut d, mut e) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for k in 0..4 {
                    let shift = crate::sparse24::pos_shift(8 * h + k);
                    let t = _mm512_srlv_epi32(pos, _mm512_set1_epi32(shift as i32));
                    let idx = _mm512_ternarylogic_epi32::<0xEA>(t, three16, base);
                    let table = unsafe { _mm512_loadu_si512(xq.as_ptr().add((b * 8 + h * 4 + k) * 16) as *const _) };
                    let acts = _mm512_permutexvar_epi16(idx, table);
                    let codes = _mm512_and_si512(_mm512_srlv_epi32(cw[h], _mm512_set1_epi32(4 * k as i32)), nib16);
                    d = _mm512_dpwssd_epi32(d, codes, acts);
                    e = _mm512_dpwssd_epi32(e, zv, acts);
                }
                tot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d, e)), m, tot);
            }
        }
        let ra = _mm512_reduce_add_ps(_mm512_maskz_mov_ps(!ROW_B, tot));
        let rb = _mm512_reduce_add_ps(_mm512_maskz_mov_ps(ROW_B, tot));
        // SAFETY: the pair's rows belong to this task; the padded odd row is skipped.
        unsafe {
            out.write(0, 2 * pair, ra);
            if 2 * pair + 1 < w.rows {
                out.write(0, 2 * pair + 1, rb);
            }
        }
    }
}
