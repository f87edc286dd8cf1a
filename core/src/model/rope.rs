//! Rotary position embedding in the Hugging Face convention (`rotate_half`: dimension i pairs with i + head_dim/2),
//! with the Llama 3.1 and linear frequency scalings. Cos/sin are computed per forward call for the positions it
//! covers, so no table sized by max_position_embeddings (131k for Llama 3) is kept.

use super::config::{ModelConfig, RopeScaling};

#[derive(Clone)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let half = cfg.head_dim / 2;
        let mut inv_freq: Vec<f64> =
            (0..half).map(|j| 1.0 / cfg.rope_theta.powf(2.0 * j as f64 / cfg.head_dim as f64)).collect();
        match cfg.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                // transformers' _compute_llama3_parameters.
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Self { inv_freq: inv_freq.into_iter().map(|f| f as f32).collect() }
    }

    /// (cos, sin) tables `[n, head_dim/2]` for positions pos0..pos0+n.
    pub fn tables(&self, pos0: usize, n: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        let half = self.inv_freq.len();
        cos.clear();
        sin.clear();
        for t in 0..n {
            let p = (pos0 + t) as f32;
            for &f in &self.inv_freq {
                // The angle is computed in f32 like transformers' default (inv_freq f32 × position f32).
                let a = p * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        debug_assert_eq!(cos.len(), n * half);
    }

    /// Rotates `heads` heads of one token in place.
    #[inline]
    pub fn apply(x: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = head_dim / 2;
        for h in 0..heads {
            let v = &mut x[h * head_dim..(h + 1) * head_dim];
            for j in 0..half {
                let (a, b) = (v[j], v[j + half]);
                v[j] = a * cos[j] - b * sin[j];
                v[j + half] = b * cos[j] + a * sin[j];
            }
        }
    }
}
