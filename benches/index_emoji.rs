//! The index on a real catalogue with the shipped model: the emoji catalogue (7,572 images, 64 px)
//! embedded by `models/emoji-lite0-hmce.onnx`. Reports embedding throughput (decode + preprocess +
//! ORT, images/s), HNSW build time, recall@10 of HNSW against exact search at the default
//! `ef` (64) and at others, and index-only query latency p50 / p99 (one thread, every item's
//! embedding as a query; the item itself is in both answers). Criterion also times one HNSW
//! query. Writes `bench/results/index-emoji.json`.
//!
//! Needs `make data` (or `HIERCON_TEST_DATA` pointing at the imported catalogues) and the shipped
//! model; without them it says so and measures nothing.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use hiercon::catalogue::Manifest;
use hiercon::encoder::{Encoder, OrtEncoder};
use hiercon::eval::metrics::recall_against_exact;
use hiercon::image::Limits;
use hiercon::index::build::{EmbeddingCache, embed_items};
use hiercon::index::{AnnIndex, ExactIndex, Hit, HnswIndex, HnswParams};
use hiercon::progress::Progress;
use hiercon::runtime::RuntimeOptions;
use rayon::prelude::*;

const K: usize = 10;
const EF: usize = 64;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn bench(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let data = std::env::var_os("HIERCON_TEST_DATA").map_or(root.join("data"), PathBuf::from);
    let manifest_path = data.join("emoji/manifest.jsonl");
    let model = root.join("models/emoji-lite0-hmce.onnx");
    if !manifest_path.is_file() || !model.is_file() {
        eprintln!("index_emoji: {} or {} missing (make data); skipped", manifest_path.display(), model.display());
        return;
    }
    hiercon::runtime::init().unwrap();
    let manifest = Manifest::read(&manifest_path).unwrap();
    let encoder = OrtEncoder::load(&model, &RuntimeOptions::default()).unwrap();
    let t = Instant::now();
    let (_, emb, stats) =
        embed_items(&manifest.items, &manifest.dir, &encoder, &EmbeddingCache::empty(), 64, &Limits::default())
            .unwrap();
    let embed_s = t.elapsed().as_secs_f64();
    let n = emb.nrows();
    let data = Arc::new(emb);
    let params = HnswParams::default();
    let t = Instant::now();
    let hnsw = HnswIndex::build(data.view(), &params, &Progress::hidden()).unwrap();
    let build_s = t.elapsed().as_secs_f64();
    let exact = ExactIndex::new(data.clone());
    let queries: Vec<Vec<f32>> = data.rows().into_iter().map(|r| r.to_vec()).collect();
    let truth: Vec<Vec<Hit>> = queries.par_iter().map(|q| exact.search(q, K, 0, None)).collect();
    let mut recalls = serde_json::Map::new();
    let mut latency = serde_json::Map::new();
    for ef in [16, 32, EF, 128] {
        let mut times = Vec::with_capacity(n);
        let mut r = 0.0;
        for (q, e) in queries.iter().zip(&truth) {
            let t = Instant::now();
            let a = hnsw.search(q, K, ef, None);
            times.push(t.elapsed().as_secs_f64() * 1e6);
            r += recall_against_exact(&a, e, K);
        }
        times.sort_by(f64::total_cmp);
        recalls.insert(format!("ef{ef}"), serde_json::json!(r / n as f64));
        latency.insert(
            format!("ef{ef}"),
            serde_json::json!({"p50_us": percentile(&times, 0.5), "p99_us": percentile(&times, 0.99)}),
        );
    }
    let summary = serde_json::json!({
        "bench": "index-emoji", "model": "models/emoji-lite0-hmce.onnx", "digest": encoder.digest(), "items": n,
        "embedded": stats.embedded, "embed_seconds": embed_s, "images_per_s": stats.embedded as f64 / embed_s,
        "m": params.m, "ef_construction": params.ef_construction, "build_seconds": build_s,
        "default_ef": EF, "recall_at_10": recalls, "query_latency_1_thread": latency,
        "machine": hiercon::runtime::machine_description(),
    });
    let text = serde_json::to_string_pretty(&summary).unwrap();
    eprintln!("{text}");
    std::fs::create_dir_all(root.join("bench/results")).unwrap();
    std::fs::write(root.join("bench/results/index-emoji.json"), text + "\n").unwrap();

    let mut i = 0;
    c.bench_function("emoji_hnsw_top10_ef64", |b| {
        b.iter(|| {
            i = (i + 1) % n;
            black_box(hnsw.search(&queries[i], K, EF, None))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
