//! `hiercon model quantize` through the binary, on the shipped model and the emoji catalogue's
//! real images (when `HIERCON_TEST_DATA` names the data folder; `make test` sets it): ONNX
//! Runtime runs the written model on its int8 kernels, its embeddings of unseen images stay
//! within a stated tolerance of the float model's, `eval` accepts it, and bad requests are
//! clear errors that write nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use hiercon::catalogue::{Manifest, Subset};
use hiercon::encoder::{Encoder, ModelMeta, OrtEncoder};
use hiercon::graph::proto::ModelProto;
use hiercon::image::{Limits, batch_from_files, stack};
use hiercon::runtime::{self, RuntimeOptions};
use prost::Message;

fn hiercon() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hiercon"));
    c.env("RUST_LOG", "warn").env("NO_COLOR", "1");
    c
}

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/emoji-lite0-hmce.onnx")
}

fn emoji_manifest() -> Option<PathBuf> {
    match std::env::var_os("HIERCON_TEST_DATA") {
        Some(dir) => {
            let p = PathBuf::from(dir).join("emoji/manifest.jsonl");
            assert!(p.is_file(), "{} is missing although HIERCON_TEST_DATA is set: run `make data`", p.display());
            Some(p)
        }
        None => {
            eprintln!("HIERCON_TEST_DATA is not set: skipping (run `make test`, which imports the data first)");
            None
        }
    }
}

fn quantize(manifest: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    hiercon()
        .args(["model", "quantize"])
        .arg(shipped())
        .arg("--manifest")
        .arg(manifest)
        .args(["--calibration-images", "32", "--check-images", "16"])
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// Op types of the graph ONNX Runtime runs after its optimisations.
fn optimized_ops(model: &Path, dir: &Path) -> HashMap<String, usize> {
    let opt = dir.join("optimized.onnx");
    let rt = runtime::init().unwrap();
    let _session = rt
        .session_builder(&RuntimeOptions::default())
        .unwrap()
        .with_optimized_model_path(&opt)
        .unwrap()
        .commit_from_file(model)
        .unwrap();
    let m = ModelProto::decode(std::fs::read(&opt).unwrap().as_slice()).unwrap();
    let mut ops = HashMap::new();
    for n in m.graph.unwrap().node {
        *ops.entry(n.op_type.unwrap_or_default()).or_insert(0) += 1;
    }
    ops
}

fn cosines(a: &ndarray::Array2<f32>, b: &ndarray::Array2<f32>) -> Vec<f32> {
    // Rows are unit vectors: the cosine is the dot product.
    a.rows().into_iter().zip(b.rows()).map(|(x, y)| x.dot(&y)).collect()
}

#[test]
fn the_shipped_model_quantises_runs_on_int8_kernels_and_stays_close_on_unseen_images() {
    let Some(manifest) = emoji_manifest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("int8.onnx");
    let o = quantize(&manifest, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("calibrated on 32 `train` images") && stdout.contains("cosine mean"), "{stdout}");

    // The description records what was done, and its digest is the file's (the encoder checks).
    let meta = ModelMeta::read(&out.with_extension("json")).unwrap();
    let q = &meta.extra["quantization"];
    assert_eq!(q["calibration"]["split"], "train");
    assert_eq!(q["calibration"]["images"], 32);
    assert_eq!(q["method"], "minmax");
    assert_eq!(q["format"], "QDQ");
    let float = OrtEncoder::load(&shipped(), &RuntimeOptions::default()).unwrap();
    assert_eq!(q["source_digest"], float.digest());
    let int8 = OrtEncoder::load(&out, &RuntimeOptions::default()).unwrap();
    assert_ne!(int8.digest(), float.digest());
    assert_eq!((int8.dim(), int8.preprocess()), (float.dim(), float.preprocess()));

    // ONNX Runtime fuses the pairs into its integer kernels: every convolution runs as
    // QLinearConv, the residual adds as QLinearAdd, the head as QGemm; no float Conv is left.
    let ops = optimized_ops(&out, dir.path());
    assert!(ops.get("QLinearConv").copied().unwrap_or(0) >= 45, "{ops:?}");
    assert!(ops.get("QLinearAdd").copied().unwrap_or(0) >= 5, "{ops:?}");
    assert!(!ops.contains_key("Conv") && !ops.contains_key("FusedConv"), "{ops:?}");

    // Unseen products' real images (the test split: calibration never saw them). Tolerance:
    // cosine ≥ 0.99 on average and ≥ 0.97 for every image between float and int8 embeddings.
    let m = Manifest::read(&manifest).unwrap();
    let paths: Vec<PathBuf> = Subset::Test.select(&m.items).iter().take(48).map(|it| m.image_path(it)).collect();
    let x: Vec<_> =
        batch_from_files(&paths, float.preprocess(), &Limits::default()).into_iter().collect::<Result<_, _>>().unwrap();
    let x = stack(&x);
    let c = cosines(&float.embed(x.view()).unwrap(), &int8.embed(x.view()).unwrap());
    let mean = c.iter().sum::<f32>() / c.len() as f32;
    let worst = c.iter().copied().fold(f32::INFINITY, f32::min);
    assert!(mean >= 0.99 && worst >= 0.97, "cosine mean {mean}, worst {worst}");

    // `eval` accepts it like any model.
    let report = dir.path().join("eval");
    let e = hiercon()
        .args(["eval", "--model"])
        .arg(&out)
        .arg("--manifest")
        .arg(&manifest)
        .args(["--split", "test", "--max-queries", "100", "--report"])
        .arg(&report)
        .output()
        .unwrap();
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report.with_extension("json")).unwrap()).unwrap();
    assert_eq!(r["model"]["digest"], int8.digest());
}

#[test]
fn quantize_refuses_what_it_must_not_do_and_writes_nothing() {
    let Some(manifest) = emoji_manifest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("int8.onnx");
    let fails = |extra: &[&str], model_out: &Path, needle: &str| {
        let o = quantize(&manifest, model_out, extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{extra:?}: {err}");
        assert!(!model_out.exists() && !model_out.with_extension("json").exists());
    };
    // The unseen split never calibrates.
    fails(&["--split", "test"], &out, "seen products");
    // A node that is not there cannot be kept in float.
    fails(&["--keep-float", "no-such-node"], &out, "no-such-node");
    fails(&["--method", "percentile", "--percentile", "20"], &out, "not in (50, 100]");

    // An int8 model is not quantised twice.
    let first = dir.path().join("first.onnx");
    assert!(quantize(&manifest, &first, &[]).status.success());
    let o = hiercon()
        .args(["model", "quantize"])
        .arg(&first)
        .arg("--manifest")
        .arg(&manifest)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("quantised already"), "{err}");
    assert!(!out.exists());
}

/// Scaled JPEG decoding on real pictures through the shipped model: emoji of the unseen split
/// enlarged to 1024 px photos-to-be (bilinear, over white, JPEG quality 90) are embedded from a
/// full decode and from the 1/4-scale DCT decode `hiercon` uses by default; the two embeddings
/// agree to cosine >= 0.999 on average and >= 0.995 for every image (0.9996 and 0.9975 seen).
#[test]
fn dct_scaled_jpeg_decoding_keeps_embeddings() {
    let Some(manifest) = emoji_manifest() else { return };
    let m = Manifest::read(&manifest).unwrap();
    let enc = OrtEncoder::load(&shipped(), &RuntimeOptions::default()).unwrap();
    let full = Limits { jpeg_dct_scaling: false, ..Limits::default() };
    let reduced = Limits::default();
    let mut cosines = Vec::new();
    for it in m.items.iter().filter(|it| it.split == hiercon::catalogue::Split::Test).step_by(37).take(24) {
        let img = hiercon::image::decode_file(&m.dir.join(&it.image), &Limits::default()).unwrap();
        let big = image::imageops::resize(&img, 1024, 1024, image::imageops::FilterType::Triangle);
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&big).unwrap();
        let a = hiercon::image::tensor_from_bytes(&jpeg, enc.preprocess(), &full).unwrap();
        let b = hiercon::image::tensor_from_bytes(&jpeg, enc.preprocess(), &reduced).unwrap();
        assert_ne!(a, b, "{}: the reduced path was not taken", it.id);
        let e = enc.embed(stack(&[a, b]).view()).unwrap();
        let (x, y) = (e.row(0), e.row(1));
        cosines.push(x.dot(&y) / (x.dot(&x).sqrt() * y.dot(&y).sqrt()));
    }
    let mean = cosines.iter().sum::<f32>() / cosines.len() as f32;
    let min = cosines.iter().copied().fold(1.0, f32::min);
    eprintln!("scaled vs full JPEG decoding: cosine mean {mean:.5}, min {min:.5} over {} images", cosines.len());
    assert!(mean >= 0.999 && min >= 0.995, "cosine mean {mean}, min {min}");
}
