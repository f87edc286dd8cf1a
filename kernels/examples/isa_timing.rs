//! Per-ISA kernel timing on one thread with the weight reused (cache-warm where it fits), to compare code paths
//! independently of DRAM: `cargo run --release -p whittle-kernels --example isa_timing`.

use std::time::Instant;
use whittle_kernels::bench::bench_weight;
use whittle_kernels::{GemvShape, Isa, Weight};

fn main() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    pool.install(|| {
        // Optional `rows cols` arguments replace the two default shapes.
        let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
        let shapes = match args[..] {
            [rows, cols] => vec![GemvShape { rows, cols }],
            _ => vec![GemvShape { rows: 4096, cols: 11008 }, GemvShape { rows: 11008, cols: 4096 }],
        };
        for shape in shapes {
            for (bits, group, sparse) in [(16u8, 0usize, false), (4, 128, false), (4, 128, true)] {
                let w = bench_weight(shape, bits, group, sparse).unwrap();
                let x: Vec<f32> = (0..shape.cols).map(|i| (i as f32 * 0.37).sin()).collect();
                let mut y = vec![0.0; shape.rows];
                for isa in Isa::available() {
                    let mut best = f64::MAX;
                    for _ in 0..if isa == Isa::Scalar { 2 } else { 15 } {
                        let t = Instant::now();
                        match &w {
                            Weight::Dense(d) => d.matmul_isa(isa, &x, 1, &mut y),
                            Weight::Packed(p) => p.matmul_isa(isa, &x, 1, &mut y),
                            Weight::Sparse24(s) => s.matmul_isa(isa, &x, 1, &mut y),
                        }
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    report(shape, bits, sparse, isa.name(), best, &w);
                }
                if whittle_kernels::bench::q8_kernel_for(&w) {
                    let mut best = f64::MAX;
                    for _ in 0..15 {
                        let t = Instant::now();
                        w.matmul_q8(&x, 1, &mut y);
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    report(shape, bits, sparse, "q8", best, &w);
                }
            }
        }
    });
}

fn report(shape: GemvShape, bits: u8, sparse: bool, isa: &str, best: f64, w: &Weight) {
    let bytes = whittle_kernels::bench::streamed_bytes(w);
    println!(
        "{}x{} bits {bits} sparse {sparse} {:>6}: {:.3} ms {:.1} GB/s {:.1} Gweights/s",
        shape.rows,
        shape.cols,
        isa,
        best * 1e3,
        bytes as f64 / best / 1e9,
        (shape.rows * shape.cols) as f64 / best / 1e9
    );
}
