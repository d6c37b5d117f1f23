//! Helpers shared by the end-to-end tests: fixture paths and the transformers goldens.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use ndarray::{Array1, Array2};
use safetensors::SafeTensors;

/// The fixtures the goldens were generated for.
pub const FIXTURES: [&str; 2] = ["tiny-scout", "tiny-maverick"];

/// Greedy generation of exactly `n` tokens (no stop ids), returning the logits.
pub fn greedy(n: usize) -> herd_runtime::GenerateParams {
    herd_runtime::GenerateParams {
        max_new_tokens: n,
        sampling: herd_runtime::Sampling::Greedy,
        stop_ids: Some(vec![]),
        stop_strings: vec![],
        return_logits: true,
    }
}

/// Path of a fixture checkpoint folder.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// transformers' outputs for one prompt.
pub struct Golden {
    pub input_ids: Vec<i64>,
    /// Full-sequence fp32 logits of the prompt, [n, vocab].
    pub logits: Array2<f32>,
    pub greedy_ids: Vec<i64>,
    /// Row i: the logits that produced greedy_ids[i].
    pub step_logits: Array2<f32>,
}

fn f32_matrix(st: &SafeTensors, name: &str) -> Array2<f32> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("golden {name}: {e}"));
    let values: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Array2::from_shape_vec((t.shape()[0], t.shape()[1]), values).expect("golden shape")
}

fn i64_vec(st: &SafeTensors, name: &str) -> Vec<i64> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("golden {name}: {e}"));
    t.data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// All goldens of a fixture, keyed by prompt length.
pub fn goldens(name: &str) -> Vec<(usize, Golden)> {
    goldens_file(name, "goldens.safetensors")
}

/// The goldens of `file` in a fixture (e.g. `goldens-int4-32.safetensors`), keyed by prompt length.
pub fn goldens_file(name: &str, file: &str) -> Vec<(usize, Golden)> {
    let bytes =
        std::fs::read(fixture(name).join(file)).unwrap_or_else(|e| panic!("{name}/{file}: {e}"));
    let st = SafeTensors::deserialize(&bytes).expect("goldens parse");
    let mut lengths: Vec<usize> = st
        .names()
        .iter()
        .filter_map(|n| {
            n.strip_prefix("prompt")?
                .strip_suffix(".input_ids")?
                .parse()
                .ok()
        })
        .collect();
    lengths.sort_unstable();
    assert!(!lengths.is_empty(), "{name}: no golden prompts");
    lengths
        .into_iter()
        .map(|n| {
            let g = Golden {
                input_ids: i64_vec(&st, &format!("prompt{n}.input_ids")),
                logits: f32_matrix(&st, &format!("prompt{n}.logits")),
                greedy_ids: i64_vec(&st, &format!("prompt{n}.greedy_ids")),
                step_logits: f32_matrix(&st, &format!("prompt{n}.step_logits")),
            };
            (n, g)
        })
        .collect()
}

/// max |a - b| and the logit scale max |b|.
pub fn max_error(ours: &Array2<f32>, theirs: &Array2<f32>) -> (f32, f32) {
    assert_eq!(ours.shape(), theirs.shape(), "logit shapes differ");
    let err = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = theirs.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    (err, scale)
}

/// Relative tolerance against the logit scale that every fp32 comparison uses.
pub const LOGIT_TOLERANCE: f32 = 1e-4;

/// Index of the largest value (first on ties, like torch.argmax): the runtime's greedy rule, which
/// the goldens' greedy tokens check.
pub fn argmax(row: &Array1<f32>) -> i64 {
    herd_runtime::sampling::argmax(&row.to_vec())
}

/// Counts inputs by name for readability in assertions.
pub fn names<T>(map: &HashMap<String, T>) -> Vec<&str> {
    let mut v: Vec<&str> = map.keys().map(String::as_str).collect();
    v.sort_unstable();
    v
}

/// Runs the `herd` binary.
pub fn herd(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(args)
        .output()
        .expect("run herd")
}

/// Runs `herd`, asserts success, returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = herd(args);
    assert!(
        out.status.success(),
        "herd {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs `herd`, asserts it fails without panicking and that stderr mentions every part.
pub fn fails_with(args: &[&str], parts: &[&str]) {
    let out = herd(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "herd {args:?} succeeded");
    assert!(!stderr.contains("panicked"), "herd panicked: {stderr}");
    for part in parts {
        assert!(
            stderr.contains(part),
            "error does not mention `{part}`: {stderr}"
        );
    }
}

/// The committed synthetic images, in the order of the vision goldens.
pub const IMAGES: [&str; 3] = ["wide.png", "small.png", "padded.png"];

/// Path of a file in tests/fixtures/images.
pub fn image(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/images")
        .join(name)
}

/// transformers' processor and vision outputs for one image.
pub struct ImageGolden {
    /// [tiles, 3, T, T]: the processor's tiles (bf16 values stored as f32).
    pub pixel_values: ndarray::ArrayD<f32>,
    /// Tile rows and columns of the canvas.
    pub aspect_ratio: (i64, i64),
    /// [tiles * tokens_per_tile, hidden]: vision model + projector on `pixel_values`.
    pub features: Array2<f32>,
}

/// Preprocessing-only images of the vision goldens (`extra{i}.pixel_values`).
pub const EXTRA_IMAGES: [&str; 2] = ["photo.jpg", "grey_alpha.png"];

/// transformers' tiles and canvas for `EXTRA_IMAGES[i]`.
pub fn extra_image_golden(i: usize) -> (ndarray::ArrayD<f32>, (i64, i64)) {
    let bytes = std::fs::read(fixture("tiny-scout").join("goldens-vision.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(&format!("extra{i}.pixel_values")).unwrap();
    let values: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let ratio = i64_vec(&st, &format!("extra{i}.aspect_ratio"));
    (
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(t.shape()), values).unwrap(),
        (ratio[0], ratio[1]),
    )
}

/// tiny-scout's vision goldens: one entry per image of [`IMAGES`], and the image+text prompt.
pub fn vision_goldens() -> (Vec<ImageGolden>, Golden) {
    let bytes = std::fs::read(fixture("tiny-scout").join("goldens-vision.safetensors"))
        .expect("goldens-vision.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("goldens parse");
    let images = (0..IMAGES.len())
        .map(|i| {
            let t = st.tensor(&format!("image{i}.pixel_values")).unwrap();
            let values: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let ratio = i64_vec(&st, &format!("image{i}.aspect_ratio"));
            ImageGolden {
                pixel_values: ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(t.shape()), values)
                    .unwrap(),
                aspect_ratio: (ratio[0], ratio[1]),
                features: f32_matrix(&st, &format!("image{i}.features")),
            }
        })
        .collect();
    let prompt = Golden {
        input_ids: i64_vec(&st, "prompt.input_ids"),
        logits: f32_matrix(&st, "prompt.logits"),
        greedy_ids: i64_vec(&st, "prompt.greedy_ids"),
        step_logits: f32_matrix(&st, "prompt.step_logits"),
    };
    (images, prompt)
}

/// Rewrites the JSON file at `path` through `edit`.
pub fn edit_json(path: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// A safetensors file with a hand-written header and `data_len` zero bytes of data, for the cases a
/// writer would refuse to produce.
pub fn raw_safetensors(path: &std::path::Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(path, bytes).unwrap();
}

/// `herd synth --preset PRESET extra..` into `dir/ckpt`; returns the checkpoint folder.
pub fn synth(dir: &std::path::Path, preset: &str, extra: &[&str]) -> PathBuf {
    let model = dir.join("ckpt");
    let mut args = vec!["synth", "--preset", preset, "-o", model.to_str().unwrap()];
    args.extend_from_slice(extra);
    ok(&args);
    model
}

/// Compares `text` with the committed snapshot `tests/snapshots/{file}`. With `HERD_BLESS=1` a
/// snapshot that differs is rewritten and the test fails anyway (naming it), so a bless run can never
/// pass unnoticed; rerun without it to check.
pub fn check_snapshot(file: &str, text: &str, what: &str) {
    check_snapshots(&[(file.to_string(), text.to_string(), what.to_string())]);
}

/// [`check_snapshot`] over several (file, text, what): a bless run rewrites every one that differs
/// before it fails, naming them all.
pub fn check_snapshots(snapshots: &[(String, String, String)]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    let bless = std::env::var_os("HERD_BLESS").is_some();
    let mut blessed = Vec::new();
    for (file, text, what) in snapshots {
        let path = dir.join(file);
        let committed = std::fs::read_to_string(&path).ok();
        if bless {
            if committed.as_deref() != Some(text.as_str()) {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, text).unwrap();
                blessed.push(format!("{} ({what})", path.display()));
            }
            continue;
        }
        let expected = committed
            .unwrap_or_else(|| panic!("{} missing: run with HERD_BLESS=1", path.display()));
        if *text != expected {
            let (line, (got, want)) = text
                .lines()
                .chain(std::iter::repeat("<end>"))
                .zip(expected.lines().chain(std::iter::repeat("<end>")))
                .enumerate()
                .find(|(_, (a, b))| a != b)
                .expect("texts differ");
            panic!(
                "{what} differs from {} at line {} (re-bless with HERD_BLESS=1 if intended):\n  now:      {got}\n  snapshot: {want}",
                path.display(),
                line + 1
            );
        }
    }
    assert!(
        blessed.is_empty(),
        "blessed {} snapshot(s), review the diff and rerun without HERD_BLESS:\n{}",
        blessed.len(),
        blessed.join("\n")
    );
}

/// The evaluator's `logits_index` input asking for the logits of all `n` tokens of each of `batch` rows.
#[allow(dead_code)]
pub fn every_logit_row(batch: usize, n: usize) -> (String, herd_ir::eval::Tensor) {
    let index: Vec<i64> = (0..batch).flat_map(|_| 0..n as i64).collect();
    (
        herd_ir::import::LOGITS_INDEX_INPUT.to_string(),
        herd_ir::eval::Tensor::I64(ndarray::ArrayD::from_shape_vec(vec![batch, n], index).unwrap()),
    )
}

/// The operator types of the ONNX model at `path`.
pub fn onnx_op_types(path: &std::path::Path) -> std::collections::BTreeSet<String> {
    use onnx_protobuf::Message;
    let model = onnx_protobuf::ModelProto::parse_from_bytes(&std::fs::read(path).unwrap()).unwrap();
    model.graph.node.iter().map(|n| n.op_type.clone()).collect()
}

/// The text `herd chat --max-new-tokens N` prints for one turn: the greedy reply to the whole
/// conversation so far (with the turns' images, in order), stopped at the bundle's end tokens.
pub fn chat_reply(
    model: &herd_runtime::Model,
    messages: &[herd_runtime::Message],
    images: &[std::path::PathBuf],
    max_new_tokens: usize,
) -> String {
    use herd_runtime::Prompt;
    let chat = Prompt::Chat(messages.to_vec());
    let prompt = if images.is_empty() {
        chat
    } else {
        Prompt::WithImages {
            prompt: Box::new(chat),
            images: images
                .iter()
                .map(|p| herd_runtime::vision::ImageSource::Path(p.clone()))
                .collect(),
        }
    };
    let params = herd_runtime::GenerateParams {
        max_new_tokens,
        sampling: herd_runtime::Sampling::Greedy,
        stop_ids: None,
        stop_strings: vec![],
        return_logits: false,
    };
    model
        .stream(prompt, &params, None)
        .unwrap()
        .map(|event| event.unwrap().text)
        .collect()
}

/// A chat message.
pub fn message(role: &str, content: &str) -> herd_runtime::Message {
    herd_runtime::Message {
        role: role.into(),
        content: content.into(),
    }
}
