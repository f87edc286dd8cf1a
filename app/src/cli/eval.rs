//! `whittle eval`: perplexity on a text, KL and top-1 agreement against a reference model.

use super::progress;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use whittle_core::eval::{check_ctx, evaluate, read_text, windows};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model folder or Hub id (default: the embedded stories260k).
    #[arg(long)]
    pub model: Option<String>,
    /// UTF-8 text file to evaluate on.
    #[arg(long)]
    pub data: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 256)]
    pub ctx: usize,
    /// Use only the first N tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Reference model for KL divergence and top-1 agreement.
    #[arg(long)]
    pub reference: Option<String>,
    /// Compress with this plan (or shorthand flags) before evaluating; the reference defaults to the original.
    #[command(flatten)]
    pub plan: super::plan_args::PlanArgs,
    #[command(flatten)]
    pub calib: super::plan_args::CalibArgs,
    /// Print a JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let mut loaded = super::load(a.model.as_deref())?;
    let reference = a.reference.as_deref().map(|r| super::load(Some(r))).transpose()?;
    let text = read_text(&a.data)?;
    if a.plan.given() {
        let resolved = super::plan_args::resolve(&a.plan.to_plan()?, &loaded)?;
        super::plan_args::run_compression(&mut loaded, &resolved, &a.calib, a.json)?;
    }
    let tokens = loaded.tokenizer.encode(&text)?;
    let wins = windows(&tokens, a.ctx, a.max_tokens);
    check_ctx(&loaded.model, a.ctx, wins.len(), &a.data.display().to_string())?;
    let bar = progress::bar(wins.len() as u64, "eval");
    let report = evaluate(
        &loaded.model,
        reference.as_ref().map(|r| &r.model),
        &wins,
        &|done, _| bar.set_position(done as u64),
        &|| false,
    )?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("ppl      {:.6}", report.ppl);
        if let (Some(kl), Some(top1)) = (report.kl, report.top1) {
            println!("kl       {kl:.6} nats");
            println!("top1     {:.4}", top1);
        }
        println!("tokens   {} ({} windows of {})", report.tokens, report.windows, a.ctx);
        println!("seconds  {:.3}", report.seconds);
    }
    Ok(())
}
