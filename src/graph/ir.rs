//! Graph IR: typed values with static shapes, ONNX nodes with attributes, constants, and the
//! graph's inputs (data, parameters, buffers, optimizer state) and outputs.

use std::collections::HashMap;

use ndarray::ArrayD;

use crate::{Error, Result};

/// Element type of a value. Floats are differentiable; `I64` and `Bool` never are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    I64,
    Bool,
}

impl DType {
    /// True for `F32` and `F64`.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }

    /// The `TensorProto.DataType` code.
    pub fn onnx(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::I64 => 7,
            DType::Bool => 9,
            DType::F64 => 11,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::Bool => "bool",
        })
    }
}

/// A handle to a value of one [`Graph`]. Handles are only meaningful in the graph that made them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value(pub(crate) u32);

impl Value {
    /// Position of the value in its graph (dense, starting at 0).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A host tensor: initial values of parameters, constants, and what a [`super::Runner`] feeds
/// and returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    I64(ArrayD<i64>),
    Bool(ArrayD<bool>),
}

macro_rules! tensor_from {
    ($t:ty, $var:ident, $as:ident, $into:ident) => {
        impl From<ArrayD<$t>> for Tensor {
            fn from(a: ArrayD<$t>) -> Self {
                Tensor::$var(a)
            }
        }
        impl Tensor {
            /// The array if the tensor has this element type.
            pub fn $as(&self) -> Option<&ArrayD<$t>> {
                match self {
                    Tensor::$var(a) => Some(a),
                    _ => None,
                }
            }
            /// The array, or a [`Error::GraphType`] naming the actual type.
            pub fn $into(self) -> Result<ArrayD<$t>> {
                match self {
                    Tensor::$var(a) => Ok(a),
                    other => Err(Error::GraphType {
                        op: "Tensor".into(),
                        detail: format!("expected {}, found {}", stringify!($t), other.dtype()),
                    }),
                }
            }
        }
    };
}
tensor_from!(f32, F32, as_f32, into_f32);
tensor_from!(f64, F64, as_f64, into_f64);
tensor_from!(i64, I64, as_i64, into_i64);
tensor_from!(bool, Bool, as_bool, into_bool);

impl Tensor {
    /// Builds an f32 tensor from a shape and row-major data.
    pub fn f32(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        Ok(Tensor::F32(array(shape, data)?))
    }

    /// Builds an f64 tensor from a shape and row-major data.
    pub fn f64(shape: &[usize], data: Vec<f64>) -> Result<Tensor> {
        Ok(Tensor::F64(array(shape, data)?))
    }

    /// Builds an i64 tensor from a shape and row-major data.
    pub fn i64(shape: &[usize], data: Vec<i64>) -> Result<Tensor> {
        Ok(Tensor::I64(array(shape, data)?))
    }

    /// A tensor of zeros.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        match dtype {
            DType::F32 => Tensor::F32(ArrayD::zeros(shape)),
            DType::F64 => Tensor::F64(ArrayD::zeros(shape)),
            DType::I64 => Tensor::I64(ArrayD::zeros(shape)),
            DType::Bool => Tensor::Bool(ArrayD::from_elem(shape, false)),
        }
    }

    /// A tensor of `shape` filled with `x` converted to `dtype` (non-zero is `true` for bool).
    pub fn full(dtype: DType, shape: &[usize], x: f64) -> Tensor {
        match dtype {
            DType::F32 => Tensor::F32(ArrayD::from_elem(shape, x as f32)),
            DType::F64 => Tensor::F64(ArrayD::from_elem(shape, x)),
            DType::I64 => Tensor::I64(ArrayD::from_elem(shape, x as i64)),
            DType::Bool => Tensor::Bool(ArrayD::from_elem(shape, x != 0.0)),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::F64(_) => DType::F64,
            Tensor::I64(_) => DType::I64,
            Tensor::Bool(_) => DType::Bool,
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(a) => a.shape(),
            Tensor::F64(a) => a.shape(),
            Tensor::I64(a) => a.shape(),
            Tensor::Bool(a) => a.shape(),
        }
    }

    /// The same values as `dtype` (floats rounded, bool as 0/1, non-zero as `true`).
    pub fn cast(&self, dtype: DType) -> Tensor {
        let v = self.to_f64_vec();
        let s = self.shape().to_vec();
        let a = |v: Vec<f64>| ArrayD::from_shape_vec(s.clone(), v).expect("same element count");
        match dtype {
            DType::F64 => Tensor::F64(a(v)),
            DType::F32 => Tensor::F32(a(v).mapv(|x| x as f32)),
            DType::I64 => Tensor::I64(a(v).mapv(|x| x as i64)),
            DType::Bool => Tensor::Bool(a(v).mapv(|x| x != 0.0)),
        }
    }

    /// The elements converted to f64, row-major (bool as 0/1). For constants and tests.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            Tensor::F32(a) => a.iter().map(|&x| x as f64).collect(),
            Tensor::F64(a) => a.iter().copied().collect(),
            Tensor::I64(a) => a.iter().map(|&x| x as f64).collect(),
            Tensor::Bool(a) => a.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect(),
        }
    }
}

fn array<T>(shape: &[usize], data: Vec<T>) -> Result<ArrayD<T>> {
    let n = data.len();
    ArrayD::from_shape_vec(shape, data).map_err(|_| Error::GraphShape {
        op: "Tensor".into(),
        detail: format!("{n} elements do not fill shape {shape:?}"),
    })
}

/// A node attribute (the ONNX `AttributeProto` kinds hiercon uses).
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    Str(String),
    Tensor(Tensor),
}

/// How autodiff computes a convolution's weight gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum ConvWeightGrad {
    /// Let [`super::grad`] pick by its measured rule (see `autodiff::conv`).
    #[default]
    Auto,
    /// A Conv over the transposed input with the output gradient as kernel (dilations = stride).
    Transposed,
    /// im2col: the input unfolded by a grouped Conv with 0/1 kernels, then one (batched) MatMul.
    Im2col,
    /// Stride-1 dense convolutions only: the input shifted `kh` times along rows and the output
    /// gradient `kw` times along columns (two grouped Convs with 0/1 kernels), then one batched
    /// MatMul: `kh + kw` copies instead of im2col's `kh·kw`. Elsewhere it falls back to `Im2col`.
    Shifted,
}

/// One ONNX node: op type (default domain only), inputs, outputs and attributes. Optional ONNX
/// inputs may only be omitted at the end of the list.
#[derive(Debug, Clone)]
pub struct Node {
    pub op: &'static str,
    pub inputs: Vec<Value>,
    pub outputs: Vec<Value>,
    pub attrs: Vec<(&'static str, Attr)>,
    /// Only read for `Conv`: the weight-gradient lowering requested by the builder.
    pub weight_grad: ConvWeightGrad,
}

impl Node {
    /// The attribute called `name`, if set.
    pub fn attr(&self, name: &str) -> Option<&Attr> {
        self.attrs.iter().find(|(n, _)| *n == name).map(|(_, a)| a)
    }

    /// An integer attribute, or `default` when absent.
    pub fn attr_int(&self, name: &str, default: i64) -> i64 {
        match self.attr(name) {
            Some(Attr::Int(i)) => *i,
            _ => default,
        }
    }

    /// A float attribute, or `default` when absent.
    pub fn attr_float(&self, name: &str, default: f32) -> f32 {
        match self.attr(name) {
            Some(Attr::Float(x)) => *x,
            _ => default,
        }
    }

    /// An integer-list attribute, or `default` when absent.
    pub fn attr_ints(&self, name: &str, default: &[i64]) -> Vec<i64> {
        match self.attr(name) {
            Some(Attr::Ints(v)) => v.clone(),
            _ => default.to_vec(),
        }
    }
}

/// A run of consecutive nodes that together compute one higher-level op. Autodiff applies the
/// op's closed-form gradient rule instead of differentiating the nodes one by one (falling back
/// to the nodes when a value inside the run gets a gradient from outside it).
#[derive(Debug, Clone)]
pub struct Composite {
    /// The nodes `first..=last` of [`Graph::nodes`].
    pub first: usize,
    pub last: usize,
    pub kind: CompositeKind,
}

/// The higher-level ops that have a composite gradient rule.
#[derive(Debug, Clone)]
pub enum CompositeKind {
    /// `y = (x - mean) * inv * gamma + beta` with batch statistics over `axes`
    /// (`inv = 1 / sqrt(var + eps)`, `xc = x - mean`; `inv` and `gamma_b` shaped `[1, C, 1, ..]`).
    BatchNormTrain {
        x: Value,
        gamma: Value,
        beta: Value,
        y: Value,
        xc: Value,
        inv: Value,
        gamma_b: Value,
        axes: Vec<i64>,
    },
}

/// Where a value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The graph input at this position of [`Graph::inputs`].
    Input(usize),
    /// The constant (initializer) at this position of [`Graph::constants`].
    Const(usize),
    /// Output `slot` of the node at position `node` of [`Graph::nodes`].
    Node { node: usize, slot: usize },
}

/// Name, element type, static shape and origin of a value.
#[derive(Debug, Clone)]
pub struct ValueInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub source: Source,
    /// False while the name is a generated one that [`Graph::output`] may replace.
    pub(crate) named: bool,
}

impl ValueInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// What a graph input is for; the trainer feeds each kind from a different place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputKind {
    /// Batch data fed every call (images, labels, learning rate, step count).
    Data,
    /// A trainable parameter (the optimizer updates it).
    Param,
    /// Non-trainable state carried between steps, e.g. BatchNorm running statistics.
    Buffer,
    /// Optimizer state (momentum, Adam moments), one or more per parameter.
    OptimState,
}

/// A graph input, with its initial value for every kind but [`InputKind::Data`].
#[derive(Debug, Clone)]
pub struct Input {
    pub value: Value,
    pub kind: InputKind,
    pub init: Option<Tensor>,
}

/// A typed ONNX graph under construction. Builder methods (`add`, `conv`, ...) live in
/// `graph::ops` and `graph::nn`; they check shapes as each node is added.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub(crate) values: Vec<ValueInfo>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) inputs: Vec<Input>,
    pub(crate) constants: Vec<(Value, Tensor)>,
    pub(crate) outputs: Vec<Value>,
    pub(crate) feedback: Vec<(Value, Value)>,
    pub(crate) composites: Vec<Composite>,
    names: HashMap<String, Value>,
    /// Small constants (scalars, axes lists) shared by every node that needs them.
    const_cache: HashMap<(DType, Vec<usize>, Vec<u64>), Value>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Name, type, shape and source of `v`.
    ///
    /// # Panics
    /// If `v` was not made by this graph.
    pub fn info(&self, v: Value) -> &ValueInfo {
        &self.values[v.index()]
    }

    pub fn shape(&self, v: Value) -> &[usize] {
        &self.info(v).shape
    }

    pub fn dtype(&self, v: Value) -> DType {
        self.info(v).dtype
    }

    pub fn name(&self, v: Value) -> &str {
        &self.info(v).name
    }

    /// The value called `name`, if any.
    pub fn find(&self, name: &str) -> Option<Value> {
        self.names.get(name).copied()
    }

    /// Nodes in execution (topological) order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// All graph inputs in declaration order.
    pub fn inputs(&self) -> &[Input] {
        &self.inputs
    }

    /// The input record of `v`, if `v` is a graph input.
    pub fn input_info(&self, v: Value) -> Option<&Input> {
        match self.info(v).source {
            Source::Input(i) => Some(&self.inputs[i]),
            _ => None,
        }
    }

    /// Inputs of one kind, in declaration order.
    pub fn inputs_of(&self, kind: InputKind) -> impl Iterator<Item = &Input> {
        self.inputs.iter().filter(move |i| i.kind == kind)
    }

    /// Trainable parameters, in declaration order.
    pub fn params(&self) -> Vec<Value> {
        self.inputs_of(InputKind::Param).map(|i| i.value).collect()
    }

    /// Constants (ONNX initializers).
    pub fn constants(&self) -> &[(Value, Tensor)] {
        &self.constants
    }

    /// The constant value of `v`, if it is a constant.
    pub fn const_value(&self, v: Value) -> Option<&Tensor> {
        match self.info(v).source {
            Source::Const(i) => Some(&self.constants[i].1),
            _ => None,
        }
    }

    /// Graph outputs in declaration order.
    pub fn outputs(&self) -> &[Value] {
        &self.outputs
    }

    /// `(input, output)` pairs registered with [`Graph::feed_back`]: after each run the trainer
    /// feeds the output's value as the input's next value.
    pub fn feedback(&self) -> &[(Value, Value)] {
        &self.feedback
    }

    /// The node that computes `v`, if any.
    pub fn producer(&self, v: Value) -> Option<&Node> {
        match self.info(v).source {
            Source::Node { node, .. } => Some(&self.nodes[node]),
            _ => None,
        }
    }

    fn new_value(&mut self, name: Option<&str>, dtype: DType, shape: Vec<usize>, source: Source) -> Result<Value> {
        let id = Value(self.values.len() as u32);
        let (name, named) = match name {
            Some(n) => {
                self.claim_name(n, id)?;
                (n.to_string(), true)
            }
            None => {
                // Generated names start with '%', which user names may not.
                let n = format!("%{}", id.0);
                self.names.insert(n.clone(), id);
                (n, false)
            }
        };
        self.values.push(ValueInfo { name, dtype, shape, source, named });
        Ok(id)
    }

    fn claim_name(&mut self, name: &str, id: Value) -> Result<()> {
        if name.is_empty() || name.starts_with('%') {
            return Err(Error::GraphInvalid { reason: format!("value name `{name}` is empty or starts with `%`") });
        }
        if self.names.contains_key(name) {
            return Err(Error::GraphInvalid { reason: format!("value name `{name}` is already used") });
        }
        self.names.insert(name.to_string(), id);
        Ok(())
    }

    /// Declares a graph input.
    pub fn input_of(
        &mut self,
        name: &str,
        kind: InputKind,
        dtype: DType,
        shape: &[usize],
        init: Option<Tensor>,
    ) -> Result<Value> {
        if let Some(t) = &init
            && (t.dtype() != dtype || t.shape() != shape)
        {
            return Err(Error::GraphShape {
                op: format!("input `{name}`"),
                detail: format!("declared {dtype}{shape:?}, initial value is {}{:?}", t.dtype(), t.shape()),
            });
        }
        let v = self.new_value(Some(name), dtype, shape.to_vec(), Source::Input(self.inputs.len()))?;
        self.inputs.push(Input { value: v, kind, init });
        Ok(v)
    }

    /// Adds a constant (ONNX initializer). Small scalar / vector constants should go through
    /// [`Graph::scalar`] / [`Graph::const_i64`], which share one initializer per value.
    pub fn constant(&mut self, t: Tensor) -> Value {
        let v = self
            .new_value(None, t.dtype(), t.shape().to_vec(), Source::Const(self.constants.len()))
            .expect("generated names are unique");
        self.constants.push((v, t));
        v
    }

    /// A shared small constant: one initializer per (dtype, shape, data).
    pub(crate) fn cached_constant(&mut self, t: Tensor) -> Value {
        let bits = match &t {
            Tensor::F32(a) => a.iter().map(|x| x.to_bits() as u64).collect(),
            Tensor::F64(a) => a.iter().map(|x| x.to_bits()).collect(),
            Tensor::I64(a) => a.iter().map(|&x| x as u64).collect(),
            Tensor::Bool(a) => a.iter().map(|&x| x as u64).collect(),
        };
        let key = (t.dtype(), t.shape().to_vec(), bits);
        if let Some(&v) = self.const_cache.get(&key) {
            return v;
        }
        let v = self.constant(t);
        self.const_cache.insert(key, v);
        v
    }

    /// Appends a node whose output types were already inferred; returns its outputs.
    pub(crate) fn push_node(
        &mut self,
        op: &'static str,
        inputs: Vec<Value>,
        attrs: Vec<(&'static str, Attr)>,
        outputs: Vec<(DType, Vec<usize>)>,
    ) -> Vec<Value> {
        let node = self.nodes.len();
        let outs = outputs
            .into_iter()
            .enumerate()
            .map(|(slot, (dt, sh))| {
                self.new_value(None, dt, sh, Source::Node { node, slot }).expect("generated names are unique")
            })
            .collect::<Vec<_>>();
        self.nodes.push(Node { op, inputs, outputs: outs.clone(), attrs, weight_grad: ConvWeightGrad::Auto });
        outs
    }

    /// Like [`Graph::push_node`] for single-output nodes.
    pub(crate) fn push1(
        &mut self,
        op: &'static str,
        inputs: Vec<Value>,
        attrs: Vec<(&'static str, Attr)>,
        dtype: DType,
        shape: Vec<usize>,
    ) -> Value {
        self.push_node(op, inputs, attrs, vec![(dtype, shape)])[0]
    }

    /// Adds an output to an existing node (autodiff asks MaxPool for its `Indices` this way).
    pub(crate) fn add_node_output(&mut self, node: usize, dtype: DType, shape: Vec<usize>) -> Value {
        let slot = self.nodes[node].outputs.len();
        let v = self.new_value(None, dtype, shape, Source::Node { node, slot }).expect("generated names are unique");
        self.nodes[node].outputs.push(v);
        v
    }

    pub(crate) fn node_mut(&mut self, node: usize) -> &mut Node {
        &mut self.nodes[node]
    }

    /// Gives `v` a user-visible name. Only values computed by nodes that still carry a
    /// generated name can be renamed.
    pub fn set_name(&mut self, v: Value, name: &str) -> Result<()> {
        let info = self.info(v);
        if info.named || !matches!(info.source, Source::Node { .. }) {
            return Err(Error::GraphInvalid {
                reason: format!("value `{}` already has a name; cannot rename it to `{name}`", info.name),
            });
        }
        self.claim_name(name, v)?;
        let old = std::mem::replace(&mut self.values[v.index()].name, name.to_string());
        self.names.remove(&old);
        self.values[v.index()].named = true;
        Ok(())
    }

    /// Marks `v` as a graph output called `name`: renames `v` if it still has a generated
    /// name, otherwise adds an `Identity` node producing `name`.
    pub fn output(&mut self, name: &str, v: Value) -> Result<Value> {
        let info = self.info(v);
        let out = if info.name == name {
            v
        } else if !info.named && matches!(info.source, Source::Node { .. }) && !self.outputs.contains(&v) {
            self.set_name(v, name)?;
            v
        } else {
            let (dt, sh) = (info.dtype, info.shape.clone());
            let id = self.push1("Identity", vec![v], vec![], dt, sh);
            self.set_name(id, name)?;
            id
        };
        if self.outputs.contains(&out) {
            return Err(Error::GraphInvalid { reason: format!("`{name}` is already an output") });
        }
        self.outputs.push(out);
        Ok(out)
    }

    /// Replaces the initial value of the parameter, buffer or state input called `name` (same
    /// type and shape), e.g. to load trained values before exporting.
    pub fn set_init(&mut self, name: &str, t: Tensor) -> Result<()> {
        let v = self.find(name).ok_or_else(|| Error::GraphInvalid { reason: format!("no input called `{name}`") })?;
        let Source::Input(i) = self.info(v).source else {
            return Err(Error::GraphInvalid { reason: format!("`{name}` is not a graph input") });
        };
        let info = &self.values[v.index()];
        if self.inputs[i].kind == InputKind::Data {
            return Err(Error::GraphInvalid { reason: format!("`{name}` is a data input; it has no initial value") });
        }
        if t.dtype() != info.dtype || t.shape() != info.shape.as_slice() {
            return Err(Error::GraphShape {
                op: format!("input `{name}`"),
                detail: format!("declared {}{:?}, new value is {}{:?}", info.dtype, info.shape, t.dtype(), t.shape()),
            });
        }
        self.inputs[i].init = Some(t);
        Ok(())
    }

    /// Declares that `next` is the new value of the stateful input `input` (a parameter,
    /// buffer or optimizer state): it becomes the output `"{input name}.next"`, and the pair is
    /// listed in [`Graph::feedback`].
    pub fn feed_back(&mut self, input: Value, next: Value) -> Result<Value> {
        let ii = self.info(input);
        let is_state = matches!(ii.source, Source::Input(i) if self.inputs[i].kind != InputKind::Data);
        if !is_state {
            return Err(Error::GraphInvalid {
                reason: format!("`{}` is not a parameter, buffer or state input", ii.name),
            });
        }
        let ni = self.info(next);
        if ii.dtype != ni.dtype || ii.shape != ni.shape {
            return Err(Error::GraphShape {
                op: "feed_back".into(),
                detail: format!(
                    "input `{}` is {}{:?}, new value is {}{:?}",
                    ii.name, ii.dtype, ii.shape, ni.dtype, ni.shape
                ),
            });
        }
        if self.feedback.iter().any(|(i, _)| *i == input) {
            return Err(Error::GraphInvalid { reason: format!("`{}` already has a new value", ii.name) });
        }
        let name = format!("{}.next", ii.name);
        let out = self.output(&name, next)?;
        self.feedback.push((input, out));
        Ok(out)
    }
}
