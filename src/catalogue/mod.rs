//! Catalogue: manifest, taxonomy, label encoding, splits and sources.

pub mod manifest;

pub use manifest::{Item, Role, Split};
