//! Errors of the back ends.

use std::path::Path;

/// A failure while emitting a target or writing a bundle.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error(transparent)]
    Weight(#[from] herd_ir::WeightError),
    #[error("{target} target cannot lower node `{node}` ({op}): {message}")]
    Unsupported {
        target: &'static str,
        node: String,
        op: &'static str,
        message: String,
    },
    #[error("herd bug: {0}")]
    Bug(String),
    #[error("{path} already exists; pass --force to replace it")]
    Exists { path: String },
}

impl TargetError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, err: std::io::Error) -> TargetError {
        TargetError::Io {
            path: path.display().to_string(),
            message: err.to_string(),
        }
    }
}
