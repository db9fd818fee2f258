//! Training augmentations: random resized crop, horizontal flip and colour jitter (brightness,
//! contrast, saturation), deterministic for a given seeded generator.
//!
//! Hue jitter is left out: the emoji and product images are told apart largely by colour, and
//! a hue shift changes a product's identity (a red and a blue mug are different variations).

use ::image::RgbImage;
use ::image::imageops;
use ndarray::{Array3, Axis, Zip};
use rand::Rng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::preprocess::{Preprocess, normalise, unit_chw};
use super::resize::resize_triangle;
use crate::{Error, Result};

/// Random augmentation settings (torchvision's `RandomResizedCrop`, `RandomHorizontalFlip`,
/// `ColorJitter` without hue, applied with probability `jitter_p` like `RandomApply`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Range of the crop's area as a fraction of the image's.
    pub scale: (f32, f32),
    /// Range of the crop's aspect ratio (width / height), sampled log-uniformly.
    pub ratio: (f32, f32),
    /// Probability of a horizontal flip.
    pub flip_p: f32,
    /// Brightness, contrast and saturation factors are uniform in `[max(0, 1-j), 1+j]`.
    pub jitter: f32,
    /// Probability that colour jitter is applied at all.
    pub jitter_p: f32,
}

impl Default for Augment {
    /// Scale (0.8, 1.0), ratio (3/4, 4/3), flip 0.5, jitter 0.4 with probability 0.8.
    fn default() -> Self {
        Augment { scale: (0.8, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0), flip_p: 0.5, jitter: 0.4, jitter_p: 0.8 }
    }
}

impl Augment {
    /// Checks the ranges: `0 < scale.0 <= scale.1`, `0 < ratio.0 <= ratio.1`, probabilities in
    /// 0..=1, `jitter >= 0`, all finite.
    pub fn validate(&self) -> Result<()> {
        let bad = |name, reason: &str| Err(Error::InvalidArgument { name, reason: reason.into() });
        let range_ok = |(lo, hi): (f32, f32)| lo.is_finite() && hi.is_finite() && 0.0 < lo && lo <= hi;
        let prob_ok = |p: f32| (0.0..=1.0).contains(&p);
        if !range_ok(self.scale) {
            return bad("scale", "must satisfy 0 < min <= max");
        }
        if !range_ok(self.ratio) {
            return bad("ratio", "must satisfy 0 < min <= max");
        }
        if !prob_ok(self.flip_p) || !prob_ok(self.jitter_p) {
            return bad("flip_p/jitter_p", "probabilities must lie in 0..=1");
        }
        if !(self.jitter.is_finite() && self.jitter >= 0.0) {
            return bad("jitter", "must be a finite value >= 0");
        }
        Ok(())
    }
}

/// A crop window in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// Samples a random resized crop's window, as torchvision's `RandomResizedCrop.get_params`:
/// up to 10 tries of area `uniform(scale) * w * h` and aspect `exp(uniform(ln ratio))`, sides
/// rounded half to even, accepted if the window fits; otherwise the largest centred window
/// whose aspect is clamped into `ratio`. `w` and `h` must be positive.
pub fn sample_crop(w: u32, h: u32, scale: (f32, f32), ratio: (f32, f32), rng: &mut ChaCha8Rng) -> CropBox {
    let (wf, hf) = (f64::from(w), f64::from(h));
    let area = wf * hf;
    let (log_lo, log_hi) = (f64::from(ratio.0).ln(), f64::from(ratio.1).ln());
    for _ in 0..10 {
        let target = area * uniform(rng, f64::from(scale.0), f64::from(scale.1));
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let cw = (target * aspect).sqrt().round_ties_even();
        let ch = (target / aspect).sqrt().round_ties_even();
        if 0.0 < cw && cw <= wf && 0.0 < ch && ch <= hf {
            let (cw, ch) = (cw as u32, ch as u32);
            let y = rng.random_range(0..=h - ch);
            let x = rng.random_range(0..=w - cw);
            return CropBox { x, y, width: cw, height: ch };
        }
    }
    // Fallback: centre crop with the aspect ratio clamped into range.
    let in_ratio = wf / hf;
    let (lo, hi) = (f64::from(ratio.0.min(ratio.1)), f64::from(ratio.0.max(ratio.1)));
    let (cw, ch) = if in_ratio < lo {
        (w, ((wf / lo).round_ties_even() as u32).clamp(1, h))
    } else if in_ratio > hi {
        (((hf * hi).round_ties_even() as u32).clamp(1, w), h)
    } else {
        (w, h)
    };
    CropBox { x: (w - cw) / 2, y: (h - ch) / 2, width: cw, height: ch }
}

/// `lo + (hi - lo) * u`, `u` uniform in [0, 1): never panics on an empty or reversed range.
fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// One training view: random resized crop to `size` x `size` ([`sample_crop`], resampled
/// with the preprocessing filter), horizontal flip with `flip_p`, colour jitter with
/// `jitter_p` (brightness, contrast, saturation in a random order; no hue), then the same
/// normalisation as [`super::to_tensor`]. Deterministic for a given generator state.
///
/// An image with no pixels gives an all-zero tensor.
pub fn augment(img: &RgbImage, a: &Augment, p: &Preprocess, rng: &mut ChaCha8Rng) -> Array3<f32> {
    let size = p.size;
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 || size == 0 {
        return Array3::zeros((3, size as usize, size as usize));
    }
    let b = sample_crop(w, h, a.scale, a.ratio, rng);
    let crop = imageops::crop_imm(img, b.x, b.y, b.width, b.height);
    let mut view = if (b.width, b.height) == (size, size) {
        crop.to_image()
    } else {
        resize_triangle(&crop.to_image(), size, size)
    };
    if rng.random::<f32>() < a.flip_p {
        imageops::flip_horizontal_in_place(&mut view);
    }
    let mut t = unit_chw(&view, 0, 0, size);
    if rng.random::<f32>() < a.jitter_p {
        colour_jitter(&mut t, a.jitter, rng);
    }
    normalise(&mut t, p);
    t
}

/// A colour adjustment of [`colour_jitter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Adjust {
    Brightness,
    Contrast,
    Saturation,
}

/// Draws the three factors (brightness, contrast, saturation, in that order), then a random
/// order, and applies them to a `[3, H, W]` tensor on the 0..1 scale.
fn colour_jitter(t: &mut Array3<f32>, jitter: f32, rng: &mut ChaCha8Rng) {
    let (lo, hi) = (f64::from((1.0 - jitter).max(0.0)), f64::from(1.0 + jitter));
    let factors: [f32; 3] = std::array::from_fn(|_| uniform(rng, lo, hi) as f32);
    let mut order =
        [(Adjust::Brightness, factors[0]), (Adjust::Contrast, factors[1]), (Adjust::Saturation, factors[2])];
    order.shuffle(rng);
    for (adjust, f) in order {
        match adjust {
            Adjust::Brightness => brightness(t, f),
            Adjust::Contrast => contrast(t, f),
            Adjust::Saturation => saturation(t, f),
        }
    }
}

/// ITU-R 601 luma weights as rounded by torchvision's `rgb_to_grayscale`.
const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];

/// `clamp(f * x)`.
fn brightness(t: &mut Array3<f32>, f: f32) {
    t.mapv_inplace(|v| (f * v).clamp(0.0, 1.0));
}

/// `clamp(f * x + (1 - f) * m)` with `m` the mean luma of the whole image.
fn contrast(t: &mut Array3<f32>, f: f32) {
    let luma = luma(t);
    let mean = luma.mean().unwrap_or(0.0);
    t.mapv_inplace(|v| (f * v + (1.0 - f) * mean).clamp(0.0, 1.0));
}

/// `clamp(f * x + (1 - f) * luma(x))` per pixel.
fn saturation(t: &mut Array3<f32>, f: f32) {
    let luma = luma(t);
    for mut plane in t.axis_iter_mut(Axis(0)) {
        Zip::from(&mut plane).and(&luma).for_each(|v, &g| *v = (f * *v + (1.0 - f) * g).clamp(0.0, 1.0));
    }
}

fn luma(t: &Array3<f32>) -> ndarray::Array2<f32> {
    let mut g = t.index_axis(Axis(0), 0).mapv(|v| LUMA[0] * v);
    g.zip_mut_with(&t.index_axis(Axis(0), 1), |g, &v| *g += LUMA[1] * v);
    g.zip_mut_with(&t.index_axis(Axis(0), 2), |g, &v| *g += LUMA[2] * v);
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::test_images::noise;
    use rand::SeedableRng;

    use crate::image::to_tensor;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn same_seed_same_views_different_seed_different() {
        let img = noise(50, 40);
        let (a, p) = (Augment::default(), Preprocess { size: 16, ..Preprocess::default() });
        let run = |seed| -> Vec<Array3<f32>> {
            let mut r = rng(seed);
            (0..4).map(|_| augment(&img, &a, &p, &mut r)).collect()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // Successive views from one generator differ too.
        let views = run(7);
        assert_ne!(views[0], views[1]);
    }

    #[test]
    fn crop_box_respects_scale_and_ratio() {
        let (w, h) = (120u32, 90u32);
        let (scale, ratio) = ((0.3f32, 0.5f32), (0.75f32, 1.3333f32));
        let mut r = rng(1);
        let (mut min_frac, mut max_frac) = (f64::MAX, 0.0f64);
        for _ in 0..2000 {
            let b = sample_crop(w, h, scale, ratio, &mut r);
            assert!(b.x + b.width <= w && b.y + b.height <= h, "{b:?}");
            let (cw, ch) = (f64::from(b.width), f64::from(b.height));
            // Rounding each side moves the area by at most half a pixel per side.
            let slack = 0.5 * (cw + ch) + 0.25;
            let area = cw * ch;
            let total = f64::from(w * h);
            assert!(area >= 0.3 * total - slack && area <= 0.5 * total + slack, "{b:?}: area {area}");
            let aspect_slack = 0.5 / ch + 0.5 * cw / (ch * ch) + 1e-9;
            assert!(cw / ch >= 0.75 - 2.0 * aspect_slack && cw / ch <= 1.3333 + 2.0 * aspect_slack, "{b:?}");
            min_frac = min_frac.min(area / total);
            max_frac = max_frac.max(area / total);
        }
        // The whole range is used, not just part of it.
        assert!(min_frac < 0.32 && max_frac > 0.48, "{min_frac} .. {max_frac}");
    }

    #[test]
    fn crop_box_positions_cover_the_image() {
        let mut r = rng(2);
        let boxes: Vec<CropBox> = (0..500).map(|_| sample_crop(100, 100, (0.1, 0.1), (1.0, 1.0), &mut r)).collect();
        // 10% of 10000 = 1000 -> sqrt = 31.62 -> 32 pixels a side, anywhere in 0..=68.
        assert!(boxes.iter().all(|b| b.width == 32 && b.height == 32));
        assert!(boxes.iter().any(|b| b.x < 5) && boxes.iter().any(|b| b.x > 63));
        assert!(boxes.iter().any(|b| b.y < 5) && boxes.iter().any(|b| b.y > 63));
    }

    #[test]
    fn impossible_crop_falls_back_to_centre() {
        let mut r = rng(3);
        // Area over 100% never fits: a centred crop, aspect clamped into range.
        assert_eq!(
            sample_crop(60, 40, (2.0, 3.0), (0.75, 4.0 / 3.0), &mut r),
            CropBox { x: 3, y: 0, width: 53, height: 40 }
        );
        assert_eq!(
            sample_crop(40, 60, (2.0, 3.0), (0.75, 4.0 / 3.0), &mut r),
            CropBox { x: 0, y: 3, width: 40, height: 53 }
        );
        assert_eq!(
            sample_crop(50, 40, (2.0, 3.0), (0.75, 4.0 / 3.0), &mut r),
            CropBox { x: 0, y: 0, width: 50, height: 40 }
        );
    }

    #[test]
    fn full_crop_without_flip_or_jitter_is_to_tensor() {
        let img = noise(16, 16);
        let p = Preprocess { size: 16, ..Preprocess::default() };
        let a = Augment { scale: (1.0, 1.0), ratio: (1.0, 1.0), flip_p: 0.0, jitter: 0.4, jitter_p: 0.0 };
        assert_eq!(augment(&img, &a, &p, &mut rng(4)), to_tensor(&img, &p));
    }

    #[test]
    fn flip_mirrors_columns() {
        let img = noise(16, 16);
        let p = Preprocess { size: 16, ..Preprocess::default() };
        let a = Augment { scale: (1.0, 1.0), ratio: (1.0, 1.0), flip_p: 1.0, jitter: 0.0, jitter_p: 0.0 };
        let flipped = augment(&img, &a, &p, &mut rng(5));
        let plain = to_tensor(&img, &p);
        for c in 0..3 {
            for y in 0..16 {
                for x in 0..16 {
                    assert_eq!(flipped[[c, y, x]], plain[[c, y, 15 - x]], "({c},{y},{x})");
                }
            }
        }
        assert_ne!(flipped, plain);
    }

    #[test]
    fn flip_probability_is_honoured() {
        let img = noise(16, 16);
        let p = Preprocess { size: 16, ..Preprocess::default() };
        let a = Augment { scale: (1.0, 1.0), ratio: (1.0, 1.0), flip_p: 0.5, jitter: 0.0, jitter_p: 0.0 };
        let plain = to_tensor(&img, &p);
        let mut r = rng(6);
        let flips = (0..400).filter(|_| augment(&img, &a, &p, &mut r) != plain).count();
        assert!((150..250).contains(&flips), "{flips} flips in 400");
    }

    #[test]
    fn zero_jitter_is_identity() {
        let img = noise(16, 16);
        let p = Preprocess { size: 16, ..Preprocess::default() };
        let a = Augment { scale: (1.0, 1.0), ratio: (1.0, 1.0), flip_p: 0.0, jitter: 0.0, jitter_p: 1.0 };
        let got = augment(&img, &a, &p, &mut rng(9));
        let want = to_tensor(&img, &p);
        assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-5));
        // With jitter the colours do change.
        let a = Augment { jitter: 0.4, ..a };
        assert!(augment(&img, &a, &p, &mut rng(9)).iter().zip(&want).any(|(g, w)| (g - w).abs() > 1e-2));
    }

    /// f64 reference of the three adjustments on a `[3, H, W]` array given as nested Vecs.
    fn reference_adjust(t: &Array3<f32>, op: Adjust, f: f64) -> Vec<f64> {
        let (h, w) = (t.shape()[1], t.shape()[2]);
        let at = |c: usize, y: usize, x: usize| f64::from(t[[c, y, x]]);
        let gray = |y, x| 0.2989 * at(0, y, x) + 0.587 * at(1, y, x) + 0.114 * at(2, y, x);
        let mut mean = 0.0;
        for y in 0..h {
            for x in 0..w {
                mean += gray(y, x) / (h * w) as f64;
            }
        }
        let mut out = Vec::new();
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let v = at(c, y, x);
                    let r = match op {
                        Adjust::Brightness => f * v,
                        Adjust::Contrast => f * v + (1.0 - f) * mean,
                        Adjust::Saturation => f * v + (1.0 - f) * gray(y, x),
                    };
                    out.push(r.clamp(0.0, 1.0));
                }
            }
        }
        out
    }

    #[test]
    fn adjustments_match_f64_reference() {
        let t = unit_chw(&noise(9, 7), 0, 0, 7);
        for op in [Adjust::Brightness, Adjust::Contrast, Adjust::Saturation] {
            for f in [0.6f32, 1.0, 1.4] {
                let mut got = t.clone();
                match op {
                    Adjust::Brightness => brightness(&mut got, f),
                    Adjust::Contrast => contrast(&mut got, f),
                    Adjust::Saturation => saturation(&mut got, f),
                }
                let want = reference_adjust(&t, op, f64::from(f));
                for (g, w) in got.iter().zip(&want) {
                    assert!((f64::from(*g) - w).abs() < 1e-5, "{op:?} {f}: {g} vs {w}");
                }
            }
        }
        // Saturation 0 is greyscale: all channels equal the luma.
        let mut grey = t.clone();
        saturation(&mut grey, 0.0);
        assert!(grey.index_axis(Axis(0), 0).iter().zip(grey.index_axis(Axis(0), 2)).all(|(a, b)| (a - b).abs() < 1e-6));
    }

    #[test]
    fn validate_rejects_bad_ranges() {
        assert!(Augment::default().validate().is_ok());
        assert!(Augment { scale: (0.0, 1.0), ..Augment::default() }.validate().is_err());
        assert!(Augment { ratio: (2.0, 1.0), ..Augment::default() }.validate().is_err());
        assert!(Augment { flip_p: 1.5, ..Augment::default() }.validate().is_err());
        assert!(Augment { jitter: -0.1, ..Augment::default() }.validate().is_err());
    }
}
