//! What every CPU kernel shares: which instruction set to run (detected once at run time, overridable for tests
//! and for `WHITTLE_KERNELS_ISA`), how rows are split over rayon, where a task writes its outputs, and reusable
//! scratch buffers.
//!
//! Kernels are written once per instruction set (`scalar`, AVX2+FMA, AVX-512) and all take the same row range, so
//! tests can run every available ISA on the same weight and compare. Rows are the unit of parallelism because a
//! GEMV reads each weight once: splitting rows gives every task its own contiguous stream of weights and its own
//! outputs, with no reduction between tasks.

use rayon::prelude::*;
use std::sync::OnceLock;

/// An instruction-set level a kernel can be run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, no intrinsics: the reference the SIMD paths are tested against, and the fallback.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (Haswell / Zen 1 and later).
    Avx2,
    /// x86-64 AVX-512F (+ AVX2/FMA/F16C for the scalar-ish prologues): Skylake-SP, Ice Lake, Zen 4 and later.
    Avx512,
}

impl Isa {
    /// Whether this CPU can run kernels built for `self`.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Isa::Avx2.is_supported() && is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every level this CPU supports, slowest first (what the tests iterate over).
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The level `Weight::matmul` uses: the best supported one, unless `WHITTLE_KERNELS_ISA` (scalar|avx2|avx512)
    /// asks for a lower one (useful to compare paths on a real model without rebuilding).
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let detected = *Isa::available().last().unwrap_or(&Isa::Scalar);
            match std::env::var("WHITTLE_KERNELS_ISA").ok().as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("avx2") if Isa::Avx2.is_supported() => Isa::Avx2,
                Some("avx512") if Isa::Avx512.is_supported() => Isa::Avx512,
                _ => detected,
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// Whether `WHITTLE_KERNELS_Q8=1` asks packed single-token products to use int8 activations (`matmul_q8`).
pub(crate) fn q8_decode_requested() -> bool {
    static Q8: OnceLock<bool> = OnceLock::new();
    *Q8.get_or_init(|| std::env::var("WHITTLE_KERNELS_Q8").is_ok_and(|v| v == "1"))
}

/// Where a task writes `y[t, r]` of an `n × rows` row-major output.
///
/// Tasks own disjoint row ranges, so their writes never alias; a raw pointer lets each task write its rows of
/// every token in place instead of collecting per-task buffers and scattering them afterwards (an allocation and a
/// copy per call).
#[derive(Clone, Copy)]
pub(crate) struct OutRows {
    ptr: *mut f32,
    rows: usize,
    n: usize,
}

// SAFETY: `OutRows` is only handed to tasks whose row ranges are disjoint (see `for_row_blocks`), and the slice it
// points into outlives the parallel section because `for_row_blocks` borrows it mutably for its whole duration.
unsafe impl Send for OutRows {}
unsafe impl Sync for OutRows {}

impl OutRows {
    /// Writes `v` to `y[t, r]`.
    ///
    /// # Safety
    /// `t < n`, `r < rows`, and no other task writes row `r`.
    #[inline(always)]
    pub(crate) unsafe fn write(&self, t: usize, r: usize, v: f32) {
        debug_assert!(t < self.n && r < self.rows);
        // SAFETY: in bounds by the caller's contract; the row is owned by this task.
        unsafe { *self.ptr.add(t * self.rows + r) = v };
    }

    /// Output rows `r0..r1` of every token as an `n × (r1 − r0)` matrix view (row stride `rows`), for kernels that
    /// hand a whole block to a GEMM.
    ///
    /// # Safety
    /// `r0 ≤ r1 ≤ rows`, the rows belong to this task, and no other view of them is alive.
    pub(crate) unsafe fn block_mut<'a>(&self, r0: usize, r1: usize) -> faer::MatMut<'a, f32> {
        debug_assert!(r0 <= r1 && r1 <= self.rows);
        // SAFETY: the view covers y[t, r0..r1] for t < n, inside the n × rows output, owned by this task.
        unsafe { faer::MatMut::from_raw_parts_mut(self.ptr.add(r0), self.n, r1 - r0, self.rows as isize, 1) }
    }
}

/// Clears the upper halves of the vector registers (vzeroupper). Call it after faer's AVX-512 GEMMs: left dirty,
/// they make the SSE code that follows (libm's `expf` in SiLU and softmax) run several times slower (measured on
/// the calibration forward: 7× more samples in `expf` without it).
pub fn clear_upper_vector_state() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is available (checked); vzeroupper only clears upper register halves no live value uses
        // across this call boundary.
        unsafe { clear_upper_avx() }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn clear_upper_avx() {
    std::arch::x86_64::_mm256_zeroupper();
}

/// Below this many weight bytes × tokens a call runs on the calling thread: waking the pool costs a few
/// microseconds, more than a tiny layer takes (the embedded 260k-parameter model is all tiny layers).
const PARALLEL_MIN_WORK: usize = 256 * 1024;

/// Target bytes of weights per task: big enough that rayon's per-task cost (~1 µs) is noise next to reading
/// them (~2-4 µs at 20 GB/s per core), small enough that 2-16 threads get many tasks each to balance.
pub(crate) const TASK_BYTES: usize = 64 * 1024;

/// Runs `f(r0, r1, out)` over consecutive row blocks of `bytes_per_row·block ≈ TASK_BYTES`, in parallel when the
/// work is big enough. `y` must be `n × rows`.
pub(crate) fn for_row_blocks(
    rows: usize,
    row_align: usize,
    bytes_per_row: usize,
    n: usize,
    y: &mut [f32],
    f: impl Fn(usize, usize, OutRows) + Sync,
) {
    assert_eq!(y.len(), n * rows, "output must be n × rows");
    let out = OutRows { ptr: y.as_mut_ptr(), rows, n };
    if rows == 0 || n == 0 {
        return;
    }
    let work = bytes_per_row.saturating_mul(rows).saturating_mul(n);
    if work < PARALLEL_MIN_WORK || rayon::current_num_threads() == 1 {
        f(0, rows, out);
        return;
    }
    // More tokens means more work per weight byte: shrink blocks so large-n calls still spread over threads.
    let per_task = (TASK_BYTES / n.clamp(1, 16)).max(4096);
    let mut block = (per_task / bytes_per_row.max(1)).max(1);
    block = block.div_ceil(row_align) * row_align;
    let blocks = rows.div_ceil(block);
    (0..blocks).into_par_iter().for_each(|b| {
        let r0 = b * block;
        let r1 = (r0 + block).min(rows);
        f(r0, r1, out);
    });
}

/// Reusable f32 scratch: taken out of a thread-local slot for the duration of a use and put back after, so nested
/// or re-entrant use (a rayon worker that steals another matmul while waiting) gets a fresh buffer instead of a
/// `RefCell` panic, and steady-state calls allocate nothing.
pub(crate) struct Scratch {
    buf: Vec<f32>,
    slot: &'static std::thread::LocalKey<std::cell::Cell<Vec<f32>>>,
}

impl Scratch {
    /// At least `len` floats with unspecified contents: for buffers every use writes before it reads (filling a
    /// per-task buffer with zeros on every call would cost more than the kernels' own prologues).
    pub(crate) fn take(slot: &'static std::thread::LocalKey<std::cell::Cell<Vec<f32>>>, len: usize) -> Scratch {
        let mut buf = slot.with(|c| c.take());
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        Scratch { buf, slot }
    }

    /// Exactly `len` zeros.
    pub(crate) fn take_zeroed(slot: &'static std::thread::LocalKey<std::cell::Cell<Vec<f32>>>, len: usize) -> Scratch {
        let mut buf = slot.with(|c| c.take());
        buf.clear();
        buf.resize(len, 0.0);
        Scratch { buf, slot }
    }
}

impl std::ops::Deref for Scratch {
    type Target = Vec<f32>;
    fn deref(&self) -> &Vec<f32> {
        &self.buf
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut Vec<f32> {
        &mut self.buf
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.slot.with(|c| c.set(buf));
    }
}

thread_local! {
    /// Prepared (permuted, padded) activations of the current call, on the calling thread.
    pub(crate) static ACT_SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// Per-row group scales widened to f32, on whichever thread runs a task.
    pub(crate) static ROW_SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Splits `n` tokens into tiles of 8, 4, 2 and 1: kernels are instantiated per tile width so the per-token
/// accumulators live in registers.
pub(crate) fn token_tiles(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut t0 = 0;
    std::iter::from_fn(move || {
        if t0 >= n {
            return None;
        }
        let left = n - t0;
        let w = if left >= 8 {
            8
        } else if left >= 4 {
            4
        } else if left >= 2 {
            2
        } else {
            1
        };
        let tile = (t0, w);
        t0 += w;
        Some(tile)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_tiles_cover_every_token_once() {
        for n in 0..40 {
            let mut seen = vec![0; n];
            for (t0, w) in token_tiles(n) {
                assert!([1, 2, 4, 8].contains(&w));
                for s in &mut seen[t0..t0 + w] {
                    *s += 1;
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "n = {n}");
        }
    }

    #[test]
    fn row_blocks_cover_every_row_once_and_respect_alignment() {
        let rows = 1001;
        let mut y = vec![0.0f32; 3 * rows];
        for_row_blocks(rows, 2, 8192, 3, &mut y, |r0, r1, out| {
            assert!(r0 % 2 == 0);
            for r in r0..r1 {
                for t in 0..3 {
                    // SAFETY: r in this task's block, t < n.
                    unsafe { out.write(t, r, (t * rows + r) as f32 + 1.0) };
                }
            }
        });
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, i as f32 + 1.0);
        }
    }
}
