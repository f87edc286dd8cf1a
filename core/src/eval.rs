//! Evaluation with the protocol of the issues (shared/fixtures/stories260k/README.md): tokenize the whole text once
//! without BOS, keep the first `max_tokens`, cut into non-overlapping windows of `ctx` (a trailing partial window is
//! dropped), average next-token NLL over positions 1..ctx-1 of each window; ppl = exp(mean). With a reference model,
//! also the mean KL(p_ref ‖ p) over the same positions (nats) and top-1 agreement. Windows run in parallel.

use crate::error::{Result, WhittleError};
use crate::model::{Model, Scratch};
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub ppl: f64,
    pub kl: Option<f64>,
    pub top1: Option<f64>,
    pub tokens: usize,
    pub windows: usize,
    pub seconds: f64,
}

/// Reads a UTF-8 text file, naming the file and the byte offset when it is not UTF-8.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| WhittleError::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        WhittleError::file(path, format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()))
    })
}

/// Cuts `tokens` (first `max_tokens`) into windows of `ctx`.
pub fn windows(tokens: &[u32], ctx: usize, max_tokens: Option<usize>) -> Vec<&[u32]> {
    let n = max_tokens.map_or(tokens.len(), |m| m.min(tokens.len()));
    tokens[..n].chunks_exact(ctx).collect()
}

/// Checks `ctx` against the model and the text before any work starts.
pub fn check_ctx(model: &Model, ctx: usize, n_windows: usize, what: &str) -> Result<()> {
    if ctx < 2 {
        return Err(WhittleError::Invalid(format!("--ctx {ctx}: a window needs at least 2 tokens")));
    }
    if ctx > model.config.max_position_embeddings {
        return Err(WhittleError::Invalid(format!(
            "--ctx {ctx} is larger than the model's max_position_embeddings ({}) in config.json",
            model.config.max_position_embeddings
        )));
    }
    if n_windows == 0 {
        return Err(WhittleError::Invalid(format!("{what}: text is shorter than one window of {ctx} tokens")));
    }
    Ok(())
}

/// Logits `[len, vocab]` of one window run from an empty cache.
pub fn window_logits(model: &Model, window: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    let mut scratch = Scratch::default();
    model.forward(window, &mut cache, &mut scratch, window.len())
}

/// log-softmax of one row, in f64 for the sums (vocabularies reach 150k entries).
pub fn log_softmax(row: &[f32], out: &mut Vec<f64>) {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    out.clear();
    out.extend(row.iter().map(|&x| x as f64 - lse));
}

#[derive(Default, Clone, Copy)]
struct Sums {
    nll: f64,
    kl: f64,
    agree: usize,
    count: usize,
}

/// Evaluates `model` on `windows`; `reference` adds KL and top-1. `progress(done, total)` after each window;
/// `cancelled` is polled between windows.
pub fn evaluate(
    model: &Model,
    reference: Option<&Model>,
    windows: &[&[u32]],
    progress: &(dyn Fn(usize, usize) + Sync),
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<EvalReport> {
    let start = std::time::Instant::now();
    let vocab = model.config.vocab_size;
    if let Some(r) = reference {
        if r.config.vocab_size != vocab {
            return Err(WhittleError::Invalid(format!(
                "reference model vocab_size {} differs from the model's {vocab}",
                r.config.vocab_size
            )));
        }
    }
    let done = AtomicUsize::new(0);
    let total = windows.len();
    let per_window: Vec<Option<Sums>> = windows
        .par_iter()
        .map(|w| {
            if cancelled() {
                return None;
            }
            let logits = window_logits(model, w);
            let ref_logits = reference.map(|r| window_logits(r, w));
            let mut s = Sums::default();
            let (mut lp, mut lq) = (Vec::new(), Vec::new());
            for t in 0..w.len() - 1 {
                let row = &logits[t * vocab..(t + 1) * vocab];
                log_softmax(row, &mut lp);
                s.nll -= lp[w[t + 1] as usize];
                if let Some(rl) = &ref_logits {
                    let rrow = &rl[t * vocab..(t + 1) * vocab];
                    log_softmax(rrow, &mut lq);
                    s.kl += lq.iter().zip(&lp).map(|(q, p)| q.exp() * (q - p)).sum::<f64>();
                    if crate::model::generate::argmax(row) == crate::model::generate::argmax(rrow) {
                        s.agree += 1;
                    }
                }
                s.count += 1;
            }
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
            Some(s)
        })
        .collect();
    let mut sum = Sums::default();
    for s in per_window {
        let s = s.ok_or(WhittleError::Cancelled)?;
        sum.nll += s.nll;
        sum.kl += s.kl;
        sum.agree += s.agree;
        sum.count += s.count;
    }
    let c = sum.count.max(1) as f64;
    Ok(EvalReport {
        ppl: (sum.nll / c).exp(),
        kl: reference.map(|_| sum.kl / c),
        top1: reference.map(|_| sum.agree as f64 / c),
        tokens: windows.iter().map(|w| w.len()).sum(),
        windows: windows.len(),
        seconds: start.elapsed().as_secs_f64(),
    })
}
