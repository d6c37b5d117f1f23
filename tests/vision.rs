//! Early fusion against transformers on tiny-scout: the vision graph's features, image preprocessing and
//! the decoder with image features at the `<|patch|>` tokens.

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
