//! ONNX writer: `Graph` -> `ModelProto` (opset 18, IR version 8), encoded with prost. Only the
//! nodes and constants that some output needs are written; every declared input is kept, unless
//! [`WriteOptions::freeze_state`] turns stateful inputs into initializers.

use prost::Message;

use super::ir::{Attr, DType, Graph, InputKind, Source, Tensor, Value};
use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto, attribute_proto::AttributeType, tensor_shape_proto::Dimension, tensor_shape_proto::dimension,
    type_proto,
};
use crate::{Error, Result};

/// The one ONNX opset every graph uses (Reduce* take `axes` as an input; ScatterElements has
/// `reduction="add"`).
pub const OPSET: i64 = 18;
/// The ONNX IR version that goes with [`OPSET`].
pub const IR_VERSION: i64 = 8;

pub(crate) fn tensor_proto(name: Option<String>, t: &Tensor) -> TensorProto {
    let raw: Vec<u8> = match t {
        Tensor::F32(a) => a.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Tensor::F64(a) => a.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Tensor::I64(a) => a.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Tensor::Bool(a) => a.iter().map(|&x| x as u8).collect(),
    };
    TensorProto {
        name,
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(t.dtype().onnx()),
        raw_data: Some(raw),
        ..Default::default()
    }
}

/// How [`to_model_with`] writes a graph.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Give every intermediate value a `value_info` with its type and shape (ignored with
    /// `dynamic_batch`, whose intermediate shapes are not static).
    pub annotate: bool,
    /// Write dimension 0 of every data input and every output as the symbolic dimension
    /// [`BATCH_DIM`], so the model runs on any batch size. Only valid for graphs whose nodes do
    /// not bake the batch size into a constant (no Reshape / Expand / ConstantOfShape to a shape
    /// that contains it): Conv, BatchNormalization, pooling, Flatten, Gemm and row-wise
    /// reductions qualify.
    pub dynamic_batch: bool,
    /// Write parameters, buffers and optimizer state that the outputs use as initializers named
    /// after the input (their initial values), instead of graph inputs; unused ones are dropped.
    /// Data inputs stay inputs. This is how an inference model is exported.
    pub freeze_state: bool,
    /// Write eligible convolutions on ORT's CPU-only NCHWc kernels with this block size (see
    /// [`super::nchwc`]; not standard ONNX). `None`, the default, writes standard Convs.
    pub nchwc_block: Option<usize>,
}

/// The name of the symbolic batch dimension written by [`WriteOptions::dynamic_batch`].
pub const BATCH_DIM: &str = "batch";

fn value_info(name: &str, dtype: DType, shape: &[usize]) -> ValueInfoProto {
    value_info_dims(name, dtype, shape, false)
}

fn value_info_dims(name: &str, dtype: DType, shape: &[usize], symbolic_batch: bool) -> ValueInfoProto {
    let dims = shape.iter().enumerate().map(|(i, &d)| {
        let value = if i == 0 && symbolic_batch {
            dimension::Value::DimParam(BATCH_DIM.to_string())
        } else {
            dimension::Value::DimValue(d as i64)
        };
        Dimension { value: Some(value), ..Default::default() }
    });
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(dtype.onnx()),
                shape: Some(TensorShapeProto { dim: dims.collect() }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) fn attribute(name: &str, a: &Attr) -> AttributeProto {
    let mut p = AttributeProto { name: Some(name.to_string()), ..Default::default() };
    let ty = match a {
        Attr::Int(i) => {
            p.i = Some(*i);
            AttributeType::Int
        }
        Attr::Float(f) => {
            p.f = Some(*f);
            AttributeType::Float
        }
        Attr::Ints(v) => {
            p.ints = v.clone();
            AttributeType::Ints
        }
        Attr::Floats(v) => {
            p.floats = v.clone();
            AttributeType::Floats
        }
        Attr::Str(s) => {
            p.s = Some(s.as_bytes().to_vec());
            AttributeType::String
        }
        Attr::Tensor(t) => {
            p.t = Some(tensor_proto(None, t));
            AttributeType::Tensor
        }
    };
    p.r#type = Some(ty as i32);
    p
}

/// Which nodes, constants and inputs the outputs need (`(nodes, constants, inputs)` as keep-flags).
fn live(g: &Graph) -> (Vec<bool>, Vec<bool>, Vec<bool>) {
    let mut node_live = vec![false; g.nodes.len()];
    let mut const_live = vec![false; g.constants.len()];
    let mut input_live = vec![false; g.inputs.len()];
    let mut stack: Vec<Value> = g.outputs.clone();
    let mut seen = vec![false; g.values.len()];
    while let Some(v) = stack.pop() {
        if std::mem::replace(&mut seen[v.index()], true) {
            continue;
        }
        match g.info(v).source {
            Source::Input(i) => input_live[i] = true,
            Source::Const(i) => const_live[i] = true,
            Source::Node { node, .. } => {
                if !node_live[node] {
                    node_live[node] = true;
                    stack.extend(g.nodes[node].inputs.iter().copied());
                }
            }
        }
    }
    (node_live, const_live, input_live)
}

/// Builds the `ModelProto` for `g`. With `annotate`, every intermediate value gets a
/// `value_info` with its inferred type and shape (for Netron, and so the ONNX checker can compare
/// our shape inference with its own).
pub fn to_model(g: &Graph, graph_name: &str, annotate: bool) -> Result<ModelProto> {
    to_model_with(g, graph_name, WriteOptions { annotate, ..Default::default() })
}

/// Builds the `ModelProto` for `g` as `o` asks (see [`WriteOptions`]).
pub fn to_model_with(g: &Graph, graph_name: &str, o: WriteOptions) -> Result<ModelProto> {
    if g.outputs.is_empty() {
        return Err(Error::GraphInvalid { reason: "the graph has no outputs".into() });
    }
    let (node_live, const_live, input_live) = live(g);
    let name = |v: &Value| g.name(*v).to_string();
    let mut lowered_consts = Vec::new();
    let mut nodes = Vec::new();
    for (i, n) in g.nodes.iter().enumerate().filter(|(i, _)| node_live[*i]) {
        if let Some(b) = o.nchwc_block.filter(|&b| super::nchwc::eligible(g, n, b)) {
            let (ns, cs) = super::nchwc::lower(g, n, i, b);
            nodes.extend(ns);
            lowered_consts.extend(cs);
            continue;
        }
        nodes.push(NodeProto {
            input: n.inputs.iter().map(name).collect(),
            output: n.outputs.iter().map(name).collect(),
            name: Some(format!("{}_{i}", n.op)),
            op_type: Some(n.op.to_string()),
            domain: Some(String::new()),
            attribute: n.attrs.iter().map(|(k, a)| attribute(k, a)).collect(),
            ..Default::default()
        });
    }
    let uses_nchwc = !lowered_consts.is_empty();
    let frozen = |inp: &super::ir::Input| o.freeze_state && inp.kind != InputKind::Data;
    let mut initializer: Vec<TensorProto> = g
        .constants
        .iter()
        .enumerate()
        .filter(|(i, _)| const_live[*i])
        .map(|(_, (v, t))| tensor_proto(Some(g.name(*v).to_string()), t))
        .chain(lowered_consts)
        .collect();
    for (i, inp) in g.inputs.iter().enumerate() {
        if frozen(inp) && input_live[i] {
            let t = inp.init.as_ref().ok_or_else(|| Error::GraphInvalid {
                reason: format!("input `{}` has no value to freeze into an initializer", g.name(inp.value)),
            })?;
            initializer.push(tensor_proto(Some(g.name(inp.value).to_string()), t));
        }
    }
    let io = |v: &Value| {
        let i = g.info(*v);
        value_info_dims(&i.name, i.dtype, &i.shape, o.dynamic_batch)
    };
    let value_infos = if o.annotate && !o.dynamic_batch {
        let io = |v: &Value| {
            let i = g.info(*v);
            value_info(&i.name, i.dtype, &i.shape)
        };
        g.nodes.iter().enumerate().filter(|(i, _)| node_live[*i]).flat_map(|(_, n)| n.outputs.iter().map(io)).collect()
    } else {
        Vec::new()
    };
    let graph = GraphProto {
        node: nodes,
        value_info: value_infos,
        name: Some(graph_name.to_string()),
        initializer,
        input: g
            .inputs
            .iter()
            .filter(|i| !frozen(i))
            .map(|i| {
                let info = g.info(i.value);
                let batch = o.dynamic_batch && i.kind == InputKind::Data;
                value_info_dims(&info.name, info.dtype, &info.shape, batch)
            })
            .collect(),
        output: g.outputs.iter().map(io).collect(),
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: std::iter::once(OperatorSetIdProto { domain: Some(String::new()), version: Some(OPSET) })
            .chain(
                uses_nchwc.then(|| OperatorSetIdProto { domain: Some(super::nchwc::DOMAIN.into()), version: Some(1) }),
            )
            .collect(),
        producer_name: Some("hiercon".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(graph),
        ..Default::default()
    })
}

impl Graph {
    /// The graph as ONNX model bytes.
    pub fn to_onnx(&self, graph_name: &str) -> Result<Vec<u8>> {
        self.to_onnx_with(graph_name, WriteOptions::default())
    }

    /// The graph as ONNX model bytes, written as `o` asks.
    pub fn to_onnx_with(&self, graph_name: &str, o: WriteOptions) -> Result<Vec<u8>> {
        Ok(to_model_with(self, graph_name, o)?.encode_to_vec())
    }

    /// Writes the graph as an `.onnx` file, every value annotated with its type and shape.
    pub fn write_onnx(&self, path: &std::path::Path, graph_name: &str) -> Result<()> {
        self.write_onnx_with(path, graph_name, WriteOptions { annotate: true, ..Default::default() })
    }

    /// Writes the graph as an `.onnx` file as `o` asks.
    pub fn write_onnx_with(&self, path: &std::path::Path, graph_name: &str, o: WriteOptions) -> Result<()> {
        let bytes = self.to_onnx_with(graph_name, o)?;
        std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::testutil::onnx_check;
    use crate::graph::{BatchNorm, Conv2d, Gemm, Pool2d};

    /// One graph touching every builder, so the checker compares ONNX's shape inference with ours
    /// for each of them.
    fn kitchen_sink() -> Graph {
        let mut g = Graph::new();
        let f = DType::F32;
        let x = g.input("x", f, &[2, 4, 7, 7]).unwrap();
        let w = g.param("w", &[6, 4, 3, 3], vec![0.1; 216]).unwrap();
        let b = g.param("b", &[6], vec![0.0; 6]).unwrap();
        let dw = g.param("dw", &[6, 1, 3, 3], vec![0.1; 54]).unwrap();
        let gamma = g.param("gamma", &[6], vec![1.0; 6]).unwrap();
        let beta = g.param("beta", &[6], vec![0.0; 6]).unwrap();
        let rm = g.buffer("rm", &[6], vec![0.0; 6]).unwrap();
        let rv = g.buffer("rv", &[6], vec![1.0; 6]).unwrap();
        let c = g.conv(x, w, Some(b), Conv2d { stride: 2, pad: 1, ..Default::default() }).unwrap();
        let c = g.conv(c, dw, None, Conv2d { pad: 1, groups: 6, ..Default::default() }).unwrap();
        let bn = g.batch_norm_train(c, gamma, beta, rm, rv, BatchNorm::default()).unwrap();
        g.feed_back(rm, bn.running_mean).unwrap();
        g.feed_back(rv, bn.running_var).unwrap();
        let inf = g.batch_norm_infer(c, gamma, beta, rm, rv, 1e-5).unwrap();
        let r = g.relu(bn.y).unwrap();
        let (p, idx) = g.max_pool_with_indices(r, Pool2d { kernel: 3, stride: 2, pad: 1 }).unwrap();
        let p2 = g.max_pool(inf, Pool2d { kernel: 2, stride: 1, pad: 0 }).unwrap();
        let ct = g
            .conv_transpose(
                c,
                w,
                crate::graph::ConvTranspose2d {
                    strides: [2, 2],
                    pads: [1, 1, 1, 1],
                    dilations: [1, 1],
                    group: 1,
                    output_padding: [0, 0],
                },
            )
            .unwrap();
        let gap = g.global_avg_pool(p).unwrap();
        let flat = g.flatten(gap, 1).unwrap();
        let lw = g.param("lw", &[3, 6], vec![0.1; 18]).unwrap();
        let lin = g.linear(flat, lw, None).unwrap();
        let mm = g.matmul(lin, lw).unwrap();
        let gm = g.gemm(lin, lw, Some(b), Gemm { alpha: 0.5, beta: 2.0, ..Default::default() }).unwrap();
        let e = g.exp(mm).unwrap();
        let l = g.log(e).unwrap();
        let s = g.sigmoid(l).unwrap();
        let q = g.sqrt(s).unwrap();
        let pw = g.pow_scalar(q, 3.0).unwrap();
        let n = g.neg(pw).unwrap();
        let d = g.div(n, gm).unwrap();
        let mx = g.max(d, gm).unwrap();
        let mn = g.min(mx, d).unwrap();
        let eq = g.equal(mn, d).unwrap();
        let gt = g.greater(mn, d).unwrap();
        let lt = g.less(mn, d).unwrap();
        let ngt = g.not(gt).unwrap();
        let an = g.and(eq, ngt).unwrap();
        let an = g.and(an, lt).unwrap();
        let zero = g.zeros(f, &[2, 6]);
        let wh = g.where_(an, mn, zero).unwrap();
        let rs = g.reduce_sum(wh, &[1], true).unwrap();
        let rmn = g.reduce_mean(wh, &[0], false).unwrap();
        let rmx = g.reduce_max(wh, &[-1], false).unwrap();
        let t = g.transpose(wh, &[1, 0]).unwrap();
        let rsh = g.reshape(t, &[3, -1]).unwrap();
        let cat = g.concat(&[rsh, rsh], 1).unwrap();
        let parts = g.split(cat, 1, &[3, 5]).unwrap();
        let sl = g.slice(parts[1], &[1], &[1], &[5], &[2]).unwrap();
        let ind = g.input("ind", DType::I64, &[2]).unwrap();
        let ga = g.gather(sl, ind, 0).unwrap();
        let un = g.unsqueeze(ga, &[0]).unwrap();
        let sq = g.squeeze(un, &[0]).unwrap();
        let ex = g.expand(sq, &[3, 2, 2]).unwrap();
        let pd = g.pad(ex, &[0, 1, 0, 0, 0, 2]).unwrap();
        let cs = g.cast(idx, f).unwrap();
        let one = g.scalar(1.0, f);
        let sm = g.sum(&[rs, rmx, one]).unwrap();
        let flat_i = g.reshape(idx, &[-1]).unwrap();
        let upd = g.reshape(cs, &[-1]).unwrap();
        let len: usize = g.shape(r).iter().product();
        let z = g.zeros(f, &[len]);
        let sc = g.scatter_elements(z, flat_i, upd, 0, true).unwrap();
        let id = g.identity(sc).unwrap();
        let rec = g.reciprocal(sm).unwrap();
        let ms = g.mul_scalar(rec, 2.0).unwrap();
        let ad = g.add_scalar(ms, 1.0).unwrap();
        let sa = g.sum_all(pd).unwrap();
        let ma = g.mean_all(rmn).unwrap();
        let su = g.sub(sa, ma).unwrap();
        for (name, v) in [("ad", ad), ("su", su), ("id", id), ("p2", p2), ("ct", ct), ("mn", mn)] {
            g.output(name, v).unwrap();
        }
        g
    }

    #[test]
    fn every_builder_passes_the_onnx_checker() {
        onnx_check(&kitchen_sink());
    }

    #[test]
    fn every_builder_runs_in_onnx_runtime() {
        let g = kitchen_sink();
        let mut r = crate::graph::Runner::cpu(&g).unwrap();
        let x = crate::graph::testutil::uniform(&mut crate::graph::testutil::rng(1), DType::F32, &[2, 4, 7, 7]);
        let ind = Tensor::i64(&[2], vec![0, 2]).unwrap();
        let out = r.run(&[("x", &x), ("ind", &ind)]).unwrap();
        assert_eq!(out.f32("ct").unwrap().shape(), &[2, 4, 7, 7]);
        assert_eq!(out.f32("rm.next").unwrap().shape(), &[6]);
        assert!(out.f32("su").unwrap().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn only_needed_nodes_are_written() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[3]).unwrap();
        let unused = g.exp(x).unwrap();
        let _ = g.log(unused).unwrap();
        let y = g.relu(x).unwrap();
        g.output("y", y).unwrap();
        let m = to_model(&g, "t", false).unwrap();
        let gp = m.graph.unwrap();
        assert_eq!(gp.node.len(), 1);
        assert_eq!(gp.node[0].op_type.as_deref(), Some("Relu"));
        assert_eq!(gp.input.len(), 1);
        assert_eq!(m.opset_import[0].version, Some(OPSET));
    }

    #[test]
    fn a_graph_without_outputs_is_an_error() {
        let mut g = Graph::new();
        g.input("x", DType::F32, &[3]).unwrap();
        assert!(matches!(g.to_onnx("t"), Err(Error::GraphInvalid { .. })));
    }

    #[test]
    fn frozen_state_becomes_initializers_and_the_batch_symbolic() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 3]).unwrap();
        let w = g.param("w", &[4, 3], vec![0.5; 12]).unwrap();
        g.param("unused", &[2], vec![1.0; 2]).unwrap();
        let y = g.linear(x, w, None).unwrap();
        g.output("y", y).unwrap();
        let o = WriteOptions { annotate: true, dynamic_batch: true, freeze_state: true, nchwc_block: None };
        let gp = to_model_with(&g, "t", o).unwrap().graph.unwrap();
        let names = |v: &[ValueInfoProto]| v.iter().map(|i| i.name.clone().unwrap()).collect::<Vec<_>>();
        assert_eq!(names(&gp.input), ["x"]);
        let inits: Vec<_> = gp.initializer.iter().map(|t| t.name.clone().unwrap()).collect();
        assert_eq!(inits, ["w"]);
        assert!(gp.value_info.is_empty());
        let dims = |v: &ValueInfoProto| match &v.r#type.as_ref().unwrap().value {
            Some(type_proto::Value::TensorType(t)) => t.shape.as_ref().unwrap().dim.clone(),
            _ => panic!("not a tensor"),
        };
        for v in [&gp.input[0], &gp.output[0]] {
            let d = dims(v);
            assert_eq!(d[0].value, Some(dimension::Value::DimParam(BATCH_DIM.into())));
            assert!(matches!(d[1].value, Some(dimension::Value::DimValue(_))));
        }
        // Runs at another batch size.
        let bytes = to_model_with(&g, "t", o).unwrap().encode_to_vec();
        let mut sess = crate::runtime::init().unwrap().session_from_bytes(&Default::default(), &bytes).unwrap();
        let xs = ndarray::Array2::<f32>::ones((5, 3));
        let out = sess.run(ort::inputs!["x" => ort::value::TensorRef::from_array_view(&xs).unwrap()]).unwrap();
        let y = out["y"].try_extract_array::<f32>().unwrap();
        assert_eq!(y.shape(), [5, 4]);
        assert!(y.iter().all(|&v| (v - 1.5).abs() < 1e-6));
    }
}
