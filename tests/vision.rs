//! Early fusion against transformers on tiny-scout: the vision graph's features, image preprocessing and
//! the decoder with image features at the `<|patch|>` tokens.

mod common;

use std::collections::HashMap;

use common::{fixture, image, max_error, ok, vision_goldens, IMAGES, LOGIT_TOLERANCE};
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

/// Compiles tiny-scout (with its vision tower) into `dir`.
fn compile(dir: &std::path::Path, extra: &[&str]) -> std::path::PathBuf {
    let bundle = dir.join("tiny-scout");
    let model = fixture("tiny-scout");
    let mut args = vec![
        "compile",
        model.to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--max-context",
        "512",
    ];
    args.extend(extra);
    ok(&args);
    bundle
}

fn vision_info(bundle: &std::path::Path) -> herd_runtime::manifest::VisionInfo {
    herd_runtime::Bundle::open(bundle)
        .unwrap()
        .manifest
        .vision
        .expect("the bundle has a vision section")
}

#[test]
fn preprocessing_matches_transformers_processor() {
    let dir = tempfile::tempdir().unwrap();
    let info = vision_info(&compile(dir.path(), &[]));
    let (goldens, _) = vision_goldens();
    for (name, golden) in IMAGES.iter().zip(&goldens) {
        let tiles = herd_runtime::vision::preprocess_file(&image(name), &info).expect("preprocess");
        assert_eq!(
            (tiles.rows as i64, tiles.cols as i64),
            golden.aspect_ratio,
            "{name}: canvas"
        );
        assert_eq!(tiles.tiles, golden.pixel_values.shape()[0], "{name}: tiles");
        let theirs = golden.pixel_values.as_slice().unwrap();
        assert_eq!(tiles.pixels.len(), theirs.len(), "{name}: size");
        let differing = tiles
            .pixels
            .iter()
            .zip(theirs)
            .filter(|(a, b)| a != b)
            .count();
        let max = tiles
            .pixels
            .iter()
            .zip(theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!(
            "{name}: {} tiles ({}x{} canvas), {differing} of {} values differ, max |diff| {max:e}",
            tiles.tiles,
            tiles.rows,
            tiles.cols,
            theirs.len()
        );
        // Same integer resize kernel and the same bf16 rounding steps: the tiles are identical.
        assert_eq!(
            differing, 0,
            "{name}: {differing} values differ (max {max})"
        );
    }
}
