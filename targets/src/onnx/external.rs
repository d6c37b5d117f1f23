//! The external data file: initializers are appended one at a time, page aligned (so ONNX Runtime can
//! map them), hashed as they are written. Nothing here holds more than the tensor being written.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{StringStringEntryProto, TensorProto};
use sha2::{Digest, Sha256};

use crate::error::TargetError;

/// Alignment of every tensor in the data file.
const ALIGN: u64 = 4096;

/// Writer of `model.onnx.data`.
pub struct ExternalData {
    location: String,
    path: PathBuf,
    out: BufWriter<File>,
    offset: u64,
    hasher: Sha256,
}

impl ExternalData {
    /// Creates `dir/location`.
    pub fn create(dir: &Path, location: &str) -> Result<ExternalData, TargetError> {
        let path = dir.join(location);
        let file = File::create(&path).map_err(|e| TargetError::io(&path, e))?;
        Ok(ExternalData {
            location: location.to_string(),
            path,
            out: BufWriter::with_capacity(8 << 20, file),
            offset: 0,
            hasher: Sha256::new(),
        })
    }

    /// Appends `bytes` and points `tensor` at them.
    pub fn append(&mut self, tensor: &mut TensorProto, bytes: &[u8]) -> Result<(), TargetError> {
        let offset = self.begin()?;
        self.write(bytes)?;
        self.end(tensor, offset);
        Ok(())
    }

    /// Starts a tensor written in pieces with [`ExternalData::write`]; returns its offset for
    /// [`ExternalData::end`].
    pub fn begin(&mut self) -> Result<u64, TargetError> {
        let pad = (ALIGN - self.offset % ALIGN) % ALIGN;
        self.write(&vec![0u8; pad as usize])?;
        Ok(self.offset)
    }

    /// Points `tensor` at everything written since `begin` returned `offset`.
    pub fn end(&mut self, tensor: &mut TensorProto, offset: u64) {
        let entry = |k: &str, v: String| {
            let mut e = StringStringEntryProto::new();
            e.key = k.to_string();
            e.value = v;
            e
        };
        tensor.external_data = vec![
            entry("location", self.location.clone()),
            entry("offset", offset.to_string()),
            entry("length", (self.offset - offset).to_string()),
        ];
        tensor.data_location = DataLocation::EXTERNAL.into();
    }

    /// Appends bytes to the tensor being written.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), TargetError> {
        self.out
            .write_all(bytes)
            .map_err(|e| TargetError::io(&self.path, e))?;
        self.hasher.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Flushes and syncs the file; returns its size and sha256 (hex).
    pub fn finish(mut self) -> Result<(u64, String), TargetError> {
        self.out
            .flush()
            .map_err(|e| TargetError::io(&self.path, e))?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| TargetError::io(&self.path, e.into_error()))?;
        file.sync_all()
            .map_err(|e| TargetError::io(&self.path, e))?;
        let digest = self.hasher.finalize();
        Ok((
            self.offset,
            digest.iter().map(|b| format!("{b:02x}")).collect(),
        ))
    }
}
