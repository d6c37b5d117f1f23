//! The text printer: a deterministic, line-per-node rendering of a graph, used by `herd inspect --ir`,
//! `--dump-ir-after` and the snapshot tests. Values are numbered by their position in topological order.

use std::collections::HashMap;
use std::fmt::Write;

use crate::graph::{Graph, Value};
use crate::ops::{AttentionAttrs, Op};

/// Renders `graph` as text.
pub fn print(graph: &Graph) -> String {
    let order = match graph.topo_order() {
        Ok(order) => order,
        Err(_) => graph.node_indices(),
    };
    let number: HashMap<_, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let name_of = |v: &Value| match number.get(&v.node) {
        Some(i) if v.slot == 0 => format!("%{i}"),
        Some(i) => format!("%{i}.{}", v.slot),
        None => "%?".to_string(),
    };
    let mut out = String::new();
    let _ = writeln!(out, "graph phase={}", graph.phase.name());
    for (i, &index) in order.iter().enumerate() {
        let Some(node) = graph.node(index) else {
            continue;
        };
        let args: Vec<String> = graph.inputs(index).iter().map(name_of).collect();
        let types: Vec<String> = node.outputs.iter().map(|t| t.to_string()).collect();
        let _ = write!(out, "  %{i} = {}", op_text(graph, &node.op));
        if !args.is_empty() {
            let _ = write!(out, " {}", args.join(", "));
        }
        let _ = write!(out, " : {}", types.join(", "));
        if !matches!(node.op, Op::Input(_) | Op::Weight(_)) {
            let _ = write!(out, "  # {}", node.name);
        }
        out.push('\n');
    }
    out.push_str("outputs\n");
    for (name, value) in graph.outputs() {
        let _ = writeln!(out, "  {name} = {}", name_of(value));
    }
    out
}

fn op_text(graph: &Graph, op: &Op) -> String {
    match op {
        Op::Input(a) => format!("input \"{}\"", a.name),
        Op::Weight(w) => {
            let parts: Vec<String> = w
                .parts
                .iter()
                .map(|p| {
                    let shard = graph
                        .weights()
                        .shards()
                        .get(p.source.shard.0 as usize)
                        .and_then(|s| s.path.file_name())
                        .map_or("?".to_string(), |f| f.to_string_lossy().into_owned());
                    format!("{} ({shard})", p.source.tensor)
                })
                .collect();
            let mut text = format!("weight {}", parts.join(" ++ "));
            if w.parts.len() > 1 {
                let _ = write!(text, " on axis {}", w.concat_axis);
            }
            for t in &w.transforms {
                let _ = write!(text, " |> {t:?}");
            }
            if let Some(q) = &w.quant {
                let _ = write!(
                    text,
                    " |> quantize[{} k_axis={} scales={}]",
                    q.scheme.name(),
                    q.k_axis,
                    q.scale_dtype
                );
            }
            text
        }
        Op::Embedding { out } => format!("embedding[out={out}]"),
        Op::Attention(a) => format!("attention[{}]", attention_text(a)),
        Op::Moe(m) => format!(
            "moe[experts={} top_k={} intermediate={}]",
            m.num_experts, m.top_k, m.intermediate_size
        ),
        Op::RmsNorm(a) => format!("rms_norm[eps={:e}]", a.eps),
        Op::LayerNorm(a) => format!("layer_norm[eps={:e}]", a.eps),
        Op::Cast { to } => format!("cast[to={to}]"),
        Op::Constant(c) => format!("constant{:?}", c.shape),
        Op::Reshape { shape } => format!("reshape[{}]", crate::types::Shape(shape.clone())),
        Op::Transpose { perm } => format!("transpose{perm:?}"),
        Op::Slice { axis, start, end } => format!("slice[axis={axis} {start}..{end}]"),
        Op::Concat { axis } => format!("concat[axis={axis}]"),
        Op::QueryTemperature(t) => format!(
            "query_temperature[floor_scale={} attn_scale={}]",
            t.floor_scale, t.attn_scale
        ),
        Op::AttentionMask { chunk: Some(c) } => format!("attention_mask[chunked({})]", c.size),
        Op::AttentionMask { chunk: None } => "attention_mask[causal]".to_string(),
        Op::Sdpa { scale } => format!("sdpa[scale={scale}]"),
        Op::RotaryAngles(a) => format!(
            "rotary_angles[{} of {} frequencies]",
            if a.sin { "sin" } else { "cos" },
            a.inv_freq.len()
        ),
        Op::CacheWrite { ring: true } => "cache_write[ring]".to_string(),
        Op::CacheWrite { ring: false } => "cache_write[linear]".to_string(),
        Op::QuantizeActivation { scale } => format!("quantize_activation[fp8 scale={scale:e}]"),
        Op::FusedMoe(m) => format!(
            "fused_moe[experts={} top_k={} intermediate={} layout={:?}]",
            m.num_experts, m.top_k, m.intermediate_size, m.layout
        ),
        Op::Mlp
        | Op::Linear
        | Op::Add
        | Op::Mul
        | Op::Sigmoid
        | Op::Silu
        | Op::Rotary
        | Op::CacheView
        | Op::Gelu
        | Op::AppendToken
        | Op::ScatterRows
        | Op::PickRows
        | Op::SwiGlu => op.name().to_string(),
    }
}

fn attention_text(a: &AttentionAttrs) -> String {
    let mut text = format!(
        "heads={} kv_heads={} head_dim={} scale={}",
        a.num_heads, a.num_kv_heads, a.head_dim, a.scale
    );
    match &a.rope {
        Some(r) => {
            let freqs: Vec<String> = r.inv_freq.iter().map(|f| format!("{f:e}")).collect();
            let _ = write!(text, " rope(inv_freq=[{}])", freqs.join(" "));
        }
        None => text.push_str(" nope"),
    }
    if let Some(eps) = a.qk_norm_eps {
        let _ = write!(text, " qk_norm(eps={eps:e})");
    }
    match a.chunk {
        Some(c) => {
            let _ = write!(text, " mask=chunked({})", c.size);
        }
        None => text.push_str(" mask=causal"),
    }
    if let Some(t) = a.temperature {
        let _ = write!(
            text,
            " temperature(floor_scale={} attn_scale={})",
            t.floor_scale, t.attn_scale
        );
    }
    text
}
