//! Test fixtures: random layers whose Hessian is ill-conditioned like real activations'. Inputs are x = A z with z
//! standard normal and A a random mixing with log-normal channel scales, so channels are correlated and their
//! magnitudes differ by orders (a diagonal-dominant H would make GPTQ ≈ RTN and the comparisons toothless).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Hessian, HessianAccumulator, Matrix};

/// One standard normal sample (Box–Muller; rand 0.9 without rand_distr has no Gaussian).
pub fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Inputs x = A z with A = diag(scale) · (I + mix·G/√c), scale_i = exp(scale_sigma · N(0,1)); with the defaults
/// the coupling is strong and the condition number of H in the thousands.
pub fn inputs_with(cols: usize, samples: usize, scale_sigma: f32, mix: f32, rng: &mut StdRng) -> Vec<f32> {
    let scale: Vec<f32> = (0..cols).map(|_| (scale_sigma * normal(rng)).exp()).collect();
    let g = mix / (cols as f32).sqrt();
    let mut a = vec![0f32; cols * cols];
    for i in 0..cols {
        for j in 0..cols {
            let base = if i == j { 1.0 } else { 0.0 };
            a[i * cols + j] = scale[i] * (base + g * normal(rng));
        }
    }
    let mut x = vec![0f32; samples * cols];
    let mut z = vec![0f32; cols];
    for t in 0..samples {
        z.iter_mut().for_each(|v| *v = normal(rng));
        for i in 0..cols {
            x[t * cols + i] = a[i * cols..(i + 1) * cols].iter().zip(&z).map(|(p, q)| p * q).sum();
        }
    }
    x
}

/// A random `rows × cols` weight (normal, a few outliers) and the Hessian of `4·cols` correlated inputs.
pub fn layer(rows: usize, cols: usize, seed: u64) -> (Matrix, Hessian) {
    layer_with(rows, cols, seed, 1.0, 0.9)
}

/// [`layer`] with the input distribution's channel-scale spread and mixing strength chosen (see [`inputs_with`]).
pub fn layer_with(rows: usize, cols: usize, seed: u64, scale_sigma: f32, mix: f32) -> (Matrix, Hessian) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = Matrix::zeros(rows, cols);
    for v in &mut w.data {
        *v = 0.05 * normal(&mut rng);
        if rng.random::<f32>() < 0.01 {
            *v *= 8.0;
        }
    }
    let samples = 4 * cols;
    let x = inputs_with(cols, samples, scale_sigma, mix, &mut rng);
    let mut acc = HessianAccumulator::new(cols);
    acc.add_batch(&x, samples).expect("finite inputs");
    (w, acc.finish())
}
