//! The reference evaluator on the imported graph reproduces transformers' logits and greedy tokens for
//! every golden prompt of both fixtures: importer and IR semantics, before any lowering.

mod common;

use std::collections::HashMap;

use common::{argmax, fixture, goldens, max_error, FIXTURES, LOGIT_TOLERANCE};
use herd_ir::eval::{evaluate, Tensor};
use herd_ir::Graph;
use ndarray::{Array2, ArrayD, Axis, IxDyn};

fn logits(graph: &Graph, ids: &[i64]) -> Array2<f32> {
    let n = ids.len();
    let inputs = HashMap::from([
        common::every_logit_row(1, n),
        (
            "input_ids".to_string(),
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[1, n]), ids.to_vec()).unwrap()),
        ),
        (
            "position_ids".to_string(),
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[1, n]), (0..n as i64).collect()).unwrap()),
        ),
    ]);
    let out = evaluate(graph, &inputs).expect("evaluation");
    let logits = out["logits"]
        .as_f32()
        .expect("f32 logits")
        .index_axis(Axis(0), 0)
        .to_owned();
    logits.into_dimensionality().unwrap()
}

#[test]
fn reference_evaluator_matches_transformers() {
    for name in FIXTURES {
        let imported = herd_ir::import(&fixture(name)).expect("import");
        for (n, golden) in goldens(name) {
            let ours = logits(&imported.graph, &golden.input_ids);
            let (err, scale) = max_error(&ours, &golden.logits);
            eprintln!("{name} prompt {n}: prefill max error {err:.3e} (scale {scale:.3})");
            assert!(
                err <= LOGIT_TOLERANCE * scale,
                "{name} prompt {n}: prefill logits differ by {err} (scale {scale})"
            );

            // Greedy decode by full recomputation; every step's logits must match as well.
            let mut ids = golden.input_ids.clone();
            let mut generated = Vec::new();
            for (step, expected) in golden.step_logits.rows().into_iter().enumerate() {
                let all = logits(&imported.graph, &ids);
                let last = all.row(all.nrows() - 1).to_owned();
                let err = last
                    .iter()
                    .zip(expected)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                let scale = expected.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
                assert!(
                    err <= LOGIT_TOLERANCE * scale,
                    "{name} prompt {n} step {step}: logits differ by {err} (scale {scale})"
                );
                let token = argmax(&last);
                generated.push(token);
                ids.push(token);
            }
            assert_eq!(
                generated, golden.greedy_ids,
                "{name} prompt {n}: greedy tokens differ"
            );
        }
    }
}

/// Removes one feature from an attention node.
type Ablation = fn(&mut herd_ir::ops::AttentionAttrs, &herd_ir::Llama4Config);

/// The goldens exercise every Llama 4 attention feature: dropping any one of them breaks the match, so
/// the test above cannot pass by accident of a feature being inert on the fixture.
#[test]
fn goldens_are_sensitive_to_each_attention_feature() {
    use herd_ir::config::RopeScaling;
    use herd_ir::ops::Op;

    let name = "tiny-scout";
    let (n, golden) = goldens(name).pop().expect("a golden prompt");
    let ablations: [(&str, Ablation); 5] = [
        ("chunked mask", |a, _| a.chunk = None),
        ("NoPE temperature", |a, _| a.temperature = None),
        ("QK norm", |a, _| a.qk_norm_eps = None),
        ("llama3 scaling", |a, c| {
            if let Some(r) = &mut a.rope {
                let plain = herd_ir::config::RopeConfig {
                    theta: c.rope.theta,
                    scaling: RopeScaling::Default,
                };
                r.inv_freq = plain.inv_freq(a.head_dim);
            }
        }),
        ("rotary frequency order", |a, _| {
            if let Some(r) = &mut a.rope {
                r.inv_freq.reverse();
            }
        }),
    ];
    for (feature, ablate) in ablations {
        let mut imported = herd_ir::import(&fixture(name)).expect("import");
        let config = imported.checkpoint.config.clone();
        for index in imported.graph.node_indices() {
            if let Some(Op::Attention(a)) = imported.graph.node_mut(index).map(|n| &mut n.op) {
                ablate(a, &config);
            }
        }
        let (err, scale) = max_error(&logits(&imported.graph, &golden.input_ids), &golden.logits);
        eprintln!("{name} prompt {n} without {feature}: max error {err:.3e}");
        assert!(
            err > 100.0 * LOGIT_TOLERANCE * scale,
            "dropping the {feature} left the logits within {err}: the fixture does not exercise it"
        );
    }
}

/// The quantize pass's meaning (fake quantization in the reference evaluator) is transformers'
/// fake-quantized model, for every scheme: the IR-level oracle for the quantized targets.
#[test]
fn quantized_reference_matches_fake_quant_goldens() {
    use herd_ir::ops::ExpertLayout;
    use herd_ir::quant::QuantScheme;
    use herd_passes::pipeline::{run_pipeline, PassOptions, RunOptions};
    use herd_passes::quantize::QuantOptions;

    for name in FIXTURES {
        for scheme in ["int4:32", "int4:64", "int8:64", "fp8"] {
            let mut graph = herd_ir::import(&fixture(name)).expect("import").graph;
            let quant = QuantOptions {
                scheme: QuantScheme::parse(scheme).unwrap(),
                scale_dtype: herd_ir::DType::F32,
                // The fixture script's fake quantization takes absmax scales.
                search: herd_ir::quant::ScaleSearch::Absmax,
                head: false,
                embeddings: false,
                keep: vec![],
            };
            let options = PassOptions {
                activations: Default::default(),
                moe_layout: ExpertLayout::Interleaved,
                max_positions: 64,
                quant: Some(quant),
            };
            run_pipeline(&mut graph, &options, &RunOptions::default(), |_, _| {})
                .expect("pipeline");
            assert_eq!(graph.phase, herd_ir::Phase::Quantized);
            let file = format!("goldens-{}.safetensors", scheme.replace(':', "-"));
            for (n, golden) in common::goldens_file(name, &file) {
                let ours = lowered_logits(&graph, &golden.input_ids);
                let (err, scale) = max_error(&ours, &golden.logits);
                assert!(
                    err <= LOGIT_TOLERANCE * scale,
                    "{name} {scheme} prompt {n}: logits differ by {err} (scale {scale})"
                );
            }
        }
    }
}

/// Logits of a Lowered graph for one prompt, run as the runtime runs it.
fn lowered_logits(graph: &Graph, ids: &[i64]) -> Array2<f32> {
    herd_ir::eval_prompt::lowered_logits(graph, ids).expect("evaluation")
}

/// Bundles quantized with the default (clipped) int scales compute what the reference evaluator computes
/// for the same graph: the targets store exactly the integers and scales the evaluator dequantizes. The
/// logits after each golden prompt agree to the fp32 tolerance, in both MoE lowerings (QMoE's packed
/// experts and DequantizeLinear -> MatMul). With absmax bundles the error is ~0.5 of the logit scale.
#[test]
fn clipped_int_bundles_match_the_reference_evaluator() {
    use herd_ir::ops::ExpertLayout;
    use herd_ir::quant::{QuantScheme, ScaleSearch};
    use herd_passes::pipeline::{run_pipeline, PassOptions, RunOptions};
    use herd_passes::quantize::QuantOptions;

    let dir = tempfile::tempdir().unwrap();
    for (name, scheme) in [("tiny-maverick", "int4:64"), ("tiny-scout", "int8:32")] {
        let mut graph = herd_ir::import(&fixture(name)).expect("import").graph;
        let options = PassOptions {
            activations: Default::default(),
            moe_layout: ExpertLayout::Interleaved,
            max_positions: 64,
            quant: Some(QuantOptions {
                scheme: QuantScheme::parse(scheme).unwrap(),
                scale_dtype: herd_ir::DType::F32,
                search: ScaleSearch::Clip,
                head: false,
                embeddings: false,
                keep: vec![],
            }),
        };
        run_pipeline(&mut graph, &options, &RunOptions::default(), |_, _| {}).expect("pipeline");
        for moe in ["ort", "grouped"] {
            let bundle = dir.path().join(format!("{name}-{moe}"));
            common::ok(&[
                "compile",
                fixture(name).to_str().unwrap(),
                "-o",
                bundle.to_str().unwrap(),
                "--moe",
                moe,
                "--quant",
                scheme,
                // The evaluator's graph below keeps lm_head float (QuantOptions head: false).
                "--keep-head",
                "--max-context",
                "64",
            ]);
            for (n, golden) in goldens(name) {
                let ids: Vec<String> = golden.input_ids.iter().map(|t| t.to_string()).collect();
                let npy = dir.path().join(format!("{name}-{moe}-{n}.npy"));
                common::ok(&[
                    "run",
                    bundle.to_str().unwrap(),
                    "--input-ids",
                    &ids.join(","),
                    "--max-new-tokens",
                    "1",
                    "--ignore-eos",
                    "--greedy",
                    "--dump-logits",
                    npy.to_str().unwrap(),
                    // As the evaluator computes: f32 activations (int8 bundles' CPU default is int8).
                    "--exact-activations",
                ]);
                let ours: Array2<f32> = ndarray_npy::read_npy(&npy).expect("logits .npy");
                let reference = lowered_logits(&graph, &golden.input_ids);
                let last = reference
                    .slice(ndarray::s![reference.nrows() - 1.., ..])
                    .to_owned();
                let (err, scale) = max_error(&ours, &last);
                eprintln!(
                    "{name} {scheme} {moe} prompt {n}: max error {err:.3e} (scale {scale:.3})"
                );
                assert!(
                    err <= LOGIT_TOLERANCE * scale,
                    "{name} {scheme} {moe} prompt {n}: the bundle differs from the evaluator by {err} (scale {scale})"
                );
            }
        }
    }
}
