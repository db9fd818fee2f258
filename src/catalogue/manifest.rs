//! The catalogue manifest: JSON Lines, one [`Item`] a line (DESIGN §3).

use serde::{Deserialize, Serialize};

/// Which side of the seen/unseen split an item is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Products shown in training ("seen").
    Train,
    /// Products held out of training ("unseen").
    Test,
}

/// An item's role in query/gallery retrieval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Query,
    Gallery,
}

/// One catalogue item: an image with its place in the hierarchy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Unique id within the manifest.
    pub id: String,
    /// Image path, relative to the manifest's folder.
    pub image: String,
    /// Taxonomy path, levels joined by `/` (e.g. `Smileys & Emotion/face-smiling`).
    pub category: String,
    pub product: String,
    pub variation: String,
    /// Which drawing or photo of the product this is (e.g. the emoji vendor).
    #[serde(default)]
    pub view: String,
    pub split: Split,
    #[serde(default)]
    pub role: Option<Role>,
}
