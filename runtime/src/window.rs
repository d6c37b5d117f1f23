//! Calibration windows: a bundle of some decoder layers only ([`Manifest::layer_window`]), run one
//! prompt at a time with the residual stream of the layers before it handed in, so a compiler can
//! calibrate a model a few layers at a time without ever holding all of it.
//!
//! [`Manifest::layer_window`]: crate::manifest::Manifest::layer_window

use ort::value::{DynValue, Tensor};

use crate::decode::{RowInput, StageOutput};
use crate::error::RuntimeError;
use crate::manifest::ElementType;
use crate::model::{Model, ProbeVisitor};

impl Model {
    /// Runs `ids` (one sequence from position 0) through a calibration window. `hidden` is the
    /// residual stream after the layer before the window, [ids.len(), hidden_size] rows; None for a
    /// window starting at layer 0, which takes the token ids. Hands `visit` the extra outputs `names`
    /// of each call, as [`Model::probe`] does, and returns the residual stream after the window's last
    /// layer (same rows), or None for a window ending at the last layer (which returns logits).
    pub fn probe_window(
        &self,
        ids: &[i64],
        hidden: Option<&[f32]>,
        names: &[String],
        visit: &mut ProbeVisitor<'_>,
    ) -> Result<Option<Vec<f32>>, RuntimeError> {
        let m = &self.bundle.manifest;
        let (Some(window), [stage]) = (&m.layer_window, self.stages.as_slice()) else {
            return Err(RuntimeError::Unsupported(
                "probe_window runs calibration windows (bundles of some layers only)".into(),
            ));
        };
        let h = m.model.hidden_size;
        match (hidden, &stage.io.hidden_in) {
            (Some(rows), Some(_)) if Some(rows.len()) == ids.len().checked_mul(h) => {}
            (None, None) => {}
            _ => {
                return Err(RuntimeError::Call(format!(
                    "layers {}..{}: the residual stream comes in as [{}, {h}] rows exactly when the window does not start at layer 0",
                    window.start,
                    window.end,
                    ids.len()
                )))
            }
        }
        let mut cache = self.new_cache(1, ids.len().max(1))?;
        let per_call = crate::session::max_tokens_per_call(m)
            .unwrap_or(usize::MAX)
            .max(1);
        let mut out = stage
            .io
            .hidden_out
            .as_ref()
            .map(|_| Vec::with_capacity(ids.len() * h));
        let mut done = 0;
        while done < ids.len() {
            let n = (ids.len() - done).min(per_call).min(cache.room(done));
            if n == 0 {
                return Err(RuntimeError::TooLong {
                    len: ids.len(),
                    max: cache.context(),
                });
            }
            let row = RowInput {
                slot: 0,
                start: done,
                ids: &ids[done..done + n],
                features: &[],
            };
            let call = self.prepare_call(&cache, &[row], false)?;
            let hidden_in = match hidden {
                Some(rows) => Some(hidden_value(
                    m.dtype,
                    vec![1, n, h],
                    &rows[done * h..(done + n) * h],
                )?),
                None => None,
            };
            let layers = cache.layers.iter_mut().collect();
            let output =
                self.run_stage(stage, &call, layers, hidden_in, names, &mut |outputs| {
                    for name in names {
                        let value = outputs.get(name).ok_or_else(|| {
                            RuntimeError::bug("probe_window", format!("no {name} output"))
                        })?;
                        let (shape, data) = value.try_extract_tensor::<f32>()?;
                        let shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
                        visit(name, &shape, data)?;
                    }
                    Ok(())
                })?;
            if let (StageOutput::Hidden(value), Some(out)) = (output, out.as_mut()) {
                let before = out.len();
                extend_f32(out, m.dtype, &value)?;
                if out.len() - before != n * h {
                    return Err(RuntimeError::bug(
                        "probe_window",
                        format!("{} residual values for {n} tokens", out.len() - before),
                    ));
                }
            }
            done += n;
        }
        Ok(out)
    }
}

/// Rows of f32 as a tensor of the bundle's activation type.
fn hidden_value(
    element: ElementType,
    shape: Vec<usize>,
    values: &[f32],
) -> Result<DynValue, RuntimeError> {
    Ok(match element {
        ElementType::F32 => Tensor::<f32>::from_array((shape, values.to_vec()))?.into_dyn(),
        ElementType::F16 => Tensor::<half::f16>::from_array((
            shape,
            values
                .iter()
                .map(|&v| half::f16::from_f32(v))
                .collect::<Vec<_>>(),
        ))?
        .into_dyn(),
        ElementType::Bf16 => Tensor::<half::bf16>::from_array((
            shape,
            values
                .iter()
                .map(|&v| half::bf16::from_f32(v))
                .collect::<Vec<_>>(),
        ))?
        .into_dyn(),
    })
}

/// Appends a tensor of the bundle's activation type to `out` as f32.
fn extend_f32(
    out: &mut Vec<f32>,
    element: ElementType,
    value: &DynValue,
) -> Result<(), RuntimeError> {
    match element {
        ElementType::F32 => out.extend_from_slice(value.try_extract_tensor::<f32>()?.1),
        ElementType::F16 => out.extend(
            value
                .try_extract_tensor::<half::f16>()?
                .1
                .iter()
                .map(|v| v.to_f32()),
        ),
        ElementType::Bf16 => out.extend(
            value
                .try_extract_tensor::<half::bf16>()?
                .1
                .iter()
                .map(|v| v.to_f32()),
        ),
    }
    Ok(())
}
