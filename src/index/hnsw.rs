//! The approximate index: an `hnsw_rs` graph over unit vectors, built, dumped and reloaded as one owning type.
//!
//! `hnsw_rs` reloads a dump as `Hnsw<'a, ..>` borrowing the `HnswIo` that read it (the borrow
//! exists so the data may be memory-mapped). [`HnswIndex`] keeps the two together with
//! `self_cell`, a small audited crate whose one job is exactly this owner + dependent pairing,
//! so callers hold a plain `'static` value and never see the lifetimes, and we write no `unsafe`.
//! We reload without mmap: every vector is in memory, the server stays fast after a reload, and
//! a generation directory may be deleted while a server still holds it.

use std::panic::AssertUnwindSafe;
use std::path::Path;

use hnsw_rs::anndists::dist::distances::Distance;
use hnsw_rs::api::AnnT;
use hnsw_rs::hnsw::Hnsw;
use hnsw_rs::hnswio::HnswIo;
use ndarray::ArrayView2;

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
/// Hits a row's self-search may return before it counts as not reached (room for identical rows).
pub const ORPHAN_K: usize = 8;
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

/// An owning HNSW index over `len` unit vectors of width `dim`; row ids are the HNSW data ids.
///
/// Rows the graph does not reach ([`HnswIndex::orphans`], found by [`HnswIndex::find_orphans`]
/// and recorded in `generation.json`) are kept beside it and scored exactly on every search.
/// `hnsw_rs` shrinks a node's neighbour list by dropping its farthest entry when a closer point
/// links in, so an outlier can lose every in-link while keeping its out-links, and then no
/// search reaches it; an outlier whose in-links come only from points off its search path is
/// missed the same way. Verification found such rows on the emoji catalogue; serial insertion
/// shows them too, so they are not the parallel-insertion race.
pub struct HnswIndex {
    cell: GraphCell,
    len: usize,
    dim: usize,
    orphans: Vec<(u32, Vec<f32>)>,
}

impl std::fmt::Debug for HnswIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswIndex").field("len", &self.len).field("dim", &self.dim).finish()
    }
}

impl HnswIndex {
    /// Builds a graph over the rows of `data` (row `i` gets id `i`), inserting in parallel.
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
            for chunk in rows[serial..].chunks(INSERT_CHUNK) {
                g.parallel_insert_slice(&chunk.to_vec());
                progress.inc(chunk.len() as u64);
            }
            g.set_searching_mode(true);
            g
        });
        Ok(HnswIndex { cell, len, dim, orphans: Vec::new() })
    }

    /// Rows searched exactly beside the graph (see the type's docs).
    pub fn orphans(&self) -> Vec<u32> {
        self.orphans.iter().map(|(r, _)| *r).collect()
    }

    /// Searches every row of `data` (the indexed vectors) for itself at breadth `ef`; the rows
    /// the graph does not return among the first [`ORPHAN_K`] become orphans, searched exactly
    /// from now on. Returns them (for `generation.json`).
    pub fn find_orphans(&mut self, data: ArrayView2<f32>, ef: usize) -> Vec<u32> {
        use rayon::prelude::*;
        let data = data.as_standard_layout();
        let k = ORPHAN_K.min(self.len);
        let missed: Vec<u32> = self.cell.with_dependent(|_, g| {
            (0..data.nrows())
                .into_par_iter()
                .filter(|&r| {
                    let q = data.row(r);
                    !g.search(q.as_slice().expect("standard layout"), k, ef.max(k)).iter().any(|h| h.d_id == r)
                })
                .map(|r| r as u32)
                .collect()
        });
        self.set_orphans(&missed, data.view());
        if !missed.is_empty() {
            tracing::info!(rows = missed.len(), "rows the HNSW graph does not reach are searched exactly");
        }
        missed
    }

    /// Marks `rows` of `data` as orphans (as recorded in `generation.json`).
    pub fn set_orphans(&mut self, rows: &[u32], data: ArrayView2<f32>) {
        self.orphans = rows
            .iter()
            .filter(|&&r| (r as usize) < data.nrows())
            .map(|&r| (r, data.row(r as usize).to_vec()))
            .collect();
    }

    /// Writes `<basename>.hnsw.graph` and `<basename>.hnsw.data` into `dir` (which must exist;
    /// existing files of that name are overwritten).
    pub fn dump(&self, dir: &Path, basename: &str) -> Result<()> {
        let written = self
            .cell
            .with_dependent(|_, g| g.file_dump(dir, basename))
            .map_err(|e| Error::IndexCorrupt { path: dir.to_path_buf(), reason: format!("writing the graph: {e}") })?;
        if written != basename {
            return Err(Error::IndexCorrupt {
                path: dir.to_path_buf(),
                reason: format!("hnsw_rs wrote `{written}` instead of `{basename}`"),
            });
        }
        Ok(())
    }

    /// Reloads a dump, checking it holds `len` points of width `dim`. A damaged dump is an
    /// [`Error::IndexCorrupt`], never a panic (`hnsw_rs` asserts on some malformed input; the
    /// panic is caught here).
    pub fn load(dir: &Path, basename: &str, len: usize, dim: usize) -> Result<Self> {
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
        if points != len {
            return Err(corrupt(format!("the graph holds {points} points, the generation has {len} items")));
        }
        let data_dim = cell.with_dependent(|_, g| g.get_point_indexation().get_data_dimension());
        if len > 0 && data_dim != dim {
            return Err(corrupt(format!("the graph's vectors have width {data_dim}, expected {dim}")));
        }
        cell.with_dependent_mut(|_, g| g.set_searching_mode(true));
        Ok(HnswIndex { cell, len, dim, orphans: Vec::new() })
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
        let ef = ef.max(k);
        let found = self.cell.with_dependent(|_, g| match filter {
            None => g.search(query, k, ef),
            Some(f) => {
                let adapter = |id: &usize| f(*id as u32);
                g.search_filter(query, k, ef, Some(&adapter))
            }
        });
        let mut hits: Vec<Hit> =
            found.into_iter().map(|n| Hit { row: n.d_id as u32, score: 1.0 - n.distance }).collect();
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
        let loaded = HnswIndex::load(dir.path(), "graph", 600, 16).unwrap();
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
        assert!(matches!(HnswIndex::load(dir.path(), "graph", 101, 8), Err(Error::IndexCorrupt { .. })));
        let data_file = dir.path().join("graph.hnsw.data");
        let mut bytes = std::fs::read(&data_file).unwrap();
        bytes[0] ^= 0xff; // the magic number
        std::fs::write(&data_file, &bytes).unwrap();
        let err = HnswIndex::load(dir.path(), "graph", 100, 8).unwrap_err();
        assert!(matches!(err, Error::IndexCorrupt { .. }), "{err}");
        std::fs::remove_file(dir.path().join("graph.hnsw.graph")).unwrap();
        assert!(HnswIndex::load(dir.path(), "graph", 100, 8).is_err());
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
        // The graph alone does not find some rows (mostly the outliers) searched for themselves;
        // after `find_orphans` the index finds every row first, also after a dump and a reload
        // with the recorded orphans. (Without the exact fallback the checks below fail.)
        let (data, outliers) = outliers_and_cluster();
        // Few links per node (M = 4) make the effect frequent; the emoji catalogue showed it at
        // the default M = 16 (1-3 rows of 7,572).
        let params = HnswParams { m: 4, ef_construction: 32 };
        let mut idx = HnswIndex::build(data.view(), &params, &Progress::hidden()).unwrap();
        let missed_before: Vec<u32> = (0..data.nrows() as u32)
            .filter(|&r| idx.search(data.row(r as usize).as_slice().unwrap(), 3, 64, None)[0].row != r)
            .collect();
        let orphans = idx.find_orphans(data.view(), 64);
        assert!(orphans.iter().filter(|o| outliers.contains(o)).count() >= 10, "outliers are lost: {orphans:?}");
        assert!(missed_before.iter().all(|r| orphans.contains(r)), "every row a search missed is an orphan");
        assert!(!missed_before.is_empty());
        let dir = tempfile::tempdir().unwrap();
        idx.dump(dir.path(), "graph").unwrap();
        let mut loaded = HnswIndex::load(dir.path(), "graph", data.nrows(), data.ncols()).unwrap();
        loaded.set_orphans(&orphans, data.view());
        assert_eq!(loaded.orphans(), orphans);
        for ix in [&idx, &loaded] {
            for r in (0..data.nrows() as u32).step_by(7).chain(orphans.iter().copied()) {
                let hits = ix.search(data.row(r as usize).as_slice().unwrap(), 3, 64, None);
                assert_eq!(hits[0].row, r, "row {r}");
                assert!((hits[0].score - 1.0).abs() < 1e-5);
            }
        }
        // A filter applies to them too.
        let o = orphans[0];
        let not_o = move |r: u32| r != o;
        assert!(idx.search(data.row(o as usize).as_slice().unwrap(), 3, 64, Some(&not_o)).iter().all(|h| h.row != o));
    }

    #[test]
    fn rejects_parameters_hnsw_rs_would_exit_on() {
        assert!(HnswParams { m: 300, ef_construction: 400 }.validate().is_err());
        assert!(HnswParams { m: 16, ef_construction: 8 }.validate().is_err());
        assert!(HnswParams::default().validate().is_ok());
    }
}
