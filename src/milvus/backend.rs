//! Answering queries from Milvus: the live collection behind an alias, searched with the
//! hierarchy filters as Milvus expressions, grouped on our side.
//!
//! A [`MilvusBackend`] holds no per-item state: each answer fetches the fields its hits need
//! (the item JSON). It follows alias switches by itself: every search names the alias (Milvus
//! resolves it per request), and the small live description (collection name, metadata, item
//! count) is read again at most once per [`REFRESH`]. Milvus 2.3 accepts group-by and ignores
//! it, so grouping over-fetches and keeps the first hit of each group.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use super::client::Client;
use super::collection::{self, CollectionMeta, HIT_FIELDS};
use super::index::{live_collection, read_rows, search_params};
use super::proto::schema;
use crate::index::Answer;
use crate::index::filter::{Filter, GroupBy, normalize_category};
use crate::index::query::normalized_query;
use crate::index::store::ItemRecord;
use crate::{Error, Result};

/// How long the live description is trusted before it is read again.
pub const REFRESH: Duration = Duration::from_secs(2);
/// Milvus's largest top-k.
const MAX_TOPK: usize = 16_384;

/// One hit of a Milvus answer.
#[derive(Debug, Clone)]
pub struct RawHit {
    pub id: String,
    pub score: f32,
    /// The item, when the search asked for it.
    pub record: Option<ItemRecord>,
}

/// The hits of each query of a search answer (Milvus flattens them; `topks` splits them).
pub fn split_hits(r: &schema::SearchResultData) -> Result<Vec<Vec<RawHit>>> {
    let ids: Vec<String> = match r.ids.as_ref().and_then(|i| i.id_field.as_ref()) {
        Some(schema::i_ds::IdField::StrId(s)) => s.data.clone(),
        Some(schema::i_ds::IdField::IntId(i)) => i.data.iter().map(|x| x.to_string()).collect(),
        Some(_) => return Err(Error::Milvus { op: "search", reason: "ids of an unexpected type".into() }),
        None => Vec::new(),
    };
    if ids.len() != r.scores.len() {
        return Err(Error::Milvus { op: "search", reason: format!("{} ids but {} scores", ids.len(), r.scores.len()) });
    }
    let records = if !ids.is_empty() && r.fields_data.iter().any(|f| f.field_name == "item") {
        Some(collection::item_column(&r.fields_data)?)
    } else {
        None
    };
    let mut out = Vec::with_capacity(r.topks.len());
    let mut at = 0usize;
    for &n in &r.topks {
        let n = n as usize;
        if at + n > ids.len() {
            return Err(Error::Milvus { op: "search", reason: "topks longer than the hits".into() });
        }
        out.push(
            (at..at + n)
                .map(|i| RawHit {
                    id: ids[i].clone(),
                    score: r.scores[i],
                    record: records.as_ref().and_then(|rs| rs.get(i).cloned()),
                })
                .collect(),
        );
        at += n;
    }
    Ok(out)
}

/// The live collection as last read.
#[derive(Debug, Clone)]
pub struct Live {
    pub collection: String,
    pub meta: CollectionMeta,
    /// The verified search breadth (the property written when verification widened it).
    pub ef_search: usize,
    read_at: Instant,
}

/// Ranked hits of one search.
#[derive(Debug, Clone)]
pub struct Ranked {
    pub hits: Vec<(f32, ItemRecord)>,
    pub answer: Answer,
    pub collection: String,
    pub allowed: usize,
}

/// Queries against the collection an alias names.
pub struct MilvusBackend {
    client: Client,
    alias: String,
    live: RwLock<Option<Live>>,
}

impl std::fmt::Debug for MilvusBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MilvusBackend").field("address", &self.client.address()).field("alias", &self.alias).finish()
    }
}

impl MilvusBackend {
    /// A backend for `alias` at `address`; nothing is contacted until the first call.
    pub fn new(address: &str, alias: &str, timeout: Duration) -> Result<Self> {
        Ok(MilvusBackend { client: Client::new(address, timeout)?, alias: alias.into(), live: RwLock::new(None) })
    }

    pub fn alias(&self) -> &str {
        &self.alias
    }

    pub fn address(&self) -> &str {
        self.client.address()
    }

    /// The live collection, read again when older than [`REFRESH`] (or when `fresh`).
    pub fn live(&self, fresh: bool) -> Result<Live> {
        if !fresh
            && let Some(l) = self.live.read().unwrap_or_else(|e| e.into_inner()).as_ref()
            && l.read_at.elapsed() < REFRESH
        {
            return Ok(l.clone());
        }
        let g = live_collection(&self.client, &self.alias)?.ok_or_else(|| Error::MilvusCollection {
            collection: self.alias.clone(),
            reason: "no such alias: run `hiercon index --milvus` first".into(),
        })?;
        let ef_search = g.ef_search();
        let live = Live { collection: g.name, meta: g.meta, ef_search, read_at: Instant::now() };
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Some(live.clone());
        Ok(live)
    }

    /// The top `k` items by cosine similarity that `filter` allows, one per group when
    /// `group_by` is given.
    pub fn search(
        &self,
        live: &Live,
        embedding: &[f32],
        k: usize,
        ef: usize,
        filter: &Filter,
        group_by: Option<GroupBy>,
    ) -> Result<Ranked> {
        let q = normalized_query(embedding, live.meta.dim)?;
        let expr = collection::expression(filter);
        let allowed = if expr.is_empty() { live.meta.count } else { self.count(live, &expr)? };
        let mut fetch = match group_by {
            None => k,
            Some(_) => (k * 8).max(64),
        }
        .min(MAX_TOPK);
        loop {
            let r = self.client.search(&live.collection, &[&q], &expr, &HIT_FIELDS, search_params(fetch, ef))?;
            let raw = split_hits(&r)?.into_iter().next().unwrap_or_default();
            let full = raw.len() >= fetch;
            let mut hits = Vec::with_capacity(k);
            let mut groups = std::collections::HashSet::new();
            for h in raw {
                let rec =
                    h.record.ok_or_else(|| Error::Milvus { op: "search", reason: "a hit without its item".into() })?;
                let keep = match group_by {
                    None => true,
                    Some(GroupBy::Product) => groups.insert(rec.item.product.clone()),
                    Some(GroupBy::Category) => groups.insert(normalize_category(&rec.item.category)),
                };
                if keep {
                    hits.push((h.score, rec));
                    if hits.len() == k {
                        break;
                    }
                }
            }
            // Too few groups in a full page: fetch wider, up to Milvus's largest top-k.
            if hits.len() < k && full && group_by.is_some() && fetch < MAX_TOPK {
                fetch = (fetch * 4).min(MAX_TOPK);
                continue;
            }
            return Ok(Ranked { hits, answer: Answer::Approx, collection: live.collection.clone(), allowed });
        }
    }

    /// Rows matching a filter expression.
    pub fn count(&self, live: &Live, expr: &str) -> Result<usize> {
        if expr.is_empty() {
            return Ok(live.meta.count);
        }
        Ok(self.client.count(&live.collection, expr)? as usize)
    }

    /// An item by id.
    pub fn item(&self, live: &Live, id: &str) -> Result<Option<ItemRecord>> {
        let expr = format!("id == {}", collection::literal(id));
        let fields = self.client.query(&live.collection, &expr, &["item"], None)?;
        Ok(collection::item_column(&fields)?.into_iter().next())
    }

    /// An item's stored embedding.
    pub fn item_embedding(&self, live: &Live, id: &str) -> Result<Option<Vec<f32>>> {
        let expr = format!("id == {}", collection::literal(id));
        let fields = self.client.query(&live.collection, &expr, &[collection::VECTOR], None)?;
        let v = if fields.is_empty() { Vec::new() } else { collection::vector_column(&fields)? };
        Ok((v.len() == live.meta.dim).then_some(v))
    }

    /// Every row matching `expr`, in row order: the items and their vectors (row-major), read in
    /// pages (eval reads a whole split this way).
    pub fn rows(&self, live: &Live, expr: &str) -> Result<(Vec<ItemRecord>, Vec<f32>)> {
        read_rows(&self.client, &live.collection, &live.meta, expr)
    }

    /// A cheap liveness check.
    pub fn ping(&self) -> Result<()> {
        self.client.version().map(|_| ())
    }
}
