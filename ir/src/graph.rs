//! The graph container: a `StableDiGraph` of op nodes whose edges carry producer and consumer slots,
//! the named graph outputs, and the checkpoint weights the graph's `Weight` nodes point into.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

pub use petgraph::stable_graph::NodeIndex;
use petgraph::stable_graph::StableDiGraph;
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::error::Diagnostic;
use crate::infer::infer;
use crate::ops::{Op, Phase};
use crate::types::TensorType;
use crate::weights::WeightStore;

/// A node: its op, a name for humans, and the types of its outputs (slot order).
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub outputs: Vec<TensorType>,
}

/// An edge from a producer's output slot to a consumer's input slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    pub src_slot: usize,
    pub dst_slot: usize,
}

/// One output of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value {
    pub node: NodeIndex,
    pub slot: usize,
}

impl From<NodeIndex> for Value {
    fn from(node: NodeIndex) -> Value {
        Value { node, slot: 0 }
    }
}

/// A computation graph in one [`Phase`].
#[derive(Clone, Debug)]
pub struct Graph {
    pub phase: Phase,
    graph: StableDiGraph<Node, Edge>,
    outputs: Vec<(String, Value)>,
    weights: Arc<WeightStore>,
}

impl Graph {
    /// An empty graph whose weights live in `weights`.
    pub fn new(phase: Phase, weights: Arc<WeightStore>) -> Graph {
        Graph {
            phase,
            graph: StableDiGraph::new(),
            outputs: Vec::new(),
            weights,
        }
    }

    /// The checkpoint shards behind the graph's weights.
    pub fn weights(&self) -> &Arc<WeightStore> {
        &self.weights
    }

    /// Replaces the store, which must hold every shard of the old one under the same id (see
    /// [`WeightStore::reopened`]).
    pub fn replace_weights(&mut self, weights: Arc<WeightStore>) {
        self.weights = weights;
    }

    /// Adds a node fed by `inputs` (slot order), inferring its output types. An op whose typing rule
    /// rejects the inputs is not added.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: &[Value],
    ) -> Result<Value, Diagnostic> {
        let name = name.into();
        let types: Vec<&TensorType> = inputs
            .iter()
            .map(|v| self.value_type(*v))
            .collect::<Option<_>>()
            .ok_or_else(|| Diagnostic {
                node: None,
                name: name.clone(),
                message: "an input refers to a missing node or slot".to_string(),
            })?;
        let outputs = infer(&op, &types).map_err(|message| Diagnostic {
            node: None,
            name: name.clone(),
            message: format!("{}: {message}", op.name()),
        })?;
        let node = self.graph.add_node(Node { name, op, outputs });
        for (dst_slot, v) in inputs.iter().enumerate() {
            self.graph.add_edge(
                v.node,
                node,
                Edge {
                    src_slot: v.slot,
                    dst_slot,
                },
            );
        }
        Ok(Value { node, slot: 0 })
    }

    /// The node at `index`, if it exists.
    pub fn node(&self, index: NodeIndex) -> Option<&Node> {
        self.graph.node_weight(index)
    }

    /// The type of a value, if its node and slot exist.
    pub fn value_type(&self, value: Value) -> Option<&TensorType> {
        self.graph.node_weight(value.node)?.outputs.get(value.slot)
    }

    /// The values feeding `node`, ordered by input slot. Slots without an edge are absent; the verifier
    /// reports them.
    pub fn inputs(&self, node: NodeIndex) -> Vec<Value> {
        let mut edges: Vec<(usize, Value)> = self
            .graph
            .edges_directed(node, Direction::Incoming)
            .map(|e| {
                (
                    e.weight().dst_slot,
                    Value {
                        node: e.source(),
                        slot: e.weight().src_slot,
                    },
                )
            })
            .collect();
        edges.sort();
        edges.into_iter().map(|(_, v)| v).collect()
    }

    /// The input slots of `node` with the edge feeding each, unsorted and unchecked (for the verifier).
    pub fn input_edges(&self, node: NodeIndex) -> Vec<Edge> {
        self.graph
            .edges_directed(node, Direction::Incoming)
            .map(|e| *e.weight())
            .collect()
    }

    /// Declares a named graph output.
    pub fn set_output(&mut self, name: impl Into<String>, value: Value) {
        self.outputs.push((name.into(), value));
    }

    /// The named graph outputs in declaration order.
    pub fn outputs(&self) -> &[(String, Value)] {
        &self.outputs
    }

    /// All node indices in insertion order.
    pub fn node_indices(&self) -> Vec<NodeIndex> {
        self.graph.node_indices().collect()
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.graph.node_count()
    }

    /// Nodes in a deterministic topological order (ready nodes by smallest index first), or the nodes
    /// left on a cycle.
    pub fn topo_order(&self) -> Result<Vec<NodeIndex>, Vec<NodeIndex>> {
        let mut indegree: std::collections::HashMap<NodeIndex, usize> = self
            .graph
            .node_indices()
            .map(|n| (n, self.graph.edges_directed(n, Direction::Incoming).count()))
            .collect();
        let mut ready: BinaryHeap<Reverse<NodeIndex>> = indegree
            .iter()
            .filter(|(_, &d)| d == 0)
            .map(|(&n, _)| Reverse(n))
            .collect();
        let mut order = Vec::with_capacity(indegree.len());
        while let Some(Reverse(n)) = ready.pop() {
            order.push(n);
            for e in self.graph.edges_directed(n, Direction::Outgoing) {
                let d = indegree
                    .get_mut(&e.target())
                    .expect("edge target is a node");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse(e.target()));
                }
            }
        }
        if order.len() == indegree.len() {
            Ok(order)
        } else {
            let mut stuck: Vec<NodeIndex> = indegree
                .into_iter()
                .filter(|(_, d)| *d > 0)
                .map(|(n, _)| n)
                .collect();
            stuck.sort();
            Err(stuck)
        }
    }

    /// Mutable access to a node, for passes that rewrite attributes in place.
    pub fn node_mut(&mut self, index: NodeIndex) -> Option<&mut Node> {
        self.graph.node_weight_mut(index)
    }

    /// Redirects every use of `old` (consumer edges and graph outputs) to `new`.
    pub fn replace_uses(&mut self, old: Value, new: Value) {
        let uses: Vec<_> = self
            .graph
            .edges_directed(old.node, Direction::Outgoing)
            .filter(|e| e.weight().src_slot == old.slot)
            .map(|e| (e.id(), e.target(), e.weight().dst_slot))
            .collect();
        for (id, target, dst_slot) in uses {
            self.graph.remove_edge(id);
            self.graph.add_edge(
                new.node,
                target,
                Edge {
                    src_slot: new.slot,
                    dst_slot,
                },
            );
        }
        for (_, v) in &mut self.outputs {
            if *v == old {
                *v = new;
            }
        }
    }

    /// Feeds input `slot` of `node` from `value` instead of its current producer.
    pub fn set_input(&mut self, node: NodeIndex, slot: usize, value: Value) {
        let old: Vec<_> = self
            .graph
            .edges_directed(node, Direction::Incoming)
            .filter(|e| e.weight().dst_slot == slot)
            .map(|e| e.id())
            .collect();
        for id in old {
            self.graph.remove_edge(id);
        }
        self.add_raw_edge(value, node, slot);
    }

    /// Removes every node that no graph output depends on. Graph inputs are kept.
    pub fn prune_dead(&mut self) {
        let mut live = std::collections::HashSet::new();
        let mut stack: Vec<NodeIndex> = self.outputs.iter().map(|(_, v)| v.node).collect();
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(self.graph.neighbors_directed(n, Direction::Incoming));
            }
        }
        let dead: Vec<NodeIndex> = self
            .graph
            .node_indices()
            .filter(|n| !live.contains(n) && !matches!(self.graph[*n].op, Op::Input(_)))
            .collect();
        for n in dead {
            self.graph.remove_node(n);
        }
    }

    /// Keeps the graph outputs whose name `keep` accepts.
    pub fn retain_outputs(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.outputs.retain(|(name, _)| keep(name));
    }

    /// Removes graph inputs that no node reads.
    pub fn remove_unused_inputs(&mut self) {
        let unused: Vec<NodeIndex> = self
            .graph
            .node_indices()
            .filter(|&n| {
                matches!(self.graph[n].op, Op::Input(_))
                    && self
                        .graph
                        .neighbors_directed(n, Direction::Outgoing)
                        .next()
                        .is_none()
                    && !self.outputs.iter().any(|(_, v)| v.node == n)
            })
            .collect();
        for n in unused {
            self.graph.remove_node(n);
        }
    }

    /// Adds an edge without checks (tests of the verifier build broken graphs with it).
    pub fn add_raw_edge(&mut self, from: Value, to: NodeIndex, dst_slot: usize) {
        self.graph.add_edge(
            from.node,
            to,
            Edge {
                src_slot: from.slot,
                dst_slot,
            },
        );
    }
}
