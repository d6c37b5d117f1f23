//! The bundle writer: a bundle is assembled in a temporary sibling folder and renamed into place only
//! once complete, with a manifest listing every file's size and sha256. A failed or interrupted
//! compile leaves no bundle (and no half-written one).

use std::fs;
use std::path::{Path, PathBuf};

use herd_runtime::manifest::{FileEntry, Manifest, MANIFEST_FILE};

use crate::error::TargetError;

/// A bundle being written.
pub struct BundleWriter {
    destination: PathBuf,
    staging: PathBuf,
    force: bool,
    finished: bool,
}

impl BundleWriter {
    /// Starts a bundle that will land at `destination`. Refuses an existing destination unless `force`.
    pub fn create(destination: &Path, force: bool) -> Result<BundleWriter, TargetError> {
        if destination.exists() && !force {
            return Err(TargetError::Exists {
                path: destination.display().to_string(),
            });
        }
        let name = destination
            .file_name()
            .ok_or_else(|| TargetError::Io {
                path: destination.display().to_string(),
                message: "not a folder name".into(),
            })?
            .to_string_lossy();
        let parent = match destination.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| TargetError::io(&parent, e))?;
        remove_abandoned(&parent, &name);
        let staging = parent.join(format!(".{name}.herd-partial-{}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(|e| TargetError::io(&staging, e))?;
        }
        fs::create_dir(&staging).map_err(|e| TargetError::io(&staging, e))?;
        Ok(BundleWriter {
            destination: destination.to_path_buf(),
            staging,
            force,
            finished: false,
        })
    }

    /// The folder files are written into until [`BundleWriter::finish`].
    pub fn dir(&self) -> &Path {
        &self.staging
    }

    /// Copies `src` into the bundle as `name`.
    pub fn copy_in(&self, src: &Path, name: &str) -> Result<(), TargetError> {
        let dst = self.staging.join(name);
        fs::copy(src, &dst).map_err(|e| TargetError::io(src, e))?;
        Ok(())
    }

    /// Lists every file written so far with size and sha256; `known` supplies hashes already computed
    /// while streaming (the weights), so they are not read back.
    pub fn file_entries(
        &self,
        known: &[(String, u64, String)],
    ) -> Result<Vec<FileEntry>, TargetError> {
        let mut entries = Vec::new();
        let mut names: Vec<String> = fs::read_dir(&self.staging)
            .map_err(|e| TargetError::io(&self.staging, e))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n != MANIFEST_FILE)
            .collect();
        names.sort();
        for name in names {
            let path = self.staging.join(&name);
            let entry = match known.iter().find(|(n, _, _)| *n == name) {
                Some((_, bytes, sha)) => FileEntry {
                    path: name,
                    bytes: *bytes,
                    sha256: sha.clone(),
                },
                None => {
                    let bytes = fs::read(&path).map_err(|e| TargetError::io(&path, e))?;
                    FileEntry {
                        path: name,
                        bytes: bytes.len() as u64,
                        sha256: crate::sha256_hex(&bytes),
                    }
                }
            };
            entries.push(entry);
        }
        Ok(entries)
    }

    /// Writes the manifest and moves the bundle into place.
    pub fn finish(mut self, manifest: &Manifest) -> Result<PathBuf, TargetError> {
        let path = self.staging.join(MANIFEST_FILE);
        let text =
            serde_json::to_string_pretty(manifest).map_err(|e| TargetError::Bug(e.to_string()))?;
        fs::write(&path, text + "\n").map_err(|e| TargetError::io(&path, e))?;
        if self.destination.exists() {
            if !self.force {
                return Err(TargetError::Exists {
                    path: self.destination.display().to_string(),
                });
            }
            let old = self.staging.with_extension("replaced");
            fs::rename(&self.destination, &old)
                .map_err(|e| TargetError::io(&self.destination, e))?;
            fs::rename(&self.staging, &self.destination)
                .map_err(|e| TargetError::io(&self.destination, e))?;
            fs::remove_dir_all(&old).map_err(|e| TargetError::io(&old, e))?;
        } else {
            fs::rename(&self.staging, &self.destination)
                .map_err(|e| TargetError::io(&self.destination, e))?;
        }
        self.finished = true;
        Ok(self.destination.clone())
    }
}

/// Removes staging folders of `name` left by compiles that were killed (their process no longer runs).
fn remove_abandoned(parent: &Path, name: &str) {
    let prefix = format!(".{name}.herd-partial-");
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = Path::new("/proc").join(pid.to_string()).exists();
        if !alive && pid != std::process::id() {
            tracing::info!(folder = %entry.path().display(), "removing the staging folder of an interrupted compile");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for BundleWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}
