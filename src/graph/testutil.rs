//! Test helpers for the graph module: seeded tensors, the ONNX checker via the project's Python
//! venv, and the finite-difference gradient check run through ONNX Runtime.

use std::path::PathBuf;
use std::process::Command;

use ndarray::ArrayD;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::ir::{DType, Graph, Tensor, Value};
use super::run::Runner;

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

/// The venv Python named by `HIERCON_PYTHON` (set by `make test`), else the one `make pyenv`
/// leaves in this source tree's `.cache/venv`.
pub fn python() -> PathBuf {
    let vendored = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/venv/bin/python");
    match std::env::var_os("HIERCON_PYTHON").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None if vendored.is_file() => vendored,
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
    onnx_check_file(&path);
}

/// Runs `onnx.checker.check_model(full_check=True)` on an `.onnx` file.
pub fn onnx_check_file(path: &std::path::Path) {
    let out = Command::new(python())
        .args([
            "-c",
            "import onnx, sys; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True); print('ok')",
        ])
        .arg(path)
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
                                let (r, s) = (
                                    (i * stride + a * dil) as isize - pad as isize,
                                    (j * stride + e * dil) as isize - pad as isize,
                                );
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

/// Finite-difference check of `grad` for one op.
///
/// `build` maps the differentiable inputs (declared by this function, one per entry of
/// `inputs`, named `x0`, `x1`, ...) to one output `y`. The check forms
/// `f(x) = sum(y ⊙ R)` with a fixed random `R`, takes `∇f` with autodiff, and compares the
/// directional derivative `⟨∇f, v⟩` with the central difference
/// `(f(x + εv) − f(x − εv)) / 2ε` for three random directions `v`, all evaluated by ONNX
/// Runtime. Passes when `|ad − fd| <= tol · max(1, |ad|, |fd|)`.
pub struct FdCheck {
    pub dtype: DType,
    pub eps: f64,
    pub tol: f64,
    /// Spacing of the input values (see [`separated`]); 0 draws uniform inputs.
    pub gap: f64,
}

impl FdCheck {
    /// f64 forward: ε = 1e-6, tolerance 1e-6.
    pub fn f64() -> FdCheck {
        FdCheck { dtype: DType::F64, eps: 1e-6, tol: 1e-6, gap: 0.0 }
    }
    /// f32 forward (ops ORT runs only in f32): ε = 1e-2, tolerance 1e-2.
    pub fn f32() -> FdCheck {
        FdCheck { dtype: DType::F32, eps: 1e-2, tol: 1e-2, gap: 0.0 }
    }
    /// Inputs spaced `gap` apart (for ops with kinks: Relu, Max, MaxPool, ReduceMax).
    pub fn separated(mut self, gap: f64) -> FdCheck {
        self.gap = gap;
        self.eps = self.eps.min(gap / 8.0);
        self
    }

    /// Runs the check; `seed` fixes inputs, R and the directions.
    pub fn run(&self, seed: u64, shapes: &[&[usize]], build: impl FnOnce(&mut Graph, &[Value]) -> Value) {
        let mut r = rng(seed);
        let mut g = Graph::new();
        let xs: Vec<Value> =
            shapes.iter().enumerate().map(|(i, s)| g.input(&format!("x{i}"), self.dtype, s).unwrap()).collect();
        let y = build(&mut g, &xs);
        let ys = g.shape(y).to_vec();
        let rt = g.constant(uniform(&mut r, self.dtype, &ys));
        let prod = g.mul(y, rt).unwrap();
        let f = g.sum_all(prod).unwrap();
        let grads = super::grad(&mut g, f, &xs).unwrap();
        g.output("f", f).unwrap();
        for (i, &gv) in grads.iter().enumerate() {
            g.output(&format!("g{i}"), gv).unwrap();
        }
        let mut runner = Runner::cpu(&g).unwrap();

        let x0: Vec<Tensor> = shapes
            .iter()
            .map(|s| {
                if self.gap > 0.0 { separated(&mut r, self.dtype, s, self.gap) } else { uniform(&mut r, self.dtype, s) }
            })
            .collect();
        let eval = |runner: &mut Runner, xs: &[Tensor]| {
            let names: Vec<String> = (0..xs.len()).map(|i| format!("x{i}")).collect();
            let feeds: Vec<(&str, &Tensor)> = names.iter().map(|n| n.as_str()).zip(xs.iter()).collect();
            runner.run(&feeds).unwrap()
        };
        let out = eval(&mut runner, &x0);
        let gvals: Vec<Vec<f64>> = (0..xs.len()).map(|i| out.get(&format!("g{i}")).unwrap().to_f64_vec()).collect();
        for trial in 0..3 {
            let vs: Vec<Vec<f64>> = shapes
                .iter()
                .map(|s| (0..s.iter().product::<usize>()).map(|_| r.random_range(-1.0..1.0)).collect())
                .collect();
            let shifted = |sign: f64| -> Vec<Tensor> {
                x0.iter()
                    .zip(&vs)
                    .map(|(x, v)| {
                        let d: Vec<f64> = x.to_f64_vec().iter().zip(v).map(|(a, b)| a + sign * self.eps * b).collect();
                        from_f64(self.dtype, x.shape(), d)
                    })
                    .collect()
            };
            let fp = eval(&mut runner, &shifted(1.0)).get("f").unwrap().to_f64_vec()[0];
            let fm = eval(&mut runner, &shifted(-1.0)).get("f").unwrap().to_f64_vec()[0];
            let fd = (fp - fm) / (2.0 * self.eps);
            let ad: f64 = gvals.iter().zip(&vs).map(|(gv, v)| gv.iter().zip(v).map(|(a, b)| a * b).sum::<f64>()).sum();
            let scale = 1f64.max(ad.abs()).max(fd.abs());
            assert!(
                (ad - fd).abs() <= self.tol * scale,
                "direction {trial}: autodiff {ad} vs finite difference {fd} (|diff| {} > {} x {scale}) for inputs {shapes:?}",
                (ad - fd).abs(),
                self.tol
            );
        }
    }
}
