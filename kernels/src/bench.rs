//! Measurements the benches and `whittle bench gemv` report: stream-read bandwidth, and GEMV throughput as a
//! fraction of it, both measured in the same process so machine drift and neighbours affect both alike.
//!
//! A GEMV at batch 1 reads every weight once, so its bound is bytes / bandwidth (kernels.md). Layers larger than the
//! last-level cache are timed round-robin over several copies so every call really comes from DRAM, as in decoding
//! a model much larger than the cache.

use crate::dense::{DType, DenseWeight};
use crate::packed::{PackedWeight, QuantParts};
use crate::sparse24::Sparse24Weight;
use crate::{Isa, SharedBytes, Weight};
use std::time::Instant;

/// Reads `bytes` (split evenly over `threads` threads, each its own contiguous part) several times and returns the
/// best read bandwidth in GB/s (10⁹ bytes per second).
pub fn measure_stream_read_gbps(bytes: usize, threads: usize) -> f64 {
    StreamBuffer::new(bytes, threads).best_gbps(threads, 5)
}

/// A buffer for stream-read measurements, allocated once so a benchmark can measure between its own rounds.
struct StreamBuffer(Vec<u64>);

impl StreamBuffer {
    fn new(bytes: usize, threads: usize) -> Self {
        let words = (bytes / 8).max(threads.max(1) * 64);
        // Non-zero contents so every page is really backed (a zeroed allocation can map one shared zero page).
        StreamBuffer((0..words as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1).collect())
    }

    /// The best of `passes` reads of the whole buffer on `threads` threads, in GB/s.
    fn best_gbps(&self, threads: usize, passes: usize) -> f64 {
        let threads = threads.max(1);
        let part = self.0.len() / threads;
        let mut best = 0.0f64;
        for _ in 0..passes {
            // Each worker times its own read; the span is first start to last end. (Timing from the coordinating
            // thread overstates bandwidth when that thread is descheduled right after the barrier on a busy machine.)
            let barrier = std::sync::Barrier::new(threads);
            let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        let chunk = &self.0[t * part..(t + 1) * part];
                        let barrier = &barrier;
                        s.spawn(move || {
                            barrier.wait();
                            let t0 = Instant::now();
                            std::hint::black_box(xor_fold(chunk));
                            (t0, Instant::now())
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("stream reader thread")).collect()
            });
            let start = spans.iter().map(|s| s.0).min().expect("at least one thread");
            let end = spans.iter().map(|s| s.1).max().expect("at least one thread");
            best = best.max((part * threads * 8) as f64 / (end - start).as_secs_f64() / 1e9);
        }
        best
    }
}

/// XOR of all words with 8 independent lanes: loads at full width, one cheap op per load.
fn xor_fold(v: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] ^= c[k];
        }
    }
    acc.iter().chain(rest).fold(0, |a, b| a ^ b)
}

/// Rounds of (stream read, ~100 ms of GEMVs) in `bench_gemv_q8`.
const ROUNDS: usize = 7;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Rows × cols of a benchmarked layer (e.g. 4096 × 11008 is LLaMA-7B's up/gate projection, 11008 × 4096 its down).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvShape {
    pub rows: usize,
    pub cols: usize,
}

/// Result of `bench_gemv`.
#[derive(Clone, Debug)]
pub struct GemvReport {
    /// Median seconds per GEMV (one token), over all rounds.
    pub seconds: f64,
    /// Bytes the kernel had to read per call (weights, scales, zeros; not the small activation vector).
    pub bytes_read: usize,
    /// bytes_read / seconds, in GB/s.
    pub gbps: f64,
    /// Stream-read bandwidth measured in the same run with the same thread count, between the GEMV's rounds:
    /// the median of the rounds, GB/s.
    pub stream_gbps: f64,
    /// gbps / stream_gbps.
    pub fraction_of_bandwidth: f64,
    /// Bytes resident per weight, in bits.
    pub bits_per_weight: f64,
    pub threads: usize,
    pub isa: Isa,
    pub label: String,
}

impl std::fmt::Display for GemvReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {:.3} ms, {:.1} GB/s of {:.1} GB/s stream ({:.0}%), {:.2} bits/weight, {} threads, {}",
            self.label,
            self.seconds * 1e3,
            self.gbps,
            self.stream_gbps,
            self.fraction_of_bandwidth * 100.0,
            self.bits_per_weight,
            self.threads,
            self.isa.name()
        )
    }
}

/// Small deterministic generator for benchmark data (no dependency, same data every run).
pub(crate) struct SplitMix(pub u64);

impl SplitMix {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub(crate) fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// A random weight of the benchmarked kind: `bits` 16 = dense f16; 2/3/4/8 = packed with groups of `group`
/// (0 = one group per row); `sparse24` = 2:4 with 4-bit values (bits must then be 4).
pub fn bench_weight(shape: GemvShape, bits: u8, group: usize, sparse24: bool) -> Result<Weight, crate::KernelError> {
    let GemvShape { rows, cols } = shape;
    let mut rng = SplitMix(0x5EED ^ (rows * 31 + cols) as u64);
    if bits == 16 {
        let halves: Vec<u8> = (0..rows * cols)
            .flat_map(|_| half::f16::from_f32(rng.f32() * 0.05).to_le_bytes())
            .collect();
        return Ok(Weight::Dense(DenseWeight::from_bytes(rows, cols, DType::F16, SharedBytes::from_vec(halves))));
    }
    let group = if group == 0 { cols } else { group };
    let ng = cols.div_ceil(group);
    let maxq = (1u32 << bits) - 1;
    let codes: Vec<u8> = (0..rows * cols).map(|_| (rng.next_u64() as u32 % (maxq + 1)) as u8).collect();
    let scales: Vec<f32> = (0..rows * ng).map(|_| half::f16::from_f32(0.01 + 0.01 * rng.f32().abs()).to_f32()).collect();
    let zeros: Vec<u8> = (0..rows * ng).map(|_| (rng.next_u64() as u32 % (maxq + 1)) as u8).collect();
    let parts = QuantParts { rows, cols, bits, group_size: group, codes: &codes, scales: &scales, zeros: &zeros, g_idx: None };
    if sparse24 {
        // Keep 2 random positions of every 4.
        let mut mask = vec![false; rows * cols];
        for r in 0..rows {
            for c0 in (0..cols).step_by(4) {
                let a = (rng.next_u64() % 4) as usize;
                let b = (a + 1 + (rng.next_u64() % 3) as usize) % 4;
                for p in [a, b] {
                    if c0 + p < cols {
                        mask[r * cols + c0 + p] = true;
                    }
                }
            }
        }
        Ok(Weight::Sparse24(Sparse24Weight::from_quantized(parts, &mask)?))
    } else {
        Ok(Weight::Packed(PackedWeight::new(parts)?))
    }
}

/// Whether `Weight::matmul_q8` runs an int8-activation kernel for `w` on this CPU (and so `matmul` on one token
/// the int16 one).
pub fn q8_kernel_for(w: &Weight) -> bool {
    match w {
        Weight::Packed(p) => p.q8_supported(),
        Weight::Sparse24(s) => s.q8_supported(),
        Weight::Dense(_) => false,
    }
}

/// Bytes a GEMV with `w` streams per call.
pub fn streamed_bytes(w: &Weight) -> usize {
    match w {
        Weight::Dense(d) => d.bytes().len(),
        Weight::Packed(p) => p.streamed_bytes(),
        Weight::Sparse24(s) => s.streamed_bytes(),
    }
}

/// How many copies of a `bytes`-sized weight to rotate through so the working set (≥ 256 MB) exceeds any
/// last-level cache this runs on.
pub fn copies_for(bytes: usize) -> usize {
    (256usize << 20).div_ceil(bytes.max(1)).clamp(1, 64)
}

/// Times single-token GEMVs of a random weight on `threads` threads and compares with the stream bandwidth measured
/// right before. `bits` 16 = dense f16 (the usual reference).
pub fn bench_gemv(
    shape: GemvShape,
    bits: u8,
    group: usize,
    sparse24: bool,
    threads: usize,
) -> Result<GemvReport, crate::KernelError> {
    bench_gemv_q8(shape, bits, group, sparse24, threads, false)
}

/// `bench_gemv`, with `q8` timing `Weight::matmul_q8` (int8 activations, VNNI) instead of `matmul`; the label then
/// says `q8` when a q8 kernel really ran.
pub fn bench_gemv_q8(
    shape: GemvShape,
    bits: u8,
    group: usize,
    sparse24: bool,
    threads: usize,
    q8: bool,
) -> Result<GemvReport, crate::KernelError> {
    let threads = threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| crate::KernelError::Unsupported(format!("thread pool: {e}")))?;
    let w = bench_weight(shape, bits, group, sparse24)?;
    let bytes = streamed_bytes(&w);
    let copies: Vec<Weight> = (0..copies_for(bytes)).map(|_| w.clone()).collect();
    let mm = |w: &Weight, x: &[f32], y: &mut [f32]| if q8 { w.matmul_q8(x, 1, y) } else { w.matmul(x, 1, y) };
    let q8_ran = q8 && q8_kernel_for(&w);
    let mut rng = SplitMix(7);
    let x: Vec<f32> = (0..shape.cols).map(|_| rng.f32()).collect();
    let mut y = vec![0.0f32; shape.rows];
    // This VM's memory bandwidth drifts by 10-20% within seconds (neighbours), so the stream read is measured in
    // rounds between the GEMV's timings, not once before them, and both figures are medians over the same span.
    let stream = StreamBuffer::new(256 << 20, threads);
    let mut streams = Vec::new();
    let mut times = Vec::new();
    pool.install(|| {
        for c in &copies {
            mm(c, &x, &mut y); // warm-up: page in, wake threads
        }
        let mut i = 0;
        for _ in 0..ROUNDS {
            streams.push(stream.best_gbps(threads, 2));
            let t_end = Instant::now() + std::time::Duration::from_millis(100);
            let before = times.len();
            while times.len() - before < 3 || (Instant::now() < t_end && times.len() - before < 300) {
                let t = Instant::now();
                mm(&copies[i % copies.len()], &x, &mut y);
                times.push(t.elapsed().as_secs_f64());
                i += 1;
            }
        }
    });
    std::hint::black_box(&y);
    let seconds = median(&mut times);
    let stream_gbps = median(&mut streams);
    let gbps = bytes as f64 / seconds / 1e9;
    let mut kind = if bits == 16 {
        "f16 dense".to_string()
    } else if sparse24 {
        format!("2:4 + int{bits} g{group}")
    } else {
        format!("int{bits} g{group}")
    };
    if q8_ran {
        kind.push_str(" q8");
    } else if q8_kernel_for(&w) {
        // `matmul` on one token runs the int16-activation kernel where the int8 one could run.
        kind.push_str(" q16");
    }
    Ok(GemvReport {
        seconds,
        bytes_read: bytes,
        gbps,
        stream_gbps,
        fraction_of_bandwidth: gbps / stream_gbps,
        bits_per_weight: w.resident_bytes() as f64 * 8.0 / (shape.rows * shape.cols) as f64,
        threads,
        isa: Isa::best(),
        label: format!("{kind} {}x{}", shape.rows, shape.cols),
    })
}
