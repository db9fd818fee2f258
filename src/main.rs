//! The `hiercon` command line: parses arguments, sets up logging and the runtime, and calls
//! the library. `anyhow` lives only here.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
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
    /// Embed a catalogue into a new index generation (issue 5: not built yet).
    Index,
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
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
        Command::Index => anyhow::bail!("not built yet: see issue 5"),
        Command::Serve => anyhow::bail!("not built yet: see issue 6"),
        Command::Eval => anyhow::bail!("not built yet: see issue 7"),
        Command::Demo => anyhow::bail!("not built yet: see issue 6"),
    }
}
