//! Conv gradients. Input: for stride 1 (dense, square kernel, equal pads) a Conv with the
//! kernel transposed over channels and flipped in space; otherwise ConvTranspose with the forward
//! geometry (output_padding restores odd sizes). Weight: one of three lowerings,
//! [`ConvWeightGrad::Transposed`] (a Conv over the transposed input with the output gradient as
//! kernel, dilations = stride), [`ConvWeightGrad::Im2col`] (the input unfolded by a Conv with 0/1
//! kernels, then MatMul) or [`ConvWeightGrad::Shifted`] (stride 1: row-shifted input and
//! column-shifted output gradient, then MatMul), chosen per layer by [`conv_weight_rule`] unless
//! the builder or [`super::GradOptions`] says.
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
    /// `Transposed`, `Im2col` or `Shifted`, never `Auto`.
    pub lowering: ConvWeightGrad,
    pub reason: &'static str,
}

/// The measured rule behind [`ConvWeightGrad::Auto`] for input `[N, C, H, W]`, weight
/// `[M, C/groups, kh, kw]`, the convolution's `stride` and `dilation`, and its output width `wo`:
/// Im2col for grouped convs and 1x1 kernels; for dense stride-1 kernels, Shifted when its copies
/// `(C·kh + M·kw)·(W + pads)` are under 1/1.3 of im2col's `C·kh·kw·wo` (the margin pays for the
/// batch-folding transposes it needs more often); otherwise Im2col up to 3x3 and Transposed for
/// larger kernels.
///
/// Measured with `benches/graph_conv_grad.rs` (ONNX Runtime 1.31 CPU, one thread, batch 32; ms
/// per weight gradient, transposed / im2col / shifted): 3x32x32 -> 64 k3: 2.6 / 1.5 / 5.4;
/// 64x32x32 -> 64 k3: 40.1 / 24.9 / 21.1; 64x32x32 -> 64 k5: 63.5 / 70.6 / 46.6; 256x8x8 -> 256
/// k3: 27.4 / 16.1 / 17.3; 512x4x4 -> 512 k3: 23.7 / 16.1 / 21.4. Strided and grouped
/// (transposed / im2col): 64x32x32 -> 128 k3 s2: 17.7 / 11.3; 128x16x16 -> 256 k3 s2: 15.1 / 8.7;
/// 1x1 s2 64 -> 128: 15.2 / 1.9; depthwise 64x32x32 k3: 20.1 / 13.2; k7 s2: 30.3 / 43.5, and the
/// ResNet stem 3x64x64 -> 64 k7 s2: 6.7 / 9.1. The unfold writes `kh·kw` copies of the input,
/// which dominates for large kernels; the transposed Conv runs a `kh·kw`-wide Gemm per input
/// channel, which is what makes it lose on small kernels; Shifted copies the input `kh` times
/// and the output gradient `kw` times, so it loses when the input has far fewer channels.
pub fn conv_weight_rule(
    x_shape: &[usize],
    w_shape: &[usize],
    groups: usize,
    stride: &[usize],
    dilation: &[usize],
    pads: &[usize],
) -> (ConvWeightGrad, &'static str) {
    let (m, c, kh, kw) = (w_shape[0], x_shape[1], w_shape[2], w_shape[3]);
    let k = kh * kw;
    let unit = |v: &[usize]| v.iter().all(|&a| a == 1);
    if groups > 1 {
        return (ConvWeightGrad::Im2col, "grouped: unfold + batched MatMul (measured 1.5x faster for depthwise 3x3)");
    }
    if k == 1 {
        return (ConvWeightGrad::Im2col, "1x1 kernel: im2col measured 8x faster");
    }
    if unit(stride) && unit(dilation) {
        let wp = x_shape[3] + pads[1] + pads[3];
        let wo = wp + 1 - kw;
        if 13 * (c * kh + m * kw) * wp < 10 * c * k * wo {
            return (ConvWeightGrad::Shifted, SHIFTED_MEASURED);
        }
    }
    if k < 25 {
        (ConvWeightGrad::Im2col, "kernel up to 3x3: im2col measured 1.5-1.8x faster")
    } else {
        (ConvWeightGrad::Transposed, "kernel 5x5 or larger: transposed Conv measured equal (5x5) to 1.4x faster (7x7)")
    }
}

/// Why a stride-1 convolution uses [`ConvWeightGrad::Shifted`].
pub const SHIFTED_MEASURED: &str =
    "stride 1, shifted copies (C·kh + M·kw maps) well under im2col's C·kh·kw: measured 1.2-1.5x faster";

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
            (ConvWeightGrad::Auto, ConvWeightGrad::Auto) => conv_weight_rule(&xs, &ws, groups, &s, &d, &p),
            (ConvWeightGrad::Auto, chosen) => (chosen, "chosen by GradOptions"),
            (chosen, _) => (chosen, "chosen on the Conv2d builder"),
        };
        let geo = Geometry { xs: xs.clone(), ws: ws.clone(), ys: ys.clone(), s, p, d, groups };
        let (lowering, reason) = match lowering {
            ConvWeightGrad::Shifted if !geo.shiftable() => {
                (ConvWeightGrad::Im2col, "Shifted asked for, but it needs a dense stride-1 conv: im2col")
            }
            ConvWeightGrad::Auto => (ConvWeightGrad::Im2col, reason),
            other => (other, reason),
        };
        out[1] = Some(match lowering {
            ConvWeightGrad::Transposed => weight_transposed(g, x, gy, &geo)?,
            ConvWeightGrad::Shifted => weight_shifted(g, x, gy, &geo)?,
            _ => weight_im2col(g, x, gy, &geo)?,
        });
        ctx.report.convs.push(ConvGradChoice {
            output: g.name(node.outputs[0]).to_string(),
            x_shape: xs,
            w_shape: ws,
            stride: geo.s[0],
            groups,
            lowering,
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

impl Geometry {
    /// Whether [`weight_shifted`] applies: dense, stride 1, dilation 1.
    fn shiftable(&self) -> bool {
        self.groups == 1 && self.s.iter().chain(&self.d).all(|&v| v == 1)
    }
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
    let eye = selection_kernel(g, dt, c, kh, kw, k, |i| i);
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
    let dw = contract_over_batch(g, g4, cols)?; // [G, Cog, Cig·K]
    g.reshape_to(dw, &[m, cig, kh, kw])
}

/// `Σ_n a[n, g] · b[n, g]ᵀ` for `a [N, G, A, L]` and `b [N, G, B, L]`, giving `[G, A, B]`: one
/// batched MatMul and a ReduceSum over the batch, or, when the per-image products `[N, G, A, B]`
/// would outweigh the inputs (small maps, many channels), one MatMul over `N·L` after moving the
/// batch next to `L`.
fn contract_over_batch(g: &mut Graph, a: Value, b: Value) -> Result<Value> {
    let (sa, sb) = (g.shape(a).to_vec(), g.shape(b).to_vec());
    let (n, groups, ra, rb, l) = (sa[0], sa[1], sa[2], sb[2], sa[3]);
    if ra * rb > l * (ra + rb) {
        let at = g.transpose(a, &[1, 2, 0, 3])?; // [G, A, N, L]
        let at = g.reshape_to(at, &[groups, ra, n * l])?;
        let bt = g.transpose(b, &[1, 2, 0, 3])?;
        let bt = g.reshape_to(bt, &[groups, rb, n * l])?;
        let btt = g.transpose(bt, &[0, 2, 1])?; // fused into the MatMul by ORT
        g.matmul(at, btt)
    } else {
        let bt = g.transpose(b, &[0, 1, 3, 2])?; // [N, G, L, B], fused into the MatMul by ORT
        let prod = g.matmul(a, bt)?; // [N, G, A, B]
        g.reduce_sum(prod, &[0], false)
    }
}

/// 0/1 kernels `[ch·taps, 1, kh, kw]` for a grouped Conv whose output channel `c·taps + t` is
/// input channel `c` read at kernel offset `offset(t)` (row-major within `kh x kw`).
fn selection_kernel(
    g: &mut Graph,
    dt: crate::graph::ir::DType,
    ch: usize,
    kh: usize,
    kw: usize,
    taps: usize,
    offset: impl Fn(usize) -> usize,
) -> Value {
    let k = kh * kw;
    let mut sel = vec![0.0; ch * taps * k];
    for c in 0..ch {
        for t in 0..taps {
            sel[(c * taps + t) * k + offset(t)] = 1.0;
        }
    }
    let t = Tensor::F64(ndarray::ArrayD::from_shape_vec(vec![ch * taps, 1, kh, kw], sel).expect("sizes match"));
    g.cached_constant(t.cast(dt))
}

/// Shifted copies for a dense stride-1 conv with padded input `xp [N, C, Hp, Wp]`:
/// `dW[m, c, a, e] = Σ_{n,i,j} gy[n, m, i, j] · xp[n, c, i + a, j + e]`. The input shifted by
/// each kernel row, `xr[n, (c, a), i, q] = xp[n, c, i + a, q]` (`[N, C·kh, Ho, Wp]`, a Conv with
/// `kh x 1` 0/1 kernels and the forward pads), and the output gradient shifted by each kernel
/// column, `gs[n, (m, e), i, q] = gy[n, m, i, q - e]` (zero outside; `[N, M·kw, Ho, Wp]`, a Conv
/// with `1 x kw` 0/1 kernels padded `kw - 1` on both sides) turn the sum into one contraction
/// over `(n, i, q)`: `dW[(m, e), (c, a)] = Σ gs · xr`. Every term `q - e = j` is counted once,
/// and the zeros of `gs` drop the columns no output reads.
fn weight_shifted(g: &mut Graph, x: Value, gy: Value, geo: &Geometry) -> Result<Value> {
    let (n, c) = (geo.xs[0], geo.xs[1]);
    let (m, kh, kw) = (geo.ws[0], geo.ws[2], geo.ws[3]);
    let (ho, wo) = (geo.ys[2], geo.ys[3]);
    let wp = geo.xs[3] + geo.p[1] + geo.p[3];
    debug_assert_eq!(wo + kw - 1, wp);
    let dt = g.dtype(x);
    let rows = selection_kernel(g, dt, c, kh, 1, kh, |a| a);
    let attrs = |k: [usize; 2], pads: [usize; 4], group: usize| {
        vec![
            ("kernel_shape", Attr::Ints(to_i64(&k))),
            ("pads", Attr::Ints(to_i64(&pads))),
            ("group", Attr::Int(group as i64)),
        ]
    };
    let xr = g.push1(
        "Conv",
        vec![x, rows],
        attrs([kh, 1], [geo.p[0], geo.p[1], geo.p[2], geo.p[3]], c),
        dt,
        vec![n, c * kh, ho, wp],
    );
    // Output column q of tap e reads padded column q + t = q + kw - 1 - e, i.e. gy[.., q - e].
    let cols = selection_kernel(g, dt, m, 1, kw, kw, |e| kw - 1 - e);
    let gs = g.push1("Conv", vec![gy, cols], attrs([1, kw], [0, kw - 1, 0, kw - 1], m), dt, vec![n, m * kw, ho, wp]);
    let xr = g.reshape_to(xr, &[n, 1, c * kh, ho * wp])?;
    let gs = g.reshape_to(gs, &[n, 1, m * kw, ho * wp])?;
    let dw = contract_over_batch(g, gs, xr)?; // [1, M·kw, C·kh]
    let dw = g.reshape_to(dw, &[m, kw, c, kh])?;
    g.transpose(dw, &[0, 2, 3, 1])
}
