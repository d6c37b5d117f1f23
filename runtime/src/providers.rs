//! Execution providers: CPU (always), CUDA and TensorRT (built with the `tensorrt` feature and run with
//! a GPU build of ONNX Runtime). TensorRT is configured from the bundle manifest's optimisation profiles;
//! an engine built for another GPU type or TensorRT version is refused at load ([`check_engine`]).
//! Engines are built by the compiler (`herd build-engine`), not by this library.

use std::path::Path;
use std::process::Command;
use std::str::FromStr;

use crate::error::{GpuError, RuntimeError};
use crate::manifest::{EngineInfo, Manifest};

/// Where a session runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Provider {
    #[default]
    Cpu,
    Cuda,
    TensorRt,
}

impl FromStr for Provider {
    type Err = RuntimeError;
    fn from_str(s: &str) -> Result<Provider, RuntimeError> {
        match s {
            "cpu" => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda),
            "tensorrt" => Ok(Provider::TensorRt),
            other => Err(RuntimeError::option(
                "execution provider",
                format!("unknown execution provider `{other}`: use cpu, cuda or tensorrt"),
            )),
        }
    }
}

/// File name of the EPContext model (the engine wrapped in ONNX) inside a bundle.
pub const ENGINE_MODEL_FILE: &str = "model.trt.onnx";
/// The vision graph's EPContext model (engine embedded), inside the bundle.
pub const VISION_ENGINE_MODEL_FILE: &str = "vision.trt.onnx";

/// Which of a bundle's graphs a session runs: they have their own TensorRT profiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphKind {
    Decoder,
    /// Pipeline stage k of a staged decoder.
    Stage(usize),
    Vision,
}

/// The TensorRT EP options for one of a bundle's graphs (profiles from the manifest, timing cache in
/// `cache_dir`).
pub fn tensorrt_options(
    manifest: &Manifest,
    graph: GraphKind,
    device: u32,
    cache_dir: &Path,
) -> Result<Vec<(String, String)>, RuntimeError> {
    let trt = manifest.tensorrt.as_ref().ok_or_else(|| {
        RuntimeError::Unsupported("the bundle was not compiled for TensorRT: recompile with `herd compile --target tensorrt-h100`".into())
    })?;
    let [min, opt, max] = match graph {
        GraphKind::Decoder => [
            trt.profile_min_shapes.clone(),
            trt.profile_opt_shapes.clone(),
            trt.profile_max_shapes.clone(),
        ],
        GraphKind::Stage(k) => manifest
            .stages
            .get(k)
            .and_then(|s| s.tensorrt_profile.clone())
            .ok_or_else(|| {
                RuntimeError::Unsupported(format!(
                    "the bundle has no TensorRT profile for stage {k}"
                ))
            })?,
        GraphKind::Vision => trt.vision_profile_shapes.clone().ok_or_else(|| {
            RuntimeError::Unsupported("the bundle has no vision profile: it takes no images".into())
        })?,
    };
    let cache = cache_dir.display().to_string();
    Ok(vec![
        ("device_id".into(), device.to_string()),
        ("trt_profile_min_shapes".into(), min),
        ("trt_profile_opt_shapes".into(), opt),
        ("trt_profile_max_shapes".into(), max),
        // Strongly typed: precision comes from the graph's types and Q/DQ, never from builder flags.
        ("trt_fp16_enable".into(), "0".into()),
        ("trt_int8_enable".into(), "0".into()),
        ("trt_engine_cache_enable".into(), "1".into()),
        ("trt_engine_cache_path".into(), cache.clone()),
        ("trt_timing_cache_enable".into(), "1".into()),
        ("trt_timing_cache_path".into(), cache),
    ])
}

/// A GPU as `nvidia-smi` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub name: String,
    pub compute_capability: String,
}

/// The name and compute capability of GPU `device`, or why there is none.
pub fn gpu_info(device: u32) -> Result<GpuInfo, RuntimeError> {
    let missing = |why: String| RuntimeError::Gpu(GpuError::NoDevice { device, why });
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,compute_cap",
            "--format=csv,noheader",
            "-i",
            &device.to_string(),
        ])
        .output()
        .map_err(|e| missing(format!("nvidia-smi: {e}")))?;
    if !out.status.success() {
        return Err(missing(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (name, cc) = text
        .trim()
        .rsplit_once(',')
        .ok_or_else(|| missing(format!("unexpected nvidia-smi output `{}`", text.trim())))?;
    Ok(GpuInfo {
        name: name.trim().to_string(),
        compute_capability: cc.trim().to_string(),
    })
}

/// The major version of the TensorRT library the dynamic loader finds (libnvinfer.so.N).
pub fn tensorrt_major() -> Option<u32> {
    let out = Command::new("ldconfig").arg("-p").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("libnvinfer.so.")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
}

/// Refuses an engine built for another GPU architecture or TensorRT major version.
pub fn check_engine(
    engine: &EngineInfo,
    gpu: &GpuInfo,
    tensorrt_major: Option<u32>,
) -> Result<(), RuntimeError> {
    if engine.compute_capability != gpu.compute_capability {
        return Err(GpuError::EngineForOtherGpu {
            built: engine.compute_capability.clone(),
            built_gpu: engine.gpu_name.clone(),
            found: gpu.compute_capability.clone(),
            found_gpu: gpu.name.clone(),
        }
        .into());
    }
    let built_major = engine
        .tensorrt_version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    if let (Some(built), Some(found)) = (built_major, tensorrt_major) {
        if built != found {
            return Err(GpuError::EngineForOtherTensorRt {
                built: engine.tensorrt_version.clone(),
                found,
            }
            .into());
        }
    }
    Ok(())
}

/// Adds `provider` to a session builder for `graph` of the bundle described by `manifest` (TensorRT:
/// its profiles, engine and timing caches in `cache_dir`).
#[cfg(feature = "tensorrt")]
pub fn register(
    builder: ort::session::builder::SessionBuilder,
    provider: Provider,
    manifest: &Manifest,
    graph: GraphKind,
    device: u32,
    cache_dir: &Path,
) -> Result<ort::session::builder::SessionBuilder, RuntimeError> {
    use ort::ep::{ArbitrarilyConfigurableExecutionProvider, ExecutionProvider};
    let unavailable = |provider: &'static str| RuntimeError::Gpu(GpuError::NoProvider { provider });
    let cuda = ort::ep::CUDA::default().with_device_id(device as i32);
    match provider {
        Provider::Cpu => Ok(builder),
        Provider::Cuda => {
            if !ort::ep::CUDA::is_available()? {
                return Err(unavailable("CUDA"));
            }
            Ok(builder.with_execution_providers([cuda.build().error_on_failure()])?)
        }
        Provider::TensorRt => {
            if !ort::ep::TensorRT::is_available()? {
                return Err(unavailable("TensorRT"));
            }
            let mut trt = ort::ep::TensorRT::default();
            for (k, v) in tensorrt_options(manifest, graph, device, cache_dir)? {
                trt = trt.with_arbitrary_config(k, v);
            }
            // `--moe cuda` bundles leave their MoE nodes to the CUDA EP: without it they would fall back
            // to the CPU, so it must register.
            let cuda = if manifest
                .tensorrt
                .as_ref()
                .is_some_and(|t| t.cuda_partition.is_some())
            {
                cuda.build().error_on_failure()
            } else {
                cuda.build()
            };
            Ok(builder.with_execution_providers([trt.build().error_on_failure(), cuda])?)
        }
    }
}

/// Adds `provider` to a session builder; without the `tensorrt` feature only the CPU is there.
#[cfg(not(feature = "tensorrt"))]
pub fn register(
    builder: ort::session::builder::SessionBuilder,
    provider: Provider,
    _manifest: &Manifest,
    _graph: GraphKind,
    _device: u32,
    _cache_dir: &Path,
) -> Result<ort::session::builder::SessionBuilder, RuntimeError> {
    match provider {
        Provider::Cpu => Ok(builder),
        Provider::Cuda | Provider::TensorRt => Err(GpuError::NotBuilt.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_are_refused_on_other_gpus_and_tensorrt_versions() {
        let engine = EngineInfo {
            model_file: ENGINE_MODEL_FILE.into(),
            vision_model_file: None,
            gpu_name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: "9.0".into(),
            tensorrt_version: "10".into(),
            onnxruntime_version: "1.31".into(),
        };
        let h100 = GpuInfo {
            name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: "9.0".into(),
        };
        let a100 = GpuInfo {
            name: "NVIDIA A100".into(),
            compute_capability: "8.0".into(),
        };
        assert!(check_engine(&engine, &h100, Some(10)).is_ok());
        assert!(check_engine(&engine, &a100, Some(10))
            .unwrap_err()
            .to_string()
            .contains("built for compute capability 9.0"));
        assert!(check_engine(&engine, &h100, Some(11))
            .unwrap_err()
            .to_string()
            .contains("TensorRT 11"));
    }

    #[test]
    fn provider_names() {
        assert_eq!("tensorrt".parse::<Provider>().unwrap(), Provider::TensorRt);
        assert!("vulkan"
            .parse::<Provider>()
            .unwrap_err()
            .to_string()
            .contains("cpu, cuda or tensorrt"));
    }
}

#[cfg(test)]
mod option_tests {
    use super::*;
    use crate::manifest::TensorRtInfo;

    #[test]
    fn tensorrt_options_come_from_the_manifest() {
        let text = include_str!("../tests/data/tensorrt-manifest.json");
        let mut manifest: Manifest = serde_json::from_str(text).expect("test manifest");
        let opts = tensorrt_options(&manifest, GraphKind::Decoder, 1, Path::new("/cache")).unwrap();
        let get = |k: &str| {
            opts.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("device_id"), Some("1"));
        assert_eq!(
            get("trt_profile_min_shapes"),
            Some("input_ids:1x1,position_ids:1x1,logits_index:1x1,past_key.0:1x1x8x16,past_value.0:1x1x8x16")
        );
        assert_eq!(
            get("trt_profile_max_shapes"),
            Some("input_ids:2x64,position_ids:2x64,logits_index:2x64,past_key.0:2x1x8x16,past_value.0:2x1x8x16")
        );
        assert_eq!(
            get("trt_fp16_enable"),
            Some("0"),
            "strongly typed: no precision flags"
        );
        assert_eq!(get("trt_timing_cache_path"), Some("/cache"));
        let _: Option<&TensorRtInfo> = manifest.tensorrt.as_ref();
        assert!(
            tensorrt_options(&manifest, GraphKind::Vision, 0, Path::new("/c"))
                .unwrap_err()
                .to_string()
                .contains("takes no images")
        );
        manifest.tensorrt.as_mut().unwrap().vision_profile_shapes = Some([
            "pixel_values:1x3x336x336".into(),
            "pixel_values:17x3x336x336".into(),
            "pixel_values:136x3x336x336".into(),
        ]);
        let vision = tensorrt_options(&manifest, GraphKind::Vision, 0, Path::new("/c")).unwrap();
        assert!(vision.contains(&(
            "trt_profile_max_shapes".to_string(),
            "pixel_values:136x3x336x336".to_string()
        )));
        // A pipeline stage's session takes that stage's profile.
        assert!(
            tensorrt_options(&manifest, GraphKind::Stage(1), 0, Path::new("/c"))
                .unwrap_err()
                .to_string()
                .contains("no TensorRT profile for stage 1")
        );
        let mut stage = manifest.stage_list().remove(0);
        stage.tensorrt_profile = Some(["a:1".into(), "a:2".into(), "hidden_in:2x64x64".into()]);
        manifest.stages = vec![stage.clone(), stage];
        let staged = tensorrt_options(&manifest, GraphKind::Stage(1), 3, Path::new("/c")).unwrap();
        assert!(staged.contains(&(
            "trt_profile_max_shapes".to_string(),
            "hidden_in:2x64x64".to_string()
        )));
        assert!(staged.contains(&("device_id".to_string(), "3".to_string())));
        manifest.tensorrt = None;
        assert!(
            tensorrt_options(&manifest, GraphKind::Decoder, 0, Path::new("/c"))
                .unwrap_err()
                .to_string()
                .contains("--target tensorrt-h100")
        );
    }
}
