use std::sync::Arc;

use prost::Message;
use rand::Rng;

use super::*;
use crate::graph::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TypeProto, ValueInfoProto,
    attribute_proto::AttributeType, tensor_shape_proto::Dimension, tensor_shape_proto::dimension, type_proto,
};
use crate::graph::testutil::{rng, uniform};
use crate::graph::{Carried, GradOptions, Optimizer, Runner, Sgd};
use crate::model::step::tests::{batch, test_loss};
use crate::model::{ARCHS, Arch, ModelConfig, export, inference_graph, step_graph};

/// A model state with BatchNorm statistics moved off 0 / 1, so that round trips test them.
fn perturbed_state(cfg: &ModelConfig, seed: u64) -> BTreeMap<String, Tensor> {
    let g = inference_graph(cfg, 1).unwrap();
    let mut r = rng(seed);
    g.inputs()
        .iter()
        .filter(|i| i.kind != InputKind::Data)
        .map(|i| {
            let name = g.name(i.value).to_string();
            let t = i.init.clone().unwrap();
            let t = if name.ends_with("running_var") {
                let n = t.shape().iter().product::<usize>();
                Tensor::f32(t.shape(), (0..n).map(|_| r.random_range(0.5f32..1.5)).collect()).unwrap()
            } else if name.ends_with("running_mean") || name.ends_with(".bias") {
                let n = t.shape().iter().product::<usize>();
                Tensor::f32(t.shape(), (0..n).map(|_| r.random_range(-0.2f32..0.2)).collect()).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect()
}

use std::collections::BTreeMap;

fn run_forward(g: &Graph, state: Option<&BTreeMap<String, Tensor>>, images: &Tensor, out: &str) -> Vec<f32> {
    let mut run = Runner::cpu(g).unwrap();
    let mut feeds: Vec<(&str, &Tensor)> = vec![("images", images)];
    if let Some(s) = state {
        feeds.extend(s.iter().filter(|(n, _)| g.find(n).is_some()).map(|(n, t)| (n.as_str(), t)));
    }
    run.run(&feeds).unwrap().f32(out).unwrap().iter().copied().collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn every_native_arch_round_trips_through_export_and_import() {
    // Each architecture hiercon defines, with its head and moved BatchNorm statistics, is
    // exported to model.onnx, imported with the graph output as the feature, and run again: the
    // embeddings agree with the native inference graph to 1e-5 (the import's own L2
    // normalisation of unit rows changes them by rounding only).
    let dir = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let cfg = ModelConfig { embed_dim: 16, ..ModelConfig::new(arch, 32, 5) };
        let state = perturbed_state(&cfg, 9);
        let path = dir.path().join(format!("{arch}.onnx"));
        export(&cfg, &state, &path, Default::default()).unwrap();
        let o = ImportOptions { cut: Some(CUT_OUTPUT.into()), size: None, bgr: false };
        let m = Arc::new(Imported::load(&path, &o).unwrap());
        assert_eq!((m.size, m.feature_dim, m.layout), (32, 16, Layout::Nchw), "{arch}");
        let (mean, std) = arch.normalization();
        let icfg = ModelConfig::imported(m, mean, std, 0).without_head();
        let images = uniform(&mut rng(3), DType::F32, &[3, 3, 32, 32]);
        let native = run_forward(&inference_graph(&cfg, 3).unwrap(), Some(&state), &images, "embeddings");
        let imported = run_forward(&inference_graph(&icfg, 3).unwrap(), None, &images, "embeddings");
        let d = max_diff(&native, &imported);
        assert!(d <= 1e-5, "{arch}: max |diff| {d}");
        // Exported again from the imported graph, the model still has a dynamic batch.
        let again = dir.path().join(format!("{arch}-again.onnx"));
        let st: BTreeMap<String, Tensor> = icfg.imported.as_ref().unwrap().weights();
        export(&icfg, &st, &again, Default::default()).unwrap();
        let enc = crate::encoder::OrtEncoder::load(&again, &Default::default()).unwrap();
        use crate::encoder::Encoder;
        let rows = enc.embed(images.as_f32().unwrap().view().into_dimensionality().unwrap()).unwrap();
        let d = max_diff(&native, rows.as_slice().unwrap());
        assert!(d <= 1e-5, "{arch} re-exported: max |diff| {d}");
    }
}

/// The value the native head reads: input 0 of the Gemm that consumes `head.fc1.weight`.
fn head_input(path: &std::path::Path) -> String {
    let f = OnnxFile::read(path).unwrap();
    let n = f.nodes.iter().find(|n| n.inputs.iter().any(|i| i == "head.fc1.weight")).unwrap();
    n.inputs[0].clone()
}

#[test]
fn the_imported_step_graph_takes_the_native_training_steps() {
    // The native step graph and the one built from the exported model (cut before the head,
    // the same seeded head, the same frozen units) take three SGD steps on the same batches:
    // equal losses to 1e-4 at every step, and equal parameters after them.
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (ModelConfig { embed_dim: 8, ..ModelConfig::new(Arch::ResnetMini, 16, 3) }, 0, 0),
        (ModelConfig { embed_dim: 8, freeze: 1, ..ModelConfig::new(Arch::EfficientnetLite0, 32, 4) }, 1, 1),
    ];
    for (cfg, freeze_layers, seed) in cases {
        let state = perturbed_state(&cfg, 11 + seed);
        let path = dir.path().join(format!("{}.onnx", cfg.arch));
        export(&cfg, &state, &path, Default::default()).unwrap();
        let o = ImportOptions { cut: Some(head_input(&path)), size: None, bgr: false };
        let m = Arc::new(Imported::load(&path, &o).unwrap());
        assert_eq!(m.feature_dim, cfg.arch.feature_dim());
        let (mean, std) = cfg.arch.normalization();
        let icfg = ModelConfig {
            embed_dim: cfg.embed_dim,
            freeze: freeze_layers,
            ..ModelConfig::imported(m, mean, std, cfg.seed)
        };
        let opt = Optimizer::Sgd(Sgd { momentum: 0.9, weight_decay: 1e-4, nesterov: false });
        // Depthwise convolutions as Conv nodes on both sides: the replay sees TF-SAME's Pad as a
        // node of its own, so its maps are bigger and the dense lowering (tested against the Conv
        // form in model::step) would be chosen for other layers than the native build's; three
        // steps of this tiny batch amplify the float rounding of that difference past 1e-4.
        let grad = GradOptions { depthwise: crate::graph::DepthwiseLowering::Conv, ..GradOptions::default() };
        // The native run starts from the same state the file holds.
        let native = step_graph(&cfg, Some(&state), 4, 2, &opt, &grad, test_loss).unwrap();
        let imported = step_graph(&icfg, None, 4, 2, &opt, &grad, test_loss).unwrap();
        let mut a = (Runner::cpu(&native.graph).unwrap(), Carried::new(&native.graph).unwrap());
        let mut b = (Runner::cpu(&imported.graph).unwrap(), Carried::new(&imported.graph).unwrap());
        assert_eq!(native.graph.params().len(), imported.graph.params().len(), "{}", cfg.arch);
        let lr = Tensor::F32(ndarray::arr0(0.05f32).into_dyn());
        for step in 0..3 {
            let (images, labels) = batch(&cfg, 4, 2, 40 + step);
            let mut losses = Vec::new();
            for (run, carried) in [&mut a, &mut b] {
                let mut feeds = vec![("images", &images), ("labels", &labels), ("lr", &lr)];
                feeds.extend(carried.feeds());
                let out = run.run(&feeds).unwrap();
                losses.push(out.get("loss").unwrap().to_f64_vec()[0]);
                carried.update(&out).unwrap();
            }
            assert!(
                (losses[0] - losses[1]).abs() <= 1e-4 * (1.0 + losses[0].abs()),
                "{} step {step}: {losses:?}",
                cfg.arch
            );
        }
        for name in ["head.fc1.weight", "head.fc2.bias"] {
            let (x, y) = (a.1.get(name).unwrap().to_f64_vec(), b.1.get(name).unwrap().to_f64_vec());
            let d = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
            assert!(d < 1e-4, "{} {name}: {d}", cfg.arch);
        }
    }
}

// --- hand-built models ------------------------------------------------------------------------

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}
fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}
fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}
fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}
fn n(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("{op}:{output}")),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}
fn info(name: &str, elem: i32, dims: &[i64]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| Dimension {
            value: Some(if d < 0 { dimension::Value::DimParam("N".into()) } else { dimension::Value::DimValue(d) }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem),
                shape: Some(crate::graph::proto::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
fn init(name: &str, t: &Tensor) -> TensorProto {
    crate::graph::onnx::tensor_proto(Some(name.into()), t)
}
fn model(opset: i64, nodes: Vec<NodeProto>, inits: Vec<TensorProto>, input: ValueInfoProto, out: &str) -> Vec<u8> {
    ModelProto {
        ir_version: Some(7),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        graph: Some(GraphProto {
            node: nodes,
            initializer: inits,
            input: vec![input],
            output: vec![info(out, 1, &[])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// An NHWC, opset-14 model that uses most of what the importer supports: SAME_UPPER strided
/// Conv, BatchNormalization, HardSwish, MaxPool with asymmetric padding, AveragePool without
/// count_include_pad, a grouped Conv with bias, LeakyRelu, HardSigmoid gating, Clip with input
/// bounds, Pad, ReduceMean, the Shape → Gather → Unsqueeze → Concat → Reshape chain of a
/// flatten, Gemm, Softmax.
fn zoo_model(dir: &std::path::Path) -> std::path::PathBuf {
    let mut r = rng(21);
    let t = |r: &mut rand_chacha::ChaCha8Rng, s: &[usize]| uniform(r, DType::F32, s);
    let pos = |r: &mut rand_chacha::ChaCha8Rng, s: &[usize]| {
        let n = s.iter().product::<usize>();
        Tensor::f32(s, (0..n).map(|_| r.random_range(0.5f32..1.5)).collect()).unwrap()
    };
    let i64s = |v: &[i64]| Tensor::i64(&[v.len()], v.to_vec()).unwrap();
    let scalar = |v: f32| Tensor::f32(&[], vec![v]).unwrap();
    let inits = vec![
        init("w1", &t(&mut r, &[8, 3, 3, 3])),
        init("bn.s", &pos(&mut r, &[8])),
        init("bn.b", &t(&mut r, &[8])),
        init("bn.m", &t(&mut r, &[8])),
        init("bn.v", &pos(&mut r, &[8])),
        init("w2", &t(&mut r, &[8, 1, 3, 3])),
        init("b2", &t(&mut r, &[8])),
        init("lo", &scalar(-0.5)),
        init("hi", &scalar(0.75)),
        init("pads", &i64s(&[0, 0, 1, 0, 0, 0, 0, 1])),
        init("zero", &i64s(&[0])),
        init("minus1", &i64s(&[-1])),
        init("fc.w", &t(&mut r, &[5, 8])),
        init("fc.b", &t(&mut r, &[5])),
        init("ax23", &i64s(&[2, 3])),
    ];
    let nodes = vec![
        n("Transpose", &["x"], "t", vec![ints("perm", &[0, 3, 1, 2])]),
        n("Conv", &["t", "w1"], "c1", vec![string("auto_pad", "SAME_UPPER"), ints("strides", &[2, 2])]),
        n("BatchNormalization", &["c1", "bn.s", "bn.b", "bn.m", "bn.v"], "bn", vec![float("epsilon", 1e-3)]),
        n("HardSwish", &["bn"], "hs", vec![]),
        n(
            "MaxPool",
            &["hs"],
            "mp",
            vec![ints("kernel_shape", &[2, 2]), ints("pads", &[0, 0, 1, 1]), ints("strides", &[1, 1])],
        ),
        n("AveragePool", &["mp"], "ap", vec![ints("kernel_shape", &[3, 3]), ints("pads", &[1, 1, 1, 1])]),
        n("Conv", &["ap", "w2", "b2"], "c2", vec![int("group", 8), ints("pads", &[1, 1, 1, 1])]),
        n("LeakyRelu", &["c2"], "lr", vec![float("alpha", 0.1)]),
        n("HardSigmoid", &["lr"], "gate", vec![float("alpha", 0.3)]),
        n("Mul", &["lr", "gate"], "gated", vec![]),
        n("Clip", &["gated", "lo", "hi"], "cl", vec![]),
        n("Pad", &["cl", "pads"], "pd", vec![]),
        n("ReduceMean", &["pd"], "gap", vec![ints("axes", &[2, 3]), int("keepdims", 1)]),
        n("Shape", &["gap"], "shape", vec![]),
        n("Gather", &["shape", "zero"], "batch", vec![int("axis", 0)]),
        n("Concat", &["batch", "minus1"], "target", vec![int("axis", 0)]),
        n("Reshape", &["gap", "target"], "feat", vec![]),
        n("Gemm", &["feat", "fc.w", "fc.b"], "logits", vec![int("transB", 1)]),
        n("Softmax", &["logits"], "probs", vec![int("axis", 1)]),
    ];
    let bytes = model(14, nodes, inits, info("x", 1, &[-1, 12, 12, 3]), "probs");
    let path = dir.join("zoo.onnx");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_model_of_many_ops_matches_onnx_runtime_on_the_file() {
    // The replayed graph (inference form) against ONNX Runtime running the file's own nodes, at
    // the classifier's input (found automatically) and at the softmax output; then the same file
    // fine-tuned: the step graph builds, BatchNorm is in training form and the Reshape keeps the
    // batch symbolic in the exported model (batch 1 and 3 both run).
    let dir = tempfile::tempdir().unwrap();
    let path = zoo_model(dir.path());
    let m = Imported::load(&path, &ImportOptions::default()).unwrap();
    assert_eq!((m.layout, m.size, m.cut.as_str(), m.feature_dim), (Layout::Nhwc, 12, "feat", 8));
    assert!(m.cut_reason.contains("Gemm"), "{}", m.cut_reason);
    assert_eq!(m.units.len(), 2, "the two Convs before the cut");
    let (d, rms) = m.check_against_ort(3).unwrap();
    assert!(d <= 1e-5 * rms.max(1.0), "feature: {d} (rms {rms})");
    let whole = Imported::load(&path, &ImportOptions { cut: Some(CUT_OUTPUT.into()), ..Default::default() }).unwrap();
    let (d, _) = whole.check_against_ort(2).unwrap();
    assert!(d <= 1e-6, "softmax output: {d}");

    let cfg = ModelConfig { embed_dim: 4, ..ModelConfig::imported(Arc::new(m), [0.5; 3], [0.25; 3], 1) };
    let sg = step_graph(&cfg, None, 3, 2, &Optimizer::Sgd(Sgd::default()), &GradOptions::default(), test_loss).unwrap();
    let params: Vec<&str> = sg.graph.params().iter().map(|&p| sg.graph.name(p)).collect();
    for p in ["w1", "bn.s", "bn.b", "w2", "b2", "head.fc1.weight"] {
        assert!(params.contains(&p), "{p} not in {params:?}");
    }
    assert!(!params.contains(&"fc.w"), "the classifier is cut off");
    assert!(sg.graph.find("bn.m.next").is_some(), "BatchNorm statistics are fed back");
    let out = dir.path().join("zoo-ft.onnx");
    let state = sg.initial_state();
    export(&cfg, &state, &out, Default::default()).unwrap();
    let enc = crate::encoder::OrtEncoder::load(&out, &Default::default()).unwrap();
    use crate::encoder::Encoder;
    for b in [1, 3] {
        let x = uniform(&mut rng(b as u64), DType::F32, &[b, 3, 12, 12]);
        let e = enc.embed(x.as_f32().unwrap().view().into_dimensionality().unwrap()).unwrap();
        assert_eq!(e.shape(), [b, 4]);
    }
}

#[test]
fn gradients_through_imported_ops_match_finite_differences() {
    // The step graph of the many-op model in training mode (BatchNorm on batch statistics), its
    // autodiff gradient along a random direction against the central difference of the loss, for
    // the parameters before and after the composed ops (HardSwish, asymmetric -inf MaxPool
    // padding, AveragePool as a constant depthwise conv with counts, LeakyRelu, HardSigmoid,
    // Clip, Pad, ReduceMean, the folded Reshape).
    let dir = tempfile::tempdir().unwrap();
    check_gradients(&zoo_model(dir.path()), &["w1", "bn.s", "bn.b", "w2", "b2"]);
}

/// The step graph of an imported file in training mode: for each named parameter, the autodiff
/// gradient along a random direction against the central difference of the loss. f32 in ONNX
/// Runtime: as in the native step check, |ad − fd| <= 3e-2 · max(|ad|, |fd|) + 1e-3.
fn check_gradients(path: &std::path::Path, names: &[&str]) {
    let m = Arc::new(Imported::load(path, &ImportOptions::default()).unwrap());
    let cfg = ModelConfig { embed_dim: 4, ..ModelConfig::imported(m, [0.5; 3], [0.25; 3], 1) };
    let opt = Optimizer::Sgd(Sgd { momentum: 0.0, weight_decay: 0.0, nesterov: false });
    let mut sg = step_graph(&cfg, None, 4, 2, &opt, &GradOptions::default(), test_loss).unwrap();
    let params = sg.graph.params();
    for (p, gr) in params.iter().zip(sg.train.grads.clone()) {
        let name = format!("grad.{}", sg.graph.name(*p));
        sg.graph.output(&name, gr).unwrap();
    }
    let mut run = Runner::cpu(&sg.graph).unwrap();
    let (images, labels) = batch(&cfg, 4, 2, 6);
    let lr = Tensor::F32(ndarray::arr0(0.0f32).into_dyn());
    let base: Vec<(&str, &Tensor)> = vec![("images", &images), ("labels", &labels), ("lr", &lr)];
    let out = run.run(&base).unwrap();
    let state = sg.initial_state();
    let mut r = rng(12);
    for &name in names {
        let p0 = state[name].to_f64_vec();
        let rms = (p0.iter().map(|x| x * x).sum::<f64>() / p0.len() as f64).sqrt().max(0.1);
        let eps = 1e-3 * rms;
        let v: Vec<f64> = (0..p0.len()).map(|_| r.random_range(-1.0..1.0)).collect();
        let grad = out.get(&format!("grad.{name}")).unwrap().to_f64_vec();
        let ad: f64 = grad.iter().zip(&v).map(|(a, b)| a * b).sum();
        let mut at = |sign: f64| {
            let moved: Vec<f32> = p0.iter().zip(&v).map(|(x, d)| (x + sign * eps * d) as f32).collect();
            let t = Tensor::f32(state[name].shape(), moved).unwrap();
            let mut feeds = base.clone();
            feeds.push((name, &t));
            run.run(&feeds).unwrap().get("loss").unwrap().to_f64_vec()[0]
        };
        let fd = (at(1.0) - at(-1.0)) / (2.0 * eps);
        assert!(ad.abs() > 1e-6, "{name}: no gradient reaches it");
        assert!(
            (ad - fd).abs() <= 3e-2 * ad.abs().max(fd.abs()) + 1e-3,
            "{name}: autodiff {ad} vs finite difference {fd}"
        );
    }
}

/// The Slice patterns of TensorFlow-style exports, on an NHWC opset-13 model: the channel flip
/// `x[..., ::-1]` (negative step, `end = INT64_MIN`) on the input and on a trained activation,
/// space-to-depth as strided 2-D slices (`x[:, :, ::2, ::2]`, `x[:, :, 1::2, 1::2]`, negative
/// axes) joined by Concat, a stride with a negative start, and constants sliced on two axes
/// (one with a negative step) that import folds before they reach the graph.
fn tf_slice_model(dir: &std::path::Path) -> std::path::PathBuf {
    let mut r = rng(33);
    let i64s = |v: &[i64]| Tensor::i64(&[v.len()], v.to_vec()).unwrap();
    let (min, max) = (i64::MIN, i64::MAX);
    let inits = vec![
        init("w1", &uniform(&mut r, DType::F32, &[8, 3, 3, 3])),
        init("w2", &uniform(&mut r, DType::F32, &[8, 24, 1, 1])),
        init("table", &uniform(&mut r, DType::F32, &[3, 16])),
        init("fc.w", &uniform(&mut r, DType::F32, &[5, 8])),
        init("fc.b", &uniform(&mut r, DType::F32, &[5])),
        init("flip.s", &i64s(&[-1])),
        init("flip.e", &i64s(&[min])),
        init("flip.step", &i64s(&[-1])),
        init("ax3", &i64s(&[3])),
        init("ax1", &i64s(&[1])),
        init("s2d.e", &i64s(&[max, max])),
        init("s2d.s00", &i64s(&[0, 0])),
        init("s2d.s11", &i64s(&[1, 1])),
        init("s2d.s01", &i64s(&[0, 1])),
        init("s2d.ax", &i64s(&[2, 3])),
        init("s2d.axneg", &i64s(&[-2, -1])),
        init("two2", &i64s(&[2, 2])),
        init("row.s", &i64s(&[1, 0])),
        init("row.e", &i64s(&[2, 16])),
        init("row.ax", &i64s(&[0, 1])),
        init("row.step", &i64s(&[1, 2])),
        init("rev.s", &i64s(&[0, -1])),
        init("rev.e", &i64s(&[1, min])),
        init("rev.step", &i64s(&[1, -1])),
        init("bias.shape", &i64s(&[1, 8, 1, 1])),
        init("odd.s", &i64s(&[-5])),
        init("odd.e", &i64s(&[6])),
        init("odd.step", &i64s(&[2])),
    ];
    let nodes = vec![
        n("Slice", &["x", "flip.s", "flip.e", "ax3", "flip.step"], "rgb", vec![]),
        n("Transpose", &["rgb"], "t", vec![ints("perm", &[0, 3, 1, 2])]),
        n("Conv", &["t", "w1"], "c1", vec![ints("pads", &[1, 1, 1, 1])]),
        n("Relu", &["c1"], "r1", vec![]),
        n("Slice", &["r1", "s2d.s00", "s2d.e", "s2d.ax", "two2"], "s00", vec![]),
        n("Slice", &["r1", "s2d.s11", "s2d.e", "s2d.ax", "two2"], "s11", vec![]),
        n("Slice", &["r1", "s2d.s01", "s2d.e", "s2d.axneg", "two2"], "s01", vec![]),
        n("Concat", &["s00", "s11", "s01"], "s2d", vec![int("axis", 1)]),
        n("Conv", &["s2d", "w2"], "c2", vec![]),
        n("Slice", &["table", "row.s", "row.e", "row.ax", "row.step"], "row", vec![]),
        n("Slice", &["row", "rev.s", "rev.e", "row.ax", "rev.step"], "rev", vec![]),
        n("Reshape", &["rev", "bias.shape"], "bias", vec![]),
        n("Add", &["c2", "bias"], "c2b", vec![]),
        n("Slice", &["c2b", "flip.s", "flip.e", "ax1", "flip.step"], "flip", vec![]),
        n("Slice", &["flip", "odd.s", "odd.e", "ax3", "odd.step"], "odd", vec![]),
        n("Relu", &["odd"], "r2", vec![]),
        n("ReduceMean", &["r2"], "gap", vec![ints("axes", &[2, 3]), int("keepdims", 1)]),
        n("Flatten", &["gap"], "feat", vec![int("axis", 1)]),
        n("Gemm", &["feat", "fc.w", "fc.b"], "logits", vec![int("transB", 1)]),
    ];
    let bytes = model(13, nodes, inits, info("x", 1, &[-1, 12, 12, 3]), "logits");
    let path = dir.join("tf-slices.onnx");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn tensorflow_style_slices_import_match_onnx_runtime_and_train() {
    let dir = tempfile::tempdir().unwrap();
    let path = tf_slice_model(dir.path());
    let m = Imported::load(&path, &ImportOptions::default()).unwrap();
    assert_eq!((m.layout, m.size, m.cut.as_str(), m.feature_dim), (Layout::Nhwc, 12, "feat", 8));
    let (d, rms) = m.check_against_ort(3).unwrap();
    assert!(rms > 1e-3 && d <= 1e-5 * rms.max(1.0), "feature: {d} (rms {rms})");
    // The trained weights before the space-to-depth slices and the channel flip get gradients
    // through them (Slice's and Gather's rules).
    check_gradients(&path, &["w1", "w2"]);
}

#[test]
fn slice_indices_follow_onnx_semantics() {
    let (min, max) = (i64::MIN, i64::MAX);
    let cases: &[(usize, i64, i64, i64, &[usize])] = &[
        (5, 0, max, 1, &[0, 1, 2, 3, 4]),
        (5, 0, max, 2, &[0, 2, 4]),
        (5, 1, max, 2, &[1, 3]),
        (5, -1, min, -1, &[4, 3, 2, 1, 0]),
        (5, max, min, -2, &[4, 2, 0]),
        (5, -2, -5, -1, &[3, 2, 1]),
        (5, -5, 6, 2, &[0, 2, 4]),
        (5, 3, 1, 1, &[]),
        (5, 1, 3, -1, &[]),
        (5, 0, 5, max, &[0]),
        (0, -1, min, -1, &[]),
    ];
    for &(d, s, e, st, want) in cases {
        assert_eq!(slice_indices(d, s, e, st).unwrap(), want, "d {d}, start {s}, end {e}, step {st}");
    }
    assert!(slice_indices(5, 0, 5, 0).unwrap_err().contains("step of 0"));
}

#[test]
fn unsupported_models_are_errors_that_name_the_node_and_op() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: Vec<u8>| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let w = init("w", &uniform(&mut rng(1), DType::F32, &[4, 3, 1, 1]));
    let x = || info("x", 1, &[-1, 3, 8, 8]);
    let err = |p: &std::path::Path, cut: &str| {
        Imported::load(p, &ImportOptions { cut: Some(cut.into()), ..Default::default() }).unwrap_err().to_string()
    };
    // An op hiercon does not know.
    let p = write(
        "lrn.onnx",
        model(
            13,
            vec![n("Conv", &["x", "w"], "c", vec![]), n("LRN", &["c"], "y", vec![int("size", 3)])],
            vec![w.clone()],
            x(),
            "y",
        ),
    );
    let e = err(&p, "y");
    assert!(e.contains("node `LRN:y` (LRN)") && e.contains("not supported") && e.contains("Conv"), "{e}");
    // A reshape target computed from the data.
    let p = write(
        "dyn.onnx",
        model(
            13,
            vec![
                n("Conv", &["x", "w"], "c", vec![]),
                n("ReduceMax", &["c"], "m", vec![int("keepdims", 0)]),
                n("Cast", &["m"], "mi", vec![int("to", 7)]),
                n("Unsqueeze", &["mi", "zero"], "shape", vec![]),
                n("Reshape", &["c", "shape"], "y", vec![]),
            ],
            vec![w.clone(), init("zero", &Tensor::i64(&[1], vec![0]).unwrap())],
            x(),
            "y",
        ),
    );
    let e = err(&p, "y");
    assert!(e.contains("Cast") && e.contains("not supported"), "{e}");
    // A non-float input.
    let p = write(
        "int.onnx",
        model(13, vec![n("Identity", &["x"], "y", vec![])], vec![], info("x", 7, &[-1, 3, 8, 8]), "y"),
    );
    assert!(err(&p, "y").contains("input `x` is int64"), "{}", err(&p, "y"));
    // Weights computed in the graph.
    let p = write(
        "wcalc.onnx",
        model(
            13,
            vec![
                n("Mul", &["w", "w"], "nw", vec![]),
                n("Relu", &["x"], "rx", vec![]),
                n("Conv", &["rx", "nw"], "y", vec![]),
            ],
            vec![w.clone()],
            x(),
            "y",
        ),
    );
    let e = err(&p, "y");
    assert!(e.contains("(Conv)") && e.contains("weights computed in the graph"), "{e}");
    // Unequal strides.
    let p = write(
        "stride.onnx",
        model(13, vec![n("Conv", &["x", "w"], "y", vec![ints("strides", &[1, 2])])], vec![w.clone()], x(), "y"),
    );
    assert!(err(&p, "y").contains("strides [1, 2]"), "{}", err(&p, "y"));
    // No classifier to find, and a cut that names nothing.
    let p = write("noclf.onnx", model(13, vec![n("Conv", &["x", "w"], "y", vec![])], vec![w], x(), "y"));
    let e = Imported::load(&p, &ImportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("found no classifier") && e.contains("--cut"), "{e}");
    assert!(err(&p, "nowhere").contains("neither a value nor a node"));
    // A feature that is not pooled.
    assert!(err(&p, "y").contains("[N, D] or [N, D, 1, 1]"), "{}", err(&p, "y"));
}

#[test]
fn external_data_is_followed_by_import_and_inlined_by_describe() {
    // The many-op model with its first convolution's weights in a file beside it: the import
    // reads them (and matches ONNX Runtime), `describe` writes a self-contained copy.
    let dir = tempfile::tempdir().unwrap();
    let path = zoo_model(dir.path());
    let mut proto = ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    let g = proto.graph.as_mut().unwrap();
    let w1 = g.initializer.iter_mut().find(|t| t.name.as_deref() == Some("w1")).unwrap();
    let raw = w1.raw_data.take().unwrap();
    std::fs::write(dir.path().join("w1.bin"), [vec![7u8; 16], raw.clone()].concat()).unwrap();
    let kv =
        |k: &str, v: &str| crate::graph::proto::StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) };
    w1.data_location = Some(1);
    w1.external_data = vec![kv("location", "w1.bin"), kv("offset", "16"), kv("length", &raw.len().to_string())];
    let ext = dir.path().join("zoo-ext.onnx");
    std::fs::write(&ext, proto.encode_to_vec()).unwrap();
    let m = Imported::load(&ext, &ImportOptions::default()).unwrap();
    assert_eq!(m.weights()["w1"].shape(), [8, 3, 3, 3]);
    let (d, rms) = m.check_against_ort(2).unwrap();
    assert!(d <= 1e-5 * rms.max(1.0), "{d}");
    let out = dir.path().join("served/zoo.onnx");
    let o = crate::model::describe::DescribeOptions {
        size: None,
        mean: [0.5; 3],
        std: [0.25; 3],
        output: None,
        cut: Some("feat".into()),
        normalize: true,
        bgr: false,
    };
    let meta = crate::model::describe::describe(&ext, &out, &o).unwrap();
    assert_eq!((meta.output.dim, meta.input.size), (8, 12));
    std::fs::remove_file(dir.path().join("w1.bin")).unwrap();
    let enc = crate::encoder::OrtEncoder::load(&out, &Default::default()).unwrap();
    use crate::encoder::Encoder;
    let x = uniform(&mut rng(2), DType::F32, &[2, 3, 12, 12]);
    let e = enc.embed(x.as_f32().unwrap().view().into_dimensionality().unwrap()).unwrap();
    for row in e.rows() {
        assert!((row.dot(&row) - 1.0).abs() < 1e-5);
    }
}

#[test]
fn damaged_files_are_errors_never_panics() {
    // 400 seeded mutations of the many-op model (bytes flipped, truncated): every load returns
    // Ok or an error, none panics.
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(zoo_model(dir.path())).unwrap();
    let mut r = rng(77);
    let path = dir.path().join("bad.onnx");
    let (mut ok, mut err) = (0, 0);
    for i in 0..400 {
        let mut b = bytes.clone();
        if i % 4 == 0 {
            b.truncate(r.random_range(0..b.len()));
        } else {
            for _ in 0..r.random_range(1..8) {
                let at = r.random_range(0..b.len());
                b[at] = r.random();
            }
        }
        std::fs::write(&path, &b).unwrap();
        let res = std::panic::catch_unwind(|| Imported::load(&path, &ImportOptions::default()).map(|_| ()));
        match res {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                assert!(!e.to_string().is_empty());
                err += 1
            }
            Err(_) => panic!("mutation {i} panicked"),
        }
    }
    assert!(err > 100, "most mutations are rejected ({ok} loaded, {err} refused)");
}
