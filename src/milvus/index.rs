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
use super::proto::common::{IndexState, KeyValuePair, LoadState};
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
    /// How a change reaches Milvus: a new collection, or the change applied to the standby.
    pub write: WritePath,
    /// How long after leaving service the standby may be written: serve replicas re-read the
    /// alias every [`super::backend::REFRESH`], and a search already sent may still run.
    pub standby_grace: Duration,
    /// Longest wait for a changed standby to pass verification while Milvus settles.
    pub settle: Duration,
}

/// How `index --milvus` writes a changed catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WritePath {
    /// A change of at most [`DELTA_MAX_SHARE`] of the rows goes into the standby, anything
    /// larger (or no usable standby) into a new collection.
    Auto,
    /// Always a new collection: every row inserted, the HNSW index built from scratch.
    Full,
    /// Always the standby (an error when there is none that can take it).
    Delta,
}

/// The largest share of changed rows (deleted plus inserted, against the new row count) that
/// `auto` applies to the standby in place: `make bench-milvus` measures both paths (the
/// "nightly" table of `bench/results/milvus-side-by-side.md`).
pub const DELTA_MAX_SHARE: f64 = 0.2;

/// Which path a run took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Written {
    /// Nothing changed; nothing was written.
    Nothing,
    /// A new collection.
    Full,
    /// The change applied to the standby collection, which then went live.
    Delta,
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
            write: WritePath::Auto,
            standby_grace: Duration::from_secs(60),
            settle: Duration::from_secs(300),
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
    /// The first few of them, with what came first instead.
    pub self_miss_examples: Vec<String>,
    /// Verifications run (a changed standby is checked again until Milvus has settled).
    pub attempts: usize,
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
    /// Which path the run took, and why.
    pub written: Written,
    pub why: String,
    /// Rows deleted from and inserted into the collection that went live (a full write inserts
    /// every row).
    pub deleted: usize,
    pub inserted: usize,
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

/// A generation collection as Milvus describes it.
#[derive(Debug, Clone)]
pub struct GenerationInfo {
    /// The physical collection.
    pub name: String,
    pub meta: CollectionMeta,
    /// Its properties (the verified search breadth, when it went live, rewritten metadata).
    pub properties: Vec<KeyValuePair>,
}

impl GenerationInfo {
    /// The search breadth verification passed at.
    pub fn ef_search(&self) -> usize {
        collection::property(&self.properties, collection::EF_PROPERTY)
            .and_then(|v| v.parse().ok())
            .unwrap_or(self.meta.ef_search)
    }

    /// When the alias was last pointed at it (unix seconds), when hiercon recorded it.
    pub fn switched_unix(&self) -> Option<u64> {
        self.switched_ms().map(|ms| ms / 1000)
    }

    /// The same in milliseconds: the property holds seconds with a millisecond fraction (whole
    /// seconds where written before the fraction was added), so two switches within one second
    /// still order.
    pub fn switched_ms(&self) -> Option<u64> {
        collection::property(&self.properties, collection::SWITCHED_PROPERTY).and_then(stamp_ms)
    }
}

/// Describes the generation collection `name`.
pub fn describe_generation(client: &Client, name: &str) -> Result<GenerationInfo> {
    let d = client.describe_collection(name)?;
    let schema =
        d.schema.ok_or_else(|| Error::MilvusCollection { collection: name.into(), reason: "no schema".into() })?;
    let meta = collection::read_meta(name, &schema, &d.properties)?;
    Ok(GenerationInfo { name: name.into(), meta, properties: d.properties })
}

/// The collection an alias names, with its metadata; `None` when the alias does not exist.
pub fn live_collection(client: &Client, alias: &str) -> Result<Option<GenerationInfo>> {
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
    describe_generation(client, &name).map(Some)
}

/// Rows read back per query call.
const PAGE: usize = 4096;

/// Rows at positions `0..upto` of collection `name` matching `expr` (`""`: all), sorted by
/// position: their positions, items and vectors (row-major, `dim` wide). Read in pages of
/// [`PAGE`] positions.
fn read_positions(
    client: &Client,
    name: &str,
    dim: usize,
    upto: usize,
    expr: &str,
) -> Result<(Vec<i64>, Vec<ItemRecord>, Vec<f32>)> {
    let (mut positions, mut records, mut vectors) = (Vec::new(), Vec::new(), Vec::new());
    for start in (0..upto).step_by(PAGE) {
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
            positions.push(rows[i]);
            records.push(items[i].clone());
            vectors.extend_from_slice(&vecs[i * dim..(i + 1) * dim]);
        }
    }
    Ok((positions, records, vectors))
}

/// Every row of collection `name` matching `expr` (`""`: all), in row order: the items and their
/// vectors (row-major). The embedding cache of the next run and `eval --milvus` read it this way.
pub fn read_rows(
    client: &Client,
    name: &str,
    meta: &CollectionMeta,
    expr: &str,
) -> Result<(Vec<ItemRecord>, Vec<f32>)> {
    let (_, records, vectors) = read_positions(client, name, meta.dim, meta.count, expr)?;
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

/// Now as unix seconds with a millisecond fraction, for [`collection::SWITCHED_PROPERTY`].
fn switch_stamp() -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

/// Milliseconds of a [`switch_stamp`] (or of whole seconds, as written before it).
fn stamp_ms(v: &str) -> Option<u64> {
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: u64 = secs.parse().ok()?;
    let ms: u64 = match frac.len() {
        0 => 0,
        1..=3 if frac.bytes().all(|b| b.is_ascii_digit()) => {
            frac.parse::<u64>().ok()? * 10u64.pow(3 - frac.len() as u32)
        }
        _ => return None,
    };
    secs.checked_mul(1000)?.checked_add(ms)
}

/// Runs `index --milvus`.
#[tracing::instrument(skip(cfg, encoder), fields(alias = %cfg.alias, model = %short_digest(encoder.digest())))]
pub fn run(cfg: &MilvusIndexConfig, encoder: &dyn Encoder) -> Result<MilvusIndexOutcome> {
    cfg.validate()?;
    let mut laps = Laps::start();
    let client = Client::new(&cfg.address, cfg.timeout)?;
    let version = client.version()?;
    tracing::info!(address = %cfg.address, %version, "connected to Milvus");
    // Every read of this run sees every write made before it started, and its own.
    client.read_after_now()?;
    let items = read_manifest_items(&cfg.manifest, cfg.split)?;
    let manifest = std::path::absolute(&cfg.manifest).map_err(|e| Error::io(&cfg.manifest, e))?;
    let image_root = manifest.parent().map(Path::to_path_buf).unwrap_or_default();
    let live = live_collection(&client, &cfg.alias)?;
    let cache = match &live {
        Some(g) if g.meta.model.digest == encoder.digest() && g.meta.dim == encoder.dim() => {
            ensure_loaded(&client, &g.name, cfg)?;
            let (records, vectors) = read_rows(&client, &g.name, &g.meta, "")?;
            let hashes: Vec<String> = records.into_iter().map(|r| r.sha256).collect();
            let emb = Array2::from_shape_vec((hashes.len(), g.meta.dim), vectors).expect("rows of width dim");
            tracing::info!(collection = %g.name, rows = hashes.len(), "reusing the live collection's embeddings");
            EmbeddingCache::from_rows(&hashes, emb)
        }
        Some(g) => {
            tracing::info!(collection = %g.name, "the live collection was embedded with another model; embedding everything");
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
    let previous = live.as_ref().map(|g| g.name.clone());
    let outcome =
        |collection: String, written, why: String, (deleted, inserted), verify, dropped, seconds| MilvusIndexOutcome {
            collection,
            previous: previous.clone(),
            changed: written != Written::Nothing,
            written,
            why,
            deleted,
            inserted,
            count: records.len(),
            embedded: stats.embedded,
            reused: stats.reused,
            skipped: stats.skipped,
            verify,
            dropped,
            seconds,
        };
    if let Some(g) = &live
        && !cfg.force
        && g.meta.content == content
        && g.meta.hnsw == cfg.hnsw
        && g.meta.image_root == image_root
    {
        tracing::info!(collection = %g.name, "nothing changed: the live collection already holds these rows; nothing written");
        let why = "the live collection already holds these rows".to_string();
        return Ok(outcome(g.name.clone(), Written::Nothing, why, (0, 0), None, Vec::new(), laps.seconds));
    }
    let dim = embeddings.ncols();
    let plan = match cfg.write {
        WritePath::Full => Err("--write full".to_string()),
        WritePath::Auto | WritePath::Delta => plan_delta(&client, cfg, encoder, live.as_ref(), &records, &embeddings)?,
    };
    let (written, why, name, n, changes) = match plan {
        Ok(delta) => {
            let why = format!(
                "{} of {} rows change ({:.1} %): applied to the standby {}",
                delta.changed(),
                records.len(),
                100.0 * delta.share(records.len()),
                delta.standby.name
            );
            let n = collection::generation_of(&cfg.alias, &delta.standby.name).unwrap_or(delta.standby.meta.generation);
            (Written::Delta, why, delta.standby.name.clone(), n, Some(delta))
        }
        Err(why) if cfg.write == WritePath::Delta => {
            return Err(Error::InvalidArgument {
                name: "write",
                reason: format!("delta: the change cannot be applied to a standby collection: {why}"),
            });
        }
        Err(why) => {
            // The next generation number: above every generation of this alias, live or left over.
            let n = generations(&client, &cfg.alias)?.last().map_or(0, |(n, _)| *n) + 1;
            (Written::Full, format!("new collection: {why}"), collection::collection_name(&cfg.alias, n), n, None)
        }
    };
    tracing::info!(path = ?written, "{why}");
    laps.lap("plan");
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
    let counts = match &changes {
        None => {
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
            (0, records.len())
        }
        Some(delta) => {
            tracing::info!(collection = %name, deleted = delta.deletes.len(), inserted = delta.inserts.len(), path = "delta", "phase: writing collection");
            apply_delta(&client, delta, &records, &embeddings)?;
            laps.lap("delete+insert");
            (delta.deletes.len(), delta.inserts.len())
        }
    };
    tracing::info!(collection = %name, "phase: verification");
    // Right after a change in place Milvus is still sealing, compacting, indexing and handing
    // over the standby's segments, and for a while some rows may not come back from a search
    // (seen with 2.3.5 after changes of 10 % and more). The standby serves no one, so a failed
    // check is repeated until Milvus has settled, up to `settle`; only a pass goes live.
    let settle_until = Instant::now() + cfg.settle;
    let mut attempts = 0;
    let report = loop {
        attempts += 1;
        let mut report = verify(&client, &name, &records, &embeddings, cfg)?;
        if report.passed
            && let Some(delta) = &changes
            && let Err(why) = check_positions(&client, &name, &records, delta)
        {
            report.passed = false;
            report.reason = Some(why);
        }
        report.attempts = attempts;
        if report.passed || changes.is_none() || Instant::now() >= settle_until {
            break report;
        }
        tracing::info!(
            collection = %name,
            reason = report.reason.as_deref().unwrap_or_default(),
            "the changed standby is not settled yet: checking again in {} s",
            SETTLE_POLL.as_secs()
        );
        std::thread::sleep(SETTLE_POLL);
    };
    laps.lap("verify");
    if !report.passed {
        // Free a new collection's memory; it stays for inspection until a later run drops it.
        // (A standby stays loaded: it is the rollback generation of the one before.)
        if changes.is_none() {
            let _ = client.release(&name);
        }
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
    meta.ef_search = report.ef_search;
    if changes.is_some() {
        // The description still holds the standby's old metadata: the property supersedes it.
        let json = serde_json::to_string(&meta)
            .map_err(|e| Error::MilvusCollection { collection: name.clone(), reason: format!("metadata: {e}") })?;
        client.set_property(&name, collection::META_PROPERTY, &json)?;
    }
    // serve prefers the property (the description was written before verification).
    client.set_property(&name, collection::EF_PROPERTY, &report.ef_search.to_string())?;
    client.set_property(&name, collection::SWITCHED_PROPERTY, &switch_stamp())?;
    client.point_alias(&cfg.alias, &name, live.is_some())?;
    tracing::info!(alias = %cfg.alias, collection = %name, previous = ?previous, "alias switched");
    let dropped = gc(&client, &cfg.alias, n, previous.as_deref(), cfg.keep);
    laps.lap("switch+gc");
    Ok(outcome(name, written, why, counts, Some(report), dropped, laps.seconds))
}

/// A change to apply to the standby collection.
#[derive(Debug)]
struct Delta {
    standby: GenerationInfo,
    /// Ids to delete (every row of each).
    deletes: Vec<String>,
    /// Rows of the new catalogue to insert, each with its position.
    inserts: Vec<(usize, i64)>,
    /// Rows kept as they are: position of each row of the new catalogue (-1: inserted).
    positions: Vec<i64>,
}

impl Delta {
    fn changed(&self) -> usize {
        self.deletes.len() + self.inserts.len()
    }

    fn share(&self, rows: usize) -> f64 {
        self.changed() as f64 / rows.max(1) as f64
    }
}

/// The change that turns the standby collection (the newest generation that is not live, made
/// with the same model, dimension and HNSW settings, out of service for at least the grace
/// period) into the new rows; `Err(why not)` when there is none or, under `auto`, when the
/// change is too large to be worth it.
fn plan_delta(
    client: &Client,
    cfg: &MilvusIndexConfig,
    encoder: &dyn Encoder,
    live: Option<&GenerationInfo>,
    records: &[ItemRecord],
    emb: &Array2<f32>,
) -> Result<std::result::Result<Delta, String>> {
    let Some(live) = live else { return Ok(Err("the alias is new".into())) };
    let since = live.switched_unix().unwrap_or(live.meta.created_unix);
    let out_of_service = now_unix().saturating_sub(since);
    let mut why_not = Vec::new();
    let mut standby = None;
    for (_, name) in generations(client, &cfg.alias)?.into_iter().rev() {
        if name == live.name {
            continue;
        }
        let g = match describe_generation(client, &name) {
            Ok(g) => g,
            Err(e) => {
                why_not.push(format!("{name}: {e}"));
                continue;
            }
        };
        if g.meta.model.digest != encoder.digest() || g.meta.dim != encoder.dim() {
            why_not.push(format!("{name} was embedded with another model"));
        } else if g.meta.hnsw != cfg.hnsw {
            why_not.push(format!("{name} has other HNSW settings"));
        } else if !matches!(client.index_progress(&name, VECTOR), Ok((IndexState::Finished, ..))) {
            why_not.push(format!("{name} has no finished HNSW index"));
        } else {
            standby = Some(g);
            break;
        }
    }
    let Some(standby) = standby else {
        return Ok(Err(if why_not.is_empty() {
            "no standby collection (the previous generation is kept with --keep)".into()
        } else {
            format!("no usable standby ({})", why_not.join("; "))
        }));
    };
    if out_of_service < cfg.standby_grace.as_secs() {
        return Ok(Err(format!(
            "the standby {} left service {out_of_service} s ago; serve replicas may read it for {} s after a switch",
            standby.name,
            cfg.standby_grace.as_secs()
        )));
    }
    let n = records.len();
    let dim = emb.ncols();
    // A standby kept beyond the previous generation is released (and after a restart Milvus may
    // still be loading it): it must be loaded to be read, searched and switched to.
    ensure_loaded(client, &standby.name, cfg)?;
    let (positions, old, vectors) = read_positions(client, &standby.name, dim, standby.meta.count.max(n), "")?;
    let total = client.count(&standby.name, "")? as usize;
    if total != positions.len() {
        return Ok(Err(format!(
            "the standby {} holds {total} rows, {} at positions below {}",
            standby.name,
            positions.len(),
            standby.meta.count.max(n)
        )));
    }
    let (deletes, inserts, positions) = diff(&positions, &old, &vectors, records, emb);
    let delta = Delta { standby, deletes, inserts, positions };
    if cfg.write == WritePath::Auto && delta.share(n) > DELTA_MAX_SHARE {
        return Ok(Err(format!(
            "{} of {n} rows change ({:.1} %), more than the {:.0} % a change in place is cheaper for",
            delta.changed(),
            100.0 * delta.share(n),
            100.0 * DELTA_MAX_SHARE
        )));
    }
    Ok(Ok(delta))
}

/// What turns rows `old` (at `positions`, vectors row-major) into `records` (vectors `emb`,
/// positions `0..records.len()`): the ids to delete, the rows to insert with their positions,
/// and every new row's position. A row stays when its id occurs once in `old`, its item,
/// image hash and vector bits are equal, and its position is free and below the new count;
/// everything else is deleted and inserted again.
fn diff(
    positions: &[i64],
    old: &[ItemRecord],
    vectors: &[f32],
    records: &[ItemRecord],
    emb: &Array2<f32>,
) -> (Vec<String>, Vec<(usize, i64)>, Vec<i64>) {
    let n = records.len();
    let dim = emb.ncols();
    // An id seen twice (an insert of a killed run that was retried) is rewritten whole.
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for r in old {
        *seen.entry(r.item.id.as_str()).or_insert(0) += 1;
    }
    let old_row: HashMap<&str, usize> = old.iter().enumerate().map(|(i, r)| (r.item.id.as_str(), i)).collect();
    let mut taken = vec![false; n];
    let mut at = vec![-1i64; n];
    let mut reasons: std::collections::BTreeMap<&str, usize> = Default::default();
    for (t, r) in records.iter().enumerate() {
        let id = r.item.id.as_str();
        let Some(&o) = old_row.get(id) else { continue };
        let pos = positions[o];
        let why = if seen[id] != 1 {
            "duplicate id"
        } else if old[o].sha256 != r.sha256 {
            "other image"
        } else if old[o] != *r {
            "other item record"
        } else if !(0..n as i64).contains(&pos) || taken[pos as usize] {
            "position"
        } else if !vectors[o * dim..(o + 1) * dim].iter().zip(emb.row(t)).all(|(a, b)| a.to_bits() == b.to_bits()) {
            "other vector"
        } else {
            ""
        };
        if !why.is_empty() {
            *reasons.entry(why).or_insert(0usize) += 1;
        }
        if why.is_empty() {
            taken[pos as usize] = true;
            at[t] = pos;
        }
    }
    let kept: std::collections::HashSet<&str> =
        records.iter().zip(&at).filter(|(_, p)| **p >= 0).map(|(r, _)| r.item.id.as_str()).collect();
    let mut deletes: Vec<String> = seen.keys().filter(|id| !kept.contains(*id)).map(|id| id.to_string()).collect();
    deletes.sort();
    let mut free = (0..n as i64).filter(|&p| !taken[p as usize]);
    let inserts: Vec<(usize, i64)> = (0..n)
        .filter(|&t| at[t] < 0)
        .map(|t| (t, free.next().expect("as many free positions as rows to insert")))
        .collect();
    for &(t, p) in &inserts {
        at[t] = p;
    }
    tracing::info!(rewritten = ?reasons, new = records.iter().filter(|r| !old_row.contains_key(r.item.id.as_str())).count(), "rows of the standby to rewrite");
    (deletes, inserts, at)
}

/// Pause between its verifications.
const SETTLE_POLL: Duration = Duration::from_secs(5);

/// Ids per delete call.
const DELETE_BATCH: usize = 1000;

/// Deletes, then inserts (a delete names an id, so it must come first), then flushes.
fn apply_delta(client: &Client, delta: &Delta, records: &[ItemRecord], emb: &Array2<f32>) -> Result<()> {
    let name = &delta.standby.name;
    let dim = emb.ncols();
    for chunk in delta.deletes.chunks(DELETE_BATCH) {
        let ids: Vec<String> = chunk.iter().map(|id| collection::literal(id)).collect();
        client.delete(name, &format!("id in [{}]", ids.join(", ")))?;
    }
    let per_call = rows_per_insert(dim);
    let progress = Progress::new("inserting", delta.inserts.len() as u64, "rows");
    for chunk in delta.inserts.chunks(per_call) {
        let rows: Vec<i64> = chunk.iter().map(|&(_, p)| p).collect();
        let recs: Vec<ItemRecord> = chunk.iter().map(|&(t, _)| records[t].clone()).collect();
        let mut vecs = Vec::with_capacity(chunk.len() * dim);
        for &(t, _) in chunk {
            vecs.extend(emb.row(t).iter().copied());
        }
        client.insert(name, collection::columns_at(&rows, &recs, &vecs, dim)?, chunk.len())?;
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    client.flush(name)
}

/// After a change in place: every row of the new catalogue is in the collection once, at the
/// position the plan gave it, with its image hash, and nothing else is.
fn check_positions(
    client: &Client,
    name: &str,
    records: &[ItemRecord],
    delta: &Delta,
) -> std::result::Result<(), String> {
    let n = records.len();
    let mut found = vec![false; n];
    let row_of: HashMap<&str, usize> = records.iter().enumerate().map(|(t, r)| (r.item.id.as_str(), t)).collect();
    for start in (0..n).step_by(PAGE * 4) {
        let expr = format!("row >= {start} and row < {}", start + PAGE * 4);
        let fields = client.query(name, &expr, &["row", "id", "sha256"], None).map_err(|e| e.to_string())?;
        let rows = collection::long_column(&fields, "row").map_err(|e| e.to_string())?;
        let ids = collection::string_column(&fields, "id").map_err(|e| e.to_string())?;
        let shas = collection::string_column(&fields, "sha256").map_err(|e| e.to_string())?;
        for ((pos, id), sha) in rows.iter().zip(&ids).zip(&shas) {
            match row_of.get(id.as_str()) {
                Some(&t) if delta.positions[t] == *pos && records[t].sha256 == *sha && !found[t] => found[t] = true,
                _ => {
                    return Err(format!(
                        "after the change the standby holds {id:?} at position {pos}, which the plan does not"
                    ));
                }
            }
        }
    }
    let missing = found.iter().filter(|f| !**f).count();
    let total = client.count(name, "").map_err(|e| e.to_string())? as usize;
    if missing > 0 || total != n {
        return Err(format!("after the change the standby holds {total} rows, {missing} of the {n} rows missing"));
    }
    Ok(())
}

/// Rows per insert call: about 8 MB of vectors and item JSON.
fn rows_per_insert(dim: usize) -> usize {
    ((8 << 20) / (dim * 4 + 1024)).clamp(1, 20_000)
}

/// Inserts every row in calls of about 8 MB.
fn insert_all(client: &Client, name: &str, records: &[ItemRecord], emb: &Array2<f32>) -> Result<()> {
    let dim = emb.ncols();
    let per_call = rows_per_insert(dim);
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

/// Loads a collection that is not (a released standby; after a restart Milvus loads what was
/// loaded again, which takes a moment) and waits until it is.
fn ensure_loaded(client: &Client, name: &str, cfg: &MilvusIndexConfig) -> Result<()> {
    match client.load_state(name)? {
        LoadState::Loaded => return Ok(()),
        LoadState::Loading => tracing::info!(collection = %name, "waiting for Milvus to load it"),
        _ => {
            tracing::info!(collection = %name, "loading");
            client.load(name, cfg.replicas)?;
        }
    }
    wait_loaded(client, name, cfg.build_timeout)
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

/// Count, tie-aware recall@k against an exact scan of the same embeddings, and self-retrieval
/// of the recall sample; while either falls short `ef` is doubled up to `max_ef`, as local
/// verification does (a collection changed in place searches its old graph with the deleted
/// rows filtered out, which needs a wider beam now and then).
fn verify(
    client: &Client,
    name: &str,
    records: &[ItemRecord],
    emb: &Arc<Array2<f32>>,
    cfg: &MilvusIndexConfig,
) -> Result<MilvusVerify> {
    let v = &cfg.verify;
    let n = records.len();
    let rows = client.count(name, "")?;
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
        self_miss_examples: Vec::new(),
        attempts: 1,
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
        report.self_miss_examples.clear();
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
                if report.self_miss_examples.len() < 5 {
                    let first = hits.first().map_or("nothing".to_string(), |(id, s)| format!("{id:?} at {s:.4}"));
                    report.self_miss_examples.push(format!("{:?} found {first}", records[q].item.id));
                }
            }
        }
        let recall = good as f64 / (k * sample.len()).max(1) as f64;
        report.ef_tried.push((ef, recall));
        report.recall = recall;
        report.self_misses = self_misses;
        report.ef_search = ef;
        if (recall >= v.min_recall && self_misses <= v.max_self_misses) || ef >= v.max_ef {
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
        report.reason = Some(format!(
            "{} sampled items did not find themselves first ({})",
            report.self_misses,
            report.self_miss_examples.join("; ")
        ));
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
/// for an instant rollback) and the `keep - 1` generations that went live most recently before
/// it (released); drops the rest, which includes leftovers of failed runs. A generation "went
/// live" when it carries [`collection::SWITCHED_PROPERTY`] (ordered by it: a change applied to
/// the standby makes numbers no longer follow time) or, written before that property existed,
/// when its number is below `previous`'s. Failures are logged, never fatal: the switch has
/// happened. One index run per alias at a time.
fn gc(client: &Client, alias: &str, live: u64, previous: Option<&str>, keep: usize) -> Vec<String> {
    let gens = match generations(client, alias) {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!("cannot list collections to drop old generations: {e}");
            return Vec::new();
        }
    };
    let prev_n = previous.and_then(|p| collection::generation_of(alias, p));
    // (went live at, number, name) of every generation besides the live and the previous one.
    let mut others: Vec<(Option<u64>, u64, String)> = gens
        .into_iter()
        .filter(|(n, _)| *n != live && Some(*n) != prev_n)
        .map(|(n, c)| {
            let switched = describe_generation(client, &c).ok().and_then(|g| g.switched_ms());
            let went_live = switched.or_else(|| prev_n.filter(|&p| n < p).map(|_| 0));
            (went_live, n, c)
        })
        .collect();
    others.sort_by(|a, b| b.cmp(a));
    let mut kept = usize::from(prev_n.is_some());
    let mut dropped = Vec::new();
    for (went_live, _, c) in others {
        if went_live.is_some() && kept < keep {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::testutil::item;

    #[test]
    fn switch_stamps_read_back_in_milliseconds_old_and_new() {
        assert_eq!(stamp_ms("1765000000"), Some(1_765_000_000_000));
        assert_eq!(stamp_ms("1765000000.042"), Some(1_765_000_000_042));
        assert_eq!(stamp_ms("1765000000.5"), Some(1_765_000_000_500));
        let before = now_unix();
        let ms = stamp_ms(&switch_stamp()).unwrap();
        assert!((before..=now_unix()).contains(&(ms / 1000)), "{ms}");
        for bad in ["", "x", "1.2345", "-1", "1.-2", "1.a"] {
            assert_eq!(stamp_ms(bad), None, "{bad}");
        }
    }

    /// Row `i`'s vector: `[i, i + 0.5]`.
    fn vectors(ids: &[usize]) -> Array2<f32> {
        Array2::from_shape_fn((ids.len(), 2), |(r, c)| ids[r] as f32 + c as f32 * 0.5)
    }

    #[test]
    fn an_unchanged_catalogue_changes_nothing_and_a_small_change_touches_only_its_rows() {
        let old: Vec<ItemRecord> = (0..5).map(item).collect();
        let old_emb = vectors(&[0, 1, 2, 3, 4]);
        let positions: Vec<i64> = (0..5).collect();
        let flat = old_emb.as_slice().unwrap();
        let (d, i, at) = diff(&positions, &old, flat, &old, &old_emb);
        assert!(d.is_empty() && i.is_empty());
        assert_eq!(at, positions);
        // Item 1 removed, item 3's image changed, item 7 added (at the end of the manifest).
        let mut new: Vec<ItemRecord> = [0, 2, 3, 4, 7].into_iter().map(item).collect();
        new[2].sha256 = "changed".into();
        let emb = vectors(&[0, 2, 3, 4, 7]);
        let (d, i, at) = diff(&positions, &old, flat, &new, &emb);
        assert_eq!(d, vec!["item-1".to_string(), "item-3".to_string()]);
        // Kept rows keep their positions (0, 2, 4); the two inserted take the free ones, 1 and 3.
        assert_eq!(i, vec![(2, 1), (4, 3)]);
        assert_eq!(at, vec![0, 2, 1, 4, 3]);
    }

    #[test]
    fn other_vector_bits_duplicates_and_positions_past_the_end_are_rewritten() {
        let old: Vec<ItemRecord> = [0, 1, 2, 2, 3].into_iter().map(item).collect();
        let old_emb = vectors(&[0, 1, 2, 2, 3]);
        // Item 3 sits at position 9 (a killed run's insert), item 2 twice.
        let positions = vec![0, 1, 2, 3, 9];
        let new: Vec<ItemRecord> = (0..4).map(item).collect();
        let mut emb = vectors(&[0, 1, 2, 3]);
        emb[[1, 1]] = f32::from_bits(emb[[1, 1]].to_bits() + 1);
        let (d, i, at) = diff(&positions, &old, old_emb.as_slice().unwrap(), &new, &emb);
        assert_eq!(d, vec!["item-1".to_string(), "item-2".to_string(), "item-3".to_string()]);
        assert_eq!(i.iter().map(|&(t, _)| t).collect::<Vec<_>>(), vec![1, 2, 3]);
        let mut sorted = at.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3], "positions are 0..n, each once: {at:?}");
        assert_eq!(at[0], 0);
    }

    #[test]
    fn a_changed_item_record_is_rewritten_even_with_the_same_image() {
        let old: Vec<ItemRecord> = (0..3).map(item).collect();
        let emb = vectors(&[0, 1, 2]);
        let mut new = old.clone();
        new[1].item.title = Some("renamed".into());
        let (d, i, _) = diff(&[0, 1, 2], &old, emb.as_slice().unwrap(), &new, &emb);
        assert_eq!((d, i), (vec!["item-1".to_string()], vec![(1, 1)]));
    }
}
