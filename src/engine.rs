//! Building TensorRT engines (`herd build-engine`): a compile step that runs on the serving GPU type,
//! kept out of the runtime library services link. The runtime only loads the engines and refuses one
//! built for another GPU or TensorRT version.

use std::path::Path;

use herd_runtime::error::GpuError;
use herd_runtime::manifest::EngineInfo;
use herd_runtime::providers::gpu_info;
use herd_runtime::RuntimeError;

/// Builds the TensorRT engine of a tensorrt-target bundle on GPU `device`: writes the EPContext model
/// (engine embedded) into the bundle and records the GPU, TensorRT and ONNX Runtime versions in the
/// manifest. Fails, naming what is missing, on a machine without a GPU, TensorRT or a GPU ONNX Runtime.
pub fn build_engine(
    dir: &Path,
    device: u32,
    ort_library: Option<&Path>,
) -> Result<EngineInfo, RuntimeError> {
    let bundle = herd_runtime::Bundle::open(dir)?;
    let Some(trt) = &bundle.manifest.tensorrt else {
        return Err(RuntimeError::Unsupported(format!(
            "{} was compiled for `{}`: compile it with `herd compile --target tensorrt-h100` first",
            dir.display(),
            bundle.manifest.target
        )));
    };
    if !bundle.manifest.stages.is_empty() {
        return Err(RuntimeError::Unsupported(format!(
            "{} holds {} pipeline stages: `herd build-engine` builds single-graph bundles; a staged bundle's engines are built by the TensorRT EP when each stage's session first loads (from the stage's profile) and kept in its engine cache",
            dir.display(),
            bundle.manifest.stages.len()
        )));
    }
    let gpu = gpu_info(device)?;
    if gpu.compute_capability != trt.compute_capability {
        return Err(GpuError::OtherTarget {
            device,
            gpu: gpu.name,
            found: gpu.compute_capability,
            wanted: trt.compute_capability.clone(),
        }
        .into());
    }
    build_on_gpu(&bundle, device, ort_library, gpu)
}

#[cfg(feature = "tensorrt")]
fn build_on_gpu(
    bundle: &herd_runtime::Bundle,
    device: u32,
    ort_library: Option<&Path>,
    gpu: herd_runtime::providers::GpuInfo,
) -> Result<EngineInfo, RuntimeError> {
    use herd_runtime::ort;
    use herd_runtime::providers::{
        register, tensorrt_major, GraphKind, Provider, ENGINE_MODEL_FILE, VISION_ENGINE_MODEL_FILE,
    };
    let env = herd_runtime::onnxruntime::environment(ort_library)?;
    let cache = bundle.dir.join("trt_cache");
    std::fs::create_dir_all(&cache).map_err(|e| RuntimeError::Io {
        path: cache.display().to_string(),
        message: e.to_string(),
    })?;
    let compile = |graph: GraphKind, model: &str, out: &str| -> Result<(), RuntimeError> {
        let builder = ort::session::Session::builder(env)?;
        let builder = register(
            builder,
            Provider::TensorRt,
            &bundle.manifest,
            graph,
            device,
            &cache,
        )?;
        ort::compiler::ModelCompiler::new(builder)?
            .with_model_from_file(bundle.file(model))?
            .with_embed_ep_context()?
            .compile_to_file(bundle.file(out))?;
        Ok(())
    };
    compile(
        GraphKind::Decoder,
        &bundle.manifest.graph.model_file,
        ENGINE_MODEL_FILE,
    )?;
    let vision_model_file = match &bundle.manifest.vision {
        Some(v) => {
            compile(GraphKind::Vision, &v.model_file, VISION_ENGINE_MODEL_FILE)?;
            Some(VISION_ENGINE_MODEL_FILE.to_string())
        }
        None => None,
    };
    let engine = EngineInfo {
        model_file: ENGINE_MODEL_FILE.into(),
        vision_model_file,
        gpu_name: gpu.name,
        compute_capability: gpu.compute_capability,
        tensorrt_version: tensorrt_major().map_or_else(|| "unknown".into(), |m| format!("{m}")),
        onnxruntime_version: ort::info()
            .split(',')
            .find_map(|part| part.trim().strip_prefix("git-branch=rel-"))
            .unwrap_or("unknown")
            .to_string(),
    };
    herd_runtime::bundle::record_engine(&bundle.dir, &engine)?;
    Ok(engine)
}

#[cfg(not(feature = "tensorrt"))]
fn build_on_gpu(
    _: &herd_runtime::Bundle,
    _: u32,
    _: Option<&Path>,
    _: herd_runtime::providers::GpuInfo,
) -> Result<EngineInfo, RuntimeError> {
    Err(GpuError::NotBuilt.into())
}
