//! Errors of the runtime; each says which file or parameter is wrong and what to do.

/// A runtime failure.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path}: not a herd bundle: {message}")]
    BadManifest { path: String, message: String },
    #[error("{path}: bundle format {found} is not supported by this runtime (format {supported}); recompile it with this herd version")]
    FormatVersion {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error("{path}: {message}; the bundle is damaged or was modified after compiling: recompile or copy it again")]
    Tampered { path: String, message: String },
    #[error("ONNX Runtime library not found ({tried}). Install it with `scripts/install-onnxruntime.sh` (it unpacks onnxruntime==1.31.1 from PyPI into .cache/onnxruntime/) or set ORT_DYLIB_PATH to a libonnxruntime.so 1.31")]
    OrtMissing { tried: String },
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error("pipeline stage {stage} (layers {layers}) failed: {message}")]
    Stage {
        stage: usize,
        layers: String,
        message: String,
    },
    #[error("{0}")]
    Gpu(String),
    #[error("invalid parameter: {0}")]
    Param(String),
    #[error("image {path}: {message}")]
    Image { path: String, message: String },
    #[error("the model produced NaN or infinite logits for batch row {row} at position {position}: its weights may be damaged (`herd verify BUNDLE` checks them) or the computation overflowed its dtype")]
    NonFiniteLogits { row: usize, position: usize },
    #[error("prompt is {len} tokens but the bundle accepts at most {max} positions (compile with a larger --max-context)")]
    TooLong { len: usize, max: usize },
    #[error("the prompt is {prompt} tokens and max_new_tokens {new} needs {prompt} + {new} - 1 positions, but the bundle accepts at most {max} (ask for fewer new tokens, or compile with a larger --max-context)")]
    TooLongWithNew {
        prompt: usize,
        new: usize,
        max: usize,
    },
}

impl<T> From<ort::Error<T>> for RuntimeError {
    fn from(e: ort::Error<T>) -> RuntimeError {
        RuntimeError::Ort(e.to_string())
    }
}
