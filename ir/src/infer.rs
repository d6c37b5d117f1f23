//! Typing rules: the output types of every op given its input types, exactly as documented on [`Op`].

use crate::ops::{AttentionAttrs, MoeAttrs, Op};
use crate::types::{DType, Dim, Shape, TensorType};

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
        Op::Embedding { out } => {
            let (ids, table) = (inputs[0], inputs[1]);
            index_tensor(ids, 2, "ids")?;
            float_tensor(table, "table")?;
            let [_, h] = dims::<2>(table, "table")?;
            TensorType::new(*out, vec![ids.shape.0[0], ids.shape.0[1], h])
        }
        Op::Attention(a) => attention(a, inputs)?,
        Op::Mlp => {
            let x = inputs[0];
            let [_, _, h] = activation(x)?;
            let [i, _] = dims::<2>(inputs[1], "gate")?;
            expect(inputs[1], &[i, h], "gate")?;
            expect(inputs[2], &[i, h], "up")?;
            expect(inputs[3], &[h, i], "down")?;
            x.clone()
        }
        Op::Moe(m) => moe(m, inputs)?,
        Op::RmsNorm(_) => {
            let x = inputs[0];
            float_tensor(x, "x")?;
            let h = x.shape.last().ok_or("x must have rank >= 1")?;
            if let Some(w) = inputs.get(1) {
                float_tensor(w, "weight")?;
                expect(w, &[h], "weight")?;
            }
            x.clone()
        }
        Op::Linear => {
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
            let mut shape = x.shape.0.clone();
            *shape.last_mut().expect("rank >= 1") = n;
            TensorType::new(x.dtype, shape)
        }
        Op::Add | Op::Mul => {
            let (a, b) = (inputs[0], inputs[1]);
            if a.dtype != b.dtype {
                return Err(format!("operands have dtypes {} and {}", a.dtype, b.dtype));
            }
            TensorType {
                dtype: a.dtype,
                shape: broadcast(&a.shape, &b.shape)?,
            }
        }
        Op::Sigmoid | Op::Silu => {
            float_tensor(inputs[0], "x")?;
            inputs[0].clone()
        }
        Op::Cast { to } => TensorType {
            dtype: *to,
            shape: inputs[0].shape.clone(),
        },
    };
    Ok(vec![out])
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

fn moe(m: &MoeAttrs, inputs: &[&TensorType]) -> Result<TensorType, String> {
    let x = inputs[0];
    let [_, _, h] = activation(x)?;
    if m.top_k == 0 || m.top_k > m.num_experts {
        return Err(format!(
            "top_k {} must be in 1..={}",
            m.top_k, m.num_experts
        ));
    }
    let e = Dim::Fixed(m.num_experts);
    let i = Dim::Fixed(m.intermediate_size);
    let i2 = Dim::Fixed(2 * m.intermediate_size);
    expect(inputs[1], &[e, h], "router")?;
    expect(inputs[2], &[e, h, i2], "gate_up")?;
    expect(inputs[3], &[e, i, h], "down")?;
    expect(inputs[4], &[i, h], "shared_gate")?;
    expect(inputs[5], &[i, h], "shared_up")?;
    expect(inputs[6], &[h, i], "shared_down")?;
    Ok(x.clone())
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
