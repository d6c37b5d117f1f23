//! `config.json`: a raw serde mirror of the file in both published spellings, resolved into
//! [`Llama4Config`], which has no optional fields left (derived lists and defaults filled in the way
//! transformers' `Llama4TextConfig` fills them).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The checkpoint layout, which decides the tensor-name prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// `Llama4ForConditionalGeneration`: nested `text_config`, tensors under `language_model.`.
    ConditionalGeneration,
    /// `Llama4ForCausalLM`: text config at top level, tensors under `model.` and `lm_head.`.
    CausalLm,
}

impl Architecture {
    /// The name transformers gives the class.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::ConditionalGeneration => "Llama4ForConditionalGeneration",
            Architecture::CausalLm => "Llama4ForCausalLM",
        }
    }

    /// Prefix of the decoder's tensors (`{prefix}model.layers.0...`, `{prefix}lm_head.weight`).
    pub fn text_prefix(self) -> &'static str {
        match self {
            Architecture::ConditionalGeneration => "language_model.",
            Architecture::CausalLm => "",
        }
    }
}

/// Rotary frequency scaling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Plain `theta^(-2j/d)` frequencies.
    Default,
    /// Llama 3 style frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Rotary embedding parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// Inverse frequencies for `head_dim`, computed in f32 like transformers, llama3 scaling applied with
    /// select semantics (the smooth branch, which divides by zero when low = high, is never taken then).
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base = self.theta as f32;
        (0..head_dim / 2)
            .map(|j| {
                let inv = 1.0 / base.powf((2 * j) as f32 / head_dim as f32);
                match &self.scaling {
                    RopeScaling::Default => inv,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } => {
                        let (factor, low, high) = (
                            *factor as f32,
                            *low_freq_factor as f32,
                            *high_freq_factor as f32,
                        );
                        let orig = *original_max_position_embeddings as f32;
                        let wavelen = 2.0 * std::f32::consts::PI / inv;
                        let low_wavelen = orig / low;
                        let high_wavelen = orig / high;
                        if wavelen > low_wavelen {
                            inv / factor
                        } else if wavelen < high_wavelen {
                            inv
                        } else {
                            let smooth = (orig / wavelen - low) / (high - low);
                            (1.0 - smooth) * inv / factor + smooth * inv
                        }
                    }
                }
            })
            .collect()
    }
}

/// The vision tower, adapter and projector configuration (`vision_config`, transformers' defaults for
/// missing keys), plus the top-level image token ids.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Width of the encoder MLP, and the adapter's input (pixel-shuffled) width.
    pub intermediate_size: usize,
    /// Side of one square tile in pixels.
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub rope_theta: f64,
    pub pixel_shuffle_ratio: f64,
    pub projector_input_dim: usize,
    pub projector_output_dim: usize,
    /// Input width of `multi_modal_projector.linear_1`.
    pub vision_output_dim: usize,
    /// `image_token_index`: the `<|patch|>` token whose embeddings the features replace.
    pub patch_token_id: i64,
    /// `boi_token_index` / `eoi_token_index`: `<|image_start|>` and `<|image_end|>`.
    pub image_start_id: i64,
    pub image_end_id: i64,
}

impl VisionConfig {
    /// Patches along one side of a tile.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Feature rows one tile produces after the pixel shuffle.
    pub fn tokens_per_tile(&self) -> usize {
        let g = self.grid();
        g * g / 4
    }
}

/// A fully resolved Llama 4 text model configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Llama4Config {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of routed and shared experts.
    pub intermediate_size: usize,
    /// Width of the dense MLP on non-MoE layers.
    pub intermediate_size_mlp: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    /// Per layer: true when the layer uses RoPE (and chunked attention), false for NoPE layers.
    pub uses_rope: Vec<bool>,
    /// Sorted indices of MoE layers; the others have a dense MLP.
    pub moe_layers: Vec<usize>,
    pub num_experts: usize,
    pub top_k: usize,
    pub use_qk_norm: bool,
    /// Chunk of the RoPE layers' local attention; None (`null` in config.json, as Llama Guard 4 has it):
    /// no chunking, the RoPE layers attend causally like the NoPE ones (as transformers reads it).
    pub attention_chunk_size: Option<usize>,
    pub attn_temperature_tuning: bool,
    pub floor_scale: f64,
    pub attn_scale: f64,
    pub tie_word_embeddings: bool,
    pub vision: Option<VisionConfig>,
}

impl Llama4Config {
    /// Indices of NoPE (full-attention) layers.
    pub fn nope_layers(&self) -> Vec<usize> {
        (0..self.num_layers)
            .filter(|&i| !self.uses_rope[i])
            .collect()
    }

    /// Whether layer `i` has a MoE feed-forward.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.moe_layers.binary_search(&i).is_ok()
    }

    /// Reads and resolves `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Llama4Config, ConfigError> {
        let file = path.display().to_string();
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.len() > MAX_CONFIG_BYTES {
                return Err(ConfigError::Io {
                    file,
                    message: format!(
                        "{} bytes; a config.json is a few KB (herd reads at most {MAX_CONFIG_BYTES})",
                        meta.len()
                    ),
                });
            }
        }
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ConfigError::Missing { file: file.clone() },
            _ => ConfigError::Io {
                file: file.clone(),
                message: e.to_string(),
            },
        })?;
        Self::from_json(&text, &file)
    }

    /// Resolves the text of a `config.json`; `file` names it in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Llama4Config, ConfigError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ConfigError::InvalidJson {
                file: file.to_string(),
                message: e.to_string(),
            })?;
        let top: RawTopConfig = parse(&value, file, "")?;
        let found = top
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| top.model_type.clone())
            .ok_or_else(|| ConfigError::MissingKey {
                file: file.to_string(),
                key: "architectures".into(),
            })?;
        let architecture = match found.as_str() {
            "Llama4ForConditionalGeneration" | "llama4" => Architecture::ConditionalGeneration,
            "Llama4ForCausalLM" | "llama4_text" => Architecture::CausalLm,
            _ => {
                return Err(ConfigError::UnsupportedArchitecture {
                    file: file.to_string(),
                    found,
                })
            }
        };
        let (text_value, key_prefix) = match architecture {
            Architecture::ConditionalGeneration => (
                value
                    .get("text_config")
                    .ok_or_else(|| ConfigError::MissingKey {
                        file: file.to_string(),
                        key: "text_config".into(),
                    })?,
                "text_config.",
            ),
            Architecture::CausalLm => (&value, ""),
        };
        let raw: RawTextConfig = parse(text_value, file, key_prefix)?;
        let vision = match (architecture, value.get("vision_config")) {
            (Architecture::ConditionalGeneration, Some(v)) if !v.is_null() => {
                let raw: RawVisionConfig = parse(v, file, "vision_config.")?;
                Some(vision_config(raw, &top, file)?)
            }
            _ => None,
        };
        let tie = top
            .tie_word_embeddings
            .or(raw.tie_word_embeddings)
            .unwrap_or(false);
        Resolver { file, key_prefix }.resolve(raw, architecture, vision, tie)
    }
}

fn parse<T: for<'de> Deserialize<'de>>(
    value: &serde_json::Value,
    file: &str,
    prefix: &str,
) -> Result<T, ConfigError> {
    // The error names the key (`text_config.rope_parameters.rope_type`), not just the value.
    serde_path_to_error::deserialize(value).map_err(|e| ConfigError::BadValue {
        file: file.to_string(),
        key: format!("{prefix}{}", e.path()),
        problem: e.inner().to_string(),
    })
}

#[derive(Deserialize)]
struct RawTopConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    tie_word_embeddings: Option<bool>,
    image_token_index: Option<i64>,
    boi_token_index: Option<i64>,
    eoi_token_index: Option<i64>,
}

/// `attn_temperature_tuning` is a bool in new files and an int (truthy) in older ones.
#[derive(Deserialize)]
#[serde(untagged)]
enum BoolOrInt {
    Bool(bool),
    Int(i64),
}

#[derive(Deserialize)]
struct RawRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

/// Mirrors the text part of `config.json`; every key optional so that resolution can name what is missing.
#[derive(Deserialize)]
struct RawTextConfig {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    intermediate_size_mlp: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRopeScaling>,
    rope_parameters: Option<RawRopeScaling>,
    no_rope_layers: Option<Vec<i64>>,
    no_rope_layer_interval: Option<usize>,
    moe_layers: Option<Vec<usize>>,
    interleave_moe_layer_step: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    use_qk_norm: Option<bool>,
    /// Absent: None; `null`: Some(None).
    #[serde(default, deserialize_with = "present")]
    attention_chunk_size: Option<Option<usize>>,
    attn_temperature_tuning: Option<BoolOrInt>,
    floor_scale: Option<f64>,
    attn_scale: Option<f64>,
    tie_word_embeddings: Option<bool>,
}

/// Deserializes a field that may be `null`: absent stays None (via `default`), `null` is Some(None).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Some(Option::deserialize(d)?))
}

#[derive(Deserialize)]
struct RawVisionConfig {
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    num_channels: Option<usize>,
    rope_theta: Option<f64>,
    pixel_shuffle_ratio: Option<f64>,
    projector_input_dim: Option<usize>,
    projector_output_dim: Option<usize>,
    vision_output_dim: Option<usize>,
    hidden_act: Option<String>,
}

/// Resolves `vision_config` with transformers' `Llama4VisionConfig` defaults and checks what the
/// compiler relies on (square patch grid, pixel shuffle 0.5, GELU, RoPE pair split).
fn vision_config(
    raw: RawVisionConfig,
    top: &RawTopConfig,
    file: &str,
) -> Result<VisionConfig, ConfigError> {
    let bad = |key: &str, problem: String| ConfigError::BadValue {
        file: file.to_string(),
        key: format!("vision_config.{key}"),
        problem,
    };
    let c = VisionConfig {
        hidden_size: raw.hidden_size.unwrap_or(768),
        num_layers: raw.num_hidden_layers.unwrap_or(34),
        num_heads: raw.num_attention_heads.unwrap_or(16),
        intermediate_size: raw.intermediate_size.unwrap_or(5632),
        image_size: raw.image_size.unwrap_or(448),
        patch_size: raw.patch_size.unwrap_or(14),
        num_channels: raw.num_channels.unwrap_or(3),
        rope_theta: raw.rope_theta.unwrap_or(10000.0),
        pixel_shuffle_ratio: raw.pixel_shuffle_ratio.unwrap_or(0.5),
        projector_input_dim: raw.projector_input_dim.unwrap_or(4096),
        projector_output_dim: raw.projector_output_dim.unwrap_or(4096),
        vision_output_dim: raw.vision_output_dim.unwrap_or(7680),
        patch_token_id: top.image_token_index.unwrap_or(200092),
        image_start_id: top.boi_token_index.unwrap_or(200080),
        image_end_id: top.eoi_token_index.unwrap_or(200081),
    };
    for (key, value, max) in [
        ("hidden_size", c.hidden_size, limits::WIDTH),
        ("num_hidden_layers", c.num_layers, limits::LAYERS),
        ("num_attention_heads", c.num_heads, limits::HEADS),
        ("intermediate_size", c.intermediate_size, limits::FFN_WIDTH),
        ("image_size", c.image_size, limits::IMAGE_SIZE),
        ("patch_size", c.patch_size, limits::IMAGE_SIZE),
        (
            "projector_input_dim",
            c.projector_input_dim,
            limits::FFN_WIDTH,
        ),
        (
            "projector_output_dim",
            c.projector_output_dim,
            limits::FFN_WIDTH,
        ),
        ("vision_output_dim", c.vision_output_dim, limits::FFN_WIDTH),
    ] {
        if value == 0 || value > max {
            return Err(bad(key, format!("is {value}; it must be in 1..={max}")));
        }
    }
    if c.num_channels != 3 {
        return Err(bad(
            "num_channels",
            format!("is {}; Llama 4 reads RGB images (3)", c.num_channels),
        ));
    }
    if !(c.rope_theta.is_finite() && c.rope_theta > 1.0) {
        return Err(bad(
            "rope_theta",
            format!(
                "is {}; it must be a finite number above 1 (Llama 4: 10000)",
                c.rope_theta
            ),
        ));
    }
    if c.pixel_shuffle_ratio != 0.5 {
        return Err(bad(
            "pixel_shuffle_ratio",
            format!(
                "is {}; herd compiles Llama 4's 0.5 only",
                c.pixel_shuffle_ratio
            ),
        ));
    }
    if let Some(act) = raw.hidden_act.filter(|a| a != "gelu") {
        return Err(bad(
            "hidden_act",
            format!("is `{act}`; Llama 4's vision tower uses exact `gelu`"),
        ));
    }
    if c.patch_size == 0 || c.image_size % c.patch_size != 0 || c.grid() % 2 != 0 {
        return Err(bad(
            "image_size",
            format!(
                "{} must be an even multiple of patch_size {}",
                c.image_size, c.patch_size
            ),
        ));
    }
    if c.num_heads == 0 || c.hidden_size % (c.num_heads * 4) != 0 {
        return Err(bad(
            "num_attention_heads",
            format!(
                "hidden_size {} must split into {} heads whose size is a multiple of 4 (2D RoPE)",
                c.hidden_size, c.num_heads
            ),
        ));
    }
    if c.intermediate_size != 4 * c.hidden_size {
        return Err(bad(
            "intermediate_size",
            format!(
                "{} must be 4 x hidden_size {}: the pixel-shuffled width feeds the adapter",
                c.intermediate_size, c.hidden_size
            ),
        ));
    }
    if c.projector_output_dim != c.vision_output_dim {
        return Err(bad(
            "vision_output_dim",
            format!(
                "{} must equal projector_output_dim {}",
                c.vision_output_dim, c.projector_output_dim
            ),
        ));
    }
    Ok(c)
}

/// The largest config.json herd parses (published ones are under 10 KB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Upper bounds of config values, far above every Llama 4 (Behemoth included): beyond them a value
/// is a typo or an attack, and products of them would overflow or allocate without end.
pub mod limits {
    pub const VOCAB: usize = 1 << 22;
    pub const WIDTH: usize = 1 << 16;
    pub const FFN_WIDTH: usize = 1 << 18;
    pub const LAYERS: usize = 1024;
    pub const HEADS: usize = 1024;
    pub const EXPERTS: usize = 4096;
    pub const CHUNK: usize = 1 << 26;
    pub const IMAGE_SIZE: usize = 4096;
}

struct Resolver<'a> {
    file: &'a str,
    key_prefix: &'a str,
}

impl Resolver<'_> {
    fn required(&self, value: Option<usize>, key: &str) -> Result<usize, ConfigError> {
        match value {
            Some(0) => Err(self.bad(key, "must be positive")),
            Some(v) => Ok(v),
            None => Err(ConfigError::MissingKey {
                file: self.file.to_string(),
                key: format!("{}{key}", self.key_prefix),
            }),
        }
    }

    /// [`Resolver::required`], and at most `max`.
    fn bounded(&self, value: Option<usize>, key: &str, max: usize) -> Result<usize, ConfigError> {
        let v = self.required(value, key)?;
        if v > max {
            return Err(self.bad(key, format!("is {v}; herd accepts at most {max}")));
        }
        Ok(v)
    }

    fn bad(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::BadValue {
            file: self.file.to_string(),
            key: format!("{}{key}", self.key_prefix),
            problem: problem.into(),
        }
    }

    fn resolve(
        &self,
        raw: RawTextConfig,
        architecture: Architecture,
        vision: Option<VisionConfig>,
        tie_word_embeddings: bool,
    ) -> Result<Llama4Config, ConfigError> {
        let vocab_size = self.bounded(raw.vocab_size, "vocab_size", limits::VOCAB)?;
        let hidden_size = self.bounded(raw.hidden_size, "hidden_size", limits::WIDTH)?;
        let num_layers =
            self.bounded(raw.num_hidden_layers, "num_hidden_layers", limits::LAYERS)?;
        let num_heads = self.bounded(
            raw.num_attention_heads,
            "num_attention_heads",
            limits::HEADS,
        )?;
        let num_kv_heads = self.bounded(
            raw.num_key_value_heads,
            "num_key_value_heads",
            limits::HEADS,
        )?;
        if num_heads % num_kv_heads != 0 {
            return Err(self.bad(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => self.bounded(Some(d), "head_dim", limits::WIDTH)?,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(self.bad(
                    "head_dim",
                    "absent and hidden_size is not a multiple of num_attention_heads",
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(self.bad(
                "head_dim",
                format!("{head_dim} is odd; rotary embedding needs pairs"),
            ));
        }

        // An empty list is falsy in Python and means "use the default".
        let uses_rope = match raw.no_rope_layers.filter(|l| !l.is_empty()) {
            Some(list) => {
                if list.len() != num_layers {
                    return Err(self.bad(
                        "no_rope_layers",
                        format!("has {} entries for {num_layers} layers", list.len()),
                    ));
                }
                list.into_iter().map(|v| v != 0).collect()
            }
            None => {
                let interval = self.required(
                    Some(raw.no_rope_layer_interval.unwrap_or(4)),
                    "no_rope_layer_interval",
                )?;
                (0..num_layers).map(|i| (i + 1) % interval != 0).collect()
            }
        };
        let moe_layers = match raw.moe_layers {
            Some(mut list) => {
                list.sort_unstable();
                list.dedup();
                if list.last().is_some_and(|&l| l >= num_layers) {
                    return Err(self.bad(
                        "moe_layers",
                        format!("names a layer >= num_hidden_layers {num_layers}"),
                    ));
                }
                list
            }
            None => {
                let step = self.required(
                    Some(raw.interleave_moe_layer_step.unwrap_or(1)),
                    "interleave_moe_layer_step",
                )?;
                (step - 1..num_layers).step_by(step).collect()
            }
        };
        let has_dense = moe_layers.len() < num_layers;
        let intermediate_size = self.bounded(
            raw.intermediate_size,
            "intermediate_size",
            limits::FFN_WIDTH,
        )?;
        let intermediate_size_mlp = if has_dense {
            self.bounded(
                raw.intermediate_size_mlp,
                "intermediate_size_mlp",
                limits::FFN_WIDTH,
            )?
        } else {
            raw.intermediate_size_mlp
                .unwrap_or(0)
                .min(limits::FFN_WIDTH)
        };
        let (num_experts, top_k) = if moe_layers.is_empty() {
            (
                raw.num_local_experts.unwrap_or(0),
                raw.num_experts_per_tok.unwrap_or(0),
            )
        } else {
            let e = self.bounded(raw.num_local_experts, "num_local_experts", limits::EXPERTS)?;
            let k = self.required(
                Some(raw.num_experts_per_tok.unwrap_or(1)),
                "num_experts_per_tok",
            )?;
            if k > e {
                return Err(self.bad(
                    "num_experts_per_tok",
                    format!("{k} exceeds num_local_experts {e}"),
                ));
            }
            (e, k)
        };

        let rope = self.rope(raw.rope_theta, raw.rope_scaling, raw.rope_parameters)?;
        let attention_chunk_size = match raw.attention_chunk_size {
            None => Some(8192),
            Some(None) => None,
            Some(Some(size)) => {
                Some(self.bounded(Some(size), "attention_chunk_size", limits::CHUNK)?)
            }
        };
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-5);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0 && rms_norm_eps < 1.0) {
            return Err(self.bad(
                "rms_norm_eps",
                format!("is {rms_norm_eps}; it must be a finite number in (0, 1) (Llama 4: 1e-5)"),
            ));
        }
        let attn_temperature_tuning = match raw.attn_temperature_tuning {
            None => true,
            Some(BoolOrInt::Bool(b)) => b,
            Some(BoolOrInt::Int(i)) => i != 0,
        };
        let floor_scale = raw.floor_scale.unwrap_or(8192.0);
        if floor_scale <= 0.0 {
            return Err(self.bad("floor_scale", "must be positive"));
        }
        Ok(Llama4Config {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            intermediate_size_mlp,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope,
            uses_rope,
            moe_layers,
            num_experts,
            top_k,
            use_qk_norm: raw.use_qk_norm.unwrap_or(true),
            attention_chunk_size,
            attn_temperature_tuning,
            floor_scale,
            attn_scale: raw.attn_scale.unwrap_or(0.1),
            tie_word_embeddings: tie_word_embeddings || raw.tie_word_embeddings.unwrap_or(false),
            vision,
        })
    }

    fn rope(
        &self,
        theta: Option<f64>,
        scaling: Option<RawRopeScaling>,
        parameters: Option<RawRopeScaling>,
    ) -> Result<RopeConfig, ConfigError> {
        let (key, spec) = match (parameters, scaling) {
            (Some(p), _) => ("rope_parameters", Some(p)),
            (None, s) => ("rope_scaling", s),
        };
        let theta = spec
            .as_ref()
            .and_then(|s| s.rope_theta)
            .or(theta)
            .unwrap_or(500000.0);
        if !(theta.is_finite() && theta > 1.0) {
            return Err(self.bad(
                "rope_theta",
                format!("is {theta}; it must be a finite number above 1 (Llama 4: 500000)"),
            ));
        }
        let Some(spec) = spec else {
            return Ok(RopeConfig {
                theta,
                scaling: RopeScaling::Default,
            });
        };
        let kind = spec
            .rope_type
            .or(spec.legacy_type)
            .unwrap_or_else(|| "default".into());
        let scaling = match kind.as_str() {
            "default" => RopeScaling::Default,
            "llama3" => {
                let field = |v: Option<f64>, name: &str| {
                    v.ok_or_else(|| ConfigError::MissingKey {
                        file: self.file.to_string(),
                        key: format!("{}{key}.{name}", self.key_prefix),
                    })
                };
                let scaling = RopeScaling::Llama3 {
                    factor: field(spec.factor, "factor")?,
                    low_freq_factor: field(spec.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: field(spec.high_freq_factor, "high_freq_factor")?,
                    original_max_position_embeddings: field(
                        spec.original_max_position_embeddings,
                        "original_max_position_embeddings",
                    )?,
                };
                if let RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                } = &scaling
                {
                    if *factor <= 0.0
                        || *low_freq_factor <= 0.0
                        || *high_freq_factor < *low_freq_factor
                        || *original_max_position_embeddings <= 0.0
                    {
                        return Err(self.bad(key, "llama3 scaling needs factor > 0, 0 < low_freq_factor <= high_freq_factor and original_max_position_embeddings > 0"));
                    }
                }
                scaling
            }
            other => {
                return Err(self.bad(
                    key,
                    format!("rope type `{other}` is not supported (expected default or llama3)"),
                ))
            }
        };
        Ok(RopeConfig { theta, scaling })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(extra: &str) -> String {
        format!(
            r#"{{"architectures": ["Llama4ForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 32,
                "intermediate_size_mlp": 48, "num_hidden_layers": 8, "num_attention_heads": 4,
                "num_key_value_heads": 2 {extra}}}"#
        )
    }

    #[test]
    fn scout_llama3_scaling_with_equal_factors_never_takes_the_smooth_branch() {
        let rope = RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 16.0,
                low_freq_factor: 1.0,
                high_freq_factor: 1.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let plain = RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::Default,
        }
        .inv_freq(128);
        let scaled = rope.inv_freq(128);
        assert!(scaled.iter().all(|f| f.is_finite()));
        for j in 0..64 {
            let expected = if j < 35 { plain[j] } else { plain[j] / 16.0 };
            assert_eq!(scaled[j], expected, "pair {j}");
        }
    }

    #[test]
    fn smooth_branch_interpolates_between_scaled_and_unscaled() {
        let rope = RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0,
            },
        };
        let plain = RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::Default,
        }
        .inv_freq(16);
        let scaled = rope.inv_freq(16);
        assert_eq!(scaled[0], plain[0]); // wavelength 6.3 < 16: kept
        let wavelen = 2.0 * std::f32::consts::PI / plain[1]; // 32.4: between 16 and 64
        let smooth = (64.0 / wavelen - 1.0) / 3.0;
        assert!((scaled[1] - ((1.0 - smooth) * plain[1] / 8.0 + smooth * plain[1])).abs() < 1e-9);
        assert_eq!(scaled[2], plain[2] / 8.0); // wavelength 167 > 64: divided
    }

    #[test]
    fn derived_lists_follow_transformers_defaults() {
        let c = Llama4Config::from_json(
            &text(
                r#", "no_rope_layers": [], "interleave_moe_layer_step": 2, "num_local_experts": 4"#,
            ),
            "c",
        )
        .unwrap();
        assert_eq!(c.nope_layers(), vec![3, 7]);
        assert_eq!(c.moe_layers, vec![1, 3, 5, 7]);
        assert_eq!(c.head_dim, 16);
        assert!(c.use_qk_norm && c.attn_temperature_tuning);
        assert_eq!(
            (c.attention_chunk_size, c.floor_scale, c.attn_scale),
            (Some(8192), 8192.0, 0.1)
        );
        assert_eq!(c.rope.scaling, RopeScaling::Default);
    }

    #[test]
    fn explicit_lists_and_integer_temperature_flag() {
        let c = Llama4Config::from_json(
            &text(r#", "no_rope_layers": [1,0,1,1,1,1,1,0], "moe_layers": [], "attn_temperature_tuning": 0"#),
            "c",
        )
        .unwrap();
        assert_eq!(c.nope_layers(), vec![1, 7]);
        assert!(c.moe_layers.is_empty());
        assert!(!c.attn_temperature_tuning);
        let c = Llama4Config::from_json(
            &text(r#", "moe_layers": [], "attn_temperature_tuning": 4"#),
            "c",
        )
        .unwrap();
        assert!(c.attn_temperature_tuning);
    }

    #[test]
    fn rope_parameters_spelling_matches_rope_scaling_spelling() {
        let old = text(
            r#", "moe_layers": [], "rope_theta": 10000.0, "rope_scaling": {"rope_type": "llama3", "factor": 16.0,
                "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}"#,
        );
        let new = text(
            r#", "moe_layers": [], "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 16.0,
                "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}"#,
        );
        let (a, b) = (
            Llama4Config::from_json(&old, "c").unwrap(),
            Llama4Config::from_json(&new, "c").unwrap(),
        );
        assert_eq!(a.rope, b.rope);
        assert_eq!(a.rope.theta, 10000.0);
    }

    #[test]
    fn published_scout_vision_config() {
        let c = Llama4Config::from_json(
            r#"{"architectures": ["Llama4ForConditionalGeneration"], "boi_token_index": 200080,
                "eoi_token_index": 200081, "image_token_index": 200092,
                "text_config": {"vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192,
                    "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
                    "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 16, "moe_layers": []},
                "vision_config": {"attention_dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1408,
                    "image_size": 336, "intermediate_size": 5632, "model_type": "llama4_vision_model",
                    "multi_modal_projector_bias": false, "norm_eps": 1e-05, "num_attention_heads": 16,
                    "num_channels": 3, "num_hidden_layers": 34, "patch_size": 14, "pixel_shuffle_ratio": 0.5,
                    "projector_dropout": 0.0, "projector_input_dim": 4096, "projector_output_dim": 4096,
                    "rope_theta": 10000, "vision_feature_layer": -1,
                    "vision_feature_select_strategy": "default", "vision_output_dim": 4096}}"#,
            "config.json",
        )
        .unwrap();
        let v = c.vision.unwrap();
        assert_eq!((v.grid(), v.tokens_per_tile()), (24, 144));
        assert_eq!((v.hidden_size, v.num_heads, v.num_layers), (1408, 16, 34));
        assert_eq!(
            (v.patch_token_id, v.image_start_id, v.image_end_id),
            (200092, 200080, 200081)
        );
        let bad = Llama4Config::from_json(
            r#"{"architectures": ["Llama4ForConditionalGeneration"],
                "text_config": {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                    "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
                    "num_local_experts": 1, "moe_layers": []},
                "vision_config": {"pixel_shuffle_ratio": 0.25}}"#,
            "config.json",
        );
        let message = bad.unwrap_err().to_string();
        assert!(
            message.contains("vision_config.pixel_shuffle_ratio") && message.contains("0.5"),
            "{message}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let missing = Llama4Config::from_json(
            &text(r#", "moe_layers": [1], "num_local_experts": null"#),
            "cfg.json",
        );
        assert_eq!(
            missing.unwrap_err().to_string(),
            "cfg.json: missing required key `num_local_experts`"
        );
        let nested = Llama4Config::from_json(
            r#"{"architectures": ["Llama4ForConditionalGeneration"], "text_config": {}}"#,
            "cfg.json",
        );
        assert_eq!(
            nested.unwrap_err().to_string(),
            "cfg.json: missing required key `text_config.vocab_size`"
        );
        let rope = Llama4Config::from_json(
            &text(r#", "moe_layers": [], "rope_scaling": {"rope_type": "yarn"}"#),
            "cfg.json",
        );
        assert!(rope
            .unwrap_err()
            .to_string()
            .contains("rope type `yarn` is not supported"));
        let layers = Llama4Config::from_json(
            &text(r#", "moe_layers": [], "no_rope_layers": [1, 0]"#),
            "cfg.json",
        );
        assert!(layers
            .unwrap_err()
            .to_string()
            .contains("has 2 entries for 8 layers"));
        let wrong_type = Llama4Config::from_json(
            &text(r#", "moe_layers": [], "use_qk_norm": "yes""#),
            "cfg.json",
        );
        assert!(wrong_type
            .unwrap_err()
            .to_string()
            .starts_with("cfg.json: key `use_qk_norm`: invalid type"));
    }
}
