//! Pretrained EfficientNet-Lite: hiercon's `.pth` reader and Lite graph against an independent
//! implementation (`scripts/efficientnet_lite_ref.py`: its own pickle reader, an `onnx.helper`
//! graph, Python's onnxruntime), ImageNet classification of real photos, conversion to
//! safetensors, and the zero-shot export through the real binary.
//!
//! The weights come from `make pretrained` (`.cache/pretrained/`); the photos are the two JPEGs
//! scikit-learn ships (`make pyenv` installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::python;

use hiercon::encoder::{Encoder, ModelMeta, OrtEncoder};
use hiercon::graph::{Runner, Tensor};
use hiercon::image::{Limits, Preprocess, tensor_from_bytes};
use hiercon::model::{Arch, ModelConfig, feature_graph, pretrained};
use hiercon::runtime::RuntimeOptions;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub(crate) fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn weights_file(arch: Arch) -> PathBuf {
    let p = root().join(".cache/pretrained").join(pretrained::source(arch).unwrap().file);
    assert!(p.is_file(), "{} is missing: run `make pretrained` (make test does)", p.display());
    p
}

/// scikit-learn's two sample photos (a Chinese palace, a dahlia), from the test venv.
pub(crate) fn photos() -> Vec<PathBuf> {
    let out = Command::new(python())
        .args([
            "-c",
            "import sklearn, os; print(os.path.join(os.path.dirname(sklearn.__file__), 'datasets', 'images'))",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "scikit-learn in the test venv: {}", String::from_utf8_lossy(&out.stderr));
    let dir = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    ["china.jpg", "flower.jpg"].iter().map(|f| dir.join(f)).collect()
}

/// Writes a float32 C-order `.npy` file.
pub(crate) fn write_npy(path: &Path, shape: &[usize], data: &[f32]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}", dims.join(", "));
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((header.len() as u16).to_le_bytes());
    b.extend(header.as_bytes());
    data.iter().for_each(|x| b.extend(x.to_le_bytes()));
    std::fs::write(path, b).unwrap();
}

/// Runs the independent reference on `images` and returns (features, logits), row-major.
fn reference(pth: &Path, size: usize, images: &Tensor, dir: &Path) -> (Vec<f64>, Vec<f64>) {
    let a = images.as_f32().unwrap();
    let (inp, out) = (dir.join("in.npy"), dir.join("out.npz"));
    write_npy(&inp, a.shape(), a.as_slice().unwrap());
    let script = root().join("scripts/efficientnet_lite_ref.py");
    let r = Command::new(python())
        .arg(&script)
        .args(["--pth".as_ref(), pth.as_os_str(), "--size".as_ref(), size.to_string().as_ref()])
        .args(["--images".as_ref(), inp.as_os_str(), "--out".as_ref(), out.as_os_str()])
        .output()
        .unwrap();
    assert!(r.status.success(), "reference failed: {}", String::from_utf8_lossy(&r.stderr));
    let dump = "import json, sys, numpy as np; d = np.load(sys.argv[1]); \
                print(json.dumps({k: d[k].astype(float).ravel().tolist() for k in ('features', 'logits')}))";
    let r = Command::new(python()).args(["-c", dump]).arg(&out).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let get = |k: &str| v[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>();
    (get("features"), get("logits"))
}

/// hiercon's backbone feature and `_fc` logits for `images`.
fn ours(arch: Arch, size: usize, w: &hiercon::model::Weights, images: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let n = images.shape()[0];
    let cfg = ModelConfig::new(arch, size, 0);
    let mut g = feature_graph(&cfg, n, Some(w)).unwrap();
    let f = g.find("features").unwrap();
    let fcw = g.constant(w["_fc.weight"].clone());
    let fcb = g.constant(w["_fc.bias"].clone());
    let logits = g.linear(f, fcw, Some(fcb)).unwrap();
    g.output("logits", logits).unwrap();
    let mut run = Runner::cpu(&g).unwrap();
    let out = run.run(&[("images", images)]).unwrap();
    let v = |k: &str| out.f32(k).unwrap().iter().map(|&x| x as f64).collect::<Vec<_>>();
    (v("features"), v("logits"))
}

/// Normalised input batch: the two photos, a seeded normal draw, a constant image.
fn inputs(size: usize) -> Tensor {
    let (mean, std) = Arch::EfficientnetLite0.normalization();
    let pre = Preprocess { size: size as u32, mean, std };
    let mut data = Vec::new();
    for p in photos() {
        let t = tensor_from_bytes(&std::fs::read(&p).unwrap(), &pre, &Limits::default()).unwrap();
        data.extend(t.iter().copied());
    }
    let mut r = ChaCha8Rng::seed_from_u64(5);
    data.extend((0..3 * size * size).map(|_| rand_distr_normal(&mut r)));
    data.extend(std::iter::repeat_n(0.25f32, 3 * size * size));
    Tensor::f32(&[4, 3, size, size], data).unwrap()
}

fn rand_distr_normal(r: &mut ChaCha8Rng) -> f32 {
    use rand::Rng;
    let (u1, u2): (f64, f64) = (r.random::<f64>().max(1e-12), r.random());
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn top5(logits: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx.truncate(5);
    idx
}

#[test]
fn lite0_forward_equals_the_independent_reference_and_classifies_photos() {
    let pth = weights_file(Arch::EfficientnetLite0);
    let w = pretrained::load(&pth).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for size in [224, 128] {
        let x = inputs(size);
        let (f_ref, l_ref) = reference(&pth, size, &x, dir.path());
        let (f, l) = ours(Arch::EfficientnetLite0, size, &w, &x);
        let (df, dl) = (max_abs_diff(&f, &f_ref), max_abs_diff(&l, &l_ref));
        assert!(df <= 1e-4 && dl <= 1e-4, "size {size}: features differ by {df:e}, logits by {dl:e}");
        assert!(f.iter().any(|v| v.abs() > 0.1), "features are not trivially small");
        if size == 224 {
            // ImageNet classes 698 palace / 663 monastery / 483 castle for the palace photo,
            // 985 daisy for the dahlia (ImageNet has no dahlia).
            let (china, flower) = (top5(&l[..1000]), top5(&l[1000..2000]));
            assert!(china[..2].contains(&698), "palace photo top-5 {china:?}");
            assert!(china.contains(&663) || china.contains(&483), "palace photo top-5 {china:?}");
            assert!(flower[..2].contains(&985), "dahlia photo top-5 {flower:?}");
        }
    }
}

#[test]
fn lite1_and_lite2_forward_equal_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Arch::EfficientnetLite1, Arch::EfficientnetLite2] {
        let pth = weights_file(arch);
        let w = pretrained::load(&pth).unwrap();
        let x = inputs(96);
        let (f_ref, l_ref) = reference(&pth, 96, &x, dir.path());
        let (f, l) = ours(arch, 96, &w, &x);
        let (df, dl) = (max_abs_diff(&f, &f_ref), max_abs_diff(&l, &l_ref));
        assert!(df <= 1e-4 && dl <= 1e-4, "{arch}: features differ by {df:e}, logits by {dl:e}");
    }
}

#[test]
fn both_readers_see_the_same_tensors_and_safetensors_round_trips() {
    for arch in [Arch::EfficientnetLite0, Arch::EfficientnetLite1, Arch::EfficientnetLite2] {
        let pth = weights_file(arch);
        let r = Command::new(python())
            .arg(root().join("scripts/efficientnet_lite_ref.py"))
            .arg("--pth")
            .arg(&pth)
            .arg("--dump-keys")
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let theirs: Vec<(String, String)> = String::from_utf8(r.stdout)
            .unwrap()
            .lines()
            .filter(|l| l.ends_with("float32"))
            .map(|l| {
                let mut p = l.split('\t');
                (p.next().unwrap().to_string(), p.next().unwrap().replace(' ', ""))
            })
            .collect();
        let w = pretrained::load(&pth).unwrap();
        let mut ours: Vec<(String, String)> = w
            .iter()
            .map(|(n, t)| {
                (n.clone(), format!("[{}]", t.shape().iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")))
            })
            .collect();
        let mut theirs = theirs;
        theirs.sort();
        ours.sort();
        assert_eq!(ours, theirs, "{arch}");

        // convert -> safetensors -> load gives the same tensors, bit for bit.
        let dir = tempfile::tempdir().unwrap();
        let st = dir.path().join("w.safetensors");
        let out = Command::new(env!("CARGO_BIN_EXE_hiercon"))
            .args(["pretrained", "convert"])
            .arg(&pth)
            .arg("--out")
            .arg(&st)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(pretrained::load(&st).unwrap(), w, "{arch}");
    }
}

#[test]
fn damaged_weights_are_clear_errors_from_the_binary() {
    let pth = weights_file(Arch::EfficientnetLite0);
    let dir = tempfile::tempdir().unwrap();
    let data = std::fs::read(&pth).unwrap();
    let cut = dir.path().join("cut.pth");
    std::fs::write(&cut, &data[..data.len() / 3]).unwrap();
    let junk = dir.path().join("junk.pth");
    std::fs::write(&junk, b"hello, not weights").unwrap();
    for (file, want) in [(&cut, "claims"), (&junk, "neither a PyTorch legacy checkpoint nor a safetensors file")] {
        let out = Command::new(env!("CARGO_BIN_EXE_hiercon")).args(["pretrained", "info"]).arg(file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(want) && !err.contains("panicked"), "{err}");
    }
    // A weights file that does not fit the architecture names the tensor.
    let w = pretrained::load(&pth).unwrap();
    let mut wrong = w.clone();
    wrong.insert("_blocks.3._depthwise_conv.weight".into(), Tensor::zeros(hiercon::graph::DType::F32, &[144, 1, 3, 3]));
    let e = feature_graph(&ModelConfig::new(Arch::EfficientnetLite0, 64, 0), 1, Some(&wrong)).unwrap_err();
    assert!(
        e.to_string().contains("_blocks.3._depthwise_conv.weight") && e.to_string().contains("[144, 1, 5, 5]"),
        "{e}"
    );
    // Lite0's weights for Lite1: the first tensor that differs is named (Lite1's block 3 is still
    // a 3x3 stage-2 block where Lite0's is the first 5x5 one).
    let e = feature_graph(&ModelConfig::new(Arch::EfficientnetLite1, 64, 0), 1, Some(&w)).unwrap_err();
    assert!(
        e.to_string().contains("`_blocks.3._depthwise_conv.weight`: pretrained tensor is f32[144, 1, 5, 5]"),
        "{e}"
    );
    let mut short = w.clone();
    short.remove("_conv_head.weight");
    let e = feature_graph(&ModelConfig::new(Arch::EfficientnetLite0, 64, 0), 1, Some(&short)).unwrap_err();
    assert!(
        e.to_string().contains("_conv_head.weight") && e.to_string().contains("missing from the pretrained weights"),
        "{e}"
    );
}

#[test]
fn zero_shot_export_serves_through_the_ort_encoder() {
    // `hiercon export --no-head` writes a model + description that OrtEncoder loads; its
    // embeddings are the normalised pooled features of the graph above.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("zs/lite0.onnx");
    let out = Command::new(env!("CARGO_BIN_EXE_hiercon"))
        .args(["export", "--arch", "efficientnet-lite0", "--no-head", "--image-size", "96", "--out"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta = ModelMeta::read(&ModelMeta::path_for(&model)).unwrap();
    assert_eq!((meta.output.dim, meta.input.size), (1280, 96));
    assert!((meta.input.mean[0] - 127.0 / 255.0).abs() < 1e-6 && (meta.input.std[0] - 128.0 / 255.0).abs() < 1e-6);
    let enc = OrtEncoder::load(&model, &RuntimeOptions::default()).unwrap();
    let x = inputs(96);
    let w = pretrained::load(&weights_file(Arch::EfficientnetLite0)).unwrap();
    let (f, _) = ours(Arch::EfficientnetLite0, 96, &w, &x);
    let view = x.as_f32().unwrap().view().into_dimensionality::<ndarray::Ix4>().unwrap();
    let e = enc.embed(view).unwrap();
    for (i, row) in f.chunks(1280).enumerate() {
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        for (a, b) in e.row(i).iter().zip(row) {
            assert!((*a as f64 - b / norm).abs() < 1e-5, "row {i}: {a} vs {}", b / norm);
        }
    }
    // Without --no-head the binary refuses (a random head would scramble the feature).
    let out = Command::new(env!("CARGO_BIN_EXE_hiercon"))
        .args(["export", "--arch", "efficientnet-lite0", "--out"])
        .arg(dir.path().join("x.onnx"))
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--no-head"));
}
