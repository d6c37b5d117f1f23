//! Fast row-major copies of strided (permuted) views: the layout change every transposed weight needs.
//! A generic element-by-element walk is cache hostile for transposes; this copies contiguous runs when
//! the innermost axes agree and otherwise transposes in cache-sized tiles, in parallel over outer indices.

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use rayon::prelude::*;

const TILE: usize = 32;

/// The elements of `view` in row-major order of its shape.
pub fn row_major(view: ArrayViewD<'_, f32>) -> ArrayD<f32> {
    if view.is_standard_layout() {
        return view.to_owned();
    }
    let shape = view.shape().to_vec();
    let strides: Vec<isize> = view.strides().to_vec();
    let n = shape.len();
    let total: usize = shape.iter().product();
    let mut out = vec![0f32; total];
    // The output axis whose source stride is 1, if any (the source's innermost axis).
    let unit = (0..n).rev().find(|&a| strides[a] == 1 && shape[a] > 1);
    let last = n - 1;
    let plane: usize = match unit {
        Some(k) if k != last => shape[k..].iter().product(),
        _ => shape[last],
    };
    let base = view.as_ptr() as usize;
    out.par_chunks_mut(plane.max(1))
        .enumerate()
        .for_each(|(outer, chunk)| {
            let src = base as *const f32;
            match unit {
                Some(k) if k != last => {
                    // chunk = output axes k.. for one index of axes ..k: tile the (k, last) plane, the axes
                    // between them (if any) walked one by one. A 2-D transpose is one plane, so the
                    // plane's TILE-row bands are shared out too.
                    let mid: Vec<usize> = shape[k + 1..last].to_vec();
                    let mid_count: usize = mid.iter().product();
                    let (dk, dl) = (shape[k], shape[last]);
                    let start = offset(outer, &shape[..k], &strides[..k]);
                    let band = (TILE * mid_count * dl).max(1);
                    chunk
                        .par_chunks_mut(band)
                        .enumerate()
                        .for_each(|(b, rows)| {
                            let src = base as *const f32;
                            let i0 = b * TILE;
                            for m in 0..mid_count {
                                let mid_off = start + offset(m, &mid, &strides[k + 1..last]);
                                for j0 in (0..dl).step_by(TILE) {
                                    for i in i0..(i0 + TILE).min(dk) {
                                        let row =
                                            &mut rows[((i - i0) * mid_count + m) * dl..][..dl];
                                        for (j, v) in row
                                            .iter_mut()
                                            .enumerate()
                                            .take((j0 + TILE).min(dl))
                                            .skip(j0)
                                        {
                                            let s = mid_off
                                                + i as isize * strides[k]
                                                + j as isize * strides[last];
                                            // SAFETY: s indexes an element of `view`, whose data outlives this call.
                                            *v = unsafe { *src.offset(s) };
                                        }
                                    }
                                }
                            }
                        });
                }
                _ => {
                    let start = offset(outer, &shape[..last], &strides[..last]);
                    for (j, v) in chunk.iter_mut().enumerate() {
                        // SAFETY: as above.
                        *v = unsafe { *src.offset(start + j as isize * strides[last]) };
                    }
                }
            }
        });
    ArrayD::from_shape_vec(IxDyn(&shape), out).expect("sizes agree")
}

/// Element offset of the `flat`-th row-major index over `dims` with `strides`.
fn offset(mut flat: usize, dims: &[usize], strides: &[isize]) -> isize {
    let mut off = 0;
    for (&d, &s) in dims.iter().zip(strides).rev() {
        off += (flat % d) as isize * s;
        flat /= d;
    }
    off
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_ndarray_for_every_permutation() {
        let a = ArrayD::from_shape_vec(IxDyn(&[3, 5, 2, 7]), (0..210).map(|i| i as f32).collect())
            .unwrap();
        let perms: [[usize; 4]; 6] = [
            [0, 1, 2, 3],
            [0, 3, 2, 1],
            [3, 2, 1, 0],
            [1, 0, 3, 2],
            [0, 2, 3, 1],
            [2, 0, 1, 3],
        ];
        for perm in perms {
            let view = a.view().permuted_axes(IxDyn(&perm));
            assert_eq!(
                row_major(view.clone()),
                view.as_standard_layout().into_owned(),
                "{perm:?}"
            );
        }
        let wide = ArrayD::from_shape_vec(IxDyn(&[70, 45]), (0..3150).map(|i| i as f32).collect())
            .unwrap();
        let t = wide.view().reversed_axes();
        assert_eq!(row_major(t.clone()), t.as_standard_layout().into_owned());
        let sliced = wide.slice(ndarray::s![3..40, 5..9]).into_dyn();
        assert_eq!(row_major(sliced.clone()), sliced.to_owned());
    }
}
