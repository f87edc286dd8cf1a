//! Calibration data: token windows from a text, and the Hessians of a decoder block's linear inputs collected by
//! running those windows through the block. Windows run in parallel in small chunks and each chunk's inputs are
//! folded into the Hessian at once, so only a chunk of activations is alive, never the whole model's.

use crate::compress::error_feedback::CrossAccumulator;
use crate::compress::{Hessian, HessianAccumulator};
use crate::error::{Result, WhittleError};
use crate::model::kv_cache::LayerCache;
use crate::model::{Block, Model, Scratch, Site, Tokenizer};
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
    run_block_with(model, &model.blocks[layer], layer, xs, update, site, &mut |_, input, n| observe(input, n))
}

/// `run_block` with an explicit block (e.g. the dense original of a block being compressed); `observe` also gets
/// the window index.
pub fn run_block_with(
    model: &Model,
    block: &Block,
    layer: usize,
    xs: &mut [Vec<f32>],
    update: bool,
    site: Option<Site>,
    observe: &mut dyn FnMut(usize, &[f32], usize) -> Result<()>,
) -> Result<()> {
    for (ci, chunk) in xs.chunks_mut(CHUNK).enumerate() {
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
        for (i, (c, x)) in captured.into_iter().zip(chunk.iter()).enumerate() {
            if let Some(c) = c {
                observe(ci * CHUNK + i, &c, x.len() / model.config.hidden_size)?;
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

/// The Hessian of `site`'s inputs on the compressed path `xs`, and the cross term D = 2/n Σ (x_d − x_q) x_qᵀ
/// against the dense path `xs_dense` run through the dense `dense_block` (see `compress::error_feedback`).
/// Windows are paired by index; both paths hold one chunk of activations at a time.
pub fn collect_hessian_and_cross(
    model: &Model,
    layer: usize,
    xs: &mut [Vec<f32>],
    xs_dense: &mut [Vec<f32>],
    dense_block: &Block,
    site: Site,
    cols: usize,
) -> Result<(Hessian, Vec<f64>)> {
    let mut acc = HessianAccumulator::new(cols);
    let mut cross = CrossAccumulator::new(cols);
    let err = |e: crate::compress::CompressError| WhittleError::Invalid(format!("calibration inputs of layer {layer} ({site:?}): {e}"));
    for (q_chunk, d_chunk) in xs.chunks_mut(CHUNK).zip(xs_dense.chunks_mut(CHUNK)) {
        let mut dense_inputs: Vec<Vec<f32>> = Vec::with_capacity(CHUNK);
        run_block_with(model, dense_block, layer, d_chunk, false, Some(site), &mut |_, input, _| {
            dense_inputs.push(input.to_vec());
            Ok(())
        })?;
        let mut i = 0;
        run_block_with(model, &model.blocks[layer], layer, q_chunk, false, Some(site), &mut |_, input, n| {
            acc.add_batch(input, n).map_err(err)?;
            cross.add_batch(input, &dense_inputs[i], n).map_err(err)?;
            i += 1;
            Ok(())
        })?;
    }
    Ok((acc.finish(), cross.finish()))
}
