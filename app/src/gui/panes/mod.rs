//! The panes of the window, one file each. The left side (model, plan) and the bottom (status) are always
//! visible; the centre is a row of tabs, each a [`Tab`]. A new tab is a file here plus one line in
//! [`center_tabs`]; a tab with work of its own keeps it in a state struct on `AppState` (tests drive that, since
//! they cannot reach into a `Box<dyn Tab>`).

pub mod chat;
pub mod compare;
pub mod export;
pub mod model;
pub mod plan;
pub mod plots;
pub mod search;
pub mod status;

use super::state::AppState;
use eframe::egui::{self, Color32};

/// A pane shown in the centre tabs.
pub trait Tab {
    fn title(&self) -> &'static str;
    fn ui(&mut self, ui: &mut egui::Ui, state: &mut AppState);
}

/// The centre tabs, in the order of the tab bar and of Ctrl+1…9.
pub fn center_tabs() -> Vec<Box<dyn Tab>> {
    vec![
        Box::new(plots::PlotsPane::default()),
        Box::new(compare::ComparePane),
        Box::new(search::SearchPane),
        Box::new(chat::ChatPane),
        Box::new(export::ExportPane),
    ]
}

/// One colour per linear kind, the same in every plot and in the table's legend.
pub fn kind_color(kind: &str) -> Color32 {
    match kind {
        "q_proj" => Color32::from_rgb(0x4e, 0x9a, 0xf0),
        "k_proj" => Color32::from_rgb(0x38, 0xc0, 0xd8),
        "v_proj" => Color32::from_rgb(0x8a, 0x7c, 0xf0),
        "o_proj" => Color32::from_rgb(0xd0, 0x6c, 0xd8),
        "gate_proj" => Color32::from_rgb(0x5c, 0xc4, 0x6c),
        "up_proj" => Color32::from_rgb(0xe8, 0xb0, 0x3c),
        "down_proj" => Color32::from_rgb(0xe8, 0x60, 0x50),
        _ => Color32::GRAY,
    }
}

/// A row of colour swatches naming the module kinds, shared by the plots (a legend inside each plot would cover
/// the first block's bars).
pub fn kind_legend(ui: &mut egui::Ui, kinds: &[&str]) {
    ui.horizontal_wrapped(|ui| {
        for &k in kinds {
            let (rect, _) = ui.allocate_exact_size(egui::vec2(10.0, 10.0), egui::Sense::hover());
            ui.painter().rect_filled(rect, 2.0, kind_color(k));
            ui.label(k);
            ui.add_space(6.0);
        }
    });
}

/// Module kinds in first-seen order.
pub fn kinds_of<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut kinds: Vec<&str> = Vec::new();
    for n in names {
        let k = short_kind(n);
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    kinds
}

/// Position of a kind inside its block (for grouping bars), from the model's linear order.
pub fn kind_index(kind: &str) -> usize {
    whittle_core::model::LINEAR_KINDS.iter().position(|k| k.ends_with(kind)).unwrap_or(0)
}

/// The short kind of a module name (`model.layers.3.mlp.down_proj` → `down_proj`).
pub fn short_kind(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}
