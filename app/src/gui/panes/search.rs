//! Search: choose a compression level per linear under a budget (EvoPress), watch it work, and take its plan.
//! Left of the plots sit the budget and ladder settings and Start / Pause / Cancel; the plots show the best KL
//! per generation and the best allocation so far (bits, or sparsity, per linear, coloured by kind), both updated
//! every generation. "Use this plan" puts the allocation into the plan table, from where Compress and Compare
//! take it as any other plan.

use crate::gui::panes::plots::{block_of, block_plot, named_bars, position};
use crate::gui::panes::{kind_color, kind_legend, kinds_of, short_kind, Tab};
use crate::gui::state::AppState;
use eframe::egui::{self, RichText};
use egui_plot::{Bar, BarChart, Corner, HLine, Legend, Line, Plot, PlotPoints};

#[derive(Default)]
pub struct SearchPane;

impl Tab for SearchPane {
    fn title(&self) -> &'static str {
        "Search"
    }

    fn ui(&mut self, ui: &mut egui::Ui, state: &mut AppState) {
        let ctx = ui.ctx().clone();
        form(ui, state);
        ui.horizontal(|ui| {
            let s = &mut state.search;
            let running = s.running();
            if ui.add_enabled(!running && state.model.is_some(), egui::Button::new(RichText::new("Start").strong())).clicked() {
                state.start_search(&ctx);
            }
            let s = &mut state.search;
            let pause = if s.paused { "Resume" } else { "Pause" };
            if ui.add_enabled(running, egui::Button::new(pause)).on_hover_text("Pauses between generations").clicked() {
                s.pause_resume();
            }
            if ui.add_enabled(running && !s.control.is_cancelled(), egui::Button::new("Cancel")).clicked() {
                s.cancel();
            }
            if running && s.fraction < 1.0 && s.curve.is_empty() {
                ui.add(egui::ProgressBar::new(s.fraction).desired_width(160.0));
            }
            ui.label(&s.phase);
        });
        result_bar(ui, state);
        ui.separator();
        plots(ui, state);
    }
}

fn form(ui: &mut egui::Ui, state: &mut AppState) {
    let running = state.search.running();
    let f = &mut state.search.form;
    ui.add_enabled_ui(!running, |ui| {
        egui::Grid::new("search_form").num_columns(6).spacing([10.0, 4.0]).show(ui, |ui| {
            ui.label("Ladder").on_hover_text("METHOD:VALUES, e.g. gptq:2,3,4,5,6, rtn:2,3,4, sparsegpt:0,10,20,30,40,50,60,70, sparsegpt:0,25,50@4");
            ui.add(egui::TextEdit::singleline(&mut f.ladder).desired_width(180.0).id_salt("search_ladder"));
            ui.label("group");
            ui.add(egui::DragValue::new(&mut f.group).range(-1..=4096)).on_hover_text("Group size of quantized levels; -1 = per output channel");
            ui.checkbox(&mut f.asym, "asymmetric");
            ui.label("");
            ui.end_row();

            if f.sparsity_budget() {
                ui.label("Target sparsity");
                ui.add(egui::DragValue::new(&mut f.target_sparsity).range(0.0..=0.99).speed(0.01).fixed_decimals(2));
                ui.label("");
                ui.label("");
            } else {
                ui.label("Target bits");
                ui.add(egui::DragValue::new(&mut f.target_bits).range(1.0..=16.0).speed(0.05).fixed_decimals(2).suffix(" bits/weight"));
                ui.checkbox(&mut f.stored_bits, "count scales")
                    .on_hover_text("On: stored bits with scales and zero points (the plan table's bits/weight). Off: code bits only");
                ui.label("");
            }
            ui.checkbox(&mut f.cache, "cache levels").on_hover_text("Keep the levels database on disk, so the next search of this model and ladder starts at once");
            ui.label("");
            ui.end_row();

            ui.label("Generations");
            ui.add(egui::DragValue::new(&mut f.generations).range(1..=100_000));
            ui.label("offspring");
            ui.add(egui::DragValue::new(&mut f.offspring).range(1..=1024)).on_hover_text("Children per generation (λ)");
            ui.label("seed");
            ui.add(egui::DragValue::new(&mut f.seed));
            ui.end_row();

            ui.label("Selection").on_hover_text("Stages WINDOWS:SURVIVORS with growing windows and shrinking survivors, ending with 1");
            ui.add(egui::TextEdit::singleline(&mut f.selection).desired_width(180.0).id_salt("search_selection"));
            ui.label("fitness windows");
            ui.add(egui::DragValue::new(&mut f.fitness_windows).range(1..=4096));
            ui.label("of");
            ui.add(egui::DragValue::new(&mut f.fitness_ctx).range(2..=8192).suffix(" tok"));
            ui.end_row();
        });
    });
    if let Err(e) = state.search.form.parse_ladder() {
        ui.colored_label(ui.visuals().error_fg_color, e);
    }
    let c = &state.settings.calib;
    ui.weak(format!("Levels are calibrated like Compress: {} windows of {} tokens from the calibration text on the left.", c.samples, c.ctx));
}

fn result_bar(ui: &mut egui::Ui, state: &mut AppState) {
    let s = &state.search;
    let Some((levels, fitness)) = &s.best else { return };
    let Some(space) = &s.space else { return };
    let measure = space.costs.measure_of(levels);
    let unit = space.costs.budget.unit();
    ui.horizontal_wrapped(|ui| {
        ui.label(RichText::new(format!("best: {measure:.3} {unit}")).strong());
        if fitness.is_finite() {
            ui.label(format!("KL {fitness:.5} nats"));
        }
        if let Some(u) = &s.uniform {
            ui.weak(format!("uniform {:.5}", u.fitness));
        }
        if let Some(d) = &s.dp {
            ui.weak(format!("DP {:.5}", d.fitness));
        }
        if s.generation > 0 {
            ui.label(format!("generation {} / {} · {:.1} evaluations/s", s.generation, s.generations, s.evaluations_per_second));
        }
    });
    let fits = matches!((&state.model, &s.model), (Some(a), Some(b)) if std::sync::Arc::ptr_eq(a, b));
    ui.horizontal(|ui| {
        if ui.add_enabled(fits, egui::Button::new("Use this plan")).on_hover_text("Put this allocation into the plan table; then Compress it").clicked() {
            state.use_search_plan();
        }
        if state.search.save_name.is_empty() {
            state.search.save_name = format!("evopress-{}", state.search.form.ladder.replace([':', ',', '@'], "-"));
        }
        ui.add(egui::TextEdit::singleline(&mut state.search.save_name).desired_width(200.0).id_salt("search_save_name"))
            .on_hover_text("Preset name");
        if ui.button("Save plan…").on_hover_text("Write the allocation as a preset TOML into the presets folder").clicked() {
            state.save_search_plan();
        }
    });
}

fn plots(ui: &mut egui::Ui, state: &mut AppState) {
    let s = &state.search;
    if s.space.is_none() {
        ui.label("Set a budget and a ladder and press Start. The search builds a database of every linear at every level (once; cached), then evolves allocations judged by the KL of the whole model against the dense one.");
        return;
    }
    let height = ui.available_height();
    ui.columns(2, |cols| {
        cols[0].label(RichText::new("Best KL per generation").strong()).on_hover_text("Mean KL(dense ‖ candidate) on the final-stage fitness windows, nats");
        let curve = s.curve.clone();
        let (uniform, dp) = (s.uniform.as_ref().map(|u| u.fitness), s.dp.as_ref().map(|d| d.fitness));
        Plot::new("search_fitness")
            .height(height - 30.0)
            .legend(Legend::default().position(Corner::LeftBottom))
            .x_axis_label("generation")
            .y_axis_min_width(52.0)
            .include_y(0.0)
            .allow_scroll(false)
            .show(&mut cols[0], |p| {
                if let Some(u) = uniform {
                    p.hline(HLine::new("uniform", u).color(egui::Color32::GRAY));
                }
                if let Some(d) = dp {
                    p.hline(HLine::new("DP (Σ layer error)", d).color(egui::Color32::from_rgb(0xe8, 0xb0, 0x3c)));
                }
                p.line(Line::new("EvoPress best", PlotPoints::from(curve)).color(egui::Color32::from_rgb(0x4e, 0x9a, 0xf0)).width(2.0));
            });
        allocation(&mut cols[1], state, height - 30.0);
    });
}

/// Bits (or sparsity) of every linear under the best allocation so far.
fn allocation(ui: &mut egui::Ui, state: &AppState, height: f32) {
    let s = &state.search;
    let (Some(space), Some((levels, _))) = (&s.space, &s.best) else { return };
    let sparsity = s.form.sparsity_budget();
    ui.label(RichText::new(if sparsity { "Best allocation: sparsity per linear" } else { "Best allocation: bits per linear" }).strong());
    let per_linear = space.linear_levels(levels);
    let names: Vec<&str> = space.shapes.iter().map(|(n, _, _)| n.as_str()).collect();
    let kinds = kinds_of(names.iter().copied());
    kind_legend(ui, &kinds);
    let charts: Vec<BarChart> = kinds
        .iter()
        .map(|&kind| {
            let bars = names
                .iter()
                .enumerate()
                .filter(|(_, n)| short_kind(n) == kind)
                .map(|(i, n)| {
                    let level = &space.ladder.levels[per_linear[i]];
                    let v = if sparsity { 100.0 * level.sparsity() } else { level.bits().map_or(space.dense_bits, f64::from) };
                    Bar::new(position(block_of(n), kind, i), v)
                        .width(0.1)
                        .fill(kind_color(kind).gamma_multiply(0.75))
                        .name(format!("{n}\n{}", level.label))
                })
                .collect();
            named_bars(kind, kind_color(kind), bars)
        })
        .collect();
    let top = if sparsity { 100.0 } else { space.ladder.levels.iter().filter_map(|l| l.bits()).max().map_or(space.dense_bits, f64::from) };
    block_plot("search_allocation", height - 24.0)
        .include_y(0.0)
        .include_y(top)
        .show(ui, |p| charts.into_iter().for_each(|c| p.bar_chart(c)));
}
