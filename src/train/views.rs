//! Frozen-prefix view cache: a fixed pool of `K` augmented views per training image, run once
//! through the frozen leading units and stored as f16 in a memory-mapped file, so that each
//! training step runs only the trainable units (`hiercon train --view-cache K`).
//!
//! What it costs: without the cache every step draws two fresh augmentations of each sample, so
//! a 1,500-step run sees about 17 different views per emoji image; with it, each image has only
//! its `K` pooled views and a step picks two different ones (`K (K-1) / 2` pairs). The frozen
//! units' output itself is exact up to f16 rounding (relative error <= 2^-11).
//!
//! A cache lives in `ROOT/<digest>/`, the digest being the sha256 of its [`ViewKey`]: the
//! pretrained weights' sha256, architecture, frozen units, image size and normalisation, the
//! augmentation settings, the seed that draws the views, `K`, and the sha256 of the decoded
//! training images. Change any of them and another directory is used: a cache is never reused
//! for other inputs. Files: `key.json` (the key, checked on open), `views.f16` (`N x K` views,
//! image-major, little-endian f16), `complete.json` (its byte count and sha256, written last).
//! Building appends to `views.f16.partial` in view order, so a killed build resumes where it
//! stopped; an exclusive lock on `build.lock` makes a second process wait for the first.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ::image::RgbImage;
use half::f16;
use half::slice::HalfFloatSliceExt;
use ndarray::{Array4, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::graph::{Runner, Tensor};
use crate::image::{Augment, Preprocess, augment};
use crate::pipeline::pipelined;
use crate::progress::Progress;
use crate::{Error, Result};

/// Version of the on-disk layout; part of the key.
pub const VIEW_CACHE_FORMAT: u32 = 1;

/// Everything the cached values depend on. Its sha256 names the cache directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewKey {
    pub format: u32,
    pub arch: String,
    /// Frozen leading units: the prefix the views went through.
    pub freeze: usize,
    pub image_size: usize,
    /// Mean and std on 0..1 pixels.
    pub normalization: ([f32; 3], [f32; 3]),
    pub augment: Augment,
    /// The seed that draws every pooled view.
    pub seed: u64,
    /// Views per image (`K`).
    pub views: usize,
    /// sha256 of the pretrained weights file whose frozen units made the views.
    pub weights_sha256: String,
    /// sha256 over the decoded training images (size and RGB bytes, in training order).
    pub images_sha256: String,
    /// Shape of one view's prefix output, `[C, H, W]`.
    pub shape: Vec<usize>,
}

impl ViewKey {
    /// Hex sha256 of the key's JSON: the cache directory's name.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(serde_json::to_vec(self).expect("key serialises")))
    }

    /// Values in one view.
    pub fn per_view(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the complete `views.f16`.
    pub fn bytes(&self, images: usize) -> u64 {
        (images * self.views * self.per_view() * 2) as u64
    }
}

/// The sha256 over decoded images that [`ViewKey::images_sha256`] holds.
pub fn images_digest(images: &[RgbImage]) -> String {
    let mut h = Sha256::new();
    for img in images {
        h.update(img.width().to_le_bytes());
        h.update(img.height().to_le_bytes());
        h.update(img.as_raw());
    }
    hex::encode(h.finalize())
}

/// The generator seed of pooled view `view` of image `image`.
fn pool_seed(seed: u64, image: usize, view: usize) -> u64 {
    let mut h = Sha256::new();
    h.update(b"hiercon view pool");
    h.update(seed.to_le_bytes());
    h.update((image as u64).to_le_bytes());
    h.update((view as u64).to_le_bytes());
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

/// Pooled view `view` of `img`: the same augmentation a step would draw, from its own seed.
pub fn pooled_view(img: &RgbImage, key: &ViewKey, image: usize, view: usize) -> ndarray::Array3<f32> {
    let p = Preprocess { size: key.image_size as u32, mean: key.normalization.0, std: key.normalization.1 };
    let mut rng = ChaCha8Rng::seed_from_u64(pool_seed(key.seed, image, view));
    augment(img, &key.augment, &p, &mut rng)
}

/// Two different pooled views for one sample of a step: `(first, second)`, drawn from `rng`.
pub fn pick_pair(rng: &mut ChaCha8Rng, views: usize) -> (usize, usize) {
    let a = rng.random_range(0..views);
    let mut b = rng.random_range(0..views - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

/// A complete cache, memory-mapped.
pub struct ViewCache {
    pub dir: PathBuf,
    pub key: ViewKey,
    images: usize,
    map: memmap2::Mmap,
}

/// What opening a cache did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// A complete cache was there and passed its checks.
    Reused,
    /// Views were computed (all of them, or those a killed build had not written).
    Built { computed: usize, resumed_from: usize },
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::ViewCache { path: path.to_path_buf(), reason: reason.into() }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| bad(path, e.to_string()))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Complete {
    bytes: u64,
    sha256: String,
}

fn file_sha256(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

impl ViewCache {
    /// Opens the cache for `key` under `root`, computing whatever is missing: every pooled view
    /// of `images` (in order, `key.views` per image) goes through `prefix` (the frozen units'
    /// graph, input `images` `[B, 3, S, S]`, output `prefix` `[B, C, H, W]`, `B` its batch)
    /// while the next batch is augmented on a worker thread. A cache that fails its checks
    /// (size, sha256, key) is built again, with a warning.
    pub fn open_or_build(
        root: &Path,
        key: &ViewKey,
        images: &[RgbImage],
        prefix: &mut Runner,
        batch: usize,
    ) -> Result<(ViewCache, Opened)> {
        if key.views < 2 {
            return Err(bad(root, format!("--view-cache needs at least 2 views per image, got {}", key.views)));
        }
        let dir = root.join(key.digest());
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let lock_path = dir.join("build.lock");
        let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        if let Err(std::fs::TryLockError::WouldBlock) = lock.try_lock() {
            tracing::info!("another process is building the view cache {}: waiting for it", dir.display());
            lock.lock().map_err(|e| Error::io(&lock_path, e))?;
        }
        if let Some(cache) = Self::open_complete(&dir, key, images.len())? {
            return Ok((cache, Opened::Reused));
        }
        let (computed, resumed_from) = build(&dir, key, images, prefix, batch)?;
        let cache = Self::open_complete(&dir, key, images.len())?
            .ok_or_else(|| bad(&dir, "the cache just built does not pass its own checks"))?;
        drop(lock);
        Ok((cache, Opened::Built { computed, resumed_from }))
    }

    /// The complete cache in `dir`, or `None` (with a warning where something was there but
    /// failed a check, after which it is cleared for a rebuild).
    fn open_complete(dir: &Path, key: &ViewKey, images: usize) -> Result<Option<ViewCache>> {
        let (views, done, key_path) = (dir.join("views.f16"), dir.join("complete.json"), dir.join("key.json"));
        if !done.exists() {
            return Ok(None);
        }
        let problem = (|| -> Result<Option<String>> {
            let saved: ViewKey = read_json(&key_path)?;
            if &saved != key {
                return Ok(Some("its key.json is not this run's key".into()));
            }
            let c: Complete = read_json(&done)?;
            let len = std::fs::metadata(&views).map_err(|e| Error::io(&views, e))?.len();
            if c.bytes != key.bytes(images) || len != c.bytes {
                return Ok(Some(format!("views.f16 holds {len} bytes, expected {}", key.bytes(images))));
            }
            if file_sha256(&views)? != c.sha256 {
                return Ok(Some("views.f16 does not match its sha256".into()));
            }
            Ok(None)
        })();
        let problem = match problem {
            Ok(None) => {
                let f = File::open(&views).map_err(|e| Error::io(&views, e))?;
                // SAFETY: the file is ours, complete and never written again (a rebuild
                // replaces it by rename after removing complete.json, and readers hold the map
                // of the old inode).
                let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&views, e))?;
                return Ok(Some(ViewCache { dir: dir.to_path_buf(), key: key.clone(), images, map }));
            }
            Ok(Some(p)) => p,
            Err(e) => e.to_string(),
        };
        tracing::warn!("view cache {} is damaged ({problem}): building it again", dir.display());
        for f in [&done, &views] {
            let _ = std::fs::remove_file(f);
        }
        Ok(None)
    }

    /// Images in the cache.
    pub fn images(&self) -> usize {
        self.images
    }

    /// View `view` of image `image`, as f16 values.
    pub fn view(&self, image: usize, view: usize) -> &[f16] {
        let n = self.key.per_view();
        let at = (image * self.key.views + view) * n;
        let bytes = &self.map[at * 2..(at + n) * 2];
        // SAFETY: f16 has no invalid bit patterns; the map is page-aligned and every view starts
        // at an even offset (checked below). The file is little-endian, as the targets we build
        // for are.
        let (head, values, tail) = unsafe { bytes.align_to::<f16>() };
        assert!(head.is_empty() && tail.is_empty(), "f16 view alignment");
        values
    }

    /// The batch `[rows, C, H, W]` f32 whose row `r` is view `picks[r].1` of image `picks[r].0`.
    pub fn batch(&self, picks: &[(usize, usize)]) -> Array4<f32> {
        let s = &self.key.shape;
        let n = self.key.per_view();
        let mut x = Array4::<f32>::zeros((picks.len(), s[0], s[1], s[2]));
        let flat = x.as_slice_mut().expect("standard layout");
        flat.par_chunks_mut(n).zip(picks.par_iter()).for_each(|(out, &(i, v))| {
            self.view(i, v).convert_to_f32_slice(out);
        });
        x
    }
}

/// Computes the views `views.f16.partial` does not hold yet, then completes the cache. Returns
/// (views computed now, views found from an earlier build).
fn build(dir: &Path, key: &ViewKey, images: &[RgbImage], prefix: &mut Runner, batch: usize) -> Result<(usize, usize)> {
    let (partial, views, done) = (dir.join("views.f16.partial"), dir.join("views.f16"), dir.join("complete.json"));
    let key_path = dir.join("key.json");
    let n_images = images.len();
    let total = n_images * key.views;
    let per_view = key.per_view();
    // A partial file from another key is not resumed.
    let same_key = read_json::<ViewKey>(&key_path).ok().as_ref() == Some(key);
    if !same_key {
        let _ = std::fs::remove_file(&partial);
        crate::fsutil::write_atomic(
            &key_path,
            (serde_json::to_string_pretty(key).expect("key serialises") + "\n").as_bytes(),
        )?;
    }
    let mut file = OpenOptions::new().create(true).append(true).open(&partial).map_err(|e| Error::io(&partial, e))?;
    let have = file.metadata().map_err(|e| Error::io(&partial, e))?.len() / (per_view as u64 * 2);
    let start = (have as usize).min(total);
    file.set_len((start * per_view * 2) as u64).map_err(|e| Error::io(&partial, e))?;
    if start > 0 {
        tracing::info!("view cache {}: resuming at view {start} of {total}", dir.display());
    }
    let progress = Progress::new(format!("view cache (K = {})", key.views), total as u64, "views");
    progress.inc(start as u64);
    let chunks = (start..total).step_by(batch).map(|a| a..(a + batch).min(total));
    let augment_chunk = |range: std::ops::Range<usize>| {
        let k = key.views;
        let tensors: Vec<_> =
            range.clone().into_par_iter().map(|flat| pooled_view(&images[flat / k], key, flat / k, flat % k)).collect();
        let s = key.image_size;
        let mut x = Array4::<f32>::zeros((batch, 3, s, s));
        for (mut row, t) in x.axis_iter_mut(Axis(0)).zip(&tensors) {
            row.assign(t);
        }
        (range, x)
    };
    let mut halves: Vec<f16> = Vec::new();
    let mut bytes: Vec<u8> = Vec::new();
    pipelined(2, chunks, augment_chunk, |(range, x)| -> Result<()> {
        let out = prefix.run(&[("images", &Tensor::F32(x.into_dyn()))])?;
        let y = out.f32("prefix")?;
        let flat = y.as_slice().ok_or_else(|| bad(dir, "prefix output is not contiguous"))?;
        let used = &flat[..range.len() * per_view];
        if used.iter().any(|v| !v.is_finite()) {
            return Err(bad(dir, format!("the frozen units gave a non-finite value for views {range:?}")));
        }
        halves.resize(used.len(), f16::ZERO);
        halves.convert_from_f32_slice(used);
        bytes.clear();
        bytes.extend(halves.iter().flat_map(|h| h.to_le_bytes()));
        file.write_all(&bytes).map_err(|e| Error::io(&partial, e))?;
        progress.inc(range.len() as u64);
        Ok(())
    })?;
    progress.finish();
    file.sync_all().map_err(|e| Error::io(&partial, e))?;
    drop(file);
    std::fs::rename(&partial, &views).map_err(|e| Error::io(&views, e))?;
    let c = Complete { bytes: key.bytes(n_images), sha256: file_sha256(&views)? };
    crate::fsutil::write_atomic(&done, (serde_json::to_string_pretty(&c).expect("serialises") + "\n").as_bytes())?;
    Ok((total - start, start))
}

#[cfg(test)]
mod tests {
    use ::image::Rgb;

    use super::*;
    use crate::graph::{Conv2d, DType, Graph};

    const SIZE: usize = 16;

    /// A stand-in for frozen units: one constant 3x3 stride-2 convolution, `images [B, 3, 16,
    /// 16]` → `prefix [B, 2, 8, 8]`, its weights from `w`.
    fn prefix(batch: usize, w: f32) -> Runner {
        let mut g = Graph::new();
        let x = g.input("images", DType::F32, &[batch, 3, SIZE, SIZE]).unwrap();
        let k =
            g.constant(Tensor::f32(&[2, 3, 3, 3], (0..54).map(|i| w * (i as f32 - 27.0) / 27.0).collect()).unwrap());
        let y = g.conv(x, k, None, Conv2d { stride: 2, pad: 1, ..Default::default() }).unwrap();
        g.output("prefix", y).unwrap();
        Runner::cpu(&g).unwrap()
    }

    fn images(n: usize) -> Vec<RgbImage> {
        (0..n as u32)
            .map(|i| {
                RgbImage::from_fn(48, 40, |x, y| {
                    Rgb([(x * 5 + i * 40) as u8, (y * 6 + i) as u8, ((x * y + i) % 256) as u8])
                })
            })
            .collect()
    }

    fn key(images: &[RgbImage]) -> ViewKey {
        ViewKey {
            format: VIEW_CACHE_FORMAT,
            arch: "test".into(),
            freeze: 1,
            image_size: SIZE,
            normalization: ([0.5; 3], [0.25; 3]),
            augment: Augment::default(),
            seed: 3,
            views: 3,
            weights_sha256: "w1".into(),
            images_sha256: images_digest(images),
            shape: vec![2, 8, 8],
        }
    }

    #[test]
    fn a_built_cache_holds_each_pooled_view_through_the_prefix_and_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = images(5);
        let k = key(&imgs);
        // Batch 4 over 15 views: the last batch is partial.
        let (cache, opened) = ViewCache::open_or_build(dir.path(), &k, &imgs, &mut prefix(4, 1.0), 4).unwrap();
        assert_eq!(opened, Opened::Built { computed: 15, resumed_from: 0 });
        assert_eq!(cache.images(), 5);
        // View (3, 2) is the prefix of pooled view 2 of image 3, within f16 rounding.
        let view = pooled_view(&imgs[3], &k, 3, 2);
        let mut one = Array4::<f32>::zeros((4, 3, SIZE, SIZE));
        one.index_axis_mut(Axis(0), 0).assign(&view);
        let want =
            prefix(4, 1.0).run(&[("images", &Tensor::F32(one.into_dyn()))]).unwrap().f32("prefix").unwrap().clone();
        let got: Vec<f32> = cache.view(3, 2).iter().map(|h| h.to_f32()).collect();
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()), "{g} vs {w}");
        }
        // Different views of one image differ (they are different augmentations).
        assert_ne!(cache.view(3, 1), cache.view(3, 2));
        // batch() lays views out row by row.
        let b = cache.batch(&[(3, 2), (0, 0)]);
        assert_eq!(b.shape(), [2, 2, 8, 8]);
        assert_eq!(b.index_axis(Axis(0), 0).iter().copied().collect::<Vec<_>>(), got);
        drop(cache);
        let (_, again) = ViewCache::open_or_build(dir.path(), &k, &imgs, &mut prefix(4, 1.0), 4).unwrap();
        assert_eq!(again, Opened::Reused);
    }

    #[test]
    fn any_change_to_the_key_computes_another_cache() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = images(3);
        let base = key(&imgs);
        let mut other_images = imgs.clone();
        other_images[1].put_pixel(0, 0, Rgb([1, 2, 3]));
        let changed = [
            ViewKey { weights_sha256: "w2".into(), ..base.clone() },
            ViewKey { freeze: 2, ..base.clone() },
            ViewKey { image_size: SIZE + 1, ..base.clone() },
            ViewKey { augment: Augment { jitter: 0.3, ..base.augment }, ..base.clone() },
            ViewKey { seed: 4, ..base.clone() },
            ViewKey { views: 4, ..base.clone() },
            ViewKey { normalization: ([0.4; 3], [0.25; 3]), ..base.clone() },
            ViewKey { images_sha256: images_digest(&other_images), ..base.clone() },
        ];
        let mut digests: std::collections::HashSet<String> = std::collections::HashSet::new();
        digests.insert(base.digest());
        for k in &changed {
            assert!(digests.insert(k.digest()), "{k:?} shares a digest");
        }
        ViewCache::open_or_build(dir.path(), &base, &imgs, &mut prefix(4, 1.0), 4).unwrap();
        // Another seed: recomputed in its own directory, with other values.
        let seeded = &changed[4];
        let (c2, opened) = ViewCache::open_or_build(dir.path(), seeded, &imgs, &mut prefix(4, 1.0), 4).unwrap();
        assert!(matches!(opened, Opened::Built { computed: 9, .. }));
        let (c1, opened) = ViewCache::open_or_build(dir.path(), &base, &imgs, &mut prefix(4, 1.0), 4).unwrap();
        assert_eq!(opened, Opened::Reused);
        assert_ne!(c1.view(0, 0), c2.view(0, 0));
        assert_ne!(c1.dir, c2.dir);
        // A key.json that does not match its directory's digest is not trusted.
        let bogus = ViewKey { weights_sha256: "w-other".into(), ..base.clone() };
        std::fs::write(c1.dir.join("key.json"), serde_json::to_string(&bogus).unwrap()).unwrap();
        drop(c1);
        let (_, opened) = ViewCache::open_or_build(dir.path(), &base, &imgs, &mut prefix(4, 1.0), 4).unwrap();
        assert!(matches!(opened, Opened::Built { computed: 9, .. }), "{opened:?}");
    }

    #[test]
    fn a_killed_build_resumes_and_a_damaged_cache_is_built_again() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = images(4);
        let k = key(&imgs);
        let (whole, _) = ViewCache::open_or_build(dir.path(), &k, &imgs, &mut prefix(4, 1.0), 4).unwrap();
        let want = std::fs::read(whole.dir.join("views.f16")).unwrap();
        let cache_dir = whole.dir.clone();
        drop(whole);
        // As if killed after 5 of 12 views (and half a view): only the partial file is there.
        let per_view = k.per_view() * 2;
        std::fs::remove_file(cache_dir.join("complete.json")).unwrap();
        std::fs::remove_file(cache_dir.join("views.f16")).unwrap();
        std::fs::write(cache_dir.join("views.f16.partial"), &want[..5 * per_view + 7]).unwrap();
        let (c, opened) = ViewCache::open_or_build(dir.path(), &k, &imgs, &mut prefix(4, 1.0), 4).unwrap();
        assert_eq!(opened, Opened::Built { computed: 7, resumed_from: 5 });
        assert_eq!(std::fs::read(c.dir.join("views.f16")).unwrap(), want, "resumed build equals the whole one");
        drop(c);
        // One flipped byte: the sha256 check fails and the cache is built again.
        let mut bad = want.clone();
        bad[100] ^= 0x40;
        std::fs::write(cache_dir.join("views.f16"), &bad).unwrap();
        let (c, opened) = ViewCache::open_or_build(dir.path(), &k, &imgs, &mut prefix(4, 1.0), 4).unwrap();
        assert_eq!(opened, Opened::Built { computed: 12, resumed_from: 0 });
        assert_eq!(std::fs::read(c.dir.join("views.f16")).unwrap(), want);
    }

    #[test]
    fn pairs_are_two_different_views() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            let (a, b) = pick_pair(&mut rng, 4);
            assert!(a != b && a < 4 && b < 4);
            seen.insert((a, b));
        }
        assert_eq!(seen.len(), 12, "every ordered pair of 4 views is drawn");
        let dir = tempfile::tempdir().unwrap();
        let imgs = images(2);
        let e =
            ViewCache::open_or_build(dir.path(), &ViewKey { views: 1, ..key(&imgs) }, &imgs, &mut prefix(4, 1.0), 4);
        assert!(e.is_err());
    }
}
