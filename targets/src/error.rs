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
    /// Something herd's own code should have made impossible (never the user's input); kept apart
    /// from the refusals above.
    #[error("herd bug in {stage}{}: {message} (please report it)", .node.as_ref().map(|n| format!(" at node `{n}`")).unwrap_or_default())]
    Bug {
        stage: &'static str,
        node: Option<String>,
        message: String,
    },
    #[error("{path} already exists; pass --force to replace it")]
    Exists { path: String },
}

impl TargetError {
    /// A bug in `stage` of herd's emitter.
    pub fn bug(stage: &'static str, message: impl Into<String>) -> TargetError {
        TargetError::Bug {
            stage,
            node: None,
            message: message.into(),
        }
    }

    /// A bug in `stage` of herd's emitter while lowering IR node `node`.
    pub fn bug_at(stage: &'static str, node: &str, message: impl Into<String>) -> TargetError {
        TargetError::Bug {
            stage,
            node: Some(node.to_string()),
            message: message.into(),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: &Path, err: std::io::Error) -> TargetError {
        TargetError::Io {
            path: path.display().to_string(),
            message: err.to_string(),
        }
    }
}
