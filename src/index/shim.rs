//! Temporary stand-ins for the `image` and `catalogue` APIs that are being merged (deleted then).
//!
//! Same names and signatures as the agreed API (`image::{Limits, decode, Preprocess, to_tensor,
//! stack}`, `catalogue::Manifest::read`), minimal behaviour.

use std::path::Path;

use ndarray::{Array3, Array4, Axis};

use crate::catalogue::Item;
use crate::{Error, Result};

/// Decoded RGB image.
pub type RgbImage = image::RgbImage;

/// Decoding limits.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    _stand_in: (),
}

/// Decodes image bytes into RGB.
pub fn decode(bytes: &[u8], _limits: &Limits) -> Result<RgbImage> {
    image::load_from_memory(bytes)
        .map(|i| i.to_rgb8())
        .map_err(|e| Error::InvalidArgument { name: "image", reason: e.to_string() })
}

/// Preprocessing: square size, per-channel mean and std (on 0..1 pixel values).
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Resizes to `size`×`size` and normalises into a CHW tensor.
pub fn to_tensor(img: &RgbImage, p: &Preprocess) -> Array3<f32> {
    let r = image::imageops::resize(img, p.size, p.size, image::imageops::FilterType::Triangle);
    let s = p.size as usize;
    Array3::from_shape_fn((3, s, s), |(c, y, x)| {
        (r.get_pixel(x as u32, y as u32).0[c] as f32 / 255.0 - p.mean[c]) / p.std[c]
    })
}

/// Stacks CHW tensors into NCHW.
pub fn stack(ts: &[Array3<f32>]) -> Array4<f32> {
    let views: Vec<_> = ts.iter().map(|t| t.view()).collect();
    ndarray::stack(Axis(0), &views).expect("same shapes")
}

/// Minimal manifest reader: JSON Lines of [`Item`].
pub fn read_manifest(path: &Path) -> Result<Vec<Item>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::InvalidArgument {
                name: "manifest",
                reason: format!("{}:{}: {e}", path.display(), i + 1),
            })
        })
        .collect()
}
