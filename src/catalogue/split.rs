//! The seen/unseen split (a stable hash of seed + product key), the validation hold-out inside
//! the seen products, and query/gallery roles.
//!
//! A product's side is decided by ranking: within each leaf category (an item's `category`),
//! its products are ordered by `stable_hash(seed, [category, product])` and the first
//! `round(n * unseen_fraction)` become `test` (unseen), the rest `train`. So every leaf category
//! gets its share (not only on average), the split depends on the seed and the set of products
//! only — never on item order or on other categories — and a different seed draws a different
//! split. `--unseen-by category` ranks the leaf categories the same way and holds out whole ones.
//!
//! Settings are chosen on a validation set, never on the unseen split: [`Subset::Val`] holds
//! [`VALIDATION_FRACTION`] of the seen products of every leaf category (ranked the same way, by a
//! hash salted apart from the unseen split's), [`Subset::Fit`] the rest of the seen products. A
//! run that chooses settings trains on `fit` and is evaluated on `val`; the shipped model may
//! then train on all of `train`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use super::{Item, Role, Split};
use crate::{Error, Result};

/// Share of each leaf category's seen products held out as the validation set.
pub const VALIDATION_FRACTION: f64 = 0.2;

/// A part of a catalogue to train or evaluate on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Subset {
    /// Seen products: the manifest's `train` split.
    Train,
    /// Unseen products: the manifest's `test` split (reported, never used to choose settings).
    Test,
    /// Seen products outside the validation set: what a run that chooses settings trains on.
    Fit,
    /// The validation set: [`VALIDATION_FRACTION`] of the seen products of each leaf category.
    Val,
}

impl Subset {
    pub fn as_str(self) -> &'static str {
        match self {
            Subset::Train => "train",
            Subset::Test => "test",
            Subset::Fit => "fit",
            Subset::Val => "val",
        }
    }

    /// Whether the subset's products are seen in a run trained on `train` (or `fit`).
    pub fn seen(self) -> bool {
        self != Subset::Test
    }

    /// The manifest split the subset lies in.
    pub fn split(self) -> Split {
        if self == Subset::Test { Split::Test } else { Split::Train }
    }

    /// The items of `items` in this subset, in their order.
    pub fn select<'a>(self, items: impl IntoIterator<Item = &'a Item>) -> Vec<&'a Item> {
        let in_split: Vec<&Item> = items.into_iter().filter(|it| it.split == self.split()).collect();
        match self {
            Subset::Train | Subset::Test => in_split,
            Subset::Fit | Subset::Val => {
                let val = validation_products(in_split.iter().copied());
                let want = self == Subset::Val;
                in_split
                    .into_iter()
                    .filter(|it| val.contains(&(it.category.as_str(), it.product.as_str())) == want)
                    .collect()
            }
        }
    }
}

impl From<Split> for Subset {
    fn from(s: Split) -> Subset {
        match s {
            Split::Train => Subset::Train,
            Split::Test => Subset::Test,
        }
    }
}

impl FromStr for Subset {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Subset::Train),
            "test" => Ok(Subset::Test),
            "fit" => Ok(Subset::Fit),
            "val" => Ok(Subset::Val),
            _ => Err(Error::InvalidArgument {
                name: "split",
                reason: format!("{s:?}: expected train (seen), test (unseen), fit (seen minus validation) or val"),
            }),
        }
    }
}

impl fmt::Display for Subset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The validation products `(leaf category, product)` among `seen` items: per leaf category,
/// the first `round(n * VALIDATION_FRACTION)` products ranked by a hash of
/// `["validation", category, product]` (seed 0).
pub fn validation_products<'a>(seen: impl IntoIterator<Item = &'a Item>) -> HashSet<(&'a str, &'a str)> {
    let mut per_leaf: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for it in seen {
        per_leaf.entry(&it.category).or_default().insert(&it.product);
    }
    per_leaf
        .iter()
        .flat_map(|(&cat, products)| {
            unseen_keys(0, products.iter().map(|&p| vec!["validation", cat, p]), VALIDATION_FRACTION)
        })
        .map(|k| (k[1], k[2]))
        .collect()
}

/// What the unseen split holds out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnseenBy {
    /// A share of the products of every leaf category (the default).
    #[default]
    Product,
    /// A share of the leaf categories, with all their products.
    Category,
}

impl FromStr for UnseenBy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "product" => Ok(UnseenBy::Product),
            "category" => Ok(UnseenBy::Category),
            _ => Err(Error::InvalidArgument {
                name: "unseen-by",
                reason: format!("{s:?}: expected `product` or `category`"),
            }),
        }
    }
}

impl fmt::Display for UnseenBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnseenBy::Product => "product",
            UnseenBy::Category => "category",
        })
    }
}

/// How to draw the seen/unseen split.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitOptions {
    pub seed: u64,
    /// Share of products (or leaf categories) that go to `test`, in `[0, 1]`; default 0.25.
    pub unseen_fraction: f64,
    pub unseen_by: UnseenBy,
}

impl Default for SplitOptions {
    fn default() -> Self {
        SplitOptions { seed: 0, unseen_fraction: 0.25, unseen_by: UnseenBy::Product }
    }
}

impl SplitOptions {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.unseen_fraction) {
            return Err(Error::InvalidArgument {
                name: "unseen-fraction",
                reason: format!("{} is not in [0, 1]", self.unseen_fraction),
            });
        }
        Ok(())
    }
}

/// A hash of `seed` and the key's parts that is the same on every machine and every run: the
/// first 8 bytes (big-endian) of SHA-256 over the seed (little-endian) and each part, each part
/// preceded by its length so that `["ab", "c"]` and `["a", "bc"]` differ.
pub fn stable_hash(seed: u64, key: &[&str]) -> u64 {
    let mut h = Sha256::new();
    h.update(b"hiercon-split-v1");
    h.update(seed.to_le_bytes());
    for part in key {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The first `round(len * fraction)` of `keys` ranked by hash (ties by key) are unseen.
fn unseen_keys<'a>(seed: u64, keys: impl IntoIterator<Item = Vec<&'a str>>, fraction: f64) -> Vec<Vec<&'a str>> {
    let mut ranked: Vec<(u64, Vec<&str>)> = keys.into_iter().map(|k| (stable_hash(seed, &k), k)).collect();
    ranked.sort();
    let n = (ranked.len() as f64 * fraction).round() as usize;
    ranked.into_iter().take(n).map(|(_, k)| k).collect()
}

/// Sets every item's `split`; see the module docs for the rule.
pub fn assign_splits(items: &mut [Item], opts: &SplitOptions) -> Result<()> {
    opts.validate()?;
    let unseen: BTreeSet<(String, Option<String>)> = match opts.unseen_by {
        UnseenBy::Product => {
            let mut per_leaf: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
            for it in items.iter() {
                per_leaf.entry(&it.category).or_default().insert(&it.product);
            }
            per_leaf
                .iter()
                .flat_map(|(&cat, products)| {
                    unseen_keys(opts.seed, products.iter().map(|&p| vec![cat, p]), opts.unseen_fraction)
                })
                .map(|k| (k[0].to_string(), Some(k[1].to_string())))
                .collect()
        }
        UnseenBy::Category => {
            let leaves: BTreeSet<&str> = items.iter().map(|it| it.category.as_str()).collect();
            unseen_keys(opts.seed, leaves.into_iter().map(|c| vec![c]), opts.unseen_fraction)
                .into_iter()
                .map(|k| (k[0].to_string(), None))
                .collect()
        }
    };
    let mut test_items = 0usize;
    for it in items.iter_mut() {
        let key = match opts.unseen_by {
            UnseenBy::Product => (it.category.clone(), Some(it.product.clone())),
            UnseenBy::Category => (it.category.clone(), None),
        };
        it.split = if unseen.contains(&key) { Split::Test } else { Split::Train };
        test_items += usize::from(it.split == Split::Test);
    }
    tracing::debug!(unseen = unseen.len(), test_items, by = %opts.unseen_by, seed = opts.seed, "assigned splits");
    Ok(())
}

/// Sets `role` from the view: `query_view` items are queries, `gallery_view` items the gallery,
/// any other view gets no role.
pub fn assign_roles_by_view(items: &mut [Item], query_view: &str, gallery_view: &str) {
    for it in items.iter_mut() {
        it.role = if it.view == query_view {
            Some(Role::Query)
        } else if it.view == gallery_view {
            Some(Role::Gallery)
        } else {
            None
        };
    }
}

/// Items per split, counted by product key `(category, product)`: a quick check that every
/// product is on one side only.
pub fn products_by_split(items: &[Item]) -> HashMap<(&str, &str), BTreeSet<Split>> {
    let mut out: HashMap<(&str, &str), BTreeSet<Split>> = HashMap::new();
    for it in items {
        out.entry((it.category.as_str(), it.product.as_str())).or_default().insert(it.split);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `leaves` leaf categories under 3 top-level ones, `products` products each (some product
    /// names repeated across categories), 2 images a product.
    fn generated(leaves: usize, products: usize) -> Vec<Item> {
        let mut items = Vec::new();
        for l in 0..leaves {
            for p in 0..products {
                for v in 0..2 {
                    items.push(Item {
                        id: format!("{l}-{p}-{v}"),
                        image: format!("{l}-{p}-{v}.png"),
                        category: format!("top{}/leaf{l}", l % 3),
                        product: format!("p{}", p + l % 2),
                        variation: "default".into(),
                        view: if v == 0 { "a" } else { "b" }.into(),
                        split: Split::Train,
                        role: None,
                        title: None,
                        attributes: Default::default(),
                    });
                }
            }
        }
        items
    }

    fn split_of(items: &[Item], opts: &SplitOptions) -> Vec<Split> {
        let mut items = items.to_vec();
        assign_splits(&mut items, opts).unwrap();
        items.iter().map(|it| it.split).collect()
    }

    #[test]
    fn default_holds_out_a_quarter_of_each_leaf_categorys_products() {
        let mut items = generated(12, 17);
        assign_splits(&mut items, &SplitOptions::default()).unwrap();
        let by_product = products_by_split(&items);
        assert!(by_product.values().all(|s| s.len() == 1), "a product on both sides");
        for l in 0..12 {
            let cat = format!("top{}/leaf{l}", l % 3);
            let test = by_product.iter().filter(|((c, _), s)| *c == cat && s.contains(&Split::Test)).count();
            assert_eq!(test, (17.0f64 * 0.25).round() as usize, "{cat}");
        }
    }

    #[test]
    fn stable_across_runs_and_item_order_and_changes_with_seed() {
        let items = generated(6, 20);
        let opts = SplitOptions::default();
        let a = split_of(&items, &opts);
        assert_eq!(a, split_of(&items, &opts));
        let mut reversed = items.clone();
        reversed.reverse();
        let mut b = split_of(&reversed, &opts);
        b.reverse();
        assert_eq!(a, b);
        let c = split_of(&items, &SplitOptions { seed: 1, ..opts.clone() });
        assert_ne!(a, c);
        assert_eq!(a.iter().filter(|s| **s == Split::Test).count(), c.iter().filter(|s| **s == Split::Test).count());
    }

    #[test]
    fn every_product_is_held_out_about_as_often_over_seeds() {
        let items = generated(1, 8);
        let mut unseen: HashMap<String, usize> = HashMap::new();
        let seeds = 400;
        for seed in 0..seeds {
            let mut items = items.clone();
            assign_splits(&mut items, &SplitOptions { seed, ..Default::default() }).unwrap();
            for it in items.iter().filter(|it| it.split == Split::Test && it.view == "a") {
                *unseen.entry(it.product.clone()).or_default() += 1;
            }
        }
        // 2 of 8 products each time: each one's share should be near 0.25 (binomial sd ~0.022).
        for (product, n) in &unseen {
            let share = *n as f64 / seeds as f64;
            assert!((0.15..0.35).contains(&share), "{product}: {share}");
        }
        assert_eq!(unseen.len(), 8);
    }

    #[test]
    fn unseen_by_category_holds_out_whole_leaf_categories() {
        let mut items = generated(12, 5);
        let opts = SplitOptions { unseen_by: UnseenBy::Category, ..Default::default() };
        assign_splits(&mut items, &opts).unwrap();
        let mut per_leaf: BTreeMap<&str, BTreeSet<Split>> = BTreeMap::new();
        for it in &items {
            per_leaf.entry(&it.category).or_default().insert(it.split);
        }
        assert!(per_leaf.values().all(|s| s.len() == 1), "a leaf category on both sides");
        let test_leaves = per_leaf.values().filter(|s| s.contains(&Split::Test)).count();
        assert_eq!(test_leaves, 3);
    }

    #[test]
    fn fraction_bounds_and_parsing() {
        let mut items = generated(2, 4);
        let bad = SplitOptions { unseen_fraction: 1.5, ..Default::default() };
        assert!(matches!(assign_splits(&mut items, &bad), Err(Error::InvalidArgument { .. })));
        assign_splits(&mut items, &SplitOptions { unseen_fraction: 0.0, ..Default::default() }).unwrap();
        assert!(items.iter().all(|it| it.split == Split::Train));
        assign_splits(&mut items, &SplitOptions { unseen_fraction: 1.0, ..Default::default() }).unwrap();
        assert!(items.iter().all(|it| it.split == Split::Test));
        assert_eq!("category".parse::<UnseenBy>().unwrap(), UnseenBy::Category);
        assert!("leaf".parse::<UnseenBy>().is_err());
    }

    #[test]
    fn hash_separates_key_parts() {
        assert_ne!(stable_hash(0, &["ab", "c"]), stable_hash(0, &["a", "bc"]));
        assert_ne!(stable_hash(0, &["x"]), stable_hash(1, &["x"]));
        assert_eq!(stable_hash(7, &["x", "y"]), stable_hash(7, &["x", "y"]));
    }

    #[test]
    fn roles_follow_views() {
        let mut items = generated(1, 2);
        items[0].view = "c".into();
        assign_roles_by_view(&mut items, "a", "b");
        assert_eq!(items[0].role, None);
        assert_eq!(items[1].role, Some(Role::Gallery));
        assert_eq!(items[2].role, Some(Role::Query));
    }

    #[test]
    fn validation_is_a_share_of_each_leafs_seen_products() {
        let mut items = generated(6, 20);
        assign_splits(&mut items, &SplitOptions::default()).unwrap();
        let (train, test) = (Subset::Train.select(&items), Subset::Test.select(&items));
        let (fit, val) = (Subset::Fit.select(&items), Subset::Val.select(&items));
        assert_eq!(fit.len() + val.len(), train.len());
        assert!(test.iter().all(|it| it.split == Split::Test));
        // Fit and val share no product; every leaf gives round(15 * 0.2) = 3 of its 15 seen
        // products (both images of each) to val.
        let key = |it: &&Item| (it.category.clone(), it.product.clone());
        let val_keys: BTreeSet<_> = val.iter().map(key).collect();
        assert!(fit.iter().all(|it| !val_keys.contains(&key(it))));
        let mut per_leaf: BTreeMap<&str, usize> = BTreeMap::new();
        for (c, _) in &val_keys {
            *per_leaf.entry(c.as_str()).or_default() += 1;
        }
        assert_eq!(per_leaf.len(), 6);
        assert!(per_leaf.values().all(|&n| n == 3), "{per_leaf:?}");
        assert_eq!(val.len(), 6 * 3 * 2);
        // It does not depend on item order, and is not the next ranks of the unseen split's hash.
        let mut shuffled = items.clone();
        shuffled.reverse();
        let again: BTreeSet<_> = Subset::Val.select(&shuffled).iter().map(key).collect();
        assert_eq!(again, val_keys);
        let unseen_order: BTreeSet<_> = {
            let mut seen_items: Vec<Item> = train.iter().map(|&it| it.clone()).collect();
            assign_splits(&mut seen_items, &SplitOptions { unseen_fraction: 0.2, ..Default::default() }).unwrap();
            seen_items
                .iter()
                .filter(|it| it.split == Split::Test)
                .map(|it| (it.category.clone(), it.product.clone()))
                .collect()
        };
        assert_ne!(unseen_order, val_keys);
        assert_eq!("val".parse::<Subset>().unwrap(), Subset::Val);
        assert!("valid".parse::<Subset>().is_err());
    }
}
