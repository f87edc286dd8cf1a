//! The layer table: every linear module grouped by decoder block (collapsible), its shape and parameters, and its
//! method / bits / group / sparsity / N:M, editable per row. Rows are multi-selected with their checkboxes
//! (shift-click selects a range, the block checkbox a whole block, the kind buttons one kind everywhere); a
//! setting typed in the "Set" field, or an edit on any selected row, applies to every selected row. The plan's
//! average bits and resulting size are re-resolved after each edit, so they are always current.

use crate::gui::format;
use crate::gui::panes::{kind_color, short_kind};
use crate::gui::plan_edit::{list_presets, PlanEditor, Row};
use crate::gui::shortcuts;
use crate::gui::spec;
use crate::gui::state::AppState;
use crate::gui::work::Pick;
use eframe::egui::{self, RichText};
use std::collections::HashMap;
use whittle_core::compress::Method;
use whittle_core::model::LoadedModel;
use whittle_core::plan::Rule;

#[derive(Default)]
pub struct PlanPane {
    /// The "Set" field.
    pub spec: String,
    spec_error: Option<String>,
    /// The preset name field.
    pub save_name: String,
    /// Last clicked row, the start of a shift-click range.
    anchor: Option<usize>,
}

/// Column widths of the table, shared by the header and every block so they line up.
const W_SEL: f32 = 96.0;
const W_SHAPE: f32 = 62.0;
const W_PARAMS: f32 = 48.0;
const W_METHOD: f32 = 84.0;
const W_BITS: f32 = 40.0;
const W_GROUP: f32 = 46.0;
const W_SPARSE: f32 = 46.0;
const W_NM: f32 = 46.0;
const W_BPW: f32 = 40.0;
const W_ERR: f32 = 58.0;

const METHODS: [Option<Method>; 6] =
    [None, Some(Method::Gptq), Some(Method::SparseGpt), Some(Method::Rtn), Some(Method::Magnitude), Some(Method::Obc)];
const GROUPS: [i64; 5] = [-1, 32, 64, 128, 256];
const NMS: [&str; 3] = ["2:4", "4:8", "1:4"];

impl PlanPane {
    pub fn ui(&mut self, ui: &mut egui::Ui, state: &mut AppState) {
        let Some(model) = state.model.clone() else {
            ui.heading("Plan");
            ui.label("The layer table appears once a model is open.");
            return;
        };
        let errors: HashMap<String, f64> =
            state.run.iter().flat_map(|r| r.layers.iter().map(|l| (l.name.clone(), l.rel_error))).collect();
        self.header(ui, state);
        let Some(editor) = state.plan.as_mut() else { return };
        self.selection_bar(ui, editor, &model);
        ui.add_space(4.0);
        let idle = state.job.is_none();
        egui::ScrollArea::vertical().auto_shrink(false).show(ui, |ui| {
            ui.add_enabled_ui(idle, |ui| self.table(ui, editor, &model, &errors));
        });
    }

    /// Title, live summary, presets and calibration settings.
    fn header(&mut self, ui: &mut egui::Ui, state: &mut AppState) {
        let ctx = ui.ctx().clone();
        let Some(editor) = state.plan.as_ref() else { return };
        let original = state.variants.first().map_or(0, |v| v.size_bytes);
        ui.horizontal(|ui| {
            ui.heading("Plan");
            match &editor.resolved {
                Ok(r) => {
                    let pct = 100.0 * r.size_bytes as f64 / original.max(1) as f64;
                    ui.label(RichText::new(format!("{:.2} bits/weight", r.avg_bits)).strong())
                        .on_hover_text("Parameter-weighted average over the linear modules, scales and zero points included");
                    ui.label(format!("· {} of {} ({pct:.0}%)", format::bytes(r.size_bytes), format::bytes(original)))
                        .on_hover_text("Whole model size after compression, of the original; embeddings and norms stay dense");
                }
                Err(e) => {
                    ui.colored_label(ui.visuals().error_fg_color, "plan error").on_hover_text(e);
                }
            }
        });
        if let Err(e) = &editor.resolved {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        let presets = list_presets(&state.presets_dir);
        let current = editor.preset.clone();
        let mut load = None;
        let mut save = false;
        ui.horizontal(|ui| {
            ui.label("Preset");
            egui::ComboBox::from_id_salt("preset")
                .selected_text(current.clone().unwrap_or_else(|| "custom".into()))
                .width(120.0)
                .show_ui(ui, |ui| {
                    for p in &presets {
                        let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                        if ui.selectable_label(current.as_deref() == Some(stem.as_str()), &stem).clicked() {
                            load = Some(p.clone());
                        }
                    }
                })
                .response
                .on_hover_text(format!("Load a preset from {}", state.presets_dir.display()));
            if ui.add_enabled(state.dialog.is_none(), egui::Button::new("Open plan…")).clicked() {
                state.pick(Pick::PlanFile, &ctx);
            }
            ui.separator();
            let label = ui.label("Save as");
            ui.add(egui::TextEdit::singleline(&mut self.save_name).hint_text("preset name").desired_width(90.0)).labelled_by(label.id);
            let button = egui::Button::new("Save").shortcut_text(shortcuts::label(&ctx, &shortcuts::SAVE_PRESET));
            save = ui.add(button).on_hover_text("Save the table as presets/<name>.toml").clicked();
        });
        if let Some(p) = load {
            state.load_plan(&p);
        }
        if save {
            self.save(state);
        }
        ui.horizontal(|ui| {
            let busy = state.busy();
            ui.add_enabled_ui(!busy, |ui| {
                ui.label("Calibration");
                ui.add(egui::DragValue::new(&mut state.settings.calib.samples).range(1..=4096))
                    .on_hover_text("Calibration windows");
                ui.label("×");
                ui.add(egui::DragValue::new(&mut state.settings.calib.ctx).range(2..=8192).suffix(" tok"))
                    .on_hover_text("Tokens per calibration window");
                let text = state.settings.calib_text.as_ref().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().into_owned());
                let label = text.unwrap_or_else(|| "built-in text".into());
                if ui.button(label).on_hover_text("Calibration text: click to choose a file").clicked() {
                    state.pick(Pick::CalibText, &ctx);
                }
                if state.settings.calib_text.is_some() && ui.small_button("built-in").on_hover_text("Calibrate on the built-in TinyStories text").clicked() {
                    state.settings.calib_text = None;
                }
            });
        });
        if let Some((e, fits)) = state.compress_estimate() {
            let text = format!(
                "Estimate: about {} more memory at the peak; time {} (order of magnitude)",
                format::bytes(e.compress_peak_bytes),
                format::duration(std::time::Duration::from_secs_f64(e.seconds.max(0.0)))
            );
            let label = match &fits {
                Ok(()) => ui.label(text),
                Err(why) => ui.colored_label(ui.visuals().error_fg_color, format!("{text}. Cannot start: {why}.")),
            };
            label.on_hover_text(
                "Compressing in the window keeps the compressed copy in memory beside the original: calibration states, \
                 restart points, the largest layer's solver and the copy's f32 linears with their integer forms",
            );
        }
    }

    pub fn save(&mut self, state: &mut AppState) {
        let name = match self.save_name.trim() {
            "" => state.plan.as_ref().map(PlanEditor::name).unwrap_or_default(),
            n => n.to_string(),
        };
        state.save_plan(&name);
    }

    /// Selection helpers and the "Set selected" field.
    fn selection_bar(&mut self, ui: &mut egui::Ui, editor: &mut PlanEditor, model: &LoadedModel) {
        ui.horizontal_wrapped(|ui| {
            ui.label("Select");
            if ui.button("All").on_hover_text("Select every layer (Ctrl+A)").clicked() {
                editor.select_all(true);
            }
            if ui.button("None").clicked() {
                editor.select_all(false);
            }
            let mut kinds: Vec<String> = Vec::new();
            for r in &editor.rows {
                if !kinds.contains(&r.kind) {
                    kinds.push(r.kind.clone());
                }
            }
            for k in kinds {
                let label = RichText::new(k.trim_end_matches("_proj")).color(kind_color(&k));
                if ui.small_button(label).on_hover_text(format!("Select every {k}")).clicked() {
                    editor.rows.iter_mut().for_each(|r| r.selected = r.kind == k);
                }
            }
        });
        ui.horizontal(|ui| {
            let n = editor.selected_count();
            let label = ui.label("Set");
            let field = ui
                .add(
                    egui::TextEdit::singleline(&mut self.spec)
                        .hint_text("w4g32, gptq w3g128, sparsegpt 2:4, 50%, dense")
                        .desired_width(230.0),
                )
                .labelled_by(label.id);
            let entered = field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            let apply = ui.add_enabled(n > 0, egui::Button::new(format!("Apply to {n} selected")));
            if n > 0 && (apply.clicked() || entered) {
                match spec::parse(&self.spec) {
                    Ok(rule) => {
                        editor.set_selected(&rule, model);
                        self.spec_error = None;
                    }
                    Err(e) => self.spec_error = Some(e),
                }
            }
        });
        if let Some(e) = &self.spec_error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
    }

    fn table(&mut self, ui: &mut egui::Ui, editor: &mut PlanEditor, model: &LoadedModel, errors: &HashMap<String, f64>) {
        header_row(ui);
        let bpw: HashMap<String, f64> = match &editor.resolved {
            Ok(r) => r.modules.iter().map(|m| (m.name.clone(), m.bits_per_weight)).collect(),
            Err(_) => HashMap::new(),
        };
        let mut edited: Option<usize> = None;
        let mut range_select: Option<(usize, bool)> = None;
        for (block, range) in editor.blocks() {
            let title = block.map_or("Other".to_string(), |b| format!("Block {b}"));
            let id = ui.make_persistent_id(("block", block));
            let rows = &mut editor.rows[range.clone()];
            let params: usize = rows.iter().map(Row::params).sum();
            let block_bits: f64 = rows.iter().map(|r| bpw.get(&r.name).copied().unwrap_or(0.0) * r.params() as f64).sum::<f64>() / params.max(1) as f64;
            let worst = rows.iter().filter_map(|r| errors.get(&r.name)).cloned().fold(None, |m: Option<f64>, e| Some(m.map_or(e, |m| m.max(e))));
            egui::collapsing_header::CollapsingState::load_with_default_open(ui.ctx(), id, block.is_none_or(|b| b < 2))
                .show_header(ui, |ui| {
                    let mut all = rows.iter().all(|r| r.selected);
                    if ui.checkbox(&mut all, RichText::new(&title).strong()).on_hover_text(format!("Select all of {title}")).changed() {
                        rows.iter_mut().for_each(|r| r.selected = all);
                    }
                    let mut summary = format!("{} linears · {} params · {block_bits:.2} bpw", rows.len(), format::count(params));
                    if let Some(w) = worst {
                        summary.push_str(&format!(" · max error {}", format::error(w)));
                    }
                    ui.weak(summary);
                })
                .body_unindented(|ui| {
                    for (i, row) in rows.iter_mut().enumerate() {
                        let index = range.start + i;
                        let out = row_ui(ui, row, bpw.get(&row.name).copied(), errors.get(&row.name).copied());
                        if out.edited {
                            edited = Some(index);
                        }
                        if let Some(on) = out.toggled {
                            if ui.input(|inp| inp.modifiers.shift) {
                                range_select = Some((index, on));
                            } else {
                                self.anchor = Some(index);
                            }
                        }
                    }
                });
        }
        if let Some((index, on)) = range_select {
            // The anchor may come from another model's table.
            let from = self.anchor.filter(|&a| a < editor.rows.len()).unwrap_or(index);
            let (a, b) = (from.min(index), from.max(index));
            editor.rows[a..=b].iter_mut().for_each(|r| r.selected = on);
            self.anchor = Some(index);
        }
        if let Some(i) = edited {
            // An edit on a selected row is an edit on the whole selection.
            if editor.rows[i].selected {
                let rule = editor.rows[i].rule.clone();
                editor.set_selected(&rule, model);
            } else {
                editor.edited(model);
            }
        }
    }
}

fn cell<R>(ui: &mut egui::Ui, width: f32, add: impl FnOnce(&mut egui::Ui) -> R) -> R {
    let height = ui.spacing().interact_size.y;
    ui.allocate_ui_with_layout(egui::vec2(width, height), egui::Layout::left_to_right(egui::Align::Center), |ui| {
        ui.set_min_width(width);
        add(ui)
    })
    .inner
}

fn header_row(ui: &mut egui::Ui) {
    ui.horizontal(|ui| {
        for (text, w, tip) in [
            ("module", W_SEL, "Check rows to edit many at once; shift-click selects a range"),
            ("shape", W_SHAPE, "out × in features"),
            ("params", W_PARAMS, "Weights in the module"),
            ("method", W_METHOD, "Compression algorithm (dense = left as is)"),
            ("bits", W_BITS, "Bits per quantized weight"),
            ("group", W_GROUP, "Columns per quantization group (ch = one per output channel)"),
            ("sparse", W_SPARSE, "Unstructured sparsity"),
            ("N:M", W_NM, "Semi-structured sparsity: N zeros in every M"),
            ("bpw", W_BPW, "Stored bits per weight, scales and masks included"),
            ("error", W_ERR, "Relative output error of the last run"),
        ] {
            cell(ui, w, |ui| ui.label(RichText::new(text).small().strong()).on_hover_text(tip));
        }
    });
}

struct RowOutcome {
    edited: bool,
    /// The checkbox was clicked, leaving it in this state.
    toggled: Option<bool>,
}

fn row_ui(ui: &mut egui::Ui, row: &mut Row, bpw: Option<f64>, error: Option<f64>) -> RowOutcome {
    let mut out = RowOutcome { edited: false, toggled: None };
    let where_ = format!("{} of block {}", row.kind, row.block.map_or("-".into(), |b| b.to_string()));
    ui.push_id(row.name.clone(), |ui| {
        ui.horizontal(|ui| {
            cell(ui, W_SEL, |ui| {
                let text = RichText::new(&row.kind).color(kind_color(short_kind(&row.name)));
                if ui.checkbox(&mut row.selected, text).on_hover_text(&row.name).clicked() {
                    out.toggled = Some(row.selected);
                }
            });
            cell(ui, W_SHAPE, |ui| ui.label(format!("{}×{}", row.rows, row.cols)));
            cell(ui, W_PARAMS, |ui| ui.label(format::count(row.params())));
            let r = &mut row.rule;
            let dense = r.keep_dense == Some(true);
            cell(ui, W_METHOD, |ui| {
                let shown = if dense { None } else { Some(implied_method(r)) };
                egui::ComboBox::from_id_salt("method")
                    .selected_text(shown.map_or("dense".to_string(), |m| m.to_string()))
                    .width(W_METHOD - 6.0)
                    .show_ui(ui, |ui| {
                        for m in METHODS {
                            let label = m.map_or("dense".to_string(), |m| m.to_string());
                            if ui.selectable_label(shown == m, label).clicked() && shown != m {
                                set_method(r, m);
                                out.edited = true;
                            }
                        }
                    })
                    .response
                    .on_hover_text(format!("method of {where_}"));
            });
            ui.add_enabled_ui(!dense, |ui| {
                cell(ui, W_BITS, |ui| {
                    egui::ComboBox::from_id_salt("bits")
                        .selected_text(r.bits.map_or("–".to_string(), |b| b.to_string()))
                        .width(W_BITS - 6.0)
                        .show_ui(ui, |ui| {
                            for b in [None, Some(2), Some(3), Some(4), Some(5), Some(6), Some(8)] {
                                if ui.selectable_label(r.bits == b, b.map_or("–".to_string(), |b| b.to_string())).clicked() && r.bits != b {
                                    r.bits = b;
                                    out.edited = true;
                                }
                            }
                        })
                        .response
                        .on_hover_text(format!("bits of {where_}"));
                });
                cell(ui, W_GROUP, |ui| {
                    ui.add_enabled_ui(r.bits.is_some(), |ui| {
                        let g = r.group.unwrap_or(-1);
                        egui::ComboBox::from_id_salt("group")
                            .selected_text(group_label(g))
                            .width(W_GROUP - 6.0)
                            .show_ui(ui, |ui| {
                                for choice in GROUPS {
                                    if ui.selectable_label(g == choice, group_label(choice)).clicked() && g != choice {
                                        r.group = Some(choice);
                                        out.edited = true;
                                    }
                                }
                            })
                            .response
                            .on_hover_text(format!("group size of {where_}"));
                    });
                });
                cell(ui, W_SPARSE, |ui| {
                    let mut pct = (r.sparsity.unwrap_or(0.0) * 100.0).round() as u32;
                    let resp = ui
                        .add_enabled(r.nm.is_none(), egui::DragValue::new(&mut pct).range(0..=95).speed(1.0).suffix("%"))
                        .on_hover_text(format!("unstructured sparsity of {where_}"));
                    if resp.changed() {
                        r.sparsity = (pct > 0).then_some(pct as f32 / 100.0);
                        out.edited = true;
                    }
                });
                cell(ui, W_NM, |ui| {
                    egui::ComboBox::from_id_salt("nm")
                        .selected_text(r.nm.clone().unwrap_or_else(|| "–".into()))
                        .width(W_NM - 6.0)
                        .show_ui(ui, |ui| {
                            if ui.selectable_label(r.nm.is_none(), "–").clicked() && r.nm.is_some() {
                                r.nm = None;
                                out.edited = true;
                            }
                            for nm in NMS {
                                if ui.selectable_label(r.nm.as_deref() == Some(nm), nm).clicked() && r.nm.as_deref() != Some(nm) {
                                    r.nm = Some(nm.to_string());
                                    r.sparsity = None;
                                    out.edited = true;
                                }
                            }
                        })
                        .response
                        .on_hover_text(format!("N:M sparsity of {where_}"));
                });
            });
            cell(ui, W_BPW, |ui| ui.label(bpw.map_or("–".into(), |b| format!("{b:.2}"))));
            cell(ui, W_ERR, |ui| match error {
                Some(e) => ui.label(RichText::new(format::error(e)).monospace()),
                None => ui.weak("–"),
            });
        });
    });
    out
}

fn group_label(g: i64) -> String {
    if g <= 0 {
        "ch".into()
    } else {
        g.to_string()
    }
}

/// The method the resolver will use when the rule names none.
fn implied_method(r: &Rule) -> Method {
    r.method.unwrap_or(if r.sparsity.is_some() || r.nm.is_some() { Method::SparseGpt } else { Method::Gptq })
}

/// Switching method keeps what still applies and fills in a working default for what the method needs.
fn set_method(r: &mut Rule, m: Option<Method>) {
    let Some(m) = m else {
        *r = Rule { keep_dense: Some(true), ..Default::default() };
        return;
    };
    r.keep_dense = None;
    r.method = Some(m);
    // What `compress::validate` asks of each method: gptq never prunes and alone uses act-order; rtn and gptq
    // need bits; sparsegpt and magnitude need a sparsity; obc needs either.
    if m == Method::Gptq {
        r.sparsity = None;
        r.nm = None;
    } else {
        r.act_order = None;
    }
    let needs_bits = matches!(m, Method::Gptq | Method::Rtn) || (m == Method::Obc && r.sparsity.is_none() && r.nm.is_none());
    if needs_bits && r.bits.is_none() {
        r.bits = Some(4);
        r.group = Some(128);
    }
    if matches!(m, Method::SparseGpt | Method::Magnitude) && r.sparsity.is_none() && r.nm.is_none() {
        r.sparsity = Some(0.5);
    }
}
