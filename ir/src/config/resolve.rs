//! Resolution of the raw config into [`Llama4Config`] and [`VisionConfig`]: defaults as transformers
//! fills them, every value bounded by [`limits`], errors that name the key.

use super::raw::{BoolOrInt, RawRopeScaling, RawTextConfig, RawTopConfig, RawVisionConfig};
use super::{limits, Architecture, Llama4Config, RopeConfig, RopeScaling, VisionConfig};
use crate::error::ConfigError;

/// Resolves `vision_config` with transformers' `Llama4VisionConfig` defaults and checks what the
/// compiler relies on (square patch grid, pixel shuffle 0.5, GELU, RoPE pair split).
pub(super) fn vision_config(
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

pub(super) struct Resolver<'a> {
    pub(super) file: &'a str,
    pub(super) key_prefix: &'a str,
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

    pub(super) fn resolve(
        &self,
        mut raw: RawTextConfig,
        architecture: Architecture,
        vision: Option<VisionConfig>,
        tie_word_embeddings: bool,
    ) -> Result<Llama4Config, ConfigError> {
        let vocab_size = self.bounded(raw.vocab_size, "vocab_size", limits::VOCAB)?;
        let hidden_size = self.bounded(raw.hidden_size, "hidden_size", limits::WIDTH)?;
        let num_layers =
            self.bounded(raw.num_hidden_layers, "num_hidden_layers", limits::LAYERS)?;
        let (num_heads, num_kv_heads, head_dim) = self.attention_shape(&raw, hidden_size)?;
        let uses_rope = self.rope_layers(
            raw.no_rope_layers.take(),
            raw.no_rope_layer_interval,
            num_layers,
        )?;
        let moe_layers = self.moe_layers(
            raw.moe_layers.take(),
            raw.interleave_moe_layer_step,
            num_layers,
        )?;
        let ffn = self.feed_forward(&raw, &moe_layers, num_layers)?;
        let rope = self.rope(
            raw.rope_theta,
            raw.rope_scaling.take(),
            raw.rope_parameters.take(),
        )?;
        let tuning = self.attention_tuning(&raw)?;
        Ok(Llama4Config {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: ffn.intermediate_size,
            intermediate_size_mlp: ffn.intermediate_size_mlp,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: tuning.rms_norm_eps,
            rope,
            uses_rope,
            moe_layers,
            num_experts: ffn.num_experts,
            top_k: ffn.top_k,
            use_qk_norm: raw.use_qk_norm.unwrap_or(true),
            attention_chunk_size: tuning.attention_chunk_size,
            attn_temperature_tuning: tuning.attn_temperature_tuning,
            floor_scale: tuning.floor_scale,
            attn_scale: raw.attn_scale.unwrap_or(0.1),
            tie_word_embeddings: tie_word_embeddings || raw.tie_word_embeddings.unwrap_or(false),
            vision,
        })
    }

    /// Heads, KV heads (dividing the heads) and an even head dim (hidden / heads when absent).
    fn attention_shape(
        &self,
        raw: &RawTextConfig,
        hidden_size: usize,
    ) -> Result<(usize, usize, usize), ConfigError> {
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

        Ok((num_heads, num_kv_heads, head_dim))
    }

    /// Which layers use RoPE: `no_rope_layers` (1 = RoPE), else every `no_rope_layer_interval`-th
    /// layer is NoPE.
    fn rope_layers(
        &self,
        no_rope_layers: Option<Vec<i64>>,
        no_rope_layer_interval: Option<usize>,
        num_layers: usize,
    ) -> Result<Vec<bool>, ConfigError> {
        Ok(match no_rope_layers.filter(|l| !l.is_empty()) {
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
                    Some(no_rope_layer_interval.unwrap_or(4)),
                    "no_rope_layer_interval",
                )?;
                (0..num_layers).map(|i| (i + 1) % interval != 0).collect()
            }
        })
    }

    /// The MoE layers: `moe_layers` (sorted, deduplicated, in range), else every
    /// `interleave_moe_layer_step`-th layer.
    fn moe_layers(
        &self,
        moe_layers: Option<Vec<usize>>,
        interleave_moe_layer_step: Option<usize>,
        num_layers: usize,
    ) -> Result<Vec<usize>, ConfigError> {
        Ok(match moe_layers {
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
                    Some(interleave_moe_layer_step.unwrap_or(1)),
                    "interleave_moe_layer_step",
                )?;
                (step - 1..num_layers).step_by(step).collect()
            }
        })
    }

    /// Expert and dense MLP widths, expert count and top-k (the MLP width only required when a dense
    /// layer exists, the expert keys only when a MoE layer does).
    fn feed_forward(
        &self,
        raw: &RawTextConfig,
        moe_layers: &[usize],
        num_layers: usize,
    ) -> Result<FeedForward, ConfigError> {
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

        Ok(FeedForward {
            intermediate_size,
            intermediate_size_mlp,
            num_experts,
            top_k,
        })
    }

    /// The attention chunk (8192 when absent, none when `null`), RMSNorm epsilon and NoPE temperature
    /// settings.
    fn attention_tuning(&self, raw: &RawTextConfig) -> Result<Tuning, ConfigError> {
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
        Ok(Tuning {
            attention_chunk_size,
            rms_norm_eps,
            attn_temperature_tuning,
            floor_scale,
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

/// The feed-forward part of a resolved config.
struct FeedForward {
    intermediate_size: usize,
    intermediate_size_mlp: usize,
    num_experts: usize,
    top_k: usize,
}

/// The attention settings of a resolved config beside its shape.
struct Tuning {
    attention_chunk_size: Option<usize>,
    rms_norm_eps: f64,
    attn_temperature_tuning: bool,
    floor_scale: f64,
}
