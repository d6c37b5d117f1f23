//! `herd bench --compile MODEL`: the compile is timed beside a sequential read and a plain copy (with
//! sync) of the same checkpoint files, the baselines a compile at its limit is held to.

mod common;

use common::{fixture, ok};

#[test]
fn compile_bench_reports_the_copy_it_measured() {
    let model = fixture("tiny-scout");
    let report: serde_json::Value = serde_json::from_str(&ok(&[
        "bench",
        "--compile",
        model.to_str().unwrap(),
        "--json",
    ]))
    .expect("one JSON object");
    // The shards the index names (the fixture folder also holds goldens, which are not copied).
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    let shard_bytes: u64 = shards
        .iter()
        .map(|s| std::fs::metadata(model.join(s)).unwrap().len())
        .sum();
    assert_eq!(report["copy_bytes"], shard_bytes, "{report}");
    let (compile, copy, ratio) = (
        report["compile_seconds"].as_f64().unwrap(),
        report["copy_seconds"].as_f64().unwrap(),
        report["compile_over_copy_time"].as_f64().unwrap(),
    );
    assert!(copy > 0.0 && compile > 0.0, "{report}");
    assert!(
        (ratio - compile / copy).abs() <= 1e-9 * ratio.abs().max(1.0),
        "{report}"
    );
}

/// `bench --compile --quant` compiles quantized: well under the f16 compile's bytes (measured 0.51x on
/// tiny-maverick int4:32, whose norms, router and scales stay wide), the scheme named in the report.
#[test]
fn compile_bench_times_a_quantized_compile() {
    let model = fixture("tiny-maverick");
    let bench = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["bench", "--compile", model.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&args)).expect("one JSON object")
    };
    let float = bench(&[]);
    let int4 = bench(&["--quant", "int4:32"]);
    assert_eq!(float["quant"], serde_json::Value::Null, "{float}");
    assert_eq!(int4["quant"], "int4:32", "{int4}");
    let written = |r: &serde_json::Value| r["bytes_written"].as_u64().unwrap();
    assert!(
        written(&int4) * 10 < written(&float) * 6,
        "int4 wrote {} bytes, f16 {}",
        written(&int4),
        written(&float)
    );
    common::fails_with(
        &["bench", "--quant", "int4", model.to_str().unwrap()],
        &["--compile"],
    );
}
