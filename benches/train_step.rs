//! The `resnet-mini` training step at 64 px, batch 64 images (32 samples x 2 views), HiMulConE
//! loss, SGD: the figure issue 3 asks for. Criterion times the step; alongside, this bench
//! measures a large matrix product through ORT (the machine's reachable GFLOP/s) and writes
//! `bench/results/train_step.json`:
//! - `seconds_per_step` (median of criterion's samples) and `images_per_s`;
//! - `peak_rss_mib` (the process's high-water mark, VmHWM);
//! - `step_gflop` (Conv, ConvTranspose, MatMul and Gemm FLOPs of the compiled step graph),
//!   `achieved_gflops`, `gemm_gflops` and `gemm_ratio` = achieved / gemm;
//! - `torch_ratio` = our median step time / PyTorch eager's, timed interleaved in this run: three
//!   rounds of 15 of our steps, each followed by 15 steps of `bench/torch_step.py` (the same
//!   network, loss and optimizer) in the venv `make bench-torch` installs (`HIERCON_TORCH_PYTHON`
//!   overrides the interpreter); without that venv, `torch_ratio` is null.
//!
//! `HIERCON_BENCH_DUMP=<dir>` also writes the step graph there as ONNX (for profiling).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use hiercon::graph::{DType, GradOptions, Graph, Optimizer, Runner, Sgd, Tensor};
use hiercon::loss::{LossOptions, loss_graph};
use hiercon::model::{Arch, LossParts, ModelConfig, step_graph};
use hiercon::runtime::RuntimeOptions;
use hiercon::train::TrainSession;
use rand::{Rng, SeedableRng};

const N: usize = 32;
const K: usize = 5;
const SIZE: usize = 64;
const GEMM: usize = 1024;

static TIMES: Mutex<Vec<f64>> = Mutex::new(Vec::new());

/// FLOPs of the dense ops of `g` (2 per multiply-add).
fn flops(g: &Graph) -> f64 {
    let numel = |v| g.shape(v).iter().product::<usize>() as f64;
    g.nodes()
        .iter()
        .map(|n| match n.op {
            // Convolutions with constant kernels are the im2col unfolds: data movement, not FLOPs.
            "Conv" if g.const_value(n.inputs[1]).is_some() => 0.0,
            "Conv" => {
                let w = g.shape(n.inputs[1]);
                2.0 * numel(n.outputs[0]) * (w[1] * w[2] * w[3]) as f64
            }
            "ConvTranspose" => {
                let w = g.shape(n.inputs[1]);
                2.0 * numel(n.inputs[0]) * (w[1] * w[2] * w[3]) as f64
            }
            "MatMul" => {
                let a = g.shape(n.inputs[0]);
                2.0 * numel(n.outputs[0]) * a[a.len() - 1] as f64
            }
            "Gemm" => {
                let a = g.shape(n.inputs[0]);
                let trans_a = n.attr_int("transA", 0) != 0;
                2.0 * numel(n.outputs[0]) * (if trans_a { a[0] } else { a[1] }) as f64
            }
            _ => 0.0,
        })
        .sum()
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// GFLOP/s of one `GEMM`-sized f32 matrix product through ORT (median of 10 runs).
fn gemm_gflops(rt: &RuntimeOptions) -> f64 {
    let mut g = Graph::new();
    let a = g.input("a", DType::F32, &[GEMM, GEMM]).unwrap();
    let b = g.input("b", DType::F32, &[GEMM, GEMM]).unwrap();
    let c = g.matmul(a, b).unwrap();
    g.output("c", c).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut rand =
        || Tensor::f32(&[GEMM, GEMM], (0..GEMM * GEMM).map(|_| rng.random_range(-1.0..1.0)).collect()).unwrap();
    let (x, y) = (rand(), rand());
    let mut run = Runner::new(&g, rt).unwrap();
    let mut times: Vec<f64> = (0..12)
        .map(|_| {
            let t = Instant::now();
            run.run(&[("a", &x), ("b", &y)]).unwrap();
            t.elapsed().as_secs_f64()
        })
        .skip(2)
        .collect();
    times.sort_by(f64::total_cmp);
    2.0 * (GEMM as f64).powi(3) / times[times.len() / 2] / 1e9
}

/// Median seconds per step of ours and of PyTorch's twin, measured in alternating rounds so that
/// both see the same machine; `None` for torch when its venv is missing.
fn interleaved(
    session: &mut TrainSession,
    images: &Tensor,
    labels: &Tensor,
) -> (Option<f64>, Option<serde_json::Value>) {
    let python = std::env::var("HIERCON_TORCH_PYTHON").unwrap_or_else(|_| "bench/venv/bin/python".into());
    if !std::path::Path::new(&python).exists() {
        eprintln!("train_step: {python} missing (make bench-torch installs it); torch_ratio is null");
        return (None, None);
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..3 {
        for _ in 0..15 {
            let t = Instant::now();
            session.run(images, labels, 0.01).unwrap();
            ours.push(t.elapsed().as_secs_f64());
        }
        let out = std::process::Command::new(&python)
            .args(["bench/torch_step.py", "--images", &(2 * N).to_string(), "--size", &SIZE.to_string()])
            .args(["--steps", "15", "--warmup", "3"])
            .output()
            .expect("running bench/torch_step.py");
        assert!(out.status.success(), "torch_step.py failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("torch_step.py prints JSON");
        theirs.push(v["seconds_per_step"].as_f64().expect("seconds_per_step"));
        last = Some(v);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut torch = last.expect("three rounds");
    torch["seconds_per_step"] = serde_json::json!(median(theirs.clone()));
    torch["rounds_seconds_per_step"] = serde_json::json!(theirs);
    (Some(median(ours)), Some(torch))
}

fn bench(c: &mut Criterion) {
    hiercon::runtime::init().unwrap();
    let rt = RuntimeOptions::default();
    let cfg = ModelConfig::new(Arch::ResnetMini, SIZE, 0);
    let opts = LossOptions::default();
    let step = step_graph(
        &cfg,
        N,
        K,
        &Optimizer::Sgd(Sgd { momentum: 0.9, weight_decay: 1e-4, nesterov: false }),
        &GradOptions::default(),
        |g, emb, labels| {
            let p = loss_graph(g, emb, labels, &opts, None)?;
            Ok(LossParts { loss: p.loss, level_losses: p.level_losses })
        },
    )
    .unwrap();
    let step_flops = flops(&step.graph);
    if let Some(dir) = std::env::var_os("HIERCON_BENCH_DUMP") {
        step.graph.write_onnx(&std::path::Path::new(&dir).join("train_step.onnx"), "step").unwrap();
    }
    let mut session = TrainSession::new(&step, &rt, None).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let numel = 2 * N * 3 * SIZE * SIZE;
    let images =
        Tensor::f32(&[2 * N, 3, SIZE, SIZE], (0..numel).map(|_| rng.random_range(-2.0..2.0)).collect()).unwrap();
    // Labels shaped like the emoji catalogue's: category, subcategory, product, variation, image.
    let labels: Vec<i64> = (0..N as i64).flat_map(|i| [i % 3, i % 6, i / 2, i, 100 + i]).collect();
    let labels = Tensor::i64(&[N, K], labels).unwrap();

    let mut group = c.benchmark_group("train_step");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    group.bench_function("resnet_mini_64px_batch64_hmce_sgd", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let s = Instant::now();
                session.run(&images, &labels, 0.01).unwrap();
                TIMES.lock().unwrap().push(s.elapsed().as_secs_f64());
            }
            t.elapsed()
        })
    });
    group.finish();

    let mut times = TIMES.lock().unwrap().clone();
    if times.len() < 5 {
        return; // `cargo bench -- --test`: a smoke run, no figures
    }
    times.sort_by(f64::total_cmp);
    let s = times[times.len() / 2];
    let gemm = gemm_gflops(&rt);
    let achieved = step_flops / s / 1e9;
    let (ours, torch) = interleaved(&mut session, &images, &labels);
    let torch_s = torch.as_ref().and_then(|t| t["seconds_per_step"].as_f64());
    let result = serde_json::json!({
        "bench": "resnet-mini 64px, 64 images (32 samples x 2 views), hmce, SGD momentum 0.9",
        "machine": hiercon::runtime::machine_description(),
        "seconds_per_step": s,
        "images_per_s": (2 * N) as f64 / s,
        "peak_rss_mib": peak_rss_mib(),
        "step_gflop": step_flops / 1e9,
        "achieved_gflops": achieved,
        "gemm_gflops": gemm,
        "gemm_ratio": achieved / gemm,
        "torch_seconds_per_step": torch_s,
        "interleaved_seconds_per_step": ours,
        "torch_ratio": torch_s.and_then(|t| ours.map(|o| o / t)),
        "torch": torch,
        "conv_weight_grad": step.report.convs.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&result).unwrap();
    std::fs::create_dir_all("bench/results").unwrap();
    std::fs::write("bench/results/train_step.json", &text).unwrap();
    println!("{text}");
}

criterion_group!(benches, bench);
criterion_main!(benches);
