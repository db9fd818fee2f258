//! A backbone imported from an ONNX file (`hiercon import`, `train --init-onnx`): the file's nodes
//! replayed through the graph builders, cut before its classifier.
//!
//! [`Imported::load`] reads the file ([`OnnxFile`]), finds the image input and its layout (NCHW,
//! or NHWC with a Transpose in front), the cut (the input of the last Gemm / MatMul after a
//! pooling op, or `--cut`), and replays the nodes the cut needs once at batch 1 to check that
//! every op is supported and every shape folds. [`Imported::replay`] then builds the backbone into
//! any graph — training step, inference export — through [`Net`]:
//! - float initializers become parameters named as in the file (BatchNorm statistics become
//!   buffers; single-element initializers stay constants), or constants of the graph while frozen;
//! - `BatchNormalization` (inference form in the file) is trained in training form unless frozen;
//! - integer tensors and shape arithmetic (`Shape → Gather → Concat → Reshape`, ...) are folded to
//!   constants at the image size; each folded value is also computed at batch + 1, so a Reshape
//!   whose target depends on the batch is written with the batch "copied" (`0`) and the exported
//!   model keeps a dynamic batch;
//! - HardSigmoid, HardSwish, LeakyRelu and Softmax are composed from ops with gradient rules,
//!   AveragePool is a depthwise convolution with a constant kernel (or GlobalAveragePool when its
//!   window is the whole map), asymmetric Conv / pool padding an explicit Pad (`-inf` for max).
//! - Slice takes any axes and non-zero steps (ONNX's clamping; `end = INT64_MIN` runs to the
//!   start): a positive step stays a Slice node, a negative one (TensorFlow's `x[..., ::-1]`) is a
//!   Gather of the indices it takes; constants of any rank are sliced at import.
//!
//! Anything else — an unsupported op or attribute, a shape that depends on data, a non-float input
//! — is an [`Error::OnnxImport`] naming the node, the op and what is supported.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::net::{Mode, Net};
use crate::graph::import::{OnnxFile, OnnxNode, import_err};
use crate::graph::{Attr, BatchNorm, Conv2d, DType, Gemm, Graph, InputKind, Pool2d, Tensor, Value, tf_same_pads};
use crate::{Error, Result};

/// Ops [`Imported::replay`] understands (listed in errors).
pub const SUPPORTED_OPS: &[&str] = &[
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Div",
    "Dropout",
    "Exp",
    "Flatten",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "LeakyRelu",
    "Log",
    "MatMul",
    "Max",
    "MaxPool",
    "Min",
    "Mul",
    "Neg",
    "Pad",
    "Pow",
    "Reciprocal",
    "ReduceMax",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Transpose",
    "Unsqueeze",
];

/// Memory layout of the file's image input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[N, 3, H, W]`.
    Nchw,
    /// `[N, H, W, 3]` (TensorFlow exports); hiercon's `images` are transposed in front.
    Nhwc,
}

/// How to import a file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportOptions {
    /// The feature to cut at: a value name, or a node name meaning its first output. `None`
    /// finds the classifier; `Some("")`-like "output" is [`CUT_OUTPUT`].
    pub cut: Option<String>,
    /// Image side; `None` takes the file's fixed input size, or 224.
    pub size: Option<usize>,
    /// The model wants BGR channels: hiercon's RGB `images` are reversed in front of it.
    pub bgr: bool,
}

/// `--cut output`: keep the whole graph, its (single) output is the feature.
pub const CUT_OUTPUT: &str = "output";

/// An ONNX model ready to be replayed as a backbone.
#[derive(Debug)]
pub struct Imported {
    pub file: OnnxFile,
    /// Hex sha256 of the file's bytes (checked on resume).
    pub sha256: String,
    pub layout: Layout,
    /// Image side the shapes were folded at.
    pub size: usize,
    /// Channels reversed in front of the model.
    pub bgr: bool,
    /// The feature value the backbone ends at.
    pub cut: String,
    /// How the cut was chosen (for reports).
    pub cut_reason: String,
    /// Indices of the nodes the cut needs, in file order.
    pub needed: Vec<usize>,
    /// Of those, the weight layers (Conv, Gemm, MatMul with an initializer weight): `--freeze N`
    /// freezes everything before the `N+1`-th.
    pub units: Vec<usize>,
    /// Width of the (flattened) feature.
    pub feature_dim: usize,
}

impl PartialEq for Imported {
    fn eq(&self, o: &Self) -> bool {
        self.sha256 == o.sha256 && self.cut == o.cut && self.size == o.size && self.bgr == o.bgr
    }
}
impl Eq for Imported {}

fn is_pool(op: &str) -> bool {
    matches!(op, "GlobalAveragePool" | "AveragePool" | "ReduceMean" | "GlobalMaxPool" | "MaxPool")
}

impl Imported {
    /// Reads `path` and checks that the backbone replays (see the module docs).
    pub fn load(path: &Path, o: &ImportOptions) -> Result<Imported> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let file = OnnxFile::from_bytes(path, &bytes)?;
        let input = file.image_input()?.clone();
        let (layout, fixed) = input_layout(&file)?;
        let size = o.size.or(fixed).unwrap_or(224);
        if let Some(f) = fixed
            && f != size
        {
            return Err(import_err(
                path,
                format!("input `{}` is fixed at {f}x{f} pixels; --image-size {size} does not fit it", input.name),
            ));
        }
        let (cut, cut_reason) = match o.cut.as_deref() {
            Some(CUT_OUTPUT) => match file.outputs.as_slice() {
                [out] => (out.name.clone(), "the graph's output".to_string()),
                outs => {
                    return Err(import_err(path, format!("the model has {} outputs; name one with --cut", outs.len())));
                }
            },
            Some(c) => (file.resolve_value(c)?, format!("given (--cut {c})")),
            None => find_cut(&file)?,
        };
        let needed = file.ancestors(&cut)?;
        let units: Vec<usize> = needed.iter().copied().filter(|&i| is_unit(&file, &file.nodes[i])).collect();
        let mut m = Imported { file, sha256, layout, size, bgr: o.bgr, cut, cut_reason, needed, units, feature_dim: 0 };
        let mut g = Graph::new();
        let images = g.input("images", DType::F32, &[1, 3, size, size])?;
        let f = m.replay(&mut Net::new(&mut g, Mode::Infer, 0), images, 0)?;
        m.feature_dim = g.shape(f)[1];
        Ok(m)
    }

    pub fn path(&self) -> &PathBuf {
        &self.file.path
    }

    /// Counts of each op among the nodes the cut needs, most frequent first.
    pub fn op_counts(&self) -> Vec<(String, usize)> {
        let mut c: HashMap<&str, usize> = HashMap::new();
        for &i in &self.needed {
            *c.entry(self.file.nodes[i].op.as_str()).or_default() += 1;
        }
        let mut v: Vec<(String, usize)> = c.into_iter().map(|(k, n)| (k.to_string(), n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Float initializers the backbone uses, by name (its pretrained weights).
    pub fn weights(&self) -> super::Weights {
        let mut used = HashSet::new();
        for &i in &self.needed {
            used.extend(self.file.nodes[i].inputs.iter().map(String::as_str));
        }
        self.file
            .initializers
            .iter()
            .filter(|(n, t)| used.contains(n.as_str()) && t.dtype().is_float())
            .map(|(n, t)| (n.clone(), t.cast(DType::F32)))
            .collect()
    }

    /// The weight layers `--freeze` counts: (1-based position, node name, op, weight shape).
    pub fn layers(&self) -> Vec<(usize, String, String, Vec<usize>)> {
        self.units
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let n = &self.file.nodes[i];
                let shape = n.input(1).and_then(|w| self.file.initializers.get(w)).map(|t| t.shape().to_vec());
                (k + 1, n.name.clone(), n.op.clone(), shape.unwrap_or_default())
            })
            .collect()
    }

    /// The replayed feature (inference form, `batch` images of seeded noise in [-1, 1]) against
    /// ONNX Runtime on the file's own nodes: `(max |difference|, RMS of ONNX Runtime's feature)`.
    pub fn check_against_ort(&self, batch: usize) -> Result<(f64, f64)> {
        use rand::{Rng, SeedableRng};
        let s = self.size;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let x: Vec<f32> = (0..batch * 3 * s * s).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let images = Tensor::f32(&[batch, 3, s, s], x)?;
        let mut g = Graph::new();
        let iv = g.input("images", DType::F32, &[batch, 3, s, s])?;
        let f = self.replay(&mut Net::new(&mut g, Mode::Infer, 0), iv, 0)?;
        g.output("features", f)?;
        let ours = crate::graph::Runner::cpu(&g)?.run(&[("images", &images)])?.f32("features")?.clone();
        let (bytes, input, output) = super::describe::with_output(&self.file, self.layout, self.bgr, s, &self.cut)?;
        let theirs = super::describe::run_bytes(&bytes, &input, images.as_f32().expect("f32"), &output)?;
        let theirs: Vec<f32> = theirs.iter().copied().collect();
        if theirs.len() != ours.len() {
            return Err(import_err(
                &self.file.path,
                format!("ONNX Runtime's `{}` has {} values, the replay {}", self.cut, theirs.len(), ours.len()),
            ));
        }
        let diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        let rms = (theirs.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / theirs.len().max(1) as f64).sqrt();
        Ok((diff, rms))
    }

    /// Builds the backbone on `images` `[B, 3, S, S]` (NCHW, normalised as the model expects)
    /// into `net`'s graph and returns the feature `[B, feature_dim]`. Nodes before the
    /// `freeze + 1`-th weight layer are frozen.
    pub(crate) fn replay(&self, net: &mut Net, images: Value, freeze: usize) -> Result<Value> {
        let s = net.g.shape(images).to_vec();
        if s.len() != 4 || s[1] != 3 || s[2] != self.size || s[3] != self.size {
            return Err(import_err(
                &self.file.path,
                format!("imported at {0}x{0} pixels, the graph feeds images {s:?}", self.size),
            ));
        }
        let frozen_until = if freeze == 0 { 0 } else { self.units.get(freeze).copied().unwrap_or(usize::MAX) };
        let batch = s[0];
        let mut r = Replay {
            m: self,
            net,
            env: HashMap::new(),
            made: HashMap::new(),
            batch_major: HashSet::new(),
            transposed: HashMap::new(),
            batch,
        };
        let input = self.file.image_input()?.name.clone();
        r.batch_major.insert(images);
        let x = if self.bgr {
            let idx = r.net.g.const_i64(&[2, 1, 0]);
            let x = r.net.g.gather(images, idx, 1)?;
            r.batch_major.insert(x);
            x
        } else {
            images
        };
        let x = match self.layout {
            Layout::Nchw => x,
            Layout::Nhwc => r.transpose(x, vec![0, 2, 3, 1])?,
        };
        r.env.insert(input, Val::Live(x));
        for &i in &self.needed {
            let node = &self.file.nodes[i];
            r.net.set_frozen(i < frozen_until);
            r.node(node).map_err(|e| match e {
                Error::OnnxImport { .. } => e,
                other => import_err(&self.file.path, format!("{}: {other}", node.describe())),
            })?;
        }
        r.net.set_frozen(false);
        let f = r.live(&self.cut, None)?;
        let fs = r.net.g.shape(f).to_vec();
        match fs.as_slice() {
            [_, _] => Ok(f),
            [_, _, rest @ ..] if rest.iter().all(|&d| d == 1) => r.net.g.flatten(f, 1),
            _ => Err(import_err(
                &self.file.path,
                format!(
                    "the cut `{}` is {fs:?}; the feature must be [N, D] or [N, D, 1, 1] (cut after the global pooling)",
                    self.cut
                ),
            )),
        }
    }
}

/// The image input's layout and its fixed square side, if the file fixes one.
pub fn input_layout(file: &OnnxFile) -> Result<(Layout, Option<usize>)> {
    let input = file.image_input()?;
    let path = &file.path;
    let layout = match (input.dims[1], input.dims[3]) {
        (Some(3), _) => Layout::Nchw,
        (_, Some(3)) => Layout::Nhwc,
        (None, None) => Layout::Nchw,
        _ => {
            return Err(import_err(
                path,
                format!("input `{}` is {:?}: neither [N, 3, H, W] nor [N, H, W, 3]", input.name, input.dims),
            ));
        }
    };
    let (hd, wd) = match layout {
        Layout::Nchw => (input.dims[2], input.dims[3]),
        Layout::Nhwc => (input.dims[1], input.dims[2]),
    };
    let fixed = match (hd, wd) {
        (Some(h), Some(w)) if h == w => Some(h as usize),
        (Some(h), Some(w)) => {
            return Err(import_err(path, format!("input `{}` is {h}x{w}; hiercon feeds square images", input.name)));
        }
        _ => None,
    };
    Ok((layout, fixed))
}

fn is_unit(file: &OnnxFile, n: &OnnxNode) -> bool {
    match n.op.as_str() {
        "Conv" => true,
        "Gemm" | "MatMul" => n.input(1).is_some_and(|w| file.initializers.contains_key(w)),
        _ => false,
    }
}

/// The input of the last Gemm / MatMul with an initializer weight that has a pooling op among
/// its ancestors: the classifier's input.
fn find_cut(file: &OnnxFile) -> Result<(String, String)> {
    for n in file.nodes.iter().rev() {
        if matches!(n.op.as_str(), "Gemm" | "MatMul") && is_unit(file, n) {
            let a = n.input(0).unwrap_or_default().to_string();
            let pooled = file.ancestors(&a)?.iter().any(|&i| is_pool(&file.nodes[i].op));
            if pooled {
                return Ok((a, format!("the input of {}, the classifier after the global pooling", n.describe())));
            }
        }
    }
    Err(import_err(
        &file.path,
        "found no classifier (a Gemm or MatMul after a pooling op) to cut before: name the feature with --cut VALUE, \
         or --cut output to use the graph's output",
    ))
}

/// A value during replay: computed by the graph, or known at import time (initializers, folded
/// shape arithmetic). `probe` is the same value computed for batch + 1.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per value of one import; boxing would buy nothing
enum Val {
    Live(Value),
    Known { t: Tensor, probe: Tensor },
}

struct Replay<'a, 'n, 'g> {
    m: &'a Imported,
    net: &'n mut Net<'g>,
    env: HashMap<String, Val>,
    /// Initializers and known values already made into graph values.
    made: HashMap<String, Value>,
    /// Values whose dimension 0 is the batch.
    batch_major: HashSet<Value>,
    /// Values made by a Transpose: (its input, perm), so Transpose pairs cancel.
    transposed: HashMap<Value, (Value, Vec<usize>)>,
    batch: usize,
}

fn unsupported(node: &OnnxNode, what: &str) -> String {
    format!("{}: {what}", node.describe())
}

impl Replay<'_, '_, '_> {
    fn g(&mut self) -> &mut Graph {
        self.net.g
    }

    fn err(&self, reason: String) -> Error {
        import_err(&self.m.file.path, reason)
    }

    fn get(&self, node: &OnnxNode, name: &str) -> Result<Val> {
        if let Some(v) = self.env.get(name) {
            return Ok(v.clone());
        }
        if let Some(t) = self.m.file.initializers.get(name) {
            return Ok(Val::Known { t: t.clone(), probe: t.clone() });
        }
        Err(self.err(unsupported(node, &format!("input `{name}` is not available"))))
    }

    fn is_init(&self, name: &str) -> bool {
        !self.env.contains_key(name) && self.m.file.initializers.contains_key(name)
    }

    /// `name` as a graph value. Float initializers become parameters (`kind`, default Param when
    /// they have more than one element) named as in the file; other known values constants.
    fn live(&mut self, name: &str, kind: Option<InputKind>) -> Result<Value> {
        if let Some(Val::Live(v)) = self.env.get(name) {
            return Ok(*v);
        }
        if let Some(&v) = self.made.get(name) {
            return Ok(v);
        }
        let (t, probe) = match self.env.get(name) {
            Some(Val::Known { t, probe }) => (t.clone(), probe.clone()),
            _ => match self.m.file.initializers.get(name) {
                Some(t) => (t.clone(), t.clone()),
                None => return Err(self.err(format!("value `{name}` is not available"))),
            },
        };
        if t != probe {
            return Err(self.err(format!(
                "value `{name}` depends on the batch size and is used as data; only Reshape targets may"
            )));
        }
        let init = self.is_init(name) && t.dtype().is_float();
        let kind = kind.or((init && t.shape().iter().product::<usize>() > 1).then_some(InputKind::Param));
        let v = match kind {
            Some(k) if init => self.net.given(name, k, t.cast(DType::F32))?,
            _ => self.net.g.constant(t),
        };
        self.made.insert(name.to_string(), v);
        Ok(v)
    }

    /// Input `i` as a float graph value of `like`'s element type.
    fn float_in(&mut self, node: &OnnxNode, i: usize) -> Result<Value> {
        let name = node.input(i).ok_or_else(|| self.err(unsupported(node, &format!("input {i} is missing"))))?;
        let v = self.live(name, None)?;
        let dt = self.net.g.dtype(v);
        if !dt.is_float() {
            return Err(self.err(unsupported(node, &format!("input `{name}` is {dt}, a float tensor is needed"))));
        }
        Ok(v)
    }

    fn known(&self, node: &OnnxNode, i: usize) -> Result<Option<(Tensor, Tensor)>> {
        let Some(name) = node.input(i) else { return Ok(None) };
        match self.get(node, name)? {
            Val::Known { t, probe } => Ok(Some((t, probe))),
            Val::Live(_) => Ok(None),
        }
    }

    /// Input `i` as integers known at import time (axes, pads, shapes), batch-independent.
    fn ints_in(&self, node: &OnnxNode, i: usize) -> Result<Option<Vec<i64>>> {
        if node.input(i).is_none() {
            return Ok(None);
        }
        match self.known(node, i)? {
            Some((t, p)) if t == p => Ok(Some(t.to_f64_vec().iter().map(|&x| x as i64).collect())),
            Some(_) => Err(self.err(unsupported(node, &format!("input {i} depends on the batch size")))),
            None => Err(self.err(unsupported(
                node,
                &format!("input `{}` is computed from the data; it must fold to a constant", node.inputs[i]),
            ))),
        }
    }

    fn scalar_in(&self, node: &OnnxNode, i: usize) -> Result<Option<f64>> {
        if node.input(i).is_none() {
            return Ok(None);
        }
        match self.known(node, i)? {
            Some((t, _)) if t.shape().iter().product::<usize>() == 1 => Ok(Some(t.to_f64_vec()[0])),
            _ => Err(self.err(unsupported(node, &format!("input {i} must be a constant scalar")))),
        }
    }

    fn bm(&self, v: Value) -> bool {
        self.batch_major.contains(&v)
    }

    fn set(&mut self, node: &OnnxNode, v: Value, batch_major: bool) {
        if batch_major {
            self.batch_major.insert(v);
        }
        self.env.insert(node.outputs[0].clone(), Val::Live(v));
    }

    fn set_known(&mut self, node: &OnnxNode, t: Tensor, probe: Tensor) {
        self.env.insert(node.outputs[0].clone(), Val::Known { t, probe });
    }

    fn transpose(&mut self, x: Value, perm: Vec<usize>) -> Result<Value> {
        let bm = self.bm(x) && perm.first() == Some(&0);
        let (src, perm) = match self.transposed.get(&x) {
            Some((src, p1)) => (*src, perm.iter().map(|&i| p1[i]).collect::<Vec<_>>()),
            None => (x, perm),
        };
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(src);
        }
        let y = self.net.g.transpose_node(src, &perm)?;
        self.transposed.insert(y, (src, perm));
        if bm {
            self.batch_major.insert(y);
        }
        Ok(y)
    }

    fn all_known(&self, node: &OnnxNode) -> bool {
        node.inputs.iter().filter(|s| !s.is_empty()).all(|n| matches!(self.get(node, n), Ok(Val::Known { .. })))
    }

    fn node(&mut self, node: &OnnxNode) -> Result<()> {
        let op = node.op.as_str();
        let opset = self.m.file.opset;
        if node.outputs.len() > 1 && !matches!(op, "Dropout" | "BatchNormalization" | "MaxPool") {
            return Err(self.err(unsupported(node, "nodes with more than one output are not supported")));
        }
        if op != "Constant" && self.all_known(node) && !node.inputs.is_empty() {
            return self.fold(node);
        }
        match op {
            "Constant" => return self.fold(node),
            "Identity" | "Dropout" => {
                let x = self.float_in(node, 0)?;
                if node.outputs.len() > 1 && node.outputs[1..].iter().any(|o| !o.is_empty()) {
                    return Err(self.err(unsupported(node, "its mask output is not supported")));
                }
                let bm = self.bm(x);
                self.set(node, x, bm);
            }
            "Relu" | "Sigmoid" | "Exp" | "Log" | "Sqrt" | "Neg" | "Reciprocal" => {
                let x = self.float_in(node, 0)?;
                let y = match op {
                    "Relu" => self.g().relu(x)?,
                    "Sigmoid" => self.g().sigmoid(x)?,
                    "Exp" => self.g().exp(x)?,
                    "Log" => self.g().log(x)?,
                    "Sqrt" => self.g().sqrt(x)?,
                    "Neg" => self.g().neg(x)?,
                    _ => self.g().reciprocal(x)?,
                };
                let bm = self.bm(x);
                self.set(node, y, bm);
            }
            "Clip" => {
                let x = self.float_in(node, 0)?;
                let (lo, hi) = if opset < 11 {
                    (node.attr_float("min", f32::MIN) as f64, node.attr_float("max", f32::MAX) as f64)
                } else {
                    (
                        self.scalar_in(node, 1)?.unwrap_or(f64::NEG_INFINITY),
                        self.scalar_in(node, 2)?.unwrap_or(f64::INFINITY),
                    )
                };
                let y = self.g().clip(x, lo, hi)?;
                let bm = self.bm(x);
                self.set(node, y, bm);
            }
            "HardSigmoid" | "HardSwish" => {
                let x = self.float_in(node, 0)?;
                let (alpha, beta) = if op == "HardSwish" {
                    (1.0 / 6.0, 0.5)
                } else {
                    (node.attr_float("alpha", 0.2) as f64, node.attr_float("beta", 0.5) as f64)
                };
                let a = self.g().mul_scalar(x, alpha)?;
                let b = self.g().add_scalar(a, beta)?;
                let mut y = self.g().clip(b, 0.0, 1.0)?;
                if op == "HardSwish" {
                    y = self.g().mul(x, y)?;
                }
                let bm = self.bm(x);
                self.set(node, y, bm);
            }
            "LeakyRelu" => {
                let x = self.float_in(node, 0)?;
                let alpha = node.attr_float("alpha", 0.01) as f64;
                if !(0.0..=1.0).contains(&alpha) {
                    return Err(self.err(unsupported(node, &format!("alpha {alpha} outside [0, 1] is not supported"))));
                }
                let a = self.g().mul_scalar(x, alpha)?;
                let y = self.g().max(x, a)?;
                let bm = self.bm(x);
                self.set(node, y, bm);
            }
            "Softmax" => {
                let x = self.float_in(node, 0)?;
                let rank = self.g().shape(x).len() as i64;
                let axis = node.attr_int("axis", if opset < 13 { 1 } else { -1 });
                let axis = if axis < 0 { axis + rank } else { axis };
                if opset < 13 && axis != rank - 1 {
                    return Err(self.err(unsupported(
                        node,
                        "before opset 13 Softmax flattens from `axis`; only the last axis is supported",
                    )));
                }
                let m = self.g().reduce_max(x, &[axis], true)?;
                let c = self.g().sub(x, m)?;
                let e = self.g().exp(c)?;
                let s = self.g().reduce_sum(e, &[axis], true)?;
                let y = self.g().div(e, s)?;
                let bm = self.bm(x) && axis != 0;
                self.set(node, y, bm);
            }
            "Add" | "Sub" | "Mul" | "Div" | "Max" | "Min" => {
                if node.inputs.len() != 2 {
                    return Err(self.err(unsupported(node, "only two operands are supported")));
                }
                let a = self.float_in(node, 0)?;
                let b = self.float_in(node, 1)?;
                let b = if self.g().dtype(b) != self.g().dtype(a) {
                    let dt = self.g().dtype(a);
                    self.g().cast(b, dt)?
                } else {
                    b
                };
                let y = match op {
                    "Add" => self.g().add(a, b)?,
                    "Sub" => self.g().sub(a, b)?,
                    "Mul" => self.g().mul(a, b)?,
                    "Div" => self.g().div(a, b)?,
                    "Max" => self.g().max(a, b)?,
                    _ => self.g().min(a, b)?,
                };
                let batch = self.batch;
                let bm = (self.bm(a) || self.bm(b)) && self.g().shape(y).first() == Some(&batch);
                self.set(node, y, bm);
            }
            "Pow" => {
                let x = self.float_in(node, 0)?;
                let p = self.scalar_in(node, 1)?.ok_or_else(|| self.err(unsupported(node, "no exponent")))?;
                let y = self.g().pow_scalar(x, p)?;
                let bm = self.bm(x);
                self.set(node, y, bm);
            }
            "Conv" => self.conv(node)?,
            "BatchNormalization" => self.batch_norm(node)?,
            "Gemm" | "MatMul" => {
                let a = self.float_in(node, 0)?;
                let b = self.param_in(node, 1, InputKind::Param)?;
                let y = if op == "MatMul" {
                    self.g().matmul(a, b)?
                } else {
                    let c = match node.input(2) {
                        Some(_) => Some(self.param_in(node, 2, InputKind::Param)?),
                        None => None,
                    };
                    let o = Gemm {
                        alpha: node.attr_float("alpha", 1.0),
                        beta: node.attr_float("beta", 1.0),
                        trans_a: node.attr_int("transA", 0) != 0,
                        trans_b: node.attr_int("transB", 0) != 0,
                    };
                    self.g().gemm(a, b, c, o)?
                };
                let bm = self.bm(a) && (op == "MatMul" || node.attr_int("transA", 0) == 0);
                self.set(node, y, bm);
            }
            "GlobalAveragePool" => {
                let x = self.float_in(node, 0)?;
                let y = self.g().global_avg_pool(x)?;
                let bm = self.bm(x);
                self.set(node, y, bm);
            }
            "MaxPool" | "AveragePool" => self.pool(node)?,
            "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceSumSquare" => {
                let x = self.float_in(node, 0)?;
                let rank = self.g().shape(x).len();
                let axes_in_input = op == "ReduceSum" && opset >= 13 || opset >= 18;
                let axes = if axes_in_input { self.ints_in(node, 1)? } else { node.attr_ints("axes") };
                let axes = match axes {
                    Some(a) if !a.is_empty() => a,
                    _ if node.attr_int("noop_with_empty_axes", 0) != 0 => {
                        let bm = self.bm(x);
                        self.set(node, x, bm);
                        return Ok(());
                    }
                    _ => (0..rank as i64).collect(),
                };
                let keep = node.attr_int("keepdims", 1) != 0;
                let y = match op {
                    "ReduceMean" => self.g().reduce_mean(x, &axes, keep)?,
                    "ReduceSum" => self.g().reduce_sum(x, &axes, keep)?,
                    "ReduceMax" => self.g().reduce_max(x, &axes, keep)?,
                    _ => self.g().reduce_sum_square(x, &axes, keep)?,
                };
                let bm = self.bm(x) && axes.iter().all(|&a| a != 0 && a != -(rank as i64));
                self.set(node, y, bm);
            }
            "Flatten" => {
                let x = self.float_in(node, 0)?;
                let axis = node.attr_int("axis", 1);
                let y = self.g().flatten(x, axis)?;
                let bm = self.bm(x) && axis != 0;
                self.set(node, y, bm);
            }
            "Reshape" => self.reshape(node)?,
            "Squeeze" | "Unsqueeze" => {
                let x = self.float_in(node, 0)?;
                let axes = if opset >= 13 { self.ints_in(node, 1)? } else { node.attr_ints("axes") };
                let shape = self.g().shape(x).to_vec();
                let (y, touches_batch) = if op == "Squeeze" {
                    let axes =
                        axes.unwrap_or_else(|| (0..shape.len() as i64).filter(|&i| shape[i as usize] == 1).collect());
                    let zero = axes_of(&axes, shape.len()).map_err(|r| self.err(unsupported(node, &r)))?.contains(&0);
                    (self.g().squeeze(x, &axes)?, zero)
                } else {
                    let axes = axes.ok_or_else(|| self.err(unsupported(node, "no axes")))?;
                    let rank = shape.len() + axes.len();
                    let zero = axes_of(&axes, rank).map_err(|r| self.err(unsupported(node, &r)))?.contains(&0);
                    (self.g().unsqueeze(x, &axes)?, zero)
                };
                let bm = self.bm(x) && !touches_batch;
                self.set(node, y, bm);
            }
            "Transpose" => {
                let x = self.float_in(node, 0)?;
                let rank = self.g().shape(x).len();
                let perm: Vec<usize> = match node.attr_ints("perm") {
                    Some(p) => p.iter().map(|&a| if a < 0 { (a + rank as i64) as usize } else { a as usize }).collect(),
                    None => (0..rank).rev().collect(),
                };
                let y = self.transpose(x, perm)?;
                self.env.insert(node.outputs[0].clone(), Val::Live(y));
            }
            "Concat" => {
                let axis = node.attr_int("axis", 0);
                let mut xs = Vec::new();
                for i in 0..node.inputs.len() {
                    xs.push(self.float_in(node, i)?);
                }
                let y = self.g().concat(&xs, axis)?;
                let bm = axis != 0 && xs.iter().all(|&x| self.bm(x));
                self.set(node, y, bm);
            }
            "Pad" => {
                let x = self.float_in(node, 0)?;
                let mode = node.attr_str("mode").unwrap_or("constant");
                if mode != "constant" {
                    return Err(
                        self.err(unsupported(node, &format!("mode `{mode}`; only constant padding is supported")))
                    );
                }
                let (pads, value) = if opset < 11 {
                    (node.attr_ints("pads"), node.attr_float("value", 0.0) as f64)
                } else {
                    if node.input(3).is_some() {
                        return Err(self.err(unsupported(node, "the `axes` input is not supported")));
                    }
                    (self.ints_in(node, 1)?, self.scalar_in(node, 2)?.unwrap_or(0.0))
                };
                let pads = pads.ok_or_else(|| self.err(unsupported(node, "no pads")))?;
                if pads.iter().any(|&p| p < 0) {
                    return Err(self.err(unsupported(node, &format!("negative pads {pads:?} are not supported"))));
                }
                let pads: Vec<usize> = pads.iter().map(|&p| p as usize).collect();
                let bm = self.bm(x) && pads[0] == 0 && pads[pads.len() / 2] == 0;
                let y = self.g().pad_value(x, &pads, value)?;
                self.set(node, y, bm);
            }
            "Slice" => {
                let x = self.float_in(node, 0)?;
                let rank = self.g().shape(x).len();
                let spec = slice_spec(self.slice_args(node)?, rank).map_err(|r| self.err(unsupported(node, &r)))?;
                let bm = self.bm(x) && spec.iter().all(|&(axis, ..)| axis != 0);
                // Axis by axis: a positive step is a Slice node; a negative one (TensorFlow's
                // `x[..., ::-1]`, a channel flip) is a Gather of the indices it takes, whose
                // gradient scatters back.
                let mut y = x;
                for (axis, s, e, st) in spec {
                    y = if st > 0 {
                        self.g().slice(y, &[axis as i64], &[s], &[e], &[st])?
                    } else {
                        let d = self.g().shape(y)[axis];
                        let idx = slice_indices(d, s, e, st).map_err(|r| self.err(unsupported(node, &r)))?;
                        let n = idx.len();
                        let idx = self.g().constant(Tensor::i64(&[n], idx.into_iter().map(|i| i as i64).collect())?);
                        self.g().gather(y, idx, axis as i64)?
                    };
                }
                self.set(node, y, bm);
            }
            "Gather" => {
                let x = self.float_in(node, 0)?;
                let idx =
                    self.known(node, 1)?.ok_or_else(|| self.err(unsupported(node, "indices must be constant")))?;
                let idx = self.g().constant(idx.0.cast(DType::I64));
                let axis = node.attr_int("axis", 0);
                let bm = self.bm(x) && axis != 0;
                let y = self.g().gather(x, idx, axis)?;
                self.set(node, y, bm);
            }
            "Cast" => {
                let x = self.float_in(node, 0)?;
                let to = match node.attr_int("to", 0) as i32 {
                    crate::graph::import::dtype::FLOAT => DType::F32,
                    crate::graph::import::dtype::DOUBLE => DType::F64,
                    other => {
                        return Err(self.err(unsupported(
                            node,
                            &format!(
                                "a cast of computed data to {} is not supported",
                                crate::graph::import::dtype::name(other)
                            ),
                        )));
                    }
                };
                let y = if self.g().dtype(x) == to { x } else { self.g().cast(x, to)? };
                let bm = self.bm(x);
                self.set(node, y, bm);
            }
            "Shape" => {
                let x = self.float_in(node, 0)?;
                let s = self.g().shape(x).to_vec();
                let mut probe = s.clone();
                if self.bm(x) {
                    probe[0] += 1;
                }
                let (start, end) = (node.attr_int("start", 0), node.attr_int("end", s.len() as i64));
                let clip = |v: i64| (if v < 0 { v + s.len() as i64 } else { v }).clamp(0, s.len() as i64) as usize;
                let (a, b) = (clip(start), clip(end).max(clip(start)));
                let t = |d: &[usize]| Tensor::i64(&[b - a], d[a..b].iter().map(|&x| x as i64).collect());
                let (t, p) = (t(&s)?, t(&probe)?);
                self.set_known(node, t, p);
            }
            _ => {
                return Err(self.err(unsupported(
                    node,
                    &format!("the op is not supported; supported ops: {}", SUPPORTED_OPS.join(", ")),
                )));
            }
        }
        Ok(())
    }

    /// An initializer input as a parameter / buffer (or a computed value as it is).
    fn param_in(&mut self, node: &OnnxNode, i: usize, kind: InputKind) -> Result<Value> {
        let name = node.input(i).ok_or_else(|| self.err(unsupported(node, &format!("input {i} is missing"))))?;
        if self.is_init(name) {
            return self.live(name, Some(kind));
        }
        self.float_in(node, i)
    }

    fn conv(&mut self, node: &OnnxNode) -> Result<()> {
        let x = self.float_in(node, 0)?;
        let wname = node.input(1).unwrap_or_default();
        if !self.is_init(wname) {
            return Err(self.err(unsupported(node, "weights computed in the graph are not supported")));
        }
        let w = self.live(wname, Some(InputKind::Param))?;
        let b = match node.input(2) {
            Some(_) => Some(self.param_in(node, 2, InputKind::Param)?),
            None => None,
        };
        let ws = self.net.g.shape(w).to_vec();
        let xs = self.net.g.shape(x).to_vec();
        if ws.len() != 4 || xs.len() != 4 || ws.contains(&0) {
            return Err(self.err(unsupported(node, &format!("only 2-D convolutions are supported (weight {ws:?})"))));
        }
        let stride = square(node, "strides", 1).map_err(|r| self.err(r))?;
        let dilation = square(node, "dilations", 1).map_err(|r| self.err(r))?;
        let groups = node.attr_int("group", 1).max(1) as usize;
        let pads = window_pads(node, [xs[2], xs[3]], [ws[2], ws[3]], stride, dilation).map_err(|r| self.err(r))?;
        let c = Conv2d { stride, dilation, groups, ..Default::default() };
        let y = self.net.conv_padded(x, w, b, c, pads)?;
        let bm = self.bm(x);
        self.set(node, y, bm);
        Ok(())
    }

    fn batch_norm(&mut self, node: &OnnxNode) -> Result<()> {
        if node.attr_int("training_mode", 0) != 0 {
            return Err(self.err(unsupported(node, "training_mode = 1 is not supported (export in eval mode)")));
        }
        if node.outputs.iter().skip(1).any(|o| !o.is_empty()) {
            return Err(self.err(unsupported(node, "only the first output (Y) is supported")));
        }
        let x = self.float_in(node, 0)?;
        let mut p = [x; 4];
        for (i, kind) in
            [InputKind::Param, InputKind::Param, InputKind::Buffer, InputKind::Buffer].into_iter().enumerate()
        {
            let name = node.input(i + 1).unwrap_or_default();
            if !self.is_init(name) {
                return Err(self.err(unsupported(
                    node,
                    &format!("input {} (`{name}`) must be an initializer", ["scale", "B", "mean", "var"][i]),
                )));
            }
            p[i] = self.live(name, Some(kind))?;
        }
        let o = BatchNorm {
            eps: node.attr_float("epsilon", 1e-5) as f64,
            momentum: 1.0 - node.attr_float("momentum", 0.9) as f64,
        };
        let y = self.net.bn_with(x, p, o)?;
        let bm = self.bm(x);
        self.set(node, y, bm);
        Ok(())
    }

    fn pool(&mut self, node: &OnnxNode) -> Result<()> {
        let x = self.float_in(node, 0)?;
        if node.outputs.len() > 1 && !node.outputs[1].is_empty() {
            return Err(self.err(unsupported(node, "the Indices output is not supported")));
        }
        let xs = self.net.g.shape(x).to_vec();
        if xs.len() != 4 {
            return Err(self.err(unsupported(node, &format!("only 2-D pooling is supported (input {xs:?})"))));
        }
        let k = node.attr_ints("kernel_shape").unwrap_or_default();
        let [kh, kw] = k.as_slice() else {
            return Err(self.err(unsupported(node, &format!("kernel_shape {k:?} is not 2-D"))));
        };
        if *kh < 1 || *kw < 1 {
            return Err(self.err(unsupported(node, &format!("kernel_shape {k:?} is not positive"))));
        }
        let (kh, kw) = (*kh as usize, *kw as usize);
        let stride = square(node, "strides", 1).map_err(|r| self.err(r))?;
        let dilation = square(node, "dilations", 1).map_err(|r| self.err(r))?;
        if dilation != 1 {
            return Err(self.err(unsupported(node, "dilated pooling is not supported")));
        }
        let mut pads = window_pads(node, [xs[2], xs[3]], [kh, kw], stride, 1).map_err(|r| self.err(r))?;
        if node.attr_int("ceil_mode", 0) != 0 {
            // Pad the end so floor mode yields ceil mode's count (the last window must start
            // inside the image or its leading padding, as ONNX Runtime and PyTorch do).
            for (d, (n, kk)) in [(xs[2], kh), (xs[3], kw)].into_iter().enumerate() {
                let span = n + pads[d] + pads[d + 2];
                if span < kk {
                    continue;
                }
                let mut out = (span - kk).div_ceil(stride) + 1;
                if (out - 1) * stride >= n + pads[d] {
                    out -= 1;
                }
                let need = (out - 1) * stride + kk;
                if need > span {
                    if node.op == "AveragePool" {
                        return Err(
                            self.err(unsupported(node, "ceil_mode that adds a partial window is not supported"))
                        );
                    }
                    pads[d + 2] += need - span;
                }
            }
        }
        let bm = self.bm(x);
        let [t, l, b, r] = pads;
        let y = if node.op == "MaxPool" {
            if kh != kw {
                return Err(self.err(unsupported(node, "only square max-pooling windows are supported")));
            }
            if t == l && t == b && t == r && 2 * t <= kh {
                self.net.g.max_pool(x, Pool2d { kernel: kh, stride, pad: t })?
            } else {
                let p = self.net.g.pad_value(x, &[0, 0, t, l, 0, 0, b, r], f64::NEG_INFINITY)?;
                self.net.g.max_pool(p, Pool2d { kernel: kh, stride, pad: 0 })?
            }
        } else if pads == [0; 4] && kh == xs[2] && kw == xs[3] {
            self.net.g.global_avg_pool(x)?
        } else {
            // A depthwise convolution with a constant 1/(kh·kw) kernel; without
            // count_include_pad, the sums over padded windows are divided by the real counts.
            let c = xs[1];
            let include = node.attr_int("count_include_pad", 0) != 0 || pads == [0; 4];
            let wv = if include { 1.0 / (kh * kw) as f32 } else { 1.0 };
            let w = self.net.g.constant(Tensor::f32(&[c, 1, kh, kw], vec![wv; c * kh * kw])?);
            let conv = Conv2d { stride, groups: c, ..Default::default() };
            let padded = if pads == [0; 4] { x } else { self.net.g.pad(x, &[0, 0, t, l, 0, 0, b, r])? };
            let sum = self.net.g.conv(padded, w, None, conv)?;
            if include {
                sum
            } else {
                let os = self.net.g.shape(sum).to_vec();
                let (ho, wo) = (os[2], os[3]);
                let mut count = Vec::with_capacity(ho * wo);
                let inside = |o: usize, k: usize, p: usize, n: usize| {
                    (0..k).filter(|j| (o * stride + j).checked_sub(p).is_some_and(|v| v < n)).count()
                };
                for i in 0..ho {
                    for j in 0..wo {
                        count.push((inside(i, kh, t, xs[2]) * inside(j, kw, l, xs[3])) as f32);
                    }
                }
                let cnt = self.net.g.constant(Tensor::f32(&[1, 1, ho, wo], count)?);
                self.net.g.div(sum, cnt)?
            }
        };
        self.set(node, y, bm);
        Ok(())
    }

    fn reshape(&mut self, node: &OnnxNode) -> Result<()> {
        let x = self.float_in(node, 0)?;
        let (t, probe) = self.known(node, 1)?.ok_or_else(|| {
            self.err(unsupported(node, "the target shape is computed from the data and does not fold"))
        })?;
        if node.attr_int("allowzero", 0) != 0 && t.to_f64_vec().contains(&0.0) {
            return Err(self.err(unsupported(node, "allowzero with a 0 in the shape is not supported")));
        }
        let target: Vec<i64> = t.to_f64_vec().iter().map(|&v| v as i64).collect();
        let probe: Vec<i64> = probe.to_f64_vec().iter().map(|&v| v as i64).collect();
        let xs = self.net.g.shape(x).to_vec();
        let fixed_batch = self.m.file.image_input()?.dims[0].map(|b| b as usize);
        let varies: Vec<usize> = (0..target.len()).filter(|&i| target.get(i) != probe.get(i)).collect();
        // The batch stays symbolic when the target carries it at position 0: computed from the
        // input's shape (it changes with the batch), or a literal equal to a fixed batch of the
        // file, or `0` (copy).
        let keeps_batch = self.bm(x)
            && !target.is_empty()
            && (varies == [0] && target[0] == self.batch as i64
                || varies.is_empty() && target[0] == 0
                || varies.is_empty() && fixed_batch.is_some_and(|b| target[0] == b as i64 && b == self.batch));
        if !keeps_batch && !varies.is_empty() {
            return Err(self.err(unsupported(
                node,
                &format!("the target shape {target:?} depends on the batch size other than in dimension 0"),
            )));
        }
        let y = if keeps_batch {
            self.net.g.reshape_keep_batch(x, &target[1..])?
        } else {
            if self.bm(x) && target.first().is_some_and(|&d| d == -1) && xs[0] == self.batch {
                // [-1, rest]: the batch is inferred; keep it symbolic too.
                let y = self.net.g.reshape_keep_batch(x, &target[1..])?;
                self.set(node, y, true);
                return Ok(());
            }
            self.net.g.reshape(x, &target)?
        };
        self.set(node, y, keeps_batch);
        Ok(())
    }

    fn slice_args(&self, node: &OnnxNode) -> Result<SliceArgs> {
        if self.m.file.opset < 10 {
            let s = node.attr_ints("starts").unwrap_or_default();
            let e = node.attr_ints("ends").unwrap_or_default();
            return Ok((s, e, node.attr_ints("axes"), None));
        }
        let need = |i: usize| -> Result<Vec<i64>> {
            self.ints_in(node, i)?.ok_or_else(|| self.err(unsupported(node, &format!("input {i} is missing"))))
        };
        Ok((need(1)?, need(2)?, self.ints_in(node, 3)?, self.ints_in(node, 4)?))
    }

    /// Evaluates a node whose inputs are all known (at the batch and at batch + 1).
    fn fold(&mut self, node: &OnnxNode) -> Result<()> {
        let mut ins = Vec::new();
        let mut probes = Vec::new();
        for i in 0..node.inputs.len() {
            match self.known(node, i)? {
                Some((t, p)) => {
                    ins.push(Some(t));
                    probes.push(Some(p));
                }
                None => {
                    ins.push(None);
                    probes.push(None);
                }
            }
        }
        let opset = self.m.file.opset;
        let t = fold_op(node, &ins, opset).map_err(|r| self.err(unsupported(node, &r)))?;
        let p = fold_op(node, &probes, opset).map_err(|r| self.err(unsupported(node, &r)))?;
        self.set_known(node, t, p);
        Ok(())
    }
}

/// Slice's starts, ends, axes and steps.
type SliceArgs = (Vec<i64>, Vec<i64>, Option<Vec<i64>>, Option<Vec<i64>>);

/// A pair attribute (`strides`, `dilations`) that must have equal entries.
fn square(node: &OnnxNode, name: &str, default: usize) -> std::result::Result<usize, String> {
    match node.attr_ints(name).as_deref() {
        None | Some([]) => Ok(default),
        Some([a, b]) if a == b && *a > 0 => Ok(*a as usize),
        Some(v) => Err(unsupported(node, &format!("{name} {v:?}: only equal positive values in both dimensions"))),
    }
}

/// `[top, left, bottom, right]` from `pads` or `auto_pad`.
fn window_pads(
    node: &OnnxNode,
    n: [usize; 2],
    k: [usize; 2],
    stride: usize,
    dilation: usize,
) -> std::result::Result<[usize; 4], String> {
    let auto = node.attr_str("auto_pad").unwrap_or("NOTSET");
    match auto {
        "NOTSET" | "" => match node.attr_ints("pads").as_deref() {
            None => Ok([0; 4]),
            Some(p) if p.len() == 4 && p.iter().all(|&x| x >= 0) => {
                Ok([p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize])
            }
            Some(p) => Err(unsupported(node, &format!("pads {p:?} are not 4 non-negative values"))),
        },
        "VALID" => Ok([0; 4]),
        "SAME_UPPER" | "SAME_LOWER" => {
            let kd = |kk: usize| dilation * (kk - 1) + 1;
            let (t, b) = tf_same_pads(n[0], kd(k[0]), stride);
            let (l, r) = tf_same_pads(n[1], kd(k[1]), stride);
            Ok(if auto == "SAME_UPPER" { [t, l, b, r] } else { [b, r, t, l] })
        }
        other => Err(unsupported(node, &format!("auto_pad {other} is not supported"))),
    }
}

fn axes_of(v: &[i64], rank: usize) -> std::result::Result<Vec<usize>, String> {
    v.iter()
        .map(|&a| {
            let r = if a < 0 { a + rank as i64 } else { a };
            if r < 0 || r >= rank as i64 {
                Err(format!("axis {a} out of range for rank {rank}"))
            } else {
                Ok(r as usize)
            }
        })
        .collect()
}

/// A Slice's arguments as `(axis, start, end, step)` per sliced axis, for a tensor of rank
/// `rank`: absent axes are the first `starts.len()`, absent steps 1; the lists must agree in length.
fn slice_spec(args: SliceArgs, rank: usize) -> std::result::Result<Vec<(usize, i64, i64, i64)>, String> {
    let (starts, ends, axes, steps) = args;
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(format!("starts {starts:?}, ends {ends:?}, axes {axes:?}, steps {steps:?} differ in length"));
    }
    let axes = axes_of(&axes, rank)?;
    Ok((0..axes.len()).map(|i| (axes[i], starts[i], ends[i], steps[i])).collect())
}

/// The indices ONNX `Slice` (opset 10+) takes along an axis of length `d`: a negative start or end
/// counts from the end; both are clamped to `[0, d]` for a positive step and to `[0, d - 1]` /
/// `[-1, d - 1]` for a negative one (so `end = INT64_MIN` with step -1 runs to the first element).
pub(crate) fn slice_indices(d: usize, start: i64, end: i64, step: i64) -> std::result::Result<Vec<usize>, String> {
    if step == 0 {
        return Err("a Slice step of 0".into());
    }
    let n = d as i64;
    let from_end = |v: i64| if v < 0 { v.saturating_add(n) } else { v };
    let mut out = Vec::new();
    if step > 0 {
        let (mut i, e) = (from_end(start).clamp(0, n), from_end(end).clamp(0, n));
        while i < e {
            out.push(i as usize);
            i = i.saturating_add(step);
        }
    } else if n > 0 {
        let (mut i, e) = (from_end(start).clamp(0, n - 1), from_end(end).clamp(-1, n - 1));
        while i > e {
            out.push(i as usize);
            i = i.saturating_add(step);
        }
    }
    Ok(out)
}

/// Import-time evaluation of the ops that shape arithmetic uses.
fn fold_op(node: &OnnxNode, ins: &[Option<Tensor>], opset: i64) -> std::result::Result<Tensor, String> {
    use ndarray::{ArrayD, Axis, IxDyn};
    let need = |i: usize| ins.get(i).and_then(|t| t.as_ref()).ok_or_else(|| format!("input {i} is missing"));
    let f64s = |t: &Tensor| ArrayD::from_shape_vec(IxDyn(t.shape()), t.to_f64_vec()).expect("same count");
    let like = |a: ArrayD<f64>, dt: DType| Tensor::F64(a).cast(dt);
    let ints = |t: &Tensor| t.to_f64_vec().iter().map(|&v| v as i64).collect::<Vec<_>>();
    let op = node.op.as_str();
    Ok(match op {
        "Constant" => {
            if let Some(Attr::Tensor(t)) = node.attr("value") {
                t.clone()
            } else if let Some(Attr::Float(f)) = node.attr("value_float") {
                Tensor::full(DType::F32, &[], *f as f64)
            } else if let Some(Attr::Int(i)) = node.attr("value_int") {
                Tensor::full(DType::I64, &[], *i as f64)
            } else if let Some(Attr::Floats(v)) = node.attr("value_floats") {
                Tensor::f32(&[v.len()], v.clone()).map_err(|e| e.to_string())?
            } else if let Some(Attr::Ints(v)) = node.attr("value_ints") {
                Tensor::i64(&[v.len()], v.clone()).map_err(|e| e.to_string())?
            } else {
                return Err("a Constant without a value, value_float(s) or value_int(s) is not supported".into());
            }
        }
        "Identity" | "Dropout" => need(0)?.clone(),
        "Shape" => {
            let s = need(0)?.shape().to_vec();
            Tensor::i64(&[s.len()], s.iter().map(|&d| d as i64).collect()).map_err(|e| e.to_string())?
        }
        "Cast" => {
            let to = match node.attr_int("to", 0) as i32 {
                crate::graph::import::dtype::FLOAT => DType::F32,
                crate::graph::import::dtype::DOUBLE => DType::F64,
                crate::graph::import::dtype::BOOL => DType::Bool,
                _ => DType::I64,
            };
            need(0)?.cast(to)
        }
        "Add" | "Sub" | "Mul" | "Div" | "Max" | "Min" | "Pow" => {
            let (a, b) = (need(0)?, need(1)?);
            let out = crate::graph::ops::broadcast(op, a.shape(), b.shape()).map_err(|e| e.to_string())?;
            let (fa, fb) = (f64s(a), f64s(b));
            let (va, vb) =
                (fa.broadcast(IxDyn(&out)).expect("broadcasts"), fb.broadcast(IxDyn(&out)).expect("broadcasts"));
            let int = a.dtype() == DType::I64;
            let r: Vec<f64> = va
                .iter()
                .zip(vb.iter())
                .map(|(&x, &y)| match op {
                    "Add" => x + y,
                    "Sub" => x - y,
                    "Mul" => x * y,
                    "Div" if int => {
                        if y == 0.0 {
                            0.0
                        } else {
                            (x / y).trunc()
                        }
                    }
                    "Div" => x / y,
                    "Max" => x.max(y),
                    "Min" => x.min(y),
                    _ => x.powf(y),
                })
                .collect();
            like(ArrayD::from_shape_vec(IxDyn(&out), r).expect("same count"), a.dtype())
        }
        "Gather" => {
            let (a, idx) = (need(0)?, need(1)?);
            let axis = axes_of(&[node.attr_int("axis", 0)], a.shape().len())?[0];
            let d = a.shape()[axis] as i64;
            let ix: Vec<usize> = ints(idx)
                .iter()
                .map(|&i| {
                    let r = if i < 0 { i + d } else { i };
                    if r < 0 || r >= d { Err(format!("index {i} out of range {d}")) } else { Ok(r as usize) }
                })
                .collect::<std::result::Result<_, _>>()?;
            let fa = f64s(a);
            let sel = fa.select(Axis(axis), &ix);
            let mut shape = a.shape()[..axis].to_vec();
            shape.extend_from_slice(idx.shape());
            shape.extend_from_slice(&a.shape()[axis + 1..]);
            let v: Vec<f64> = sel.iter().copied().collect();
            like(ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| e.to_string())?, a.dtype())
        }
        "Unsqueeze" | "Squeeze" | "Reshape" | "Flatten" => {
            let a = need(0)?;
            let s = a.shape().to_vec();
            let axes = if op == "Reshape" || op == "Flatten" {
                None
            } else if opset >= 13 {
                ins.get(1).and_then(|t| t.as_ref()).map(ints)
            } else {
                node.attr_ints("axes")
            };
            let shape: Vec<usize> = match op {
                "Unsqueeze" => {
                    let axes = axes.ok_or("no axes")?;
                    let mut out = s.clone();
                    for a in
                        axes_of(&axes, s.len() + axes.len())?.into_iter().collect::<std::collections::BTreeSet<_>>()
                    {
                        out.insert(a, 1);
                    }
                    out
                }
                "Squeeze" => {
                    let ax = match axes {
                        Some(v) => axes_of(&v, s.len())?,
                        None => (0..s.len()).filter(|&i| s[i] == 1).collect(),
                    };
                    s.iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, &d)| d).collect()
                }
                "Flatten" => {
                    let ax = node.attr_int("axis", 1);
                    let ax = if ax < 0 { (ax + s.len() as i64) as usize } else { ax as usize };
                    vec![s[..ax].iter().product(), s[ax..].iter().product()]
                }
                _ => {
                    let target = ints(need(1)?);
                    let n: usize = s.iter().product();
                    let mut out: Vec<usize> = target
                        .iter()
                        .enumerate()
                        .map(|(i, &d)| if d == 0 { s.get(i).copied().unwrap_or(0) } else { d.max(1) as usize })
                        .collect();
                    if let Some(i) = target.iter().position(|&d| d == -1) {
                        let known: usize = out.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, &d)| d).product();
                        out[i] = n.checked_div(known).unwrap_or(0);
                    }
                    out
                }
            };
            if shape.iter().product::<usize>() != a.shape().iter().product::<usize>() {
                return Err(format!("cannot reshape {s:?} to {shape:?}"));
            }
            like(ArrayD::from_shape_vec(IxDyn(&shape), a.to_f64_vec()).expect("same count"), a.dtype())
        }
        "Concat" => {
            let parts: Vec<&Tensor> = (0..ins.len()).map(need).collect::<std::result::Result<_, _>>()?;
            let first = parts.first().ok_or("no operands")?;
            let axis = axes_of(&[node.attr_int("axis", 0)], first.shape().len())?[0];
            let arrs: Vec<ArrayD<f64>> = parts.iter().map(|t| f64s(t)).collect();
            let views: Vec<_> = arrs.iter().map(|a| a.view()).collect();
            let c = ndarray::concatenate(Axis(axis), &views).map_err(|e| e.to_string())?;
            like(c, first.dtype())
        }
        "Slice" => {
            let a = need(0)?;
            let args = if opset < 10 {
                (
                    node.attr_ints("starts").unwrap_or_default(),
                    node.attr_ints("ends").unwrap_or_default(),
                    node.attr_ints("axes"),
                    None,
                )
            } else {
                (
                    ints(need(1)?),
                    ints(need(2)?),
                    ins.get(3).and_then(|t| t.as_ref()).map(ints),
                    ins.get(4).and_then(|t| t.as_ref()).map(ints),
                )
            };
            let mut out = f64s(a);
            for (axis, s, e, st) in slice_spec(args, a.shape().len())? {
                let idx = slice_indices(out.shape()[axis], s, e, st)?;
                out = out.select(Axis(axis), &idx);
            }
            like(out, a.dtype())
        }
        "ConstantOfShape" => {
            let shape: Vec<usize> = ints(need(0)?).iter().map(|&d| d.max(0) as usize).collect();
            let (dt, v) = match node.attr("value") {
                Some(Attr::Tensor(t)) => (t.dtype(), t.to_f64_vec().first().copied().unwrap_or(0.0)),
                _ => (DType::F32, 0.0),
            };
            Tensor::full(dt, &shape, v)
        }
        "Range" => {
            let first = |i: usize| -> std::result::Result<f64, String> {
                need(i)?.to_f64_vec().first().copied().ok_or_else(|| format!("input {i} is empty"))
            };
            let (s, l, d) = (first(0)?, first(1)?, first(2)?);
            let n = if d == 0.0 { 0 } else { ((l - s) / d).ceil().max(0.0) as usize };
            let v: Vec<f64> = (0..n).map(|i| s + i as f64 * d).collect();
            like(ArrayD::from_shape_vec(IxDyn(&[n]), v).expect("1-D"), need(0)?.dtype())
        }
        other => return Err(format!("{other} on constants cannot be folded at import time")),
    })
}

#[cfg(test)]
mod tests;
