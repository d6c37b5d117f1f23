//! `herd compile MODEL_DIR -o BUNDLE`: checkpoint to a runnable bundle.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use herd_ir::DType;
use herd_passes::pipeline::RunOptions;
use herd_targets::onnx::MoeLowering;
use indicatif::{ProgressBar, ProgressStyle};

use crate::driver::{compile, CompileOptions, CompileReport, StageSplit, TensorRtOptions};

/// How int4/int8 weights are rounded (`--method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodArg {
    Gptq,
    Awq,
    Rtn,
}

/// How int4/int8 block scales are chosen (`--scales`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScalesArg {
    /// The least squared error over the block, from a grid of fractions of absmax.
    Clip,
    /// The largest magnitude maps to the largest code.
    Absmax,
}

/// How the mixture-of-experts layers are lowered.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MoeArg {
    /// com.microsoft.MoE/QMoE for ONNX Runtime's CPU kernels: one node per MoE, experts read packed,
    /// each token runs one expert. Not for TensorRT.
    Ort,
    /// For H100: com.microsoft.MoE/QMoE on ONNX Runtime's CUDA EP (grouped GEMMs, int4/int8 experts kept
    /// packed), everything else for TensorRT. One TensorRT subgraph per stretch between MoE nodes (about
    /// one per MoE layer). fp8 experts (per-channel scales, which QMoE does not take) go grouped.
    Cuda,
    /// Standard ONNX only (any EP, TensorRT alone): per expert, the tokens routed to it (NonZero,
    /// GatherND) times its own 2-D weights (DequantizeLinear -> MatMul), scattered back. Routed FLOPs,
    /// each expert read once per call; data-dependent shapes (no CUDA graphs), E times the nodes.
    Grouped,
}

impl MoeArg {
    /// The target's lowering.
    pub fn lowering(self) -> MoeLowering {
        match self {
            MoeArg::Ort => MoeLowering::Ort,
            MoeArg::Cuda => MoeLowering::Cuda,
            MoeArg::Grouped => MoeLowering::Grouped,
        }
    }
}

/// Compute dtype of the bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    /// bf16 (TensorRT target only: ONNX Runtime's CPU kernels have no bf16 MatMul or Attention).
    Bf16,
}

impl DtypeArg {
    /// The IR dtype.
    pub fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

/// What the bundle is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TargetArg {
    /// ONNX Runtime (CPU, CUDA or TensorRT providers); any op ONNX Runtime runs.
    Onnx,
    /// TensorRT on H100 (SM 9.0) through ONNX Runtime's TensorRT EP: standard ONNX ops only, linted
    /// against TensorRT 10.15's parser, optimisation profiles in the manifest.
    TensorrtH100,
}

/// Arguments of `herd compile`.
#[derive(Args)]
pub struct CompileArgs {
    /// A Hugging Face Llama 4 checkpoint folder (config.json + safetensors).
    pub model: PathBuf,
    /// Bundle folder to create (written elsewhere first and renamed into place when complete).
    #[arg(short, long)]
    pub output: PathBuf,
    /// What to compile for.
    #[arg(long, value_enum, default_value = "onnx")]
    pub target: TargetArg,
    /// MoE lowering [default: ort for --target onnx, cuda for tensorrt-h100].
    #[arg(long, value_enum)]
    pub moe: Option<MoeArg>,
    /// Element type of weights, activations and KV cache; logits are always f32 [default: f32 for
    /// --target onnx, f16 for tensorrt-h100].
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// TensorRT target: largest batch of the optimisation profile.
    #[arg(long, default_value_t = 1)]
    pub max_batch: usize,
    /// TensorRT target: most new tokens per call (prefill chunk) of the optimisation profile.
    #[arg(long, default_value_t = 2048)]
    pub max_seq: usize,
    /// Calibration prompts for GPTQ (--quant int4/int8) and fp8 activations (--quant fp8 for
    /// TensorRT): a file with one prompt per line as comma-separated token ids, or `builtin` (the
    /// checkpoint's golden prompts if any, plus 8 seeded random prompts; also the default). With int4
    /// or int8 this turns on --method gptq.
    #[arg(long, value_name = "FILE|builtin")]
    pub calibrate: Option<PathBuf>,
    /// With --quant int4/int8: `gptq` (default with --calibrate) quantizes each matrix against the
    /// Hessian of its inputs on the calibration prompts (per expert from the tokens routed to it;
    /// columns in order of decreasing Hessian diagonal; each block's scale weighted by that diagonal);
    /// `awq` first scales each norm's input channels by their activation magnitude, folded into the
    /// norm weight, then runs GPTQ; `rtn` rounds each weight to nearest (default without).
    #[arg(long, value_enum, requires = "quant")]
    pub method: Option<MethodArg>,
    /// GPTQ/AWQ: decoder layers per calibration window. Each window of the float model is compiled,
    /// run on the calibration prompts (fed the residual stream of the windows before it), quantized
    /// and deleted before the next, so disk holds one window's float weights and activations, never
    /// the whole model's (Scout: ~4.5 GB of f16 weights per layer). More layers: fewer compiles.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub calibration_window: u16,
    /// TensorRT target: do not fail on this lint rule (repeatable; `herd lint --rules` lists them).
    #[arg(long = "allow-lint", value_name = "RULE")]
    pub allow_lint: Vec<String>,
    /// Longest context (prompt + generated tokens) the bundle accepts, at most 16,777,216 (2^24,
    /// where positions stop being exact in f32). Nothing in the bundle grows with it; a server
    /// allocates its KV cache for its own --kv-context up to this.
    #[arg(long, default_value_t = 8192)]
    pub max_context: usize,
    /// Quantize weights: int4[:BLOCK] or int8[:BLOCK] (symmetric, blocks of 32, 64 or 128 along K; default
    /// 64) or fp8 (e4m3, one scale per output channel). int4/int8 also quantize lm_head and (on the
    /// ONNX target) the embedding table unless --keep-head; router and norms stay in full precision.
    #[arg(long, value_name = "SCHEME", value_parser = parse_quant)]
    pub quant: Option<herd_ir::quant::QuantScheme>,
    /// With --quant int4/int8: how each block's scale is chosen. `clip` (default): the scale of least
    /// squared error over the block among 11 fractions of absmax (1 down to 0.7 for int4, 0.9 for int8),
    /// never worse than absmax; `absmax`: the largest magnitude maps to the largest code.
    #[arg(long, value_enum, requires = "quant", default_value = "clip")]
    pub scales: ScalesArg,
    /// With --quant int4/int8: keep lm_head and the embedding table in full precision (by default
    /// they are quantized like the other weights: at Scout's shapes lm_head is 4.1 GB in f32, read
    /// whole for every token; the table is gathered one quantized row per token on the ONNX target
    /// and stays float on TensorRT, whose parser has no quantized Gather). fp8 always keeps them.
    #[arg(long, requires = "quant")]
    pub keep_head: bool,
    /// With --quant: keep nodes whose name matches in full precision (`*` wildcard, e.g. `layers.0.*`);
    /// repeatable. `herd inspect --ir` and --dump-ir-after show node names.
    #[arg(long, value_name = "PATTERN", requires = "quant")]
    pub quant_keep: Vec<String>,
    /// Leave out the vision encoder of a multimodal checkpoint (the bundle then takes text only).
    #[arg(long)]
    pub text_only: bool,
    /// Most tiles of one image's canvas (the processor's `max_patches`; a global tile comes on top)
    /// [default: preprocessor_config.json's max_patches, else 16].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_tiles: Option<u16>,
    /// Most images in one prompt.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_images: u16,
    /// Split the decoder into this many pipeline stages, one per GPU: contiguous layer ranges
    /// balancing weight + KV bytes (at --max-context and --max-batch) per device, the split `herd plan
    /// --gpus N` prints. Stage 0 also holds the embeddings (and the vision graph runs beside it), the
    /// last the final norm and lm_head. Each stage is its own ONNX graph, weights file, KV caches and
    /// TensorRT profile; `herd run --devices 0,1,...` puts them on GPUs.
    #[arg(long, value_name = "N", conflicts_with = "stage_layers")]
    pub stages: Option<usize>,
    /// Pipeline stages by layer range instead of --stages: `0..20,20..48` (contiguous, in order,
    /// covering every layer).
    #[arg(long, value_name = "RANGES")]
    pub stage_layers: Option<String>,
    /// Replace an existing bundle at --output (only a folder holding a herd manifest; never the model
    /// folder, a folder containing it, a file, a device or a symlink).
    #[arg(long)]
    pub force: bool,
    /// Print (or write to --dump-dir) the IR after this pass; repeatable. Passes: irope, expert_fusion,
    /// quantize, calibrate.
    #[arg(long = "dump-ir-after", value_name = "PASS")]
    pub dump_ir_after: Vec<String>,
    /// Folder for --dump-ir-after files (PASS.ir, replaced if present) instead of stdout; created if missing.
    #[arg(long)]
    pub dump_dir: Option<PathBuf>,
    /// Skip a pass (for debugging; the compile then fails if anything is left unlowered); repeatable.
    #[arg(long = "disable-pass", value_name = "PASS")]
    pub disable_pass: Vec<String>,
    /// Print the ONNX op counts per layer after compiling.
    #[arg(long)]
    pub node_counts: bool,
    /// With --quant: also compile the unquantized model (f32, in a temporary folder) and measure the KL
    /// divergence and top-1 agreement of next-token distributions against it, over the checkpoint's
    /// golden prompts (when present) and random prompts; printed and stored in the manifest.
    #[arg(long, requires = "quant")]
    pub report: bool,
    /// Print the compile summary as one JSON object on stdout (stages, bytes, peak memory).
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
/// `--method`, defaulting to GPTQ when int weights come with `--calibrate`.
fn quant_method(args: &CompileArgs) -> Result<crate::driver::QuantMethod> {
    use crate::driver::QuantMethod;
    let int = args.quant.is_some_and(|q| q.block().is_some());
    Ok(match (args.method, int) {
        (Some(MethodArg::Gptq), true) => QuantMethod::Gptq,
        (Some(MethodArg::Awq), true) => QuantMethod::Awq,
        (Some(_), false) => anyhow::bail!(
            "--method applies to --quant int4/int8; fp8 is rounded to nearest (its activations are calibrated with --calibrate for TensorRT)"
        ),
        (Some(MethodArg::Rtn), true) if args.calibrate.is_some() => anyhow::bail!(
            "--calibrate with --method rtn: round-to-nearest uses no calibration data; drop one of them"
        ),
        (Some(MethodArg::Rtn), true) => QuantMethod::Rtn,
        (None, true) if args.calibrate.is_some() => QuantMethod::Gptq,
        (None, _) => QuantMethod::Rtn,
    })
}

pub fn run(args: &CompileArgs) -> Result<()> {
    // Nothing in the bundle grows with the context (rotary angles are computed from the positions);
    // the graph counts positions in f32 (rotary angles, NoPE temperature, as transformers does),
    // exact up to 2^24, above Scout's 10M.
    const MAX_CONTEXT: usize = 1 << 24;
    if args.max_context == 0 || args.max_context > MAX_CONTEXT {
        anyhow::bail!(
            "--max-context {}: use 1 to {MAX_CONTEXT} (positions are counted exactly in f32 up to 2^24)",
            args.max_context
        );
    }
    let options = compile_options(args)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("writing weights");
    let report = compile(&options, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let report = report?;
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    if args.report {
        accuracy_report(args, &options, &report.bundle)?;
    }
    if args.json {
        print_json(&report)
    } else {
        print_summary(args, &options, &report)
    }
}

/// The driver's options from the command line.
fn compile_options(args: &CompileArgs) -> Result<CompileOptions> {
    let tensorrt = args.target == TargetArg::TensorrtH100;
    let calibration_prompts = args
        .calibrate
        .as_deref()
        .filter(|p| *p != std::path::Path::new("builtin"))
        .map(crate::driver::read_calibration_prompts)
        .transpose()?;
    let quant_method = quant_method(args)?;
    let dtype = args.dtype.unwrap_or(if tensorrt {
        DtypeArg::F16
    } else {
        DtypeArg::F32
    });
    Ok(CompileOptions {
        model: args.model.clone(),
        output: args.output.clone(),
        moe: args
            .moe
            .unwrap_or(if tensorrt { MoeArg::Cuda } else { MoeArg::Ort })
            .lowering(),
        dtype: dtype.dtype(),
        max_context: args.max_context,
        quant: args
            .quant
            .map(|scheme| herd_passes::quantize::QuantOptions {
                scheme,
                scale_dtype: if dtype == DtypeArg::F32 {
                    DType::F32
                } else {
                    DType::F16
                },
                search: match args.scales {
                    ScalesArg::Clip => herd_ir::quant::ScaleSearch::Clip,
                    ScalesArg::Absmax => herd_ir::quant::ScaleSearch::Absmax,
                },
                head: head_quantized(scheme, args.keep_head),
                embeddings: head_quantized(scheme, args.keep_head) && !tensorrt,
                keep: args.quant_keep.clone(),
            }),
        tensorrt: tensorrt.then(|| TensorRtOptions {
            max_batch: args.max_batch,
            max_seq: args.max_seq.min(args.max_context),
            allow_lint: args.allow_lint.clone(),
        }),
        force: args.force,
        vision: !args.text_only,
        max_tiles: args.max_tiles.map(usize::from),
        max_images: args.max_images.into(),
        run: RunOptions {
            disabled: args.disable_pass.clone(),
            dump_after: args.dump_ir_after.clone(),
        },
        dump_dir: args.dump_dir.clone(),
        calibration_prompts,
        calibration_window_layers: args.calibration_window.into(),
        quant_method,
        expose_calibration: None,
        stages: match (args.stages, &args.stage_layers) {
            (_, Some(text)) => StageSplit::Layers(
                herd_ir::split::parse_ranges(text)
                    .map_err(|e| anyhow::anyhow!("--stage-layers {text}: {e}"))?,
            ),
            (Some(n), None) if n > 1 => StageSplit::Balanced(n),
            (Some(0), None) => anyhow::bail!("--stages 0: use 1 or more"),
            _ => StageSplit::One,
        },
    })
}

/// `--json`: the report as one JSON object on stdout.
fn print_json(report: &CompileReport) -> Result<()> {
    let stages: serde_json::Map<String, serde_json::Value> = report
        .stages
        .iter()
        .map(|(s, d)| (s.clone(), d.as_secs_f64().into()))
        .collect();
    let summary = serde_json::json!({
        "bundle": report.bundle,
        "stage_seconds": stages,
        "total_seconds": report.stages.iter().map(|(_, d)| d.as_secs_f64()).sum::<f64>(),
        "checkpoint_bytes": report.checkpoint_bytes,
        "bytes_written": report.bytes_written,
        "peak_rss_bytes": report.peak_rss_bytes,
        "stages": report.pipeline.iter().map(|(plan, emitted)| serde_json::json!({
            "first_layer": plan.first_layer,
            "end_layer": plan.end_layer,
            "weight_bytes": emitted,
            "kv_bytes": plan.kv_bytes,
        })).collect::<Vec<_>>(),
    });
    outln!("{summary}");
    Ok(())
}

/// The report for a reader, on stderr (`--node-counts` on stdout).
fn print_summary(
    args: &CompileArgs,
    options: &CompileOptions,
    report: &CompileReport,
) -> Result<()> {
    eprintln!(
        "compiled {} -> {}",
        args.model.display(),
        report.bundle.display()
    );
    for (stage, elapsed) in &report.stages {
        eprintln!("  {stage:<22} {:>9.1} ms", elapsed.as_secs_f64() * 1e3);
    }
    eprintln!("  bytes written          {:>12}", report.bytes_written);
    match report.peak_rss_bytes {
        Some(b) => eprintln!(
            "  peak memory (RSS)      {:>9.1} MiB",
            b as f64 / (1 << 20) as f64
        ),
        None => eprintln!("  peak memory (RSS)      unknown on this OS"),
    }
    if report.pipeline.len() > 1 {
        let batch = options.tensorrt.as_ref().map_or(1, |t| t.max_batch);
        eprintln!(
            "  pipeline stages (KV at context {}, batch {batch}):",
            options.max_context
        );
        for (k, (plan, emitted)) in report.pipeline.iter().enumerate() {
            eprintln!(
                "    stage {k}: layers {:>3}..{:<3} weights {:>10.3} GB  KV {:>10.3} GB",
                plan.first_layer,
                plan.end_layer,
                *emitted as f64 / 1e9,
                plan.kv_bytes as f64 / 1e9
            );
        }
    }
    if args.node_counts {
        for (layer, counts) in &report.node_counts {
            let label = layer.map_or("outside layers".to_string(), |l| format!("layer {l}"));
            let list: Vec<String> = counts.iter().map(|(op, n)| format!("{op}x{n}")).collect();
            outln!("{label}: {}", list.join(" "));
        }
    }
    Ok(())
}

fn parse_quant(text: &str) -> Result<herd_ir::quant::QuantScheme, String> {
    herd_ir::quant::QuantScheme::parse(text)
}

/// Compiles the unquantized reference, compares, prints and stores the result (`--report`).
fn accuracy_report(
    args: &CompileArgs,
    options: &CompileOptions,
    bundle: &std::path::Path,
) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("herd-report").tempdir()?;
    let reference = CompileOptions {
        moe: options.moe,
        max_context: options.max_context,
        ..CompileOptions::new(options.model.clone(), tmp.path().join("reference"))
    };
    eprintln!("report: compiling the unquantized reference");
    let reference = compile(&reference, &mut |_, _| {})?.bundle;
    let exact = herd_runtime::RuntimeOptions {
        int8_activations: Some(false),
        ..Default::default()
    };
    let against_reference = |candidate: &std::path::Path| {
        crate::eval::compare_bundles(
            candidate,
            &exact,
            &reference,
            Some(&args.model),
            "unquantized f32 (compile --report)",
        )
    };
    // A variant of this compile (other options, its own folder), measured the same way.
    let variant = |variant: &CompileOptions| -> Result<herd_runtime::manifest::Accuracy> {
        against_reference(&compile(variant, &mut |_, _| {})?.bundle)
    };
    let accuracy = against_reference(bundle)?;
    let rtn = match options.quant_method {
        crate::driver::QuantMethod::Rtn => None,
        method => {
            eprintln!(
                "report: compiling the same scheme rounded to nearest, beside {}",
                method.name()
            );
            let rtn = CompileOptions {
                output: tmp.path().join("rtn"),
                quant_method: crate::driver::QuantMethod::Rtn,
                force: false,
                ..options.clone()
            };
            Some(variant(&rtn)?)
        }
    };
    let head_kept = match &options.quant {
        Some(q) if q.head => {
            eprintln!("report: compiling the same bundle with lm_head and the embeddings in float");
            let kept = CompileOptions {
                output: tmp.path().join("head-kept"),
                quant: Some(herd_passes::quantize::QuantOptions {
                    head: false,
                    embeddings: false,
                    ..q.clone()
                }),
                force: false,
                ..options.clone()
            };
            Some(variant(&kept)?)
        }
        _ => None,
    };
    crate::eval::store(bundle, &accuracy, rtn.as_ref(), head_kept.as_ref())?;
    let manifest = herd_runtime::Bundle::open(bundle)?.manifest;
    let sqnr: Vec<f64> = manifest
        .quantization
        .iter()
        .flat_map(|q| q.sqnr_db.values().copied())
        .collect();
    let min = sqnr.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = sqnr.iter().sum::<f64>() / sqnr.len().max(1) as f64;
    eprintln!("report: {} quantized tensors, SQNR mean {mean:.1} dB, min {min:.1} dB (per tensor in manifest.json)", sqnr.len());
    match &rtn {
        Some(rtn) => {
            eprintln!("report: rtn: {}", crate::eval::describe(rtn));
            eprintln!(
                "report: {}: {}",
                options.quant_method.name(),
                crate::eval::describe(&accuracy)
            );
        }
        None => eprintln!("report: {}", crate::eval::describe(&accuracy)),
    }
    if let Some(kept) = &head_kept {
        eprintln!(
            "report: with lm_head and the embeddings in float (--keep-head): {}",
            crate::eval::describe(kept)
        );
    }
    Ok(())
}

/// Whether lm_head (and on the ONNX target the embedding table) is quantized: by default for int4/int8.
/// fp8 keeps them: its calibration does not cover lm_head's input, and TensorRT's own FP8 recipes
/// leave the head in higher precision too.
pub fn head_quantized(scheme: herd_ir::quant::QuantScheme, keep_head: bool) -> bool {
    !keep_head && !matches!(scheme, herd_ir::quant::QuantScheme::Fp8)
}
