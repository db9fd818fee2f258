//! A seeded mutational fuzz harness (no coverage feedback: stable Rust, no sanitizers) for the
//! three places hiercon reads untrusted bytes: the image decoder, the manifest reader and the
//! upload handler (`POST /v1/search`, raw and multipart bodies, through the real router).
//!
//! Each input is a corpus seed (`fuzz/corpus/<target>/`) put through a havoc mutator — bit
//! flips, random and "interesting" bytes, truncation, duplicated and deleted runs, splices of two
//! seeds — from a `ChaCha8Rng` seeded per run, so a run is reproducible from its seed and input
//! index. An input that panics (or, for uploads, gets a 5xx or a malformed error body) is saved
//! to `fuzz/crashes/<target>-<seed>-<index>` and counted. Shared by `examples/fuzz.rs` (the
//! campaign) and `tests/it/fuzz.rs` (a short run inside `make test`).

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use http_body_util::BodyExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tower::ServiceExt;

/// What a run found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub target: String,
    pub seed: u64,
    pub inputs: u64,
    pub seconds: f64,
    /// Inputs that panicked (the decoder's own panic guard included: "decoder panicked").
    pub panics: u64,
    /// Uploads answered with a 5xx, or with an error body that is not `{"error": {code, message}}`.
    pub bad_answers: u64,
    /// How inputs ended: `ok`, an error kind, or an HTTP status with its error code.
    pub outcomes: BTreeMap<String, u64>,
    /// Files of the inputs that failed.
    pub saved: Vec<PathBuf>,
}

impl Report {
    fn count(&mut self, outcome: String) {
        *self.outcomes.entry(outcome).or_default() += 1;
    }

    pub fn clean(&self) -> bool {
        self.panics == 0 && self.bad_answers == 0
    }
}

/// The seed files of a corpus directory, sorted by name.
pub fn corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

const INTERESTING: [u8; 10] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0xfe, b'\n', b'"', b'{', b'-'];

/// The havoc mutator.
pub struct Mutator {
    rng: ChaCha8Rng,
}

impl Mutator {
    pub fn new(seed: u64) -> Mutator {
        Mutator { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// One mutated input from the corpus (at most `max_len` bytes).
    pub fn input(&mut self, corpus: &[Vec<u8>], max_len: usize) -> Vec<u8> {
        let r = &mut self.rng;
        let mut b = corpus[r.random_range(0..corpus.len())].clone();
        let rounds = 1 << r.random_range(0..5);
        for _ in 0..rounds {
            match r.random_range(0..9) {
                0 if !b.is_empty() => {
                    let i = r.random_range(0..b.len());
                    b[i] ^= 1 << r.random_range(0..8);
                }
                1 if !b.is_empty() => {
                    let i = r.random_range(0..b.len());
                    b[i] = r.random();
                }
                2 if !b.is_empty() => {
                    let i = r.random_range(0..b.len());
                    b[i] = INTERESTING[r.random_range(0..INTERESTING.len())];
                }
                3 if !b.is_empty() => {
                    let at = r.random_range(0..b.len());
                    b.truncate(at);
                }
                4 if !b.is_empty() => {
                    // Delete a run.
                    let at = r.random_range(0..b.len());
                    let n = r.random_range(1..=(b.len() - at).min(64));
                    b.drain(at..at + n);
                }
                5 if !b.is_empty() => {
                    // Duplicate a run in place.
                    let at = r.random_range(0..b.len());
                    let n = r.random_range(1..=(b.len() - at).min(64));
                    let run: Vec<u8> = b[at..at + n].to_vec();
                    b.splice(at..at, run);
                }
                6 => {
                    // Insert random bytes.
                    let at = if b.is_empty() { 0 } else { r.random_range(0..=b.len()) };
                    let n = r.random_range(1..32);
                    let bytes: Vec<u8> = (0..n).map(|_| r.random()).collect();
                    b.splice(at..at, bytes);
                }
                7 => {
                    // Splice with another seed.
                    let other = &corpus[r.random_range(0..corpus.len())];
                    if !other.is_empty() {
                        let at = r.random_range(0..=b.len());
                        let from = r.random_range(0..other.len());
                        b.truncate(at);
                        b.extend_from_slice(&other[from..]);
                    }
                }
                _ if b.len() >= 4 => {
                    // A 32-bit field set to a boundary value (lengths, dimensions, counts).
                    let at = r.random_range(0..=b.len() - 4);
                    let v: u32 = [0, 1, 0x7fff_ffff, 0xffff_ffff, 0x8000_0000, 65_535][r.random_range(0..6)];
                    let bytes = if r.random_bool(0.5) { v.to_be_bytes() } else { v.to_le_bytes() };
                    b[at..at + 4].copy_from_slice(&bytes);
                }
                _ => {}
            }
        }
        b.truncate(max_len);
        b
    }
}

fn save(report: &mut Report, dir: &Path, index: u64, input: &[u8]) {
    let _ = std::fs::create_dir_all(dir);
    let p = dir.join(format!("{}-{}-{index}", report.target, report.seed));
    if std::fs::write(&p, input).is_ok() && report.saved.len() < 100 {
        report.saved.push(p);
    }
}

/// The kind of a library error (its variant name), for the outcome table.
fn kind(e: &hiercon::Error) -> String {
    let d = format!("{e:?}");
    d.split([' ', '{', '(']).next().unwrap_or("?").to_string()
}

/// `hiercon::image::decode` on `inputs` mutated images (small pixel limit, as the server's).
pub fn decode(corpus: &[Vec<u8>], inputs: u64, seed: u64, crashes: &Path) -> Report {
    let limits = hiercon::image::Limits { max_pixels: 4_000_000, ..Default::default() };
    let mut m = Mutator::new(seed);
    let mut report = Report { target: "decode".into(), seed, ..Default::default() };
    let t = Instant::now();
    for i in 0..inputs {
        let b = m.input(corpus, 1 << 20);
        match catch_unwind(AssertUnwindSafe(|| hiercon::image::decode(&b, &limits))) {
            Ok(Ok(_)) => report.count("ok".into()),
            Ok(Err(e)) if e.to_string().contains("decoder panicked") => {
                report.panics += 1;
                save(&mut report, crashes, i, &b);
                report.count("caught decoder panic".into());
            }
            Ok(Err(e)) => report.count(kind(&e)),
            Err(_) => {
                report.panics += 1;
                save(&mut report, crashes, i, &b);
            }
        }
    }
    report.inputs = inputs;
    report.seconds = t.elapsed().as_secs_f64();
    report
}

/// The manifest reader on `inputs` mutated manifests (image existence not checked).
pub fn manifest(corpus: &[Vec<u8>], inputs: u64, seed: u64, crashes: &Path) -> Report {
    let opts = hiercon::catalogue::manifest::ReadOptions { check_images: false };
    let mut m = Mutator::new(seed);
    let mut report = Report { target: "manifest".into(), seed, ..Default::default() };
    let path = Path::new("fuzz/manifest.jsonl");
    let t = Instant::now();
    for i in 0..inputs {
        let b = m.input(corpus, 1 << 16);
        let r = catch_unwind(AssertUnwindSafe(|| {
            hiercon::catalogue::Manifest::from_reader(std::io::Cursor::new(&b), path, &opts)
        }));
        match r {
            Ok(Ok(_)) => report.count("ok".into()),
            Ok(Err(e)) => {
                // Every rejection names a line (or the reading problem).
                let text = e.to_string();
                if !(text.contains("line") || matches!(e, hiercon::Error::Io { .. })) {
                    report.bad_answers += 1;
                    save(&mut report, crashes, i, &b);
                }
                report.count(kind(&e));
            }
            Err(_) => {
                report.panics += 1;
                save(&mut report, crashes, i, &b);
            }
        }
    }
    report.inputs = inputs;
    report.seconds = t.elapsed().as_secs_f64();
    report
}

const CONTENT_TYPES: [&str; 7] = [
    "image/png",
    "image/jpeg",
    "image/webp",
    "application/octet-stream",
    "multipart/form-data; boundary=xyz",
    "text/plain",
    "",
];

const QUERIES: [&str; 12] = [
    "",
    "k=5",
    "k=-3",
    "k=99999999999999999999",
    "category=%FF%FE",
    "group_by=product",
    "group_by=variation&k=2",
    "exact=true",
    "product=",
    "k=%00",
    "a=b&&&",
    "ef=3",
];

/// A multipart body around `payload` (field `image`), sometimes with a broken frame.
fn multipart_body(r: &mut ChaCha8Rng, payload: &[u8]) -> Vec<u8> {
    let field = ["image", "img", "", "image\"; x=\"y"][r.random_range(0..4)];
    let mut b = format!(
        "--xyz\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"q.png\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    b.extend_from_slice(payload);
    if r.random_bool(0.8) {
        b.extend_from_slice(b"\r\n--xyz--\r\n");
    }
    b
}

/// `POST /v1/search` through `app` with `inputs` mutated bodies: raw images under assorted
/// content types, multipart bodies (mutated before or after framing), random query strings.
/// Every answer must be below 500 and, when not 200, `{"error": {"code", "message"}}`.
pub async fn upload(app: Router, corpus: &[Vec<u8>], inputs: u64, seed: u64, crashes: &Path) -> Report {
    let mut m = Mutator::new(seed);
    let mut report = Report { target: "upload".into(), seed, ..Default::default() };
    let t = Instant::now();
    for i in 0..inputs {
        let image = m.input(corpus, 1 << 18);
        let r = m.rng();
        let (ct, body) = match r.random_range(0..4) {
            0 | 1 => (CONTENT_TYPES[r.random_range(0..CONTENT_TYPES.len())].to_string(), image),
            2 => ("multipart/form-data; boundary=xyz".to_string(), multipart_body(r, &image)),
            _ => {
                // Frame first, then mutate the framed body.
                let pick = r.random_range(0..corpus.len());
                let framed = multipart_body(r, &corpus[pick]);
                ("multipart/form-data; boundary=xyz".to_string(), m.input(&[framed], 1 << 18))
            }
        };
        let r = m.rng();
        // Most uploads carry a valid query, so the body reaches the decoder.
        let q = if r.random_bool(0.6) {
            ["", "k=5", "group_by=product"][r.random_range(0..3)]
        } else {
            QUERIES[r.random_range(0..QUERIES.len())]
        };
        let uri = if q.is_empty() { "/v1/search".to_string() } else { format!("/v1/search?{q}") };
        let mut req = Request::post(&uri);
        if !ct.is_empty() {
            req = req.header(header::CONTENT_TYPE, &ct);
        }
        let req = req.body(Body::from(body.clone())).expect("a valid request");
        let res = match app.clone().oneshot(req).await {
            Ok(res) => res,
            Err(never) => match never {},
        };
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let code = if status == 200 {
            None
        } else {
            serde_json::from_slice::<serde_json::Value>(&bytes).ok().and_then(|j| {
                let ok = j["error"]["message"].as_str().is_some_and(|s| !s.is_empty());
                j["error"]["code"].as_str().filter(|_| ok).map(String::from)
            })
        };
        if status >= 500 || (status != 200 && code.is_none()) {
            report.bad_answers += 1;
            let mut dump = format!("{uri}\n{ct}\n").into_bytes();
            dump.extend_from_slice(&body);
            save(&mut report, crashes, i, &dump);
        }
        report.count(match code {
            Some(c) => format!("{status} {c}"),
            None => status.to_string(),
        });
    }
    report.inputs = inputs;
    report.seconds = t.elapsed().as_secs_f64();
    report
}

/// A small live index (12 generated images, the test encoder) in `dir` and the router serving it
/// with the server's default limits.
pub fn fixture(dir: &Path) -> Router {
    use hiercon::catalogue::{Item, manifest::write_items};
    use hiercon::encoder::{Encoder, TestEncoder};
    use hiercon::http::{AppState, EncoderSource, ServeConfig, router};
    use hiercon::index::{IndexConfig, build};
    use hiercon::search::{SearchConfig, Service};
    let mut items = Vec::new();
    for p in 0..6u8 {
        for v in 0..2u8 {
            let id = format!("p{p}-v{v}");
            let img = image::RgbImage::from_fn(24, 24, |x, y| {
                image::Rgb([p * 40, v * 120 + (x as u8) * 3, (y as u8) * 5 + p * 10])
            });
            img.save(dir.join(format!("{id}.png"))).unwrap();
            let cat = if p < 3 { "home/kitchen" } else { "garden/tools" };
            items.push(Item::new(&id, cat, &format!("p{p}"), &format!("v{v}")));
        }
    }
    let manifest = dir.join("manifest.jsonl");
    write_items(&manifest, &items).unwrap();
    let index = dir.join("index");
    let enc: std::sync::Arc<dyn Encoder> = std::sync::Arc::new(TestEncoder::new(16, 0));
    let mut cfg = IndexConfig::new(manifest, index.clone());
    cfg.batch_size = 8;
    build::run(&cfg, enc.as_ref()).unwrap();
    let mut serve = ServeConfig::new(index.clone());
    serve.encoder = EncoderSource::Test { dim: 16 };
    serve.poll = None;
    let service = Service::open(index, enc, SearchConfig::default()).unwrap();
    router(AppState::with_service(serve, service))
}
