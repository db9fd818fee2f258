//! Conv gradients. Input: for stride 1 (dense, square kernel, equal pads) a Conv with the
//! kernel transposed over channels and flipped in space; otherwise ConvTranspose with the forward
//! geometry (output_padding restores odd sizes). Weight: one of two lowerings, [`ConvWeightGrad::Transposed`] (a Conv over the
//! transposed input with the output gradient as kernel, dilations = stride) or
//! [`ConvWeightGrad::Im2col`] (the input unfolded by a Conv with 0/1 kernels, then MatMul),
//! chosen per layer by [`conv_weight_rule`] unless the builder or [`super::GradOptions`] says.
//! Bias: ReduceSum over batch and space.

use super::{Ctx, no_grad};
use crate::Result;
use crate::graph::ir::{Attr, ConvWeightGrad, Graph, Node, Tensor, Value};
use crate::graph::nn::ConvTranspose2d;
use crate::graph::ops::to_i64;

/// The weight-gradient lowering used for one convolution, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvGradChoice {
    /// Name of the convolution's output value.
    pub output: String,
    pub x_shape: Vec<usize>,
    pub w_shape: Vec<usize>,
    pub stride: usize,
    pub groups: usize,
    /// `Transposed` or `Im2col`, never `Auto`.
    pub lowering: ConvWeightGrad,
    pub reason: &'static str,
}

/// The measured rule behind [`ConvWeightGrad::Auto`] for input `[N, C, H, W]` and weight
/// `[M, C/groups, kh, kw]`: Im2col for kernels up to 3x3, 1x1 kernels and every grouped conv;
/// Transposed for dense kernels of 5x5 and more.
///
/// Measured with `benches/graph_conv_grad.rs` (ONNX Runtime 1.31 CPU, one thread, batch 32; ms
/// per weight gradient, transposed / im2col): 3x32x32 -> 64 k3: 3.3 / 1.9; 64x32x32 -> 64 k3:
/// 42.1 / 23.4; 64x32x32 -> 128 k3 s2: 17.7 / 11.3; 128x16x16 -> 256 k3 s2: 15.1 / 8.7;
/// 256x8x8 -> 256 k3: 27.0 / 17.3; 512x4x4 -> 512 k3: 25.6 / 16.2; 1x1 s2 64 -> 128: 15.2 / 1.9;
/// depthwise 64x32x32 k3: 20.1 / 13.2; but 64x32x32 -> 64 k5: 70.2 / 68.5, k7 s2: 30.3 / 43.5,
/// and the ResNet stem 3x64x64 -> 64 k7 s2: 6.7 / 9.1. The unfold writes `kh·kw` copies of the
/// input, which dominates for large kernels; the transposed Conv runs a `kh·kw`-wide Gemm per
/// input channel, which is what makes it lose on small kernels.
pub fn conv_weight_rule(_x_shape: &[usize], w_shape: &[usize], groups: usize) -> (ConvWeightGrad, &'static str) {
    let k = w_shape[2] * w_shape[3];
    if groups > 1 {
        (ConvWeightGrad::Im2col, "grouped: unfold + batched MatMul (measured 1.5x faster for depthwise 3x3)")
    } else if k == 1 {
        (ConvWeightGrad::Im2col, "1x1 kernel: im2col measured 8x faster")
    } else if k < 25 {
        (ConvWeightGrad::Im2col, "kernel up to 3x3: im2col measured 1.5-1.8x faster")
    } else {
        (ConvWeightGrad::Transposed, "kernel 5x5 or larger: transposed Conv measured equal (5x5) to 1.4x faster (7x7)")
    }
}

pub(super) fn rule(g: &mut Graph, node: &Node, gy: Value, need: &[bool], ctx: &mut Ctx) -> Result<Vec<Option<Value>>> {
    let (x, w) = (node.inputs[0], node.inputs[1]);
    let (xs, ws) = (g.shape(x).to_vec(), g.shape(w).to_vec());
    let ys = g.shape(gy).to_vec();
    let strides = node.attr_ints("strides", &[1, 1]);
    let pads = node.attr_ints("pads", &[0, 0, 0, 0]);
    let dil = node.attr_ints("dilations", &[1, 1]);
    let groups = node.attr_int("group", 1) as usize;
    if node.attr("auto_pad").is_some() || strides.len() != 2 {
        return Err(no_grad(node, "only 2-D convolutions with explicit pads are differentiated"));
    }
    let u = |v: &[i64]| v.iter().map(|&a| a as usize).collect::<Vec<_>>();
    let (s, p, d) = (u(&strides), u(&pads), u(&dil));
    let mut out = vec![None; node.inputs.len()];

    let square_same_pads = ws[2] == ws[3] && p.iter().all(|&v| v == p[0]) && p[0] < ws[2];
    if need[0] && s == [1, 1] && d == [1, 1] && groups == 1 && square_same_pads {
        // Stride 1: dX = Conv(dY, W transposed over channels and flipped in space) with pad
        // k-1-p. ORT's Conv (NCHWc kernels) runs this 2-4x faster than its ConvTranspose.
        let k = ws[2];
        let wt = g.transpose(w, &[1, 0, 2, 3])?;
        let rev = g.const_i64(&(0..k as i64).rev().collect::<Vec<_>>());
        let flip_h = g.gather(wt, rev, 2)?;
        let flipped = g.gather(flip_h, rev, 3)?;
        let c = crate::graph::nn::Conv2d { stride: 1, pad: k - 1 - p[0], ..Default::default() };
        out[0] = Some(g.conv(gy, flipped, None, c)?);
    } else if need[0] {
        let mut op = [0; 2];
        for i in 0..2 {
            let full = s[i] * (ys[2 + i] - 1) + d[i] * (ws[2 + i] - 1) + 1;
            op[i] = xs[2 + i] + p[i] + p[i + 2] - full;
        }
        let ct = ConvTranspose2d {
            strides: [s[0], s[1]],
            pads: [p[0], p[1], p[2], p[3]],
            dilations: [d[0], d[1]],
            group: groups,
            output_padding: op,
        };
        out[0] = Some(g.conv_transpose(gy, w, ct)?);
    }
    if need[1] {
        let (lowering, reason) = match (node.weight_grad, ctx.opts.conv_weight) {
            (ConvWeightGrad::Auto, ConvWeightGrad::Auto) => conv_weight_rule(&xs, &ws, groups),
            (ConvWeightGrad::Auto, chosen) => (chosen, "chosen by GradOptions"),
            (chosen, _) => (chosen, "chosen on the Conv2d builder"),
        };
        let geo = Geometry { xs: xs.clone(), ws: ws.clone(), ys: ys.clone(), s, p, d, groups };
        out[1] = Some(match lowering {
            ConvWeightGrad::Transposed => weight_transposed(g, x, gy, &geo)?,
            _ => weight_im2col(g, x, gy, &geo)?,
        });
        ctx.report.convs.push(ConvGradChoice {
            output: g.name(node.outputs[0]).to_string(),
            x_shape: xs,
            w_shape: ws,
            stride: geo.s[0],
            groups,
            lowering: if lowering == ConvWeightGrad::Transposed { lowering } else { ConvWeightGrad::Im2col },
            reason,
        });
    }
    if node.inputs.len() > 2 && need[2] {
        out[2] = Some(g.reduce_sum(gy, &[0, 2, 3], false)?);
    }
    Ok(out)
}

struct Geometry {
    xs: Vec<usize>,
    ws: Vec<usize>,
    ys: Vec<usize>,
    s: Vec<usize>,
    p: Vec<usize>,
    d: Vec<usize>,
    groups: usize,
}

/// dW[m, c, a, e] = Σ_{n,i,j} gy[n, m, i, j] · x_pad[n, c, i·s + a·d, j·s + e·d]: a Conv whose
/// batch is the input channels, whose channels are the batch, and whose kernel is the output
/// gradient, with stride and dilation swapped.
fn weight_transposed(g: &mut Graph, x: Value, gy: Value, geo: &Geometry) -> Result<Value> {
    let (n, c) = (geo.xs[0], geo.xs[1]);
    let (m, cig, kh, kw) = (geo.ws[0], geo.ws[1], geo.ws[2], geo.ws[3]);
    let groups = geo.groups;
    let xt = g.transpose(x, &[1, 0, 2, 3])?; // [C, N, H, W]
    let gt = g.transpose(gy, &[1, 0, 2, 3])?; // [M, N, Ho, Wo]
    let attrs = |g: &Graph, k: Value, group: usize| {
        let ks = g.shape(k)[2..].to_vec();
        vec![
            ("kernel_shape", Attr::Ints(to_i64(&ks))),
            ("strides", Attr::Ints(to_i64(&geo.d))),
            ("pads", Attr::Ints(to_i64(&geo.p))),
            ("dilations", Attr::Ints(to_i64(&geo.s))),
            ("group", Attr::Int(group as i64)),
        ]
    };
    let out_hw =
        |i: usize| (geo.xs[2 + i] + geo.p[i] + geo.p[i + 2] - geo.s[i] * (geo.ys[2 + i] - 1) - 1) / geo.d[i] + 1;
    let (oh, ow) = (out_hw(0), out_hw(1));
    let dt = g.dtype(x);
    let full = if groups == 1 {
        let a = attrs(g, gt, 1);
        let r = g.push1("Conv", vec![xt, gt], a, dt, vec![c, m, oh, ow]); // [C, M, oh, ow]
        g.transpose(r, &[1, 0, 2, 3])? // [M, C, oh, ow]
    } else {
        // One image with C·N channels, one group per input channel; each group's kernels are the
        // output gradients of the output channels that read that input channel.
        let cog = m / groups;
        let xi = g.reshape_to(xt, &[1, c * n, geo.xs[2], geo.xs[3]])?;
        let gk = if cig == 1 {
            gt
        } else {
            let g6 = g.reshape_to(gt, &[groups, 1, cog, n, geo.ys[2], geo.ys[3]])?;
            let e = g.expand(g6, &[groups, cig, cog, n, geo.ys[2], geo.ys[3]])?;
            g.reshape_to(e, &[c * cog, n, geo.ys[2], geo.ys[3]])?
        };
        let a = attrs(g, gk, c);
        let r = g.push1("Conv", vec![xi, gk], a, dt, vec![1, c * cog, oh, ow]);
        let r = g.reshape_to(r, &[groups, cig, cog, oh, ow])?;
        let r = g.transpose(r, &[0, 2, 1, 3, 4])?;
        g.reshape_to(r, &[m, cig, oh, ow])?
    };
    if oh == kh && ow == kw { Ok(full) } else { g.slice(full, &[2, 3], &[0, 0], &[kh as i64, kw as i64], &[]) }
}

/// im2col without slices: a grouped Conv with 0/1 "identity" kernels unfolds the input into
/// `cols [N, C·kh·kw, Ho·Wo]` (exact: each output is one input times 1), then
/// `dW = Σ_n gy_n · cols_nᵀ` is one batched MatMul and a ReduceSum over the batch, or, for small
/// maps with many channels, one MatMul over `N·Ho·Wo` after moving the batch next to the map
/// (per group for grouped convs). The unfold runs inside ORT's threaded Conv kernel, where strided Slices would
/// copy single-threaded.
fn weight_im2col(g: &mut Graph, x: Value, gy: Value, geo: &Geometry) -> Result<Value> {
    let (n, c) = (geo.xs[0], geo.xs[1]);
    let (m, cig, kh, kw) = (geo.ws[0], geo.ws[1], geo.ws[2], geo.ws[3]);
    let hw = geo.ys[2] * geo.ys[3];
    let groups = geo.groups;
    let (k, cog) = (kh * kw, m / groups);
    let dt = g.dtype(x);
    let mut eye = vec![0.0; c * k * k];
    for ch in 0..c {
        for i in 0..k {
            eye[(ch * k + i) * k + i] = 1.0;
        }
    }
    let eye = g.cached_constant(
        Tensor::F64(ndarray::ArrayD::from_shape_vec(vec![c * k, 1, kh, kw], eye).expect("sizes match")).cast(dt),
    );
    let attrs = vec![
        ("kernel_shape", Attr::Ints(vec![kh as i64, kw as i64])),
        ("strides", Attr::Ints(to_i64(&geo.s))),
        ("pads", Attr::Ints(to_i64(&geo.p))),
        ("dilations", Attr::Ints(to_i64(&geo.d))),
        ("group", Attr::Int(c as i64)),
    ];
    let cols = g.push1("Conv", vec![x, eye], attrs, dt, vec![n, c * k, geo.ys[2], geo.ys[3]]);
    let cols = g.reshape_to(cols, &[n, groups, cig * k, hw])?;
    let g4 = g.reshape_to(gy, &[n, groups, cog, hw])?;
    let dw = if cig * k * cog > hw * (cig * k + cog) {
        // Small maps, many channels: the per-image products [N, G, Cig·K, Cog] would outweigh
        // the inputs, so fold the batch into the reduction: one MatMul over N·Ho·Wo.
        let ct = g.transpose(cols, &[1, 2, 0, 3])?; // [G, Cig·K, N, HoWo]
        let ct = g.reshape_to(ct, &[groups, cig * k, n * hw])?;
        let gt = g.transpose(g4, &[1, 2, 0, 3])?;
        let gt = g.reshape_to(gt, &[groups, cog, n * hw])?;
        let ctt = g.transpose(ct, &[0, 2, 1])?; // fused into the MatMul by ORT
        g.matmul(gt, ctt)? // [G, Cog, Cig·K]
    } else {
        let gt = g.transpose(g4, &[0, 1, 3, 2])?; // [N, G, HoWo, Cog]
        let prod = g.matmul(cols, gt)?; // [N, G, Cig·K, Cog]
        let dw = g.reduce_sum(prod, &[0], false)?; // [G, Cig·K, Cog]
        g.transpose(dw, &[0, 2, 1])? // [G, Cog, Cig·K]
    };
    g.reshape_to(dw, &[m, cig, kh, kw])
}
