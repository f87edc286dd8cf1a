//! What the jobs do: the background halves of opening a model, compressing it and evaluating variants, plus the
//! file dialogs (which block their caller until the user answers). Each function runs on a job thread, calls the
//! same core functions as the CLI, and reports through [`Event`]s; none touches UI state, so the window only ever
//! sees finished values.

use super::jobs::Sink;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use whittle_core::calib::{calibration_windows, CalibSettings};
use whittle_core::compress::types::QuantizedLinear;
use whittle_core::compress_model::{compress_model, CompressEvent, LayerResult};
use whittle_core::eval::{check_ctx, evaluate, read_text, windows, EvalReport};
use whittle_core::model::source::{resolve, HubProgress, ModelSource, DEFAULT_CALIBRATION_TEXT};
use whittle_core::model::{load_model, LoadedModel};
use whittle_core::plan::{Plan, ResolvedPlan};
use whittle_core::WhittleError;

/// Why a job produced no result.
#[derive(Clone, Debug, PartialEq)]
pub enum JobError {
    Cancelled,
    Failed(String),
}

impl From<WhittleError> for JobError {
    fn from(e: WhittleError) -> Self {
        match e {
            WhittleError::Cancelled => JobError::Cancelled,
            e => JobError::Failed(e.to_string()),
        }
    }
}

/// What a file dialog was opened for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pick {
    ModelFolder,
    PlanFile,
    EvalText,
    CalibText,
    ExportFolder,
}

/// A compressed model, ready to become a variant.
pub struct Compressed {
    pub plan: Plan,
    pub model: Arc<LoadedModel>,
    pub layers: Vec<LayerResult>,
    /// The integer form of every quantized linear, which export and the packed chat runtime need.
    pub quantized: Arc<BTreeMap<String, QuantizedLinear>>,
    pub avg_bits: f64,
    pub size_bytes: u64,
    pub seconds: f64,
}

/// Which text and windows an evaluation used; a report is shown only next to the settings that produced it.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalKey {
    pub text: Option<PathBuf>,
    pub ctx: usize,
    pub max_tokens: usize,
}

pub enum Event {
    Download(HubProgress),
    Loaded { spec: String, result: Result<Arc<LoadedModel>, JobError> },
    Stage { layer: usize, stage: &'static str, done: usize, total: usize },
    Layer(LayerResult),
    Compressed(Result<Compressed, JobError>),
    EvalProgress { variant: String, done: usize, total: usize },
    Evaluated { id: u64, key: EvalKey, result: Result<EvalReport, JobError> },
    EvalDone(Result<(), JobError>),
    Picked { pick: Pick, path: Option<PathBuf> },
}

/// Resolves (downloading a Hub model) and loads a model.
pub fn open(spec: String, sink: &Sink<Event>) {
    let source = whittle_core::model::source::parse_source(Some(&spec));
    let result = (|| {
        let dir = resolve(&source, &mut |p| sink.send(Event::Download(p)), &|| sink.cancelled())?;
        if sink.cancelled() {
            return Err(JobError::Cancelled);
        }
        Ok(Arc::new(load_model(&dir)?))
    })();
    let spec = if source == ModelSource::Default { "default".to_string() } else { spec };
    sink.send(Event::Loaded { spec, result });
}

pub struct CompressInput {
    pub original: Arc<LoadedModel>,
    pub plan: Plan,
    pub resolved: ResolvedPlan,
    pub calib: CalibSettings,
    /// `None`: the built-in TinyStories text.
    pub calib_text: Option<PathBuf>,
}

/// The calibration text and how to name it in messages.
fn calibration_text(path: &Option<PathBuf>) -> Result<(String, String), JobError> {
    Ok(match path {
        Some(p) => (read_text(p)?, p.display().to_string()),
        None => (DEFAULT_CALIBRATION_TEXT.to_string(), "the built-in calibration text".to_string()),
    })
}

/// Calibrates and compresses a copy of the original model, streaming stages and per-layer results.
pub fn compress(input: CompressInput, sink: &Sink<Event>) {
    let result = (|| {
        let (text, origin) = calibration_text(&input.calib_text)?;
        let max_pos = input.original.model.config.max_position_embeddings;
        if input.calib.ctx > max_pos {
            return Err(JobError::Failed(format!(
                "calibration window {} tokens is longer than the model's max_position_embeddings ({max_pos}) in config.json",
                input.calib.ctx
            )));
        }
        let windows = calibration_windows(&input.original.tokenizer, &text, &input.calib, &origin)?;
        let mut model = (*input.original).clone();
        let out = compress_model(
            &mut model.model,
            &input.resolved,
            &windows,
            &mut |e| {
                sink.send(match e {
                    CompressEvent::Stage { layer, stage, done, total } => Event::Stage { layer, stage, done, total },
                    CompressEvent::Layer(l) => Event::Layer(l),
                })
            },
            &|| sink.cancelled(),
        )?;
        Ok(Compressed {
            plan: input.plan,
            model: Arc::new(model),
            layers: out.layers,
            quantized: Arc::new(out.quantized),
            avg_bits: out.avg_bits,
            size_bytes: input.resolved.size_bytes,
            seconds: out.seconds,
        })
    })();
    sink.send(Event::Compressed(result));
}

/// Tokens of the built-in text that calibration may use (128 windows of 256); evaluation on the built-in text
/// starts after them, so it never scores text the compressor has seen at the default settings.
pub const BUILTIN_HELD_OUT_FROM: usize = 128 * 256;

pub struct EvalInput {
    pub reference: Arc<LoadedModel>,
    /// Variant id, name, model, and whether it is the reference itself (no KL against itself).
    pub targets: Vec<(u64, String, Arc<LoadedModel>, bool)>,
    pub key: EvalKey,
}

/// Perplexity of every target on the chosen text, with KL and top-1 against the reference.
pub fn evaluate_all(input: EvalInput, sink: &Sink<Event>) {
    let result = (|| {
        let tokens = match &input.key.text {
            Some(p) => input.reference.tokenizer.encode(&read_text(p)?)?,
            None => {
                let all = input.reference.tokenizer.encode(DEFAULT_CALIBRATION_TEXT)?;
                all.get(BUILTIN_HELD_OUT_FROM..).unwrap_or_default().to_vec()
            }
        };
        let what = input.key.text.as_ref().map_or("the built-in held-out text".to_string(), |p| p.display().to_string());
        let wins = windows(&tokens, input.key.ctx, Some(input.key.max_tokens));
        check_ctx(&input.reference.model, input.key.ctx, wins.len(), &what)?;
        for (id, name, model, is_reference) in &input.targets {
            let reference = (!is_reference).then_some(&input.reference.model);
            let progress = |done: usize, total: usize| sink.send(Event::EvalProgress { variant: name.clone(), done, total });
            let result = evaluate(&model.model, reference, &wins, &progress, &|| sink.cancelled()).map_err(JobError::from);
            let cancelled = matches!(result, Err(JobError::Cancelled));
            sink.send(Event::Evaluated { id: *id, key: input.key.clone(), result });
            if cancelled {
                return Err(JobError::Cancelled);
            }
        }
        Ok(())
    })();
    sink.send(Event::EvalDone(result));
}

/// Shows a native dialog (xdg portal) and reports the choice; `None` when dismissed or unavailable.
pub fn pick(pick: Pick, start: Option<PathBuf>, sink: &Sink<Event>) {
    let mut dialog = rfd::FileDialog::new();
    if let Some(dir) = start.filter(|d| d.is_dir()) {
        dialog = dialog.set_directory(dir);
    }
    let path = match pick {
        Pick::ModelFolder => dialog.set_title("Open a Hugging Face model folder").pick_folder(),
        Pick::PlanFile => dialog.set_title("Open a plan").add_filter("plan", &["toml", "json"]).pick_file(),
        Pick::EvalText => dialog.set_title("Evaluation text").add_filter("text", &["txt"]).pick_file(),
        Pick::CalibText => dialog.set_title("Calibration text").add_filter("text", &["txt"]).pick_file(),
        Pick::ExportFolder => dialog.set_title("Export into this folder").pick_folder(),
    };
    sink.send(Event::Picked { pick, path });
}
