//! The ONNX target: lowers a Lowered-phase graph to an ONNX model (opset 23, IR version 11) whose weights
//! stream, one tensor at a time, into an external data file.
//!
//! Standard ops carry the decoder: `Gather`, `RMSNormalization`, `MatMul` (weights stored transposed
//! as [K, N]), `RotaryEmbedding` (interleaved=1, int64 position ids), `Attention` (4D, explicit bool
//! mask, is_causal=0, the KV cache concatenated outside the op). The MoE has two lowerings:
//!
//! - `ort`: `com.microsoft.MoE` (ONNX Runtime only). The input is pre-scaled by `sigmoid(max logit)` and
//!   the op runs with k=1 and normalize_routing_weights=1, so the selected expert's weight is exactly 1
//!   and Llama 4's input scaling is reproduced; plain SwiGLU (alpha 1, beta 0, no clamp). Cost: each token
//!   runs one expert, reading 1/E of the expert weights.
//! - `portable`: standard ops only (what TensorRT receives): `TopK` (k=1) -> `Sigmoid` -> `Gather` of the
//!   selected expert's matrices -> batched `MatMul`. Compute is one expert per token, but the gather
//!   copies each token's expert matrices ([T, H, 2I] + [T, I, H] elements), so prefill memory grows
//!   with the number of tokens per call: prefill long prompts in slices.
//!
//! The shared expert runs beside the routed one in both lowerings.
//!
//! Quantized weights (see `herd_ir::quant`) become `DequantizeLinear` (block scales along K, axis 0 of
//! the [K, N] weight) feeding `MatMul`, which ONNX Runtime fuses into `MatMulNBits`. Quantized experts:
//! `ort` uses `com.microsoft.QMoE` for int4/int8 (packed [E, N, K], one expert read per token) and
//! dequantizes fp8 experts whole for `MoE`; `portable` gathers int8 experts before dequantizing them,
//! but dequantizes int4/fp8 experts whole first (ONNX `Gather` takes neither type): correct, with the
//! cost of every expert dequantized per call.

mod emit;
mod external;
mod proto;
mod quantized;

pub use emit::{emit, emit_as, ModelNames, OnnxModel, DECODER, VISION};

use herd_ir::ops::ExpertLayout;
use herd_ir::DType;

/// ONNX opset of the default domain.
pub const OPSET: i64 = 23;
/// Model IR version matching [`OPSET`] (ONNX Runtime 1.31 accepts up to 13).
pub const IR_VERSION: i64 = 11;

/// How fused MoE ops are lowered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeLowering {
    /// `com.microsoft.MoE`: fast on ONNX Runtime CPU, not portable.
    Ort,
    /// Standard ONNX ops only: the form TensorRT receives.
    Portable,
}

impl MoeLowering {
    /// The expert layout `expert_fusion` must produce for this lowering.
    pub fn layout(self) -> ExpertLayout {
        match self {
            MoeLowering::Ort => ExpertLayout::Interleaved,
            MoeLowering::Portable => ExpertLayout::Halves,
        }
    }

    /// The name used on the command line and in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            MoeLowering::Ort => "ort",
            MoeLowering::Portable => "portable",
        }
    }
}

/// Options of the ONNX target.
#[derive(Clone, Debug)]
pub struct OnnxOptions {
    /// Element type of weights, activations and the KV cache: f32 or f16. Logits are always f32.
    pub dtype: DType,
    pub moe: MoeLowering,
}
