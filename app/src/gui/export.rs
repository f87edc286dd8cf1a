//! The Export pane's state and work: writing a variant as a folder vLLM, transformers or GPTQModel load, through
//! `core::export::export_model`, the entry point `whittle export` uses. The variant's plan is checked against the
//! format (`check_plan`) as soon as either is chosen, so a refusal names its layers before anything runs; the
//! export itself is its own [`Job`] with progress, and a refused or failed export writes nothing.

use super::jobs::{Ended, Job, Sink};
use super::state::{AppState, Variant};
use super::work::JobError;
use eframe::egui;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use whittle_core::compress::types::QuantizedLinear;
use whittle_core::export::{check_plan, export_model, parse_size, ExportOptions, ExportReport, ModelCard, ModelFormat};
use whittle_core::model::LoadedModel;

pub struct ExportState {
    /// The variant to export.
    pub variant: Option<u64>,
    pub format: ModelFormat,
    /// Folder to create (typed, or chosen with the dialog).
    pub out: String,
    /// Largest safetensors file, e.g. `5GB`.
    pub shard_size: String,
    pub force: bool,
    /// `check_plan`'s verdict for (variant, format), recomputed when either changes.
    pub precheck: Option<((u64, ModelFormat), Result<(), String>)>,
    pub job: Option<Job<ExportMsg>>,
    pub progress: (usize, usize),
    /// The last successful export, kept on screen (with its buttons) when a later one fails.
    pub report: Option<ExportReport>,
    /// Why the last export failed, if it did.
    pub failure: Option<String>,
}

impl Default for ExportState {
    fn default() -> Self {
        ExportState {
            variant: None,
            format: ModelFormat::Gptq,
            out: String::new(),
            shard_size: "5GB".into(),
            force: false,
            precheck: None,
            job: None,
            progress: (0, 0),
            report: None,
            failure: None,
        }
    }
}

pub enum ExportMsg {
    Progress { done: usize, total: usize },
    Done(Result<ExportReport, JobError>),
}

/// The formats a variant can be written in: a packed format needs compressed layers, so the original (dense)
/// model only goes out as f16 or bf16.
pub fn formats_for(v: &Variant) -> &'static [ModelFormat] {
    if v.is_original() && v.quantized.is_empty() {
        &[ModelFormat::F16, ModelFormat::Bf16]
    } else {
        &ModelFormat::ALL
    }
}

struct ExportInput {
    model: Arc<LoadedModel>,
    quantized: Arc<BTreeMap<String, QuantizedLinear>>,
    opts: ExportOptions,
}

fn work(input: ExportInput, sink: &Sink<ExportMsg>) {
    let result = export_model(&input.model, &input.quantized, &input.opts, &mut |done, total| {
        sink.send(ExportMsg::Progress { done, total })
    });
    sink.send(ExportMsg::Done(result.map_err(JobError::from)));
}

/// What the model card says about a variant: its plan and, when evaluated, its quality against the original.
fn card(v: &Variant, original: Option<&Variant>, state: &AppState) -> ModelCard {
    let mut card = ModelCard::default();
    if let Some(plan) = &v.plan {
        card.plan_name = Some(v.name.clone());
        card.plan_toml = Some(plan.to_toml());
        let c = &state.settings.calib;
        let text = state.settings.calib_text.as_ref().map_or("the built-in TinyStories text".into(), |p| p.display().to_string());
        card.calibration = Some(format!("up to {} windows of {} tokens from {text}", c.samples, c.ctx));
    }
    let key = state.eval_key();
    if let Some(Ok(r)) = v.report(&key) {
        card.ppl = Some(r.ppl);
        card.kl = r.kl;
        card.base_ppl = original.and_then(|o| o.report(&key)).and_then(|r| r.as_ref().ok()).map(|r| r.ppl);
        let text = key.text.as_ref().map_or("the built-in held-out text".into(), |p| p.display().to_string());
        card.eval_data = Some(format!("{text} (up to {} tokens, windows of {})", key.max_tokens, key.ctx));
    }
    card
}

impl AppState {
    /// The variant chosen for export, if it still exists.
    pub fn export_variant(&self) -> Option<&Variant> {
        self.export.variant.and_then(|id| self.variants.iter().find(|v| v.id == id))
    }

    /// Re-runs `check_plan` when the variant or the format changed.
    pub fn export_precheck(&mut self) {
        let Some(v) = self.export_variant() else {
            self.export.precheck = None;
            return;
        };
        let key = (v.id, self.export.format);
        if self.export.precheck.as_ref().is_some_and(|(k, _)| *k == key) {
            return;
        }
        let verdict = match (&v.plan, &self.model) {
            (Some(plan), Some(original)) => crate::cli::plan_args::resolve(plan, original)
                .map_err(|e| format!("{e:#}"))
                .and_then(|resolved| check_plan(original, &resolved, self.export.format).map_err(|e| e.to_string())),
            _ => Ok(()),
        };
        self.export.precheck = Some((key, verdict));
    }

    /// Starts the export of the chosen variant.
    pub fn start_export(&mut self, ctx: &egui::Context) {
        if self.export.job.is_some() {
            return;
        }
        let Some(v) = self.export_variant() else {
            self.error("Choose a variant to export.");
            return;
        };
        let e = &self.export;
        let checked = if e.out.trim().is_empty() {
            Err("Choose the folder to export into.".to_string())
        } else if !formats_for(v).contains(&e.format) {
            Err(format!("{} is not compressed: export it as f16 or bf16, or compress it first.", v.name))
        } else {
            parse_size(&e.shard_size).map_err(|why| format!("Shard size {why}"))
        };
        let max_shard_bytes = match checked {
            Ok(b) => b,
            Err(why) => {
                self.error(why);
                return;
            }
        };
        let original = self.variants.iter().find(|o| o.is_original());
        let opts = ExportOptions {
            force: e.force,
            max_shard_bytes,
            card: card(v, original, self),
            ..ExportOptions::new(e.format, PathBuf::from(e.out.trim()))
        };
        let input = ExportInput { model: v.model.clone(), quantized: v.quantized.clone(), opts };
        let label = format!("Exporting {} as {}", v.name, e.format);
        self.export.failure = None;
        self.export.progress = (0, 0);
        self.export.job = Some(Job::spawn(label, ctx, move |s| work(input, s)));
    }

    /// Applies export events; called every frame.
    pub fn poll_export(&mut self) {
        let Some(job) = &mut self.export.job else { return };
        let (events, ended) = job.poll();
        for e in events {
            match e {
                ExportMsg::Progress { done, total } => self.export.progress = (done, total),
                ExportMsg::Done(Ok(report)) => {
                    self.status = format!("Exported {}", report.out.display());
                    self.export.report = Some(report);
                }
                ExportMsg::Done(Err(e)) => {
                    let why = match e {
                        JobError::Cancelled => "cancelled".to_string(),
                        JobError::Failed(e) => e,
                    };
                    self.export.failure = Some(why.clone());
                    self.error(format!("Export failed; nothing was written: {why}"));
                }
            }
        }
        if let Some(ended) = ended {
            self.export.job = None;
            if let Ended::Panicked(why) = ended {
                self.error(format!("Export failed with an internal error: {why}"));
            }
        }
    }
}

/// Shows a folder in the system's file manager.
pub fn open_folder(path: &std::path::Path) -> Result<(), String> {
    let program = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(target_os = "windows") {
        "explorer"
    } else {
        "xdg-open"
    };
    let mut child = std::process::Command::new(program)
        .arg(path)
        .spawn()
        .map_err(|e| format!("cannot run {program} to show {}: {e}", path.display()))?;
    // Reap it when the file manager's launcher exits, so no zombie is left behind.
    std::thread::spawn(move || child.wait());
    Ok(())
}
