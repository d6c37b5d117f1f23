//! Whether a float16 bundle can run on ONNX Runtime's CPU provider: its CPU kernels have no f16
//! MatMul, so the session inserts f16 -> f32 Casts of the weights (`InsertedPrecisionFreeCast_*`),
//! whose f32 copies (twice the f16 bytes) live in anonymous memory (measured: a 7.6 GB f16 bundle of
//! `herd synth --preset scout-8gb` peaked at 16.3 GB RSS and decoded 1.5 tok/s).

use crate::bundle::Bundle;
use crate::error::RuntimeError;
use crate::manifest::ElementType;

/// Overrides the memory herd assumes free for a CPU session (bytes), where `/proc/meminfo` and the
/// cgroup limit do not tell the truth (some containers).
pub const MEMORY_ENV: &str = "HERD_CPU_MEMORY_BYTES";

/// Refuses an f16 bundle whose float weights, cast to f32 by ONNX Runtime's CPU provider, would
/// not fit the memory available; warns for every other f16 bundle on the CPU.
pub fn check_f16_on_cpu(bundle: &Bundle) -> Result<(), RuntimeError> {
    let m = &bundle.manifest;
    if m.dtype != ElementType::F16 {
        return Ok(());
    }
    // Quantized matrices run in MatMulNBits/QMoE on their codes; only float weights are cast.
    if m.quantization.is_some() {
        tracing::warn!(
            "f16 bundle on the CPU: ONNX Runtime computes its float parts in f32 through inserted \
             casts; an f32 bundle of the same scheme runs faster there"
        );
        return Ok(());
    }
    let weights = m.model.weight_bytes;
    let needed = weights.saturating_mul(2);
    let Some(available) = available_memory()? else {
        return Ok(());
    };
    let gb = |b: u64| b as f64 / 1e9;
    if needed > available {
        return Err(RuntimeError::Unsupported(format!(
            "{}: an f16 bundle on the CPU needs about {:.1} GB of RAM for the f32 copies of its \
             {:.1} GB of weights (ONNX Runtime's CPU kernels have no f16 MatMul and cast every \
             weight to f32), and {:.1} GB is available; compile the checkpoint with --dtype f32 (the same memory, no \
             casts) or --quant int4/int8 for the CPU, or run this bundle on --ep cuda or tensorrt \
             (set {MEMORY_ENV} to override the available figure)",
            bundle.dir.display(),
            gb(needed),
            gb(weights),
            gb(available)
        )));
    }
    tracing::warn!(
        "f16 bundle on the CPU: ONNX Runtime casts its {:.1} GB of weights to f32 ({:.1} GB more \
         RAM) and computes in f32; an f32 or --quant int4 bundle runs faster there",
        gb(weights),
        gb(needed)
    );
    Ok(())
}

/// Memory a new session can take: `HERD_CPU_MEMORY_BYTES`, else the smaller of `MemAvailable` and
/// the cgroup's room (`memory.max - memory.current`); None where neither is readable.
fn available_memory() -> Result<Option<u64>, RuntimeError> {
    if let Some(v) = std::env::var_os(MEMORY_ENV) {
        return match v.to_str().and_then(|s| s.trim().parse().ok()) {
            Some(bytes) => Ok(Some(bytes)),
            None => Err(RuntimeError::option(
                MEMORY_ENV,
                format!(
                    "{MEMORY_ENV}={}: not a byte count; set it to a whole number of bytes or unset it",
                    v.to_string_lossy()
                ),
            )),
        };
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let cgroup =
        read("memory.max").map(|max| max.saturating_sub(read("memory.current").unwrap_or(0)));
    Ok(match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}
