//! Catalogue: manifest, taxonomy, label encoding, splits and sources.
//!
//! - [`manifest`]: the JSON Lines file ([`Manifest`], [`Item`]): reader with line-numbered
//!   problems, atomic writer.
//! - [`taxonomy`]: the category tree (children, descendants, counts, levels).
//! - [`labels`]: items -> integer label columns `[taxonomy levels..., product, variation, image]`.
//! - [`split`]: the seen/unseen split by stable hash; query/gallery roles.
//! - [`summary`]: counts with a readable `Display`.
//! - [`sources`]: importers that build a catalogue folder (`hiercon data ...`).

pub mod labels;
pub mod manifest;
pub mod sources;
pub mod split;
pub mod summary;
pub mod taxonomy;

pub use labels::{Column, Labels};
pub use manifest::{
    AttrValue, Attributes, Item, LineIssue, MANIFEST_FILE, Manifest, Problem, ReadOptions, Role, Split, write_items,
};
pub use split::{
    SplitOptions, Subset, UnseenBy, VALIDATION_FRACTION, assign_roles_by_view, assign_splits, validation_products,
};
pub use summary::Summary;
pub use taxonomy::{Taxonomy, path_matches};
