//! One decoder call over every slot of a [`KvCache`], through ONNX Runtime's IoBinding: each listed row
//! brings its own tokens at its own positions, the cache buffers are bound as both past and present
//! (written in place on the session's device), and only ids, positions, image feature rows and the
//! logits cross the session boundary.

use std::sync::atomic::Ordering;

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{SessionInputValue, SessionOutputs};
use ort::value::{DynValue, Tensor};

use crate::cache::{KvCache, LayerCache};
use crate::error::{Neighbour, RuntimeError};
use crate::model::{float_input, Model};

/// One row of a decoder call: `ids` at positions `start..start + ids.len()` in cache slot `slot`.
#[derive(Clone, Copy, Debug)]
pub struct RowInput<'a> {
    pub slot: usize,
    /// The row's cache length before the call (its next position).
    pub start: usize,
    pub ids: &'a [i64],
    /// Image feature rows for the `<|patch|>` tokens of `ids`, in order ([n, hidden] row-major).
    pub features: &'a [f32],
}

/// Refuses token ids outside the vocabulary.
pub(crate) fn check_ids(vocab: usize, ids: &[i64]) -> Result<(), RuntimeError> {
    match ids.iter().find(|&&t| t < 0 || t as usize >= vocab) {
        Some(&id) => Err(RuntimeError::TokenOutOfVocab { id, vocab }),
        None => Ok(()),
    }
}

/// Refuses a prompt of `prompt` tokens with `new` tokens to generate in a cache of `context`
/// positions (the last generated token is never fed back, so it needs no position).
pub(crate) fn check_room(prompt: usize, new: usize, context: usize) -> Result<(), RuntimeError> {
    let needed = prompt.checked_add(new.saturating_sub(1));
    if needed.is_none_or(|n| n > context) {
        return Err(RuntimeError::TooLongWithNew {
            prompt,
            new,
            max: context,
        });
    }
    Ok(())
}

/// One sequence fed from `start` in as many calls as it takes ([`Model::feed_pieces`]).
pub(crate) struct Feed<'a> {
    pub start: usize,
    pub ids: &'a [i64],
    /// Image feature rows for the `<|patch|>` tokens of `ids`, in order (empty without images).
    pub features: &'a [f32],
    /// The logits of every token instead of each call's last.
    pub every_token: bool,
    /// Graph outputs to show the caller (calibration).
    pub extra: &'a [String],
}

/// What one call returns for each of its rows.
pub(crate) struct CallLogits {
    /// Per row in the order given: the logits of its last token, or of all its tokens when asked.
    pub rows: Vec<Vec<f32>>,
}

/// A call's inputs on the host, checked, and what [`Model::finish_call`] needs of its rows.
pub(crate) struct Call {
    slots: usize,
    picked: usize,
    every_token: bool,
    /// Per row in the order given: (slot, start, tokens).
    rows: Vec<(usize, usize, usize)>,
    ids: Tensor<i64>,
    positions: Tensor<i64>,
    index: Tensor<i64>,
    image: Option<(SessionInputValue<'static>, Tensor<i64>)>,
    crossed: u64,
}

/// What one stage of a call hands on.
pub(crate) enum StageOutput {
    /// The residual stream for the next stage.
    Hidden(DynValue),
    /// The last stage's logits, [slots, picked, vocab].
    Logits(Vec<f32>),
}

impl Model {
    /// Runs one call over every slot of `cache`: the listed rows (slots not listed idle, writing
    /// entries no row reads) padded to the longest row, through every pipeline stage in turn. Each
    /// row must have room for that width ([`KvCache::room`]). `extra` names graph outputs shown to
    /// `inspect` (calibration; bundles without stages).
    pub(crate) fn run_rows(
        &self,
        cache: &mut KvCache,
        rows: &[RowInput<'_>],
        every_token: bool,
        extra: &[String],
        inspect: &mut dyn FnMut(&SessionOutputs) -> Result<(), RuntimeError>,
    ) -> Result<CallLogits, RuntimeError> {
        if let Some(w) = &self.bundle.manifest.layer_window {
            return Err(RuntimeError::Unsupported(format!(
                "this bundle runs decoder layers {}..{} only (a calibration window): it serves no requests",
                w.start, w.end
            )));
        }
        if !extra.is_empty() && self.stages.len() > 1 {
            return Err(RuntimeError::Unsupported(
                "extra outputs are for single-graph bundles".into(),
            ));
        }
        let call = self.prepare_call(cache, rows, every_token)?;
        let mut hidden = None;
        for stage in &self.stages {
            let layers: Vec<&mut LayerCache> = cache
                .layers
                .iter_mut()
                .filter(|l| l.stage == stage.index)
                .collect();
            match self.run_stage(stage, &call, layers, hidden.take(), extra, inspect)? {
                StageOutput::Hidden(h) => hidden = Some(h),
                StageOutput::Logits(logits) => return self.finish_call(&call, &logits),
            }
        }
        Err(RuntimeError::bug(
            "decode",
            "the last stage returned no logits",
        ))
    }

    /// Runs one call per group, each over its own cache, through the pipeline stages with every
    /// stage working on its own thread: while stage k runs group g, stage k - 1 runs group g + 1, so
    /// the stages' devices overlap. Each group gets what [`Model::run_rows`] gives it.
    pub(crate) fn run_groups(
        &self,
        groups: Vec<(&mut KvCache, &[RowInput<'_>])>,
    ) -> Result<Vec<CallLogits>, RuntimeError> {
        let calls: Vec<Call> = groups
            .iter()
            .map(|(cache, rows)| self.prepare_call(cache, rows, false))
            .collect::<Result<_, _>>()?;
        let n = self.stages.len();
        // layers[k][g]: stage k's layers of group g's cache.
        let mut layers: Vec<Vec<Vec<&mut LayerCache>>> = (0..n).map(|_| Vec::new()).collect();
        for (cache, _) in groups {
            let mut per_stage: Vec<Vec<&mut LayerCache>> = (0..n).map(|_| Vec::new()).collect();
            for layer in cache.layers.iter_mut() {
                per_stage[layer.stage].push(layer);
            }
            for (k, l) in per_stage.into_iter().enumerate() {
                layers[k].push(l);
            }
        }
        type Handoff = Result<DynValue, RuntimeError>;
        // Stage k reads the residual stream from channel k - 1 and writes to channel k.
        let mut receivers = vec![None];
        let mut senders = Vec::new();
        for _ in 1..n {
            let (tx, rx) = std::sync::mpsc::channel::<Handoff>();
            senders.push(Some(tx));
            receivers.push(Some(rx));
        }
        senders.push(None);
        let calls = &calls;
        let results: Result<Vec<Vec<f32>>, RuntimeError> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .stages
                .iter()
                .zip(layers)
                .zip(receivers.into_iter().zip(senders))
                .map(|((stage, stage_layers), (input, output))| {
                    scope.spawn(move || {
                        self.pipeline_stage(stage, calls, stage_layers, input, output)
                    })
                })
                .collect();
            // Every thread is joined: a failed stage passes its error on, so none waits forever.
            let mut last = Err(RuntimeError::bug("pipeline", "no pipeline stages"));
            for handle in handles {
                last = handle.join().unwrap_or_else(|_| {
                    Err(RuntimeError::bug("pipeline", "a stage's thread panicked"))
                });
            }
            last
        });
        results?
            .iter()
            .zip(calls)
            .map(|(logits, call)| self.finish_call(call, logits))
            .collect()
    }

    /// One stage's thread of [`Model::run_groups`]: runs every group in order, taking the residual
    /// stream from `input` (stages after the first) and passing it on to `output` (all but the
    /// last, which returns the groups' logits). An error goes down the pipeline, so later stages
    /// stop too.
    fn pipeline_stage(
        &self,
        stage: &crate::stage::Stage,
        calls: &[Call],
        layers: Vec<Vec<&mut LayerCache>>,
        input: Option<std::sync::mpsc::Receiver<Result<DynValue, RuntimeError>>>,
        output: Option<std::sync::mpsc::Sender<Result<DynValue, RuntimeError>>>,
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let mut logits = Vec::new();
        for (call, group_layers) in calls.iter().zip(layers) {
            let hidden = match &input {
                None => None,
                Some(rx) => match rx.recv() {
                    Ok(Ok(h)) => Some(h),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(RuntimeError::PipelineStopped(Neighbour::Earlier)),
                },
            };
            let out = self.run_stage(stage, call, group_layers, hidden, &[], &mut |_| Ok(()));
            match (out, &output) {
                (Ok(StageOutput::Hidden(h)), Some(tx)) => {
                    if tx.send(Ok(h)).is_err() {
                        return Err(RuntimeError::PipelineStopped(Neighbour::Later));
                    }
                }
                (Ok(StageOutput::Logits(l)), None) => logits.push(l),
                (Ok(_), _) => {
                    return Err(RuntimeError::bug(
                        "pipeline",
                        format!("stage {} returned the wrong kind of output", stage.index),
                    ))
                }
                (Err(e), Some(tx)) => {
                    // The last stage reports it; this thread only ends.
                    let _ = tx.send(Err(e));
                    return Err(RuntimeError::PipelineStopped(Neighbour::Later));
                }
                (Err(e), None) => return Err(e),
            }
        }
        Ok(logits)
    }

    /// Checks a call's rows against `cache` and builds its host inputs.
    pub(crate) fn prepare_call(
        &self,
        cache: &KvCache,
        rows: &[RowInput<'_>],
        every_token: bool,
    ) -> Result<Call, RuntimeError> {
        let m = &self.bundle.manifest;
        let (slots, vocab, h) = (cache.slots(), m.model.vocab_size, m.model.hidden_size);
        let width = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        if width == 0 {
            return Err(RuntimeError::Call("no tokens to feed".into()));
        }
        let mut row_of_slot = vec![None; slots];
        for (i, row) in rows.iter().enumerate() {
            if row.slot >= slots || row_of_slot[row.slot].is_some() || row.ids.is_empty() {
                return Err(RuntimeError::Call(format!(
                    "row {i}: slot {} is outside 0..{slots}, taken twice, or given no tokens",
                    row.slot
                )));
            }
            check_ids(vocab, row.ids)?;
            row_of_slot[row.slot] = Some(i);
        }
        // Every slot writes `width` entries from its start: idle slots from 0.
        let starts: Vec<usize> = row_of_slot
            .iter()
            .map(|r| r.map_or(0, |i| rows[i].start))
            .collect();
        if let Some(slot) = (0..slots).find(|&s| cache.room(starts[s]) < width) {
            return Err(RuntimeError::Call(format!(
                "slot {slot} at position {} has room for {} tokens in this call, not {width} (calls stop at chunk boundaries and at the context of {})",
                starts[slot],
                cache.room(starts[slot]),
                cache.context()
            )));
        }
        let mut ids = Vec::with_capacity(slots * width);
        let mut positions = Vec::with_capacity(slots * width);
        let mut image_positions = Vec::new();
        let mut features = Vec::new();
        for slot in 0..slots {
            let row = row_of_slot[slot].map(|i| rows[i]);
            let real = row.map_or(&[0i64][..], |r| r.ids);
            // Padding repeats the last token: finite values at entries no query reads.
            let last = *real.last().expect("rows have tokens");
            ids.extend((0..width).map(|s| real.get(s).copied().unwrap_or(last)));
            positions.extend((0..width).map(|s| (starts[slot] + s) as i64));
            if let (Some(row), Some(v)) = (row, &m.vision) {
                let at: Vec<usize> = (0..row.ids.len())
                    .filter(|&s| row.ids[s] == v.tokens.patch)
                    .collect();
                // Without feature rows a `<|patch|>` id is an ordinary token (its embedding).
                if !row.features.is_empty() {
                    if at.len() * h != row.features.len() {
                        return Err(RuntimeError::ImageMismatch(format!(
                            "{} image feature rows for {} <|patch|> tokens",
                            row.features.len() / h.max(1),
                            at.len()
                        )));
                    }
                    image_positions.extend(at.iter().map(|&s| (slot * width + s) as i64));
                    features.extend_from_slice(row.features);
                }
            } else if row.is_some_and(|r| !r.features.is_empty()) {
                return Err(RuntimeError::NoVision);
            }
        }
        // The tokens whose logits come back: every token of each row, or only its last.
        let picked = if every_token { width } else { 1 };
        let index: Vec<i64> = (0..slots)
            .flat_map(|slot| {
                let last = row_of_slot[slot].map_or(0, |i| rows[i].ids.len() - 1);
                (0..picked).map(move |r| if every_token { r } else { last } as i64)
            })
            .collect();
        let mut crossed = (16 * slots * width + 8 * slots * picked) as u64;
        let image = match &m.vision {
            Some(_) => {
                let f = image_positions.len();
                crossed += (f * 8 + features.len() * m.dtype.bytes()) as u64;
                let rows = float_input(m.dtype, vec![f, h], &features)?;
                let at = Tensor::<i64>::from_array(([f], image_positions))?;
                Some((rows, at))
            }
            None => None,
        };
        Ok(Call {
            slots,
            picked,
            every_token,
            rows: rows
                .iter()
                .map(|r| (r.slot, r.start, r.ids.len()))
                .collect(),
            ids: Tensor::<i64>::from_array(([slots, width], ids))?,
            positions: Tensor::<i64>::from_array(([slots, width], positions))?,
            index: Tensor::<i64>::from_array(([slots, picked], index))?,
            image,
            crossed,
        })
    }

    /// Runs `stage` of `call`: stage 0 reads the ids (and image rows), a later stage the residual
    /// stream `hidden`; the last returns the logits on the host, the others the residual stream on
    /// their own device. `layers` are the stage's caches, bound as both past and present.
    pub(crate) fn run_stage(
        &self,
        stage: &crate::stage::Stage,
        call: &Call,
        layers: Vec<&mut LayerCache>,
        hidden: Option<DynValue>,
        extra: &[String],
        inspect: &mut dyn FnMut(&SessionOutputs) -> Result<(), RuntimeError>,
    ) -> Result<StageOutput, RuntimeError> {
        let m = &self.bundle.manifest;
        let io = &stage.io;
        let run = || -> Result<StageOutput, RuntimeError> {
            let mut session = stage.lock()?;
            let mut binding = session.create_binding()?;
            match (&io.hidden_in, &hidden) {
                (Some(name), Some(h)) => binding.bind_input(name, h)?,
                (None, None) => {
                    binding.bind_input(&m.graph.input_ids, &call.ids)?;
                    if let (Some((rows, at)), Some(v)) = (&call.image, &m.vision) {
                        binding.bind_input(&v.decoder_features, rows)?;
                        binding.bind_input(&v.decoder_positions, at)?;
                    }
                }
                _ => {
                    return Err(RuntimeError::bug(
                        "pipeline",
                        "the residual stream does not match the stage's inputs",
                    ))
                }
            }
            binding.bind_input(&m.graph.position_ids, &call.positions)?;
            for layer in layers {
                binding.bind_input(&layer.past_key, &layer.key)?;
                binding.bind_input(&layer.past_value, &layer.value)?;
                binding.bind_output(&layer.present_key, &mut layer.key)?;
                binding.bind_output(&layer.present_value, &mut layer.value)?;
            }
            let host = MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            )?;
            let device = match stage.device {
                // The residual stream stays on the stage's GPU; the next stage's session copies it
                // to its own.
                Some(d) => MemoryInfo::new(
                    AllocationDevice::CUDA,
                    d as i32,
                    AllocatorType::Device,
                    MemoryType::Default,
                )?,
                None => host.clone(),
            };
            match &io.hidden_out {
                Some(name) => binding.bind_output_to_device(name, &device)?,
                None => {
                    binding.bind_input(&m.graph.logits_index, &call.index)?;
                    binding.bind_output_to_device(&m.graph.logits, &host)?;
                }
            }
            for name in extra {
                binding.bind_output_to_device(name, &host)?;
            }
            let mut outputs = session.run_binding(&binding)?;
            inspect(&outputs)?;
            if let Some(name) = &io.hidden_out {
                return outputs
                    .remove(name)
                    .map(StageOutput::Hidden)
                    .ok_or_else(|| RuntimeError::bug("decode", format!("no `{name}` output")));
            }
            let logits = outputs
                .get(&m.graph.logits)
                .ok_or_else(|| RuntimeError::bug("decode", "no logits output"))?
                .try_extract_tensor::<f32>()?
                .1
                .to_vec();
            Ok(StageOutput::Logits(logits))
        };
        run().map_err(|e| {
            if self.stages.len() > 1 {
                stage.error(e)
            } else {
                e
            }
        })
    }

    /// Checks a call's logits and splits them by row.
    fn finish_call(&self, call: &Call, logits: &[f32]) -> Result<CallLogits, RuntimeError> {
        let vocab = self.bundle.manifest.model.vocab_size;
        let (slots, picked) = (call.slots, call.picked);
        if logits.len() != slots * picked * vocab {
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
                    logits.len() / (slots * picked).max(1)
                ),
            });
        }
        let mut out = Vec::with_capacity(call.rows.len());
        for (i, &(slot, start, len)) in call.rows.iter().enumerate() {
            let base = slot * picked;
            let (first, count) = if call.every_token {
                (0, len)
            } else {
                (len - 1, 1)
            };
            let values = &logits[base * vocab..(base + count) * vocab];
            if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
                return Err(RuntimeError::NonFiniteLogits {
                    row: i,
                    position: start + first + bad / vocab,
                });
            }
            out.push(values.to_vec());
        }
        let crossed = call.crossed + (logits.len() * 4) as u64;
        self.boundary_bytes.fetch_add(crossed, Ordering::Relaxed);
        Ok(CallLogits { rows: out })
    }
}
