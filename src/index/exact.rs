//! The exact index: a brute-force cosine scan over all (or an allowed subset of) rows — the ground truth for HNSW.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

use ndarray::Array2;

use super::{AnnIndex, Answer, Hit, RowFilter};

/// Dot product, written so the compiler vectorises it (sixteen independent accumulators). On
/// x86-64 CPUs with AVX2 the same code runs compiled for 256-bit registers (detected at run time;
/// the binary still runs on any x86-64). The summation order is the code's on every path, so
/// the result is bitwise the same whichever path runs.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: `dot_avx2` only requires AVX2, which the CPU has (checked just above).
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut half = [0.0f32; 8];
    for i in 0..8 {
        half[i] = acc[i] + acc[i + 8];
    }
    half.iter().sum::<f32>() + tail
}

/// A hit ordered for heaps: a `BinaryHeap<Worst>` keeps the worst kept hit on top, a
/// `BinaryHeap<Reverse<Worst>>` the best (both by [`Hit::ranking`]).
#[derive(PartialEq)]
pub(crate) struct Worst(pub(crate) Hit);

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
///
/// A served generation shares its vectors with the graph ([`ExactIndex::shared`]): they are held
/// once, in the graph's node order, and `node_of` says where each row's vector is.
#[derive(Debug, Clone)]
pub struct ExactIndex {
    data: Arc<Array2<f32>>,
    node_of: Option<Arc<[u32]>>,
}

impl ExactIndex {
    /// Wraps the embeddings, one row each (rows must be standard layout).
    pub fn new(data: Arc<Array2<f32>>) -> Self {
        Self::shared(data, None)
    }

    /// Rows whose vectors are `data.row(node_of[row])` (`data.row(row)` when `None`).
    pub fn shared(data: Arc<Array2<f32>>, node_of: Option<Arc<[u32]>>) -> Self {
        assert!(data.is_standard_layout(), "embeddings must be row-major");
        if let Some(m) = &node_of {
            assert!(m.iter().all(|&n| (n as usize) < data.nrows()), "every row's node holds a vector");
        }
        ExactIndex { data, node_of }
    }

    /// The vector of `row`.
    pub fn vector(&self, row: u32) -> &[f32] {
        let at = self.node_of.as_ref().map_or(row as usize, |m| m[row as usize] as usize);
        self.data.row(at).to_slice().expect("standard layout")
    }

    /// The rows' vectors as one matrix, in row order (a copy).
    pub fn to_matrix(&self) -> Array2<f32> {
        let mut out = Array2::zeros((self.len(), self.dim()));
        for (r, mut row) in out.rows_mut().into_iter().enumerate() {
            row.assign(&ndarray::ArrayView1::from(self.vector(r as u32)));
        }
        out
    }

    /// Scores every row in `rows` (all rows when `None`).
    pub fn scores<'a>(&'a self, query: &'a [f32], rows: Option<&'a [u32]>) -> Box<dyn Iterator<Item = Hit> + 'a> {
        let score = move |row: u32| Hit { row, score: dot(query, self.vector(row)) };
        match rows {
            Some(rows) => Box::new(rows.iter().map(move |&r| score(r))),
            None => Box::new((0..self.len() as u32).map(score)),
        }
    }

    /// Top `k` over an explicit set of rows.
    pub fn search_rows(&self, query: &[f32], k: usize, rows: &[u32]) -> Vec<Hit> {
        top_k(self.scores(query, Some(rows)), k)
    }
}

impl AnnIndex for ExactIndex {
    fn len(&self) -> usize {
        self.node_of.as_ref().map_or(self.data.nrows(), |m| m.len())
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
        for n in [0, 1, 7, 8, 9, 16, 33, 128, 131] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5, "n={n}");
            // Whichever path runs (AVX2 or not), the result is bitwise the portable one.
            assert_eq!(dot(&a, &b).to_bits(), dot_lanes(&a, &b).to_bits(), "n={n}");
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
