//! Weight quantization schemes and their exact arithmetic. One function computes scales and quantized
//! values; the reference evaluator uses its dequantized values (fake quantization) and the targets store
//! its integers and scales, so both see identical rounding.
//!
//! - int4 / int8: symmetric, blocks of `block` values along the input (K) axis, one scale per block,
//!   `q = clamp(round_half_even(w / scale), -qmax - 1, qmax)` (qmax 7 or 127). The scale is
//!   `α max|w| / qmax` with α the first of a fixed grid (1, then downwards) that gives the least squared
//!   error over the block ([`ScaleSearch::Clip`], the default), or α = 1 ([`ScaleSearch::Absmax`]).
//! - fp8: float8 e4m3fn with one scale per output channel (all of K): `scale = max|w| / 448`,
//!   `q = e4m3(w / scale)` rounded to nearest even.
//!
//! Scales are rounded to their storage dtype (f32 or f16) before the values are quantized with them.

use ndarray::{ArrayD, Axis, IxDyn, Zip};

use crate::types::DType;
use crate::weights::f8e4m3_to_f32;

/// A weight quantization scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantScheme {
    Int4 { block: usize },
    Int8 { block: usize },
    Fp8,
}

impl QuantScheme {
    /// Parses `int4`, `int4:64`, `int8:128`, `fp8` (int blocks default to 64).
    pub fn parse(text: &str) -> Result<QuantScheme, String> {
        let (name, block) = match text.split_once(':') {
            Some((n, b)) => (
                n,
                Some(
                    b.parse::<usize>()
                        .map_err(|_| format!("block size `{b}` is not a number"))?,
                ),
            ),
            None => (text, None),
        };
        let block = block.unwrap_or(64);
        let check = |block: usize| {
            if [32, 64, 128].contains(&block) {
                Ok(block)
            } else {
                Err(format!(
                    "block size {block} is not supported: use 32, 64 or 128"
                ))
            }
        };
        match name {
            "int4" => Ok(QuantScheme::Int4 {
                block: check(block)?,
            }),
            "int8" => Ok(QuantScheme::Int8 {
                block: check(block)?,
            }),
            "fp8" if text.contains(':') => {
                Err("fp8 takes no block size (one scale per output channel)".into())
            }
            "fp8" => Ok(QuantScheme::Fp8),
            other => Err(format!(
                "unknown quantization `{other}`: use int4[:BLOCK], int8[:BLOCK] or fp8"
            )),
        }
    }

    /// The name used on the command line and in manifests.
    pub fn name(self) -> String {
        match self {
            QuantScheme::Int4 { block } => format!("int4:{block}"),
            QuantScheme::Int8 { block } => format!("int8:{block}"),
            QuantScheme::Fp8 => "fp8".to_string(),
        }
    }

    /// Element type of the stored values.
    pub fn storage(self) -> DType {
        match self {
            QuantScheme::Int4 { .. } => DType::I4,
            QuantScheme::Int8 { .. } => DType::I8,
            QuantScheme::Fp8 => DType::F8E4M3,
        }
    }

    /// Values per scale along K, or None when one scale covers all of K.
    pub fn block(self) -> Option<usize> {
        match self {
            QuantScheme::Int4 { block } | QuantScheme::Int8 { block } => Some(block),
            QuantScheme::Fp8 => None,
        }
    }
}

/// How a block's scale is chosen from its values (int schemes; fp8 always takes absmax).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ScaleSearch {
    /// `max|w| / qmax`: the largest value maps to the largest code.
    Absmax,
    /// The clipped scale of least squared error over the block, from a fixed grid of fractions of
    /// absmax (1 included, so never worse than `Absmax` on the block).
    #[default]
    Clip,
}

impl ScaleSearch {
    /// The name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            ScaleSearch::Absmax => "absmax",
            ScaleSearch::Clip => "clip",
        }
    }
}

/// How one weight is quantized: the scheme, which axis of the weight is K (the input features), the
/// dtype scales are stored in, and how block scales are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    pub scheme: QuantScheme,
    pub k_axis: usize,
    pub scale_dtype: DType,
    pub search: ScaleSearch,
}

impl QuantSpec {
    /// Why this spec cannot apply to a weight of `shape`, if it cannot.
    pub fn check(&self, shape: &[usize]) -> Result<(), String> {
        let k = *shape
            .get(self.k_axis)
            .ok_or_else(|| format!("K axis {} outside rank {}", self.k_axis, shape.len()))?;
        if let Some(block) = self.scheme.block() {
            if k % block != 0 {
                return Err(format!(
                    "K = {k} is not a multiple of the block size {block}"
                ));
            }
        }
        if !matches!(self.scale_dtype, DType::F32 | DType::F16) {
            return Err(format!(
                "scales must be f32 or f16, not {}",
                self.scale_dtype
            ));
        }
        Ok(())
    }

    /// Shape of the scales for a weight of `shape`: K becomes K / block (1 for fp8).
    pub fn scale_shape(&self, shape: &[usize]) -> Vec<usize> {
        let mut s = shape.to_vec();
        s[self.k_axis] = self.scheme.block().map_or(1, |b| shape[self.k_axis] / b);
        s
    }
}

/// A quantized weight: integer values (int4 in -8..=7, int8, or e4m3 codes as u8 bit patterns in an i16
/// carrier for uniformity), their scales, and the dequantized values.
pub struct Quantized {
    /// Quantized values in the weight's shape: integers for int schemes, e4m3 bit patterns for fp8.
    pub values: ArrayD<i16>,
    /// Scales in [`QuantSpec::scale_shape`], already rounded to the scale dtype.
    pub scales: ArrayD<f32>,
    /// `values * scale`, the weight the quantized graph computes with.
    pub dequantized: ArrayD<f32>,
}

fn round_scale(s: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F16 => half::f16::from_f32(s).to_f32(),
        _ => s,
    }
}

/// Quantizes `w` by `spec`. Scales come from `scales` when given (computed by an earlier pass over the
/// same weight), else from the values themselves; K must be whole in `w`.
pub fn quantize(w: &ArrayD<f32>, spec: &QuantSpec, scales: Option<&ArrayD<f32>>) -> Quantized {
    let k = spec.k_axis;
    let block = spec.scheme.block().unwrap_or(w.shape()[k]).max(1);
    let scales = match scales {
        Some(s) => s.clone(),
        None => {
            let mut s = ArrayD::<f32>::zeros(IxDyn(&spec.scale_shape(w.shape())));
            Zip::from(w.lanes(Axis(k)))
                .and(s.lanes_mut(Axis(k)))
                .par_for_each(|lane, mut out| {
                    // One block at a time, contiguous whatever the lane's stride.
                    let mut values = vec![0f32; block];
                    for (b, o) in out.iter_mut().enumerate() {
                        for (v, i) in values.iter_mut().zip(b * block..) {
                            *v = lane[i];
                        }
                        *o = block_scale(&values, spec.scheme, spec.scale_dtype, spec.search);
                    }
                });
            s
        }
    };
    let mut values = ArrayD::<i16>::zeros(w.raw_dim());
    let mut dequantized = ArrayD::<f32>::zeros(w.raw_dim());
    Zip::from(w.lanes(Axis(k)))
        .and(values.lanes_mut(Axis(k)))
        .and(dequantized.lanes_mut(Axis(k)))
        .and(scales.lanes(Axis(k)))
        .par_for_each(|lane, mut q, mut d, s| {
            for i in 0..lane.len() {
                let (code, value) = quantize_value(lane[i], s[i / block], spec.scheme);
                q[i] = code;
                d[i] = value;
            }
        });
    Quantized {
        values,
        scales,
        dequantized,
    }
}

/// Fractions of absmax [`ScaleSearch::Clip`] tries, in order (the first of equal errors wins): int4 down
/// to 0.7 in steps of 0.03, int8 (whose rounding error is 16 times smaller) down to 0.9 in steps of 0.01.
fn clip_grid(scheme: QuantScheme) -> impl Iterator<Item = f32> {
    let step = match scheme {
        QuantScheme::Int4 { .. } => 0.03,
        _ => 0.01,
    };
    (0..=10).map(move |i| 1.0 - step * i as f32)
}

/// The largest code magnitude a scale maps absmax to: 7 (int4), 127 (int8), 448 (fp8).
fn qmax(scheme: QuantScheme) -> f32 {
    match scheme {
        QuantScheme::Int4 { .. } => 7.0,
        QuantScheme::Int8 { .. } => 127.0,
        QuantScheme::Fp8 => 448.0,
    }
}

/// The codes an int scheme may store, as floats: -8..=7 or -128..=127 (fp8: ±448).
pub fn code_range(scheme: QuantScheme) -> (f32, f32) {
    match scheme {
        QuantScheme::Int4 { .. } => (-8.0, 7.0),
        QuantScheme::Int8 { .. } => (-128.0, 127.0),
        QuantScheme::Fp8 => (-448.0, 448.0),
    }
}

/// The scale of one block of values (one output channel for fp8), rounded to `scale_dtype`: absmax / qmax,
/// or for int schemes under [`ScaleSearch::Clip`] the grid's scale of least squared error.
pub fn block_scale(
    values: &[f32],
    scheme: QuantScheme,
    scale_dtype: DType,
    search: ScaleSearch,
) -> f32 {
    if search == ScaleSearch::Absmax || scheme == QuantScheme::Fp8 {
        let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        return round_scale(amax / qmax(scheme), scale_dtype);
    }
    let (lo, hi) = code_range(scheme);
    least_error_scale(values, scheme, scale_dtype, clip_grid(scheme), |scale| {
        rounding_error(values, scale, lo, hi) as f64
    })
}

/// Among absmax scaled by each of `fractions` (rounded to `scale_dtype`), the scale of least
/// `error`; the first of equal errors wins, and an all-zero block gets 0.
fn least_error_scale(
    values: &[f32],
    scheme: QuantScheme,
    scale_dtype: DType,
    fractions: impl Iterator<Item = f32>,
    error: impl Fn(f32) -> f64,
) -> f32 {
    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let absmax = round_scale(amax / qmax(scheme), scale_dtype);
    if absmax == 0.0 {
        return absmax;
    }
    let mut best = (f64::INFINITY, absmax);
    for fraction in fractions {
        let scale = round_scale(amax * fraction / qmax(scheme), scale_dtype);
        if scale == 0.0 {
            continue;
        }
        let e = error(scale);
        if e < best.0 {
            best = (e, scale);
        }
    }
    best.1
}

/// Fractions of absmax [`weighted_block_scale`] tries: finer than [`clip_grid`] and wider (int4 down to
/// 0.5 in steps of 0.01, int8 down to 0.8 in steps of 0.004), since a few heavily weighted values
/// decide the error and a finer grid lets them land near a code.
fn weighted_grid(scheme: QuantScheme) -> impl Iterator<Item = f32> {
    let step = match scheme {
        QuantScheme::Int4 { .. } => 0.01,
        _ => 0.004,
    };
    (0..=50).map(move |i| 1.0 - step * i as f32)
}

/// The scale of one int block that minimises the activation-weighted rounding error
/// Σ_j weights_j (v_j − q_j · scale)², with `weights` the block's columns of the inputs' Hessian diagonal
/// (Σ x_j² over calibration rows): the output error of the block when its inputs are uncorrelated. The
/// salient inputs' weights are then rounded finely at the cost of the others'. With all weights equal
/// it is the least squared error over [`weighted_grid`]; with all zero, [`block_scale`] by `Clip`.
pub fn weighted_block_scale(
    values: &[f32],
    weights: &[f32],
    scheme: QuantScheme,
    scale_dtype: DType,
) -> f32 {
    debug_assert_eq!(values.len(), weights.len());
    if scheme == QuantScheme::Fp8 || !weights.iter().any(|&w| w > 0.0) {
        return block_scale(values, scheme, scale_dtype, ScaleSearch::Clip);
    }
    let (lo, hi) = code_range(scheme);
    least_error_scale(
        values,
        scheme,
        scale_dtype,
        weighted_grid(scheme),
        |scale| {
            let inverse = 1.0 / scale;
            values
                .iter()
                .zip(weights)
                .map(|(&v, &w)| {
                    let d = v - (round_half_even(v * inverse)).clamp(lo, hi) * scale;
                    w as f64 * (d * d) as f64
                })
                .sum()
        },
    )
}

/// Σ (v − clamp(round(v / scale)) · scale)² over `values`, in eight lanes the compiler vectorizes. It
/// only ranks candidate scales: every |v / scale| here is below 2^22, so rounding by the magic constant
/// needs no range check, and v · (1 / scale) may round differently from the quantizer's v / scale.
fn rounding_error(values: &[f32], scale: f32, lo: f32, hi: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23, as in `round_half_even`
    let inverse = 1.0 / scale;
    let error = |v: f32| {
        let q = ((v * inverse + MAGIC) - MAGIC).clamp(lo, hi);
        let d = v - q * scale;
        d * d
    };
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| error(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += error(v);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// One value: its code and its dequantized value.
fn quantize_value(v: f32, scale: f32, scheme: QuantScheme) -> (i16, f32) {
    if scale == 0.0 {
        return (0, 0.0);
    }
    match scheme {
        QuantScheme::Int4 { .. } | QuantScheme::Int8 { .. } => {
            let (lo, hi) = code_range(scheme);
            let q = round_half_even(v / scale).clamp(lo, hi);
            (q as i16, q * scale)
        }
        QuantScheme::Fp8 => {
            let code = f32_to_f8e4m3(v / scale);
            (code as i16, f8e4m3_to_f32(code) * scale)
        }
    }
}

/// Round half to even for |x| < 2^22 (all quantized magnitudes here are at most 448): adding and
/// subtracting 1.5 * 2^23 leaves x rounded by the FPU's default round-to-nearest-even mode. The same
/// result as `f32::round_ties_even`, without its libm call.
#[inline]
pub(crate) fn round_half_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    if x.abs() < 4_194_304.0 {
        (x + MAGIC) - MAGIC
    } else {
        x.round_ties_even()
    }
}

/// Rounds to the nearest float8 e4m3fn value (ties to even), saturating at ±448; NaN stays NaN.
pub fn f32_to_f8e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return 0x7f;
    }
    let a = x.abs().min(448.0);
    let min_normal = 2f32.powi(-6);
    if a < min_normal {
        // Subnormals: multiples of 2^-9.
        let r = (a * 512.0).round_ties_even() as u8;
        return sign | if r >= 8 { 0x08 } else { r };
    }
    let e = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
    let mut r = (a / 2f32.powi(e - 3)).round_ties_even() as i32; // 8..=16
    let mut e = e;
    if r == 16 {
        r = 8;
        e += 1;
    }
    if e > 8 || (e == 8 && r > 14) {
        return sign | 0x7e; // 448
    }
    sign | (((e + 7) as u8) << 3) | (r - 8) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f8_encoding_round_trips_and_rounds_to_even() {
        for code in 0u8..=255 {
            let v = f8e4m3_to_f32(code);
            if v.is_nan() {
                continue;
            }
            let back = f32_to_f8e4m3(v);
            assert_eq!(f8e4m3_to_f32(back), v, "code {code:#x}");
        }
        assert_eq!(f8e4m3_to_f32(f32_to_f8e4m3(1.0625)), 1.0); // halfway between 1.0 and 1.125: even
        assert_eq!(f8e4m3_to_f32(f32_to_f8e4m3(1.1875)), 1.25); // halfway between 1.125 and 1.25: even
        assert_eq!(f8e4m3_to_f32(f32_to_f8e4m3(1000.0)), 448.0);
        assert_eq!(
            f8e4m3_to_f32(f32_to_f8e4m3(-3.0 * 2f32.powi(-10))),
            -2f32.powi(-8)
        ); // subnormal tie to even
    }

    #[test]
    fn int4_blocks_are_symmetric_and_exact() {
        let w = ArrayD::from_shape_vec(
            IxDyn(&[2, 64]),
            (0..128).map(|i| (i as f32 - 60.0) * 0.01).collect(),
        )
        .unwrap();
        let spec = QuantSpec {
            scheme: QuantScheme::Int4 { block: 32 },
            k_axis: 1,
            scale_dtype: DType::F32,
            search: ScaleSearch::Absmax,
        };
        let q = quantize(&w, &spec, None);
        assert_eq!(q.scales.shape(), &[2, 2]);
        assert!(q.values.iter().all(|&v| (-8..=7).contains(&v)));
        // The largest magnitude of each block maps to +-7 exactly.
        assert_eq!(q.scales[[0, 0]], w[[0, 0]].abs() / 7.0);
        assert_eq!(q.values[[0, 0]], -7);
        for (d, (&v, s)) in q.dequantized.iter().zip(
            q.values
                .iter()
                .zip(q.scales.iter().flat_map(|s| std::iter::repeat_n(*s, 32))),
        ) {
            assert_eq!(*d, v as f32 * s);
        }
        for ((idx, &d), &orig) in q.dequantized.indexed_iter().zip(w.iter()) {
            let scale = q.scales[[idx[0], idx[1] / 32]];
            assert!(
                (d - orig).abs() <= 0.5 * scale + 1e-7,
                "element {idx:?}: {d} vs {orig}"
            );
        }
    }

    /// Squared error of quantizing `w` ([rows, 64]) by `search`.
    fn squared_error(w: &ArrayD<f32>, scheme: QuantScheme, search: ScaleSearch) -> f64 {
        let spec = QuantSpec {
            scheme,
            k_axis: 1,
            scale_dtype: DType::F16,
            search,
        };
        let q = quantize(w, &spec, None);
        w.iter()
            .zip(q.dequantized.iter())
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum()
    }

    #[test]
    fn clipped_scales_beat_absmax_and_keep_exact_blocks() {
        // Heavy-tailed rows (a cube of a uniform variate), as trained weights are.
        let mut state = 12345u32;
        let values: Vec<f32> = (0..256 * 64)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let u = (state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0;
                u * u * u
            })
            .collect();
        let w = ArrayD::from_shape_vec(IxDyn(&[256, 64]), values).unwrap();
        for scheme in [
            QuantScheme::Int4 { block: 32 },
            QuantScheme::Int8 { block: 32 },
        ] {
            let absmax = squared_error(&w, scheme, ScaleSearch::Absmax);
            let clip = squared_error(&w, scheme, ScaleSearch::Clip);
            // int8's rounding error is small next to its clipping error, so clipping gains less.
            let bound = match scheme {
                QuantScheme::Int4 { .. } => 0.85,
                _ => 0.99,
            };
            eprintln!(
                "{scheme:?}: squared error clip / absmax {:.3}",
                clip / absmax
            );
            assert!(
                clip < bound * absmax,
                "{scheme:?}: clip {clip} vs absmax {absmax}"
            );
            // Per block, never worse: the grid starts at absmax.
            for row in w.outer_iter() {
                let row = row
                    .to_owned()
                    .into_shape_with_order(IxDyn(&[1, 64]))
                    .unwrap();
                let (a, c) = (
                    squared_error(&row, scheme, ScaleSearch::Absmax),
                    squared_error(&row, scheme, ScaleSearch::Clip),
                );
                assert!(c <= a, "{scheme:?}: a row got worse ({c} > {a})");
            }
        }
        // A block that absmax quantizes exactly keeps absmax's scale.
        let exact = ArrayD::from_shape_vec(
            IxDyn(&[1, 32]),
            (0..32).map(|i| ((i % 15) as f32 - 7.0) * 0.25).collect(),
        )
        .unwrap();
        let spec = QuantSpec {
            scheme: QuantScheme::Int4 { block: 32 },
            k_axis: 1,
            scale_dtype: DType::F32,
            search: ScaleSearch::Clip,
        };
        let q = quantize(&exact, &spec, None);
        assert_eq!(q.scales[[0, 0]], 0.25);
        assert_eq!(q.dequantized, exact);
    }

    #[test]
    fn fast_rounding_is_half_to_even() {
        for i in -40_000..40_000 {
            let x = i as f32 * 0.0625 + 0.001 * (i % 7) as f32;
            // Equal as numbers (the sign of a zero result may differ; the code is 0 either way).
            assert_eq!(round_half_even(x), x.round_ties_even(), "{x}");
        }
        for x in [0.5f32, 1.5, 2.5, -0.5, -1.5, -2.5, 447.5, -127.5] {
            assert_eq!(round_half_even(x), x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn parsing() {
        assert_eq!(
            QuantScheme::parse("int4").unwrap(),
            QuantScheme::Int4 { block: 64 }
        );
        assert_eq!(
            QuantScheme::parse("int8:128").unwrap(),
            QuantScheme::Int8 { block: 128 }
        );
        assert_eq!(QuantScheme::parse("fp8").unwrap(), QuantScheme::Fp8);
        assert!(QuantScheme::parse("int4:48")
            .unwrap_err()
            .contains("32, 64 or 128"));
        assert!(QuantScheme::parse("int3")
            .unwrap_err()
            .contains("unknown quantization"));
    }
}
