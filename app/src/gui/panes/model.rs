//! Model picker and model card. A model comes from a folder (typed, or chosen with the native dialog), a Hugging
//! Face id (downloaded by a job with progress and cancel), the recent list, or the embedded default. The card shows
//! what decides how compression will go: architecture, parameters, layers, dtype, size on disk and tokenizer.

use crate::gui::format;
use crate::gui::shortcuts;
use crate::gui::state::{AppState, JobKind};
use crate::gui::work::Pick;
use eframe::egui::{self, RichText};

#[derive(Default)]
pub struct ModelPane {
    /// The folder or Hub id being typed.
    pub source: String,
}

impl ModelPane {
    pub fn ui(&mut self, ui: &mut egui::Ui, state: &mut AppState) {
        let ctx = ui.ctx().clone();
        let idle = !state.busy();
        ui.horizontal(|ui| {
            ui.heading("Model");
            if let Some((JobKind::Open, _)) = &state.job {
                ui.spinner();
            }
        });
        ui.horizontal(|ui| {
            let label = ui.label("Source");
            // Buttons from the right, then the field takes what is left: a field sized from the panel's width
            // would widen a resizable panel a little more every frame.
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                self.recent_menu(ui, state, idle);
                let folder = egui::Button::new("Open folder…");
                let tip = format!("Choose a model folder ({})", shortcuts::label(&ctx, &shortcuts::OPEN_FOLDER));
                if ui.add_enabled(idle && state.dialog.is_none(), folder).on_hover_text(tip).clicked() {
                    state.pick(Pick::ModelFolder, &ctx);
                }
                let open = ui.add_enabled(idle, egui::Button::new("Open")).on_hover_text("Open the folder or Hub id typed on the left");
                let field = ui
                    .add(
                        egui::TextEdit::singleline(&mut self.source)
                            .hint_text("model folder, or owner/name on the Hub")
                            .desired_width(ui.available_width()),
                    )
                    .labelled_by(label.id);
                let entered = field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                if open.clicked() || (entered && idle) {
                    state.open(&self.source, &ctx);
                }
            });
        });
        match &state.model {
            Some(m) => card(ui, m, state.model_spec.as_deref()),
            None if state.busy() => {
                ui.label("Loading…");
            }
            None => {
                ui.label("No model open. Open a folder, a Hub id, or the embedded default.");
            }
        }
    }

    fn recent_menu(&mut self, ui: &mut egui::Ui, state: &mut AppState, idle: bool) {
        let ctx = ui.ctx().clone();
        ui.add_enabled_ui(idle, |ui| {
            ui.menu_button("Recent", |ui| {
                let mut chosen = None;
                if ui.button("stories260k (embedded default)").clicked() {
                    chosen = Some("default".to_string());
                }
                if !state.settings.recent.is_empty() {
                    ui.separator();
                }
                for spec in state.settings.recent.iter().filter(|s| *s != "default") {
                    if ui.button(spec).clicked() {
                        chosen = Some(spec.clone());
                    }
                }
                if let Some(spec) = chosen {
                    self.source = if spec == "default" { String::new() } else { spec.clone() };
                    state.open(&spec, &ctx);
                }
            })
            .response
            .on_hover_text("Recently opened models and the embedded default");
        });
    }
}

fn card(ui: &mut egui::Ui, m: &whittle_core::model::LoadedModel, spec: Option<&str>) {
    let c = &m.model.config;
    let name = match spec {
        Some("default") | None => "stories260k (embedded default)".to_string(),
        Some(s) => s.to_string(),
    };
    ui.label(RichText::new(name).strong()).on_hover_text(m.dir.display().to_string());
    let dtype = c.torch_dtype.clone().unwrap_or_else(|| format!("{:?}", m.model.embed.dtype).to_lowercase());
    egui::Grid::new("model_card").num_columns(4).spacing([16.0, 2.0]).show(ui, |ui| {
        ui.weak("Architecture");
        ui.label(format!("{:?}", c.architecture));
        ui.weak("Parameters");
        ui.label(format::count(c.parameter_count()));
        ui.end_row();
        ui.weak("Layers");
        ui.label(format!("{} × {} linears (hidden {}, {} / {} heads)", c.num_layers, whittle_core::model::LINEAR_KINDS.len(), c.hidden_size, c.num_heads, c.num_kv_heads));
        ui.weak("Dtype");
        ui.label(dtype);
        ui.end_row();
        ui.weak("Size on disk");
        ui.label(format::bytes(m.store.total_bytes()));
        ui.weak("Tokenizer");
        ui.label(format!("{} tokens (vocab {})", m.tokenizer.vocab_size(), c.vocab_size));
        ui.end_row();
    });
}
