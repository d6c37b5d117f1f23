//! Streaming a weight in blocks of output rows, so that no consumer ever holds more than one block of a
//! tensor: the row range of each block is traced back through the weight's lazy transforms to a range of
//! one axis of the stored tensors, and only that region of the mmapped shards is decoded.
//!
//! Transposes move the traced axis, slices on it shift the range, selects renumber axes, reshapes that
//! keep the leading dimension keep it and reshapes that split it (stacked per-expert parts [E*R, K] ->
//! [E, R, K]) scale it. A chain the trace cannot follow (a reshape that regroups the traced axis
//! otherwise) is read whole, in one block.
//!
//! One expert of a stacked weight (a chain ending in `Select` of axis 0, maybe then a 2-D transpose) is
//! read as the traced row `e` of the stacked weight: only that expert's region of the shards, once.

use std::ops::Range;

use ndarray::{ArrayD, Axis, IxDyn};

use crate::error::WeightError;
use rayon::prelude::*;

use crate::weights::{
    decode_f32, decode_into, Shard, Transform, WeightPart, WeightRef, WeightStore,
};

/// How a block of output rows maps back to the concatenation of the stored parts.
struct Trace {
    /// Axis of the concatenated parts that output axis 0 comes from.
    axis: usize,
    /// Per transform: how a range of the traced axis in its output maps to its input.
    rows: Vec<RowMap>,
    /// Per transform: the traced axis in the transform's input.
    axes: Vec<usize>,
}

/// What one transform does to a range of the traced axis, read from output to input.
#[derive(Clone, Copy)]
enum RowMap {
    Keep,
    /// A slice on the traced axis: input index = output index + start.
    Shift(usize),
    /// A reshape splitting the leading axis: output row r is input rows r*k..(r+1)*k.
    Scale(usize),
}

fn trace(w: &WeightRef) -> Option<Trace> {
    let mut shapes = vec![concat_shape(w)?];
    for t in &w.transforms {
        let mut tmp = WeightRef {
            transforms: vec![t.clone()],
            quant: None,
            ..w.clone()
        };
        tmp.parts.truncate(1);
        tmp.parts[0].stored_shape = shapes.last()?.clone();
        tmp.concat_axis = 0;
        shapes.push(tmp.shape().ok()?);
    }
    let mut axis = 0;
    let mut rows = vec![RowMap::Keep; w.transforms.len()];
    let mut axes = vec![0; w.transforms.len()];
    for (i, t) in w.transforms.iter().enumerate().rev() {
        match t {
            Transform::Transpose { perm } => axis = perm[axis],
            Transform::Slice { axis: a, start, .. } if *a == axis => {
                rows[i] = RowMap::Shift(*start)
            }
            Transform::Slice { .. } => {}
            Transform::Select { axis: a, .. } => {
                if axis >= *a {
                    axis += 1;
                }
            }
            Transform::Reshape { .. } => {
                let (input, output) = (&shapes[i], &shapes[i + 1]);
                if axis != 0 || input.is_empty() || output.is_empty() {
                    return None;
                }
                if input[0] != output[0] {
                    let (out_row, in_row) = (
                        output[1..].iter().product::<usize>(),
                        input[1..].iter().product::<usize>(),
                    );
                    if in_row == 0 || out_row % in_row != 0 {
                        return None;
                    }
                    rows[i] = RowMap::Scale(out_row / in_row);
                }
            }
        }
        axes[i] = axis;
    }
    Some(Trace { axis, rows, axes })
}

fn concat_shape(w: &WeightRef) -> Option<Vec<usize>> {
    let mut shape = w.parts.first()?.stored_shape.clone();
    for p in &w.parts[1..] {
        shape[w.concat_axis] += p.stored_shape[w.concat_axis];
    }
    Some(shape)
}

impl WeightStore {
    /// Calls `sink(rows, block)` for consecutive blocks of the weight's output rows (axis 0), each block
    /// holding at most `max_block_elements` values (at least `row_multiple` rows) and a multiple of
    /// `row_multiple` rows (quantization blocks along axis 0 stay whole), in row-major order.
    pub fn stream_rows<E: From<WeightError>>(
        &self,
        w: &WeightRef,
        max_block_elements: usize,
        row_multiple: usize,
        mut sink: impl FnMut(Range<usize>, &ArrayD<f32>) -> Result<(), E>,
    ) -> Result<(), E> {
        let shape = w.shape().map_err(|problem| bad(&w.label(), problem))?;
        if let Some(matrix) = self.expert_matrix(w)? {
            return stream_in_memory(&matrix, max_block_elements, row_multiple, sink);
        }
        let Some(trace) = trace(w).filter(|_| !shape.is_empty()) else {
            let whole = self.load_f32(w)?;
            return sink(0..shape.first().copied().unwrap_or(1), &whole);
        };
        let row: usize = shape[1..].iter().product();
        let multiple = row_multiple.max(1);
        let step = ((max_block_elements / row.max(1)) / multiple).max(1) * multiple;
        let mut start = 0;
        while start < shape[0] {
            let rows = start..(start + step).min(shape[0]);
            let block = self.block(w, &trace, rows.clone())?;
            sink(rows.clone(), &block)?;
            start = rows.end;
        }
        for part in &w.parts {
            if let Some(shard) = self.shards().get(part.source.shard.0 as usize) {
                shard.release(&part.source.tensor, 0..usize::MAX);
            }
        }
        Ok(())
    }

    /// One expert of a stacked weight, read alone: for a float chain `prefix + [Select axis 0]` (maybe
    /// then a 2-D transpose) whose prefix traces, row `e` of the prefix. None for any other chain.
    fn expert_matrix(&self, w: &WeightRef) -> Result<Option<ArrayD<f32>>, WeightError> {
        let n = w.transforms.len();
        let (select_at, transposed) = match w.transforms.as_slice() {
            [.., Transform::Select { axis: 0, .. }] => (n - 1, false),
            [.., Transform::Select { axis: 0, .. }, Transform::Transpose { perm }]
                if perm == &[1, 0] =>
            {
                (n - 2, true)
            }
            _ => return Ok(None),
        };
        let Transform::Select { index, .. } = w.transforms[select_at] else {
            return Ok(None);
        };
        if w.quant.is_some() {
            return Ok(None);
        }
        let prefix = WeightRef {
            transforms: w.transforms[..select_at].to_vec(),
            ..w.clone()
        };
        let Some(trace) = trace(&prefix) else {
            return Ok(None);
        };
        let stacked = self.block(&prefix, &trace, index..index + 1)?;
        let one = stacked.index_axis(Axis(0), 0);
        let one = if transposed { one.reversed_axes() } else { one };
        Ok(Some(crate::layout::row_major(one.view())))
    }

    fn block(
        &self,
        w: &WeightRef,
        trace: &Trace,
        rows: Range<usize>,
    ) -> Result<ArrayD<f32>, WeightError> {
        if let Some(block) = self.transposed_block(w, &rows)? {
            return Ok(block);
        }
        let (mut lo, mut hi) = (rows.start, rows.end);
        for map in trace.rows.iter().rev() {
            (lo, hi) = match *map {
                RowMap::Keep => (lo, hi),
                RowMap::Shift(s) => (lo + s, hi + s),
                RowMap::Scale(k) => (lo * k, hi * k),
            };
        }
        let a = trace.axis;
        let mut pieces = Vec::new();
        let mut part_start = 0;
        for part in &w.parts {
            let size = part.stored_shape[w.concat_axis];
            if a == w.concat_axis {
                // Only the parts that overlap the range, each restricted to its share.
                let (from, to) = (lo.max(part_start), hi.min(part_start + size));
                if from < to {
                    pieces.push(self.load_region(part, a, from - part_start..to - part_start)?);
                }
            } else {
                pieces.push(self.load_region(part, a, lo..hi)?);
            }
            part_start += size;
        }
        let mut array = if pieces.len() == 1 {
            pieces.pop().expect("one piece")
        } else {
            let views: Vec<_> = pieces.iter().map(|p| p.view()).collect();
            ndarray::concatenate(Axis(w.concat_axis), &views)
                .map_err(|e| bad(&w.label(), e.to_string()))?
        };
        for (t, &axis) in w.transforms.iter().zip(&trace.axes) {
            array = crate::weights::apply_transform(array, t, Some(axis))
                .map_err(|e| bad(&w.label(), e))?;
        }
        let array = crate::layout::row_major(array.view());
        // Quantization blocks run along K, never axis 0, so every block of rows holds whole blocks.
        Ok(match &w.quant {
            Some(spec) => crate::quant::quantize(&array, spec, None).dequantized,
            None => array,
        })
    }

    /// Output rows `rows` of a projection weight read transposed (see [`Transposed`]) as f32; None for
    /// every other chain (they take the general path).
    fn transposed_block(
        &self,
        w: &WeightRef,
        rows: &Range<usize>,
    ) -> Result<Option<ArrayD<f32>>, WeightError> {
        let Some(t) = self.transposed(w)? else {
            return Ok(None);
        };
        let values = t.rows(rows.clone(), 0f32, &|run: &[f32], out: &mut [f32]| {
            out.copy_from_slice(run)
        })?;
        ArrayD::from_shape_vec(IxDyn(&[rows.len(), t.n]), values)
            .map(Some)
            .map_err(|e| bad(&t.part.source.tensor, e.to_string()))
    }

    /// The weight as a [`Transposed`] projection, if it is one.
    fn transposed<'a>(&'a self, w: &'a WeightRef) -> Result<Option<Transposed<'a>>, WeightError> {
        let ([part], [Transform::Transpose { perm }], None) =
            (w.parts.as_slice(), w.transforms.as_slice(), &w.quant)
        else {
            return Ok(None);
        };
        let &[n, k] = part.stored_shape.as_slice() else {
            return Ok(None);
        };
        if perm != &[1, 0] || part.scale.is_some() || decode_f32(part.dtype, &[]).is_none() {
            return Ok(None);
        }
        let (shard, bytes) = self.stored(part)?;
        Ok(Some(Transposed {
            part,
            shard,
            bytes,
            n,
            k,
        }))
    }

    /// Calls `sink` with consecutive blocks of the weight's output rows (as [`Self::stream_rows`] cuts
    /// them with a row multiple of 1) as bytes, `N` per value, `encode` turning decoded values into
    /// them (it takes any number of values). A projection read transposed is decoded and encoded in
    /// one pass with no f32 block between: the f16 and bf16 bundles' one pass over the data.
    pub fn stream_encoded<const N: usize, E: From<WeightError>>(
        &self,
        w: &WeightRef,
        max_block_elements: usize,
        encode: &Encoder<N>,
        mut sink: impl FnMut(Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        if let Some(t) = self.transposed(w)? {
            let step = (max_block_elements / t.n.max(1)).max(1);
            let mut start = 0;
            while start < t.k {
                let rows = start..(start + step).min(t.k);
                sink(t.rows(rows.clone(), [0u8; N], encode)?.into_flattened())?;
                start = rows.end;
            }
            t.shard.release(&t.part.source.tensor, 0..usize::MAX);
            return Ok(());
        }
        self.stream_rows(w, max_block_elements, 1, |_, block| {
            let values = block
                .as_slice()
                .ok_or_else(|| bad(&w.label(), "non-contiguous block".into()))?;
            let mut out = vec![[0u8; N]; values.len()];
            out.par_chunks_mut(ENCODE_RUN)
                .zip(values.par_chunks(ENCODE_RUN))
                .for_each(|(o, v)| encode(v, o));
            sink(out.into_flattened())
        })
    }

    /// The shard holding `part` and its stored bytes, checked to hold every element its shape says.
    fn stored(&self, part: &WeightPart) -> Result<(&Shard, &[u8]), WeightError> {
        let missing = || WeightError::Missing {
            tensor: part.source.tensor.clone(),
        };
        let shard = self
            .shards()
            .get(part.source.shard.0 as usize)
            .ok_or_else(missing)?;
        let bytes = shard.bytes(&part.source.tensor).ok_or_else(missing)?;
        let elements: usize = part.stored_shape.iter().product();
        if bytes.len() < elements * (part.dtype.bits() / 8) {
            return Err(bad(&part.source.tensor, "region outside the tensor".into()));
        }
        Ok((shard, bytes))
    }

    /// Decodes `range` of `axis` of one stored tensor: one contiguous run per index of the axes before it.
    fn load_region(
        &self,
        part: &WeightPart,
        axis: usize,
        range: Range<usize>,
    ) -> Result<ArrayD<f32>, WeightError> {
        if decode_f32(part.dtype, &[]).is_none() {
            return Err(WeightError::UnsupportedDtype {
                tensor: part.source.tensor.clone(),
                dtype: part.dtype,
            });
        }
        let (shard, bytes) = self.stored(part)?;
        let dims = &part.stored_shape;
        let elem = part.dtype.bits() / 8;
        let outer: usize = dims[..axis].iter().product();
        let inner: usize = dims[axis + 1..].iter().product();
        let run = range.len() * inner;
        let mut values = vec![0f32; outer * run];
        values
            .par_chunks_mut(run.max(1))
            .enumerate()
            .for_each(|(o, out)| {
                let first = (o * dims[axis] + range.start) * inner;
                decode_into(part.dtype, &bytes[first * elem..(first + run) * elem], out);
            });
        if let (Some(scales), Some(scale)) = (self.part_scales(part)?, &part.scale) {
            scale.apply(&scales, dims, axis, range.clone(), &mut values);
        }
        if axis == 0 {
            // A leading-axis region is read once: its pages can go now rather than when the weight is done.
            shard.release(
                &part.source.tensor,
                range.start * inner * elem..range.end * inner * elem,
            );
        }
        let mut shape = dims.clone();
        shape[axis] = range.len();
        ArrayD::from_shape_vec(IxDyn(&shape), values)
            .map_err(|e| bad(&part.source.tensor, e.to_string()))
    }
}

/// Turns decoded values into `N` bytes each (for [`WeightStore::stream_encoded`]).
pub type Encoder<const N: usize> = dyn Fn(&[f32], &mut [[u8; N]]) + Sync;

/// Values per parallel task when encoding a block of the general path.
const ENCODE_RUN: usize = 1 << 16;

/// A projection weight read transposed: one stored 2-D float part `[N, K]` under `Transpose [1, 0]`,
/// unquantized and unscaled (every nn.Linear weight, as ONNX's MatMul takes it `[K, N]`).
struct Transposed<'a> {
    part: &'a WeightPart,
    shard: &'a Shard,
    bytes: &'a [u8],
    n: usize,
    k: usize,
}

impl Transposed<'_> {
    /// Output rows `rows` (`[rows, N]`, row-major) decoded straight into the transposed order: each
    /// stored row gives one contiguous run of up to TILE values of a band of output rows, which
    /// `convert` turns into output elements written down that output column. Parallel over bands of
    /// TILE output rows; no decoded copy in the stored order.
    fn rows<T: Copy + Send + Sync>(
        &self,
        rows: Range<usize>,
        zero: T,
        convert: &(impl Fn(&[f32], &mut [T]) + Sync + ?Sized),
    ) -> Result<Vec<T>, WeightError> {
        const TILE: usize = 32;
        let (n, k) = (self.n, self.k);
        if rows.end > k {
            return Err(bad(
                &self.part.source.tensor,
                "region outside the tensor".into(),
            ));
        }
        let elem = self.part.dtype.bits() / 8;
        let mut out = vec![zero; rows.len() * n];
        out.par_chunks_mut((TILE * n).max(1))
            .enumerate()
            .for_each(|(band, values)| {
                let k0 = rows.start + band * TILE;
                let height = values.len() / n.max(1);
                let mut run = [0f32; TILE];
                let mut converted = [zero; TILE];
                for row in 0..n {
                    let first = (row * k + k0) * elem;
                    decode_into(
                        self.part.dtype,
                        &self.bytes[first..first + height * elem],
                        &mut run[..height],
                    );
                    convert(&run[..height], &mut converted[..height]);
                    for (i, &v) in converted[..height].iter().enumerate() {
                        values[i * n + row] = v;
                    }
                }
            });
        Ok(out)
    }
}

/// Streams an array held in memory in blocks of rows, as `stream_rows` does.
fn stream_in_memory<E>(
    array: &ArrayD<f32>,
    max_block_elements: usize,
    row_multiple: usize,
    mut sink: impl FnMut(Range<usize>, &ArrayD<f32>) -> Result<(), E>,
) -> Result<(), E> {
    let rows_total = array.shape().first().copied().unwrap_or(1);
    let row: usize = array.shape().iter().skip(1).product();
    let multiple = row_multiple.max(1);
    let step = ((max_block_elements / row.max(1)) / multiple).max(1) * multiple;
    let mut start = 0;
    while start < rows_total {
        let rows = start..(start + step).min(rows_total);
        let block = array
            .slice_axis(Axis(0), rows.clone().into())
            .as_standard_layout()
            .into_owned();
        sink(rows.clone(), &block)?;
        start = rows.end;
    }
    Ok(())
}

fn bad(tensor: &str, problem: String) -> WeightError {
    WeightError::BadWeight {
        tensor: tensor.to_string(),
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::DType;
    use crate::weights::{Shard, ShardId, TensorSource};

    /// A store with one f32 shard holding tensors "a" [4, 6, 5] and "b" [3, 6, 5] of distinct values.
    fn store() -> (WeightStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<f32> = (0..120).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..90).map(|i| 1000.0 + i as f32).collect();
        // 2-D, wider and taller than one transpose tile; "d" stored in bf16.
        let c: Vec<f32> = (0..37 * 45).map(|i| -(i as f32)).collect();
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (ab, bb, cb) = (bytes(&a), bytes(&b), bytes(&c));
        let db: Vec<u8> = (0..40 * 33)
            .flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes())
            .collect();
        let views = vec![
            (
                "a",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 6, 5], &ab)
                    .unwrap(),
            ),
            (
                "b",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3, 6, 5], &bb)
                    .unwrap(),
            ),
            (
                "c",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![37, 45], &cb)
                    .unwrap(),
            ),
            (
                "d",
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![40, 33], &db)
                    .unwrap(),
            ),
        ];
        let path = dir.path().join("w.safetensors");
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let mut store = WeightStore::default();
        store.push(Shard::open(&path, "w.safetensors").unwrap());
        (store, dir)
    }

    fn part(name: &str, shape: &[usize]) -> WeightPart {
        WeightPart {
            source: TensorSource {
                shard: ShardId(0),
                tensor: name.into(),
            },
            dtype: DType::F32,
            stored_shape: shape.to_vec(),
            scale: None,
        }
    }

    fn streamed(store: &WeightStore, w: &WeightRef, block: usize) -> (ArrayD<f32>, usize) {
        let mut blocks = Vec::new();
        let mut next_row = 0;
        store
            .stream_rows::<WeightError>(w, block, 1, |rows, b| {
                assert_eq!(rows.start, next_row, "blocks arrive in order");
                next_row = rows.end;
                blocks.push(b.clone());
                Ok(())
            })
            .unwrap();
        let views: Vec<_> = blocks.iter().map(|b| b.view()).collect();
        (ndarray::concatenate(Axis(0), &views).unwrap(), blocks.len())
    }

    #[test]
    fn streamed_blocks_equal_the_whole_weight() {
        let (store, _dir) = store();
        let a = WeightRef::single(part("a", &[4, 6, 5]));
        let chains: Vec<(&str, WeightRef)> = vec![
            ("plain", a.clone()),
            (
                "transpose",
                a.clone().with(Transform::Transpose {
                    perm: vec![2, 0, 1],
                }),
            ),
            (
                "interleave",
                a.clone()
                    .with(Transform::Reshape {
                        shape: vec![4, 6, 5, 1],
                    })
                    .with(Transform::Transpose {
                        perm: vec![0, 2, 3, 1],
                    })
                    .with(Transform::Reshape {
                        shape: vec![4, 5, 6],
                    }),
            ),
            (
                "select+transpose",
                a.clone()
                    .with(Transform::Select { axis: 0, index: 2 })
                    .with(Transform::Transpose { perm: vec![1, 0] }),
            ),
            (
                "slice traced",
                a.clone()
                    .with(Transform::Slice {
                        axis: 1,
                        start: 2,
                        end: 5,
                    })
                    .with(Transform::Transpose {
                        perm: vec![1, 0, 2],
                    }),
            ),
            (
                "slice other",
                a.clone().with(Transform::Slice {
                    axis: 2,
                    start: 1,
                    end: 4,
                }),
            ),
            (
                "split leading axis",
                a.clone().with(Transform::Reshape {
                    shape: vec![2, 12, 5],
                }),
            ),
            (
                "expert",
                a.clone().with(Transform::Select { axis: 0, index: 3 }),
            ),
            (
                "expert of split parts, transposed",
                a.clone()
                    .with(Transform::Reshape {
                        shape: vec![2, 12, 5],
                    })
                    .with(Transform::Select { axis: 0, index: 1 })
                    .with(Transform::Transpose { perm: vec![1, 0] }),
            ),
            (
                "expert of interleaved, transposed",
                a.clone()
                    .with(Transform::Reshape {
                        shape: vec![4, 6, 5, 1],
                    })
                    .with(Transform::Transpose {
                        perm: vec![0, 2, 3, 1],
                    })
                    .with(Transform::Reshape {
                        shape: vec![4, 5, 6],
                    })
                    .with(Transform::Select { axis: 0, index: 2 })
                    .with(Transform::Transpose { perm: vec![1, 0] }),
            ),
            (
                "expert of concatenated parts",
                WeightRef {
                    quant: None,
                    parts: vec![part("a", &[4, 6, 5]), part("b", &[3, 6, 5])],
                    concat_axis: 0,
                    transforms: vec![Transform::Select { axis: 0, index: 5 }],
                },
            ),
            (
                "regrouping reshape (read whole)",
                a.clone().with(Transform::Reshape { shape: vec![8, 15] }),
            ),
            (
                "concat rows then transpose",
                WeightRef {
                    quant: None,
                    parts: vec![part("a", &[4, 6, 5]), part("b", &[3, 6, 5])],
                    concat_axis: 0,
                    transforms: vec![Transform::Transpose {
                        perm: vec![1, 0, 2],
                    }],
                },
            ),
            (
                "concat on the traced axis",
                WeightRef {
                    quant: None,
                    parts: vec![part("a", &[4, 6, 5]), part("b", &[3, 6, 5])],
                    concat_axis: 0,
                    transforms: vec![Transform::Slice {
                        axis: 0,
                        start: 2,
                        end: 6,
                    }],
                },
            ),
        ];
        let bf16 = WeightPart {
            dtype: DType::BF16,
            ..part("d", &[40, 33])
        };
        let transposed = Transform::Transpose { perm: vec![1, 0] };
        let chains = chains.into_iter().chain([
            (
                "2-D transpose (decoded transposed)",
                WeightRef::single(part("c", &[37, 45])).with(transposed.clone()),
            ),
            (
                "2-D bf16 transpose (decoded transposed)",
                WeightRef::single(bf16).with(transposed),
            ),
        ]);
        let encode = |v: &[f32], o: &mut [[u8; 4]]| {
            for (o, v) in o.iter_mut().zip(v) {
                *o = v.to_le_bytes();
            }
        };
        for (what, w) in chains {
            let whole = store.load_f32(&w).unwrap();
            let whole_bytes: Vec<u8> = whole.iter().flat_map(|v| v.to_le_bytes()).collect();
            for block in [1, 7, 30, 1 << 20] {
                let (joined, count) = streamed(&store, &w, block);
                assert_eq!(joined, whole, "{what}, block {block}");
                let mut encoded = Vec::new();
                store
                    .stream_encoded::<4, WeightError>(&w, block, &encode, |bytes| {
                        encoded.extend(bytes);
                        Ok(())
                    })
                    .unwrap();
                assert_eq!(encoded, whole_bytes, "{what}, encoded in blocks of {block}");
                if block == 1 && !what.contains("read whole") {
                    assert_eq!(count, whole.shape()[0], "{what}: one row per block");
                }
            }
        }
    }
}
