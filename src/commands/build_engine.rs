//! `herd build-engine BUNDLE [--device N]`: builds the TensorRT engine of a tensorrt-target bundle on
//! this machine's GPU, through ONNX Runtime's TensorRT execution provider.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

/// Arguments of `herd build-engine`.
#[derive(Args)]
pub struct BuildEngineArgs {
    /// A bundle compiled with `--target tensorrt-h100`.
    pub bundle: PathBuf,
    /// GPU index.
    #[arg(long, default_value_t = 0)]
    pub device: u32,
    /// Path of the GPU build of libonnxruntime.so (default: ORT_DYLIB_PATH, then the project's cache).
    #[arg(long)]
    pub ort_library: Option<PathBuf>,
}

/// Runs the command.
pub fn run(args: &BuildEngineArgs) -> Result<()> {
    let engine =
        crate::engine::build_engine(&args.bundle, args.device, args.ort_library.as_deref())?;
    eprintln!(
        "built {} for {} (compute capability {}, TensorRT {}, ONNX Runtime {})",
        args.bundle.join(&engine.model_file).display(),
        engine.gpu_name,
        engine.compute_capability,
        engine.tensorrt_version,
        engine.onnxruntime_version
    );
    Ok(())
}
