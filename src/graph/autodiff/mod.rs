//! Reverse-mode autodiff over the graph IR: appends the backward nodes (standard ONNX ops only)
//! for `d loss / d wrt`, one rule per op, skipping everything that does not depend on `wrt`.
//!
//! Only float values carry gradients: integer and bool paths (labels, masks, indices) are never
//! differentiated. A value that does not depend on any `wrt` gets no gradient work, and a `wrt`
//! the loss does not depend on gets a zero gradient. Rules live in `elementwise` (arithmetic,
//! activations, Where, Max/Min), `shape` (reductions, reshapes, Concat/Split, Slice, Gather, Pad)
//! and `nn` (MatMul, Gemm, Conv, MaxPool, GlobalAveragePool, BatchNormalization in inference form). BatchNorm in training mode is
//! composed from those ops; `composite` gives it the closed-form gradient (fewer passes over
//! the activations), and the op-by-op rules remain the fallback.

mod composite;
mod conv;
mod elementwise;
mod nn;
mod shape;

use std::collections::HashMap;

pub use conv::{ConvGradChoice, conv_weight_rule};

use super::ir::{ConvWeightGrad, DType, Graph, Node, Tensor, Value};
use crate::{Error, Result};

/// How a training step is lowered: options for [`grad_with`] and for the model builders that
/// compile a step (`model::step_graph`).
#[derive(Debug, Clone, Copy, Default)]
pub struct GradOptions {
    /// Weight-gradient lowering for convolutions built with [`ConvWeightGrad::Auto`];
    /// `Auto` here applies the measured rule of [`conv_weight_rule`].
    pub conv_weight: ConvWeightGrad,
    /// Training-mode BatchNorm in model step graphs.
    pub batch_norm: BatchNormLowering,
    /// CPU sessions of model step graphs (`train::TrainSession`): write dense convolutions on
    /// ORT's blocked NCHWc kernels ([`crate::graph::nchwc`]). Not standard ONNX, so off by
    /// default; ignored on CUDA.
    pub cpu_nchwc: bool,
    /// Trained depthwise convolutions in model step graphs.
    pub depthwise: DepthwiseLowering,
}

/// How a model step graph writes a trained depthwise convolution.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DepthwiseLowering {
    /// Dense per-channel spatial matrices ([`Graph::depthwise_dense`]) on maps of at most
    /// [`crate::graph::DENSE_DEPTHWISE_MAX_PIXELS`] pixels, the grouped Conv above.
    #[default]
    Auto,
    /// Always the grouped Conv node.
    Conv,
}

/// How a model step graph computes training-mode BatchNorm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BatchNormLowering {
    /// One `BatchNormalization` node with `training_mode = 1`
    /// ([`Graph::batch_norm_train_fused`]): one kernel for the statistics and the
    /// normalisation. ORT's CPU provider runs it; its CUDA provider does not (opset 14 and later).
    #[default]
    Fused,
    /// Composed from ReduceMean / Sub / Mul / Sqrt / Reciprocal and an inference-form
    /// `BatchNormalization` ([`Graph::batch_norm_train`]): runs on every provider.
    Composed,
}

impl GradOptions {
    /// The lowering for sessions made with `rt`: on CUDA, BatchNorm composed from basic ops;
    /// NCHWc convolutions when `rt` asks for them.
    pub fn for_runtime(rt: &crate::runtime::RuntimeOptions) -> GradOptions {
        let batch_norm = match rt.device {
            crate::runtime::Device::Cpu => BatchNormLowering::Fused,
            crate::runtime::Device::Cuda => BatchNormLowering::Composed,
        };
        GradOptions { batch_norm, cpu_nchwc: rt.cpu_nchwc, ..GradOptions::default() }
    }
}

/// What [`grad_with`] decided while building the backward graph.
#[derive(Debug, Clone, Default)]
pub struct GradReport {
    /// One entry per convolution whose weight gradient was built.
    pub convs: Vec<ConvGradChoice>,
}

/// Gradients of `loss` (a float value with one element) with respect to each of `wrt`, in
/// order, appended to `g` as new nodes.
pub fn grad(g: &mut Graph, loss: Value, wrt: &[Value]) -> Result<Vec<Value>> {
    Ok(grad_with(g, loss, wrt, &GradOptions::default())?.0)
}

/// [`grad`] with options; also returns the report of per-layer choices.
pub fn grad_with(g: &mut Graph, loss: Value, wrt: &[Value], opts: &GradOptions) -> Result<(Vec<Value>, GradReport)> {
    let li = g.info(loss);
    if !li.dtype.is_float() || li.numel() != 1 {
        return Err(Error::GraphNoGradient {
            op: "loss".into(),
            reason: format!("`{}` is {}{:?}; the loss must be one float element", li.name, li.dtype, li.shape),
        });
    }
    if let Some(&w) = wrt.iter().find(|&&w| !g.dtype(w).is_float()) {
        return Err(Error::GraphNoGradient {
            op: "wrt".into(),
            reason: format!("`{}` is {}, only float values have gradients", g.name(w), g.dtype(w)),
        });
    }
    let n_fwd = g.nodes.len();

    // Forward: which values depend on some `wrt` through float paths.
    let mut requires = vec![false; g.values.len()];
    for &w in wrt {
        requires[w.index()] = true;
    }
    for node in &g.nodes[..n_fwd] {
        if node.inputs.iter().any(|v| requires[v.index()]) {
            for &o in &node.outputs {
                requires[o.index()] = g.dtype(o).is_float();
            }
        }
    }
    // Backward: which of those the loss depends on.
    let mut needed = vec![false; g.values.len()];
    needed[loss.index()] = requires[loss.index()];
    for node in g.nodes[..n_fwd].iter().rev() {
        if node.outputs.iter().any(|o| needed[o.index()]) {
            for &i in &node.inputs {
                needed[i.index()] |= requires[i.index()];
            }
        }
    }

    let mut ctx = Ctx { opts: *opts, report: GradReport::default() };
    let mut contrib: HashMap<Value, Vec<Value>> = HashMap::new();
    let seed_shape = g.shape(loss).to_vec();
    let seed = g.cached_constant(Tensor::full(g.dtype(loss), &seed_shape, 1.0));
    contrib.insert(loss, vec![seed]);

    // Composites whose last node is at a given index.
    let composites: HashMap<usize, usize> =
        g.composites.iter().enumerate().filter(|(_, c)| c.last < n_fwd).map(|(i, c)| (c.last, i)).collect();
    let mut idx = n_fwd;
    while idx > 0 {
        idx -= 1;
        if let Some(&ci) = composites.get(&idx) {
            let comp = g.composites[ci].clone();
            if let Some(grads) = composite::rule(g, &comp, &mut contrib, &needed)? {
                for (x, gx) in grads {
                    check_grad(g, "BatchNorm", x, gx)?;
                    contrib.entry(x).or_default().push(gx);
                }
                idx = comp.first;
                continue;
            }
        }
        let outs = g.nodes[idx].outputs.clone();
        if !outs.iter().any(|o| needed[o.index()] && contrib.contains_key(o)) {
            continue;
        }
        let gys = outs
            .iter()
            .map(|o| match contrib.remove(o) {
                Some(parts) => g.sum(&parts).map(Some),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let node = g.nodes[idx].clone();
        let need: Vec<bool> = node.inputs.iter().map(|i| needed[i.index()]).collect();
        let gxs = rule(g, idx, &node, &gys, &need, &mut ctx)?;
        for ((&x, gx), &nd) in node.inputs.iter().zip(gxs).zip(&need) {
            let Some(gx) = gx.filter(|_| nd) else { continue };
            check_grad(g, node.op, x, gx)?;
            contrib.entry(x).or_default().push(gx);
        }
    }

    let grads = wrt
        .iter()
        .map(|&w| match contrib.get(&w) {
            Some(parts) => g.sum(parts),
            None => {
                let (dt, s) = (g.dtype(w), g.shape(w).to_vec());
                Ok(g.zeros(dt, &s))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((grads, ctx.report))
}

/// A rule's gradient must have its input's type and shape.
fn check_grad(g: &Graph, op: &str, x: Value, gx: Value) -> Result<()> {
    if g.shape(gx) != g.shape(x) || g.dtype(gx) != g.dtype(x) {
        return Err(Error::GraphInvalid {
            reason: format!(
                "gradient rule for {op} gave {}{:?} for input `{}` of {}{:?}",
                g.dtype(gx),
                g.shape(gx),
                g.name(x),
                g.dtype(x),
                g.shape(x)
            ),
        });
    }
    Ok(())
}

pub(crate) struct Ctx {
    pub opts: GradOptions,
    pub report: GradReport,
}

/// The gradients of a node's inputs given its outputs' gradients (`None`: no gradient flows).
/// `need[i]` says whether input `i` wants one; rules may skip work for the others.
fn rule(
    g: &mut Graph,
    idx: usize,
    node: &Node,
    gys: &[Option<Value>],
    need: &[bool],
    ctx: &mut Ctx,
) -> Result<Vec<Option<Value>>> {
    let gy = || gys[0].ok_or_else(|| no_grad(node, "the first output has no gradient"));
    match node.op {
        "Add" | "Sub" | "Mul" | "Div" | "Neg" | "Relu" | "Clip" | "Sigmoid" | "Exp" | "Log" | "Sqrt" | "Reciprocal"
        | "Pow" | "Max" | "Min" | "Where" | "Sum" | "Identity" | "Cast" | "Expand" => {
            elementwise::rule(g, node, gy()?, need)
        }
        "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceSumSquare" | "Reshape" | "Flatten" | "Squeeze"
        | "Unsqueeze" | "Transpose" | "Concat" | "Slice" | "Gather" | "Pad" => shape::rule(g, node, gy()?, need),
        "Split" => shape::split(g, node, gys),
        "BatchNormalization" if node.attr_int("training_mode", 0) != 0 => nn::batch_norm_train(g, node, gys, need),
        "MatMul" | "Gemm" | "MaxPool" | "GlobalAveragePool" | "BatchNormalization" => {
            nn::rule(g, idx, node, gy()?, need)
        }
        "Conv" => conv::rule(g, node, gy()?, need, ctx),
        other => Err(no_grad(node, &format!("{other} has no gradient rule"))),
    }
}

pub(crate) fn no_grad(node: &Node, reason: &str) -> Error {
    Error::GraphNoGradient { op: node.op.to_string(), reason: reason.to_string() }
}

/// Sums `gx` (shaped like the broadcast result) back to `target`'s shape.
pub(crate) fn unbroadcast(g: &mut Graph, gx: Value, target: &[usize]) -> Result<Value> {
    let s = g.shape(gx).to_vec();
    if s == target {
        return Ok(gx);
    }
    let lead = s.len() - target.len();
    let axes: Vec<i64> =
        (0..s.len()).filter(|&i| i < lead || (target[i - lead] == 1 && s[i] != 1)).map(|i| i as i64).collect();
    let r = if axes.is_empty() { gx } else { g.reduce_sum(gx, &axes, true)? };
    g.reshape_to(r, target)
}

/// The i64 data of a constant input (axes, shapes, slice bounds).
pub(crate) fn const_ints(g: &Graph, node: &Node, v: Value) -> Result<Vec<i64>> {
    match g.const_value(v) {
        Some(t) if t.dtype() == DType::I64 => Ok(t.as_i64().expect("checked dtype").iter().copied().collect()),
        _ => Err(no_grad(node, &format!("input `{}` must be an i64 constant", g.name(v)))),
    }
}

#[cfg(test)]
mod tests;
