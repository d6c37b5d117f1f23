//! One decoder call over every slot of a [`KvCache`], through ONNX Runtime's IoBinding: each listed row
//! brings its own tokens at its own positions, the cache buffers are bound as both past and present
//! (written in place on the session's device), and only ids, positions, image feature rows and the
//! logits cross the session boundary.

use std::sync::atomic::Ordering;

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::SessionOutputs;
use ort::value::Tensor;

use crate::cache::KvCache;
use crate::error::RuntimeError;
use crate::model::{element_type, float_input, Model};

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
        Some(bad) => Err(RuntimeError::Param(format!(
            "token id {bad} is outside the vocabulary 0..{vocab}"
        ))),
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

impl Model {
    /// Runs one call over every slot of `cache`: the listed rows (slots not listed idle, writing
    /// entries no row reads) padded to the longest row. Each row must have room for that width
    /// ([`KvCache::room`]). `extra` names graph outputs shown to `inspect` (calibration).
    pub(crate) fn run_rows(
        &self,
        cache: &mut KvCache,
        rows: &[RowInput<'_>],
        every_token: bool,
        extra: &[String],
        inspect: &mut dyn FnMut(&SessionOutputs) -> Result<(), RuntimeError>,
    ) -> Result<CallLogits, RuntimeError> {
        let m = &self.bundle.manifest;
        let (slots, vocab, h) = (cache.slots(), m.model.vocab_size, m.model.hidden_size);
        let width = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        if width == 0 {
            return Err(RuntimeError::Param("no tokens to feed".into()));
        }
        let mut row_of_slot = vec![None; slots];
        for (i, row) in rows.iter().enumerate() {
            if row.slot >= slots || row_of_slot[row.slot].is_some() || row.ids.is_empty() {
                return Err(RuntimeError::Param(format!(
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
            return Err(RuntimeError::Param(format!(
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
                        return Err(RuntimeError::Param(format!(
                            "{} image feature rows for {} <|patch|> tokens",
                            row.features.len() / h.max(1),
                            at.len()
                        )));
                    }
                    image_positions.extend(at.iter().map(|&s| (slot * width + s) as i64));
                    features.extend_from_slice(row.features);
                }
            } else if row.is_some_and(|r| !r.features.is_empty()) {
                return Err(RuntimeError::Param(
                    "this bundle takes no images (it was compiled without a vision encoder)".into(),
                ));
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
        let ids = Tensor::<i64>::from_array(([slots, width], ids))?;
        let positions = Tensor::<i64>::from_array(([slots, width], positions))?;
        let index = Tensor::<i64>::from_array(([slots, picked], index))?;

        let mut session = self.lock_session()?;
        let mut binding = session.create_binding()?;
        binding.bind_input(&m.graph.input_ids, &ids)?;
        binding.bind_input(&m.graph.position_ids, &positions)?;
        binding.bind_input(&m.graph.logits_index, &index)?;
        let image_inputs = match &m.vision {
            Some(v) => {
                let f = image_positions.len();
                crossed += (f * 8 + features.len() * element_type(m).bytes()) as u64;
                let rows = float_input(&m.dtype, vec![f, h], &features)?;
                let at = Tensor::<i64>::from_array(([f], image_positions))?;
                Some((v, rows, at))
            }
            None => None,
        };
        if let Some((v, rows, at)) = &image_inputs {
            binding.bind_input(&v.decoder_features, rows)?;
            binding.bind_input(&v.decoder_positions, at)?;
        }
        for layer in &mut cache.layers {
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
        binding.bind_output_to_device(&m.graph.logits, &host)?;
        for name in extra {
            binding.bind_output_to_device(name, &host)?;
        }
        let outputs = session.run_binding(&binding)?;
        let logits = outputs
            .get(&m.graph.logits)
            .ok_or_else(|| RuntimeError::Ort("no logits output".into()))?
            .try_extract_tensor::<f32>()?
            .1;
        crossed += (logits.len() * 4) as u64;
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
        let mut out = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let base = row.slot * picked;
            let (first, count) = if every_token {
                (0, row.ids.len())
            } else {
                (row.ids.len() - 1, 1)
            };
            let values = &logits[base * vocab..(base + count) * vocab];
            if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
                return Err(RuntimeError::NonFiniteLogits {
                    row: i,
                    position: row.start + first + bad / vocab,
                });
            }
            out.push(values.to_vec());
        }
        inspect(&outputs)?;
        self.boundary_bytes.fetch_add(crossed, Ordering::Relaxed);
        Ok(CallLogits { rows: out })
    }
}
