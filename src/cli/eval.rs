//! `hiercon eval`: one evaluation (manifest, local index or Milvus), `--compare` and `--study`.

use anyhow::{Context, Result};
use clap::Args;
use hiercon::catalogue::Subset;
use hiercon::encoder::{Encoder, ModelMeta, OrtEncoder, TestEncoder};
use hiercon::eval::{self, EvalConfig, EvaluatedModel, Retrieval};
use hiercon::image::Limits;
use hiercon::runtime::RuntimeOptions;
use hiercon::search::{SearchConfig, Service};
use std::path::PathBuf;
use std::sync::Arc;

use super::parse_subset;

#[derive(Args, Debug)]
pub(crate) struct EvalArgs {
    /// Compare run directories instead (each `runs/NAME/` with model.json and eval-train.json /
    /// eval-test.json): one table, rows = runs, columns = metrics on seen and unseen products.
    #[arg(long, num_args = 1.., conflicts_with_all = ["model", "manifest", "index", "split", "test_encoder"])]
    pub(crate) compare: Vec<PathBuf>,
    /// Summarise a multi-seed study instead (`DIR/NAME-s<seed>/eval-<split>.json` and
    /// `eval-backbone-<split>.json`, as scripts/study.sh writes them): mean ± std over seeds per
    /// setting, split and level (top-1, top-5, mAP, NMI).
    #[arg(long, conflicts_with_all = ["model", "manifest", "index", "split", "test_encoder", "compare"])]
    pub(crate) study: Option<PathBuf>,
    /// With --study: settings to compare, `A,B` (A − B and its standard error); repeatable.
    #[arg(long, requires = "study", value_name = "A,B")]
    pub(crate) pair: Vec<String>,
    /// Exported model `X.onnx` (its description `X.json` beside it).
    #[arg(long, required_unless_present_any = ["test_encoder", "compare", "study"])]
    pub(crate) model: Option<PathBuf>,
    /// Catalogue manifest; its images of the chosen split are embedded (not needed with --index
    /// or --milvus).
    #[arg(long, required_unless_present_any = ["index", "milvus", "compare", "study"])]
    pub(crate) manifest: Option<PathBuf>,
    /// `train` evaluates the seen products (shown in training), `test` the unseen ones, `val`
    /// the validation hold-out of the seen products (choose settings here, on a run trained with
    /// --split fit), `fit` the seen products outside it.
    #[arg(long, value_parser = parse_subset, required_unless_present_any = ["compare", "study"])]
    pub(crate) split: Option<Subset>,
    /// Evaluate what is served: rank through `index/<name>`'s live generation (built with the
    /// same model) via the search service, and report recall@10 of HNSW against exact search.
    #[arg(long)]
    pub(crate) index: Option<PathBuf>,
    /// Evaluate what Milvus serves instead: the collection the alias `--collection` names at this
    /// address (its items and stored embeddings of the split, ranked by Milvus's HNSW search).
    #[arg(long, requires = "collection", conflicts_with_all = ["index", "compare", "study"])]
    pub(crate) milvus: Option<String>,
    /// With --milvus: the alias `hiercon index --milvus --collection` switches.
    #[arg(long, requires = "milvus")]
    pub(crate) collection: Option<String>,
    /// Write PATH.md, PATH.json and PATH-acc.png (with --compare: PATH.md and PATH.json).
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
    /// Images per encoder call.
    #[arg(long, default_value_t = 64)]
    pub(crate) batch_size: usize,
    /// Evaluate a seeded random sample of at most this many queries (the gallery stays whole).
    #[arg(long)]
    pub(crate) max_queries: Option<usize>,
    /// Seed of the query sample and of k-means.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Levels with more classes than this get no NMI (k-means cost grows with classes).
    #[arg(long, default_value_t = 2000)]
    pub(crate) nmi_max_classes: usize,
    /// Decode every pixel of every JPEG (default: a JPEG at least twice the model's input size
    /// is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, several times faster on photos).
    #[arg(long)]
    pub(crate) full_jpeg_decode: bool,
    /// Use the deterministic test encoder of this width instead of a model (tests only).
    #[arg(long, hide = true)]
    pub(crate) test_encoder: Option<usize>,
}

/// `hiercon eval`: one evaluation, or a comparison of run directories.
pub(crate) fn run_eval(args: EvalArgs, rt_opts: &RuntimeOptions) -> Result<()> {
    if let Some(dir) = &args.study {
        let pairs: Vec<(String, String)> = args
            .pair
            .iter()
            .map(|p| {
                p.split_once(',')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .with_context(|| format!("--pair {p:?}: expected two settings as A,B"))
            })
            .collect::<Result<_>>()?;
        let summary = eval::study::summarize(&eval::study::read_study(dir)?, &pairs);
        println!("{}", summary.to_markdown());
        if let Some(prefix) = &args.report {
            for f in summary.write(prefix)? {
                eprintln!("wrote {}", f.display());
            }
        }
        return Ok(());
    }
    if !args.compare.is_empty() {
        let cmp = eval::compare::compare(&args.compare)?;
        println!("{}", cmp.to_markdown());
        if let Some(prefix) = &args.report {
            for f in cmp.write(prefix)? {
                eprintln!("wrote {}", f.display());
            }
        }
        return Ok(());
    }
    let split = args.split.context("--split is required")?;
    let encoder: Arc<dyn Encoder> = match (&args.test_encoder, &args.model) {
        (Some(dim), _) => Arc::new(TestEncoder::new(*dim, 0)),
        (None, Some(model)) => Arc::new(OrtEncoder::load(model, rt_opts)?),
        (None, None) => unreachable!("clap requires --model without --test-encoder"),
    };
    let mut model = EvaluatedModel {
        path: args.model.clone(),
        digest: encoder.digest().to_string(),
        dim: encoder.dim(),
        ..Default::default()
    };
    if let Some(path) = &args.model {
        let meta = ModelMeta::read(&ModelMeta::path_for(path))?;
        model.arch = Some(meta.arch);
        model.loss = meta.extra.get("loss").and_then(|v| v.as_str()).map(String::from);
    }
    let mut cfg = EvalConfig::new(split);
    cfg.max_queries = args.max_queries;
    cfg.seed = args.seed;
    cfg.nmi_max_classes = args.nmi_max_classes;
    let report = match &args.index {
        None if args.milvus.is_some() => {
            let (address, alias) =
                (args.milvus.as_deref().unwrap_or_default(), args.collection.as_deref().unwrap_or_default());
            let backend = hiercon::milvus::MilvusBackend::new(address, alias, std::time::Duration::from_secs(60))?;
            let data = eval::data_from_milvus(&backend, split)?;
            let service = Service::open_milvus(backend, encoder.clone(), SearchConfig::default())?;
            eval::evaluate(&data, Retrieval::Served(&service), &cfg, model)?
        }
        Some(index_dir) => {
            let service = Service::open(index_dir.clone(), encoder.clone(), SearchConfig::default())?;
            let g = service.local().context("a local index")?;
            if let Some(m) = &args.manifest
                && std::path::absolute(m).ok().as_ref() != Some(&g.meta.manifest)
            {
                tracing::warn!(
                    given = %m.display(), indexed = %g.meta.manifest.display(),
                    "--manifest differs from the manifest the index was built from; evaluating the index's items"
                );
            }
            let data = eval::data_from_generation(&g, split)?;
            eval::evaluate(&data, Retrieval::Served(&service), &cfg, model)?
        }
        None => {
            let manifest = args.manifest.as_ref().context("--manifest is required without --index")?;
            let limits = Limits { jpeg_dct_scaling: !args.full_jpeg_decode, ..Limits::default() };
            let data = eval::embed_manifest(manifest, split, encoder.as_ref(), args.batch_size, &limits)?;
            eval::evaluate(&data, Retrieval::Exact, &cfg, model)?
        }
    };
    println!("{}", report.to_markdown());
    if let Some(prefix) = &args.report {
        for f in report.write(prefix)? {
            eprintln!("wrote {}", f.display());
        }
    }
    Ok(())
}
