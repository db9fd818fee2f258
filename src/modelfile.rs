//! The model-file format every part reads and writes: an exported model `X.onnx` and its
//! description `X.json` ([`ModelMeta`]), the model's digest over its initializers
//! ([`model_digest`], [`state_digest`]) and the atomic writing of the pair ([`write_model`]).
//!
//! It sits below `encoder` (which loads and checks a pair), `model` (which exports, describes and
//! quantises pairs) and `train::checkpoint` (which digests its tensors the same way), so none of
//! them reaches into another for the format.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsutil::write_atomic;
use crate::graph::Tensor;
use crate::image::Preprocess;
use crate::{Error, Result};

/// The `format` string of a model description this build reads.
pub const MODEL_FORMAT: &str = "hiercon-model/1";

/// The description written beside an exported model (`X.json` for `X.onnx`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// Always [`MODEL_FORMAT`].
    pub format: String,
    /// Backbone name (informational).
    pub arch: String,
    pub input: InputMeta,
    pub output: OutputMeta,
    /// [`model_digest`] of the `.onnx` file (its initializers): the model's
    /// fingerprint, checked on load. Embedding caches are keyed by it.
    pub digest: String,
    /// Any other fields (training run, loss, ...), kept as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The model's image input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputMeta {
    /// Graph input name.
    pub name: String,
    /// Square side in pixels.
    pub size: u32,
    /// Per-channel mean and std applied to 0..1 pixel values.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The model's embedding output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputMeta {
    /// Graph output name.
    pub name: String,
    /// Embedding width.
    pub dim: usize,
}

impl ModelMeta {
    /// `X.json` for `X.onnx`.
    pub fn path_for(model: &Path) -> PathBuf {
        model.with_extension("json")
    }

    /// Reads and validates a description.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let meta: ModelMeta = serde_json::from_str(&text)
            .map_err(|e| Error::ModelMeta { path: path.to_path_buf(), reason: e.to_string() })?;
        meta.validate().map_err(|reason| Error::ModelMeta { path: path.to_path_buf(), reason })?;
        Ok(meta)
    }

    /// The description beside `model` and the model's bytes, after checking that the digest the
    /// description records is the file's ([`Error::ModelDigestMismatch`] otherwise).
    pub fn read_verified(model: &Path) -> Result<(Self, Vec<u8>)> {
        let meta_path = Self::path_for(model);
        let meta = Self::read(&meta_path)?;
        let bytes = std::fs::read(model).map_err(|e| Error::io(model, e))?;
        let found = model_digest(model, &bytes)?;
        if found != meta.digest {
            return Err(Error::ModelDigestMismatch {
                model: model.to_path_buf(),
                meta: meta_path,
                found,
                expected: meta.digest,
            });
        }
        Ok((meta, bytes))
    }

    /// Writes the description as pretty JSON.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("ModelMeta serialises");
        std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
    }

    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        if self.format != MODEL_FORMAT {
            return Err(format!("format is {:?}, expected {MODEL_FORMAT:?}", self.format));
        }
        if self.input.size == 0 || self.output.dim == 0 {
            return Err("input.size and output.dim must be positive".into());
        }
        if self.input.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err(format!("input.std must be positive, got {:?}", self.input.std));
        }
        if self.digest.is_empty() {
            return Err("digest is empty".into());
        }
        Ok(())
    }

    /// The preprocessing this model expects.
    pub fn preprocess(&self) -> Preprocess {
        Preprocess { size: self.input.size, mean: self.input.mean, std: self.input.std }
    }
}

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

/// The model digest of ONNX model bytes: [`state_digest`] over every initializer of the file, as
/// [`crate::graph::import`] reads it. `model.json` records it; [`OrtEncoder`](crate::encoder::OrtEncoder)
/// recomputes it from the `.onnx` file and refuses a pair that disagrees.
pub fn model_digest(path: &Path, bytes: &[u8]) -> Result<String> {
    let f = crate::graph::import::OnnxFile::from_bytes(path, bytes)?;
    Ok(state_digest(f.initializers.iter().map(|(n, t)| (n.as_str(), t))))
}

/// Writes a model pair: `onnx_path` with `bytes`, and `meta` as the `.json` beside it, creating
/// the folder. Each file is replaced atomically (tmp + fsync + rename), so neither is ever half
/// written.
pub(crate) fn write_model(onnx_path: &Path, bytes: &[u8], meta: &ModelMeta) -> Result<()> {
    if let Some(dir) = onnx_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    write_atomic(onnx_path, bytes)?;
    let text = serde_json::to_string_pretty(meta).expect("ModelMeta serialises") + "\n";
    write_atomic(&ModelMeta::path_for(onnx_path), text.as_bytes())
}
