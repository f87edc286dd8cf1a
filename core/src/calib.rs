//! Calibration data: token windows from a text, and the Hessians of a decoder block's linear inputs collected by
//! running those windows through the block. Windows run in parallel in small chunks and each chunk's inputs are
//! folded into the Hessian at once, so only a chunk of activations is alive, never the whole model's.

use crate::compress::error_feedback::CrossAccumulator;
use crate::compress::{Hessian, HessianAccumulator};
use crate::error::{Result, WhittleError};
use crate::model::kv_cache::LayerCache;
use crate::model::{Block, Model, Resume, Scratch, Site, Tokenizer};
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

/// Restart points of the current layer, one per calibration window and path (see [`Resume`]), advanced by each
/// stage: the pass collecting o_proj's inputs computes attention once (only q/k/v, final by then, determine it)
/// and keeps it, the gate/up stage keeps the residual after o_proj, the down stage keeps the residual and
/// down_proj's input, and the layer's update adds down_proj to that. Every linear then runs once per path and
/// layer, as in one forward pass, instead of again for every later stage. Reset for every layer and path.
pub struct ResumeCache {
    slots: Vec<ResumeSlot>,
}

/// One window's restart point, and whether it may grow to the MLP's width.
#[derive(Clone, Debug, Default)]
pub struct ResumeSlot {
    at: Option<Resume>,
    keep_mlp: bool,
}

impl ResumeCache {
    /// Largest cache kept (per path): beyond it (long calibration of big models) attention is recomputed instead,
    /// so streaming compression keeps its memory bound.
    pub const MAX_BYTES: usize = 512 << 20;

    /// Bytes the cache holds at its largest for `tokens` calibration tokens of a model of `cfg` (0: none kept).
    pub fn bytes_for(cfg: &crate::model::ModelConfig, tokens: usize) -> usize {
        let (narrow, mlp) = Self::widths(cfg);
        if tokens * mlp * 4 <= Self::MAX_BYTES {
            tokens * mlp * 4
        } else if tokens * narrow * 4 <= Self::MAX_BYTES {
            tokens * narrow * 4
        } else {
            0
        }
    }

    /// Floats per token of the attention or residual restart points, and of the MLP one.
    fn widths(cfg: &crate::model::ModelConfig) -> (usize, usize) {
        (cfg.q_dim().max(cfg.hidden_size), cfg.hidden_size + cfg.intermediate_size)
    }

    /// A cache for `windows` windows of `tokens` tokens in all, or `None` when even the attention outputs would
    /// exceed [`Self::MAX_BYTES`]; the MLP restart point is kept only when it fits too.
    pub fn new(cfg: &crate::model::ModelConfig, windows: usize, tokens: usize) -> Option<Self> {
        let (narrow, mlp) = Self::widths(cfg);
        let keep_mlp = tokens * mlp * 4 <= Self::MAX_BYTES;
        (tokens * narrow * 4 <= Self::MAX_BYTES).then(|| ResumeCache { slots: vec![ResumeSlot { at: None, keep_mlp }; windows] })
    }

    /// Forgets the restart points (a new layer starts).
    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(|s| s.at = None);
    }

    /// The slots, one per window, as `run_block_with` takes them.
    pub fn slots(&mut self) -> &mut ResumeSlots {
        &mut self.slots
    }
}

/// The input of the observed site in one window: `input` is `[n, width]`.
pub struct Captured {
    pub input: Vec<f32>,
    pub n: usize,
}

/// Receives the captured inputs of one chunk of windows, in window order (owned: no copy to keep them).
pub type ChunkObserver<'a> = dyn FnMut(Vec<Captured>) -> Result<()> + 'a;

/// One restart slot per calibration window (see [`ResumeCache`]).
pub type ResumeSlots = [ResumeSlot];

/// The slots of an optional cache.
pub fn slots_of(c: &mut Option<ResumeCache>) -> Option<&mut ResumeSlots> {
    c.as_mut().map(ResumeCache::slots)
}

thread_local! {
    /// Forward-pass buffers of the window a thread runs, kept between windows and stages: allocating them per
    /// window (tens of allocations above glibc's mmap threshold) cost page faults and TLB shootdowns worth a tenth
    /// of a small model's calibration.
    static WINDOW_SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
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
    run_block_with(model, &model.blocks[layer], layer, xs, update, site, None, &mut |chunk| {
        chunk.iter().try_for_each(|c| observe(&c.input, c.n))
    })
}

/// `run_block` with an explicit block (e.g. the dense original of a block being compressed) and an optional
/// restart cache for this block and path (`xs[i]` uses slot `i`); `observe` gets each chunk's inputs. With a
/// cache, the caller promises the stage order of `compress_model`: when `site`'s inputs are collected, every
/// linear of the block before `site` is final.
#[allow(clippy::too_many_arguments)]
pub fn run_block_with(
    model: &Model,
    block: &Block,
    layer: usize,
    xs: &mut [Vec<f32>],
    update: bool,
    site: Option<Site>,
    resume: Option<&mut ResumeSlots>,
    observe: &mut ChunkObserver<'_>,
) -> Result<()> {
    // Stopping at the attention input computes no attention, so there is nothing to keep.
    let past_attention = site != Some(Site::AttnIn);
    let qd = model.config.q_dim();
    let caching = resume.is_some();
    let mut no_slots: Vec<ResumeSlot> = Vec::new();
    let slots: &mut [ResumeSlot] = match resume {
        Some(slots) => slots,
        None => {
            no_slots.resize(xs.len(), ResumeSlot::default());
            &mut no_slots
        }
    };
    let chunk_len = chunk_for(model, xs);
    for (chunk, slot_chunk) in xs.chunks_mut(chunk_len).zip(slots.chunks_mut(chunk_len)) {
        let captured: Vec<Option<Vec<f32>>> = chunk
            .par_iter_mut()
            .zip(slot_chunk.par_iter_mut())
            .map(|(x, slot)| {
                let n = x.len() / model.config.hidden_size;
                // Taken out of the thread's slot (not borrowed: a nested rayon wait may run another window here).
                let mut s = WINDOW_SCRATCH.with(|c| c.take());
                let mut got = None;
                let mut obs = |_: usize, at: Site, input: &[f32], _: usize| {
                    if Some(at) == site {
                        got = Some(input.to_vec());
                        return !update;
                    }
                    false
                };
                // Stopping at the attention input needs no restart point.
                let resume = slot.at.as_ref().filter(|_| past_attention);
                // The pass starts from the block's input, or from the kept residual; without `update` it runs on a
                // copy, and a stop at the MLP leaves the residual in it.
                let mut tmp = Vec::new();
                let state: &mut [f32] = match (update, resume.and_then(Resume::residual)) {
                    (true, Some(r)) => {
                        x.copy_from_slice(r);
                        x
                    }
                    (true, None) => x,
                    (false, Some(r)) => {
                        tmp = r.to_vec();
                        &mut tmp
                    }
                    (false, None) => {
                        tmp = x.clone();
                        &mut tmp
                    }
                };
                match resume {
                    Some(from) => model.block_forward_resumed(layer, block, state, n, from, &mut s, Some(&mut obs)),
                    None => {
                        model.rope.tables(0, n, &mut s.cos, &mut s.sin);
                        let mut cache = LayerCache { k: Vec::new(), v: Vec::new() };
                        model.block_forward(layer, block, state, n, 0, &mut cache, &mut s, Some(&mut obs));
                        if caching && past_attention {
                            slot.at = Some(Resume::Attention(s.attn[..n * qd].to_vec()));
                        }
                    }
                }
                // A pass that stopped at `site` left the residual after attention in `state`, computed with final
                // weights: the next stages restart there.
                if caching && !update {
                    match site {
                        Some(Site::MlpIn) => slot.at = Some(Resume::Residual(std::mem::take(&mut tmp))),
                        Some(Site::DownIn) if slot.keep_mlp => {
                            let act = got.clone().unwrap_or_default();
                            slot.at = Some(Resume::Mlp { residual: std::mem::take(&mut tmp), act });
                        }
                        _ => {}
                    }
                }
                WINDOW_SCRATCH.with(|c| c.set(s));
                got
            })
            .collect();
        let d = model.config.hidden_size;
        let captured: Vec<Captured> = captured
            .into_iter()
            .zip(chunk.iter())
            .filter_map(|(c, x)| c.map(|input| Captured { input, n: x.len() / d }))
            .collect();
        if !captured.is_empty() {
            observe(captured)?;
        }
    }
    Ok(())
}

/// The Hessian of the inputs of `site` in block `layer`.
pub fn collect_hessian(
    model: &Model,
    layer: usize,
    xs: &mut [Vec<f32>],
    resume: Option<&mut ResumeSlots>,
    site: Site,
    cols: usize,
) -> Result<Hessian> {
    let mut acc = HessianAccumulator::new(cols);
    run_block_with(model, &model.blocks[layer], layer, xs, false, Some(site), resume, &mut |chunk| {
        let batches: Vec<(&[f32], usize)> = chunk.iter().map(|c| (&c.input[..], c.n)).collect();
        acc.add_batches(&batches).map_err(|e| {
            WhittleError::Invalid(format!("calibration inputs of layer {layer} ({site:?}): {e}"))
        })
    })?;
    Ok(acc.finish())
}

/// The Hessian of `site`'s inputs on the compressed path `xs`, and the cross term D = 2/n Σ (x_d − x_q) x_qᵀ
/// against the dense path `xs_dense` run through the dense `dense_block` (see `compress::error_feedback`).
/// Windows are paired by index; both paths hold one chunk of activations at a time.
/// `resume` holds the restart caches of the compressed and the dense path.
#[allow(clippy::too_many_arguments)]
pub fn collect_hessian_and_cross(
    model: &Model,
    layer: usize,
    xs: &mut [Vec<f32>],
    xs_dense: &mut [Vec<f32>],
    dense_block: &Block,
    resume: Option<(&mut ResumeSlots, &mut ResumeSlots)>,
    site: Site,
    cols: usize,
) -> Result<(Hessian, Vec<f64>)> {
    let mut acc = HessianAccumulator::new(cols);
    let mut cross = CrossAccumulator::new(cols);
    let err = |e: crate::compress::CompressError| WhittleError::Invalid(format!("calibration inputs of layer {layer} ({site:?}): {e}"));
    // Chunks of both paths and of their caches go together, so one chunk of activations is alive at a time.
    let chunk_len = chunk_for(model, xs);
    let mut caches = resume.map(|(q, d)| (q.chunks_mut(chunk_len), d.chunks_mut(chunk_len)));
    for (q_chunk, d_chunk) in xs.chunks_mut(chunk_len).zip(xs_dense.chunks_mut(chunk_len)) {
        let (q_slots, d_slots) = match caches.as_mut() {
            Some((q, d)) => (q.next(), d.next()),
            None => (None, None),
        };
        // The two paths run side by side (each over its windows in parallel), so neither waits on the other's
        // stragglers; their inputs are folded in once both are done.
        let (mut dense_inputs, mut inputs): (Vec<Captured>, Vec<Captured>) = (Vec::new(), Vec::new());
        let (dense, compressed) = rayon::join(
            || {
                run_block_with(model, dense_block, layer, d_chunk, false, Some(site), d_slots, &mut |chunk| {
                    dense_inputs = chunk;
                    Ok(())
                })
            },
            || {
                run_block_with(model, &model.blocks[layer], layer, q_chunk, false, Some(site), q_slots, &mut |chunk| {
                    inputs = chunk;
                    Ok(())
                })
            },
        );
        dense?;
        compressed?;
        let batches: Vec<(&[f32], usize)> = inputs.iter().map(|c| (&c.input[..], c.n)).collect();
        acc.add_batches(&batches).map_err(err)?;
        let pairs: Vec<(&[f32], &[f32], usize)> =
            inputs.iter().zip(&dense_inputs).map(|(q, d)| (&q.input[..], &d.input[..], q.n)).collect();
        cross.add_batches(&pairs).map_err(err)?;
    }
    Ok((acc.finish(), cross.finish()))
}
