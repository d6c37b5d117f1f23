//! Typed errors of the IR crate. Each names the file, tensor or node it concerns and, for user mistakes,
//! says what to do.

use std::fmt;

use crate::types::DType;

/// A problem with a weight file or a weight's bytes.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{file}: cannot read: {message}")]
    Io { file: String, message: String },
    #[error("{file}: {problem}")]
    BadShard { file: String, problem: String },
    /// A weight (one checkpoint tensor, or several joined with `+`) that cannot be read as declared.
    #[error("weight `{tensor}`: {problem}")]
    BadWeight { tensor: String, problem: String },
    #[error("tensor `{tensor}` is not in any shard")]
    Missing { tensor: String },
    #[error(
        "tensor `{tensor}`: dtype {dtype} cannot be read as numbers by the reference evaluator"
    )]
    UnsupportedDtype { tensor: String, dtype: DType },
}

/// A problem with `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: not found; a Hugging Face checkpoint folder must contain config.json")]
    Missing { file: String },
    #[error("{file}: cannot read: {message}")]
    Io { file: String, message: String },
    #[error("{file}: invalid JSON: {message}")]
    InvalidJson { file: String, message: String },
    #[error("{file}: missing required key `{key}`")]
    MissingKey { file: String, key: String },
    #[error("{file}: key `{key}`: {problem}")]
    BadValue {
        file: String,
        key: String,
        problem: String,
    },
    #[error("{file}: unsupported architecture {found}; herd compiles Llama4ForConditionalGeneration and Llama4ForCausalLM checkpoints")]
    UnsupportedArchitecture { file: String, found: String },
}

/// A problem found while importing a checkpoint folder.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("{dir}: no weights found: expected model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: String },
    #[error("{file}: {problem}")]
    BadIndex { file: String, problem: String },
    #[error("{index}: tensor `{tensor}` is listed in shard {shard}, which does not contain it")]
    NotInShard {
        index: String,
        tensor: String,
        shard: String,
    },
    #[error("tensor `{tensor}` ({file}) has shape {found:?}, but the config implies {expected:?}")]
    WrongShape {
        tensor: String,
        file: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{tensor}` ({file}) has dtype {dtype}; herd reads f32, f16 and bf16 weights")]
    UnsupportedWeightDtype {
        tensor: String,
        file: String,
        dtype: String,
    },
    #[error("missing tensor `{tensor}` ({what}); the checkpoint is incomplete or does not match config.json")]
    MissingTensor { tensor: String, what: String },
    #[error("herd bug: the imported graph failed verification:\n{0}")]
    Verify(VerifyError),
    #[error("{0}")]
    Unsupported(String),
    #[error("{file} {problem}: herd reads only regular files inside the model folder {dir}")]
    OutsideFolder {
        file: String,
        dir: String,
        problem: String,
    },
}

/// One verifier finding, attached to the node it concerns.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    /// The node's index, if the finding concerns a node.
    pub node: Option<u32>,
    /// The node's name (or the graph output's name).
    pub name: String,
    pub message: String,
}

/// Every finding of one verifier run, with the pass that ran before it, if any.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyError {
    pub after_pass: Option<String>,
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.after_pass {
            Some(pass) => writeln!(
                f,
                "{} verifier error(s) after pass `{pass}`:",
                self.diagnostics.len()
            )?,
            None => writeln!(f, "{} verifier error(s):", self.diagnostics.len())?,
        }
        for d in &self.diagnostics {
            match d.node {
                Some(n) => writeln!(f, "  node %{n} `{}`: {}", d.name, d.message)?,
                None => writeln!(f, "  `{}`: {}", d.name, d.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for VerifyError {}

/// A failure of the reference evaluator.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("graph input `{0}` was not provided")]
    MissingInput(String),
    #[error("graph input `{name}`: {problem}")]
    BadInput { name: String, problem: String },
    #[error(transparent)]
    Weight(#[from] WeightError),
    #[error("node `{node}` ({op}): {problem}")]
    Node {
        node: String,
        op: &'static str,
        problem: String,
    },
    #[error(transparent)]
    Verify(#[from] VerifyError),
}
