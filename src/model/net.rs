//! Layer builders shared by the backbones and the head: parameters with seeded or pretrained
//! initial values, frozen layers as constants, Conv, BatchNorm (training or inference form), Linear.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::graph::{BatchNorm, BatchNormLowering, Conv2d, DType, DepthwiseLowering, Graph, InputKind, Tensor, Value};
use crate::{Error, Result};

/// BatchNorm form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Batch statistics, computed as the lowering says; running statistics updated (momentum
    /// 0.1) and fed back.
    Train(BatchNormLowering),
    /// Running statistics (one `BatchNormalization` node).
    Infer,
}

/// Builds layers into a graph; every parameter is a [`InputKind::Param`] input and every running
/// statistic a [`InputKind::Buffer`] input, both with their initial values — seeded random ones,
/// or the pretrained tensor of the same name when `init` is given. While frozen (see
/// [`Net::set_frozen`]) layers are built as constants of the graph with BatchNorm in inference
/// form: no gradient, no optimizer state, no feed-back.
pub(crate) struct Net<'g> {
    pub g: &'g mut Graph,
    pub mode: Mode,
    seed: u64,
    init: Option<&'g Weights>,
    frozen: bool,
    bn: BatchNorm,
    depthwise: DepthwiseLowering,
}

/// Pretrained tensors by parameter name.
pub type Weights = BTreeMap<String, Tensor>;

/// Names a pretrained start does not provide: the projection head is always new.
fn always_fresh(name: &str) -> bool {
    name.starts_with("head.")
}

/// FNV-1a, so each parameter's random stream depends only on the seed and its name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

impl<'g> Net<'g> {
    pub fn new(g: &'g mut Graph, mode: Mode, seed: u64) -> Net<'g> {
        Net { g, mode, seed, init: None, frozen: false, bn: BatchNorm::default(), depthwise: DepthwiseLowering::Auto }
    }

    /// How trained depthwise convolutions are written (training mode only).
    pub fn with_depthwise(mut self, d: DepthwiseLowering) -> Net<'g> {
        self.depthwise = d;
        self
    }

    /// Initial values from `init` (every parameter and buffer but the head's must be there).
    pub fn with_init(mut self, init: Option<&'g Weights>) -> Net<'g> {
        self.init = init;
        self
    }

    /// BatchNorm epsilon and momentum of the layers built from now on.
    pub fn set_batch_norm(&mut self, bn: BatchNorm) {
        self.bn = bn;
    }

    /// Layers built from now on are constants (`true`) or trained (`false`).
    pub fn set_frozen(&mut self, frozen: bool) {
        self.frozen = frozen;
    }

    fn rng(&self, name: &str) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(self.seed ^ name_hash(name))
    }

    /// Normal(0, std²) values.
    fn normal(&self, name: &str, n: usize, std: f64) -> Vec<f32> {
        let mut r = self.rng(name);
        (0..n).map(|_| (standard_normal(&mut r) * std) as f32).collect()
    }

    /// Uniform(-bound, bound) values.
    fn uniform(&self, name: &str, n: usize, bound: f64) -> Vec<f32> {
        let mut r = self.rng(name);
        (0..n).map(|_| r.random_range(-bound..bound) as f32).collect()
    }

    /// The initial value of `name`: the pretrained tensor (shape-checked) or `fresh()`.
    fn initial(&self, name: &str, shape: &[usize], fresh: impl FnOnce() -> Vec<f32>) -> Result<Tensor> {
        match self.init {
            Some(w) if !always_fresh(name) => {
                let t = w.get(name).ok_or_else(|| Error::ModelState {
                    name: name.into(),
                    reason: "missing from the pretrained weights".into(),
                })?;
                if t.shape() != shape || t.dtype() != DType::F32 {
                    return Err(Error::ModelState {
                        name: name.into(),
                        reason: format!(
                            "pretrained tensor is {}{:?}, the model needs f32{shape:?}",
                            t.dtype(),
                            t.shape()
                        ),
                    });
                }
                Ok(t.clone())
            }
            _ => Tensor::f32(shape, fresh()),
        }
    }

    fn state(
        &mut self,
        name: &str,
        kind: InputKind,
        shape: &[usize],
        fresh: impl FnOnce() -> Vec<f32>,
    ) -> Result<Value> {
        let t = self.initial(name, shape, fresh)?;
        if self.frozen {
            return Ok(self.g.constant(t));
        }
        self.g.input_of(name, kind, DType::F32, shape, Some(t))
    }

    /// A parameter or buffer whose initial value is given (an imported model's initializer):
    /// a graph input of `kind`, or a constant while frozen.
    pub fn given(&mut self, name: &str, kind: InputKind, t: Tensor) -> Result<Value> {
        if self.frozen {
            return Ok(self.g.constant(t));
        }
        let (dt, shape) = (t.dtype(), t.shape().to_vec());
        self.g.input_of(name, kind, dt, &shape, Some(t))
    }

    /// BatchNorm over channels with given scale, bias and running statistics (already made by
    /// [`Net::given`] or as constants): training form (statistics fed back) unless frozen or in
    /// inference mode.
    pub fn bn_with(&mut self, x: Value, [gamma, beta, rm, rv]: [Value; 4], o: BatchNorm) -> Result<Value> {
        let mode = if self.frozen { Mode::Infer } else { self.mode };
        match mode {
            Mode::Train(lowering) => {
                let out = match lowering {
                    BatchNormLowering::Fused => self.g.batch_norm_train_fused(x, gamma, beta, rm, rv, o)?,
                    BatchNormLowering::Composed => self.g.batch_norm_train(x, gamma, beta, rm, rv, o)?,
                };
                self.g.feed_back(rm, out.running_mean)?;
                self.g.feed_back(rv, out.running_var)?;
                Ok(out.y)
            }
            Mode::Infer => self.g.batch_norm_infer(x, gamma, beta, rm, rv, o.eps as f32),
        }
    }

    /// Conv without bias, weight `{name}.weight` `[cout, cin, k, k]`, Kaiming-normal
    /// (fan_out, ReLU gain: std = sqrt(2 / (cout·k·k))), as torchvision's ResNet.
    pub fn conv(&mut self, x: Value, name: &str, cout: usize, k: usize, stride: usize, pad: usize) -> Result<Value> {
        let w = self.conv_weight(x, name, cout, k, 1)?;
        self.g.conv(x, w, None, Conv2d { stride, pad, ..Default::default() })
    }

    /// Conv without bias and TensorFlow "SAME" padding (stride and groups from `c`); the weight
    /// `[cout, cin / groups, k, k]`, Kaiming-normal (fan_out) like [`Net::conv`].
    pub fn conv_same(&mut self, x: Value, name: &str, cout: usize, k: usize, c: Conv2d) -> Result<Value> {
        let w = self.conv_weight(x, name, cout, k, c.groups.max(1))?;
        let sx = self.g.shape(x).to_vec();
        let (t, b) = crate::graph::tf_same_pads(sx[2], k, c.stride);
        let (l, r) = crate::graph::tf_same_pads(sx[3], k, c.stride);
        self.conv_padded(x, w, None, c, [t, l, b, r])
    }

    /// A convolution with explicit pads `[top, left, bottom, right]` (`c.pad` is ignored): one
    /// Conv node, after a zero Pad when the pads differ.
    ///
    /// A trained depthwise convolution (weight a parameter, `[C, 1, k, k]`, groups = C) on a map
    /// of at most [`crate::graph::DENSE_DEPTHWISE_MAX_PIXELS`] pixels is written as dense
    /// per-channel matrices instead ([`Graph::depthwise_dense`], unless
    /// [`Net::with_depthwise`] said `Conv`): the same function, much faster through ONNX
    /// Runtime's CPU provider in a training step. Frozen and inference-form layers keep the Conv
    /// node, whose constant weights reach ORT's fast kernels.
    pub fn conv_padded(&mut self, x: Value, w: Value, b: Option<Value>, c: Conv2d, pads: [usize; 4]) -> Result<Value> {
        if self.dense_depthwise(x, w, c) {
            let y = self.g.depthwise_dense(x, w, c.stride, pads)?;
            return match b {
                Some(b) => {
                    let channels = self.g.shape(b)[0];
                    let b4 = self.g.reshape_to(b, &[1, channels, 1, 1])?;
                    self.g.add(y, b4)
                }
                None => Ok(y),
            };
        }
        let [t, l, bo, r] = pads;
        if t == l && t == bo && t == r {
            return self.g.conv(x, w, b, Conv2d { pad: t, ..c });
        }
        let p = self.g.pad(x, &[0, 0, t, l, 0, 0, bo, r])?;
        self.g.conv(p, w, b, Conv2d { pad: 0, ..c })
    }

    fn dense_depthwise(&self, x: Value, w: Value, c: Conv2d) -> bool {
        let (sx, sw) = (self.g.shape(x), self.g.shape(w));
        sx.len() == 4
            && sw.len() == 4
            && c.groups > 1
            && c.groups == sx[1]
            && sw[0] == c.groups
            && sw[1] == 1
            && c.dilation == 1
            && self.depthwise == DepthwiseLowering::Auto
            && matches!(self.mode, Mode::Train(_))
            && self.g.input_info(w).is_some_and(|i| i.kind == InputKind::Param)
            && sx[2] * sx[3] <= crate::graph::DENSE_DEPTHWISE_MAX_PIXELS
    }

    fn conv_weight(&mut self, x: Value, name: &str, cout: usize, k: usize, groups: usize) -> Result<Value> {
        let cin = self.g.shape(x)[1] / groups;
        let wname = format!("{name}.weight");
        // PyTorch's fan_out of a [cout, cin/groups, k, k] weight is cout·k·k, groups or not.
        let std = (2.0 / (cout * k * k) as f64).sqrt();
        let init = if self.init.is_some() { vec![] } else { self.normal(&wname, cout * cin * k * k, std) };
        self.state(&wname, InputKind::Param, &[cout, cin, k, k], || init)
    }

    /// BatchNorm over channels: `{name}.weight` = 1, `{name}.bias` = 0, running mean 0 / var 1,
    /// eps and momentum as set (PyTorch's defaults 1e-5 and 0.1 unless
    /// [`Net::set_batch_norm`] said otherwise). Frozen layers use the inference form.
    pub fn bn(&mut self, x: Value, name: &str) -> Result<Value> {
        let c = self.g.shape(x)[1];
        let gamma = self.state(&format!("{name}.weight"), InputKind::Param, &[c], || vec![1.0; c])?;
        let beta = self.state(&format!("{name}.bias"), InputKind::Param, &[c], || vec![0.0; c])?;
        let rm = self.state(&format!("{name}.running_mean"), InputKind::Buffer, &[c], || vec![0.0; c])?;
        let rv = self.state(&format!("{name}.running_var"), InputKind::Buffer, &[c], || vec![1.0; c])?;
        let o = self.bn;
        self.bn_with(x, [gamma, beta, rm, rv], o)
    }

    /// `relu(bn(conv(x)))`.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_bn_relu(
        &mut self,
        x: Value,
        conv: &str,
        bn: &str,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Value> {
        let y = self.conv(x, conv, cout, k, stride, pad)?;
        let y = self.bn(y, bn)?;
        self.g.relu(y)
    }

    /// Linear with bias, PyTorch's default init: weight and bias Uniform(±1/sqrt(fan_in))
    /// (`kaiming_uniform_(a=sqrt(5))` reduces to that bound).
    pub fn linear(&mut self, x: Value, name: &str, out: usize) -> Result<Value> {
        let fan_in = self.g.shape(x)[1];
        let bound = 1.0 / (fan_in as f64).sqrt();
        let (wn, bn) = (format!("{name}.weight"), format!("{name}.bias"));
        let wi = self.uniform(&wn, out * fan_in, bound);
        let bi = self.uniform(&bn, out, bound);
        let w = self.state(&wn, InputKind::Param, &[out, fan_in], || wi)?;
        let b = self.state(&bn, InputKind::Param, &[out], || bi)?;
        self.g.linear(x, w, Some(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inits_are_seeded_per_name_with_the_right_spread() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[1, 64, 4, 4]).unwrap();
        let mut net = Net::new(&mut g, Mode::Train(BatchNormLowering::Fused), 7);
        net.conv(x, "c", 128, 3, 1, 1).unwrap();
        let f = net.g.flatten(x, 1).unwrap();
        net.linear(f, "fc", 10).unwrap();
        let init = |g: &Graph, n: &str| g.input_info(g.find(n).unwrap()).unwrap().init.clone().unwrap().to_f64_vec();
        // Kaiming normal, fan_out: std = sqrt(2 / (128·9)); 73,728 draws, so the sample std is
        // within 2% and the mean within 3 standard errors.
        let w = init(&g, "c.weight");
        let mean = w.iter().sum::<f64>() / w.len() as f64;
        let std = (w.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        let want = (2.0 / (128.0 * 9.0f64)).sqrt();
        assert!((std / want - 1.0).abs() < 0.02, "std {std} vs {want}");
        assert!(mean.abs() < 3.0 * want / (w.len() as f64).sqrt(), "mean {mean}");
        // Linear: uniform within ±1/sqrt(fan_in), and reaching near the bound.
        let bound = 1.0 / (1024.0f64).sqrt();
        let lw = init(&g, "fc.weight");
        assert!(lw.iter().all(|v| v.abs() <= bound) && lw.iter().any(|v| v.abs() > 0.95 * bound));
        // Same seed and name, same values; another seed, other values.
        let mut g2 = Graph::new();
        let x2 = g2.input("x", DType::F32, &[1, 64, 4, 4]).unwrap();
        Net::new(&mut g2, Mode::Infer, 7).conv(x2, "c", 128, 3, 1, 1).unwrap();
        assert_eq!(init(&g2, "c.weight"), w);
        let mut g3 = Graph::new();
        let x3 = g3.input("x", DType::F32, &[1, 64, 4, 4]).unwrap();
        Net::new(&mut g3, Mode::Infer, 8).conv(x3, "c", 128, 3, 1, 1).unwrap();
        assert_ne!(init(&g3, "c.weight"), w);
    }
}
