//! The Chat pane's state and work: one conversation answered by two models side by side, the original on the
//! left and a compressed variant on the right, each reply streaming into its column as tokens are generated.
//!
//! The right column runs the variant *packed* (`runtime::pack_model`: the kernels read the stored bits), which is
//! what makes its speed and memory figures mean something. Packing happens once per variant on a background job
//! and the packed model is kept here, not repacked per message. Each column's reply is its own [`Job`], separate
//! from the window's main job, so chatting never waits on (or blocks) a compression.
//!
//! Where a CUDA GPU is found, a switch in the pane packs the variant again with its 4-bit, 2:4 int4 and f16 linears offloaded
//! (`runtime::offload_cuda`); where none is, the pane says why and the switch is absent.

use super::jobs::{Ended, Job, Sink};
use super::state::AppState;
use super::work::JobError;
use eframe::egui;
use std::collections::BTreeMap;
use std::sync::Arc;
use whittle_core::compress::types::QuantizedLinear;
use whittle_core::chat::{ChatMessage, ChatTemplate, TextStream};
use whittle_core::model::generate::{generate, GenerateOptions, Sampling};
use whittle_core::model::LoadedModel;
use whittle_core::runtime::{offload_cuda, pack_model, weight_bytes, OffloadReport, PackReport};
use whittle_kernels::cuda::{cuda_available, CudaDevice};

/// Sampling settings of the pane.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatSettings {
    pub greedy: bool,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub max_tokens: usize,
}

impl Default for ChatSettings {
    fn default() -> Self {
        ChatSettings { greedy: false, temperature: 0.7, top_p: 0.9, seed: 0, max_tokens: 128 }
    }
}

impl ChatSettings {
    fn sampling(&self) -> Sampling {
        if self.greedy {
            Sampling::Greedy
        } else {
            Sampling::TopP { temperature: self.temperature.max(0.0), top_p: self.top_p.clamp(0.01, 1.0), seed: self.seed }
        }
    }
}

pub enum ChatMsg {
    /// New text of the reply being generated.
    Text(String),
    Done(Result<ReplyStats, JobError>),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReplyStats {
    pub tokens: usize,
    pub tokens_per_second: f64,
}

/// One side of the conversation.
#[derive(Default)]
pub struct Column {
    /// The model's replies, one per user turn (the last may be streaming).
    pub replies: Vec<String>,
    pub job: Option<Job<ChatMsg>>,
    /// Speed of the last reply.
    pub stats: Option<ReplyStats>,
    /// Bytes of the weights the forward pass reads.
    pub weight_bytes: usize,
    pub error: Option<String>,
}

impl Column {
    /// The conversation as this model saw it: the user's turns and its own replies.
    fn history(&self, prompts: &[String]) -> Vec<ChatMessage> {
        let mut out = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            out.push(ChatMessage::user(p.as_str()));
            if let Some(r) = self.replies.get(i).filter(|_| i + 1 < prompts.len()) {
                out.push(ChatMessage::assistant(r.as_str()));
            }
        }
        out
    }
}

/// A variant packed for the kernels.
pub struct Packed {
    pub variant: u64,
    pub model: Arc<LoadedModel>,
    pub report: PackReport,
    /// What runs on the GPU, when the pane's GPU switch was on while packing.
    pub gpu: Option<OffloadReport>,
}

/// A packed copy of variant `variant`.
pub struct PackMsg {
    variant: u64,
    model: Box<LoadedModel>,
    report: PackReport,
    gpu: Option<OffloadReport>,
}

/// Whether the compressed column can run on a GPU: probed once in the background (opening the driver and compiling
/// the kernels with NVRTC takes a moment where CUDA exists, and nothing where it does not).
#[derive(Default)]
pub struct GpuState {
    pub probe: Option<Job<Result<Arc<CudaDevice>, String>>>,
    /// The device, or why there is none; `None` until the probe ends.
    pub device: Option<Result<Arc<CudaDevice>, String>>,
    /// The user's switch: run the compressed variant's linears on the GPU.
    pub use_gpu: bool,
}

#[derive(Default)]
pub struct ChatState {
    pub settings: ChatSettings,
    /// The message being typed.
    pub input: String,
    /// The user's turns.
    pub prompts: Vec<String>,
    /// Left: the original; right: the chosen variant.
    pub columns: [Column; 2],
    /// Variant answering in the right column.
    pub variant: Option<u64>,
    pub packed: Option<Packed>,
    pub pack_job: Option<Job<PackMsg>>,
    /// A message sent while the variant was still being packed; it goes out once packing ends.
    waiting: bool,
    /// Times the last turn was regenerated (added to the seed, so a sampled reply changes).
    regenerations: u64,
    pub gpu: GpuState,
}

impl ChatState {
    pub fn generating(&self) -> bool {
        self.columns.iter().any(|c| c.job.is_some()) || self.waiting
    }
}

/// Packs a copy of `model` with its integer linears, then offloads what the GPU kernels run when `gpu` is given.
fn pack(
    variant: u64,
    model: Arc<LoadedModel>,
    quantized: Arc<BTreeMap<String, QuantizedLinear>>,
    gpu: Option<Arc<CudaDevice>>,
    sink: &Sink<PackMsg>,
) {
    let mut m = Box::new((*model).clone());
    let report = pack_model(&mut m.model, &quantized);
    let gpu = gpu.map(|dev| offload_cuda(&mut m.model, &dev));
    sink.send(PackMsg { variant, model: m, report, gpu });
}

/// Generates one reply, streaming its text.
fn reply(model: Arc<LoadedModel>, history: Vec<ChatMessage>, settings: ChatSettings, sink: &Sink<ChatMsg>) {
    let result: whittle_core::Result<ReplyStats> = (|| {
        let template = ChatTemplate::from_dir(&model.dir)?;
        let ids = template.prompt_ids(&model, &history)?;
        let stop_ids = model.eos_ids();
        let opts = GenerateOptions { max_new_tokens: settings.max_tokens, sampling: settings.sampling(), stop_ids: stop_ids.clone() };
        let mut stream = TextStream::new(&model.tokenizer, stop_ids);
        let out = generate(&model.model, &ids, &opts, &mut |id| {
            let text = stream.push(id);
            if !text.is_empty() {
                sink.send(ChatMsg::Text(text));
            }
            !sink.cancelled()
        });
        // The first token comes out of the prefill; decode speed is measured over the rest.
        let tokens_per_second = match out.ids.len() {
            0 => 0.0,
            1 => 1.0 / out.seconds.max(1e-9),
            n => (n - 1) as f64 / out.decode_seconds.max(1e-9),
        };
        Ok(ReplyStats { tokens: out.ids.len(), tokens_per_second })
    })();
    sink.send(ChatMsg::Done(result.map_err(JobError::from)));
}

impl AppState {
    /// Chooses the variant of the right column; packs it in the background unless it is packed already.
    pub fn chat_choose(&mut self, id: u64, ctx: &egui::Context) {
        let c = &mut self.chat;
        c.variant = Some(id);
        if c.packed.as_ref().is_some_and(|p| p.variant == id) {
            return;
        }
        self.chat_repack(ctx);
    }

    /// Packs the chosen variant again (after the GPU switch moved), on the device the switch says.
    pub fn chat_repack(&mut self, ctx: &egui::Context) {
        let c = &mut self.chat;
        let Some(id) = c.variant else { return };
        let Some(v) = self.variants.iter().find(|v| v.id == id) else { return };
        let (model, quantized) = (v.model.clone(), v.quantized.clone());
        let gpu = match &c.gpu.device {
            Some(Ok(dev)) if c.gpu.use_gpu => Some(dev.clone()),
            _ => None,
        };
        c.packed = None;
        c.columns[1].weight_bytes = 0;
        // A pack job for another variant is dropped: its result would be ignored anyway.
        c.pack_job = Some(Job::spawn(format!("Packing {}", v.name), ctx, move |s| pack(id, model, quantized, gpu, s)));
    }

    /// Starts the GPU probe the first time the pane asks.
    pub fn chat_probe_gpu(&mut self, ctx: &egui::Context) {
        let g = &mut self.chat.gpu;
        if g.device.is_none() && g.probe.is_none() {
            g.probe = Some(Job::spawn("Looking for a CUDA GPU", ctx, |s| s.send(cuda_available().map(Arc::new))));
        }
    }

    /// Sends the typed message to both models.
    pub fn chat_send(&mut self, ctx: &egui::Context) {
        let text = self.chat.input.trim().to_string();
        if text.is_empty() || self.chat.generating() {
            return;
        }
        self.chat.input.clear();
        self.chat.prompts.push(text);
        self.chat.regenerations = 0;
        self.chat_start(ctx);
    }

    /// Answers the last message again (sampled replies with the next seed).
    pub fn chat_regenerate(&mut self, ctx: &egui::Context) {
        if self.chat.prompts.is_empty() || self.chat.generating() {
            return;
        }
        let n = self.chat.prompts.len();
        for c in &mut self.chat.columns {
            c.replies.truncate(n - 1);
        }
        self.chat.regenerations += 1;
        self.chat_start(ctx);
    }

    pub fn chat_stop(&mut self) {
        self.chat.waiting = false;
        for c in &self.chat.columns {
            if let Some(j) = &c.job {
                j.cancel();
            }
        }
    }

    /// Forgets the conversation.
    pub fn chat_clear(&mut self) {
        self.chat_stop();
        let c = &mut self.chat;
        c.prompts.clear();
        for col in &mut c.columns {
            col.replies.clear();
            col.stats = None;
            col.error = None;
        }
    }

    /// Starts the replies to the last turn in both columns (the right one once its variant is packed).
    fn chat_start(&mut self, ctx: &egui::Context) {
        let Some(original) = self.variants.iter().find(|v| v.is_original()).map(|v| v.model.clone()) else {
            self.error("Open a model first.");
            return;
        };
        if self.chat.variant.is_none_or(|id| !self.variants.iter().any(|v| v.id == id)) {
            match self.variants.iter().rev().find(|v| !v.is_original()).map(|v| v.id) {
                Some(id) => self.chat_choose(id, ctx),
                None => self.chat.variant = None,
            }
        }
        self.spawn_reply(0, original, ctx);
        if self.chat.variant.is_some() {
            self.chat.waiting = true;
            self.chat_continue(ctx);
        }
    }

    /// Starts the right column's reply once the packed variant is ready.
    fn chat_continue(&mut self, ctx: &egui::Context) {
        if !self.chat.waiting {
            return;
        }
        let ready = self.chat.packed.as_ref().filter(|p| Some(p.variant) == self.chat.variant).map(|p| p.model.clone());
        if let Some(model) = ready {
            self.chat.waiting = false;
            self.spawn_reply(1, model, ctx);
        } else if self.chat.pack_job.is_none() {
            // Packing failed or the variant is gone: the left column answers alone.
            self.chat.waiting = false;
        }
    }

    fn spawn_reply(&mut self, side: usize, model: Arc<LoadedModel>, ctx: &egui::Context) {
        let c = &mut self.chat;
        let mut settings = c.settings.clone();
        settings.seed = settings.seed.wrapping_add(c.regenerations);
        let col = &mut c.columns[side];
        let history = col.history(&c.prompts);
        col.replies.resize(c.prompts.len() - 1, String::new());
        col.replies.push(String::new());
        col.error = None;
        col.weight_bytes = weight_bytes(&model.model);
        let label = if side == 0 { "Chat: original" } else { "Chat: compressed" };
        col.job = Some(Job::spawn(label, ctx, move |s| reply(model, history, settings, s)));
    }

    /// Applies chat and packing events; called every frame.
    pub fn poll_chat(&mut self, ctx: &egui::Context) {
        if let Some(job) = &mut self.chat.pack_job {
            let (events, ended) = job.poll();
            for PackMsg { variant, model, report, gpu } in events {
                if Some(variant) == self.chat.variant {
                    self.chat.columns[1].weight_bytes = weight_bytes(&model.model);
                    self.chat.packed = Some(Packed { variant, model: Arc::from(model), report, gpu });
                }
            }
            if let Some(ended) = ended {
                self.chat.pack_job = None;
                if let Ended::Panicked(why) = ended {
                    self.error(format!("Packing the variant failed with an internal error: {why}"));
                }
                self.chat_continue(ctx);
            }
        }
        if let Some(job) = &mut self.chat.gpu.probe {
            let (events, ended) = job.poll();
            if let Some(found) = events.into_iter().last() {
                self.chat.gpu.device = Some(found);
            }
            if let Some(ended) = ended {
                self.chat.gpu.probe = None;
                if self.chat.gpu.device.is_none() {
                    let why = match ended {
                        Ended::Panicked(why) => format!("the CUDA probe failed: {why}"),
                        _ => "the CUDA probe ended without an answer".into(),
                    };
                    self.chat.gpu.device = Some(Err(why));
                }
            }
        }
        for side in 0..2 {
            let col = &mut self.chat.columns[side];
            let Some(job) = &mut col.job else { continue };
            let (events, ended) = job.poll();
            for e in events {
                match e {
                    ChatMsg::Text(t) => {
                        if let Some(r) = col.replies.last_mut() {
                            r.push_str(&t);
                        }
                    }
                    ChatMsg::Done(Ok(stats)) => col.stats = Some(stats),
                    ChatMsg::Done(Err(JobError::Cancelled)) => {}
                    ChatMsg::Done(Err(JobError::Failed(e))) => col.error = Some(e),
                }
            }
            if let Some(ended) = ended {
                col.job = None;
                if let Ended::Panicked(why) = ended {
                    col.error = Some(format!("internal error: {why}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_column_sees_its_own_replies_and_the_pending_turn_last() {
        let col = Column { replies: vec!["a1".into(), "a2".into()], ..Default::default() };
        let prompts = vec!["u1".to_string(), "u2".to_string()];
        let h = col.history(&prompts);
        assert_eq!(h, vec![ChatMessage::user("u1"), ChatMessage::assistant("a1"), ChatMessage::user("u2")]);
    }
}
