//! The triangle (bilinear, antialiased when shrinking) resize of 8-bit RGB images, computing what
//! `image::imageops::resize(img, w, h, FilterType::Triangle)` computes, bit for bit, several
//! times faster: the same per-row and per-column weights (f32, normalised by their sum), the same
//! vertical-then-horizontal passes through an f32 buffer, the same accumulation order and the
//! same rounding (half away from zero after clamping to 0..255), but with the weights computed
//! once per output row / column, three channels instead of four, and no per-pixel bounds checks
//! or boxed kernel calls. `tests` hold it to the `image` crate on many sizes, up and down.

use ::image::RgbImage;

/// One output coordinate's taps: the first input index and the normalised weights.
struct Taps {
    first: usize,
    weights: Vec<f32>,
}

/// The taps of every output coordinate when `len` input samples become `new_len`, as the
/// `image` crate's `vertical_sample` / `horizontal_sample` compute them (triangle, support 1).
fn taps(len: u32, new_len: u32) -> Vec<Taps> {
    let ratio = len as f32 / new_len as f32;
    let sratio = if ratio < 1.0 { 1.0 } else { ratio };
    let support = sratio;
    (0..new_len)
        .map(|out| {
            let centre = (out as f32 + 0.5) * ratio;
            let left = ((centre - support).floor() as i64).clamp(0, i64::from(len) - 1);
            let right = ((centre + support).ceil() as i64).clamp(left + 1, i64::from(len));
            let centre = centre - 0.5;
            let mut weights: Vec<f32> = (left..right)
                .map(|i| {
                    let x = (i as f32 - centre) / sratio;
                    if x.abs() < 1.0 { 1.0 - x.abs() } else { 0.0 }
                })
                .collect();
            let mut sum = 0.0f32;
            for w in &weights {
                sum += *w;
            }
            for w in &mut weights {
                *w /= sum;
            }
            Taps { first: left as usize, weights }
        })
        .collect()
}

/// `round()` of a value already clamped to 0..=255, exactly (half away from zero), without a
/// libm call: the fractional part of a float is exact.
#[inline]
fn round_u8(v: f32) -> u8 {
    let whole = v as u32; // truncation; v >= 0
    let frac = v - whole as f32;
    (whole + u32::from(frac >= 0.5)) as u8
}

/// `img` resized to `new_w` x `new_h` with the triangle filter, equal to
/// `imageops::resize(img, new_w, new_h, FilterType::Triangle)`.
pub fn resize_triangle(img: &RgbImage, new_w: u32, new_h: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return RgbImage::new(new_w, new_h);
    }
    if (w, h) == (new_w, new_h) {
        return img.clone();
    }
    let (wu, nwu) = (w as usize, new_w as usize);
    let src = img.as_raw();
    // Vertical pass: new_h rows of w f32 RGB samples.
    let mut mid = vec![0f32; wu * 3 * new_h as usize];
    for (y, t) in taps(h, new_h).iter().enumerate() {
        let row = &mut mid[y * wu * 3..(y + 1) * wu * 3];
        for (k, wgt) in t.weights.iter().enumerate() {
            let input = &src[(t.first + k) * wu * 3..(t.first + k + 1) * wu * 3];
            for (acc, v) in row.iter_mut().zip(input) {
                *acc += f32::from(*v) * wgt;
            }
        }
    }
    // Horizontal pass: clamp, round.
    let mut out = vec![0u8; nwu * 3 * new_h as usize];
    let cols = taps(w, new_w);
    for (row_in, row_out) in mid.chunks_exact(wu * 3).zip(out.chunks_exact_mut(nwu * 3)) {
        for (t, px) in cols.iter().zip(row_out.chunks_exact_mut(3)) {
            let mut acc = [0f32; 3];
            for (k, wgt) in t.weights.iter().enumerate() {
                let s = &row_in[(t.first + k) * 3..(t.first + k) * 3 + 3];
                acc[0] += s[0] * wgt;
                acc[1] += s[1] * wgt;
                acc[2] += s[2] * wgt;
            }
            for c in 0..3 {
                px[c] = round_u8(acc[c].clamp(0.0, 255.0));
            }
        }
    }
    RgbImage::from_raw(new_w, new_h, out).expect("new_w x new_h RGB pixels")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::test_images::noise;
    use ::image::imageops::{self, FilterType};

    #[test]
    fn equals_the_image_crates_triangle_resize_bit_for_bit() {
        let sizes = [(1, 1), (7, 5), (64, 64), (72, 72), (160, 120), (37, 301), (500, 333)];
        let targets = [(1, 1), (3, 9), (64, 64), (128, 128), (128, 170), (170, 128), (224, 224), (31, 17), (72, 72)];
        for &(w, h) in &sizes {
            let img = noise(w, h);
            for &(nw, nh) in &targets {
                let want = imageops::resize(&img, nw, nh, FilterType::Triangle);
                assert_eq!(resize_triangle(&img, nw, nh), want, "{w}x{h} -> {nw}x{nh}");
            }
        }
    }

    #[test]
    fn rounding_is_half_away_from_zero() {
        for v in [0.0f32, 0.49999997, 0.5, 1.5, 2.5, 254.5, 254.49998, 255.0, 127.50001] {
            assert_eq!(round_u8(v), v.round() as u8, "{v}");
        }
    }
}
