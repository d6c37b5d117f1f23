//! `herd plan`: what a deployment costs, from `config.json` alone or from a compiled bundle: weight bytes
//! by part, the KV cache by the iRoPE bound, the activations of the largest call, how many GPUs hold it,
//! the longest context that fits, and decode/prefill rooflines from the GPU's datasheet figures.
//!
//! Weight bytes follow what `herd compile` writes: quantized matrices (attention, experts, shared
//! expert, dense MLP) as codes plus one scale per block (int4/int8) or per output channel (fp8) in the
//! compute dtype; lm_head and the embedding table likewise when the input says they are quantized
//! ([`PlanInput::quantized_head`]), else in the compute dtype; router and norms in the compute dtype
//! (rotary angles are computed in the graph: only the inverse frequencies are stored); the experts
//! of a compressed-tensors fp8 checkpoint as fp8 with f32 channel scales. A bundle's figures are read
//! from its initializers instead (a test holds the two equal).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use herd_ir::quant::QuantScheme;
use herd_ir::{DType, Llama4Config};
use serde::Serialize;

/// One GPU's datasheet figures (dense tensor-core rates, no sparsity).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Gpu {
    pub name: &'static str,
    /// Memory as the driver reports it (`nvidia-smi` total).
    pub memory_bytes: u64,
    /// HBM bandwidth.
    pub bandwidth_bytes_per_s: f64,
    /// Dense FP16/BF16 tensor-core rate.
    pub fp16_flops_per_s: f64,
}

/// The GPUs `--gpu` knows.
pub const GPUS: [Gpu; 4] = [
    Gpu {
        name: "h100-80gb",
        memory_bytes: 81_559 << 20,
        bandwidth_bytes_per_s: 3.35e12,
        fp16_flops_per_s: 989e12,
    },
    Gpu {
        name: "h100-pcie-80gb",
        memory_bytes: 81_559 << 20,
        bandwidth_bytes_per_s: 2.0e12,
        fp16_flops_per_s: 756e12,
    },
    Gpu {
        name: "h100-nvl-94gb",
        memory_bytes: 95_830 << 20,
        bandwidth_bytes_per_s: 3.9e12,
        fp16_flops_per_s: 835e12,
    },
    Gpu {
        name: "h200-141gb",
        memory_bytes: 143_771 << 20,
        bandwidth_bytes_per_s: 4.8e12,
        fp16_flops_per_s: 989e12,
    },
];

/// Share of a GPU's memory herd plans to use: the rest is the CUDA context, TensorRT's workspace and
/// allocator slack (a rule of thumb, not a measurement).
pub const USABLE_FRACTION: f64 = 0.9;

/// The longest context `max_context` searches (Scout's advertised 10M tokens).
pub const CONTEXT_LIMIT: u64 = 10 << 20;

/// What to plan for.
#[derive(Clone, Debug)]
pub struct PlanInput {
    pub gpu: Gpu,
    pub gpus: u64,
    pub dtype: DType,
    pub quant: Option<QuantScheme>,
    /// lm_head stored with `quant` (`herd compile`'s default for int4/int8 unless `--keep-head`).
    pub quantized_head: bool,
    /// The embedding table stored with `quant` (as the head, on the ONNX target only).
    pub quantized_embeddings: bool,
    pub kv_bytes_per_value: u64,
    pub batch: u64,
    pub context: u64,
    pub max_seq: u64,
}

/// Weight bytes by part.
pub type WeightParts = BTreeMap<&'static str, u64>;

/// The names of the parts, in report order.
pub const PARTS: [&str; 8] = [
    "experts",
    "shared_expert_and_router",
    "attention",
    "dense_mlp",
    "embeddings",
    "lm_head",
    "norms_and_tables",
    "vision",
];

/// Bytes of a [K, N] matrix stored with `quant` (scales in `scale_dtype`) or in `dtype`.
fn matrix_bytes(k: u64, n: u64, quant: Option<QuantScheme>, dtype: DType, scale: DType) -> u64 {
    let sb = scale.bits() as u64 / 8;
    match quant {
        None => k * n * dtype.bits() as u64 / 8,
        Some(QuantScheme::Int4 { block }) => k * n / 2 + k * n / block as u64 * sb,
        Some(QuantScheme::Int8 { block }) => k * n + k * n / block as u64 * sb,
        Some(QuantScheme::Fp8) => k * n + n * sb,
    }
}

/// Whether `config.json` declares compressed-tensors fp8 experts (as Llama-4-Maverick-FP8 does).
pub fn prequantized_fp8_experts(config_json: &serde_json::Value) -> bool {
    let q = config_json
        .get("quantization_config")
        .or_else(|| config_json.get("text_config")?.get("quantization_config"));
    q.and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str())
        == Some("compressed-tensors")
}

/// Weight bytes by part of decoder layer `layer` of `config` compiled with `input`'s dtype and scheme.
fn layer_parts(
    config: &Llama4Config,
    input: &PlanInput,
    prequant_fp8: bool,
    layer: usize,
) -> [(&'static str, u64); 5] {
    let h = config.hidden_size as u64;
    let (nh, nkv, d) = (
        config.num_heads as u64,
        config.num_kv_heads as u64,
        config.head_dim as u64,
    );
    let (i, i_mlp, e) = (
        config.intermediate_size as u64,
        config.intermediate_size_mlp as u64,
        config.num_experts as u64,
    );
    let t = input.dtype;
    let m = |k: u64, n: u64| matrix_bytes(k, n, input.quant, t, t);
    let float = |n: u64| n * t.bits() as u64 / 8;
    let (experts, shared, dense) = if config.is_moe_layer(layer) {
        let expert = if prequant_fp8 {
            matrix_bytes(h, 2 * i, Some(QuantScheme::Fp8), t, DType::F32)
                + matrix_bytes(i, h, Some(QuantScheme::Fp8), t, DType::F32)
        } else {
            m(h, 2 * i) + m(i, h)
        };
        (e * expert, m(h, 2 * i) + m(i, h) + float(h * e), 0)
    } else {
        (0, 0, m(h, 2 * i_mlp) + m(i_mlp, h))
    };
    [
        ("attention", m(h, (nh + 2 * nkv) * d) + m(nh * d, h)),
        ("norms_and_tables", float(2 * h)),
        ("experts", experts),
        ("shared_expert_and_router", shared),
        ("dense_mlp", dense),
    ]
}

/// Weight bytes by part of `config` compiled with `input`'s dtype and scheme.
pub fn config_weights(config: &Llama4Config, input: &PlanInput, prequant_fp8: bool) -> WeightParts {
    let (h, v) = (config.hidden_size as u64, config.vocab_size as u64);
    let t = input.dtype;
    let float = |n: u64| n * t.bits() as u64 / 8;
    let mut parts: WeightParts = PARTS.iter().map(|p| (*p, 0)).collect();
    for layer in 0..config.num_layers {
        for (part, bytes) in layer_parts(config, input, prequant_fp8, layer) {
            *parts.get_mut(part).unwrap() += bytes;
        }
    }
    let (table, head) = head_bytes(h, v, input);
    *parts.get_mut("embeddings").unwrap() += table;
    *parts.get_mut("lm_head").unwrap() += head;
    *parts.get_mut("norms_and_tables").unwrap() += float(h);
    // No rotary tables: the angles are computed from the positions in the graph, whose inverse
    // frequencies (a few hundred bytes) sit inline in the model file like the other small constants.
    if let Some(vision) = &config.vision {
        *parts.get_mut("vision").unwrap() += float(vision_values(vision, h));
    }
    parts
}

/// Weight bytes by pipeline stage place of `config` compiled with `input` (see [`LayerWeights`]).
pub fn config_layer_weights(
    config: &Llama4Config,
    input: &PlanInput,
    prequant_fp8: bool,
) -> LayerWeights {
    let (h, v) = (config.hidden_size as u64, config.vocab_size as u64);
    let float = |n: u64| n * input.dtype.bits() as u64 / 8;
    let vision = config
        .vision
        .as_ref()
        .map_or(0, |vc| float(vision_values(vc, h)));
    LayerWeights {
        layers: (0..config.num_layers)
            .map(|l| {
                layer_parts(config, input, prequant_fp8, l)
                    .iter()
                    .map(|(_, b)| b)
                    .sum()
            })
            .collect(),
        first: head_bytes(h, v, input).0 + vision,
        last: head_bytes(h, v, input).1 + float(h),
    }
}

/// Bytes of the embedding table [V, H] and of lm_head [H, V]: quantized as the input says (the
/// table's blocks run along H, as lm_head's along its K = H, so both store V x H codes and V x H / B
/// scales), else in the compute dtype.
fn head_bytes(h: u64, v: u64, input: &PlanInput) -> (u64, u64) {
    let t = input.dtype;
    let stored = |quantized: bool| matrix_bytes(h, v, input.quant.filter(|_| quantized), t, t);
    (
        stored(input.quantized_embeddings),
        stored(input.quantized_head),
    )
}

/// Values of the vision encoder, adapter and projector (kept in the compute dtype), for a text
/// hidden size of `text_hidden`.
fn vision_values(v: &herd_ir::config::VisionConfig, text_hidden: u64) -> u64 {
    let (h, i) = (v.hidden_size as u64, v.intermediate_size as u64);
    let positions = (v.grid() * v.grid()) as u64 + 1;
    let head_dim = h / v.num_heads.max(1) as u64;
    let patch = (v.num_channels * v.patch_size * v.patch_size) as u64 * h;
    // Per layer: two LayerNorms, q/k/v/o with biases, the MLP with biases.
    let layer = 4 * h + 4 * (h * h + h) + (h * i + i) + (i * h + h);
    let adapter = i * v.projector_input_dim as u64
        + v.projector_input_dim as u64 * v.projector_output_dim as u64;
    let projector = v.vision_output_dim as u64 * text_hidden;
    patch
        + h
        + positions * h
        + 4 * h
        + v.num_layers as u64 * layer
        + 2 * positions * (head_dim / 2)
        + adapter
        + projector
}

/// Weight bytes by part of a compiled bundle, from its decoder's initializers (names say the part),
/// and by pipeline stage place: per decoder layer, the first stage's (embeddings, vision), the last's.
pub fn bundle_weights(
    bundle: &Path,
    decoder_files: &[String],
    vision_file: Option<&str>,
    num_layers: usize,
) -> Result<(WeightParts, LayerWeights)> {
    let mut parts: WeightParts = PARTS.iter().map(|p| (*p, 0)).collect();
    let mut layers = LayerWeights {
        layers: vec![0; num_layers],
        first: 0,
        last: 0,
    };
    for file in decoder_files {
        for (name, length) in herd_targets::onnx::external_initializers(&bundle.join(file))? {
            let part = part_of(&name);
            *parts.entry(part).or_default() += length;
            let layer = name
                .split("layers.")
                .nth(1)
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|&i| i < num_layers);
            match (layer, part) {
                (Some(i), _) => layers.layers[i] += length,
                (None, "embeddings") => layers.first += length,
                (None, _) => layers.last += length,
            }
        }
    }
    if let Some(file) = vision_file {
        for (_, length) in herd_targets::onnx::external_initializers(&bundle.join(file))? {
            *parts.entry("vision").or_default() += length;
            layers.first += length;
        }
    }
    Ok((parts, layers))
}

/// The part an initializer belongs to, by the names the emitter gives.
fn part_of(name: &str) -> &'static str {
    if name.contains(".moe.fc1") || name.contains(".moe.fc2") {
        "experts"
    } else if name.contains(".moe.shared_fc") || name.contains(".moe.router") {
        "shared_expert_and_router"
    } else if name.contains(".attn.") || name.contains(".self_attn.") {
        "attention"
    } else if name.contains(".mlp.") {
        "dense_mlp"
    } else if name.contains("embed_tokens") {
        "embeddings"
    } else if name.contains("lm_head") {
        "lm_head"
    } else {
        "norms_and_tables"
    }
}

/// Weight bytes as a pipeline split places them: each decoder layer's, and what only the first stage
/// (embeddings; the vision graph runs on the first device) and the last (final norm, lm_head) hold.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub layers: Vec<u64>,
    pub first: u64,
    pub last: u64,
}

/// KV bytes of each layer for `batch` sequences at `context` tokens.
pub fn layer_kv_bytes(
    config: &Llama4Config,
    kv_bytes_per_value: u64,
    batch: u64,
    context: u64,
) -> Vec<u64> {
    let per_token_layer =
        2 * config.num_kv_heads as u64 * config.head_dim as u64 * kv_bytes_per_value;
    let chunk = config.attention_chunk_size.map_or(u64::MAX, |c| c as u64);
    config
        .uses_rope
        .iter()
        .map(|&rope| {
            let tokens = if rope { context.min(chunk) } else { context };
            batch.saturating_mul(tokens).saturating_mul(per_token_layer)
        })
        .collect()
}

/// One pipeline stage of a plan: its layers and what its device holds.
#[derive(Clone, Debug, Serialize)]
pub struct StagePlan {
    pub first_layer: usize,
    pub end_layer: usize,
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    /// The largest call's activations, counted on every stage (an upper bound: only the last holds
    /// the logits).
    pub activation_peak_bytes: u64,
    pub total_bytes: u64,
    pub fits: bool,
}

/// Splits the layers over `stages` devices, balancing weight + KV bytes (see
/// [`herd_ir::split::balance`]), each stage also holding `activation` bytes of `usable`.
pub fn split_stages(
    weights: &LayerWeights,
    kv: &[u64],
    stages: usize,
    activation: u64,
    usable: u64,
) -> Vec<StagePlan> {
    let costs: Vec<u64> = weights
        .layers
        .iter()
        .zip(kv)
        .map(|(w, k)| w.saturating_add(*k))
        .collect();
    let ranges = herd_ir::split::balance(&costs, weights.first, weights.last, stages);
    describe_stages(weights, kv, &ranges, activation, usable)
}

/// What each stage of `ranges` holds (see [`split_stages`]).
pub fn describe_stages(
    weights: &LayerWeights,
    kv: &[u64],
    ranges: &[std::ops::Range<usize>],
    activation: u64,
    usable: u64,
) -> Vec<StagePlan> {
    let last = ranges.len().saturating_sub(1);
    ranges
        .iter()
        .cloned()
        .enumerate()
        .map(|(k, r)| {
            let mut weight_bytes: u64 = weights.layers[r.clone()].iter().sum();
            if k == 0 {
                weight_bytes += weights.first;
            }
            if k == last {
                weight_bytes += weights.last;
            }
            let kv_bytes = kv[r.clone()].iter().fold(0u64, |s, &b| s.saturating_add(b));
            let total_bytes = weight_bytes
                .saturating_add(kv_bytes)
                .saturating_add(activation);
            StagePlan {
                first_layer: r.start,
                end_layer: r.end,
                weight_bytes,
                kv_bytes,
                activation_peak_bytes: activation,
                total_bytes,
                fits: total_bytes <= usable,
            }
        })
        .collect()
}

/// KV bytes of `batch` sequences at `context` tokens: NoPE layers keep the context, chunked RoPE
/// layers at most one chunk.
pub fn kv_bytes(config: &Llama4Config, kv_bytes_per_value: u64, batch: u64, context: u64) -> u64 {
    let per_token_layer =
        2 * config.num_kv_heads as u64 * config.head_dim as u64 * kv_bytes_per_value;
    let chunk = config.attention_chunk_size.map_or(u64::MAX, |c| c as u64);
    let tokens: u64 = config
        .uses_rope
        .iter()
        .map(|&rope| if rope { context.min(chunk) } else { context })
        .sum();
    // Saturating: extreme --batch/--context give "does not fit", never an overflow.
    batch.saturating_mul(tokens).saturating_mul(per_token_layer)
}

/// Activations of the largest call (`batch` x `max_seq` new tokens at `context`): f32 logits, a few
/// hidden-state copies, the bool attention mask, one layer's attention scores as if materialised (an
/// upper bound: fused attention keeps them on chip) and the feed-forward intermediates.
pub fn activation_peak_bytes(config: &Llama4Config, input: &PlanInput, context: u64) -> u64 {
    let tokens = input.batch.saturating_mul(input.max_seq);
    let b = input.dtype.bits() as u64 / 8;
    let width = config.intermediate_size.max(config.intermediate_size_mlp) as u64;
    let product = |factors: &[u64]| factors.iter().fold(1u64, |p, &f| p.saturating_mul(f));
    [
        product(&[tokens, config.vocab_size as u64, 4]),
        product(&[4, tokens, config.hidden_size as u64, b]),
        product(&[tokens, context]),
        product(&[tokens, config.num_heads as u64, context, b]),
        product(&[4, tokens, width, b]),
    ]
    .iter()
    .fold(0u64, |sum, &part| sum.saturating_add(part))
}

/// The whole plan.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub gpu: Gpu,
    pub gpus: u64,
    pub usable_fraction: f64,
    pub dtype: String,
    pub quant: Option<String>,
    pub batch: u64,
    pub context: u64,
    pub max_seq: u64,
    pub weight_bytes: u64,
    pub weight_bytes_by_part: WeightParts,
    pub kv_bytes: u64,
    pub kv_bytes_per_token: u64,
    pub activation_peak_bytes: u64,
    pub total_bytes: u64,
    /// The fewest GPUs whose pipeline split fits (0: no split into whole layers does).
    pub gpus_needed: u64,
    /// Every stage fits its GPU.
    pub fits: bool,
    /// The layers split over the GPUs as `herd compile --stages` splits them.
    pub stages: Vec<StagePlan>,
    /// Longest context that fits on `gpus` GPUs at this batch (0: not even one token).
    pub max_context: u64,
    pub decode: Roofline,
    pub prefill: Prefill,
}

/// One decode step of the whole batch.
#[derive(Clone, Debug, Serialize)]
pub struct Roofline {
    /// Weights read (each distinct routed expert once) plus the KV cache read.
    pub bytes_per_step: u64,
    pub flops_per_step: f64,
    /// `batch / max(bytes / bandwidth, flops / rate)` on `gpus` GPUs run as a pipeline (one step is
    /// the sum of the stages, so the GPU count does not divide it).
    pub roofline_tokens_per_s: f64,
    pub bound: &'static str,
}

/// Prefill of a `context`-token prompt, compute-bound, through the stages one after another (no
/// overlap between GPUs, like decode).
#[derive(Clone, Debug, Serialize)]
pub struct Prefill {
    pub flops_per_token: f64,
    pub roofline_tokens_per_s: f64,
}

/// Plans `config` (weights by part and by stage place given) for `input`: the layers split over
/// `input.gpus` pipeline stages, each of which must fit its GPU.
pub fn plan(
    config: &Llama4Config,
    weights: WeightParts,
    layer_weights: &LayerWeights,
    input: &PlanInput,
) -> Plan {
    let weight_bytes: u64 = weights.values().sum();
    let kv = kv_bytes(config, input.kv_bytes_per_value, input.batch, input.context);
    let act = activation_peak_bytes(config, input, input.context);
    let total = weight_bytes.saturating_add(kv).saturating_add(act);
    let usable = (input.gpu.memory_bytes as f64 * USABLE_FRACTION) as u64;
    let split_at = |c: u64, gpus: usize| {
        let kv = layer_kv_bytes(config, input.kv_bytes_per_value, input.batch, c);
        let act = activation_peak_bytes(config, input, c);
        split_stages(layer_weights, &kv, gpus, act, usable)
    };
    let stages_at = |c: u64| split_at(c, input.gpus as usize);
    // The fewest GPUs whose split into whole layers fits (0: none does, a layer alone is too large).
    let layers = layer_weights.layers.len() as u64;
    let gpus_needed = (total.div_ceil(usable).max(1)..=layers.max(1))
        .find(|&n| split_at(input.context, n as usize).iter().all(|s| s.fits))
        .unwrap_or(0);
    let stages = stages_at(input.context);
    let fits_at = |c: u64| stages_at(c).iter().all(|s| s.fits);
    let max_context = if !fits_at(1) {
        0
    } else if fits_at(CONTEXT_LIMIT) {
        CONTEXT_LIMIT
    } else {
        let (mut lo, mut hi) = (1u64, CONTEXT_LIMIT);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits_at(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    };

    // Decode: tokens of the batch pick experts uniformly; E (1 - (1 - 1/E)^B) distinct ones are read.
    let e = config.num_experts.max(1) as f64;
    let distinct = e * (1.0 - (1.0 - 1.0 / e).powf(input.batch as f64));
    let experts = weights["experts"] as f64;
    let embed_row = weights["embeddings"] as f64 / config.vocab_size.max(1) as f64;
    // Norm weights and inverse frequencies are a few KB; the vision tower runs only
    // for images: none counts.
    let dense_bytes = weight_bytes as f64
        - experts
        - weights["embeddings"] as f64
        - weights["norms_and_tables"] as f64
        - weights["vision"] as f64;
    let weight_read = dense_bytes + experts * distinct / e + embed_row * input.batch as f64;
    let bytes_per_step = (weight_read + kv as f64) as u64;
    let active_params = active_params_per_token(config);
    let attention = attention_flops_per_token(config, input.context, false);
    let flops_per_step = input.batch as f64 * (2.0 * active_params + attention);
    let memory_time = bytes_per_step as f64 / input.gpu.bandwidth_bytes_per_s;
    let compute_time = flops_per_step / input.gpu.fp16_flops_per_s;
    let decode = Roofline {
        bytes_per_step,
        flops_per_step,
        roofline_tokens_per_s: input.batch as f64 / memory_time.max(compute_time),
        bound: if memory_time >= compute_time {
            "memory"
        } else {
            "compute"
        },
    };
    let prefill_flops =
        2.0 * active_params + attention_flops_per_token(config, input.context, true);
    Plan {
        gpu: input.gpu,
        gpus: input.gpus,
        usable_fraction: USABLE_FRACTION,
        dtype: input.dtype.name().to_string(),
        quant: input.quant.map(|q| q.name()),
        batch: input.batch,
        context: input.context,
        max_seq: input.max_seq,
        weight_bytes,
        weight_bytes_by_part: weights,
        kv_bytes: kv,
        kv_bytes_per_token: kv / (input.batch * input.context).max(1),
        activation_peak_bytes: act,
        total_bytes: total,
        gpus_needed,
        fits: stages.iter().all(|s| s.fits),
        stages,
        max_context,
        decode,
        prefill: Prefill {
            flops_per_token: prefill_flops,
            roofline_tokens_per_s: input.gpu.fp16_flops_per_s / prefill_flops,
        },
    }
}

/// Multiply-accumulate weights one token runs through (one routed expert per MoE layer, no
/// embedding table).
fn active_params_per_token(c: &Llama4Config) -> f64 {
    let (h, nh, nkv, d) = (
        c.hidden_size as f64,
        c.num_heads as f64,
        c.num_kv_heads as f64,
        c.head_dim as f64,
    );
    let (i, i_mlp) = (c.intermediate_size as f64, c.intermediate_size_mlp as f64);
    let mut p = c.vocab_size as f64 * h;
    for layer in 0..c.num_layers {
        p += h * (nh + 2.0 * nkv) * d + nh * d * h;
        p += if c.is_moe_layer(layer) {
            2.0 * 3.0 * h * i + h * c.num_experts as f64
        } else {
            3.0 * h * i_mlp
        };
    }
    p
}

/// Attention FLOPs of one token (QK^T and PV) at `context`: decode attends the whole cache of each
/// layer (chunked layers at most a chunk); prefill attends on average half of it.
fn attention_flops_per_token(c: &Llama4Config, context: u64, prefill: bool) -> f64 {
    let per_key = 4.0 * c.num_heads as f64 * c.head_dim as f64;
    let chunk = c.attention_chunk_size.map_or(u64::MAX, |c| c as u64);
    let keys: f64 = c
        .uses_rope
        .iter()
        .map(|&rope| if rope { context.min(chunk) } else { context } as f64)
        .sum();
    per_key * if prefill { keys / 2.0 } else { keys }
}
