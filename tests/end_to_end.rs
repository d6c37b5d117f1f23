//! `herd compile` + `herd run` reproduce transformers: for both fixtures, both MoE lowerings and every
//! golden prompt, the logits of every generated token match within 1e-4 of the logit scale (f32) and
//! the greedy tokens are identical. Also: the compiled ONNX node lists match their snapshots, and f16
//! bundles report their error against the same goldens.

mod common;

use std::path::Path;

use common::{fixture, goldens_file, herd, max_error, ok, FIXTURES, LOGIT_TOLERANCE};
use ndarray::Array2;

/// f16 keeps 11 significant bits (~5e-4 relative per rounding); through 4 layers the logits drift
/// ~1e-3 of their scale (measured: 1.25e-3 on tiny-scout, 8.4e-4 on tiny-maverick). Greedy tokens
/// can flip at near-ties in f16, so only the logits are held. f32 bundles: LOGIT_TOLERANCE.
const F16_TOLERANCE: f32 = 2e-3;

fn compile(name: &str, moe: &str, dtype: &str, dir: &Path) -> String {
    compile_with(name, moe, dtype, &[], dir)
}

fn compile_with(name: &str, moe: &str, dtype: &str, extra: &[&str], dir: &Path) -> String {
    let bundle = dir.join(format!(
        "{name}-{moe}-{dtype}{}",
        extra.join("").replace(':', "-").replace("--", "-")
    ));
    let model = fixture(name);
    let mut args = vec![
        "compile",
        model.to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--moe",
        moe,
        "--dtype",
        dtype,
        "--max-context",
        "64",
        "--node-counts",
    ];
    args.extend_from_slice(extra);
    let out = ok(&args);
    if dtype == "f32" && extra.is_empty() {
        check_node_snapshot(name, moe, &out);
    }
    check_cache_in_place(&bundle);
    bundle.to_str().unwrap().to_string()
}

/// Every cache input is read by exactly one node, a `TensorScatter` that writes the matching cache
/// output itself (no Concat, no copy after it): bound to one buffer, the update is in place. Chunked
/// layers' caches are rings of one chunk (8), full layers' the session's context.
fn check_cache_in_place(bundle: &Path) {
    use onnx_protobuf::type_proto::Value as Type;
    let onnx = <onnx_protobuf::ModelProto as onnx_protobuf::Message>::parse_from_bytes(
        &std::fs::read(bundle.join("model.onnx")).unwrap(),
    )
    .unwrap();
    let graph = &onnx.graph;
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("manifest.json")).unwrap())
            .unwrap();
    let nope: Vec<u64> = manifest["model"]["nope_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_u64().unwrap())
        .collect();
    let mut caches = 0;
    for input in graph.input.iter().filter(|i| i.name.starts_with("past_")) {
        caches += 1;
        let readers: Vec<_> = graph
            .node
            .iter()
            .filter(|n| n.input.contains(&input.name))
            .collect();
        let present = input.name.replace("past_", "present_");
        assert_eq!(
            readers.len(),
            1,
            "{}: read by {} nodes",
            input.name,
            readers.len()
        );
        assert_eq!(readers[0].op_type, "TensorScatter", "{}", input.name);
        assert_eq!(
            readers[0].output,
            std::slice::from_ref(&present),
            "{}",
            input.name
        );
        assert!(graph.output.iter().any(|o| o.name == present));
        let Some(Type::TensorType(t)) = &input.type_.value else {
            panic!("{} is a tensor", input.name);
        };
        let length = &t.shape.dim[2];
        let layer: u64 = input.name.rsplit('.').next().unwrap().parse().unwrap();
        if nope.contains(&layer) {
            assert!(
                !length.has_dim_value(),
                "{}: the context is the session's",
                input.name
            );
        } else {
            assert_eq!(length.dim_value(), 8, "{}: a ring of one chunk", input.name);
        }
    }
    assert_eq!(caches, 8, "two caches per layer");
    assert!(
        !graph.node.iter().any(|n| n.op_type == "Concat"
            && n.input
                .iter()
                .chain(&n.output)
                .any(|t| t.contains("past_") || t.contains("present_"))),
        "no Concat touches the cache"
    );
}

fn check_node_snapshot(name: &str, moe: &str, text: &str) {
    common::check_snapshot(
        &format!("{name}.{moe}.onnx-nodes"),
        text,
        &format!("{name} --moe {moe}: the ONNX node list"),
    );
}

/// Runs the golden prompts through `bundle`; returns the largest error relative to the logit scale.
fn run_goldens(name: &str, bundle: &str, dir: &Path, tolerance: f32, require_tokens: bool) -> f32 {
    run_golden_file(
        name,
        "goldens.safetensors",
        bundle,
        dir,
        tolerance,
        require_tokens,
    )
}

fn run_golden_file(
    name: &str,
    file: &str,
    bundle: &str,
    dir: &Path,
    tolerance: f32,
    require_tokens: bool,
) -> f32 {
    let mut worst = 0.0f32;
    for (n, golden) in goldens_file(name, file) {
        let ids: Vec<String> = golden.input_ids.iter().map(|t| t.to_string()).collect();
        let steps = golden.greedy_ids.len().to_string();
        let npy = dir.join(format!("{name}-{n}.npy"));
        let out = ok(&[
            "run",
            bundle,
            "--input-ids",
            &ids.join(","),
            "--max-new-tokens",
            &steps,
            "--ignore-eos",
            "--greedy",
            "--dump-logits",
            npy.to_str().unwrap(),
            "--json",
            // int8 bundles quantize their activations on the CPU by default; the goldens do not.
            "--exact-activations",
        ]);
        let summary: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
        let tokens: Vec<i64> = summary["output_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert!(
            summary["prefill_ms"].as_f64().is_some()
                && summary["decode_tokens_per_s"].as_f64().is_some()
        );
        let logits: Array2<f32> = ndarray_npy::read_npy(&npy).expect("logits .npy");
        let (err, scale) = max_error(&logits, &golden.step_logits);
        eprintln!(
            "{bundle} prompt {n}: max error {err:.3e} (scale {scale:.3}, relative {:.2e})",
            err / scale
        );
        assert!(
            err <= tolerance * scale,
            "{bundle} prompt {n}: logits differ by {err} (scale {scale})"
        );
        if require_tokens {
            assert_eq!(
                tokens, golden.greedy_ids,
                "{bundle} prompt {n}: greedy tokens differ"
            );
        }
        worst = worst.max(err / scale);
    }
    worst
}

#[test]
fn compiled_bundles_match_transformers() {
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        for moe in ["ort", "cuda", "grouped"] {
            let bundle = compile(name, moe, "f32", dir.path());
            run_goldens(name, &bundle, dir.path(), LOGIT_TOLERANCE, true);
        }
    }
}

#[test]
fn f16_bundles_report_their_error() {
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let bundle = compile(name, "ort", "f16", dir.path());
        let worst = run_goldens(name, &bundle, dir.path(), F16_TOLERANCE, false);
        eprintln!("{name} f16: worst relative logit error {worst:.2e}");
    }
}

/// Quantized bundles compute exactly the fake-quantized model: their logits match transformers run on
/// weights quantized and dequantized with identical rounding (absmax scales, as the fixture script
/// computes them), for every scheme, fixture and lowering.
#[test]
fn quantized_bundles_match_fake_quant_goldens() {
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        for scheme in ["int4:32", "int4:64", "int8:64", "fp8"] {
            for moe in ["ort", "cuda", "grouped"] {
                // The fake-quant goldens quantize the decoder's matrices only: lm_head and the
                // embeddings are float in them (--keep-head; fp8 keeps them anyway).
                let args = ["--quant", scheme, "--scales", "absmax", "--keep-head"];
                let bundle = compile_with(name, moe, "f32", &args, dir.path());
                let file = format!("goldens-{}.safetensors", scheme.replace(':', "-"));
                run_golden_file(name, &file, &bundle, dir.path(), LOGIT_TOLERANCE, true);
            }
        }
    }
}

/// TensorRT-target bundles hold the graph TensorRT (and, for `cuda`, the CUDA EP) would receive: it
/// passes the lint and, built in f32 and run on ONNX Runtime's CPU provider, matches transformers. An
/// ort-lowered bundle does not lint.
#[test]
fn tensorrt_target_bundles_lint_clean_and_match_transformers() {
    let dir = tempfile::tempdir().unwrap();
    for (name, moe) in FIXTURES
        .iter()
        .flat_map(|n| ["cuda", "grouped"].map(|m| (*n, m)))
    {
        let bundle = compile_with(name, moe, "f32", &["--target", "tensorrt-h100"], dir.path());
        let lint = ok(&["lint", &bundle, "--target", "tensorrt"]);
        let manifest: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(Path::new(&bundle).join("manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(manifest["target"], "tensorrt-h100");
        assert_eq!(manifest["tensorrt"]["compute_capability"], "9.0");
        assert!(manifest["tensorrt"]["profile_max_shapes"]
            .as_str()
            .unwrap()
            .contains("past_key.0:1x"));
        let partition = &manifest["tensorrt"]["cuda_partition"];
        let moe_layers = manifest["model"]["config"]["moe_layers"]
            .as_array()
            .unwrap()
            .len();
        if moe == "cuda" {
            // One MoE node per MoE layer, TensorRT subgraphs between and around them.
            assert_eq!(partition["cuda_nodes"], moe_layers, "{name}");
            assert_eq!(partition["tensorrt_subgraphs"], moe_layers + 1, "{name}");
            assert!(lint.contains(&format!("{} node(s) on the CUDA EP", moe_layers)));
        } else {
            assert!(partition.is_null(), "{name}: {partition}");
        }
        run_goldens(name, &bundle, dir.path(), LOGIT_TOLERANCE, true);
    }
    let ort_bundle = compile("tiny-maverick", "ort", "f32", dir.path());
    let out = herd(&["lint", &ort_bundle, "--target", "tensorrt"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("[unsupported-op] node `layers.1.moe.experts`: com.microsoft.MoE"));
}

/// bf16 bundles (TensorRT target) take bf16 inputs and cache; on the CPU, which has no bf16 kernels,
/// the runtime refuses them with the way out instead of feeding f32 tensors.
#[test]
fn bf16_bundles_take_bf16_and_are_refused_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile_with(
        "tiny-maverick",
        "grouped",
        "bf16",
        &["--target", "tensorrt-h100"],
        dir.path(),
    );
    let onnx = <onnx_protobuf::ModelProto as onnx_protobuf::Message>::parse_from_bytes(
        &std::fs::read(Path::new(&bundle).join("model.onnx")).unwrap(),
    )
    .unwrap();
    let past = onnx
        .graph
        .input
        .iter()
        .find(|i| i.name == "past_key.0")
        .expect("a cache input");
    let Some(onnx_protobuf::type_proto::Value::TensorType(t)) = &past.type_.value else {
        panic!("past_key.0 is a tensor");
    };
    assert_eq!(
        t.elem_type,
        onnx_protobuf::tensor_proto::DataType::BFLOAT16 as i32
    );
    common::fails_with(
        &["run", &bundle, "--input-ids", "1,2"],
        &[
            "bf16 bundles run on the GPU providers",
            "--dtype f16 or f32",
        ],
    );
}
