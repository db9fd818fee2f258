//! The `hiercon` command line: parses arguments, sets up logging and the runtime, and hands each
//! subcommand to its file in `cli/`, which calls the library. `anyhow` lives only in the binary.

mod cli;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use hiercon::index;
use hiercon::runtime::{self, Device, RuntimeOptions};
use tracing_subscriber::EnvFilter;

use cli::data::{DataArgs, data};
use cli::eval::{EvalArgs, run_eval};
use cli::index::{IndexArgs, run_index};
use cli::model::{
    ImportArgs, ModelCommand, PretrainedCommand, describe_model, import_model, pretrained, quantize_model, rehash_model,
};
use cli::serve::{BenchLoadArgs, DemoArgs, ServeArgs, bench_load, demo, serve};
use cli::train::{ExportArgs, ExportLossArgs, TrainArgs, export_loss, export_model, train};

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
    /// Training on CPU: run the step's dense convolutions on ONNX Runtime's blocked NCHWc
    /// kernels (about 10% faster per step; the step graph is then not standard ONNX).
    #[arg(long, global = true, env = "HIERCON_CPU_NCHWC")]
    cpu_nchwc: bool,
    /// ONNX Runtime's threads sleep between calls instead of spinning for work: frees the cores
    /// for image preparation running beside the model (`index`, `eval`); costs latency when
    /// calls come back to back.
    #[arg(long, global = true, env = "HIERCON_NO_SPINNING")]
    no_spinning: bool,
    /// Log lines on stderr: `text` (colours only when stderr is a terminal and NO_COLOR is unset)
    /// or `json` (one JSON object a line, for log collectors). RUST_LOG picks what is logged.
    #[arg(long, global = true, default_value = "text", env = "HIERCON_LOG_FORMAT")]
    log_format: LogFormat,
}

/// See [`GlobalArgs::log_format`].
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr through `tracing`, filtered by RUST_LOG (default `info,hnsw_rs=warn`).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,hnsw_rs=warn"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            fmt.with_ansi(std::io::stderr().is_terminal() && !no_color).init()
        }
        // Event fields at the top level beside `timestamp`, `level`, `target`, `message`; the
        // innermost span's fields under `span`.
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).with_span_list(false).init(),
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Turn a source (emoji packages, Fashion-MNIST, a folder + CSV) into a catalogue manifest.
    Data(DataArgs),
    /// Train encoder + projection head with a hierarchical loss (or a baseline); checkpoints,
    /// resume, and export of `OUT/model.onnx` + `model.json`.
    Train(Box<TrainArgs>),
    /// Write a loss alone as an ONNX model: inputs `features` f32 [2N, D] and `labels` i64
    /// [N, K]; outputs `loss` (f32 scalar) and `features_grad` (f32 [2N, D]).
    ExportLoss(ExportLossArgs),
    /// Embed a catalogue into a new index generation, verify it and make it live.
    ///
    /// Exit codes: 0 new generation live; 1 unexpected failure; 2 usage or bad input;
    /// 3 verification failed (CURRENT unchanged); 4 another run holds the index lock.
    Index(IndexArgs),
    /// Serve the HTTP API and the web page over an index's live generation.
    ///
    /// Prints `listening on http://ADDR` once bound. Reloads a new generation on
    /// `POST /v1/admin/reload`, SIGHUP, and when a poll of CURRENT sees one; stops gracefully on
    /// SIGTERM / Ctrl-C.
    Serve(ServeArgs),
    /// Load test: start `hiercon serve` as a second process on a loopback port (or use --addr)
    /// and send image queries at each concurrency for a fixed time; writes a JSON report.
    #[command(hide = true)]
    BenchLoad(BenchLoadArgs),
    /// Retrieval accuracy per hierarchy level on a split (train = seen products, test = unseen),
    /// mAP, kNN accuracy, NMI; or, with --compare, one table across training runs.
    Eval(EvalArgs),
    /// Export a model without training: the pretrained backbone's L2-normalised pooled feature
    /// (`--no-head`), as `OUT.onnx` + `OUT.json` that `index`, `serve` and `eval` accept — the
    /// zero-shot baseline of a fine-tuned model.
    Export(ExportArgs),
    /// Pretrained weights: where hiercon finds them, what they hold, conversion to safetensors.
    #[command(subcommand)]
    Pretrained(PretrainedCommand),
    /// Read an ONNX image model as a backbone for `train --init-onnx`: report its input, the cut
    /// before its classifier, the feature width and the weight layers `--freeze` counts, and
    /// check the replayed graph against ONNX Runtime on the file itself.
    Import(ImportArgs),
    /// Foreign ONNX models: `model describe` makes one servable without training.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Run the shipped default end to end: index the emoji catalogue with models/emoji-lite0-hmce-mix.onnx
    /// into index/emoji, then serve it (run from the repository root; `make demo` does it all).
    Demo(DemoArgs),
    /// Show which ONNX Runtime library is loaded and whether the requested device works.
    Runtime,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.log_format);
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
    let rt_opts = RuntimeOptions {
        device: cli.global.device,
        threads: cli.global.threads,
        cpu_nchwc: cli.global.cpu_nchwc,
        no_spinning: cli.global.no_spinning,
    };
    match cli.command {
        Command::Runtime => {
            let rt = runtime::init()?;
            println!("ONNX Runtime {} from {}", rt.version, rt.path.display());
            rt.session_builder(&rt_opts)?;
            println!("device {}: available", rt_opts.device);
            Ok(())
        }
        Command::Data(args) => data(args.source),
        Command::Train(args) => train(*args, &rt_opts),
        Command::ExportLoss(args) => export_loss(args),
        Command::Index(args) => run_index(args, &rt_opts),
        Command::Serve(args) => serve(args, &rt_opts),
        Command::BenchLoad(args) => bench_load(args),
        Command::Eval(args) => run_eval(args, &rt_opts),
        Command::Demo(args) => demo(args, &rt_opts),
        Command::Export(args) => export_model(args),
        Command::Pretrained(cmd) => pretrained(cmd),
        Command::Import(args) => import_model(args),
        Command::Model(ModelCommand::Describe(args)) => describe_model(args),
        Command::Model(ModelCommand::Quantize(args)) => quantize_model(args),
        Command::Model(ModelCommand::Rehash { model }) => rehash_model(&model),
    }
}
