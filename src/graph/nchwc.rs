//! Opt-in CPU lowering of dense convolutions onto ONNX Runtime's blocked NCHWc kernels (the
//! `com.microsoft.nchwc` ops of its stock CPU library), applied when a graph is written with
//! [`super::WriteOptions::nchwc_block`].
//!
//! ORT's own NCHWc transformer only rewrites convolutions whose weights are constants, so every
//! Conv of a training step runs on the plain NCHW im2col path. This lowering writes an eligible
//! Conv (weights a graph value, one group, no dilation, both channel counts multiples of the
//! block) as `ReorderInput` → `nchwc.Conv` → `ReorderOutput`, its weights reordered in the graph
//! from OIHW to `OIHW{b}i{b}o` by Reshape + Transpose. Measured on the resnet-mini step: 1.35-1.7x
//! per convolution and 8-15% per step (`bench/nchwc_conv_probe.py`).
//!
//! The result is not standard ONNX (DESIGN §1 asks for standard ops), hence off by default:
//! [`super::GradOptions::cpu_nchwc`] turns it on for CPU training sessions. The block size must
//! be MLAS's (16 with AVX-512, 8 with AVX2); [`block_size`] finds it by running a probe
//! convolution both ways and comparing, and is `None` where the ops are missing or disagree.

use std::sync::OnceLock;

use super::ir::{Attr, Graph, Node};
use super::proto::{NodeProto, TensorProto};

/// The ONNX domain of ORT's NCHWc ops.
pub const DOMAIN: &str = "com.microsoft.nchwc";

/// Whether `n` can be written on NCHWc kernels with block `b`.
pub(crate) fn eligible(g: &Graph, n: &Node, b: usize) -> bool {
    if n.op != "Conv" || g.const_value(n.inputs[1]).is_some() || n.attr("auto_pad").is_some() {
        return false;
    }
    let ws = g.shape(n.inputs[1]);
    ws.len() == 4
        && n.attr_int("group", 1) == 1
        && n.attr_ints("dilations", &[1, 1]).iter().all(|&d| d == 1)
        && ws[0].is_multiple_of(b)
        && ws[1].is_multiple_of(b)
}

/// The nodes and shape constants that compute `n` (an [`eligible`] Conv, node index `i`) on
/// NCHWc kernels with block `b`.
pub(crate) fn lower(g: &Graph, n: &Node, i: usize, b: usize) -> (Vec<NodeProto>, Vec<TensorProto>) {
    let name = |v| g.name(v).to_string();
    let ws = g.shape(n.inputs[1]).to_vec();
    let (m, c, kh, kw) = (ws[0], ws[1], ws[2], ws[3]);
    let tag = format!("nchwc.{i}");
    let shape_const = |suffix: &str, dims: &[usize]| TensorProto {
        name: Some(format!("{tag}.{suffix}")),
        dims: vec![dims.len() as i64],
        data_type: Some(super::DType::I64.onnx()),
        int64_data: dims.iter().map(|&d| d as i64).collect(),
        ..Default::default()
    };
    let consts = vec![shape_const("s6", &[m / b, b, c / b, b, kh, kw]), shape_const("s4", &ws)];
    let node = |op: &str, domain: &str, inputs: Vec<String>, output: String, attrs: Vec<(&str, Attr)>| NodeProto {
        name: Some(format!("{output}.{op}")),
        input: inputs,
        output: vec![output],
        op_type: Some(op.to_string()),
        domain: Some(domain.to_string()),
        attribute: attrs.iter().map(|(k, a)| super::onnx::attribute(k, a)).collect(),
        ..Default::default()
    };
    let t = |s: &str| format!("{tag}.{s}");
    let mut conv_inputs = vec![t("x"), t("w")];
    conv_inputs.extend(n.inputs.get(2).map(|&v| name(v)));
    let mut conv_attrs: Vec<(&str, Attr)> =
        n.attrs.iter().filter(|(k, _)| matches!(*k, "pads" | "strides")).map(|(k, a)| (*k, a.clone())).collect();
    conv_attrs.push(("kernel_shape", Attr::Ints(vec![kh as i64, kw as i64])));
    let nodes = vec![
        node("ReorderInput", DOMAIN, vec![name(n.inputs[0])], t("x"), vec![]),
        node("Reshape", "", vec![name(n.inputs[1]), t("s6")], t("w6"), vec![]),
        // [M/b, b(o), C/b, b(i), kh, kw] -> [M/b, C/b, kh, kw, b(i), b(o)]
        node("Transpose", "", vec![t("w6")], t("w6t"), vec![("perm", Attr::Ints(vec![0, 2, 4, 5, 3, 1]))]),
        node("Reshape", "", vec![t("w6t"), t("s4")], t("w"), vec![]),
        node("Conv", DOMAIN, conv_inputs, t("y"), conv_attrs),
        node("ReorderOutput", DOMAIN, vec![t("y")], name(n.outputs[0]), vec![("channels", Attr::Int(m as i64))]),
    ];
    (nodes, consts)
}

/// MLAS's NCHWc block size on this machine, found once by running a probe convolution (16 -> 16
/// channels, 3x3, stride 2, bias) written both ways on the CPU: the first of 16 and 8 whose
/// lowering matches the standard Conv. `None` where neither does or the ops are missing.
pub fn block_size() -> Option<usize> {
    static BLOCK: OnceLock<Option<usize>> = OnceLock::new();
    *BLOCK.get_or_init(|| {
        let found = [16, 8].into_iter().find(|&b| probe(b).unwrap_or(false));
        match found {
            Some(b) => tracing::debug!("ORT's NCHWc block size here is {b}"),
            None => tracing::warn!("ORT's NCHWc Conv kernels are not usable here; convolutions stay standard"),
        }
        found
    })
}

fn probe(b: usize) -> crate::Result<bool> {
    use super::{Conv2d, DType, Runner, Tensor, WriteOptions};
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 16, 7, 7])?;
    let w = g.input("w", DType::F32, &[16, 16, 3, 3])?;
    let bias = g.input("b", DType::F32, &[16])?;
    let y = g.conv(x, w, Some(bias), Conv2d { stride: 2, pad: 1, ..Default::default() })?;
    g.output("y", y)?;
    let wave = |n: usize, k: f32| (0..n).map(|i| (i as f32 * k).sin() * 0.5).collect::<Vec<f32>>();
    let xv = Tensor::f32(&[2, 16, 7, 7], wave(2 * 16 * 49, 0.37))?;
    let wv = Tensor::f32(&[16, 16, 3, 3], wave(16 * 16 * 9, 0.91))?;
    let bv = Tensor::f32(&[16], wave(16, 1.7))?;
    let feeds = [("x", &xv), ("w", &wv), ("b", &bv)];
    let rt = crate::runtime::RuntimeOptions::default();
    let plain = Runner::new(&g, &rt)?.run(&feeds)?.get("y")?.to_f64_vec();
    let blocked = Runner::with_write_options(&g, &rt, WriteOptions { nchwc_block: Some(b), ..Default::default() })?
        .run(&feeds)?
        .get("y")?
        .to_f64_vec();
    Ok(plain.iter().zip(&blocked).all(|(a, c)| (a - c).abs() <= 1e-4 * (1.0 + a.abs())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Conv2d, DType, GradOptions, Runner, Tensor, WriteOptions, grad_with};
    use crate::runtime::RuntimeOptions;

    #[test]
    fn the_block_size_is_found_on_this_machine() {
        // The machines this project runs on are x86-64 with AVX2 or AVX-512.
        let b = block_size();
        assert!(matches!(b, Some(8) | Some(16)), "{b:?}");
    }

    #[test]
    fn lowered_convs_and_their_gradients_equal_the_standard_ones() {
        // conv 16 -> 32 (bias, stride 1), conv 32 -> 32 (stride 2, odd map), conv 3 -> 16 (not
        // eligible: 3 input channels), and every gradient (flipped-kernel Convs included).
        let b = block_size().expect("NCHWc available");
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 16, 9, 9]).unwrap();
        let img = g.input("img", DType::F32, &[2, 3, 9, 9]).unwrap();
        let w1 = g.param("w1", &[32, 16, 3, 3], (0..4608).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect()).unwrap();
        let b1 = g.param("b1", &[32], (0..32).map(|i| i as f32 * 0.01).collect()).unwrap();
        let w2 = g.param("w2", &[32, 32, 3, 3], (0..9216).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect()).unwrap();
        let w3 = g.param("w3", &[16, 3, 3, 3], (0..432).map(|i| ((i % 7) as f32 - 3.0) * 0.02).collect()).unwrap();
        let s = g.conv(img, w3, None, Conv2d { pad: 1, ..Default::default() }).unwrap();
        let h = g.add(x, s).unwrap();
        let y = g.conv(h, w1, Some(b1), Conv2d { pad: 1, ..Default::default() }).unwrap();
        let y = g.conv(y, w2, None, Conv2d { stride: 2, pad: 1, ..Default::default() }).unwrap();
        let sq = g.mul(y, y).unwrap();
        let loss = g.sum_all(sq).unwrap();
        let params = g.params();
        let (grads, _) = grad_with(&mut g, loss, &params, &GradOptions::default()).unwrap();
        g.output("loss", loss).unwrap();
        for (i, gr) in grads.iter().enumerate() {
            g.output(&format!("grad{i}"), *gr).unwrap();
        }
        let lowered = g.nodes().iter().filter(|n| eligible(&g, n, b)).count();
        assert!(lowered >= 3, "forward and input-gradient Convs are eligible, got {lowered}");
        let wave = |n: usize, k: f32| (0..n).map(|i| (i as f32 * k).sin()).collect::<Vec<f32>>();
        let xv = Tensor::f32(&[2, 16, 9, 9], wave(2592, 0.13)).unwrap();
        let iv = Tensor::f32(&[2, 3, 9, 9], wave(486, 0.29)).unwrap();
        let feeds = [("x", &xv), ("img", &iv)];
        let rt = RuntimeOptions::default();
        let mut plain = Runner::new(&g, &rt).unwrap();
        let wo = WriteOptions { nchwc_block: Some(b), ..Default::default() };
        let mut blocked = Runner::with_write_options(&g, &rt, wo).unwrap();
        let (p, q) = (plain.run(&feeds).unwrap(), blocked.run(&feeds).unwrap());
        for name in ["loss", "grad0", "grad1", "grad2", "grad3"] {
            let (a, c) = (p.get(name).unwrap().to_f64_vec(), q.get(name).unwrap().to_f64_vec());
            let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (u, v) in a.iter().zip(&c) {
                assert!((u - v).abs() <= 1e-5 * (1.0 + scale), "{name}: standard {u} vs NCHWc {v}");
            }
        }
        // The written model names the NCHWc domain only when something was lowered.
        let m = crate::graph::onnx::to_model_with(&g, "t", wo).unwrap();
        assert!(m.opset_import.iter().any(|o| o.domain.as_deref() == Some(DOMAIN)));
        assert_eq!(m.graph.unwrap().node.iter().filter(|n| n.domain.as_deref() == Some(DOMAIN)).count(), 3 * lowered);
    }
}
