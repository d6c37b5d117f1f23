//! Pipeline stages (`herd compile --stages N` / `--stage-layers`): a staged bundle gives exactly the
//! single graph's logits (1e-6 relative) and tokens, with images, for 2, 3 and 4 stages, uneven splits
//! and stages holding only dense or only MoE layers; ragged batches with micro-batches in flight
//! through the stages get their solo tokens; a stage taken down fails the call with an error naming
//! it, never a hang; a tampered stage list is refused.

mod common;

use std::path::{Path, PathBuf};

use common::{fails_with, fixture, greedy, ok};
use herd_runtime::sampling::argmax;
use herd_runtime::{Batch, BatchEvent, Model, Prompt, RuntimeOptions};

fn compile(model: &str, out: &Path, extra: &[&str]) -> PathBuf {
    let mut args = vec![
        "compile",
        fixture(model).to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--max-context",
        "256",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&refs);
    out.to_path_buf()
}

fn load(bundle: &Path) -> Model {
    Model::load(bundle, &RuntimeOptions::default()).unwrap()
}

/// Largest |a - b| over the largest |b|.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Every token's logits of a text prompt and an image prompt, and 12 greedy tokens of each.
fn outputs(model: &Model) -> Vec<(Vec<f32>, Vec<i64>)> {
    let text: Vec<i64> = (0..37).map(|i| 3 + (i * 41) % 500).collect();
    let mut prompts = vec![(text, Vec::new())];
    if model.bundle.manifest.vision.is_some() {
        let image = Prompt::WithImages {
            prompt: Box::new(Prompt::Text("Describe <|image|> briefly.".into())),
            images: vec![herd_runtime::vision::ImageSource::Path(
                fixture("images").join("small.png"),
            )],
        };
        prompts.push(herd_runtime::prepare_prompt(model, image).unwrap());
    }
    prompts
        .iter()
        .map(|(ids, rows)| {
            let logits = model.prompt_logits_with_images(ids, rows).unwrap();
            let mut session = model.session().unwrap();
            let mut next = session.feed_with_images(ids, rows).unwrap();
            let mut tokens = Vec::new();
            for _ in 0..12 {
                let id = argmax(&next);
                tokens.push(id);
                next = session.feed(&[id]).unwrap();
            }
            (logits, tokens)
        })
        .collect()
}

#[test]
fn staged_bundles_match_the_single_graph() {
    let dir = tempfile::tempdir().unwrap();
    // tiny-scout: 4 layers, all MoE, layer 3 NoPE, with vision. tiny-maverick: dense and MoE layers
    // alternate (0 dense, 1 MoE, ...), so a one-layer stage holds only one kind.
    let splits: [(&str, &[&str]); 6] = [
        ("tiny-scout", &["--stages", "2"]),
        ("tiny-scout", &["--stage-layers", "0..1,1..4"]),
        ("tiny-scout", &["--stage-layers", "0..2,2..3,3..4"]),
        ("tiny-scout", &["--stages", "4"]),
        ("tiny-maverick", &["--stage-layers", "0..1,1..2,2..4"]),
        ("tiny-maverick", &["--stages", "3"]),
    ];
    let mut single = std::collections::HashMap::new();
    for (i, (fixture_name, split)) in splits.iter().enumerate() {
        let expected = single.entry(*fixture_name).or_insert_with(|| {
            let one = compile(
                fixture_name,
                &dir.path().join(format!("{fixture_name}-1")),
                &[],
            );
            outputs(&load(&one))
        });
        let staged = compile(fixture_name, &dir.path().join(format!("staged-{i}")), split);
        let model = load(&staged);
        let m = &model.bundle.manifest;
        assert!(m.stages.len() >= 2, "{split:?}: {} stages", m.stages.len());
        assert_eq!(model.stage_count(), m.stages.len());
        // Each stage's cache is its own layers'.
        for s in &m.stages {
            assert!(s
                .kv
                .iter()
                .all(|kv| (s.first_layer..s.end_layer).contains(&kv.layer)));
            assert_eq!(s.kv.len(), s.end_layer - s.first_layer);
        }
        let got = outputs(&model);
        assert_eq!(got.len(), expected.len());
        for (p, ((logits, tokens), (want_logits, want_tokens))) in
            got.iter().zip(expected.iter()).enumerate()
        {
            let err = relative_error(logits, want_logits);
            assert!(
                err <= 1e-6,
                "{fixture_name} {split:?} prompt {p}: relative error {err}"
            );
            assert_eq!(tokens, want_tokens, "{fixture_name} {split:?} prompt {p}");
        }
    }
}

#[test]
fn micro_batches_in_flight_get_their_solo_tokens_and_a_lost_stage_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let one = load(&compile("tiny-scout", &dir.path().join("one"), &[]));
    let staged_path = compile(
        "tiny-scout",
        &dir.path().join("staged"),
        &["--stage-layers", "0..1,1..3,3..4"],
    );
    let staged = load(&staged_path);
    // Ragged prompts, one with an image; alone in the single graph first.
    let image = Prompt::WithImages {
        prompt: Box::new(Prompt::Text("What is in <|image|>?".into())),
        images: vec![herd_runtime::vision::ImageSource::Path(
            fixture("images").join("small.png"),
        )],
    };
    let mut prompts: Vec<(Vec<i64>, Vec<f32>)> = [1usize, 6, 11, 19, 3]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let ids = (0..n as i64)
                .map(|t| 3 + (t * 29 + i as i64 * 7) % 500)
                .collect();
            (ids, Vec::new())
        })
        .collect();
    prompts.insert(2, herd_runtime::prepare_prompt(&staged, image).unwrap());
    let new = 9;
    let solo: Vec<Vec<i64>> = prompts
        .iter()
        .map(|(ids, rows)| {
            let mut session = one.session().unwrap();
            let mut next = session.feed_with_images(ids, rows).unwrap();
            let mut tokens = Vec::new();
            for _ in 0..new {
                tokens.push(argmax(&next));
                next = session.feed(&[*tokens.last().unwrap()]).unwrap();
            }
            tokens
        })
        .collect();
    for micro_batches in [1, 2, 3] {
        let mut batch = Batch::with_micro_batches(&staged, 6, micro_batches).unwrap();
        let mut tokens: Vec<Vec<i64>> = vec![Vec::new(); prompts.len()];
        let mut of = std::collections::HashMap::new();
        for (i, (ids, rows)) in prompts.iter().enumerate() {
            of.insert(
                batch.add(ids.clone(), rows.clone(), greedy(new)).unwrap(),
                i,
            );
        }
        let mut steps = 0;
        while !batch.is_idle() {
            for event in batch.step().unwrap() {
                if let BatchEvent::Token { sequence, id, .. } = event {
                    tokens[of[&sequence]].push(id);
                }
            }
            steps += 1;
            assert!(steps < 200, "the batch made no progress");
        }
        assert_eq!(tokens, solo, "{micro_batches} micro-batches");
    }

    // A stage taken down mid-run: single calls and pipelined steps fail naming it, without waiting.
    let mut batch = Batch::with_micro_batches(&staged, 4, 2).unwrap();
    for n in [3, 5] {
        batch.add(vec![9; n], Vec::new(), greedy(4)).unwrap();
    }
    assert!(staged.take_stage_down(1));
    let err = staged.prompt_logits(&[5, 6, 7]).unwrap_err().to_string();
    assert!(err.contains("pipeline stage 1 (layers 1..3)"), "{err}");
    let err = batch.step().unwrap_err().to_string();
    assert!(err.contains("pipeline stage 1 (layers 1..3)"), "{err}");
    assert!(!staged.take_stage_down(3));
}

#[test]
fn stage_options_and_tampered_stages_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let scout = fixture("tiny-scout");
    let out = dir.path().join("b");
    let (scout, out) = (scout.to_str().unwrap(), out.to_str().unwrap());
    fails_with(
        &["compile", scout, "-o", out, "--stages", "5"],
        &["--stages 5", "1 to 4"],
    );
    fails_with(
        &["compile", scout, "-o", out, "--stage-layers", "0..2,3..4"],
        &["--stage-layers", "do not follow 2"],
    );
    fails_with(
        &["compile", scout, "-o", out, "--stage-layers", "0..2"],
        &["--stage-layers", "end at layer 2"],
    );
    fails_with(
        &["compile", scout, "-o", out, "--stage-layers", "0-2"],
        &["--stage-layers 0-2", "not a range"],
    );
    fails_with(
        &[
            "compile",
            scout,
            "-o",
            out,
            "--stages",
            "2",
            "--stage-layers",
            "0..2,2..4",
        ],
        &["cannot be used with"],
    );
    let bundle = compile("tiny-scout", &dir.path().join("staged"), &["--stages", "2"]);
    fails_with(
        &[
            "run",
            bundle.to_str().unwrap(),
            "--input-ids",
            "1,2",
            "--devices",
            "0,1",
        ],
        &["--devices names GPUs for --ep cuda or tensorrt"],
    );
    let manifest = bundle.join("manifest.json");
    let original = std::fs::read_to_string(&manifest).unwrap();
    common::edit_json(&manifest, |m| {
        m["stages"][1]["first_layer"] = 0.into();
    });
    let err = Model::load(&bundle, &RuntimeOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("stage 1 runs layers 0..4, not from layer"),
        "{err}"
    );
    std::fs::write(&manifest, &original).unwrap();
    common::edit_json(&manifest, |m| {
        m["stages"][1]["model_file"] = "elsewhere.onnx".into();
    });
    let err = Model::load(&bundle, &RuntimeOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("elsewhere.onnx"), "{err}");
    // A bundle of stage 1 alone loads only as a calibration window (`layer_window`), which serves
    // nothing and must be handed the residual stream.
    std::fs::write(&manifest, &original).unwrap();
    common::edit_json(&manifest, |m| {
        let second = m["stages"][1].clone();
        m["stages"] = serde_json::json!([second]);
    });
    let err = Model::load(&bundle, &RuntimeOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not from layer 0"), "{err}");
    let edited: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let start = edited["stages"][0]["first_layer"].clone();
    common::edit_json(&manifest, |m| {
        m["layer_window"] = serde_json::json!({"start": start, "end": 4});
    });
    let window = Model::load(&bundle, &RuntimeOptions::default()).unwrap();
    let err = window.prompt_logits(&[1, 2]).unwrap_err().to_string();
    assert!(err.contains("calibration window"), "{err}");
    let err = window
        .probe_window(&[1, 2], None, &[], &mut |_, _, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("residual stream"), "{err}");
    let hidden = window.bundle.manifest.model.hidden_size;
    let handed_on = window
        .probe_window(
            &[1, 2],
            Some(&vec![0.5; 2 * hidden]),
            &[],
            &mut |_, _, _| Ok(()),
        )
        .unwrap();
    assert!(
        handed_on.is_none(),
        "the last window returns logits, not a residual stream"
    );
    common::edit_json(&manifest, |m| {
        m["layer_window"] = serde_json::json!({"start": 0, "end": 4});
    });
    let err = Model::load(&bundle, &RuntimeOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not from layer 0"), "{err}");
}

#[test]
fn tensorrt_target_stages_have_their_own_profiles_and_match_the_single_graph() {
    let dir = tempfile::tempdir().unwrap();
    for (moe, dtype) in [("cuda", "f32"), ("grouped", "f32"), ("cuda", "f16")] {
        let options = [
            "--target",
            "tensorrt-h100",
            "--moe",
            moe,
            "--dtype",
            dtype,
            "--max-batch",
            "4",
            "--max-seq",
            "64",
        ];
        let name = format!("{moe}-{dtype}");
        let single = compile(
            "tiny-scout",
            &dir.path().join(format!("{name}-1")),
            &options,
        );
        let mut staged_options = options.to_vec();
        staged_options.extend(["--stage-layers", "0..1,1..4"]);
        let staged = compile(
            "tiny-scout",
            &dir.path().join(format!("{name}-2")),
            &staged_options,
        );
        let model = load(&staged);
        let m = &model.bundle.manifest;
        let profiles: Vec<&[String; 3]> = m
            .stages
            .iter()
            .map(|s| s.tensorrt_profile.as_ref().unwrap())
            .collect();
        // Stage 0 takes the ids (and image rows), stage 1 the residual stream and logits_index.
        let max = |k: usize| {
            profiles[k][2]
                .split(',')
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert!(
            max(0).contains(&"input_ids:4x64".to_string()),
            "{:?}",
            max(0)
        );
        assert!(max(0).iter().any(|p| p.starts_with("image_features:")));
        assert!(!max(0)
            .iter()
            .any(|p| p.starts_with("logits_index:") || p.starts_with("hidden_in:")));
        assert!(
            max(1).contains(&"hidden_in:4x64x64".to_string()),
            "{:?}",
            max(1)
        );
        assert!(max(1).contains(&"logits_index:4x64".to_string()));
        assert!(max(1).contains(&"past_key.3:4x2x256x16".to_string()));
        assert!(!max(1)
            .iter()
            .any(|p| p.starts_with("input_ids:") || p.starts_with("past_key.0:")));
        assert_eq!(
            m.tensorrt.as_ref().unwrap().profile_max_shapes,
            profiles[0][2]
        );
        // `herd lint` checks every stage graph.
        let lint = common::herd(&["lint", staged.to_str().unwrap(), "--target", "tensorrt"]);
        let said = String::from_utf8_lossy(&lint.stderr);
        assert!(lint.status.success(), "{said}");
        assert!(
            said.contains("stage0.onnx, stage1.onnx, vision.onnx"),
            "{said}"
        );
        // On the CPU provider (the same graphs TensorRT gets): the single graph's numbers.
        let (got, want) = (outputs(&model), outputs(&load(&single)));
        // f32: exact. f16: ONNX Runtime's CPU graph optimizer fuses a layer's residual Add with the
        // next layer's norm (and rounds around its f16 kernels) only within one graph, so a cut
        // rounds the stream once more: f16 precision (2^-11 = 4.9e-4 per rounding), measured 6.5e-4
        // of the logit scale on tiny-scout; the tokens stay identical.
        let bound = if dtype == "f32" { 1e-6 } else { 1e-3 };
        for ((logits, tokens), (want_logits, want_tokens)) in got.iter().zip(&want) {
            let err = relative_error(logits, want_logits);
            assert!(
                err <= bound,
                "--moe {moe} --dtype {dtype}: relative error {err}"
            );
            assert_eq!(tokens, want_tokens, "--moe {moe} --dtype {dtype}");
        }
    }
    // A staged bundle's engines are built by the TensorRT EP per stage, not by build-engine.
    let out = common::herd(&[
        "build-engine",
        dir.path().join("cuda-f32-2").to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains("holds 2 pipeline stages"), "{said}");
}
