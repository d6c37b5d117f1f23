//! MoE lowerings at a real expert width: 8 experts of 8192 (Scout's and Maverick's width) at hidden
//! 1024. A 256-token prompt through the old per-token gather would have needed a [256, 1024, 16384]
//! f32 weight tensor (17 GB) per layer; the `cuda` and `grouped` lowerings of the TensorRT target run it
//! on ONNX Runtime's CPU provider within the mapped weights plus a bounded margin, and match the ONNX
//! target's `ort` bundle.

mod common;

use common::ok;

#[test]
fn real_width_experts_run_a_long_prompt_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth(
        dir.path(),
        "ci-small",
        &["--layers", "1", "--experts", "8", "--intermediate", "8192"],
    );
    let model = model.to_str().unwrap();
    let ids: Vec<String> = (0..256).map(|i| (7 + 13 * i % 4000).to_string()).collect();
    let ids = ids.join(",");
    let mut reference: Option<ndarray::Array2<f32>> = None;
    for (target, moe) in [
        ("onnx", "ort"),
        ("tensorrt-h100", "cuda"),
        ("tensorrt-h100", "grouped"),
    ] {
        let bundle = dir.path().join(format!("{target}-{moe}"));
        let bundle = bundle.to_str().unwrap();
        let mut compile = vec![
            "compile",
            model,
            "-o",
            bundle,
            "--target",
            target,
            "--moe",
            moe,
            "--dtype",
            "f32",
            "--max-context",
            "512",
        ];
        if target != "onnx" {
            compile.extend(["--max-seq", "256"]);
        }
        ok(&compile);
        let npy = format!("{bundle}.npy");
        let out = ok(&[
            "run",
            bundle,
            "--input-ids",
            &ids,
            "--max-new-tokens",
            "2",
            "--ignore-eos",
            "--dump-logits",
            &npy,
            "--json",
        ]);
        let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
        let rss = summary["peak_rss_bytes"]
            .as_u64()
            .expect("peak RSS on Linux");
        let weights = std::fs::metadata(format!("{bundle}/model.onnx.data"))
            .unwrap()
            .len();
        eprintln!("{target}/{moe}: peak RSS {rss} B for {weights} B of weights");
        assert!(
            rss < weights + (1 << 30),
            "{target}/{moe}: peak RSS {rss} B is more than the {weights} B of weights + 1 GiB"
        );
        let logits: ndarray::Array2<f32> = ndarray_npy::read_npy(&npy).unwrap();
        match &reference {
            None => reference = Some(logits),
            Some(r) => {
                let (err, scale) = common::max_error(&logits, r);
                eprintln!("{target}/{moe}: max error {err:.3e} of {scale:.3}");
                assert!(
                    err <= common::LOGIT_TOLERANCE * scale,
                    "{target}/{moe}: logits differ from onnx/ort by {err} (scale {scale})"
                );
            }
        }
    }
}
