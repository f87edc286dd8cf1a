//! The workbench window: pick a model, plan its compression layer by layer, compress it, watch where the error
//! goes, compare variants. eframe with the wgpu renderer, egui_plot for the plots, rfd for native dialogs.
//!
//! Layout of the code follows the window: [`app`] lays out the panes and owns [`state::AppState`]; each pane is a
//! file under [`panes`]; everything slow runs as a [`jobs::Job`] whose work lives in [`work`], so the UI thread
//! only draws. The Search, Chat and Export panes keep their state and work in [`search`], [`chat`] and
//! [`export`], each with its own job, so they run beside the main one. [`plan_edit`] is the editable plan behind
//! the layer table, [`spec`] its one-line setting syntax.

pub mod app;
pub mod chat;
mod events;
pub mod export;
pub mod format;
pub mod jobs;
pub mod panes;
pub mod plan_edit;
pub mod search;
pub mod settings;
pub mod shortcuts;
pub mod spec;
pub mod state;
pub mod work;

pub use app::WhittleApp;

/// Opens the window (no subcommand). Without a display this returns an error instead of panicking, so the
/// message can point at the CLI.
pub fn run() -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        renderer: eframe::Renderer::Wgpu,
        viewport: eframe::egui::ViewportBuilder::default()
            .with_title("Whittle")
            .with_app_id("whittle")
            .with_inner_size([1280.0, 800.0])
            .with_min_inner_size([900.0, 560.0]),
        ..Default::default()
    };
    eframe::run_native("Whittle", options, Box::new(|cc| Ok(Box::new(WhittleApp::new(cc)))))
        .map_err(|e| {
            let why = e.to_string();
            anyhow::anyhow!("cannot open the window: {}. The subcommands work without a display: whittle --help", why.trim_end_matches('.'))
        })
}
