//! The external data file: initializers are appended one at a time, page aligned (so ONNX Runtime can
//! map them). A background thread writes and hashes the bytes while the caller prepares the next block;
//! at most two blocks are in flight.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

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
    offset: u64,
    sender: Option<SyncSender<Vec<u8>>>,
    worker: Option<JoinHandle<std::io::Result<(File, Sha256)>>>,
}

impl ExternalData {
    /// Creates `dir/location`.
    pub fn create(dir: &Path, location: &str) -> Result<ExternalData, TargetError> {
        let path = dir.join(location);
        let file = File::create(&path).map_err(|e| TargetError::io(&path, e))?;
        let (sender, receiver) = sync_channel::<Vec<u8>>(2);
        let worker = std::thread::spawn(move || {
            let mut out = BufWriter::with_capacity(8 << 20, file);
            let mut hasher = Sha256::new();
            for bytes in receiver {
                hasher.update(&bytes);
                out.write_all(&bytes)?;
            }
            out.flush()?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            Ok((file, hasher))
        });
        Ok(ExternalData {
            location: location.to_string(),
            path,
            offset: 0,
            sender: Some(sender),
            worker: Some(worker),
        })
    }

    /// Bytes written so far (the offset of the next byte).
    pub fn offset(&self) -> u64 {
        self.offset
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
        self.send(bytes.to_vec())
    }

    /// Appends an owned buffer without copying it.
    pub fn write_owned(&mut self, bytes: Vec<u8>) -> Result<(), TargetError> {
        self.send(bytes)
    }

    fn send(&mut self, bytes: Vec<u8>) -> Result<(), TargetError> {
        let n = bytes.len() as u64;
        let sent = self
            .sender
            .as_ref()
            .map(|s| s.send(bytes).is_ok())
            .unwrap_or(false);
        if !sent {
            // The writer stopped: its error is the one to report.
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| TargetError::bug("data writer", "data writer stopped")));
        }
        self.offset += n;
        Ok(())
    }

    fn join(&mut self) -> Result<(File, Sha256), TargetError> {
        self.sender = None;
        let worker = self
            .worker
            .take()
            .ok_or_else(|| TargetError::bug("data writer", "data writer already finished"))?;
        let result = worker
            .join()
            .map_err(|_| TargetError::bug("data writer", "data writer panicked"))?;
        result.map_err(|e| TargetError::io(&self.path, e))
    }

    /// Flushes and syncs the file; returns its size and sha256 (hex).
    pub fn finish(mut self) -> Result<(u64, String), TargetError> {
        let (file, hasher) = self.join()?;
        file.sync_all()
            .map_err(|e| TargetError::io(&self.path, e))?;
        Ok((
            self.offset,
            herd_runtime::bundle::digest_hex(&hasher.finalize()),
        ))
    }
}
