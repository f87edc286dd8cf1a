//! The status bar: the running job with its progress (layer i of n, ETA) and Cancel, or how the last job ended;
//! and how long frames take, so the promise that work never stalls the window is checked where it is made.

use crate::gui::format;
use crate::gui::shortcuts;
use crate::gui::state::AppState;
use eframe::egui;

pub fn ui(ui: &mut egui::Ui, state: &mut AppState) {
    ui.horizontal(|ui| {
        let ctx = ui.ctx().clone();
        if let Some((_, job)) = &state.job {
            let elapsed = job.started.elapsed();
            let cancelling = job.is_cancelling();
            let label = job.label.clone();
            let cancel = egui::Button::new("Cancel").shortcut_text(shortcuts::label(&ctx, &shortcuts::CANCEL));
            if ui.add_enabled(!cancelling, cancel).clicked() {
                state.cancel();
            }
            let mut text = format!("{label}: {}", state.progress.text);
            if let Some(eta) = state.progress.eta() {
                text.push_str(&format!(" · ETA {}", format::duration(eta)));
            }
            text.push_str(&format!(" · {} elapsed", format::duration(elapsed)));
            ui.add(egui::ProgressBar::new(state.progress.fraction).text(text).desired_width(ui.available_width() - 170.0));
        } else {
            ui.label(&state.status);
        }
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            let f = &state.frame;
            let text = if f.busy_frames > 0 {
                format!("frame {:.1} ms · max {:.1} ms while working", f.last_ms, f.max_busy_ms)
            } else {
                format!("frame {:.1} ms", f.last_ms)
            };
            let tip = format!(
                "Time to build the last frame (UI thread CPU {:.1} ms; longest while working {:.1} ms). Long work runs off the UI thread.",
                f.last_cpu_ms, f.max_busy_cpu_ms
            );
            ui.weak(text).on_hover_text(tip);
        });
    });
}
