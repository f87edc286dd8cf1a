//! Per-layer compression levels chosen by search (EvoPress, algorithms.md §7).
//!
//! Uniform compression spends the same bits on every linear although some hurt the model far more than others
//! when compressed. This module picks a level per unit (linear or block) from a ladder (`ladder`) under a global
//! budget (`budget`: average bits, bytes or sparsity, kept *exactly* by integer costs), judging candidates by what
//! matters, the KL divergence of the whole model's next-token distribution from the dense model's (`fitness`),
//! instead of a sum of per-layer errors, which does not predict the model's loss well.
//!
//! The pieces, one job each:
//! * `ladder`, `units`, `budget`, `space`: what is searched, its exact costs, and conversion to and from plans;
//! * `database` + `cache`: every linear at every level, calibrated once on the dense model, stored on disk;
//! * `fitness`: KL of a candidate against cached dense distributions;
//! * `mutation` + `evolve`: the (1+λ) loop with level-swap mutations and multi-stage selection;
//! * `dp`: the baseline minimizing Σ per-layer error under the same budget;
//! * `events` + `job`: one call (or one thread) running it all with events, pause and cancel.
//!
//! For a GUI: `spawn_search(model, text, origin, settings, notify)` returns a [`SearchJob`] whose `events` channel
//! yields [`SearchEvent`]s and whose `control` pauses, resumes and cancels; `SearchSpace::plan` turns any
//! allocation seen in an event into a preset.

pub mod budget;
pub mod cache;
pub mod database;
pub mod dp;
pub mod events;
pub mod evolve;
pub mod fitness;
pub mod job;
pub mod ladder;
pub mod mutation;
pub mod space;
pub mod units;

pub use budget::{Accounting, Budget, CostTable};
pub use events::{GenerationReport, Scored, SearchControl, SearchEvent};
pub use evolve::{EvoSettings, Stage};
pub use job::{prepare, run_search, spawn_search, LevelsCalibration, SearchJob, SearchOutcome, SearchSettings};
pub use ladder::{GridArgs, Ladder, Level};
pub use space::SearchSpace;
pub use units::Granularity;
