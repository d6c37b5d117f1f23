//! A loaded bundle and generation: prefill the prompt, then decode token by token, feeding each step's
//! `present_*` tensors back as the next step's `past_*` (the KV cache stays inside ONNX Runtime values,
//! never copied through Rust).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};

use crate::bundle::Bundle;
use crate::error::RuntimeError;
use crate::manifest::ElementType;
use crate::sampling::Sampling;

/// How a bundle is loaded.
#[derive(Clone, Debug, Default)]
pub struct RuntimeOptions {
    /// Path of libonnxruntime; found automatically when None (see [`crate::onnxruntime`]).
    pub ort_library: Option<PathBuf>,
    /// Threads for one operator; ONNX Runtime's default when None.
    pub intra_threads: Option<usize>,
    /// Whether ONNX Runtime repacks MatMul weights at load. None (automatic): yes for int4 bundles, whose
    /// MatMulNBits/QMoE kernels need it (17x faster decode) and whose packed copy is small. No for int8
    /// bundles: ONNX Runtime's prepacked block-wise int8 QMoE quantizes activations to int8 (about 1e-2
    /// of the logit scale here), the unpacked path keeps them in f32. No for float bundles, whose weights
    /// are then held once, mapped from the bundle (repacking them costs a second copy of the dense
    /// weights for about 2x faster batched prefill/decode on CPU).
    pub prepack: Option<bool>,
    /// ONNX Runtime sessions to run graphs in parallel (default 1). Weights are mapped once and shared;
    /// prepacked weights (int4 bundles) are repacked per session.
    pub sessions: usize,
    /// Execution provider (CPU by default; CUDA and TensorRT need the `tensorrt` feature and a GPU).
    pub provider: crate::providers::Provider,
    /// GPU index for CUDA and TensorRT.
    pub device: u32,
    /// Check every file's sha256 before loading (a load checks only sizes and the small files' sums).
    pub verify: bool,
}

/// Refuses a manifest whose facts disagree with the graph it names (the manifest is checksummed only
/// as a small file, so a hand edit shows up here, not as a raw ONNX Runtime shape error mid-run): every
/// KV input the manifest lists exists, with its fixed kv_heads and head_dim.
fn check_graph_inputs(bundle: &Bundle, inputs: &[ort::value::Outlet]) -> Result<(), RuntimeError> {
    let m = &bundle.manifest;
    let tampered = |message: String| RuntimeError::Tampered {
        path: bundle
            .dir
            .join(crate::manifest::MANIFEST_FILE)
            .display()
            .to_string(),
        message,
    };
    let expected = [m.model.num_kv_heads as i64, m.model.head_dim as i64];
    for name in m
        .graph
        .kv
        .iter()
        .flat_map(|kv| [&kv.past_key, &kv.past_value])
    {
        let input = inputs
            .iter()
            .find(|i| i.name() == name.as_str())
            .ok_or_else(|| tampered(format!("the graph has no input `{name}`")))?;
        if let ort::value::ValueType::Tensor { shape, .. } = input.dtype() {
            let found = [shape.get(1).copied(), shape.get(3).copied()];
            if shape.len() != 4 || found != expected.map(Some) {
                return Err(tampered(format!(
                    "input `{name}` has shape {:?}, but the manifest says {} kv heads of {}",
                    &shape[..],
                    m.model.num_kv_heads,
                    m.model.head_dim
                )));
            }
        }
    }
    Ok(())
}

/// The most ONNX Runtime sessions one model runs (each has its own thread pools).
pub const MAX_SESSIONS: usize = 64;

/// Where the TensorRT EP keeps engine and timing caches for a bundle without a prebuilt engine.
fn trt_cache_dir(bundle: &Bundle) -> std::path::PathBuf {
    let base = std::env::var_os("HERD_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/herd"))
        })
        .unwrap_or_else(std::env::temp_dir);
    let id = bundle
        .manifest
        .files
        .iter()
        .find(|f| f.path == bundle.manifest.graph.model_file)
        .and_then(|f| f.sha256.get(..16))
        .unwrap_or("bundle");
    base.join("tensorrt").join(id)
}

impl RuntimeOptions {
    /// Whether `bundle` is loaded with prepacking (see [`RuntimeOptions::prepack`]).
    pub fn prepack_for(&self, bundle: &Bundle) -> bool {
        let int4 = bundle
            .manifest
            .quantization
            .as_ref()
            .is_some_and(|q| q.scheme.starts_with("int4"));
        self.prepack.unwrap_or(int4)
    }
}

/// What one call to [`Model::generate`] does.
#[derive(Clone, Debug, Default)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Token ids that end generation; the bundle's stop ids when None.
    pub stop_ids: Option<Vec<i64>>,
    /// Texts that end generation (checked on the decoded output; needs a tokenizer).
    pub stop_strings: Vec<String>,
    /// Keep the logits of every step (row i produced token i).
    pub return_logits: bool,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    MaxTokens,
    StopToken,
    StopString,
    Cancelled,
}

/// The result of one generation.
#[derive(Clone, Debug)]
pub struct Generation {
    pub tokens: Vec<i64>,
    /// Per generated token, the logits it was chosen from (empty unless requested).
    pub step_logits: Vec<Vec<f32>>,
    pub prefill: Duration,
    pub decode: Duration,
    pub stop: StopReason,
}

/// The KV cache between steps: each `past_*` input name with the value to feed it.
pub(crate) type Cache = Vec<(String, DynValue)>;

/// The token ids of one decoder call: `batch` rows of equal length at positions `start..`.
struct Tokens<'a> {
    ids: &'a [i64],
    batch: usize,
    start: usize,
}

/// Image feature rows for one decoder call and the flat token indices (`batch * seq`) they replace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageRows {
    pub positions: Vec<i64>,
    /// [positions.len(), hidden] row-major.
    pub features: Vec<f32>,
}

/// A loaded bundle with its ONNX Runtime session.
pub struct Model {
    pub bundle: Bundle,
    /// ONNX Runtime sessions over the same mapped weights; each graph run takes a free one.
    sessions: Vec<Mutex<Session>>,
    next: std::sync::atomic::AtomicUsize,
    text: Option<crate::text::TextCodec>,
    /// The vision graph's session, for bundles that take images.
    vision: Option<Mutex<Session>>,
}

impl Model {
    /// Opens and checks `dir`, then creates the ONNX Runtime session.
    pub fn load(dir: &Path, options: &RuntimeOptions) -> Result<Model, RuntimeError> {
        if options.sessions > MAX_SESSIONS {
            return Err(RuntimeError::Param(format!(
                "sessions {} is more than {MAX_SESSIONS}: each holds its own ONNX Runtime threads",
                options.sessions
            )));
        }
        let bundle = Bundle::open(dir)?;
        if options.provider == crate::providers::Provider::Cpu
            && element_type(&bundle.manifest) == ElementType::Bf16
        {
            return Err(RuntimeError::Param(
                "bf16 bundles run on the GPU providers (--ep cuda or tensorrt): ONNX Runtime's CPU kernels have no bf16 MatMul or Attention; compile with --dtype f16 or f32 to run on the CPU".into(),
            ));
        }
        if options.verify {
            bundle.verify_all()?;
        }
        let env = crate::onnxruntime::environment(options.ort_library.as_deref())?;
        let mut builder = Session::builder(env)?
            .with_optimization_level(GraphOptimizationLevel::Level3)?
            // Keep fp32 activations if a quantized MatMulNBits is formed (its default quantizes them).
            .with_config_entry("session.qdq_matmulnbits_accuracy_level", "0")?
            .with_config_entry(
                "session.disable_prepacking",
                if options.prepack_for(&bundle) {
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
        let mut model_file = bundle.manifest.graph.model_file.clone();
        if options.provider == crate::providers::Provider::TensorRt {
            if let Some(engine) = bundle
                .manifest
                .tensorrt
                .as_ref()
                .and_then(|t| t.engine.as_ref())
            {
                let gpu = crate::providers::gpu_info(options.device)?;
                crate::providers::check_engine(engine, &gpu, crate::providers::tensorrt_major())?;
                model_file = engine.model_file.clone();
            }
        }
        let cache_dir = trt_cache_dir(&bundle);
        builder = crate::providers::register(
            builder,
            options.provider,
            &bundle.manifest,
            crate::providers::GraphKind::Decoder,
            options.device,
            &cache_dir,
        )?;
        let model_path = bundle.file(&model_file);
        let sessions = (0..options.sessions.max(1))
            .map(|_| {
                builder
                    .commit_from_file(&model_path)
                    .map(Mutex::new)
                    .map_err(|e| RuntimeError::Ort(format!("{}: {e}", model_path.display())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(first) = sessions.first() {
            let session = first
                .lock()
                .map_err(|_| RuntimeError::Ort("session lock poisoned".into()))?;
            check_graph_inputs(&bundle, session.inputs())?;
        }
        let vision = match &bundle.manifest.vision {
            Some(v) => {
                // Float weights, mapped once like a float decoder's unless prepacking is asked for.
                let prepack = options.prepack.unwrap_or(false);
                let mut builder = Session::builder(env)?
                    .with_optimization_level(GraphOptimizationLevel::Level3)?
                    .with_config_entry(
                        "session.disable_prepacking",
                        if prepack { "0" } else { "1" },
                    )?;
                if let Some(n) = options.intra_threads {
                    builder = builder.with_intra_threads(n)?;
                }
                // With TensorRT: the vision engine `herd build-engine` made, else one built from
                // the vision profile on first use (cached in the bundle's trt_cache).
                builder = crate::providers::register(
                    builder,
                    options.provider,
                    &bundle.manifest,
                    crate::providers::GraphKind::Vision,
                    options.device,
                    &cache_dir,
                )?;
                let engine = bundle
                    .manifest
                    .tensorrt
                    .as_ref()
                    .and_then(|t| t.engine.as_ref())
                    .and_then(|e| e.vision_model_file.clone())
                    .filter(|_| options.provider == crate::providers::Provider::TensorRt);
                let path = bundle.file(engine.as_ref().unwrap_or(&v.model_file));
                Some(Mutex::new(builder.commit_from_file(&path).map_err(
                    |e| RuntimeError::Ort(format!("{}: {e}", path.display())),
                )?))
            }
            None => None,
        };
        let text = if bundle.dir.join("tokenizer.json").is_file() {
            Some(crate::text::TextCodec::load(&bundle.dir)?)
        } else {
            None
        };
        Ok(Model {
            bundle,
            sessions,
            next: std::sync::atomic::AtomicUsize::new(0),
            text,
            vision,
        })
    }

    /// Runs the vision graph on preprocessed images and returns their feature rows in order,
    /// [sum of tiles x tokens_per_tile, hidden] row-major. One graph run per image bounds memory.
    pub fn encode_images(
        &self,
        images: &[crate::vision::ImageTiles],
    ) -> Result<Vec<f32>, RuntimeError> {
        let m = &self.bundle.manifest;
        let (Some(info), Some(session)) = (&m.vision, &self.vision) else {
            return Err(RuntimeError::Param(
                "this bundle takes no images (it was compiled without a vision encoder)".into(),
            ));
        };
        let mut session = session
            .lock()
            .map_err(|_| RuntimeError::Ort("vision session lock poisoned".into()))?;
        let side = info.tile_size;
        let mut features = Vec::new();
        for image in images {
            let shape = vec![image.tiles, info.num_channels, side, side];
            if image.pixels.len() != shape.iter().product::<usize>() {
                return Err(RuntimeError::Param(format!(
                    "{} pixel values for {} tiles of {}x{side}x{side}",
                    image.pixels.len(),
                    image.tiles,
                    info.num_channels
                )));
            }
            let pixels = float_input(&m.dtype, shape, &image.pixels)?;
            let outputs = session.run(vec![(Cow::from(info.pixel_values.as_str()), pixels)])?;
            let out = outputs
                .get(&info.image_features)
                .ok_or_else(|| RuntimeError::Ort("no image_features output".into()))?;
            let expected = image.tiles * info.tokens_per_tile * m.model.hidden_size;
            let rows: Vec<f32> = match element_type(m) {
                ElementType::F16 => out
                    .try_extract_tensor::<half::f16>()?
                    .1
                    .iter()
                    .map(|v| v.to_f32())
                    .collect(),
                ElementType::Bf16 => out
                    .try_extract_tensor::<half::bf16>()?
                    .1
                    .iter()
                    .map(|v| v.to_f32())
                    .collect(),
                ElementType::F32 => out.try_extract_tensor::<f32>()?.1.to_vec(),
            };
            if rows.len() != expected {
                return Err(RuntimeError::Ort(format!(
                    "the vision graph returned {} values for {} tiles, expected {expected}",
                    rows.len(),
                    image.tiles
                )));
            }
            features.extend(rows);
        }
        Ok(features)
    }

    pub(crate) fn empty_cache(&self, batch: usize) -> Result<Cache, RuntimeError> {
        let m = &self.bundle.manifest;
        let shape = [batch, m.model.num_kv_heads, 0, m.model.head_dim];
        let mut out = Vec::new();
        for kv in &m.graph.kv {
            for name in [&kv.past_key, &kv.past_value] {
                let value = match element_type(m) {
                    ElementType::F16 => {
                        Tensor::<half::f16>::from_array((shape, Vec::<half::f16>::new()))?
                            .into_dyn()
                    }
                    ElementType::Bf16 => {
                        Tensor::<half::bf16>::from_array((shape, Vec::<half::bf16>::new()))?
                            .into_dyn()
                    }
                    ElementType::F32 => {
                        Tensor::<f32>::from_array((shape, Vec::<f32>::new()))?.into_dyn()
                    }
                };
                out.push((name.clone(), value));
            }
        }
        Ok(out)
    }

    /// Runs one step on `ids` at positions `start..`, consuming the cache and returning the new one with
    /// the logits of the last position.
    pub(crate) fn step(
        &self,
        ids: &[i64],
        start: usize,
        cache: Cache,
        images: Option<&ImageRows>,
    ) -> Result<(Vec<f32>, Cache), RuntimeError> {
        let tokens = Tokens {
            ids,
            batch: 1,
            start,
        };
        self.run_step_with(tokens, cache, false, images, &mut |_| Ok(()))
    }

    /// Runs one step on `ids` ([batch, n] row-major) at positions `start..start + n` for every row,
    /// consuming the cache; returns the logits of each row's last position ([batch, vocab]) and the new
    /// cache.
    fn step_batch(
        &self,
        ids: &[i64],
        batch: usize,
        start: usize,
        cache: Cache,
    ) -> Result<(Vec<f32>, Cache), RuntimeError> {
        self.run_step(ids, batch, start, cache, false)
    }

    /// Logits of every position of `ids` (one sequence from position 0, no cache kept): [n * vocab].
    pub fn prompt_logits(&self, ids: &[i64]) -> Result<Vec<f32>, RuntimeError> {
        let max = self.bundle.manifest.model.max_positions;
        if ids.len() > max {
            return Err(RuntimeError::TooLong {
                len: ids.len(),
                max,
            });
        }
        Ok(self.run_step(ids, 1, 0, self.empty_cache(1)?, true)?.0)
    }

    /// [`Model::prompt_logits`] of an image prompt: `features` ([`Model::encode_images`]) replace the
    /// `<|patch|>` tokens of `ids` in order.
    pub fn prompt_logits_with_images(
        &self,
        ids: &[i64],
        features: &[f32],
    ) -> Result<Vec<f32>, RuntimeError> {
        let m = &self.bundle.manifest;
        let info = m
            .vision
            .as_ref()
            .ok_or_else(|| RuntimeError::Param("this bundle takes no images".into()))?;
        if ids.len() > m.model.max_positions {
            return Err(RuntimeError::TooLong {
                len: ids.len(),
                max: m.model.max_positions,
            });
        }
        let rows = ImageRows {
            positions: (0..ids.len() as i64)
                .filter(|&i| ids[i as usize] == info.tokens.patch)
                .collect(),
            features: features.to_vec(),
        };
        let cache = self.empty_cache(1)?;
        Ok(self
            .run_step_with(
                Tokens {
                    ids,
                    batch: 1,
                    start: 0,
                },
                cache,
                true,
                Some(&rows),
                &mut |_| Ok(()),
            )?
            .0)
    }

    /// One graph run; returns the logits of each row's last position, or of all positions when
    /// `all_rows`, with the new cache.
    fn run_step(
        &self,
        ids: &[i64],
        batch: usize,
        start: usize,
        cache: Cache,
        all_rows: bool,
    ) -> Result<(Vec<f32>, Cache), RuntimeError> {
        let tokens = Tokens { ids, batch, start };
        self.run_step_with(tokens, cache, all_rows, None, &mut |_| Ok(()))
    }

    /// Prefills `ids` and returns the largest magnitude of each named extra graph output (activation
    /// calibration reads the inputs of quantized projections this way).
    pub fn probe_max_abs(
        &self,
        ids: &[i64],
        names: &[String],
    ) -> Result<HashMap<String, f32>, RuntimeError> {
        let mut found = HashMap::new();
        self.run_step_with(
            Tokens {
                ids,
                batch: 1,
                start: 0,
            },
            self.empty_cache(1)?,
            false,
            None,
            &mut |outputs| {
                for name in names {
                    let value = outputs
                        .get(name)
                        .ok_or_else(|| RuntimeError::Ort(format!("no {name} output")))?;
                    let (_, data) = value.try_extract_tensor::<f32>()?;
                    found.insert(name.clone(), data.iter().fold(0f32, |m, v| m.max(v.abs())));
                }
                Ok(())
            },
        )?;
        Ok(found)
    }

    /// [`Model::run_step`] that also shows the raw outputs to `inspect` before taking the cache.
    fn run_step_with(
        &self,
        tokens: Tokens<'_>,
        cache: Cache,
        all_rows: bool,
        images: Option<&ImageRows>,
        inspect: &mut dyn FnMut(&ort::session::SessionOutputs) -> Result<(), RuntimeError>,
    ) -> Result<(Vec<f32>, Cache), RuntimeError> {
        let Tokens { ids, batch, start } = tokens;
        let m = &self.bundle.manifest;
        let n = ids.len() / batch.max(1);
        let positions: Vec<i64> = (0..batch)
            .flat_map(|_| start as i64..(start + n) as i64)
            .collect();
        let mut inputs: Vec<(Cow<str>, SessionInputValue)> = vec![
            (
                m.graph.input_ids.clone().into(),
                Tensor::<i64>::from_array(([batch, n], ids.to_vec()))?
                    .into_dyn()
                    .into(),
            ),
            (
                m.graph.position_ids.clone().into(),
                Tensor::<i64>::from_array(([batch, n], positions))?
                    .into_dyn()
                    .into(),
            ),
        ];
        for (name, value) in cache {
            inputs.push((name.into(), value.into()));
        }
        if let Some(v) = &m.vision {
            let empty = ImageRows::default();
            let rows = images.unwrap_or(&empty);
            let h = m.model.hidden_size;
            let f = rows.positions.len();
            if rows.features.len() != f * h {
                return Err(RuntimeError::Param(format!(
                    "{} image feature values for {f} positions of width {h}",
                    rows.features.len()
                )));
            }
            let features = float_input(&m.dtype, vec![f, h], &rows.features)?;
            inputs.push((v.decoder_features.clone().into(), features));
            inputs.push((
                v.decoder_positions.clone().into(),
                Tensor::<i64>::from_array(([f], rows.positions.clone()))?
                    .into_dyn()
                    .into(),
            ));
        } else if images.is_some_and(|r| !r.positions.is_empty()) {
            return Err(RuntimeError::Param(
                "this bundle takes no images (it was compiled without a vision encoder)".into(),
            ));
        }
        // A free ONNX Runtime session if there is one, else wait for the next in turn.
        let mut session = match self.sessions.iter().find_map(|s| s.try_lock().ok()) {
            Some(free) => free,
            None => {
                let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    % self.sessions.len();
                self.sessions[turn]
                    .lock()
                    .map_err(|_| RuntimeError::Ort("session lock poisoned".into()))?
            }
        };
        let mut outputs = session.run(inputs)?;
        let logits = outputs
            .get(&m.graph.logits)
            .ok_or_else(|| RuntimeError::Ort("no logits output".into()))?
            .try_extract_array::<f32>()?;
        let vocab = m.model.vocab_size;
        let all = logits
            .as_slice()
            .ok_or_else(|| RuntimeError::Ort("non-contiguous logits".into()))?;
        if all.len() != batch * n * vocab {
            // The manifest is not checksummed: a vocab_size that disagrees with the graph is a damaged bundle.
            return Err(RuntimeError::Tampered {
                path: self
                    .bundle
                    .dir
                    .join(crate::manifest::MANIFEST_FILE)
                    .display()
                    .to_string(),
                message: format!(
                    "the graph returns {} logits per token, the manifest says vocab_size {vocab}",
                    all.len() / (batch * n).max(1)
                ),
            });
        }
        let last: Vec<f32> = if all_rows {
            all.to_vec()
        } else {
            (0..batch)
                .flat_map(|b| {
                    all[((b + 1) * n - 1) * vocab..(b + 1) * n * vocab]
                        .iter()
                        .copied()
                })
                .collect()
        };
        if let Some(bad) = last.iter().position(|v| !v.is_finite()) {
            let rows_per_batch = if all_rows { n } else { 1 };
            let row = bad / vocab / rows_per_batch;
            let offset = if all_rows { bad / vocab % n } else { n - 1 };
            return Err(RuntimeError::NonFiniteLogits {
                row,
                position: start + offset,
            });
        }
        inspect(&outputs)?;
        let mut next = Vec::new();
        for kv in &m.graph.kv {
            for (past, present) in [
                (&kv.past_key, &kv.present_key),
                (&kv.past_value, &kv.present_value),
            ] {
                let value = outputs
                    .remove(present)
                    .ok_or_else(|| RuntimeError::Ort(format!("no {present} output")))?;
                next.push((past.clone(), value));
            }
        }
        Ok((last, next))
    }

    /// Generates up to `params.max_new_tokens` tokens after `prompt` (token ids); see [`Model::stream`].
    pub fn generate(
        &self,
        prompt: &[i64],
        params: &GenerateParams,
    ) -> Result<Generation, RuntimeError> {
        let mut stream =
            self.stream(crate::generate::Prompt::Ids(prompt.to_vec()), params, None)?;
        let mut out = Generation {
            tokens: Vec::new(),
            step_logits: Vec::new(),
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
            stop: StopReason::MaxTokens,
        };
        let start = Instant::now();
        let mut first = None;
        for event in &mut stream {
            let event = event?;
            first.get_or_insert_with(|| start.elapsed());
            out.tokens.push(event.id);
            if let Some(l) = event.logits {
                out.step_logits.push(l);
            }
        }
        out.prefill = first.unwrap_or_default();
        out.decode = start.elapsed().saturating_sub(out.prefill);
        out.stop = stream.stop_reason().unwrap_or(StopReason::MaxTokens);
        Ok(out)
    }

    /// Streams generated tokens (with their text when the bundle has a tokenizer) after `prompt`;
    /// `cancel`, when set to true from another thread, ends the stream after the current token.
    pub fn stream(
        &self,
        prompt: crate::generate::Prompt,
        params: &GenerateParams,
        cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    ) -> Result<crate::generate::TokenStream<'_>, RuntimeError> {
        crate::generate::TokenStream::new(self, prompt, params.clone(), cancel)
    }

    /// The bundle's tokenizer and chat template, if it has a tokenizer.
    pub fn text(&self) -> Option<&crate::text::TextCodec> {
        self.text.as_ref()
    }

    /// A new conversation with an empty cache.
    pub fn session(&self) -> Result<crate::session::Session<'_>, RuntimeError> {
        crate::session::Session::new(self)
    }

    /// Times a prefill of `prompt_len` tokens in each of `batch` rows, then `steps` decode steps
    /// (benchmarks; token ids are arbitrary). Returns (prefill, decode) durations.
    pub fn time_batch(
        &self,
        batch: usize,
        prompt_len: usize,
        steps: usize,
    ) -> Result<(Duration, Duration), RuntimeError> {
        let m = &self.bundle.manifest;
        if batch == 0 || prompt_len == 0 {
            return Err(RuntimeError::Param(
                "batch and prompt length must be positive".into(),
            ));
        }
        if prompt_len + steps > m.model.max_positions {
            return Err(RuntimeError::TooLong {
                len: prompt_len + steps,
                max: m.model.max_positions,
            });
        }
        let vocab = m.model.vocab_size as i64;
        let ids: Vec<i64> = (0..batch * prompt_len)
            .map(|i| (i as i64 * 7919 + 13) % vocab)
            .collect();
        let start = Instant::now();
        let (_, mut cache) = self.step_batch(&ids, batch, 0, self.empty_cache(batch)?)?;
        let prefill = start.elapsed();
        let start = Instant::now();
        for s in 0..steps {
            let next: Vec<i64> = (0..batch)
                .map(|b| (b as i64 * 31 + s as i64) % vocab)
                .collect();
            cache = self.step_batch(&next, batch, prompt_len + s, cache)?.1;
        }
        Ok((prefill, start.elapsed()))
    }
}

/// A float graph input in the bundle's activation dtype (f16 and bf16 bundles take their own type).
fn float_input(
    dtype: &str,
    shape: Vec<usize>,
    values: &[f32],
) -> Result<SessionInputValue<'static>, RuntimeError> {
    let element = match dtype {
        "f16" => ElementType::F16,
        "bf16" => ElementType::Bf16,
        _ => ElementType::F32,
    };
    Ok(match element {
        ElementType::F16 => Tensor::<half::f16>::from_array((
            shape,
            values
                .iter()
                .map(|&v| half::f16::from_f32(v))
                .collect::<Vec<_>>(),
        ))?
        .into_dyn()
        .into(),
        ElementType::Bf16 => Tensor::<half::bf16>::from_array((
            shape,
            values
                .iter()
                .map(|&v| half::bf16::from_f32(v))
                .collect::<Vec<_>>(),
        ))?
        .into_dyn()
        .into(),
        ElementType::F32 => Tensor::<f32>::from_array((shape, values.to_vec()))?
            .into_dyn()
            .into(),
    })
}

/// The element type of an opened bundle (its dtype was checked when it opened).
pub(crate) fn element_type(m: &crate::manifest::Manifest) -> ElementType {
    m.element_type().unwrap_or(ElementType::F32)
}
