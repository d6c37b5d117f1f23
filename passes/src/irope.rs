//! `irope`: lowers every Llama 4 attention (iRoPE: interleaved RoPE and NoPE layers) to primitive ops
//! with an explicit KV cache.
//!
//! RoPE layers become: q/k/v projections -> [B, heads, S, d] -> interleaved `Rotary` with cos/sin tables
//! computed here from the layer's (llama3-scaled) inverse frequencies for `max_positions` positions ->
//! QK RMS norm without weight (when the layer has it) -> chunked-local mask. NoPE layers: no rotary, the
//! query temperature from absolute positions, full causal mask. Both: keys/values are concatenated after
//! `past_key.{i}` / `past_value.{i}` (new graph inputs [B, kv_heads, past, d]) and returned as
//! `present_key.{i}` / `present_value.{i}` outputs; `Sdpa` reads kv head `h / (heads / kv_heads)` with
//! scale `d^-0.5`; the result is projected by `o_proj`.
//!
//! Does not: fuse projections (expert_fusion does), touch feed-forward ops, or change dtypes.
//! Before: Imported graph with `Attention` nodes. After: no `Attention` nodes; one KV input and output
//! pair per layer, in layer order; masks and rotary tables are shared between layers that agree.

use std::collections::HashMap;
use std::sync::Arc;

use herd_ir::ops::{AttentionAttrs, ChunkAttrs, ConstantData, InputAttrs, RmsNormAttrs};
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
    /// Rotary tables keyed by the bit patterns of the inverse frequencies.
    tables: HashMap<Vec<u32>, (Value, Value)>,
    /// Masks keyed by chunk size (None: causal), sized by the past of the first layer of that kind.
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
    let i = a.layer;
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
        let key: Vec<u32> = rope.inv_freq.iter().map(|f| f.to_bits()).collect();
        let (cos, sin) = match shared.tables.get(&key) {
            Some(t) => *t,
            None => {
                let (cos, sin) = rotary_tables(&rope.inv_freq, options.max_positions);
                let cos = g.add(
                    format!("rope.cos.{}", shared.tables.len()),
                    Op::Constant(cos),
                    &[],
                )?;
                let sin = g.add(
                    format!("rope.sin.{}", shared.tables.len()),
                    Op::Constant(sin),
                    &[],
                )?;
                shared.tables.insert(key, (cos, sin));
                (cos, sin)
            }
        };
        q = g.add(n("q_rope"), Op::Rotary, &[q, cos, sin, positions])?;
        k = g.add(n("k_rope"), Op::Rotary, &[k, cos, sin, positions])?;
    }
    if let Some(eps) = a.qk_norm_eps {
        q = g.add(n("q_norm"), Op::RmsNorm(RmsNormAttrs { eps }), &[q])?;
        k = g.add(n("k_norm"), Op::RmsNorm(RmsNormAttrs { eps }), &[k])?;
    }
    if let Some(t) = a.temperature {
        q = g.add(n("q_temperature"), Op::QueryTemperature(t), &[q, positions])?;
    }

    let cache = || {
        TensorType::new(
            dtype,
            vec![b, Dim::Fixed(a.num_kv_heads), Dim::Sym(SymDim::Past), d],
        )
    };
    let past_k = g.add(
        format!("past_key.{i}"),
        Op::Input(InputAttrs {
            name: format!("past_key.{i}"),
            ty: cache(),
        }),
        &[],
    )?;
    let past_v = g.add(
        format!("past_value.{i}"),
        Op::Input(InputAttrs {
            name: format!("past_value.{i}"),
            ty: cache(),
        }),
        &[],
    )?;
    let k_all = g.add(n("present_key"), Op::Concat { axis: 2 }, &[past_k, k])?;
    let v_all = g.add(n("present_value"), Op::Concat { axis: 2 }, &[past_v, v])?;
    g.set_output(format!("present_key.{i}"), k_all);
    g.set_output(format!("present_value.{i}"), v_all);

    let chunk = a.chunk.map(|c| c.size);
    let mask = match shared.masks.get(&chunk) {
        Some(m) => *m,
        None => {
            let label = chunk.map_or("mask.causal".to_string(), |c| format!("mask.chunked{c}"));
            let m = g.add(
                label,
                Op::AttentionMask {
                    chunk: chunk.map(|size| ChunkAttrs { size }),
                },
                &[positions, past_k],
            )?;
            shared.masks.insert(chunk, m);
            m
        }
    };
    let attn = g.add(
        n("sdpa"),
        Op::Sdpa { scale: a.scale },
        &[q, k_all, v_all, mask],
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

/// cos/sin tables [positions, d/2]: angle = position * inv_freq, both in f32 like transformers.
pub fn rotary_tables(inv_freq: &[f32], positions: usize) -> (ConstantData, ConstantData) {
    let mut cos = Vec::with_capacity(positions * inv_freq.len());
    let mut sin = Vec::with_capacity(positions * inv_freq.len());
    for p in 0..positions {
        for &f in inv_freq {
            let (s, c) = (p as f32 * f).sin_cos();
            cos.push(c);
            sin.push(s);
        }
    }
    let shape = vec![positions, inv_freq.len()];
    (
        ConstantData {
            shape: shape.clone(),
            values: Arc::new(cos),
        },
        ConstantData {
            shape,
            values: Arc::new(sin),
        },
    )
}
