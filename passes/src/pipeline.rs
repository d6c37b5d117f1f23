//! The ordered pass list and its runner. Each pass declares the phase it leaves the graph in; the runner
//! sets it and verifies right after the pass (naming the pass in any finding), times each pass, can
//! dump the IR after a named pass, and can skip passes by name. A graph that ends the pipeline short of
//! the Lowered phase (a lowering pass was skipped) is refused, naming what is left unlowered.

use std::time::{Duration, Instant};

use herd_ir::ops::ExpertLayout;
use herd_ir::{verify, Diagnostic, Graph, Phase, VerifyError};

use crate::{calibrate, expert_fusion, irope, quantize};

/// Options the passes read.
#[derive(Clone, Debug)]
pub struct PassOptions {
    /// Expert weight layout the target wants (see `ExpertLayout`).
    pub moe_layout: ExpertLayout,
    /// Positions the rotary tables cover: the longest context the compiled graph accepts.
    pub max_positions: usize,
    /// Weight quantization, if any.
    pub quant: Option<crate::quantize::QuantOptions>,
    /// What the `calibrate` pass does to the inputs of fp8 projections.
    pub activations: crate::calibrate::Activations,
}

/// How the runner runs the pipeline.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Pass names to skip.
    pub disabled: Vec<String>,
    /// Pass names after which `on_dump` receives the printed IR.
    pub dump_after: Vec<String>,
}

/// One pass: a name for the command line, its entry point, and the phase it leaves the graph in
/// (None: the phase it found).
pub struct Pass {
    pub name: &'static str,
    pub run: fn(&mut Graph, &PassOptions) -> Result<(), PassError>,
    pub leaves: fn(&PassOptions) -> Option<Phase>,
}

/// The pipeline, in order.
pub const PIPELINE: &[Pass] = &[
    // irope first: it needs the Imported attention op and introduces the projections that
    // expert_fusion then fuses (q/k/v siblings).
    // Leaves `Mlp`/`Moe` (Imported-phase ops) for expert_fusion.
    Pass {
        name: "irope",
        run: irope::run,
        leaves: |_| None,
    },
    // expert_fusion after irope: sibling-linear fusion must see irope's q/k/v projections.
    Pass {
        name: "expert_fusion",
        run: expert_fusion::run,
        leaves: |_| Some(Phase::Lowered),
    },
    // quantize last: fused weights are quantized as one matrix, in the layout the target reads.
    Pass {
        name: "quantize",
        run: quantize::run,
        leaves: |o| o.quant.is_some().then_some(Phase::Quantized),
    },
    // calibrate after quantize: it finds the fp8 projections by their quantized weights.
    Pass {
        name: "calibrate",
        run: calibrate::run,
        leaves: |_| None,
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

/// Runs the pipeline on an Imported graph and leaves it in the Lowered (or Quantized) phase.
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
    let mut skipped = false;
    for pass in PIPELINE {
        if run.disabled.iter().any(|d| d == pass.name) {
            tracing::info!(pass = pass.name, "skipped");
            skipped = true;
            continue;
        }
        let start = Instant::now();
        (pass.run)(graph, options)?;
        let elapsed = start.elapsed();
        tracing::info!(pass = pass.name, ?elapsed, "ran");
        report.timings.push((pass.name, elapsed));
        if let Some(phase) = (pass.leaves)(options) {
            graph.phase = phase;
        }
        // With a lowering pass skipped, what is left unlowered is the user's doing, not a bug.
        verify(graph, Some(pass.name)).map_err(|e| {
            if skipped {
                PassError::NotLowered(e)
            } else {
                PassError::Verify(e)
            }
        })?;
        if run.dump_after.iter().any(|d| d == pass.name) {
            on_dump(pass.name, &herd_ir::print::print(graph));
        }
    }
    if graph.phase == Phase::Imported {
        // Only when expert_fusion was skipped: the Lowered check names the ops left.
        graph.phase = Phase::Lowered;
        verify(graph, Some("lowering")).map_err(PassError::NotLowered)?;
    }
    Ok(report)
}
