//! The emoji catalogue from the `emoji-datasource` packages: taxonomy category/subcategory,
//! product = the base emoji (`unified` code), variation = skin tone by name (`medium skin tone`;
//! `default` for the base), view = vendor (Twitter's drawings are the queries, Google's the
//! gallery), title = the emoji's Unicode name in lower case (`athletic shoe`), attribute
//! `emoji_version` = the Emoji version that added the drawing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{IMAGES_DIR, copy_files, create_dir, finish};
use crate::catalogue::taxonomy::level_name;
use crate::catalogue::{AttrValue, Attributes, Item, Manifest, Role, Split, SplitOptions, assign_splits};
use crate::{Error, Result};

/// The metadata package and the two image packages, as `make fetch-emoji` unpacks them.
pub const METADATA_PACKAGE: &str = "emoji-datasource";
/// The vendors used: (name, its package, the role of its drawings).
pub const VENDORS: [(&str, &str, Role); 2] =
    [("twitter", "emoji-datasource-twitter", Role::Query), ("google", "emoji-datasource-google", Role::Gallery)];
/// The variation name of an emoji without a skin tone.
pub const DEFAULT_VARIATION: &str = "default";
/// The image size used (the packages also ship 16, 20 and 32 px).
const SIZE_DIR: &str = "64";
/// The Unicode (CLDR) names of the five skin-tone modifiers, by code point: `skin_variations`
/// is keyed by these codes, one per tone, or two joined by `-` for two-person emoji.
const SKIN_TONES: [(&str, &str); 5] = [
    ("1F3FB", "light skin tone"),
    ("1F3FC", "medium-light skin tone"),
    ("1F3FD", "medium skin tone"),
    ("1F3FE", "medium-dark skin tone"),
    ("1F3FF", "dark skin tone"),
];

/// The variation name of a `skin_variations` key: `1F3FD` -> `medium skin tone`, `1F3FB-1F3FF`
/// -> `light skin tone, dark skin tone`. A code that is no skin tone is kept as written.
pub fn skin_tone_name(key: &str) -> String {
    key.split('-')
        .map(|code| SKIN_TONES.iter().find(|(c, _)| c.eq_ignore_ascii_case(code)).map_or(code, |(_, name)| name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A title from an emoji-datasource name: `ATHLETIC SHOE` -> `athletic shoe`.
pub fn title_of(name: &str) -> String {
    name.trim().to_lowercase()
}

/// One drawing's metadata: the emoji itself or one of its skin-tone variations.
#[derive(Debug, Deserialize)]
struct Drawing {
    unified: String,
    image: String,
    #[serde(default)]
    has_img_google: bool,
    #[serde(default)]
    has_img_twitter: bool,
    /// The Emoji version that added this drawing (`"0.6"`, `"13.0"`).
    #[serde(default)]
    added_in: Option<String>,
}

impl Drawing {
    fn has(&self, vendor: &str) -> bool {
        match vendor {
            "google" => self.has_img_google,
            "twitter" => self.has_img_twitter,
            _ => false,
        }
    }
}

/// One entry of `emoji.json`.
#[derive(Debug, Deserialize)]
struct Emoji {
    #[serde(flatten)]
    drawing: Drawing,
    category: String,
    subcategory: String,
    /// The Unicode name, upper case (`ATHLETIC SHOE`).
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    skin_variations: Option<BTreeMap<String, Drawing>>,
}

#[derive(Debug, Deserialize)]
struct PackageJson {
    version: String,
}

/// The versions of the three packages, read from their `package.json`.
fn package_version(packages: &Path, name: &str) -> Result<String> {
    let path = packages.join(name).join("package.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let pkg: PackageJson = serde_json::from_str(&text)
        .map_err(|e| Error::SourceFormat { path: path.clone(), problem: format!("package.json: {e}") })?;
    Ok(pkg.version)
}

/// Builds `out/` from the unpacked packages under `packages/` (see [`METADATA_PACKAGE`],
/// [`VENDORS`]): copies the 64 px PNGs to `out/images/<image>-<vendor>.png`, writes
/// `out/manifest.jsonl`, `out/ATTRIBUTION.md` and the metadata licence. An image is used only
/// where its vendor has it (`has_img_<vendor>`) and the file exists.
pub fn import(packages: &Path, out: &Path, split: &SplitOptions) -> Result<Manifest> {
    split.validate()?;
    let meta_path = packages.join(METADATA_PACKAGE).join("emoji.json");
    let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
    let emojis: Vec<Emoji> = serde_json::from_str(&text)
        .map_err(|e| Error::SourceFormat { path: meta_path.clone(), problem: e.to_string() })?;
    let versions = [METADATA_PACKAGE, VENDORS[0].1, VENDORS[1].1]
        .map(|name| package_version(packages, name).map(|v| (name, v)))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;

    let mut items = Vec::new();
    let mut copies: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut missing = 0usize;
    for emoji in &emojis {
        let category = format!("{}/{}", level_name(&emoji.category), level_name(&emoji.subcategory));
        let title = emoji.name.as_deref().map(title_of).filter(|t| !t.is_empty());
        let variations = std::iter::once((DEFAULT_VARIATION.to_string(), &emoji.drawing))
            .chain(emoji.skin_variations.iter().flatten().map(|(tone, d)| (skin_tone_name(tone), d)));
        for (variation, drawing) in variations {
            if drawing.image.is_empty() || drawing.image.contains(['/', '\\']) || drawing.image.starts_with('.') {
                return Err(Error::SourceFormat {
                    path: meta_path.clone(),
                    problem: format!("emoji {}: image {:?} is not a plain file name", drawing.unified, drawing.image),
                });
            }
            for (vendor, package, role) in VENDORS {
                if !drawing.has(vendor) {
                    continue;
                }
                let from = packages.join(package).join("img").join(vendor).join(SIZE_DIR).join(&drawing.image);
                if !from.is_file() {
                    missing += 1;
                    tracing::debug!(file = %from.display(), "listed in emoji.json but not in the package");
                    continue;
                }
                let stem = drawing.image.strip_suffix(".png").unwrap_or(&drawing.image);
                let image = format!("{IMAGES_DIR}/{stem}-{vendor}.png");
                copies.push((from, out.join(&image)));
                items.push(Item {
                    id: format!("{vendor}:{}", drawing.unified),
                    image,
                    category: category.clone(),
                    product: emoji.drawing.unified.clone(),
                    variation: variation.clone(),
                    view: vendor.to_string(),
                    split: Split::Train,
                    role: Some(role),
                    title: title.clone(),
                    attributes: drawing
                        .added_in
                        .iter()
                        .map(|v| ("emoji_version".to_string(), AttrValue::String(v.clone())))
                        .collect::<Attributes>(),
                });
            }
        }
    }
    if missing > 0 {
        tracing::warn!(missing, "images listed in emoji.json but missing from the vendor packages were skipped");
    }
    if items.is_empty() {
        return Err(Error::SourceFormat {
            path: packages.to_path_buf(),
            problem: "no emoji images found (run `make fetch-emoji`)".into(),
        });
    }
    create_dir(out)?;
    copy_files("emoji images", &copies)?;
    assign_splits(&mut items, split)?;
    write_licences(packages, out, &versions)?;
    finish(out, items)
}

/// `ATTRIBUTION.md` (what comes from where, under which licence) and the metadata's MIT licence.
fn write_licences(packages: &Path, out: &Path, versions: &[(&str, String)]) -> Result<()> {
    let version = |name: &str| versions.iter().find(|(n, _)| *n == name).map_or("?", |(_, v)| v.as_str());
    let text = format!(
        "# Emoji catalogue: sources and licences\n\
         \n\
         This folder was generated by `hiercon data emoji` from three packages:\n\
         \n\
         | package | version | used for | licence |\n\
         |---|---|---|---|\n\
         | `emoji-datasource` | {meta} | `emoji.json`: categories, subcategories, skin-tone variations | MIT, Copyright (c) 2013 Cal Henderson (see `LICENSE.emoji-datasource`) |\n\
         | `emoji-datasource-google` | {google} | `images/*-google.png`: Google's Noto Emoji drawings, 64 px | Apache-2.0 (Noto Emoji, Copyright Google Inc.; <https://www.apache.org/licenses/LICENSE-2.0>) |\n\
         | `emoji-datasource-twitter` | {twitter} | `images/*-twitter.png`: Twitter's Twemoji drawings, 64 px | CC-BY-4.0 (Twemoji graphics Copyright Twitter, Inc and other contributors; <https://creativecommons.org/licenses/by/4.0/>) |\n\
         \n\
         The images are unchanged copies of the packages' 64 px PNGs; `manifest.jsonl` is derived\n\
         from the metadata (category / subcategory / emoji / skin tone).\n",
        meta = version(METADATA_PACKAGE),
        google = version("emoji-datasource-google"),
        twitter = version("emoji-datasource-twitter"),
    );
    let path = out.join("ATTRIBUTION.md");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    let licence = packages.join(METADATA_PACKAGE).join("LICENSE");
    if licence.is_file() {
        let to = out.join("LICENSE.emoji-datasource");
        std::fs::copy(&licence, &to).map_err(|e| Error::io(&to, e))?;
    } else {
        tracing::warn!(file = %licence.display(), "emoji-datasource LICENSE not found; ATTRIBUTION.md still names it");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Summary;
    use serde_json::json;

    /// A tiny PNG whose pixels encode `seed`, so copies can be told apart.
    fn png(path: &Path, seed: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        ::image::RgbaImage::from_pixel(4, 4, ::image::Rgba([seed, 255 - seed, 7, 255])).save(path).unwrap();
    }

    /// Packages with 3 emoji: one with two skin tones (Google lacks one), one Twitter-only,
    /// one whose Google file is listed but absent.
    fn packages() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let meta = json!([
            {"unified": "1F44B", "image": "1f44b.png", "category": "People & Body", "subcategory": "hand-fingers-open",
             "name": "WAVING HAND SIGN", "added_in": "0.6",
             "has_img_google": true, "has_img_twitter": true, "sort_order": 1,
             "skin_variations": {
                "1F3FB": {"unified": "1F44B-1F3FB", "image": "1f44b-1f3fb.png", "added_in": "1.0", "has_img_google": true, "has_img_twitter": true},
                "1F3FF": {"unified": "1F44B-1F3FF", "image": "1f44b-1f3ff.png", "has_img_google": false, "has_img_twitter": true}
             }},
            {"unified": "1F600", "image": "1f600.png", "category": "Smileys & Emotion", "subcategory": "face-smiling",
             "has_img_google": false, "has_img_twitter": true, "skin_variations": null},
            {"unified": "1F34E", "image": "1f34e.png", "category": "Food & Drink", "subcategory": "food-fruit",
             "has_img_google": true, "has_img_twitter": true}
        ]);
        std::fs::create_dir_all(p.join(METADATA_PACKAGE)).unwrap();
        std::fs::write(p.join(METADATA_PACKAGE).join("emoji.json"), meta.to_string()).unwrap();
        std::fs::write(p.join(METADATA_PACKAGE).join("LICENSE"), "MIT licence text").unwrap();
        for name in [METADATA_PACKAGE, "emoji-datasource-google", "emoji-datasource-twitter"] {
            std::fs::create_dir_all(p.join(name)).unwrap();
            std::fs::write(p.join(name).join("package.json"), r#"{"name": "x", "version": "16.0.0"}"#).unwrap();
        }
        let img = |vendor: &str, file: &str, seed: u8| {
            png(&p.join(format!("emoji-datasource-{vendor}/img/{vendor}/64/{file}")), seed)
        };
        img("google", "1f44b.png", 1);
        img("twitter", "1f44b.png", 2);
        img("google", "1f44b-1f3fb.png", 3);
        img("twitter", "1f44b-1f3fb.png", 4);
        img("twitter", "1f44b-1f3ff.png", 5);
        img("google", "1f44b-1f3ff.png", 6); // present, but has_img_google is false: not used
        img("twitter", "1f600.png", 7);
        img("twitter", "1f34e.png", 8); // google's 1f34e.png is listed but missing
        dir
    }

    #[test]
    fn imports_the_fixture() {
        let pk = packages();
        let out = tempfile::tempdir().unwrap();
        let m = import(pk.path(), out.path(), &SplitOptions::default()).unwrap();
        let mut ids: Vec<&str> = m.items.iter().map(|it| it.id.as_str()).collect();
        ids.sort();
        assert_eq!(
            ids,
            [
                "google:1F44B",
                "google:1F44B-1F3FB",
                "twitter:1F34E",
                "twitter:1F44B",
                "twitter:1F44B-1F3FB",
                "twitter:1F44B-1F3FF",
                "twitter:1F600"
            ]
        );
        let wave = m.get("google:1F44B-1F3FB").unwrap();
        assert_eq!(wave.category, "People & Body/hand-fingers-open");
        assert_eq!((wave.product.as_str(), wave.variation.as_str()), ("1F44B", "light skin tone"));
        assert_eq!(wave.title.as_deref(), Some("waving hand sign"));
        assert_eq!(wave.attributes["emoji_version"], AttrValue::String("1.0".into()));
        assert_eq!(m.get("twitter:1F44B-1F3FF").unwrap().variation, "dark skin tone");
        assert_eq!(m.get("twitter:1F44B").unwrap().attributes["emoji_version"].to_string(), "0.6");
        let apple = m.get("twitter:1F34E").unwrap();
        assert_eq!(
            (apple.title.as_ref(), apple.attributes.len()),
            (None, 0),
            "no name, no version: neither is made up"
        );
        assert_eq!((wave.view.as_str(), wave.role), ("google", Some(Role::Gallery)));
        let base = m.get("twitter:1F44B").unwrap();
        assert_eq!((base.variation.as_str(), base.role), (DEFAULT_VARIATION, Some(Role::Query)));
        // copies are byte-identical to their sources, and the manifest reads back
        let copied = std::fs::read(m.image_path(wave)).unwrap();
        let source = std::fs::read(pk.path().join("emoji-datasource-google/img/google/64/1f44b-1f3fb.png")).unwrap();
        assert_eq!(copied, source);
        let back = Manifest::read(out.path().join("manifest.jsonl")).unwrap();
        assert_eq!(back.items, m.items);
        let s = Summary::of(&back.items);
        assert_eq!((s.levels.clone(), s.products, s.variations), (vec![3, 3], 3, 5));
        assert_eq!((s.query, s.gallery), (5, 2));
        let attribution = std::fs::read_to_string(out.path().join("ATTRIBUTION.md")).unwrap();
        for needle in
            ["MIT", "Apache-2.0", "CC-BY-4.0", "emoji-datasource-google", "emoji-datasource-twitter", "16.0.0"]
        {
            assert!(attribution.contains(needle), "ATTRIBUTION.md lacks {needle}");
        }
        assert!(out.path().join("LICENSE.emoji-datasource").is_file());
    }

    #[test]
    fn skin_tones_and_titles_read_as_words() {
        assert_eq!(skin_tone_name("1F3FD"), "medium skin tone");
        assert_eq!(skin_tone_name("1F3FB-1F3FF"), "light skin tone, dark skin tone");
        assert_eq!(skin_tone_name("1f3fc"), "medium-light skin tone");
        assert_eq!(skin_tone_name("ABCDE"), "ABCDE");
        assert_eq!(title_of("ATHLETIC SHOE"), "athletic shoe");
    }

    #[test]
    fn products_keep_all_their_variations_on_one_side() {
        let pk = packages();
        let out = tempfile::tempdir().unwrap();
        let opts = SplitOptions { unseen_fraction: 1.0, ..Default::default() };
        let m = import(pk.path(), out.path(), &opts).unwrap();
        assert!(m.items.iter().all(|it| it.split == Split::Test));
    }

    #[test]
    fn malformed_metadata_is_a_clear_error() {
        let pk = packages();
        std::fs::write(pk.path().join(METADATA_PACKAGE).join("emoji.json"), r#"[{"unified": 3}]"#).unwrap();
        let out = tempfile::tempdir().unwrap();
        match import(pk.path(), out.path(), &SplitOptions::default()) {
            Err(Error::SourceFormat { path, .. }) => assert!(path.ends_with("emoji.json")),
            other => panic!("expected SourceFormat, got {other:?}"),
        }
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(import(empty.path(), out.path(), &SplitOptions::default()), Err(Error::Io { .. })));
    }
}
