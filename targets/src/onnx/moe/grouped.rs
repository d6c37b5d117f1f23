//! The routed experts in standard ONNX ops, each expert multiplying only the rows routed to it:
//!
//! ```text
//! values, indices = TopK(logits, 1); scaled = tokens * Sigmoid(values); expert = indices as [T]
//! acc = zeros [T, H]
//! for e in 0..E:
//!     rows = Transpose(NonZero(Cast<float>(expert == e)))       # [n_e, 1]: data-dependent
//!     y = SwiGLU(GatherND(scaled, rows) @ W1_e) @ W2_e        # [n_e, H]
//!     acc = ScatterND(acc, rows, y)                           # top-1: each row written once
//! ```
//!
//! `W1_e` [H, 2I] and `W2_e` [I, H] are each expert's own 2-D initializers: float, or a
//! `DequantizeLinear` of int4/int8 blocks along K (axis 0, the pattern ONNX Runtime fuses into
//! `MatMulNBits` and TensorRT into a weight-only INT4 GEMM) or of fp8 with per-output-channel scales
//! (axis 1). FLOPs are the routed FLOPs, each expert's weights are read once per call and no tensor holds
//! weights per token. `NonZero` takes a float mask because TensorRT 10.15's parser lists it for FP32/FP16
//! only; its data-dependent shapes rule out CUDA graphs.

use herd_ir::graph::Value;
use herd_ir::ops::ExpertLayout;
use herd_ir::weights::{Transform, WeightRef};
use herd_ir::Op;
use onnx_protobuf::tensor_proto::DataType;

use super::super::quantized::QLayout;
use super::Experts;
use crate::error::TargetError;
use crate::onnx::emit::Emitter;
use crate::onnx::proto::{node, Attr};

/// Expert `expert` of a stacked expert weight [E, ..] as a 2-D [K, N] matrix for `MatMul`, where K is
/// axis `k_axis` of the stacked weight.
pub(in crate::onnx) fn expert_matrix_ref(w: &WeightRef, k_axis: usize, expert: usize) -> WeightRef {
    let selected = w.clone().with(Transform::Select {
        axis: 0,
        index: expert,
    });
    if k_axis == 1 {
        selected
    } else {
        selected.with(Transform::Transpose { perm: vec![1, 0] })
    }
}

/// The K axis of the stacked expert weights in `layout` (fc1 and fc2 alike).
fn stacked_k_axis(layout: ExpertLayout) -> usize {
    match layout {
        ExpertLayout::Halves => 1,
        ExpertLayout::Interleaved => 2,
    }
}

impl Emitter<'_> {
    pub(super) fn grouped_experts(&mut self, ex: &Experts<'_>) -> Result<String, TargetError> {
        let name = ex.name;
        let t = self.options.dtype;
        let k = self.int_const(&[1]);
        let top = format!("{name}.top");
        let (values, indices) = (
            self.fresh(&format!("{top}.values")),
            self.fresh(&format!("{top}.indices")),
        );
        self.nodes.push(node(
            &top,
            "TopK",
            "",
            &[ex.logits, &k],
            &[&values, &indices],
            vec![
                ("axis", Attr::Int(1)),
                ("largest", Attr::Int(1)),
                ("sorted", Attr::Int(1)),
            ],
        ));
        let scaled = self.scaled_tokens(ex, &values);
        let flat = self.int_const(&[-1]);
        let expert = self.push(
            &format!("{name}.expert"),
            "Reshape",
            "",
            &[&indices, &flat],
            vec![],
        );
        let zero = self.float_scalar(0.0, t)?;
        let shape = self.push(
            &format!("{name}.rows_shape"),
            "Shape",
            "",
            &[&scaled],
            vec![],
        );
        let mut acc = self.push(
            &format!("{name}.routed_zeros"),
            "Expand",
            "",
            &[&zero, &shape],
            vec![],
        );
        let k_axis = stacked_k_axis(ex.attrs.layout);
        let width = 2 * ex.attrs.intermediate_size;
        for e in 0..ex.attrs.num_experts {
            let p = format!("{name}.expert{e}");
            let id = self.scalar_int(e as i64);
            let hit = self.push(&format!("{p}.hit"), "Equal", "", &[&expert, &id], vec![]);
            let mask = self.push(
                &format!("{p}.mask"),
                "Cast",
                "",
                &[&hit],
                vec![("to", Attr::Int(DataType::FLOAT as i64))],
            );
            let nonzero = self.push(&format!("{p}.nonzero"), "NonZero", "", &[&mask], vec![]);
            let rows = self.push(
                &format!("{p}.rows"),
                "Transpose",
                "",
                &[&nonzero],
                vec![("perm", Attr::Ints(vec![1, 0]))],
            );
            let xe = self.push(&format!("{p}.x"), "GatherND", "", &[&scaled, &rows], vec![]);
            let w1 = self.expert_matrix(ex.fc1, k_axis, e)?;
            let h = self.push(&format!("{p}.fc1"), "MatMul", "", &[&xe, &w1], vec![]);
            let act = match ex.attrs.layout {
                ExpertLayout::Halves => self.swiglu(&format!("{p}.act"), &h, width),
                ExpertLayout::Interleaved => {
                    self.swiglu_interleaved(&format!("{p}.act"), &h, width)
                }
            };
            let w2 = self.expert_matrix(ex.fc2, k_axis, e)?;
            let y = self.push(&format!("{p}.fc2"), "MatMul", "", &[&act, &w2], vec![]);
            acc = self.push(
                &format!("{p}.scatter"),
                "ScatterND",
                "",
                &[&acc, &rows, &y],
                vec![],
            );
        }
        Ok(acc)
    }

    /// Expert `expert` of stacked weight `weight` as a [K, N] `MatMul` operand (written once per graph).
    fn expert_matrix(
        &mut self,
        weight: Value,
        k_axis: usize,
        expert: usize,
    ) -> Result<String, TargetError> {
        let node = self
            .graph
            .node(weight.node)
            .ok_or_else(|| TargetError::bug("MoE lowering", "missing expert weight"))?;
        let Op::Weight(w) = &node.op else {
            return Err(TargetError::bug_at(
                "MoE lowering",
                &node.name,
                "expert matrices must be weights",
            ));
        };
        if let Some(spec) = w.effective_quant() {
            if spec.k_axis != k_axis {
                return Err(TargetError::bug_at(
                    "MoE lowering",
                    &node.name,
                    format!(
                        "quantized along axis {} but its K is axis {k_axis}",
                        spec.k_axis
                    ),
                ));
            }
            let q = self.quantized(weight.node, QLayout::ExpertMatMul { expert })?;
            let name = format!("{}.dequantized", q.values);
            return Ok(self.dequantize_node(&name, &q.values, &q.scales, q.axis, q.block_size));
        }
        let label = format!("{}.expert{expert}", node.name);
        let w = expert_matrix_ref(w, k_axis, expert);
        let before = self.data.offset();
        let out = self.float_weight(&label, &w)?;
        *self.weight_bytes.entry(weight.node).or_default() += self.data.offset() - before;
        Ok(out)
    }

    /// `silu(x[.., 0::2]) * x[.., 1::2]` over the last axis (gate and up columns interleaved).
    fn swiglu_interleaved(&mut self, name: &str, x: &str, n: usize) -> String {
        let (zero, one, end, axis, step) = (
            self.int_const(&[0]),
            self.int_const(&[1]),
            self.int_const(&[n as i64]),
            self.int_const(&[-1]),
            self.int_const(&[2]),
        );
        let gate = self.push(
            &format!("{name}.gate"),
            "Slice",
            "",
            &[x, &zero, &end, &axis, &step],
            vec![],
        );
        let up = self.push(
            &format!("{name}.up"),
            "Slice",
            "",
            &[x, &one, &end, &axis, &step],
            vec![],
        );
        let sig = self.push(&format!("{name}.sigmoid"), "Sigmoid", "", &[&gate], vec![]);
        let silu = self.push(&format!("{name}.silu"), "Mul", "", &[&gate, &sig], vec![]);
        self.push(name, "Mul", "", &[&silu, &up], vec![])
    }
}
