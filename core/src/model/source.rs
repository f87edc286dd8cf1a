//! Where a model comes from: a local folder, a Hugging Face Hub id (`owner/name`, fetched through hf-hub into its
//! standard cache), or the embedded default (stories260k, shipped in `assets/` and compiled into the binary so the
//! app works offline on first launch).

use crate::error::{Result, WhittleError};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    Default,
    Folder(PathBuf),
    Hub(String),
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Default => write!(f, "stories260k (embedded default)"),
            ModelSource::Folder(p) => write!(f, "{}", p.display()),
            ModelSource::Hub(id) => write!(f, "{id} (Hugging Face Hub)"),
        }
    }
}

/// `None` → the default; an existing path → a folder; `owner/name` that is not a path → a Hub id.
pub fn parse_source(spec: Option<&str>) -> ModelSource {
    match spec {
        None | Some("") | Some("default") => ModelSource::Default,
        Some(s) => {
            let p = Path::new(s);
            let looks_like_id = s.split('/').count() == 2
                && !s.starts_with('.')
                && !s.starts_with('/')
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            if p.exists() || !looks_like_id {
                ModelSource::Folder(p.to_path_buf())
            } else {
                ModelSource::Hub(s.to_string())
            }
        }
    }
}

const DEFAULT_FILES: [(&str, &[u8]); 7] = [
    ("config.json", include_bytes!("../../../assets/stories260k/config.json")),
    ("generation_config.json", include_bytes!("../../../assets/stories260k/generation_config.json")),
    ("model.safetensors", include_bytes!("../../../assets/stories260k/model.safetensors")),
    ("tokenizer.json", include_bytes!("../../../assets/stories260k/tokenizer.json")),
    ("tokenizer.model", include_bytes!("../../../assets/stories260k/tokenizer.model")),
    ("tokenizer_config.json", include_bytes!("../../../assets/stories260k/tokenizer_config.json")),
    ("special_tokens_map.json", include_bytes!("../../../assets/stories260k/special_tokens_map.json")),
];

/// The default calibration text (TinyStories train head), compiled in for the same reason as the model.
pub const DEFAULT_CALIBRATION_TEXT: &str = include_str!("../../../assets/tinystories_train_calib.txt");

/// Folder of the embedded default model: the source tree's `assets/` when present, else the compiled-in copy
/// written once to the user's cache folder.
pub fn default_model_dir() -> Result<PathBuf> {
    let in_tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/stories260k");
    if in_tree.join("model.safetensors").exists() {
        return Ok(in_tree);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join("whittle").join(format!("stories260k-{}", env!("CARGO_PKG_VERSION")));
    if !dir.join("model.safetensors").exists() {
        let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).map_err(|e| WhittleError::io(&tmp, e))?;
        for (name, bytes) in DEFAULT_FILES {
            std::fs::write(tmp.join(name), bytes).map_err(|e| WhittleError::io(tmp.join(name), e))?;
        }
        if let Err(e) = std::fs::rename(&tmp, &dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            if !dir.join("model.safetensors").exists() {
                return Err(WhittleError::io(&dir, e));
            }
        }
    }
    Ok(dir)
}

/// Download progress of a Hub fetch.
#[derive(Clone, Debug)]
pub enum HubProgress {
    File { name: String, index: usize, count: usize, bytes: usize },
    Bytes { done: usize, total: usize },
}

struct ProgressSink<'a> {
    done: usize,
    total: usize,
    report: &'a mut dyn FnMut(HubProgress),
}

impl hf_hub::api::Progress for ProgressSink<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = size;
        self.done = 0;
    }
    fn update(&mut self, size: usize) {
        self.done += size;
        (self.report)(HubProgress::Bytes { done: self.done, total: self.total });
    }
    fn finish(&mut self) {}
}

const WANTED: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
];

/// Fetches a Hub repo's model files into the hf-hub cache and returns the snapshot folder. Files already cached are
/// used without touching the network; `HF_HUB_OFFLINE=1` forbids the network. `cancelled` is checked between files.
pub fn fetch_hub(id: &str, report: &mut dyn FnMut(HubProgress), cancelled: &dyn Fn() -> bool) -> Result<PathBuf> {
    let hub_err = |what: &str, e: &dyn std::fmt::Display| {
        WhittleError::Invalid(format!(
            "Hugging Face Hub `{id}`: {what}: {e}. Without network access, download the model elsewhere and open its folder instead."
        ))
    };
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(id.to_string());
    if let Some(cfg) = cached.get("config.json") {
        let has_weights = cached.get("model.safetensors").is_some() || {
            cached.get("model.safetensors.index.json").is_some_and(|idx| shards_present(&idx, &cached))
        };
        if has_weights && cached.get("tokenizer.json").is_some() {
            return Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default());
        }
    }
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        return Err(hub_err("not in the local cache", &"HF_HUB_OFFLINE is set"));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .with_retries(0)
        .build()
        .map_err(|e| hub_err("cannot start the client", &e))?;
    let repo = api.model(id.to_string());
    let info = repo.info().map_err(|e| hub_err("cannot reach the Hub", &e))?;
    let names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let mut files: Vec<String> = WANTED.iter().filter(|w| names.iter().any(|n| n == *w)).map(|s| s.to_string()).collect();
    if names.iter().any(|n| n == "model.safetensors") {
        files.push("model.safetensors".into());
    } else if names.iter().any(|n| n == "model.safetensors.index.json") {
        files.push("model.safetensors.index.json".into());
        files.extend(names.iter().filter(|n| n.starts_with("model-") && n.ends_with(".safetensors")).cloned());
    } else {
        return Err(hub_err("no safetensors weights in the repository", &"only .safetensors is supported"));
    }
    let count = files.len();
    let mut dir = None;
    for (index, name) in files.iter().enumerate() {
        if cancelled() {
            return Err(WhittleError::Cancelled);
        }
        report(HubProgress::File { name: name.clone(), index, count, bytes: 0 });
        let sink = ProgressSink { done: 0, total: 0, report: &mut *report };
        let path = repo.download_with_progress(name, sink).map_err(|e| hub_err(&format!("downloading {name}"), &e))?;
        dir = path.parent().map(Path::to_path_buf);
    }
    dir.ok_or_else(|| hub_err("nothing downloaded", &"empty file list"))
}

fn shards_present(index: &Path, cached: &hf_hub::CacheRepo) -> bool {
    let Ok(text) = std::fs::read_to_string(index) else { return false };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else { return false };
    map.values().filter_map(|f| f.as_str()).all(|f| cached.get(f).is_some())
}

/// Resolves a source to a local folder (downloading Hub models).
pub fn resolve(source: &ModelSource, report: &mut dyn FnMut(HubProgress), cancelled: &dyn Fn() -> bool) -> Result<PathBuf> {
    match source {
        ModelSource::Default => default_model_dir(),
        ModelSource::Folder(p) => Ok(p.clone()),
        ModelSource::Hub(id) => fetch_hub(id, report, cancelled),
    }
}
