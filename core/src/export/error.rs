//! What can go wrong exporting or importing a checkpoint. Every variant names the layer (module name), tensor,
//! config field or path involved, because the user has to find the culprit in a model with hundreds of layers or
//! in a `config.json` written by another tool.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A layer cannot be written in the chosen format (bits, group size, zero points, shapes...).
    #[error("{layer}: {reason}")]
    Layer { layer: String, reason: String },

    /// A tensor read back from a checkpoint has the wrong dtype, shape or contents.
    #[error("tensor `{tensor}`: {reason}")]
    Tensor { tensor: String, reason: String },

    /// A `quantization_config` field is missing, malformed or names something unsupported.
    #[error("quantization_config field `{field}`: {reason}")]
    Config { field: String, reason: String },

    /// The export folder already exists and `force` was not given.
    #[error("{path}: already exists; choose another folder or export with force to replace it")]
    TargetExists { path: PathBuf },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// Several layers failed the pre-export check; all of them are listed so the user can fix them at once.
    #[error("{} layers cannot be exported:\n{}", .0.len(), list(.0))]
    Several(Vec<ExportError>),
}

fn list(errors: &[ExportError]) -> String {
    errors.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n")
}

impl ExportError {
    pub fn layer(layer: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Layer { layer: layer.into(), reason: reason.into() }
    }
    pub fn tensor(tensor: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Tensor { tensor: tensor.into(), reason: reason.into() }
    }
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config { field: field.into(), reason: reason.into() }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    /// One error stays itself; several become [`ExportError::Several`]; none is `Ok`.
    pub(crate) fn collect(mut errors: Vec<ExportError>) -> Result<(), ExportError> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ExportError::Several(errors)),
        }
    }
}

pub type Result<T, E = ExportError> = std::result::Result<T, E>;
