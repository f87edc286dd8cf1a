//! `whittle chat`: talk to a model, compressed or not, on the packed kernels. The model is loaded (an export
//! folder with its quantized linears as they are), compressed when a plan is given, then packed with
//! `runtime::pack_model`, so replies come from the stored bits, never from dequantized float matrices. The prompt
//! follows the model's chat template (`core::chat`); replies stream to stdout token by token.
//!
//! Interactive by default (one line per message, `/reset` starts over, end of input quits); `--prompt` answers
//! one message and exits, for scripts and tests.

use super::plan_args::{resolve, run_compression, CalibArgs, PlanArgs};
use super::sampling::{SamplingArgs, SamplingDefaults};
use anyhow::Result;
use clap::Args;
use std::io::{BufRead, Write};
use whittle_core::chat::{ChatMessage, ChatTemplate, TextStream};
use whittle_core::model::generate::{generate, GenerateOptions, Sampling};
use whittle_core::model::LoadedModel;
use whittle_core::runtime::{pack_model, weight_bytes, PackReport};

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Model folder or Hub id (default: the embedded stories260k); a `whittle export` folder runs its stored codes.
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// cpu or cuda: the linears a CUDA kernel runs (4-bit packed, 2:4 int4, f16) go to the GPU; without a usable GPU it
    /// runs on the CPU and says why.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling (default: --temperature 0.7, --top-p 0.9).
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Answer this one message and exit (no interactive loop).
    #[arg(long)]
    pub prompt: Option<String>,
}

impl ChatArgs {
    fn sampling(&self) -> Result<Sampling> {
        self.sampling.to_sampling(&SamplingDefaults { sample: true, temperature: 0.7, top_p: 0.9 })
    }
}

fn pack_line(report: Option<&PackReport>, model: &LoadedModel) -> String {
    let what = match report {
        None => "dense weights (no plan)".to_string(),
        Some(r) => {
            let mut s = format!("packed {} linears", r.packed);
            if r.sparse24 > 0 {
                s.push_str(&format!(", {} 2:4 sparse", r.sparse24));
            }
            if !r.dense.is_empty() {
                s.push_str(&format!(", {} dense", r.dense.len()));
            }
            s
        }
    };
    format!("{what}; weights {:.2} MB resident", weight_bytes(&model.model) as f64 / 1e6)
}

/// Generates one reply to `history`, streaming it to stdout; returns the reply text.
fn reply(m: &LoadedModel, template: &ChatTemplate, history: &[ChatMessage], opts: &GenerateOptions) -> Result<String> {
    let ids = template.prompt_ids(m, history)?;
    let mut stream = TextStream::new(&m.tokenizer, opts.stop_ids.clone());
    let mut out = std::io::stdout();
    let generated = generate(&m.model, &ids, opts, &mut |id| {
        let text = stream.push(id);
        if !text.is_empty() {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
        true
    });
    println!();
    let tps = generated.ids.len().saturating_sub(1) as f64 / generated.decode_seconds.max(1e-9);
    eprintln!("[{} tokens, {tps:.1} tokens/s]", generated.ids.len());
    Ok(stream.text().to_string())
}

pub fn run(a: ChatArgs) -> Result<()> {
    let sampling = a.sampling()?;
    let mut m = super::load(a.model.as_deref())?;
    let report = if a.plan.given() {
        let resolved = resolve(&a.plan.to_plan()?, &m)?;
        let out = run_compression(&mut m, &resolved, &a.calib, false)?;
        Some(pack_model(&mut m.model, &out.quantized))
    } else if !m.quantized.is_empty() {
        // An export folder: its linears run their stored codes already; packing again reports what runs.
        let quantized = m.quantized.clone();
        Some(pack_model(&mut m.model, &quantized))
    } else {
        None
    };
    let placement = super::device::place_model(&a.device, &mut m.model)?;
    eprintln!("{}; {}", pack_line(report.as_ref(), &m), placement.line);
    if let Some(r) = &report {
        for (name, why) in &r.dense {
            eprintln!("  {name} stays dense: {why}");
        }
    }
    for (why, names) in placement.cpu_reasons_grouped() {
        eprintln!("  {} on the CPU ({}{}): {why}", names.len(), names[0], if names.len() > 1 { ", …" } else { "" });
    }
    let template = ChatTemplate::from_dir(&m.dir)?;
    if !template.has_template() {
        eprintln!("no chat_template in tokenizer_config.json: the conversation is given to the model as plain text");
    }
    let opts = GenerateOptions { max_new_tokens: a.max_tokens, sampling, stop_ids: m.eos_ids() };

    if let Some(prompt) = &a.prompt {
        reply(&m, &template, &[ChatMessage::user(prompt.as_str())], &opts)?;
        return Ok(());
    }
    eprintln!("type a message and press Enter; /reset starts a new conversation; Ctrl+D quits");
    let mut history: Vec<ChatMessage> = Vec::new();
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/reset" => {
                history.clear();
                eprintln!("(new conversation)");
                continue;
            }
            "/quit" | "/exit" => return Ok(()),
            _ => {}
        }
        history.push(ChatMessage::user(line));
        match reply(&m, &template, &history, &opts) {
            Ok(text) => history.push(ChatMessage::assistant(text)),
            Err(e) => {
                // A conversation past the context cannot go on; the user starts over instead of the program ending.
                eprintln!("error: {e:#}");
                history.clear();
                eprintln!("(new conversation)");
            }
        }
    }
}
