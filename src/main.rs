//! The `hiercon` command line: parses arguments, sets up logging and the runtime, and calls
//! the library. `anyhow` lives only here.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use hiercon::catalogue::Split;
use hiercon::encoder::{Encoder, OrtEncoder, TestEncoder};
use hiercon::index::{self, IndexConfig};
use hiercon::runtime::{self, Device, RuntimeOptions};
use tracing_subscriber::EnvFilter;

/// Hierarchical multi-label contrastive image search.
#[derive(Parser, Debug)]
#[command(name = "hiercon", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct GlobalArgs {
    /// Where graphs run: cpu, or cuda (needs a `--features cuda` build and `make ort-gpu`).
    #[arg(long, global = true, default_value = "cpu", env = "HIERCON_DEVICE")]
    device: Device,
    /// CPU threads for ONNX Runtime (0 = one per core).
    #[arg(long, global = true, default_value_t = 0, env = "HIERCON_THREADS")]
    threads: usize,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Turn a source (emoji packages, Fashion-MNIST, a folder + CSV) into a catalogue manifest.
    Data(DataArgs),
    /// Train an encoder with a hierarchical loss (issue 4: not built yet).
    Train,
    /// Write a loss alone as an ONNX graph (issue 4: not built yet).
    ExportLoss,
    /// Embed a catalogue into a new index generation, verify it and make it live.
    ///
    /// Exit codes: 0 new generation live; 1 unexpected failure; 2 usage or bad input;
    /// 3 verification failed (CURRENT unchanged); 4 another run holds the index lock.
    Index(IndexArgs),
    /// Serve the HTTP API and the web page (issue 6: not built yet).
    Serve,
    /// Retrieval accuracy per hierarchy level (issue 7: not built yet).
    Eval,
    /// Run the shipped default end to end (issue 6: for now, summarise the demo catalogue).
    Demo,
    /// Show which ONNX Runtime library is loaded and whether the requested device works.
    Runtime,
}

#[derive(Args, Debug)]
struct DataArgs {}

#[derive(Args, Debug)]
struct IndexArgs {
    /// Catalogue manifest (JSON Lines; image paths are relative to it).
    #[arg(long)]
    manifest: PathBuf,
    /// Exported model `X.onnx` (its description `X.json` must be beside it).
    #[arg(long, required_unless_present = "test_encoder")]
    model: Option<PathBuf>,
    /// Index directory, e.g. `index/emoji`; generations `gen-<n>/` and `CURRENT` live inside.
    #[arg(long)]
    out: PathBuf,
    /// Index only this split: train or test (default: every item).
    #[arg(long, value_parser = parse_split)]
    split: Option<Split>,
    /// Images per encoder call.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// HNSW links per node and layer.
    #[arg(long, default_value_t = 16)]
    m: usize,
    /// HNSW candidate list width while building.
    #[arg(long, default_value_t = 200)]
    ef_construction: usize,
    /// HNSW search breadth used by verification and by `serve` unless a query asks otherwise.
    #[arg(long, default_value_t = 64)]
    ef_search: usize,
    /// Verification may double `--ef-search` up to this to reach `--min-recall` (the breadth that
    /// reached it is served); equal to `--ef-search` turns that off.
    #[arg(long, default_value_t = 512)]
    max_ef_search: usize,
    /// Generations to keep on disk (the live one is never deleted).
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// Minimum recall@10 of HNSW against exact search on the sample; below it the new
    /// generation is not switched to.
    #[arg(long, default_value_t = 0.98)]
    min_recall: f64,
    /// Items sampled for the recall check.
    #[arg(long, default_value_t = 1000)]
    recall_sample: usize,
    /// Items tolerated that do not find themselves first.
    #[arg(long, default_value_t = 0)]
    max_self_misses: usize,
    /// Use the deterministic test encoder of this width instead of a model (tests only).
    #[arg(long, hide = true)]
    test_encoder: Option<usize>,
}

fn parse_split(s: &str) -> Result<Split, String> {
    match s {
        "train" => Ok(Split::Train),
        "test" => Ok(Split::Test),
        _ => Err(format!("{s:?} is not a split (train, test)")),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,hnsw_rs=warn")))
        .with_writer(std::io::stderr)
        .init();
    let is_index = matches!(cli.command, Command::Index(_));
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // `hiercon index` has documented exit codes a scheduler can act on.
            match e.downcast_ref::<hiercon::Error>() {
                Some(err) if is_index => std::process::ExitCode::from(index::exit_code(err)),
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let rt_opts = RuntimeOptions { device: cli.global.device, threads: cli.global.threads };
    match cli.command {
        Command::Runtime => {
            let rt = runtime::init()?;
            println!("ONNX Runtime {} from {}", rt.version, rt.path.display());
            rt.session_builder(&rt_opts)?;
            println!("device {}: available", rt_opts.device);
            Ok(())
        }
        Command::Data(_) => anyhow::bail!("`hiercon data` is being built (issue 2)"),
        Command::Train | Command::ExportLoss => anyhow::bail!("not built yet: see issue 4"),
        Command::Index(args) => run_index(args, &rt_opts),
        Command::Serve => anyhow::bail!("not built yet: see issue 6"),
        Command::Eval => anyhow::bail!("not built yet: see issue 7"),
        Command::Demo => anyhow::bail!("not built yet: see issue 6"),
    }
}

fn run_index(args: IndexArgs, rt_opts: &RuntimeOptions) -> Result<()> {
    let encoder: Arc<dyn Encoder> = match (&args.test_encoder, &args.model) {
        (Some(dim), _) => Arc::new(TestEncoder::new(*dim, 0)),
        (None, Some(model)) => Arc::new(OrtEncoder::load(model, rt_opts)?),
        (None, None) => unreachable!("clap requires --model without --test-encoder"),
    };
    let mut cfg = IndexConfig::new(&args.manifest, &args.out);
    cfg.model_path = args.model.clone();
    cfg.split = args.split;
    cfg.batch_size = args.batch_size;
    cfg.hnsw = index::HnswParams { m: args.m, ef_construction: args.ef_construction };
    cfg.ef_search = args.ef_search;
    cfg.keep = args.keep;
    cfg.verify.min_recall = args.min_recall;
    cfg.verify.recall_sample = args.recall_sample;
    cfg.verify.max_self_misses = args.max_self_misses;
    cfg.verify.max_ef = args.max_ef_search;
    let out = index::build::run(&cfg, encoder.as_ref())?;
    println!(
        "{} is live in {}: {} items (embedded {}, reused {}, skipped {}), recall@{} {:.4} at ef {}",
        out.generation,
        args.out.display(),
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
