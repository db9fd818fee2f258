//! Backbones (ResNet family), projection head, the training step graph and inference export.
//!
//! [`ModelConfig`] names a backbone ([`Arch`]), the input side, the embedding width and the seed
//! of the initial parameters. From it:
//! - [`step_graph`] builds one training step — forward in training mode, the caller's loss
//!   fragment, gradients and optimizer update — as one graph ([`StepGraph`]);
//! - [`inference_graph`] builds the forward pass with BatchNorm in inference form, with the same
//!   parameter and buffer names;
//! - [`export()`] writes that inference graph with trained values as `model.onnx` plus its
//!   [`ModelMeta`](crate::encoder::ModelMeta) description, readable by
//!   [`OrtEncoder`](crate::encoder::OrtEncoder).
//!
//! Names follow torchvision (`conv1.weight`, `bn1.running_mean`, `layer2.0.conv1.weight`,
//! `layer2.0.downsample.0.weight`, ...), the head is `head.fc1.*`, `head.fc2.*`; parameters a
//! loss adds must start with [`LOSS_PREFIX`] so export leaves them out.

mod export;
mod head;
mod net;
mod resnet;
mod step;

pub use export::{IMAGENET_MEAN, IMAGENET_STD, export, state_digest};
/// Tiny configurations, a test loss and batches for other modules' tests.
#[cfg(test)]
pub(crate) use step::tests as testing;
pub use step::{LOSS_PREFIX, LossParts, StepGraph, inference_graph, step_graph};

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
}

impl Arch {
    /// The CLI / model.json name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::ResnetMini => "resnet-mini",
            Arch::Resnet18 => "resnet18",
            Arch::Resnet50 => "resnet50",
        }
    }

    /// Width of the pooled backbone feature (the head's input).
    pub fn feature_dim(self) -> usize {
        match self {
            Arch::ResnetMini => 128,
            Arch::Resnet18 => 512,
            Arch::Resnet50 => 2048,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What model to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Side of the square input images in pixels.
    pub image_size: usize,
    /// Width of the L2-normalised embedding (the head's output); the paper uses 128.
    pub embed_dim: usize,
    /// Seed of the initial parameters (each parameter draws from its own stream keyed by its name).
    pub seed: u64,
}

impl ModelConfig {
    /// A configuration with the paper's 128-d embedding.
    pub fn new(arch: Arch, image_size: usize, seed: u64) -> ModelConfig {
        ModelConfig { arch, image_size, embed_dim: 128, seed }
    }
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::*;

    #[test]
    fn arch_names_agree_in_cli_json_and_display() {
        for a in [Arch::ResnetMini, Arch::Resnet18, Arch::Resnet50] {
            assert_eq!(serde_json::to_string(&a).unwrap(), format!("\"{}\"", a.name()));
            assert_eq!(Arch::from_str(a.name(), false).unwrap(), a);
            assert_eq!(a.to_string(), a.name());
        }
        assert_eq!(Arch::ResnetMini.name(), "resnet-mini");
    }
}
