//! ResNet backbones: `resnet-mini`, and torchvision's ResNet-18 / ResNet-50 without `fc`.

use super::Arch;
use super::Span;
use super::net::Net;
use crate::Result;
use crate::graph::{Pool2d, Value};

/// torchvision's BasicBlock: conv3x3(stride) BN ReLU conv3x3 BN, plus the identity or a
/// 1x1-conv(stride) + BN downsample, then ReLU.
fn basic_block(net: &mut Net, x: Value, name: &str, planes: usize, stride: usize) -> Result<Value> {
    let cin = net.g.shape(x)[1];
    let y = net.conv_bn_relu(x, &format!("{name}.conv1"), &format!("{name}.bn1"), planes, 3, stride, 1)?;
    let y = net.conv(y, &format!("{name}.conv2"), planes, 3, 1, 1)?;
    let y = net.bn(y, &format!("{name}.bn2"))?;
    let skip = shortcut(net, x, name, cin, planes, stride)?;
    let s = net.g.add(y, skip)?;
    net.g.relu(s)
}

/// torchvision's Bottleneck (v1.5: stride on the 3x3): 1x1 → 3x3(stride) → 1x1 (x4), each with
/// BN, ReLU between, plus identity / downsample, then ReLU.
fn bottleneck(net: &mut Net, x: Value, name: &str, planes: usize, stride: usize) -> Result<Value> {
    let cin = net.g.shape(x)[1];
    let y = net.conv_bn_relu(x, &format!("{name}.conv1"), &format!("{name}.bn1"), planes, 1, 1, 0)?;
    let y = net.conv_bn_relu(y, &format!("{name}.conv2"), &format!("{name}.bn2"), planes, 3, stride, 1)?;
    let y = net.conv(y, &format!("{name}.conv3"), planes * 4, 1, 1, 0)?;
    let y = net.bn(y, &format!("{name}.bn3"))?;
    let skip = shortcut(net, x, name, cin, planes * 4, stride)?;
    let s = net.g.add(y, skip)?;
    net.g.relu(s)
}

fn shortcut(net: &mut Net, x: Value, name: &str, cin: usize, cout: usize, stride: usize) -> Result<Value> {
    if stride == 1 && cin == cout {
        return Ok(x);
    }
    let d = net.conv(x, &format!("{name}.downsample.0"), cout, 1, stride, 0)?;
    net.bn(d, &format!("{name}.downsample.1"))
}

/// The backbone: images `[B, 3, S, S]` → pooled feature `[B, arch.feature_dim()]`, or the part
/// of it `span` names; the first `freeze` units (stem, layer1, ...) are built frozen.
pub(crate) fn backbone(net: &mut Net, arch: Arch, x: Value, freeze: usize, span: Span) -> Result<Value> {
    let mut y = x;
    match arch {
        Arch::ResnetMini => {
            if span.builds(0) {
                net.set_frozen(freeze > 0);
                y = net.conv_bn_relu(y, "conv1", "bn1", 32, 3, 2, 1)?;
            }
            for (i, (planes, stride)) in [(32, 1), (64, 2), (128, 2)].into_iter().enumerate() {
                if span.builds(i + 1) {
                    net.set_frozen(freeze > i + 1);
                    y = basic_block(net, y, &format!("layer{}.0", i + 1), planes, stride)?;
                }
            }
        }
        _ => {
            if span.builds(0) {
                net.set_frozen(freeze > 0);
                y = net.conv_bn_relu(y, "conv1", "bn1", 64, 7, 2, 3)?;
                y = net.g.max_pool(y, Pool2d { kernel: 3, stride: 2, pad: 1 })?;
            }
            let blocks = if arch == Arch::Resnet18 { [2, 2, 2, 2] } else { [3, 4, 6, 3] };
            for (stage, (&n, planes)) in blocks.iter().zip([64, 128, 256, 512]).enumerate() {
                if !span.builds(stage + 1) {
                    continue;
                }
                net.set_frozen(freeze > stage + 1);
                for b in 0..n {
                    let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                    let name = format!("layer{}.{b}", stage + 1);
                    y = if arch == Arch::Resnet18 {
                        basic_block(net, y, &name, planes, stride)?
                    } else {
                        bottleneck(net, y, &name, planes, stride)?
                    };
                }
            }
        }
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
    use crate::graph::InputKind;
    use crate::model::{Arch, ModelConfig, inference_graph};

    /// (backbone parameters, head parameters, buffers) of the inference graph.
    fn counts(arch: Arch, size: usize) -> (usize, usize, usize) {
        let g = inference_graph(&ModelConfig::new(arch, size, 0), 1).unwrap();
        let (mut backbone, mut head, mut buffers) = (0, 0, 0);
        for i in g.inputs() {
            let info = g.info(i.value);
            match i.kind {
                InputKind::Param if info.name.starts_with("head.") => head += info.numel(),
                InputKind::Param => backbone += info.numel(),
                InputKind::Buffer => buffers += info.numel(),
                _ => {}
            }
        }
        (backbone, head, buffers)
    }

    #[test]
    fn resnet18_and_resnet50_have_torchvisions_parameter_counts() {
        // torchvision resnet18 / resnet50 have 11,689,512 / 25,557,032 parameters; without `fc`
        // (512·1000 + 1000 / 2048·1000 + 1000) that leaves these.
        assert_eq!(counts(Arch::Resnet18, 32).0, 11_689_512 - 513_000);
        assert_eq!(counts(Arch::Resnet50, 32).0, 25_557_032 - 2_049_000);
    }

    #[test]
    fn resnet_mini_matches_its_spec() {
        // Counted from the spec: conv weights (cout·cin·k²) and BN weight + bias (2·c).
        let conv = |cin: usize, cout: usize, k: usize| cout * cin * k * k;
        let bn = |c: usize| 2 * c;
        let stem = conv(3, 32, 3) + bn(32);
        let layer1 = conv(32, 32, 3) + bn(32) + conv(32, 32, 3) + bn(32);
        let layer2 = conv(32, 64, 3) + bn(64) + conv(64, 64, 3) + bn(64) + conv(32, 64, 1) + bn(64);
        let layer3 = conv(64, 128, 3) + bn(128) + conv(128, 128, 3) + bn(128) + conv(64, 128, 1) + bn(128);
        let (backbone, head, buffers) = counts(Arch::ResnetMini, 16);
        assert_eq!(backbone, stem + layer1 + layer2 + layer3);
        assert_eq!(head, 128 * 128 + 128 + 128 * 128 + 128);
        // running mean + var for every BN: half the BN parameters' count... per channel, 2 each.
        let bn_channels = 32 + 32 + 32 + 64 * 3 + 128 * 3;
        assert_eq!(buffers, 2 * bn_channels);
    }

    #[test]
    fn resnet_mini_shapes_and_names() {
        let g =
            inference_graph(&ModelConfig { embed_dim: 16, ..ModelConfig::new(Arch::ResnetMini, 32, 1) }, 2).unwrap();
        let out = g.find("embeddings").unwrap();
        assert_eq!(g.shape(out), [2, 16]);
        for name in [
            "conv1.weight",
            "bn1.running_var",
            "layer1.0.conv2.weight",
            "layer2.0.downsample.0.weight",
            "layer3.0.downsample.1.bias",
            "head.fc1.weight",
            "head.fc2.bias",
        ] {
            assert!(g.find(name).is_some(), "{name}");
        }
        assert!(g.find("layer1.0.downsample.0.weight").is_none(), "layer1 keeps the identity");
        assert_eq!(g.shape(g.find("layer2.0.conv1.weight").unwrap()), [64, 32, 3, 3]);
        assert_eq!(g.shape(g.find("head.fc2.weight").unwrap()), [16, 128]);
        // No max pooling in resnet-mini.
        assert!(g.nodes().iter().all(|n| n.op != "MaxPool"));
    }
}
