//! `hiercon index --milvus`: embed a catalogue (reusing the embeddings of the live collection),
//! write it as a new collection, verify it, point the alias at it, drop old generations.
//!
//! The alias moves only after the new collection passed every check, so a run that fails or is
//! killed at any phase leaves the alias on the collection it named before. A later run drops the
//! leftovers (generations older than the live one beyond `--keep`, and any newer one that never
//! went live).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ndarray::Array2;
use rand::SeedableRng;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::client::{Client, params};
use super::collection::{self, CollectionMeta, FORMAT, VECTOR};
use super::proto::common::{IndexState, LoadState};
use crate::catalogue::Split;
use crate::encoder::Encoder;
use crate::image::Limits;
use crate::index::build::{EmbeddingCache, Laps, embed_items, read_manifest_items, short_digest};
use crate::index::exact::{ExactIndex, dot};
use crate::index::hnsw::HnswParams;
use crate::index::store::{ItemRecord, ModelInfo};
use crate::index::verify::{TIE_EPS, VerifyConfig, exact_kth};
use crate::progress::Progress;
use crate::{Error, Result};

/// A run's settings.
#[derive(Debug, Clone)]
pub struct MilvusIndexConfig {
    /// The Milvus proxy (`HOST:PORT`).
    pub address: String,
    /// The alias serve queries: generations are `<alias>_g<n>`.
    pub alias: String,
    pub manifest: PathBuf,
    pub model_path: Option<PathBuf>,
    pub split: Option<Split>,
    pub batch_size: usize,
    pub hnsw: HnswParams,
    pub ef_search: usize,
    /// Earlier generations kept besides the live one (for rollback).
    pub keep: usize,
    pub verify: VerifyConfig,
    pub limits: Limits,
    /// Deadline of each Milvus call.
    pub timeout: Duration,
    /// Longest wait for the index build and the load.
    pub build_timeout: Duration,
    /// In-memory replicas of the collection (more than one needs as many query nodes).
    pub replicas: i32,
    /// Rewrite even when nothing changed.
    pub force: bool,
}

impl MilvusIndexConfig {
    pub fn new(address: &str, alias: &str, manifest: impl Into<PathBuf>) -> Self {
        MilvusIndexConfig {
            address: address.into(),
            alias: alias.into(),
            manifest: manifest.into(),
            model_path: None,
            split: None,
            batch_size: 64,
            hnsw: HnswParams::default(),
            ef_search: 64,
            keep: 1,
            verify: VerifyConfig::default(),
            limits: Limits::default(),
            timeout: Duration::from_secs(30),
            build_timeout: Duration::from_secs(3600),
            replicas: 1,
            force: false,
        }
    }

    fn validate(&self) -> Result<()> {
        self.hnsw.validate()?;
        let ok_name = !self.alias.is_empty()
            && self.alias.len() <= 200
            && self.alias.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && self.alias.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok_name {
            return Err(Error::InvalidArgument {
                name: "collection",
                reason: format!(
                    "{:?}: Milvus names are a letter or `_` followed by letters, digits and `_`",
                    self.alias
                ),
            });
        }
        if self.keep == 0 {
            return Err(Error::InvalidArgument {
                name: "keep",
                reason: "must be at least 1: serve replicas may still be answering from the previous generation for a moment after the switch".into(),
            });
        }
        if self.batch_size == 0 || self.ef_search == 0 || self.replicas < 1 {
            return Err(Error::InvalidArgument {
                name: "batch-size",
                reason: "batch size, ef-search and replicas must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// What verification of a new collection found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MilvusVerify {
    pub passed: bool,
    pub reason: Option<String>,
    /// Rows Milvus counts in the collection.
    pub rows: u64,
    pub recall_k: usize,
    pub recall_queries: usize,
    /// Recall@k of Milvus's HNSW search against an exact scan of the same embeddings.
    pub recall: f64,
    pub ef_search: usize,
    pub ef_tried: Vec<(usize, f64)>,
    /// Sampled rows that did not find themselves first (a bitwise-identical twin counts).
    pub self_misses: usize,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct MilvusIndexOutcome {
    /// The collection the alias names after the run.
    pub collection: String,
    /// The collection it named before (`None`: the alias is new).
    pub previous: Option<String>,
    /// False when nothing changed and nothing was written.
    pub changed: bool,
    pub count: usize,
    pub embedded: usize,
    pub reused: usize,
    pub skipped: usize,
    pub verify: Option<MilvusVerify>,
    /// Collections dropped by `--keep` (and leftovers of failed runs).
    pub dropped: Vec<String>,
    /// Seconds per phase.
    pub seconds: Vec<(&'static str, f64)>,
}

/// The collection an alias names, with its metadata; `None` when the alias does not exist.
pub fn live_collection(client: &Client, alias: &str) -> Result<Option<(String, CollectionMeta)>> {
    if !client.has_collection(alias)? {
        return Ok(None);
    }
    let d = client.describe_collection(alias)?;
    // Milvus 2.3 echoes the asked name in `collection_name`; the schema carries the physical one.
    let schema_name = d.schema.as_ref().map(|s| s.name.clone()).unwrap_or_default();
    tracing::debug!(alias, collection_name = %d.collection_name, schema_name = %schema_name, aliases = ?d.aliases, "alias described");
    let name = [schema_name, d.collection_name.clone()]
        .into_iter()
        .find(|n| !n.is_empty() && n != alias)
        .unwrap_or_else(|| alias.to_string());
    if name == alias {
        return Err(Error::MilvusCollection {
            collection: alias.into(),
            reason: "is a collection, not an alias: hiercon points an alias at one collection per generation; \
                     choose another --collection name"
                .into(),
        });
    }
    let schema =
        d.schema.ok_or_else(|| Error::MilvusCollection { collection: name.clone(), reason: "no schema".into() })?;
    let meta = collection::read_meta(&name, &schema)?;
    Ok(Some((name, meta)))
}

/// Rows read back per query call.
const PAGE: usize = 4096;

/// Every row of collection `name` matching `expr` (`""`: all), in row order: the items and their
/// vectors (row-major). Read in pages of [`PAGE`] rows; the embedding cache of the next run and
/// `eval --milvus` read it this way.
pub fn read_rows(
    client: &Client,
    name: &str,
    meta: &CollectionMeta,
    expr: &str,
) -> Result<(Vec<ItemRecord>, Vec<f32>)> {
    let dim = meta.dim;
    let (mut records, mut vectors) = (Vec::new(), Vec::new());
    for start in (0..meta.count).step_by(PAGE) {
        let mut page = format!("row >= {start} and row < {}", start + PAGE);
        if !expr.is_empty() {
            page = format!("{page} and ({expr})");
        }
        let fields = client.query(name, &page, &["row", "item", VECTOR], None)?;
        let rows = collection::long_column(&fields, "row")?;
        let items = collection::item_column(&fields)?;
        let vecs = if rows.is_empty() { Vec::new() } else { collection::vector_column(&fields)? };
        if items.len() != rows.len() || vecs.len() != rows.len() * dim {
            return Err(Error::MilvusCollection {
                collection: name.into(),
                reason: "columns of different lengths (vectors of another width than its metadata says?)".into(),
            });
        }
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i]);
        for i in order {
            records.push(items[i].clone());
            vectors.extend_from_slice(&vecs[i * dim..(i + 1) * dim]);
        }
    }
    Ok((records, vectors))
}

/// sha256 over the rows as a run would write them.
fn content_digest(records: &[ItemRecord], emb: &Array2<f32>) -> String {
    let mut h = Sha256::new();
    for (r, row) in records.iter().zip(emb.rows()) {
        h.update(serde_json::to_vec(r).unwrap_or_default());
        h.update([0]);
        for x in row {
            h.update(x.to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Runs `index --milvus`.
#[tracing::instrument(skip(cfg, encoder), fields(alias = %cfg.alias, model = %short_digest(encoder.digest())))]
pub fn run(cfg: &MilvusIndexConfig, encoder: &dyn Encoder) -> Result<MilvusIndexOutcome> {
    cfg.validate()?;
    let mut laps = Laps::start();
    let client = Client::new(&cfg.address, cfg.timeout)?;
    let version = client.version()?;
    tracing::info!(address = %cfg.address, %version, "connected to Milvus");
    let items = read_manifest_items(&cfg.manifest, cfg.split)?;
    let manifest = std::path::absolute(&cfg.manifest).map_err(|e| Error::io(&cfg.manifest, e))?;
    let image_root = manifest.parent().map(Path::to_path_buf).unwrap_or_default();
    let live = live_collection(&client, &cfg.alias)?;
    let cache = match &live {
        Some((name, meta)) if meta.model.digest == encoder.digest() && meta.dim == encoder.dim() => {
            let (records, vectors) = read_rows(&client, name, meta, "")?;
            let hashes: Vec<String> = records.into_iter().map(|r| r.sha256).collect();
            let emb = Array2::from_shape_vec((hashes.len(), meta.dim), vectors).expect("rows of width dim");
            tracing::info!(collection = %name, rows = hashes.len(), "reusing the live collection's embeddings");
            EmbeddingCache::from_rows(&hashes, emb)
        }
        Some((name, _)) => {
            tracing::info!(collection = %name, "the live collection was embedded with another model; embedding everything");
            EmbeddingCache::empty()
        }
        None => EmbeddingCache::empty(),
    };
    tracing::info!(items = items.len(), "phase: embedding");
    let (records, embeddings, stats) = embed_items(&items, &image_root, encoder, &cache, cfg.batch_size, &cfg.limits)?;
    // Shared with verification's exact scan, never copied.
    let embeddings = Arc::new(embeddings);
    drop(cache);
    laps.lap("embed");
    if records.is_empty() {
        return Err(Error::EmptyIndex { reason: format!("none of the {} images could be read", items.len()) });
    }
    let content = content_digest(&records, &embeddings);
    let previous = live.as_ref().map(|(n, _)| n.clone());
    let outcome = |collection: String, changed, verify, dropped, seconds| MilvusIndexOutcome {
        collection,
        previous: previous.clone(),
        changed,
        count: records.len(),
        embedded: stats.embedded,
        reused: stats.reused,
        skipped: stats.skipped,
        verify,
        dropped,
        seconds,
    };
    if let Some((name, meta)) = &live
        && !cfg.force
        && meta.content == content
        && meta.hnsw == cfg.hnsw
        && meta.image_root == image_root
    {
        tracing::info!(collection = %name, "nothing changed: the live collection already holds these rows; nothing written");
        return Ok(outcome(name.clone(), false, None, Vec::new(), laps.seconds));
    }
    // The next generation number: above every generation of this alias, live or left over.
    let n = generations(&client, &cfg.alias)?.last().map_or(0, |(n, _)| *n) + 1;
    let name = collection::collection_name(&cfg.alias, n);
    let dim = embeddings.ncols();
    let mut meta = CollectionMeta {
        format: FORMAT.into(),
        generation: n,
        created_unix: now_unix(),
        manifest,
        image_root,
        split: cfg.split,
        model: ModelInfo { path: cfg.model_path.clone(), digest: encoder.digest().to_string(), dim },
        count: records.len(),
        dim,
        hnsw: cfg.hnsw,
        ef_search: cfg.ef_search,
        stats,
        content,
        summary: collection::Summary::of(&records),
    };
    tracing::info!(collection = %name, rows = records.len(), path = "full", "phase: writing collection");
    client.create_collection(&name, &collection::schema(&name, &meta)?, 1)?;
    insert_all(&client, &name, &records, &embeddings)?;
    client.flush(&name)?;
    laps.lap("insert");
    tracing::info!(collection = %name, m = cfg.hnsw.m, ef_construction = cfg.hnsw.ef_construction, "phase: HNSW index");
    client.create_index(&name, VECTOR, collection::index_params(&cfg.hnsw))?;
    wait_index(&client, &name, records.len(), cfg.build_timeout)?;
    client.load(&name, cfg.replicas)?;
    wait_loaded(&client, &name, cfg.build_timeout)?;
    laps.lap("index+load");
    tracing::info!(collection = %name, "phase: verification");
    let report = verify(&client, &name, &records, &embeddings, cfg)?;
    laps.lap("verify");
    if !report.passed {
        // Free its memory; the collection stays for inspection until a later run drops it.
        let _ = client.release(&name);
        return Err(Error::IndexVerification {
            generation: name,
            reason: format!(
                "{}; the alias {} still names {}",
                report.reason.clone().unwrap_or_default(),
                cfg.alias,
                previous.as_deref().unwrap_or("nothing")
            ),
        });
    }
    if report.ef_search != meta.ef_search {
        // The description was written before verification widened the breadth: record the
        // verified one as a collection property, which serve prefers.
        meta.ef_search = report.ef_search;
        client.set_property(&name, collection::EF_PROPERTY, &report.ef_search.to_string())?;
    }
    client.point_alias(&cfg.alias, &name, live.is_some())?;
    tracing::info!(alias = %cfg.alias, collection = %name, previous = ?previous, "alias switched");
    let dropped = gc(&client, &cfg.alias, n, previous.as_deref(), cfg.keep);
    laps.lap("switch+gc");
    Ok(outcome(name, true, Some(report), dropped, laps.seconds))
}

/// Inserts every row in calls of about 8 MB.
fn insert_all(client: &Client, name: &str, records: &[ItemRecord], emb: &Array2<f32>) -> Result<()> {
    let dim = emb.ncols();
    let per_call = ((8 << 20) / (dim * 4 + 1024)).clamp(1, 20_000);
    let progress = Progress::new("inserting", records.len() as u64, "rows");
    let flat =
        emb.as_slice().ok_or_else(|| Error::Milvus { op: "insert", reason: "embeddings not contiguous".into() })?;
    for start in (0..records.len()).step_by(per_call) {
        let end = (start + per_call).min(records.len());
        let cols = collection::columns(start, &records[start..end], &flat[start * dim..end * dim], dim)?;
        client.insert(name, cols, end - start)?;
        progress.inc((end - start) as u64);
    }
    progress.finish();
    Ok(())
}

fn wait_index(client: &Client, name: &str, rows: usize, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let (state, indexed, total, why) = client.index_progress(name, VECTOR)?;
        match state {
            IndexState::Finished if indexed as usize >= rows || total == 0 => return Ok(()),
            IndexState::Failed => {
                return Err(Error::Milvus {
                    op: "create index",
                    reason: format!("{name}: the index build failed: {why}"),
                });
            }
            _ => {}
        }
        if started.elapsed() > timeout {
            return Err(Error::Milvus {
                op: "create index",
                reason: format!("{name}: {indexed} of {total} rows indexed after {} s", timeout.as_secs()),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_loaded(client: &Client, name: &str, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    while client.load_state(name)? != LoadState::Loaded {
        if started.elapsed() > timeout {
            return Err(Error::Milvus {
                op: "load collection",
                reason: format!("{name} not loaded after {} s", timeout.as_secs()),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Queries per search call during verification.
const VERIFY_BATCH: usize = 64;

/// The ids of the top `k` hits of each query, and their scores.
fn search_ids(client: &Client, name: &str, queries: &[&[f32]], k: usize, ef: usize) -> Result<Vec<Vec<(String, f32)>>> {
    let mut out = Vec::with_capacity(queries.len());
    for chunk in queries.chunks(VERIFY_BATCH) {
        let r = client.search(name, chunk, "", &[], search_params(k, ef))?;
        out.extend(
            super::backend::split_hits(&r)?
                .into_iter()
                .map(|hits| hits.into_iter().map(|h| (h.id, h.score)).collect::<Vec<_>>()),
        );
    }
    Ok(out)
}

/// The search parameters of a top-`k` HNSW search at breadth `ef` (Milvus needs `ef >= k`).
pub fn search_params(k: usize, ef: usize) -> Vec<super::proto::common::KeyValuePair> {
    params([
        ("anns_field", VECTOR.to_string()),
        ("topk", k.to_string()),
        ("metric_type", "IP".to_string()),
        ("params", format!("{{\"ef\": {}}}", ef.max(k))),
        ("round_decimal", "-1".to_string()),
    ])
}

/// Count, tie-aware recall@k against an exact scan of the same embeddings (widening `ef` up to
/// `max_ef` as local verification does), and self-retrieval of the recall sample.
fn verify(
    client: &Client,
    name: &str,
    records: &[ItemRecord],
    emb: &Arc<Array2<f32>>,
    cfg: &MilvusIndexConfig,
) -> Result<MilvusVerify> {
    let v = &cfg.verify;
    let n = records.len();
    let rows = client.row_count(name)?;
    let mut report = MilvusVerify {
        passed: false,
        reason: None,
        rows,
        recall_k: v.recall_k.min(n),
        recall_queries: 0,
        recall: 0.0,
        ef_search: cfg.ef_search,
        ef_tried: Vec::new(),
        self_misses: 0,
    };
    if rows as usize != n {
        report.reason = Some(format!("Milvus counts {rows} rows, {n} were written"));
        return Ok(report);
    }
    let row_of: HashMap<&str, usize> = records.iter().enumerate().map(|(r, rec)| (rec.item.id.as_str(), r)).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(v.seed);
    let sample: Vec<usize> = rand::seq::index::sample(&mut rng, n, v.recall_sample.min(n)).into_iter().collect();
    report.recall_queries = sample.len();
    let k = report.recall_k;
    let exact = ExactIndex::new(emb.clone());
    let sample_rows: Vec<u32> = sample.iter().map(|&r| r as u32).collect();
    let kth = exact_kth(&exact, &sample_rows, k);
    let queries: Vec<&[f32]> = sample_rows.iter().map(|&r| exact.vector(r)).collect();
    let mut ef = cfg.ef_search;
    loop {
        let hits = search_ids(client, name, &queries, k, ef)?;
        let mut good = 0usize;
        let mut self_misses = 0usize;
        for ((&q, hits), &kth) in sample.iter().zip(&hits).zip(&kth) {
            let qv = exact.vector(q as u32);
            let scores: Vec<Option<f32>> =
                hits.iter().map(|(id, _)| row_of.get(id.as_str()).map(|&r| dot(qv, exact.vector(r as u32)))).collect();
            good += scores.iter().flatten().filter(|&&s| s >= kth - TIE_EPS).count();
            let first = hits.first().and_then(|(id, _)| row_of.get(id.as_str()).copied());
            let found_self =
                first.is_some_and(|r| {
                    r == q || exact.vector(r as u32).iter().zip(qv).all(|(a, b)| a.to_bits() == b.to_bits())
                }) || hits.iter().any(|(id, s)| row_of.get(id.as_str()) == Some(&q) && *s >= hits[0].1 - TIE_EPS);
            if !found_self {
                self_misses += 1;
            }
        }
        let recall = good as f64 / (k * sample.len()).max(1) as f64;
        report.ef_tried.push((ef, recall));
        report.recall = recall;
        report.self_misses = self_misses;
        report.ef_search = ef;
        if recall >= v.min_recall || ef >= v.max_ef {
            break;
        }
        ef = (ef * 2).min(v.max_ef);
    }
    if report.recall < v.min_recall {
        report.reason = Some(format!(
            "recall@{k} {:.4} < {} at ef {} (the widest allowed)",
            report.recall, v.min_recall, report.ef_search
        ));
    } else if report.self_misses > v.max_self_misses {
        report.reason = Some(format!("{} sampled items did not find themselves first", report.self_misses));
    } else {
        report.passed = true;
    }
    Ok(report)
}

/// The collections that are generations of `alias`, oldest first.
fn generations(client: &Client, alias: &str) -> Result<Vec<(u64, String)>> {
    let mut gens: Vec<(u64, String)> = client
        .collections()?
        .into_iter()
        .filter_map(|c| collection::generation_of(alias, &c).map(|n| (n, c)))
        .collect();
    gens.sort();
    Ok(gens)
}

/// Drops old generations of `alias`: keeps `live`, `previous` (the one live before, kept loaded
/// for an instant rollback) and the `keep - 1` newest generations older than `previous`
/// (released); drops the rest, which includes leftovers of failed runs newer than `previous`.
/// Failures are logged, never fatal: the switch has happened. One index run per alias at a time.
fn gc(client: &Client, alias: &str, live: u64, previous: Option<&str>, keep: usize) -> Vec<String> {
    let gens = match generations(client, alias) {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!("cannot list collections to drop old generations: {e}");
            return Vec::new();
        }
    };
    let prev_n = previous.and_then(|p| collection::generation_of(alias, p));
    let mut kept = 0;
    let mut dropped = Vec::new();
    for (n, c) in gens.into_iter().rev() {
        if n == live {
            continue;
        }
        if Some(n) == prev_n && keep > 0 {
            kept += 1;
            continue;
        }
        if prev_n.is_some_and(|p| n < p) && kept < keep {
            kept += 1;
            let _ = client.release(&c);
            continue;
        }
        match client.drop_collection(&c) {
            Ok(()) => {
                tracing::info!(collection = %c, "dropped old generation");
                dropped.push(c);
            }
            Err(e) => tracing::warn!(collection = %c, "cannot drop: {e}"),
        }
    }
    dropped
}
