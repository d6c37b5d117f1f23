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

/// Tokens of each row of a step: (slot, ids, image rows).
type StepPlan = Vec<(usize, Vec<i64>, std::ops::Range<usize>)>;

/// Sequences sharing one model and a KV cache of `slots` rows, split into micro-batches of equal
/// slots, each with its own cache: a step runs every micro-batch, through a staged model's stages as a
/// pipeline (see [`Batch::with_micro_batches`]).
pub struct Batch<'m> {
    model: &'m Model,
    /// One cache per micro-batch; slot s lives in cache s / group_slots at row s % group_slots.
    caches: Vec<KvCache>,
    group_slots: usize,
    rows: Vec<Option<Row>>,
    /// Sequences that ended without a step (max_new_tokens 0) or were cancelled, reported next step.
    finished: Vec<BatchEvent>,
    next_id: SequenceId,
    per_call: usize,
}

impl<'m> Batch<'m> {
    /// A batch of `slots` rows, each holding up to the model's context.
    pub fn new(model: &'m Model, slots: usize) -> Result<Batch<'m>, RuntimeError> {
        Batch::with_micro_batches(model, slots, 1)
    }

    /// A batch of `slots` rows in `micro_batches` groups of equal size. With pipeline stages, a step
    /// keeps the groups in flight together: stage k runs group g while stage k - 1 runs group g + 1,
    /// so N stages on N devices overlap (one group leaves every stage but one idle).
    pub fn with_micro_batches(
        model: &'m Model,
        slots: usize,
        micro_batches: usize,
    ) -> Result<Batch<'m>, RuntimeError> {
        if micro_batches == 0 || slots == 0 || slots % micro_batches != 0 || micro_batches > 64 {
            return Err(RuntimeError::option(
                "micro-batches",
                format!("{slots} slots in {micro_batches} micro-batches: use 1 to 64 micro-batches that divide the slots"),
            ));
        }
        let per_call = crate::session::max_tokens_per_call(&model.bundle.manifest)
            .unwrap_or(usize::MAX)
            .max(1);
        let group_slots = slots / micro_batches;
        let caches = (0..micro_batches)
            .map(|_| model.new_cache(group_slots, model.context()))
            .collect::<Result<_, _>>()?;
        Ok(Batch {
            model,
            caches,
            group_slots,
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

    /// The caches' preallocated bytes.
    pub fn kv_bytes(&self) -> crate::cache::KvBytes {
        let mut bytes = crate::cache::KvBytes {
            chunked: 0,
            full: 0,
        };
        for c in &self.caches {
            bytes.chunked += c.bytes().chunked;
            bytes.full += c.bytes().full;
        }
        bytes
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
            return Err(RuntimeError::EmptyPrompt);
        }
        crate::decode::check_ids(m.model.vocab_size, &ids)?;
        crate::decode::check_room(ids.len(), params.max_new_tokens, self.caches[0].context())?;
        if !features.is_empty() {
            let patch = m
                .vision
                .as_ref()
                .map(|v| v.tokens.patch)
                .ok_or(RuntimeError::NoVision)?;
            let patches = ids.iter().filter(|&&t| t == patch).count();
            if patches * m.model.hidden_size != features.len() {
                return Err(RuntimeError::ImageMismatch(format!(
                    "{} image feature values for {patches} <|patch|> tokens of width {}",
                    features.len(),
                    m.model.hidden_size
                )));
            }
        }
        // A free slot of the micro-batch running fewest rows, so the groups in flight stay even.
        let busy = |g: usize| {
            self.rows[g * self.group_slots..(g + 1) * self.group_slots]
                .iter()
                .filter(|r| r.is_some())
                .count()
        };
        let group = (0..self.caches.len())
            .filter(|&g| busy(g) < self.group_slots)
            .min_by_key(|&g| busy(g));
        let slot = group
            .and_then(|g| {
                (g * self.group_slots..(g + 1) * self.group_slots).find(|&s| self.rows[s].is_none())
            })
            .ok_or_else(|| {
                RuntimeError::Call(format!("all {} slots are taken", self.rows.len()))
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

    /// Runs one decoder call per micro-batch over every running sequence and returns what it
    /// produced (empty when nothing runs).
    pub fn step(&mut self) -> Result<Vec<BatchEvent>, RuntimeError> {
        let mut events = std::mem::take(&mut self.finished);
        let plans: Vec<(usize, StepPlan)> = (0..self.caches.len())
            .map(|g| (g, self.group_plan(g)))
            .filter(|(_, plan)| !plan.is_empty())
            .collect();
        if plans.is_empty() {
            return Ok(events);
        }
        let h = self.model.bundle.manifest.model.hidden_size;
        let group_slots = self.group_slots;
        let inputs: Vec<Vec<RowInput>> = plans
            .iter()
            .map(|(_, plan)| {
                plan.iter()
                    .map(|(slot, ids, rows)| {
                        let row = self.rows[*slot].as_ref().expect("active");
                        RowInput {
                            slot: slot % group_slots,
                            start: row.position,
                            ids,
                            features: &row.features[rows.start * h..rows.end * h],
                        }
                    })
                    .collect()
            })
            .collect();
        let outputs = if plans.len() > 1 && self.model.stages.len() > 1 {
            let mut caches: Vec<Option<&mut KvCache>> = self.caches.iter_mut().map(Some).collect();
            let groups = plans
                .iter()
                .zip(&inputs)
                .map(|((g, _), rows)| (caches[*g].take().expect("one plan per group"), &rows[..]))
                .collect();
            self.model.run_groups(groups)?
        } else {
            let mut outputs = Vec::with_capacity(plans.len());
            for ((g, _), rows) in plans.iter().zip(&inputs) {
                outputs.push(self.model.run_rows(
                    &mut self.caches[*g],
                    rows,
                    false,
                    &[],
                    &mut |_| Ok(()),
                )?);
            }
            outputs
        };
        drop(inputs);
        for ((_, plan), out) in plans.into_iter().zip(outputs) {
            self.apply(plan, out.rows, &mut events);
        }
        Ok(events)
    }

    /// The tokens of group `g`'s running rows for the next call (empty when none runs).
    fn group_plan(&self, g: usize) -> StepPlan {
        let cache = &self.caches[g];
        let slots = g * self.group_slots..(g + 1) * self.group_slots;
        let active: Vec<usize> = slots.clone().filter(|&s| self.rows[s].is_some()).collect();
        if active.is_empty() {
            return Vec::new();
        }
        // Tokens each row wants: the rest of its prompt, or the token it sampled last.
        let wanted = |row: &Row| match row.next {
            Some(_) => 1,
            None => row.prompt.len() - row.fed,
        };
        let mut width = self.per_call;
        if active.len() < slots.len() {
            width = width.min(cache.room(0));
        }
        let (mut longest, mut decoding) = (1, false);
        for &slot in &active {
            let row = self.rows[slot].as_ref().expect("active");
            width = width.min(cache.room(row.position));
            longest = longest.max(wanted(row));
            decoding |= row.next.is_some();
        }
        // Every slot computes `width` tokens: while rows decode, a prefill chunk costs each of them as
        // much, so prompts then advance by at most `PREFILL_BESIDE_DECODE` tokens per step.
        if decoding {
            width = width.min(PREFILL_BESIDE_DECODE);
        }
        let width = width.min(longest).max(1);
        let patch = self
            .model
            .bundle
            .manifest
            .vision
            .as_ref()
            .map(|v| v.tokens.patch);
        active
            .into_iter()
            .map(|slot| {
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
                (slot, ids, rows)
            })
            .collect()
    }

    /// Advances the rows of `plan` by a call's logits: samples, reports and ends sequences.
    fn apply(&mut self, plan: StepPlan, logits: Vec<Vec<f32>>, events: &mut Vec<BatchEvent>) {
        for ((slot, ids, rows), logits) in plan.into_iter().zip(logits) {
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
    }
}
