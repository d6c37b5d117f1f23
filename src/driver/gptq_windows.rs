//! GPTQ's calibration a window of decoder layers at a time. Each window is compiled as a float
//! calibration bundle of its layers only, exposing its projections' inputs; the prompts run through it
//! with the residual stream the previous window handed on (the float model's: this is GPTQ without its
//! sequential mode), the window's inputs are spooled, its matrices quantized from them, and its bundle
//! and spool deleted before the next window is compiled.
//!
//! Disk: one window's float weights, its spooled inputs (prompt tokens x the widths of its exposed
//! inputs) and two residual streams (prompt tokens x hidden); never the whole float model or every
//! layer's activations.

use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use herd_ir::DType;
use herd_passes::calibrate::Exposed;

use super::decoder::StageSplit;
use super::gptq::Calibration;
use super::spool::{ResidualReader, Residuals, Spool};
use super::CompileOptions;

/// The windows of `per_window` layers (the last may be shorter) covering `0..num_layers`.
pub(super) fn windows(num_layers: usize, per_window: usize) -> Vec<Range<usize>> {
    let per_window = per_window.max(1);
    (0..num_layers)
        .step_by(per_window)
        .map(|start| start..(start + per_window).min(num_layers))
        .collect()
}

/// Runs the calibration prompts through `options.model` window by window (in `work`, a directory of
/// its own that is removed afterwards) and calls `quantize` with each window's spooled inputs.
/// Returns the number of prompts and of their tokens.
pub(super) fn calibrate(
    options: &CompileOptions,
    config: &herd_ir::Llama4Config,
    work: &Path,
    progress: &indicatif::MultiProgress,
    mut quantize: impl FnMut(&Calibration) -> Result<()>,
) -> Result<(usize, usize)> {
    std::fs::create_dir_all(work).with_context(|| {
        format!(
            "{}: cannot create GPTQ's calibration folder",
            work.display()
        )
    })?;
    let prompts = match &options.calibration_prompts {
        Some(p) => p.clone(),
        None => crate::eval::prompts(Some(&options.model), config.vocab_size, options.max_context)?,
    };
    let tokens: usize = prompts.iter().map(Vec::len).sum();
    let windows = windows(config.num_layers, options.calibration_window_layers);
    let bar = progress.add(super::gptq::progress_bar(
        windows.len() * prompts.len(),
        "calibration (windows x prompts)",
    ));
    let mut carried: Option<ResidualReader> = None;
    for (index, window) in windows.iter().enumerate() {
        tracing::info!(
            "GPTQ: layers {}..{} of {}: compiling their float calibration window",
            window.start,
            window.end,
            config.num_layers
        );
        let bundle =
            compile_window(options, window.clone(), &work.join("window")).with_context(|| {
                format!(
                    "GPTQ: compiling the float calibration window of layers {}..{}",
                    window.start, window.end
                )
            })?;
        let model =
            herd_runtime::Model::load(&bundle.dir, &herd_runtime::RuntimeOptions::default())?;
        let spool_dir = work.join("spool");
        let mut spool = Spool::create(spool_dir.clone())?;
        let mut next = if window.end < config.num_layers {
            Some(Residuals::create(
                work.join(format!("residual-{index}.f32")),
                config.hidden_size,
            )?)
        } else {
            None
        };
        for (i, prompt) in prompts.iter().enumerate() {
            let hidden_in = match &mut carried {
                Some(reader) => Some(reader.next(prompt.len())?),
                None => None,
            };
            let hidden_out = model
                .probe_window(
                    prompt,
                    hidden_in.as_deref(),
                    &bundle.outputs,
                    &mut |name, shape, values| {
                        spool
                            .append(name, shape.last().copied().unwrap_or(0), values)
                            .map_err(|e| herd_runtime::RuntimeError::Visitor(format!("{e:#}")))
                    },
                )
                .with_context(|| {
                    format!(
                        "GPTQ calibration prompt {} of {} in layers {}..{}",
                        i + 1,
                        prompts.len(),
                        window.start,
                        window.end
                    )
                })?;
            if let Some(next) = &mut next {
                next.append(
                    &hidden_out
                        .context("herd bug: a calibration window handed on no residual stream")?,
                )?;
            }
            bar.inc(1);
        }
        spool.finish()?;
        for name in &bundle.outputs {
            let rows = spool.rows(name);
            if rows != tokens {
                bail!("herd bug: calibration output {name} holds {rows} rows for {tokens} prompt tokens");
            }
        }
        drop(model);
        // The next window is compiled to the same path: a leftover would stop it.
        std::fs::remove_dir_all(&bundle.dir).with_context(|| {
            format!(
                "{}: cannot remove the calibration window",
                bundle.dir.display()
            )
        })?;
        quantize(&Calibration { spool })?;
        std::fs::remove_dir_all(&spool_dir).with_context(|| {
            format!(
                "{}: cannot remove the calibration spool",
                spool_dir.display()
            )
        })?;
        carried = next.map(Residuals::finish).transpose()?;
    }
    bar.finish_and_clear();
    std::fs::remove_dir_all(work).ok();
    Ok((prompts.len(), tokens))
}

/// A compiled calibration window: its bundle and the exposures it outputs.
struct WindowBundle {
    dir: std::path::PathBuf,
    outputs: Vec<String>,
}

/// Compiles layers `window` of `options.model` in float, exposing every projection's input, to `dir`.
fn compile_window(
    options: &CompileOptions,
    window: Range<usize>,
    dir: &Path,
) -> Result<WindowBundle> {
    let calibration = CompileOptions {
        moe: options.moe,
        max_context: options.max_context,
        // ONNX Runtime's CPU kernels run f32 and f16, not bf16.
        dtype: match options.dtype {
            DType::BF16 => DType::F16,
            d => d,
        },
        expose_calibration: Some(Exposed::AllInputs),
        vision: false,
        stages: StageSplit::Window(window),
        ..CompileOptions::new(options.model.clone(), dir.to_path_buf())
    };
    let report = super::compile(&calibration, &mut |_, _| {})?;
    Ok(WindowBundle {
        dir: report.bundle,
        outputs: report.calibration_outputs,
    })
}

#[cfg(test)]
mod tests {
    use super::windows;

    #[test]
    fn windows_cover_every_layer_once() {
        assert_eq!(windows(5, 2), vec![0..2, 2..4, 4..5]);
        assert_eq!(windows(4, 1), vec![0..1, 1..2, 2..3, 3..4]);
        assert_eq!(windows(3, 8), vec![0..3]);
        assert_eq!(windows(3, 0), vec![0..1, 1..2, 2..3]);
    }
}
