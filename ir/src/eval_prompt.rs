//! The reference evaluator run as the runtime runs a Lowered graph: one prompt from an empty KV cache,
//! in calls that stop at chunk boundaries (a chunked layer's cache is a ring of one chunk).

use std::collections::HashMap;

use ndarray::{Array2, ArrayD, Axis, IxDyn};

use crate::eval::{evaluate, Tensor};
use crate::Graph;

/// Logits of every position of `ids` ([n, vocab]) from the Lowered `graph`, caches starting zeroed.
pub fn lowered_logits(graph: &Graph, ids: &[i64]) -> Result<Array2<f32>, String> {
    let n = ids.len();
    let mut caches: HashMap<String, Tensor> = HashMap::new();
    for index in graph.node_indices() {
        if let Some(crate::Op::Input(a)) = graph.node(index).map(|n| &n.op) {
            if a.name.starts_with("past_") {
                // Full layers' caches hold the prompt; rings have their fixed length.
                let dims: Vec<usize> =
                    a.ty.shape
                        .0
                        .iter()
                        .map(|d| d.fixed().unwrap_or(n))
                        .collect();
                if dims.len() != 4 {
                    return Err(format!("cache input {} of rank {}", a.name, dims.len()));
                }
                let dims = [1, dims[1], dims[2], dims[3]];
                caches.insert(a.name.clone(), Tensor::F32(ArrayD::zeros(IxDyn(&dims))));
            }
        }
    }
    let ring = caches
        .values()
        .filter_map(|t| t.as_f32())
        .map(|t| t.shape()[2])
        .filter(|&r| r > 0)
        .min();
    let ids_tensor = |values: Vec<i64>| {
        let len = values.len();
        ArrayD::from_shape_vec(IxDyn(&[1, len]), values)
            .map(Tensor::I64)
            .map_err(|e| e.to_string())
    };
    let mut rows = Vec::new();
    let mut done = 0;
    while done < n {
        let len = (n - done).min(ring.map_or(n, |r| r - done % r));
        let mut inputs = caches.clone();
        inputs.insert(
            crate::import::LOGITS_INDEX_INPUT.to_string(),
            ids_tensor((0..len as i64).collect())?,
        );
        inputs.insert(
            "input_ids".to_string(),
            ids_tensor(ids[done..done + len].to_vec())?,
        );
        inputs.insert(
            "position_ids".to_string(),
            ids_tensor((done as i64..(done + len) as i64).collect())?,
        );
        let out = evaluate(graph, &inputs).map_err(|e| e.to_string())?;
        for (name, cache) in caches.iter_mut() {
            let (kind, layer) =
                crate::names::Cache::parse(name).ok_or_else(|| format!("{name} is not a cache"))?;
            *cache = out
                .get(&kind.present().name(layer))
                .ok_or_else(|| format!("no output for {name}"))?
                .clone();
        }
        let logits = out
            .get(crate::names::LOGITS)
            .and_then(|t| t.as_f32())
            .ok_or("no f32 logits")?;
        rows.push(logits.index_axis(Axis(0), 0).to_owned());
        done += len;
    }
    let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
    ndarray::concatenate(Axis(0), &views)
        .map_err(|e| e.to_string())?
        .into_dimensionality()
        .map_err(|e| e.to_string())
}
