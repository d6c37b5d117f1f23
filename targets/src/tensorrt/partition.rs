//! How ONNX Runtime splits a `--moe cuda` graph between its TensorRT EP (registered first) and its CUDA
//! EP (second): the MoE contrib nodes go to CUDA, everything else to TensorRT in subgraphs cut at them.
//! The model is the TensorRT EP's own: it walks the nodes in topological order and cuts its supported
//! list at every node it cannot parse, so each stretch of nodes between two MoE nodes is one engine. An
//! estimate from the documentation and the EP's source, not checked on a GPU here.

use std::collections::HashMap;

use onnx_protobuf::GraphProto;
use serde::Serialize;

/// The `(domain, op)` pairs the CUDA EP runs beside TensorRT.
pub const CUDA_EP_OPS: [(&str, &str); 2] = [("com.microsoft", "MoE"), ("com.microsoft", "QMoE")];

/// Whether a node is one of [`CUDA_EP_OPS`].
pub fn is_cuda_ep_node(domain: &str, op_type: &str) -> bool {
    CUDA_EP_OPS
        .iter()
        .any(|(d, o)| *d == domain && *o == op_type)
}

/// The expected split of one graph.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// TensorRT engines (stretches of TensorRT nodes between CUDA nodes).
    pub tensorrt_subgraphs: usize,
    pub tensorrt_nodes: usize,
    /// Nodes on the CUDA EP.
    pub cuda_nodes: usize,
    /// Tensors made in one part and read in another (copied or handed over between EPs per call).
    pub boundary_tensors: usize,
}

/// The expected split of `graph` (its nodes are in topological order, as herd emits them).
pub fn partition(graph: &GraphProto) -> Partition {
    let mut part_of_node = Vec::with_capacity(graph.node.len());
    let mut p = Partition::default();
    let mut part = 0usize;
    let mut in_trt_run = false;
    for node in &graph.node {
        if is_cuda_ep_node(&node.domain, &node.op_type) {
            part += 1;
            p.cuda_nodes += 1;
            in_trt_run = false;
        } else {
            if !in_trt_run {
                part += 1;
                p.tensorrt_subgraphs += 1;
                in_trt_run = true;
            }
            p.tensorrt_nodes += 1;
        }
        part_of_node.push(part);
    }
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (node, &part) in graph.node.iter().zip(&part_of_node) {
        for out in &node.output {
            producer.insert(out.as_str(), part);
        }
    }
    let mut crossing = std::collections::HashSet::new();
    for (node, &part) in graph.node.iter().zip(&part_of_node) {
        for input in &node.input {
            if producer.get(input.as_str()).is_some_and(|&q| q != part) {
                crossing.insert(input.as_str());
            }
        }
    }
    p.boundary_tensors = crossing.len();
    p
}
