//! Quick GEMV throughput check without criterion: `cargo run --release -p whittle-kernels --example gemv [threads]`.
//! Prints each kernel's GB/s and its fraction of the stream-read bandwidth measured in the same run.

use whittle_kernels::{bench_gemv, GemvShape};

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    for shape in [GemvShape { rows: 4096, cols: 11008 }, GemvShape { rows: 11008, cols: 4096 }] {
        for (bits, group, sparse) in [(16u8, 0usize, false), (4, 128, false), (4, 128, true)] {
            match bench_gemv(shape, bits, group, sparse, threads) {
                Ok(r) => println!("{r}"),
                Err(e) => println!("{}x{} bits {bits}: {e}", shape.rows, shape.cols),
            }
        }
    }
}
