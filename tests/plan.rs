//! `herd plan`: the published Scout and Maverick configs give the deployment facts that follow from
//! their architecture, and a compiled bundle's figures (read from its initializers) equal the
//! config-only ones.

mod common;

use common::{fixture, ok};

fn plan(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["plan"];
    all.extend_from_slice(args);
    all.push("--json");
    serde_json::from_str(&ok(&all)).expect("plan --json prints JSON")
}

fn published(name: &str) -> String {
    fixture("configs").join(name).display().to_string()
}

#[test]
fn published_configs_fit_as_their_architecture_says() {
    let scout = published("llama4-scout");
    let int4 = plan(&[&scout, "--quant", "int4:64", "--context", "131072"]);
    assert_eq!(
        int4["fits"], true,
        "Scout int4 fits one H100 at 128k: {int4}"
    );
    assert_eq!(int4["gpus_needed"], 1);
    assert!(int4["max_context"].as_u64().unwrap() >= 131_072);
    // 16 experts x 48 layers x 3 matrices of 5120 x 8192, at 4 bits plus one f16 scale per 64 values.
    let experts = 16u64 * 48 * 3 * 5120 * 8192;
    assert_eq!(
        int4["weight_bytes_by_part"]["experts"],
        experts / 2 + experts / 64 * 2
    );
    // KV by the iRoPE bound: 12 NoPE layers keep the context, 36 chunked layers one 8192 chunk.
    assert_eq!(
        int4["kv_bytes"],
        (12 * 131_072 + 36 * 8192) * 2 * 8 * 128 * 2u64
    );
    let decode = &int4["decode"];
    assert!(decode["bytes_per_step"].as_u64().unwrap() > int4["kv_bytes"].as_u64().unwrap());
    assert!(decode["roofline_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(int4["prefill"]["flops_per_token"].as_f64().unwrap() > 2.0 * 17e9);

    let fp8 = plan(&[&scout, "--quant", "fp8", "--context", "131072"]);
    assert_eq!(
        fp8["fits"], false,
        "Scout fp8 needs more than one H100: {fp8}"
    );
    assert_eq!(fp8["gpus_needed"], 2);
    assert_eq!(fp8["max_context"], 0);
    let h200 = plan(&[&scout, "--quant", "fp8", "--gpu", "h200-141gb"]);
    assert_eq!(h200["fits"], true, "Scout fp8 fits one H200: {h200}");

    for (name, quant) in [("llama4-maverick", "int4:64"), ("llama4-maverick-fp8", "")] {
        let mut args = vec![published(name)];
        if !quant.is_empty() {
            args.extend(["--quant".to_string(), quant.to_string()]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let one = plan(&refs);
        let needed = one["gpus_needed"].as_u64().unwrap();
        assert!(
            needed >= 3,
            "{name}: Maverick needs several H100s, got {needed}"
        );
        let mut node = refs.clone();
        node.extend(["--gpus", "8"]);
        assert_eq!(plan(&node)["fits"], true, "{name} fits 8 H100s");
    }
    // The FP8 checkpoint's experts are fp8 (1 byte + an f32 scale per channel): ~2x the int4 experts.
    let fp8_maverick = plan(&[&published("llama4-maverick-fp8")]);
    let experts = 128u64 * 24 * 3 * 5120 * 8192;
    assert_eq!(
        fp8_maverick["weight_bytes_by_part"]["experts"],
        experts + 128 * 24 * (2 * 8192 + 5120) * 4
    );
}

/// (first, end) layers of each stage of a plan.
fn stage_ranges(plan: &serde_json::Value) -> Vec<(u64, u64)> {
    plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["first_layer"].as_u64().unwrap(),
                s["end_layer"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn gpus_split_the_layers_into_stages_that_each_fit() {
    for (name, quant) in [("llama4-maverick", "int4:64"), ("llama4-maverick-fp8", "")] {
        let mut args = vec![published(name), "--gpus".into(), "8".into()];
        if !quant.is_empty() {
            args.extend(["--quant".to_string(), quant.to_string()]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = plan(&refs);
        let stages = p["stages"].as_array().unwrap();
        assert_eq!(stages.len(), 8, "{name}");
        // Contiguous, covering Maverick's 48 layers, every stage within one H100.
        let ranges = stage_ranges(&p);
        assert_eq!(ranges[0].0, 0);
        assert_eq!(ranges[7].1, 48);
        assert!(ranges.windows(2).all(|w| w[0].1 == w[1].0), "{ranges:?}");
        assert!(stages.iter().all(|s| s["fits"] == true), "{name}: {p}");
        let sum = |key: &str| stages.iter().map(|s| s[key].as_u64().unwrap()).sum::<u64>();
        assert_eq!(sum("weight_bytes"), p["weight_bytes"].as_u64().unwrap());
        assert_eq!(sum("kv_bytes"), p["kv_bytes"].as_u64().unwrap());
        // Balanced: no stage holds much more than its share of weights + KV.
        let share = (sum("weight_bytes") + sum("kv_bytes")) / 8;
        let largest = stages
            .iter()
            .map(|s| s["weight_bytes"].as_u64().unwrap() + s["kv_bytes"].as_u64().unwrap())
            .max()
            .unwrap();
        assert!(
            largest <= share + share / 4,
            "{name}: largest stage {largest}, share {share}"
        );
    }
    // Maverick fp8 (~400 GB) does not fit 4 H100s, stage by stage.
    let four = plan(&[&published("llama4-maverick-fp8"), "--gpus", "4"]);
    assert_eq!(four["fits"], false);
    assert!(four["stages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["fits"] == false));
    // Scout at 1M tokens: the 12 NoPE layers' KV (about 50 GB in f16) spreads over the stages.
    let scout = plan(&[
        &published("llama4-scout"),
        "--quant",
        "int4:64",
        "--context",
        "1048576",
        "--gpus",
        "4",
    ]);
    assert_eq!(scout["fits"], true, "{scout}");
    let kv: Vec<u64> = scout["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kv_bytes"].as_u64().unwrap())
        .collect();
    assert!(kv.iter().all(|&b| b > 0), "{kv:?}");
}

#[test]
fn compile_stages_split_as_plan_gpus_says() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("staged");
    for (fixture_name, n) in [("tiny-scout", "2"), ("tiny-maverick", "3")] {
        ok(&[
            "compile",
            fixture(fixture_name).to_str().unwrap(),
            "-o",
            bundle.to_str().unwrap(),
            "--dtype",
            "f16",
            "--max-context",
            "4096",
            "--stages",
            n,
            "--force",
        ]);
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(bundle.join("manifest.json")).unwrap())
                .unwrap();
        let compiled: Vec<(u64, u64)> = manifest["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["first_layer"].as_u64().unwrap(),
                    s["end_layer"].as_u64().unwrap(),
                )
            })
            .collect();
        let model = fixture(fixture_name).display().to_string();
        let planned = plan(&[&model, "--dtype", "f16", "--context", "4096", "--gpus", n]);
        assert_eq!(compiled, stage_ranges(&planned), "{fixture_name}");
        // The staged bundle's own plan reads its stage files: the same split.
        let from_bundle = plan(&[bundle.to_str().unwrap(), "--context", "4096", "--gpus", n]);
        assert_eq!(stage_ranges(&from_bundle), stage_ranges(&planned));
        assert_eq!(from_bundle["weight_bytes"], planned["weight_bytes"]);
    }
}

#[test]
fn bundle_figures_equal_the_config_figures() {
    let dir = tempfile::tempdir().unwrap();
    // tiny-scout carries a vision tower: its vision.onnx is counted as the `vision` part.
    // The flags after the fixture go to both commands: lm_head and the table are quantized by
    // default, kept by --keep-head, and on tensorrt-h100 only lm_head is quantized.
    let cases: [(&str, &[&str], &str); 7] = [
        ("tiny-maverick", &["--quant", "int4:64"], "grouped"),
        (
            "tiny-maverick",
            &["--quant", "int4:64", "--keep-head"],
            "ort",
        ),
        (
            "tiny-scout",
            &["--quant", "int4:64", "--target", "tensorrt-h100"],
            "cuda",
        ),
        ("tiny-maverick", &["--quant", "int8:32"], "cuda"),
        ("tiny-scout", &["--quant", "fp8"], "ort"),
        ("tiny-scout", &["--quant", "int4:32"], "grouped"),
        ("tiny-maverick-fp8", &[], "grouped"),
    ];
    for (n, (name, quant, moe)) in cases.into_iter().enumerate() {
        let bundle = dir.path().join(format!("b{n}"));
        let model = fixture(name).display().to_string();
        let mut args = vec![
            "compile",
            &model,
            "-o",
            bundle.to_str().unwrap(),
            "--moe",
            moe,
            "--max-context",
            "64",
            "--dtype",
            "f32",
        ];
        args.extend_from_slice(quant);
        ok(&args);
        let from_bundle = plan(&[
            bundle.to_str().unwrap(),
            "--context",
            "64",
            "--max-seq",
            "16",
        ]);
        let mut config_args = vec![model.as_str(), "--dtype", "f32", "--context", "64"];
        config_args.extend_from_slice(quant);
        config_args.extend(["--max-seq", "16"]);
        let from_config = plan(&config_args);
        for key in [
            "weight_bytes_by_part",
            "weight_bytes",
            "kv_bytes",
            "activation_peak_bytes",
            "gpus_needed",
            "max_context",
            "decode",
            "prefill",
            "stages",
        ] {
            assert_eq!(
                from_bundle[key], from_config[key],
                "{name} {quant:?} --moe {moe}: `{key}` differs between bundle and config"
            );
        }
        // Every initializer is counted: the data file holds them plus page-alignment padding.
        let data = std::fs::metadata(bundle.join("model.onnx.data"))
            .unwrap()
            .len();
        let counted = from_bundle["weight_bytes"].as_u64().unwrap()
            - from_bundle["weight_bytes_by_part"]["vision"]
                .as_u64()
                .unwrap();
        let onnx = std::fs::read(bundle.join("model.onnx")).unwrap();
        let initializers =
            <onnx_protobuf::ModelProto as onnx_protobuf::Message>::parse_from_bytes(&onnx)
                .unwrap()
                .graph
                .initializer
                .len() as u64;
        assert!(
            counted <= data && data < counted + 4096 * initializers,
            "{name}: {counted} bytes counted of a {data}-byte data file"
        );
    }
}

#[test]
fn plan_refuses_bad_arguments() {
    let scout = published("llama4-scout");
    common::fails_with(
        &["plan", &scout, "--gpu", "a100"],
        &["--gpu a100", "h100-80gb"],
    );
    common::fails_with(&["plan", &scout, "--context", "0"], &["--context 0"]);
    common::fails_with(&["plan", &scout, "--quant", "int3"], &["--quant", "int3"]);
    common::fails_with(&["plan", "/nonexistent"], &["config.json"]);
    // The largest arguments accepted do not overflow: they do not fit.
    let huge = plan(&[
        &scout,
        "--batch",
        "4096",
        "--max-seq",
        "10485760",
        "--context",
        "10485760",
    ]);
    assert_eq!(huge["fits"], false);
}
