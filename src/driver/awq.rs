//! Activation-aware channel scales (AWQ, Lin et al., 2023) for `--method awq`: for every RMSNorm whose
//! output feeds only quantized projections and MoEs, a scale per input channel `s = mean|x|^α`
//! (normalised to a geometric mean of 1, α from a grid of 21 in [0, 1], α = 0 being no scaling) that
//! minimises the round-to-nearest output error of those matrices on the calibration rows. The scales
//! are folded exactly: the norm's weight is divided by `s` and every consumer's weight columns (the
//! router's too) multiplied by it, so the float model computes the same function while the salient
//! input channels get finer quantization. GPTQ then quantizes the scaled matrices against the Hessian
//! of the scaled inputs `x / s`.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use herd_ir::gptq::times_transposed;
use herd_ir::graph::NodeIndex;
use herd_ir::quant::{quantize, QuantSpec};
use herd_ir::weights::WeightRef;
use herd_ir::{Graph, Op};
use herd_passes::calibrate::output_name;
use ndarray::{ArrayD, IxDyn};

use super::gptq::{float_matrix, int_weight, route, Calibration, Matrix};

/// Calibration rows the α search evaluates the output error on (a strided sample).
const SEARCH_ROWS: usize = 512;

/// Grid points of α in [0, 1].
const ALPHAS: usize = 21;

/// One norm's folded channel scales.
pub(super) struct NormScales {
    /// The RMSNorm's weight node.
    pub norm_weight: NodeIndex,
    /// Routers fed by the norm, whose columns are scaled in float.
    pub routers: Vec<NodeIndex>,
    /// `s` per input channel.
    pub scales: Vec<f32>,
    pub alpha: f32,
}

/// Channel scales by the exposure name of the norm output's consumers (each consumer's `calib.` name
/// maps to its norm's scales).
pub(super) struct ChannelScales {
    pub norms: Vec<NormScales>,
    pub by_exposure: HashMap<String, usize>,
}

impl ChannelScales {
    /// No scaling.
    pub fn none() -> ChannelScales {
        ChannelScales {
            norms: Vec::new(),
            by_exposure: HashMap::new(),
        }
    }

    /// The scales applied to the input named `exposure`, if any.
    pub fn of(&self, exposure: &str) -> Option<&[f32]> {
        self.by_exposure
            .get(exposure)
            .map(|&i| self.norms[i].scales.as_slice())
    }
}

/// A norm's consumers that AWQ scales: quantized `Linear`s and `FusedMoe`s, all of them.
struct Group {
    norm_weight: NodeIndex,
    linears: Vec<(NodeIndex, String)>,
    moes: Vec<(NodeIndex, String)>,
}

fn groups(graph: &Graph) -> Vec<Group> {
    let mut consumers: HashMap<NodeIndex, Vec<(NodeIndex, usize)>> = HashMap::new();
    for n in graph.node_indices() {
        for (slot, v) in graph.inputs(n).into_iter().enumerate() {
            consumers.entry(v.node).or_default().push((n, slot));
        }
    }
    let mut out = Vec::new();
    for n in graph.node_indices() {
        let Some(node) = graph.node(n) else { continue };
        if !matches!(node.op, Op::RmsNorm(_)) {
            continue;
        }
        let inputs = graph.inputs(n);
        let Some(weight) = inputs.get(1).map(|v| v.node) else {
            continue;
        };
        if !matches!(graph.node(weight).map(|w| &w.op), Some(Op::Weight(_))) {
            continue;
        }
        let mut group = Group {
            norm_weight: weight,
            linears: Vec::new(),
            moes: Vec::new(),
        };
        let mut foldable = true;
        for &(c, slot) in consumers.get(&n).map(Vec::as_slice).unwrap_or(&[]) {
            let Some(consumer) = graph.node(c) else {
                continue;
            };
            let quantized = |i: usize| int_weight(graph, graph.inputs(c)[i].node).is_some();
            match &consumer.op {
                Op::Linear
                    if slot == 0 && quantized(1) && consumer.name != herd_ir::names::LM_HEAD =>
                {
                    group.linears.push((c, output_name(&consumer.name)))
                }
                Op::FusedMoe(_) if slot == 0 && quantized(2) && quantized(4) => {
                    group.moes.push((c, output_name(&consumer.name)))
                }
                _ => foldable = false,
            }
        }
        if foldable && !(group.linears.is_empty() && group.moes.is_empty()) {
            out.push(group);
        }
    }
    out
}

/// Searches the scales of every foldable norm on the calibration rows.
pub(super) fn search(graph: &Graph, calibration: &Calibration) -> Result<ChannelScales> {
    let mut result = ChannelScales::none();
    for group in groups(graph) {
        let exposure = group
            .linears
            .first()
            .or(group.moes.first())
            .map(|(_, e)| e.clone())
            .context("herd bug: an empty AWQ group")?;
        if !calibration.spool.has(&exposure) {
            continue;
        }
        let x = calibration.spool.read_all(&exposure)?;
        let k = calibration.spool.width(&exposure)?;
        let t = x.len() / k.max(1);
        if t == 0 {
            continue;
        }
        // The matrices fed by the norm (weight, spec, expert), each with the rows it sees; read one
        // at a time below, so memory holds one matrix, not a MoE layer's experts.
        let mut matrices: Vec<(WeightRef, QuantSpec, Option<usize>, Vec<f32>)> = Vec::new();
        let sample = |rows: &[f32], scale: Option<&[f32]>| -> Vec<f32> {
            let count = rows.len() / k;
            let step = count.div_ceil(SEARCH_ROWS).max(1);
            let mut out = Vec::new();
            for (i, row) in rows.chunks_exact(k).enumerate().step_by(step) {
                let s = scale.map_or(1.0, |s| s[i]);
                out.extend(row.iter().map(|v| v * s));
            }
            out
        };
        let mut routers = Vec::new();
        for (linear, _) in &group.linears {
            let weight = graph.inputs(*linear)[1].node;
            let (w, spec) = int_weight(graph, weight).context("herd bug: not quantized")?;
            matrices.push((w, spec, None, sample(&x, None)));
        }
        for (moe, _) in &group.moes {
            let inputs = graph.inputs(*moe);
            let Some(Op::FusedMoe(attrs)) = graph.node(*moe).map(|n| &n.op) else {
                bail!("herd bug: not a MoE");
            };
            let (shared, spec) = int_weight(graph, inputs[4].node).context("herd bug")?;
            matrices.push((shared, spec, None, sample(&x, None)));
            routers.push(inputs[1].node);
            let router = super::gptq::float_weight_matrix(graph, inputs[1].node)?;
            let logits = times_transposed(&x, t, k, &router.values, router.n);
            let (fc1, spec) = int_weight(graph, inputs[2].node).context("herd bug")?;
            for (e, tokens) in route(&logits, t, attrs.num_experts, attrs.top_k)
                .into_iter()
                .enumerate()
            {
                let mut rows = Vec::with_capacity(tokens.len() * k);
                let mut scores = Vec::with_capacity(tokens.len());
                for (row, score) in tokens {
                    rows.extend_from_slice(&x[row * k..(row + 1) * k]);
                    scores.push(score);
                }
                matrices.push((fc1.clone(), spec, Some(e), sample(&rows, Some(&scores))));
            }
        }
        let mean_abs: Vec<f64> = (0..k)
            .map(|j| {
                x.iter()
                    .skip(j)
                    .step_by(k)
                    .map(|v| v.abs() as f64)
                    .sum::<f64>()
                    / t as f64
            })
            .collect();
        let candidates: Vec<(f32, Vec<f32>)> = (0..ALPHAS)
            .map(|a| {
                let alpha = a as f32 / (ALPHAS - 1) as f32;
                (alpha, channel_scales(&mean_abs, alpha))
            })
            .collect();
        let mut losses = [0f64; ALPHAS];
        for (w, spec, expert, rows) in &matrices {
            let m = float_matrix(graph, w, spec.k_axis, *expert)?;
            for (loss, (_, scales)) in losses.iter_mut().zip(&candidates) {
                *loss += output_error(&m, *spec, rows, scales);
            }
        }
        // The first least loss: α = 0 (no scaling) wins ties.
        let best = (0..ALPHAS)
            .min_by(|&a, &b| losses[a].total_cmp(&losses[b]).then(a.cmp(&b)))
            .context("herd bug: no α")?;
        let (alpha, scales) = candidates[best].clone();
        tracing::debug!("AWQ: {exposure}: α = {alpha}");
        let index = result.norms.len();
        for (_, e) in group.linears.iter().chain(&group.moes) {
            result.by_exposure.insert(e.clone(), index);
        }
        result.norms.push(NormScales {
            norm_weight: group.norm_weight,
            routers,
            scales,
            alpha,
        });
    }
    Ok(result)
}

/// `mean|x|^α`, normalised to a geometric mean of 1 (zero channels get 1).
fn channel_scales(mean_abs: &[f64], alpha: f32) -> Vec<f32> {
    let raw: Vec<f64> = mean_abs
        .iter()
        .map(|&m| if m > 0.0 { m.powf(alpha as f64) } else { 1.0 })
        .collect();
    let log_mean = raw.iter().map(|v| v.ln()).sum::<f64>() / raw.len().max(1) as f64;
    raw.iter().map(|v| (v / log_mean.exp()) as f32).collect()
}

/// ‖(Q(W diag s) diag(1/s) − W) xᵀ‖² over `rows`, with Q round-to-nearest by `spec` (K on axis 1).
fn output_error(m: &Matrix, spec: QuantSpec, rows: &[f32], scales: &[f32]) -> f64 {
    let (n, k) = (m.n, m.k);
    if rows.is_empty() {
        return 0.0;
    }
    let scaled: Vec<f32> = m
        .values
        .iter()
        .enumerate()
        .map(|(i, w)| w * scales[i % k])
        .collect();
    let array = ArrayD::from_shape_vec(IxDyn(&[n, k]), scaled).expect("n x k values");
    let q = quantize(&array, &QuantSpec { k_axis: 1, ..spec }, None).dequantized;
    let error: Vec<f32> = q
        .iter()
        .zip(&m.values)
        .enumerate()
        .map(|(i, (d, w))| d / scales[i % k] - w)
        .collect();
    let t = rows.len() / k;
    times_transposed(rows, t, k, &error, n)
        .iter()
        .map(|v| (*v as f64) * (*v as f64))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_have_unit_geometric_mean_and_alpha_zero_is_identity() {
        let mean_abs = [0.5, 2.0, 8.0, 0.0];
        assert!(channel_scales(&mean_abs, 0.0)
            .iter()
            .all(|&s| (s - 1.0).abs() < 1e-6));
        let s = channel_scales(&mean_abs, 1.0);
        let log_mean = s.iter().map(|v| (*v as f64).ln()).sum::<f64>() / 4.0;
        assert!(log_mean.abs() < 1e-6);
        assert!(s[2] > s[1] && s[1] > s[0]);
    }
}
