//! The catalogue manifest: JSON Lines, one [`Item`] a line (DESIGN §3); reader with
//! line-numbered problems, atomic writer.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// The file name every source writes its manifest under, inside its output folder.
pub const MANIFEST_FILE: &str = "manifest.jsonl";

/// At most this many problems are collected before reading stops (the rest are counted as one).
const MAX_ISSUES: usize = 200;

/// Which side of the seen/unseen split an item is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Products shown in training ("seen").
    Train,
    /// Products held out of training ("unseen").
    Test,
}

/// An item's role in query/gallery retrieval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Query,
    Gallery,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Query => "query",
            Role::Gallery => "gallery",
        }
    }
}

/// The value of one attribute: a string, a number or a boolean (JSON's scalars but null).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttrValue {
    Bool(bool),
    /// Kept as written (`12` stays an integer, `12.5` a float).
    Number(serde_json::Number),
    String(String),
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Number(n) => write!(f, "{n}"),
            AttrValue::String(s) => f.write_str(s),
        }
    }
}

/// An item's flat attributes (brand, colour, price, a URL, ...), by name.
pub type Attributes = BTreeMap<String, AttrValue>;

/// Longest attribute name, in bytes.
pub const MAX_ATTRIBUTE_NAME: usize = 64;
/// Longest title or string attribute value, in bytes.
pub const MAX_TEXT: usize = 1024;

/// `None` if `name` can name an attribute: 1 to [`MAX_ATTRIBUTE_NAME`] bytes of ASCII letters,
/// digits, `_` and `-` (so that `attr.NAME` is a plain query parameter).
pub fn check_attribute_name(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > MAX_ATTRIBUTE_NAME {
        Some("must be 1 to 64 bytes long")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        Some("may hold only ASCII letters, digits, `_` and `-`")
    } else {
        None
    }
}

/// One catalogue item: an image with its place in the hierarchy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Unique id within the manifest.
    pub id: String,
    /// Image path, relative to the manifest's folder.
    pub image: String,
    /// Taxonomy path, levels joined by `/` (e.g. `Smileys & Emotion/face-smiling`).
    pub category: String,
    pub product: String,
    pub variation: String,
    /// Which drawing or photo of the product this is (e.g. the emoji vendor).
    #[serde(default)]
    pub view: String,
    pub split: Split,
    #[serde(default)]
    pub role: Option<Role>,
    /// The product's name for people (`athletic shoe`); absent in older manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Flat attributes; absent (empty) in older manifests.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: Attributes,
}

impl Item {
    /// An item at `category/product/variation` whose image is `<id>.png`, in the train split,
    /// with no view and no role (set the other fields with struct update syntax).
    pub fn new(id: &str, category: &str, product: &str, variation: &str) -> Item {
        Item {
            id: id.into(),
            image: format!("{id}.png"),
            category: category.into(),
            product: product.into(),
            variation: variation.into(),
            view: String::new(),
            split: Split::Train,
            role: None,
            title: None,
            attributes: Attributes::new(),
        }
    }
}

/// What is wrong with one field of one manifest line (or CSV row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The line is not a JSON object (the parser's message), or the CSV row cannot be read.
    Malformed(String),
    /// A required field is absent.
    Missing,
    /// The field has the wrong JSON type.
    WrongType { expected: &'static str },
    /// The field is an empty string where a value is required.
    Empty,
    /// The field's value is not one of the allowed ones.
    UnknownValue { value: String, expected: &'static str },
    /// A taxonomy path with an empty level (`a//b`, a leading or trailing `/`).
    EmptyLevel,
    /// An image path that is absolute or leaves the manifest's folder.
    OutsideFolder,
    /// The image file does not exist.
    ImageMissing(PathBuf),
    /// The id was already used on an earlier line.
    DuplicateId { first_line: usize },
    /// A text field longer than [`MAX_TEXT`] bytes.
    TooLong { bytes: usize },
    /// One attribute of the `attributes` object (or one `attr.NAME` CSV column) is unusable.
    BadAttribute { name: String, reason: &'static str },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Malformed(msg) => write!(f, "malformed: {msg}"),
            Problem::Missing => write!(f, "missing"),
            Problem::WrongType { expected } => write!(f, "should be {expected}"),
            Problem::Empty => write!(f, "empty"),
            Problem::UnknownValue { value, expected } => write!(f, "unknown value {value:?} (expected {expected})"),
            Problem::EmptyLevel => write!(f, "has an empty level (`a//b`, or a leading or trailing `/`)"),
            Problem::OutsideFolder => write!(f, "must be a relative path inside the folder (no `/...`, no `..`)"),
            Problem::ImageMissing(p) => write!(f, "image file {} does not exist", p.display()),
            Problem::DuplicateId { first_line } => write!(f, "duplicate id (first used on line {first_line})"),
            Problem::TooLong { bytes } => write!(f, "is {bytes} bytes long, over the limit of {MAX_TEXT}"),
            Problem::BadAttribute { name, reason } => write!(f, "attribute {name:?} {reason}"),
        }
    }
}

/// One problem: the 1-based line it is on, the field (`json` for the whole line), what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineIssue {
    pub line: usize,
    pub field: &'static str,
    pub problem: Problem,
}

impl fmt::Display for LineIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, field `{}`: {}", self.line, self.field, self.problem)
    }
}

/// The message of [`Error::Manifest`] / [`Error::CsvRows`]: the count, then up to 20 problems.
pub fn describe_issues(issues: &[LineIssue]) -> String {
    const SHOWN: usize = 20;
    let mut s = match issues.len() {
        1 => "1 problem:".to_string(),
        n => format!("{n} problems:"),
    };
    for issue in issues.iter().take(SHOWN) {
        s.push_str("\n  ");
        s.push_str(&issue.to_string());
    }
    if issues.len() > SHOWN {
        s.push_str(&format!("\n  ... and {} more", issues.len() - SHOWN));
    }
    s
}

/// How to read a manifest.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Check that every item's image file exists (default true).
    pub check_images: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions { check_images: true }
    }
}

/// A catalogue: its items, and the folder their image paths are relative to.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The folder the manifest was read from (or will be written to).
    pub dir: PathBuf,
    pub items: Vec<Item>,
}

impl Manifest {
    /// Reads and checks a manifest, images included. Every problem found is reported, each
    /// with its line and field, in one [`Error::Manifest`].
    pub fn read(path: impl AsRef<Path>) -> Result<Manifest> {
        Manifest::read_with(path, &ReadOptions::default())
    }

    pub fn read_with(path: impl AsRef<Path>, opts: &ReadOptions) -> Result<Manifest> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        Manifest::from_reader(BufReader::new(file), path, opts)
    }

    /// Parses manifest text from `reader` as if it were the file `path` (which names it in
    /// errors and anchors relative image paths).
    pub fn from_reader(reader: impl BufRead, path: &Path, opts: &ReadOptions) -> Result<Manifest> {
        let dir = parent_dir(path);
        let mut checker = Checker::new(&dir, opts.check_images);
        let mut items = Vec::new();
        for (i, line) in reader.split(b'\n').enumerate() {
            let line_no = i + 1;
            let bytes = line.map_err(|e| Error::io(path, e))?;
            // A line that is not UTF-8 is that line's problem, not an unreadable file.
            let text = match String::from_utf8(bytes) {
                Ok(t) => t,
                Err(e) => {
                    let at = e.utf8_error().valid_up_to();
                    let problem = Problem::Malformed(format!("not valid UTF-8 (byte {} of the line)", at + 1));
                    checker.issues.push(LineIssue { line: line_no, field: "json", problem });
                    if checker.issues.len() >= MAX_ISSUES {
                        break;
                    }
                    continue;
                }
            };
            let text = text.strip_suffix('\r').unwrap_or(&text).to_string();
            if text.trim().is_empty() {
                continue;
            }
            if let Some(item) = parse_line(&text, line_no, &mut checker.issues) {
                checker.check(&item, line_no);
                items.push(item);
            }
            if checker.issues.len() >= MAX_ISSUES {
                break;
            }
        }
        checker.finish(path)?;
        tracing::debug!(path = %path.display(), items = items.len(), "read manifest");
        Ok(Manifest { dir, items })
    }

    /// The image file of an item.
    pub fn image_path(&self, item: &Item) -> PathBuf {
        self.dir.join(&item.image)
    }

    /// Writes the items to `path` (whose folder should be [`Manifest::dir`]) atomically.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        write_items(path, &self.items)
    }

    /// The item with this id.
    pub fn get(&self, id: &str) -> Option<&Item> {
        self.items.iter().find(|it| it.id == id)
    }

    /// Counts of items, categories, products, ... (see [`super::Summary`]).
    pub fn summary(&self) -> super::Summary {
        super::Summary::of(&self.items)
    }
}

/// The folder a manifest's image paths are relative to.
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks the items as [`Manifest::read`] would (line = position + 1, images relative to
/// `path`'s folder), then writes them as JSON Lines to a temporary file beside `path` and renames
/// it over `path`, so readers see the old manifest or the new one, never half of one.
pub fn write_items(path: impl AsRef<Path>, items: &[Item]) -> Result<()> {
    let path = path.as_ref();
    let dir = parent_dir(path);
    let mut checker = Checker::new(&dir, true);
    for (i, item) in items.iter().enumerate() {
        checker.check(item, i + 1);
    }
    checker.finish(path)?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut w = BufWriter::new(file);
        for item in items {
            serde_json::to_writer(&mut w, item)?;
            w.write_all(b"\n")?;
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })?;
    tracing::debug!(path = %path.display(), items = items.len(), "wrote manifest");
    Ok(())
}

/// Parses one JSON line into an item, recording every field problem.
fn parse_line(text: &str, line: usize, issues: &mut Vec<LineIssue>) -> Option<Item> {
    let obj: Map<String, Value> = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            issues.push(LineIssue { line, field: "json", problem: Problem::Malformed("not a JSON object".into()) });
            return None;
        }
        Err(e) => {
            issues.push(LineIssue { line, field: "json", problem: Problem::Malformed(e.to_string()) });
            return None;
        }
    };
    let mut fields = Fields { obj: &obj, line, issues };
    let id = fields.string("id", true);
    let image = fields.string("image", true);
    let category = fields.string("category", true);
    let product = fields.string("product", true);
    let variation = fields.string("variation", true);
    let view = fields.string("view", false);
    let split = fields.string("split", true).and_then(|s| match s.as_str() {
        "train" => Some(Split::Train),
        "test" => Some(Split::Test),
        _ => fields.fail("split", Problem::UnknownValue { value: s, expected: "\"train\" or \"test\"" }),
    });
    let role = match obj.get("role") {
        None | Some(Value::Null) => Some(None),
        _ => fields.string("role", true).and_then(|s| match s.as_str() {
            "query" => Some(Some(Role::Query)),
            "gallery" => Some(Some(Role::Gallery)),
            _ => fields.fail("role", Problem::UnknownValue { value: s, expected: "\"query\", \"gallery\" or null" }),
        }),
    };
    let title = fields.string("title", false).map(|t| Some(t).filter(|t| !t.is_empty()));
    let attributes = fields.attributes();
    Some(Item {
        id: id?,
        image: image?,
        category: category?,
        product: product?,
        variation: variation?,
        view: view?,
        split: split?,
        role: role?,
        title: title?,
        attributes: attributes?,
    })
}

/// Field access on one JSON line that records what is wrong.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    line: usize,
    issues: &'a mut Vec<LineIssue>,
}

impl Fields<'_> {
    fn fail<T>(&mut self, field: &'static str, problem: Problem) -> Option<T> {
        self.issues.push(LineIssue { line: self.line, field, problem });
        None
    }

    /// A string field; an optional one that is absent or null reads as "".
    fn string(&mut self, field: &'static str, required: bool) -> Option<String> {
        match self.obj.get(field) {
            Some(Value::String(s)) => Some(s.clone()),
            None | Some(Value::Null) if !required => Some(String::new()),
            None => self.fail(field, Problem::Missing),
            Some(_) => self.fail(field, Problem::WrongType { expected: "a string" }),
        }
    }

    /// The optional `attributes` object: names to strings, numbers or booleans.
    fn attributes(&mut self) -> Option<Attributes> {
        let obj = match self.obj.get("attributes") {
            None | Some(Value::Null) => return Some(Attributes::new()),
            Some(Value::Object(m)) => m,
            Some(_) => return self.fail("attributes", Problem::WrongType { expected: "an object" }),
        };
        let mut out = Attributes::new();
        let mut ok = true;
        for (name, value) in obj {
            let value = match value {
                Value::Bool(b) => AttrValue::Bool(*b),
                Value::Number(n) => AttrValue::Number(n.clone()),
                Value::String(s) => AttrValue::String(s.clone()),
                _ => {
                    let problem =
                        Problem::BadAttribute { name: name.clone(), reason: "must be a string, number or boolean" };
                    self.issues.push(LineIssue { line: self.line, field: "attributes", problem });
                    ok = false;
                    continue;
                }
            };
            out.insert(name.clone(), value);
        }
        ok.then_some(out)
    }
}

/// The checks on a parsed item that do not depend on its JSON form (shared by reader and writer).
pub(crate) struct Checker<'a> {
    dir: &'a Path,
    check_images: bool,
    first_line: HashMap<String, usize>,
    pub(crate) issues: Vec<LineIssue>,
}

impl<'a> Checker<'a> {
    pub(crate) fn new(dir: &'a Path, check_images: bool) -> Self {
        Checker { dir, check_images, first_line: HashMap::new(), issues: Vec::new() }
    }

    pub(crate) fn check(&mut self, item: &Item, line: usize) {
        let mut push = |field: &'static str, problem: Problem| self.issues.push(LineIssue { line, field, problem });
        for (field, value) in [("id", &item.id), ("product", &item.product), ("variation", &item.variation)] {
            if value.is_empty() {
                push(field, Problem::Empty);
            }
        }
        if let Some(problem) = check_category(&item.category) {
            push("category", problem);
        }
        if let Some(title) = &item.title
            && title.len() > MAX_TEXT
        {
            push("title", Problem::TooLong { bytes: title.len() });
        }
        for (name, value) in &item.attributes {
            let reason = check_attribute_name(name).or(match value {
                AttrValue::String(s) if s.len() > MAX_TEXT => Some("is longer than 1024 bytes"),
                AttrValue::String(s) if s.is_empty() => Some("is empty (leave it out instead)"),
                _ => None,
            });
            if let Some(reason) = reason {
                push("attributes", Problem::BadAttribute { name: name.clone(), reason });
            }
        }
        match check_relative_path(&item.image) {
            Some(problem) => push("image", problem),
            None if self.check_images => {
                let file = self.dir.join(&item.image);
                if !file.is_file() {
                    push("image", Problem::ImageMissing(file));
                }
            }
            None => {}
        }
        if !item.id.is_empty() {
            match self.first_line.get(&item.id) {
                Some(&first_line) => push("id", Problem::DuplicateId { first_line }),
                None => {
                    self.first_line.insert(item.id.clone(), line);
                }
            }
        }
    }

    /// `Err(Error::Manifest)` if any problem was found.
    pub(crate) fn finish(self, path: &Path) -> Result<()> {
        if self.issues.is_empty() {
            Ok(())
        } else {
            Err(Error::Manifest { path: path.to_path_buf(), issues: self.issues })
        }
    }
}

/// `None` if `category` is a valid taxonomy path: non-empty levels joined by `/`.
pub(crate) fn check_category(category: &str) -> Option<Problem> {
    if category.is_empty() {
        Some(Problem::Empty)
    } else if category.split('/').any(str::is_empty) {
        Some(Problem::EmptyLevel)
    } else {
        None
    }
}

/// `None` if `image` is a non-empty relative path that stays inside its folder.
pub(crate) fn check_relative_path(image: &str) -> Option<Problem> {
    if image.is_empty() {
        return Some(Problem::Empty);
    }
    let inside = Path::new(image).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if inside { None } else { Some(Problem::OutsideFolder) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, category: &str, product: &str) -> Item {
        Item {
            id: id.into(),
            image: format!("images/{id}.png"),
            category: category.into(),
            product: product.into(),
            variation: "default".into(),
            view: "front".into(),
            split: Split::Train,
            role: None,
            title: None,
            attributes: Attributes::new(),
        }
    }

    /// A folder with images for the given ids and a manifest made of `lines`.
    fn fixture(ids: &[&str], lines: &[String]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        for id in ids {
            std::fs::write(dir.path().join(format!("images/{id}.png")), b"png").unwrap();
        }
        let path = dir.path().join(MANIFEST_FILE);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        (dir, path)
    }

    fn line(it: &Item) -> String {
        serde_json::to_string(it).unwrap()
    }

    /// Reads a manifest whose line 1 is valid and line 2 is `bad`; returns the issues.
    fn issues_with_line2(bad: &str) -> Vec<LineIssue> {
        let good = item("a", "x/y", "p");
        let (_dir, path) = fixture(&["a", "b"], &[line(&good), bad.to_string()]);
        match Manifest::read(&path) {
            Err(Error::Manifest { path: p, issues }) => {
                assert_eq!(p, path);
                issues
            }
            other => panic!("expected a manifest error, got {other:?}"),
        }
    }

    fn only(issues: Vec<LineIssue>) -> LineIssue {
        assert_eq!(issues.len(), 1, "{issues:?}");
        issues.into_iter().next().unwrap()
    }

    fn b_with(f: impl FnOnce(&mut Map<String, Value>)) -> String {
        let Value::Object(mut m) = serde_json::to_value(item("b", "x/z", "q")).unwrap() else { unreachable!() };
        f(&mut m);
        Value::Object(m).to_string()
    }

    #[test]
    fn malformed_json_names_line_and_json_field() {
        let issue = only(issues_with_line2("{\"id\": \"b\", "));
        assert_eq!((issue.line, issue.field), (2, "json"));
        assert!(matches!(issue.problem, Problem::Malformed(_)));
        let issue = only(issues_with_line2("[1, 2]"));
        assert_eq!((issue.line, issue.field), (2, "json"));
    }

    #[test]
    fn a_line_that_is_not_utf8_is_that_lines_issue() {
        // Found by the fuzz harness: invalid UTF-8 used to fail the whole read as an I/O error.
        let good = item("a", "x/y", "p");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        std::fs::write(dir.path().join("images/a.png"), b"png").unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        let mut bytes = (line(&good) + "\r\n").into_bytes();
        bytes.extend_from_slice(b"{\"id\": \"b\xff\"}\n");
        std::fs::write(&path, bytes).unwrap();
        let Err(Error::Manifest { issues, .. }) = Manifest::read(&path) else { panic!("expected a manifest error") };
        let issue = only(issues);
        assert_eq!((issue.line, issue.field), (2, "json"));
        assert!(
            matches!(&issue.problem, Problem::Malformed(m) if m.contains("UTF-8") && m.contains("byte 10")),
            "{issue}"
        );
    }

    #[test]
    fn missing_field_is_reported() {
        let issue = only(issues_with_line2(&b_with(|m| {
            m.remove("product");
        })));
        assert_eq!((issue.line, issue.field, issue.problem), (2, "product", Problem::Missing));
    }

    #[test]
    fn wrong_type_is_reported() {
        let issue = only(issues_with_line2(&b_with(|m| {
            m.insert("variation".into(), Value::from(3));
        })));
        assert_eq!((issue.line, issue.field), (2, "variation"));
        assert!(matches!(issue.problem, Problem::WrongType { .. }));
    }

    #[test]
    fn unknown_split_is_reported() {
        let issue = only(issues_with_line2(&b_with(|m| {
            m.insert("split".into(), Value::from("validation"));
        })));
        assert_eq!((issue.line, issue.field), (2, "split"));
        assert!(matches!(issue.problem, Problem::UnknownValue { ref value, .. } if value == "validation"));
    }

    #[test]
    fn unknown_role_is_reported() {
        let issue = only(issues_with_line2(&b_with(|m| {
            m.insert("role".into(), Value::from("probe"));
        })));
        assert_eq!((issue.line, issue.field), (2, "role"));
    }

    #[test]
    fn empty_product_is_reported() {
        let issue = only(issues_with_line2(&b_with(|m| {
            m.insert("product".into(), Value::from(""));
        })));
        assert_eq!((issue.line, issue.field, issue.problem), (2, "product", Problem::Empty));
    }

    #[test]
    fn bad_category_path_is_reported() {
        let issue = only(issues_with_line2(&b_with(|m| {
            m.insert("category".into(), Value::from("x//z"));
        })));
        assert_eq!((issue.line, issue.field, issue.problem), (2, "category", Problem::EmptyLevel));
    }

    #[test]
    fn image_outside_the_folder_is_reported() {
        let issue = only(issues_with_line2(&b_with(|m| {
            m.insert("image".into(), Value::from("../images/b.png"));
        })));
        assert_eq!((issue.line, issue.field, issue.problem), (2, "image", Problem::OutsideFolder));
    }

    #[test]
    fn missing_image_file_is_reported() {
        let issue = only(issues_with_line2(&b_with(|m| {
            m.insert("image".into(), Value::from("images/nope.png"));
        })));
        assert_eq!((issue.line, issue.field), (2, "image"));
        assert!(matches!(issue.problem, Problem::ImageMissing(ref p) if p.ends_with("images/nope.png")));
    }

    #[test]
    fn duplicate_id_names_both_lines() {
        let issue = only(issues_with_line2(&b_with(|m| {
            m.insert("id".into(), Value::from("a"));
        })));
        assert_eq!((issue.line, issue.field, issue.problem), (2, "id", Problem::DuplicateId { first_line: 1 }));
    }

    #[test]
    fn all_problems_are_collected_with_their_lines() {
        let good = item("a", "x/y", "p");
        let bad_split = b_with(|m| {
            m.insert("split".into(), Value::from("dev"));
        });
        let (_dir, path) = fixture(&["a", "b"], &[line(&good), "".into(), "nope".into(), bad_split]);
        let Err(Error::Manifest { issues, .. }) = Manifest::read(&path) else { panic!("expected an error") };
        let lines: Vec<_> = issues.iter().map(|i| (i.line, i.field)).collect();
        assert_eq!(lines, vec![(3, "json"), (4, "split")]);
        let msg = Error::Manifest { path, issues }.to_string();
        assert!(msg.contains("2 problems") && msg.contains("line 4, field `split`"), "{msg}");
    }

    #[test]
    fn write_then_read_round_trips() {
        let mut items = vec![item("a", "x/y", "p"), item("b", "x/z", "q"), item("c", "w", "r")];
        items[1].split = Split::Test;
        items[1].role = Some(Role::Query);
        items[2].role = Some(Role::Gallery);
        items[2].view = String::new();
        let (dir, _) = fixture(&["a", "b", "c"], &[]);
        let path = dir.path().join("out.jsonl");
        write_items(&path, &items).unwrap();
        let back = Manifest::read(&path).unwrap();
        assert_eq!(back.items, items);
        assert_eq!(back.dir, dir.path());
        assert_eq!(back.image_path(&items[0]), dir.path().join("images/a.png"));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "temporary file left behind");
    }

    #[test]
    fn writer_refuses_bad_items_and_keeps_the_old_file() {
        let (dir, path) = fixture(&["a"], &[line(&item("a", "x", "p"))]);
        let before = std::fs::read_to_string(&path).unwrap();
        let items = vec![item("a", "x", "p"), item("a", "x", "")];
        let Err(Error::Manifest { issues, .. }) = write_items(&path, &items) else { panic!("expected an error") };
        let found: Vec<_> = issues.iter().map(|i| (i.line, i.field)).collect();
        assert!(found.contains(&(2, "product")) && found.contains(&(2, "id")), "{found:?}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
        drop(dir);
    }

    #[test]
    fn unchecked_read_skips_image_existence() {
        let (_dir, path) = fixture(&[], &[line(&item("a", "x", "p"))]);
        assert!(Manifest::read(&path).is_err());
        let m = Manifest::read_with(&path, &ReadOptions { check_images: false }).unwrap();
        assert_eq!(m.items.len(), 1);
    }

    #[test]
    fn titles_and_attributes_round_trip_and_old_lines_still_read() {
        let mut a = item("a", "x/y", "p");
        a.title = Some("athletic shoe".into());
        a.attributes = Attributes::from([
            ("brand".to_string(), AttrValue::String("acme".into())),
            ("price".to_string(), AttrValue::Number(serde_json::Number::from_f64(12.5).unwrap())),
            ("stock".to_string(), AttrValue::Number(3.into())),
            ("sale".to_string(), AttrValue::Bool(true)),
        ]);
        let text = line(&a);
        assert!(text.contains(r#""attributes":{"brand":"acme","price":12.5,"sale":true,"stock":3}"#), "{text}");
        // A line written before titles and attributes existed has neither key.
        let old = line(&item("b", "x/z", "q"));
        assert!(!old.contains("title") && !old.contains("attributes"), "{old}");
        let (_dir, path) = fixture(&["a", "b"], &[text, old]);
        let back = Manifest::read(&path).unwrap();
        assert_eq!(back.items[0], a);
        assert_eq!((back.items[1].title.as_ref(), back.items[1].attributes.len()), (None, 0));
        assert_eq!(a.attributes["price"].to_string(), "12.5");
    }

    #[test]
    fn bad_titles_and_attributes_are_reported() {
        let issue = only(issues_with_line2(&b_with(|m| {
            m.insert("title".into(), Value::from(7));
        })));
        assert_eq!((issue.line, issue.field), (2, "title"));
        let issue = only(issues_with_line2(&b_with(|m| {
            m.insert("attributes".into(), Value::from("brand=acme"));
        })));
        assert_eq!((issue.line, issue.field), (2, "attributes"));
        for (attributes, name) in [
            (serde_json::json!({"sizes": [1, 2]}), "sizes"),
            (serde_json::json!({"colour": null}), "colour"),
            (serde_json::json!({"brand name": "acme"}), "brand name"),
            (serde_json::json!({"": "x"}), ""),
            (serde_json::json!({"note": ""}), "note"),
        ] {
            let issue = only(issues_with_line2(&b_with(|m| {
                m.insert("attributes".into(), attributes.clone());
            })));
            assert_eq!((issue.line, issue.field), (2, "attributes"), "{attributes}");
            assert!(matches!(&issue.problem, Problem::BadAttribute { name: n, .. } if n == name), "{issue}");
        }
        let issue = only(issues_with_line2(&b_with(|m| {
            m.insert("title".into(), Value::from("x".repeat(MAX_TEXT + 1)));
        })));
        assert_eq!((issue.field, issue.problem), ("title", Problem::TooLong { bytes: MAX_TEXT + 1 }));
    }
}
