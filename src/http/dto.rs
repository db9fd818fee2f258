//! The API's wire types (JSON bodies and query parameters) and the parsing of search parameters.
//!
//! The OpenAPI document (`GET /openapi.json`) is generated from these types by `utoipa`, so what
//! is documented is what is served.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use crate::catalogue::Attributes;
use crate::catalogue::manifest::check_attribute_name;
use crate::index::filter::normalize_category;
use crate::search::{Filter, GroupBy, SearchHit};

/// Query parameters of `POST /v1/search` and `POST /v1/search/similar/{id}`. The OpenAPI
/// document describes them from the served configuration and generation
/// ([`super::openapi::search_parameters`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchParams {
    /// Hits wanted, 1..=`max_k` (default 10).
    pub k: Option<usize>,
    /// A taxonomy path (`Smileys & Emotion/face-smiling`); matches it and everything below it.
    pub category: Option<String>,
    /// Exact product id.
    pub product: Option<String>,
    /// Exact variation id.
    pub variation: Option<String>,
    /// One hit per product or per category.
    pub group_by: Option<GroupBy>,
    /// `true` forces the exact scan instead of HNSW.
    pub exact: Option<bool>,
    /// HNSW search breadth (default: the generation's verified one).
    pub ef: Option<usize>,
    /// `attr.NAME=VALUE`: the attribute `NAME` equals `VALUE` (see [`crate::index::filter::attribute_keys`]).
    pub attributes: BTreeMap<String, String>,
}

/// The most parameters a query string may carry.
pub const MAX_PARAMS: usize = 16;
/// The longest text parameter value, in characters.
pub const MAX_VALUE_CHARS: usize = 1024;
/// The prefix of attribute filter parameters.
pub const ATTRIBUTE_PARAM: &str = "attr.";

fn bad(name: &str, reason: impl std::fmt::Display) -> ApiError {
    ApiError::invalid_parameter(format!("`{name}` {reason}"))
}

/// A whole number written with ASCII digits only (no sign, no spaces), as the document's
/// `integer` parameters are sent.
fn number(name: &str, v: &str) -> Result<usize, ApiError> {
    let not = || bad(name, format!("must be a whole number, got {v:?}"));
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not());
    }
    v.parse::<usize>().map_err(|_| not())
}

/// A text value of 1 to [`MAX_VALUE_CHARS`] characters, taken as it is.
fn text(name: &str, v: &str) -> Result<String, ApiError> {
    if v.is_empty() {
        return Err(bad(name, "must not be empty"));
    }
    if v.chars().count() > MAX_VALUE_CHARS {
        return Err(bad(name, format!("is longer than {MAX_VALUE_CHARS} characters")));
    }
    Ok(v.to_string())
}

impl SearchParams {
    /// Parses the decoded `(name, value)` pairs of a query string; every problem is a 400
    /// `invalid_parameter` naming the parameter (unknown names and repeats included).
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        if pairs.len() > MAX_PARAMS {
            return Err(ApiError::invalid_parameter(format!("at most {MAX_PARAMS} query parameters")));
        }
        let mut p = SearchParams::default();
        let mut seen = std::collections::HashSet::new();
        for (name, v) in pairs {
            if !seen.insert(name.as_str()) {
                return Err(bad(name, "is given more than once"));
            }
            match name.as_str() {
                "k" => p.k = Some(number(name, v)?),
                "ef" => p.ef = Some(number(name, v)?),
                "category" => p.category = Some(text(name, v)?),
                "product" => p.product = Some(text(name, v)?),
                "variation" => p.variation = Some(text(name, v)?),
                "group_by" => {
                    p.group_by = Some(match v.as_str() {
                        "product" => GroupBy::Product,
                        "category" => GroupBy::Category,
                        _ => return Err(bad(name, format!("must be `product` or `category`, got {v:?}"))),
                    })
                }
                "exact" => {
                    p.exact = Some(match v.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad(name, format!("must be `true` or `false`, got {v:?}"))),
                    })
                }
                other => match other.strip_prefix(ATTRIBUTE_PARAM) {
                    Some(attr) if check_attribute_name(attr).is_none() => {
                        p.attributes.insert(attr.to_string(), text(name, v)?);
                    }
                    _ => {
                        let known = "k, category, product, variation, group_by, exact, ef, attr.NAME";
                        return Err(ApiError::invalid_parameter(format!(
                            "unknown parameter `{other}` (known: {known})"
                        )));
                    }
                },
            }
        }
        Ok(p)
    }

    /// The search filter these parameters ask for (category path normalised: a path that is
    /// empty once trimmed, such as `/`, is the root and filters nothing).
    pub fn filter(&self) -> Filter {
        Filter {
            category: self.category.as_deref().map(normalize_category).filter(|c| !c.is_empty()),
            product: self.product.clone(),
            variation: self.variation.clone(),
            attributes: self.attributes.clone(),
            ..Default::default()
        }
    }
}

/// The multipart form of `POST /v1/search`.
#[derive(Debug, Clone, ToSchema)]
pub struct SearchForm {
    /// The query image (PNG, JPEG or WebP).
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
}

/// An attribute value: a string, a number or a boolean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum AttributeValue {
    Boolean(bool),
    Number(f64),
    String(String),
}

/// One ranked item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Hit {
    pub id: String,
    /// The product's name for people; null when the catalogue has none.
    pub title: Option<String>,
    /// Cosine similarity to the query, in [-1, 1].
    pub score: f32,
    /// Taxonomy path, coarse to fine, `/`-separated.
    pub category: String,
    pub product: String,
    pub variation: String,
    pub view: String,
    /// The item's attributes (empty when the catalogue has none).
    #[schema(value_type = BTreeMap<String, AttributeValue>)]
    pub attributes: Attributes,
    /// `GET` this for the item's image.
    pub image_url: String,
}

/// The category the nearest neighbours vote for (each neighbour's vote is weighted by its
/// similarity, clamped at 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Prediction {
    /// The winning leaf category path.
    pub category: String,
    /// Its share of the total vote, in [0, 1].
    pub confidence: f32,
    /// Neighbours that voted.
    pub neighbours: usize,
}

/// `POST /v1/search` and `POST /v1/search/similar/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SearchResponse {
    /// Server time spent on the request, in milliseconds.
    pub took_ms: f64,
    /// The index generation that answered (`gen-<n>`).
    pub generation: String,
    /// `approx` (HNSW) or `exact` (a scan).
    pub path: String,
    /// Items the filter allowed.
    pub allowed: usize,
    /// The kNN vote over the unfiltered nearest neighbours; absent when the index is empty.
    pub predicted: Option<Prediction>,
    pub hits: Vec<Hit>,
}

/// `GET /v1/items/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Item {
    pub id: String,
    /// The product's name for people; null when the catalogue has none.
    pub title: Option<String>,
    pub category: String,
    pub product: String,
    pub variation: String,
    pub view: String,
    /// `train` or `test`.
    pub split: String,
    /// `query`, `gallery` or absent.
    pub role: Option<String>,
    /// sha256 of the image bytes.
    pub sha256: String,
    /// The item's attributes (empty when the catalogue has none).
    #[schema(value_type = BTreeMap<String, AttributeValue>)]
    pub attributes: Attributes,
    pub image_url: String,
    pub generation: String,
}

/// One node of the category tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaxonomyNode {
    /// The last level's name.
    pub name: String,
    /// The full path (usable as the `category` parameter).
    pub path: String,
    /// Items in this category and below.
    pub items: usize,
    #[schema(no_recursion)]
    pub children: Vec<TaxonomyNode>,
}

/// `GET /v1/taxonomy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Taxonomy {
    pub generation: String,
    /// Items in the generation.
    pub items: usize,
    pub roots: Vec<TaxonomyNode>,
}

/// An item to try the search with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Example {
    pub id: String,
    /// The product's name for people; null when the catalogue has none.
    pub title: Option<String>,
    pub category: String,
    pub image_url: String,
}

/// `GET /v1/examples`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Examples {
    pub generation: String,
    /// One item per top-level category (a query-role one where there is), at most 8.
    pub items: Vec<Example>,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok` while the process serves.
    pub status: String,
    pub version: String,
}

/// `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Ready {
    /// True once an index generation is loaded.
    pub ready: bool,
    pub generation: Option<String>,
    pub items: Option<usize>,
    /// The model digest queries are embedded with.
    pub model_digest: Option<String>,
}

/// `POST /v1/admin/reload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Reload {
    /// The generation served before (absent if none was).
    pub previous: Option<String>,
    pub current: String,
    /// False when `CURRENT` already named the loaded generation.
    pub changed: bool,
}

/// The body of every 4xx and 5xx answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_parameter`, `unknown_category`.
    pub code: String,
    /// A sentence for people.
    pub message: String,
}

/// Characters kept as they are in a URL path segment (RFC 3986 unreserved, plus `:`, `@`).
fn keep_in_segment(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'@')
}

/// Percent-encodes one path segment.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if keep_in_segment(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The URL of an item's image.
pub fn image_url(id: &str) -> String {
    format!("/v1/images/{}", encode_segment(id))
}

impl From<&SearchHit> for Hit {
    fn from(h: &SearchHit) -> Self {
        Hit {
            id: h.id.clone(),
            title: h.title.clone(),
            score: h.score,
            category: h.category.clone(),
            product: h.product.clone(),
            variation: h.variation.clone(),
            view: h.view.clone(),
            attributes: h.attributes.clone(),
            image_url: image_url(&h.id),
        }
    }
}

impl From<&crate::catalogue::taxonomy::TreeNode> for TaxonomyNode {
    fn from(n: &crate::catalogue::taxonomy::TreeNode) -> Self {
        TaxonomyNode {
            name: n.name.clone(),
            path: n.path.clone(),
            items: n.items,
            children: n.children.iter().map(TaxonomyNode::from).collect(),
        }
    }
}

/// The score-weighted category vote over `neighbours` (best first); `None` when empty.
pub fn vote(neighbours: &[SearchHit]) -> Option<Prediction> {
    let mut weights: Vec<(&str, f32)> = Vec::new();
    for h in neighbours {
        let w = h.score.max(0.0);
        match weights.iter_mut().find(|(c, _)| *c == h.category) {
            Some((_, acc)) => *acc += w,
            None => weights.push((&h.category, w)),
        }
    }
    let total: f32 = weights.iter().map(|(_, w)| w).sum();
    // Ties go to the category met first, i.e. the one of the better neighbour.
    let (category, best) = weights.iter().copied().fold(None, |acc: Option<(&str, f32)>, (c, w)| match acc {
        Some((_, bw)) if bw >= w => acc,
        _ => Some((c, w)),
    })?;
    let confidence = if total > 0.0 { best / total } else { 0.0 };
    Some(Prediction { category: category.to_string(), confidence, neighbours: neighbours.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn parse_accepts_every_parameter_and_rejects_unknown_and_repeated() {
        let p = SearchParams::parse(&pairs(&[
            ("k", "5"),
            ("category", " a / b/"),
            ("group_by", "product"),
            ("exact", "true"),
            ("ef", "32"),
            ("attr.brand", "acme"),
            ("attr.price", "12"),
            ("product", " "),
        ]))
        .unwrap();
        assert_eq!((p.k, p.ef, p.exact), (Some(5), Some(32), Some(true)));
        let f = p.filter();
        assert_eq!(f.category.as_deref(), Some("a/b"));
        assert_eq!(f.product.as_deref(), Some(" "), "product ids are taken as they are");
        assert_eq!(
            f.attributes.iter().map(|(a, b)| format!("{a}={b}")).collect::<Vec<_>>(),
            ["brand=acme", "price=12"]
        );
        assert_eq!(p.group_by, Some(GroupBy::Product));
        assert_eq!(SearchParams::parse(&pairs(&[("category", "/")])).unwrap().filter().category, None, "the root");
        let long = "é".repeat(MAX_VALUE_CHARS);
        assert!(SearchParams::parse(&pairs(&[("product", &long)])).is_ok(), "the limit counts characters");
        for bad in [
            vec![("k", "x")],
            vec![("k", "-1")],
            vec![("k", "+1")],
            vec![("k", " 1")],
            vec![("ef", "")],
            vec![("group_by", "shop")],
            vec![("group_by", "")],
            vec![("exact", "yes")],
            vec![("exact", "1")],
            vec![("categroy", "a")],
            vec![("k", "1"), ("k", "2")],
            vec![("product", "")],
            vec![("category", "")],
            vec![("attr.", "x")],
            vec![("attr.a b", "x")],
            vec![("attr.brand", "")],
        ] {
            let e = SearchParams::parse(&pairs(&bad)).unwrap_err();
            assert_eq!(e.code, "invalid_parameter", "{bad:?}");
        }
        let too_long = "x".repeat(MAX_VALUE_CHARS + 1);
        assert!(SearchParams::parse(&pairs(&[("variation", &too_long)])).is_err());
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("twitter:1F600"), "twitter:1F600");
        assert_eq!(encode_segment("a b/c?d%"), "a%20b%2Fc%3Fd%25");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    fn hit(category: &str, score: f32) -> SearchHit {
        SearchHit {
            id: String::new(),
            score,
            category: category.into(),
            product: String::new(),
            variation: String::new(),
            view: String::new(),
            image: String::new(),
            title: None,
            attributes: Default::default(),
        }
    }

    #[test]
    fn vote_weighs_by_similarity() {
        // Two weaker neighbours of `b` outvote one strong `a`: 0.5 + 0.45 > 0.9.
        let p = vote(&[hit("a", 0.9), hit("b", 0.5), hit("b", 0.45), hit("c", -0.3)]).unwrap();
        assert_eq!(p.category, "b");
        assert!((p.confidence - 0.95 / 1.85).abs() < 1e-6, "{}", p.confidence);
        assert_eq!(p.neighbours, 4);
        // A tie goes to the better neighbour's category.
        assert_eq!(vote(&[hit("x", 0.5), hit("y", 0.5)]).unwrap().category, "x");
        assert!(vote(&[]).is_none());
    }
}
