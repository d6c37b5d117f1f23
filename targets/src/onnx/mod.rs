//! The ONNX target: lowers a Lowered-phase graph to an ONNX model (opset 24, IR version 12) whose weights
//! stream, one tensor at a time, into an external data file.
//!
//! Standard ops carry the decoder: `Gather`, `RMSNormalization`, `MatMul` (weights stored transposed
//! as [K, N]), `RotaryEmbedding` (interleaved=1, per-token cos/sin computed from the positions), `Attention` (4D,
//! explicit bool mask, is_causal=0), the KV cache fixed-size buffers written in place by `TensorScatter`
//! outside the op (module `attention`). The routed experts of each MoE have
//! three lowerings ([`MoeLowering`], module `moe`):
//!
//! - `ort`: `com.microsoft.MoE` / `QMoE` for ONNX Runtime's CPU kernels (fp8 experts dequantized whole).
//! - `cuda`: the same ops for ONNX Runtime's CUDA EP beside TensorRT (int experts marked raw for the CUDA
//!   kernels' own prepacking; fp8 experts go `grouped`).
//! - `grouped`: standard ops only; each expert multiplies the rows routed to it.
//!
//! Quantized weights (see `herd_ir::quant`) become `DequantizeLinear` (block scales along K, axis 0 of
//! the [K, N] weight) feeding `MatMul`, which ONNX Runtime fuses into `MatMulNBits`.

mod attention;
mod emit;
mod external;
mod lower;
mod moe;
mod proto;
mod quantized;

pub use emit::{emit, emit_as, ModelNames, OnnxModel};

use herd_ir::ops::ExpertLayout;
use herd_ir::DType;

/// ONNX opset of the default domain.
pub const OPSET: i64 = 24;
/// Model IR version matching [`OPSET`] (ONNX Runtime 1.31 accepts up to 13).
pub const IR_VERSION: i64 = 12;

pub use herd_runtime::manifest::MoeLowering;

/// The expert layout `expert_fusion` must produce for `lowering`.
pub fn expert_layout(lowering: MoeLowering) -> ExpertLayout {
    match lowering {
        MoeLowering::Ort | MoeLowering::Cuda => ExpertLayout::Interleaved,
        MoeLowering::Grouped => ExpertLayout::Halves,
    }
}

/// Options of the ONNX target.
#[derive(Clone, Debug)]
pub struct OnnxOptions {
    /// Element type of weights, activations and the KV cache: f32 or f16. Logits are always f32.
    pub dtype: DType,
    pub moe: MoeLowering,
}

/// Every initializer of the ONNX model at `path` whose data lives in an external file, with its
/// length in bytes.
pub fn external_initializers(
    path: &std::path::Path,
) -> Result<Vec<(String, u64)>, crate::error::TargetError> {
    use onnx_protobuf::Message;
    let bytes = std::fs::read(path).map_err(|e| crate::error::TargetError::io(path, e))?;
    let model = onnx_protobuf::ModelProto::parse_from_bytes(&bytes).map_err(|e| {
        crate::error::TargetError::Io {
            path: path.display().to_string(),
            message: format!("not an ONNX model: {e}"),
        }
    })?;
    Ok(model
        .graph
        .get_or_default()
        .initializer
        .iter()
        .filter_map(|t| {
            let length = t
                .external_data
                .iter()
                .find(|e| e.key == "length")?
                .value
                .parse()
                .ok()?;
            Some((t.name.clone(), length))
        })
        .collect())
}
