//! Runtime options shared by the commands that load bundles (`run`, `bench`).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use herd_runtime::{Provider, RuntimeOptions};

/// Execution provider on the command line.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum EpArg {
    /// ONNX Runtime's CPU kernels.
    #[default]
    Cpu,
    /// CUDA (needs herd built with --features tensorrt and a GPU build of ONNX Runtime).
    Cuda,
    /// TensorRT with the manifest's profiles, or the engine `herd build-engine` built (same needs as cuda).
    Tensorrt,
}

/// How a bundle is loaded.
#[derive(Args, Clone, Debug)]
pub struct RuntimeArgs {
    /// Execution provider.
    #[arg(long, value_enum, default_value = "cpu")]
    pub ep: EpArg,
    /// GPU index for --ep cuda/tensorrt.
    #[arg(long, default_value_t = 0, conflicts_with = "devices")]
    pub device: u32,
    /// GPUs of a staged bundle's pipeline stages (`herd compile --stages N`), one per stage in order,
    /// comma-separated: `--devices 0,1,2,3`. The vision graph runs on the first (or --vision-device).
    #[arg(long, value_delimiter = ',', value_name = "GPU,...")]
    pub devices: Vec<u32>,
    /// GPU of the vision graph (default: the first stage's).
    #[arg(long, value_name = "GPU")]
    pub vision_device: Option<u32>,
    /// Threads per ONNX Runtime operator (default: ONNX Runtime's, one per core). Stages of a
    /// staged bundle on the CPU run side by side: give each a share of the cores.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub intra_threads: Option<u16>,
    /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, then the project's .cache/onnxruntime).
    #[arg(long)]
    pub ort_library: Option<PathBuf>,
    /// Let ONNX Runtime repack MatMul weights at load (default: int4 bundles only; for float bundles it
    /// doubles the dense weights' memory for ~2x faster batches; for int8 it quantizes activations).
    #[arg(long, conflicts_with = "no_prepack")]
    pub prepack: bool,
    /// Never repack MatMul weights (hold every weight once, mapped from the bundle).
    #[arg(long)]
    pub no_prepack: bool,
    /// ONNX Runtime sessions for running graphs in parallel (weights shared; prepacked ones per session).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub sessions: u16,
    /// Check every bundle file's sha256 before loading (as `herd verify`; a load checks sizes and the
    /// small files' checksums only).
    #[arg(long)]
    pub verify: bool,
    /// Positions each conversation's KV cache holds, allocated when it starts on the device (default:
    /// the bundle's --max-context; the full-attention layers' cache grows with it).
    #[arg(long, value_name = "POSITIONS")]
    pub kv_context: Option<usize>,
    /// Quantize the activations of int4/int8 MatMuls and experts to int8 on the fly (ONNX Runtime's
    /// accuracy_level 4, as llama.cpp's Q4_0/Q8_0 do), at the KL cost `herd eval BUNDLE --against
    /// MODEL --int8-activations` reports. Default: on for int8 bundles on the CPU (exact int8 runs
    /// ~30x slower there), exact f32 activations otherwise.
    #[arg(long, conflicts_with = "exact_activations")]
    pub int8_activations: bool,
    /// Keep f32 activations for int8 bundles on the CPU too: the bundle then computes exactly what
    /// `herd eval` and the reference evaluator compute, ~30x slower than with int8 activations.
    #[arg(long)]
    pub exact_activations: bool,
}

/// A pair of opposite flags (clap keeps them apart): `Some(true)`, `Some(false)` or neither.
fn either(on: bool, off: bool) -> Option<bool> {
    (on || off).then_some(on)
}

impl RuntimeArgs {
    /// The runtime options these arguments ask for.
    pub fn options(&self) -> RuntimeOptions {
        RuntimeOptions {
            ort_library: self.ort_library.clone(),
            intra_threads: self.intra_threads.map(usize::from),
            prepack: either(self.prepack, self.no_prepack),
            provider: match self.ep {
                EpArg::Cpu => Provider::Cpu,
                EpArg::Cuda => Provider::Cuda,
                EpArg::Tensorrt => Provider::TensorRt,
            },
            device: self.devices.first().copied().unwrap_or(self.device),
            devices: self.devices.clone(),
            vision_device: self.vision_device,
            sessions: self.sessions.into(),
            verify: self.verify,
            context: self.kv_context,
            int8_activations: either(self.int8_activations, self.exact_activations),
            profile: None,
        }
    }
}
