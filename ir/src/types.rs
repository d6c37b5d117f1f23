//! Tensor types of the IR: element types and shapes whose dimensions may be symbolic.

use std::fmt;

/// Element type of a tensor value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// float8 e4m3 ("fn" variant: no infinities, one NaN), as stored by FP8 checkpoints.
    F8E4M3,
    I8,
    /// Signed 4-bit integers, packed two per byte (low nibble first).
    I4,
    I32,
    I64,
    Bool,
}

impl DType {
    /// Bits one element occupies in storage.
    pub fn bits(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 32,
            DType::F16 | DType::BF16 => 16,
            DType::F8E4M3 | DType::I8 | DType::Bool => 8,
            DType::I4 => 4,
            DType::I64 => 64,
        }
    }

    /// Whether the type holds floating-point values.
    pub fn is_float(self) -> bool {
        match self {
            DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 => true,
            DType::I8 | DType::I4 | DType::I32 | DType::I64 | DType::Bool => false,
        }
    }

    /// Whether the type holds integers usable as indices.
    pub fn is_index(self) -> bool {
        matches!(self, DType::I32 | DType::I64)
    }

    /// The short lowercase name used by the printer and in error messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "f8e4m3",
            DType::I8 => "i8",
            DType::I4 => "i4",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::Bool => "bool",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A dimension that is only known when the graph runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SymDim {
    /// Number of sequences in a batch.
    Batch,
    /// Number of new tokens in this call (the prompt in prefill, 1 in decode).
    Seq,
    /// Number of tokens already held in the KV cache.
    Past,
    /// `Past + Seq`: the key/value length after this call.
    Total,
    /// Number of image feature rows (image tiles x tokens per tile).
    Features,
    /// Tokens per row whose logits a call returns ([`crate::Op::PickRows`]).
    Picked,
    /// Cache entries one attention reads in this call ([`crate::Op::CacheView`]): at most its cache
    /// length, and not the same size in chunked and full layers.
    Keys,
}

impl SymDim {
    /// The name the printer uses.
    pub fn name(self) -> &'static str {
        match self {
            SymDim::Batch => "batch",
            SymDim::Seq => "seq",
            SymDim::Past => "past",
            SymDim::Total => "total",
            SymDim::Features => "features",
            SymDim::Keys => "keys",
            SymDim::Picked => "picked",
        }
    }
}

/// One dimension of a shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    Fixed(usize),
    Sym(SymDim),
}

impl Dim {
    /// The fixed size, if the dimension is not symbolic.
    pub fn fixed(self) -> Option<usize> {
        match self {
            Dim::Fixed(n) => Some(n),
            Dim::Sym(_) => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s.name()),
        }
    }
}

/// A tensor shape; rank 0 is a scalar.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    /// A shape of fixed dimensions.
    pub fn fixed(dims: &[usize]) -> Shape {
        Shape(dims.iter().map(|&d| Dim::Fixed(d)).collect())
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// The dimensions as plain sizes, if none is symbolic.
    pub fn as_fixed(&self) -> Option<Vec<usize>> {
        self.0.iter().map(|d| d.fixed()).collect()
    }

    /// The last dimension, if any.
    pub fn last(&self) -> Option<Dim> {
        self.0.last().copied()
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// The type of a value: element type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    /// Builds a type from an element type and dimensions.
    pub fn new(dtype: DType, dims: Vec<Dim>) -> TensorType {
        TensorType {
            dtype,
            shape: Shape(dims),
        }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}

/// Sizes of the symbolic dimensions for one evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DimBindings {
    pub batch: usize,
    pub seq: usize,
    pub past: usize,
    /// Image feature rows; `None` when no input binds them (a graph that produces them infers the size).
    pub features: Option<usize>,
    /// Tokens per row whose logits are returned.
    pub picked: usize,
}

impl DimBindings {
    /// The size of `dim` under these bindings.
    pub fn resolve(&self, dim: Dim) -> usize {
        match dim {
            Dim::Fixed(n) => n,
            Dim::Sym(SymDim::Batch) => self.batch,
            Dim::Sym(SymDim::Seq) => self.seq,
            Dim::Sym(SymDim::Past) => self.past,
            Dim::Sym(SymDim::Total) => self.past + self.seq,
            Dim::Sym(SymDim::Features) => self.features.unwrap_or(0),
            // An upper bound: a view's own size comes from its positions.
            Dim::Sym(SymDim::Keys) => self.past,
            Dim::Sym(SymDim::Picked) => self.picked,
        }
    }

    /// Every dimension of `shape` resolved.
    pub fn resolve_shape(&self, shape: &Shape) -> Vec<usize> {
        shape.0.iter().map(|&d| self.resolve(d)).collect()
    }
}
