//! Inference export: the inference graph with trained values written as a standard `.onnx`
//! file (dynamic batch, parameters as initializers) plus its `model.json` description.

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::ModelConfig;
use super::step::inference_graph;
use crate::encoder::{InputMeta, MODEL_FORMAT, ModelMeta, OutputMeta};
use crate::graph::{InputKind, Tensor, WriteOptions};
use crate::{Error, Result};

/// Per-channel mean the exported model expects on 0..1 RGB pixels (ImageNet's, as torchvision).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Per-channel std the exported model expects (ImageNet's, as torchvision).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Hex sha256 over the named tensors in name order. Each contributes its UTF-8 name, a 0 byte,
/// its ONNX data-type code and rank (u64 little-endian), its dimensions (u64 LE) and its
/// elements (little-endian). Equal digests mean equal parameters, names and shapes.
pub fn state_digest<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> String {
    let mut sorted: Vec<(&str, &Tensor)> = tensors.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (name, t) in sorted {
        h.update(name.as_bytes());
        h.update([0u8]);
        h.update((t.dtype().onnx() as u64).to_le_bytes());
        h.update((t.shape().len() as u64).to_le_bytes());
        for &d in t.shape() {
            h.update((d as u64).to_le_bytes());
        }
        match t {
            Tensor::F32(a) => a.iter().for_each(|x| h.update(x.to_le_bytes())),
            Tensor::F64(a) => a.iter().for_each(|x| h.update(x.to_le_bytes())),
            Tensor::I64(a) => a.iter().for_each(|x| h.update(x.to_le_bytes())),
            Tensor::Bool(a) => a.iter().for_each(|&x| h.update([x as u8])),
        }
    }
    hex::encode(h.finalize())
}

/// Writes the inference model of `cfg` with the parameters and buffers in `state` (other entries,
/// such as optimizer state or loss parameters, are ignored) to `onnx_path`, and its description
/// to `onnx_path` with extension `.json`. The model has one input `images` f32
/// `[batch, 3, S, S]` (symbolic batch), normalised with [`IMAGENET_MEAN`] / [`IMAGENET_STD`], and
/// one output `embeddings` `[batch, embed_dim]` with unit rows. `digest` is [`state_digest`] of
/// the exported tensors; `extra` goes into the description as extra fields.
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
    let digest = state_digest(exported);
    g.write_onnx_with(onnx_path, "hiercon", WriteOptions { annotate: false, dynamic_batch: true, freeze_state: true })?;
    let meta = ModelMeta {
        format: MODEL_FORMAT.to_string(),
        arch: cfg.arch.name().to_string(),
        input: InputMeta { name: "images".into(), size: cfg.image_size as u32, mean: IMAGENET_MEAN, std: IMAGENET_STD },
        output: OutputMeta { name: "embeddings".into(), dim: cfg.embed_dim },
        digest,
        extra,
    };
    meta.write(&ModelMeta::path_for(onnx_path))?;
    tracing::info!(path = %onnx_path.display(), arch = %cfg.arch, digest = %meta.digest, "exported model");
    Ok(meta)
}
