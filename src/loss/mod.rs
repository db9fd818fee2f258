//! Hierarchical contrastive losses and baselines: shared options and the plain-Rust f64
//! reference (the ONNX graph version is tested against it).

pub mod options;
pub mod reference;

pub use options::{Dedup, LossKind, LossOptions, Normalize, Penalty};
