//! The one query path `serve` and `eval` call: the live index plus the encoder; an image or embedding in, ranked items out.
//!
//! The index is one of two backends behind the same calls:
//! - **local** (the default): the live [`Generation`] behind `RwLock<Arc<_>>`: a query clones the
//!   `Arc` (the lock is held for that clone only) and runs without any lock, so a
//!   [`Service::reload`] never waits for queries and queries never see a half-swapped index. A
//!   reload loads and checks the generation `CURRENT` names completely before swapping; if that
//!   fails the old one keeps serving and the error is returned.
//! - **Milvus** ([`MilvusBackend`]): the collection an alias names. The service keeps only the
//!   live collection's small description, read again every [`crate::milvus::backend::REFRESH`];
//!   searches name that physical collection (so an answer comes from one generation, whose model
//!   was checked), items and images are fetched per request.

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
use crate::milvus::MilvusBackend;
use crate::milvus::backend::Live as MilvusLive;
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

/// Where the items live.
enum Backend {
    Local { root: IndexDir, current: RwLock<Arc<Generation>> },
    Milvus(Box<MilvusBackend>),
}

/// The live index, whichever backend holds it.
#[derive(Clone)]
pub enum LiveIndex {
    Local(Arc<Generation>),
    Milvus(Box<MilvusLive>),
}

impl LiveIndex {
    /// `gen-<n>` locally, the physical collection name in Milvus.
    pub fn name(&self) -> String {
        match self {
            LiveIndex::Local(g) => g.name(),
            LiveIndex::Milvus(l) => l.collection.clone(),
        }
    }

    /// The generation number.
    pub fn number(&self) -> u64 {
        match self {
            LiveIndex::Local(g) => g.meta.generation,
            LiveIndex::Milvus(l) => l.meta.generation,
        }
    }

    /// Items served.
    pub fn count(&self) -> usize {
        match self {
            LiveIndex::Local(g) => g.items.len(),
            LiveIndex::Milvus(l) => l.meta.count,
        }
    }

    /// The model digest the items were embedded with, and the width.
    pub fn model(&self) -> (&str, usize) {
        match self {
            LiveIndex::Local(g) => (&g.meta.model.digest, g.meta.dim),
            LiveIndex::Milvus(l) => (&l.meta.model.digest, l.meta.dim),
        }
    }

    /// The model file recorded at index time.
    pub fn model_path(&self) -> Option<&std::path::Path> {
        match self {
            LiveIndex::Local(g) => g.meta.model.path.as_deref(),
            LiveIndex::Milvus(l) => l.meta.model.path.as_deref(),
        }
    }
}

/// The query service: live index + encoder.
pub struct Service {
    backend: Backend,
    reloading: Mutex<()>,
    encoder: Arc<dyn Encoder>,
    config: SearchConfig,
    /// The Milvus collection last checked against the encoder (refusals are not retried).
    checked: Mutex<Option<String>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Local { root, .. } => f
                .debug_struct("Service")
                .field("root", &root.root)
                .field("generation", &self.local().map(|g| g.name()))
                .finish(),
            Backend::Milvus(m) => f.debug_struct("Service").field("milvus", m).finish(),
        }
    }
}

fn check_model(live: &LiveIndex, encoder: &dyn Encoder) -> Result<()> {
    let (digest, dim) = live.model();
    if digest != encoder.digest() || dim != encoder.dim() {
        return Err(Error::ModelMismatch {
            generation: live.name(),
            generation_digest: digest.to_string(),
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
        let g = Arc::new(root.load_current()?);
        check_model(&LiveIndex::Local(g.clone()), encoder.as_ref())?;
        tracing::info!(generation = %g.name(), items = g.meta.count, "index loaded");
        Ok(Service {
            backend: Backend::Local { root, current: RwLock::new(g) },
            reloading: Mutex::new(()),
            encoder,
            config,
            checked: Mutex::new(None),
        })
    }

    /// Serves the collection `backend`'s alias names. Milvus is asked for it now: the alias must
    /// exist and hold items embedded with `encoder`'s model.
    #[instrument(skip(backend, encoder, config))]
    pub fn open_milvus(backend: MilvusBackend, encoder: Arc<dyn Encoder>, config: SearchConfig) -> Result<Self> {
        let live = backend.live(true)?;
        let s = Service {
            backend: Backend::Milvus(Box::new(backend)),
            reloading: Mutex::new(()),
            encoder,
            config,
            checked: Mutex::new(None),
        };
        s.checked_milvus(live)?;
        Ok(s)
    }

    /// A Milvus live description, refused when its model is not the encoder's.
    fn checked_milvus(&self, live: MilvusLive) -> Result<MilvusLive> {
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        if checked.as_deref() != Some(live.collection.as_str()) {
            let l = LiveIndex::Milvus(Box::new(live.clone()));
            check_model(&l, self.encoder.as_ref())?;
            tracing::info!(collection = %live.collection, items = live.meta.count, "serving Milvus collection");
            *checked = Some(live.collection.clone());
        }
        Ok(live)
    }

    fn milvus_live(&self, m: &MilvusBackend, fresh: bool) -> Result<MilvusLive> {
        self.checked_milvus(m.live(fresh)?)
    }

    /// The live local generation (`None` with the Milvus backend).
    pub fn local(&self) -> Option<Arc<Generation>> {
        match &self.backend {
            Backend::Local { current, .. } => Some(live_generation(current)),
            Backend::Milvus(_) => None,
        }
    }

    /// The live index (with Milvus: its description, read again when stale).
    pub fn live(&self) -> Result<LiveIndex> {
        match &self.backend {
            Backend::Local { current, .. } => Ok(LiveIndex::Local(live_generation(current))),
            Backend::Milvus(m) => Ok(LiveIndex::Milvus(Box::new(self.milvus_live(m, false)?))),
        }
    }

    /// Whether queries can be answered now (Milvus: it answers and the alias names a collection
    /// of this model).
    pub fn ready(&self) -> Result<LiveIndex> {
        match &self.backend {
            Backend::Local { .. } => self.live(),
            Backend::Milvus(m) => {
                m.ping()?;
                self.live()
            }
        }
    }

    /// The Milvus backend, when that is where the items are.
    pub fn milvus(&self) -> Option<&MilvusBackend> {
        match &self.backend {
            Backend::Milvus(m) => Some(m),
            Backend::Local { .. } => None,
        }
    }

    /// The encoder queries are embedded with.
    pub fn encoder(&self) -> &Arc<dyn Encoder> {
        &self.encoder
    }

    /// Local: loads the generation `CURRENT` names now and swaps it in; a generation that does
    /// not load or was built with another model is refused and the old one keeps serving.
    /// Milvus: reads the alias's collection again now (refused likewise when its model differs).
    #[instrument(skip(self))]
    pub fn reload(&self) -> Result<ReloadOutcome> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let (root, current) = match &self.backend {
            Backend::Local { root, current } => (root, current),
            Backend::Milvus(m) => {
                let previous = self.checked.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
                let live = self.milvus_live(m, true)?;
                let changed = live.collection != previous;
                return Ok(ReloadOutcome { previous, current: live.collection, changed });
            }
        };
        let previous = live_generation(current).name();
        let name = root.current()?.ok_or_else(|| Error::NoLiveGeneration { path: root.root.clone() })?;
        if name == previous {
            return Ok(ReloadOutcome { current: name, previous, changed: false });
        }
        let g = Arc::new(Generation::load(&root.root.join(&name))?);
        check_model(&LiveIndex::Local(g.clone()), self.encoder.as_ref())?;
        *current.write().unwrap_or_else(|e| e.into_inner()) = g;
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
        let check_ef = |ef: usize| {
            if ef == 0 || ef > self.config.max_ef {
                return Err(Error::InvalidArgument {
                    name: "ef",
                    reason: format!("must be in 1..={}", self.config.max_ef),
                });
            }
            Ok(ef)
        };
        let g = match &self.backend {
            Backend::Local { current, .. } => live_generation(current),
            Backend::Milvus(m) => {
                if planning.exact_below_rows == usize::MAX {
                    return Err(Error::InvalidArgument {
                        name: "exact",
                        reason: "exact scans are not available with the Milvus backend".into(),
                    });
                }
                let live = self.milvus_live(m, false)?;
                let ef = check_ef(req.ef.unwrap_or(live.ef_search))?;
                let r = m.search(&live, embedding, req.k, ef, &req.filter, req.group_by)?;
                let hits = r.hits.iter().map(|(score, rec)| hit(*score, rec)).collect();
                return Ok(SearchResponse {
                    hits,
                    answered_by: r.answer,
                    generation: r.collection,
                    allowed: r.allowed,
                });
            }
        };
        let ef = check_ef(req.ef.unwrap_or(g.meta.ef_search))?;
        let res = g.query(embedding, req.k, ef, &req.filter, req.group_by, planning)?;
        let hits = res.hits.iter().map(|h| hit(h.score, g.item(h.row))).collect();
        Ok(SearchResponse { hits, answered_by: res.answer, generation: g.name(), allowed: res.allowed })
    }

    /// Decodes, preprocesses and embeds one image.
    #[instrument(skip(self, image), fields(bytes = image.len()))]
    pub fn embed_image(&self, image: &[u8]) -> Result<Vec<f32>> {
        let t = img::tensor_from_bytes(image, self.encoder.preprocess(), &self.config.limits)?;
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

    /// How many items `filter` allows.
    pub fn allowed(&self, filter: &Filter) -> Result<usize> {
        match &self.backend {
            Backend::Local { current, .. } => {
                let g = live_generation(current);
                Ok(match g.labels.allowed(filter) {
                    crate::index::filter::Allowed::All => g.items.len(),
                    crate::index::filter::Allowed::Rows(r) => r.len(),
                })
            }
            Backend::Milvus(m) => m.count(&self.milvus_live(m, false)?, &crate::milvus::collection::expression(filter)),
        }
    }

    /// An item of the live index by id (Milvus: fetched now).
    pub fn item(&self, id: &str) -> Result<Option<ItemRecord>> {
        match &self.backend {
            Backend::Local { current, .. } => {
                let g = live_generation(current);
                Ok(g.row_of(id).map(|r| g.item(r).clone()))
            }
            Backend::Milvus(m) => m.item(&self.milvus_live(m, false)?, id),
        }
    }

    /// An item's stored embedding (the query of "more like this item").
    pub fn item_embedding(&self, id: &str) -> Result<Option<Vec<f32>>> {
        match &self.backend {
            Backend::Local { current, .. } => {
                let g = live_generation(current);
                Ok(g.row_of(id).map(|r| g.exact.vector(r).to_vec()))
            }
            Backend::Milvus(m) => m.item_embedding(&self.milvus_live(m, false)?, id),
        }
    }

    /// Where an item's image is, and the image's sha256.
    pub fn image(&self, id: &str) -> Result<Option<(PathBuf, String)>> {
        match &self.backend {
            Backend::Local { current, .. } => {
                let g = live_generation(current);
                Ok(g.row_of(id).map(|r| (g.image_path(r), g.item(r).sha256.clone())))
            }
            Backend::Milvus(m) => {
                let live = self.milvus_live(m, false)?;
                Ok(m.item(&live, id)?.map(|r| (live.meta.image_root.join(&r.item.image), r.sha256)))
            }
        }
    }
}

/// The local live generation (a clone of the `Arc`; the lock is held for the clone only).
fn live_generation(current: &RwLock<Arc<Generation>>) -> Arc<Generation> {
    current.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A hit as the API shows it.
fn hit(score: f32, rec: &ItemRecord) -> SearchHit {
    let it = &rec.item;
    SearchHit {
        id: it.id.clone(),
        score,
        category: it.category.clone(),
        product: it.product.clone(),
        variation: it.variation.clone(),
        view: it.view.clone(),
        image: it.image.clone(),
        title: it.title.clone(),
        attributes: it.attributes.clone(),
    }
}
