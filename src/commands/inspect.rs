//! `herd inspect MODEL_DIR`: a human summary of a checkpoint, `--json` for machines, `--ir` for the IR.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use herd_ir::config::RopeScaling;
use herd_ir::import::{import, Checkpoint};
use serde_json::json;

/// Arguments of `herd inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// A Hugging Face Llama 4 checkpoint folder (config.json + safetensors).
    pub model: PathBuf,
    /// Print one JSON object instead of the human summary.
    #[arg(long, conflicts_with = "ir")]
    pub json: bool,
    /// Print the imported graph IR (after verification).
    #[arg(long)]
    pub ir: bool,
    /// Print the vision graph IR (multimodal checkpoints).
    #[arg(long, conflicts_with_all = ["ir", "json"])]
    pub vision_ir: bool,
}

/// Runs the command.
pub fn run(args: &InspectArgs) -> Result<()> {
    if args.ir {
        let imported = import(&args.model)?;
        out!("{}", herd_ir::print::print(&imported.graph));
        return Ok(());
    }
    // The full import also validates every tensor against the config, so inspect reports bad checkpoints.
    let imported = import(&args.model)?;
    if imported.checkpoint.config.vision.is_some() {
        let vision = herd_ir::vision::build_vision_graph(&imported.checkpoint)?;
        if args.vision_ir {
            out!("{}", herd_ir::print::print(&vision));
            return Ok(());
        }
    } else if args.vision_ir {
        anyhow::bail!(
            "{}: the checkpoint has no vision tower",
            args.model.display()
        );
    }
    let summary = summarize(&imported.checkpoint);
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_human(&imported.checkpoint, &summary)?;
    }
    Ok(())
}

fn summarize(ckpt: &Checkpoint) -> serde_json::Value {
    let c = &ckpt.config;
    let counts = ckpt.param_counts();
    let rope = match &c.rope.scaling {
        RopeScaling::Default => json!({ "type": "default", "theta": c.rope.theta }),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => json!({
            "type": "llama3",
            "theta": c.rope.theta,
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    };
    json!({
        "architecture": c.architecture.hf_name(),
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "intermediate_size_mlp": c.intermediate_size_mlp,
        "num_heads": c.num_heads,
        "num_kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "num_experts": c.num_experts,
        "top_k": c.top_k,
        "moe_layers": c.moe_layers,
        "nope_layers": c.nope_layers(),
        "attention_chunk_size": c.attention_chunk_size,
        "rope": rope,
        "use_qk_norm": c.use_qk_norm,
        "attn_temperature_tuning": c.attn_temperature_tuning,
        "floor_scale": c.floor_scale,
        "attn_scale": c.attn_scale,
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "total_params": counts.total,
        "text_params": counts.text,
        "vision_params": counts.vision,
        "active_params": counts.active,
        "has_vision": counts.vision > 0,
        "vision_tensors": ckpt.vision_tensors().len(),
        "vision": c.vision,
        "shards": ckpt.store.shards().len(),
    })
}

fn print_human(ckpt: &Checkpoint, s: &serde_json::Value) -> Result<()> {
    let c = &ckpt.config;
    outln!("{} ({})", ckpt.dir.display(), c.architecture.hf_name());
    outln!(
        "  decoder: {} layers, hidden {}, {} heads / {} kv heads x {}, vocab {}",
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size
    );
    outln!(
        "  feed-forward: {} MoE layers {:?} ({} experts, top-{}, width {}); dense MLP width {}",
        c.moe_layers.len(),
        c.moe_layers,
        c.num_experts,
        c.top_k,
        c.intermediate_size,
        c.intermediate_size_mlp
    );
    outln!(
        "  attention: NoPE layers {:?}, chunk {}, QK norm {}, temperature tuning {} (floor_scale {}, attn_scale {})",
        c.nope_layers(),
        c.attention_chunk_size
            .map_or("none".to_string(), |c| c.to_string()),
        c.use_qk_norm,
        c.attn_temperature_tuning,
        c.floor_scale,
        c.attn_scale
    );
    outln!("  rope: {}", s["rope"]);
    outln!(
        "  parameters: {} total ({} text, {} vision), {} active per token",
        human(s["total_params"].as_u64().unwrap_or(0)),
        human(s["text_params"].as_u64().unwrap_or(0)),
        human(s["vision_params"].as_u64().unwrap_or(0)),
        human(s["active_params"].as_u64().unwrap_or(0)),
    );
    outln!("  weights: {} shard(s)", s["shards"]);
    if let Some(v) = &c.vision {
        outln!(
            "  vision: {} layers, hidden {}, {} heads; {}px tiles of {}px patches -> {} tokens per tile; patch token {}; {} tensors",
            v.num_layers,
            v.hidden_size,
            v.num_heads,
            v.image_size,
            v.patch_size,
            v.tokens_per_tile(),
            v.patch_token_id,
            s["vision_tensors"]
        );
    }
    Ok(())
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
