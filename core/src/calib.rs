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

/// Bytes the captured site inputs of one chunk of windows may take on both paths.
const CHUNK_BYTES: usize = 64 << 20;

/// Windows run in parallel per chunk: 8, or fewer where the captured inputs of wide layers would pass
/// [`CHUNK_BYTES`] (a 7B MLP input at 512 tokens is 22.5 MB per window and path), but never fewer than the cores.
/// Hessians add windows in window order whatever the chunk, so it changes memory and scheduling, not results.
pub(crate) fn chunk_windows(width: usize, ctx: usize, cores: usize) -> usize {
    let per_window = (ctx * width * 4 * 2).max(1);
    (CHUNK_BYTES / per_window).clamp(cores.clamp(1, 8), 8)
}

fn chunk_for(model: &Model, xs: &[Vec<f32>]) -> usize {
    let d = model.config.hidden_size;
    let ctx = xs.iter().map(|x| x.len() / d).max().unwrap_or(0);
    chunk_windows(d.max(model.config.intermediate_size), ctx, rayon::current_num_threads())
}

/// Attention outputs of the current layer, one slot per calibration window, filled by the first pass that computes
/// them. Attention depends only on q/k/v, which the first stage of a layer fixes, so the later stages and the update
/// restart from it (`Model::block_forward_from_attention`) instead of recomputing the most expensive part of the
/// block three more times. Reset for every layer and path.
pub struct AttnCache {
    slots: Vec<Option<Vec<f32>>>,
}

impl AttnCache {
    /// Largest cache kept (per path): beyond it (long calibration of big models) attention is recomputed instead,
    /// so streaming compression keeps its memory bound.
    pub const MAX_BYTES: usize = 512 << 20;

    /// A cache for `windows` windows, or `None` when `bytes` of attention outputs would exceed [`Self::MAX_BYTES`].
    pub fn new(windows: usize, bytes: usize) -> Option<Self> {
        (bytes <= Self::MAX_BYTES).then(|| AttnCache { slots: vec![None; windows] })
    }

    /// Forgets the outputs (a new layer starts).
    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(|s| *s = None);
    }

    /// The slots, one per window, as `run_block_with` takes them.
    pub fn slots(&mut self) -> &mut AttnSlots {
        &mut self.slots
    }
}

/// Receives (window index, the site's input `[n, width]`, n) for each window.
pub type WindowObserver<'a> = dyn FnMut(usize, &[f32], usize) -> Result<()> + 'a;

/// One attention slot per calibration window (see [`AttnCache`]).
pub type AttnSlots = [Option<Vec<f32>>];

/// The slots of an optional cache.
pub fn slots_of(c: &mut Option<AttnCache>) -> Option<&mut AttnSlots> {
    c.as_mut().map(AttnCache::slots)
}

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
    run_block_with(model, &model.blocks[layer], layer, xs, update, site, None, &mut |_, input, n| observe(input, n))
}

/// `run_block` with an explicit block (e.g. the dense original of a block being compressed) and an optional
/// attention cache for this block and path (`xs[i]` uses slot `i`); `observe` also gets the window index.
#[allow(clippy::too_many_arguments)]
pub fn run_block_with(
    model: &Model,
    block: &Block,
    layer: usize,
    xs: &mut [Vec<f32>],
    update: bool,
    site: Option<Site>,
    attn: Option<&mut AttnSlots>,
    observe: &mut WindowObserver<'_>,
) -> Result<()> {
    // Stopping at the attention input computes no attention, so there is nothing to keep.
    let past_attention = site != Some(Site::AttnIn);
    let qd = model.config.q_dim();
    let caching = attn.is_some();
    let mut no_slots: Vec<Option<Vec<f32>>> = Vec::new();
    let slots: &mut [Option<Vec<f32>>] = match attn {
        Some(slots) => slots,
        None => {
            no_slots.resize(xs.len(), None);
            &mut no_slots
        }
    };
    let chunk_len = chunk_for(model, xs);
    for (ci, (chunk, slot_chunk)) in xs.chunks_mut(chunk_len).zip(slots.chunks_mut(chunk_len)).enumerate() {
        let captured: Vec<Option<Vec<f32>>> = chunk
            .par_iter_mut()
            .zip(slot_chunk.par_iter_mut())
            .map(|(x, slot)| {
                let n = x.len() / model.config.hidden_size;
                let mut s = Scratch::default();
                let mut got = None;
                let mut obs = |_: usize, at: Site, input: &[f32], _: usize| {
                    if Some(at) == site {
                        got = Some(input.to_vec());
                        return !update;
                    }
                    false
                };
                let mut tmp;
                let state = if update {
                    &mut *x
                } else {
                    tmp = x.clone();
                    &mut tmp
                };
                match slot.as_deref() {
                    Some(a) if past_attention => {
                        model.block_forward_from_attention(layer, block, state, n, a, &mut s, Some(&mut obs))
                    }
                    _ => {
                        model.rope.tables(0, n, &mut s.cos, &mut s.sin);
                        let mut cache = LayerCache { k: Vec::new(), v: Vec::new() };
                        model.block_forward(layer, block, state, n, 0, &mut cache, &mut s, Some(&mut obs));
                        if caching && past_attention {
                            *slot = Some(s.attn[..n * qd].to_vec());
                        }
                    }
                }
                got
            })
            .collect();
        for (i, (c, x)) in captured.into_iter().zip(chunk.iter()).enumerate() {
            if let Some(c) = c {
                observe(ci * chunk_len + i, &c, x.len() / model.config.hidden_size)?;
            }
        }
    }
    Ok(())
}

/// The Hessian of the inputs of `site` in block `layer`.
pub fn collect_hessian(
    model: &Model,
    layer: usize,
    xs: &mut [Vec<f32>],
    attn: Option<&mut AttnSlots>,
    site: Site,
    cols: usize,
) -> Result<Hessian> {
    let mut acc = HessianAccumulator::new(cols);
    run_block_with(model, &model.blocks[layer], layer, xs, false, Some(site), attn, &mut |_, input, n| {
        acc.add_batch(input, n).map_err(|e| {
            WhittleError::Invalid(format!("calibration inputs of layer {layer} ({site:?}): {e}"))
        })
    })?;
    Ok(acc.finish())
}

/// The Hessian of `site`'s inputs on the compressed path `xs`, and the cross term D = 2/n Σ (x_d − x_q) x_qᵀ
/// against the dense path `xs_dense` run through the dense `dense_block` (see `compress::error_feedback`).
/// Windows are paired by index; both paths hold one chunk of activations at a time.
/// `attn` holds the attention caches of the compressed and the dense path.
#[allow(clippy::too_many_arguments)]
pub fn collect_hessian_and_cross(
    model: &Model,
    layer: usize,
    xs: &mut [Vec<f32>],
    xs_dense: &mut [Vec<f32>],
    dense_block: &Block,
    attn: Option<(&mut AttnSlots, &mut AttnSlots)>,
    site: Site,
    cols: usize,
) -> Result<(Hessian, Vec<f64>)> {
    let mut acc = HessianAccumulator::new(cols);
    let mut cross = CrossAccumulator::new(cols);
    let err = |e: crate::compress::CompressError| WhittleError::Invalid(format!("calibration inputs of layer {layer} ({site:?}): {e}"));
    // Chunks of both paths and of their caches go together, so one chunk of activations is alive at a time.
    let chunk_len = chunk_for(model, xs);
    let mut caches = attn.map(|(q, d)| (q.chunks_mut(chunk_len), d.chunks_mut(chunk_len)));
    for (q_chunk, d_chunk) in xs.chunks_mut(chunk_len).zip(xs_dense.chunks_mut(chunk_len)) {
        let (q_slots, d_slots) = match caches.as_mut() {
            Some((q, d)) => (q.next(), d.next()),
            None => (None, None),
        };
        let mut dense_inputs: Vec<Vec<f32>> = Vec::with_capacity(chunk_len);
        run_block_with(model, dense_block, layer, d_chunk, false, Some(site), d_slots, &mut |_, input, _| {
            dense_inputs.push(input.to_vec());
            Ok(())
        })?;
        let mut i = 0;
        run_block_with(model, &model.blocks[layer], layer, q_chunk, false, Some(site), q_slots, &mut |_, input, n| {
            acc.add_batch(input, n).map_err(err)?;
            cross.add_batch(input, &dense_inputs[i], n).map_err(err)?;
            i += 1;
            Ok(())
        })?;
    }
    Ok((acc.finish(), cross.finish()))
}
