//! Importers that turn a source into a self-contained catalogue folder: `images/` plus
//! `manifest.jsonl` (plus licence files where the source needs them).
