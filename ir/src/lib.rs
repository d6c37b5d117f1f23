//! herd-ir: the graph IR of the herd compiler, its verifier, text printer and reference evaluator, and the
//! Hugging Face Llama 4 importer that is its front end.

pub mod config;
pub mod error;
pub mod eval;
pub mod eval_prompt;
pub mod gptq;
pub mod graph;
pub mod import;
pub mod infer;
pub mod layout;
pub mod names;
pub mod ops;
pub mod print;
pub mod quant;
pub mod split;
pub mod stream;
pub mod types;
pub mod verify;
pub mod vision;
pub mod weights;

pub use config::Llama4Config;
pub use error::{ConfigError, Diagnostic, EvalError, ImportError, VerifyError, WeightError};
pub use graph::{Graph, Node, Value};
pub use import::{import, import_with, model_file, parse_index, Checkpoint, Imported};
pub use ops::{Op, Phase};
pub use types::{DType, Dim, DimBindings, Shape, SymDim, TensorType};
pub use verify::{verified, verify, Verified};
