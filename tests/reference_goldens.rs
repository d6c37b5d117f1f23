//! The reference evaluator on the imported graph reproduces transformers' logits and greedy tokens for
//! every golden prompt of both fixtures: importer and IR semantics, before any lowering.

mod common;

use std::collections::HashMap;

use common::{argmax, fixture, goldens, max_error, FIXTURES, LOGIT_TOLERANCE};
use herd_ir::eval::{evaluate, Tensor};
use herd_ir::Graph;
use ndarray::{Array2, ArrayD, Axis, IxDyn};

fn logits(graph: &Graph, ids: &[i64]) -> Array2<f32> {
    let n = ids.len();
    let inputs = HashMap::from([
        (
            "input_ids".to_string(),
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[1, n]), ids.to_vec()).unwrap()),
        ),
        (
            "position_ids".to_string(),
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[1, n]), (0..n as i64).collect()).unwrap()),
        ),
    ]);
    let out = evaluate(graph, &inputs).expect("evaluation");
    let logits = out["logits"]
        .as_f32()
        .expect("f32 logits")
        .index_axis(Axis(0), 0)
        .to_owned();
    logits.into_dimensionality().unwrap()
}

#[test]
fn reference_evaluator_matches_transformers() {
    for name in FIXTURES {
        let imported = herd_ir::import(&fixture(name)).expect("import");
        for (n, golden) in goldens(name) {
            let ours = logits(&imported.graph, &golden.input_ids);
            let (err, scale) = max_error(&ours, &golden.logits);
            eprintln!("{name} prompt {n}: prefill max error {err:.3e} (scale {scale:.3})");
            assert!(
                err <= LOGIT_TOLERANCE * scale,
                "{name} prompt {n}: prefill logits differ by {err} (scale {scale})"
            );

            // Greedy decode by full recomputation; every step's logits must match as well.
            let mut ids = golden.input_ids.clone();
            let mut generated = Vec::new();
            for (step, expected) in golden.step_logits.rows().into_iter().enumerate() {
                let all = logits(&imported.graph, &ids);
                let last = all.row(all.nrows() - 1).to_owned();
                let err = last
                    .iter()
                    .zip(expected)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                let scale = expected.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
                assert!(
                    err <= LOGIT_TOLERANCE * scale,
                    "{name} prompt {n} step {step}: logits differ by {err} (scale {scale})"
                );
                let token = argmax(&last);
                generated.push(token);
                ids.push(token);
            }
            assert_eq!(
                generated, golden.greedy_ids,
                "{name} prompt {n}: greedy tokens differ"
            );
        }
    }
}
