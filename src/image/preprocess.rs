//! Preprocessing: resize the shorter side, centre crop, normalise to a CHW f32 tensor; batches
//! decoded in parallel with one result per input.

use std::borrow::Cow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use ::image::RgbImage;
use ::image::imageops::FilterType;
use ndarray::{Array3, Array4, Axis};
use rayon::prelude::*;

use super::decode::{Limits, decode_file_for, decode_for};
use super::resize::resize_triangle;
use crate::{Error, Result};

/// ImageNet channel means (RGB), on the 0..1 scale.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB), on the 0..1 scale.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The resampling filter: triangle (bilinear) with its support widened by the scale factor
/// when shrinking, i.e. antialiased — the same weights as PIL's `BILINEAR` resize, which is
/// what torchvision's `Resize` applies to PIL images, so tensors match a PyTorch pipeline's.
/// [`to_tensor`] and the training views compute it with [`resize_triangle`] (the same result).
pub const FILTER: FilterType = FilterType::Triangle;

/// How an image becomes a model input: `size` x `size`, normalised per channel.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Preprocess {
    /// Output side in pixels.
    pub size: u32,
    /// Per-channel mean subtracted after scaling to 0..1 (RGB).
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after the mean (RGB).
    pub std: [f32; 3],
}

impl Default for Preprocess {
    /// 64 pixels, ImageNet mean and standard deviation.
    fn default() -> Self {
        Preprocess { size: 64, mean: IMAGENET_MEAN, std: IMAGENET_STD }
    }
}

impl Preprocess {
    /// Checks that the size is positive and every standard deviation finite and non-zero.
    pub fn validate(&self) -> Result<()> {
        if self.size == 0 {
            return Err(Error::InvalidArgument { name: "size", reason: "must be at least 1".into() });
        }
        if self.mean.iter().chain(&self.std).any(|v| !v.is_finite()) || self.std.contains(&0.0) {
            return Err(Error::InvalidArgument {
                name: "mean/std",
                reason: format!("must be finite with non-zero std, got {:?} / {:?}", self.mean, self.std),
            });
        }
        Ok(())
    }
}

/// An image as a `[3, size, size]` tensor: the shorter side resized to `size` (aspect kept,
/// longer side `floor(size * long / short)` as torchvision does, [`FILTER`]), a centred
/// `size` x `size` crop (offset `(len - size) / 2` rounded half to even, as torchvision's
/// `CenterCrop`), then `(x / 255 - mean) / std` per channel, channel-major.
///
/// An image with no pixels gives an all-zero tensor (the mean colour).
pub fn to_tensor(img: &RgbImage, p: &Preprocess) -> Array3<f32> {
    let size = p.size;
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 || size == 0 {
        return Array3::zeros((3, size as usize, size as usize));
    }
    let (rw, rh) = shorter_side_to(w, h, size);
    let resized = if (rw, rh) == (w, h) { Cow::Borrowed(img) } else { Cow::Owned(resize_triangle(img, rw, rh)) };
    let (left, top) = (centre_offset(rw, size), centre_offset(rh, size));
    normalised_chw(&resized, left, top, size, p)
}

/// Dimensions after scaling the shorter side to `size`, the longer one truncated.
pub(crate) fn shorter_side_to(w: u32, h: u32, size: u32) -> (u32, u32) {
    let scale = |long: u32, short: u32| (u64::from(size) * u64::from(long) / u64::from(short)) as u32;
    if w <= h { (size, scale(h, w)) } else { (scale(w, h), size) }
}

/// Offset of a centred window of `window` pixels in `len` (`len >= window`), half to even.
pub(crate) fn centre_offset(len: u32, window: u32) -> u32 {
    (f64::from(len - window) / 2.0).round_ties_even() as u32
}

/// The `size` x `size` window at (`left`, `top`) of `img` as `[3, size, size]` values on the
/// 0..1 scale (no normalisation).
pub(crate) fn unit_chw(img: &RgbImage, left: u32, top: u32, size: u32) -> Array3<f32> {
    let s = size as usize;
    let mut out = Array3::zeros((3, s, s));
    for y in 0..s {
        for x in 0..s {
            let px = img.get_pixel(left + x as u32, top + y as u32);
            for c in 0..3 {
                out[[c, y, x]] = f32::from(px[c]) / 255.0;
            }
        }
    }
    out
}

/// `(x - mean) / std` per channel of a `[3, H, W]` tensor on the 0..1 scale.
pub(crate) fn normalise(t: &mut Array3<f32>, p: &Preprocess) {
    for (c, mut plane) in t.axis_iter_mut(Axis(0)).enumerate() {
        let (mean, std) = (p.mean[c], p.std[c]);
        plane.mapv_inplace(|v| (v - mean) / std);
    }
}

/// [`unit_chw`] then [`normalise`] in one pass over the rows: each channel's 256 possible
/// values are computed once, with the same f32 operations (`(v / 255 - mean) / std`), so the
/// result is the two-step one bit for bit.
fn normalised_chw(img: &RgbImage, left: u32, top: u32, size: u32, p: &Preprocess) -> Array3<f32> {
    let table: [[f32; 256]; 3] =
        std::array::from_fn(|c| std::array::from_fn(|v| (v as f32 / 255.0 - p.mean[c]) / p.std[c]));
    let s = size as usize;
    let (w, raw) = (img.width() as usize, img.as_raw());
    let mut out = vec![0f32; 3 * s * s];
    let (r, rest) = out.split_at_mut(s * s);
    let (g, b) = rest.split_at_mut(s * s);
    for y in 0..s {
        let start = ((top as usize + y) * w + left as usize) * 3;
        let row = &raw[start..start + 3 * s];
        let (r, g, b) = (&mut r[y * s..(y + 1) * s], &mut g[y * s..(y + 1) * s], &mut b[y * s..(y + 1) * s]);
        for (x, px) in row.chunks_exact(3).enumerate() {
            r[x] = table[0][px[0] as usize];
            g[x] = table[1][px[1] as usize];
            b[x] = table[2][px[2] as usize];
        }
    }
    Array3::from_shape_vec((3, s, s), out).expect("3 planes of size x size")
}

/// Decodes one image and preprocesses it: the model-input path of serving, indexing, evaluation
/// and calibration ([`decode_for`] at the model's size, so a large JPEG is decoded reduced when
/// `limits` allow it).
pub fn tensor_from_bytes(bytes: &[u8], p: &Preprocess, limits: &Limits) -> Result<Array3<f32>> {
    decode_for(bytes, limits, p.size).map(|img| to_tensor(&img, p))
}

/// Decodes the images in parallel (rayon); slot `i` holds item `i`'s tensor or its own error.
/// A bad image never fails the batch nor panics.
pub fn batch_from_bytes(items: &[&[u8]], p: &Preprocess, limits: &Limits) -> Vec<Result<Array3<f32>>> {
    items.par_iter().map(|bytes| guarded(|| tensor_from_bytes(bytes, p, limits))).collect()
}

/// As [`batch_from_bytes`], reading each file ([`decode_file_for`]).
pub fn batch_from_files(paths: &[PathBuf], p: &Preprocess, limits: &Limits) -> Vec<Result<Array3<f32>>> {
    paths
        .par_iter()
        .map(|path| guarded(|| decode_file_for(path, limits, p.size).map(|img| to_tensor(&img, p))))
        .collect()
}

/// Runs one item's work, turning a panic into that item's error.
fn guarded(work: impl FnOnce() -> Result<Array3<f32>>) -> Result<Array3<f32>> {
    catch_unwind(AssertUnwindSafe(work))
        .unwrap_or_else(|_| Err(Error::ImageDecode { reason: "preprocessing panicked".into() }))
}

/// Stacks `[3, H, W]` tensors into one `[N, 3, H, W]` batch (NCHW). An empty slice gives a
/// `[0, 0, 0, 0]` array.
///
/// # Panics
/// If the tensors differ in shape (they come from one [`Preprocess`], so they never should).
pub fn stack(tensors: &[Array3<f32>]) -> Array4<f32> {
    if tensors.is_empty() {
        return Array4::zeros((0, 0, 0, 0));
    }
    let views: Vec<_> = tensors.iter().map(|t| t.view()).collect();
    ndarray::stack(Axis(0), &views).expect("stack: all tensors must have the same shape")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::test_images::noise;
    use ::image::{DynamicImage, ImageFormat, Rgb};

    /// f64 reference: crop at (left, top), x/255, (x - mean)/std, CHW.
    fn reference(img: &RgbImage, left: u32, top: u32, size: u32, p: &Preprocess) -> Vec<f64> {
        let mut out = Vec::new();
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    let v = f64::from(img.get_pixel(left + x, top + y)[c]) / 255.0;
                    out.push((v - f64::from(p.mean[c])) / f64::from(p.std[c]));
                }
            }
        }
        out
    }

    fn assert_close(got: &Array3<f32>, want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((f64::from(*g) - w).abs() <= tol, "element {i}: {g} vs {w}");
        }
    }

    #[test]
    fn one_pass_normalisation_equals_the_two_steps_bit_for_bit() {
        let img = noise(37, 29);
        let p = Preprocess { size: 21, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };
        for (left, top) in [(0, 0), (16, 8), (5, 3)] {
            let mut want = unit_chw(&img, left, top, 21);
            normalise(&mut want, &p);
            let got = normalised_chw(&img, left, top, 21, &p);
            assert!(got.iter().zip(want.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "at ({left}, {top})");
        }
    }

    #[test]
    fn crop_and_normalise_without_resize() {
        let p = Preprocess { size: 16, ..Preprocess::default() };
        // Tall: shorter side already 16, crop rows (24-16)/2 = 4.. ; wide odd margins: (21-16)/2
        // = 2.5 rounds half to even = 2; (23-16)/2 = 3.5 -> 4.
        for (w, h, left, top) in [(16, 24, 0, 4), (21, 16, 2, 0), (23, 16, 4, 0), (16, 16, 0, 0)] {
            let img = noise(w, h);
            let t = to_tensor(&img, &p);
            assert_eq!(t.shape(), &[3, 16, 16]);
            assert_close(&t, &reference(&img, left, top, 16, &p), 1e-5);
        }
    }

    #[test]
    fn channel_order_is_rgb_planes() {
        let img = RgbImage::from_pixel(8, 8, Rgb([10, 120, 250]));
        let p = Preprocess { size: 8, mean: [0.0; 3], std: [1.0; 3] };
        let t = to_tensor(&img, &p);
        for (c, v) in [10.0f32, 120.0, 250.0].iter().enumerate() {
            assert!(t.index_axis(Axis(0), c).iter().all(|x| (x - v / 255.0).abs() < 1e-6), "channel {c}");
        }
        // A pixel's position is [c, y, x]: mark one pixel and find it.
        let mut marked = RgbImage::from_pixel(8, 8, Rgb([0, 0, 0]));
        marked.put_pixel(5, 2, Rgb([0, 255, 0]));
        let t = to_tensor(&marked, &p);
        assert_eq!(t[[1, 2, 5]], 1.0);
        assert_eq!(t.sum(), 1.0);
    }

    #[test]
    fn constant_colour_survives_resizing() {
        let p = Preprocess::default();
        for (w, h) in [(200, 100), (30, 90), (28, 28), (64, 65)] {
            let img = RgbImage::from_pixel(w, h, Rgb([37, 180, 222]));
            let t = to_tensor(&img, &p);
            assert_eq!(t.shape(), &[3, 64, 64]);
            for (c, v) in [37.0f64, 180.0, 222.0].into_iter().enumerate() {
                let want = (v / 255.0 - f64::from(p.mean[c])) / f64::from(p.std[c]);
                assert!(t.index_axis(Axis(0), c).iter().all(|x| (f64::from(*x) - want).abs() < 1e-5), "{w}x{h} c{c}");
            }
        }
    }

    #[test]
    fn downsampling_by_two_uses_antialiased_triangle_weights() {
        // A 16x16 image of constant 2x2 blocks, halved to 8x8. Output pixel i sits between
        // source pixels 2i and 2i+1; the triangle kernel stretched by 2 gives source pixels
        // 2i-1, 2i, 2i+1, 2i+2 the weights 1/8, 3/8, 3/8, 1/8 per axis (renormalised where
        // they fall off the edge). Per axis over blocks: 1/8 prev + 6/8 own + 1/8 next.
        let blocks = |bx: u32, by: u32| (bx * 37 + by * 91 + bx * by * 13) % 256;
        let img = RgbImage::from_fn(16, 16, |x, y| {
            let v = blocks(x / 2, y / 2) as u8;
            Rgb([v, 255 - v, v / 2])
        });
        let taps = |i: i64| -> Vec<(i64, f64)> {
            let raw = [(i - 1, 1.0), (i, 6.0), (i + 1, 1.0)];
            let kept: Vec<_> = raw.into_iter().filter(|(b, _)| (0..8).contains(b)).collect();
            let total: f64 = kept.iter().map(|(_, w)| w).sum();
            kept.into_iter().map(|(b, w)| (b, w / total)).collect()
        };
        let p = Preprocess { size: 8, mean: [0.0; 3], std: [1.0; 3] };
        let t = to_tensor(&img, &p);
        for oy in 0..8i64 {
            for ox in 0..8i64 {
                let mut v = 0.0;
                for (by, wy) in taps(oy) {
                    for (bx, wx) in taps(ox) {
                        v += wy * wx * f64::from(blocks(bx as u32, by as u32));
                    }
                }
                // The resize rounds to u8: allow half a level plus float slack.
                let got = f64::from(t[[0, oy as usize, ox as usize]]) * 255.0;
                assert!((got - v).abs() <= 0.5 + 1e-3, "({ox},{oy}): {got} vs {v}");
                let got_g = f64::from(t[[1, oy as usize, ox as usize]]) * 255.0;
                assert!((got_g - (255.0 - v)).abs() <= 0.5 + 1e-3, "green ({ox},{oy})");
            }
        }
    }

    #[test]
    fn shorter_side_and_crop_geometry() {
        assert_eq!(shorter_side_to(200, 100, 64), (128, 64));
        assert_eq!(shorter_side_to(100, 300, 64), (64, 192));
        assert_eq!(shorter_side_to(100, 150, 64), (64, 96));
        assert_eq!(shorter_side_to(99, 100, 64), (64, 64)); // floor(64 * 100 / 99) = 64
        assert_eq!(shorter_side_to(7, 10, 64), (64, 91)); // floor(91.43)
        assert_eq!((centre_offset(64, 64), centre_offset(65, 64), centre_offset(67, 64)), (0, 0, 2));
        assert_eq!(centre_offset(91, 64), 14); // 13.5 -> 14
    }

    #[test]
    fn wide_image_keeps_its_centre() {
        // 96x32 -> 192x64 (x2 upscale); the centre 64 columns of the resized image come from
        // the source's centre 32 columns: left third red, middle green, right blue.
        let img = RgbImage::from_fn(96, 32, |x, _| match x / 32 {
            0 => Rgb([255, 0, 0]),
            1 => Rgb([0, 255, 0]),
            _ => Rgb([0, 0, 255]),
        });
        let p = Preprocess { size: 64, mean: [0.0; 3], std: [1.0; 3] };
        let t = to_tensor(&img, &p);
        // Away from the crop borders the window is pure green.
        for y in 0..64 {
            for x in 4..60 {
                assert!(t[[1, y, x]] > 0.99 && t[[0, y, x]] < 0.01 && t[[2, y, x]] < 0.01, "({x},{y})");
            }
        }
    }

    fn png(img: &RgbImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(img.clone()).write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn batch_keeps_per_item_errors_in_place() {
        let p = Preprocess { size: 8, ..Preprocess::default() };
        let good_a = png(&noise(12, 8));
        let good_b = png(&noise(8, 8));
        let items: Vec<&[u8]> = vec![&good_a, b"", b"GIF89a....", &good_b, &good_a[..good_a.len() / 2]];
        let out = batch_from_bytes(&items, &p, &Limits::default());
        assert_eq!(out.len(), 5);
        assert_close(out[0].as_ref().unwrap(), &reference(&noise(12, 8), 2, 0, 8, &p), 1e-5);
        assert!(matches!(out[1], Err(Error::ImageDecode { .. })));
        assert!(matches!(out[2], Err(Error::UnsupportedImageFormat { .. })));
        assert_close(out[3].as_ref().unwrap(), &reference(&noise(8, 8), 0, 0, 8, &p), 1e-5);
        assert!(matches!(out[4], Err(Error::ImageDecode { .. })));

        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = ["a.png", "missing.png", "b.png"].iter().map(|n| dir.path().join(n)).collect();
        std::fs::write(&paths[0], &good_a).unwrap();
        std::fs::write(&paths[2], b"not an image").unwrap();
        let out = batch_from_files(&paths, &p, &Limits::default());
        assert!(out[0].is_ok());
        assert!(matches!(out[1], Err(Error::Io { .. })));
        assert!(matches!(out[2], Err(Error::UnsupportedImageFormat { .. })));
    }

    #[test]
    fn stack_is_nchw() {
        let p = Preprocess { size: 4, mean: [0.0; 3], std: [1.0; 3] };
        let a = to_tensor(&RgbImage::from_pixel(4, 4, Rgb([255, 0, 0])), &p);
        let b = to_tensor(&RgbImage::from_pixel(4, 4, Rgb([0, 0, 255])), &p);
        let batch = stack(&[a, b]);
        assert_eq!(batch.shape(), &[2, 3, 4, 4]);
        assert_eq!((batch[[0, 0, 3, 3]], batch[[0, 2, 0, 0]]), (1.0, 0.0));
        assert_eq!((batch[[1, 0, 1, 2]], batch[[1, 2, 2, 1]]), (0.0, 1.0));
        assert_eq!(stack(&[]).shape(), &[0, 0, 0, 0]);
    }

    #[test]
    fn validate_rejects_bad_settings() {
        assert!(Preprocess::default().validate().is_ok());
        assert!(Preprocess { size: 0, ..Preprocess::default() }.validate().is_err());
        assert!(Preprocess { std: [0.2, 0.0, 0.2], ..Preprocess::default() }.validate().is_err());
        assert!(Preprocess { mean: [f32::NAN, 0.0, 0.0], ..Preprocess::default() }.validate().is_err());
    }
}
