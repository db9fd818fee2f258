//! The training step graph (forward in training mode, the caller's loss, backward, optimizer)
//! and the inference graph with the same parameter names.

use std::collections::BTreeMap;

use super::head::{head, l2_normalize};
use super::net::{Mode, Net, Weights};
use super::{ModelConfig, Span, efficientnet, resnet};
use crate::graph::{DType, GradOptions, GradReport, Graph, InputKind, Optimizer, Tensor, TrainStep, Value, train_step};
use crate::{Error, Result};

/// Parameters a loss fragment adds (e.g. the `ce` baseline's classifier) must start with this,
/// so they are trained and checkpointed but not exported.
pub const LOSS_PREFIX: &str = "loss.";

/// What the loss fragment returns: the total loss and the per-level losses, all rank-0 f32.
#[derive(Debug, Clone)]
pub struct LossParts {
    pub loss: Value,
    pub level_losses: Vec<Value>,
}

/// One compiled training step.
///
/// Inputs: data `images` f32 `[2N, 3, S, S]` (rows `i` and `i + N` are two views of sample `i`),
/// `labels` i64 `[N, K]`, `lr` f32 rank 0 and, for AdamW, `step` i64 rank 0 (1-based); every
/// parameter, buffer and optimizer state with its initial value. Outputs: `loss`,
/// `level_loss.0 ..`, and `<name>.next` for every fed-back input.
#[derive(Debug, Clone)]
pub struct StepGraph {
    pub graph: Graph,
    /// Per-layer conv weight-gradient lowering chosen by autodiff.
    pub report: GradReport,
    /// Gradients (in [`Graph::params`] order) and the optimizer's inputs and state.
    pub train: TrainStep,
    pub config: ModelConfig,
    /// Samples per batch (the graph sees `2N` images).
    pub n: usize,
    /// Label columns.
    pub k: usize,
    /// Number of `level_loss.*` outputs.
    pub levels: usize,
    /// How the step was lowered (also read when it is written for a session).
    pub lowering: GradOptions,
    /// The data input the batch is fed to: `images`, or `features` for a step over the frozen
    /// prefix's output ([`StepInput::Features`]).
    pub data_input: &'static str,
}

/// What a step graph takes as its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepInput {
    /// `images` f32 `[2N, 3, S, S]`: the whole network runs in the step.
    Images,
    /// `features` f32 `[2N, C, H, W]`: the output of the frozen leading units (`cfg.freeze`),
    /// computed beforehand by [`prefix_graph`]; the step builds only the trainable units. `C, H,
    /// W` is the prefix graph's output shape.
    Features(Vec<usize>),
}

impl StepGraph {
    /// Names of the encoder and head parameters and buffers — what [`super::export()`] needs —
    /// in declaration order (loss-owned inputs, named [`LOSS_PREFIX`]`*`, excluded).
    pub fn model_state_names(&self) -> Vec<String> {
        self.graph
            .inputs()
            .iter()
            .filter(|i| matches!(i.kind, InputKind::Param | InputKind::Buffer))
            .map(|i| self.graph.name(i.value).to_string())
            .filter(|n| !n.starts_with(LOSS_PREFIX))
            .collect()
    }

    /// Every fed-back input (parameters, buffers, optimizer state, loss-owned ones included)
    /// with its initial value: the state a checkpoint holds.
    pub fn initial_state(&self) -> BTreeMap<String, Tensor> {
        self.graph
            .feedback()
            .iter()
            .filter_map(|&(i, _)| {
                let init = self.graph.input_info(i)?.init.clone()?;
                Some((self.graph.name(i).to_string(), init))
            })
            .collect()
    }

    /// True when the graph has the AdamW `step` input.
    pub fn needs_step(&self) -> bool {
        self.train.optimizer.step.is_some()
    }
}

pub(crate) fn check_config(cfg: &ModelConfig) -> Result<()> {
    let min = match cfg.arch {
        super::Arch::ResnetMini | super::Arch::Onnx => 8,
        _ => 32,
    };
    if cfg.arch == super::Arch::Onnx && cfg.imported.is_none() {
        return Err(Error::InvalidArgument { name: "arch", reason: "`onnx` needs an imported model".into() });
    }
    if let Some(m) = &cfg.imported
        && m.size != cfg.image_size
    {
        return Err(Error::InvalidArgument {
            name: "image_size",
            reason: format!("{} was imported at {} pixels, not {}", m.path().display(), m.size, cfg.image_size),
        });
    }
    if cfg.freeze > cfg.freeze_units() {
        let units = match cfg.arch {
            super::Arch::Onnx => " weight layers (Conv, Gemm, MatMul; `hiercon import` lists them)",
            a if a.is_efficientnet() => " units to freeze (stem, stages, head conv)",
            _ => " units to freeze (stem, stages)",
        };
        return Err(Error::InvalidArgument {
            name: "freeze",
            reason: format!("{} has {}{units}, got {}", cfg.arch, cfg.freeze_units(), cfg.freeze),
        });
    }
    if !cfg.head && cfg.embed_dim != cfg.feature_dim() {
        return Err(Error::InvalidArgument {
            name: "embed_dim",
            reason: format!(
                "without a head the embedding is the {}-d feature, not {}",
                cfg.feature_dim(),
                cfg.embed_dim
            ),
        });
    }
    if cfg.image_size < min {
        return Err(Error::InvalidArgument {
            name: "image_size",
            reason: format!("{} needs images of at least {min} pixels, got {}", cfg.arch, cfg.image_size),
        });
    }
    if cfg.embed_dim == 0 {
        return Err(Error::InvalidArgument { name: "embed_dim", reason: "must be positive".into() });
    }
    Ok(())
}

/// The arch's backbone with its BatchNorm settings, `cfg.freeze` units frozen, or the part of it
/// `span` names (native archs only: an imported graph's frozen layers need not end at one tensor).
fn backbone(net: &mut Net, cfg: &ModelConfig, images: Value, span: Span) -> Result<Value> {
    if let Some(m) = &cfg.imported {
        if span != Span::Whole {
            return Err(Error::InvalidArgument {
                name: "view-cache",
                reason: "an imported (--init-onnx) backbone cannot be split at its frozen layers: its frozen part need not end at one tensor".into(),
            });
        }
        return m.replay(net, images, cfg.freeze);
    }
    if cfg.arch.is_efficientnet() {
        net.set_batch_norm(crate::graph::BatchNorm { eps: efficientnet::BN_EPS, momentum: efficientnet::BN_MOMENTUM });
        efficientnet::backbone(net, cfg.arch, images, cfg.freeze, span)
    } else {
        resnet::backbone(net, cfg.arch, images, cfg.freeze, span)
    }
}

/// Backbone (or its part after the frozen prefix), head (if any) and L2 normalisation: images
/// (or prefix features) → unit embeddings.
fn encoder_span(net: &mut Net, cfg: &ModelConfig, x: Value, span: Span) -> Result<Value> {
    let f = backbone(net, cfg, x, span)?;
    if cfg.head { head(net, f, cfg.embed_dim) } else { l2_normalize(net.g, f) }
}

/// Backbone, head (if any) and L2 normalisation: images → unit embeddings.
fn encoder(net: &mut Net, cfg: &ModelConfig, images: Value) -> Result<Value> {
    encoder_span(net, cfg, images, Span::Whole)
}

/// The frozen leading units alone, in inference form: `images` f32 `[batch, 3, S, S]` →
/// `prefix` f32 `[batch, C, H, W]`, the feature map [`StepInput::Features`] trains on. Every
/// weight is a constant (pretrained values from `init`). Needs `cfg.freeze >= 1`.
pub fn prefix_graph(cfg: &ModelConfig, batch: usize, init: Option<&Weights>) -> Result<Graph> {
    check_config(cfg)?;
    if cfg.freeze == 0 {
        return Err(Error::InvalidArgument {
            name: "view-cache",
            reason: "the frozen-prefix cache needs frozen leading units (--freeze 1 or more)".into(),
        });
    }
    let mut g = Graph::new();
    let s = cfg.image_size;
    let images = g.input("images", DType::F32, &[batch, 3, s, s])?;
    let out = {
        let mut net = Net::new(&mut g, Mode::Infer, cfg.seed).with_init(init);
        backbone(&mut net, cfg, images, Span::Prefix(cfg.freeze))?
    };
    g.output("prefix", out)?;
    Ok(g)
}

/// Builds one training step for batches of `n` samples (`2n` images) with `k` label columns.
///
/// `init` gives pretrained initial values by name (all but the head's must be there); `None`
/// draws seeded random ones. `cfg.freeze` leading units become constants of the graph.
/// `loss(graph, embeddings [2n, embed_dim], labels [n, k])` appends the loss; it may add its
/// own parameters (named [`LOSS_PREFIX`]`*`), which are trained with the model's.
pub fn step_graph(
    cfg: &ModelConfig,
    init: Option<&Weights>,
    n: usize,
    k: usize,
    optimizer: &Optimizer,
    grad: &GradOptions,
    loss: impl FnOnce(&mut Graph, Value, Value) -> Result<LossParts>,
) -> Result<StepGraph> {
    step_graph_with(cfg, init, n, k, optimizer, grad, &StepInput::Images, loss)
}

/// [`step_graph`] over the batch form `input` names: images, or the frozen prefix's features
/// (then only the units after `cfg.freeze` are in the graph).
#[allow(clippy::too_many_arguments)]
pub fn step_graph_with(
    cfg: &ModelConfig,
    init: Option<&Weights>,
    n: usize,
    k: usize,
    optimizer: &Optimizer,
    grad: &GradOptions,
    input: &StepInput,
    loss: impl FnOnce(&mut Graph, Value, Value) -> Result<LossParts>,
) -> Result<StepGraph> {
    check_config(cfg)?;
    if n == 0 || k == 0 {
        return Err(Error::InvalidArgument { name: "batch", reason: format!("n = {n} and k = {k} must be positive") });
    }
    let mut g = Graph::new();
    let s = cfg.image_size;
    let (data_input, span, x) = match input {
        StepInput::Images => ("images", Span::Whole, g.input("images", DType::F32, &[2 * n, 3, s, s])?),
        StepInput::Features(chw) => {
            if cfg.freeze == 0 {
                return Err(Error::InvalidArgument {
                    name: "view-cache",
                    reason: "a step over prefix features needs frozen leading units (--freeze 1 or more)".into(),
                });
            }
            let shape: Vec<usize> = std::iter::once(2 * n).chain(chw.iter().copied()).collect();
            ("features", Span::Suffix(cfg.freeze), g.input("features", DType::F32, &shape)?)
        }
    };
    let labels = g.input("labels", DType::I64, &[n, k])?;
    let emb = {
        let mut net =
            Net::new(&mut g, Mode::Train(grad.batch_norm), cfg.seed).with_init(init).with_depthwise(grad.depthwise);
        encoder_span(&mut net, cfg, x, span)?
    };
    if g.params().is_empty() {
        return Err(Error::InvalidArgument { name: "freeze", reason: "everything is frozen: nothing to train".into() });
    }
    let parts = loss(&mut g, emb, labels)?;
    for (what, v) in std::iter::once(("loss", parts.loss)).chain(parts.level_losses.iter().map(|&v| ("level loss", v)))
    {
        if g.dtype(v) != DType::F32 || !g.shape(v).is_empty() {
            return Err(Error::GraphShape {
                op: "step_graph".into(),
                detail: format!("the {what} `{}` is {}{:?}, expected rank-0 f32", g.name(v), g.dtype(v), g.shape(v)),
            });
        }
    }
    let train = train_step(&mut g, parts.loss, optimizer, grad)?;
    g.output("loss", parts.loss)?;
    for (i, &l) in parts.level_losses.iter().enumerate() {
        g.output(&format!("level_loss.{i}"), l)?;
    }
    Ok(StepGraph {
        report: train.report.clone(),
        graph: g,
        train,
        config: cfg.clone(),
        n,
        k,
        levels: parts.level_losses.len(),
        lowering: *grad,
        data_input,
    })
}

/// The forward pass for `batch` images with BatchNorm in inference form (running statistics):
/// data input `images` f32 `[batch, 3, S, S]`, output `embeddings` `[batch, embed_dim]`; the
/// parameters and buffers are inputs with the same names and (seeded random) initial values as
/// in [`step_graph`]; nothing is frozen.
pub fn inference_graph(cfg: &ModelConfig, batch: usize) -> Result<Graph> {
    inference_graph_with(cfg, batch, None)
}

/// The backbone alone in inference form: `images` `[batch, 3, S, S]` → `features`
/// `[batch, arch.feature_dim()]`, the pooled feature before any head or normalisation (what a
/// classifier on top of the pretrained backbone sees; tests compare it with an independent
/// implementation).
pub fn feature_graph(cfg: &ModelConfig, batch: usize, init: Option<&Weights>) -> Result<Graph> {
    forward_graph(&cfg.without_head(), batch, init, "features", |net, cfg, x| backbone(net, cfg, x, Span::Whole))
}

/// [`inference_graph`] with initial values from `init` (e.g. pretrained weights).
pub fn inference_graph_with(cfg: &ModelConfig, batch: usize, init: Option<&Weights>) -> Result<Graph> {
    forward_graph(cfg, batch, init, "embeddings", encoder)
}

/// An inference-mode graph, nothing frozen: input `images` `[batch, 3, S, S]`, output `output`
/// = `body(images)`.
fn forward_graph(
    cfg: &ModelConfig,
    batch: usize,
    init: Option<&Weights>,
    output: &str,
    body: fn(&mut Net, &ModelConfig, Value) -> Result<Value>,
) -> Result<Graph> {
    let cfg = ModelConfig { freeze: 0, ..cfg.clone() };
    check_config(&cfg)?;
    let mut g = Graph::new();
    let s = cfg.image_size;
    let images = g.input("images", DType::F32, &[batch, 3, s, s])?;
    let out = body(&mut Net::new(&mut g, Mode::Infer, cfg.seed).with_init(init), &cfg, images)?;
    g.output(output, out)?;
    Ok(g)
}

#[cfg(test)]
pub(crate) mod tests {
    use rand::Rng;

    use super::*;
    use crate::graph::testutil::{rng, uniform};
    use crate::graph::{BatchNormLowering, Runner, Sgd};
    use crate::model::Arch;

    /// A tiny resnet-mini: 16x16 images, 4 samples (8 images), 8-d embedding.
    pub(crate) fn tiny() -> ModelConfig {
        ModelConfig { embed_dim: 8, ..ModelConfig::new(Arch::ResnetMini, 16, 3) }
    }

    /// A smooth test loss with a parameter of its own: `l0 = sum(e ⊙ R)`, `l1 = sum(e · loss.w)
    /// + 0.01 · sum(labels)`, loss = `l0 + l1`.
    pub(crate) fn test_loss(g: &mut Graph, emb: Value, labels: Value) -> Result<LossParts> {
        let shape = g.shape(emb).to_vec();
        let r = g.constant(uniform(&mut rng(99), DType::F32, &shape));
        let w = g.param("loss.w", &[shape[1]], (0..shape[1]).map(|i| 0.1 * i as f32 - 0.3).collect())?;
        let a = g.mul(emb, r)?;
        let l0 = g.sum_all(a)?;
        let b = g.mul(emb, w)?;
        let l1 = g.sum_all(b)?;
        let lf = g.cast(labels, DType::F32)?;
        let ls = g.sum_all(lf)?;
        let ls = g.mul_scalar(ls, 0.01)?;
        let l1 = g.add(l1, ls)?;
        let loss = g.add(l0, l1)?;
        Ok(LossParts { loss, level_losses: vec![l0, l1] })
    }

    pub(crate) fn batch(cfg: &ModelConfig, n: usize, k: usize, seed: u64) -> (Tensor, Tensor) {
        let mut r = rng(seed);
        let s = cfg.image_size;
        let images = uniform(&mut r, DType::F32, &[2 * n, 3, s, s]);
        let labels = Tensor::i64(&[n, k], (0..n * k).map(|_| r.random_range(0..3)).collect()).unwrap();
        (images, labels)
    }

    #[test]
    fn frozen_units_are_constants_and_the_rest_trains() {
        // Lite0 at 32 px with the stem and stages 1-5 frozen: only blocks 11-15 (stages 6, 7),
        // the head conv and the projection head are parameters; frozen BatchNorms feed nothing
        // back; one SGD step moves every parameter and leaves the loss finite.
        let cfg = ModelConfig { freeze: 6, embed_dim: 8, ..ModelConfig::new(Arch::EfficientnetLite0, 32, 1) };
        let opt = Optimizer::Sgd(Sgd::default());
        let sg = step_graph(&cfg, None, 2, 2, &opt, &GradOptions::default(), test_loss).unwrap();
        let g = &sg.graph;
        let params: Vec<&str> = g.params().iter().map(|&p| g.name(p)).collect();
        assert!(params.contains(&"_blocks.11._expand_conv.weight") && params.contains(&"_conv_head.weight"));
        assert!(params.contains(&"head.fc2.bias"));
        for frozen in ["_conv_stem.weight", "_bn0.weight", "_blocks.0._depthwise_conv.weight", "_blocks.10._bn2.bias"] {
            assert!(g.find(frozen).is_none(), "{frozen} should be a constant");
        }
        assert!(g.find("_blocks.10._bn2.running_mean.next").is_none());
        assert!(g.find("_blocks.11._bn2.running_mean.next").is_some());
        let mut run = Runner::cpu(g).unwrap();
        let (images, labels) = batch(&cfg, 2, 2, 4);
        let lr = Tensor::F32(ndarray::arr0(0.1f32).into_dyn());
        let mut feeds: Vec<(&str, &Tensor)> = vec![("images", &images), ("labels", &labels), ("lr", &lr)];
        let state = sg.initial_state();
        feeds.extend(state.iter().map(|(n, t)| (n.as_str(), t)));
        let out = run.run(&feeds).unwrap();
        assert!(out.f32("loss").unwrap().iter().all(|v| v.is_finite()));
        for name in ["_blocks.11._expand_conv.weight", "_conv_head.weight", "head.fc1.weight"] {
            let after = out.get(&format!("{name}.next")).unwrap();
            assert_ne!(after, &state[name], "{name} did not move");
        }
        // Everything frozen is refused.
        let all = ModelConfig { freeze: 9, head: false, embed_dim: 1280, ..cfg.clone() };
        let e = step_graph(&all, None, 2, 2, &opt, &GradOptions::default(), test_loss).unwrap_err();
        assert!(e.to_string().contains("nothing to train"), "{e}");
        let e = step_graph(&ModelConfig { freeze: 10, ..cfg }, None, 2, 2, &opt, &GradOptions::default(), test_loss)
            .unwrap_err();
        assert!(e.to_string().contains("9 units"), "{e}");
    }

    #[test]
    fn step_graph_inputs_outputs_and_names() {
        let cfg = tiny();
        let opt = Optimizer::AdamW(Default::default());
        let sg = step_graph(&cfg, None, 4, 3, &opt, &GradOptions::default(), test_loss).unwrap();
        let g = &sg.graph;
        assert_eq!(g.shape(g.find("images").unwrap()), [8, 3, 16, 16]);
        assert_eq!(g.dtype(g.find("labels").unwrap()), DType::I64);
        let outs: Vec<&str> = g.outputs().iter().map(|&v| g.name(v)).collect();
        for want in
            ["loss", "level_loss.0", "level_loss.1", "conv1.weight.next", "bn1.running_mean.next", "loss.w.next"]
        {
            assert!(outs.contains(&want), "{want} not in {outs:?}");
        }
        assert!(sg.needs_step() && sg.levels == 2);
        let names = sg.model_state_names();
        assert!(names.iter().all(|n| !n.starts_with(LOSS_PREFIX)));
        assert!(names.contains(&"layer3.0.bn2.running_var".to_string()));
        // The model state is exactly what the inference graph declares, with equal initial values.
        let inf = inference_graph(&cfg, 2).unwrap();
        let inf_names: Vec<String> =
            inf.inputs().iter().filter(|i| i.kind != InputKind::Data).map(|i| inf.name(i.value).to_string()).collect();
        assert_eq!(names, inf_names);
        let state = sg.initial_state();
        for n in &names {
            let v = inf.find(n).unwrap();
            assert_eq!(inf.input_info(v).unwrap().init.as_ref(), state.get(n), "{n}");
        }
        assert!(state.contains_key("loss.w.exp_avg_sq"));
        assert_eq!(
            sg.report.convs.len(),
            g.nodes().iter().filter(|n| n.op == "Conv").count().min(sg.report.convs.len())
        );
        assert!(!sg.report.convs.is_empty());
    }

    #[test]
    fn a_wrong_loss_shape_is_an_error() {
        let e = step_graph(&tiny(), None, 2, 1, &Optimizer::Sgd(Sgd::default()), &GradOptions::default(), |g, e, _| {
            let s = g.reduce_sum(e, &[1], false)?;
            Ok(LossParts { loss: s, level_losses: vec![] })
        })
        .unwrap_err();
        assert!(e.to_string().contains("rank-0"), "{e}");
    }

    #[test]
    fn step_graph_gradients_match_finite_differences() {
        for batch_norm in [BatchNormLowering::Fused, BatchNormLowering::Composed] {
            check_step_gradients(GradOptions { batch_norm, ..GradOptions::default() });
        }
    }

    fn check_step_gradients(grad: GradOptions) {
        // The whole step graph (train-mode BN, residual blocks, head, L2 norm, the loss's own
        // parameter), f32 in ONNX Runtime. The autodiff gradient (the graph's own gradient
        // values) is compared with the central difference of the `loss` output along a random
        // direction in one parameter tensor: ε = 1e-3 relative to that tensor's RMS (at least
        // 0.1), and |ad − fd| <= 3e-2 · max(|ad|, |fd|) + 1e-3. ORT's Conv is f32 only, so the
        // difference carries f32 rounding of the loss (~1e-6 / ε) plus curvature: at 8x8 images
        // BN over 8 values made fd drift from ad by 20% at ε = 1e-2 and converge as ε shrank;
        // at 16x16 the worst measured gap was 1.5%.
        let cfg = tiny();
        let (n, k) = (4, 2);
        let opt = Optimizer::Sgd(Sgd { momentum: 0.0, weight_decay: 0.0, nesterov: false });
        let mut sg = step_graph(&cfg, None, n, k, &opt, &grad, test_loss).unwrap();
        let params = sg.graph.params();
        for (p, gr) in params.iter().zip(sg.train.grads.clone()) {
            let name = format!("grad.{}", sg.graph.name(*p));
            sg.graph.output(&name, gr).unwrap();
        }
        let mut run = Runner::cpu(&sg.graph).unwrap();
        let (images, labels) = batch(&cfg, n, k, 5);
        let lr = Tensor::F32(ndarray::arr0(0.0f32).into_dyn());
        let base: Vec<(&str, &Tensor)> = vec![("images", &images), ("labels", &labels), ("lr", &lr)];
        let out = run.run(&base).unwrap();
        let state = sg.initial_state();
        let mut r = rng(11);
        for name in [
            "conv1.weight",
            "bn1.weight",
            "layer2.0.downsample.0.weight",
            "layer3.0.bn2.bias",
            "head.fc1.weight",
            "head.fc2.bias",
            "loss.w",
        ] {
            let p0 = state[name].to_f64_vec();
            let rms = (p0.iter().map(|x| x * x).sum::<f64>() / p0.len() as f64).sqrt().max(0.1);
            let eps = 1e-3 * rms;
            let v: Vec<f64> = (0..p0.len()).map(|_| r.random_range(-1.0..1.0)).collect();
            let grad = out.get(&format!("grad.{name}")).unwrap().to_f64_vec();
            let ad: f64 = grad.iter().zip(&v).map(|(a, b)| a * b).sum();
            let mut at = |sign: f64| {
                let moved: Vec<f32> = p0.iter().zip(&v).map(|(x, d)| (x + sign * eps * d) as f32).collect();
                let t = Tensor::f32(state[name].shape(), moved).unwrap();
                let mut feeds = base.clone();
                feeds.push((name, &t));
                run.run(&feeds).unwrap().get("loss").unwrap().to_f64_vec()[0]
            };
            let fd = (at(1.0) - at(-1.0)) / (2.0 * eps);
            assert!(
                (ad - fd).abs() <= 3e-2 * ad.abs().max(fd.abs()) + 1e-3,
                "{name} ({grad:?}): autodiff {ad} vs finite difference {fd}"
            );
        }
        // The level losses add up to the loss, and SGD with lr 0 leaves the parameters alone.
        let l = out.get("loss").unwrap().to_f64_vec()[0];
        let l0 = out.get("level_loss.0").unwrap().to_f64_vec()[0];
        let l1 = out.get("level_loss.1").unwrap().to_f64_vec()[0];
        assert!((l - l0 - l1).abs() < 1e-5 * (1.0 + l.abs()));
        assert_eq!(out.get("conv1.weight.next").unwrap(), &state["conv1.weight"]);
    }

    #[test]
    fn both_batch_norm_lowerings_take_the_same_step() {
        // Fused (one training-mode node) and composed BatchNorm: the same loss, the same updated
        // parameters and running statistics after a step, f32 through ORT.
        let cfg = tiny();
        let (n, k) = (4, 2);
        let opt = Optimizer::Sgd(Sgd { momentum: 0.9, weight_decay: 1e-4, nesterov: false });
        let (images, labels) = batch(&cfg, n, k, 6);
        let lr = Tensor::F32(ndarray::arr0(0.1f32).into_dyn());
        let step = |batch_norm| {
            let sg =
                step_graph(&cfg, None, n, k, &opt, &GradOptions { batch_norm, ..GradOptions::default() }, test_loss)
                    .unwrap();
            let mut run = Runner::cpu(&sg.graph).unwrap();
            let out = run.run(&[("images", &images), ("labels", &labels), ("lr", &lr)]).unwrap();
            let names: Vec<String> = sg.graph.outputs().iter().map(|&v| sg.graph.name(v).to_string()).collect();
            names.into_iter().map(|n| (n.clone(), out.get(&n).unwrap().to_f64_vec())).collect::<Vec<_>>()
        };
        let (fused, composed) = (step(BatchNormLowering::Fused), step(BatchNormLowering::Composed));
        assert_eq!(fused.len(), composed.len());
        for ((name, a), (name2, b)) in fused.iter().zip(&composed) {
            assert_eq!(name, name2);
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + x.abs()), "{name}: fused {x} vs composed {y}");
            }
        }
        assert!(fused.iter().any(|(n, _)| n == "bn1.running_var.next"));
        use crate::runtime::{Device, RuntimeOptions};
        let cuda = RuntimeOptions { device: Device::Cuda, ..Default::default() };
        assert_eq!(GradOptions::for_runtime(&cuda).batch_norm, BatchNormLowering::Composed);
        let cpu = GradOptions::for_runtime(&RuntimeOptions { cpu_nchwc: true, ..Default::default() });
        assert_eq!((cpu.batch_norm, cpu.cpu_nchwc), (BatchNormLowering::Fused, true));
    }

    #[test]
    fn dense_depthwise_takes_the_same_step_as_the_grouped_conv() {
        // Lite0 at 64 px with 4 units frozen: stages 5-7 train, their depthwise convolutions on
        // 4x4 and 2x2 maps are written dense by default. Loss and every updated parameter agree
        // with the grouped-Conv step (f32 through ORT).
        let cfg = ModelConfig { freeze: 4, embed_dim: 8, ..ModelConfig::new(Arch::EfficientnetLite0, 64, 2) };
        let opt = Optimizer::Sgd(Sgd { momentum: 0.9, weight_decay: 1e-4, nesterov: false });
        let (images, labels) = batch(&cfg, 3, 2, 8);
        let lr = Tensor::F32(ndarray::arr0(0.05f32).into_dyn());
        let step = |depthwise| {
            let grad = GradOptions { depthwise, ..GradOptions::default() };
            let sg = step_graph(&cfg, None, 3, 2, &opt, &grad, test_loss).unwrap();
            let convs = sg.graph.nodes().iter().filter(|n| n.op == "Conv" && n.attr_int("group", 1) > 1).count();
            let mut run = Runner::cpu(&sg.graph).unwrap();
            let out = run.run(&[("images", &images), ("labels", &labels), ("lr", &lr)]).unwrap();
            let names: Vec<String> = sg.graph.outputs().iter().map(|&v| sg.graph.name(v).to_string()).collect();
            (convs, names.into_iter().map(|n| (n.clone(), out.get(&n).unwrap().to_f64_vec())).collect::<Vec<_>>())
        };
        use crate::graph::DepthwiseLowering;
        let ((dense_convs, dense), (grouped_convs, grouped)) =
            (step(DepthwiseLowering::Auto), step(DepthwiseLowering::Conv));
        assert!(grouped_convs > dense_convs, "{grouped_convs} grouped Convs vs {dense_convs}");
        assert_eq!(dense.len(), grouped.len());
        for ((name, a), (_, b)) in dense.iter().zip(&grouped) {
            let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + scale), "{name}: dense {x} vs grouped {y}");
            }
        }
    }

    #[test]
    fn a_step_over_the_frozen_prefix_equals_the_step_over_images() {
        // The prefix graph (frozen units, inference form) feeds the features step; the loss and
        // every updated parameter equal those of the whole step on the same images.
        let cfg = ModelConfig { freeze: 6, embed_dim: 8, ..ModelConfig::new(Arch::EfficientnetLite0, 64, 4) };
        let init = {
            let g = inference_graph(&ModelConfig { head: false, embed_dim: 1280, ..cfg.clone() }, 1).unwrap();
            let w: Weights = g
                .inputs()
                .iter()
                .filter(|i| i.kind != InputKind::Data)
                .map(|i| (g.name(i.value).to_string(), i.init.clone().unwrap()))
                .collect();
            w
        };
        let opt = Optimizer::Sgd(Sgd { momentum: 0.9, weight_decay: 1e-4, nesterov: false });
        let (n, k) = (3, 2);
        let (images, labels) = batch(&cfg, n, k, 9);
        let lr = Tensor::F32(ndarray::arr0(0.05f32).into_dyn());
        let prefix = prefix_graph(&cfg, 2 * n, Some(&init)).unwrap();
        let shape = prefix.shape(prefix.find("prefix").unwrap()).to_vec();
        assert_eq!(shape, [2 * n, 112, 4, 4], "Lite0's stage 5 output at 64 px");
        assert!(prefix.params().is_empty(), "the prefix is all constants");
        let features =
            Runner::cpu(&prefix).unwrap().run(&[("images", &images)]).unwrap().get("prefix").unwrap().clone();
        let run = |input: &StepInput, x: &Tensor, name: &str| {
            let sg = step_graph_with(&cfg, Some(&init), n, k, &opt, &GradOptions::default(), input, test_loss).unwrap();
            assert_eq!(sg.data_input, name);
            let mut r = Runner::cpu(&sg.graph).unwrap();
            let out = r.run(&[(name, x), ("labels", &labels), ("lr", &lr)]).unwrap();
            let names: Vec<String> = sg.graph.outputs().iter().map(|&v| sg.graph.name(v).to_string()).collect();
            names.into_iter().map(|n| (n.clone(), out.get(&n).unwrap().to_f64_vec())).collect::<Vec<_>>()
        };
        let whole = run(&StepInput::Images, &images, "images");
        let split = run(&StepInput::Features(shape[1..].to_vec()), &features, "features");
        assert_eq!(whole.len(), split.len());
        for ((name, a), (name2, b)) in whole.iter().zip(&split) {
            assert_eq!(name, name2);
            let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + scale), "{name}: whole {x} vs prefix+step {y}");
            }
        }
        // Nothing frozen, or an imported backbone: no prefix.
        let e = prefix_graph(&ModelConfig { freeze: 0, ..cfg.clone() }, 1, None).unwrap_err();
        assert!(e.to_string().contains("--freeze"), "{e}");
        let e = step_graph_with(
            &ModelConfig { freeze: 0, ..cfg },
            None,
            n,
            k,
            &opt,
            &GradOptions::default(),
            &StepInput::Features(vec![112, 4, 4]),
            test_loss,
        )
        .unwrap_err();
        assert!(e.to_string().contains("--freeze"), "{e}");
    }
}
