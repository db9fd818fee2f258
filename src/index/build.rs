//! One `hiercon index` run: embed a catalogue (reusing cached embeddings), build and write a generation, verify it, switch CURRENT.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ndarray::{Array2, ArrayView1};
use rand::SeedableRng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::hnsw::{HnswIndex, HnswParams};
use super::store::{
    self, BuildInfo, BuildPath, EmbedStats, Generation, GenerationMeta, IndexDir, ItemRecord, ModelInfo,
};
use super::verify::{self, VerifyConfig, VerifyReport};
use crate::catalogue::{Item, Manifest, ReadOptions, Split};
use crate::encoder::Encoder;
use crate::image::{self as img, Limits};
use crate::pipeline::pipelined;
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
    /// When the live generation's graph is reused instead of building one from nothing.
    pub rebuild: RebuildPolicy,
}

/// When a run reuses the live generation's graph (an *incremental* build: the items kept
/// keep their nodes, new and changed items are inserted, removed and changed items' old nodes
/// become tombstones) and when it builds from nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RebuildPolicy {
    /// Always build from nothing (`--full`).
    pub full: bool,
    /// Build from nothing once tombstones would pass this share of the graph's nodes.
    pub max_tombstones: f64,
    /// Build from nothing when more than this share of the rows is new.
    pub max_inserted: f64,
    /// Reused rows sampled (seeded) for the self-retrieval check of an incremental build,
    /// besides every inserted row and every orphan.
    pub self_sample: usize,
}

impl Default for RebuildPolicy {
    fn default() -> Self {
        RebuildPolicy { full: false, max_tombstones: 0.1, max_inserted: 0.3, self_sample: 2000 }
    }
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
            rebuild: RebuildPolicy::default(),
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
        if !(0.0..=1.0).contains(&self.rebuild.max_tombstones) {
            return bad("max-tombstones", "must be a share between 0 and 1");
        }
        if !(0.0..=1.0).contains(&self.rebuild.max_inserted) {
            return bad("max-new", "must be a share between 0 and 1");
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
    /// Which path the build took, and why.
    pub build: BuildInfo,
    /// Wall seconds per phase: `embed`, `plan` (loading the live generation), `graph`, `write`,
    /// `verify+switch` (loading the new generation back, checking it, switching CURRENT).
    pub seconds: Vec<(&'static str, f64)>,
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

    /// A cache of `embeddings` (one row per hash of `hashes`), e.g. read back from Milvus.
    pub fn from_rows(hashes: &[String], embeddings: Array2<f32>) -> Self {
        let mut cache = EmbeddingCache::empty();
        for (row, h) in hashes.iter().enumerate() {
            cache.by_hash.entry(h.clone()).or_insert((0, row));
        }
        cache.sources.push(embeddings);
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
    read_manifest_items(&cfg.manifest, cfg.split)
}

/// The items of `manifest` (only `split`'s when given) an index run embeds; duplicate ids and an
/// empty selection are errors.
pub fn read_manifest_items(manifest: &Path, split: Option<Split>) -> Result<Vec<Item>> {
    // Missing images are skipped and counted while embedding, so a nightly run is not stopped
    // by one deleted file; malformed lines still fail the run.
    let items = Manifest::read_with(manifest, &ReadOptions { check_images: false })?.items;
    let items: Vec<Item> = items.into_iter().filter(|it| split.is_none_or(|s| it.split == s)).collect();
    let mut seen = HashSet::new();
    for it in &items {
        if !seen.insert(it.id.as_str()) {
            return Err(Error::InvalidArgument {
                name: "manifest",
                reason: format!("{}: duplicate item id {:?}", manifest.display(), it.id),
            });
        }
    }
    if items.is_empty() {
        return Err(Error::EmptyIndex { reason: format!("{} has no items in the chosen split", manifest.display()) });
    }
    Ok(items)
}

/// Embeds `items` (images relative to `image_root`), reusing `cache`. Returns the items that
/// could be read, their embeddings in the same order, and the counts.
pub fn embed_items<'a>(
    items: &'a [Item],
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
    // The worker reads, hashes and decodes chunk c + 1 while the encoder embeds chunk c. It sends
    // each new image content to be decoded once (`dispatched`); the consumer sees the chunks in
    // manifest order, so an image's embedding exists before any later item needs it.
    let mut dispatched: HashSet<String> = HashSet::new();
    let prepare = |chunk: &'a [Item]| {
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
        // Images neither cached nor seen earlier in this run: decode + preprocess in parallel.
        let pending: Vec<(&str, &[u8])> = read
            .iter()
            .flatten()
            .filter(|(_, h)| cache.get(h).is_none() && dispatched.insert(h.clone()))
            .map(|(bytes, h)| (h.as_str(), bytes.as_slice()))
            .collect();
        let decoded: Vec<(String, std::result::Result<ndarray::Array3<f32>, String>)> = pending
            .par_iter()
            .map(|(h, bytes)| {
                let t = img::tensor_from_bytes(bytes, encoder.preprocess(), limits);
                (h.to_string(), t.map_err(|e| e.to_string()))
            })
            .collect();
        let hashes: Vec<std::result::Result<String, String>> = read.into_iter().map(|r| r.map(|(_, h)| h)).collect();
        (chunk, hashes, decoded)
    };
    pipelined(2, items.chunks(batch_size * 8), prepare, |(chunk, hashes, decoded)| -> Result<()> {
        let mut ok: Vec<(String, ndarray::Array3<f32>)> = Vec::new();
        for (h, t) in decoded {
            match t {
                Ok(t) => ok.push((h, t)),
                Err(e) => {
                    failed.insert(h, e);
                }
            }
        }
        for batch in ok.chunks(batch_size) {
            let tensors: Vec<ndarray::ArrayView3<f32>> = batch.iter().map(|(_, t)| t.view()).collect();
            let stacked = ndarray::stack(ndarray::Axis(0), &tensors).expect("tensors of one preprocessing");
            let emb = encoder.embed(stacked.view())?;
            if emb.shape() != [batch.len(), dim] {
                return Err(Error::WrongVectorDimension { expected: dim, received: emb.ncols() });
            }
            for ((h, _), row) in batch.iter().zip(emb.rows()) {
                // A NaN or all-zero embedding would corrupt the graph's distances: leave it out.
                if row.iter().any(|v| !v.is_finite()) || row.iter().all(|v| *v == 0.0) {
                    failed.insert(h.clone(), "the model's embedding is not finite or is zero".into());
                    continue;
                }
                fresh_rows.insert(h.clone(), fresh.len() / dim);
                fresh.extend(row.iter());
                stats.embedded += 1;
            }
        }
        // Emit in manifest order.
        for (it, r) in chunk.iter().zip(hashes) {
            let hash = match r {
                Ok(h) => h,
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
        Ok(())
    })?;
    progress.finish();
    let n = records.len();
    Ok((records, Array2::from_shape_vec((n, dim), data).expect("rows of width dim"), stats))
}

/// Loads `dir` back from disk, verifies it and writes `verification.json` there. A generation
/// that does not load, or fails a check, is an [`Error::IndexVerification`].
pub fn verify_dir(dir: &Path, cfg: &VerifyConfig, self_rows: Option<&[u32]>) -> Result<VerifyReport> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let g = Generation::load(dir)
        .map_err(|e| Error::IndexVerification { generation: name.clone(), reason: format!("does not load: {e}") })?;
    let report = verify::verify(&g, cfg, self_rows);
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
    crate::fsutil::write_atomic(&dir.join(store::VERIFICATION), (text + "\n").as_bytes())?;
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
    self_rows: Option<&[u32]>,
) -> Result<(VerifyReport, Vec<PathBuf>)> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    tracing::info!(generation = %name, "phase: verifying");
    let report = verify_dir(dir, cfg, self_rows)?;
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

/// What a run hands to [`write_and_switch`]: the embedded catalogue and where it came from.
pub struct Embedded {
    pub manifest: PathBuf,
    pub image_root: PathBuf,
    pub model: ModelInfo,
    pub stats: EmbedStats,
    /// The items, in row order.
    pub records: Vec<ItemRecord>,
    /// Their unit-norm embeddings, one row each.
    pub embeddings: Array2<f32>,
}

/// The first 12 hex digits of a digest: enough to tell models apart in a log line (the whole
/// digest is logged once per run, not on every line of its span).
pub fn short_digest(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// The whole run (see the [module docs](super)).
#[tracing::instrument(skip(cfg, encoder), fields(out = %cfg.out.display(), model = %short_digest(encoder.digest())))]
pub fn run(cfg: &IndexConfig, encoder: &dyn Encoder) -> Result<IndexOutcome> {
    cfg.validate()?;
    tracing::info!(digest = %encoder.digest(), dim = encoder.dim(), "model");
    let root = IndexDir::new(&cfg.out);
    root.create()?;
    let _lock = root.lock()?;
    let started = Instant::now();
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
    let model = ModelInfo { path: cfg.model_path.clone(), digest: encoder.digest().to_string(), dim: encoder.dim() };
    let embedded = Embedded { manifest, image_root, model, stats, records, embeddings };
    let mut out = write_and_switch(&root, cfg, embedded)?;
    out.seconds.insert(0, ("embed", started.elapsed().as_secs_f64() - out.seconds.iter().map(|s| s.1).sum::<f64>()));
    Ok(out)
}

/// How the next generation's graph is made (see [`RebuildPolicy`]).
enum Plan {
    Full { reason: String },
    Incremental { prev: Box<Generation>, keep: Vec<Option<u32>>, inserted: usize, tombstones: usize, reason: String },
}

/// Decides between a full and an incremental build against the live generation.
fn plan(root: &IndexDir, cfg: &IndexConfig, e: &Embedded) -> Plan {
    let full = |reason: String| Plan::Full { reason };
    let policy = &cfg.rebuild;
    if policy.full {
        return full("--full was given".into());
    }
    let live = match root.current() {
        Ok(Some(name)) => name,
        Ok(None) => return full("there is no live generation to reuse".into()),
        Err(err) => return full(format!("CURRENT cannot be read ({err})")),
    };
    let prev = match Generation::load(&root.root.join(&live)) {
        Ok(g) => g,
        Err(err) => return full(format!("the live generation {live} does not load ({err})")),
    };
    if prev.meta.model.digest != e.model.digest || prev.meta.dim != e.embeddings.ncols() {
        return full(format!("the model differs from the one {live} was embedded with"));
    }
    if prev.meta.hnsw != cfg.hnsw {
        return full(format!(
            "HNSW parameters changed (m {} -> {}, ef-construction {} -> {})",
            prev.meta.hnsw.m, cfg.hnsw.m, prev.meta.hnsw.ef_construction, cfg.hnsw.ef_construction
        ));
    }
    let node_of = |row: u32| prev.hnsw.node_map().map_or(row, |m| m.node_of()[row as usize]);
    // A row keeps its node when the live generation has the same item with the same image and
    // the same vector (the embedding cache guarantees the last; it is checked anyway).
    let keep: Vec<Option<u32>> = e
        .records
        .par_iter()
        .enumerate()
        .map(|(r, rec)| {
            let v = e.embeddings.row(r);
            let row = prev.row_of(&rec.item.id)?;
            let same = prev.item(row).sha256 == rec.sha256
                && prev.exact.vector(row).iter().zip(v.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
            same.then(|| node_of(row))
        })
        .collect();
    let n = keep.len();
    let reused = keep.iter().flatten().count();
    let inserted = n - reused;
    let nodes = prev.hnsw.nodes() + inserted;
    let tombstones = nodes - n;
    let (share_new, share_dead) = (inserted as f64 / n as f64, tombstones as f64 / nodes as f64);
    if share_new > policy.max_inserted {
        return full(format!(
            "{inserted} of {n} rows are new or changed ({:.1}%, a full build above {:.0}%)",
            100.0 * share_new,
            100.0 * policy.max_inserted
        ));
    }
    if share_dead > policy.max_tombstones {
        return full(format!(
            "reusing {live} would leave {tombstones} tombstones ({:.1}% of {nodes} nodes, a full build above {:.0}%)",
            100.0 * share_dead,
            100.0 * policy.max_tombstones
        ));
    }
    let reason = format!(
        "{reused} rows reused from {live}, {inserted} new or changed, {tombstones} tombstones ({:.1}% of {nodes} nodes; a full build above {:.0}%)",
        100.0 * share_dead,
        100.0 * policy.max_tombstones
    );
    Plan::Incremental { prev: Box::new(prev), keep, inserted, tombstones, reason }
}

/// Builds the next generation from `e` (fully, or from the live one's graph, see [`plan`]),
/// writes it, verifies it from disk and switches CURRENT to it. The caller holds the lock.
pub fn write_and_switch(root: &IndexDir, cfg: &IndexConfig, e: Embedded) -> Result<IndexOutcome> {
    cfg.validate()?;
    let mut laps = Laps::start();
    let plan = plan(root, cfg, &e);
    laps.lap("plan");
    let (n, dir) = root.create_next()?;
    let name = store::generation_name(n);
    let rows = e.records.len();
    let graph_clock = Instant::now();
    let progress_label = |what: &str| Progress::new(what, rows as u64, "items");
    let prev_ef = match &plan {
        Plan::Incremental { prev, .. } => Some(prev.meta.ef_search),
        Plan::Full { .. } => None,
    };
    let (hnsw, build, graph_from, self_rows) = match plan {
        Plan::Full { reason } => {
            tracing::info!(generation = %name, path = "full", %reason, m = cfg.hnsw.m,
                ef_construction = cfg.hnsw.ef_construction, "phase: building graph");
            let progress = progress_label("building graph");
            let mut hnsw = HnswIndex::build(e.embeddings.view(), &cfg.hnsw, &progress)?;
            progress.finish();
            let t = Instant::now();
            hnsw.find_orphans(e.embeddings.view());
            let orphan_seconds = t.elapsed().as_secs_f64();
            let build = BuildInfo {
                path: BuildPath::Full,
                reason,
                from: None,
                reused: 0,
                inserted: rows,
                tombstones: 0,
                graph_seconds: 0.0,
                orphan_seconds,
            };
            (hnsw, build, None, None)
        }
        Plan::Incremental { prev, keep, inserted, tombstones, reason } => {
            tracing::info!(generation = %name, path = "incremental", %reason, "phase: building graph");
            let prev = *prev;
            let prev_dir = prev.dir.clone();
            let from = prev.name();
            // Inserting needs hnsw_rs's own form of the graph, which a generation loaded for
            // serving does not keep: load it again from the live generation's files.
            let base = if inserted > 0 {
                HnswIndex::load(
                    &prev_dir,
                    store::GRAPH,
                    prev.hnsw.nodes(),
                    prev.meta.dim,
                    prev.hnsw.node_map().cloned(),
                    true,
                )?
            } else {
                prev.hnsw
            };
            let progress = Progress::new("inserting", inserted as u64, "items");
            let mut hnsw = base.extend(e.embeddings.view(), &keep, &progress)?;
            progress.finish();
            let new_rows: Vec<u32> = (0..rows as u32).filter(|&r| keep[r as usize].is_none()).collect();
            let t = Instant::now();
            let orphans = hnsw.find_orphans(e.embeddings.view());
            let orphan_seconds = t.elapsed().as_secs_f64();
            // Self-retrieval after the build: every inserted row and orphan, and a seeded sample
            // of the reused rows (their links may have changed where new rows came in).
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.verify.seed ^ 0x5e1f);
            let reused: Vec<u32> = (0..rows as u32).filter(|&r| keep[r as usize].is_some()).collect();
            let mut check: Vec<u32> =
                rand::seq::index::sample(&mut rng, reused.len(), cfg.rebuild.self_sample.min(reused.len()))
                    .into_iter()
                    .map(|i| reused[i])
                    .chain(new_rows)
                    .chain(orphans)
                    .collect();
            check.sort_unstable();
            check.dedup();
            let build = BuildInfo {
                path: BuildPath::Incremental,
                reason,
                from: Some(from),
                reused: rows - inserted,
                inserted,
                tombstones,
                graph_seconds: 0.0,
                orphan_seconds,
            };
            (hnsw, build, (inserted == 0).then_some(prev_dir), Some(check))
        }
    };
    let build = BuildInfo { graph_seconds: graph_clock.elapsed().as_secs_f64(), ..build };
    // Verification widens `ef` from here. A reused graph starts at the breadth the live
    // generation needed (it only grew by a few rows), which saves re-measuring the narrower ones.
    let start_ef = cfg.ef_search.max(prev_ef.unwrap_or(0)).min(cfg.verify.max_ef.max(cfg.ef_search));
    laps.lap("graph");
    tracing::info!(generation = %name, "phase: writing generation");
    let meta = GenerationMeta {
        format: store::INDEX_FORMAT.into(),
        generation: n,
        created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        manifest: e.manifest,
        image_root: e.image_root,
        split: cfg.split,
        model: e.model,
        count: 0,
        dim: 0,
        hnsw: cfg.hnsw,
        ef_search: start_ef,
        stats: e.stats,
        files: Default::default(),
        hnsw_orphans: hnsw.orphans(),
        hnsw_nodes: None,
        build: Some(build.clone()),
    };
    let meta = store::write_generation(&dir, meta, &e.records, &e.embeddings, &hnsw, graph_from.as_deref())?;
    drop((hnsw, e.embeddings));
    laps.lap("write");
    let (report, removed) = verify_and_switch(root, &dir, &cfg.verify, cfg.keep, self_rows.as_deref())?;
    laps.lap("verify+switch");
    tracing::info!(generation = %name, items = meta.count, path = %build.path, "live");
    Ok(IndexOutcome {
        generation: name,
        dir,
        count: meta.count,
        stats: meta.stats,
        report,
        removed,
        build,
        seconds: laps.seconds,
    })
}

/// Wall seconds per phase (`hiercon index`, local or into Milvus).
pub(crate) struct Laps {
    clock: Instant,
    pub(crate) seconds: Vec<(&'static str, f64)>,
}

impl Laps {
    /// Starts the first phase now.
    pub(crate) fn start() -> Self {
        Laps { clock: Instant::now(), seconds: Vec::new() }
    }

    /// Ends the phase `name` now and starts the next.
    pub(crate) fn lap(&mut self, name: &'static str) {
        self.seconds.push((name, self.clock.elapsed().as_secs_f64()));
        self.clock = Instant::now();
    }
}
