//! The graph side of `hiercon model quantize`: BatchNorm and SAME-padding folds, the plan of
//! which nodes run in int8 and which activations get a Q/DQ pair, and the rewrite into QDQ form
//! with int8 per-channel weights, int32 biases and uint8 activations (see the parent module).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use ndarray::{ArrayD, Axis};

use crate::Result;
use crate::graph::import::{dtype, import_err, read_tensor};
use crate::graph::onnx::attribute;
use crate::graph::proto::{GraphProto, NodeProto, TensorProto, TypeProto, ValueInfoProto, type_proto};
use crate::graph::{Attr, Tensor};

// ---------------------------------------------------------------------------------------------
// Small protobuf helpers.

fn node_attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name)).and_then(|a| a.i).unwrap_or(default)
}

fn node_attr_f(n: &NodeProto, name: &str, default: f32) -> f32 {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name)).and_then(|a| a.f).unwrap_or(default)
}

pub(super) fn op(n: &NodeProto) -> &str {
    n.op_type.as_deref().unwrap_or("")
}

fn raw_tensor(name: &str, dims: &[usize], data_type: i32, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(data_type),
        raw_data: Some(raw),
        ..Default::default()
    }
}

fn f32_tensor(name: &str, dims: &[usize], v: &[f32]) -> TensorProto {
    raw_tensor(name, dims, dtype::FLOAT, v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

fn qdq_node(op: &str, name: &str, inputs: [&str; 3], output: &str, axis: Option<i64>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: axis.map(|a| vec![attribute("axis", &Attr::Int(a))]).unwrap_or_default(),
        ..Default::default()
    }
}

pub(super) fn float_output(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(dtype::FLOAT),
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The graph's constant float tensors by name (initializers).
struct Consts<'a> {
    by_name: HashMap<&'a str, &'a TensorProto>,
    dir: &'a Path,
}

impl<'a> Consts<'a> {
    fn new(g: &'a GraphProto, dir: &'a Path) -> Self {
        Consts { by_name: g.initializer.iter().map(|t| (t.name.as_deref().unwrap_or(""), t)).collect(), dir }
    }

    fn has(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    fn f32(&self, name: &str) -> Option<ArrayD<f32>> {
        match read_tensor(self.by_name.get(name)?, self.dir).ok()? {
            Tensor::F32(a) => Some(a),
            _ => None,
        }
    }
}

pub(super) fn consumers(g: &GraphProto) -> HashMap<String, Vec<usize>> {
    let mut m: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        for x in n.input.iter().filter(|x| !x.is_empty()) {
            m.entry(x.clone()).or_default().push(i);
        }
    }
    m
}

fn graph_outputs(g: &GraphProto) -> HashSet<String> {
    g.output.iter().filter_map(|v| v.name.clone()).collect()
}

/// Drops initializers no node reads any more (and their graph-input entries, in old files).
fn prune_initializers(g: &mut GraphProto) {
    let used: HashSet<String> = g.node.iter().flat_map(|n| n.input.iter().cloned()).collect();
    let dropped: HashSet<String> =
        g.initializer.iter().filter_map(|t| t.name.clone()).filter(|n| !used.contains(n)).collect();
    g.initializer.retain(|t| !dropped.contains(t.name.as_deref().unwrap_or("")));
    g.input.retain(|v| !dropped.contains(v.name.as_deref().unwrap_or("")));
}

/// Removes the nodes at the indices in `dead`, then the initializers only they read.
fn remove_nodes(g: &mut GraphProto, dead: &HashSet<usize>) {
    let mut i = 0;
    g.node.retain(|_| {
        i += 1;
        !dead.contains(&(i - 1))
    });
    prune_initializers(g);
}

// ---------------------------------------------------------------------------------------------
// 1. Fold BatchNormalization into the Conv before it.

/// Folds every BatchNormalization that is the only use of a Conv's output (constant weights and
/// statistics) into the Conv; returns how many.
pub(super) fn fold_batchnorms(g: &mut GraphProto, dir: &Path) -> usize {
    let uses = consumers(g);
    let outputs = graph_outputs(g);
    let producer: HashMap<&str, usize> =
        g.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i))).collect();
    let consts = Consts::new(g, dir);
    // (conv index, bn index, folded weight, folded bias)
    let mut folds: Vec<(usize, usize, TensorProto, TensorProto)> = Vec::new();
    for (bi, bn) in g.node.iter().enumerate() {
        if op(bn) != "BatchNormalization" || bn.input.len() != 5 || bn.output.len() != 1 {
            continue;
        }
        if node_attr_i(bn, "training_mode", 0) != 0 {
            continue;
        }
        let x = bn.input[0].as_str();
        let Some(&ci) = producer.get(x) else { continue };
        let conv = &g.node[ci];
        if op(conv) != "Conv" || uses.get(x).map(Vec::len) != Some(1) || outputs.contains(x) {
            continue;
        }
        let Some(w) = conv.input.get(1).and_then(|n| consts.f32(n)) else { continue };
        let bias = match conv.input.get(2).filter(|n| !n.is_empty()) {
            Some(n) => match consts.f32(n) {
                Some(b) => Some(b),
                None => continue,
            },
            None => None,
        };
        let stats: Option<Vec<ArrayD<f32>>> = bn.input[1..5].iter().map(|n| consts.f32(n)).collect();
        let Some(stats) = stats else { continue };
        let m = w.shape()[0];
        if stats.iter().any(|s| s.len() != m) || bias.as_ref().is_some_and(|b| b.len() != m) {
            continue;
        }
        let eps = node_attr_f(bn, "epsilon", 1e-5) as f64;
        let lane = |a: &ArrayD<f32>| a.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let (scale, shift, mean, var) = (lane(&stats[0]), lane(&stats[1]), lane(&stats[2]), lane(&stats[3]));
        let b0 = bias.as_ref().map(lane).unwrap_or_else(|| vec![0.0; m]);
        let per = w.len() / m.max(1);
        let mut new_w: Vec<f32> = w.iter().copied().collect();
        let mut new_b = vec![0f32; m];
        for c in 0..m {
            let f = scale[c] / (var[c] + eps).sqrt();
            for v in &mut new_w[c * per..(c + 1) * per] {
                *v = (*v as f64 * f) as f32;
            }
            new_b[c] = ((b0[c] - mean[c]) * f + shift[c]) as f32;
        }
        let out = &bn.output[0];
        folds.push((
            ci,
            bi,
            f32_tensor(&format!("{out}/folded_weight"), w.shape(), &new_w),
            f32_tensor(&format!("{out}/folded_bias"), &[m], &new_b),
        ));
    }
    let n = folds.len();
    let mut dead = HashSet::new();
    for (ci, bi, wt, bt) in folds {
        let out = g.node[bi].output[0].clone();
        let conv = &mut g.node[ci];
        conv.input.resize(3, String::new());
        conv.input[1] = wt.name.clone().unwrap_or_default();
        conv.input[2] = bt.name.clone().unwrap_or_default();
        conv.output[0] = out;
        g.initializer.push(wt);
        g.initializer.push(bt);
        dead.insert(bi);
    }
    remove_nodes(g, &dead);
    n
}

/// Folds every zero Pad of the spatial axes whose output only feeds Convs (as their data input)
/// into those Convs' `pads` (TF-style SAME padding is written as Pad + Conv): one Q/DQ pair and
/// one copy of the tensor fewer. Returns how many.
pub(super) fn fold_pads(g: &mut GraphProto, dir: &Path) -> usize {
    let uses = consumers(g);
    let outputs = graph_outputs(g);
    let mut folds: Vec<(usize, Vec<usize>, Vec<i64>)> = Vec::new();
    {
        let consts = Consts::new(g, dir);
        for (pi, n) in g.node.iter().enumerate() {
            if op(n) != "Pad" || n.input.len() < 2 || n.output.len() != 1 || outputs.contains(&n.output[0]) {
                continue;
            }
            let constant_mode =
                n.attribute.iter().all(|a| a.name.as_deref() != Some("mode") || a.s.as_deref() == Some(b"constant"));
            let zero_fill = n
                .input
                .get(2)
                .is_none_or(|v| v.is_empty() || consts.f32(v).is_some_and(|c| c.iter().all(|&x| x == 0.0)));
            let pads = consts.by_name.get(n.input[1].as_str()).and_then(|t| read_tensor(t, dir).ok());
            let Some(Tensor::I64(pads)) = pads else { continue };
            let pads: Vec<i64> = pads.iter().copied().collect();
            // [n0, c0, h0, w0, n1, c1, h1, w1] with nothing on the batch and channel axes.
            if !constant_mode
                || !zero_fill
                || n.input.get(3).is_some_and(|a| !a.is_empty())
                || pads.len() != 8
                || pads[0] != 0
                || pads[1] != 0
                || pads[4] != 0
                || pads[5] != 0
                || pads.iter().any(|&p| p < 0)
            {
                continue;
            }
            let Some(users) = uses.get(&n.output[0]) else { continue };
            let all_convs = users.iter().all(|&j| {
                let c = &g.node[j];
                op(c) == "Conv"
                    && c.input[0] == n.output[0]
                    && !c.input[1..].contains(&n.output[0])
                    && c.attribute.iter().all(|a| {
                        a.name.as_deref() != Some("auto_pad") || matches!(a.s.as_deref(), None | Some(b"NOTSET"))
                    })
            });
            if all_convs {
                folds.push((pi, users.clone(), vec![pads[2], pads[3], pads[6], pads[7]]));
            }
        }
    }
    let n = folds.len();
    let mut dead = HashSet::new();
    for (pi, users, extra) in folds {
        let src = g.node[pi].input[0].clone();
        for j in users {
            let c = &mut g.node[j];
            c.input[0] = src.clone();
            match c.attribute.iter_mut().find(|a| a.name.as_deref() == Some("pads")) {
                Some(a) => {
                    if a.ints.len() != 4 {
                        a.ints = vec![0; 4];
                    }
                    for (p, e) in a.ints.iter_mut().zip(&extra) {
                        *p += e;
                    }
                }
                None => c.attribute.push(attribute("pads", &Attr::Ints(extra.clone()))),
            }
        }
        dead.insert(pi);
    }
    remove_nodes(g, &dead);
    n
}

// ---------------------------------------------------------------------------------------------
// 2. Plan: which nodes run in int8 and which activations get a Q/DQ pair.

/// A node whose weight is quantised.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub(super) node: usize,
    /// Input index of the weight and its per-channel axis.
    weight: usize,
    axis: i64,
    /// Input index of a bias quantised at `x_scale · w_scale`, if any.
    bias: Option<usize>,
}

#[derive(Debug, Clone, Default)]
pub(super) struct Plan {
    pub(super) targets: Vec<Target>,
    /// Activations in graph order of their producer (graph inputs first).
    pub(super) tensors: Vec<String>,
    pub(super) kept_float: Vec<String>,
}

pub(super) fn plan(g: &GraphProto, dir: &Path, keep_float: &[String]) -> Plan {
    let consts = Consts::new(g, dir);
    let uses = consumers(g);
    let outputs = graph_outputs(g);
    let keep = |n: &NodeProto| {
        keep_float.iter().any(|k| n.name.as_deref() == Some(k.as_str()) || n.output.iter().any(|o| o == k))
    };
    let mut p = Plan::default();
    let mut chosen: HashSet<String> = HashSet::new();
    let add = |t: &str, p: &mut Plan, chosen: &mut HashSet<String>| {
        if !t.is_empty() && !outputs.contains(t) && !consts.has(t) && chosen.insert(t.to_string()) {
            p.tensors.push(t.to_string());
        }
    };
    for (i, n) in g.node.iter().enumerate() {
        let rank = |k: usize| n.input.get(k).and_then(|w| consts.f32(w)).map(|a| a.ndim());
        let target = match op(n) {
            "Conv" if rank(1).is_some_and(|r| r >= 3) => {
                let bias = n.input.get(2).filter(|b| !b.is_empty() && rank(2) == Some(1)).map(|_| 2);
                if n.input.get(2).is_some_and(|b| !b.is_empty()) && bias.is_none() {
                    None
                } else {
                    Some(Target { node: i, weight: 1, axis: 0, bias })
                }
            }
            "Gemm"
                if rank(1) == Some(2)
                    && node_attr_i(n, "transA", 0) == 0
                    && node_attr_f(n, "alpha", 1.0) == 1.0
                    && node_attr_f(n, "beta", 1.0) == 1.0 =>
            {
                let axis = if node_attr_i(n, "transB", 0) == 1 { 0 } else { 1 };
                let n_out = n.input.get(1).and_then(|w| consts.f32(w)).map(|w| w.shape()[axis as usize]).unwrap_or(0);
                let bias = n
                    .input
                    .get(2)
                    .filter(|c| !c.is_empty())
                    .and_then(|c| consts.f32(c))
                    .filter(|c| c.ndim() == 1 && c.len() == n_out)
                    .map(|_| 2);
                Some(Target { node: i, weight: 1, axis, bias })
            }
            "MatMul" if rank(1) == Some(2) && !consts.has(&n.input[0]) => {
                Some(Target { node: i, weight: 1, axis: 1, bias: None })
            }
            _ => None,
        };
        let Some(t) = target else { continue };
        if keep(n) {
            p.kept_float.push(n.name.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| n.output[0].clone()));
            continue;
        }
        add(&n.input[0], &mut p, &mut chosen);
        let o = &n.output[0];
        let after = match uses.get(o).map(Vec::as_slice) {
            Some([j]) if matches!(op(&g.node[*j]), "Relu" | "Clip") && !keep(&g.node[*j]) => &g.node[*j].output[0],
            _ => o,
        };
        add(after, &mut p, &mut chosen);
        p.targets.push(t);
    }
    // Residual adds of two quantised values run as QLinearAdd when their output is quantised.
    for n in &g.node {
        if op(n) == "Add" && n.input.len() == 2 && n.input.iter().all(|x| chosen.contains(x)) && !keep(n) {
            add(&n.output[0], &mut p, &mut chosen);
        }
    }
    // Graph order: inputs first, then by producer.
    let position: HashMap<&str, usize> =
        g.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i + 1))).collect();
    p.tensors.sort_by_key(|t| position.get(t.as_str()).copied().unwrap_or(0));
    p
}

/// uint8 scale and zero point for `[lo, hi]` (containing 0).
pub(super) fn activation_params(lo: f32, hi: f32) -> (f32, u8) {
    let span = hi - lo;
    if span <= 0.0 || !span.is_finite() {
        return (1.0, 0);
    }
    let scale = span / 255.0;
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}

/// Ops that only move values: when both their input and output are quantised, the output takes
/// the input's scale and zero point, so ORT drops the Q/DQ pair around them and runs them on
/// uint8.
const PASS_THROUGH: [&str; 5] = ["Transpose", "Reshape", "Flatten", "MaxPool", "Squeeze"];

pub(super) fn share_pass_through_params(g: &GraphProto, params: &mut HashMap<String, (f32, u8)>) {
    for n in &g.node {
        if PASS_THROUGH.contains(&op(n))
            && let (Some(x), Some(y)) = (n.input.first(), n.output.first())
            && let Some(&px) = params.get(x)
            && params.contains_key(y)
        {
            params.insert(y.clone(), px);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Rewrite with Q/DQ pairs.

/// Symmetric int8 per-channel weights along `axis`: (values, scales).
pub(super) fn quantize_weight(w: &ArrayD<f32>, axis: usize, qmax: f32) -> (Vec<i8>, Vec<f32>) {
    let channels = w.shape()[axis];
    let mut scales = vec![0f32; channels];
    for (c, lane) in w.axis_iter(Axis(axis)).enumerate() {
        let m = lane.iter().fold(0f32, |a, &v| a.max(v.abs()));
        scales[c] = if m > 0.0 { m / qmax } else { 1.0 };
    }
    let q =
        w.indexed_iter().map(|(idx, &v)| (v / scales[idx[axis]]).round().clamp(-qmax, qmax) as i8).collect::<Vec<i8>>();
    (q, scales)
}

/// Adds the integer constant `values` (named N), its per-channel `scales` along `axis` and zero
/// zero points of its own type as initializers, and a DequantizeLinear to `N/dq`.
fn dequantize_const(
    values: TensorProto,
    scales: &[f32],
    axis: i64,
    nodes: &mut Vec<NodeProto>,
    inits: &mut Vec<TensorProto>,
) {
    let name = values.name.clone().unwrap_or_default();
    let code = values.data_type.unwrap_or(dtype::INT8);
    let width = if code == dtype::INT32 { 4 } else { 1 };
    let (s, z) = (format!("{name}/scale"), format!("{name}/zero_point"));
    inits.push(values);
    inits.push(f32_tensor(&s, &[scales.len()], scales));
    inits.push(raw_tensor(&z, &[scales.len()], code, vec![0; width * scales.len()]));
    nodes.push(qdq_node(
        "DequantizeLinear",
        &format!("{name}/dequantize"),
        [&name, &s, &z],
        &format!("{name}/dq"),
        Some(axis),
    ));
}

pub(super) fn rewrite(
    g: &GraphProto,
    dir: &Path,
    p: &Plan,
    params: &HashMap<String, (f32, u8)>,
    qmax: f32,
) -> Result<GraphProto> {
    let consts = Consts::new(g, dir);
    let mut out = g.clone();
    out.node.clear();
    out.value_info.clear();
    let dq = |t: &str| format!("{t}/dq");
    let act: HashSet<&str> = p.tensors.iter().map(String::as_str).collect();
    let targets: HashMap<usize, &Target> = p.targets.iter().map(|t| (t.node, t)).collect();
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut made: HashSet<String> = HashSet::new();
    let qdq = |t: &str, nodes: &mut Vec<NodeProto>, inits: &mut Vec<TensorProto>| {
        let (scale, zp) = params[t];
        let (s, z, q) = (format!("{t}/scale"), format!("{t}/zero_point"), format!("{t}/q"));
        inits.push(f32_tensor(&s, &[], &[scale]));
        inits.push(raw_tensor(&z, &[], dtype::UINT8, vec![zp]));
        nodes.push(qdq_node("QuantizeLinear", &format!("{t}/quantize"), [t, &s, &z], &q, None));
        nodes.push(qdq_node("DequantizeLinear", &format!("{t}/dequantize"), [&q, &s, &z], &dq(t), None));
    };
    let produced: HashSet<&str> = g.node.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
    for t in &p.tensors {
        if !produced.contains(t.as_str()) {
            qdq(t, &mut out.node, &mut new_inits);
        }
    }
    for (i, n) in g.node.iter().enumerate() {
        let mut n = n.clone();
        for x in n.input.iter_mut() {
            if act.contains(x.as_str()) {
                *x = dq(x);
            }
        }
        if let Some(t) = targets.get(&i) {
            let x_name = &g.node[i].input[0];
            let x_scale = params.get(x_name.as_str()).map(|v| v.0).ok_or_else(|| {
                import_err(dir, format!("internal: the input `{x_name}` of a quantised node has no calibrated range"))
            })?;
            let w_name = g.node[i].input[t.weight].clone();
            let w = consts
                .f32(&w_name)
                .ok_or_else(|| import_err(dir, format!("weight `{w_name}` is not a float constant")))?;
            let axis = t.axis as usize;
            let (q, scales) = quantize_weight(&w, axis, qmax);
            let wq = format!("{w_name}/q{axis}");
            if made.insert(wq.clone()) {
                let values = raw_tensor(&wq, w.shape(), dtype::INT8, q.iter().map(|&v| v as u8).collect());
                dequantize_const(values, &scales, t.axis, &mut out.node, &mut new_inits);
            }
            n.input[t.weight] = format!("{wq}/dq");
            if let Some(bi) = t.bias {
                let b_name = g.node[i].input[bi].clone();
                let b = consts
                    .f32(&b_name)
                    .ok_or_else(|| import_err(dir, format!("bias `{b_name}` is not a float constant")))?;
                let node_key = g.node[i].output[0].clone();
                let bq = format!("{node_key}/bias_q");
                let b_scales: Vec<f32> = scales.iter().map(|s| s * x_scale).collect();
                let qb: Vec<i32> = b
                    .iter()
                    .zip(&b_scales)
                    .map(|(&v, &s)| (v as f64 / s as f64).round().clamp(i32::MIN as f64, i32::MAX as f64) as i32)
                    .collect();
                let values =
                    raw_tensor(&bq, &[qb.len()], dtype::INT32, qb.iter().flat_map(|v| v.to_le_bytes()).collect());
                dequantize_const(values, &b_scales, 0, &mut out.node, &mut new_inits);
                n.input[bi] = format!("{bq}/dq");
            }
        }
        let outs = n.output.clone();
        out.node.push(n);
        for o in &outs {
            if act.contains(o.as_str()) {
                qdq(o, &mut out.node, &mut new_inits);
            }
        }
    }
    out.initializer.extend(new_inits);
    prune_initializers(&mut out);
    Ok(out)
}
