//! `herd bench BUNDLE` and `herd bench --compile MODEL`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::compile::{DtypeArg, MoeArg};
use crate::driver::{compile, CompileOptions};

/// Arguments of `herd bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// A bundle to benchmark (or, with --compile, a checkpoint folder to compile).
    pub path: PathBuf,
    /// Benchmark compiling PATH (a checkpoint) instead: throughput against a plain sequential read.
    #[arg(long)]
    pub compile: bool,
    /// With --compile: bundle dtype.
    #[arg(long, value_enum, default_value = "f16")]
    pub dtype: DtypeArg,
    /// With --compile: MoE lowering.
    #[arg(long, value_enum, default_value = "ort")]
    pub moe: MoeArg,
    /// With --compile: weight quantization as `herd compile --quant` (int4[:B], int8[:B], fp8), with
    /// its default clipped scales and lm_head/table quantized for int4/int8.
    #[arg(long, requires = "compile", value_parser = herd_ir::quant::QuantScheme::parse)]
    pub quant: Option<herd_ir::quant::QuantScheme>,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    /// Contexts at which decode is also timed (batch 1 and 8, median of 3), with the bytes that cross
    /// the session boundary per step (`kv_bytes_moved_per_step`), e.g. `--contexts 64,4096`.
    #[arg(long, value_delimiter = ',')]
    pub contexts: Vec<usize>,
    /// Micro-batches in flight at which decode is also timed (median of 3): for a staged bundle
    /// (`herd compile --stages N`) the groups go through the stages together, each stage on its own
    /// thread (and device), e.g. `--micro-batches 1,2,4`; a one-stage bundle runs them in turn.
    #[arg(long, value_delimiter = ',')]
    pub micro_batches: Vec<usize>,
    /// With --micro-batches: rows per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub micro_batch_rows: usize,
    /// Benchmark serving instead: the same greedy requests through `herd serve`'s HTTP API on
    /// 127.0.0.1, one by one and --concurrency at a time (requests/s, tokens/s, p50/p99 latency).
    #[arg(long, conflicts_with = "compile")]
    pub serve: bool,
    /// With --serve: requests sent.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// With --serve: requests in flight at once (and batch slots).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// With --serve: tokens generated per request.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Also profile the decoder sessions with ONNX Runtime's profiler: it writes its trace to
    /// `PREFIX_<date>.json` and herd prints the kernel time per operator type over the whole run
    /// (prefill and decode at every batch size), e.g. `--profile /tmp/scout`. Timings are slower while
    /// profiling.
    #[arg(long, value_name = "PREFIX", conflicts_with_all = ["compile", "serve"])]
    pub profile: Option<PathBuf>,
    /// Print one JSON object with stable keys instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: super::runtime_args::RuntimeArgs,
}

/// Runs the command.
pub fn run(args: &BenchArgs) -> Result<()> {
    let report = if args.compile {
        compile_bench(args)?
    } else if args.serve {
        let shape = crate::serve::load::LoadShape {
            requests: args.requests,
            concurrency: args.concurrency,
            max_tokens: args.max_tokens,
        };
        crate::serve::load::run(&args.path, &args.runtime.options(), &shape)?
    } else {
        let shape = crate::bench::DecodeShape {
            steps: args.decode_steps,
            contexts: args.contexts.clone(),
            micro_batches: args.micro_batches.clone(),
            micro_batch_rows: args.micro_batch_rows,
        };
        let options = herd_runtime::RuntimeOptions {
            profile: args.profile.clone(),
            ..args.runtime.options()
        };
        let before = match &args.profile {
            Some(prefix) => crate::profile::written_since(prefix, &[])?,
            None => Vec::new(),
        };
        let mut report = crate::bench::bundle(&args.path, &options, &shape)?;
        if let Some(prefix) = &args.profile {
            // The bundle's sessions are closed by now: ONNX Runtime wrote their profiles.
            let files = crate::profile::written_since(prefix, &before)?;
            let ops = crate::profile::kernel_time_by_op(&files)?;
            let total: f64 = ops.iter().map(|o| o.milliseconds).sum();
            report["profile_files"] = json!(files);
            report["kernel_ms_by_op"] = json!(ops
                .iter()
                .map(|o| json!({
                    "op": o.op,
                    "ms": (o.milliseconds * 10.0).round() / 10.0,
                    "share": (o.milliseconds / total.max(1e-9) * 1000.0).round() / 1000.0,
                    "calls": o.calls,
                }))
                .collect::<Vec<_>>());
        }
        report
    };
    if args.json {
        outln!("{report}");
    } else {
        for (k, v) in report.as_object().into_iter().flatten() {
            outln!("{k:<32} {v}");
        }
    }
    Ok(())
}

fn compile_bench(args: &BenchArgs) -> Result<serde_json::Value> {
    let (read_bytes, read_seconds) = crate::bench::sequential_read(&args.path)?;
    let out = tempfile::Builder::new()
        .prefix("herd-bench")
        .tempdir_in(std::env::temp_dir())?;
    let options = CompileOptions {
        moe: args.moe.lowering(),
        dtype: args.dtype.dtype(),
        max_context: 4096,
        quant: args.quant.map(|scheme| {
            let head = super::compile::head_quantized(scheme, false);
            herd_passes::quantize::QuantOptions {
                scheme,
                scale_dtype: if args.dtype == DtypeArg::F32 {
                    herd_ir::DType::F32
                } else {
                    herd_ir::DType::F16
                },
                search: herd_ir::quant::ScaleSearch::Clip,
                head,
                embeddings: head,
                keep: Vec::new(),
            }
        }),
        ..CompileOptions::new(args.path.clone(), out.path().join("bundle"))
    };
    // The copy is made (and removed) before the compile writes, so the disk holds one of them.
    let (copy_bytes, copy_seconds) =
        crate::bench::copy_with_sync(&args.path, &out.path().join("copy"))?;
    let report = compile(&options, &mut |_, _| {})?;
    let seconds: f64 = report.stages.iter().map(|(_, d)| d.as_secs_f64()).sum();
    let compile_gbps = report.checkpoint_bytes as f64 / seconds / 1e9;
    let read_gbps = read_bytes as f64 / read_seconds / 1e9;
    Ok(json!({
        "model": args.path,
        "quant": args.quant.map(|q| q.name()),
        "checkpoint_bytes": report.checkpoint_bytes,
        "bytes_written": report.bytes_written,
        "compile_seconds": seconds,
        "compile_gb_per_s": compile_gbps,
        "sequential_read_seconds": read_seconds,
        "sequential_read_gb_per_s": read_gbps,
        "compile_over_read_time": seconds / read_seconds,
        "copy_bytes": copy_bytes,
        "copy_seconds": copy_seconds,
        "compile_over_copy_time": seconds / copy_seconds.max(1e-9),
        "peak_rss_bytes": report.peak_rss_bytes,
    }))
}
