//! Benchmark timers: prefill and decode of arbitrary tokens (a step's work does not depend on the
//! token ids or on cached values), with one cache or with micro-batches through the pipeline stages.

use std::time::{Duration, Instant};

use crate::cache::KvCache;
use crate::decode::RowInput;
use crate::error::RuntimeError;
use crate::model::Model;

impl Model {
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
            return Err(RuntimeError::Call(
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
        let ids: Vec<i64> = (0..prompt_len)
            .map(|i| (i as i64 * 7919 + 13) % vocab)
            .collect();
        let mut cache = self.new_cache(batch, prompt_len + steps)?;
        let per_call = crate::session::max_tokens_per_call(m)
            .unwrap_or(usize::MAX)
            .max(1);
        let start = Instant::now();
        let mut done = 0;
        while done < prompt_len {
            let n = (prompt_len - done).min(per_call).min(cache.room(done));
            let rows: Vec<RowInput> = (0..batch)
                .map(|slot| RowInput {
                    slot,
                    start: done,
                    ids: &ids[done..done + n],
                    features: &[],
                })
                .collect();
            self.run_rows(&mut cache, &rows, false, &[], &mut |_| Ok(()))?;
            done += n;
        }
        let prefill = start.elapsed();
        let decode =
            self.time_decode(std::slice::from_mut(&mut cache), batch, prompt_len, steps)?;
        Ok((prefill, decode))
    }

    /// Times `steps` decode steps of `batch` rows after `context` positions whose entries are left
    /// as allocated (a step's work does not depend on the cached values): decode cost at a context
    /// without its prefill.
    pub fn time_decode_at(
        &self,
        batch: usize,
        context: usize,
        steps: usize,
    ) -> Result<Duration, RuntimeError> {
        let cache = self.new_cache(batch.max(1), context + steps)?;
        self.time_decode(&mut [cache], batch, context, steps)
    }

    /// Times `steps` decode steps of `rows` rows from position `from` in each of `caches` (one
    /// micro-batch each): in flight together through a staged model's stages, else one after another.
    fn time_decode(
        &self,
        caches: &mut [KvCache],
        rows: usize,
        from: usize,
        steps: usize,
    ) -> Result<Duration, RuntimeError> {
        let vocab = self.bundle.manifest.model.vocab_size as i64;
        let start = Instant::now();
        for s in 0..steps {
            let next: Vec<i64> = (0..rows)
                .map(|b| (b as i64 * 31 + s as i64) % vocab)
                .collect();
            let inputs: Vec<RowInput> = (0..rows)
                .map(|slot| RowInput {
                    slot,
                    start: from + s,
                    ids: &next[slot..slot + 1],
                    features: &[],
                })
                .collect();
            if caches.len() > 1 && self.stages.len() > 1 {
                self.run_groups(caches.iter_mut().map(|c| (c, &inputs[..])).collect())?;
            } else {
                for cache in caches.iter_mut() {
                    self.run_rows(cache, &inputs, false, &[], &mut |_| Ok(()))?;
                }
            }
        }
        Ok(start.elapsed())
    }

    /// Times `steps` decode steps of `groups` micro-batches of `rows` rows each after `context`
    /// positions: with pipeline stages the groups are in flight together ([`crate::Batch`]'s
    /// pipelined step); with one stage they run one after another.
    pub fn time_micro_batches(
        &self,
        groups: usize,
        rows: usize,
        context: usize,
        steps: usize,
    ) -> Result<Duration, RuntimeError> {
        if groups == 0 || rows == 0 || groups > 64 {
            return Err(RuntimeError::option(
                "micro-batches",
                "use 1 to 64 micro-batches of at least one row",
            ));
        }
        let mut caches = (0..groups)
            .map(|_| self.new_cache(rows, context + steps))
            .collect::<Result<Vec<_>, _>>()?;
        self.time_decode(&mut caches, rows, context, steps)
    }
}
