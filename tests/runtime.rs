//! The runtime library through its Rust API: long generation across many chunk boundaries (48 and 300
//! tokens against transformers) with the preallocated cache bounded (kv_bytes() against the formula at
//! every length), the maximum context, and many threads generating from one shared Model.

mod common;

use std::sync::Arc;

use common::{fixture, goldens_file, greedy, max_error, ok, LOGIT_TOLERANCE};
use herd_runtime::{GenerateParams, Model, RuntimeOptions, SampleParams, Sampling};

fn compile(name: &str, dir: &std::path::Path, max_context: usize) -> std::path::PathBuf {
    let bundle = dir.join(name);
    ok(&[
        "compile",
        fixture(name).to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--max-context",
        &max_context.to_string(),
    ]);
    bundle
}

#[test]
fn long_generation_across_chunks_matches_transformers_with_bounded_cache() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(
        &compile("tiny-scout", dir.path(), 128),
        &RuntimeOptions::default(),
    )
    .unwrap();
    let (_, golden) = goldens_file("tiny-scout", "goldens-long.safetensors")
        .pop()
        .unwrap();
    assert_eq!((golden.input_ids.len(), golden.greedy_ids.len()), (12, 48));
    let out = model.generate(&golden.input_ids, &greedy(48)).unwrap();
    assert_eq!(
        out.tokens, golden.greedy_ids,
        "greedy tokens across 7 chunk boundaries"
    );
    let logits = ndarray::Array2::from_shape_vec((48, 512), out.step_logits.concat()).unwrap();
    let (err, scale) = max_error(&logits, &golden.step_logits);
    eprintln!("long generation: max error {err:.3e} (scale {scale:.3})");
    assert!(
        err <= LOGIT_TOLERANCE * scale,
        "logits differ by {err} (scale {scale})"
    );

    // kv_bytes(): preallocated once, the same at every length: 3 chunked layers hold a ring of one
    // chunk (8 entries), the NoPE layer the whole context (128).
    let per_token_per_layer = 2 * 2 * 16 * 4; // k and v, 2 kv heads, head_dim 16, f32
    let mut session = model.session().unwrap();
    let expected = (3 * per_token_per_layer * 8, per_token_per_layer * 128);
    let kv = session.kv_bytes();
    assert_eq!((kv.chunked, kv.full), expected);
    let mut ids = golden.input_ids.clone();
    ids.extend_from_slice(&golden.greedy_ids);
    session.feed(&ids[..12]).unwrap();
    for t in 12..ids.len() {
        session.feed(&ids[t..t + 1]).unwrap();
        let kv = session.kv_bytes();
        assert_eq!((kv.chunked, kv.full), expected, "at position {t}");
    }
}

/// The graph writes each call's keys and values into the session's own buffers (nothing copies them
/// back): entry j of a full layer holds position j, a ring entry is overwritten by the next chunk.
#[test]
fn the_cache_is_written_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(
        &compile("tiny-scout", dir.path(), 32),
        &RuntimeOptions::default(),
    )
    .unwrap();
    let nope = model.bundle.manifest.model.nope_layers[0];
    let ring = (0..4).find(|l| *l != nope).unwrap();
    let mut session = model.session().unwrap();
    let zero = vec![0f32; 2 * 16];
    let entry = |s: &herd_runtime::Session, layer: usize, i: usize| {
        s.cache().entry(layer, false, 0, i).unwrap()
    };
    assert_eq!(entry(&session, ring, 0), zero, "allocated zeroed");
    session.feed(&[5, 6, 7]).unwrap();
    for i in 0..3 {
        assert_ne!(entry(&session, ring, i), zero, "ring entry {i} written");
        assert_ne!(entry(&session, nope, i), zero, "full entry {i} written");
    }
    assert_eq!(entry(&session, ring, 3), zero, "ring entry 3 not yet");
    assert_eq!(entry(&session, nope, 3), zero, "full entry 3 not yet");
    let (ring0, full0) = (entry(&session, ring, 0), entry(&session, nope, 0));
    // Positions 3..9: position 8 starts the next chunk and takes ring entry 0.
    session.feed(&[8, 9, 10, 11, 12, 13]).unwrap();
    assert_eq!(
        entry(&session, nope, 0),
        full0,
        "a full layer keeps position 0"
    );
    assert_ne!(
        entry(&session, ring, 0),
        ring0,
        "the ring's entry 0 now holds position 8"
    );
    assert_ne!(entry(&session, nope, 8), zero);
}

#[test]
fn three_hundred_tokens_across_dozens_of_chunk_boundaries_match_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(
        &compile("tiny-scout", dir.path(), 384),
        &RuntimeOptions::default(),
    )
    .unwrap();
    let (_, golden) = goldens_file("tiny-scout", "goldens-long300.safetensors")
        .pop()
        .unwrap();
    assert_eq!((golden.input_ids.len(), golden.greedy_ids.len()), (41, 300));
    let out = model.generate(&golden.input_ids, &greedy(300)).unwrap();
    assert_eq!(
        out.tokens, golden.greedy_ids,
        "greedy tokens across 43 chunk boundaries (5 of them in the prefill)"
    );
    let logits = ndarray::Array2::from_shape_vec((300, 512), out.step_logits.concat()).unwrap();
    let (err, scale) = max_error(&logits, &golden.step_logits);
    eprintln!("300-token generation: max error {err:.3e} (scale {scale:.3})");
    assert!(
        err <= LOGIT_TOLERANCE * scale,
        "logits differ by {err} (scale {scale})"
    );
    // The prompt's logits in one prefill that is cut at every chunk boundary.
    let prompt = model.prompt_logits(&golden.input_ids).unwrap();
    let prompt = ndarray::Array2::from_shape_vec((41, 512), prompt).unwrap();
    let (err, scale) = max_error(&prompt, &golden.logits);
    assert!(
        err <= LOGIT_TOLERANCE * scale,
        "prompt logits differ by {err} (scale {scale})"
    );
}

#[test]
fn longer_than_the_maximum_context_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(
        &compile("tiny-maverick", dir.path(), 16),
        &RuntimeOptions::default(),
    )
    .unwrap();
    let mut session = model.session().unwrap();
    session.feed(&[5; 10]).unwrap();
    let err = session.feed(&[5; 7]).unwrap_err().to_string();
    assert!(
        err.contains("17 tokens") && err.contains("at most 16 positions"),
        "{err}"
    );
    assert_eq!(
        session.position(),
        10,
        "a refused feed leaves the session as it was"
    );
    session.feed(&[5; 6]).unwrap();
    assert!(model
        .generate(&[1; 17], &greedy(1))
        .unwrap_err()
        .to_string()
        .contains("at most 16"));

    // A runtime context shorter than the bundle's bounds sessions and is checked before generating.
    let short = Model::load(
        &dir.path().join("tiny-maverick"),
        &RuntimeOptions {
            context: Some(8),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(short.generate(&[1; 6], &greedy(3)).is_ok());
    // Refused up front (not by a failed step midway).
    let err = short.generate(&[1; 6], &greedy(4)).unwrap_err().to_string();
    assert!(
        err.contains("max_new_tokens 4") && err.contains("at most 8"),
        "{err}"
    );
    let err = short
        .session()
        .unwrap()
        .feed(&[5; 9])
        .unwrap_err()
        .to_string();
    assert!(err.contains("at most 8 positions"), "{err}");
}

#[test]
fn threads_share_one_model_and_get_what_they_get_alone() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Model>();
    let dir = tempfile::tempdir().unwrap();
    // Four ONNX Runtime sessions: the 16 threads really run graphs in parallel.
    let options = RuntimeOptions {
        sessions: 4,
        ..Default::default()
    };
    let model = Arc::new(Model::load(&compile("tiny-scout", dir.path(), 64), &options).unwrap());
    let prompt = |i: i64| vec![3 + i, 40 + 2 * i, 100 + 3 * i, 7];
    let params = |i: u64| GenerateParams {
        max_new_tokens: 12,
        sampling: if i % 2 == 0 {
            Sampling::Greedy
        } else {
            Sampling::Sample(SampleParams {
                temperature: 0.9,
                top_k: 20,
                top_p: 0.95,
                seed: i,
                ..Default::default()
            })
        },
        stop_ids: Some(vec![]),
        stop_strings: vec![],
        return_logits: false,
    };
    let alone: Vec<Vec<i64>> = (0..16)
        .map(|i| {
            model
                .generate(&prompt(i), &params(i as u64))
                .unwrap()
                .tokens
        })
        .collect();
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let model = Arc::clone(&model);
            std::thread::spawn(move || {
                model
                    .generate(&prompt(i), &params(i as u64))
                    .unwrap()
                    .tokens
            })
        })
        .collect();
    let together: Vec<Vec<i64>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(together, alone);
    assert!(
        alone.windows(2).any(|w| w[0] != w[1]),
        "the 16 generations should differ"
    );
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    use herd_runtime::{Message, TextCodec};
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile("tiny-scout", dir.path(), 64);
    let codec = TextCodec::load(&bundle).unwrap();
    let goldens: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-scout").join("tokenizer-goldens.json")).unwrap(),
    )
    .unwrap();
    let ids = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    for t in goldens["texts"].as_array().unwrap() {
        assert_eq!(
            codec.encode(t["text"].as_str().unwrap()).unwrap(),
            ids(&t["ids"]),
            "{}",
            t["text"]
        );
    }
    let messages: Vec<Message> =
        serde_json::from_value(goldens["chat"]["messages"].clone()).unwrap();
    assert_eq!(
        codec.render(&messages, true).unwrap(),
        goldens["chat"]["rendered"].as_str().unwrap()
    );
    let chat = codec.encode_chat(&messages, true).unwrap();
    assert_eq!(chat, ids(&goldens["chat"]["ids"]));
    assert_eq!(
        chat.iter().filter(|&&i| i == 500).count(),
        1,
        "exactly one BOS"
    );
    assert_eq!(
        codec.decode(&ids(&goldens["decode"]["ids"]), true).unwrap(),
        goldens["decode"]["text"].as_str().unwrap()
    );

    // Without a template in the checkpoint, Llama 4's format is used.
    std::fs::remove_file(bundle.join("chat_template.jinja")).unwrap();
    let fallback = TextCodec::load(&bundle).unwrap();
    let one = [Message {
        role: "user".into(),
        content: " hi ".into(),
    }];
    assert_eq!(
        fallback.render(&one, true).unwrap(),
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nhi<|eot|><|header_start|>assistant<|header_end|>\n\n"
    );
}

#[test]
fn streaming_stops_at_strings_and_on_cancellation() {
    use herd_runtime::{Message, Prompt, StopReason};
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(
        &compile("tiny-scout", dir.path(), 128),
        &RuntimeOptions::default(),
    )
    .unwrap();
    let text =
        |stream: herd_runtime::TokenStream| stream.map(|e| e.unwrap().text).collect::<String>();

    let all = text(
        model
            .stream(Prompt::Text("Hello, world!".into()), &greedy(30), None)
            .unwrap(),
    );
    let ids = model
        .generate(
            &model.text().unwrap().encode("Hello, world!").unwrap(),
            &greedy(30),
        )
        .unwrap()
        .tokens;
    assert_eq!(
        all,
        model.text().unwrap().decode(&ids, true).unwrap(),
        "streamed text deltas add up to the decoded text"
    );

    // Stop at the first occurrence of a piece of that text.
    let needle: String = all.chars().skip(3).take(2).collect();
    let params = GenerateParams {
        stop_strings: vec![needle.clone()],
        ..greedy(30)
    };
    let mut stream = model
        .stream(Prompt::Text("Hello, world!".into()), &params, None)
        .unwrap();
    let cut: String = (&mut stream).map(|e| e.unwrap().text).collect();
    assert_eq!(stream.stop_reason(), Some(StopReason::StopString));
    // The stream ends with the token that completes the stop string: the text up to and including
    // its first occurrence, within one token's text.
    let end = all.find(&needle).expect("the stop string occurs") + needle.len();
    assert!(
        all.starts_with(&cut) && cut.len() >= end && cut.len() < all.len(),
        "{cut:?} is not the generation cut at its first {needle:?} ({all:?})"
    );

    // Cancellation from another holder of the flag ends the stream after the current token.
    let cancel = std::sync::Arc::new(AtomicBool::new(false));
    let chat = vec![Message {
        role: "user".into(),
        content: "hi".into(),
    }];
    let mut stream = model
        .stream(Prompt::Chat(chat), &greedy(30), Some(cancel.clone()))
        .unwrap();
    assert!(stream.next().unwrap().is_ok());
    cancel.store(true, Ordering::Relaxed);
    assert!(stream.next().is_none());
    assert_eq!(stream.stop_reason(), Some(StopReason::Cancelled));
}

#[test]
fn chat_streams_over_a_pipe() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile("tiny-scout", dir.path(), 256);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herd"))
        .args([
            "chat",
            bundle.to_str().unwrap(),
            "--system",
            "You are herd.",
            "--max-new-tokens",
            "6",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello!\n/reset\nCompile Llama 4\n/exit\nnever read\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A prompt per line read until /exit; each reply is the greedy reply to the conversation so far,
    // and /reset starts it again from the system message.
    let model = Model::load(&bundle, &RuntimeOptions::default()).unwrap();
    let system = common::message("system", "You are herd.");
    let first = common::chat_reply(
        &model,
        &[system.clone(), common::message("user", "Hello!")],
        &[],
        6,
    );
    let after_reset = common::chat_reply(
        &model,
        &[system, common::message("user", "Compile Llama 4")],
        &[],
        6,
    );
    assert!(!first.is_empty() && !after_reset.is_empty());
    assert_eq!(stdout, format!("> {first}\n> > {after_reset}\n> "));
}

/// An f16 bundle on the CPU provider: ONNX Runtime casts its weights to f32, so it is refused with the
/// reason and the alternatives when that copy does not fit the memory available, and runs otherwise.
#[test]
fn f16_bundles_on_the_cpu_are_refused_when_their_f32_copy_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("f16");
    let bundle = bundle.to_str().unwrap();
    ok(&[
        "compile",
        fixture("tiny-maverick").to_str().unwrap(),
        "-o",
        bundle,
        "--dtype",
        "f16",
        "--max-context",
        "64",
    ]);
    let run = |memory: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_herd"));
        command.args([
            "run",
            bundle,
            "--input-ids",
            "1,2,3",
            "--max-new-tokens",
            "1",
        ]);
        match memory {
            Some(m) => command.env(herd_runtime::cpu_memory::MEMORY_ENV, m),
            None => command.env_remove(herd_runtime::cpu_memory::MEMORY_ENV),
        };
        command.output().unwrap()
    };
    let refused = run(Some("1000"));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "an f16 bundle ran in 1000 bytes");
    for part in ["f16", "--dtype f32", "--quant int4", "--ep cuda", bundle] {
        assert!(
            stderr.contains(part),
            "the refusal does not say `{part}`: {stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    let bad = run(Some("lots"));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("HERD_CPU_MEMORY_BYTES=lots"));
    let ran = run(None);
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
}
