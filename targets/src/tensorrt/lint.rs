//! The TensorRT compatibility lint: every node of an ONNX model against the support table
//! (`support.json`, TensorRT 10.15's ONNX parser) and the parser's restrictions. Each violation names the
//! node and the rule; a compile for TensorRT fails on any rule it was not allowed to break.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::{GraphProto, Message, ModelProto, NodeProto, TensorProto};
use protobuf::Enum;
use serde::Deserialize;

use super::partition::{is_cuda_ep_node, partition, Partition};
use crate::error::TargetError;

/// The rules, each with what it checks.
pub const RULES: &[(&str, &str)] = &[
    ("opset", "the model's default-domain opset is within what the parser reads (9..=24)"),
    ("unsupported-op", "every node is a default-domain op in the support table (no com.microsoft ops)"),
    ("unknown-attribute", "no node carries an attribute outside its ONNX schema (TensorRT-only attributes break ONNX Runtime)"),
    ("dtype", "every initializer and graph input has a dtype TensorRT takes"),
    ("attention-4d", "Attention takes 4D q/k/v and a mask only: no past_key/past_value inputs, no present outputs, no softcap, no 3D (q_num_heads) form"),
    ("rotary-position-ids", "RotaryEmbedding gets int64 position ids (a graph input or constant, maybe expanded)"),
    ("topk", "TopK is sorted and K < 3840"),
    ("scatternd-reduction", "ScatterND has no reduction"),
    ("qdq-symmetric", "Q/DQ have no zero point other than 0"),
    ("activation-per-tensor", "quantized activations use one scale (per-tensor)"),
    ("int4-block", "INT4 is weight-only (a DQ of an initializer) with block size 64 or 128"),
    ("blocked-non-int4", "block quantization is used for INT4 weights only"),
];

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub rule: &'static str,
    pub node: String,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] node `{}`: {}", self.rule, self.node, self.message)
    }
}

#[derive(Deserialize)]
struct Support {
    opsets: (i64, i64),
    dtypes: Vec<String>,
    ops: BTreeMap<String, Vec<String>>,
}

fn support() -> Support {
    serde_json::from_str(include_str!("support.json"))
        .expect("support.json is valid (checked by a test)")
}

fn dtype_name(code: i32) -> String {
    DataType::from_i32(code).map_or_else(|| format!("dtype {code}"), |d| format!("{d:?}"))
}

/// Lints a model file for TensorRT alone.
pub fn lint_file(path: &Path) -> Result<Vec<Violation>, TargetError> {
    Ok(lint_file_with(path, false)?.violations)
}

/// What a lint found, and how the graph is expected to split between the providers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LintReport {
    pub violations: Vec<Violation>,
    pub partition: Partition,
}

/// Lints a model file; with `cuda_ep` the MoE contrib nodes are the CUDA EP's (see [`partition`]).
pub fn lint_file_with(path: &Path, cuda_ep: bool) -> Result<LintReport, TargetError> {
    let bytes = std::fs::read(path).map_err(|e| TargetError::io(path, e))?;
    let not_onnx = |why: String| TargetError::Io {
        path: path.display().to_string(),
        message: format!("not an ONNX model: {why}"),
    };
    let model = ModelProto::parse_from_bytes(&bytes).map_err(|e| not_onnx(e.to_string()))?;
    // An empty file parses as an empty model; a model without graph nodes is nothing to lint.
    if model.graph.as_ref().is_none_or(|g| g.node.is_empty()) {
        return Err(not_onnx(format!("{} bytes, no graph nodes", bytes.len())));
    }
    Ok(lint_with(&model, cuda_ep))
}

/// Lints a model for TensorRT alone.
pub fn lint(model: &ModelProto) -> Vec<Violation> {
    lint_with(model, false).violations
}

/// Lints a model; with `cuda_ep` the [`CUDA_EP_OPS`](super::CUDA_EP_OPS) nodes are left to the CUDA EP instead of flagged.
pub fn lint_with(model: &ModelProto, cuda_ep: bool) -> LintReport {
    let violations = violations(model, cuda_ep);
    let graph = model.graph.get_or_default();
    let partition = partition(graph);
    LintReport {
        violations,
        partition,
    }
}

/// Findings so far, and what the node rules read.
struct Findings<'m> {
    initializers: HashMap<&'m str, &'m TensorProto>,
    /// Values known to be int64 (see [`int64_values`]).
    int64_values: HashSet<&'m str>,
    out: Vec<Violation>,
}

impl Findings<'_> {
    fn report(&mut self, rule: &'static str, node: &str, message: String) {
        self.out.push(Violation {
            rule,
            node: node.to_string(),
            message,
        })
    }
}

fn violations(model: &ModelProto, cuda_ep: bool) -> Vec<Violation> {
    let table = support();
    let graph = model.graph.get_or_default();
    let mut f = Findings {
        initializers: graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect(),
        int64_values: int64_values(graph),
        out: Vec::new(),
    };
    opset_rule(model, &table, &mut f);
    dtype_rule(graph, &table, &mut f);
    for node in &graph.node {
        let name = if node.name.is_empty() {
            node.output.first().map_or("?", |s| s.as_str())
        } else {
            node.name.as_str()
        };
        if cuda_ep && is_cuda_ep_node(&node.domain, &node.op_type) {
            continue;
        }
        if !support_rules(node, name, &table, &mut f) {
            continue;
        }
        match node.op_type.as_str() {
            "Attention" => attention_rule(node, name, &mut f),
            "RotaryEmbedding" => rotary_rule(node, name, &mut f),
            "TopK" => topk_rule(node, name, &mut f),
            "ScatterND" => scatternd_rule(node, name, &mut f),
            "QuantizeLinear" | "DequantizeLinear" => qdq_rules(node, name, &mut f),
            _ => {}
        }
    }
    f.out
}

/// Input `i` of `node`, when given.
fn input(node: &NodeProto, i: usize) -> Option<&str> {
    node.input
        .get(i)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// `opset`: the default domain's opset is one the parser reads.
fn opset_rule(model: &ModelProto, table: &Support, f: &mut Findings<'_>) {
    for o in &model.opset_import {
        if o.domain.is_empty() && (o.version < table.opsets.0 || o.version > table.opsets.1) {
            f.report(
                "opset",
                "<model>",
                format!(
                    "opset {} is outside {}..={}",
                    o.version, table.opsets.0, table.opsets.1
                ),
            );
        }
    }
}

/// `dtype`: every initializer and graph input has a dtype TensorRT takes.
fn dtype_rule(graph: &GraphProto, table: &Support, f: &mut Findings<'_>) {
    let allowed: HashSet<&str> = table.dtypes.iter().map(String::as_str).collect();
    for t in &graph.initializer {
        let name = dtype_name(t.data_type);
        if !allowed.contains(name.as_str()) {
            f.report("dtype", &t.name, format!("initializer of dtype {name}"));
        }
    }
    for input in &graph.input {
        if let Some(onnx_protobuf::type_proto::Value::TensorType(t)) =
            &input.type_.get_or_default().value
        {
            let name = dtype_name(t.elem_type);
            if !allowed.contains(name.as_str()) {
                f.report("dtype", &input.name, format!("graph input of dtype {name}"));
            }
        }
    }
}

/// The values of `graph` known to be int64: int64 graph inputs and constants, `Shape`, and ops that
/// keep their first input's type (the vision graph's expanded 0..S positions, the decoder's per-token
/// row index from a Range).
fn int64_values(graph: &GraphProto) -> HashSet<&str> {
    let int64 = DataType::INT64 as i32;
    let mut values: HashSet<&str> = graph
        .initializer
        .iter()
        .filter(|t| t.data_type == int64)
        .map(|t| t.name.as_str())
        .collect();
    for input in &graph.input {
        if let Some(onnx_protobuf::type_proto::Value::TensorType(t)) =
            &input.type_.get_or_default().value
        {
            if t.elem_type == int64 {
                values.insert(input.name.as_str());
            }
        }
    }
    for node in &graph.node {
        let keeps_type = matches!(
            node.op_type.as_str(),
            "Expand" | "Reshape" | "Unsqueeze" | "Squeeze" | "Identity" | "Range" | "Mul"
        );
        let int64_first = node
            .input
            .first()
            .is_some_and(|i| values.contains(i.as_str()));
        if node.op_type == "Shape" || (keeps_type && int64_first) {
            values.extend(node.output.iter().map(String::as_str));
        }
    }
    values
}

/// `unsupported-op` and `unknown-attribute`; false when the op is not in the table (nothing more to
/// check).
fn support_rules(node: &NodeProto, name: &str, table: &Support, f: &mut Findings<'_>) -> bool {
    let Some(attrs) = table
        .ops
        .get(&node.op_type)
        .filter(|_| node.domain.is_empty() || node.domain == "ai.onnx")
    else {
        let op = if node.domain.is_empty() {
            node.op_type.clone()
        } else {
            format!("{}.{}", node.domain, node.op_type)
        };
        f.report(
            "unsupported-op",
            name,
            format!("{op} is not in TensorRT 10.15's ONNX parser"),
        );
        return false;
    };
    for a in &node.attribute {
        if !attrs.contains(&a.name) {
            f.report(
                "unknown-attribute",
                name,
                format!("{} has no attribute `{}` in ONNX", node.op_type, a.name),
            );
        }
    }
    true
}

/// `attention-4d`: 4D q/k/v and a mask only.
fn attention_rule(node: &NodeProto, name: &str, f: &mut Findings<'_>) {
    if input(node, 4).is_some() || input(node, 5).is_some() {
        f.report(
            "attention-4d",
            name,
            "past_key/past_value inputs (keep the KV cache outside Attention)".into(),
        );
    }
    if node.output.iter().skip(1).any(|o| !o.is_empty()) {
        f.report(
            "attention-4d",
            name,
            "present_key/present_value/qk outputs".into(),
        );
    }
    if attr_f(node, "softcap").is_some_and(|v| v != 0.0) {
        f.report("attention-4d", name, "softcap".into());
    }
    if attr_i(node, "q_num_heads").is_some() || attr_i(node, "kv_num_heads").is_some() {
        f.report(
            "attention-4d",
            name,
            "3D inputs (q_num_heads/kv_num_heads)".into(),
        );
    }
}

/// `rotary-position-ids`: int64 position ids.
fn rotary_rule(node: &NodeProto, name: &str, f: &mut Findings<'_>) {
    match input(node, 3) {
        Some(pos) if f.int64_values.contains(pos) => {}
        Some(pos) => f.report(
            "rotary-position-ids",
            name,
            format!("position ids `{pos}` are not int64 (a graph input or constant)"),
        ),
        None => f.report("rotary-position-ids", name, "no position ids".into()),
    }
}

/// `topk`: sorted, with a constant K below 3840.
fn topk_rule(node: &NodeProto, name: &str, f: &mut Findings<'_>) {
    if attr_i(node, "sorted") == Some(0) {
        f.report("topk", name, "sorted=0".into());
    }
    match input(node, 1)
        .and_then(|k| f.initializers.get(k))
        .and_then(|t| int64s(t).first().copied())
    {
        Some(k) if k < 3840 => {}
        Some(k) => f.report("topk", name, format!("K = {k} is not below 3840")),
        None => f.report("topk", name, "K is not a constant".into()),
    }
}

/// `scatternd-reduction`: no reduction.
fn scatternd_rule(node: &NodeProto, name: &str, f: &mut Findings<'_>) {
    if node
        .attribute
        .iter()
        .any(|a| a.name == "reduction" && a.s != b"none")
    {
        f.report("scatternd-reduction", name, "reduction".into());
    }
}

/// `qdq-symmetric`, `activation-per-tensor`, `int4-block` and `blocked-non-int4`.
fn qdq_rules(node: &NodeProto, name: &str, f: &mut Findings<'_>) {
    if let Some(zp) = input(node, 2) {
        let zero = f.initializers.get(zp).is_some_and(|t| {
            t.raw_data.iter().all(|&b| b == 0) && t.int32_data.iter().all(|&v| v == 0)
        });
        if !zero {
            f.report("qdq-symmetric", name, format!("zero point `{zp}`"));
        }
    }
    let weight = input(node, 0).and_then(|x| f.initializers.get(x)).copied();
    let scale = input(node, 1).and_then(|s| f.initializers.get(s));
    let per_tensor = scale.is_some_and(|t| t.dims.iter().product::<i64>() == 1);
    let is_activation = node.op_type == "QuantizeLinear" || weight.is_none();
    if is_activation && !per_tensor {
        f.report(
            "activation-per-tensor",
            name,
            "activation scale is not a single value".into(),
        );
    }
    let blocked = attr_i(node, "block_size").is_some_and(|b| b > 0);
    let int4 = weight.is_some_and(|w| w.data_type == DataType::INT4 as i32);
    if int4 {
        match attr_i(node, "block_size") {
            Some(64 | 128) => {}
            Some(b) => f.report(
                "int4-block",
                name,
                format!("INT4 block size {b} (TensorRT takes 64 or 128)"),
            ),
            None => f.report("int4-block", name, "INT4 without block quantization".into()),
        }
    } else if node.op_type == "DequantizeLinear"
        && weight.is_none()
        && input(node, 0).is_some()
        && blocked
    {
        f.report(
            "int4-block",
            name,
            "blocked DequantizeLinear of an activation".into(),
        );
    } else if blocked {
        f.report(
            "blocked-non-int4",
            name,
            "block quantization of a non-INT4 tensor".into(),
        );
    }
}

fn attr_i(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute
        .iter()
        .find(|a| a.name == name && a.type_.enum_value() == Ok(AttributeType::INT))
        .map(|a| a.i)
}

fn attr_f(node: &NodeProto, name: &str) -> Option<f32> {
    node.attribute
        .iter()
        .find(|a| a.name == name && a.type_.enum_value() == Ok(AttributeType::FLOAT))
        .map(|a| a.f)
}

fn int64s(t: &TensorProto) -> Vec<i64> {
    if !t.int64_data.is_empty() {
        return t.int64_data.clone();
    }
    t.raw_data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}
