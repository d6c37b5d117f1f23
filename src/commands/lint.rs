//! `herd lint BUNDLE --target tensorrt`: checks a bundle's graph against what TensorRT's ONNX parser takes.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};

/// Which parser to lint against.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LintTarget {
    /// TensorRT 10.15's ONNX parser (table in targets/src/tensorrt/support.json).
    Tensorrt,
}

/// Arguments of `herd lint`.
#[derive(Args)]
pub struct LintArgs {
    /// A bundle folder (its model.onnx, and vision.onnx when it takes images, are linted).
    #[arg(required_unless_present = "rules")]
    pub bundle: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "tensorrt")]
    pub target: LintTarget,
    /// List the rules and exit.
    #[arg(long)]
    pub rules: bool,
}

/// Runs the command: prints every violation and fails if there is any.
pub fn run(args: &LintArgs) -> Result<()> {
    if args.rules {
        for (rule, what) in herd_targets::tensorrt::RULES {
            outln!("{rule:<24} {what}");
        }
        return Ok(());
    }
    let bundle = args
        .bundle
        .as_ref()
        .expect("clap requires BUNDLE without --rules");
    let manifest = herd_runtime::Bundle::open(bundle)?.manifest;
    let decoders: Vec<String> = manifest
        .stage_list()
        .into_iter()
        .map(|s| s.model_file)
        .collect();
    let mut files = decoders.clone();
    if let Some(v) = &manifest.vision {
        files.push(v.model_file.clone());
    }
    // `--moe cuda` bundles leave their MoE nodes to the CUDA EP; each decoder graph's split is reported.
    let cuda_ep = manifest.moe_lowering == herd_targets::onnx::MoeLowering::Cuda;
    let mut violations = Vec::new();
    for file in &files {
        if !decoders.contains(file) {
            violations.extend(herd_targets::tensorrt::lint_file(&bundle.join(file))?);
            continue;
        }
        let decoder = herd_targets::tensorrt::lint_file_with(&bundle.join(file), cuda_ep)?;
        violations.extend(decoder.violations);
        if cuda_ep {
            let p = &decoder.partition;
            outln!(
                "partition of {file}: {} TensorRT subgraph(s) of {} nodes, {} node(s) on the CUDA EP (com.microsoft.MoE/QMoE), {} tensor(s) crossing between them",
                p.tensorrt_subgraphs, p.tensorrt_nodes, p.cuda_nodes, p.boundary_tensors
            );
        }
    }
    let allowed = manifest
        .tensorrt
        .map(|t| t.allowed_lint)
        .unwrap_or_default();
    for v in &violations {
        let note = if allowed.iter().any(|r| r == v.rule) {
            " (allowed at compile)"
        } else {
            ""
        };
        outln!("{v}{note}");
    }
    if violations.is_empty() {
        eprintln!(
            "{}: no TensorRT violations in {}",
            bundle.display(),
            files.join(", ")
        );
        Ok(())
    } else {
        anyhow::bail!(
            "{}: {} TensorRT violation(s)",
            bundle.display(),
            violations.len()
        )
    }
}
