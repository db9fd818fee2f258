//! One `hiercon index` run: embed a catalogue (reusing cached embeddings), build and write a generation, verify it, switch CURRENT.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ndarray::{Array2, ArrayView1};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::hnsw::{HnswIndex, HnswParams};
use super::store::{self, EmbedStats, Generation, GenerationMeta, IndexDir, ItemRecord, ModelInfo};
use super::verify::{self, VerifyConfig, VerifyReport};
use crate::catalogue::{Item, Manifest, ReadOptions, Split};
use crate::encoder::Encoder;
use crate::image::{self as img, Limits};
use crate::progress::Progress;
use crate::{Error, Result};

/// Everything a run needs besides the encoder.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    pub manifest: PathBuf,
    /// `index/<name>`.
    pub out: PathBuf,
    /// The model file, recorded in `generation.json` (informational).
    pub model_path: Option<PathBuf>,
    /// Index only this split (`None`: every item).
    pub split: Option<Split>,
    /// Images per encoder call.
    pub batch_size: usize,
    pub hnsw: HnswParams,
    /// HNSW search breadth used by verification and, by default, by `serve`.
    pub ef_search: usize,
    /// Generations kept on disk (the live one is always kept as well).
    pub keep: usize,
    pub verify: VerifyConfig,
    pub limits: Limits,
}

impl IndexConfig {
    /// Defaults for everything but the paths.
    pub fn new(manifest: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        IndexConfig {
            manifest: manifest.into(),
            out: out.into(),
            model_path: None,
            split: None,
            batch_size: 64,
            hnsw: HnswParams::default(),
            ef_search: 64,
            keep: 3,
            verify: VerifyConfig::default(),
            limits: Limits::default(),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |name, reason: &str| Err(Error::InvalidArgument { name, reason: reason.into() });
        self.hnsw.validate()?;
        if self.batch_size == 0 {
            return bad("batch-size", "must be at least 1");
        }
        if self.keep == 0 {
            return bad("keep", "must be at least 1");
        }
        if self.ef_search == 0 {
            return bad("ef-search", "must be at least 1");
        }
        if self.verify.recall_k == 0 || !self.verify.min_recall.is_finite() {
            return bad("min-recall", "recall@k needs k >= 1 and a finite threshold");
        }
        Ok(())
    }
}

/// What a successful run did.
#[derive(Debug, Clone)]
pub struct IndexOutcome {
    pub generation: String,
    pub dir: PathBuf,
    pub count: usize,
    pub stats: EmbedStats,
    pub report: VerifyReport,
    /// Generation directories deleted by `--keep`.
    pub removed: Vec<PathBuf>,
}

/// Embeddings of earlier generations made with the same model, by image sha256.
pub struct EmbeddingCache {
    sources: Vec<Array2<f32>>,
    by_hash: HashMap<String, (usize, usize)>,
}

impl EmbeddingCache {
    /// An empty cache.
    pub fn empty() -> Self {
        EmbeddingCache { sources: Vec::new(), by_hash: HashMap::new() }
    }

    /// Reads the live generation and the newest complete one (which may be newer, if its
    /// verification failed), keeping those embedded with `digest` at width `dim`. Unreadable
    /// generations are skipped with a warning: the cache only ever saves work.
    pub fn from_index(root: &IndexDir, digest: &str, dim: usize) -> Self {
        let mut cache = EmbeddingCache::empty();
        let live = root.current().ok().flatten().map(|name| root.root.join(name));
        let newest = root
            .generations()
            .unwrap_or_default()
            .into_iter()
            .rev()
            .find(|(_, d)| store::read_meta(d).is_ok())
            .map(|(_, d)| d);
        let mut dirs: Vec<PathBuf> = live.into_iter().chain(newest).collect();
        dirs.dedup();
        for dir in dirs {
            match store::read_embeddings_only(&dir) {
                Ok((meta, _, _)) if meta.model.digest != digest || meta.dim != dim => {
                    tracing::info!(generation = %dir.display(), "cached embeddings are from another model; not reused");
                }
                Ok((_, items, emb)) => {
                    let src = cache.sources.len();
                    for (row, it) in items.iter().enumerate() {
                        cache.by_hash.entry(it.sha256.clone()).or_insert((src, row));
                    }
                    cache.sources.push(emb);
                }
                Err(e) => tracing::warn!(generation = %dir.display(), "cannot reuse embeddings: {e}"),
            }
        }
        cache
    }

    /// Cached embedding of an image hash.
    pub fn get(&self, sha256: &str) -> Option<ArrayView1<'_, f32>> {
        self.by_hash.get(sha256).map(|&(s, r)| self.sources[s].row(r))
    }

    /// Distinct images cached.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// Reads and filters the manifest; duplicate ids are bad input.
fn read_items(cfg: &IndexConfig) -> Result<Vec<Item>> {
    // Missing images are skipped and counted while embedding, so a nightly run is not stopped
    // by one deleted file; malformed lines still fail the run.
    let items = Manifest::read_with(&cfg.manifest, &ReadOptions { check_images: false })?.items;
    let items: Vec<Item> = items.into_iter().filter(|it| cfg.split.is_none_or(|s| it.split == s)).collect();
    let mut seen = HashSet::new();
    for it in &items {
        if !seen.insert(it.id.as_str()) {
            return Err(Error::InvalidArgument {
                name: "manifest",
                reason: format!("{}: duplicate item id {:?}", cfg.manifest.display(), it.id),
            });
        }
    }
    if items.is_empty() {
        return Err(Error::EmptyIndex {
            reason: format!("{} has no items in the chosen split", cfg.manifest.display()),
        });
    }
    Ok(items)
}

/// Embeds `items` (images relative to `image_root`), reusing `cache`. Returns the items that
/// could be read, their embeddings in the same order, and the counts.
pub fn embed_items(
    items: &[Item],
    image_root: &Path,
    encoder: &dyn Encoder,
    cache: &EmbeddingCache,
    batch_size: usize,
    limits: &Limits,
) -> Result<(Vec<ItemRecord>, Array2<f32>, EmbedStats)> {
    let dim = encoder.dim();
    let mut stats = EmbedStats::default();
    let mut records = Vec::with_capacity(items.len());
    let mut data: Vec<f32> = Vec::with_capacity(items.len() * dim);
    // Embeddings computed in this run: hash -> row of `fresh`.
    let mut fresh: Vec<f32> = Vec::new();
    let mut fresh_rows: HashMap<String, usize> = HashMap::new();
    let mut failed: HashMap<String, String> = HashMap::new();
    let mut assigned: HashSet<String> = HashSet::new();
    let progress = Progress::new("embedding", items.len() as u64, "images");
    let skip = |stats: &mut EmbedStats, it: &Item, why: &str| {
        stats.skipped += 1;
        if stats.skipped <= 10 {
            tracing::warn!(id = %it.id, image = %it.image, "skipped: {why}");
        }
    };
    for chunk in items.chunks(batch_size * 8) {
        // Read and hash every image of the chunk in parallel.
        let read: Vec<std::result::Result<(Vec<u8>, String), String>> = chunk
            .par_iter()
            .map(|it| {
                let path = image_root.join(&it.image);
                let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let hash = hex::encode(Sha256::digest(&bytes));
                Ok((bytes, hash))
            })
            .collect();
        // Images neither cached nor already embedded: decode + preprocess in parallel.
        let mut pending: Vec<(&str, &[u8])> = Vec::new();
        let mut pending_set = HashSet::new();
        for r in read.iter().flatten() {
            let h = r.1.as_str();
            if cache.get(h).is_none() && !fresh_rows.contains_key(h) && !failed.contains_key(h) && pending_set.insert(h)
            {
                pending.push((h, &r.0));
            }
        }
        let decoded: Vec<(&str, std::result::Result<ndarray::Array3<f32>, String>)> = pending
            .par_iter()
            .map(|(h, bytes)| {
                let t = img::decode(bytes, limits).map(|decoded| img::to_tensor(&decoded, encoder.preprocess()));
                (*h, t.map_err(|e| e.to_string()))
            })
            .collect();
        let mut ok: Vec<(&str, ndarray::Array3<f32>)> = Vec::new();
        for (h, t) in decoded {
            match t {
                Ok(t) => ok.push((h, t)),
                Err(e) => {
                    failed.insert(h.to_string(), e);
                }
            }
        }
        for batch in ok.chunks(batch_size) {
            let tensors: Vec<ndarray::Array3<f32>> = batch.iter().map(|(_, t)| t.clone()).collect();
            let emb = encoder.embed(img::stack(&tensors).view())?;
            if emb.shape() != [batch.len(), dim] {
                return Err(Error::WrongVectorDimension { expected: dim, received: emb.ncols() });
            }
            for ((h, _), row) in batch.iter().zip(emb.rows()) {
                // A NaN or all-zero embedding would corrupt the graph's distances: leave it out.
                if row.iter().any(|v| !v.is_finite()) || row.iter().all(|v| *v == 0.0) {
                    failed.insert(h.to_string(), "the model's embedding is not finite or is zero".into());
                    continue;
                }
                fresh_rows.insert(h.to_string(), fresh.len() / dim);
                fresh.extend(row.iter());
                stats.embedded += 1;
            }
        }
        // Emit in manifest order.
        for (it, r) in chunk.iter().zip(read) {
            let (_, hash) = match r {
                Ok(r) => r,
                Err(e) => {
                    skip(&mut stats, it, &e);
                    continue;
                }
            };
            if let Some(e) = failed.get(&hash) {
                skip(&mut stats, it, e);
                continue;
            }
            match (cache.get(&hash), fresh_rows.get(&hash)) {
                (Some(row), _) => {
                    data.extend(row.iter());
                    stats.reused += 1;
                }
                (None, Some(&row)) => {
                    data.extend_from_slice(&fresh[row * dim..(row + 1) * dim]);
                    // The first item with a new image is the one counted in `embedded`.
                    if !assigned.insert(hash.clone()) {
                        stats.reused += 1;
                    }
                }
                (None, None) => unreachable!("every read image is cached, embedded or failed"),
            }
            records.push(ItemRecord { item: it.clone(), sha256: hash });
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    let n = records.len();
    Ok((records, Array2::from_shape_vec((n, dim), data).expect("rows of width dim"), stats))
}

/// Loads `dir` back from disk, verifies it and writes `verification.json` there. A generation
/// that does not load, or fails a check, is an [`Error::IndexVerification`].
pub fn verify_dir(dir: &Path, cfg: &VerifyConfig) -> Result<VerifyReport> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let g = Generation::load(dir)
        .map_err(|e| Error::IndexVerification { generation: name.clone(), reason: format!("does not load: {e}") })?;
    let report = verify::verify(&g, cfg);
    if report.passed && report.ef_search != g.meta.ef_search {
        // Serve at the breadth that reached the recall threshold.
        tracing::info!(
            from = g.meta.ef_search,
            to = report.ef_search,
            "raised ef_search to reach the recall threshold"
        );
        store::write_meta(dir, &store::GenerationMeta { ef_search: report.ef_search, ..g.meta.clone() })?;
    }
    let text = serde_json::to_string_pretty(&report).expect("report serialises");
    store::write_atomic(&dir.join(store::VERIFICATION), (text + "\n").as_bytes())?;
    match &report.reason {
        None => Ok(report),
        Some(reason) => Err(Error::IndexVerification { generation: name, reason: reason.clone() }),
    }
}

/// Verifies generation `dir` of `root` and, if it passes, makes it live and cleans up.
pub fn verify_and_switch(
    root: &IndexDir,
    dir: &Path,
    cfg: &VerifyConfig,
    keep: usize,
) -> Result<(VerifyReport, Vec<PathBuf>)> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    tracing::info!(generation = %name, "phase: verifying");
    let report = verify_dir(dir, cfg)?;
    tracing::info!(
        generation = %name, recall = report.recall, duplicates = report.duplicate_items,
        "verified; phase: switching CURRENT"
    );
    root.switch_current(&name)?;
    let removed = root.gc(keep)?;
    for r in &removed {
        tracing::info!(dir = %r.display(), "removed old generation");
    }
    Ok((report, removed))
}

/// The whole run (see the [module docs](super)).
#[tracing::instrument(skip(cfg, encoder), fields(out = %cfg.out.display(), digest = %encoder.digest()))]
pub fn run(cfg: &IndexConfig, encoder: &dyn Encoder) -> Result<IndexOutcome> {
    cfg.validate()?;
    let root = IndexDir::new(&cfg.out);
    root.create()?;
    let _lock = root.lock()?;
    let items = read_items(cfg)?;
    let manifest = std::path::absolute(&cfg.manifest).map_err(|e| Error::io(&cfg.manifest, e))?;
    let image_root = manifest.parent().map(Path::to_path_buf).unwrap_or_default();
    tracing::info!(items = items.len(), manifest = %manifest.display(), "phase: embedding");
    let cache = EmbeddingCache::from_index(&root, encoder.digest(), encoder.dim());
    let (records, embeddings, stats) = embed_items(&items, &image_root, encoder, &cache, cfg.batch_size, &cfg.limits)?;
    tracing::info!(embedded = stats.embedded, reused = stats.reused, skipped = stats.skipped, "embeddings ready");
    if records.is_empty() {
        return Err(Error::EmptyIndex { reason: format!("none of the {} images could be read", items.len()) });
    }
    drop(cache);
    let (n, dir) = root.create_next()?;
    let name = store::generation_name(n);
    tracing::info!(generation = %name, m = cfg.hnsw.m, ef_construction = cfg.hnsw.ef_construction, "phase: building graph");
    let progress = Progress::new("building graph", records.len() as u64, "items");
    let mut hnsw = HnswIndex::build(embeddings.view(), &cfg.hnsw, &progress)?;
    progress.finish();
    let hnsw_orphans = hnsw.find_orphans(embeddings.view(), cfg.ef_search);
    tracing::info!(generation = %name, "phase: writing generation");
    let meta = GenerationMeta {
        format: store::INDEX_FORMAT.into(),
        generation: n,
        created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        manifest,
        image_root,
        split: cfg.split,
        model: ModelInfo { path: cfg.model_path.clone(), digest: encoder.digest().to_string(), dim: encoder.dim() },
        count: 0,
        dim: 0,
        hnsw: cfg.hnsw,
        ef_search: cfg.ef_search,
        stats,
        files: Default::default(),
        hnsw_orphans,
    };
    let meta = store::write_generation(&dir, meta, &records, &embeddings, &hnsw)?;
    drop((hnsw, embeddings));
    let (report, removed) = verify_and_switch(&root, &dir, &cfg.verify, cfg.keep)?;
    tracing::info!(generation = %name, items = meta.count, "live");
    Ok(IndexOutcome { generation: name, dir, count: meta.count, stats, report, removed })
}
