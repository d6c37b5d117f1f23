//! `quantize`: marks weights for quantized storage (see `herd_ir::quant` for the arithmetic).
//!
//! Quantized: attention projections, dense MLPs, shared and routed experts. Kept in full precision: the
//! router, the norms, lm_head unless `head`, the embedding table unless `embeddings`, and a weight
//! lm_head shares with a float embedding table (tied embeddings); also every node whose
//! name matches a `keep` pattern (`*` matches any run of characters, e.g. `layers.0.*`). Each marked
//! weight records which of its axes is K, so blocks run along the input features whatever layout
//! expert_fusion chose.
//!
//! Does not: change any op or value type. The graph computes with the dequantized weights, exactly what
//! the targets' dequantization will compute, so the reference evaluator stays the oracle.
//! Before: Lowered. After: Quantized (when a scheme is set; otherwise the graph is unchanged).

use herd_ir::graph::NodeIndex;
use herd_ir::ops::ExpertLayout;
use herd_ir::quant::{QuantScheme, QuantSpec, ScaleSearch};
use herd_ir::{DType, Graph, Op};

use crate::pipeline::{PassError, PassOptions};

/// What to quantize and how.
#[derive(Clone, Debug)]
pub struct QuantOptions {
    pub scheme: QuantScheme,
    /// Element type of the scales (the bundle's compute dtype).
    pub scale_dtype: DType,
    /// How int blocks' scales are chosen (fp8 always takes absmax).
    pub search: ScaleSearch,
    /// Also quantize lm_head.
    pub head: bool,
    /// Also quantize the embedding table (the ONNX target gathers its rows with
    /// `GatherBlockQuantized`, so a token reads one quantized row).
    pub embeddings: bool,
    /// Node-name patterns to keep in full precision.
    pub keep: Vec<String>,
}

/// Runs the pass.
pub fn run(graph: &mut Graph, options: &PassOptions) -> Result<(), PassError> {
    let Some(q) = &options.quant else {
        return Ok(());
    };
    let mut marks: Vec<(NodeIndex, usize)> = Vec::new();
    for node in graph.node_indices() {
        let Some(n) = graph.node(node) else { continue };
        if q.keep.iter().any(|p| wildcard(p, &n.name)) {
            continue;
        }
        let inputs = graph.inputs(node);
        match &n.op {
            Op::Linear if n.name != herd_ir::names::LM_HEAD => marks.push((inputs[1].node, 1)),
            Op::Linear if q.head && (q.embeddings || !feeds_embedding(graph, inputs[1].node)) => {
                marks.push((inputs[1].node, 1))
            }
            Op::Embedding { .. } if q.embeddings => marks.push((inputs[1].node, 1)),
            Op::FusedMoe(m) => {
                let expert_k = match m.layout {
                    ExpertLayout::Interleaved => 2,
                    ExpertLayout::Halves => 1,
                };
                marks.extend([
                    (inputs[2].node, expert_k),
                    (inputs[3].node, expert_k),
                    (inputs[4].node, 1),
                    (inputs[5].node, 1),
                ]);
            }
            // Their weights stay in float: lm_head with --keep-head, the embedding with --keep-head
            // or on the TensorRT target,
            // norms (RmsNorm, LayerNorm: per-channel scales), the router (small, and routing is
            // sensitive to it; FusedMoe's input 1 above is skipped for that reason).
            Op::Linear | Op::Embedding { .. } | Op::RmsNorm(_) | Op::LayerNorm(_) => {}
            // Unfused feed-forward and unlowered attention never reach this pass (it runs after
            // expert_fusion and irope; the phase check refuses them).
            Op::Attention(_) | Op::Mlp | Op::Moe(_) => {}
            // Ops without weight operands.
            Op::Input(_)
            | Op::Weight(_)
            | Op::Gelu
            | Op::AppendToken
            | Op::PickRows
            | Op::ScatterRows
            | Op::Add
            | Op::Mul
            | Op::Sigmoid
            | Op::Silu
            | Op::Cast { .. }
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
            | Op::QuantizeActivation { .. } => {}
        }
    }
    for (node, k_axis) in marks {
        let Some(n) = graph.node_mut(node) else {
            continue;
        };
        if matches!(&n.op, Op::Weight(w) if w.prequantized()) {
            // Already quantized in the checkpoint: stored as it is, never requantized.
            continue;
        }
        let Op::Weight(w) = &mut n.op else {
            return Err(PassError::Unsupported {
                pass: "quantize",
                message: format!("`{}` is not a checkpoint weight", n.name),
            });
        };
        let spec = QuantSpec {
            scheme: q.scheme,
            k_axis,
            scale_dtype: q.scale_dtype,
            search: q.search,
        };
        let shape = w.shape().map_err(|m| PassError::Unsupported {
            pass: "quantize",
            message: m,
        })?;
        spec.check(&shape)
            .map_err(|problem| PassError::Unsupported {
                pass: "quantize",
                message: format!(
                    "cannot quantize `{}` {shape:?} as {}: {problem}; keep it with --quant-keep",
                    n.name,
                    q.scheme.name()
                ),
            })?;
        w.quant = Some(spec);
    }
    Ok(())
}

/// Whether weight `weight` is also an embedding table (lm_head tied to the embeddings).
fn feeds_embedding(graph: &Graph, weight: NodeIndex) -> bool {
    graph.node_indices().into_iter().any(|o| {
        matches!(graph.node(o).map(|n| &n.op), Some(Op::Embedding { .. }))
            && graph.inputs(o).get(1).is_some_and(|v| v.node == weight)
    })
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
pub fn wildcard(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first)
        || !name[first.len()..].ends_with(last)
        || name.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::wildcard;

    #[test]
    fn wildcards() {
        assert!(wildcard("layers.0.*", "layers.0.attn.fused_proj"));
        assert!(!wildcard("layers.0.*", "layers.10.moe"));
        assert!(wildcard("*.moe", "layers.3.moe"));
        assert!(wildcard("layers.*.attn*", "layers.2.attn.o_proj"));
        assert!(wildcard("lm_head", "lm_head"));
        assert!(!wildcard("lm_head", "lm_head2"));
        assert!(!wildcard("a*b*c", "ac"));
    }
}
