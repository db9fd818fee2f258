//! The served form of an HNSW graph: hnsw_rs's links copied into flat `u32` arrays, the vectors into one matrix, searched by our own layered best-first search.
//!
//! `hnsw_rs` builds the graph and owns its files, but its in-memory form is made for inserting:
//! every point holds 16 lock-guarded neighbour lists of reference-counted entries, about 4 KiB a
//! point at M = 16 (415 MiB for 100,000 points of width 128 whose vectors are 49 MiB), and its
//! search allocates a reference-counted entry per candidate. A generation being served never
//! inserts, so [`CompactGraph::from_hnsw`] copies the graph once, at load, into
//! - the vectors, one contiguous `nodes × dim` matrix in node order (shared with the exact index);
//! - layer 0's links as offsets + one `u32` array;
//! - the few nodes above layer 0 (about 1 in M) with their upper-layer links;
//!
//! and drops hnsw_rs's copy. [`CompactGraph::search`] is the standard HNSW search (Malkov &
//! Yashunin, Alg. 2 and 5): greedy descent from the entry point through the upper layers, then a
//! best-first beam of width `ef` on layer 0, with a per-thread visited table.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
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

/// See the module docs.
#[derive(Debug)]
pub struct CompactGraph {
    vectors: Arc<Array2<f32>>,
    /// Layer-0 neighbours of node `n`: `links[offsets[n]..offsets[n + 1]]`.
    offsets: Vec<u32>,
    links: Vec<u32>,
    /// Nodes above layer 0: their neighbours on layers 1..=level (index 0 is layer 1).
    upper: HashMap<u32, Vec<Vec<u32>>>,
    entry: u32,
    top: usize,
}

thread_local! {
    /// Visited marks for the search on this thread: `marks[n] == stamp` means visited.
    static VISITED: RefCell<(Vec<u32>, u32)> = const { RefCell::new((Vec::new(), 0)) };
}

impl CompactGraph {
    /// Copies `g`'s links and vectors. Every link must name one of the `nodes` points and every
    /// vector have width `dim`; otherwise a description of the first problem (a damaged dump).
    pub fn from_hnsw<D>(g: &hnsw_rs::hnsw::Hnsw<'_, f32, D>, nodes: usize, dim: usize) -> Result<Self, String>
    where
        D: hnsw_rs::anndists::dist::distances::Distance<f32> + Send + Sync,
    {
        let mut vectors = Array2::<f32>::zeros((nodes, dim));
        let mut level0: Vec<Vec<u32>> = vec![Vec::new(); nodes];
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
                let hood = p.get_neighborhood_id();
                let ids = |l: usize| -> Result<Vec<u32>, String> {
                    hood.get(l)
                        .map(|ns| ns.iter().map(|n| n.d_id).collect::<Vec<usize>>())
                        .unwrap_or_default()
                        .into_iter()
                        .map(|n| if n < nodes { Ok(n as u32) } else { Err(format!("point {id} links to {n}")) })
                        .collect()
                };
                level0[id] = ids(0)?;
                if level > 0 {
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
        let repaired = if nodes > 0 { relink_unreachable(&mut level0, entry) } else { 0 };
        if repaired > 0 {
            tracing::info!(nodes = repaired, "linked back nodes hnsw_rs's graph left unreachable");
        }
        let mut offsets = Vec::with_capacity(nodes + 1);
        let mut links = Vec::with_capacity(level0.iter().map(Vec::len).sum());
        offsets.push(0u32);
        for l in level0 {
            links.extend(l);
            offsets.push(links.len() as u32);
        }
        Ok(CompactGraph { vectors: Arc::new(vectors), offsets, links, upper, entry, top })
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

    fn neighbours(&self, n: u32, layer: usize) -> &[u32] {
        if layer == 0 {
            &self.links[self.offsets[n as usize] as usize..self.offsets[n as usize + 1] as usize]
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
            if marks.len() < n || *stamp == u32::MAX {
                marks.clear();
                marks.resize(n, 0);
                *stamp = 0;
            }
            *stamp += 1;
            let stamp = *stamp;
            marks[cur.row as usize] = stamp;
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
                for &m in self.neighbours(c.row, 0) {
                    if marks[m as usize] == stamp {
                        continue;
                    }
                    marks[m as usize] = stamp;
                    let s = score(m);
                    let worst = found.peek().map_or(f32::NEG_INFINITY, |w| w.0.score);
                    if found.len() < ef || s.score > worst {
                        candidates.push(Reverse(Worst(s)));
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
