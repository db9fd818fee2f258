//! int8 against float on this CPU, in one run: the shipped model quantised by `hiercon model
//! quantize` (128 train images, seed 0, the defaults) beside the float model, and beside the same
//! model quantised by ONNX Runtime's own Python quantiser on the same calibration images
//! (`bench/ort_quantize.py`, when the Python of `HIERCON_PYTHON` or `.cache/venv` has
//! onnxruntime and Pillow). Measures
//! - the encoder alone (ORT session, all cores) at batch 1 and 64: images/s, the models
//!   interleaved over rounds, median of the rounds;
//! - `hiercon index`'s embedding path end to end on the emoji catalogue (read, hash, decode,
//!   preprocess, embed; no cache): images/s, float and int8 interleaved, best of two each.
//!
//! Writes `bench/results/quantized.json`. Needs `make data` and the shipped model; without them
//! it says so and measures nothing. Accuracy is not measured here: `hiercon eval` of each model
//! is in `models/README.md`.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use hiercon::catalogue::{Manifest, Subset};
use hiercon::encoder::{Encoder, ModelMeta, OrtEncoder};
use hiercon::image::Limits;
use hiercon::index::build::{EmbeddingCache, embed_items};
use hiercon::model::quantize::{CalibrationSet, QuantizeOptions, quantize};
use hiercon::runtime::RuntimeOptions;
use ndarray::Array4;

const ROUNDS: usize = 5;
const SECONDS: f64 = 2.0;

fn python() -> PathBuf {
    match std::env::var_os("HIERCON_PYTHON").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/venv/bin/python"),
    }
}

/// The ORT Python quantiser's model of `float` on `ours`' calibration images, with a `.json`
/// (the float model's description, its own digest) so the encoder loads it; `None` when the
/// Python side is not installed.
fn ort_python_model(root: &Path, float: &Path, ours: &Path, manifest: &Path, out: &Path) -> Option<PathBuf> {
    let py = python();
    let ok = Command::new(&py)
        .args(["-c", "import onnxruntime.quantization, PIL, sympy"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "quantized: {} lacks onnxruntime, Pillow or sympy (make pyenv): no ORT Python quantiser row",
            py.display()
        );
        return None;
    }
    let st = Command::new(&py)
        .arg(root.join("bench/ort_quantize.py"))
        .arg("quantize")
        .arg(float)
        .arg(ModelMeta::path_for(ours))
        .arg(manifest)
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success(), "bench/ort_quantize.py failed");
    let mut meta = ModelMeta::read(&ModelMeta::path_for(float)).unwrap();
    meta.digest = hiercon::model::model_digest(out, &std::fs::read(out).unwrap()).unwrap();
    meta.extra.insert("quantization".into(), serde_json::json!({"by": "onnxruntime.quantization.quantize_static"}));
    meta.write(&ModelMeta::path_for(out)).unwrap();
    Some(out.to_path_buf())
}

/// Images/s of each encoder on `x`, interleaved over rounds; the median round of each.
fn throughput(encoders: &[&OrtEncoder], x: &Array4<f32>) -> Vec<(f64, Vec<f64>)> {
    for e in encoders {
        e.embed(x.view()).unwrap();
    }
    let mut rates = vec![Vec::new(); encoders.len()];
    for _ in 0..ROUNDS {
        for (i, e) in encoders.iter().enumerate() {
            let t = Instant::now();
            let mut n = 0;
            while t.elapsed().as_secs_f64() < SECONDS {
                black_box(e.embed(x.view()).unwrap());
                n += x.shape()[0];
            }
            rates[i].push(n as f64 / t.elapsed().as_secs_f64());
        }
    }
    rates
        .into_iter()
        .map(|mut r| {
            let raw = r.clone();
            r.sort_by(f64::total_cmp);
            (r[r.len() / 2], raw)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let data = std::env::var_os("HIERCON_TEST_DATA").map_or(root.join("data"), PathBuf::from);
    let manifest_path = data.join("emoji/manifest.jsonl");
    let float_path = root.join("models/emoji-lite0-hmce.onnx");
    if !manifest_path.is_file() || !float_path.is_file() {
        eprintln!("quantized: {} or {} missing (make data); skipped", manifest_path.display(), float_path.display());
        return;
    }
    hiercon::runtime::init().unwrap();
    let dir = root.join("target/bench-quantized");
    std::fs::create_dir_all(&dir).unwrap();
    let ours_path = dir.join("int8.onnx");
    let set = CalibrationSet::sample(&manifest_path, Subset::Train, 128, 64, 0).unwrap();
    let t = Instant::now();
    let (_, report) = quantize(&float_path, &ours_path, &set, &QuantizeOptions::default()).unwrap();
    let quantize_s = t.elapsed().as_secs_f64();
    let ort_path = ort_python_model(&root, &float_path, &ours_path, &manifest_path, &dir.join("ort-int8.onnx"));

    let opts = RuntimeOptions::default();
    let float = OrtEncoder::load(&float_path, &opts).unwrap();
    let ours = OrtEncoder::load(&ours_path, &opts).unwrap();
    let theirs = ort_path.as_ref().map(|p| OrtEncoder::load(p, &opts).unwrap());
    let mut encoders = vec![&float, &ours];
    let mut names = vec!["float", "hiercon-int8"];
    if let Some(t) = &theirs {
        encoders.push(t);
        names.push("ort-python-int8");
    }
    let size = float.preprocess().size as usize;
    let mut encoder_alone = serde_json::Map::new();
    for batch in [1usize, 64] {
        let x = Array4::from_shape_fn((batch, 3, size, size), |(b, ch, y, x)| {
            ((b * 31 + ch * 17 + y * 7 + x * 3) % 29) as f32 / 14.0 - 1.0
        });
        let rates = throughput(&encoders, &x);
        let mut row = serde_json::Map::new();
        for (name, (median, raw)) in names.iter().zip(&rates) {
            row.insert(name.to_string(), serde_json::json!({"images_per_s": median, "rounds": raw}));
        }
        row.insert("int8_over_float".into(), serde_json::json!(rates[1].0 / rates[0].0));
        if rates.len() > 2 {
            row.insert("hiercon_over_ort_python".into(), serde_json::json!(rates[1].0 / rates[2].0));
        }
        encoder_alone.insert(format!("batch{batch}"), serde_json::Value::Object(row));
    }

    // `hiercon index`'s embedding path, end to end, no cache.
    let manifest = Manifest::read(&manifest_path).unwrap();
    let mut end_to_end: Vec<(f64, usize)> = vec![(0.0, 0); 2];
    for _ in 0..2 {
        for (i, e) in [&float, &ours].into_iter().enumerate() {
            let t = Instant::now();
            let (_, _, stats) =
                embed_items(&manifest.items, &manifest.dir, e, &EmbeddingCache::empty(), 64, &Limits::default())
                    .unwrap();
            let rate = stats.embedded as f64 / t.elapsed().as_secs_f64();
            if rate > end_to_end[i].0 {
                end_to_end[i] = (rate, stats.embedded);
            }
        }
    }
    let summary = serde_json::json!({
        "bench": "quantized",
        "float_model": "models/emoji-lite0-hmce.onnx",
        "quantize": {
            "seconds": quantize_s, "calibration_images": set.calibration.len(), "method": "minmax",
            "quantized_nodes": report.quantized_nodes, "folded_batchnorms": report.folded_batchnorms,
            "check_cosine_mean": report.cosine_mean, "check_cosine_min": report.cosine_min,
        },
        "ort_python_row": theirs.is_some(),
        "encoder_alone": encoder_alone,
        "index_emoji_end_to_end": {
            "images": end_to_end[0].1,
            "float_images_per_s": end_to_end[0].0,
            "int8_images_per_s": end_to_end[1].0,
            "int8_over_float": end_to_end[1].0 / end_to_end[0].0,
        },
        "threads": "ORT default (one per core)",
        "machine": hiercon::runtime::machine_description(),
    });
    let text = serde_json::to_string_pretty(&summary).unwrap();
    eprintln!("{text}");
    std::fs::create_dir_all(root.join("bench/results")).unwrap();
    std::fs::write(root.join("bench/results/quantized.json"), text + "\n").unwrap();

    let one = Array4::from_elem((1, 3, size, size), 0.25f32);
    c.bench_function("encoder_float_batch1", |b| b.iter(|| black_box(float.embed(one.view()).unwrap())));
    c.bench_function("encoder_int8_batch1", |b| b.iter(|| black_box(ours.embed(one.view()).unwrap())));
}

criterion_group!(benches, bench);
criterion_main!(benches);
