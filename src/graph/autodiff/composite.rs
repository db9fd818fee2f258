//! Closed-form gradients of composite ops (runs of nodes recorded by a builder), here BatchNorm
//! in training mode: the same gradient the op-by-op rules give, in fewer passes over activations.

use std::collections::HashMap;

use crate::Result;
use crate::graph::ir::{Composite, CompositeKind, Graph, Value};

/// Gradients of the composite's inputs, or `None` to differentiate its nodes one by one: when
/// its output has no gradient, or a value inside the run received one from outside it (e.g. a
/// loss that reads the batch mean).
pub(super) fn rule(
    g: &mut Graph,
    comp: &Composite,
    contrib: &mut HashMap<Value, Vec<Value>>,
    needed: &[bool],
) -> Result<Option<Vec<(Value, Value)>>> {
    let CompositeKind::BatchNormTrain { x, gamma, beta, y, xc, inv, gamma_b, ref axes } = comp.kind;
    let inside_has_grad = g.nodes[comp.first..=comp.last]
        .iter()
        .flat_map(|n| n.outputs.iter())
        .any(|&v| v != y && contrib.contains_key(&v));
    if inside_has_grad || !contrib.contains_key(&y) {
        return Ok(None);
    }
    let parts = contrib.remove(&y).expect("checked above");
    let gy = g.sum(&parts)?;
    let xs = g.shape(x).to_vec();
    let c = xs[1];
    let n = (xs.iter().product::<usize>() / c) as f64;
    let mut out = Vec::new();
    // Per channel: gbeta = Σ gy, Σ gy·xc, ggamma = inv · Σ gy·xc.
    let sum_gy = g.reduce_sum(gy, axes, true)?;
    let gxc = g.mul(gy, xc)?;
    let sum_gyxc = g.reduce_sum(gxc, axes, true)?;
    if needed[beta.index()] {
        out.push((beta, g.reshape_to(sum_gy, &[c])?));
    }
    if needed[gamma.index()] {
        let gg = g.mul(sum_gyxc, inv)?;
        out.push((gamma, g.reshape_to(gg, &[c])?));
    }
    if needed[x.index()] {
        // gx = k1·gy + k2·xc + k3 with k1 = γ·inv, k2 = −k1·inv²·Σgy·xc / n, k3 = −k1·Σgy / n.
        let k1 = g.mul(gamma_b, inv)?;
        let inv2 = g.mul(inv, inv)?;
        let t = g.mul(inv2, sum_gyxc)?;
        let t = g.mul(t, k1)?;
        let k2 = g.mul_scalar(t, -1.0 / n)?;
        let t = g.mul(k1, sum_gy)?;
        let k3 = g.mul_scalar(t, -1.0 / n)?;
        // Three passes over the activations: gy·k1, the per-channel affine xc·k2 + k3, their sum.
        let a = g.mul(gy, k1)?;
        let k2 = g.reshape_to(k2, &[c])?;
        let k3 = g.reshape_to(k3, &[c])?;
        let b = g.channel_affine(xc, k2, k3)?;
        out.push((x, g.add(a, b)?));
    }
    Ok(Some(out))
}
