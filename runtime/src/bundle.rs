//! Opening a bundle folder: the manifest, its format version, and the files it lists (sizes always,
//! sha256 of the small ones on every load, of all of them in [`Bundle::verify`] / [`Bundle::verify_all`],
//! which `herd verify`, `--verify` and `RuntimeOptions::verify` run).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::RuntimeError;
use crate::manifest::{Manifest, CHECKSUM_ON_LOAD_LIMIT, FORMAT_VERSION, MANIFEST_FILE};

/// One file of a bundle checked against its manifest entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileCheck {
    pub path: String,
    /// Size the manifest records.
    pub bytes: u64,
    /// What is wrong with the file, or None when size and sha256 match.
    pub problem: Option<String>,
}

/// An opened, checked bundle.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Bundle {
    /// Opens `dir`, checking the manifest, every listed file's size and the checksums of small files.
    pub fn open(dir: &Path) -> Result<Bundle, RuntimeError> {
        let path = dir.join(MANIFEST_FILE);
        let shown = path.display().to_string();
        let text = fs::read_to_string(&path).map_err(|e| RuntimeError::BadManifest {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let manifest = parse_manifest(&shown, &text)?;
        let bundle = Bundle {
            dir: dir.to_path_buf(),
            manifest,
        };
        bundle.check_files()?;
        // Every model file the runtime may load must be one of the checked files inside the bundle.
        let m = &bundle.manifest;
        let engine = m.tensorrt.as_ref().and_then(|t| t.engine.as_ref());
        let models = std::iter::once(m.graph.model_file.clone())
            .chain(m.stages.iter().map(|s| s.model_file.clone()))
            .chain(m.vision.as_ref().map(|v| v.model_file.clone()))
            .chain(engine.map(|e| e.model_file.clone()))
            .chain(engine.and_then(|e| e.vision_model_file.clone()));
        for model in models {
            if !bundle.manifest.files.iter().any(|f| f.path == model) {
                return Err(RuntimeError::Tampered {
                    path: bundle.dir.join(MANIFEST_FILE).display().to_string(),
                    message: format!(
                        "model file `{model}` is not among the bundle's checked files"
                    ),
                });
            }
        }
        Ok(bundle)
    }

    /// Checks every file's checksum, however large; the error names every damaged file.
    pub fn verify_all(&self) -> Result<(), RuntimeError> {
        self.check_files()?;
        let damaged: Vec<String> = self
            .verify()
            .into_iter()
            .filter_map(|c| c.problem.map(|p| format!("{}: {p}", c.path)))
            .collect();
        if damaged.is_empty() {
            return Ok(());
        }
        Err(RuntimeError::Tampered {
            path: self.dir.display().to_string(),
            message: format!(
                "{} damaged file(s): {}; recompile or copy the bundle again",
                damaged.len(),
                damaged.join("; ")
            ),
        })
    }

    /// The size and sha256 of every listed file against the manifest, files hashed in parallel and
    /// each streamed (memory stays a few MiB per thread whatever the bundle's size).
    pub fn verify(&self) -> Vec<FileCheck> {
        let entries = &self.manifest.files;
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(entries.len().max(1));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut checks: Vec<(usize, FileCheck)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(entry) = entries.get(i) else {
                                break;
                            };
                            done.push((i, self.check_one(entry)));
                        }
                        done
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        });
        checks.sort_by_key(|(i, _)| *i);
        // A file no worker reported on (a worker that panicked) is not passed as good.
        (0..entries.len())
            .map(|i| match checks.binary_search_by_key(&i, |(j, _)| *j) {
                Ok(at) => checks[at].1.clone(),
                Err(_) => FileCheck {
                    path: entries[i].path.clone(),
                    bytes: entries[i].bytes,
                    problem: Some("was not checked (herd bug: a hashing thread failed)".into()),
                },
            })
            .collect()
    }

    fn check_one(&self, entry: &crate::manifest::FileEntry) -> FileCheck {
        let relative = Path::new(&entry.path);
        let problem = if relative.is_absolute()
            || relative
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            Some("not a plain name inside the bundle".to_string())
        } else {
            let path = self.dir.join(relative);
            match fs::metadata(&path) {
                Err(e) => Some(format!("unreadable ({e})")),
                Ok(m) if !m.is_file() => Some("not a regular file".to_string()),
                Ok(m) if m.len() != entry.bytes => Some(format!(
                    "size {} bytes, manifest says {}",
                    m.len(),
                    entry.bytes
                )),
                Ok(_) => match sha256_file(&path) {
                    Err(e) => Some(e.to_string()),
                    Ok(d) if d != entry.sha256 => Some("sha256 differs from the manifest".into()),
                    Ok(_) => None,
                },
            }
        };
        FileCheck {
            path: entry.path.clone(),
            bytes: entry.bytes,
            problem,
        }
    }

    /// Sizes of every listed file and checksums of the small ones (what every load checks).
    fn check_files(&self) -> Result<(), RuntimeError> {
        for entry in &self.manifest.files {
            let relative = Path::new(&entry.path);
            if relative.is_absolute()
                || relative
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(RuntimeError::Tampered {
                    path: self.dir.join(MANIFEST_FILE).display().to_string(),
                    message: format!(
                        "file entry `{}` is not a plain name inside the bundle",
                        entry.path
                    ),
                });
            }
            let path = self.dir.join(relative);
            let shown = path.display().to_string();
            let size = fs::metadata(&path)
                .map_err(|e| RuntimeError::Tampered {
                    path: shown.clone(),
                    message: format!("listed in the manifest but unreadable ({e})"),
                })?
                .len();
            if size != entry.bytes {
                return Err(RuntimeError::Tampered {
                    path: shown,
                    message: format!("size {size} bytes, manifest says {}", entry.bytes),
                });
            }
            if size <= CHECKSUM_ON_LOAD_LIMIT {
                let digest = sha256_file(&path)?;
                if digest != entry.sha256 {
                    return Err(RuntimeError::Tampered {
                        path: shown,
                        message: "sha256 differs from the manifest".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Path of a bundle file.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Parses and checks the text of a `manifest.json` (named `label` in errors): its format version, its
/// fields (a type error names the key) and the facts the runtime divides by, indexes with and
/// allocates from. The files it lists are not looked at.
pub fn parse_manifest(label: &str, text: &str) -> Result<Manifest, RuntimeError> {
    let probe: serde_json::Value =
        serde_json::from_str(text).map_err(|e| RuntimeError::BadManifest {
            path: label.to_string(),
            message: e.to_string(),
        })?;
    let found = probe
        .get("format_version")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    if found != u64::from(FORMAT_VERSION) {
        return Err(RuntimeError::FormatVersion {
            path: label.to_string(),
            found: u32::try_from(found).unwrap_or(u32::MAX),
            supported: FORMAT_VERSION,
        });
    }
    let manifest: Manifest =
        serde_path_to_error::deserialize(&probe).map_err(|e| RuntimeError::BadManifest {
            path: label.to_string(),
            message: format!("key `{}`: {}", e.path(), e.inner()),
        })?;
    if let Some(problem) = model_section_problem(&manifest) {
        return Err(RuntimeError::Tampered {
            path: label.to_string(),
            message: problem,
        });
    }
    if manifest.stages.len() > 64 {
        return Err(RuntimeError::Tampered {
            path: label.to_string(),
            message: format!(
                "{} stages: a bundle holds at most 64",
                manifest.stages.len()
            ),
        });
    }
    manifest
        .check_stages()
        .map_err(|message| RuntimeError::Tampered {
            path: label.to_string(),
            message,
        })?;
    if let Some(v) = &manifest.vision {
        // Preprocessing divides by and indexes with these: refuse values a compile never writes.
        let problem = if v.tile_size == 0 || v.tile_size > 4096 {
            Some("tile_size must be in 1..=4096")
        } else if v.tokens_per_tile == 0 || v.tokens_per_tile > v.tile_size * v.tile_size {
            Some("tokens_per_tile must be positive and at most one per pixel")
        } else if v.max_tiles == 0 || v.max_tiles > 64 || v.max_images == 0 || v.max_images > 64 {
            Some("max_tiles and max_images must be in 1..=64")
        } else if v.num_channels != 3 || v.image_mean.len() != 3 || v.image_std.len() != 3 {
            Some("images have 3 channels, each with a mean and std")
        } else if v.image_std.iter().any(|s| *s == 0.0 || !s.is_finite())
            || !(v.rescale_factor.is_finite() && v.rescale_factor > 0.0)
        {
            Some("image_std and rescale_factor must be finite and nonzero")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(RuntimeError::Tampered {
                path: label.to_string(),
                message: format!("vision section: {problem}"),
            });
        }
    }
    Ok(manifest)
}

/// Why the manifest's model facts cannot come from a compile, if they cannot: the runtime divides by,
/// indexes with and allocates from them.
fn model_section_problem(m: &Manifest) -> Option<String> {
    let info = &m.model;
    /// Positions, layers, widths and vocabularies past these are no Llama 4 a compile writes.
    const MAX_POSITIONS: usize = 1 << 26;
    const MAX_LAYERS: usize = 1024;
    const MAX_WIDTH: usize = 1 << 20;
    if info.vocab_size == 0 || info.vocab_size > MAX_WIDTH {
        return Some(format!(
            "vocab_size {} is outside 1..={MAX_WIDTH}",
            info.vocab_size
        ));
    }
    if info.max_positions == 0 || info.max_positions > MAX_POSITIONS {
        return Some(format!(
            "max_positions {} is outside 1..={MAX_POSITIONS}",
            info.max_positions
        ));
    }
    if info.attention_chunk_size == 0 {
        return Some("attention_chunk_size is 0".into());
    }
    if info.num_layers == 0 || info.num_layers > MAX_LAYERS {
        return Some(format!(
            "num_layers {} is outside 1..={MAX_LAYERS}",
            info.num_layers
        ));
    }
    if [info.hidden_size, info.num_kv_heads, info.head_dim]
        .iter()
        .any(|&d| d == 0 || d > MAX_WIDTH)
    {
        return Some("hidden_size, num_kv_heads and head_dim must be positive".into());
    }
    if info.nope_layers.iter().any(|&l| l >= info.num_layers) {
        return Some("nope_layers names a layer past num_layers".into());
    }
    None
}

fn sha256_file(path: &Path) -> Result<String, RuntimeError> {
    let io = |e: std::io::Error| RuntimeError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut file = fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(digest_hex(&hasher.finalize()))
}

/// A digest as the manifest records it: lowercase hex. The one spelling of it, for writer and checker.
pub fn digest_hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads `dir`'s manifest, checked as [`parse_manifest`] checks it (format, fields, model facts),
/// applies `edit`, and writes the result to a temporary file renamed into place. Nothing is written
/// when `edit` fails. The one way herd changes a written manifest.
pub fn update_manifest(
    dir: &Path,
    edit: impl FnOnce(&mut Manifest) -> Result<(), RuntimeError>,
) -> Result<(), RuntimeError> {
    let io = |path: &Path, e: std::io::Error| RuntimeError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    let mut manifest = parse_manifest(&path.display().to_string(), &text)?;
    edit(&mut manifest)?;
    let tmp = path.with_extension("json.partial");
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| RuntimeError::BadManifest {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    fs::write(&tmp, text + "\n").map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| io(&path, e))
}

/// Records a built engine in the bundle's manifest: the engine file joins the checksummed files.
pub fn record_engine(dir: &Path, engine: &crate::manifest::EngineInfo) -> Result<(), RuntimeError> {
    update_manifest(dir, |manifest| {
        for name in std::iter::once(&engine.model_file).chain(engine.vision_model_file.as_ref()) {
            let file = dir.join(name);
            let bytes = fs::metadata(&file)
                .map_err(|e| RuntimeError::Io {
                    path: file.display().to_string(),
                    message: e.to_string(),
                })?
                .len();
            let sha256 = sha256_file(&file)?;
            manifest.files.retain(|f| &f.path != name);
            manifest.files.push(crate::manifest::FileEntry {
                path: name.clone(),
                bytes,
                sha256,
            });
        }
        if let Some(trt) = manifest.tensorrt.as_mut() {
            trt.engine = Some(engine.clone());
        }
        Ok(())
    })
}
