//! Test helpers for the graph module: seeded tensors, the ONNX checker via the project's Python
//! venv, and the finite-difference gradient check run through ONNX Runtime.

use std::path::PathBuf;
use std::process::Command;

use ndarray::ArrayD;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::ir::{DType, Graph, Tensor};

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform values in [-1, 1).
pub fn uniform(rng: &mut ChaCha8Rng, dtype: DType, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    from_f64(dtype, shape, v)
}

/// Distinct values at least `gap` apart (a shuffled grid plus a little jitter), centred on 0
/// and kept `gap / 2` away from it, so that no max/relu kink lies within a finite-difference
/// step of `gap / 4`.
#[allow(dead_code)]
pub fn separated(rng: &mut ChaCha8Rng, dtype: DType, shape: &[usize], gap: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut v: Vec<f64> = (0..n)
        .map(|i| {
            let k = i as f64 - (n / 2) as f64;
            (k + 0.5) * gap + rng.random_range(-0.1..0.1) * gap
        })
        .collect();
    v.shuffle(rng);
    from_f64(dtype, shape, v)
}

pub fn from_f64(dtype: DType, shape: &[usize], v: Vec<f64>) -> Tensor {
    match dtype {
        DType::F32 => Tensor::F32(ArrayD::from_shape_vec(shape, v.into_iter().map(|x| x as f32).collect()).unwrap()),
        DType::F64 => Tensor::F64(ArrayD::from_shape_vec(shape, v).unwrap()),
        other => panic!("from_f64: {other}"),
    }
}

/// The venv Python named by `HIERCON_PYTHON` (set by `make test`).
pub fn python() -> PathBuf {
    match std::env::var_os("HIERCON_PYTHON").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "HIERCON_PYTHON is not set: run `make pyenv` and then the tests through `make test` (or set \
             HIERCON_PYTHON=.cache/venv/bin/python)"
        ),
    }
}

/// Runs `onnx.checker.check_model(full_check=True)` on the annotated model: this also makes
/// ONNX's own shape inference agree with every type and shape our builders inferred.
pub fn onnx_check(g: &Graph) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    g.write_onnx(&path, "check").unwrap();
    let out = Command::new(python())
        .args(["-c", "import onnx, sys; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True); print('ok')"])
        .arg(&path)
        .output()
        .expect("the Python in HIERCON_PYTHON should run");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "onnx checker rejected the model:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}


/// Plain-Rust reference convolution (NCHW, OIHW weight, symmetric stride / pad / dilation).
pub fn conv_ref(x: &ArrayD<f64>, w: &ArrayD<f64>, stride: usize, pad: usize, dil: usize, groups: usize) -> ArrayD<f64> {
    let (n, c, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (m, cg, kh, kw) = (w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]);
    assert_eq!(c, cg * groups);
    let ho = (h + 2 * pad - dil * (kh - 1) - 1) / stride + 1;
    let wo = (wd + 2 * pad - dil * (kw - 1) - 1) / stride + 1;
    let mg = m / groups;
    let mut y = ArrayD::zeros(vec![n, m, ho, wo]);
    for b in 0..n {
        for o in 0..m {
            let grp = o / mg;
            for i in 0..ho {
                for j in 0..wo {
                    let mut acc = 0.0;
                    for ci in 0..cg {
                        for a in 0..kh {
                            for e in 0..kw {
                                let (r, s) = ((i * stride + a * dil) as isize - pad as isize, (j * stride + e * dil) as isize - pad as isize);
                                if r >= 0 && s >= 0 && (r as usize) < h && (s as usize) < wd {
                                    acc += x[[b, grp * cg + ci, r as usize, s as usize]] * w[[o, ci, a, e]];
                                }
                            }
                        }
                    }
                    y[[b, o, i, j]] = acc;
                }
            }
        }
    }
    y
}
