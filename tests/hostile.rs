//! Hostile and careless inputs (issue 13): each ends in a clear error with nothing lost. Data loss and
//! leaks first: `--force` replaces only a bundle herd wrote, files are never followed out of the model
//! folder, and an interrupted compile leaves no staging folder behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{edit_json, fails_with, fixture, ok, raw_safetensors};

/// A copy of tiny-maverick (small, no vision) that a test may damage.
fn model_copy(dir: &Path) -> PathBuf {
    fixture_copy("tiny-maverick", dir)
}

/// A copy of fixture `name` in `dir/model`.
fn fixture_copy(name: &str, dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    model
}

fn compile_to(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "compile",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--max-context",
        "32",
    ];
    args.extend_from_slice(extra);
    common::herd(&args)
}

/// tiny-maverick compiled into `dir/bundle` for `max_context` positions.
fn maverick_bundle(dir: &Path, max_context: usize) -> PathBuf {
    let bundle = dir.join("bundle");
    ok(&[
        "compile",
        fixture("tiny-maverick").to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--max-context",
        &max_context.to_string(),
    ]);
    bundle
}

/// `herd chat BUNDLE extra..` with piped standard streams.
fn spawn_chat(bundle: &Path, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_herd"))
        .arg("chat")
        .arg(bundle)
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn file_count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn force_replaces_only_a_bundle_herd_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    let files = file_count(&model);
    let model_s = model.to_str().unwrap();

    // The model folder itself, and the folder holding it.
    fails_with(
        &["compile", model_s, "-o", model_s, "--force"],
        &["holds the model folder", "--force replaces only a bundle"],
    );
    let parent = dir.path().to_str().unwrap();
    fails_with(
        &["compile", model_s, "-o", parent, "--force"],
        &["holds the model folder"],
    );
    assert_eq!(file_count(&model), files, "the checkpoint lost files");

    // A regular file, a folder that is not a bundle, a symlink to a bundle.
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "mine").unwrap();
    let out = compile_to(&model, &file, &["--force"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a folder"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    let folder = dir.path().join("photos");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("a.jpg"), "x").unwrap();
    let out = compile_to(&model, &folder, &["--force"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a herd bundle"));
    assert!(folder.join("a.jpg").is_file());
    let bundle = dir.path().join("bundle");
    assert!(compile_to(&model, &bundle, &[]).status.success());
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&bundle, &link).unwrap();
    let out = compile_to(&model, &link, &["--force"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("symbolic link"));
    // No hidden leftovers beside the refused destinations.
    let hidden: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "left behind: {hidden:?}");

    // A device node is never touched (as root the old writer moved /dev/null aside).
    let out = compile_to(&model, Path::new("/dev/null"), &["--force"]);
    assert!(!out.status.success());
    assert!(Path::new("/dev/null").exists());

    // A real bundle is replaced.
    assert!(compile_to(&model, &bundle, &["--force"]).status.success());
}

#[test]
fn files_are_never_followed_out_of_the_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "password").unwrap();
    for name in [
        "chat_template.jinja",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "generation_config.json",
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "model-00002-of-00005.safetensors",
    ] {
        let case = dir.path().join(name.replace('.', "_"));
        let sharded = name.starts_with("model-") || name.ends_with("index.json");
        let model = fixture_copy(
            if sharded {
                "tiny-scout"
            } else {
                "tiny-maverick"
            },
            &case,
        );
        let target = if name.starts_with("config") || name.starts_with("model") {
            // Keep the model loadable through the link's target, which lies outside.
            let outside = case.join(format!("outside-{name}"));
            std::fs::rename(model.join(name), &outside).unwrap();
            outside
        } else {
            secret.clone()
        };
        let _ = std::fs::remove_file(model.join(name));
        std::os::unix::fs::symlink(&target, model.join(name)).unwrap();
        let out = compile_to(&model, &case.join("bundle"), &["--text-only"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{name}: a link out of the folder was followed"
        );
        assert!(
            stderr.contains(name) && stderr.contains("outside the model folder"),
            "{name}: {stderr}"
        );
        assert!(!case.join("bundle").exists());
    }
    // A model folder that is itself a symlink is fine.
    let model = model_copy(&dir.path().join("real"));
    let link = dir.path().join("linked-model");
    std::os::unix::fs::symlink(&model, &link).unwrap();
    ok(&[
        "compile",
        link.to_str().unwrap(),
        "-o",
        dir.path().join("via-link").to_str().unwrap(),
        "--max-context",
        "32",
    ]);
}

#[test]
fn an_interrupted_compile_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth(dir.path(), "ci-small", &[]);
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let out = dir.path().join(format!("bundle-{signal}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
            .args([
                "compile",
                model.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--dtype",
                "f32",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for the staging folder, then interrupt the compile while it writes.
        let staging = |d: &Path| {
            std::fs::read_dir(d)
                .unwrap()
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().contains(".herd-partial-"))
        };
        let start = std::time::Instant::now();
        while !staging(dir.path()) && start.elapsed() < std::time::Duration::from_secs(60) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(staging(dir.path()), "the compile never started writing");
        // SAFETY: sends a signal to the child process this test spawned.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert_eq!(
            status.code(),
            Some(128 + signal),
            "exit status after signal {signal}"
        );
        assert!(
            !staging(dir.path()),
            "signal {signal} left a staging folder"
        );
        assert!(!out.exists(), "signal {signal} left a half-written bundle");
    }
}

/// Byte offset and row length (bytes) of the embedding table in a bundle's external data.
fn embedding_region(bundle: &Path) -> (u64, u64) {
    use onnx_protobuf::Message;
    let model = onnx_protobuf::ModelProto::parse_from_bytes(
        &std::fs::read(bundle.join("model.onnx")).unwrap(),
    )
    .unwrap();
    let table = model
        .graph
        .initializer
        .iter()
        .find(|t| t.name.contains("embed_tokens"))
        .expect("an embedding table");
    let offset = table
        .external_data
        .iter()
        .find(|e| e.key == "offset")
        .map(|e| e.value.parse().unwrap())
        .unwrap();
    (offset, table.dims[1] as u64 * 4)
}

#[test]
fn damaged_weights_are_named_and_never_give_silent_output() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth(dir.path(), "ci-small", &[]);
    let bundle = dir.path().join("bundle");
    ok(&[
        "compile",
        model.to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--dtype",
        "f32",
        "--max-context",
        "32",
    ]);
    let data = bundle.join("model.onnx.data");
    assert!(
        std::fs::metadata(&data).unwrap().len() > 64 << 20,
        "the weights must be past the checksum-on-load limit"
    );
    let b = bundle.to_str().unwrap();
    let verified = ok(&["verify", b]);
    assert!(verified.contains("ok") && verified.contains("model.onnx.data"));

    // Token 7's embedding row becomes NaN: a load (sizes only) accepts the bundle.
    let (offset, row) = embedding_region(&bundle);
    let mut file = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    file.seek(SeekFrom::Start(offset + 7 * row)).unwrap();
    file.write_all(&f32::NAN.to_le_bytes().repeat(4)).unwrap();
    drop(file);

    fails_with(
        &["run", b, "--input-ids", "5,7,9", "--max-new-tokens", "2"],
        &["NaN or infinite logits", "position 2", "herd verify"],
    );
    let out = common::herd(&["verify", b]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("DAMAGED") && stdout.contains("model.onnx.data: sha256 differs"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 of"));
    let json: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(
        &common::herd(&["verify", b, "--json"]).stdout,
    ))
    .unwrap();
    assert_eq!(json["damaged"], 1);
    fails_with(
        &[
            "run",
            b,
            "--verify",
            "--input-ids",
            "5",
            "--max-new-tokens",
            "1",
        ],
        &["model.onnx.data", "sha256 differs", "damaged"],
    );
}

#[test]
fn out_of_range_configs_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, serde_json::Value, &str); 5] = [
        (
            "tiny-maverick",
            "rms_norm_eps",
            serde_json::json!(0.0),
            "rms_norm_eps",
        ),
        (
            "tiny-maverick",
            "rms_norm_eps",
            serde_json::json!(-1e-5),
            "rms_norm_eps",
        ),
        (
            "tiny-maverick",
            "rope_theta",
            serde_json::json!(1e-300),
            "rope_theta",
        ),
        (
            "tiny-maverick",
            "rope_theta",
            serde_json::json!(-10.0),
            "rope_theta",
        ),
        (
            "tiny-scout",
            "vision_config.rope_theta",
            serde_json::json!(-5.0),
            "vision_config.rope_theta",
        ),
    ];
    for (n, (name, key, value, named)) in cases.into_iter().enumerate() {
        let model = fixture_copy(name, &dir.path().join(n.to_string()));
        edit_json(&model.join("config.json"), |c| {
            let (section, field) = match key.split_once('.') {
                Some((s, f)) => (&mut c[s], f),
                None if c.get("text_config").is_some() => (&mut c["text_config"], key),
                None => (c, key),
            };
            if field == "rope_theta" {
                if let Some(p) = section.get_mut("rope_parameters") {
                    p["rope_theta"] = value.clone();
                }
            }
            section[field] = value.clone();
        });
        fails_with(
            &["inspect", model.to_str().unwrap()],
            &[named, "config.json"],
        );
    }
}

fn compile_48(model: &Path, out: &Path) {
    ok(&[
        "compile",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--max-context",
        "48",
    ]);
}

#[test]
fn a_null_chunk_size_means_no_chunking_as_in_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    edit_json(&model.join("config.json"), |c| {
        c["attention_chunk_size"] = serde_json::Value::Null
    });
    let summary = ok(&["inspect", model.to_str().unwrap()]);
    assert!(summary.contains("chunk none"), "{summary}");
    let ir = ok(&["inspect", model.to_str().unwrap(), "--ir"]);
    assert!(!ir.contains("chunk"), "no layer attends in chunks:\n{ir}");
    let bundle = dir.path().join("bundle");
    ok(&[
        "compile",
        model.to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--max-context",
        "48",
    ]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["model"]["attention_chunk_size"], 48);
    // No chunking is a chunk longer than the context: the same logits over 40 positions, which cross
    // the fixture's own chunk of 8 five times (and differ from it).
    let logits = |bundle: &Path| {
        let npy = bundle.with_extension("npy");
        let ids: Vec<String> = (1..=20).map(|i| i.to_string()).collect();
        ok(&[
            "run",
            bundle.to_str().unwrap(),
            "--input-ids",
            &ids.join(","),
            "--max-new-tokens",
            "20",
            "--ignore-eos",
            "--dump-logits",
            npy.to_str().unwrap(),
        ]);
        ndarray_npy::read_npy::<_, ndarray::Array2<f32>>(&npy).unwrap()
    };
    let unchunked = logits(&bundle);
    let long = dir.path().join("long");
    let long_model = fixture_copy("tiny-maverick", &long);
    edit_json(&long_model.join("config.json"), |c| {
        c["attention_chunk_size"] = serde_json::json!(4096)
    });
    let long_bundle = long.join("bundle");
    compile_48(&long_model, &long_bundle);
    assert_eq!(unchunked, logits(&long_bundle));
    let chunked_bundle = dir.path().join("chunked");
    compile_48(&fixture("tiny-maverick"), &chunked_bundle);
    assert_ne!(unchunked, logits(&chunked_bundle));
}

#[test]
fn tampered_model_facts_and_empty_graphs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    let bundle = dir.path().join("bundle");
    assert!(compile_to(&model, &bundle, &[]).status.success());
    let manifest = bundle.join("manifest.json");
    let original = std::fs::read_to_string(&manifest).unwrap();
    let b = bundle.to_str().unwrap();
    for (edit, message) in [
        (
            ("attention_chunk_size", serde_json::json!(0)),
            "attention_chunk_size is 0",
        ),
        (("vocab_size", serde_json::json!(0)), "vocab_size 0"),
        (
            ("num_layers", serde_json::json!(1_000_000_000u64)),
            "num_layers",
        ),
        (("max_positions", serde_json::json!(0)), "max_positions 0"),
    ] {
        std::fs::write(&manifest, &original).unwrap();
        edit_json(&manifest, |m| m["model"][edit.0] = edit.1.clone());
        fails_with(&["run", b, "--input-ids", "1"], &[message, "damaged"]);
    }
    std::fs::write(&manifest, &original).unwrap();
    // The manifest's enums (dtype, MoE lowering, target) take only the values herd writes, and the
    // error names the key.
    for (key, value) in [
        ("dtype", "int3"),
        ("moe_lowering", "magic"),
        ("target", "tpu"),
    ] {
        edit_json(&manifest, |m| m[key] = serde_json::json!(value));
        let unknown = format!("unknown variant `{value}`");
        fails_with(&["run", b, "--input-ids", "1"], &[key, &unknown]);
        fails_with(&["eval", b, "--against", b], &[key, &unknown]);
        std::fs::write(&manifest, &original).unwrap();
    }

    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let err = herd_targets::tensorrt::lint_file(&empty)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not an ONNX model") && err.contains("no graph nodes"),
        "{err}"
    );
}

#[test]
fn generation_parameters_at_their_limits() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = maverick_bundle(dir.path(), 32);
    let b = bundle.to_str().unwrap();
    // A vanishing temperature is greedy, not NaN garbage.
    let greedy = ok(&[
        "run",
        b,
        "--input-ids",
        "3,4,5",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
    ]);
    let cold = ok(&[
        "run",
        b,
        "--input-ids",
        "3,4,5",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "--temperature",
        "1e-40",
        "--seed",
        "3",
    ]);
    assert_eq!(greedy, cold);
    // The budget is checked up front, without wrapping, naming both numbers.
    fails_with(
        &[
            "run",
            b,
            "--input-ids",
            "3,4,5",
            "--max-new-tokens",
            "18446744073709551615",
        ],
        &[
            "the prompt is 3 tokens",
            "max_new_tokens 18446744073709551615",
            "at most 32",
        ],
    );
    fails_with(
        &[
            "run",
            b,
            "--input-ids",
            "1,2,3,4,5,6,7,8,9,10",
            "--max-new-tokens",
            "100",
        ],
        &[
            "the prompt is 10 tokens",
            "max_new_tokens 100",
            "at most 32",
        ],
    );
    fails_with(
        &[
            "run",
            b,
            "--prompt",
            "hello",
            "--stop",
            "",
            "--max-new-tokens",
            "4",
        ],
        &["stop string is empty"],
    );
}

#[test]
fn images_that_are_not_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    ok(&[
        "compile",
        fixture("tiny-scout").to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
    ]);
    let b = bundle.to_str().unwrap();
    fails_with(
        &[
            "run",
            b,
            "--prompt",
            "Describe <|image|>",
            "--max-new-tokens",
            "2",
        ],
        &["1 <|image|> placeholder(s) but no image was given"],
    );
    // A JPEG cut short decodes to grey in most decoders: refused.
    let jpeg = std::fs::read(common::image("photo.jpg")).unwrap();
    let cut = dir.path().join("cut.jpg");
    std::fs::write(&cut, &jpeg[..jpeg.len() * 2 / 3]).unwrap();
    fails_with(
        &[
            "run",
            b,
            "--prompt",
            "<|image|>",
            "--image",
            cut.to_str().unwrap(),
            "--max-new-tokens",
            "1",
        ],
        &["cut.jpg", "truncated", "end-of-image marker"],
    );
    ok(&[
        "run",
        b,
        "--prompt",
        "<|image|>",
        "--image",
        common::image("photo.jpg").to_str().unwrap(),
        "--max-new-tokens",
        "1",
    ]);
    // A FIFO would block a reader forever.
    let fifo = dir.path().join("pipe.png");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: creates a FIFO at a path inside this test's temporary folder.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    fails_with(
        &[
            "run",
            b,
            "--prompt",
            "<|image|>",
            "--image",
            fifo.to_str().unwrap(),
            "--max-new-tokens",
            "1",
        ],
        &["pipe.png", "not a regular file"],
    );
}

#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = maverick_bundle(dir.path(), 32);
    let (b, m) = (
        bundle.to_str().unwrap().to_string(),
        fixture("tiny-maverick").display().to_string(),
    );
    let out2 = dir.path().join("bundle2").display().to_string();
    let commands: Vec<Vec<&str>> = vec![
        vec!["run", &b, "--input-ids", "1,2", "--max-new-tokens", "2"],
        vec![
            "run",
            &b,
            "--input-ids",
            "1,2",
            "--max-new-tokens",
            "2",
            "--json",
        ],
        vec!["inspect", &m],
        vec!["inspect", &m, "--json"],
        vec!["inspect", &m, "--ir"],
        vec!["compile", &m, "-o", &out2, "--json", "--max-context", "32"],
        vec!["verify", &b],
        vec!["plan", &m],
    ];
    for args in commands {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_herd"))
            .args(&args)
            .stdout(full)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded into /dev/full");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            stderr.contains("cannot write to standard output"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn weights_truncated_under_a_running_model_are_explained() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let bundle = maverick_bundle(dir.path(), 256);
    let mut chat = spawn_chat(&bundle, &[]);
    // The session maps the weights at load; wait for the first answer (the second "> " prompt).
    let mut stdin = chat.stdin.take().unwrap();
    writeln!(stdin, "hello").unwrap();
    stdin.flush().unwrap();
    let mut stdout = chat.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while seen.windows(2).filter(|w| w == b"> ").count() < 2 {
        use std::io::Read;
        if stdout.read(&mut byte).unwrap() == 0 {
            panic!("chat ended early: {}", String::from_utf8_lossy(&seen));
        }
        seen.push(byte[0]);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(bundle.join("model.onnx.data"))
        .unwrap()
        .set_len(0)
        .unwrap();
    writeln!(stdin, "hello again").unwrap();
    drop(stdin);
    let out = chat.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("memory-mapped weight file shrank"),
        "no explanation: {stderr}"
    );
}

#[test]
fn unbounded_sizes_are_bounded_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    // config.json: a layer count no Llama 4 has, and a file far larger than any config.
    let model = fixture_copy("tiny-maverick", &dir.path().join("layers"));
    edit_json(&model.join("config.json"), |c| {
        c["num_hidden_layers"] = serde_json::json!(1_000_000_000u64)
    });
    fails_with(
        &["inspect", model.to_str().unwrap()],
        &["num_hidden_layers", "at most 1024"],
    );
    let model = fixture_copy("tiny-maverick", &dir.path().join("array"));
    edit_json(&model.join("config.json"), |c| {
        c["no_rope_layers"] = serde_json::json!(vec![1; 600_000])
    });
    fails_with(
        &["inspect", model.to_str().unwrap()],
        &["config.json", "herd reads at most"],
    );
    // preprocessor_config.json's canvas.
    let model = fixture_copy("tiny-scout", &dir.path().join("patches"));
    edit_json(&model.join("preprocessor_config.json"), |c| {
        c["max_patches"] = serde_json::json!(100_000)
    });
    fails_with(
        &[
            "compile",
            model.to_str().unwrap(),
            "-o",
            dir.path().join("never").to_str().unwrap(),
        ],
        &["max_patches", "1..=64"],
    );
    // A tampered manifest's vision sizes.
    let bundle = dir.path().join("vision-bundle");
    ok(&[
        "compile",
        fixture("tiny-scout").to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--max-context",
        "64",
    ]);
    let manifest = bundle.join("manifest.json");
    let original = std::fs::read_to_string(&manifest).unwrap();
    for (key, value) in [
        ("tile_size", 1_000_000u64),
        ("tokens_per_tile", 1_000_000_000),
        ("max_tiles", 1_000_000),
    ] {
        std::fs::write(&manifest, &original).unwrap();
        edit_json(&manifest, |m| m["vision"][key] = serde_json::json!(value));
        fails_with(
            &["run", bundle.to_str().unwrap(), "--input-ids", "1"],
            &["vision section"],
        );
    }
    std::fs::write(&manifest, &original).unwrap();
    // Synthetic checkpoints and runtime sessions.
    fails_with(
        &[
            "synth",
            "--preset",
            "ci-small",
            "--vocab",
            "100000000000",
            "-o",
            dir.path().join("synth").to_str().unwrap(),
        ],
        &["--vocab 100000000000", "at most"],
    );
    fails_with(
        &[
            "run",
            bundle.to_str().unwrap(),
            "--input-ids",
            "1",
            "--sessions",
            "100000",
        ],
        &["--sessions", "100000"],
    );
    fails_with(
        &[
            "compile",
            fixture("tiny-maverick").to_str().unwrap(),
            "-o",
            dir.path().join("never2").to_str().unwrap(),
            "--max-context",
            "100000000",
        ],
        &["--max-context 100000000", "1 to 16777216"],
    );
}

#[test]
fn templates_and_prompts_cannot_run_away() {
    use herd_runtime::{GenerateParams, Message, Model, Prompt, RuntimeOptions};
    let dir = tempfile::tempdir().unwrap();
    let bundle = maverick_bundle(dir.path(), 32);
    let model = Model::load(&bundle, &RuntimeOptions::default()).unwrap();
    let params = GenerateParams {
        max_new_tokens: 1,
        ..Default::default()
    };
    // 40 MB of text is refused before tokenizing (the bundle holds 32 positions).
    let huge = "word ".repeat(8 << 20);
    let err = model
        .stream(Prompt::Text(huge.clone()), &params, None)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("more than the 32 positions"), "{err}");
    let chat = vec![Message {
        role: "user".into(),
        content: huge,
    }];
    let err = model
        .stream(Prompt::Chat(chat), &params, None)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("bytes"), "{err}");

    // Chat templates: an endless loop runs out of fuel, a flood of output is cut off.
    for (template, expected) in [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}{% endfor %}{% endfor %}{% endfor %}",
            "fuel",
        ),
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}",
            "passes",
        ),
    ] {
        std::fs::write(bundle.join("chat_template.jinja"), template).unwrap();
        edit_manifest_checksum(&bundle, "chat_template.jinja");
        let model = Model::load(&bundle, &RuntimeOptions::default()).unwrap();
        let msg = vec![Message {
            role: "user".into(),
            content: "hi".into(),
        }];
        let err = model
            .stream(Prompt::Chat(msg), &params, None)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(expected), "{template}: {err}");
    }
}

/// Re-records one file's size and sha256 in a bundle's manifest (a deliberate edit, as a user would
/// make with their own template).
fn edit_manifest_checksum(bundle: &Path, name: &str) {
    let bytes = std::fs::read(bundle.join(name)).unwrap();
    let sha = herd_targets::sha256_hex(&bytes);
    edit_json(&bundle.join("manifest.json"), |m| {
        let files = m["files"].as_array_mut().unwrap();
        match files.iter_mut().find(|f| f["path"] == name) {
            Some(f) => {
                f["bytes"] = serde_json::json!(bytes.len());
                f["sha256"] = serde_json::json!(sha);
            }
            None => {
                files.push(serde_json::json!({"path": name, "bytes": bytes.len(), "sha256": sha}))
            }
        }
    });
}

#[test]
fn chat_survives_lines_that_are_not_text() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let bundle = maverick_bundle(dir.path(), 256);
    let mut chat = spawn_chat(&bundle, &["--max-new-tokens", "2"]);
    let mut stdin = chat.stdin.take().unwrap();
    stdin.write_all(b"caf\xe9 latin-1\n").unwrap();
    stdin.write_all(b"hello\n/exit\n").unwrap();
    drop(stdin);
    let out = chat.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("not UTF-8 text; the line was ignored"),
        "{stderr}"
    );
    // The session went on: two prompts after the refused line (hello's answer, then /exit).
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.matches("> ").count() >= 3, "{stdout}");
}

#[test]
fn errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    // A JSON type error names its key, nested ones with their path.
    let model = fixture_copy("tiny-maverick", &dir.path().join("types"));
    edit_json(&model.join("config.json"), |c| {
        c["rope_parameters"]["rope_type"] = serde_json::json!(5)
    });
    fails_with(
        &["inspect", model.to_str().unwrap()],
        &["key `rope_parameters.rope_type`", "expected a string"],
    );
    // A shard that is a folder.
    let model = fixture_copy("tiny-maverick", &dir.path().join("folder"));
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    std::fs::create_dir(model.join("model.safetensors")).unwrap();
    fails_with(
        &["inspect", model.to_str().unwrap()],
        &["model.safetensors", "is not a regular file"],
    );
    // A tensor listed twice is named as such, not as an overlap.
    let model = fixture_copy("tiny-maverick", &dir.path().join("dup"));
    raw_safetensors(
        &model.join("model.safetensors"),
        r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
        16,
    );
    fails_with(
        &["inspect", model.to_str().unwrap()],
        &["tensor `w` is listed twice"],
    );
    // A manifest that disagrees with its graph is refused at load, not mid-run by ONNX Runtime.
    let bundle = maverick_bundle(dir.path(), 32);
    edit_json(&bundle.join("manifest.json"), |m| {
        m["model"]["num_kv_heads"] = serde_json::json!(3)
    });
    fails_with(
        &["run", bundle.to_str().unwrap(), "--input-ids", "1"],
        &["past_key.0", "manifest says 3 kv heads"],
    );
    // A manifest value of the wrong type names its key.
    edit_json(&bundle.join("manifest.json"), |m| {
        m["model"]["num_kv_heads"] = serde_json::json!("one")
    });
    fails_with(
        &["run", bundle.to_str().unwrap(), "--input-ids", "1"],
        &["key `model.num_kv_heads`"],
    );
}

/// CRC-32 (IEEE) of a PNG chunk's type and data.
fn png_crc(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                0xedb8_8320 ^ (crc >> 1)
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn an_image_declaring_a_huge_canvas_is_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    // A tiny PNG whose header declares 16384 x 8192 RGBA16 (1 GiB to decode).
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend(png_crc(&body).to_be_bytes());
    };
    let mut ihdr = 16384u32.to_be_bytes().to_vec();
    ihdr.extend(8192u32.to_be_bytes());
    ihdr.extend([16, 6, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    let path = dir.path().join("bomb.png");
    std::fs::write(&path, &png).unwrap();
    let bundle = dir.path().join("bundle");
    ok(&[
        "compile",
        fixture("tiny-scout").to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
    ]);
    fails_with(
        &[
            "run",
            bundle.to_str().unwrap(),
            "--prompt",
            "<|image|>",
            "--image",
            path.to_str().unwrap(),
            "--max-new-tokens",
            "1",
        ],
        &["bomb.png", "16384x8192", "downscale"],
    );
}
