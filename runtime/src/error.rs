//! Errors of the runtime; each says which file or parameter is wrong and what to do. Their kinds are
//! variants, not text: what a request got wrong ([`RuntimeError::is_request_error`]), how the runtime
//! was configured, what the bundle cannot do, what failed in ONNX Runtime or on the GPU, and herd's own
//! bugs ([`RuntimeError::Bug`]) are told apart by matching.

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
    /// The ONNX Runtime library loaded but its environment could not be made.
    #[error("ONNX Runtime could not start: {message}")]
    OrtInit { message: String },
    /// An ONNX Runtime call failed; `code` is its status (a lost device shows as `DeviceReset` or
    /// `ExecutionProviderFailure`).
    #[error("ONNX Runtime: {message}")]
    Ort {
        code: ort::ErrorCode,
        message: String,
    },
    /// ONNX Runtime refused a graph file of the bundle.
    #[error("{path}: ONNX Runtime cannot load it: {message}")]
    OrtLoad {
        path: String,
        code: ort::ErrorCode,
        message: String,
    },
    /// A pipeline stage failed; `source` is why.
    #[error("pipeline stage {stage} (layers {layers}) failed: {source}")]
    Stage {
        stage: usize,
        layers: String,
        source: Box<RuntimeError>,
    },
    /// A stage's session was taken down (as when its device is lost).
    #[error("its session was taken down (as when its device is lost)")]
    SessionDown,
    /// This stage's thread ended because a neighbouring stage failed; the failing stage reports why.
    #[error("{0} pipeline stage stopped")]
    PipelineStopped(Neighbour),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A runtime option (sessions, context, devices, micro-batches, provider) is out of range or does
    /// not fit the bundle.
    #[error("invalid {option}: {message}")]
    Option {
        option: &'static str,
        message: String,
    },
    /// The bundle was not compiled for what was asked of it.
    #[error("{0}")]
    Unsupported(String),
    /// A low-level call (slots, rows, cache entries) was given arguments outside what it accepts.
    #[error("invalid call: {0}")]
    Call(String),
    /// A sampling or generation parameter is out of range.
    #[error("invalid {name}: {message}")]
    Parameter { name: &'static str, message: String },
    #[error("the prompt has no tokens")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary 0..{vocab}")]
    TokenOutOfVocab { id: i64, vocab: usize },
    #[error("this bundle takes no images: it was compiled without a vision encoder (--text-only, or a text-only checkpoint)")]
    NoVision,
    #[error("the bundle has no tokenizer.json, which {needed_for} needs: compile it from a checkpoint folder that has one, or pass token ids")]
    NoTokenizer { needed_for: &'static str },
    /// Images and the prompt's `<|image|>` placeholders or `<|patch|>` tokens do not match.
    #[error("{0}")]
    ImageMismatch(String),
    #[error("image {path}: {message}")]
    Image { path: String, message: String },
    /// Tokenizing or detokenizing failed inside the tokenizer.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template is invalid or its output is unusable.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A caller's visitor (as in [`crate::Model::probe`]) failed.
    #[error("{0}")]
    Visitor(String),
    #[error("the model produced NaN or infinite logits for batch row {row} at position {position}: its weights may be damaged (`herd verify BUNDLE` checks them) or the computation overflowed its dtype")]
    NonFiniteLogits { row: usize, position: usize },
    #[error("the text is {bytes} bytes: at least {least} tokens, more than the {max} positions the bundle accepts")]
    TextTooLong {
        bytes: usize,
        least: usize,
        max: usize,
    },
    #[error("prompt is {len} tokens but the bundle accepts at most {max} positions (compile with a larger --max-context)")]
    TooLong { len: usize, max: usize },
    #[error("the prompt is {prompt} tokens and max_new_tokens {new} needs {prompt} + {new} - 1 positions, but the bundle accepts at most {max} (ask for fewer new tokens, or compile with a larger --max-context)")]
    TooLongWithNew {
        prompt: usize,
        new: usize,
        max: usize,
    },
    /// Something herd's own code should have made impossible; kept apart from user errors.
    #[error("herd runtime bug in {stage}: {message} (please report it)")]
    Bug {
        stage: &'static str,
        message: String,
    },
}

/// Which neighbour of a pipeline stage stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Neighbour {
    Earlier,
    Later,
}

impl std::fmt::Display for Neighbour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Neighbour::Earlier => "an earlier",
            Neighbour::Later => "a later",
        })
    }
}

/// What a GPU machine needs, for error messages.
pub(crate) const GPU_SETUP: &str = "a machine with the target GPU (H100, SM 9.0), CUDA 13 with cuDNN 9, TensorRT 10.x (libnvinfer.so.10) and \
the GPU build of ONNX Runtime 1.31.1 (the onnxruntime-gpu wheel's libonnxruntime.so with its \
libonnxruntime_providers_tensorrt.so; point ORT_DYLIB_PATH at it), and herd built with `--features tensorrt`";

/// Why a GPU or one of its engines cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no NVIDIA GPU {device} ({why}); this needs {GPU_SETUP}")]
    NoDevice { device: u32, why: String },
    #[error("the loaded ONNX Runtime has no {provider} execution provider (it is the CPU build); this needs {GPU_SETUP}")]
    NoProvider { provider: &'static str },
    #[error("this herd was built without GPU execution providers: rebuild with `cargo build --release --features tensorrt`; running on a GPU also needs {GPU_SETUP}")]
    NotBuilt,
    #[error("the bundle's TensorRT engine was built for compute capability {built} ({built_gpu}), but this GPU is {found} ({found_gpu}): rebuild it here with `herd build-engine`")]
    EngineForOtherGpu {
        built: String,
        built_gpu: String,
        found: String,
        found_gpu: String,
    },
    #[error("the bundle's TensorRT engine was built with TensorRT {built}, but this machine has TensorRT {found}: rebuild it with `herd build-engine`")]
    EngineForOtherTensorRt { built: String, found: u32 },
    #[error("GPU {device} ({gpu}) has compute capability {found}, the bundle targets {wanted}: build engines on the GPU type that will serve them")]
    OtherTarget {
        device: u32,
        gpu: String,
        found: String,
        wanted: String,
    },
}

impl<T> From<ort::Error<T>> for RuntimeError {
    fn from(e: ort::Error<T>) -> RuntimeError {
        RuntimeError::Ort {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

/// ONNX Runtime's refusal to load the graph file `path`.
pub(crate) fn load_error<T>(path: &std::path::Path, e: ort::Error<T>) -> RuntimeError {
    RuntimeError::OrtLoad {
        path: path.display().to_string(),
        code: e.code(),
        message: e.to_string(),
    }
}

impl RuntimeError {
    /// A bug in `stage` of herd's runtime.
    pub fn bug(stage: &'static str, message: impl Into<String>) -> RuntimeError {
        RuntimeError::Bug {
            stage,
            message: message.into(),
        }
    }

    /// An out-of-range runtime option.
    pub fn option(option: &'static str, message: impl Into<String>) -> RuntimeError {
        RuntimeError::Option {
            option,
            message: message.into(),
        }
    }

    /// Whether the error is the request's fault (what a server answers with 400), as opposed to the
    /// server's configuration, the bundle, the machine or a bug. Every variant is decided here.
    pub fn is_request_error(&self) -> bool {
        match self {
            RuntimeError::Parameter { .. }
            | RuntimeError::EmptyPrompt
            | RuntimeError::TokenOutOfVocab { .. }
            | RuntimeError::NoVision
            | RuntimeError::NoTokenizer { .. }
            | RuntimeError::ImageMismatch(_)
            | RuntimeError::Image { .. }
            | RuntimeError::Tokenizer(_)
            | RuntimeError::ChatTemplate(_)
            | RuntimeError::TextTooLong { .. }
            | RuntimeError::TooLong { .. }
            | RuntimeError::TooLongWithNew { .. } => true,
            RuntimeError::Io { .. }
            | RuntimeError::BadManifest { .. }
            | RuntimeError::FormatVersion { .. }
            | RuntimeError::Tampered { .. }
            | RuntimeError::OrtMissing { .. }
            | RuntimeError::OrtInit { .. }
            | RuntimeError::Ort { .. }
            | RuntimeError::OrtLoad { .. }
            | RuntimeError::Stage { .. }
            | RuntimeError::SessionDown
            | RuntimeError::PipelineStopped(_)
            | RuntimeError::Gpu(_)
            | RuntimeError::Option { .. }
            | RuntimeError::Unsupported(_)
            | RuntimeError::Call(_)
            | RuntimeError::Visitor(_)
            | RuntimeError::NonFiniteLogits { .. }
            | RuntimeError::Bug { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_errors_are_told_apart_from_server_errors() {
        assert!(RuntimeError::EmptyPrompt.is_request_error());
        assert!(RuntimeError::TokenOutOfVocab { id: 9, vocab: 4 }.is_request_error());
        assert!(!RuntimeError::bug("decode", "x").is_request_error());
        assert!(!RuntimeError::option("sessions", "x").is_request_error());
        assert!(!RuntimeError::Gpu(GpuError::NotBuilt).is_request_error());
        let stage = RuntimeError::Stage {
            stage: 1,
            layers: "2..4".into(),
            source: Box::new(RuntimeError::SessionDown),
        };
        assert_eq!(
            stage.to_string(),
            "pipeline stage 1 (layers 2..4) failed: its session was taken down (as when its device is lost)"
        );
    }
}
