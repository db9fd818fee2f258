//! A catalogue from any images plus a CSV with the header `image,category,product,variation`
//! (optional columns `view`, `role`, `title` and any number of `attr.NAME`; image paths relative
//! to the CSV's folder).
//!
//! An `attr.NAME` cell becomes the item's attribute `NAME`: `true` / `false` a boolean, a JSON
//! number (`12`, `-3.5`, `1e3`; not `007` or `+1`, which stay text) a number, anything else a
//! string; an empty cell leaves the attribute out for that item. An empty `title` means none.
//!
//! The images are copied to `out/images/<the CSV's path>` so the output folder is
//! self-contained; an item's id is its image path as written in the CSV. Splits are the hashed
//! seen/unseen split; roles come from the `role` column (`query`, `gallery` or empty) if there
//! is one, and are null (leave-one-out) otherwise.

use std::path::{Path, PathBuf};

use super::{IMAGES_DIR, copy_files, create_dir, finish};
use crate::catalogue::manifest::{Checker, LineIssue, Problem, check_attribute_name};
use crate::catalogue::{AttrValue, Attributes, Item, Manifest, Role, Split, SplitOptions, assign_splits};
use crate::{Error, Result};

/// Required CSV columns.
pub const REQUIRED: [&str; 4] = ["image", "category", "product", "variation"];
/// Optional CSV columns (besides `attr.NAME` ones).
pub const OPTIONAL: [&str; 3] = ["view", "role", "title"];
/// The prefix of attribute columns: `attr.brand` fills the attribute `brand`.
pub const ATTRIBUTE_PREFIX: &str = "attr.";

/// The attribute value a CSV cell holds (see the module docs); `None` for an empty cell.
pub fn cell_value(cell: &str) -> Option<AttrValue> {
    match cell {
        "" => None,
        "true" => Some(AttrValue::Bool(true)),
        "false" => Some(AttrValue::Bool(false)),
        _ => Some(match serde_json::from_str::<serde_json::Number>(cell) {
            Ok(n) => AttrValue::Number(n),
            Err(_) => AttrValue::String(cell.to_string()),
        }),
    }
}
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
    let (view_col, role_col, title_col) = (column(OPTIONAL[0]), column(OPTIONAL[1]), column(OPTIONAL[2]));
    let mut header_issues = Vec::new();
    let mut attr_cols: Vec<(String, usize)> = Vec::new();
    for (col, h) in headers.iter().enumerate() {
        let Some(name) = h.strip_prefix(ATTRIBUTE_PREFIX) else { continue };
        let reason = check_attribute_name(name)
            .or_else(|| attr_cols.iter().any(|(n, _)| n == name).then_some("has two columns"));
        match reason {
            Some(reason) => header_issues.push(LineIssue {
                line: 1,
                field: "header",
                problem: Problem::BadAttribute { name: name.to_string(), reason },
            }),
            None => attr_cols.push((name.to_string(), col)),
        }
    }
    if !header_issues.is_empty() {
        return Err(csv_error(csv_path, header_issues));
    }

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
            title: title_col.map(get).filter(|t| !t.is_empty()),
            attributes: attr_cols
                .iter()
                .filter_map(|(name, col)| Some((name.clone(), cell_value(record.get(*col)?)?)))
                .collect::<Attributes>(),
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
    fn title_and_attribute_columns_fill_the_items() {
        let src = tempfile::tempdir().unwrap();
        for f in ["1.png", "2.png"] {
            png(&src.path().join(f));
        }
        let csv = src.path().join("labels.csv");
        std::fs::write(
            &csv,
            "image,category,product,variation,title,attr.brand,attr.price,attr.sale,attr.sku\n\
             1.png,shoes,p1,red,Trail runner,acme,12.5,true,007\n\
             2.png,shoes,p2,red,,,3,false,1e3\n",
        )
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        let m = import(&csv, out.path(), &SplitOptions::default()).unwrap();
        let one = m.get("1.png").unwrap();
        assert_eq!(one.title.as_deref(), Some("Trail runner"));
        let json = serde_json::to_string(&one.attributes).unwrap();
        assert_eq!(json, r#"{"brand":"acme","price":12.5,"sale":true,"sku":"007"}"#);
        let two = m.get("2.png").unwrap();
        assert_eq!(two.title, None, "an empty title is no title");
        assert_eq!(serde_json::to_string(&two.attributes).unwrap(), r#"{"price":3,"sale":false,"sku":1000.0}"#);
        assert_eq!(Manifest::read(out.path().join("manifest.jsonl")).unwrap().items, m.items);
        assert_eq!(cell_value("+1"), Some(AttrValue::String("+1".into())));
        assert_eq!(cell_value("NaN"), Some(AttrValue::String("NaN".into())));
        assert_eq!(cell_value(""), None);
    }

    #[test]
    fn bad_attribute_columns_are_reported() {
        let src = tempfile::tempdir().unwrap();
        let csv = src.path().join("labels.csv");
        std::fs::write(&csv, "image,category,product,variation,attr.,attr.a b,attr.ok,attr.ok\nx.png,a,b,c,1,2,3,4\n")
            .unwrap();
        let out = tempfile::tempdir().unwrap();
        let err = import(&csv, out.path(), &SplitOptions::default()).unwrap_err();
        let Error::CsvRows { issues, .. } = &err else { panic!("{err}") };
        let names: Vec<_> = issues
            .iter()
            .map(|i| match &i.problem {
                Problem::BadAttribute { name, .. } => (i.line, i.field, name.as_str()),
                p => panic!("{p}"),
            })
            .collect();
        assert_eq!(names, [(1, "header", ""), (1, "header", "a b"), (1, "header", "ok")]);
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
