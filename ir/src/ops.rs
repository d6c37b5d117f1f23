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
    /// Lowered, with weights annotated for quantized storage (same ops as Lowered).
    Quantized,
}

impl Phase {
    /// The name the printer uses.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Imported => "imported",
            Phase::Lowered => "lowered",
            Phase::Quantized => "quantized",
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

/// Layer normalisation over the last axis: `(x - mean) / sqrt(var + eps) * weight + bias`, statistics in
/// f32 (biased variance), as `nn.LayerNorm`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNormAttrs {
    pub eps: f32,
}

/// Rotary position embedding of one attention layer, precomputed from the config.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeAttrs {
    /// One inverse frequency per rotated pair (`head_dim / 2` entries), llama3 scaling already applied.
    pub inv_freq: Vec<f32>,
}

/// Which half of the rotary angle [`Op::RotaryAngles`] gives.
#[derive(Clone, Debug, PartialEq)]
pub struct RotaryAnglesAttrs {
    /// One inverse frequency per rotated pair, llama3 scaling applied.
    pub inv_freq: std::sync::Arc<Vec<f32>>,
    /// `sin` of the angle when true, `cos` when false.
    pub sin: bool,
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
    /// Decoder layer index; names the layer's KV cache inputs and outputs once lowered.
    pub layer: usize,
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

/// Where a fused MoE keeps each expert's gate and up projections; each target wants its own layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertLayout {
    /// `fc1` [E, 2I, H] with gate and up rows interleaved (row 2i = gate i, row 2i+1 = up i), `fc2`
    /// [E, H, I]: ONNX Runtime's `com.microsoft.MoE` with `swiglu_fusion=1`.
    Interleaved,
    /// `fc1` [E, H, 2I] = the checkpoint's `gate_up_proj` (gate columns, then up columns), `fc2` [E, I, H]
    /// = `down_proj`, both used as `z @ W`: the standard-ops (portable) lowering gathers from these.
    Halves,
}

/// A MoE after expert fusion: router, top-k, sigmoid input scaling, fused expert matrices and the
/// shared expert in one op.
#[derive(Clone, Debug, PartialEq)]
pub struct FusedMoeAttrs {
    pub num_experts: usize,
    pub top_k: usize,
    pub intermediate_size: usize,
    pub layout: ExpertLayout,
}

/// A constant computed at compile time (rotary tables, unit norm scales); f32 row-major values.
#[derive(Clone, Debug, PartialEq)]
pub struct ConstantData {
    pub shape: Vec<usize>,
    pub values: std::sync::Arc<Vec<f32>>,
}

/// One operation. Slots are listed in order; every input slot has exactly one producer.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input; no inputs; output of the declared type.
    Input(InputAttrs),
    /// A constant weight that streams from its checkpoint source; no inputs; output of the weight's type.
    Weight(WeightRef),

    /// ids [B, S] (i32/i64), table [V, H] (float) -> [B, S, H] of `out`. A plain gather, no scaling.
    Embedding { out: DType },

    // ---- Llama 4 level (Imported phase only) ----
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
    /// x [.., K], w [N, K], optional bias [N] -> [.., N]: `x w^T (+ bias)` (nn.Linear), output of x's
    /// dtype.
    Linear,
    /// x [.., H] (float), weight [H], bias [H] -> same type as x. See [`LayerNormAttrs`].
    LayerNorm(LayerNormAttrs),
    /// x (float) -> same: exact GELU, `x * (1 + erf(x / sqrt 2)) / 2` (nn.GELU()).
    Gelu,
    /// x [B, T, H], token [H] -> [B, T + 1, H]: the same token appended after every row's last position
    /// (the vision tower's class embedding).
    AppendToken,
    /// x [B, S, H], index i64[B, R] -> [B, R, H] of x's type: row b's tokens `index[b, r]` (the positions
    /// of a call whose logits are wanted: each row's last token in decode, all in prompt scoring).
    PickRows,
    /// x [B, S, H], positions i64[F], rows [F, H] -> x's type: x with row `positions[f]` of its flattened
    /// [B * S, H] view replaced by `rows[f]` (image features placed at their `<|patch|>` tokens).
    ScatterRows,
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
    /// No inputs -> f32 of the constant's shape.
    Constant(ConstantData),
    /// x -> the same elements (row-major) in `shape`; symbolic dims take their run-time sizes.
    Reshape { shape: Vec<crate::types::Dim> },
    /// x -> axes permuted: output axis i is input axis `perm[i]`.
    Transpose { perm: Vec<usize> },
    /// x -> `start..end` of `axis`.
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// a, b equal but on `axis` -> concatenation (sizes add; `past + seq` gives `total`).
    Concat { axis: usize },
    /// x [B, heads, S, d], cos, sin, optional position_ids i64[B, S] -> x's type. Interleaved (GPT-J)
    /// rotation of pairs (2j, 2j+1) by an angle given by its cos/sin: tables [P, d/2] read at row
    /// position_ids[b, s] (with position_ids) or at row s (without, exactly S rows), or per-token values
    /// [B, S, d/2] from [`Op::RotaryAngles`] (without position_ids).
    Rotary,
    /// position_ids i64[B, S] -> f32 [B, S, d/2]: `cos` (or `sin`) of `position * inv_freq[j]`, the angle
    /// computed in f32 as transformers does. Replaces tables of `max_context` rows.
    RotaryAngles(RotaryAnglesAttrs),
    /// past [B, kv, T, d], update [B, kv, S, d], position_ids i64[B, S] -> past's type: the cache with row
    /// b's S entries written at indices `position_ids[b, 0] + s` (modulo T when `ring`; without `ring`
    /// they must fit: `position_ids[b, 0] + S <= T`). A call's positions of one row are consecutive, so
    /// `position_ids[b, 0]` is that row's cache length. ONNX `TensorScatter`; in place when present
    /// aliases past.
    CacheWrite { ring: bool },
    /// cache [B, kv, T, d], position_ids i64[B, S] -> [B, kv, L, d] with `L = min(T, max(position_ids) +
    /// 1)`: the leading entries a call can attend to (later ones hold no position of any row yet).
    CacheView,
    /// q [B, heads, S, d], position_ids i64[B, S] -> q's type:
    /// `q * (1 + attn_scale * ln(1 + floor((p + 1) / floor_scale)))`.
    QueryTemperature(TemperatureAttrs),
    /// position_ids i64[B, S], keys [B, kv, L, d] (a [`Op::CacheView`]) -> bool[B, 1, S, L]. Full layers:
    /// entry j holds position j and query p sees it iff `j <= p`. Chunked layers keep a ring of one chunk:
    /// entry j holds the position of p's chunk congruent to j, and p sees it iff `j <= p mod size` (same
    /// chunk, not later; entries past that hold the previous chunk).
    AttentionMask { chunk: Option<ChunkAttrs> },
    /// q [B, nh, S, d], k [B, nkv, T, d], v [B, nkv, T, d], optional mask bool[B, 1, S, T] ->
    /// [B, nh, S, d]: `softmax(q k^T * scale, masked) v`, query head h reading kv head `h / (nh / nkv)`.
    /// Without a mask every query sees every key (bidirectional).
    Sdpa { scale: f32 },
    /// x [.., 2I] (gate half, then up half) -> [.., I]: `silu(gate) * up`.
    SwiGlu,
    /// x [B, S, H], router [E, H], fc1, fc2 (see [`ExpertLayout`]), shared_fc1 [2I, H] (gate rows then up
    /// rows), shared_fc2 [H, I] -> [B, S, H]. Same math as [`Op::Moe`].
    FusedMoe(FusedMoeAttrs),
    /// x (float) -> same: per-tensor float8 e4m3 fake quantization of an activation,
    /// `e4m3(x / scale) * scale` (saturating at 448): what an FP8 Q/DQ pair computes.
    QuantizeActivation { scale: f32 },
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
            Op::LayerNorm(_) => "layer_norm",
            Op::Gelu => "gelu",
            Op::AppendToken => "append_token",
            Op::ScatterRows => "scatter_rows",
            Op::PickRows => "pick_rows",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Sigmoid => "sigmoid",
            Op::Silu => "silu",
            Op::Cast { .. } => "cast",
            Op::Constant(_) => "constant",
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Rotary => "rotary",
            Op::RotaryAngles(_) => "rotary_angles",
            Op::CacheWrite { .. } => "cache_write",
            Op::CacheView => "cache_view",
            Op::QueryTemperature(_) => "query_temperature",
            Op::AttentionMask { .. } => "attention_mask",
            Op::Sdpa { .. } => "sdpa",
            Op::SwiGlu => "swiglu",
            Op::FusedMoe(_) => "fused_moe",
            Op::QuantizeActivation { .. } => "quantize_activation",
        }
    }

    /// The accepted numbers of inputs (inclusive range).
    pub fn arity(&self) -> (usize, usize) {
        match self {
            Op::Input(_) | Op::Weight(_) | Op::Constant(_) => (0, 0),
            Op::Embedding { .. } => (2, 2),
            Op::Attention(_) => (6, 6),
            Op::Mlp => (4, 4),
            Op::Moe(_) => (7, 7),
            Op::RmsNorm(_) => (1, 2),
            Op::Add | Op::Mul | Op::AppendToken | Op::PickRows => (2, 2),
            Op::Linear => (2, 3),
            Op::LayerNorm(_) | Op::ScatterRows => (3, 3),
            Op::Sigmoid | Op::Silu | Op::Gelu | Op::Cast { .. } => (1, 1),
            Op::RotaryAngles(_) => (1, 1),
            Op::CacheWrite { .. } => (3, 3),
            Op::CacheView => (2, 2),
            Op::Reshape { .. } | Op::Transpose { .. } | Op::Slice { .. } | Op::SwiGlu => (1, 1),
            Op::QuantizeActivation { .. } => (1, 1),
            Op::Concat { .. } | Op::QueryTemperature(_) | Op::AttentionMask { .. } => (2, 2),
            Op::Rotary | Op::Sdpa { .. } => (3, 4),
            Op::FusedMoe(_) => (6, 6),
        }
    }

    /// Whether the op may appear in a graph of `phase`.
    pub fn allowed_in(&self, phase: Phase) -> bool {
        match self {
            Op::Attention(_) | Op::Mlp | Op::Moe(_) => phase == Phase::Imported,
            Op::Input(_)
            | Op::Weight(_)
            | Op::Embedding { .. }
            | Op::Constant(_)
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Slice { .. }
            | Op::Concat { .. }
            | Op::Rotary
            | Op::RotaryAngles(_)
            | Op::CacheWrite { .. }
            | Op::CacheView
            | Op::QueryTemperature(_)
            | Op::AttentionMask { .. }
            | Op::Sdpa { .. }
            | Op::SwiGlu
            | Op::FusedMoe(_)
            | Op::RmsNorm(_)
            | Op::Linear
            | Op::LayerNorm(_)
            | Op::Gelu
            | Op::AppendToken
            | Op::ScatterRows
            | Op::PickRows
            | Op::Add
            | Op::Mul
            | Op::Sigmoid
            | Op::Silu
            | Op::QuantizeActivation { .. }
            | Op::Cast { .. } => true,
        }
    }
}
