//! Calibration activations on disk for GPTQ/AWQ: per exposed input, f32 rows appended in prompt order
//! and read back in bounded chunks.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Activations on disk: per name, rows of f32 (little-endian) appended in order.
pub(super) struct Spool {
    dir: PathBuf,
    streams: BTreeMap<String, Stream>,
}

struct Stream {
    path: PathBuf,
    writer: Option<BufWriter<File>>,
    width: usize,
    rows: usize,
}

/// Rows read per chunk from the spool.
const SPOOL_CHUNK_BYTES: usize = 64 << 20;

impl Spool {
    pub(super) fn create(dir: PathBuf) -> Result<Spool> {
        std::fs::create_dir_all(&dir)?;
        Ok(Spool {
            dir,
            streams: BTreeMap::new(),
        })
    }

    pub(super) fn append(&mut self, name: &str, width: usize, values: &[f32]) -> Result<()> {
        if width == 0 || values.len() % width != 0 {
            bail!(
                "calibration output {name}: {} values are not rows of {width}",
                values.len()
            );
        }
        let count = self.streams.len();
        let stream = match self.streams.get_mut(name) {
            Some(s) => s,
            None => {
                let path = self.dir.join(format!("{count:05}.f32"));
                let file = File::create(&path)
                    .with_context(|| format!("{}: cannot spool activations", path.display()))?;
                self.streams.entry(name.to_string()).or_insert(Stream {
                    path,
                    writer: Some(BufWriter::with_capacity(1 << 20, file)),
                    width,
                    rows: 0,
                })
            }
        };
        if stream.width != width {
            bail!(
                "calibration output {name}: rows of {width}, earlier {}",
                stream.width
            );
        }
        let writer = stream.writer.as_mut().context("herd bug: spool finished")?;
        write_f32s(writer, values)?;
        stream.rows += values.len() / width;
        Ok(())
    }

    pub(super) fn finish(&mut self) -> Result<()> {
        for s in self.streams.values_mut() {
            if let Some(mut w) = s.writer.take() {
                w.flush()
                    .with_context(|| format!("{}: cannot spool activations", s.path.display()))?;
            }
        }
        Ok(())
    }

    pub(super) fn has(&self, name: &str) -> bool {
        self.streams.contains_key(name)
    }

    pub(super) fn rows(&self, name: &str) -> usize {
        self.streams.get(name).map_or(0, |s| s.rows)
    }

    pub(super) fn width(&self, name: &str) -> Result<usize> {
        self.streams
            .get(name)
            .map(|s| s.width)
            .with_context(|| format!("herd bug: no calibration activations for {name}"))
    }

    /// Calls `f` with consecutive chunks of whole rows of `name`.
    pub(super) fn read(&self, name: &str, mut f: impl FnMut(&[f32]) -> Result<()>) -> Result<()> {
        let stream = self
            .streams
            .get(name)
            .with_context(|| format!("herd bug: no calibration activations for {name}"))?;
        let row_bytes = stream.width * 4;
        let chunk_rows = (SPOOL_CHUNK_BYTES / row_bytes.max(1)).max(1);
        let mut reader = BufReader::new(File::open(&stream.path)?);
        let mut left = stream.rows;
        let mut bytes = Vec::new();
        while left > 0 {
            let rows = left.min(chunk_rows);
            bytes.resize(rows * row_bytes, 0);
            reader.read_exact(&mut bytes).with_context(|| {
                format!("{}: spooled activations cut short", stream.path.display())
            })?;
            f(&f32s_of(&bytes))?;
            left -= rows;
        }
        Ok(())
    }

    /// All rows of `name` in memory.
    pub(super) fn read_all(&self, name: &str) -> Result<Vec<f32>> {
        let mut all = Vec::new();
        self.read(name, |chunk| {
            all.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(all)
    }
}

/// The residual stream one calibration window hands the next: each prompt's rows of f32 appended in
/// prompt order, read back prompt by prompt; the file is removed once read.
pub(super) struct Residuals {
    path: PathBuf,
    writer: BufWriter<File>,
    width: usize,
}

impl Residuals {
    pub(super) fn create(path: PathBuf, width: usize) -> Result<Residuals> {
        let file = File::create(&path)
            .with_context(|| format!("{}: cannot spool the residual stream", path.display()))?;
        Ok(Residuals {
            path,
            writer: BufWriter::with_capacity(1 << 20, file),
            width,
        })
    }

    pub(super) fn append(&mut self, rows: &[f32]) -> Result<()> {
        write_f32s(&mut self.writer, rows)
            .with_context(|| format!("{}: cannot spool the residual stream", self.path.display()))
    }

    /// Flushes what was appended and opens it for reading.
    pub(super) fn finish(mut self) -> Result<ResidualReader> {
        self.writer.flush().with_context(|| {
            format!("{}: cannot spool the residual stream", self.path.display())
        })?;
        let file = File::open(&self.path)?;
        Ok(ResidualReader {
            path: std::mem::take(&mut self.path),
            reader: BufReader::with_capacity(1 << 20, file),
            width: self.width,
        })
    }
}

/// Reads [`Residuals`] back, prompt by prompt; removes the file when dropped.
pub(super) struct ResidualReader {
    path: PathBuf,
    reader: BufReader<File>,
    width: usize,
}

impl ResidualReader {
    /// The next prompt's rows: `tokens` x the stream's width.
    pub(super) fn next(&mut self, tokens: usize) -> Result<Vec<f32>> {
        let mut bytes = vec![0u8; tokens * self.width * 4];
        self.reader
            .read_exact(&mut bytes)
            .with_context(|| format!("{}: residual stream cut short", self.path.display()))?;
        Ok(f32s_of(&bytes))
    }
}

impl Drop for ResidualReader {
    fn drop(&mut self) {
        std::fs::remove_file(&self.path).ok();
    }
}

/// Appends `values` as little-endian f32.
fn write_f32s(writer: &mut BufWriter<File>, values: &[f32]) -> std::io::Result<()> {
    for v in values {
        writer.write_all(&v.to_le_bytes())?;
    }
    Ok(())
}

/// Little-endian f32 bytes as values.
fn f32s_of(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_returns_rows_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(dir.path().join("s")).unwrap();
        spool.append("a", 2, &[1.0, 2.0, 3.0, 4.0]).unwrap();
        spool.append("a", 2, &[5.0, 6.0]).unwrap();
        assert!(spool.append("a", 3, &[1.0, 2.0, 3.0]).is_err());
        spool.finish().unwrap();
        assert_eq!(spool.rows("a"), 3);
        assert_eq!(
            spool.read_all("a").unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
    }

    #[test]
    fn residuals_come_back_by_prompt_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.f32");
        let mut r = Residuals::create(path.clone(), 2).unwrap();
        r.append(&[1.0, 2.0]).unwrap();
        r.append(&[3.0, 4.0, 5.0, 6.0]).unwrap();
        let mut reader = r.finish().unwrap();
        assert_eq!(reader.next(1).unwrap(), vec![1.0, 2.0]);
        assert_eq!(reader.next(2).unwrap(), vec![3.0, 4.0, 5.0, 6.0]);
        assert!(reader.next(1).is_err());
        drop(reader);
        assert!(!path.exists());
    }
}
