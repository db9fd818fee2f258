//! `hiercon serve`, `hiercon bench-load` and `hiercon demo`.

use anyhow::{Context, Result};
use clap::Args;
use hiercon::catalogue::Manifest;
use hiercon::http::{self, EncoderSource, ServeConfig};
use hiercon::runtime::{self, RuntimeOptions};
use std::path::PathBuf;

use super::ParseFromArgs;
use super::index::{IndexArgs, run_index};

/// The demo catalogue `hiercon demo` summarises.
pub(crate) const DEMO_MANIFEST: &str = "data/emoji/manifest.jsonl";
pub(crate) const DEMO_MODEL: &str = "models/emoji-lite0-hmce-mix.onnx";
pub(crate) const DEMO_INDEX: &str = "index/emoji";

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1", env = "HIERCON_HOST")]
    pub(crate) host: std::net::IpAddr,
    /// Port to serve on.
    #[arg(long, default_value_t = 8080, env = "HIERCON_PORT")]
    pub(crate) port: u16,
}

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Index directory (`index/<name>`) whose live generation (CURRENT) is served.
    #[arg(long, env = "HIERCON_INDEX", required_unless_present = "milvus")]
    pub(crate) index: Option<PathBuf>,
    /// Serve from Milvus at this address (`HOST:PORT` of its proxy) instead of a local index:
    /// the collection the alias `--collection` names, followed across switches.
    #[arg(long, env = "HIERCON_MILVUS", requires = "collection", conflicts_with = "index")]
    pub(crate) milvus: Option<String>,
    /// With --milvus: the alias `hiercon index --milvus --collection` switches.
    #[arg(long, env = "HIERCON_COLLECTION", requires = "milvus")]
    pub(crate) collection: Option<String>,
    /// With --milvus: milliseconds each Milvus call may take (then 503 `backend_unavailable`).
    #[arg(long, default_value_t = 2000, env = "HIERCON_MILVUS_TIMEOUT_MS")]
    pub(crate) milvus_timeout_ms: u64,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", env = "HIERCON_HOST")]
    pub(crate) host: std::net::IpAddr,
    /// Port to listen on (0: any free port; the bound address is printed).
    #[arg(long, default_value_t = 8080, env = "HIERCON_PORT")]
    pub(crate) port: u16,
    /// Exported model `X.onnx` for queries (default: the model path the live generation records).
    #[arg(long, env = "HIERCON_MODEL")]
    pub(crate) model: Option<PathBuf>,
    /// Key that guards /v1/admin/* (`Authorization: Bearer KEY`); unset, those routes answer 403.
    /// Prefer the environment variable to the flag (flags show in `ps`).
    #[arg(long, env = "HIERCON_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// Seconds between checks of CURRENT for a new generation (0: only reload / SIGHUP); with
    /// --milvus at most 5 (searches follow the alias by themselves; the poll retries a server
    /// that could not open and refreshes the metrics).
    #[arg(long, default_value_t = 30.0, env = "HIERCON_POLL_SECS")]
    pub(crate) poll_secs: f64,
    /// Largest request body in bytes (also the largest encoded image).
    #[arg(long, default_value_t = 20 * 1024 * 1024, env = "HIERCON_MAX_BODY_BYTES")]
    pub(crate) max_body_bytes: usize,
    /// Largest image in pixels (width x height), checked from the header before decoding.
    #[arg(long, default_value_t = 40_000_000, env = "HIERCON_MAX_PIXELS")]
    pub(crate) max_pixels: u64,
    /// Longest time decoding + embedding + searching one image may take, in milliseconds.
    #[arg(long, default_value_t = 5000, env = "HIERCON_DECODE_TIMEOUT_MS")]
    pub(crate) decode_timeout_ms: u64,
    /// Largest `k` a query may ask for.
    #[arg(long, default_value_t = 100, env = "HIERCON_MAX_K")]
    pub(crate) max_k: usize,
    /// Images decoded and embedded at once; more wait up to the decode timeout, then get 503
    /// (default: 4 x cores).
    #[arg(long, env = "HIERCON_MAX_INFLIGHT")]
    pub(crate) max_inflight: Option<usize>,
    /// ONNX Runtime sessions of the model: concurrent queries run on different sessions
    /// (`--threads` is per session; e.g. 4 sessions x 4 threads on 16 cores).
    #[arg(long, default_value_t = 1, env = "HIERCON_SESSIONS")]
    pub(crate) sessions: usize,
    /// Decode every pixel of every JPEG (default: a JPEG at least twice the model's input size
    /// is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, several times faster on photos).
    #[arg(long, env = "HIERCON_FULL_JPEG_DECODE")]
    pub(crate) full_jpeg_decode: bool,
    /// Use the deterministic test encoder of this width instead of a model (tests only).
    #[arg(long, hide = true)]
    pub(crate) test_encoder: Option<usize>,
}

/// The longest poll with --milvus.
pub(crate) const MILVUS_POLL: std::time::Duration = std::time::Duration::from_secs(5);

impl ServeArgs {
    fn config(&self, rt_opts: &RuntimeOptions) -> Result<ServeConfig> {
        let mut cfg = ServeConfig::new(self.index.clone().unwrap_or_default());
        if let (Some(address), Some(alias)) = (&self.milvus, &self.collection) {
            anyhow::ensure!(self.milvus_timeout_ms > 0, "--milvus-timeout-ms must be positive");
            cfg.milvus = Some(hiercon::http::MilvusTarget {
                address: address.clone(),
                alias: alias.clone(),
                timeout: std::time::Duration::from_millis(self.milvus_timeout_ms),
            });
        }
        cfg.addr = std::net::SocketAddr::new(self.host, self.port);
        cfg.encoder = match (&self.test_encoder, &self.model) {
            (Some(dim), _) => EncoderSource::Test { dim: *dim },
            (None, Some(m)) => EncoderSource::Model(m.clone()),
            (None, None) => EncoderSource::FromIndex,
        };
        cfg.runtime = *rt_opts;
        cfg.api_key = self.api_key.clone().filter(|k| !k.is_empty());
        anyhow::ensure!(self.poll_secs.is_finite() && self.poll_secs >= 0.0, "--poll-secs must be >= 0");
        cfg.poll = (self.poll_secs > 0.0).then(|| std::time::Duration::from_secs_f64(self.poll_secs));
        if cfg.milvus.is_some() {
            // Searches follow the alias by themselves; the poll only retries a server that could
            // not open yet and refreshes the metrics: keep it short.
            cfg.poll = Some(cfg.poll.unwrap_or(MILVUS_POLL).min(MILVUS_POLL));
        }
        cfg.max_body_bytes = self.max_body_bytes;
        cfg.search.limits.max_bytes = self.max_body_bytes;
        cfg.search.limits.max_pixels = self.max_pixels;
        cfg.search.limits.jpeg_dct_scaling = !self.full_jpeg_decode;
        cfg.decode_timeout = std::time::Duration::from_millis(self.decode_timeout_ms);
        cfg.max_k = self.max_k;
        cfg.sessions = self.sessions;
        if let Some(n) = self.max_inflight {
            cfg.max_inflight = n;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Args, Debug)]
pub(crate) struct BenchLoadArgs {
    /// Index served by the server this starts.
    #[arg(long, required_unless_present = "addr")]
    pub(crate) index: Option<PathBuf>,
    /// Model for that server (default: the one the index records).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Test encoder width for that server (tests only).
    #[arg(long, hide = true)]
    pub(crate) test_encoder: Option<usize>,
    /// Drive an already running server at this address instead of starting one.
    #[arg(long)]
    pub(crate) addr: Option<std::net::SocketAddr>,
    /// Catalogue whose images are the queries.
    #[arg(long)]
    pub(crate) manifest: PathBuf,
    /// Distinct query images (the first ones of the manifest), sent round-robin.
    #[arg(long, default_value_t = 64)]
    pub(crate) queries: usize,
    /// Concurrency levels.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    pub(crate) concurrency: Vec<usize>,
    /// Seconds per level.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) seconds: f64,
    /// Query string of each search.
    #[arg(long, default_value = "k=10")]
    pub(crate) query: String,
    /// Report file.
    #[arg(long, default_value = "bench/results/load.json")]
    pub(crate) out: PathBuf,
    /// More flags for the server it starts, space-separated (e.g. "--sessions 4 --threads 4").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub(crate) server_args: String,
}

/// `hiercon serve`: bind, print the address, serve until SIGTERM / Ctrl-C.
pub(crate) fn serve(args: ServeArgs, rt_opts: &RuntimeOptions) -> Result<()> {
    let cfg = args.config(rt_opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
        let server = http::Server::bind(cfg).await?;
        let addr = server.local_addr()?;
        println!("listening on http://{addr}");
        use std::io::Write as _;
        std::io::stdout().flush()?;
        server.run(http::shutdown_signal()).await?;
        Ok(())
    })
}

/// `hiercon bench-load`: closed-loop load over loopback, one JSON report.
pub(crate) fn bench_load(args: BenchLoadArgs) -> Result<()> {
    use std::io::BufRead as _;
    let manifest = Manifest::read(&args.manifest)?;
    anyhow::ensure!(args.queries > 0 && !manifest.items.is_empty(), "no query images");
    let bodies: Vec<Vec<u8>> = manifest
        .items
        .iter()
        .take(args.queries)
        .map(|it| std::fs::read(manifest.image_path(it)).with_context(|| format!("reading the image of {}", it.id)))
        .collect::<Result<_>>()?;
    let content_type = match bodies[0].get(..4) {
        Some([0x89, b'P', b'N', b'G']) => "image/png",
        Some([0xFF, 0xD8, 0xFF, _]) => "image/jpeg",
        _ => "image/webp",
    };
    // The server under test is a second process, so client and server do not share a runtime.
    let mut child = None;
    let addr = match (args.addr, &args.index) {
        (Some(a), _) => a,
        (None, Some(index)) => {
            let mut cmd = std::process::Command::new(std::env::current_exe()?);
            cmd.args(["serve", "--port", "0", "--host", "127.0.0.1", "--poll-secs", "0", "--index"]).arg(index);
            if let Some(m) = &args.model {
                cmd.arg("--model").arg(m);
            }
            if let Some(d) = args.test_encoder {
                cmd.args(["--test-encoder", &d.to_string()]);
            }
            cmd.args(args.server_args.split_whitespace());
            cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
            let mut c = cmd.stdout(std::process::Stdio::piped()).spawn().context("starting hiercon serve")?;
            let mut line = String::new();
            std::io::BufReader::new(c.stdout.take().expect("piped")).read_line(&mut line)?;
            let addr = line.trim().strip_prefix("listening on http://").map(str::parse).transpose()?;
            child = Some(c);
            addr.ok_or_else(|| anyhow::anyhow!("the server did not start (it printed {line:?})"))?
        }
        (None, None) => unreachable!("clap requires --index without --addr"),
    };
    let plan = http::load::LoadPlan {
        addr,
        path: format!("/v1/search?{}", args.query),
        content_type: content_type.into(),
        bodies,
        duration: std::time::Duration::from_secs_f64(args.seconds),
        warmup: 5,
    };
    let mut levels = Vec::new();
    for &c in &args.concurrency {
        let r = http::load::run_level(&plan, c);
        eprintln!(
            "concurrency {:>3}: {:>8.1} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
            c, r.throughput_rps, r.p50_ms, r.p99_ms, r.errors
        );
        levels.push(r);
    }
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
    let report = serde_json::json!({
        "bench": "load",
        "machine": format!("{}; client and server on the same machine over loopback", runtime::machine_description()),
        "index": args.index, "model": args.model, "test_encoder": args.test_encoder,
        "manifest": args.manifest, "queries": plan.bodies.len(),
        "mean_query_bytes": plan.bodies.iter().map(Vec::len).sum::<usize>() / plan.bodies.len(),
        "content_type": content_type, "request": plan.path, "seconds_per_level": args.seconds,
        "server_args": args.server_args,
        "levels": levels,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", args.out.display());
    let errors: usize = levels.iter().map(|l| l.errors).sum();
    anyhow::ensure!(errors == 0, "{errors} requests failed");
    Ok(())
}

/// `hiercon demo`: summarise the emoji catalogue, index it with the shipped model, serve it.
pub(crate) fn demo(args: DemoArgs, rt_opts: &RuntimeOptions) -> Result<()> {
    let manifest = PathBuf::from(DEMO_MANIFEST);
    let model = PathBuf::from(DEMO_MODEL);
    if !manifest.is_file() {
        anyhow::bail!("{DEMO_MANIFEST} not found: run `make demo` (or `make data`) in the repository first");
    }
    if !model.is_file() {
        anyhow::bail!("{DEMO_MODEL} not found: run `hiercon demo` from the repository root");
    }
    println!("{DEMO_MANIFEST}\n{}", Manifest::read(&manifest)?.summary());
    // Index with the shipped model (a re-run reuses the cached embeddings), then serve it.
    run_index(
        IndexArgs::parse_from_args(&["--manifest", DEMO_MANIFEST, "--model", DEMO_MODEL, "--out", DEMO_INDEX])?,
        rt_opts,
    )?;
    let serve_args = ServeArgs::parse_from_args(&[
        "--index",
        DEMO_INDEX,
        "--host",
        &args.host.to_string(),
        "--port",
        &args.port.to_string(),
    ])?;
    println!("open http://{}:{}/ in a browser (Ctrl-C stops)", args.host, args.port);
    serve(serve_args, rt_opts)
}
