//! Inference export: the inference graph with trained values written as a standard `.onnx`
//! file (dynamic batch, parameters as initializers) plus its `model.json` description.

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;

use super::ModelConfig;
use super::step::inference_graph;
use crate::graph::{InputKind, Tensor, WriteOptions};
use crate::modelfile::{InputMeta, MODEL_FORMAT, ModelMeta, OutputMeta, model_digest, write_model};
use crate::{Error, Result};

/// Per-channel mean the exported model expects on 0..1 RGB pixels (ImageNet's, as torchvision).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Per-channel std the exported model expects (ImageNet's, as torchvision).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Writes the inference model of `cfg` with the parameters and buffers in `state` (other entries,
/// such as optimizer state or loss parameters, are ignored) to `onnx_path`, and its description
/// to `onnx_path` with extension `.json`. The model has one input `images` f32
/// `[batch, 3, S, S]` (symbolic batch), normalised with [`IMAGENET_MEAN`] / [`IMAGENET_STD`], and
/// one output `embeddings` `[batch, embed_dim]` with unit rows. (`cfg.arch`'s own normalisation:
/// EfficientNet-Lite's weights expect `(x·255 - 127) / 128`, recorded in the description.) `digest` is [`model_digest`] of
/// the written file (every initializer: the exported tensors and the graph's constants); `extra` goes into the description as extra fields.
pub fn export(
    cfg: &ModelConfig,
    state: &BTreeMap<String, Tensor>,
    onnx_path: &Path,
    extra: serde_json::Map<String, serde_json::Value>,
) -> Result<ModelMeta> {
    let mut g = inference_graph(cfg, 1)?;
    let names: Vec<String> =
        g.inputs().iter().filter(|i| i.kind != InputKind::Data).map(|i| g.name(i.value).to_string()).collect();
    let mut exported = Vec::with_capacity(names.len());
    for name in &names {
        let t = state.get(name).ok_or_else(|| Error::ModelState {
            name: name.clone(),
            reason: "missing from the state to export".into(),
        })?;
        g.set_init(name, t.clone()).map_err(|e| Error::ModelState { name: name.clone(), reason: e.to_string() })?;
        exported.push((name.as_str(), t));
    }
    drop(exported);
    let opts = WriteOptions { annotate: false, dynamic_batch: true, freeze_state: true, nchwc_block: None };
    let bytes = crate::graph::onnx::to_model_with(&g, "hiercon", opts)?.encode_to_vec();
    let digest = model_digest(onnx_path, &bytes)?;
    let meta = ModelMeta {
        format: MODEL_FORMAT.to_string(),
        arch: cfg.arch.name().to_string(),
        input: InputMeta {
            name: "images".into(),
            size: cfg.image_size as u32,
            mean: cfg.normalization().0,
            std: cfg.normalization().1,
        },
        output: OutputMeta { name: "embeddings".into(), dim: cfg.embed_dim },
        digest,
        extra,
    };
    // A crash between the two renames can still pair the new model with the old description;
    // `hiercon train --resume` on the finished run exports both again.
    write_model(onnx_path, &bytes, &meta)?;
    tracing::info!(path = %onnx_path.display(), arch = %cfg.arch, digest = %meta.digest, "exported model");
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::{Encoder, OrtEncoder};
    use crate::graph::testutil::{onnx_check_file, rng, uniform};
    use crate::graph::{Carried, DType, GradOptions, Optimizer, Runner, Sgd};
    use crate::model::step::tests::{batch, test_loss, tiny};
    use crate::model::step_graph;
    use crate::modelfile::state_digest;
    use crate::runtime::RuntimeOptions;

    /// The model state after two SGD steps (so BN running statistics have moved off 0 / 1).
    fn trained_state() -> BTreeMap<String, Tensor> {
        let cfg = tiny();
        let sg =
            step_graph(&cfg, None, 4, 2, &Optimizer::Sgd(Sgd::default()), &GradOptions::default(), test_loss).unwrap();
        let mut run = Runner::cpu(&sg.graph).unwrap();
        let mut carried = Carried::new(&sg.graph).unwrap();
        let lr = Tensor::F32(ndarray::arr0(0.05f32).into_dyn());
        for s in 0..2 {
            let (images, labels) = batch(&cfg, 4, 2, 20 + s);
            let mut feeds = vec![("images", &images), ("labels", &labels), ("lr", &lr)];
            feeds.extend(carried.feeds());
            let out = run.run(&feeds).unwrap();
            carried.update(&out).unwrap();
        }
        let mut state: BTreeMap<String, Tensor> =
            sg.model_state_names().into_iter().map(|n| (n.clone(), carried.get(&n).unwrap().clone())).collect();
        // A loss-owned entry must be ignored by export.
        state.insert("loss.w".into(), carried.get("loss.w").unwrap().clone());
        state
    }

    #[test]
    fn exported_model_matches_the_inference_graph_at_any_batch_size() {
        // OrtEncoder on the exported file vs Runner on `inference_graph` fed the same state
        // (both f32 ORT; the encoder re-normalises rows): |diff| <= 1e-5. The exported file has a
        // symbolic batch, so batches of 3 and 1 both run; it passes the ONNX checker.
        let cfg = tiny();
        let state = trained_state();
        assert_ne!(state["bn1.running_var"], Tensor::full(DType::F32, &[32], 1.0));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        let mut extra = serde_json::Map::new();
        extra.insert("loss".into(), "test".into());
        let meta = export(&cfg, &state, &path, extra).unwrap();
        onnx_check_file(&path);
        assert_eq!(ModelMeta::read(&ModelMeta::path_for(&path)).unwrap(), meta);
        assert_eq!(meta.extra["loss"], "test");
        assert_eq!((meta.input.size, meta.output.dim, meta.arch.as_str()), (16, 8, "resnet-mini"));

        let enc = OrtEncoder::load(&path, &RuntimeOptions::default()).unwrap();
        let images = uniform(&mut rng(40), DType::F32, &[3, 3, 16, 16]);
        let g = inference_graph(&cfg, 3).unwrap();
        let mut run = Runner::cpu(&g).unwrap();
        let mut feeds: Vec<(&str, &Tensor)> = vec![("images", &images)];
        feeds.extend(state.iter().filter(|(n, _)| g.find(n).is_some()).map(|(n, t)| (n.as_str(), t)));
        let want =
            run.run(&feeds).unwrap().f32("embeddings").unwrap().clone().into_dimensionality::<ndarray::Ix2>().unwrap();
        let view = images.as_f32().unwrap().view().into_dimensionality::<ndarray::Ix4>().unwrap();
        let got = enc.embed(view).unwrap();
        assert_eq!(got.shape(), [3, 8]);
        for (a, b) in got.iter().zip(want.iter()) {
            assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
        }
        for row in want.rows() {
            assert!((row.dot(&row) - 1.0).abs() < 1e-5);
        }
        let one = enc.embed(view.slice(ndarray::s![1..2, .., .., ..])).unwrap();
        for (a, b) in one.iter().zip(want.row(1).iter()) {
            assert!((a - b).abs() <= 1e-5, "batch of one: {a} vs {b}");
        }
    }

    #[test]
    fn digest_covers_every_value_and_missing_state_is_named() {
        let state = trained_state();
        let d = state_digest(state.iter().map(|(n, t)| (n.as_str(), t)));
        assert_eq!(d.len(), 64);
        let mut changed = state.clone();
        if let Some(Tensor::F32(a)) = changed.get_mut("layer3.0.bn2.running_mean") {
            a[[5]] += 1e-6;
        }
        assert_ne!(state_digest(changed.iter().map(|(n, t)| (n.as_str(), t))), d);
        // Order of iteration does not matter.
        assert_eq!(state_digest(state.iter().rev().map(|(n, t)| (n.as_str(), t))), d);

        let dir = tempfile::tempdir().unwrap();
        let mut missing = state.clone();
        missing.remove("head.fc2.bias");
        let e = export(&tiny(), &missing, &dir.path().join("m.onnx"), Default::default()).unwrap_err();
        assert!(matches!(&e, Error::ModelState { name, .. } if name == "head.fc2.bias"), "{e}");
        let mut wrong = state;
        wrong.insert("head.fc2.bias".into(), Tensor::zeros(DType::F32, &[3]));
        let e = export(&tiny(), &wrong, &dir.path().join("m.onnx"), Default::default()).unwrap_err();
        assert!(e.to_string().contains("head.fc2.bias") && e.to_string().contains("[3]"), "{e}");
    }
}
