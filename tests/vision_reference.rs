//! The reference evaluator on the vision graph and on the decoder with image features reproduces
//! transformers on tiny-scout (features, logits, greedy tokens), and the goldens notice each detail of the
//! vision tower when it is altered.

mod common;

use std::collections::HashMap;

use common::{fixture, max_error, vision_goldens, LOGIT_TOLERANCE};
use herd_ir::eval::{evaluate, Tensor};
use ndarray::Array2;

#[test]
fn reference_vision_graph_matches_transformers() {
    let ckpt = herd_ir::Checkpoint::open(&fixture("tiny-scout")).expect("open");
    let graph = herd_ir::vision::build_vision_graph(&ckpt).expect("vision graph");
    let (images, _) = vision_goldens();
    for (i, golden) in images.iter().enumerate() {
        let inputs = HashMap::from([(
            herd_ir::vision::PIXEL_VALUES.to_string(),
            Tensor::F32(golden.pixel_values.clone()),
        )]);
        let out = evaluate(&graph, &inputs).expect("evaluate");
        let ours: Array2<f32> = out[herd_ir::vision::IMAGE_FEATURES]
            .as_f32()
            .unwrap()
            .clone()
            .into_dimensionality()
            .unwrap();
        let (err, scale) = max_error(&ours, &golden.features);
        eprintln!("image {i}: features max error {err:.3e} (scale {scale:.3})");
        assert!(
            err <= LOGIT_TOLERANCE * scale,
            "image {i}: features differ by {err} (scale {scale})"
        );
    }
}

/// The golden image features in prompt order and the positions of the prompt's `<|patch|>` tokens.
fn features_and_positions(ids: &[i64]) -> (ndarray::ArrayD<f32>, Vec<i64>) {
    let patch = herd_ir::Checkpoint::open(&fixture("tiny-scout"))
        .unwrap()
        .config
        .vision
        .unwrap()
        .patch_token_id;
    let (images, _) = vision_goldens();
    let views: Vec<_> = images.iter().map(|g| g.features.view()).collect();
    let features = ndarray::concatenate(ndarray::Axis(0), &views).unwrap();
    let positions: Vec<i64> = (0..ids.len() as i64)
        .filter(|&i| ids[i as usize] == patch)
        .collect();
    assert_eq!(
        positions.len(),
        features.nrows(),
        "one feature row per <|patch|>"
    );
    (features.into_dyn(), positions)
}

fn reference_logits(graph: &herd_ir::Graph, ids: &[i64]) -> Array2<f32> {
    let (features, positions) = features_and_positions(ids);
    let n = ids.len();
    let inputs = HashMap::from([
        common::every_logit_row(1, n),
        (
            "input_ids".to_string(),
            Tensor::I64(ndarray::ArrayD::from_shape_vec(vec![1, n], ids.to_vec()).unwrap()),
        ),
        (
            "position_ids".to_string(),
            Tensor::I64(
                ndarray::ArrayD::from_shape_vec(vec![1, n], (0..n as i64).collect()).unwrap(),
            ),
        ),
        (
            herd_ir::import::IMAGE_POSITIONS_INPUT.to_string(),
            Tensor::I64(ndarray::ArrayD::from_shape_vec(vec![positions.len()], positions).unwrap()),
        ),
        (
            herd_ir::import::IMAGE_FEATURES_INPUT.to_string(),
            Tensor::F32(features),
        ),
    ]);
    let out = evaluate(graph, &inputs).expect("evaluate");
    out["logits"]
        .as_f32()
        .unwrap()
        .index_axis(ndarray::Axis(0), 0)
        .to_owned()
        .into_dimensionality()
        .unwrap()
}

#[test]
fn reference_decoder_with_image_features_matches_transformers() {
    let graph = herd_ir::import_with(&fixture("tiny-scout"), true)
        .expect("import")
        .graph;
    let (_, golden) = vision_goldens();
    let ours = reference_logits(&graph, &golden.input_ids);
    let (err, scale) = max_error(&ours, &golden.logits);
    eprintln!("image prompt: prefill max error {err:.3e} (scale {scale:.3})");
    assert!(err <= LOGIT_TOLERANCE * scale, "logits differ by {err}");
    // Greedy by recomputation: the features stay at the prompt's patch tokens.
    let mut ids = golden.input_ids.clone();
    for (step, expected) in golden.step_logits.rows().into_iter().enumerate() {
        let all = reference_logits(&graph, &ids);
        let last = all.row(all.nrows() - 1);
        let err = last
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= LOGIT_TOLERANCE * scale, "step {step}: error {err}");
        let token = common::argmax(&last.to_owned());
        assert_eq!(token, golden.greedy_ids[step], "step {step}");
        ids.push(token);
    }
}

/// The largest relative feature error over the golden images of a (possibly altered) vision graph.
fn worst_feature_error(graph: &herd_ir::Graph) -> f32 {
    let (images, _) = vision_goldens();
    images
        .iter()
        .map(|golden| {
            let inputs = HashMap::from([(
                herd_ir::vision::PIXEL_VALUES.to_string(),
                Tensor::F32(golden.pixel_values.clone()),
            )]);
            let out = evaluate(graph, &inputs).expect("evaluate");
            let ours: Array2<f32> = out[herd_ir::vision::IMAGE_FEATURES]
                .as_f32()
                .unwrap()
                .clone()
                .into_dimensionality()
                .unwrap();
            let (err, scale) = max_error(&ours, &golden.features);
            err / scale
        })
        .fold(0.0, f32::max)
}

/// Replaces the op of the node called `name`.
fn alter(graph: &mut herd_ir::Graph, name: &str, op: herd_ir::Op) {
    let index = graph
        .node_indices()
        .into_iter()
        .find(|&i| graph.node(i).unwrap().name == name)
        .unwrap_or_else(|| panic!("no node {name}"));
    graph.node_mut(index).unwrap().op = op;
}

#[test]
fn vision_goldens_catch_each_detail_of_the_tower() {
    let ckpt = herd_ir::Checkpoint::open(&fixture("tiny-scout")).unwrap();
    let config = ckpt.config.vision.clone().unwrap();
    let exact = herd_ir::vision::build_vision_graph(&ckpt).unwrap();
    assert!(worst_feature_error(&exact) <= LOGIT_TOLERANCE);
    let (cos, sin) = herd_ir::vision::rotary_tables(&config);
    let half = cos.shape[1] / 2;
    let rows = cos.shape[0];
    let remap = |t: &herd_ir::ops::ConstantData, f: &dyn Fn(usize, usize) -> (usize, usize)| {
        let mut values = t.values.to_vec();
        for r in 0..rows {
            for j in 0..2 * half {
                let (sr, sj) = f(r, j);
                values[r * 2 * half + j] = t.values[sr * 2 * half + sj];
            }
        }
        herd_ir::Op::Constant(herd_ir::ops::ConstantData {
            shape: t.shape.clone(),
            values: std::sync::Arc::new(values),
        })
    };
    let variants: Vec<(&str, Vec<(&str, herd_ir::Op)>)> = vec![
        (
            "rows and columns of the 2D RoPE swapped",
            vec![
                (
                    "rope.cos",
                    remap(&cos, &|r, j| (r, (j + half) % (2 * half))),
                ),
                (
                    "rope.sin",
                    remap(&sin, &|r, j| (r, (j + half) % (2 * half))),
                ),
            ],
        ),
        (
            "class token rotated like patch 0",
            vec![
                (
                    "rope.cos",
                    remap(&cos, &|r, j| (if r == rows - 1 { 0 } else { r }, j)),
                ),
                (
                    "rope.sin",
                    remap(&sin, &|r, j| (if r == rows - 1 { 0 } else { r }, j)),
                ),
            ],
        ),
        (
            "pixel shuffle without its second transpose",
            vec![(
                "shuffle.transpose2",
                herd_ir::Op::Transpose {
                    perm: vec![0, 1, 2, 3],
                },
            )],
        ),
        (
            "GELU of layer 0 replaced by SiLU",
            vec![("vision.layers.0.gelu", herd_ir::Op::Silu)],
        ),
    ];
    for (what, changes) in variants {
        let mut graph = exact.clone();
        for (name, op) in changes {
            alter(&mut graph, name, op);
        }
        let err = worst_feature_error(&graph);
        eprintln!("{what}: relative feature error {err:.2e}");
        assert!(
            err > 10.0 * LOGIT_TOLERANCE,
            "{what}: the goldens do not notice ({err:e})"
        );
    }
}
