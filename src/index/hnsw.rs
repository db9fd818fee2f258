//! The approximate index: an `hnsw_rs` graph over unit vectors, built, dumped and reloaded as one owning type.
//!
//! `hnsw_rs` reloads a dump as `Hnsw<'a, ..>` borrowing the `HnswIo` that read it (the borrow
//! exists so the data may be memory-mapped). [`HnswIndex`] keeps the two together with
//! `self_cell`, a small audited crate whose one job is exactly this owner + dependent pairing,
//! so callers hold a plain `'static` value and never see the lifetimes, and we write no `unsafe`.
//! We reload without mmap: every vector is in memory, the server stays fast after a reload, and
//! a generation directory may be deleted while a server still holds it. Searches run on a
//! [`CompactGraph`] made from hnsw_rs's graph at build time and written beside its dump
//! (`<basename>.compact`, see `index::compact`); a generation loaded for serving reads only that.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;

use hnsw_rs::anndists::dist::distances::Distance;
use hnsw_rs::api::AnnT;
use hnsw_rs::hnsw::Hnsw;
use hnsw_rs::hnswio::HnswIo;
use ndarray::ArrayView2;

use super::compact::{self, CompactGraph, Prior};
use super::exact::ExactIndex;
use super::{AnnIndex, Answer, Hit, RowFilter};
use crate::progress::Progress;
use crate::{Error, Result};

/// Cosine distance `1 - a.b` on unit vectors, clamped at 0 (rounding can push `a.a` past 1;
/// `hnsw_rs` asserts distances are non-negative). Its type path is recorded in each dump and
/// checked on reload: do not move or rename it.
#[derive(Debug, Default, Clone, Copy)]
pub struct CosineDistance;

impl Distance<f32> for CosineDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - super::exact::dot(a, b)).max(0.0)
    }
}

/// Graph construction parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HnswParams {
    /// Links per node and layer (`M`; layer 0 keeps `2M`). 2..=256.
    pub m: usize,
    /// Candidate list width while inserting.
    pub ef_construction: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams { m: 16, ef_construction: 200 }
    }
}

impl HnswParams {
    /// Rejects values `hnsw_rs` would abort the process on, or that make no graph.
    pub fn validate(&self) -> Result<()> {
        if !(2..=256).contains(&self.m) {
            return Err(Error::InvalidArgument { name: "m", reason: format!("must be in 2..=256, got {}", self.m) });
        }
        if self.ef_construction < self.m {
            return Err(Error::InvalidArgument {
                name: "ef-construction",
                reason: format!("must be at least m = {}, got {}", self.m, self.ef_construction),
            });
        }
        Ok(())
    }
}

/// Layers `hnsw_rs` may use (its maximum).
const MAX_LAYER: usize = 16;
/// Rows inserted serially before parallel insertion starts (see [`HnswIndex::build`]).
const SERIAL_PREFIX: usize = 64;
/// Rows per insertion chunk (progress granularity; large enough to keep rayon busy).
const INSERT_CHUNK: usize = 8192;

type Graph<'a> = Hnsw<'a, f32, CosineDistance>;

self_cell::self_cell!(
    struct GraphCell {
        owner: HnswIo,
        #[not_covariant]
        dependent: Graph,
    }
);

/// An owning HNSW index over `len` unit vectors of width `dim`.
///
/// A graph built from nothing has one node per row (node id = row). A graph reused by an
/// incremental re-index ([`HnswIndex::extend`]) keeps the nodes of the generation it came from:
/// the [`NodeMap`] says which row each node now is, and nodes no row uses any more (removed or
/// changed items) are *tombstones*, skipped by every search.
///
/// Rows the graph does not reach ([`HnswIndex::orphans`], found by [`HnswIndex::find_orphans`]
/// and recorded in `generation.json`) are kept beside it and scored exactly on every search.
/// `hnsw_rs` shrinks a node's neighbour list by dropping its farthest entry when a closer point
/// links in, so an outlier can lose every in-link while keeping its out-links, and then no
/// search reaches it; an outlier whose in-links come only from points off its search path is
/// missed the same way. Verification found such rows on the emoji catalogue; serial insertion
/// shows them too, so they are not the parallel-insertion race.
pub struct HnswIndex {
    /// hnsw_rs's graph, kept while it may still be extended or dumped (after a build, or a load
    /// for extending); a generation loaded for serving drops it.
    cell: Option<GraphCell>,
    /// What searches run on (see [`CompactGraph`]).
    compact: CompactGraph,
    len: usize,
    dim: usize,
    orphans: Vec<(u32, Vec<f32>)>,
    map: Option<NodeMap>,
}

/// Rows of a reused graph's nodes (see [`HnswIndex`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMap {
    /// The row of each node, [`TOMBSTONE`] for nodes no row uses.
    row_of: Vec<u32>,
    /// The node of each row.
    node_of: Vec<u32>,
}

/// `NodeMap` entry of a node no row uses.
pub const TOMBSTONE: u32 = u32::MAX;

impl NodeMap {
    /// The map from each node's row (`TOMBSTONE` for dead nodes); checks it is a bijection
    /// between the live nodes and `0..rows`.
    pub fn from_rows(row_of: Vec<u32>, rows: usize) -> std::result::Result<Self, String> {
        let mut node_of = vec![TOMBSTONE; rows];
        for (node, &row) in row_of.iter().enumerate() {
            if row == TOMBSTONE {
                continue;
            }
            let slot =
                node_of.get_mut(row as usize).ok_or_else(|| format!("node {node} maps to row {row} of {rows}"))?;
            if *slot != TOMBSTONE {
                return Err(format!("nodes {} and {node} both map to row {row}", *slot));
            }
            *slot = node as u32;
        }
        if let Some(row) = node_of.iter().position(|&n| n == TOMBSTONE) {
            return Err(format!("no node holds row {row}"));
        }
        Ok(NodeMap { row_of, node_of })
    }

    /// Graph nodes, live or not.
    pub fn nodes(&self) -> usize {
        self.row_of.len()
    }

    /// Nodes no row uses.
    pub fn tombstones(&self) -> usize {
        self.row_of.len() - self.node_of.len()
    }

    /// The row of each node (`TOMBSTONE` for dead nodes), as written to `graph.nodes`.
    pub fn row_of(&self) -> &[u32] {
        &self.row_of
    }

    /// The node of each row.
    pub fn node_of(&self) -> &[u32] {
        &self.node_of
    }
}

impl std::fmt::Debug for HnswIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswIndex").field("len", &self.len).field("dim", &self.dim).finish()
    }
}

impl HnswIndex {
    /// Builds a graph over the rows of `data` (row `i` is node `i`), inserting in parallel.
    pub fn build(data: ArrayView2<f32>, params: &HnswParams, progress: &Progress) -> Result<Self> {
        params.validate()?;
        let (len, dim) = data.dim();
        let data = data.as_standard_layout();
        let cell = GraphCell::new(HnswIo::default(), |_| {
            let mut g = Graph::new(params.m, len.max(1), MAX_LAYER, params.ef_construction, CosineDistance);
            let rows: Vec<(&[f32], usize)> =
                data.outer_iter().enumerate().map(|(i, r)| (r.to_slice().expect("standard layout"), i)).collect();
            // The first rows go in one at a time: hnsw_rs sets the entry point without a lock
            // held across the check, so two threads inserting into an empty graph can each
            // take it and one of their points is left without links, unreachable.
            let serial = rows.len().min(SERIAL_PREFIX);
            for &row in &rows[..serial] {
                g.insert_slice(row);
            }
            progress.inc(serial as u64);
            insert_parallel(&g, &rows[serial..], progress);
            g.set_searching_mode(true);
            g
        });
        let compact = compact_of(&cell, len, dim, Path::new("(new graph)"), None)?;
        Ok(HnswIndex { cell: Some(cell), compact, len, dim, orphans: Vec::new(), map: None })
    }

    /// Reuses this graph for a new generation of `data.nrows()` rows (incremental re-index):
    /// row `r` is the existing node `keep[r]` (whose vector must equal `data.row(r)`), or, where
    /// `keep[r]` is `None`, a new node inserted with `data.row(r)`. Nodes no row keeps become
    /// tombstones. The extended graph has no orphans until [`HnswIndex::find_orphans`] finds
    /// them (over the whole graph: new rows can change what is reachable).
    pub fn extend(mut self, data: ArrayView2<f32>, keep: &[Option<u32>], progress: &Progress) -> Result<Self> {
        let (rows, dim) = data.dim();
        assert_eq!(keep.len(), rows, "one entry per row");
        if rows > 0 && self.len > 0 && dim != self.dim {
            return Err(Error::WrongVectorDimension { expected: self.dim, received: dim });
        }
        let data = data.as_standard_layout();
        let old_nodes = self.nodes();
        let mut row_of = vec![TOMBSTONE; old_nodes];
        let mut inserts: Vec<(&[f32], usize)> = Vec::new();
        for (r, k) in keep.iter().enumerate() {
            let node = match *k {
                Some(n) if (n as usize) < old_nodes && row_of[n as usize] == TOMBSTONE => n as usize,
                Some(n) => {
                    return Err(Error::InvalidArgument {
                        name: "keep",
                        reason: format!("node {n} is not a free node of {old_nodes}"),
                    });
                }
                None => {
                    row_of.push(TOMBSTONE);
                    inserts.push((data.row(r).to_slice().expect("standard layout"), row_of.len() - 1));
                    row_of.len() - 1
                }
            };
            row_of[node] = r as u32;
        }
        if !inserts.is_empty() {
            let Some(cell) = self.cell.as_mut() else {
                return Err(Error::InvalidArgument {
                    name: "graph",
                    reason: "this graph was loaded for serving only; load it with its hnsw_rs graph to extend it"
                        .into(),
                });
            };
            let path = Path::new("(extended graph)");
            let before = cell
                .with_dependent(|_, g| compact::hnsw_level0(g, old_nodes))
                .map_err(|reason| Error::IndexCorrupt { path: path.to_path_buf(), reason })?;
            cell.with_dependent_mut(|_, g| {
                g.set_searching_mode(false);
                insert_parallel(g, &inserts, progress);
                g.set_searching_mode(true);
            });
            let prior = Prior { graph: &self.compact, hnsw_level0: &before };
            self.compact = compact_of(cell, row_of.len(), dim, path, Some(&prior))?;
        }
        let map = NodeMap::from_rows(row_of, rows).map_err(|reason| Error::InvalidArgument { name: "keep", reason })?;
        self.len = rows;
        if rows > 0 {
            self.dim = dim;
        }
        self.map = Some(map);
        self.orphans.clear();
        Ok(self)
    }

    /// Graph nodes, tombstones included.
    pub fn nodes(&self) -> usize {
        self.map.as_ref().map_or(self.len, NodeMap::nodes)
    }

    /// The node map of a reused graph (`None`: node = row).
    pub fn node_map(&self) -> Option<&NodeMap> {
        self.map.as_ref()
    }

    /// Installs the node map read from `graph.nodes` (see [`HnswIndex::load`]).
    fn with_map(mut self, map: NodeMap) -> Self {
        self.len = map.node_of.len();
        self.map = Some(map);
        self
    }

    /// Rows searched exactly beside the graph (see the type's docs).
    pub fn orphans(&self) -> Vec<u32> {
        self.orphans.iter().map(|(r, _)| *r).collect()
    }

    /// Finds the rows of `data` (the indexed vectors, in row order) that no search can reach
    /// ([`CompactGraph::unreachable`]) and makes them the orphans, searched exactly from now on
    /// (replacing any found before). Returns them (for `generation.json`).
    ///
    /// (An earlier version searched every row for itself at the served `ef` instead: on 1M
    /// clustered vectors that marked 148,219 rows — the ones a narrow search misses, not the
    /// ones it cannot reach — and every search then scored them all.)
    pub fn find_orphans(&mut self, data: ArrayView2<f32>) -> Vec<u32> {
        let row = |n: u32| self.map.as_ref().map_or(n, |m| m.row_of[n as usize]);
        let missed: Vec<u32> = self.compact.unreachable().into_iter().map(row).filter(|&r| r != TOMBSTONE).collect();
        if !missed.is_empty() {
            tracing::info!(rows = missed.len(), "rows the HNSW graph does not reach are searched exactly");
        }
        let mut orphans = missed;
        orphans.sort_unstable();
        self.set_orphans(&orphans, data);
        orphans
    }

    /// Marks `rows` of `data` as orphans (as recorded in `generation.json`).
    pub fn set_orphans(&mut self, rows: &[u32], data: ArrayView2<f32>) {
        self.orphans = rows
            .iter()
            .filter(|&&r| (r as usize) < data.nrows())
            .map(|&r| (r, data.row(r as usize).to_vec()))
            .collect();
    }

    /// Writes `<basename>.hnsw.graph` and `<basename>.hnsw.data` (hnsw_rs's dump) and
    /// `<basename>.compact` (the served graph) into `dir` (which must exist; existing files of
    /// that name are overwritten). The node map, if any, is the caller's to
    /// write ([`NodeMap::row_of`]).
    pub fn dump(&self, dir: &Path, basename: &str) -> Result<()> {
        let Some(cell) = &self.cell else {
            return Err(Error::IndexCorrupt {
                path: dir.to_path_buf(),
                reason: "a graph loaded for serving only cannot be written (link its files instead)".into(),
            });
        };
        let written = cell
            .with_dependent(|_, g| g.file_dump(dir, basename))
            .map_err(|e| Error::IndexCorrupt { path: dir.to_path_buf(), reason: format!("writing the graph: {e}") })?;
        if written != basename {
            return Err(Error::IndexCorrupt {
                path: dir.to_path_buf(),
                reason: format!("hnsw_rs wrote `{written}` instead of `{basename}`"),
            });
        }
        self.write_compact(dir, basename)
    }

    /// Writes the served graph alone, `<basename>.compact` ([`compact_file`]), into `dir`.
    pub fn write_compact(&self, dir: &Path, basename: &str) -> Result<()> {
        let path = dir.join(compact_file(basename));
        self.compact.write(&path).map_err(|e| Error::io(&path, e))
    }

    /// Reloads a graph written by [`HnswIndex::dump`], checking it holds `nodes` points of
    /// width `dim`; `map` is the node map of a reused graph (`None`: one node per row). A damaged
    /// file is an [`Error::IndexCorrupt`], never a panic (`hnsw_rs` asserts on some malformed
    /// input; the panic is caught here).
    ///
    /// The served graph is read from `<basename>.compact`. With `keep_graph` hnsw_rs's own form
    /// is loaded too, so the graph can be extended and dumped; without it hnsw_rs's files are
    /// not read at all. A directory without the `.compact` file (written by an earlier version)
    /// has its served graph derived from hnsw_rs's dump, as a build does.
    pub fn load(
        dir: &Path,
        basename: &str,
        nodes: usize,
        dim: usize,
        map: Option<NodeMap>,
        keep_graph: bool,
    ) -> Result<Self> {
        if let Some(m) = &map
            && m.nodes() != nodes
        {
            return Err(Error::IndexCorrupt {
                path: dir.join(format!("{basename}.*")),
                reason: format!("the node map has {} nodes, the graph {nodes}", m.nodes()),
            });
        }
        let compact_path = dir.join(compact_file(basename));
        let compact = match compact_path.exists() {
            true => Some(
                CompactGraph::read(&compact_path, nodes, dim)
                    .map_err(|reason| Error::IndexCorrupt { path: compact_path.clone(), reason })?,
            ),
            false => None,
        };
        let cell = match (&compact, keep_graph) {
            (Some(_), false) => None,
            _ => Some(Self::load_hnsw_rs(dir, basename, nodes, dim)?),
        };
        let compact = match (compact, &cell) {
            (Some(c), _) => c,
            (None, Some(cell)) => {
                tracing::info!(dir = %dir.display(), "no served graph file: deriving it from hnsw_rs's dump");
                compact_of(cell, nodes, dim, &dir.join(format!("{basename}.hnsw.graph")), None)?
            }
            (None, None) => unreachable!("hnsw_rs's form is loaded when there is no served graph file"),
        };
        let cell = cell.filter(|_| keep_graph);
        if cell.is_none() {
            release_freed_memory();
        }
        let idx = HnswIndex { cell, compact, len: nodes, dim, orphans: Vec::new(), map: None };
        Ok(match map {
            Some(m) => idx.with_map(m),
            None => idx,
        })
    }

    /// hnsw_rs's form of the dump `basename` in `dir`, checked to hold `nodes` points of width `dim`.
    fn load_hnsw_rs(dir: &Path, basename: &str, nodes: usize, dim: usize) -> Result<GraphCell> {
        let corrupt = |reason: String| Error::IndexCorrupt { path: dir.join(format!("{basename}.hnsw.*")), reason };
        let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| {
            GraphCell::try_new(HnswIo::new(dir, basename), |io| io.load_hnsw_with_dist(CosineDistance))
        }));
        let mut cell = match loaded {
            Ok(Ok(cell)) => cell,
            Ok(Err(e)) => return Err(corrupt(format!("cannot reload the graph: {e:#}"))),
            Err(panic) => return Err(corrupt(format!("cannot reload the graph: {}", panic_message(&panic)))),
        };
        let points = cell.with_dependent(|_, g| g.get_nb_point());
        if points != nodes {
            return Err(corrupt(format!("the graph holds {points} points, the generation has {nodes} nodes")));
        }
        let data_dim = cell.with_dependent(|_, g| g.get_point_indexation().get_data_dimension());
        if nodes > 0 && data_dim != dim {
            return Err(corrupt(format!("the graph's vectors have width {data_dim}, expected {dim}")));
        }
        cell.with_dependent_mut(|_, g| g.set_searching_mode(true));
        Ok(cell)
    }

    /// The graph's answer as rows (tombstones skipped, orphans not added), best first.
    fn graph_search(&self, query: &[f32], k: usize, ef: usize, filter: Option<RowFilter<'_>>) -> Vec<Hit> {
        let hits = match &self.map {
            None => self.compact.search(query, k, ef, filter),
            Some(map) => {
                let live =
                    |n: u32| map.row_of.get(n as usize).is_some_and(|&r| r != TOMBSTONE && filter.is_none_or(|f| f(r)));
                self.compact.search(query, k, ef, Some(&live))
            }
        };
        let row = |n: u32| self.map.as_ref().map_or(n, |m| m.row_of[n as usize]);
        hits.into_iter().map(|h| Hit { row: row(h.row), ..h }).collect()
    }

    /// The exact index over the same vectors (held once: the graph's, in node order).
    pub fn exact(&self) -> ExactIndex {
        let node_of = self.map.as_ref().map(|m| Arc::from(m.node_of.as_slice()));
        ExactIndex::shared(self.compact.vectors().clone(), node_of)
    }
}

/// Hands the memory hnsw_rs's dropped graph occupied back to the system. Its millions of small
/// allocations are freed on drop, but glibc keeps freed heap pages mapped, so without this a
/// server's resident memory would stay at the size of hnsw_rs's form (4.4 GiB instead of about
/// 0.7 GiB for 1M vectors of width 128).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim only returns free heap memory to the system; it takes no
        // pointers and is safe to call at any time from any thread.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// The [`CompactGraph`] of an hnsw_rs graph; a graph that does not convert is corrupt.
fn compact_of(
    cell: &GraphCell,
    nodes: usize,
    dim: usize,
    path: &Path,
    prior: Option<&Prior<'_>>,
) -> Result<CompactGraph> {
    cell.with_dependent(|_, g| CompactGraph::from_hnsw(g, nodes, dim, prior))
        .map_err(|reason| Error::IndexCorrupt { path: path.to_path_buf(), reason })
}

/// The file of the served graph ([`CompactGraph::write`]) beside hnsw_rs's dump `basename`.
pub fn compact_file(basename: &str) -> String {
    format!("{basename}.compact")
}

/// Inserts `rows` in parallel chunks, counting them on `progress`.
fn insert_parallel(g: &Graph<'_>, rows: &[(&[f32], usize)], progress: &Progress) {
    for chunk in rows.chunks(INSERT_CHUNK) {
        g.parallel_insert_slice(&chunk.to_vec());
        progress.inc(chunk.len() as u64);
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

impl AnnIndex for HnswIndex {
    fn len(&self) -> usize {
        self.len
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn answer(&self) -> Answer {
        Answer::Approx
    }

    fn search(&self, query: &[f32], k: usize, ef: usize, filter: Option<RowFilter<'_>>) -> Vec<Hit> {
        if k == 0 || self.len == 0 {
            return Vec::new();
        }
        let mut hits = self.graph_search(query, k, ef.max(k), filter);
        // Rows the graph cannot reach, scored exactly (see the type's docs).
        for (row, v) in &self.orphans {
            if filter.is_none_or(|f| f(*row)) && !hits.iter().any(|h| h.row == *row) {
                hits.push(Hit { row: *row, score: super::exact::dot(query, v) });
            }
        }
        // hnsw_rs returns by increasing distance; make ties deterministic like the exact scan.
        hits.sort_by(Hit::ranking);
        hits.truncate(k);
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::exact::ExactIndex;
    use crate::index::testutil::random_unit_rows;

    #[test]
    fn build_dump_reload_answers_like_the_original_and_agrees_with_exact() {
        let data = random_unit_rows(600, 16, 5);
        let built = HnswIndex::build(data.view(), &HnswParams::default(), &Progress::hidden()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        built.dump(dir.path(), "graph").unwrap();
        let loaded = HnswIndex::load(dir.path(), "graph", 600, 16, None, false).unwrap();
        let exact = ExactIndex::new(std::sync::Arc::new(data.clone()));
        let mut agree = 0;
        for q in 0..50 {
            let query = data.row(q * 7).to_vec();
            let a = built.search(&query, 10, 64, None);
            let b = loaded.search(&query, 10, 64, None);
            assert_eq!(a.len(), 10);
            assert_eq!(b[0].row, (q * 7) as u32, "a stored vector finds itself first");
            assert!((b[0].score - 1.0).abs() < 1e-5);
            let e = exact.search(&query, 10, 0, None);
            agree += b.iter().filter(|h| e.iter().any(|x| x.row == h.row)).count();
            // Scores are cosine similarities of the returned rows.
            for h in &b {
                let want = super::super::exact::dot(&query, data.row(h.row as usize).as_slice().unwrap());
                assert!((h.score - want).abs() < 1e-5);
            }
        }
        assert!(agree as f64 / 500.0 > 0.95, "recall@10 {}", agree as f64 / 500.0);
    }

    #[test]
    fn filtered_search_returns_only_allowed_rows() {
        let data = random_unit_rows(400, 8, 6);
        let idx = HnswIndex::build(data.view(), &HnswParams::default(), &Progress::hidden()).unwrap();
        let even = |r: u32| r.is_multiple_of(2);
        let hits = idx.search(data.row(3).as_slice().unwrap(), 10, 64, Some(&even));
        assert!(!hits.is_empty());
        assert!(hits.iter().all(|h| h.row.is_multiple_of(2)), "{hits:?}");
    }

    #[test]
    fn a_damaged_dump_is_an_error_not_a_panic() {
        let data = random_unit_rows(100, 8, 7);
        let idx = HnswIndex::build(data.view(), &HnswParams::default(), &Progress::hidden()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        idx.dump(dir.path(), "graph").unwrap();
        let load = |keep| HnswIndex::load(dir.path(), "graph", 100, 8, None, keep);
        assert!(matches!(HnswIndex::load(dir.path(), "graph", 101, 8, None, false), Err(Error::IndexCorrupt { .. })));
        assert!(matches!(HnswIndex::load(dir.path(), "graph", 100, 9, None, true), Err(Error::IndexCorrupt { .. })));
        // The served graph's file: a foreign magic, a truncation, trailing bytes, a link out of range.
        let served = dir.path().join("graph.compact");
        let good = std::fs::read(&served).unwrap();
        let links_at = 16 + 32 + 8 + 100 * 8 * 4 + 4; // node 0's first link
        let cases: [(&str, Vec<u8>); 4] = [
            ("bad magic", [b"not-a-graph-file".as_slice(), &good[16..]].concat()),
            ("ends early", good[..good.len() - 3].to_vec()),
            ("bytes after", [good.as_slice(), &[0]].concat()),
            ("names node", [&good[..links_at], &200u32.to_le_bytes(), &good[links_at + 4..]].concat()),
        ];
        for (want, bytes) in cases {
            std::fs::write(&served, bytes).unwrap();
            let err = load(false).unwrap_err();
            assert!(matches!(err, Error::IndexCorrupt { .. }) && err.to_string().contains(want), "{want}: {err}");
        }
        std::fs::write(&served, &good).unwrap();
        // hnsw_rs's files are read when the graph is loaded to be extended, or when there is no
        // served-graph file (a generation of an earlier version).
        let data_file = dir.path().join("graph.hnsw.data");
        let mut bytes = std::fs::read(&data_file).unwrap();
        bytes[0] ^= 0xff; // the magic number
        std::fs::write(&data_file, &bytes).unwrap();
        assert!(load(false).is_ok());
        let err = load(true).unwrap_err();
        assert!(matches!(err, Error::IndexCorrupt { .. }), "{err}");
        std::fs::remove_file(&served).unwrap();
        assert!(matches!(load(false), Err(Error::IndexCorrupt { .. })));
        std::fs::remove_file(dir.path().join("graph.hnsw.graph")).unwrap();
        assert!(load(false).is_err());
    }

    #[test]
    fn the_served_graph_file_reads_back_the_same_graph_and_older_dumps_still_load() {
        let data = random_unit_rows(500, 16, 3);
        let idx = HnswIndex::build(data.view(), &HnswParams::default(), &Progress::hidden()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        idx.dump(dir.path(), "graph").unwrap();
        let served = HnswIndex::load(dir.path(), "graph", 500, 16, None, false).unwrap();
        assert!(served.cell.is_none(), "serving never loads hnsw_rs's form when the file is there");
        assert!(idx.compact == served.compact, "links, layers, entry point and vectors read back as written");
        // Without the file (an earlier version's generation) the same graph is derived again.
        std::fs::remove_file(dir.path().join(compact_file("graph"))).unwrap();
        let derived = HnswIndex::load(dir.path(), "graph", 500, 16, None, false).unwrap();
        assert!(derived.compact == idx.compact);
    }

    /// 60 outliers, each in its own direction, inserted among the first points of a tight
    /// cluster of 3,000: as the cluster fills in, the cluster points' neighbour lists drop the
    /// outliers (the farthest entries), leaving outliers (and, with few links, some cluster
    /// points) without in-links.
    fn outliers_and_cluster() -> (ndarray::Array2<f32>, Vec<u32>) {
        use rand::{Rng, SeedableRng};
        let (n_out, n_cluster, d) = (60usize, 3000usize, 16usize);
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        let mut rows: Vec<Vec<f32>> = Vec::new();
        let mut outliers = Vec::new();
        let unit = |v: Vec<f32>| {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
        };
        for i in 0..n_cluster + n_out {
            if i >= 10 && i % 20 == 0 && outliers.len() < n_out {
                outliers.push(rows.len() as u32);
                rows.push(unit((0..d).map(|_| r.random_range(-1.0f32..1.0)).collect()));
            } else {
                let mut v = vec![0.0f32; d];
                v[0] = 1.0;
                v.iter_mut().for_each(|x| *x += r.random_range(-0.05f32..0.05));
                rows.push(unit(v));
            }
        }
        let flat: Vec<f32> = rows.concat();
        (ndarray::Array2::from_shape_vec((rows.len(), d), flat).unwrap(), outliers)
    }

    #[test]
    fn rows_the_graph_cannot_reach_are_still_found() {
        // hnsw_rs's own search, with a beam as wide as the index (so a row is missed only if no
        // path leads to it), does not find some rows (mostly the outliers) searched for
        // themselves. The served graph links them back (`compact::relink_unreachable`) and
        // scores whatever stays unreachable exactly (orphans), so the index finds every row
        // first, also after a dump and a reload. (Without both the checks below fail.)
        let (data, outliers) = outliers_and_cluster();
        let n = data.nrows();
        // Few links per node (M = 4) make the effect frequent; the emoji catalogue showed it at
        // the default M = 16 (1-3 rows of 7,572), 1M clustered vectors at 14.8 % of the rows.
        let params = HnswParams { m: 4, ef_construction: 32 };
        let mut idx = HnswIndex::build(data.view(), &params, &Progress::hidden()).unwrap();
        let lost: Vec<u32> = idx.cell.as_ref().unwrap().with_dependent(|_, g| {
            (0..n as u32)
                .filter(|&r| {
                    g.search(data.row(r as usize).as_slice().unwrap(), 3, 256).first().map(|h| h.d_id)
                        != Some(r as usize)
                })
                .collect()
        });
        assert!(lost.iter().filter(|r| outliers.contains(r)).count() >= 10, "hnsw_rs loses outliers: {lost:?}");
        let orphans = idx.find_orphans(data.view());
        assert!(orphans.len() < lost.len(), "relinking leaves fewer rows unreachable: {orphans:?}");
        let found_first = |ix: &HnswIndex, r: u32, ef: usize| {
            ix.search(data.row(r as usize).as_slice().unwrap(), 3, ef, None)[0].row == r
        };
        let dir = tempfile::tempdir().unwrap();
        idx.dump(dir.path(), "graph").unwrap();
        let mut loaded = HnswIndex::load(dir.path(), "graph", n, data.ncols(), None, false).unwrap();
        loaded.set_orphans(&orphans, data.view());
        assert_eq!(loaded.orphans(), orphans);
        for ix in [&idx, &loaded] {
            for r in (0..n as u32).step_by(7).chain(lost.iter().copied()) {
                assert!(found_first(ix, r, n), "row {r}");
            }
        }
        // A filter applies to orphans too.
        let mut only: HnswIndex = HnswIndex::load(dir.path(), "graph", n, data.ncols(), None, false).unwrap();
        only.set_orphans(&[lost[0]], data.view());
        let o = lost[0];
        let not_o = move |r: u32| r != o;
        assert!(only.search(data.row(o as usize).as_slice().unwrap(), 3, 64, Some(&not_o)).iter().all(|h| h.row != o));
        assert_eq!(only.search(data.row(o as usize).as_slice().unwrap(), 3, 64, None)[0].row, o);
    }

    #[test]
    fn an_extended_graph_finds_kept_and_new_rows_and_never_a_tombstone() {
        // 600 rows; the next generation keeps 450 of them (reordered), drops 150 (tombstones)
        // and adds 60 new ones.
        let old = random_unit_rows(600, 16, 8);
        let fresh = random_unit_rows(60, 16, 9);
        let idx = HnswIndex::build(old.view(), &HnswParams::default(), &Progress::hidden()).unwrap();
        let kept: Vec<usize> = (0..600).filter(|i| i % 4 != 1).rev().collect();
        let mut rows: Vec<ndarray::ArrayView1<f32>> = kept.iter().map(|&i| old.row(i)).collect();
        rows.extend(fresh.rows());
        let data = ndarray::stack(ndarray::Axis(0), &rows).unwrap();
        let mut keep: Vec<Option<u32>> = kept.iter().map(|&i| Some(i as u32)).collect();
        keep.extend(std::iter::repeat_n(None, 60));
        let mut ext = idx.extend(data.view(), &keep, &Progress::hidden()).unwrap();
        ext.find_orphans(data.view());
        let map = ext.node_map().unwrap().clone();
        assert_eq!((map.nodes(), map.tombstones(), ext.len()), (660, 150, 510));
        let dir = tempfile::tempdir().unwrap();
        ext.dump(dir.path(), "graph").unwrap();
        let loaded = HnswIndex::load(dir.path(), "graph", 660, 16, Some(map.clone()), true).unwrap();
        let exact = ExactIndex::new(std::sync::Arc::new(data.to_owned()));
        for ix in [&ext, &loaded] {
            let mut agree = 0;
            for r in 0..510u32 {
                let q = data.row(r as usize).to_vec();
                let hits = ix.search(&q, 10, 64, None);
                assert_eq!(hits.len(), 10);
                assert_eq!(hits[0].row, r, "every row finds itself first");
                assert!(hits.iter().all(|h| h.row < 510), "only rows of the new generation");
                for h in &hits {
                    let want = super::super::exact::dot(&q, data.row(h.row as usize).as_slice().unwrap());
                    assert!((h.score - want).abs() < 1e-5, "the score is the row's own");
                }
                let e = exact.search(&q, 10, 0, None);
                agree += hits.iter().filter(|h| e.iter().any(|x| x.row == h.row)).count();
            }
            assert!(agree as f64 / 5100.0 > 0.95, "recall@10 {}", agree as f64 / 5100.0);
            // A removed row's own vector finds only live rows; filters see rows, not nodes.
            let gone = old.row(1).to_vec();
            assert!(ix.search(&gone, 20, 64, None).iter().all(|h| h.row < 510));
            let even = |r: u32| r.is_multiple_of(2);
            let hits = ix.search(&gone, 10, 64, Some(&even));
            assert!(!hits.is_empty() && hits.iter().all(|h| h.row % 2 == 0 && h.row < 510), "{hits:?}");
        }
        // A second extension of the reused graph: drop the new rows again, keep the rest.
        let keep2: Vec<Option<u32>> = (0..450).map(|r| Some(map.node_of()[r])).collect();
        let data2 = data.slice(ndarray::s![..450, ..]).to_owned();
        let ext2 = loaded.extend(data2.view(), &keep2, &Progress::hidden()).unwrap();
        assert_eq!((ext2.nodes(), ext2.node_map().unwrap().tombstones()), (660, 210));
        assert_eq!(ext2.search(data2.row(17).as_slice().unwrap(), 3, 64, None)[0].row, 17);
    }

    #[test]
    fn node_maps_must_be_one_to_one() {
        assert!(NodeMap::from_rows(vec![1, TOMBSTONE, 0], 2).is_ok());
        assert!(NodeMap::from_rows(vec![1, 1, 0], 2).unwrap_err().contains("both map to row 1"));
        assert!(NodeMap::from_rows(vec![0, TOMBSTONE], 2).unwrap_err().contains("no node holds row 1"));
        assert!(NodeMap::from_rows(vec![0, 5], 2).unwrap_err().contains("row 5"));
        let data = random_unit_rows(50, 8, 3);
        let idx = HnswIndex::build(data.view(), &HnswParams::default(), &Progress::hidden()).unwrap();
        let twice = vec![Some(3), Some(3)];
        let err = idx.extend(data.slice(ndarray::s![..2, ..]), &twice, &Progress::hidden()).unwrap_err();
        assert!(err.to_string().contains("node 3"), "{err}");
    }

    #[test]
    fn rejects_parameters_hnsw_rs_would_exit_on() {
        assert!(HnswParams { m: 300, ef_construction: 400 }.validate().is_err());
        assert!(HnswParams { m: 16, ef_construction: 8 }.validate().is_err());
        assert!(HnswParams::default().validate().is_ok());
    }
}
