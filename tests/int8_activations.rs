//! `--int8-activations`: ONNX Runtime quantizes int8 MatMul activations on the fly. The mode changes
//! the numbers (it is not silently ignored), its KL cost stays small; it is the CPU's default for int8
//! bundles only, `--exact-activations` turns it off, and `herd eval` measures the exact mode.

mod common;

use common::{fixture, ok};

/// The logits `herd run` dumps for one prompt with `extra` flags.
fn run_logits(bundle: &str, dir: &std::path::Path, tag: &str, extra: &[&str]) -> Vec<u8> {
    let npy = dir.join(format!("{tag}.npy"));
    let mut args = vec![
        "run",
        bundle,
        "--input-ids",
        "1,5,9,200,31,7",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
        "--greedy",
        "--dump-logits",
        npy.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ok(&args);
    std::fs::read(npy).unwrap()
}

/// Whether `herd bench` ran `bundle` with int8 activations.
fn bench_int8_activations(bundle: &str, extra: &[&str]) -> bool {
    let mut args = vec!["bench", bundle, "--decode-steps", "1", "--json"];
    args.extend_from_slice(extra);
    let v: serde_json::Value = serde_json::from_str(&ok(&args)).expect("bench --json");
    v["int8_activations"].as_bool().expect("int8_activations")
}

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
    // On the CPU an int8 bundle runs with int8 activations unless told otherwise.
    let default = run_logits(bundle, dir.path(), "default", &[]);
    let fast = run_logits(bundle, dir.path(), "fast", &["--int8-activations"]);
    let exact = run_logits(bundle, dir.path(), "exact", &["--exact-activations"]);
    assert_eq!(
        default, fast,
        "int8 bundles default to int8 activations on the CPU"
    );
    assert_ne!(default, exact, "--exact-activations changes the numbers");
    assert!(bench_int8_activations(bundle, &[]));
    assert!(!bench_int8_activations(bundle, &["--exact-activations"]));
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_herd"))
        .args([&eval[..], &["--int8-activations", "--store"]].concat())
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "--store with --int8-activations is refused"
    );
}

/// int4 bundles keep exact activations unless asked (their exact kernels are fast).
#[test]
fn int4_bundles_default_to_exact_activations() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("int4");
    let bundle = bundle.to_str().unwrap();
    let model = fixture("tiny-maverick");
    ok(&[
        "compile",
        model.to_str().unwrap(),
        "-o",
        bundle,
        "--quant",
        "int4:32",
        "--max-context",
        "64",
    ]);
    assert!(!bench_int8_activations(bundle, &[]));
    assert!(bench_int8_activations(bundle, &["--int8-activations"]));
    let default = run_logits(bundle, dir.path(), "default", &[]);
    let exact = run_logits(bundle, dir.path(), "exact", &["--exact-activations"]);
    assert_eq!(default, exact);
}
