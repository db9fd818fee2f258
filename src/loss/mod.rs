//! Hierarchical contrastive losses and baselines: shared options, the plain-Rust f64 reference,
//! the graph version built on `crate::graph` (tested against the reference) and its export.

pub mod export;
pub mod graph;
pub mod options;
pub mod reference;

pub use export::{LossShape, export_graph, export_loss};
pub use graph::{LossParts, loss_graph};
pub use options::{Dedup, LossKind, LossOptions, Normalize, Penalty};
