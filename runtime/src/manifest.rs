//! The bundle manifest (`manifest.json`): what a compiled bundle holds and how to drive its graph. The
//! runtime owns this format; the compiler writes it through these types.

use serde::{Deserialize, Serialize};

/// The manifest format this runtime reads and the compiler writes. 2: decoders of multimodal bundles
/// take image features (older runtimes would not feed them). 3: fixed-size KV caches written in place
/// (`TensorScatter`), rows at their own positions, rotary angles computed in the graph. 4: pipeline
/// stages (a decoder split into graphs over layer ranges; older runtimes would run stage 0 alone).
pub const FORMAT_VERSION: u32 = 4;

/// File name of the manifest inside a bundle.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Files at most this large are checksummed on every load; larger ones (the weights) by `verify` only.
pub const CHECKSUM_ON_LOAD_LIMIT: u64 = 64 << 20;

/// A compiled bundle's description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Version of the herd that compiled the bundle.
    pub herd_version: String,
    pub model: ModelInfo,
    pub graph: GraphIo,
    /// Element type of activations, weights and the KV cache. Logits are always f32.
    pub dtype: ElementType,
    /// How the MoE was lowered.
    pub moe_lowering: MoeLowering,
    /// Every file of the bundle except the manifest, with its size and sha256.
    pub files: Vec<FileEntry>,
    /// Token ids that end generation.
    pub stop_token_ids: Vec<i64>,
    pub bos_token_id: Option<i64>,
    /// What the bundle was compiled for.
    #[serde(default)]
    pub target: Target,
    /// TensorRT build settings and requirements (tensorrt targets), and the engine once built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensorrt: Option<TensorRtInfo>,
    /// Present when weights are quantized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantizationInfo>,
    /// Present when the bundle takes images (the vision encoder was compiled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<VisionInfo>,
    /// Pipeline stages (`herd compile --stages N`): the decoder as graphs over contiguous layer ranges,
    /// run one after another (each on its own device). Empty: one graph, [`Manifest::graph`], whose
    /// names (ids, positions, logits, every layer's KV) the stages share.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageIo>,
    /// Set on a calibration window (herd's GPTQ): a bundle of one stage running only these layers,
    /// taking the residual stream unless it starts at layer 0 and handing it on unless it ends at the
    /// last. It serves no requests; [`crate::Model::probe_window`] runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_window: Option<std::ops::Range<usize>>,
}

/// One pipeline stage: a graph running decoder layers `first_layer..end_layer`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageIo {
    /// The stage's model file, relative to the bundle.
    pub model_file: String,
    pub first_layer: usize,
    /// One past the stage's last layer.
    pub end_layer: usize,
    /// Input of the residual stream from the previous stage, [slots, seq, hidden] in the bundle's
    /// dtype; None for stage 0, which takes the token ids (and image features).
    pub hidden_in: Option<String>,
    /// Output of the residual stream to the next stage; None for the last, which returns the logits
    /// (and takes `logits_index`).
    pub hidden_out: Option<String>,
    /// The caches of the stage's layers.
    pub kv: Vec<KvNames>,
    /// Bytes of the stage's weights.
    pub weight_bytes: u64,
    /// TensorRT optimisation profile of the stage (min, opt, max), TensorRT targets only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensorrt_profile: Option<[String; 3]>,
}

/// How to turn images into decoder inputs: the vision graph, its preprocessing and the image tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionInfo {
    /// The vision graph, relative to the bundle: `pixel_values` tiles in, `image_features` rows out.
    pub model_file: String,
    /// Input of the vision graph: [tiles, channels, tile_size, tile_size] in the bundle's dtype.
    pub pixel_values: String,
    /// Output of the vision graph: [tiles * tokens_per_tile, hidden].
    pub image_features: String,
    /// Decoder input receiving feature rows, [features, hidden] (empty for text).
    pub decoder_features: String,
    /// Decoder input saying where each row goes: i64 [features], flat `batch * seq` token indices.
    pub decoder_positions: String,
    /// Side of one square tile in pixels.
    pub tile_size: usize,
    pub num_channels: usize,
    /// Feature rows (and `<|patch|>` tokens) per tile.
    pub tokens_per_tile: usize,
    /// Most tiles of one image's canvas (the global tile comes on top).
    pub max_tiles: usize,
    /// Most images in one prompt.
    pub max_images: usize,
    /// `pixel / 255`, then `(x - mean) / std` per channel, rounded to bf16 like transformers.
    pub rescale_factor: f64,
    pub image_mean: Vec<f32>,
    pub image_std: Vec<f32>,
    pub tokens: ImageTokens,
}

/// Token ids of the image prompt layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageTokens {
    pub image_start: i64,
    pub image_end: i64,
    /// `<|image|>`: the placeholder in prompts, and the marker before the global tile.
    pub image: i64,
    /// `<|patch|>`: replaced by one feature row each.
    pub patch: i64,
    pub tile_x_separator: i64,
    pub tile_y_separator: i64,
}

/// What a bundle was compiled for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// ONNX Runtime, any execution provider (`onnx`).
    #[default]
    Onnx,
    /// TensorRT on H100 through ONNX Runtime's TensorRT EP (`tensorrt-h100`).
    TensorrtH100,
}

impl Target {
    /// The name used on the command line and in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Target::Onnx => "onnx",
            Target::TensorrtH100 => "tensorrt-h100",
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How fused MoE ops are lowered (`--moe`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MoeLowering {
    /// `com.microsoft.MoE`/`QMoE` for ONNX Runtime's CPU kernels: fastest on CPU, not portable.
    Ort,
    /// `com.microsoft.MoE`/`QMoE` for ONNX Runtime's CUDA EP, the rest of the graph for TensorRT.
    Cuda,
    /// Standard ONNX only: per expert, the routed rows times its own weights (any EP, TensorRT alone).
    Grouped,
}

impl MoeLowering {
    /// The name used on the command line and in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            MoeLowering::Ort => "ort",
            MoeLowering::Cuda => "cuda",
            MoeLowering::Grouped => "grouped",
        }
    }

    /// Whether the graph holds `com.microsoft` MoE nodes (ONNX Runtime only).
    pub fn uses_contrib_ops(self) -> bool {
        !matches!(self, MoeLowering::Grouped)
    }
}

/// TensorRT settings of a bundle compiled for a TensorRT target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorRtInfo {
    /// Optimisation profile in the TensorRT EP's syntax (`name:1x1,name2:1x8x0x128,...`).
    pub profile_min_shapes: String,
    pub profile_opt_shapes: String,
    pub profile_max_shapes: String,
    /// Oldest TensorRT whose ONNX parser takes the graph (RotaryEmbedding, RMSNormalization).
    pub min_tensorrt: String,
    /// Compute capability the engine is built for (H100: 9.0).
    pub compute_capability: String,
    /// Q/DQ graphs must be built strongly typed (no fp16/int8 builder flags).
    pub strongly_typed: bool,
    /// Lint rules the compile was allowed to break (`--allow-lint`).
    #[serde(default)]
    pub allowed_lint: Vec<String>,
    /// Optimisation profile of the vision graph (bundles with images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_profile_shapes: Option<[String; 3]>,
    /// The built engine, once `herd build-engine` ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineInfo>,
    /// For `--moe cuda`: the MoE nodes run on the CUDA EP beside TensorRT, split as recorded here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_partition: Option<CudaPartition>,
}

/// The expected split of a decoder between the TensorRT EP and the CUDA EP (`--moe cuda`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaPartition {
    /// TensorRT engines: the stretches of nodes between MoE nodes.
    pub tensorrt_subgraphs: usize,
    pub tensorrt_nodes: usize,
    /// `com.microsoft.MoE`/`QMoE` nodes, run by the CUDA EP (which must be present).
    pub cuda_nodes: usize,
    /// Tensors handed between the two providers per call.
    pub boundary_tensors: usize,
}

/// A TensorRT engine built into the bundle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineInfo {
    /// The EPContext model wrapping the engine, relative to the bundle.
    pub model_file: String,
    /// The vision graph's EPContext model, for bundles that take images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_model_file: Option<String>,
    pub gpu_name: String,
    pub compute_capability: String,
    pub tensorrt_version: String,
    pub onnxruntime_version: String,
}

/// How a bundle's weights were quantized, and what that costs in accuracy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizationInfo {
    /// `int4:64`, `int8:128`, `fp8`, ...
    pub scheme: String,
    /// How the int blocks' scales were chosen: `clip` (least squared error) or `absmax`; absent in
    /// bundles older than the choice (absmax) and for fp8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scales: Option<String>,
    /// How int weights were rounded: `rtn` (to nearest) or `gptq`; absent in older bundles (rtn) and
    /// for fp8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The calibration data GPTQ used (prompts and tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<String>,
    /// Signal-to-quantization-noise ratio of every quantized weight, in dB.
    pub sqnr_db: std::collections::BTreeMap<String, f64>,
    /// Quantized activations, when any (fp8 for TensorRT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activations: Option<String>,
    /// Next-token agreement with the unquantized model (`herd compile --report`, `herd eval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<Accuracy>,
    /// With `--report` for GPTQ/AWQ: the same scheme rounded to nearest, against the same reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtn_accuracy: Option<Accuracy>,
    /// With `--report` when lm_head is quantized: the same bundle with lm_head and the embedding table
    /// kept in float (`--keep-head`), against the same reference: the head's share of the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_kept_accuracy: Option<Accuracy>,
}

/// Agreement of next-token distributions between a bundle and a reference, over teacher-forced prompts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// What the bundle was compared with.
    pub reference: String,
    pub prompts: usize,
    pub positions: usize,
    /// KL(reference || bundle) in nats, mean and max over positions.
    pub kl_mean: f64,
    pub kl_max: f64,
    /// Fraction of positions whose most likely token agrees.
    pub top1_agreement: f64,
}

/// The model facts a runtime needs, plus the compiler's full resolved config for reference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub architecture: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Largest absolute position the graph accepts (rotary tables cover 0..max_positions).
    pub max_positions: usize,
    pub attention_chunk_size: usize,
    /// Layers with full causal attention (NoPE); the others attend within their chunk.
    pub nope_layers: Vec<usize>,
    /// Bytes of all weights in the bundle.
    pub weight_bytes: u64,
    /// Weight bytes one decoded token reads: everything but the experts top-k does not select and the
    /// embedding rows it does not gather.
    pub active_weight_bytes_per_token: u64,
    /// The compiler's resolved Llama 4 config.
    pub config: serde_json::Value,
}

/// Names of the graph's inputs and outputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GraphIo {
    /// The model file, relative to the bundle.
    pub model_file: String,
    /// i64 [batch, seq].
    pub input_ids: String,
    /// i64 [slots, seq]: each row's own absolute positions, consecutive within the row; the first is
    /// the row's cache length (where its new keys and values are written).
    pub position_ids: String,
    /// i64 [slots, picked]: the tokens of each row (indices into its `seq`) whose logits are returned.
    pub logits_index: String,
    /// f32 [slots, picked, vocab].
    pub logits: String,
    /// Layout of every KV tensor.
    pub kv_layout: String,
    pub kv: Vec<KvNames>,
}

/// One layer's cache tensors, each [batch, kv_heads, length, head_dim]: the runtime allocates them once
/// and binds `present_*` to the buffer of `past_*` (the graph writes the new entries in place).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvNames {
    pub layer: usize,
    /// Chunked (RoPE) layers: a ring of this many entries (one chunk, or the context if shorter).
    /// None for full (NoPE) layers, whose length is the session's context.
    pub ring: Option<usize>,
    pub past_key: String,
    pub past_value: String,
    pub present_key: String,
    pub present_value: String,
}

/// A file of the bundle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The element type of a bundle's activations, weights and KV cache: `f32`, `f16` or `bf16` in the
/// manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElementType {
    F32,
    F16,
    Bf16,
}

impl ElementType {
    /// Bytes of one value.
    pub fn bytes(self) -> usize {
        match self {
            ElementType::F32 => 4,
            ElementType::F16 | ElementType::Bf16 => 2,
        }
    }
}

impl Manifest {
    /// The decoder's stages in order: [`Manifest::stages`], or the one graph as a single stage.
    pub fn stage_list(&self) -> Vec<StageIo> {
        if !self.stages.is_empty() {
            return self.stages.clone();
        }
        vec![StageIo {
            model_file: self.graph.model_file.clone(),
            first_layer: 0,
            end_layer: self.model.num_layers,
            hidden_in: None,
            hidden_out: None,
            kv: self.graph.kv.clone(),
            weight_bytes: self.model.weight_bytes,
            tensorrt_profile: None,
        }]
    }

    /// Refuses stages that do not run every layer once (every layer of the window, for a
    /// [`Manifest::layer_window`]), in order, handing the residual stream on.
    pub fn check_stages(&self) -> Result<(), String> {
        let stages = self.stage_list();
        let layers = self.model.num_layers;
        let covered = self.layer_window.clone().unwrap_or(0..layers);
        if let Some(w) = &self.layer_window {
            if w.is_empty() || w.end > layers || stages.len() != 1 {
                return Err(format!(
                    "layer window {}..{} of {layers} layers in {} stages: a window is one stage of at least one layer",
                    w.start,
                    w.end,
                    stages.len()
                ));
            }
        }
        let mut next = covered.start;
        for (k, s) in stages.iter().enumerate() {
            if s.first_layer != next || s.end_layer <= s.first_layer {
                return Err(format!(
                    "stage {k} runs layers {}..{}, not from layer {next}",
                    s.first_layer, s.end_layer
                ));
            }
            if s.hidden_in.is_some() != (s.first_layer > 0)
                || s.hidden_out.is_some() != (s.end_layer < layers)
            {
                return Err(format!(
                    "stage {k} must take the residual stream unless first and hand it on unless last"
                ));
            }
            if let Some(kv) =
                s.kv.iter()
                    .find(|kv| !(s.first_layer..s.end_layer).contains(&kv.layer))
            {
                return Err(format!(
                    "stage {k} lists the cache of layer {}, outside its layers",
                    kv.layer
                ));
            }
            next = s.end_layer;
        }
        if next != covered.end {
            return Err(format!(
                "the stages end at layer {next}, not at layer {}",
                covered.end
            ));
        }
        Ok(())
    }
}
