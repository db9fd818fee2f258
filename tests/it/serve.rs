//! `hiercon serve` as a real process on a loopback port: polling, SIGHUP, graceful shutdown, the
//! ONNX Runtime encoder the index records, and the page in headless Chromium.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hiercon::http::load::{self, multipart};
use hiercon::index::build;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::http::{KEY, corrupt_generation, hit_ids, next_generation, png};
use crate::index::{Catalogue, DIM, encoder};

/// `hiercon serve` on a free loopback port; killed on drop.
pub(crate) struct Server {
    child: Child,
    pub(crate) addr: std::net::SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(index: &Path, extra: &[&str]) -> Server {
    let dim = DIM.to_string();
    let mut args = vec!["--test-encoder", dim.as_str()];
    args.extend_from_slice(extra);
    spawn_serve(index, &args)
}

/// `hiercon serve --port 0 --index INDEX ARGS` (admin key set), once it printed its address.
pub(crate) fn spawn_serve(index: &Path, args: &[&str]) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hiercon"));
    cmd.args(["serve", "--port", "0", "--index"]).arg(index).args(args).env("HIERCON_API_KEY", KEY);
    spawn_with(cmd)
}

/// Starts a `hiercon serve` command (which must pass `--port 0`) and waits for its address.
pub(crate) fn spawn_with(mut cmd: Command) -> Server {
    let mut child = cmd.env("RUST_LOG", "warn").stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    Server { child, addr }
}

pub(crate) fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn ready_generation(addr: std::net::SocketAddr) -> Option<String> {
    let r = load::request(addr, "GET", "/readyz", &[], b"").ok()?;
    let j: Value = serde_json::from_slice(&r.body).ok()?;
    j["generation"].as_str().map(String::from)
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
}

/// The real binary on a loopback port: starts before any generation exists, becomes ready when
/// the poll sees one, answers searches, picks up the next generation, refuses a broken one on
/// SIGHUP while the old one keeps serving, and exits cleanly on SIGTERM.
#[test]
fn the_binary_serves_polls_reloads_on_sighup_and_stops_gracefully() {
    let mut c = Catalogue::new(2);
    let mut server = spawn_server(&c.index_dir(), &["--poll-secs", "0.1"]);
    let addr = server.addr;
    let h = load::request(addr, "GET", "/healthz", &[], b"").unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(load::request(addr, "GET", "/readyz", &[], b"").unwrap().status, 503);

    build::run(&c.config(), encoder().as_ref()).unwrap();
    wait_for("gen-1", || ready_generation(addr).as_deref() == Some("gen-1"));
    let id = "p3-v1-w1";
    let r = load::request(addr, "POST", "/v1/search?k=3", &[("Content-Type", "image/png")], &png(&c, id)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(hit_ids(&j)[0], id);
    let (ct, body) = multipart("image", "q.png", "image/png", &png(&c, id));
    let r = load::request(addr, "POST", "/v1/search?k=1", &[("Content-Type", &ct)], &body).unwrap();
    assert_eq!(hit_ids(&serde_json::from_slice(&r.body).unwrap())[0], id);
    let bad = load::request(addr, "POST", "/v1/search", &[("Content-Type", "image/png")], b"nope").unwrap();
    assert_eq!(bad.status, 415);

    // Keep-alive: many requests on one connection while the next generation lands.
    let mut conn = load::Conn::connect(addr, Duration::from_secs(10)).unwrap();
    next_generation(&mut c, 901);
    let mut seen = std::collections::HashSet::new();
    let t = Instant::now();
    while !seen.contains("gen-2") {
        assert!(t.elapsed() < Duration::from_secs(20), "the poll never picked up gen-2");
        let r = conn.request("POST", "/v1/search?k=1", &[("Content-Type", "image/png")], &png(&c, id)).unwrap();
        assert_eq!(r.status, 200, "no request fails during a swap: {}", r.text());
        let j: Value = serde_json::from_slice(&r.body).unwrap();
        seen.insert(j["generation"].as_str().unwrap().to_string());
    }

    // A broken generation: the poll refuses it once; SIGHUP forces another try, refused again.
    let metric = |name: &str| -> f64 {
        let m = load::request(addr, "GET", "/metrics", &[], b"").unwrap().text();
        m.lines().find_map(|l| l.strip_prefix(name)).map_or(0.0, |v| v.trim().parse().unwrap())
    };
    assert_eq!(
        metric("hiercon_index_reloads_total{outcome=\"refused\"}"),
        0.0,
        "waiting for a first index is no refusal"
    );
    corrupt_generation(&c.index_dir());
    wait_for("the poll to refuse the broken generation", || {
        metric("hiercon_index_reloads_total{outcome=\"refused\"}") >= 1.0
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(metric("hiercon_index_reloads_total{outcome=\"refused\"}"), 1.0, "the poll does not retry it");
    signal(&server.child, "HUP");
    wait_for("SIGHUP to retry", || metric("hiercon_index_reloads_total{outcome=\"refused\"}") >= 2.0);
    assert_eq!(ready_generation(addr).as_deref(), Some("gen-2"));
    let r = conn.request("POST", "/v1/search?k=1", &[("Content-Type", "image/png")], &png(&c, id)).unwrap();
    assert_eq!(r.status, 200);

    drop(conn);
    signal(&server.child, "TERM");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no graceful exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(std::net::TcpStream::connect(addr).is_err(), "the port is closed after shutdown");
}

/// Runs the `hiercon` binary to completion; its stderr on failure.
fn hiercon(args: &[&std::ffi::OsStr]) {
    let out = Command::new(env!("CARGO_BIN_EXE_hiercon")).args(args).env("RUST_LOG", "warn").output().unwrap();
    assert!(out.status.success(), "hiercon {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The page in headless Chromium, end to end from a shop's CSV: images + a CSV with `title` and
/// `attr.*` columns -> `hiercon data folder` -> `hiercon index` -> `hiercon serve` -> the page
/// (web/tests/page.mjs): an example clicked, an upload found first with its title, the category
/// tree, the predicted category's link, an attribute filter, grouping, a result clicked. Needs
/// `/usr/bin/chromium` and `make browser-deps` (playwright-core in web/tests/node_modules);
/// `make test` runs it (`make browser-test`). The screenshot is `target/browser/page.png`.
#[test]
#[ignore = "needs chromium and playwright-core: run by `make browser-test` (part of `make test`)"]
fn browser_page_end_to_end() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tests = root.join("web/tests");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).exists(), "{chromium} missing: apt-get install chromium");
    assert!(tests.join("node_modules/playwright-core").is_dir(), "playwright-core missing: make browser-deps");
    let c = Catalogue::new(3);
    let csv = c.dir.path().join("shop.csv");
    let mut text = String::from("image,category,product,variation,view,title,attr.brand,attr.price,attr.sale\n");
    for it in &c.items {
        let a = &it.attributes;
        let title = it.title.as_deref().unwrap_or_default();
        text += &format!(
            "{},{},{},{},{},{title},{},{},{}\n",
            it.image, it.category, it.product, it.variation, it.view, a["brand"], a["price"], a["sale"]
        );
    }
    std::fs::write(&csv, text).unwrap();
    let (folder, index) = (c.dir.path().join("shop"), c.dir.path().join("index/shop"));
    hiercon(&["data".as_ref(), "folder".as_ref(), "--csv".as_ref(), csv.as_ref(), "--out".as_ref(), folder.as_ref()]);
    let manifest = folder.join("manifest.jsonl");
    let dim = DIM.to_string();
    hiercon(&[
        "index".as_ref(),
        "--test-encoder".as_ref(),
        dim.as_ref(),
        "--manifest".as_ref(),
        manifest.as_ref(),
        "--out".as_ref(),
        index.as_ref(),
    ]);
    let imported = hiercon::catalogue::Manifest::read(&manifest).unwrap();
    let it = imported.get("img/p9-v1-w1.png").expect("the CSV's item, id = its image path");
    assert_eq!(it.attributes["price"].to_string(), "9", "a numeric cell is a number");
    let server = spawn_server(&index, &["--poll-secs", "0"]);
    let shots = root.join("target/browser");
    std::fs::create_dir_all(&shots).unwrap();
    let screenshot = shots.join("page.png");
    let out = Command::new("node")
        .arg(tests.join("page.mjs"))
        .env("CHROMIUM", &chromium)
        .env("HIERCON_URL", format!("http://{}/", server.addr))
        .env("HIERCON_IMAGE", c.image_path("p9-v1-w1"))
        .env("HIERCON_EXPECT_ID", &it.id)
        .env("HIERCON_EXPECT_TITLE", it.title.as_deref().unwrap())
        .env("HIERCON_EXPECT_CATEGORY", &it.category)
        .env("HIERCON_ATTRIBUTE", format!("brand={}", it.attributes["brand"]))
        .env("HIERCON_SCREENSHOT", &screenshot)
        .output()
        .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{log}");
    assert!(out.status.success(), "browser test failed:\n{log}");
    assert!(log.contains("page test passed") && log.contains("first result is the item"), "{log}");
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "no screenshot at {}", screenshot.display());
    println!("screenshot of the page: {} ({} bytes)", screenshot.display(), png.len());
}

/// One schemathesis run against `server` with every check (all are on by default;
/// `tests/contract/schemathesis.toml` names the one exclusion and why). Returns its output.
fn schemathesis(root: &Path, schemathesis: &str, server: &Server, extra: &[&str]) -> String {
    let out = Command::new(schemathesis)
        .args(["--config-file"])
        .arg(root.join("tests/contract/schemathesis.toml"))
        .args(["run", "--workers", "1", "--request-timeout", "20"])
        .args(extra)
        .arg(format!("http://{}/openapi.json", server.addr))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{log}");
    assert!(out.status.success(), "schemathesis found contract failures (see above)");
    log
}

/// The API contract: schemathesis (`make schemathesis-deps`, pinned in tests/contract) runs every
/// check against the server's own `/openapi.json` over the emoji catalogue indexed with the
/// shipped model (`HIERCON_CONTRACT_INDEX`, built by `make contract-test`): once with an admin key (its requests carry it; `ignored_auth` drops it), once
/// without (the document then promises 403 and no security). Also checks the emoji titles and
/// skin-tone names end to end. Run by `make contract-test` (part of `make test`).
#[test]
#[ignore = "needs schemathesis (make schemathesis-deps) and the emoji data: run by `make contract-test`"]
fn contract_schemathesis_against_the_emoji_index() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let st = std::env::var("SCHEMATHESIS").expect("SCHEMATHESIS names the schemathesis executable");
    let index = std::env::var_os("HIERCON_CONTRACT_INDEX").expect("HIERCON_CONTRACT_INDEX names the emoji index");
    let data = std::env::var_os("HIERCON_TEST_DATA").expect("HIERCON_TEST_DATA names the data folder (make data)");
    let index = Path::new(&index);
    let server = spawn_serve(index, &["--poll-secs", "0"]);
    let shoe = std::fs::read(Path::new(&data).join("emoji/images/1f45f-google.png")).unwrap();
    let r = load::request(server.addr, "POST", "/v1/search?k=3", &[("Content-Type", "image/png")], &shoe).unwrap();
    let j: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (j["hits"][0]["id"].as_str(), j["hits"][0]["title"].as_str()),
        (Some("google:1F45F"), Some("athletic shoe")),
        "{j}"
    );
    let wave = load::request(server.addr, "GET", "/v1/items/google:1F44B-1F3FD", &[], b"").unwrap();
    let wave: Value = serde_json::from_slice(&wave.body).unwrap();
    assert_eq!(
        (wave["title"].as_str(), wave["variation"].as_str()),
        (Some("waving hand sign"), Some("medium skin tone")),
        "{wave}"
    );
    let with_key = schemathesis(root, &st, &server, &["--header", &format!("Authorization: Bearer {KEY}")]);
    drop(server);
    let mut no_key = Command::new(env!("CARGO_BIN_EXE_hiercon"));
    no_key.args(["serve", "--port", "0", "--poll-secs", "0", "--index"]).arg(index).env_remove("HIERCON_API_KEY");
    let server = spawn_with(no_key);
    let without_key = schemathesis(root, &st, &server, &[]);
    for log in [with_key, without_key] {
        let summary = log.lines().rev().find(|l| l.contains("generated")).unwrap_or_default().to_string();
        println!("schemathesis: {}", summary.trim());
    }
}

// --- the real ONNX Runtime encoder ------------------------------------------------------------

/// An ONNX model with a dynamic batch: images [n,3,16,16] -> AveragePool 4x4 (stride 4) ->
/// Flatten (48 features) -> MatMul (48 x dim): a pooled random projection, like the test encoder.
fn write_pooled_model(dir: &Path, dim: usize) -> std::path::PathBuf {
    use hiercon::encoder::{InputMeta, MODEL_FORMAT, ModelMeta, OutputMeta};
    use hiercon::graph::proto::attribute_proto::AttributeType;
    use hiercon::graph::proto::{
        AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto,
        TypeProto, ValueInfoProto, tensor_shape_proto, type_proto,
    };
    use prost::Message;
    let value_info = |name: &str, dims: &[Option<i64>]| ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| tensor_shape_proto::Dimension {
                            value: Some(match d {
                                Some(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                                None => tensor_shape_proto::dimension::Value::DimParam("batch".into()),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let ints = |name: &str, v: &[i64]| AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(AttributeType::Ints as i32),
        ..Default::default()
    };
    let node = |op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>| NodeProto {
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: Some(format!("{op}_{output}")),
        attribute,
        ..Default::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let w: Vec<f32> = (0..48 * dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let graph = GraphProto {
        name: Some("pooled".into()),
        node: vec![
            node("AveragePool", &["images"], "pooled", vec![ints("kernel_shape", &[4, 4]), ints("strides", &[4, 4])]),
            node("Flatten", &["pooled"], "flat", vec![]),
            node("MatMul", &["flat", "w"], "embeddings", vec![]),
        ],
        initializer: vec![TensorProto {
            name: Some("w".into()),
            dims: vec![48, dim as i64],
            data_type: Some(1),
            float_data: w,
            ..Default::default()
        }],
        input: vec![value_info("images", &[None, Some(3), Some(16), Some(16)])],
        output: vec![value_info("embeddings", &[None, Some(dim as i64)])],
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        graph: Some(graph),
        ..Default::default()
    };
    let path = dir.join("pooled.onnx");
    let bytes = model.encode_to_vec();
    std::fs::write(&path, &bytes).unwrap();
    let digest = hiercon::model::model_digest(&path, &bytes).unwrap();
    let meta = ModelMeta {
        format: MODEL_FORMAT.into(),
        arch: "pooled-projection".into(),
        input: InputMeta { name: "images".into(), size: 16, mean: [0.5; 3], std: [0.25; 3] },
        output: OutputMeta { name: "embeddings".into(), dim },
        digest,
        extra: Default::default(),
    };
    meta.write(&ModelMeta::path_for(&path)).unwrap();
    path
}

/// `hiercon index --model` records the model; `hiercon serve` without `--model` loads it from the
/// generation and answers through ONNX Runtime.
#[test]
fn the_binary_serves_with_the_onnx_model_the_index_records() {
    hiercon::runtime::init().expect("ONNX Runtime (make ort)");
    let c = Catalogue::new(2);
    let model = write_pooled_model(c.dir.path(), 24);
    let out = Command::new(env!("CARGO_BIN_EXE_hiercon"))
        .args(["index", "--batch-size", "8", "--manifest"])
        .arg(c.manifest())
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(c.index_dir())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let server = spawn_serve(&c.index_dir(), &["--poll-secs", "0"]);
    let ready: Value =
        serde_json::from_slice(&load::request(server.addr, "GET", "/readyz", &[], b"").unwrap().body).unwrap();
    let meta = hiercon::encoder::ModelMeta::read(&hiercon::encoder::ModelMeta::path_for(&model)).unwrap();
    assert_eq!(ready["model_digest"].as_str(), Some(meta.digest.as_str()));
    for id in ["p1-v0-w1", "p6-v1-w0"] {
        let r = load::request(server.addr, "POST", "/v1/search?k=3", &[("Content-Type", "image/png")], &png(&c, id))
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let j: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(hit_ids(&j)[0], id);
        assert!((j["hits"][0]["score"].as_f64().unwrap() - 1.0).abs() < 1e-4);
    }
}
