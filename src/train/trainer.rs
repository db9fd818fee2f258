//! The training loop behind `hiercon train`: batches from the sampler, two augmented views per
//! sample, one compiled step graph per step, metrics, checkpoints, resume and export.
//!
//! A run directory `runs/NAME/` holds:
//! - `config.json`: the [`TrainConfig`] the run was started with;
//! - `metrics.jsonl`: one line per step, `{"step", "loss", "level_losses", "lr", "images_per_s"}`;
//! - `checkpoint.safetensors`: the last checkpoint (parameters, buffers, optimizer state; its
//!   metadata holds the step and the sampler state), replaced atomically;
//! - `loss.png`: the loss curve (total and per level);
//! - `model.onnx` + `model.json`: the exported encoder, written at the end.
//!
//! Determinism: the sampler is seeded and resumable, and each view's augmentation draws from a
//! generator seeded by `(seed, step, slot)`, so a resumed run sees exactly the batches and views
//! an uninterrupted one would.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ndarray::{Array2, Array4, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::checkpoint::Checkpoint;
use super::sampler::{Sampler, SamplerConfig, SamplerKind, SamplerState};
use super::schedule::Schedule;
use super::session::TrainSession;
use super::views::{self, ViewCache, ViewKey};
use crate::catalogue::{Labels, Manifest, Subset};
use crate::graph::{AdamW, GradOptions, Optimizer, Sgd, Tensor};
use crate::image::{Augment, Limits, Preprocess, augment, decode_file};
use crate::loss::LossOptions;
use crate::model::imported::{ImportOptions, Imported};
use crate::model::{self, Arch, Init, ModelConfig, Weights};
use crate::pipeline::pipelined;
use crate::plot::{LineChart, Series};
use crate::progress::Progress;
use crate::runtime::RuntimeOptions;
use crate::{Error, Result};

/// Which optimizer fragment the step graph gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with momentum 0.9 and weight decay (the paper's).
    #[default]
    Sgd,
    /// AdamW (betas 0.9 / 0.999, eps 1e-8, decoupled weight decay).
    Adamw,
}

/// Everything that decides a training run. Saved as `config.json`; a resumed run must match it
/// (only `steps` may grow, to extend a finished run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub manifest: PathBuf,
    /// The part of the catalogue trained on: `train` (all seen products) or `fit` (seen products
    /// minus the validation hold-out, for runs that choose settings).
    pub split: Subset,
    pub loss: LossOptions,
    pub arch: Arch,
    pub image_size: usize,
    /// Samples per batch; each gives two views, so a step sees `2 * batch_size` images.
    pub batch_size: usize,
    /// Total optimizer steps.
    pub steps: usize,
    pub optimizer: OptimizerKind,
    /// Peak learning rate.
    pub lr: f64,
    pub weight_decay: f64,
    /// Linear warm-up steps before the cosine decay.
    pub warmup: usize,
    pub sampler: SamplerKind,
    pub augment: Augment,
    pub seed: u64,
    /// Save a checkpoint every this many steps (and always at the end).
    pub checkpoint_every: usize,
    /// Initial backbone weights: seeded random or pretrained (the projection head is always new).
    #[serde(default)]
    pub init: Init,
    /// The pretrained weights file; `None`: the architecture's own from `make pretrained`.
    #[serde(default)]
    pub weights: Option<PathBuf>,
    /// Leading backbone units (stem, stages, ...) kept frozen: constants of the step graph with
    /// BatchNorm in inference form.
    #[serde(default)]
    pub freeze: usize,
    /// An imported ONNX backbone (`--init-onnx`, with `arch` = `onnx`): its weights are the
    /// start and `freeze` counts its weight layers.
    #[serde(default)]
    pub init_onnx: Option<PathBuf>,
    /// Where the imported model is cut (`--cut`); `None` finds the input of its classifier.
    #[serde(default)]
    pub cut: Option<String>,
    /// Per-channel mean and std on 0..1 pixels for an imported model.
    #[serde(default)]
    pub normalization: Option<([f32; 3], [f32; 3])>,
    /// The imported model wants BGR channels.
    #[serde(default)]
    pub bgr: bool,
    /// Views per image of the frozen-prefix view cache (`--view-cache K`, see
    /// [`super::views`]); 0 = off: every step augments fresh views and runs the whole network.
    #[serde(default)]
    pub view_cache: usize,
    /// Label columns left out of the loss and the sampler (`--drop-level`, by name: `level1`..,
    /// `product`, `variation`): e.g. `variation`, so the finest hierarchical level is the product.
    #[serde(default)]
    pub drop_levels: Vec<String>,
}

impl TrainConfig {
    /// The default learning rate of an optimizer: 0.1 for SGD, 1e-3 for AdamW.
    pub fn default_lr(o: OptimizerKind) -> f64 {
        match o {
            OptimizerKind::Sgd => 0.1,
            OptimizerKind::Adamw => 1e-3,
        }
    }

    /// The default weight decay: 1e-4 for SGD (the paper's), 0.05 for AdamW.
    pub fn default_weight_decay(o: OptimizerKind) -> f64 {
        match o {
            OptimizerKind::Sgd => 1e-4,
            OptimizerKind::Adamw => 0.05,
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::TrainConfig { reason });
        if self.batch_size < 2 {
            return bad(format!("batch size must be at least 2, got {}", self.batch_size));
        }
        if self.steps == 0 {
            return bad("the run has no steps: give --steps or --epochs above zero".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate must be finite and positive, got {}", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight decay must be finite and >= 0, got {}", self.weight_decay));
        }
        if self.checkpoint_every == 0 {
            return bad("--checkpoint-every must be at least 1".into());
        }
        if self.image_size < 16 {
            return bad(format!("image size {} is too small (at least 16)", self.image_size));
        }
        if self.freeze > 0 && self.init == Init::Random {
            return bad("--freeze keeps layers at their initial values: it needs --init pretrained".into());
        }
        if self.weights.is_some() && self.init == Init::Random {
            return bad("--weights is a pretrained start: it needs --init pretrained".into());
        }
        if (self.init_onnx.is_some()) != (self.arch == Arch::Onnx) {
            return bad("an imported model (--init-onnx) and arch `onnx` go together".into());
        }
        if self.init_onnx.is_some() && (self.init == Init::Random || self.weights.is_some()) {
            return bad("--init-onnx starts from the file's own weights: drop --init random / --weights".into());
        }
        if self.init_onnx.is_none() && (self.cut.is_some() || self.normalization.is_some() || self.bgr) {
            return bad("--cut, --mean, --std and --bgr apply to an imported model: they need --init-onnx".into());
        }
        if self.view_cache > 0 {
            if self.view_cache < 2 {
                return bad(format!(
                    "--view-cache needs at least 2 views per image (a step takes two), got {}",
                    self.view_cache
                ));
            }
            if self.freeze == 0 {
                return bad("--view-cache stores the frozen units' output: it needs --freeze 1 or more".into());
            }
            if self.init_onnx.is_some() {
                return bad("--view-cache works with the native backbones; an imported model's frozen layers need not end at one tensor".into());
            }
        }
        if self.split == Subset::Test {
            return bad(
                "training on the unseen split (test) would leave nothing unseen: use train, or fit to choose settings"
                    .into(),
            );
        }
        self.loss.validate()?;
        self.augment.validate()
    }

    fn optimizer(&self) -> Optimizer {
        match self.optimizer {
            OptimizerKind::Sgd => {
                Optimizer::Sgd(Sgd { momentum: 0.9, weight_decay: self.weight_decay, nesterov: false })
            }
            OptimizerKind::Adamw => Optimizer::AdamW(AdamW { weight_decay: self.weight_decay, ..AdamW::default() }),
        }
    }

    fn schedule(&self) -> Schedule {
        Schedule { base: self.lr, warmup: self.warmup.min(self.steps.saturating_sub(1)), total: self.steps }
    }

    fn model(&self, imported: Option<Arc<Imported>>) -> ModelConfig {
        match imported {
            Some(m) => {
                let (mean, std) = self.normalization.unwrap_or((model::IMAGENET_MEAN, model::IMAGENET_STD));
                ModelConfig { freeze: self.freeze, ..ModelConfig::imported(m, mean, std, self.seed) }
            }
            None => ModelConfig { freeze: self.freeze, ..ModelConfig::new(self.arch, self.image_size, self.seed) },
        }
    }

    /// The imported backbone of `--init-onnx`, read and checked.
    fn import(&self) -> Result<Option<Arc<Imported>>> {
        let Some(path) = &self.init_onnx else { return Ok(None) };
        let o = ImportOptions { cut: self.cut.clone(), size: Some(self.image_size), bgr: self.bgr };
        let m = Imported::load(path, &o)?;
        tracing::info!(
            "imported {} ({} nodes up to `{}`, {}; {}-d feature, {} weight layers)",
            path.display(),
            m.needed.len(),
            m.cut,
            m.cut_reason,
            m.feature_dim,
            m.units.len()
        );
        Ok(Some(Arc::new(m)))
    }

    /// Everything but `steps` must match for a run to be resumed with this configuration.
    fn resumable_from(&self, saved: &TrainConfig) -> Result<()> {
        let mut a = self.clone();
        a.steps = saved.steps;
        if a != *saved {
            let ours = serde_json::to_value(&a).unwrap_or_default();
            let theirs = serde_json::to_value(saved).unwrap_or_default();
            let differing: Vec<String> = match (ours, theirs) {
                (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                    x.iter().filter(|(k, v)| y.get(*k) != Some(v)).map(|(k, _)| k.clone()).collect()
                }
                _ => vec![],
            };
            return Err(Error::TrainResume {
                reason: format!("the options differ from the saved run's config.json in: {}", differing.join(", ")),
            });
        }
        if self.steps < saved.steps {
            return Err(Error::TrainResume {
                reason: format!("--steps {} is below the saved run's {}", self.steps, saved.steps),
            });
        }
        Ok(())
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based: the number of optimizer steps taken so far.
    pub step: usize,
    pub loss: f64,
    /// Per-level losses, finest level first (one value for the baselines).
    pub level_losses: Vec<f64>,
    pub lr: f64,
    pub images_per_s: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub steps: usize,
    pub final_loss: f64,
    /// Wall seconds of the steps (summed over resumes).
    pub seconds: f64,
    pub model: PathBuf,
    /// Wall seconds this call spent opening or building the view cache.
    pub view_cache_seconds: Option<f64>,
}

/// Checkpoint metadata beside the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointMeta {
    step: usize,
    sampler: SamplerState,
    /// Wall seconds spent training before this checkpoint (summed over resumes).
    seconds: f64,
    /// sha256 of the pretrained weights file the run started from (frozen layers are not in
    /// the checkpoint, so a resume must read the same file).
    #[serde(default)]
    weights_digest: Option<String>,
}

/// The run directory's files.
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
    pub fn loss_plot(&self) -> PathBuf {
        self.dir.join("loss.png")
    }
    pub fn model(&self) -> PathBuf {
        self.dir.join("model.onnx")
    }
    /// The trained backbone's own normalised pooled feature, without the projection head (the
    /// representation SupCon-style training usually keeps; compared with `model.onnx` by eval).
    pub fn backbone_model(&self) -> PathBuf {
        self.dir.join("backbone.onnx")
    }
}

/// How a run executes, beyond what decides its result (never part of `config.json`).
#[derive(Debug, Clone, Default)]
pub struct TrainEnv {
    /// Testing aid: stop after this step as if killed (no checkpoint, no export).
    pub halt_after: Option<usize>,
    /// Where view caches live (`--view-cache-dir`); `None`: `.cache/views` in the working
    /// directory. Runs with the same key share one cache.
    pub view_cache_dir: Option<PathBuf>,
    /// How trained depthwise convolutions are written (the benchmark's "before" row sets
    /// `Conv`, the grouped Conv every step used before the dense form).
    pub depthwise: crate::graph::DepthwiseLowering,
    /// Prepare batches on the calling thread between steps instead of on the prefetch worker
    /// (the benchmark's "before" row).
    pub serial_batches: bool,
}

/// The default home of view caches, relative to the working directory.
pub const DEFAULT_VIEW_CACHE_DIR: &str = ".cache/views";

/// Trains (or resumes) the run in `out` and exports its model.
pub fn train(cfg: &TrainConfig, out: &Path, resume: bool, rt: &RuntimeOptions, env: &TrainEnv) -> Result<TrainOutcome> {
    cfg.check()?;
    let run = RunDir { dir: out.to_path_buf() };
    let manifest = Manifest::read(&cfg.manifest)?;
    let items: Vec<_> = cfg.split.select(&manifest.items);
    if items.len() < cfg.batch_size {
        return Err(Error::TrainConfig {
            reason: format!(
                "{} has {} {} items, fewer than one batch of {}",
                cfg.manifest.display(),
                items.len(),
                cfg.split.as_str(),
                cfg.batch_size
            ),
        });
    }
    let labels = Labels::encode(items.iter().copied());
    // The label columns the loss and the sampler see: all, or all but --drop-level ones.
    let kept = loss_columns(&labels, &cfg.drop_levels)?;
    let rows = labels.rows.select(Axis(1), &kept).as_standard_layout().into_owned();
    let k = kept.len();
    let ce_classes = match cfg.loss.kind {
        crate::loss::LossKind::Ce => Some(labels.classes(kept[cfg.loss.ce_columns(k)? - 1])),
        _ => None,
    };

    // Pretrained weights: the start of a new run, and on resume the frozen layers' values.
    let imported = cfg.import()?;
    let model_cfg = cfg.model(imported.clone());
    model_cfg.validate()?;
    let pretrained: Option<(Weights, PathBuf, String)> = match cfg.init {
        _ if imported.is_some() => imported.as_ref().map(|m| (m.weights(), m.path().clone(), m.sha256.clone())),
        Init::Random => None,
        Init::Pretrained => {
            let path = model::pretrained::locate(cfg.arch, cfg.weights.as_deref())?;
            let w = model::pretrained::load(&path)?;
            let digest = model::pretrained::file_digest(&path)?;
            tracing::info!("pretrained start from {} ({} tensors)", path.display(), w.len());
            Some((w, path, digest))
        }
    };
    let weights_digest = pretrained.as_ref().map(|p| p.2.clone());

    // Resume or start.
    let (start, state, sampler, spent) = if resume {
        let saved: TrainConfig = read_json(&run.config())?;
        cfg.resumable_from(&saved)?;
        let ckpt = Checkpoint::load(&run.checkpoint())?;
        let meta: CheckpointMeta = serde_json::from_value(ckpt.meta.clone()).map_err(|e| Error::TrainResume {
            reason: format!("{}: checkpoint metadata: {e}", run.checkpoint().display()),
        })?;
        if meta.weights_digest.is_some() && meta.weights_digest != weights_digest {
            return Err(Error::TrainResume {
                reason: format!(
                    "the pretrained weights ({}) are not the file the run started from (sha256 {})",
                    pretrained.as_ref().map_or("none".into(), |p| p.1.display().to_string()),
                    meta.weights_digest.as_deref().unwrap_or("-")
                ),
            });
        }
        let sampler = Sampler::from_state(rows.as_slice().expect("standard layout"), k, &meta.sampler)?;
        truncate_metrics(&run.metrics(), meta.step)?;
        tracing::info!(step = meta.step, "resuming {}", run.dir.display());
        (meta.step, Some(ckpt.state), sampler, meta.seconds)
    } else {
        if run.checkpoint().exists() {
            return Err(Error::TrainConfig {
                reason: format!(
                    "{} already holds a run (checkpoint.safetensors): pass --resume to continue it, or choose another --out",
                    run.dir.display()
                ),
            });
        }
        std::fs::create_dir_all(&run.dir).map_err(|e| Error::io(&run.dir, e))?;
        let _ = std::fs::remove_file(run.metrics());
        let sampler = Sampler::new(
            rows.as_slice().expect("standard layout"),
            k,
            SamplerConfig::new(cfg.sampler, cfg.batch_size, cfg.seed),
        )?;
        (0, None, sampler, 0.0)
    };
    write_json(&run.config(), cfg)?;
    let mut sampler = sampler;
    if start >= cfg.steps {
        tracing::info!("the run already has {start} steps; exporting");
    }

    let images = Arc::new(load_images(&manifest, &items)?);
    let (mean, std) = model_cfg.normalization();
    let pre = Preprocess { size: cfg.image_size as u32, mean, std };
    // Where batches come from: fresh augmentations of the images, or pooled views from the
    // frozen-prefix cache (then the step graph starts after the frozen units).
    let cache_started = Instant::now();
    let (input, source) = if cfg.view_cache > 0 {
        let (cache, shape) = open_view_cache(cfg, &model_cfg, pretrained.as_ref(), images.clone(), rt, env)?;
        (model::StepInput::Features(shape), BatchSource::Cache(Arc::new(cache)))
    } else {
        (model::StepInput::Images, BatchSource::Fresh { images: images.clone(), augment: cfg.augment, pre })
    };
    let view_cache_seconds = (cfg.view_cache > 0).then(|| cache_started.elapsed().as_secs_f64());
    let loss_opts = cfg.loss.clone();
    let step_graph = model::step_graph_with(
        &model_cfg,
        pretrained.as_ref().filter(|_| model_cfg.imported.is_none()).map(|p| &p.0),
        cfg.batch_size,
        k,
        &cfg.optimizer(),
        &GradOptions { depthwise: env.depthwise, ..GradOptions::for_runtime(rt) },
        &input,
        |g, emb, lab| {
            let parts = crate::loss::graph::loss_graph(g, emb, lab, &loss_opts, ce_classes)?;
            Ok(model::LossParts { loss: parts.loss, level_losses: parts.level_losses })
        },
    )?;
    let mut session = TrainSession::new(&step_graph, rt, state)?;
    if let Some(b) = session.nchwc_block() {
        tracing::info!("convolutions on ONNX Runtime's NCHWc kernels (block {b})");
    }
    session.set_steps_done(start as u64);
    let schedule = cfg.schedule();

    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.metrics())
        .map_err(|e| Error::io(run.metrics(), e))?;
    let progress = Progress::new(format!("train {}", cfg.loss.kind.name()), cfg.steps as u64, "steps");
    progress.inc(start as u64);
    let started = Instant::now();
    let mut last = None;
    // Batches are prepared on a worker thread up to PREFETCH steps ahead of the session. Each
    // job carries the sampler state after its draw: that is what its checkpoint saves, so a
    // resumed run continues exactly where the uninterrupted one would.
    let seed = cfg.seed;
    let jobs = (start..cfg.steps).map(|step| {
        let batch = sampler.next_batch();
        (step, batch, sampler.state())
    });
    let mut t0 = Instant::now();
    pipelined(
        if env.serial_batches { 0 } else { PREFETCH },
        jobs,
        |(step, batch, state)| (step, source.batch(seed, step, &batch), batch, state),
        |(step, x, batch, sampler_state)| -> Result<()> {
            let y = batch_labels(&rows, &batch);
            let lr = schedule.lr(step);
            let out = session.run(&Tensor::F32(x.into_dyn()), &Tensor::I64(y.into_dyn()), lr)?;
            if !out.loss.is_finite() || out.level_losses.iter().any(|l| !l.is_finite()) {
                progress.finish();
                return Err(Error::TrainDiverged {
                    step: step + 1,
                    what: format!("the loss ({}, levels {:?})", out.loss, out.level_losses),
                    checkpoint: run.checkpoint().exists().then(|| run.checkpoint()),
                });
            }
            // Wall time between consecutive steps: batch preparation the worker did not hide
            // counts, as it does for the user.
            let m = StepMetrics {
                step: step + 1,
                loss: out.loss,
                level_losses: out.level_losses.clone(),
                lr,
                images_per_s: (2 * cfg.batch_size) as f64 / t0.elapsed().as_secs_f64(),
            };
            t0 = Instant::now();
            let line = serde_json::to_string(&m).expect("metrics serialise");
            writeln!(metrics, "{line}").map_err(|e| Error::io(run.metrics(), e))?;
            progress.set_message(format!(
                "loss {:.4} levels [{}] {:.0} img/s",
                m.loss,
                m.level_losses.iter().map(|l| format!("{l:.3}")).collect::<Vec<_>>().join(" "),
                m.images_per_s
            ));
            progress.inc(1);
            last = Some(m.loss);
            if env.halt_after == Some(step + 1) {
                metrics.flush().map_err(|e| Error::io(run.metrics(), e))?;
                return Err(Error::TrainHalted { step: step + 1 });
            }
            if (step + 1) % cfg.checkpoint_every == 0 || step + 1 == cfg.steps {
                let seconds = spent + started.elapsed().as_secs_f64();
                save_checkpoint(&run, &session, step + 1, sampler_state, seconds, weights_digest.clone())?;
            }
            Ok(())
        },
    )?;
    progress.finish();
    let seconds = spent + started.elapsed().as_secs_f64();

    let history = read_metrics(&run.metrics())?;
    plot_losses(&history, &run.loss_plot(), &format!("{} / {}", cfg.loss.kind.name(), cfg.arch.name()))?;
    let final_loss = last.or_else(|| history.last().map(|m| m.loss)).unwrap_or(f64::NAN);
    // Frozen layers are constants of the step graph: their values come from the pretrained file.
    let mut state = session.state()?;
    if let Some((w, _, _)) = &pretrained {
        for (n, t) in w {
            state.entry(n.clone()).or_insert_with(|| t.clone());
        }
    }
    let mut extra = serde_json::Map::new();
    extra.insert(
        "training".into(),
        serde_json::json!({
            "loss": cfg.loss.kind.name(),
            "loss_options": cfg.loss,
            "config": cfg,
            "manifest_digest": file_digest(&cfg.manifest)?,
            "items": items.len(),
            "steps": cfg.steps,
            "seconds": seconds,
            "final_loss": final_loss,
            "final_level_losses": history.last().map(|m| m.level_losses.clone()),
            "init": cfg.init,
            "freeze": cfg.freeze,
            "weights": pretrained.as_ref().map(|p| serde_json::json!({"path": p.1, "sha256": p.2})),
            "imported": model_cfg.imported.as_ref().map(|m| serde_json::json!({
                "path": m.path(), "sha256": m.sha256, "cut": m.cut, "feature_dim": m.feature_dim,
            })),
        }),
    );
    extra.insert("loss".into(), serde_json::Value::String(cfg.loss.kind.name().into()));
    model::export(&model_cfg, &state, &run.model(), extra.clone())?;
    model::export(&model_cfg.without_head(), &state, &run.backbone_model(), extra)?;
    Ok(TrainOutcome { steps: cfg.steps, final_loss, seconds, model: run.model(), view_cache_seconds })
}

/// Saves the session's state, unless a value in it is NaN or infinite (an update can blow up the
/// parameters while the loss it was computed with is still finite): then the run stops, and the
/// previous checkpoint stays the last good one.
fn save_checkpoint(
    run: &RunDir,
    session: &TrainSession,
    step: usize,
    sampler: SamplerState,
    seconds: f64,
    weights_digest: Option<String>,
) -> Result<()> {
    let state = session.state()?;
    if let Some(name) = state.iter().find(|(_, t)| t.to_f64_vec().iter().any(|x| !x.is_finite())).map(|(n, _)| n) {
        return Err(Error::TrainDiverged {
            step,
            what: format!("state `{name}`"),
            checkpoint: run.checkpoint().exists().then(|| run.checkpoint()),
        });
    }
    let meta = CheckpointMeta { step, sampler, seconds, weights_digest };
    let ckpt = Checkpoint { state, meta: serde_json::to_value(meta).expect("meta serialises") };
    ckpt.save(&run.checkpoint())
}

/// The label columns kept for the loss: every column but those named in `drop` (never the
/// image). Unknown or repeated names are errors that list the columns there are.
fn loss_columns(labels: &Labels, drop: &[String]) -> Result<Vec<usize>> {
    let names: Vec<&str> = labels.columns.iter().map(|c| c.name.as_str()).collect();
    for (i, d) in drop.iter().enumerate() {
        let known = names.iter().position(|n| n == d);
        if known.is_none() || d == "image" || drop[..i].contains(d) {
            return Err(Error::TrainConfig {
                reason: format!(
                    "--drop-level {d:?}: expected one of {} (each once; the image column always stays)",
                    names[..names.len() - 1].join(", ")
                ),
            });
        }
    }
    Ok((0..names.len()).filter(|&c| !drop.iter().any(|d| d == names[c])).collect())
}

/// Steps whose batches the worker prepares ahead of the session.
const PREFETCH: usize = 2;

/// Where a step's batch comes from.
enum BatchSource {
    /// Two fresh augmentations of each sample (`[2N, 3, S, S]`).
    Fresh { images: Arc<Vec<::image::RgbImage>>, augment: Augment, pre: Preprocess },
    /// Two different pooled views of each sample from the view cache (`[2N, C, H, W]`).
    Cache(Arc<ViewCache>),
}

impl BatchSource {
    /// The batch of `step` (row `i` the first view of sample `i`, row `i + N` its second); each
    /// sample draws from its own generator seeded by (seed, step, slot), as without a worker.
    fn batch(&self, seed: u64, step: usize, batch: &[usize]) -> Array4<f32> {
        match self {
            BatchSource::Fresh { images, augment, pre } => views(images, batch, augment, pre, seed, step),
            BatchSource::Cache(cache) => {
                let n = batch.len();
                let pairs: Vec<(usize, usize)> = (0..n)
                    .map(|slot| {
                        let mut rng = ChaCha8Rng::seed_from_u64(view_seed(seed, step, slot));
                        views::pick_pair(&mut rng, cache.key.views)
                    })
                    .collect();
                let picks: Vec<(usize, usize)> = (0..2 * n)
                    .map(|row| {
                        let (a, b) = pairs[row % n];
                        (batch[row % n], if row < n { a } else { b })
                    })
                    .collect();
                cache.batch(&picks)
            }
        }
    }
}

/// Opens (or builds) the run's view cache; returns it with the prefix output's `[C, H, W]`.
fn open_view_cache(
    cfg: &TrainConfig,
    model_cfg: &ModelConfig,
    pretrained: Option<&(Weights, PathBuf, String)>,
    images: Arc<Vec<::image::RgbImage>>,
    rt: &RuntimeOptions,
    env: &TrainEnv,
) -> Result<(ViewCache, Vec<usize>)> {
    let (weights, _, weights_sha256) =
        pretrained.ok_or_else(|| Error::TrainConfig { reason: "--view-cache needs a pretrained start".into() })?;
    let prefix = model::prefix_graph(model_cfg, CACHE_BATCH, Some(weights))?;
    let shape = prefix.shape(prefix.find("prefix").expect("the prefix graph's output"))[1..].to_vec();
    let key = ViewKey {
        format: views::VIEW_CACHE_FORMAT,
        arch: cfg.arch.name().to_string(),
        freeze: cfg.freeze,
        image_size: cfg.image_size,
        normalization: model_cfg.normalization(),
        augment: cfg.augment,
        seed: cfg.seed,
        views: cfg.view_cache,
        weights_sha256: weights_sha256.clone(),
        images_sha256: views::images_digest(&images),
        shape: shape.clone(),
    };
    let root = env.view_cache_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_VIEW_CACHE_DIR));
    // The prefix runs in inference form with constant weights, so ORT may use its fastest CPU
    // kernels (NCHWc) even though the step graph does not.
    let mut runner = crate::graph::Runner::new(&prefix, &RuntimeOptions { cpu_nchwc: false, ..*rt })?;
    let started = Instant::now();
    let (cache, opened) = ViewCache::open_or_build(&root, &key, &images, &mut runner, CACHE_BATCH)?;
    match opened {
        views::Opened::Reused => tracing::info!("view cache {} reused (K = {})", cache.dir.display(), key.views),
        views::Opened::Built { computed, resumed_from } => tracing::info!(
            "view cache {}: {computed} views computed{} in {:.1} s (K = {}, {:.1} MiB)",
            cache.dir.display(),
            if resumed_from > 0 { format!(" after {resumed_from} found") } else { String::new() },
            started.elapsed().as_secs_f64(),
            key.views,
            key.bytes(cache.images()) as f64 / (1 << 20) as f64
        ),
    }
    Ok((cache, shape))
}

/// Views per prefix run while building a view cache.
const CACHE_BATCH: usize = 64;

/// Decodes every training image once (in parallel, with progress); they are small.
fn load_images(manifest: &Manifest, items: &[&crate::catalogue::Item]) -> Result<Vec<::image::RgbImage>> {
    let progress = Progress::new("decode", items.len() as u64, "images");
    let limits = Limits::default();
    let out: Result<Vec<_>> = items
        .par_iter()
        .map(|it| {
            let img = decode_file(&manifest.image_path(it), &limits);
            progress.inc(1);
            img
        })
        .collect();
    progress.finish();
    out
}

/// `[2N, 3, S, S]`: row `i` is the first view of sample `i`, row `i + N` its second.
fn views(
    images: &[::image::RgbImage],
    batch: &[usize],
    a: &Augment,
    p: &Preprocess,
    seed: u64,
    step: usize,
) -> Array4<f32> {
    let n = batch.len();
    let s = p.size as usize;
    let tensors: Vec<_> = (0..2 * n)
        .into_par_iter()
        .map(|slot| {
            let mut rng = ChaCha8Rng::seed_from_u64(view_seed(seed, step, slot));
            augment(&images[batch[slot % n]], a, p, &mut rng)
        })
        .collect();
    let mut x = Array4::<f32>::zeros((2 * n, 3, s, s));
    for (mut row, t) in x.axis_iter_mut(Axis(0)).zip(&tensors) {
        row.assign(t);
    }
    x
}

/// A generator seed for one view: a hash of (run seed, step, slot).
fn view_seed(seed: u64, step: usize, slot: usize) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update((step as u64).to_le_bytes());
    h.update((slot as u64).to_le_bytes());
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

fn batch_labels(rows: &Array2<i64>, batch: &[usize]) -> Array2<i64> {
    rows.select(Axis(0), batch)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::TrainResume { reason: format!("{}: {e}", path.display()) })
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("config serialises");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// The sha256 of a file, hex.
fn file_digest(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Reads `metrics.jsonl`.
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .map_err(|e| Error::TrainResume { reason: format!("{} line {}: {e}", path.display(), i + 1) })?,
        );
    }
    Ok(out)
}

/// Drops metric lines after `step` (steps a killed run took after its last checkpoint; the
/// resumed run takes them again).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let kept: Vec<StepMetrics> = read_metrics(path)?.into_iter().filter(|m| m.step <= step).collect();
    let mut text = String::new();
    for m in &kept {
        text.push_str(&serde_json::to_string(m).expect("metrics serialise"));
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// The loss curve: total and each level against the step, each as a moving mean over a window
/// of 1% of the run (at least one step) so the trend shows through the batch-to-batch noise.
pub fn plot_losses(history: &[StepMetrics], path: &Path, title: &str) -> Result<()> {
    let window = (history.len() / 100).max(1);
    let smooth = |values: Vec<(f64, f64)>| -> Vec<(f64, f64)> {
        let mut sum = 0.0;
        let mut out = Vec::with_capacity(values.len());
        for (i, &(x, y)) in values.iter().enumerate() {
            sum += y;
            if i >= window {
                sum -= values[i - window].1;
            }
            out.push((x, sum / (i + 1).min(window) as f64));
        }
        out
    };
    let mut series = Vec::new();
    let levels = history.first().map_or(0, |m| m.level_losses.len());
    if levels > 1 {
        for l in 0..levels {
            series.push(Series::new(
                format!("level {}", l + 1),
                smooth(history.iter().filter_map(|m| m.level_losses.get(l).map(|&v| (m.step as f64, v))).collect()),
            ));
        }
    }
    series.push(Series::new("total", smooth(history.iter().map(|m| (m.step as f64, m.loss)).collect())));
    let what = if window > 1 { format!(" (mean of {window} steps)") } else { String::new() };
    let mut chart = LineChart::new(format!("training loss: {title}{what}"), "step", "loss");
    chart.series = series;
    chart.write_png(path)
}

/// Redraws `loss.png` of a run directory from its `metrics.jsonl`.
pub fn replot(out: &Path) -> Result<()> {
    let run = RunDir { dir: out.to_path_buf() };
    let cfg: TrainConfig = read_json(&run.config())?;
    let history = read_metrics(&run.metrics())?;
    plot_losses(&history, &run.loss_plot(), &format!("{} / {}", cfg.loss.kind.name(), cfg.arch.name()))
}
