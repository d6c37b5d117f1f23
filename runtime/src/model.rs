//! A loaded bundle and generation: prefill the prompt, then decode token by token. The KV cache lives in
//! buffers allocated once per session on the sessions' device and written in place by the graph
//! (`cache.rs`, `decode.rs`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue, SessionOutputs};
use ort::value::{DynValue, Tensor};

use crate::bundle::Bundle;
use crate::cache::KvCache;
use crate::decode::{Feed, RowInput};
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
    /// GPU of each pipeline stage (one per stage, or one for all); empty: `device` for all.
    pub devices: Vec<u32>,
    /// GPU of the vision graph; None: the first stage's.
    pub vision_device: Option<u32>,
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
    /// Positions each session's KV cache holds (allocated when the session starts); the bundle's
    /// --max-context when None.
    pub context: Option<usize>,
    /// Let ONNX Runtime quantize the activations of int4/int8 MatMuls (MatMulNBits,
    /// `accuracy_level` 4) and prepacked QMoE experts to int8 on the fly, as llama.cpp's Q4_0/Q8_0
    /// dot products do: int8 weights then run on MLAS's int8 kernels (its f32 path for 8-bit
    /// weights is a slow fallback) at a KL cost `herd eval --int8-activations` measures. `None`
    /// (the default) turns it on for int8 bundles on the CPU provider, where exact int8 decodes
    /// ~30x slower than int4 (llama.cpp's Q8_0 quantizes its activations the same way), and leaves
    /// it off otherwise; `Some(false)` keeps f32 activations, so the bundle computes what the
    /// reference evaluator computes.
    pub int8_activations: Option<bool>,
    /// Write ONNX Runtime's profile (a Chrome trace of every kernel run) of each decoder session to a
    /// file named from this prefix (`PREFIX_<date>.json`) when the session closes.
    pub profile: Option<PathBuf>,
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
        self.prepack
            .unwrap_or(int4 || self.int8_activations_for(bundle))
    }

    /// Whether `bundle`'s int4/int8 activations are quantized to int8 (see
    /// [`RuntimeOptions::int8_activations`]).
    pub fn int8_activations_for(&self, bundle: &Bundle) -> bool {
        self.int8_activations.unwrap_or_else(|| {
            self.provider == crate::providers::Provider::Cpu
                && bundle
                    .manifest
                    .quantization
                    .as_ref()
                    .is_some_and(|q| q.scheme.starts_with("int8"))
        })
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

/// Image feature rows for one decoder call and the flat token indices (`batch * seq`) they replace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageRows {
    pub positions: Vec<i64>,
    /// [positions.len(), hidden] row-major.
    pub features: Vec<f32>,
}

/// A loaded bundle with its ONNX Runtime sessions.
pub struct Model {
    pub bundle: Bundle,
    /// The decoder's pipeline stages in order (one for a bundle without stages), each with sessions
    /// over the same mapped weights; each graph run takes a free one.
    pub(crate) stages: Vec<crate::stage::Stage>,
    text: Option<crate::text::TextCodec>,
    /// The vision graph's session, for bundles that take images.
    vision: Option<Mutex<Session>>,
    /// Positions a new session's cache holds.
    context: usize,
    /// Bytes that crossed the session boundary (see [`Model::boundary_bytes`]).
    pub(crate) boundary_bytes: std::sync::atomic::AtomicU64,
}

/// Receives one probed output of one call: (name, shape, values).
pub type ProbeVisitor<'a> = dyn FnMut(&str, &[usize], &[f32]) -> Result<(), RuntimeError> + 'a;

impl Model {
    /// Opens and checks `dir`, then creates the ONNX Runtime session.
    pub fn load(dir: &Path, options: &RuntimeOptions) -> Result<Model, RuntimeError> {
        if options.sessions > MAX_SESSIONS {
            return Err(RuntimeError::option(
                "sessions",
                format!(
                    "{} is more than {MAX_SESSIONS}: each holds its own ONNX Runtime threads",
                    options.sessions
                ),
            ));
        }
        let bundle = Bundle::open(dir)?;
        if options.provider == crate::providers::Provider::Cpu
            && bundle.manifest.dtype == ElementType::Bf16
        {
            return Err(RuntimeError::Unsupported(
                "bf16 bundles run on the GPU providers (--ep cuda or tensorrt): ONNX Runtime's CPU kernels have no bf16 MatMul or Attention; compile with --dtype f16 or f32 to run on the CPU".into(),
            ));
        }
        if options.provider == crate::providers::Provider::Cpu {
            crate::cpu_memory::check_f16_on_cpu(&bundle)?;
        }
        if options.verify {
            bundle.verify_all()?;
        }
        let env = crate::onnxruntime::environment(options.ort_library.as_deref())?;
        let cache_dir = trt_cache_dir(&bundle);
        let stages = crate::stage::load_stages(&bundle, options, env, &cache_dir)?;
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
                // The vision graph runs where it is asked to, else beside stage 0 on its device.
                builder = crate::providers::register(
                    builder,
                    options.provider,
                    &bundle.manifest,
                    crate::providers::GraphKind::Vision,
                    options
                        .vision_device
                        .or(stages[0].device)
                        .unwrap_or(options.device),
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
                Some(Mutex::new(
                    builder
                        .commit_from_file(&path)
                        .map_err(|e| crate::error::load_error(&path, e))?,
                ))
            }
            None => None,
        };
        let text = if bundle.dir.join("tokenizer.json").is_file() {
            Some(crate::text::TextCodec::load(&bundle.dir)?)
        } else {
            None
        };
        let max = bundle.manifest.model.max_positions;
        let context = match options.context {
            Some(c) if c == 0 || c > max => {
                return Err(RuntimeError::option(
                    "context",
                    format!("{c} is outside 1..={max}, the bundle's --max-context"),
                ))
            }
            Some(c) => c,
            None => max,
        };
        Ok(Model {
            bundle,
            stages,
            text,
            vision,
            context,
            boundary_bytes: std::sync::atomic::AtomicU64::new(0),
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
            return Err(RuntimeError::NoVision);
        };
        let mut session = session
            .lock()
            .map_err(|_| RuntimeError::bug("vision", "session lock poisoned"))?;
        let side = info.tile_size;
        let mut features = Vec::new();
        for image in images {
            let shape = vec![image.tiles, info.num_channels, side, side];
            if image.pixels.len() != shape.iter().product::<usize>() {
                return Err(RuntimeError::ImageMismatch(format!(
                    "{} pixel values for {} tiles of {}x{side}x{side}",
                    image.pixels.len(),
                    image.tiles,
                    info.num_channels
                )));
            }
            let pixels = float_input(m.dtype, shape, &image.pixels)?;
            let outputs = session.run(vec![(Cow::from(info.pixel_values.as_str()), pixels)])?;
            let out = outputs
                .get(&info.image_features)
                .ok_or_else(|| RuntimeError::bug("vision", "no image_features output"))?;
            let expected = image.tiles * info.tokens_per_tile * m.model.hidden_size;
            let rows = float_values(m.dtype, out)?;
            if rows.len() != expected {
                return Err(RuntimeError::bug(
                    "vision",
                    format!(
                        "the vision graph returned {} values for {} tiles, expected {expected}",
                        rows.len(),
                        image.tiles
                    ),
                ));
            }
            features.extend(rows);
        }
        Ok(features)
    }

    /// Pipeline stages of the decoder (1 for a bundle without stages).
    pub fn stage_count(&self) -> usize {
        self.stages.len()
    }

    /// Fault drill: from now on every run of stage `stage` fails, as when its device or session is
    /// lost; calls then return an error naming the stage (they never wait on it). False when there is
    /// no such stage.
    pub fn take_stage_down(&self, stage: usize) -> bool {
        match self.stages.get(stage) {
            Some(s) => {
                s.down.store(true, std::sync::atomic::Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Positions a new session's cache holds: [`RuntimeOptions::context`], else the bundle's maximum.
    pub fn context(&self) -> usize {
        self.context
    }

    /// A zeroed KV cache of `slots` rows of `context` positions, each stage's layers on its device.
    pub fn new_cache(&self, slots: usize, context: usize) -> Result<KvCache, RuntimeError> {
        let mut cache: Option<KvCache> = None;
        for stage in &self.stages {
            let session = stage.lock()?;
            let part = match stage.device {
                Some(device) => {
                    let info = ort::memory::MemoryInfo::new(
                        ort::memory::AllocationDevice::CUDA,
                        device as i32,
                        ort::memory::AllocatorType::Device,
                        ort::memory::MemoryType::Default,
                    )?;
                    let allocator = ort::memory::Allocator::new(&session, info)?;
                    KvCache::allocate(
                        &self.bundle.manifest,
                        &stage.io.kv,
                        stage.index,
                        &allocator,
                        slots,
                        context,
                    )?
                }
                None => KvCache::allocate(
                    &self.bundle.manifest,
                    &stage.io.kv,
                    stage.index,
                    session.allocator(),
                    slots,
                    context,
                )?,
            };
            match &mut cache {
                Some(c) => c.absorb(part),
                None => cache = Some(part),
            }
        }
        cache.ok_or_else(|| RuntimeError::bug("cache", "the bundle has no decoder stages"))
    }

    /// Bytes that crossed the session boundary so far (ids, positions, image rows, logits).
    pub fn boundary_bytes(&self) -> u64 {
        self.boundary_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Feeds one sequence to slot 0 of `cache` in calls that stop at chunk boundaries and at the
    /// bundle's tokens per call; `on_logits` gets every call's logits, `inspect` its outputs.
    pub(crate) fn feed_pieces(
        &self,
        cache: &mut KvCache,
        feed: Feed<'_>,
        on_logits: &mut dyn FnMut(Vec<f32>),
        inspect: &mut dyn FnMut(&SessionOutputs) -> Result<(), RuntimeError>,
    ) -> Result<(), RuntimeError> {
        let Feed {
            start,
            ids,
            features,
            every_token,
            extra,
        } = feed;
        let m = &self.bundle.manifest;
        let h = m.model.hidden_size;
        let patch = m.vision.as_ref().map(|v| v.tokens.patch);
        let per_call = crate::session::max_tokens_per_call(m)
            .unwrap_or(usize::MAX)
            .max(1);
        let (mut done, mut row) = (0, 0);
        while done < ids.len() {
            let n = (ids.len() - done)
                .min(per_call)
                .min(cache.room(start + done));
            if n == 0 {
                return Err(RuntimeError::TooLong {
                    len: start + ids.len(),
                    max: cache.context(),
                });
            }
            let piece = &ids[done..done + n];
            let patches = piece.iter().filter(|&&t| Some(t) == patch).count();
            let rows = if features.is_empty() {
                &[][..]
            } else {
                features.get(row * h..(row + patches) * h).ok_or_else(|| {
                    RuntimeError::ImageMismatch(format!(
                        "{} image feature rows for more <|patch|> tokens",
                        features.len() / h.max(1)
                    ))
                })?
            };
            let input = RowInput {
                slot: 0,
                start: start + done,
                ids: piece,
                features: rows,
            };
            let out = self.run_rows(cache, &[input], every_token, extra, inspect)?;
            on_logits(out.rows.into_iter().next().unwrap_or_default());
            row += if features.is_empty() { 0 } else { patches };
            done += n;
        }
        if !features.is_empty() && row * h != features.len() {
            return Err(RuntimeError::ImageMismatch(format!(
                "{} image feature rows for {row} <|patch|> tokens",
                features.len() / h.max(1)
            )));
        }
        Ok(())
    }

    /// Logits of every position of `ids` (one sequence from position 0, no cache kept): [n * vocab].
    pub fn prompt_logits(&self, ids: &[i64]) -> Result<Vec<f32>, RuntimeError> {
        self.prompt_logits_with_images(ids, &[])
    }

    /// [`Model::prompt_logits`] of an image prompt: `features` ([`Model::encode_images`]) replace the
    /// `<|patch|>` tokens of `ids` in order.
    pub fn prompt_logits_with_images(
        &self,
        ids: &[i64],
        features: &[f32],
    ) -> Result<Vec<f32>, RuntimeError> {
        let m = &self.bundle.manifest;
        if !features.is_empty() && m.vision.is_none() {
            return Err(RuntimeError::NoVision);
        }
        if ids.len() > m.model.max_positions {
            return Err(RuntimeError::TooLong {
                len: ids.len(),
                max: m.model.max_positions,
            });
        }
        let mut cache = self.new_cache(1, ids.len().max(1))?;
        let mut all = Vec::with_capacity(ids.len() * m.model.vocab_size);
        let feed = Feed {
            start: 0,
            ids,
            features,
            every_token: true,
            extra: &[],
        };
        self.feed_pieces(&mut cache, feed, &mut |l| all.extend(l), &mut |_| Ok(()))?;
        Ok(all)
    }

    /// Prefills `ids` and returns the largest magnitude of each named extra graph output (activation
    /// calibration reads the inputs of quantized projections this way).
    pub fn probe_max_abs(
        &self,
        ids: &[i64],
        names: &[String],
    ) -> Result<HashMap<String, f32>, RuntimeError> {
        let mut found: HashMap<String, f32> = HashMap::new();
        self.probe(ids, names, &mut |name, _, data| {
            let max = data.iter().fold(0f32, |m, v| m.max(v.abs()));
            let entry = found.entry(name.to_string()).or_default();
            *entry = entry.max(max);
            Ok(())
        })?;
        Ok(found)
    }

    /// Runs `ids` as one sequence from position 0 and hands `visit` the extra outputs `names` (f32) of
    /// each call as (name, shape, values); a prompt longer than one call comes in several pieces, in
    /// order. Fails if a name is not among the outputs.
    pub fn probe(
        &self,
        ids: &[i64],
        names: &[String],
        visit: &mut ProbeVisitor<'_>,
    ) -> Result<(), RuntimeError> {
        let mut cache = self.new_cache(1, ids.len().max(1))?;
        let feed = Feed {
            start: 0,
            ids,
            features: &[],
            every_token: false,
            extra: names,
        };
        self.feed_pieces(&mut cache, feed, &mut |_| {}, &mut |outputs| {
            visit_outputs(outputs, names, visit)
        })
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
}

/// A float graph input in the bundle's activation dtype (f16 and bf16 bundles take their own type).
pub(crate) fn float_input(
    element: ElementType,
    shape: Vec<usize>,
    values: &[f32],
) -> Result<SessionInputValue<'static>, RuntimeError> {
    float_value(element, shape, values).map(SessionInputValue::from)
}

/// Values of f32 as a tensor of the bundle's activation dtype.
pub(crate) fn float_value(
    element: ElementType,
    shape: Vec<usize>,
    values: &[f32],
) -> Result<DynValue, RuntimeError> {
    Ok(match element {
        ElementType::F16 => Tensor::<half::f16>::from_array((
            shape,
            values
                .iter()
                .map(|&v| half::f16::from_f32(v))
                .collect::<Vec<_>>(),
        ))?
        .into_dyn(),
        ElementType::Bf16 => Tensor::<half::bf16>::from_array((
            shape,
            values
                .iter()
                .map(|&v| half::bf16::from_f32(v))
                .collect::<Vec<_>>(),
        ))?
        .into_dyn(),
        ElementType::F32 => Tensor::<f32>::from_array((shape, values.to_vec()))?.into_dyn(),
    })
}

/// A tensor of the bundle's activation dtype as f32 values.
pub(crate) fn float_values(
    element: ElementType,
    value: &DynValue,
) -> Result<Vec<f32>, RuntimeError> {
    Ok(match element {
        ElementType::F16 => value
            .try_extract_tensor::<half::f16>()?
            .1
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        ElementType::Bf16 => value
            .try_extract_tensor::<half::bf16>()?
            .1
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        ElementType::F32 => value.try_extract_tensor::<f32>()?.1.to_vec(),
    })
}

/// Hands `visit` the extra outputs `names` (f32) of one call as (name, shape, values).
pub(crate) fn visit_outputs(
    outputs: &SessionOutputs,
    names: &[String],
    visit: &mut ProbeVisitor<'_>,
) -> Result<(), RuntimeError> {
    for name in names {
        let value = outputs
            .get(name)
            .ok_or_else(|| RuntimeError::bug("probe", format!("no {name} output")))?;
        let (shape, data) = value.try_extract_tensor::<f32>()?;
        let shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
        visit(name, &shape, data)?;
    }
    Ok(())
}
