//! Keyboard shortcuts for the main actions. They are constants so the menus can print the same chord they answer
//! to, and they are consumed once per frame before the panes draw, so a shortcut and its button do one thing.

use eframe::egui::{Context, Key, KeyboardShortcut, Modifiers};

pub const OPEN_FOLDER: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::O);
pub const COMPRESS: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Enter);
pub const EVALUATE: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::E);
pub const CANCEL: KeyboardShortcut = KeyboardShortcut::new(Modifiers::NONE, Key::Escape);
pub const SAVE_PRESET: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::S);
pub const SELECT_ALL: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::A);
pub const LOG_SCALE: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::L);
pub const THEME: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::T);
pub const HELP: KeyboardShortcut = KeyboardShortcut::new(Modifiers::NONE, Key::F1);
pub const QUIT: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Q);

/// Ctrl+1 … Ctrl+9 pick the centre tabs in order.
pub const TAB_KEYS: [Key; 9] = [Key::Num1, Key::Num2, Key::Num3, Key::Num4, Key::Num5, Key::Num6, Key::Num7, Key::Num8, Key::Num9];

/// Every shortcut with what it does, for the help window.
pub const ALL: [(KeyboardShortcut, &str); 10] = [
    (OPEN_FOLDER, "Open a model folder"),
    (COMPRESS, "Compress with the plan in the table"),
    (EVALUATE, "Evaluate the variants on the chosen text"),
    (CANCEL, "Cancel the running job"),
    (SAVE_PRESET, "Save the plan as a preset"),
    (SELECT_ALL, "Select every layer (outside text fields)"),
    (LOG_SCALE, "Toggle the log scale of the error plots"),
    (THEME, "Switch between dark and light"),
    (HELP, "Show the keyboard shortcuts"),
    (QUIT, "Quit"),
];

pub fn pressed(ctx: &Context, shortcut: &KeyboardShortcut) -> bool {
    ctx.input_mut(|i| i.consume_shortcut(shortcut))
}

pub fn label(ctx: &Context, shortcut: &KeyboardShortcut) -> String {
    ctx.format_shortcut(shortcut)
}
