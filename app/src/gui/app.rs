//! The eframe application: owns the state and the panes, drains job events, handles shortcuts, lays out the
//! window (top: menu, actions and messages; left: model and plan; centre: tabs; bottom: status) and persists the
//! settings. It holds no model work: everything slow is a job started through `AppState`.

use super::panes::{self, model::ModelPane, plan::PlanPane, Tab};
use super::shortcuts::{self as keys, pressed};
use super::state::{thread_cpu_ms, AppState, Level, Settings, Theme};
use super::work::Pick;
use eframe::egui::{self, RichText};
use std::time::Instant;

pub struct WhittleApp {
    pub state: AppState,
    pub model_pane: ModelPane,
    pub plan_pane: PlanPane,
    pub tabs: Vec<Box<dyn Tab>>,
    pub active_tab: usize,
    show_help: bool,
}

impl WhittleApp {
    /// The app as eframe starts it: settings from storage, then the last model (or the embedded default) opens.
    pub fn new(cc: &eframe::CreationContext<'_>) -> Self {
        let settings: Settings = cc.storage.and_then(|s| eframe::get_value(s, eframe::APP_KEY)).unwrap_or_default();
        Self::with_settings(&cc.egui_ctx, settings)
    }

    /// The app with explicit settings (tests start from known ones).
    pub fn with_settings(ctx: &egui::Context, settings: Settings) -> Self {
        let first = settings.recent.first().cloned().unwrap_or_else(|| "default".into());
        let tabs = panes::center_tabs();
        let active_tab = tabs.iter().position(|t| t.title() == settings.tab).unwrap_or(0);
        let mut state = AppState::new(settings);
        apply_theme(ctx, state.settings.theme);
        state.open(&first, ctx);
        let model_pane = ModelPane { source: if first == "default" { String::new() } else { first } };
        WhittleApp { state, model_pane, plan_pane: PlanPane::default(), tabs, active_tab, show_help: false }
    }

    /// Selects the centre tab with this title; false if there is none.
    pub fn show_tab(&mut self, title: &str) -> bool {
        match self.tabs.iter().position(|t| t.title() == title) {
            Some(i) => {
                self.active_tab = i;
                true
            }
            None => false,
        }
    }

    fn shortcuts(&mut self, ctx: &egui::Context) {
        let s = &mut self.state;
        if pressed(ctx, &keys::COMPRESS) {
            s.compress(ctx);
        }
        if pressed(ctx, &keys::EVALUATE) {
            s.evaluate(ctx);
        }
        if s.busy() && pressed(ctx, &keys::CANCEL) {
            s.cancel();
        }
        if pressed(ctx, &keys::OPEN_FOLDER) && !s.busy() {
            s.pick(Pick::ModelFolder, ctx);
        }
        if pressed(ctx, &keys::SAVE_PRESET) {
            self.plan_pane.save(s);
        }
        if !ctx.egui_wants_keyboard_input() && pressed(ctx, &keys::SELECT_ALL) {
            if let Some(p) = s.plan.as_mut() {
                p.select_all(true);
            }
        }
        if pressed(ctx, &keys::LOG_SCALE) {
            s.settings.log_scale = !s.settings.log_scale;
        }
        if pressed(ctx, &keys::THEME) {
            s.settings.theme = if s.settings.theme == Theme::Dark { Theme::Light } else { Theme::Dark };
        }
        if pressed(ctx, &keys::HELP) {
            self.show_help = !self.show_help;
        }
        if pressed(ctx, &keys::QUIT) {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
        for (i, key) in keys::TAB_KEYS.iter().enumerate().take(self.tabs.len()) {
            if pressed(ctx, &egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, *key)) {
                self.active_tab = i;
            }
        }
    }

    fn top_bar(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        let s = &mut self.state;
        egui::MenuBar::new().ui(ui, |ui| {
            ui.menu_button("File", |ui| {
                if ui.add(egui::Button::new("Open folder…").shortcut_text(keys::label(&ctx, &keys::OPEN_FOLDER))).clicked() {
                    s.pick(Pick::ModelFolder, &ctx);
                }
                if ui.button("Open the embedded default").clicked() {
                    s.open("default", &ctx);
                }
                if ui.button("Open plan…").clicked() {
                    s.pick(Pick::PlanFile, &ctx);
                }
                if ui.add(egui::Button::new("Save plan as preset").shortcut_text(keys::label(&ctx, &keys::SAVE_PRESET))).clicked() {
                    self.plan_pane.save(s);
                }
                ui.separator();
                if ui.add(egui::Button::new("Quit").shortcut_text(keys::label(&ctx, &keys::QUIT))).clicked() {
                    ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                }
            });
            ui.menu_button("View", |ui| {
                for (i, t) in self.tabs.iter().enumerate() {
                    let sc = egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, keys::TAB_KEYS[i.min(8)]);
                    if ui.add(egui::Button::new(t.title()).shortcut_text(keys::label(&ctx, &sc))).clicked() {
                        self.active_tab = i;
                    }
                }
                ui.separator();
                if ui.add(egui::Button::new("Log scale").selected(s.settings.log_scale).shortcut_text(keys::label(&ctx, &keys::LOG_SCALE))).clicked() {
                    s.settings.log_scale = !s.settings.log_scale;
                }
                if ui.add(egui::Button::new("Dark / light").shortcut_text(keys::label(&ctx, &keys::THEME))).clicked() {
                    s.settings.theme = if s.settings.theme == Theme::Dark { Theme::Light } else { Theme::Dark };
                }
            });
            ui.menu_button("Help", |ui| {
                if ui.add(egui::Button::new("Keyboard shortcuts").shortcut_text(keys::label(&ctx, &keys::HELP))).clicked() {
                    self.show_help = true;
                }
            });
            ui.separator();
            let idle = !s.busy();
            let refusal = match s.compress_estimate() {
                Some((_, Err(why))) => Some(why),
                _ => None,
            };
            let ready = idle && s.plan.as_ref().is_some_and(|p| p.resolved.is_ok()) && refusal.is_none();
            let compress = egui::Button::new(RichText::new("Compress").strong()).shortcut_text(keys::label(&ctx, &keys::COMPRESS));
            let hover = refusal.map_or_else(|| "Calibrate and compress with the plan in the table".to_string(), |why| format!("Cannot start: {why}"));
            if ui.add_enabled(ready, compress).on_hover_text(&hover).on_disabled_hover_text(&hover).clicked() {
                s.compress(&ctx);
            }
            let evaluate = egui::Button::new("Evaluate").shortcut_text(keys::label(&ctx, &keys::EVALUATE));
            if ui.add_enabled(idle && !s.variants.is_empty(), evaluate).clicked() {
                s.evaluate(&ctx);
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                // Words, not sun/moon symbols: the bundled fonts have no emoji, and a tofu box explains nothing.
                let other = if s.settings.theme == Theme::Dark { "Light" } else { "Dark" };
                if ui.button(format!("{other} theme")).on_hover_text("Switch the theme (Ctrl+T)").clicked() {
                    s.settings.theme = if s.settings.theme == Theme::Dark { Theme::Light } else { Theme::Dark };
                }
                ui.label(RichText::new("Whittle").strong());
            });
        });
        self.messages(ui);
    }

    /// Errors and notices, newest last, each dismissible.
    fn messages(&mut self, ui: &mut egui::Ui) {
        let mut dismiss = None;
        for (i, m) in self.state.messages.iter().enumerate() {
            let color = match m.level {
                Level::Error => ui.visuals().error_fg_color,
                Level::Info => ui.visuals().hyperlink_color,
            };
            egui::Frame::new()
                .stroke(egui::Stroke::new(1.0, color))
                .corner_radius(4.0)
                .inner_margin(egui::Margin::symmetric(8, 4))
                .show(ui, |ui| {
                    ui.horizontal(|ui| {
                        if ui.small_button("Dismiss").clicked() {
                            dismiss = Some(i);
                        }
                        ui.add(egui::Label::new(RichText::new(&m.text).color(color)).wrap());
                    });
                });
        }
        if let Some(i) = dismiss {
            self.state.messages.remove(i);
        }
    }

    fn help(&mut self, ctx: &egui::Context) {
        egui::Window::new("Keyboard shortcuts").open(&mut self.show_help).resizable(false).collapsible(false).show(ctx, |ui| {
            egui::Grid::new("shortcuts").num_columns(2).striped(true).show(ui, |ui| {
                for (sc, what) in keys::ALL {
                    ui.monospace(keys::label(ctx, &sc));
                    ui.label(what);
                    ui.end_row();
                }
                ui.monospace("Ctrl+1 … 9");
                ui.label("Switch the centre tab");
                ui.end_row();
            });
        });
    }
}

fn apply_theme(ctx: &egui::Context, theme: Theme) {
    let want = match theme {
        Theme::Dark => egui::Theme::Dark,
        Theme::Light => egui::Theme::Light,
    };
    if ctx.theme() != want {
        ctx.set_theme(want);
    }
}

impl eframe::App for WhittleApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let start = Instant::now();
        let cpu_start = thread_cpu_ms();
        let ctx = ui.ctx().clone();
        self.state.poll_jobs(&ctx);
        self.shortcuts(&ctx);
        apply_theme(&ctx, self.state.settings.theme);

        egui::Panel::top("top").show(ui, |ui| self.top_bar(ui));
        egui::Panel::bottom("status").show(ui, |ui| panes::status::ui(ui, &mut self.state));
        egui::Panel::left("left").default_size(660.0).min_size(420.0).show(ui, |ui| {
            self.model_pane.ui(ui, &mut self.state);
            ui.separator();
            self.plan_pane.ui(ui, &mut self.state);
        });
        egui::CentralPanel::default().show(ui, |ui| {
            ui.horizontal(|ui| {
                for (i, t) in self.tabs.iter().enumerate() {
                    if ui.selectable_label(self.active_tab == i, RichText::new(t.title()).heading()).clicked() {
                        self.active_tab = i;
                    }
                }
            });
            ui.separator();
            if let Some(tab) = self.tabs.get_mut(self.active_tab) {
                tab.ui(ui, &mut self.state);
            }
        });
        self.help(&ctx);

        let wall = start.elapsed().as_secs_f64() * 1e3;
        let cpu = match (cpu_start, thread_cpu_ms()) {
            (Some(a), Some(b)) => b - a,
            _ => wall,
        };
        let busy = self.state.busy();
        self.state.frame.record(wall, cpu, busy);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        if let Some(t) = self.tabs.get(self.active_tab) {
            self.state.settings.tab = t.title().to_string();
        }
        eframe::set_value(storage, eframe::APP_KEY, &self.state.settings);
    }
}
