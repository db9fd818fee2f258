//! `hiercon export-loss` end to end: the real binary writes the model, Python's onnxruntime
//! runs it and the ONNX checker (full check) accepts it, and the loss and its gradient match the
//! plain-Rust f64 reference (tolerance 2e-5 relative to `max(1, max |reference|)`: the exported
//! model computes in f32).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::python;

use hiercon::loss::reference::{ce_loss_and_grad, loss_and_grad};
use hiercon::loss::{Dedup, LossKind, LossOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TOL: f64 = 2e-5;

/// Checks the model with `onnx.checker.check_model(full_check=True)`, runs it with
/// onnxruntime on the JSON inputs and prints `{"loss": .., "features_grad": [..], "inputs": [..]}`.
const RUN_MODEL: &str = r#"
import json, sys
import numpy as np, onnx, onnxruntime as ort
model, inputs = sys.argv[1], json.load(open(sys.argv[2]))
proto = onnx.load(model)
onnx.checker.check_model(proto, full_check=True)
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
feeds = {"features": np.array(inputs["features"], dtype=np.float32).reshape(inputs["features_shape"]),
         "labels": np.array(inputs["labels"], dtype=np.int64).reshape(inputs["labels_shape"])}
loss, grad = sess.run(["loss", "features_grad"], feeds)
print(json.dumps({"loss": float(loss), "loss_shape": list(loss.shape), "grad_shape": list(grad.shape),
                  "features_grad": grad.ravel().astype(float).tolist(),
                  "inputs": [i.name for i in sess.get_inputs()], "outputs": [o.name for o in sess.get_outputs()],
                  "overridable": [i.name for i in sess.get_overridable_initializers()],
                  "graph_inputs": [i.name for i in proto.graph.input]}))
"#;

fn export(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new(env!("CARGO_BIN_EXE_hiercon"))
        .arg("export-loss")
        .args(args)
        .arg("-o")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "export-loss {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    path
}

fn run_python(
    dir: &Path,
    model: &Path,
    features: &[f64],
    labels: &[i64],
    n: usize,
    k: usize,
    d: usize,
) -> serde_json::Value {
    let inputs = dir.join("inputs.json");
    let json = serde_json::json!({
        "features": features, "features_shape": [2 * n, d], "labels": labels, "labels_shape": [n, k],
    });
    std::fs::write(&inputs, json.to_string()).unwrap();
    let out = Command::new(python()).args(["-c", RUN_MODEL]).arg(model).arg(&inputs).output().unwrap();
    assert!(out.status.success(), "python onnxruntime run failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_close(what: &str, a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(worst <= TOL * scale, "{what}: max error {worst:e} > {TOL:e} x {scale}");
}

/// Unit rows, rounded through f32 (what the model is fed).
fn features(rng: &mut ChaCha8Rng, rows: usize, d: usize) -> Vec<f64> {
    let mut f: Vec<f64> = (0..rows * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    for row in f.chunks_mut(d) {
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        row.iter_mut().for_each(|v| *v = (*v / norm) as f32 as f64);
    }
    f
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn exported_losses_run_in_python_onnxruntime_and_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (n, k, d) = (6, 4, 5);
    // Nested ids with repeats at every level; the last column is the image id.
    let labels: Vec<i64> = (0..n)
        .flat_map(|i| {
            let category = (i % 2) as i64;
            let product = category * 10 + ((i / 2) % 2) as i64;
            let variation = product * 10 + ((i / 4) % 2) as i64;
            [category, product, variation, i as i64]
        })
        .collect();
    let f = features(&mut rng, 2 * n, d);
    let (ns, ks, ds) = (n.to_string(), k.to_string(), d.to_string());
    let shape = ["--batch", ns.as_str(), "--columns", ks.as_str(), "--dim", ds.as_str()];

    let cases: [(&str, &[&str], LossOptions); 4] = [
        ("hmce.onnx", &["--loss", "hmce"], LossOptions::default()),
        (
            "hce.onnx",
            &["--loss", "hce", "--dedup", "none", "--temperature", "0.2"],
            LossOptions { kind: LossKind::Hce, dedup: Dedup::None, temperature: 0.2, ..LossOptions::default() },
        ),
        (
            "supcon.onnx",
            &["--loss", "supcon", "--supcon-level", "1"],
            LossOptions { kind: LossKind::Supcon, supcon_level: Some(1), ..LossOptions::default() },
        ),
        ("simclr.onnx", &["--loss", "simclr"], LossOptions { kind: LossKind::Simclr, ..LossOptions::default() }),
    ];
    for (file, flags, opts) in cases {
        let args: Vec<&str> = shape.iter().chain(flags).copied().collect();
        let model = export(dir.path(), file, &args);
        let out = run_python(dir.path(), &model, &f, &labels, n, k, d);
        assert_eq!(out["inputs"], serde_json::json!(["features", "labels"]), "{file}");
        assert_eq!(out["outputs"], serde_json::json!(["loss", "features_grad"]), "{file}");
        assert_eq!(out["graph_inputs"], serde_json::json!(["features", "labels"]), "{file}");
        assert_eq!(out["loss_shape"], serde_json::json!([]), "{file}");
        assert_eq!(out["grad_shape"], serde_json::json!([2 * n, d]), "{file}");
        let expect = loss_and_grad(&f, &labels, n, d, k, &opts).unwrap();
        assert_close(&format!("{file}: loss"), &[out["loss"].as_f64().unwrap()], &[expect.total]);
        assert_close(&format!("{file}: features_grad"), &floats(&out["features_grad"]), &expect.grad);
    }

    // ce: the classifier is baked in as initializers of two extra inputs (ce_init's values).
    let c = 3;
    let ce_labels: Vec<i64> = (0..n * k).map(|i| ((i * 7) % c) as i64).collect();
    let model = export(dir.path(), "ce.onnx", &[&shape[..], &["--loss", "ce", "--classes", "3"]].concat());
    let out = run_python(dir.path(), &model, &f, &ce_labels, n, k, d);
    // onnxruntime lists inputs that have an initializer as overridable initializers.
    assert_eq!(out["inputs"], serde_json::json!(["features", "labels"]));
    assert_eq!(out["overridable"], serde_json::json!(["loss.ce.weight", "loss.ce.bias"]));
    assert_eq!(out["graph_inputs"], serde_json::json!(["features", "labels", "loss.ce.weight", "loss.ce.bias"]));
    let (w, b) = hiercon::loss::graph::ce_init(d, c);
    let w_cd: Vec<f64> = (0..c * d).map(|i| w[(i % d) * c + i / d] as f64).collect();
    let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    let targets: Vec<i64> = (0..n).map(|i| ce_labels[i * k + k - 3]).collect(); // ce_level = K-2 columns
    let expect = ce_loss_and_grad(&f, &w_cd, &b, &targets, n, d, c).unwrap();
    assert_close("ce: loss", &[out["loss"].as_f64().unwrap()], &[expect.loss]);
    assert_close("ce: features_grad", &floats(&out["features_grad"]), &expect.grad_features);
}

#[test]
fn export_loss_rejects_bad_arguments_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.onnx");
    for (args, expected) in [
        (vec!["--batch", "4", "--columns", "1", "--dim", "3"], "needs K >= 2 label columns"),
        (vec!["--batch", "0", "--columns", "3", "--dim", "3"], "the batch is empty"),
        (vec!["--batch", "4", "--columns", "3", "--dim", "3", "--loss", "ce"], "needs the number of classes"),
    ] {
        let result = Command::new(env!("CARGO_BIN_EXE_hiercon"))
            .arg("export-loss")
            .args(&args)
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success() && stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!out.exists(), "{args:?} wrote a file");
    }
}
