//! A pre-quantized FP8 checkpoint (the compressed-tensors layout of Llama-4-Maverick-FP8) compiles to a
//! bundle that matches its transformers golden, and keeps the checkpoint's FP8 expert weights as they
//! are: the bundle's float8 initializers hold exactly the checkpoint's float8 codes, each in the
//! place its layout gives it (a permuted expert fails).

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::{fixture, goldens, max_error, ok, LOGIT_TOLERANCE};
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::{Message, ModelProto};

const FIXTURE: &str = "tiny-maverick-fp8";

/// The checkpoint's fp8 expert matrices: (layer, expert, "gate" | "up" | "down") -> [rows, cols] codes.
type Experts = BTreeMap<(usize, usize, String), ndarray::Array2<u8>>;

fn checkpoint_experts() -> Experts {
    let bytes = std::fs::read(fixture(FIXTURE).join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = Experts::new();
    for (name, t) in st.tensors() {
        if t.dtype() != safetensors::Dtype::F8_E4M3 {
            continue;
        }
        // model.layers.L.feed_forward.experts.E.{gate,up,down}_proj.weight
        let parts: Vec<&str> = name.split('.').collect();
        let (layer, expert) = (parts[2].parse().unwrap(), parts[5].parse().unwrap());
        let which = parts[6].trim_end_matches("_proj").to_string();
        let shape = (t.shape()[0], t.shape()[1]);
        out.insert(
            (layer, expert, which),
            ndarray::Array2::from_shape_vec(shape, t.data().to_vec()).unwrap(),
        );
    }
    out
}

/// The layers whose experts the checkpoint stores in fp8.
fn fp8_layers(experts: &Experts) -> Vec<usize> {
    let mut layers: Vec<usize> = experts.keys().map(|k| k.0).collect();
    layers.dedup();
    layers
}

/// What each fp8 initializer of a bundle must hold, in order, given the layout its name says:
/// `fc1.q` / `fc2.q` (the stacked experts, interleaved gate/up rows: `--moe ort`) or
/// `fc1.expertE.q` / `fc2.expertE.q` (one expert as a [K, N] MatMul operand: grouped, with gate
/// and up columns in halves or, under `--moe cuda`, interleaved).
fn expected_bytes(name: &str, experts: &Experts, interleaved: bool) -> Vec<u8> {
    let layer: usize = name.split('.').nth(1).unwrap().parse().unwrap();
    let get = |e: usize, which: &str| experts[&(layer, e, which.to_string())].clone();
    let count = experts
        .keys()
        .filter(|k| k.0 == layer && k.2 == "down")
        .count();
    // gate/up of expert e as the rows of one [2I, H] matrix, interleaved or in halves.
    let fc1_rows = |e: usize, interleaved: bool| {
        let (gate, up) = (get(e, "gate"), get(e, "up"));
        let i = gate.nrows();
        let mut rows = ndarray::Array2::<u8>::zeros((2 * i, gate.ncols()));
        for j in 0..i {
            let (g, u) = if interleaved {
                (2 * j, 2 * j + 1)
            } else {
                (j, i + j)
            };
            rows.row_mut(g).assign(&gate.row(j));
            rows.row_mut(u).assign(&up.row(j));
        }
        rows
    };
    let flat = |a: ndarray::Array2<u8>| a.as_standard_layout().iter().copied().collect::<Vec<u8>>();
    match name.split('.').skip(3).collect::<Vec<_>>().as_slice() {
        ["fc1", "q"] => (0..count).flat_map(|e| flat(fc1_rows(e, true))).collect(),
        ["fc2", "q"] => (0..count).flat_map(|e| flat(get(e, "down"))).collect(),
        ["fc1", expert, "q"] => {
            let e = expert.trim_start_matches("expert").parse().unwrap();
            flat(fc1_rows(e, interleaved).reversed_axes())
        }
        ["fc2", expert, "q"] => {
            let e = expert.trim_start_matches("expert").parse().unwrap();
            flat(get(e, "down").reversed_axes())
        }
        other => panic!("unexpected fp8 initializer `{name}` ({other:?})"),
    }
}

/// Checks every fp8 initializer of `bundle` against the checkpoint's codes in order, and that no
/// expert weight was written in float. Returns the layers that hold fp8 experts.
fn check_fp8_bytes(bundle: &std::path::Path, interleaved: bool, what: &str) -> Vec<usize> {
    let experts = checkpoint_experts();
    let model =
        ModelProto::parse_from_bytes(&std::fs::read(bundle.join("model.onnx")).unwrap()).unwrap();
    let data = std::fs::read(bundle.join("model.onnx.data")).unwrap();
    let mut layers = Vec::new();
    for t in &model.graph.initializer {
        let is_expert = (t.name.contains(".moe.fc1") || t.name.contains(".moe.fc2"))
            && !t.name.ends_with(".scales");
        if t.data_type == DataType::FLOAT8E4M3FN as i32 {
            let field = |k: &str| {
                t.external_data
                    .iter()
                    .find(|e| e.key == k)
                    .map(|e| e.value.parse::<usize>().unwrap())
                    .unwrap()
            };
            let (offset, length) = (field("offset"), field("length"));
            assert!(
                data[offset..offset + length] == expected_bytes(&t.name, &experts, interleaved)[..],
                "{what}: `{}` does not hold the checkpoint's fp8 codes in order",
                t.name
            );
            layers.push(t.name.split('.').nth(1).unwrap().parse::<usize>().unwrap());
        } else {
            assert!(
                !(is_expert && t.data_type == DataType::FLOAT as i32),
                "{what}: expert weight `{}` was written in float",
                t.name
            );
        }
    }
    layers.sort_unstable();
    layers.dedup();
    assert_eq!(
        layers,
        fp8_layers(&experts),
        "{what}: fp8 experts of every MoE layer"
    );
    layers
}

#[test]
fn prequantized_fp8_matches_golden_and_keeps_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        fp8_layers(&checkpoint_experts()),
        vec![1, 3],
        "fixture: routed experts of layers 1 and 3 are fp8"
    );
    let cases = [
        ("onnx", "ort"),
        ("onnx", "cuda"),
        ("onnx", "grouped"),
        ("tensorrt-h100", "cuda"),
        ("tensorrt-h100", "grouped"),
    ];
    for (target, moe) in cases {
        let bundle = dir.path().join(format!("{target}-{moe}"));
        ok(&[
            "compile",
            fixture(FIXTURE).to_str().unwrap(),
            "-o",
            bundle.to_str().unwrap(),
            "--target",
            target,
            "--moe",
            moe,
            "--dtype",
            "f32",
            "--max-context",
            "64",
        ]);
        if target == "tensorrt-h100" {
            ok(&["lint", bundle.to_str().unwrap(), "--target", "tensorrt"]);
        }
        check_fp8_bytes(&bundle, moe == "cuda", &format!("{target}/{moe}"));
        let moe = format!("{target}/{moe}");

        for (n, golden) in goldens(FIXTURE) {
            let ids: Vec<String> = golden.input_ids.iter().map(|t| t.to_string()).collect();
            let npy = bundle.join(format!("logits-{n}.npy"));
            let steps = golden.greedy_ids.len().to_string();
            let out = ok(&[
                "run",
                bundle.to_str().unwrap(),
                "--input-ids",
                &ids.join(","),
                "--max-new-tokens",
                &steps,
                "--ignore-eos",
                "--dump-logits",
                npy.to_str().unwrap(),
                "--json",
            ]);
            let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
            let tokens: Vec<i64> = summary["output_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let logits: ndarray::Array2<f32> = ndarray_npy::read_npy(&npy).unwrap();
            let (err, scale) = max_error(&logits, &golden.step_logits);
            assert!(
                err <= LOGIT_TOLERANCE * scale,
                "--moe {moe} prompt {n}: logits differ by {err} (scale {scale})"
            );
            assert_eq!(tokens, golden.greedy_ids, "--moe {moe} prompt {n}");
        }
    }
}

#[test]
fn quantizing_a_prequantized_checkpoint_keeps_its_fp8_experts() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("int8");
    ok(&[
        "compile",
        fixture(FIXTURE).to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--quant",
        "int8",
        "--max-context",
        "64",
    ]);
    check_fp8_bytes(&bundle, true, "--quant int8");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("manifest.json")).unwrap())
            .unwrap();
    let sqnr = manifest["quantization"]["sqnr_db"].as_object().unwrap();
    assert!(
        sqnr.keys().any(|k| k.contains("attn")),
        "int8 applies to the bf16 weights: {:?}",
        sqnr.keys()
    );
}

/// fp8 for TensorRT: weights per channel and calibrated per-tensor activation Q/DQ in front of every fp8
/// projection; the graph passes the TensorRT lint and runs on ONNX Runtime's CPU provider.
#[test]
fn fp8_for_tensorrt_quantizes_activations_per_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("calibration.txt");
    std::fs::write(
        &prompts,
        "# two prompts\n1,2,3,4,5,6,7,8\n\n40, 41, 42, 300, 301\n",
    )
    .unwrap();
    let bundle = dir.path().join("trt-fp8");
    let model = fixture("tiny-scout");
    ok(&[
        "compile",
        model.to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--target",
        "tensorrt-h100",
        "--dtype",
        "f32",
        "--quant",
        "fp8",
        "--calibrate",
        prompts.to_str().unwrap(),
        "--max-context",
        "64",
    ]);
    ok(&["lint", bundle.to_str().unwrap(), "--target", "tensorrt"]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("manifest.json")).unwrap())
            .unwrap();
    let activations = manifest["quantization"]["activations"].as_str().unwrap();
    assert!(
        activations.contains("inputs of 8 projections") && activations.contains("on 2 prompts"),
        "{activations}"
    );

    let onnx =
        ModelProto::parse_from_bytes(&std::fs::read(bundle.join("model.onnx")).unwrap()).unwrap();
    let graph = onnx.graph.get_or_default();
    let quantize: Vec<_> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "QuantizeLinear")
        .collect();
    // q/k/v (fused) and o of each of the 4 layers; experts are weight-only fp8.
    assert_eq!(quantize.len(), 8);
    let fp8_experts = graph
        .initializer
        .iter()
        .filter(|t| {
            t.name.contains(".moe.fc1.expert") && t.data_type == DataType::FLOAT8E4M3FN as i32
        })
        .count();
    assert_eq!(
        fp8_experts,
        4 * 4,
        "every expert of the 4 MoE layers is stored fp8"
    );
    for q in quantize {
        let scale = graph
            .initializer
            .iter()
            .find(|t| t.name == q.input[1])
            .expect("scale initializer");
        assert_eq!(
            scale.dims.iter().product::<i64>(),
            1,
            "{}: per-tensor scale",
            q.name
        );
        let value = f32::from_le_bytes(scale.raw_data[..4].try_into().unwrap());
        assert!(value > 0.0 && value.is_finite());
    }
    let out = ok(&[
        "run",
        bundle.to_str().unwrap(),
        "--input-ids",
        "5,6,7",
        "--max-new-tokens",
        "3",
        "--json",
    ]);
    let run: serde_json::Value = serde_json::from_str(&out).expect("run --json");
    let ids = run["output_ids"].as_array().expect("output_ids");
    assert_eq!(ids.len(), 3, "{out}");
    assert!(
        ids.iter().all(|t| t.as_u64().is_some_and(|t| t < 512)),
        "{out}"
    );
    // The numbers against the float checkpoint (herd eval's 11 prompts, 235 positions): measured
    // KL mean 4.8e-3 (max 7.1e-2), top-1 77% with fp8 activations and weights on this fixture;
    // wrong activation scales or codes take the KL up by orders of magnitude.
    let eval = ok(&[
        "eval",
        bundle.to_str().unwrap(),
        "--against",
        model.to_str().unwrap(),
        "--json",
    ]);
    let accuracy: serde_json::Value = serde_json::from_str(&eval).expect("eval --json");
    let kl = accuracy["kl_mean"].as_f64().unwrap();
    let top1 = accuracy["top1_agreement"].as_f64().unwrap();
    assert!(kl > 0.0 && kl < 1e-2, "fp8 KL mean {kl}: {eval}");
    assert!(top1 > 0.7, "fp8 top-1 agreement {top1}: {eval}");

    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "1,2,3\n4,x,6\n").unwrap();
    let failed = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args([
            "compile",
            model.to_str().unwrap(),
            "-o",
            dir.path().join("never").to_str().unwrap(),
            "--target",
            "tensorrt-h100",
            "--quant",
            "fp8",
            "--calibrate",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        !failed.status.success() && stderr.contains("bad.txt line 2"),
        "{stderr}"
    );
}
