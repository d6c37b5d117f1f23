//! The reference evaluator: a plain f32 interpretation of every op, written for clarity, not speed. It
//! is the oracle that importer and passes are tested against, never a product runtime. Float values of
//! every dtype are held as f32; `Cast` to f16/bf16 rounds like the target type would.

use std::collections::HashMap;

use ndarray::{s, Array2, ArrayD, Axis, Ix2, IxDyn};

use crate::error::EvalError;
use crate::graph::{Graph, Value};
use crate::ops::{AttentionAttrs, ExpertLayout, FusedMoeAttrs, MoeAttrs, Op};
use crate::types::{DType, Dim, DimBindings, SymDim};
use crate::verify::verify;

/// A runtime value of the evaluator.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
    Bool(ArrayD<bool>),
}

impl Tensor {
    fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(a) => a.shape(),
            Tensor::I64(a) => a.shape(),
            Tensor::Bool(a) => a.shape(),
        }
    }

    /// The f32 array, if this is a float value.
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Some(a),
            Tensor::I64(_) | Tensor::Bool(_) => None,
        }
    }
}

/// Evaluates `graph` on named `inputs` and returns the named graph outputs.
pub fn evaluate(
    graph: &Graph,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, EvalError> {
    verify(graph, None)?;
    let order = graph.topo_order().map_err(|_| EvalError::Node {
        node: "<graph>".into(),
        op: "graph",
        problem: "cycle".into(),
    })?;
    let dims = bind_inputs(graph, inputs)?;
    let mut values: HashMap<Value, Tensor> = HashMap::new();
    for index in order {
        let node = graph.node(index).expect("topo order lists existing nodes");
        let args: Vec<&Tensor> = graph
            .inputs(index)
            .iter()
            .map(|v| values.get(v).expect("producers run first"))
            .collect();
        let fail = |problem: String| EvalError::Node {
            node: node.name.clone(),
            op: node.op.name(),
            problem,
        };
        let out = match &node.op {
            Op::Input(a) => inputs
                .get(&a.name)
                .cloned()
                .ok_or_else(|| EvalError::MissingInput(a.name.clone()))?,
            Op::Weight(w) => Tensor::F32(graph.weights().load_f32(w)?),
            Op::Embedding { .. } => embedding(int(args[0]), float(args[1])).map_err(fail)?,
            Op::Attention(a) => Tensor::F32(attention(
                a,
                float(args[0]),
                int(args[1]),
                &floats(&args[2..]),
            )),
            Op::Mlp => Tensor::F32(mlp(
                float(args[0]),
                float(args[1]),
                float(args[2]),
                float(args[3]),
            )),
            Op::Moe(m) => Tensor::F32(moe(m, float(args[0]), &floats(&args[1..]))),
            Op::RmsNorm(a) => Tensor::F32(rms_norm(
                float(args[0]),
                args.get(1).map(|w| float(w)),
                a.eps,
            )),
            Op::Linear => {
                let y = linear(float(args[0]), float(args[1]));
                Tensor::F32(match args.get(2) {
                    Some(bias) => y + float(bias),
                    None => y,
                })
            }
            Op::LayerNorm(a) => Tensor::F32(layer_norm(
                float(args[0]),
                float(args[1]),
                float(args[2]),
                a.eps,
            )),
            Op::Gelu => Tensor::F32(float(args[0]).mapv(gelu)),
            Op::AppendToken => Tensor::F32(append_token(float(args[0]), float(args[1]))),
            Op::PickRows => Tensor::F32(pick_rows(float(args[0]), int(args[1])).map_err(fail)?),
            Op::ScatterRows => Tensor::F32(
                scatter_rows(float(args[0]), int(args[1]), float(args[2])).map_err(fail)?,
            ),
            Op::Add => binary(args[0], args[1], |a, b| a + b, |a, b| a + b),
            Op::Mul => binary(args[0], args[1], |a, b| a * b, |a, b| a * b),
            Op::Sigmoid => Tensor::F32(float(args[0]).mapv(sigmoid)),
            Op::QuantizeActivation { scale } => Tensor::F32(float(args[0]).mapv(|x| {
                crate::weights::f8e4m3_to_f32(crate::quant::f32_to_f8e4m3(x / scale)) * scale
            })),
            Op::Silu => Tensor::F32(float(args[0]).mapv(silu)),
            Op::Cast { to } => cast(args[0], *to),
            Op::Constant(c) => Tensor::F32(
                ArrayD::from_shape_vec(IxDyn(&c.shape), c.values.to_vec())
                    .map_err(|e| fail(e.to_string()))?,
            ),
            Op::Reshape { shape } => {
                let sizes = reshape_sizes(shape, &dims, args[0].shape()).map_err(fail)?;
                map_any(args[0], |a| {
                    a.as_standard_layout()
                        .into_owned()
                        .into_shape_with_order(IxDyn(&sizes))
                        .map_err(|e| e.to_string())
                })
                .map_err(fail)?
            }
            Op::Transpose { perm } => map_any(args[0], |a| {
                Ok(a.clone()
                    .permuted_axes(IxDyn(perm))
                    .as_standard_layout()
                    .into_owned())
            })
            .map_err(fail)?,
            Op::Slice { axis, start, end } => map_any(args[0], |a| {
                Ok(a.slice_axis(Axis(*axis), (*start..*end).into()).to_owned())
            })
            .map_err(fail)?,
            Op::Concat { axis } => concat(args[0], args[1], *axis).map_err(fail)?,
            Op::Rotary if args[1].shape().len() == 3 => {
                let (cos, sin) = (float(args[1]), float(args[2]));
                let x = float(args[0]);
                let (b, s) = (x.shape()[0], x.shape()[2]);
                let index = ArrayD::from_shape_fn(IxDyn(&[b, s]), |i| (i[0] * s + i[1]) as i64);
                Tensor::F32(
                    rotate_pairs(x, &index, |p, j| {
                        let (bi, si) = (p as usize / s, p as usize % s);
                        Ok((sin[[bi, si, j]], cos[[bi, si, j]]))
                    })
                    .map_err(fail)?,
                )
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
            Op::CacheWrite { ring } => Tensor::F32(
                cache_write(float(args[0]), float(args[1]), int(args[2]), *ring).map_err(fail)?,
            ),
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
                Tensor::F32(rotary(x, float(args[1]), float(args[2]), &positions).map_err(fail)?)
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
                    None => ArrayD::from_elem(
                        IxDyn(&[q.shape()[0], 1, q.shape()[2], k.shape()[2]]),
                        true,
                    ),
                };
                Tensor::F32(sdpa(q, k, float(args[2]), &mask, *scale))
            }
            Op::SwiGlu => Tensor::F32(swiglu(float(args[0]))),
            Op::FusedMoe(m) => Tensor::F32(fused_moe(m, float(args[0]), &floats(&args[1..]))),
        };
        values.insert(
            Value {
                node: index,
                slot: 0,
            },
            out,
        );
    }
    Ok(graph
        .outputs()
        .iter()
        .map(|(name, v)| (name.clone(), values[v].clone()))
        .collect())
}

/// Checks every provided input against its declared type, binding symbolic dims consistently.
fn bind_inputs(graph: &Graph, inputs: &HashMap<String, Tensor>) -> Result<DimBindings, EvalError> {
    let mut bound: HashMap<SymDim, usize> = HashMap::new();
    for index in graph.node_indices() {
        let Some(Op::Input(a)) = graph.node(index).map(|n| &n.op) else {
            continue;
        };
        let t = inputs
            .get(&a.name)
            .ok_or_else(|| EvalError::MissingInput(a.name.clone()))?;
        let bad = |problem: String| EvalError::BadInput {
            name: a.name.clone(),
            problem,
        };
        let matches_dtype = match t {
            Tensor::F32(_) => a.ty.dtype.is_float(),
            Tensor::I64(_) => a.ty.dtype.is_index(),
            Tensor::Bool(_) => a.ty.dtype == DType::Bool,
        };
        if !matches_dtype {
            return Err(bad(format!("expected {} values", a.ty.dtype)));
        }
        if t.shape().len() != a.ty.shape.rank() {
            return Err(bad(format!(
                "expected shape {}, got {:?}",
                a.ty.shape,
                t.shape()
            )));
        }
        for (&dim, &actual) in a.ty.shape.0.iter().zip(t.shape()) {
            match dim {
                Dim::Fixed(n) if n != actual => {
                    return Err(bad(format!(
                        "expected shape {}, got {:?}",
                        a.ty.shape,
                        t.shape()
                    )))
                }
                Dim::Fixed(_) => {}
                Dim::Sym(sym) => {
                    if *bound.entry(sym).or_insert(actual) != actual {
                        return Err(bad(format!(
                            "dimension `{}` is {actual} here but {} elsewhere",
                            sym.name(),
                            bound[&sym]
                        )));
                    }
                }
            }
        }
    }
    let get = |s: SymDim| bound.get(&s).copied().unwrap_or(0);
    let bindings = DimBindings {
        batch: get(SymDim::Batch),
        seq: get(SymDim::Seq),
        past: get(SymDim::Past),
        features: bound.get(&SymDim::Features).copied(),
        picked: get(SymDim::Picked),
    };
    if bound
        .get(&SymDim::Total)
        .is_some_and(|&t| t != bindings.past + bindings.seq)
    {
        return Err(EvalError::BadInput {
            name: "<inputs>".into(),
            problem: "dimension `total` must equal past + seq".into(),
        });
    }
    Ok(bindings)
}

// The verifier guarantees dtypes, so these only unwrap what typing already proved.
fn float(t: &Tensor) -> &ArrayD<f32> {
    t.as_f32().expect("verified float operand")
}

fn floats<'a>(ts: &[&'a Tensor]) -> Vec<&'a ArrayD<f32>> {
    ts.iter().map(|t| float(t)).collect()
}

fn int(t: &Tensor) -> &ArrayD<i64> {
    match t {
        Tensor::I64(a) => a,
        Tensor::F32(_) | Tensor::Bool(_) => panic!("verified integer operand"),
    }
}

fn boolean(t: &Tensor) -> &ArrayD<bool> {
    match t {
        Tensor::Bool(a) => a,
        Tensor::F32(_) | Tensor::I64(_) => panic!("verified bool operand"),
    }
}

/// Applies a shape-only operation (reshape, transpose, slice) to a value of any element type: the
/// operation runs on the element indices, whose result says where each element goes.
fn map_any(
    t: &Tensor,
    f: impl Fn(&ArrayD<f32>) -> Result<ArrayD<f32>, String>,
) -> Result<Tensor, String> {
    fn moved<T: Clone>(
        a: &ArrayD<T>,
        f: impl Fn(&ArrayD<f32>) -> Result<ArrayD<f32>, String>,
    ) -> Result<ArrayD<T>, String> {
        let flat: Vec<T> = a.iter().cloned().collect();
        // Element indices stay exact in f32 below 2^24; evaluator tensors are far smaller.
        let index = ArrayD::from_shape_vec(a.raw_dim(), (0..a.len()).map(|i| i as f32).collect())
            .expect("sizes agree");
        Ok(f(&index)?.mapv(|i| flat[i as usize].clone()))
    }
    match t {
        Tensor::F32(a) => f(a).map(Tensor::F32),
        Tensor::I64(a) => moved(a, f).map(Tensor::I64),
        Tensor::Bool(a) => moved(a, f).map(Tensor::Bool),
    }
}

fn concat(a: &Tensor, b: &Tensor, axis: usize) -> Result<Tensor, String> {
    let err = |e: ndarray::ShapeError| e.to_string();
    Ok(match (a, b) {
        (Tensor::F32(a), Tensor::F32(b)) => {
            Tensor::F32(ndarray::concatenate(Axis(axis), &[a.view(), b.view()]).map_err(err)?)
        }
        (Tensor::I64(a), Tensor::I64(b)) => {
            Tensor::I64(ndarray::concatenate(Axis(axis), &[a.view(), b.view()]).map_err(err)?)
        }
        (Tensor::Bool(a), Tensor::Bool(b)) => {
            Tensor::Bool(ndarray::concatenate(Axis(axis), &[a.view(), b.view()]).map_err(err)?)
        }
        _ => return Err("operands of different element types".into()),
    })
}

/// Sizes of a reshape target; an unbound `features` dim takes whatever the element count leaves.
fn reshape_sizes(shape: &[Dim], dims: &DimBindings, from: &[usize]) -> Result<Vec<usize>, String> {
    let mut sizes: Vec<usize> = shape.iter().map(|&d| dims.resolve(d)).collect();
    if dims.features.is_none() {
        if let Some(i) = shape.iter().position(|&d| d == Dim::Sym(SymDim::Features)) {
            let rest: usize = sizes
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, &n)| n)
                .product();
            let total: usize = from.iter().product();
            if rest == 0 || total % rest != 0 {
                return Err(format!("cannot reshape {from:?} to {shape:?}"));
            }
            sizes[i] = total / rest;
        }
    }
    Ok(sizes)
}

/// `nn.LayerNorm` over the last axis with biased variance, in f32.
pub fn layer_norm(
    x: &ArrayD<f32>,
    weight: &ArrayD<f32>,
    bias: &ArrayD<f32>,
    eps: f32,
) -> ArrayD<f32> {
    let h = *x.shape().last().expect("verified rank >= 1");
    let mut out = x.as_standard_layout().into_owned();
    let (w, b) = (
        weight.as_slice().expect("1-D"),
        bias.as_slice().expect("1-D"),
    );
    for row in out.as_slice_mut().expect("standard layout").chunks_mut(h) {
        let mean = row.iter().sum::<f32>() / h as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (i, v) in row.iter_mut().enumerate() {
            *v = (*v - mean) * inv * w[i] + b[i];
        }
    }
    out
}

/// Exact GELU, computed in f64 and rounded once.
fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))) as f32
}

/// x [B, T, H] with `token` [H] appended at position T of every row.
fn append_token(x: &ArrayD<f32>, token: &ArrayD<f32>) -> ArrayD<f32> {
    let (b, h) = (x.shape()[0], x.shape()[2]);
    let row = token
        .view()
        .into_shape_with_order(IxDyn(&[1, 1, h]))
        .expect("verified [H]");
    let rows = row.broadcast(IxDyn(&[b, 1, h])).expect("broadcasts");
    ndarray::concatenate(Axis(1), &[x.view(), rows]).expect("shapes agree")
}

/// x [B, S, H] with flattened row `positions[f]` replaced by `rows[f]`.
fn scatter_rows(
    x: &ArrayD<f32>,
    positions: &ArrayD<i64>,
    rows: &ArrayD<f32>,
) -> Result<ArrayD<f32>, String> {
    let h = x.shape()[2];
    let n = x.len() / h.max(1);
    let mut out = x.as_standard_layout().into_owned();
    let flat = out.as_slice_mut().expect("standard layout");
    let rows = rows.as_standard_layout();
    let src = rows.as_slice().expect("standard layout");
    for (f, &p) in positions.iter().enumerate() {
        let p = usize::try_from(p)
            .ok()
            .filter(|&p| p < n)
            .ok_or_else(|| format!("position {p} is outside the {n} tokens"))?;
        flat[p * h..(p + 1) * h].copy_from_slice(&src[f * h..(f + 1) * h]);
    }
    Ok(out)
}

/// Rows `index[b, r]` of each x[b] ([B, S, H] -> [B, R, H]); see [`Op::PickRows`].
fn pick_rows(x: &ArrayD<f32>, index: &ArrayD<i64>) -> Result<ArrayD<f32>, String> {
    let (b, s, h) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let r = index.shape()[1];
    let mut out = ArrayD::<f32>::zeros(IxDyn(&[b, r, h]));
    for bi in 0..b {
        for ri in 0..r {
            let t = usize::try_from(index[[bi, ri]])
                .ok()
                .filter(|&t| t < s)
                .ok_or_else(|| {
                    format!("row index {} is outside the {s} tokens", index[[bi, ri]])
                })?;
            out.slice_mut(s![bi, ri, ..])
                .assign(&x.slice(s![bi, t, ..]));
        }
    }
    Ok(out)
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

fn swiglu(x: &ArrayD<f32>) -> ArrayD<f32> {
    let n = *x.shape().last().expect("rank >= 1") / 2;
    let last = Axis(x.ndim() - 1);
    let gate = x.slice_axis(last, (..n).into());
    let up = x.slice_axis(last, (n..).into());
    gate.mapv(silu) * up
}

fn fused_moe(m: &FusedMoeAttrs, x: &ArrayD<f32>, w: &[&ArrayD<f32>]) -> ArrayD<f32> {
    let (fc1, fc2) = (w[1], w[2]);
    let shared = linear(&swiglu(&linear(x, w[3])), w[4]);
    let inter = m.intermediate_size;
    routed(x, w[0], shared, m.num_experts, m.top_k, |e, z| {
        match m.layout {
            ExpertLayout::Interleaved => {
                // fc1 [2I, H] rows interleaved gate/up, fc2 [H, I].
                let h1 = matrix(fc1, e).dot(&z);
                let act: ndarray::Array1<f32> = (0..inter)
                    .map(|i| silu(h1[2 * i]) * h1[2 * i + 1])
                    .collect();
                matrix(fc2, e).dot(&act)
            }
            ExpertLayout::Halves => halves_expert(matrix(fc1, e), matrix(fc2, e), z, inter),
        }
    })
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

fn binary(
    a: &Tensor,
    b: &Tensor,
    f: fn(&ArrayD<f32>, &ArrayD<f32>) -> ArrayD<f32>,
    i: fn(&ArrayD<i64>, &ArrayD<i64>) -> ArrayD<i64>,
) -> Tensor {
    match (a, b) {
        (Tensor::F32(a), Tensor::F32(b)) => Tensor::F32(f(a, b)),
        (Tensor::I64(a), Tensor::I64(b)) => Tensor::I64(i(a, b)),
        _ => panic!("verified float or integer operands of one dtype"),
    }
}

fn cast(t: &Tensor, to: DType) -> Tensor {
    match (t, to) {
        (Tensor::F32(a), DType::F16) => Tensor::F32(a.mapv(|x| half::f16::from_f32(x).to_f32())),
        (Tensor::F32(a), DType::BF16) => Tensor::F32(a.mapv(|x| half::bf16::from_f32(x).to_f32())),
        (Tensor::F32(a), d) if d.is_float() => Tensor::F32(a.clone()),
        (Tensor::F32(a), _) => Tensor::I64(a.mapv(|x| x as i64)),
        (Tensor::I64(a), d) if d.is_float() => Tensor::F32(a.mapv(|x| x as f32)),
        (Tensor::I64(a), _) => Tensor::I64(a.clone()),
        (Tensor::Bool(a), d) if d.is_float() => Tensor::F32(a.mapv(|x| x as u8 as f32)),
        (Tensor::Bool(a), DType::Bool) => Tensor::Bool(a.clone()),
        (Tensor::Bool(a), _) => Tensor::I64(a.mapv(|x| x as i64)),
    }
}

fn embedding(ids: &ArrayD<i64>, table: &ArrayD<f32>) -> Result<Tensor, String> {
    let (vocab, hidden) = (table.shape()[0], table.shape()[1]);
    let mut out = Vec::with_capacity(ids.len() * hidden);
    for &id in ids.iter() {
        let row = usize::try_from(id)
            .ok()
            .filter(|&r| r < vocab)
            .ok_or_else(|| format!("token id {id} is outside the vocabulary 0..{vocab}"))?;
        out.extend(table.index_axis(Axis(0), row).iter());
    }
    let mut shape = ids.shape().to_vec();
    shape.push(hidden);
    Ok(Tensor::F32(
        ArrayD::from_shape_vec(IxDyn(&shape), out).expect("sizes agree"),
    ))
}

/// RMS norm over the last axis, optionally times `weight`.
pub fn rms_norm(x: &ArrayD<f32>, weight: Option<&ArrayD<f32>>, eps: f32) -> ArrayD<f32> {
    let mut out = x.clone();
    let h = *x.shape().last().expect("rank >= 1");
    for mut row in out.rows_mut() {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        row.mapv_inplace(|v| v * inv);
        if let Some(w) = weight {
            row.iter_mut().zip(w.iter()).for_each(|(v, w)| *v *= w);
        }
    }
    out
}

fn as_matrix(x: &ArrayD<f32>) -> Array2<f32> {
    let k = *x.shape().last().expect("rank >= 1");
    x.to_shape((x.len() / k.max(1), k))
        .expect("contiguous")
        .to_owned()
}

/// `x w^T` over the last axis of x.
pub fn linear(x: &ArrayD<f32>, w: &ArrayD<f32>) -> ArrayD<f32> {
    let w2 = w
        .view()
        .into_dimensionality::<Ix2>()
        .expect("verified rank 2");
    let y = as_matrix(x).dot(&w2.t());
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = w2.shape()[0];
    y.into_shape_with_order(IxDyn(&shape)).expect("sizes agree")
}

fn mlp(x: &ArrayD<f32>, gate: &ArrayD<f32>, up: &ArrayD<f32>, down: &ArrayD<f32>) -> ArrayD<f32> {
    let g = linear(x, gate).mapv(silu);
    linear(&(g * linear(x, up)), down)
}

fn moe(m: &MoeAttrs, x: &ArrayD<f32>, w: &[&ArrayD<f32>]) -> ArrayD<f32> {
    let (gate_up, down) = (w[1], w[2]);
    let shared = mlp(x, w[3], w[4], w[5]);
    routed(x, w[0], shared, m.num_experts, m.top_k, |e, z| {
        halves_expert(matrix(gate_up, e), matrix(down, e), z, m.intermediate_size)
    })
}

/// `shared + sum over each token's top-k experts e of expert(e, sigmoid(l_e) * x)`, with router logits
/// `l = x router^T` and ties broken toward the lower expert index.
fn routed(
    x: &ArrayD<f32>,
    router: &ArrayD<f32>,
    shared: ArrayD<f32>,
    num_experts: usize,
    top_k: usize,
    expert: impl Fn(usize, ndarray::Array1<f32>) -> ndarray::Array1<f32>,
) -> ArrayD<f32> {
    let shape = shared.shape().to_vec();
    let xs = as_matrix(x);
    let logits = as_matrix(&linear(x, router));
    let mut out = as_matrix(&shared);
    for t in 0..xs.nrows() {
        let row = logits.row(t);
        let mut ranked: Vec<usize> = (0..num_experts).collect();
        ranked.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &e in &ranked[..top_k] {
            let y = expert(e, xs.row(t).mapv(|v| v * sigmoid(row[e])));
            out.row_mut(t)
                .iter_mut()
                .zip(y.iter())
                .for_each(|(o, v)| *o += v);
        }
    }
    out.into_shape_with_order(IxDyn(&shape))
        .expect("sizes agree")
}

/// Expert `e`'s matrix of a stacked [E, ..] weight.
fn matrix(w: &ArrayD<f32>, e: usize) -> ndarray::ArrayView2<'_, f32> {
    w.index_axis(Axis(0), e)
        .into_dimensionality::<Ix2>()
        .expect("verified rank 3")
}

/// One expert in the checkpoint layout: `fc1` [H, 2I] (gate columns, then up), `fc2` [I, H], as `z @ W`.
fn halves_expert(
    fc1: ndarray::ArrayView2<f32>,
    fc2: ndarray::ArrayView2<f32>,
    z: ndarray::Array1<f32>,
    inter: usize,
) -> ndarray::Array1<f32> {
    let h1 = z.dot(&fc1);
    (h1.slice(s![..inter]).mapv(silu) * h1.slice(s![inter..])).dot(&fc2)
}

/// Llama 4 self-attention over the whole sequence; positions come from `positions` for both queries and
/// keys (the Imported phase has no KV cache).
fn attention(
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
