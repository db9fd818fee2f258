//! hiercon's side of `make bench-index` (bench/index_side_by_side.py writes the data and runs faiss).
//!
//! ```text
//! bench_index build   --dir D --index I --m M --ef-construction E --out F   full `hiercon index` build path
//! bench_index query   --dir D --index I --build B --out F                   serving figures (fresh process), merged with B
//! bench_index adopt   --index I [--dir D] --out F   re-verify an earlier build's graph with this code
//! bench_index graph-rss --index I --out F                                  resident memory of the graph alone
//! bench_index nightly --dir D --index I --out F [--changed 0.01]           unchanged and changed re-index
//! bench_index graph   --dir D --m M --ef-construction E --out F             graph alone: build seconds, recall, q/s
//! bench_index served  --dir D --index I --out F                             the live graph as served: recall, q/s
//! ```
//!
//! `D` holds `base.f32`, `queries.f32`, `labels.u8`, `truth.json` and `data.json` (see the Python
//! script). Each base row becomes an item `r<i>` in category `s1/x`, `s5/x`, `s10/x` or `rest/x`
//! by its label, so the filters `category=s1` etc. allow 1 %, 5 % and 10 % of the rows and are
//! answered by the same planner as `serve` (`Generation::query`). The build goes through
//! `index::build::write_and_switch`, the code `hiercon index` runs after embedding: graph,
//! orphan search, writing, verification from disk, the atomic switch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use hiercon::catalogue::{Item, Split};
use hiercon::index::build::{Embedded, IndexConfig, write_and_switch};
use hiercon::index::filter::Filter;
use hiercon::index::query::QueryConfig;
use hiercon::index::store::{EmbedStats, IndexDir, ItemRecord, ModelInfo};
use hiercon::index::{Generation, HnswParams};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const K: usize = 10;
const EFS: [usize; 5] = [16, 32, 64, 128, 256];
const SELECTIVITY: [(&str, u8); 3] = [("0.01", 1), ("0.05", 5), ("0.1", 10)];

#[path = "shared/cli.rs"]
mod cli;
use cli::{arg, need};

struct Data {
    desc: Value,
    base: Array2<f32>,
    queries: Array2<f32>,
    labels: Vec<u8>,
    truth: Value,
}

fn read_f32(path: &Path, dim: usize) -> Array2<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Array2::from_shape_vec((v.len() / dim, dim), v).expect("whole rows")
}

fn load(dir: &Path) -> Data {
    let desc: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("data.json")).unwrap()).unwrap();
    let dim = desc["dim"].as_u64().unwrap() as usize;
    let truth = serde_json::from_str(&std::fs::read_to_string(dir.join("truth.json")).unwrap()).unwrap();
    Data {
        base: read_f32(&dir.join("base.f32"), dim),
        queries: read_f32(&dir.join("queries.f32"), dim),
        labels: std::fs::read(dir.join("labels.u8")).unwrap(),
        truth,
        desc,
    }
}

/// Item `i`, in the category its label names; `version` changes its (pretend) image hash.
fn record(i: usize, label: u8, version: u32) -> ItemRecord {
    let category = match label {
        1 => "s1/x",
        5 => "s5/x",
        10 => "s10/x",
        _ => "rest/x",
    };
    ItemRecord {
        item: Item {
            id: format!("r{i}"),
            image: format!("img/r{i}.png"),
            category: category.into(),
            product: format!("p{i}"),
            variation: "v".into(),
            view: String::new(),
            split: Split::Train,
            role: None,
            title: None,
            attributes: Default::default(),
        },
        sha256: format!("{version:08x}{i:056x}"),
    }
}

fn embedded(records: Vec<ItemRecord>, embeddings: Array2<f32>) -> Embedded {
    Embedded {
        manifest: "synthetic.jsonl".into(),
        image_root: "/nonexistent".into(),
        model: ModelInfo { path: None, digest: "synthetic".into(), dim: embeddings.ncols() },
        stats: EmbedStats { embedded: 0, reused: records.len(), skipped: 0 },
        records,
        embeddings,
    }
}

/// `hiercon index`'s defaults, but for `HIERCON_BENCH_MAX_SELF_MISSES` (default 5,000): on 1M
/// clustered vectors 3,147 rows do not find themselves even at ef 512 (see the closing note of
/// stop 17), which the default (0) would refuse.
fn config(index: &Path, m: usize, efc: usize) -> IndexConfig {
    let mut cfg = IndexConfig::new("synthetic.jsonl", index);
    cfg.hnsw = HnswParams { m, ef_construction: efc };
    cfg.keep = 2;
    cfg.verify.max_self_misses =
        std::env::var("HIERCON_BENCH_MAX_SELF_MISSES").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    cfg
}

/// VmRSS and VmHWM of this process in MiB.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let get = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse::<f64>()
            .unwrap()
            / 1024.0
    };
    (get("VmRSS:"), get("VmHWM:"))
}

fn outcome_json(out: &hiercon::index::IndexOutcome) -> Value {
    let seconds: serde_json::Map<String, Value> = out.seconds.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    json!({"generation": out.generation, "path": out.build.path.to_string(), "reason": out.build.reason,
        "reused": out.build.reused, "inserted": out.build.inserted, "tombstones": out.build.tombstones,
        "graph_seconds": out.build.graph_seconds, "orphan_seconds": out.build.orphan_seconds,
        "seconds": seconds, "total_seconds": out.seconds.iter().map(|s| s.1).sum::<f64>(),
        "verify": {"recall": out.report.recall, "ef_search": out.report.ef_search,
            "self_checked": out.report.self_checked,
            "self_misses": out.report.self_unreachable + out.report.self_outranked}})
}

fn build(args: &[String]) -> Value {
    let dir = PathBuf::from(need(args, "--dir"));
    let index = PathBuf::from(need(args, "--index"));
    let m: usize = need(args, "--m").parse().unwrap();
    let efc: usize = need(args, "--ef-construction").parse().unwrap();
    let d = load(&dir);
    let _ = std::fs::remove_dir_all(&index);
    let records: Vec<ItemRecord> = d.labels.iter().enumerate().map(|(i, &l)| record(i, l, 0)).collect();
    let cfg = config(&index, m, efc);
    let root = IndexDir::new(&index);
    root.create().unwrap();
    let _lock = root.lock().unwrap();
    eprintln!("building {} rows, M {m}, ef_construction {efc}", records.len());
    let out = write_and_switch(&root, &cfg, embedded(records, d.base)).expect("build");
    let mut j = outcome_json(&out);
    j["build_seconds"] = json!(out.build.graph_seconds - out.build.orphan_seconds);
    j["m"] = json!(m);
    j["ef_construction"] = json!(efc);
    j["threads"] = json!(rayon::current_num_threads());
    j["data"] = d.desc;
    j
}

/// Re-verifies and switches to the newest generation of an index built by an earlier version of
/// this benchmark, after recomputing its orphans with the current code (the graph is kept, so
/// `build_seconds` stays the one measured when it was built).
fn adopt(args: &[String]) -> Value {
    let index = PathBuf::from(need(args, "--index"));
    let root = IndexDir::new(&index);
    let _lock = root.lock().unwrap();
    let (_, dir) = root.generations().unwrap().pop().expect("a generation");
    let t = Instant::now();
    let mut g = Generation::load(&dir).expect("the generation loads");
    let load_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let data = g.exact.to_matrix();
    let orphans = g.hnsw.find_orphans(data.view());
    let orphan_s = t.elapsed().as_secs_f64();
    let mut meta = g.meta.clone();
    let old_orphans = meta.hnsw_orphans.len();
    meta.hnsw_orphans = orphans;
    let mut build = meta.build.clone().expect("built by write_and_switch");
    build.graph_seconds += orphan_s - build.orphan_seconds;
    build.orphan_seconds = orphan_s;
    meta.build = Some(build.clone());
    drop((g, data));
    hiercon::index::store::write_meta(&dir, &meta).unwrap();
    let t = Instant::now();
    let cfg = config(&index, meta.hnsw.m, meta.hnsw.ef_construction);
    let (report, _) =
        hiercon::index::build::verify_and_switch(&root, &dir, &cfg.verify, cfg.keep, None).expect("verified");
    let verify_s = t.elapsed().as_secs_f64();
    let data: Value = arg(args, "--dir")
        .map(|d| serde_json::from_str(&std::fs::read_to_string(Path::new(&d).join("data.json")).unwrap()).unwrap())
        .unwrap_or(Value::Null);
    json!({"data": data, "build_seconds": build.graph_seconds - build.orphan_seconds, "orphan_seconds": orphan_s,
        "orphans": meta.hnsw_orphans.len(), "orphans_before": old_orphans, "load_seconds": load_s,
        "m": meta.hnsw.m, "ef_construction": meta.hnsw.ef_construction, "threads": rayon::current_num_threads(),
        "seconds": {"graph": build.graph_seconds, "verify+switch": verify_s},
        "total_seconds": build.graph_seconds + verify_s,
        "verify": {"recall": report.recall, "ef_search": report.ef_search, "self_checked": report.self_checked,
            "self_misses": report.self_unreachable + report.self_outranked}})
}

fn recall(found: &[u32], truth: &Value) -> f64 {
    let t: Vec<u64> = truth.as_array().unwrap().iter().take(K).map(|v| v.as_u64().unwrap()).collect();
    found.iter().take(K).filter(|r| t.contains(&(**r as u64))).count() as f64 / K as f64
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn query(args: &[String]) -> Value {
    let dir = PathBuf::from(need(args, "--dir"));
    let index = PathBuf::from(need(args, "--index"));
    let d = load(&dir);
    let (queries, truth) = (d.queries, d.truth);
    let raw_mib = (d.base.len() * 4) as f64 / 1048576.0;
    drop(d.base);
    let (before, _) = rss_mib();
    let t = Instant::now();
    let g: Generation = IndexDir::new(&index).load_current().expect("a live generation");
    let load_s = t.elapsed().as_secs_f64();
    let (after, hwm) = rss_mib();
    let graph_file = |f: &str| std::fs::metadata(g.dir.join(f)).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0;
    let mut out = json!({"engine": "hiercon", "m": g.meta.hnsw.m, "ef_construction": g.meta.hnsw.ef_construction,
        "threads": rayon::current_num_threads(), "load_seconds": load_s, "rss_index_mib": after - before,
        "peak_rss_mib": hwm, "raw_vectors_mib": raw_mib, "graph_file_mib": graph_file("graph.hnsw.graph"),
        "served_ef": g.meta.ef_search, "recall": {}, "filtered": {}});
    let built: Value = serde_json::from_str(&std::fs::read_to_string(need(args, "--build")).unwrap()).unwrap();
    out["query_threads"] = out["threads"].clone();
    for key in ["build_seconds", "data", "orphan_seconds", "total_seconds", "seconds", "verify", "threads"] {
        out[key] = built[key].clone();
    }
    if let Some(g) = arg(args, "--graph-rss") {
        let g: Value = serde_json::from_str(&std::fs::read_to_string(g).unwrap()).unwrap();
        out["rss_graph_only_mib"] = g["rss_graph_mib"].clone();
    }
    // Every HNSW query through the planner (exact_below_rows 0: no small-index shortcut).
    let approx = QueryConfig { exact_below_rows: 0, ..QueryConfig::default() };
    let all = truth["all"].as_array().unwrap();
    // One untimed pass first (caches and pages warm, as in a running server), as faiss's side does.
    for q in queries.rows() {
        g.query(q.as_slice().unwrap(), K, 64, &Filter::default(), None, &approx).unwrap();
    }
    for ef in EFS {
        let (mut r, mut lat) = (0.0, Vec::new());
        for (q, t) in queries.rows().into_iter().zip(all) {
            let s = Instant::now();
            let hits = g.query(q.as_slice().unwrap(), K, ef, &Filter::default(), None, &approx).unwrap().hits;
            lat.push(s.elapsed().as_secs_f64());
            r += recall(&hits.iter().map(|h| h.row).collect::<Vec<_>>(), t);
        }
        let total: f64 = lat.iter().sum();
        out["recall"][format!("ef{ef}")] = json!({"recall_at_10": r / queries.nrows() as f64,
            "qps_1_thread": queries.nrows() as f64 / total,
            "p50_us": 1e6 * percentile(&mut lat, 0.5), "p99_us": 1e6 * percentile(&mut lat, 0.99)});
    }
    // Filtered: the default planner (exact scan of the allowed rows below 10 %, else HNSW
    // post-filtered), at the served ef.
    let cfg = QueryConfig::default();
    for (sel, code) in SELECTIVITY {
        let filter = Filter { category: Some(format!("s{code}")), ..Filter::default() };
        let want = truth[sel].as_array().unwrap();
        let (mut r, mut lat, mut how) = (0.0, Vec::new(), std::collections::BTreeMap::new());
        let mut allowed = 0;
        for (q, t) in queries.rows().into_iter().zip(want) {
            let s = Instant::now();
            let res = g.query(q.as_slice().unwrap(), K, g.meta.ef_search, &filter, None, &cfg).unwrap();
            lat.push(s.elapsed().as_secs_f64());
            allowed = res.allowed;
            *how.entry(format!("{:?}", res.answer).to_lowercase()).or_insert(0usize) += 1;
            r += recall(&res.hits.iter().map(|h| h.row).collect::<Vec<_>>(), t);
        }
        let how: Vec<String> = how.iter().map(|(k, v)| format!("{k} {v}")).collect();
        out["filtered"][sel] = json!({"allowed": allowed, "how": format!("planner ({})", how.join(", ")),
            "recall_at_10": r / queries.nrows() as f64,
            "p50_us": 1e6 * percentile(&mut lat, 0.5), "p99_us": 1e6 * percentile(&mut lat, 0.99)});
    }
    out
}

/// Resident memory of the graph alone (hnsw_rs's points: vectors and links), in a process of its own.
fn graph_rss(args: &[String]) -> Value {
    let index = PathBuf::from(need(args, "--index"));
    let root = IndexDir::new(&index);
    let name = root.current().unwrap().expect("a live generation");
    let dir = root.root.join(name);
    let meta = hiercon::index::store::read_meta(&dir).unwrap();
    let (before, _) = rss_mib();
    let t = Instant::now();
    let h = hiercon::index::HnswIndex::load(
        &dir,
        "graph",
        meta.hnsw_nodes.unwrap_or(meta.count),
        meta.dim,
        None,
        args.iter().any(|a| a == "--hnsw-rs"),
    )
    .expect("graph loads");
    let (after, _) = rss_mib();
    json!({"nodes": h.nodes(), "load_seconds": t.elapsed().as_secs_f64(), "rss_graph_mib": after - before})
}

fn nightly(args: &[String]) -> Value {
    let dir = PathBuf::from(need(args, "--dir"));
    let index = PathBuf::from(need(args, "--index"));
    let changed: f64 = arg(args, "--changed").map_or(0.01, |v| v.parse().unwrap());
    let d = load(&dir);
    let root = IndexDir::new(&index);
    let live = root.load_current().expect("a live generation (run build first)");
    let (m, efc) = (live.meta.hnsw.m, live.meta.hnsw.ef_construction);
    drop(live);
    let cfg = config(&index, m, efc);
    let _lock = root.lock().unwrap();
    let records: Vec<ItemRecord> = d.labels.iter().enumerate().map(|(i, &l)| record(i, l, 0)).collect();
    eprintln!("nightly: unchanged");
    let same = write_and_switch(&root, &cfg, embedded(records.clone(), d.base.clone())).expect("unchanged run");
    // `changed` of the rows get a new image: a nearby vector (same cluster) and a new hash.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let (mut records, mut base) = (records, d.base);
    let n = records.len();
    let dim = base.ncols();
    let mut picked = 0;
    for i in rand::seq::index::sample(&mut rng.clone(), n, ((n as f64) * changed).round() as usize) {
        let mut row = base.row_mut(i);
        row.iter_mut().for_each(|v| *v += 0.3 * rng.random_range(-1.0f32..1.0) / (dim as f32).sqrt());
        let norm = row.dot(&row).sqrt();
        row.mapv_inplace(|v| v / norm);
        records[i] = record(i, d.labels[i], 1);
        picked += 1;
    }
    eprintln!("nightly: {picked} rows changed");
    let some = write_and_switch(&root, &cfg, embedded(records, base)).expect("changed run");
    json!({"data": d.desc, "m": m, "ef_construction": efc, "unchanged": outcome_json(&same),
        "changed_share": changed, "changed_rows": picked, "changed": outcome_json(&some)})
}

/// The graph alone, in memory (no files, no verification): build seconds, then recall@10 and
/// single-thread queries/s of `HnswIndex::search` at each ef. The quick loop for graph work.
fn graph(args: &[String]) -> Value {
    let dir = PathBuf::from(need(args, "--dir"));
    let m: usize = need(args, "--m").parse().unwrap();
    let efc: usize = need(args, "--ef-construction").parse().unwrap();
    let d = load(&dir);
    let t = Instant::now();
    let params = HnswParams { m, ef_construction: efc };
    let h = hiercon::index::HnswIndex::build(d.base.view(), &params, &hiercon::progress::Progress::hidden())
        .expect("graph builds");
    let build_s = t.elapsed().as_secs_f64();
    let mut out = json!({"m": m, "ef_construction": efc, "threads": rayon::current_num_threads(),
        "build_seconds": build_s, "data": d.desc});
    let _warm = sweep(&h, &d);
    out["recall"] = sweep(&h, &d);
    out
}

/// recall@10 and single-thread queries/s of `h.search` at each ef in [`EFS`].
fn sweep(h: &hiercon::index::HnswIndex, d: &Data) -> Value {
    use hiercon::index::AnnIndex;
    let all = d.truth["all"].as_array().unwrap();
    let mut out = json!({});
    for ef in EFS {
        let (mut r, t) = (0.0, Instant::now());
        for (q, want) in d.queries.rows().into_iter().zip(all) {
            let hits = h.search(q.as_slice().unwrap(), K, ef, None);
            r += recall(&hits.iter().map(|h| h.row).collect::<Vec<_>>(), want);
        }
        let s = t.elapsed().as_secs_f64();
        out[format!("ef{ef}")] =
            json!({"recall_at_10": r / d.queries.nrows() as f64, "qps_1_thread": d.queries.nrows() as f64 / s});
        eprintln!("ef {ef}: {}", out[format!("ef{ef}")]);
    }
    out
}

/// The live generation's graph alone, loaded for serving: recall@10 and queries/s at each ef.
fn served(args: &[String]) -> Value {
    let dir = PathBuf::from(need(args, "--dir"));
    let index = PathBuf::from(need(args, "--index"));
    let d = load(&dir);
    let root = IndexDir::new(&index);
    let gen_dir = root.root.join(root.current().unwrap().expect("a live generation"));
    let meta = hiercon::index::store::read_meta(&gen_dir).unwrap();
    let t = Instant::now();
    let h = hiercon::index::HnswIndex::load(
        &gen_dir,
        "graph",
        meta.hnsw_nodes.unwrap_or(meta.count),
        meta.dim,
        None,
        false,
    )
    .expect("graph loads");
    let load_s = t.elapsed().as_secs_f64();
    let _warm = sweep(&h, &d);
    json!({"load_seconds": load_s, "recall": sweep(&h, &d)})
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cmd = args.get(1).map(String::as_str).unwrap_or("");
    let out = match cmd {
        "build" => build(&args),
        "query" => query(&args),
        "nightly" => nightly(&args),
        "graph-rss" => graph_rss(&args),
        "adopt" => adopt(&args),
        "graph" => graph(&args),
        "served" => served(&args),
        _ => {
            eprintln!("usage: bench_index build|query|nightly --dir D --index I ... (see examples/bench_index.rs)");
            std::process::exit(2);
        }
    };
    let path = need(&args, "--out");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap() + "\n").unwrap();
    eprintln!("wrote {path}");
}
