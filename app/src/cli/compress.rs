//! `whittle compress`: calibrate and compress a model under a plan, print the per-layer table (or JSON).

use super::export::partial_dir;
use super::plan_args::{resolve, run_compression_with, CalibArgs, PlanArgs, Resumable};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use whittle_core::export::{check_plan, check_target, export_model_from, ExportOptions, ModelFormat};

#[derive(Args, Debug)]
pub struct CompressArgs {
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Write the compressed model to this folder. Finished layers stream into OUT.partial as they complete, so
    /// memory holds one decoder layer at a time and a killed run resumes where it stopped.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Format of --out: gptq, compressed-tensors, f16 or bf16.
    #[arg(long, default_value = "gptq", requires = "out")]
    pub format: ModelFormat,
    /// Replace --out if it exists (the old folder stays until the new one is complete).
    #[arg(long, requires = "out")]
    pub force: bool,
    /// Discard the finished layers an interrupted run left in OUT.partial instead of resuming from them.
    #[arg(long, requires = "out")]
    pub restart: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: CompressArgs) -> Result<()> {
    let mut m = super::load(a.model.as_deref())?;
    let plan = a.plan.to_plan()?;
    let resolved = resolve(&plan, &m)?;
    if !a.json {
        eprintln!(
            "plan: {} linears, {:.3} bits/weight on average, model size {:.2} MB",
            resolved.modules.len(),
            resolved.avg_bits,
            resolved.size_bytes as f64 / 1e6
        );
    }
    let export = a.out.as_ref().map(|out| ExportOptions { force: a.force, ..ExportOptions::new(a.format, out) });
    if let Some(opts) = &export {
        // Refuse before any work: an existing target, or layers the format cannot hold.
        check_target(opts, &m.dir)?;
        check_plan(&m, &resolved, a.format).context("the plan cannot be exported in this format")?;
    }
    let partial = a.out.as_deref().map(partial_dir);
    let resumable = partial.as_deref().map(|dir| Resumable { dir, restart: a.restart, pack: false });
    let (out, forms) = run_compression_with(&mut m, &resolved, &a.calib, a.json, resumable)?;
    let written = match (&export, forms, partial.as_deref()) {
        (Some(opts), Some(forms), Some(dir)) => {
            // The integer forms stay in the checkpoint folder and are read one layer at a time while writing.
            let report = export_model_from(&m, &forms, opts, &mut |_, _| {})
                .with_context(|| format!("export to {} failed; nothing was written there", opts.out.display()))?;
            let _ = std::fs::remove_dir_all(dir);
            Some(report)
        }
        _ => None,
    };
    if a.json {
        let v = serde_json::json!({
            "layers": out.layers,
            "avg_bits": out.avg_bits,
            "size_bytes": resolved.size_bytes,
            "seconds": out.seconds,
            "out": written.as_ref().map(|r| &r.out),
            "bytes": written.as_ref().map(|r| r.bytes),
        });
        println!("{v}");
    } else {
        println!("{:<36} {:>9} {:>4} {:>5} {:>8} {:>11} {:>6} {:>8}", "layer", "method", "bits", "group", "sparsity", "rel_error", "bpw", "seconds");
        for l in &out.layers {
            println!(
                "{:<36} {:>9} {:>4} {:>5} {:>8.3} {:>11.3e} {:>6.2} {:>8.4}",
                l.name,
                l.method,
                l.bits.map_or("-".into(), |b| b.to_string()),
                l.group.map_or("-".into(), |g| g.to_string()),
                l.sparsity,
                l.rel_error,
                l.bits_per_weight,
                l.seconds
            );
        }
        println!("avg bits/weight {:.3}, {:.2} s", out.avg_bits, out.seconds);
        if let Some(r) = &written {
            println!("wrote {} ({}, {:.3} MB)", r.out.display(), r.format, r.bytes as f64 / 1e6);
        }
    }
    Ok(())
}
