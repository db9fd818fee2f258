//! `hiercon data`: catalogue sources into manifests.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hiercon::catalogue::sources::{emoji, fashion_mnist, folder};
use hiercon::catalogue::{SplitOptions, UnseenBy};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub(crate) struct DataArgs {
    #[command(subcommand)]
    pub(crate) source: DataSource,
}

#[derive(Subcommand, Debug)]
pub(crate) enum DataSource {
    /// Emoji from the emoji-datasource packages (`make fetch-emoji`): category / subcategory /
    /// emoji / skin tone; Twitter's drawings are the queries, Google's the gallery.
    Emoji {
        /// Folder holding the unpacked emoji-datasource, -google and -twitter packages.
        #[arg(long, default_value = ".cache/npm")]
        packages: PathBuf,
        /// Output catalogue folder (images/, manifest.jsonl, ATTRIBUTION.md).
        #[arg(long, default_value = "data/emoji")]
        out: PathBuf,
        #[command(flatten)]
        split: SplitArgs,
    },
    /// Fashion-MNIST from its IDX files: group / class; every image is its own product.
    FashionMnist {
        /// Folder with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-*.
        #[arg(long)]
        source: PathBuf,
        /// Output catalogue folder.
        #[arg(long, default_value = "data/fashion-mnist")]
        out: PathBuf,
        /// `official`: the dataset's 60,000 / 10,000 train/test split; `hashed`: the hashed
        /// per-class split drawn by --seed / --unseen-fraction / --unseen-by.
        #[arg(long, default_value = "official", value_parser = ["official", "hashed"])]
        split: String,
        #[command(flatten)]
        split_args: SplitArgs,
    },
    /// Any images plus a CSV with the header image,category,product,variation[,view,role,title,attr.NAME...]
    /// (image paths relative to the CSV). An `attr.NAME` cell becomes the attribute NAME:
    /// true/false a boolean, a JSON number a number, other text a string; empty: none.
    Folder {
        #[arg(long)]
        csv: PathBuf,
        /// Output catalogue folder (the images are copied under images/).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        split: SplitArgs,
    },
}

/// The seen/unseen split.
#[derive(Args, Debug, Clone)]
pub(crate) struct SplitArgs {
    /// Seed of the stable hash that picks the unseen products.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Share of products (or of leaf categories) held out as unseen (`test`).
    #[arg(long, default_value_t = 0.25)]
    pub(crate) unseen_fraction: f64,
    /// What is held out: `product` (a share of every leaf category's products) or `category`
    /// (whole leaf categories).
    #[arg(long, default_value = "product")]
    pub(crate) unseen_by: UnseenBy,
}

impl From<SplitArgs> for SplitOptions {
    fn from(a: SplitArgs) -> Self {
        SplitOptions { seed: a.seed, unseen_fraction: a.unseen_fraction, unseen_by: a.unseen_by }
    }
}

/// `hiercon data ...`: import a source and print its summary.
pub(crate) fn data(source: DataSource) -> Result<()> {
    let manifest = match source {
        DataSource::Emoji { packages, out, split } => emoji::import(&packages, &out, &split.into())
            .with_context(|| format!("importing emoji from {} (run `make fetch-emoji`)", packages.display()))?,
        DataSource::FashionMnist { source, out, split, split_args } => {
            let split = match split.as_str() {
                "hashed" => fashion_mnist::FashionSplit::Hashed(split_args.into()),
                _ => fashion_mnist::FashionSplit::Official,
            };
            fashion_mnist::import(&source, &out, &split)
                .with_context(|| format!("importing Fashion-MNIST from {}", source.display()))?
        }
        DataSource::Folder { csv, out, split } => folder::import(&csv, &out, &split.into())
            .with_context(|| format!("importing images listed in {}", csv.display()))?,
    };
    println!("{}\n{}", manifest.dir.join(hiercon::catalogue::MANIFEST_FILE).display(), manifest.summary());
    Ok(())
}
