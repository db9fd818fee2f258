//! The subcommands of the `hiercon` command line, a file per family; `main.rs` parses and dispatches.

pub(crate) mod data;
pub(crate) mod eval;
pub(crate) mod index;
pub(crate) mod model;
pub(crate) mod serve;
pub(crate) mod train;

use anyhow::Result;
use hiercon::catalogue::{Split, Subset};

pub(crate) fn parse_split(s: &str) -> Result<Split, String> {
    match s {
        "train" => Ok(Split::Train),
        "test" => Ok(Split::Test),
        _ => Err(format!("{s:?} is not a split (train, test)")),
    }
}

pub(crate) fn parse_subset(s: &str) -> Result<Subset, String> {
    s.parse::<Subset>().map_err(|e| e.to_string())
}

/// Parses one subcommand's flags alone (`demo` reuses `index` and `serve` with fixed arguments).
pub(crate) trait ParseFromArgs: Sized {
    fn parse_from_args(args: &[&str]) -> Result<Self>;
}

impl<T: clap::FromArgMatches + clap::Args> ParseFromArgs for T {
    fn parse_from_args(args: &[&str]) -> Result<Self> {
        let cmd = T::augment_args(clap::Command::new("hiercon"));
        let matches = cmd.try_get_matches_from(std::iter::once("hiercon").chain(args.iter().copied()))?;
        Ok(T::from_arg_matches(&matches)?)
    }
}

/// `--mean` / `--std`: three values, positive std.
pub(crate) fn rgb3(name: &str, v: Option<&[f32]>, default: [f32; 3]) -> Result<[f32; 3]> {
    match v {
        None => Ok(default),
        Some([r, g, b]) if name != "std" || [r, g, b].iter().all(|x| **x > 0.0) => Ok([*r, *g, *b]),
        Some([_, _, _]) => anyhow::bail!("--std values must be positive"),
        Some(v) => anyhow::bail!("--{name} takes three comma-separated values (R,G,B), got {}", v.len()),
    }
}
