//! Calibration data: token windows from a text, and the Hessians of a decoder block's linear inputs collected by
//! running those windows through the block. Windows run in parallel in small chunks and each chunk's inputs are
//! folded into the Hessian at once, so only a chunk of activations is alive, never the whole model's.

use crate::compress::error_feedback::CrossAccumulator;
use crate::compress::{Hessian, HessianAccumulator};
use crate::error::{Result, WhittleError};
use crate::model::kv_cache::LayerCache;
use crate::model::{Block, Model, Resume, Scratch, Site, Tokenizer};
use crate::spill::SpillFile;
use rayon::prelude::*;
use std::path::Path;
use std::sync::Arc;

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
///
/// Small jobs keep the points in memory. Where they would pass the memory limit (a 7B model with 128×512 tokens:
/// 4 GB per path), a streaming job keeps them in a [`SpillFile`] beside its checkpoint and holds only the windows
/// being computed; without a folder, only what fits is kept and later stages recompute the rest.
pub struct ResumeCache {
    slots: Vec<ResumeSlot>,
}

/// One window's restart point, and whether it may grow to the MLP's width.
#[derive(Clone, Debug, Default)]
pub struct ResumeSlot {
    at: Option<Resume>,
    keep_mlp: bool,
    /// Where `at` waits between stages when the cache is on disk.
    disk: Option<SlotOnDisk>,
}

#[derive(Clone, Debug)]
struct SlotOnDisk {
    file: Arc<SpillFile>,
    region: usize,
    /// What the region holds now (`None`: nothing of this layer).
    stored: Option<StoredResume>,
}

/// The form and lengths of a restart point written to disk.
#[derive(Clone, Copy, Debug)]
enum StoredResume {
    Attention(usize),
    Residual(usize),
    Mlp { residual: usize, act: usize },
}

impl ResumeSlot {
    /// Brings a restart point kept on disk back into memory, before its window runs.
    fn load(&mut self) -> Result<()> {
        let Some(d) = self.disk.as_mut() else { return Ok(()) };
        let Some(stored) = d.stored.take() else { return Ok(()) };
        let read = |lens: &[usize]| d.file.read(d.region, lens);
        self.at = Some(match stored {
            StoredResume::Attention(n) => Resume::Attention(read(&[n])?.remove(0)),
            StoredResume::Residual(n) => Resume::Residual(read(&[n])?.remove(0)),
            StoredResume::Mlp { residual, act } => {
                let mut parts = read(&[residual, act])?;
                let act = parts.pop().unwrap_or_default();
                Resume::Mlp { residual: parts.pop().unwrap_or_default(), act }
            }
        });
        Ok(())
    }

    /// Moves the restart point to disk, after its window ran, when the cache is on disk (else leaves it be).
    fn unload(&mut self) -> Result<()> {
        let Some(d) = self.disk.as_mut() else { return Ok(()) };
        let Some(at) = self.at.take() else { return Ok(()) };
        let (parts, stored): (Vec<&[f32]>, _) = match &at {
            Resume::Attention(a) => (vec![a], StoredResume::Attention(a.len())),
            Resume::Residual(r) => (vec![r], StoredResume::Residual(r.len())),
            Resume::Mlp { residual, act } => (vec![residual, act], StoredResume::Mlp { residual: residual.len(), act: act.len() }),
        };
        d.file.write(d.region, &parts)?;
        d.stored = Some(stored);
        Ok(())
    }

    fn clear(&mut self) {
        self.at = None;
        if let Some(d) = self.disk.as_mut() {
            d.stored = None;
        }
    }
}

/// Where a job's restart cache lives (see [`ResumeCache::placement`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CachePlacement {
    /// In memory, with the MLP restart point or without it.
    Memory { keep_mlp: bool },
    /// On disk, every restart point.
    Disk,
    /// Nowhere: every stage recomputes the block from its input.
    None,
}

impl ResumeCache {
    /// Largest cache kept in memory (per path): beyond it the cache goes to disk where the job has a folder, and
    /// otherwise attention is recomputed, so streaming compression keeps its memory bound.
    pub const MAX_BYTES: usize = 512 << 20;

    /// Where the cache of `windows` windows of `tokens` tokens in all goes under a memory limit of `max_bytes` per
    /// path, with or without a folder to spill to.
    pub fn placement(cfg: &crate::model::ModelConfig, windows: usize, tokens: usize, max_bytes: usize, can_spill: bool) -> CachePlacement {
        let (narrow, mlp) = Self::widths(cfg);
        if tokens * mlp * 4 <= max_bytes {
            CachePlacement::Memory { keep_mlp: true }
        } else if can_spill && windows > 0 {
            CachePlacement::Disk
        } else if tokens * narrow * 4 <= max_bytes {
            CachePlacement::Memory { keep_mlp: false }
        } else {
            CachePlacement::None
        }
    }

    /// Bytes the cache of one path holds at its largest, in memory and on disk, for `windows` windows of `ctx`
    /// tokens under [`Self::MAX_BYTES`], placed by [`Self::placement`].
    pub fn footprint(cfg: &crate::model::ModelConfig, windows: usize, ctx: usize, can_spill: bool) -> (usize, usize) {
        let (narrow, mlp) = Self::widths(cfg);
        let tokens = windows * ctx;
        match Self::placement(cfg, windows, tokens, Self::MAX_BYTES, can_spill) {
            CachePlacement::Memory { keep_mlp: true } => (tokens * mlp * 4, 0),
            CachePlacement::Memory { keep_mlp: false } => (tokens * narrow * 4, 0),
            CachePlacement::Disk => (0, SpillFile::bytes(windows, ctx * mlp)),
            CachePlacement::None => (0, 0),
        }
    }

    /// Floats per token of the attention or residual restart points, and of the MLP one.
    fn widths(cfg: &crate::model::ModelConfig) -> (usize, usize) {
        (cfg.q_dim().max(cfg.hidden_size), cfg.hidden_size + cfg.intermediate_size)
    }

    /// A cache for `windows`, placed by [`Self::placement`] under `max_bytes` with `spill_dir` as the folder to
    /// spill to; `None` when it would be nowhere.
    pub fn new(cfg: &crate::model::ModelConfig, windows: &[Vec<u32>], max_bytes: usize, spill_dir: Option<&Path>) -> Result<Option<Self>> {
        let tokens = windows.iter().map(Vec::len).sum();
        let longest = windows.iter().map(Vec::len).max().unwrap_or(0);
        let slot = |keep_mlp: bool, disk: Option<SlotOnDisk>| ResumeSlot { at: None, keep_mlp, disk };
        let slots = match (Self::placement(cfg, windows.len(), tokens, max_bytes, spill_dir.is_some()), spill_dir) {
            (CachePlacement::Memory { keep_mlp }, _) => vec![slot(keep_mlp, None); windows.len()],
            (CachePlacement::Disk, Some(dir)) => {
                let file = Arc::new(SpillFile::create_in(dir, windows.len(), longest * Self::widths(cfg).1)?);
                (0..windows.len()).map(|region| slot(true, Some(SlotOnDisk { file: file.clone(), region, stored: None }))).collect()
            }
            _ => return Ok(None),
        };
        Ok(Some(ResumeCache { slots }))
    }

    /// Forgets the restart points (a new layer starts).
    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(ResumeSlot::clear);
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
            .map(|(x, slot)| -> Result<Option<Vec<f32>>> {
                let n = x.len() / model.config.hidden_size;
                slot.load()?;
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
                if update {
                    // The block's outputs replaced its inputs: this layer's restart points are spent.
                    slot.clear();
                }
                slot.unload()?;
                Ok(got)
            })
            .collect::<Result<_>>()?;
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
