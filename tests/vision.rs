//! Early fusion through compiled bundles on tiny-scout: Rust preprocessing against transformers'
//! processor, vision.onnx and the decoder against transformers' features and logits, f16 and TensorRT
//! variants, the CLI and chat with images, and every refusal (bad images, limits, tampered manifests).

mod common;

use common::{fails_with, fixture, image, max_error, ok, vision_goldens, IMAGES, LOGIT_TOLERANCE};
use ndarray::Array2;

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

    // A grey PNG with alpha: converted like PIL (alpha dropped, grey replicated), identical tiles. A
    // JPEG: the image crate's decoder (zune-jpeg) and Pillow's libjpeg-turbo round the IDCT and the
    // chroma upsampling differently: on this 4:2:0 photo 27% of decoded samples differ, by at most 4
    // levels (one level is 2/255 after normalisation). Tiles are held to 5 levels plus one bf16
    // rounding step of the normalised value (1/128 near +-1), 5e-3 on average.
    for (i, name) in common::EXTRA_IMAGES.iter().enumerate() {
        let (theirs, canvas) = common::extra_image_golden(i);
        let tiles = herd_runtime::vision::preprocess_file(&image(name), &info).expect("preprocess");
        assert_eq!(
            (tiles.rows as i64, tiles.cols as i64),
            canvas,
            "{name}: canvas"
        );
        let theirs = theirs.as_slice().unwrap();
        assert_eq!(tiles.pixels.len(), theirs.len(), "{name}: size");
        let diffs: Vec<f32> = tiles
            .pixels
            .iter()
            .zip(theirs)
            .map(|(a, b)| (a - b).abs())
            .collect();
        let max = diffs.iter().copied().fold(0.0f32, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        let differing = diffs.iter().filter(|&&d| d > 0.0).count();
        eprintln!(
            "{name}: {differing} of {} values differ, max |diff| {max:.4} ({:.1} levels), mean {mean:.2e}",
            diffs.len(),
            max / (2.0 / 255.0)
        );
        if name.ends_with(".png") {
            assert_eq!(differing, 0, "{name}");
        } else {
            assert!(
                max <= 5.0 * (2.0 / 255.0) + 1.0 / 128.0,
                "{name}: max {max}"
            );
            assert!(mean <= 5e-3, "{name}: mean {mean}");
        }
    }
}

/// The prompt of the vision goldens (make_fixtures.py IMAGE_PROMPT).
const IMAGE_PROMPT: &str = "Compare <|image|> and<|image|> with <|image|>: which is brighter?";

fn image_prompt() -> herd_runtime::Prompt {
    herd_runtime::Prompt::WithImages {
        prompt: Box::new(herd_runtime::Prompt::Text(IMAGE_PROMPT.into())),
        images: IMAGES
            .iter()
            .map(|n| herd_runtime::vision::ImageSource::Path(image(n)))
            .collect(),
    }
}

#[test]
fn compiled_bundle_matches_transformers_on_images_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile(dir.path(), &[]);
    let model =
        herd_runtime::Model::load(&bundle, &herd_runtime::RuntimeOptions::default()).unwrap();
    let info = vision_info(&bundle);
    let (images, golden) = vision_goldens();

    // vision.onnx on transformers' own tiles against transformers' features.
    for (i, g) in images.iter().enumerate() {
        let tiles = herd_runtime::vision::ImageTiles {
            pixels: g.pixel_values.iter().copied().collect(),
            tiles: g.pixel_values.shape()[0],
            rows: g.aspect_ratio.0 as usize,
            cols: g.aspect_ratio.1 as usize,
        };
        let ours = model.encode_images(&[tiles]).unwrap();
        let ours = Array2::from_shape_vec(g.features.raw_dim(), ours).unwrap();
        let (err, scale) = max_error(&ours, &g.features);
        eprintln!("vision.onnx image {i}: max error {err:.3e} (scale {scale:.3})");
        assert!(err <= LOGIT_TOLERANCE * scale, "image {i}: {err}");
    }

    // PNG files -> preprocessing -> prompt expansion -> vision.onnx -> decoder.
    let (ids, features) = herd_runtime::prepare_prompt(&model, image_prompt()).unwrap();
    assert_eq!(ids, golden.input_ids, "expanded prompt ids");
    assert_eq!(
        features.len(),
        ids.iter().filter(|&&t| t == info.tokens.patch).count() * 64
    );
    let logits = model.prompt_logits_with_images(&ids, &features).unwrap();
    let ours = Array2::from_shape_vec(golden.logits.raw_dim(), logits).unwrap();
    let (err, scale) = max_error(&ours, &golden.logits);
    eprintln!(
        "image+text prompt ({} tokens): max error {err:.3e} (scale {scale:.3})",
        ids.len()
    );
    assert!(err <= LOGIT_TOLERANCE * scale, "prompt logits: {err}");

    let params = herd_runtime::GenerateParams {
        max_new_tokens: golden.greedy_ids.len(),
        sampling: herd_runtime::Sampling::Greedy,
        stop_ids: Some(vec![]),
        stop_strings: vec![],
        return_logits: true,
    };
    let mut tokens = Vec::new();
    let mut worst = 0.0f32;
    for (step, event) in model
        .stream(image_prompt(), &params, None)
        .unwrap()
        .enumerate()
    {
        let event = event.unwrap();
        let expected = golden.step_logits.row(step);
        let err = event
            .logits
            .unwrap()
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        worst = worst.max(err);
        tokens.push(event.id);
    }
    eprintln!("greedy {tokens:?}: step logits max error {worst:.3e}");
    assert!(worst <= LOGIT_TOLERANCE * scale, "step logits: {worst}");
    assert_eq!(tokens, golden.greedy_ids, "greedy tokens");
}

#[test]
fn cli_runs_image_prompts_and_refuses_bad_images() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile(dir.path(), &[]);
    let bundle = bundle.to_str().unwrap();
    let (_, golden) = vision_goldens();
    let paths: Vec<String> = IMAGES
        .iter()
        .map(|n| image(n).to_str().unwrap().to_string())
        .collect();
    let mut args = vec![
        "run",
        bundle,
        "--prompt",
        IMAGE_PROMPT,
        "--max-new-tokens",
        "8",
        "--json",
    ];
    for p in &paths {
        args.extend(["--image", p.as_str()]);
    }
    let out: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    let ids: Vec<i64> = out["output_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(ids, golden.greedy_ids, "herd run --image greedy tokens");

    let run_with = |img: &str| {
        let path = image(img);
        let path = path.to_str().unwrap().to_string();
        move |parts: &[&str]| {
            fails_with(&["run", bundle, "--prompt", "hi", "--image", &path], parts)
        }
    };
    run_with("truncated.png")(&["truncated.png", "corrupt or truncated"]);
    run_with("empty.png")(&["empty.png", "empty"]);
    run_with("huge.png")(&["huge.png", "100000x100000", "at most 16384"]);
    fails_with(
        &["run", bundle, "--prompt", "hi", "--image", "README.md"],
        &["README.md", "not a PNG or JPEG"],
    );
    fails_with(
        &[
            "run",
            bundle,
            "--prompt",
            "hi",
            "--image",
            "/no/such/image.png",
        ],
        &["/no/such/image.png", "cannot read"],
    );
    // More images than the bundle allows: the error names the limit.
    let small = image("small.png");
    let small = small.to_str().unwrap();
    let mut args = vec!["run", bundle, "--prompt", "hi"];
    for _ in 0..9 {
        args.extend(["--image", small]);
    }
    fails_with(&args, &["9 images", "at most 8", "--max-images"]);
    // Placeholders must match the images.
    fails_with(
        &[
            "run",
            bundle,
            "--prompt",
            "<|image|><|image|>",
            "--image",
            small,
        ],
        &["2 <|image|> placeholders", "1 images"],
    );
}

#[test]
fn text_only_bundles_refuse_images() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile(dir.path(), &["--text-only"]);
    let manifest = herd_runtime::Bundle::open(&bundle).unwrap().manifest;
    assert!(manifest.vision.is_none());
    assert!(!bundle.join("vision.onnx").exists());
    let small = image("small.png");
    fails_with(
        &[
            "run",
            bundle.to_str().unwrap(),
            "--prompt",
            "hi",
            "--image",
            small.to_str().unwrap(),
        ],
        &["takes no images", "--text-only"],
    );
}

/// f16 keeps 11 significant bits; through the vision tower and 4 decoder layers the logits drift
/// 1.66e-3 of their scale (measured on tiny-scout's image prompt; text alone drifts 1.25e-3, see
/// tests/end_to_end.rs). The bound leaves half as much again for other CPUs' f16 kernels.
const F16_TOLERANCE: f32 = 2.5e-3;

#[test]
fn f16_bundle_reports_its_image_prompt_error() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile(dir.path(), &["--dtype", "f16"]);
    let model =
        herd_runtime::Model::load(&bundle, &herd_runtime::RuntimeOptions::default()).unwrap();
    let (_, golden) = vision_goldens();
    let (ids, features) = herd_runtime::prepare_prompt(&model, image_prompt()).unwrap();
    assert_eq!(ids, golden.input_ids);
    let logits = model.prompt_logits_with_images(&ids, &features).unwrap();
    let ours = Array2::from_shape_vec(golden.logits.raw_dim(), logits).unwrap();
    let (err, scale) = max_error(&ours, &golden.logits);
    eprintln!("f16 image+text prompt: relative error {:.2e}", err / scale);
    assert!(
        err <= F16_TOLERANCE * scale,
        "f16 drift {err} (scale {scale})"
    );
}

#[test]
fn tensorrt_target_vision_bundle_lints_clean_and_matches_on_cpu() {
    let dir = tempfile::tempdir().unwrap();
    // A per-call profile shorter than the 144-token image prompt: prefill runs in 4 calls.
    let bundle = compile(
        dir.path(),
        &[
            "--target",
            "tensorrt-h100",
            "--dtype",
            "f32",
            "--max-seq",
            "40",
        ],
    );
    let manifest = herd_runtime::Bundle::open(&bundle).unwrap().manifest;
    let trt = manifest.tensorrt.as_ref().unwrap();
    assert!(trt
        .profile_max_shapes
        .contains("image_features:40x64,image_positions:40"));
    let vision = trt.vision_profile_shapes.as_ref().unwrap();
    assert_eq!(vision[0], "pixel_values:1x3x56x56");
    assert_eq!(vision[2], "pixel_values:136x3x56x56");
    let lint = common::herd(&["lint", bundle.to_str().unwrap(), "--target", "tensorrt"]);
    let stderr = String::from_utf8_lossy(&lint.stderr);
    assert!(lint.status.success(), "{stderr}");
    assert!(
        stderr.contains("no TensorRT violations in model.onnx, vision.onnx"),
        "{stderr}"
    );
    let model =
        herd_runtime::Model::load(&bundle, &herd_runtime::RuntimeOptions::default()).unwrap();
    let (_, golden) = vision_goldens();
    let (ids, features) = herd_runtime::prepare_prompt(&model, image_prompt()).unwrap();
    let logits = model.prompt_logits_with_images(&ids, &features).unwrap();
    let ours = Array2::from_shape_vec(golden.logits.raw_dim(), logits).unwrap();
    let (err, scale) = max_error(&ours, &golden.logits);
    eprintln!(
        "tensorrt-target bundle on CPU, image prompt: max error {err:.3e} (scale {scale:.3})"
    );
    assert!(err <= LOGIT_TOLERANCE * scale, "{err}");

    // Generation feeds the prompt in calls of at most 40 tokens, splitting the image rows to match.
    assert_eq!(
        herd_runtime::session::max_tokens_per_call(&manifest),
        Some(40)
    );
    let params = herd_runtime::GenerateParams {
        max_new_tokens: golden.greedy_ids.len(),
        sampling: herd_runtime::Sampling::Greedy,
        stop_ids: Some(vec![]),
        stop_strings: vec![],
        return_logits: true,
    };
    let generation = model.stream(image_prompt(), &params, None).unwrap();
    let mut tokens = Vec::new();
    for (step, event) in generation.enumerate() {
        let event = event.unwrap();
        let err = event
            .logits
            .unwrap()
            .iter()
            .zip(golden.step_logits.row(step))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= LOGIT_TOLERANCE * scale, "step {step}: {err}");
        tokens.push(event.id);
    }
    assert_eq!(
        tokens, golden.greedy_ids,
        "greedy tokens with a chunked prefill"
    );
}

#[test]
fn chat_attaches_images_and_survives_a_bad_one() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile(dir.path(), &[]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["chat", bundle.to_str().unwrap(), "--max-new-tokens", "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let script = format!(
        "/image {}\nWhat is this?\n/image {}\nAnd this?\n/image {}\nCompare them.\n/exit\n",
        image("small.png").display(),
        image("truncated.png").display(),
        image("padded.png").display(),
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("truncated.png"), "{stderr}");
    // The turn with the bad image is dropped: the third turn continues the first, with both good
    // images in order.
    let model = herd_runtime::Model::load(&bundle, &Default::default()).unwrap();
    let first_turn = common::message("user", "<|image|>What is this?");
    let first = common::chat_reply(
        &model,
        std::slice::from_ref(&first_turn),
        &[image("small.png")],
        4,
    );
    let third = common::chat_reply(
        &model,
        &[
            first_turn,
            common::message("assistant", &first),
            common::message("user", "<|image|>Compare them."),
        ],
        &[image("small.png"), image("padded.png")],
        4,
    );
    assert!(!first.is_empty() && !third.is_empty());
    assert_eq!(stdout, format!("> > {first}\n> > > > {third}\n> "));
}

#[test]
fn image_prompts_longer_than_the_context_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("short");
    ok(&[
        "compile",
        fixture("tiny-scout").to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--max-context",
        "32",
    ]);
    // wide.png lays out 15 tiles: 60 <|patch|> tokens and their separators.
    fails_with(
        &[
            "run",
            bundle.to_str().unwrap(),
            "--prompt",
            "hi",
            "--image",
            image("wide.png").to_str().unwrap(),
        ],
        &["at most 32 positions", "--max-context"],
    );
}

#[test]
fn tampered_vision_manifests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile(dir.path(), &[]);
    let b = bundle.to_str().unwrap();
    let path = bundle.join("manifest.json");
    let original = std::fs::read_to_string(&path).unwrap();
    let small = image("small.png");
    let run = [
        "run",
        b,
        "--prompt",
        "hi",
        "--image",
        small.to_str().unwrap(),
    ];
    let cases = [
        (
            (
                "\"model_file\": \"vision.onnx\"",
                "\"model_file\": \"../vision.onnx\"",
            ),
            "model file `../vision.onnx` is not among the bundle's checked files",
        ),
        (
            ("\"tokens_per_tile\": 4", "\"tokens_per_tile\": 5"),
            "the vision graph returned 256 values for 1 tiles, expected 320",
        ),
        (("\"tile_size\": 56", "\"tile_size\": 64"), "pixel_values"),
        (
            ("\"max_tiles\": 16", "\"max_tiles\": 0"),
            "vision section: max_tiles and max_images must be in 1..=64",
        ),
        (
            ("\"tile_size\": 56", "\"tile_size\": 0"),
            "vision section: tile_size must be in 1..=4096",
        ),
    ];
    for ((from, to), message) in cases {
        assert!(original.contains(from), "{from}");
        std::fs::write(&path, original.replace(from, to)).unwrap();
        fails_with(&run, &[message]);
    }
}

/// ONNX op counts of a vision.onnx, per encoder layer ("outside layers" for the rest), one line each.
fn vision_node_counts(path: &std::path::Path) -> String {
    use onnx_protobuf::Message;
    let model = onnx_protobuf::ModelProto::parse_from_bytes(&std::fs::read(path).unwrap()).unwrap();
    let mut counts: std::collections::BTreeMap<String, std::collections::BTreeMap<String, usize>> =
        Default::default();
    for node in &model.graph.node {
        let group = node
            .name
            .strip_prefix("vision.layers.")
            .and_then(|rest| rest.split('.').next())
            .map_or("outside layers".to_string(), |l| format!("layer {l}"));
        *counts
            .entry(group)
            .or_default()
            .entry(node.op_type.clone())
            .or_default() += 1;
    }
    counts
        .iter()
        .map(|(group, ops)| {
            let ops: Vec<String> = ops.iter().map(|(op, n)| format!("{op}x{n}")).collect();
            format!("{group}: {}\n", ops.join(" "))
        })
        .collect()
}

#[test]
fn vision_onnx_node_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile(dir.path(), &[]);
    let text = vision_node_counts(&bundle.join("vision.onnx"));
    common::check_snapshot(
        "tiny-scout.vision.onnx-nodes",
        &text,
        "the vision.onnx node list",
    );
}

/// A copy of tiny-scout whose preprocessor_config.json was edited by `edit`.
fn scout_with_processor(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("tiny-scout")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    let path = tmp.path().join("preprocessor_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    tmp
}

#[test]
fn preprocessor_config_sets_the_canvas_limit_and_refuses_what_herd_does_not_do() {
    let four = scout_with_processor(|c| c["max_patches"] = serde_json::json!(4));
    let model = four.path().to_str().unwrap();
    let out = four.path().join("bundle");
    ok(&["compile", model, "-o", out.to_str().unwrap()]);
    let info = vision_info(&out);
    assert_eq!(info.max_tiles, 4, "max_patches of preprocessor_config.json");
    assert!(out.join("preprocessor_config.json").is_file());
    // The 500x150 image no longer gets its 2x7 canvas: at most 4 tiles (1x4 here).
    let tiles = herd_runtime::vision::preprocess_file(&image("wide.png"), &info).unwrap();
    assert!(
        tiles.rows * tiles.cols <= 4,
        "{}x{}",
        tiles.rows,
        tiles.cols
    );
    ok(&[
        "compile",
        model,
        "-o",
        out.to_str().unwrap(),
        "--force",
        "--max-tiles",
        "6",
    ]);
    assert_eq!(
        vision_info(&out).max_tiles,
        6,
        "--max-tiles overrides the file"
    );

    let cases: [(&str, serde_json::Value, &str); 3] = [
        (
            "resize_to_max_canvas",
            serde_json::json!(true),
            "herd implements the default",
        ),
        (
            "size",
            serde_json::json!({"height": 64, "width": 64}),
            "takes 56x56 tiles",
        ),
        ("image_std", serde_json::json!([0.5, 0.0, 0.5]), "nonzero"),
    ];
    for (key, value, message) in cases {
        let tmp = scout_with_processor(|c| c[key] = value);
        let out = tmp.path().join("bundle");
        fails_with(
            &[
                "compile",
                tmp.path().to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ],
            &["preprocessor_config.json", key, message],
        );
        assert!(!out.exists());
    }
}
