//! Plain-Rust f64 reference of the losses (DESIGN §2): values and exact gradients, written for
//! clarity, against which the ONNX graph version is tested.
//!
//! Layout: `features` is `2N x D` row-major, rows `i` and `i + N` being the two views of sample
//! `i`; `labels` is `N x K` row-major, columns coarse -> fine, the last one the image id.
//! Features are used as given (the encoder normalises them; the loss does not).
//!
//! Choices where DESIGN §2 leaves room, made here once for both implementations:
//! - Gradient through `max(L_l, M_{l-1})` flows entirely to the larger argument; on an exact tie
//!   it flows to `L_l` (the level's own loss). `M_l = max(M_{l-1}, L'_l)` equals `L'_l` for
//!   `hce`/`hmce`, so it carries the gradient route of `L'_l`.
//! - `supcon` is the plain SupCon value at one level (`supcon_level` leading columns, all
//!   samples): no penalty and no division by K, so that it equals the loss of the SupCon paper
//!   and of the published `SupConLoss` at that level.
//! - `simclr` takes the positive by batch position (the anchor's other view), not by label:
//!   labels are checked for shape but not read.

use super::options::{Dedup, LossKind, LossOptions};
use crate::{Error, Result};

/// A loss value with its gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct LossValue {
    /// The loss that is minimised.
    pub total: f64,
    /// `L_l` for each level as computed (before any `max` with coarser levels), finest first.
    /// One entry for `supcon` and `simclr`.
    pub level_losses: Vec<f64>,
    /// `d total / d features`, `2N x D` row-major.
    pub grad: Vec<f64>,
    /// For each level (finest first), the samples it compared, in the order the level saw them.
    /// With `--dedup official` this shows which sample represented each group.
    pub level_samples: Vec<Vec<usize>>,
}

/// The value and gradients of the softmax cross-entropy baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct CeValue {
    /// Mean cross-entropy over the `2N` rows.
    pub loss: f64,
    /// `d loss / d features`, `2N x D`.
    pub grad_features: Vec<f64>,
    /// `d loss / d weights`, `C x D`.
    pub grad_weights: Vec<f64>,
    /// `d loss / d bias`, `C`.
    pub grad_bias: Vec<f64>,
}

/// The contrastive losses (`hmc`, `hce`, `hmce`, `supcon`, `simclr`) and their gradient.
///
/// `ce` has its own parameters; call [`ce_loss_and_grad`] for it.
pub fn loss_and_grad(
    features: &[f64],
    labels: &[i64],
    n: usize,
    d: usize,
    k: usize,
    opts: &LossOptions,
) -> Result<LossValue> {
    opts.validate()?;
    check_len("features", features.len(), 2 * n * d)?;
    check_len("labels", labels.len(), n * k)?;
    if n == 0 || d == 0 || k == 0 {
        return Err(opts.config_error(format!("empty input: N = {n}, D = {d}, K = {k}")));
    }
    let all: Vec<usize> = (0..n).collect();
    let batch = Batch { features, labels, n, d, k };
    match opts.kind {
        LossKind::Hmc | LossKind::Hce | LossKind::Hmce => {
            let mut v = hierarchical(&batch, opts)?;
            if opts.supcon_mix != 0.0 {
                let columns = opts.supcon_columns(k)?;
                let (value, grad) = level_loss(&batch, &all, |a, b| batch.same_prefix(a, b, columns), opts);
                v.total += opts.supcon_mix * value;
                for (g, s) in v.grad.iter_mut().zip(&grad) {
                    *g += opts.supcon_mix * s;
                }
            }
            Ok(v)
        }
        LossKind::Supcon => {
            let columns = opts.supcon_columns(k)?;
            let (value, grad) = level_loss(&batch, &all, |a, b| batch.same_prefix(a, b, columns), opts);
            Ok(LossValue { total: value, level_losses: vec![value], grad, level_samples: vec![all] })
        }
        LossKind::Simclr => {
            let (value, grad) = level_loss(&batch, &all, |a, b| a == b, opts);
            Ok(LossValue { total: value, level_losses: vec![value], grad, level_samples: vec![all] })
        }
        LossKind::Ce => {
            Err(opts.config_error("cross-entropy needs a classifier's weights: use `ce_loss_and_grad`".to_string()))
        }
    }
}

/// The samples level `l + 1` works on under official dedup, given those level `l` worked on:
/// `current` stable-sorted by its first `columns` label columns (lexicographic, as integers),
/// keeping the first sample of each distinct key, in that sorted order. This is what the
/// published code's `unique(dim=0)` helper returns: sorted unique rows, each with the index of
/// its first occurrence in the current order.
pub fn dedup_keep(labels: &[i64], k: usize, current: &[usize], columns: usize) -> Vec<usize> {
    let key = |s: usize| &labels[s * k..s * k + columns];
    let mut sorted = current.to_vec();
    sorted.sort_by(|&a, &b| key(a).cmp(key(b))); // `sort_by` is stable
    let mut kept: Vec<usize> = Vec::new();
    for s in sorted {
        if kept.last().is_none_or(|&last| key(last) != key(s)) {
            kept.push(s);
        }
    }
    kept
}

/// One level's SupCon loss (DESIGN §2) over the given samples and both their views, with
/// `samples` sharing a class when their first `columns` label columns are equal. The gradient
/// is over the whole `2N x D` feature matrix (zero for rows not compared).
#[allow(clippy::too_many_arguments)]
pub fn level_loss_and_grad(
    features: &[f64],
    labels: &[i64],
    n: usize,
    d: usize,
    k: usize,
    columns: usize,
    samples: &[usize],
    opts: &LossOptions,
) -> Result<(f64, Vec<f64>)> {
    opts.validate()?;
    check_len("features", features.len(), 2 * n * d)?;
    check_len("labels", labels.len(), n * k)?;
    if columns == 0 || columns > k {
        return Err(opts.config_error(format!("compared columns {columns} must be in 1..={k}")));
    }
    if samples.is_empty() || samples.iter().any(|&s| s >= n) {
        return Err(opts.config_error(format!("samples must be non-empty indices below N = {n}")));
    }
    let batch = Batch { features, labels, n, d, k };
    Ok(level_loss(&batch, samples, |a, b| batch.same_prefix(a, b, columns), opts))
}

/// Softmax cross-entropy through a linear classifier: `logits_r = W z_r + b` for each of the
/// `2N` rows, both views of sample `i` having class `targets[i]` (in `0..C`); mean over rows.
pub fn ce_loss_and_grad(
    features: &[f64],
    weights: &[f64],
    bias: &[f64],
    targets: &[i64],
    n: usize,
    d: usize,
    c: usize,
) -> Result<CeValue> {
    check_len("features", features.len(), 2 * n * d)?;
    check_len("weights", weights.len(), c * d)?;
    check_len("bias", bias.len(), c)?;
    check_len("targets", targets.len(), n)?;
    if n == 0 || c == 0 {
        return Err(Error::LossConfig { loss: "ce", reason: format!("empty input: N = {n}, C = {c}") });
    }
    if let Some(bad) = targets.iter().find(|&&t| t < 0 || t as usize >= c) {
        return Err(Error::LossConfig { loss: "ce", reason: format!("target {bad} is not a class in 0..{c}") });
    }
    let rows = 2 * n;
    let mut out = CeValue {
        loss: 0.0,
        grad_features: vec![0.0; rows * d],
        grad_weights: vec![0.0; c * d],
        grad_bias: vec![0.0; c],
    };
    for r in 0..rows {
        let z = &features[r * d..(r + 1) * d];
        let target = targets[r % n] as usize;
        let logits: Vec<f64> = (0..c).map(|j| dot(&weights[j * d..(j + 1) * d], z) + bias[j]).collect();
        let lse = log_sum_exp(&logits);
        out.loss += (lse - logits[target]) / rows as f64;
        for j in 0..c {
            // d loss_r / d logit_j = softmax_j - [j == target], each row weighing 1 / rows.
            let g = ((logits[j] - lse).exp() - if j == target { 1.0 } else { 0.0 }) / rows as f64;
            out.grad_bias[j] += g;
            for e in 0..d {
                out.grad_weights[j * d + e] += g * z[e];
                out.grad_features[r * d + e] += g * weights[j * d + e];
            }
        }
    }
    Ok(out)
}

/// Borrowed inputs of one loss evaluation.
struct Batch<'a> {
    features: &'a [f64],
    labels: &'a [i64],
    n: usize,
    d: usize,
    k: usize,
}

impl Batch<'_> {
    fn row(&self, r: usize) -> &[f64] {
        &self.features[r * self.d..(r + 1) * self.d]
    }

    fn same_prefix(&self, a: usize, b: usize, columns: usize) -> bool {
        self.labels[a * self.k..a * self.k + columns] == self.labels[b * self.k..b * self.k + columns]
    }
}

/// `hmc`, `hce`, `hmce`: levels l = 1..K-1, finest first, combined as DESIGN §2 says.
fn hierarchical(batch: &Batch, opts: &LossOptions) -> Result<LossValue> {
    let k = batch.k;
    if k < 2 {
        return Err(opts.config_error(format!("hierarchical losses need K >= 2 label columns, got {k}")));
    }
    let mut samples: Vec<usize> = (0..batch.n).collect();
    let mut level_losses = Vec::with_capacity(k - 1);
    let mut level_grads = Vec::with_capacity(k - 1);
    let mut level_samples = Vec::with_capacity(k - 1);
    for level in 1..k {
        let columns = k - level;
        let (value, grad) = level_loss(batch, &samples, |a, b| batch.same_prefix(a, b, columns), opts);
        level_losses.push(value);
        level_grads.push(grad);
        let next = match opts.dedup {
            Dedup::Official => dedup_keep(batch.labels, k, &samples, columns),
            Dedup::None => samples.clone(),
        };
        level_samples.push(std::mem::replace(&mut samples, next));
    }

    // d total / d L_l, before the division.
    let mut weight_of_level = vec![0.0; k - 1];
    let mut total = 0.0;
    match opts.kind {
        LossKind::Hmc => {
            for (i, &value) in level_losses.iter().enumerate() {
                let lambda = opts.penalty.lambda(i + 1);
                total += lambda * value;
                weight_of_level[i] += lambda;
            }
        }
        LossKind::Hce | LossKind::Hmce => {
            // `max_so_far` = M_{l-1} and the level whose L it equals (M_0 = -inf, no level).
            let mut max_so_far = f64::NEG_INFINITY;
            let mut max_source: Option<usize> = None;
            for (i, &value) in level_losses.iter().enumerate() {
                // L'_l = max(L_l, M_{l-1}); a tie goes to L_l.
                let (constrained, source) = match max_source {
                    Some(source) if max_so_far > value => (max_so_far, source),
                    _ => (value, i),
                };
                let lambda = if opts.kind == LossKind::Hmce { opts.penalty.lambda(i + 1) } else { 1.0 };
                total += lambda * constrained;
                weight_of_level[source] += lambda;
                // M_l = max(M_{l-1}, L'_l) = L'_l, since L'_l >= M_{l-1}.
                max_so_far = constrained;
                max_source = Some(source);
            }
        }
        _ => unreachable!("hierarchical() is called for hmc, hce and hmce only"),
    }

    let divisor = opts.divisor(k);
    let mut grad = vec![0.0; batch.features.len()];
    for (level_grad, weight) in level_grads.iter().zip(&weight_of_level) {
        if *weight != 0.0 {
            for (g, lg) in grad.iter_mut().zip(level_grad) {
                *g += weight / divisor * lg;
            }
        }
    }
    Ok(LossValue { total: total / divisor, level_losses, grad, level_samples })
}

/// SupCon ("all" contrast mode) over the views of `samples`:
/// `mean_a [ -(T/T0) * mean_{p in P(a)} ( z_a.z_p/T - log sum_{b in A(a)} exp(z_a.z_b/T) ) ]`,
/// where `a`, `b`, `p` run over both views of each sample, `A(a)` is every view but `a` and
/// `P(a)` those of `A(a)` whose sample `same_class`es with `a`'s (the anchor's own other view
/// must always be one: `same_class(s, s)` is true).
///
/// Gradient: with `s_ab = z_a.z_b / T` and `sm_ab` the softmax of `s_a.` over `A(a)`,
/// `d l_a / d s_ab = -(T/T0) * ([b in P(a)] / |P(a)| - sm_ab)`, and `s_ab` moves `z_a` by
/// `z_b / T` and `z_b` by `z_a / T`.
fn level_loss(
    batch: &Batch,
    samples: &[usize],
    same_class: impl Fn(usize, usize) -> bool,
    opts: &LossOptions,
) -> (f64, Vec<f64>) {
    let (t, t0) = (opts.temperature, opts.base_temperature);
    let n = batch.n;
    // Feature rows of the compared views: first views, then second views.
    let views: Vec<usize> = samples.iter().copied().chain(samples.iter().map(|&s| s + n)).collect();
    let anchors = views.len() as f64;
    let mut loss = 0.0;
    let mut grad = vec![0.0; batch.features.len()];
    for &a in &views {
        let others: Vec<usize> = views.iter().copied().filter(|&b| b != a).collect();
        let logits: Vec<f64> = others.iter().map(|&b| dot(batch.row(a), batch.row(b)) / t).collect();
        let positive: Vec<bool> = others.iter().map(|&b| same_class(a % n, b % n)).collect();
        let positives = positive.iter().filter(|&&p| p).count() as f64;
        debug_assert!(positives >= 1.0, "the anchor's other view is always a positive");
        let lse = log_sum_exp(&logits);
        let mean_positive_logit =
            logits.iter().zip(&positive).filter(|(_, p)| **p).map(|(s, _)| s).sum::<f64>() / positives;
        loss += -(t / t0) * (mean_positive_logit - lse) / anchors;

        for (j, &b) in others.iter().enumerate() {
            let indicator = if positive[j] { 1.0 / positives } else { 0.0 };
            let softmax = (logits[j] - lse).exp();
            let g = -(t / t0) * (indicator - softmax) / anchors; // d L / d s_ab
            for e in 0..batch.d {
                grad[a * batch.d + e] += g * batch.features[b * batch.d + e] / t;
                grad[b * batch.d + e] += g * batch.features[a * batch.d + e] / t;
            }
        }
    }
    (loss, grad)
}

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// `log sum exp(x)` with the maximum subtracted first.
fn log_sum_exp(x: &[f64]) -> f64 {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + x.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

fn check_len(what: &'static str, found: usize, expected: usize) -> Result<()> {
    if found == expected { Ok(()) } else { Err(Error::LossShape { what, expected, found }) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::options::{Normalize, Penalty};
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const T: f64 = 0.1;
    const T0: f64 = 0.07;

    fn opts(kind: LossKind) -> LossOptions {
        LossOptions { kind, ..LossOptions::default() }
    }

    /// `rows x d` features with L2-normalised rows.
    fn unit_features(rng: &mut ChaCha8Rng, rows: usize, d: usize) -> Vec<f64> {
        let mut f: Vec<f64> = (0..rows * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        for row in f.chunks_mut(d) {
            let norm = dot(row, row).sqrt();
            row.iter_mut().for_each(|v| *v /= norm);
        }
        f
    }

    /// `n x 4` labels `[category, product, variation, image]` with globally unique ids per
    /// level, redrawn until every level has both a repeated key and two distinct keys, so that
    /// each level has positives beyond the other view and negatives.
    fn hierarchical_labels(rng: &mut ChaCha8Rng, n: usize) -> Vec<i64> {
        loop {
            let mut labels = Vec::with_capacity(n * 4);
            for i in 0..n {
                let category = rng.random_range(0..2i64);
                let product = category * 10 + rng.random_range(0..2i64);
                let variation = product * 10 + rng.random_range(0..2i64);
                labels.extend([category, product, variation, i as i64]);
            }
            let real = (1..=3).all(|columns| {
                let mut keys: Vec<&[i64]> = labels.chunks(4).map(|r| &r[..columns]).collect();
                keys.sort();
                keys.dedup();
                keys.len() > 1 && keys.len() < n
            });
            if real {
                return labels;
            }
        }
    }

    /// Central differences of `f` at `x`, step `h`.
    fn central_differences(x: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        let mut probe = x.to_vec();
        (0..x.len())
            .map(|i| {
                probe[i] = x[i] + h;
                let up = f(&probe);
                probe[i] = x[i] - h;
                let down = f(&probe);
                probe[i] = x[i];
                (up - down) / (2.0 * h)
            })
            .collect()
    }

    /// Asserts `|a - b| <= tol * max(1, max|b|)` elementwise, returning the largest error.
    fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) -> f64 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(worst <= tol * scale, "{what}: max error {worst:e} > {tol:e} * {scale}");
        worst
    }

    /// Checks the analytic gradient against central differences (h = 1e-5, tolerance 1e-6
    /// relative to the largest gradient entry, floor 1).
    fn check_gradient(opts: &LossOptions, features: &[f64], labels: &[i64], n: usize, d: usize, k: usize) {
        let value = loss_and_grad(features, labels, n, d, k, opts).unwrap();
        let numeric = central_differences(features, 1e-5, |f| loss_and_grad(f, labels, n, d, k, opts).unwrap().total);
        assert!(value.grad.iter().any(|g| g.abs() > 1e-3), "{opts:?}: gradient is trivially zero");
        assert_close(&format!("{opts:?}"), &value.grad, &numeric, 1e-6);
    }

    #[test]
    fn gradients_match_finite_differences_for_every_option() {
        let (n, d, k) = (6, 4, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for kind in [LossKind::Hmc, LossKind::Hce, LossKind::Hmce] {
            for penalty in [Penalty::Exp, Penalty::Pow2] {
                for dedup in [Dedup::Official, Dedup::None] {
                    for normalize in [Normalize::Columns, Normalize::Levels] {
                        let labels = hierarchical_labels(&mut rng, n);
                        let features = unit_features(&mut rng, 2 * n, d);
                        let o = LossOptions { kind, penalty, dedup, normalize, ..LossOptions::default() };
                        check_gradient(&o, &features, &labels, n, d, k);
                    }
                }
            }
        }
        for kind in [LossKind::Supcon, LossKind::Simclr] {
            for supcon_level in [None, Some(1), Some(3), Some(4)] {
                let labels = hierarchical_labels(&mut rng, n);
                let features = unit_features(&mut rng, 2 * n, d);
                check_gradient(&LossOptions { kind, supcon_level, ..opts(kind) }, &features, &labels, n, d, k);
            }
        }
        // Other temperatures too: the T/T0 factor and the 1/T inside must both be right.
        let labels = hierarchical_labels(&mut rng, n);
        let features = unit_features(&mut rng, 2 * n, d);
        let o = LossOptions { temperature: 0.5, base_temperature: 0.3, ..opts(LossKind::Hmce) };
        check_gradient(&o, &features, &labels, n, d, k);
    }

    #[test]
    fn two_samples_match_the_closed_form() {
        // z0 = z2 = e1 and z1 = z3 = (c, s): every anchor sees its other view at logit 1/T and
        // the other sample's two views at c/T.
        let angle: f64 = 0.7;
        let (c, s) = (angle.cos(), angle.sin());
        let features = [1.0, 0.0, c, s, 1.0, 0.0, c, s];
        // Different classes: the other view is the only positive, so
        // l = -(T/T0) (1/T - ln(e^{1/T} + 2 e^{c/T})) = (T/T0) ln(1 + 2 e^{(c-1)/T}).
        let apart = (T / T0) * (2.0 * ((c - 1.0) / T).exp()).ln_1p();
        // Same class: all three others are positives.
        let together = -(T / T0) * ((1.0 + 2.0 * c) / (3.0 * T) - ((1.0 / T).exp() + 2.0 * (c / T).exp()).ln());
        for (labels, expected) in [([0i64, 0, 1, 1], apart), ([0i64, 0, 0, 1], together)] {
            for (kind, weight) in [(LossKind::Hmc, 1f64.exp()), (LossKind::Hce, 1.0), (LossKind::Hmce, 1f64.exp())] {
                let v = loss_and_grad(&features, &labels, 2, 2, 2, &opts(kind)).unwrap();
                assert!((v.level_losses[0] - expected).abs() < 1e-12, "{kind:?}: {} vs {expected}", v.level_losses[0]);
                assert!((v.total - weight * expected / 2.0).abs() < 1e-12, "{kind:?} total");
                let levels = LossOptions { normalize: Normalize::Levels, ..opts(kind) };
                let v = loss_and_grad(&features, &labels, 2, 2, 2, &levels).unwrap();
                assert!((v.total - weight * expected).abs() < 1e-12, "{kind:?} total / (K-1)");
            }
            let pow2 = LossOptions { penalty: Penalty::Pow2, ..opts(LossKind::Hmc) };
            let v = loss_and_grad(&features, &labels, 2, 2, 2, &pow2).unwrap();
            assert!((v.total - 2.0 * expected / 2.0).abs() < 1e-12, "pow2: lambda_1 = 2");
        }
    }

    /// Product 0's first views sit at e1, its second views at e2; product 1's at e3 and e4.
    /// Level 1 (variation) has only the far other view as positive; level 2 (product) adds the
    /// other variation's near first view, so L_2 < L_1 and the hierarchy constraint binds.
    fn constraint_case() -> ([f64; 32], [i64; 12], f64, f64) {
        let e = |i: usize| {
            let mut v = [0.0; 4];
            v[i] = 1.0;
            v
        };
        let rows = [e(0), e(0), e(2), e(2), e(1), e(1), e(3), e(3)];
        let features: Vec<f64> = rows.concat();
        let labels = [0, 0, 0, 0, 1, 1, 1, 0, 2, 1, 1, 3]; // [product, variation, image]
        // Every anchor: one other view at logit 1/T, six at 0.
        let lse = ((1.0 / T).exp() + 6.0).ln();
        let l1 = (T / T0) * lse; // positive: the other view, logit 0
        let l2 = (T / T0) * (lse - (1.0 / T) / 3.0); // positives: logits 0, 1/T, 0
        (features.try_into().unwrap(), labels, l1, l2)
    }

    #[test]
    fn hierarchy_constraint_binds_and_routes_the_gradient() {
        let (features, labels, l1, l2) = constraint_case();
        let (n, d, k) = (4, 4, 3);
        let (e1, e2) = (1f64.exp(), 0.5f64.exp());
        for dedup in [Dedup::Official, Dedup::None] {
            let at =
                |kind| loss_and_grad(&features, &labels, n, d, k, &LossOptions { kind, dedup, ..opts(kind) }).unwrap();
            let (hmc, hce, hmce) = (at(LossKind::Hmc), at(LossKind::Hce), at(LossKind::Hmce));
            assert!((hce.level_losses[0] - l1).abs() < 1e-12 && (hce.level_losses[1] - l2).abs() < 1e-12);
            assert!(l2 < l1 - 1.0, "the case must make the constraint bind");
            assert!((hmc.total - (e1 * l1 + e2 * l2) / 3.0).abs() < 1e-12);
            assert!((hce.total - (l1 + l1) / 3.0).abs() < 1e-12);
            assert!((hmce.total - (e1 * l1 + e2 * l1) / 3.0).abs() < 1e-12);

            // The bound level passes its weight on to level 1; level 2's own gradient is unused.
            let all: Vec<usize> = (0..n).collect();
            let level = |columns| {
                level_loss_and_grad(&features, &labels, n, d, k, columns, &all, &opts(LossKind::Hce)).unwrap().1
            };
            let (g1, g2) = (level(2), level(1));
            assert!(g2.iter().zip(&g1).any(|(a, b)| (a - b).abs() > 1e-3), "levels must differ");
            let expect =
                |w1: f64, w2: f64| -> Vec<f64> { g1.iter().zip(&g2).map(|(a, b)| (w1 * a + w2 * b) / 3.0).collect() };
            assert_close("hce grad", &hce.grad, &expect(2.0, 0.0), 1e-12);
            assert_close("hmce grad", &hmce.grad, &expect(e1 + e2, 0.0), 1e-12);
            assert_close("hmc grad", &hmc.grad, &expect(e1, e2), 1e-12);
            for o in [LossOptions { dedup, ..opts(LossKind::Hce) }, LossOptions { dedup, ..opts(LossKind::Hmce) }] {
                check_gradient(&o, &features, &labels, n, d, k);
            }
        }
    }

    #[test]
    fn official_dedup_keeps_the_first_of_each_key_in_sorted_order() {
        // [category, product, variation, image]
        #[rustfmt::skip]
        let labels: [i64; 24] = [
            1, 5, 2, 0,
            0, 3, 1, 1,
            1, 5, 1, 2,
            0, 3, 1, 3,
            0, 3, 0, 4,
            1, 4, 0, 5,
        ];
        let (n, d, k) = (6, 3, 4);
        // Level 1 sees the batch; sorted by (category, product, variation):
        // (0,3,0): 4 | (0,3,1): 1, 3 | (1,4,0): 5 | (1,5,1): 2 | (1,5,2): 0
        // -> 1 (first in batch order) represents (0,3,1): [4, 1, 5, 2, 0].
        // Level 2 sees [4, 1, 5, 2, 0]; sorted by (category, product):
        // (0,3): 4, 1 | (1,4): 5 | (1,5): 2, 0
        // -> 2, the smaller variation, represents product (1,5) although 0 came first in the batch.
        let expected = vec![vec![0, 1, 2, 3, 4, 5], vec![4, 1, 5, 2, 0], vec![4, 5, 2]];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let features = unit_features(&mut rng, 2 * n, d);
        let official = loss_and_grad(&features, &labels, n, d, k, &opts(LossKind::Hmc)).unwrap();
        assert_eq!(official.level_samples, expected);
        let none =
            loss_and_grad(&features, &labels, n, d, k, &LossOptions { dedup: Dedup::None, ..opts(LossKind::Hmc) })
                .unwrap();
        assert_eq!(none.level_samples, vec![(0..6).collect::<Vec<_>>(); 3]);
        assert!((official.level_losses[0] - none.level_losses[0]).abs() < 1e-12, "level 1 sees the whole batch");
        assert!((official.total - none.total).abs() > 1e-6, "official and none must differ here");

        // The representative matters: level 3 is the category loss over {4, 5, 2}, not {4, 5, 0}.
        let category = |samples: &[usize]| {
            level_loss_and_grad(&features, &labels, n, d, k, 1, samples, &opts(LossKind::Hmc)).unwrap().0
        };
        assert!((official.level_losses[2] - category(&[4, 5, 2])).abs() < 1e-12);
        assert!((category(&[4, 5, 2]) - category(&[4, 5, 0])).abs() > 1e-6);
        check_gradient(&opts(LossKind::Hmce), &features, &labels, n, d, k);
    }

    #[test]
    fn simclr_is_supcon_on_the_image_column() {
        let (n, d) = (6, 5);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let labels = hierarchical_labels(&mut rng, n);
        let features = unit_features(&mut rng, 2 * n, d);
        let images: Vec<i64> = labels.chunks(4).map(|r| r[3]).collect();
        let simclr = loss_and_grad(&features, &labels, n, d, 4, &opts(LossKind::Simclr)).unwrap();
        let supcon = loss_and_grad(
            &features,
            &images,
            n,
            d,
            1,
            &LossOptions { supcon_level: Some(1), ..opts(LossKind::Supcon) },
        )
        .unwrap();
        assert!((simclr.total - supcon.total).abs() < 1e-12);
        assert_close("simclr grad", &simclr.grad, &supcon.grad, 1e-12);
        // And supcon at the product level is hmc's level 2 with dedup none.
        let supcon = loss_and_grad(&features, &labels, n, d, 4, &opts(LossKind::Supcon)).unwrap();
        let hmc =
            loss_and_grad(&features, &labels, n, d, 4, &LossOptions { dedup: Dedup::None, ..opts(LossKind::Hmc) })
                .unwrap();
        assert!((supcon.total - hmc.level_losses[1]).abs() < 1e-12);
        assert!((supcon.total - simclr.total).abs() > 1e-6, "product positives must change the loss");
    }

    #[test]
    fn level_losses_do_not_depend_on_batch_order_without_dedup() {
        let (n, d, k) = (8, 4, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let labels = hierarchical_labels(&mut rng, n);
        let features = unit_features(&mut rng, 2 * n, d);
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut rng);
        assert_ne!(perm, (0..n).collect::<Vec<_>>());
        // New sample j is old sample perm[j], both views together.
        let row = |f: &[f64], r: usize| f[r * d..(r + 1) * d].to_vec();
        let permuted_features: Vec<f64> = (0..2 * n).flat_map(|r| row(&features, perm[r % n] + (r / n) * n)).collect();
        let permuted_labels: Vec<i64> = perm.iter().flat_map(|&s| labels[s * k..(s + 1) * k].to_vec()).collect();
        for kind in [LossKind::Hmc, LossKind::Hce, LossKind::Hmce] {
            let o = LossOptions { kind, dedup: Dedup::None, ..opts(kind) };
            let a = loss_and_grad(&features, &labels, n, d, k, &o).unwrap();
            let b = loss_and_grad(&permuted_features, &permuted_labels, n, d, k, &o).unwrap();
            assert_close("level losses", &b.level_losses, &a.level_losses, 1e-12);
            let permuted_grad: Vec<f64> = (0..2 * n).flat_map(|r| row(&a.grad, perm[r % n] + (r / n) * n)).collect();
            assert_close("gradient", &b.grad, &permuted_grad, 1e-12);
        }
    }

    #[test]
    fn cross_entropy_matches_finite_differences_and_log_c() {
        let (n, d, c) = (5, 4, 3);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let features = unit_features(&mut rng, 2 * n, d);
        let weights: Vec<f64> = (0..c * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let bias: Vec<f64> = (0..c).map(|_| rng.random_range(-1.0..1.0)).collect();
        let targets: Vec<i64> = (0..n).map(|i| (i % c) as i64).collect();
        let v = ce_loss_and_grad(&features, &weights, &bias, &targets, n, d, c).unwrap();
        let loss = |f: &[f64], w: &[f64], b: &[f64]| ce_loss_and_grad(f, w, b, &targets, n, d, c).unwrap().loss;
        let h = 1e-5;
        assert_close(
            "features",
            &v.grad_features,
            &central_differences(&features, h, |f| loss(f, &weights, &bias)),
            1e-8,
        );
        assert_close(
            "weights",
            &v.grad_weights,
            &central_differences(&weights, h, |w| loss(&features, w, &bias)),
            1e-8,
        );
        assert_close("bias", &v.grad_bias, &central_differences(&bias, h, |b| loss(&features, &weights, b)), 1e-8);

        // Zero classifier: uniform softmax, loss ln C, bias gradient 1/C - class share.
        let zero = ce_loss_and_grad(&features, &vec![0.0; c * d], &vec![0.0; c], &targets, n, d, c).unwrap();
        assert!((zero.loss - (c as f64).ln()).abs() < 1e-12);
        for j in 0..c {
            let share = targets.iter().filter(|&&t| t as usize == j).count() as f64 / n as f64;
            assert!((zero.grad_bias[j] - (1.0 / c as f64 - share)).abs() < 1e-12);
        }
        assert!(ce_loss_and_grad(&features, &weights, &bias, &[0, 1, 2, 3, 0], n, d, c).is_err());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let f = [1.0, 0.0, 0.0, 1.0];
        let o = opts(LossKind::Hmc);
        assert!(matches!(loss_and_grad(&f[..3], &[0, 0], 1, 2, 2, &o), Err(Error::LossShape { what: "features", .. })));
        assert!(matches!(loss_and_grad(&f, &[0], 1, 2, 2, &o), Err(Error::LossShape { what: "labels", .. })));
        assert!(matches!(loss_and_grad(&f, &[0], 1, 2, 1, &o), Err(Error::LossConfig { .. })), "hmc needs K >= 2");
        assert!(loss_and_grad(&f, &[0, 0], 1, 2, 2, &opts(LossKind::Supcon)).is_err(), "product level needs K >= 3");
        assert!(loss_and_grad(&f, &[0, 0], 1, 2, 2, &opts(LossKind::Ce)).is_err());
        let cold = LossOptions { temperature: 0.0, ..o };
        assert!(loss_and_grad(&f, &[0, 0], 1, 2, 2, &cold).is_err());
        assert!(loss_and_grad(&f, &[0, 0], 1, 2, 2, &opts(LossKind::Hmc)).is_ok());
    }

    #[test]
    fn options_parse_with_their_defaults_and_round_trip() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            loss: LossOptions,
        }
        assert_eq!(Cli::try_parse_from(["x"]).unwrap().loss, LossOptions::default());
        let parsed = Cli::try_parse_from([
            "x",
            "--loss",
            "hce",
            "--penalty",
            "pow2",
            "--dedup",
            "none",
            "--normalize",
            "levels",
            "--supcon-level",
            "2",
        ])
        .unwrap()
        .loss;
        let expected = LossOptions {
            kind: LossKind::Hce,
            penalty: Penalty::Pow2,
            dedup: Dedup::None,
            normalize: Normalize::Levels,
            supcon_level: Some(2),
            ..LossOptions::default()
        };
        assert_eq!(parsed, expected);
        let json = serde_json::to_string(&expected).unwrap();
        assert!(json.contains("\"kind\":\"hce\"") && json.contains("\"dedup\":\"none\""), "{json}");
        assert_eq!(serde_json::from_str::<LossOptions>(&json).unwrap(), expected);
        assert_eq!(expected.supcon_columns(4).unwrap(), 2);
        assert_eq!(LossOptions::default().supcon_columns(5).unwrap(), 3);
        assert!(expected.supcon_columns(1).is_err());
    }
}
