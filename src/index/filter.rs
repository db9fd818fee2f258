//! Hierarchy filters and grouping keys: which rows a filter allows, which group a row belongs to.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::store::ItemRecord;
use crate::catalogue::{Role, Split};

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

/// Per-generation lookup tables: label value -> rows (ascending), row -> group id.
#[derive(Debug, Default)]
pub struct Labels {
    /// Every category path and each of its ancestors -> the rows at or below it.
    categories: HashMap<String, Vec<u32>>,
    products: HashMap<String, Vec<u32>>,
    variations: HashMap<String, Vec<u32>>,
    splits: HashMap<Split, Vec<u32>>,
    roles: HashMap<Role, Vec<u32>>,
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
            l.product_of.push(intern(&mut product_ids, &it.product));
            l.category_of.push(intern(&mut category_ids, &cat));
        }
        l
    }

    /// The rows `f` allows. Unknown values allow nothing.
    pub fn allowed(&self, f: &Filter) -> Allowed {
        let mut lists: Vec<&[u32]> = Vec::new();
        let none: &[u32] = &[];
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
    fn filter_json_rejects_unknown_fields() {
        let f: Filter = serde_json::from_str(r#"{"category":"a/b","split":"test"}"#).unwrap();
        assert_eq!(f.split, Some(Split::Test));
        assert!(serde_json::from_str::<Filter>(r#"{"categroy":"a"}"#).is_err());
    }
}
