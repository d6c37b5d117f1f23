//! The emitter: walks the graph in topological order and writes one or more ONNX nodes per IR op.
//! Weights are written to the external data file when a consumer first needs them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use herd_ir::graph::{NodeIndex, Value};
use herd_ir::names::Cache;
use herd_ir::ops::Op;
use herd_ir::weights::{Transform, WeightRef};
use herd_ir::{DType, Dim, Graph, Phase, Verified};
use herd_runtime::manifest::{GraphIo, KvNames};
use onnx_protobuf::{
    GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, ValueInfoProto,
};

use super::external::ExternalData;
use super::proto::{float_tensor, int64_tensor, node, onnx_dtype, value_info, Attr};
use super::{OnnxOptions, IR_VERSION, OPSET};
use crate::error::TargetError;

/// What the emitter wrote.
#[derive(Clone, Debug)]
pub struct OnnxModel {
    pub model_file: String,
    pub data_file: String,
    pub model_bytes: u64,
    pub model_sha256: String,
    pub data_bytes: u64,
    pub data_sha256: String,
    pub io: GraphIo,
    /// ONNX op types with their counts, keyed by decoder layer (None: outside the layers).
    pub node_counts: BTreeMap<Option<usize>, BTreeMap<String, usize>>,
    /// SQNR in dB of every quantized weight, by node name (empty when nothing is quantized).
    pub sqnr_db: BTreeMap<String, f64>,
    /// Weight bytes one decoded token reads: experts count top_k / E of their bytes, an embedding
    /// table one row, everything else all of it.
    pub active_weight_bytes: u64,
}

/// Values per streamed weight block (64 MiB of f32): bounds the emitter's memory whatever the model size.
pub(super) const STREAM_BLOCK_ELEMENTS: usize = 16 << 20;

/// File and graph names of one emitted model.
#[derive(Clone, Debug)]
pub struct ModelNames {
    pub model_file: String,
    pub data_file: String,
    pub graph_name: String,
}

impl ModelNames {
    /// The decoder: `model.onnx` + `model.onnx.data`.
    pub fn decoder() -> ModelNames {
        ModelNames::named("model", "herd_llama4_decoder")
    }

    /// The vision encoder and projector: `vision.onnx` + `vision.onnx.data`.
    pub fn vision() -> ModelNames {
        ModelNames::named("vision", "herd_llama4_vision")
    }

    /// Pipeline stage `k` of the decoder: `stage{k}.onnx` + `stage{k}.onnx.data`.
    pub fn stage(k: usize) -> ModelNames {
        ModelNames::named(&format!("stage{k}"), &format!("herd_llama4_stage{k}"))
    }

    fn named(stem: &str, graph_name: &str) -> ModelNames {
        ModelNames {
            model_file: format!("{stem}.onnx"),
            data_file: format!("{stem}.onnx.data"),
            graph_name: graph_name.into(),
        }
    }
}

/// Emits the decoder `graph` as `dir/model.onnx` + `dir/model.onnx.data`. `progress(done, total)` is
/// called with weight bytes written so far.
pub fn emit(
    graph: Verified<'_>,
    dir: &Path,
    options: &OnnxOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<OnnxModel, TargetError> {
    emit_as(graph, dir, ModelNames::decoder(), options, progress)
}

/// Emits `graph` under `names` in `dir`.
pub fn emit_as(
    graph: Verified<'_>,
    dir: &Path,
    names: ModelNames,
    options: &OnnxOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<OnnxModel, TargetError> {
    let graph = graph.graph();
    if !matches!(graph.phase, Phase::Lowered | Phase::Quantized) {
        return Err(TargetError::bug(
            "ONNX emission",
            "the ONNX target needs a Lowered graph",
        ));
    }
    if !matches!(options.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(TargetError::bug(
            "ONNX emission",
            format!("unsupported compute dtype {}", options.dtype),
        ));
    }
    let order = graph
        .topo_order()
        .map_err(|_| TargetError::bug("ONNX emission", "graph has a cycle"))?;
    let total_weight_bytes = order
        .iter()
        .filter_map(|&n| match &graph.node(n)?.op {
            Op::Weight(w) => Some(w.num_elements() as u64 * options.dtype.bits() as u64 / 8),
            _ => None,
        })
        .sum();
    let mut e = Emitter {
        graph,
        options,
        nodes: Vec::new(),
        initializers: Vec::new(),
        inputs: Vec::new(),
        data: ExternalData::create(dir, &names.data_file)?,
        model_names: names,
        names: HashMap::new(),
        used: HashSet::new(),
        weights: HashMap::new(),
        ints: HashMap::new(),
        positions: HashMap::new(),
        sqnr_db: BTreeMap::new(),
        expert_sqnr_sums: HashMap::new(),
        weight_bytes: HashMap::new(),
        quantized_cache: HashMap::new(),
        written: 0,
        total_weight_bytes,
        progress,
    };
    for index in order {
        e.emit_node(index)?;
    }
    let outputs = e.emit_outputs()?;
    e.finish(dir, outputs)
}

pub(super) struct Emitter<'a> {
    pub(super) graph: &'a Graph,
    pub(super) options: &'a OnnxOptions,
    pub(super) nodes: Vec<NodeProto>,
    pub(super) initializers: Vec<TensorProto>,
    pub(super) inputs: Vec<ValueInfoProto>,
    pub(super) data: ExternalData,
    model_names: ModelNames,
    /// ONNX tensor name of each IR value already emitted.
    pub(super) names: HashMap<Value, String>,
    pub(super) used: HashSet<String>,
    /// Initializer names of weights and constants, keyed by node and whether stored transposed.
    weights: HashMap<(NodeIndex, bool), String>,
    /// Inline int64 constants by content.
    ints: HashMap<Vec<i64>, String>,
    /// Implicit rotary positions (0..S for every batch row) already built, by S.
    pub(super) positions: HashMap<usize, String>,
    /// SQNR in dB of every quantized weight, by node name.
    pub(super) sqnr_db: BTreeMap<String, f64>,
    /// Signal and noise energy of expert weights written one expert at a time, by node name.
    pub(super) expert_sqnr_sums: HashMap<String, (f64, f64)>,
    /// Bytes written for each weight node (all its layouts and scales).
    pub(super) weight_bytes: HashMap<NodeIndex, u64>,
    /// Quantized weights already written, by node and layout.
    pub(super) quantized_cache:
        HashMap<(NodeIndex, super::quantized::QLayout), super::quantized::QTensors>,
    pub(super) written: u64,
    pub(super) total_weight_bytes: u64,
    pub(super) progress: &'a mut dyn FnMut(u64, u64),
}

impl Emitter<'_> {
    pub(super) fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut n = 1;
        while !self.used.insert(name.clone()) {
            n += 1;
            name = format!("{base}_{n}");
        }
        name
    }

    pub(super) fn push(
        &mut self,
        name: &str,
        op_type: &str,
        domain: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
    ) -> String {
        let out = self.fresh(name);
        let node_name = out.clone();
        self.nodes
            .push(node(&node_name, op_type, domain, inputs, &[&out], attrs));
        out
    }

    pub(super) fn int_const(&mut self, values: &[i64]) -> String {
        if let Some(name) = self.ints.get(values) {
            return name.clone();
        }
        let label: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let name = self.fresh(&format!("const.i64[{}]", label.join(",")));
        self.initializers
            .push(int64_tensor(&name, &[values.len() as i64], values));
        self.ints.insert(values.to_vec(), name.clone());
        name
    }

    pub(super) fn scalar_int(&mut self, value: i64) -> String {
        let name = format!("const.i64.scalar({value})");
        if self.used.insert(name.clone()) {
            self.initializers.push(int64_tensor(&name, &[], &[value]));
        }
        name
    }

    pub(super) fn float_scalar(&mut self, value: f32, dtype: DType) -> Result<String, TargetError> {
        let name = format!("const.{}({value:e})", dtype.name());
        if self.used.insert(name.clone()) {
            self.initializers
                .push(float_tensor(&name, &[], &[value], dtype)?);
        }
        Ok(name)
    }

    /// Name of the ONNX tensor holding IR value `v`; weights and constants are written on first use,
    /// transposed to [K, N] when `transposed`.
    pub(super) fn input(&mut self, v: Value, transposed: bool) -> Result<String, TargetError> {
        let node = self
            .graph
            .node(v.node)
            .ok_or_else(|| TargetError::bug("ONNX emission", "missing producer"))?;
        match &node.op {
            Op::Weight(_) | Op::Constant(_) => self.constant(v.node, transposed),
            _ if transposed => {
                let x = self.input(v, false)?;
                Ok(self.push(
                    &format!("{x}.T"),
                    "Transpose",
                    "",
                    &[&x],
                    vec![("perm", Attr::Ints(vec![1, 0]))],
                ))
            }
            _ => self.names.get(&v).cloned().ok_or_else(|| {
                TargetError::bug_at(
                    "ONNX emission",
                    &node.name,
                    "its value is used before it was emitted",
                )
            }),
        }
    }

    fn constant(&mut self, index: NodeIndex, transposed: bool) -> Result<String, TargetError> {
        if let Some(name) = self.weights.get(&(index, transposed)) {
            return Ok(name.clone());
        }
        let before = self.data.offset();
        let name = self.constant_uncached(index, transposed)?;
        *self.weight_bytes.entry(index).or_default() += self.data.offset() - before;
        self.weights.insert((index, transposed), name.clone());
        Ok(name)
    }

    fn constant_uncached(
        &mut self,
        index: NodeIndex,
        transposed: bool,
    ) -> Result<String, TargetError> {
        let node = self.graph.node(index).expect("checked by caller");
        let label = if transposed {
            format!("{}.T", node.name)
        } else {
            node.name.clone()
        };
        match &node.op {
            Op::Weight(w) if w.effective_quant().is_some() => self.dequantized(index, transposed),
            Op::Weight(w) if transposed => {
                let w = w.clone().with(Transform::Transpose { perm: vec![1, 0] });
                self.float_weight(&label, &w)
            }
            Op::Weight(w) => self.float_weight(&label, w),
            Op::Constant(c) => {
                let dtype = self.options.dtype;
                let name = self.fresh(&label);
                let array =
                    ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&c.shape), c.values.to_vec())
                        .map_err(|e| TargetError::bug("ONNX emission", e.to_string()))?;
                let array = if transposed {
                    array.reversed_axes().as_standard_layout().into_owned()
                } else {
                    array
                };
                let dims: Vec<i64> = array.shape().iter().map(|&d| d as i64).collect();
                let mut tensor = float_tensor(&name, &dims, &[], dtype)?;
                let values = array
                    .as_slice()
                    .ok_or_else(|| TargetError::bug("ONNX emission", "non-contiguous constant"))?;
                self.data
                    .append(&mut tensor, &super::proto::encode_floats(values, dtype)?)?;
                self.initializers.push(tensor);
                Ok(name)
            }
            _ => Err(TargetError::bug("ONNX emission", "not a constant")),
        }
    }

    /// Streams float weight `w` (after its transforms) into the external data file in the compute dtype
    /// as a new initializer named after `label`.
    pub(super) fn float_weight(
        &mut self,
        label: &str,
        w: &WeightRef,
    ) -> Result<String, TargetError> {
        let dtype = self.options.dtype;
        let name = self.fresh(label);
        let dims: Vec<i64> = w
            .shape()
            .map_err(|m| TargetError::bug("ONNX emission", m))?
            .iter()
            .map(|&d| d as i64)
            .collect();
        let mut tensor = float_tensor(&name, &dims, &[], dtype)?;
        let offset = self.data.begin()?;
        let (data, written, total, progress) = (
            &mut self.data,
            &mut self.written,
            self.total_weight_bytes,
            &mut self.progress,
        );
        let sink = |bytes: Vec<u8>| -> Result<(), TargetError> {
            *written += bytes.len() as u64;
            data.write_owned(bytes)?;
            progress((*written).min(total), total);
            Ok(())
        };
        // Decoded and encoded in one pass per block (projections: straight into ONNX's [K, N]).
        let weights = self.graph.weights();
        use super::proto::{encode_bf16_into, encode_f16_into, encode_f32_into};
        match dtype {
            DType::F32 => weights.stream_encoded(w, STREAM_BLOCK_ELEMENTS, &encode_f32_into, sink),
            DType::F16 => weights.stream_encoded(w, STREAM_BLOCK_ELEMENTS, &encode_f16_into, sink),
            DType::BF16 => {
                weights.stream_encoded(w, STREAM_BLOCK_ELEMENTS, &encode_bf16_into, sink)
            }
            DType::F8E4M3 | DType::I8 | DType::I4 | DType::I32 | DType::I64 | DType::Bool => {
                Err(TargetError::bug(
                    "ONNX emission",
                    format!("float weight `{label}` emitted as {}", dtype.name()),
                ))
            }
        }?;
        self.data.end(&mut tensor, offset);
        self.initializers.push(tensor);
        Ok(name)
    }

    fn emit_node(&mut self, index: NodeIndex) -> Result<(), TargetError> {
        let graph = self.graph;
        let node = graph.node(index).expect("topo order lists existing nodes");
        let inputs = graph.inputs(index);
        let name = node.name.as_str();
        let out = match &node.op {
            Op::Weight(_) | Op::Constant(_) => return Ok(()),
            Op::Input(a) => self.lower_input(a)?,
            Op::Embedding { .. } => self.lower_embedding(node, &inputs)?,
            Op::RmsNorm(a) => self.lower_rms_norm(node, &inputs, a)?,
            Op::Linear => self.lower_linear(node, &inputs)?,
            Op::LayerNorm(a) => self.lower_layer_norm(node, &inputs, a)?,
            Op::Gelu => self.lower_gelu(node, &inputs)?,
            Op::AppendToken => self.lower_append_token(node, &inputs)?,
            Op::ScatterRows => self.lower_scatter_rows(node, &inputs)?,
            Op::PickRows => self.lower_pick_rows(node, &inputs)?,
            Op::Add | Op::Mul | Op::Sigmoid => self.lower_elementwise(node, &inputs)?,
            Op::Silu => self.lower_silu(node, &inputs)?,
            Op::Cast { to } => self.lower_cast(node, &inputs, *to)?,
            Op::Reshape { shape } => self.lower_reshape(node, &inputs, shape)?,
            Op::Transpose { perm } => self.lower_transpose(node, &inputs, perm)?,
            Op::Slice { axis, start, end } => {
                self.lower_slice(node, &inputs, *axis, *start, *end)?
            }
            Op::Concat { axis } => self.lower_concat(node, &inputs, *axis)?,
            Op::Rotary => self.lower_rotary(node, &inputs)?,
            Op::QueryTemperature(temp) => self.lower_query_temperature(node, &inputs, temp)?,
            Op::AttentionMask { chunk } => {
                self.attention_mask(name, inputs[0], inputs[1], chunk.map(|c| c.size))?
            }
            Op::RotaryAngles(a) => self.rotary_angles(name, inputs[0], a)?,
            Op::CacheWrite { ring } => {
                // Written straight into the graph output (no Identity), so that a present bound to
                // its past's buffer makes the update in place.
                let output = graph
                    .outputs()
                    .iter()
                    .find(|(_, v)| v.node == index)
                    .map(|(n, _)| n.clone());
                self.cache_write(name, [inputs[0], inputs[1], inputs[2]], *ring, output)?
            }
            Op::CacheView => self.cache_view(name, inputs[0], inputs[1])?,
            Op::Sdpa { scale } => self.lower_sdpa(node, &inputs, *scale)?,
            Op::SwiGlu => self.lower_swiglu(node, &inputs)?,
            Op::FusedMoe(m) => self.fused_moe(name, m, &inputs)?,
            Op::QuantizeActivation { scale } => {
                self.lower_quantize_activation(node, &inputs, *scale)?
            }
            Op::Attention(_) | Op::Mlp | Op::Moe(_) => {
                return Err(self.unsupported(
                    name,
                    &node.op,
                    "not lowered (the Lowered phase forbids it)",
                ))
            }
        };
        self.names.insert(
            Value {
                node: index,
                slot: 0,
            },
            out,
        );
        Ok(())
    }

    /// i64 [B, S] positions 0..S, B taken from `x`'s first axis. Every rotary of a graph sees the same
    /// batch, so the first one's tensor serves the others.
    pub(super) fn implicit_positions(&mut self, name: &str, x: &str, s: usize) -> String {
        if let Some(positions) = self.positions.get(&s) {
            return positions.clone();
        }
        let row: Vec<i64> = (0..s as i64).collect();
        let row_name = self.fresh(&format!("const.positions[{s}]"));
        self.initializers
            .push(int64_tensor(&row_name, &[1, s as i64], &row));
        let positions = self.expand_over_batch(&format!("{name}.positions"), &row_name, x, &[s]);
        self.positions.insert(s, positions.clone());
        positions
    }

    /// `src` [1, rest..] repeated along a new first axis as long as `x`'s first axis: [B, rest..].
    pub(super) fn expand_over_batch(
        &mut self,
        name: &str,
        src: &str,
        x: &str,
        rest: &[usize],
    ) -> String {
        let batch = self.push(
            &format!("{name}.batch"),
            "Shape",
            "",
            &[x],
            vec![("start", Attr::Int(0)), ("end", Attr::Int(1))],
        );
        let rest: Vec<i64> = rest.iter().map(|&d| d as i64).collect();
        let rest = self.int_const(&rest);
        let shape = self.push(
            &format!("{name}.shape"),
            "Concat",
            "",
            &[&batch, &rest],
            vec![("axis", Attr::Int(0))],
        );
        self.push(name, "Expand", "", &[src, &shape], vec![])
    }

    pub(super) fn unsupported(&self, node: &str, op: &Op, message: &str) -> TargetError {
        TargetError::Unsupported {
            target: "onnx",
            node: node.to_string(),
            op: op.name(),
            message: message.to_string(),
        }
    }

    /// `silu(x[.., :n/2]) * x[.., n/2:]` over the last axis.
    pub(super) fn swiglu(&mut self, name: &str, x: &str, n: usize) -> String {
        let half = (n / 2) as i64;
        let (zero, mid, end, axis) = (
            self.int_const(&[0]),
            self.int_const(&[half]),
            self.int_const(&[n as i64]),
            self.int_const(&[-1]),
        );
        let gate = self.push(
            &format!("{name}.gate"),
            "Slice",
            "",
            &[x, &zero, &mid, &axis],
            vec![],
        );
        let up = self.push(
            &format!("{name}.up"),
            "Slice",
            "",
            &[x, &mid, &end, &axis],
            vec![],
        );
        let sig = self.push(&format!("{name}.sigmoid"), "Sigmoid", "", &[&gate], vec![]);
        let silu = self.push(&format!("{name}.silu"), "Mul", "", &[&gate, &sig], vec![]);
        self.push(name, "Mul", "", &[&silu, &up], vec![])
    }

    fn emit_outputs(&mut self) -> Result<Vec<ValueInfoProto>, TargetError> {
        let t = self.options.dtype;
        let mut infos = Vec::new();
        for (out_name, value) in self.graph.outputs().to_vec() {
            let ty = self.graph.value_type(value).cloned().ok_or_else(|| {
                TargetError::bug("ONNX emission", format!("output `{out_name}` has no type"))
            })?;
            let src = self.input(value, false)?;
            if src == out_name {
                // The producer wrote the output itself (a cache update).
                infos.push(value_info(&out_name, t, &ty.shape.0));
                continue;
            }
            let is_logits = out_name == herd_ir::names::LOGITS;
            let (op_type, attrs, dtype) = if is_logits && t != DType::F32 {
                (
                    "Cast",
                    vec![("to", Attr::Int(onnx_dtype(DType::F32) as i64))],
                    DType::F32,
                )
            } else {
                (
                    "Identity",
                    vec![],
                    if ty.dtype.is_float() { t } else { ty.dtype },
                )
            };
            if !self.used.insert(out_name.clone()) {
                return Err(TargetError::bug(
                    "ONNX emission",
                    format!("output name `{out_name}` collides with another tensor"),
                ));
            }
            self.nodes.push(node(
                &format!("output.{out_name}"),
                op_type,
                "",
                &[&src],
                &[&out_name],
                attrs,
            ));
            infos.push(value_info(&out_name, dtype, &ty.shape.0));
        }
        Ok(infos)
    }

    fn finish(self, dir: &Path, outputs: Vec<ValueInfoProto>) -> Result<OnnxModel, TargetError> {
        let (data_bytes, data_sha256) = self.data.finish()?;
        let mut node_counts: BTreeMap<Option<usize>, BTreeMap<String, usize>> = BTreeMap::new();
        for n in &self.nodes {
            let layer = n
                .name
                .strip_prefix("layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse().ok());
            let key = if n.domain.is_empty() {
                n.op_type.clone()
            } else {
                format!("{}.{}", n.domain, n.op_type)
            };
            *node_counts
                .entry(layer)
                .or_default()
                .entry(key)
                .or_default() += 1;
        }
        let mut kv = Vec::new();
        for info in &self.inputs {
            if let Some((Cache::PastKey, layer)) = Cache::parse(&info.name) {
                let ring = self.graph.node_indices().into_iter().find_map(|n| {
                    match &self.graph.node(n)?.op {
                        Op::Input(a) if a.name == info.name => a.ty.shape.0.get(2)?.fixed(),
                        _ => None,
                    }
                });
                kv.push(KvNames {
                    layer,
                    ring,
                    past_key: Cache::PastKey.name(layer),
                    past_value: Cache::PastValue.name(layer),
                    present_key: Cache::PresentKey.name(layer),
                    present_value: Cache::PresentValue.name(layer),
                });
            }
        }
        kv.sort_by_key(|k| k.layer);
        let uses_ms = self.nodes.iter().any(|n| n.domain == "com.microsoft");
        let active_weight_bytes = active_bytes(self.graph, &self.weight_bytes);

        let mut graph = GraphProto::new();
        graph.name = self.model_names.graph_name.clone();
        graph.node = self.nodes;
        graph.initializer = self.initializers;
        graph.input = self.inputs;
        graph.output = outputs;
        let mut model = ModelProto::new();
        model.ir_version = IR_VERSION;
        model.producer_name = "herd".into();
        model.producer_version = env!("CARGO_PKG_VERSION").into();
        let mut opsets = vec![opset("", OPSET)];
        if uses_ms {
            opsets.push(opset("com.microsoft", 1));
        }
        model.opset_import = opsets;
        model.graph = Some(graph).into();
        let bytes = model.write_to_bytes().map_err(|e| {
            TargetError::bug("ONNX emission", format!("serialising the ONNX model: {e}"))
        })?;
        let names = self.model_names;
        let path = dir.join(&names.model_file);
        std::fs::write(&path, &bytes).map_err(|e| TargetError::io(&path, e))?;
        Ok(OnnxModel {
            model_file: names.model_file.clone(),
            data_file: names.data_file.clone(),
            model_bytes: bytes.len() as u64,
            model_sha256: crate::sha256_hex(&bytes),
            data_bytes,
            data_sha256,
            io: GraphIo {
                model_file: names.model_file.clone(),
                input_ids: herd_ir::names::INPUT_IDS.into(),
                position_ids: herd_ir::names::POSITION_IDS.into(),
                logits: herd_ir::names::LOGITS.into(),
                logits_index: herd_ir::import::LOGITS_INDEX_INPUT.into(),
                kv_layout: "slots,kv_heads,length,head_dim".into(),
                kv,
            },
            node_counts,
            sqnr_db: self.sqnr_db,
            active_weight_bytes,
        })
    }
}

/// Bytes of weights one decoded token reads (see [`OnnxModel::active_weight_bytes`]).
fn active_bytes(graph: &Graph, written: &HashMap<NodeIndex, u64>) -> u64 {
    let mut fraction: HashMap<NodeIndex, f64> = written.keys().map(|&n| (n, 1.0)).collect();
    for index in graph.node_indices() {
        let inputs = graph.inputs(index);
        match graph.node(index).map(|n| &n.op) {
            Some(Op::FusedMoe(m)) => {
                for v in &inputs[2..4] {
                    fraction.insert(v.node, m.top_k as f64 / m.num_experts as f64);
                }
            }
            Some(Op::Embedding { .. }) => {
                let rows = graph
                    .value_type(inputs[1])
                    .and_then(|t| t.shape.0.first().copied())
                    .and_then(|d| d.fixed())
                    .unwrap_or(1);
                let used_elsewhere = graph.node_indices().iter().any(|&o| {
                    o != index && graph.inputs(o).iter().any(|v| v.node == inputs[1].node)
                });
                if !used_elsewhere {
                    fraction.insert(inputs[1].node, 1.0 / rows.max(1) as f64);
                }
            }
            _ => {}
        }
    }
    written
        .iter()
        .map(|(n, &b)| (b as f64 * fraction[n]) as u64)
        .sum()
}

fn opset(domain: &str, version: i64) -> OperatorSetIdProto {
    let mut o = OperatorSetIdProto::new();
    o.domain = domain.to_string();
    o.version = version;
    o
}

/// ONNX Reshape target: fixed sizes as themselves, a symbolic dim in the same place as in the input as
/// 0 (copy), at most one other symbolic dim as -1 (infer).
pub(super) fn reshape_spec(from: &[Dim], to: &[Dim]) -> Option<Vec<i64>> {
    let mut inferred = false;
    to.iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Fixed(n) => Some(*n as i64),
            Dim::Sym(_) if from.get(i) == Some(d) => Some(0),
            Dim::Sym(_) if !inferred => {
                inferred = true;
                Some(-1)
            }
            Dim::Sym(_) => None,
        })
        .collect()
}
