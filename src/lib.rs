//! hiercon: hierarchical multi-label contrastive image search.
//!
//! Trains an image encoder with the hierarchical losses of "Use All The Labels" (Zhang et al.,
//! CVPR 2022), embeds a product catalogue into an HNSW index that keeps each item's
//! category / product / variation, and serves image queries with hierarchy-aware filters.
//! ONNX Runtime is the one engine, for training (each step compiled into one standard ONNX graph
//! by [`graph`]) and for serving. `ARCHITECTURE.md` walks the data flow module by module.

pub mod catalogue;
pub mod encoder;
pub mod error;
pub mod eval;
pub mod fsutil;
pub mod graph;
pub mod http;
pub mod image;
pub mod index;
pub mod loss;
pub mod milvus;
pub mod model;
pub mod modelfile;
pub mod pipeline;
pub mod plot;
pub mod progress;
pub mod runtime;
pub mod search;
pub mod train;

pub use error::{Error, Result};
