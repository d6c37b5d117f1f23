//! Writing quantized weights: streamed row blocks are quantized with `herd_ir::quant` (so the stored
//! integers are exactly what the reference evaluator dequantizes) and packed in the layout each consumer
//! reads. Scales are small (one per block) and written after the values.

use herd_ir::graph::NodeIndex;
use herd_ir::quant::{quantize, QuantScheme, QuantSpec};
use herd_ir::weights::{Transform, WeightRef};
use herd_ir::{DType, Op};
use ndarray::{ArrayD, IxDyn};
use onnx_protobuf::tensor_proto::DataType;

use super::emit::Emitter;
use super::moe::expert_matrix_ref;
use super::proto::{encode_floats, float_tensor, onnx_dtype};
use crate::error::TargetError;

/// How a quantized weight is laid out for its consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QLayout {
    /// Transposed to [K, N] for `MatMul` (signed; int scales [K/B, N], fp8 scales [N] on axis 1).
    MatMul,
    /// One expert of a stacked [E, ..] expert weight as a [K, N] `MatMul` operand, scales as `MatMul`'s.
    ExpertMatMul { expert: usize },
    /// As the weight is shaped (signed; scales shaped like the weight with K -> K/B, or 1 for fp8).
    Stored,
    /// `com.microsoft.QMoE`: [E, N, K] with K packed per byte for int4, stored unsigned (q + 8 or q + 128,
    /// the op's default zero point); scales [E, N, K/B].
    Experts,
    /// `com.microsoft.GatherBlockQuantized` over an embedding table [V, H] (blocks along H): packed and
    /// unsigned as `Experts` (the op's default zero points are 8 and 128 too); scales [V, H/B].
    Gather,
}

/// Names of a written quantized weight and the DequantizeLinear attributes that read it.
#[derive(Clone)]
pub struct QTensors {
    pub values: String,
    pub scales: String,
    pub axis: i64,
    pub block_size: Option<i64>,
}

/// What a quantized weight's values are read from, for one layout.
struct Source {
    layout: QLayout,
    /// The weight as checkpointed, unquantized.
    base: WeightRef,
    /// The weight as the layout stores it (transposed or one expert selected).
    src: WeightRef,
    /// `src`'s shape.
    shape: Vec<usize>,
    /// The weight's own spec.
    stored_spec: QuantSpec,
    /// The spec with K as `src` holds it.
    spec: QuantSpec,
    /// The initializers' base name.
    label: String,
}

impl Source {
    fn new(
        w: &WeightRef,
        spec: QuantSpec,
        layout: QLayout,
        name: &str,
    ) -> Result<Source, TargetError> {
        let base = WeightRef {
            quant: None,
            ..w.clone()
        };
        let (src, k_axis, suffix) = match layout {
            QLayout::MatMul => (
                base.clone().with(Transform::Transpose { perm: vec![1, 0] }),
                0,
                ".T.q".to_string(),
            ),
            QLayout::ExpertMatMul { expert } => (
                expert_matrix_ref(&base, spec.k_axis, expert),
                0,
                format!(".expert{expert}.q"),
            ),
            QLayout::Stored => (base.clone(), spec.k_axis, ".q".to_string()),
            QLayout::Experts => (base.clone(), spec.k_axis, ".qmoe".to_string()),
            QLayout::Gather => (base.clone(), spec.k_axis, ".qgather".to_string()),
        };
        let shape = src
            .shape()
            .map_err(|m| TargetError::bug("quantized weights", m))?;
        Ok(Source {
            layout,
            base,
            src,
            shape,
            stored_spec: spec,
            spec: QuantSpec { k_axis, ..spec },
            label: format!("{name}{suffix}"),
        })
    }
}

/// One written values initializer: its name, the scales computed on the way (none when fixed), and
/// Σ w² and Σ (w − dequantized)² for the SQNR.
struct WrittenValues {
    name: String,
    scales: Vec<f32>,
    signal: f64,
    noise: f64,
}

impl Emitter<'_> {
    /// Writes the quantized form of weight node `index` in `layout` (once per layout).
    pub(super) fn quantized(
        &mut self,
        index: NodeIndex,
        layout: QLayout,
    ) -> Result<QTensors, TargetError> {
        if let Some(q) = self.quantized_cache.get(&(index, layout)) {
            return Ok(q.clone());
        }
        let before = self.data.offset();
        let q = self.quantized_uncached(index, layout)?;
        *self.weight_bytes.entry(index).or_default() += self.data.offset() - before;
        self.quantized_cache.insert((index, layout), q.clone());
        Ok(q)
    }

    fn quantized_uncached(
        &mut self,
        index: NodeIndex,
        layout: QLayout,
    ) -> Result<QTensors, TargetError> {
        let node = self
            .graph
            .node(index)
            .ok_or_else(|| TargetError::bug("quantized weights", "missing weight"))?;
        let Op::Weight(w) = &node.op else {
            return Err(TargetError::bug_at(
                "quantized weights",
                &node.name,
                "not a weight",
            ));
        };
        let name = node.name.clone();
        let spec = w
            .effective_quant()
            .ok_or_else(|| TargetError::bug_at("quantized weights", &name, "not quantized"))?;
        let source = Source::new(w, spec, layout, &name)?;
        let fixed_scales = self.fixed_scales(w, &source)?;
        let written = self.write_values(&source, fixed_scales.as_ref())?;
        self.record_sqnr(&name, layout, written.signal, written.noise);
        let scales = match fixed_scales {
            Some(s) => s,
            None => {
                let shape = &source.shape;
                let scale_shape = match layout {
                    QLayout::MatMul | QLayout::ExpertMatMul { .. } => {
                        vec![shape[0] / spec.scheme.block().unwrap_or(shape[0]), shape[1]]
                    }
                    _ => source.spec.scale_shape(shape),
                };
                ArrayD::from_shape_vec(IxDyn(&scale_shape), written.scales)
                    .map_err(|e| TargetError::bug("quantized weights", e.to_string()))?
            }
        };
        let scales_name = self.write_scales(&source, &scales)?;
        let (axis, block_size) = match (layout, spec.scheme) {
            (QLayout::MatMul | QLayout::ExpertMatMul { .. }, QuantScheme::Fp8) => (1, None),
            (QLayout::MatMul | QLayout::ExpertMatMul { .. }, s) => (0, s.block().map(|b| b as i64)),
            (_, s) => (
                source.spec.k_axis as i64,
                Some(s.block().unwrap_or(source.shape[source.spec.k_axis]) as i64),
            ),
        };
        Ok(QTensors {
            values: written.name,
            scales: scales_name,
            axis,
            block_size,
        })
    }

    /// Scales fixed before any value is written: a pre-quantized weight's own (quantizing q * s with s
    /// gives back q exactly), or fp8's per-column scales when K is axis 0, which need one streamed pass
    /// over [N, K] before any row of [K, N] can be written.
    fn fixed_scales(
        &self,
        w: &WeightRef,
        source: &Source,
    ) -> Result<Option<ArrayD<f32>>, TargetError> {
        let (layout, spec) = (source.layout, source.stored_spec);
        if let Some(scales) = w.prequant_scales() {
            let scales = match layout {
                QLayout::MatMul => scales.with(Transform::Transpose { perm: vec![1, 0] }),
                QLayout::ExpertMatMul { expert } => expert_matrix_ref(&scales, spec.k_axis, expert),
                QLayout::Stored | QLayout::Experts | QLayout::Gather => scales,
            };
            return Ok(Some(self.graph.weights().load_f32(&scales)?));
        }
        if spec.scheme != QuantScheme::Fp8 || source.spec.k_axis != 0 {
            return Ok(None);
        }
        let mut scales = Vec::new();
        let column_spec = QuantSpec { k_axis: 1, ..spec };
        // The weight as [N, K]: its rows are the output channels.
        let rows_nk = match layout {
            QLayout::ExpertMatMul { expert } => {
                let selected = source.base.clone().with(Transform::Select {
                    axis: 0,
                    index: expert,
                });
                if spec.k_axis == 1 {
                    selected.with(Transform::Transpose { perm: vec![1, 0] })
                } else {
                    selected
                }
            }
            _ => source.base.clone(),
        };
        self.graph.weights().stream_rows::<TargetError>(
            &rows_nk,
            super::emit::STREAM_BLOCK_ELEMENTS,
            1,
            |_, block| {
                scales.extend(quantize(block, &column_spec, None).scales.iter().copied());
                Ok(())
            },
        )?;
        Ok(Some(
            ArrayD::from_shape_vec(IxDyn(&[1, scales.len()]), scales)
                .map_err(|e| TargetError::bug("quantized weights", e.to_string()))?,
        ))
    }

    /// Streams the weight's rows, quantizes them (with `fixed` scales if given) and writes the packed
    /// codes as one initializer.
    fn write_values(
        &mut self,
        source: &Source,
        fixed: Option<&ArrayD<f32>>,
    ) -> Result<WrittenValues, TargetError> {
        let (layout, spec, k_axis) = (source.layout, source.stored_spec, source.spec.k_axis);
        let (values_dtype, dims) = match (layout, spec.scheme) {
            (QLayout::Experts | QLayout::Gather, QuantScheme::Int4 { .. }) => {
                let mut d = source.shape.clone();
                *d.last_mut().expect("rank 2 or 3") /= 2;
                (DataType::UINT8, d)
            }
            (QLayout::Experts | QLayout::Gather, _) => (DataType::UINT8, source.shape.clone()),
            _ => (onnx_dtype(spec.scheme.storage()), source.shape.clone()),
        };
        let values_name = self.fresh(&source.label);
        let mut values = float_tensor(
            &values_name,
            &dims.iter().map(|&d| d as i64).collect::<Vec<_>>(),
            &[],
            DType::F32,
        )?;
        values.data_type = values_dtype as i32;
        let row_multiple = if k_axis == 0 {
            spec.scheme.block().unwrap_or(1)
        } else {
            1
        };
        let unsigned = matches!(layout, QLayout::Experts | QLayout::Gather);
        let mut scales: Vec<f32> = Vec::new();
        let mut carry: Option<u8> = None;
        let (mut signal, mut noise) = (0f64, 0f64);
        let offset = self.data.begin()?;
        let (data, written, total, progress) = (
            &mut self.data,
            &mut self.written,
            self.total_weight_bytes,
            &mut self.progress,
        );
        self.graph.weights().stream_rows::<TargetError>(
            &source.src,
            super::emit::STREAM_BLOCK_ELEMENTS,
            row_multiple,
            |rows, block| {
                // Per-channel scales along K = axis 0 cover every row, block scales [K / B, N] this
                // block's rows / B; otherwise the scales' rows are the block's rows.
                let fixed = fixed.map(|f| {
                    let scale_rows = match (k_axis, spec.scheme.block()) {
                        (0, None) => 0..f.shape()[0],
                        (0, Some(b)) => rows.start / b..rows.end / b,
                        _ => rows,
                    };
                    f.slice_axis(ndarray::Axis(0), scale_rows.into()).to_owned()
                });
                let q = quantize(block, &source.spec, fixed.as_ref());
                let (s, n) = signal_and_noise(block, &q.dequantized);
                signal += s;
                noise += n;
                if fixed.is_none() {
                    scales.extend(q.scales.iter().copied());
                }
                let bytes = pack(&q.values, spec.scheme, unsigned, &mut carry);
                *written += bytes.len() as u64;
                progress((*written).min(total), total);
                data.write_owned(bytes)
            },
        )?;
        if let Some(last) = carry {
            self.data.write(&[last])?;
        }
        self.data.end(&mut values, offset);
        self.initializers.push(values);
        Ok(WrittenValues {
            name: values_name,
            scales,
            signal,
            noise,
        })
    }

    /// Records the weight's SQNR; a stacked weight written expert by expert gets one over all experts.
    fn record_sqnr(&mut self, name: &str, layout: QLayout, signal: f64, noise: f64) {
        let sqnr = |signal: f64, noise: f64| {
            if noise == 0.0 {
                f64::INFINITY
            } else {
                10.0 * (signal / noise).log10()
            }
        };
        if let QLayout::ExpertMatMul { .. } = layout {
            let sums = self.expert_sqnr_sums.entry(name.to_string()).or_default();
            sums.0 += signal;
            sums.1 += noise;
            let value = sqnr(sums.0, sums.1);
            self.sqnr_db.insert(name.to_string(), value);
        } else {
            self.sqnr_db
                .entry(name.to_string())
                .or_insert(sqnr(signal, noise));
        }
    }

    /// Writes the scales initializer (1-D for per-axis fp8 DequantizeLinear) and returns its name.
    fn write_scales(
        &mut self,
        source: &Source,
        scales: &ArrayD<f32>,
    ) -> Result<String, TargetError> {
        let spec = source.stored_spec;
        let scale_dims: Vec<i64> = match (source.layout, spec.scheme) {
            (QLayout::MatMul | QLayout::ExpertMatMul { .. }, QuantScheme::Fp8) => {
                vec![scales.len() as i64]
            }
            _ => scales.shape().iter().map(|&d| d as i64).collect(),
        };
        let scales_name = self.fresh(&format!("{}.scales", source.label));
        let mut scale_tensor = float_tensor(&scales_name, &scale_dims, &[], spec.scale_dtype)?;
        let flat: Vec<f32> = scales.iter().copied().collect();
        self.data
            .append(&mut scale_tensor, &encode_floats(&flat, spec.scale_dtype)?)?;
        self.initializers.push(scale_tensor);
        Ok(scales_name)
    }

    /// A DequantizeLinear of a quantized weight: the float weight `MatMul` (or any float consumer) reads.
    pub(super) fn dequantized(
        &mut self,
        index: NodeIndex,
        transposed: bool,
    ) -> Result<String, TargetError> {
        let q = self.quantized(
            index,
            if transposed {
                QLayout::MatMul
            } else {
                QLayout::Stored
            },
        )?;
        let name = format!("{}.dequantized", q.values);
        Ok(self.dequantize_node(
            &name,
            &q.values.clone(),
            &q.scales.clone(),
            q.axis,
            q.block_size,
        ))
    }

    /// `DequantizeLinear(values, scales)` with the given axis and block size.
    pub(super) fn dequantize_node(
        &mut self,
        name: &str,
        values: &str,
        scales: &str,
        axis: i64,
        block_size: Option<i64>,
    ) -> String {
        let mut attrs = vec![("axis", super::proto::Attr::Int(axis))];
        if let Some(b) = block_size {
            attrs.push(("block_size", super::proto::Attr::Int(b)));
        }
        self.push(name, "DequantizeLinear", "", &[values, scales], attrs)
    }
}

/// Packs quantized codes: int4 two per byte (low nibble first, continuing across blocks through
/// `carry`), int8 one per byte, fp8 codes as they are. `unsigned` adds the zero point (8 or 128).
fn pack(
    codes: &ArrayD<i16>,
    scheme: QuantScheme,
    unsigned: bool,
    carry: &mut Option<u8>,
) -> Vec<u8> {
    match scheme {
        QuantScheme::Int4 { .. } => {
            let mut out = Vec::with_capacity(codes.len() / 2 + 1);
            for &c in codes.iter() {
                let nibble = if unsigned {
                    (c + 8) as u8
                } else {
                    (c as u8) & 0x0f
                };
                match carry.take() {
                    Some(low) => out.push(low | (nibble << 4)),
                    None => *carry = Some(nibble),
                }
            }
            out
        }
        QuantScheme::Int8 { .. } => codes
            .iter()
            .map(|&c| {
                if unsigned {
                    (c + 128) as u8
                } else {
                    c as i8 as u8
                }
            })
            .collect(),
        QuantScheme::Fp8 => codes.iter().map(|&c| c as u8).collect(),
    }
}

/// Sums of w² and (w - dequantized)² over a block, in parallel over contiguous runs.
fn signal_and_noise(weights: &ArrayD<f32>, dequantized: &ArrayD<f32>) -> (f64, f64) {
    use rayon::prelude::*;
    let sums = |w: &[f32], d: &[f32]| {
        w.iter().zip(d).fold((0f64, 0f64), |(s, n), (&w, &d)| {
            let e = (w - d) as f64;
            (s + w as f64 * w as f64, n + e * e)
        })
    };
    match (weights.as_slice(), dequantized.as_slice()) {
        // Chunk sums collected in order and added in order: the figure is the same on every run.
        (Some(w), Some(d)) => w
            .par_chunks(1 << 16)
            .zip(d.par_chunks(1 << 16))
            .map(|(w, d)| sums(w, d))
            .collect::<Vec<_>>()
            .into_iter()
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1)),
        _ => {
            let (w, d): (Vec<f32>, Vec<f32>) = weights
                .iter()
                .zip(dequantized.iter())
                .map(|(w, d)| (*w, *d))
                .unzip();
            sums(&w, &d)
        }
    }
}
