//! The verifier: handles, slots, acyclicity, per-op typing and phase rules. It reports every finding,
//! each with the node it concerns, and the pass that ran before it when there is one.
//!
//! Contract: a graph that verifies can be evaluated and lowered without panics.

use std::collections::HashSet;

use crate::error::{Diagnostic, VerifyError};
use crate::graph::Graph;
use crate::infer::infer;
use crate::ops::Op;

/// A graph the verifier accepted (only [`verified`] makes one): what a target's emitter takes, as a
/// backend takes a validator's result, so nothing unverified is ever lowered.
#[derive(Clone, Copy, Debug)]
pub struct Verified<'g> {
    graph: &'g Graph,
}

impl<'g> Verified<'g> {
    /// The verified graph.
    pub fn graph(&self) -> &'g Graph {
        self.graph
    }
}

/// Verifies `graph` (see [`verify`]) and returns the proof.
pub fn verified<'g>(
    graph: &'g Graph,
    after_pass: Option<&str>,
) -> Result<Verified<'g>, VerifyError> {
    verify(graph, after_pass)?;
    Ok(Verified { graph })
}

/// Checks `graph`; `after_pass` names the pass that produced it, for the report.
pub fn verify(graph: &Graph, after_pass: Option<&str>) -> Result<(), VerifyError> {
    let mut found = Findings(Vec::new());
    if let Err(cycle) = graph.topo_order() {
        for n in cycle {
            let name = graph.node(n).map_or("?", |node| node.name.as_str());
            found.report(Some(n.index() as u32), name, "lies on a cycle".into());
        }
    }
    let mut input_names = HashSet::new();
    for index in graph.node_indices() {
        let Some(node) = graph.node(index) else {
            continue;
        };
        let id = Some(index.index() as u32);
        if !node.op.allowed_in(graph.phase) {
            found.report(
                id,
                &node.name,
                format!(
                    "op `{}` is not allowed in phase {}",
                    node.op.name(),
                    graph.phase.name()
                ),
            );
        }
        match &node.op {
            Op::Input(a) if !input_names.insert(a.name.clone()) => {
                found.report(
                    id,
                    &node.name,
                    format!("graph input `{}` is declared twice", a.name),
                );
            }
            Op::Weight(w) => check_weight(graph, id, &node.name, w, &mut found),
            // Every other op has no data of its own to check beyond its typing (below); a new op
            // that carries data must say so here.
            Op::Input(_)
            | Op::Embedding { .. }
            | Op::Attention(_)
            | Op::Mlp
            | Op::Moe(_)
            | Op::RmsNorm(_)
            | Op::Linear
            | Op::LayerNorm(_)
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
            | Op::FusedMoe(_)
            | Op::QuantizeActivation { .. } => {}
        }
        check_typing(graph, index, &mut found);
    }
    check_outputs(graph, &mut found);
    if found.0.is_empty() {
        Ok(())
    } else {
        Err(VerifyError {
            after_pass: after_pass.map(str::to_string),
            diagnostics: found.0,
        })
    }
}

/// The verifier's findings so far.
struct Findings(Vec<Diagnostic>);

impl Findings {
    fn report(&mut self, node: Option<u32>, name: &str, message: String) {
        self.0.push(Diagnostic {
            node,
            name: name.to_string(),
            message,
        })
    }
}

/// A weight's quantization fits its shape, and every part names a tensor its shard holds, in the
/// shape the shard's header gives.
fn check_weight(
    graph: &Graph,
    id: Option<u32>,
    name: &str,
    w: &crate::weights::WeightRef,
    found: &mut Findings,
) {
    if let (Some(spec), Ok(shape)) = (&w.quant, w.shape()) {
        if spec.k_axis == 0 {
            found.report(
                id,
                name,
                format!("quantized along axis 0 of {shape:?}: K must not be the leading axis"),
            );
        } else if let Err(problem) = spec.check(&shape) {
            found.report(
                id,
                name,
                format!("quantization {}: {problem}", spec.scheme.name()),
            );
        }
    }
    let shards = graph.weights().shards();
    for part in &w.parts {
        let Some(shard) = shards.get(part.source.shard.0 as usize) else {
            found.report(
                id,
                name,
                format!("weight refers to missing shard {}", part.source.shard.0),
            );
            continue;
        };
        match shard.info(&part.source.tensor) {
            None => found.report(
                id,
                name,
                format!("tensor `{}` is not in {}", part.source.tensor, shard.name),
            ),
            Some(info) if info.shape != part.stored_shape => found.report(
                id,
                name,
                format!(
                    "`{}`: stored shape {:?} disagrees with the shard's {:?}",
                    part.source.tensor, part.stored_shape, info.shape
                ),
            ),
            Some(_) => {}
        }
    }
}

/// A node's input slots are 0..n, each fed once by an existing producer slot, and its declared
/// outputs are what its op infers from the inputs' types.
fn check_typing(graph: &Graph, index: crate::graph::NodeIndex, found: &mut Findings) {
    let Some(node) = graph.node(index) else {
        return;
    };
    let id = Some(index.index() as u32);
    let mut slots: Vec<usize> = graph
        .input_edges(index)
        .iter()
        .map(|e| e.dst_slot)
        .collect();
    slots.sort_unstable();
    if slots.iter().enumerate().any(|(i, &s)| i != s) {
        found.report(
            id,
            &node.name,
            format!(
                "input slots {slots:?} are not 0..{} each fed once",
                slots.len()
            ),
        );
        return;
    }
    let inputs = graph.inputs(index);
    let types: Option<Vec<_>> = inputs.iter().map(|v| graph.value_type(*v)).collect();
    let Some(types) = types else {
        found.report(
            id,
            &node.name,
            "an input refers to a producer slot that does not exist".into(),
        );
        return;
    };
    match infer(&node.op, &types) {
        Err(message) => found.report(id, &node.name, format!("{}: {message}", node.op.name())),
        Ok(outputs) if outputs != node.outputs => {
            let shown: Vec<String> = node.outputs.iter().map(|t| t.to_string()).collect();
            let want: Vec<String> = outputs.iter().map(|t| t.to_string()).collect();
            found.report(
                id,
                &node.name,
                format!(
                    "declared outputs [{}] but the inputs give [{}]",
                    shown.join(", "),
                    want.join(", ")
                ),
            );
        }
        Ok(_) => {}
    }
}

/// The graph has outputs, each named once and pointing at an existing node slot.
fn check_outputs(graph: &Graph, found: &mut Findings) {
    if graph.outputs().is_empty() {
        found.report(None, "<graph>", "the graph has no outputs".into());
    }
    let mut output_names = HashSet::new();
    for (name, value) in graph.outputs() {
        if !output_names.insert(name) {
            found.report(None, name, "graph output declared twice".into());
        }
        if graph.value_type(*value).is_none() {
            found.report(
                None,
                name,
                "graph output refers to a missing node or slot".into(),
            );
        }
    }
}
