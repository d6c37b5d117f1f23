//! Lowerings of `FusedMoe`: the router and the shared expert in standard ops, the routed experts in one
//! of three forms ([`MoeLowering`](super::MoeLowering)):
//!
//! - `contrib` (`ort`, `cuda`): one `com.microsoft.MoE` / `QMoE` node over all experts.
//! - `grouped`: standard ONNX only; each expert multiplies just the rows routed to it.
//!
//! Every form computes `shared(x) + Expert_e*(sigmoid(l_e*) x)` for the top-1 expert `e*`: Llama 4 scales
//! the expert's input, not its output. The shared expert is emitted before the routed experts, so that
//! with the CUDA EP holding the MoE nodes, TensorRT receives attention, router and shared expert of a
//! layer as one subgraph.

mod contrib;
mod grouped;

pub(super) use grouped::expert_matrix_ref;

use herd_ir::graph::Value;
use herd_ir::ops::FusedMoeAttrs;
use herd_ir::quant::QuantScheme;
use herd_ir::Op;

use super::emit::Emitter;
use super::MoeLowering;
use crate::error::TargetError;

impl Emitter<'_> {
    /// Lowers one `FusedMoe` (inputs x, router, fc1, fc2, shared_fc1, shared_fc2) and returns its output.
    pub(super) fn fused_moe(
        &mut self,
        name: &str,
        m: &FusedMoeAttrs,
        inputs: &[Value],
    ) -> Result<String, TargetError> {
        if m.top_k != 1 {
            return Err(TargetError::Unsupported {
                target: "onnx",
                node: name.to_string(),
                op: "fused_moe",
                message: format!(
                    "top_k {} is not supported; Llama 4 models route each token to 1 expert",
                    m.top_k
                ),
            });
        }
        let lowering = self.options.moe;
        if m.layout != super::expert_layout(lowering) {
            return Err(TargetError::bug_at(
                "MoE lowering",
                name,
                format!(
                    "layout {:?} but --moe {} needs {:?}",
                    m.layout,
                    lowering.name(),
                    super::expert_layout(lowering)
                ),
            ));
        }
        let x = self.input(inputs[0], false)?;
        let hidden = self
            .graph
            .value_type(inputs[0])
            .and_then(|t| t.shape.last())
            .and_then(|d| d.fixed())
            .unwrap_or(0) as i64;
        let flat_shape = self.int_const(&[-1, hidden]);
        let tokens = self.push(
            &format!("{name}.tokens"),
            "Reshape",
            "",
            &[&x, &flat_shape],
            vec![],
        );
        let router = self.input(inputs[1], true)?;
        let logits = self.push(
            &format!("{name}.router_logits"),
            "MatMul",
            "",
            &[&tokens, &router],
            vec![],
        );
        let shared = self.shared_expert(name, m, &tokens, inputs[4], inputs[5])?;
        let experts = Experts {
            name,
            attrs: m,
            fc1: inputs[2],
            fc2: inputs[3],
            tokens: &tokens,
            logits: &logits,
        };
        let routed = match lowering {
            MoeLowering::Ort => self.contrib_experts(&experts, false)?,
            // QMoE's fp8 takes per-expert or square-block scales, not the per-channel scales of herd's fp8
            // and of Maverick's checkpoint: those experts go grouped, keeping their bytes.
            MoeLowering::Cuda if self.quant_scheme(experts.fc1) == Some(QuantScheme::Fp8) => {
                self.grouped_experts(&experts)?
            }
            MoeLowering::Cuda => self.contrib_experts(&experts, true)?,
            MoeLowering::Grouped => self.grouped_experts(&experts)?,
        };
        let sum = self.push(
            &format!("{name}.sum"),
            "Add",
            "",
            &[&routed, &shared],
            vec![],
        );
        let shape = self.push(&format!("{name}.input_shape"), "Shape", "", &[&x], vec![]);
        Ok(self.push(name, "Reshape", "", &[&sum, &shape], vec![]))
    }

    /// The shared expert over token rows [T, H]: `down(silu(gate x) * up x)` with fused [gate; up].
    fn shared_expert(
        &mut self,
        name: &str,
        m: &FusedMoeAttrs,
        tokens: &str,
        fc1: Value,
        fc2: Value,
    ) -> Result<String, TargetError> {
        let fc1 = self.input(fc1, true)?;
        let fc2 = self.input(fc2, true)?;
        let h = self.push(
            &format!("{name}.shared_fc1"),
            "MatMul",
            "",
            &[tokens, &fc1],
            vec![],
        );
        let act = self.swiglu(&format!("{name}.shared_act"), &h, 2 * m.intermediate_size);
        Ok(self.push(
            &format!("{name}.shared_fc2"),
            "MatMul",
            "",
            &[&act, &fc2],
            vec![],
        ))
    }

    /// The expert input: token rows times `sigmoid(selected logit)` ([T, 1]).
    fn scaled_tokens(&mut self, ex: &Experts<'_>, selected_logit: &str) -> String {
        let name = ex.name;
        let score = self.push(
            &format!("{name}.score"),
            "Sigmoid",
            "",
            &[selected_logit],
            vec![],
        );
        self.push(
            &format!("{name}.scaled_input"),
            "Mul",
            "",
            &[ex.tokens, &score],
            vec![],
        )
    }

    /// The quantization scheme a weight is stored with, if any.
    fn quant_scheme(&self, v: Value) -> Option<QuantScheme> {
        match &self.graph.node(v.node)?.op {
            Op::Weight(w) => Some(w.effective_quant()?.scheme),
            _ => None,
        }
    }
}

/// What every routed-expert lowering reads.
struct Experts<'a> {
    name: &'a str,
    attrs: &'a FusedMoeAttrs,
    fc1: Value,
    fc2: Value,
    /// Token rows [T, H].
    tokens: &'a str,
    /// Router logits [T, E].
    logits: &'a str,
}
