//! herd-passes: the IR passes (one file each) and the ordered pipeline that runs them.

pub mod calibrate;
pub mod expert_fusion;
pub mod irope;
pub mod pipeline;
pub mod quantize;

pub use pipeline::{run_pipeline, PassError, PassOptions, PipelineReport, RunOptions, PIPELINE};

use herd_ir::{Graph, Op, Value};

/// The input values of `node` that are checkpoint weights, in slot order, or `None` if any is not.
pub(crate) fn weight_inputs(
    graph: &Graph,
    inputs: &[Value],
) -> Option<Vec<herd_ir::weights::WeightRef>> {
    inputs
        .iter()
        .map(|v| match graph.node(v.node).map(|n| &n.op) {
            Some(Op::Weight(w)) => Some(w.clone()),
            _ => None,
        })
        .collect()
}
