//! Tensor builders: inputs and constants, elementwise math with numpy broadcasting, reductions,
//! and shape ops. Each builder infers its output's type and shape and rejects bad operands.

use super::ir::{Attr, DType, Graph, InputKind, Tensor, Value};
use crate::{Error, Result};

pub(crate) fn shape_err(op: &str, detail: impl Into<String>) -> Error {
    Error::GraphShape { op: op.to_string(), detail: detail.into() }
}

pub(crate) fn type_err(op: &str, detail: impl Into<String>) -> Error {
    Error::GraphType { op: op.to_string(), detail: detail.into() }
}

/// Numpy broadcasting of two shapes.
pub(crate) fn broadcast(op: &str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
        let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(shape_err(op, format!("shapes {a:?} and {b:?} do not broadcast"))),
        };
    }
    Ok(out)
}

/// Resolves a possibly negative axis against a rank.
pub(crate) fn norm_axis(op: &str, axis: i64, rank: usize) -> Result<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a >= rank as i64 {
        return Err(shape_err(op, format!("axis {axis} is out of range for rank {rank}")));
    }
    Ok(a as usize)
}

/// Resolves a list of axes, sorted and without duplicates.
pub(crate) fn norm_axes(op: &str, axes: &[i64], rank: usize) -> Result<Vec<usize>> {
    let mut out = axes.iter().map(|&a| norm_axis(op, a, rank)).collect::<Result<Vec<_>>>()?;
    out.sort_unstable();
    if out.windows(2).any(|w| w[0] == w[1]) {
        return Err(shape_err(op, format!("axes {axes:?} repeat an axis")));
    }
    Ok(out)
}

pub(crate) fn to_i64(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

/// Inputs, constants, elementwise math, reductions, shape ops.
impl Graph {
    /// A data input (images, labels, learning rate, ...), fed on every run.
    pub fn input(&mut self, name: &str, dtype: DType, shape: &[usize]) -> Result<Value> {
        self.input_of(name, InputKind::Data, dtype, shape, None)
    }

    /// A trainable f32 parameter: a graph input the trainer feeds, starting from `init`.
    pub fn param(&mut self, name: &str, shape: &[usize], init: Vec<f32>) -> Result<Value> {
        let t = Tensor::f32(shape, init)
            .map_err(|_| shape_err("param", format!("`{name}`: initial data does not fill {shape:?}")))?;
        self.input_of(name, InputKind::Param, DType::F32, shape, Some(t))
    }

    /// A non-trainable f32 state input (e.g. BatchNorm running statistics), starting from `init`.
    pub fn buffer(&mut self, name: &str, shape: &[usize], init: Vec<f32>) -> Result<Value> {
        let t = Tensor::f32(shape, init)
            .map_err(|_| shape_err("buffer", format!("`{name}`: initial data does not fill {shape:?}")))?;
        self.input_of(name, InputKind::Buffer, DType::F32, shape, Some(t))
    }

    /// A rank-0 constant of `dtype` (shared with every other use of the same scalar).
    pub fn scalar(&mut self, x: f64, dtype: DType) -> Value {
        self.cached_constant(Tensor::full(dtype, &[], x))
    }

    /// A rank-0 constant with the element type of `like`.
    pub fn scalar_like(&mut self, like: Value, x: f64) -> Value {
        let dt = self.dtype(like);
        self.scalar(x, dt)
    }

    /// A 1-D i64 constant (axes, shapes, pads), shared between nodes.
    pub fn const_i64(&mut self, data: &[i64]) -> Value {
        self.cached_constant(Tensor::I64(ndarray::Array1::from(data.to_vec()).into_dyn()))
    }

    /// An f32 constant tensor.
    pub fn constant_f32(&mut self, shape: &[usize], data: Vec<f32>) -> Result<Value> {
        Ok(self.constant(Tensor::f32(shape, data)?))
    }

    /// A tensor of zeros made at run time (`ConstantOfShape`), so no large initializer is stored.
    pub fn zeros(&mut self, dtype: DType, shape: &[usize]) -> Value {
        let s = self.const_i64(&to_i64(shape));
        let value = Attr::Tensor(Tensor::full(dtype, &[1], 0.0));
        self.push1("ConstantOfShape", vec![s], vec![("value", value)], dtype, shape.to_vec())
    }

    fn same_dtype(&self, op: &str, a: Value, b: Value) -> Result<DType> {
        let (da, db) = (self.dtype(a), self.dtype(b));
        if da != db {
            return Err(type_err(op, format!("operands are {da}{:?} and {db}{:?}", self.shape(a), self.shape(b))));
        }
        Ok(da)
    }

    fn numeric(&self, op: &str, a: Value) -> Result<DType> {
        let d = self.dtype(a);
        if d == DType::Bool {
            return Err(type_err(op, format!("operand is bool{:?}", self.shape(a))));
        }
        Ok(d)
    }

    fn float(&self, op: &str, a: Value) -> Result<DType> {
        let d = self.dtype(a);
        if !d.is_float() {
            return Err(type_err(op, format!("operand is {d}{:?}, needs f32 or f64", self.shape(a))));
        }
        Ok(d)
    }

    fn binary(&mut self, op: &'static str, a: Value, b: Value, out_dtype: Option<DType>) -> Result<Value> {
        let dt = self.same_dtype(op, a, b)?;
        let shape = broadcast(op, self.shape(a), self.shape(b))?;
        Ok(self.push1(op, vec![a, b], vec![], out_dtype.unwrap_or(dt), shape))
    }

    /// `a + b` with numpy broadcasting.
    pub fn add(&mut self, a: Value, b: Value) -> Result<Value> {
        self.numeric("Add", a)?;
        self.binary("Add", a, b, None)
    }
    /// `a - b` with numpy broadcasting.
    pub fn sub(&mut self, a: Value, b: Value) -> Result<Value> {
        self.numeric("Sub", a)?;
        self.binary("Sub", a, b, None)
    }
    /// `a * b` with numpy broadcasting.
    pub fn mul(&mut self, a: Value, b: Value) -> Result<Value> {
        self.numeric("Mul", a)?;
        self.binary("Mul", a, b, None)
    }
    /// `a / b` with numpy broadcasting.
    pub fn div(&mut self, a: Value, b: Value) -> Result<Value> {
        self.numeric("Div", a)?;
        self.binary("Div", a, b, None)
    }
    /// Elementwise maximum of two tensors (broadcasting).
    pub fn max(&mut self, a: Value, b: Value) -> Result<Value> {
        self.numeric("Max", a)?;
        self.binary("Max", a, b, None)
    }
    /// Elementwise minimum of two tensors (broadcasting).
    pub fn min(&mut self, a: Value, b: Value) -> Result<Value> {
        self.numeric("Min", a)?;
        self.binary("Min", a, b, None)
    }
    /// `a == b` as bool.
    pub fn equal(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary("Equal", a, b, Some(DType::Bool))
    }
    /// `a > b` as bool.
    pub fn greater(&mut self, a: Value, b: Value) -> Result<Value> {
        self.numeric("Greater", a)?;
        self.binary("Greater", a, b, Some(DType::Bool))
    }
    /// `a < b` as bool.
    pub fn less(&mut self, a: Value, b: Value) -> Result<Value> {
        self.numeric("Less", a)?;
        self.binary("Less", a, b, Some(DType::Bool))
    }
    /// Logical and of two bool tensors.
    pub fn and(&mut self, a: Value, b: Value) -> Result<Value> {
        if self.dtype(a) != DType::Bool {
            return Err(type_err("And", format!("operand is {}, needs bool", self.dtype(a))));
        }
        self.binary("And", a, b, None)
    }

    /// `a + x` for a scalar `x` of `a`'s type.
    pub fn add_scalar(&mut self, a: Value, x: f64) -> Result<Value> {
        let s = self.scalar_like(a, x);
        self.add(a, s)
    }
    /// `a * x` for a scalar `x` of `a`'s type.
    pub fn mul_scalar(&mut self, a: Value, x: f64) -> Result<Value> {
        let s = self.scalar_like(a, x);
        self.mul(a, s)
    }

    /// `cond ? a : b` elementwise, all three broadcast together.
    pub fn where_(&mut self, cond: Value, a: Value, b: Value) -> Result<Value> {
        if self.dtype(cond) != DType::Bool {
            return Err(type_err(
                "Where",
                format!("condition is {}{:?}, needs bool", self.dtype(cond), self.shape(cond)),
            ));
        }
        let dt = self.same_dtype("Where", a, b)?;
        let s = broadcast("Where", self.shape(a), self.shape(b))?;
        let s = broadcast("Where", self.shape(cond), &s)?;
        Ok(self.push1("Where", vec![cond, a, b], vec![], dt, s))
    }

    /// Variadic elementwise sum (broadcasting); one operand is returned as is.
    pub fn sum(&mut self, xs: &[Value]) -> Result<Value> {
        let Some((&first, rest)) = xs.split_first() else {
            return Err(shape_err("Sum", "no operands"));
        };
        if rest.is_empty() {
            return Ok(first);
        }
        let dt = self.numeric("Sum", first)?;
        let mut shape = self.shape(first).to_vec();
        for &x in rest {
            self.same_dtype("Sum", first, x)?;
            shape = broadcast("Sum", &shape, self.shape(x))?;
        }
        Ok(self.push1("Sum", xs.to_vec(), vec![], dt, shape))
    }

    fn unary(&mut self, op: &'static str, x: Value, float_only: bool) -> Result<Value> {
        let dt = if float_only { self.float(op, x)? } else { self.numeric(op, x)? };
        let s = self.shape(x).to_vec();
        Ok(self.push1(op, vec![x], vec![], dt, s))
    }

    pub fn neg(&mut self, x: Value) -> Result<Value> {
        self.unary("Neg", x, false)
    }
    pub fn relu(&mut self, x: Value) -> Result<Value> {
        self.unary("Relu", x, true)
    }
    pub fn sigmoid(&mut self, x: Value) -> Result<Value> {
        self.unary("Sigmoid", x, true)
    }
    /// `min(max(x, lo), hi)` (ONNX Clip with the bounds as constant inputs); ReLU6 is `clip(x, 0, 6)`.
    pub fn clip(&mut self, x: Value, lo: f64, hi: f64) -> Result<Value> {
        let dt = self.float("Clip", x)?;
        // NaN bounds are refused too: they compare as neither order.
        if lo.partial_cmp(&hi).is_none_or(|o| o == std::cmp::Ordering::Greater) {
            return Err(Error::GraphShape { op: "Clip".into(), detail: format!("bounds [{lo}, {hi}] are empty") });
        }
        let (l, h) = (self.scalar_like(x, lo), self.scalar_like(x, hi));
        let s = self.shape(x).to_vec();
        Ok(self.push1("Clip", vec![x, l, h], vec![], dt, s))
    }
    /// ReLU6: `clip(x, 0, 6)` (MobileNet's and EfficientNet-Lite's activation).
    pub fn relu6(&mut self, x: Value) -> Result<Value> {
        self.clip(x, 0.0, 6.0)
    }
    pub fn exp(&mut self, x: Value) -> Result<Value> {
        self.unary("Exp", x, true)
    }
    pub fn log(&mut self, x: Value) -> Result<Value> {
        self.unary("Log", x, true)
    }
    pub fn sqrt(&mut self, x: Value) -> Result<Value> {
        self.unary("Sqrt", x, true)
    }
    /// `1 / x`.
    pub fn reciprocal(&mut self, x: Value) -> Result<Value> {
        self.unary("Reciprocal", x, true)
    }
    /// `x` unchanged (a new value name).
    pub fn identity(&mut self, x: Value) -> Result<Value> {
        let (dt, s) = (self.dtype(x), self.shape(x).to_vec());
        Ok(self.push1("Identity", vec![x], vec![], dt, s))
    }
    /// `x ^ p` for a constant exponent `p`.
    pub fn pow_scalar(&mut self, x: Value, p: f64) -> Result<Value> {
        let dt = self.float("Pow", x)?;
        let e = self.scalar(p, dt);
        let s = self.shape(x).to_vec();
        Ok(self.push1("Pow", vec![x, e], vec![], dt, s))
    }
    /// Logical not of a bool tensor.
    pub fn not(&mut self, x: Value) -> Result<Value> {
        if self.dtype(x) != DType::Bool {
            return Err(type_err("Not", format!("operand is {}, needs bool", self.dtype(x))));
        }
        let s = self.shape(x).to_vec();
        Ok(self.push1("Not", vec![x], vec![], DType::Bool, s))
    }
    /// Converts the element type.
    pub fn cast(&mut self, x: Value, to: DType) -> Result<Value> {
        let s = self.shape(x).to_vec();
        Ok(self.push1("Cast", vec![x], vec![("to", Attr::Int(to.onnx() as i64))], to, s))
    }

    fn reduce(&mut self, op: &'static str, x: Value, axes: &[i64], keepdims: bool) -> Result<Value> {
        let dt = self.numeric(op, x)?;
        let shape = self.shape(x).to_vec();
        if axes.is_empty() {
            return Err(shape_err(op, format!("no axes given for input {shape:?}")));
        }
        let ax = norm_axes(op, axes, shape.len())?;
        let out: Vec<usize> = shape
            .iter()
            .enumerate()
            .filter_map(|(i, &d)| match (ax.contains(&i), keepdims) {
                (false, _) => Some(d),
                (true, true) => Some(1),
                (true, false) => None,
            })
            .collect();
        let a = self.const_i64(&to_i64(&ax));
        Ok(self.push1(op, vec![x, a], vec![("keepdims", Attr::Int(keepdims as i64))], dt, out))
    }

    /// Sum over `axes` (negative axes count from the end).
    pub fn reduce_sum(&mut self, x: Value, axes: &[i64], keepdims: bool) -> Result<Value> {
        self.reduce_in_two("ReduceSum", x, axes, keepdims)
    }
    /// Mean over `axes`.
    pub fn reduce_mean(&mut self, x: Value, axes: &[i64], keepdims: bool) -> Result<Value> {
        self.reduce_in_two("ReduceMean", x, axes, keepdims)
    }

    /// Sum or mean over axes that are a contiguous trailing run plus some earlier axes apart
    /// from it (BatchNorm's and bias gradients' `[0, 2, 3]`) as two nodes: the trailing run
    /// first (contiguous memory), then the rest of the much smaller result. ORT 1.31 CPU reduces
    /// `[0, 2, 3]` of a 32 MB `[N, C, H, W]` in one node 2.6x slower than in these two. Exact for
    /// sums; for means too, every group having the same count.
    fn reduce_in_two(&mut self, op: &'static str, x: Value, axes: &[i64], keepdims: bool) -> Result<Value> {
        let rank = self.shape(x).len();
        let ax = norm_axes(op, axes, rank)?;
        let mut tail = 0;
        while tail < ax.len() && ax.contains(&(rank - 1 - tail)) {
            tail += 1;
        }
        if tail == 0 || tail == ax.len() {
            return self.reduce(op, x, axes, keepdims);
        }
        let inner: Vec<i64> = (rank - tail..rank).map(|a| a as i64).collect();
        let first = self.reduce(op, x, &inner, true)?;
        self.reduce(op, first, &to_i64(&ax), keepdims)
    }
    /// Maximum over `axes`. Its gradient is shared equally between tied maxima.
    pub fn reduce_max(&mut self, x: Value, axes: &[i64], keepdims: bool) -> Result<Value> {
        self.reduce("ReduceMax", x, axes, keepdims)
    }
    /// Sum of squares over `axes` (one pass, no squared tensor in memory).
    pub fn reduce_sum_square(&mut self, x: Value, axes: &[i64], keepdims: bool) -> Result<Value> {
        self.reduce("ReduceSumSquare", x, axes, keepdims)
    }
    /// Sum of all elements, as a rank-0 value.
    pub fn sum_all(&mut self, x: Value) -> Result<Value> {
        let axes: Vec<i64> = (0..self.shape(x).len() as i64).collect();
        if axes.is_empty() {
            return Ok(x);
        }
        self.reduce_sum(x, &axes, false)
    }
    /// Mean of all elements, as a rank-0 value.
    pub fn mean_all(&mut self, x: Value) -> Result<Value> {
        let axes: Vec<i64> = (0..self.shape(x).len() as i64).collect();
        if axes.is_empty() {
            return Ok(x);
        }
        self.reduce_mean(x, &axes, false)
    }

    /// Reshape; `-1` stands for the one inferred dimension and `0` copies the input's dimension.
    /// The resolved shape is what the ONNX node receives.
    pub fn reshape(&mut self, x: Value, shape: &[i64]) -> Result<Value> {
        let ins = self.shape(x).to_vec();
        let n: usize = ins.iter().product();
        let mut out = Vec::with_capacity(shape.len());
        let mut infer = None;
        for (i, &d) in shape.iter().enumerate() {
            match d {
                -1 if infer.is_none() => {
                    infer = Some(i);
                    out.push(1)
                }
                0 if i < ins.len() => out.push(ins[i]),
                d if d > 0 => out.push(d as usize),
                _ => return Err(shape_err("Reshape", format!("cannot reshape {ins:?} to {shape:?}"))),
            }
        }
        let known: usize = out.iter().product();
        if let Some(i) = infer {
            if known == 0 || !n.is_multiple_of(known) {
                return Err(shape_err("Reshape", format!("cannot reshape {ins:?} to {shape:?}")));
            }
            out[i] = n / known;
        }
        if out.iter().product::<usize>() != n {
            return Err(shape_err("Reshape", format!("cannot reshape {ins:?} ({n} elements) to {shape:?}")));
        }
        if out == ins {
            return Ok(x);
        }
        let s = self.const_i64(&to_i64(&out));
        let dt = self.dtype(x);
        Ok(self.push1("Reshape", vec![x, s], vec![], dt, out))
    }

    /// Reshape to a fully known shape.
    pub fn reshape_to(&mut self, x: Value, shape: &[usize]) -> Result<Value> {
        self.reshape(x, &to_i64(shape))
    }

    /// Flattens to 2-D: dimensions before `axis` times dimensions from `axis` on.
    pub fn flatten(&mut self, x: Value, axis: i64) -> Result<Value> {
        let s = self.shape(x).to_vec();
        let a = if axis == s.len() as i64 { s.len() } else { norm_axis("Flatten", axis, s.len())? };
        let out = vec![s[..a].iter().product(), s[a..].iter().product()];
        let dt = self.dtype(x);
        Ok(self.push1("Flatten", vec![x], vec![("axis", Attr::Int(a as i64))], dt, out))
    }

    /// Permutes dimensions: output dim i is input dim `perm[i]`.
    pub fn transpose(&mut self, x: Value, perm: &[usize]) -> Result<Value> {
        let s = self.shape(x).to_vec();
        let mut seen = vec![false; s.len()];
        if perm.len() != s.len() || perm.iter().any(|&p| p >= s.len() || std::mem::replace(&mut seen[p], true)) {
            return Err(shape_err("Transpose", format!("perm {perm:?} is not a permutation of the axes of {s:?}")));
        }
        let out: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
        // Moving only size-1 dimensions keeps the memory order: a Reshape does it without a copy.
        let moved: Vec<usize> = perm.iter().copied().filter(|&p| s[p] != 1).collect();
        if moved.windows(2).all(|w| w[0] < w[1]) {
            return self.reshape_to(x, &out);
        }
        let dt = self.dtype(x);
        Ok(self.push1("Transpose", vec![x], vec![("perm", Attr::Ints(to_i64(perm)))], dt, out))
    }

    /// Transpose as one node even when only size-1 dimensions move ([`Graph::transpose`] writes
    /// those as a Reshape, which bakes the batch size into a constant).
    pub fn transpose_node(&mut self, x: Value, perm: &[usize]) -> Result<Value> {
        let s = self.shape(x).to_vec();
        let mut seen = vec![false; s.len()];
        if perm.len() != s.len() || perm.iter().any(|&p| p >= s.len() || std::mem::replace(&mut seen[p], true)) {
            return Err(shape_err("Transpose", format!("perm {perm:?} is not a permutation of the axes of {s:?}")));
        }
        let out: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
        let dt = self.dtype(x);
        Ok(self.push1("Transpose", vec![x], vec![("perm", Attr::Ints(to_i64(perm)))], dt, out))
    }

    /// Reshape that keeps dimension 0 (the batch) symbolic: the node's shape constant is
    /// `[0, rest...]`, so a model written with a dynamic batch still runs at any batch size.
    /// `rest` may hold one `-1`.
    pub fn reshape_keep_batch(&mut self, x: Value, rest: &[i64]) -> Result<Value> {
        let ins = self.shape(x).to_vec();
        let Some(&b) = ins.first() else {
            return Err(shape_err("Reshape", "a rank-0 input has no batch dimension"));
        };
        let mut shape = vec![b as i64];
        shape.extend_from_slice(rest);
        // Resolve (and check) the full shape, then write the batch as 0 ("copy").
        let probe = self.reshape(x, &shape)?;
        if probe == x {
            return Ok(x);
        }
        let out = self.shape(probe).to_vec();
        let mut written = to_i64(&out);
        written[0] = 0;
        let s = self.const_i64(&written);
        let node = self.nodes.len() - 1;
        self.node_mut(node).inputs[1] = s;
        Ok(probe)
    }

    /// Joins tensors along `axis`; all other dimensions must agree.
    pub fn concat(&mut self, xs: &[Value], axis: i64) -> Result<Value> {
        let Some(&first) = xs.first() else {
            return Err(shape_err("Concat", "no operands"));
        };
        let s0 = self.shape(first).to_vec();
        let a = norm_axis("Concat", axis, s0.len())?;
        let mut out = s0.clone();
        out[a] = 0;
        for &x in xs {
            self.same_dtype("Concat", first, x)?;
            let s = self.shape(x);
            let fits = s.len() == s0.len() && s.iter().zip(&s0).enumerate().all(|(i, (p, q))| i == a || p == q);
            if !fits {
                return Err(shape_err("Concat", format!("shapes {s0:?} and {s:?} differ outside axis {a}")));
            }
            out[a] += s[a];
        }
        let dt = self.dtype(first);
        Ok(self.push1("Concat", xs.to_vec(), vec![("axis", Attr::Int(a as i64))], dt, out))
    }

    /// Splits along `axis` into pieces of the given sizes (which must add up to the dimension).
    pub fn split(&mut self, x: Value, axis: i64, sizes: &[usize]) -> Result<Vec<Value>> {
        let s = self.shape(x).to_vec();
        let a = norm_axis("Split", axis, s.len())?;
        if sizes.iter().sum::<usize>() != s[a] || sizes.is_empty() {
            return Err(shape_err("Split", format!("sizes {sizes:?} do not add up to dimension {a} of {s:?}")));
        }
        let sp = self.const_i64(&to_i64(sizes));
        let dt = self.dtype(x);
        let outs = sizes
            .iter()
            .map(|&n| {
                let mut o = s.clone();
                o[a] = n;
                (dt, o)
            })
            .collect();
        Ok(self.push_node("Split", vec![x, sp], vec![("axis", Attr::Int(a as i64))], outs))
    }

    /// `x[start:end:step]` along each of `axes` (numpy semantics: negative indices count from the
    /// end, out-of-range bounds are clamped). Steps must be positive; empty `steps` means 1.
    pub fn slice(&mut self, x: Value, axes: &[i64], starts: &[i64], ends: &[i64], steps: &[i64]) -> Result<Value> {
        let s = self.shape(x).to_vec();
        let steps = if steps.is_empty() { vec![1; axes.len()] } else { steps.to_vec() };
        if starts.len() != axes.len() || ends.len() != axes.len() || steps.len() != axes.len() {
            return Err(shape_err(
                "Slice",
                format!("axes {axes:?}, starts {starts:?}, ends {ends:?}, steps {steps:?} differ in length"),
            ));
        }
        let ax = axes.iter().map(|&a| norm_axis("Slice", a, s.len())).collect::<Result<Vec<_>>>()?;
        let mut out = s.clone();
        let (mut st, mut en) = (Vec::new(), Vec::new());
        for i in 0..ax.len() {
            let d = s[ax[i]] as i64;
            if steps[i] <= 0 {
                return Err(shape_err(
                    "Slice",
                    format!("step {} on axis {} of {s:?} is not positive", steps[i], ax[i]),
                ));
            }
            let clamp = |v: i64| (if v < 0 { v + d } else { v }).clamp(0, d);
            let (b, e) = (clamp(starts[i]), clamp(ends[i]));
            out[ax[i]] = if e > b { ((e - b + steps[i] - 1) / steps[i]) as usize } else { 0 };
            st.push(b);
            en.push(e);
        }
        let inputs =
            vec![x, self.const_i64(&st), self.const_i64(&en), self.const_i64(&to_i64(&ax)), self.const_i64(&steps)];
        let dt = self.dtype(x);
        Ok(self.push1("Slice", inputs, vec![], dt, out))
    }

    /// `x` indexed along `axis` by the i64 tensor `indices` (numpy `take`).
    pub fn gather(&mut self, x: Value, indices: Value, axis: i64) -> Result<Value> {
        if self.dtype(indices) != DType::I64 {
            return Err(type_err("Gather", format!("indices are {}, need i64", self.dtype(indices))));
        }
        let s = self.shape(x).to_vec();
        let a = norm_axis("Gather", axis, s.len())?;
        let mut out = s[..a].to_vec();
        out.extend_from_slice(self.shape(indices));
        out.extend_from_slice(&s[a + 1..]);
        let dt = self.dtype(x);
        Ok(self.push1("Gather", vec![x, indices], vec![("axis", Attr::Int(a as i64))], dt, out))
    }

    /// Inserts size-1 dimensions at `axes` (positions in the output).
    pub fn unsqueeze(&mut self, x: Value, axes: &[i64]) -> Result<Value> {
        let s = self.shape(x).to_vec();
        let ax = norm_axes("Unsqueeze", axes, s.len() + axes.len())?;
        let mut out = s.clone();
        for &a in &ax {
            out.insert(a, 1);
        }
        let c = self.const_i64(&to_i64(&ax));
        let dt = self.dtype(x);
        Ok(self.push1("Unsqueeze", vec![x, c], vec![], dt, out))
    }

    /// Removes the size-1 dimensions at `axes`.
    pub fn squeeze(&mut self, x: Value, axes: &[i64]) -> Result<Value> {
        let s = self.shape(x).to_vec();
        let ax = norm_axes("Squeeze", axes, s.len())?;
        if let Some(&a) = ax.iter().find(|&&a| s[a] != 1) {
            return Err(shape_err("Squeeze", format!("dimension {a} of {s:?} is not 1")));
        }
        let out = s.iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, &d)| d).collect();
        let c = self.const_i64(&to_i64(&ax));
        let dt = self.dtype(x);
        Ok(self.push1("Squeeze", vec![x, c], vec![], dt, out))
    }

    /// Broadcasts `x` to `shape` (numpy rules, both ways).
    pub fn expand(&mut self, x: Value, shape: &[usize]) -> Result<Value> {
        let out = broadcast("Expand", self.shape(x), shape)?;
        if out == self.shape(x) {
            return Ok(x);
        }
        let c = self.const_i64(&to_i64(shape));
        let dt = self.dtype(x);
        Ok(self.push1("Expand", vec![x, c], vec![], dt, out))
    }

    /// Zero padding: `pads` = `[begin_0, .., begin_{r-1}, end_0, .., end_{r-1}]`, all >= 0.
    pub fn pad(&mut self, x: Value, pads: &[usize]) -> Result<Value> {
        let s = self.shape(x).to_vec();
        if pads.len() != 2 * s.len() {
            return Err(shape_err("Pad", format!("pads {pads:?} do not fit input {s:?}")));
        }
        let out = s.iter().enumerate().map(|(i, &d)| d + pads[i] + pads[i + s.len()]).collect();
        let p = self.const_i64(&to_i64(pads));
        let dt = self.dtype(x);
        Ok(self.push1("Pad", vec![x, p], vec![], dt, out))
    }

    /// Constant padding with fill value `value` (e.g. `-inf` before a max pool); `pads` as in
    /// [`Graph::pad`].
    pub fn pad_value(&mut self, x: Value, pads: &[usize], value: f64) -> Result<Value> {
        if value == 0.0 {
            return self.pad(x, pads);
        }
        let y = self.pad(x, pads)?;
        let fill = self.scalar_like(x, value);
        let node = self.nodes.len() - 1;
        self.node_mut(node).inputs.push(fill);
        Ok(y)
    }

    /// `data` with `updates` written (or, with `add`, accumulated) at `indices` along `axis`.
    pub fn scatter_elements(
        &mut self,
        data: Value,
        indices: Value,
        updates: Value,
        axis: i64,
        add: bool,
    ) -> Result<Value> {
        let (ds, is, us) = (self.shape(data).to_vec(), self.shape(indices).to_vec(), self.shape(updates).to_vec());
        if self.dtype(indices) != DType::I64 {
            return Err(type_err("ScatterElements", format!("indices are {}, need i64", self.dtype(indices))));
        }
        let dt = self.same_dtype("ScatterElements", data, updates)?;
        if is != us || is.len() != ds.len() {
            return Err(shape_err(
                "ScatterElements",
                format!("data {ds:?}, indices {is:?} and updates {us:?} do not fit"),
            ));
        }
        let a = norm_axis("ScatterElements", axis, ds.len())?;
        let mut attrs = vec![("axis", Attr::Int(a as i64))];
        if add {
            attrs.push(("reduction", Attr::Str("add".into())));
        }
        Ok(self.push1("ScatterElements", vec![data, indices, updates], attrs, dt, ds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast("Add", &[2, 1, 4], &[3, 1]).unwrap(), vec![2, 3, 4]);
        assert_eq!(broadcast("Add", &[], &[5]).unwrap(), vec![5]);
        let e = broadcast("Add", &[2, 3], &[4, 3]).unwrap_err().to_string();
        assert!(e.contains("Add") && e.contains("[2, 3]") && e.contains("[4, 3]"), "{e}");
    }

    #[test]
    fn shape_errors_name_the_op_and_both_shapes() {
        let mut g = Graph::new();
        let a = g.input("a", DType::F32, &[2, 3]).unwrap();
        let b = g.input("b", DType::F32, &[3, 2]).unwrap();
        let e = g.add(a, b).unwrap_err().to_string();
        assert!(e.contains("Add") && e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
        let e = g.concat(&[a, b], 0).unwrap_err().to_string();
        assert!(e.contains("Concat") && e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
        let e = g.matmul(a, a).unwrap_err().to_string();
        assert!(e.contains("MatMul") && e.contains("[2, 3]"), "{e}");
        let i = g.input("i", DType::I64, &[2, 3]).unwrap();
        let e = g.mul(a, i).unwrap_err().to_string();
        assert!(e.contains("Mul") && e.contains("f32") && e.contains("i64"), "{e}");
    }

    #[test]
    fn shapes_are_inferred() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[4, 3, 5]).unwrap();
        let r = g.reduce_sum(x, &[-1, 0], true).unwrap();
        assert_eq!(g.shape(r), &[1, 3, 1]);
        let r = g.reduce_mean(x, &[1], false).unwrap();
        assert_eq!(g.shape(r), &[4, 5]);
        let r = g.reshape(x, &[0, -1]).unwrap();
        assert_eq!(g.shape(r), &[4, 15]);
        let t = g.transpose(x, &[2, 0, 1]).unwrap();
        assert_eq!(g.shape(t), &[5, 4, 3]);
        let s = g.slice(x, &[0, 2], &[1, -4], &[100, 5], &[2, 1]).unwrap();
        assert_eq!(g.shape(s), &[2, 3, 4]);
        let idx = g.input("idx", DType::I64, &[2, 6]).unwrap();
        let ga = g.gather(x, idx, 1).unwrap();
        assert_eq!(g.shape(ga), &[4, 2, 6, 5]);
        let u = g.unsqueeze(x, &[0, -1]).unwrap();
        assert_eq!(g.shape(u), &[1, 4, 3, 5, 1]);
        let sq = g.squeeze(u, &[0, 4]).unwrap();
        assert_eq!(g.shape(sq), &[4, 3, 5]);
        let f = g.flatten(x, 1).unwrap();
        assert_eq!(g.shape(f), &[4, 15]);
        let c = g.concat(&[x, x], 1).unwrap();
        assert_eq!(g.shape(c), &[4, 6, 5]);
        let parts = g.split(c, 1, &[2, 4]).unwrap();
        assert_eq!(g.shape(parts[1]), &[4, 4, 5]);
        assert!(g.reshape(x, &[7, -1]).is_err());
    }

    #[test]
    fn names_are_unique_and_outputs_rename() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2]).unwrap();
        assert!(g.input("x", DType::F32, &[2]).is_err());
        let y = g.relu(x).unwrap();
        g.output("y", y).unwrap();
        assert_eq!(g.name(y), "y");
        // An input as output goes through Identity.
        let o = g.output("x_out", x).unwrap();
        assert_ne!(o, x);
        assert!(g.output("y", y).is_err());
    }
}
