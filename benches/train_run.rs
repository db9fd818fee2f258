//! The whole trainer, start to exported model, on one of hiercon's shipped settings over the emoji
//! catalogue's train split (EfficientNet-Lite0 from ImageNet, 128 px, SGD lr 0.01, 32 samples x 2
//! views per step, 1,500 steps, seed 0), chosen by `BENCH_TRAIN_SETTING`:
//!
//! - `shipped` (the default): today's default model, stem + stages 1-3 frozen, hmce plus SupCon's
//!   product term (`--supcon-mix 1`), written to `bench/results/train_run-shipped.json`;
//! - `f6-hmce`: the default when the throughput work was done, stem + stages 1-5 frozen, hmce,
//!   written to `bench/results/train_run-f6-hmce.json`.
//!
//! Three rows, run one after the other in one process:
//!
//! - `before`: the trainer as it was before the throughput work — trained depthwise
//!   convolutions as grouped Conv nodes and batches prepared between steps on the calling thread
//!   (`TrainEnv { depthwise: Conv, serial_batches: true }`; the computation is the same, so the
//!   losses agree up to float rounding);
//! - `default`: today's `hiercon train` (dense depthwise on small maps, batches prepared on the
//!   prefetch worker);
//! - `view_cache`: the same with `--view-cache 8`, the cache built from nothing inside the
//!   timed run (a fresh folder).
//!
//! Each row reports the wall seconds from the call to the exported `model.onnx`, the images/s of
//! the whole run (steps x 64 / wall) and of the steps alone, the view cache's seconds, the final
//! loss, and its speed-up over `before`. With the PyTorch venv of `make bench-torch`, PyTorch
//! eager's twin of the same step (`bench/torch_step.py`, random data, no data loading) is timed
//! too, for scale. Accuracy at equal settings is the study's job (reports/paper.md): this
//! bench only times.
//!
//! `BENCH_TRAIN_STEPS` shortens the runs (default 1,500: about 45 minutes (f6-hmce) to an hour
//! (shipped) on 2 cores);
//! `BENCH_TRAIN_ROWS` picks rows (comma-separated names). Needs `HIERCON_TEST_DATA` (`make bench`
//! sets it) and the Lite0 weights of `make pretrained`.

use std::path::PathBuf;
use std::time::Instant;

use hiercon::catalogue::Subset;
use hiercon::graph::DepthwiseLowering;
use hiercon::image::Augment;
use hiercon::loss::{LossKind, LossOptions};
use hiercon::model::{Arch, Init};
use hiercon::runtime::RuntimeOptions;
use hiercon::train::{OptimizerKind, SamplerKind, TrainConfig, TrainEnv, read_metrics};

fn main() {
    // cargo bench passes `--bench`; nothing to filter.
    let steps: usize = std::env::var("BENCH_TRAIN_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(1500);
    let rows: Vec<String> = std::env::var("BENCH_TRAIN_ROWS")
        .unwrap_or_else(|_| "before,default,view_cache".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let setting = std::env::var("BENCH_TRAIN_SETTING").unwrap_or_else(|_| "shipped".into());
    let (freeze, supcon_mix, what) = match setting.as_str() {
        "shipped" => (4, 1.0, "stem + stages 1-3 frozen, hmce + SupCon at product level (--supcon-mix 1)"),
        "f6-hmce" => (6, 0.0, "stem + stages 1-5 frozen, hmce"),
        other => panic!("BENCH_TRAIN_SETTING {other:?}: shipped or f6-hmce"),
    };
    let data = std::env::var("HIERCON_TEST_DATA").expect("HIERCON_TEST_DATA (make bench sets it)");
    let manifest = PathBuf::from(data).join("emoji/manifest.jsonl");
    hiercon::runtime::init().expect("ONNX Runtime (make ort)");
    let train_items =
        Subset::Train.select(&hiercon::catalogue::Manifest::read(&manifest).expect("manifest").items).len();
    let cfg = |view_cache: usize| TrainConfig {
        manifest: manifest.clone(),
        split: Subset::Train,
        loss: LossOptions { kind: LossKind::Hmce, supcon_mix, ..LossOptions::default() },
        arch: Arch::EfficientnetLite0,
        image_size: 128,
        batch_size: 32,
        steps,
        optimizer: OptimizerKind::Sgd,
        lr: 0.01,
        weight_decay: 1e-4,
        warmup: steps / 20,
        sampler: SamplerKind::Hierarchical,
        augment: Augment::default(),
        seed: 0,
        checkpoint_every: 250,
        init: Init::Pretrained,
        weights: None,
        freeze,
        init_onnx: None,
        cut: None,
        normalization: None,
        bgr: false,
        view_cache,
        drop_levels: Vec::new(),
    };
    let tmp = tempfile::tempdir().expect("temporary folder");
    let mut results = serde_json::Map::new();
    let mut before_wall = None;
    for row in &rows {
        let (config, env) = match row.as_str() {
            "before" => {
                (cfg(0), TrainEnv { depthwise: DepthwiseLowering::Conv, serial_batches: true, ..TrainEnv::default() })
            }
            "default" => (cfg(0), TrainEnv::default()),
            "view_cache" => {
                (cfg(8), TrainEnv { view_cache_dir: Some(tmp.path().join("views")), ..TrainEnv::default() })
            }
            other => panic!("unknown row {other:?} (before, default, view_cache)"),
        };
        let out = tmp.path().join(row);
        eprintln!("train_run: {row}, {steps} steps");
        let started = Instant::now();
        let done = hiercon::train::train(&config, &out, false, &RuntimeOptions::default(), &env).expect("training");
        let wall = started.elapsed().as_secs_f64();
        let images = (steps * 2 * config.batch_size) as f64;
        let metrics = read_metrics(&out.join("metrics.jsonl")).expect("metrics");
        if row == "before" {
            before_wall = Some(wall);
        }
        let r = serde_json::json!({
            "wall_seconds": wall,
            "images_per_s": images / wall,
            "step_seconds": done.seconds,
            "steps_images_per_s": images / done.seconds,
            "view_cache_seconds": done.view_cache_seconds,
            "view_cache_views": (config.view_cache > 0).then(|| config.view_cache * train_items),
            "final_loss": done.final_loss,
            "loss_mean_last_100": metrics.iter().rev().take(100).map(|m| m.loss).sum::<f64>() / metrics.len().clamp(1, 100) as f64,
            "speedup_over_before": before_wall.map(|b| b / wall),
        });
        eprintln!("train_run: {row}: {r}");
        results.insert(row.clone(), r);
        // Written after every row, so a long bench stopped part-way keeps what it measured.
        write_report(&setting, what, steps, &results, None);
    }
    write_report(&setting, what, steps, &results, Some(torch_twin(freeze)));
}

/// Writes `bench/results/train_run-SETTING.json` with the rows measured so far.
fn write_report(
    setting: &str,
    what: &str,
    steps: usize,
    rows: &serde_json::Map<String, serde_json::Value>,
    torch: Option<serde_json::Value>,
) {
    let report = serde_json::json!({
        "bench": format!("hiercon train, setting {setting} (Lite0 128 px, {what}, batch 32 x 2 views), {steps} steps on the emoji train split, start to exported model"),
        "setting": setting,
        "machine": hiercon::runtime::machine_description(),
        "steps": steps,
        "rows": rows,
        "torch_step_twin": torch.unwrap_or_else(|| serde_json::json!({"note": "not run yet"})),
    });
    let path = PathBuf::from(format!("bench/results/train_run-{setting}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("serialises") + "\n").expect("writing results");
    eprintln!("wrote {}", path.display());
}

/// PyTorch eager's twin of the step (`bench/torch_step.py`), when `make bench-torch`'s venv is
/// there, with the same units frozen: its JSON answer, or a note.
fn torch_twin(freeze: usize) -> serde_json::Value {
    let python = std::env::var("HIERCON_TORCH_PYTHON").unwrap_or_else(|_| "bench/venv/bin/python".into());
    if !std::path::Path::new(&python).exists() {
        return serde_json::json!({"note": format!("{python} not found: run `make bench-torch` for PyTorch's twin")});
    }
    let out = std::process::Command::new(&python)
        .args([
            "bench/torch_step.py",
            "--arch",
            "efficientnet-lite0",
            "--freeze",
            &freeze.to_string(),
            "--images",
            "64",
        ])
        .args(["--size", "128", "--steps", "20"])
        .output()
        .expect("running bench/torch_step.py");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_else(
        |_| serde_json::json!({"note": format!("torch_step.py failed: {}", String::from_utf8_lossy(&out.stderr))}),
    )
}
