//! `hiercon model quantize`: an int8 copy of a servable model, written by hiercon itself.
//!
//! The float model is rewritten at the protobuf level into ONNX's QDQ form, which ONNX Runtime
//! fuses into its int8 kernels (QLinearConv, QLinearAdd, QGemm, ...):
//!
//! 1. **Fold.** A BatchNormalization whose input is a Conv's only use is folded into that Conv's
//!    weights and bias (in f64), so the weights that get per-channel scales are the ones that run.
//! 2. **Plan.** Every Conv, Gemm and MatMul with a constant weight is quantised, except the ones
//!    named in [`QuantizeOptions::keep_float`]. Its activation input and its output get a
//!    QuantizeLinear → DequantizeLinear pair; when the output's only use is a Clip or Relu, the
//!    pair goes after that instead (the quantised range starts at 0 and ends at the clip's
//!    bound at the latest, so ORT drops the Clip and the Conv's output feeds the Q directly). An
//!    Add whose two inputs are quantised gets its output quantised too (residuals run as
//!    QLinearAdd). Graph outputs stay float: the embedding is never rounded to 8 bits.
//! 3. **Calibrate.** ORT runs the folded float model, with every tensor of the plan as an extra
//!    output, on images of a *seen* split of the catalogue; each tensor's range is its min/max,
//!    or the central `p` % of its values (a 4,096-bin histogram between min and max, second
//!    pass). Ranges always include 0, so zero is exact (padding).
//! 4. **Write.** Activations are uint8 with a zero point; weights are int8, symmetric, one scale
//!    per output channel (`DequantizeLinear` with `axis`); biases are int32 at scale
//!    `x_scale · w_scale[c]`, as the integer kernels need. `reduce_range` keeps weights in 7 bits
//!    (±63) for CPUs whose int8 dot product (AVX2 `vpmaddubsw`, no VNNI) saturates 16-bit sums.
//!
//! The result is checked before it is written: ORT must load it, and its embeddings are compared
//! with the float model's on check images of the same split that calibration did not use (mean
//! and worst cosine, recorded in the `.json`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use ndarray::{Array4, ArrayD, Axis};
use ort::value::TensorRef;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::catalogue::split::stable_hash;
use crate::catalogue::{Manifest, Subset};
use crate::encoder::ModelMeta;
use crate::graph::Tensor;
use crate::graph::import::{OnnxFile, dtype, import_err, read_tensor};
use crate::graph::proto::{
    AttributeProto, GraphProto, NodeProto, TensorProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    type_proto,
};
use crate::image::{Limits, Preprocess, batch_from_files, stack};
use crate::runtime::RuntimeOptions;
use crate::train::checkpoint::write_atomic;
use crate::{Error, Result};

/// How an activation's range is chosen from the calibration images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RangeMethod {
    /// The smallest and largest value seen.
    MinMax,
    /// The central `p` percent of the values (`p` in (50, 100]): outliers saturate instead of
    /// stretching the scale.
    Percentile(f64),
}

impl RangeMethod {
    /// How the `.json` and messages name it.
    pub fn describe(self) -> String {
        match self {
            RangeMethod::MinMax => "minmax".into(),
            RangeMethod::Percentile(p) => format!("percentile {p}"),
        }
    }
}

/// What to quantise and how.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeOptions {
    pub method: RangeMethod,
    /// Nodes left in float, by node name or by the name of an output.
    pub keep_float: Vec<String>,
    /// 7-bit weights (±63) for CPUs without VNNI.
    pub reduce_range: bool,
    /// Images per ORT run during calibration and the check.
    pub batch: usize,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions { method: RangeMethod::MinMax, keep_float: Vec::new(), reduce_range: false, batch: 16 }
    }
}

/// Images of the catalogue that calibrate and check the quantised model.
#[derive(Debug, Clone)]
pub struct CalibrationSet {
    pub manifest: PathBuf,
    pub subset: Subset,
    pub seed: u64,
    /// Item ids used for the ranges.
    pub calibration: Vec<String>,
    pub calibration_paths: Vec<PathBuf>,
    /// Other item ids of the same subset, for the float-vs-int8 check.
    pub check: Vec<String>,
    pub check_paths: Vec<PathBuf>,
}

impl CalibrationSet {
    /// `images` items of `subset` (a seen one: train, fit or val) for calibration and up to
    /// `check` others for the check, chosen by a seeded hash of their ids (the same on every
    /// machine).
    pub fn sample(manifest_path: &Path, subset: Subset, images: usize, check: usize, seed: u64) -> Result<Self> {
        if !subset.seen() {
            return Err(Error::InvalidArgument {
                name: "split",
                reason: format!(
                    "calibration images must come from seen products (train, fit or val), not `{}`: \
                     a model tuned on the unseen split would report optimistic unseen figures",
                    subset.as_str()
                ),
            });
        }
        if images == 0 {
            return Err(Error::InvalidArgument { name: "calibration-images", reason: "must be at least 1".into() });
        }
        let manifest = Manifest::read(manifest_path)?;
        let mut items = subset.select(&manifest.items);
        if items.is_empty() {
            return Err(Error::InvalidArgument {
                name: "split",
                reason: format!("{} has no items in `{}`", manifest_path.display(), subset.as_str()),
            });
        }
        items.sort_by_cached_key(|it| (stable_hash(seed, &["calibration", &it.id]), it.id.clone()));
        let n = images.min(items.len());
        let (cal, rest) = items.split_at(n);
        let rest = &rest[..check.min(rest.len())];
        Ok(CalibrationSet {
            manifest: manifest_path.to_path_buf(),
            subset,
            seed,
            calibration: cal.iter().map(|it| it.id.clone()).collect(),
            calibration_paths: cal.iter().map(|it| manifest.image_path(it)).collect(),
            check: rest.iter().map(|it| it.id.clone()).collect(),
            check_paths: rest.iter().map(|it| manifest.image_path(it)).collect(),
        })
    }

    /// sha256 over the calibration ids, one per line: which images, in the `.json`.
    fn ids_digest(&self) -> String {
        let mut h = Sha256::new();
        for id in &self.calibration {
            h.update(id.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }
}

/// What quantisation did, and how close the int8 model stays to the float one.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeReport {
    pub folded_batchnorms: usize,
    /// Conv / Gemm / MatMul nodes that run in int8.
    pub quantized_nodes: usize,
    /// Activations with a Q/DQ pair.
    pub quantized_tensors: usize,
    /// Nodes left in float on request.
    pub kept_float: Vec<String>,
    pub check_images: usize,
    /// Cosine between the float and the int8 embedding of each check image: mean and worst.
    pub cosine_mean: f64,
    pub cosine_min: f64,
}

// ---------------------------------------------------------------------------------------------
// Small protobuf helpers.

fn err(path: &Path, reason: impl Into<String>) -> Error {
    import_err(path, reason)
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(AttributeType::Int as i32), i: Some(v), ..Default::default() }
}

fn node_attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name)).and_then(|a| a.i).unwrap_or(default)
}

fn node_attr_f(n: &NodeProto, name: &str, default: f32) -> f32 {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name)).and_then(|a| a.f).unwrap_or(default)
}

fn op(n: &NodeProto) -> &str {
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
        attribute: axis.map(|a| vec![attr_int("axis", a)]).unwrap_or_default(),
        ..Default::default()
    }
}

fn float_output(name: &str) -> ValueInfoProto {
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

fn consumers(g: &GraphProto) -> HashMap<String, Vec<usize>> {
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

// ---------------------------------------------------------------------------------------------
// 1. Fold BatchNormalization into the Conv before it.

/// Folds every BatchNormalization that is the only use of a Conv's output (constant weights and
/// statistics) into the Conv; returns how many.
fn fold_batchnorms(g: &mut GraphProto, dir: &Path) -> usize {
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
    let mut i = 0;
    g.node.retain(|_| {
        i += 1;
        !dead.contains(&(i - 1))
    });
    prune_initializers(g);
    n
}

/// Folds every zero Pad of the spatial axes whose output only feeds Convs (as their data input)
/// into those Convs' `pads` (TF-style SAME padding is written as Pad + Conv): one Q/DQ pair and
/// one copy of the tensor fewer. Returns how many.
fn fold_pads(g: &mut GraphProto, dir: &Path) -> usize {
    let uses = consumers(g);
    let outputs = graph_outputs(g);
    let mut folds: Vec<(usize, Vec<usize>, Vec<i64>)> = Vec::new();
    {
        let consts = Consts::new(g, dir);
        for (pi, n) in g.node.iter().enumerate() {
            if op(n) != "Pad" || n.input.len() < 2 || n.output.len() != 1 || outputs.contains(&n.output[0]) {
                continue;
            }
            let constant_mode = n.attribute.iter().all(|a| a.name.as_deref() != Some("mode") || a.s.as_deref() == Some(b"constant"));
            let zero_fill = n.input.get(2).is_none_or(|v| v.is_empty() || consts.f32(v).is_some_and(|c| c.iter().all(|&x| x == 0.0)));
            let pads = consts.by_name.get(n.input[1].as_str()).and_then(|t| read_tensor(t, dir).ok());
            let Some(Tensor::I64(pads)) = pads else { continue };
            let pads: Vec<i64> = pads.iter().copied().collect();
            // [n0, c0, h0, w0, n1, c1, h1, w1] with nothing on the batch and channel axes.
            if !constant_mode || !zero_fill || n.input.get(3).is_some_and(|a| !a.is_empty()) || pads.len() != 8
                || pads[0] != 0 || pads[1] != 0 || pads[4] != 0 || pads[5] != 0 || pads.iter().any(|&p| p < 0)
            {
                continue;
            }
            let Some(users) = uses.get(&n.output[0]) else { continue };
            let all_convs = users.iter().all(|&j| {
                let c = &g.node[j];
                op(c) == "Conv"
                    && c.input[0] == n.output[0]
                    && !c.input[1..].contains(&n.output[0])
                    && c.attribute.iter().all(|a| a.name.as_deref() != Some("auto_pad") || matches!(a.s.as_deref(), None | Some(b"NOTSET")))
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
                None => c.attribute.push(AttributeProto {
                    name: Some("pads".into()),
                    r#type: Some(AttributeType::Ints as i32),
                    ints: extra.clone(),
                    ..Default::default()
                }),
            }
        }
        dead.insert(pi);
    }
    let mut i = 0;
    g.node.retain(|_| {
        i += 1;
        !dead.contains(&(i - 1))
    });
    prune_initializers(g);
    n
}

// ---------------------------------------------------------------------------------------------
// 2. Plan: which nodes run in int8 and which activations get a Q/DQ pair.

/// A node whose weight is quantised.
#[derive(Debug, Clone)]
struct Target {
    node: usize,
    /// Input index of the weight and its per-channel axis.
    weight: usize,
    axis: i64,
    /// Input index of a bias quantised at `x_scale · w_scale`, if any.
    bias: Option<usize>,
}

#[derive(Debug, Clone, Default)]
struct Plan {
    targets: Vec<Target>,
    /// Activations in graph order of their producer (graph inputs first).
    tensors: Vec<String>,
    kept_float: Vec<String>,
}

fn plan(g: &GraphProto, dir: &Path, keep_float: &[String]) -> Plan {
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

// ---------------------------------------------------------------------------------------------
// 3. Calibration.

/// Per-tensor range statistics over the calibration images.
#[derive(Debug, Clone)]
struct Stats {
    min: f32,
    max: f32,
    hist: Vec<u64>,
}

const BINS: usize = 4096;

impl Stats {
    fn new() -> Self {
        Stats { min: f32::INFINITY, max: f32::NEG_INFINITY, hist: Vec::new() }
    }

    fn bin(&self, x: f32) -> usize {
        let w = (self.max - self.min).max(f32::MIN_POSITIVE);
        (((x - self.min) / w * BINS as f32) as usize).min(BINS - 1)
    }

    /// The `[lo, hi]` range to quantise, always containing 0.
    fn range(&self, method: RangeMethod) -> (f32, f32) {
        let (lo, hi) = match method {
            RangeMethod::MinMax => (self.min, self.max),
            RangeMethod::Percentile(p) => {
                let total: u64 = self.hist.iter().sum();
                let tail = ((1.0 - p / 100.0) * total as f64).floor() as u64;
                let w = (self.max - self.min) / BINS as f32;
                let (mut acc, mut lo_bin) = (0u64, 0usize);
                for (i, &c) in self.hist.iter().enumerate() {
                    if acc + c > tail {
                        lo_bin = i;
                        break;
                    }
                    acc += c;
                }
                let (mut acc, mut hi_bin) = (0u64, BINS - 1);
                for (i, &c) in self.hist.iter().enumerate().rev() {
                    if acc + c > tail {
                        hi_bin = i;
                        break;
                    }
                    acc += c;
                }
                (self.min + lo_bin as f32 * w, (self.min + (hi_bin + 1) as f32 * w).min(self.max))
            }
        };
        (lo.min(0.0), hi.max(0.0))
    }
}

/// uint8 scale and zero point for `[lo, hi]` (containing 0).
fn activation_params(lo: f32, hi: f32) -> (f32, u8) {
    let span = hi - lo;
    if span <= 0.0 || !span.is_finite() {
        return (1.0, 0);
    }
    let scale = span / 255.0;
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}

fn load_batches(paths: &[PathBuf], pre: &Preprocess, batch: usize) -> Result<Vec<Array4<f32>>> {
    let limits = Limits::default();
    let mut out = Vec::new();
    for chunk in paths.chunks(batch.max(1)) {
        let tensors: Vec<_> = batch_from_files(chunk, pre, &limits).into_iter().collect::<Result<_>>()?;
        out.push(stack(&tensors));
    }
    Ok(out)
}

fn calibrate(
    g: &GraphProto,
    base: &crate::graph::proto::ModelProto,
    input: &str,
    tensors: &[String],
    batches: &[Array4<f32>],
    method: RangeMethod,
) -> Result<HashMap<String, Stats>> {
    let mut m = base.clone();
    let mut cg = g.clone();
    cg.output.extend(tensors.iter().map(|t| float_output(t)));
    m.graph = Some(cg);
    let bytes = m.encode_to_vec();
    let rt = crate::runtime::init()?;
    let mut session = rt.session_from_bytes(&RuntimeOptions::default(), &bytes)?;
    let mut stats: HashMap<String, Stats> = tensors.iter().map(|t| (t.clone(), Stats::new())).collect();
    let passes = if matches!(method, RangeMethod::Percentile(_)) { 2 } else { 1 };
    for pass in 0..passes {
        if pass == 1 {
            for s in stats.values_mut() {
                s.hist = vec![0; BINS];
            }
        }
        for x in batches {
            let t = TensorRef::from_array_view(x.view()).map_err(|e| Error::ort("wrapping the calibration batch", e))?;
            let out = session
                .run(ort::inputs![input => t])
                .map_err(|e| Error::ort("running the float model on calibration images", e))?;
            for name in tensors {
                let y = out[name.as_str()]
                    .try_extract_array::<f32>()
                    .map_err(|e| Error::ort(format!("reading calibration tensor `{name}`"), e))?;
                let s = stats.get_mut(name).expect("every tensor has stats");
                if pass == 0 {
                    for &v in y.iter().filter(|v| v.is_finite()) {
                        s.min = s.min.min(v);
                        s.max = s.max.max(v);
                    }
                } else {
                    for &v in y.iter().filter(|v| v.is_finite()) {
                        let b = s.bin(v);
                        s.hist[b] += 1;
                    }
                }
            }
        }
    }
    for (name, s) in &stats {
        if !s.min.is_finite() || !s.max.is_finite() {
            return Err(Error::InvalidArgument {
                name: "model",
                reason: format!("calibration saw no finite value of `{name}`"),
            });
        }
    }
    Ok(stats)
}

/// Ops that only move values: when both their input and output are quantised, the output takes
/// the input's scale and zero point, so ORT drops the Q/DQ pair around them and runs them on
/// uint8.
const PASS_THROUGH: [&str; 5] = ["Transpose", "Reshape", "Flatten", "MaxPool", "Squeeze"];

fn share_pass_through_params(g: &GraphProto, params: &mut HashMap<String, (f32, u8)>) {
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
fn quantize_weight(w: &ArrayD<f32>, axis: usize, qmax: f32) -> (Vec<i8>, Vec<f32>) {
    let channels = w.shape()[axis];
    let mut scales = vec![0f32; channels];
    for (c, lane) in w.axis_iter(Axis(axis)).enumerate() {
        let m = lane.iter().fold(0f32, |a, &v| a.max(v.abs()));
        scales[c] = if m > 0.0 { m / qmax } else { 1.0 };
    }
    let q = w
        .indexed_iter()
        .map(|(idx, &v)| (v / scales[idx[axis]]).round().clamp(-qmax, qmax) as i8)
        .collect::<Vec<i8>>();
    (q, scales)
}

fn rewrite(g: &GraphProto, dir: &Path, p: &Plan, params: &HashMap<String, (f32, u8)>, qmax: f32) -> Result<GraphProto> {
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
                err(dir, format!("internal: the input `{x_name}` of a quantised node has no calibrated range"))
            })?;
            let w_name = g.node[i].input[t.weight].clone();
            let w = consts.f32(&w_name).ok_or_else(|| err(dir, format!("weight `{w_name}` is not a float constant")))?;
            let axis = t.axis as usize;
            let (q, scales) = quantize_weight(&w, axis, qmax);
            let wq = format!("{w_name}/q{axis}");
            if made.insert(wq.clone()) {
                let channels = scales.len();
                new_inits.push(raw_tensor(&wq, w.shape(), dtype::INT8, q.iter().map(|&v| v as u8).collect()));
                new_inits.push(f32_tensor(&format!("{wq}/scale"), &[channels], &scales));
                new_inits.push(raw_tensor(&format!("{wq}/zero_point"), &[channels], dtype::INT8, vec![0; channels]));
                out.node.push(qdq_node(
                    "DequantizeLinear",
                    &format!("{wq}/dequantize"),
                    [&wq, &format!("{wq}/scale"), &format!("{wq}/zero_point")],
                    &format!("{wq}/dq"),
                    Some(t.axis),
                ));
            }
            n.input[t.weight] = format!("{wq}/dq");
            if let Some(bi) = t.bias {
                let b_name = g.node[i].input[bi].clone();
                let b = consts.f32(&b_name).ok_or_else(|| err(dir, format!("bias `{b_name}` is not a float constant")))?;
                let node_key = g.node[i].output[0].clone();
                let bq = format!("{node_key}/bias_q");
                let b_scales: Vec<f32> = scales.iter().map(|s| s * x_scale).collect();
                let qb: Vec<i32> = b
                    .iter()
                    .zip(&b_scales)
                    .map(|(&v, &s)| (v as f64 / s as f64).round().clamp(i32::MIN as f64, i32::MAX as f64) as i32)
                    .collect();
                let len = qb.len();
                new_inits.push(raw_tensor(&bq, &[len], dtype::INT32, qb.iter().flat_map(|v| v.to_le_bytes()).collect()));
                new_inits.push(f32_tensor(&format!("{bq}/scale"), &[len], &b_scales));
                new_inits.push(raw_tensor(&format!("{bq}/zero_point"), &[len], dtype::INT32, vec![0; 4 * len]));
                out.node.push(qdq_node(
                    "DequantizeLinear",
                    &format!("{bq}/dequantize"),
                    [&bq, &format!("{bq}/scale"), &format!("{bq}/zero_point")],
                    &format!("{bq}/dq"),
                    Some(0),
                ));
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

// ---------------------------------------------------------------------------------------------
// The command.

fn run_embeddings(bytes: &[u8], meta: &ModelMeta, batches: &[Array4<f32>]) -> Result<Vec<Vec<f32>>> {
    let rt = crate::runtime::init()?;
    let mut session = rt.session_from_bytes(&RuntimeOptions::default(), bytes)?;
    let mut rows = Vec::new();
    for x in batches {
        let t = TensorRef::from_array_view(x.view()).map_err(|e| Error::ort("wrapping the check batch", e))?;
        let out = session
            .run(ort::inputs![meta.input.name.as_str() => t])
            .map_err(|e| Error::ort("running a model on the check images", e))?;
        let y = out[meta.output.name.as_str()]
            .try_extract_array::<f32>()
            .map_err(|e| Error::ort("reading the embeddings", e))?;
        let y = y.to_owned().into_dimensionality::<ndarray::Ix2>().map_err(|e| Error::InvalidArgument {
            name: "model",
            reason: format!("the embedding output is not [batch, dim]: {e}"),
        })?;
        rows.extend(y.axis_iter(Axis(0)).map(|r| r.to_vec()));
    }
    Ok(rows)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na * nb) }
}

/// Writes `out` (+ `out.json`): the int8 copy of the servable model at `src`, calibrated on
/// `set`. See the module docs.
pub fn quantize(src: &Path, out: &Path, set: &CalibrationSet, o: &QuantizeOptions) -> Result<(ModelMeta, QuantizeReport)> {
    if let RangeMethod::Percentile(p) = o.method
        && !(p > 50.0 && p <= 100.0)
    {
        return Err(Error::InvalidArgument { name: "percentile", reason: format!("{p} is not in (50, 100]") });
    }
    let meta = ModelMeta::read(&ModelMeta::path_for(src))?;
    let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
    let found = crate::model::model_digest(src, &bytes)?;
    if found != meta.digest {
        return Err(Error::ModelDigestMismatch {
            model: src.to_path_buf(),
            meta: ModelMeta::path_for(src),
            found,
            expected: meta.digest.clone(),
        });
    }
    let file = OnnxFile::from_bytes(src, &bytes)?;
    if file.opset < 13 {
        return Err(err(
            src,
            format!("opset {} is too old: per-channel QuantizeLinear/DequantizeLinear need opset 13 or later", file.opset),
        ));
    }
    let dir = src.parent().unwrap_or(Path::new("."));
    let mut g = file.proto.graph.clone().ok_or_else(|| err(src, "the model has no graph"))?;
    if g.node.iter().any(|n| matches!(op(n), "QuantizeLinear" | "DequantizeLinear" | "QLinearConv")) {
        return Err(err(src, "the model is quantised already"));
    }
    let unknown: Vec<&String> = o
        .keep_float
        .iter()
        .filter(|k| !g.node.iter().any(|n| n.name.as_deref() == Some(k.as_str()) || n.output.iter().any(|x| x == *k)))
        .collect();
    if !unknown.is_empty() {
        return Err(Error::InvalidArgument {
            name: "keep-float",
            reason: format!("no node or node output is named {unknown:?}"),
        });
    }
    let folded = fold_batchnorms(&mut g, dir);
    let folded_pads = fold_pads(&mut g, dir);
    let p = plan(&g, dir, &o.keep_float);
    if p.targets.is_empty() {
        return Err(err(
            src,
            "nothing to quantise: no Conv, Gemm or MatMul with a constant weight (all kept float or none in the model)",
        ));
    }
    tracing::info!(folded, folded_pads, nodes = p.targets.len(), tensors = p.tensors.len(), "quantisation plan");
    let pre = meta.preprocess();
    let cal = load_batches(&set.calibration_paths, &pre, o.batch)?;
    let stats = calibrate(&g, &file.proto, &meta.input.name, &p.tensors, &cal, o.method)?;
    let params: HashMap<String, (f32, u8)> = stats
        .iter()
        .map(|(t, s)| {
            let (lo, hi) = s.range(o.method);
            (t.clone(), activation_params(lo, hi))
        })
        .collect();
    let mut params = params;
    share_pass_through_params(&g, &mut params);
    let qmax = if o.reduce_range { 63.0 } else { 127.0 };
    let qg = rewrite(&g, dir, &p, &params, qmax)?;
    let mut model = file.proto.clone();
    model.graph = Some(qg);
    let qbytes = model.encode_to_vec();

    // Check: the float and the int8 model on images calibration did not use.
    let check_paths = if set.check_paths.is_empty() { &set.calibration_paths } else { &set.check_paths };
    let check = load_batches(check_paths, &pre, o.batch)?;
    let a = run_embeddings(&bytes, &meta, &check)?;
    let b = run_embeddings(&qbytes, &meta, &check)
        .map_err(|e| err(out, format!("ONNX Runtime does not run the quantised model: {e}")))?;
    let cos: Vec<f64> = a.iter().zip(&b).map(|(x, y)| cosine(x, y)).collect();
    let cosine_mean = cos.iter().sum::<f64>() / cos.len().max(1) as f64;
    let cosine_min = cos.iter().copied().fold(f64::INFINITY, f64::min);
    if !cosine_mean.is_finite() {
        return Err(err(out, "the quantised model's embeddings are not finite"));
    }
    let report = QuantizeReport {
        folded_batchnorms: folded,
        quantized_nodes: p.targets.len(),
        quantized_tensors: p.tensors.len(),
        kept_float: p.kept_float.clone(),
        check_images: cos.len(),
        cosine_mean,
        cosine_min,
    };

    let digest = crate::model::model_digest(out, &qbytes)?;
    let mut qmeta = meta.clone();
    qmeta.digest = digest;
    let ranges: BTreeMap<&str, [f32; 2]> = stats.iter().map(|(t, s)| (t.as_str(), [s.min, s.max])).collect();
    qmeta.extra.insert(
        "quantization".into(),
        serde_json::json!({
            "source": src,
            "source_digest": meta.digest,
            "format": "QDQ",
            "weights": if o.reduce_range { "int8 (7-bit range), symmetric, per output channel" } else { "int8, symmetric, per output channel" },
            "activations": "uint8, asymmetric, per tensor",
            "method": o.method.describe(),
            "calibration": {
                "manifest": set.manifest,
                "split": set.subset.as_str(),
                "seed": set.seed,
                "images": set.calibration.len(),
                "ids_sha256": set.ids_digest(),
                "ids": set.calibration,
            },
            "folded_batchnorms": folded,
            "folded_pads": folded_pads,
            "quantized_nodes": p.targets.len(),
            "quantized_tensors": p.tensors.len(),
            "kept_float": p.kept_float,
            "check": { "images": cos.len(), "cosine_mean": cosine_mean, "cosine_min": cosine_min },
            "observed_ranges": ranges.len(),
        }),
    );
    if let Some(d) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    write_atomic(out, &qbytes)?;
    let text = serde_json::to_string_pretty(&qmeta).expect("ModelMeta serialises") + "\n";
    write_atomic(&ModelMeta::path_for(out), text.as_bytes())?;
    Ok((qmeta, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn shipped() -> (PathBuf, ModelMeta, OnnxFile) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/emoji-lite0-hmce.onnx");
        let meta = ModelMeta::read(&ModelMeta::path_for(&path)).unwrap();
        let file = OnnxFile::read(&path).unwrap();
        (path, meta, file)
    }

    fn batch(n: usize, size: usize) -> Array4<f32> {
        Array4::from_shape_fn((n, 3, size, size), |(b, c, y, x)| ((b * 5 + c * 7 + y * 3 + x) % 13) as f32 / 6.0 - 1.0)
    }

    #[test]
    fn folding_batchnorm_and_pads_keeps_the_model_s_output() {
        // ORT runs the original BatchNormalization nodes; the folded Convs must agree with them.
        let (path, meta, file) = shipped();
        let mut g = file.proto.graph.clone().unwrap();
        let before = g.node.iter().filter(|n| op(n) == "BatchNormalization").count();
        let folded = fold_batchnorms(&mut g, path.parent().unwrap());
        assert_eq!(folded, before);
        assert!(folded > 40, "{folded}");
        assert!(!g.node.iter().any(|n| op(n) == "BatchNormalization"));
        // The SAME-padding Pads before stride-2 convolutions go into the Convs' pads too.
        let pads = g.node.iter().filter(|n| op(n) == "Pad").count();
        assert!(pads >= 4, "{pads}");
        assert_eq!(fold_pads(&mut g, path.parent().unwrap()), pads);
        assert!(!g.node.iter().any(|n| op(n) == "Pad"));
        let mut m = file.proto.clone();
        m.graph = Some(g);
        let x = vec![batch(2, meta.input.size as usize)];
        let a = run_embeddings(&std::fs::read(&path).unwrap(), &meta, &x).unwrap();
        let b = run_embeddings(&m.encode_to_vec(), &meta, &x).unwrap();
        let diff = a.iter().flatten().zip(b.iter().flatten()).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "folded model differs by {diff}");
    }

    #[test]
    fn the_plan_quantises_every_conv_and_puts_pairs_after_clips() {
        let (path, _, file) = shipped();
        let dir = path.parent().unwrap();
        let mut g = file.proto.graph.clone().unwrap();
        fold_batchnorms(&mut g, dir);
        let p = plan(&g, dir, &[]);
        let convs = g.node.iter().filter(|n| op(n) == "Conv").count();
        let gemms = g.node.iter().filter(|n| op(n) == "Gemm").count();
        assert_eq!(p.targets.len(), convs + gemms);
        let chosen: HashSet<&str> = p.tensors.iter().map(String::as_str).collect();
        let uses = consumers(&g);
        for n in g.node.iter().filter(|n| op(n) == "Conv") {
            let o = n.output[0].as_str();
            let only_clip = uses[o].len() == 1 && op(&g.node[uses[o][0]]) == "Clip";
            // The pair follows the Clip, never sits between Conv and Clip.
            assert_eq!(chosen.contains(o), !only_clip, "{o}");
            if only_clip {
                assert!(chosen.contains(g.node[uses[o][0]].output[0].as_str()));
            }
        }
        assert!(!chosen.contains("embeddings"));
        // Keeping a node in float removes it from the plan.
        let first = g.node.iter().find(|n| op(n) == "Conv").unwrap().output[0].clone();
        let kept = plan(&g, dir, std::slice::from_ref(&first));
        assert_eq!(kept.targets.len(), p.targets.len() - 1);
        assert_eq!(kept.kept_float.len(), 1);
    }

    #[test]
    fn activation_params_make_zero_exact_and_cover_the_range() {
        let (s, z) = activation_params(-1.0, 3.0);
        assert!((s - 4.0 / 255.0).abs() < 1e-7);
        // zero maps to an integer exactly
        assert_eq!(z, 64);
        assert!(((0.0 - z as f32) * s - -1.0).abs() < s);
        assert!(((255.0 - z as f32) * s - 3.0).abs() < s);
        // clipped activations: zero point 0, the top at the clip bound
        assert_eq!(activation_params(0.0, 6.0), (6.0 / 255.0, 0));
        // degenerate ranges still give a usable scale
        assert_eq!(activation_params(0.0, 0.0), (1.0, 0));
    }

    #[test]
    fn percentile_ranges_drop_outliers_minmax_keeps_them() {
        let mut s = Stats::new();
        let values: Vec<f32> = (0..100_000).map(|i| (i % 1000) as f32 / 1000.0).chain([50.0, -20.0]).collect();
        for &v in &values {
            s.min = s.min.min(v);
            s.max = s.max.max(v);
        }
        s.hist = vec![0; BINS];
        for &v in &values {
            let b = s.bin(v);
            s.hist[b] += 1;
        }
        assert_eq!(s.range(RangeMethod::MinMax), (-20.0, 50.0));
        let (lo, hi) = s.range(RangeMethod::Percentile(99.99));
        // 10 values in each tail may be dropped; the two outliers are.
        assert!(lo <= 0.0 && lo > -0.1, "lo {lo}");
        assert!(hi >= 0.99 && hi < 1.1, "hi {hi}");
        // The bulk of the values stays inside, at the histogram's resolution.
        let bin = 70.0 / BINS as f32;
        assert!(hi + bin >= 0.999);
    }

    #[test]
    fn weights_are_symmetric_per_channel() {
        let w = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.5, -1.0, 0.25, 0.0, 0.0, 0.0]).unwrap();
        let (q, s) = quantize_weight(&w, 0, 127.0);
        assert_eq!(s, vec![1.0 / 127.0, 1.0]);
        assert_eq!(q, vec![64, -127, 32, 0, 0, 0]);
        let (q1, s1) = quantize_weight(&w, 1, 63.0);
        assert_eq!(s1, vec![0.5 / 63.0, 1.0 / 63.0, 0.25 / 63.0]);
        assert_eq!(q1, vec![63, -63, 63, 0, 0, 0]);
    }
}
