//! `hiercon export-loss`: one loss alone as an ONNX model, `features` and `labels` in, `loss`
//! and `features_grad` out, for checking the loss from other tools (docs/export-loss.md).

use prost::Message;

use super::graph::loss_graph;
use super::options::LossOptions;
use crate::Result;
use crate::graph::{DType, GradOptions, Graph, InputKind, grad_with, onnx};

/// The shapes of an exported loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossShape {
    /// Samples per batch N (the features have 2N rows).
    pub batch: usize,
    /// Label columns K.
    pub columns: usize,
    /// Feature dimension D.
    pub dim: usize,
    /// Classes C of the `ce` baseline (required for it, ignored otherwise).
    pub classes: Option<usize>,
}

/// The graph `hiercon export-loss` writes: inputs `features` f32 `[2N, D]` and `labels` i64
/// `[N, K]` (and, for `ce`, the parameters `loss.ce.weight` `[D, C]` and `loss.ce.bias` `[C]`),
/// outputs `loss` (f32, rank 0) and `features_grad` (f32 `[2N, D]`).
pub fn export_graph(opts: &LossOptions, shape: LossShape) -> Result<Graph> {
    let mut g = Graph::new();
    let features = g.input("features", DType::F32, &[2 * shape.batch, shape.dim])?;
    let labels = g.input("labels", DType::I64, &[shape.batch, shape.columns])?;
    let parts = loss_graph(&mut g, features, labels, opts, shape.classes)?;
    let (grads, _) = grad_with(&mut g, parts.loss, &[features], &GradOptions::default())?;
    g.output("loss", parts.loss)?;
    g.output("features_grad", grads[0])?;
    Ok(g)
}

/// [`export_graph`] as ONNX model bytes. The `ce` classifier's parameters stay graph inputs, each
/// with an initializer holding its deterministic initial value
/// ([`super::graph::ce_init`]): a runtime uses that value unless the caller feeds another.
pub fn export_loss(opts: &LossOptions, shape: LossShape) -> Result<Vec<u8>> {
    let g = export_graph(opts, shape)?;
    let mut model = onnx::to_model(&g, &format!("hiercon_loss_{}", opts.kind.name()), true)?;
    let graph = model.graph.as_mut().expect("to_model always sets the graph");
    for input in g.inputs_of(InputKind::Param) {
        let init = input.init.as_ref().expect("parameters carry their initial value");
        graph.initializer.push(onnx::tensor_proto(Some(g.name(input.value).to_string()), init));
    }
    Ok(model.encode_to_vec())
}
