//! Compressing a whole model under a resolved plan, the way the reference GPTQ/SparseGPT code does it:
//! sequentially, block by block, each block calibrated on the outputs of the already-compressed blocks before it,
//! and inside a block stage by stage (q/k/v, then o, then gate/up, then down: "true sequential"), so every linear
//! sees inputs produced by its compressed predecessors. Results stream out as events while the job runs (the GUI
//! plots them), and the job is cancellable between stages and inside long layers.

use crate::calib::{collect_hessian, collect_hessian_and_cross, run_block_with, slots_of, ResumeCache};
use crate::compress::error_feedback::{cross_product, shift_by};
use crate::compress::{compress_layer, relative_error, CompressError, Matrix, QuantizedLinear};
use crate::error::{Result, WhittleError};
use crate::model::{Model, Site, LINEAR_KINDS};
use crate::plan::ResolvedPlan;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use whittle_kernels::{DenseWeight, Weight};

/// The result of compressing one linear.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct LayerResult {
    pub name: String,
    pub layer: usize,
    pub kind: String,
    /// "gptq", "sparsegpt", … or "dense" when the plan keeps it.
    pub method: String,
    pub bits: Option<u8>,
    pub group: Option<usize>,
    /// Fraction of exact zeros in the compressed weight.
    pub sparsity: f64,
    /// tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on the layer's own calibration Hessian, ΔW = W − Ŵ, where W is the target the
    /// method compressed (with error feedback, the shifted target; see `compress::error_feedback`).
    pub rel_error: f64,
    pub bits_per_weight: f64,
    pub damp: Option<f64>,
    pub seconds: f64,
    pub rows: usize,
    pub cols: usize,
}

#[derive(Clone, Debug)]
pub enum CompressEvent {
    /// A stage of a block starts (for progress: `done` of `total` linears finished so far).
    Stage { layer: usize, stage: &'static str, done: usize, total: usize },
    Layer(LayerResult),
}

pub struct CompressOutput {
    pub layers: Vec<LayerResult>,
    /// The integer form of every quantized linear, by module name (for export and the packed runtime).
    pub quantized: BTreeMap<String, QuantizedLinear>,
    pub avg_bits: f64,
    pub seconds: f64,
}

/// A compressed linear as a checkpoint stores it.
#[derive(Clone, Debug, PartialEq)]
pub enum CompressedWeight {
    Quantized(QuantizedLinear),
    /// Float values (pruned without quantization, or a method without an integer form).
    Dense(Vec<f32>),
}

impl CompressedWeight {
    /// The float values the next layers are calibrated on.
    fn values(&self) -> Vec<f32> {
        match self {
            CompressedWeight::Quantized(q) => q.dequantize().data,
            CompressedWeight::Dense(v) => v.clone(),
        }
    }
}

/// A finished decoder layer: the compressed linears (by kind index; linears the plan keeps dense are absent) and
/// their results.
#[derive(Clone, Debug)]
pub struct FinishedLayer {
    pub layer: usize,
    pub results: Vec<LayerResult>,
    pub weights: Vec<(usize, CompressedWeight)>,
}

/// Where a streaming compression keeps finished layers, so memory holds one layer at a time and a restarted job
/// skips the layers an earlier run finished (see `crate::checkpoint`).
pub trait Checkpoint {
    /// The layer as an earlier run finished it, if it did.
    fn restore(&mut self, layer: usize) -> Result<Option<FinishedLayer>>;
    /// Stores a finished layer durably before the job moves on.
    fn save(&mut self, layer: &FinishedLayer) -> Result<()>;
    /// The weights whose names start with `prefix` are done with and may leave memory: a finished layer's
    /// (`model.layers.{l}.`) once its outputs are computed, the embedding once the calibration windows are embedded.
    fn release(&mut self, prefix: &str);
    /// Stores the calibration states (`paths`: the compressed path's per-window states, then the dense path's) as
    /// they are after `after_layer` layers, so a restart need not run the finished layers forward again. Optional:
    /// the default keeps nothing.
    fn save_states(&mut self, _after_layer: usize, _paths: &[&[Vec<f32>]], _hidden: usize) -> Result<()> {
        Ok(())
    }
    /// Fills `paths` with the saved states and returns how many layers they have passed through; `None` when none
    /// were saved.
    fn restore_states(&mut self, _paths: &mut [&mut Vec<Vec<f32>>]) -> Result<Option<usize>> {
        Ok(None)
    }
    /// A folder where the job may keep its restart cache when it does not fit in memory (`calib::ResumeCache`);
    /// `None`: keep only what fits.
    fn spill_dir(&self) -> Option<&Path> {
        None
    }
}

const STAGES: [(&str, Site, &[usize]); 4] = [
    ("qkv", Site::AttnIn, &[0, 1, 2]),
    ("o", Site::OIn, &[3]),
    ("gate/up", Site::MlpIn, &[4, 5]),
    ("down", Site::DownIn, &[6]),
];

/// Compresses `model` in place (its linears become the dequantized compressed weights) following `plan`,
/// calibrated on `windows`. `cancelled` is polled between stages and inside compressors.
pub fn compress_model(
    model: &mut Model,
    plan: &ResolvedPlan,
    windows: &[Vec<u32>],
    on_event: &mut dyn FnMut(CompressEvent),
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<CompressOutput> {
    compress_model_with(model, plan, windows, on_event, cancelled, None)
}

/// [`compress_model`] with an optional checkpoint. With one, every finished layer is saved to it and then released
/// (its weights leave `model`, which is spent afterwards), layers it already holds are restored instead of
/// compressed, and `CompressOutput::quantized` stays empty: the checkpoint holds the integer forms.
pub fn compress_model_with(
    model: &mut Model,
    plan: &ResolvedPlan,
    windows: &[Vec<u32>],
    on_event: &mut dyn FnMut(CompressEvent),
    cancelled: &(dyn Fn() -> bool + Sync),
    checkpoint: Option<&mut dyn Checkpoint>,
) -> Result<CompressOutput> {
    let spill_dir = checkpoint.as_deref().and_then(Checkpoint::spill_dir).map(Path::to_path_buf);
    let cache = Some(CacheLimits { memory: ResumeCache::MAX_BYTES, spill_dir });
    compress_model_restarting(model, plan, windows, on_event, cancelled, checkpoint, cache)
}

/// How much of the restart cache (`calib::ResumeCache`) may stay in memory per path, and where the rest may go.
struct CacheLimits {
    memory: usize,
    spill_dir: Option<PathBuf>,
}

/// [`compress_model_with`] with the restart cache's limits, or (`None`) recomputing every stage from the block's
/// input instead: the tests compare the two.
fn compress_model_restarting(
    model: &mut Model,
    plan: &ResolvedPlan,
    windows: &[Vec<u32>],
    on_event: &mut dyn FnMut(CompressEvent),
    cancelled: &(dyn Fn() -> bool + Sync),
    mut checkpoint: Option<&mut dyn Checkpoint>,
    cache_limits: Option<CacheLimits>,
) -> Result<CompressOutput> {
    let start = Instant::now();
    let by_name: BTreeMap<&str, &crate::plan::ModulePlan> = plan.modules.iter().map(|m| (m.name.as_str(), m)).collect();
    let total = plan.modules.len();
    let mut xs: Vec<Vec<f32>> = windows
        .iter()
        .map(|w| {
            let mut x = Vec::new();
            model.embed_tokens(w, &mut x);
            x
        })
        .collect();
    // The dense path for error feedback: the original blocks (weights are shared, not copied) and their states.
    let feedback = plan.error_feedback;
    let mut dense_blocks = if feedback { model.blocks.clone() } else { Vec::new() };
    let mut xs_dense = if feedback { xs.clone() } else { Vec::new() };
    if let Some(cp) = checkpoint.as_deref_mut() {
        // Nothing reads the embedding again (a 7B one is 0.26 GB of mapped pages).
        cp.release("model.embed_tokens.");
    }
    let mut layers = Vec::new();
    let mut quantized = BTreeMap::new();
    let cache = || match &cache_limits {
        Some(c) => ResumeCache::new(&model.config, windows, c.memory, c.spill_dir.as_deref()),
        None => Ok(None),
    };
    let mut resume_q = cache()?;
    let mut resume_d = if feedback { cache()? } else { None };
    // A restarted job continues from the states its last finished layer saved; layers before them are not run again.
    // (Without error feedback `xs_dense` is empty and adds no states.)
    let states_after = match checkpoint.as_deref_mut() {
        Some(cp) => cp.restore_states(&mut [&mut xs, &mut xs_dense])?,
        None => None,
    }
    .unwrap_or(0);
    for l in 0..model.config.num_layers {
        for c in [&mut resume_q, &mut resume_d].into_iter().flatten() {
            c.clear();
        }
        let restored = match checkpoint.as_deref_mut() {
            Some(cp) => cp.restore(l)?,
            None => None,
        };
        let mut finished = FinishedLayer { layer: l, results: Vec::new(), weights: Vec::new() };
        let was_restored = restored.is_some();
        if l < states_after && !was_restored {
            return Err(WhittleError::Invalid(format!(
                "the checkpoint's calibration states are after layer {states_after}, but layer {l} is not finished; delete the checkpoint folder to start over"
            )));
        }
        if let Some(done) = restored {
            // Weights a restored layer's forward needs; none when the restored states are already past it.
            for (k, w) in done.weights.iter().filter(|_| l >= states_after) {
                let lin = &mut model.blocks[l].linears[*k];
                let (rows, cols) = (lin.weight.rows(), lin.weight.cols());
                lin.weight = Weight::Dense(DenseWeight::from_f32(rows, cols, w.values()));
            }
            for r in done.results {
                layers.push(r.clone());
                on_event(CompressEvent::Layer(r));
            }
        }
        let stages = if was_restored { &[][..] } else { &STAGES[..] };
        for &(stage, site, kinds) in stages {
            if cancelled() {
                return Err(WhittleError::Cancelled);
            }
            on_event(CompressEvent::Stage { layer: l, stage, done: layers.len(), total });
            let cols = model.blocks[l].linears[kinds[0]].weight.cols();
            let (h, mut cross) = if feedback {
                let resume = slots_of(&mut resume_q).zip(slots_of(&mut resume_d));
                let (h, d) = collect_hessian_and_cross(model, l, &mut xs, &mut xs_dense, &dense_blocks[l], resume, site, cols)?;
                (h, Some(d))
            } else {
                (collect_hessian(model, l, &mut xs, slots_of(&mut resume_q), site, cols)?, None)
            };
            for (i, &k) in kinds.iter().enumerate() {
                let name = Model::module_name(l, LINEAR_KINDS[k]);
                let mp = by_name
                    .get(name.as_str())
                    .ok_or_else(|| WhittleError::Invalid(format!("plan has no entry for {name}")))?;
                let t = Instant::now();
                let lin = &model.blocks[l].linears[k];
                let (rows, cols) = (lin.weight.rows(), lin.weight.cols());
                let Some(job) = &mp.job else {
                    layers.push(LayerResult {
                        name: name.clone(),
                        layer: l,
                        kind: LINEAR_KINDS[k].into(),
                        method: "dense".into(),
                        bits: None,
                        group: None,
                        sparsity: 0.0,
                        rel_error: 0.0,
                        bits_per_weight: mp.bits_per_weight,
                        damp: None,
                        seconds: 0.0,
                        rows,
                        cols,
                    });
                    finished.results.push(layers.last().cloned().expect("pushed"));
                    on_event(CompressEvent::Layer(layers.last().cloned().expect("pushed")));
                    continue;
                };
                let original = Matrix::from_vec(rows, cols, weight_f32(&lin.weight));
                let to_err = |e: CompressError| match e {
                    CompressError::Cancelled => WhittleError::Cancelled,
                    e => WhittleError::Invalid(format!("{name}: {e}")),
                };
                // Hessian-based methods compress the error-feedback target; the baselines round the weights as they are.
                let w = match (cross.as_ref(), job.method) {
                    (Some(d), m) if m.uses_hessian() => {
                        let a = cross_product(&original, d);
                        // The stage's last linear frees D (c×c f64, 0.97 GB on a 7b down_proj) before the solve.
                        if i + 1 == kinds.len() {
                            cross = None;
                        }
                        shift_by(&original, a, &h, job.damp).map_err(to_err)?
                    }
                    _ => original,
                };
                let c = compress_layer(job, &w, &h, &|| cancelled()).map_err(to_err)?;
                let rel_error = relative_error(&w, &c.weight, &h);
                let zeros = c.weight.data.iter().filter(|v| **v == 0.0).count();
                let result = LayerResult {
                    name: name.clone(),
                    layer: l,
                    kind: LINEAR_KINDS[k].into(),
                    method: job.method.to_string(),
                    bits: job.quant.as_ref().map(|q| q.bits),
                    group: job.quant.as_ref().map(|q| q.group_size(cols)),
                    sparsity: zeros as f64 / (rows * cols) as f64,
                    rel_error,
                    bits_per_weight: mp.bits_per_weight,
                    damp: c.damp_used,
                    seconds: t.elapsed().as_secs_f64(),
                    rows,
                    cols,
                };
                let stored = match c.quant {
                    Some(q) => CompressedWeight::Quantized(q),
                    None => CompressedWeight::Dense(c.weight.data),
                };
                // The next layers see exactly the values a checkpoint restores.
                model.blocks[l].linears[k].weight = Weight::Dense(DenseWeight::from_f32(rows, cols, stored.values()));
                match (&checkpoint, stored) {
                    (None, CompressedWeight::Quantized(q)) => {
                        quantized.insert(name.clone(), q);
                    }
                    (None, CompressedWeight::Dense(_)) => {}
                    (Some(_), w) => finished.weights.push((k, w)),
                }
                finished.results.push(result.clone());
                layers.push(result.clone());
                on_event(CompressEvent::Layer(result));
            }
        }
        if let (Some(cp), false) = (checkpoint.as_deref_mut(), was_restored) {
            cp.save(&finished)?;
        }
        // The next block is calibrated on this block's outputs with its compressed weights (unless the restored
        // states are already past it). A restored layer computed no attention here; its cache is empty and the
        // forward computes it. Both paths side by side (only the compressed one without error feedback).
        if l >= states_after {
            let m: &Model = model;
            let (compressed, dense) = rayon::join(
                || run_block_with(m, &m.blocks[l], l, &mut xs, true, None, slots_of(&mut resume_q), &mut |_| Ok(())),
                || match dense_blocks.get(l) {
                    Some(block) => run_block_with(m, block, l, &mut xs_dense, true, None, slots_of(&mut resume_d), &mut |_| Ok(())),
                    None => Ok(()),
                },
            );
            compressed?;
            dense?;
            if let (Some(cp), true) = (checkpoint.as_deref_mut(), l + 1 < model.config.num_layers) {
                cp.save_states(l + 1, &[&xs, &xs_dense], model.config.hidden_size)?;
            }
        }
        if let Some(cp) = checkpoint.as_deref_mut() {
            // Streaming: this layer's weights (compressed, and the dense originals of error feedback) are done with.
            for lin in model.blocks[l].linears.iter_mut().chain(dense_blocks.get_mut(l).into_iter().flat_map(|b| b.linears.iter_mut())) {
                lin.weight = Weight::Dense(DenseWeight::from_f32(0, 0, Vec::new()));
            }
            cp.release(&format!("model.layers.{l}."));
        }
    }
    Ok(CompressOutput { layers, quantized, avg_bits: plan.avg_bits, seconds: start.elapsed().as_secs_f64() })
}

/// A linear's weight as f32 values (dense weights only; compression starts from float checkpoints).
pub fn weight_f32(w: &Weight) -> Vec<f32> {
    match w {
        Weight::Dense(d) => d.to_f32_vec(),
        #[allow(unreachable_patterns)]
        other => panic!("compression needs float weights, found {:?}", std::mem::discriminant(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::{calibration_windows, CalibSettings};
    use crate::model::load_model;
    use crate::plan::Plan;
    use std::path::Path;

    /// The default model, the w4g32 preset and a small calibration set (6 windows of 48 tokens).
    fn small_job() -> (crate::model::LoadedModel, ResolvedPlan, Vec<Vec<u32>>) {
        let m = load_model(&crate::model::source::default_model_dir().unwrap()).unwrap();
        let plan = Plan::from_toml_str(include_str!("../../presets/w4g32.toml"), Path::new("w4g32.toml"))
            .unwrap()
            .resolve(&m.model.linear_shapes(), 0, 16.0)
            .unwrap();
        let text = include_str!("../../assets/tinystories_train_calib.txt");
        let windows = calibration_windows(&m.tokenizer, text, &CalibSettings { samples: 6, ctx: 48 }, "calib").unwrap();
        (m, plan, windows)
    }

    /// The restart cache is only a cache: compressing with it, and with every stage recomputed from the block's
    /// input, gives bit-identical weights (same operations on the same values, in the same order).
    #[test]
    fn restart_cache_changes_nothing_but_time() {
        let run = |cache: Option<CacheLimits>| {
            let (mut m, plan, windows) = small_job();
            let out = compress_model_restarting(&mut m.model, &plan, &windows, &mut |_| {}, &|| false, None, cache).unwrap();
            let weights: Vec<Vec<f32>> = m.model.blocks.iter().flat_map(|b| b.linears.iter().map(|l| weight_f32(&l.weight))).collect();
            (out.layers.iter().map(|l| l.rel_error).collect::<Vec<_>>(), weights)
        };
        let recomputed = run(None);
        // Every placement `ResumeCache::new` chooses from: all in memory; attention and residual only (room for
        // those, no folder); on disk (no memory allowed, so every restart point goes through the file).
        let (m, _, windows) = small_job();
        let tokens: usize = windows.iter().map(Vec::len).sum();
        let narrow_bytes = tokens * m.model.config.q_dim().max(m.model.config.hidden_size) * 4;
        let placement = |memory, spill| ResumeCache::placement(&m.model.config, windows.len(), tokens, memory, spill);
        assert_eq!(placement(narrow_bytes, false), crate::calib::CachePlacement::Memory { keep_mlp: false });
        assert_eq!(placement(0, true), crate::calib::CachePlacement::Disk);
        let spill = tempfile::tempdir().unwrap();
        for (what, limits) in [
            ("in memory", CacheLimits { memory: ResumeCache::MAX_BYTES, spill_dir: None }),
            ("in memory without the MLP point", CacheLimits { memory: narrow_bytes, spill_dir: None }),
            ("on disk", CacheLimits { memory: 0, spill_dir: Some(spill.path().to_path_buf()) }),
        ] {
            let cached = run(Some(limits));
            assert!(cached.1 == recomputed.1, "compressed weights differ with the cache {what}");
            // The f64 error metric reduces in parallel (faer), so its last bits depend on scheduling: 1e-12 relative.
            for (a, b) in cached.0.iter().zip(&recomputed.0) {
                assert!((a - b).abs() <= 1e-12 * b.abs(), "per-layer errors differ with the cache {what}: {a} vs {b}");
            }
        }
        // The spill file has no name: nothing is left in the folder.
        assert_eq!(std::fs::read_dir(spill.path()).unwrap().count(), 0);
    }

    /// A job stopped after two layers restarts from the calibration states it saved (layers 0 and 1 are not run
    /// again) and ends with exactly the weights of an uninterrupted run; and the states are really what the restart
    /// reads: perturbing them changes the later layers.
    #[test]
    fn a_restart_continues_from_the_saved_states_and_equals_an_uninterrupted_run() {
        use crate::checkpoint::CheckpointDir;
        let key = serde_json::json!({ "test": "states" });
        let tmp = tempfile::tempdir().unwrap();
        let run = |dir: &Path, stop_after_two: bool| -> Result<Vec<Vec<f32>>> {
            let (mut m, plan, windows) = small_job();
            let mut cp = CheckpointDir::open(dir, &key, None).unwrap();
            let stop = || stop_after_two && dir.join("layer-00001.safetensors").exists();
            compress_model_with(&mut m.model, &plan, &windows, &mut |_| {}, &stop, Some(&mut cp))?;
            Ok((0..m.model.config.num_layers)
                .flat_map(|l| cp.restore(l).unwrap().unwrap().weights.into_iter().map(|(_, w)| w.values()))
                .collect())
        };
        let whole = run(&tmp.path().join("whole"), false).unwrap();

        let resumed_dir = tmp.path().join("resumed");
        assert!(matches!(run(&resumed_dir, true), Err(WhittleError::Cancelled)));
        let states = resumed_dir.join("states.safetensors");
        let (m, _, windows) = small_job();
        let hidden = m.model.config.hidden_size;
        let mut saved: [Vec<Vec<f32>>; 2] = std::array::from_fn(|_| windows.iter().map(|w| vec![0.0; w.len() * hidden]).collect());
        let [q, d] = &mut saved;
        assert_eq!(crate::saved_states::restore(&states, &mut [q, d]).unwrap(), Some(2), "states after the two finished layers");
        let perturbed_dir = tmp.path().join("perturbed");
        std::fs::create_dir_all(&perturbed_dir).unwrap();
        for entry in std::fs::read_dir(&resumed_dir).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, perturbed_dir.join(p.file_name().unwrap())).unwrap();
        }
        saved[0][0][0] += 1.0;
        crate::saved_states::save(&perturbed_dir.join("states.safetensors"), 2, &[&saved[0], &saved[1]], hidden).unwrap();

        let resumed = run(&resumed_dir, false).unwrap();
        assert!(resumed == whole, "the resumed run's weights differ from the uninterrupted run's");
        let perturbed = run(&perturbed_dir, false).unwrap();
        assert!(perturbed != whole, "a restart must read the saved states, not recompute them");
    }
}
