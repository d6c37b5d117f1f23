//! `herd bench`: measurements of a bundle on this machine (load, prefill, decode, memory, the decode
//! roofline) and of compiling a checkpoint. JSON keys are stable so results can be compared across
//! commits.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use herd_runtime::{Model, RuntimeOptions};
use serde_json::{json, Value};

/// Measured read bandwidth of memory, bytes per second: all cores summing a buffer far larger than the
/// caches, best of five. Decoding streams weights in exactly this way.
pub fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    const WORDS: usize = 32 << 20; // 256 MiB
    let buffer: Vec<u64> = (0..WORDS as u64).collect();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        let sum: u64 = buffer
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
        best = best.min(start.elapsed().as_secs_f64());
    }
    (WORDS * 8) as f64 / best
}

fn best_of(
    runs: usize,
    mut f: impl FnMut() -> Result<(Duration, Duration)>,
) -> Result<(Duration, Duration)> {
    let mut best = (Duration::MAX, Duration::MAX);
    for _ in 0..runs {
        let (a, b) = f()?;
        best = (best.0.min(a), best.1.min(b));
    }
    Ok(best)
}

/// What decode a bundle benchmark times beside the default batches.
#[derive(Clone, Debug, Default)]
pub struct DecodeShape {
    /// Decode steps timed per measurement.
    pub steps: usize,
    /// Contexts at which batch 1 and 8 are timed.
    pub contexts: Vec<usize>,
    /// Micro-batches in flight at which decode is timed.
    pub micro_batches: Vec<usize>,
    pub micro_batch_rows: usize,
}

/// Median of three runs of `f`.
fn median3(mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut runs = [f()?, f()?, f()?];
    runs.sort_by(f64::total_cmp);
    Ok(runs[1])
}

/// Benchmarks a bundle.
pub fn bundle(path: &Path, options: &RuntimeOptions, shape: &DecodeShape) -> Result<Value> {
    let (decode_steps, contexts) = (shape.steps, &shape.contexts);
    let rss_before = crate::driver::current_rss_bytes();
    let start = Instant::now();
    let model = Model::load(path, options)?;
    let load = start.elapsed();
    let rss_after_load = crate::driver::current_rss_bytes();
    let m = model.bundle.manifest.clone();
    let max = m.model.max_positions;

    let mut prefill = serde_json::Map::new();
    for len in [16usize, 64, 256].into_iter().filter(|&l| l < max) {
        let (p, _) = best_of(3, || Ok(model.time_batch(1, len, 0)?))?;
        prefill.insert(len.to_string(), json!(len as f64 / p.as_secs_f64()));
    }
    let prompt = 16.min(max.saturating_sub(decode_steps + 1)).max(1);
    let mut decode = serde_json::Map::new();
    let mut ttft = None;
    for batch in [1usize, 4, 8] {
        let (p, d) = best_of(2, || Ok(model.time_batch(batch, prompt, decode_steps)?))?;
        if batch == 1 {
            ttft = Some(p.as_secs_f64() * 1e3);
        }
        decode.insert(
            batch.to_string(),
            json!((batch * decode_steps) as f64 / d.as_secs_f64()),
        );
    }
    // Decode after `c` cached positions (entries as allocated: a step's work does not depend on
    // them), median of 3, with the bytes that crossed the session boundary per step.
    let mut at_context = serde_json::Map::new();
    let mut moved = serde_json::Map::new();
    for &c in contexts {
        if c + decode_steps > max {
            anyhow::bail!(
                "--contexts {c} + --decode-steps {decode_steps} is more than the bundle's {max} positions"
            );
        }
        let (mut speed, mut bytes) = (serde_json::Map::new(), serde_json::Map::new());
        for batch in [1usize, 8] {
            let mut runs = Vec::new();
            for _ in 0..3 {
                let before = model.boundary_bytes();
                let d = model.time_decode_at(batch, c, decode_steps)?;
                let crossed = model.boundary_bytes() - before;
                runs.push((batch * decode_steps) as f64 / d.as_secs_f64());
                bytes.insert(
                    batch.to_string(),
                    json!(crossed / decode_steps.max(1) as u64),
                );
            }
            runs.sort_by(f64::total_cmp);
            speed.insert(batch.to_string(), json!(runs[1]));
        }
        at_context.insert(c.to_string(), Value::Object(speed));
        moved.insert(c.to_string(), Value::Object(bytes));
    }
    // Micro-batches in flight after the TTFT prompt's positions.
    let mut micro = serde_json::Map::new();
    for &groups in &shape.micro_batches {
        let rows = shape.micro_batch_rows;
        if prompt + decode_steps > max || groups == 0 || groups > 64 || rows == 0 {
            anyhow::bail!("--micro-batches {groups} x --micro-batch-rows {rows}: use 1 to 64 groups of at least one row, within the bundle's positions");
        }
        let speed = median3(|| {
            let d = model.time_micro_batches(groups, rows, prompt, decode_steps)?;
            Ok((groups * rows * decode_steps) as f64 / d.as_secs_f64())
        })?;
        micro.insert(groups.to_string(), json!(speed));
    }
    let vision = match &m.vision {
        Some(info) => Some(vision_bench(&model, info)?),
        None => None,
    };
    // Measured before the bandwidth test allocates its buffer.
    let peak_rss = crate::driver::peak_rss_bytes();
    let bandwidth = read_bandwidth();
    let active = m.model.active_weight_bytes_per_token as f64;
    let roofline = bandwidth / active;
    let decode1 = decode["1"].as_f64().unwrap_or(0.0);
    let element_bytes = m.dtype.bytes() as u64;
    let kv_per_token = m.model.num_layers as u64
        * 2
        * m.model.num_kv_heads as u64
        * m.model.head_dim as u64
        * element_bytes;
    Ok(json!({
        "bundle": path,
        "dtype": m.dtype,
        "moe_lowering": m.moe_lowering,
        "weight_bytes": m.model.weight_bytes,
        "load_seconds": load.as_secs_f64(),
        "rss_after_load_bytes": rss_after_load,
        "rss_growth_on_load_bytes": rss_after_load.zip(rss_before).map(|(a, b)| a.saturating_sub(b)),
        "prefill_tokens_per_s": prefill,
        "time_to_first_token_ms": ttft,
        "ttft_prompt_tokens": prompt,
        "decode_tokens_per_s": decode,
        "decode_tokens_per_s_at_context": at_context,
        "stages": model.stage_count(),
        "decode_tokens_per_s_micro_batches": micro,
        "micro_batch_rows": shape.micro_batch_rows,
        "kv_bytes_moved_per_step": moved,
        "decode_steps": decode_steps,
        "peak_rss_bytes": peak_rss,
        "prepack": options.prepack_for(&model.bundle),
        "int8_activations": options.int8_activations_for(&model.bundle),
        "kv_bytes_per_token": kv_per_token,
        "memory_bandwidth_bytes_per_s": bandwidth,
        "active_weight_bytes_per_token": m.model.active_weight_bytes_per_token,
        "decode_roofline_tokens_per_s": roofline,
        "decode_roofline_fraction": decode1 / roofline,
        "vision": vision,
    }))
}

/// Image throughput of a bundle with a vision encoder: encoding one tile and a 2x2 canvas (4 tiles and
/// the global one), and prefilling that image's prompt with its features.
fn vision_bench(model: &Model, info: &herd_runtime::manifest::VisionInfo) -> Result<Value> {
    use herd_runtime::vision::{image_prompt_tokens, ImageTiles};
    let tile = |rows: usize, cols: usize| {
        let tiles = rows * cols + usize::from(rows * cols > 1);
        ImageTiles {
            // Content does not change the work; a mid-grey image.
            pixels: vec![0.0; tiles * info.num_channels * info.tile_size * info.tile_size],
            tiles,
            rows,
            cols,
        }
    };
    let time = |image: &ImageTiles| -> Result<f64> {
        let mut best = f64::MAX;
        for _ in 0..2 {
            let start = Instant::now();
            std::hint::black_box(model.encode_images(std::slice::from_ref(image))?);
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let single = tile(1, 1);
    let canvas = tile(2, 2);
    let one = time(&single)?;
    let five = time(&canvas)?;
    let features = model.encode_images(std::slice::from_ref(&canvas))?;
    let mut ids = image_prompt_tokens(&canvas, info);
    ids.extend([1, 2, 3, 4]);
    let mut prefill = f64::MAX;
    if ids.len() <= model.bundle.manifest.model.max_positions {
        for _ in 0..2 {
            let mut session = model.session()?;
            let start = Instant::now();
            session.feed_with_images(&ids, &features)?;
            prefill = prefill.min(start.elapsed().as_secs_f64());
        }
    }
    Ok(json!({
        "tile_size": info.tile_size,
        "tokens_per_tile": info.tokens_per_tile,
        "encode_one_tile_ms": one * 1e3,
        "encode_2x2_canvas_ms": five * 1e3,
        "encode_tiles_per_s": canvas.tiles as f64 / five,
        "image_prompt_tokens": ids.len(),
        "image_prompt_prefill_tokens_per_s": (prefill < f64::MAX).then(|| ids.len() as f64 / prefill),
    }))
}

/// The checkpoint's weight files: the shards its `model.safetensors.index.json` names, or
/// `model.safetensors` (other `.safetensors` files in the folder are not the model's).
pub fn checkpoint_shards(model: &Path) -> Result<Vec<std::path::PathBuf>> {
    let index = model.join("model.safetensors.index.json");
    if !index.is_file() {
        return Ok(vec![model.join("model.safetensors")]);
    }
    let text = std::fs::read_to_string(&index).with_context(|| index.display().to_string())?;
    let map = herd_ir::parse_index(&index.display().to_string(), &text)?;
    let shards: std::collections::BTreeSet<&String> = map.values().collect();
    Ok(shards.into_iter().map(|s| model.join(s)).collect())
}

/// What a plain copy of the checkpoint costs on this machine: every shard of `model` copied into
/// `dir` (on the output's file system) and synced to disk, as `cp` + `sync` would. Returns (bytes,
/// seconds). The copies are removed afterwards.
pub fn copy_with_sync(model: &Path, dir: &Path) -> Result<(u64, f64)> {
    let files = checkpoint_shards(model)?;
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let mut total = 0u64;
    let start = Instant::now();
    for f in &files {
        let name = f.file_name().context("a shard without a file name")?;
        let to = dir.join(name);
        total += std::fs::copy(f, &to).with_context(|| format!("copying {}", f.display()))?;
        std::fs::File::open(&to)
            .and_then(|file| file.sync_all())
            .with_context(|| to.display().to_string())?;
    }
    let seconds = start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir).with_context(|| dir.display().to_string())?;
    Ok((total, seconds))
}

/// Reads every weight file of `model` once, sequentially; returns (bytes, seconds).
pub fn sequential_read(model: &Path) -> Result<(u64, f64)> {
    let files = checkpoint_shards(model)?;
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0u64;
    let start = Instant::now();
    for f in files {
        let mut file = std::fs::File::open(&f).with_context(|| f.display().to_string())?;
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| f.display().to_string())?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok((total, start.elapsed().as_secs_f64()))
}
