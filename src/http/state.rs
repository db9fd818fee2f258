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
use crate::encoder::{Encoder, OrtEncoder, TestEncoder};
use crate::index::store::{Generation, IndexDir, read_meta};
use crate::runtime::RuntimeOptions;
use crate::search::{SearchConfig, Service};
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

/// Validated `serve` settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// `index/<name>`.
    pub index: PathBuf,
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
    pub products: HashSet<String>,
    pub variations: HashSet<String>,
    /// Attribute names, with the number of items that have each.
    pub attributes: BTreeMap<String, usize>,
    /// The first item (the OpenAPI document's examples of an id, a category, a product, ...).
    pub example: Option<crate::catalogue::Item>,
    /// A few items to try the search with (`GET /v1/examples`).
    pub examples: Vec<dto::Example>,
}

/// How many example items `GET /v1/examples` offers at most.
pub const MAX_EXAMPLES: usize = 8;

/// One item per top-level category (in the order the taxonomy lists them), at most
/// [`MAX_EXAMPLES`]: the first query-role item of that category in row order, else its first item.
fn examples(g: &Generation, roots: &[dto::TaxonomyNode]) -> Vec<dto::Example> {
    let mut first: BTreeMap<&str, (usize, bool)> = BTreeMap::new();
    for (row, rec) in g.items.iter().enumerate() {
        let root = rec.item.category.split('/').map(str::trim).find(|s| !s.is_empty()).unwrap_or("");
        let is_query = rec.item.role == Some(crate::catalogue::Role::Query);
        match first.get(root) {
            Some(&(_, true)) => {}
            Some(&(_, false)) if !is_query => {}
            _ => {
                first.insert(root, (row, is_query));
            }
        }
    }
    roots
        .iter()
        .filter_map(|r| first.get(r.name.as_str()))
        .take(MAX_EXAMPLES)
        .map(|&(row, _)| {
            let it = &g.items[row].item;
            dto::Example {
                id: it.id.clone(),
                title: it.title.clone(),
                category: it.category.clone(),
                image_url: dto::image_url(&it.id),
            }
        })
        .collect()
}

impl GenInfo {
    fn of(g: &Generation) -> Self {
        let items = || g.items.iter().map(|r| &r.item);
        let tax = Taxonomy::from_items(items());
        let roots: Vec<dto::TaxonomyNode> = tax.tree().iter().map(dto::TaxonomyNode::from).collect();
        GenInfo {
            examples: examples(g, &roots),
            name: g.name(),
            taxonomy: dto::Taxonomy { generation: g.name(), items: g.items.len(), roots },
            categories: tax.nodes().iter().map(|n| n.path.clone()).collect(),
            products: items().map(|i| i.product.clone()).collect(),
            variations: items().map(|i| i.variation.clone()).collect(),
            attributes: g.labels.attribute_names(),
            example: items().next().cloned(),
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
            let root = IndexDir::new(&cfg.index);
            let name = root.current()?.ok_or_else(|| Error::NoLiveGeneration { path: cfg.index.clone() })?;
            let meta = read_meta(&root.root.join(&name))?;
            let path = meta.model.path.ok_or_else(|| Error::InvalidArgument {
                name: "model",
                reason: format!("{name} records no model path (built with a test encoder?): pass --model"),
            })?;
            Arc::new(OrtEncoder::load_pool(&path, &cfg.runtime, cfg.sessions)?)
        }
    };
    Service::open(cfg.index.clone(), encoder, cfg.search.clone())
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
        let g = service.generation();
        self.metrics.set_generation(g.meta.generation, g.items.len());
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Some(service);
    }

    /// The live service, if an index is loaded.
    pub fn service(&self) -> Option<Arc<Service>> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The lookup tables of `g` (built on first use, kept for the live generation).
    pub fn info(&self, g: &Generation) -> Arc<GenInfo> {
        let mut slot = self.info.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(i) if i.name == g.name() => i.clone(),
            _ => {
                let i = Arc::new(GenInfo::of(g));
                *slot = Some(i.clone());
                i
            }
        }
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
                if let Some(s) = self.service() {
                    let g = s.generation();
                    self.metrics.set_generation(g.meta.generation, g.items.len());
                    // Build the lookup tables here, off the async threads, not in the first query.
                    self.info(&g);
                }
                if r.changed {
                    tracing::info!(previous = ?r.previous, current = %r.current, "serving a new generation");
                }
            }
            // Nothing to load yet (no `hiercon index` run has finished): not a refusal.
            Err(Error::NoLiveGeneration { .. }) => {}
            Err(e) => {
                *refused = IndexDir::new(&self.config.index).current().ok().flatten();
                self.metrics.reload("refused");
                tracing::warn!(error = %e, "reload refused; the previous generation keeps serving");
            }
        }
        result
    }

    fn reload_locked(&self) -> Result<Reloaded> {
        let Some(service) = self.service() else {
            let s = Arc::new(open_service(&self.config)?);
            let current = s.generation().name();
            self.publish(s);
            return Ok(Reloaded { previous: None, current, changed: true });
        };
        match service.reload() {
            Ok(o) => Ok(Reloaded { previous: Some(o.previous), current: o.current, changed: o.changed }),
            // A generation built with another model: open it with its own model if the model
            // comes from the index.
            Err(Error::ModelMismatch { .. }) if self.config.encoder == EncoderSource::FromIndex => {
                let previous = service.generation().name();
                let s = Arc::new(open_service(&self.config)?);
                let current = s.generation().name();
                self.publish(s);
                Ok(Reloaded { previous: Some(previous), current, changed: true })
            }
            Err(e) => Err(e),
        }
    }

    /// Whether `CURRENT` names a generation other than the live one and other than the one
    /// last refused (what the poll checks before reloading).
    pub fn current_changed(&self) -> bool {
        let Ok(Some(name)) = IndexDir::new(&self.config.index).current() else {
            return false;
        };
        let live = self.service().map(|s| s.generation().name());
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner()).clone();
        live.as_deref() != Some(name.as_str()) && refused.as_deref() != Some(name.as_str())
    }
}
