//! `hiercon train`, `hiercon export` and `hiercon export-loss`.

use anyhow::{Context, Result};
use clap::Args;
use hiercon::catalogue::{Manifest, Subset};
use hiercon::image::Augment;
use hiercon::loss::{self, LossOptions, LossShape};
use hiercon::model::imported::{ImportOptions, Imported};
use hiercon::model::{self as hmodel, Arch, Init, ModelConfig};
use hiercon::runtime::RuntimeOptions;
use hiercon::train::{OptimizerKind, SamplerKind, TrainConfig, TrainEnv};
use std::path::PathBuf;

use super::{parse_subset, rgb3};

#[derive(Args, Debug)]
pub(crate) struct TrainArgs {
    /// Catalogue manifest (JSON Lines).
    #[arg(long)]
    pub(crate) manifest: PathBuf,
    /// Which part of the catalogue to train on: train (all seen products), or fit (seen products
    /// minus the validation hold-out: for runs that choose settings, evaluated on --split val).
    #[arg(long, default_value = "train", value_parser = parse_subset)]
    pub(crate) split: Subset,
    #[command(flatten)]
    pub(crate) loss: LossOptions,
    /// Backbone.
    #[arg(long, value_enum, default_value_t = Arch::ResnetMini)]
    pub(crate) arch: Arch,
    /// Initial backbone weights (default: pretrained for the EfficientNet-Lite archs, whose
    /// ImageNet weights `make pretrained` fetches; random for the ResNets).
    #[arg(long, value_enum)]
    pub(crate) init: Option<Init>,
    /// Pretrained weights file (`.pth` legacy PyTorch or safetensors; default: the arch's own
    /// under .cache/pretrained/).
    #[arg(long)]
    pub(crate) weights: Option<PathBuf>,
    /// Keep the first N backbone units frozen (constants, BatchNorm in inference form): the stem,
    /// then each stage (EfficientNet-Lite: stem, 7 block stages, head conv = 9 units; ResNet:
    /// stem + 4 layers; --init-onnx: the first N weight layers, as `hiercon import` numbers
    /// them). Needs a pretrained start.
    #[arg(long, default_value_t = 0)]
    pub(crate) freeze: usize,
    /// Side of the square training images, in pixels (default: 64; EfficientNet-Lite: its
    /// native 224 / 240 / 260; --init-onnx: the file's fixed size, or 224).
    #[arg(long)]
    pub(crate) image_size: Option<usize>,
    /// Fine-tune an imported ONNX model (see `hiercon import`): its graph cut before the
    /// classifier is the backbone, its initializers the start; --freeze N then counts its
    /// weight layers (Conv, Gemm, MatMul).
    #[arg(long, conflicts_with_all = ["arch", "init", "weights"])]
    pub(crate) init_onnx: Option<PathBuf>,
    /// With --init-onnx: where to cut (a value or node name; default: the classifier's input).
    #[arg(long, requires = "init_onnx")]
    pub(crate) cut: Option<String>,
    /// With --init-onnx: per-channel mean on 0..1 RGB pixels (default: ImageNet's).
    #[arg(long, value_delimiter = ',', requires = "init_onnx", value_name = "R,G,B")]
    pub(crate) mean: Option<Vec<f32>>,
    /// With --init-onnx: per-channel std on 0..1 RGB pixels (default: ImageNet's).
    #[arg(long, value_delimiter = ',', requires = "init_onnx", value_name = "R,G,B")]
    pub(crate) std: Option<Vec<f32>>,
    /// With --init-onnx: the model wants BGR channels (reversed after normalisation).
    #[arg(long, requires = "init_onnx")]
    pub(crate) bgr: bool,
    /// Samples per batch (each gives two augmented views).
    #[arg(long, default_value_t = 32)]
    pub(crate) batch_size: usize,
    /// Train until this many times the split's item count has been drawn:
    /// steps = ceil(epochs x items / batch size).
    #[arg(long, conflicts_with = "steps")]
    pub(crate) epochs: Option<f64>,
    /// Train for this many optimizer steps (default: 10 epochs).
    #[arg(long)]
    pub(crate) steps: Option<usize>,
    /// Optimizer.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Sgd)]
    pub(crate) optimizer: OptimizerKind,
    /// Peak learning rate (default: 0.1 for sgd, 1e-3 for adamw).
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Weight decay (default: 1e-4 for sgd, 0.05 for adamw).
    #[arg(long)]
    pub(crate) weight_decay: Option<f64>,
    /// Linear warm-up steps before the cosine decay (default: 5% of the steps).
    #[arg(long)]
    pub(crate) warmup: Option<usize>,
    /// Batch sampler.
    #[arg(long, value_enum, default_value_t = SamplerKind::Hierarchical)]
    pub(crate) sampler: SamplerKind,
    /// Seed of the initial parameters, the sampler and the augmentations.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Save a checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 100)]
    pub(crate) checkpoint_every: usize,
    /// Frozen-prefix view cache: draw K augmented views of every training image once, run them
    /// through the frozen units (--freeze) once, keep the result (f16, memory-mapped), and let each
    /// step run only the trainable units on two of an image's K views. Much faster; the cost is
    /// augmentation diversity (K fixed views per image instead of fresh ones each step). 0 = off.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub(crate) view_cache: usize,
    /// Leave a label column out of the loss and the sampler, by name (repeatable): level1, level2,
    /// .., product, variation. E.g. `--drop-level variation` makes the product the finest
    /// hierarchical level.
    #[arg(long = "drop-level", value_name = "NAME")]
    pub(crate) drop_levels: Vec<String>,
    /// Where view caches are kept (one folder per key: weights, frozen units, size,
    /// augmentation, seed, K, images); runs with equal keys share one.
    #[arg(long, env = "HIERCON_VIEW_CACHE_DIR", default_value = hiercon::train::trainer::DEFAULT_VIEW_CACHE_DIR)]
    pub(crate) view_cache_dir: PathBuf,
    /// Run directory (config.json, metrics.jsonl, loss.png, checkpoint, model.onnx).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Testing aid: stop abruptly after this step, as if killed (no checkpoint, no export).
    #[arg(long, hide = true)]
    pub(crate) halt_after: Option<usize>,
    /// Only redraw OUT/loss.png from OUT/metrics.jsonl.
    #[arg(long, hide = true)]
    pub(crate) replot: bool,
}

#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    /// Backbone (one with pretrained weights).
    #[arg(long, value_enum)]
    pub(crate) arch: Arch,
    /// Where the weights come from (only `pretrained` makes sense without training).
    #[arg(long, value_enum, default_value_t = Init::Pretrained)]
    pub(crate) init: Init,
    /// Pretrained weights file (default: the arch's own under .cache/pretrained/).
    #[arg(long)]
    pub(crate) weights: Option<PathBuf>,
    /// Export the normalised pooled feature without a projection head (required: an untrained
    /// head would only scramble the feature).
    #[arg(long)]
    pub(crate) no_head: bool,
    /// Input side in pixels (default: the arch's native size).
    #[arg(long)]
    pub(crate) image_size: Option<usize>,
    /// Output model file `X.onnx` (`X.json` is written beside it).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct ExportLossArgs {
    /// Samples per batch N (the features have 2N rows: two views per sample).
    #[arg(long)]
    pub(crate) batch: usize,
    /// Label columns K (coarse -> fine, the last one the image id).
    #[arg(long)]
    pub(crate) columns: usize,
    /// Feature dimension D.
    #[arg(long)]
    pub(crate) dim: usize,
    /// Classes C of the `ce` baseline (required for `--loss ce`).
    #[arg(long)]
    pub(crate) classes: Option<usize>,
    #[command(flatten)]
    pub(crate) loss: LossOptions,
    /// Output model file.
    #[arg(short = 'o', long = "out")]
    pub(crate) out: PathBuf,
}

pub(crate) fn train(args: TrainArgs, rt_opts: &RuntimeOptions) -> Result<()> {
    if args.replot {
        return Ok(hiercon::train::replot(&args.out)?);
    }
    let items = if args.steps.is_none() {
        let m = Manifest::read(&args.manifest)?;
        args.split.select(&m.items).len()
    } else {
        0
    };
    let steps = match (args.steps, args.epochs) {
        (Some(s), _) => s,
        (None, e) => (e.unwrap_or(10.0) * items as f64 / args.batch_size.max(1) as f64).ceil() as usize,
    };
    let (arch, image_size, normalization) = match &args.init_onnx {
        Some(path) => {
            let size = match args.image_size {
                Some(s) => s,
                None => {
                    let o = ImportOptions { cut: args.cut.clone(), size: None, bgr: args.bgr };
                    Imported::load(path, &o)?.size
                }
            };
            let norm = (
                rgb3("mean", args.mean.as_deref(), hmodel::IMAGENET_MEAN)?,
                rgb3("std", args.std.as_deref(), hmodel::IMAGENET_STD)?,
            );
            (Arch::Onnx, size, Some(norm))
        }
        None => {
            let a = args.arch;
            (a, args.image_size.unwrap_or(if a.is_efficientnet() { a.native_size() } else { 64 }), None)
        }
    };
    let cfg = TrainConfig {
        manifest: args.manifest,
        split: args.split,
        loss: args.loss,
        arch,
        image_size,
        batch_size: args.batch_size,
        steps,
        optimizer: args.optimizer,
        lr: args.lr.unwrap_or(TrainConfig::default_lr(args.optimizer)),
        weight_decay: args.weight_decay.unwrap_or(TrainConfig::default_weight_decay(args.optimizer)),
        warmup: args.warmup.unwrap_or(steps / 20),
        sampler: args.sampler,
        augment: Augment::default(),
        seed: args.seed,
        checkpoint_every: args.checkpoint_every,
        init: if args.init_onnx.is_some() { Init::Pretrained } else { args.init.unwrap_or(Init::default_for(arch)) },
        weights: args.weights,
        freeze: args.freeze,
        init_onnx: args.init_onnx,
        cut: args.cut,
        normalization,
        bgr: args.bgr,
        view_cache: args.view_cache,
        drop_levels: args.drop_levels,
    };
    let env =
        TrainEnv { halt_after: args.halt_after, view_cache_dir: Some(args.view_cache_dir), ..TrainEnv::default() };
    let out = hiercon::train::train(&cfg, &args.out, args.resume, rt_opts, &env)?;
    println!(
        "trained {} steps in {:.1} s, final loss {:.4}; model: {}",
        out.steps,
        out.seconds,
        out.final_loss,
        out.model.display()
    );
    Ok(())
}

pub(crate) fn export_model(args: ExportArgs) -> Result<()> {
    if !args.no_head {
        anyhow::bail!(
            "export without training writes the backbone's feature: pass --no-head (a projection head needs `hiercon train`)"
        );
    }
    if args.init != Init::Pretrained {
        anyhow::bail!("a zero-shot model of random weights measures nothing: use --init pretrained");
    }
    let path = hmodel::pretrained::locate(args.arch, args.weights.as_deref())?;
    let weights = hmodel::pretrained::load(&path)?;
    let cfg = ModelConfig::feature_only(args.arch, args.image_size.unwrap_or(args.arch.native_size()));
    let mut extra = serde_json::Map::new();
    // `eval --compare` shows this as the row's loss.
    extra.insert("loss".into(), serde_json::Value::String("none (zero-shot)".into()));
    extra.insert(
        "zero_shot".into(),
        serde_json::json!({
            "weights": path,
            "sha256": hmodel::pretrained::file_digest(&path)?,
            "feature": "L2-normalised global-average-pooled backbone feature, no head, no training",
        }),
    );
    let meta = hmodel::export(&cfg, &weights, &args.out, extra)?;
    println!(
        "exported {} ({}-d feature at {} px, weights {}) to {}",
        args.arch,
        meta.output.dim,
        meta.input.size,
        path.display(),
        args.out.display()
    );
    Ok(())
}

pub(crate) fn export_loss(args: ExportLossArgs) -> Result<()> {
    let shape = LossShape { batch: args.batch, columns: args.columns, dim: args.dim, classes: args.classes };
    let bytes = loss::export_loss(&args.loss, shape)?;
    std::fs::write(&args.out, bytes).with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!(path = %args.out.display(), loss = args.loss.kind.name(), "wrote the loss model");
    Ok(())
}
