//! The error type of model-level operations: every variant names the file and, where there is one, the field or
//! tensor, because the user has to be able to find what is wrong in their own files.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WhittleError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: field `{field}`: {reason}")]
    Field { path: PathBuf, field: String, reason: String },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Compress(#[from] crate::compress::CompressError),
    /// An export that cannot be written (layer, tensor, config field or folder named), or a checkpoint tensor that
    /// cannot be imported.
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
}

pub type Result<T, E = WhittleError> = std::result::Result<T, E>;

impl WhittleError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), err: source }
    }
    pub fn field(path: impl Into<PathBuf>, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Field { path: path.into(), field: field.into(), reason: reason.into() }
    }
    pub fn file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::File { path: path.into(), reason: reason.into() }
    }
}
