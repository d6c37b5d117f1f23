//! Small constructors for ONNX protobuf messages (onnx-protobuf's generated types).

use crate::error::TargetError;
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::type_proto::{self, Tensor as TypeTensor};
use onnx_protobuf::{
    AttributeProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

use half::slice::HalfFloatSliceExt;
use herd_ir::{DType, Dim};

/// ONNX element type of an IR dtype.
pub fn onnx_dtype(dtype: DType) -> DataType {
    match dtype {
        DType::F32 => DataType::FLOAT,
        DType::F16 => DataType::FLOAT16,
        DType::BF16 => DataType::BFLOAT16,
        DType::F8E4M3 => DataType::FLOAT8E4M3FN,
        DType::I8 => DataType::INT8,
        DType::I4 => DataType::INT4,
        DType::I32 => DataType::INT32,
        DType::I64 => DataType::INT64,
        DType::Bool => DataType::BOOL,
    }
}

/// An attribute value.
#[derive(Clone)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Str(&'static str),
}

/// A node of `op_type` in `domain` ("" for the default domain).
pub fn node(
    name: &str,
    op_type: &str,
    domain: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<(&str, Attr)>,
) -> NodeProto {
    let mut n = NodeProto::new();
    n.name = name.to_string();
    n.op_type = op_type.to_string();
    n.domain = domain.to_string();
    n.input = inputs.iter().map(|s| s.to_string()).collect();
    n.output = outputs.iter().map(|s| s.to_string()).collect();
    n.attribute = attrs.into_iter().map(|(k, v)| attribute(k, v)).collect();
    n
}

fn attribute(name: &str, value: Attr) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.to_string();
    match value {
        Attr::Int(i) => {
            a.i = i;
            a.type_ = AttributeType::INT.into();
        }
        Attr::Float(f) => {
            a.f = f;
            a.type_ = AttributeType::FLOAT.into();
        }
        Attr::Ints(v) => {
            a.ints = v;
            a.type_ = AttributeType::INTS.into();
        }
        Attr::Str(s) => {
            a.s = s.as_bytes().to_vec();
            a.type_ = AttributeType::STRING.into();
        }
    }
    a
}

/// A graph input or output description; symbolic dims become named `dim_param`s.
pub fn value_info(name: &str, dtype: DType, dims: &[Dim]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    shape.dim = dims
        .iter()
        .map(|d| {
            let mut dim = Dimension::new();
            dim.value = Some(match d {
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
                Dim::Sym(s) => dimension::Value::DimParam(s.name().to_string()),
            });
            dim
        })
        .collect();
    let mut tensor = TypeTensor::new();
    tensor.elem_type = onnx_dtype(dtype) as i32;
    tensor.shape = Some(shape).into();
    let mut ty = TypeProto::new();
    ty.value = Some(type_proto::Value::TensorType(tensor));
    let mut info = ValueInfoProto::new();
    info.name = name.to_string();
    info.type_ = Some(ty).into();
    info
}

/// A small int64 initializer stored inline.
pub fn int64_tensor(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    let mut t = TensorProto::new();
    t.name = name.to_string();
    t.dims = dims.to_vec();
    t.data_type = DataType::INT64 as i32;
    t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    t
}

/// A small float initializer stored inline, in `dtype` (f32, f16 or bf16).
pub fn float_tensor(
    name: &str,
    dims: &[i64],
    values: &[f32],
    dtype: DType,
) -> Result<TensorProto, TargetError> {
    let mut t = TensorProto::new();
    t.name = name.to_string();
    t.dims = dims.to_vec();
    t.data_type = onnx_dtype(dtype) as i32;
    t.raw_data = encode_floats(values, dtype)?;
    Ok(t)
}

/// Values per parallel task when encoding (a few per core for a 16M-value block).
const ENCODE_RUN: usize = 1 << 16;

/// f32 values as little-endian f32 bytes.
pub fn encode_f32_into(values: &[f32], out: &mut [[u8; 4]]) {
    for (o, v) in out.iter_mut().zip(values) {
        *o = v.to_le_bytes();
    }
}

/// f32 values as little-endian bf16 bytes (round to nearest even).
pub fn encode_bf16_into(values: &[f32], out: &mut [[u8; 2]]) {
    for (o, &v) in out.iter_mut().zip(values) {
        *o = half::bf16::from_f32(v).to_le_bytes();
    }
}

/// f32 values as little-endian f16 bytes, through a small buffer with half's slice conversion (the
/// CPU's F16C instructions where it has them). Any number of values: the one-pass stream hands it
/// runs of a few dozen, [`encode_floats`] runs of [`ENCODE_RUN`].
pub fn encode_f16_into(values: &[f32], out: &mut [[u8; 2]]) {
    const BUFFER: usize = 64;
    let mut halves = [half::f16::ZERO; BUFFER];
    for (o, v) in out.chunks_mut(BUFFER).zip(values.chunks(BUFFER)) {
        let halves = &mut halves[..v.len()];
        halves.convert_from_f32_slice(v);
        for (b, h) in o.iter_mut().zip(halves.iter()) {
            *b = h.to_le_bytes();
        }
    }
}

/// `encode` over `values` in parallel runs.
fn encode_parallel<const N: usize>(values: &[f32], encode: fn(&[f32], &mut [[u8; N]])) -> Vec<u8> {
    use rayon::prelude::*;
    let mut out = vec![[0u8; N]; values.len()];
    out.par_chunks_mut(ENCODE_RUN)
        .zip(values.par_chunks(ENCODE_RUN))
        .for_each(|(o, v)| encode(v, o));
    out.into_flattened()
}

/// Little-endian bytes of `values` in `dtype` (f32, f16 or bf16; any other dtype is a herd bug).
pub fn encode_floats(values: &[f32], dtype: DType) -> Result<Vec<u8>, TargetError> {
    Ok(match dtype {
        DType::F32 => encode_parallel(values, encode_f32_into),
        DType::F16 => encode_parallel(values, encode_f16_into),
        DType::BF16 => encode_parallel(values, encode_bf16_into),
        DType::F8E4M3 | DType::I8 | DType::I4 | DType::I32 | DType::I64 | DType::Bool => {
            return Err(TargetError::bug(
                "ONNX encoding",
                format!("float values written as {}", dtype.name()),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parallel runs and the f16 buffer are invisible: every value lands where one-by-one encoding
    /// puts it, across run and buffer boundaries and in a short last run.
    #[test]
    fn encoding_equals_value_by_value() {
        let values: Vec<f32> = (0..3 * ENCODE_RUN + 4099)
            .map(|i| ((i as f32) * 0.37).sin() * 1e3 / (1.0 + (i % 97) as f32))
            .collect();
        let one_by_one =
            |f: &dyn Fn(f32) -> [u8; 2]| -> Vec<u8> { values.iter().flat_map(|&v| f(v)).collect() };
        assert_eq!(
            encode_floats(&values, DType::F16).unwrap(),
            one_by_one(&|v| half::f16::from_f32(v).to_le_bytes())
        );
        assert_eq!(
            encode_floats(&values, DType::BF16).unwrap(),
            one_by_one(&|v| half::bf16::from_f32(v).to_le_bytes())
        );
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(encode_floats(&values, DType::F32).unwrap(), f32_bytes);
        assert!(encode_floats(&values, DType::I8).is_err());
    }
}
