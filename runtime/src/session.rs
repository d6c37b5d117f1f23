//! A conversation: one slot of a KV cache allocated when it starts (the model's context) and its
//! position. Prompts are fed in calls that stop at chunk boundaries (see `cache.rs`).

use crate::cache::{KvBytes, KvCache};
use crate::error::RuntimeError;
use crate::model::Model;

/// One conversation on a [`Model`]: feed it tokens, read the logits of the last one.
pub struct Session<'m> {
    model: &'m Model,
    cache: KvCache,
    position: usize,
}

impl<'m> Session<'m> {
    pub(crate) fn new(model: &'m Model) -> Result<Session<'m>, RuntimeError> {
        Ok(Session {
            model,
            cache: model.new_cache(1, model.context())?,
            position: 0,
        })
    }

    /// Tokens consumed so far (the position of the next token).
    pub fn position(&self) -> usize {
        self.position
    }

    /// Runs `ids` after what the session holds; returns the logits of the last of them.
    pub fn feed(&mut self, ids: &[i64]) -> Result<Vec<f32>, RuntimeError> {
        self.feed_with_images(ids, &[])
    }

    /// Like [`Session::feed`], with image feature rows ([`Model::encode_images`]) that replace the
    /// embeddings of the `<|patch|>` tokens of `ids`, in order: one row per patch token. Prompts longer
    /// than a TensorRT bundle's per-call profile, or than what is left of a chunk, are fed in several
    /// calls.
    pub fn feed_with_images(
        &mut self,
        ids: &[i64],
        features: &[f32],
    ) -> Result<Vec<f32>, RuntimeError> {
        let m = &self.model.bundle.manifest;
        if ids.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        crate::decode::check_ids(m.model.vocab_size, ids)?;
        let end = self.position + ids.len();
        if end > self.cache.context() {
            return Err(RuntimeError::TooLong {
                len: end,
                max: self.cache.context(),
            });
        }
        if !features.is_empty() && m.vision.is_none() {
            return Err(RuntimeError::NoVision);
        }
        let mut last = Vec::new();
        let feed = crate::decode::Feed {
            start: self.position,
            ids,
            features,
            every_token: false,
            extra: &[],
        };
        self.model
            .feed_pieces(&mut self.cache, feed, &mut |l| last = l, &mut |_| Ok(()))?;
        self.position = end;
        Ok(last)
    }

    /// The session's cache buffers.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Bytes of the session's preallocated cache.
    pub fn kv_bytes(&self) -> KvBytes {
        self.cache.bytes()
    }
}

/// Most tokens one decoder call takes (None: no limit): a TensorRT bundle's profile bounds `input_ids`
/// (`input_ids:BxS`); longer prompts are fed in several calls.
pub fn max_tokens_per_call(m: &crate::manifest::Manifest) -> Option<usize> {
    let profile = &m.tensorrt.as_ref()?.profile_max_shapes;
    profile
        .split(',')
        .find_map(|entry| entry.strip_prefix(&format!("{}:", m.graph.input_ids)))
        .and_then(|shape| shape.split('x').nth(1))
        .and_then(|s| s.parse().ok())
}
