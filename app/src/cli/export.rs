//! `whittle export`: compress a model under a plan (or take it as loaded: a float model for f16/bf16, or an
//! imported quantized checkpoint to re-export) and write it as a folder vLLM, transformers or GPTQModel load.
//! The target is checked before compressing, and every layer before writing, so a refused export costs nothing
//! and leaves nothing behind.

use super::plan_args::{resolve, run_compression_with, CalibArgs, PlanArgs, Resumable};
use super::progress;
use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;
use whittle_core::eval::{check_ctx, evaluate, read_text, windows};
use whittle_core::checkpoint::CheckpointForms;
use whittle_core::export::{
    check_plan, check_target, export_model_from, parse_size, ExportOptions, ModelCard, ModelFormat, QuantizedSource,
};
use whittle_core::model::{LoadedModel, Model};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Model folder or Hub id (default: the embedded stories260k); may itself be a GPTQ or compressed-tensors export.
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// gptq, compressed-tensors, f16 or bf16.
    #[arg(long)]
    pub format: ModelFormat,
    /// Folder to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it exists (the old folder stays until the new one is complete).
    #[arg(long)]
    pub force: bool,
    /// Largest safetensors file, e.g. 2GB, 500MB, 4GiB.
    #[arg(long, default_value = "5GB")]
    pub shard_size: String,
    /// Measure perplexity (and KL against the uncompressed model) on this text and put it in the model card.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Window length for --eval-data.
    #[arg(long, default_value_t = 256)]
    pub eval_ctx: usize,
    /// Use only the first N tokens of --eval-data.
    #[arg(long)]
    pub eval_max_tokens: Option<usize>,
    /// Discard the finished layers an interrupted run left in OUT.partial instead of resuming from them.
    #[arg(long)]
    pub restart: bool,
    /// Print a JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Where a compression for `out` keeps its finished layers until the export is written: next to the target, so a
/// killed job resumes from it and the target itself only ever appears complete.
pub fn partial_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

/// Measured quality for the model card.
struct Measured {
    ppl: f64,
    base_ppl: Option<f64>,
    kl: Option<f64>,
}

fn measure(model: &Model, reference: Option<&Model>, a: &ExportArgs, data: &Path, m: &LoadedModel) -> Result<Measured> {
    let text = read_text(data)?;
    let tokens = m.tokenizer.encode(&text)?;
    let wins = windows(&tokens, a.eval_ctx, a.eval_max_tokens);
    check_ctx(model, a.eval_ctx, wins.len(), &data.display().to_string())?;
    let bar = progress::bar(wins.len() as u64, "eval");
    let report = evaluate(model, reference, &wins, &|done, _| bar.set_position(done as u64), &|| false)?;
    let base = match reference {
        Some(r) => Some(evaluate(r, None, &wins, &|_, _| {}, &|| false)?.ppl),
        None => None,
    };
    bar.finish_and_clear();
    Ok(Measured { ppl: report.ppl, base_ppl: base, kl: report.kl })
}

fn calibration_text(c: &CalibArgs) -> String {
    let origin = c.calib.as_ref().map_or("assets/tinystories_train_calib.txt".to_string(), |p| p.display().to_string());
    format!("up to {} windows of {} tokens from {origin}", c.calib_samples, c.calib_ctx)
}

pub fn run(a: ExportArgs) -> Result<()> {
    let start = Instant::now();
    let max_shard_bytes = parse_size(&a.shard_size).map_err(|e| anyhow::anyhow!("--shard-size {e}"))?;
    let mut opts = ExportOptions { force: a.force, max_shard_bytes, ..ExportOptions::new(a.format, &a.out) };
    let mut m = super::load(a.model.as_deref())?;
    check_target(&opts, &m.dir)?;

    let mut card = ModelCard::default();
    let compressed: Option<CheckpointForms> = if a.plan.given() {
        let plan = a.plan.to_plan()?;
        // An imported quantized model is recompressed from its dequantized weights.
        m.dequantize_linears();
        let resolved = resolve(&plan, &m)?;
        check_plan(&m, &resolved, a.format).context("the plan cannot be exported in this format")?;
        card.plan_name = Some(plan.name.clone().unwrap_or_else(|| "command-line rule".into()));
        card.plan_toml = Some(plan.to_toml());
        card.calibration = Some(calibration_text(&a.calib));
        let original = a.eval_data.is_some().then(|| m.model.clone());
        let partial = partial_dir(&a.out);
        // Measuring runs the compressed model, so only then are its quantized linears packed into it.
        let resumable = Resumable { dir: &partial, restart: a.restart, pack: a.eval_data.is_some() };
        let (_, forms) = run_compression_with(&mut m, &resolved, &a.calib, a.json, Some(resumable))?;
        if let Some(data) = &a.eval_data {
            let measured = measure(&m.model, original.as_ref(), &a, data, &m)?;
            card.ppl = Some(measured.ppl);
            card.base_ppl = measured.base_ppl;
            card.kl = measured.kl;
        }
        // The integer forms stay in the checkpoint folder and are read one layer at a time while writing.
        forms
    } else {
        if let Some(data) = &a.eval_data {
            card.ppl = Some(measure(&m.model, None, &a, data, &m)?.ppl);
        }
        None
    };
    if let Some(data) = &a.eval_data {
        card.eval_data = Some(format!(
            "{} ({} tokens at most, windows of {})",
            data.display(),
            a.eval_max_tokens.map_or("all".into(), |n| n.to_string()),
            a.eval_ctx
        ));
    }
    opts.card = card.clone();

    let quantized: &dyn QuantizedSource = match &compressed {
        Some(forms) => forms,
        None => &m.quantized,
    };
    let bar = progress::bar(1, "export");
    if a.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let report = export_model_from(&m, quantized, &opts, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("export to {} failed; nothing was written there", a.out.display()))?;
    bar.finish_and_clear();
    if a.plan.given() {
        // The export is complete; the finished layers it was assembled from are not needed any more.
        let _ = std::fs::remove_dir_all(partial_dir(&a.out));
    }
    let seconds = start.elapsed().as_secs_f64();

    if a.json {
        let v = serde_json::json!({
            "out": report.out,
            "format": report.format,
            "files": report.files,
            "bytes": report.bytes,
            "bits_per_weight": report.bits_per_weight_estimate,
            "quantized_layers": report.quantized_layers,
            "dense_layers": report.dense_layers,
            "sparse24_layers": report.sparse24_layers,
            "warnings": report.warnings,
            "ppl": card.ppl,
            "base_ppl": card.base_ppl,
            "kl": card.kl,
            "seconds": seconds,
        });
        println!("{v}");
    } else {
        const SHOWN: usize = 8;
        for w in report.warnings.iter().take(SHOWN) {
            eprintln!("note: {w}");
        }
        if report.warnings.len() > SHOWN {
            eprintln!("note: … and {} more loader notes in README.md", report.warnings.len() - SHOWN);
        }
        println!("exported {} ({})", report.out.display(), report.format);
        println!(
            "layers   {} quantized, {} sparse 2:4, {} dense",
            report.quantized_layers, report.sparse24_layers, report.dense_layers
        );
        println!("size     {:.3} MB in {} files", report.bytes as f64 / 1e6, report.files.len());
        println!("bits/w   {:.3} (linear layers, as stored)", report.bits_per_weight_estimate);
        if let Some(p) = card.ppl {
            println!("ppl      {p:.6}");
        }
        if let Some(k) = card.kl {
            println!("kl       {k:.6} nats");
        }
        println!("seconds  {seconds:.3}");
    }
    Ok(())
}
