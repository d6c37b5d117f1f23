//! `herd eval BUNDLE --against BUNDLE_OR_MODEL`: KL divergence and top-1 agreement of next-token
//! distributions against a reference.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use herd_targets::onnx::MoeLowering;

use crate::driver::{compile, CompileOptions};

/// Arguments of `herd eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// The bundle to evaluate (typically quantized).
    pub bundle: PathBuf,
    /// The reference: a bundle, or a checkpoint folder (compiled unquantized in f32 first).
    #[arg(long)]
    pub against: PathBuf,
    /// Store the result in BUNDLE's manifest (quantized bundles only).
    #[arg(long)]
    pub store: bool,
    /// Run BUNDLE with int8 activations (`herd run --int8-activations`, the CPU's default for int8
    /// bundles): the KL cost of that mode. Without it BUNDLE runs with exact f32 activations, the
    /// mode the GPU providers run. Not stored: the manifest's accuracy is the exact mode's.
    #[arg(long, conflicts_with = "store")]
    pub int8_activations: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub fn run(args: &EvalArgs) -> Result<()> {
    let is_checkpoint = args.against.join("config.json").is_file();
    let tmp = tempfile::Builder::new().prefix("herd-eval").tempdir()?;
    let reference = if is_checkpoint {
        let bundle = herd_runtime::Bundle::open(&args.bundle)?;
        // The reference runs on ONNX Runtime's CPU kernels: `cuda` bundles compare against `ort`.
        let moe = match bundle.manifest.moe_lowering {
            MoeLowering::Grouped => MoeLowering::Grouped,
            MoeLowering::Ort | MoeLowering::Cuda => MoeLowering::Ort,
        };
        let options = CompileOptions {
            moe,
            max_context: bundle.manifest.model.max_positions,
            ..CompileOptions::new(args.against.clone(), tmp.path().join("reference"))
        };
        compile(&options, &mut |_, _| {})?.bundle
    } else {
        args.against.clone()
    };
    let source = if is_checkpoint {
        Some(args.against.as_path())
    } else {
        None
    };
    let candidate_options = herd_runtime::RuntimeOptions {
        int8_activations: Some(args.int8_activations),
        ..Default::default()
    };
    let accuracy = crate::eval::compare_bundles(
        &args.bundle,
        &candidate_options,
        &reference,
        source,
        &args.against.display().to_string(),
    )?;
    if args.store {
        crate::eval::store(&args.bundle, &accuracy, None, None)?;
    }
    if args.json {
        outln!("{}", serde_json::to_string(&accuracy)?);
    } else {
        outln!(
            "{} vs {}: {}",
            args.bundle.display(),
            args.against.display(),
            crate::eval::describe(&accuracy)
        );
    }
    Ok(())
}
