//! Bundles are written atomically, refuse to overwrite without --force, and a damaged or foreign
//! bundle is refused with a clear error; bad run parameters are refused before anything runs.

mod common;

use common::{fails_with, fixture, herd, ok};

use std::fs;
use std::path::Path;
use std::process::Command;

fn compile_maverick(bundle: &Path) {
    ok(&[
        "compile",
        fixture("tiny-maverick").to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--max-context",
        "64",
    ]);
}

fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn failed_compile_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        fs::copy(fixture("tiny-maverick").join(f), model.join(f)).unwrap();
    }
    // Truncate the weights: the compile must fail before a bundle appears.
    let weights = model.join("model.safetensors");
    let len = fs::metadata(&weights).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let out_dir = tmp.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    fails_with(
        &[
            "compile",
            model.to_str().unwrap(),
            "-o",
            out_dir.join("bundle").to_str().unwrap(),
        ],
        &["model.safetensors", "truncated"],
    );
    assert!(
        leftovers(&out_dir).is_empty(),
        "left behind: {:?}",
        leftovers(&out_dir)
    );
}

#[test]
fn existing_bundle_needs_force() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    compile_maverick(&bundle);
    let manifest = fs::read_to_string(bundle.join("manifest.json")).unwrap();
    fails_with(
        &[
            "compile",
            fixture("tiny-maverick").to_str().unwrap(),
            "-o",
            bundle.to_str().unwrap(),
        ],
        &["already exists", "--force"],
    );
    assert_eq!(
        fs::read_to_string(bundle.join("manifest.json")).unwrap(),
        manifest
    );
    let out = herd(&[
        "compile",
        fixture("tiny-scout").to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--force",
        "--max-context",
        "64",
    ]);
    assert!(out.status.success());
    assert!(fs::read_to_string(bundle.join("manifest.json"))
        .unwrap()
        .contains("Llama4ForConditionalGeneration"));
    assert_eq!(leftovers(tmp.path()), vec!["bundle".to_string()]);
}

#[test]
fn manifest_lists_every_file_with_checksums() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    compile_maverick(&bundle);
    let manifest: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(bundle.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["format_version"],
        herd_runtime::manifest::FORMAT_VERSION
    );
    assert_eq!(manifest["moe_lowering"], "ort");
    assert_eq!(manifest["graph"]["kv"].as_array().unwrap().len(), 4);
    let files: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        vec![
            "chat_template.jinja",
            "model.onnx",
            "model.onnx.data",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    for f in manifest["files"].as_array().unwrap() {
        let bytes = fs::read(bundle.join(f["path"].as_str().unwrap())).unwrap();
        assert_eq!(f["bytes"].as_u64().unwrap(), bytes.len() as u64);
        let digest = herd_targets_sha(&bytes);
        assert_eq!(f["sha256"].as_str().unwrap(), digest);
    }
}

fn herd_targets_sha(bytes: &[u8]) -> String {
    use std::fmt::Write;
    // Independent of herd's code: sha256 via the system tool.
    let tmp = tempfile::NamedTempFile::new().unwrap();
    fs::write(tmp.path(), bytes).unwrap();
    let out = Command::new("sha256sum")
        .arg(tmp.path())
        .output()
        .expect("sha256sum");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut s = String::new();
    write!(s, "{}", text.split_whitespace().next().unwrap()).unwrap();
    s
}

#[test]
fn tampered_bundles_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    compile_maverick(&bundle);
    let run = |b: &Path| {
        herd(&[
            "run",
            b.to_str().unwrap(),
            "--input-ids",
            "1,2,3",
            "--max-new-tokens",
            "2",
        ])
    };
    assert!(run(&bundle).status.success());

    // A flipped byte in the graph.
    let model = bundle.join("model.onnx");
    let mut bytes = fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&model, &bytes).unwrap();
    fails_with(
        &["run", bundle.to_str().unwrap(), "--input-ids", "1"],
        &["model.onnx", "sha256 differs", "recompile"],
    );
    bytes[last] ^= 0xff;
    fs::write(&model, &bytes).unwrap();

    // Truncated weights.
    let data = bundle.join("model.onnx.data");
    let len = fs::metadata(&data).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    fails_with(
        &["run", bundle.to_str().unwrap(), "--input-ids", "1"],
        &["model.onnx.data", "manifest says"],
    );
    fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(len)
        .unwrap();

    // A manifest from another format version, and a manifest entry escaping the bundle.
    let manifest_path = bundle.join("manifest.json");
    let original = fs::read_to_string(&manifest_path).unwrap();
    fs::write(
        &manifest_path,
        original.replace(
            &format!(
                "\"format_version\": {}",
                herd_runtime::manifest::FORMAT_VERSION
            ),
            "\"format_version\": 99",
        ),
    )
    .unwrap();
    fails_with(
        &["run", bundle.to_str().unwrap(), "--input-ids", "1"],
        &["format 99 is not supported"],
    );
    fs::write(
        &manifest_path,
        original.replace("\"path\": \"model.onnx\"", "\"path\": \"../model.onnx\""),
    )
    .unwrap();
    fails_with(
        &["run", bundle.to_str().unwrap(), "--input-ids", "1"],
        &["not a plain name inside the bundle"],
    );
    fs::write(&manifest_path, "{").unwrap();
    fails_with(
        &["run", bundle.to_str().unwrap(), "--input-ids", "1"],
        &["manifest.json", "not a herd bundle"],
    );
    fails_with(
        &[
            "run",
            tmp.path().join("nothing").to_str().unwrap(),
            "--input-ids",
            "1",
        ],
        &["manifest.json", "not a herd bundle"],
    );
}

#[test]
fn bad_run_parameters_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    compile_maverick(&bundle);
    let b = bundle.to_str().unwrap();
    fails_with(
        &["run", b, "--input-ids", "1,512"],
        &["token id 512 is outside the vocabulary 0..512"],
    );
    fails_with(
        &["run", b, "--input-ids", "1", "--max-new-tokens", "65"],
        &["accepts at most 64", "--max-context"],
    );
    fails_with(
        &["run", b, "--input-ids", "1", "--temperature", "0"],
        &["temperature must be a positive number"],
    );
    fails_with(
        &[
            "run",
            b,
            "--input-ids",
            "1",
            "--temperature",
            "1",
            "--top-p",
            "2",
        ],
        &["top_p must be in (0, 1]"],
    );
    fails_with(&["run", b, "--input-ids", "x"], &["invalid value 'x'"]);
    fails_with(
        &[
            "run",
            b,
            "--input-ids",
            "1",
            "--ort-library",
            "/nonexistent/libonnxruntime.so",
        ],
        &["ONNX Runtime library not found", "install-onnxruntime.sh"],
    );
}

#[test]
fn seeded_sampling_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    compile_maverick(&bundle);
    let sample = |seed: &str| {
        let out = herd(&[
            "run",
            bundle.to_str().unwrap(),
            "--input-ids",
            "4,5,6",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--temperature",
            "1.5",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(sample("7"), sample("7"));
    assert_ne!(
        sample("7"),
        sample("8"),
        "different seeds drew the same 12 tokens"
    );
}

#[test]
fn gpu_paths_fail_with_instructions_on_a_machine_without_a_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("trt");
    let model = fixture("tiny-maverick");
    ok(&[
        "compile",
        model.to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--target",
        "tensorrt-h100",
        "--max-context",
        "64",
    ]);
    let b = bundle.to_str().unwrap();
    // With no nvidia-smi on the PATH (whatever this host has), build-engine stops before anything
    // else, naming what a GPU machine needs.
    let empty = tmp.path().join("empty-path");
    fs::create_dir_all(&empty).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["build-engine", b])
        .env("PATH", &empty)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for part in ["no NVIDIA GPU 0", "H100", "TensorRT 10", "ORT_DYLIB_PATH"] {
        assert!(stderr.contains(part), "`{part}` missing: {stderr}");
    }
    let manifest = std::fs::read_to_string(bundle.join("manifest.json")).unwrap();
    assert!(
        !manifest.contains("\"engine\""),
        "a failed build-engine must not touch the manifest"
    );
    fails_with(
        &["run", b, "--input-ids", "1", "--ep", "tensorrt"],
        &["GPU execution providers", "--features tensorrt"],
    );
    fails_with(
        &["run", b, "--input-ids", "1", "--ep", "cuda"],
        &["GPU execution providers"],
    );
    // The CPU provider runs the same bundle.
    assert!(
        herd(&["run", b, "--input-ids", "1,2", "--max-new-tokens", "2"])
            .status
            .success()
    );
    let onnx = tmp.path().join("onnx");
    compile_maverick(&onnx);
    fails_with(
        &["build-engine", onnx.to_str().unwrap()],
        &["compiled for `onnx`", "--target tensorrt-h100"],
    );
}

#[test]
fn staging_folders_of_killed_compiles_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    // A compile killed mid-way (its process is gone) left its staging folder behind.
    let stale = tmp.path().join(".bundle.herd-partial-4000000000");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.onnx.data"), b"half written").unwrap();
    let unrelated = tmp.path().join(".other.herd-partial-4000000000");
    std::fs::create_dir(&unrelated).unwrap();
    compile_maverick(&tmp.path().join("bundle"));
    assert!(
        !stale.exists(),
        "the abandoned staging folder is still there"
    );
    assert!(
        unrelated.exists(),
        "another bundle's staging folder must be left alone"
    );
}

#[test]
fn manifests_that_disagree_with_the_graph_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    compile_maverick(&bundle);
    let b = bundle.to_str().unwrap();
    let path = bundle.join("manifest.json");
    let original = std::fs::read_to_string(&path).unwrap();
    // A model file outside the checked files.
    std::fs::write(
        &path,
        original.replace(
            "\"model_file\": \"model.onnx\"",
            "\"model_file\": \"other.onnx\"",
        ),
    )
    .unwrap();
    fails_with(
        &["run", b, "--input-ids", "1"],
        &["model file `other.onnx` is not among the bundle's checked files"],
    );
    // A vocabulary size the graph does not produce (the manifest itself is not checksummed).
    std::fs::write(
        &path,
        original.replace("\"vocab_size\": 512", "\"vocab_size\": 4096"),
    )
    .unwrap();
    fails_with(
        &["run", b, "--input-ids", "1"],
        &["manifest says vocab_size 4096"],
    );
}
