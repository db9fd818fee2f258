//! The Fashion-MNIST catalogue (Zalando's 28x28 product photos, Debian `dataset-fashion-mnist`):
//! taxonomy group/class; every image is its own product and its own variation.
//!
//! Fashion-MNIST has no product or variation labels: each image is a different article, so
//! `product` and `variation` are both the image id and the hierarchy is `group/class/image`.
//! Split: by default the official one (the 60,000 `train-*` images are `train`, the 10,000
//! `t10k-*` ones `test`); since every product is one image, the official test images are
//! exactly "products never shown in training". [`FashionSplit::Hashed`] draws the usual
//! per-class hashed split instead. Roles are null (leave-one-out retrieval).
//! Class names may not contain `/` (a level separator): `T-shirt/top` is `T-shirt-top`.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::idx::{self, IdxImages};
use super::{IMAGES_DIR, create_dir, finish};
use crate::catalogue::{Item, Manifest, Split, SplitOptions, assign_splits};
use crate::progress::Progress;
use crate::{Error, Result};

/// Label `i`'s (group, class), in the dataset's label order.
pub const CLASSES: [(&str, &str); 10] = [
    ("tops", "T-shirt-top"),
    ("bottoms", "Trouser"),
    ("tops", "Pullover"),
    ("dresses", "Dress"),
    ("tops", "Coat"),
    ("footwear", "Sandal"),
    ("tops", "Shirt"),
    ("footwear", "Sneaker"),
    ("bags", "Bag"),
    ("footwear", "Ankle boot"),
];

/// The two parts of the dataset: (name, images file, labels file, official split).
pub const PARTS: [(&str, &str, &str, Split); 2] = [
    ("train", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", Split::Train),
    ("test", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", Split::Test),
];

/// The view name given to every Fashion-MNIST image (there is one photo per article).
pub const VIEW: &str = "photo";

/// How to split Fashion-MNIST.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum FashionSplit {
    /// The dataset's own train (60,000) / test (10,000) split.
    #[default]
    Official,
    /// The hashed per-class split of [`crate::catalogue::split`].
    Hashed(SplitOptions),
}

/// One part's images and labels, checked against each other.
struct Part {
    name: &'static str,
    split: Split,
    images: IdxImages,
    labels: Vec<u8>,
}

fn read_part(source: &Path, (name, images, labels, split): (&'static str, &str, &str, Split)) -> Result<Part> {
    let images_path = source.join(images);
    let labels_path = source.join(labels);
    let images = idx::read_images(&images_path)?;
    let labels = idx::read_labels(&labels_path)?;
    if images.count != labels.len() {
        return Err(Error::IdxMismatch {
            images: images_path,
            n_images: images.count,
            labels: labels_path,
            n_labels: labels.len(),
        });
    }
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, l)| usize::from(**l) >= CLASSES.len()) {
        return Err(Error::Idx {
            path: labels_path,
            problem: format!("label {l} of item {i} is not a Fashion-MNIST class (0..{})", CLASSES.len()),
        });
    }
    Ok(Part { name, split, images, labels })
}

/// Reads the four IDX files under `source` and builds `out/`: one grayscale PNG per image at
/// `out/images/<train|test>/<n>.png` (written in parallel) and `out/manifest.jsonl`.
pub fn import(source: &Path, out: &Path, split: &FashionSplit) -> Result<Manifest> {
    if let FashionSplit::Hashed(opts) = split {
        opts.validate()?;
    }
    let parts = PARTS.map(|p| read_part(source, p)).into_iter().collect::<Result<Vec<_>>>()?;
    let total: usize = parts.iter().map(|p| p.images.count).sum();
    let mut items = Vec::with_capacity(total);
    let progress = Progress::new("fashion-mnist images", total as u64, "images");
    for part in &parts {
        let dir = out.join(IMAGES_DIR).join(part.name);
        create_dir(&dir)?;
        let width = part.images.count.saturating_sub(1).to_string().len();
        let names: Vec<String> = (0..part.images.count).map(|i| format!("{i:0width$}")).collect();
        names.par_iter().enumerate().try_for_each(|(i, name)| {
            let path = dir.join(format!("{name}.png"));
            write_png(&path, &part.images, i)?;
            progress.inc(1);
            Ok::<_, Error>(())
        })?;
        for (i, name) in names.iter().enumerate() {
            let (group, class) = CLASSES[usize::from(part.labels[i])];
            let id = format!("{}-{name}", part.name);
            items.push(Item {
                image: format!("{IMAGES_DIR}/{}/{name}.png", part.name),
                category: format!("{group}/{class}"),
                product: id.clone(),
                variation: id.clone(),
                view: VIEW.to_string(),
                split: part.split,
                role: None,
                title: Some(class.to_string()),
                attributes: Default::default(),
                id,
            });
        }
    }
    progress.finish();
    if let FashionSplit::Hashed(opts) = split {
        assign_splits(&mut items, opts)?;
    }
    finish(out, items)
}

fn write_png(path: &PathBuf, images: &IdxImages, i: usize) -> Result<()> {
    let err = |reason: String| Error::ImageWrite { path: path.clone(), reason };
    let img = ::image::GrayImage::from_raw(images.cols as u32, images.rows as u32, images.image(i).to_vec())
        .ok_or_else(|| err("pixel buffer does not match the image size".into()))?;
    img.save_with_format(path, ::image::ImageFormat::Png).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;
    use crate::catalogue::Summary;

    fn write_gz(path: &Path, bytes: &[u8]) {
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(bytes).unwrap();
        std::fs::write(path, enc.finish().unwrap()).unwrap();
    }

    /// A 12-image train part and a 5-image test part of 3x4 images whose pixels encode their
    /// position; labels cycle through the classes.
    fn source(dir: &Path) -> Vec<Vec<u8>> {
        let mut all = Vec::new();
        for ((_, images, labels, _), n) in PARTS.iter().zip([12u32, 5]) {
            let pixels: Vec<u8> = (0..n * 12).map(|i| (i * 3 + n) as u8).collect();
            let labs: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
            write_gz(&dir.join(images), &idx::encode(idx::IMAGES_MAGIC, &[n, 3, 4], &pixels));
            write_gz(&dir.join(labels), &idx::encode(idx::LABELS_MAGIC, &[n], &labs));
            all.push(pixels);
        }
        all
    }

    #[test]
    fn imports_small_idx_files_with_the_official_split() {
        let src = tempfile::tempdir().unwrap();
        let pixels = source(src.path());
        let out = tempfile::tempdir().unwrap();
        let m = import(src.path(), out.path(), &FashionSplit::Official).unwrap();
        assert_eq!(m.items.len(), 17);
        let s = Summary::of(&m.items);
        assert_eq!(s.levels, vec![5, 10]);
        assert_eq!((s.train.items, s.test.items, s.products, s.variations), (12, 5, 17, 17));
        let it = m.get("train-07").unwrap();
        assert_eq!(it.category, "footwear/Sneaker");
        assert_eq!((it.product.as_str(), it.variation.as_str(), it.role), ("train-07", "train-07", None));
        let t = m.get("test-4").unwrap();
        assert_eq!((t.split, t.category.as_str()), (Split::Test, "tops/Coat"));
        // the PNG holds exactly the IDX pixels
        let img = ::image::open(m.image_path(it)).unwrap().into_luma8();
        assert_eq!(img.dimensions(), (4, 3));
        assert_eq!(img.as_raw().as_slice(), &pixels[0][7 * 12..8 * 12]);
        assert_eq!(Manifest::read(out.path().join("manifest.jsonl")).unwrap().items, m.items);
    }

    #[test]
    fn hashed_split_is_per_class() {
        let src = tempfile::tempdir().unwrap();
        source(src.path());
        let out = tempfile::tempdir().unwrap();
        let opts = SplitOptions { unseen_fraction: 1.0, ..Default::default() };
        let m = import(src.path(), out.path(), &FashionSplit::Hashed(opts)).unwrap();
        assert!(m.items.iter().all(|it| it.split == Split::Test));
    }

    #[test]
    fn mismatched_and_bad_labels_are_errors() {
        let src = tempfile::tempdir().unwrap();
        source(src.path());
        let out = tempfile::tempdir().unwrap();
        write_gz(&src.path().join(PARTS[1].2), &idx::encode(idx::LABELS_MAGIC, &[4], &[0, 1, 2, 3]));
        match import(src.path(), out.path(), &FashionSplit::Official) {
            Err(Error::IdxMismatch { n_images: 5, n_labels: 4, .. }) => {}
            other => panic!("expected IdxMismatch, got {other:?}"),
        }
        write_gz(&src.path().join(PARTS[1].2), &idx::encode(idx::LABELS_MAGIC, &[5], &[0, 1, 2, 10, 3]));
        match import(src.path(), out.path(), &FashionSplit::Official) {
            Err(Error::Idx { problem, .. }) => assert!(problem.contains("label 10 of item 3"), "{problem}"),
            other => panic!("expected an IDX error, got {other:?}"),
        }
        assert!(!out.path().join("manifest.jsonl").exists());
    }
}
