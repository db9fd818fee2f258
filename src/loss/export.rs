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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::graph::proto::ModelProto;
    use crate::graph::testutil::onnx_check;
    use crate::loss::options::{Dedup, LossKind};

    fn shape(classes: Option<usize>) -> LossShape {
        LossShape { batch: 4, columns: 4, dim: 3, classes }
    }

    #[test]
    fn every_kind_passes_the_onnx_checker() {
        for kind in [LossKind::Hmc, LossKind::Hce, LossKind::Hmce, LossKind::Supcon, LossKind::Simclr, LossKind::Ce] {
            for dedup in [Dedup::Official, Dedup::None] {
                let opts = LossOptions { kind, dedup, ..LossOptions::default() };
                let g = export_graph(&opts, shape(Some(5))).unwrap();
                let outs: Vec<&str> = g.outputs().iter().map(|&v| g.name(v)).collect();
                assert_eq!(outs, ["loss", "features_grad"]);
                onnx_check(&g);
            }
        }
    }

    #[test]
    fn ce_parameters_are_inputs_with_initializers() {
        let opts = LossOptions { kind: LossKind::Ce, ..LossOptions::default() };
        let model = ModelProto::decode(&export_loss(&opts, shape(Some(5))).unwrap()[..]).unwrap();
        let graph = model.graph.unwrap();
        let inputs: Vec<&str> = graph.input.iter().filter_map(|i| i.name.as_deref()).collect();
        assert_eq!(inputs, ["features", "labels", "loss.ce.weight", "loss.ce.bias"]);
        let (w, b) = crate::loss::graph::ce_init(3, 5);
        for (name, values) in [("loss.ce.weight", w), ("loss.ce.bias", b)] {
            let init = graph.initializer.iter().find(|t| t.name.as_deref() == Some(name)).expect(name);
            let stored: Vec<f32> = if init.float_data.is_empty() {
                let raw = init.raw_data.as_deref().unwrap_or_default();
                raw.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
            } else {
                init.float_data.clone()
            };
            assert_eq!(stored, values, "{name}");
        }
    }

    #[test]
    fn bad_arguments_are_loss_errors() {
        let hmce = LossOptions::default();
        let one_column = LossShape { columns: 1, ..shape(None) };
        assert!(matches!(export_loss(&hmce, one_column), Err(Error::LossTooFewColumns { k: 1, .. })));
        let empty = LossShape { batch: 0, ..shape(None) };
        assert!(matches!(export_loss(&hmce, empty), Err(Error::LossEmptyBatch { n: 0, .. })));
        let ce = LossOptions { kind: LossKind::Ce, ..LossOptions::default() };
        assert!(matches!(export_loss(&ce, shape(None)), Err(Error::LossMissingClasses)));
    }
}
