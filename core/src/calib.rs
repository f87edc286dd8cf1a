//! Calibration data: token windows from a text, and the Hessians of a decoder block's linear inputs collected by
//! running those windows through the block. Windows run in parallel in small chunks and each chunk's inputs are
//! folded into the Hessian at once, so only a chunk of activations is alive, never the whole model's.

use crate::compress::{Hessian, HessianAccumulator};
use crate::error::{Result, WhittleError};
use crate::model::kv_cache::LayerCache;
use crate::model::{Model, Scratch, Site, Tokenizer};
use rayon::prelude::*;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CalibSettings {
    /// Number of windows.
    pub samples: usize,
    /// Tokens per window.
    pub ctx: usize,
}

impl Default for CalibSettings {
    fn default() -> Self {
        Self { samples: 128, ctx: 256 }
    }
}

/// The first `samples` non-overlapping windows of `ctx` tokens of `text` (tokenized without BOS).
pub fn calibration_windows(tok: &Tokenizer, text: &str, s: &CalibSettings, origin: &str) -> Result<Vec<Vec<u32>>> {
    if s.samples == 0 || s.ctx < 2 {
        return Err(WhittleError::Invalid(format!(
            "calibration needs at least 1 window of at least 2 tokens (--calib-samples {}, --calib-ctx {})",
            s.samples, s.ctx
        )));
    }
    let ids = tok.encode(text)?;
    let windows: Vec<Vec<u32>> = ids.chunks_exact(s.ctx).take(s.samples).map(<[u32]>::to_vec).collect();
    if windows.is_empty() {
        return Err(WhittleError::Invalid(format!(
            "calibration text {origin} has {} tokens, shorter than one window of {} (--calib-ctx)",
            ids.len(),
            s.ctx
        )));
    }
    Ok(windows)
}

/// Windows run in parallel per chunk; bounded so a 7B layer's activations stay small.
const CHUNK: usize = 8;

/// Runs block `layer` on every window's hidden state `xs[i]` (`[ctx, hidden]`). With `update`, the states are
/// replaced by the block's outputs; `observe` receives the input of `site` for each window.
pub fn run_block(
    model: &Model,
    layer: usize,
    xs: &mut [Vec<f32>],
    update: bool,
    site: Option<Site>,
    observe: &mut dyn FnMut(&[f32], usize) -> Result<()>,
) -> Result<()> {
    let block = &model.blocks[layer];
    for chunk in xs.chunks_mut(CHUNK) {
        let captured: Vec<Option<Vec<f32>>> = chunk
            .par_iter_mut()
            .map(|x| {
                let n = x.len() / model.config.hidden_size;
                let mut s = Scratch::default();
                model.rope.tables(0, n, &mut s.cos, &mut s.sin);
                let mut cache = LayerCache { k: Vec::new(), v: Vec::new() };
                let mut got = None;
                let mut obs = |_: usize, at: Site, input: &[f32], _: usize| {
                    if Some(at) == site {
                        got = Some(input.to_vec());
                        return !update;
                    }
                    false
                };
                if update {
                    model.block_forward(layer, block, x, n, 0, &mut cache, &mut s, Some(&mut obs));
                } else {
                    let mut tmp = x.clone();
                    model.block_forward(layer, block, &mut tmp, n, 0, &mut cache, &mut s, Some(&mut obs));
                }
                got
            })
            .collect();
        for (c, x) in captured.into_iter().zip(chunk.iter()) {
            if let Some(c) = c {
                observe(&c, x.len() / model.config.hidden_size)?;
            }
        }
    }
    Ok(())
}

/// The Hessian of the inputs of `site` in block `layer`.
pub fn collect_hessian(model: &Model, layer: usize, xs: &mut [Vec<f32>], site: Site, cols: usize) -> Result<Hessian> {
    let mut acc = HessianAccumulator::new(cols);
    run_block(model, layer, xs, false, Some(site), &mut |input, n| {
        acc.add_batch(input, n).map_err(|e| {
            WhittleError::Invalid(format!("calibration inputs of layer {layer} ({site:?}): {e}"))
        })
    })?;
    Ok(acc.finish())
}
