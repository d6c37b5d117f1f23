//! The bodies of herd's fuzz targets (`fuzz/fuzz_targets/*.rs` call them under libFuzzer, and
//! `tests/fuzz_replay.rs` replays the committed corpus and regressions through them on stable). Each
//! feeds untrusted bytes to a parser herd runs on files it did not write; a panic, abort or hang is a
//! finding, an `Err` is the expected outcome for most inputs.

use herd_ir::config::{Llama4Config, VisionConfig};
use herd_runtime::manifest::VisionInfo;
use herd_runtime::vision::{self, ImageSource};
use herd_runtime::{Message, TextCodec};

/// A fuzz target's body: untrusted bytes in, nothing out (it must not panic).
pub type Target = fn(&[u8]);

/// The fuzz targets, by name: what each parses.
pub const TARGETS: [(&str, Target); 7] = [
    ("safetensors_header", safetensors_header),
    ("index", index),
    ("config", config),
    ("preprocessor", preprocessor),
    ("manifest", manifest),
    ("image", image),
    ("template", template),
];

/// A safetensors file: header length, JSON, offsets, byte counts.
pub fn safetensors_header(data: &[u8]) {
    let _ = herd_ir::weights::parse_header("fuzz.safetensors", data);
}

/// A `model.safetensors.index.json`.
pub fn index(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = herd_ir::parse_index("fuzz.index.json", text);
    }
}

/// A `config.json`, resolved.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Llama4Config::from_json(text, "config.json");
    }
}

/// A `preprocessor_config.json` against Scout's vision tower.
pub fn preprocessor(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::vision_manifest::preprocessing_from_json(
            Some(text),
            "preprocessor_config.json",
            &scout_vision(),
            None,
        );
    }
}

/// A bundle's `manifest.json`.
pub fn manifest(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = herd_runtime::parse_manifest("manifest.json", text);
    }
}

/// An image file (PNG or JPEG), decoded and cut into tiles as a prompt's image would be.
pub fn image(data: &[u8]) {
    let source = ImageSource::Bytes {
        label: "fuzz image".into(),
        data: data.to_vec(),
    };
    if let Ok(img) = vision::load_image(&source) {
        let _ = vision::preprocess(&img, &fixture_vision_info());
    }
}

/// A chat template rendering a short conversation (first byte 0), or a prompt text tokenized within
/// a 64-position budget (otherwise), with the tiny fixtures' byte-level BPE tokenizer.
pub fn template(data: &[u8]) {
    static CODEC: std::sync::OnceLock<Option<std::sync::Mutex<TextCodec>>> =
        std::sync::OnceLock::new();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let codec = CODEC.get_or_init(|| {
        TextCodec::from_parts(
            "tokenizer.json",
            TOKENIZER,
            String::new(),
            "<|begin_of_text|>".into(),
        )
        .ok()
        .map(std::sync::Mutex::new)
    });
    let Some(Ok(mut codec)) = codec.as_ref().map(|c| c.lock()) else {
        return;
    };
    if mode == 0 {
        codec.set_template(text.to_string());
        let messages = [
            Message {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            Message {
                role: "user".into(),
                content: "Hello <|image|> there".into(),
            },
        ];
        let _ = codec.encode_chat_bounded(&messages, true, 64);
    } else if codec.check_length(text, 64).is_ok() {
        let _ = codec.encode(text);
    }
}

/// The tiny fixtures' tokenizer (byte-level BPE with Llama 4's special tokens).
const TOKENIZER: &[u8] = include_bytes!("../tests/fixtures/tiny-maverick/tokenizer.json");

fn scout_vision() -> VisionConfig {
    VisionConfig {
        hidden_size: 1408,
        num_layers: 34,
        num_heads: 16,
        intermediate_size: 5632,
        image_size: 336,
        patch_size: 14,
        num_channels: 3,
        rope_theta: 10000.0,
        pixel_shuffle_ratio: 0.5,
        projector_input_dim: 4096,
        projector_output_dim: 4096,
        vision_output_dim: 4096,
        patch_token_id: 200092,
        image_start_id: 200080,
        image_end_id: 200081,
    }
}

/// tiny-scout's image settings (56-pixel tiles, up to 16 of them).
fn fixture_vision_info() -> VisionInfo {
    serde_json::from_str(
        r#"{"model_file": "vision.onnx", "pixel_values": "pixel_values", "image_features": "image_features",
            "decoder_features": "image_features", "decoder_positions": "image_positions", "tile_size": 56,
            "num_channels": 3, "tokens_per_tile": 4, "max_tiles": 16, "max_images": 8,
            "rescale_factor": 0.00392156862745098, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "tokens": {"image_start": 494, "image_end": 495, "image": 498, "patch": 499,
                       "tile_x_separator": 496, "tile_y_separator": 497}}"#,
    )
    .expect("a valid vision section")
}
