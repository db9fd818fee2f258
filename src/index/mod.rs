//! Index generations: embeddings, HNSW and exact search, hierarchy filters, verification and the atomic switch.
//!
//! # On disk
//!
//! ```text
//! index/<name>/
//!   CURRENT                 "gen-<n>\n": the live generation, replaced only by atomic rename
//!   .lock                   held (flock) by a running `hiercon index`
//!   gen-<n>/
//!     items.jsonl           one ItemRecord a line (manifest item + image sha256), row order
//!     embeddings.safetensors  "embeddings": f32 [count, dim], unit-norm rows
//!     graph.hnsw.graph      hnsw_rs dump (graph; read only to extend it)
//!     graph.hnsw.data       hnsw_rs dump (vectors)
//!     graph.compact         the served graph: vectors in node order, re-selected layer-0
//!                           links, upper layers (`compact::CompactGraph::write`)
//!     graph.nodes           node -> row map, only for a graph reused by an incremental build
//!     generation.json       written last (the commit marker): model digest, parameters,
//!                           counts, and the size + sha256 of every file above
//!     verification.json     the checks' outcome (passed or failed, with numbers)
//! ```
//!
//! A directory without `generation.json` is an interrupted run and is never loaded. Loading
//! checks every file's size and sha256 before parsing it.
//!
//! # One run of `hiercon index` ([`build::run`])
//!
//! 1. take `.lock`; read the manifest; pick the split;
//! 2. hash every image; reuse the embedding of every (image sha256, model digest) pair found in
//!    the live generation (or the newest complete one); decode, preprocess and embed the rest in
//!    batches. Removed items simply are not in the new generation;
//! 3. build the HNSW graph; write `gen-<n>` (files, fsync, `generation.json`, fsync the dir);
//! 4. load `gen-<n>` back from disk and verify it ([`verify`]): recall@10 of HNSW against the
//!    exact scan on a sample is at least the threshold (widening `ef_search` up to a cap if
//!    needed; the `ef` that passed is written back and served), and every item finds itself
//!    first (exact duplicates may tie with each other);
//! 5. only then replace `CURRENT` (temporary file, fsync, rename, fsync the directory) and
//!    delete all but the `--keep` newest generations, never the live one.
//!
//! Killing the process at any moment leaves `CURRENT` naming a complete, verified generation
//! (or absent, if no run ever finished).
//!
//! # Exit codes of `hiercon index` ([`exit_code`])
//!
//! | code | meaning | a scheduler should |
//! |---|---|---|
//! | 0 | new generation verified and live | nothing |
//! | 1 | unexpected failure (I/O, ONNX Runtime, ...); CURRENT unchanged | alert |
//! | 2 | usage or bad input (arguments, manifest, model description, no usable image) | alert, fix input |
//! | 3 | the new generation failed verification; CURRENT unchanged | alert; the old index keeps serving |
//! | 4 | another `hiercon index` holds the lock for this index | retry later |
//!
//! `docs/nightly.md` has the cron line, the systemd units and how `serve` picks up a new
//! generation.

pub mod build;
pub mod compact;
pub mod exact;
pub mod filter;
pub mod hnsw;
pub mod query;
pub mod store;
pub mod verify;

use std::cmp::Ordering;

pub use build::{IndexConfig, IndexOutcome};
pub use exact::ExactIndex;
pub use filter::Filter;
pub use hnsw::{HnswIndex, HnswParams};
pub use store::{Generation, GenerationMeta, ItemRecord};

use crate::Error;

/// Which search answered a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    /// The HNSW graph.
    Approx,
    /// A brute-force scan (over everything, or over a filter's allowed rows).
    Exact,
}

/// A scored row: `score` is the cosine similarity to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub row: u32,
    pub score: f32,
}

impl Hit {
    /// Best first: higher score, then lower row (deterministic ties).
    pub fn ranking(a: &Hit, b: &Hit) -> Ordering {
        b.score.total_cmp(&a.score).then(a.row.cmp(&b.row))
    }
}

/// Which rows a search may return.
pub type RowFilter<'a> = &'a dyn Fn(u32) -> bool;

/// Top-K cosine search over the unit-norm rows of one generation.
///
/// Implementations:
/// - [`HnswIndex`]: the HNSW graph (built by `hnsw_rs`, searched on `compact`), approximate, sub-linear;
/// - [`ExactIndex`]: a brute-force scan, exact — the ground truth in verification and tests,
///   and the path for selective filters.
pub trait AnnIndex: Send + Sync {
    /// Number of rows.
    fn len(&self) -> usize;
    /// Vector width.
    fn dim(&self) -> usize;
    /// Whether this index is approximate.
    fn answer(&self) -> Answer;
    /// The `k` rows most similar to the unit-norm `query`, best first, restricted to rows
    /// `filter` accepts. `ef` is the HNSW search breadth (ignored by exact search).
    ///
    /// With a filter, [`HnswIndex`] walks the graph through rejected nodes too and returns only
    /// accepted ones: correct, but a selective filter makes it explore most of the graph (slower
    /// than a scan, see `benches/index.rs`); the query planner scans selective filters exactly and
    /// post-filters an unfiltered search otherwise ([`query::approx_candidates`]).
    fn search(&self, query: &[f32], k: usize, ef: usize, filter: Option<RowFilter<'_>>) -> Vec<crate::index::Hit>;
    /// True when there are no rows.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Exit codes of `hiercon index` (see the table above).
pub mod exit {
    pub const SWITCHED: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const VERIFICATION_FAILED: u8 = 3;
    pub const LOCKED: u8 = 4;
}

/// The exit code `hiercon index` returns for an error.
pub fn exit_code(err: &Error) -> u8 {
    match err {
        Error::InvalidArgument { .. }
        | Error::ModelMeta { .. }
        | Error::WrongVectorDimension { .. }
        | Error::EmptyIndex { .. }
        | Error::Manifest { .. } => exit::BAD_INPUT,
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => exit::BAD_INPUT,
        Error::IndexVerification { .. } => exit::VERIFICATION_FAILED,
        Error::IndexLocked { .. } => exit::LOCKED,
        _ => exit::FAILURE,
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use ndarray::Array2;
    use rand::SeedableRng;

    use super::store::{EmbedStats, GenerationMeta, INDEX_FORMAT, ItemRecord, ModelInfo};
    use crate::catalogue::{Item, Split};

    /// Item `i`: category `a/b`, product `p{i/3}`.
    pub fn item(i: usize) -> ItemRecord {
        ItemRecord {
            item: Item {
                id: format!("item-{i}"),
                image: format!("img/{i}.png"),
                category: "a/b".into(),
                product: format!("p{}", i / 3),
                variation: "v".into(),
                view: String::new(),
                split: Split::Train,
                role: None,
                title: None,
                attributes: Default::default(),
            },
            sha256: format!("{i:064x}"),
        }
    }

    /// A `generation.json` for generation `n` (counts and files are filled in when written).
    pub fn meta(n: u64) -> GenerationMeta {
        GenerationMeta {
            format: INDEX_FORMAT.into(),
            generation: n,
            created_unix: 0,
            manifest: "m.jsonl".into(),
            image_root: "/data".into(),
            split: None,
            model: ModelInfo { path: None, digest: "d".into(), dim: 8 },
            count: 0,
            dim: 0,
            hnsw: super::HnswParams::default(),
            ef_search: 64,
            stats: EmbedStats::default(),
            files: Default::default(),
            hnsw_orphans: Vec::new(),
            hnsw_nodes: None,
            build: None,
        }
    }

    /// `n` random unit rows of width `dim` (Gaussian directions), seeded.
    pub fn random_unit_rows(n: usize, dim: usize, seed: u64) -> Array2<f32> {
        use rand::Rng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut a = Array2::from_shape_fn((n, dim), |_| rng.random_range(-1.0f32..1.0));
        crate::encoder::l2_normalize_rows(&mut a);
        a
    }
}
