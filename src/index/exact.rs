//! The exact index: a brute-force cosine scan over all (or an allowed subset of) rows — the ground truth for HNSW.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

use ndarray::Array2;

use super::{AnnIndex, Answer, Hit, RowFilter};

/// Dot product, written so the compiler vectorises it (eight independent accumulators).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A candidate in the bounded heap: the heap's top is the worst kept hit.
#[derive(PartialEq)]
struct Worst(Hit);

impl Eq for Worst {}

impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        // Hit::ranking orders best first; the max-heap then keeps the worst on top.
        Hit::ranking(&self.0, &other.0)
    }
}

/// Keeps the `k` best of a stream of hits (score desc, then row asc), returned best first.
pub fn top_k(hits: impl Iterator<Item = Hit>, k: usize) -> Vec<Hit> {
    if k == 0 {
        return Vec::new();
    }
    let mut heap = BinaryHeap::with_capacity(k + 1);
    for h in hits {
        if heap.len() < k {
            heap.push(Worst(h));
        } else if let Some(top) = heap.peek()
            && Hit::ranking(&h, &top.0) == Ordering::Less
        {
            heap.pop();
            heap.push(Worst(h));
        }
    }
    let mut out: Vec<Hit> = heap.into_iter().map(|w| w.0).collect();
    out.sort_by(Hit::ranking);
    out
}

/// Exact cosine search over shared unit-norm rows.
#[derive(Debug, Clone)]
pub struct ExactIndex {
    data: Arc<Array2<f32>>,
}

impl ExactIndex {
    /// Wraps the embeddings (rows must be standard layout).
    pub fn new(data: Arc<Array2<f32>>) -> Self {
        assert!(data.is_standard_layout(), "embeddings must be row-major");
        ExactIndex { data }
    }

    /// The vector of `row`.
    pub fn vector(&self, row: u32) -> &[f32] {
        self.data.row(row as usize).to_slice().expect("standard layout")
    }

    /// The embeddings.
    pub fn data(&self) -> &Arc<Array2<f32>> {
        &self.data
    }

    /// Scores every row in `rows` (all rows when `None`).
    pub fn scores<'a>(&'a self, query: &'a [f32], rows: Option<&'a [u32]>) -> Box<dyn Iterator<Item = Hit> + 'a> {
        let score = move |row: u32| Hit { row, score: dot(query, self.vector(row)) };
        match rows {
            Some(rows) => Box::new(rows.iter().map(move |&r| score(r))),
            None => Box::new((0..self.data.nrows() as u32).map(score)),
        }
    }

    /// Top `k` over an explicit set of rows.
    pub fn search_rows(&self, query: &[f32], k: usize, rows: &[u32]) -> Vec<Hit> {
        top_k(self.scores(query, Some(rows)), k)
    }
}

impl AnnIndex for ExactIndex {
    fn len(&self) -> usize {
        self.data.nrows()
    }

    fn dim(&self) -> usize {
        self.data.ncols()
    }

    fn answer(&self) -> Answer {
        Answer::Exact
    }

    fn search(&self, query: &[f32], k: usize, _ef: usize, filter: Option<RowFilter<'_>>) -> Vec<Hit> {
        match filter {
            None => top_k(self.scores(query, None), k),
            Some(f) => top_k(self.scores(query, None).filter(|h| f(h.row)), k),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::testutil::random_unit_rows;

    #[test]
    fn dot_matches_f64() {
        for n in [0, 1, 7, 8, 9, 33] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5, "n={n}");
        }
    }

    #[test]
    fn exact_search_is_a_full_sort() {
        let data = Arc::new(random_unit_rows(300, 12, 1));
        let idx = ExactIndex::new(data.clone());
        let q = data.row(5).to_vec();
        let got = idx.search(&q, 20, 0, None);
        let mut all: Vec<(u32, f64)> = (0..300)
            .map(|r| (r as u32, data.row(r).iter().zip(&q).map(|(x, y)| *x as f64 * *y as f64).sum()))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        assert_eq!(got.iter().map(|h| h.row).collect::<Vec<_>>(), all[..20].iter().map(|p| p.0).collect::<Vec<_>>());
        let odd = |r: u32| r % 2 == 1;
        let f = idx.search(&q, 5, 0, Some(&odd));
        let want: Vec<u32> = all.iter().filter(|p| p.0 % 2 == 1).take(5).map(|p| p.0).collect();
        assert_eq!(f.iter().map(|h| h.row).collect::<Vec<_>>(), want);
        let rows = [1u32, 100, 200, 5];
        assert_eq!(idx.search_rows(&q, 2, &rows)[0].row, 5);
        assert!(idx.search(&q, 0, 0, None).is_empty());
    }

    #[test]
    fn top_k_breaks_ties_by_row() {
        let hits = [(4, 0.5), (2, 0.5), (9, 0.9), (1, 0.1)].map(|(row, score)| Hit { row, score });
        let got: Vec<u32> = top_k(hits.into_iter(), 3).iter().map(|h| h.row).collect();
        assert_eq!(got, vec![9, 2, 4]);
    }
}
