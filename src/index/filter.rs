//! Hierarchy filters and grouping keys: which rows a filter allows, which group a row belongs to.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::store::ItemRecord;
use crate::catalogue::{AttrValue, Role, Split};

/// Restricts a search. Every given field must match; absent fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filter {
    /// A taxonomy path: matches items in that category and in all its descendants
    /// (`"clothing/tops"` matches `clothing/tops` and `clothing/tops/shirts`, not `clothing/topsoil`).
    pub category: Option<String>,
    /// Exact product id.
    pub product: Option<String>,
    /// Exact variation id (as written in the manifest; pair it with `product` when variation ids
    /// repeat across products).
    pub variation: Option<String>,
    /// Catalogue split (used by `eval`).
    pub split: Option<Split>,
    /// Query/gallery role (used by `eval`).
    pub role: Option<Role>,
    /// Attribute name -> value, each matched exactly ([`attribute_keys`] says how text meets
    /// strings, numbers and booleans). An attribute no item has allows nothing.
    pub attributes: BTreeMap<String, String>,
}

impl Filter {
    /// True when the filter allows every row.
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }
}

/// One hit per group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// One hit per product.
    Product,
    /// One hit per (leaf) category path.
    Category,
}

/// The rows a filter allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// No restriction.
    All,
    /// Exactly these rows, ascending (possibly none).
    Rows(Vec<u32>),
}

/// Normalises a taxonomy path: trims each level, drops empty levels (`" a//b/ "` -> `"a/b"`).
pub fn normalize_category(path: &str) -> String {
    path.split('/').map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>().join("/")
}

/// The key an attribute value is indexed under: strings as `s:TEXT`, booleans as `b:true` /
/// `b:false`, numbers as `n:` and the shortest decimal of their 64-bit float value (`12` and
/// `12.0` are both `n:12`).
pub fn value_key(v: &AttrValue) -> String {
    match v {
        AttrValue::String(s) => format!("s:{s}"),
        AttrValue::Bool(b) => format!("b:{b}"),
        AttrValue::Number(n) => number_key(n.as_f64().unwrap_or(f64::NAN)),
    }
}

fn number_key(x: f64) -> String {
    // -0 and 0 are one number.
    format!("n:{}", if x == 0.0 { 0.0 } else { x })
}

/// The keys a filter's text matches (exact matching, by type): the string with exactly that
/// text; for `true` / `false` also that boolean; for text Rust reads as a finite number (`12`,
/// `12.0`, `1e3`, `-0.5`) also every number of equal value (compared as 64-bit floats).
pub fn attribute_keys(text: &str) -> Vec<String> {
    let mut keys = vec![format!("s:{text}")];
    if text == "true" || text == "false" {
        keys.push(format!("b:{text}"));
    }
    if let Ok(x) = text.parse::<f64>()
        && x.is_finite()
    {
        keys.push(number_key(x));
    }
    keys
}

/// The union of ascending row lists, ascending.
fn union(lists: &[&[u32]]) -> Vec<u32> {
    let mut rows: Vec<u32> = lists.iter().flat_map(|l| l.iter().copied()).collect();
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// Per-generation lookup tables: label value -> rows (ascending), row -> group id.
#[derive(Debug, Default)]
pub struct Labels {
    /// Every category path and each of its ancestors -> the rows at or below it.
    categories: HashMap<String, Vec<u32>>,
    products: HashMap<String, Vec<u32>>,
    variations: HashMap<String, Vec<u32>>,
    splits: HashMap<Split, Vec<u32>>,
    roles: HashMap<Role, Vec<u32>>,
    /// Attribute name -> value key ([`value_key`]) -> rows.
    attributes: HashMap<String, HashMap<String, Vec<u32>>>,
    product_of: Vec<u32>,
    category_of: Vec<u32>,
}

fn intern(ids: &mut HashMap<String, u32>, key: &str) -> u32 {
    let next = ids.len() as u32;
    *ids.entry(key.to_string()).or_insert(next)
}

impl Labels {
    /// Indexes the items (row = position).
    pub fn new(items: &[ItemRecord]) -> Self {
        let mut l = Labels::default();
        let (mut product_ids, mut category_ids) = (HashMap::new(), HashMap::new());
        for (row, rec) in items.iter().enumerate() {
            let row = row as u32;
            let it = &rec.item;
            let cat = normalize_category(&it.category);
            let mut prefix = String::new();
            for level in cat.split('/').filter(|s| !s.is_empty()) {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(level);
                l.categories.entry(prefix.clone()).or_default().push(row);
            }
            l.products.entry(it.product.clone()).or_default().push(row);
            l.variations.entry(it.variation.clone()).or_default().push(row);
            l.splits.entry(it.split).or_default().push(row);
            if let Some(role) = it.role {
                l.roles.entry(role).or_default().push(row);
            }
            for (name, value) in &it.attributes {
                l.attributes.entry(name.clone()).or_default().entry(value_key(value)).or_default().push(row);
            }
            l.product_of.push(intern(&mut product_ids, &it.product));
            l.category_of.push(intern(&mut category_ids, &cat));
        }
        l
    }

    /// The rows `f` allows. Unknown values allow nothing.
    pub fn allowed(&self, f: &Filter) -> Allowed {
        let none: &[u32] = &[];
        let attribute_rows: Vec<Vec<u32>> = f
            .attributes
            .iter()
            .map(|(name, text)| match self.attributes.get(name) {
                Some(values) => {
                    let keys = attribute_keys(text);
                    union(&keys.iter().filter_map(|k| values.get(k).map(Vec::as_slice)).collect::<Vec<_>>())
                }
                None => Vec::new(),
            })
            .collect();
        let mut lists: Vec<&[u32]> = attribute_rows.iter().map(Vec::as_slice).collect();
        if let Some(c) = &f.category {
            let c = normalize_category(c);
            // An empty path (after trimming) is the root: everything.
            if !c.is_empty() {
                lists.push(self.categories.get(&c).map_or(none, Vec::as_slice));
            }
        }
        if let Some(p) = &f.product {
            lists.push(self.products.get(p).map_or(none, Vec::as_slice));
        }
        if let Some(v) = &f.variation {
            lists.push(self.variations.get(v).map_or(none, Vec::as_slice));
        }
        if let Some(s) = &f.split {
            lists.push(self.splits.get(s).map_or(none, Vec::as_slice));
        }
        if let Some(r) = &f.role {
            lists.push(self.roles.get(r).map_or(none, Vec::as_slice));
        }
        if lists.is_empty() {
            return Allowed::All;
        }
        lists.sort_by_key(|l| l.len());
        let (first, rest) = lists.split_first().expect("not empty");
        let rows = first.iter().copied().filter(|r| rest.iter().all(|l| l.binary_search(r).is_ok())).collect();
        Allowed::Rows(rows)
    }

    /// The attribute names of the generation with the number of items that have each.
    pub fn attribute_names(&self) -> BTreeMap<String, usize> {
        self.attributes.iter().map(|(name, values)| (name.clone(), values.values().map(Vec::len).sum())).collect()
    }

    /// The group id of `row` under `by` (ids are dense per generation).
    pub fn group_of(&self, row: u32, by: GroupBy) -> u32 {
        match by {
            GroupBy::Product => self.product_of[row as usize],
            GroupBy::Category => self.category_of[row as usize],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Item;

    pub(crate) fn rec(id: &str, category: &str, product: &str, variation: &str, split: Split) -> ItemRecord {
        ItemRecord { item: Item { split, ..Item::new(id, category, product, variation) }, sha256: String::new() }
    }

    fn rows(a: Allowed) -> Vec<u32> {
        match a {
            Allowed::Rows(r) => r,
            Allowed::All => panic!("expected rows"),
        }
    }

    #[test]
    fn category_matches_descendants_only() {
        let items = vec![
            rec("0", "clothing/tops/shirts", "p0", "v0", Split::Train),
            rec("1", "clothing/tops", "p1", "v0", Split::Train),
            rec("2", "clothing/topsoil", "p2", "v1", Split::Test),
            rec("3", "garden", "p3", "v1", Split::Train),
            rec("4", " clothing / tops /shirts/", "p0", "v2", Split::Test),
        ];
        let l = Labels::new(&items);
        let f = |c: &str| Filter { category: Some(c.into()), ..Default::default() };
        assert_eq!(rows(l.allowed(&f("clothing/tops"))), vec![0, 1, 4]);
        assert_eq!(rows(l.allowed(&f("clothing/"))), vec![0, 1, 2, 4]);
        assert_eq!(rows(l.allowed(&f("clothing/tops/shirts"))), vec![0, 4]);
        assert_eq!(rows(l.allowed(&f("cloth"))), Vec::<u32>::new());
        assert_eq!(l.allowed(&f("/")), Allowed::All);
        assert_eq!(l.allowed(&Filter::default()), Allowed::All);
        let both = Filter { category: Some("clothing".into()), variation: Some("v0".into()), ..Default::default() };
        assert_eq!(rows(l.allowed(&both)), vec![0, 1]);
        let p = Filter { product: Some("p0".into()), split: Some(Split::Test), ..Default::default() };
        assert_eq!(rows(l.allowed(&p)), vec![4]);
        assert_eq!(l.group_of(0, GroupBy::Product), l.group_of(4, GroupBy::Product));
        assert_eq!(l.group_of(0, GroupBy::Category), l.group_of(4, GroupBy::Category));
        assert_ne!(l.group_of(0, GroupBy::Category), l.group_of(1, GroupBy::Category));
    }

    #[test]
    fn category_filter_agrees_with_the_taxonomy_definition() {
        let cats = ["a", "a/b", "a/b/c", "a/bc", "a/bc/d", "b", "b/a", "ab/c"];
        let items: Vec<_> =
            cats.iter().enumerate().map(|(i, c)| rec(&i.to_string(), c, "p", "v", Split::Train)).collect();
        let l = Labels::new(&items);
        for filter in cats.iter().chain(&["a/", "c", "a/b/c/d"]) {
            let want: Vec<u32> = (0..cats.len() as u32)
                .filter(|&r| crate::catalogue::path_matches(&normalize_category(filter), cats[r as usize]))
                .collect();
            let f = Filter { category: Some(filter.to_string()), ..Default::default() };
            assert_eq!(rows(l.allowed(&f)), want, "{filter}");
        }
    }

    #[test]
    fn attributes_match_exactly_by_type() {
        let mut items: Vec<ItemRecord> = (0..6).map(|i| rec(&i.to_string(), "a", "p", "v", Split::Train)).collect();
        let num = |x: f64| AttrValue::Number(serde_json::Number::from_f64(x).unwrap());
        let values = [
            ("brand", AttrValue::String("acme".into())),
            ("brand", AttrValue::String("Acme".into())),
            ("price", AttrValue::Number(12.into())),
            ("price", num(12.5)),
            ("sale", AttrValue::Bool(true)),
            ("sale", AttrValue::String("true".into())),
        ];
        for (rec, (name, value)) in items.iter_mut().zip(values) {
            rec.item.attributes.insert(name.into(), value);
        }
        items[0].item.attributes.insert("price".into(), num(0.0));
        let l = Labels::new(&items);
        let f = |pairs: &[(&str, &str)]| Filter {
            attributes: pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            ..Default::default()
        };
        assert_eq!(rows(l.allowed(&f(&[("brand", "acme")]))), vec![0], "strings are case-sensitive");
        assert_eq!(rows(l.allowed(&f(&[("price", "12")]))), vec![2]);
        assert_eq!(rows(l.allowed(&f(&[("price", "12.0")]))), vec![2], "numbers compare by value");
        assert_eq!(rows(l.allowed(&f(&[("price", "1.25e1")]))), vec![3]);
        assert_eq!(rows(l.allowed(&f(&[("price", "-0")]))), vec![0]);
        assert_eq!(rows(l.allowed(&f(&[("sale", "true")]))), vec![4, 5], "the boolean and the string");
        assert_eq!(rows(l.allowed(&f(&[("sale", "True")]))), Vec::<u32>::new());
        assert_eq!(rows(l.allowed(&f(&[("colour", "red")]))), Vec::<u32>::new(), "no such attribute");
        assert_eq!(rows(l.allowed(&f(&[("brand", "acme"), ("price", "0")]))), vec![0], "every attribute must match");
        let both = Filter { product: Some("p".into()), ..f(&[("price", "12")]) };
        assert_eq!(rows(l.allowed(&both)), vec![2]);
        assert_eq!(l.attribute_names(), BTreeMap::from([("brand".into(), 2), ("price".into(), 3), ("sale".into(), 2)]));
    }

    #[test]
    fn filter_json_rejects_unknown_fields() {
        let f: Filter = serde_json::from_str(r#"{"category":"a/b","split":"test"}"#).unwrap();
        assert_eq!(f.split, Some(Split::Test));
        assert!(serde_json::from_str::<Filter>(r#"{"categroy":"a"}"#).is_err());
    }
}
