//! GEMV kernels at LLaMA-7B MLP shapes (4096×11008 and 11008×4096): dense f16 (the reference), int4 with groups of
//! 128, and 2:4 sparse + int4, each int4 kind with exact f32 activations (`matmul`, the runtime default) and with
//! int8 activations (`matmul_q8`, VNNI, `_q8` labels). Criterion reports time and throughput; after it, a summary measured in the same run
//! prints each kernel's GB/s as a fraction of the stream-read bandwidth and its speedup over f16.
//!
//! `cargo bench --bench kernels` (threads: `WHITTLE_BENCH_THREADS`, default 2). Each layer is rotated over enough
//! copies (≥ 256 MB) that every call streams from DRAM, as decoding a model larger than the cache does.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;
use whittle_kernels::bench::{bench_weight, copies_for, streamed_bytes};
use whittle_kernels::{bench_gemv_q8, measure_stream_read_gbps, GemvShape, Weight};

const SHAPES: [GemvShape; 2] = [GemvShape { rows: 4096, cols: 11008 }, GemvShape { rows: 11008, cols: 4096 }];
/// (label, bits, group, 2:4, int8 activations): bits 16 = dense f16.
const KINDS: [(&str, u8, usize, bool, bool); 5] = [
    ("f16", 16, 0, false, false),
    ("int4_g128", 4, 128, false, false),
    ("int4_g128_q8", 4, 128, false, true),
    ("sparse24_int4_g128", 4, 128, true, false),
    ("sparse24_int4_g128_q8", 4, 128, true, true),
];

fn threads() -> usize {
    std::env::var("WHITTLE_BENCH_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(2)
}

fn gemv(c: &mut Criterion) {
    let threads = threads();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    let mut group = c.benchmark_group("gemv");
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for shape in SHAPES {
        let x: Vec<f32> = (0..shape.cols).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let mut y = vec![0.0f32; shape.rows];
        for (label, bits, g, sparse, q8) in KINDS {
            let w = bench_weight(shape, bits, g, sparse).expect("bench weight");
            let bytes = streamed_bytes(&w);
            let copies: Vec<Weight> = (0..copies_for(bytes)).map(|_| w.clone()).collect();
            group.throughput(Throughput::Bytes(bytes as u64));
            let mut i = 0usize;
            group.bench_function(format!("{label}/{}x{}", shape.rows, shape.cols), |b| {
                pool.install(|| {
                    b.iter(|| {
                        let w = &copies[i % copies.len()];
                        if q8 {
                            w.matmul_q8(&x, 1, &mut y)
                        } else {
                            w.matmul(&x, 1, &mut y)
                        }
                        i += 1;
                    })
                })
            });
        }
    }
    group.finish();

    // Ratios measured in this run: stream bandwidth first, then each kernel with the same thread count.
    let stream = pool.install(|| measure_stream_read_gbps(256 << 20, threads));
    println!("\nstream read: {stream:.1} GB/s on {threads} threads");
    for shape in SHAPES {
        let mut f16_s = None;
        for (_, bits, g, sparse, q8) in KINDS {
            match bench_gemv_q8(shape, bits, g, sparse, threads, q8) {
                Ok(r) => {
                    let speedup = f16_s.map(|s: f64| format!(", {:.2}x f16", s / r.seconds)).unwrap_or_default();
                    if bits == 16 {
                        f16_s = Some(r.seconds);
                    }
                    println!("{r}{speedup}");
                }
                Err(e) => println!("{}x{} bits {bits}: {e}", shape.rows, shape.cols),
            }
        }
    }
}

criterion_group!(benches, gemv);
criterion_main!(benches);
