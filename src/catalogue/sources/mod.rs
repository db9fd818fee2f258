//! Importers that turn a source into a self-contained catalogue folder: `images/` plus
//! `manifest.jsonl` (plus licence files where the source needs them).
//!
//! - [`emoji`]: the `emoji-datasource` packages (category / subcategory / emoji / skin tone;
//!   two vendors' drawings as query and gallery views).
//! - [`fashion_mnist`]: the Fashion-MNIST IDX files (group / class; every image its own product),
//!   read by [`idx`].
//! - [`folder`]: any images plus a CSV `image,category,product,variation[,view,role]`.

pub mod emoji;
pub mod fashion_mnist;
pub mod folder;
pub mod idx;

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{Item, MANIFEST_FILE, Manifest, write_items};
use crate::progress::Progress;
use crate::{Error, Result};

/// The folder, inside a catalogue folder, that holds its images.
pub const IMAGES_DIR: &str = "images";

/// Writes `out/manifest.jsonl` (atomically, after checking every item and image) and returns
/// the catalogue.
pub(crate) fn finish(out: &Path, items: Vec<Item>) -> Result<Manifest> {
    let path = out.join(MANIFEST_FILE);
    write_items(&path, &items)?;
    tracing::info!(path = %path.display(), items = items.len(), "wrote manifest");
    Ok(Manifest { dir: out.to_path_buf(), items })
}

pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Copies files (`from`, `to`) in parallel, creating the destination folders, with progress.
pub(crate) fn copy_files(what: &str, copies: &[(PathBuf, PathBuf)]) -> Result<()> {
    let mut dirs: Vec<&Path> = copies.iter().filter_map(|(_, to)| to.parent()).collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        create_dir(dir)?;
    }
    let progress = Progress::new(what, copies.len() as u64, "files");
    copies.par_iter().try_for_each(|(from, to)| {
        std::fs::copy(from, to).map_err(|e| Error::io(to, e))?;
        progress.inc(1);
        Ok::<_, Error>(())
    })?;
    progress.finish();
    Ok(())
}
