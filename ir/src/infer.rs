//! Typing rules: the output types of every op given its input types, exactly as documented on [`Op`].

use crate::ops::{AttentionAttrs, ExpertLayout, FusedMoeAttrs, MoeAttrs, Op};
use crate::types::{DType, Dim, Shape, SymDim, TensorType};

/// Output types of `op` applied to inputs of `inputs` types, or why the inputs do not fit.
pub fn infer(op: &Op, inputs: &[&TensorType]) -> Result<Vec<TensorType>, String> {
    let (lo, hi) = op.arity();
    if inputs.len() < lo || inputs.len() > hi {
        return Err(if lo == hi {
            format!("takes {lo} inputs, got {}", inputs.len())
        } else {
            format!("takes {lo} to {hi} inputs, got {}", inputs.len())
        });
    }
    let out = match op {
        Op::Input(a) => a.ty.clone(),
        Op::Weight(w) => {
            w.shape()?;
            w.ty()
        }
        Op::Embedding { out } => embedding(inputs, *out)?,
        Op::Attention(a) => attention(a, inputs)?,
        Op::Mlp => mlp(inputs)?,
        Op::Moe(m) => moe(m, inputs)?,
        Op::RmsNorm(_) => rms_norm(inputs)?,
        Op::Linear => linear(inputs)?,
        Op::LayerNorm(_) => layer_norm(inputs)?,
        Op::Gelu => {
            float_tensor(inputs[0], "x")?;
            inputs[0].clone()
        }
        Op::AppendToken => append_token(inputs)?,
        Op::ScatterRows => scatter_rows(inputs)?,
        Op::Add | Op::Mul => elementwise(inputs)?,
        Op::QuantizeActivation { scale } => {
            if !(scale.is_finite() && *scale > 0.0) {
                return Err(format!("activation scale {scale} must be positive"));
            }
            float_tensor(inputs[0], "x")?;
            inputs[0].clone()
        }
        Op::Sigmoid | Op::Silu => {
            float_tensor(inputs[0], "x")?;
            inputs[0].clone()
        }
        Op::Cast { to } => TensorType {
            dtype: *to,
            shape: inputs[0].shape.clone(),
        },
        Op::Constant(c) => {
            if c.values.len() != c.shape.iter().product::<usize>() {
                return Err(format!("{} values for shape {:?}", c.values.len(), c.shape));
            }
            TensorType {
                dtype: DType::F32,
                shape: Shape::fixed(&c.shape),
            }
        }
        Op::Reshape { shape } => reshape(inputs, shape)?,
        Op::Transpose { perm } => transpose(inputs, perm)?,
        Op::Slice { axis, start, end } => slice(inputs, *axis, *start, *end)?,
        Op::Concat { axis } => concat(inputs, *axis)?,
        Op::Rotary => rotary(inputs)?,
        Op::QueryTemperature(_) => {
            let q = inputs[0];
            let [b, _, s, _] = dims::<4>(q, "q")?;
            float_tensor(q, "q")?;
            positions(inputs[1], b, s)?;
            q.clone()
        }
        Op::AttentionMask { chunk } => attention_mask(inputs, *chunk)?,
        Op::PickRows => {
            let x = inputs[0];
            let [b, _, h] = dims::<3>(x, "x")?;
            let [ib, r] = dims::<2>(inputs[1], "index")?;
            if ib != b || inputs[1].dtype != DType::I64 {
                return Err(format!("index {} does not match rows {x}", inputs[1]));
            }
            TensorType::new(x.dtype, vec![b, r, h])
        }
        Op::RotaryAngles(a) => {
            let pos = inputs[0];
            let [b, s] = dims::<2>(pos, "position_ids")?;
            positions(pos, b, s)?;
            if a.inv_freq.is_empty() {
                return Err("no inverse frequencies".into());
            }
            TensorType::new(DType::F32, vec![b, s, Dim::Fixed(a.inv_freq.len())])
        }
        Op::CacheWrite { .. } => cache_write(inputs)?,
        Op::CacheView => cache_view(inputs)?,
        Op::Sdpa { .. } => sdpa(inputs)?,
        Op::SwiGlu => swiglu(inputs)?,
        Op::FusedMoe(m) => fused_moe(m, inputs)?,
    };
    Ok(vec![out])
}

/// Token ids [B, S] and a table [V, H] -> [B, S, H] of `out`.
fn embedding(inputs: &[&TensorType], out: DType) -> Result<TensorType, String> {
    let (ids, table) = (inputs[0], inputs[1]);
    index_tensor(ids, 2, "ids")?;
    float_tensor(table, "table")?;
    let [_, h] = dims::<2>(table, "table")?;
    Ok(TensorType::new(
        out,
        vec![ids.shape.0[0], ids.shape.0[1], h],
    ))
}

/// x [B, S, H] with gate/up [I, H] and down [H, I] -> x's type.
fn mlp(inputs: &[&TensorType]) -> Result<TensorType, String> {
    let x = inputs[0];
    let [_, _, h] = activation(x)?;
    let [i, _] = dims::<2>(inputs[1], "gate")?;
    expect(inputs[1], &[i, h], "gate")?;
    expect(inputs[2], &[i, h], "up")?;
    expect(inputs[3], &[h, i], "down")?;
    Ok(x.clone())
}

/// x with an optional weight [H] -> x's type.
fn rms_norm(inputs: &[&TensorType]) -> Result<TensorType, String> {
    let x = inputs[0];
    float_tensor(x, "x")?;
    let h = x.shape.last().ok_or("x must have rank >= 1")?;
    if let Some(w) = inputs.get(1) {
        float_tensor(w, "weight")?;
        expect(w, &[h], "weight")?;
    }
    Ok(x.clone())
}

/// x [.., K], weight [N, K], optional bias [N] -> [.., N].
fn linear(inputs: &[&TensorType]) -> Result<TensorType, String> {
    let (x, w) = (inputs[0], inputs[1]);
    float_tensor(x, "x")?;
    float_tensor(w, "weight")?;
    let k = x.shape.last().ok_or("x must have rank >= 1")?;
    let [n, wk] = dims::<2>(w, "weight")?;
    if wk != k {
        return Err(format!(
            "x {} and weight {} disagree on K",
            x.shape, w.shape
        ));
    }
    if let Some(bias) = inputs.get(2) {
        float_tensor(bias, "bias")?;
        expect(bias, &[n], "bias")?;
    }
    let mut shape = x.shape.0.clone();
    *shape.last_mut().expect("rank >= 1") = n;
    Ok(TensorType::new(x.dtype, shape))
}

/// x with weight and bias [H] -> x's type.
fn layer_norm(inputs: &[&TensorType]) -> Result<TensorType, String> {
    let x = inputs[0];
    float_tensor(x, "x")?;
    let h = x.shape.last().ok_or("x must have rank >= 1")?;
    for (t, what) in [(inputs[1], "weight"), (inputs[2], "bias")] {
        float_tensor(t, what)?;
        expect(t, &[h], what)?;
    }
    Ok(x.clone())
}

/// x [B, T, H] and a token [H] -> [B, T + 1, H].
fn append_token(inputs: &[&TensorType]) -> Result<TensorType, String> {
    let (x, token) = (inputs[0], inputs[1]);
    let [b, t, h] = activation(x)?;
    float_tensor(token, "token")?;
    expect(token, &[h], "token")?;
    let t = t.fixed().ok_or("the token axis must have a fixed size")?;
    Ok(TensorType::new(x.dtype, vec![b, Dim::Fixed(t + 1), h]))
}

/// x [B, S, H], flat positions [F] and rows [F, H] -> x's type.
fn scatter_rows(inputs: &[&TensorType]) -> Result<TensorType, String> {
    let (x, positions, rows) = (inputs[0], inputs[1], inputs[2]);
    let [_, _, h] = activation(x)?;
    index_tensor(positions, 1, "positions")?;
    let [f] = dims::<1>(positions, "positions")?;
    if rows.dtype != x.dtype {
        return Err(format!("rows {rows} must have x's dtype {}", x.dtype));
    }
    expect(rows, &[f, h], "rows")?;
    Ok(x.clone())
}

/// Elementwise with broadcasting.
fn elementwise(inputs: &[&TensorType]) -> Result<TensorType, String> {
    let (a, b) = (inputs[0], inputs[1]);
    if a.dtype != b.dtype {
        return Err(format!("operands have dtypes {} and {}", a.dtype, b.dtype));
    }
    Ok(TensorType {
        dtype: a.dtype,
        shape: broadcast(&a.shape, &b.shape)?,
    })
}

/// A reshape that keeps the element count.
fn reshape(inputs: &[&TensorType], shape: &[Dim]) -> Result<TensorType, String> {
    let x = inputs[0];
    if !same_elements(&x.shape.0, shape) {
        return Err(format!(
            "cannot reshape {} to {}",
            x.shape,
            Shape(shape.to_vec())
        ));
    }
    Ok(TensorType::new(x.dtype, shape.to_vec()))
}

/// Axes permuted.
fn transpose(inputs: &[&TensorType], perm: &[usize]) -> Result<TensorType, String> {
    let x = inputs[0];
    let mut seen = vec![false; x.shape.rank()];
    if perm.len() != x.shape.rank()
        || perm
            .iter()
            .any(|&p| p >= seen.len() || std::mem::replace(&mut seen[p], true))
    {
        return Err(format!(
            "{perm:?} is not a permutation of rank {}",
            x.shape.rank()
        ));
    }
    Ok(TensorType::new(
        x.dtype,
        perm.iter().map(|&p| x.shape.0[p]).collect(),
    ))
}

/// `start..end` of `axis`.
fn slice(
    inputs: &[&TensorType],
    axis: usize,
    start: usize,
    end: usize,
) -> Result<TensorType, String> {
    let x = inputs[0];
    let size = x.shape.0.get(axis).and_then(|d| d.fixed());
    if size.is_none_or(|n| start >= end || end > n) {
        return Err(format!(
            "slice {start}..{end} of axis {axis} does not fit {}",
            x.shape
        ));
    }
    let mut shape = x.shape.0.clone();
    shape[axis] = Dim::Fixed(end - start);
    Ok(TensorType::new(x.dtype, shape))
}

/// Two tensors joined along `axis`.
fn concat(inputs: &[&TensorType], axis: usize) -> Result<TensorType, String> {
    let (a, b) = (inputs[0], inputs[1]);
    let compatible = a.dtype == b.dtype
        && a.shape.rank() == b.shape.rank()
        && axis < a.shape.rank()
        && (0..a.shape.rank()).all(|i| i == axis || a.shape.0[i] == b.shape.0[i]);
    if !compatible {
        return Err(format!("cannot concatenate {a} and {b} on axis {axis}"));
    }
    let mut shape = a.shape.0.clone();
    shape[axis] = dim_sum(a.shape.0[axis], b.shape.0[axis])?;
    Ok(TensorType::new(a.dtype, shape))
}

/// x [B, heads, S, d] with cos/sin per token or as tables (and positions) -> x's type.
fn rotary(inputs: &[&TensorType]) -> Result<TensorType, String> {
    let x = inputs[0];
    let [b, _, s, d] = dims::<4>(x, "x")?;
    float_tensor(x, "x")?;
    let half = d
        .fixed()
        .filter(|d| d % 2 == 0)
        .ok_or("head_dim must be a fixed even size")?
        / 2;
    if inputs[1].shape != inputs[2].shape {
        return Err(format!(
            "cos and sin must have one shape, got {} and {}",
            inputs[1].shape, inputs[2].shape
        ));
    }
    if inputs[1].shape.rank() == 3 {
        // Per-token angles (Op::RotaryAngles).
        if inputs[1].shape.0 != [b, s, Dim::Fixed(half)] || inputs.len() != 3 {
            return Err(format!(
                "per-token cos/sin must be [{b}, {s}, {half}] without position ids, got {}",
                inputs[1].shape
            ));
        }
        return Ok(x.clone());
    }
    let [_, cos_half] = dims::<2>(inputs[1], "cos")?;
    if cos_half != Dim::Fixed(half) {
        return Err(format!(
            "cos/sin tables must be [positions, {half}], got {}",
            inputs[1].shape
        ));
    }
    match inputs.get(3) {
        Some(p) => positions(p, b, s)?,
        None => {
            let [rows, _] = dims::<2>(inputs[1], "cos")?;
            if rows != s {
                return Err(format!(
                    "without position ids the tables need {s} rows, got {rows}"
                ));
            }
        }
    }
    Ok(x.clone())
}

/// Positions [B, S] and keys [B, kv, L, d] -> bool [B, 1, S, L].
fn attention_mask(
    inputs: &[&TensorType],
    chunk: Option<crate::ops::ChunkAttrs>,
) -> Result<TensorType, String> {
    let pos = inputs[0];
    let [b, s] = dims::<2>(pos, "position_ids")?;
    positions(pos, b, s)?;
    let [kb, _, keys, _] = dims::<4>(inputs[1], "keys")?;
    if kb != b {
        return Err(format!("keys {} and positions {pos} disagree", inputs[1]));
    }
    if chunk.is_some_and(|c| c.size == 0) {
        return Err("chunk size must be positive".into());
    }
    Ok(TensorType::new(
        DType::Bool,
        vec![b, Dim::Fixed(1), s, keys],
    ))
}

/// Cache [B, kv, T, d], new entries [B, kv, S, d] and positions [B, S] -> the cache's type.
fn cache_write(inputs: &[&TensorType]) -> Result<TensorType, String> {
    let (past, update) = (inputs[0], inputs[1]);
    let [b, kv, _, d] = dims::<4>(past, "past")?;
    let [ub, ukv, s, ud] = dims::<4>(update, "update")?;
    float_tensor(past, "past")?;
    if (ub, ukv, ud) != (b, kv, d) || update.dtype != past.dtype {
        return Err(format!("update {update} does not fit cache {past}"));
    }
    positions(inputs[2], b, s)?;
    Ok(past.clone())
}

/// A cache and positions -> the cache with `keys` entries.
fn cache_view(inputs: &[&TensorType]) -> Result<TensorType, String> {
    let cache = inputs[0];
    let [b, kv, _, d] = dims::<4>(cache, "cache")?;
    let [pb, _] = dims::<2>(inputs[1], "position_ids")?;
    if pb != b || inputs[1].dtype != DType::I64 {
        return Err(format!(
            "position_ids {} do not match cache {cache}",
            inputs[1]
        ));
    }
    Ok(TensorType::new(
        cache.dtype,
        vec![b, kv, Dim::Sym(SymDim::Keys), d],
    ))
}

/// q [B, heads, S, d], keys and values [B, kv, L, d], optional mask -> q's type.
fn sdpa(inputs: &[&TensorType]) -> Result<TensorType, String> {
    let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
    let [b, nh, s, d] = dims::<4>(q, "q")?;
    let [kb, nkv, t, kd] = dims::<4>(k, "k")?;
    float_tensor(q, "q")?;
    if kb != b || kd != d || k != v || k.dtype != q.dtype {
        return Err(format!("q {q}, k {k} and v {v} disagree"));
    }
    match (nh.fixed(), nkv.fixed()) {
        (Some(h), Some(kv)) if kv > 0 && h % kv == 0 => {}
        _ => {
            return Err(format!(
                "query heads {nh} must be a multiple of kv heads {nkv}"
            ))
        }
    }
    if let Some(mask) = inputs.get(3) {
        if mask.dtype != DType::Bool || mask.shape.0 != [b, Dim::Fixed(1), s, t] {
            return Err(format!("mask must be bool[{b}, 1, {s}, {t}], got {mask}"));
        }
    }
    Ok(q.clone())
}

/// [.., 2I] -> [.., I].
fn swiglu(inputs: &[&TensorType]) -> Result<TensorType, String> {
    let x = inputs[0];
    float_tensor(x, "x")?;
    let n = x
        .shape
        .last()
        .and_then(|d| d.fixed())
        .filter(|n| n % 2 == 0)
        .ok_or("last axis must be a fixed even size")?;
    let mut shape = x.shape.0.clone();
    *shape.last_mut().expect("rank >= 1") = Dim::Fixed(n / 2);
    Ok(TensorType::new(x.dtype, shape))
}

fn attention(a: &AttentionAttrs, inputs: &[&TensorType]) -> Result<TensorType, String> {
    let x = inputs[0];
    let [b, s, h] = activation(x)?;
    let pos = inputs[1];
    if pos.dtype != DType::I64 || pos.shape.0 != [b, s] {
        return Err(format!("position_ids must be i64[{b}, {s}], got {pos}"));
    }
    if a.num_heads == 0 || a.num_kv_heads == 0 || a.num_heads % a.num_kv_heads != 0 {
        return Err(format!(
            "num_heads {} must be a positive multiple of num_kv_heads {}",
            a.num_heads, a.num_kv_heads
        ));
    }
    if let Some(rope) = &a.rope {
        if a.head_dim % 2 != 0 || rope.inv_freq.len() != a.head_dim / 2 {
            return Err(format!(
                "RoPE needs an even head_dim and head_dim/2 inverse frequencies; head_dim {}, {} frequencies",
                a.head_dim,
                rope.inv_freq.len()
            ));
        }
    }
    if a.chunk.is_some_and(|c| c.size == 0) {
        return Err("chunk size must be positive".into());
    }
    let q = Dim::Fixed(a.num_heads * a.head_dim);
    let kv = Dim::Fixed(a.num_kv_heads * a.head_dim);
    expect(inputs[2], &[q, h], "wq")?;
    expect(inputs[3], &[kv, h], "wk")?;
    expect(inputs[4], &[kv, h], "wv")?;
    expect(inputs[5], &[h, q], "wo")?;
    Ok(x.clone())
}

/// Checks x and top-k of a (fused) MoE; returns (H, E, I, 2I).
fn moe_dims(
    top_k: usize,
    num_experts: usize,
    intermediate: usize,
    x: &TensorType,
) -> Result<[Dim; 4], String> {
    let [_, _, h] = activation(x)?;
    if top_k == 0 || top_k > num_experts {
        return Err(format!("top_k {top_k} must be in 1..={num_experts}"));
    }
    Ok([
        h,
        Dim::Fixed(num_experts),
        Dim::Fixed(intermediate),
        Dim::Fixed(2 * intermediate),
    ])
}

fn moe(m: &MoeAttrs, inputs: &[&TensorType]) -> Result<TensorType, String> {
    let [h, e, i, i2] = moe_dims(m.top_k, m.num_experts, m.intermediate_size, inputs[0])?;
    expect(inputs[1], &[e, h], "router")?;
    expect(inputs[2], &[e, h, i2], "gate_up")?;
    expect(inputs[3], &[e, i, h], "down")?;
    expect(inputs[4], &[i, h], "shared_gate")?;
    expect(inputs[5], &[i, h], "shared_up")?;
    expect(inputs[6], &[h, i], "shared_down")?;
    Ok(inputs[0].clone())
}

fn fused_moe(m: &FusedMoeAttrs, inputs: &[&TensorType]) -> Result<TensorType, String> {
    let [h, e, i, i2] = moe_dims(m.top_k, m.num_experts, m.intermediate_size, inputs[0])?;
    expect(inputs[1], &[e, h], "router")?;
    match m.layout {
        ExpertLayout::Interleaved => {
            expect(inputs[2], &[e, i2, h], "fc1")?;
            expect(inputs[3], &[e, h, i], "fc2")?;
        }
        ExpertLayout::Halves => {
            expect(inputs[2], &[e, h, i2], "fc1")?;
            expect(inputs[3], &[e, i, h], "fc2")?;
        }
    }
    expect(inputs[4], &[i2, h], "shared_fc1")?;
    expect(inputs[5], &[h, i], "shared_fc2")?;
    Ok(inputs[0].clone())
}

fn positions(t: &TensorType, b: Dim, s: Dim) -> Result<(), String> {
    if t.dtype == DType::I64 && t.shape.0 == [b, s] {
        Ok(())
    } else {
        Err(format!("position_ids must be i64[{b}, {s}], got {t}"))
    }
}

/// The size of two concatenated dims: fixed sizes add, `past + seq` is `total`, and 0 is neutral.
pub fn dim_sum(a: Dim, b: Dim) -> Result<Dim, String> {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => Ok(Dim::Fixed(x + y)),
        (Dim::Fixed(0), d) | (d, Dim::Fixed(0)) => Ok(d),
        (Dim::Sym(SymDim::Past), Dim::Sym(SymDim::Seq)) => Ok(Dim::Sym(SymDim::Total)),
        _ => Err(format!("cannot express {a} + {b} as one dimension")),
    }
}

/// Whether two shapes hold the same number of elements: equal fixed products and equal symbolic dims.
fn same_elements(a: &[Dim], b: &[Dim]) -> bool {
    let split = |dims: &[Dim]| {
        let mut syms: Vec<SymDim> = dims
            .iter()
            .filter_map(|d| if let Dim::Sym(s) = d { Some(*s) } else { None })
            .collect();
        syms.sort();
        (
            dims.iter().filter_map(|d| d.fixed()).product::<usize>(),
            syms,
        )
    };
    let ((pa, sa), (pb, sb)) = (split(a), split(b));
    // `features` counts feature rows: it may absorb one other symbolic dim times a fixed factor.
    let absorbs = |from: &[SymDim], to: &[SymDim], pf: usize, pt: usize| {
        to == [SymDim::Features] && from.len() == 1 && pt > 0 && pf % pt == 0
    };
    (pa == pb && sa == sb) || absorbs(&sa, &sb, pa, pb) || absorbs(&sb, &sa, pb, pa)
}

/// Dims of an activation `[B, S, H]` in a float type.
fn activation(x: &TensorType) -> Result<[Dim; 3], String> {
    float_tensor(x, "x")?;
    dims::<3>(x, "x")
}

fn dims<const N: usize>(t: &TensorType, what: &str) -> Result<[Dim; N], String> {
    t.shape
        .0
        .clone()
        .try_into()
        .map_err(|_| format!("{what} must have rank {N}, got {}", t.shape))
}

fn expect(t: &TensorType, shape: &[Dim], what: &str) -> Result<(), String> {
    if t.shape.0 != shape {
        return Err(format!(
            "{what} must have shape {}, got {}",
            Shape(shape.to_vec()),
            t.shape
        ));
    }
    if !t.dtype.is_float() {
        return Err(format!("{what} must be a float tensor, got {}", t.dtype));
    }
    Ok(())
}

fn float_tensor(t: &TensorType, what: &str) -> Result<(), String> {
    if t.dtype.is_float() {
        Ok(())
    } else {
        Err(format!("{what} must be a float tensor, got {t}"))
    }
}

fn index_tensor(t: &TensorType, rank: usize, what: &str) -> Result<(), String> {
    if t.dtype.is_index() && t.shape.rank() == rank {
        Ok(())
    } else {
        Err(format!("{what} must be i32/i64 of rank {rank}, got {t}"))
    }
}

/// Numpy broadcasting over equal ranks: each pair of dims is equal or one of them is 1.
fn broadcast(a: &Shape, b: &Shape) -> Result<Shape, String> {
    if a.rank() != b.rank() {
        return Err(format!("operands {a} and {b} have different ranks"));
    }
    a.0.iter()
        .zip(&b.0)
        .map(|(&x, &y)| match (x, y) {
            _ if x == y => Ok(x),
            (Dim::Fixed(1), other) | (other, Dim::Fixed(1)) => Ok(other),
            _ => Err(format!("operands {a} and {b} do not broadcast")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Shape)
}
