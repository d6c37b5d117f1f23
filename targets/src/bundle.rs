//! The bundle writer: a bundle is assembled in a temporary sibling folder and renamed into place only
//! once complete, with a manifest listing every file's size and sha256. A failed or interrupted
//! compile leaves no bundle (and no half-written one).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use herd_runtime::manifest::{FileEntry, Manifest, MANIFEST_FILE};

use crate::error::TargetError;

/// Staging folders of bundles being written by this process, for [`remove_staging_folders`].
static STAGING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes the staging folders of every unfinished bundle of this process: for a SIGINT/SIGTERM
/// handler, which exits right after (destructors do not run then).
pub fn remove_staging_folders() {
    let folders = match STAGING.lock() {
        Ok(mut f) => std::mem::take(&mut *f),
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    };
    for folder in folders {
        // Other threads may still be writing into the folder: a file created while remove_dir_all
        // runs makes its last rmdir fail, so try until the folder is gone (nothing recreates it).
        for _ in 0..50 {
            if fs::remove_dir_all(&folder).is_ok() || !folder.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

fn unregister(staging: &Path) {
    if let Ok(mut folders) = STAGING.lock() {
        folders.retain(|f| f != staging);
    }
}

/// A bundle being written.
pub struct BundleWriter {
    destination: PathBuf,
    staging: PathBuf,
    force: bool,
    finished: bool,
}

impl BundleWriter {
    /// Starts a bundle that will land at `destination`. Refuses an existing destination unless `force`,
    /// and even then replaces only a herd bundle (see [`check_replaceable`]) that is not `source` (the
    /// model folder being read) or a folder holding it.
    pub fn create(
        destination: &Path,
        force: bool,
        source: &Path,
    ) -> Result<BundleWriter, TargetError> {
        check_replaceable(destination, force, source)?;
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
        // Registered before it exists, so an interrupt that sees the folder also removes it.
        if let Ok(mut folders) = STAGING.lock() {
            folders.push(staging.clone());
        }
        if let Err(e) = fs::create_dir(&staging) {
            unregister(&staging);
            return Err(TargetError::io(&staging, e));
        }
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

    /// Copies `src` into the bundle as `name`; an error names the side that failed (a full disk is
    /// the bundle's, an unreadable file the source's).
    pub fn copy_in(&self, src: &Path, name: &str) -> Result<(), TargetError> {
        use std::io::{Read, Write};
        let dst = self.staging.join(name);
        let mut input = fs::File::open(src).map_err(|e| TargetError::io(src, e))?;
        let mut output = fs::File::create(&dst).map_err(|e| TargetError::io(&dst, e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input.read(&mut buf).map_err(|e| TargetError::io(src, e))?;
            if n == 0 {
                break;
            }
            output
                .write_all(&buf[..n])
                .map_err(|e| TargetError::io(&dst, e))?;
        }
        output.sync_all().map_err(|e| TargetError::io(&dst, e))?;
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
        let text = serde_json::to_string_pretty(manifest)
            .map_err(|e| TargetError::bug("bundle", e.to_string()))?;
        fs::write(&path, text + "\n").map_err(|e| TargetError::io(&path, e))?;
        if self.destination.symlink_metadata().is_ok() {
            // Whatever appeared at the destination while compiling gets the same scrutiny.
            check_replaceable(&self.destination, self.force, &self.staging)?;
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
        unregister(&self.staging);
        Ok(self.destination.clone())
    }
}

/// Whether `destination` may be written: it does not exist, or `force` is given and it is a folder
/// (not a symlink, file or device) holding a herd manifest that parses, and it is neither `source` nor
/// a folder that contains `source`. Anything else is refused with the reason: herd never deletes what
/// it did not make.
pub fn check_replaceable(
    destination: &Path,
    force: bool,
    source: &Path,
) -> Result<(), TargetError> {
    let Ok(meta) = destination.symlink_metadata() else {
        return Ok(());
    };
    let refuse = |why: &str| {
        Err(TargetError::Io {
            path: destination.display().to_string(),
            message: format!("{why}; --force replaces only a bundle herd wrote, so choose another --output (or move it away yourself)"),
        })
    };
    if !force {
        return Err(TargetError::Exists {
            path: destination.display().to_string(),
        });
    }
    if meta.file_type().is_symlink() {
        return refuse("is a symbolic link");
    }
    if !meta.is_dir() {
        return refuse("is not a folder (a file or a device)");
    }
    if let (Ok(dest), Ok(src)) = (destination.canonicalize(), source.canonicalize()) {
        if src.starts_with(&dest) {
            return refuse(&format!(
                "holds the model folder {} being compiled",
                source.display()
            ));
        }
    }
    let manifest = destination.join(MANIFEST_FILE);
    let is_bundle = std::fs::read_to_string(&manifest)
        .ok()
        .and_then(|text| serde_json::from_str::<Manifest>(&text).ok())
        .is_some();
    if !is_bundle {
        return refuse("is not a herd bundle (no readable manifest.json)");
    }
    Ok(())
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
            unregister(&self.staging);
        }
    }
}
