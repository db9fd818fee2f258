//! The Milvus backend against a real Milvus 2.3.5 standalone server (`scripts/milvus.py`, the
//! server binary of the PyPI `milvus` wheel, in a network namespace of its own that has only a
//! loopback interface). One server per test binary; each test uses its own alias. A server that
//! cannot start fails these tests: they never skip.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use hiercon::Error;
use hiercon::catalogue::Split;
use hiercon::index::build;
use hiercon::milvus::index::{WritePath, Written};
use hiercon::milvus::{MilvusBackend, MilvusIndexConfig, index as mindex};
use hiercon::search::{Filter, GroupBy, SearchConfig, SearchRequest, Service};

use hiercon::http::load;
use serde_json::Value;

use super::http::{KEY, hit_ids, png};
use super::index::{Catalogue, DIM, draw, encoder};
use super::serve::{Server, ready_generation, spawn_serve, spawn_with, wait_for};

/// The server's address, started once for the whole test binary.
pub(crate) fn milvus() -> &'static str {
    static ADDRESS: OnceLock<String> = OnceLock::new();
    ADDRESS.get_or_init(|| {
        let data = data_dir();
        let out = Command::new(super::python())
            .arg(repo().join("scripts/milvus.py"))
            .args(["start", "--data"])
            .arg(&data)
            .args(["--watch", &std::process::id().to_string(), "--timeout", "180"])
            .output()
            .expect("the venv's python runs scripts/milvus.py");
        assert!(
            out.status.success(),
            "Milvus did not start (tests that need it fail rather than skip): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh data folder per test binary run (under target/, removed when the next run starts).
fn data_dir() -> PathBuf {
    let dir = repo().join("target/milvus-test");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(c: &Catalogue, alias: &str) -> MilvusIndexConfig {
    let mut cfg = MilvusIndexConfig::new(milvus(), alias, c.manifest());
    cfg.batch_size = 16;
    cfg
}

fn service(alias: &str) -> Service {
    let backend = MilvusBackend::new(milvus(), alias, Duration::from_secs(10)).unwrap();
    Service::open_milvus(backend, encoder(), SearchConfig::default()).unwrap()
}

/// The same catalogue indexed locally (the exact scan is the reference).
fn local(c: &Catalogue) -> Service {
    build::run(&c.config(), encoder().as_ref()).unwrap();
    Service::open(c.index_dir(), encoder(), SearchConfig::default()).unwrap()
}

fn req(k: usize, filter: Filter, group_by: Option<GroupBy>) -> SearchRequest {
    SearchRequest { k, filter, group_by, ef: None }
}

/// Ids of a response.
fn ids(r: &hiercon::search::SearchResponse) -> Vec<String> {
    r.hits.iter().map(|h| h.id.clone()).collect()
}

#[test]
fn milvus_answers_like_the_local_exact_scan_with_filters_and_grouping() {
    let c = Catalogue::new(8);
    let out = mindex::run(&config(&c, "same_answers"), encoder().as_ref()).unwrap();
    assert!(out.changed && out.previous.is_none());
    assert_eq!((out.collection.as_str(), out.count), ("same_answers_g1", c.items.len()));
    let v = out.verify.unwrap();
    assert!(v.passed && v.recall >= 0.99, "{v:?}");
    let m = service("same_answers");
    let exact = local(&c);
    let g = exact.local().unwrap();
    let exact_scan = hiercon::index::query::QueryConfig { exact_below_rows: usize::MAX, ..Default::default() };
    // Top-10 of every item against the exact scan of the same embeddings.
    let mut good = 0;
    for it in &c.items {
        let q = g.exact.vector(g.row_of(&it.id).unwrap()).to_vec();
        let want = exact.search_embedding_with(&q, &req(10, Filter::default(), None), &exact_scan).unwrap();
        let got = m.search_embedding(&q, &req(10, Filter::default(), None)).unwrap();
        assert_eq!(got.generation, "same_answers_g1");
        let kth = want.hits[9].score;
        good += got.hits.iter().filter(|h| h.score >= kth - 1e-5).count();
        assert_eq!(got.allowed, c.items.len());
        // Same fields as the local answer for the same item.
        let first = &got.hits[0];
        let local_first = want.hits.iter().find(|h| h.id == first.id).unwrap();
        assert_eq!(first, &hiercon::search::SearchHit { score: first.score, ..local_first.clone() });
    }
    let recall = good as f64 / (10 * c.items.len()) as f64;
    assert!(recall >= 0.99, "recall@10 {recall}");
    // Filters: exactly the ids the local scan allows (ask for all of them).
    let cat = |p: &str| Filter { category: Some(p.into()), ..Default::default() };
    let attr = |k: &str, v: &str| Filter { attributes: [(k.to_string(), v.to_string())].into(), ..Default::default() };
    let filters = vec![
        cat("clothing"),
        cat("clothing/tops"),
        cat("garden/pots"),
        cat("clothing/top"),
        Filter { product: Some("p5".into()), ..Default::default() },
        Filter { product: Some("p0".into()), variation: Some("v0".into()), ..Default::default() },
        Filter { variation: Some("v1".into()), split: Some(Split::Test), ..Default::default() },
        Filter { category: Some("garden".into()), ..attr("price", "36.0") },
        attr("sale", "true"),
        attr("brand", "acme"),
    ];
    for f in filters {
        for query in ["p0-v0-w0", "p30-v1-w1"] {
            let q = g.exact.vector(g.row_of(query).unwrap()).to_vec();
            let want = exact.search_embedding_with(&q, &req(c.items.len(), f.clone(), None), &exact_scan).unwrap();
            let k = want.allowed.max(1);
            let got = m.search_embedding(&q, &req(k, f.clone(), None)).unwrap();
            assert_eq!(got.allowed, want.allowed, "{f:?}");
            let want_ids: HashSet<String> = ids(&want).into_iter().collect();
            let got_ids: HashSet<String> = ids(&got).into_iter().collect();
            assert_eq!(got_ids, want_ids, "{f:?}");
            // Best first, and the same order up to equal scores.
            for (a, b) in got.hits.iter().zip(&want.hits) {
                assert!((a.score - b.score).abs() < 1e-5, "{f:?}: {} {} vs {} {}", a.id, a.score, b.id, b.score);
            }
        }
    }
    // Grouping: one hit per product / category, the best of each, best first.
    for by in [GroupBy::Product, GroupBy::Category] {
        let q = g.exact.vector(g.row_of("p1-v0-w1").unwrap()).to_vec();
        let want = exact.search_embedding_with(&q, &req(5, Filter::default(), Some(by)), &exact_scan).unwrap();
        let got = m.search_embedding(&q, &req(5, Filter::default(), Some(by))).unwrap();
        assert_eq!(got.hits.len(), 5);
        for (a, b) in got.hits.iter().zip(&want.hits) {
            assert!((a.score - b.score).abs() < 1e-5, "{by:?}: {a:?} vs {b:?}");
        }
        let keys: HashSet<String> = got
            .hits
            .iter()
            .map(|h| if by == GroupBy::Product { h.product.clone() } else { h.category.clone() })
            .collect();
        assert_eq!(keys.len(), 5, "{by:?}");
    }
    // Items, stored embeddings and images come from Milvus.
    let item = m.item("p3-v1-w0").unwrap().unwrap();
    assert_eq!(item, g.item(g.row_of("p3-v1-w0").unwrap()).clone());
    assert!(m.item("nope").unwrap().is_none());
    let v = m.item_embedding("p3-v1-w0").unwrap().unwrap();
    assert_eq!(v, g.exact.vector(g.row_of("p3-v1-w0").unwrap()));
    let (path, sha) = m.image("p3-v1-w0").unwrap().unwrap();
    assert_eq!(std::fs::canonicalize(path).unwrap(), std::fs::canonicalize(c.image_path("p3-v1-w0")).unwrap());
    assert_eq!(sha, item.sha256);
    // An image query takes the same path as locally.
    let bytes = std::fs::read(c.image_path("p3-v1-w0")).unwrap();
    assert_eq!(m.search_image(&bytes, &req(1, Filter::default(), None)).unwrap().hits[0].id, "p3-v1-w0");
    assert!(matches!(
        m.search_embedding(&[1.0; 3], &SearchRequest::default()),
        Err(Error::WrongVectorDimension { .. })
    ));
}

#[test]
fn reruns_write_nothing_when_nothing_changed_and_switch_the_alias_when_something_did() {
    let mut c = Catalogue::new(3);
    let alias = "nightly";
    let first = mindex::run(&config(&c, alias), encoder().as_ref()).unwrap();
    assert_eq!(first.embedded, c.items.len() - 1);
    // Nothing changed: nothing re-embedded, nothing written, the alias stays.
    let same = mindex::run(&config(&c, alias), encoder().as_ref()).unwrap();
    assert!(!same.changed && same.verify.is_none());
    assert_eq!((same.collection.as_str(), same.embedded, same.reused), ("nightly_g1", 0, c.items.len()));
    let m = service(alias);
    // One image redrawn and one item added: only those two are embedded, a new collection goes live.
    draw(900, 0, 1).save(c.image_path("p1-v0-w0")).unwrap();
    c.add("new-item", "garden/pots", "p99", "v0", draw(902, 0, 3), 0);
    c.write_manifest();
    let second = mindex::run(&config(&c, alias), encoder().as_ref()).unwrap();
    assert_eq!((second.collection.as_str(), second.previous.as_deref()), ("nightly_g2", Some("nightly_g1")));
    assert_eq!((second.embedded, second.reused), (2, c.items.len() - 2));
    assert!(second.dropped.is_empty(), "--keep 1 keeps the previous generation");
    // The running service follows the alias (within its refresh period) without a restart.
    let o = m.reload().unwrap();
    assert_eq!((o.previous.as_str(), o.current.as_str(), o.changed), ("nightly_g1", "nightly_g2", true));
    assert!(m.item("new-item").unwrap().is_some());
    let bytes = std::fs::read(c.image_path("p1-v0-w0")).unwrap();
    let r = m.search_image(&bytes, &req(1, Filter::default(), None)).unwrap();
    assert_eq!((r.hits[0].id.as_str(), r.generation.as_str()), ("p1-v0-w0", "nightly_g2"));
    // A third generation drops the first.
    c.add("newer-item", "garden/pots", "p98", "v0", draw(903, 0, 3), 0);
    c.write_manifest();
    let third = mindex::run(&config(&c, alias), encoder().as_ref()).unwrap();
    assert_eq!(third.dropped, vec!["nightly_g1".to_string()]);
    // Another model: everything embedded again.
    let other = hiercon::encoder::TestEncoder::new(DIM, 1);
    let fourth = mindex::run(&config(&c, alias), &other).unwrap();
    assert_eq!(fourth.embedded, c.items.len() - 1);
    // ... which the running service (this model) refuses: the old one keeps being asked for.
    assert!(matches!(m.reload(), Err(Error::ModelMismatch { .. })));
}

/// The collection behind `m` holds exactly the catalogue's items, with the embeddings and
/// records a local build of the same catalogue has, and answers top-10 like its exact scan.
fn holds_exactly(m: &Service, c: &Catalogue) {
    let exact = local(c);
    let g = exact.local().unwrap();
    assert_eq!(m.live().unwrap().count(), c.items.len());
    let exact_scan = hiercon::index::query::QueryConfig { exact_below_rows: usize::MAX, ..Default::default() };
    let mut good = 0;
    for it in &c.items {
        let row = g.row_of(&it.id).unwrap();
        assert_eq!(m.item(&it.id).unwrap().as_ref(), Some(g.item(row)), "{}", it.id);
        let q = g.exact.vector(row).to_vec();
        assert_eq!(m.item_embedding(&it.id).unwrap().unwrap(), q, "{}", it.id);
        let want = exact.search_embedding_with(&q, &req(10, Filter::default(), None), &exact_scan).unwrap();
        let got = m.search_embedding(&q, &req(10, Filter::default(), None)).unwrap();
        let kth = want.hits[9].score;
        good += got.hits.iter().filter(|h| h.score >= kth - 1e-5).count();
    }
    let recall = good as f64 / (10 * c.items.len()) as f64;
    assert!(recall >= 0.99, "recall@10 {recall}");
}

#[test]
fn a_small_change_goes_into_the_standby_and_a_large_one_into_a_new_collection() {
    let mut c = Catalogue::new(3);
    let alias = "standby";
    let cfg = |c: &Catalogue, write: WritePath| {
        let mut k = config(c, alias);
        k.standby_grace = Duration::ZERO;
        k.write = write;
        k
    };
    let run = |c: &Catalogue, write| mindex::run(&cfg(c, write), encoder().as_ref());
    let first = run(&c, WritePath::Auto).unwrap();
    assert_eq!((first.written, first.collection.as_str()), (Written::Full, "standby_g1"));
    assert!(first.why.contains("the alias is new"), "{}", first.why);
    c.add("second", "garden/pots", "p90", "v0", draw(930, 0, 3), 0);
    c.write_manifest();
    let second = run(&c, WritePath::Auto).unwrap();
    assert_eq!((second.written, second.collection.as_str()), (Written::Full, "standby_g2"));
    assert!(second.why.contains("no standby collection"), "{}", second.why);
    // A small change: one image redrawn, one item added, one removed. It goes into the standby
    // (the first generation, one change behind), which then goes live.
    let m = service(alias);
    draw(931, 1, 2).save(c.image_path("p2-v1-w0")).unwrap();
    c.add("third", "clothing/shoes", "p91", "v1", draw(932, 1, 4), 1);
    c.items.retain(|i| i.id != "p4-v0-w1");
    c.write_manifest();
    let third = run(&c, WritePath::Auto).unwrap();
    assert_eq!(third.written, Written::Delta, "{}", third.why);
    assert_eq!((third.collection.as_str(), third.previous.as_deref()), ("standby_g1", Some("standby_g2")));
    assert!(third.why.contains("applied to the standby standby_g1"), "{}", third.why);
    // Deleted: the redrawn item's old row and the removed item; inserted: the redrawn item, and
    // the two added since the first generation.
    assert_eq!((third.deleted, third.inserted, third.embedded), (2, 3, 2));
    assert!(third.dropped.is_empty(), "{:?}", third.dropped);
    let v = third.verify.as_ref().unwrap();
    assert!(v.passed && v.recall >= 0.99, "{v:?}");
    // A running service follows; the rewritten collection holds exactly the new catalogue.
    let o = m.reload().unwrap();
    assert_eq!((o.previous.as_str(), o.current.as_str()), ("standby_g2", "standby_g1"));
    holds_exactly(&m, &c);
    assert!(m.item("p4-v0-w1").unwrap().is_none());
    let bytes = std::fs::read(c.image_path("p2-v1-w0")).unwrap();
    assert_eq!(m.search_image(&bytes, &req(1, Filter::default(), None)).unwrap().hits[0].id, "p2-v1-w0");
    // Nothing changed: nothing written.
    let same = run(&c, WritePath::Auto).unwrap();
    assert_eq!((same.written, same.collection.as_str(), same.embedded), (Written::Nothing, "standby_g1", 0));
    // A large change (16 of 62 images, 52 % of the rows deleted or inserted) is a new collection;
    // --keep 1 drops standby_g2, which went live before standby_g1.
    let redraw = |c: &Catalogue, seed: u64| {
        for (n, it) in c.items.iter().filter(|i| i.id.starts_with('p')).take(16).enumerate() {
            draw(seed + n as u64, 0, 5).save(c.image_path(&it.id)).unwrap();
        }
    };
    redraw(&c, 1000);
    let fourth = run(&c, WritePath::Auto).unwrap();
    assert_eq!((fourth.written, fourth.collection.as_str()), (Written::Full, "standby_g3"), "{}", fourth.why);
    assert!(fourth.why.contains("more than the 20 %"), "{}", fourth.why);
    assert_eq!(fourth.dropped, vec!["standby_g2".to_string()]);
    // --write delta takes the standby whatever the size of the change.
    redraw(&c, 2000);
    let fifth = run(&c, WritePath::Delta).unwrap();
    assert_eq!((fifth.written, fifth.collection.as_str()), (Written::Delta, "standby_g1"));
    assert!(fifth.deleted >= 16 && fifth.inserted >= 16, "{fifth:?}");
    m.reload().unwrap();
    holds_exactly(&m, &c);
    // --write full: a new collection for the smallest change.
    c.add("fourth", "garden/tools", "p92", "v0", draw(933, 0, 1), 0);
    c.write_manifest();
    // With --keep 2 the generation live before the previous one stays: standby_g3, although its
    // number is above the previous one's (standby_g1, rewritten in place after it).
    let mut keep2 = cfg(&c, WritePath::Full);
    keep2.keep = 2;
    let sixth = mindex::run(&keep2, encoder().as_ref()).unwrap();
    assert_eq!((sixth.written, sixth.collection.as_str()), (Written::Full, "standby_g4"));
    assert!(sixth.why.contains("--write full"), "{}", sixth.why);
    assert!(sixth.dropped.is_empty(), "{:?}", sixth.dropped);
    // The standby left service a moment ago: with the default grace a change takes a new collection...
    c.add("fifth", "garden/tools", "p93", "v0", draw(934, 0, 1), 0);
    c.write_manifest();
    let seventh = mindex::run(&config(&c, alias), encoder().as_ref()).unwrap();
    assert_eq!((seventh.written, seventh.collection.as_str()), (Written::Full, "standby_g5"));
    assert!(seventh.why.contains("left service"), "{}", seventh.why);
    assert_eq!(seventh.dropped, vec!["standby_g1".to_string(), "standby_g3".to_string()]);
    // ... and --write delta says why it cannot.
    c.add("sixth", "garden/tools", "p94", "v0", draw(935, 0, 1), 0);
    c.write_manifest();
    let mut strict = config(&c, alias);
    strict.write = WritePath::Delta;
    let err = mindex::run(&strict, encoder().as_ref()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { name: "write", .. }), "{err}");
    assert!(err.to_string().contains("left service"), "{err}");
    // Another model: no standby can take the change.
    let other = hiercon::encoder::TestEncoder::new(DIM, 1);
    strict.standby_grace = Duration::ZERO;
    let err = mindex::run(&strict, &other).unwrap_err();
    assert!(err.to_string().contains("embedded with another model"), "{err}");
    assert_eq!(service(alias).live().unwrap().name(), "standby_g5");
}

/// Runs `hiercon index --milvus` on `c` into `alias` with `extra` flags, kills it (`kill -9`) as
/// soon as its log shows `phase`, and returns the log up to there.
fn kill_index_at(c: &Catalogue, alias: &str, extra: &[&str], phase: &str) -> String {
    let dim = DIM.to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hiercon"))
        .args(["index", "--milvus", milvus(), "--collection", alias, "--test-encoder", &dim])
        .args(extra)
        .arg("--manifest")
        .arg(c.manifest())
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let mut log = String::new();
    loop {
        let line = lines.next().unwrap_or_else(|| panic!("index ended before {phase:?}:\n{log}")).unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains(phase) {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    log
}

/// The collection `alias` names answers with every item it holds (`p1-v1-w0` first for its own
/// embedding); its name.
fn answers_whole(alias: &str, phase: &str) -> String {
    let m = service(alias);
    let count = m.live().unwrap().count();
    let q = m.item_embedding("p1-v1-w0").unwrap().unwrap();
    let r = m.search_embedding(&q, &req(count, Filter::default(), None)).unwrap();
    assert_eq!(r.hits.len(), count, "{phase}");
    assert_eq!(r.hits[0].id, "p1-v1-w0", "{phase}");
    m.live().unwrap().name()
}

#[test]
fn killing_a_small_change_leaves_the_alias_on_a_good_collection_and_the_next_run_repairs_the_standby() {
    let mut c = Catalogue::new(2);
    let alias = "killed_delta";
    mindex::run(&config(&c, alias), encoder().as_ref()).unwrap();
    c.add("base", "garden/pots", "p70", "v0", draw(940, 0, 1), 0);
    c.write_manifest();
    mindex::run(&config(&c, alias), encoder().as_ref()).unwrap();
    for (n, phase) in ["phase: writing collection", "phase: verification", "alias switched"].into_iter().enumerate() {
        let before = service(alias).live().unwrap().name();
        c.add(&format!("kd-{n}"), "garden/pots", &format!("p{}", 71 + n), "v0", draw(941 + n as u64, 0, 1), 0);
        c.write_manifest();
        let log = kill_index_at(&c, alias, &["--write", "delta", "--standby-grace", "0"], phase);
        assert!(log.contains("applied to the standby"), "{log}");
        let live = answers_whole(alias, phase);
        if phase == "alias switched" {
            assert_ne!(live, before);
        }
    }
    // A clean run applies the change to whatever the killed runs left in the standby.
    c.add("kd-last", "garden/pots", "p79", "v0", draw(949, 0, 1), 0);
    c.write_manifest();
    let mut k = config(&c, alias);
    k.standby_grace = Duration::ZERO;
    let ok = mindex::run(&k, encoder().as_ref()).unwrap();
    assert_eq!(ok.written, Written::Delta, "{}", ok.why);
    let m = service(alias);
    assert_eq!(m.live().unwrap().name(), ok.collection);
    holds_exactly(&m, &c);
}

#[test]
fn a_failed_verification_leaves_the_alias_where_it_was() {
    let mut c = Catalogue::new(2);
    let alias = "guarded";
    mindex::run(&config(&c, alias), encoder().as_ref()).unwrap();
    c.add("another", "garden/pots", "p77", "v0", draw(904, 0, 3), 0);
    c.write_manifest();
    let mut strict = config(&c, alias);
    strict.verify.min_recall = 1.5;
    strict.verify.max_ef = strict.ef_search;
    let err = mindex::run(&strict, encoder().as_ref()).unwrap_err();
    assert!(matches!(&err, Error::IndexVerification { generation, .. } if generation == "guarded_g2"), "{err}");
    assert!(err.to_string().contains("still names guarded_g1"), "{err}");
    let m = service(alias);
    assert_eq!(m.live().unwrap().name(), "guarded_g1");
    assert!(m.item("another").unwrap().is_none());
    // The next good run goes live and drops the failed leftover.
    let ok = mindex::run(&config(&c, alias), encoder().as_ref()).unwrap();
    assert_eq!(ok.collection, "guarded_g3");
    assert_eq!(ok.dropped, vec!["guarded_g2".to_string()]);
    // A change applied to the standby that fails verification (checked again while Milvus may be
    // settling, here for 2 s) leaves the alias too; the standby keeps the change for the next run.
    c.add("yet-another", "garden/pots", "p78", "v0", draw(905, 0, 3), 0);
    c.write_manifest();
    let mut strict = config(&c, alias);
    strict.verify.min_recall = 1.5;
    strict.verify.max_ef = strict.ef_search;
    strict.standby_grace = Duration::ZERO;
    strict.settle = Duration::from_secs(2);
    let err = mindex::run(&strict, encoder().as_ref()).unwrap_err();
    assert!(matches!(&err, Error::IndexVerification { generation, .. } if generation == "guarded_g1"), "{err}");
    assert!(err.to_string().contains("still names guarded_g3"), "{err}");
    let m = service(alias);
    assert_eq!(m.live().unwrap().name(), "guarded_g3");
    assert!(m.item("yet-another").unwrap().is_none());
    let mut k = config(&c, alias);
    k.standby_grace = Duration::ZERO;
    let ok = mindex::run(&k, encoder().as_ref()).unwrap();
    assert_eq!((ok.written, ok.collection.as_str(), ok.deleted, ok.inserted), (Written::Delta, "guarded_g1", 0, 0));
}

#[test]
fn clear_errors_for_bad_names_an_unknown_alias_and_an_unreachable_server() {
    let c = Catalogue::new(1);
    let bad = mindex::run(&config(&c, "no-dashes"), encoder().as_ref()).unwrap_err();
    assert!(matches!(bad, Error::InvalidArgument { name: "collection", .. }), "{bad}");
    let backend = MilvusBackend::new(milvus(), "never_indexed", Duration::from_secs(5)).unwrap();
    let err = Service::open_milvus(backend, encoder(), SearchConfig::default()).unwrap_err();
    assert!(err.to_string().contains("no such alias"), "{err}");
    // A port nothing listens on: unavailable, quickly, with the address in the message.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let backend = MilvusBackend::new(&addr, "x", Duration::from_millis(500)).unwrap();
    let err = backend.ping().unwrap_err();
    assert!(matches!(&err, Error::MilvusUnavailable { address, .. } if *address == addr), "{err}");
}

/// Every socket Milvus has is in its own network namespace, which has only `lo`; on this
/// machine's side only the two socat bridges listen, on 127.0.0.1.
#[test]
fn nothing_milvus_opens_leaves_loopback() {
    milvus();
    let data = repo().join("target/milvus-test");
    let pid: u32 = std::fs::read_to_string(data.join("milvus.pid")).unwrap().trim().parse().unwrap();
    let server = find_process(pid, "milvus").expect("the milvus server process");
    let dev = std::fs::read_to_string(format!("/proc/{server}/net/dev")).unwrap();
    let interfaces: Vec<&str> = dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
    assert_eq!(interfaces, vec!["lo"], "Milvus's network namespace has only loopback");
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{server}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            for addr in &cols[1..3] {
                let ip = addr.split(':').next().unwrap();
                // 127.0.0.1, 0.0.0.0, ::1, ::, ::ffff:127.0.0.1 (as /proc writes them).
                let loopback_or_any = matches!(
                    ip,
                    "0100007F"
                        | "00000000"
                        | "00000000000000000000000001000000"
                        | "00000000000000000000000000000000"
                        | "0000000000000000FFFF00000100007F"
                );
                assert!(loopback_or_any, "Milvus socket {addr} in {line}");
            }
        }
    }
    // On this machine's side: socat listens on 127.0.0.1 only.
    let ss = Command::new("ss").args(["-Htlnp"]).output().unwrap();
    for line in String::from_utf8_lossy(&ss.stdout).lines().filter(|l| l.contains("socat")) {
        assert!(line.contains("127.0.0.1:"), "{line}");
    }
}

/// The pid of a descendant of `root` whose command name is `name`.
fn find_process(root: u32, name: &str) -> Option<u32> {
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        if std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == name) {
            return Some(p);
        }
        let children = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        frontier.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
    }
    None
}

fn serve_milvus(address: &str, alias: &str, extra: &[&str]) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hiercon"));
    let dim = DIM.to_string();
    cmd.args(["serve", "--port", "0", "--milvus", address, "--collection", alias, "--test-encoder", &dim])
        .args(extra)
        .env("HIERCON_API_KEY", KEY);
    spawn_with(cmd)
}

fn get(addr: std::net::SocketAddr, path: &str) -> load::Response {
    load::request(addr, "GET", path, &[], b"").unwrap()
}

fn search_http(addr: std::net::SocketAddr, query: &str, image: &[u8]) -> load::Response {
    load::request(addr, "POST", &format!("/v1/search?{query}"), &[("Content-Type", "image/png")], image).unwrap()
}

fn json(r: &load::Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)))
}

/// (id, score) of each hit.
fn scored(j: &Value) -> Vec<(String, f64)> {
    j["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["id"].as_str().unwrap().to_string(), h["score"].as_f64().unwrap()))
        .collect()
}

/// The real `serve` over Milvus gives the HTTP answers the local index gives (same JSON up to the
/// generation's name), and follows an alias switch made during a c = 8 load with no error, every
/// answer coming from the old or the new generation.
#[test]
fn the_binary_serves_from_milvus_like_the_local_index_and_follows_a_switch_under_load() {
    let mut c = Catalogue::new(4);
    let alias = "served";
    mindex::run(&config(&c, alias), encoder().as_ref()).unwrap();
    build::run(&c.config(), encoder().as_ref()).unwrap();
    let dim = DIM.to_string();
    let local = spawn_serve(&c.index_dir(), &["--test-encoder", &dim]);
    let remote = serve_milvus(milvus(), alias, &[]);
    wait_for("both servers ready", || {
        ready_generation(local.addr).is_some() && ready_generation(remote.addr).as_deref() == Some("served_g1")
    });
    for query in ["k=5", "k=5&category=clothing", "k=3&group_by=product", "k=4&attr.brand=acme", "k=20&product=p2"] {
        for id in ["p1-v0-w0", "p11-v1-w1"] {
            let image = png(&c, id);
            let (a, b) = (search_http(local.addr, query, &image), search_http(remote.addr, query, &image));
            assert_eq!((a.status, b.status), (200, 200), "{query}");
            let (a, b) = (json(&a), json(&b));
            let (sa, sb) = (scored(&a), scored(&b));
            assert_eq!(sa.len(), sb.len(), "{query}");
            for ((ia, xa), (ib, xb)) in sa.iter().zip(&sb) {
                assert!(
                    (xa - xb).abs() < 1e-5 && (ia == ib || (xa - xb).abs() < 1e-6),
                    "{query}: {ia} {xa} vs {ib} {xb}"
                );
            }
            assert_eq!(a["allowed"], b["allowed"], "{query}");
            assert_eq!(a["predicted"]["category"], b["predicted"]["category"], "{query}");
            assert_eq!(b["generation"], "served_g1");
        }
    }
    // The catalogue endpoints.
    let (ta, tb) = (json(&get(local.addr, "/v1/taxonomy")), json(&get(remote.addr, "/v1/taxonomy")));
    assert_eq!((&ta["roots"], &ta["items"]), (&tb["roots"], &tb["items"]));
    let (ea, eb) = (json(&get(local.addr, "/v1/examples")), json(&get(remote.addr, "/v1/examples")));
    assert_eq!(ea["items"], eb["items"]);
    let (mut ia, mut ib) =
        (json(&get(local.addr, "/v1/items/p3-v1-w0")), json(&get(remote.addr, "/v1/items/p3-v1-w0")));
    assert_eq!(ib["generation"], "served_g1");
    ia["generation"] = Value::Null;
    ib["generation"] = Value::Null;
    assert_eq!(ia, ib);
    let (ga, gb) = (get(local.addr, "/v1/images/p3-v1-w0"), get(remote.addr, "/v1/images/p3-v1-w0"));
    assert_eq!((ga.status, gb.status), (200, 200));
    assert_eq!(ga.body, gb.body);
    let sim = |addr| json(&load::request(addr, "POST", "/v1/search/similar/p3-v1-w0?k=3", &[], b"").unwrap());
    assert_eq!(scored(&sim(local.addr)).into_iter().map(|h| h.0).collect::<Vec<_>>(), hit_ids(&sim(remote.addr)));
    // Unknown values: the same statuses and codes.
    for (query, status, code) in [
        ("product=nope", 404, "unknown_product"),
        ("variation=nope", 404, "unknown_variation"),
        ("category=nope", 404, "unknown_category"),
        ("attr.colour=red", 400, "invalid_parameter"),
        ("exact=true", 400, "invalid_parameter"),
    ] {
        let r = search_http(remote.addr, query, &png(&c, "p1-v0-w0"));
        assert_eq!((r.status, json(&r)["error"]["code"].as_str().unwrap()), (status, code), "{query}");
        if query != "exact=true" {
            assert_eq!(search_http(local.addr, query, &png(&c, "p1-v0-w0")).status, status, "{query}");
        }
    }
    assert_eq!(get(remote.addr, "/v1/items/nope").status, 404);

    // Switch the alias under load: one item removed, one added.
    let before: HashSet<String> = c.items.iter().map(|i| i.id.clone()).collect();
    c.items.retain(|i| i.id != "p2-v1-w1");
    c.add("fresh-item", "garden/pots", "p90", "v0", draw(905, 0, 1), 0);
    c.write_manifest();
    let after: HashSet<String> = c.items.iter().map(|i| i.id.clone()).collect();
    let images: Vec<Vec<u8>> = ["p2-v1-w1", "fresh-item", "p0-v0-w0", "p5-v1-w0"]
        .iter()
        .map(|id| std::fs::read(c.dir.path().join(format!("img/{id}.png"))).unwrap())
        .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let addr = remote.addr;
    let (answers, switched) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let (images, stop, before, after) = (&images, &stop, &before, &after);
                s.spawn(move || {
                    let mut seen = (0usize, 0usize);
                    let mut i = w;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let r = search_http(addr, "k=10", &images[i % images.len()]);
                        i += 1;
                        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                        let j = json(&r);
                        let ids: Vec<String> = hit_ids(&j);
                        match j["generation"].as_str().unwrap() {
                            "served_g1" => {
                                assert!(ids.iter().all(|id| before.contains(id)), "{ids:?}");
                                seen.0 += 1;
                            }
                            "served_g2" => {
                                assert!(ids.iter().all(|id| after.contains(id)), "{ids:?}");
                                seen.1 += 1;
                            }
                            other => panic!("answer from {other}"),
                        }
                    }
                    seen
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let out = mindex::run(&config(&c, alias), encoder().as_ref()).unwrap();
        // Keep the load on until the servers' refresh period has passed.
        std::thread::sleep(hiercon::milvus::backend::REFRESH + Duration::from_secs(1));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = workers.into_iter().map(|w| w.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        (seen, out.collection)
    });
    assert_eq!(switched, "served_g2");
    assert!(answers.0 > 0 && answers.1 > 0, "answers from the old and the new generation: {answers:?}");
    assert_eq!(ready_generation(remote.addr).as_deref(), Some("served_g2"));
}

/// Milvus stopped: 503 with a retry hint and /readyz false, quickly; Milvus back: answers again,
/// the serve process untouched. (Its own Milvus server, so the other tests keep theirs.)
#[test]
fn milvus_down_gives_503_and_serve_answers_again_when_it_is_back() {
    let data = repo().join("target/milvus-test-restart");
    let _ = std::fs::remove_dir_all(&data);
    let script = repo().join("scripts/milvus.py");
    let ctl = |cmd: &str| {
        let out = Command::new(super::python())
            .arg(&script)
            .args([cmd, "--data"])
            .arg(&data)
            .args(["--watch", &std::process::id().to_string(), "--timeout", "180"])
            .output()
            .unwrap();
        assert!(out.status.success(), "milvus {cmd}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let address = ctl("start");
    let c = Catalogue::new(1);
    let mut cfg = config(&c, "restarts");
    cfg.address = address.clone();
    mindex::run(&cfg, encoder().as_ref()).unwrap();
    let s = serve_milvus(&address, "restarts", &["--milvus-timeout-ms", "1000"]);
    wait_for("ready", || ready_generation(s.addr).is_some());
    let image = png(&c, "p1-v0-w0");
    assert_eq!(search_http(s.addr, "k=3", &image).status, 200);
    ctl("stop");
    let r = search_http(s.addr, "k=3", &image);
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    let code = json(&r)["error"]["code"].as_str().unwrap().to_string();
    assert!(code == "backend_unavailable" || code == "backend_error", "{code}");
    assert!(r.headers.iter().any(|(k, _)| k == "retry-after"));
    assert_eq!(get(s.addr, "/readyz").status, 503);
    assert_eq!(get(s.addr, "/healthz").status, 200, "the process itself is alive");
    assert_eq!(get(s.addr, "/v1/items/p1-v0-w0").status, 503);
    assert_eq!(ctl("start"), address, "same address after a restart");
    let t = std::time::Instant::now();
    while search_http(s.addr, "k=3", &image).status != 200 {
        assert!(t.elapsed() < Duration::from_secs(120), "serve did not answer again after Milvus came back");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(get(s.addr, "/readyz").status, 200);
    ctl("stop");
}

/// `kill -9` of `hiercon index --milvus` in each phase: the alias keeps naming a good
/// collection (the old one before the switch, the new one after), and the next run cleans up.
#[test]
fn killing_index_in_any_phase_leaves_the_alias_on_a_good_collection() {
    let mut c = Catalogue::new(2);
    let alias = "killed";
    mindex::run(&config(&c, alias), encoder().as_ref()).unwrap();
    for (n, (phase, switched)) in [
        ("phase: embedding", false),
        ("phase: writing collection", false),
        ("phase: HNSW index", false),
        ("phase: verification", false),
        ("alias switched", true),
    ]
    .into_iter()
    .enumerate()
    {
        let before = service(alias).live().unwrap().name();
        c.add(&format!("kill-{n}"), "garden/pots", &format!("p{}", 80 + n), "v0", draw(910 + n as u64, 0, 1), 0);
        c.write_manifest();
        kill_index_at(&c, alias, &[], phase);
        // Before the switch the kill may land a moment late (these runs take a second or two),
        // so the alias names the old collection or, if the run got that far, the new one.
        // Whatever it names answers, with every item it should hold.
        let live = answers_whole(alias, phase);
        if switched {
            assert_ne!(live, before, "{phase}");
        }
    }
    // A clean run goes live and drops what the killed ones left.
    c.add("kill-last", "garden/pots", "p89", "v0", draw(920, 0, 1), 0);
    c.write_manifest();
    let ok = mindex::run(&config(&c, alias), encoder().as_ref()).unwrap();
    let m = service(alias);
    assert_eq!(m.live().unwrap().name(), ok.collection);
    assert_eq!(m.live().unwrap().count(), c.items.len());
    let client = hiercon::milvus::Client::new(milvus(), Duration::from_secs(10)).unwrap();
    let left: Vec<String> = client.collections().unwrap().into_iter().filter(|n| n.starts_with("killed_g")).collect();
    assert_eq!(left.len(), 2, "the live generation and the one before it: {left:?}");
}

/// `eval` through Milvus gives the metrics the exact scan of the same embeddings gives.
#[test]
fn eval_through_milvus_matches_the_exact_scan() {
    use hiercon::catalogue::Subset;
    use hiercon::eval::{self, EvalConfig, EvaluatedModel, Retrieval};
    let c = Catalogue::new(6);
    let alias = "evaluated";
    mindex::run(&config(&c, alias), encoder().as_ref()).unwrap();
    let backend = MilvusBackend::new(milvus(), alias, Duration::from_secs(30)).unwrap();
    let e = encoder();
    let model = EvaluatedModel { digest: e.digest().into(), dim: DIM, ..Default::default() };
    for split in [Subset::Train, Subset::Test] {
        let cfg = EvalConfig::new(split);
        let data = eval::data_from_milvus(&backend, split).unwrap();
        let local = eval::embed_manifest(&c.manifest(), split, e.as_ref(), 8, &Default::default()).unwrap();
        assert_eq!(data.items, local.items, "{split:?}: the split's items in manifest order");
        assert_eq!(data.embeddings, local.embeddings);
        let served = service(alias);
        let got = eval::evaluate(&data, Retrieval::Served(&served), &cfg, model.clone()).unwrap();
        let want = eval::evaluate(&local, Retrieval::Exact, &cfg, model.clone()).unwrap();
        assert_eq!(got.levels, want.levels, "{split:?}");
        let r = got.served.as_ref().unwrap();
        assert!(r.served_recall >= 0.99, "{r:?}");
        assert_eq!(got.generation.as_deref(), Some("evaluated_g1"));
    }
    assert!(eval::data_from_milvus(&backend, Subset::Val).is_err());
}
