//! A catalogue from any images plus a CSV with the header `image,category,product,variation`
//! (optional columns `view` and `role`; image paths relative to the CSV's folder).
//!
//! The images are copied to `out/images/<the CSV's path>` so the output folder is
//! self-contained; an item's id is its image path as written in the CSV. Splits are the hashed
//! seen/unseen split; roles come from the `role` column (`query`, `gallery` or empty) if there
//! is one, and are null (leave-one-out) otherwise.

use std::path::{Path, PathBuf};

use super::{IMAGES_DIR, copy_files, create_dir, finish};
use crate::catalogue::manifest::{Checker, LineIssue, Problem};
use crate::catalogue::{Item, Manifest, Role, Split, SplitOptions, assign_splits};
use crate::{Error, Result};

/// Required CSV columns.
pub const REQUIRED: [&str; 4] = ["image", "category", "product", "variation"];
/// Optional CSV columns.
pub const OPTIONAL: [&str; 2] = ["view", "role"];
/// Image file extensions accepted (what the image pipeline decodes).
pub const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

fn csv_error(path: &Path, issues: Vec<LineIssue>) -> Error {
    Error::CsvRows { path: path.to_path_buf(), issues }
}

/// Reads the CSV (every bad row reported with its line), copies the images and writes
/// `out/manifest.jsonl`.
pub fn import(csv_path: &Path, out: &Path, split: &SplitOptions) -> Result<Manifest> {
    split.validate()?;
    let csv_dir = match csv_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file = std::fs::File::open(csv_path).map_err(|e| Error::io(csv_path, e))?;
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(file);
    let headers = reader
        .headers()
        .map_err(|e| {
            csv_error(
                csv_path,
                vec![LineIssue { line: 1, field: "header", problem: Problem::Malformed(e.to_string()) }],
            )
        })?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h == name);
    let missing: Vec<LineIssue> = REQUIRED
        .iter()
        .filter(|name| column(name).is_none())
        .map(|&field| LineIssue { line: 1, field, problem: Problem::Missing })
        .collect();
    if !missing.is_empty() {
        return Err(csv_error(csv_path, missing));
    }
    let [image_col, category_col, product_col, variation_col] = REQUIRED.map(|n| column(n).unwrap_or_default());
    let (view_col, role_col) = (column(OPTIONAL[0]), column(OPTIONAL[1]));

    let mut checker = Checker::new(&csv_dir, true);
    let mut items = Vec::new();
    let mut copies = Vec::new();
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line() as usize);
                checker.issues.push(LineIssue { line, field: "row", problem: Problem::Malformed(e.to_string()) });
                continue;
            }
        };
        let line = record.position().map_or(0, |p| p.line() as usize);
        let get = |c: usize| record.get(c).unwrap_or("").to_string();
        let image = get(image_col);
        let image = image.strip_prefix("./").map(str::to_string).unwrap_or(image);
        let role = match role_col.map(get).as_deref() {
            None | Some("") => None,
            Some("query") => Some(Role::Query),
            Some("gallery") => Some(Role::Gallery),
            Some(other) => {
                checker.issues.push(LineIssue {
                    line,
                    field: "role",
                    problem: Problem::UnknownValue { value: other.into(), expected: "query, gallery or empty" },
                });
                None
            }
        };
        let ext = Path::new(&image).extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        if !image.is_empty() && !EXTENSIONS.contains(&ext.as_str()) {
            checker.issues.push(LineIssue {
                line,
                field: "image",
                problem: Problem::UnknownValue { value: image.clone(), expected: "a .png, .jpg, .jpeg or .webp file" },
            });
        }
        // Checked as written (relative to the CSV), then moved under images/.
        let item = Item {
            id: image.clone(),
            image: image.clone(),
            category: get(category_col),
            product: get(product_col),
            variation: get(variation_col),
            view: view_col.map(get).unwrap_or_default(),
            split: Split::Train,
            role,
        };
        checker.check(&item, line);
        let copied = format!("{IMAGES_DIR}/{image}");
        copies.push((csv_dir.join(&image), out.join(&copied)));
        items.push(Item { image: copied, ..item });
    }
    if !checker.issues.is_empty() {
        return Err(csv_error(csv_path, checker.issues));
    }
    if items.is_empty() {
        return Err(Error::SourceFormat { path: csv_path.to_path_buf(), problem: "no rows".into() });
    }
    create_dir(out)?;
    copy_files("images", &copies)?;
    assign_splits(&mut items, split)?;
    finish(out, items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        ::image::GrayImage::from_pixel(2, 2, ::image::Luma([9])).save(path).unwrap();
    }

    fn csv_issues(result: Result<Manifest>) -> Vec<(usize, &'static str)> {
        match result {
            Err(Error::CsvRows { issues, .. }) => issues.iter().map(|i| (i.line, i.field)).collect(),
            other => panic!("expected a CSV error, got {other:?}"),
        }
    }

    #[test]
    fn imports_images_and_csv() {
        let src = tempfile::tempdir().unwrap();
        for f in ["a/1.png", "a/2.png", "b/3.png"] {
            png(&src.path().join(f));
        }
        let csv = src.path().join("labels.csv");
        std::fs::write(
            &csv,
            "image,category,product,variation,role\n\
             a/1.png,shoes/boots,p1,red,query\n\
             ./a/2.png,shoes/boots,p1,red,gallery\n\
             b/3.png,bags,p2,blue,\n",
        )
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        let m = import(&csv, out.path(), &SplitOptions::default()).unwrap();
        assert_eq!(m.items.len(), 3);
        let it = m.get("a/2.png").unwrap();
        assert_eq!(
            (it.image.as_str(), it.category.as_str(), it.role),
            ("images/a/2.png", "shoes/boots", Some(Role::Gallery))
        );
        assert_eq!(m.get("b/3.png").unwrap().role, None);
        assert!(m.image_path(it).is_file());
        assert_eq!(Manifest::read(out.path().join("manifest.jsonl")).unwrap().items, m.items);
    }

    #[test]
    fn bad_rows_are_reported_with_their_lines() {
        let src = tempfile::tempdir().unwrap();
        png(&src.path().join("ok.png"));
        let csv = src.path().join("labels.csv");
        std::fs::write(
            &csv,
            "image,category,product,variation\n\
             ok.png,shoes,p1,v\n\
             gone.png,shoes,p1,v\n\
             ok.png,shoes,,v\n\
             ok.png,a//b,p,v\n\
             ../x.png,a,p,v\n\
             ok.txt,a,p,v\n\
             too,few\n",
        )
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut found = csv_issues(import(&csv, out.path(), &SplitOptions::default()));
        found.sort();
        assert_eq!(
            found,
            vec![
                (3, "image"),
                (4, "id"),
                (4, "product"),
                (5, "category"),
                (5, "id"),
                (6, "image"),
                (7, "image"),
                (7, "image"),
                (8, "row")
            ]
        );
        assert!(!out.path().join("manifest.jsonl").exists());
    }

    #[test]
    fn missing_columns_are_reported() {
        let src = tempfile::tempdir().unwrap();
        let csv = src.path().join("labels.csv");
        std::fs::write(&csv, "image,category,item\nx.png,a,b\n").unwrap();
        let out = tempfile::tempdir().unwrap();
        assert_eq!(
            csv_issues(import(&csv, out.path(), &SplitOptions::default())),
            vec![(1, "product"), (1, "variation")]
        );
    }
}
