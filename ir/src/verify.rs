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
    let mut found = Vec::new();
    let mut report = |node: Option<u32>, name: &str, message: String| {
        found.push(Diagnostic {
            node,
            name: name.to_string(),
            message,
        })
    };

    if let Err(cycle) = graph.topo_order() {
        for n in cycle {
            let name = graph.node(n).map_or("?", |node| node.name.as_str());
            report(Some(n.index() as u32), name, "lies on a cycle".into());
        }
    }

    let mut input_names = HashSet::new();
    for index in graph.node_indices() {
        let Some(node) = graph.node(index) else {
            continue;
        };
        let id = Some(index.index() as u32);
        if !node.op.allowed_in(graph.phase) {
            report(
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
                report(
                    id,
                    &node.name,
                    format!("graph input `{}` is declared twice", a.name),
                );
            }
            Op::Weight(w) => {
                if let Some(spec) = &w.quant {
                    match w.shape() {
                        Ok(shape) if spec.k_axis == 0 => report(id, &node.name, format!("quantized along axis 0 of {shape:?}: K must not be the leading axis")),
                        Ok(shape) => {
                            if let Err(problem) = spec.check(&shape) {
                                report(id, &node.name, format!("quantization {}: {problem}", spec.scheme.name()));
                            }
                        }
                        Err(_) => {}
                    }
                }
                let shards = graph.weights().shards();
                for part in &w.parts {
                    match shards.get(part.source.shard.0 as usize) {
                        None => report(
                            id,
                            &node.name,
                            format!("weight refers to missing shard {}", part.source.shard.0),
                        ),
                        Some(shard) => match shard.info(&part.source.tensor) {
                            None => report(
                                id,
                                &node.name,
                                format!("tensor `{}` is not in {}", part.source.tensor, shard.name),
                            ),
                            Some(info) if info.shape != part.stored_shape => report(
                                id,
                                &node.name,
                                format!(
                                    "`{}`: stored shape {:?} disagrees with the shard's {:?}",
                                    part.source.tensor, part.stored_shape, info.shape
                                ),
                            ),
                            Some(_) => {}
                        },
                    }
                }
            }
            _ => {}
        }

        let mut slots: Vec<usize> = graph
            .input_edges(index)
            .iter()
            .map(|e| e.dst_slot)
            .collect();
        slots.sort_unstable();
        if slots.iter().enumerate().any(|(i, &s)| i != s) {
            report(
                id,
                &node.name,
                format!(
                    "input slots {slots:?} are not 0..{} each fed once",
                    slots.len()
                ),
            );
            continue;
        }
        let inputs = graph.inputs(index);
        let types: Option<Vec<_>> = inputs.iter().map(|v| graph.value_type(*v)).collect();
        let Some(types) = types else {
            report(
                id,
                &node.name,
                "an input refers to a producer slot that does not exist".into(),
            );
            continue;
        };
        match infer(&node.op, &types) {
            Err(message) => report(id, &node.name, format!("{}: {message}", node.op.name())),
            Ok(outputs) if outputs != node.outputs => {
                let shown: Vec<String> = node.outputs.iter().map(|t| t.to_string()).collect();
                let want: Vec<String> = outputs.iter().map(|t| t.to_string()).collect();
                report(
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

    if graph.outputs().is_empty() {
        report(None, "<graph>", "the graph has no outputs".into());
    }
    let mut output_names = HashSet::new();
    for (name, value) in graph.outputs() {
        if !output_names.insert(name) {
            report(None, name, "graph output declared twice".into());
        }
        if graph.value_type(*value).is_none() {
            report(
                None,
                name,
                "graph output refers to a missing node or slot".into(),
            );
        }
    }

    if found.is_empty() {
        Ok(())
    } else {
        Err(VerifyError {
            after_pass: after_pass.map(str::to_string),
            diagnostics: found,
        })
    }
}
