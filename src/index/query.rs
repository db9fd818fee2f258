//! Query planning over one generation: exact or HNSW, filters, grouping — and which one answered.
//!
//! # Exact or approximate
//!
//! A filter first becomes its allowed rows ([`Labels::allowed`](super::filter::Labels::allowed)).
//! When they are fewer than [`QueryConfig::exact_below_fraction`] of the generation (default
//! **10%**), the query is answered by an exact scan of just those rows; otherwise by HNSW with
//! the filter. Why 10%: `hnsw_rs`'s filtered search walks the same graph but keeps only allowed
//! rows as results, so with a fraction `f` allowed it must visit about `1/f` times as many nodes
//! to collect its candidates, and when the allowed rows are scattered the beam can stall before it
//! finds `k` of them (recall falls). At `f` < 10% an exact scan touches fewer than a tenth of the
//! rows — for 1M × 128 that is at most 100k dot products, a few milliseconds on one core — and
//! is exact; above it the filtered HNSW search does at most ~10× its unfiltered work and keeps
//! its recall (we widen `ef` by `1/f`, capped at 8×). `benches/index.rs` measures both sides. An
//! HNSW answer with fewer hits than it should have is replaced by the exact one.
//!
//! # Grouping
//!
//! `group_by` keeps the best hit of each group (product, or leaf category). HNSW is asked for
//! `k × group_oversample` rows, then 4× more, up to three times, until `k` groups are found;
//! otherwise the exact scan groups every allowed row.

use std::collections::HashMap;

use super::exact::top_k;
use super::filter::{Allowed, Filter, GroupBy};
use super::store::Generation;
use super::{AnnIndex, Answer, Hit};
use crate::{Error, Result};

/// Query planning knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueryConfig {
    /// Filters allowing fewer than this fraction of rows are answered exactly (see module docs).
    pub exact_below_fraction: f64,
    /// First HNSW over-fetch factor for grouped queries.
    pub group_oversample: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig { exact_below_fraction: 0.1, group_oversample: 4 }
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
        if rows.is_some() && fraction < cfg.exact_below_fraction {
            return Ok(self.exact(&q, k, rows, group_by));
        }
        let ef = if rows.is_some() { ((ef as f64 / fraction).ceil() as usize).min(8 * ef) } else { ef };
        let pred = |row: u32| rows.is_none_or(|r| r.binary_search(&row).is_ok());
        let filter_fn: Option<&dyn Fn(u32) -> bool> = if rows.is_some() { Some(&pred) } else { None };
        let approx = |hits| RowResults { hits, answer: Answer::Approx, allowed: available };
        match group_by {
            None => {
                let hits = self.rescored(&q, self.hnsw.search(&q, k, ef, filter_fn));
                if hits.len() >= k.min(available) {
                    return Ok(approx(hits));
                }
            }
            Some(by) => {
                let mut want = (k * cfg.group_oversample.max(1)).min(available);
                for _ in 0..3 {
                    let hits = self.rescored(&q, self.hnsw.search(&q, want, ef.max(want), filter_fn));
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
        assert!(matches!(normalized_query(&[1.0, 2.0], 3), Err(Error::WrongVectorDimension { expected: 3, received: 2 })));
        assert!(normalized_query(&[0.0, 0.0], 2).is_err());
        assert!(normalized_query(&[f32::NAN, 0.0], 2).is_err());
        let q = normalized_query(&[3.0, 4.0], 2).unwrap();
        assert!((q[0] - 0.6).abs() < 1e-6 && (q[1] - 0.8).abs() < 1e-6);
    }
}
