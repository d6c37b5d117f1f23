//! The TensorRT side of a compile: options the target refuses up front, then the lint of every
//! emitted graph and the manifest's TensorRT section (profiles per graph, expected CUDA EP partition).

use std::path::Path;

use anyhow::Result;
use herd_runtime::manifest::{CudaPartition, TensorRtInfo};
use herd_targets::onnx::MoeLowering;
use herd_targets::tensorrt::ProfileInputs;

use super::decoder::EmittedDecoder;
use super::{CompileOptions, TensorRtOptions};

/// Refuses options the TensorRT target cannot honour, before any work is done.
pub(super) fn check_tensorrt(options: &CompileOptions, trt: &TensorRtOptions) -> Result<()> {
    if options.moe == MoeLowering::Ort {
        anyhow::bail!(
            "--target tensorrt-h100 takes --moe cuda (MoE nodes on the CUDA EP beside TensorRT) or --moe grouped (standard ops only); --moe ort is for ONNX Runtime's CPU kernels"
        );
    }
    if let Some(q) = &options.quant {
        use herd_ir::quant::QuantScheme;
        match q.scheme {
            QuantScheme::Int4 { block: 64 | 128 } => {}
            QuantScheme::Int4 { block } => {
                anyhow::bail!("--quant int4:{block}: TensorRT takes INT4 blocks of 64 or 128; use int4:64 or int4:128")
            }
            QuantScheme::Int8 { .. } => {
                anyhow::bail!("--quant int8: TensorRT takes block quantization for INT4 weights only; use int4:64 or int4:128")
            }
            // fp8 projections get calibrated per-tensor activation Q/DQ (see `calibrate`).
            QuantScheme::Fp8 => {}
        }
    }
    for rule in &trt.allow_lint {
        if !herd_targets::tensorrt::RULES.iter().any(|(r, _)| r == rule) {
            let known: Vec<&str> = herd_targets::tensorrt::RULES
                .iter()
                .map(|(r, _)| *r)
                .collect();
            anyhow::bail!(
                "--allow-lint {rule}: no such rule; rules are {}",
                known.join(", ")
            );
        }
    }
    if trt.max_batch == 0 || trt.max_seq == 0 || trt.max_seq > options.max_context {
        anyhow::bail!(
            "--max-batch and --max-seq must be positive, and --max-seq at most --max-context ({})",
            options.max_context
        );
    }
    Ok(())
}

/// The TensorRT stage of a compile: lints the emitted graphs (the MoE nodes of `--moe cuda` left to the
/// CUDA EP), and returns the manifest's TensorRT section (stage 0's profile for the decoder) with each
/// pipeline stage's profile.
pub(super) fn tensorrt_stage(
    options: &CompileOptions,
    trt: &TensorRtOptions,
    config: &herd_ir::config::Llama4Config,
    dir: &Path,
    decoder: &EmittedDecoder,
    vision_model: Option<&herd_targets::onnx::OnnxModel>,
    max_tiles: Option<usize>,
) -> Result<(TensorRtInfo, Vec<[String; 3]>)> {
    let cuda_ep = options.moe == MoeLowering::Cuda;
    let mut violations = Vec::new();
    let mut part = herd_targets::tensorrt::Partition::default();
    for (_, model) in &decoder.stages {
        let report = herd_targets::tensorrt::lint_file_with(&dir.join(&model.model_file), cuda_ep)?;
        violations.extend(report.violations);
        part.tensorrt_subgraphs += report.partition.tensorrt_subgraphs;
        part.tensorrt_nodes += report.partition.tensorrt_nodes;
        part.cuda_nodes += report.partition.cuda_nodes;
        part.boundary_tensors += report.partition.boundary_tensors;
    }
    if let Some(v) = vision_model {
        violations.extend(herd_targets::tensorrt::lint_file(&dir.join(&v.model_file))?);
    }
    let blocking: Vec<String> = violations
        .iter()
        .filter(|v| !trt.allow_lint.iter().any(|r| r == v.rule))
        .map(|v| v.to_string())
        .collect();
    if !blocking.is_empty() {
        anyhow::bail!(
            "the graph breaks {} TensorRT rule(s) (allow one with --allow-lint RULE):\n  {}",
            blocking.len(),
            blocking.join("\n  ")
        );
    }
    let h = config.hidden_size;
    let last = decoder.stages.len() - 1;
    let mut profiles = Vec::with_capacity(decoder.stages.len());
    for (k, (_, model)) in decoder.stages.iter().enumerate() {
        let kv = model
            .io
            .kv
            .iter()
            .flat_map(|k| [(k.past_key.clone(), k.ring), (k.past_value.clone(), k.ring)])
            .collect();
        let mut inputs = ProfileInputs::decoder(kv, config.num_kv_heads, config.head_dim);
        inputs.tokens.retain(|(name, _)| match name.as_str() {
            "input_ids" => k == 0,
            "logits_index" => k == last,
            _ => true,
        });
        if k > 0 {
            inputs
                .tokens
                .insert(0, (herd_ir::split::HIDDEN_IN.to_string(), vec![h]));
        }
        let mut p = herd_targets::tensorrt::profiles(
            &inputs,
            trt.max_batch,
            trt.max_seq,
            options.max_context,
        );
        if k == 0 && vision_model.is_some() {
            // Image feature rows arrive with prompt tokens: none in decode, up to a full call.
            let rows = |n: usize| {
                format!(
                    ",{}:{n}x{h},{}:{n}",
                    herd_ir::import::IMAGE_FEATURES_INPUT,
                    herd_ir::import::IMAGE_POSITIONS_INPUT
                )
            };
            p.min.push_str(&rows(0));
            p.opt.push_str(&rows(0));
            p.max.push_str(&rows(trt.max_batch * trt.max_seq));
        }
        profiles.push([p.min, p.opt, p.max]);
    }
    let vision_profile_shapes = config
        .vision
        .as_ref()
        .filter(|_| vision_model.is_some())
        .map(|v| {
            let tiles = |n: usize| {
                format!(
                    "{}:{n}x{}x{t}x{t}",
                    herd_ir::vision::PIXEL_VALUES,
                    v.num_channels,
                    t = v.image_size
                )
            };
            let per_image = max_tiles.unwrap_or(16) + 1;
            [
                tiles(1),
                tiles(per_image),
                tiles(per_image * options.max_images),
            ]
        });
    let [min, opt, max] = profiles[0].clone();
    let info = TensorRtInfo {
        profile_min_shapes: min,
        profile_opt_shapes: opt,
        profile_max_shapes: max,
        min_tensorrt: "10.15".into(),
        compute_capability: herd_targets::tensorrt::H100_COMPUTE_CAPABILITY.into(),
        strongly_typed: options.quant.is_some(),
        allowed_lint: trt.allow_lint.clone(),
        vision_profile_shapes,
        engine: None,
        cuda_partition: cuda_ep.then_some(CudaPartition {
            tensorrt_subgraphs: part.tensorrt_subgraphs,
            tensorrt_nodes: part.tensorrt_nodes,
            cuda_nodes: part.cuda_nodes,
            boundary_tensors: part.boundary_tensors,
        }),
    };
    Ok((info, profiles))
}
