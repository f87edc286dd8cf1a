//! The non-tensor files of an export: `config.json` (the source config with only `quantization_config` and the
//! dtype changed, so every architecture field a loader needs survives untouched), GPTQModel's
//! `quantize_config.json`, the tokenizer and generation files copied as they are, and the final listing.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::super::{Dtype, ExportError, FloatDtype};
use crate::error::{Result, WhittleError};

/// Files copied next to the weights when the source folder has them (formats.md §4), so the export is a complete
/// model folder for transformers and vLLM.
pub(super) const SIDE_FILES: [&str; 10] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// transformers' name of a dtype.
pub(super) fn torch_dtype(d: FloatDtype) -> &'static str {
    match d {
        FloatDtype::F16 => "float16",
        FloatDtype::BF16 => "bfloat16",
        FloatDtype::F32 => "float32",
    }
}

pub(super) fn pretty(v: &Value) -> Result<String> {
    serde_json::to_string_pretty(v)
        .map_err(|e| WhittleError::Invalid(format!("cannot serialize JSON for the export: {e}")))
}

/// The source `config.json` with `quantization_config` replaced (or removed, for a dense export of an imported
/// quantized model, whose old config would otherwise describe tensors that are no longer there) and the dtype set.
pub(super) fn config_json(raw: &Value, quantization_config: Option<&Value>, dtype: FloatDtype) -> Result<String> {
    let mut cfg = raw.clone();
    let obj = cfg
        .as_object_mut()
        .ok_or_else(|| ExportError::config("(config.json)", "the source config is not a JSON object"))?;
    obj.remove("quantization_config");
    if let Some(qc) = quantization_config {
        obj.insert("quantization_config".into(), qc.clone());
    }
    obj.insert("torch_dtype".into(), Value::from(torch_dtype(dtype)));
    // Newer transformers write `dtype` instead; keep both in agreement when the source has it.
    if obj.contains_key("dtype") {
        obj.insert("dtype".into(), Value::from(torch_dtype(dtype)));
    }
    pretty(&cfg)
}

pub(super) fn write(dir: &Path, name: &str, text: &str) -> super::super::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|e| ExportError::io(&path, e))
}

/// Copies the [`SIDE_FILES`] that `src` has into `dir`.
pub(super) fn copy_side_files(src: &Path, dir: &Path) -> super::super::Result<()> {
    for name in SIDE_FILES {
        let from = src.join(name);
        if from.is_file() {
            std::fs::copy(&from, dir.join(name)).map_err(|e| ExportError::io(&from, e))?;
        }
    }
    Ok(())
}

/// The files of the finished folder (sorted) and their total size.
pub(super) fn listing(dir: &Path) -> Result<(Vec<PathBuf>, u64)> {
    let mut files = Vec::new();
    let mut bytes = 0;
    for e in std::fs::read_dir(dir).map_err(|e| WhittleError::io(dir, e))? {
        let e = e.map_err(|e| WhittleError::io(dir, e))?;
        let meta = e.metadata().map_err(|err| WhittleError::io(e.path(), err))?;
        if meta.is_file() {
            bytes += meta.len();
            files.push(e.path());
        }
    }
    files.sort();
    Ok((files, bytes))
}

/// The dtype name used in the model card.
pub(super) fn dtype_name(d: FloatDtype) -> &'static str {
    Dtype::from(d).name()
}
