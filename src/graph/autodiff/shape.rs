//! Gradient rules for reductions and shape ops: ReduceSum/Mean/Max/SumSquare, Reshape, Flatten, Squeeze,
//! Unsqueeze, Transpose, Concat, Split, Slice, Gather, Pad.

use super::{const_ints, no_grad};
use crate::Result;
use crate::graph::ir::{Graph, Node, Value};
use crate::graph::ops::{norm_axes, norm_axis};

pub(super) fn rule(g: &mut Graph, node: &Node, gy: Value, need: &[bool]) -> Result<Vec<Option<Value>>> {
    let x = node.inputs[0];
    let xs = g.shape(x).to_vec();
    let mut out: Vec<Option<Value>> = vec![None; node.inputs.len()];
    out[0] = Some(match node.op {
        "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceSumSquare" => {
            let axes = norm_axes(node.op, &const_ints(g, node, node.inputs[1])?, xs.len())?;
            let kept: Vec<usize> = xs.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
            let gk = g.reshape_to(gy, &kept)?;
            match node.op {
                "ReduceSum" => g.expand(gk, &xs)?,
                "ReduceSumSquare" => {
                    let twice = g.mul_scalar(gk, 2.0)?;
                    g.mul(x, twice)?
                }
                "ReduceMean" => {
                    let count: usize = axes.iter().map(|&a| xs[a]).product();
                    let scaled = g.mul_scalar(gk, 1.0 / count as f64)?;
                    g.expand(scaled, &xs)?
                }
                _ => {
                    // The gradient goes to the maxima, shared equally between ties.
                    let yk = g.reshape_to(node.outputs[0], &kept)?;
                    let hit = g.equal(x, yk)?;
                    let dt = g.dtype(x);
                    let mask = g.cast(hit, dt)?;
                    let count = g.reduce_sum(mask, &axes.iter().map(|&a| a as i64).collect::<Vec<_>>(), true)?;
                    let share = g.div(gk, count)?;
                    g.mul(mask, share)?
                }
            }
        }
        "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => g.reshape_to(gy, &xs)?,
        "Transpose" => {
            let perm = node.attr_ints("perm", &[]);
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p as usize] = i;
            }
            g.transpose(gy, &inv)?
        }
        "Concat" => {
            let axis = node.attr_int("axis", 0);
            let a = norm_axis("Concat", axis, xs.len())?;
            let sizes: Vec<usize> = node.inputs.iter().map(|&v| g.shape(v)[a]).collect();
            let parts = g.split(gy, a as i64, &sizes)?;
            return Ok(parts.into_iter().zip(need).map(|(p, &n)| n.then_some(p)).collect());
        }
        "Slice" => slice(g, node, gy, &xs)?,
        "Gather" => gather(g, node, gy, &xs)?,
        "Pad" => {
            // Constant padding (any fill value, e.g. -inf before a max pool): the input's
            // gradient is the output gradient's centre; the fill value is a constant.
            if node.attr("mode").is_some() || node.inputs.len() > 3 || (need.len() > 2 && need[2]) {
                return Err(no_grad(node, "only constant padding with a constant fill value is differentiated"));
            }
            let pads = const_ints(g, node, node.inputs[1])?;
            let r = xs.len();
            let axes: Vec<i64> = (0..r as i64).collect();
            let starts: Vec<i64> = pads[..r].to_vec();
            let ends: Vec<i64> = (0..r).map(|i| pads[i] + xs[i] as i64).collect();
            g.slice(gy, &axes, &starts, &ends, &[])?
        }
        other => return Err(no_grad(node, &format!("{other} is not a shape op"))),
    });
    Ok(out)
}

/// Split's inputs get the concatenation of its outputs' gradients (zeros where none flows).
pub(super) fn split(g: &mut Graph, node: &Node, gys: &[Option<Value>]) -> Result<Vec<Option<Value>>> {
    let axis = node.attr_int("axis", 0);
    let parts = node
        .outputs
        .iter()
        .zip(gys)
        .map(|(&o, gy)| match gy {
            Some(v) => *v,
            None => {
                let (dt, s) = (g.dtype(o), g.shape(o).to_vec());
                g.zeros(dt, &s)
            }
        })
        .collect::<Vec<_>>();
    let mut out = vec![None; node.inputs.len()];
    out[0] = Some(g.concat(&parts, axis)?);
    Ok(out)
}

/// Slice: scatter the gradient back to its positions; step-1 axes by one zero Pad, strided axes
/// by ScatterElements into zeros.
fn slice(g: &mut Graph, node: &Node, gy: Value, xs: &[usize]) -> Result<Value> {
    let starts = const_ints(g, node, node.inputs[1])?;
    let axes = const_ints(g, node, node.inputs[3])?;
    let steps = const_ints(g, node, node.inputs[4])?;
    let mut cur = gy;
    let mut pads = vec![0usize; 2 * xs.len()];
    for i in 0..axes.len() {
        let a = norm_axis("Slice", axes[i], xs.len())?;
        let len = g.shape(gy)[a];
        let start = starts[i] as usize;
        if steps[i] == 1 {
            pads[a] = start;
            pads[a + xs.len()] = xs[a] - start - len;
            continue;
        }
        // indices start + k*step along axis a, broadcast over the other axes.
        let mut ishape = vec![1usize; xs.len()];
        ishape[a] = len;
        let idx: Vec<i64> = (0..len as i64).map(|k| starts[i] + k * steps[i]).collect();
        let idx = g.cached_constant(crate::graph::Tensor::i64(&ishape, idx)?);
        let cs = g.shape(cur).to_vec();
        let idx = g.expand(idx, &cs)?;
        let mut zs = cs.clone();
        zs[a] = xs[a];
        let dt = g.dtype(cur);
        let z = g.zeros(dt, &zs);
        cur = g.scatter_elements(z, idx, cur, a as i64, false)?;
    }
    if pads.iter().any(|&p| p > 0) { g.pad(cur, &pads) } else { Ok(cur) }
}

/// Gather: scatter-add the gradient rows back to the gathered positions (indices may repeat).
fn gather(g: &mut Graph, node: &Node, gy: Value, xs: &[usize]) -> Result<Value> {
    let a = norm_axis("Gather", node.attr_int("axis", 0), xs.len())?;
    let idx = node.inputs[1];
    let m: usize = g.shape(idx).iter().product();
    let mut flat = xs.to_vec();
    flat[a] = m;
    let g2 = g.reshape_to(gy, &flat)?;
    let mut ishape = vec![1usize; xs.len()];
    ishape[a] = m;
    let i2 = g.reshape_to(idx, &ishape)?;
    let i2 = g.expand(i2, &flat)?;
    let dt = g.dtype(gy);
    let z = g.zeros(dt, xs);
    g.scatter_elements(z, i2, g2, a as i64, true)
}
