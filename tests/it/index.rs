//! Integration tests of `hiercon index` and `search::Service` on generated catalogues, with the
//! deterministic test encoder (and the real binary for exit codes and kills).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hiercon::Error;
use hiercon::catalogue::{AttrValue, Attributes, Item, Split};
use hiercon::encoder::{Encoder, TestEncoder};
use hiercon::index::build::{self, IndexConfig};
use hiercon::index::store::{Generation, IndexDir};
use hiercon::index::{self, AnnIndex, Answer};
use hiercon::search::{Filter, GroupBy, SearchConfig, SearchRequest, Service};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub(crate) const DIM: usize = 32;
const LEAVES: [&str; 5] =
    ["clothing/tops/shirts", "clothing/tops/tees", "clothing/shoes", "garden/tools", "garden/pots"];

/// A generated catalogue: PNGs and a manifest in a temporary folder.
pub(crate) struct Catalogue {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) items: Vec<Item>,
}

fn colour(rng: &mut ChaCha8Rng) -> [f32; 3] {
    [rng.random_range(0.0..255.0), rng.random_range(0.0..255.0), rng.random_range(0.0..255.0)]
}

/// A 24×24 image: a horizontal gradient between two product colours, shifted by the variation,
/// plus small per-view noise.
pub(crate) fn draw(product_seed: u64, variation: usize, view_seed: u64) -> image::RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(product_seed);
    let (a, b) = (colour(&mut rng), colour(&mut rng));
    let mut noise = ChaCha8Rng::seed_from_u64(view_seed);
    image::RgbImage::from_fn(24, 24, |x, y| {
        let t = x as f32 / 23.0;
        let mut px = [0u8; 3];
        for c in 0..3 {
            let shift = if c == variation % 3 { 50.0 * variation as f32 } else { 0.0 };
            let v = a[c] * (1.0 - t) + b[c] * t + shift * (y as f32 / 23.0) + noise.random_range(-6.0..6.0);
            px[c] = v.clamp(0.0, 255.0) as u8;
        }
        image::Rgb(px)
    })
}

impl Catalogue {
    /// `per_leaf` products in each leaf, 2 variations × 2 views each, plus one exact duplicate
    /// image (`dup`, a copy of the first item's file).
    pub(crate) fn new(per_leaf: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("img")).unwrap();
        let mut c = Catalogue { dir, items: Vec::new() };
        let mut p = 0u64;
        for leaf in LEAVES {
            for _ in 0..per_leaf {
                for v in 0..2 {
                    for w in 0..2u64 {
                        let id = format!("p{p}-v{v}-w{w}");
                        c.add(&id, leaf, &format!("p{p}"), &format!("v{v}"), draw(p, v, p * 10 + w), w);
                    }
                }
                p += 1;
            }
        }
        let first = c.items[0].clone();
        std::fs::copy(c.image_path(&first.id), c.dir.path().join("img/dup.png")).unwrap();
        c.items.push(Item { id: "dup".into(), image: "img/dup.png".into(), view: "copy".into(), ..first });
        c.write_manifest();
        c
    }

    pub(crate) fn add(
        &mut self,
        id: &str,
        category: &str,
        product: &str,
        variation: &str,
        img: image::RgbImage,
        view: u64,
    ) {
        let rel = format!("img/{id}.png");
        img.save(self.dir.path().join(&rel)).unwrap();
        self.items.push(Item {
            id: id.into(),
            image: rel,
            category: category.into(),
            product: product.into(),
            variation: variation.into(),
            view: format!("w{view}"),
            split: if view == 0 { Split::Train } else { Split::Test },
            role: None,
            // Titles and attributes as a shop's catalogue has them: text, a number, a boolean.
            title: Some(format!("{product} {}", if variation == "v0" { "classic" } else { "sport" })),
            attributes: attributes(product, variation),
        });
    }

    pub(crate) fn image_path(&self, id: &str) -> PathBuf {
        let it = self.items.iter().find(|i| i.id == id).unwrap();
        self.dir.path().join(&it.image)
    }

    pub(crate) fn manifest(&self) -> PathBuf {
        self.dir.path().join("manifest.jsonl")
    }

    pub(crate) fn write_manifest(&self) {
        let text: String = self.items.iter().map(|i| serde_json::to_string(i).unwrap() + "\n").collect();
        std::fs::write(self.manifest(), text).unwrap();
    }

    pub(crate) fn index_dir(&self) -> PathBuf {
        self.dir.path().join("index/test")
    }

    pub(crate) fn config(&self) -> IndexConfig {
        let mut cfg = IndexConfig::new(self.manifest(), self.index_dir());
        cfg.batch_size = 16;
        cfg.keep = 2;
        cfg
    }

    fn distinct_images(&self) -> usize {
        self.items.len() - 1 // `dup` shares the first item's bytes
    }
}

/// `brand` alternates by product (`acme`, `globex`), `price` is the product number (an integer),
/// `sale` is true for variation `v1`.
pub(crate) fn attributes(product: &str, variation: &str) -> Attributes {
    let n: u64 = product.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().unwrap_or(0);
    Attributes::from([
        ("brand".to_string(), AttrValue::String(if n.is_multiple_of(2) { "acme" } else { "globex" }.into())),
        ("price".to_string(), AttrValue::Number(n.into())),
        ("sale".to_string(), AttrValue::Bool(variation == "v1")),
    ])
}

pub(crate) fn encoder() -> Arc<dyn Encoder> {
    Arc::new(TestEncoder::new(DIM, 0))
}

/// A service that uses HNSW whenever the planner's fraction rule allows (the default would
/// answer these small test indexes exactly).
fn service(c: &Catalogue) -> Service {
    let mut cfg = SearchConfig::default();
    cfg.query.exact_below_rows = 0;
    Service::open(c.index_dir(), encoder(), cfg).unwrap()
}

fn search(s: &Service, query_id: &str, req: &SearchRequest) -> hiercon::search::SearchResponse {
    let g = s.local().unwrap();
    let q = g.exact.vector(g.row_of(query_id).unwrap()).to_vec();
    s.search_embedding(&q, req).unwrap()
}

fn req(k: usize, filter: Filter, group_by: Option<GroupBy>) -> SearchRequest {
    SearchRequest { k, filter, group_by, ef: None }
}

#[test]
fn a_run_makes_a_live_generation_whose_approx_answers_agree_with_exact() {
    let c = Catalogue::new(8);
    let out = build::run(&c.config(), encoder().as_ref()).unwrap();
    assert_eq!((out.generation.as_str(), out.count), ("gen-1", c.items.len()));
    assert_eq!(out.stats.embedded, c.distinct_images());
    assert_eq!(out.stats.reused, 1, "the duplicate image is embedded once");
    assert!(out.report.passed && out.report.duplicate_items == 2, "{:?}", out.report);
    let s = service(&c);
    let g = s.local().unwrap();
    let mut overlap = 0;
    for it in &c.items {
        let approx = search(&s, &it.id, &req(10, Filter::default(), None));
        assert_eq!(approx.answered_by, Answer::Approx);
        let q = g.exact.vector(g.row_of(&it.id).unwrap());
        let exact: Vec<u32> =
            g.exact.search_rows(q, 10, &(0..g.items.len() as u32).collect::<Vec<_>>()).iter().map(|h| h.row).collect();
        let exact_ids: HashSet<&str> = exact.iter().map(|&r| g.item(r).item.id.as_str()).collect();
        overlap += approx.hits.iter().filter(|h| exact_ids.contains(h.id.as_str())).count();
        assert!(approx.hits.windows(2).all(|w| w[0].score >= w[1].score));
        let first = &approx.hits[0];
        assert!(first.id == it.id || (first.score - 1.0).abs() < 1e-5, "{} found {}", it.id, first.id);
    }
    let recall = overlap as f64 / (10 * c.items.len()) as f64;
    assert!(recall > 0.97, "recall@10 {recall}");
    // An image query takes the same path: decode, preprocess, embed, search.
    let bytes = std::fs::read(c.image_path("p3-v1-w0")).unwrap();
    let r = s.search_image(&bytes, &req(3, Filter::default(), None)).unwrap();
    assert_eq!(r.hits[0].id, "p3-v1-w0");
    assert!(s.search_image(b"not an image", &SearchRequest::default()).is_err());
    assert!(matches!(
        s.search_embedding(&[1.0; 3], &SearchRequest::default()),
        Err(Error::WrongVectorDimension { .. })
    ));
}

#[test]
fn filters_include_descendants_and_return_nothing_outside() {
    let c = Catalogue::new(8);
    build::run(&c.config(), encoder().as_ref()).unwrap();
    let s = service(&c);
    let n = c.items.len();
    let cat = |p: &str| Filter { category: Some(p.into()), ..Default::default() };
    // (filter, which items it must allow, the path expected to answer)
    type Allows = Box<dyn Fn(&Item) -> bool>;
    let cases: Vec<(Filter, Allows, Answer)> = vec![
        (cat("clothing"), Box::new(|i| i.category.starts_with("clothing/")), Answer::Approx),
        (cat("clothing/tops"), Box::new(|i| i.category.starts_with("clothing/tops/")), Answer::Approx),
        (cat("garden/pots"), Box::new(|i| i.category == "garden/pots"), Answer::Approx),
        (Filter { product: Some("p5".into()), ..Default::default() }, Box::new(|i| i.product == "p5"), Answer::Exact),
        (
            Filter { product: Some("p0".into()), variation: Some("v0".into()), ..Default::default() },
            Box::new(|i| i.product == "p0" && i.variation == "v0"),
            Answer::Exact,
        ),
        (
            Filter { category: Some("garden".into()), split: Some(Split::Test), ..Default::default() },
            Box::new(|i| i.category.starts_with("garden/") && i.split == Split::Test),
            Answer::Approx,
        ),
        (cat("clothing/top"), Box::new(|_| false), Answer::Exact),
    ];
    for (filter, allows, answer) in cases {
        let want: HashSet<&str> = c.items.iter().filter(|i| allows(i)).map(|i| i.id.as_str()).collect();
        for query in ["p0-v0-w0", "p30-v1-w1"] {
            // Ask for everything: exactly the allowed items come back.
            let all = search(&s, query, &req(n, filter.clone(), None));
            let got: HashSet<&str> = all.hits.iter().map(|h| h.id.as_str()).collect();
            assert_eq!(got, want, "{filter:?}");
            assert_eq!(all.allowed, want.len());
            // A top-5 answer respects the filter and matches the exact ranking.
            let top = search(&s, query, &req(5, filter.clone(), None));
            assert_eq!(top.answered_by, answer, "{filter:?}");
            assert!(top.hits.iter().all(|h| want.contains(h.id.as_str())), "{filter:?}: {:?}", top.hits);
            let exact: Vec<&str> = all.hits.iter().take(5).map(|h| h.id.as_str()).collect();
            let got: Vec<&str> = top.hits.iter().map(|h| h.id.as_str()).collect();
            assert_eq!(got, exact, "{filter:?}");
        }
    }
    assert!(s.search_embedding(&[1.0; DIM], &req(0, Filter::default(), None)).is_err());
    // With the default planner an index this small is scanned, never approximated.
    let small = Service::open(c.index_dir(), encoder(), SearchConfig::default()).unwrap();
    let r = search(&small, "p0-v0-w0", &req(5, cat("clothing"), None));
    assert_eq!(r.answered_by, Answer::Exact);
    let approx = search(&s, "p0-v0-w0", &req(5, cat("clothing"), None));
    assert_eq!(r.hits, approx.hits);
}

#[test]
fn group_by_returns_the_best_hit_of_each_group_best_first() {
    let c = Catalogue::new(8);
    build::run(&c.config(), encoder().as_ref()).unwrap();
    let s = service(&c);
    let g = s.local().unwrap();
    for (by, key) in [
        (GroupBy::Product, Box::new(|i: &Item| i.product.clone()) as Box<dyn Fn(&Item) -> String>),
        (GroupBy::Category, Box::new(|i: &Item| i.category.clone())),
    ] {
        for query in ["p1-v0-w1", "p22-v1-w0"] {
            let q = g.exact.vector(g.row_of(query).unwrap()).to_vec();
            // Reference: the best score per group over every item, in f64.
            let mut best: HashMap<String, (f64, String)> = HashMap::new();
            for it in &c.items {
                let v = g.exact.vector(g.row_of(&it.id).unwrap());
                let score: f64 = q.iter().zip(v).map(|(a, b)| *a as f64 * *b as f64).sum();
                let e = best.entry(key(it)).or_insert((f64::MIN, String::new()));
                if score > e.0 {
                    *e = (score, it.id.clone());
                }
            }
            let mut want: Vec<(f64, String)> = best.into_values().collect();
            want.sort_by(|a, b| b.0.total_cmp(&a.0));
            let k = 4;
            let r = search(&s, query, &req(k, Filter::default(), Some(by)));
            let groups: Vec<String> =
                r.hits.iter().map(|h| key(c.items.iter().find(|i| i.id == h.id).unwrap())).collect();
            assert_eq!(groups.iter().collect::<HashSet<_>>().len(), k, "one hit per group: {groups:?}");
            for (hit, (score, _)) in r.hits.iter().zip(&want) {
                assert!((hit.score as f64 - score).abs() < 1e-5, "{by:?}: {} vs {score}", hit.score);
            }
            // Grouping under a filter.
            let f = Filter { category: Some("clothing".into()), ..Default::default() };
            let r = search(&s, query, &req(3, f, Some(by)));
            assert!(r.hits.iter().all(|h| h.category.starts_with("clothing/")));
        }
    }
    // More groups asked for than exist: all of them, answered exactly.
    let r = search(&s, "p0-v0-w0", &req(50, Filter::default(), Some(GroupBy::Category)));
    assert_eq!((r.hits.len(), r.answered_by), (LEAVES.len(), Answer::Exact));
}

#[test]
fn a_rerun_reembeds_only_changed_and_added_images_and_drops_removed_items() {
    let mut c = Catalogue::new(4);
    let first = build::run(&c.config(), encoder().as_ref()).unwrap();
    assert_eq!(first.stats.embedded, c.distinct_images());
    // Unchanged catalogue: nothing re-embedded.
    let same = build::run(&c.config(), encoder().as_ref()).unwrap();
    assert_eq!((same.stats.embedded, same.stats.reused), (0, c.items.len()));
    // Two images redrawn, one item added, one removed.
    draw(900, 0, 1).save(c.image_path("p1-v0-w0")).unwrap();
    draw(901, 1, 2).save(c.image_path("p2-v1-w1")).unwrap();
    c.add("new-item", "garden/pots", "p99", "v0", draw(902, 0, 3), 0);
    c.items.retain(|i| i.id != "p3-v0-w1");
    c.write_manifest();
    let third = build::run(&c.config(), encoder().as_ref()).unwrap();
    assert_eq!(third.stats.embedded, 3);
    assert_eq!(third.stats.reused, c.items.len() - 3);
    assert_eq!(third.count, c.items.len());
    let s = service(&c);
    assert!(s.item("p3-v0-w1").unwrap().is_none(), "removed items disappear");
    assert!(s.item("new-item").unwrap().is_some());
    // The changed image's new embedding is what is served.
    let bytes = std::fs::read(c.image_path("p1-v0-w0")).unwrap();
    let r = s.search_image(&bytes, &req(1, Filter::default(), None)).unwrap();
    assert_eq!(r.hits[0].id, "p1-v0-w0");
    assert!((r.hits[0].score - 1.0).abs() < 1e-5);
    // Another model (digest): everything is embedded again.
    let other = TestEncoder::new(DIM, 1);
    let fourth = build::run(&c.config(), &other).unwrap();
    assert_eq!((fourth.stats.embedded, fourth.stats.reused), (c.distinct_images(), 1));
    // Generations kept: --keep 2.
    let gens: Vec<u64> = IndexDir::new(c.index_dir()).generations().unwrap().iter().map(|g| g.0).collect();
    assert_eq!(gens, vec![3, 4]);
}

#[test]
fn a_failed_verification_leaves_current_untouched() {
    let c = Catalogue::new(3);
    build::run(&c.config(), encoder().as_ref()).unwrap();
    let root = IndexDir::new(c.index_dir());
    let current = || std::fs::read_to_string(c.index_dir().join("CURRENT")).unwrap();
    assert_eq!(current(), "gen-1\n");
    // An impossible recall threshold.
    let mut cfg = c.config();
    cfg.verify.min_recall = 1.01;
    let err = build::run(&cfg, encoder().as_ref()).unwrap_err();
    assert!(matches!(err, Error::IndexVerification { .. }), "{err}");
    assert_eq!(index::exit_code(&err), index::exit::VERIFICATION_FAILED);
    assert_eq!(current(), "gen-1\n");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.index_dir().join("gen-2/verification.json")).unwrap()).unwrap();
    assert_eq!(report["passed"], false);
    // A generation damaged on disk after it was written.
    let bad = c.index_dir().join("gen-9");
    std::fs::create_dir(&bad).unwrap();
    for f in std::fs::read_dir(c.index_dir().join("gen-1")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), bad.join(f.file_name())).unwrap();
    }
    let data = bad.join("graph.hnsw.data");
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&data, bytes).unwrap();
    let err = build::verify_and_switch(&root, &bad, &cfg.verify, 3, None).unwrap_err();
    assert!(err.to_string().contains("does not load"), "{err}");
    assert_eq!(current(), "gen-1\n");
    assert_eq!(root.load_current().unwrap().name(), "gen-1");
}

#[test]
fn the_service_reloads_owning_generations_and_refuses_bad_ones() {
    let mut c = Catalogue::new(3);
    let mut cfg = c.config();
    cfg.keep = 1;
    build::run(&cfg, encoder().as_ref()).unwrap();
    let s = service(&c);
    let old = s.local().unwrap(); // a query in flight holds this
    assert!(!s.reload().unwrap().changed);
    c.items.retain(|i| i.id != "p0-v1-w1");
    c.write_manifest();
    build::run(&cfg, encoder().as_ref()).unwrap();
    assert!(!c.index_dir().join("gen-1").exists(), "--keep 1 deleted the old generation's files");
    let r = s.reload().unwrap();
    assert_eq!((r.previous.as_str(), r.current.as_str(), r.changed), ("gen-1", "gen-2", true));
    assert!(s.item("p0-v1-w1").unwrap().is_none());
    // The old generation still answers from memory although its directory is gone.
    let q = old.exact.vector(old.row_of("p0-v1-w1").unwrap()).to_vec();
    let hits = old.query(&q, 3, 64, &Filter::default(), None, &Default::default()).unwrap();
    assert_eq!(old.item(hits.hits[0].row).item.id, "p0-v1-w1");
    drop(old);
    // CURRENT pointing at a broken generation: refused, gen-2 keeps serving.
    let root = IndexDir::new(c.index_dir());
    std::fs::create_dir(c.index_dir().join("gen-3")).unwrap();
    root.switch_current("gen-3").unwrap();
    assert!(s.reload().is_err());
    assert_eq!(s.local().unwrap().name(), "gen-2");
    assert!(!search(&s, "p1-v0-w0", &SearchRequest::default()).hits.is_empty());
    // A generation built with another model is refused too.
    root.switch_current("gen-2").unwrap();
    let other: Arc<dyn Encoder> = Arc::new(TestEncoder::new(DIM, 5));
    let err = Service::open(c.index_dir(), other, SearchConfig::default()).unwrap_err();
    assert!(matches!(err, Error::ModelMismatch { .. }), "{err}");
}

fn hiercon() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hiercon"));
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    cmd
}

fn index_cmd(c: &Catalogue) -> Command {
    let mut cmd = hiercon();
    cmd.arg("index").arg("--manifest").arg(c.manifest()).arg("--out").arg(c.index_dir());
    cmd.args(["--test-encoder", &DIM.to_string(), "--batch-size", "8", "--keep", "2"]);
    cmd
}

#[test]
fn the_binary_reports_distinct_exit_codes() {
    let c = Catalogue::new(2);
    // Runs the command and checks its exit code, showing its log when it differs.
    let expect = |cmd: &mut Command, want: i32| {
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(want), "{cmd:?}\n{}", String::from_utf8_lossy(&out.stderr));
    };
    expect(&mut index_cmd(&c), 0);
    expect(index_cmd(&c).args(["--min-recall", "1.01"]), 3);
    let root = IndexDir::new(c.index_dir());
    let lock = root.lock().unwrap();
    expect(&mut index_cmd(&c), 4);
    drop(lock);
    expect(index_cmd(&c).args(["--m", "1000"]), 2);
    let mut missing = hiercon();
    missing.args(["index", "--test-encoder", "8", "--manifest", "/nonexistent/m.jsonl", "--out"]).arg(c.index_dir());
    expect(&mut missing, 2);
    expect(hiercon().args(["index", "--bogus"]), 2);
    assert_eq!(root.load_current().unwrap().name(), "gen-1");
}

/// Where to kill a run: when a log line containing the marker appears, or after a delay.
enum KillAt {
    Marker(&'static str),
    After(Duration),
}

#[test]
fn killing_a_run_at_any_moment_leaves_a_loadable_current() {
    let mut c = Catalogue::new(30);
    assert!(index_cmd(&c).stderr(Stdio::null()).stdout(Stdio::null()).status().unwrap().success());
    let moments = [
        KillAt::Marker("phase: embedding"),
        KillAt::Marker("phase: building graph"),
        KillAt::Marker("phase: writing generation"),
        KillAt::Marker("phase: verifying"),
        KillAt::Marker("phase: switching CURRENT"),
        KillAt::After(Duration::from_millis(5)),
        KillAt::After(Duration::from_millis(60)),
        KillAt::After(Duration::from_millis(150)),
        KillAt::After(Duration::from_millis(300)),
        KillAt::After(Duration::from_secs(120)), // runs to completion
    ];
    let mut live = HashSet::new();
    // Every run after the first changes one image of 601: the incremental path (tested below),
    // so the kills land in it: while the live graph is loaded, extended, written, verified.
    let mut incremental_kills = 0;
    for (i, at) in moments.iter().enumerate() {
        // Change one image each time so every run has embedding work to do.
        draw(1000 + i as u64, 0, 7).save(c.image_path("p4-v0-w0")).unwrap();
        let mut child = index_cmd(&c).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        match at {
            KillAt::Marker(m) => {
                let mut seen = false;
                for line in BufReader::new(stderr).lines() {
                    let line = line.unwrap();
                    incremental_kills += usize::from(line.contains("incremental"));
                    if line.contains(m) {
                        seen = true;
                        break;
                    }
                }
                assert!(seen, "the run never logged {m:?}");
                let _ = child.kill();
            }
            KillAt::After(d) => {
                let drain =
                    std::thread::spawn(move || std::io::copy(&mut BufReader::new(stderr), &mut std::io::sink()));
                let start = Instant::now();
                while start.elapsed() < *d && child.try_wait().unwrap().is_none() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let _ = child.kill();
                let _ = drain.join();
            }
        }
        child.wait().unwrap();
        let root = IndexDir::new(c.index_dir());
        let g = root.load_current().unwrap_or_else(|e| panic!("after kill {i}: CURRENT does not load: {e}"));
        let report = std::fs::read_to_string(g.dir.join("verification.json")).unwrap();
        assert!(report.contains("\"passed\": true"), "the live generation was verified");
        let dirs = root.generations().unwrap().len();
        eprintln!("kill {i}: CURRENT = {}, {dirs} generation directories", g.name());
        live.insert(g.name());
    }
    // Kills after the switch make the new generation live; earlier kills keep the old one.
    assert!(live.len() >= 2, "kills landed in one place only: {live:?}");
    assert!(incremental_kills >= 3, "the kills after the graph phase began hit incremental runs");
    let last = IndexDir::new(c.index_dir()).load_current().unwrap();
    assert_eq!(last.meta.build.as_ref().map(|b| b.path), Some(index::store::BuildPath::Incremental));
    // A complete run afterwards succeeds and cleans up interrupted directories.
    c.items.pop();
    c.write_manifest();
    assert!(index_cmd(&c).stderr(Stdio::null()).stdout(Stdio::null()).status().unwrap().success());
    let root = IndexDir::new(c.index_dir());
    let gens = root.generations().unwrap();
    assert_eq!(gens.len(), 2, "{gens:?}");
    let g: Generation = root.load_current().unwrap();
    assert_eq!(g.meta.count, c.items.len());
    let leftovers: Vec<_> = std::fs::read_dir(c.index_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn unreadable_images_are_skipped_and_counted() {
    let mut c = Catalogue::new(2);
    std::fs::write(c.image_path("p1-v0-w0"), b"\x89PNG but not really").unwrap();
    std::fs::remove_file(c.image_path("p2-v1-w1")).unwrap();
    let out = build::run(&c.config(), encoder().as_ref()).unwrap();
    assert_eq!(out.stats.skipped, 2);
    assert_eq!(out.count, c.items.len() - 2);
    assert_eq!(out.stats.embedded + out.stats.reused + out.stats.skipped, c.items.len());
    let s = service(&c);
    assert!(s.item("p1-v0-w0").unwrap().is_none() && s.item("p2-v1-w1").unwrap().is_none());
    // A catalogue with no readable image at all is bad input (exit code 2), not an empty index.
    for it in &c.items {
        let _ = std::fs::remove_file(c.dir.path().join(&it.image));
    }
    c.items.truncate(3);
    c.write_manifest();
    let err = build::run(&c.config(), encoder().as_ref()).unwrap_err();
    assert_eq!(index::exit_code(&err), index::exit::BAD_INPUT, "{err}");
    assert_eq!(IndexDir::new(c.index_dir()).load_current().unwrap().name(), "gen-1");
}

/// The live generation's graph, reused by the next run when few items changed.
#[test]
fn a_small_change_reuses_the_live_graph_and_a_large_one_rebuilds_it() {
    let mut c = Catalogue::new(12); // 241 items
    let first = build::run(&c.config(), encoder().as_ref()).unwrap();
    assert_eq!(first.build.path, index::store::BuildPath::Full);
    assert!(first.build.reason.contains("no live generation"), "{}", first.build.reason);
    // Unchanged: the graph files are shared with the live generation (hard links), nothing inserted.
    let same = build::run(&c.config(), encoder().as_ref()).unwrap();
    assert_eq!(same.build.path, index::store::BuildPath::Incremental, "{}", same.build.reason);
    assert_eq!((same.build.inserted, same.build.tombstones, same.build.reused), (0, 0, c.items.len()));
    assert_eq!(same.build.from.as_deref(), Some("gen-1"));
    use std::os::unix::fs::MetadataExt;
    let ino = |d: &std::path::Path| std::fs::metadata(d.join("graph.hnsw.graph")).unwrap().ino();
    assert_eq!(ino(&first.dir), ino(&same.dir), "the unchanged graph is linked, not rewritten");
    // One image redrawn, one item removed, two added (one in a new category).
    draw(700, 0, 1).save(c.image_path("p1-v0-w0")).unwrap();
    c.items.retain(|i| i.id != "p3-v1-w1");
    c.add("added-1", "garden/pots", "p500", "v0", draw(701, 0, 2), 0);
    c.add("added-2", "kitchen/pans", "p501", "v0", draw(702, 1, 3), 0);
    c.write_manifest();
    let third = build::run(&c.config(), encoder().as_ref()).unwrap();
    assert_eq!(third.build.path, index::store::BuildPath::Incremental, "{}", third.build.reason);
    assert_eq!((third.build.inserted, third.build.tombstones), (3, 2), "{:?}", third.build);
    assert!(third.build.reason.contains("2 tombstones"), "{}", third.build.reason);
    assert!(third.report.passed && third.report.self_checked >= 3, "{:?}", third.report);
    let meta = index::store::read_meta(&third.dir).unwrap();
    assert_eq!(meta.hnsw_nodes, Some(c.items.len() + 2));
    assert_eq!(meta.build.as_ref().map(|b| b.path), Some(index::store::BuildPath::Incremental));
    // Served answers are those of a full build: every item finds itself first, HNSW agrees with
    // the exact scan, removed items never come back, filters see the new category.
    let s = service(&c);
    assert!(s.item("p3-v1-w1").unwrap().is_none());
    let g = s.local().unwrap();
    assert_eq!(g.items.len(), c.items.len());
    for it in &c.items {
        let r = search(&s, &it.id, &req(5, Filter::default(), None));
        assert_eq!(r.answered_by, Answer::Approx);
        assert!(r.hits.iter().all(|h| h.id != "p3-v1-w1"));
        assert!(r.hits.iter().take(2).any(|h| h.id == it.id), "{} not first: {:?}", it.id, r.hits);
        let q = g.exact.vector(g.row_of(&it.id).unwrap()).to_vec();
        let exact = g.exact.search(&q, 5, 0, None);
        let got: Vec<f32> = r.hits.iter().map(|h| h.score).collect();
        let want: Vec<f32> = exact.iter().map(|h| h.score).collect();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{}: {got:?} vs exact {want:?}", it.id);
        }
    }
    let bytes = std::fs::read(c.image_path("p1-v0-w0")).unwrap();
    let r = s.search_image(&bytes, &req(1, Filter::default(), None)).unwrap();
    assert_eq!(r.hits[0].id, "p1-v0-w0", "the redrawn image's new embedding is served");
    let kitchen = Filter { category: Some("kitchen".into()), ..Default::default() };
    let r = search(&s, "p0-v0-w0", &req(3, kitchen, None));
    assert_eq!(r.hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), vec!["added-2"]);
    drop((g, s));
    // --full forces a rebuild; so does a change larger than --max-new.
    let mut cfg = c.config();
    cfg.rebuild.full = true;
    let forced = build::run(&cfg, encoder().as_ref()).unwrap();
    assert_eq!(forced.build.path, index::store::BuildPath::Full);
    assert!(forced.build.reason.contains("--full"));
    assert_eq!(index::store::read_meta(&forced.dir).unwrap().hnsw_nodes, None);
    for (k, it) in c.items.iter().take(90).enumerate() {
        draw(800 + k as u64, 0, 5).save(c.dir.path().join(&it.image)).unwrap();
    }
    let big = build::run(&c.config(), encoder().as_ref()).unwrap();
    assert_eq!(big.build.path, index::store::BuildPath::Full);
    assert!(big.build.reason.contains("new or changed"), "{}", big.build.reason);
    // Tombstones past --max-tombstones: a full build, which drops them.
    let next = build::run(&c.config(), encoder().as_ref()).unwrap();
    assert_eq!(next.build.path, index::store::BuildPath::Incremental);
    c.items.truncate(c.items.len() - 30);
    c.write_manifest();
    let mut cfg = c.config();
    cfg.rebuild.max_tombstones = 0.05;
    let rebuilt = build::run(&cfg, encoder().as_ref()).unwrap();
    assert_eq!(rebuilt.build.path, index::store::BuildPath::Full);
    assert!(rebuilt.build.reason.contains("tombstones"), "{}", rebuilt.build.reason);
    assert_eq!(rebuilt.count, c.items.len());
}

#[test]
fn the_embedding_pipeline_gives_each_image_the_embedding_it_gets_alone() {
    // embed_items reads and decodes the next chunk on a worker while the encoder embeds this
    // one, decoding every distinct image once. Against the plain path (decode + preprocess +
    // embed each image by itself): the same rows bit for bit, in manifest order, with a corrupt
    // image skipped and the duplicate reused. Batches of 3 make three chunks of 24 items.
    let c = Catalogue::new(3);
    std::fs::write(c.image_path(&c.items[5].id), b"not an image").unwrap();
    let enc = encoder();
    let limits = hiercon::image::Limits::default();
    let (records, emb, stats) =
        build::embed_items(&c.items, c.dir.path(), enc.as_ref(), &build::EmbeddingCache::empty(), 3, &limits).unwrap();
    assert_eq!(stats.skipped, 1);
    assert_eq!(stats.embedded + stats.reused, c.items.len() - 1);
    assert!(stats.reused >= 1, "the duplicate image is embedded once");
    let ids: Vec<&str> = records.iter().map(|r| r.item.id.as_str()).collect();
    let want_ids: Vec<&str> = c.items.iter().filter(|it| it.id != c.items[5].id).map(|it| it.id.as_str()).collect();
    assert_eq!(ids, want_ids);
    for (r, row) in records.iter().zip(emb.rows()) {
        let bytes = std::fs::read(c.image_path(&r.item.id)).unwrap();
        let t = hiercon::image::tensor_from_bytes(&bytes, enc.preprocess(), &limits).unwrap();
        let alone = enc.embed(hiercon::image::stack(&[t]).view()).unwrap();
        assert_eq!(row.to_vec(), alone.row(0).to_vec(), "{}", r.item.id);
    }
}
