//! The sampling flags `generate` and `chat` share, and their check.

use anyhow::{bail, Result};
use clap::Args;
use whittle_core::model::generate::Sampling;

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Always take the most likely token.
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "seed"])]
    pub greedy: bool,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
}

/// What a command does when a flag is not given.
pub struct SamplingDefaults {
    /// Sample (rather than take the most likely token) when neither --temperature nor --top-p is given.
    pub sample: bool,
    pub temperature: f32,
    pub top_p: f32,
}

impl SamplingArgs {
    pub fn to_sampling(&self, d: &SamplingDefaults) -> Result<Sampling> {
        if self.greedy || (!d.sample && self.temperature.is_none() && self.top_p.is_none()) {
            return Ok(Sampling::Greedy);
        }
        let temperature = self.temperature.unwrap_or(d.temperature);
        let top_p = self.top_p.unwrap_or(d.top_p);
        // Written so that NaN fails the check too.
        let valid = temperature >= 0.0 && top_p > 0.0 && top_p <= 1.0;
        if !valid {
            bail!("--temperature must be ≥ 0 and --top-p in (0, 1]");
        }
        Ok(Sampling::TopP { temperature, top_p, seed: self.seed.unwrap_or(0) })
    }
}
