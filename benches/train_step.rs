//! The `resnet-mini` training step at 64 px, batch 64 images (32 samples x 2 views), HiMulConE
//! loss over 5 label columns, SGD with momentum: the figures issue 3 asks for, written to
//! `bench/results/train_step.json`:
//! - `seconds_per_step` (median of criterion's samples) and `images_per_s`;
//! - `peak_rss_mib` (the process's high-water mark, VmHWM, after criterion's run of the one session);
//! - `step_gflop`: the model FLOPs of a step, 3x the forward pass's Conv/MatMul/Gemm FLOPs less
//!   the first convolution's input gradient, whatever the lowering;
//! - then, in alternating short blocks (see [`interleaved`]): our step, a 1024³ MatMul through
//!   ORT (the machine's reachable GFLOP/s) and PyTorch eager's twin (`bench/torch_step.py`, the
//!   same network, loss and optimizer, run from the venv `make bench-torch` installs;
//!   `HIERCON_TORCH_PYTHON` overrides the interpreter). From their medians: `achieved_gflops`,
//!   `gemm_gflops`, `gemm_ratio` = achieved / gemm, `torch_ratio` = ours / torch's step time
//!   (null without the venv), and for scale `torch_gemm_ratio`, PyTorch's own achieved / gemm.
//!   `gemm_ratio_criterion` uses criterion's step time instead.
//! - `nchwc`: the same figures for the same step with its convolutions written on ORT's NCHWc
//!   kernels (`GradOptions::cpu_nchwc`, opt-in because it is not standard ONNX), timed in the
//!   same alternation.
//!
//! `HIERCON_BENCH_DUMP=<dir>` also writes the step graph there as ONNX (for profiling).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use hiercon::graph::{DType, GradOptions, Graph, Optimizer, Runner, Sgd, Tensor};
use hiercon::loss::{LossOptions, loss_graph};
use hiercon::model::{Arch, LossParts, ModelConfig, StepGraph, inference_graph, step_graph};
use hiercon::runtime::RuntimeOptions;
use hiercon::train::TrainSession;
use rand::{Rng, SeedableRng};

const N: usize = 32;
const K: usize = 5;
const SIZE: usize = 64;
const GEMM: usize = 1024;

static TIMES: Mutex<Vec<f64>> = Mutex::new(Vec::new());

/// FLOPs (2 per multiply-add) of the Conv, MatMul and Gemm nodes of `g`.
fn dense_flops(g: &Graph) -> (f64, Vec<f64>) {
    let numel = |v| g.shape(v).iter().product::<usize>() as f64;
    let per_node: Vec<f64> = g
        .nodes()
        .iter()
        .map(|n| match n.op {
            "Conv" => {
                let w = g.shape(n.inputs[1]);
                2.0 * numel(n.outputs[0]) * (w[1] * w[2] * w[3]) as f64
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
        .collect();
    (per_node.iter().sum(), per_node.into_iter().filter(|&f| f > 0.0).collect())
}

/// The model FLOPs of one training step, independent of how the step is lowered: the forward
/// pass's Conv/MatMul/Gemm FLOPs three times (forward, input gradient, weight gradient), less
/// the input gradient of the first convolution (the images need none). The loss's few MFLOP and
/// the data movement of the gradient lowerings (unfolds, shifted copies) are not counted.
fn step_flops(cfg: &ModelConfig) -> f64 {
    let fwd = inference_graph(cfg, 2 * N).unwrap();
    let (total, per_node) = dense_flops(&fwd);
    3.0 * total - per_node[0]
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

/// A `GEMM`-sized f32 matrix product through ORT: the machine's reachable GFLOP/s.
struct GemmProbe {
    run: Runner,
    a: Tensor,
    b: Tensor,
}

impl GemmProbe {
    fn new(rt: &RuntimeOptions) -> GemmProbe {
        let mut g = Graph::new();
        let a = g.input("a", DType::F32, &[GEMM, GEMM]).unwrap();
        let b = g.input("b", DType::F32, &[GEMM, GEMM]).unwrap();
        let c = g.matmul(a, b).unwrap();
        g.output("c", c).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut rand =
            || Tensor::f32(&[GEMM, GEMM], (0..GEMM * GEMM).map(|_| rng.random_range(-1.0..1.0)).collect()).unwrap();
        let (a, b) = (rand(), rand());
        let mut probe = GemmProbe { run: Runner::new(&g, rt).unwrap(), a, b };
        probe.gflops(2);
        probe
    }

    /// GFLOP/s of each of `n` products.
    fn gflops(&mut self, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let t = Instant::now();
                self.run.run(&[("a", &self.a), ("b", &self.b)]).unwrap();
                2.0 * (GEMM as f64).powi(3) / t.elapsed().as_secs_f64() / 1e9
            })
            .collect()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// PyTorch's twin (`bench/torch_step.py --serve`), kept running so that its steps can alternate
/// with ours in short blocks.
struct TorchWorker {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    info: serde_json::Value,
}

impl TorchWorker {
    /// `None` (with a note) when the venv `make bench-torch` installs is missing.
    fn start() -> Option<TorchWorker> {
        use std::io::BufRead;
        let python = std::env::var("HIERCON_TORCH_PYTHON").unwrap_or_else(|_| "bench/venv/bin/python".into());
        if !std::path::Path::new(&python).exists() {
            eprintln!("train_step: {python} missing (make bench-torch installs it); torch_ratio is null");
            return None;
        }
        let mut child = std::process::Command::new(&python)
            .args(["bench/torch_step.py", "--serve", "--images", &(2 * N).to_string(), "--size", &SIZE.to_string()])
            .args(["--warmup", "3"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting bench/torch_step.py");
        let stdin = child.stdin.take().expect("piped");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("reading torch_step.py");
        let info: serde_json::Value = serde_json::from_str(&line).expect("torch_step.py prints JSON when ready");
        Some(TorchWorker { child, stdin, stdout, info })
    }

    fn steps(&mut self, k: usize) -> Vec<f64> {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "steps {k}").expect("writing to torch_step.py");
        self.stdin.flush().expect("writing to torch_step.py");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading torch_step.py");
        let v: serde_json::Value = serde_json::from_str(&line).expect("torch_step.py answers JSON");
        v["times"].as_array().expect("times").iter().map(|t| t.as_f64().expect("seconds")).collect()
    }
}

impl Drop for TorchWorker {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

/// Step times of ours and of PyTorch's twin, and GEMM probes, taken in alternating short blocks
/// (`ROUNDS` x [`BLOCK` of our steps, 3 products, `BLOCK` torch steps], each after 100 ms idle,
/// the first step of each block dropped) so that all three see the same machine: a sustained load slows this machine
/// down by up to a third, and block order would otherwise favour whoever ran cooler.
struct Interleaved {
    /// Per session given, its step times.
    ours: Vec<Vec<f64>>,
    torch: Option<Vec<f64>>,
    gemm: Vec<f64>,
    torch_info: Option<serde_json::Value>,
}

const ROUNDS: usize = 10;
const BLOCK: usize = 6;

fn interleaved(sessions: &mut [TrainSession], images: &Tensor, labels: &Tensor, probe: &mut GemmProbe) -> Interleaved {
    let mut worker = TorchWorker::start();
    let (mut ours, mut torch, mut gemm) = (vec![Vec::new(); sessions.len()], Vec::new(), Vec::new());
    // Idle threads of the session that just ran (ORT's spinning pool, torch's OpenMP team) would
    // otherwise take a core from the next block for a while.
    let settle = || std::thread::sleep(Duration::from_millis(100));
    for _ in 0..ROUNDS {
        for (session, times) in sessions.iter_mut().zip(&mut ours) {
            settle();
            for i in 0..BLOCK {
                let t = Instant::now();
                session.run(images, labels, 0.01).unwrap();
                if i > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
        }
        settle();
        gemm.extend(probe.gflops(3));
        settle();
        if let Some(w) = worker.as_mut() {
            torch.extend(w.steps(BLOCK).into_iter().skip(1));
        }
    }
    let torch_info = worker.as_ref().map(|w| w.info.clone());
    Interleaved { ours, torch: worker.map(|_| torch), gemm, torch_info }
}

fn bench(c: &mut Criterion) {
    hiercon::runtime::init().unwrap();
    let rt = RuntimeOptions::default();
    let cfg = ModelConfig::new(Arch::ResnetMini, SIZE, 0);
    let opts = LossOptions::default();
    let grad = GradOptions::for_runtime(&rt);
    let step = step_graph(
        &cfg,
        None,
        N,
        K,
        &Optimizer::Sgd(Sgd { momentum: 0.9, weight_decay: 1e-4, nesterov: false }),
        &grad,
        |g, emb, labels| {
            let p = loss_graph(g, emb, labels, &opts, None)?;
            Ok(LossParts { loss: p.loss, level_losses: p.level_losses })
        },
    )
    .unwrap();
    let step_flops = step_flops(&cfg);
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

    let times = TIMES.lock().unwrap().clone();
    if times.len() < 5 {
        return; // `cargo bench -- --test`: a smoke run, no figures
    }
    let s = median(times);
    // Before the probe and the second session add their own memory.
    let rss = peak_rss_mib();
    let mut probe = GemmProbe::new(&rt);
    // The same step with its convolutions on ORT's NCHWc kernels (opt-in, not standard ONNX).
    let nchwc_block = hiercon::graph::nchwc::block_size();
    let mut sessions = vec![session];
    if nchwc_block.is_some() {
        let blocked = StepGraph { lowering: GradOptions { cpu_nchwc: true, ..grad }, ..step.clone() };
        sessions.push(TrainSession::new(&blocked, &rt, None).unwrap());
    }
    let run = interleaved(&mut sessions, &images, &labels, &mut probe);
    let ours = median(run.ours[0].clone());
    let nchwc = run.ours.get(1).cloned().map(median);
    let gemm = median(run.gemm.clone());
    let torch_s = run.torch.clone().map(median);
    let gflops = |seconds: f64| step_flops / seconds / 1e9;
    let result = serde_json::json!({
        "bench": "resnet-mini 64px, 64 images (32 samples x 2 views), hmce over 5 label columns, SGD momentum 0.9",
        "machine": hiercon::runtime::machine_description(),
        "seconds_per_step": s,
        "images_per_s": (2 * N) as f64 / s,
        "peak_rss_mib": rss,
        "step_gflop": step_flops / 1e9,
        "interleaved": {
            "rounds": ROUNDS,
            "block": BLOCK,
            "seconds_per_step": ours,
            "torch_seconds_per_step": torch_s,
            "gemm_gflops": gemm,
            "ours_steps": run.ours[0],
            "nchwc_seconds_per_step": nchwc,
            "nchwc_steps": run.ours.get(1),
            "torch_steps": run.torch,
            "gemm_probes": run.gemm,
        },
        "achieved_gflops": gflops(ours),
        "gemm_gflops": gemm,
        "gemm_ratio": gflops(ours) / gemm,
        "gemm_ratio_criterion": gflops(s) / gemm,
        "torch_ratio": torch_s.map(|t| ours / t),
        "torch_gemm_ratio": torch_s.map(|t| gflops(t) / gemm),
        "torch": run.torch_info,
        "conv_weight_grad": step.report.convs.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>(),
        "batch_norm": format!("{:?}", grad.batch_norm),
        "nchwc": nchwc.map(|t| serde_json::json!({
            "note": "opt-in (GradOptions::cpu_nchwc): dense Convs on ORT's com.microsoft.nchwc kernels, not standard ONNX",
            "block": nchwc_block,
            "seconds_per_step": t,
            "achieved_gflops": gflops(t),
            "gemm_ratio": gflops(t) / gemm,
            "torch_ratio": torch_s.map(|ts| t / ts),
        })),
    });
    let text = serde_json::to_string_pretty(&result).unwrap();
    std::fs::create_dir_all("bench/results").unwrap();
    std::fs::write("bench/results/train_step.json", &text).unwrap();
    println!("{text}");
}

criterion_group!(benches, bench);
criterion_main!(benches);
