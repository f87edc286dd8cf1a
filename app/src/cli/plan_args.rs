//! The flags that say how to compress, shared by `compress`, `eval` and `export`: a plan file, or the
//! `--method/--bits/--group/...` shorthand for one rule applied to every linear; and the calibration data.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use whittle_core::calib::{calibration_windows, CalibSettings};
use whittle_core::compress::Method;
use whittle_core::checkpoint::{job_key, CheckpointDir, CheckpointForms};
use whittle_core::estimate::{bytes_in, check_fits, estimate, Estimate, Mode};
use whittle_core::compress_model::{compress_model, compress_model_with, CompressEvent, CompressOutput};
use whittle_core::eval::read_text;
use whittle_core::model::source::DEFAULT_CALIBRATION_TEXT;
use whittle_core::model::{load_model, LoadedModel};
use whittle_core::plan::{Plan, ResolvedPlan, Rule};

#[derive(Args, Debug, Clone, Default)]
pub struct PlanArgs {
    /// Plan file (TOML or JSON), e.g. presets/w4g32.toml.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Shorthand for a one-rule plan: gptq, sparsegpt, rtn, magnitude, obc.
    #[arg(long, conflicts_with = "plan")]
    pub method: Option<String>,
    #[arg(long, conflicts_with = "plan")]
    pub bits: Option<u8>,
    /// Group size; -1 = per output channel.
    #[arg(long, conflicts_with = "plan", allow_negative_numbers = true)]
    pub group: Option<i64>,
    /// Asymmetric grid (zero point per group) instead of symmetric.
    #[arg(long, conflicts_with = "plan")]
    pub asym: bool,
    #[arg(long, conflicts_with = "plan")]
    pub act_order: bool,
    /// Search a clipping range per group that minimizes the quantization error (MSE grid search).
    #[arg(long, conflicts_with = "plan")]
    pub mse: bool,
    /// Dampening as a fraction of mean diag(H) (raised automatically when Cholesky fails).
    #[arg(long, conflicts_with = "plan")]
    pub damp: Option<f64>,
    /// Unstructured sparsity fraction, e.g. 0.5.
    #[arg(long, conflicts_with = "plan")]
    pub sparsity: Option<f32>,
    /// N:M sparsity, e.g. 2:4.
    #[arg(long, conflicts_with = "plan")]
    pub nm: Option<String>,
    /// Plain sequential GPTQ/SparseGPT: compress each layer's own weights instead of the error-feedback target.
    #[arg(long)]
    pub no_error_feedback: bool,
}

#[derive(Args, Debug, Clone, Default)]
pub struct CalibArgs {
    /// Calibration text (default: the TinyStories sample shipped in assets/).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub calib_samples: usize,
    #[arg(long, default_value_t = 256)]
    pub calib_ctx: usize,
}

impl PlanArgs {
    pub fn given(&self) -> bool {
        self.plan.is_some() || self.method.is_some() || self.bits.is_some() || self.sparsity.is_some() || self.nm.is_some()
    }

    pub fn to_plan(&self) -> Result<Plan> {
        if let Some(p) = &self.plan {
            let mut plan = Plan::from_file(p)?;
            if self.no_error_feedback {
                plan.error_feedback = Some(false);
            }
            return Ok(plan);
        }
        let method = match self.method.as_deref() {
            None => None,
            Some(m) => Some(
                serde_json::from_value::<Method>(serde_json::Value::String(m.to_string()))
                    .map_err(|_| anyhow::anyhow!("--method {m}: expected gptq, sparsegpt, rtn, magnitude or obc"))?,
            ),
        };
        if self.bits.is_none() && self.sparsity.is_none() && self.nm.is_none() {
            bail!("give --plan FILE, or --bits and/or --sparsity/--nm (with --method)");
        }
        let mut plan = Plan::uniform(Rule {
            method,
            bits: self.bits,
            group: self.group,
            sym: Some(!self.asym),
            act_order: self.act_order.then_some(true),
            mse: self.mse.then_some(true),
            damp: self.damp,
            sparsity: self.sparsity,
            nm: self.nm.clone(),
            ..Default::default()
        });
        if self.no_error_feedback {
            plan.error_feedback = Some(false);
        }
        Ok(plan)
    }
}

/// Bits of the model's float weights, for size estimates.
pub fn dense_bits(m: &LoadedModel) -> f64 {
    match m.model.embed.dtype {
        whittle_kernels::DType::F32 => 32.0,
        _ => 16.0,
    }
}

pub fn resolve(plan: &Plan, m: &LoadedModel) -> Result<ResolvedPlan> {
    let linears = m.model.linear_shapes();
    let linear_params: usize = linears.iter().map(|(_, r, c)| r * c).sum();
    let other = m.model.config.parameter_count().saturating_sub(linear_params) as u64;
    Ok(plan.resolve(&linears, other, dense_bits(m))?)
}

/// Calibrates and compresses `m` in place, with a progress bar on stderr.
pub fn run_compression(m: &mut LoadedModel, plan: &ResolvedPlan, calib: &CalibArgs, quiet: bool) -> Result<CompressOutput> {
    run_compression_with(m, plan, calib, quiet, None).map(|(out, _)| out)
}

/// Where a resumable compression keeps its finished layers, whether to discard what an earlier run left there, and
/// whether the model will run afterwards (`pack`: its quantized linears are put in packed; otherwise they keep the
/// original weights and an export reads their integer forms from the folder, one layer at a time).
pub struct Resumable<'a> {
    pub dir: &'a std::path::Path,
    pub restart: bool,
    pub pack: bool,
}

/// [`run_compression`], optionally streaming finished layers into a checkpoint folder: memory then holds one decoder
/// layer at a time, a restarted run skips the layers already there, and afterwards `m` is a fresh load of the
/// original with the compressed linears put in (see [`Resumable`]), while `quantized` stays empty: the integer forms
/// are in the folder, returned as [`CheckpointForms`] for an export to read layer by layer.
pub fn run_compression_with(
    m: &mut LoadedModel,
    plan: &ResolvedPlan,
    calib: &CalibArgs,
    quiet: bool,
    resumable: Option<Resumable<'_>>,
) -> Result<(CompressOutput, Option<CheckpointForms>)> {
    // An imported quantized checkpoint runs packed weights; compression starts from their float values.
    m.dequantize_linears();
    let (text, origin) = match &calib.calib {
        Some(p) => (read_text(p)?, p.display().to_string()),
        None => (DEFAULT_CALIBRATION_TEXT.to_string(), "assets/tinystories_train_calib.txt".to_string()),
    };
    let settings = CalibSettings { samples: calib.calib_samples, ctx: calib.calib_ctx };
    if settings.ctx > m.model.config.max_position_embeddings {
        bail!("--calib-ctx {} is larger than max_position_embeddings {}", settings.ctx, m.model.config.max_position_embeddings);
    }
    let windows = calibration_windows(&m.tokenizer, &text, &settings, &origin)?;
    let bar = super::progress::bar(plan.modules.len() as u64, "compress");
    if quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut on_event = |e| match e {
        CompressEvent::Stage { layer, stage, done, .. } => {
            bar.set_position(done as u64);
            bar.set_message(format!("layer {layer} {stage}"));
        }
        CompressEvent::Layer(_) => bar.inc(1),
    };
    let Some(r) = resumable else {
        let out = compress_model(&mut m.model, plan, &windows, &mut on_event, &|| false).context("compression failed")?;
        bar.finish_and_clear();
        return Ok((out, None));
    };
    let est = estimate(
        &m.model.config,
        plan,
        (dense_bits(m) / 8.0).ceil() as u64,
        windows.len(),
        settings.ctx,
        rayon::current_num_threads(),
        Mode::Streaming,
    );
    // The checkpoint folder's files are counted in the disk figure but take no new space: a resumed job keeps
    // them, and --restart deletes them first.
    let present = bytes_in(r.dir);
    if !quiet {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let held = if present > 0 { format!(" ({:.2} GiB of it already in {})", gib(present), r.dir.display()) } else { String::new() };
        eprintln!(
            "estimate: peak memory {:.2} GiB (compressing {:.2}, exporting {:.2}), disk {:.2} GiB{held}, time ~{:.0} s (order of magnitude)",
            gib(est.peak_bytes()),
            gib(est.compress_peak_bytes),
            gib(est.export_peak_bytes),
            gib(est.disk_bytes),
            est.seconds
        );
    }
    let new_space = Estimate { disk_bytes: est.disk_bytes.saturating_sub(present), ..est };
    check_fits(&new_space, Some(r.dir)).map_err(|e| anyhow::anyhow!(e))?;
    if r.restart && r.dir.exists() {
        std::fs::remove_dir_all(r.dir).with_context(|| format!("cannot remove {}", r.dir.display()))?;
    }
    let key = job_key(&m.dir, plan, &windows)?;
    let store = m.store.clone();
    let release = Box::new(move |prefix: &str| store.release(prefix));
    let mut checkpoint = CheckpointDir::open(r.dir, &key, Some(release))?;
    let layers = m.model.config.num_layers;
    let done = checkpoint.finished_layers(layers);
    if done > 0 && !quiet {
        eprintln!("resuming: layers 0..{done} of {layers} already compressed in {}", r.dir.display());
    }
    let out = compress_model_with(&mut m.model, plan, &windows, &mut on_event, &|| false, Some(&mut checkpoint))
        .context("compression failed")?;
    bar.finish_and_clear();
    // The streamed model gave its layers up one by one; rebuild it from the original and the checkpoint.
    let forms = CheckpointForms::open(r.dir, layers)?;
    *m = load_model(&m.dir)?;
    forms.apply_to(&mut m.model, r.pack)?;
    Ok((out, Some(forms)))
}
