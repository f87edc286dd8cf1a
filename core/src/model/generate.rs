//! Token generation: greedy or temperature + top-p sampling with a seeded RNG, stopping on EOS ids, streaming each
//! token to a callback (the CLI prints it, the chat pane appends it).

use super::kv_cache::{KvCache, Scratch};
use super::llama::Model;
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    Greedy,
    TopP { temperature: f32, top_p: f32, seed: u64 },
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub stop_ids: Vec<u32>,
}

pub struct Generated {
    pub ids: Vec<u32>,
    pub seconds: f64,
    /// Time of the decode steps only (after the prompt's prefill).
    pub decode_seconds: f64,
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Samples from softmax(logits / T) restricted to the smallest set of tokens whose probability reaches `top_p`.
pub fn sample_top_p(logits: &[f32], temperature: f32, top_p: f32, rng: &mut StdRng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> =
        logits.iter().enumerate().map(|(i, l)| (i as u32, ((l - max) / temperature).exp())).collect();
    let sum: f32 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= sum);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut cum = 0.0;
    let mut keep = probs.len();
    for (i, p) in probs.iter().enumerate() {
        cum += p.1;
        if cum >= top_p {
            keep = i + 1;
            break;
        }
    }
    let kept = &probs[..keep];
    let total: f32 = kept.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f32>() * total;
    for p in kept {
        r -= p.1;
        if r <= 0.0 {
            return p.0;
        }
    }
    kept[kept.len() - 1].0
}

/// Generates after `prompt` (which must be non-empty). `on_token` returns false to stop early.
pub fn generate(model: &Model, prompt: &[u32], opts: &GenerateOptions, on_token: &mut dyn FnMut(u32) -> bool) -> Generated {
    let start = std::time::Instant::now();
    let mut cache: KvCache = model.new_cache();
    let mut scratch = Scratch::default();
    let mut rng = match opts.sampling {
        Sampling::TopP { seed, .. } => StdRng::seed_from_u64(seed),
        Sampling::Greedy => StdRng::seed_from_u64(0),
    };
    let max_pos = model.config.max_position_embeddings;
    let mut ids = Vec::new();
    let mut logits = model.forward(prompt, &mut cache, &mut scratch, 1);
    let decode_start = std::time::Instant::now();
    for _ in 0..opts.max_new_tokens {
        let next = match opts.sampling {
            Sampling::Greedy => argmax(&logits),
            Sampling::TopP { temperature, top_p, .. } => sample_top_p(&logits, temperature, top_p, &mut rng),
        };
        ids.push(next);
        if opts.stop_ids.contains(&next) || !on_token(next) || cache.len >= max_pos {
            break;
        }
        logits = model.forward(&[next], &mut cache, &mut scratch, 1);
    }
    Generated { ids, seconds: start.elapsed().as_secs_f64(), decode_seconds: decode_start.elapsed().as_secs_f64() }
}
