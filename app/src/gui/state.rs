//! Everything the window knows, in one place the panes borrow: the persisted settings, the loaded model, the plan
//! being edited, the variants compressed so far, the running job and the messages to show. Panes draw and call the
//! actions here (`open`, `compress`, `evaluate`, `cancel`); job events are applied at the start of each frame
//! (`events.rs`).
//! Keeping the actions off the panes is what lets keyboard shortcuts, menus and tests trigger exactly what the
//! buttons do.

use super::chat::ChatState;
use super::export::ExportState;
use super::jobs::Job;
use super::search::SearchState;
use super::plan_edit::{default_presets_dir, PlanEditor};
use super::work::{self, CompressInput, EvalInput, EvalKey, Event, Pick};
use eframe::egui;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use whittle_core::compress::types::QuantizedLinear;
use whittle_core::compress_model::LayerResult;
use whittle_core::estimate::{check_fits, estimate, Estimate, Mode};
use whittle_core::eval::EvalReport;
use whittle_core::model::LoadedModel;
use whittle_core::plan::Plan;

pub use super::settings::{EvalSettings, Settings, Theme};

/// One row of the Compare table: the original model or a compressed copy of it.
pub struct Variant {
    pub id: u64,
    pub name: String,
    /// `None` for the original.
    pub plan: Option<Plan>,
    pub model: Arc<LoadedModel>,
    pub size_bytes: u64,
    pub avg_bits: f64,
    pub layers: Vec<LayerResult>,
    /// The integer form of its quantized linears (empty for a float original), for export and the packed chat.
    pub quantized: Arc<BTreeMap<String, QuantizedLinear>>,
    pub seconds: f64,
    pub eval: Option<(EvalKey, Result<EvalReport, String>)>,
}

impl Variant {
    pub fn is_original(&self) -> bool {
        self.plan.is_none()
    }
    /// The report for `key`, if one was computed with exactly those settings.
    pub fn report(&self, key: &EvalKey) -> Option<&Result<EvalReport, String>> {
        self.eval.as_ref().filter(|(k, _)| k == key).map(|(_, r)| r)
    }
}

/// Per-layer results of the compression shown in the plots: the running one, or the last finished.
pub struct Run {
    pub name: String,
    pub layers: Vec<LayerResult>,
    pub total: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Level {
    Error,
    Info,
}

pub struct Message {
    pub level: Level,
    pub text: String,
}

/// What the status bar shows for the running job.
#[derive(Default)]
pub struct Progress {
    pub fraction: f32,
    pub text: String,
    /// When the first unit of work finished, and how many units are done, for the ETA.
    pub done: usize,
    pub total: usize,
    pub first_done: Option<Instant>,
}

impl Progress {
    /// Remaining time extrapolated from the units done so far.
    pub fn eta(&self) -> Option<Duration> {
        let t0 = self.first_done?;
        if self.done < 2 || self.total <= self.done {
            return None;
        }
        let per = t0.elapsed().as_secs_f64() / (self.done - 1) as f64;
        Some(Duration::from_secs_f64(per * (self.total - self.done) as f64))
    }
}

/// Time spent building frames, to keep the "no frame longer than 50 ms while a job runs" promise visible.
/// Wall time is what the user sees; the UI thread's CPU time is what the app itself spends (on a machine
/// oversubscribed by other processes the two part ways).
#[derive(Default)]
pub struct FrameStats {
    pub last_ms: f64,
    pub last_cpu_ms: f64,
    /// Longest frame (wall, and CPU) since the current (or last) job started.
    pub max_busy_ms: f64,
    pub max_busy_cpu_ms: f64,
    pub busy_frames: usize,
}

impl FrameStats {
    pub fn record(&mut self, wall_ms: f64, cpu_ms: f64, busy: bool) {
        self.last_ms = wall_ms;
        self.last_cpu_ms = cpu_ms;
        if busy {
            self.max_busy_ms = self.max_busy_ms.max(wall_ms);
            self.max_busy_cpu_ms = self.max_busy_cpu_ms.max(cpu_ms);
            self.busy_frames += 1;
        }
    }
}

/// CPU time of the calling thread in milliseconds (Linux; elsewhere `None`).
pub fn thread_cpu_ms() -> Option<f64> {
    #[cfg(target_os = "linux")]
    {
        let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec we own.
        let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } == 0;
        ok.then(|| t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 / 1e6)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// What the panes drew last frame, for the status bar and for tests that assert on what is on screen.
#[derive(Default)]
pub struct Drawn {
    /// Bars in the per-layer error plot.
    pub error_bars: usize,
    /// Rows in the Compare table.
    pub compare_rows: usize,
}

/// What the running job is, so its events are applied in context.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum JobKind {
    Open,
    Compress,
    Evaluate,
}

pub struct AppState {
    pub settings: Settings,
    pub model: Option<Arc<LoadedModel>>,
    /// The spec the model was opened from (`default`, a folder, a Hub id).
    pub model_spec: Option<String>,
    pub plan: Option<PlanEditor>,
    pub variants: Vec<Variant>,
    pub run: Option<Run>,
    /// Variants shown side by side in the Compare pane.
    pub pair: (Option<u64>, Option<u64>),
    pub job: Option<(JobKind, Job<Event>)>,
    pub progress: Progress,
    /// A file dialog waiting for the user; separate from `job` so a dialog can be open while work runs.
    pub dialog: Option<Job<Event>>,
    pub messages: Vec<Message>,
    /// One line on how the last job ended.
    pub status: String,
    pub frame: FrameStats,
    pub drawn: Drawn,
    pub presets_dir: PathBuf,
    /// Evaluate new variants as soon as they are compressed.
    pub auto_evaluate: bool,
    pub(super) evaluate_next: bool,
    /// The Search, Chat and Export panes' work, each with its own job beside `job`.
    pub search: SearchState,
    pub chat: ChatState,
    pub export: ExportState,
    next_id: u64,
}

impl AppState {
    pub fn new(settings: Settings) -> Self {
        AppState {
            settings,
            model: None,
            model_spec: None,
            plan: None,
            variants: Vec::new(),
            run: None,
            pair: (None, None),
            job: None,
            progress: Progress::default(),
            dialog: None,
            messages: Vec::new(),
            status: String::new(),
            frame: FrameStats::default(),
            drawn: Drawn::default(),
            presets_dir: default_presets_dir(),
            auto_evaluate: true,
            evaluate_next: false,
            search: SearchState::default(),
            chat: ChatState::default(),
            export: ExportState::default(),
            next_id: 0,
        }
    }

    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    /// What compressing the open model with the plan in the table and the calibration settings would cost in
    /// the window (in memory), and why it cannot start where it would not fit; `None` without a model or a
    /// valid plan.
    pub fn compress_estimate(&self) -> Option<(Estimate, Result<(), String>)> {
        let (model, editor) = (self.model.as_ref()?, self.plan.as_ref()?);
        let resolved = editor.resolved.as_ref().ok()?;
        let c = &self.settings.calib;
        let dtype_bytes = model.model.embed.dtype.size() as u64;
        let threads = rayon::current_num_threads();
        let e = estimate(&model.model.config, resolved, dtype_bytes, c.samples, c.ctx, threads, Mode::InMemory);
        let fits = check_fits(&e, None);
        Some((e, fits))
    }

    pub fn error(&mut self, text: impl Into<String>) {
        self.messages.push(Message { level: Level::Error, text: text.into() });
    }

    pub fn info(&mut self, text: impl Into<String>) {
        self.messages.push(Message { level: Level::Info, text: text.into() });
    }

    fn start(&mut self, kind: JobKind, job: Job<Event>) {
        self.progress = Progress::default();
        self.frame.max_busy_ms = 0.0;
        self.frame.max_busy_cpu_ms = 0.0;
        self.frame.busy_frames = 0;
        self.job = Some((kind, job));
    }

    /// Opens a model folder, Hub id or `default` in the background. Refused while another job runs.
    pub fn open(&mut self, spec: &str, ctx: &egui::Context) {
        let spec = spec.trim().to_string();
        if spec.is_empty() {
            self.error("Type a model folder or a Hugging Face id (owner/name), or pick one.");
            return;
        }
        if self.busy() {
            self.error("Wait for the running job to finish, or cancel it, before opening another model.");
            return;
        }
        let label = format!("Opening {spec}");
        self.start(JobKind::Open, Job::spawn(label, ctx, move |s| work::open(spec, s)));
        self.progress.text = "resolving and loading".into();
    }

    /// Compresses the original model with the plan in the table.
    pub fn compress(&mut self, ctx: &egui::Context) {
        if self.busy() {
            return;
        }
        let (Some(model), Some(editor)) = (self.model.clone(), self.plan.as_ref()) else {
            self.error("Open a model first.");
            return;
        };
        let resolved = match &editor.resolved {
            Ok(r) => r.clone(),
            Err(e) => {
                let e = e.clone();
                self.error(format!("The plan cannot run: {e}"));
                return;
            }
        };
        if let Some((_, Err(why))) = self.compress_estimate() {
            self.error(format!("Not compressing: {why}."));
            return;
        }
        let mut plan = editor.to_plan();
        let name = editor.name();
        plan.name = Some(name.clone());
        self.run = Some(Run { name: name.clone(), layers: Vec::new(), total: resolved.modules.len() });
        let input = CompressInput {
            original: model,
            plan,
            resolved,
            calib: self.settings.calib.clone(),
            calib_text: self.settings.calib_text.clone(),
        };
        self.start(JobKind::Compress, Job::spawn(format!("Compressing {name}"), ctx, move |s| work::compress(input, s)));
    }

    pub fn eval_key(&self) -> EvalKey {
        let e = &self.settings.eval;
        EvalKey { text: e.text.clone(), ctx: e.ctx, max_tokens: e.max_tokens }
    }

    /// Evaluates every variant that has no report for the current evaluation settings.
    pub fn evaluate(&mut self, ctx: &egui::Context) {
        if self.busy() {
            return;
        }
        let Some(original) = self.variants.iter().find(|v| v.is_original()).map(|v| v.model.clone()) else {
            self.error("Open a model first.");
            return;
        };
        let key = self.eval_key();
        let targets: Vec<_> = self
            .variants
            .iter()
            .filter(|v| v.report(&key).is_none())
            .map(|v| (v.id, v.name.clone(), v.model.clone(), v.is_original()))
            .collect();
        if targets.is_empty() {
            self.status = "Every variant is evaluated on this text.".into();
            return;
        }
        let n = targets.len();
        let input = EvalInput { reference: original, targets, key };
        self.start(JobKind::Evaluate, Job::spawn(format!("Evaluating {n} variant(s)"), ctx, move |s| work::evaluate_all(input, s)));
    }

    pub fn cancel(&mut self) {
        if let Some((_, job)) = &self.job {
            job.cancel();
            self.progress.text = format!("{} — cancelling…", job.label);
        }
    }

    /// Opens a native file dialog on its own thread.
    pub fn pick(&mut self, pick: Pick, ctx: &egui::Context) {
        if self.dialog.is_some() {
            return;
        }
        let start = match pick {
            Pick::PlanFile => Some(self.presets_dir.clone()),
            Pick::ExportFolder => Some(PathBuf::from(self.export.out.trim())).filter(|p| p.is_dir()).or_else(|| std::env::current_dir().ok()),
            _ => std::env::current_dir().ok(),
        };
        self.dialog = Some(Job::spawn("file dialog", ctx, move |s| work::pick(pick, start, s)));
    }

    /// Applies a plan file to the table.
    pub fn load_plan(&mut self, path: &std::path::Path) {
        let (Some(model), Some(editor)) = (self.model.clone(), self.plan.as_mut()) else { return };
        let applied = Plan::from_file(path).map_err(|e| e.to_string()).and_then(|plan| editor.apply_plan(&plan, &model));
        match applied {
            Ok(()) => {
                let file = path.file_name().map(|f| f.to_string_lossy().into_owned());
                if path.parent() == Some(self.presets_dir.as_path()) {
                    self.settings.last_preset = file;
                }
            }
            Err(e) => self.error(e),
        }
    }

    /// Saves the table as a preset in the presets folder.
    pub fn save_plan(&mut self, name: &str) {
        let Some(editor) = self.plan.as_mut() else { return };
        match editor.save(&self.presets_dir, name) {
            Ok(path) => {
                self.settings.last_preset = path.file_name().map(|f| f.to_string_lossy().into_owned());
                self.status = format!("Saved {}", path.display());
            }
            Err(e) => self.error(format!("Cannot save the preset: {e}")),
        }
    }

    pub fn remove_variant(&mut self, id: u64) {
        self.variants.retain(|v| v.id != id || v.is_original());
        for slot in [&mut self.pair.0, &mut self.pair.1] {
            if slot.is_some_and(|s| !self.variants.iter().any(|v| v.id == s)) {
                *slot = None;
            }
        }
    }

    pub(super) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}
