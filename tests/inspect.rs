//! `herd inspect`: the JSON summary agrees with the fixtures' config.json files and index metadata, and
//! the printed IR of each fixture (and tiny-scout's vision graph) matches its committed snapshot (re-bless
//! with `HERD_BLESS=1`).

mod common;

use common::{fixture, ok, FIXTURES};
use serde_json::{json, Value};

fn inspect_json(name: &str) -> Value {
    serde_json::from_str(&ok(&["inspect", fixture(name).to_str().unwrap(), "--json"]))
        .expect("one JSON object")
}

fn config(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
        .unwrap()
}

#[test]
fn scout_summary_matches_config() {
    let s = inspect_json("tiny-scout");
    let c = &config("tiny-scout")["text_config"];
    assert_eq!(s["architecture"], "Llama4ForConditionalGeneration");
    for (key, file_key) in [
        ("num_layers", "num_hidden_layers"),
        ("hidden_size", "hidden_size"),
        ("num_heads", "num_attention_heads"),
        ("num_kv_heads", "num_key_value_heads"),
        ("head_dim", "head_dim"),
        ("vocab_size", "vocab_size"),
        ("num_experts", "num_local_experts"),
        ("top_k", "num_experts_per_tok"),
        ("attention_chunk_size", "attention_chunk_size"),
        ("use_qk_norm", "use_qk_norm"),
        ("attn_scale", "attn_scale"),
    ] {
        assert_eq!(s[key], c[file_key], "{key}");
    }
    assert_eq!(s["floor_scale"].as_f64(), c["floor_scale"].as_f64());
    // Derived from interleave_moe_layer_step 1 and the default NoPE interval 4 (the file has `no_rope_layers: []`).
    assert_eq!(s["moe_layers"], json!([0, 1, 2, 3]));
    assert_eq!(s["nope_layers"], json!([3]));
    assert_eq!(c["attn_temperature_tuning"], 4);
    assert_eq!(s["attn_temperature_tuning"], true);
    let rope = &c["rope_scaling"];
    assert_eq!(
        s["rope"],
        json!({"type": "llama3", "theta": c["rope_theta"], "factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
               "high_freq_factor": rope["high_freq_factor"],
               "original_max_position_embeddings": rope["original_max_position_embeddings"].as_f64()})
    );
    assert_eq!(s["has_vision"], true);
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-scout").join("model.safetensors.index.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(s["total_params"], index["metadata"]["total_parameters"]);
    // Active: everything but the (experts - top_k) idle experts of each MoE layer.
    let idle = 3 * 64 * 64 * (4 - 1) * 4;
    assert_eq!(
        s["active_params"].as_u64().unwrap(),
        s["text_params"].as_u64().unwrap() - idle
    );
}

#[test]
fn maverick_summary_matches_config() {
    let s = inspect_json("tiny-maverick");
    let c = config("tiny-maverick");
    assert_eq!(s["architecture"], "Llama4ForCausalLM");
    assert_eq!(s["num_kv_heads"], 1);
    assert_eq!(s["moe_layers"], json!([1, 3]));
    assert_eq!(s["nope_layers"], json!([3]));
    assert_eq!(s["use_qk_norm"], false);
    assert_eq!(
        s["rope"],
        json!({"type": "default", "theta": c["rope_parameters"]["rope_theta"]})
    );
    assert_eq!(s["has_vision"], false);
    assert_eq!(s["vision_params"], 0);
    let weights = std::fs::read(fixture("tiny-maverick").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let total: usize = st
        .tensors()
        .iter()
        .map(|(_, t)| t.shape().iter().product::<usize>())
        .sum();
    assert_eq!(s["total_params"].as_u64().unwrap(), total as u64);
}

#[test]
fn ir_snapshots() {
    let graphs = FIXTURES
        .iter()
        .map(|name| (*name, "--ir", format!("{name}.imported.ir")))
        .chain([(
            "tiny-scout",
            "--vision-ir",
            "tiny-scout.vision.ir".to_string(),
        )]);
    for (name, flag, file) in graphs {
        let text = ok(&["inspect", fixture(name).to_str().unwrap(), flag]);
        common::check_snapshot(&file, &text, &format!("{name}: the IR"));
    }
}
