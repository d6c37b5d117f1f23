//! Attention's graph around the `Attention` op: per-token rotary angles and `RotaryEmbedding`, the
//! NoPE query temperature, the in-place KV cache (`TensorScatter` into fixed buffers), the masks read
//! from each row's own positions, and the `Attention` node itself.

use herd_ir::graph::{Node, Value};
use herd_ir::ops::{RotaryAnglesAttrs, TemperatureAttrs};
use herd_ir::DType;

use super::emit::Emitter;
use super::proto::{float_tensor, node, onnx_dtype, Attr};
use crate::error::TargetError;

impl Emitter<'_> {
    /// f32 [B, S, d/2]: cos (or sin) of `position * inv_freq`, from i64 positions [B, S].
    pub(super) fn rotary_angles(
        &mut self,
        name: &str,
        positions: Value,
        a: &RotaryAnglesAttrs,
    ) -> Result<String, TargetError> {
        let pos = self.input(positions, false)?;
        let p = self.push(
            &format!("{name}.positions"),
            "Cast",
            "",
            &[&pos],
            vec![("to", Attr::Int(onnx_dtype(DType::F32) as i64))],
        );
        let axis = self.int_const(&[2]);
        let p = self.push(
            &format!("{name}.bs1"),
            "Unsqueeze",
            "",
            &[&p, &axis],
            vec![],
        );
        let freq = self.fresh(&format!("{name}.inv_freq"));
        self.initializers.push(float_tensor(
            &freq,
            &[a.inv_freq.len() as i64],
            &a.inv_freq,
            DType::F32,
        )?);
        let angle = self.push(&format!("{name}.angle"), "Mul", "", &[&p, &freq], vec![]);
        let op = if a.sin { "Sin" } else { "Cos" };
        let t = self.options.dtype;
        if t == DType::F32 {
            return Ok(self.push(name, op, "", &[&angle], vec![]));
        }
        // Computed in f32 and rounded to the compute dtype, as transformers does.
        let value = self.push(&format!("{name}.f32"), op, "", &[&angle], vec![]);
        Ok(self.push(
            name,
            "Cast",
            "",
            &[&value],
            vec![("to", Attr::Int(onnx_dtype(t) as i64))],
        ))
    }

    /// Per-token cos/sin [B, S, d/2] as RotaryEmbedding's table form (which TensorRT's parser takes):
    /// tables [B * S, d/2] and int64 position ids [B, S] = each token's row, `b * S + s`. Returns
    /// (cos table, sin table, position ids); q and k of every layer share them.
    pub(super) fn per_token_rotary_tables(
        &mut self,
        cos: &str,
        sin: &str,
        half: usize,
    ) -> Result<Vec<String>, TargetError> {
        let key = format!("{cos}.table");
        if self.used.contains(&key) {
            return Ok(vec![key, format!("{sin}.table"), format!("{cos}.rows")]);
        }
        let rows = self.int_const(&[-1, half as i64]);
        let (cos_table, sin_table) = (
            self.push(&key, "Reshape", "", &[cos, &rows], vec![]),
            self.push(
                &format!("{sin}.table"),
                "Reshape",
                "",
                &[sin, &rows],
                vec![],
            ),
        );
        let bs = self.push(
            &format!("{cos}.bs"),
            "Shape",
            "",
            &[cos],
            vec![("start", Attr::Int(0)), ("end", Attr::Int(2))],
        );
        let b = self.push(
            &format!("{cos}.b"),
            "Shape",
            "",
            &[cos],
            vec![("start", Attr::Int(0)), ("end", Attr::Int(1))],
        );
        let s = self.push(
            &format!("{cos}.s"),
            "Shape",
            "",
            &[cos],
            vec![("start", Attr::Int(1)), ("end", Attr::Int(2))],
        );
        let count = self.push(&format!("{cos}.tokens"), "Mul", "", &[&b, &s], vec![]);
        let axis0 = self.int_const(&[0]);
        let count = self.push(
            &format!("{cos}.tokens_scalar"),
            "Squeeze",
            "",
            &[&count, &axis0],
            vec![],
        );
        let (zero, one) = (self.scalar_int(0), self.scalar_int(1));
        let flat = self.push(
            &format!("{cos}.token_index"),
            "Range",
            "",
            &[&zero, &count, &one],
            vec![],
        );
        let index = self.push(&format!("{cos}.rows"), "Reshape", "", &[&flat, &bs], vec![]);
        Ok(vec![cos_table, sin_table, index])
    }

    /// `TensorScatter` of `update` into the cache `past` at each row's first position (circular for a
    /// ring), on axis -2 (the form TensorRT's parser takes).
    pub(super) fn cache_write(
        &mut self,
        name: &str,
        [past, update, positions]: [Value; 3],
        ring: bool,
        output: Option<String>,
    ) -> Result<String, TargetError> {
        let past = self.input(past, false)?;
        let update = self.input(update, false)?;
        let first = self.first_positions(positions)?;
        let mode = if ring { "circular" } else { "linear" };
        let out = match output {
            Some(o) if self.used.insert(o.clone()) => o,
            _ => self.fresh(name),
        };
        self.nodes.push(node(
            name,
            "TensorScatter",
            "",
            &[&past, &update, &first],
            &[&out],
            vec![("axis", Attr::Int(-2)), ("mode", Attr::Str(mode))],
        ));
        Ok(out)
    }

    /// i64 [B]: each row's first position of this call, which is its cache length.
    fn first_positions(&mut self, positions: Value) -> Result<String, TargetError> {
        let pos = self.input(positions, false)?;
        let key = format!("{pos}.first");
        if self.used.contains(&key) {
            return Ok(key);
        }
        let (zero, one) = (self.int_const(&[0]), self.int_const(&[1]));
        let column = self.push(
            &format!("{pos}.first_column"),
            "Slice",
            "",
            &[&pos, &zero, &one, &one],
            vec![],
        );
        let flat = self.int_const(&[-1]);
        Ok(self.push(&key, "Reshape", "", &[&column, &flat], vec![]))
    }

    /// The first `min(T, max(positions) + 1)` entries of a [B, kv, T, d] cache.
    pub(super) fn cache_view(
        &mut self,
        name: &str,
        cache: Value,
        positions: Value,
    ) -> Result<String, TargetError> {
        let cache = self.input(cache, false)?;
        let end = self.attended_length(positions)?;
        let length = self.push(
            &format!("{name}.cache_length"),
            "Shape",
            "",
            &[&cache],
            vec![("start", Attr::Int(2)), ("end", Attr::Int(3))],
        );
        let end = self.push(&format!("{name}.end"), "Min", "", &[&end, &length], vec![]);
        let (zero, axis) = (self.int_const(&[0]), self.int_const(&[2]));
        Ok(self.push(name, "Slice", "", &[&cache, &zero, &end, &axis], vec![]))
    }

    /// i64 [1]: the largest position of the call plus one, shared by every view.
    fn attended_length(&mut self, positions: Value) -> Result<String, TargetError> {
        let pos = self.input(positions, false)?;
        let key = format!("{pos}.attended");
        if self.used.contains(&key) {
            return Ok(key);
        }
        let last = self.push(
            &format!("{pos}.max"),
            "ReduceMax",
            "",
            &[&pos],
            vec![("keepdims", Attr::Int(0))],
        );
        let one = self.scalar_int(1);
        let end = self.push(
            &format!("{pos}.max_plus_1"),
            "Add",
            "",
            &[&last, &one],
            vec![],
        );
        let shape = self.int_const(&[1]);
        Ok(self.push(&key, "Reshape", "", &[&end, &shape], vec![]))
    }

    /// bool [B, 1, S, L] over the L entries of a cache view: entry j is visible to the query at position p
    /// iff `j <= p` (full layers) or `j <= p mod chunk` (a chunk's ring).
    pub(super) fn attention_mask(
        &mut self,
        name: &str,
        positions: Value,
        keys: Value,
        chunk: Option<usize>,
    ) -> Result<String, TargetError> {
        let pos = self.input(positions, false)?;
        let keys = self.input(keys, false)?;
        let length = self.push(
            &format!("{name}.keys"),
            "Shape",
            "",
            &[&keys],
            vec![("start", Attr::Int(2)), ("end", Attr::Int(3))],
        );
        let axis0 = self.int_const(&[0]);
        let length = self.push(
            &format!("{name}.keys_scalar"),
            "Squeeze",
            "",
            &[&length, &axis0],
            vec![],
        );
        let (zero, one) = (self.scalar_int(0), self.scalar_int(1));
        let index = self.push(
            &format!("{name}.entry"),
            "Range",
            "",
            &[&zero, &length, &one],
            vec![],
        );
        let last = match chunk {
            Some(size) => {
                let c = self.scalar_int(size as i64);
                self.push(&format!("{name}.in_chunk"), "Mod", "", &[&pos, &c], vec![])
            }
            None => pos,
        };
        let axis2 = self.int_const(&[2]);
        let q = self.push(
            &format!("{name}.q_bs1"),
            "Unsqueeze",
            "",
            &[&last, &axis2],
            vec![],
        );
        let mask = self.push(
            &format!("{name}.visible"),
            "LessOrEqual",
            "",
            &[&index, &q],
            vec![],
        );
        let axis1 = self.int_const(&[1]);
        Ok(self.push(name, "Unsqueeze", "", &[&mask, &axis1], vec![]))
    }

    /// `RotaryEmbedding` (interleaved) from per-token tables, or tables with implicit positions.
    pub(super) fn lower_rotary(
        &mut self,
        node: &Node,
        inputs: &[Value],
    ) -> Result<String, TargetError> {
        let graph = self.graph;
        let name = node.name.as_str();
        let mut args: Vec<String> = inputs
            .iter()
            .map(|v| self.input(*v, false))
            .collect::<Result<_, _>>()?;
        let per_token = graph
            .value_type(inputs[1])
            .filter(|ty| ty.shape.rank() == 3)
            .and_then(|ty| ty.shape.last().and_then(|d| d.fixed()));
        if let Some(half) = per_token {
            args = self.per_token_rotary_tables(&args[1], &args[2], half)?;
            args.insert(0, self.input(inputs[0], false)?);
        } else if args.len() == 3 {
            // Positions 0..S for every batch row (S is fixed: the tables have S rows).
            let s = graph
                .value_type(inputs[0])
                .and_then(|ty| ty.shape.0.get(2).copied())
                .and_then(|d| d.fixed())
                .ok_or_else(|| {
                    self.unsupported(name, &node.op, "implicit positions need a fixed length")
                })?;
            args.push(self.implicit_positions(name, &args[0].clone(), s));
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok(self.push(
            name,
            "RotaryEmbedding",
            "",
            &refs,
            vec![("interleaved", Attr::Int(1))],
        ))
    }

    /// NoPE layers' query scaling by position, computed in f32.
    pub(super) fn lower_query_temperature(
        &mut self,
        node: &Node,
        inputs: &[Value],
        temp: &TemperatureAttrs,
    ) -> Result<String, TargetError> {
        let name = node.name.as_str();
        let t = self.options.dtype;
        let q = self.input(inputs[0], false)?;
        let pos = self.input(inputs[1], false)?;
        // Computed in f32 whatever the compute dtype: f16 cannot count positions past 2048.
        let p = self.push(
            &format!("{name}.positions"),
            "Cast",
            "",
            &[&pos],
            vec![("to", Attr::Int(onnx_dtype(DType::F32) as i64))],
        );
        let one = self.float_scalar(1.0, DType::F32)?;
        let floor_scale = self.float_scalar(temp.floor_scale, DType::F32)?;
        let attn_scale = self.float_scalar(temp.attn_scale, DType::F32)?;
        let p1 = self.push(&format!("{name}.p_plus_1"), "Add", "", &[&p, &one], vec![]);
        let div = self.push(
            &format!("{name}.div"),
            "Div",
            "",
            &[&p1, &floor_scale],
            vec![],
        );
        let floor = self.push(&format!("{name}.floor"), "Floor", "", &[&div], vec![]);
        let plus = self.push(
            &format!("{name}.floor_plus_1"),
            "Add",
            "",
            &[&floor, &one],
            vec![],
        );
        let log = self.push(&format!("{name}.log1p"), "Log", "", &[&plus], vec![]);
        let scaled = self.push(
            &format!("{name}.scaled"),
            "Mul",
            "",
            &[&log, &attn_scale],
            vec![],
        );
        let mut factor = self.push(
            &format!("{name}.factor"),
            "Add",
            "",
            &[&scaled, &one],
            vec![],
        );
        if t != DType::F32 {
            factor = self.push(
                &format!("{name}.factor_cast"),
                "Cast",
                "",
                &[&factor],
                vec![("to", Attr::Int(onnx_dtype(t) as i64))],
            );
        }
        let axes = self.int_const(&[1, 3]);
        let bcast = self.push(
            &format!("{name}.factor_b1s1"),
            "Unsqueeze",
            "",
            &[&factor, &axes],
            vec![],
        );
        Ok(self.push(name, "Mul", "", &[&q, &bcast], vec![]))
    }

    /// `Attention` with the explicit mask.
    pub(super) fn lower_sdpa(
        &mut self,
        node: &Node,
        inputs: &[Value],
        scale: f32,
    ) -> Result<String, TargetError> {
        let name = node.name.as_str();
        let args: Vec<String> = inputs
            .iter()
            .map(|v| self.input(*v, false))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok(self.push(
            name,
            "Attention",
            "",
            &refs,
            vec![("scale", Attr::Float(scale)), ("is_causal", Attr::Int(0))],
        ))
    }
}
