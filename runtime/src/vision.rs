//! Image preprocessing for early fusion, as transformers' `Llama4ImageProcessorFast` does it: decode,
//! pick the best canvas of up to `max_tiles` tiles, resize without distortion (antialiased bilinear on
//! 8-bit pixels, the integer kernel torch runs on AVX2/AVX512 CPUs), pad right/bottom with black, rescale
//! and normalise in bf16, split into row-major tiles, and append a global tile when there are several.
//! Also the image's prompt tokens (`<|image_start|>` ... `<|image_end|>`).

use std::path::Path;

use image::RgbImage;

use crate::error::RuntimeError;
use crate::manifest::VisionInfo;

/// Largest accepted image side in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// Largest accepted image area in pixels (40 MP: an 8K frame is 33 MP).
pub const MAX_IMAGE_PIXELS: u64 = 40 << 20;
/// The largest image file herd reads (a 40-megapixel JPEG or PNG is well under it).
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;

/// Where an image comes from.
#[derive(Clone, Debug)]
pub enum ImageSource {
    /// A PNG or JPEG file.
    Path(std::path::PathBuf),
    /// PNG or JPEG bytes, with a label for error messages.
    Bytes { label: String, data: Vec<u8> },
}

impl ImageSource {
    /// How errors name the image.
    pub fn label(&self) -> String {
        match self {
            ImageSource::Path(p) => p.display().to_string(),
            ImageSource::Bytes { label, .. } => label.clone(),
        }
    }
}

/// One preprocessed image: its tiles and canvas.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageTiles {
    /// [tiles, channels, tile, tile] row-major, normalised (bf16 values held as f32).
    pub pixels: Vec<f32>,
    /// Number of tiles, the global tile included.
    pub tiles: usize,
    /// Canvas rows and columns of tiles.
    pub rows: usize,
    pub cols: usize,
}

/// Whether JPEG `data` ends with the end-of-image marker FF D9 (trailing zero padding allowed).
fn ends_with_jpeg_eoi(data: &[u8]) -> bool {
    let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    data[..end].ends_with(&[0xFF, 0xD9])
}

/// Decodes a PNG or JPEG into RGB, refusing non-files, empty, zero-sized, oversized, truncated and
/// corrupt images; decoding allocates at most 8 bytes per pixel of [`MAX_IMAGE_PIXELS`].
pub fn load_image(source: &ImageSource) -> Result<RgbImage, RuntimeError> {
    let label = source.label();
    let bad = |message: String| RuntimeError::Image {
        path: label.clone(),
        message,
    };
    let data = match source {
        ImageSource::Path(p) => {
            // A FIFO or device would block or never end: only regular files of a bounded size.
            let meta =
                std::fs::metadata(p).map_err(|e| bad(format!("cannot read the file: {e}")))?;
            if !meta.is_file() {
                return Err(bad("is not a regular file".into()));
            }
            if meta.len() > MAX_IMAGE_FILE_BYTES {
                return Err(bad(format!(
                    "the file is {} bytes; herd reads images of at most {MAX_IMAGE_FILE_BYTES} bytes",
                    meta.len()
                )));
            }
            std::fs::read(p).map_err(|e| bad(format!("cannot read the file: {e}")))?
        }
        ImageSource::Bytes { data, .. } => data.clone(),
    };
    if data.is_empty() {
        return Err(bad("the file is empty".into()));
    }
    if data.len() as u64 > MAX_IMAGE_FILE_BYTES {
        return Err(bad(format!(
            "the image is {} bytes; herd reads images of at most {MAX_IMAGE_FILE_BYTES} bytes",
            data.len()
        )));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(&data))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    let format = reader
        .format()
        .ok_or_else(|| bad("not a PNG or JPEG image (unrecognised header)".into()))?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(bad(format!(
            "is {format:?}; herd reads PNG and JPEG images"
        )));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| bad(format!("cannot read the image header: {e}")))?;
    if w == 0 || h == 0 {
        return Err(bad(format!("the image is {w}x{h} pixels (empty)")));
    }
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
        return Err(bad(format!(
            "the image is {w}x{h} pixels; herd accepts at most {MAX_IMAGE_SIDE} per side and {MAX_IMAGE_PIXELS} pixels: downscale it first"
        )));
    }
    if format == image::ImageFormat::Jpeg && !ends_with_jpeg_eoi(&data) {
        // JPEG decoders fill a truncated scan with grey instead of failing.
        return Err(bad(
            "corrupt or truncated image: the JPEG data does not end with its end-of-image marker"
                .into(),
        ));
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(&data), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8);
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|e| bad(format!("corrupt or truncated image: {e}")))?;
    // Like PIL's convert("RGB"): alpha is dropped, grey is replicated; 16-bit samples keep their high
    // byte, as PIL unpacks them.
    Ok(match decoded {
        image::DynamicImage::ImageRgb16(_)
        | image::DynamicImage::ImageRgba16(_)
        | image::DynamicImage::ImageLuma16(_)
        | image::DynamicImage::ImageLumaA16(_) => {
            let wide = decoded.to_rgb16();
            RgbImage::from_fn(wide.width(), wide.height(), |x, y| {
                let p = wide.get_pixel(x, y).0;
                image::Rgb([(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            })
        }
        other => other.to_rgb8(),
    })
}

/// Allowed canvases (height, width) in tiles, in the order transformers' `find_supported_resolutions`
/// lists them (the order decides ties).
fn supported_canvases(max_tiles: usize) -> Vec<(usize, usize)> {
    // Group (rows, cols) factorizations by aspect ratio in first-seen order, from max_tiles down to 1.
    let mut groups: Vec<(f64, Vec<(usize, usize)>)> = Vec::new();
    for n in (1..=max_tiles).rev() {
        let mut factors: Vec<usize> = (1..=n).filter(|d| n % d == 0).collect();
        factors.sort_unstable();
        for f in factors {
            let (h, w) = (f, n / f);
            let ratio = h as f64 / w as f64;
            match groups.iter_mut().find(|(r, _)| *r == ratio) {
                Some((_, list)) => list.push((h, w)),
                None => groups.push((ratio, vec![(h, w)])),
            }
        }
    }
    groups.into_iter().flat_map(|(_, list)| list).collect()
}

/// transformers' `get_best_fit`: the canvas (pixels) needing the least upscaling, else the least
/// downscaling, smallest area among equals.
fn best_canvas(height: usize, width: usize, tile: usize, max_tiles: usize) -> (usize, usize) {
    let canvases: Vec<(usize, usize)> = supported_canvases(max_tiles.max(1))
        .into_iter()
        .map(|(h, w)| (h * tile, w * tile))
        .collect();
    // torch computes these in f32 (the resolutions tensor is int64, divided by a Python int).
    let scales: Vec<f32> = canvases
        .iter()
        .map(|&(h, w)| {
            let sw = w as f32 / width as f32;
            let sh = h as f32 / height as f32;
            if sh > sw {
                sw
            } else {
                sh
            }
        })
        .collect();
    let up = scales
        .iter()
        .copied()
        .filter(|&s| s >= 1.0)
        .fold(None, |m: Option<f32>, s| Some(m.map_or(s, |m| m.min(s))));
    let chosen = up.unwrap_or_else(|| scales.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let mut best: Option<(usize, usize)> = None;
    for (i, &c) in canvases.iter().enumerate() {
        if scales[i] == chosen && best.is_none_or(|b| c.0 * c.1 < b.0 * b.1) {
            best = Some(c);
        }
    }
    best.expect("the chosen scale comes from a canvas")
}

/// transformers' `get_max_res_without_distortion`: the largest (height, width) inside the target with the
/// image's aspect ratio (Python floats are f64).
fn fit_without_distortion(height: usize, width: usize, target: (usize, usize)) -> (usize, usize) {
    let (th, tw) = target;
    let scale_w = tw as f64 / width as f64;
    let scale_h = th as f64 / height as f64;
    if scale_w < scale_h {
        (((height as f64 * scale_w).floor() as usize).min(th), tw)
    } else {
        (th, ((width as f64 * scale_h).floor() as usize).min(tw))
    }
}

/// Preprocesses one image into tiles for the vision graph (`info` from a loaded bundle, whose vision
/// section is validated on load).
pub fn preprocess(img: &RgbImage, info: &VisionInfo) -> ImageTiles {
    let tile = info.tile_size;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let canvas = best_canvas(height, width, tile, info.max_tiles);
    // Never upscale beyond what one tile needs (resize_to_max_canvas=False).
    let limit = (
        height.max(tile).min(canvas.0),
        width.max(tile).min(canvas.1),
    );
    let (new_h, new_w) = fit_without_distortion(height, width, limit);
    let (new_h, new_w) = (new_h.max(1), new_w.max(1));
    let resized = resize_rgb8(img.as_raw(), height, width, new_h, new_w);
    let (rows, cols) = (canvas.0 / tile, canvas.1 / tile);
    let mut canvas_pixels = vec![0u8; canvas.0 * canvas.1 * 3];
    for y in 0..new_h {
        let src = &resized[y * new_w * 3..(y + 1) * new_w * 3];
        canvas_pixels[y * canvas.1 * 3..y * canvas.1 * 3 + new_w * 3].copy_from_slice(src);
    }
    let normalised = normalise(&canvas_pixels, info);
    let tiles = rows * cols + usize::from(rows * cols > 1);
    let plane = tile * tile;
    let mut pixels = Vec::with_capacity(tiles * 3 * plane);
    for r in 0..rows {
        for c in 0..cols {
            for ch in 0..3 {
                for y in 0..tile {
                    let row = (r * tile + y) * canvas.1 + c * tile;
                    pixels.extend((0..tile).map(|x| normalised[(row + x) * 3 + ch]));
                }
            }
        }
    }
    if rows * cols > 1 {
        let global = resize_rgb8(img.as_raw(), height, width, tile, tile);
        let g = normalise(&global, info);
        for ch in 0..3 {
            pixels.extend((0..plane).map(|i| g[i * 3 + ch]));
        }
    }
    ImageTiles {
        pixels,
        tiles,
        rows,
        cols,
    }
}

/// `x * rescale` then `(x - mean) / std`, each result rounded to bf16 as transformers computes it
/// (its fast processor casts the 8-bit pixels to bf16 first). Interleaved RGB in, interleaved out.
fn normalise(rgb: &[u8], info: &VisionInfo) -> Vec<f32> {
    let factor = info.rescale_factor as f32;
    let bf = |v: f32| half::bf16::from_f32(v);
    rgb.iter()
        .enumerate()
        .map(|(i, &p)| {
            let c = i % 3;
            let mean = bf(info.image_mean[c]).to_f32();
            let std = bf(info.image_std[c]).to_f32();
            let x = bf(p as f32 * factor).to_f32();
            let x = bf(x - mean).to_f32();
            bf(x / std).to_f32()
        })
        .collect()
}

/// Precomputed taps of one resize axis: for each output index the first input index and int16 weights.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
    precision: u32,
}

/// Antialiased bilinear (triangle filter widened by the downscale factor) weights, quantised to int16
/// with the largest precision that keeps every weight below 2^15, as torch's uint8 kernel does.
fn taps(input: usize, output: usize) -> Taps {
    let scale = input as f64 / output as f64;
    let support = if scale >= 1.0 { scale } else { 1.0 };
    let max_taps = support.ceil() as usize * 2 + 1;
    let inv = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut start = Vec::with_capacity(output);
    let mut float_weights = Vec::with_capacity(output);
    let mut max_weight = 0.0f64;
    for i in 0..output {
        let center = scale * (i as f64 + 0.5);
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(input as i64) as usize;
        let size = hi.saturating_sub(lo).min(max_taps);
        let mut w: Vec<f64> = (0..size)
            .map(|j| {
                let x = ((j + lo) as f64 - center + 0.5) * inv;
                (1.0 - x.abs()).max(0.0)
            })
            .collect();
        let total: f64 = w.iter().sum();
        if total != 0.0 {
            for v in &mut w {
                *v /= total;
                max_weight = max_weight.max(*v);
            }
        }
        start.push(lo);
        float_weights.push(w);
    }
    let mut precision = 0;
    while precision < 22 {
        let next = (0.5 + max_weight * (1u64 << (precision + 1)) as f64) as i64;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let weights = float_weights
        .into_iter()
        .map(|w| {
            w.into_iter()
                .map(|v| {
                    let v = v * (1u64 << precision) as f64;
                    if v < 0.0 {
                        (-0.5 + v) as i32
                    } else {
                        (0.5 + v) as i32
                    }
                })
                .collect()
        })
        .collect();
    Taps {
        start,
        weights,
        precision,
    }
}

/// One output pixel channel: the rounded, clamped fixed-point sum.
fn convolve(samples: impl Iterator<Item = (u8, i32)>, precision: u32) -> u8 {
    let sum = samples.fold(1i32 << (precision - 1), |acc, (p, w)| {
        acc + i32::from(p) * w
    });
    (sum >> precision).clamp(0, 255) as u8
}

/// Resizes interleaved RGB8 `height x width` to `out_h x out_w`: horizontal pass, then vertical, each
/// rounding to 8 bits, skipping a pass whose size does not change (torch's uint8 antialias kernel).
pub fn resize_rgb8(rgb: &[u8], height: usize, width: usize, out_h: usize, out_w: usize) -> Vec<u8> {
    let mut current = rgb.to_vec();
    if out_w != width {
        current = resample_axis(&current, height, width, 1, out_w);
    }
    if out_h != height {
        current = resample_axis(&current, 1, height, out_w, out_h);
    }
    current
}

/// One resize pass over RGB8 data laid out [outer, len, inner, 3]: `len` becomes `out_len`.
fn resample_axis(data: &[u8], outer: usize, len: usize, inner: usize, out_len: usize) -> Vec<u8> {
    let t = taps(len, out_len);
    let mut next = vec![0u8; outer * out_len * inner * 3];
    for o in 0..outer {
        for a in 0..out_len {
            for i in 0..inner {
                for c in 0..3 {
                    let samples = t.weights[a].iter().enumerate().map(|(k, &wt)| {
                        (data[((o * len + t.start[a] + k) * inner + i) * 3 + c], wt)
                    });
                    next[((o * out_len + a) * inner + i) * 3 + c] = convolve(samples, t.precision);
                }
            }
        }
    }
    next
}

/// The prompt tokens of one image: `<|image_start|>`, for several tiles each canvas row's tiles of
/// `<|patch|>` tokens joined by `<|tile_x_separator|>` and ended by `<|tile_y_separator|>`, then
/// `<|image|>`, the global (or only) tile's patches, and `<|image_end|>`.
pub fn image_prompt_tokens(tiles: &ImageTiles, info: &VisionInfo) -> Vec<i64> {
    let t = &info.tokens;
    let patches = std::iter::repeat_n(t.patch, info.tokens_per_tile);
    let mut ids = vec![t.image_start];
    if tiles.rows * tiles.cols > 1 {
        for _ in 0..tiles.rows {
            for c in 0..tiles.cols {
                ids.extend(patches.clone());
                if c + 1 < tiles.cols {
                    ids.push(t.tile_x_separator);
                }
            }
            ids.push(t.tile_y_separator);
        }
    }
    ids.push(t.image);
    ids.extend(patches);
    ids.push(t.image_end);
    ids
}

/// Replaces the `<|image|>` placeholders of `ids` by the images' token layouts, in order. Without
/// placeholders the images go first (after BOS when the prompt starts with it), as a chat turn whose
/// content lists the images before the text renders them.
pub fn expand_prompt(
    ids: &[i64],
    layouts: &[Vec<i64>],
    info: &VisionInfo,
    bos: Option<i64>,
) -> Result<Vec<i64>, RuntimeError> {
    let placeholder = info.tokens.image;
    let found = ids.iter().filter(|&&t| t == placeholder).count();
    if found == 0 {
        let skip = usize::from(bos.is_some() && ids.first() == bos.as_ref());
        let mut out = ids[..skip].to_vec();
        out.extend(layouts.iter().flatten());
        out.extend(&ids[skip..]);
        return Ok(out);
    }
    if found != layouts.len() {
        return Err(RuntimeError::ImageMismatch(format!(
            "the prompt has {found} <|image|> placeholders but {} images were given",
            layouts.len()
        )));
    }
    let mut next = layouts.iter();
    let mut out = Vec::with_capacity(ids.len() + layouts.iter().map(Vec::len).sum::<usize>());
    for &t in ids {
        if t == placeholder {
            out.extend(next.next().expect("counted"));
        } else {
            out.push(t);
        }
    }
    Ok(out)
}

/// Reads, checks and preprocesses `path` (a convenience for tools and tests).
pub fn preprocess_file(path: &Path, info: &VisionInfo) -> Result<ImageTiles, RuntimeError> {
    Ok(preprocess(
        &load_image(&ImageSource::Path(path.to_path_buf()))?,
        info,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canvases_follow_transformers_order() {
        // transformers' docstring example: max_num_chunks=4.
        let got: Vec<(usize, usize)> = supported_canvases(4);
        assert_eq!(
            got,
            vec![
                (1, 4),
                (2, 2),
                (1, 1),
                (4, 1),
                (1, 3),
                (3, 1),
                (1, 2),
                (2, 1)
            ]
        );
    }

    #[test]
    fn best_fit_matches_the_docstring() {
        // get_best_fit((200, 300), [224x672, 672x224, 224x448, 448x224, 224x224]) = 224x448; with
        // max 3 tiles the candidates include those.
        assert_eq!(best_canvas(200, 300, 224, 3), (224, 448));
        assert_eq!(fit_without_distortion(200, 300, (450, 200)), (133, 200));
        assert_eq!(fit_without_distortion(800, 600, (450, 1300)), (450, 337));
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(500, 224), (30, 56), (150, 56), (7, 3), (3, 7)] {
            let t = taps(i, o);
            for w in &t.weights {
                let sum: i32 = w.iter().sum();
                assert!(
                    (sum - (1 << t.precision)).abs() <= w.len() as i32,
                    "{i}->{o}: {sum}"
                );
            }
        }
    }
}
