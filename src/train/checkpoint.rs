//! Training checkpoints: every state tensor (parameters, buffers, optimizer state) plus the
//! trainer's JSON metadata in one safetensors file, written atomically and verified on load.
//!
//! The safetensors header's `__metadata__` holds `format` ([`CHECKPOINT_FORMAT`]), `digest`
//! ([`state_digest`](crate::modelfile::state_digest) of the tensors, so damage inside the data is
//! caught, not only damage to the header) and `meta` (the caller's JSON, opaque here: step,
//! sampler state, RNG state, ...).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ndarray::ArrayD;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::fsutil::write_atomic;
use crate::graph::Tensor;
use crate::modelfile::state_digest;
use crate::{Error, Result};

/// The `format` written into every checkpoint this build reads.
pub const CHECKPOINT_FORMAT: &str = "hiercon-checkpoint/1";

/// A training checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Every fed-back input of the step graph by name.
    pub state: BTreeMap<String, Tensor>,
    /// The trainer's own state (opaque to this module).
    pub meta: serde_json::Value,
}

fn damaged(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.to_path_buf(), reason: reason.into() }
}

fn le_bytes(t: &Tensor) -> (Dtype, Vec<u8>) {
    match t {
        Tensor::F32(a) => (Dtype::F32, a.iter().flat_map(|x| x.to_le_bytes()).collect()),
        Tensor::F64(a) => (Dtype::F64, a.iter().flat_map(|x| x.to_le_bytes()).collect()),
        Tensor::I64(a) => (Dtype::I64, a.iter().flat_map(|x| x.to_le_bytes()).collect()),
        Tensor::Bool(a) => (Dtype::BOOL, a.iter().map(|&x| x as u8).collect()),
    }
}

fn from_view(path: &Path, name: &str, v: &TensorView) -> Result<Tensor> {
    let shape = v.shape().to_vec();
    let data = v.data();
    fn array<T>(shape: &[usize], v: Vec<T>) -> std::result::Result<ArrayD<T>, ndarray::ShapeError> {
        ArrayD::from_shape_vec(shape, v)
    }
    let t = match v.dtype() {
        Dtype::F32 => array(&shape, data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
            .map(Tensor::F32),
        Dtype::F64 => array(&shape, data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect())
            .map(Tensor::F64),
        Dtype::I64 => array(&shape, data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
            .map(Tensor::I64),
        Dtype::BOOL => array(&shape, data.iter().map(|&b| b != 0).collect()).map(Tensor::Bool),
        other => return Err(damaged(path, format!("tensor `{name}` has unsupported type {other:?}"))),
    };
    t.map_err(|e| damaged(path, format!("tensor `{name}`: {e}")))
}

impl Checkpoint {
    /// Writes the checkpoint to `path` atomically: a temporary file in the same directory is
    /// written and fsynced, renamed over `path`, and the directory fsynced, so a crash leaves
    /// either the old file or the new one.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = self
            .state
            .iter()
            .map(|(n, t)| {
                let (dt, bytes) = le_bytes(t);
                (n.clone(), dt, t.shape().to_vec(), bytes)
            })
            .collect();
        let views = tensors
            .iter()
            .map(|(n, dt, s, b)| {
                Ok((n.as_str(), TensorView::new(*dt, s.clone(), b).map_err(|e| damaged(path, e.to_string()))?))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut info = HashMap::new();
        info.insert("format".to_string(), CHECKPOINT_FORMAT.to_string());
        info.insert("digest".to_string(), state_digest(self.state.iter().map(|(n, t)| (n.as_str(), t))));
        info.insert("meta".to_string(), self.meta.to_string());
        let bytes = safetensors::serialize(views, Some(info)).map_err(|e| damaged(path, e.to_string()))?;
        write_atomic(path, &bytes)
    }

    /// Reads and verifies a checkpoint. A file that is not a safetensors file, lacks hiercon's
    /// metadata, or whose tensors do not match the recorded digest is an
    /// [`Error::Checkpoint`] naming the file.
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| damaged(path, format!("not a readable safetensors file ({e}); the file is damaged")))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| damaged(path, e.to_string()))?;
        let info = header.metadata().as_ref().ok_or_else(|| damaged(path, "no hiercon metadata in the header"))?;
        let field = |k: &str| info.get(k).ok_or_else(|| damaged(path, format!("metadata has no `{k}`")));
        let format = field("format")?;
        if format != CHECKPOINT_FORMAT {
            return Err(damaged(path, format!("format is {format:?}, expected {CHECKPOINT_FORMAT:?}")));
        }
        let meta: serde_json::Value =
            serde_json::from_str(field("meta")?).map_err(|e| damaged(path, format!("metadata `meta`: {e}")))?;
        let mut state = BTreeMap::new();
        for (name, view) in st.tensors() {
            let t = from_view(path, &name, &view)?;
            state.insert(name, t);
        }
        let digest = state_digest(state.iter().map(|(n, t)| (n.as_str(), t)));
        if &digest != field("digest")? {
            return Err(damaged(path, "tensor data does not match the recorded digest; the file is damaged"));
        }
        Ok(Checkpoint { state, meta })
    }

    /// Checks that the checkpoint holds exactly the tensors of `expected` (e.g.
    /// [`StepGraph::initial_state`](crate::model::StepGraph::initial_state)) with the same types
    /// and shapes; names every mismatch.
    pub fn check_fits(&self, path: &Path, expected: &BTreeMap<String, Tensor>) -> Result<()> {
        let mut problems = Vec::new();
        for (n, want) in expected {
            match self.state.get(n) {
                None => problems.push(format!("`{n}` is missing")),
                Some(t) if t.dtype() != want.dtype() || t.shape() != want.shape() => problems.push(format!(
                    "`{n}` is {}{:?}, the model needs {}{:?}",
                    t.dtype(),
                    t.shape(),
                    want.dtype(),
                    want.shape()
                )),
                _ => {}
            }
        }
        problems.extend(self.state.keys().filter(|n| !expected.contains_key(*n)).map(|n| format!("`{n}` is unknown")));
        if problems.is_empty() {
            return Ok(());
        }
        let more = if problems.len() > 5 { format!(" (and {} more)", problems.len() - 5) } else { String::new() };
        problems.truncate(5);
        Err(damaged(path, format!("does not fit this model: {}{more}", problems.join("; "))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::DType;
    use crate::graph::testutil::{rng, uniform};

    fn sample() -> Checkpoint {
        let mut r = rng(3);
        let mut state = BTreeMap::new();
        state.insert("conv1.weight".to_string(), uniform(&mut r, DType::F32, &[4, 3, 3, 3]));
        state.insert("conv1.weight.exp_avg".to_string(), uniform(&mut r, DType::F32, &[4, 3, 3, 3]));
        state.insert("bn1.running_var".to_string(), uniform(&mut r, DType::F32, &[4]));
        state.insert("scalar".to_string(), Tensor::F32(ndarray::arr0(2.5f32).into_dyn()));
        state.insert("counts".to_string(), Tensor::i64(&[3], vec![-1, 0, i64::MAX]).unwrap());
        let meta = serde_json::json!({"step": 17, "sampler": {"cursor": [1, 2, 3]}, "rng": "abc"});
        Checkpoint { state, meta }
    }

    #[test]
    fn round_trip_is_exact_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let c = sample();
        c.save(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), c);
        // Saving again replaces the file and leaves no temporary behind.
        let mut c2 = c.clone();
        c2.meta["step"] = 18.into();
        c2.save(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), c2);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ckpt.safetensors")]);
        // It is a plain safetensors file.
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(SafeTensors::deserialize(&bytes).unwrap().tensors().len(), 5);
        c2.check_fits(&path, &c.state).unwrap();
    }

    #[test]
    fn damage_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        sample().save(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let check = |bytes: &[u8], want: &str| {
            std::fs::write(&path, bytes).unwrap();
            let e = Checkpoint::load(&path).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, Error::Checkpoint { .. }), "{msg}");
            assert!(msg.contains("ckpt.safetensors") && msg.contains(want), "{msg}");
        };
        check(&good[..good.len() - 10], "damaged");
        check(&good[..5], "damaged");
        check(b"not a checkpoint at all", "damaged");
        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x40;
        check(&flipped, "digest");
        // A plain safetensors file without hiercon's metadata.
        let t = [0u8; 4];
        let plain = safetensors::serialize([("x", TensorView::new(Dtype::F32, vec![1], &t).unwrap())], None).unwrap();
        check(&plain, "metadata");
        // Missing file: an I/O error with the path.
        let e = Checkpoint::load(&dir.path().join("nope.safetensors")).unwrap_err();
        assert!(e.to_string().contains("nope.safetensors"), "{e}");
    }

    #[test]
    fn check_fits_names_each_mismatch() {
        let c = sample();
        let mut want = c.state.clone();
        want.remove("scalar");
        want.insert("bn1.running_var".into(), Tensor::zeros(DType::F32, &[8]));
        want.insert("extra".into(), Tensor::zeros(DType::F32, &[1]));
        let msg = c.check_fits(Path::new("c.safetensors"), &want).unwrap_err().to_string();
        for part in ["`scalar` is unknown", "`extra` is missing", "`bn1.running_var` is f32[4]", "c.safetensors"] {
            assert!(msg.contains(part), "{part} not in {msg}");
        }
    }
}
