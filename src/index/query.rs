//! Query planning over one generation: exact or HNSW, filters, grouping — and which one answered.
//!
//! # Exact or approximate
//!
//! A filter first becomes its allowed rows ([`Labels::allowed`](super::filter::Labels::allowed)).
//! The query is answered by an **exact scan of just those rows** when either
//! - they are fewer than [`QueryConfig::exact_below_fraction`] of the generation (default
//!   **10%**: a *selective* filter), or
//! - there are at most [`QueryConfig::exact_below_rows`] of them (default **20 000**, filtered or
//!   not: scanning that many 128-d rows costs about as much as one HNSW search, so small indexes
//!   are always answered exactly). A scan costs in proportion to the dimension, so for wider
//!   embeddings the limit shrinks by `128 / dim` ([`QueryConfig::exact_rows_for`]: 2 000 rows of a
//!   1280-d backbone feature, whose full scan of the 7.5k emoji took ~1.5 ms of a 4.4 ms query);
//!
//! otherwise by HNSW: one *unfiltered* search for `2k / f` rows (`f` the allowed fraction),
//! filtered afterwards ([`approx_candidates`]); an answer that comes back short is replaced by
//! the exact one.
//!
//! Why these numbers (`benches/index.rs` on clustered 128-d vectors, one thread, a shared 2-core
//! machine; `bench/results/index-20000.json`, `index-1000000.json`):
//!
//! | rows | exact, all rows | exact, 10% of rows | HNSW ef 64 (recall@10) | HNSW ef 256 |
//! |---|---|---|---|---|
//! | 20 000 | 0.23 ms | 0.30 ms | 0.53 ms (1.00) | 1.8 ms |
//! | 1 000 000 | 20 ms | 16 ms | 0.72 ms (0.85) | 1.6 ms (0.98) |
//!
//! A contiguous scan runs at memory bandwidth (~0.02 µs a row); a scan of scattered allowed rows
//! is latency-bound (~0.16 µs a row). Up to a few tens of thousands of rows a scan beats HNSW
//! outright, hence `exact_below_rows`. `hnsw_rs`'s own filtered search (`search_filter`) does not
//! stop early once a filter is given and explores most of the graph — 43–65 ms at 20 000 rows,
//! 134 ms (10% allowed) to 900 ms (1%) at 1M — so we never use it. Post-filtering an unfiltered
//! search needs `2k / f` candidates: at 1M it takes 1.8 ms at `f` = 10% (and keeps the recall of
//! its `ef`), 2.5 ms at 5%, 10 ms at 1% with short answers starting to appear, while the exact
//! scan of the allowed rows costs 16 ms, 9 ms and 2 ms. Below 10% we take the scan: it is exact,
//! it never comes back short, and its worst case at 1M (16 ms) is bounded; at 10% and above the
//! post-filtered HNSW search is 5–50× cheaper than the scan.
//!
//! # Grouping
//!
//! `group_by` keeps the best hit of each group (product, or leaf category). HNSW is asked for
//! `k × group_oversample` allowed rows, then 4× more, up to three times, until `k` groups are
//! found; otherwise the exact scan groups every allowed row.

use std::collections::HashMap;

use super::exact::top_k;
use super::filter::{Allowed, Filter, GroupBy};
use super::store::Generation;
use super::{AnnIndex, Answer, Hit, RowFilter};
use crate::{Error, Result};

/// Query planning knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueryConfig {
    /// Filters allowing fewer than this fraction of rows are answered exactly (see module docs).
    pub exact_below_fraction: f64,
    /// Queries allowing at most this many rows of 128 dimensions are answered exactly; scaled
    /// down for wider embeddings ([`QueryConfig::exact_rows_for`], module docs).
    pub exact_below_rows: usize,
    /// First HNSW over-fetch factor for grouped queries.
    pub group_oversample: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig { exact_below_fraction: 0.1, exact_below_rows: 20_000, group_oversample: 4 }
    }
}

impl QueryConfig {
    /// The rows answered exactly at `dim` dimensions: `exact_below_rows` up to 128 dimensions,
    /// `exact_below_rows * 128 / dim` above (the same scanning cost); `usize::MAX` stays "always".
    pub fn exact_rows_for(&self, dim: usize) -> usize {
        if dim <= 128 || self.exact_below_rows == usize::MAX {
            self.exact_below_rows
        } else {
            self.exact_below_rows.saturating_mul(128) / dim
        }
    }
}

/// Ranked rows and the path that produced them.
#[derive(Debug, Clone, PartialEq)]
pub struct RowResults {
    pub hits: Vec<Hit>,
    pub answer: Answer,
    /// Rows the filter allowed.
    pub allowed: usize,
}

/// Keeps the best hit per group (hits must be best first), at most `k` groups.
fn best_per_group(hits: &[Hit], k: usize, group: impl Fn(u32) -> u32) -> Vec<Hit> {
    let mut seen = std::collections::HashSet::new();
    hits.iter().filter(|h| seen.insert(group(h.row))).take(k).copied().collect()
}

/// Over-fetch factor of post-filtered HNSW searches (on top of `1 / fraction`).
pub const POST_FILTER_SLACK: f64 = 2.0;

/// Up to `want` rows `allow` accepts, best first, from one *unfiltered* HNSW search for
/// `want × POST_FILTER_SLACK / fraction` rows (capped at the index size), filtered afterwards.
/// `fraction` is the share of rows `allow` accepts. May return fewer than `want`; the caller
/// then answers exactly. (`hnsw_rs`'s own filtered search does not stop early when a filter is
/// given and explores most of the graph: see the module docs.)
pub fn approx_candidates(
    index: &dyn AnnIndex,
    q: &[f32],
    want: usize,
    ef: usize,
    fraction: f64,
    allow: Option<RowFilter<'_>>,
) -> Vec<Hit> {
    match allow {
        None => index.search(q, want, ef, None),
        Some(allow) => {
            let fetch = ((want as f64 * POST_FILTER_SLACK / fraction.max(1e-9)).ceil() as usize).min(index.len());
            let mut hits = index.search(q, fetch, ef.max(fetch), None);
            hits.retain(|h| allow(h.row));
            hits.truncate(want);
            hits
        }
    }
}

/// A unit-norm copy of `q`, checked against `dim`.
pub fn normalized_query(q: &[f32], dim: usize) -> Result<Vec<f32>> {
    if q.len() != dim {
        return Err(Error::WrongVectorDimension { expected: dim, received: q.len() });
    }
    let norm = q.iter().map(|v| v * v).sum::<f32>().sqrt();
    if !norm.is_finite() || norm == 0.0 {
        return Err(Error::InvalidArgument { name: "embedding", reason: "zero or non-finite vector".into() });
    }
    Ok(q.iter().map(|v| v / norm).collect())
}

impl Generation {
    /// The `k` rows most similar to `query` (any norm; normalised here) among those `filter`
    /// allows, one per group if `group_by` is set, best first.
    pub fn query(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: &Filter,
        group_by: Option<GroupBy>,
        cfg: &QueryConfig,
    ) -> Result<RowResults> {
        let q = normalized_query(query, self.meta.dim)?;
        let n = self.items.len();
        let allowed = self.labels.allowed(filter);
        let rows: Option<&[u32]> = match &allowed {
            Allowed::All => None,
            Allowed::Rows(r) => Some(r),
        };
        let available = rows.map_or(n, <[u32]>::len);
        if k == 0 || available == 0 {
            return Ok(RowResults { hits: Vec::new(), answer: Answer::Exact, allowed: available });
        }
        let fraction = available as f64 / n as f64;
        if (rows.is_some() && fraction < cfg.exact_below_fraction) || available <= cfg.exact_rows_for(self.meta.dim) {
            return Ok(self.exact(&q, k, rows, group_by));
        }
        let pred = |row: u32| rows.is_none_or(|r| r.binary_search(&row).is_ok());
        let allow: Option<RowFilter<'_>> = if rows.is_some() { Some(&pred) } else { None };
        let approx = |hits| RowResults { hits, answer: Answer::Approx, allowed: available };
        match group_by {
            None => {
                let hits = self.rescored(&q, approx_candidates(&self.hnsw, &q, k, ef, fraction, allow));
                if hits.len() >= k.min(available) {
                    return Ok(approx(hits));
                }
            }
            Some(by) => {
                let mut want = (k * cfg.group_oversample.max(1)).min(available);
                for _ in 0..3 {
                    let hits = self.rescored(&q, approx_candidates(&self.hnsw, &q, want, ef, fraction, allow));
                    let grouped = best_per_group(&hits, k, |r| self.labels.group_of(r, by));
                    if grouped.len() >= k {
                        return Ok(approx(grouped));
                    }
                    if want >= available {
                        break;
                    }
                    want = (want * 4).min(available);
                }
            }
        }
        tracing::debug!(k, available, "HNSW came back short; answering exactly");
        Ok(self.exact(&q, k, rows, group_by))
    }

    /// HNSW hits with their scores recomputed exactly as the scan computes them, so both paths
    /// report identical scores for the same row.
    fn rescored(&self, q: &[f32], mut hits: Vec<Hit>) -> Vec<Hit> {
        for h in &mut hits {
            h.score = super::exact::dot(q, self.exact.vector(h.row));
        }
        hits.sort_by(Hit::ranking);
        hits
    }

    fn exact(&self, q: &[f32], k: usize, rows: Option<&[u32]>, group_by: Option<GroupBy>) -> RowResults {
        let allowed = rows.map_or(self.items.len(), <[u32]>::len);
        let scores = self.exact.scores(q, rows);
        let hits = match group_by {
            None => top_k(scores, k),
            Some(by) => {
                let mut best: HashMap<u32, Hit> = HashMap::new();
                for h in scores {
                    let e = best.entry(self.labels.group_of(h.row, by)).or_insert(h);
                    if Hit::ranking(&h, e).is_lt() {
                        *e = h;
                    }
                }
                top_k(best.into_values(), k)
            }
        };
        RowResults { hits, answer: Answer::Exact, allowed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_per_group_keeps_first_of_each() {
        let hits: Vec<Hit> = [(0, 0.9), (1, 0.8), (2, 0.7), (3, 0.6)].map(|(row, score)| Hit { row, score }).to_vec();
        let g = best_per_group(&hits, 5, |r| r / 2);
        assert_eq!(g.iter().map(|h| h.row).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(best_per_group(&hits, 1, |r| r).len(), 1);
    }

    #[test]
    fn query_normalisation_checks_dimension_and_zero() {
        assert!(matches!(
            normalized_query(&[1.0, 2.0], 3),
            Err(Error::WrongVectorDimension { expected: 3, received: 2 })
        ));
        assert!(normalized_query(&[0.0, 0.0], 2).is_err());
        assert!(normalized_query(&[f32::NAN, 0.0], 2).is_err());
        let q = normalized_query(&[3.0, 4.0], 2).unwrap();
        assert!((q[0] - 0.6).abs() < 1e-6 && (q[1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn the_exact_row_limit_scales_with_the_dimension_above_128() {
        let cfg = QueryConfig::default();
        assert_eq!(cfg.exact_rows_for(16), 20_000);
        assert_eq!(cfg.exact_rows_for(128), 20_000);
        assert_eq!(cfg.exact_rows_for(256), 10_000);
        assert_eq!(cfg.exact_rows_for(1280), 2_000);
        let always = QueryConfig { exact_below_rows: usize::MAX, ..cfg };
        assert_eq!(always.exact_rows_for(1280), usize::MAX);
    }
}
