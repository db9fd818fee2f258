//! The server's shared state: configuration, the live `search::Service` (absent until an index
//! generation loads), per-generation lookup tables, metrics, and reloading.
//!
//! A reload loads the generation `CURRENT` names completely off the async threads and swaps it
//! in only if it loads and was built with the served model; otherwise the old one keeps
//! serving. When the model comes from the index (no `--model`), a generation built with a new
//! model brings its model with it: a whole new `Service` is opened and swapped in.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::dto;
use super::metrics::Metrics;
use crate::catalogue::Taxonomy;
use crate::catalogue::taxonomy::example_items;
use crate::encoder::{Encoder, OrtEncoder, TestEncoder};
use crate::index::store::{Generation, IndexDir, read_meta};
use crate::milvus::backend::Live as MilvusLive;
use crate::runtime::RuntimeOptions;
use crate::search::{LiveIndex, SearchConfig, Service};
use crate::{Error, Result};

/// Where the query encoder comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum EncoderSource {
    /// The model path recorded in the live generation's `generation.json` (as given to
    /// `hiercon index`, relative to the directory it ran in).
    FromIndex,
    /// This exported model (`X.onnx` with `X.json` beside it).
    Model(PathBuf),
    /// The deterministic test encoder of this width, seed 0 (as `hiercon index --test-encoder`).
    Test { dim: usize },
}

/// A Milvus alias to serve instead of a local index.
#[derive(Debug, Clone, PartialEq)]
pub struct MilvusTarget {
    /// The proxy's `HOST:PORT`.
    pub address: String,
    /// The alias `hiercon index --milvus` switches.
    pub alias: String,
    /// Deadline of each Milvus call.
    pub timeout: Duration,
}

impl MilvusTarget {
    fn backend(&self) -> Result<crate::milvus::MilvusBackend> {
        crate::milvus::MilvusBackend::new(&self.address, &self.alias, self.timeout)
    }
}

/// Validated `serve` settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// `index/<name>` (unused with `milvus`).
    pub index: PathBuf,
    /// Serve the collection this Milvus alias names instead of the local index.
    pub milvus: Option<MilvusTarget>,
    pub addr: SocketAddr,
    pub encoder: EncoderSource,
    pub runtime: RuntimeOptions,
    /// ONNX Runtime sessions of the model (concurrent queries run on different sessions).
    pub sessions: usize,
    /// Guards `/v1/admin/*`; without it those routes answer 403.
    pub api_key: Option<String>,
    /// How often `CURRENT` is checked for a new generation (`None`: only on reload / SIGHUP).
    pub poll: Option<Duration>,
    /// Largest request body (an image, or a multipart body holding one).
    pub max_body_bytes: usize,
    /// Longest time decoding, embedding and searching one image may take.
    pub decode_timeout: Duration,
    /// Images decoded and embedded at once; more requests wait (up to `decode_timeout`, then
    /// 503 `overloaded`), so memory stays bounded however many clients send 20 MB images.
    pub max_inflight: usize,
    /// Largest `k` a request may ask for.
    pub max_k: usize,
    /// Neighbours in the predicted-category vote.
    pub vote_k: usize,
    /// The search service's settings (image pixel limits included).
    pub search: SearchConfig,
}

impl ServeConfig {
    /// Defaults: 127.0.0.1:8080, model from the index, no API key, poll every 30 s, 20 MiB
    /// bodies, 5 s decode timeout, `k` at most 100, a 10-neighbour vote.
    pub fn new(index: impl Into<PathBuf>) -> Self {
        ServeConfig {
            index: index.into(),
            milvus: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            encoder: EncoderSource::FromIndex,
            runtime: RuntimeOptions::default(),
            sessions: 1,
            api_key: None,
            poll: Some(Duration::from_secs(30)),
            max_body_bytes: 20 * 1024 * 1024,
            decode_timeout: Duration::from_secs(5),
            max_inflight: 4 * std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_k: 100,
            vote_k: 10,
            search: SearchConfig::default(),
        }
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<()> {
        let bad = |name, reason: &str| Err(Error::InvalidArgument { name, reason: reason.into() });
        if self.max_k == 0 || self.max_k > self.search.max_k {
            return bad("max_k", "must be in 1..=the search service's max_k");
        }
        if self.vote_k == 0 || self.vote_k > self.search.max_k {
            return bad("vote_k", "must be in 1..=the search service's max_k");
        }
        if self.max_inflight == 0 {
            return bad("max_inflight", "must be at least 1");
        }
        if self.sessions == 0 {
            return bad("sessions", "must be at least 1");
        }
        if self.max_body_bytes == 0 {
            return bad("max_body_bytes", "must be positive");
        }
        if self.decode_timeout.is_zero() {
            return bad("decode_timeout", "must be positive");
        }
        if self.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return bad("api_key", "must not be empty when set");
        }
        if self.poll.is_some_and(|p| p.is_zero()) {
            return bad("poll", "must be positive (or off)");
        }
        Ok(())
    }
}

/// Lookup tables of one generation, built once when it is first queried.
#[derive(Debug)]
pub struct GenInfo {
    pub name: String,
    pub taxonomy: dto::Taxonomy,
    pub categories: HashSet<String>,
    /// Every product and variation id (`None` with Milvus: too large to hold; the search's
    /// allowed count tells an unknown one instead).
    pub products: Option<HashSet<String>>,
    pub variations: Option<HashSet<String>>,
    /// Attribute names, with the number of items that have each.
    pub attributes: BTreeMap<String, usize>,
    /// The first item (the OpenAPI document's examples of an id, a category, a product, ...).
    pub example: Option<crate::catalogue::Item>,
    /// A few items to try the search with (`GET /v1/examples`).
    pub examples: Vec<dto::Example>,
}

/// How many example items `GET /v1/examples` offers at most.
pub const MAX_EXAMPLES: usize = 8;

fn example(it: &crate::catalogue::Item) -> dto::Example {
    dto::Example {
        id: it.id.clone(),
        title: it.title.clone(),
        category: it.category.clone(),
        image_url: dto::image_url(&it.id),
    }
}

impl GenInfo {
    fn of(live: &LiveIndex) -> Self {
        match live {
            LiveIndex::Local(g) => GenInfo::of_generation(g),
            LiveIndex::Milvus(l) => GenInfo::of_milvus(l),
        }
    }

    fn of_generation(g: &Generation) -> Self {
        let items = || g.items.iter().map(|r| &r.item);
        let tax = Taxonomy::from_items(items());
        let roots: Vec<dto::TaxonomyNode> = tax.tree().iter().map(dto::TaxonomyNode::from).collect();
        let root_names: Vec<&str> = roots.iter().map(|r| r.name.as_str()).collect();
        GenInfo {
            examples: example_items(items(), &root_names, MAX_EXAMPLES).into_iter().map(example).collect(),
            name: g.name(),
            taxonomy: dto::Taxonomy { generation: g.name(), items: g.items.len(), roots },
            categories: tax.nodes().iter().map(|n| n.path.clone()).collect(),
            products: Some(items().map(|i| i.product.clone()).collect()),
            variations: Some(items().map(|i| i.variation.clone()).collect()),
            attributes: g.labels.attribute_names(),
            example: items().next().cloned(),
        }
    }

    /// From the summary `hiercon index --milvus` keeps in the collection's metadata: no
    /// per-item table (products and variations are checked by Milvus when a filter names them).
    fn of_milvus(l: &MilvusLive) -> Self {
        let s = &l.meta.summary;
        let tax = Taxonomy::from_counts(s.categories.iter().map(|(p, n)| (p.as_str(), *n)));
        let roots: Vec<dto::TaxonomyNode> = tax.tree().iter().map(dto::TaxonomyNode::from).collect();
        GenInfo {
            examples: s.examples.iter().take(MAX_EXAMPLES).map(example).collect(),
            name: l.collection.clone(),
            taxonomy: dto::Taxonomy { generation: l.collection.clone(), items: l.meta.count, roots },
            categories: tax.nodes().iter().map(|n| n.path.clone()).collect(),
            products: None,
            variations: None,
            attributes: s.attributes.clone(),
            example: s.examples.first().cloned(),
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub previous: Option<String>,
    pub current: String,
    pub changed: bool,
}

/// Shared by every handler (cheap to clone).
#[derive(Clone)]
pub struct AppState(pub Arc<Shared>);

/// See [`AppState`].
pub struct Shared {
    pub config: ServeConfig,
    pub metrics: Metrics,
    /// Permits for image work (see [`ServeConfig::max_inflight`]).
    pub inflight: tokio::sync::Semaphore,
    live: RwLock<Option<Arc<Service>>>,
    info: Mutex<Option<Arc<GenInfo>>>,
    reloading: Mutex<()>,
    /// The generation a background reload last refused (not retried until `CURRENT` changes).
    refused: Mutex<Option<String>>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Opens the index with the configured encoder.
fn open_service(cfg: &ServeConfig) -> Result<Service> {
    let encoder: Arc<dyn Encoder> = match &cfg.encoder {
        EncoderSource::Test { dim } => Arc::new(TestEncoder::new(*dim, 0)),
        EncoderSource::Model(path) => Arc::new(OrtEncoder::load_pool(path, &cfg.runtime, cfg.sessions)?),
        EncoderSource::FromIndex => {
            let (name, path) = match &cfg.milvus {
                None => {
                    let root = IndexDir::new(&cfg.index);
                    let name = root.current()?.ok_or_else(|| Error::NoLiveGeneration { path: cfg.index.clone() })?;
                    (name.clone(), read_meta(&root.root.join(&name))?.model.path)
                }
                Some(m) => {
                    let live = m.backend()?.live(true)?;
                    (live.collection, live.meta.model.path)
                }
            };
            let path = path.ok_or_else(|| Error::InvalidArgument {
                name: "model",
                reason: format!("{name} records no model path (built with a test encoder?): pass --model"),
            })?;
            Arc::new(OrtEncoder::load_pool(&path, &cfg.runtime, cfg.sessions)?)
        }
    };
    match &cfg.milvus {
        None => Service::open(cfg.index.clone(), encoder, cfg.search.clone()),
        Some(m) => Service::open_milvus(m.backend()?, encoder, cfg.search.clone()),
    }
}

impl AppState {
    /// State without a loaded index (call [`AppState::reload`] to load one).
    pub fn new(config: ServeConfig) -> Self {
        AppState(Arc::new(Shared {
            inflight: tokio::sync::Semaphore::new(config.max_inflight),
            config,
            metrics: Metrics::default(),
            live: RwLock::new(None),
            info: Mutex::new(None),
            reloading: Mutex::new(()),
            refused: Mutex::new(None),
        }))
    }

    /// State serving an already opened service.
    pub fn with_service(config: ServeConfig, service: Service) -> Self {
        let s = AppState::new(config);
        s.publish(Arc::new(service));
        s
    }

    fn publish(&self, service: Arc<Service>) {
        if let Ok(l) = service.live() {
            self.metrics.set_generation(l.number(), l.count());
        }
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Some(service);
    }

    /// The live service, if an index is loaded.
    pub fn service(&self) -> Option<Arc<Service>> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The lookup tables of `live` (built on first use, kept for the live generation).
    pub fn info(&self, live: &LiveIndex) -> Arc<GenInfo> {
        let mut slot = self.info.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(i) if i.name == live.name() => i.clone(),
            _ => {
                let i = Arc::new(GenInfo::of(live));
                *slot = Some(i.clone());
                i
            }
        }
    }

    /// The lookup tables last built, without asking the backend (the OpenAPI document's).
    pub fn cached_info(&self) -> Option<Arc<GenInfo>> {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Loads the generation `CURRENT` names and swaps it in (blocking: run it off the async
    /// threads). On failure the old generation keeps serving and the error is returned.
    pub fn reload(&self) -> Result<Reloaded> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.reload_locked();
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(r) => {
                *refused = None;
                self.metrics.reload(if r.changed { "switched" } else { "unchanged" });
                if let Some(l) = self.service().and_then(|s| s.live().ok()) {
                    self.metrics.set_generation(l.number(), l.count());
                    // Build the lookup tables here, off the async threads, not in the first query.
                    self.info(&l);
                }
                if r.changed {
                    tracing::info!(previous = ?r.previous, current = %r.current, "serving a new generation");
                }
            }
            // Nothing to load yet (no `hiercon index` run has finished): not a refusal.
            Err(Error::NoLiveGeneration { .. }) => {}
            // Milvus unreachable: not a refusal of a generation; serve keeps trying.
            Err(Error::MilvusUnavailable { .. }) => {
                tracing::warn!(error = %result.as_ref().err().map(|e| e.to_string()).unwrap_or_default(), "reload: Milvus unavailable");
            }
            Err(e) => {
                *refused = match &self.config.milvus {
                    None => IndexDir::new(&self.config.index).current().ok().flatten(),
                    Some(_) => None,
                };
                self.metrics.reload("refused");
                tracing::warn!(error = %e, "reload refused; the previous generation keeps serving");
            }
        }
        result
    }

    fn reload_locked(&self) -> Result<Reloaded> {
        let Some(service) = self.service() else {
            let s = Arc::new(open_service(&self.config)?);
            let current = s.live()?.name();
            self.publish(s);
            return Ok(Reloaded { previous: None, current, changed: true });
        };
        match service.reload() {
            Ok(o) => Ok(Reloaded { previous: Some(o.previous), current: o.current, changed: o.changed }),
            // A generation built with another model: open it with its own model if the model
            // comes from the index.
            Err(Error::ModelMismatch { .. }) if self.config.encoder == EncoderSource::FromIndex => {
                let previous = self.cached_info().map(|i| i.name.clone()).unwrap_or_default();
                let s = Arc::new(open_service(&self.config)?);
                let current = s.live()?.name();
                self.publish(s);
                Ok(Reloaded { previous: Some(previous), current, changed: true })
            }
            Err(e) => Err(e),
        }
    }

    /// Whether `CURRENT` names a generation other than the live one and other than the one
    /// last refused (what the poll checks before reloading).
    pub fn current_changed(&self) -> bool {
        if self.config.milvus.is_some() {
            // The service follows the alias itself; a reload refreshes the metrics, retries a
            // service that could not open, and re-checks the model (one describe call).
            return true;
        }
        let Ok(Some(name)) = IndexDir::new(&self.config.index).current() else {
            return false;
        };
        let live = self.service().and_then(|s| s.local()).map(|g| g.name());
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner()).clone();
        live.as_deref() != Some(name.as_str()) && refused.as_deref() != Some(name.as_str())
    }
}
