//! The reference evaluator's feed-forward ops: the dense SwiGLU MLP, Llama 4's sigmoid-routed MoE
//! (checkpoint layout and fused layout) and the shared routing rule.

use ndarray::{s, ArrayD, Axis, Ix2, IxDyn};

use super::{as_matrix, linear, sigmoid, silu};
use crate::ops::{ExpertLayout, FusedMoeAttrs, MoeAttrs};

pub(super) fn swiglu(x: &ArrayD<f32>) -> ArrayD<f32> {
    let n = *x.shape().last().expect("rank >= 1") / 2;
    let last = Axis(x.ndim() - 1);
    let gate = x.slice_axis(last, (..n).into());
    let up = x.slice_axis(last, (n..).into());
    gate.mapv(silu) * up
}

pub(super) fn fused_moe(m: &FusedMoeAttrs, x: &ArrayD<f32>, w: &[&ArrayD<f32>]) -> ArrayD<f32> {
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

pub(super) fn mlp(
    x: &ArrayD<f32>,
    gate: &ArrayD<f32>,
    up: &ArrayD<f32>,
    down: &ArrayD<f32>,
) -> ArrayD<f32> {
    let g = linear(x, gate).mapv(silu);
    linear(&(g * linear(x, up)), down)
}

pub(super) fn moe(m: &MoeAttrs, x: &ArrayD<f32>, w: &[&ArrayD<f32>]) -> ArrayD<f32> {
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
