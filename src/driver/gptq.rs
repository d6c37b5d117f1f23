//! GPTQ for int4/int8 (`--method gptq`): window by window of layers ([`super::gptq_windows`]), a float
//! calibration bundle of the window exposes the input of every projection and MoE and the calibration
//! prompts' activations are spooled to disk; then, one weight of the window at a time, each matrix's Hessian is summed from its inputs (routed experts: the tokens routed to them,
//! scaled by their sigmoid router score as Llama 4 scales them; down projections: the float gate/up
//! output of those inputs) and [`herd_ir::gptq::gptq`] writes its codes and block scales to a
//! safetensors file that becomes the weight's source (pre-quantized parts, read back as
//! `code * scale`), so the emitters and the reference evaluator see exactly GPTQ's weights.
//!
//! Memory: one matrix, its Hessian and the spooled rows of one input at a time (a MoE's tokens once per
//! layer); the spool holds prompt tokens x the widths of one window's exposed inputs on disk.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use herd_ir::gptq::{times_transposed, GptqOptions, Hessian};
use herd_ir::graph::NodeIndex;
use herd_ir::ops::ExpertLayout;
use herd_ir::quant::QuantSpec;
use herd_ir::weights::{Transform, WeightRef};
use herd_ir::{Graph, Op};
use herd_passes::calibrate::output_name;

use super::gptq_files::{rewrite, MatrixWriter};
use super::spool::Spool;
use super::CompileOptions;

/// How int4/int8 weights are rounded (`--method`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QuantMethod {
    /// Round to nearest with each block's scale from `--scales` (no calibration data needed).
    #[default]
    Rtn,
    /// GPTQ against the Hessians of calibration activations.
    Gptq,
    /// Activation-aware channel scales folded into the norms (AWQ), then GPTQ on the scaled matrices.
    Awq,
}

impl QuantMethod {
    /// The name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            QuantMethod::Rtn => "rtn",
            QuantMethod::Gptq => "gptq",
            QuantMethod::Awq => "awq",
        }
    }
}

/// Activations of the calibration prompts in one window of layers, one spooled stream per exposed input.
pub(super) struct Calibration {
    pub(super) spool: Spool,
}

/// What [`apply`] did.
pub(super) struct GptqSummary {
    pub matrices: usize,
    pub weights: usize,
    /// The calibration data, for the manifest: prompts and tokens.
    pub calibration: String,
    /// SQNR of each GPTQ weight against its float values, in dB.
    pub sqnr_db: BTreeMap<String, f64>,
    /// Why the result may be weaker than it should be, if it may.
    pub warning: Option<String>,
    /// Norms whose input channels AWQ scaled (α > 0).
    pub scaled_norms: usize,
}

/// Replaces every int4/int8-quantized weight of `graph` by GPTQ's codes and scales, written under
/// `dir` (which must outlive the graph's use), calibrating `options.model` a window of layers at a
/// time ([`super::gptq_windows`]).
pub(super) fn apply(
    graph: &mut Graph,
    options: &CompileOptions,
    config: &herd_ir::Llama4Config,
    dir: &Path,
    search: herd_ir::quant::ScaleSearch,
) -> Result<GptqSummary> {
    std::fs::create_dir_all(dir)?;
    let activation_aware = options.quant_method == QuantMethod::Awq;
    let progress = indicatif::MultiProgress::new();
    let bar = progress.add(progress_bar(matrix_count(graph), "GPTQ matrices"));
    let mut writer = MatrixWriter {
        dir: dir.to_path_buf(),
        files: Vec::new(),
        error: BTreeMap::new(),
        undersampled: 0,
        bar: bar.clone(),
        options: GptqOptions {
            search,
            ..GptqOptions::default()
        },
    };
    // Each weight's matrices (expert order) as written files.
    let mut replaced: BTreeMap<NodeIndex, Vec<usize>> = BTreeMap::new();
    let mut scaled_norms = 0;
    let quantized: &Graph = graph;
    let (prompts, tokens) = super::gptq_windows::calibrate(
        options,
        config,
        &dir.join("calibration"),
        &progress,
        |calibration| {
            let channels = if activation_aware {
                super::awq::search(quantized, calibration)?
            } else {
                super::awq::ChannelScales::none()
            };
            projections(
                quantized,
                calibration,
                &channels,
                &mut writer,
                &mut replaced,
            )?;
            for moe in moe_nodes(quantized) {
                if calibration
                    .spool
                    .has(&output_name(&node_name(quantized, moe)))
                {
                    moe_experts(
                        quantized,
                        moe,
                        calibration,
                        &channels,
                        &mut writer,
                        &mut replaced,
                    )?;
                }
            }
            fold_channel_scales(quantized, &channels, &mut writer, &mut replaced)?;
            scaled_norms += channels.norms.iter().filter(|n| n.alpha > 0.0).count();
            Ok(())
        },
    )?;
    for weight in linear_inputs(graph)?.keys() {
        if int_weight(graph, *weight).is_some() && !replaced.contains_key(weight) {
            // lm_head (quantized unless --keep-head): its inputs are not exposed.
            tracing::info!(
                "GPTQ: no calibration inputs for `{}`: rounded to nearest",
                node_name(graph, *weight)
            );
        }
    }
    let warning = (writer.undersampled > 0).then(|| {
        format!(
            "GPTQ: {} of {} matrices saw fewer calibration rows than input features (experts see only the tokens routed to them) and can be fitted to the calibration prompts: pass more or longer prompts with --calibrate",
            writer.undersampled,
            writer.files.len()
        )
    });
    let summary = GptqSummary {
        matrices: writer.files.len(),
        weights: replaced.len(),
        calibration: format!("{prompts} prompts, {tokens} tokens"),
        sqnr_db: writer
            .error
            .iter()
            .map(|(name, &(signal, noise))| {
                let db = if noise == 0.0 {
                    f64::INFINITY
                } else {
                    10.0 * (signal / noise).log10()
                };
                (name.clone(), db)
            })
            .collect(),
        warning,
        scaled_norms,
    };
    bar.finish_and_clear();
    rewrite(graph, &writer, &replaced)?;
    Ok(summary)
}

/// GPTQ of every quantized `Linear` weight whose inputs were exposed, against the Hessian of its
/// inputs (divided by AWQ's channel scales when there are any).
fn projections(
    graph: &Graph,
    calibration: &Calibration,
    channels: &super::awq::ChannelScales,
    writer: &mut MatrixWriter,
    replaced: &mut BTreeMap<NodeIndex, Vec<usize>>,
) -> Result<()> {
    let linear_hessians = linear_inputs(graph)?;
    for (weight, consumers) in &linear_hessians {
        let Some((w, spec)) = int_weight(graph, *weight) else {
            continue;
        };
        let present = consumers
            .iter()
            .filter(|e| calibration.spool.has(e))
            .count();
        if present == 0 {
            // Another window's weight, or one whose inputs are not exposed (lm_head).
            continue;
        }
        if present != consumers.len() {
            bail!(
                "herd bug: `{}` is fed from two calibration windows",
                node_name(graph, *weight)
            );
        }
        let scales = consumers.first().and_then(|e| channels.of(e));
        if consumers.iter().any(|e| channels.of(e) != scales) {
            bail!(
                "herd bug: `{}` is fed by inputs scaled differently",
                node_name(graph, *weight)
            );
        }
        let mut hessian = None::<Hessian>;
        for exposure in consumers {
            let k = calibration.spool.width(exposure)?;
            let h = hessian.get_or_insert_with(|| Hessian::new(k));
            calibration.spool.read(exposure, |rows| {
                h.add(&divided(rows, scales)).map_err(anyhow::Error::msg)
            })?;
        }
        let hessian = hessian.context("herd bug: a projection without an input")?;
        let name = node_name(graph, *weight);
        let matrix = times_columns(float_matrix(graph, &w, spec.k_axis, None)?, scales);
        let file = writer.quantize(&name, None, &matrix, &hessian, spec)?;
        replaced.insert(*weight, vec![file]);
    }
    Ok(())
}

/// AWQ's channel scales folded into float weights: each norm weight divided by s, its routers'
/// columns multiplied by it (the quantized consumers were scaled before GPTQ).
fn fold_channel_scales(
    graph: &Graph,
    channels: &super::awq::ChannelScales,
    writer: &mut MatrixWriter,
    replaced: &mut BTreeMap<NodeIndex, Vec<usize>>,
) -> Result<()> {
    for norm in &channels.norms {
        let name = node_name(graph, norm.norm_weight);
        let weight = match graph.node(norm.norm_weight).map(|n| &n.op) {
            Some(Op::Weight(w)) => w.clone(),
            _ => bail!("herd bug: `{name}` is not a weight"),
        };
        let g = graph.weights().load_f32(&weight)?;
        let values: Vec<f32> = g.iter().zip(&norm.scales).map(|(g, s)| g / s).collect();
        let file = writer.write_float(&name, vec![values.len()], &values)?;
        replaced.insert(norm.norm_weight, vec![file]);
        for &router in &norm.routers {
            let m = times_columns(float_weight_matrix(graph, router)?, Some(&norm.scales));
            let file = writer.write_float(&node_name(graph, router), vec![m.n, m.k], &m.values)?;
            replaced.insert(router, vec![file]);
        }
        tracing::debug!("AWQ: `{name}` α = {}", norm.alpha);
    }
    Ok(())
}

/// A bar of `total` steps on stderr (hidden when stderr is not a terminal).
pub(super) fn progress_bar(total: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} (eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Matrices GPTQ will quantize: each int Linear weight, and per MoE the shared expert's and every
/// routed expert's quantized matrices.
fn matrix_count(graph: &Graph) -> usize {
    let mut count = 0;
    for n in graph.node_indices() {
        let inputs = graph.inputs(n);
        match graph.node(n).map(|x| &x.op) {
            Some(Op::Linear) if int_weight(graph, inputs[1].node).is_some() => count += 1,
            Some(Op::FusedMoe(m)) => {
                let quantized = |i: usize| usize::from(int_weight(graph, inputs[i].node).is_some());
                count +=
                    quantized(4) + quantized(5) + m.num_experts * (quantized(2) + quantized(3));
            }
            _ => {}
        }
    }
    count
}

/// For every weight fed to a `Linear`, the exposures holding that Linear's inputs.
fn linear_inputs(graph: &Graph) -> Result<BTreeMap<NodeIndex, Vec<String>>> {
    let mut out: BTreeMap<NodeIndex, Vec<String>> = BTreeMap::new();
    for n in graph.node_indices() {
        let Some(node) = graph.node(n) else { continue };
        if matches!(node.op, Op::Linear) {
            let weight = graph.inputs(n)[1].node;
            out.entry(weight).or_default().push(output_name(&node.name));
        }
    }
    Ok(out)
}

fn moe_nodes(graph: &Graph) -> Vec<NodeIndex> {
    graph
        .node_indices()
        .into_iter()
        .filter(|&n| matches!(graph.node(n).map(|x| &x.op), Some(Op::FusedMoe(_))))
        .collect()
}

fn node_name(graph: &Graph, n: NodeIndex) -> String {
    graph.node(n).map_or_else(String::new, |x| x.name.clone())
}

/// The weight of node `n` and its quantization, if it is quantized int4/int8 by the quantize pass.
pub(super) fn int_weight(graph: &Graph, n: NodeIndex) -> Option<(WeightRef, QuantSpec)> {
    match &graph.node(n)?.op {
        Op::Weight(w) => {
            let spec = w.quant?;
            spec.scheme.block()?;
            Some((w.clone(), spec))
        }
        _ => None,
    }
}

/// A weight's float matrix as [N, K] row-major (`expert` selects one of a stacked [E, ..] weight).
pub(super) fn float_matrix(
    graph: &Graph,
    w: &WeightRef,
    k_axis: usize,
    expert: Option<usize>,
) -> Result<Matrix> {
    let mut base = WeightRef {
        quant: None,
        ..w.clone()
    };
    let rank = base.shape().map_err(anyhow::Error::msg)?.len();
    let k_axis = match (rank, expert) {
        (2, None) => k_axis,
        (3, Some(e)) => {
            base = base.with(Transform::Select { axis: 0, index: e });
            k_axis - 1
        }
        _ => bail!("GPTQ: unsupported weight of rank {rank}"),
    };
    match k_axis {
        1 => {}
        0 => base = base.with(Transform::Transpose { perm: vec![1, 0] }),
        _ => bail!("GPTQ: K axis {k_axis} of a matrix"),
    }
    let shape = base.shape().map_err(anyhow::Error::msg)?;
    let (n, k) = (shape[0], shape[1]);
    let mut values = Vec::with_capacity(n * k);
    graph
        .weights()
        .stream_rows::<anyhow::Error>(&base, MATRIX_BLOCK_ELEMENTS, 1, |_, block| {
            values.extend(block.iter().copied());
            Ok(())
        })?;
    Ok(Matrix { n, k, values })
}

/// Values per block when a matrix is read from the checkpoint.
const MATRIX_BLOCK_ELEMENTS: usize = 16 << 20;

/// A matrix [n, k] row-major.
pub(super) struct Matrix {
    pub n: usize,
    pub k: usize,
    pub values: Vec<f32>,
}

/// Routed experts and the shared expert of one MoE: routing on the spooled inputs, then per expert
/// fc1's Hessian from the routed, score-scaled tokens and fc2's from fc1's float output.
fn moe_experts(
    graph: &Graph,
    moe: NodeIndex,
    calibration: &Calibration,
    channels: &super::awq::ChannelScales,
    writer: &mut MatrixWriter,
    replaced: &mut BTreeMap<NodeIndex, Vec<usize>>,
) -> Result<()> {
    let node = graph.node(moe).context("herd bug: missing MoE")?;
    let Op::FusedMoe(attrs) = &node.op else {
        bail!("herd bug: not a MoE");
    };
    let inputs = graph.inputs(moe);
    let (router, fc1, fc2, shared1, shared2) = (
        inputs[1].node,
        inputs[2].node,
        inputs[3].node,
        inputs[4].node,
        inputs[5].node,
    );
    let exposure = output_name(&node.name);
    let x = calibration.spool.read_all(&exposure)?;
    let h = calibration.spool.width(&exposure)?;
    let t = x.len() / h.max(1);
    let inter = attrs.intermediate_size;
    // AWQ: the fc1 matrices quantize W diag(s) against the inputs x / s.
    let scales = channels.of(&exposure);

    // The shared expert sees x unscaled by the router; its fc1 rows are gate then up.
    let shared = Expert {
        fc1: shared1,
        fc2: shared2,
        index: None,
        interleaved: false,
    };
    let (f1, f2) = expert_pair(graph, &shared, &x, h, inter, scales, writer)?;
    replaced.extend(f1.map(|f| (shared1, vec![f])));
    replaced.extend(f2.map(|f| (shared2, vec![f])));

    if int_weight(graph, fc1).is_none() && int_weight(graph, fc2).is_none() {
        return Ok(());
    }
    let router_m = float_weight_matrix(graph, router)?;
    let logits = times_transposed(&x, t, h, &router_m.values, router_m.n);
    let routed = route(&logits, t, attrs.num_experts, attrs.top_k);
    let (mut files1, mut files2) = (Vec::new(), Vec::new());
    for (e, tokens) in routed.iter().enumerate() {
        // The routed tokens of expert e, each scaled by its sigmoid score.
        let mut xe = Vec::with_capacity(tokens.len() * h);
        for &(row, score) in tokens {
            xe.extend(x[row * h..(row + 1) * h].iter().map(|v| v * score));
        }
        let expert = Expert {
            fc1,
            fc2,
            index: Some(e),
            interleaved: attrs.layout == ExpertLayout::Interleaved,
        };
        let (f1, f2) = expert_pair(graph, &expert, &xe, h, inter, scales, writer)?;
        files1.extend(f1);
        files2.extend(f2);
        tracing::debug!("GPTQ: {} expert {e}: {} tokens", node.name, tokens.len());
    }
    replaced.extend((!files1.is_empty()).then_some((fc1, files1)));
    replaced.extend((!files2.is_empty()).then_some((fc2, files2)));
    Ok(())
}

/// One expert's weights: fc1 (gate and up, [2I, H] as a matrix) and fc2 (down), of a stacked [E, ..]
/// weight when `index` is set.
struct Expert {
    fc1: NodeIndex,
    fc2: NodeIndex,
    index: Option<usize>,
    /// fc1's rows interleave gate and up (else gate rows, then up rows).
    interleaved: bool,
}

/// Rows per chunk when an expert's fc1 output is formed for fc2's Hessian ([rows, 2I] at a time).
const EXPERT_ROW_CHUNK: usize = 1024;

/// Quantizes whichever of an expert's fc1 and fc2 are int: fc1 against the inputs `x` ([t, h], divided
/// by the AWQ `scales`, its columns times them), fc2 against the float `swiglu(x fc1ᵀ)`, built in
/// chunks of rows so no [t, 2I] tensor is held. Each matrix is read once. Returns the written files.
fn expert_pair(
    graph: &Graph,
    expert: &Expert,
    x: &[f32],
    h: usize,
    inter: usize,
    scales: Option<&[f32]>,
    writer: &mut MatrixWriter,
) -> Result<(Option<usize>, Option<usize>)> {
    let (q1, q2) = (int_weight(graph, expert.fc1), int_weight(graph, expert.fc2));
    if q1.is_none() && q2.is_none() {
        return Ok((None, None));
    }
    let (w1, k1) = match &q1 {
        Some((w, spec)) => (w.clone(), spec.k_axis),
        None => float_weight(graph, expert.fc1)?,
    };
    let m1 = float_matrix(graph, &w1, k1, expert.index)?;
    let mut file2 = None;
    if let Some((w2, spec)) = &q2 {
        let mut h2 = Hessian::new(inter);
        for rows in x.chunks(EXPERT_ROW_CHUNK * h) {
            let t = rows.len() / h;
            let z = swiglu(
                &times_transposed(rows, t, h, &m1.values, m1.n),
                t,
                inter,
                expert.interleaved,
            );
            h2.add(&z).map_err(anyhow::Error::msg)?;
        }
        let m2 = float_matrix(graph, w2, spec.k_axis, expert.index)?;
        file2 =
            Some(writer.quantize(&node_name(graph, expert.fc2), expert.index, &m2, &h2, *spec)?);
    }
    let mut file1 = None;
    if let Some((_, spec)) = &q1 {
        let mut h1 = Hessian::new(h);
        h1.add(&divided(x, scales)).map_err(anyhow::Error::msg)?;
        let scaled = times_columns(m1, scales);
        file1 = Some(writer.quantize(
            &node_name(graph, expert.fc1),
            expert.index,
            &scaled,
            &h1,
            *spec,
        )?);
    }
    Ok((file1, file2))
}

/// Rows of K values divided by the channel scales `s` (unchanged without).
fn divided<'a>(rows: &'a [f32], scales: Option<&[f32]>) -> std::borrow::Cow<'a, [f32]> {
    match scales {
        None => std::borrow::Cow::Borrowed(rows),
        Some(s) => std::borrow::Cow::Owned(
            rows.iter()
                .enumerate()
                .map(|(i, v)| v / s[i % s.len()])
                .collect(),
        ),
    }
}

/// `W diag(s)`: a matrix's columns (input features) times the channel scales (unchanged without).
fn times_columns(mut m: Matrix, scales: Option<&[f32]>) -> Matrix {
    if let Some(s) = scales {
        let k = m.k;
        m.values
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v *= s[i % k]);
    }
    m
}

/// A float `z Wᵀ` weight (a router [E, H]) as its [N, K] matrix.
pub(super) fn float_weight_matrix(graph: &Graph, n: NodeIndex) -> Result<Matrix> {
    let (w, k_axis) = float_weight(graph, n)?;
    float_matrix(graph, &w, k_axis, None)
}

/// A float weight and its K axis (its last axis for a `z W^T` matrix, as the MoE op reads its router
/// [E, H] and shared fc1 [2I, H]).
fn float_weight(graph: &Graph, n: NodeIndex) -> Result<(WeightRef, usize)> {
    match graph.node(n).map(|x| &x.op) {
        Some(Op::Weight(w)) => {
            let rank = w.shape().map_err(anyhow::Error::msg)?.len();
            Ok((w.clone(), rank - 1))
        }
        _ => bail!("herd bug: a MoE input that is not a weight"),
    }
}

/// For each expert, the (token row, sigmoid score) pairs routed to it: the top `top_k` logits of each
/// token, ties to the lower expert, as the reference evaluator routes.
pub(super) fn route(
    logits: &[f32],
    t: usize,
    experts: usize,
    top_k: usize,
) -> Vec<Vec<(usize, f32)>> {
    let mut routed = vec![Vec::new(); experts];
    for row in 0..t {
        let l = &logits[row * experts..(row + 1) * experts];
        let mut ranked: Vec<usize> = (0..experts).collect();
        ranked.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        for &e in &ranked[..top_k.min(experts)] {
            routed[e].push((row, 1.0 / (1.0 + (-l[e]).exp())));
        }
    }
    routed
}

/// `silu(gate) * up` of [t, 2I] rows: gate then up halves, or interleaved (gate 2i, up 2i + 1).
fn swiglu(h1: &[f32], t: usize, inter: usize, interleaved: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(t * inter);
    for row in h1.chunks_exact(2 * inter).take(t) {
        for i in 0..inter {
            let (g, u) = if interleaved {
                (row[2 * i], row[2 * i + 1])
            } else {
                (row[i], row[inter + i])
            };
            out.push(g / (1.0 + (-g).exp()) * u);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GPTQ or AWQ bundle computes what the reference evaluator computes on the graph they rewrote:
    /// the targets store exactly GPTQ's codes and block scales (QMoE's packed experts and
    /// DequantizeLinear -> MatMul alike) and AWQ's folded norms and routers, to the fp32 tolerance of
    /// the goldens.
    #[test]
    fn gptq_bundles_match_the_reference_evaluator_on_the_gptq_graph() {
        use herd_passes::calibrate::Activations;
        use herd_targets::onnx::MoeLowering;
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-maverick");
        let dir = tempfile::tempdir().unwrap();
        let prompts: Vec<Vec<i64>> = (0..12)
            .map(|p| (0..24).map(|i| 3 + (p * 37 + i * 11) % 500).collect())
            .collect();
        let runs = [QuantMethod::Gptq, QuantMethod::Awq]
            .into_iter()
            .flat_map(|m| [(m, MoeLowering::Ort), (m, MoeLowering::Grouped)]);
        for (method, moe) in runs {
            let options = CompileOptions {
                moe,
                max_context: 64,
                quant: Some(herd_passes::quantize::QuantOptions {
                    scheme: herd_ir::quant::QuantScheme::Int4 { block: 32 },
                    scale_dtype: herd_ir::DType::F32,
                    search: herd_ir::quant::ScaleSearch::Clip,
                    head: false,
                    embeddings: false,
                    keep: vec![],
                }),
                quant_method: method,
                calibration_prompts: Some(prompts.clone()),
                vision: false,
                ..CompileOptions::new(
                    fixture.clone(),
                    dir.path().join(format!("{method:?}-{moe:?}")),
                )
            };
            let mut imported = super::super::import(&options).expect("import");
            let mut stages = Vec::new();
            super::super::run_passes(
                &options,
                Activations::Unchanged,
                &mut imported.graph,
                &mut stages,
            )
            .expect("passes");
            let (summary, _weights) = super::super::gptq_stage(
                &options,
                &imported.config,
                &mut imported.graph,
                &mut stages,
            )
            .expect("gptq");
            assert!(
                summary.matrices > summary.weights,
                "experts are quantized one by one"
            );
            if method == QuantMethod::Awq {
                assert!(
                    summary.scaled_norms > 0,
                    "AWQ scaled no norm: the folding is untested"
                );
            }
            let report = super::super::compile(&options, &mut |_, _| {}).expect("compile");
            let model = herd_runtime::Model::load(&report.bundle, &Default::default()).unwrap();
            let vocab = model.bundle.manifest.model.vocab_size;
            for ids in prompts.iter().take(3) {
                let ours = model.prompt_logits(ids).unwrap();
                let reference = herd_ir::eval_prompt::lowered_logits(&imported.graph, ids).unwrap();
                let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = ours
                    .iter()
                    .zip(reference.iter())
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert_eq!(ours.len(), ids.len() * vocab);
                eprintln!("{method:?} {moe:?}: max error {err:.3e} of logit scale {scale:.3}");
                assert!(
                    err <= 1e-4 * scale,
                    "{method:?} {moe:?}: error {err} at scale {scale}"
                );
            }
        }
    }

    #[test]
    fn routing_takes_the_top_logits_with_their_sigmoid_scores() {
        // Two tokens, three experts, top-1 and top-2; ties go to the lower expert.
        let logits = [0.5, 2.0, -1.0, 1.0, 1.0, 0.0];
        let top1 = route(&logits, 2, 3, 1);
        assert_eq!(top1[0].iter().map(|r| r.0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(top1[1].iter().map(|r| r.0).collect::<Vec<_>>(), vec![0]);
        assert!(top1[2].is_empty());
        assert!((top1[1][0].1 - 1.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-7);
        let top2 = route(&logits, 2, 3, 2);
        assert_eq!(top2[0].len(), 2);
        assert_eq!(top2[1].len(), 2);
    }

    #[test]
    fn swiglu_reads_both_layouts() {
        let halves = [1.0, 2.0, 3.0, 4.0];
        let interleaved = [1.0, 3.0, 2.0, 4.0];
        let silu = |g: f32| g / (1.0 + (-g).exp());
        let want = vec![silu(1.0) * 3.0, silu(2.0) * 4.0];
        assert_eq!(swiglu(&halves, 1, 2, false), want);
        assert_eq!(swiglu(&interleaved, 1, 2, true), want);
    }
}
