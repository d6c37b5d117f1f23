//! The manifest's image section: what the runtime needs to turn images into decoder inputs, from the
//! checkpoint's config, its `preprocessor_config.json` (when present) and its tokenizer's image tokens.

use std::path::Path;

use anyhow::{Context, Result};
use herd_ir::config::VisionConfig;
use herd_runtime::manifest::{ImageTokens, VisionInfo};

/// The processor settings herd reproduces (transformers' `Llama4ImageProcessorFast` defaults unless
/// `preprocessor_config.json` says otherwise).
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessing {
    /// `max_patches`: most tiles of one canvas.
    pub max_tiles: usize,
    pub rescale_factor: f64,
    pub image_mean: Vec<f32>,
    pub image_std: Vec<f32>,
}

/// Most tiles of one image's canvas herd compiles for (as `--max-tiles` allows).
const MAX_TILES: usize = 64;

/// Reads `preprocessor_config.json` from `model_dir` if there is one; `max_tiles` (from the command line)
/// overrides its `max_patches`. Settings herd does not implement are refused, naming the key.
pub fn preprocessing(
    model_dir: &Path,
    v: &VisionConfig,
    max_tiles: Option<usize>,
) -> Result<Preprocessing> {
    let found = herd_ir::model_file(model_dir, "preprocessor_config.json")?;
    let path = model_dir.join("preprocessor_config.json");
    let text = match found {
        Some(_) => {
            Some(std::fs::read_to_string(&path).with_context(|| path.display().to_string())?)
        }
        None => None,
    };
    preprocessing_from_json(text.as_deref(), &path.display().to_string(), v, max_tiles)
}

/// [`preprocessing`] of the text of a `preprocessor_config.json` (None: the file is absent), named
/// `label` in errors.
pub fn preprocessing_from_json(
    text: Option<&str>,
    label: &str,
    v: &VisionConfig,
    max_tiles: Option<usize>,
) -> Result<Preprocessing> {
    let config: serde_json::Value = match text {
        Some(text) => {
            serde_json::from_str(text).with_context(|| format!("{label}: invalid JSON"))?
        }
        None => serde_json::json!({}),
    };
    let bad = |key: &str, problem: String| anyhow::anyhow!("{label}: `{key}` {problem}");
    let channels = |key: &str| -> Result<Vec<f32>> {
        match config.get(key) {
            None | Some(serde_json::Value::Null) => Ok(vec![0.5; v.num_channels]),
            Some(value) => {
                let values: Vec<f32> = value
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_f64())
                            .map(|x| x as f32)
                            .collect()
                    })
                    .unwrap_or_default();
                if values.len() != v.num_channels || (key == "image_std" && values.contains(&0.0)) {
                    return Err(bad(
                        key,
                        format!("must list {} nonzero numbers", v.num_channels),
                    ));
                }
                Ok(values)
            }
        }
    };
    for key in ["do_resize", "do_rescale", "do_normalize", "do_convert_rgb"] {
        if config.get(key).and_then(|x| x.as_bool()) == Some(false) {
            return Err(bad(
                key,
                "is false; herd reproduces Llama 4's processor, which does it".into(),
            ));
        }
    }
    if config.get("resize_to_max_canvas").and_then(|x| x.as_bool()) == Some(true) {
        return Err(bad(
            "resize_to_max_canvas",
            "is true; herd implements the default (downscale as little as possible)".into(),
        ));
    }
    if let Some(resample) = config.get("resample").and_then(|x| x.as_i64()) {
        if resample != 2 {
            return Err(bad(
                "resample",
                format!("is {resample}; herd resizes bilinearly (2) like Llama 4's processor"),
            ));
        }
    }
    if let Some(size) = config.get("size").filter(|s| !s.is_null()) {
        let side = |k: &str| size.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        if side("height") != Some(v.image_size) || side("width") != Some(v.image_size) {
            return Err(bad(
                "size",
                format!(
                    "is {size}; the vision tower takes {0}x{0} tiles",
                    v.image_size
                ),
            ));
        }
    }
    let from_file = config
        .get("max_patches")
        .and_then(|x| x.as_u64())
        .map(|x| x as usize);
    let max_tiles = max_tiles.or(from_file).unwrap_or(16);
    if max_tiles == 0 || max_tiles > MAX_TILES {
        return Err(bad(
            "max_patches",
            format!("is {max_tiles}; it must be in 1..={MAX_TILES} (Llama 4: 16)"),
        ));
    }
    let rescale_factor = match config.get("rescale_factor") {
        None | Some(serde_json::Value::Null) => 1.0 / 255.0,
        Some(x) => x
            .as_f64()
            .filter(|f| *f > 0.0)
            .ok_or_else(|| bad("rescale_factor", "must be a positive number".into()))?,
    };
    Ok(Preprocessing {
        max_tiles,
        rescale_factor,
        image_mean: channels("image_mean")?,
        image_std: channels("image_std")?,
    })
}

/// The manifest's image section: the vision graph's names, preprocessing constants and the image
/// token ids (`<|image|>` and the tile separators come from tokenizer.json).
pub fn vision_info(
    model_dir: &Path,
    model_file: &str,
    v: &VisionConfig,
    pre: &Preprocessing,
    max_images: usize,
) -> Result<VisionInfo> {
    let path = model_dir.join("tokenizer.json");
    herd_ir::model_file(model_dir, "tokenizer.json")?;
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: the image prompt layout needs the tokenizer's image tokens (or compile with --text-only)",
            path.display()
        )
    })?;
    let tokenizer: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let id_of = |content: &str| -> Result<i64> {
        tokenizer["added_tokens"]
            .as_array()
            .and_then(|tokens| {
                tokens
                    .iter()
                    .find(|t| t["content"] == content)
                    .and_then(|t| t["id"].as_i64())
            })
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no added token `{content}`, which image prompts need (or compile with --text-only)",
                    path.display()
                )
            })
    };
    let tokens = ImageTokens {
        image_start: v.image_start_id,
        image_end: v.image_end_id,
        image: id_of("<|image|>")?,
        patch: v.patch_token_id,
        tile_x_separator: id_of("<|tile_x_separator|>")?,
        tile_y_separator: id_of("<|tile_y_separator|>")?,
    };
    for (what, id) in [
        ("<|patch|>", tokens.patch),
        ("<|image_start|>", tokens.image_start),
        ("<|image_end|>", tokens.image_end),
    ] {
        if id_of(what)? != id {
            anyhow::bail!(
                "config.json and {} disagree on the id of {what}",
                path.display()
            );
        }
    }
    Ok(VisionInfo {
        model_file: model_file.to_string(),
        pixel_values: herd_ir::vision::PIXEL_VALUES.into(),
        image_features: herd_ir::vision::IMAGE_FEATURES.into(),
        decoder_features: herd_ir::import::IMAGE_FEATURES_INPUT.into(),
        decoder_positions: herd_ir::import::IMAGE_POSITIONS_INPUT.into(),
        tile_size: v.image_size,
        num_channels: v.num_channels,
        tokens_per_tile: v.tokens_per_tile(),
        max_tiles: pre.max_tiles,
        max_images,
        rescale_factor: pre.rescale_factor,
        image_mean: pre.image_mean.clone(),
        image_std: pre.image_std.clone(),
        tokens,
    })
}
