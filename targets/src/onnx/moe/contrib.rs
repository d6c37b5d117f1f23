//! The routed experts as one `com.microsoft.MoE` / `QMoE` node (ONNX Runtime's contrib ops), matched to
//! ONNX Runtime 1.31.1's operator schema (read from the wheel's registered schemas) and
//! `docs/contrib_ops/cuda/moe_qmoe.md`.
//!
//! Llama 4's sigmoid input scaling is reproduced by pre-multiplying the tokens by `sigmoid(max logit)`
//! and running the op with k = 1 and `normalize_routing_weights` = 1, so the selected expert's weight is
//! exactly 1 (the ops softmax the logits and weight expert OUTPUTS). SwiGLU is plain (alpha 1, beta 0, no
//! clamp) over interleaved gate/up rows (`swiglu_fusion` 1: the only form the CPU kernels take; the CUDA
//! kernels take it too).
//!
//! Integer experts (`QMoE`, `quant_type` "int") are stored raw: uint8 [E, N, K/2] (int4, low nibble
//! first) or [E, N, K] (int8) with the default zero point (8 or 128) and block scales [E, N, K/block].
//! For the CUDA EP (`cuda` = true) the node says `weights_prepacked` = 0: its `PrePack` then runs the
//! CUTLASS layout transform itself (SM80 layout, which the CUDA EP's QMoE runs on every GPU, Hopper
//! included); the CPU kernel reads the same raw tensors, so one bundle runs on both. That the CUDA EP
//! accepts these tensors rests on the documentation (no GPU here).

use super::super::quantized::QLayout;
use super::Experts;
use crate::error::TargetError;
use crate::onnx::emit::Emitter;
use crate::onnx::proto::Attr;
use herd_ir::quant::QuantScheme;

impl Emitter<'_> {
    /// `MoE` (float experts, or fp8 dequantized whole for the `ort` lowering) or `QMoE` (int4/int8).
    pub(super) fn contrib_experts(
        &mut self,
        ex: &Experts<'_>,
        cuda: bool,
    ) -> Result<String, TargetError> {
        let name = ex.name;
        let axes = self.int_const(&[1]);
        let top = self.push(
            &format!("{name}.top_logit"),
            "ReduceMax",
            "",
            &[ex.logits, &axes],
            vec![("keepdims", Attr::Int(1))],
        );
        let scaled = self.scaled_tokens(ex, &top);
        let mut attrs = vec![
            ("k", Attr::Int(1)),
            ("activation_type", Attr::Str("swiglu")),
            ("swiglu_fusion", Attr::Int(1)),
            ("normalize_routing_weights", Attr::Int(1)),
            ("activation_alpha", Attr::Float(1.0)),
            ("activation_beta", Attr::Float(0.0)),
            ("swiglu_limit", Attr::Float(f32::INFINITY)),
        ];
        let int = match self.quant_scheme(ex.fc1) {
            Some(QuantScheme::Int4 { block }) => Some((4, block)),
            Some(QuantScheme::Int8 { block }) => Some((8, block)),
            Some(QuantScheme::Fp8) | None => None,
        };
        let Some((bits, block)) = int else {
            let fc1 = self.input(ex.fc1, false)?;
            let fc2 = self.input(ex.fc2, false)?;
            return Ok(self.push(
                &format!("{name}.experts"),
                "MoE",
                "com.microsoft",
                &[&scaled, ex.logits, &fc1, "", &fc2],
                attrs,
            ));
        };
        // Integer experts: read packed, one expert per token, never dequantized outside the op.
        let fc1 = self.quantized(ex.fc1.node, QLayout::Experts)?;
        let fc2 = self.quantized(ex.fc2.node, QLayout::Experts)?;
        attrs.push(("expert_weight_bits", Attr::Int(bits)));
        attrs.push(("block_size", Attr::Int(block as i64)));
        if cuda {
            attrs.push(("quant_type", Attr::Str("int")));
            attrs.push(("weights_prepacked", Attr::Int(0)));
        }
        Ok(self.push(
            &format!("{name}.experts"),
            "QMoE",
            "com.microsoft",
            &[
                &scaled,
                ex.logits,
                &fc1.values,
                &fc1.scales,
                "",
                &fc2.values,
                &fc2.scales,
            ],
            attrs,
        ))
    }
}
