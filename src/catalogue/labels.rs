//! Label encoding: items -> integer columns `[taxonomy levels..., product, variation, image]`
//! (coarse -> fine, DESIGN §2/§3) with the tables that decode each id back to its name.
//!
//! Each column's ids are dense `0..n` in sorted order of the column's *full key*: the tuple of
//! every coarser level's name plus its own (a product's key is `(level 1, ..., level L, product)`).
//! So equal product names under different categories get different ids, ids of a finer column
//! sort in the same order as their coarser ones, and the encoding depends only on the set of
//! items, not their order. A category path shallower than the deepest one gets empty names on
//! the missing levels: it is its own class at every finer taxonomy level.

use ndarray::{Array2, ArrayView1};

use super::Item;

/// One label column and its decoding table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// `level1`..`levelL`, `product`, `variation`, `image`.
    pub name: String,
    /// `names[id]`: the last part of the id's key (a level name, a product, a variation, an item id).
    pub names: Vec<String>,
    /// `parents[id]`: the id in the previous (coarser) column this id lies under; empty for column 0.
    pub parents: Vec<u32>,
}

impl Column {
    /// How many distinct ids the column has.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The label matrix of a list of items (row `i` = item `i`) and its decoding tables.
#[derive(Debug, Clone)]
pub struct Labels {
    /// Number of taxonomy levels (the first `levels` columns).
    pub levels: usize,
    pub columns: Vec<Column>,
    /// `rows[[i, c]]`: item `i`'s id in column `c`. `i64`, the ONNX label type.
    pub rows: Array2<i64>,
}

impl Labels {
    /// Encodes the items (in the order given). Columns: the taxonomy levels (as many as the
    /// deepest category path has), then product, variation, and the image (item id).
    pub fn encode<'a>(items: impl IntoIterator<Item = &'a Item>) -> Labels {
        let items: Vec<&Item> = items.into_iter().collect();
        let levels = items.iter().map(|it| it.category.split('/').count()).max().unwrap_or(0);
        let n_cols = levels + 3;
        let keys: Vec<Vec<&str>> = items
            .iter()
            .map(|it| {
                let mut key: Vec<&str> = it.category.split('/').collect();
                key.resize(levels, "");
                key.extend([it.product.as_str(), it.variation.as_str(), it.id.as_str()]);
                key
            })
            .collect();
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by(|&a, &b| keys[a].cmp(&keys[b]).then(a.cmp(&b)));

        let mut columns: Vec<Column> = (0..n_cols)
            .map(|c| Column { name: column_name(c, levels), names: Vec::new(), parents: Vec::new() })
            .collect();
        let mut rows = Array2::<i64>::zeros((items.len(), n_cols));
        let mut prev: Option<&Vec<&str>> = None;
        for &i in &order {
            let key = &keys[i];
            // From the first column where this key differs from the previous one, every column
            // opens a new id (sorted order keeps each column's equal keys together); a new id's
            // parent is the coarser column's current (last) id.
            let first_new = match prev {
                None => 0,
                Some(p) => (0..n_cols).find(|&c| p[c] != key[c]).unwrap_or(n_cols),
            };
            for c in 0..n_cols {
                if c >= first_new {
                    columns[c].names.push(key[c].to_string());
                    if c > 0 {
                        let parent = columns[c - 1].names.len() - 1;
                        columns[c].parents.push(parent as u32);
                    }
                }
                rows[[i, c]] = columns[c].names.len() as i64 - 1;
            }
            prev = Some(key);
        }
        Labels { levels, columns, rows }
    }

    /// Number of columns (`levels + 3`).
    pub fn n_columns(&self) -> usize {
        self.columns.len()
    }

    pub fn product_column(&self) -> usize {
        self.levels
    }

    pub fn variation_column(&self) -> usize {
        self.levels + 1
    }

    pub fn image_column(&self) -> usize {
        self.levels + 2
    }

    /// How many ids column `c` has.
    pub fn classes(&self, c: usize) -> usize {
        self.columns[c].len()
    }

    /// The labels of item `i`, coarse -> fine.
    pub fn row(&self, i: usize) -> ArrayView1<'_, i64> {
        self.rows.row(i)
    }

    /// The name of `id` in column `c` (the last part of its key), if it exists.
    pub fn name(&self, c: usize, id: i64) -> Option<&str> {
        let col = self.columns.get(c)?;
        col.names.get(usize::try_from(id).ok()?).map(String::as_str)
    }

    /// The full key of `id` in column `c`: the names of it and everything above it, coarse first
    /// (the empty names of padded levels included).
    pub fn key(&self, c: usize, id: i64) -> Option<Vec<&str>> {
        let mut id = usize::try_from(id).ok()?;
        let mut key = Vec::with_capacity(c + 1);
        for col in (0..=c).rev() {
            let column = self.columns.get(col)?;
            key.push(column.names.get(id)?.as_str());
            if col > 0 {
                id = column.parents[id] as usize;
            }
        }
        key.reverse();
        Some(key)
    }

    /// The category path of a taxonomy-level id (`c < levels`), e.g. `Smileys & Emotion/face-smiling`.
    pub fn category_path(&self, c: usize, id: i64) -> Option<String> {
        if c >= self.levels {
            return None;
        }
        let key = self.key(c, id)?;
        Some(key.into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join("/"))
    }
}

fn column_name(c: usize, levels: usize) -> String {
    match c.checked_sub(levels) {
        None => format!("level{}", c + 1),
        Some(0) => "product".into(),
        Some(1) => "variation".into(),
        Some(_) => "image".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;

    fn item(id: &str, category: &str, product: &str, variation: &str) -> Item {
        Item::new(id, category, product, variation)
    }

    fn catalogue() -> Vec<Item> {
        vec![
            item("i5", "shoes/boots", "classic", "black"),
            item("i1", "bags/totes", "classic", "red"),
            item("i2", "bags/totes", "classic", "red"),
            item("i3", "bags/totes", "classic", "blue"),
            item("i4", "bags/clutch", "mini", "red"),
            item("i6", "shoes/boots", "classic", "brown"),
            item("i7", "shoes/sandals", "strap", "black"),
        ]
    }

    /// The independent reference: for each column, the rank of the item's full key among the
    /// sorted distinct full keys.
    fn reference_ids(items: &[Item], levels: usize) -> Vec<Vec<i64>> {
        let keys: Vec<Vec<String>> = items
            .iter()
            .map(|it| {
                let mut k: Vec<String> = it.category.split('/').map(String::from).collect();
                k.resize(levels, String::new());
                k.extend([it.product.clone(), it.variation.clone(), it.id.clone()]);
                k
            })
            .collect();
        (0..levels + 3)
            .map(|c| {
                let distinct: BTreeSet<&[String]> = keys.iter().map(|k| &k[..=c]).collect();
                let rank: HashMap<&[String], i64> = distinct.into_iter().zip(0..).collect();
                keys.iter().map(|k| rank[&k[..=c]]).collect()
            })
            .collect()
    }

    #[test]
    fn columns_are_coarse_to_fine_and_match_the_reference() {
        let items = catalogue();
        let labels = Labels::encode(&items);
        assert_eq!(labels.levels, 2);
        let names: Vec<_> = labels.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["level1", "level2", "product", "variation", "image"]);
        assert_eq!(labels.rows.dim(), (items.len(), 5));
        let reference = reference_ids(&items, 2);
        for (c, expected) in reference.iter().enumerate() {
            let got: Vec<i64> = labels.rows.column(c).to_vec();
            assert_eq!(&got, expected, "column {c}");
            // dense 0..n
            let distinct: BTreeSet<i64> = got.iter().copied().collect();
            assert_eq!(distinct, (0..labels.classes(c) as i64).collect());
        }
        // coarse -> fine: equal fine ids imply equal coarse ids
        for a in 0..items.len() {
            for b in 0..items.len() {
                for c in 1..5 {
                    if labels.rows[[a, c]] == labels.rows[[b, c]] {
                        assert_eq!(labels.rows[[a, c - 1]], labels.rows[[b, c - 1]]);
                    }
                }
            }
        }
        assert_eq!(labels.classes(labels.image_column()), items.len());
    }

    #[test]
    fn equal_names_under_different_parents_do_not_collide() {
        let items = catalogue();
        let labels = Labels::encode(&items);
        let p = labels.product_column();
        // "classic" exists under bags/totes and shoes/boots: two products
        let tote = labels.rows[[1, p]];
        let boot = labels.rows[[0, p]];
        assert_ne!(tote, boot);
        assert_eq!(labels.name(p, tote), Some("classic"));
        assert_eq!(labels.name(p, boot), Some("classic"));
        // "red" under two products: two variations; the two i1/i2 images share one
        let v = labels.variation_column();
        assert_ne!(labels.rows[[1, v]], labels.rows[[4, v]]);
        assert_eq!(labels.rows[[1, v]], labels.rows[[2, v]]);
        assert_ne!(labels.rows[[1, labels.image_column()]], labels.rows[[2, labels.image_column()]]);
    }

    #[test]
    fn decoding_tables_map_ids_back_to_keys() {
        let items = catalogue();
        let labels = Labels::encode(&items);
        for (i, it) in items.iter().enumerate() {
            let row = labels.row(i);
            let key = labels.key(labels.image_column(), row[labels.image_column()]).unwrap();
            let cat: Vec<&str> = it.category.split('/').collect();
            assert_eq!(&key[..2], &cat[..]);
            assert_eq!(&key[2..], &[it.product.as_str(), it.variation.as_str(), it.id.as_str()]);
            assert_eq!(labels.category_path(1, row[1]).unwrap(), it.category);
        }
        assert_eq!(labels.name(0, 99), None);
        assert_eq!(labels.category_path(2, 0), None);
    }

    #[test]
    fn encoding_does_not_depend_on_item_order_and_pads_shallow_paths() {
        let mut items = catalogue();
        items.push(item("i8", "misc", "thing", "default"));
        let a = Labels::encode(&items);
        let mut reversed = items.clone();
        reversed.reverse();
        let b = Labels::encode(&reversed);
        let n = items.len();
        for i in 0..n {
            assert_eq!(a.row(i), b.row(n - 1 - i));
        }
        assert_eq!(a.columns, b.columns);
        let misc = n - 1;
        assert_eq!(a.category_path(1, a.rows[[misc, 1]]).unwrap(), "misc");
        assert_eq!(a.rows.column(1).iter().filter(|&&x| x == a.rows[[misc, 1]]).count(), 1);
        assert_eq!(reference_ids(&items, 2)[1][misc], a.rows[[misc, 1]]);
    }
}
