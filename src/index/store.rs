//! Generations on disk: writing and checksummed loading of `gen-<n>/`, `CURRENT`, the run lock, clean-up.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use ndarray::Array2;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::exact::ExactIndex;
use super::filter::Labels;
use super::hnsw::{HnswIndex, HnswParams, NodeMap, compact_file};
use crate::catalogue::{Item, Split};
use crate::fsutil::write_atomic;
use crate::{Error, Result};

/// `format` of `generation.json`.
pub const INDEX_FORMAT: &str = "hiercon-index/1";
/// The file naming the live generation.
pub const CURRENT: &str = "CURRENT";
const LOCK: &str = ".lock";
const META: &str = "generation.json";
const ITEMS: &str = "items.jsonl";
const EMBEDDINGS: &str = "embeddings.safetensors";
const EMBEDDINGS_TENSOR: &str = "embeddings";
/// Basename of the `hnsw_rs` dump inside a generation.
pub const GRAPH: &str = "graph";
/// The node map of a reused graph: the row of each node, u32 little-endian, `u32::MAX` for a tombstone.
const NODES: &str = "graph.nodes";
/// Written after verification, outside the checksummed set.
pub const VERIFICATION: &str = "verification.json";

/// One indexed item: the manifest line plus the sha256 of its image bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemRecord {
    #[serde(flatten)]
    pub item: Item,
    pub sha256: String,
}

/// The model a generation was embedded with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The `.onnx` path given to `hiercon index` (informational).
    pub path: Option<PathBuf>,
    /// The embedding cache key and the check `serve` makes against its own model.
    pub digest: String,
    pub dim: usize,
}

/// How the embeddings of a run were obtained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbedStats {
    /// Distinct images run through the encoder.
    pub embedded: usize,
    /// Items whose embedding came from an earlier generation (same image hash and model digest).
    pub reused: usize,
    /// Items left out because their image could not be read or decoded.
    pub skipped: usize,
}

/// Size and sha256 of a file in a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub bytes: u64,
    pub sha256: String,
}

/// `generation.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationMeta {
    pub format: String,
    /// `n` of `gen-<n>`.
    pub generation: u64,
    pub created_unix: u64,
    pub manifest: PathBuf,
    /// Image paths in `items.jsonl` are relative to this folder.
    pub image_root: PathBuf,
    /// The split indexed (`None`: all items).
    pub split: Option<Split>,
    pub model: ModelInfo,
    pub count: usize,
    pub dim: usize,
    pub hnsw: HnswParams,
    /// The search breadth verification used; `serve` uses it by default.
    pub ef_search: usize,
    pub stats: EmbedStats,
    pub files: BTreeMap<String, FileInfo>,
    /// Rows the HNSW graph does not reach, searched exactly beside it ([`HnswIndex::find_orphans`]).
    #[serde(default)]
    pub hnsw_orphans: Vec<u32>,
    /// Graph nodes when the graph was reused from an earlier generation (`graph.nodes` maps
    /// them to rows; the others are tombstones); `None`: one node per row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hnsw_nodes: Option<usize>,
    /// How this generation was built (absent in generations written before incremental builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildInfo>,
}

/// How `hiercon index` built a generation, and why that way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// `full` (graph built from nothing) or `incremental` (the live generation's graph reused).
    pub path: BuildPath,
    /// Why this path was taken.
    pub reason: String,
    /// The generation whose graph was reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Rows whose node (and vector) was reused.
    pub reused: usize,
    /// Rows inserted as new nodes.
    pub inserted: usize,
    /// Nodes no row uses (removed or changed items), skipped by searches.
    pub tombstones: usize,
    /// Seconds spent building or extending the graph (including the orphan search).
    pub graph_seconds: f64,
    /// Of which the orphan search ([`HnswIndex::find_orphans`]).
    #[serde(default)]
    pub orphan_seconds: f64,
}

/// See [`BuildInfo::path`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildPath {
    Full,
    Incremental,
}

impl std::fmt::Display for BuildPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BuildPath::Full => "full",
            BuildPath::Incremental => "incremental",
        })
    }
}

impl GenerationMeta {
    /// `gen-<n>`.
    pub fn name(&self) -> String {
        generation_name(self.generation)
    }
}

/// `gen-<n>`.
pub fn generation_name(n: u64) -> String {
    format!("gen-{n}")
}

fn parse_generation_name(s: &str) -> Option<u64> {
    s.strip_prefix("gen-")?.parse().ok()
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::IndexCorrupt { path: path.to_path_buf(), reason: reason.into() }
}

/// Size and sha256 of a file, streamed.
pub fn file_info(path: &Path) -> Result<FileInfo> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileInfo { bytes, sha256: hex::encode(h.finalize()) })
}

/// fsync a file.
pub fn sync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

/// fsync a directory, so renames and creations inside it are durable.
pub fn sync_dir(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

fn write_items(path: &Path, items: &[ItemRecord]) -> Result<()> {
    let f = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::new(f);
    for it in items {
        serde_json::to_writer(&mut w, it).expect("ItemRecord serialises");
        w.write_all(b"\n").map_err(|e| Error::io(path, e))?;
    }
    w.into_inner().map_err(|e| Error::io(path, e.into_error()))?.sync_all().map_err(|e| Error::io(path, e))
}

fn write_embeddings(path: &Path, emb: &Array2<f32>) -> Result<()> {
    let bytes: Vec<u8> = emb.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, emb.shape().to_vec(), &bytes)
        .map_err(|e| corrupt(path, e.to_string()))?;
    safetensors::serialize_to_file([(EMBEDDINGS_TENSOR, view)], None, path)
        .map_err(|e| corrupt(path, e.to_string()))?;
    sync_file(path)
}

/// Writes a complete generation into the (existing, empty) `dir`: data files, each fsynced,
/// then `generation.json` (with their sizes and sha256) atomically, then fsyncs `dir`.
/// `meta.files`, `count`, `dim` and `hnsw_nodes` are filled in here. With `graph_from`, the
/// graph files are hard-linked (or copied) from that generation instead of dumped: the caller
/// passes it when `hnsw` is that generation's graph unchanged (no node inserted).
pub fn write_generation(
    dir: &Path,
    mut meta: GenerationMeta,
    items: &[ItemRecord],
    embeddings: &Array2<f32>,
    hnsw: &HnswIndex,
    graph_from: Option<&Path>,
) -> Result<GenerationMeta> {
    assert_eq!(items.len(), embeddings.nrows());
    write_items(&dir.join(ITEMS), items)?;
    write_embeddings(&dir.join(EMBEDDINGS), embeddings)?;
    let graph_files = [format!("{GRAPH}.hnsw.graph"), format!("{GRAPH}.hnsw.data"), compact_file(GRAPH)];
    match graph_from {
        Some(from) => {
            for f in &graph_files[..2] {
                link_or_copy(&from.join(f), &dir.join(f))?;
            }
            // A generation of an earlier version has no served-graph file: write this one's.
            match from.join(&graph_files[2]).exists() {
                true => link_or_copy(&from.join(&graph_files[2]), &dir.join(&graph_files[2]))?,
                false => hnsw.write_compact(dir, GRAPH)?,
            }
        }
        None => hnsw.dump(dir, GRAPH)?,
    }
    let mut names = vec![ITEMS.to_string(), EMBEDDINGS.to_string()];
    names.extend(graph_files);
    meta.hnsw_nodes = None;
    if let Some(map) = hnsw.node_map() {
        let bytes: Vec<u8> = map.row_of().iter().flat_map(|r| r.to_le_bytes()).collect();
        let path = dir.join(NODES);
        fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        names.push(NODES.to_string());
        meta.hnsw_nodes = Some(map.nodes());
    }
    let infos: Vec<(String, FileInfo)> = names
        .par_iter()
        .map(|n| {
            let p = dir.join(n);
            sync_file(&p)?;
            Ok((n.clone(), file_info(&p)?))
        })
        .collect::<Result<_>>()?;
    meta.files = infos.into_iter().collect();
    meta.count = items.len();
    meta.dim = embeddings.ncols();
    sync_dir(dir)?;
    write_meta(dir, &meta)?;
    Ok(meta)
}

/// A hard link of `from` at `to` (generation files are never modified once written, so two
/// generations may share them), or a copy where the file system has no hard links.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    fs::copy(from, to).map(|_| ()).map_err(|e| Error::io(from, e))
}

fn read_nodes(path: &Path, nodes: usize, rows: usize) -> Result<NodeMap> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.len() != nodes * 4 {
        return Err(corrupt(path, format!("{} bytes for {nodes} nodes", bytes.len())));
    }
    let row_of: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    NodeMap::from_rows(row_of, rows).map_err(|e| corrupt(path, e))
}

/// Writes `generation.json` of `dir` atomically (the commit marker of a generation).
pub fn write_meta(dir: &Path, meta: &GenerationMeta) -> Result<()> {
    let text = serde_json::to_string_pretty(meta).expect("GenerationMeta serialises");
    write_atomic(&dir.join(META), (text + "\n").as_bytes())
}

/// Reads `generation.json` of `dir` (no file checks).
pub fn read_meta(dir: &Path) -> Result<GenerationMeta> {
    let path = dir.join(META);
    let text = fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            corrupt(dir, "no generation.json: an interrupted run, not a generation")
        } else {
            Error::io(&path, e)
        }
    })?;
    let meta: GenerationMeta = serde_json::from_str(&text).map_err(|e| corrupt(&path, e.to_string()))?;
    if meta.format != INDEX_FORMAT {
        return Err(corrupt(&path, format!("format {:?}, expected {INDEX_FORMAT:?}", meta.format)));
    }
    Ok(meta)
}

/// Checks the size and sha256 of the named files against `meta.files`.
fn check_files(dir: &Path, meta: &GenerationMeta, names: &[&str]) -> Result<()> {
    names.par_iter().try_for_each(|name| {
        let path = dir.join(name);
        let want = meta.files.get(*name).ok_or_else(|| corrupt(&path, "not listed in generation.json"))?;
        let len = fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        if len != want.bytes {
            return Err(corrupt(&path, format!("{len} bytes, generation.json says {}", want.bytes)));
        }
        if file_info(&path)?.sha256 != want.sha256 {
            return Err(corrupt(&path, "sha256 differs from generation.json"));
        }
        Ok(())
    })
}

fn read_items(path: &Path, count: usize) -> Result<Vec<ItemRecord>> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let items: Vec<ItemRecord> = text
        .lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| corrupt(path, format!("line {}: {e}", i + 1))))
        .collect::<Result<_>>()?;
    if items.len() != count {
        return Err(corrupt(path, format!("{} items, generation.json says {count}", items.len())));
    }
    Ok(items)
}

fn read_embeddings(path: &Path, count: usize, dim: usize) -> Result<Array2<f32>> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
    let t = st.tensor(EMBEDDINGS_TENSOR).map_err(|e| corrupt(path, e.to_string()))?;
    if t.dtype() != safetensors::Dtype::F32 || t.shape() != [count, dim] {
        return Err(corrupt(path, format!("{:?} {:?}, expected F32 [{count}, {dim}]", t.dtype(), t.shape())));
    }
    let v: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok(Array2::from_shape_vec((count, dim), v).expect("shape checked"))
}

/// Items and embeddings of a complete generation, checksummed, without the graph: what the
/// embedding cache reuses.
pub fn read_embeddings_only(dir: &Path) -> Result<(GenerationMeta, Vec<ItemRecord>, Array2<f32>)> {
    let meta = read_meta(dir)?;
    check_files(dir, &meta, &[ITEMS, EMBEDDINGS])?;
    let items = read_items(&dir.join(ITEMS), meta.count)?;
    let emb = read_embeddings(&dir.join(EMBEDDINGS), meta.count, meta.dim)?;
    Ok((meta, items, emb))
}

/// A loaded generation: items, embeddings (exact index), HNSW graph and filter tables.
pub struct Generation {
    pub dir: PathBuf,
    pub meta: GenerationMeta,
    pub items: Vec<ItemRecord>,
    pub exact: ExactIndex,
    pub hnsw: HnswIndex,
    pub labels: Labels,
    rows_by_id: HashMap<String, u32>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation").field("dir", &self.dir).field("count", &self.meta.count).finish()
    }
}

impl Generation {
    /// Loads `dir` completely, checking every file against `generation.json` first. Any
    /// problem is an error; nothing is half-loaded.
    pub fn load(dir: &Path) -> Result<Self> {
        let meta = read_meta(dir)?;
        let graph_files = [format!("{GRAPH}.hnsw.graph"), format!("{GRAPH}.hnsw.data"), compact_file(GRAPH)];
        let mut names = vec![ITEMS, EMBEDDINGS, &graph_files[0], &graph_files[1]];
        // Generations of earlier versions have no served-graph file (it is derived on load).
        if meta.files.contains_key(&graph_files[2]) {
            names.push(&graph_files[2]);
        }
        if meta.hnsw_nodes.is_some() {
            names.push(NODES);
        }
        check_files(dir, &meta, &names)?;
        let items = read_items(&dir.join(ITEMS), meta.count)?;
        let mut rows_by_id = HashMap::with_capacity(items.len());
        for (row, it) in items.iter().enumerate() {
            if rows_by_id.insert(it.item.id.clone(), row as u32).is_some() {
                return Err(corrupt(&dir.join(ITEMS), format!("duplicate item id {:?}", it.item.id)));
            }
        }
        let emb = read_embeddings(&dir.join(EMBEDDINGS), meta.count, meta.dim)?;
        let map = match meta.hnsw_nodes {
            Some(nodes) => Some(read_nodes(&dir.join(NODES), nodes, meta.count)?),
            None => None,
        };
        let mut hnsw = HnswIndex::load(dir, GRAPH, meta.hnsw_nodes.unwrap_or(meta.count), meta.dim, map, false)?;
        if let Some(&bad) = meta.hnsw_orphans.iter().find(|&&r| r as usize >= meta.count) {
            return Err(corrupt(&dir.join(META), format!("orphan row {bad} is past the {} items", meta.count)));
        }
        hnsw.set_orphans(&meta.hnsw_orphans, emb.view());
        // The vectors are held once, the graph's; the embeddings file must hold the same bits.
        let exact = hnsw.exact();
        let differs = (0..meta.count).into_par_iter().find_any(|&r| {
            exact.vector(r as u32).iter().zip(emb.row(r).iter()).any(|(a, b)| a.to_bits() != b.to_bits())
        });
        if let Some(r) = differs {
            return Err(corrupt(
                &dir.join(EMBEDDINGS),
                format!(
                    "row {r}'s vector differs from the graph's (the graph and the embeddings are not of one build)"
                ),
            ));
        }
        drop(emb);
        let labels = Labels::new(&items);
        Ok(Generation { dir: dir.to_path_buf(), exact, meta, items, hnsw, labels, rows_by_id })
    }

    /// `gen-<n>`.
    pub fn name(&self) -> String {
        self.meta.name()
    }

    /// The row of an item id.
    pub fn row_of(&self, id: &str) -> Option<u32> {
        self.rows_by_id.get(id).copied()
    }

    /// The item at `row`.
    pub fn item(&self, row: u32) -> &ItemRecord {
        &self.items[row as usize]
    }

    /// Where the image of `row` is on disk.
    pub fn image_path(&self, row: u32) -> PathBuf {
        self.meta.image_root.join(&self.items[row as usize].item.image)
    }
}

/// An index root `index/<name>/`: its generations and `CURRENT`.
#[derive(Debug, Clone)]
pub struct IndexDir {
    pub root: PathBuf,
}

impl IndexDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        IndexDir { root: root.into() }
    }

    /// Creates the root if needed.
    pub fn create(&self) -> Result<()> {
        fs::create_dir_all(&self.root).map_err(|e| Error::io(&self.root, e))
    }

    /// Takes the run lock (released when the file is dropped or the process dies).
    pub fn lock(&self) -> Result<File> {
        let path = self.root.join(LOCK);
        let f =
            File::options().create(true).truncate(false).write(true).open(&path).map_err(|e| Error::io(&path, e))?;
        match f.try_lock() {
            Ok(()) => Ok(f),
            Err(fs::TryLockError::WouldBlock) => Err(Error::IndexLocked { path }),
            Err(fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }

    /// The generation `CURRENT` names, if any.
    pub fn current(&self) -> Result<Option<String>> {
        let path = self.root.join(CURRENT);
        match fs::read_to_string(&path) {
            Ok(s) => {
                let name = s.trim().to_string();
                if parse_generation_name(&name).is_none() {
                    return Err(corrupt(&path, format!("names {name:?}, not gen-<n>")));
                }
                Ok(Some(name))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Loads the live generation.
    pub fn load_current(&self) -> Result<Generation> {
        let name = self.current()?.ok_or_else(|| Error::NoLiveGeneration { path: self.root.clone() })?;
        Generation::load(&self.root.join(name))
    }

    /// All `gen-<n>` directories (complete or not), ascending by `n`.
    pub fn generations(&self) -> Result<Vec<(u64, PathBuf)>> {
        let rd = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&self.root, e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(&self.root, e))?;
            if let Some(n) = entry.file_name().to_str().and_then(parse_generation_name)
                && entry.path().is_dir()
            {
                out.push((n, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Creates the next generation's empty directory (one past every existing one, complete or not).
    pub fn create_next(&self) -> Result<(u64, PathBuf)> {
        let n = self.generations()?.last().map_or(1, |(n, _)| n + 1);
        let dir = self.root.join(generation_name(n));
        fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        sync_dir(&self.root)?;
        Ok((n, dir))
    }

    /// Points `CURRENT` at `name` atomically (temporary file, fsync, rename, fsync the root).
    pub fn switch_current(&self, name: &str) -> Result<()> {
        write_atomic(&self.root.join(CURRENT), format!("{name}\n").as_bytes())
    }

    /// Deletes all generation directories but the `keep` newest and the live one; also stale
    /// temporary files. Returns what was removed. Call with the lock held.
    pub fn gc(&self, keep: usize) -> Result<Vec<PathBuf>> {
        let live = self.current()?;
        let gens = self.generations()?;
        let cut = gens.len().saturating_sub(keep);
        let mut removed = Vec::new();
        for (n, dir) in &gens[..cut] {
            if live.as_deref() == Some(generation_name(*n).as_str()) {
                continue;
            }
            // Un-commit first, so a half-deleted directory is never taken for a generation.
            match fs::remove_file(dir.join(META)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(dir.join(META), e)),
            }
            fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            removed.push(dir.clone());
        }
        if let Ok(rd) = fs::read_dir(&self.root) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&format!(".{CURRENT}.tmp-")) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::testutil::{item, meta, random_unit_rows};
    use crate::progress::Progress;

    pub(crate) fn write_gen(root: &IndexDir, count: usize) -> (u64, PathBuf) {
        let (n, dir) = root.create_next().unwrap();
        let emb = random_unit_rows(count, 8, n);
        let items: Vec<_> = (0..count).map(item).collect();
        let h = HnswIndex::build(emb.view(), &HnswParams::default(), &Progress::hidden()).unwrap();
        write_generation(&dir, meta(n), &items, &emb, &h, None).unwrap();
        (n, dir)
    }

    #[test]
    fn a_written_generation_loads_back_identically() {
        let tmp = tempfile::tempdir().unwrap();
        let root = IndexDir::new(tmp.path());
        let (n, dir) = write_gen(&root, 50);
        let g = Generation::load(&dir).unwrap();
        assert_eq!((g.name(), g.meta.count, g.meta.dim), (format!("gen-{n}"), 50, 8));
        assert_eq!(g.exact.to_matrix(), random_unit_rows(50, 8, n));
        assert_eq!(g.items[7], item(7));
        assert_eq!(g.row_of("item-7"), Some(7));
        assert_eq!(g.image_path(7), PathBuf::from("/data/img/7.png"));
    }

    #[test]
    fn any_changed_byte_makes_loading_fail() {
        let tmp = tempfile::tempdir().unwrap();
        let root = IndexDir::new(tmp.path());
        let (_, dir) = write_gen(&root, 30);
        for name in [ITEMS, EMBEDDINGS, "graph.hnsw.graph", "graph.hnsw.data", "graph.compact"] {
            let p = dir.join(name);
            let orig = fs::read(&p).unwrap();
            let mut bad = orig.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 1;
            fs::write(&p, &bad).unwrap();
            let err = Generation::load(&dir).unwrap_err();
            assert!(matches!(err, Error::IndexCorrupt { .. }), "{name}: {err}");
            fs::write(&p, &orig).unwrap();
        }
        Generation::load(&dir).unwrap();
        fs::remove_file(dir.join(META)).unwrap();
        assert!(Generation::load(&dir).is_err());
    }

    #[test]
    fn current_switch_gc_and_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let root = IndexDir::new(tmp.path());
        assert!(matches!(root.load_current(), Err(Error::NoLiveGeneration { .. })));
        let (n1, _) = write_gen(&root, 10);
        root.switch_current(&generation_name(n1)).unwrap();
        let (n2, _) = write_gen(&root, 10);
        let (n3, _) = write_gen(&root, 10);
        let (n4, partial) = root.create_next().unwrap(); // an interrupted run
        assert_eq!((n1, n2, n3, n4), (1, 2, 3, 4));
        assert_eq!(root.load_current().unwrap().name(), "gen-1");
        // Keep 2 newest (gen-3, gen-4) plus the live gen-1.
        let removed = root.gc(2).unwrap();
        assert_eq!(removed, vec![tmp.path().join("gen-2")]);
        assert!(partial.exists() && tmp.path().join("gen-1").exists());
        root.switch_current("gen-3").unwrap();
        root.gc(1).unwrap();
        let left: Vec<u64> = root.generations().unwrap().iter().map(|g| g.0).collect();
        assert_eq!(left, vec![3, 4]);
        assert_eq!(root.create_next().unwrap().0, 5);
        let held = root.lock().unwrap();
        assert!(matches!(root.lock(), Err(Error::IndexLocked { .. })));
        drop(held);
        root.lock().unwrap();
        fs::write(tmp.path().join(CURRENT), "nonsense").unwrap();
        assert!(root.current().is_err());
    }

    #[test]
    fn items_of_generations_written_before_titles_and_attributes_still_read() {
        // An items.jsonl line as generations wrote it before titles and attributes existed.
        let old = r#"{"id":"a","image":"a.png","category":"x/y","product":"p","variation":"v","view":"","split":"train","role":null,"sha256":"00"}"#;
        let rec: ItemRecord = serde_json::from_str(old).unwrap();
        assert_eq!((rec.item.title, rec.item.attributes.len(), rec.sha256.as_str()), (None, 0, "00"));
        // A new line round-trips with both.
        let mut new = item(1);
        new.item.title = Some("t".into());
        new.item.attributes.insert("brand".into(), crate::catalogue::AttrValue::String("acme".into()));
        let text = serde_json::to_string(&new).unwrap();
        assert_eq!(serde_json::from_str::<ItemRecord>(&text).unwrap(), new);
    }
}
