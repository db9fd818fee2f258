//! Image decoding, preprocessing and training augmentations.
