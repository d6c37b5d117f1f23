//! A conversation: its KV cache and position. Chunked-attention (RoPE) layers only attend inside the
//! current chunk, so after every step their caches keep just the positions of the current chunk before the
//! next token (`position % chunk`); NoPE layers keep the whole context, up to the bundle's maximum. The
//! graph derives key positions from each cache's length (`first position - past length + j`), so a
//! trimmed, contiguous cache is exactly what its masks expect.

use ndarray::{Axis, Slice};
use ort::value::{DynValue, Tensor};

use crate::error::RuntimeError;
use crate::model::{Cache, Model};

/// Bytes held by a session's KV cache, by layer type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvBytes {
    /// Chunked-attention (RoPE) layers: bounded by the chunk size.
    pub chunked: u64,
    /// Full-attention (NoPE) layers: grow with the context.
    pub full: u64,
}

impl KvBytes {
    /// All layers.
    pub fn total(&self) -> u64 {
        self.chunked + self.full
    }
}

/// One conversation on a [`Model`]: feed it tokens, read the logits of the last one.
pub struct Session<'m> {
    model: &'m Model,
    cache: Cache,
    position: usize,
}

impl<'m> Session<'m> {
    pub(crate) fn new(model: &'m Model) -> Result<Session<'m>, RuntimeError> {
        Ok(Session {
            model,
            cache: model.empty_cache(1)?,
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
    /// than a TensorRT bundle's per-call profile are fed in several calls.
    pub fn feed_with_images(
        &mut self,
        ids: &[i64],
        features: &[f32],
    ) -> Result<Vec<f32>, RuntimeError> {
        let m = &self.model.bundle.manifest;
        if ids.is_empty() {
            return Err(RuntimeError::Param("no tokens to feed".into()));
        }
        if let Some(bad) = ids
            .iter()
            .find(|&&t| t < 0 || t as usize >= m.model.vocab_size)
        {
            return Err(RuntimeError::Param(format!(
                "token id {bad} is outside the vocabulary 0..{}",
                m.model.vocab_size
            )));
        }
        let end = self.position + ids.len();
        if end > m.model.max_positions {
            return Err(RuntimeError::TooLong {
                len: end,
                max: m.model.max_positions,
            });
        }
        let h = m.model.hidden_size;
        let patches: Vec<usize> = match &m.vision {
            Some(v) if !features.is_empty() => {
                let at: Vec<usize> = (0..ids.len())
                    .filter(|&i| ids[i] == v.tokens.patch)
                    .collect();
                if at.len() * h != features.len() {
                    return Err(RuntimeError::Param(format!(
                        "{} image feature rows for {} <|patch|> tokens",
                        features.len() / h.max(1),
                        at.len()
                    )));
                }
                at
            }
            None if !features.is_empty() => {
                return Err(RuntimeError::Param(
                    "this bundle takes no images (it was compiled without a vision encoder)".into(),
                ))
            }
            _ => Vec::new(),
        };
        let per_call = max_tokens_per_call(m).unwrap_or(ids.len()).max(1);
        let mut logits = Vec::new();
        let mut row = 0;
        for (c, chunk) in ids.chunks(per_call).enumerate() {
            let offset = c * per_call;
            let here: Vec<i64> = patches
                .iter()
                .skip(row)
                .take_while(|&&p| p < offset + chunk.len())
                .map(|&p| (p - offset) as i64)
                .collect();
            let images = (!here.is_empty()).then(|| crate::model::ImageRows {
                features: features[row * h..(row + here.len()) * h].to_vec(),
                positions: here,
            });
            row += images.as_ref().map_or(0, |r| r.positions.len());
            let cache = std::mem::take(&mut self.cache);
            let (out, cache) = self
                .model
                .step(chunk, self.position, cache, images.as_ref())?;
            self.position += chunk.len();
            self.cache = self.bound(cache)?;
            logits = out;
        }
        Ok(logits)
    }

    /// Keeps only the current chunk's positions in the chunked layers' caches.
    fn bound(&self, cache: Cache) -> Result<Cache, RuntimeError> {
        let m = &self.model.bundle.manifest.model;
        let keep = self.position % m.attention_chunk_size.max(1);
        let element = crate::model::element_type(&self.model.bundle.manifest);
        cache
            .into_iter()
            .map(|(name, value)| {
                if is_full_layer(&name, &m.nope_layers) {
                    Ok((name, value))
                } else {
                    Ok((name, keep_last(value, keep, element)?))
                }
            })
            .collect()
    }

    /// Bytes of the cache now.
    pub fn kv_bytes(&self) -> KvBytes {
        let m = &self.model.bundle.manifest;
        let element = crate::model::element_type(m).bytes() as u64;
        let mut bytes = KvBytes {
            chunked: 0,
            full: 0,
        };
        for (name, value) in &self.cache {
            let n = elements(value) * element;
            if is_full_layer(name, &m.model.nope_layers) {
                bytes.full += n;
            } else {
                bytes.chunked += n;
            }
        }
        bytes
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

/// Whether the cache input `past_{key,value}.{layer}` belongs to a full-attention (NoPE) layer.
fn is_full_layer(name: &str, nope_layers: &[usize]) -> bool {
    name.rsplit('.')
        .next()
        .and_then(|l| l.parse::<usize>().ok())
        .is_some_and(|l| nope_layers.contains(&l))
}

fn elements(value: &DynValue) -> u64 {
    match value.dtype() {
        ort::value::ValueType::Tensor { shape, .. } => {
            shape.iter().map(|&d| d.max(0) as u64).product()
        }
        _ => 0,
    }
}

/// The last `keep` positions (axis 2) of a [batch, heads, length, head_dim] cache tensor.
fn keep_last(
    value: DynValue,
    keep: usize,
    element: crate::manifest::ElementType,
) -> Result<DynValue, RuntimeError> {
    fn cut<T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
        value: &DynValue,
        keep: usize,
    ) -> Result<Option<DynValue>, RuntimeError> {
        let view = value.try_extract_array::<T>()?;
        let len = view.shape()[2];
        if len <= keep {
            return Ok(None);
        }
        let kept = view
            .slice_axis(Axis(2), Slice::from(len - keep..len))
            .to_owned();
        Ok(Some(Tensor::from_array(kept)?.into_dyn()))
    }
    let trimmed = match element {
        crate::manifest::ElementType::F16 => cut::<half::f16>(&value, keep)?,
        crate::manifest::ElementType::Bf16 => cut::<half::bf16>(&value, keep)?,
        crate::manifest::ElementType::F32 => cut::<f32>(&value, keep)?,
    };
    Ok(trimmed.unwrap_or(value))
}
