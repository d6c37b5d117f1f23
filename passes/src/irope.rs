//! `irope`: lowers every Llama 4 attention (iRoPE: interleaved RoPE and NoPE layers) to primitive ops
//! with a fixed-size KV cache written in place.
//!
//! RoPE layers become: q/k/v projections -> [B, heads, S, d] -> interleaved `Rotary` with per-token
//! cos/sin computed in the graph from the positions (`RotaryAngles`: position x the layer's llama3-scaled
//! inverse frequencies, no tables) -> QK RMS norm without weight (when the layer has it). NoPE layers: no
//! rotary, the query temperature from absolute positions. Each layer's keys and values are written into
//! its cache input `past_key.{i}` / `past_value.{i}` (`CacheWrite`, returned as `present_key.{i}` /
//! `present_value.{i}`, which the runtime binds to the same buffer): full (NoPE) layers hold
//! [B, kv_heads, past, d] with entry j = position j (`past` is the session's context, at most
//! `max_positions`); chunked (RoPE) layers a ring of one chunk [B, kv_heads, min(chunk, max_positions), d]
//! with entry j = the position of the current chunk congruent to j. Attention reads the leading entries
//! any row of the call can see (`CacheView`), masked per row from its own positions: rows sit at their
//! own positions, and a row's cache length is its first position. The runtime never lets one call of a
//! row cross a chunk boundary (that would overwrite ring entries its own earlier queries still read).
//! `Sdpa` reads kv head `h / (heads / kv_heads)` with scale `d^-0.5`; the result is projected by `o_proj`.
//!
//! Does not: fuse projections (expert_fusion does), touch feed-forward ops, or change dtypes.
//! Before: Imported graph with `Attention` nodes. After: no `Attention` nodes; one KV input and output
//! pair per layer, in layer order; rotary angles and masks are shared between layers that agree.

use std::collections::HashMap;
use std::sync::Arc;

use herd_ir::names::Cache;
use herd_ir::ops::{AttentionAttrs, ChunkAttrs, InputAttrs, RmsNormAttrs, RotaryAnglesAttrs};
use herd_ir::{DType, Diagnostic, Dim, Graph, Op, SymDim, TensorType, Value};

use crate::pipeline::{PassError, PassOptions};

/// Runs the pass.
pub fn run(graph: &mut Graph, options: &PassOptions) -> Result<(), PassError> {
    let mut attentions: Vec<_> = graph
        .node_indices()
        .into_iter()
        .filter_map(|n| match &graph.node(n)?.op {
            Op::Attention(a) => Some((a.layer, n, a.clone())),
            _ => None,
        })
        .collect();
    attentions.sort_by_key(|(layer, n, _)| (*layer, *n));
    let mut shared = Shared::default();
    for (_, node, attrs) in attentions {
        let inputs = graph.inputs(node);
        let name = graph.node(node).map(|n| n.name.clone()).unwrap_or_default();
        let out = lower(graph, &mut shared, options, &name, &attrs, &inputs).map_err(|d| {
            PassError::Build {
                pass: "irope",
                diagnostic: d,
            }
        })?;
        graph.replace_uses(Value { node, slot: 0 }, out);
    }
    graph.prune_dead();
    Ok(())
}

/// Nodes reused by every layer that needs the same thing.
#[derive(Default)]
struct Shared {
    /// Per-token (cos, sin) keyed by the bit patterns of the inverse frequencies.
    angles: HashMap<Vec<u32>, (Value, Value)>,
    /// Masks keyed by chunk size (None: full causal), built on the view of the first layer of that kind.
    masks: HashMap<Option<usize>, Value>,
}

fn lower(
    g: &mut Graph,
    shared: &mut Shared,
    options: &PassOptions,
    name: &str,
    a: &AttentionAttrs,
    inputs: &[Value],
) -> Result<Value, Diagnostic> {
    let [x, positions, wq, wk, wv, wo] = inputs.try_into().map_err(|_| Diagnostic {
        node: None,
        name: name.to_string(),
        message: "attention must have 6 inputs".into(),
    })?;
    let (b, s) = (Dim::Sym(SymDim::Batch), Dim::Sym(SymDim::Seq));
    let d = Dim::Fixed(a.head_dim);
    let dtype = g.value_type(x).map_or(DType::F32, |t| t.dtype);
    let n = |suffix: &str| format!("{name}.{suffix}");

    // [B, S, heads*d] -> [B, heads, S, d]
    let heads = |g: &mut Graph, w: Value, count: usize, what: &str| -> Result<Value, Diagnostic> {
        let proj = g.add(n(&format!("{what}_proj")), Op::Linear, &[x, w])?;
        let split = g.add(
            n(&format!("{what}_heads")),
            Op::Reshape {
                shape: vec![b, s, Dim::Fixed(count), d],
            },
            &[proj],
        )?;
        g.add(
            n(&format!("{what}_bhsd")),
            Op::Transpose {
                perm: vec![0, 2, 1, 3],
            },
            &[split],
        )
    };
    let mut q = heads(g, wq, a.num_heads, "q")?;
    let mut k = heads(g, wk, a.num_kv_heads, "k")?;
    let v = heads(g, wv, a.num_kv_heads, "v")?;

    if let Some(rope) = &a.rope {
        let (cos, sin) = rotary_angles(g, shared, &rope.inv_freq, positions)?;
        q = g.add(n("q_rope"), Op::Rotary, &[q, cos, sin])?;
        k = g.add(n("k_rope"), Op::Rotary, &[k, cos, sin])?;
    }
    if let Some(eps) = a.qk_norm_eps {
        q = g.add(n("q_norm"), Op::RmsNorm(RmsNormAttrs { eps }), &[q])?;
        k = g.add(n("k_norm"), Op::RmsNorm(RmsNormAttrs { eps }), &[k])?;
    }
    if let Some(t) = a.temperature {
        q = g.add(n("q_temperature"), Op::QueryTemperature(t), &[q, positions])?;
    }

    let chunk = a.chunk.map(|c| c.size);
    let (k_seen, v_seen) = kv_cache(g, options, name, a, dtype, [k, v], positions)?;
    let mask = attention_mask(g, shared, chunk, positions, k_seen)?;
    let attn = g.add(
        n("sdpa"),
        Op::Sdpa { scale: a.scale },
        &[q, k_seen, v_seen, mask],
    )?;
    let merged = g.add(
        n("merge_heads"),
        Op::Transpose {
            perm: vec![0, 2, 1, 3],
        },
        &[attn],
    )?;
    let flat = g.add(
        n("flatten_heads"),
        Op::Reshape {
            shape: vec![b, s, Dim::Fixed(a.num_heads * a.head_dim)],
        },
        &[merged],
    )?;
    g.add(n("o_proj"), Op::Linear, &[flat, wo])
}

/// The cos and sin tables of `positions` x `inv_freq`, shared by every layer with the same
/// frequencies.
fn rotary_angles(
    g: &mut Graph,
    shared: &mut Shared,
    inv_freq: &[f32],
    positions: Value,
) -> Result<(Value, Value), Diagnostic> {
    let key: Vec<u32> = inv_freq.iter().map(|f| f.to_bits()).collect();
    if let Some(t) = shared.angles.get(&key) {
        return Ok(*t);
    }
    let inv_freq = Arc::new(inv_freq.to_vec());
    let index = shared.angles.len();
    let mut half = |sin: bool| {
        g.add(
            format!("rope.{}.{index}", if sin { "sin" } else { "cos" }),
            Op::RotaryAngles(RotaryAnglesAttrs {
                inv_freq: inv_freq.clone(),
                sin,
            }),
            &[positions],
        )
    };
    let (cos, sin) = (half(false)?, half(true)?);
    shared.angles.insert(key, (cos, sin));
    Ok((cos, sin))
}

/// Layer `a.layer`'s KV cache: `past_*` inputs of fixed length (a ring of one chunk, never longer
/// than the context, for chunked layers; the session's context for full ones), written in place at
/// `positions` into the `present_*` outputs, and the views attention reads.
fn kv_cache(
    g: &mut Graph,
    options: &PassOptions,
    name: &str,
    a: &AttentionAttrs,
    dtype: DType,
    [k, v]: [Value; 2],
    positions: Value,
) -> Result<(Value, Value), Diagnostic> {
    let i = a.layer;
    let chunk = a.chunk.map(|c| c.size);
    let length = match chunk {
        Some(c) => Dim::Fixed(c.min(options.max_positions).max(1)),
        None => Dim::Sym(SymDim::Past),
    };
    let cache_type = TensorType::new(
        dtype,
        vec![
            Dim::Sym(SymDim::Batch),
            Dim::Fixed(a.num_kv_heads),
            length,
            Dim::Fixed(a.head_dim),
        ],
    );
    let write = Op::CacheWrite {
        ring: chunk.is_some(),
    };
    let mut past = Vec::new();
    for cache in [Cache::PastKey, Cache::PastValue] {
        let input = cache.name(i);
        let attrs = InputAttrs {
            name: input.clone(),
            ty: cache_type.clone(),
        };
        past.push(g.add(input, Op::Input(attrs), &[])?);
    }
    let k_all = g.add(
        format!("{name}.present_key"),
        write.clone(),
        &[past[0], k, positions],
    )?;
    let v_all = g.add(
        format!("{name}.present_value"),
        write,
        &[past[1], v, positions],
    )?;
    g.set_output(Cache::PresentKey.name(i), k_all);
    g.set_output(Cache::PresentValue.name(i), v_all);
    let k_seen = g.add(format!("{name}.keys"), Op::CacheView, &[k_all, positions])?;
    let v_seen = g.add(format!("{name}.values"), Op::CacheView, &[v_all, positions])?;
    Ok((k_seen, v_seen))
}

/// The attention mask of `positions` against the cache entries `k_seen` (causal, or within one
/// chunk), shared by every layer with the same chunking.
fn attention_mask(
    g: &mut Graph,
    shared: &mut Shared,
    chunk: Option<usize>,
    positions: Value,
    k_seen: Value,
) -> Result<Value, Diagnostic> {
    if let Some(m) = shared.masks.get(&chunk) {
        return Ok(*m);
    }
    let label = chunk.map_or("mask.causal".to_string(), |c| format!("mask.chunked{c}"));
    let m = g.add(
        label,
        Op::AttentionMask {
            chunk: chunk.map(|size| ChunkAttrs { size }),
        },
        &[positions, k_seen],
    )?;
    shared.masks.insert(chunk, m);
    Ok(m)
}
