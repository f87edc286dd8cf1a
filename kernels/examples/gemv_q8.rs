//! `cargo run --release -p whittle-kernels --example gemv_q8 [threads]`: int4 g128 GEMV, the default single-token
//! path (int16 activations on VNNI CPUs) vs int8 activations.
use whittle_kernels::{bench_gemv_q8, GemvShape};

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    for shape in [GemvShape { rows: 4096, cols: 11008 }, GemvShape { rows: 11008, cols: 4096 }] {
        for (sparse, q8) in [(false, false), (false, true), (true, false), (true, true)] {
            match bench_gemv_q8(shape, 4, 128, sparse, threads, q8) {
                Ok(r) => println!("{r}"),
                Err(e) => println!("{}x{}: {e}", shape.rows, shape.cols),
            }
        }
    }
}
