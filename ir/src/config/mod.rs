//! `config.json`: a raw serde mirror of the file in both published spellings, resolved into
//! [`Llama4Config`], which has no optional fields left (derived lists and defaults filled in the way
//! transformers' `Llama4TextConfig` fills them).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

mod raw;
mod resolve;

use raw::{parse, RawTextConfig, RawTopConfig, RawVisionConfig};
use resolve::{vision_config, Resolver};

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
