//! `herd synth`: write a synthetic Llama 4-shaped checkpoint (seeded random bf16) for benchmarks.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::synth::{preset, write, PRESETS};

/// Arguments of `herd synth`.
#[derive(Args)]
pub struct SynthArgs {
    /// Preset: scout-mini (~1.2 GB), scout-8gb (~8.1 GB), ci-small, ci-large.
    #[arg(long)]
    pub preset: String,
    /// Checkpoint folder to create.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Override the preset's number of layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Override the preset's number of routed experts.
    #[arg(long)]
    pub experts: Option<usize>,
    /// Override the preset's expert width.
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Override the preset's vocabulary size.
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Random seed of the weights.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Replace an existing folder.
    #[arg(long)]
    pub force: bool,
}

/// Runs the command.
pub fn run(args: &SynthArgs) -> Result<()> {
    let mut spec = preset(&args.preset)
        .ok_or_else(|| anyhow::anyhow!("unknown preset `{}`; presets: {PRESETS}", args.preset))?;
    spec.layers = args.layers.unwrap_or(spec.layers);
    spec.experts = args.experts.unwrap_or(spec.experts);
    spec.intermediate = args.intermediate.unwrap_or(spec.intermediate);
    spec.vocab = args.vocab.unwrap_or(spec.vocab);
    spec.seed = args.seed;
    if spec.vision_layers.is_some() && spec.vocab < 64 {
        anyhow::bail!("--vocab must be at least 64 for a preset with a vision tower (its image tokens sit at the top)");
    }
    if spec.layers == 0 || spec.experts == 0 || spec.intermediate == 0 || spec.vocab == 0 {
        anyhow::bail!("--layers, --experts, --intermediate and --vocab must be positive");
    }
    use herd_ir::config::limits;
    for (flag, value, max) in [
        ("--layers", spec.layers, limits::LAYERS),
        ("--experts", spec.experts, limits::EXPERTS),
        ("--intermediate", spec.intermediate, limits::FFN_WIDTH),
        ("--vocab", spec.vocab, limits::VOCAB),
    ] {
        anyhow::ensure!(
            value <= max,
            "{flag} {value}: herd compiles at most {max} (config.json limits)"
        );
    }
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template("writing shards [{bar:30}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec})").expect("valid template"));
    let start = std::time::Instant::now();
    let bytes = write(&spec, &args.output, args.force, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let bytes = bytes?;
    eprintln!(
        "wrote {} ({:.2} GB) in {:.1} s",
        args.output.display(),
        bytes as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
