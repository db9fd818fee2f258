//! Optimizers as graph fragments (PyTorch semantics): SGD with momentum and weight decay, AdamW.
//! The learning rate (and Adam's step count) are graph inputs, so schedules live in Rust; the
//! optimizer state is extra inputs / outputs paired with [`Graph::feed_back`].

use super::autodiff::{GradOptions, GradReport, grad_with};
use super::ir::{DType, Graph, InputKind, Tensor, Value};
use crate::{Error, Result};

/// `torch.optim.SGD` with `dampening = 0`:
/// `d = g + wd·p; b = μ·b + d; d = nesterov ? d + μ·b : b; p = p − lr·d`
/// (no momentum buffer when `momentum == 0`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sgd {
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Default for Sgd {
    fn default() -> Self {
        Sgd { momentum: 0.9, weight_decay: 0.0, nesterov: false }
    }
}

/// `torch.optim.AdamW`: `p = p·(1 − lr·wd); m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²;
/// p = p − lr/(1−β1ᵗ) · m / (√v / √(1−β2ᵗ) + eps)`, `t` the 1-based step fed as input `step`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// Either optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    Sgd(Sgd),
    AdamW(AdamW),
}

/// The inputs and state an optimizer fragment added.
#[derive(Debug, Clone)]
pub struct OptimizerStep {
    /// Input `lr`: rank-0, the parameters' element type.
    pub lr: Value,
    /// Input `step` (AdamW only): rank-0 i64, the 1-based number of this update.
    pub step: Option<Value>,
    /// State inputs ([`InputKind::OptimState`], zero-initialised), each fed back.
    pub state: Vec<Value>,
}

/// A full training step's additions: gradients of every parameter, the optimizer update.
#[derive(Debug, Clone)]
pub struct TrainStep {
    pub optimizer: OptimizerStep,
    /// Gradients of `loss` w.r.t. [`Graph::params`], in that order.
    pub grads: Vec<Value>,
    pub report: GradReport,
}

impl Optimizer {
    /// Appends the update of `params` given `grads`; each parameter's new value is fed back.
    pub fn apply(&self, g: &mut Graph, params: &[Value], grads: &[Value]) -> Result<OptimizerStep> {
        match self {
            Optimizer::Sgd(o) => sgd(g, params, grads, o),
            Optimizer::AdamW(o) => adamw(g, params, grads, o),
        }
    }
}

/// Differentiates `loss` w.r.t. every parameter of `g` and appends the optimizer update:
/// the whole backward + update half of a training step.
pub fn train_step(g: &mut Graph, loss: Value, opt: &Optimizer, opts: &GradOptions) -> Result<TrainStep> {
    let params = g.params();
    let (grads, report) = grad_with(g, loss, &params, opts)?;
    let optimizer = opt.apply(g, &params, &grads)?;
    Ok(TrainStep { optimizer, grads, report })
}

fn check(g: &Graph, params: &[Value], grads: &[Value]) -> Result<DType> {
    if params.len() != grads.len() || params.is_empty() {
        return Err(Error::GraphInvalid {
            reason: format!("{} parameters but {} gradients", params.len(), grads.len()),
        });
    }
    let dt = g.dtype(params[0]);
    for (&p, &gr) in params.iter().zip(grads) {
        if g.dtype(p) != dt || g.dtype(gr) != dt || g.shape(p) != g.shape(gr) || !dt.is_float() {
            return Err(Error::GraphShape {
                op: "optimizer".into(),
                detail: format!(
                    "parameter `{}` {}{:?} vs gradient {}{:?}",
                    g.name(p),
                    g.dtype(p),
                    g.shape(p),
                    g.dtype(gr),
                    g.shape(gr)
                ),
            });
        }
    }
    Ok(dt)
}

fn state_input(g: &mut Graph, p: Value, suffix: &str) -> Result<Value> {
    let name = format!("{}.{suffix}", g.name(p));
    let (dt, s) = (g.dtype(p), g.shape(p).to_vec());
    g.input_of(&name, InputKind::OptimState, dt, &s, Some(Tensor::zeros(dt, &s)))
}

/// Appends SGD (see [`Sgd`]); adds input `lr` and, with momentum, a `"<param>.momentum"` state.
pub fn sgd(g: &mut Graph, params: &[Value], grads: &[Value], o: &Sgd) -> Result<OptimizerStep> {
    let dt = check(g, params, grads)?;
    let lr = g.input("lr", dt, &[])?;
    let mut state = Vec::new();
    for (&p, &gr) in params.iter().zip(grads) {
        let mut d = gr;
        if o.weight_decay != 0.0 {
            let wp = g.mul_scalar(p, o.weight_decay)?;
            d = g.add(d, wp)?;
        }
        if o.momentum != 0.0 {
            let buf = state_input(g, p, "momentum")?;
            let decayed = g.mul_scalar(buf, o.momentum)?;
            let nb = g.add(decayed, d)?;
            g.feed_back(buf, nb)?;
            state.push(buf);
            d = if o.nesterov {
                let mb = g.mul_scalar(nb, o.momentum)?;
                g.add(d, mb)?
            } else {
                nb
            };
        }
        let step = g.mul(d, lr)?;
        let np = g.sub(p, step)?;
        g.feed_back(p, np)?;
    }
    Ok(OptimizerStep { lr, step: None, state })
}

/// Appends AdamW (see [`AdamW`]); adds inputs `lr`, `step` and `"<param>.exp_avg"`,
/// `"<param>.exp_avg_sq"` states.
pub fn adamw(g: &mut Graph, params: &[Value], grads: &[Value], o: &AdamW) -> Result<OptimizerStep> {
    let dt = check(g, params, grads)?;
    let lr = g.input("lr", dt, &[])?;
    let step = g.input("step", DType::I64, &[])?;
    // Scalars shared by every parameter.
    let t = g.cast(step, dt)?;
    let b1 = g.scalar(o.beta1, dt);
    let b2 = g.scalar(o.beta2, dt);
    let one = g.scalar(1.0, dt);
    let b1t = g.push1("Pow", vec![b1, t], vec![], dt, vec![]);
    let b2t = g.push1("Pow", vec![b2, t], vec![], dt, vec![]);
    let bc1 = g.sub(one, b1t)?;
    let bc2 = g.sub(one, b2t)?;
    let step_size = g.div(lr, bc1)?;
    let sqrt_bc2 = g.sqrt(bc2)?;
    let lr_wd = g.mul_scalar(lr, o.weight_decay)?;
    let decay = g.sub(one, lr_wd)?;
    let mut state = Vec::new();
    for (&p, &gr) in params.iter().zip(grads) {
        let m = state_input(g, p, "exp_avg")?;
        let v = state_input(g, p, "exp_avg_sq")?;
        let pd = if o.weight_decay != 0.0 { g.mul(p, decay)? } else { p };
        let m1 = g.mul_scalar(m, o.beta1)?;
        let m2 = g.mul_scalar(gr, 1.0 - o.beta1)?;
        let nm = g.add(m1, m2)?;
        let v1 = g.mul_scalar(v, o.beta2)?;
        let gg = g.mul(gr, gr)?;
        let v2 = g.mul_scalar(gg, 1.0 - o.beta2)?;
        let nv = g.add(v1, v2)?;
        let sv = g.sqrt(nv)?;
        let sv = g.div(sv, sqrt_bc2)?;
        let denom = g.add_scalar(sv, o.eps)?;
        let ratio = g.div(nm, denom)?;
        let upd = g.mul(ratio, step_size)?;
        let np = g.sub(pd, upd)?;
        g.feed_back(m, nm)?;
        g.feed_back(v, nv)?;
        g.feed_back(p, np)?;
        state.extend([m, v]);
    }
    Ok(OptimizerStep { lr, step: Some(step), state })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testutil::{rng, uniform};
    use crate::graph::{Carried, Runner};

    /// Plain-Rust f64 reference of one parameter's trajectory.
    enum RefState {
        Sgd { buf: Vec<f64> },
        Adam { m: Vec<f64>, v: Vec<f64> },
    }

    fn reference_step(opt: &Optimizer, p: &mut [f64], g: &[f64], st: &mut RefState, lr: f64, t: i64) {
        match (opt, st) {
            (Optimizer::Sgd(o), RefState::Sgd { buf }) => {
                for i in 0..p.len() {
                    let mut d = g[i] + o.weight_decay * p[i];
                    if o.momentum != 0.0 {
                        buf[i] = o.momentum * buf[i] + d;
                        d = if o.nesterov { d + o.momentum * buf[i] } else { buf[i] };
                    }
                    p[i] -= lr * d;
                }
            }
            (Optimizer::AdamW(o), RefState::Adam { m, v }) => {
                let (bc1, bc2) = (1.0 - o.beta1.powi(t as i32), 1.0 - o.beta2.powi(t as i32));
                for i in 0..p.len() {
                    p[i] *= 1.0 - lr * o.weight_decay;
                    m[i] = o.beta1 * m[i] + (1.0 - o.beta1) * g[i];
                    v[i] = o.beta2 * v[i] + (1.0 - o.beta2) * g[i] * g[i];
                    p[i] -= lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + o.eps);
                }
            }
            _ => unreachable!(),
        }
    }

    /// Minimises `sum(w ⊙ x)` + `0.5 sum(w²)` for four steps with a changing learning rate,
    /// feeding the outputs back; compares with the reference (f32 graph, relative 1e-5).
    fn check_against_reference(opt: Optimizer, seed: u64) {
        let mut r = rng(seed);
        let shape = [3, 4];
        let init = uniform(&mut r, DType::F32, &shape).into_f32().unwrap();
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &shape).unwrap();
        let w = g.param("w", &shape, init.iter().copied().collect()).unwrap();
        let wx = g.mul(w, x).unwrap();
        let ww = g.mul(w, w).unwrap();
        let half = g.mul_scalar(ww, 0.5).unwrap();
        let s = g.add(wx, half).unwrap();
        let loss = g.sum_all(s).unwrap();
        let ts = train_step(&mut g, loss, &opt, &GradOptions::default()).unwrap();
        g.output("loss", loss).unwrap();
        let mut run = Runner::cpu(&g).unwrap();

        let mut p: Vec<f64> = init.iter().map(|&v| v as f64).collect();
        let mut st = match opt {
            Optimizer::Sgd(_) => RefState::Sgd { buf: vec![0.0; 12] },
            Optimizer::AdamW(_) => RefState::Adam { m: vec![0.0; 12], v: vec![0.0; 12] },
        };
        // Current values of every fed-back input, by name.
        let mut carried = Carried::new(&g).unwrap();
        for t in 1..=4i64 {
            let xv = uniform(&mut r, DType::F32, &shape);
            let lr = 0.1 / t as f64;
            let lrv = Tensor::F32(ndarray::arr0(lr as f32).into_dyn());
            let stepv = Tensor::I64(ndarray::arr0(t).into_dyn());
            let mut feeds: Vec<(&str, &Tensor)> = vec![("x", &xv), ("lr", &lrv)];
            if ts.optimizer.step.is_some() {
                feeds.push(("step", &stepv));
            }
            feeds.extend(carried.feeds());
            let out = run.run(&feeds).unwrap();
            let grad: Vec<f64> = p.iter().zip(xv.to_f64_vec()).map(|(w, x)| x + w).collect();
            reference_step(&opt, &mut p, &grad, &mut st, lr as f32 as f64, t);
            let next = out.f32("w.next").unwrap();
            for (a, b) in next.iter().zip(&p) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "step {t}: graph {a} vs reference {b} ({opt:?})"
                );
            }
            carried.update(&out).unwrap();
        }
    }

    #[test]
    fn sgd_matches_pytorch_semantics() {
        check_against_reference(Optimizer::Sgd(Sgd { momentum: 0.9, weight_decay: 0.05, nesterov: false }), 1);
        check_against_reference(Optimizer::Sgd(Sgd { momentum: 0.8, weight_decay: 0.0, nesterov: true }), 2);
        check_against_reference(Optimizer::Sgd(Sgd { momentum: 0.0, weight_decay: 0.1, nesterov: false }), 3);
    }

    #[test]
    fn adamw_matches_pytorch_semantics() {
        check_against_reference(Optimizer::AdamW(AdamW::default()), 4);
        check_against_reference(Optimizer::AdamW(AdamW { beta1: 0.5, beta2: 0.9, eps: 1e-3, weight_decay: 0.0 }), 5);
    }

    #[test]
    fn state_inputs_are_declared_and_fed_back() {
        let mut g = Graph::new();
        let w = g.param("w", &[2], vec![1.0, 2.0]).unwrap();
        let l = g.sum_all(w).unwrap();
        let ts = train_step(&mut g, l, &Optimizer::AdamW(AdamW::default()), &GradOptions::default()).unwrap();
        let names: Vec<&str> = ts.optimizer.state.iter().map(|&v| g.name(v)).collect();
        assert_eq!(names, ["w.exp_avg", "w.exp_avg_sq"]);
        assert_eq!(g.inputs_of(InputKind::OptimState).count(), 2);
        let outs: Vec<&str> = g.feedback().iter().map(|(_, o)| g.name(*o)).collect();
        assert_eq!(outs, ["w.exp_avg.next", "w.exp_avg_sq.next", "w.next"]);
        assert_eq!(g.dtype(ts.optimizer.step.unwrap()), DType::I64);
    }
}
