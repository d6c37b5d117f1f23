//! The front end: opens a Hugging Face Llama 4 checkpoint folder (config.json + safetensors, one file or
//! sharded with an index), validates every tensor the config implies, and builds the Imported-phase graph.
//! Weights are mmapped and referenced, never copied. The vision tower is enumerated, not compiled.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::Llama4Config;
use crate::error::{Diagnostic, ImportError, VerifyError};
use crate::graph::{Graph, Value};
use crate::ops::{
    AttentionAttrs, ChunkAttrs, InputAttrs, MoeAttrs, Op, Phase, RmsNormAttrs, RopeAttrs,
    TemperatureAttrs,
};
use crate::types::{DType, Dim, SymDim, TensorType};
use crate::verify::verify;
use crate::weights::{
    dtype_from_safetensors, PartScale, Shard, ShardId, TensorSource, Transform, WeightPart,
    WeightRef, WeightStore,
};

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";
const VISION_PREFIXES: [&str; 2] = ["vision_model.", "multi_modal_projector."];

/// A checkpoint folder with its resolved config and mmapped, validated shards.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Llama4Config,
    pub store: Arc<WeightStore>,
    /// Every tensor the checkpoint holds, with the shard holding it.
    locations: BTreeMap<String, ShardId>,
}

/// A tensor's name, dtype and shape, as recorded for the vision tower.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// Parameter counts of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    /// Every tensor, vision included.
    pub total: u64,
    pub text: u64,
    pub vision: u64,
    /// Text parameters used per token: all but the routed experts that top-k does not select.
    pub active: u64,
}

#[derive(Deserialize)]
struct RawIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens `dir`: reads config.json, maps and validates every shard.
    pub fn open(dir: &Path) -> Result<Checkpoint, ImportError> {
        let config_path =
            model_file(dir, "config.json")?.unwrap_or_else(|| dir.join("config.json"));
        let config = Llama4Config::from_file(&config_path)?;
        let mut store = WeightStore::default();
        let mut locations = BTreeMap::new();
        let single = model_file(dir, SINGLE_FILE)?;
        if let Some(index_path) = model_file(dir, INDEX_FILE)? {
            let index_name = index_path.display().to_string();
            let text = std::fs::read_to_string(&index_path).map_err(|e| ImportError::BadIndex {
                file: index_name.clone(),
                problem: e.to_string(),
            })?;
            let weight_map = parse_index(&index_name, &text)?;
            let mut opened: BTreeMap<String, ShardId> = BTreeMap::new();
            for shard_name in weight_map.values() {
                if opened.contains_key(shard_name) {
                    continue;
                }
                let path =
                    shard_path(dir, shard_name).map_err(|problem| ImportError::BadIndex {
                        file: index_name.clone(),
                        problem,
                    })?;
                let id = store.push(Shard::open(&path, &path.display().to_string())?);
                opened.insert(shard_name.clone(), id);
            }
            for (tensor, shard_name) in &weight_map {
                let id = opened[shard_name];
                if store.shard(id).info(tensor).is_none() {
                    return Err(ImportError::NotInShard {
                        index: index_name.clone(),
                        tensor: tensor.clone(),
                        shard: shard_name.clone(),
                    });
                }
                locations.insert(tensor.clone(), id);
            }
        } else if let Some(path) = single {
            let id = store.push(Shard::open(&path, &path.display().to_string())?);
            for name in store.shard(id).tensor_names() {
                locations.insert(name.to_string(), id);
            }
        } else {
            return Err(ImportError::NoWeights {
                dir: dir.display().to_string(),
            });
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            store: Arc::new(store),
            locations,
        })
    }

    /// Names of all tensors, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.locations.keys().map(String::as_str)
    }

    fn summary(&self, name: &str) -> Option<TensorSummary> {
        let info = self.store.shard(*self.locations.get(name)?).info(name)?;
        Some(TensorSummary {
            name: name.to_string(),
            dtype: format!("{:?}", info.dtype),
            shape: info.shape.clone(),
        })
    }

    /// The vision tower and projector tensors, sorted by name.
    pub fn vision_tensors(&self) -> Vec<TensorSummary> {
        self.tensor_names()
            .filter(|n| VISION_PREFIXES.iter().any(|p| n.starts_with(p)))
            .filter_map(|n| self.summary(n))
            .collect()
    }

    /// Parameter counts (total, text, vision, active per token).
    pub fn param_counts(&self) -> ParamCounts {
        let mut counts = ParamCounts {
            total: 0,
            text: 0,
            vision: 0,
            active: 0,
        };
        for name in self.tensor_names() {
            let n = self
                .summary(name)
                .map_or(0, |s| s.shape.iter().product::<usize>() as u64);
            counts.total += n;
            if VISION_PREFIXES.iter().any(|p| name.starts_with(p)) {
                counts.vision += n;
            } else {
                counts.text += n;
            }
        }
        let c = &self.config;
        let idle_experts = c.num_experts.saturating_sub(c.top_k) as u64;
        let per_expert = 3 * (c.hidden_size * c.intermediate_size) as u64;
        counts.active = counts.text - idle_experts * per_expert * c.moe_layers.len() as u64;
        counts
    }

    /// A reference to tensor `name`, checked to exist with `shape` and a float dtype herd reads. An fp8
    /// tensor is accepted with its compressed-tensors `{name}_scale` ([rows, 1], one scale per row).
    pub fn weight(
        &self,
        name: &str,
        shape: &[usize],
        what: &str,
    ) -> Result<WeightRef, ImportError> {
        Ok(WeightRef::single(self.part(name, shape, what)?))
    }

    fn part(&self, name: &str, shape: &[usize], what: &str) -> Result<WeightPart, ImportError> {
        let missing = |tensor: &str| ImportError::MissingTensor {
            tensor: tensor.to_string(),
            what: what.to_string(),
        };
        let shard = *self.locations.get(name).ok_or_else(|| missing(name))?;
        let file = self.store.shard(shard);
        let info = file.info(name).ok_or_else(|| missing(name))?;
        let unsupported = || ImportError::UnsupportedWeightDtype {
            tensor: name.to_string(),
            file: file.name.clone(),
            dtype: format!("{:?}", info.dtype),
        };
        let dtype = dtype_from_safetensors(info.dtype)
            .filter(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3))
            .ok_or_else(unsupported)?;
        if info.shape != shape {
            return Err(ImportError::WrongShape {
                tensor: name.to_string(),
                file: file.name.clone(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let scale = if dtype == DType::F8E4M3 {
            let scale = format!("{name}_scale");
            let id = *self.locations.get(&scale).ok_or_else(|| missing(&scale))?;
            let scale_file = self.store.shard(id);
            let scale_info = scale_file.info(&scale).ok_or_else(|| missing(&scale))?;
            let float = dtype_from_safetensors(scale_info.dtype)
                .is_some_and(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16));
            if !float || scale_info.shape != [shape[0], 1] {
                return Err(ImportError::WrongShape {
                    tensor: scale.clone(),
                    file: scale_file.name.clone(),
                    expected: vec![shape[0], 1],
                    found: scale_info.shape.clone(),
                });
            }
            Some(PartScale {
                source: TensorSource {
                    shard: id,
                    tensor: scale,
                },
                dtype: dtype_from_safetensors(scale_info.dtype).unwrap_or(DType::F32),
                scheme: crate::quant::QuantScheme::Fp8,
            })
        } else {
            None
        };
        if dtype == DType::F8E4M3 && shape.len() != 2 {
            return Err(unsupported());
        }
        Ok(WeightPart {
            source: TensorSource {
                shard,
                tensor: name.to_string(),
            },
            dtype,
            stored_shape: shape.to_vec(),
            scale,
        })
    }

    /// The routed experts' `gate_up` [E, H, 2I] and `down` [E, I, H] (used as `z @ W`), from the fused
    /// transformers tensors or, in pre-quantized checkpoints, from per-expert nn.Linear tensors
    /// `experts.{e}.{gate,up,down}_proj.weight` stacked by lazy transforms.
    pub fn experts(
        &self,
        prefix: &str,
        e: usize,
        inter: usize,
        h: usize,
        what: &dyn Fn(&str) -> String,
    ) -> Result<(WeightRef, WeightRef), ImportError> {
        let fused = format!("{prefix}experts.gate_up_proj");
        if self.locations.contains_key(&fused)
            || !self
                .locations
                .contains_key(&format!("{prefix}experts.0.gate_proj.weight"))
        {
            return Ok((
                self.weight(&fused, &[e, h, 2 * inter], &what("experts gate/up"))?,
                self.weight(
                    &format!("{prefix}experts.down_proj"),
                    &[e, inter, h],
                    &what("experts down"),
                )?,
            ));
        }
        let mut gate_up = Vec::new();
        let mut down = Vec::new();
        for x in 0..e {
            let p = format!("{prefix}experts.{x}.");
            gate_up.push(self.part(
                &format!("{p}gate_proj.weight"),
                &[inter, h],
                &what(&format!("expert {x} gate")),
            )?);
            gate_up.push(self.part(
                &format!("{p}up_proj.weight"),
                &[inter, h],
                &what(&format!("expert {x} up")),
            )?);
            down.push(self.part(
                &format!("{p}down_proj.weight"),
                &[h, inter],
                &what(&format!("expert {x} down")),
            )?);
        }
        // [g0; u0; g1; u1; ...] rows -> [E, 2I, H] -> [E, H, 2I]: gate columns, then up columns.
        let gate_up = WeightRef {
            parts: gate_up,
            concat_axis: 0,
            transforms: vec![],
            quant: None,
        }
        .with(Transform::Reshape {
            shape: vec![e, 2 * inter, h],
        })
        .with(Transform::Transpose {
            perm: vec![0, 2, 1],
        });
        let down = WeightRef {
            parts: down,
            concat_axis: 0,
            transforms: vec![],
            quant: None,
        }
        .with(Transform::Reshape {
            shape: vec![e, h, inter],
        })
        .with(Transform::Transpose {
            perm: vec![0, 2, 1],
        });
        Ok((gate_up, down))
    }
}

/// The `weight_map` of a `model.safetensors.index.json` (named `file` in errors): tensor name ->
/// shard file name, each a relative path without `..`.
pub fn parse_index(file: &str, text: &str) -> Result<BTreeMap<String, String>, ImportError> {
    let index: RawIndex = serde_json::from_str(text).map_err(|e| ImportError::BadIndex {
        file: file.to_string(),
        problem: format!("invalid index JSON: {e}"),
    })?;
    for shard in index.weight_map.values() {
        let relative = Path::new(shard);
        if relative.is_absolute()
            || !relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(ImportError::BadIndex {
                file: file.to_string(),
                problem: format!(
                    "shard path `{shard}` must be a plain file name inside the checkpoint folder (absolute paths and `..` are refused)"
                ),
            });
        }
    }
    Ok(index.weight_map)
}

/// `dir/name` when it exists: a regular file whose canonical path lies inside the canonical `dir` (the
/// folder itself may be a symlink, its files may not lead out of it). None when absent.
pub fn model_file(dir: &Path, name: &str) -> Result<Option<PathBuf>, ImportError> {
    let path = dir.join(name);
    if path.symlink_metadata().is_err() {
        return Ok(None);
    }
    let outside = |problem: &str| ImportError::OutsideFolder {
        file: path.display().to_string(),
        dir: dir.display().to_string(),
        problem: problem.to_string(),
    };
    let (Ok(real_dir), Ok(real_path)) = (dir.canonicalize(), path.canonicalize()) else {
        return Err(outside("cannot be resolved (a dangling symlink?)"));
    };
    if !real_path.starts_with(&real_dir) {
        return Err(outside(&format!(
            "resolves to {}, outside the model folder",
            real_path.display()
        )));
    }
    if !real_path.is_file() {
        return Err(outside("is not a regular file"));
    }
    Ok(Some(path))
}

/// Resolves an index's shard entry, refusing paths that could leave the checkpoint folder.
fn shard_path(dir: &Path, shard: &str) -> Result<PathBuf, String> {
    let relative = Path::new(shard);
    if relative.is_absolute()
        || !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(format!(
            "shard path `{shard}` must be a plain file name inside the checkpoint folder (absolute paths and `..` are refused)"
        ));
    }
    match model_file(dir, shard) {
        Ok(Some(path)) => Ok(path),
        Ok(None) => Err(format!(
            "shard `{shard}` is listed but {} does not exist",
            dir.join(relative).display()
        )),
        Err(e) => Err(format!("shard `{shard}`: {e}")),
    }
}

/// A checkpoint imported into an Imported-phase graph.
#[derive(Debug)]
pub struct Imported {
    pub graph: Graph,
    pub checkpoint: Checkpoint,
}

/// Opens `dir` and builds the verified Imported-phase decoder graph:
/// inputs `input_ids` i64[batch, seq] and `position_ids` i64[batch, seq], output `logits` f32[batch, seq, vocab].
pub fn import(dir: &Path) -> Result<Imported, ImportError> {
    import_with(dir, false)
}

/// Name of the decoder input holding image features, [features, hidden] (see [`import_with`]).
pub const IMAGE_FEATURES_INPUT: &str = "image_features";
/// Decoder input i64 [batch, picked]: the tokens of each row whose logits the call returns.
pub const LOGITS_INDEX_INPUT: &str = "logits_index";
/// Name of the decoder input holding where the image features go, i64 [features].
pub const IMAGE_POSITIONS_INPUT: &str = "image_positions";

/// Like [`import`]; with `image_features` the decoder also takes `image_features` [features, hidden]
/// and `image_positions` i64[features] and replaces embedding row `image_positions[f]` of the flattened
/// [batch * seq, hidden] embeddings by feature row f (the `<|patch|>` tokens of an image prompt; both
/// inputs are empty for text).
pub fn import_with(dir: &Path, image_features: bool) -> Result<Imported, ImportError> {
    let checkpoint = Checkpoint::open(dir)?;
    let graph = build_graph(&checkpoint, image_features)?;
    verify(&graph, None).map_err(ImportError::Verify)?;
    Ok(Imported { graph, checkpoint })
}

fn build_graph(ckpt: &Checkpoint, image_features: bool) -> Result<Graph, ImportError> {
    let mut b = Builder {
        ckpt,
        graph: Graph::new(Phase::Imported, ckpt.store.clone()),
        stage: "import",
    };
    let tokens = vec![Dim::Sym(SymDim::Batch), Dim::Sym(SymDim::Seq)];
    let ids = b.input(
        crate::names::INPUT_IDS,
        TensorType::new(DType::I64, tokens.clone()),
    )?;
    let positions = b.input(
        crate::names::POSITION_IDS,
        TensorType::new(DType::I64, tokens),
    )?;
    let c = &ckpt.config;
    let embed_name = format!("{}model.embed_tokens.weight", c.architecture.text_prefix());
    let embed = b.weight(
        &embed_name,
        &[c.vocab_size, c.hidden_size],
        "token embedding",
    )?;
    let mut x = b.add("embed", Op::Embedding { out: DType::F32 }, &[ids, embed])?;
    if image_features {
        let features = Dim::Sym(SymDim::Features);
        let rows = b.input(
            IMAGE_FEATURES_INPUT,
            TensorType::new(DType::F32, vec![features, Dim::Fixed(c.hidden_size)]),
        )?;
        let at = b.input(
            IMAGE_POSITIONS_INPUT,
            TensorType::new(DType::I64, vec![features]),
        )?;
        x = b.add("merge_image_features", Op::ScatterRows, &[x, at, rows])?;
    }
    for i in 0..c.num_layers {
        let resid = b.attention_block(i, x, positions)?;
        let ff = b.feed_forward(i, resid)?;
        x = b.add(crate::split::residual_name(i), Op::Add, &[resid, ff])?;
    }
    b.head(x, &embed_name)?;
    Ok(b.graph)
}

impl Builder<'_> {
    /// A graph input named `name`.
    fn input(&mut self, name: &str, ty: TensorType) -> Result<Value, ImportError> {
        let attrs = InputAttrs {
            name: name.into(),
            ty,
        };
        self.add(name, Op::Input(attrs), &[])
    }

    /// Layer `i`'s input norm and attention, with the residual added: `x + attention(norm(x))`.
    fn attention_block(
        &mut self,
        i: usize,
        x: Value,
        positions: Value,
    ) -> Result<Value, ImportError> {
        let ckpt = self.ckpt;
        let c = &ckpt.config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let eps = c.rms_norm_eps as f32;
        let l = format!("{}model.layers.{i}.", c.architecture.text_prefix());
        let what = |s: &str| format!("layer {i} {s}");
        let w_in = self.weight(
            &format!("{l}input_layernorm.weight"),
            &[h],
            &what("input norm"),
        )?;
        let normed = self.add(
            format!("layers.{i}.input_norm"),
            Op::RmsNorm(RmsNormAttrs { eps }),
            &[x, w_in],
        )?;
        let q = self.weight(
            &format!("{l}self_attn.q_proj.weight"),
            &[c.num_heads * d, h],
            &what("q projection"),
        )?;
        let k = self.weight(
            &format!("{l}self_attn.k_proj.weight"),
            &[c.num_kv_heads * d, h],
            &what("k projection"),
        )?;
        let v = self.weight(
            &format!("{l}self_attn.v_proj.weight"),
            &[c.num_kv_heads * d, h],
            &what("v projection"),
        )?;
        let o = self.weight(
            &format!("{l}self_attn.o_proj.weight"),
            &[h, c.num_heads * d],
            &what("o projection"),
        )?;
        let rope = c.uses_rope[i];
        let attrs = AttentionAttrs {
            layer: i,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: d,
            rope: rope.then(|| RopeAttrs {
                inv_freq: c.rope.inv_freq(d),
            }),
            qk_norm_eps: (rope && c.use_qk_norm).then_some(eps),
            chunk: c
                .attention_chunk_size
                .filter(|_| rope)
                .map(|size| ChunkAttrs { size }),
            temperature: (!rope && c.attn_temperature_tuning).then_some(TemperatureAttrs {
                floor_scale: c.floor_scale as f32,
                attn_scale: c.attn_scale as f32,
            }),
            scale: (d as f32).powf(-0.5),
        };
        let attn = self.add(
            format!("layers.{i}.attn"),
            Op::Attention(attrs),
            &[normed, positions, q, k, v, o],
        )?;
        self.add(format!("layers.{i}.attn_residual"), Op::Add, &[x, attn])
    }

    /// Layer `i`'s post-attention norm and feed-forward (MoE or dense MLP) of `resid`, without the
    /// residual.
    fn feed_forward(&mut self, i: usize, resid: Value) -> Result<Value, ImportError> {
        let ckpt = self.ckpt;
        let c = &ckpt.config;
        let h = c.hidden_size;
        let l = format!("{}model.layers.{i}.", c.architecture.text_prefix());
        let f = format!("{l}feed_forward.");
        let what = |s: &str| format!("layer {i} {s}");
        let w_post = self.weight(
            &format!("{l}post_attention_layernorm.weight"),
            &[h],
            &what("post-attention norm"),
        )?;
        let normed = self.add(
            format!("layers.{i}.post_norm"),
            Op::RmsNorm(RmsNormAttrs {
                eps: c.rms_norm_eps as f32,
            }),
            &[resid, w_post],
        )?;
        if !c.is_moe_layer(i) {
            let inter = c.intermediate_size_mlp;
            let inputs = [
                normed,
                self.weight(
                    &format!("{f}gate_proj.weight"),
                    &[inter, h],
                    &what("MLP gate"),
                )?,
                self.weight(&format!("{f}up_proj.weight"), &[inter, h], &what("MLP up"))?,
                self.weight(
                    &format!("{f}down_proj.weight"),
                    &[h, inter],
                    &what("MLP down"),
                )?,
            ];
            return self.add(format!("layers.{i}.mlp"), Op::Mlp, &inputs);
        }
        let (e, inter) = (c.num_experts, c.intermediate_size);
        let (gate_up, down) = ckpt.experts(&f, e, inter, h, &what)?;
        let inputs = [
            normed,
            self.weight(&format!("{f}router.weight"), &[e, h], &what("MoE router"))?,
            self.node(&format!("{f}experts.gate_up"), Op::Weight(gate_up))?,
            self.node(&format!("{f}experts.down"), Op::Weight(down))?,
            self.weight(
                &format!("{f}shared_expert.gate_proj.weight"),
                &[inter, h],
                &what("shared expert gate"),
            )?,
            self.weight(
                &format!("{f}shared_expert.up_proj.weight"),
                &[inter, h],
                &what("shared expert up"),
            )?,
            self.weight(
                &format!("{f}shared_expert.down_proj.weight"),
                &[h, inter],
                &what("shared expert down"),
            )?,
        ];
        let attrs = MoeAttrs {
            num_experts: e,
            top_k: c.top_k,
            intermediate_size: inter,
        };
        self.add(format!("layers.{i}.moe"), Op::Moe(attrs), &inputs)
    }

    /// The final norm and lm_head (tied to the embedding `embed_name` when the checkpoint says so and
    /// has no head), on only the rows whose logits a call wants; sets the `logits` output.
    fn head(&mut self, x: Value, embed_name: &str) -> Result<(), ImportError> {
        let ckpt = self.ckpt;
        let c = &ckpt.config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let p = c.architecture.text_prefix();
        let index = self.input(
            LOGITS_INDEX_INPUT,
            TensorType::new(
                DType::I64,
                vec![Dim::Sym(SymDim::Batch), Dim::Sym(SymDim::Picked)],
            ),
        )?;
        let x = self.add("pick_logit_rows", Op::PickRows, &[x, index])?;
        let w_norm = self.weight(&format!("{p}model.norm.weight"), &[h], "final norm")?;
        let normed = self.add(
            "final_norm",
            Op::RmsNorm(RmsNormAttrs {
                eps: c.rms_norm_eps as f32,
            }),
            &[x, w_norm],
        )?;
        let head_name = format!("{p}lm_head.weight");
        let head = if c.tie_word_embeddings && !ckpt.locations.contains_key(&head_name) {
            self.weight(embed_name, &[v, h], "lm_head (tied to the embedding)")?
        } else {
            self.weight(&head_name, &[v, h], "lm_head")?
        };
        let logits = self.add(crate::names::LM_HEAD, Op::Linear, &[normed, head])?;
        self.graph.set_output(crate::names::LOGITS, logits);
        Ok(())
    }
}

/// Adds nodes to a graph being imported from `ckpt`; a node that fails typing is a herd bug reported
/// as found after `stage`.
pub(crate) struct Builder<'a> {
    pub(crate) ckpt: &'a Checkpoint,
    pub(crate) graph: Graph,
    pub(crate) stage: &'static str,
}

impl Builder<'_> {
    pub(crate) fn add(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: &[Value],
    ) -> Result<Value, ImportError> {
        let stage = self.stage;
        self.graph.add(name, op, inputs).map_err(|d| bug(stage, d))
    }

    fn node(&mut self, name: &str, op: Op) -> Result<Value, ImportError> {
        self.add(name, op, &[])
    }

    /// The checkpoint tensor `name`, checked to have `shape` (`what` names it in errors).
    pub(crate) fn weight(
        &mut self,
        name: &str,
        shape: &[usize],
        what: &str,
    ) -> Result<Value, ImportError> {
        let w = self.ckpt.weight(name, shape, what)?;
        self.add(name, Op::Weight(w), &[])
    }
}

fn bug(stage: &str, d: Diagnostic) -> ImportError {
    ImportError::Verify(VerifyError {
        after_pass: Some(stage.into()),
        diagnostics: vec![d],
    })
}
