//! Continuous batching ([`herd_runtime::Batch`]): sequences with different prompt lengths (one with
//! images) join a running batch at different steps, each at its own position in its own cache slot, and
//! get exactly the tokens they get alone, with logits within 1e-5 relative; a cancelled row leaves the
//! others exact and its slot is reused.

mod common;

use std::collections::HashMap;

use common::{fixture, greedy, ok};
use herd_runtime::sampling::argmax;
use herd_runtime::{Batch, BatchEvent, Model, Prompt, RuntimeOptions};

fn bundle(dir: &std::path::Path, extra: &[&str]) -> std::path::PathBuf {
    let out = dir.join("bundle");
    let mut args: Vec<String> = vec![
        "compile".into(),
        fixture("tiny-scout").to_str().unwrap().to_string(),
        "-o".into(),
        out.to_str().unwrap().to_string(),
        "--max-context".into(),
        "256".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&refs);
    out
}

/// A sequence's prompt (ids and image rows), when it joins (step), and its new tokens.
struct Case {
    ids: Vec<i64>,
    features: Vec<f32>,
    join_at: usize,
    new: usize,
}

fn cases(model: &Model) -> Vec<Case> {
    let image = Prompt::WithImages {
        prompt: Box::new(Prompt::Text("Describe <|image|> briefly.".into())),
        images: vec![herd_runtime::vision::ImageSource::Path(
            fixture("images").join("small.png"),
        )],
    };
    let (image_ids, image_rows) = herd_runtime::prepare_prompt(model, image).unwrap();
    let text = |n: usize, seed: i64| -> Vec<i64> {
        (0..n as i64)
            .map(|i| 3 + (i * 37 + seed * 11) % 500)
            .collect()
    };
    let mut cases: Vec<Case> = [(1, 0), (5, 0), (9, 1), (17, 2), (3, 4), (30, 4), (12, 7)]
        .iter()
        .enumerate()
        .map(|(i, &(len, join_at))| Case {
            ids: text(len, i as i64),
            features: Vec::new(),
            join_at,
            new: 10 + 3 * i,
        })
        .collect();
    cases.insert(
        3,
        Case {
            ids: image_ids,
            features: image_rows,
            join_at: 2,
            new: 12,
        },
    );
    cases
}

/// Tokens and logits of one sequence run alone in a session of its own.
fn solo(model: &Model, case: &Case) -> (Vec<i64>, Vec<Vec<f32>>) {
    let mut session = model.session().unwrap();
    let mut logits = session.feed_with_images(&case.ids, &case.features).unwrap();
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    for step in 0..case.new {
        let id = argmax(&logits);
        tokens.push(id);
        all.push(logits.clone());
        if step + 1 < case.new {
            logits = session.feed(&[id]).unwrap();
        }
    }
    (tokens, all)
}

fn assert_close(ours: &[f32], alone: &[f32], what: &str) {
    let scale = alone.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = ours
        .iter()
        .zip(alone)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= 1e-5 * scale,
        "{what}: logits differ by {err} (scale {scale})"
    );
}

/// Runs `cases` through a batch of `slots`, each joining at its step (or later, when no slot is free);
/// `cancel` = (case, after how many of its tokens). Returns each case's tokens and logits.
fn batched(
    model: &Model,
    cases: &[Case],
    slots: usize,
    cancel: Option<(usize, usize)>,
) -> Vec<(Vec<i64>, Vec<Vec<f32>>)> {
    let mut batch = Batch::new(model, slots).unwrap();
    let mut out: Vec<(Vec<i64>, Vec<Vec<f32>>)> =
        cases.iter().map(|_| Default::default()).collect();
    let mut case_of: HashMap<u64, usize> = HashMap::new();
    let mut waiting: Vec<usize> = (0..cases.len()).collect();
    let mut finished = 0;
    let mut step = 0;
    while finished < cases.len() {
        waiting.retain(|&c| {
            if cases[c].join_at > step || batch.free_slots() == 0 {
                return true;
            }
            let case = &cases[c];
            let id = batch
                .add(case.ids.clone(), case.features.clone(), greedy(case.new))
                .unwrap();
            case_of.insert(id, c);
            false
        });
        for event in batch.step().unwrap() {
            match event {
                BatchEvent::Token {
                    sequence,
                    id,
                    logits,
                } => {
                    let c = case_of[&sequence];
                    out[c].0.push(id);
                    out[c].1.push(logits.unwrap());
                    if cancel == Some((c, out[c].0.len())) {
                        assert!(batch.cancel(sequence));
                    }
                }
                BatchEvent::Finished { .. } => finished += 1,
            }
        }
        step += 1;
        assert!(step < 1000, "the batch made no progress");
    }
    assert!(batch.is_idle());
    out
}

#[test]
fn ragged_batch_rows_get_exactly_their_solo_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&bundle(dir.path(), &[]), &RuntimeOptions::default()).unwrap();
    let cases = cases(&model);
    assert_eq!(cases.len(), 8);
    let alone: Vec<_> = cases.iter().map(|c| solo(&model, c)).collect();

    // Four slots for eight sequences: later ones wait for a slot, which is then reused.
    for slots in [8, 4] {
        let together = batched(&model, &cases, slots, None);
        for (i, ((tokens, logits), (solo_tokens, solo_logits))) in
            together.iter().zip(&alone).enumerate()
        {
            assert_eq!(tokens, solo_tokens, "{slots} slots: sequence {i} tokens");
            for (step, (a, b)) in logits.iter().zip(solo_logits).enumerate() {
                assert_close(a, b, &format!("{slots} slots: sequence {i} step {step}"));
            }
        }
    }

    // Cancelling sequence 2 after 4 tokens: it stops there, every other row is unchanged.
    let together = batched(&model, &cases, 4, Some((2, 4)));
    for (i, ((tokens, _), (solo_tokens, _))) in together.iter().zip(&alone).enumerate() {
        let expected = if i == 2 {
            &solo_tokens[..4]
        } else {
            &solo_tokens[..]
        };
        assert_eq!(tokens, expected, "sequence {i} with sequence 2 cancelled");
    }
}

#[test]
fn a_full_batch_refuses_and_a_too_long_sequence_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(
        &bundle(dir.path(), &["--text-only"]),
        &RuntimeOptions::default(),
    )
    .unwrap();
    let mut batch = Batch::new(&model, 1).unwrap();
    batch.add(vec![5, 6], Vec::new(), greedy(2)).unwrap();
    let err = batch.add(vec![5], Vec::new(), greedy(2)).unwrap_err();
    assert!(err.to_string().contains("all 1 slots are taken"), "{err}");
    let mut other = Batch::new(&model, 2).unwrap();
    let err = other
        .add(vec![5; 200], Vec::new(), greedy(100))
        .unwrap_err();
    assert!(err.to_string().contains("at most 256"), "{err}");
    let err = other.add(vec![5], vec![0.0; 64], greedy(1)).unwrap_err();
    assert!(err.to_string().contains("takes no images"), "{err}");
}
