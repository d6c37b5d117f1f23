//! Weights as graph values: a reference to a tensor inside an mmapped safetensors shard plus a lazy chain
//! of transforms. Nothing here copies weight bytes until a consumer asks for one tensor's values.

use ndarray::{ArrayD, Axis, IxDyn};

use crate::error::WeightError;
use crate::types::{DType, Shape, TensorType};

mod shard;

pub use shard::{dtype_from_safetensors, parse_header, Shard};

/// Index of a shard inside its [`WeightStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u32);

/// Where a weight's bytes live: a tensor of a shard.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorSource {
    pub shard: ShardId,
    pub tensor: String,
}

/// A lazy transform applied to a weight when it is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transform {
    /// Permute the axes: output axis i is input axis `perm[i]`.
    Transpose { perm: Vec<usize> },
    /// Keep `start..end` along `axis`.
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// Keep index `index` along `axis`, dropping the axis.
    Select { axis: usize, index: usize },
    /// Reinterpret the (row-major) elements with another shape of the same element count.
    Reshape { shape: Vec<usize> },
}

/// One stored tensor that is part of a weight.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightPart {
    pub source: TensorSource,
    /// Element type as stored in the shard.
    pub dtype: DType,
    /// Shape as stored in the shard.
    pub stored_shape: Vec<usize>,
    /// Pre-quantized parts (stored codes): the scales that turn them into values (see [`PartScale`]).
    pub scale: Option<PartScale>,
}

/// The scales of a pre-quantized 2-D part `[rows, K]`: fp8 checkpoints (compressed-tensors) scale each
/// row, `[rows, 1]`; int4/int8 parts written by GPTQ scale blocks of K, `[rows, K / block]`. The part's
/// value is `stored * scale[row, column / block]`.
#[derive(Clone, Debug, PartialEq)]
pub struct PartScale {
    pub source: TensorSource,
    pub dtype: DType,
    /// The scheme the stored codes follow.
    pub scheme: crate::quant::QuantScheme,
}

impl PartScale {
    /// Scales per row for a part whose rows hold `k` values.
    pub fn columns(&self, k: usize) -> usize {
        self.scheme.block().map_or(1, |b| k / b.max(1))
    }

    /// Multiplies `values` (a region of the part: `range` of `axis`, row-major) by their scales.
    pub(crate) fn apply(
        &self,
        scales: &[f32],
        stored_shape: &[usize],
        axis: usize,
        range: std::ops::Range<usize>,
        values: &mut [f32],
    ) {
        let k = stored_shape[1];
        let (columns, block) = (self.columns(k), self.scheme.block().unwrap_or(k).max(1));
        let width = if axis == 1 { range.len() } else { k };
        values.iter_mut().enumerate().for_each(|(i, v)| {
            let (row, column) = match axis {
                0 => (range.start + i / width, i % width),
                _ => (i / width, range.start + i % width),
            };
            *v *= scales[row * columns + column / block];
        });
    }
}

/// A weight value: one or more stored tensors concatenated along `concat_axis`, then `transforms`.
/// Fusion passes build multi-part weights (q/k/v, gate/up); nothing is materialised until read.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightRef {
    pub parts: Vec<WeightPart>,
    pub concat_axis: usize,
    pub transforms: Vec<Transform>,
    /// Set by the quantize pass: the weight is stored quantized, and its value is the dequantized one.
    pub quant: Option<crate::quant::QuantSpec>,
}

impl WeightRef {
    /// The checkpoint tensors the weight reads, joined with `+` (for error messages).
    pub fn label(&self) -> String {
        let names: Vec<&str> = self
            .parts
            .iter()
            .map(|p| p.source.tensor.as_str())
            .collect();
        names.join("+")
    }

    /// A weight that is exactly one stored tensor.
    pub fn single(part: WeightPart) -> WeightRef {
        WeightRef {
            parts: vec![part],
            concat_axis: 0,
            transforms: Vec::new(),
            quant: None,
        }
    }

    /// The same weight with one more transform appended.
    pub fn with(mut self, transform: Transform) -> WeightRef {
        self.transforms.push(transform);
        self
    }

    /// Whether the parts are pre-quantized: fp8 with per-row scales from the checkpoint, or int codes
    /// with block scales from GPTQ.
    pub fn prequantized(&self) -> bool {
        self.parts.iter().any(|p| p.scale.is_some())
    }

    /// The quantization this weight is stored with: the quantize pass's, or for pre-quantized parts fp8
    /// per output channel along the axis the parts' input features (their last axis) end up on.
    pub fn effective_quant(&self) -> Option<crate::quant::QuantSpec> {
        if self.quant.is_some() || !self.prequantized() {
            return self.quant;
        }
        let (k_axis, _) = self.prequant_trace()?;
        let scale = self.parts.first()?.scale.as_ref()?;
        Some(crate::quant::QuantSpec {
            scheme: scale.scheme,
            k_axis,
            // fp8 checkpoints' scales (f32, f16 or bf16) are written as f32; GPTQ's already have the
            // bundle's scale dtype.
            scale_dtype: match scale.scheme {
                crate::quant::QuantScheme::Fp8 => DType::F32,
                _ => scale.dtype,
            },
            search: crate::quant::ScaleSearch::Absmax,
        })
    }

    /// The scales of a pre-quantized weight as a weight of their own, shaped like this weight with K
    /// replaced by K / block (1 for fp8; the transforms are replayed on the parts' scale tensors).
    pub fn prequant_scales(&self) -> Option<WeightRef> {
        let (_, transforms) = self.prequant_trace()?;
        let parts = self
            .parts
            .iter()
            .map(|p| {
                let scale = p.scale.as_ref()?;
                Some(WeightPart {
                    source: scale.source.clone(),
                    dtype: scale.dtype,
                    stored_shape: vec![p.stored_shape[0], scale.columns(p.stored_shape[1])],
                    scale: None,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(WeightRef {
            parts,
            concat_axis: 0,
            transforms,
            quant: None,
        })
    }

    /// Follows K (the parts' last axis, concatenated on axis 0) through the transforms: its final axis
    /// and the transforms rewritten for the scales (K of size K / block). All parts share one scheme.
    fn prequant_trace(&self) -> Option<(usize, Vec<Transform>)> {
        let first = self.parts.first()?;
        let scheme = first.scale.as_ref()?.scheme;
        if self.concat_axis != 0
            || first.stored_shape.len() != 2
            || self
                .parts
                .iter()
                .any(|p| p.scale.as_ref().map(|s| s.scheme) != Some(scheme))
        {
            return None;
        }
        let scale_columns = first.scale.as_ref()?.columns(first.stored_shape[1]);
        let mut shape = vec![
            self.parts.iter().map(|p| p.stored_shape[0]).sum::<usize>(),
            first.stored_shape[1],
        ];
        let mut k = 1;
        let mut out = Vec::new();
        for t in &self.transforms {
            let next = transformed_shape(&shape, t).ok()?;
            let t2 = match t {
                Transform::Transpose { perm } => {
                    k = perm.iter().position(|&p| p == k)?;
                    t.clone()
                }
                Transform::Reshape { shape: to } => {
                    let before: usize = shape[..k].iter().product();
                    k = (0..to.len()).find(|&j| {
                        to[j] == shape[k] && to[..j].iter().product::<usize>() == before
                    })?;
                    let mut s2 = to.clone();
                    s2[k] = scale_columns;
                    Transform::Reshape { shape: s2 }
                }
                Transform::Slice { axis, .. } if *axis == k => return None,
                Transform::Slice { .. } => t.clone(),
                Transform::Select { axis, .. } if *axis == k => return None,
                Transform::Select { axis, .. } => {
                    if *axis < k {
                        k -= 1;
                    }
                    t.clone()
                }
            };
            out.push(t2);
            shape = next;
        }
        Some((k, out))
    }

    /// Element type (that of the parts; the verifier checks they agree).
    pub fn dtype(&self) -> DType {
        self.parts.first().map_or(DType::F32, |p| p.dtype)
    }

    /// Element type of the weight's value: the parts', except that int codes with block scales (GPTQ)
    /// are f32 values (`code * scale`, exact in f32).
    pub fn value_dtype(&self) -> DType {
        match self.parts.first() {
            Some(p) if p.scale.as_ref().is_some_and(|s| s.scheme.block().is_some()) => DType::F32,
            _ => self.dtype(),
        }
    }

    /// The shape after concatenation and all transforms, or why the chain does not fit.
    pub fn shape(&self) -> Result<Vec<usize>, String> {
        let first = self
            .parts
            .first()
            .ok_or("a weight needs at least one part")?;
        let mut shape = first.stored_shape.clone();
        for part in &self.parts[1..] {
            let fits = part.stored_shape.len() == shape.len()
                && self.concat_axis < shape.len()
                && (0..shape.len())
                    .all(|a| a == self.concat_axis || part.stored_shape[a] == shape[a]);
            if !fits || part.dtype != first.dtype {
                return Err(format!(
                    "part `{}` {:?} {:?} cannot be concatenated on axis {} with {:?} {shape:?}",
                    part.source.tensor,
                    part.dtype,
                    part.stored_shape,
                    self.concat_axis,
                    first.dtype
                ));
            }
            shape[self.concat_axis] += part.stored_shape[self.concat_axis];
        }
        for t in &self.transforms {
            shape = transformed_shape(&shape, t)?;
        }
        Ok(shape)
    }

    /// The value's type; invalid chains are reported by the verifier, here they give the first part's shape.
    pub fn ty(&self) -> TensorType {
        let shape = self.shape().unwrap_or_else(|_| {
            self.parts
                .first()
                .map(|p| p.stored_shape.clone())
                .unwrap_or_default()
        });
        TensorType {
            dtype: self.value_dtype(),
            shape: Shape::fixed(&shape),
        }
    }

    /// Number of elements after transforms.
    pub fn num_elements(&self) -> usize {
        self.shape().unwrap_or_default().iter().product()
    }
}

fn transformed_shape(shape: &[usize], t: &Transform) -> Result<Vec<usize>, String> {
    match t {
        Transform::Transpose { perm } => {
            let mut seen = vec![false; shape.len()];
            if perm.len() != shape.len()
                || perm
                    .iter()
                    .any(|&p| p >= shape.len() || std::mem::replace(&mut seen[p], true))
            {
                return Err(format!(
                    "transpose {perm:?} is not a permutation of rank {}",
                    shape.len()
                ));
            }
            Ok(perm.iter().map(|&p| shape[p]).collect())
        }
        Transform::Slice { axis, start, end } => {
            if *axis >= shape.len() || start > end || *end > shape[*axis] {
                return Err(format!(
                    "slice {start}..{end} on axis {axis} does not fit shape {shape:?}"
                ));
            }
            let mut out = shape.to_vec();
            out[*axis] = end - start;
            Ok(out)
        }
        Transform::Reshape { shape: to } => {
            if to.iter().product::<usize>() != shape.iter().product::<usize>() {
                return Err(format!(
                    "reshape {shape:?} to {to:?} changes the element count"
                ));
            }
            Ok(to.clone())
        }
        Transform::Select { axis, index } => {
            if *axis >= shape.len() || *index >= shape[*axis] {
                return Err(format!(
                    "select {index} on axis {axis} does not fit shape {shape:?}"
                ));
            }
            let mut out = shape.to_vec();
            out.remove(*axis);
            Ok(out)
        }
    }
}

/// All shards of one checkpoint, mmapped.
#[derive(Debug, Default)]
pub struct WeightStore {
    shards: Vec<Shard>,
}

impl WeightStore {
    /// Adds a shard and returns its id.
    pub fn push(&mut self, shard: Shard) -> ShardId {
        self.shards.push(shard);
        ShardId(self.shards.len() as u32 - 1)
    }

    /// The same shards mapped afresh (same ids), to extend with [`WeightStore::push`] while graphs
    /// holding this store keep it.
    pub fn reopened(&self) -> Result<WeightStore, WeightError> {
        let shards = self
            .shards
            .iter()
            .map(|s| Shard::open(&s.path, &s.name))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WeightStore { shards })
    }

    /// The shard with this id.
    pub fn shard(&self, id: ShardId) -> &Shard {
        &self.shards[id.0 as usize]
    }

    /// All shards in id order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Reads one stored tensor as f32.
    fn load_part(&self, part: &WeightPart) -> Result<ArrayD<f32>, WeightError> {
        let missing = || WeightError::Missing {
            tensor: part.source.tensor.clone(),
        };
        let shard = self
            .shards
            .get(part.source.shard.0 as usize)
            .ok_or_else(missing)?;
        let bytes = shard.bytes(&part.source.tensor).ok_or_else(missing)?;
        let mut values =
            decode_f32(part.dtype, bytes).ok_or_else(|| WeightError::UnsupportedDtype {
                tensor: part.source.tensor.clone(),
                dtype: part.dtype,
            })?;
        if let (Some(scales), Some(scale)) = (self.part_scales(part)?, &part.scale) {
            let rows = part.stored_shape[0];
            scale.apply(&scales, &part.stored_shape, 0, 0..rows, &mut values);
        }
        ArrayD::from_shape_vec(IxDyn(&part.stored_shape), values).map_err(|e| {
            WeightError::BadShard {
                file: shard.name.clone(),
                problem: format!("tensor `{}`: {e}", part.source.tensor),
            }
        })
    }

    /// The scales of a pre-quantized part, [rows, columns] row-major (None for plain parts).
    pub fn part_scales(&self, part: &WeightPart) -> Result<Option<Vec<f32>>, WeightError> {
        let Some(scale @ PartScale { source, dtype, .. }) = &part.scale else {
            return Ok(None);
        };
        let dtype = *dtype;
        let missing = || WeightError::Missing {
            tensor: source.tensor.clone(),
        };
        let shard = self
            .shards
            .get(source.shard.0 as usize)
            .ok_or_else(missing)?;
        let values = decode_f32(dtype, shard.bytes(&source.tensor).ok_or_else(missing)?).ok_or(
            WeightError::UnsupportedDtype {
                tensor: source.tensor.clone(),
                dtype,
            },
        )?;
        let expected = match part.stored_shape.as_slice() {
            [rows, k] => Some(rows * scale.columns(*k)),
            _ => None,
        };
        if expected != Some(values.len()) {
            return Err(WeightError::BadShard {
                file: shard.name.clone(),
                problem: format!(
                    "`{}` holds {} scales for `{}` {:?} ({} scheme)",
                    source.tensor,
                    values.len(),
                    part.source.tensor,
                    part.stored_shape,
                    scale.scheme.name()
                ),
            });
        }
        Ok(Some(values))
    }

    /// Reads a weight as f32 with its concatenation and transforms applied. Only this call copies
    /// weight bytes, one weight at a time.
    pub fn load_f32(&self, weight: &WeightRef) -> Result<ArrayD<f32>, WeightError> {
        let invalid = |problem: String| WeightError::BadWeight {
            tensor: weight.label(),
            problem,
        };
        weight.shape().map_err(invalid)?;
        let parts = weight
            .parts
            .iter()
            .map(|p| self.load_part(p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut array = if parts.len() == 1 {
            parts.into_iter().next().expect("one part")
        } else {
            let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
            ndarray::concatenate(Axis(weight.concat_axis), &views)
                .map_err(|e| invalid(e.to_string()))?
        };
        for t in &weight.transforms {
            array = apply_transform(array, t, None).map_err(invalid)?;
        }
        let array = crate::layout::row_major(array.view());
        Ok(match &weight.quant {
            Some(spec) => crate::quant::quantize(&array, spec, None).dequantized,
            None => array,
        })
    }
}

/// Applies one lazy transform to `array`: the one definition of what each [`Transform`] does, for
/// whole reads (`traced: None`) and streamed row regions. A region is cut along its `traced` axis
/// before the transforms run, so a slice along that axis was already applied and a reshape's
/// leading dimension is the region's, not the whole weight's.
pub(crate) fn apply_transform(
    array: ArrayD<f32>,
    transform: &Transform,
    traced: Option<usize>,
) -> Result<ArrayD<f32>, String> {
    Ok(match transform {
        Transform::Transpose { perm } => array.permuted_axes(IxDyn(perm)),
        Transform::Slice { axis, .. } if traced == Some(*axis) => array,
        Transform::Slice { axis, start, end } => array
            .slice_axis(Axis(*axis), (*start..*end).into())
            .to_owned(),
        Transform::Select { axis, index } => array.index_axis(Axis(*axis), *index).to_owned(),
        Transform::Reshape { shape } => {
            let mut shape = shape.clone();
            if traced.is_some() && !shape.is_empty() {
                let row: usize = shape[1..].iter().product();
                shape[0] = array.len() / row.max(1);
            }
            crate::layout::row_major(array.view())
                .into_shape_with_order(IxDyn(&shape))
                .map_err(|e| e.to_string())?
        }
    })
}

/// Decodes little-endian stored values to f32 (through [`decode_into`], the one decoder).
pub fn decode_f32(dtype: DType, bytes: &[u8]) -> Option<Vec<f32>> {
    let width = match dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
        DType::F8E4M3 | DType::I8 => 1,
        DType::I4 | DType::I32 | DType::I64 | DType::Bool => return None,
    };
    let mut out = vec![0f32; bytes.len() / width];
    decode_into(dtype, bytes, &mut out);
    Some(out)
}

/// Decodes little-endian stored values into `out` (same count); dtypes `decode_f32` refuses are left 0.
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .zip(out)
            .for_each(|(c, o)| *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        DType::F16 => bytes
            .chunks_exact(2)
            .zip(out)
            .for_each(|(c, o)| *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        DType::BF16 => bytes.chunks_exact(2).zip(out).for_each(|(c, o)| {
            *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)
        }),
        DType::F8E4M3 => bytes
            .iter()
            .zip(out)
            .for_each(|(&b, o)| *o = f8e4m3_to_f32(b)),
        DType::I8 => bytes
            .iter()
            .zip(out)
            .for_each(|(&b, o)| *o = b as i8 as f32),
        DType::I4 | DType::I32 | DType::I64 | DType::Bool => {}
    }
}

/// float8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN.
pub fn f8e4m3_to_f32(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((bits >> 3) & 0x0f) as i32;
    let mant = (bits & 0x07) as f32;
    if exp == 0x0f && bits & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * mant / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f8e4m3_decodes_known_values() {
        assert_eq!(f8e4m3_to_f32(0x38), 1.0);
        assert_eq!(f8e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f8e4m3_to_f32(0xb8), -1.0);
        assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(f8e4m3_to_f32(0x7f).is_nan());
    }

    #[test]
    fn transform_shapes_compose() {
        let part = WeightPart {
            source: TensorSource {
                shard: ShardId(0),
                tensor: "t".into(),
            },
            dtype: DType::BF16,
            stored_shape: vec![4, 8, 6],
            scale: None,
        };
        let w = WeightRef {
            quant: None,
            parts: vec![part.clone(), part],
            concat_axis: 2,
            transforms: vec![
                Transform::Select { axis: 0, index: 1 },
                Transform::Slice {
                    axis: 1,
                    start: 0,
                    end: 3,
                },
                Transform::Transpose { perm: vec![1, 0] },
                Transform::Reshape { shape: vec![12, 2] },
            ],
        };
        assert_eq!(w.shape().unwrap(), vec![12, 2]);
        let bad = WeightRef {
            transforms: vec![Transform::Slice {
                axis: 0,
                start: 2,
                end: 5,
            }],
            ..w
        };
        assert!(bad.shape().unwrap_err().contains("does not fit"));
    }
}
