//! The ordered pass list and its runner. The runner verifies after every pass (naming the pass in any
//! finding), times each pass, can dump the IR after a named pass, and can skip passes by name. After the
//! last pass the graph enters the Lowered phase, whose verification rejects any op left unlowered.

use std::time::{Duration, Instant};

use herd_ir::ops::ExpertLayout;
use herd_ir::{verify, Diagnostic, Graph, Phase, VerifyError};

use crate::{expert_fusion, irope, quantize};

/// Options the passes read.
#[derive(Clone, Debug)]
pub struct PassOptions {
    /// Expert weight layout the target wants (see `ExpertLayout`).
    pub moe_layout: ExpertLayout,
    /// Positions the rotary tables cover: the longest context the compiled graph accepts.
    pub max_positions: usize,
    /// Weight quantization, if any.
    pub quant: Option<crate::quantize::QuantOptions>,
}

/// How the runner runs the pipeline.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Pass names to skip.
    pub disabled: Vec<String>,
    /// Pass names after which `on_dump` receives the printed IR.
    pub dump_after: Vec<String>,
}

/// One pass: a name for the command line and its entry point.
pub struct Pass {
    pub name: &'static str,
    pub run: fn(&mut Graph, &PassOptions) -> Result<(), PassError>,
}

/// The pipeline, in order.
pub const PIPELINE: &[Pass] = &[
    // irope first: it needs the Imported attention op and introduces the projections that
    // expert_fusion then fuses (q/k/v siblings).
    Pass {
        name: "irope",
        run: irope::run,
    },
    // expert_fusion after irope: sibling-linear fusion must see irope's q/k/v projections.
    Pass {
        name: "expert_fusion",
        run: expert_fusion::run,
    },
    // quantize last: fused weights are quantized as one matrix, in the layout the target reads.
    Pass {
        name: "quantize",
        run: quantize::run,
    },
];

/// A failure while running passes.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("unknown pass `{name}`; passes are: {known}")]
    UnknownPass { name: String, known: String },
    #[error("herd bug in pass `{pass}`: could not build node `{}`: {}", diagnostic.name, diagnostic.message)]
    Build {
        pass: &'static str,
        diagnostic: Diagnostic,
    },
    #[error("pass `{pass}`: {message}")]
    Unsupported { pass: &'static str, message: String },
    #[error("herd bug: {0}")]
    Verify(VerifyError),
    #[error("the graph is not fully lowered (were passes disabled?):\n{0}")]
    NotLowered(VerifyError),
}

/// What the runner did: each pass with its duration (skipped passes are absent).
#[derive(Clone, Debug, Default)]
pub struct PipelineReport {
    pub timings: Vec<(&'static str, Duration)>,
}

/// Checks that every name in `names` is a pass.
pub fn check_pass_names(names: &[String]) -> Result<(), PassError> {
    for name in names {
        if !PIPELINE.iter().any(|p| p.name == name) {
            return Err(PassError::UnknownPass {
                name: name.clone(),
                known: PIPELINE
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    Ok(())
}

/// Runs the pipeline on an Imported graph and leaves it in the Lowered phase.
pub fn run_pipeline(
    graph: &mut Graph,
    options: &PassOptions,
    run: &RunOptions,
    mut on_dump: impl FnMut(&str, &str),
) -> Result<PipelineReport, PassError> {
    check_pass_names(&run.disabled)?;
    check_pass_names(&run.dump_after)?;
    verify(graph, Some("import")).map_err(PassError::Verify)?;
    let mut report = PipelineReport::default();
    for pass in PIPELINE {
        if run.disabled.iter().any(|d| d == pass.name) {
            tracing::info!(pass = pass.name, "skipped");
            continue;
        }
        let start = Instant::now();
        (pass.run)(graph, options)?;
        let elapsed = start.elapsed();
        tracing::info!(pass = pass.name, ?elapsed, "ran");
        report.timings.push((pass.name, elapsed));
        verify(graph, Some(pass.name)).map_err(PassError::Verify)?;
        if run.dump_after.iter().any(|d| d == pass.name) {
            on_dump(pass.name, &herd_ir::print::print(graph));
        }
    }
    let quantized = options.quant.is_some() && !run.disabled.iter().any(|d| d == "quantize");
    graph.phase = if quantized {
        Phase::Quantized
    } else {
        Phase::Lowered
    };
    verify(graph, Some("lowering")).map_err(PassError::NotLowered)?;
    Ok(report)
}
