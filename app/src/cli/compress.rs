//! `whittle compress`: calibrate and compress a model under a plan, print the per-layer table (or JSON).

use super::plan_args::{resolve, run_compression, CalibArgs, PlanArgs};
use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct CompressArgs {
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub calib: CalibArgs,
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
    let out = run_compression(&mut m, &resolved, &a.calib, a.json)?;
    if a.json {
        let v = serde_json::json!({
            "layers": out.layers,
            "avg_bits": out.avg_bits,
            "size_bytes": resolved.size_bytes,
            "seconds": out.seconds,
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
    }
    Ok(())
}
