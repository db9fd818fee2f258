//! A catalogue's counts (items, categories per level, products, variations, views, splits,
//! roles) with a readable `Display`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use super::taxonomy::Taxonomy;
use super::{Item, Role, Split};

/// Counts of one split.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitCounts {
    pub items: usize,
    /// Distinct `(category, product)` keys.
    pub products: usize,
}

/// What a catalogue holds. Products and variations are counted by their full key, so the same
/// product name under two categories counts twice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub items: usize,
    /// Categories at each taxonomy level, level 1 first.
    pub levels: Vec<usize>,
    /// Leaf categories (categories with no sub-categories).
    pub leaf_categories: usize,
    pub products: usize,
    pub variations: usize,
    /// Items per view (e.g. per emoji vendor).
    pub views: BTreeMap<String, usize>,
    pub train: SplitCounts,
    pub test: SplitCounts,
    pub query: usize,
    pub gallery: usize,
    /// Items without a role (leave-one-out retrieval).
    pub no_role: usize,
}

impl Summary {
    pub fn of(items: &[Item]) -> Summary {
        let taxonomy = Taxonomy::from_items(items);
        let mut products = HashSet::new();
        let mut variations = HashSet::new();
        let mut split_products: [HashSet<(&str, &str)>; 2] = Default::default();
        let mut s = Summary {
            items: items.len(),
            levels: taxonomy.level_sizes(),
            leaf_categories: taxonomy.leaves().count(),
            ..Summary::default()
        };
        for it in items {
            let product = (it.category.as_str(), it.product.as_str());
            products.insert(product);
            variations.insert((it.category.as_str(), it.product.as_str(), it.variation.as_str()));
            *s.views.entry(it.view.clone()).or_default() += 1;
            let (counts, set) = match it.split {
                Split::Train => (&mut s.train, &mut split_products[0]),
                Split::Test => (&mut s.test, &mut split_products[1]),
            };
            counts.items += 1;
            set.insert(product);
            match it.role {
                Some(Role::Query) => s.query += 1,
                Some(Role::Gallery) => s.gallery += 1,
                None => s.no_role += 1,
            }
        }
        s.products = products.len();
        s.variations = variations.len();
        s.train.products = split_products[0].len();
        s.test.products = split_products[1].len();
        s
    }
}

/// `1234567` -> `1,234,567`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let levels: Vec<String> = self.levels.iter().map(|&n| thousands(n)).collect();
        writeln!(f, "items        {}", thousands(self.items))?;
        writeln!(
            f,
            "taxonomy     {} level{}: {} categories ({} leaves)",
            self.levels.len(),
            if self.levels.len() == 1 { "" } else { "s" },
            levels.join(" / "),
            thousands(self.leaf_categories)
        )?;
        writeln!(f, "products     {}", thousands(self.products))?;
        writeln!(f, "variations   {}", thousands(self.variations))?;
        let views: Vec<String> = self
            .views
            .iter()
            .map(|(v, n)| format!("{} {}", if v.is_empty() { "(none)" } else { v }, thousands(*n)))
            .collect();
        writeln!(f, "views        {}", views.join(", "))?;
        writeln!(
            f,
            "split        train {} items / {} products (seen), test {} items / {} products (unseen)",
            thousands(self.train.items),
            thousands(self.train.products),
            thousands(self.test.items),
            thousands(self.test.products)
        )?;
        write!(
            f,
            "roles        query {}, gallery {}, none {}",
            thousands(self.query),
            thousands(self.gallery),
            thousands(self.no_role)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, category: &str, product: &str, variation: &str, view: &str, split: Split) -> Item {
        Item {
            view: view.into(),
            split,
            role: if view == "q" { Some(Role::Query) } else { None },
            ..Item::new(id, category, product, variation)
        }
    }

    #[test]
    fn counts_by_full_keys() {
        let items = vec![
            item("1", "a/b", "p", "x", "q", Split::Train),
            item("2", "a/b", "p", "x", "g", Split::Train),
            item("3", "a/b", "p", "y", "g", Split::Train),
            item("4", "a/c", "p", "x", "g", Split::Test),
            item("5", "d/e", "r", "x", "q", Split::Test),
        ];
        let s = Summary::of(&items);
        assert_eq!(s.items, 5);
        assert_eq!(s.levels, vec![2, 3]);
        assert_eq!(s.leaf_categories, 3);
        assert_eq!(s.products, 3);
        assert_eq!(s.variations, 4);
        assert_eq!(s.views.get("g"), Some(&3));
        assert_eq!(s.train, SplitCounts { items: 3, products: 1 });
        assert_eq!(s.test, SplitCounts { items: 2, products: 2 });
        assert_eq!((s.query, s.gallery, s.no_role), (2, 0, 3));
        let text = s.to_string();
        assert!(text.contains("2 levels: 2 / 3 categories"), "{text}");
        assert!(text.contains("test 2 items / 2 products"), "{text}");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(70000), "70,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
