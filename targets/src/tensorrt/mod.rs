//! The TensorRT target (H100): what TensorRT's ONNX parser accepts, checked by a lint over the emitted
//! ONNX model, and the optimisation profiles the TensorRT execution provider builds engines with.
//! Engines themselves are built on a GPU machine through ONNX Runtime's TensorRT EP (`herd build-engine`).

mod lint;
mod partition;

pub use lint::{lint, lint_file, lint_file_with, lint_with, LintReport, Violation, RULES};
pub use partition::{is_cuda_ep_node, partition, Partition, CUDA_EP_OPS};

/// Compute capability of the H100.
pub const H100_COMPUTE_CAPABILITY: &str = "9.0";

/// Shapes of the optimisation profile, as TensorRT EP option strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profiles {
    pub min: String,
    pub opt: String,
    pub max: String,
}

/// Profiles for a decoder whose `kv` cache inputs are fixed buffers [slots, kv_heads, length, head_dim]
/// (each name with its ring length for chunked layers, None for full layers): slots 1..=max_batch, new
/// tokens 1..=max_seq, full layers' length 1..=max_context (a session allocates its context), rings
/// their own length; opt is decode (one token) at full batch with the whole context allocated.
pub fn profiles(
    kv: &[(String, Option<usize>)],
    kv_heads: usize,
    head_dim: usize,
    max_batch: usize,
    max_seq: usize,
    max_context: usize,
) -> Profiles {
    let shape = |batch: usize, seq: usize, context: usize| {
        let mut parts = vec![
            format!("input_ids:{batch}x{seq}"),
            format!("position_ids:{batch}x{seq}"),
            // Logits of every token at most (prompt scoring), of one per row in decode.
            format!("logits_index:{batch}x{seq}"),
        ];
        parts.extend(kv.iter().map(|(name, ring)| {
            let length = ring.unwrap_or(context);
            format!("{name}:{batch}x{kv_heads}x{length}x{head_dim}")
        }));
        parts.join(",")
    };
    Profiles {
        min: shape(1, 1, 1),
        opt: shape(max_batch, 1, max_context),
        max: shape(max_batch, max_seq, max_context),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_strings() {
        let kv = vec![
            ("past_key.0".to_string(), Some(8192)),
            ("past_key.3".to_string(), None),
        ];
        let p = profiles(&kv, 8, 128, 4, 512, 16384);
        assert_eq!(
            p.min,
            "input_ids:1x1,position_ids:1x1,logits_index:1x1,past_key.0:1x8x8192x128,past_key.3:1x8x1x128"
        );
        assert_eq!(
            p.opt,
            "input_ids:4x1,position_ids:4x1,logits_index:4x1,past_key.0:4x8x8192x128,past_key.3:4x8x16384x128"
        );
        assert_eq!(
            p.max,
            "input_ids:4x512,position_ids:4x512,logits_index:4x512,past_key.0:4x8x8192x128,past_key.3:4x8x16384x128"
        );
    }
}
