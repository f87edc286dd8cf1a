//! GPTQ and Hessian accumulation at LLaMA-7B layer sizes, reported as seconds and as a fraction of the faer GEMM
//! rate measured in the same run (so the ratio, not the machine, is the figure of merit).
//!
//! Flop model (GEMM-equivalent, 2 flops per multiply-add):
//! * GPTQ of an r×c layer = r·c² for the error-feedback updates (each of the c(c−1)/2 pairs (quantized column j,
//!   later column k) costs one multiply-add per row) + 2c³/3 for the Cholesky factorization and the triangular
//!   inverse (c³/3 each, done in f64). Quantization/rounding work (O(r·c)) is not counted.
//! * Hessian accumulation of n tokens × c features = n·c² (the lower triangle of XᵀX, c(c+1)/2 dot products of
//!   length n), done in f64; compared with both the f64 and the f32 GEMM rate.
//! * GEMM reference: C += A·B, 2·m·k·n flops, the same faer call GPTQ's trailing update uses.
//!
//! Run: `cargo bench --bench gptq`. Criterion: 10 flat samples per case (the machine may have only 2 cores).

use std::cell::RefCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use whittle_core::compress::linalg::{gemm_f32, gemm_f64};
use whittle_core::compress::{Compressor, Gptq, Hessian, HessianAccumulator, Matrix, QuantSpec};

const TOKENS: usize = 8192;
const HIDDEN: usize = 4096;
const INTERMEDIATE: usize = 11008;
/// Rank of the shared structure of the synthetic activations (plus independent noise): correlated like real ones.
const LATENT: usize = 512;

fn normals(n: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = rng.random();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect()
}

/// `tokens × c` activations: low-rank correlated part Z·A, log-normal channel scales, 10% independent noise.
fn activations(tokens: usize, c: usize, rng: &mut StdRng) -> Vec<f32> {
    let z = normals(tokens * LATENT, rng);
    let a: Vec<f32> = normals(LATENT * c, rng).iter().map(|v| v / (LATENT as f32).sqrt()).collect();
    let mut x = normals(tokens * c, rng);
    x.iter_mut().for_each(|v| *v *= 0.1);
    gemm_f32(&mut x, &z, &a, tokens, LATENT, c, 1.0);
    let scale: Vec<f32> = normals(c, rng).iter().map(|v| (0.7 * v).exp()).collect();
    for row in x.chunks_mut(c) {
        row.iter_mut().zip(&scale).for_each(|(v, s)| *v *= s);
    }
    x
}

fn hessian(x: &[f32], c: usize) -> Hessian {
    let mut acc = HessianAccumulator::new(c);
    for batch in x.chunks(1024 * c) {
        acc.add_batch(batch, batch.len() / c).expect("finite activations");
    }
    acc.finish()
}

/// Run `routine` under criterion and also keep the per-iteration times, so ratios use criterion's own samples.
fn measure(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, name: &str, mut routine: impl FnMut()) -> f64 {
    let times = RefCell::new(Vec::new());
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                routine();
            }
            let d = start.elapsed();
            times.borrow_mut().push(d.as_secs_f64() / iters as f64);
            d
        })
    });
    let mut t = times.into_inner();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

fn gptq_flops(r: usize, c: usize) -> f64 {
    let (r, c) = (r as f64, c as f64);
    r * c * c + 2.0 * c * c * c / 3.0
}

fn bench(crit: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0);
    let mut group = crit.benchmark_group("gptq");
    group.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_millis(500));

    // Reference rates: the faer GEMMs.
    let n = HIDDEN;
    let a = normals(n * n, &mut rng);
    let b = normals(n * n, &mut rng);
    let mut c = vec![0f32; n * n];
    let t = measure(&mut group, "gemm_f32_4096", || gemm_f32(black_box(&mut c), &a, &b, n, n, n, 1.0));
    let gemm32 = 2.0 * (n as f64).powi(3) / t;
    let m = 2048;
    let a64: Vec<f64> = a[..m * m].iter().map(|&v| v as f64).collect();
    let b64: Vec<f64> = b[..m * m].iter().map(|&v| v as f64).collect();
    let mut c64 = vec![0f64; m * m];
    let t = measure(&mut group, "gemm_f64_2048", || gemm_f64(black_box(&mut c64), &a64, &b64, m, m, m, 1.0));
    let gemm64 = 2.0 * (m as f64).powi(3) / t;
    drop((a, b, c, a64, b64, c64));

    let x = activations(TOKENS, HIDDEN, &mut rng);
    let t = measure(&mut group, "hessian_8192x4096", || {
        black_box(hessian(&x, HIDDEN));
    });
    let hflops = TOKENS as f64 * (HIDDEN as f64).powi(2);
    let hess_line = format!(
        "hessian {TOKENS} tokens × {HIDDEN}: {t:.3} s, {:.1} GFLOP/s = {:.0}% of f64 GEMM, {:.0}% of f32 GEMM",
        hflops / t / 1e9,
        100.0 * hflops / t / gemm64,
        100.0 * hflops / t / gemm32
    );
    let h = hessian(&x, HIDDEN);
    drop(x);

    let spec = QuantSpec { bits: 4, group: Some(128), sym: true, act_order: false, static_groups: false, mse: false };
    let mut lines = vec![
        format!("f32 GEMM 4096³: {:.1} GFLOP/s", gemm32 / 1e9),
        format!("f64 GEMM 2048³: {:.1} GFLOP/s", gemm64 / 1e9),
        hess_line,
    ];
    for rows in [HIDDEN, INTERMEDIATE] {
        let w = Matrix::from_vec(rows, HIDDEN, normals(rows * HIDDEN, &mut rng).iter().map(|v| 0.02 * v).collect());
        let gptq = Gptq::new(spec.clone());
        let t = measure(&mut group, &format!("gptq_w4g128_{rows}x{HIDDEN}"), || {
            black_box(gptq.compress(&w, &h, &|| false).expect("gptq"));
        });
        let f = gptq_flops(rows, HIDDEN);
        lines.push(format!(
            "GPTQ w4 g128 {rows}×{HIDDEN}: {t:.3} s, {:.1} GFLOP/s = {:.0}% of f32 GEMM (r·c² + 2c³/3 = {:.1} GFLOP)",
            f / t / 1e9,
            100.0 * f / t / gemm32,
            f / 1e9
        ));
    }
    group.finish();
    println!("\n== GPTQ bench summary (median of criterion samples) ==");
    for l in lines {
        println!("{l}");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
