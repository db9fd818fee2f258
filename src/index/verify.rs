//! Checks a generation loaded back from disk before it may go live: self-retrieval and recall@k against exact search.
//!
//! - **Self-retrieval.** Every item, used as a query, must come back first. A node HNSW cannot
//!   reach fails this. Exact duplicate images have bitwise-equal embeddings (embeddings are
//!   cached by image hash), so for an item with `c` identical rows the check asks for `c + 3`
//!   hits and passes when the item is among them and everything ranked above it scores the same
//!   (within [`TIE_EPS`]). Items not returned at all are *unreachable*; items returned below a
//!   strictly better row are *outranked*. Both count as misses. Nodes no path reaches are linked
//!   back or scored exactly (`index::compact`), so a miss is a beam too narrow for that row: the
//!   missed rows are checked again at doubled `ef` (up to [`VerifyConfig::max_ef`]), and more
//!   than [`VerifyConfig::max_self_misses`] (default 0) misses at the widest `ef` fails the
//!   generation. On 1M clustered vectors 2,917 rows (0.29 %) missed themselves at ef 256.
//! - **Recall.** On a seeded sample of items, recall@k of HNSW against the exact scan, where an
//!   approximate hit counts when its score is at least the exact k-th score (ties with the k-th
//!   neighbour are not penalised). It is measured at the generation's `ef_search`; while it is
//!   below [`VerifyConfig::min_recall`] (default 0.98) `ef` is doubled, up to
//!   [`VerifyConfig::max_ef`] (default 512). The `ef` that reached the threshold is the one the
//!   self-retrieval check uses and the one written back to `generation.json` for serving; if
//!   even `max_ef` falls short, the generation fails. (Large indexes need a wider search than
//!   small ones for the same recall: on 1M clustered synthetic vectors, recall@10 is 0.965 at
//!   ef 64 and 0.996 at ef 256 — see `bench/results/index-side-by-side.md`.)

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::exact::ExactIndex;
use super::store::Generation;
use super::{AnnIndex, Hit};

/// Scores this close count as equal.
pub const TIE_EPS: f32 = 1e-5;
/// Extra hits asked for in the self-retrieval check.
const SELF_SLACK: usize = 3;
/// Failing item ids kept in the report.
const REPORT_IDS: usize = 10;

/// Verification thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyConfig {
    /// Minimum recall@k of HNSW against exact search.
    pub min_recall: f64,
    /// Items sampled for the recall check.
    pub recall_sample: usize,
    /// The k of recall@k.
    pub recall_k: usize,
    /// Self-retrieval misses tolerated.
    pub max_self_misses: usize,
    /// Seed of the recall sample.
    pub seed: u64,
    /// Widest `ef` the recall check may raise the generation's `ef_search` to.
    pub max_ef: usize,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig { min_recall: 0.98, recall_sample: 1000, recall_k: 10, max_self_misses: 0, seed: 0, max_ef: 512 }
    }
}

/// What verification found; written to `gen-<n>/verification.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub generation: String,
    pub passed: bool,
    /// Why it failed (`None` when it passed).
    pub reason: Option<String>,
    pub items: usize,
    /// The `ef` both checks ran at: the generation's, or wider if recall needed it.
    pub ef_search: usize,
    /// Every `(ef, recall)` measured, in order.
    pub ef_tried: Vec<(usize, f64)>,
    /// Items with at least one bitwise-identical embedding elsewhere.
    pub duplicate_items: usize,
    /// Items the self-retrieval check ran on (all of them, or a subset after an incremental build).
    #[serde(default)]
    pub self_checked: usize,
    /// `(ef, rows not finding themselves)` for each breadth the self-retrieval check ran at.
    #[serde(default)]
    pub self_ef_tried: Vec<(usize, usize)>,
    pub self_unreachable: usize,
    pub self_outranked: usize,
    /// Up to ten ids of items that failed self-retrieval.
    pub self_miss_ids: Vec<String>,
    pub recall_k: usize,
    pub recall_queries: usize,
    pub recall: f64,
    pub min_recall: f64,
}

/// For each row, how many rows (itself included) have a bitwise-identical vector.
fn identical_counts(g: &Generation) -> Vec<usize> {
    let n = g.items.len();
    let bits = |r: u32| g.exact.vector(r).iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    let mut buckets: HashMap<u64, Vec<u32>> = HashMap::new();
    for r in 0..n as u32 {
        let mut h = DefaultHasher::new();
        bits(r).hash(&mut h);
        buckets.entry(h.finish()).or_default().push(r);
    }
    let mut counts = vec![1; n];
    for rows in buckets.values().filter(|b| b.len() > 1) {
        for &r in rows {
            let mine = bits(r);
            counts[r as usize] = rows.iter().filter(|&&o| bits(o) == mine).count();
        }
    }
    counts
}

enum SelfCheck {
    Found,
    Unreachable,
    Outranked,
}

fn self_check(g: &Generation, row: u32, identical: usize, ef: usize) -> SelfCheck {
    let k = identical + SELF_SLACK;
    let hits = g.hnsw.search(g.exact.vector(row), k, ef.max(k), None);
    let Some(pos) = hits.iter().position(|h| h.row == row) else {
        return SelfCheck::Unreachable;
    };
    let own = super::exact::dot(g.exact.vector(row), g.exact.vector(row));
    let above_is_tie = hits[..pos].iter().all(|h| {
        let s = super::exact::dot(g.exact.vector(row), g.exact.vector(h.row));
        s <= own + TIE_EPS && s >= own - TIE_EPS
    });
    if above_is_tie { SelfCheck::Found } else { SelfCheck::Outranked }
}

/// Recall@k of HNSW against exact search over `queries` rows (tie-aware, see module docs).
pub fn recall_at_k(g: &Generation, queries: &[u32], k: usize, ef: usize) -> f64 {
    recall_against(g, &exact_kth(&g.exact, queries, k), queries, k, ef)
}

/// The exact k-th best score of each query row (computed once, reused at every `ef` tried).
pub(crate) fn exact_kth(exact: &ExactIndex, queries: &[u32], k: usize) -> Vec<f32> {
    let k = k.min(exact.len());
    if k == 0 {
        return Vec::new();
    }
    queries.par_iter().map(|&r| exact.search(exact.vector(r), k, 0, None)[k - 1].score).collect()
}

fn recall_against(g: &Generation, kth: &[f32], queries: &[u32], k: usize, ef: usize) -> f64 {
    let k = k.min(g.items.len());
    if k == 0 || queries.is_empty() {
        return 1.0;
    }
    let total: f64 = queries
        .par_iter()
        .zip(kth)
        .map(|(&r, &kth)| {
            let q = g.exact.vector(r);
            let approx: Vec<Hit> = g.hnsw.search(q, k, ef, None);
            let good = approx.iter().filter(|h| super::exact::dot(q, g.exact.vector(h.row)) >= kth - TIE_EPS).count();
            good as f64 / k as f64
        })
        .sum();
    total / queries.len() as f64
}

/// Runs both checks on a loaded generation. Self-retrieval is checked on `self_rows`, or on
/// every row when `None` (an incremental build passes the rows it inserted and a sample of the
/// rest, see `build`).
pub fn verify(g: &Generation, cfg: &VerifyConfig, self_rows: Option<&[u32]>) -> VerifyReport {
    let n = g.items.len();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let sample: Vec<u32> =
        rand::seq::index::sample(&mut rng, n, cfg.recall_sample.min(n)).into_iter().map(|i| i as u32).collect();
    let mut ef = g.meta.ef_search;
    let kth = exact_kth(&g.exact, &sample, cfg.recall_k);
    let mut recall = recall_against(g, &kth, &sample, cfg.recall_k, ef);
    let mut ef_tried = vec![(ef, recall)];
    while recall < cfg.min_recall && ef < cfg.max_ef {
        ef = (ef * 2).min(cfg.max_ef);
        recall = recall_against(g, &kth, &sample, cfg.recall_k, ef);
        ef_tried.push((ef, recall));
    }
    let identical = identical_counts(g);
    let all: Vec<u32>;
    let self_rows = match self_rows {
        Some(r) => r,
        None => {
            all = (0..n as u32).collect();
            &all
        }
    };
    let mut outcomes: Vec<(u32, SelfCheck)> = self_rows
        .par_iter()
        .filter(|&&r| (r as usize) < n)
        .map(|&r| (r, self_check(g, r, identical[r as usize], ef)))
        .collect();
    // Rows a beam of width `ef` misses although a path leads to them (unreachable nodes are
    // linked back or scored exactly, see `index::compact`): widen the beam, as for recall, and
    // check those rows again; the served `ef` is the one at which every checked row finds itself.
    let missed = |o: &[(u32, SelfCheck)]| o.iter().filter(|(_, c)| !matches!(c, SelfCheck::Found)).count();
    let mut self_ef_tried = vec![(ef, missed(&outcomes))];
    while missed(&outcomes) > cfg.max_self_misses && ef < cfg.max_ef {
        ef = (ef * 2).min(cfg.max_ef);
        outcomes.par_iter_mut().filter(|(_, c)| !matches!(c, SelfCheck::Found)).for_each(|(r, c)| {
            *c = self_check(g, *r, identical[*r as usize], ef);
        });
        self_ef_tried.push((ef, missed(&outcomes)));
    }
    let mut unreachable = 0;
    let mut outranked = 0;
    let mut miss_ids = Vec::new();
    for (r, o) in &outcomes {
        let r = *r as usize;
        match o {
            SelfCheck::Found => continue,
            SelfCheck::Unreachable => unreachable += 1,
            SelfCheck::Outranked => outranked += 1,
        }
        if miss_ids.len() < REPORT_IDS {
            miss_ids.push(g.items[r].item.id.clone());
        }
    }
    let mut reasons = Vec::new();
    if unreachable + outranked > cfg.max_self_misses {
        reasons.push(format!(
            "{} of {} items checked do not find themselves first at ef {ef} ({unreachable} not returned, {outranked} outranked; e.g. {:?}; misses by ef {self_ef_tried:?})",
            unreachable + outranked,
            outcomes.len(),
            miss_ids
        ));
    }
    if recall < cfg.min_recall {
        reasons.push(format!(
            "recall@{} is {recall:.4} on {} queries at ef {ef} (tried {ef_tried:?}), below the threshold {}",
            cfg.recall_k,
            sample.len(),
            cfg.min_recall
        ));
    }
    VerifyReport {
        generation: g.name(),
        passed: reasons.is_empty(),
        reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
        items: n,
        ef_search: ef,
        ef_tried,
        duplicate_items: identical.iter().filter(|&&c| c > 1).count(),
        self_checked: outcomes.len(),
        self_ef_tried,
        self_unreachable: unreachable,
        self_outranked: outranked,
        self_miss_ids: miss_ids,
        recall_k: cfg.recall_k,
        recall_queries: sample.len(),
        recall,
        min_recall: cfg.min_recall,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::hnsw::{HnswIndex, HnswParams};
    use crate::index::store::write_generation;
    use crate::index::testutil::{item, meta, random_unit_rows};
    use crate::progress::Progress;

    /// Writes a generation whose graph is built on `graph_data` but whose embeddings are `emb`.
    fn generation(graph_data: &ndarray::Array2<f32>, emb: &ndarray::Array2<f32>) -> (tempfile::TempDir, Generation) {
        generation_with(graph_data, emb, HnswParams::default(), 64)
    }

    fn generation_with(
        graph_data: &ndarray::Array2<f32>,
        emb: &ndarray::Array2<f32>,
        params: HnswParams,
        ef_search: usize,
    ) -> (tempfile::TempDir, Generation) {
        let tmp = tempfile::tempdir().unwrap();
        let items: Vec<_> = (0..emb.nrows()).map(item).collect();
        let h = HnswIndex::build(graph_data.view(), &params, &Progress::hidden()).unwrap();
        write_generation(
            tmp.path(),
            crate::index::store::GenerationMeta { ef_search, ..meta(1) },
            &items,
            emb,
            &h,
            None,
        )
        .unwrap();
        let g = Generation::load(tmp.path()).unwrap();
        (tmp, g)
    }

    #[test]
    fn a_sound_generation_with_duplicates_passes() {
        let mut data = random_unit_rows(300, 8, 11);
        for r in [10, 20, 30] {
            let first = data.row(0).to_owned();
            data.row_mut(r).assign(&first); // four identical rows: 0, 10, 20, 30
        }
        let (_t, g) = generation(&data, &data);
        let report = verify(&g, &VerifyConfig::default(), None);
        assert!(report.passed, "{report:?}");
        assert_eq!(report.duplicate_items, 4);
        assert_eq!(report.recall_queries, 300);
        assert!(report.recall >= 0.98);
    }

    #[test]
    fn items_the_graph_cannot_find_fail_the_check() {
        // A sparse graph (M 4) over uniform points searched with a beam of 4: some rows do not
        // find themselves, and the self-retrieval check counts them.
        let data = random_unit_rows(2000, 16, 13);
        let (_t, g) = generation_with(&data, &data, HnswParams { m: 4, ef_construction: 16 }, 2);
        let cfg = VerifyConfig { min_recall: 0.0, max_ef: 2, ..Default::default() };
        let report = verify(&g, &cfg, None);
        assert!(!report.passed, "{report:?}");
        assert_eq!(report.self_checked, 2000);
        assert!(report.self_unreachable + report.self_outranked > 0, "{report:?}");
        assert!(!report.self_miss_ids.is_empty());
        assert!(report.reason.unwrap().contains("do not find themselves"));
        // Allowed to widen, the check re-runs the missed rows at doubled ef until they are found.
        let wide = verify(&g, &VerifyConfig { max_ef: 2048, ..cfg.clone() }, None);
        assert!(wide.passed, "{wide:?}");
        assert!(wide.self_ef_tried.len() > 1 && wide.self_ef_tried.last().unwrap().1 == 0, "{wide:?}");
        assert_eq!(wide.ef_search, wide.self_ef_tried.last().unwrap().0);
        // Checking only some rows: only those are counted.
        let some: Vec<u32> = (0..100).collect();
        assert_eq!(verify(&g, &cfg, Some(&some)).self_checked, 100);
        // A recall threshold above 1 can never be met.
        let data = random_unit_rows(300, 8, 12);
        let (_t, g) = generation(&data, &data);
        let cfg = VerifyConfig { min_recall: 1.01, ..Default::default() };
        let report = verify(&g, &cfg, None);
        let tried: Vec<usize> = report.ef_tried.iter().map(|t| t.0).collect();
        assert_eq!(tried, vec![64, 128, 256, 512], "ef is widened up to max_ef before giving up");
        assert!(!report.passed && report.reason.unwrap().contains("recall@10"));
    }

    #[test]
    fn a_graph_and_embeddings_of_different_builds_do_not_load() {
        // The graph holds other vectors for rows 5 and 6 than the embeddings file says.
        let data = random_unit_rows(300, 8, 12);
        let mut emb = data.clone();
        let (r5, r6) = (data.row(5).to_owned(), data.row(6).to_owned());
        emb.row_mut(5).assign(&r6);
        emb.row_mut(6).assign(&r5);
        let tmp = tempfile::tempdir().unwrap();
        let items: Vec<_> = (0..300).map(item).collect();
        let h = HnswIndex::build(data.view(), &HnswParams::default(), &Progress::hidden()).unwrap();
        write_generation(tmp.path(), meta(1), &items, &emb, &h, None).unwrap();
        let err = Generation::load(tmp.path()).unwrap_err().to_string();
        assert!((err.contains("row 5") || err.contains("row 6")) && err.contains("differs from the graph"), "{err}");
    }

    #[test]
    fn a_too_narrow_ef_is_widened_until_recall_is_reached_and_written_back() {
        // Uniform 16-d points with a sparse graph: ef 10 misses neighbours, ef 640 (of 2000) does not.
        let data = random_unit_rows(2000, 16, 13);
        let (tmp, g) = generation_with(&data, &data, HnswParams { m: 4, ef_construction: 16 }, 10);
        // So sparse a graph also strands a few nodes (self-retrieval misses): not what this test is about.
        let cfg = VerifyConfig {
            min_recall: 0.995,
            recall_sample: 300,
            max_ef: 640,
            max_self_misses: usize::MAX,
            ..Default::default()
        };
        let report = verify(&g, &cfg, None);
        assert!(report.ef_tried[0].1 < 0.995, "{:?}", report.ef_tried);
        assert!(report.passed, "{report:?}");
        assert_eq!(report.ef_search, report.ef_tried.last().unwrap().0);
        assert!(report.ef_search > 10);
        drop(g);
        let via_dir = crate::index::build::verify_dir(tmp.path(), &cfg, None).unwrap();
        assert_eq!(crate::index::store::read_meta(tmp.path()).unwrap().ef_search, via_dir.ef_search);
        Generation::load(tmp.path()).unwrap();
    }
}
