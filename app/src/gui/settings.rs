//! What survives a restart: recent models, theme, the last preset, calibration and evaluation settings, the last
//! tab. Stored through eframe's storage (RON) under `eframe::APP_KEY`; every field has a default, so settings
//! written by an older version load with the fields they know.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use whittle_core::calib::CalibSettings;

/// Colour scheme of the window.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Theme {
    Dark,
    Light,
}

/// Evaluation settings of the Compare pane.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalSettings {
    /// `None`: the held-out tail of the built-in TinyStories text.
    pub text: Option<PathBuf>,
    pub ctx: usize,
    pub max_tokens: usize,
}

impl Default for EvalSettings {
    fn default() -> Self {
        EvalSettings { text: None, ctx: 256, max_tokens: 16384 }
    }
}

/// What survives a restart (eframe storage).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Model specs (`default`, a folder, a Hub id), most recent first.
    pub recent: Vec<String>,
    pub theme: Theme,
    /// File name of the last preset loaded or saved, applied to the next model opened.
    pub last_preset: Option<String>,
    pub calib: CalibSettings,
    /// `None`: the built-in TinyStories text.
    pub calib_text: Option<PathBuf>,
    pub eval: EvalSettings,
    pub log_scale: bool,
    /// Title of the centre tab shown last.
    pub tab: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            recent: Vec::new(),
            theme: Theme::Dark,
            last_preset: Some("w4g128.toml".into()),
            calib: CalibSettings::default(),
            calib_text: None,
            eval: EvalSettings::default(),
            log_scale: false,
            tab: String::new(),
        }
    }
}

/// Recent models kept in the list.
pub const MAX_RECENT: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Memory(HashMap<String, String>);

    impl eframe::Storage for Memory {
        fn get_string(&self, key: &str) -> Option<String> {
            self.0.get(key).cloned()
        }
        fn set_string(&mut self, key: &str, value: String) {
            self.0.insert(key.to_string(), value);
        }
        fn remove_string(&mut self, key: &str) {
            self.0.remove(key);
        }
        fn flush(&mut self) {}
    }

    #[test]
    fn settings_survive_a_restart_through_eframe_storage() {
        let s = Settings {
            recent: vec!["default".into(), "/models/llama".into(), "owner/name".into()],
            theme: Theme::Light,
            last_preset: Some("w4g32.toml".into()),
            calib: CalibSettings { samples: 32, ctx: 128 },
            eval: EvalSettings { text: Some(PathBuf::from("/data/val.txt")), ..Default::default() },
            tab: "Compare".into(),
            ..Default::default()
        };
        let mut storage = Memory::default();
        eframe::set_value(&mut storage, eframe::APP_KEY, &s);
        let back: Settings = eframe::get_value(&storage, eframe::APP_KEY).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn settings_from_an_older_version_keep_their_known_fields() {
        let mut storage = Memory::default();
        eframe::Storage::set_string(&mut storage, eframe::APP_KEY, "(theme: Light)".into());
        let s: Settings = eframe::get_value(&storage, eframe::APP_KEY).unwrap();
        assert_eq!(s.theme, Theme::Light);
        assert_eq!(s.calib, CalibSettings::default());
    }
}
