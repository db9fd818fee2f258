//! Integration tests of `hiercon train`: a short run on a generated catalogue whose loss falls,
//! resume after an abrupt stop continuing to the same losses, the NaN guard, and the binary's
//! outputs (metrics, loss plot, checkpoint, exported model that the ORT encoder loads).

use std::path::Path;
use std::process::Command;

use hiercon::Error;
use hiercon::encoder::{Encoder, ModelMeta, OrtEncoder};
use hiercon::image::{Augment, Limits};
use hiercon::loss::{LossKind, LossOptions};
use hiercon::model::{Arch, Init};
use hiercon::runtime::RuntimeOptions;
use hiercon::train::{self, Checkpoint, OptimizerKind, SamplerKind, TrainConfig, TrainEnv, read_metrics};

use crate::index::Catalogue;

fn config(c: &Catalogue, loss: LossKind, steps: usize) -> TrainConfig {
    TrainConfig {
        manifest: c.manifest(),
        split: hiercon::catalogue::Subset::Train,
        loss: LossOptions { kind: loss, ..LossOptions::default() },
        arch: Arch::ResnetMini,
        image_size: 24,
        batch_size: 12,
        steps,
        optimizer: OptimizerKind::Sgd,
        lr: 0.05,
        weight_decay: 1e-4,
        warmup: 2,
        sampler: SamplerKind::Hierarchical,
        augment: Augment::default(),
        seed: 7,
        checkpoint_every: 3,
        init: Init::Random,
        weights: None,
        freeze: 0,
        init_onnx: None,
        cut: None,
        normalization: None,
        bgr: false,
        view_cache: 0,
        drop_levels: Vec::new(),
    }
}

fn rt() -> RuntimeOptions {
    hiercon::runtime::init().expect("ONNX Runtime (make ort)");
    RuntimeOptions { threads: 1, ..RuntimeOptions::default() }
}

/// The encoder's embedding of one catalogue image.
fn embed(enc: &OrtEncoder, path: &Path) -> ndarray::Array2<f32> {
    let t = hiercon::image::batch_from_files(&[path.to_path_buf()], &enc.meta().preprocess(), &Limits::default());
    let t: Vec<_> = t.into_iter().map(|r| r.unwrap()).collect();
    enc.embed(hiercon::image::stack(&t).view()).unwrap()
}

fn losses(dir: &Path) -> Vec<f64> {
    read_metrics(&dir.join("metrics.jsonl")).unwrap().iter().map(|m| m.loss).collect()
}

#[test]
fn a_short_run_lowers_the_loss_and_exports_a_model_the_encoder_loads() {
    let c = Catalogue::new(4);
    let out = c.dir.path().join("runs/short");
    let cfg = config(&c, LossKind::Hmce, 40);
    let done = train::train(&cfg, &out, false, &rt(), &TrainEnv::default()).unwrap();
    assert_eq!(done.steps, 40);
    let l = losses(&out);
    assert_eq!(l.len(), 40);
    let head: f64 = l[..8].iter().sum::<f64>() / 8.0;
    let tail: f64 = l[32..].iter().sum::<f64>() / 8.0;
    assert!(tail < head * 0.95, "loss did not fall: first 8 steps {head:.4}, last 8 {tail:.4}");

    let meta = ModelMeta::read(&out.join("model.json")).unwrap();
    assert_eq!(meta.arch, "resnet-mini");
    assert_eq!(meta.extra["loss"], "hmce");
    assert!(meta.extra["training"]["manifest_digest"].as_str().is_some_and(|d| d.len() == 64));
    let enc = OrtEncoder::load(&out.join("model.onnx"), &rt()).unwrap();
    let e = embed(&enc, &c.image_path(&c.items[0].id));
    let norm: f32 = e.row(0).iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "embeddings are unit rows, got norm {norm}");
    let png = image::open(out.join("loss.png")).expect("loss plot is a PNG");
    assert!(png.width() > 100 && png.height() > 100);
}

#[test]
fn the_nchwc_convolutions_train_the_same_run() {
    // `--cpu-nchwc` writes the step's convolutions on ORT's NCHWc kernels: the same losses.
    let c = Catalogue::new(4);
    let cfg = config(&c, LossKind::Hmce, 6);
    let (plain, blocked) = (c.dir.path().join("runs/plain"), c.dir.path().join("runs/nchwc"));
    train::train(&cfg, &plain, false, &rt(), &TrainEnv::default()).unwrap();
    let nchwc = RuntimeOptions { cpu_nchwc: true, ..rt() };
    train::train(&cfg, &blocked, false, &nchwc, &TrainEnv::default()).unwrap();
    let (a, b) = (losses(&plain), losses(&blocked));
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-3 * x.abs(), "losses {a:?} vs {b:?}");
    }
}

#[test]
fn a_run_stopped_abruptly_and_resumed_matches_an_uninterrupted_one() {
    let c = Catalogue::new(2);
    let whole = c.dir.path().join("runs/whole");
    let cut = c.dir.path().join("runs/cut");
    let cfg = config(&c, LossKind::Hmce, 7);
    train::train(&cfg, &whole, false, &rt(), &TrainEnv::default()).unwrap();
    // Halted after step 5: the last checkpoint is step 3, steps 4 and 5 are taken again.
    let err =
        train::train(&cfg, &cut, false, &rt(), &TrainEnv { halt_after: Some(5), ..Default::default() }).unwrap_err();
    assert!(matches!(err, Error::TrainHalted { step: 5 }), "{err}");
    assert!(!cut.join("model.onnx").exists());
    let fresh = train::train(&cfg, &cut, false, &rt(), &TrainEnv::default()).unwrap_err();
    assert!(fresh.to_string().contains("--resume"), "refuses to overwrite a run: {fresh}");
    train::train(&cfg, &cut, true, &rt(), &TrainEnv::default()).unwrap();
    let (a, b) = (losses(&whole), losses(&cut));
    assert_eq!(a.len(), 7);
    assert_eq!(b.len(), 7, "metrics of the lost steps are replaced, not repeated");
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "step {}: {x} vs {y}", step + 1);
    }
    let (ma, mb) =
        (ModelMeta::read(&whole.join("model.json")).unwrap(), ModelMeta::read(&cut.join("model.json")).unwrap());
    let (ea, eb) = (
        OrtEncoder::load(&whole.join("model.onnx"), &rt()).unwrap(),
        OrtEncoder::load(&cut.join("model.onnx"), &rt()).unwrap(),
    );
    let path = c.image_path(&c.items[0].id);
    let (za, zb) = (embed(&ea, &path), embed(&eb, &path));
    let diff = za.iter().zip(zb.iter()).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "models differ by {diff} (digests {} / {})", ma.digest, mb.digest);

    let mut changed = cfg.clone();
    changed.lr = 0.5;
    let err = train::train(&changed, &cut, true, &rt(), &TrainEnv::default()).unwrap_err();
    assert!(err.to_string().contains("lr"), "a resume with other options names them: {err}");
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_keeps_its_last_good_checkpoint() {
    let c = Catalogue::new(2);
    let out = c.dir.path().join("runs/nan");
    let mut cfg = config(&c, LossKind::Supcon, 30);
    cfg.lr = 1e12;
    cfg.warmup = 0;
    cfg.checkpoint_every = 1;
    let err = train::train(&cfg, &out, false, &rt(), &TrainEnv::default()).unwrap_err();
    let Error::TrainDiverged { step, .. } = err else { panic!("expected TrainDiverged, got {err}") };
    assert!(err.to_string().contains("not finite"), "{err}");
    let ckpt = Checkpoint::load(&out.join("checkpoint.safetensors")).unwrap();
    let saved = ckpt.meta["step"].as_u64().unwrap() as usize;
    assert!(saved < step, "the checkpoint (step {saved}) precedes the divergence (step {step})");
    for (name, t) in &ckpt.state {
        assert!(t.to_f64_vec().iter().all(|x| x.is_finite()), "{name} holds non-finite values");
    }
    assert!(!out.join("model.onnx").exists());
}

#[test]
fn the_binary_trains_resumes_and_reports() {
    let c = Catalogue::new(2);
    let out = c.dir.path().join("runs/cli");
    let run = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hiercon"));
        cmd.args(["--threads", "1", "train", "--loss", "hmc", "--image-size", "24", "--batch-size", "10"])
            .args(["--steps", "4", "--checkpoint-every", "2", "--lr", "0.05"])
            .arg("--manifest")
            .arg(c.manifest())
            .arg("--out")
            .arg(&out)
            .args(extra);
        cmd.output().unwrap()
    };
    let halted = run(&["--halt-after", "3"]);
    assert!(!halted.status.success());
    let resumed = run(&["--resume"]);
    let stdout = String::from_utf8_lossy(&resumed.stdout);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(stdout.contains("trained 4 steps"), "{stdout}");
    let m = read_metrics(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(m.iter().map(|m| m.step).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(m.iter().all(|m| m.level_losses.len() == 5 && m.lr > 0.0 && m.images_per_s > 0.0));
    for f in ["config.json", "loss.png", "checkpoint.safetensors", "model.onnx", "model.json"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_hiercon"))
        .args(["train", "--manifest", "/nonexistent/manifest.jsonl", "--out"])
        .arg(c.dir.path().join("runs/bad"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/manifest.jsonl"));
}

#[test]
fn a_pretrained_lite0_with_frozen_stages_resumes_and_exports_its_frozen_weights() {
    // EfficientNet-Lite0 from its ImageNet weights (make pretrained) at 32 px, stem + stages 1-5
    // frozen: halted and resumed it takes the same steps as an uninterrupted run, and the exported
    // model holds the pretrained values of the frozen layers and trained ones elsewhere.
    let c = Catalogue::new(2);
    let cfg = TrainConfig {
        arch: Arch::EfficientnetLite0,
        image_size: 32,
        init: Init::Pretrained,
        freeze: 6,
        lr: 0.01,
        ..config(&c, LossKind::Hmce, 5)
    };
    let (whole, cut) = (c.dir.path().join("runs/whole"), c.dir.path().join("runs/cut"));
    train::train(&cfg, &whole, false, &rt(), &TrainEnv::default()).unwrap();
    let err =
        train::train(&cfg, &cut, false, &rt(), &TrainEnv { halt_after: Some(4), ..Default::default() }).unwrap_err();
    assert!(matches!(err, Error::TrainHalted { step: 4 }), "{err}");
    train::train(&cfg, &cut, true, &rt(), &TrainEnv::default()).unwrap();
    let (a, b) = (losses(&whole), losses(&cut));
    assert_eq!(b.len(), 5);
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "step {}: {x} vs {y}", step + 1);
    }
    let meta = ModelMeta::read(&whole.join("model.json")).unwrap();
    assert_eq!(meta.arch, "efficientnet-lite0");
    assert_eq!(meta.extra["training"]["freeze"], 6);
    assert!((meta.input.mean[0] - 127.0 / 255.0).abs() < 1e-6);
    // The checkpoint holds only what trains.
    let ckpt = Checkpoint::load(&whole.join("checkpoint.safetensors")).unwrap();
    assert!(!ckpt.state.contains_key("_conv_stem.weight") && ckpt.state.contains_key("_conv_head.weight"));
    // Frozen values in the exported model are the pretrained ones, byte for byte (the
    // initializers are raw little-endian f32); trained ones are not.
    // The file the trainer loaded: the library's own search.
    let pth = hiercon::model::pretrained::locate(Arch::EfficientnetLite0, None).unwrap();
    let w = hiercon::model::pretrained::load(&pth).unwrap();
    let bytes = std::fs::read(whole.join("model.onnx")).unwrap();
    let stem = w["_conv_stem.weight"].as_f32().unwrap();
    let needle: Vec<u8> = stem.iter().take(16).flat_map(|x| x.to_le_bytes()).collect();
    assert!(bytes.windows(needle.len()).any(|win| win == needle.as_slice()), "frozen stem weights not exported as is");
    let head = w["_conv_head.weight"].as_f32().unwrap();
    let needle: Vec<u8> = head.iter().take(16).flat_map(|x| x.to_le_bytes()).collect();
    assert!(!bytes.windows(needle.len()).any(|win| win == needle.as_slice()), "the trained head conv did not change");
    let enc = OrtEncoder::load(&whole.join("model.onnx"), &rt()).unwrap();
    assert_eq!(embed(&enc, &c.image_path(&c.items[0].id)).shape(), [1, 128]);

    // --freeze without a pretrained start is refused.
    let bad = TrainConfig { init: Init::Random, ..cfg };
    let e = train::train(&bad, &c.dir.path().join("runs/bad"), false, &rt(), &TrainEnv::default()).unwrap_err();
    assert!(e.to_string().contains("--init pretrained"), "{e}");
}

#[test]
fn a_view_cache_run_resumes_exactly_and_runs_with_the_same_key_share_one_cache() {
    // Lite0 at 32 px with 6 units frozen and a pool of 3 views per image: the cache is built
    // once, a halted and resumed run takes the same steps as an uninterrupted one (reusing the
    // cache), another seed draws another pool, and the exported model is a whole encoder.
    let c = Catalogue::new(2);
    let views = c.dir.path().join("views");
    let env = TrainEnv { view_cache_dir: Some(views.clone()), ..Default::default() };
    let cfg = TrainConfig {
        arch: Arch::EfficientnetLite0,
        image_size: 32,
        init: Init::Pretrained,
        freeze: 6,
        lr: 0.01,
        view_cache: 3,
        ..config(&c, LossKind::Hmce, 5)
    };
    let (whole, cut) = (c.dir.path().join("runs/whole"), c.dir.path().join("runs/cut"));
    train::train(&cfg, &whole, false, &rt(), &env).unwrap();
    let caches = || std::fs::read_dir(&views).unwrap().map(|e| e.unwrap().path()).collect::<Vec<_>>();
    assert_eq!(caches().len(), 1);
    let file = caches()[0].join("views.f16");
    let built = std::fs::metadata(&file).unwrap().modified().unwrap();
    let halted = TrainEnv { halt_after: Some(4), ..env.clone() };
    let err = train::train(&cfg, &cut, false, &rt(), &halted).unwrap_err();
    assert!(matches!(err, Error::TrainHalted { step: 4 }), "{err}");
    train::train(&cfg, &cut, true, &rt(), &env).unwrap();
    let (a, b) = (losses(&whole), losses(&cut));
    assert_eq!((a.len(), b.len()), (5, 5));
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "step {}: {x} vs {y}", step + 1);
    }
    assert_eq!(caches().len(), 1, "the same key shares the cache");
    assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), built, "and does not rewrite it");
    let enc = OrtEncoder::load(&whole.join("model.onnx"), &rt()).unwrap();
    assert_eq!(embed(&enc, &c.image_path(&c.items[0].id)).shape(), [1, 128]);
    let cfg_json = std::fs::read_to_string(whole.join("config.json")).unwrap();
    assert!(cfg_json.contains("\"view_cache\": 3"), "{cfg_json}");

    let other = TrainConfig { seed: 8, steps: 1, ..cfg.clone() };
    train::train(&other, &c.dir.path().join("runs/seed8"), false, &rt(), &env).unwrap();
    assert_eq!(caches().len(), 2, "another seed draws another pool");

    for (bad, why) in [
        (TrainConfig { view_cache: 1, ..cfg.clone() }, "at least 2 views"),
        (TrainConfig { freeze: 0, ..cfg.clone() }, "--freeze"),
    ] {
        let e = train::train(&bad, &c.dir.path().join("runs/bad"), false, &rt(), &env).unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
    }
}

#[test]
fn a_run_on_fit_leaves_the_validation_products_out() {
    // `--split fit` trains on the seen products minus the validation hold-out: the run's
    // model.json counts those items only.
    let c = Catalogue::new(6);
    let m = hiercon::catalogue::Manifest::read(c.manifest()).unwrap();
    let fit = hiercon::catalogue::Subset::Fit.select(&m.items).len();
    let train = hiercon::catalogue::Subset::Train.select(&m.items).len();
    assert!(0 < fit && fit < train, "fit {fit} of {train}");
    let out = c.dir.path().join("runs/fit");
    let cfg = TrainConfig { split: hiercon::catalogue::Subset::Fit, ..config(&c, LossKind::Hmce, 2) };
    train::train(&cfg, &out, false, &rt(), &TrainEnv::default()).unwrap();
    let meta = ModelMeta::read(&out.join("model.json")).unwrap();
    assert_eq!(meta.extra["training"]["items"], fit);
    let test = TrainConfig { split: hiercon::catalogue::Subset::Test, ..cfg };
    let e = train::train(&test, &c.dir.path().join("runs/test"), false, &rt(), &TrainEnv::default()).unwrap_err();
    assert!(e.to_string().contains("unseen"), "{e}");
}
