//! The imported catalogues (`make data`): when `HIERCON_TEST_DATA` names the data folder
//! (`make test` sets it), the emoji and Fashion-MNIST manifests must be there and hold what the
//! sources contain. Without the variable the tests say so and pass; with it, missing files fail.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use hiercon::catalogue::{Labels, Manifest, Role, Split, Summary, Taxonomy};

/// `$HIERCON_TEST_DATA/<rel>`, or `None` (test skipped) when the variable is unset.
fn data_file(rel: &str) -> Option<PathBuf> {
    match std::env::var_os("HIERCON_TEST_DATA") {
        Some(dir) => Some(PathBuf::from(dir).join(rel)),
        None => {
            eprintln!("HIERCON_TEST_DATA is not set: skipping (run `make test`, which imports the data first)");
            None
        }
    }
}

fn read(path: &PathBuf) -> Result<Manifest> {
    ensure!(path.is_file(), "{} is missing although HIERCON_TEST_DATA is set: run `make data`", path.display());
    Manifest::read(path).with_context(|| format!("reading {}", path.display()))
}

#[test]
fn emoji_catalogue() -> Result<()> {
    let Some(path) = data_file("emoji/manifest.jsonl") else { return Ok(()) };
    let m = read(&path)?;
    let s = Summary::of(&m.items);
    eprintln!("{s}");
    ensure!(s.levels == vec![10, 99], "categories per level: {:?}", s.levels);
    ensure!((1_800..=2_000).contains(&s.products), "products: {}", s.products);
    let views: BTreeSet<&str> = s.views.keys().map(String::as_str).collect();
    ensure!(views == BTreeSet::from(["google", "twitter"]), "views: {views:?}");
    ensure!(s.query > 0 && s.gallery > 0 && s.no_role == 0, "roles: {s:?}");
    ensure!(s.train.products > 0 && s.test.products > 0, "splits: {s:?}");
    for it in &m.items {
        ensure!(m.image_path(it).is_file(), "{}: missing image {}", it.id, it.image);
        let expected = if it.view == "twitter" { Role::Query } else { Role::Gallery };
        ensure!(it.role == Some(expected), "{}: role {:?}", it.id, it.role);
    }
    ensure!(m.dir.join("ATTRIBUTION.md").is_file(), "ATTRIBUTION.md missing");
    // a product sits on one side of the split only
    let sides: BTreeSet<(&str, Split)> = m.items.iter().map(|it| (it.product.as_str(), it.split)).collect();
    ensure!(sides.len() == s.products, "a product is on both sides of the split");
    let labels = Labels::encode(&m.items);
    ensure!(labels.n_columns() == 5, "label columns: {}", labels.n_columns());
    ensure!(labels.classes(labels.product_column()) == s.products);
    Ok(())
}

#[test]
fn fashion_mnist_catalogue() -> Result<()> {
    let Some(path) = data_file("fashion-mnist/manifest.jsonl") else { return Ok(()) };
    let m = read(&path)?;
    let s = Summary::of(&m.items);
    eprintln!("{s}");
    ensure!(s.items == 70_000, "items: {}", s.items);
    ensure!(s.levels == vec![5, 10], "groups / classes: {:?}", s.levels);
    ensure!((s.train.items, s.test.items) == (60_000, 10_000), "official split: {s:?}");
    let tax = Taxonomy::from_items(&m.items);
    let groups: Vec<&str> = tax.roots().map(|n| n.name.as_str()).collect();
    ensure!(groups == ["bags", "bottoms", "dresses", "footwear", "tops"], "groups: {groups:?}");
    ensure!(tax.children("tops").map_or(0, |c| c.len()) == 4, "tops should have 4 classes");
    for it in m.items.iter().step_by(997) {
        ensure!(m.image_path(it).is_file(), "{}: missing image {}", it.id, it.image);
    }
    Ok(())
}
