//! Weights as graph values: a reference to a tensor inside an mmapped safetensors shard plus a lazy chain
//! of transforms. Nothing here copies weight bytes until a consumer asks for one tensor's values.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use ndarray::{ArrayD, Axis, IxDyn};
use safetensors::tensor::{Dtype as StDtype, SafeTensorError, SafeTensors, TensorInfo};

use crate::error::WeightError;
use crate::types::{DType, Shape, TensorType};

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

/// One mmapped safetensors file with its validated header.
#[derive(Debug)]
pub struct Shard {
    /// The file as named inside the checkpoint folder (for messages and the printer).
    pub name: String,
    pub path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

impl Shard {
    /// Maps `path` and validates its header: the header length, JSON, offsets (contiguous, inside the
    /// file, not overlapping) and the byte count of every tensor against its dtype and shape.
    pub fn open(path: &Path, name: &str) -> Result<Shard, WeightError> {
        let file = File::open(path).map_err(|e| WeightError::Io {
            file: name.to_string(),
            message: e.to_string(),
        })?;
        // SAFETY: the checkpoint is opened read-only; herd never writes to it, and a file truncated by
        // another process while mapped is outside what a compiler can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| WeightError::Io {
            file: name.to_string(),
            message: e.to_string(),
        })?;
        let (header_len, tensors) = parse_header(name, &mmap)?;
        Ok(Shard {
            name: name.to_string(),
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            tensors,
        })
    }

    /// The header entry of a tensor.
    pub fn info(&self, tensor: &str) -> Option<&TensorInfo> {
        self.tensors.get(tensor)
    }

    /// Names of all tensors in this shard, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Drops the mapped pages of `range` (bytes, relative to `tensor`'s data) from this process's resident
    /// memory once they have been read; a later read faults them back in from the file. Streaming calls
    /// this so that resident memory does not grow with the checkpoint.
    pub fn release(&self, tensor: &str, range: std::ops::Range<usize>) {
        let Some(info) = self.tensors.get(tensor) else {
            return;
        };
        let size = info.data_offsets.1 - info.data_offsets.0;
        let (from, to) = (range.start.min(size), range.end.min(size));
        if from >= to {
            return;
        }
        let (start, len) = (self.data_start + info.data_offsets.0 + from, to - from);
        // SAFETY: the mapping is private and read-only, so MADV_DONTNEED only discards this process's copy
        // of file pages; their contents are unchanged when next read. Failure is harmless (pages stay).
        let _ = unsafe {
            self.mmap
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
        };
    }

    /// The raw bytes of a tensor, borrowed from the mapping.
    pub fn bytes(&self, tensor: &str) -> Option<&[u8]> {
        let info = self.tensors.get(tensor)?;
        let (s, e) = info.data_offsets;
        self.mmap.get(self.data_start + s..self.data_start + e)
    }
}

/// Converts a safetensors element type to the IR's, if the IR supports it.
pub fn dtype_from_safetensors(dtype: StDtype) -> Option<DType> {
    Some(match dtype {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F8_E4M3 => DType::F8E4M3,
        StDtype::I8 => DType::I8,
        StDtype::I32 => DType::I32,
        StDtype::I64 => DType::I64,
        StDtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// Validates the safetensors file `bytes` (named `name` in errors): header length, JSON, offsets
/// (contiguous, inside the file, not overlapping) and each tensor's byte count against its dtype and
/// shape. Returns the header's length and its tensors.
pub fn parse_header(
    name: &str,
    bytes: &[u8],
) -> Result<(usize, HashMap<String, TensorInfo>), WeightError> {
    let (header_len, metadata) =
        SafeTensors::read_metadata(bytes).map_err(|e| describe_header_error(name, bytes, e))?;
    let tensors = metadata
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    Ok((header_len, tensors))
}

/// Names the tensor a header error concerns: the safetensors crate reports some errors without it.
fn describe_header_error(file: &str, buffer: &[u8], err: SafeTensorError) -> WeightError {
    let problem = match &err {
        SafeTensorError::HeaderTooSmall => "file is shorter than the 8-byte header length".to_string(),
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => {
            let declared = buffer.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
            format!(
                "header length {} runs past the end of the file ({} bytes); the file is truncated or not safetensors",
                declared.unwrap_or(0),
                buffer.len()
            )
        }
        SafeTensorError::InvalidHeader(_)
        | SafeTensorError::InvalidHeaderStart
        | SafeTensorError::InvalidHeaderDeserialization(_)
        | SafeTensorError::JsonError(_) => format!("header is not valid safetensors JSON ({err})"),
        SafeTensorError::InvalidOffset(name) => match duplicate_key(buffer) {
            // A repeated name hides one entry, which then looks like an overlap or a gap.
            Some(dup) => format!("tensor `{dup}` is listed twice in the header"),
            None => format!(
                "tensor `{name}` has data offsets that overlap another tensor or leave a gap"
            ),
        },
        SafeTensorError::TensorInvalidInfo | SafeTensorError::MisalignedSlice | SafeTensorError::ValidationOverflow => {
            match find_size_mismatch(buffer) {
                Some(detail) => detail,
                None => "a tensor's byte count disagrees with its dtype and shape".to_string(),
            }
        }
        SafeTensorError::MetadataIncompleteBuffer => match find_overrun(buffer) {
            Some(detail) => detail,
            None => "the tensors' data does not match the file size; the file is truncated or has trailing bytes".to_string(),
        },
        other => other.to_string(),
    };
    WeightError::BadShard {
        file: file.to_string(),
        problem,
    }
}

/// The first key the header's JSON object repeats, if any (serde maps keep only the last).
fn duplicate_key(buffer: &[u8]) -> Option<String> {
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if !seen.insert(key.clone()) {
                    return Ok(Some(key));
                }
            }
            Ok(None)
        }
    }
    let len = u64::from_le_bytes(buffer.get(..8)?.try_into().ok()?) as usize;
    let header = buffer.get(8..8usize.checked_add(len)?)?;
    let mut de = serde_json::Deserializer::from_slice(header);
    serde::Deserializer::deserialize_map(&mut de, Keys).ok()?
}

#[derive(serde::Deserialize)]
struct RawInfo {
    dtype: StDtype,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

fn raw_header(buffer: &[u8]) -> Option<Vec<(String, RawInfo)>> {
    let n = usize::try_from(u64::from_le_bytes(buffer.get(..8)?.try_into().ok()?)).ok()?;
    let text = std::str::from_utf8(buffer.get(8..8usize.checked_add(n)?)?).ok()?;
    let map: HashMap<String, serde_json::Value> = serde_json::from_str(text).ok()?;
    let mut out: Vec<(String, RawInfo)> = map
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .filter_map(|(k, v)| Some((k, serde_json::from_value(v).ok()?)))
        .collect();
    out.sort_by_key(|(_, info)| info.data_offsets);
    Some(out)
}

fn find_size_mismatch(buffer: &[u8]) -> Option<String> {
    raw_header(buffer)?.into_iter().find_map(|(name, info)| {
        let bits = info
            .shape
            .iter()
            .try_fold(info.dtype.bitsize(), |a, &d| a.checked_mul(d))?;
        let stored = info.data_offsets.1.checked_sub(info.data_offsets.0)?;
        (bits != stored * 8).then(|| {
            format!(
                "tensor `{name}` is {:?} {:?} ({} bytes) but its offsets hold {stored} bytes",
                info.dtype,
                info.shape,
                bits / 8
            )
        })
    })
}

fn find_overrun(buffer: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(buffer.get(..8)?.try_into().ok()?)).ok()?;
    let data_len = buffer.len().checked_sub(8 + n)?;
    let header = raw_header(buffer)?;
    if let Some((name, info)) = header.iter().find(|(_, i)| i.data_offsets.1 > data_len) {
        return Some(format!(
            "tensor `{name}` ends at data byte {} but the file holds only {data_len} data bytes: the shard is truncated (re-download it)",
            info.data_offsets.1
        ));
    }
    Some(format!(
        "{} trailing bytes after the last tensor",
        data_len - header.last().map(|(_, i)| i.data_offsets.1).unwrap_or(0)
    ))
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
        let invalid = |problem: String| WeightError::BadShard {
            file: "<weight>".into(),
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
            array = match t {
                Transform::Transpose { perm } => array.permuted_axes(IxDyn(perm)),
                Transform::Slice { axis, start, end } => array
                    .slice_axis(Axis(*axis), (*start..*end).into())
                    .to_owned(),
                Transform::Select { axis, index } => {
                    array.index_axis(Axis(*axis), *index).to_owned()
                }
                Transform::Reshape { shape } => array
                    .as_standard_layout()
                    .into_owned()
                    .into_shape_with_order(IxDyn(shape))
                    .map_err(|e| invalid(e.to_string()))?,
            };
        }
        let array = array.as_standard_layout().into_owned();
        Ok(match &weight.quant {
            Some(spec) => crate::quant::quantize(&array, spec, None).dequantized,
            None => array,
        })
    }
}

/// Decodes little-endian stored values to f32.
pub fn decode_f32(dtype: DType, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F8E4M3 => bytes.iter().map(|&b| f8e4m3_to_f32(b)).collect(),
        DType::I8 => bytes.iter().map(|&b| b as i8 as f32).collect(),
        DType::I4 | DType::I32 | DType::I64 | DType::Bool => return None,
    })
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
