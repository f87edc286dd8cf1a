//! `cargo run --release -p whittle-kernels --example q8_warm [threads] [rows cols]`: cache-warm GEMV time of the
//! default single-token path (int16 activations on VNNI CPUs, else f32) and the int8-activation path on N threads
//! (scaling check independent of DRAM).
use std::time::Instant;
use whittle_kernels::bench::{bench_weight, q8_kernel_for};
use whittle_kernels::GemvShape;

fn main() {
    let a: Vec<usize> = std::env::args().skip(1).filter_map(|s| s.parse().ok()).collect();
    let threads = a.first().copied().unwrap_or(2);
    let shape = match a[..] {
        [_, rows, cols] => GemvShape { rows, cols },
        _ => GemvShape { rows: 1024, cols: 11008 },
    };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    for sparse in [false, true] {
        let w = bench_weight(shape, 4, 128, sparse).unwrap();
        let x: Vec<f32> = (0..shape.cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = vec![0.0; shape.rows];
        for q8 in [false, true] {
            let best = pool.install(|| {
                let mut best = f64::MAX;
                for _ in 0..200 {
                    let t = Instant::now();
                    if q8 { w.matmul_q8(&x, 1, &mut y) } else { w.matmul(&x, 1, &mut y) }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                best
            });
            let gw = (shape.rows * shape.cols) as f64 / best / 1e9;
            let kind = if q8 { "q8" } else if q8_kernel_for(&w) { "q16 (default)" } else { "f32 (default)" };
            println!("{}x{} sparse={sparse} {kind} threads={threads}: {:.1} µs, {gw:.1} Gweights/s", shape.rows, shape.cols, best * 1e6);
        }
    }
}
