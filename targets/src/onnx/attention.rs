//! Attention's graph around the `Attention` op: per-token rotary angles, the in-place KV cache
//! (`TensorScatter` into fixed buffers) and the masks read from each row's own positions.

use herd_ir::graph::Value;
use herd_ir::ops::RotaryAnglesAttrs;
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
        ));
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
}
