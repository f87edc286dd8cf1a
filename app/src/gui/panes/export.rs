//! Export: write a variant as a checkpoint other tools load (GPTQ, compressed-tensors, or dense f16/bf16). The
//! plan is checked against the format as soon as both are chosen, naming every layer the format cannot hold, so
//! nothing is attempted that would be refused; the export runs in the background with progress and ends with
//! what it wrote, a button to show the folder, and one to open it back in Whittle.

use crate::gui::export::{formats_for, open_folder};
use crate::gui::format;
use crate::gui::panes::Tab;
use crate::gui::state::AppState;
use crate::gui::work::Pick;
use eframe::egui::{self, RichText};

#[derive(Default)]
pub struct ExportPane;

impl Tab for ExportPane {
    fn title(&self) -> &'static str {
        "Export"
    }

    fn ui(&mut self, ui: &mut egui::Ui, state: &mut AppState) {
        let ctx = ui.ctx().clone();
        if state.variants.is_empty() {
            ui.label("Open a model and compress it; its variants can then be exported here.");
            return;
        }
        if state.export_variant().is_none() {
            // Default to the newest compressed variant, which is usually the one just made.
            state.export.variant = state.variants.iter().rev().find(|v| !v.is_original()).or(state.variants.first()).map(|v| v.id);
        }
        let running = state.export.job.is_some();
        ui.add_enabled_ui(!running, |ui| form(ui, state, &ctx));
        state.export_precheck();
        precheck(ui, state);
        ui.horizontal(|ui| {
            let ok = state.export.precheck.as_ref().is_none_or(|(_, r)| r.is_ok());
            if ui.add_enabled(!running && ok, egui::Button::new(RichText::new("Export to folder").strong())).clicked() {
                state.start_export(&ctx);
            }
            if let (true, (done, total)) = (running, state.export.progress) {
                let f = if total > 0 { done as f32 / total as f32 } else { 0.0 };
                ui.add(egui::ProgressBar::new(f).text(format!("layer {done} of {total}")).desired_width(300.0));
            }
        });
        ui.separator();
        result(ui, state, &ctx);
    }
}

fn form(ui: &mut egui::Ui, state: &mut AppState, ctx: &egui::Context) {
    egui::Grid::new("export_form").num_columns(2).spacing([12.0, 6.0]).show(ui, |ui| {
        ui.label("Variant");
        let current = state.export_variant().map(|v| v.name.clone()).unwrap_or_default();
        let mut pick = None;
        egui::ComboBox::from_id_salt("export_variant").selected_text(current).show_ui(ui, |ui| {
            for v in &state.variants {
                if ui.selectable_label(state.export.variant == Some(v.id), &v.name).clicked() {
                    pick = Some(v.id);
                }
            }
        });
        if let Some(id) = pick {
            state.export.variant = Some(id);
        }
        ui.end_row();

        ui.label("Format");
        let allowed = state.export_variant().map_or(&[][..], formats_for);
        if !allowed.contains(&state.export.format) {
            if let Some(f) = allowed.first() {
                state.export.format = *f;
            }
        }
        ui.horizontal(|ui| {
            for f in whittle_core::export::ModelFormat::ALL {
                let enabled = allowed.contains(&f);
                let r = ui.add_enabled(enabled, egui::RadioButton::new(state.export.format == f, f.name()));
                let r = if enabled { r } else { r.on_disabled_hover_text("The original is not compressed: only dense f16/bf16") };
                if r.clicked() {
                    state.export.format = f;
                }
            }
        });
        ui.end_row();

        ui.label("Folder");
        ui.horizontal(|ui| {
            ui.add(egui::TextEdit::singleline(&mut state.export.out).desired_width(360.0).hint_text("folder to create").id_salt("export_out"))
                .on_hover_text("Output folder");
            if ui.button("Choose…").clicked() {
                state.pick(Pick::ExportFolder, ctx);
            }
        });
        ui.end_row();

        ui.label("Shard size");
        ui.add(egui::TextEdit::singleline(&mut state.export.shard_size).desired_width(80.0).id_salt("export_shard"))
            .on_hover_text("Largest safetensors file, e.g. 5GB, 500MB, 4GiB");
        ui.end_row();

        ui.label("");
        ui.checkbox(&mut state.export.force, "Replace the folder if it exists")
            .on_hover_text("The old folder stays until the new one is complete");
        ui.end_row();
    });
}

fn precheck(ui: &mut egui::Ui, state: &AppState) {
    match &state.export.precheck {
        Some((_, Err(why))) => {
            ui.colored_label(ui.visuals().error_fg_color, format!("This plan cannot be written as {}: {why}", state.export.format));
        }
        Some((_, Ok(()))) => {
            ui.weak(format!("Every layer of the plan can be stored as {}.", state.export.format));
        }
        None => {}
    }
}

fn result(ui: &mut egui::Ui, state: &mut AppState, ctx: &egui::Context) {
    if let Some(why) = &state.export.failure {
        ui.colored_label(ui.visuals().error_fg_color, format!("Export failed; nothing was written: {why}"));
    }
    let Some(r) = &state.export.report else { return };
    let out = r.out.clone();
    let last = if state.export.failure.is_some() { "Last export" } else { "Exported" };
    ui.label(RichText::new(format!("{last}: {} ({})", out.display(), r.format)).strong());
    egui::Grid::new("export_result").num_columns(2).spacing([12.0, 2.0]).show(ui, |ui| {
        ui.weak("layers");
        ui.label(format!("{} quantized, {} sparse 2:4, {} dense", r.quantized_layers, r.sparse24_layers, r.dense_layers));
        ui.end_row();
        ui.weak("size");
        ui.label(format!("{} in {} files", format::bytes(r.bytes), r.files.len()));
        ui.end_row();
        ui.weak("bits/weight");
        ui.label(format!("{:.3} (linear layers, as stored)", r.bits_per_weight_estimate));
        ui.end_row();
        ui.weak("files");
        let names: Vec<String> = r.files.iter().map(|f| f.strip_prefix(&out).unwrap_or(f).display().to_string()).collect();
        ui.add(egui::Label::new(names.join(", ")).wrap());
        ui.end_row();
    });
    if !r.warnings.is_empty() {
        ui.collapsing(format!("{} loader notes", r.warnings.len()), |ui| {
            for w in &r.warnings {
                ui.label(w);
            }
        });
    }
    ui.horizontal(|ui| {
        if ui.button("Open folder").clicked() {
            if let Err(e) = open_folder(&out) {
                state.error(e);
            }
        }
        if ui.button("Open in Whittle").on_hover_text("Load the exported checkpoint as the model").clicked() {
            state.open(&out.display().to_string(), ctx);
        }
    });
}
