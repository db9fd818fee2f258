//! The losses of DESIGN §2 as graph IR: class masks and the official dedup computed from the
//! labels inside the graph with static shapes, differentiable by [`crate::graph::grad_with`].
//!
//! Shapes never depend on the data. Every level compares all `2N` views, and a 0/1 *kept* mask
//! per level says which samples take part: masked samples add nothing to any numerator,
//! denominator or mean. Under `--dedup official` the mask of level `l + 1` keeps a sample of
//! level `l` when no *earlier* sample of level `l` has the same level-`l` key (its first `K - l`
//! label columns), where "earlier" is the order the reference's stable sort leaves
//! ([`crate::loss::reference::dedup_keep`]): at level 1 the batch order (the first occurrence
//! is kept), from level 2 on the order of the previous level's key, so the kept sample is the
//! one with the smallest finer key. Which sample represents a group decides the coarser losses,
//! and the tests check it against the reference on label tables where the two orders disagree.
//!
//! The combination of `hce` / `hmce`, `L'_l = max(L_l, M_{l-1})`, is a `Where(L_l < M, M, L_l)`
//! between rank-0 values: the value of `Max`, with the whole gradient going to the larger
//! argument and, on an exact tie, to `L_l`, as the reference chooses.
//!
//! `ce` adds two parameters, [`CE_WEIGHT`] `[D, C]` and [`CE_BIAS`] `[C]` (the `loss.` prefix
//! tells the model exporter to leave them out), initialised by [`ce_init`].

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::options::{Dedup, LossKind, LossOptions};
use crate::graph::{DType, Graph, Tensor, Value};
use crate::{Error, Result};

/// Name of the CE baseline's classifier weight, `[D, C]` (logits = `z W + b`).
pub const CE_WEIGHT: &str = "loss.ce.weight";
/// Name of the CE baseline's classifier bias, `[C]`.
pub const CE_BIAS: &str = "loss.ce.bias";
/// Seed of [`ce_init`].
pub const CE_INIT_SEED: u64 = 0x0068_6965_7263_6f6e; // "hiercon" in ASCII

/// The loss values of a graph built by [`loss_graph`], all rank-0 and of the features' type.
#[derive(Debug, Clone, PartialEq)]
pub struct LossParts {
    /// The value that is minimised.
    pub loss: Value,
    /// `L_l` for each level as computed (before any max with coarser levels), finest first,
    /// as [`crate::loss::reference::LossValue::level_losses`]; one entry for the baselines.
    pub level_losses: Vec<Value>,
}

/// The CE classifier's initial values: weight `[D, C]` row-major drawn uniformly from
/// `[-1/sqrt(D), 1/sqrt(D))` by ChaCha8 seeded with [`CE_INIT_SEED`] (PyTorch's `nn.Linear`
/// range), bias zero. The same `(D, C)` always gives the same values.
pub fn ce_init(d: usize, c: usize) -> (Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(CE_INIT_SEED);
    let bound = 1.0 / (d as f32).sqrt();
    let weight = (0..d * c).map(|_| rng.random_range(-bound..bound)).collect();
    (weight, vec![0.0; c])
}

/// Appends the loss of `opts` to `g`.
///
/// `features` is a float (f32 or f64) `[2N, D]` value, rows `i` and `i + N` the two views of
/// sample `i`, used as given (not normalised again); `labels` is an i64 `[N, K]` value, columns
/// coarse -> fine. `ce_classes` is the number of classes `C` of the `ce` baseline (ignored by
/// the other kinds); `ce` reads its targets from label column `ce_columns - 1`, which must hold
/// class ids in `0..C` (a target outside that range has no logit picked: the row's loss is its
/// log-sum-exp).
pub fn loss_graph(
    g: &mut Graph,
    features: Value,
    labels: Value,
    opts: &LossOptions,
    ce_classes: Option<usize>,
) -> Result<LossParts> {
    opts.validate()?;
    let loss_name = opts.kind.name();
    let (fs, ls) = (g.shape(features).to_vec(), g.shape(labels).to_vec());
    let ft = g.dtype(features);
    if !ft.is_float() || fs.len() != 2 {
        return Err(Error::LossGraphInput {
            what: "features",
            expected: "a float [2N, D] value".into(),
            found: format!("{ft}{fs:?}"),
        });
    }
    if g.dtype(labels) != DType::I64 || ls.len() != 2 {
        return Err(Error::LossGraphInput {
            what: "labels",
            expected: "an i64 [N, K] value".into(),
            found: format!("{}{ls:?}", g.dtype(labels)),
        });
    }
    let (n, k, d) = (ls[0], ls[1], fs[1]);
    if n == 0 || d == 0 || k == 0 {
        return Err(Error::LossEmptyBatch { loss: loss_name, n, d, k });
    }
    if fs[0] != 2 * n {
        return Err(Error::LossGraphInput {
            what: "features",
            expected: format!("[2N, D] = [{}, D] for labels of N = {n} rows", 2 * n),
            found: format!("{ft}{fs:?}"),
        });
    }
    if opts.kind.is_hierarchical() && k < 2 {
        return Err(Error::LossTooFewColumns { loss: loss_name, k });
    }
    if opts.kind == LossKind::Ce {
        let c = match ce_classes {
            Some(c) if c >= 1 => c,
            _ => return Err(Error::LossMissingClasses),
        };
        let column = opts.ce_columns(k)? - 1;
        let loss = cross_entropy(g, features, labels, column, c)?;
        return Ok(LossParts { loss, level_losses: vec![loss] });
    }

    let mut b = Builder::new(g, features, labels, opts)?;
    match opts.kind {
        LossKind::Supcon => {
            let columns = opts.supcon_columns(k)?;
            let same = b.same_key(columns)?;
            let loss = b.level(same, None)?;
            Ok(LossParts { loss, level_losses: vec![loss] })
        }
        LossKind::Simclr => {
            let eye = eye(n);
            let same = b.constant(&[n, n], eye);
            let loss = b.level(same, None)?;
            Ok(LossParts { loss, level_losses: vec![loss] })
        }
        _ => {
            let mut parts = b.hierarchical()?;
            if opts.supcon_mix != 0.0 {
                // hmc / hce / hmce + W · SupCon at --supcon-level (the product by default).
                let same = b.same_key(opts.supcon_columns(k)?)?;
                let sup = b.level(same, None)?;
                let weighted = b.g.mul_scalar(sup, opts.supcon_mix)?;
                parts.loss = b.g.add(parts.loss, weighted)?;
            }
            Ok(parts)
        }
    }
}

/// Row-major `n x n` identity.
fn eye(n: usize) -> Vec<f64> {
    (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect()
}

/// Softmax cross-entropy of `z W + b` against label column `column`, mean over the `2N` rows.
fn cross_entropy(g: &mut Graph, features: Value, labels: Value, column: usize, c: usize) -> Result<Value> {
    let ft = g.dtype(features);
    let (rows, d) = (g.shape(features)[0], g.shape(features)[1]);
    let (w0, b0) = ce_init(d, c);
    let mut weight = g.param(CE_WEIGHT, &[d, c], w0)?;
    let mut bias = g.param(CE_BIAS, &[c], b0)?;
    if ft != DType::F32 {
        weight = g.cast(weight, ft)?;
        bias = g.cast(bias, ft)?;
    }
    let zw = g.matmul(features, weight)?;
    let logits = g.add(zw, bias)?; // [2N, C]
    let target = g.slice(labels, &[1], &[column as i64], &[column as i64 + 1], &[])?; // [N, 1]
    let target = g.concat(&[target, target], 0)?; // [2N, 1]
    let classes: Vec<i64> = (0..c as i64).collect();
    let classes = g.const_i64(&classes);
    let hit = g.equal(target, classes)?;
    let one_hot = g.cast(hit, ft)?; // [2N, C]
    let picked = g.mul(one_hot, logits)?;
    let picked = g.reduce_sum(picked, &[1], true)?;
    let lse = log_sum_exp_rows(g, logits)?;
    let per_row = g.sub(lse, picked)?;
    debug_assert_eq!(g.shape(per_row), [rows, 1]);
    g.mean_all(per_row)
}

/// `log sum_j exp(x_ij)` over the last axis of a 2-D value, the row maximum subtracted first.
fn log_sum_exp_rows(g: &mut Graph, x: Value) -> Result<Value> {
    let max = g.reduce_max(x, &[1], true)?;
    let shifted = g.sub(x, max)?;
    let e = g.exp(shifted)?;
    let s = g.reduce_sum(e, &[1], true)?;
    let l = g.log(s)?;
    g.add(max, l)
}

/// Shared pieces of the contrastive losses: the similarity matrix and its exponentials (built
/// once for every level) and the per-column label comparisons.
struct Builder<'g> {
    g: &'g mut Graph,
    labels: Value,
    opts: &'g LossOptions,
    dtype: DType,
    n: usize,
    k: usize,
    /// `S = z z^T / T`, `[2N, 2N]`.
    sim: Value,
    /// Row maxima of `S`, `[2N, 1]`.
    row_max: Value,
    /// `exp(S - row_max)` with a zero diagonal (`A(a)` excludes the anchor), `[2N, 2N]`.
    exp_others: Value,
    /// `1 - I`, `[2N, 2N]`.
    off_diagonal: Value,
    /// Per label column `j`: `[N, N]` 0/1 matrices `label_aj == label_bj` and `label_aj < label_bj`.
    eq: Vec<Option<Value>>,
    lt: Vec<Option<Value>>,
    /// `same[c]`: first `c` columns equal; `less[c]`: first `c` columns lexicographically smaller.
    same: Vec<Option<Value>>,
    less: Vec<Option<Value>>,
}

impl<'g> Builder<'g> {
    fn new(g: &'g mut Graph, features: Value, labels: Value, opts: &'g LossOptions) -> Result<Builder<'g>> {
        let dtype = g.dtype(features);
        let (n, k) = (g.shape(labels)[0], g.shape(labels)[1]);
        let zt = g.transpose(features, &[1, 0])?;
        let dots = g.matmul(features, zt)?;
        let sim = g.mul_scalar(dots, 1.0 / opts.temperature)?;
        let row_max = g.reduce_max(sim, &[1], true)?;
        let shifted = g.sub(sim, row_max)?;
        let e = g.exp(shifted)?;
        let off: Vec<f64> = eye(2 * n).into_iter().map(|x| 1.0 - x).collect();
        let off_diagonal = g.constant(Tensor::f64(&[2 * n, 2 * n], off)?.cast(dtype));
        let exp_others = g.mul(e, off_diagonal)?;
        Ok(Builder {
            g,
            labels,
            opts,
            dtype,
            n,
            k,
            sim,
            row_max,
            exp_others,
            off_diagonal,
            eq: vec![None; k],
            lt: vec![None; k],
            same: vec![None; k + 1],
            less: vec![None; k + 1],
        })
    }

    /// A constant of the features' type.
    fn constant(&mut self, shape: &[usize], data: Vec<f64>) -> Value {
        let t = Tensor::f64(shape, data).expect("callers pass matching shapes").cast(self.dtype);
        self.g.constant(t)
    }

    /// `[N, N]` 0/1 comparisons of label column `j` (`a` down, `b` across).
    fn column_compare(&mut self, j: usize) -> Result<(Value, Value)> {
        if let (Some(e), Some(l)) = (self.eq[j], self.lt[j]) {
            return Ok((e, l));
        }
        let n = self.n;
        let col = self.g.slice(self.labels, &[1], &[j as i64], &[j as i64 + 1], &[])?; // [N, 1]
        let row = self.g.reshape_to(col, &[1, n])?;
        let eq = self.g.equal(col, row)?;
        let eq = self.g.cast(eq, self.dtype)?;
        let lt = self.g.less(col, row)?;
        let lt = self.g.cast(lt, self.dtype)?;
        self.eq[j] = Some(eq);
        self.lt[j] = Some(lt);
        Ok((eq, lt))
    }

    /// `[N, N]` 0/1: samples `a` and `b` agree on the first `columns` label columns.
    fn same_key(&mut self, columns: usize) -> Result<Value> {
        if let Some(v) = self.same[columns] {
            return Ok(v);
        }
        let (eq, _) = self.column_compare(columns - 1)?;
        let v = if columns == 1 {
            eq
        } else {
            let prefix = self.same_key(columns - 1)?;
            self.g.mul(prefix, eq)?
        };
        self.same[columns] = Some(v);
        Ok(v)
    }

    /// `[N, N]` 0/1: the first `columns` label columns of `a` are lexicographically smaller than
    /// `b`'s: `less_c = less_{c-1} + same_{c-1} * lt_c` (the two terms never both hold).
    fn less_key(&mut self, columns: usize) -> Result<Value> {
        if let Some(v) = self.less[columns] {
            return Ok(v);
        }
        let (_, lt) = self.column_compare(columns - 1)?;
        let v = if columns == 1 {
            lt
        } else {
            let prefix_less = self.less_key(columns - 1)?;
            let prefix_same = self.same_key(columns - 1)?;
            let tie_then_less = self.g.mul(prefix_same, lt)?;
            self.g.add(prefix_less, tie_then_less)?
        };
        self.less[columns] = Some(v);
        Ok(v)
    }

    /// The kept mask (`[1, N]`, 0/1) of the level after `level`, given this level's mask
    /// (`None`: every sample): a sample stays when no earlier kept sample shares its level key.
    fn dedup(&mut self, level: usize, mask: Option<Value>) -> Result<Value> {
        let n = self.n;
        let columns = self.k - level;
        let same = self.same_key(columns)?;
        // before[b, a] = 1 when sample b comes before sample a in the order level `level` saw.
        let before = if level == 1 {
            let data = (0..n * n).map(|i| if i / n < i % n { 1.0 } else { 0.0 }).collect();
            self.constant(&[n, n], data)
        } else {
            self.less_key(columns + 1)?
        };
        let shadows = self.g.mul(same, before)?; // [b, a]: b shadows a
        let earlier = match mask {
            Some(m) => self.g.matmul(m, shadows)?, // [1, N]: kept samples shadowing a
            None => self.g.reduce_sum(shadows, &[0], true)?,
        };
        let half = self.g.scalar_like(earlier, 0.5);
        let first = self.g.less(earlier, half)?;
        let first = self.g.cast(first, self.dtype)?;
        match mask {
            Some(m) => self.g.mul(m, first),
            None => Ok(first),
        }
    }

    /// One level's SupCon loss over the kept samples (`mask`, `[1, N]`; `None`: all), with
    /// `same` (`[N, N]`, 0/1) saying which samples share a class:
    /// `mean_a -(T/T0) (sum_p s_ap / |P(a)| - log sum_{b != a} exp(s_ab))`.
    fn level(&mut self, same: Value, mask: Option<Value>) -> Result<Value> {
        let g = &mut *self.g;
        let (t, t0) = (self.opts.temperature, self.opts.base_temperature);
        // Views: tile [N, N] to [2N, 2N]; the anchor itself is no positive.
        let wide = g.concat(&[same, same], 1)?;
        let tiled = g.concat(&[wide, wide], 0)?;
        let mut positive = g.mul(tiled, self.off_diagonal)?;
        let view_mask = match mask {
            Some(m) => Some(g.concat(&[m, m], 1)?), // [1, 2N]
            None => None,
        };
        let denominator = match view_mask {
            Some(v) => {
                let column = g.reshape_to(v, &[2 * self.n, 1])?;
                g.matmul(self.exp_others, column)?
            }
            None => g.reduce_sum(self.exp_others, &[1], true)?,
        };
        if let Some(v) = view_mask {
            positive = g.mul(positive, v)?;
        }
        let log_denominator = g.log(denominator)?;
        let lse = g.add(self.row_max, log_denominator)?; // [2N, 1]
        let count = g.reduce_sum(positive, &[1], true)?;
        // Masked anchors may have no positive: divide by at least 1 (their term is dropped).
        let one = g.scalar_like(count, 1.0);
        let count = g.max(count, one)?;
        let positive_logits = g.mul(positive, self.sim)?;
        let positive_sum = g.reduce_sum(positive_logits, &[1], true)?;
        let mean_positive = g.div(positive_sum, count)?;
        let log_prob = g.sub(mean_positive, lse)?;
        let per_anchor = g.mul_scalar(log_prob, -(t / t0))?; // [2N, 1]
        match view_mask {
            Some(v) => {
                let weights = g.reshape_to(v, &[2 * self.n, 1])?;
                let kept = g.mul(per_anchor, weights)?;
                let total = g.sum_all(kept)?;
                let anchors = g.sum_all(v)?;
                g.div(total, anchors)
            }
            None => g.mean_all(per_anchor),
        }
    }

    /// `hmc`, `hce`, `hmce` over levels `1..K`, finest first.
    fn hierarchical(&mut self) -> Result<LossParts> {
        let (k, opts) = (self.k, self.opts);
        let mut mask: Option<Value> = None;
        let mut level_losses = Vec::with_capacity(k - 1);
        for level in 1..k {
            let same = self.same_key(k - level)?;
            level_losses.push(self.level(same, mask)?);
            if opts.dedup == Dedup::Official && level + 1 < k {
                mask = Some(self.dedup(level, mask)?);
            }
        }
        let g = &mut *self.g;
        let mut terms = Vec::with_capacity(k - 1);
        let mut max_so_far: Option<Value> = None; // M_{l-1}; None is -inf
        for (i, &value) in level_losses.iter().enumerate() {
            let level = i + 1;
            let (term, weight) = match opts.kind {
                LossKind::Hmc => (value, opts.penalty.lambda(level)),
                LossKind::Hce | LossKind::Hmce => {
                    let constrained = match max_so_far {
                        None => value,
                        Some(m) => {
                            let below = g.less(value, m)?;
                            g.where_(below, m, value)?
                        }
                    };
                    max_so_far = Some(constrained);
                    let weight = if opts.kind == LossKind::Hmce { opts.penalty.lambda(level) } else { 1.0 };
                    (constrained, weight)
                }
                _ => unreachable!("hierarchical() is built for hmc, hce and hmce only"),
            };
            terms.push(g.mul_scalar(term, weight)?);
        }
        let total = g.sum(&terms)?;
        let loss = g.mul_scalar(total, 1.0 / opts.divisor(k))?;
        Ok(LossParts { loss, level_losses })
    }
}

#[cfg(test)]
mod tests;
