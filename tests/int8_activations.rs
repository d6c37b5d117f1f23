//! `--int8-activations`: ONNX Runtime quantizes int8 MatMul activations on the fly. The mode changes
//! the numbers (it is not silently ignored), its KL cost stays small, and the default is exact.

mod common;

use common::{fixture, ok};

fn kl(args: &[&str]) -> (f64, f64) {
    let v: serde_json::Value = serde_json::from_str(&ok(args)).expect("eval --json");
    (
        v["kl_mean"].as_f64().unwrap(),
        v["top1_agreement"].as_f64().unwrap(),
    )
}

#[test]
fn int8_activations_change_the_numbers_at_a_small_measured_cost() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("int8");
    let model = fixture("tiny-scout");
    let (model, bundle) = (model.to_str().unwrap(), bundle.to_str().unwrap());
    ok(&[
        "compile",
        model,
        "-o",
        bundle,
        "--quant",
        "int8:64",
        // Measured below with lm_head float, as when written.
        "--keep-head",
        "--max-context",
        "64",
    ]);
    let eval = ["eval", bundle, "--against", model, "--json"];
    let (exact, _) = kl(&eval);
    let (fast, top1) = kl(&[&eval[..], &["--int8-activations"]].concat());
    // Measured: exact 4.66e-4, int8 activations 8.74e-4 (top-1 92.3%).
    assert!(
        fast > exact * 1.2,
        "int8 activations had no effect: {fast} vs {exact}"
    );
    assert!(
        fast < 2e-3 && top1 > 0.85,
        "int8 activations cost {fast}, top-1 {top1}"
    );
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_herd"))
        .args([&eval[..], &["--int8-activations", "--store"]].concat())
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "--store with --int8-activations is refused"
    );
}
