//! ONNX reader: a `.onnx` file → [`OnnxFile`], its nodes, initializers and image input as plain
//! data (names, op types, attributes as [`Attr`], initializers as [`Tensor`]).
//!
//! This is the way in for models hiercon did not build: `model::imported` replays the nodes into a
//! [`super::Graph`] through the builders, and `model::describe` rewrites the protobuf for
//! zero-shot serving. Initializers are read from `raw_data`, the typed fields, or external-data
//! files next to the model (`location` / `offset` / `length`). Integer initializers of any width
//! become `I64`, `FLOAT` `F32`, `DOUBLE` `F64`, `BOOL` `Bool`; other element types (float16,
//! strings, ...) are an error naming the tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;

use super::ir::{Attr, Tensor};
use super::proto::{AttributeProto, ModelProto, TensorProto, ValueInfoProto, tensor_shape_proto::dimension};
use crate::{Error, Result};

/// One node as the file has it.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxNode {
    /// The node's name, or `#<index>` when the file gives none.
    pub name: String,
    pub op: String,
    /// Input value names; an omitted optional input is `""`.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: Vec<(String, Attr)>,
}

impl OnnxNode {
    pub fn attr(&self, name: &str) -> Option<&Attr> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    pub fn attr_int(&self, name: &str, default: i64) -> i64 {
        match self.attr(name) {
            Some(Attr::Int(i)) => *i,
            _ => default,
        }
    }

    pub fn attr_float(&self, name: &str, default: f32) -> f32 {
        match self.attr(name) {
            Some(Attr::Float(x)) => *x,
            _ => default,
        }
    }

    pub fn attr_ints(&self, name: &str) -> Option<Vec<i64>> {
        match self.attr(name) {
            Some(Attr::Ints(v)) => Some(v.clone()),
            _ => None,
        }
    }

    pub fn attr_str(&self, name: &str) -> Option<&str> {
        match self.attr(name) {
            Some(Attr::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// Input `i` if present and not the empty (omitted) name.
    pub fn input(&self, i: usize) -> Option<&str> {
        self.inputs.get(i).map(String::as_str).filter(|s| !s.is_empty())
    }

    /// `"node `name` (Op)"`, the way errors name a node.
    pub fn describe(&self) -> String {
        format!("node `{}` ({})", self.name, self.op)
    }
}

/// A graph input or output: its name, ONNX element type code and dimensions (`None` where the file
/// gives a symbolic or no size).
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxValue {
    pub name: String,
    pub elem_type: i32,
    pub dims: Vec<Option<i64>>,
}

/// An ONNX model read into plain data.
#[derive(Debug, Clone)]
pub struct OnnxFile {
    pub path: PathBuf,
    /// The default-domain opset the file declares.
    pub opset: i64,
    pub producer: String,
    /// In file (topological) order.
    pub nodes: Vec<OnnxNode>,
    /// Every initializer by name.
    pub initializers: BTreeMap<String, Tensor>,
    /// Graph inputs that are not initializers.
    pub inputs: Vec<OnnxValue>,
    pub outputs: Vec<OnnxValue>,
    /// The decoded protobuf itself (for rewriting).
    pub proto: ModelProto,
}

/// `TensorProto.DataType` codes.
pub mod dtype {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT8: i32 = 3;
    pub const UINT16: i32 = 4;
    pub const INT16: i32 = 5;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const STRING: i32 = 8;
    pub const BOOL: i32 = 9;
    pub const FLOAT16: i32 = 10;
    pub const DOUBLE: i32 = 11;
    pub const UINT32: i32 = 12;
    pub const UINT64: i32 = 13;

    /// The ONNX name of a data type code.
    pub fn name(code: i32) -> String {
        let n = match code {
            FLOAT => "float",
            UINT8 => "uint8",
            INT8 => "int8",
            UINT16 => "uint16",
            INT16 => "int16",
            INT32 => "int32",
            INT64 => "int64",
            STRING => "string",
            BOOL => "bool",
            FLOAT16 => "float16",
            DOUBLE => "double",
            UINT32 => "uint32",
            UINT64 => "uint64",
            16 => "bfloat16",
            _ => return format!("data type {code}"),
        };
        n.to_string()
    }
}

pub(crate) fn import_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::OnnxImport { path: path.to_path_buf(), reason: reason.into() }
}

impl OnnxFile {
    /// Reads and decodes `path`; initializers with external data are read from files beside it.
    pub fn read(path: &Path) -> Result<OnnxFile> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, &bytes)
    }

    /// Decodes model bytes; `path` names the model in errors and anchors external data.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<OnnxFile> {
        let proto = ModelProto::decode(bytes)
            .map_err(|e| import_err(path, format!("not an ONNX model (protobuf decoding failed: {e})")))?;
        let graph = proto.graph.as_ref().ok_or_else(|| import_err(path, "the model has no graph"))?;
        let opset = proto
            .opset_import
            .iter()
            .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
            .and_then(|o| o.version)
            .ok_or_else(|| import_err(path, "the model declares no default-domain opset"))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut initializers = BTreeMap::new();
        for t in &graph.initializer {
            let name = t.name.clone().unwrap_or_default();
            let tensor = read_tensor(t, dir).map_err(|r| import_err(path, format!("initializer `{name}`: {r}")))?;
            initializers.insert(name, tensor);
        }
        if !graph.sparse_initializer.is_empty() {
            return Err(import_err(path, "sparse initializers are not supported"));
        }
        let mut nodes = Vec::with_capacity(graph.node.len());
        for (i, n) in graph.node.iter().enumerate() {
            let name = n.name.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| format!("#{i}"));
            let op = n.op_type.clone().unwrap_or_default();
            if let Some(d) = n.domain.as_deref().filter(|d| !d.is_empty() && *d != "ai.onnx") {
                return Err(import_err(
                    path,
                    format!("node `{name}` ({op}) is in domain `{d}`; only default-domain ONNX ops are imported"),
                ));
            }
            let mut attrs = Vec::with_capacity(n.attribute.len());
            for a in &n.attribute {
                let an = a.name.clone().unwrap_or_default();
                let v = read_attr(a, dir)
                    .map_err(|r| import_err(path, format!("node `{name}` ({op}), attribute `{an}`: {r}")))?;
                attrs.push((an, v));
            }
            nodes.push(OnnxNode { name, op, inputs: n.input.clone(), outputs: n.output.clone(), attrs });
        }
        let inputs = graph
            .input
            .iter()
            .filter(|v| !initializers.contains_key(v.name.as_deref().unwrap_or_default()))
            .map(value)
            .collect();
        let outputs = graph.output.iter().map(value).collect();
        Ok(OnnxFile {
            path: path.to_path_buf(),
            opset,
            producer: format!(
                "{} {}",
                proto.producer_name.as_deref().unwrap_or("?"),
                proto.producer_version.as_deref().unwrap_or("")
            )
            .trim()
            .to_string(),
            nodes,
            initializers,
            inputs,
            outputs,
            proto,
        })
    }

    /// The one non-initializer input, which must be a float tensor of rank 4.
    pub fn image_input(&self) -> Result<&OnnxValue> {
        let [input] = self.inputs.as_slice() else {
            let names: Vec<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(import_err(
                &self.path,
                format!(
                    "the model has {} inputs ({names:?}); hiercon imports image models with exactly one",
                    names.len()
                ),
            ));
        };
        if input.elem_type != dtype::FLOAT {
            return Err(import_err(
                &self.path,
                format!(
                    "input `{}` is {}; hiercon feeds images as float tensors",
                    input.name,
                    dtype::name(input.elem_type)
                ),
            ));
        }
        if input.dims.len() != 4 {
            return Err(import_err(
                &self.path,
                format!(
                    "input `{}` has rank {}; an image input is [N, 3, H, W] or [N, H, W, 3]",
                    input.name,
                    input.dims.len()
                ),
            ));
        }
        Ok(input)
    }

    /// The node that produces `value`, with its index.
    pub fn producer_of(&self, value: &str) -> Option<(usize, &OnnxNode)> {
        self.nodes.iter().enumerate().find(|(_, n)| n.outputs.iter().any(|o| o == value))
    }

    /// Resolves a `--cut` argument: a value name, or a node name meaning that node's first output.
    pub fn resolve_value(&self, name: &str) -> Result<String> {
        let is_value = self.inputs.iter().any(|i| i.name == name) || self.producer_of(name).is_some();
        if is_value {
            return Ok(name.to_string());
        }
        if let Some(n) = self.nodes.iter().find(|n| n.name == name) {
            return n
                .outputs
                .first()
                .cloned()
                .ok_or_else(|| import_err(&self.path, format!("node `{name}` has no outputs")));
        }
        Err(import_err(&self.path, format!("`{name}` is neither a value nor a node of the graph")))
    }

    /// Indices of the nodes `value` depends on, in file order (checked to be topological).
    pub fn ancestors(&self, value: &str) -> Result<Vec<usize>> {
        let mut produced: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for inp in n.inputs.iter().filter(|s| !s.is_empty()) {
                let known = produced.contains_key(inp.as_str())
                    || self.initializers.contains_key(inp)
                    || self.inputs.iter().any(|x| &x.name == inp);
                if !known {
                    return Err(import_err(
                        &self.path,
                        format!("{} reads `{inp}`, which no earlier node, input or initializer provides", n.describe()),
                    ));
                }
            }
            for o in &n.outputs {
                produced.insert(o, i);
            }
        }
        let mut need = vec![false; self.nodes.len()];
        let mut stack = vec![value];
        while let Some(v) = stack.pop() {
            if let Some(&i) = produced.get(v)
                && !std::mem::replace(&mut need[i], true)
            {
                stack.extend(self.nodes[i].inputs.iter().map(String::as_str).filter(|s| !s.is_empty()));
            }
        }
        Ok((0..self.nodes.len()).filter(|&i| need[i]).collect())
    }
}

fn value(v: &ValueInfoProto) -> OnnxValue {
    let (elem_type, dims) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(super::proto::type_proto::Value::TensorType(t)) => (
            t.elem_type.unwrap_or(0),
            t.shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match d.value {
                            Some(dimension::Value::DimValue(x)) if x > 0 => Some(x),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        ),
        _ => (0, vec![]),
    };
    OnnxValue { name: v.name.clone().unwrap_or_default(), elem_type, dims }
}

fn read_attr(a: &AttributeProto, dir: &Path) -> std::result::Result<Attr, String> {
    use super::proto::attribute_proto::AttributeType as T;
    let ty = a.r#type.and_then(|t| T::try_from(t).ok());
    Ok(match ty {
        Some(T::Float) => Attr::Float(a.f.unwrap_or(0.0)),
        Some(T::Int) => Attr::Int(a.i.unwrap_or(0)),
        Some(T::String) => Attr::Str(String::from_utf8_lossy(a.s.as_deref().unwrap_or_default()).into_owned()),
        Some(T::Tensor) => Attr::Tensor(read_tensor(a.t.as_ref().ok_or("a tensor attribute without a tensor")?, dir)?),
        Some(T::Floats) => Attr::Floats(a.floats.clone()),
        Some(T::Ints) => Attr::Ints(a.ints.clone()),
        // Old files may leave `type` unset: infer it from the field that is present.
        None if a.f.is_some() => Attr::Float(a.f.unwrap_or(0.0)),
        None if a.i.is_some() => Attr::Int(a.i.unwrap_or(0)),
        None if a.s.is_some() => Attr::Str(String::from_utf8_lossy(a.s.as_deref().unwrap_or_default()).into_owned()),
        None if a.t.is_some() => Attr::Tensor(read_tensor(a.t.as_ref().expect("checked"), dir)?),
        None if !a.ints.is_empty() => Attr::Ints(a.ints.clone()),
        None if !a.floats.is_empty() => Attr::Floats(a.floats.clone()),
        other => {
            return Err(format!("attribute type {other:?} is not supported (graphs, sparse tensors, strings lists)"));
        }
    })
}

/// The bytes of a tensor stored outside the model (`data_location = EXTERNAL`).
pub(crate) fn external_bytes(t: &TensorProto, dir: &Path) -> std::result::Result<Vec<u8>, String> {
    let get = |k: &str| t.external_data.iter().find(|e| e.key.as_deref() == Some(k)).and_then(|e| e.value.clone());
    let location = get("location").ok_or("external data without a `location`")?;
    let num = |k: &str| -> std::result::Result<Option<u64>, String> {
        get(k).map(|v| v.parse::<u64>().map_err(|_| format!("external data `{k}` is {v:?}, not a number"))).transpose()
    };
    let (offset, length) = (num("offset")?.unwrap_or(0), num("length")?);
    let file = dir.join(&location);
    let bytes = std::fs::read(&file).map_err(|e| format!("external data file {}: {e}", file.display()))?;
    let start = offset as usize;
    let end = match length {
        Some(l) => start.checked_add(l as usize).ok_or("external data range overflows")?,
        None => bytes.len(),
    };
    if start > bytes.len() || end > bytes.len() {
        return Err(format!(
            "external data file {} has {} bytes; the tensor needs bytes {start}..{end}",
            file.display(),
            bytes.len()
        ));
    }
    Ok(bytes[start..end].to_vec())
}

/// A `TensorProto` as a host [`Tensor`].
pub(crate) fn read_tensor(t: &TensorProto, dir: &Path) -> std::result::Result<Tensor, String> {
    if t.dims.iter().any(|&d| d < 0) {
        return Err(format!("negative dimension in {:?}", t.dims));
    }
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d).filter(|&v| v <= 1 << 34))
        .ok_or_else(|| format!("dimensions {:?} are too large", t.dims))?;
    let code = t.data_type.unwrap_or(0);
    let raw = if t.data_location == Some(1) { Some(external_bytes(t, dir)?) } else { t.raw_data.clone() };
    let width = match code {
        dtype::FLOAT | dtype::INT32 | dtype::UINT32 => 4,
        dtype::DOUBLE | dtype::INT64 | dtype::UINT64 => 8,
        dtype::INT16 | dtype::UINT16 => 2,
        dtype::INT8 | dtype::UINT8 | dtype::BOOL => 1,
        other => return Err(format!("element type {} is not supported", dtype::name(other))),
    };
    if let Some(raw) = &raw
        && raw.len() != n * width
    {
        return Err(format!("{} bytes of data for {n} elements of {}", raw.len(), dtype::name(code)));
    }
    let typed_len = |len: usize| -> std::result::Result<(), String> {
        if len != n {
            return Err(format!("{len} values for shape {shape:?}"));
        }
        Ok(())
    };
    let chunks = |raw: &[u8]| raw.chunks_exact(width).map(|c| c.to_vec()).collect::<Vec<_>>();
    let t = match code {
        dtype::FLOAT => {
            let v: Vec<f32> = match &raw {
                Some(r) => chunks(r).iter().map(|c| f32::from_le_bytes(c[..4].try_into().expect("4 bytes"))).collect(),
                None => {
                    typed_len(t.float_data.len())?;
                    t.float_data.clone()
                }
            };
            Tensor::f32(&shape, v)
        }
        dtype::DOUBLE => {
            let v: Vec<f64> = match &raw {
                Some(r) => chunks(r).iter().map(|c| f64::from_le_bytes(c[..8].try_into().expect("8 bytes"))).collect(),
                None => {
                    typed_len(t.double_data.len())?;
                    t.double_data.clone()
                }
            };
            Tensor::f64(&shape, v)
        }
        dtype::BOOL => {
            let v: Vec<bool> = match &raw {
                Some(r) => r.iter().map(|&b| b != 0).collect(),
                None => {
                    typed_len(t.int32_data.len())?;
                    t.int32_data.iter().map(|&b| b != 0).collect()
                }
            };
            return Ok(Tensor::Bool(ndarray::ArrayD::from_shape_vec(shape, v).map_err(|e| e.to_string())?));
        }
        _ => {
            let v: Vec<i64> = match &raw {
                Some(r) => chunks(r)
                    .iter()
                    .map(|c| match code {
                        dtype::INT64 => i64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
                        dtype::UINT64 => u64::from_le_bytes(c[..8].try_into().expect("8 bytes")) as i64,
                        dtype::INT32 => i32::from_le_bytes(c[..4].try_into().expect("4 bytes")) as i64,
                        dtype::UINT32 => u32::from_le_bytes(c[..4].try_into().expect("4 bytes")) as i64,
                        dtype::INT16 => i16::from_le_bytes(c[..2].try_into().expect("2 bytes")) as i64,
                        dtype::UINT16 => u16::from_le_bytes(c[..2].try_into().expect("2 bytes")) as i64,
                        dtype::INT8 => c[0] as i8 as i64,
                        _ => c[0] as i64,
                    })
                    .collect(),
                None if code == dtype::INT64 => {
                    typed_len(t.int64_data.len())?;
                    t.int64_data.clone()
                }
                None if code == dtype::UINT64 => {
                    typed_len(t.uint64_data.len())?;
                    t.uint64_data.iter().map(|&x| x as i64).collect()
                }
                None => {
                    typed_len(t.int32_data.len())?;
                    t.int32_data.iter().map(|&x| x as i64).collect()
                }
            };
            Tensor::i64(&shape, v)
        }
    };
    t.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::proto::{GraphProto, NodeProto, OperatorSetIdProto, StringStringEntryProto};
    use crate::graph::{DType, Graph};

    #[test]
    fn a_written_graph_reads_back_with_its_initializers_and_attributes() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 3]).unwrap();
        let w = g.param("w", &[3, 4], (0..12).map(|i| i as f32 * 0.5).collect()).unwrap();
        let y = g.matmul(x, w).unwrap();
        let y = g.flatten(y, 1).unwrap();
        g.output("y", y).unwrap();
        let o = crate::graph::WriteOptions { freeze_state: true, dynamic_batch: true, ..Default::default() };
        let bytes = g.to_onnx_with("t", o).unwrap();
        let f = OnnxFile::from_bytes(Path::new("t.onnx"), &bytes).unwrap();
        assert_eq!(f.opset, crate::graph::onnx::OPSET);
        assert_eq!(f.inputs, vec![OnnxValue { name: "x".into(), elem_type: dtype::FLOAT, dims: vec![None, Some(3)] }]);
        assert_eq!(f.initializers["w"], Tensor::f32(&[3, 4], (0..12).map(|i| i as f32 * 0.5).collect()).unwrap());
        let ops: Vec<&str> = f.nodes.iter().map(|n| n.op.as_str()).collect();
        assert_eq!(ops, ["MatMul", "Flatten"]);
        assert_eq!(f.nodes[1].attr_int("axis", 0), 1);
        assert_eq!(f.ancestors("y").unwrap(), vec![0, 1]);
        assert_eq!(f.resolve_value(&f.nodes[0].name).unwrap(), f.nodes[0].outputs[0]);
        assert!(f.resolve_value("nothing").unwrap_err().to_string().contains("neither a value nor a node"));
    }

    fn tensor(name: &str, dims: &[i64], code: i32) -> TensorProto {
        TensorProto { name: Some(name.into()), dims: dims.to_vec(), data_type: Some(code), ..Default::default() }
    }

    #[test]
    fn typed_fields_external_data_and_bad_tensors() {
        let dir = tempfile::tempdir().unwrap();
        // int32 in the typed field, f32 from an external file at an offset.
        let mut a = tensor("a", &[3], dtype::INT32);
        a.int32_data = vec![-1, 2, 7];
        assert_eq!(read_tensor(&a, dir.path()).unwrap(), Tensor::i64(&[3], vec![-1, 2, 7]).unwrap());
        let data: Vec<u8> = [9.0f32, 1.5, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(dir.path().join("w.bin"), [vec![0u8; 4], data].concat()).unwrap();
        let mut e = tensor("e", &[3], dtype::FLOAT);
        e.data_location = Some(1);
        let kv = |k: &str, v: &str| StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) };
        e.external_data = vec![kv("location", "w.bin"), kv("offset", "4"), kv("length", "12")];
        assert_eq!(read_tensor(&e, dir.path()).unwrap(), Tensor::f32(&[3], vec![9.0, 1.5, -2.0]).unwrap());
        e.external_data[2] = kv("length", "16");
        assert!(read_tensor(&e, dir.path()).unwrap_err().contains("bytes 4..20"));
        e.external_data[0] = kv("location", "missing.bin");
        assert!(read_tensor(&e, dir.path()).unwrap_err().contains("missing.bin"));
        // Wrong byte counts and unsupported types are errors, not panics.
        let mut r = tensor("r", &[2, 2], dtype::FLOAT);
        r.raw_data = Some(vec![0; 12]);
        assert!(read_tensor(&r, dir.path()).unwrap_err().contains("12 bytes of data for 4 elements"));
        assert!(read_tensor(&tensor("h", &[2], dtype::FLOAT16), dir.path()).unwrap_err().contains("float16"));
        let mut u = tensor("u", &[2], dtype::UINT8);
        u.raw_data = Some(vec![255, 3]);
        assert_eq!(read_tensor(&u, dir.path()).unwrap(), Tensor::i64(&[2], vec![255, 3]).unwrap());
    }

    #[test]
    fn malformed_files_are_errors_that_name_the_problem() {
        let p = Path::new("m.onnx");
        assert!(
            OnnxFile::from_bytes(p, b"\xff\xff\xff garbage").unwrap_err().to_string().contains("not an ONNX model")
        );
        let model = |nodes: Vec<NodeProto>| ModelProto {
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(13) }],
            graph: Some(GraphProto { node: nodes, ..Default::default() }),
            ..Default::default()
        };
        let node = |op: &str, domain: Option<&str>, inputs: &[&str]| NodeProto {
            op_type: Some(op.into()),
            name: Some(format!("n_{op}")),
            domain: domain.map(String::from),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![format!("{op}_out")],
            ..Default::default()
        };
        let e = OnnxFile::from_bytes(p, &model(vec![node("QLinearConv", Some("com.microsoft"), &[])]).encode_to_vec())
            .unwrap_err();
        assert!(e.to_string().contains("domain `com.microsoft`"), "{e}");
        let f = OnnxFile::from_bytes(p, &model(vec![node("Relu", None, &["ghost"])]).encode_to_vec()).unwrap();
        let e = f.ancestors("Relu_out").unwrap_err();
        assert!(e.to_string().contains("reads `ghost`"), "{e}");
        assert!(f.image_input().unwrap_err().to_string().contains("0 inputs"));
    }
}
