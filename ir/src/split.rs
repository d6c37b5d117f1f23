//! Pipeline stages: cutting a lowered decoder into graphs that each run a contiguous range of layers,
//! handing the residual stream from one to the next, and choosing ranges that balance bytes per device.
//!
//! Stage k of `[a, b)` keeps the nodes its outputs need: the residual stream after layer `b - 1`
//! (`hidden_out`, or the logits for the last stage) and the `present_*` caches of its own layers. Its
//! input is the residual stream after layer `a - 1` (`hidden_in`), or the tokens for stage 0. Every
//! stage takes `position_ids` and computes its own rotary angles and masks, so a stage's numbers are
//! the single graph's numbers.

use std::ops::Range;

use crate::error::Diagnostic;
use crate::graph::{Graph, NodeIndex, Value};
use crate::ops::{InputAttrs, Op};
use crate::types::TensorType;

/// Input of a stage after the first: the residual stream [batch, seq, hidden] after the previous stage.
pub const HIDDEN_IN: &str = "hidden_in";
/// Output of a stage before the last: the residual stream [batch, seq, hidden] after its last layer.
pub const HIDDEN_OUT: &str = "hidden_out";
/// The most stages a bundle holds.
pub const MAX_STAGES: usize = 64;

/// Name of the node holding the residual stream after decoder layer `layer` (the importer's).
pub fn residual_name(layer: usize) -> String {
    format!("layers.{layer}.ffn_residual")
}

/// The decoder layer a node belongs to, from its name (`layers.{layer}.…`).
fn node_layer(name: &str) -> Option<usize> {
    name.strip_prefix("layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Whether a graph output belongs to decoder layer `layer` (its KV cache).
fn output_layer(name: &str) -> Option<usize> {
    match crate::names::Cache::parse(name)? {
        (crate::names::Cache::PresentKey | crate::names::Cache::PresentValue, layer) => Some(layer),
        (crate::names::Cache::PastKey | crate::names::Cache::PastValue, _) => None,
    }
}

/// Cuts `graph` (a lowered decoder of `num_layers` layers) into one graph per range of `ranges`,
/// which must cover `0..num_layers` in order without gaps. Each result passes [`crate::verify`].
pub fn split(
    graph: &Graph,
    num_layers: usize,
    ranges: &[Range<usize>],
) -> Result<Vec<Graph>, Diagnostic> {
    check_ranges(num_layers, ranges)?;
    ranges
        .iter()
        .map(|range| stage(graph, num_layers, range.clone()))
        .collect()
}

/// Refuses ranges that do not cover `0..num_layers` in order with non-empty stages.
pub fn check_ranges(num_layers: usize, ranges: &[Range<usize>]) -> Result<(), Diagnostic> {
    let problem = |message: String| Diagnostic {
        node: None,
        name: "stages".into(),
        message,
    };
    if ranges.is_empty() || ranges.len() > MAX_STAGES.min(num_layers.max(1)) {
        return Err(problem(format!(
            "{} stages for {num_layers} layers: use 1 to {} (one layer at least per stage)",
            ranges.len(),
            MAX_STAGES.min(num_layers.max(1))
        )));
    }
    let mut next = 0;
    for r in ranges {
        if r.start != next || r.end <= r.start {
            return Err(problem(format!(
                "stage layers {}..{} do not follow {next} (stages run contiguous, non-empty ranges)",
                r.start, r.end
            )));
        }
        next = r.end;
    }
    if next != num_layers {
        return Err(problem(format!(
            "the stages end at layer {next}, the model has {num_layers}"
        )));
    }
    Ok(())
}

fn find_node(graph: &Graph, name: &str) -> Result<NodeIndex, Diagnostic> {
    graph
        .node_indices()
        .into_iter()
        .find(|&n| graph.node(n).is_some_and(|node| node.name == name))
        .ok_or_else(|| Diagnostic {
            node: None,
            name: name.into(),
            message: "the residual stream node to cut at is missing".into(),
        })
}

/// The stage of `graph` running layers `range` (one range of a [`split`]; `range` must lie inside
/// `0..num_layers` and be non-empty).
pub fn stage(graph: &Graph, num_layers: usize, range: Range<usize>) -> Result<Graph, Diagnostic> {
    if range.is_empty() || range.end > num_layers {
        return Err(Diagnostic {
            node: None,
            name: "stages".into(),
            message: format!("layers {}..{} of {num_layers}", range.start, range.end),
        });
    }
    let mut g = graph.clone();
    if range.start > 0 {
        let cut: Value = find_node(&g, &residual_name(range.start - 1))?.into();
        let ty = g.value_type(cut).cloned().ok_or_else(|| Diagnostic {
            node: Some(cut.node.index() as u32),
            name: residual_name(range.start - 1),
            message: "the residual stream has no type".into(),
        })?;
        let hidden = g.add(
            HIDDEN_IN,
            Op::Input(InputAttrs {
                name: HIDDEN_IN.into(),
                ty: TensorType::new(ty.dtype, ty.shape.0.clone()),
            }),
            &[],
        )?;
        g.replace_uses(cut, hidden);
    }
    let last = range.end == num_layers;
    let end: Value = find_node(&g, &residual_name(range.end - 1))?.into();
    // Outputs of a layer's nodes (the caches, calibration exposures) go with the layer's stage; the
    // rest (the logits) with the last.
    let output_layers: std::collections::HashMap<String, Option<usize>> = g
        .outputs()
        .iter()
        .map(|(name, value)| {
            let layer =
                output_layer(name).or_else(|| g.node(value.node).and_then(|n| node_layer(&n.name)));
            (name.clone(), layer)
        })
        .collect();
    g.retain_outputs(|name| match output_layers.get(name).copied().flatten() {
        Some(layer) => range.contains(&layer),
        None => last,
    });
    if !last {
        g.set_output(HIDDEN_OUT, end);
    }
    rewire_masks(&mut g, &range);
    g.prune_dead();
    g.remove_unused_inputs();
    crate::verify(&g, Some("split")).map_err(|e| Diagnostic {
        node: None,
        name: format!("stage of layers {}..{}", range.start, range.end),
        message: e.to_string(),
    })?;
    Ok(g)
}

/// A mask is built once per kind from the first layer's key view; a stage without that layer takes
/// the key view of its own first layer of the kind instead (the same length: rings are one chunk,
/// full caches the context).
fn rewire_masks(g: &mut Graph, range: &Range<usize>) {
    let mut done = std::collections::HashSet::new();
    for sdpa in g.topo_order().unwrap_or_default() {
        let Some(node) = g.node(sdpa) else { continue };
        let layer = node_layer(&node.name);
        if !matches!(node.op, Op::Sdpa { .. }) || !layer.is_some_and(|l| range.contains(&l)) {
            continue;
        }
        let inputs = g.inputs(sdpa);
        let (Some(&keys), Some(&mask)) = (inputs.get(1), inputs.get(3)) else {
            continue;
        };
        if !matches!(
            g.node(mask.node).map(|n| &n.op),
            Some(Op::AttentionMask { .. })
        ) || !done.insert(mask.node)
        {
            continue;
        }
        // The stage's sdpa that comes first in order is its first layer of this mask's kind.
        g.set_input(mask.node, 1, keys);
    }
}

/// Per-layer costs balanced over `stages` contiguous ranges: the split whose costliest stage (its
/// layers plus `first_extra` on stage 0 and `last_extra` on the last) costs least. Costs are bytes.
/// The extras ride on the first and last layers, which makes this the plain linear partition problem:
/// a binary search on the largest stage's cost with a greedy check, O(layers x 64).
pub fn balance(
    layer_costs: &[u64],
    first_extra: u64,
    last_extra: u64,
    stages: usize,
) -> Vec<Range<usize>> {
    let n = layer_costs.len();
    if n == 0 {
        return std::iter::once(0..0).collect();
    }
    let stages = stages.clamp(1, n);
    let mut costs = layer_costs.to_vec();
    costs[0] = costs[0].saturating_add(first_extra);
    costs[n - 1] = costs[n - 1].saturating_add(last_extra);
    // The fewest stages of at most `cap` each, greedily from the first layer.
    let count = |cap: u64| {
        let (mut parts, mut sum) = (1usize, 0u64);
        for &c in &costs {
            if sum.saturating_add(c) > cap {
                parts += 1;
                sum = 0;
            }
            sum = sum.saturating_add(c);
        }
        parts
    };
    let (mut lo, mut hi) = (
        costs.iter().copied().max().unwrap_or(0),
        costs.iter().fold(0u64, |s, &c| s.saturating_add(c)),
    );
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if count(mid) <= stages {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    // Exactly `stages` ranges under the cap: cut when the cap is reached, or when each later stage
    // needs one of the layers left.
    let mut ranges = Vec::with_capacity(stages);
    let (mut start, mut sum) = (0usize, 0u64);
    for (i, &c) in costs.iter().enumerate() {
        let to_open = stages - ranges.len() - 1;
        if i > start && (sum.saturating_add(c) > lo || n - i <= to_open) {
            ranges.push(start..i);
            start = i;
            sum = 0;
        }
        sum = sum.saturating_add(c);
    }
    ranges.push(start..n);
    ranges
}

/// Parses `--stage-layers 0..3,3..8` style ranges (`a..b`, comma-separated).
pub fn parse_ranges(text: &str) -> Result<Vec<Range<usize>>, String> {
    text.split(',')
        .map(|part| {
            let (a, b) = part
                .trim()
                .split_once("..")
                .ok_or_else(|| format!("`{part}` is not a range START..END"))?;
            let parse = |s: &str| {
                s.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("`{part}`: `{s}` is not a layer number"))
            };
            Ok(parse(a)?..parse(b)?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest stage cost of `ranges`.
    fn worst(costs: &[u64], first: u64, last: u64, ranges: &[Range<usize>]) -> u64 {
        let n = ranges.len();
        ranges
            .iter()
            .enumerate()
            .map(|(k, r)| {
                costs[r.clone()].iter().sum::<u64>()
                    + if k == 0 { first } else { 0 }
                    + if k == n - 1 { last } else { 0 }
            })
            .max()
            .unwrap()
    }

    #[test]
    fn balance_is_contiguous_and_minimises_the_largest_stage() {
        // Against every split of small cases.
        let cases: [(&[u64], u64, u64); 4] = [
            (&[5, 1, 1, 1, 1, 5, 5, 5], 0, 0),
            (&[1; 8], 4, 4),
            (&[1; 8], 4, 0),
            (&[9, 2, 7, 3, 3, 8, 1], 2, 6),
        ];
        for (costs, first, last) in cases {
            let n = costs.len();
            for stages in 1..=4 {
                let r = balance(costs, first, last, stages);
                assert!(check_ranges(n, &r).is_ok(), "{r:?}");
                assert_eq!(r.len(), stages);
                // Brute force over cut positions.
                let mut best = u64::MAX;
                for cuts in 0u32..(1 << (n - 1)) {
                    if cuts.count_ones() as usize != stages - 1 {
                        continue;
                    }
                    let mut ranges = Vec::new();
                    let mut start = 0;
                    for i in 1..n {
                        if cuts & (1 << (i - 1)) != 0 {
                            ranges.push(start..i);
                            start = i;
                        }
                    }
                    ranges.push(start..n);
                    best = best.min(worst(costs, first, last, &ranges));
                }
                assert_eq!(worst(costs, first, last, &r), best, "{costs:?} in {stages}");
            }
        }
        assert_eq!(balance(&[1; 8], 4, 0, 2), vec![0..2, 2..8]);
        assert_eq!(balance(&[3, 3], 0, 0, 5), vec![0..1, 1..2]);
    }

    #[test]
    fn ranges_must_cover_the_layers_in_order() {
        assert!(check_ranges(4, &[0..2, 2..4]).is_ok());
        assert!(check_ranges(4, &[0..2, 3..4]).is_err());
        assert!(check_ranges(4, &[0..2, 2..2, 2..4]).is_err());
        assert!(check_ranges(4, std::slice::from_ref(&(0..3))).is_err());
        assert!(check_ranges(4, &[]).is_err());
        assert_eq!(parse_ranges("0..1, 1..4").unwrap(), vec![0..1, 1..4]);
        assert!(parse_ranges("0-1").is_err());
    }
}
