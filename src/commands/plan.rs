//! `herd plan MODEL_DIR_OR_BUNDLE --gpu ...`: whether a model, scheme, batch and context fit the GPUs,
//! and the decode and prefill speed the hardware allows, before any download of weights or engine build.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use herd_ir::quant::QuantScheme;
use herd_ir::{DType, Llama4Config};
use herd_runtime::manifest::ElementType;

use super::compile::{head_quantized, DtypeArg, TargetArg};
use crate::plan::{self, PlanInput, GPUS};

/// KV cache element type.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KvDtypeArg {
    F16,
    /// 1 byte per value (planning only: herd's bundles keep the cache in the compute dtype today).
    Fp8,
}

/// Arguments of `herd plan`.
#[derive(Args)]
pub struct PlanArgs {
    /// A checkpoint folder (only its config.json is read: no weights needed) or a compiled bundle
    /// (weight bytes then come from its initializers; dtype and scheme from its manifest).
    pub path: PathBuf,
    /// GPU model: h100-80gb (SXM), h100-pcie-80gb, h100-nvl-94gb, h200-141gb.
    #[arg(long, default_value = "h100-80gb")]
    pub gpu: String,
    /// GPUs to split the layers over as pipeline stages (`herd compile --stages N` makes the same
    /// split): each stage must fit its own GPU.
    #[arg(long, default_value_t = 1)]
    pub gpus: u64,
    /// Weight quantization, as `herd compile --quant` (int4[:B], int8[:B], fp8); a checkpoint only.
    #[arg(long)]
    pub quant: Option<String>,
    /// As `herd compile --keep-head`: lm_head and the embedding table in the compute dtype under
    /// int4/int8; a checkpoint only.
    #[arg(long, requires = "quant")]
    pub keep_head: bool,
    /// As `herd compile --target`: the embedding table stays in the compute dtype on tensorrt-h100
    /// (its parser has no quantized Gather); a checkpoint only.
    #[arg(long, value_enum, default_value = "onnx")]
    pub target: TargetArg,
    /// Compute dtype of the bundle; a checkpoint only.
    #[arg(long, value_enum, default_value = "f16")]
    pub dtype: DtypeArg,
    #[arg(long, value_enum, default_value = "f16")]
    pub kv_dtype: KvDtypeArg,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    pub batch: u64,
    /// Tokens per sequence (prompt + generation); also the compile's --max-context.
    #[arg(long, default_value_t = 131_072)]
    pub context: u64,
    /// New tokens per call (the TensorRT profile's --max-seq): sizes the largest call's activations.
    #[arg(long, default_value_t = 256)]
    pub max_seq: u64,
    /// Print one JSON object with stable keys instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub fn run(args: &PlanArgs) -> Result<()> {
    let gpu = GPUS
        .iter()
        .find(|g| g.name == args.gpu)
        .copied()
        .with_context(|| {
            let known: Vec<&str> = GPUS.iter().map(|g| g.name).collect();
            format!(
                "--gpu {}: unknown GPU; use one of {}",
                args.gpu,
                known.join(", ")
            )
        })?;
    anyhow::ensure!(
        args.gpus >= 1 && args.gpus <= 1024,
        "--gpus {}: use 1 to 1024",
        args.gpus
    );
    anyhow::ensure!(
        args.batch >= 1 && args.batch <= 4096,
        "--batch {}: use 1 to 4096",
        args.batch
    );
    anyhow::ensure!(
        (1..=plan::CONTEXT_LIMIT).contains(&args.context),
        "--context {}: use 1 to {}",
        args.context,
        plan::CONTEXT_LIMIT
    );
    anyhow::ensure!(
        args.max_seq >= 1 && args.max_seq <= args.context,
        "--max-seq {}: use 1 to --context ({})",
        args.max_seq,
        args.context
    );
    let bundle_manifest = args.path.join("manifest.json");
    let (config, weights, input) = if bundle_manifest.is_file() {
        anyhow::ensure!(
            args.quant.is_none() && args.target == TargetArg::Onnx,
            "--quant, --keep-head and --target are for a checkpoint: a bundle's scheme and target \
             are in its manifest"
        );
        let bundle = herd_runtime::Bundle::open(&args.path)?;
        let m = &bundle.manifest;
        let config: Llama4Config = serde_json::from_value(m.model.config.clone())
            .context("the bundle's manifest holds no readable model config")?;
        anyhow::ensure!(
            config.num_layers == m.model.num_layers && config.uses_rope.len() == config.num_layers,
            "{}: the manifest's model config disagrees with its {} layers; recompile the bundle",
            bundle_manifest.display(),
            m.model.num_layers
        );
        let dtype = match m.dtype {
            ElementType::F32 => DType::F32,
            ElementType::F16 => DType::F16,
            ElementType::Bf16 => DType::BF16,
        };
        let quant = m
            .quantization
            .as_ref()
            .map(|q| QuantScheme::parse(&q.scheme))
            .transpose()
            .map_err(|e| anyhow::anyhow!("the bundle's quantization scheme: {e}"))?;
        let files: Vec<String> = m.stage_list().into_iter().map(|s| s.model_file).collect();
        let weights = plan::bundle_weights(
            &args.path,
            &files,
            m.vision.as_ref().map(|v| v.model_file.as_str()),
            config.num_layers,
        )?;
        (config, weights, input(args, gpu, dtype, quant))
    } else {
        let config_path = args.path.join("config.json");
        let config = Llama4Config::from_file(&config_path)?;
        let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path)?)
            .with_context(|| format!("{}: invalid JSON", config_path.display()))?;
        let quant = args
            .quant
            .as_deref()
            .map(QuantScheme::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--quant: {e}"))?;
        let input = input(args, gpu, args.dtype.dtype(), quant);
        let prequant = plan::prequantized_fp8_experts(&raw);
        let weights = (
            plan::config_weights(&config, &input, prequant),
            plan::config_layer_weights(&config, &input, prequant),
        );
        (config, weights, input)
    };
    let (parts, layer_weights) = weights;
    let report = plan::plan(&config, parts, &layer_weights, &input);
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        out!("{}", render(&report));
    }
    Ok(())
}

fn input(args: &PlanArgs, gpu: plan::Gpu, dtype: DType, quant: Option<QuantScheme>) -> PlanInput {
    let quantized_head = quant.is_some_and(|q| head_quantized(q, args.keep_head));
    PlanInput {
        gpu,
        gpus: args.gpus,
        dtype,
        quant,
        quantized_head,
        quantized_embeddings: quantized_head && args.target == TargetArg::Onnx,
        kv_bytes_per_value: match args.kv_dtype {
            KvDtypeArg::F16 => 2,
            KvDtypeArg::Fp8 => 1,
        },
        batch: args.batch,
        context: args.context,
        max_seq: args.max_seq,
    }
}

/// The plan as a table a person reads.
fn render(p: &plan::Plan) -> String {
    let gb = |b: u64| format!("{:.2} GB", b as f64 / 1e9);
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<34} {v}\n"));
    line(
        "gpu",
        format!(
            "{} x {} ({} each, {:.2} TB/s, {:.0} TFLOP/s dense fp16; {:.0}% usable)",
            p.gpus,
            p.gpu.name,
            gb(p.gpu.memory_bytes),
            p.gpu.bandwidth_bytes_per_s / 1e12,
            p.gpu.fp16_flops_per_s / 1e12,
            p.usable_fraction * 100.0
        ),
    );
    line(
        "model",
        format!(
            "{} weights{}, batch {}, context {}, {} new tokens per call",
            p.dtype,
            p.quant
                .as_ref()
                .map_or(String::new(), |q| format!(" quantized {q}")),
            p.batch,
            p.context,
            p.max_seq
        ),
    );
    line("weight_bytes", gb(p.weight_bytes));
    for (part, bytes) in &p.weight_bytes_by_part {
        line(&format!("  {part}"), gb(*bytes));
    }
    line(
        "kv_bytes",
        format!("{} ({} B per token)", gb(p.kv_bytes), p.kv_bytes_per_token),
    );
    line("activation_peak_bytes", gb(p.activation_peak_bytes));
    line("total", gb(p.total_bytes));
    line("gpus_needed", p.gpus_needed.to_string());
    line("fits", p.fits.to_string());
    if p.stages.len() > 1 {
        for (k, s) in p.stages.iter().enumerate() {
            line(
                &format!("  stage {k}"),
                format!(
                    "layers {}..{}: weights {} + KV {} + activations {} = {}{}",
                    s.first_layer,
                    s.end_layer,
                    gb(s.weight_bytes),
                    gb(s.kv_bytes),
                    gb(s.activation_peak_bytes),
                    gb(s.total_bytes),
                    if s.fits { "" } else { "  DOES NOT FIT" }
                ),
            );
        }
    }
    line("max_context", p.max_context.to_string());
    line("decode.bytes_per_step", gb(p.decode.bytes_per_step));
    line(
        "decode.flops_per_step",
        format!("{:.3e}", p.decode.flops_per_step),
    );
    line(
        "decode.roofline_tokens_per_s",
        format!(
            "{:.1} ({}-bound)",
            p.decode.roofline_tokens_per_s, p.decode.bound
        ),
    );
    line(
        "prefill.flops_per_token",
        format!("{:.3e}", p.prefill.flops_per_token),
    );
    line(
        "prefill.roofline_tokens_per_s",
        format!("{:.0}", p.prefill.roofline_tokens_per_s),
    );
    out
}
