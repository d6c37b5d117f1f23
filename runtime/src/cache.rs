//! The KV cache: fixed buffers allocated once per set of slots on the session's device and bound as both
//! the `past_*` input and the `present_*` output of every call, so the graph's `TensorScatter` writes the
//! new entries in place and nothing of the cache crosses the session boundary.
//!
//! Per layer: full (NoPE) layers [slots, kv_heads, context, head_dim], entry j = position j; chunked
//! (RoPE) layers a ring of one chunk [slots, kv_heads, ring, head_dim], entry j = the position of the
//! current chunk congruent to j. A row's cache length is its next position. Two rules keep every call
//! exact, and [`KvCache::room`] states them: a row's tokens of one call stay inside one chunk (a ring
//! entry is overwritten only once no query of the call needs the old one), and fit the context.

use ort::memory::Allocator;
use ort::value::{DynTensor, Tensor};

use crate::error::RuntimeError;
use crate::manifest::{ElementType, KvNames, Manifest};

/// Bytes held by a KV cache, by layer type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvBytes {
    /// Chunked-attention (RoPE) layers: rings of one chunk.
    pub chunked: u64,
    /// Full-attention (NoPE) layers: the whole context.
    pub full: u64,
}

impl KvBytes {
    /// All layers.
    pub fn total(&self) -> u64 {
        self.chunked + self.full
    }
}

/// One layer's buffers.
pub(crate) struct LayerCache {
    pub(crate) past_key: String,
    pub(crate) past_value: String,
    pub(crate) present_key: String,
    pub(crate) present_value: String,
    pub(crate) key: DynTensor,
    pub(crate) value: DynTensor,
    /// Ring length of a chunked layer; None for a full layer.
    ring: Option<usize>,
    /// The pipeline stage whose graph reads and writes the layer.
    pub(crate) stage: usize,
}

/// Preallocated cache buffers for `slots` rows of up to `context` positions each.
pub struct KvCache {
    pub(crate) layers: Vec<LayerCache>,
    slots: usize,
    context: usize,
    /// The shortest ring (None without chunked layers).
    ring: Option<usize>,
    bytes: KvBytes,
}

/// The most elements one cache buffer may hold (ONNX Runtime and TensorRT index with 32-bit limits in
/// places; 2^31 elements is also 4 GiB of f16 per layer and side).
const MAX_BUFFER_ELEMENTS: u64 = 1 << 31;

impl KvCache {
    /// Allocates zeroed buffers (never-written entries are masked, but must not be NaN: a masked score
    /// is still computed) for `slots` rows of `context` positions with `allocator` (the session's device).
    pub(crate) fn allocate(
        m: &Manifest,
        kvs: &[KvNames],
        stage: usize,
        allocator: &Allocator,
        slots: usize,
        context: usize,
    ) -> Result<KvCache, RuntimeError> {
        if slots == 0 || context == 0 {
            return Err(RuntimeError::option(
                "KV cache",
                "a KV cache needs at least one slot and one position",
            ));
        }
        if context > m.model.max_positions {
            return Err(RuntimeError::option(
                "context",
                format!(
                    "{context} positions is more than the bundle's {} (compile with a larger --max-context)",
                    m.model.max_positions
                ),
            ));
        }
        let element = m.dtype;
        let (heads, dim) = (m.model.num_kv_heads, m.model.head_dim);
        let mut layers = Vec::with_capacity(kvs.len());
        let mut bytes = KvBytes {
            chunked: 0,
            full: 0,
        };
        for kv in kvs {
            // A ring's length is fixed in the graph; a full layer's is the context.
            let length = kv.ring.unwrap_or(context).max(1);
            let shape = [slots, heads, length, dim];
            let elements = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
            let Some(elements) = elements.filter(|&n| n <= MAX_BUFFER_ELEMENTS) else {
                return Err(RuntimeError::option(
                    "KV cache",
                    format!(
                        "layer {}'s KV buffer [{slots}, {heads}, {length}, {dim}] is too large: use fewer slots (--max-batch) or fewer positions (--kv-context)",
                        kv.layer
                    ),
                ));
            };
            let side = elements * element.bytes() as u64;
            if kv.ring.is_some() {
                bytes.chunked += 2 * side;
            } else {
                bytes.full += 2 * side;
            }
            layers.push(LayerCache {
                past_key: kv.past_key.clone(),
                past_value: kv.past_value.clone(),
                present_key: kv.present_key.clone(),
                present_value: kv.present_value.clone(),
                key: zeroed(allocator, element, shape)?,
                value: zeroed(allocator, element, shape)?,
                ring: kv.ring.map(|_| length),
                stage,
            });
        }
        let ring = layers.iter().filter_map(|l| l.ring).min();
        Ok(KvCache {
            layers,
            slots,
            context,
            ring,
            bytes,
        })
    }

    /// Adds the layers of another stage's cache of the same slots and context.
    pub(crate) fn absorb(&mut self, other: KvCache) {
        self.layers.extend(other.layers);
        self.ring = match (self.ring, other.ring) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.bytes.chunked += other.bytes.chunked;
        self.bytes.full += other.bytes.full;
    }

    /// Rows the cache holds.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Positions each row may hold.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Preallocated bytes.
    pub fn bytes(&self) -> KvBytes {
        self.bytes
    }

    /// Entry `index` of slot `slot` of layer `layer`'s keys (or values), [kv_heads * head_dim] as f32,
    /// for inspection: f32 buffers in host memory only.
    pub fn entry(
        &self,
        layer: usize,
        values: bool,
        slot: usize,
        index: usize,
    ) -> Result<Vec<f32>, RuntimeError> {
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| RuntimeError::Call(format!("no cache layer {layer}")))?;
        let tensor = if values { &l.value } else { &l.key };
        let (shape, data) = tensor.try_extract_tensor::<f32>()?;
        let (heads, length, dim) = (shape[1] as usize, shape[2] as usize, shape[3] as usize);
        if slot >= self.slots || index >= length {
            return Err(RuntimeError::Call(format!(
                "entry {index} of slot {slot} is outside [{}, {length}]",
                self.slots
            )));
        }
        Ok((0..heads)
            .flat_map(|h| {
                let at = ((slot * heads + h) * length + index) * dim;
                data[at..at + dim].to_vec()
            })
            .collect())
    }

    /// Most tokens a row at `position` may take in one call: up to the end of its chunk (the ring's
    /// length) and of the context.
    pub fn room(&self, position: usize) -> usize {
        let context = self.context.saturating_sub(position);
        match self.ring {
            Some(r) => context.min(r - position % r),
            None => context,
        }
    }
}

fn zeroed(
    allocator: &Allocator,
    element: ElementType,
    shape: [usize; 4],
) -> Result<DynTensor, RuntimeError> {
    fn fill<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Copy + 'static>(
        allocator: &Allocator,
        shape: [usize; 4],
        zero: T,
    ) -> Result<DynTensor, RuntimeError> {
        let mut t = Tensor::<T>::new(allocator, shape)?;
        if t.memory_info().is_cpu_accessible() {
            t.try_extract_tensor_mut::<T>()?.1.fill(zero);
        } else {
            // Device memory: copy zeros in from the host once.
            let host = Tensor::<T>::from_array((shape, vec![zero; shape.iter().product()]))?;
            host.copy_into(&mut t)?;
        }
        Ok(t.upcast())
    }
    match element {
        ElementType::F32 => fill(allocator, shape, 0f32),
        ElementType::F16 => fill(allocator, shape, half::f16::ZERO),
        ElementType::Bf16 => fill(allocator, shape, half::bf16::ZERO),
    }
}
