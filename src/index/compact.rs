//! The served form of an HNSW graph: layer-0 links re-selected from hnsw_rs's, held in fixed-width `u32` slots beside one vector matrix, stored in our own file and searched by our own layered best-first search.
//!
//! `hnsw_rs` builds the graph (and keeps its own dump, which an incremental build inserts into),
//! but its in-memory form is made for inserting: every point holds 16 lock-guarded neighbour lists
//! of reference-counted entries, about 4 KiB a point at M = 16, and its search chases a pointer
//! per candidate. Its lists are also poor for searching (see [`select_links`]). So after every
//! build [`CompactGraph::from_hnsw`] makes the served graph:
//! - the vectors, one contiguous `nodes × dim` matrix in node order (shared with the exact index);
//! - layer 0's links chosen anew with the HNSW heuristic from two hops of hnsw_rs's lists, with
//!   reverse links and unreachable nodes linked back, in fixed-width slots (a count and up to
//!   `width` links a node, one `u32` array), so expanding a node costs one memory access,
//!   prefetched when it became a candidate;
//! - the few nodes above layer 0 (about 1 in M) with their upper-layer links (hnsw_rs's);
//!
//! and [`CompactGraph::write`] stores it as `graph.compact`. A generation being served reads
//! only that file (about a second at 1M × 128, against ~40 s and 4.4 GiB for hnsw_rs's dump).
//! [`CompactGraph::search`] is the standard HNSW search (Malkov & Yashunin, Alg. 2 and 5):
//! greedy descent from the entry point through the upper layers, then a best-first beam of width
//! `ef` on layer 0, with a per-thread visited table; the vectors of a node's unvisited neighbours
//! are prefetched together before they are scored.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use ndarray::Array2;

use super::Hit;
use super::exact::{Worst, dot};

/// The nodes a breadth-first walk from `entry` over `links` does not reach, ascending.
fn unreachable_from<'a>(nodes: usize, entry: u32, links: impl Fn(u32) -> &'a [u32]) -> Vec<u32> {
    if nodes == 0 {
        return Vec::new();
    }
    let mut seen = vec![false; nodes];
    let mut queue = std::collections::VecDeque::from([entry]);
    seen[entry as usize] = true;
    while let Some(c) = queue.pop_front() {
        for &m in links(c) {
            if !std::mem::replace(&mut seen[m as usize], true) {
                queue.push_back(m);
            }
        }
    }
    (0..nodes as u32).filter(|&i| !seen[i as usize]).collect()
}

/// Gives every node that no path from `entry` reaches on layer 0 in-links from the nodes it
/// links to itself (its nearest neighbours when it was inserted), so searches that reach those
/// neighbours reach it. Returns how many nodes were unreachable before.
///
/// hnsw_rs keeps a neighbour list at its size by dropping the farthest entry whenever a new
/// point links in, without the diversity heuristic it uses for a new point's own links; in
/// clustered data a node inserted early loses every in-link to later, closer points. On 1M
/// clustered vectors (M 16, ef_construction 200) 148,227 nodes — 14.8 % — were left that way,
/// which is most of the recall gap to faiss at the same parameters. The repair is ours, done
/// on every load (about a second at 1M); the dumped graph stays hnsw_rs's.
fn relink_unreachable(level0: &mut [Vec<u32>], entry: u32) -> usize {
    let lost = unreachable_from(level0.len(), entry, |c| level0[c as usize].as_slice());
    for &u in &lost {
        for i in 0..level0[u as usize].len() {
            let v = level0[u as usize][i] as usize;
            if !level0[v].contains(&u) {
                level0[v].push(u);
            }
        }
    }
    lost.len()
}

/// Candidates of a node's layer-0 links: the nodes it links to, the nodes that link to it, and
/// the nodes those it links to link to (two hops over hnsw_rs's lists).
struct Candidates<'a> {
    raw: &'a [Vec<u32>],
    /// In-links of node `n`: `rev[rev_at[n]..rev_at[n + 1]]`.
    rev_at: Vec<usize>,
    rev: Vec<u32>,
}

impl<'a> Candidates<'a> {
    fn new(raw: &'a [Vec<u32>]) -> Self {
        let n = raw.len();
        let mut rev_at = vec![0usize; n + 1];
        for l in raw {
            for &v in l {
                rev_at[v as usize + 1] += 1;
            }
        }
        for i in 0..n {
            rev_at[i + 1] += rev_at[i];
        }
        let mut fill = rev_at.clone();
        let mut rev = vec![0u32; rev_at[n]];
        for (u, l) in raw.iter().enumerate() {
            for &v in l {
                rev[fill[v as usize]] = u as u32;
                fill[v as usize] += 1;
            }
        }
        Candidates { raw, rev_at, rev }
    }

    /// Calls `f` once per distinct candidate of `u` (never `u`), `marks`/`stamp` being the
    /// caller's visited table.
    fn each(&self, u: usize, marks: &mut [u32], stamp: u32, mut f: impl FnMut(u32)) {
        marks[u] = stamp;
        let mut visit = |c: u32| {
            if marks[c as usize] != stamp {
                marks[c as usize] = stamp;
                f(c);
            }
        };
        for &v in &self.raw[u] {
            visit(v);
        }
        for &v in &self.rev[self.rev_at[u]..self.rev_at[u + 1]] {
            visit(v);
        }
        for &v in &self.raw[u] {
            for &w in &self.raw[v as usize] {
                visit(w);
            }
        }
    }
}

/// Chooses every node's layer-0 links with the HNSW neighbour-selection heuristic (Malkov &
/// Yashunin, Alg. 4) over its [`Candidates`]: closest first, a candidate is kept only if it is
/// closer to the node than to every link kept before it, at most `max` links.
///
/// hnsw_rs applies that heuristic to a new point's own links, but when a later point links in
/// and a list is full it drops the farthest entry, so after a build most lists hold only the
/// nearest points of their neighbourhood and the long links that make HNSW navigable are gone.
/// On 1M clustered vectors (M 16, ef_construction 200) recall@10 at ef 64 goes from 0.91 on
/// hnsw_rs's lists to 0.95 on these; the mean list shrinks from 32 to about 16 links.
///
/// `keep(u)` returns a list to reuse unchanged (an incremental build keeps the links of nodes
/// whose hnsw_rs list did not change); those nodes are not recomputed.
fn select_links<'p>(
    vector: &(dyn Fn(u32) -> &'p [f32] + Sync),
    raw: &[Vec<u32>],
    max: usize,
    keep: impl Fn(usize) -> Option<&'p [u32]> + Sync,
) -> Vec<Vec<u32>> {
    use rayon::prelude::*;
    let n = raw.len();
    let cands = Candidates::new(raw);
    (0..n)
        .into_par_iter()
        .map_init(
            || (vec![0u32; n], 0u32, Vec::<(f32, u32)>::new()),
            |(marks, stamp, scored), u| {
                if let Some(list) = keep(u) {
                    return list.to_vec();
                }
                *stamp += 1;
                let vu = vector(u as u32);
                scored.clear();
                cands.each(u, marks, *stamp, |c| scored.push((dot(vu, vector(c)), c)));
                scored.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let mut kept: Vec<u32> = Vec::with_capacity(max);
                for &(s, c) in scored.iter() {
                    if kept.len() == max {
                        break;
                    }
                    let vc = vector(c);
                    if kept.iter().all(|&k| dot(vc, vector(k)) < s) {
                        kept.push(c);
                    }
                }
                kept
            },
        )
        .collect()
}

/// Adds to every node's list the nodes that link to it, while the list has room (fewer than
/// `max` links): the heuristic's lists are one-way, and a search starting where the upper layers
/// leave it must still find its way to every node. (HNSW does the same when it inserts a point:
/// each new link is added in both directions.)
fn add_reverse_links(level0: &mut [Vec<u32>], max: usize) {
    let forward: Vec<(u32, u32)> =
        level0.iter().enumerate().flat_map(|(u, l)| l.iter().map(move |&v| (u as u32, v))).collect();
    for (u, v) in forward {
        let back = &mut level0[v as usize];
        if back.len() < max && !back.contains(&u) {
            back.push(u);
        }
    }
}

/// hnsw_rs's layer-0 lists of `g`, by node id (checked against `nodes`).
pub fn hnsw_level0<D>(g: &hnsw_rs::hnsw::Hnsw<'_, f32, D>, nodes: usize) -> Result<Vec<Vec<u32>>, String>
where
    D: hnsw_rs::anndists::dist::distances::Distance<f32> + Send + Sync,
{
    let mut level0 = vec![Vec::new(); nodes];
    if nodes == 0 || g.get_point_indexation().get_nb_point() == 0 {
        return Ok(level0);
    }
    for p in g.get_point_indexation() {
        let id = p.get_origin_id();
        if id >= nodes {
            return Err(format!("point id {id} is out of range ({nodes} nodes)"));
        }
        level0[id] =
            p.get_neighborhood_id().first().map_or_else(Vec::new, |ns| ns.iter().map(|n| n.d_id as u32).collect());
        if let Some(&bad) = level0[id].iter().find(|&&n| n as usize >= nodes) {
            return Err(format!("point {id} links to {bad}"));
        }
    }
    Ok(level0)
}

/// What an incremental build reuses: the served graph it extends and hnsw_rs's layer-0 lists
/// as they were before the new points went in.
pub struct Prior<'a> {
    pub graph: &'a CompactGraph,
    pub hnsw_level0: &'a [Vec<u32>],
}

/// Asks the CPU to start loading `v` into cache (a hint: no effect on results).
#[inline(always)]
fn prefetch<T>(v: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let bytes = std::mem::size_of_val(v);
        for at in (0..bytes).step_by(64) {
            // SAFETY: a prefetch is a hint that never faults; the address is inside `v`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(v.as_ptr().cast::<i8>().add(at)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// First bytes of a graph file written by [`CompactGraph::write`] (the last is the format version).
const MAGIC: &[u8; 16] = b"hiercon-graph\x00\x00\x01";
/// Highest layer a graph file may claim (hnsw_rs's limit).
const MAX_LEVEL: usize = 16;

/// See the module docs.
#[derive(Debug, PartialEq)]
pub struct CompactGraph {
    vectors: Arc<Array2<f32>>,
    /// Layer-0 neighbours of node `n`: slot `n` is `slots[n * (width + 1)..][..width + 1]`, its
    /// link count followed by the links (the rest of the slot unused).
    width: usize,
    slots: Vec<u32>,
    /// Nodes above layer 0: their neighbours on layers 1..=level (index 0 is layer 1).
    upper: HashMap<u32, Vec<Vec<u32>>>,
    entry: u32,
    top: usize,
}

thread_local! {
    /// Visited marks for the search on this thread: `marks[n] == stamp` means visited.
    /// One byte a node (1 MiB at 1M nodes, so it stays in cache), cleared every 255 searches.
    static VISITED: RefCell<(Vec<u8>, u8)> = const { RefCell::new((Vec::new(), 0)) };
}

impl CompactGraph {
    /// The served form of `g`: its vectors and upper layers copied, its layer-0 links chosen
    /// by [`select_links`] (reusing `prior`'s links for nodes whose hnsw_rs list is as it was),
    /// then unreachable nodes relinked. Every link must name one of the `nodes` points and every
    /// vector have width `dim`; otherwise a description of the first problem (a damaged dump).
    pub fn from_hnsw<D>(
        g: &hnsw_rs::hnsw::Hnsw<'_, f32, D>,
        nodes: usize,
        dim: usize,
        prior: Option<&Prior<'_>>,
    ) -> Result<Self, String>
    where
        D: hnsw_rs::anndists::dist::distances::Distance<f32> + Send + Sync,
    {
        let mut vectors = Array2::<f32>::zeros((nodes, dim));
        let mut upper: HashMap<u32, Vec<Vec<u32>>> = HashMap::new();
        let mut seen = vec![false; nodes];
        let (mut entry, mut top) = (0u32, 0usize);
        let points = g.get_point_indexation();
        if nodes > 0 && points.get_nb_point() > 0 {
            for p in points {
                let id = p.get_origin_id();
                if id >= nodes || std::mem::replace(&mut seen[id], true) {
                    return Err(format!("point id {id} is out of range or repeated ({nodes} nodes)"));
                }
                let v = p.get_v();
                if v.len() != dim {
                    return Err(format!("point {id} has width {}, expected {dim}", v.len()));
                }
                vectors.row_mut(id).assign(&ndarray::ArrayView1::from(v));
                let level = p.get_point_id().0 as usize;
                if level > 0 {
                    let hood = p.get_neighborhood_id();
                    let ids = |l: usize| -> Result<Vec<u32>, String> {
                        hood.get(l)
                            .map(|ns| ns.iter().map(|n| n.d_id).collect::<Vec<usize>>())
                            .unwrap_or_default()
                            .into_iter()
                            .map(|n| if n < nodes { Ok(n as u32) } else { Err(format!("point {id} links to {n}")) })
                            .collect()
                    };
                    upper.insert(id as u32, (1..=level).map(ids).collect::<Result<_, _>>()?);
                }
                if level > top || (level == top && upper.is_empty() && id as u32 == entry) {
                    (entry, top) = (id as u32, level);
                }
            }
            if let Some(missing) = seen.iter().position(|s| !s) {
                return Err(format!("no point holds node {missing}"));
            }
        }
        let raw = hnsw_level0(g, nodes)?;
        let max = 2 * g.get_max_nb_connection() as usize;
        let keep = |u: usize| {
            let p = prior?;
            (u < p.graph.nodes() && p.hnsw_level0.get(u) == Some(&raw[u])).then(|| p.graph.neighbours(u as u32, 0))
        };
        let vector = |n: u32| vectors.row(n as usize).to_slice().expect("standard layout");
        let t = std::time::Instant::now();
        let mut level0 = select_links(&vector, &raw, max, keep);
        tracing::info!(seconds = t.elapsed().as_secs_f64(), nodes, "layer-0 links selected");
        drop(raw);
        add_reverse_links(&mut level0, max);
        Ok(Self::assemble(vectors, level0.as_mut_slice(), upper, entry, top))
    }

    /// Relinks unreachable nodes of `level0` and flattens it.
    fn assemble(
        vectors: Array2<f32>,
        level0: &mut [Vec<u32>],
        upper: HashMap<u32, Vec<Vec<u32>>>,
        entry: u32,
        top: usize,
    ) -> Self {
        let nodes = level0.len();
        let repaired = if nodes > 0 { relink_unreachable(level0, entry) } else { 0 };
        if repaired > 0 {
            tracing::info!(nodes = repaired, "linked back nodes the graph left unreachable");
        }
        let width = level0.iter().map(Vec::len).max().unwrap_or(0);
        let mut slots = vec![0u32; nodes * (width + 1)];
        for (slot, l) in slots.chunks_exact_mut(width + 1).zip(level0.iter()) {
            slot[0] = l.len() as u32;
            slot[1..=l.len()].copy_from_slice(l);
        }
        CompactGraph { vectors: Arc::new(vectors), width, slots, upper, entry, top }
    }

    /// Writes the graph to `path` in our own format (see [`CompactGraph::read`]).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
        let (nodes, dim) = self.vectors.dim();
        w.write_all(MAGIC)?;
        for v in [nodes as u64, dim as u64, self.width as u64, self.upper.len() as u64] {
            w.write_all(&v.to_le_bytes())?;
        }
        for v in [self.entry, self.top as u32] {
            w.write_all(&v.to_le_bytes())?;
        }
        for row in self.vectors.rows() {
            for x in row {
                w.write_all(&x.to_le_bytes())?;
            }
        }
        let words = |w: &mut std::io::BufWriter<std::fs::File>, vs: &[u32]| -> std::io::Result<()> {
            vs.iter().try_for_each(|v| w.write_all(&v.to_le_bytes()))
        };
        words(&mut w, &self.slots)?;
        let mut upper: Vec<(&u32, &Vec<Vec<u32>>)> = self.upper.iter().collect();
        upper.sort_unstable_by_key(|(n, _)| **n);
        for (&node, layers) in upper {
            words(&mut w, &[node, layers.len() as u32])?;
            for l in layers {
                words(&mut w, &[l.len() as u32])?;
                words(&mut w, l)?;
            }
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    }

    /// Reads a graph [`CompactGraph::write`] wrote, checking it holds `nodes` nodes of width
    /// `dim` and that every offset and link is in range; anything else (a truncated, padded or
    /// foreign file) is a description of the first problem.
    ///
    /// Layout, little-endian: the 16-byte magic; `u64` nodes, dim, layer-0 slot width and count
    /// of nodes above layer 0; `u32` entry point and top layer; the vectors (`f32`, node-major);
    /// layer-0 slots (`nodes × (width + 1)` `u32`: count, then links); then per upper node, ascending,
    /// `u32` node and level and per layer 1..=level a `u32` length and its links.
    pub fn read(path: &Path, nodes: usize, dim: usize) -> Result<Self, String> {
        let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        let mut r = std::io::BufReader::with_capacity(1 << 20, file);
        let short = |e: std::io::Error| format!("the file ends early ({e})");
        let mut magic = [0u8; 16];
        r.read_exact(&mut magic).map_err(short)?;
        if &magic != MAGIC {
            return Err("not a hiercon graph file (bad magic)".into());
        }
        let mut u64s = [0u64; 4];
        for v in &mut u64s {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).map_err(short)?;
            *v = u64::from_le_bytes(b);
        }
        let [n, d, width, n_upper] = u64s;
        if n != nodes as u64 || d != dim as u64 {
            return Err(format!("the file holds {n} nodes of width {d}, expected {nodes} of width {dim}"));
        }
        let head = 16 + 32 + 8;
        let fixed = n.checked_mul(d * 4).zip(width.checked_add(1).and_then(|w| w.checked_mul(n * 4)));
        let fixed = fixed.and_then(|(a, b)| a.checked_add(b));
        if width > n || fixed.is_none_or(|f| f + head > size) || n_upper > n {
            return Err(format!("the header does not fit the file's {size} bytes"));
        }
        let words = |r: &mut std::io::BufReader<std::fs::File>, count: usize| -> Result<Vec<u32>, String> {
            let mut bytes = vec![0u8; count * 4];
            r.read_exact(&mut bytes).map_err(short)?;
            Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        let [entry, top] = words(&mut r, 2)?[..] else { unreachable!() };
        let vectors = words(&mut r, nodes * dim)?.into_iter().map(f32::from_bits).collect();
        let vectors = Array2::from_shape_vec((nodes, dim), vectors).expect("sized above");
        let width = width as usize;
        let slots = words(&mut r, nodes * (width + 1))?;
        for (node, slot) in slots.chunks_exact(width + 1).enumerate() {
            if slot[0] as usize > width {
                return Err(format!("node {node} claims {} layer-0 links, the slots hold {width}", slot[0]));
            }
            if let Some(bad) = slot[1..=slot[0] as usize].iter().find(|&&l| l as usize >= nodes) {
                return Err(format!("a layer-0 link of node {node} names node {bad} of {nodes}"));
            }
        }
        if nodes > 0 && (entry as usize >= nodes || top as usize > MAX_LEVEL) {
            return Err(format!("entry point {entry} at layer {top} is out of range"));
        }
        let mut upper = HashMap::with_capacity(n_upper as usize);
        let mut last = None;
        for _ in 0..n_upper {
            let [node, level] = words(&mut r, 2)?[..] else { unreachable!() };
            if node as usize >= nodes || level == 0 || level > top || last.is_some_and(|l| l >= node) {
                return Err(format!("upper-layer node {node} (level {level}) is out of range or out of order"));
            }
            last = Some(node);
            let mut layers = Vec::with_capacity(level as usize);
            for _ in 0..level {
                let len = words(&mut r, 1)?[0] as usize;
                if len > nodes {
                    return Err(format!("node {node} has {len} links on one layer"));
                }
                let l = words(&mut r, len)?;
                if let Some(bad) = l.iter().find(|&&x| x as usize >= nodes) {
                    return Err(format!("node {node} links to {bad} on an upper layer"));
                }
                layers.push(l);
            }
            upper.insert(node, layers);
        }
        if top > 0 && upper.get(&entry).map(Vec::len) != Some(top as usize) {
            return Err(format!("entry point {entry} is not on the top layer {top}"));
        }
        if r.read(&mut [0u8; 1]).map_err(|e| e.to_string())? != 0 {
            return Err("the file has bytes after the graph".into());
        }
        Ok(CompactGraph { vectors: Arc::new(vectors), width, slots, upper, entry, top: top as usize })
    }

    /// Nodes, with their vectors in node order.
    pub fn vectors(&self) -> &Arc<Array2<f32>> {
        &self.vectors
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.vectors.nrows()
    }

    fn vector(&self, n: u32) -> &[f32] {
        self.vectors.row(n as usize).to_slice().expect("standard layout")
    }

    /// Node `n`'s layer-0 slot: its link count, then the links (and unused room).
    fn slot(&self, n: u32) -> &[u32] {
        &self.slots[n as usize * (self.width + 1)..][..self.width + 1]
    }

    fn neighbours(&self, n: u32, layer: usize) -> &[u32] {
        if layer == 0 {
            let slot = self.slot(n);
            &slot[1..=slot[0] as usize]
        } else {
            self.upper.get(&n).and_then(|ls| ls.get(layer - 1)).map_or(&[], Vec::as_slice)
        }
    }

    /// Nodes no search can reach: not linked to, directly or through other nodes, from the
    /// entry point on layer 0 (where every search ends), after [`relink_unreachable`].
    pub fn unreachable(&self) -> Vec<u32> {
        unreachable_from(self.nodes(), self.entry, |c| self.neighbours(c, 0))
    }

    /// Up to `k` nodes `allow` accepts (all when `None`), best first (by [`Hit::ranking`]; a
    /// hit's `row` is a graph node here), from a beam of width
    /// `ef.max(k)`. Rejected nodes are still walked through; a filter that rejects most nodes
    /// makes the search visit most of the graph.
    pub fn search(&self, q: &[f32], k: usize, ef: usize, allow: Option<&dyn Fn(u32) -> bool>) -> Vec<Hit> {
        let n = self.nodes();
        if n == 0 || k == 0 {
            return Vec::new();
        }
        let ef = ef.max(k);
        let score = |node: u32| Hit { row: node, score: dot(q, self.vector(node)) };
        // Greedy descent through the upper layers.
        let mut cur = score(self.entry);
        for layer in (1..=self.top).rev() {
            loop {
                let mut moved = false;
                for &m in self.neighbours(cur.row, layer) {
                    let s = score(m);
                    if s.score > cur.score {
                        cur = s;
                        moved = true;
                    }
                }
                if !moved {
                    break;
                }
            }
        }
        let ok = |node: u32| allow.is_none_or(|f| f(node));
        VISITED.with(|cell| {
            let mut guard = cell.borrow_mut();
            let (marks, stamp) = &mut *guard;
            if marks.len() < n || *stamp == u8::MAX {
                marks.clear();
                marks.resize(n, 0);
                *stamp = 0;
            }
            *stamp += 1;
            let stamp = *stamp;
            marks[cur.row as usize] = stamp;
            let mut batch: Vec<u32> = Vec::with_capacity(64);
            let mut candidates = BinaryHeap::with_capacity(ef * 2);
            let mut found: BinaryHeap<Worst> = BinaryHeap::with_capacity(ef + 1);
            candidates.push(Reverse(Worst(cur)));
            if ok(cur.row) {
                found.push(Worst(cur));
            }
            while let Some(Reverse(Worst(c))) = candidates.pop() {
                if found.len() >= ef && found.peek().is_some_and(|w| c.score < w.0.score) {
                    break;
                }
                // Unvisited neighbours first, their vectors requested from memory all at once,
                // then scored: the loads overlap instead of stalling one after another.
                batch.clear();
                for &m in self.neighbours(c.row, 0) {
                    if marks[m as usize] != stamp {
                        marks[m as usize] = stamp;
                        batch.push(m);
                    }
                }
                for &m in &batch {
                    prefetch(self.vector(m));
                }
                for &m in &batch {
                    let s = score(m);
                    let worst = found.peek().map_or(f32::NEG_INFINITY, |w| w.0.score);
                    if found.len() < ef || s.score > worst {
                        candidates.push(Reverse(Worst(s)));
                        prefetch(self.slot(m));
                        if ok(m) {
                            found.push(Worst(s));
                            if found.len() > ef {
                                found.pop();
                            }
                        }
                    }
                }
            }
            let mut out: Vec<Hit> = found.into_iter().map(|w| w.0).collect();
            out.sort_by(Hit::ranking);
            out.truncate(k);
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unit vectors at the given angles (degrees) in the plane, padded to width 4.
    fn on_circle(degrees: &[f32]) -> Array2<f32> {
        let mut v = Array2::zeros((degrees.len(), 4));
        for (i, d) in degrees.iter().enumerate() {
            v[[i, 0]] = d.to_radians().cos();
            v[[i, 1]] = d.to_radians().sin();
        }
        v
    }

    #[test]
    fn the_heuristic_drops_a_link_a_nearer_one_covers_and_keeps_the_other_side() {
        // Node 0 at 0°; candidates at 10° (1), 20° (2, closer to 1 than to 0) and -15° (3).
        let v = on_circle(&[0.0, 10.0, 20.0, -15.0, 5.0]);
        let raw = vec![vec![1, 2, 3], vec![], vec![1], vec![], vec![2]];
        let vector = |n: u32| v.row(n as usize).to_slice().unwrap();
        let chosen = select_links(&vector, &raw, 4, |_| None);
        assert_eq!(chosen[0], vec![1, 3], "closest first; 2 is covered by 1");
        // Node 4 (5°) links to 2 only; 1, two hops away, is nearer and covers 2.
        assert_eq!(chosen[4], vec![1]);
        // Node 1 has no links of its own: its candidates are the nodes linking to it, 0 and 2,
        // equally near (lower id first), on either side, so both are kept.
        assert_eq!(chosen[1], vec![0, 2]);
        // `max` caps the list; a reused list is taken as it is.
        assert_eq!(select_links(&vector, &raw, 1, |_| None)[0], vec![1]);
        let reused = [3u32, 2];
        let chosen = select_links(&vector, &raw, 4, |u| (u == 0).then_some(&reused[..]));
        assert_eq!(chosen[0], vec![3, 2]);
    }

    #[test]
    fn reverse_links_fill_lists_up_to_their_width() {
        let mut l = vec![vec![1], vec![], vec![1], vec![1]];
        add_reverse_links(&mut l, 2);
        assert_eq!(l, vec![vec![1], vec![0, 2], vec![1], vec![1]], "1 is full after two back links");
    }

    #[test]
    fn nodes_without_in_links_are_linked_back_from_their_own_neighbours() {
        // 0 <-> 1 <-> 2; node 3 links to 0 and 1 but nothing links to it; 4 links only to 3.
        let mut level0 = vec![vec![1], vec![0, 2], vec![1], vec![0, 1], vec![3]];
        assert_eq!(unreachable_from(5, 0, |c| level0[c as usize].as_slice()), vec![3, 4]);
        assert_eq!(relink_unreachable(&mut level0, 0), 2);
        assert_eq!(level0[0], vec![1, 3]);
        assert_eq!(level0[1], vec![0, 2, 3]);
        assert_eq!(level0[3], vec![0, 1, 4]);
        assert!(unreachable_from(5, 0, |c| level0[c as usize].as_slice()).is_empty());
        // A node with no links at all stays unreachable (an orphan for the exact fallback).
        let mut alone = vec![vec![1], vec![0], vec![]];
        relink_unreachable(&mut alone, 0);
        assert_eq!(unreachable_from(3, 0, |c| alone[c as usize].as_slice()), vec![2]);
    }
}
