//! `whittle generate`: text from a prompt, greedy or sampled, streamed to stdout.

use anyhow::{bail, Result};
use clap::Args;
use std::io::Write;
use super::sampling::{SamplingArgs, SamplingDefaults};
use whittle_core::model::generate::{generate, GenerateOptions};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[arg(long)]
    pub model: Option<String>,
    /// Prompt text; the model's BOS token is put in front of it.
    #[arg(long, default_value = "")]
    pub prompt: String,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling (default: the most likely token unless --temperature or --top-p is given).
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let loaded = super::load(a.model.as_deref())?;
    let sampling = a.sampling.to_sampling(&SamplingDefaults { sample: false, temperature: 1.0, top_p: 1.0 })?;
    let mut prompt: Vec<u32> = loaded.bos_id().into_iter().collect();
    prompt.extend(loaded.tokenizer.encode(&a.prompt)?);
    if prompt.is_empty() {
        bail!("empty prompt and the model has no BOS token");
    }
    if prompt.len() >= loaded.model.config.max_position_embeddings {
        bail!("prompt of {} tokens does not fit max_position_embeddings {}", prompt.len(), loaded.model.config.max_position_embeddings);
    }
    let opts = GenerateOptions { max_new_tokens: a.max_tokens, sampling, stop_ids: loaded.eos_ids() };
    let mut printed = String::new();
    let mut so_far: Vec<u32> = Vec::new();
    let stream = !a.json;
    if stream {
        print!("{}", a.prompt);
    }
    let out = generate(&loaded.model, &prompt, &opts, &mut |id| {
        if stream && !opts.stop_ids.contains(&id) {
            // Decode the whole continuation and print what is new: byte-fallback tokens only form text together.
            so_far.push(id);
            if let Ok(text) = loaded.tokenizer.decode(&so_far) {
                if text.len() > printed.len() && text.starts_with(&printed) {
                    print!("{}", &text[printed.len()..]);
                    let _ = std::io::stdout().flush();
                    printed = text;
                }
            }
        }
        true
    });
    let body: Vec<u32> = out.ids.iter().copied().filter(|i| !opts.stop_ids.contains(i)).collect();
    let text = loaded.tokenizer.decode(&body)?;
    let tps = out.ids.len().saturating_sub(1) as f64 / out.decode_seconds.max(1e-9);
    if a.json {
        println!("{}", serde_json::json!({"text": text, "ids": out.ids, "tokens_per_second": tps}));
    } else {
        println!();
        eprintln!("{} tokens, {:.1} tokens/s", out.ids.len(), tps);
    }
    Ok(())
}
