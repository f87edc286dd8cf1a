//! The Search pane's state and work: an EvoPress search (`core::search::run_search`) over the model in the
//! window, run as its own [`Job`] beside the main one (a search takes minutes; compressing or evaluating meanwhile
//! is fine). The form turns into `SearchSettings` the way `whittle search` turns its flags into them, with the
//! window's calibration settings; events are folded into what the pane draws (the fitness curve, the best
//! allocation, throughput). Pause and cancel go through core's `SearchControl`, which the search polls between
//! generations and selection stages.

use super::jobs::{Ended, Job, Sink};
use super::plan_edit::save_preset;
use super::state::AppState;
use super::work::JobError;
use crate::cli::search::parse_selection;
use eframe::egui;
use std::sync::Arc;
use whittle_core::calib::CalibSettings;
use whittle_core::eval::read_text;
use whittle_core::model::source::DEFAULT_CALIBRATION_TEXT;
use whittle_core::model::LoadedModel;
use whittle_core::plan::Plan;
use whittle_core::search::cache::default_cache_root;
use whittle_core::search::{
    run_search, Accounting, Budget, EvoSettings, Granularity, GridArgs, Ladder, LevelsCalibration, Scored, SearchControl,
    SearchEvent, SearchOutcome, SearchSettings, SearchSpace,
};

/// What the user sets in the pane.
#[derive(Clone, Debug)]
pub struct SearchForm {
    /// `gptq:2,3,4,5,6`, `sparsegpt:0,10,…,70`, `sparsegpt:0,25,50@4` (as `whittle search --levels`).
    pub ladder: String,
    /// Group size of quantized levels; -1 = per output channel.
    pub group: i64,
    pub asym: bool,
    /// Target average bits per weight (quantizing ladders).
    pub target_bits: f64,
    /// Count scales and zero points (the table's bits/weight) rather than code bits only.
    pub stored_bits: bool,
    /// Target average sparsity (ladders that only prune).
    pub target_sparsity: f64,
    pub generations: usize,
    pub offspring: usize,
    pub seed: u64,
    /// Selection stages `WINDOWS:SURVIVORS,…` (as `--selection`).
    pub selection: String,
    pub fitness_windows: usize,
    pub fitness_ctx: usize,
    /// Keep the levels database on disk, so the next search of this model and ladder starts at once.
    pub cache: bool,
}

impl Default for SearchForm {
    fn default() -> Self {
        SearchForm {
            ladder: "gptq:2,3,4,5,6".into(),
            group: 32,
            asym: true,
            target_bits: 3.5,
            stored_bits: true,
            target_sparsity: 0.5,
            generations: 50,
            offspring: 16,
            seed: 0,
            selection: "2:4,8:1,32:1".into(),
            fitness_windows: 32,
            fitness_ctx: 128,
            cache: true,
        }
    }
}

impl SearchForm {
    /// The ladder, or why it does not parse.
    pub fn parse_ladder(&self) -> Result<Ladder, String> {
        let group = match self.group {
            -1 => None,
            g if g >= 1 => Some(g as usize),
            g => return Err(format!("group {g}: must be ≥ 1, or -1 for per-channel")),
        };
        let grid = GridArgs { group, sym: !self.asym, ..Default::default() };
        Ladder::parse(&self.ladder, &grid)
    }

    /// A ladder none of whose levels quantizes is budgeted in sparsity; any other in bits.
    pub fn sparsity_budget(&self) -> bool {
        self.parse_ladder().is_ok_and(|l| l.levels.iter().all(|lv| lv.bits().is_none()))
    }

    pub fn settings(&self, calib: &CalibSettings) -> Result<SearchSettings, String> {
        let ladder = self.parse_ladder()?;
        let budget = if self.sparsity_budget() {
            Budget::AvgSparsity { sparsity: self.target_sparsity }
        } else {
            let accounting = if self.stored_bits { Accounting::Stored } else { Accounting::Code };
            Budget::AvgBits { bits: self.target_bits, accounting }
        };
        let stages = parse_selection(&self.selection).map_err(|e| e.to_string())?;
        Ok(SearchSettings {
            ladder,
            granularity: Granularity::default(),
            budget,
            calib: calib.clone(),
            levels_calibration: LevelsCalibration::Dense,
            rounds: 1,
            fitness_windows: self.fitness_windows,
            fitness_ctx: self.fitness_ctx,
            evo: EvoSettings {
                generations: self.generations,
                offspring: self.offspring,
                seed: self.seed,
                stages,
                ..Default::default()
            },
            cache_dir: self.cache.then(default_cache_root),
            start: None,
        })
    }
}

pub enum SearchMsg {
    Event(SearchEvent),
    Done(Result<SearchOutcome, JobError>),
}

/// One point of the fitness curve: generation, best KL so far.
pub type CurvePoint = [f64; 2];

#[derive(Default)]
pub struct SearchState {
    pub form: SearchForm,
    pub job: Option<Job<SearchMsg>>,
    pub control: SearchControl,
    /// The model the current (or last) search ran on; its plan only applies to that model.
    pub model: Option<Arc<LoadedModel>>,
    pub space: Option<Arc<SearchSpace>>,
    /// What the search is doing, for the pane's status line.
    pub phase: String,
    /// Fraction of the current phase (levels database) done.
    pub fraction: f32,
    pub curve: Vec<CurvePoint>,
    pub uniform: Option<Scored>,
    pub dp: Option<Scored>,
    /// Level per unit of the best allocation so far, and its KL.
    pub best: Option<(Vec<usize>, f64)>,
    pub generation: usize,
    pub generations: usize,
    pub evaluations_per_second: f64,
    pub paused: bool,
    /// How the last search ended.
    pub outcome: Option<SearchOutcome>,
    /// Name for "Save plan".
    pub save_name: String,
}

impl SearchState {
    pub fn running(&self) -> bool {
        self.job.is_some()
    }

    /// The best allocation so far as a plan.
    pub fn best_plan(&self) -> Option<Plan> {
        let (space, (levels, fitness)) = (self.space.as_ref()?, self.best.as_ref()?);
        let b = &space.costs.budget;
        let description = format!(
            "EvoPress search in the workbench: ladder {}, target {} {}, reached {:.4}; KL vs dense {fitness:.5} nats \
             after {} of {} generations",
            space.ladder.labels().join(","),
            b.target(),
            b.unit(),
            space.costs.measure_of(levels),
            self.generation,
            self.generations
        );
        Some(space.plan(levels, "evopress", &description))
    }

    pub fn pause_resume(&mut self) {
        if self.control.is_paused() {
            self.control.resume();
        } else {
            self.control.pause();
        }
        self.paused = self.control.is_paused();
    }

    pub fn cancel(&mut self) {
        self.control.cancel();
        // A paused search must wake up to see the cancel.
        self.control.resume();
        self.paused = false;
        self.phase = "cancelling…".into();
    }

    fn apply(&mut self, event: SearchEvent) {
        match event {
            SearchEvent::Started(space) => {
                self.best = Some((space.start.clone(), f64::NAN));
                self.space = Some(space);
                self.phase = "building the levels database".into();
            }
            SearchEvent::Levels { done, total, .. } => {
                self.fraction = done as f32 / total.max(1) as f32;
                self.phase = format!("levels database: {done} of {total} (linear, level) variants");
            }
            SearchEvent::LevelsReady { cached, seconds, .. } => {
                self.fraction = 1.0;
                let how = if cached { "loaded from the cache" } else { "built" };
                self.phase = format!("levels database {how} in {seconds:.1} s; caching the dense model's outputs");
            }
            SearchEvent::Reference { windows, tokens, .. } => {
                self.phase = format!("dense reference on {windows} windows ({tokens} tokens); scoring baselines");
            }
            SearchEvent::Baseline { name, scored } => {
                if name == "uniform" {
                    self.best = Some((scored.levels.clone(), scored.fitness));
                    self.uniform = Some(scored);
                } else {
                    self.dp = Some(scored);
                }
                self.phase = "searching".into();
            }
            SearchEvent::Generation(g) => {
                self.curve.push([g.generation as f64, g.best_fitness]);
                self.generation = g.generation;
                self.generations = g.generations;
                self.evaluations_per_second = g.evaluations_per_second;
                self.best = Some((g.levels, g.best_fitness));
                self.phase = format!("generation {} of {}", g.generation, g.generations);
            }
            SearchEvent::Paused => self.phase = "paused".into(),
            SearchEvent::Resumed => self.phase = "searching".into(),
        }
    }
}

/// Runs one search; on its own thread through [`Job`], so it gets the low-priority pool like every job.
fn work(model: Arc<LoadedModel>, text: Option<std::path::PathBuf>, settings: SearchSettings, control: SearchControl, sink: &Sink<SearchMsg>) {
    let result: Result<SearchOutcome, JobError> = (|| {
        let (text, origin) = match &text {
            Some(p) => (read_text(p)?, p.display().to_string()),
            None => (DEFAULT_CALIBRATION_TEXT.to_string(), "the built-in calibration text".to_string()),
        };
        Ok(run_search(&model, &text, &origin, &settings, &control, &mut |e| sink.send(SearchMsg::Event(e)))?)
    })();
    sink.send(SearchMsg::Done(result));
}

impl AppState {
    /// Starts a search on the model in the window with the form's settings.
    pub fn start_search(&mut self, ctx: &egui::Context) {
        if self.search.running() {
            return;
        }
        let Some(model) = self.model.clone() else {
            self.error("Open a model first.");
            return;
        };
        let settings = match self.search.form.settings(&self.settings.calib) {
            Ok(s) => s,
            Err(e) => {
                self.error(format!("Cannot search: {e}"));
                return;
            }
        };
        let form = std::mem::take(&mut self.search.form);
        let save_name = std::mem::take(&mut self.search.save_name);
        self.search = super::search::SearchState { form, save_name, ..Default::default() };
        let s = &mut self.search;
        s.generations = settings.evo.generations;
        s.phase = "checking the settings".into();
        s.model = Some(model.clone());
        let control = s.control.clone();
        let text = self.settings.calib_text.clone();
        s.job = Some(Job::spawn("Searching", ctx, move |sink| work(model, text, settings, control, sink)));
    }

    /// Applies search events; called every frame.
    pub fn poll_search(&mut self) {
        let Some(job) = &mut self.search.job else { return };
        let (events, ended) = job.poll();
        let mut failure = None;
        for e in events {
            match e {
                SearchMsg::Event(e) => self.search.apply(e),
                SearchMsg::Done(Ok(out)) => {
                    let s = &mut self.search;
                    s.best = Some((out.best.levels.clone(), out.best.fitness));
                    s.generation = out.generations;
                    s.phase = format!(
                        "{} after {} generations in {:.1} s ({:.1} evaluations/s); best KL {:.5}",
                        if out.cancelled { "cancelled" } else { "finished" },
                        out.generations,
                        out.total_seconds,
                        out.evaluations as f64 / out.search_seconds.max(1e-9),
                        out.best.fitness
                    );
                    s.outcome = Some(out);
                }
                SearchMsg::Done(Err(JobError::Cancelled)) => self.search.phase = "cancelled before the search started".into(),
                SearchMsg::Done(Err(JobError::Failed(e))) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            self.search.phase = "failed".into();
            self.error(format!("Search failed: {e}"));
        }
        if let Some(ended) = ended {
            self.search.job = None;
            self.search.paused = false;
            if let Ended::Panicked(why) = ended {
                self.search.phase = "failed".into();
                self.error(format!("Search failed with an internal error: {why}"));
            }
        }
    }

    /// Puts the best allocation found so far into the plan table, ready to Compress.
    pub fn use_search_plan(&mut self) {
        let Some(plan) = self.search.best_plan() else { return };
        let same_model = matches!((&self.model, &self.search.model), (Some(a), Some(b)) if Arc::ptr_eq(a, b));
        let (Some(model), Some(editor), true) = (self.model.clone(), self.plan.as_mut(), same_model) else {
            self.error("The search ran on another model than the one open now; run it again on this model.");
            return;
        };
        match editor.apply_plan(&plan, &model) {
            Ok(()) => {
                let bits = editor.resolved.as_ref().map_or(0.0, |r| r.avg_bits);
                self.status = format!("Plan table set to the searched allocation ({bits:.2} bits/weight); Compress to try it");
            }
            Err(e) => self.error(format!("Cannot use the searched plan: {e}")),
        }
    }

    /// Writes the best allocation as `<presets>/<name>.toml`.
    pub fn save_search_plan(&mut self) {
        let Some(plan) = self.search.best_plan() else { return };
        match save_preset(&self.presets_dir, &self.search.save_name, plan) {
            Ok(path) => self.status = format!("Saved the searched plan to {}", path.display()),
            Err(e) => self.error(format!("Cannot save the searched plan: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_builds_the_settings_the_cli_would() {
        let form = SearchForm { cache: false, ..Default::default() };
        let s = form.settings(&CalibSettings { samples: 8, ctx: 64 }).unwrap();
        assert_eq!(s.ladder.levels.len(), 5);
        assert_eq!(s.budget, Budget::AvgBits { bits: 3.5, accounting: Accounting::Stored });
        assert_eq!(s.calib.samples, 8);
        assert_eq!(s.evo.stages.len(), 3);
        let sparse = SearchForm { ladder: "sparsegpt:0,25,50,75".into(), ..form.clone() };
        assert!(sparse.sparsity_budget());
        assert_eq!(sparse.settings(&CalibSettings::default()).unwrap().budget, Budget::AvgSparsity { sparsity: 0.5 });
        let bad = SearchForm { selection: "2-4".into(), ..form };
        assert!(bad.settings(&CalibSettings::default()).unwrap_err().contains("WINDOWS:SURVIVORS"));
    }
}
