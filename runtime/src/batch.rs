//! Continuous batching: sequences join and leave a running batch between steps, each in its own cache
//! slot at its own position. One step is one decoder call holding, side by side, the prefill chunks of
//! sequences still reading their prompt and one token of every sequence that is generating.
//!
//! The call's width is the longest row's token count, capped so that every row stays inside its chunk
//! and its context ([`KvCache::room`]); shorter rows are padded with entries nobody reads. A row's
//! tokens, masks and rotary angles depend only on its own positions, so each sequence gets what it would
//! get alone (up to float summation order).

use crate::cache::KvCache;
use crate::decode::RowInput;
use crate::error::RuntimeError;
use crate::model::{GenerateParams, Model, StopReason};
use crate::sampling::Sampler;

/// Most prompt tokens a row reads in a step that also decodes other rows (padding makes every row of a
/// call as wide as its widest).
const PREFILL_BESIDE_DECODE: usize = 4;

/// Names a sequence of a [`Batch`].
pub type SequenceId = u64;

/// What a step produced.
#[derive(Clone, Debug, PartialEq)]
pub enum BatchEvent {
    /// A sequence's next token (with the logits it was chosen from, when `return_logits`).
    Token {
        sequence: SequenceId,
        id: i64,
        logits: Option<Vec<f32>>,
    },
    /// A sequence ended; its slot is free for the next one.
    Finished {
        sequence: SequenceId,
        reason: StopReason,
        tokens: usize,
    },
}

struct Row {
    id: SequenceId,
    prompt: Vec<i64>,
    features: Vec<f32>,
    /// Prompt tokens and image rows already fed.
    fed: usize,
    rows_fed: usize,
    position: usize,
    /// The sampled token to feed next (None while the prompt is read).
    next: Option<i64>,
    sampler: Sampler,
    params: GenerateParams,
    stop_ids: Vec<i64>,
    seen: Vec<i64>,
    produced: usize,
}

/// Sequences sharing one model and one KV cache of `slots` rows.
pub struct Batch<'m> {
    model: &'m Model,
    cache: KvCache,
    rows: Vec<Option<Row>>,
    /// Sequences that ended without a step (max_new_tokens 0) or were cancelled, reported next step.
    finished: Vec<BatchEvent>,
    next_id: SequenceId,
    per_call: usize,
}

impl<'m> Batch<'m> {
    /// A batch of `slots` rows, each holding up to the model's context.
    pub fn new(model: &'m Model, slots: usize) -> Result<Batch<'m>, RuntimeError> {
        let per_call = crate::session::max_tokens_per_call(&model.bundle.manifest)
            .unwrap_or(usize::MAX)
            .max(1);
        Ok(Batch {
            model,
            cache: model.new_cache(slots, model.context())?,
            rows: (0..slots).map(|_| None).collect(),
            finished: Vec::new(),
            next_id: 0,
            per_call,
        })
    }

    /// Slots not holding a sequence.
    pub fn free_slots(&self) -> usize {
        self.rows.iter().filter(|r| r.is_none()).count()
    }

    /// Whether no sequence is running and nothing is left to report.
    pub fn is_idle(&self) -> bool {
        self.finished.is_empty() && self.rows.iter().all(Option::is_none)
    }

    /// The cache's preallocated bytes.
    pub fn kv_bytes(&self) -> crate::cache::KvBytes {
        self.cache.bytes()
    }

    /// Adds a sequence: prompt `ids` with image rows for its `<|patch|>` tokens (from
    /// [`crate::prepare_prompt`]), generated with `params` (stop strings are the caller's: events carry
    /// ids). It starts reading its prompt at the next step.
    pub fn add(
        &mut self,
        ids: Vec<i64>,
        features: Vec<f32>,
        params: GenerateParams,
    ) -> Result<SequenceId, RuntimeError> {
        let m = &self.model.bundle.manifest;
        params.sampling.validate()?;
        if ids.is_empty() {
            return Err(RuntimeError::Param("the prompt has no tokens".into()));
        }
        crate::decode::check_ids(m.model.vocab_size, &ids)?;
        crate::decode::check_room(ids.len(), params.max_new_tokens, self.cache.context())?;
        if !features.is_empty() {
            let patch = m.vision.as_ref().map(|v| v.tokens.patch).ok_or_else(|| {
                RuntimeError::Param(
                    "this bundle takes no images (it was compiled without a vision encoder)".into(),
                )
            })?;
            let patches = ids.iter().filter(|&&t| t == patch).count();
            if patches * m.model.hidden_size != features.len() {
                return Err(RuntimeError::Param(format!(
                    "{} image feature values for {patches} <|patch|> tokens of width {}",
                    features.len(),
                    m.model.hidden_size
                )));
            }
        }
        let slot = self.rows.iter().position(Option::is_none).ok_or_else(|| {
            RuntimeError::Param(format!("all {} slots are taken", self.rows.len()))
        })?;
        let id = self.next_id;
        self.next_id += 1;
        if params.max_new_tokens == 0 {
            self.finished.push(BatchEvent::Finished {
                sequence: id,
                reason: StopReason::MaxTokens,
                tokens: 0,
            });
            return Ok(id);
        }
        self.rows[slot] = Some(Row {
            id,
            stop_ids: params
                .stop_ids
                .clone()
                .unwrap_or_else(|| m.stop_token_ids.clone()),
            sampler: Sampler::new(params.sampling.clone()),
            seen: ids.clone(),
            prompt: ids,
            features,
            fed: 0,
            rows_fed: 0,
            position: 0,
            next: None,
            params,
            produced: 0,
        });
        Ok(id)
    }

    /// Ends sequence `id` now (its slot is free for the next one); false if it is not running.
    pub fn cancel(&mut self, id: SequenceId) -> bool {
        let Some(slot) = self
            .rows
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.id == id))
        else {
            return false;
        };
        let row = self.rows[slot].take().expect("found above");
        self.finished.push(BatchEvent::Finished {
            sequence: id,
            reason: StopReason::Cancelled,
            tokens: row.produced,
        });
        true
    }

    /// Runs one decoder call over every running sequence and returns what it produced (empty when
    /// nothing runs).
    pub fn step(&mut self) -> Result<Vec<BatchEvent>, RuntimeError> {
        let mut events = std::mem::take(&mut self.finished);
        let idle_room = self.cache.room(0);
        let active: Vec<usize> = (0..self.rows.len())
            .filter(|&s| self.rows[s].is_some())
            .collect();
        if active.is_empty() {
            return Ok(events);
        }
        // Tokens each row wants: the rest of its prompt, or the token it sampled last.
        let wanted = |row: &Row| match row.next {
            Some(_) => 1,
            None => row.prompt.len() - row.fed,
        };
        let mut width = self.per_call;
        if active.len() < self.rows.len() {
            width = width.min(idle_room);
        }
        let (mut longest, mut decoding) = (1, false);
        for &slot in &active {
            let row = self.rows[slot].as_ref().expect("active");
            width = width.min(self.cache.room(row.position));
            longest = longest.max(wanted(row));
            decoding |= row.next.is_some();
        }
        // Every slot computes `width` tokens: while rows decode, a prefill chunk costs each of them as
        // much, so prompts then advance by at most `PREFILL_BESIDE_DECODE` tokens per step.
        if decoding {
            width = width.min(PREFILL_BESIDE_DECODE);
        }
        let width = width.min(longest).max(1);
        let h = self.model.bundle.manifest.model.hidden_size;
        let patch = self
            .model
            .bundle
            .manifest
            .vision
            .as_ref()
            .map(|v| v.tokens.patch);
        // Each row's tokens (and image rows) for this call.
        let mut plan: Vec<(usize, Vec<i64>, std::ops::Range<usize>)> = Vec::new();
        for &slot in &active {
            let row = self.rows[slot].as_ref().expect("active");
            let (ids, rows) = match row.next {
                Some(t) => (vec![t], 0..0),
                None => {
                    let n = (row.prompt.len() - row.fed).min(width);
                    let ids = row.prompt[row.fed..row.fed + n].to_vec();
                    let patches = if row.features.is_empty() {
                        0
                    } else {
                        ids.iter().filter(|&&t| Some(t) == patch).count()
                    };
                    (ids, row.rows_fed..row.rows_fed + patches)
                }
            };
            plan.push((slot, ids, rows));
        }
        let inputs: Vec<RowInput> = plan
            .iter()
            .map(|(slot, ids, rows)| {
                let row = self.rows[*slot].as_ref().expect("active");
                RowInput {
                    slot: *slot,
                    start: row.position,
                    ids,
                    features: &row.features[rows.start * h..rows.end * h],
                }
            })
            .collect();
        let out = self
            .model
            .run_rows(&mut self.cache, &inputs, false, &[], &mut |_| Ok(()))?;
        for ((slot, ids, rows), logits) in plan.into_iter().zip(out.rows) {
            let row = self.rows[slot].as_mut().expect("active");
            row.position += ids.len();
            if row.next.is_none() {
                row.fed += ids.len();
                row.rows_fed = rows.end;
                if row.fed < row.prompt.len() {
                    continue;
                }
            }
            let id = row.sampler.next(&logits, &row.seen);
            row.seen.push(id);
            row.produced += 1;
            events.push(BatchEvent::Token {
                sequence: row.id,
                id,
                logits: row.params.return_logits.then_some(logits),
            });
            let reason = if row.stop_ids.contains(&id) {
                Some(StopReason::StopToken)
            } else if row.produced == row.params.max_new_tokens {
                Some(StopReason::MaxTokens)
            } else {
                row.next = Some(id);
                None
            };
            if let Some(reason) = reason {
                events.push(BatchEvent::Finished {
                    sequence: row.id,
                    reason,
                    tokens: row.produced,
                });
                self.rows[slot] = None;
            }
        }
        Ok(events)
    }
}
