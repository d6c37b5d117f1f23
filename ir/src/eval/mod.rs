//! The reference evaluator: a plain f32 interpretation of every op, written for clarity, not speed. It
//! is the oracle that importer and passes are tested against, never a product runtime. Float values of
//! every dtype are held as f32; `Cast` to f16/bf16 rounds like the target type would.

use std::collections::HashMap;

use ndarray::{s, Array2, ArrayD, Axis, Ix2, IxDyn};

use crate::error::EvalError;
use crate::graph::{Graph, Value};
use crate::ops::Op;
use crate::types::{DType, Dim, DimBindings, SymDim};
use crate::verify::verify;

mod attention;
mod moe;

use attention::attention;
use moe::{fused_moe, mlp, moe, swiglu};

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
            Op::Reshape { .. } | Op::Transpose { .. } | Op::Slice { .. } | Op::Concat { .. } => {
                shape_op(&node.op, &args, &dims).map_err(fail)?
            }
            Op::Rotary
            | Op::RotaryAngles(_)
            | Op::CacheWrite { .. }
            | Op::CacheView
            | Op::QueryTemperature(_)
            | Op::AttentionMask { .. }
            | Op::Sdpa { .. } => attention::eval_op(&node.op, &args).map_err(fail)?,
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

/// The value of one data-movement op (reshape, transpose, slice, concat) on `args`.
fn shape_op(op: &Op, args: &[&Tensor], dims: &DimBindings) -> Result<Tensor, String> {
    Ok(match op {
        Op::Reshape { shape } => {
            let sizes = reshape_sizes(shape, dims, args[0].shape())?;
            map_any(args[0], |a| {
                a.as_standard_layout()
                    .into_owned()
                    .into_shape_with_order(IxDyn(&sizes))
                    .map_err(|e| e.to_string())
            })?
        }
        Op::Transpose { perm } => map_any(args[0], |a| {
            Ok(a.clone()
                .permuted_axes(IxDyn(perm))
                .as_standard_layout()
                .into_owned())
        })?,
        Op::Slice { axis, start, end } => map_any(args[0], |a| {
            Ok(a.slice_axis(Axis(*axis), (*start..*end).into()).to_owned())
        })?,
        Op::Concat { axis } => concat(args[0], args[1], *axis)?,
        _ => return Err(format!("`{}` is not a data-movement op", op.name())),
    })
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
