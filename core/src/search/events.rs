//! What a running search tells its caller, and how the caller steers it. The CLI maps events to progress bars and
//! rewrites the plan file on every improvement; the GUI forwards them through a channel and draws the allocation.
//! Pause and cancel are shared flags polled at safe points (between generations and selection stages, inside
//! long evaluations for cancel), so the search never blocks a frame and always stops promptly.

use super::space::SearchSpace;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Flags the caller flips while a search runs.
#[derive(Clone, Debug, Default)]
pub struct SearchControl {
    pub pause: Arc<AtomicBool>,
    pub cancel: Arc<AtomicBool>,
}

impl SearchControl {
    pub fn pause(&self) {
        self.pause.store(true, Ordering::Relaxed);
    }
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Relaxed);
    }
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
    pub fn is_paused(&self) -> bool {
        self.pause.load(Ordering::Relaxed)
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// An assignment with its scores.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scored {
    /// Level index per unit.
    pub levels: Vec<usize>,
    /// Mean KL vs the dense model on the final-stage windows (nats).
    pub fitness: f64,
    /// The budget's measure of this assignment (average bits, bytes, or average sparsity).
    pub measure: f64,
    /// Σ per-linear relative error of the levels (the DP's objective).
    pub layer_error: f64,
}

/// One finished generation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GenerationReport {
    /// 1-based.
    pub generation: usize,
    pub generations: usize,
    /// Fitness of the parent after this generation (the best so far).
    pub best_fitness: f64,
    /// Whether a child replaced the parent in this generation.
    pub improved: bool,
    /// Level per unit of the best assignment.
    pub levels: Vec<usize>,
    /// Candidate evaluations so far (a candidate on one stage's windows counts once).
    pub evaluations: u64,
    /// Tokens run through candidate models so far.
    pub tokens: u64,
    pub evaluations_per_second: f64,
    pub tokens_per_second: f64,
    /// Search time so far, paused time excluded.
    pub seconds: f64,
}

#[derive(Clone, Debug)]
pub enum SearchEvent {
    /// Settings checked: the units, ladder, costs and start assignment. Keep it to name units and write plans.
    Started(Arc<SearchSpace>),
    /// Levels database of round `round` (1-based): `done` of `total` (linear, level) variants ready.
    Levels { round: usize, done: usize, total: usize },
    /// The levels database of a round is ready (`cached`: loaded from `dir` without compressing anything).
    LevelsReady { round: usize, cached: bool, dir: Option<PathBuf>, seconds: f64 },
    /// The dense model's distributions on the fitness windows are cached.
    Reference { windows: usize, tokens: usize, seconds: f64 },
    /// A baseline allocation ("uniform" or "dp") with its fitness on the final-stage windows.
    Baseline { name: &'static str, scored: Scored },
    Generation(GenerationReport),
    Paused,
    Resumed,
}
