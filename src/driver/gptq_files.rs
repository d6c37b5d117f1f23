//! GPTQ's results on disk and the graph rewrite that reads them: one safetensors file per matrix
//! (codes and block scales, or a float tensor for AWQ's folded norms and routers), mapped as extra
//! shards and pointed at by the weights they replace.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use herd_ir::gptq::{gptq, GptqMatrix, GptqOptions, Hessian};
use herd_ir::graph::NodeIndex;
use herd_ir::quant::QuantSpec;
use herd_ir::weights::{PartScale, Shard, TensorSource, Transform, WeightPart, WeightRef};
use herd_ir::{DType, Graph, Op};

use super::gptq::Matrix;

/// GPTQ's results, one safetensors file per matrix (`codes` [N, K] i8, `scales` [N, K / B]).
pub(super) struct MatrixWriter {
    pub dir: PathBuf,
    pub files: Vec<WrittenMatrix>,
    /// Per weight: Σ w² and Σ (w − q)² over its matrices.
    pub error: BTreeMap<String, (f64, f64)>,
    /// Matrices whose Hessian had fewer rows than K (rank-deficient: GPTQ can overfit them).
    pub undersampled: usize,
    pub bar: indicatif::ProgressBar,
    pub options: GptqOptions,
}

pub(super) struct WrittenMatrix {
    path: PathBuf,
    name: String,
    shape: Vec<usize>,
    /// GPTQ's codes and scales, or None for a float `values` tensor (AWQ's folded norms and routers).
    spec: Option<QuantSpec>,
}

impl MatrixWriter {
    /// Quantizes `matrix` (of weight `weight`, expert `expert`) by GPTQ against `hessian` and writes
    /// it; returns its index in `files`.
    pub(super) fn quantize(
        &mut self,
        weight: &str,
        expert: Option<usize>,
        matrix: &Matrix,
        hessian: &Hessian,
        spec: QuantSpec,
    ) -> Result<usize> {
        let name = match expert {
            Some(e) => format!("{weight} expert {e}"),
            None => weight.to_string(),
        };
        if hessian.rows() < matrix.k {
            self.undersampled += 1;
        }
        if hessian.k() != matrix.k {
            bail!(
                "herd bug: `{name}` has K = {} but its inputs {} features",
                matrix.k,
                hessian.k()
            );
        }
        let q: GptqMatrix = gptq(
            &matrix.values,
            matrix.n,
            matrix.k,
            &hessian.values(),
            spec.scheme,
            spec.scale_dtype,
            self.options,
        )
        .map_err(|e| anyhow::anyhow!("`{name}`: {e}"))?;
        let file = format!("{:05}.safetensors", self.files.len());
        let path = self.dir.join(&file);
        let block = spec.scheme.block().unwrap_or(matrix.k);
        let error = self.error.entry(weight.to_string()).or_default();
        for (w, d) in matrix.values.iter().zip(q.dequantized(matrix.k, block)) {
            error.0 += (*w as f64) * (*w as f64);
            error.1 += ((w - d) as f64) * ((w - d) as f64);
        }
        let codes: Vec<u8> = q.codes.iter().map(|&c| c as u8).collect();
        let scales: Vec<u8> = match spec.scale_dtype {
            DType::F16 => q
                .scales
                .iter()
                .flat_map(|&s| half::f16::from_f32(s).to_le_bytes())
                .collect(),
            _ => q.scales.iter().flat_map(|&s| s.to_le_bytes()).collect(),
        };
        let scale_dtype = match spec.scale_dtype {
            DType::F16 => safetensors::Dtype::F16,
            _ => safetensors::Dtype::F32,
        };
        let views = [
            (
                "codes",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::I8,
                    vec![matrix.n, matrix.k],
                    &codes,
                )?,
            ),
            (
                "scales",
                safetensors::tensor::TensorView::new(
                    scale_dtype,
                    vec![matrix.n, matrix.k / block],
                    &scales,
                )?,
            ),
        ];
        let tmp = path.with_extension("tmp");
        safetensors::serialize_to_file(views, None, &tmp)
            .with_context(|| format!("{}: cannot write GPTQ weights", tmp.display()))?;
        std::fs::rename(&tmp, &path)?;
        self.bar.inc(1);
        self.files.push(WrittenMatrix {
            path,
            name: format!("gptq/{file} ({name})"),
            shape: vec![matrix.n, matrix.k],
            spec: Some(spec),
        });
        Ok(self.files.len() - 1)
    }

    /// Writes float weight `name` ([shape], f32) as a `values` tensor; returns its index in `files`.
    pub(super) fn write_float(
        &mut self,
        name: &str,
        shape: Vec<usize>,
        values: &[f32],
    ) -> Result<usize> {
        let file = format!("{:05}.safetensors", self.files.len());
        let path = self.dir.join(&file);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), &bytes)?;
        let tmp = path.with_extension("tmp");
        safetensors::serialize_to_file([("values", view)], None, &tmp)
            .with_context(|| format!("{}: cannot write AWQ's weights", tmp.display()))?;
        std::fs::rename(&tmp, &path)?;
        self.files.push(WrittenMatrix {
            path,
            name: format!("gptq/{file} ({name})"),
            shape,
            spec: None,
        });
        Ok(self.files.len() - 1)
    }
}

/// Points each replaced weight at its written matrices: one [N, K] part per matrix, concatenated and
/// shaped back into the weight's layout.
pub(super) fn rewrite(
    graph: &mut Graph,
    writer: &MatrixWriter,
    replaced: &BTreeMap<NodeIndex, Vec<usize>>,
) -> Result<()> {
    let mut store = graph.weights().reopened()?;
    let mut ids = HashMap::new();
    for (i, m) in writer.files.iter().enumerate() {
        let shard = Shard::open(&m.path, &m.name)?;
        ids.insert(i, store.push(shard));
    }
    graph.replace_weights(Arc::new(store));
    for (&weight, files) in replaced {
        let node = graph.node(weight).context("herd bug: missing weight")?;
        let Op::Weight(old) = &node.op else {
            bail!("herd bug: not a weight");
        };
        let old_shape = old.shape().map_err(anyhow::Error::msg)?;
        let new = match (old.quant, writer.files[files[0]].spec) {
            (Some(spec), Some(_)) => quantized_ref(writer, &ids, files, &old_shape, spec)?,
            (None, None) => {
                let m = &writer.files[files[0]];
                WeightRef::single(WeightPart {
                    source: TensorSource {
                        shard: ids[&files[0]],
                        tensor: "values".into(),
                    },
                    dtype: DType::F32,
                    stored_shape: m.shape.clone(),
                    scale: None,
                })
            }
            _ => bail!("herd bug: `{}` rewritten in the wrong precision", node.name),
        };
        let new_shape = new.shape().map_err(anyhow::Error::msg)?;
        let effective = new.effective_quant().map(|q| (q.k_axis, q.scheme));
        let wanted = old.quant.map(|q| (q.k_axis, q.scheme));
        if new_shape != old_shape || effective != wanted {
            bail!(
                "herd bug: GPTQ's `{}` is {new_shape:?} quantized {effective:?}, not {old_shape:?} {wanted:?}",
                node.name,
            );
        }
        let ty = new.ty();
        let node = graph.node_mut(weight).context("herd bug: missing weight")?;
        node.op = Op::Weight(new);
        node.outputs = vec![ty];
    }
    Ok(())
}

/// GPTQ's matrices of a weight as pre-quantized parts: one [N, K] part per matrix, concatenated and
/// shaped back into the weight's layout.
fn quantized_ref(
    writer: &MatrixWriter,
    ids: &HashMap<usize, herd_ir::weights::ShardId>,
    files: &[usize],
    old_shape: &[usize],
    spec: QuantSpec,
) -> Result<WeightRef> {
    let parts: Vec<WeightPart> = files
        .iter()
        .map(|i| {
            let m = &writer.files[*i];
            let shard = ids[i];
            WeightPart {
                source: TensorSource {
                    shard,
                    tensor: "codes".into(),
                },
                dtype: DType::I8,
                stored_shape: m.shape.clone(),
                scale: Some(PartScale {
                    source: TensorSource {
                        shard,
                        tensor: "scales".into(),
                    },
                    dtype: match spec.scale_dtype {
                        DType::F16 => DType::F16,
                        _ => DType::F32,
                    },
                    scheme: spec.scheme,
                }),
            }
        })
        .collect();
    let (n, k) = (parts[0].stored_shape[0], parts[0].stored_shape[1]);
    let new = WeightRef {
        parts,
        concat_axis: 0,
        transforms: Vec::new(),
        quant: None,
    };
    let stacked = Transform::Reshape {
        shape: vec![files.len(), n, k],
    };
    Ok(match (old_shape.len(), spec.k_axis) {
        (2, 1) => new,
        (3, 2) => new.with(stacked),
        (3, 1) => new.with(stacked).with(Transform::Transpose {
            perm: vec![0, 2, 1],
        }),
        (rank, k_axis) => bail!("GPTQ: a weight of rank {rank} with K on axis {k_axis}"),
    })
}
