//! The one query path `serve` and `eval` call: the live index generation plus the encoder; an image or embedding in, ranked items out.
//!
//! [`Service`] holds the live [`Generation`] behind `RwLock<Arc<_>>`: a query clones the `Arc`
//! (the lock is held for that clone only) and runs without any lock, so a [`Service::reload`]
//! never waits for queries and queries never see a half-swapped index. A reload loads and checks
//! the generation `CURRENT` names completely before swapping; if that fails the old one keeps
//! serving and the error is returned.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tracing::instrument;

use crate::catalogue::Attributes;
use crate::encoder::Encoder;
use crate::image::{self as img, Limits};
pub use crate::index::Answer;
pub use crate::index::filter::{Filter, GroupBy};
pub use crate::index::query::QueryConfig;
use crate::index::store::{Generation, IndexDir, ItemRecord};
use crate::{Error, Result};

/// A query's parameters (the part of an HTTP request after the image).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SearchRequest {
    /// Hits wanted (1..=`max_k`).
    pub k: usize,
    pub filter: Filter,
    /// One hit per product or per category.
    pub group_by: Option<GroupBy>,
    /// HNSW search breadth; the generation's verified `ef_search` when absent.
    pub ef: Option<usize>,
}

impl Default for SearchRequest {
    fn default() -> Self {
        SearchRequest { k: 10, filter: Filter::default(), group_by: None, ef: None }
    }
}

/// One ranked item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchHit {
    pub id: String,
    /// Cosine similarity to the query, in [-1, 1].
    pub score: f32,
    pub category: String,
    pub product: String,
    pub variation: String,
    pub view: String,
    /// Image path relative to the catalogue manifest.
    pub image: String,
    /// The product's name for people, if the catalogue has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Attributes::is_empty")]
    pub attributes: Attributes,
}

/// Ranked items and how they were found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchResponse {
    pub hits: Vec<SearchHit>,
    /// `approx` (HNSW) or `exact` (a scan).
    pub answered_by: Answer,
    /// The generation that answered (`gen-<n>`).
    pub generation: String,
    /// Items the filter allowed.
    pub allowed: usize,
}

/// Service settings.
#[derive(Debug, Clone)]
pub struct SearchConfig {
    /// Largest `k` accepted.
    pub max_k: usize,
    /// Largest `ef` accepted.
    pub max_ef: usize,
    pub query: QueryConfig,
    pub limits: Limits,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig { max_k: 1000, max_ef: 10_000, query: QueryConfig::default(), limits: Limits::default() }
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadOutcome {
    pub previous: String,
    pub current: String,
    /// False when `CURRENT` already named the loaded generation.
    pub changed: bool,
}

/// The query service: live generation + encoder.
pub struct Service {
    root: IndexDir,
    current: RwLock<Arc<Generation>>,
    reloading: Mutex<()>,
    encoder: Arc<dyn Encoder>,
    config: SearchConfig,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("root", &self.root.root).field("generation", &self.generation().name()).finish()
    }
}

fn check_model(g: &Generation, encoder: &dyn Encoder) -> Result<()> {
    if g.meta.model.digest != encoder.digest() || g.meta.dim != encoder.dim() {
        return Err(Error::ModelMismatch {
            generation: g.name(),
            generation_digest: g.meta.model.digest.clone(),
            encoder_digest: encoder.digest().to_string(),
        });
    }
    Ok(())
}

impl Service {
    /// Loads the live generation of `index_dir` (`index/<name>`). It must have been embedded
    /// with `encoder`'s model (same digest).
    #[instrument(skip(encoder, config))]
    pub fn open(index_dir: PathBuf, encoder: Arc<dyn Encoder>, config: SearchConfig) -> Result<Self> {
        let root = IndexDir::new(index_dir);
        let g = root.load_current()?;
        check_model(&g, encoder.as_ref())?;
        tracing::info!(generation = %g.name(), items = g.meta.count, "index loaded");
        Ok(Service { root, current: RwLock::new(Arc::new(g)), reloading: Mutex::new(()), encoder, config })
    }

    /// The live generation.
    pub fn generation(&self) -> Arc<Generation> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The encoder queries are embedded with.
    pub fn encoder(&self) -> &Arc<dyn Encoder> {
        &self.encoder
    }

    /// Loads the generation `CURRENT` names now and swaps it in. A generation that does not
    /// load or was built with another model is refused; the old one keeps serving.
    #[instrument(skip(self))]
    pub fn reload(&self) -> Result<ReloadOutcome> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.generation().name();
        let name = self.root.current()?.ok_or_else(|| Error::NoLiveGeneration { path: self.root.root.clone() })?;
        if name == previous {
            return Ok(ReloadOutcome { current: name, previous, changed: false });
        }
        let g = Generation::load(&self.root.root.join(&name))?;
        check_model(&g, self.encoder.as_ref())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(g);
        tracing::info!(%previous, current = %name, "switched generation");
        Ok(ReloadOutcome { previous, current: name, changed: true })
    }

    /// The service's settings.
    pub fn config(&self) -> &SearchConfig {
        &self.config
    }

    /// Ranks items by cosine similarity to `embedding` (any norm).
    #[instrument(skip(self, embedding), fields(k = req.k, group_by = ?req.group_by))]
    pub fn search_embedding(&self, embedding: &[f32], req: &SearchRequest) -> Result<SearchResponse> {
        self.search_embedding_with(embedding, req, &self.config.query)
    }

    /// As [`Service::search_embedding`] with other query-planning knobs (e.g. `exact_below_rows:
    /// usize::MAX` forces the exact scan, as `serve`'s `exact=true` does).
    pub fn search_embedding_with(
        &self,
        embedding: &[f32],
        req: &SearchRequest,
        planning: &QueryConfig,
    ) -> Result<SearchResponse> {
        if req.k == 0 || req.k > self.config.max_k {
            return Err(Error::InvalidArgument { name: "k", reason: format!("must be in 1..={}", self.config.max_k) });
        }
        let g = self.generation();
        let ef = req.ef.unwrap_or(g.meta.ef_search);
        if ef == 0 || ef > self.config.max_ef {
            return Err(Error::InvalidArgument {
                name: "ef",
                reason: format!("must be in 1..={}", self.config.max_ef),
            });
        }
        let res = g.query(embedding, req.k, ef, &req.filter, req.group_by, planning)?;
        let hits = res
            .hits
            .iter()
            .map(|h| {
                let it = &g.item(h.row).item;
                SearchHit {
                    id: it.id.clone(),
                    score: h.score,
                    category: it.category.clone(),
                    product: it.product.clone(),
                    variation: it.variation.clone(),
                    view: it.view.clone(),
                    image: it.image.clone(),
                    title: it.title.clone(),
                    attributes: it.attributes.clone(),
                }
            })
            .collect();
        Ok(SearchResponse { hits, answered_by: res.answer, generation: g.name(), allowed: res.allowed })
    }

    /// Decodes, preprocesses and embeds one image.
    #[instrument(skip(self, image), fields(bytes = image.len()))]
    pub fn embed_image(&self, image: &[u8]) -> Result<Vec<f32>> {
        let decoded = img::decode(image, &self.config.limits)?;
        let t = img::to_tensor(&decoded, self.encoder.preprocess());
        let batch = t.insert_axis(ndarray::Axis(0));
        let emb = self.encoder.embed(batch.view())?;
        Ok(emb.row(0).to_vec())
    }

    /// Ranks items by similarity to an image (decode → preprocess → embed → search).
    #[instrument(skip(self, image), fields(bytes = image.len(), k = req.k))]
    pub fn search_image(&self, image: &[u8], req: &SearchRequest) -> Result<SearchResponse> {
        let embedding = self.embed_image(image)?;
        self.search_embedding(&embedding, req)
    }

    /// An item of the live generation by id.
    pub fn item(&self, id: &str) -> Option<ItemRecord> {
        let g = self.generation();
        g.row_of(id).map(|r| g.item(r).clone())
    }

    /// Where an item's image is on disk.
    pub fn image_path(&self, id: &str) -> Option<PathBuf> {
        let g = self.generation();
        g.row_of(id).map(|r| g.image_path(r))
    }
}
