//! Finite-difference tests of every gradient rule, run through ONNX Runtime.
//!
//! Scheme (see `testutil::FdCheck`): `f(x) = sum(op(x) ⊙ R)` with a fixed random `R`; the
//! autodiff directional derivative `⟨∇f, v⟩` must match `(f(x+εv) − f(x−εv)) / 2ε` for three
//! random `v` within `tol · max(1, |ad|, |fd|)`. f64 forward (ε = 1e-6, tol = 1e-6) wherever ORT's
//! CPU provider has a double kernel; Conv, ConvTranspose and GlobalAveragePool only run in f32
//! there, so those use ε = 1e-2, tol = 1e-2 (the convolution is bilinear, so the central
//! difference is exact up to f32 rounding). Ops with kinks (Relu, Max/Min, ReduceMax, MaxPool)
//! get inputs spaced `gap` apart and ε <= gap/8, so no kink lies within a step.

use crate::graph::autodiff::conv_weight_rule;
use crate::graph::testutil::{FdCheck, onnx_check};
use crate::graph::*;

fn f64c() -> FdCheck {
    FdCheck::f64()
}

/// `x*x + 0.5`: a positive operand for Log, Sqrt, Div, Reciprocal, fractional Pow.
fn positive(g: &mut Graph, x: Value) -> Value {
    let sq = g.mul(x, x).unwrap();
    g.add_scalar(sq, 0.5).unwrap()
}

#[test]
fn add_sub_mul_div_with_broadcasting() {
    let cases: [(&[usize], &[usize]); 4] = [(&[2, 3], &[2, 3]), (&[2, 3], &[3]), (&[4, 1, 3], &[2, 1]), (&[2, 3], &[])];
    for (i, (a, b)) in cases.into_iter().enumerate() {
        let s = i as u64;
        f64c().run(10 + s, &[a, b], |g, x| g.add(x[0], x[1]).unwrap());
        f64c().run(20 + s, &[a, b], |g, x| g.sub(x[0], x[1]).unwrap());
        f64c().run(30 + s, &[a, b], |g, x| g.mul(x[0], x[1]).unwrap());
        f64c().run(40 + s, &[a, b], |g, x| {
            let d = positive(g, x[1]);
            g.div(x[0], d).unwrap()
        });
    }
    // The same value on both sides: contributions accumulate.
    f64c().run(50, &[&[3, 2]], |g, x| g.mul(x[0], x[0]).unwrap());
}

#[test]
fn unary_ops() {
    for (i, shape) in [&[5][..], &[2, 3, 4]].into_iter().enumerate() {
        let s = 100 + 10 * i as u64;
        f64c().run(s, &[shape], |g, x| g.neg(x[0]).unwrap());
        f64c().separated(0.05).run(s + 1, &[shape], |g, x| g.relu(x[0]).unwrap());
        f64c().run(s + 2, &[shape], |g, x| g.sigmoid(x[0]).unwrap());
        // ReLU6 on 8x + 3.1: the 24 inputs of the larger shape reach [-1.7, 7.9], crossing both
        // bounds, and the kinks (x = -0.3875, 0.3625) lie a quarter grid step from every input.
        f64c().separated(0.05).run(s + 11, &[shape], |g, x| {
            let y = g.mul_scalar(x[0], 8.0).unwrap();
            let y = g.add_scalar(y, 3.1).unwrap();
            g.relu6(y).unwrap()
        });
        f64c().run(s + 3, &[shape], |g, x| g.exp(x[0]).unwrap());
        f64c().run(s + 4, &[shape], |g, x| {
            let p = positive(g, x[0]);
            g.log(p).unwrap()
        });
        f64c().run(s + 5, &[shape], |g, x| {
            let p = positive(g, x[0]);
            g.sqrt(p).unwrap()
        });
        f64c().run(s + 6, &[shape], |g, x| {
            let p = positive(g, x[0]);
            g.reciprocal(p).unwrap()
        });
        f64c().run(s + 7, &[shape], |g, x| g.pow_scalar(x[0], 2.0).unwrap());
        f64c().run(s + 8, &[shape], |g, x| g.pow_scalar(x[0], 3.0).unwrap());
        f64c().run(s + 9, &[shape], |g, x| {
            let p = positive(g, x[0]);
            g.pow_scalar(p, -1.5).unwrap()
        });
    }
}

#[test]
fn max_min_where_sum_expand_identity() {
    // Max/Min operands are slices of one separated input, so no two compared values are close.
    for (seed, op) in [(200u64, "max"), (201, "min")] {
        f64c().separated(0.05).run(seed, &[&[2, 2, 3]], |g, x| {
            let a = g.slice(x[0], &[0], &[0], &[1], &[]).unwrap();
            let b = g.slice(x[0], &[0, 2], &[1, 0], &[2, 1], &[]).unwrap(); // [1, 2, 1]: broadcasts
            if op == "max" { g.max(a, b).unwrap() } else { g.min(a, b).unwrap() }
        });
    }
    let cond = Tensor::Bool(ndarray::arr2(&[[true, false, true], [false, false, true]]).into_dyn());
    f64c().run(202, &[&[2, 3], &[3]], |g, x| {
        let c = g.constant(cond.clone());
        g.where_(c, x[0], x[1]).unwrap()
    });
    f64c().run(203, &[&[2, 3], &[2, 1], &[]], |g, x| g.sum(x).unwrap());
    f64c().run(204, &[&[3, 1]], |g, x| g.expand(x[0], &[2, 3, 4]).unwrap());
    f64c().run(205, &[&[3]], |g, x| g.identity(x[0]).unwrap());
    // Cast f32 -> f64 -> f32 (checked in f32).
    FdCheck::f32().run(206, &[&[4]], |g, x| {
        let d = g.cast(x[0], DType::F64).unwrap();
        let e = g.exp(d).unwrap();
        g.cast(e, DType::F32).unwrap()
    });
}

#[test]
fn ties_share_the_gradient_equally() {
    // max(a, b) with a == b sends half to each; ReduceMax splits between tied maxima.
    let mut g = Graph::new();
    let a = g.input("a", DType::F64, &[3]).unwrap();
    let b = g.input("b", DType::F64, &[3]).unwrap();
    let m = g.max(a, b).unwrap();
    let r = g.reduce_max(a, &[0], false).unwrap();
    let sm = g.sum_all(m).unwrap();
    let loss = g.add(sm, r).unwrap();
    let gr = grad(&mut g, loss, &[a, b]).unwrap();
    g.output("ga", gr[0]).unwrap();
    g.output("gb", gr[1]).unwrap();
    let av = Tensor::f64(&[3], vec![2.0, 2.0, 0.0]).unwrap();
    let bv = Tensor::f64(&[3], vec![2.0, 1.0, 5.0]).unwrap();
    let out = Runner::cpu(&g).unwrap().run(&[("a", &av), ("b", &bv)]).unwrap();
    // d/da: max part [0.5, 1, 0] + reduce_max part [0.5, 0.5, 0].
    assert_eq!(out.f64("ga").unwrap().iter().copied().collect::<Vec<_>>(), vec![1.0, 1.5, 0.0]);
    assert_eq!(out.f64("gb").unwrap().iter().copied().collect::<Vec<_>>(), vec![0.5, 0.0, 1.0]);
}

#[test]
fn reductions() {
    let x: &[usize] = &[2, 3, 4];
    for (i, (axes, keep)) in
        [(&[1i64][..], true), (&[0, 2][..], false), (&[-1][..], false), (&[0, 1, 2][..], true)].into_iter().enumerate()
    {
        let s = 300 + 10 * i as u64;
        f64c().run(s, &[x], |g, v| g.reduce_sum(v[0], axes, keep).unwrap());
        f64c().run(s + 1, &[x], |g, v| g.reduce_mean(v[0], axes, keep).unwrap());
        f64c().separated(0.05).run(s + 2, &[x], |g, v| g.reduce_max(v[0], axes, keep).unwrap());
        f64c().run(s + 3, &[x], |g, v| g.reduce_sum_square(v[0], axes, keep).unwrap());
    }
}

#[test]
fn reshapes_and_transposes() {
    f64c().run(400, &[&[2, 3, 4]], |g, x| g.reshape(x[0], &[4, -1]).unwrap());
    f64c().run(401, &[&[2, 3, 4]], |g, x| g.flatten(x[0], 2).unwrap());
    f64c().run(402, &[&[2, 3, 4]], |g, x| g.transpose(x[0], &[2, 0, 1]).unwrap());
    f64c().run(403, &[&[2, 1, 4]], |g, x| g.transpose(x[0], &[1, 2, 0]).unwrap());
    f64c().run(404, &[&[2, 3]], |g, x| {
        let u = g.unsqueeze(x[0], &[0, 2]).unwrap();
        let e = g.exp(u).unwrap(); // keep the two from cancelling into nothing
        g.squeeze(e, &[0]).unwrap()
    });
}

#[test]
fn concat_split_pad() {
    f64c().run(500, &[&[2, 1, 3], &[2, 4, 3], &[2, 2, 3]], |g, x| g.concat(x, 1).unwrap());
    f64c().run(501, &[&[3, 2], &[3, 2]], |g, x| g.concat(x, -1).unwrap());
    // Split with one piece unused: its gradient is zero.
    f64c().run(502, &[&[2, 7]], |g, x| {
        let p = g.split(x[0], 1, &[2, 4, 1]).unwrap();
        let a = g.exp(p[0]).unwrap();
        let b = g.slice(p[1], &[1], &[0], &[2], &[]).unwrap();
        g.mul(a, b).unwrap()
    });
    f64c().run(503, &[&[2, 3]], |g, x| g.pad(x[0], &[1, 0, 0, 2]).unwrap());
}

#[test]
fn slices() {
    let x: &[usize] = &[3, 7, 6];
    f64c().run(600, &[x], |g, v| g.slice(v[0], &[1], &[1], &[5], &[]).unwrap());
    f64c().run(601, &[x], |g, v| g.slice(v[0], &[1], &[1], &[7], &[2]).unwrap());
    f64c().run(602, &[x], |g, v| g.slice(v[0], &[0, 2], &[-2, 0], &[100, 6], &[1, 3]).unwrap());
    f64c().run(603, &[x], |g, v| g.slice(v[0], &[2, 1, 0], &[1, 2, 0], &[5, 7, 2], &[2, 2, 1]).unwrap());
}

#[test]
fn gathers_with_repeated_indices() {
    let idx = Tensor::i64(&[4], vec![2, 0, 2, -1]).unwrap();
    f64c().run(700, &[&[3, 4]], |g, x| {
        let i = g.constant(idx.clone());
        g.gather(x[0], i, 0).unwrap()
    });
    let idx2 = Tensor::i64(&[2, 2], vec![1, 1, 0, 3]).unwrap();
    f64c().run(701, &[&[2, 4, 3]], |g, x| {
        let i = g.constant(idx2.clone());
        g.gather(x[0], i, 1).unwrap()
    });
    let scalar = Tensor::I64(ndarray::arr0(1).into_dyn());
    f64c().run(702, &[&[3, 2]], |g, x| {
        let i = g.constant(scalar.clone());
        g.gather(x[0], i, 0).unwrap()
    });
}

#[test]
fn matmul_and_gemm() {
    f64c().run(800, &[&[3, 4], &[4, 5]], |g, x| g.matmul(x[0], x[1]).unwrap());
    f64c().run(801, &[&[2, 3, 4], &[4, 5]], |g, x| g.matmul(x[0], x[1]).unwrap());
    f64c().run(802, &[&[3, 4], &[2, 4, 5]], |g, x| g.matmul(x[0], x[1]).unwrap());
    f64c().run(803, &[&[2, 1, 3, 4], &[3, 4, 2]], |g, x| g.matmul(x[0], x[1]).unwrap());
    for (i, (ta, tb)) in [(false, false), (true, false), (false, true), (true, true)].into_iter().enumerate() {
        let sa: &[usize] = if ta { &[4, 3] } else { &[3, 4] };
        let sb: &[usize] = if tb { &[5, 4] } else { &[4, 5] };
        let o = Gemm { alpha: 0.5, beta: 2.0, trans_a: ta, trans_b: tb };
        f64c().run(810 + i as u64, &[sa, sb, &[5]], |g, x| g.gemm(x[0], x[1], Some(x[2]), o).unwrap());
        f64c().run(820 + i as u64, &[sa, sb, &[3, 1]], |g, x| g.gemm(x[0], x[1], Some(x[2]), o).unwrap());
    }
    f64c().run(830, &[&[3, 4], &[5, 4], &[5]], |g, x| g.linear(x[0], x[1], Some(x[2])).unwrap());
}

/// (input, weight, stride, pad, dilation, groups, bias).
type ConvCase = (&'static [usize], &'static [usize], usize, usize, usize, usize, bool);

const CONVS: &[ConvCase] = &[
    (&[2, 3, 6, 6], &[4, 3, 3, 3], 1, 1, 1, 1, true),
    (&[2, 3, 7, 7], &[4, 3, 3, 3], 2, 1, 1, 1, false), // stride 2, odd input
    (&[2, 2, 8, 8], &[3, 2, 3, 3], 2, 0, 1, 1, true),  // stride 2, even input, a row left over
    (&[1, 2, 6, 5], &[3, 2, 1, 1], 2, 0, 1, 1, false), // 1x1 downsample, non-square
    (&[2, 4, 7, 7], &[4, 1, 3, 3], 2, 1, 1, 4, true),  // depthwise, stride 2, odd
    (&[1, 4, 6, 6], &[8, 1, 3, 3], 1, 1, 1, 4, false), // depthwise, multiplier 2
    (&[1, 4, 5, 5], &[6, 2, 3, 3], 2, 1, 1, 2, false), // grouped, 2 channels per group
    (&[1, 2, 9, 9], &[2, 2, 3, 3], 2, 2, 2, 1, false), // dilation 2
    (&[2, 3, 7, 7], &[2, 3, 7, 7], 1, 0, 1, 1, false), // kernel as large as the input
    (&[2, 8, 2, 2], &[8, 8, 3, 3], 1, 1, 1, 1, true),  // tiny map, many channels: batch folded
    (&[2, 8, 2, 2], &[16, 4, 3, 3], 1, 1, 1, 2, false), // the same, grouped
    (&[2, 3, 6, 5], &[4, 3, 1, 1], 1, 0, 1, 1, false), // 1x1 stride 1: input grad by a flipped-kernel Conv
    (&[1, 2, 8, 7], &[3, 2, 5, 5], 1, 1, 1, 1, true),  // 5x5, pad 1 < k-1: flipped-kernel Conv pads 3
];

#[test]
fn conv_every_weight_lowering() {
    // Shifted falls back to Im2col where it does not apply (strided, dilated, grouped).
    use ConvWeightGrad::{Im2col, Shifted, Transposed};
    for (i, &(xs, ws, stride, pad, dilation, groups, bias)) in CONVS.iter().enumerate() {
        for (j, lowering) in [Transposed, Im2col, Shifted].into_iter().enumerate() {
            let c = Conv2d { stride, pad, dilation, groups, weight_grad: lowering };
            let shapes: Vec<&[usize]> = if bias { vec![xs, ws, &ws[..1]] } else { vec![xs, ws] };
            FdCheck::f32()
                .run(900 + 10 * i as u64 + j as u64, &shapes, |g, x| g.conv(x[0], x[1], x.get(2).copied(), c).unwrap());
        }
    }
}

#[test]
fn depthwise_tf_same_padding_odd_and_even_sides() {
    // EfficientNet-Lite's stride-2 depthwise convolutions: 3x3 and 5x5, on even sides (asymmetric
    // Pad + Conv) and odd ones (symmetric), and a dense 3x3 stride-2 stem; every weight lowering.
    use ConvWeightGrad::{Im2col, Shifted, Transposed};
    let cases: &[(&[usize], &[usize], usize, usize)] = &[
        (&[2, 4, 8, 8], &[4, 1, 5, 5], 2, 4),
        (&[2, 4, 9, 9], &[4, 1, 5, 5], 2, 4),
        (&[1, 3, 8, 7], &[3, 1, 3, 3], 2, 3),
        (&[1, 4, 7, 6], &[4, 1, 5, 5], 1, 4),
        (&[2, 3, 10, 10], &[4, 3, 3, 3], 2, 1),
    ];
    for (i, &(xs, ws, stride, groups)) in cases.iter().enumerate() {
        for (j, lowering) in [Transposed, Im2col, Shifted].into_iter().enumerate() {
            let c = Conv2d { stride, groups, weight_grad: lowering, ..Default::default() };
            FdCheck::f32().run(1200 + 10 * i as u64 + j as u64, &[xs, ws], |g, x| {
                let y = g.conv_tf_same(x[0], x[1], None, c).unwrap();
                assert_eq!(g.shape(y)[2], xs[2].div_ceil(stride));
                assert_eq!(g.shape(y)[3], xs[3].div_ceil(stride));
                y
            });
        }
    }
    assert_eq!(tf_same_pads(224, 3, 2), (0, 1));
    assert_eq!(tf_same_pads(56, 5, 2), (1, 2));
    assert_eq!(tf_same_pads(7, 5, 2), (2, 2));
    assert_eq!(tf_same_pads(14, 5, 1), (2, 2));
}

#[test]
fn conv_lowering_follows_the_builder_then_the_options_and_is_reported() {
    // Returns the report and the backward op types for two dense convs: one with the lowering
    // set on the builder, one left on Auto.
    let build = |on_builder: ConvWeightGrad, opts: ConvWeightGrad| {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 3, 8, 8]).unwrap();
        let w1 = g.param("w1", &[4, 3, 3, 3], vec![0.1; 108]).unwrap();
        let w2 = g.param("w2", &[4, 4, 3, 3], vec![0.1; 144]).unwrap();
        let y = g.conv(x, w1, None, Conv2d { pad: 1, weight_grad: on_builder, ..Default::default() }).unwrap();
        g.set_name(y, "first").unwrap();
        let y = g.conv(y, w2, None, Conv2d { pad: 1, ..Default::default() }).unwrap();
        g.set_name(y, "second").unwrap();
        let loss = g.sum_all(y).unwrap();
        let before = g.nodes().len();
        let (_, report) =
            grad_with(&mut g, loss, &[w1, w2], &GradOptions { conv_weight: opts, ..GradOptions::default() }).unwrap();
        // Im2col unfolds with a Conv over constant 0/1 kernels; Transposed convolves with gy; the
        // stride-1 input gradient convolves with the flipped weight (a Gather).
        let transposed = g.nodes()[before..]
            .iter()
            .filter(|n| n.op == "Conv" && g.const_value(n.inputs[1]).is_none())
            .filter(|n| g.producer(n.inputs[1]).is_none_or(|p| p.op != "Gather"))
            .count();
        (report, transposed)
    };
    let lowering = |r: &GradReport, name: &str| r.convs.iter().find(|c| c.output == name).unwrap().lowering;
    use ConvWeightGrad::{Im2col, Transposed};
    let (r, convs) = build(Transposed, Im2col);
    assert_eq!((lowering(&r, "first"), lowering(&r, "second")), (Transposed, Im2col));
    assert_eq!(convs, 1, "one transposed-Conv weight gradient");
    let (r, convs) = build(Im2col, Transposed);
    assert_eq!((lowering(&r, "first"), lowering(&r, "second")), (Im2col, Transposed));
    assert_eq!(convs, 1);
    let (r, _) = build(ConvWeightGrad::Auto, ConvWeightGrad::Auto);
    assert!(r.convs.iter().all(|c| c.lowering != ConvWeightGrad::Auto && !c.reason.is_empty()));
    assert_eq!(r.convs.len(), 2);
    // Dense, stride 1 and 3x3, but 3 and 4 channels at 8x8: im2col copies less than Shifted.
    assert_eq!((lowering(&r, "first"), lowering(&r, "second")), (ConvWeightGrad::Im2col, ConvWeightGrad::Im2col));
}

#[test]
fn shifted_applies_to_dense_stride_1_only_and_says_so() {
    // (input, weight, groups, stride, dilation, pad) with the measured winner.
    let rule = |xs: &[usize], ws: &[usize], groups: usize, stride: usize, dilation: usize, pad: usize| {
        conv_weight_rule(xs, ws, groups, &[stride; 2], &[dilation; 2], &[pad; 4]).0
    };
    use ConvWeightGrad::{Im2col, Shifted, Transposed};
    assert_eq!(rule(&[32, 64, 32, 32], &[64, 64, 3, 3], 1, 1, 1, 1), Shifted);
    assert_eq!(rule(&[32, 64, 32, 32], &[64, 64, 5, 5], 1, 1, 1, 2), Shifted);
    assert_eq!(rule(&[32, 3, 32, 32], &[64, 3, 3, 3], 1, 1, 1, 1), Im2col); // few input channels
    assert_eq!(rule(&[32, 256, 8, 8], &[256, 256, 3, 3], 1, 1, 1, 1), Im2col); // small map
    assert_eq!(rule(&[32, 512, 4, 4], &[512, 512, 3, 3], 1, 1, 1, 1), Im2col);
    assert_eq!(rule(&[32, 64, 32, 32], &[128, 64, 3, 3], 1, 2, 1, 1), Im2col); // strided
    assert_eq!(rule(&[32, 64, 32, 32], &[64, 64, 3, 3], 1, 1, 2, 2), Im2col); // dilated
    assert_eq!(rule(&[32, 64, 32, 32], &[64, 1, 3, 3], 64, 1, 1, 1), Im2col); // depthwise
    assert_eq!(rule(&[32, 64, 32, 32], &[64, 64, 1, 1], 1, 1, 1, 0), Im2col);
    assert_eq!(rule(&[32, 3, 64, 64], &[64, 3, 7, 7], 1, 2, 1, 3), Transposed);
    // Forced on a strided conv, the report says it fell back.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 3, 8, 8]).unwrap();
    let w = g.param("w", &[4, 3, 3, 3], vec![0.1; 108]).unwrap();
    let c = Conv2d { stride: 2, pad: 1, weight_grad: ConvWeightGrad::Shifted, ..Default::default() };
    let y = g.conv(x, w, None, c).unwrap();
    let loss = g.sum_all(y).unwrap();
    let (_, report) = grad_with(&mut g, loss, &[w], &GradOptions::default()).unwrap();
    assert_eq!(report.convs[0].lowering, ConvWeightGrad::Im2col);
    assert!(report.convs[0].reason.contains("stride-1"), "{}", report.convs[0].reason);
}

#[test]
fn max_pool_overlapping_windows() {
    // (input, kernel, stride, pad): odd and even sizes, overlapping 3/2 windows, padding.
    let cases: [(&[usize], usize, usize, usize); 4] =
        [(&[2, 3, 7, 7], 3, 2, 1), (&[1, 2, 8, 8], 3, 2, 1), (&[2, 2, 6, 6], 2, 2, 0), (&[1, 3, 5, 6], 3, 1, 0)];
    for (i, (xs, kernel, stride, pad)) in cases.into_iter().enumerate() {
        let p = Pool2d { kernel, stride, pad };
        f64c().separated(0.02).run(1000 + i as u64, &[xs], |g, x| g.max_pool(x[0], p).unwrap());
        // With the Indices output already requested by the builder.
        f64c().separated(0.02).run(1010 + i as u64, &[xs], |g, x| g.max_pool_with_indices(x[0], p).unwrap().0);
    }
}

#[test]
fn global_average_pool() {
    FdCheck::f32().run(1100, &[&[2, 3, 5, 4]], |g, x| g.global_avg_pool(x[0]).unwrap());
    FdCheck::f32().run(1101, &[&[1, 2, 1, 1]], |g, x| g.global_avg_pool(x[0]).unwrap());
}

fn f64_buffers(g: &mut Graph, c: usize) -> (Value, Value) {
    let rm = g.input_of("rm", InputKind::Buffer, DType::F64, &[c], Some(Tensor::zeros(DType::F64, &[c]))).unwrap();
    let rv = g.input_of("rv", InputKind::Buffer, DType::F64, &[c], Some(Tensor::full(DType::F64, &[c], 1.0))).unwrap();
    (rm, rv)
}

#[test]
fn batch_norm_training_mode() {
    // The closed-form (composite) gradient, w.r.t. x, gamma and beta.
    let b = BatchNorm::default();
    for (i, xs) in [&[4, 3, 2, 2][..], &[5, 2]].into_iter().enumerate() {
        let c = xs[1];
        f64c().run(1200 + i as u64, &[xs, &[c], &[c]], |g, x| {
            let (rm, rv) = f64_buffers(g, c);
            g.batch_norm_train(x[0], x[1], x[2], rm, rv, b).unwrap().y
        });
    }
    // When the loss also reads the batch statistics (through the running mean and variance),
    // autodiff falls back to the op-by-op rules.
    f64c().run(1210, &[&[3, 2, 2, 2], &[2], &[2]], |g, x| {
        let (rm, rv) = f64_buffers(g, 2);
        let o = g.batch_norm_train(x[0], x[1], x[2], rm, rv, b).unwrap();
        let y = g.reshape(o.y, &[-1]).unwrap();
        g.concat(&[y, o.running_mean, o.running_var], 0).unwrap()
    });
}

#[test]
fn batch_norm_inference_form_and_channel_affine() {
    // Every input of BatchNormalization differentiated; the variance kept positive as v² + 0.5.
    for (i, xs) in [&[3, 2, 2, 3][..], &[4, 3]].into_iter().enumerate() {
        let c = xs[1];
        f64c().run(1220 + i as u64, &[xs, &[c], &[c], &[c], &[c]], |g, x| {
            let v2 = g.mul(x[4], x[4]).unwrap();
            let var = g.add_scalar(v2, 0.5).unwrap();
            g.batch_norm_infer(x[0], x[1], x[2], x[3], var, 1e-3).unwrap()
        });
        f64c().run(1230 + i as u64, &[xs, &[c], &[c]], |g, x| g.channel_affine(x[0], x[1], x[2]).unwrap());
    }
}

#[test]
fn batch_norm_training_mode_as_one_node() {
    // The fused node: y alone, then y together with the running statistics (gradients reach the
    // batch mean and variance outputs), then the statistics alone.
    let b = BatchNorm::default();
    for (i, xs) in [&[4, 3, 2, 2][..], &[5, 2]].into_iter().enumerate() {
        let c = xs[1];
        f64c().run(1240 + i as u64, &[xs, &[c], &[c]], |g, x| {
            let (rm, rv) = f64_buffers(g, c);
            g.batch_norm_train_fused(x[0], x[1], x[2], rm, rv, b).unwrap().y
        });
    }
    f64c().run(1250, &[&[3, 2, 2, 2], &[2], &[2]], |g, x| {
        let (rm, rv) = f64_buffers(g, 2);
        let o = g.batch_norm_train_fused(x[0], x[1], x[2], rm, rv, b).unwrap();
        let y = g.reshape(o.y, &[-1]).unwrap();
        g.concat(&[y, o.running_mean, o.running_var], 0).unwrap()
    });
    f64c().run(1251, &[&[3, 2, 2, 2], &[2], &[2]], |g, x| {
        let (rm, rv) = f64_buffers(g, 2);
        let o = g.batch_norm_train_fused(x[0], x[1], x[2], rm, rv, b).unwrap();
        g.concat(&[o.running_mean, o.running_var], 0).unwrap()
    });
}

#[test]
fn batch_norm_uses_the_closed_form_unless_statistics_are_read() {
    let backward_ops = |read_stats: bool| {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[4, 3, 2, 2]).unwrap();
        let ga = g.param("gamma", &[3], vec![1.0; 3]).unwrap();
        let be = g.param("beta", &[3], vec![0.0; 3]).unwrap();
        let rm = g.buffer("rm", &[3], vec![0.0; 3]).unwrap();
        let rv = g.buffer("rv", &[3], vec![1.0; 3]).unwrap();
        let o = g.batch_norm_train(x, ga, be, rm, rv, BatchNorm::default()).unwrap();
        let mut loss = g.sum_all(o.y).unwrap();
        if read_stats {
            let s = g.sum_all(o.running_var).unwrap();
            loss = g.add(loss, s).unwrap();
        }
        let before = g.nodes().len();
        grad(&mut g, loss, &[x, ga, be]).unwrap();
        g.nodes()[before..].iter().map(|n| n.op).collect::<Vec<_>>()
    };
    let closed = backward_ops(false);
    let fallback = backward_ops(true);
    // The op-by-op rules differentiate the statistics' inputs of BatchNormalization (a Neg for
    // the mean) and Sub; the closed form does not.
    assert!(!closed.contains(&"Neg") && !closed.contains(&"Div"), "{closed:?}");
    assert!(fallback.contains(&"Neg"), "{fallback:?}");
    assert!(closed.len() < fallback.len(), "{} vs {}", closed.len(), fallback.len());
}

#[test]
fn no_gradient_work_for_values_independent_of_wrt() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[4]).unwrap();
    let w = g.param("w", &[4], vec![1.0; 4]).unwrap();
    let labels = g.input("labels", DType::I64, &[4]).unwrap();
    let lf = g.cast(labels, DType::F32).unwrap();
    let e = g.exp(x).unwrap(); // depends only on the data
    let a = g.mul(e, lf).unwrap();
    let b = g.mul(a, w).unwrap();
    let loss = g.sum_all(b).unwrap();
    let before = g.nodes().len();
    let gw = grad(&mut g, loss, &[w]).unwrap()[0];
    let backward: Vec<&str> = g.nodes()[before..].iter().map(|n| n.op).collect();
    // d loss / d w = a broadcast: ReduceSum's Reshape/Expand, then Mul's product; nothing for x.
    assert!(!backward.contains(&"Exp") && !backward.contains(&"Cast"), "{backward:?}");
    assert!(backward.len() <= 3, "{backward:?}");
    // A wrt the loss does not depend on gets zeros.
    let unused = g.param("unused", &[2], vec![1.0; 2]).unwrap();
    let gu = grad(&mut g, loss, &[unused]).unwrap()[0];
    g.output("gw", gw).unwrap();
    g.output("gu", gu).unwrap();
    let xv = Tensor::f32(&[4], vec![0.0, 1.0, 0.5, 2.0]).unwrap();
    let lv = Tensor::i64(&[4], vec![1, 2, 3, 4]).unwrap();
    let out = Runner::cpu(&g).unwrap().run(&[("x", &xv), ("labels", &lv)]).unwrap();
    let want: Vec<f32> = [0.0f32, 1.0, 0.5, 2.0].iter().zip([1.0, 2.0, 3.0, 4.0]).map(|(x, l)| x.exp() * l).collect();
    for (a, b) in out.f32("gw").unwrap().iter().zip(&want) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    assert!(out.f32("gu").unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn errors_name_the_problem() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[3]).unwrap();
    let i = g.input("i", DType::I64, &[3]).unwrap();
    let e = grad(&mut g, x, &[x]).unwrap_err().to_string();
    assert!(e.contains("one float element"), "{e}");
    let s = g.sum_all(x).unwrap();
    let e = grad(&mut g, s, &[i]).unwrap_err().to_string();
    assert!(e.contains("only float"), "{e}");
    let p = g.input("p", DType::F32, &[]).unwrap();
    let pw = g.push1("Pow", vec![x, p], vec![], DType::F32, vec![3]);
    let l = g.sum_all(pw).unwrap();
    let e = grad(&mut g, l, &[x]).unwrap_err().to_string();
    assert!(e.contains("Pow") && e.contains("constant"), "{e}");
}

#[test]
fn a_small_training_graph_passes_the_onnx_checker() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 3, 9, 9]).unwrap();
    let w = g.param("w", &[4, 3, 3, 3], vec![0.1; 108]).unwrap();
    let dw = g.param("dw", &[4, 1, 3, 3], vec![0.1; 36]).unwrap();
    let ga = g.param("gamma", &[4], vec![1.0; 4]).unwrap();
    let be = g.param("beta", &[4], vec![0.0; 4]).unwrap();
    let rm = g.buffer("rm", &[4], vec![0.0; 4]).unwrap();
    let rv = g.buffer("rv", &[4], vec![1.0; 4]).unwrap();
    let lw = g.param("lw", &[5, 4], vec![0.1; 20]).unwrap();
    let y = g
        .conv(x, w, None, Conv2d { stride: 2, pad: 1, weight_grad: ConvWeightGrad::Transposed, ..Default::default() })
        .unwrap();
    let y = g.conv(y, dw, None, Conv2d { pad: 1, groups: 4, ..Default::default() }).unwrap();
    let bn = g.batch_norm_train(y, ga, be, rm, rv, BatchNorm::default()).unwrap();
    let y = g.relu(bn.y).unwrap();
    let y = g.max_pool(y, Pool2d { kernel: 3, stride: 2, pad: 1 }).unwrap();
    let y = g.global_avg_pool(y).unwrap();
    let y = g.flatten(y, 1).unwrap();
    let y = g.linear(y, lw, None).unwrap();
    let loss = g.mean_all(y).unwrap();
    let params = g.params();
    let grads = grad(&mut g, loss, &params).unwrap();
    g.output("loss", loss).unwrap();
    for (p, gr) in params.iter().zip(&grads) {
        let name = format!("{}.grad", g.name(*p));
        g.output(&name, *gr).unwrap();
    }
    onnx_check(&g);
}

#[test]
fn a_small_net_end_to_end() {
    // conv (bias) -> BatchNorm -> sigmoid -> depthwise conv stride 2 -> global average pool ->
    // linear, all parameters and the input differentiated at once (f32, ε = 1e-2, tol 1e-2;
    // smooth activations so no kink lies within a step; Relu and MaxPool are checked alone).
    let shapes: [&[usize]; 7] = [&[2, 2, 7, 7], &[3, 2, 3, 3], &[3], &[3], &[3], &[3, 1, 3, 3], &[4, 3]];
    for lowering in [ConvWeightGrad::Transposed, ConvWeightGrad::Im2col, ConvWeightGrad::Shifted] {
        FdCheck::f32().run(1300, &shapes, |g, p| {
            let rm = g.buffer("rm", &[3], vec![0.0; 3]).unwrap();
            let rv = g.buffer("rv", &[3], vec![1.0; 3]).unwrap();
            let c1 =
                g.conv(p[0], p[1], Some(p[2]), Conv2d { pad: 1, weight_grad: lowering, ..Default::default() }).unwrap();
            let bn = g.batch_norm_train(c1, p[3], p[4], rm, rv, BatchNorm::default()).unwrap();
            let a = g.sigmoid(bn.y).unwrap();
            let dw = Conv2d { stride: 2, pad: 1, groups: 3, weight_grad: lowering, ..Default::default() };
            let c2 = g.conv(a, p[5], None, dw).unwrap();
            let pooled = g.global_avg_pool(c2).unwrap();
            let f = g.flatten(pooled, 1).unwrap();
            g.linear(f, p[6], None).unwrap()
        });
    }
}

#[test]
fn depthwise_dense_equals_the_grouped_conv_and_has_exact_gradients() {
    use crate::graph::testutil::{conv_ref, rng, uniform};
    // (n, c, h, w, k, stride, pads [top, left, bottom, right]): Lite's stride-1 5x5 and 3x3 on
    // 4x4 maps, its strided 5x5 with TF-SAME's uneven pads on 8x8, a non-square map.
    type Case = (usize, usize, usize, usize, usize, usize, [usize; 4]);
    let cases: [Case; 4] = [
        (2, 3, 4, 4, 5, 1, [2, 2, 2, 2]),
        (2, 2, 4, 4, 3, 1, [1, 1, 1, 1]),
        (1, 3, 8, 8, 5, 2, [1, 1, 2, 2]),
        (2, 2, 3, 5, 3, 1, [1, 0, 1, 2]),
    ];
    for (i, &(n, c, h, w, k, stride, pads)) in cases.iter().enumerate() {
        // Forward against the plain-Rust reference on the explicitly padded input (f64).
        let mut r = rng(900 + i as u64);
        let x = uniform(&mut r, DType::F64, &[n, c, h, w]);
        let wt = uniform(&mut r, DType::F64, &[c, 1, k, k]);
        let (ph, pw) = (h + pads[0] + pads[2], w + pads[1] + pads[3]);
        let xa = x.as_f64().unwrap();
        let mut padded = ndarray::ArrayD::<f64>::zeros(vec![n, c, ph, pw]);
        for ((b, ch, y, z), v) in xa.view().into_dimensionality::<ndarray::Ix4>().unwrap().indexed_iter() {
            padded[[b, ch, y + pads[0], z + pads[1]]] = *v;
        }
        let want = conv_ref(&padded, wt.as_f64().unwrap(), stride, 0, 1, c);
        let mut g = Graph::new();
        let (xv, wv) =
            (g.input("x", DType::F64, &[n, c, h, w]).unwrap(), g.input("w", DType::F64, &[c, 1, k, k]).unwrap());
        let y = g.depthwise_dense(xv, wv, stride, pads).unwrap();
        assert_eq!(g.shape(y), want.shape(), "case {i}");
        g.output("y", y).unwrap();
        let got = Runner::cpu(&g).unwrap().run(&[("x", &x), ("w", &wt)]).unwrap().get("y").unwrap().to_f64_vec();
        for (a, b) in got.iter().zip(want.iter()) {
            assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "case {i}: {a} vs {b}");
        }
        // Gradients of input and weight, through autodiff of MatMul / Transpose / Reshape.
        f64c().run(950 + i as u64, &[&[n, c, h, w], &[c, 1, k, k]], |g, v| {
            g.depthwise_dense(v[0], v[1], stride, pads).unwrap()
        });
    }
    // A weight that is not [C, 1, k, k] is refused.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[1, 4, 4, 4]).unwrap();
    let w = g.input("w", DType::F32, &[4, 2, 3, 3]).unwrap();
    assert!(g.depthwise_dense(x, w, 1, [1, 1, 1, 1]).is_err());
}
