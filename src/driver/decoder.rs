//! Emitting the decoder: one ONNX graph, or one per pipeline stage (`herd compile --stages N`), each
//! stage a contiguous range of layers with its own weights file, KV caches and TensorRT profile.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use anyhow::{Context, Result};
use herd_ir::Graph;
use herd_runtime::manifest::{GraphIo, StageIo};
use herd_targets::onnx::{self, ModelNames, OnnxModel, OnnxOptions};

use super::CompileOptions;
use crate::plan::{self, StagePlan};

/// How the decoder is split into pipeline stages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StageSplit {
    /// One graph.
    #[default]
    One,
    /// This many stages, balancing weight + KV bytes per device (the split `herd plan --gpus` shows).
    Balanced(usize),
    /// These layer ranges.
    Layers(Vec<Range<usize>>),
    /// Only the stage of these layers, as a calibration window (GPTQ): not a bundle to serve.
    Window(Range<usize>),
}

/// The emitted decoder: its graphs in stage order with the layers each runs.
pub struct EmittedDecoder {
    pub stages: Vec<(Range<usize>, OnnxModel)>,
    /// The calibration exposures the graphs output (`calib.*`; compiles with `expose_calibration`).
    pub calibration_outputs: Vec<String>,
}

impl EmittedDecoder {
    /// The first (or only) graph.
    pub fn first(&self) -> &OnnxModel {
        &self.stages[0].1
    }

    /// The decoder's names: the first stage's, with every stage's caches.
    pub fn io(&self) -> GraphIo {
        let mut io = self.first().io.clone();
        io.kv = self
            .stages
            .iter()
            .flat_map(|(_, m)| m.io.kv.iter().cloned())
            .collect();
        io
    }

    fn sum(&self, f: impl Fn(&OnnxModel) -> u64) -> u64 {
        self.stages.iter().map(|(_, m)| f(m)).sum()
    }

    /// Bytes of every stage's weights file.
    pub fn data_bytes(&self) -> u64 {
        self.sum(|m| m.data_bytes)
    }

    /// Bytes of every stage's model file.
    pub fn model_bytes(&self) -> u64 {
        self.sum(|m| m.model_bytes)
    }

    /// Weight bytes one decoded token reads, over all stages.
    pub fn active_weight_bytes(&self) -> u64 {
        self.sum(|m| m.active_weight_bytes)
    }

    /// ONNX op counts by layer over all stages (the parts outside layers summed).
    pub fn node_counts(&self) -> BTreeMap<Option<usize>, BTreeMap<String, usize>> {
        let mut all: BTreeMap<Option<usize>, BTreeMap<String, usize>> = BTreeMap::new();
        for (_, m) in &self.stages {
            for (layer, ops) in &m.node_counts {
                for (op, n) in ops {
                    *all.entry(*layer)
                        .or_default()
                        .entry(op.clone())
                        .or_default() += n;
                }
            }
        }
        all
    }

    /// SQNR of every quantized weight, over all stages.
    pub fn sqnr_db(&self) -> BTreeMap<String, f64> {
        self.stages
            .iter()
            .flat_map(|(_, m)| m.sqnr_db.clone())
            .collect()
    }

    /// The files written: (path, bytes, sha256) of every stage's weights and model.
    pub fn files(&self) -> Vec<(String, u64, String)> {
        self.stages
            .iter()
            .flat_map(|(_, m)| {
                [
                    (m.data_file.clone(), m.data_bytes, m.data_sha256.clone()),
                    (m.model_file.clone(), m.model_bytes, m.model_sha256.clone()),
                ]
            })
            .collect()
    }

    /// The manifest's stages (empty for one graph of all `num_layers` layers); `profiles` holds each
    /// stage's TensorRT profile.
    pub fn stage_ios(&self, num_layers: usize, profiles: Option<&[[String; 3]]>) -> Vec<StageIo> {
        if let [(range, _)] = self.stages.as_slice() {
            if *range == (0..num_layers) {
                return Vec::new();
            }
        }
        self.stages
            .iter()
            .enumerate()
            .map(|(k, (range, m))| StageIo {
                model_file: m.model_file.clone(),
                first_layer: range.start,
                end_layer: range.end,
                hidden_in: (range.start > 0).then(|| herd_ir::split::HIDDEN_IN.to_string()),
                hidden_out: (range.end < num_layers)
                    .then(|| herd_ir::split::HIDDEN_OUT.to_string()),
                kv: m.io.kv.clone(),
                weight_bytes: m.data_bytes,
                tensorrt_profile: profiles.and_then(|p| p.get(k).cloned()),
            })
            .collect()
    }
}

/// What each stage's device is planned to hold at `options`' context and batch (weights as the plan
/// models them; the compile prints the emitted bytes beside).
pub fn stage_plans(
    options: &CompileOptions,
    config: &herd_ir::Llama4Config,
) -> Result<Vec<StagePlan>> {
    let input = plan::PlanInput {
        gpu: plan::GPUS[0],
        gpus: 1,
        dtype: options.dtype,
        quant: options.quant.as_ref().map(|q| q.scheme),
        quantized_head: options.quant.as_ref().is_some_and(|q| q.head),
        quantized_embeddings: options.quant.as_ref().is_some_and(|q| q.embeddings),
        kv_bytes_per_value: options.dtype.bits() as u64 / 8,
        batch: options.tensorrt.as_ref().map_or(1, |t| t.max_batch) as u64,
        context: options.max_context as u64,
        max_seq: options.tensorrt.as_ref().map_or(1, |t| t.max_seq) as u64,
    };
    // The checked path inside the model folder (import already read and bounded this file).
    let path = herd_ir::model_file(&options.model, "config.json")?
        .with_context(|| format!("{}: no config.json", options.model.display()))?;
    let raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", path.display()))?;
    let weights = plan::config_layer_weights(config, &input, plan::prequantized_fp8_experts(&raw));
    let kv = plan::layer_kv_bytes(config, input.kv_bytes_per_value, input.batch, input.context);
    let usable = (input.gpu.memory_bytes as f64 * plan::USABLE_FRACTION) as u64;
    let activation = plan::activation_peak_bytes(config, &input, input.context);
    let n = config.num_layers;
    Ok(match &options.stages {
        StageSplit::One => plan::describe_stages(
            &weights,
            &kv,
            std::slice::from_ref(&(0..n)),
            activation,
            usable,
        ),
        StageSplit::Balanced(k) => {
            anyhow::ensure!(
                (1..=herd_ir::split::MAX_STAGES.min(n)).contains(k),
                "--stages {k}: use 1 to {} (one layer at least per stage; the model has {n} layers)",
                herd_ir::split::MAX_STAGES.min(n)
            );
            plan::split_stages(&weights, &kv, *k, activation, usable)
        }
        StageSplit::Layers(ranges) => {
            herd_ir::split::check_ranges(n, ranges)
                .map_err(|d| anyhow::anyhow!("--stage-layers: {}", d.message))?;
            plan::describe_stages(&weights, &kv, ranges, activation, usable)
        }
        StageSplit::Window(window) => {
            anyhow::ensure!(
                !window.is_empty() && window.end <= n,
                "herd bug: calibration window {window:?} of {n} layers"
            );
            plan::describe_stages(
                &weights,
                &kv,
                std::slice::from_ref(window),
                activation,
                usable,
            )
        }
    })
}

/// `graph`'s proof of verification (a failure is a herd bug: the passes verified it already).
fn verified<'g>(graph: &'g Graph, after: &str) -> Result<herd_ir::Verified<'g>> {
    herd_ir::verified(graph, Some(after)).map_err(|e| anyhow::anyhow!("herd bug: {e}"))
}

/// Emits `graph` (verified, lowered) as one decoder graph, or cut at `ranges` into one per stage (one
/// range short of all layers: a calibration window).
pub fn emit_decoder(
    graph: &Graph,
    ranges: &[Range<usize>],
    num_layers: usize,
    dir: &Path,
    options: &OnnxOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<EmittedDecoder> {
    if ranges.len() == 1 && ranges[0] == (0..num_layers) {
        let model = onnx::emit(verified(graph, "the passes")?, dir, options, progress)?;
        return Ok(EmittedDecoder {
            stages: vec![(0..num_layers, model)],
            calibration_outputs: herd_passes::calibrate::exposed(graph),
        });
    }
    let bug = |d: herd_ir::Diagnostic| {
        anyhow::anyhow!("herd bug: splitting the decoder: {}: {}", d.name, d.message)
    };
    if ranges.len() > 1 {
        herd_ir::split::check_ranges(num_layers, ranges).map_err(bug)?;
    }
    let mut stages = Vec::with_capacity(ranges.len());
    let mut calibration_outputs = Vec::new();
    for (k, range) in ranges.iter().enumerate() {
        // One stage graph at a time: each holds the nodes of its layers only.
        let stage = herd_ir::split::stage(graph, num_layers, range.clone()).map_err(bug)?;
        calibration_outputs.extend(herd_passes::calibrate::exposed(&stage));
        let stage = verified(&stage, "split")?;
        let model = onnx::emit_as(stage, dir, ModelNames::stage(k), options, progress)?;
        stages.push((range.clone(), model));
    }
    Ok(EmittedDecoder {
        stages,
        calibration_outputs,
    })
}
