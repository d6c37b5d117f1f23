//! One safetensors shard: mmapped, its header validated (length, JSON, offsets contiguous and inside
//! the file, dtypes and shapes that agree with the byte counts), and errors that say which tensor of
//! which file is wrong.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensorError, SafeTensors, TensorInfo};

use crate::error::WeightError;
use crate::types::DType;

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
