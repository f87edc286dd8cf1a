//! `whittle synth`: a seeded random-init Llama folder of a real shape, for speed and memory measurements.

use super::progress;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use whittle_core::synth::{synth, SynthDType, SynthShape};

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// tiny (the default's shape), 1b (TinyLlama-1.1B), 7b (Llama-2-7B).
    #[arg(long)]
    pub shape: SynthShape,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f16")]
    pub dtype: SynthDType,
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing folder.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: SynthArgs) -> Result<()> {
    let bar = progress::bytes_bar("synth");
    synth(a.shape, a.seed, a.dtype, &a.out, a.force, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    println!("wrote {}", a.out.display());
    Ok(())
}
