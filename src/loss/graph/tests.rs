//! The loss graph against the plain-Rust f64 reference (`loss::reference`), run by ONNX Runtime
//! in f64 and in f32, on random features and label tables with repeated keys at every level,
//! with keys in an order that differs from the batch order, and with all-distinct keys.
//!
//! Tolerances, relative to `max(1, max |reference|)`: f64 graphs 1e-7 (loss, level losses,
//! gradients; not tighter because ONNX Runtime fuses `MatMul` then `Mul` by `1/T` into a
//! `FusedMatMul` whose `alpha` is an f32 attribute, so a `1/T` that f32 cannot hold exactly is
//! rounded); f32 graphs 1e-5 (the reference run on the same f32-rounded inputs). The `ce`
//! classifier's parameters are f32 in every graph, so their gradients get the f32 tolerance.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::graph::{Runner, grad};
use crate::loss::options::{Normalize, Penalty};
use crate::loss::reference::{self, ce_loss_and_grad, loss_and_grad};

const TOL_F64: f64 = 1e-7;
const TOL_F32: f64 = 1e-5;

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F64 { TOL_F64 } else { TOL_F32 }
}

/// `rows x d` features with L2-normalised rows, rounded through f32 so that the f32 and f64
/// graphs and the reference all see the same numbers.
fn unit_features(rng: &mut ChaCha8Rng, rows: usize, d: usize) -> Vec<f64> {
    let mut f: Vec<f64> = (0..rows * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    for row in f.chunks_mut(d) {
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        row.iter_mut().for_each(|v| *v = (*v / norm) as f32 as f64);
    }
    f
}

/// Whether every level `1..K` (first `K - l` columns) has a repeated key and two distinct keys.
fn every_level_repeats(labels: &[i64], n: usize, k: usize) -> bool {
    (1..k).all(|columns| {
        let mut keys: Vec<&[i64]> = labels.chunks(k).map(|r| &r[..columns]).collect();
        keys.sort();
        keys.dedup();
        keys.len() > 1 && keys.len() < n
    })
}

/// Nested ids (each column's id encodes its parent, as the catalogue's global dense ids do)
/// with two children per node, the last column the image id; redrawn until every level has a
/// repeated key.
fn nested_labels(rng: &mut ChaCha8Rng, n: usize, k: usize) -> Vec<i64> {
    loop {
        let mut labels = Vec::with_capacity(n * k);
        for i in 0..n {
            let mut id = 0i64;
            for _ in 0..k - 1 {
                id = id * 2 + rng.random_range(0..2i64);
                labels.push(id);
            }
            labels.push(i as i64);
        }
        if every_level_repeats(&labels, n, k) {
            return labels;
        }
    }
}

/// Each column drawn independently from a few values (not nested, the last one may repeat too),
/// so that sorted key order and batch order disagree and dedup's choice of representative
/// shows in the coarser losses.
fn scrambled_labels(rng: &mut ChaCha8Rng, n: usize, k: usize) -> Vec<i64> {
    loop {
        let labels: Vec<i64> = (0..n * k).map(|_| rng.random_range(0..3i64) * 7 - 5).collect();
        if every_level_repeats(&labels, n, k) {
            return labels;
        }
    }
}

/// Every key distinct at every level, in an order unrelated to the batch order.
fn distinct_labels(rng: &mut ChaCha8Rng, n: usize, k: usize) -> Vec<i64> {
    let mut ids: Vec<i64> = (0..n as i64).collect();
    ids.shuffle(rng);
    (0..n * k).map(|i| ids[i / k] * 10 + (i % k) as i64).collect()
}

/// What a graph run returned, as f64.
struct Run {
    loss: f64,
    levels: Vec<f64>,
    grad: Vec<f64>,
    ce_grads: Option<(Vec<f64>, Vec<f64>)>,
}

/// A loss graph with `d loss / d features` (and the CE parameters' gradients), in one session.
struct LossRunner {
    runner: Runner,
    dtype: DType,
    n: usize,
    k: usize,
    d: usize,
    levels: usize,
    ce: bool,
}

impl LossRunner {
    fn new(opts: &LossOptions, dtype: DType, n: usize, k: usize, d: usize, classes: Option<usize>) -> LossRunner {
        let mut g = Graph::new();
        let features = g.input("features", dtype, &[2 * n, d]).unwrap();
        let labels = g.input("labels", DType::I64, &[n, k]).unwrap();
        let parts = loss_graph(&mut g, features, labels, opts, classes).unwrap();
        assert!(parts.level_losses.iter().chain([&parts.loss]).all(|&v| g.shape(v).is_empty() && g.dtype(v) == dtype));
        let mut wrt = vec![features];
        let ce = opts.kind == LossKind::Ce;
        if ce {
            wrt.extend([g.find(CE_WEIGHT).unwrap(), g.find(CE_BIAS).unwrap()]);
        }
        let grads = grad(&mut g, parts.loss, &wrt).unwrap();
        g.output("loss", parts.loss).unwrap();
        for (i, &l) in parts.level_losses.iter().enumerate() {
            g.output(&format!("level{i}"), l).unwrap();
        }
        for (i, &gv) in grads.iter().enumerate() {
            g.output(&format!("grad{i}"), gv).unwrap();
        }
        let runner = Runner::cpu(&g).unwrap();
        LossRunner { runner, dtype, n, k, d, levels: parts.level_losses.len(), ce }
    }

    fn run(&mut self, features: &[f64], labels: &[i64], ce_params: Option<(&[f64], &[f64])>) -> Run {
        let f = Tensor::f64(&[2 * self.n, self.d], features.to_vec()).unwrap().cast(self.dtype);
        let l = Tensor::i64(&[self.n, self.k], labels.to_vec()).unwrap();
        let mut params = Vec::new();
        if let Some((w, b)) = ce_params {
            let c = b.len();
            params.push(Tensor::f64(&[self.d, c], w.to_vec()).unwrap().cast(DType::F32));
            params.push(Tensor::f64(&[c], b.to_vec()).unwrap().cast(DType::F32));
        }
        let mut feeds = vec![("features", &f), ("labels", &l)];
        for (name, t) in [CE_WEIGHT, CE_BIAS].into_iter().zip(&params) {
            feeds.push((name, t));
        }
        let out = self.runner.run(&feeds).unwrap();
        let get = |name: &str| out.get(name).unwrap().to_f64_vec();
        Run {
            loss: get("loss")[0],
            levels: (0..self.levels).map(|i| get(&format!("level{i}"))[0]).collect(),
            grad: get("grad0"),
            ce_grads: self.ce.then(|| (get("grad1"), get("grad2"))),
        }
    }
}

/// Asserts `|a - b| <= tol * max(1, max |b|)` elementwise.
fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(worst <= tol * scale, "{what}: max error {worst:e} > {tol:e} x {scale}\n graph {a:?}\n  ref {b:?}");
}

fn check_against_reference(what: &str, run: &Run, expect: &reference::LossValue, dtype: DType) {
    let t = tol(dtype);
    assert_close(&format!("{what}: loss"), &[run.loss], &[expect.total], t);
    assert_close(&format!("{what}: level losses"), &run.levels, &expect.level_losses, t);
    assert_close(&format!("{what}: d loss / d features"), &run.grad, &expect.grad, t);
}

/// The option sets every contrastive kind is tested with, for a label table of `k` columns.
fn option_sets(k: usize) -> Vec<LossOptions> {
    let base = LossOptions::default();
    let mut sets = Vec::new();
    for kind in [LossKind::Hmc, LossKind::Hce, LossKind::Hmce] {
        let o = LossOptions { kind, ..base.clone() };
        sets.push(o.clone());
        sets.push(LossOptions { penalty: Penalty::Pow2, ..o.clone() });
        sets.push(LossOptions { dedup: Dedup::None, ..o.clone() });
        sets.push(LossOptions { normalize: Normalize::Levels, ..o.clone() });
        sets.push(LossOptions { temperature: 0.5, base_temperature: 0.2, ..o.clone() });
        sets.push(LossOptions { supcon_mix: 0.7, supcon_level: Some(k.saturating_sub(1).max(1)), ..o.clone() });
    }
    let supcon = LossOptions { kind: LossKind::Supcon, ..base.clone() };
    if k >= 3 {
        sets.push(supcon.clone());
    }
    for level in [1, k] {
        sets.push(LossOptions { supcon_level: Some(level), ..supcon.clone() });
    }
    sets.push(LossOptions { supcon_level: Some(1), temperature: 0.3, ..supcon.clone() });
    let simclr = LossOptions { kind: LossKind::Simclr, ..base };
    sets.push(simclr.clone());
    sets.push(LossOptions { temperature: 0.2, base_temperature: 0.2, ..simclr });
    sets
}

#[test]
fn every_contrastive_kind_and_option_matches_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for (n, k, d) in [(6, 4, 5), (9, 3, 8), (5, 2, 3), (10, 5, 4)] {
        let tables = [nested_labels(&mut rng, n, k), scrambled_labels(&mut rng, n, k), distinct_labels(&mut rng, n, k)];
        let features: Vec<Vec<f64>> = (0..tables.len()).map(|_| unit_features(&mut rng, 2 * n, d)).collect();
        for opts in option_sets(k) {
            let expected: Vec<_> =
                tables.iter().zip(&features).map(|(l, f)| loss_and_grad(f, l, n, d, k, &opts).unwrap()).collect();
            for dtype in [DType::F64, DType::F32] {
                let mut runner = LossRunner::new(&opts, dtype, n, k, d, None);
                for (t, (labels, f)) in tables.iter().zip(&features).enumerate() {
                    let run = runner.run(f, labels, None);
                    let what = format!("{opts:?} {dtype} N={n} K={k} D={d} table {t}");
                    check_against_reference(&what, &run, &expected[t], dtype);
                }
            }
        }
    }
}

#[test]
fn dedup_changes_the_loss_and_the_graph_follows_both_modes() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (n, k, d) = (8, 4, 6);
    let mut matched = 0;
    for attempt in 0..50 {
        let labels = if attempt % 2 == 0 { scrambled_labels(&mut rng, n, k) } else { nested_labels(&mut rng, n, k) };
        let features = unit_features(&mut rng, 2 * n, d);
        let official = LossOptions { kind: LossKind::Hmc, ..LossOptions::default() };
        let none = LossOptions { dedup: Dedup::None, ..official.clone() };
        let (a, b) = (
            loss_and_grad(&features, &labels, n, d, k, &official).unwrap(),
            loss_and_grad(&features, &labels, n, d, k, &none).unwrap(),
        );
        // Only tables where dedup drops samples at two levels and the loss moves.
        if (a.total - b.total).abs() < 1e-3 || a.level_samples[2].len() == n {
            continue;
        }
        // Keeping another representative of the level-1 groups (the last in batch order, not
        // the first) would change the level-2 loss: the representative choice is observable.
        let last_kept: Vec<usize> = {
            let mut keep: Vec<usize> = Vec::new();
            for s in (0..n).rev() {
                if !keep.iter().any(|&t| labels[t * k..t * k + k - 1] == labels[s * k..s * k + k - 1]) {
                    keep.push(s);
                }
            }
            keep
        };
        let other =
            reference::level_loss_and_grad(&features, &labels, n, d, k, k - 2, &last_kept, &official).unwrap().0;
        if (other - a.level_losses[1]).abs() < 1e-3 {
            continue;
        }
        for (opts, expected) in [(&official, &a), (&none, &b)] {
            for dtype in [DType::F64, DType::F32] {
                let run = LossRunner::new(opts, dtype, n, k, d, None).run(&features, &labels, None);
                check_against_reference(&format!("{:?} {dtype}", opts.dedup), &run, expected, dtype);
            }
        }
        matched += 1;
        if matched == 3 {
            return;
        }
    }
    panic!("found only {matched} label tables where dedup and the kept representative matter");
}

/// `n x k` table for the CE baseline: column `ce_columns - 1` holds class ids `0..c`.
fn ce_labels(rng: &mut ChaCha8Rng, n: usize, k: usize, c: usize) -> Vec<i64> {
    (0..n * k).map(|_| rng.random_range(0..c as i64)).collect()
}

#[test]
fn cross_entropy_matches_the_reference_with_fed_and_initial_parameters() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (n, k, d, c, ce_level) in [(6, 4, 5, 3, None), (7, 3, 4, 5, Some(1)), (4, 2, 3, 2, Some(2))] {
        let opts = LossOptions { kind: LossKind::Ce, ce_level, ..LossOptions::default() };
        let column = opts.ce_columns(k).unwrap() - 1;
        let labels = ce_labels(&mut rng, n, k, c);
        let targets: Vec<i64> = (0..n).map(|i| labels[i * k + column]).collect();
        let features = unit_features(&mut rng, 2 * n, d);
        let fed: (Vec<f64>, Vec<f64>) = (
            (0..d * c).map(|_| rng.random_range(-1.0..1.0f32) as f64).collect(),
            (0..c).map(|_| rng.random_range(-1.0..1.0f32) as f64).collect(),
        );
        let (w0, b0) = ce_init(d, c);
        let initial: (Vec<f64>, Vec<f64>) =
            (w0.iter().map(|&x| x as f64).collect(), b0.iter().map(|&x| x as f64).collect());
        for dtype in [DType::F64, DType::F32] {
            let mut runner = LossRunner::new(&opts, dtype, n, k, d, Some(c));
            for (params, feed) in [(&fed, true), (&initial, false)] {
                // The reference takes the weight as [C, D].
                let w_cd: Vec<f64> = (0..c * d).map(|i| params.0[(i % d) * c + i / d]).collect();
                let expect = ce_loss_and_grad(&features, &w_cd, &params.1, &targets, n, d, c).unwrap();
                let run = runner.run(&features, &labels, feed.then_some((&params.0[..], &params.1[..])));
                let what = format!("ce N={n} K={k} C={c} {dtype} fed={feed}");
                let t = tol(dtype);
                assert_close(&format!("{what}: loss"), &[run.loss], &[expect.loss], t);
                assert_close(&format!("{what}: level loss"), &run.levels, &[expect.loss], t);
                assert_close(&format!("{what}: d/d features"), &run.grad, &expect.grad_features, t);
                let (gw, gb) = run.ce_grads.unwrap();
                let gw_cd: Vec<f64> = (0..c * d).map(|i| gw[(i % d) * c + i / d]).collect();
                assert_close(&format!("{what}: d/d weight"), &gw_cd, &expect.grad_weights, TOL_F32);
                assert_close(&format!("{what}: d/d bias"), &gb, &expect.grad_bias, TOL_F32);
            }
        }
    }
}

#[test]
fn ce_init_is_deterministic_and_in_range() {
    let (w, b) = ce_init(16, 5);
    assert_eq!((w.len(), b.len()), (80, 5));
    assert_eq!(ce_init(16, 5), (w.clone(), b.clone()));
    assert!(w.iter().all(|x| x.abs() < 0.25) && b.iter().all(|&x| x == 0.0));
    assert!(w.iter().any(|&x| x > 0.1) && w.iter().any(|&x| x < -0.1), "spread over the range: {w:?}");
}

#[test]
fn bad_shapes_and_options_are_errors() {
    let build = |n: usize, k: usize, rows: usize, opts: &LossOptions, classes: Option<usize>| {
        let mut g = Graph::new();
        let f = g.input("features", DType::F32, &[rows, 4]).unwrap();
        let l = g.input("labels", DType::I64, &[n, k]).unwrap();
        loss_graph(&mut g, f, l, opts, classes)
    };
    let hmce = LossOptions::default();
    assert!(matches!(build(3, 1, 6, &hmce, None), Err(Error::LossTooFewColumns { loss: "hmce", k: 1 })));
    assert!(matches!(build(0, 3, 0, &hmce, None), Err(Error::LossEmptyBatch { n: 0, .. })));
    assert!(matches!(build(3, 3, 5, &hmce, None), Err(Error::LossGraphInput { what: "features", .. })));
    let ce = LossOptions { kind: LossKind::Ce, ..LossOptions::default() };
    assert!(matches!(build(3, 3, 6, &ce, None), Err(Error::LossMissingClasses)));
    assert!(matches!(build(3, 3, 6, &ce, Some(0)), Err(Error::LossMissingClasses)));
    let supcon = LossOptions { kind: LossKind::Supcon, supcon_level: Some(4), ..LossOptions::default() };
    assert!(matches!(build(3, 3, 6, &supcon, None), Err(Error::LossConfig { .. })));
    let cold = LossOptions { temperature: 0.0, ..LossOptions::default() };
    assert!(matches!(build(3, 3, 6, &cold, None), Err(Error::LossConfig { .. })));
    // Labels must be i64.
    let mut g = Graph::new();
    let f = g.input("features", DType::F32, &[6, 4]).unwrap();
    let l = g.input("labels", DType::F32, &[3, 3]).unwrap();
    assert!(matches!(loss_graph(&mut g, f, l, &hmce, None), Err(Error::LossGraphInput { what: "labels", .. })));
}

#[test]
fn the_supcon_mix_adds_the_weighted_supcon_loss_to_the_hierarchical_one() {
    // The reference's mixed loss is the sum of its two separate losses, value and gradient; the
    // graph follows it (every_contrastive_kind_and_option_matches_the_reference).
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (n, k, d) = (8, 4, 5);
    let labels = nested_labels(&mut rng, n, k);
    let f = unit_features(&mut rng, 2 * n, d);
    let hmce = LossOptions::default();
    let mixed = LossOptions { supcon_mix: 0.5, ..hmce.clone() };
    let supcon = LossOptions { kind: LossKind::Supcon, ..hmce.clone() };
    let (a, b, m) = (
        loss_and_grad(&f, &labels, n, d, k, &hmce).unwrap(),
        loss_and_grad(&f, &labels, n, d, k, &supcon).unwrap(),
        loss_and_grad(&f, &labels, n, d, k, &mixed).unwrap(),
    );
    assert!((m.total - (a.total + 0.5 * b.total)).abs() < 1e-12);
    assert_eq!(m.level_losses, a.level_losses, "the level losses stay the hierarchical ones");
    for ((x, y), z) in m.grad.iter().zip(&a.grad).zip(&b.grad) {
        assert!((x - (y + 0.5 * z)).abs() < 1e-12);
    }
    let bad = LossOptions { kind: LossKind::Supcon, supcon_mix: 0.5, ..hmce.clone() };
    assert!(bad.validate().is_err());
    assert!(LossOptions { supcon_mix: -1.0, ..hmce }.validate().is_err());
}
