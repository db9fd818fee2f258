//! Retrieval metrics on ranked galleries: the query/gallery protocol, top-K accuracy, average precision and kNN classification.
//!
//! Everything here works on *eval rows* (positions in the evaluated item list) and one label
//! column at a time (a [`crate::catalogue::Labels`] column: dense ids, equal id = same class at
//! that level). A ranking is a query's gallery hits, best first (score desc, then row asc:
//! [`Hit::ranking`]), with the query's own row already left out.

use std::collections::HashMap;

use ndarray::ArrayView1;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::catalogue::{Item, Role};
use crate::index::Hit;
use crate::{Error, Result};

/// How queries and gallery are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProtocolKind {
    /// Items with role `query` rank the items with role `gallery` (In-shop protocol).
    QueryGallery,
    /// No roles: every item is a query ranking all the others.
    LeaveOneOut,
}

impl ProtocolKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolKind::QueryGallery => "query/gallery",
            ProtocolKind::LeaveOneOut => "leave-one-out",
        }
    }
}

/// Queries and gallery over eval rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Protocol {
    pub kind: ProtocolKind,
    /// Query rows, ascending.
    pub queries: Vec<u32>,
    /// Gallery rows, ascending. Under leave-one-out, every row (each query skips itself).
    pub gallery: Vec<u32>,
}

impl Protocol {
    /// Query/gallery by role when the items have at least one of each; otherwise leave-one-out
    /// over all items (items with only one of the two roles, or none, are all treated alike).
    pub fn from_items(items: &[Item]) -> Result<Protocol> {
        let rows = |role| (0..items.len() as u32).filter(|&r| items[r as usize].role == Some(role)).collect::<Vec<_>>();
        let (queries, gallery) = (rows(Role::Query), rows(Role::Gallery));
        let p = if !queries.is_empty() && !gallery.is_empty() {
            Protocol { kind: ProtocolKind::QueryGallery, queries, gallery }
        } else {
            let all: Vec<u32> = (0..items.len() as u32).collect();
            Protocol { kind: ProtocolKind::LeaveOneOut, queries: all.clone(), gallery: all }
        };
        if p.queries.is_empty() || (p.kind == ProtocolKind::LeaveOneOut && p.gallery.len() < 2) {
            return Err(Error::EvalInput { reason: format!("{} items: too few to evaluate retrieval", items.len()) });
        }
        Ok(p)
    }

    /// Keeps a seeded random sample of at most `max` queries (ascending); the gallery is unchanged.
    pub fn sample_queries(&mut self, max: usize, seed: u64) {
        if self.queries.len() <= max {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut picked: Vec<u32> =
            rand::seq::index::sample(&mut rng, self.queries.len(), max).into_iter().map(|i| self.queries[i]).collect();
        picked.sort_unstable();
        self.queries = picked;
    }
}

/// Per query: whether some gallery item other than the query itself has the query's label.
/// Queries without one cannot be answered at this level and are left out of its metrics.
pub fn answerable(labels: ArrayView1<i64>, p: &Protocol) -> Vec<bool> {
    let mut count: HashMap<i64, usize> = HashMap::new();
    for &g in &p.gallery {
        *count.entry(labels[g as usize]).or_default() += 1;
    }
    let in_gallery = |q: u32| p.gallery.binary_search(&q).is_ok();
    p.queries
        .iter()
        .map(|&q| count.get(&labels[q as usize]).copied().unwrap_or(0) > usize::from(in_gallery(q)))
        .collect()
}

/// Mean of `f` over the queries `mask` keeps; `None` when it keeps none.
fn mean_over(mask: &[bool], f: impl Fn(usize) -> f64) -> Option<f64> {
    let kept: Vec<usize> = (0..mask.len()).filter(|&i| mask[i]).collect();
    (!kept.is_empty()).then(|| kept.iter().map(|&i| f(i)).sum::<f64>() / kept.len() as f64)
}

/// Top-K accuracy for each K in `ks`: the share of answerable queries with at least one of
/// their first K hits sharing their label. `rankings[i]` belongs to `queries[i]` and must hold
/// at least `max(ks)` hits where the gallery has that many.
pub fn top_k_accuracy(
    labels: ArrayView1<i64>,
    queries: &[u32],
    rankings: &[Vec<Hit>],
    answerable: &[bool],
    ks: &[usize],
) -> Vec<Option<f64>> {
    // First rank (1-based) holding a match, per query.
    let first: Vec<Option<usize>> = queries
        .iter()
        .zip(rankings)
        .map(|(&q, hits)| hits.iter().position(|h| labels[h.row as usize] == labels[q as usize]).map(|p| p + 1))
        .collect();
    ks.iter().map(|&k| mean_over(answerable, |i| f64::from(first[i].is_some_and(|r| r <= k)))).collect()
}

/// Average precision of one query over its complete ranking: the mean, over the relevant hits
/// (same label), of the precision at each one's rank. `None` when nothing is relevant.
pub fn average_precision(labels: ArrayView1<i64>, query: u32, full_ranking: &[Hit]) -> Option<f64> {
    let want = labels[query as usize];
    let (mut found, mut sum) = (0usize, 0.0f64);
    for (i, h) in full_ranking.iter().enumerate() {
        if labels[h.row as usize] == want {
            found += 1;
            sum += found as f64 / (i + 1) as f64;
        }
    }
    (found > 0).then(|| sum / found as f64)
}

/// The k-nearest-neighbour prediction from the first `k` hits: majority vote; a tie between
/// labels goes to the one with the larger summed similarity, then to the one whose best voter
/// ranks first. `None` without hits.
pub fn knn_predict(labels: ArrayView1<i64>, hits: &[Hit], k: usize) -> Option<i64> {
    // label -> (votes, summed similarity, rank of its first voter)
    let mut tally: HashMap<i64, (usize, f64, usize)> = HashMap::new();
    for (rank, h) in hits.iter().take(k).enumerate() {
        let e = tally.entry(labels[h.row as usize]).or_insert((0, 0.0, rank));
        e.0 += 1;
        e.1 += h.score as f64;
    }
    tally
        .into_iter()
        .max_by(|a, b| a.1.0.cmp(&b.1.0).then(a.1.1.total_cmp(&b.1.1)).then(b.1.2.cmp(&a.1.2)))
        .map(|(label, _)| label)
}

/// kNN classification accuracy over the answerable queries (see [`knn_predict`]).
pub fn knn_accuracy(
    labels: ArrayView1<i64>,
    queries: &[u32],
    rankings: &[Vec<Hit>],
    answerable: &[bool],
    k: usize,
) -> Option<f64> {
    mean_over(answerable, |i| f64::from(knn_predict(labels, &rankings[i], k) == Some(labels[queries[i] as usize])))
}

/// Recall@k of `served` against `exact` (both best first over the same allowed rows), tie-aware:
/// a served hit counts when its score reaches the k-th exact score (within `1e-6`).
pub fn recall_against_exact(served: &[Hit], exact: &[Hit], k: usize) -> f64 {
    let k = k.min(exact.len());
    if k == 0 {
        return 1.0;
    }
    let kth = exact[k - 1].score;
    served.iter().take(k).filter(|h| h.score >= kth - 1e-6).count() as f64 / k as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Labels;

    fn hit(row: u32, score: f32) -> Hit {
        Hit { row, score }
    }

    fn item(id: &str, category: &str, product: &str, role: Option<Role>) -> Item {
        Item { role, ..Item::new(id, category, product, "v") }
    }

    #[test]
    fn protocol_uses_roles_or_leaves_one_out() {
        let q = Some(Role::Query);
        let g = Some(Role::Gallery);
        let items =
            vec![item("a", "x", "p", q), item("b", "x", "p", g), item("c", "x", "r", None), item("d", "y", "s", g)];
        let p = Protocol::from_items(&items).unwrap();
        assert_eq!((p.kind, p.queries, p.gallery), (ProtocolKind::QueryGallery, vec![0], vec![1, 3]));
        let items = vec![item("a", "x", "p", q), item("b", "x", "p", q), item("c", "x", "r", None)];
        let p = Protocol::from_items(&items).unwrap();
        assert_eq!((p.kind, p.queries.len(), p.gallery.len()), (ProtocolKind::LeaveOneOut, 3, 3));
        assert!(Protocol::from_items(&items[..1]).is_err());
        let mut p =
            Protocol { kind: ProtocolKind::LeaveOneOut, queries: (0..100).collect(), gallery: (0..100).collect() };
        p.sample_queries(10, 4);
        assert_eq!(p.queries.len(), 10);
        assert!(p.queries.windows(2).all(|w| w[0] < w[1]));
        let again = {
            let mut p2 = Protocol { kind: ProtocolKind::LeaveOneOut, queries: (0..100).collect(), gallery: vec![] };
            p2.sample_queries(10, 4);
            p2.queries
        };
        assert_eq!(p.queries, again);
    }

    /// Labels: rows 0..6 with classes [A, A, B, B, C, A]; row 4's class C has only itself.
    fn column() -> Vec<i64> {
        vec![0, 0, 1, 1, 2, 0]
    }

    #[test]
    fn top_k_and_answerable_on_a_tiny_gallery() {
        let labels = ndarray::Array1::from(column());
        // Leave-one-out over all six rows; rankings chosen by hand.
        let p = Protocol { kind: ProtocolKind::LeaveOneOut, queries: (0..6).collect(), gallery: (0..6).collect() };
        let ans = answerable(labels.view(), &p);
        assert_eq!(ans, [true, true, true, true, false, true]);
        let rankings = vec![
            vec![hit(2, 0.9), hit(1, 0.8), hit(5, 0.1), hit(3, 0.0), hit(4, -0.1)], // 0: first match at rank 2
            vec![hit(0, 0.9), hit(2, 0.5), hit(3, 0.4), hit(4, 0.3), hit(5, 0.2)],  // 1: rank 1
            vec![hit(0, 0.9), hit(1, 0.8), hit(4, 0.7), hit(5, 0.6), hit(3, 0.5)],  // 2: rank 5
            vec![hit(2, 0.9), hit(0, 0.8), hit(1, 0.7), hit(4, 0.6), hit(5, 0.5)],  // 3: rank 1
            vec![hit(0, 0.9), hit(1, 0.8), hit(2, 0.7), hit(3, 0.6), hit(5, 0.5)],  // 4: unanswerable
            vec![hit(4, 0.9), hit(2, 0.8), hit(3, 0.7), hit(0, 0.6), hit(1, 0.5)],  // 5: rank 4
        ];
        let acc = top_k_accuracy(labels.view(), &p.queries, &rankings, &ans, &[1, 2, 4, 5]);
        // First-match ranks of the five answerable queries: 2, 1, 5, 1, 4.
        assert_eq!(acc, vec![Some(2.0 / 5.0), Some(3.0 / 5.0), Some(4.0 / 5.0), Some(1.0)]);
        // Query/gallery: query row 4 (class C) against a gallery without C.
        let p = Protocol { kind: ProtocolKind::QueryGallery, queries: vec![4, 5], gallery: vec![0, 2] };
        assert_eq!(answerable(labels.view(), &p), [false, true]);
        let none = top_k_accuracy(labels.view(), &[4], &[vec![hit(0, 1.0)]], &[false], &[1]);
        assert_eq!(none, vec![None]);
    }

    #[test]
    fn average_precision_by_hand() {
        let labels = ndarray::Array1::from(column());
        // Query 0 (A); relevant: rows 1 and 5 at ranks 2 and 4 -> (1/2 + 2/4) / 2 = 0.5.
        let r = [hit(2, 0.9), hit(1, 0.8), hit(3, 0.1), hit(5, 0.0), hit(4, -0.1)];
        assert!((average_precision(labels.view(), 0, &r).unwrap() - 0.5).abs() < 1e-12);
        // All relevant first: 1.
        let r = [hit(1, 0.9), hit(5, 0.8), hit(3, 0.1)];
        assert_eq!(average_precision(labels.view(), 0, &r), Some(1.0));
        // Query 2 (B): relevant row 3 at rank 3 -> 1/3.
        let r = [hit(0, 0.9), hit(1, 0.8), hit(3, 0.7), hit(4, 0.6)];
        assert!((average_precision(labels.view(), 2, &r).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        // Query 4 (C) has no relevant item among the others.
        assert_eq!(average_precision(labels.view(), 4, &r[..3]), None);
    }

    #[test]
    fn knn_votes_by_majority_then_similarity_then_rank() {
        let labels = ndarray::Array1::from(column());
        // Two A (rows 0, 1) against one B: A.
        assert_eq!(knn_predict(labels.view(), &[hit(2, 0.9), hit(0, 0.5), hit(1, 0.4)], 3), Some(0));
        // k = 1: the nearest decides.
        assert_eq!(knn_predict(labels.view(), &[hit(2, 0.9), hit(0, 0.5), hit(1, 0.4)], 1), Some(1));
        // 1 vs 1: larger summed similarity wins, whatever the order.
        assert_eq!(knn_predict(labels.view(), &[hit(2, 0.3), hit(0, 0.2), hit(4, 0.9)], 2), Some(1));
        // 2 vs 2: A's later voters sum to 0.7 against B's 0.6.
        assert_eq!(knn_predict(labels.view(), &[hit(2, 0.3), hit(3, 0.3), hit(0, 0.5), hit(5, 0.2)], 4), Some(0));
        // Full tie on votes and similarity: the better-ranked voter's label.
        assert_eq!(knn_predict(labels.view(), &[hit(3, 0.5), hit(0, 0.5)], 2), Some(1));
        assert_eq!(knn_predict(labels.view(), &[], 10), None);
        // Accuracy over answerable queries: query 0 (A) right, query 2 (B) wrong, query 4 skipped.
        let rankings =
            vec![vec![hit(1, 0.9), hit(5, 0.8), hit(2, 0.7)], vec![hit(0, 0.9), hit(1, 0.8), hit(3, 0.7)], vec![]];
        let acc = knn_accuracy(labels.view(), &[0, 2, 4], &rankings, &[true, true, false], 3);
        assert_eq!(acc, Some(0.5));
    }

    #[test]
    fn recall_against_exact_counts_ties() {
        let exact = [hit(1, 0.9), hit(2, 0.8), hit(3, 0.7)];
        assert_eq!(recall_against_exact(&exact, &exact, 3), 1.0);
        // Row 9 ties with the 3rd exact hit: counts.
        assert_eq!(recall_against_exact(&[hit(1, 0.9), hit(2, 0.8), hit(9, 0.7)], &exact, 3), 1.0);
        assert!((recall_against_exact(&[hit(1, 0.9), hit(8, 0.5), hit(9, 0.4)], &exact, 3) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(recall_against_exact(&[], &[], 10), 1.0);
        // Labels from the catalogue encoder work as columns.
        let items = [Item::new("a", "x", "p", "v"), Item::new("b", "x", "q", "v")];
        let l = Labels::encode(&items);
        assert_eq!(l.rows.column(0).to_vec(), [0, 0]);
    }
}
