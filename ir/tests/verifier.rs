//! The verifier reports every finding on a broken graph, each with its node, and names the pass.

use std::sync::Arc;

use herd_ir::ops::{InputAttrs, Op, Phase};
use herd_ir::weights::WeightStore;
use herd_ir::{verify, DType, Dim, Graph, SymDim, TensorType, Value};

fn input(g: &mut Graph, name: &str, dims: Vec<Dim>) -> Value {
    let ty = TensorType::new(DType::F32, dims);
    g.add(
        name,
        Op::Input(InputAttrs {
            name: name.into(),
            ty,
        }),
        &[],
    )
    .unwrap()
}

fn activations() -> Vec<Dim> {
    vec![
        Dim::Sym(SymDim::Batch),
        Dim::Sym(SymDim::Seq),
        Dim::Fixed(8),
    ]
}

#[test]
fn builder_rejects_ill_typed_nodes() {
    let mut g = Graph::new(Phase::Lowered, Arc::new(WeightStore::default()));
    let x = input(&mut g, "x", activations());
    let w = input(&mut g, "w", vec![Dim::Fixed(4), Dim::Fixed(6)]);
    let err = g.add("proj", Op::Linear, &[x, w]).unwrap_err();
    assert_eq!(err.name, "proj");
    assert!(err.message.contains("disagree on K"), "{}", err.message);
}

#[test]
fn reports_every_finding_with_node_and_pass() {
    let mut g = Graph::new(Phase::Lowered, Arc::new(WeightStore::default()));
    let x = input(&mut g, "x", activations());
    let w = input(&mut g, "w", vec![Dim::Fixed(4), Dim::Fixed(8)]);
    let proj = g.add("proj", Op::Linear, &[x, w]).unwrap();
    let act = g.add("act", Op::Silu, &[proj]).unwrap();
    g.set_output("y", act);
    assert!(verify(&g, None).is_ok());

    // Phase rule: an Imported-only op in a Lowered graph.
    let mlp_w = input(&mut g, "gate", vec![Dim::Fixed(16), Dim::Fixed(8)]);
    let down = input(&mut g, "down", vec![Dim::Fixed(8), Dim::Fixed(16)]);
    let mlp = g
        .add("layers.0.mlp", Op::Mlp, &[x, mlp_w, mlp_w, down])
        .unwrap();
    // A second edge into slot 0 of `act`.
    g.add_raw_edge(x, act.node, 0);
    // A cycle: act feeds proj's slot 2.
    g.add_raw_edge(act, proj.node, 2);
    g.set_output(
        "dangling",
        Value {
            node: mlp.node,
            slot: 3,
        },
    );

    let err = verify(&g, Some("expert_fusion")).unwrap_err();
    assert_eq!(err.after_pass.as_deref(), Some("expert_fusion"));
    let text = err.to_string();
    assert!(text.contains("after pass `expert_fusion`"), "{text}");
    let about = |name: &str| {
        err.diagnostics
            .iter()
            .filter(|d| d.name == name)
            .map(|d| d.message.clone())
            .collect::<Vec<_>>()
    };
    assert!(
        about("layers.0.mlp")
            .iter()
            .any(|m| m.contains("not allowed in phase lowered")),
        "{text}"
    );
    assert!(about("act").iter().any(|m| m.contains("not 0..")), "{text}");
    assert!(about("proj").iter().any(|m| m.contains("cycle")), "{text}");
    assert!(
        about("proj")
            .iter()
            .any(|m| m.contains("bias must have shape")),
        "{text}"
    );
    assert!(
        about("dangling")
            .iter()
            .any(|m| m.contains("missing node or slot")),
        "{text}"
    );
    assert!(err
        .diagnostics
        .iter()
        .all(|d| d.name == "dangling" || d.node.is_some()));
}

#[test]
fn declared_types_must_match_inference() {
    let mut g = Graph::new(Phase::Imported, Arc::new(WeightStore::default()));
    let x = input(&mut g, "x", activations());
    let y = g.add("act", Op::Sigmoid, &[x]).unwrap();
    g.set_output("y", y);
    g.node_mut(y.node).unwrap().outputs[0].dtype = DType::F16;
    let err = verify(&g, None).unwrap_err();
    assert_eq!(err.diagnostics.len(), 1);
    assert!(err.diagnostics[0].message.contains(
        "declared outputs [f16[batch, seq, 8]] but the inputs give [f32[batch, seq, 8]]"
    ));
}
