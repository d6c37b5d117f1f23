//! Finding and loading the ONNX Runtime shared library (the `ort` crate's load-dynamic mode) once per
//! process: `ORT_DYLIB_PATH`, then the project's cache `.cache/onnxruntime/` (where
//! `scripts/install-onnxruntime.sh` puts the library from the onnxruntime==1.31.1 wheel), then the folder
//! of the running executable (for deployments that ship the library beside the service).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

use crate::error::RuntimeError;

/// The library file name the install script produces.
pub const LIBRARY_NAME: &str = "libonnxruntime.so.1.31.1";

static ENVIRONMENT: OnceLock<Result<Environment, LoadError>> = OnceLock::new();

/// Candidate library paths, in the order they are tried. An explicit path is the only candidate.
pub fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        out.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::var_os("HERD_CACHE_DIR") {
        out.push(PathBuf::from(dir).join("onnxruntime").join(LIBRARY_NAME));
    }
    // The checkout this runtime was built from (development and CI).
    out.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../.cache/onnxruntime")
            .join(LIBRARY_NAME),
    );
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        out.push(dir.join(LIBRARY_NAME));
    }
    out
}

/// The process-wide ONNX Runtime environment, loading the library on first use.
pub fn environment(explicit: Option<&Path>) -> Result<&'static Environment, RuntimeError> {
    let result = ENVIRONMENT.get_or_init(|| {
        let tried = candidates(explicit);
        let Some(path) = tried.iter().find(|p| p.is_file()) else {
            let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
            return Err(LoadError::Missing(list.join(", ")));
        };
        tracing::debug!(library = %path.display(), "loading ONNX Runtime");
        let builder = ort::init_from(path)
            .map_err(|e| LoadError::Failed(format!("{}: {e}", path.display())))?;
        builder
            .with_name("herd")
            .build()
            .map_err(|e| LoadError::Failed(e.to_string()))
    });
    match result {
        Ok(env) => Ok(env),
        Err(LoadError::Missing(tried)) => Err(RuntimeError::OrtMissing {
            tried: tried.clone(),
        }),
        Err(LoadError::Failed(message)) => Err(RuntimeError::OrtInit {
            message: message.clone(),
        }),
    }
}

/// Why the process-wide environment could not be made (kept, as the first attempt's outcome).
#[derive(Debug)]
enum LoadError {
    /// No library at any of these paths.
    Missing(String),
    /// A library was found but did not load or initialise.
    Failed(String),
}
