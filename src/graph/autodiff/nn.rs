//! Gradient rules for MatMul, Gemm, MaxPool (via its `Indices` output and ScatterElements with
//! `reduction="add"`) and GlobalAveragePool.

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
