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

/// Shapes of a decoder's inputs that the profile ranges over.
#[derive(Clone, Debug)]
pub struct ProfileInputs {
    /// Inputs shaped [slots, new tokens, rest...] (`input_ids`, `position_ids`, `logits_index`, a
    /// stage's `hidden_in`), each with its fixed trailing dimensions.
    pub tokens: Vec<(String, Vec<usize>)>,
    /// Cache inputs, fixed buffers [slots, kv_heads, length, head_dim], each with its ring length
    /// for chunked layers, None for full layers.
    pub kv: Vec<(String, Option<usize>)>,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl ProfileInputs {
    /// The inputs of a whole decoder (or of pipeline stage 0 and the last without `hidden_in`).
    pub fn decoder(kv: Vec<(String, Option<usize>)>, kv_heads: usize, head_dim: usize) -> Self {
        ProfileInputs {
            tokens: ["input_ids", "position_ids", "logits_index"]
                .iter()
                .map(|n| (n.to_string(), Vec::new()))
                .collect(),
            kv,
            kv_heads,
            head_dim,
        }
    }
}

/// Profiles for a decoder with `inputs`: slots 1..=max_batch, new tokens 1..=max_seq (logits of every
/// token at most, for prompt scoring; one per row in decode), full layers' length 1..=max_context (a
/// session allocates its context), rings their own length; opt is decode (one token) at full batch
/// with the whole context allocated.
pub fn profiles(
    inputs: &ProfileInputs,
    max_batch: usize,
    max_seq: usize,
    max_context: usize,
) -> Profiles {
    let shape = |batch: usize, seq: usize, context: usize| {
        let mut parts: Vec<String> = inputs
            .tokens
            .iter()
            .map(|(name, rest)| {
                let dims: Vec<String> = [batch, seq]
                    .iter()
                    .chain(rest)
                    .map(|d| d.to_string())
                    .collect();
                format!("{name}:{}", dims.join("x"))
            })
            .collect();
        parts.extend(inputs.kv.iter().map(|(name, ring)| {
            let length = ring.unwrap_or(context);
            format!(
                "{name}:{batch}x{}x{length}x{}",
                inputs.kv_heads, inputs.head_dim
            )
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
        let p = profiles(&ProfileInputs::decoder(kv, 8, 128), 4, 512, 16384);
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
        // A later pipeline stage takes the residual stream instead of the ids.
        let stage = ProfileInputs {
            tokens: vec![
                ("hidden_in".into(), vec![5120]),
                ("position_ids".into(), vec![]),
            ],
            kv: vec![],
            kv_heads: 8,
            head_dim: 128,
        };
        assert_eq!(
            profiles(&stage, 4, 512, 16384).max,
            "hidden_in:4x512x5120,position_ids:4x512"
        );
    }
}
