//! Gradient rules for MatMul, Gemm, MaxPool (via its `Indices` output and ScatterElements with
//! `reduction="add"`), GlobalAveragePool and BatchNormalization in inference form.

use super::{no_grad, unbroadcast};
use crate::Result;
use crate::graph::ir::{DType, Graph, Node, Value};
use crate::graph::nn::Gemm;

pub(super) fn rule(g: &mut Graph, idx: usize, node: &Node, gy: Value, need: &[bool]) -> Result<Vec<Option<Value>>> {
    let want = |i: usize| need.get(i).copied().unwrap_or(false);
    match node.op {
        "MatMul" => matmul(g, node, gy, want(0), want(1)),
        "Gemm" => gemm(g, node, gy, need),
        "MaxPool" => {
            if node.attr_int("ceil_mode", 0) != 0
                || node.attr_int("storage_order", 0) != 0
                || node.attr("dilations").is_some()
            {
                return Err(no_grad(node, "only floor mode, row-major indices and no dilation are differentiated"));
            }
            let x = node.inputs[0];
            let ys = g.shape(node.outputs[0]).to_vec();
            let indices = match node.outputs.get(1) {
                Some(&i) => i,
                None => g.add_node_output(idx, DType::I64, ys),
            };
            // Indices are positions in the flattened input (batch and channel included).
            let xs = g.shape(x).to_vec();
            let n: usize = xs.iter().product();
            let flat_i = g.reshape(indices, &[-1])?;
            let flat_g = g.reshape(gy, &[-1])?;
            let dt = g.dtype(gy);
            let z = g.zeros(dt, &[n]);
            let s = g.scatter_elements(z, flat_i, flat_g, 0, true)?;
            Ok(vec![Some(g.reshape_to(s, &xs)?)])
        }
        "BatchNormalization" => batch_norm(g, node, gy, need),
        "GlobalAveragePool" => {
            let xs = g.shape(node.inputs[0]).to_vec();
            let area: usize = xs[2..].iter().product();
            let scaled = g.mul_scalar(gy, 1.0 / area as f64)?;
            Ok(vec![Some(g.expand(scaled, &xs)?)])
        }
        other => Err(no_grad(node, &format!("{other} is not handled here"))),
    }
}

/// `y = a @ b` over the last two dims: `ga = gy @ bᵀ`, `gb = aᵀ @ gy`, batch dims summed back.
/// 2-D operands use Gemm's transpose flags instead of Transpose nodes.
fn matmul(g: &mut Graph, node: &Node, gy: Value, want_a: bool, want_b: bool) -> Result<Vec<Option<Value>>> {
    let (a, b) = (node.inputs[0], node.inputs[1]);
    let (sa, sb) = (g.shape(a).to_vec(), g.shape(b).to_vec());
    let two_d = sa.len() == 2 && sb.len() == 2;
    let t = |g: &mut Graph, v: Value| {
        let r = g.shape(v).len();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        g.transpose(v, &perm)
    };
    let ga = if !want_a {
        None
    } else if two_d {
        Some(g.gemm(gy, b, None, Gemm { trans_b: true, ..Gemm::default() })?)
    } else {
        let bt = t(g, b)?;
        let full = g.matmul(gy, bt)?;
        Some(unbroadcast(g, full, &sa)?)
    };
    let gb = if !want_b {
        None
    } else if two_d {
        Some(g.gemm(a, gy, None, Gemm { trans_a: true, ..Gemm::default() })?)
    } else {
        let at = t(g, a)?;
        let full = g.matmul(at, gy)?;
        Some(unbroadcast(g, full, &sb)?)
    };
    Ok(vec![ga, gb])
}

/// `y = alpha op(a) op(b) + beta c`.
fn gemm(g: &mut Graph, node: &Node, gy: Value, need: &[bool]) -> Result<Vec<Option<Value>>> {
    let (a, b) = (node.inputs[0], node.inputs[1]);
    let alpha = node.attr_float("alpha", 1.0);
    let beta = node.attr_float("beta", 1.0);
    let ta = node.attr_int("transA", 0) != 0;
    let tb = node.attr_int("transB", 0) != 0;
    let gm = |trans_a: bool, trans_b: bool| Gemm { alpha, beta: 0.0, trans_a, trans_b };
    let mut out = vec![None; node.inputs.len()];
    if need[0] {
        // op(a) gradient = alpha gy op(b)ᵀ; transposed back when a was transposed.
        out[0] = Some(if !ta { g.gemm(gy, b, None, gm(false, !tb))? } else { g.gemm(b, gy, None, gm(tb, true))? });
    }
    if need[1] {
        out[1] = Some(if !tb { g.gemm(a, gy, None, gm(!ta, false))? } else { g.gemm(gy, a, None, gm(true, ta))? });
    }
    if node.inputs.len() > 2 && need[2] {
        let c = node.inputs[2];
        let cs = g.shape(c).to_vec();
        let s = if beta == 1.0 { gy } else { g.mul_scalar(gy, beta as f64)? };
        out[2] = Some(unbroadcast(g, s, &cs)?);
    }
    Ok(out)
}

/// What both BatchNormalization rules start from: `x`'s shape, the `[1, C, 1, ..]` shape that
/// broadcasts a per-channel value, the axes to sum over for one, and `1 / sqrt(var + epsilon)`.
struct Channels {
    xs: Vec<usize>,
    bshape: Vec<usize>,
    axes: Vec<i64>,
    inv: Value,
}

fn channels(g: &mut Graph, node: &Node, x: Value, var: Value) -> Result<Channels> {
    let xs = g.shape(x).to_vec();
    let mut bshape = vec![1usize; xs.len()];
    bshape[1] = xs[1];
    let axes: Vec<i64> = (0..xs.len() as i64).filter(|&a| a != 1).collect();
    let ve = g.add_scalar(var, node.attr_float("epsilon", 1e-5) as f64)?;
    let sd = g.sqrt(ve)?;
    let inv = g.reciprocal(sd)?; // [C]
    Ok(Channels { xs, bshape, axes, inv })
}

/// `y = (x - mean) · k + B` per channel with `k = scale / sqrt(var + eps)` (inference form; the
/// statistics are inputs, so they may themselves depend on `x`, as in the training composite's
/// op-by-op fallback): `gx = gy · k`, `gB = Σ gy`, `gscale = Σ gy · (x - mean) / sqrt(var + eps)`,
/// `gmean = -k · Σ gy`, `gvar = -scale / 2 · (var + eps)^-3/2 · Σ gy · (x - mean)`.
fn batch_norm(g: &mut Graph, node: &Node, gy: Value, need: &[bool]) -> Result<Vec<Option<Value>>> {
    if node.attr_int("training_mode", 0) != 0 || node.outputs.len() != 1 {
        return Err(no_grad(node, "only the inference form (one output, training_mode 0) is differentiated"));
    }
    let want = |i: usize| need.get(i).copied().unwrap_or(false);
    let (x, scale, mean, var) = (node.inputs[0], node.inputs[1], node.inputs[3], node.inputs[4]);
    let Channels { bshape, axes, inv, .. } = channels(g, node, x, var)?;
    let k = g.mul(scale, inv)?;
    let mut out = vec![None; node.inputs.len()];
    if want(0) {
        let kb = g.reshape_to(k, &bshape)?;
        out[0] = Some(g.mul(gy, kb)?);
    }
    let sum_gy = if want(2) || want(3) { Some(g.reduce_sum(gy, &axes, false)?) } else { None };
    if want(2) {
        out[2] = sum_gy;
    }
    if want(3) {
        let t = g.mul(sum_gy.expect("computed when wanted"), k)?;
        out[3] = Some(g.neg(t)?);
    }
    if want(1) || want(4) {
        let mb = g.reshape_to(mean, &bshape)?;
        let xc = g.sub(x, mb)?;
        let gxc = g.mul(gy, xc)?;
        let sum_gxc = g.reduce_sum(gxc, &axes, false)?; // [C]
        if want(1) {
            out[1] = Some(g.mul(sum_gxc, inv)?);
        }
        if want(4) {
            let inv2 = g.mul(inv, inv)?;
            let inv3 = g.mul(inv2, inv)?;
            let t = g.mul(sum_gxc, scale)?;
            let t = g.mul(t, inv3)?;
            out[4] = Some(g.mul_scalar(t, -0.5)?);
        }
    }
    Ok(out)
}

/// `BatchNormalization` in training mode: outputs `y = (x - μ) · inv · γ + β`, and the running
/// statistics `m·input_mean + (1 - m)·μ` and `m·input_var + (1 - m)·σ²` (`μ`, biased `σ²` over
/// all axes but the channels, `inv = 1 / sqrt(σ² + eps)`). With `xc = x - μ`, `n` elements per
/// channel, `gμ = (1 - m)·g_mean` and `gσ² = (1 - m)·g_var`:
/// `gx = k1·gy + k2·xc + k3` with `k1 = γ·inv`, `k2 = -k1·inv²·Σ gy·xc / n + 2·gσ² / n` and
/// `k3 = -k1·Σ gy / n + gμ / n`; `gγ = inv·Σ gy·xc`, `gβ = Σ gy`. `Σ gy·xc` is taken as
/// `Σ gy·x - μ·Σ gy`, and `k2·xc + k3` as one per-channel affine of `x`, so the activations are
/// read by two reductions and written once.
pub(super) fn batch_norm_train(
    g: &mut Graph,
    node: &Node,
    gys: &[Option<Value>],
    need: &[bool],
) -> Result<Vec<Option<Value>>> {
    let want = |i: usize| need.get(i).copied().unwrap_or(false);
    if node.outputs.len() != 3 {
        return Err(no_grad(node, "training mode is differentiated with its three outputs"));
    }
    let (x, gamma) = (node.inputs[0], node.inputs[1]);
    let (mean, var) = (node.outputs[1], node.outputs[2]);
    let Channels { xs, bshape, axes, inv } = channels(g, node, x, var)?;
    let n = (xs.iter().product::<usize>() / xs[1]) as f64;
    let m = node.attr_float("momentum", 0.9) as f64;
    let mut out = vec![None; node.inputs.len()];
    // The input statistics only pass through the momentum blend.
    for (i, gout) in [(3, gys[1]), (4, gys[2])] {
        if let Some(gv) = gout.filter(|_| want(i) && m != 0.0) {
            out[i] = Some(g.mul_scalar(gv, m)?);
        }
    }
    // Per-channel coefficients of x's gradient: k2 (multiplies xc) and k3.
    let mut k2: Option<Value> = None;
    let mut k3: Option<Value> = None;
    let acc = |g: &mut Graph, a: Option<Value>, b: Value| -> Result<Value> {
        match a {
            Some(a) => g.add(a, b),
            None => Ok(b),
        }
    };
    let mut k1 = None;
    if let Some(gy) = gys[0] {
        let sum_gy = g.reduce_sum(gy, &axes, false)?; // [C]
        let gx_ = g.mul(gy, x)?;
        let sum_gyx = g.reduce_sum(gx_, &axes, false)?;
        let t = g.mul(mean, sum_gy)?;
        let sum_gyxc = g.sub(sum_gyx, t)?;
        if want(2) {
            out[2] = Some(sum_gy);
        }
        if want(1) {
            out[1] = Some(g.mul(sum_gyxc, inv)?);
        }
        if want(0) {
            let kk = g.mul(gamma, inv)?;
            let inv2 = g.mul(inv, inv)?;
            let t = g.mul(inv2, sum_gyxc)?;
            let t = g.mul(t, kk)?;
            k2 = Some(g.mul_scalar(t, -1.0 / n)?);
            let t = g.mul(kk, sum_gy)?;
            k3 = Some(g.mul_scalar(t, -1.0 / n)?);
            k1 = Some(kk);
        }
    }
    if want(0) {
        if let Some(gm) = gys[1] {
            let t = g.mul_scalar(gm, (1.0 - m) / n)?;
            k3 = Some(acc(g, k3, t)?);
        }
        if let Some(gv) = gys[2] {
            let t = g.mul_scalar(gv, 2.0 * (1.0 - m) / n)?;
            k2 = Some(acc(g, k2, t)?);
        }
        let mut parts = Vec::new();
        if let (Some(k1), Some(gy)) = (k1, gys[0]) {
            let kb = g.reshape_to(k1, &bshape)?;
            parts.push(g.mul(gy, kb)?);
        }
        if let Some(k2) = k2 {
            // k2·(x - μ) + k3 = k2·x + (k3 - k2·μ), one per-channel affine.
            let t = g.mul(k2, mean)?;
            let bias = match k3 {
                Some(k3) => g.sub(k3, t)?,
                None => g.neg(t)?,
            };
            parts.push(g.channel_affine(x, k2, bias)?);
        } else if let Some(k3) = k3 {
            let kb = g.reshape_to(k3, &bshape)?;
            parts.push(g.expand(kb, &xs)?);
        }
        out[0] = Some(match parts.len() {
            0 => return Err(no_grad(node, "no output has a gradient")),
            1 => parts[0],
            _ => g.add(parts[0], parts[1])?,
        });
    }
    Ok(out)
}
