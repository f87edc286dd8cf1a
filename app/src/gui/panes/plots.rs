//! Where the damage happens: per-layer relative error as bars (filled in as layers finish), the same errors
//! against depth with one line per module type, and what the plan allocates per layer (bits per weight and
//! sparsity). Errors span orders of magnitude, so the error plots have a log scale (log10 of the value drawn on
//! a linear axis labelled in powers of ten, because a bar needs a finite base).

use crate::gui::panes::{kind_color, kind_index, kind_legend, kinds_of, short_kind, Tab};
use crate::gui::format;
use crate::gui::state::AppState;
use eframe::egui::{self, RichText};
use egui_plot::{Bar, BarChart, Line, Plot, PlotPoints, Points};
use whittle_core::compress_model::LayerResult;
use whittle_core::plan::ResolvedPlan;

#[derive(Default)]
pub struct PlotsPane {
    /// Variant whose run is shown; `None` = the latest run.
    variant: Option<u64>,
}

impl Tab for PlotsPane {
    fn title(&self) -> &'static str {
        "Plots"
    }

    fn ui(&mut self, ui: &mut egui::Ui, state: &mut AppState) {
        if self.variant.is_some_and(|id| !state.variants.iter().any(|v| v.id == id)) {
            self.variant = None;
        }
        let (name, layers, total) = match self.variant.and_then(|id| state.variants.iter().find(|v| v.id == id)) {
            Some(v) => (v.name.clone(), v.layers.as_slice(), v.layers.len()),
            None => match &state.run {
                Some(r) => (r.name.clone(), r.layers.as_slice(), r.total),
                None => (String::new(), &[][..], 0),
            },
        };
        let log = state.settings.log_scale;
        let mut choose = None;
        let mut log_toggle = log;
        ui.horizontal(|ui| {
            ui.label("Run");
            egui::ComboBox::from_id_salt("plot_run")
                .selected_text(if name.is_empty() { "none yet".to_string() } else { name.clone() })
                .show_ui(ui, |ui| {
                    if ui.selectable_label(self.variant.is_none(), "latest run").clicked() {
                        choose = Some(None);
                    }
                    for v in state.variants.iter().filter(|v| !v.is_original()) {
                        if ui.selectable_label(self.variant == Some(v.id), &v.name).clicked() {
                            choose = Some(Some(v.id));
                        }
                    }
                })
                .response
                .on_hover_text("Which compression run the error plots show");
            ui.checkbox(&mut log_toggle, "Log scale").on_hover_text("Ctrl+L");
            if total > 0 {
                ui.weak(format!("{} / {total} layers", layers.len()));
            }
        });
        if let Some(c) = choose {
            self.variant = c;
        }
        state.settings.log_scale = log_toggle;

        let resolved = state.plan.as_ref().and_then(|p| p.resolved.as_ref().ok());
        let names: Vec<&str> = match (layers.is_empty(), resolved) {
            (false, _) => layers.iter().map(|l| l.name.as_str()).collect(),
            (true, Some(r)) => r.modules.iter().map(|m| m.name.as_str()).collect(),
            (true, None) => Vec::new(),
        };
        kind_legend(ui, &kinds_of(names.into_iter()));
        let sparse = resolved.is_some_and(|r| r.modules.iter().any(|m| sparsity(m.job.as_ref()) > 0.0));
        if layers.is_empty() {
            state.drawn.error_bars = 0;
            ui.label("No compression yet: set a plan on the left and press Compress (Ctrl+Enter). The plan allocates:");
            allocations(ui, resolved, sparse, ui.available_height());
            return;
        }
        let top = (ui.available_height() * 0.5).max(160.0);
        ui.label(RichText::new("Relative error per layer").strong())
            .on_hover_text("||(W - Ŵ) X||² / ||W X||² on the calibration inputs; hover a bar for the module");
        state.drawn.error_bars = error_bars(ui, layers, log, top - 24.0);
        let bottom = ui.available_height();
        ui.columns(2, |cols| {
            cols[0].label(RichText::new("Error vs depth by module type").strong());
            error_vs_depth(&mut cols[0], layers, log, bottom - 24.0);
            allocations(&mut cols[1], resolved, sparse, bottom);
        });
    }
}

/// The plan's bits per weight per module, and its sparsity when it has any.
fn allocations(ui: &mut egui::Ui, resolved: Option<&ResolvedPlan>, sparse: bool, height: f32) {
    let each = if sparse { height / 2.0 - 24.0 } else { height - 24.0 };
    ui.label(RichText::new("Allocation: bits per weight (plan)").strong());
    allocation(ui, resolved, Allocation::Bits, each);
    if sparse {
        ui.label(RichText::new("Allocation: sparsity (plan)").strong());
        allocation(ui, resolved, Allocation::Sparsity, each);
    }
}

/// The x axis of the per-block plots: labelled at every block even when a plot is narrow.
fn block_axis() -> Vec<egui_plot::AxisHints<'static>> {
    vec![egui_plot::AxisHints::new_x().label("decoder block").label_spacing(14.0..=20.0)]
}

/// One x tick per decoder block.
fn block_ticks() -> impl Fn(egui_plot::GridInput) -> Vec<egui_plot::GridMark> {
    egui_plot::uniform_grid_spacer(|_| [1.0, 5.0, 10.0])
}

/// A plot with one x tick per decoder block, as every per-layer chart has.
pub(crate) fn block_plot(id: &str, height: f32) -> Plot<'static> {
    Plot::new(id).height(height).custom_x_axes(block_axis()).x_grid_spacer(block_ticks()).y_axis_min_width(44.0).allow_scroll(false)
}

/// Bars in `color` under `label`, each showing its own name on hover.
pub(crate) fn named_bars(label: impl Into<String>, color: egui::Color32, bars: Vec<Bar>) -> BarChart {
    BarChart::new(label, bars).color(color).element_formatter(Box::new(|b: &Bar, _: &BarChart| b.name.clone()))
}

/// Where a module's bar goes: its block, offset by its kind so a block's modules sit side by side.
pub(crate) fn position(l_block: Option<usize>, kind: &str, index: usize) -> f64 {
    match l_block {
        Some(b) => b as f64 + (kind_index(kind) as f64 - 3.0) * 0.12,
        None => index as f64,
    }
}

pub(crate) fn block_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// Value drawn for an error: itself, or its log10 (errors of 0 have no log and are not drawn).
fn drawn(e: f64, log: bool) -> Option<f64> {
    if log {
        (e > 0.0).then(|| e.log10())
    } else {
        Some(e)
    }
}

fn y_label(v: f64, log: bool) -> String {
    if !log {
        return format::error(v);
    }
    if (v - v.round()).abs() < 1e-6 {
        format!("1e{}", v.round() as i64)
    } else {
        String::new()
    }
}

/// Draws the per-layer error bars (one chart per module kind, for the legend); returns how many bars it drew.
fn error_bars(ui: &mut egui::Ui, layers: &[LayerResult], log: bool, height: f32) -> usize {
    let base = if log {
        layers.iter().filter_map(|l| drawn(l.rel_error, true)).fold(f64::INFINITY, f64::min).floor() - 0.25
    } else {
        0.0
    };
    let kinds = kinds_of(layers.iter().map(|l| l.name.as_str()));
    let per_kind: Vec<(&str, Vec<Bar>)> = kinds
        .iter()
        .map(|&kind| {
            let bars: Vec<Bar> = layers
                .iter()
                .enumerate()
                .filter(|(_, l)| short_kind(&l.name) == kind)
                .filter_map(|(i, l)| {
                    let v = drawn(l.rel_error, log)?;
                    let bar = Bar::new(position(block_of(&l.name), kind, i), v - base)
                        .base_offset(base)
                        .width(0.1)
                        .fill(kind_color(kind).gamma_multiply(0.75))
                        .name(format!("{}\nrel. error {}\n{} · {:.2} bits/weight", l.name, format::error(l.rel_error), l.method, l.bits_per_weight));
                    Some(bar)
                })
                .collect();
            (kind, bars)
        })
        .collect();
    let count = per_kind.iter().map(|(_, b)| b.len()).sum();
    let charts: Vec<BarChart> = per_kind
        .into_iter()
        .map(|(kind, bars)| {
            named_bars(kind, kind_color(kind), bars)
        })
        .collect();
    block_plot("error_bars", height.max(80.0))
        .y_axis_formatter(move |m, _| y_label(m.value, log))
        .show(ui, |p| charts.into_iter().for_each(|c| p.bar_chart(c)));
    count
}

fn error_vs_depth(ui: &mut egui::Ui, layers: &[LayerResult], log: bool, height: f32) {
    let kinds = kinds_of(layers.iter().map(|l| l.name.as_str()));
    block_plot("error_depth", height.max(80.0))
        .y_axis_formatter(move |m, _| y_label(m.value, log))
        .label_formatter(move |hp| match hp {
            egui_plot::HoverPosition::NearDataPoint { plot_name, position, .. } => {
                let e = if log { 10f64.powf(position.y) } else { position.y };
                Some(format!("{plot_name}, block {:.0}\nrel. error {}", position.x, format::error(e)))
            }
            egui_plot::HoverPosition::Elsewhere { .. } => None,
        })
        .show(ui, |p| {
            for &kind in &kinds {
                let pts: Vec<[f64; 2]> = layers
                    .iter()
                    .filter(|l| short_kind(&l.name) == kind)
                    .filter_map(|l| Some([block_of(&l.name)? as f64, drawn(l.rel_error, log)?]))
                    .collect();
                p.line(Line::new(kind, PlotPoints::from(pts.clone())).color(kind_color(kind)).width(2.0));
                p.points(Points::new(kind, PlotPoints::from(pts)).color(kind_color(kind)).radius(3.0));
            }
        });
}

#[derive(Clone, Copy, PartialEq)]
enum Allocation {
    Bits,
    Sparsity,
}

/// Bits per weight or sparsity per module as the plan resolves them (before any run).
fn allocation(ui: &mut egui::Ui, plan: Option<&ResolvedPlan>, what: Allocation, height: f32) {
    let Some(plan) = plan else {
        ui.label("The plan has an error; see the table.");
        return;
    };
    let kinds = kinds_of(plan.modules.iter().map(|m| m.name.as_str()));
    let charts: Vec<BarChart> = kinds
        .iter()
        .map(|&kind| {
            let bars = plan
                .modules
                .iter()
                .enumerate()
                .filter(|(_, m)| short_kind(&m.name) == kind)
                .map(|(i, m)| {
                    let v = match what {
                        Allocation::Bits => m.bits_per_weight,
                        Allocation::Sparsity => 100.0 * sparsity(m.job.as_ref()),
                    };
                    let unit = if what == Allocation::Bits { " bits/weight" } else { "% zeros" };
                    Bar::new(position(block_of(&m.name), kind, i), v)
                        .width(0.1)
                        .fill(kind_color(kind).gamma_multiply(0.75))
                        .name(format!("{}\n{v:.2}{unit}", m.name))
                })
                .collect();
            named_bars(kind, kind_color(kind), bars)
        })
        .collect();
    let id = if what == Allocation::Bits { "alloc_bits" } else { "alloc_sparsity" };
    let top = if what == Allocation::Bits { plan.modules.iter().map(|m| m.bits_per_weight).fold(0.0, f64::max) } else { 100.0 };
    block_plot(id, height.max(60.0))
        .include_y(0.0)
        .include_y(top)
        .show(ui, |p| charts.into_iter().for_each(|c| p.bar_chart(c)));
}

/// Fraction of zeros a job asks for.
fn sparsity(job: Option<&whittle_core::compress::LayerJob>) -> f64 {
    match job.and_then(|j| j.sparsity) {
        Some(whittle_core::compress::Sparsity::Unstructured(s)) => s as f64,
        Some(whittle_core::compress::Sparsity::NM { n, m }) => n as f64 / m as f64,
        None => 0.0,
    }
}
