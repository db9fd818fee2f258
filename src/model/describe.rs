//! `hiercon model describe`: any ONNX image embedder as a model `index`, `serve` and `eval` accept,
//! without training.
//!
//! The file is rewritten at the protobuf level — its nodes stay as they are, so ops hiercon could
//! not train still serve: only the nodes the feature needs are kept, a new input `images`
//! `[batch, 3, S, S]` (NCHW, symbolic batch) feeds the original one (through a Transpose for NHWC
//! models), the feature is flattened when it is `[N, D, 1, 1]`, optionally divided by its L2 norm,
//! and named `embeddings`. External data is inlined. The result is run once by ONNX Runtime on
//! a batch of two to learn the width and to prove it loads, then written with its `model.json`.

use std::collections::HashSet;
use std::path::Path;

use ndarray::ArrayD;
use ort::value::TensorRef;
use prost::Message;
use sha2::{Digest, Sha256};

use super::imported::{Layout, input_layout};
use crate::graph::import::{OnnxFile, dtype, import_err};
use crate::graph::onnx::attribute;
use crate::graph::proto::{
    AttributeProto, ModelProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    tensor_shape_proto::Dimension, tensor_shape_proto::dimension, type_proto,
};
use crate::graph::{Attr, Tensor};
use crate::modelfile::{InputMeta, MODEL_FORMAT, ModelMeta, OutputMeta};
use crate::runtime::RuntimeOptions;
use crate::{Error, Result};

/// What to describe.
#[derive(Debug, Clone, PartialEq)]
pub struct DescribeOptions {
    /// Image side; `None`: the file's fixed size, or 224.
    pub size: Option<usize>,
    /// Per-channel mean and std on 0..1 pixels.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// A graph output to embed with (default: the only one).
    pub output: Option<String>,
    /// An inner value (or node) to embed with instead of an output.
    pub cut: Option<String>,
    /// Append an L2 normalisation to the graph (the encoder normalises rows either way).
    pub normalize: bool,
    /// The model wants BGR channels: they are reversed in front of it.
    pub bgr: bool,
}

/// Name of the derived model's input and output.
const INPUT: &str = "images";
const OUTPUT: &str = "embeddings";

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    attribute(name, &Attr::Ints(v.to_vec()))
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    attribute(name, &Attr::Int(v))
}

fn node(op: &str, name: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

fn float_info(name: &str, dims: Option<Vec<Option<i64>>>) -> ValueInfoProto {
    let shape = dims.map(|d| TensorShapeProto {
        dim: d
            .into_iter()
            .map(|x| Dimension {
                value: Some(match x {
                    Some(v) => dimension::Value::DimValue(v),
                    None => dimension::Value::DimParam(crate::graph::onnx::BATCH_DIM.into()),
                }),
                ..Default::default()
            })
            .collect(),
    });
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: Some(dtype::FLOAT), shape })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A name not used by any value of the file.
fn fresh(taken: &HashSet<String>, want: &str) -> String {
    if !taken.contains(want) {
        return want.to_string();
    }
    (1..).map(|i| format!("hiercon.{want}.{i}")).find(|n| !taken.contains(n)).expect("a free name")
}

/// The file rewritten to embed with `target`: input [`INPUT`] `[batch, 3, size, size]`, the nodes
/// `target` needs, `flatten` / `normalize` appended, output [`OUTPUT`] (`out_dims` if known).
#[allow(clippy::too_many_arguments)]
fn derive(
    file: &OnnxFile,
    layout: Layout,
    bgr: bool,
    size: usize,
    target: &str,
    flatten: bool,
    normalize: bool,
    out_dims: Option<Vec<Option<i64>>>,
) -> Result<(ModelProto, String, String)> {
    let graph = file.proto.graph.as_ref().ok_or_else(|| import_err(&file.path, "the model has no graph"))?;
    let keep = file.ancestors(target)?;
    let mut taken: HashSet<String> = graph.node.iter().flat_map(|n| n.output.iter().cloned()).collect();
    taken.extend(graph.input.iter().filter_map(|i| i.name.clone()));
    taken.extend(graph.initializer.iter().filter_map(|i| i.name.clone()));
    let input_name = fresh(&taken, INPUT);
    let output_name = fresh(&taken, OUTPUT);
    let orig = file.image_input()?.name.clone();
    let mut nodes = Vec::new();
    let mut initializer = Vec::new();
    let mut first = input_name.clone();
    if bgr {
        let (idx, flipped) = (fresh(&taken, "hiercon.bgr_index"), fresh(&taken, "hiercon.bgr"));
        let t = Tensor::i64(&[3], vec![2, 1, 0]).expect("3 elements");
        initializer.push(crate::graph::onnx::tensor_proto(Some(idx.clone()), &t));
        nodes.push(node("Gather", "hiercon.to_bgr", &[&first, &idx], &flipped, vec![attr_int("axis", 1)]));
        first = flipped;
    }
    match layout {
        Layout::Nhwc => {
            nodes.push(node("Transpose", "hiercon.to_nhwc", &[&first], &orig, vec![attr_ints("perm", &[0, 2, 3, 1])]))
        }
        Layout::Nchw => nodes.push(node("Identity", "hiercon.input", &[&first], &orig, vec![])),
    }
    nodes.extend(keep.iter().map(|&i| graph.node[i].clone()));
    let used: HashSet<&str> = keep.iter().flat_map(|&i| graph.node[i].input.iter().map(String::as_str)).collect();
    let dir = file.path.parent().unwrap_or(Path::new("."));
    for t in graph.initializer.iter().filter(|t| used.contains(t.name.as_deref().unwrap_or_default())) {
        initializer.push(inline(t, dir).map_err(|r| import_err(&file.path, r))?);
    }
    let mut cur = target.to_string();
    if flatten {
        let flat = fresh(&taken, "hiercon.flat");
        nodes.push(node("Flatten", "hiercon.flatten", &[&cur], &flat, vec![attr_int("axis", 1)]));
        cur = flat;
    }
    if normalize {
        let (sq, eps, sum, norm, div) = (
            fresh(&taken, "hiercon.sumsq"),
            fresh(&taken, "hiercon.eps"),
            fresh(&taken, "hiercon.sumsq_eps"),
            fresh(&taken, "hiercon.norm"),
            fresh(&taken, "hiercon.normalized"),
        );
        let reduce = if file.opset >= 18 {
            let axes = fresh(&taken, "hiercon.axes");
            initializer.push(crate::graph::onnx::tensor_proto(
                Some(axes.clone()),
                &Tensor::i64(&[1], vec![1]).expect("1 element"),
            ));
            node("ReduceSumSquare", "hiercon.reduce", &[&cur, &axes], &sq, vec![attr_int("keepdims", 1)])
        } else {
            node(
                "ReduceSumSquare",
                "hiercon.reduce",
                &[&cur],
                &sq,
                vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)],
            )
        };
        nodes.push(reduce);
        initializer.push(crate::graph::onnx::tensor_proto(
            Some(eps.clone()),
            &Tensor::f32(&[], vec![super::head::L2_EPS as f32]).expect("scalar"),
        ));
        nodes.push(node("Add", "hiercon.add_eps", &[&sq, &eps], &sum, vec![]));
        nodes.push(node("Sqrt", "hiercon.sqrt", &[&sum], &norm, vec![]));
        nodes.push(node("Div", "hiercon.divide", &[&cur, &norm], &div, vec![]));
        cur = div;
    }
    nodes.push(node("Identity", "hiercon.output", &[&cur], &output_name, vec![]));
    let s = size as i64;
    let mut proto = file.proto.clone();
    let g = proto.graph.as_mut().expect("checked");
    g.node = nodes;
    g.initializer = initializer;
    g.input = vec![float_info(&input_name, Some(vec![None, Some(3), Some(s), Some(s)]))];
    g.output = vec![float_info(&output_name, out_dims)];
    // Stale intermediate shapes (a fixed batch, another size) would contradict the new input.
    g.value_info.clear();
    Ok((proto, input_name, output_name))
}

/// A copy of `t` with external data read into `raw_data`.
fn inline(t: &TensorProto, dir: &Path) -> std::result::Result<TensorProto, String> {
    if t.data_location != Some(1) {
        return Ok(t.clone());
    }
    let mut c = t.clone();
    c.raw_data = Some(crate::graph::import::external_bytes(t, dir)?);
    c.data_location = None;
    c.external_data.clear();
    Ok(c)
}

/// Runs model bytes on one f32 input and returns the named output.
pub(crate) fn run_bytes(bytes: &[u8], input: &str, x: &ArrayD<f32>, output: &str) -> Result<ArrayD<f32>> {
    let rt = crate::runtime::init()?;
    let mut session = rt.session_from_bytes(&RuntimeOptions::default(), bytes)?;
    let t = TensorRef::from_array_view(x.view()).map_err(|e| Error::ort("wrapping the input", e))?;
    let out = session.run(ort::inputs![input => t]).map_err(|e| Error::ort("running the model", e))?;
    let y = out[output].try_extract_array::<f32>().map_err(|e| Error::ort("reading the output", e))?;
    Ok(y.to_owned())
}

/// `file` with input `images` `[batch, 3, size, size]` and `target` as its only output, as
/// bytes (for checks against ONNX Runtime on the original nodes).
pub(crate) fn with_output(
    file: &OnnxFile,
    layout: Layout,
    bgr: bool,
    size: usize,
    target: &str,
) -> Result<(Vec<u8>, String, String)> {
    let (p, i, o) = derive(file, layout, bgr, size, target, false, false, None)?;
    Ok((p.encode_to_vec(), i, o))
}

/// Writes `out` (+ `out.json`): the model at `src` as an embedder (see the module docs).
pub fn describe(src: &Path, out: &Path, o: &DescribeOptions) -> Result<ModelMeta> {
    let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let file = OnnxFile::from_bytes(src, &bytes)?;
    let (layout, fixed) = input_layout(&file)?;
    let size = o.size.or(fixed).unwrap_or(224);
    if fixed.is_some_and(|f| f != size) {
        return Err(import_err(
            src,
            format!("the input is fixed at {0}x{0} pixels; --size {size} does not fit it", fixed.unwrap_or(0)),
        ));
    }
    let (target, what) = match (&o.cut, &o.output) {
        (Some(_), Some(_)) => {
            return Err(Error::InvalidArgument { name: "cut", reason: "give --cut or --output, not both".into() });
        }
        (Some(c), None) => (file.resolve_value(c)?, format!("cut at `{c}`")),
        (None, Some(n)) => {
            if !file.outputs.iter().any(|v| &v.name == n) {
                let names: Vec<&str> = file.outputs.iter().map(|v| v.name.as_str()).collect();
                return Err(import_err(src, format!("`{n}` is not an output of the model (outputs: {names:?})")));
            }
            (n.clone(), format!("output `{n}`"))
        }
        (None, None) => match file.outputs.as_slice() {
            [one] => (one.name.clone(), format!("output `{}`", one.name)),
            outs => {
                let names: Vec<&str> = outs.iter().map(|v| v.name.as_str()).collect();
                return Err(import_err(src, format!("the model has outputs {names:?}: choose one with --output")));
            }
        },
    };
    // Probe: the feature's shape at batch 2.
    let (probe, pin, pout) = with_output(&file, layout, o.bgr, size, &target)?;
    let x = ArrayD::from_shape_fn(ndarray::IxDyn(&[2, 3, size, size]), |i| {
        ((i[1] * 7 + i[2] * 3 + i[3]) % 11) as f32 / 11.0
    });
    let y = run_bytes(&probe, &pin, &x, &pout)
        .map_err(|e| import_err(src, format!("{what} does not run at batch 2 and {size} px: {e}")))?;
    let flatten = match y.shape() {
        [2, _] => false,
        [2, _, rest @ ..] if rest.iter().all(|&d| d == 1) => true,
        s => {
            return Err(import_err(
                src,
                format!(
                    "{what} is {s:?} at batch 2: an embedding must be [N, D] or [N, D, 1, 1] (cut after the pooling)"
                ),
            ));
        }
    };
    let dim = y.shape()[1];
    let (proto, input_name, output_name) =
        derive(&file, layout, o.bgr, size, &target, flatten, o.normalize, Some(vec![None, Some(dim as i64)]))?;
    let mut extra = serde_json::Map::new();
    extra.insert("loss".into(), serde_json::Value::String("none (zero-shot)".into()));
    extra.insert(
        "imported".into(),
        serde_json::json!({
            "source": src, "sha256": sha256, "feature": what, "layout": format!("{layout:?}"),
            "normalized_in_graph": o.normalize, "bgr": o.bgr, "producer": file.producer, "opset": file.opset,
        }),
    );
    let bytes = proto.encode_to_vec();
    let digest = crate::modelfile::model_digest(out, &bytes)?;
    let meta = ModelMeta {
        format: MODEL_FORMAT.to_string(),
        arch: "onnx".into(),
        input: InputMeta { name: input_name, size: size as u32, mean: o.mean, std: o.std },
        output: OutputMeta { name: output_name, dim },
        digest,
        extra,
    };
    crate::modelfile::write_model(out, &bytes, &meta)?;
    Ok(meta)
}
