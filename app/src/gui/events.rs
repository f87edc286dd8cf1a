//! Applying job events to the state: progress for the status bar, per-layer results as they stream in, and the
//! finished values (a loaded model, a compressed variant, evaluation reports). Runs at the start of each frame on
//! the UI thread, so everything here is bookkeeping, never model work.

use super::jobs::Ended;
use super::plan_edit::PlanEditor;
use super::settings::MAX_RECENT;
use super::state::{AppState, JobKind, Variant};
use super::work::{Compressed, Event, JobError, Pick};
use eframe::egui;
use std::sync::Arc;
use std::time::{Duration, Instant};
use whittle_core::model::source::HubProgress;
use whittle_core::model::LoadedModel;
use whittle_core::plan::Plan;

impl AppState {
    /// Drains job events; called once at the start of every frame.
    pub fn poll_jobs(&mut self, ctx: &egui::Context) {
        self.poll_search();
        self.poll_chat(ctx);
        self.poll_export();
        if self.search.running() || self.chat.generating() || self.export.job.is_some() {
            // Keep elapsed times and rates ticking between events.
            ctx.request_repaint_after(Duration::from_millis(250));
        }
        if let Some(dialog) = &mut self.dialog {
            let (events, ended) = dialog.poll();
            if ended.is_some() {
                self.dialog = None;
            }
            for e in events {
                self.apply(e, ctx);
            }
        }
        let Some((kind, job)) = &mut self.job else { return };
        let kind = *kind;
        let (events, ended) = job.poll();
        for e in events {
            self.apply(e, ctx);
        }
        if let Some(ended) = ended {
            let label = self.job.take().map(|(_, j)| j.label).unwrap_or_default();
            if let Ended::Panicked(why) = ended {
                self.error(format!("{label} failed with an internal error: {why}"));
                self.status = format!("{label}: internal error");
            }
            // A compression hands over to its evaluation, so the table fills in without another click.
            if kind == JobKind::Compress && std::mem::take(&mut self.evaluate_next) && self.auto_evaluate {
                self.evaluate(ctx);
            }
        } else {
            // Keep the elapsed time and ETA ticking between events.
            ctx.request_repaint_after(Duration::from_millis(250));
        }
    }

    fn apply(&mut self, event: Event, ctx: &egui::Context) {
        match event {
            Event::Download(HubProgress::File { name, index, count, .. }) => {
                self.progress.text = format!("Downloading {name} ({}/{count})", index + 1);
            }
            Event::Download(HubProgress::Bytes { done, total }) => {
                self.progress.fraction = if total > 0 { done as f32 / total as f32 } else { 0.0 };
            }
            Event::Loaded { spec, result } => match result {
                Ok(model) => self.loaded(spec, model),
                Err(JobError::Cancelled) => self.status = format!("Opening {spec} cancelled"),
                Err(JobError::Failed(e)) => {
                    self.error(format!("Cannot open {spec}: {e}"));
                    self.status = format!("Opening {spec} failed");
                }
            },
            Event::Stage { layer, stage, done, total } => {
                self.progress.done = done;
                self.progress.total = total;
                self.progress.fraction = done as f32 / total.max(1) as f32;
                self.progress.text = format!("layer {} of {total} · block {layer} {stage}", (done + 1).min(total));
            }
            Event::Layer(l) => {
                self.progress.done += 1;
                self.progress.first_done.get_or_insert_with(Instant::now);
                self.progress.fraction = self.progress.done as f32 / self.progress.total.max(1) as f32;
                if let Some(run) = &mut self.run {
                    run.layers.push(l);
                }
            }
            Event::Compressed(result) => match result {
                Ok(c) => {
                    self.compressed(c);
                    self.evaluate_next = true;
                }
                Err(JobError::Cancelled) => {
                    self.status = "Compression cancelled; the original model is unchanged".into();
                    if let Some(run) = &mut self.run {
                        run.name = format!("{} (cancelled)", run.name);
                    }
                }
                Err(JobError::Failed(e)) => {
                    self.error(format!("Compression failed: {e}"));
                    self.status = "Compression failed".into();
                }
            },
            Event::EvalProgress { variant, done, total } => {
                self.progress.done = done;
                self.progress.total = total;
                self.progress.first_done.get_or_insert_with(Instant::now);
                self.progress.fraction = done as f32 / total.max(1) as f32;
                self.progress.text = format!("evaluating {variant}: window {done} of {total}");
            }
            Event::Evaluated { id, key, result } => {
                if matches!(result, Err(JobError::Cancelled)) {
                    return;
                }
                let result = result.map_err(|e| match e {
                    JobError::Failed(e) => e,
                    JobError::Cancelled => "cancelled".into(),
                });
                if let Some(v) = self.variants.iter_mut().find(|v| v.id == id) {
                    v.eval = Some((key, result));
                }
                self.progress.first_done = None;
            }
            Event::EvalDone(result) => match result {
                Ok(()) if self.status.starts_with("Compressed") => self.status.push_str(", then evaluated"),
                Ok(()) => self.status = "Evaluation finished".into(),
                Err(JobError::Cancelled) => self.status = "Evaluation cancelled".into(),
                Err(JobError::Failed(e)) => {
                    self.error(format!("Evaluation failed: {e}"));
                    self.status = "Evaluation failed".into();
                }
            },
            Event::Picked { path: None, .. } => {}
            Event::Picked { pick, path: Some(path) } => match pick {
                Pick::ModelFolder => self.open(&path.display().to_string(), ctx),
                Pick::PlanFile => self.load_plan(&path),
                Pick::EvalText => self.settings.eval.text = Some(path),
                Pick::CalibText => self.settings.calib_text = Some(path),
                Pick::ExportFolder => self.export.out = path.display().to_string(),
            },
        }
    }

    fn loaded(&mut self, spec: String, model: Arc<LoadedModel>) {
        let mut editor = PlanEditor::for_model(&model);
        if let Some(preset) = &self.settings.last_preset {
            let path = self.presets_dir.join(preset);
            if let Ok(plan) = Plan::from_file(&path) {
                // A preset that does not fit this model leaves the table dense; the user picks another.
                let _ = editor.apply_plan(&plan, &model);
            }
        }
        let dense_bits = crate::cli::plan_args::dense_bits(&model);
        let id = self.next_id();
        self.variants = vec![Variant {
            id,
            name: "original".into(),
            plan: None,
            size_bytes: (model.model.config.parameter_count() as f64 * dense_bits / 8.0) as u64,
            avg_bits: dense_bits,
            model: model.clone(),
            layers: Vec::new(),
            quantized: Arc::new(model.quantized.clone()),
            seconds: 0.0,
            eval: None,
        }];
        self.pair = (Some(id), None);
        self.run = None;
        self.plan = Some(editor);
        self.status = match spec.as_str() {
            "default" => "Opened stories260k (embedded default)".to_string(),
            s => format!("Opened {s}"),
        };
        self.model = Some(model);
        self.settings.recent.retain(|r| *r != spec);
        self.settings.recent.insert(0, spec.clone());
        self.settings.recent.truncate(MAX_RECENT);
        self.model_spec = Some(spec);
    }

    fn compressed(&mut self, c: Compressed) {
        let base = c.plan.name.clone().unwrap_or_else(|| "custom".into());
        let n = self.variants.iter().filter(|v| v.name == base || v.name.starts_with(&format!("{base} #"))).count();
        let name = if n == 0 { base } else { format!("{base} #{}", n + 1) };
        self.status = format!("Compressed {name}: {} layers in {:.1} s", c.layers.len(), c.seconds);
        let id = self.next_id();
        if let Some(run) = &mut self.run {
            run.name = name.clone();
        }
        self.variants.push(Variant {
            id,
            name,
            plan: Some(c.plan),
            model: c.model,
            size_bytes: c.size_bytes,
            avg_bits: c.avg_bits,
            layers: c.layers,
            quantized: c.quantized,
            seconds: c.seconds,
            eval: None,
        });
        // Newest run against the previous pick: the comparison one usually wants next.
        self.pair = match self.pair {
            (Some(a), Some(b)) if a != b => (Some(b), Some(id)),
            (a, _) => (a, Some(id)),
        };
    }
}
