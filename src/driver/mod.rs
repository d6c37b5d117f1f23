//! The compile driver: import -> passes -> target -> bundle, timing each stage and reporting peak memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use herd_ir::DType;
use herd_passes::pipeline::{run_pipeline, PassOptions, RunOptions};
use herd_runtime::manifest::{
    ElementType, Manifest, ModelInfo, QuantizationInfo, Target, TensorRtInfo, FORMAT_VERSION,
};
use herd_targets::bundle::BundleWriter;
use herd_targets::onnx::{self, MoeLowering, OnnxOptions};

mod awq;
mod decoder;
mod gptq;
mod gptq_files;
mod gptq_windows;
mod spool;
mod tensorrt;

pub use gptq::QuantMethod;

pub use decoder::StageSplit;

/// Files copied from the checkpoint into the bundle when present.
const COPIED_FILES: [&str; 6] = [
    "tokenizer.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Llama 4's stop tokens: `<|end_of_text|>`, `<|eom|>`, `<|eot|>`.
const LLAMA4_STOP_IDS: [i64; 3] = [200001, 200007, 200008];

/// Everything `herd compile` needs.
#[derive(Clone)]
pub struct CompileOptions {
    pub model: PathBuf,
    pub output: PathBuf,
    pub moe: MoeLowering,
    pub dtype: DType,
    pub max_context: usize,
    pub quant: Option<herd_passes::quantize::QuantOptions>,
    /// `Some` for the TensorRT target.
    pub tensorrt: Option<TensorRtOptions>,
    pub force: bool,
    pub run: RunOptions,
    /// Where `--dump-ir-after` writes (stdout when None).
    pub dump_dir: Option<PathBuf>,
    /// How int4/int8 weights are rounded: to nearest, or by GPTQ on calibration activations.
    pub quant_method: QuantMethod,
    /// Token-id prompts for calibration (fp8 activations for TensorRT, GPTQ); a built-in set when None.
    pub calibration_prompts: Option<Vec<Vec<i64>>>,
    /// Decoder layers per GPTQ calibration window: each window's float weights are compiled, run and
    /// deleted in turn, so disk holds one window of the float model at a time.
    pub calibration_window_layers: usize,
    /// Build a calibration bundle exposing these inputs as outputs (internal).
    pub expose_calibration: Option<herd_passes::calibrate::Exposed>,
    /// Compile the vision tower when the checkpoint has one (`--text-only` turns it off).
    pub vision: bool,
    /// Most tiles per image canvas (transformers' `max_patches`); None: preprocessor_config.json's, else 16.
    pub max_tiles: Option<usize>,
    /// Most images per prompt.
    pub max_images: usize,
    /// Pipeline stages of the decoder.
    pub stages: StageSplit,
}

impl CompileOptions {
    /// Defaults of `herd compile MODEL -o OUTPUT`: ONNX target, ort MoE, f32, 8192 positions, no
    /// quantization.
    pub fn new(model: PathBuf, output: PathBuf) -> CompileOptions {
        CompileOptions {
            model,
            output,
            moe: MoeLowering::Ort,
            dtype: DType::F32,
            max_context: 8192,
            quant: None,
            tensorrt: None,
            force: false,
            run: RunOptions::default(),
            dump_dir: None,
            calibration_prompts: None,
            calibration_window_layers: 1,
            expose_calibration: None,
            quant_method: QuantMethod::Rtn,
            vision: true,
            max_tiles: None,
            max_images: 8,
            stages: StageSplit::One,
        }
    }
}

/// Settings of the TensorRT target.
#[derive(Clone, Debug)]
pub struct TensorRtOptions {
    pub max_batch: usize,
    pub max_seq: usize,
    /// Lint rules a violation of which does not fail the compile.
    pub allow_lint: Vec<String>,
}

/// What a compile did.
pub struct CompileReport {
    pub bundle: PathBuf,
    pub stages: Vec<(String, Duration)>,
    pub bytes_written: u64,
    /// Size of the checkpoint's weight files.
    pub checkpoint_bytes: u64,
    pub peak_rss_bytes: Option<u64>,
    pub node_counts:
        std::collections::BTreeMap<Option<usize>, std::collections::BTreeMap<String, usize>>,
    /// Outputs exposed for calibration (calibration bundles only).
    pub calibration_outputs: Vec<String>,
    /// What the user should know about the result (printed by `herd compile`).
    pub warnings: Vec<String>,
    /// Each pipeline stage as planned, with the weight bytes emitted for it (one entry unstaged).
    pub pipeline: Vec<(crate::plan::StagePlan, u64)>,
}

/// Compiles a checkpoint into a bundle. `progress(stage, done, total)` reports weight streaming.
pub fn compile(
    options: &CompileOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CompileReport> {
    if let Some(trt) = &options.tensorrt {
        tensorrt::check_tensorrt(options, trt)?;
    } else if options.dtype == DType::BF16 {
        anyhow::bail!("--dtype bf16 is for --target tensorrt-h100: ONNX Runtime's CPU kernels have no bf16 MatMul or Attention");
    }
    let fp8 = options
        .quant
        .as_ref()
        .is_some_and(|q| q.scheme == herd_ir::quant::QuantScheme::Fp8);
    let calibration = if options.tensorrt.is_some() && fp8 {
        Some(calibrate(options)?)
    } else {
        None
    };
    let mut stages = Vec::new();
    let start = Instant::now();
    let mut imported = import(options)?;
    let pipeline = decoder::stage_plans(options, &imported.config)?;
    stages.push(("import".to_string(), start.elapsed()));
    let activation_pass = activation_pass(options, calibration.as_ref().map(|(s, _)| s));
    run_passes(options, activation_pass, &mut imported.graph, &mut stages)?;
    let gptq_weights = match options.quant_method {
        QuantMethod::Gptq | QuantMethod::Awq => Some(gptq_stage(
            options,
            &imported.config,
            &mut imported.graph,
            &mut stages,
        )?),
        QuantMethod::Rtn => None,
    };
    let activations = calibration.as_ref().map(|(_, prompts)| {
        let n = herd_passes::calibrate::quantized_inputs(&imported.graph);
        format!(
            "fp8 e4m3 per-tensor on the inputs of {n} projections, calibrated on {prompts} prompts; routed and shared experts weight-only fp8"
        )
    });

    let writer = BundleWriter::create(&options.output, options.force, &options.model)?;
    let ranges: Vec<_> = pipeline
        .iter()
        .map(|s| s.first_layer..s.end_layer)
        .collect();
    let (decoder, vision_model) = emit_models(
        options,
        &imported,
        &ranges,
        writer.dir(),
        progress,
        &mut stages,
    )?;
    let (tensorrt, stage_profiles) = match &options.tensorrt {
        Some(trt) => {
            let start = Instant::now();
            let (info, profiles) = tensorrt::tensorrt_stage(
                options,
                trt,
                &imported.config,
                writer.dir(),
                &decoder,
                vision_model.as_ref(),
                imported.preprocessing.as_ref().map(|p| p.max_tiles),
            )?;
            stages.push(("tensorrt lint".to_string(), start.elapsed()));
            (Some(info), Some(profiles))
        }
        None => (None, None),
    };
    let written = Written {
        decoder: &decoder,
        vision_model: vision_model.as_ref(),
        tensorrt,
        stage_profiles,
        activations,
        gptq: gptq_weights.as_ref().map(|(summary, _)| summary),
    };
    let bundle = finish_bundle(options, &imported, writer, written, &mut stages)?;
    let vision_bytes = vision_model
        .as_ref()
        .map_or(0, |v| v.data_bytes + v.model_bytes);
    let pipeline = pipeline
        .into_iter()
        .zip(&decoder.stages)
        .map(|(plan, (_, model))| (plan, model.data_bytes))
        .collect();
    Ok(CompileReport {
        bundle,
        stages,
        bytes_written: decoder.data_bytes() + decoder.model_bytes() + vision_bytes,
        checkpoint_bytes: imported.checkpoint_bytes,
        peak_rss_bytes: peak_rss_bytes(),
        node_counts: decoder.node_counts(),
        calibration_outputs: decoder.calibration_outputs.clone(),
        warnings: gptq_weights
            .as_ref()
            .and_then(|(g, _)| g.warning.clone())
            .into_iter()
            .collect(),
        pipeline,
    })
}

/// What the calibration pass does: expose activations (for a calibration bundle), quantize them with
/// fp8 scales measured on one, or nothing.
fn activation_pass(
    options: &CompileOptions,
    fp8_scales: Option<&std::collections::HashMap<String, f32>>,
) -> herd_passes::calibrate::Activations {
    use herd_passes::calibrate::Activations;
    if let Some(which) = options.expose_calibration {
        Activations::Expose(which)
    } else if let Some(scales) = fp8_scales {
        Activations::Quantize(std::sync::Arc::new(scales.clone()))
    } else {
        Activations::Unchanged
    }
}

/// Emits the decoder (one graph per pipeline stage in `ranges`) and the vision graph into `dir`.
fn emit_models(
    options: &CompileOptions,
    imported: &ImportedModel,
    ranges: &[std::ops::Range<usize>],
    dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
    stages: &mut Vec<(String, Duration)>,
) -> Result<(decoder::EmittedDecoder, Option<onnx::OnnxModel>)> {
    let onnx_options = OnnxOptions {
        dtype: options.dtype,
        moe: options.moe,
    };
    let start = Instant::now();
    let decoder = decoder::emit_decoder(
        &imported.graph,
        ranges,
        imported.config.num_layers,
        dir,
        &onnx_options,
        progress,
    )?;
    stages.push(("emit onnx".to_string(), start.elapsed()));
    let Some(g) = &imported.vision_graph else {
        return Ok((decoder, None));
    };
    let start = Instant::now();
    let g = herd_ir::verified(g, Some("vision import"))
        .map_err(|e| anyhow::anyhow!("herd bug: {e}"))?;
    let vision = onnx::emit_as(g, dir, onnx::ModelNames::vision(), &onnx_options, progress)?;
    stages.push(("emit vision onnx".to_string(), start.elapsed()));
    Ok((decoder, Some(vision)))
}

/// Copies the checkpoint's tokenizer and config files in, writes the manifest and renames the bundle
/// into place.
fn finish_bundle(
    options: &CompileOptions,
    imported: &ImportedModel,
    writer: BundleWriter,
    written: Written<'_>,
    stages: &mut Vec<(String, Duration)>,
) -> Result<PathBuf> {
    let start = Instant::now();
    for name in COPIED_FILES {
        if let Some(src) = herd_ir::model_file(&options.model, name)? {
            writer.copy_in(&src, name)?;
        }
    }
    let mut emitted = written.decoder.files();
    if let Some(v) = written.vision_model {
        emitted.push((v.data_file.clone(), v.data_bytes, v.data_sha256.clone()));
        emitted.push((v.model_file.clone(), v.model_bytes, v.model_sha256.clone()));
    }
    let files = writer.file_entries(&emitted)?;
    let manifest = manifest(options, imported, written, files)?;
    let bundle = writer.finish(&manifest)?;
    stages.push(("write bundle".to_string(), start.elapsed()));
    Ok(bundle)
}

/// The checkpoint read into graphs, with what the manifest needs of it.
struct ImportedModel {
    graph: herd_ir::Graph,
    vision_graph: Option<herd_ir::Graph>,
    config: herd_ir::Llama4Config,
    preprocessing: Option<crate::vision_manifest::Preprocessing>,
    checkpoint_bytes: u64,
}

/// Imports the decoder (and the vision tower, unless left out).
fn import(options: &CompileOptions) -> Result<ImportedModel> {
    let checkpoint_has_vision = herd_ir::Checkpoint::open(&options.model)?
        .config
        .vision
        .is_some();
    let with_vision =
        options.vision && checkpoint_has_vision && options.expose_calibration.is_none();
    let imported = herd_ir::import_with(&options.model, with_vision)?;
    let config = imported.checkpoint.config.clone();
    let preprocessing = match (&config.vision, with_vision) {
        (Some(v), true) => Some(crate::vision_manifest::preprocessing(
            &options.model,
            v,
            options.max_tiles,
        )?),
        _ => None,
    };
    let vision_graph = if with_vision {
        Some(
            herd_ir::vision::build_vision_graph(&imported.checkpoint)
                .context("the vision encoder cannot be compiled (--text-only leaves it out)")?,
        )
    } else {
        None
    };
    let checkpoint_bytes = imported
        .checkpoint
        .store
        .shards()
        .iter()
        .filter_map(|s| std::fs::metadata(&s.path).ok())
        .map(|m| m.len())
        .sum();
    Ok(ImportedModel {
        graph: imported.graph,
        vision_graph,
        config,
        preprocessing,
        checkpoint_bytes,
    })
}

/// Runs the pass pipeline on `graph` (`activations` for its calibrate pass), writing
/// `--dump-ir-after` dumps and timing each pass.
/// Replaces the quantized int weights by GPTQ's (written next to the output, removed with the
/// returned directory once the bundle is written).
fn gptq_stage(
    options: &CompileOptions,
    config: &herd_ir::Llama4Config,
    graph: &mut herd_ir::Graph,
    stages: &mut Vec<(String, Duration)>,
) -> Result<(gptq::GptqSummary, tempfile::TempDir)> {
    let start = Instant::now();
    let search = options
        .quant
        .as_ref()
        .map(|q| q.search)
        .context("--method gptq needs --quant int4 or int8")?;
    let parent = options
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = tempfile::Builder::new()
        .prefix(".herd-gptq")
        .tempdir_in(parent)
        .with_context(|| {
            format!(
                "{}: cannot create GPTQ's working directory",
                parent.display()
            )
        })?;
    let summary = gptq::apply(graph, options, config, dir.path(), search)?;
    tracing::info!(
        "GPTQ: {} matrices of {} weights on {}; AWQ scaled the inputs of {} norms",
        summary.matrices,
        summary.weights,
        summary.calibration,
        summary.scaled_norms
    );
    herd_ir::verified(graph, Some("gptq")).map_err(|e| anyhow::anyhow!("herd bug: {e}"))?;
    stages.push(("gptq".to_string(), start.elapsed()));
    Ok((summary, dir))
}

fn run_passes(
    options: &CompileOptions,
    activations: herd_passes::calibrate::Activations,
    graph: &mut herd_ir::Graph,
    stages: &mut Vec<(String, Duration)>,
) -> Result<()> {
    let pass_options = PassOptions {
        moe_layout: onnx::expert_layout(options.moe),
        max_positions: options.max_context,
        // fp8 experts stay fp8 on every target: per expert, a per-channel DequantizeLinear -> MatMul
        // (grouped, also under --moe cuda), weight-only (calibration covers the projections).
        quant: options.quant.clone(),
        activations,
    };
    let dump_dir = options.dump_dir.clone();
    let mut dump_error = None;
    let report = run_pipeline(
        graph,
        &pass_options,
        &options.run,
        |pass, text| match &dump_dir {
            Some(dir) => {
                let path = dir.join(format!("{pass}.ir"));
                if let Err(e) =
                    std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&path, text))
                {
                    dump_error = Some(format!("{}: {e}", path.display()));
                }
            }
            None => {
                use std::io::Write as _;
                let mut stdout = std::io::stdout().lock();
                if let Err(e) = write!(stdout, "# IR after {pass}\n{text}") {
                    dump_error = Some(format!("to standard output: {e}"));
                }
            }
        },
    )?;
    if let Some(e) = dump_error {
        anyhow::bail!("cannot write IR dump {e}");
    }
    for (pass, elapsed) in report.timings {
        stages.push((format!("pass {pass}"), elapsed));
    }
    Ok(())
}

/// What the emit stages wrote, for the manifest.
struct Written<'a> {
    decoder: &'a decoder::EmittedDecoder,
    vision_model: Option<&'a onnx::OnnxModel>,
    tensorrt: Option<TensorRtInfo>,
    stage_profiles: Option<Vec<[String; 3]>>,
    activations: Option<String>,
    gptq: Option<&'a gptq::GptqSummary>,
}

/// The manifest's element type for compute dtype `dtype` (the only three the targets emit).
fn element_type(dtype: DType) -> Result<ElementType> {
    Ok(match dtype {
        DType::F32 => ElementType::F32,
        DType::F16 => ElementType::F16,
        DType::BF16 => ElementType::Bf16,
        other => anyhow::bail!("herd bug: {other} is not a compute dtype"),
    })
}

/// The bundle's manifest.
fn manifest(
    options: &CompileOptions,
    imported: &ImportedModel,
    written: Written<'_>,
    files: Vec<herd_runtime::manifest::FileEntry>,
) -> Result<Manifest> {
    let config = &imported.config;
    let decoder = written.decoder;
    let vision = match (
        written.vision_model,
        &config.vision,
        &imported.preprocessing,
    ) {
        (Some(m), Some(v), Some(pre)) => Some(crate::vision_manifest::vision_info(
            &options.model,
            &m.model_file,
            v,
            pre,
            options.max_images,
        )?),
        _ => None,
    };
    let (bos, stop_ids) = special_tokens(&options.model, config.vocab_size)?;
    Ok(Manifest {
        format_version: FORMAT_VERSION,
        herd_version: env!("CARGO_PKG_VERSION").to_string(),
        model: ModelInfo {
            architecture: config.architecture.hf_name().to_string(),
            num_layers: config.num_layers,
            hidden_size: config.hidden_size,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            vocab_size: config.vocab_size,
            max_positions: options.max_context,
            // Unchunked models keep every position in every layer: a chunk as long as the context.
            attention_chunk_size: config.attention_chunk_size.unwrap_or(options.max_context),
            nope_layers: config.nope_layers(),
            weight_bytes: decoder.data_bytes(),
            active_weight_bytes_per_token: decoder.active_weight_bytes(),
            config: serde_json::to_value(config)?,
        },
        graph: decoder.io(),
        dtype: element_type(options.dtype)?,
        moe_lowering: options.moe,
        files,
        stop_token_ids: stop_ids,
        bos_token_id: bos,
        target: if written.tensorrt.is_some() {
            Target::TensorrtH100
        } else {
            Target::Onnx
        },
        stages: decoder.stage_ios(
            imported.config.num_layers,
            written.stage_profiles.as_deref(),
        ),
        layer_window: match &options.stages {
            decoder::StageSplit::Window(w) => Some(w.clone()),
            _ => None,
        },
        tensorrt: written.tensorrt,
        quantization: options.quant.as_ref().map(|q| QuantizationInfo {
            scheme: q.scheme.name(),
            scales: q.scheme.block().map(|_| q.search.name().to_string()),
            method: q
                .scheme
                .block()
                .map(|_| options.quant_method.name().to_string()),
            calibration: written.gptq.map(|g| g.calibration.clone()),
            sqnr_db: match written.gptq {
                // The emitters see GPTQ's codes as the weights; their error is against the float ones.
                Some(g) => decoder
                    .sqnr_db()
                    .into_iter()
                    .chain(g.sqnr_db.clone())
                    .collect(),
                None => decoder.sqnr_db(),
            },
            activations: written.activations,
            accuracy: None,
            rtn_accuracy: None,
            head_kept_accuracy: None,
        }),
        vision,
    })
}

/// Per-tensor activation maxima of the fp8 projections' inputs: compiles a calibration bundle (f32, the
/// same fp8 weights, those inputs exposed as outputs) and prefills every calibration prompt through ONNX
/// Runtime. Returns the maxima by output name and the number of prompts.
fn calibrate(options: &CompileOptions) -> Result<(std::collections::HashMap<String, f32>, usize)> {
    let tmp = tempfile::Builder::new()
        .prefix("herd-calibrate")
        .tempdir()?;
    // The calibration bundle computes in f32 (its CompileOptions default), so its dequantized weights
    // must be f32 too: the target's f16 scales would meet f32 activations in every MatMul.
    let calibration = CompileOptions {
        moe: options.moe,
        max_context: options.max_context,
        quant: options
            .quant
            .clone()
            .map(|q| herd_passes::quantize::QuantOptions {
                scale_dtype: DType::F32,
                ..q
            }),
        expose_calibration: Some(herd_passes::calibrate::Exposed::Fp8Inputs),
        ..CompileOptions::new(options.model.clone(), tmp.path().join("calibration"))
    };
    tracing::info!("calibrating fp8 activations");
    let report = compile(&calibration, &mut |_, _| {})?;
    let model =
        herd_runtime::Model::load(&report.bundle, &herd_runtime::RuntimeOptions::default())?;
    let m = &model.bundle.manifest.model;
    let prompts = match &options.calibration_prompts {
        Some(p) => p.clone(),
        None => crate::eval::prompts(Some(&options.model), m.vocab_size, m.max_positions)?,
    };
    let mut max_abs: std::collections::HashMap<String, f32> = std::collections::HashMap::new();
    for prompt in &prompts {
        for (name, v) in model.probe_max_abs(prompt, &report.calibration_outputs)? {
            let e = max_abs.entry(name).or_insert(0.0);
            *e = e.max(v);
        }
    }
    Ok((max_abs, prompts.len()))
}

/// Reads `--calibrate FILE`: one prompt per line as comma-separated token ids; blank lines and lines
/// starting with `#` are skipped.
pub fn read_calibration_prompts(path: &Path) -> Result<Vec<Vec<i64>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read calibration prompts", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let ids = line
            .split(',')
            .map(|t| t.trim().parse::<i64>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| {
                format!(
                    "{} line {}: expected comma-separated token ids",
                    path.display(),
                    i + 1
                )
            })?;
        prompts.push(ids);
    }
    anyhow::ensure!(!prompts.is_empty(), "{}: no prompts", path.display());
    Ok(prompts)
}

/// BOS and stop ids: from generation_config.json or config.json, else Llama 4's when the vocabulary holds them.
fn special_tokens(model: &Path, vocab: usize) -> Result<(Option<i64>, Vec<i64>)> {
    let read = |name: &str| -> Result<Option<serde_json::Value>> {
        let Some(path) = herd_ir::model_file(model, name)? else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        Ok(Some(serde_json::from_str(&text).with_context(|| {
            format!("{}: invalid JSON", path.display())
        })?))
    };
    let ids = |v: &serde_json::Value| -> Vec<i64> {
        match v {
            serde_json::Value::Number(n) => n.as_i64().into_iter().collect(),
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_i64()).collect(),
            _ => Vec::new(),
        }
    };
    let mut sources = Vec::new();
    if let Some(g) = read("generation_config.json")? {
        sources.push(g);
    }
    if let Some(c) = read("config.json")? {
        if let Some(t) = c.get("text_config") {
            sources.push(t.clone());
        }
        sources.push(c);
    }
    let find = |key: &str| {
        sources
            .iter()
            .find_map(|s| s.get(key).map(ids).filter(|v| !v.is_empty()))
    };
    let stop = find("eos_token_id").unwrap_or_else(|| {
        LLAMA4_STOP_IDS
            .iter()
            .copied()
            .filter(|&i| (i as usize) < vocab)
            .collect()
    });
    let bos = find("bos_token_id").and_then(|v| v.first().copied());
    Ok((bos, stop))
}

/// Peak resident memory of this process (VmHWM), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// Current resident memory of this process (VmRSS), where the OS reports it.
pub fn current_rss_bytes() -> Option<u64> {
    status_kb("VmRSS:").map(|kb| kb * 1024)
}

fn status_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
