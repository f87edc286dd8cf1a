//! Compare: the original model and every compressed variant in one table (size, average bits, perplexity, KL and
//! top-1 agreement against the original on a chosen text), evaluated in the background; and any two variants side
//! by side with their per-layer errors on one plot. A report is shown only next to the evaluation settings that
//! produced it, so changing the text or window never leaves stale numbers on screen.

use crate::gui::format;
use crate::gui::panes::plots::named_bars;
use crate::gui::panes::Tab;
use crate::gui::shortcuts;
use crate::gui::state::{AppState, JobKind, Variant};
use crate::gui::work::{EvalKey, Pick};
use eframe::egui::{self, RichText};
use egui_plot::{Bar, Corner, Legend, Plot};

#[derive(Default)]
pub struct ComparePane;

impl Tab for ComparePane {
    fn title(&self) -> &'static str {
        "Compare"
    }

    fn ui(&mut self, ui: &mut egui::Ui, state: &mut AppState) {
        settings_bar(ui, state);
        ui.add_space(6.0);
        if state.variants.is_empty() {
            ui.label("Open a model: it becomes the first row, and every compression you run adds one.");
            state.drawn.compare_rows = 0;
            return;
        }
        let key = state.eval_key();
        let evaluating = matches!(state.job, Some((JobKind::Evaluate, _)));
        let mut remove = None;
        egui::ScrollArea::both().id_salt("compare_table").max_height(ui.available_height() * 0.4).show(ui, |ui| {
            egui::Grid::new("compare").striped(true).num_columns(10).spacing([10.0, 4.0]).show(ui, |ui| {
                for (h, tip) in [
                    ("A", "Left of the side-by-side view"),
                    ("B", "Right of the side-by-side view"),
                    ("variant", "The original model, or the plan a compression ran with (hover for its settings)"),
                    ("size", "Model size with the plan's storage"),
                    ("bits", "Average stored bits per linear weight"),
                    ("ppl", "Perplexity on the evaluation text"),
                    ("KL", "Mean KL(original || variant) per token, nats"),
                    ("top-1", "How often the variant's top token matches the original's"),
                    ("time", "Compression time"),
                    ("", ""),
                ] {
                    ui.label(RichText::new(h).strong()).on_hover_text(tip);
                }
                ui.end_row();
                for v in &state.variants {
                    if ui.radio(state.pair.0 == Some(v.id), "").on_hover_text(format!("Show {} on the left", v.name)).clicked() {
                        state.pair.0 = Some(v.id);
                    }
                    if ui.radio(state.pair.1 == Some(v.id), "").on_hover_text(format!("Show {} on the right", v.name)).clicked() {
                        state.pair.1 = Some(v.id);
                    }
                    ui.label(RichText::new(&v.name).strong()).on_hover_text(plan_text(v));
                    ui.label(format::bytes(v.size_bytes));
                    ui.label(format!("{:.2}", v.avg_bits));
                    metrics(ui, v, &key, evaluating);
                    ui.label(if v.is_original() { "–".into() } else { format!("{:.1} s", v.seconds) });
                    if !v.is_original() && ui.small_button("Remove").on_hover_text(format!("Forget {}", v.name)).clicked() {
                        remove = Some(v.id);
                    }
                    ui.end_row();
                }
            });
        });
        state.drawn.compare_rows = state.variants.len();
        if let Some(id) = remove {
            state.remove_variant(id);
        }
        ui.separator();
        side_by_side(ui, state, &key);
    }
}

fn settings_bar(ui: &mut egui::Ui, state: &mut AppState) {
    let ctx = ui.ctx().clone();
    let busy = state.busy();
    ui.horizontal_wrapped(|ui| {
        ui.add_enabled_ui(!busy, |ui| {
            ui.label("Evaluate on");
            let text = match &state.settings.eval.text {
                Some(p) => p.file_name().map_or(p.display().to_string(), |f| f.to_string_lossy().into_owned()),
                None => "built-in held-out text".into(),
            };
            if ui.button(text).on_hover_text("Click to choose a UTF-8 text file").clicked() {
                state.pick(Pick::EvalText, &ctx);
            }
            if state.settings.eval.text.is_some() && ui.small_button("built-in").on_hover_text("Use the held-out tail of the built-in TinyStories text").clicked() {
                state.settings.eval.text = None;
            }
            ui.label("window");
            ui.add(egui::DragValue::new(&mut state.settings.eval.ctx).range(2..=8192).suffix(" tok")).on_hover_text("Tokens per evaluation window");
            ui.label("up to");
            ui.add(egui::DragValue::new(&mut state.settings.eval.max_tokens).range(2..=10_000_000).speed(256).suffix(" tok"))
                .on_hover_text("Tokens of the text to use");
            let button = egui::Button::new("Evaluate").shortcut_text(shortcuts::label(&ctx, &shortcuts::EVALUATE));
            if ui.add(button).on_hover_text("Compute what is missing for these settings").clicked() {
                state.evaluate(&ctx);
            }
        });
    });
}

fn plan_text(v: &Variant) -> String {
    match &v.plan {
        None => "dense".into(),
        Some(p) => p.rules.iter().map(crate::gui::spec::describe).collect::<Vec<_>>().join(", "),
    }
}

fn metrics(ui: &mut egui::Ui, v: &Variant, key: &EvalKey, evaluating: bool) {
    match v.report(key) {
        Some(Ok(r)) => {
            ui.label(RichText::new(format!("{:.3}", r.ppl)).monospace());
            ui.label(r.kl.map_or("–".into(), |k| format!("{k:.4}")));
            ui.label(r.top1.map_or("–".into(), |t| format!("{:.1}%", 100.0 * t)));
        }
        Some(Err(e)) => {
            ui.colored_label(ui.visuals().error_fg_color, "failed").on_hover_text(e);
            ui.label("");
            ui.label("");
        }
        None => {
            let pending = if evaluating { "…" } else { "–" };
            for _ in 0..3 {
                ui.weak(pending).on_hover_text("Not evaluated on these settings yet (Ctrl+E)");
            }
        }
    }
}

fn side_by_side(ui: &mut egui::Ui, state: &AppState, key: &EvalKey) {
    let find = |id: Option<u64>| id.and_then(|id| state.variants.iter().find(|v| v.id == id));
    let (Some(a), Some(b)) = (find(state.pair.0), find(state.pair.1)) else {
        ui.label("Pick A and B in the table to put two variants side by side.");
        return;
    };
    let ra = a.report(key).and_then(|r| r.as_ref().ok());
    let rb = b.report(key).and_then(|r| r.as_ref().ok());
    ui.columns(2, |cols| {
        card(&mut cols[0], "A", a, ra, None);
        card(&mut cols[1], "B", b, rb, ra.map(|r| r.ppl));
    });
    let height = ui.available_height() - 8.0;
    if a.layers.is_empty() && b.layers.is_empty() {
        ui.label("Neither variant is compressed, so there are no per-layer errors to compare.");
        return;
    }
    let names: Vec<&str> = if a.layers.len() >= b.layers.len() { &a.layers } else { &b.layers }.iter().map(|l| l.name.as_str()).collect();
    let series = |v: &Variant, offset: f64, color: egui::Color32, label: String| {
        let bars: Vec<Bar> = v
            .layers
            .iter()
            .filter_map(|l| {
                let i = names.iter().position(|n| *n == l.name)?;
                Some(Bar::new(i as f64 + offset, l.rel_error).width(0.4).fill(color.gamma_multiply(0.75)).name(format!("{}: {}\nrel. error {}", v.name, l.name, format::error(l.rel_error))))
            })
            .collect();
        named_bars(label, color, bars)
    };
    let ca = series(a, -0.2, egui::Color32::from_rgb(0x4e, 0x9a, 0xf0), format!("A: {}", a.name));
    let cb = series(b, 0.2, egui::Color32::from_rgb(0xe8, 0x80, 0x40), format!("B: {}", b.name));
    ui.label(RichText::new("Relative error per layer, A vs B").strong());
    Plot::new("compare_layers")
        .height(height.max(80.0) - 20.0)
        .legend(Legend::default().position(Corner::LeftTop))
        .x_axis_label("linear module (model order)")
        .y_axis_formatter(|m, _| format::error(m.value))
        .y_axis_min_width(44.0)
        .allow_scroll(false)
        .show(ui, |p| {
            p.bar_chart(ca);
            p.bar_chart(cb);
        });
}

fn card(ui: &mut egui::Ui, slot: &str, v: &Variant, report: Option<&whittle_core::eval::EvalReport>, ppl_a: Option<f64>) {
    ui.label(RichText::new(format!("{slot}: {}", v.name)).heading());
    egui::Grid::new(("card", slot)).num_columns(2).spacing([12.0, 2.0]).show(ui, |ui| {
        ui.weak("plan");
        ui.label(plan_text(v));
        ui.end_row();
        ui.weak("size");
        ui.label(format!("{} · {:.2} bits", format::bytes(v.size_bytes), v.avg_bits));
        ui.end_row();
        ui.weak("perplexity");
        match (report, ppl_a) {
            (Some(r), Some(a)) => ui.label(format!("{:.3} ({:+.3} vs A)", r.ppl, r.ppl - a)),
            (Some(r), None) => ui.label(format!("{:.3}", r.ppl)),
            (None, _) => ui.weak("not evaluated"),
        };
        ui.end_row();
        if let Some(r) = report {
            ui.weak("KL / top-1");
            ui.label(match (r.kl, r.top1) {
                (Some(k), Some(t)) => format!("{k:.4} · {:.1}%", 100.0 * t),
                _ => "reference".into(),
            });
            ui.end_row();
        }
        if !v.layers.is_empty() {
            let worst = v.layers.iter().max_by(|x, y| x.rel_error.total_cmp(&y.rel_error));
            if let Some(w) = worst {
                ui.weak("worst layer");
                ui.label(format!("{} ({})", w.name.trim_start_matches("model.layers."), format::error(w.rel_error)));
                ui.end_row();
            }
        }
    });
}
