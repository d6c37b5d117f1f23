//! The vision graph: Llama 4's vision tower, pixel-shuffle adapter and multi-modal projector, built
//! straight into lowered primitives (there is nothing for the passes to fuse or lower).
//!
//! pixel_values [N, 3, T, T] -> image_features [N * tokens_per_tile, text hidden]. Every step mirrors
//! transformers' `Llama4VisionModel` + `Llama4MultiModalProjector`; see the vision section of
//! shared/llama4.md.

use crate::config::{RopeConfig, RopeScaling, VisionConfig};
use crate::error::ImportError;
use crate::graph::{Graph, Value};
use crate::import::{Builder, Checkpoint};
use crate::ops::{ConstantData, InputAttrs, LayerNormAttrs, Op, Phase};
use crate::types::{DType, Dim, SymDim, TensorType};
use crate::verify::verify;

/// Name of the vision graph's input: normalised tiles, f32 [tiles, channels, T, T].
pub const PIXEL_VALUES: &str = "pixel_values";
/// Name of the vision graph's output: projected features, [tiles * tokens_per_tile, text hidden].
pub const IMAGE_FEATURES: &str = "image_features";

/// `nn.LayerNorm`'s default epsilon: transformers builds every vision LayerNorm without passing
/// `norm_eps`.
const LAYER_NORM_EPS: f32 = 1e-5;

/// Builds the vision graph of a checkpoint whose config has a vision tower.
pub fn build_vision_graph(ckpt: &Checkpoint) -> Result<Graph, ImportError> {
    let c = ckpt
        .config
        .vision
        .as_ref()
        .ok_or_else(|| ImportError::Unsupported("the checkpoint has no vision tower".into()))?;
    let (h, g) = (c.hidden_size, c.grid());
    let mut b = Builder {
        ckpt,
        graph: Graph::new(Phase::Lowered, ckpt.store.clone()),
        stage: "vision import",
    };
    let pixels = b.add(
        PIXEL_VALUES,
        Op::Input(InputAttrs {
            name: PIXEL_VALUES.into(),
            ty: TensorType::new(
                DType::F32,
                vec![
                    Dim::Sym(SymDim::Batch),
                    Dim::Fixed(c.num_channels),
                    Dim::Fixed(c.image_size),
                    Dim::Fixed(c.image_size),
                ],
            ),
        }),
        &[],
    )?;
    let x = patch_embedding(&mut b, c, pixels)?;
    let mut x = b.layer_norm("layernorm_pre", x, "vision_model.layernorm_pre", h)?;
    let (cos, sin) = rotary_tables(c);
    let cos = b.add("rope.cos", Op::Constant(cos), &[])?;
    let sin = b.add("rope.sin", Op::Constant(sin), &[])?;
    for i in 0..c.num_layers {
        x = encoder_layer(&mut b, c, i, x, [cos, sin])?;
    }
    let x = b.layer_norm("layernorm_post", x, "vision_model.layernorm_post", h)?;
    let x = b.add(
        "drop_class_token",
        Op::Slice {
            axis: 1,
            start: 0,
            end: g * g,
        },
        &[x],
    )?;

    let x = pixel_shuffle(&mut b, c, x)?;
    let x = projector(&mut b, c, ckpt.config.hidden_size, x)?;
    b.graph.set_output(IMAGE_FEATURES, x);
    verify(&b.graph, Some("vision import")).map_err(ImportError::Verify)?;
    Ok(b.graph)
}

/// Pixels [tiles, C, S, S] -> patch embeddings with the class token and positions, [tiles, g*g+1, h].
fn patch_embedding(b: &mut Builder, c: &VisionConfig, pixels: Value) -> Result<Value, ImportError> {
    let (h, p, g, ch) = (c.hidden_size, c.patch_size, c.grid(), c.num_channels);
    let seq = g * g + 1;
    let batch = Dim::Sym(SymDim::Batch);
    let fixed = Dim::Fixed;
    // nn.Unfold: patch (row, col) in row-major order, features channel-major (c, kh, kw).
    let x = b.reshape(
        "patches.split",
        pixels,
        vec![batch, fixed(ch), fixed(g), fixed(p), fixed(g), fixed(p)],
    )?;
    let x = b.add(
        "patches.order",
        Op::Transpose {
            perm: vec![0, 2, 4, 1, 3, 5],
        },
        &[x],
    )?;
    let x = b.reshape("patches", x, vec![batch, fixed(g * g), fixed(ch * p * p)])?;
    let w = b.weight(
        "vision_model.patch_embedding.linear.weight",
        &[h, ch * p * p],
        "vision patch embedding",
    )?;
    let x = b.add("patch_embedding", Op::Linear, &[x, w])?;
    let cls = b.weight(
        "vision_model.class_embedding",
        &[h],
        "vision class embedding",
    )?;
    let cls = b.add("class_embedding.cast", Op::Cast { to: DType::F32 }, &[cls])?;
    let x = b.add("class_token", Op::AppendToken, &[x, cls])?;
    let pos = b.weight(
        "vision_model.positional_embedding_vlm",
        &[seq, h],
        "vision positional embedding",
    )?;
    let pos = b.add("positions.cast", Op::Cast { to: DType::F32 }, &[pos])?;
    let pos = b.reshape("positions", pos, vec![fixed(1), fixed(seq), fixed(h)])?;
    let x = b.add("add_positions", Op::Add, &[x, pos])?;
    Ok(x)
}

/// Encoder layer `i`: pre-norm attention with 2D rotary `cos`/`sin` on q and k, then the GELU MLP.
fn encoder_layer(
    b: &mut Builder,
    c: &VisionConfig,
    i: usize,
    x: Value,
    [cos, sin]: [Value; 2],
) -> Result<Value, ImportError> {
    let (h, g) = (c.hidden_size, c.grid());
    let (heads, hd) = (c.num_heads, c.hidden_size / c.num_heads);
    let seq = g * g + 1;
    let batch = Dim::Sym(SymDim::Batch);
    let fixed = Dim::Fixed;
    let l = format!("vision_model.model.layers.{i}.");
    let n = format!("vision.layers.{i}.");
    let normed = b.layer_norm(
        &format!("{n}input_norm"),
        x,
        &format!("{l}input_layernorm"),
        h,
    )?;
    let heads_of = |b: &mut Builder, proj: &str, rotate: bool| {
        let y = b.linear(
            &format!("{n}{proj}"),
            normed,
            &format!("{l}self_attn.{proj}"),
            h,
            h,
        )?;
        let y = b.reshape(
            &format!("{n}{proj}.heads"),
            y,
            vec![batch, fixed(seq), fixed(heads), fixed(hd)],
        )?;
        let y = b.add(
            format!("{n}{proj}.transpose"),
            Op::Transpose {
                perm: vec![0, 2, 1, 3],
            },
            &[y],
        )?;
        if rotate {
            b.add(format!("{n}{proj}.rope"), Op::Rotary, &[y, cos, sin])
        } else {
            Ok(y)
        }
    };
    let q = heads_of(b, "q_proj", true)?;
    let k = heads_of(b, "k_proj", true)?;
    let v = heads_of(b, "v_proj", false)?;
    let a = b.add(
        format!("{n}sdpa"),
        Op::Sdpa {
            scale: (hd as f32).powf(-0.5),
        },
        &[q, k, v],
    )?;
    let a = b.add(
        format!("{n}attn.transpose"),
        Op::Transpose {
            perm: vec![0, 2, 1, 3],
        },
        &[a],
    )?;
    let a = b.reshape(
        &format!("{n}attn.merge"),
        a,
        vec![batch, fixed(seq), fixed(h)],
    )?;
    let o = b.linear(
        &format!("{n}o_proj"),
        a,
        &format!("{l}self_attn.o_proj"),
        h,
        h,
    )?;
    let x1 = b.add(format!("{n}attn_residual"), Op::Add, &[x, o])?;
    let normed = b.layer_norm(
        &format!("{n}post_norm"),
        x1,
        &format!("{l}post_attention_layernorm"),
        h,
    )?;
    let f = b.linear(
        &format!("{n}fc1"),
        normed,
        &format!("{l}mlp.fc1"),
        c.intermediate_size,
        h,
    )?;
    let f = b.add(format!("{n}gelu"), Op::Gelu, &[f])?;
    let f = b.linear(
        &format!("{n}fc2"),
        f,
        &format!("{l}mlp.fc2"),
        h,
        c.intermediate_size,
    )?;
    b.add(format!("{n}mlp_residual"), Op::Add, &[x1, f])
}

/// Pixel shuffle with ratio 0.5: [tiles, g*g, h] -> [tiles, g*g/4, 4h].
fn pixel_shuffle(b: &mut Builder, c: &VisionConfig, x: Value) -> Result<Value, ImportError> {
    let (h, g) = (c.hidden_size, c.grid());
    let batch = Dim::Sym(SymDim::Batch);
    let fixed = Dim::Fixed;
    // Pixel shuffle with ratio 0.5: out[h2 * g/2 + w2, dh*2C + dw*C + c] = in[(2 h2 + dh) * g + 2 w2 + dw, c].
    let half = g / 2;
    let x = b.reshape(
        "shuffle.pair_columns",
        x,
        vec![batch, fixed(g), fixed(half), fixed(2 * h)],
    )?;
    let x = b.add(
        "shuffle.transpose1",
        Op::Transpose {
            perm: vec![0, 2, 1, 3],
        },
        &[x],
    )?;
    let x = b.reshape(
        "shuffle.pair_rows",
        x,
        vec![batch, fixed(half), fixed(half), fixed(4 * h)],
    )?;
    let x = b.add(
        "shuffle.transpose2",
        Op::Transpose {
            perm: vec![0, 2, 1, 3],
        },
        &[x],
    )?;
    b.reshape("shuffle", x, vec![batch, fixed(half * half), fixed(4 * h)])
}

/// The vision adapter (two GELU layers) and the multi-modal projector into the text model's width,
/// flattened to feature rows [tiles * g*g/4, text_hidden].
fn projector(
    b: &mut Builder,
    c: &VisionConfig,
    text_hidden: usize,
    x: Value,
) -> Result<Value, ImportError> {
    let a = "vision_model.vision_adapter.mlp.";
    let w1 = b.weight(
        &format!("{a}fc1.weight"),
        &[c.projector_input_dim, c.intermediate_size],
        "vision adapter fc1",
    )?;
    let x = b.add("adapter.fc1", Op::Linear, &[x, w1])?;
    let x = b.add("adapter.gelu1", Op::Gelu, &[x])?;
    let w2 = b.weight(
        &format!("{a}fc2.weight"),
        &[c.projector_output_dim, c.projector_input_dim],
        "vision adapter fc2",
    )?;
    let x = b.add("adapter.fc2", Op::Linear, &[x, w2])?;
    let x = b.add("adapter.gelu2", Op::Gelu, &[x])?;
    let wp = b.weight(
        "multi_modal_projector.linear_1.weight",
        &[text_hidden, c.vision_output_dim],
        "multi-modal projector",
    )?;
    let x = b.add("projector", Op::Linear, &[x, wp])?;
    b.reshape(
        "flatten_tiles",
        x,
        vec![Dim::Sym(SymDim::Features), Dim::Fixed(text_hidden)],
    )
}

/// cos/sin [g*g + 1, head_dim / 2] of the 2D RoPE: pair j < head_dim/4 turns by `(col + 1) f_j`, the
/// others by `(row + 1) f_(j - head_dim/4)`, with `f_k = theta^(-2k / (head_dim/2))` computed in f32
/// like transformers; the class token (last row) is not rotated.
pub fn rotary_tables(c: &VisionConfig) -> (ConstantData, ConstantData) {
    let g = c.grid();
    let freq_dim = c.hidden_size / c.num_heads / 2;
    let quarter = freq_dim / 2;
    // The text model's rule, unscaled: `quarter` frequencies over a `freq_dim`-wide rotation.
    let freqs = RopeConfig {
        theta: c.rope_theta,
        scaling: RopeScaling::Default,
    }
    .inv_freq(freq_dim);
    let rows = g * g + 1;
    let mut cos = Vec::with_capacity(rows * freq_dim);
    let mut sin = Vec::with_capacity(rows * freq_dim);
    for idx in 0..rows {
        for j in 0..freq_dim {
            let angle = if idx == g * g {
                0.0
            } else if j < quarter {
                ((idx % g) + 1) as f32 * freqs[j]
            } else {
                ((idx / g) + 1) as f32 * freqs[j - quarter]
            };
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let table = |values: Vec<f32>| ConstantData {
        shape: vec![rows, freq_dim],
        values: std::sync::Arc::new(values),
    };
    (table(cos), table(sin))
}

impl Builder<'_> {
    fn reshape(&mut self, name: &str, x: Value, shape: Vec<Dim>) -> Result<Value, ImportError> {
        self.add(name, Op::Reshape { shape }, &[x])
    }

    /// `nn.Linear` with bias: `{prefix}.weight` [out, inp] and `{prefix}.bias` [out].
    fn linear(
        &mut self,
        name: &str,
        x: Value,
        prefix: &str,
        out: usize,
        inp: usize,
    ) -> Result<Value, ImportError> {
        let what = format!("vision {name}");
        let w = self.weight(&format!("{prefix}.weight"), &[out, inp], &what)?;
        let bias = self.weight(&format!("{prefix}.bias"), &[out], &what)?;
        self.add(name, Op::Linear, &[x, w, bias])
    }

    fn layer_norm(
        &mut self,
        name: &str,
        x: Value,
        prefix: &str,
        h: usize,
    ) -> Result<Value, ImportError> {
        let what = format!("vision {name}");
        let w = self.weight(&format!("{prefix}.weight"), &[h], &what)?;
        let bias = self.weight(&format!("{prefix}.bias"), &[h], &what)?;
        self.add(
            name,
            Op::LayerNorm(LayerNormAttrs {
                eps: LAYER_NORM_EPS,
            }),
            &[x, w, bias],
        )
    }
}
