//! The compile driver: import -> passes -> target -> bundle, timing each stage and reporting peak memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use herd_ir::DType;
use herd_passes::pipeline::{run_pipeline, PassOptions, RunOptions};
use herd_runtime::manifest::{
    CudaPartition, Manifest, ModelInfo, QuantizationInfo, TensorRtInfo, FORMAT_VERSION,
};
use herd_targets::bundle::BundleWriter;
use herd_targets::onnx::{self, MoeLowering, OnnxOptions};

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
    /// Token-id prompts for activation calibration (fp8 for TensorRT); a built-in set when None.
    pub calibration_prompts: Option<Vec<Vec<i64>>>,
    /// Build a calibration bundle: expose the inputs of fp8 projections as outputs (internal).
    pub expose_calibration: bool,
    /// Compile the vision tower when the checkpoint has one (`--text-only` turns it off).
    pub vision: bool,
    /// Most tiles per image canvas (transformers' `max_patches`); None: preprocessor_config.json's, else 16.
    pub max_tiles: Option<usize>,
    /// Most images per prompt.
    pub max_images: usize,
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
            expose_calibration: false,
            vision: true,
            max_tiles: None,
            max_images: 8,
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

/// Refuses options the TensorRT target cannot honour, before any work is done.
fn check_tensorrt(options: &CompileOptions, trt: &TensorRtOptions) -> Result<()> {
    if options.moe == MoeLowering::Ort {
        anyhow::bail!(
            "--target tensorrt-h100 takes --moe cuda (MoE nodes on the CUDA EP beside TensorRT) or --moe grouped (standard ops only); --moe ort is for ONNX Runtime's CPU kernels"
        );
    }
    if let Some(q) = &options.quant {
        use herd_ir::quant::QuantScheme;
        match q.scheme {
            QuantScheme::Int4 { block: 64 | 128 } => {}
            QuantScheme::Int4 { block } => {
                anyhow::bail!("--quant int4:{block}: TensorRT takes INT4 blocks of 64 or 128; use int4:64 or int4:128")
            }
            QuantScheme::Int8 { .. } => {
                anyhow::bail!("--quant int8: TensorRT takes block quantization for INT4 weights only; use int4:64 or int4:128")
            }
            // fp8 projections get calibrated per-tensor activation Q/DQ (see `calibrate`).
            QuantScheme::Fp8 => {}
        }
    }
    for rule in &trt.allow_lint {
        if !herd_targets::tensorrt::RULES.iter().any(|(r, _)| r == rule) {
            let known: Vec<&str> = herd_targets::tensorrt::RULES
                .iter()
                .map(|(r, _)| *r)
                .collect();
            anyhow::bail!(
                "--allow-lint {rule}: no such rule; rules are {}",
                known.join(", ")
            );
        }
    }
    if trt.max_batch == 0 || trt.max_seq == 0 || trt.max_seq > options.max_context {
        anyhow::bail!(
            "--max-batch and --max-seq must be positive, and --max-seq at most --max-context ({})",
            options.max_context
        );
    }
    Ok(())
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
}

/// Compiles a checkpoint into a bundle. `progress(stage, done, total)` reports weight streaming.
pub fn compile(
    options: &CompileOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CompileReport> {
    if let Some(trt) = &options.tensorrt {
        check_tensorrt(options, trt)?;
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
    let checkpoint_has_vision = herd_ir::Checkpoint::open(&options.model)?
        .config
        .vision
        .is_some();
    let with_vision = options.vision && checkpoint_has_vision && !options.expose_calibration;
    let imported = herd_ir::import_with(&options.model, with_vision)?;
    let mut graph = imported.graph;
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
    stages.push(("import".to_string(), start.elapsed()));

    let pass_options = PassOptions {
        moe_layout: options.moe.layout(),
        max_positions: options.max_context,
        // fp8 experts stay fp8 on every target: per expert, a per-channel DequantizeLinear -> MatMul
        // (grouped, also under --moe cuda), weight-only (calibration covers the projections).
        quant: options.quant.clone(),
    };
    let dump_dir = options.dump_dir.clone();
    let mut dump_error = None;
    let report = run_pipeline(
        &mut graph,
        &pass_options,
        &options.run,
        |pass, text| match &dump_dir {
            Some(dir) => {
                let path = dir.join(format!("{pass}.ir"));
                if let Err(e) = std::fs::write(&path, text) {
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
    let mut calibration_outputs = Vec::new();
    let activations = if options.expose_calibration {
        calibration_outputs = herd_passes::calibrate::expose(&mut graph);
        None
    } else if let Some((scales, prompts)) = &calibration {
        let n = herd_passes::calibrate::quantize_activations(&mut graph, scales)
            .map_err(|d| anyhow::anyhow!("herd bug: {}: {}", d.name, d.message))?;
        herd_ir::verify(&graph, Some("calibrate")).map_err(|e| anyhow::anyhow!("herd bug: {e}"))?;
        Some(format!(
            "fp8 e4m3 per-tensor on the inputs of {n} projections, calibrated on {prompts} prompts; routed and shared experts weight-only fp8"
        ))
    } else {
        None
    };

    let start = Instant::now();
    let writer = BundleWriter::create(&options.output, options.force, &options.model)?;
    let onnx_options = OnnxOptions {
        dtype: options.dtype,
        moe: options.moe,
    };
    let model = onnx::emit(&graph, writer.dir(), &onnx_options, progress)?;
    stages.push(("emit onnx".to_string(), start.elapsed()));
    let vision_model = match &vision_graph {
        Some(g) => {
            let start = Instant::now();
            let m = onnx::emit_as(g, writer.dir(), onnx::VISION, &onnx_options, progress)?;
            stages.push(("emit vision onnx".to_string(), start.elapsed()));
            Some(m)
        }
        None => None,
    };

    let tensorrt = match &options.tensorrt {
        Some(trt) => {
            let start = Instant::now();
            let info = tensorrt_stage(
                options,
                trt,
                &config,
                writer.dir(),
                &model,
                vision_model.as_ref(),
                preprocessing.as_ref().map(|p| p.max_tiles),
            )?;
            stages.push(("tensorrt lint".to_string(), start.elapsed()));
            Some(info)
        }
        None => None,
    };

    let start = Instant::now();
    for name in COPIED_FILES {
        if let Some(src) = herd_ir::model_file(&options.model, name)? {
            writer.copy_in(&src, name)?;
        }
    }
    let mut emitted = vec![
        (
            model.data_file.clone(),
            model.data_bytes,
            model.data_sha256.clone(),
        ),
        (
            model.model_file.clone(),
            model.model_bytes,
            model.model_sha256.clone(),
        ),
    ];
    if let Some(v) = &vision_model {
        emitted.push((v.data_file.clone(), v.data_bytes, v.data_sha256.clone()));
        emitted.push((v.model_file.clone(), v.model_bytes, v.model_sha256.clone()));
    }
    let files = writer.file_entries(&emitted)?;
    let vision = match (&vision_model, &config.vision, &preprocessing) {
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
    let active_bytes = model.active_weight_bytes;
    let manifest = Manifest {
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
            weight_bytes: model.data_bytes,
            active_weight_bytes_per_token: active_bytes,
            config: serde_json::to_value(&config)?,
        },
        graph: model.io.clone(),
        dtype: options.dtype.name().to_string(),
        moe_lowering: options.moe.name().to_string(),
        files,
        stop_token_ids: stop_ids,
        bos_token_id: bos,
        target: if tensorrt.is_some() {
            "tensorrt-h100".into()
        } else {
            "onnx".into()
        },
        tensorrt,
        quantization: options.quant.as_ref().map(|q| QuantizationInfo {
            scheme: q.scheme.name(),
            sqnr_db: model.sqnr_db.clone(),
            activations,
            accuracy: None,
        }),
        vision,
    };
    let bundle = writer.finish(&manifest)?;
    stages.push(("write bundle".to_string(), start.elapsed()));
    let vision_bytes = vision_model
        .as_ref()
        .map_or(0, |v| v.data_bytes + v.model_bytes);
    Ok(CompileReport {
        bundle,
        stages,
        bytes_written: model.data_bytes + model.model_bytes + vision_bytes,
        checkpoint_bytes,
        peak_rss_bytes: peak_rss_bytes(),
        node_counts: model.node_counts,
        calibration_outputs,
    })
}

/// The TensorRT stage of a compile: lints the emitted graphs (the MoE nodes of `--moe cuda` left to the
/// CUDA EP), and returns the manifest's TensorRT section: profiles, requirements, expected partition.
fn tensorrt_stage(
    options: &CompileOptions,
    trt: &TensorRtOptions,
    config: &herd_ir::config::Llama4Config,
    dir: &Path,
    model: &onnx::OnnxModel,
    vision_model: Option<&onnx::OnnxModel>,
    max_tiles: Option<usize>,
) -> Result<TensorRtInfo> {
    let cuda_ep = options.moe == MoeLowering::Cuda;
    let decoder = herd_targets::tensorrt::lint_file_with(&dir.join(&model.model_file), cuda_ep)?;
    let mut violations = decoder.violations;
    if let Some(v) = vision_model {
        violations.extend(herd_targets::tensorrt::lint_file(&dir.join(&v.model_file))?);
    }
    let blocking: Vec<String> = violations
        .iter()
        .filter(|v| !trt.allow_lint.iter().any(|r| r == v.rule))
        .map(|v| v.to_string())
        .collect();
    if !blocking.is_empty() {
        anyhow::bail!(
            "the graph breaks {} TensorRT rule(s) (allow one with --allow-lint RULE):\n  {}",
            blocking.len(),
            blocking.join("\n  ")
        );
    }
    let kv: Vec<(String, Option<usize>)> = model
        .io
        .kv
        .iter()
        .flat_map(|k| [(k.past_key.clone(), k.ring), (k.past_value.clone(), k.ring)])
        .collect();
    let mut p = herd_targets::tensorrt::profiles(
        &kv,
        config.num_kv_heads,
        config.head_dim,
        trt.max_batch,
        trt.max_seq,
        options.max_context,
    );
    let vision_profile_shapes = config
        .vision
        .as_ref()
        .filter(|_| vision_model.is_some())
        .map(|v| {
            // Image feature rows arrive with prompt tokens: none in decode, up to a full call.
            let h = config.hidden_size;
            let rows = |n: usize| {
                format!(
                    ",{}:{n}x{h},{}:{n}",
                    herd_ir::import::IMAGE_FEATURES_INPUT,
                    herd_ir::import::IMAGE_POSITIONS_INPUT
                )
            };
            p.min.push_str(&rows(0));
            p.opt.push_str(&rows(0));
            p.max.push_str(&rows(trt.max_batch * trt.max_seq));
            let tiles = |n: usize| {
                format!(
                    "{}:{n}x{}x{t}x{t}",
                    herd_ir::vision::PIXEL_VALUES,
                    v.num_channels,
                    t = v.image_size
                )
            };
            let per_image = max_tiles.unwrap_or(16) + 1;
            [
                tiles(1),
                tiles(per_image),
                tiles(per_image * options.max_images),
            ]
        });
    let part = decoder.partition;
    Ok(TensorRtInfo {
        profile_min_shapes: p.min,
        profile_opt_shapes: p.opt,
        profile_max_shapes: p.max,
        min_tensorrt: "10.15".into(),
        compute_capability: herd_targets::tensorrt::H100_COMPUTE_CAPABILITY.into(),
        strongly_typed: options.quant.is_some(),
        allowed_lint: trt.allow_lint.clone(),
        vision_profile_shapes,
        engine: None,
        cuda_partition: cuda_ep.then_some(CudaPartition {
            tensorrt_subgraphs: part.tensorrt_subgraphs,
            tensorrt_nodes: part.tensorrt_nodes,
            cuda_nodes: part.cuda_nodes,
            boundary_tensors: part.boundary_tensors,
        }),
    })
}

/// Per-tensor activation maxima of the fp8 projections' inputs: compiles a calibration bundle (f32, the
/// same fp8 weights, those inputs exposed as outputs) and prefills every calibration prompt through ONNX
/// Runtime. Returns the maxima by output name and the number of prompts.
fn calibrate(options: &CompileOptions) -> Result<(std::collections::HashMap<String, f32>, usize)> {
    let tmp = tempfile::Builder::new()
        .prefix("herd-calibrate")
        .tempdir()?;
    let calibration = CompileOptions {
        moe: options.moe,
        max_context: options.max_context,
        quant: options.quant.clone(),
        expose_calibration: true,
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
