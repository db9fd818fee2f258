//! Image decoding, preprocessing and training augmentations.
//!
//! [`decode`] turns untrusted bytes (PNG, JPEG, WebP) into 8-bit RGB under [`Limits`];
//! [`to_tensor`] makes a normalised `[3, size, size]` model input ([`Preprocess`]);
//! [`augment`] makes a random training view ([`Augment`]); [`batch_from_bytes`] /
//! [`batch_from_files`] do decode + preprocess in parallel with one result per item, and
//! [`stack`] builds the NCHW batch. Serving, indexing and evaluation should all go through
//! [`to_tensor`] with the model's [`Preprocess`], so that what is measured is what is served.

mod augment;
mod decode;
mod preprocess;
mod resize;

pub use augment::{Augment, CropBox, augment, sample_crop};
pub use decode::{Limits, PixelLimit, decode, decode_file, decode_file_for, decode_for};
pub use preprocess::{
    FILTER, IMAGENET_MEAN, IMAGENET_STD, Preprocess, batch_from_bytes, batch_from_files, stack, tensor_from_bytes,
    to_tensor,
};
pub use resize::resize_triangle;

#[cfg(test)]
mod test_images {
    //! Fixtures shared by the image tests.
    use ::image::{Rgb, RgbImage};

    /// Deterministic pseudo-random RGB values (no RNG needed).
    pub fn noise(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = (x * 73 + y * 151 + x * y * 7) % 256;
            Rgb([v as u8, ((v * 5 + 17) % 256) as u8, ((v * 11 + 101) % 256) as u8])
        })
    }
}
