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

/// Profiles for a decoder with `kv` cache inputs of [batch, kv_heads, past, head_dim]: batch 1..=max_batch,
/// new tokens 1..=max_seq, past 0..max_context - 1; opt is decode (one token) at full batch with half the
/// context in the cache.
pub fn profiles(
    kv_inputs: &[String],
    kv_heads: usize,
    head_dim: usize,
    max_batch: usize,
    max_seq: usize,
    max_context: usize,
) -> Profiles {
    let shape = |batch: usize, seq: usize, past: usize| {
        let mut parts = vec![
            format!("input_ids:{batch}x{seq}"),
            format!("position_ids:{batch}x{seq}"),
        ];
        parts.extend(
            kv_inputs
                .iter()
                .map(|name| format!("{name}:{batch}x{kv_heads}x{past}x{head_dim}")),
        );
        parts.join(",")
    };
    Profiles {
        min: shape(1, 1, 0),
        opt: shape(max_batch, 1, max_context / 2),
        max: shape(max_batch, max_seq, max_context.saturating_sub(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_strings() {
        let kv = vec!["past_key.0".to_string(), "past_value.0".to_string()];
        let p = profiles(&kv, 8, 128, 4, 512, 8192);
        assert_eq!(
            p.min,
            "input_ids:1x1,position_ids:1x1,past_key.0:1x8x0x128,past_value.0:1x8x0x128"
        );
        assert_eq!(
            p.opt,
            "input_ids:4x1,position_ids:4x1,past_key.0:4x8x4096x128,past_value.0:4x8x4096x128"
        );
        assert_eq!(
            p.max,
            "input_ids:4x512,position_ids:4x512,past_key.0:4x8x8191x128,past_value.0:4x8x8191x128"
        );
    }
}
