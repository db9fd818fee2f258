//! Milvus's side of `make bench-milvus`: the vectors of `make bench-index` (`D/base.f32`,
//! `queries.f32`, `labels.u8`, `truth.json`, `data.json`, written by bench/index_side_by_side.py)
//! through a running Milvus, with hiercon's client.
//!
//! ```text
//! bench_milvus --dir D --address HOST:PORT --data MILVUS_DATA_DIR --m M --ef-construction E --out F
//! ```
//!
//! Figures: insert, index build and load seconds; the Milvus server's resident memory before and
//! after (its process under MILVUS_DATA_DIR/milvus.pid); recall@10 against the exact top-10 and
//! single-client queries/s (one query per call, as `serve` sends them) at ef 16..256; filtered
//! p50 / p99 latency and recall at 1 %, 5 % and 10 % selectivity (a scalar `label` column, the
//! filter as a Milvus expression). The collection is dropped at the end.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hiercon::milvus::Client;
use hiercon::milvus::client::params;
use hiercon::milvus::proto::{common, schema};
use serde_json::{Value, json};

const K: usize = 10;
const EFS: [usize; 5] = [16, 32, 64, 128, 256];
const SELECTIVITY: [(&str, u8); 3] = [("0.01", 1), ("0.05", 5), ("0.1", 10)];

#[path = "shared/cli.rs"]
mod cli;
use cli::need;

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// VmRSS of the Milvus server (the `milvus` process under the launcher in DATA/milvus.pid), MiB.
fn milvus_rss(data: &Path) -> f64 {
    let root: u32 = std::fs::read_to_string(data.join("milvus.pid")).unwrap().trim().parse().unwrap();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        if std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "milvus") {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap();
            let kb: f64 = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            return kb / 1024.0;
        }
        let children = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        frontier.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
    }
    panic!("no milvus process under {}", data.display())
}

fn search(client: &Client, name: &str, q: &[f32], expr: &str, ef: usize) -> Vec<i64> {
    let sp = params([
        ("anns_field", "vec".to_string()),
        ("topk", K.to_string()),
        ("metric_type", "IP".to_string()),
        ("params", format!("{{\"ef\": {}}}", ef.max(K))),
    ]);
    let r = client.search(name, &[q], expr, &[], sp).unwrap();
    match r.ids.and_then(|i| i.id_field) {
        Some(schema::i_ds::IdField::IntId(ids)) => ids.data,
        _ => Vec::new(),
    }
}

fn recall(found: &[Vec<i64>], truth: &Value) -> f64 {
    let truth = truth.as_array().unwrap();
    let mut sum = 0.0;
    for (f, t) in found.iter().zip(truth) {
        let t: HashSet<i64> = t.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        sum += f.iter().take(K).filter(|i| t.contains(i)).count() as f64 / K as f64;
    }
    sum / found.len().max(1) as f64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(need(&args, "--dir"));
    let address = need(&args, "--address");
    let data = PathBuf::from(need(&args, "--data"));
    let m: usize = need(&args, "--m").parse().unwrap();
    let efc: usize = need(&args, "--ef-construction").parse().unwrap();
    let out = PathBuf::from(need(&args, "--out"));
    let desc: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("data.json")).unwrap()).unwrap();
    let (n, dim) = (desc["n"].as_u64().unwrap() as usize, desc["dim"].as_u64().unwrap() as usize);
    let base = read_f32(&dir.join("base.f32"));
    let queries = read_f32(&dir.join("queries.f32"));
    let labels = std::fs::read(dir.join("labels.u8")).unwrap();
    let truth: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("truth.json")).unwrap()).unwrap();
    let client = Client::new(&address, Duration::from_secs(600)).unwrap();
    let version = client.version().unwrap();
    let name = format!("bench_{n}_m{m}");
    if client.has_collection(&name).unwrap() {
        client.drop_collection(&name).unwrap();
    }
    let rss_idle = milvus_rss(&data);
    let field = |name: &str, t: schema::DataType| schema::FieldSchema {
        name: name.into(),
        data_type: t as i32,
        ..Default::default()
    };
    let fields = vec![
        schema::FieldSchema { is_primary_key: true, ..field("id", schema::DataType::Int64) },
        schema::FieldSchema { type_params: params([("dim", dim)]), ..field("vec", schema::DataType::FloatVector) },
        field("label", schema::DataType::Int64),
    ];
    let sch = schema::CollectionSchema { name: name.clone(), fields, ..Default::default() };
    client.create_collection(&name, &sch, 1).unwrap();
    let t = Instant::now();
    let per_call = 16_000;
    for s in (0..n).step_by(per_call) {
        let e = (s + per_call).min(n);
        let long = |name: &str, data: Vec<i64>| schema::FieldData {
            r#type: schema::DataType::Int64 as i32,
            field_name: name.into(),
            field: Some(schema::field_data::Field::Scalars(schema::ScalarField {
                data: Some(schema::scalar_field::Data::LongData(schema::LongArray { data })),
                ..Default::default()
            })),
            ..Default::default()
        };
        let cols = vec![
            long("id", (s as i64..e as i64).collect()),
            schema::FieldData {
                r#type: schema::DataType::FloatVector as i32,
                field_name: "vec".into(),
                field: Some(schema::field_data::Field::Vectors(schema::VectorField {
                    dim: dim as i64,
                    data: Some(schema::vector_field::Data::FloatVector(schema::FloatArray {
                        data: base[s * dim..e * dim].to_vec(),
                    })),
                    ..Default::default()
                })),
                ..Default::default()
            },
            long("label", labels[s..e].iter().map(|&l| l as i64).collect()),
        ];
        client.insert(&name, cols, e - s).unwrap();
    }
    client.flush(&name).unwrap();
    let insert_s = t.elapsed().as_secs_f64();
    eprintln!("inserted {n} rows in {insert_s:.1} s");
    let t = Instant::now();
    let ip = params([
        ("index_type", "HNSW".to_string()),
        ("metric_type", "IP".to_string()),
        ("params", format!("{{\"M\": {m}, \"efConstruction\": {efc}}}")),
    ]);
    client.create_index(&name, "vec", ip).unwrap();
    loop {
        let (state, indexed, total, why) = client.index_progress(&name, "vec").unwrap();
        if state == common::IndexState::Failed {
            panic!("index build failed: {why}");
        }
        if state == common::IndexState::Finished && indexed as usize >= n {
            break;
        }
        eprintln!("indexed {indexed}/{total}");
        std::thread::sleep(Duration::from_secs(2));
    }
    let index_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    client.load(&name, 1).unwrap();
    while client.load_state(&name).unwrap() != common::LoadState::Loaded {
        std::thread::sleep(Duration::from_millis(200));
    }
    let load_s = t.elapsed().as_secs_f64();
    let rss_loaded = milvus_rss(&data);
    eprintln!("index {index_s:.1} s, load {load_s:.1} s, rss {rss_idle:.0} -> {rss_loaded:.0} MiB");
    let nq = queries.len() / dim;
    let qs: Vec<&[f32]> = (0..nq).map(|i| &queries[i * dim..(i + 1) * dim]).collect();
    // Warm up.
    for q in qs.iter().take(50) {
        search(&client, &name, q, "", 64);
    }
    let mut rec = serde_json::Map::new();
    for ef in EFS {
        let t = Instant::now();
        let found: Vec<Vec<i64>> = qs.iter().map(|q| search(&client, &name, q, "", ef)).collect();
        let secs = t.elapsed().as_secs_f64();
        let r = recall(&found, &truth["all"]);
        eprintln!("ef {ef}: recall {r:.4}, {:.0} q/s", nq as f64 / secs);
        rec.insert(format!("ef{ef}"), json!({"recall_at_10": r, "qps_1_client": nq as f64 / secs}));
    }
    let mut filtered = serde_json::Map::new();
    for (sel, code) in SELECTIVITY {
        let mut lat = Vec::with_capacity(nq);
        let mut found = Vec::with_capacity(nq);
        for q in &qs {
            let t = Instant::now();
            found.push(search(&client, &name, q, &format!("label == {code}"), 64));
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        lat.sort_by(f64::total_cmp);
        let r = recall(&found, &truth[sel]);
        eprintln!(
            "filter {sel}: p50 {:.2} ms, p99 {:.2} ms, recall {r:.4}",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
        filtered.insert(
            sel.to_string(),
            json!({"p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99), "recall_at_10": r, "ef": 64}),
        );
    }
    client.drop_collection(&name).unwrap();
    let result = json!({
        "engine": format!("milvus {version} standalone (hiercon's gRPC client, one query per call)"),
        "data": desc, "n": n, "dim": dim, "m": m, "ef_construction": efc,
        "insert_s": insert_s, "index_s": index_s, "load_s": load_s,
        "build_s": insert_s + index_s + load_s,
        "milvus_rss_mib": {"idle": rss_idle, "loaded": rss_loaded, "collection": rss_loaded - rss_idle},
        "recall": rec, "filtered": filtered,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    std::fs::write(&out, serde_json::to_string_pretty(&result).unwrap() + "\n").unwrap();
    eprintln!("wrote {}", out.display());
}
