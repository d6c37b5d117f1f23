//! FP8 activation quantization for TensorRT: per-tensor scales for the inputs of fp8-weight projections,
//! calibrated by running prompts (the runner lives with the driver; these are the graph edits).
//!
//! `expose` adds a graph output `calib.{node}` for the input of every `Linear` whose weight is fp8, so a
//! calibration bundle reports those activations; `quantize_activations` then inserts
//! `QuantizeActivation { scale: max|x| / 448 }` in front of each such projection.
//!
//! The `calibrate` pass does one or the other as [`Activations`] says (the driver measures the maxima
//! with a calibration bundle between two compiles). For GPTQ, [`Exposed::AllInputs`] exposes the input
//! of every projection and every MoE (a float calibration bundle whose activations give the Hessians).
//! Before: Quantized (fp8 weights) or Lowered. After: the same phase.
//!
//! Does not: quantize expert inputs (experts keep weight-only fp8), or touch other projections.

use std::collections::HashMap;

use herd_ir::quant::QuantScheme;
use herd_ir::{Diagnostic, Graph, Op, Value};

/// What the `calibrate` pass does.
#[derive(Clone, Debug, Default)]
pub enum Activations {
    /// Nothing.
    #[default]
    Unchanged,
    /// Expose projection inputs as outputs (a calibration bundle).
    Expose(Exposed),
    /// Quantize those inputs with the measured maxima, keyed by output name.
    Quantize(std::sync::Arc<HashMap<String, f32>>),
}

/// Which inputs a calibration bundle exposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposed {
    /// The inputs of projections whose weight is fp8 (activation maxima for fp8 inputs).
    Fp8Inputs,
    /// The input of every `Linear` (lm_head's at every token) and of every `FusedMoe` (activations
    /// for GPTQ's Hessians).
    AllInputs,
}

/// The `calibrate` pass.
pub fn run(graph: &mut Graph, options: &crate::PassOptions) -> Result<(), crate::PassError> {
    match &options.activations {
        Activations::Unchanged => {}
        Activations::Expose(which) => {
            expose(graph, *which);
        }
        Activations::Quantize(max_abs) => {
            quantize_activations(graph, max_abs).map_err(|diagnostic| crate::PassError::Build {
                pass: "calibrate",
                diagnostic,
            })?;
        }
    }
    Ok(())
}

/// Outputs a calibration bundle exposes (see [`expose`]).
pub fn exposed(graph: &Graph) -> Vec<String> {
    graph
        .outputs()
        .iter()
        .map(|(name, _)| name)
        .filter(|n| n.starts_with("calib."))
        .cloned()
        .collect()
}

/// Projections whose input [`quantize_activations`] quantized.
pub fn quantized_inputs(graph: &Graph) -> usize {
    graph
        .node_indices()
        .into_iter()
        .filter(|&n| {
            matches!(
                graph.node(n).map(|x| &x.op),
                Some(Op::QuantizeActivation { .. })
            )
        })
        .count()
}

/// The largest magnitude e4m3 represents.
pub const FP8_MAX: f32 = 448.0;

/// (node name, node, input value) of every `Linear` whose weight is stored fp8.
fn fp8_projections(graph: &Graph) -> Vec<(String, herd_ir::graph::NodeIndex, Value)> {
    graph
        .node_indices()
        .into_iter()
        .filter_map(|n| {
            let node = graph.node(n)?;
            if !matches!(node.op, Op::Linear) {
                return None;
            }
            let inputs = graph.inputs(n);
            let fp8 = matches!(&graph.node(inputs[1].node)?.op, Op::Weight(w) if w.effective_quant().is_some_and(|q| q.scheme == QuantScheme::Fp8));
            fp8.then(|| (node.name.clone(), n, inputs[0]))
        })
        .collect()
}

/// The output name that carries a projection's input in a calibration bundle.
pub fn output_name(node: &str) -> String {
    format!("calib.{node}")
}

/// (node name, input value) of every `Linear` and `FusedMoe` but `lm_head` (which sees only the rows
/// whose logits are picked, not every token: see [`head_input_at_every_token`]).
fn all_projections(graph: &Graph) -> Vec<(String, Value)> {
    graph
        .node_indices()
        .into_iter()
        .filter_map(|n| {
            let node = graph.node(n)?;
            (matches!(node.op, Op::Linear | Op::FusedMoe(_))
                && node.name != herd_ir::names::LM_HEAD)
                .then(|| (node.name.clone(), graph.inputs(n)[0]))
        })
        .collect()
}

/// lm_head's input at every token: the graph computes `final_norm(pick_rows(h))`, so this adds the
/// same norm over `h` itself (calibration bundles only). None if the head is not in that form.
fn head_input_at_every_token(graph: &mut Graph) -> Option<Value> {
    let head = graph.node_indices().into_iter().find(|&n| {
        graph
            .node(n)
            .is_some_and(|x| matches!(x.op, Op::Linear) && x.name == herd_ir::names::LM_HEAD)
    })?;
    let norm = graph.inputs(head)[0].node;
    let norm_op = match graph.node(norm).map(|x| &x.op) {
        Some(op @ Op::RmsNorm(_)) => op.clone(),
        _ => return None,
    };
    let norm_inputs = graph.inputs(norm);
    let picked = norm_inputs[0].node;
    if !matches!(graph.node(picked).map(|x| &x.op), Some(Op::PickRows)) {
        return None;
    }
    let mut inputs = vec![graph.inputs(picked)[0]];
    inputs.extend(norm_inputs.get(1).copied());
    graph
        .add("calib.final_norm_every_token", norm_op, &inputs)
        .ok()
}

/// Exposes the inputs `which` names as graph outputs; returns the output names.
pub fn expose(graph: &mut Graph, which: Exposed) -> Vec<String> {
    let mut projections: Vec<(String, Value)> = match which {
        Exposed::Fp8Inputs => fp8_projections(graph)
            .into_iter()
            .map(|(name, _, value)| (name, value))
            .collect(),
        Exposed::AllInputs => all_projections(graph),
    };
    if which == Exposed::AllInputs {
        if let Some(value) = head_input_at_every_token(graph) {
            projections.push((herd_ir::names::LM_HEAD.to_string(), value));
        }
    }
    let mut names = Vec::new();
    for (name, value) in projections {
        let out = output_name(&name);
        graph.set_output(out.clone(), value);
        names.push(out);
    }
    names
}

/// Inserts the activation quantization before every fp8 projection with a calibrated maximum in
/// `max_abs` (keyed by output name); returns how many were inserted.
pub fn quantize_activations(
    graph: &mut Graph,
    max_abs: &HashMap<String, f32>,
) -> Result<usize, Diagnostic> {
    let mut count = 0;
    for (name, node, value) in fp8_projections(graph) {
        let Some(&amax) = max_abs.get(&output_name(&name)) else {
            continue;
        };
        if !(amax.is_finite() && amax > 0.0) {
            continue;
        }
        let q = graph.add(
            format!("{name}.input_fp8"),
            Op::QuantizeActivation {
                scale: amax / FP8_MAX,
            },
            &[value],
        )?;
        graph.set_input(node, 0, q);
        count += 1;
    }
    Ok(count)
}
