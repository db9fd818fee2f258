//! What a generation looks like in Milvus: the collection schema, its metadata, rows in and out,
//! and filters as Milvus expressions.
//!
//! A generation is one collection `<alias>_g<n>`; the alias names the live one. Each row is an
//! item: `id` (primary key), `row` (its position in manifest order), `embedding`, the filter
//! columns (`ancestors`: the category path and each of its ancestors, so a subtree filter is one
//! `array_contains`; `product`, `variation`, `split`, `role`; `attrs`: `name=key` for each
//! attribute value key of [`crate::index::filter`]), `sha256` of the image, and `item`: the whole
//! item record as JSON (title, attributes, image path), which is what answers carry. The
//! collection's description holds [`CollectionMeta`] as JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::proto::{common, schema};
use crate::catalogue::taxonomy::example_items;
use crate::catalogue::{Item, Split};
use crate::index::filter::{Filter, attribute_keys, normalize_category, value_key};
use crate::index::hnsw::HnswParams;
use crate::index::store::{EmbedStats, ItemRecord, ModelInfo};
use crate::{Error, Result};

/// The format tag of [`CollectionMeta`].
pub const FORMAT: &str = "hiercon-milvus-1";
/// The vector field.
pub const VECTOR: &str = "embedding";
/// Longest id, label or path a row may hold (Milvus VARCHAR needs a bound).
pub const MAX_TEXT: usize = 4096;
/// Most category levels, and most attribute values, per item.
pub const MAX_ARRAY: usize = 256;
/// The collection property holding the verified search breadth when verification widened it.
pub const EF_PROPERTY: &str = "hiercon.ef_search";
/// The collection property holding the generation's [`CollectionMeta`] when it was rewritten
/// in place (a small change applied to the standby collection): it supersedes the description,
/// which Milvus 2.3 cannot alter.
pub const META_PROPERTY: &str = "hiercon.meta";
/// The collection property holding when (unix seconds, with a millisecond fraction) the alias was
/// pointed at it.
pub const SWITCHED_PROPERTY: &str = "hiercon.switched_unix";
/// Fields a search answer needs per hit.
pub const HIT_FIELDS: [&str; 2] = ["item", "sha256"];

/// A generation's metadata, kept as JSON in its collection's description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionMeta {
    pub format: String,
    /// `n` of `<alias>_g<n>`.
    pub generation: u64,
    pub created_unix: u64,
    pub manifest: PathBuf,
    /// Image paths in the items are relative to this folder (which every serve replica must see).
    pub image_root: PathBuf,
    pub split: Option<Split>,
    pub model: ModelInfo,
    pub count: usize,
    pub dim: usize,
    pub hnsw: HnswParams,
    /// The HNSW search breadth verification passed at; serve's default.
    pub ef_search: usize,
    pub stats: EmbedStats,
    /// sha256 over every row's id, image hash, vector bits and item JSON in row order: equal
    /// digests mean a run would write the same collection again.
    pub content: String,
    /// What the API's taxonomy, examples and parameter checks need, so a serve replica never
    /// reads every item.
    pub summary: Summary,
}

/// The small per-generation tables serve keeps (sizes grow with categories and attribute
/// names, not with items).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Items per category path (as written in the manifest).
    pub categories: BTreeMap<String, usize>,
    /// Items that have each attribute.
    pub attributes: BTreeMap<String, usize>,
    /// A few items to try the search with: one per top-level category.
    pub examples: Vec<Item>,
}

impl Summary {
    /// The summary of a generation's items.
    pub fn of(records: &[ItemRecord]) -> Summary {
        let mut s = Summary::default();
        for r in records {
            *s.categories.entry(r.item.category.clone()).or_insert(0) += 1;
            for name in r.item.attributes.keys() {
                *s.attributes.entry(name.clone()).or_insert(0) += 1;
            }
        }
        let items = || records.iter().map(|r| &r.item);
        let tax = crate::catalogue::Taxonomy::from_items(items());
        let roots: Vec<String> = tax.tree().iter().map(|n| n.name.clone()).collect();
        let roots: Vec<&str> = roots.iter().map(String::as_str).collect();
        s.examples = example_items(items(), &roots, 8).into_iter().cloned().collect();
        s
    }
}

/// The physical collection of generation `n` under `alias`.
pub fn collection_name(alias: &str, n: u64) -> String {
    format!("{alias}_g{n}")
}

/// `n` when `name` is a generation of `alias`.
pub fn generation_of(alias: &str, name: &str) -> Option<u64> {
    name.strip_prefix(alias)?.strip_prefix("_g")?.parse().ok()
}

fn varchar(name: &str, max: usize) -> schema::FieldSchema {
    schema::FieldSchema {
        name: name.into(),
        data_type: schema::DataType::VarChar as i32,
        type_params: super::client::params([("max_length", max)]),
        ..Default::default()
    }
}

fn string_array(name: &str) -> schema::FieldSchema {
    schema::FieldSchema {
        name: name.into(),
        data_type: schema::DataType::Array as i32,
        element_type: schema::DataType::VarChar as i32,
        type_params: super::client::params([("max_length", MAX_TEXT), ("max_capacity", MAX_ARRAY)]),
        ..Default::default()
    }
}

/// The schema of a generation's collection.
pub fn schema(name: &str, meta: &CollectionMeta) -> Result<schema::CollectionSchema> {
    let description = serde_json::to_string(meta)
        .map_err(|e| Error::MilvusCollection { collection: name.into(), reason: format!("metadata: {e}") })?;
    let fields = vec![
        schema::FieldSchema { is_primary_key: true, ..varchar("id", MAX_TEXT) },
        schema::FieldSchema { name: "row".into(), data_type: schema::DataType::Int64 as i32, ..Default::default() },
        schema::FieldSchema {
            name: VECTOR.into(),
            data_type: schema::DataType::FloatVector as i32,
            type_params: super::client::params([("dim", meta.dim)]),
            ..Default::default()
        },
        string_array("ancestors"),
        varchar("product", MAX_TEXT),
        varchar("variation", MAX_TEXT),
        varchar("split", 16),
        varchar("role", 16),
        string_array("attrs"),
        varchar("sha256", 64),
        schema::FieldSchema { name: "item".into(), data_type: schema::DataType::Json as i32, ..Default::default() },
    ];
    Ok(schema::CollectionSchema { name: name.into(), description, fields, ..Default::default() })
}

/// A collection property's value.
pub fn property<'a>(properties: &'a [common::KeyValuePair], key: &str) -> Option<&'a str> {
    properties.iter().find(|kv| kv.key == key).map(|kv| kv.value.as_str())
}

/// The metadata of a collection hiercon wrote: the [`META_PROPERTY`] when a small change
/// rewrote it in place, else its description.
pub fn read_meta(
    name: &str,
    s: &schema::CollectionSchema,
    properties: &[common::KeyValuePair],
) -> Result<CollectionMeta> {
    let bad = |reason: String| Error::MilvusCollection { collection: name.into(), reason };
    let text = property(properties, META_PROPERTY).unwrap_or(&s.description);
    let meta: CollectionMeta = serde_json::from_str(text).map_err(|e| {
        bad(format!("its description is not hiercon metadata ({e}); was it written by `hiercon index`?"))
    })?;
    if meta.format != FORMAT {
        return Err(bad(format!("format {:?}, this hiercon reads {FORMAT:?}", meta.format)));
    }
    Ok(meta)
}

/// The category path and each ancestor (`a/b/c` -> `a`, `a/b`, `a/b/c`).
pub fn ancestors(category: &str) -> Vec<String> {
    let cat = normalize_category(category);
    let mut out = Vec::new();
    let mut prefix = String::new();
    for level in cat.split('/').filter(|s| !s.is_empty()) {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(level);
        out.push(prefix.clone());
    }
    out
}

fn strings(name: &str, data: Vec<String>) -> schema::FieldData {
    scalar(name, schema::DataType::VarChar, schema::scalar_field::Data::StringData(schema::StringArray { data }))
}

fn scalar(name: &str, t: schema::DataType, data: schema::scalar_field::Data) -> schema::FieldData {
    schema::FieldData {
        r#type: t as i32,
        field_name: name.into(),
        field: Some(schema::field_data::Field::Scalars(schema::ScalarField { data: Some(data), ..Default::default() })),
        ..Default::default()
    }
}

fn string_arrays(name: &str, rows: Vec<Vec<String>>) -> schema::FieldData {
    let data = rows
        .into_iter()
        .map(|data| schema::ScalarField {
            data: Some(schema::scalar_field::Data::StringData(schema::StringArray { data })),
            ..Default::default()
        })
        .collect();
    scalar(
        name,
        schema::DataType::Array,
        schema::scalar_field::Data::ArrayData(schema::ArrayArray {
            data,
            element_type: schema::DataType::VarChar as i32,
        }),
    )
}

fn check_text(what: &str, id: &str, s: &str) -> Result<()> {
    if s.len() > MAX_TEXT {
        return Err(Error::InvalidArgument {
            name: "manifest",
            reason: format!("item {id:?}: {what} is {} bytes, Milvus columns hold at most {MAX_TEXT}", s.len()),
        });
    }
    Ok(())
}

/// The columns of rows `first..first + records.len()` (vectors row-major, `dim` wide).
pub fn columns(first: usize, records: &[ItemRecord], vectors: &[f32], dim: usize) -> Result<Vec<schema::FieldData>> {
    let rows: Vec<i64> = (first..first + records.len()).map(|r| r as i64).collect();
    columns_at(&rows, records, vectors, dim)
}

/// The columns of `records` at row positions `rows` (one per record).
pub fn columns_at(rows: &[i64], records: &[ItemRecord], vectors: &[f32], dim: usize) -> Result<Vec<schema::FieldData>> {
    debug_assert_eq!(rows.len(), records.len());
    for r in records {
        let it = &r.item;
        for (what, s) in
            [("id", &it.id), ("product", &it.product), ("variation", &it.variation), ("category", &it.category)]
        {
            check_text(what, &it.id, s)?;
        }
        if ancestors(&it.category).len() > MAX_ARRAY || it.attributes.len() > MAX_ARRAY {
            return Err(Error::InvalidArgument {
                name: "manifest",
                reason: format!("item {:?}: more than {MAX_ARRAY} category levels or attributes", it.id),
            });
        }
    }
    let col = |f: &dyn Fn(&ItemRecord) -> String| records.iter().map(f).collect::<Vec<_>>();
    let items = records
        .iter()
        .map(|r| serde_json::to_vec(r).map_err(|e| Error::Milvus { op: "insert", reason: format!("item JSON: {e}") }))
        .collect::<Result<Vec<_>>>()?;
    Ok(vec![
        strings("id", col(&|r| r.item.id.clone())),
        scalar(
            "row",
            schema::DataType::Int64,
            schema::scalar_field::Data::LongData(schema::LongArray { data: rows.to_vec() }),
        ),
        schema::FieldData {
            r#type: schema::DataType::FloatVector as i32,
            field_name: VECTOR.into(),
            field: Some(schema::field_data::Field::Vectors(schema::VectorField {
                dim: dim as i64,
                data: Some(schema::vector_field::Data::FloatVector(schema::FloatArray { data: vectors.to_vec() })),
                ..Default::default()
            })),
            ..Default::default()
        },
        string_arrays("ancestors", records.iter().map(|r| ancestors(&r.item.category)).collect()),
        strings("product", col(&|r| r.item.product.clone())),
        strings("variation", col(&|r| r.item.variation.clone())),
        strings("split", col(&|r| r.item.split.as_str().to_string())),
        strings("role", col(&|r| r.item.role.map(role_str).unwrap_or_default().to_string())),
        string_arrays(
            "attrs",
            records
                .iter()
                .map(|r| r.item.attributes.iter().map(|(k, v)| format!("{k}={}", value_key(v))).collect())
                .collect(),
        ),
        strings("sha256", col(&|r| r.sha256.clone())),
        scalar("item", schema::DataType::Json, schema::scalar_field::Data::JsonData(schema::JsonArray { data: items })),
    ])
}

fn role_str(r: crate::catalogue::Role) -> &'static str {
    match r {
        crate::catalogue::Role::Query => "query",
        crate::catalogue::Role::Gallery => "gallery",
    }
}

/// A string literal of Milvus's expression language.
pub fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A filter as a Milvus boolean expression (`""`: everything). Matches exactly the rows
/// [`crate::index::filter::Labels::allowed`] allows.
pub fn expression(f: &Filter) -> String {
    let mut terms = Vec::new();
    if let Some(c) = &f.category {
        let c = normalize_category(c);
        if !c.is_empty() {
            terms.push(format!("array_contains(ancestors, {})", literal(&c)));
        }
    }
    if let Some(p) = &f.product {
        terms.push(format!("product == {}", literal(p)));
    }
    if let Some(v) = &f.variation {
        terms.push(format!("variation == {}", literal(v)));
    }
    if let Some(s) = &f.split {
        terms.push(format!("split == {}", literal(s.as_str())));
    }
    if let Some(r) = &f.role {
        terms.push(format!("role == {}", literal(role_str(*r))));
    }
    for (name, text) in &f.attributes {
        let keys: Vec<String> = attribute_keys(text).iter().map(|k| literal(&format!("{name}={k}"))).collect();
        terms.push(format!("array_contains_any(attrs, [{}])", keys.join(", ")));
    }
    terms.join(" and ")
}

/// Reads the column `name` of a result as strings (none when the answer has no rows).
pub fn string_column(fields: &[schema::FieldData], name: &str) -> Result<Vec<String>> {
    match field(fields, name)? {
        None => Ok(Vec::new()),
        Some(schema::scalar_field::Data::StringData(s)) => Ok(s.data.clone()),
        Some(_) => Err(Error::Milvus { op: "read result", reason: format!("field {name} is not a string column") }),
    }
}

/// Reads the column `name` of a result as 64-bit integers.
pub fn long_column(fields: &[schema::FieldData], name: &str) -> Result<Vec<i64>> {
    match field(fields, name)? {
        None => Ok(Vec::new()),
        Some(schema::scalar_field::Data::LongData(s)) => Ok(s.data.clone()),
        Some(schema::scalar_field::Data::IntData(s)) => Ok(s.data.iter().map(|&x| x as i64).collect()),
        Some(_) => Err(Error::Milvus { op: "read result", reason: format!("field {name} is not an integer column") }),
    }
}

/// Reads the JSON column `item` of a result as item records.
pub fn item_column(fields: &[schema::FieldData]) -> Result<Vec<ItemRecord>> {
    match field(fields, "item")? {
        None => Ok(Vec::new()),
        Some(schema::scalar_field::Data::JsonData(j)) => j
            .data
            .iter()
            .map(|b| {
                serde_json::from_slice(b)
                    .map_err(|e| Error::Milvus { op: "read result", reason: format!("item JSON: {e}") })
            })
            .collect(),
        Some(_) => Err(Error::Milvus { op: "read result", reason: "field item is not JSON".into() }),
    }
}

/// Reads the vector column of a result (row-major; empty when the answer has no rows).
pub fn vector_column(fields: &[schema::FieldData]) -> Result<Vec<f32>> {
    let f = fields
        .iter()
        .find(|f| f.field_name == VECTOR)
        .ok_or_else(|| Error::Milvus { op: "read result", reason: format!("no field {VECTOR} in the answer") })?;
    match &f.field {
        Some(schema::field_data::Field::Vectors(schema::VectorField {
            data: Some(schema::vector_field::Data::FloatVector(v)),
            ..
        })) => Ok(v.data.clone()),
        Some(schema::field_data::Field::Vectors(schema::VectorField { data: None, .. })) | None => Ok(Vec::new()),
        _ => Err(Error::Milvus { op: "read result", reason: format!("field {VECTOR} is not a float vector") }),
    }
}

/// A column's data; `None` when Milvus sent the column without rows.
fn field<'a>(fields: &'a [schema::FieldData], name: &str) -> Result<Option<&'a schema::scalar_field::Data>> {
    let f = fields
        .iter()
        .find(|f| f.field_name == name)
        .ok_or_else(|| Error::Milvus { op: "read result", reason: format!("no field {name} in the answer") })?;
    match &f.field {
        Some(schema::field_data::Field::Scalars(schema::ScalarField { data, .. })) => Ok(data.as_ref()),
        None => Ok(None),
        Some(_) => Err(Error::Milvus { op: "read result", reason: format!("field {name} is not a scalar column") }),
    }
}

/// The metric every generation uses: inner product of unit vectors = cosine.
pub fn index_params(hnsw: &HnswParams) -> Vec<common::KeyValuePair> {
    super::client::params([
        ("index_type", "HNSW".to_string()),
        ("metric_type", "IP".to_string()),
        ("params", format!("{{\"M\": {}, \"efConstruction\": {}}}", hnsw.m, hnsw.ef_construction)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_quote_and_combine() {
        let f = Filter {
            category: Some(" a / b\"c ".into()),
            product: Some("p\\1".into()),
            attributes: [("size".to_string(), "12".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(
            expression(&f),
            r#"array_contains(ancestors, "a/b\"c") and product == "p\\1" and array_contains_any(attrs, ["size=s:12", "size=n:12"])"#
        );
        assert_eq!(expression(&Filter::default()), "");
        assert_eq!(expression(&Filter { category: Some("/".into()), ..Default::default() }), "");
        assert_eq!(ancestors("a/b/c"), vec!["a", "a/b", "a/b/c"]);
        assert_eq!(generation_of("cat", "cat_g12"), Some(12));
        assert_eq!(generation_of("cat", "cats_g1"), None);
    }
}
