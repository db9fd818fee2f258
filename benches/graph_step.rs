//! One full training step (forward, loss, backward, SGD update) of a small conv net, compiled by
//! `hiercon::graph` and run by ONNX Runtime on CPU: the figure to compare with a PyTorch step.
//!
//! Net: 4 x (conv 3x3, BatchNorm (training), ReLU), 64 channels, the last three with stride 2,
//! on 64x64 RGB, batch 64 (the prototype of DESIGN.md §1); global average pool, linear 64 -> 128,
//! loss `mean(feat²)`. `HIERCON_BENCH_DUMP=<dir>` also writes the step graph there as ONNX.

use criterion::{Criterion, criterion_group, criterion_main};
use hiercon::graph::{BatchNorm, Conv2d, DType, GradOptions, Graph, Optimizer, Runner, Sgd, Tensor, train_step};
use hiercon::runtime::RuntimeOptions;
use rand::{Rng, SeedableRng};

const BATCH: usize = 64;
const SIZE: usize = 64;
const WIDTH: usize = 64;

fn step_graph() -> Graph {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut init = |n: usize, fan_in: usize| -> Vec<f32> {
        let s = (2.0 / fan_in as f32).sqrt();
        (0..n).map(|_| rng.random_range(-s..s)).collect()
    };
    let mut g = Graph::new();
    let mut x = g.input("images", DType::F32, &[BATCH, 3, SIZE, SIZE]).unwrap();
    let mut cin = 3;
    for layer in 0..4 {
        let w = g.param(&format!("conv{layer}.w"), &[WIDTH, cin, 3, 3], init(WIDTH * cin * 9, cin * 9)).unwrap();
        let gamma = g.param(&format!("bn{layer}.gamma"), &[WIDTH], vec![1.0; WIDTH]).unwrap();
        let beta = g.param(&format!("bn{layer}.beta"), &[WIDTH], vec![0.0; WIDTH]).unwrap();
        let rm = g.buffer(&format!("bn{layer}.mean"), &[WIDTH], vec![0.0; WIDTH]).unwrap();
        let rv = g.buffer(&format!("bn{layer}.var"), &[WIDTH], vec![1.0; WIDTH]).unwrap();
        let stride = if layer == 0 { 1 } else { 2 };
        let y = g.conv(x, w, None, Conv2d { stride, pad: 1, ..Default::default() }).unwrap();
        let bn = g.batch_norm_train(y, gamma, beta, rm, rv, BatchNorm::default()).unwrap();
        g.feed_back(rm, bn.running_mean).unwrap();
        g.feed_back(rv, bn.running_var).unwrap();
        x = g.relu(bn.y).unwrap();
        cin = WIDTH;
    }
    let pooled = g.global_avg_pool(x).unwrap();
    let feat = g.flatten(pooled, 1).unwrap();
    let lw = g.param("head.w", &[128, WIDTH], init(128 * WIDTH, WIDTH)).unwrap();
    let z = g.linear(feat, lw, None).unwrap();
    let sq = g.mul(z, z).unwrap();
    let loss = g.mean_all(sq).unwrap();
    train_step(
        &mut g,
        loss,
        &Optimizer::Sgd(Sgd { momentum: 0.9, weight_decay: 1e-4, nesterov: false }),
        &GradOptions::default(),
    )
    .unwrap();
    g.output("loss", loss).unwrap();
    g
}

fn train_step_bench(c: &mut Criterion) {
    let g = step_graph();
    if let Some(dir) = std::env::var_os("HIERCON_BENCH_DUMP") {
        g.write_onnx(&std::path::Path::new(&dir).join("graph_step.onnx"), "step").unwrap();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let n = BATCH * 3 * SIZE * SIZE;
    let images = Tensor::f32(&[BATCH, 3, SIZE, SIZE], (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()).unwrap();
    let lr = Tensor::F32(ndarray::arr0(0.01f32).into_dyn());
    let mut run = Runner::new(&g, &RuntimeOptions::default()).unwrap();
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    group.bench_function("conv4x64_64px_batch64_sgd", |b| {
        b.iter(|| run.run(&[("images", &images), ("lr", &lr)]).unwrap())
    });
    group.finish();
}

criterion_group!(benches, train_step_bench);
criterion_main!(benches);
