//! herd-runtime: what services link to run the bundles herd compiles. It loads a bundle (checking its
//! format and checksums), runs the decoder through ONNX Runtime (`ort`, library loaded at run time),
//! owns the KV cache (device buffers written in place), batches rows at their own positions, and samples tokens. It depends on no compiler crate.

pub mod batch;
pub mod bundle;
pub mod cache;
pub mod capi;
pub mod cpu_memory;
pub mod decode;
pub mod error;
pub mod generate;
pub mod manifest;
pub mod model;
pub mod onnxruntime;
pub mod providers;
pub mod sampling;
pub mod session;
mod stage;
pub mod text;
mod timing;
pub mod vision;
mod window;

/// The `ort` this runtime is built against (the compiler's engine builder uses the same one).
pub use ort;

pub use batch::{Batch, BatchEvent, SequenceId};
pub use bundle::{parse_manifest, Bundle, FileCheck};
pub use cache::{KvBytes, KvCache};
pub use error::{GpuError, RuntimeError};
pub use generate::{prepare_prompt, Prompt, TokenEvent, TokenStream};
pub use model::{GenerateParams, Generation, ImageRows, Model, RuntimeOptions, StopReason};
pub use providers::Provider;
pub use sampling::{SampleParams, Sampling};
pub use session::Session;
pub use text::{Message, TextCodec};
