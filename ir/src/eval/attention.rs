//! The reference evaluator's attention: interleaved rotary, NoPE temperature, the chunked/causal
//! mask, the in-place KV cache write and scaled dot-product attention, and the unlowered `Attention`
//! op built from them.

use ndarray::{s, ArrayD, Axis, IxDyn};

use super::{boolean, float, int, linear, rms_norm, Tensor};
use crate::ops::{AttentionAttrs, Op};

/// The value of one attention-side op (rotary, KV cache, mask, temperature, SDPA) on `args`.
pub(super) fn eval_op(op: &Op, args: &[&Tensor]) -> Result<Tensor, String> {
    Ok(match op {
        Op::Rotary if args[1].shape().len() == 3 => {
            let (cos, sin) = (float(args[1]), float(args[2]));
            let x = float(args[0]);
            let (b, s) = (x.shape()[0], x.shape()[2]);
            let index = ArrayD::from_shape_fn(IxDyn(&[b, s]), |i| (i[0] * s + i[1]) as i64);
            Tensor::F32(rotate_pairs(x, &index, |p, j| {
                let (bi, si) = (p as usize / s, p as usize % s);
                Ok((sin[[bi, si, j]], cos[[bi, si, j]]))
            })?)
        }
        Op::RotaryAngles(a) => {
            let pos = int(args[0]);
            let (b, s, n) = (pos.shape()[0], pos.shape()[1], a.inv_freq.len());
            Tensor::F32(ArrayD::from_shape_fn(IxDyn(&[b, s, n]), |i| {
                let angle = pos[[i[0], i[1]]] as f32 * a.inv_freq[i[2]];
                if a.sin {
                    angle.sin()
                } else {
                    angle.cos()
                }
            }))
        }
        Op::CacheWrite { ring } => Tensor::F32(cache_write(
            float(args[0]),
            float(args[1]),
            int(args[2]),
            *ring,
        )?),
        Op::CacheView => {
            let cache = float(args[0]);
            let last = int(args[1]).iter().copied().max().unwrap_or(0);
            let len = usize::try_from(last + 1).unwrap_or(0).min(cache.shape()[2]);
            Tensor::F32(cache.slice_axis(Axis(2), (0..len).into()).to_owned())
        }
        Op::Rotary => {
            let x = float(args[0]);
            let positions = match args.get(3) {
                Some(p) => int(p).clone(),
                None => {
                    let (b, s) = (x.shape()[0], x.shape()[2]);
                    ArrayD::from_shape_fn(IxDyn(&[b, s]), |i| i[1] as i64)
                }
            };
            Tensor::F32(rotary(x, float(args[1]), float(args[2]), &positions)?)
        }
        Op::QueryTemperature(t) => Tensor::F32(scale_by_temperature(
            float(args[0]).clone(),
            int(args[1]),
            t.floor_scale,
            t.attn_scale,
        )),
        Op::AttentionMask { chunk } => Tensor::Bool(attention_mask(
            int(args[0]),
            args[1].shape()[2],
            chunk.map(|c| c.size),
        )),
        Op::Sdpa { scale } => {
            let (q, k) = (float(args[0]), float(args[1]));
            let mask = match args.get(3) {
                Some(m) => boolean(m).clone(),
                None => {
                    ArrayD::from_elem(IxDyn(&[q.shape()[0], 1, q.shape()[2], k.shape()[2]]), true)
                }
            };
            Tensor::F32(sdpa(q, k, float(args[2]), &mask, *scale))
        }
        _ => return Err(format!("`{}` is not an attention op", op.name())),
    })
}

/// NoPE query temperature at absolute position `p`, computed in f32 like transformers.
fn temperature(p: i64, floor_scale: f32, attn_scale: f32) -> f32 {
    ((p as f32 + 1.0) / floor_scale).floor().ln_1p() * attn_scale + 1.0
}

fn rotary(
    x: &ArrayD<f32>,
    cos: &ArrayD<f32>,
    sin: &ArrayD<f32>,
    pos: &ArrayD<i64>,
) -> Result<ArrayD<f32>, String> {
    let rows = cos.shape()[0];
    rotate_pairs(x, pos, |p, j| {
        let row = usize::try_from(p).ok().filter(|&r| r < rows).ok_or_else(|| {
            format!("position {p} is outside the rotary table of {rows} positions (compile with a larger --max-context)")
        })?;
        Ok((sin[[row, j]], cos[[row, j]]))
    })
}

/// Interleaved (GPT-J) rotation of x [B, heads, S, d]: pair (2j, 2j+1) of the token at position p turns
/// by the angle whose (sin, cos) `angle(p, j)` gives.
fn rotate_pairs(
    x: &ArrayD<f32>,
    pos: &ArrayD<i64>,
    angle: impl Fn(i64, usize) -> Result<(f32, f32), String>,
) -> Result<ArrayD<f32>, String> {
    let mut out = x.clone();
    let (b, heads, s, d) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    for bi in 0..b {
        for si in 0..s {
            let p = pos[[bi, si]];
            for j in 0..d / 2 {
                let (sin, cos) = angle(p, j)?;
                for h in 0..heads {
                    let (x0, x1) = (x[[bi, h, si, 2 * j]], x[[bi, h, si, 2 * j + 1]]);
                    out[[bi, h, si, 2 * j]] = x0 * cos - x1 * sin;
                    out[[bi, h, si, 2 * j + 1]] = x0 * sin + x1 * cos;
                }
            }
        }
    }
    Ok(out)
}

/// Multiplies q [B, heads, S, d] by the NoPE temperature of each token's position.
fn scale_by_temperature(
    mut q: ArrayD<f32>,
    pos: &ArrayD<i64>,
    floor_scale: f32,
    attn_scale: f32,
) -> ArrayD<f32> {
    for (i, v) in q.indexed_iter_mut() {
        *v *= temperature(pos[[i[0], i[2]]], floor_scale, attn_scale);
    }
    q
}

/// bool [B, 1, S, keys]; see [`Op::AttentionMask`].
fn attention_mask(pos: &ArrayD<i64>, keys: usize, chunk: Option<usize>) -> ArrayD<bool> {
    let (b, s) = (pos.shape()[0], pos.shape()[1]);
    ArrayD::from_shape_fn(IxDyn(&[b, 1, s, keys]), |i| {
        let (bi, qi, kj) = (i[0], i[2], i[3] as i64);
        let pq = pos[[bi, qi]];
        kj <= chunk.map_or(pq, |c| pq.rem_euclid(c as i64))
    })
}

/// The cache with each row's update written at its first position; see [`Op::CacheWrite`].
fn cache_write(
    past: &ArrayD<f32>,
    update: &ArrayD<f32>,
    pos: &ArrayD<i64>,
    ring: bool,
) -> Result<ArrayD<f32>, String> {
    let mut out = past.clone();
    let (t, s) = (past.shape()[2], update.shape()[2]);
    if t == 0 && s > 0 {
        return Err("a cache of length 0".into());
    }
    for b in 0..past.shape()[0] {
        let first = usize::try_from(pos[[b, 0]]).map_err(|_| "a negative position".to_string())?;
        if !ring && first + s > t {
            return Err(format!(
                "row {b} writes {s} entries at {first} into a cache of {t}"
            ));
        }
        for j in 0..s {
            let at = if ring { (first + j) % t } else { first + j };
            out.slice_mut(s![b, .., at, ..])
                .assign(&update.slice(s![b, .., j, ..]));
        }
    }
    Ok(out)
}

fn sdpa(
    q: &ArrayD<f32>,
    k: &ArrayD<f32>,
    v: &ArrayD<f32>,
    mask: &ArrayD<bool>,
    scale: f32,
) -> ArrayD<f32> {
    let (b, nh, s, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (nkv, t) = (k.shape()[1], k.shape()[2]);
    let group = nh / nkv;
    let mut out = ArrayD::<f32>::zeros(q.raw_dim());
    for bi in 0..b {
        for h in 0..nh {
            let kv = h / group;
            for qi in 0..s {
                let scores: Vec<Option<f32>> = (0..t)
                    .map(|kj| {
                        mask[[bi, 0, qi, kj]].then(|| {
                            (0..d)
                                .map(|e| q[[bi, h, qi, e]] * k[[bi, kv, kj, e]])
                                .sum::<f32>()
                                * scale
                        })
                    })
                    .collect();
                let max = scores
                    .iter()
                    .flatten()
                    .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let exps: Vec<f32> = scores
                    .iter()
                    .map(|sc| sc.map_or(0.0, |v| (v - max).exp()))
                    .collect();
                let total: f32 = exps.iter().sum();
                for e in 0..d {
                    let acc: f32 = (0..t).map(|kj| exps[kj] * v[[bi, kv, kj, e]]).sum();
                    out[[bi, h, qi, e]] = if total > 0.0 { acc / total } else { 0.0 };
                }
            }
        }
    }
    out
}

/// Llama 4 self-attention over the whole sequence; positions come from `positions` for both queries and
/// keys (the Imported phase has no KV cache).
pub(super) fn attention(
    a: &AttentionAttrs,
    x: &ArrayD<f32>,
    positions: &ArrayD<i64>,
    w: &[&ArrayD<f32>],
) -> ArrayD<f32> {
    let (b, s) = (x.shape()[0], x.shape()[1]);
    let d = a.head_dim;
    // [B, S, heads*d] -> [B, heads, S, d]
    let heads = |t: ArrayD<f32>, n: usize| {
        t.into_shape_with_order(IxDyn(&[b, s, n, d]))
            .expect("sizes agree")
            .permuted_axes(IxDyn(&[0, 2, 1, 3]))
            .as_standard_layout()
            .into_owned()
    };
    let mut q = heads(linear(x, w[0]), a.num_heads);
    let mut k = heads(linear(x, w[1]), a.num_kv_heads);
    let v = heads(linear(x, w[2]), a.num_kv_heads);
    if let Some(rope) = &a.rope {
        let angle = |p: i64, j: usize| Ok((p as f32 * rope.inv_freq[j]).sin_cos());
        q = rotate_pairs(&q, positions, angle).expect("angles are always defined");
        k = rotate_pairs(&k, positions, angle).expect("angles are always defined");
    }
    if let Some(eps) = a.qk_norm_eps {
        q = rms_norm(&q, None, eps);
        k = rms_norm(&k, None, eps);
    }
    if let Some(t) = a.temperature {
        q = scale_by_temperature(q, positions, t.floor_scale, t.attn_scale);
    }
    let chunk = a.chunk.map(|c| c.size as i64);
    let mask = ArrayD::from_shape_fn(IxDyn(&[b, 1, s, s]), |i| {
        let (pq, pk) = (positions[[i[0], i[2]]], positions[[i[0], i[3]]]);
        pk <= pq && chunk.is_none_or(|c| pk.div_euclid(c) == pq.div_euclid(c))
    });
    let out = sdpa(&q, &k, &v, &mask, a.scale)
        .permuted_axes(IxDyn(&[0, 2, 1, 3]))
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(&[b, s, a.num_heads * d]))
        .expect("sizes agree");
    linear(&out, w[3])
}
