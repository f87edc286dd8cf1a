//! The left-to-right column sweep with error feedback that GPTQ (algorithms.md §3 step 5) and SparseGPT (§4) share:
//! for each column j, pick its compressed value q_j (quantize, prune, or both), and spread the error
//! (w_j − q_j)/U_jj over the columns not yet compressed through row j of U (H⁻¹ = UᵀU).
//!
//! Shape of the computation, chosen for speed:
//! * Rows are independent given U, so inside a block of B columns the column loop runs per tile of 8 rows
//!   (rayon over tiles), with the block held column-major across the tile: every per-column step (quantize,
//!   error, rank-1 update of the rest of the block) is one 8-lane SIMD operation, and U's B×B block stays in cache.
//! * After a block, the deferred update of later columns is a rank-B f32 GEMM, W[:, end:] −= E · U[block, end:]
//!   (the "lazy batch" trick), done in two levels (within a super-block of 4 blocks, then past it at rank 4B), so
//!   almost all flops run at GEMM speed.
//! * Grids fitted "on the current weights at group start" must see the updates still pending when a group reaches
//!   past the block (group > block, or unaligned); those few values are corrected on the fly instead of forcing
//!   block/group alignment.

use rayon::prelude::*;

use super::grid::Grid;
use super::linalg::gemm_strided;
use super::magnitude::smallest_k;
use super::{prune_count, CompressError, Matrix, Sparsity};

/// Where the sweep's quantization grids come from.
pub(crate) enum Groups {
    /// Fitted before the sweep (per-channel, or static groups): `grids` is rows × `n_groups` row-major and
    /// `col_group[j]` the group of sweep column j.
    Fixed { grids: Vec<Grid>, n_groups: usize, col_group: Vec<u32> },
    /// A grid per `g` consecutive sweep columns, fitted on the error-updated weights when the sweep reaches it.
    Dynamic { g: usize },
}

pub(crate) struct QuantSweep {
    pub bits: u8,
    pub sym: bool,
    pub mse: bool,
    pub groups: Groups,
}

pub(crate) struct SweepSpec<'a> {
    /// Upper Cholesky factor of the damped H⁻¹ in sweep order, row-major c×c.
    pub u: &'a [f32],
    pub block: usize,
    pub quant: Option<QuantSweep>,
    pub prune: Option<Sparsity>,
}

pub(crate) struct SweepOut {
    /// Codes in sweep order, rows × cols (all 0 without quantization).
    pub codes: Vec<u8>,
    /// rows × n_groups (one dummy grid per row without quantization).
    pub grids: Vec<Grid>,
    /// Keep-mask in sweep order (all true without pruning).
    pub keep: Vec<bool>,
}

/// Rows swept together by one task: one AVX2 register of f32. Each weight's quantize-and-feedback step is a serial
/// chain (two divisions, rounding, conversions) that the next column depends on; doing 8 rows' chains as one
/// vector chain costs the same latency as one row's.
const TILE_ROWS: usize = 8;

/// Run the sweep over `w` (already permuted into sweep order); `w` ends holding the compressed weights.
pub(crate) fn sweep(w: &mut Matrix, spec: SweepSpec<'_>, cancel: &dyn Fn() -> bool) -> Result<SweepOut, CompressError> {
    let (rows, c) = (w.rows, w.cols);
    let u = spec.u;
    debug_assert_eq!(u.len(), c * c);
    // An N:M chunk must sit inside one block so its mask is chosen on fully updated weights.
    let block = match spec.prune {
        Some(Sparsity::NM { m, .. }) => (spec.block / m).max(1) * m,
        _ => spec.block,
    }
    .clamp(1, c.max(1));

    let (mut grids, n_groups) = match &spec.quant {
        Some(QuantSweep { groups: Groups::Fixed { grids, n_groups, .. }, .. }) => (grids.clone(), *n_groups),
        Some(QuantSweep { groups: Groups::Dynamic { g }, .. }) => {
            let ng = c.div_ceil(*g);
            (vec![Grid { scale: 1.0, zero: 0, maxq: 1 }; rows * ng], ng)
        }
        None => (vec![Grid { scale: 1.0, zero: 0, maxq: 1 }; rows], 1),
    };
    // Two-level lazy batching: blocks of `block` columns inside super-blocks of OUTER_BLOCKS·block. Updates
    // within a super-block are rank-`block` GEMMs over its remaining columns; the update of everything after it is
    // one rank-`outer` GEMM. Same arithmetic as one level (up to f32 summation order), but the big GEMM has 4× the
    // depth, so W is streamed through memory 4× less often.
    let outer = (block * OUTER_BLOCKS).min(c.max(1));
    let ctx = Ctx { spec: &spec, plan: column_plan(&spec, c), c, outer };
    let mut codes = vec![0u8; rows * c];
    let mut keep = vec![true; rows * c];
    // Scaled errors (w − q)/U_jj of the current super-block, rows × outer.
    let mut err = vec![0f32; rows * outer];
    #[cfg(target_arch = "x86_64")]
    let simd = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");

    for os in (0..c).step_by(outer) {
        let oe = (os + outer).min(c);
        for bs in (os..oe).step_by(block) {
            if cancel() {
                return Err(CompressError::Cancelled);
            }
            let be = (bs + block).min(oe);
            let cols = Cols { os, oe, bs, be };
            w.data
                .par_chunks_mut(c * TILE_ROWS)
                .zip(err.par_chunks_mut(outer * TILE_ROWS))
                .zip(codes.par_chunks_mut(c * TILE_ROWS))
                .zip(keep.par_chunks_mut(c * TILE_ROWS))
                .zip(grids.par_chunks_mut(n_groups * TILE_ROWS))
                .for_each(|((((w, e), codes), keep), grids)| {
                    let tile = Tile { w, e, codes, keep, grids, n_groups };
                    #[cfg(target_arch = "x86_64")]
                    if simd {
                        // SAFETY: AVX2 and FMA support was detected at runtime above.
                        unsafe { sweep_tile_block_avx2(tile, &ctx, cols) };
                        return;
                    }
                    sweep_tile_block::<false>(tile, &ctx, cols);
                });
            if be < oe {
                // W[:, be:oe] −= E[:, bs:be] · U[bs:be, be:oe]
                gemm_strided(
                    &mut w.data[be..],
                    c,
                    &err[bs - os..],
                    outer,
                    &u[bs * c + be..],
                    c,
                    (rows, be - bs, oe - be),
                    -1.0f32,
                    true,
                );
            }
        }
        if oe < c {
            // W[:, oe:] −= E[:, os:oe] · U[os:oe, oe:]
            gemm_strided(&mut w.data[oe..], c, &err, outer, &u[os * c + oe..], c, (rows, oe - os, c - oe), -1.0f32, true);
        }
    }
    Ok(SweepOut { codes, grids, keep })
}

/// Blocks per super-block of the two-level lazy batch (see `sweep`).
const OUTER_BLOCKS: usize = 4;

/// Column ranges of the block being swept: super-block [os, oe) and block [bs, be) inside it.
#[derive(Clone, Copy)]
struct Cols {
    os: usize,
    oe: usize,
    bs: usize,
    be: usize,
}

/// Read-only state shared by all tiles.
struct Ctx<'a> {
    spec: &'a SweepSpec<'a>,
    plan: Vec<ColPlan>,
    c: usize,
    /// Row stride of the error buffer (the super-block width).
    outer: usize,
}

/// Up to TILE_ROWS consecutive rows: their weights, block errors, codes, keep-mask and grids.
struct Tile<'a> {
    w: &'a mut [f32],
    e: &'a mut [f32],
    codes: &'a mut [u8],
    keep: &'a mut [bool],
    grids: &'a mut [Grid],
    n_groups: usize,
}

/// Row-independent facts about one sweep column, computed once so the per-row loop does no integer division
/// (two divisions per weight cost more than the quantization itself).
#[derive(Clone, Copy, Default)]
struct ColPlan {
    /// Grid index of the column.
    group: u32,
    /// For a dynamic group starting at this column: its end (exclusive); otherwise 0.
    group_end: u32,
    /// An N:M chunk starts here (a full one: the ragged tail stays dense).
    nm_start: bool,
}

fn column_plan(spec: &SweepSpec<'_>, c: usize) -> Vec<ColPlan> {
    (0..c)
        .map(|j| {
            let mut p = ColPlan::default();
            match spec.quant.as_ref().map(|q| &q.groups) {
                Some(Groups::Fixed { col_group, .. }) => p.group = col_group[j],
                Some(Groups::Dynamic { g }) => {
                    p.group = (j / g) as u32;
                    if j % g == 0 {
                        p.group_end = (j + g).min(c) as u32;
                    }
                }
                None => {}
            }
            if let Some(Sparsity::NM { m, .. }) = spec.prune {
                p.nm_start = j % m == 0 && j + m <= c;
            }
            p
        })
        .collect()
}

/// [`sweep_tile_block`] compiled for AVX2: the in-block axpy is the only O(r·c·B) work outside the GEMMs, and the
/// default x86-64 target (SSE2) runs it several times slower. No FMA contraction happens (Rust does not fuse
/// `a - b*c`), so both versions give bit-identical results.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sweep_tile_block_avx2(tile: Tile<'_>, ctx: &Ctx<'_>, cols: Cols) {
    sweep_tile_block::<true>(tile, ctx, cols)
}

/// The column loop over block [bs, be) for the rows of one tile.
///
/// The block is first gathered column-major across the tile's rows (`tb[(j − bs)·L + r]`), so every per-column
/// step (quantize, error, and the rank-1 update of the rest of the block) is an L-wide operation across rows that
/// the compiler turns into SIMD, and the serial chain of one row overlaps with the others'. Per-row decisions
/// (grid fits, masks) stay scalar; they happen once per group or chunk, not per weight.
#[inline(always)]
fn sweep_tile_block<const SIMD: bool>(t: Tile<'_>, ctx: &Ctx<'_>, cols: Cols) {
    const L: usize = TILE_ROWS;
    let (c, spec, u) = (ctx.c, ctx.spec, ctx.spec.u);
    let Cols { os, bs, be, .. } = cols;
    let nb = be - bs;
    let nr = t.w.len() / c;
    let ng = t.n_groups;
    let mut tb = vec![0f32; nb * L];
    for r in 0..nr {
        for (jj, &v) in t.w[r * c + bs..r * c + be].iter().enumerate() {
            tb[jj * L + r] = v;
        }
    }

    // Adaptive unstructured mask for the block: smallest w²/U_jj² on the current weights, with per-block counts
    // taken from the cumulative target so each row ends with exactly round(p·c) zeros.
    if let Some(Sparsity::Unstructured(p)) = spec.prune {
        let k = prune_count(p, be) - prune_count(p, bs);
        if k > 0 {
            for r in 0..nr {
                let mut idx: Vec<usize> = (bs..be).collect();
                smallest_k(&mut idx, k, |j| obs_score(tb[(j - bs) * L + r], u[j * c + j]));
                idx[..k].iter().for_each(|&j| t.keep[r * c + j] = false);
            }
        }
    }

    for j in bs..be {
        let jj = j - bs;
        let p = ctx.plan[j];
        if let (true, Some(Sparsity::NM { n, m })) = (p.nm_start, spec.prune) {
            // The chunk lies inside the block (block is a multiple of m).
            for r in 0..nr {
                let mut idx: Vec<usize> = (j..j + m).collect();
                smallest_k(&mut idx, n, |i| obs_score(tb[(i - bs) * L + r], u[i * c + i]));
                idx[..n].iter().for_each(|&i| t.keep[r * c + i] = false);
            }
        }
        let mut kept = [true; L];
        for (r, k) in kept.iter_mut().enumerate().take(nr) {
            *k = t.keep[r * c + j];
        }
        let mut x = [0f32; L];
        x.copy_from_slice(&tb[jj * L..jj * L + L]);
        let mut q = [0f32; L];
        match &spec.quant {
            None => {
                for r in 0..L {
                    q[r] = if kept[r] { x[r] } else { 0.0 };
                }
            }
            Some(qs) => {
                if p.group_end != 0 {
                    for r in 0..nr {
                        let vals = group_values(&tb, r, &t, ctx, cols, j, p.group_end as usize);
                        t.grids[r * ng + p.group as usize] = Grid::fit(&vals, qs.bits, qs.sym, qs.mse);
                    }
                }
                // Padding lanes (r ≥ nr) quantize 0 on a unit grid: they stay 0 and never feed back.
                let (mut sc, mut zr) = ([1f32; L], [0f32; L]);
                for r in 0..nr {
                    let g = t.grids[r * ng + p.group as usize];
                    sc[r] = g.scale;
                    zr[r] = g.zero as f32;
                }
                let maxq = Grid::maxq_for(qs.bits) as f32;
                // Exactly Grid::quantize / Grid::dequantize, lane-wise (so QuantizedLinear::dequantize agrees bit
                // for bit with the weights returned).
                let mut code = [0f32; L];
                for r in 0..L {
                    code[r] = ((x[r] / sc[r]).round_ties_even() + zr[r]).clamp(0.0, maxq);
                    q[r] = sc[r] * (code[r] - zr[r]);
                }
                for r in 0..nr {
                    if kept[r] {
                        t.codes[r * c + j] = code[r] as u8;
                    } else {
                        // Pruned: code = zero point (dequantizes to 0); the keep-mask makes it explicit.
                        t.codes[r * c + j] = zr[r] as u8;
                        q[r] = 0.0;
                    }
                }
            }
        }
        let d = u[j * c + j];
        let mut e = [0f32; L];
        for r in 0..L {
            e[r] = (x[r] - q[r]) / d;
        }
        tb[jj * L..jj * L + L].copy_from_slice(&q);
        for (r, &er) in e.iter().enumerate().take(nr) {
            t.e[r * ctx.outer + j - os] = er;
        }
        // Rank-1 update of the rest of the block: one L-wide multiply-subtract per remaining column.
        rank1_update::<SIMD>(&mut tb[(jj + 1) * L..], &e, &u[j * c + j + 1..j * c + be]);
    }
    for r in 0..nr {
        for (jj, v) in t.w[r * c + bs..r * c + be].iter_mut().enumerate() {
            *v = tb[jj * L + r];
        }
    }
}

/// `cols[k·L + r] −= e[r] · urow[k]` for every column k of the tile buffer. Written with AVX intrinsics when
/// `SIMD` (only instantiated inside the AVX2 entry point): left to itself the compiler vectorizes this across
/// columns with a storm of shuffles instead of one broadcast multiply-subtract per column.
#[inline(always)]
fn rank1_update<const SIMD: bool>(cols: &mut [f32], e: &[f32; TILE_ROWS], urow: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        use std::arch::x86_64::{_mm256_loadu_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_storeu_ps, _mm256_sub_ps};
        const _: () = assert!(TILE_ROWS == 8, "the AVX path holds one tile column in one 8-lane register");
        // SAFETY: SIMD is true only in code reached from `sweep_tile_block_avx2`, which runs after AVX2 was
        // detected; every access is to an 8-float chunk produced by `chunks_exact_mut(8)`.
        unsafe {
            let ev = _mm256_loadu_ps(e.as_ptr());
            for (col, &h) in cols.chunks_exact_mut(TILE_ROWS).zip(urow) {
                let v = _mm256_loadu_ps(col.as_ptr());
                _mm256_storeu_ps(col.as_mut_ptr(), _mm256_sub_ps(v, _mm256_mul_ps(ev, _mm256_set1_ps(h))));
            }
        }
        return;
    }
    for (col, &h) in cols.chunks_exact_mut(TILE_ROWS).zip(urow) {
        for r in 0..TILE_ROWS {
            col[r] -= e[r] * h;
        }
    }
}

/// OBS saliency of dropping weight w in a column with U_jj = d: w² / d².
#[inline(always)]
fn obs_score(w: f32, d: f32) -> f32 {
    (w * w) / (d * d)
}

/// Current values of row `r`'s group [j, ge), for fitting its grid. In-block columns are up to date in the tile
/// buffer; later columns still miss the pending lazy updates Σ_t e_t U[t, k]: from this block's earlier columns
/// (t ∈ [bs, j)) for columns inside the super-block, and from the whole super-block so far (t ∈ [os, j)) past
/// it. They are added here. Known-pruned weights count as 0 (they will be 0; 0 is in every grid's range anyway).
fn group_values(tb: &[f32], r: usize, t: &Tile<'_>, ctx: &Ctx<'_>, cols: Cols, j: usize, ge: usize) -> Vec<f32> {
    const L: usize = TILE_ROWS;
    let (c, u) = (ctx.c, ctx.spec.u);
    let Cols { os, oe, bs, be } = cols;
    let (wr, er, kr) = (&t.w[r * c..(r + 1) * c], &t.e[r * ctx.outer..], &t.keep[r * c..(r + 1) * c]);
    (j..ge)
        .map(|k| {
            if !kr[k] {
                0.0
            } else if k < be {
                tb[(k - bs) * L + r]
            } else {
                let from = if k >= oe { os } else { bs };
                wr[k] - (from..j).map(|s| er[s - os] * u[s * c + k]).sum::<f32>()
            }
        })
        .collect()
}
