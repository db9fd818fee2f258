//! Neural-network builders: MatMul, Gemm / linear, Conv, ConvTranspose, pooling, and BatchNorm
//! (training form composed from basic ops so autodiff covers it; inference form as one node).

use super::ir::{Attr, Composite, CompositeKind, ConvWeightGrad, DType, Graph, Tensor, Value};
use super::ops::{broadcast, shape_err, to_i64, type_err};
use crate::Result;

/// A 2-D convolution's geometry (same in both spatial dimensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2d {
    pub stride: usize,
    pub pad: usize,
    pub dilation: usize,
    pub groups: usize,
    /// How autodiff lowers this convolution's weight gradient.
    pub weight_grad: ConvWeightGrad,
}

impl Default for Conv2d {
    fn default() -> Self {
        Conv2d { stride: 1, pad: 0, dilation: 1, groups: 1, weight_grad: ConvWeightGrad::Auto }
    }
}

/// The largest input map (`H * W` pixels) on which a trained depthwise convolution is written
/// as dense per-channel matrices ([`Graph::depthwise_dense`]) instead of a grouped Conv: 8 x 8.
/// The dense form costs `H*W / k^2` times the arithmetic of the direct one (2.6x at 8 x 8 with a
/// 5 x 5 kernel), still far below what ORT's grouped Conv and its gradients cost on such maps.
pub const DENSE_DEPTHWISE_MAX_PIXELS: usize = 64;

/// TensorFlow "SAME" padding of one spatial side: `(begin, end)` for input `n`, kernel `k`,
/// stride `s` (the extra pixel of an odd total goes at the end).
pub fn tf_same_pads(n: usize, k: usize, s: usize) -> (usize, usize) {
    let out = n.div_ceil(s.max(1));
    let total = ((out.saturating_sub(1)) * s + k).saturating_sub(n);
    (total / 2, total - total / 2)
}

/// A 2-D transposed convolution (the input gradient of [`Conv2d`]); all pairs are (h, w), pads
/// are `[top, left, bottom, right]` as in ONNX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvTranspose2d {
    pub strides: [usize; 2],
    pub pads: [usize; 4],
    pub dilations: [usize; 2],
    pub group: usize,
    pub output_padding: [usize; 2],
}

/// A 2-D pooling window (floor mode; padding counts as -inf for max pooling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2d {
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

/// `Gemm` options: `alpha * op(A) op(B) + beta * C`, `op` transposing when asked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    pub alpha: f32,
    pub beta: f32,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl Default for Gemm {
    fn default() -> Self {
        Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: false }
    }
}

/// BatchNorm options, PyTorch semantics (`momentum` weighs the new batch statistic).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNorm {
    pub eps: f64,
    pub momentum: f64,
}

impl Default for BatchNorm {
    fn default() -> Self {
        BatchNorm { eps: 1e-5, momentum: 0.1 }
    }
}

/// Outputs of [`Graph::batch_norm_train`].
#[derive(Debug, Clone, Copy)]
pub struct BatchNormOut {
    /// The normalised, scaled and shifted activations.
    pub y: Value,
    /// Updated running mean and (unbiased) running variance, shape `[C]`.
    pub running_mean: Value,
    pub running_var: Value,
}

/// Output size of a convolution / pooling window along one dimension.
fn window_out(op: &str, x: &[usize], n: usize, k: usize, s: usize, p: (usize, usize), d: usize) -> Result<usize> {
    let span = d * (k - 1) + 1;
    if s == 0 || n + p.0 + p.1 < span {
        return Err(shape_err(
            op,
            format!("input {x:?} is smaller than the window (kernel {k}, dilation {d}, padding {p:?}, stride {s})"),
        ));
    }
    Ok((n + p.0 + p.1 - span) / s + 1)
}

impl Graph {
    fn require_float(&self, op: &str, v: Value) -> Result<DType> {
        let d = self.dtype(v);
        if !d.is_float() {
            return Err(type_err(op, format!("operand is {d}{:?}, needs f32 or f64", self.shape(v))));
        }
        Ok(d)
    }

    fn same_float(&self, op: &str, a: Value, b: Value) -> Result<DType> {
        let d = self.require_float(op, a)?;
        if self.dtype(b) != d {
            return Err(type_err(
                op,
                format!("operands are {d}{:?} and {}{:?}", self.shape(a), self.dtype(b), self.shape(b)),
            ));
        }
        Ok(d)
    }

    /// Matrix product over the last two dimensions, batch dimensions broadcast (both rank >= 2).
    pub fn matmul(&mut self, a: Value, b: Value) -> Result<Value> {
        let dt = self.same_float("MatMul", a, b)?;
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        if sa.len() < 2 || sb.len() < 2 || sa[sa.len() - 1] != sb[sb.len() - 2] {
            return Err(shape_err("MatMul", format!("shapes {sa:?} and {sb:?} do not multiply")));
        }
        let mut out = broadcast("MatMul", &sa[..sa.len() - 2], &sb[..sb.len() - 2])?;
        out.extend([sa[sa.len() - 2], sb[sb.len() - 1]]);
        Ok(self.push1("MatMul", vec![a, b], vec![], dt, out))
    }

    /// `alpha * op(a) op(b) + beta * c` for 2-D `a`, `b`; `c` broadcasts to the product's shape.
    pub fn gemm(&mut self, a: Value, b: Value, c: Option<Value>, o: Gemm) -> Result<Value> {
        let dt = self.same_float("Gemm", a, b)?;
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        if sa.len() != 2 || sb.len() != 2 {
            return Err(shape_err("Gemm", format!("operands {sa:?} and {sb:?} are not both 2-D")));
        }
        let (m, k) = if o.trans_a { (sa[1], sa[0]) } else { (sa[0], sa[1]) };
        let (k2, n) = if o.trans_b { (sb[1], sb[0]) } else { (sb[0], sb[1]) };
        if k != k2 {
            return Err(shape_err(
                "Gemm",
                format!("shapes {sa:?} (trans {}) and {sb:?} (trans {}) do not multiply", o.trans_a, o.trans_b),
            ));
        }
        let mut inputs = vec![a, b];
        if let Some(c) = c {
            self.same_float("Gemm", a, c)?;
            let sc = self.shape(c).to_vec();
            if broadcast("Gemm", &sc, &[m, n])? != [m, n] {
                return Err(shape_err(
                    "Gemm",
                    format!("bias {sc:?} does not broadcast to the product's shape {:?}", [m, n]),
                ));
            }
            inputs.push(c);
        }
        let attrs = vec![
            ("alpha", Attr::Float(o.alpha)),
            ("beta", Attr::Float(o.beta)),
            ("transA", Attr::Int(o.trans_a as i64)),
            ("transB", Attr::Int(o.trans_b as i64)),
        ];
        Ok(self.push1("Gemm", inputs, attrs, dt, vec![m, n]))
    }

    /// A fully connected layer in PyTorch layout: `x [N, in] · wᵀ + b`, `w [out, in]`, `b [out]`.
    pub fn linear(&mut self, x: Value, w: Value, b: Option<Value>) -> Result<Value> {
        self.gemm(x, w, b, Gemm { trans_b: true, ..Gemm::default() })
    }

    /// 2-D convolution: `x [N, C, H, W]`, `w [M, C/groups, kh, kw]`, optional bias `b [M]`.
    pub fn conv(&mut self, x: Value, w: Value, b: Option<Value>, c: Conv2d) -> Result<Value> {
        let dt = self.same_float("Conv", x, w)?;
        let (sx, sw) = (self.shape(x).to_vec(), self.shape(w).to_vec());
        if sx.len() != 4 || sw.len() != 4 {
            return Err(shape_err("Conv", format!("input {sx:?} and weight {sw:?} must both be 4-D")));
        }
        let g = c.groups.max(1);
        if sx[1] != sw[1] * g || sw[0] % g != 0 {
            return Err(shape_err("Conv", format!("input {sx:?} and weight {sw:?} do not fit with groups={g}")));
        }
        let p = (c.pad, c.pad);
        let ho = window_out("Conv", &sx, sx[2], sw[2], c.stride, p, c.dilation)?;
        let wo = window_out("Conv", &sx, sx[3], sw[3], c.stride, p, c.dilation)?;
        let mut inputs = vec![x, w];
        if let Some(b) = b {
            self.same_float("Conv", x, b)?;
            if self.shape(b) != [sw[0]] {
                return Err(shape_err("Conv", format!("bias {:?} does not match weight {sw:?}", self.shape(b))));
            }
            inputs.push(b);
        }
        let attrs = vec![
            ("kernel_shape", Attr::Ints(to_i64(&sw[2..]))),
            ("strides", Attr::Ints(vec![c.stride as i64; 2])),
            ("pads", Attr::Ints(vec![c.pad as i64; 4])),
            ("dilations", Attr::Ints(vec![c.dilation as i64; 2])),
            ("group", Attr::Int(g as i64)),
        ];
        let y = self.push1("Conv", inputs, attrs, dt, vec![sx[0], sw[0], ho, wo]);
        let node = self.nodes.len() - 1;
        self.node_mut(node).weight_grad = c.weight_grad;
        Ok(y)
    }

    /// Convolution with TensorFlow's "SAME" padding (as EfficientNet-Lite's TF-trained weights
    /// expect): output side `ceil(in / stride)`, total padding `max((out-1)·stride + k - in, 0)`,
    /// the odd pixel at the bottom / right. Symmetric cases are one Conv; asymmetric ones (stride
    /// 2 on even sides) a zero Pad then a Conv without padding. `c.pad` is ignored.
    pub fn conv_tf_same(&mut self, x: Value, w: Value, b: Option<Value>, c: Conv2d) -> Result<Value> {
        let (sx, sw) = (self.shape(x).to_vec(), self.shape(w).to_vec());
        if sx.len() != 4 || sw.len() != 4 || c.dilation != 1 {
            return Err(shape_err(
                "Conv",
                format!("SAME padding needs 4-D input {sx:?} and weight {sw:?}, dilation 1"),
            ));
        }
        let (t, bot) = tf_same_pads(sx[2], sw[2], c.stride);
        let (l, r) = tf_same_pads(sx[3], sw[3], c.stride);
        if t == bot && l == r && t == l {
            return self.conv(x, w, b, Conv2d { pad: t, ..c });
        }
        let padded = self.pad(x, &[0, 0, t, l, 0, 0, bot, r])?;
        self.conv(padded, w, b, Conv2d { pad: 0, ..c })
    }

    /// A depthwise convolution (one `k x k` filter per channel: `w [C, 1, kh, kw]`, groups = C)
    /// with explicit pads `[top, left, bottom, right]`, written as one dense spatial matrix per
    /// channel: `M[c] = sum over taps t of w[c, t] * S_t`, where the constant 0/1 matrix `S_t`
    /// `[Hi*Wi, Ho*Wo]` says which input pixel tap `t` of each output pixel reads (padding,
    /// stride), and `y[n, c] = x[n, c] M[c]` as one batched MatMul over channels. Only
    /// MatMul, Reshape and Transpose: their gradients are batched MatMuls too.
    ///
    /// ONNX Runtime's CPU provider runs a grouped Conv whose weights are graph inputs (a
    /// training step's) as one tiny GEMM per group, and its gradients as an unfold Conv and a
    /// grouped ConvTranspose no faster: on EfficientNet-Lite0's 4 x 4 maps with 1152 channels
    /// those took about 250 ms per layer and step (64 images), two thirds of the trainable
    /// part's time. The dense form multiplies `Hi*Wi / (kh*kw)` times the arithmetic, which is
    /// a good trade only on small maps; [`DENSE_DEPTHWISE_MAX_PIXELS`] bounds `Hi*Wi`.
    pub fn depthwise_dense(&mut self, x: Value, w: Value, stride: usize, pads: [usize; 4]) -> Result<Value> {
        let dt = self.same_float("Conv", x, w)?;
        let (sx, sw) = (self.shape(x).to_vec(), self.shape(w).to_vec());
        if sx.len() != 4 || sw.len() != 4 || sw[1] != 1 || sx[1] != sw[0] || stride == 0 {
            return Err(shape_err("Conv", format!("depthwise: input {sx:?} and weight {sw:?} (want [C, 1, kh, kw])")));
        }
        let (n, c, hi, wi, kh, kw) = (sx[0], sx[1], sx[2], sx[3], sw[2], sw[3]);
        let (ph, pw) = (hi + pads[0] + pads[2], wi + pads[1] + pads[3]);
        if ph < kh || pw < kw {
            return Err(shape_err(
                "Conv",
                format!("depthwise: kernel {kh}x{kw} larger than the padded {ph}x{pw} input"),
            ));
        }
        let (ho, wo) = ((ph - kh) / stride + 1, (pw - kw) / stride + 1);
        let (pin, pout, taps) = (hi * wi, ho * wo, kh * kw);
        let mut s = vec![0f64; taps * pin * pout];
        for (a, b) in (0..kh).flat_map(|a| (0..kw).map(move |b| (a, b))) {
            let t = a * kw + b;
            for (oy, ox) in (0..ho).flat_map(|oy| (0..wo).map(move |ox| (oy, ox))) {
                let (iy, ix) =
                    ((oy * stride + a) as isize - pads[0] as isize, (ox * stride + b) as isize - pads[1] as isize);
                if (0..hi as isize).contains(&iy) && (0..wi as isize).contains(&ix) {
                    s[(t * pin + iy as usize * wi + ix as usize) * pout + oy * wo + ox] = 1.0;
                }
            }
        }
        let s = Tensor::f64(&[taps, pin * pout], s)?.cast(dt);
        let s = self.constant(s);
        let w2 = self.reshape_to(w, &[c, taps])?;
        let m = self.matmul(w2, s)?;
        let m = self.reshape_to(m, &[c, pin, pout])?;
        let xs = self.reshape_to(x, &[n, c, pin])?;
        let xt = self.transpose(xs, &[1, 0, 2])?;
        let y = self.matmul(xt, m)?;
        let y = self.transpose(y, &[1, 0, 2])?;
        self.reshape_to(y, &[n, c, ho, wo])
    }

    /// 2-D transposed convolution: `x [N, M, H, W]`, `w [M, C/group, kh, kw]` -> `[N, C, H', W']`.
    pub fn conv_transpose(&mut self, x: Value, w: Value, c: ConvTranspose2d) -> Result<Value> {
        let dt = self.same_float("ConvTranspose", x, w)?;
        let (sx, sw) = (self.shape(x).to_vec(), self.shape(w).to_vec());
        if sx.len() != 4 || sw.len() != 4 || sx[1] != sw[0] || sw[0] % c.group.max(1) != 0 {
            return Err(shape_err(
                "ConvTranspose",
                format!("input {sx:?} and weight {sw:?} do not fit with group={}", c.group),
            ));
        }
        let mut out = vec![sx[0], sw[1] * c.group.max(1)];
        for i in 0..2 {
            let full = c.strides[i] * (sx[2 + i] - 1) + c.output_padding[i] + c.dilations[i] * (sw[2 + i] - 1) + 1;
            let pads = c.pads[i] + c.pads[i + 2];
            if full <= pads || c.output_padding[i] >= c.strides[i].max(c.dilations[i]) {
                return Err(shape_err("ConvTranspose", format!("input {sx:?}, weight {sw:?}: bad geometry {c:?}")));
            }
            out.push(full - pads);
        }
        let attrs = vec![
            ("kernel_shape", Attr::Ints(to_i64(&sw[2..]))),
            ("strides", Attr::Ints(to_i64(&c.strides))),
            ("pads", Attr::Ints(to_i64(&c.pads))),
            ("dilations", Attr::Ints(to_i64(&c.dilations))),
            ("group", Attr::Int(c.group.max(1) as i64)),
            ("output_padding", Attr::Ints(to_i64(&c.output_padding))),
        ];
        Ok(self.push1("ConvTranspose", vec![x, w], attrs, dt, out))
    }

    fn pool_shape(&self, op: &str, x: Value, p: Pool2d) -> Result<Vec<usize>> {
        let sx = self.shape(x).to_vec();
        if sx.len() != 4 {
            return Err(shape_err(op, format!("input {sx:?} is not 4-D")));
        }
        if p.kernel == 0 || p.pad * 2 > p.kernel {
            return Err(shape_err(op, format!("padding {} is more than half the kernel {}", p.pad, p.kernel)));
        }
        let ho = window_out(op, &sx, sx[2], p.kernel, p.stride, (p.pad, p.pad), 1)?;
        let wo = window_out(op, &sx, sx[3], p.kernel, p.stride, (p.pad, p.pad), 1)?;
        Ok(vec![sx[0], sx[1], ho, wo])
    }

    fn pool_attrs(p: Pool2d) -> Vec<(&'static str, Attr)> {
        vec![
            ("kernel_shape", Attr::Ints(vec![p.kernel as i64; 2])),
            ("strides", Attr::Ints(vec![p.stride as i64; 2])),
            ("pads", Attr::Ints(vec![p.pad as i64; 4])),
        ]
    }

    /// 2-D max pooling.
    pub fn max_pool(&mut self, x: Value, p: Pool2d) -> Result<Value> {
        let dt = self.require_float("MaxPool", x)?;
        let out = self.pool_shape("MaxPool", x, p)?;
        Ok(self.push1("MaxPool", vec![x], Self::pool_attrs(p), dt, out))
    }

    /// 2-D max pooling that also returns the `Indices` output: i64 positions of each maximum in
    /// the flattened input (`[0, N*C*H*W)`).
    pub fn max_pool_with_indices(&mut self, x: Value, p: Pool2d) -> Result<(Value, Value)> {
        let dt = self.require_float("MaxPool", x)?;
        let out = self.pool_shape("MaxPool", x, p)?;
        let o = self.push_node("MaxPool", vec![x], Self::pool_attrs(p), vec![(dt, out.clone()), (DType::I64, out)]);
        Ok((o[0], o[1]))
    }

    /// Mean over the spatial dimensions: `[N, C, H, W]` -> `[N, C, 1, 1]`.
    pub fn global_avg_pool(&mut self, x: Value) -> Result<Value> {
        let dt = self.require_float("GlobalAveragePool", x)?;
        let sx = self.shape(x).to_vec();
        if sx.len() < 3 {
            return Err(shape_err("GlobalAveragePool", format!("input {sx:?} has no spatial dimensions")));
        }
        let mut out = sx.clone();
        out[2..].iter_mut().for_each(|d| *d = 1);
        Ok(self.push1("GlobalAveragePool", vec![x], vec![], dt, out))
    }

    /// `y = x * scale + bias` per channel (`scale`, `bias` shaped `[C]`) in one pass: a
    /// `BatchNormalization` node with mean 0, variance `1 - eps` and epsilon `eps = 1e-5`
    /// (cuDNN's smallest, which ORT's CUDA provider clamps smaller ones to), so that
    /// `sqrt(var + eps)` is 1 to within an ulp on every provider.
    pub fn channel_affine(&mut self, x: Value, scale: Value, bias: Value) -> Result<Value> {
        const EPS: f64 = 1e-5;
        let (c, _) = self.bn_check("BatchNormalization", x, &[scale, bias])?;
        let dt = self.dtype(x);
        let zero = self.cached_constant(Tensor::zeros(dt, &[c]));
        let var = self.cached_constant(Tensor::full(dt, &[c], 1.0 - EPS));
        let s = self.shape(x).to_vec();
        let attrs = vec![("epsilon", Attr::Float(EPS as f32))];
        Ok(self.push1("BatchNormalization", vec![x, scale, bias, zero, var], attrs, dt, s))
    }

    fn bn_check(&self, op: &str, x: Value, per_channel: &[Value]) -> Result<(usize, Vec<i64>)> {
        let sx = self.shape(x).to_vec();
        if sx.len() < 2 {
            return Err(shape_err(op, format!("input {sx:?} has no channel dimension")));
        }
        for &p in per_channel {
            self.same_float(op, x, p)?;
            if self.shape(p) != [sx[1]] {
                return Err(shape_err(
                    op,
                    format!("input {sx:?} has {} channels, parameter is {:?}", sx[1], self.shape(p)),
                ));
            }
        }
        let axes = (0..sx.len() as i64).filter(|&a| a != 1).collect();
        Ok((sx[1], axes))
    }

    /// BatchNorm in training mode over `[N, C, ...]`, composed from ReduceMean / Sub /
    /// Mul / Sqrt / Reciprocal / Add; autodiff applies BatchNorm's closed-form
    /// gradient to the composition (see [`CompositeKind`]). Normalises with the biased
    /// batch variance; returns the output and the updated running statistics (PyTorch:
    /// `r <- (1 - momentum) r + momentum * s`, the variance unbiased by `n / (n - 1)`).
    pub fn batch_norm_train(
        &mut self,
        x: Value,
        gamma: Value,
        beta: Value,
        running_mean: Value,
        running_var: Value,
        o: BatchNorm,
    ) -> Result<BatchNormOut> {
        let (c, axes) = self.bn_check("BatchNorm", x, &[gamma, beta, running_mean, running_var])?;
        let sx = self.shape(x).to_vec();
        let n: usize = sx.iter().product::<usize>() / c;
        let mut bshape = vec![1i64; sx.len()];
        bshape[1] = c as i64;
        let first = self.nodes.len();
        let mean = self.reduce_mean(x, &axes, true)?;
        let xc = self.sub(x, mean)?;
        // Mul + ReduceMean measured faster than ReduceSumSquare in ORT 1.31 CPU (7.4 vs 9.3 ms
        // on 64x64x64x64).
        let sq = self.mul(xc, xc)?;
        let var = self.reduce_mean(sq, &axes, true)?;
        let var_eps = self.add_scalar(var, o.eps)?;
        let std = self.sqrt(var_eps)?;
        let inv = self.reciprocal(std)?;
        let gr = self.reshape(gamma, &bshape)?;
        let mean_c = self.reshape(mean, &[c as i64])?;
        let var_c = self.reshape(var, &[c as i64])?;
        // The normalisation itself is one pass: BatchNormalization in inference form, fed the
        // batch statistics (instead of Mul by the scale then Add of beta).
        let y = self.batch_norm_infer(x, gamma, beta, mean_c, var_c, o.eps as f32)?;
        let kind = CompositeKind::BatchNormTrain { x, gamma, beta, y, xc, inv, gamma_b: gr, axes: axes.clone() };
        self.composites.push(Composite { first, last: self.nodes.len() - 1, kind });
        self.running_stats(y, [running_mean, running_var], [mean_c, var_c], n, o.momentum)
    }

    /// PyTorch's running-statistics update from the batch mean and biased variance (`[C]`, over
    /// `n` values each): `r <- (1 - momentum) r + momentum s`, the variance unbiased by
    /// `n / (n - 1)`.
    fn running_stats(
        &mut self,
        y: Value,
        [running_mean, running_var]: [Value; 2],
        [mean_c, var_c]: [Value; 2],
        n: usize,
        m: f64,
    ) -> Result<BatchNormOut> {
        let unbias = if n > 1 { n as f64 / (n as f64 - 1.0) } else { 1.0 };
        let rm_old = self.mul_scalar(running_mean, 1.0 - m)?;
        let rm_new = self.mul_scalar(mean_c, m)?;
        let rm = self.add(rm_old, rm_new)?;
        let rv_old = self.mul_scalar(running_var, 1.0 - m)?;
        let rv_new = self.mul_scalar(var_c, m * unbias)?;
        let rv = self.add(rv_old, rv_new)?;
        Ok(BatchNormOut { y, running_mean: rm, running_var: rv })
    }

    /// BatchNorm in training mode as one ONNX `BatchNormalization` node (`training_mode = 1`
    /// with momentum 0: the input statistics are ignored and its second and third outputs are
    /// the batch mean and biased batch variance); the running statistics are updated from those
    /// by the same small per-channel ops as [`Graph::batch_norm_train`]. Autodiff has a closed-form rule for
    /// the node, including gradients that reach the statistics.
    pub fn batch_norm_train_fused(
        &mut self,
        x: Value,
        gamma: Value,
        beta: Value,
        running_mean: Value,
        running_var: Value,
        o: BatchNorm,
    ) -> Result<BatchNormOut> {
        let (c, _) = self.bn_check("BatchNormalization", x, &[gamma, beta, running_mean, running_var])?;
        let sx = self.shape(x).to_vec();
        let n: usize = sx.iter().product::<usize>() / c;
        let dt = self.dtype(x);
        // ORT 1.31 writes the statistics outputs over the input statistics' buffers, even over
        // initializers (which its optimizer shares between nodes with equal values), so the
        // ignored inputs are computed per node: running statistics times zero.
        let zero_m = self.mul_scalar(running_mean, 0.0)?;
        let zero_v = self.mul_scalar(running_var, 0.0)?;
        let attrs = vec![
            ("epsilon", Attr::Float(o.eps as f32)),
            ("momentum", Attr::Float(0.0)),
            ("training_mode", Attr::Int(1)),
        ];
        let outs = self.push_node(
            "BatchNormalization",
            vec![x, gamma, beta, zero_m, zero_v],
            attrs,
            vec![(dt, sx), (dt, vec![c]), (dt, vec![c])],
        );
        self.running_stats(outs[0], [running_mean, running_var], [outs[1], outs[2]], n, o.momentum)
    }

    /// BatchNorm in inference form: one ONNX `BatchNormalization` node,
    /// `y = (x - mean) / sqrt(var + eps) * gamma + beta` per channel (`mean` and `var` are
    /// usually the running statistics; the training composite feeds it the batch's).
    pub fn batch_norm_infer(
        &mut self,
        x: Value,
        gamma: Value,
        beta: Value,
        mean: Value,
        var: Value,
        eps: f32,
    ) -> Result<Value> {
        self.bn_check("BatchNormalization", x, &[gamma, beta, mean, var])?;
        let (dt, s) = (self.dtype(x), self.shape(x).to_vec());
        Ok(self.push1(
            "BatchNormalization",
            vec![x, gamma, beta, mean, var],
            vec![("epsilon", Attr::Float(eps))],
            dt,
            s,
        ))
    }
}
