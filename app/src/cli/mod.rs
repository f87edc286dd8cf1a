//! Command-line interface: one file per subcommand. Results go to stdout (a table, or JSON with `--json`);
//! progress goes to stderr through indicatif so stdout stays machine-readable.

mod bench;
mod chat;
mod compress;
mod device;
mod eval;
mod export;
mod generate;
mod sampling;
pub mod plan_args;
pub mod progress;
pub(crate) mod search;
mod synth;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use whittle_core::model::source::{parse_source, resolve, HubProgress};
use whittle_core::model::{load_model, LoadedModel};

#[derive(Parser, Debug)]
#[command(name = "whittle", version, about = "Compress large language models and see where the damage happens")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Perplexity (and KL / top-1 against a reference) on a text file.
    Eval(eval::EvalArgs),
    /// Chat with a model (compressed and packed with --plan), replies streamed as they are generated.
    Chat(chat::ChatArgs),
    /// Generate text from a prompt.
    Generate(generate::GenerateArgs),
    /// Calibrate and compress a model under a plan; print per-layer errors.
    Compress(compress::CompressArgs),
    /// Write a (compressed) model as GPTQ, compressed-tensors, f16 or bf16 for vLLM / transformers / GPTQModel.
    Export(export::ExportArgs),
    /// Speed figures: decode, prefill, one 7b layer, GEMV vs memory bandwidth.
    Bench(bench::BenchArgs),
    /// Choose a compression level per linear under a budget (EvoPress search); write the plan.
    Search(search::SearchArgs),
    /// Write a seeded random-init Llama folder of a real shape (tiny, 1b, 7b).
    Synth(synth::SynthArgs),
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Eval(a) => eval::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Compress(a) => compress::run(a),
        Command::Export(a) => export::run(a),
        Command::Search(a) => search::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// No subcommand: the workbench window.
pub fn run_default() -> Result<()> {
    crate::gui::run()
}

/// Loads `--model` (folder, Hub id, or the embedded default when omitted), showing download progress on stderr.
pub fn load(spec: Option<&str>) -> Result<LoadedModel> {
    let source = parse_source(spec);
    let bar = progress::bytes_bar("download");
    let mut report = |p: HubProgress| match p {
        HubProgress::File { name, index, count, .. } => bar.set_message(format!("{name} ({}/{count})", index + 1)),
        HubProgress::Bytes { done, total } => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    };
    let dir: PathBuf = resolve(&source, &mut report, &|| false)?;
    bar.finish_and_clear();
    Ok(load_model(&dir)?)
}
