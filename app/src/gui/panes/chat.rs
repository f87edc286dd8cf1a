//! Chat: the same conversation with the original model (left) and a compressed variant (right), replies streaming
//! into their columns as they are generated, each column with its tokens/s and the memory its weights take. The
//! variant runs packed on the kernels, so the right column shows what the compression buys in speed and memory
//! and costs in text.

use crate::gui::format;
use crate::gui::panes::Tab;
use crate::gui::state::AppState;
use eframe::egui::{self, RichText};

#[derive(Default)]
pub struct ChatPane;

impl Tab for ChatPane {
    fn title(&self) -> &'static str {
        "Chat"
    }

    fn ui(&mut self, ui: &mut egui::Ui, state: &mut AppState) {
        let ctx = ui.ctx().clone();
        if state.variants.is_empty() {
            ui.label("Open a model to chat with it.");
            return;
        }
        settings_bar(ui, state, &ctx);
        ui.separator();
        let input_height = 64.0;
        let height = ui.available_height() - input_height;
        ui.columns(2, |cols| {
            column(&mut cols[0], state, 0, height);
            column(&mut cols[1], state, 1, height);
        });
        ui.separator();
        input(ui, state, &ctx);
    }
}

fn settings_bar(ui: &mut egui::Ui, state: &mut AppState, ctx: &egui::Context) {
    let busy = state.chat.generating();
    ui.horizontal_wrapped(|ui| {
        ui.label("Compressed");
        let chosen = state.chat.variant.and_then(|id| state.variants.iter().find(|v| v.id == id)).map(|v| v.name.clone());
        let mut pick = None;
        egui::ComboBox::from_id_salt("chat_variant")
            .selected_text(chosen.unwrap_or_else(|| "none yet".into()))
            .show_ui(ui, |ui| {
                for v in state.variants.iter().filter(|v| !v.is_original()) {
                    if ui.selectable_label(state.chat.variant == Some(v.id), &v.name).clicked() {
                        pick = Some(v.id);
                    }
                }
            })
            .response
            .on_hover_text("The variant answering in the right column (packed for the kernels once, when chosen)");
        if let Some(id) = pick.filter(|_| !busy) {
            state.chat_choose(id, ctx);
        }
        if state.chat.pack_job.is_some() {
            ui.spinner();
            ui.weak("packing…");
        }
        gpu_switch(ui, state, ctx, busy);
        ui.separator();
        let s = &mut state.chat.settings;
        ui.add_enabled_ui(!busy, |ui| {
            ui.checkbox(&mut s.greedy, "greedy").on_hover_text("Always take the most likely token");
            ui.add_enabled_ui(!s.greedy, |ui| {
                ui.label("temperature");
                ui.add(egui::DragValue::new(&mut s.temperature).range(0.0..=2.0).speed(0.01).fixed_decimals(2));
                ui.label("top-p");
                ui.add(egui::DragValue::new(&mut s.top_p).range(0.01..=1.0).speed(0.01).fixed_decimals(2));
                ui.label("seed");
                ui.add(egui::DragValue::new(&mut s.seed));
            });
            ui.label("max tokens");
            ui.add(egui::DragValue::new(&mut s.max_tokens).range(1..=4096));
        });
    });
}

/// The compressed column's device: a switch where a CUDA GPU was found, else the CPU with why as a tooltip.
fn gpu_switch(ui: &mut egui::Ui, state: &mut AppState, ctx: &egui::Context, busy: bool) {
    state.chat_probe_gpu(ctx);
    let cpu = format!("CPU ({})", whittle_kernels::Isa::best().name());
    match &state.chat.gpu.device {
        None => {
            ui.spinner();
            ui.weak("looking for a GPU…");
        }
        Some(Err(why)) => {
            ui.weak(format!("on the {cpu}")).on_hover_text(why.as_str());
        }
        Some(Ok(dev)) => {
            let label = format!("on the GPU ({})", dev.name());
            let mut on = state.chat.gpu.use_gpu;
            let changed = ui
                .add_enabled(!busy, egui::Checkbox::new(&mut on, label))
                .on_hover_text("Run the compressed variant's 4-bit, 2:4 int4 and f16 linears with the CUDA kernels")
                .changed();
            if changed {
                state.chat.gpu.use_gpu = on;
                state.chat_repack(ctx);
            }
        }
    }
}

fn column(ui: &mut egui::Ui, state: &AppState, side: usize, height: f32) {
    let c = &state.chat;
    let col = &c.columns[side];
    let title = if side == 0 {
        "original".to_string()
    } else {
        match c.variant.and_then(|id| state.variants.iter().find(|v| v.id == id)) {
            Some(v) => format!("{} (packed)", v.name),
            None => "compressed: none yet (Compress a plan first)".into(),
        }
    };
    ui.label(RichText::new(title).heading());
    ui.horizontal_wrapped(|ui| {
        match (&col.stats, col.job.is_some()) {
            (_, true) => ui.weak("generating…"),
            (Some(st), false) => ui.label(format!("{:.1} tokens/s · {} tokens", st.tokens_per_second, st.tokens)),
            (None, false) => ui.weak("–"),
        };
        if col.weight_bytes > 0 {
            ui.label(format!("· weights {}", format::bytes(col.weight_bytes as u64)))
                .on_hover_text("Resident bytes of the weights the forward pass reads");
        }
        if side == 1 {
            if let Some(p) = c.packed.as_ref().filter(|p| Some(p.variant) == c.variant) {
                let mut t = format!("· {} packed", p.report.packed);
                if p.report.sparse24 > 0 {
                    t.push_str(&format!(", {} 2:4", p.report.sparse24));
                }
                if !p.report.dense.is_empty() {
                    t.push_str(&format!(", {} dense", p.report.dense.len()));
                }
                let why: Vec<String> = p.report.dense.iter().map(|(n, w)| format!("{n}: {w}")).collect();
                ui.weak(t).on_hover_text(if why.is_empty() { "Every compressed linear runs packed".into() } else { why.join("\n") });
                if let Some(g) = &p.gpu {
                    let why: Vec<String> = g.on_cpu.iter().map(|(n, w)| format!("{n}: {w}")).collect();
                    ui.weak(format!("· {} linears on the GPU ({})", g.on_gpu, format::bytes(g.device_bytes as u64)))
                        .on_hover_text(if why.is_empty() { "Every linear runs on the GPU".into() } else { why.join("\n") });
                }
            }
        }
    });
    egui::ScrollArea::vertical().id_salt(("chat_col", side)).max_height(height - 40.0).stick_to_bottom(true).auto_shrink([false, false]).show(ui, |ui| {
        for (i, prompt) in c.prompts.iter().enumerate() {
            ui.label(RichText::new(prompt).strong());
            if let Some(r) = col.replies.get(i) {
                ui.add(egui::Label::new(r.as_str()).wrap());
            }
            ui.add_space(6.0);
        }
        if let Some(e) = &col.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
    });
}

fn input(ui: &mut egui::Ui, state: &mut AppState, ctx: &egui::Context) {
    let busy = state.chat.generating();
    ui.horizontal(|ui| {
        let edit = egui::TextEdit::singleline(&mut state.chat.input)
            .hint_text("Message (Enter sends)")
            .desired_width(ui.available_width() - 300.0)
            .id_salt("chat_input");
        let r = ui.add(edit).on_hover_text("Prompt");
        let enter = r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        if ui.add_enabled(!busy, egui::Button::new(RichText::new("Send").strong())).clicked() || (enter && !busy) {
            state.chat_send(ctx);
            r.request_focus();
        }
        if ui.add_enabled(busy, egui::Button::new("Stop")).clicked() {
            state.chat_stop();
        }
        if ui.add_enabled(!busy && !state.chat.prompts.is_empty(), egui::Button::new("Regenerate")).clicked() {
            state.chat_regenerate(ctx);
        }
        if ui.add_enabled(!busy, egui::Button::new("Clear")).on_hover_text("Start a new conversation").clicked() {
            state.chat_clear();
        }
    });
}
