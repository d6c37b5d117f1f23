//! Every kind of bad checkpoint gets a one-line error naming the file or tensor, a non-zero exit code and
//! no panic. Each case corrupts a copy of a fixture in a temporary folder and runs the `herd` binary.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{edit_json, fixture, raw_safetensors};
use safetensors::SafeTensors;

/// Runs `herd inspect DIR` and returns stderr, asserting the failure contract.
fn inspect_fails(dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_herd"))
        .arg("inspect")
        .arg(dir)
        .output()
        .expect("run herd");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "herd accepted a bad checkpoint; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "herd panicked: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "error is not one line: {stderr}"
    );
    assert!(
        stderr.starts_with("error: "),
        "unexpected error format: {stderr}"
    );
    stderr
}

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for entry in fs::read_dir(fixture(name)).expect("fixture") {
        let entry = entry.expect("entry");
        fs::copy(entry.path(), tmp.path().join(entry.file_name())).expect("copy");
    }
    tmp
}

/// tiny-maverick (one `model.safetensors`) with its weights replaced by a hand-written file.
fn maverick_with_raw_weights(header: &str, data_len: usize) -> tempfile::TempDir {
    let tmp = copy_fixture("tiny-maverick");
    raw_safetensors(&tmp.path().join("model.safetensors"), header, data_len);
    tmp
}

fn assert_mentions(stderr: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            stderr.contains(part),
            "error does not mention `{part}`: {stderr}"
        );
    }
}

#[test]
fn missing_config() {
    let tmp = copy_fixture("tiny-maverick");
    fs::remove_file(tmp.path().join("config.json")).unwrap();
    assert_mentions(&inspect_fails(tmp.path()), &["config.json", "not found"]);
}

#[test]
fn missing_weights() {
    let tmp = copy_fixture("tiny-maverick");
    fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    assert_mentions(
        &inspect_fails(tmp.path()),
        &["no weights found", "model.safetensors"],
    );
}

#[test]
fn invalid_json() {
    let tmp = copy_fixture("tiny-maverick");
    fs::write(tmp.path().join("config.json"), "{\"hidden_size\": 64,").unwrap();
    assert_mentions(&inspect_fails(tmp.path()), &["config.json", "invalid JSON"]);
}

#[test]
fn missing_required_key() {
    let tmp = copy_fixture("tiny-scout");
    edit_json(&tmp.path().join("config.json"), |v| {
        v["text_config"]
            .as_object_mut()
            .unwrap()
            .remove("num_key_value_heads");
    });
    assert_mentions(
        &inspect_fails(tmp.path()),
        &[
            "config.json",
            "missing required key `text_config.num_key_value_heads`",
        ],
    );
}

#[test]
fn unsupported_architecture() {
    let tmp = copy_fixture("tiny-maverick");
    edit_json(&tmp.path().join("config.json"), |v| {
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"])
    });
    assert_mentions(
        &inspect_fails(tmp.path()),
        &["config.json", "unsupported architecture LlamaForCausalLM"],
    );
}

#[test]
fn truncated_shard() {
    let tmp = copy_fixture("tiny-scout");
    let shard = tmp.path().join("model-00003-of-00005.safetensors");
    let len = fs::metadata(&shard).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_mentions(
        &inspect_fails(tmp.path()),
        &["model-00003-of-00005.safetensors", "truncated"],
    );
}

#[test]
fn header_length_past_end_of_file() {
    let tmp = copy_fixture("tiny-maverick");
    let path = tmp.path().join("model.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    let claimed = bytes.len() as u64 * 4;
    bytes[..8].copy_from_slice(&claimed.to_le_bytes());
    fs::write(&path, bytes).unwrap();
    assert_mentions(
        &inspect_fails(tmp.path()),
        &[
            "model.safetensors",
            "header length",
            "runs past the end of the file",
        ],
    );
}

#[test]
fn tensor_offsets_past_end_of_file() {
    let header = r#"{"a":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[500],"data_offsets":[8,1008]}}"#;
    let tmp = maverick_with_raw_weights(header, 16);
    assert_mentions(
        &inspect_fails(tmp.path()),
        &["model.safetensors", "tensor `b`", "truncated"],
    );
}

#[test]
fn overlapping_tensors() {
    let header = r#"{"a":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[4],"data_offsets":[4,12]}}"#;
    let tmp = maverick_with_raw_weights(header, 12);
    assert_mentions(
        &inspect_fails(tmp.path()),
        &["model.safetensors", "tensor `b`", "overlap"],
    );
}

#[test]
fn dtype_disagrees_with_byte_count() {
    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
    let tmp = maverick_with_raw_weights(header, 8);
    assert_mentions(
        &inspect_fails(tmp.path()),
        &[
            "model.safetensors",
            "tensor `a`",
            "16 bytes",
            "hold 8 bytes",
        ],
    );
}

#[test]
fn index_names_tensor_no_shard_holds() {
    let tmp = copy_fixture("tiny-scout");
    edit_json(&tmp.path().join("model.safetensors.index.json"), |v| {
        v["weight_map"]["language_model.model.layers.9.extra.weight"] =
            "model-00001-of-00005.safetensors".into();
    });
    assert_mentions(
        &inspect_fails(tmp.path()),
        &[
            "model.safetensors.index.json",
            "language_model.model.layers.9.extra.weight",
            "model-00001-of-00005.safetensors",
        ],
    );
}

#[test]
fn index_shard_path_escapes_folder() {
    for evil in [
        "../outside.safetensors",
        "/etc/passwd",
        "sub/../../x.safetensors",
    ] {
        let tmp = copy_fixture("tiny-scout");
        edit_json(&tmp.path().join("model.safetensors.index.json"), |v| {
            v["weight_map"]["language_model.model.norm.weight"] = evil.into();
        });
        assert_mentions(
            &inspect_fails(tmp.path()),
            &[
                "model.safetensors.index.json",
                evil,
                "absolute paths and `..` are refused",
            ],
        );
    }
}

#[test]
fn tensor_with_wrong_shape_for_config() {
    let tmp = copy_fixture("tiny-maverick");
    edit_json(&tmp.path().join("config.json"), |v| {
        v["intermediate_size_mlp"] = 96.into()
    });
    assert_mentions(
        &inspect_fails(tmp.path()),
        &[
            "model.layers.0.feed_forward.gate_proj.weight",
            "[128, 64]",
            "[96, 64]",
            "model.safetensors",
        ],
    );
}

#[test]
fn missing_tensor_names_layer() {
    let tmp = copy_fixture("tiny-maverick");
    let path = tmp.path().join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let dropped = "model.layers.2.self_attn.k_proj.weight";
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != dropped)
        .collect();
    assert_eq!(kept.len() + 1, st.len(), "fixture lacks {dropped}");
    safetensors::serialize_to_file(kept, None, &tmp.path().join("rewritten")).unwrap();
    fs::rename(tmp.path().join("rewritten"), &path).unwrap();
    assert_mentions(
        &inspect_fails(tmp.path()),
        &[
            "missing tensor `model.layers.2.self_attn.k_proj.weight`",
            "layer 2 k projection",
        ],
    );
}

#[test]
fn wrong_cli_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["inspect"])
        .output()
        .expect("run herd");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MODEL"));
    let missing = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["inspect", "/nonexistent/model"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && stderr.contains("/nonexistent/model/config.json"),
        "{stderr}"
    );
}

#[test]
fn vision_config_herd_cannot_compile() {
    let tmp = copy_fixture("tiny-scout");
    edit_json(&tmp.path().join("config.json"), |v| {
        v["vision_config"]["pixel_shuffle_ratio"] = serde_json::json!(0.25);
    });
    assert_mentions(
        &inspect_fails(tmp.path()),
        &["config.json", "vision_config.pixel_shuffle_ratio", "0.5"],
    );
}

#[test]
fn missing_vision_tensor_names_it_and_the_way_out() {
    let tmp = copy_fixture("tiny-scout");
    edit_json(&tmp.path().join("model.safetensors.index.json"), |v| {
        v["weight_map"]
            .as_object_mut()
            .unwrap()
            .remove("vision_model.class_embedding");
    });
    let out_dir = tmp.path().join("bundle");
    let out = Command::new(env!("CARGO_BIN_EXE_herd"))
        .arg("compile")
        .arg(tmp.path())
        .arg("-o")
        .arg(&out_dir)
        .output()
        .expect("run herd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert_mentions(
        &stderr,
        &[
            "missing tensor `vision_model.class_embedding`",
            "--text-only",
        ],
    );
    assert!(
        !out_dir.exists(),
        "a failed compile left {}",
        out_dir.display()
    );
    // --text-only compiles the decoder alone.
    let out = Command::new(env!("CARGO_BIN_EXE_herd"))
        .arg("compile")
        .arg(tmp.path())
        .arg("-o")
        .arg(&out_dir)
        .arg("--text-only")
        .output()
        .expect("run herd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
