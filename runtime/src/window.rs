//! Calibration windows: a bundle of some decoder layers only ([`Manifest::layer_window`]), run one
//! prompt at a time with the residual stream of the layers before it handed in, so a compiler can
//! calibrate a model a few layers at a time without ever holding all of it.
//!
//! [`Manifest::layer_window`]: crate::manifest::Manifest::layer_window

use crate::decode::{RowInput, StageOutput};
use crate::error::RuntimeError;
use crate::model::{float_value, float_values, visit_outputs, Model, ProbeVisitor};

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
                Some(rows) => Some(float_value(
                    m.dtype,
                    vec![1, n, h],
                    &rows[done * h..(done + n) * h],
                )?),
                None => None,
            };
            let layers = cache.layers.iter_mut().collect();
            let output =
                self.run_stage(stage, &call, layers, hidden_in, names, &mut |outputs| {
                    visit_outputs(outputs, names, visit)
                })?;
            if let (StageOutput::Hidden(value), Some(out)) = (output, out.as_mut()) {
                let rows = float_values(m.dtype, &value)?;
                if rows.len() != n * h {
                    return Err(RuntimeError::bug(
                        "probe_window",
                        format!("{} residual values for {n} tokens", rows.len()),
                    ));
                }
                out.extend_from_slice(&rows);
            }
            done += n;
        }
        Ok(out)
    }
}
