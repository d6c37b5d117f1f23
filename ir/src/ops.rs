//! The closed set of IR operations, with one attribute struct per op that has attributes.
//!
//! Each variant's doc comment states its inputs (in slot order), its output and its typing rule; the
//! verifier (`verify.rs`) and the reference evaluator (`eval.rs`) implement exactly these statements.
//! `H` is the hidden size, `[B, S, ...]` batch and sequence.

use crate::types::DType;
use crate::weights::WeightRef;

/// The phase a graph is in; each phase admits a subset of the ops (see [`Op::allowed_in`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Straight from the importer: Llama 4 level ops (attention, MoE, MLP, ...) plus primitives.
    Imported,
    /// Llama 4 level ops lowered to primitives.
    Lowered,
}

impl Phase {
    /// The name the printer uses.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Imported => "imported",
            Phase::Lowered => "lowered",
        }
    }
}

/// A named graph input.
#[derive(Clone, Debug, PartialEq)]
pub struct InputAttrs {
    pub name: String,
    pub ty: crate::types::TensorType,
}

/// Root-mean-square normalisation over the last axis: `x / sqrt(mean(x^2) + eps) * weight`, statistics in
/// f32. Without a weight input it is the bare normalisation (Llama 4's QK norm).
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNormAttrs {
    pub eps: f32,
}

/// Rotary position embedding of one attention layer, precomputed from the config.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeAttrs {
    /// One inverse frequency per rotated pair (`head_dim / 2` entries), llama3 scaling already applied.
    pub inv_freq: Vec<f32>,
}

/// Chunked-local masking: query at position p sees key k iff `k <= p` and `k / size == p / size`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChunkAttrs {
    pub size: usize,
}

/// NoPE-layer query temperature: `q *= 1 + attn_scale * ln(1 + floor((p + 1) / floor_scale))`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TemperatureAttrs {
    pub floor_scale: f32,
    pub attn_scale: f32,
}

/// Everything that defines one Llama 4 self-attention layer.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionAttrs {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// `Some` on RoPE layers, `None` on NoPE layers.
    pub rope: Option<RopeAttrs>,
    /// QK RMS norm (no weight) applied after RoPE to q and k, with this epsilon.
    pub qk_norm_eps: Option<f32>,
    /// `Some` for chunked-local layers, `None` for full causal layers.
    pub chunk: Option<ChunkAttrs>,
    /// `Some` when the query temperature applies (NoPE layers with temperature tuning on).
    pub temperature: Option<TemperatureAttrs>,
    /// Multiplier of `q k^T`, `head_dim^-0.5` in Llama 4.
    pub scale: f32,
}

/// Mixture of experts with sigmoid routing that scales the expert input.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeAttrs {
    pub num_experts: usize,
    pub top_k: usize,
    /// Width of each routed expert and of the shared expert.
    pub intermediate_size: usize,
}

/// One operation. Slots are listed in order; every input slot has exactly one producer.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input; no inputs; output of the declared type.
    Input(InputAttrs),
    /// A constant weight that streams from its checkpoint source; no inputs; output of the weight's type.
    Weight(WeightRef),

    // ---- Llama 4 level (Imported phase only) ----
    /// ids [B, S] (i32/i64), table [V, H] (float) -> [B, S, H] of `out`. A plain gather, no scaling.
    Embedding { out: DType },
    /// x [.., H] (float), position_ids [B, S] (i64), wq [nh*d, H], wk [nkv*d, H], wv [nkv*d, H],
    /// wo [H, nh*d] -> [B, S, H] of x's dtype. x must be [B, S, H]. Projections are `x W^T`.
    Attention(AttentionAttrs),
    /// x [B, S, H], gate [I, H], up [I, H], down [H, I] -> [B, S, H]: `down(silu(gate(x)) * up(x))`.
    Mlp,
    /// x [B, S, H], router [E, H], gate_up [E, H, 2I] (used as `z @ W`), down [E, I, H], shared_gate [I, H],
    /// shared_up [I, H], shared_down [H, I] -> [B, S, H]. For each token: logits `l = x router^T`, the
    /// top-k experts e by logit, `y = shared(x) + sum_e Expert_e(sigmoid(l_e) * x)`.
    Moe(MoeAttrs),

    // ---- primitives (every phase) ----
    /// x [.., H] (float), optional weight [H] -> same type as x. See [`RmsNormAttrs`].
    RmsNorm(RmsNormAttrs),
    /// x [.., K], w [N, K] -> [.., N]: `x w^T` (nn.Linear without bias), output of x's dtype.
    Linear,
    /// a, b of equal type (numpy broadcasting over equal ranks) -> that type.
    Add,
    /// a, b of equal type (numpy broadcasting over equal ranks) -> that type.
    Mul,
    /// x (float) -> same.
    Sigmoid,
    /// x (float) -> same: `x * sigmoid(x)`.
    Silu,
    /// x (any) -> `to` of the same shape.
    Cast { to: DType },
}

impl Op {
    /// Short lowercase name used by the printer and in diagnostics.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input(_) => "input",
            Op::Weight(_) => "weight",
            Op::Embedding { .. } => "embedding",
            Op::Attention(_) => "attention",
            Op::Mlp => "mlp",
            Op::Moe(_) => "moe",
            Op::RmsNorm(_) => "rms_norm",
            Op::Linear => "linear",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Sigmoid => "sigmoid",
            Op::Silu => "silu",
            Op::Cast { .. } => "cast",
        }
    }

    /// The accepted numbers of inputs (inclusive range).
    pub fn arity(&self) -> (usize, usize) {
        match self {
            Op::Input(_) | Op::Weight(_) => (0, 0),
            Op::Embedding { .. } => (2, 2),
            Op::Attention(_) => (6, 6),
            Op::Mlp => (4, 4),
            Op::Moe(_) => (7, 7),
            Op::RmsNorm(_) => (1, 2),
            Op::Linear | Op::Add | Op::Mul => (2, 2),
            Op::Sigmoid | Op::Silu | Op::Cast { .. } => (1, 1),
        }
    }

    /// Whether the op may appear in a graph of `phase`.
    pub fn allowed_in(&self, phase: Phase) -> bool {
        match self {
            Op::Embedding { .. } | Op::Attention(_) | Op::Mlp | Op::Moe(_) => {
                phase == Phase::Imported
            }
            Op::Input(_)
            | Op::Weight(_)
            | Op::RmsNorm(_)
            | Op::Linear
            | Op::Add
            | Op::Mul
            | Op::Sigmoid
            | Op::Silu
            | Op::Cast { .. } => true,
        }
    }
}
