//! Every pass preserves the graph's meaning: the reference evaluator gives the same logits before and
//! after it, on random token ids, for both fixtures and both expert layouts. The lowered graph's explicit
//! KV cache reproduces the full-sequence logits when fed prefill then decode steps.

use std::collections::HashMap;
use std::path::PathBuf;

use herd_ir::eval::{evaluate, Tensor};
use herd_ir::ops::ExpertLayout;
use herd_ir::quant::QuantScheme;
use herd_ir::{Graph, Op};
use herd_passes::pipeline::{run_pipeline, PassOptions, RunOptions, PIPELINE};
use ndarray::{ArrayD, Axis, IxDyn};

const FIXTURES: [&str; 2] = ["tiny-scout", "tiny-maverick"];

fn import(name: &str) -> Graph {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    herd_ir::import(&dir).expect("import").graph
}

fn options(layout: ExpertLayout) -> PassOptions {
    PassOptions {
        activations: Default::default(),
        moe_layout: layout,
        max_positions: 64,
        quant: None,
    }
}

/// Deterministic pseudo-random token ids (xorshift), `batch` rows of `seq` ids below `vocab`.
fn random_ids(batch: usize, seq: usize, vocab: u64, seed: u64) -> Vec<i64> {
    let mut state = seed | 1;
    (0..batch * seq)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % vocab) as i64
        })
        .collect()
}

/// Positions of the full layers' caches in these tests.
const CACHE_CONTEXT: usize = 64;

fn kv_inputs(graph: &Graph) -> Vec<(String, Vec<usize>)> {
    graph
        .node_indices()
        .into_iter()
        .filter_map(|n| match &graph.node(n)?.op {
            Op::Input(a) if a.name.starts_with("past_") => {
                // Full layers' caches hold the context; chunked layers' rings are fixed.
                let dims =
                    a.ty.shape
                        .0
                        .iter()
                        .map(|d| d.fixed().unwrap_or(CACHE_CONTEXT))
                        .collect();
                Some((a.name.clone(), dims))
            }
            _ => None,
        })
        .collect()
}

/// Runs `graph` on ids [batch, seq] at positions `start..`, with the given past (zeroed caches when
/// None), in calls that stop at chunk boundaries as the runtime's do (a chunked layer's ring holds one
/// chunk); the logits of all calls are concatenated.
fn run(
    graph: &Graph,
    ids: &[i64],
    batch: usize,
    start: i64,
    past: Option<&HashMap<String, Tensor>>,
) -> HashMap<String, Tensor> {
    let seq = ids.len() / batch;
    let kv = kv_inputs(graph);
    // The shortest cache is a ring (or, without chunked layers, the whole context).
    let ring = kv.iter().map(|(_, dims)| dims[2]).min();
    let mut state: HashMap<String, Tensor> = match past {
        Some(p) => p.clone(),
        None => kv
            .iter()
            .map(|(name, dims)| {
                let mut dims = dims.clone();
                dims[0] = batch;
                let zeros = Tensor::F32(ArrayD::zeros(IxDyn(&dims)));
                (name.replace("past_", "present_"), zeros)
            })
            .collect(),
    };
    let mut pieces = Vec::new();
    let mut done = 0;
    while done < seq {
        let at = start as usize + done;
        let room = ring.map_or(seq, |r| r - at % r);
        let n = (seq - done).min(room);
        let piece: Vec<i64> = (0..batch)
            .flat_map(|b| ids[b * seq + done..b * seq + done + n].to_vec())
            .collect();
        let out = run_call(graph, &piece, batch, at as i64, &state);
        pieces.push(logits(&out));
        state = out;
        done += n;
    }
    let views: Vec<_> = pieces.iter().map(|p| p.view()).collect();
    state.insert(
        "logits".into(),
        Tensor::F32(ndarray::concatenate(Axis(1), &views).unwrap()),
    );
    state
}

/// One call of `graph` with the caches of `state` (its `present_*` become the `past_*`).
fn run_call(
    graph: &Graph,
    ids: &[i64],
    batch: usize,
    start: i64,
    state: &HashMap<String, Tensor>,
) -> HashMap<String, Tensor> {
    let seq = ids.len() / batch;
    let positions: Vec<i64> = (0..batch).flat_map(|_| start..start + seq as i64).collect();
    let index: Vec<i64> = (0..batch).flat_map(|_| 0..seq as i64).collect();
    let mut inputs = HashMap::from([
        (
            herd_ir::import::LOGITS_INDEX_INPUT.to_string(),
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[batch, seq]), index).unwrap()),
        ),
        (
            "input_ids".to_string(),
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[batch, seq]), ids.to_vec()).unwrap()),
        ),
        (
            "position_ids".to_string(),
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[batch, seq]), positions).unwrap()),
        ),
    ]);
    for (name, _) in kv_inputs(graph) {
        inputs.insert(
            name.clone(),
            state[&name.replace("past_", "present_")].clone(),
        );
    }
    evaluate(graph, &inputs).expect("evaluate")
}

fn logits(out: &HashMap<String, Tensor>) -> ArrayD<f32> {
    out["logits"].as_f32().expect("f32 logits").clone()
}

fn assert_close(a: &ArrayD<f32>, b: &ArrayD<f32>, what: &str) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes differ");
    let err = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    let scale = b.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    assert!(
        err <= 1e-5 * scale,
        "{what}: max error {err} against scale {scale}"
    );
}

#[test]
fn each_pass_alone_preserves_logits() {
    for name in FIXTURES {
        let reference = import(name);
        let ids = random_ids(2, 13, 512, 7);
        let expected = logits(&run(&reference, &ids, 2, 0, None));
        // quantize changes the values on purpose: `quantize_equals_explicit_fake_quantization`.
        for pass in PIPELINE.iter().filter(|p| p.name != "quantize") {
            for layout in [ExpertLayout::Interleaved, ExpertLayout::Halves] {
                let mut graph = reference.clone();
                (pass.run)(&mut graph, &options(layout)).expect("pass");
                herd_ir::verify(&graph, Some(pass.name)).expect("verifies");
                assert_close(
                    &logits(&run(&graph, &ids, 2, 0, None)),
                    &expected,
                    &format!("{name} after {} ({layout:?})", pass.name),
                );
            }
        }
    }
}

#[test]
fn pipeline_lowers_everything_and_preserves_logits() {
    for name in FIXTURES {
        let reference = import(name);
        let ids = random_ids(2, 19, 512, 11);
        let expected = logits(&run(&reference, &ids, 2, 0, None));
        for layout in [ExpertLayout::Interleaved, ExpertLayout::Halves] {
            let mut graph = reference.clone();
            let report = run_pipeline(
                &mut graph,
                &options(layout),
                &RunOptions::default(),
                |_, _| {},
            )
            .expect("pipeline");
            assert_eq!(report.timings.len(), PIPELINE.len());
            assert!(graph.node_indices().iter().all(|&n| !matches!(
                graph.node(n).unwrap().op,
                Op::Attention(_) | Op::Moe(_) | Op::Mlp
            )));
            assert_close(
                &logits(&run(&graph, &ids, 2, 0, None)),
                &expected,
                &format!("{name} lowered ({layout:?})"),
            );
        }
    }
}

#[test]
fn kv_cache_decode_matches_full_sequence() {
    for name in FIXTURES {
        let mut graph = import(name);
        run_pipeline(
            &mut graph,
            &options(ExpertLayout::Halves),
            &RunOptions::default(),
            |_, _| {},
        )
        .expect("pipeline");
        // 21 tokens cross two chunk boundaries (chunk 8) and several temperature steps (floor_scale 4).
        let ids = random_ids(1, 21, 512, 3);
        let full = logits(&run(&graph, &ids, 1, 0, None));
        let mut state = run(&graph, &ids[..9], 1, 0, None);
        assert_close(
            &logits(&state),
            &full.slice_axis(Axis(1), (0..9).into()).to_owned(),
            &format!("{name} prefill"),
        );
        for t in 9..21 {
            let step = run(&graph, &ids[t..t + 1], 1, t as i64, Some(&state));
            let expected = full.slice_axis(Axis(1), (t..t + 1).into()).to_owned();
            assert_close(
                &logits(&step),
                &expected,
                &format!("{name} decode step at position {t}"),
            );
            state = step;
        }
    }
}

#[test]
fn disabling_a_pass_is_reported_at_the_phase_change() {
    let mut graph = import("tiny-maverick");
    let run = RunOptions {
        disabled: vec!["irope".into()],
        dump_after: vec![],
    };
    let err =
        run_pipeline(&mut graph, &options(ExpertLayout::Halves), &run, |_, _| {}).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("not fully lowered")
            && text.contains("op `attention` is not allowed in phase lowered"),
        "{text}"
    );
    let bad = RunOptions {
        disabled: vec!["nope".into()],
        dump_after: vec![],
    };
    let err = run_pipeline(
        &mut import("tiny-maverick"),
        &options(ExpertLayout::Halves),
        &bad,
        |_, _| {},
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown pass `nope`; passes are: irope, expert_fusion, quantize, calibrate"
    );
}

#[test]
fn each_pass_leaves_its_declared_phase() {
    let run = RunOptions {
        disabled: vec![],
        dump_after: PIPELINE.iter().map(|p| p.name.to_string()).collect(),
    };
    for (quant, last) in [
        (None, "lowered"),
        (Some(QuantScheme::Int4 { block: 32 }), "quantized"),
    ] {
        let mut graph = import("tiny-maverick");
        let options = PassOptions {
            quant: quant.map(|scheme| herd_passes::quantize::QuantOptions {
                scheme,
                scale_dtype: herd_ir::DType::F32,
                search: Default::default(),
                head: false,
                embeddings: false,
                keep: vec![],
            }),
            ..options(ExpertLayout::Halves)
        };
        let mut phases = Vec::new();
        run_pipeline(&mut graph, &options, &run, |pass, text| {
            let phase = text
                .lines()
                .next()
                .unwrap()
                .trim_start_matches("graph phase=");
            phases.push(format!("{pass}:{phase}"));
        })
        .unwrap();
        // irope leaves Mlp/Moe for expert_fusion, which leaves nothing unlowered.
        assert_eq!(
            phases,
            [
                "irope:imported".to_string(),
                "expert_fusion:lowered".into(),
                format!("quantize:{last}"),
                format!("calibrate:{last}"),
            ]
        );
    }
    // The Lowered check runs right after expert_fusion: an op it admits no longer can wait for the
    // end. With irope skipped, the attention op is reported there, as the user's doing.
    let mut graph = import("tiny-maverick");
    let skip = RunOptions {
        disabled: vec!["irope".into()],
        dump_after: vec!["quantize".into()],
    };
    let mut dumped = false;
    let err = run_pipeline(&mut graph, &options(ExpertLayout::Halves), &skip, |_, _| {
        dumped = true
    })
    .unwrap_err();
    assert!(
        matches!(err, herd_passes::PassError::NotLowered(ref e) if e.after_pass.as_deref() == Some("expert_fusion")),
        "{err}"
    );
    assert!(!dumped, "the pipeline stopped at expert_fusion");
}

#[test]
fn dump_after_receives_the_printed_ir() {
    let mut graph = import("tiny-maverick");
    let run = RunOptions {
        disabled: vec![],
        dump_after: vec!["expert_fusion".into()],
    };
    let mut dumps = Vec::new();
    run_pipeline(
        &mut graph,
        &options(ExpertLayout::Interleaved),
        &run,
        |pass, text| dumps.push((pass.to_string(), text.to_string())),
    )
    .unwrap();
    assert_eq!(dumps.len(), 1);
    assert_eq!(dumps[0].0, "expert_fusion");
    assert!(dumps[0]
        .1
        .contains("fused_moe[experts=4 top_k=1 intermediate=64 layout=Interleaved]"));
    assert!(
        dumps[0].1.contains("q_proj.weight (model.safetensors) ++"),
        "q/k/v fused"
    );
}

/// The quantize pass marks weights quantized; the evaluator reads them fake-quantized through the
/// lazy weight chain. An independent fake quantization (each quantized weight replaced by a constant
/// holding `quantize(w).dequantized`) gives the same logits, and they differ from the float graph's.
#[test]
fn quantize_equals_explicit_fake_quantization() {
    use herd_ir::ops::ConstantData;
    use herd_ir::quant::QuantScheme;
    for name in FIXTURES {
        for scheme in [
            QuantScheme::Int4 { block: 32 },
            QuantScheme::Int8 { block: 32 },
            QuantScheme::Fp8,
        ] {
            let mut graph = import(name);
            let options = PassOptions {
                quant: Some(herd_passes::quantize::QuantOptions {
                    scheme,
                    scale_dtype: herd_ir::DType::F32,
                    search: Default::default(),
                    head: false,
                    embeddings: false,
                    keep: vec![],
                }),
                ..options(ExpertLayout::Halves)
            };
            let float = {
                let mut g = graph.clone();
                run_pipeline(
                    &mut g,
                    &PassOptions {
                        quant: None,
                        ..options.clone()
                    },
                    &RunOptions::default(),
                    |_, _| {},
                )
                .expect("pipeline");
                g
            };
            run_pipeline(&mut graph, &options, &RunOptions::default(), |_, _| {})
                .expect("pipeline");
            let mut explicit = graph.clone();
            let mut quantized = 0;
            for n in explicit.node_indices() {
                let Some(Op::Weight(w)) = explicit.node(n).map(|n| n.op.clone()) else {
                    continue;
                };
                let Some(spec) = w.quant else { continue };
                let base = herd_ir::weights::WeightRef { quant: None, ..w };
                let values = explicit.weights().load_f32(&base).expect("weight");
                let fake = herd_ir::quant::quantize(&values, &spec, None).dequantized;
                let node = explicit.node_mut(n).unwrap();
                node.op = Op::Constant(ConstantData {
                    shape: fake.shape().to_vec(),
                    values: std::sync::Arc::new(fake.iter().copied().collect()),
                });
                node.outputs[0].dtype = herd_ir::DType::F32;
                quantized += 1;
            }
            assert!(quantized > 0, "{name} {scheme:?}: nothing was quantized");
            let ids = random_ids(2, 11, 512, 5);
            let lazy = logits(&run(&graph, &ids, 2, 0, None));
            assert_close(
                &lazy,
                &logits(&run(&explicit, &ids, 2, 0, None)),
                &format!("{name} {scheme:?}: lazy against explicit fake quantization"),
            );
            let drift = lazy
                .iter()
                .zip(logits(&run(&float, &ids, 2, 0, None)).iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                drift > 0.0,
                "{name} {scheme:?}: quantization changed nothing"
            );
        }
    }
}

/// Sibling projections with biases (the vision tower's q/k/v) are not fused: their biases survive
/// expert_fusion and the features are unchanged.
#[test]
fn sibling_fusion_keeps_biases() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-scout");
    let ckpt = herd_ir::Checkpoint::open(&dir).expect("open");
    let reference = herd_ir::vision::build_vision_graph(&ckpt).expect("vision graph");
    let side = ckpt.config.vision.as_ref().unwrap().image_size;
    let pixels: Vec<f32> = (0..3 * side * side)
        .map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0)
        .collect();
    let inputs = HashMap::from([(
        herd_ir::vision::PIXEL_VALUES.to_string(),
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[1, 3, side, side]), pixels).unwrap()),
    )]);
    let features = |g: &Graph| {
        evaluate(g, &inputs).expect("evaluate")[herd_ir::vision::IMAGE_FEATURES]
            .as_f32()
            .unwrap()
            .clone()
    };
    let mut fused = reference.clone();
    herd_passes::expert_fusion::run(&mut fused, &options(ExpertLayout::Halves)).expect("pass");
    assert_close(
        &features(&fused),
        &features(&reference),
        "vision features after expert_fusion",
    );
}
