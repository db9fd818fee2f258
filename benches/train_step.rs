//! Two training steps, each 64 images (32 samples x 2 views), HiMulConE loss over 5 label
//! columns, SGD with momentum 0.9 and weight decay 1e-4, seeded random initial weights (this times
//! steps, it does not train), written to `bench/results/train_step.json`:
//! - [`RESNET_MINI`]: `resnet-mini` at 64 px, nothing frozen — the figures issue 3 asks for, at
//!   the top level of the file (as before);
//! - [`LITE0`]: EfficientNet-Lite0 at 128 px with the first 6 of its 9 units frozen (stem and
//!   stages 1-5), hiercon's shipped setting, under `"efficientnet_lite0"`. Image size and freeze
//!   count are fields of that constant.
//!
//! Each case ([`bench_case`]) reports:
//! - `seconds_per_step` (median of criterion's samples) and `images_per_s`;
//! - `peak_rss_mib`: the process's high-water mark (VmHWM) after criterion's run of the case's
//!   one session, with the mark reset (`/proc/self/clear_refs` 5) when the case began, so that it
//!   holds the resident memory of that moment (`rss_at_start_mib`: the runtime, what earlier cases
//!   freed but the allocator kept) plus this case's growth; `hwm_reset` says whether the reset
//!   worked (if not, the mark is the whole process's so far);
//! - `step_gflop`: the model FLOPs of a step whatever the lowering: each Conv/MatMul/Gemm of the
//!   forward pass once, plus once per operand that depends on a trained parameter (its weight
//!   gradient, its input gradient) — 3x the forward less the first convolution's input gradient
//!   when nothing is frozen; frozen units count their forward pass only (see [`step_flops`]);
//! - then, in alternating short blocks (see [`interleaved`]): our step, a 1024³ MatMul through
//!   ORT (the machine's reachable GFLOP/s) and PyTorch eager's twin (`bench/torch_step.py
//!   --arch .. --freeze ..`, the same network, freezing, loss and optimizer, run from the venv
//!   `make bench-torch` installs; `HIERCON_TORCH_PYTHON` overrides the interpreter). From their
//!   medians: `achieved_gflops`, `gemm_gflops`, `gemm_ratio` = achieved / gemm, `torch_ratio` =
//!   ours / torch's step time (null without the venv), and for scale `torch_gemm_ratio`,
//!   PyTorch's own achieved / gemm. `gemm_ratio_criterion` uses criterion's step time instead.
//! - `nchwc`: the same figures for the same step with its convolutions written on ORT's NCHWc
//!   kernels (`GradOptions::cpu_nchwc`, opt-in because it is not standard ONNX), timed in the
//!   same alternation (when the probe finds a block size).
//!
//! The Lite0 case takes fewer criterion samples and interleaved rounds (a step is seconds, not
//! tens of milliseconds). A criterion filter (`cargo bench --bench train_step -- lite0`) runs
//! only the matching case; the other is then null / absent in the file.
//!
//! `HIERCON_BENCH_DUMP=<dir>` also writes each step graph there as ONNX (for profiling):
//! `train_step.onnx` (resnet-mini) and `train_step.<arch>.onnx`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use hiercon::graph::{DType, GradOptions, Graph, InputKind, Node, Optimizer, Runner, Sgd, Tensor, Value};
use hiercon::loss::{LossOptions, loss_graph};
use hiercon::model::{Arch, LossParts, ModelConfig, StepGraph, inference_graph, step_graph};
use hiercon::runtime::RuntimeOptions;
use hiercon::train::TrainSession;
use rand::{Rng, SeedableRng};

/// Samples per step (the step sees `2N` images) and label columns, in both cases.
const N: usize = 32;
const K: usize = 5;
const MOMENTUM: f64 = 0.9;
const WEIGHT_DECAY: f64 = 1e-4;
const GEMM: usize = 1024;

/// One benchmarked setting: what our step and PyTorch's twin are built from, and how long to
/// time it.
#[derive(Debug, Clone, Copy)]
struct Case {
    arch: Arch,
    size: usize,
    /// Leading units frozen ([`Arch::freeze_units`]).
    freeze: usize,
    /// Criterion: samples, their sampling mode and the measurement time.
    samples: usize,
    sampling: SamplingMode,
    measure: Duration,
    /// Interleaved blocks (see [`interleaved`]).
    rounds: usize,
    block: usize,
}

/// The figures issue 3 asks for.
const RESNET_MINI: Case = Case {
    arch: Arch::ResnetMini,
    size: 64,
    freeze: 0,
    samples: 10,
    sampling: SamplingMode::Auto,
    measure: Duration::from_secs(20),
    rounds: 10,
    block: 6,
};

/// hiercon's shipped setting, EfficientNet-Lite0 with stem and stages 1-5 frozen, at 128 px
/// (224 px is the native size; change `size` here). About a second per step on 2 cores:
/// criterion takes 10 flat samples of one step, the interleaving 5 rounds of 4.
const LITE0: Case = Case {
    arch: Arch::EfficientnetLite0,
    size: 128,
    freeze: 6,
    samples: 10,
    sampling: SamplingMode::Flat,
    measure: Duration::from_secs(10),
    rounds: 5,
    block: 4,
};

impl Case {
    fn config(&self) -> ModelConfig {
        ModelConfig { freeze: self.freeze, ..ModelConfig::new(self.arch, self.size, 0) }
    }

    /// Criterion's benchmark id, e.g. `resnet_mini_64px_batch64_hmce_sgd`.
    fn id(&self) -> String {
        let frozen = if self.freeze > 0 { format!("_freeze{}", self.freeze) } else { String::new() };
        format!("{}_{}px_batch{}{frozen}_hmce_sgd", self.arch.name().replace('-', "_"), self.size, 2 * N)
    }

    fn describe(&self) -> String {
        let frozen = if self.freeze > 0 {
            format!(", first {} of {} units frozen", self.freeze, self.arch.freeze_units())
        } else {
            String::new()
        };
        format!(
            "{} {}px{frozen}, {} images ({N} samples x 2 views), hmce over {K} label columns, SGD momentum \
             {MOMENTUM} wd {WEIGHT_DECAY}, random init",
            self.arch,
            self.size,
            2 * N
        )
    }
}

/// FLOPs (2 per multiply-add) of a Conv, MatMul or Gemm node of `g`, 0 for anything else.
fn node_flops(g: &Graph, n: &Node) -> f64 {
    let numel = |v| g.shape(v).iter().product::<usize>() as f64;
    match n.op {
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
    }
}

/// Model FLOPs of one step of `step`, independent of how it is lowered, and of its forward pass
/// alone. Each Conv/MatMul/Gemm of the forward pass (the inference graph, same layers and names)
/// counts once for itself and once more for each of its two operands that depends on a
/// parameter `step` trains: the weight's gradient when the weight is trained, the input's
/// gradient when something trained lies upstream. With nothing frozen that is 3x the forward
/// less the first convolution's input gradient (the images need none); frozen units before the
/// first trained one count their forward only. The loss's few MFLOP and the data movement of the
/// gradient lowerings (unfolds, shifted copies) are not counted.
fn step_flops(cfg: &ModelConfig, step: &StepGraph) -> (f64, f64) {
    let fwd = inference_graph(cfg, 2 * N).unwrap();
    // Frozen layers are constants of `step`: its parameters are the trained ones.
    let trained: HashSet<&str> = step.graph.params().iter().map(|&p| step.graph.name(p)).collect();
    // Values that depend on a trained parameter.
    let mut live: HashSet<Value> = fwd
        .inputs()
        .iter()
        .filter(|i| i.kind == InputKind::Param && trained.contains(fwd.name(i.value)))
        .map(|i| i.value)
        .collect();
    let (mut total, mut forward) = (0.0, 0.0);
    for n in fwd.nodes() {
        let f = node_flops(&fwd, n);
        let grads = n.inputs.iter().take(2).filter(|v| live.contains(v)).count();
        if n.inputs.iter().any(|v| live.contains(v)) {
            live.extend(n.outputs.iter().copied());
        }
        forward += f;
        total += f * (1 + grads) as f64;
    }
    (total, forward)
}

/// A field of `/proc/self/status` in MiB (`VmHWM`, `VmRSS`).
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Resets VmHWM to the current VmRSS (Linux ≥ 4.0); false where that is not allowed.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
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
    /// The twin of `case`; `None` (with a note) when the venv `make bench-torch` installs is missing.
    fn start(case: &Case) -> Option<TorchWorker> {
        use std::io::BufRead;
        let python = std::env::var("HIERCON_TORCH_PYTHON").unwrap_or_else(|_| "bench/venv/bin/python".into());
        if !std::path::Path::new(&python).exists() {
            eprintln!("train_step: {python} missing (make bench-torch installs it); torch_ratio is null");
            return None;
        }
        let mut child = std::process::Command::new(&python)
            .args(["bench/torch_step.py", "--serve", "--arch", case.arch.name()])
            .args(["--freeze", &case.freeze.to_string(), "--images", &(2 * N).to_string()])
            .args(["--size", &case.size.to_string(), "--warmup", "3"])
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
/// (`case.rounds` x [`case.block` of our steps per session, 3 products, `case.block` torch
/// steps], each after 100 ms idle, the first step of each block dropped) so that all three see
/// the same machine: a sustained load slows this machine down by up to a third, and block order
/// would otherwise favour whoever ran cooler.
struct Interleaved {
    /// Per session given, its step times.
    ours: Vec<Vec<f64>>,
    torch: Option<Vec<f64>>,
    gemm: Vec<f64>,
    torch_info: Option<serde_json::Value>,
}

fn interleaved(
    case: &Case,
    sessions: &mut [TrainSession],
    images: &Tensor,
    labels: &Tensor,
    probe: &mut GemmProbe,
) -> Interleaved {
    let mut worker = TorchWorker::start(case);
    let (mut ours, mut torch, mut gemm) = (vec![Vec::new(); sessions.len()], Vec::new(), Vec::new());
    // Idle threads of the session that just ran (ORT's spinning pool, torch's OpenMP team) would
    // otherwise take a core from the next block for a while.
    let settle = || std::thread::sleep(Duration::from_millis(100));
    for _ in 0..case.rounds {
        for (session, times) in sessions.iter_mut().zip(&mut ours) {
            settle();
            for i in 0..case.block {
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
            torch.extend(w.steps(case.block).into_iter().skip(1));
        }
    }
    let torch_info = worker.as_ref().map(|w| w.info.clone());
    Interleaved { ours, torch: worker.map(|_| torch), gemm, torch_info }
}

/// Benches `case`: criterion's run of its step, then the interleaved comparison. Returns the
/// case's figures, or `None` when criterion did not time it (a `--test` smoke run, or a filter
/// that leaves it out).
fn bench_case(c: &mut Criterion, case: &Case, rt: &RuntimeOptions) -> Option<serde_json::Value> {
    let hwm_reset = reset_peak_rss();
    let rss_at_start = status_mib("VmRSS");
    let cfg = case.config();
    let opts = LossOptions::default();
    let grad = GradOptions::for_runtime(rt);
    let step = step_graph(
        &cfg,
        None,
        N,
        K,
        &Optimizer::Sgd(Sgd { momentum: MOMENTUM, weight_decay: WEIGHT_DECAY, nesterov: false }),
        &grad,
        |g, emb, labels| {
            let p = loss_graph(g, emb, labels, &opts, None)?;
            Ok(LossParts { loss: p.loss, level_losses: p.level_losses })
        },
    )
    .unwrap();
    let (step_flops, forward_flops) = step_flops(&cfg, &step);
    let trainable: usize = step.graph.params().iter().map(|&p| step.graph.info(p).numel()).sum();
    if let Some(dir) = std::env::var_os("HIERCON_BENCH_DUMP") {
        let file = if case.arch == Arch::ResnetMini {
            "train_step.onnx".into()
        } else {
            format!("train_step.{}.onnx", case.arch)
        };
        step.graph.write_onnx(&std::path::Path::new(&dir).join(file), "step").unwrap();
    }
    let mut session = TrainSession::new(&step, rt, None).unwrap();

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let size = case.size;
    let numel = 2 * N * 3 * size * size;
    let images =
        Tensor::f32(&[2 * N, 3, size, size], (0..numel).map(|_| rng.random_range(-2.0..2.0)).collect()).unwrap();
    // Labels shaped like the emoji catalogue's: category, subcategory, product, variation, image.
    let labels: Vec<i64> = (0..N as i64).flat_map(|i| [i % 3, i % 6, i / 2, i, 100 + i]).collect();
    let labels = Tensor::i64(&[N, K], labels).unwrap();

    let mut times = Vec::new();
    let mut group = c.benchmark_group("train_step");
    group.sample_size(case.samples).sampling_mode(case.sampling).measurement_time(case.measure);
    group.bench_function(case.id(), |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let s = Instant::now();
                session.run(&images, &labels, 0.01).unwrap();
                times.push(s.elapsed().as_secs_f64());
            }
            t.elapsed()
        })
    });
    group.finish();

    if times.len() < 5 {
        return None; // `cargo bench -- --test` (a smoke run, no figures) or filtered out
    }
    let s = median(times);
    // Before the probe and the second session add their own memory.
    let rss = status_mib("VmHWM");
    let mut probe = GemmProbe::new(rt);
    // The same step with its convolutions on ORT's NCHWc kernels (opt-in, not standard ONNX).
    let nchwc_block = hiercon::graph::nchwc::block_size();
    let mut sessions = vec![session];
    if nchwc_block.is_some() {
        let blocked = StepGraph { lowering: GradOptions { cpu_nchwc: true, ..grad }, ..step.clone() };
        sessions.push(TrainSession::new(&blocked, rt, None).unwrap());
    }
    let run = interleaved(case, &mut sessions, &images, &labels, &mut probe);
    let ours = median(run.ours[0].clone());
    let nchwc = run.ours.get(1).cloned().map(median);
    let gemm = median(run.gemm.clone());
    let torch_s = run.torch.clone().map(median);
    let gflops = |seconds: f64| step_flops / seconds / 1e9;
    Some(serde_json::json!({
        "bench": case.describe(),
        "arch": case.arch,
        "image_size": case.size,
        "images_per_step": 2 * N,
        "freeze": case.freeze,
        "trainable_params": trainable,
        "seconds_per_step": s,
        "images_per_s": (2 * N) as f64 / s,
        "peak_rss_mib": rss,
        "rss_at_start_mib": rss_at_start,
        "hwm_reset": hwm_reset,
        "step_gflop": step_flops / 1e9,
        "forward_gflop": forward_flops / 1e9,
        "interleaved": {
            "rounds": case.rounds,
            "block": case.block,
            "seconds_per_step": ours,
            "torch_seconds_per_step": torch_s,
            "gemm_gflops": gemm,
            "ours_steps": run.ours[0],
            "nchwc_seconds_per_step": nchwc,
            "nchwc_steps": run.ours.get(1),
            "torch_steps": run.torch,
            "gemm_probes": run.gemm,
        },
        "torch_seconds_per_step": torch_s,
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
    }))
}

const NOTE: &str = "Top-level figures: resnet-mini; `efficientnet_lite0`: the Lite0 case, same fields. \
    step_gflop counts each forward Conv/MatMul/Gemm once plus once per operand that depends on a trained \
    parameter (weight gradient, input gradient), so frozen units count their forward only; forward_gflop \
    is the forward alone. peak_rss_mib is VmHWM after criterion's run, reset (clear_refs) when the case \
    began (hwm_reset), so it includes rss_at_start_mib (the runtime, memory earlier cases freed but the \
    allocator kept); the cases run in order resnet-mini, then Lite0.";

fn bench(c: &mut Criterion) {
    hiercon::runtime::init().unwrap();
    let rt = RuntimeOptions::default();
    let resnet = bench_case(c, &RESNET_MINI, &rt);
    let lite = bench_case(c, &LITE0, &rt);
    if resnet.is_none() && lite.is_none() {
        return;
    }
    // resnet-mini's fields stay at the top level, as before this file had a second case.
    let mut result = serde_json::json!({
        "machine": hiercon::runtime::machine_description(),
        "note": NOTE,
    });
    let top = result.as_object_mut().unwrap();
    if let Some(serde_json::Value::Object(fields)) = resnet {
        top.extend(fields);
    }
    top.insert(LITE0.arch.name().replace('-', "_"), lite.unwrap_or(serde_json::Value::Null));
    let text = serde_json::to_string_pretty(&result).unwrap();
    std::fs::create_dir_all("bench/results").unwrap();
    std::fs::write("bench/results/train_step.json", &text).unwrap();
    println!("{text}");
}

criterion_group!(benches, bench);
criterion_main!(benches);
