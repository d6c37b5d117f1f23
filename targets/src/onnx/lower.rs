//! Lowering of the IR's tensor ops to ONNX nodes, one function per op: norms, projections,
//! activations, shape ops, row gathers and scatters, and activation quantization (attention's ops are
//! in `attention`, the MoE's in `moe`).

use herd_ir::graph::{Node, Value};
use herd_ir::ops::{InputAttrs, LayerNormAttrs, Op, RmsNormAttrs};
use herd_ir::{DType, Dim};

use super::emit::{reshape_spec, Emitter};
use super::proto::{float_tensor, onnx_dtype, value_info, Attr};
use crate::error::TargetError;

/// The fixed size of `v`'s last axis.
fn last_fixed(graph: &herd_ir::Graph, v: Value) -> Option<usize> {
    graph.value_type(v)?.shape.last()?.fixed()
}

impl Emitter<'_> {
    /// A graph input in the compute dtype (float inputs) or its own.
    pub(super) fn lower_input(&mut self, a: &InputAttrs) -> Result<String, TargetError> {
        let t = self.options.dtype;
        let dtype = if a.ty.dtype.is_float() { t } else { a.ty.dtype };
        self.inputs.push(value_info(&a.name, dtype, &a.ty.shape.0));
        self.used.insert(a.name.clone());
        Ok(a.name.clone())
    }

    /// `Gather` of the table rows.
    pub(super) fn lower_embedding(
        &mut self,
        node: &Node,
        inputs: &[Value],
    ) -> Result<String, TargetError> {
        let name = node.name.as_str();
        let ids = self.input(inputs[0], false)?;
        let int_quantized = match self.graph.node(inputs[1].node).map(|n| &n.op) {
            Some(Op::Weight(w)) if !w.prequantized() => match w.effective_quant().map(|q| q.scheme)
            {
                Some(herd_ir::quant::QuantScheme::Int4 { .. }) => Some(4),
                Some(herd_ir::quant::QuantScheme::Int8 { .. }) => Some(8),
                Some(herd_ir::quant::QuantScheme::Fp8) | None => None,
            },
            _ => None,
        };
        if let Some(bits) = int_quantized {
            // One quantized row per token, dequantized by the gather: never the whole table.
            let q = self.quantized(inputs[1].node, super::quantized::QLayout::Gather)?;
            let block = q.block_size.ok_or_else(|| {
                TargetError::bug_at("ONNX emission", name, "an int table without blocks")
            })?;
            return Ok(self.push(
                name,
                "GatherBlockQuantized",
                "com.microsoft",
                &[&q.values, &ids, &q.scales],
                vec![
                    ("gather_axis", Attr::Int(0)),
                    ("quantize_axis", Attr::Int(1)),
                    ("block_size", Attr::Int(block)),
                    ("bits", Attr::Int(bits as i64)),
                ],
            ));
        }
        let table = self.input(inputs[1], false)?;
        Ok(self.push(
            name,
            "Gather",
            "",
            &[&table, &ids],
            vec![("axis", Attr::Int(0))],
        ))
    }

    /// `RMSNormalization` (a unit scale when the node has no weight).
    pub(super) fn lower_rms_norm(
        &mut self,
        node: &Node,
        inputs: &[Value],
        a: &RmsNormAttrs,
    ) -> Result<String, TargetError> {
        let graph = self.graph;
        let name = node.name.as_str();
        let t = self.options.dtype;
        let x = self.input(inputs[0], false)?;
        let scale = match inputs.get(1) {
            Some(w) => self.input(*w, false)?,
            None => {
                let d = last_fixed(graph, inputs[0]).unwrap_or(1);
                let scale_name = format!("const.ones[{d}]");
                if self.used.insert(scale_name.clone()) {
                    self.initializers.push(float_tensor(
                        &scale_name,
                        &[d as i64],
                        &vec![1.0; d],
                        t,
                    )?);
                }
                scale_name
            }
        };
        Ok(self.push(
            name,
            "RMSNormalization",
            "",
            &[&x, &scale],
            vec![
                ("axis", Attr::Int(-1)),
                ("epsilon", Attr::Float(a.eps)),
                ("stash_type", Attr::Int(1)),
            ],
        ))
    }

    /// `MatMul` with the weight stored transposed [K, N], plus the bias.
    pub(super) fn lower_linear(
        &mut self,
        node: &Node,
        inputs: &[Value],
    ) -> Result<String, TargetError> {
        let name = node.name.as_str();
        let x = self.input(inputs[0], false)?;
        let w = self.input(inputs[1], true)?;
        Ok(match inputs.get(2) {
            Some(bias) => {
                let bias = self.input(*bias, false)?;
                let y = self.push(&format!("{name}.matmul"), "MatMul", "", &[&x, &w], vec![]);
                self.push(name, "Add", "", &[&y, &bias], vec![])
            }
            None => self.push(name, "MatMul", "", &[&x, &w], vec![]),
        })
    }

    /// `LayerNormalization`.
    pub(super) fn lower_layer_norm(
        &mut self,
        node: &Node,
        inputs: &[Value],
        a: &LayerNormAttrs,
    ) -> Result<String, TargetError> {
        let name = node.name.as_str();
        let x = self.input(inputs[0], false)?;
        let w = self.input(inputs[1], false)?;
        let b = self.input(inputs[2], false)?;
        Ok(self.push(
            name,
            "LayerNormalization",
            "",
            &[&x, &w, &b],
            vec![
                ("axis", Attr::Int(-1)),
                ("epsilon", Attr::Float(a.eps)),
                ("stash_type", Attr::Int(1)),
            ],
        ))
    }

    /// Exact GELU in primitives.
    pub(super) fn lower_gelu(
        &mut self,
        node: &Node,
        inputs: &[Value],
    ) -> Result<String, TargetError> {
        let name = node.name.as_str();
        let t = self.options.dtype;
        // x * (1 + erf(x / sqrt 2)) / 2 in primitives: every parser takes Erf, and ONNX Runtime
        // and TensorRT fuse the pattern into their GELU kernels.
        let x = self.input(inputs[0], false)?;
        let sqrt2 = self.float_scalar(std::f32::consts::SQRT_2, t)?;
        let one = self.float_scalar(1.0, t)?;
        let half = self.float_scalar(0.5, t)?;
        let scaled = self.push(&format!("{name}.div"), "Div", "", &[&x, &sqrt2], vec![]);
        let erf = self.push(&format!("{name}.erf"), "Erf", "", &[&scaled], vec![]);
        let plus = self.push(&format!("{name}.add"), "Add", "", &[&erf, &one], vec![]);
        let times = self.push(&format!("{name}.mul"), "Mul", "", &[&x, &plus], vec![]);
        Ok(self.push(name, "Mul", "", &[&times, &half], vec![]))
    }

    /// A learned token appended to every row.
    pub(super) fn lower_append_token(
        &mut self,
        node: &Node,
        inputs: &[Value],
    ) -> Result<String, TargetError> {
        let graph = self.graph;
        let name = node.name.as_str();
        let x = self.input(inputs[0], false)?;
        let token = self.input(inputs[1], false)?;
        let h = last_fixed(graph, inputs[1])
            .ok_or_else(|| self.unsupported(name, &node.op, "token size must be fixed"))?;
        let axes = self.int_const(&[0, 1]);
        let token = self.push(
            &format!("{name}.token"),
            "Unsqueeze",
            "",
            &[&token, &axes],
            vec![],
        );
        let rows = self.expand_over_batch(&format!("{name}.rows"), &token, &x, &[1, h]);
        Ok(self.push(
            name,
            "Concat",
            "",
            &[&x, &rows],
            vec![("axis", Attr::Int(1))],
        ))
    }

    /// Rows of the flattened [B * S, H] input replaced at the given positions (image features).
    pub(super) fn lower_scatter_rows(
        &mut self,
        node: &Node,
        inputs: &[Value],
    ) -> Result<String, TargetError> {
        let graph = self.graph;
        let name = node.name.as_str();
        let x = self.input(inputs[0], false)?;
        let positions = self.input(inputs[1], false)?;
        let rows = self.input(inputs[2], false)?;
        let h = last_fixed(graph, inputs[0])
            .ok_or_else(|| self.unsupported(name, &node.op, "hidden size must be fixed"))?;
        let flat_shape = self.int_const(&[-1, h as i64]);
        let flat = self.push(
            &format!("{name}.flat"),
            "Reshape",
            "",
            &[&x, &flat_shape],
            vec![],
        );
        let axes = self.int_const(&[1]);
        let index = self.push(
            &format!("{name}.index"),
            "Unsqueeze",
            "",
            &[&positions, &axes],
            vec![],
        );
        let scattered = self.push(
            &format!("{name}.scatter"),
            "ScatterND",
            "",
            &[&flat, &index, &rows],
            vec![],
        );
        let shape = self.push(&format!("{name}.shape"), "Shape", "", &[&x], vec![]);
        Ok(self.push(name, "Reshape", "", &[&scattered, &shape], vec![]))
    }

    /// The rows each batch row picks (`GatherND`, batch_dims 1).
    pub(super) fn lower_pick_rows(
        &mut self,
        node: &Node,
        inputs: &[Value],
    ) -> Result<String, TargetError> {
        let name = node.name.as_str();
        let x = self.input(inputs[0], false)?;
        let index = self.input(inputs[1], false)?;
        let axis = self.int_const(&[-1]);
        let index = self.push(
            &format!("{name}.index"),
            "Unsqueeze",
            "",
            &[&index, &axis],
            vec![],
        );
        Ok(self.push(
            name,
            "GatherND",
            "",
            &[&x, &index],
            vec![("batch_dims", Attr::Int(1))],
        ))
    }

    /// `Add`, `Mul` and `Sigmoid`.
    pub(super) fn lower_elementwise(
        &mut self,
        node: &Node,
        inputs: &[Value],
    ) -> Result<String, TargetError> {
        let name = node.name.as_str();
        let op_type = match node.op {
            Op::Add => "Add",
            Op::Mul => "Mul",
            Op::Sigmoid => "Sigmoid",
            ref other => {
                return Err(TargetError::bug(
                    "ONNX emission",
                    format!("{name}: {} is not an elementwise op", other.name()),
                ))
            }
        };
        let args: Vec<String> = inputs
            .iter()
            .map(|v| self.input(*v, false))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok(self.push(name, op_type, "", &refs, vec![]))
    }

    /// `x * sigmoid(x)`.
    pub(super) fn lower_silu(
        &mut self,
        node: &Node,
        inputs: &[Value],
    ) -> Result<String, TargetError> {
        let name = node.name.as_str();
        let x = self.input(inputs[0], false)?;
        let s = self.push(&format!("{name}.sigmoid"), "Sigmoid", "", &[&x], vec![]);
        Ok(self.push(name, "Mul", "", &[&x, &s], vec![]))
    }

    /// A cast; float targets become the compute dtype.
    pub(super) fn lower_cast(
        &mut self,
        node: &Node,
        inputs: &[Value],
        to: DType,
    ) -> Result<String, TargetError> {
        let name = node.name.as_str();
        let t = self.options.dtype;
        let x = self.input(inputs[0], false)?;
        let to = if to.is_float() { t } else { to };
        Ok(self.push(
            name,
            "Cast",
            "",
            &[&x],
            vec![("to", Attr::Int(onnx_dtype(to) as i64))],
        ))
    }

    /// A reshape with at most one inferred dimension.
    pub(super) fn lower_reshape(
        &mut self,
        node: &Node,
        inputs: &[Value],
        shape: &[Dim],
    ) -> Result<String, TargetError> {
        let graph = self.graph;
        let name = node.name.as_str();
        let x = self.input(inputs[0], false)?;
        let from = graph
            .value_type(inputs[0])
            .map(|ty| ty.shape.0.clone())
            .unwrap_or_default();
        let spec = reshape_spec(&from, shape).ok_or_else(|| {
            self.unsupported(
                name,
                &node.op,
                "reshape needs at most one inferred dimension",
            )
        })?;
        let spec = self.int_const(&spec);
        Ok(self.push(name, "Reshape", "", &[&x, &spec], vec![]))
    }

    /// `Transpose`.
    pub(super) fn lower_transpose(
        &mut self,
        node: &Node,
        inputs: &[Value],
        perm: &[usize],
    ) -> Result<String, TargetError> {
        let name = node.name.as_str();
        let x = self.input(inputs[0], false)?;
        Ok(self.push(
            name,
            "Transpose",
            "",
            &[&x],
            vec![("perm", Attr::Ints(perm.iter().map(|&p| p as i64).collect()))],
        ))
    }

    /// `Slice` of one axis.
    pub(super) fn lower_slice(
        &mut self,
        node: &Node,
        inputs: &[Value],
        axis: usize,
        start: usize,
        end: usize,
    ) -> Result<String, TargetError> {
        let name = node.name.as_str();
        let x = self.input(inputs[0], false)?;
        let (s, e, a) = (
            self.int_const(&[start as i64]),
            self.int_const(&[end as i64]),
            self.int_const(&[axis as i64]),
        );
        Ok(self.push(name, "Slice", "", &[&x, &s, &e, &a], vec![]))
    }

    /// `Concat` of two tensors.
    pub(super) fn lower_concat(
        &mut self,
        node: &Node,
        inputs: &[Value],
        axis: usize,
    ) -> Result<String, TargetError> {
        let name = node.name.as_str();
        let (a, b) = (self.input(inputs[0], false)?, self.input(inputs[1], false)?);
        Ok(self.push(
            name,
            "Concat",
            "",
            &[&a, &b],
            vec![("axis", Attr::Int(axis as i64))],
        ))
    }

    /// `silu(gate) * up` of the two halves.
    pub(super) fn lower_swiglu(
        &mut self,
        node: &Node,
        inputs: &[Value],
    ) -> Result<String, TargetError> {
        let graph = self.graph;
        let name = node.name.as_str();
        let x = self.input(inputs[0], false)?;
        let n = last_fixed(graph, inputs[0]).unwrap_or(0);
        Ok(self.swiglu(name, &x, n))
    }

    /// Per-tensor fp8 Q/DQ of an activation.
    pub(super) fn lower_quantize_activation(
        &mut self,
        node: &Node,
        inputs: &[Value],
        scale: f32,
    ) -> Result<String, TargetError> {
        let name = node.name.as_str();
        let t = self.options.dtype;
        // Per-tensor, symmetric: a scalar scale and an fp8 zero point of 0 (which sets the type).
        let x = self.input(inputs[0], false)?;
        let s = self.float_scalar(scale, t)?;
        let zp_name = "const.f8e4m3.zero".to_string();
        if self.used.insert(zp_name.clone()) {
            let mut zp = float_tensor(&zp_name, &[], &[], DType::F32)?;
            zp.data_type = onnx_dtype(DType::F8E4M3) as i32;
            zp.raw_data = vec![0];
            self.initializers.push(zp);
        }
        let q = self.push(
            &format!("{name}.q"),
            "QuantizeLinear",
            "",
            &[&x, &s, &zp_name],
            vec![],
        );
        Ok(self.push(name, "DequantizeLinear", "", &[&q, &s, &zp_name], vec![]))
    }
}
