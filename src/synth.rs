//! Synthetic Llama 4-shaped checkpoints for measuring herd at size: seeded random bf16 weights in the
//! published ConditionalGeneration layout (text, optionally a vision tower), sharded with an index.
//! Tensors are generated one at a time while the safetensors writer asks for them, so memory stays at
//! one tensor.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use safetensors::tensor::View;
use safetensors::Dtype;
use serde_json::json;

/// The shape of a synthetic checkpoint.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    /// Expert and shared-expert width.
    pub intermediate: usize,
    /// Dense MLP width (layers that are not MoE).
    pub intermediate_mlp: usize,
    /// 1: every layer MoE (Scout); 2: odd layers MoE (Maverick).
    pub moe_step: usize,
    pub vocab: usize,
    pub shard_bytes: u64,
    pub seed: u64,
    /// Vision tower layers at Scout's vision widths (1408 hidden, 16 heads, 336px tiles), if any.
    pub vision_layers: Option<usize>,
}

/// Scout's vision tower widths (`vision_config` of Llama-4-Scout-17B-16E).
const VISION_HIDDEN: usize = 1408;
const VISION_HEADS: usize = 16;
const VISION_INTERMEDIATE: usize = 5632;
const VISION_IMAGE: usize = 336;
const VISION_PATCH: usize = 14;
const VISION_PROJECTOR: usize = 4096;
/// Image tokens of a synthetic vocabulary: its last six ids.
const IMAGE_TOKENS: [&str; 6] = [
    "<|image_start|>",
    "<|image_end|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
    "<|image|>",
    "<|patch|>",
];

/// Named presets.
pub fn preset(name: &str) -> Option<SynthSpec> {
    let scout = SynthSpec {
        layers: 4,
        hidden: 5120,
        heads: 40,
        kv_heads: 8,
        head_dim: 128,
        experts: 16,
        intermediate: 256,
        intermediate_mlp: 512,
        moe_step: 1,
        vocab: 8192,
        shard_bytes: 1 << 30,
        seed: 1,
        vision_layers: None,
    };
    Some(match name {
        // ~1.2 GB: Scout's width, heads and 16 experts; narrow experts, small vocabulary, 4 layers.
        "scout-mini" => scout,
        // ~1.5 GB: scout-mini plus 4 of the vision tower's 34 layers at Scout's widths.
        "scout-mini-vision" => SynthSpec {
            vision_layers: Some(4),
            ..scout
        },
        // ~8.1 GB: 8 layers with 1536-wide experts and a 32k vocabulary.
        "scout-8gb" => SynthSpec {
            layers: 8,
            intermediate: 1536,
            vocab: 32768,
            ..scout
        },
        // For tests of memory scaling: identical tensors, 2 vs 8 layers (~134 MB vs ~490 MB).
        "ci-small" => SynthSpec {
            layers: 2,
            hidden: 1024,
            heads: 8,
            kv_heads: 2,
            intermediate: 512,
            vocab: 4096,
            ..scout
        },
        "ci-large" => SynthSpec {
            layers: 8,
            hidden: 1024,
            heads: 8,
            kv_heads: 2,
            intermediate: 512,
            vocab: 4096,
            ..scout
        },
        _ => return None,
    })
}

/// Names of the presets, for help and errors.
pub const PRESETS: &str =
    "scout-mini (~1.2 GB), scout-mini-vision (~1.5 GB), scout-8gb (~8.1 GB), ci-small, ci-large";

struct SynthTensor {
    shape: Vec<usize>,
    seed: u64,
    /// Values are uniform in [-scale, scale], or exactly `fill` when set (norm weights).
    scale: f32,
    fill: Option<f32>,
}

impl View for &SynthTensor {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        const CHUNK: usize = 1 << 20;
        let n: usize = self.shape.iter().product();
        let mut bytes = vec![0u8; n * 2];
        bytes
            .par_chunks_mut(CHUNK * 2)
            .enumerate()
            .for_each(|(i, out)| {
                let mut rng = SmallRng::seed_from_u64(
                    self.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                for pair in out.chunks_exact_mut(2) {
                    let v = self
                        .fill
                        .unwrap_or_else(|| rng.random_range(-self.scale..self.scale));
                    pair.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                }
            });
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}

fn tensors(s: &SynthSpec) -> Vec<(String, SynthTensor)> {
    let mut t = Tensors {
        seed: s.seed,
        out: Vec::new(),
    };
    let (h, p) = (s.hidden, "language_model.");
    t.add(
        format!("{p}model.embed_tokens.weight"),
        vec![s.vocab, h],
        None,
    );
    for i in 0..s.layers {
        t.text_layer(s, i);
    }
    t.add(format!("{p}model.norm.weight"), vec![h], Some(1.0));
    t.add(format!("{p}lm_head.weight"), vec![s.vocab, h], None);
    if let Some(layers) = s.vision_layers {
        t.vision(h, layers);
    }
    t.out
}

/// The tensors of a synthetic checkpoint, in file order.
struct Tensors {
    seed: u64,
    out: Vec<(String, SynthTensor)>,
}

impl Tensors {
    /// A tensor of random values (seeded by the checkpoint's seed and the name), or all `fill`.
    fn add(&mut self, name: String, shape: Vec<usize>, fill: Option<f32>) {
        let seed = self.seed.wrapping_mul(31).wrapping_add(
            name.bytes()
                .fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(b as u64)),
        );
        // std 0.02 like Llama's initialiser: uniform with the same variance.
        self.out.push((
            name,
            SynthTensor {
                shape,
                seed,
                scale: 0.02 * 3f32.sqrt(),
                fill,
            },
        ));
    }

    /// Decoder layer `i`: norms, attention, and a MoE (every `moe_step`-th layer) or dense MLP.
    fn text_layer(&mut self, s: &SynthSpec, i: usize) {
        let (h, d) = (s.hidden, s.head_dim);
        let p = "language_model.";
        let l = format!("{p}model.layers.{i}.");
        self.add(format!("{l}input_layernorm.weight"), vec![h], Some(1.0));
        self.add(
            format!("{l}post_attention_layernorm.weight"),
            vec![h],
            Some(1.0),
        );
        self.add(
            format!("{l}self_attn.q_proj.weight"),
            vec![s.heads * d, h],
            None,
        );
        self.add(
            format!("{l}self_attn.k_proj.weight"),
            vec![s.kv_heads * d, h],
            None,
        );
        self.add(
            format!("{l}self_attn.v_proj.weight"),
            vec![s.kv_heads * d, h],
            None,
        );
        self.add(
            format!("{l}self_attn.o_proj.weight"),
            vec![h, s.heads * d],
            None,
        );
        let f = format!("{l}feed_forward.");
        if (i + 1) % s.moe_step == 0 {
            self.add(format!("{f}router.weight"), vec![s.experts, h], None);
            self.add(
                format!("{f}experts.gate_up_proj"),
                vec![s.experts, h, 2 * s.intermediate],
                None,
            );
            self.add(
                format!("{f}experts.down_proj"),
                vec![s.experts, s.intermediate, h],
                None,
            );
            self.add(
                format!("{f}shared_expert.gate_proj.weight"),
                vec![s.intermediate, h],
                None,
            );
            self.add(
                format!("{f}shared_expert.up_proj.weight"),
                vec![s.intermediate, h],
                None,
            );
            self.add(
                format!("{f}shared_expert.down_proj.weight"),
                vec![h, s.intermediate],
                None,
            );
        } else {
            self.add(
                format!("{f}gate_proj.weight"),
                vec![s.intermediate_mlp, h],
                None,
            );
            self.add(
                format!("{f}up_proj.weight"),
                vec![s.intermediate_mlp, h],
                None,
            );
            self.add(
                format!("{f}down_proj.weight"),
                vec![h, s.intermediate_mlp],
                None,
            );
        }
    }

    /// The vision encoder of `layers` layers, its adapter and the projector into width `h`.
    fn vision(&mut self, h: usize, layers: usize) {
        let (vh, vi, grid) = (
            VISION_HIDDEN,
            VISION_INTERMEDIATE,
            VISION_IMAGE / VISION_PATCH,
        );
        let v = "vision_model.";
        self.add(
            format!("{v}patch_embedding.linear.weight"),
            vec![vh, 3 * VISION_PATCH * VISION_PATCH],
            None,
        );
        self.add(format!("{v}class_embedding"), vec![vh], None);
        self.add(
            format!("{v}positional_embedding_vlm"),
            vec![grid * grid + 1, vh],
            None,
        );
        for norm in ["layernorm_pre", "layernorm_post"] {
            self.add(format!("{v}{norm}.weight"), vec![vh], Some(1.0));
            self.add(format!("{v}{norm}.bias"), vec![vh], Some(0.0));
        }
        for i in 0..layers {
            let l = format!("{v}model.layers.{i}.");
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                self.add(format!("{l}{norm}.weight"), vec![vh], Some(1.0));
                self.add(format!("{l}{norm}.bias"), vec![vh], Some(0.0));
            }
            for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                self.add(format!("{l}self_attn.{proj}.weight"), vec![vh, vh], None);
                self.add(format!("{l}self_attn.{proj}.bias"), vec![vh], None);
            }
            self.add(format!("{l}mlp.fc1.weight"), vec![vi, vh], None);
            self.add(format!("{l}mlp.fc1.bias"), vec![vi], None);
            self.add(format!("{l}mlp.fc2.weight"), vec![vh, vi], None);
            self.add(format!("{l}mlp.fc2.bias"), vec![vh], None);
        }
        self.add(
            format!("{v}vision_adapter.mlp.fc1.weight"),
            vec![VISION_PROJECTOR, vi],
            None,
        );
        self.add(
            format!("{v}vision_adapter.mlp.fc2.weight"),
            vec![VISION_PROJECTOR, VISION_PROJECTOR],
            None,
        );
        self.add(
            "multi_modal_projector.linear_1.weight".into(),
            vec![h, VISION_PROJECTOR],
            None,
        );
    }
}

/// A minimal tokenizer.json holding only the image tokens (at the top of the vocabulary), so image
/// prompts can be laid out; synthetic checkpoints have no real tokenizer.
fn image_tokenizer(vocab: usize) -> serde_json::Value {
    let first = vocab - IMAGE_TOKENS.len();
    let added: Vec<serde_json::Value> = IMAGE_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": first + i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0}, "unk_token": "<unk>"}
    })
}

fn config(s: &SynthSpec) -> serde_json::Value {
    let mut config = text_config(s);
    if let Some(layers) = s.vision_layers {
        let first = (s.vocab - IMAGE_TOKENS.len()) as i64;
        config["boi_token_index"] = json!(first);
        config["eoi_token_index"] = json!(first + 1);
        config["image_token_index"] = json!(first + 5);
        config["vision_config"] = json!({
            "hidden_act": "gelu", "hidden_size": VISION_HIDDEN, "image_size": VISION_IMAGE,
            "intermediate_size": VISION_INTERMEDIATE, "num_attention_heads": VISION_HEADS,
            "num_channels": 3, "num_hidden_layers": layers, "patch_size": VISION_PATCH,
            "pixel_shuffle_ratio": 0.5, "projector_input_dim": VISION_PROJECTOR,
            "projector_output_dim": VISION_PROJECTOR, "rope_theta": 10000,
            "vision_output_dim": VISION_PROJECTOR
        });
    }
    config
}

fn text_config(s: &SynthSpec) -> serde_json::Value {
    json!({
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "tie_word_embeddings": false,
        "text_config": {
            "model_type": "llama4_text",
            "vocab_size": s.vocab,
            "hidden_size": s.hidden,
            "intermediate_size": s.intermediate,
            "intermediate_size_mlp": s.intermediate_mlp,
            "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads,
            "head_dim": s.head_dim,
            "num_local_experts": s.experts,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": s.moe_step,
            "no_rope_layers": [],
            "use_qk_norm": true,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
            "attention_chunk_size": 8192,
            "attn_temperature_tuning": 4,
            "floor_scale": 8192,
            "attn_scale": 0.1,
            "bos_token_id": 1,
            "eos_token_id": [2],
            "torch_dtype": "bfloat16"
        }
    })
}

/// Writes the checkpoint into `dir` (created; must not exist unless `force`). Returns the bytes written.
pub fn write(
    spec: &SynthSpec,
    dir: &Path,
    force: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    if dir.exists() && !force {
        anyhow::bail!(
            "{} already exists; pass --force to replace it",
            dir.display()
        );
    }
    let staging = dir.with_extension("herd-partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| staging.display().to_string())?;
    }
    std::fs::create_dir_all(&staging).with_context(|| staging.display().to_string())?;
    let all = tensors(spec);
    let total: u64 = all.iter().map(|(_, t)| (&t).data_len() as u64).sum();
    // Greedy sharding in name order, each shard up to shard_bytes (a larger tensor gets its own shard).
    let mut shards: Vec<Vec<&(String, SynthTensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in &all {
        let n = (&t.1).data_len() as u64;
        if size > 0 && size + n > spec.shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("one shard").push(t);
        size += n;
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut done = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        for (name, t) in shard.iter().map(|t| (&t.0, &t.1)) {
            weight_map.insert(name.clone(), file.clone());
            done += (&t).data_len() as u64;
        }
        let views = shard.iter().map(|t| (t.0.clone(), &t.1));
        safetensors::serialize_to_file(views, None, &staging.join(&file))
            .with_context(|| format!("writing {file}"))?;
        progress(done, total);
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        staging.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    std::fs::write(
        staging.join("config.json"),
        serde_json::to_string_pretty(&config(spec))?,
    )?;
    if spec.vision_layers.is_some() {
        std::fs::write(
            staging.join("tokenizer.json"),
            serde_json::to_string_pretty(&image_tokenizer(spec.vocab))?,
        )?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    std::fs::rename(&staging, dir).with_context(|| dir.display().to_string())?;
    Ok(total)
}
