//! The raw serde mirror of `config.json`: every key optional, so that resolution can name what is
//! missing, and parse errors that name the key.

use serde::Deserialize;

use crate::error::ConfigError;

pub(super) fn parse<T: for<'de> Deserialize<'de>>(
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
pub(super) struct RawTopConfig {
    pub(super) architectures: Option<Vec<String>>,
    pub(super) model_type: Option<String>,
    pub(super) tie_word_embeddings: Option<bool>,
    pub(super) image_token_index: Option<i64>,
    pub(super) boi_token_index: Option<i64>,
    pub(super) eoi_token_index: Option<i64>,
}

/// `attn_temperature_tuning` is a bool in new files and an int (truthy) in older ones.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum BoolOrInt {
    Bool(bool),
    Int(i64),
}

#[derive(Deserialize)]
pub(super) struct RawRopeScaling {
    pub(super) rope_type: Option<String>,
    #[serde(rename = "type")]
    pub(super) legacy_type: Option<String>,
    pub(super) rope_theta: Option<f64>,
    pub(super) factor: Option<f64>,
    pub(super) low_freq_factor: Option<f64>,
    pub(super) high_freq_factor: Option<f64>,
    pub(super) original_max_position_embeddings: Option<f64>,
}

/// Mirrors the text part of `config.json`; every key optional so that resolution can name what is missing.
#[derive(Deserialize)]
pub(super) struct RawTextConfig {
    pub(super) vocab_size: Option<usize>,
    pub(super) hidden_size: Option<usize>,
    pub(super) intermediate_size: Option<usize>,
    pub(super) intermediate_size_mlp: Option<usize>,
    pub(super) num_hidden_layers: Option<usize>,
    pub(super) num_attention_heads: Option<usize>,
    pub(super) num_key_value_heads: Option<usize>,
    pub(super) head_dim: Option<usize>,
    pub(super) rms_norm_eps: Option<f64>,
    pub(super) rope_theta: Option<f64>,
    pub(super) rope_scaling: Option<RawRopeScaling>,
    pub(super) rope_parameters: Option<RawRopeScaling>,
    pub(super) no_rope_layers: Option<Vec<i64>>,
    pub(super) no_rope_layer_interval: Option<usize>,
    pub(super) moe_layers: Option<Vec<usize>>,
    pub(super) interleave_moe_layer_step: Option<usize>,
    pub(super) num_local_experts: Option<usize>,
    pub(super) num_experts_per_tok: Option<usize>,
    pub(super) use_qk_norm: Option<bool>,
    /// Absent: None; `null`: Some(None).
    #[serde(default, deserialize_with = "present")]
    pub(super) attention_chunk_size: Option<Option<usize>>,
    pub(super) attn_temperature_tuning: Option<BoolOrInt>,
    pub(super) floor_scale: Option<f64>,
    pub(super) attn_scale: Option<f64>,
    pub(super) tie_word_embeddings: Option<bool>,
}

/// Deserializes a field that may be `null`: absent stays None (via `default`), `null` is Some(None).
pub(super) fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Some(Option::deserialize(d)?))
}

#[derive(Deserialize)]
pub(super) struct RawVisionConfig {
    pub(super) hidden_size: Option<usize>,
    pub(super) num_hidden_layers: Option<usize>,
    pub(super) num_attention_heads: Option<usize>,
    pub(super) intermediate_size: Option<usize>,
    pub(super) image_size: Option<usize>,
    pub(super) patch_size: Option<usize>,
    pub(super) num_channels: Option<usize>,
    pub(super) rope_theta: Option<f64>,
    pub(super) pixel_shuffle_ratio: Option<f64>,
    pub(super) projector_input_dim: Option<usize>,
    pub(super) projector_output_dim: Option<usize>,
    pub(super) vision_output_dim: Option<usize>,
    pub(super) hidden_act: Option<String>,
}
