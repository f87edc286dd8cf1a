//! The levels database: every linear compressed at every level of the ladder, computed once.
//!
//! All levels of one linear are compressed against the *same* Hessian (and target), so they are interchangeable:
//! which level a unit takes does not change what the other levels of that unit look like. Two ways to get that
//! Hessian (algorithms.md §7):
//!
//! * **dense inputs** (`along = None`): every linear on the dense model's inputs, one forward pass per block
//!   collecting its four Hessians. Level-agnostic: no allocation is favoured, but every layer is tuned for inputs
//!   the compressed model never produces, and without the error feedback `compress --plan` applies.
//! * **sequentially along an allocation** (`along = Some(level per linear)`): exactly like
//!   `whittle compress --plan` (block by block, stage by stage, on the inputs of the model compressed so far, with
//!   error feedback toward the dense outputs), the model being propagated with the allocation's levels (EvoPress
//!   uses a uniform "calibration bitwidth"). That allocation's model is then bit-for-bit the model
//!   `compress --plan` builds. Its neighbours are judged pessimistically: each layer's error feedback cancels the
//!   errors of *that* allocation's upstream layers, so changing an upstream level looks worse than it will be once
//!   `compress --plan` recalibrates. Improvements it does find are real, which is what the search's later rounds
//!   use it for (see `job`).
//!
//! Each variant's relative error on its Hessian is kept for the DP baseline.

use super::cache::{Building, LevelsStore};
use super::ladder::Ladder;
use crate::calib::{collect_hessian_and_cross, run_block, run_block_with};
use crate::compress::error_feedback::shifted_target;
use crate::compress::{compress_layer, relative_error, CompressError, Hessian, HessianAccumulator, Matrix};
use crate::compress_model::weight_f32;
use crate::error::{Result, WhittleError};
use crate::model::kv_cache::LayerCache;
use crate::model::{Model, Scratch, Site, LINEAR_KINDS};
use rayon::prelude::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use whittle_kernels::{DenseWeight, Weight};

/// Every linear at every level.
pub struct LevelsDb {
    /// `weights[linear][level]`, linears in `Model::linear_shapes` order.
    pub weights: Vec<Vec<Weight>>,
    /// `rel_errors[linear][level]`: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on the linear's Hessian, W being the matrix the
    /// method compressed (with error feedback, the shifted target); 0 for a dense level.
    pub rel_errors: Vec<Vec<f64>>,
    /// The folder holding it, when cached on disk.
    pub dir: Option<PathBuf>,
    /// True when it was loaded from an earlier run instead of computed.
    pub cached: bool,
}

/// The stages of a block in calibration order, as `compress_model` runs them ("true sequential").
const STAGES: [(Site, &[usize]); 4] =
    [(Site::AttnIn, &[0, 1, 2]), (Site::OIn, &[3]), (Site::MlpIn, &[4, 5]), (Site::DownIn, &[6])];

/// Windows run in parallel per chunk, as in `calib`, so only a chunk's activations are alive at a time.
const CHUNK: usize = 8;

/// The four Hessians of block `layer` (in `STAGES` order) on the inputs `xs`, which are advanced to the block's
/// outputs in the same pass.
fn block_hessians(model: &Model, layer: usize, xs: &mut [Vec<f32>]) -> Result<Vec<Hessian>> {
    let block = &model.blocks[layer];
    let d = model.config.hidden_size;
    let mut accs: Vec<HessianAccumulator> =
        STAGES.iter().map(|(_, kinds)| HessianAccumulator::new(block.linears[kinds[0]].weight.cols())).collect();
    for chunk in xs.chunks_mut(CHUNK) {
        let captured: Vec<[Vec<f32>; 4]> = chunk
            .par_iter_mut()
            .map(|x| {
                let n = x.len() / d;
                let mut s = Scratch::default();
                model.rope.tables(0, n, &mut s.cos, &mut s.sin);
                let mut cache = LayerCache { k: Vec::new(), v: Vec::new() };
                let mut got: [Vec<f32>; 4] = Default::default();
                let mut obs = |_: usize, at: Site, input: &[f32], _: usize| {
                    if let Some(i) = STAGES.iter().position(|(s, _)| *s == at) {
                        got[i] = input.to_vec();
                    }
                    false
                };
                model.block_forward(layer, block, x, n, 0, &mut cache, &mut s, Some(&mut obs));
                got
            })
            .collect();
        for (c, x) in captured.iter().zip(chunk.iter()) {
            let n = x.len() / d;
            for (acc, input) in accs.iter_mut().zip(c) {
                acc.add_batch(input, n)
                    .map_err(|e| WhittleError::Invalid(format!("calibration inputs of layer {layer}: {e}")))?;
            }
        }
    }
    Ok(accs.into_iter().map(HessianAccumulator::finish).collect())
}

/// Where built levels go: memory, or a cache folder being written.
enum Sink {
    Memory,
    Disk(Building),
}

impl Sink {
    fn keep(&self, linear: usize, level: usize, w: Matrix) -> Result<Weight> {
        match self {
            Sink::Memory => Ok(Weight::Dense(DenseWeight::from_f32(w.rows, w.cols, w.data))),
            Sink::Disk(b) => b.write(linear, level, w.rows, w.cols, &w.data),
        }
    }
}

/// Loads the database from `store` when it holds this exact key, else builds it (and stores it there): on dense
/// inputs, or sequentially `along` an allocation (a level per linear).
/// `progress(done, total)` counts compressed (linear, level) variants; `cancelled` is polled between stages and
/// inside compressors.
#[allow(clippy::too_many_arguments)]
pub fn levels_database(
    model: &Model,
    windows: &[Vec<u32>],
    ladder: &Ladder,
    along: Option<&[usize]>,
    store: Option<&LevelsStore>,
    progress: &(dyn Fn(usize, usize) + Sync),
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<LevelsDb> {
    let shapes = model.linear_shapes();
    let labels = ladder.labels();
    if let Some(store) = store {
        if let Some(s) = store.load(&shapes, &labels) {
            let total = shapes.len() * labels.len();
            progress(total, total);
            return Ok(LevelsDb { weights: s.weights, rel_errors: s.rel_errors, dir: Some(store.dir.clone()), cached: true });
        }
    }
    let sink = match store {
        Some(s) => Sink::Disk(s.begin()?),
        None => Sink::Memory,
    };
    let b = Builder { model, ladder, sink: &sink, progress, cancelled, done: AtomicUsize::new(0) };
    let built = match along {
        None => b.dense(windows),
        Some(along) => {
            if along.len() != shapes.len() || along.iter().any(|&l| l >= labels.len()) {
                return Err(WhittleError::Invalid(format!(
                    "levels calibration: {} levels given for {} linears of a {}-level ladder",
                    along.len(),
                    shapes.len(),
                    labels.len()
                )));
            }
            b.sequential(windows, along)
        }
    };
    match built {
        Ok((weights, rel_errors)) => {
            let dir = match sink {
                Sink::Disk(b) => Some(b.commit(&shapes, &labels, &rel_errors)?),
                Sink::Memory => None,
            };
            Ok(LevelsDb { weights, rel_errors, dir, cached: false })
        }
        Err(e) => {
            if let Sink::Disk(b) = sink {
                b.abandon();
            }
            Err(e)
        }
    }
}

type Built = (Vec<Vec<Weight>>, Vec<Vec<f64>>);

struct Builder<'a> {
    model: &'a Model,
    ladder: &'a Ladder,
    sink: &'a Sink,
    progress: &'a (dyn Fn(usize, usize) + Sync),
    cancelled: &'a (dyn Fn() -> bool + Sync),
    done: AtomicUsize,
}

impl Builder<'_> {
    fn total(&self) -> usize {
        self.model.blocks.len() * LINEAR_KINDS.len() * self.ladder.len()
    }

    fn embed(&self, windows: &[Vec<u32>]) -> Vec<Vec<f32>> {
        windows
            .iter()
            .map(|w| {
                let mut x = Vec::new();
                self.model.embed_tokens(w, &mut x);
                x
            })
            .collect()
    }

    /// Every level of the linears `kinds` of block `l` against `h`; with `cross`, Hessian-based methods compress
    /// the error-feedback target instead of the dense weight (as `compress_model` does). Returns, per kind, the
    /// levels' weights and relative errors.
    fn stage(&self, l: usize, kinds: &[usize], h: &Hessian, cross: Option<&[f64]>) -> Result<Vec<Vec<(Weight, f64)>>> {
        let levels = self.ladder.len();
        let kinds_n = LINEAR_KINDS.len();
        let dense: Vec<Matrix> = kinds
            .iter()
            .map(|&k| {
                let w = &self.model.blocks[l].linears[k].weight;
                Matrix::from_vec(w.rows(), w.cols(), weight_f32(w))
            })
            .collect();
        let results: Vec<Result<(Weight, f64)>> = (0..kinds.len() * levels)
            .into_par_iter()
            .map(|i| {
                let (ki, j) = (i / levels, i % levels);
                let k = kinds[ki];
                let name = Model::module_name(l, LINEAR_KINDS[k]);
                let level = &self.ladder.levels[j];
                let fail = |e: CompressError| match e {
                    CompressError::Cancelled => WhittleError::Cancelled,
                    e => WhittleError::Invalid(format!("{name} at level {}: {e}", level.label)),
                };
                let out = match &level.job {
                    // Stored like the others so that a cached database is complete on its own.
                    None => (self.sink.keep(l * kinds_n + k, j, dense[ki].clone())?, 0.0),
                    Some(job) => {
                        let target = match (cross, job.method) {
                            (Some(d), m) if m.uses_hessian() => {
                                shifted_target(&dense[ki], d, h, job.damp).map_err(fail)?
                            }
                            _ => dense[ki].clone(),
                        };
                        let c = compress_layer(job, &target, h, &|| (self.cancelled)()).map_err(fail)?;
                        let err = relative_error(&target, &c.weight, h);
                        (self.sink.keep(l * kinds_n + k, j, c.weight)?, err)
                    }
                };
                (self.progress)(self.done.fetch_add(1, Ordering::Relaxed) + 1, self.total());
                Ok(out)
            })
            .collect();
        let mut it = results.into_iter();
        (0..kinds.len()).map(|_| (0..levels).map(|_| it.next().expect("kinds × levels")).collect()).collect()
    }

    fn dense(&self, windows: &[Vec<u32>]) -> Result<Built> {
        let mut xs = self.embed(windows);
        let n = self.model.blocks.len() * LINEAR_KINDS.len();
        let mut out: Vec<Option<Vec<(Weight, f64)>>> = (0..n).map(|_| None).collect();
        for l in 0..self.model.blocks.len() {
            if (self.cancelled)() {
                return Err(WhittleError::Cancelled);
            }
            let hessians = block_hessians(self.model, l, &mut xs)?;
            for ((_, kinds), h) in STAGES.iter().zip(&hessians) {
                for (k, levels) in kinds.iter().zip(self.stage(l, kinds, h, None)?) {
                    out[l * LINEAR_KINDS.len() + k] = Some(levels);
                }
            }
        }
        Ok(unzip(out))
    }

    fn sequential(&self, windows: &[Vec<u32>], along: &[usize]) -> Result<Built> {
        let model = self.model;
        let mut work = model.clone();
        let mut xs = self.embed(windows);
        let mut xs_dense = xs.clone();
        let n = model.blocks.len() * LINEAR_KINDS.len();
        let mut out: Vec<Option<Vec<(Weight, f64)>>> = (0..n).map(|_| None).collect();
        for l in 0..model.blocks.len() {
            for (site, kinds) in STAGES {
                if (self.cancelled)() {
                    return Err(WhittleError::Cancelled);
                }
                let cols = model.blocks[l].linears[kinds[0]].weight.cols();
                let (h, cross) = collect_hessian_and_cross(&work, l, &mut xs, &mut xs_dense, &model.blocks[l], None, site, cols)?;
                for (k, levels) in kinds.iter().zip(self.stage(l, kinds, &h, Some(&cross))?) {
                    // Later stages and blocks are calibrated on this linear at the level `along` gives it.
                    let i = l * LINEAR_KINDS.len() + k;
                    work.blocks[l].linears[*k].weight = levels[along[i]].0.clone();
                    out[i] = Some(levels);
                }
            }
            run_block(&work, l, &mut xs, true, None, &mut |_, _| Ok(()))?;
            run_block_with(model, &model.blocks[l], l, &mut xs_dense, true, None, None, &mut |_| Ok(()))?;
        }
        Ok(unzip(out))
    }
}

fn unzip(out: Vec<Option<Vec<(Weight, f64)>>>) -> Built {
    out.into_iter()
        .map(|o| o.expect("every linear visited").into_iter().unzip::<Weight, f64, Vec<Weight>, Vec<f64>>())
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::{calibration_windows, CalibSettings};
    use crate::compress_model::compress_model;
    use crate::model::load_model;
    use crate::model::source::DEFAULT_CALIBRATION_TEXT;
    use crate::plan::Plan;
    use crate::search::ladder::GridArgs;
    use std::path::Path;

    fn setup() -> (crate::model::LoadedModel, Vec<Vec<u32>>, Ladder) {
        let m = load_model(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/stories260k")).unwrap();
        let w = calibration_windows(&m.tokenizer, DEFAULT_CALIBRATION_TEXT, &CalibSettings { samples: 8, ctx: 64 }, "t")
            .unwrap();
        (m, w, Ladder::parse("gptq:2,3,4", &GridArgs { group: Some(32), ..Default::default() }).unwrap())
    }

    fn dense_f32(w: &Weight) -> Vec<f32> {
        weight_f32(w)
    }

    #[test]
    fn sequential_levels_along_an_allocation_are_what_compress_builds() {
        let (m, windows, ladder) = setup();
        // Along a mixed allocation: w3 everywhere but w2 for the o_projs and w4 for all of layer 1.
        let along: Vec<usize> = (0..35).map(|i| if i / 7 == 1 { 2 } else if i % 7 == 3 { 0 } else { 1 }).collect();
        let db = levels_database(&m.model, &windows, &ladder, Some(&along), None, &|_, _| {}, &|| false)
            .unwrap();
        let plan = Plan::from_toml_str(
            "[[rules]]\nmodules = \"*\"\nbits = 3\ngroup = 32\n[[rules]]\nmodules = \"*.o_proj\"\nbits = 2\n\
             [[rules]]\nmodules = \"model.layers.1.*\"\nbits = 4\n",
            Path::new("t"),
        )
        .unwrap();
        let resolved = plan.resolve(&m.model.linear_shapes(), 0, 32.0).unwrap();
        let mut compressed = m.model.clone();
        compress_model(&mut compressed, &resolved, &windows, &mut |_| {}, &|| false).unwrap();
        for (i, lin) in compressed.blocks.iter().flat_map(|b| b.linears.iter()).enumerate() {
            assert!(dense_f32(&db.weights[i][along[i]]) == dense_f32(&lin.weight), "linear {i}: not what compress built");
            let other = (along[i] + 1) % 3;
            assert!(dense_f32(&db.weights[i][other]) != dense_f32(&lin.weight), "linear {i}: levels do not differ");
        }
    }

    #[test]
    fn dense_levels_lose_less_with_more_bits() {
        let (m, windows, ladder) = setup();
        let done = AtomicUsize::new(0);
        let db = levels_database(&m.model, &windows, &ladder, None, None, &|d, n| {
            assert!(d <= n);
            done.fetch_max(d, Ordering::Relaxed);
        }, &|| false)
        .unwrap();
        assert_eq!(done.load(Ordering::Relaxed), 35 * 3, "progress reaches the total");
        assert_eq!(db.weights.len(), 35);
        for (i, e) in db.rel_errors.iter().enumerate() {
            assert!(e[0] > e[1] && e[1] > e[2] && e[2] > 0.0, "linear {i}: {e:?}");
        }
    }

    #[test]
    fn a_cancelled_build_stops_and_leaves_no_folder() {
        let (m, windows, ladder) = setup();
        let root = tempfile::tempdir().unwrap();
        let key = crate::search::cache::CacheKey::levels(serde_json::json!("m"), &windows, &ladder, serde_json::json!("dense"));
        let store = LevelsStore::new(root.path(), key);
        let calls = AtomicUsize::new(0);
        let r = levels_database(&m.model, &windows, &ladder, None, Some(&store), &|_, _| {}, &|| {
            calls.fetch_add(1, Ordering::Relaxed) > 3
        });
        assert!(matches!(r, Err(WhittleError::Cancelled)), "{:?}", r.err());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0, "temporary folder removed");
    }
}
