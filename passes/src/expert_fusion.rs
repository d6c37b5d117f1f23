//! `expert_fusion`: fuses the feed-forward blocks and sibling projections.
//!
//! - Each `Moe` becomes one `FusedMoe`: the router, top-k, `sigmoid(selected logit)` applied to the
//!   expert INPUT, the experts' gate and up projections fused into one matrix `fc1` in the layout the
//!   target wants ([`ExpertLayout`]), `fc2` from `down_proj`, and the shared expert folded in as
//!   `shared_fc1 = [gate; up]` [2I, H] and `shared_fc2 = down` [H, I]. Mapping back to the original:
//!   for expert e, `Interleaved` has `fc1[e, 2i, :] = gate_up_proj[e, :, i]` and
//!   `fc1[e, 2i+1, :] = gate_up_proj[e, :, I + i]`, `fc2[e] = down_proj[e]^T`; `Halves` keeps
//!   `fc1 = gate_up_proj`, `fc2 = down_proj`. The output is `shared(x) + sum_e Expert_e(sigmoid(l_e) x)`,
//!   exactly [`Op::Moe`].
//! - Each dense `Mlp` becomes `Linear(x, [gate; up])`, `SwiGlu`, `Linear(down)`.
//! - `Linear` nodes without a bias that read the same input with plain checkpoint weights of one dtype
//!   (q/k/v) become one `Linear` over the concatenated weight followed by a `Slice` per original
//!   output; projections with a bias stay as they are.
//!
//! Does not: quantize, change dtypes, or touch attention math. All weight changes are lazy transforms and
//! concatenations of the checkpoint tensors, materialised only when a target streams them out.
//! Before: any phase with `Moe`/`Mlp`. After: no `Moe` or `Mlp` nodes.

use std::collections::BTreeMap;

use herd_ir::ops::{ExpertLayout, FusedMoeAttrs, MoeAttrs};
use herd_ir::weights::{Transform, WeightRef};
use herd_ir::{Diagnostic, Graph, Op, Value};

use crate::pipeline::{PassError, PassOptions};
use crate::weight_inputs;

/// Runs the pass.
pub fn run(graph: &mut Graph, options: &PassOptions) -> Result<(), PassError> {
    let build = |diagnostic: Diagnostic| PassError::Build {
        pass: "expert_fusion",
        diagnostic,
    };
    // The feed-forward blocks, selected once: the loop below handles exactly these two kinds.
    let blocks: Vec<(herd_ir::graph::NodeIndex, String, Option<MoeAttrs>)> = graph
        .node_indices()
        .into_iter()
        .filter_map(|n| {
            let node = graph.node(n)?;
            match &node.op {
                Op::Moe(m) => Some((n, node.name.clone(), Some(m.clone()))),
                Op::Mlp => Some((n, node.name.clone(), None)),
                _ => None,
            }
        })
        .collect();
    for (node, name, moe) in blocks {
        let inputs = graph.inputs(node);
        let weights = weight_inputs(graph, &inputs[1..]).ok_or_else(|| PassError::Unsupported {
            pass: "expert_fusion",
            message: format!("`{name}`: feed-forward weights must be checkpoint tensors"),
        })?;
        let out = match moe {
            Some(m) => fuse_moe(graph, &name, &m, inputs[0], &weights, options.moe_layout),
            None => fuse_mlp(graph, &name, inputs[0], &weights),
        }
        .map_err(build)?;
        graph.replace_uses(Value { node, slot: 0 }, out);
    }
    fuse_sibling_linears(graph).map_err(build)?;
    graph.prune_dead();
    Ok(())
}

/// Concatenation of single-tensor weights along axis 0, or `None` when they cannot be concatenated lazily.
fn concat_rows(weights: &[&WeightRef]) -> Option<WeightRef> {
    let plain = weights
        .iter()
        .all(|w| w.transforms.is_empty() && w.parts.len() == 1);
    let same_dtype = weights.windows(2).all(|p| p[0].dtype() == p[1].dtype());
    let fused = WeightRef {
        parts: weights.iter().flat_map(|w| w.parts.clone()).collect(),
        concat_axis: 0,
        transforms: Vec::new(),
        quant: None,
    };
    (plain && same_dtype && fused.shape().is_ok()).then_some(fused)
}

fn fuse_moe(
    g: &mut Graph,
    name: &str,
    m: &MoeAttrs,
    x: Value,
    w: &[WeightRef],
    layout: ExpertLayout,
) -> Result<Value, Diagnostic> {
    let (e, inter) = (m.num_experts, m.intermediate_size);
    let [router, gate_up, down, shared_gate, shared_up, shared_down] = w else {
        return Err(diag(name, "MoE must have 6 weights"));
    };
    let hidden = router.shape().map_err(|p| diag(name, &p))?[1];
    let (fc1, fc2) = match layout {
        ExpertLayout::Interleaved => (
            gate_up
                .clone()
                .with(Transform::Reshape {
                    shape: vec![e, hidden, 2, inter],
                })
                .with(Transform::Transpose {
                    perm: vec![0, 3, 2, 1],
                })
                .with(Transform::Reshape {
                    shape: vec![e, 2 * inter, hidden],
                }),
            down.clone().with(Transform::Transpose {
                perm: vec![0, 2, 1],
            }),
        ),
        ExpertLayout::Halves => (gate_up.clone(), down.clone()),
    };
    let shared_fc1 = concat_rows(&[shared_gate, shared_up])
        .ok_or_else(|| diag(name, "shared expert gate/up cannot be concatenated"))?;
    let attrs = FusedMoeAttrs {
        num_experts: e,
        top_k: m.top_k,
        intermediate_size: inter,
        layout,
    };
    let router = g.add(format!("{name}.router"), Op::Weight(router.clone()), &[])?;
    let fc1 = g.add(format!("{name}.fc1"), Op::Weight(fc1), &[])?;
    let fc2 = g.add(format!("{name}.fc2"), Op::Weight(fc2), &[])?;
    let sfc1 = g.add(format!("{name}.shared_fc1"), Op::Weight(shared_fc1), &[])?;
    let sfc2 = g.add(
        format!("{name}.shared_fc2"),
        Op::Weight(shared_down.clone()),
        &[],
    )?;
    g.add(
        name.to_string(),
        Op::FusedMoe(attrs),
        &[x, router, fc1, fc2, sfc1, sfc2],
    )
}

fn fuse_mlp(g: &mut Graph, name: &str, x: Value, w: &[WeightRef]) -> Result<Value, Diagnostic> {
    let [gate, up, down] = w else {
        return Err(diag(name, "MLP must have 3 weights"));
    };
    let gate_up =
        concat_rows(&[gate, up]).ok_or_else(|| diag(name, "MLP gate/up cannot be concatenated"))?;
    let gate_up = g.add(format!("{name}.gate_up"), Op::Weight(gate_up), &[])?;
    let down = g.add(format!("{name}.down"), Op::Weight(down.clone()), &[])?;
    let h = g.add(format!("{name}.gate_up_proj"), Op::Linear, &[x, gate_up])?;
    let act = g.add(format!("{name}.swiglu"), Op::SwiGlu, &[h])?;
    g.add(format!("{name}.down_proj"), Op::Linear, &[act, down])
}

/// Groups `Linear` nodes by their activation input and fuses groups of two or more.
fn fuse_sibling_linears(g: &mut Graph) -> Result<(), Diagnostic> {
    let mut groups: BTreeMap<Value, Vec<(herd_ir::graph::Value, WeightRef, String)>> =
        BTreeMap::new();
    for node in g.node_indices() {
        let Some(n) = g.node(node) else { continue };
        if !matches!(n.op, Op::Linear) {
            continue;
        }
        let inputs = g.inputs(node);
        // A bias would be lost in the fused projection: only bias-free siblings are fused.
        if inputs.len() != 2 {
            continue;
        }
        if let Some(ws) = weight_inputs(g, &inputs[1..]) {
            groups.entry(inputs[0]).or_default().push((
                Value { node, slot: 0 },
                ws[0].clone(),
                n.name.clone(),
            ));
        }
    }
    for (x, members) in groups {
        if members.len() < 2 {
            continue;
        }
        let refs: Vec<&WeightRef> = members.iter().map(|(_, w, _)| w).collect();
        let Some(fused) = concat_rows(&refs) else {
            continue;
        };
        let rows: Vec<usize> = refs
            .iter()
            .map(|w| w.shape().map(|s| s[0]).unwrap_or(0))
            .collect();
        let label = common_prefix(
            &members
                .iter()
                .map(|(_, _, n)| n.as_str())
                .collect::<Vec<_>>(),
        );
        let w = g.add(format!("{label}fused_weight"), Op::Weight(fused), &[])?;
        let proj = g.add(format!("{label}fused_proj"), Op::Linear, &[x, w])?;
        let rank = g.value_type(proj).map_or(1, |t| t.shape.rank());
        let mut start = 0;
        for ((old, _, member), n) in members.iter().zip(rows) {
            let slice = g.add(
                format!("{member}.slice"),
                Op::Slice {
                    axis: rank - 1,
                    start,
                    end: start + n,
                },
                &[proj],
            )?;
            g.replace_uses(*old, slice);
            start += n;
        }
    }
    Ok(())
}

fn common_prefix(names: &[&str]) -> String {
    let first = names.first().copied().unwrap_or_default();
    let len = names.iter().fold(first.len(), |len, n| {
        first
            .bytes()
            .zip(n.bytes())
            .take(len)
            .take_while(|(a, b)| a == b)
            .count()
    });
    first[..len].to_string()
}

fn diag(name: &str, message: &str) -> Diagnostic {
    Diagnostic {
        node: None,
        name: name.to_string(),
        message: message.to_string(),
    }
}
