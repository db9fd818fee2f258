//! Index benchmarks on seeded synthetic embeddings: HNSW build time, query latency (HNSW, exact,
//! filtered), and recall@10 of HNSW against exact search.
//!
//! Environment:
//! - `HIERCON_BENCH_N` (default 20000): vectors in the one-shot build (the target figure is
//!   1000000), also the size of the index the query benches run on;
//! - `HIERCON_BENCH_DIM` (default 128);
//! - `HIERCON_BENCH_CLUSTERS` (default 1000; 0 = uniform random directions, HNSW's worst case):
//!   vectors are unit-normalised `centre + 0.5 * noise / sqrt(dim)` around seeded random centres,
//!   closer to real embeddings, which cluster by product and category.
//!
//! The one-shot figures (build seconds, recall@10 at several ef, filtered recall) are printed and
//! written to `bench/results/index-<N>.json` with a description of the machine.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hiercon::eval::metrics::recall_against_exact;
use hiercon::index::query::approx_candidates;
use hiercon::index::{AnnIndex, ExactIndex, Hit, HnswIndex, HnswParams};
use hiercon::progress::Progress;
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

const QUERIES: usize = 1000;
const K: usize = 10;
const EF: usize = 64;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// `n` unit vectors (and the same distribution for queries, from another stream).
fn dataset(n: usize, dim: usize, clusters: usize, seed: u64) -> Array2<f32> {
    let mut centres_rng = ChaCha8Rng::seed_from_u64(1234);
    let centres: Vec<Vec<f32>> = (0..clusters.max(1))
        .map(|_| (0..dim).map(|_| gaussian(&mut centres_rng) / (dim as f32).sqrt()).collect())
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut a = Array2::zeros((n, dim));
    for mut row in a.rows_mut() {
        if clusters == 0 {
            row.iter_mut().for_each(|v| *v = gaussian(&mut rng));
        } else {
            let c = &centres[rng.random_range(0..clusters)];
            for (v, cv) in row.iter_mut().zip(c) {
                *v = cv + 0.5 * gaussian(&mut rng) / (dim as f32).sqrt();
            }
        }
        let norm = row.dot(&row).sqrt();
        row.mapv_inplace(|v| v / norm);
    }
    a
}

fn machine() -> String {
    format!("{} ({} rayon threads)", hiercon::runtime::machine_description(), rayon::current_num_threads())
}

struct Setup {
    hnsw: HnswIndex,
    exact: ExactIndex,
    queries: Array2<f32>,
}

fn setup() -> Setup {
    let (n, dim, clusters) =
        (env("HIERCON_BENCH_N", 20_000), env("HIERCON_BENCH_DIM", 128), env("HIERCON_BENCH_CLUSTERS", 1000));
    let data = Arc::new(dataset(n, dim, clusters, 1));
    let queries = dataset(QUERIES, dim, clusters, 2);
    let params = HnswParams::default();
    let t = Instant::now();
    let hnsw = HnswIndex::build(data.view(), &params, &Progress::new("building", n as u64, "vectors")).unwrap();
    let build_s = t.elapsed().as_secs_f64();
    let exact = ExactIndex::new(data);
    let truth: Vec<Vec<Hit>> = queries
        .rows()
        .into_iter()
        .collect::<Vec<_>>()
        .par_iter()
        .map(|q| exact.search(q.as_slice().unwrap(), K, 0, None))
        .collect();
    let t = Instant::now();
    for q in queries.rows().into_iter().take(100) {
        black_box(exact.search(q.as_slice().unwrap(), K, 0, None));
    }
    let exact_us = t.elapsed().as_secs_f64() * 1e6 / 100.0;
    let mut recalls = serde_json::Map::new();
    for ef in [16, 32, 64, 128, 256] {
        let t = Instant::now();
        let r: f64 = queries
            .rows()
            .into_iter()
            .zip(&truth)
            .map(|(q, e)| recall_against_exact(&hnsw.search(q.as_slice().unwrap(), K, ef, None), e, K))
            .sum::<f64>()
            / QUERIES as f64;
        let us = t.elapsed().as_secs_f64() * 1e6 / QUERIES as f64;
        recalls.insert(format!("ef{ef}"), serde_json::json!({"recall_at_10": r, "us_per_query_1_thread": us}));
    }
    // Filtered search: rows allowed with probability `f` (scattered, the hard case for HNSW).
    // Three ways: exact scan of the allowed rows; hnsw_rs's own filtered search (ef widened by
    // 1/f, at most 8x); an unfiltered HNSW search over-fetching 2k/f rows, filtered afterwards
    // (what `Generation::query` does above the exact threshold).
    let mut filtered = serde_json::Map::new();
    for f in [0.01, 0.05, 0.1, 0.3, 0.6] {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let rows: Vec<u32> = (0..n as u32).filter(|_| rng.random::<f64>() < f).collect();
        let allow = |r: u32| rows.binary_search(&r).is_ok();
        let ef = ((EF as f64 / f).ceil() as usize).min(8 * EF);
        // hnsw_rs's filtered search explores most of the graph: few queries on big indexes.
        let nq = 100;
        let nq_filter = if n > 50_000 { 5 } else { nq };
        let (mut r_filter, mut r_post, mut short_post) = (0.0, 0.0, 0);
        let (mut t_filter, mut t_post, mut t_exact) = (0.0, 0.0, 0.0);
        for (i, q) in queries.rows().into_iter().take(nq).enumerate() {
            let q = q.as_slice().unwrap();
            let t = Instant::now();
            let e = exact.search_rows(q, K, &rows);
            t_exact += t.elapsed().as_secs_f64();
            if i < nq_filter {
                let t = Instant::now();
                let a = hnsw.search(q, K, ef, Some(&allow));
                t_filter += t.elapsed().as_secs_f64();
                r_filter += recall_against_exact(&a, &e, K);
            }
            let t = Instant::now();
            let p = approx_candidates(&hnsw, q, K, EF, rows.len() as f64 / n as f64, Some(&allow));
            t_post += t.elapsed().as_secs_f64();
            short_post += usize::from(p.len() < K.min(rows.len()));
            r_post += recall_against_exact(&p, &e, K);
        }
        let us = |t: f64| t * 1e6 / nq as f64;
        filtered.insert(
            format!("{f}"),
            serde_json::json!({"allowed": rows.len(), "exact_scan_us": us(t_exact),
                "hnsw_filter": {"ef": ef, "queries": nq_filter, "recall_at_10": r_filter / nq_filter as f64,
                    "us": t_filter * 1e6 / nq_filter as f64},
                "post_filter": {"recall_at_10": r_post / nq as f64, "us": us(t_post), "short_answers": short_post}}),
        );
    }
    let summary = serde_json::json!({
        "bench": "index", "n": n, "dim": dim, "clusters": clusters, "m": params.m,
        "ef_construction": params.ef_construction, "build_seconds": build_s, "queries": QUERIES, "exact_scan_us_1_thread": exact_us,
        "recall": recalls, "filtered": filtered, "machine": machine(),
    });
    let text = serde_json::to_string_pretty(&summary).unwrap();
    eprintln!("{text}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join(format!("index-{n}.json")), text + "\n");
    }
    Setup { hnsw, exact, queries }
}

fn benches(c: &mut Criterion) {
    let s = setup();
    let n = s.exact.len();
    let mut g = c.benchmark_group("query");
    let mut i = 0;
    let mut next = || {
        i = (i + 1) % QUERIES;
        s.queries.row(i).to_vec()
    };
    g.bench_function(BenchmarkId::new("hnsw_top10_ef64", n), |b| {
        b.iter(|| black_box(s.hnsw.search(&next(), K, EF, None)))
    });
    g.bench_function(BenchmarkId::new("exact_top10", n), |b| b.iter(|| black_box(s.exact.search(&next(), K, 0, None))));
    g.finish();

    let build_n = n.min(10_000);
    let data = dataset(build_n, s.exact.dim(), env("HIERCON_BENCH_CLUSTERS", 1000), 3);
    let mut g = c.benchmark_group("build");
    g.sample_size(10);
    g.bench_function(BenchmarkId::new("hnsw_m16_efc200", build_n), |b| {
        b.iter(|| HnswIndex::build(data.view(), &HnswParams::default(), &Progress::hidden()).unwrap())
    });
    g.finish();
}

criterion_group!(index, benches);
criterion_main!(index);
