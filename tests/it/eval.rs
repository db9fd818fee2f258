//! Integration tests of `hiercon eval`: the real binary on a generated catalogue (report files,
//! `--index`, `--compare`) and the served path against the exact scan through the library.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use hiercon::catalogue::{Item, Role, Split, Subset};
use hiercon::encoder::{Encoder, TestEncoder};
use hiercon::eval::{self, EvalConfig, EvalReport, EvaluatedModel, Retrieval};
use hiercon::image::Limits;
use hiercon::index::build::{self, IndexConfig};
use hiercon::search::{SearchConfig, Service};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DIM: usize = 16;

/// Three leaves × 4 products × 2 variations × 2 views (view `q` = query, `g` = gallery);
/// product 3 of every leaf is in `test` (unseen). A product is a colour pair, a variation shifts
/// one channel, each view adds its own tint and noise.
fn catalogue(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut items = Vec::new();
    let mut p = 0u64;
    for leaf in ["wear/tops", "wear/shoes", "home/pots"] {
        for i in 0..4 {
            let mut rng = ChaCha8Rng::seed_from_u64(p);
            let (a, b): ([f32; 3], [f32; 3]) = (rng.random(), rng.random());
            for v in 0..2 {
                for (w, view) in ["q", "g"].into_iter().enumerate() {
                    let mut noise = ChaCha8Rng::seed_from_u64(1000 + p * 10 + v * 2 + w as u64);
                    // A per-view tint that pooling does not average away.
                    let tint: [f32; 3] = std::array::from_fn(|_| noise.random_range(-0.2..0.2));
                    let img = image::RgbImage::from_fn(16, 16, |x, _| {
                        let t = x as f32 / 15.0;
                        image::Rgb(std::array::from_fn(|c| {
                            let shift = if c == v as usize { 0.12 } else { 0.0 };
                            let val = 255.0 * (a[c] * (1.0 - t) + b[c] * t + shift + tint[c])
                                + noise.random_range(-20.0..20.0);
                            val.clamp(0.0, 255.0) as u8
                        }))
                    });
                    let id = format!("p{p}-v{v}-{view}");
                    img.save(dir.join(format!("img/{id}.png"))).unwrap();
                    items.push(Item {
                        image: format!("img/{id}.png"),
                        view: view.into(),
                        split: if i == 3 { Split::Test } else { Split::Train },
                        role: Some(if view == "q" { Role::Query } else { Role::Gallery }),
                        ..Item::new(&id, leaf, &format!("p{p}"), &format!("v{v}"))
                    });
                }
            }
            p += 1;
        }
    }
    let path = dir.join("manifest.jsonl");
    let text: String = items.iter().map(|i| serde_json::to_string(i).unwrap() + "\n").collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn hiercon() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hiercon"));
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    cmd
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn eval_writes_reports_for_seen_and_unseen_and_compares_runs() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = catalogue(dir.path());
    let run = dir.path().join("runs/test-run");
    for split in ["train", "test"] {
        let prefix = run.join(format!("eval-{split}"));
        let stdout = run_ok(
            hiercon()
                .args(["eval", "--test-encoder", &DIM.to_string(), "--split", split, "--batch-size", "5"])
                .arg("--manifest")
                .arg(&manifest)
                .arg("--report")
                .arg(&prefix),
        );
        let r = EvalReport::read(&prefix.with_extension("json")).unwrap();
        // 36 train items (9 products × 2 × 2), 12 test items; half of them queries.
        let (items, queries) = if split == "train" { (36, 18) } else { (12, 6) };
        assert_eq!((r.items, r.queries, r.gallery), (items, queries, queries), "{split}");
        assert_eq!(r.seen, split == "train");
        assert_eq!(r.protocol, eval::metrics::ProtocolKind::QueryGallery);
        let names: Vec<&str> = r.levels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["level1", "level2", "product", "variation"]);
        for l in &r.levels {
            let acc: Vec<f64> = l.top_k.iter().map(|v| v.unwrap()).collect();
            assert!(acc.windows(2).all(|w| w[0] <= w[1]) && acc.iter().all(|a| (0.0..=1.0).contains(a)), "{acc:?}");
            // Every query has its twin view in the gallery, and the gallery has < 40 items.
            assert_eq!((l.queries, acc[acc.len() - 1]), (queries, 1.0), "{}", l.name);
        }
        let md = std::fs::read_to_string(prefix.with_extension("md")).unwrap();
        assert_eq!(stdout.trim(), md.trim());
        let meaning = if split == "train" { "seen products" } else { "unseen products" };
        assert!(md.contains(meaning) && md.contains("| product |"), "{md}");
        let png = image::open(format!("{}-acc.png", prefix.display())).unwrap();
        assert_eq!((png.width(), png.height()), (960, 600));
    }
    // The trainer's model.json names the loss; --compare reads it with both evaluations.
    std::fs::write(
        run.join("model.json"),
        r#"{"format":"hiercon-model/1","arch":"t","input":{"name":"i","size":16,"mean":[0,0,0],"std":[1,1,1]},
            "output":{"name":"o","dim":16},"digest":"d","loss":"hmce"}"#,
    )
    .unwrap();
    let cmp = dir.path().join("cmp");
    let stdout = run_ok(hiercon().args(["eval", "--compare"]).arg(&run).arg("--report").arg(&cmp));
    let row = stdout.lines().find(|l| l.starts_with("| test-run | hmce |")).expect(&stdout);
    assert!(!row.contains('—'), "every cell has a value: {row}");
    assert!(cmp.with_extension("md").is_file() && cmp.with_extension("json").is_file());
    // Usage errors: no split, a run without evaluations.
    let out = hiercon().args(["eval", "--test-encoder", "8"]).arg("--manifest").arg(&manifest).output().unwrap();
    assert!(!out.status.success());
    let out = hiercon().args(["eval", "--compare"]).arg(dir.path()).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("eval-train.json"));
}

#[test]
fn served_evaluation_matches_the_exact_scan() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = catalogue(dir.path());
    let encoder: Arc<dyn Encoder> = Arc::new(TestEncoder::new(DIM, 0));
    let index = dir.path().join("index/eval");
    let mut icfg = IndexConfig::new(&manifest, &index);
    icfg.batch_size = 8;
    build::run(&icfg, encoder.as_ref()).unwrap();
    let service = Service::open(index.clone(), encoder.clone(), SearchConfig::default()).unwrap();
    let model = EvaluatedModel { digest: encoder.digest().into(), dim: DIM, ..Default::default() };
    for split in [Subset::Train, Subset::Test] {
        let cfg = EvalConfig::new(split);
        let served_data = eval::data_from_generation(&service.local().unwrap(), split).unwrap();
        let served = eval::evaluate(&served_data, Retrieval::Served(&service), &cfg, model.clone()).unwrap();
        let data = eval::embed_manifest(&manifest, split, encoder.as_ref(), 8, &Limits::default()).unwrap();
        let exact = eval::evaluate(&data, Retrieval::Exact, &cfg, model.clone()).unwrap();
        // Same items in the same order, the same embeddings: identical metrics either way.
        assert_eq!(served_data.items, data.items);
        assert_eq!(served.levels, exact.levels, "{split:?}");
        assert_eq!(served.map_product, exact.map_product);
        // The catalogue is hard enough that rankings matter: some query misses at top-1.
        let variation = served.level("variation").unwrap();
        assert!(variation.at(&served.ks, 1).unwrap() < 1.0, "{variation:?}");
        let r = served.served.as_ref().unwrap();
        assert_eq!((r.k, r.served_recall, r.approx_answers + r.exact_answers), (10, 1.0, served.queries));
        assert!(r.hnsw_recall >= 0.9, "{r:?}");
        assert_eq!(served.generation.as_deref(), Some("gen-1"));
    }
    // The same through the binary.
    let prefix = dir.path().join("served");
    let stdout = run_ok(
        hiercon()
            .args(["eval", "--test-encoder", &DIM.to_string(), "--split", "test", "--index"])
            .arg(&index)
            .arg("--report")
            .arg(&prefix),
    );
    assert!(stdout.contains("## Served index") && stdout.contains("ranked by the serving path"), "{stdout}");
    assert!(EvalReport::read(&prefix.with_extension("json")).unwrap().served.is_some());
    // An index built with another model is refused.
    let out =
        hiercon().args(["eval", "--test-encoder", "8", "--split", "test", "--index"]).arg(&index).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("digest"));
}
