//! The decoder's pipeline stages at run time: each stage's graph in its own ONNX Runtime sessions on
//! its own device (a bundle without stages is one stage), checked against the manifest when loaded.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;

use crate::bundle::Bundle;
use crate::error::RuntimeError;
use crate::manifest::StageIo;
use crate::model::RuntimeOptions;
use crate::providers::{GraphKind, Provider};

/// One stage: its names and sessions over the same mapped weights.
pub(crate) struct Stage {
    pub(crate) io: StageIo,
    pub(crate) index: usize,
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
    /// GPU index when the stage runs on CUDA or TensorRT (its KV caches are allocated there).
    pub(crate) device: Option<u32>,
    /// Set by [`crate::Model::take_stage_down`]: every later run of the stage fails.
    pub(crate) down: std::sync::atomic::AtomicBool,
}

impl Stage {
    /// A free session of the stage if there is one, else the next in turn once it is free.
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Session>, RuntimeError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(self.error(RuntimeError::SessionDown));
        }
        match self.sessions.iter().find_map(|s| s.try_lock().ok()) {
            Some(free) => Ok(free),
            None => {
                let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.sessions.len();
                self.sessions[turn]
                    .lock()
                    .map_err(|_| RuntimeError::bug("stage", "session lock poisoned"))
            }
        }
    }

    /// The stage's failure as an error naming it.
    pub(crate) fn error(&self, e: RuntimeError) -> RuntimeError {
        match e {
            RuntimeError::Ort { .. } | RuntimeError::SessionDown => RuntimeError::Stage {
                stage: self.index,
                layers: format!("{}..{}", self.io.first_layer, self.io.end_layer),
                source: Box::new(e),
            },
            other => other,
        }
    }
}

/// The device of each of `stages` stages: `options.devices` names one per stage, or one for all;
/// None on the CPU.
fn stage_devices(
    options: &RuntimeOptions,
    stages: usize,
) -> Result<Vec<Option<u32>>, RuntimeError> {
    if options.provider == Provider::Cpu {
        if !options.devices.is_empty() {
            return Err(RuntimeError::option(
                "devices",
                "--devices names GPUs for --ep cuda or tensorrt; on the CPU every stage runs in this process",
            ));
        }
        return Ok(vec![None; stages]);
    }
    match options.devices.len() {
        0 => Ok(vec![Some(options.device); stages]),
        1 => Ok(vec![Some(options.devices[0]); stages]),
        n if n == stages => Ok(options.devices.iter().map(|&d| Some(d)).collect()),
        n => Err(RuntimeError::option(
            "devices",
            format!("--devices lists {n} GPUs for a bundle of {stages} pipeline stages: list one per stage, or one for all"),
        )),
    }
}

/// The session settings every decoder graph shares (optimisation, prepacking, threads).
fn decoder_builder(
    bundle: &Bundle,
    options: &RuntimeOptions,
    env: &'static ort::environment::Environment,
) -> Result<SessionBuilder, RuntimeError> {
    let mut builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)?
        // Keep fp32 activations in the MatMulNBits ONNX Runtime forms from DQ -> MatMul (its default
        // quantizes them to int8), unless the caller asked for int8 activations.
        .with_config_entry(
            "session.qdq_matmulnbits_accuracy_level",
            if options.int8_activations_for(bundle) {
                "4"
            } else {
                "0"
            },
        )?
        .with_config_entry(
            "session.disable_prepacking",
            if options.prepack_for(bundle) {
                "0"
            } else {
                "1"
            },
        )?;
    if bundle
        .manifest
        .quantization
        .as_ref()
        .is_some_and(|q| q.activations.is_some())
    {
        // ONNX Runtime would fold activation Q/DQ + weight DQ + MatMul into MatMulIntegerToFloat,
        // which takes no fp8 inputs: keep the Q/DQ nodes as they are.
        builder = builder.with_config_entry("session.disable_quant_qdq", "1")?;
    }
    if let Some(n) = options.intra_threads {
        builder = builder.with_intra_threads(n)?;
    }
    if let Some(prefix) = &options.profile {
        builder = builder.with_profiling(prefix)?;
    }
    if !bundle.manifest.stages.is_empty() {
        // Stages share the host's cores: a stage's idle pool must not spin while another works
        // (on 2 cores spinning pools cost a 2-stage scout-mini decode 25% of its speed).
        builder = builder.with_config_entry("session.intra_op.allow_spinning", "0")?;
    }
    Ok(builder)
}

/// Creates every stage's sessions (`options.sessions` each) and checks their inputs.
pub(crate) fn load_stages(
    bundle: &Bundle,
    options: &RuntimeOptions,
    env: &'static ort::environment::Environment,
    cache_dir: &std::path::Path,
) -> Result<Vec<Stage>, RuntimeError> {
    let ios = bundle.manifest.stage_list();
    let staged = !bundle.manifest.stages.is_empty();
    let devices = stage_devices(options, ios.len())?;
    let mut stages = Vec::with_capacity(ios.len());
    for (index, (io, device)) in ios.into_iter().zip(devices).enumerate() {
        let mut model_file = io.model_file.clone();
        if options.provider == Provider::TensorRt && !staged {
            if let Some(engine) = bundle
                .manifest
                .tensorrt
                .as_ref()
                .and_then(|t| t.engine.as_ref())
            {
                let gpu = crate::providers::gpu_info(device.unwrap_or(options.device))?;
                crate::providers::check_engine(engine, &gpu, crate::providers::tensorrt_major())?;
                model_file = engine.model_file.clone();
            }
        }
        let mut builder = crate::providers::register(
            decoder_builder(bundle, options, env)?,
            options.provider,
            &bundle.manifest,
            if staged {
                GraphKind::Stage(index)
            } else {
                GraphKind::Decoder
            },
            device.unwrap_or(options.device),
            cache_dir,
        )?;
        let path = bundle.file(&model_file);
        let sessions = (0..options.sessions.max(1))
            .map(|_| {
                builder
                    .commit_from_file(&path)
                    .map(Mutex::new)
                    .map_err(|e| crate::error::load_error(&path, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let stage = Stage {
            io,
            index,
            sessions,
            next: AtomicUsize::new(0),
            device,
            down: std::sync::atomic::AtomicBool::new(false),
        };
        {
            let session = stage.lock()?;
            check_graph_inputs(bundle, &stage.io, session.inputs())?;
        }
        stages.push(stage);
    }
    Ok(stages)
}

/// Refuses a manifest whose facts disagree with the graph it names (the manifest is checksummed only
/// as a small file, so a hand edit shows up here, not as a raw ONNX Runtime shape error mid-run): every
/// KV input the stage lists exists, with its fixed kv_heads, head_dim and ring length, and so does
/// the residual stream input of a later stage.
fn check_graph_inputs(
    bundle: &Bundle,
    io: &StageIo,
    inputs: &[ort::value::Outlet],
) -> Result<(), RuntimeError> {
    let m = &bundle.manifest;
    let tampered = |message: String| RuntimeError::Tampered {
        path: bundle
            .dir
            .join(crate::manifest::MANIFEST_FILE)
            .display()
            .to_string(),
        message,
    };
    if let Some(hidden) = &io.hidden_in {
        if !inputs.iter().any(|i| i.name() == hidden.as_str()) {
            return Err(tampered(format!(
                "{} has no input `{hidden}`",
                io.model_file
            )));
        }
    }
    let expected = [m.model.num_kv_heads as i64, m.model.head_dim as i64];
    for kv in &io.kv {
        for name in [&kv.past_key, &kv.past_value] {
            let input = inputs
                .iter()
                .find(|i| i.name() == name.as_str())
                .ok_or_else(|| tampered(format!("{} has no input `{name}`", io.model_file)))?;
            let ort::value::ValueType::Tensor { shape, .. } = input.dtype() else {
                continue;
            };
            let found = [shape.get(1).copied(), shape.get(3).copied()];
            if shape.len() != 4 || found != expected.map(Some) {
                return Err(tampered(format!(
                    "input `{name}` has shape {:?}, but the manifest says {} kv heads of {}",
                    &shape[..],
                    m.model.num_kv_heads,
                    m.model.head_dim
                )));
            }
            // A ring's length is fixed in the graph; a full layer's is the session's (-1).
            let length = kv.ring.map_or(-1, |r| r as i64);
            if shape[2] != length {
                return Err(tampered(format!(
                    "input `{name}` holds {} entries, but the manifest says {}",
                    shape[2],
                    if length < 0 {
                        "the context".to_string()
                    } else {
                        length.to_string()
                    }
                )));
            }
        }
    }
    Ok(())
}
