//! Checks a generation loaded back from disk before it may go live: self-retrieval and recall@k against exact search.
//!
//! - **Self-retrieval.** Every item, used as a query, must come back first. A node HNSW cannot
//!   reach fails this. Exact duplicate images have bitwise-equal embeddings (embeddings are
//!   cached by image hash), so for an item with `c` identical rows the check asks for `c + 3`
//!   hits and passes when the item is among them and everything ranked above it scores the same
//!   (within [`TIE_EPS`]). Items not returned at all are *unreachable*; items returned below a
//!   strictly better row are *outranked*. Both count as misses; more than
//!   [`VerifyConfig::max_self_misses`] (default 0) fails the generation.
//! - **Recall.** On a seeded sample of items, recall@k of HNSW against the exact scan, where an
//!   approximate hit counts when its score is at least the exact k-th score (ties with the k-th
//!   neighbour are not penalised). It is measured at the generation's `ef_search`; while it is
//!   below [`VerifyConfig::min_recall`] (default 0.98) `ef` is doubled, up to
//!   [`VerifyConfig::max_ef`] (default 512). The `ef` that reached the threshold is the one the
//!   self-retrieval check uses and the one written back to `generation.json` for serving; if
//!   even `max_ef` falls short, the generation fails. (Large indexes need a wider search than
//!   small ones for the same recall: on 1M clustered synthetic vectors, recall@10 is 0.85 at
//!   ef 64 and 0.98 at ef 256 — see `bench/results/`.)

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

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
    let k = k.min(g.items.len());
    if k == 0 || queries.is_empty() {
        return 1.0;
    }
    let total: f64 = queries
        .par_iter()
        .map(|&r| {
            let q = g.exact.vector(r);
            let exact = g.exact.search(q, k, 0, None);
            let kth = exact[k - 1].score;
            let approx: Vec<Hit> = g.hnsw.search(q, k, ef, None);
            let good = approx.iter().filter(|h| super::exact::dot(q, g.exact.vector(h.row)) >= kth - TIE_EPS).count();
            good as f64 / k as f64
        })
        .sum();
    total / queries.len() as f64
}

/// Runs both checks on a loaded generation.
pub fn verify(g: &Generation, cfg: &VerifyConfig) -> VerifyReport {
    let n = g.items.len();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let sample: Vec<u32> =
        rand::seq::index::sample(&mut rng, n, cfg.recall_sample.min(n)).into_iter().map(|i| i as u32).collect();
    let mut ef = g.meta.ef_search;
    let mut recall = recall_at_k(g, &sample, cfg.recall_k, ef);
    let mut ef_tried = vec![(ef, recall)];
    while recall < cfg.min_recall && ef < cfg.max_ef {
        ef = (ef * 2).min(cfg.max_ef);
        recall = recall_at_k(g, &sample, cfg.recall_k, ef);
        ef_tried.push((ef, recall));
    }
    let identical = identical_counts(g);
    let outcomes: Vec<SelfCheck> =
        (0..n as u32).into_par_iter().map(|r| self_check(g, r, identical[r as usize], ef)).collect();
    let mut unreachable = 0;
    let mut outranked = 0;
    let mut miss_ids = Vec::new();
    for (r, o) in outcomes.iter().enumerate() {
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
            "{} of {n} items do not find themselves first ({unreachable} unreachable, {outranked} outranked; e.g. {:?})",
            unreachable + outranked,
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
        write_generation(tmp.path(), crate::index::store::GenerationMeta { ef_search, ..meta(1) }, &items, emb, &h)
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
        let report = verify(&g, &VerifyConfig::default());
        assert!(report.passed, "{report:?}");
        assert_eq!(report.duplicate_items, 4);
        assert_eq!(report.recall_queries, 300);
        assert!(report.recall >= 0.98);
    }

    #[test]
    fn items_the_graph_cannot_find_fail_the_check() {
        let data = random_unit_rows(300, 8, 12);
        // The graph holds other vectors for rows 5 and 6 than the generation's embeddings say.
        let mut emb = data.clone();
        let (r5, r6) = (data.row(5).to_owned(), data.row(6).to_owned());
        emb.row_mut(5).assign(&r6);
        emb.row_mut(6).assign(&r5);
        let (_t, g) = generation(&data, &emb);
        let report = verify(&g, &VerifyConfig::default());
        assert!(!report.passed);
        assert_eq!(report.self_unreachable + report.self_outranked, 2, "{report:?}");
        assert!(report.self_miss_ids.contains(&"item-5".to_string()));
        assert!(report.reason.unwrap().contains("do not find themselves"));
        // A recall threshold above 1 can never be met.
        let (_t, g) = generation(&data, &data);
        let cfg = VerifyConfig { min_recall: 1.01, ..Default::default() };
        let report = verify(&g, &cfg);
        let tried: Vec<usize> = report.ef_tried.iter().map(|t| t.0).collect();
        assert_eq!(tried, vec![64, 128, 256, 512], "ef is widened up to max_ef before giving up");
        assert!(!report.passed && report.reason.unwrap().contains("recall@10"));
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
        let report = verify(&g, &cfg);
        assert!(report.ef_tried[0].1 < 0.995, "{:?}", report.ef_tried);
        assert!(report.passed, "{report:?}");
        assert_eq!(report.ef_search, report.ef_tried.last().unwrap().0);
        assert!(report.ef_search > 10);
        drop(g);
        let via_dir = crate::index::build::verify_dir(tmp.path(), &cfg).unwrap();
        assert_eq!(crate::index::store::read_meta(tmp.path()).unwrap().ef_search, via_dir.ef_search);
        Generation::load(tmp.path()).unwrap();
    }
}
