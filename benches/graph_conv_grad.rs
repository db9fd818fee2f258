//! Conv weight-gradient lowerings (`Transposed`, `Im2col`, `Shifted`) on ResNet-like layers, run through
//! ONNX Runtime on CPU with one thread: the measurements behind `conv_weight_rule`.
//!
//! `cargo bench --bench graph_conv_grad` (or `make bench`). Each benchmark runs the backward of
//! `sum(conv(x, w) ⊙ gy)` w.r.t. `w` only, so the graph is just the weight gradient.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hiercon::graph::{Conv2d, ConvWeightGrad, DType, Graph, Runner, Tensor, grad};
use hiercon::runtime::RuntimeOptions;
use rand::{Rng, SeedableRng};

const BATCH: usize = 32;

/// (input channels, input size, output channels, kernel, stride, pad, groups)
const LAYERS: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
    (3, 64, 64, 7, 2, 3, 1),
    (3, 32, 64, 3, 1, 1, 1),
    (64, 32, 64, 3, 1, 1, 1),
    (64, 32, 64, 5, 1, 2, 1),
    (64, 32, 64, 7, 2, 3, 1),
    (64, 32, 128, 3, 2, 1, 1),
    (128, 16, 256, 3, 2, 1, 1),
    (256, 8, 256, 3, 1, 1, 1),
    (512, 4, 512, 3, 1, 1, 1),
    (256, 4, 512, 3, 1, 1, 64),
    (64, 32, 128, 1, 2, 0, 1),
    (64, 32, 64, 3, 1, 1, 64),
];

fn random(rng: &mut rand_chacha::ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::f32(shape, (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()).expect("sizes match")
}

fn conv_weight_grad(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv_weight_grad");
    group.sample_size(10);
    for &(cin, h, m, k, stride, pad, groups) in LAYERS {
        let layer = format!("{cin}x{h}x{h}->{m} k{k} s{stride} g{groups}");
        let shifted = (stride == 1 && groups == 1).then_some(ConvWeightGrad::Shifted);
        for lowering in [ConvWeightGrad::Transposed, ConvWeightGrad::Im2col].into_iter().chain(shifted) {
            let mut g = Graph::new();
            let x = g.input("x", DType::F32, &[BATCH, cin, h, h]).unwrap();
            let w = g.param("w", &[m, cin / groups, k, k], vec![0.01; m * (cin / groups) * k * k]).unwrap();
            let y = g
                .conv(x, w, None, Conv2d { stride, pad, groups, weight_grad: lowering, ..Default::default() })
                .unwrap();
            let ys = g.shape(y).to_vec();
            let gy = g.input("gy", DType::F32, &ys).unwrap();
            let prod = g.mul(y, gy).unwrap();
            let loss = g.sum_all(prod).unwrap();
            let gw = grad(&mut g, loss, &[w]).unwrap()[0];
            g.output("gw", gw).unwrap();
            let mut run = Runner::new(&g, &RuntimeOptions { threads: 1, ..Default::default() }).unwrap();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
            let xv = random(&mut rng, &[BATCH, cin, h, h]);
            let gv = random(&mut rng, &ys);
            group.bench_function(BenchmarkId::new(format!("{lowering:?}"), &layer), |b| {
                b.iter(|| run.run(&[("x", &xv), ("gy", &gv)]).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, conv_weight_grad);
criterion_main!(benches);
