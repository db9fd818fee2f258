//! The scale-out backend: a catalogue index kept in Milvus instead of a local generation.
//!
//! - [`client`]: the gRPC calls (tonic + the generated [`proto`] messages), blocking, with deadlines.
//! - [`collection`]: a generation as a Milvus collection (schema, metadata, rows, filters as expressions).
//! - [`index`]: `hiercon index --milvus`: embed, write a new collection, verify, switch the alias, drop old ones.
//! - [`backend`]: answering searches and item lookups from the collection an alias names.

pub mod backend;
pub mod client;
pub mod collection;
pub mod index;
pub mod proto;

pub use backend::MilvusBackend;
pub use client::Client;
pub use index::{MilvusIndexConfig, MilvusIndexOutcome};
