//! Snapshots of what the compiler makes, for each target, MoE lowering and scheme: the IR after each
//! pass (the printer's full node list) and the emitted ONNX graph (every node with its attributes,
//! inputs and outputs; every initializer's type and shape). A change to any lowering shows up as a
//! reviewable diff. Re-bless with `HERD_BLESS=1`, which rewrites the snapshots that differ and fails
//! the run so that a bless can never pass unnoticed.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use common::{fixture, ok, FIXTURES};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::{Message as _, ModelProto};

/// (snapshot label, compile arguments, whether the IR after expert_fusion is new for this case).
const CASES: &[(&str, &[&str], bool)] = &[
    ("onnx.ort.f32", &["--moe", "ort"], true),
    ("onnx.cuda.f32", &["--moe", "cuda"], false),
    ("onnx.grouped.f32", &["--moe", "grouped"], true),
    (
        "onnx.ort.int4-32",
        &["--moe", "ort", "--quant", "int4:32"],
        false,
    ),
    (
        "onnx.grouped.int8-32",
        &["--moe", "grouped", "--quant", "int8:32"],
        false,
    ),
    ("onnx.ort.fp8", &["--moe", "ort", "--quant", "fp8"], false),
    ("tensorrt.f16", &["--target", "tensorrt-h100"], false),
    (
        "tensorrt.bf16",
        &["--target", "tensorrt-h100", "--dtype", "bf16"],
        false,
    ),
    (
        "tensorrt.f16.int4-64",
        &["--target", "tensorrt-h100", "--quant", "int4:64"],
        false,
    ),
    (
        "tensorrt.f16.fp8",
        &["--target", "tensorrt-h100", "--quant", "fp8"],
        false,
    ),
];

/// One line per node (`op_type[domain] name {attributes}: inputs -> outputs`), then the graph's
/// inputs, outputs and initializers with their types and shapes.
fn onnx_listing(model: &Path) -> String {
    let onnx = ModelProto::parse_from_bytes(&std::fs::read(model).unwrap()).unwrap();
    let graph = onnx.graph.get_or_default();
    let mut out = String::new();
    for n in &graph.node {
        let domain = if n.domain.is_empty() {
            String::new()
        } else {
            format!("[{}]", n.domain)
        };
        let attributes: Vec<String> = n
            .attribute
            .iter()
            .map(|a| {
                let value = match a.type_.enum_value() {
                    Ok(AttributeType::FLOAT) => format!("{}", a.f),
                    Ok(AttributeType::INT) => format!("{}", a.i),
                    Ok(AttributeType::STRING) => String::from_utf8_lossy(&a.s).into_owned(),
                    Ok(AttributeType::INTS) => format!("{:?}", a.ints),
                    Ok(AttributeType::FLOATS) => format!("{:?}", a.floats),
                    Ok(AttributeType::TENSOR) => format!("tensor{:?}", a.t.dims),
                    other => format!("{other:?}"),
                };
                format!("{}={value}", a.name)
            })
            .collect();
        writeln!(
            out,
            "{}{domain} {} {{{}}}: {} -> {}",
            n.op_type,
            n.name,
            attributes.join(", "),
            n.input.join(", "),
            n.output.join(", ")
        )
        .unwrap();
    }
    for (what, values) in [("input", &graph.input), ("output", &graph.output)] {
        for v in values {
            writeln!(out, "{what} {}", v.name).unwrap();
        }
    }
    for t in &graph.initializer {
        writeln!(
            out,
            "initializer {} type {} {:?}",
            t.name, t.data_type, t.dims
        )
        .unwrap();
    }
    out
}

/// Compiles fixture `name` with `args` into `dir/{label}`, dumping the IR after `passes`; returns the
/// bundle and the dump folder.
fn compile_dumping(
    dir: &Path,
    name: &str,
    label: &str,
    args: &[&str],
    passes: &[&str],
) -> (PathBuf, PathBuf) {
    let bundle = dir.join(format!("{name}.{label}"));
    let dump = dir.join(format!("{name}.{label}.ir"));
    let model = fixture(name);
    let mut compile = vec![
        "compile",
        model.to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--max-context",
        "64",
        "--dump-dir",
        dump.to_str().unwrap(),
    ];
    for pass in passes {
        compile.extend(["--dump-ir-after", pass]);
    }
    compile.extend_from_slice(args);
    ok(&compile);
    (bundle, dump)
}

#[test]
fn ir_after_each_pass_and_emitted_graphs_match_their_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let mut snapshots = Vec::new();
    for name in FIXTURES {
        for (k, (label, args, fusion_is_new)) in CASES.iter().enumerate() {
            let (bundle, dump) = compile_dumping(
                dir.path(),
                name,
                label,
                args,
                &["irope", "expert_fusion", "quantize"],
            );
            let ir = |pass: &str| std::fs::read_to_string(dump.join(format!("{pass}.ir"))).unwrap();
            if k == 0 {
                // irope does not depend on the target, the lowering or the scheme.
                snapshots.push((
                    format!("{name}.after-irope.ir"),
                    ir("irope"),
                    format!("{name}: the IR after irope"),
                ));
            }
            if *fusion_is_new {
                snapshots.push((
                    format!("{name}.{label}.after-expert_fusion.ir"),
                    ir("expert_fusion"),
                    format!("{name} {label}: the IR after expert_fusion"),
                ));
            }
            if args.contains(&"--quant") {
                snapshots.push((
                    format!("{name}.{label}.after-quantize.ir"),
                    ir("quantize"),
                    format!("{name} {label}: the IR after quantize"),
                ));
            }
            snapshots.push((
                format!("{name}.{label}.onnx"),
                onnx_listing(&bundle.join("model.onnx")),
                format!("{name} {label}: the emitted ONNX graph"),
            ));
        }
    }
    common::check_snapshots(&snapshots);
}

#[test]
fn each_case_that_claims_a_new_lowering_has_one() {
    // The table's flags are what keeps the snapshots few: a case marked as repeating an earlier IR
    // must repeat it, or its differences would go unseen.
    let dir = tempfile::tempdir().unwrap();
    let name = "tiny-scout";
    let mut seen: Vec<String> = Vec::new();
    for (label, args, fusion_is_new) in CASES {
        let (_, dump) = compile_dumping(dir.path(), name, label, args, &["expert_fusion"]);
        let ir = std::fs::read_to_string(dump.join("expert_fusion.ir")).unwrap();
        let repeats = seen.contains(&ir);
        assert_eq!(
            !repeats,
            *fusion_is_new,
            "{label}: marked {} but its IR after expert_fusion {}",
            if *fusion_is_new { "new" } else { "repeating" },
            if repeats {
                "repeats an earlier one"
            } else {
                "is new"
            }
        );
        seen.push(ir);
    }
}
