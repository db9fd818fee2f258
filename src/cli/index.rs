//! `hiercon index`: into a local index directory or into Milvus (`--milvus`).

use anyhow::{Context, Result};
use clap::Args;
use hiercon::catalogue::Split;
use hiercon::encoder::{Encoder, OrtEncoder, TestEncoder};
use hiercon::index::{self, IndexConfig};
use hiercon::milvus::index::{WritePath, Written};
use hiercon::runtime::RuntimeOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::parse_split;

/// `--write` of `index --milvus`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteArg {
    Auto,
    Full,
    Delta,
}

#[derive(Args, Debug)]
pub(crate) struct IndexArgs {
    /// Catalogue manifest (JSON Lines; image paths are relative to it).
    #[arg(long)]
    pub(crate) manifest: PathBuf,
    /// Exported model `X.onnx` (its description `X.json` must be beside it).
    #[arg(long, required_unless_present = "test_encoder")]
    pub(crate) model: Option<PathBuf>,
    /// Index directory, e.g. `index/emoji`; generations `gen-<n>/` and `CURRENT` live inside.
    #[arg(long, required_unless_present = "milvus")]
    pub(crate) out: Option<PathBuf>,
    /// Index into Milvus at this address (`HOST:PORT` of its proxy) instead of a local directory:
    /// each run writes a collection `<collection>_g<n>`, verifies it and points the alias
    /// `--collection` at it.
    #[arg(long, requires = "collection", conflicts_with_all = ["out", "full", "max_tombstones", "max_new"])]
    pub(crate) milvus: Option<String>,
    /// With --milvus: the alias the live collection is reached by (what `serve --collection` names).
    #[arg(long, requires = "milvus")]
    pub(crate) collection: Option<String>,
    /// With --milvus: seconds each Milvus call may take.
    #[arg(long, default_value_t = 30.0, requires = "milvus")]
    pub(crate) milvus_timeout: f64,
    /// With --milvus: in-memory replicas of the collection (needs as many query nodes).
    #[arg(long, default_value_t = 1, requires = "milvus")]
    pub(crate) replicas: i32,
    /// With --milvus: write a new collection even when nothing changed.
    #[arg(long, requires = "milvus")]
    pub(crate) force: bool,
    /// With --milvus: how a change is written. `auto`: a change of at most 20 % of the rows is
    /// applied to the standby collection (the previous generation, kept by --keep) with deletes
    /// and inserts, verified, then switched to; a larger one, or one with no usable standby,
    /// goes into a new collection. `full`: always a new collection. `delta`: always the standby.
    #[arg(long, value_enum, default_value_t = WriteArg::Auto, requires = "milvus")]
    pub(crate) write: WriteArg,
    /// With --milvus: seconds the standby must have been out of service before it is written
    /// (serve replicas re-read the alias every 2 s; a search already sent may still run).
    #[arg(long, default_value_t = 60.0, requires = "milvus")]
    pub(crate) standby_grace: f64,
    /// Index only this split: train or test (default: every item).
    #[arg(long, value_parser = parse_split)]
    pub(crate) split: Option<Split>,
    /// Images per encoder call.
    #[arg(long, default_value_t = 64)]
    pub(crate) batch_size: usize,
    /// HNSW links per node and layer.
    #[arg(long, default_value_t = 16)]
    pub(crate) m: usize,
    /// HNSW candidate list width while building.
    #[arg(long, default_value_t = 200)]
    pub(crate) ef_construction: usize,
    /// HNSW search breadth used by verification and by `serve` unless a query asks otherwise.
    #[arg(long, default_value_t = 64)]
    pub(crate) ef_search: usize,
    /// Verification may double `--ef-search` up to this to reach `--min-recall` (the breadth that
    /// reached it is served); equal to `--ef-search` turns that off.
    #[arg(long, default_value_t = 512)]
    pub(crate) max_ef_search: usize,
    /// Generations to keep on disk (the live one is never deleted); with --milvus, earlier
    /// collections kept besides the live one (default 1).
    #[arg(long)]
    pub(crate) keep: Option<usize>,
    /// Minimum recall@10 of HNSW against exact search on the sample; below it the new
    /// generation is not switched to.
    #[arg(long, default_value_t = 0.98)]
    pub(crate) min_recall: f64,
    /// Items sampled for the recall check.
    #[arg(long, default_value_t = 1000)]
    pub(crate) recall_sample: usize,
    /// Items tolerated that do not find themselves first.
    #[arg(long, default_value_t = 0)]
    pub(crate) max_self_misses: usize,
    /// Build the graph from nothing even when the live generation's graph could be reused.
    #[arg(long)]
    pub(crate) full: bool,
    /// Reuse the live generation's graph only while the nodes of removed and changed items
    /// (tombstones, skipped by searches) stay at or below this share of the graph.
    #[arg(long, default_value_t = 0.1)]
    pub(crate) max_tombstones: f64,
    /// Reuse the live generation's graph only while at most this share of the items is new or changed.
    #[arg(long, default_value_t = 0.3)]
    pub(crate) max_new: f64,
    /// Decode every pixel of every JPEG (default: a JPEG at least twice the model's input size
    /// is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, several times faster on photos).
    #[arg(long)]
    pub(crate) full_jpeg_decode: bool,
    /// Use the deterministic test encoder of this width instead of a model (tests only).
    #[arg(long, hide = true)]
    pub(crate) test_encoder: Option<usize>,
}

pub(crate) fn run_index(args: IndexArgs, rt_opts: &RuntimeOptions) -> Result<()> {
    let encoder: Arc<dyn Encoder> = match (&args.test_encoder, &args.model) {
        (Some(dim), _) => Arc::new(TestEncoder::new(*dim, 0)),
        (None, Some(model)) => Arc::new(OrtEncoder::load(model, rt_opts)?),
        (None, None) => unreachable!("clap requires --model without --test-encoder"),
    };
    if let Some(address) = &args.milvus {
        return run_index_milvus(&args, address, encoder.as_ref());
    }
    let out_dir = args.out.clone().context("--out is required without --milvus")?;
    let mut cfg = index_config(&args, &out_dir, 3);
    cfg.rebuild.full = args.full;
    cfg.rebuild.max_tombstones = args.max_tombstones;
    cfg.rebuild.max_inserted = args.max_new;
    let out = index::build::run(&cfg, encoder.as_ref())?;
    println!("{} build: {}", out.build.path, out.build.reason);
    let phases: Vec<String> = out.seconds.iter().map(|(p, s)| format!("{p} {s:.1} s")).collect();
    println!("took {}", phases.join(", "));
    println!(
        "{} is live in {}: {} items (embedded {}, reused {}, skipped {}), recall@{} {:.4} at ef {}",
        out.generation,
        out_dir.display(),
        out.count,
        out.stats.embedded,
        out.stats.reused,
        out.stats.skipped,
        out.report.recall_k,
        out.report.recall,
        out.report.ef_search
    );
    Ok(())
}

/// The settings both index targets share, from the flags (`keep` when --keep is absent).
pub(crate) fn index_config(args: &IndexArgs, out: &Path, keep: usize) -> IndexConfig {
    let mut cfg = IndexConfig::new(&args.manifest, out);
    cfg.model_path = args.model.clone();
    cfg.split = args.split;
    cfg.batch_size = args.batch_size;
    cfg.hnsw = index::HnswParams { m: args.m, ef_construction: args.ef_construction };
    cfg.ef_search = args.ef_search;
    cfg.keep = args.keep.unwrap_or(keep);
    cfg.verify.min_recall = args.min_recall;
    cfg.verify.recall_sample = args.recall_sample;
    cfg.verify.max_self_misses = args.max_self_misses;
    cfg.verify.max_ef = args.max_ef_search;
    cfg.limits.jpeg_dct_scaling = !args.full_jpeg_decode;
    cfg
}

/// `hiercon index --milvus`.
pub(crate) fn run_index_milvus(args: &IndexArgs, address: &str, encoder: &dyn Encoder) -> Result<()> {
    let alias = args.collection.as_deref().context("--collection is required with --milvus")?;
    anyhow::ensure!(args.milvus_timeout.is_finite() && args.milvus_timeout > 0.0, "--milvus-timeout must be positive");
    let shared = index_config(args, Path::new(""), 1);
    let mut cfg = hiercon::milvus::MilvusIndexConfig::new(address, alias, &args.manifest);
    cfg.model_path = shared.model_path;
    cfg.split = shared.split;
    cfg.batch_size = shared.batch_size;
    cfg.hnsw = shared.hnsw;
    cfg.ef_search = shared.ef_search;
    cfg.keep = shared.keep;
    cfg.verify = shared.verify;
    cfg.limits = shared.limits;
    cfg.timeout = std::time::Duration::from_secs_f64(args.milvus_timeout);
    cfg.replicas = args.replicas;
    cfg.force = args.force;
    cfg.write = match args.write {
        WriteArg::Auto => WritePath::Auto,
        WriteArg::Full => WritePath::Full,
        WriteArg::Delta => WritePath::Delta,
    };
    anyhow::ensure!(
        args.standby_grace.is_finite() && args.standby_grace >= 0.0,
        "--standby-grace must be zero or more seconds"
    );
    cfg.standby_grace = std::time::Duration::from_secs_f64(args.standby_grace);
    let out = hiercon::milvus::index::run(&cfg, encoder)?;
    let phases: Vec<String> = out.seconds.iter().map(|(p, s)| format!("{p} {s:.1} s")).collect();
    println!("took {}", phases.join(", "));
    println!("path: {}", out.why);
    match &out.verify {
        None => println!(
            "nothing changed: {alias} still names {} ({} items, reused {}); nothing written",
            out.collection, out.count, out.reused
        ),
        Some(v) => println!(
            "{}: {alias} now names {} (was {}): {} items (embedded {}, reused {}, skipped {}; deleted {}, inserted {} rows), recall@{} {:.4} at ef {}{}{}",
            match out.written {
                Written::Delta => "small change",
                _ => "full build",
            },
            out.collection,
            out.previous.as_deref().unwrap_or("nothing"),
            out.count,
            out.embedded,
            out.reused,
            out.skipped,
            out.deleted,
            out.inserted,
            v.recall_k,
            v.recall,
            v.ef_search,
            if v.attempts > 1 {
                format!(" (passed on check {}: Milvus was settling)", v.attempts)
            } else {
                String::new()
            },
            if out.dropped.is_empty() { String::new() } else { format!("; dropped {}", out.dropped.join(", ")) }
        ),
    }
    Ok(())
}
