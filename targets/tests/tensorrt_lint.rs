//! The TensorRT lint: one crafted graph per rule is rejected with that rule's name; a clean graph passes.

use herd_targets::tensorrt::{lint, RULES};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::type_proto::{Tensor as TypeTensor, Value};
use onnx_protobuf::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TypeProto,
    ValueInfoProto,
};

fn attr_i(name: &str, v: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.i = v;
    a.type_ = AttributeType::INT.into();
    a
}

fn attr_f(name: &str, v: f32) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.f = v;
    a.type_ = AttributeType::FLOAT.into();
    a
}

fn attr_s(name: &str, v: &str) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.s = v.as_bytes().to_vec();
    a.type_ = AttributeType::STRING.into();
    a
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    let mut n = NodeProto::new();
    n.name = format!("the_{}", op.to_lowercase());
    n.op_type = op.into();
    n.input = inputs.iter().map(|s| s.to_string()).collect();
    n.output = outputs.iter().map(|s| s.to_string()).collect();
    n.attribute = attrs;
    n
}

fn tensor(name: &str, dtype: DataType, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    let mut t = TensorProto::new();
    t.name = name.into();
    t.data_type = dtype as i32;
    t.dims = dims.to_vec();
    t.raw_data = raw;
    t
}

fn input(name: &str, dtype: DataType) -> ValueInfoProto {
    let mut tt = TypeTensor::new();
    tt.elem_type = dtype as i32;
    let mut ty = TypeProto::new();
    ty.value = Some(Value::TensorType(tt));
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    v.type_ = Some(ty).into();
    v
}

/// A model of `nodes` over float input `x`, int64 input `pos`, and `initializers`, at `opset`.
fn model(nodes: Vec<NodeProto>, initializers: Vec<TensorProto>, opset: i64) -> ModelProto {
    let mut g = GraphProto::new();
    g.node = nodes;
    g.initializer = initializers;
    g.input = vec![input("x", DataType::FLOAT), input("pos", DataType::INT64)];
    let mut o = OperatorSetIdProto::new();
    o.version = opset;
    let mut m = ModelProto::new();
    m.opset_import = vec![o];
    m.graph = Some(g).into();
    m
}

/// The rule of every violation, in order and with repeats: a graph breaking one rule once gives one.
fn rules_of(m: &ModelProto) -> Vec<&'static str> {
    lint(m).into_iter().map(|v| v.rule).collect()
}

fn int4_weight(name: &str) -> TensorProto {
    tensor(name, DataType::INT4, &[128, 4], vec![0x11; 256])
}

fn scale(name: &str, dims: &[i64]) -> TensorProto {
    let n: i64 = dims.iter().product();
    tensor(name, DataType::FLOAT, dims, vec![0; 4 * n as usize])
}

#[test]
fn each_rule_rejects_its_graph() {
    let k = |v: i64| tensor("k", DataType::INT64, &[1], v.to_le_bytes().to_vec());
    let cases: Vec<(&str, ModelProto)> = vec![
        (
            "opset",
            model(vec![node("Add", &["x", "x"], &["y"], vec![])], vec![], 25),
        ),
        ("unsupported-op", {
            let mut n = node("MoE", &["x"], &["y"], vec![]);
            n.domain = "com.microsoft".into();
            model(vec![n], vec![], 23)
        }),
        (
            "unsupported-op",
            model(
                vec![node("Compress", &["x", "c"], &["y"], vec![])],
                vec![],
                23,
            ),
        ),
        (
            "unknown-attribute",
            model(
                vec![node(
                    "Gather",
                    &["x", "pos"],
                    &["y"],
                    vec![attr_i("axis", 0), attr_i("trt_plugin_hint", 1)],
                )],
                vec![],
                23,
            ),
        ),
        (
            "dtype",
            model(
                vec![node("Add", &["x", "w"], &["y"], vec![])],
                vec![tensor("w", DataType::DOUBLE, &[1], vec![0; 8])],
                23,
            ),
        ),
        (
            "attention-4d",
            model(
                vec![node(
                    "Attention",
                    &["x", "x", "x", "", "pk", "pv"],
                    &["y"],
                    vec![],
                )],
                vec![],
                23,
            ),
        ),
        (
            "attention-4d",
            model(
                vec![node(
                    "Attention",
                    &["x", "x", "x"],
                    &["y", "present_k"],
                    vec![],
                )],
                vec![],
                23,
            ),
        ),
        (
            "attention-4d",
            model(
                vec![node(
                    "Attention",
                    &["x", "x", "x"],
                    &["y"],
                    vec![attr_f("softcap", 30.0)],
                )],
                vec![],
                23,
            ),
        ),
        (
            "attention-4d",
            model(
                vec![node(
                    "Attention",
                    &["x", "x", "x"],
                    &["y"],
                    vec![attr_i("q_num_heads", 4)],
                )],
                vec![],
                23,
            ),
        ),
        (
            "rotary-position-ids",
            model(
                vec![node(
                    "RotaryEmbedding",
                    &["x", "c", "s", "x"],
                    &["y"],
                    vec![],
                )],
                vec![],
                23,
            ),
        ),
        (
            "rotary-position-ids",
            model(
                vec![node("RotaryEmbedding", &["x", "c", "s"], &["y"], vec![])],
                vec![],
                23,
            ),
        ),
        (
            "topk",
            model(
                vec![node(
                    "TopK",
                    &["x", "k"],
                    &["v", "i"],
                    vec![attr_i("sorted", 0)],
                )],
                vec![k(1)],
                23,
            ),
        ),
        (
            "topk",
            model(
                vec![node("TopK", &["x", "k"], &["v", "i"], vec![])],
                vec![k(4096)],
                23,
            ),
        ),
        (
            "scatternd-reduction",
            model(
                vec![node(
                    "ScatterND",
                    &["x", "pos", "x"],
                    &["y"],
                    vec![attr_s("reduction", "add")],
                )],
                vec![],
                23,
            ),
        ),
        (
            "qdq-symmetric",
            model(
                vec![node(
                    "DequantizeLinear",
                    &["w", "s", "zp"],
                    &["y"],
                    vec![attr_i("axis", 0), attr_i("block_size", 64)],
                )],
                vec![
                    int4_weight("w"),
                    scale("s", &[2, 4]),
                    tensor("zp", DataType::INT4, &[2, 4], vec![0x33; 4]),
                ],
                23,
            ),
        ),
        (
            "activation-per-tensor",
            model(
                vec![node(
                    "QuantizeLinear",
                    &["x", "s"],
                    &["y"],
                    vec![attr_i("axis", 1)],
                )],
                vec![scale("s", &[4])],
                23,
            ),
        ),
        (
            "int4-block",
            model(
                vec![node(
                    "DequantizeLinear",
                    &["w", "s"],
                    &["y"],
                    vec![attr_i("axis", 0), attr_i("block_size", 32)],
                )],
                vec![int4_weight("w"), scale("s", &[4, 4])],
                23,
            ),
        ),
        (
            "int4-block",
            model(
                vec![node(
                    "DequantizeLinear",
                    &["x", "s"],
                    &["y"],
                    vec![attr_i("axis", 0), attr_i("block_size", 64)],
                )],
                // A single scale, so that only the blocked form of an activation is at fault.
                vec![scale("s", &[1])],
                23,
            ),
        ),
        (
            "blocked-non-int4",
            model(
                vec![node(
                    "DequantizeLinear",
                    &["w", "s"],
                    &["y"],
                    vec![attr_i("axis", 0), attr_i("block_size", 64)],
                )],
                vec![
                    tensor("w", DataType::INT8, &[128, 4], vec![1; 512]),
                    scale("s", &[2, 4]),
                ],
                23,
            ),
        ),
    ];
    let mut covered: Vec<&str> = Vec::new();
    for (rule, m) in &cases {
        let found = rules_of(m);
        assert_eq!(
            found,
            vec![*rule],
            "each crafted graph breaks exactly its rule"
        );
        let v = lint(m).into_iter().find(|v| v.rule == *rule).unwrap();
        assert!(
            v.node.starts_with("the_") || v.node == "<model>" || v.node == "w",
            "violation names the node: {v}"
        );
        covered.push(rule);
    }
    for (rule, _) in RULES {
        assert!(covered.contains(rule), "rule {rule} has no test");
    }
}

/// With the CUDA EP beside TensorRT, MoE contrib nodes are not violations, and the graph splits into
/// the stretches of TensorRT nodes between them; tensors crossing a cut are counted once each.
#[test]
fn cuda_ep_nodes_split_the_graph() {
    let moe = |name: &str, input: &str, output: &str| {
        let mut n = node("QMoE", &[input], &[output], vec![]);
        n.name = name.into();
        n.domain = "com.microsoft".into();
        n
    };
    let m = model(
        vec![
            node("Sigmoid", &["x"], &["a"], vec![]),
            moe("the_moe0", "a", "b"),
            node("Add", &["a", "b"], &["c"], vec![]),
            node("Sigmoid", &["c"], &["d"], vec![]),
            moe("the_moe1", "d", "e"),
            node("Sigmoid", &["e"], &["y"], vec![]),
        ],
        vec![],
        23,
    );
    let alone = lint(&m);
    assert_eq!(
        alone.iter().map(|v| v.rule).collect::<Vec<_>>(),
        vec!["unsupported-op", "unsupported-op"]
    );
    let report = herd_targets::tensorrt::lint_with(&m, true);
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert_eq!(
        report.partition,
        herd_targets::tensorrt::Partition {
            tensorrt_subgraphs: 3,
            tensorrt_nodes: 4,
            cuda_nodes: 2,
            // a (into moe0, and across it into Add), b, d, e.
            boundary_tensors: 4,
        }
    );
}

#[test]
fn clean_graphs_pass() {
    let k = tensor("k", DataType::INT64, &[1], 1i64.to_le_bytes().to_vec());
    let m = model(
        vec![
            node(
                "RotaryEmbedding",
                &["x", "c", "s", "pos"],
                &["r"],
                vec![attr_i("interleaved", 1)],
            ),
            node(
                "Attention",
                &["r", "r", "r", "mask"],
                &["a"],
                vec![attr_f("scale", 0.25), attr_i("is_causal", 0)],
            ),
            node(
                "TopK",
                &["a", "k"],
                &["v", "i"],
                vec![attr_i("axis", 1), attr_i("largest", 1), attr_i("sorted", 1)],
            ),
            node(
                "DequantizeLinear",
                &["w", "s"],
                &["wd"],
                vec![attr_i("axis", 0), attr_i("block_size", 64)],
            ),
            node("MatMul", &["a", "wd"], &["y"], vec![]),
        ],
        vec![k, int4_weight("w"), scale("s", &[2, 4])],
        23,
    );
    assert_eq!(lint(&m), vec![]);
}
