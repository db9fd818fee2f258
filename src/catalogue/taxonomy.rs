//! The taxonomy tree built from the items' category paths (`a/b/c`, any depth): children,
//! descendants, per-node item counts, levels.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::Item;

/// True if a category filter matches a category: the path itself and all its descendants
/// (`a/b` matches `a/b` and `a/b/c`, not `a/bc`). The empty filter matches everything.
pub fn path_matches(filter: &str, category: &str) -> bool {
    filter.is_empty()
        || category == filter
        || (category.len() > filter.len() && category.starts_with(filter) && category.as_bytes()[filter.len()] == b'/')
}

/// Replaces `/` in a name that becomes one taxonomy level (a category or class name) with `-`,
/// so the name cannot be read as two levels (`T-shirt/top` -> `T-shirt-top`).
pub fn level_name(name: &str) -> String {
    name.trim().replace('/', "-")
}

/// One node of the tree: a category path and what lies under it.
#[derive(Debug, Clone)]
pub struct Node {
    /// The full path, e.g. `Smileys & Emotion/face-smiling`.
    pub path: String,
    /// The last level's name, e.g. `face-smiling`.
    pub name: String,
    /// 1 for a top-level category.
    pub depth: usize,
    pub parent: Option<usize>,
    /// Indices into [`Taxonomy::nodes`], sorted by name.
    pub children: Vec<usize>,
    /// Items in this category and all its descendants.
    pub items: usize,
    /// Items whose category is exactly this path.
    pub own_items: usize,
}

/// The category tree of a catalogue. Nodes are stored in sorted path order (a parent before its
/// children), so everything built from it is deterministic.
#[derive(Debug, Clone, Default)]
pub struct Taxonomy {
    nodes: Vec<Node>,
    by_path: HashMap<String, usize>,
    roots: Vec<usize>,
}

/// A nested, serialisable view of the tree (for `GET /v1/taxonomy`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TreeNode {
    pub name: String,
    pub path: String,
    pub items: usize,
    pub children: Vec<TreeNode>,
}

impl Taxonomy {
    /// The tree of the items' categories, with item counts.
    pub fn from_items<'a>(items: impl IntoIterator<Item = &'a Item>) -> Taxonomy {
        Taxonomy::from_paths(items.into_iter().map(|it| it.category.as_str()))
    }

    /// The tree of these paths; each occurrence counts as one item.
    pub fn from_paths<'a>(paths: impl IntoIterator<Item = &'a str>) -> Taxonomy {
        Taxonomy::from_counts(paths.into_iter().map(|p| (p, 1)))
    }

    /// The tree of these paths, each holding the given number of items (a path may repeat).
    pub fn from_counts<'a>(paths: impl IntoIterator<Item = (&'a str, usize)>) -> Taxonomy {
        // Every prefix of every path is a node; count exact occurrences.
        let mut own: BTreeMap<&str, usize> = BTreeMap::new();
        for (path, count) in paths {
            let mut end = 0;
            for seg in path.split('/') {
                end += seg.len();
                own.entry(&path[..end]).or_insert(0);
                end += 1;
            }
            *own.entry(path).or_insert(0) += count;
        }
        let mut tax = Taxonomy::default();
        // BTreeMap order puts `a` before `a/b`, but `a b` sorts between them; parents are looked
        // up by path, which only needs the parent to exist before the child: `a` < `a/...` holds.
        for (&path, &own_items) in &own {
            let (parent, name) = match path.rfind('/') {
                Some(i) => (Some(tax.by_path[&path[..i]]), &path[i + 1..]),
                None => (None, path),
            };
            let idx = tax.nodes.len();
            let depth = parent.map_or(1, |p| tax.nodes[p].depth + 1);
            tax.nodes.push(Node {
                path: path.to_string(),
                name: name.to_string(),
                depth,
                parent,
                children: Vec::new(),
                items: 0,
                own_items,
            });
            tax.by_path.insert(path.to_string(), idx);
            match parent {
                Some(p) => tax.nodes[p].children.push(idx),
                None => tax.roots.push(idx),
            }
        }
        // Children were added in path order; sort by name (same order unless names share a prefix).
        let names: Vec<String> = tax.nodes.iter().map(|n| n.name.clone()).collect();
        for node in &mut tax.nodes {
            node.children.sort_by(|&a, &b| names[a].cmp(&names[b]));
        }
        tax.roots.sort_by(|&a, &b| names[a].cmp(&names[b]));
        // Subtree counts: children come after their parent in `nodes`, so walk backwards.
        for i in (0..tax.nodes.len()).rev() {
            tax.nodes[i].items += tax.nodes[i].own_items;
            if let Some(p) = tax.nodes[i].parent {
                tax.nodes[p].items += tax.nodes[i].items;
            }
        }
        tax
    }

    /// All nodes, parents before children.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, path: &str) -> Option<&Node> {
        self.by_path.get(path).map(|&i| &self.nodes[i])
    }

    pub fn contains(&self, path: &str) -> bool {
        self.by_path.contains_key(path)
    }

    /// The top-level categories, sorted by name.
    pub fn roots(&self) -> impl Iterator<Item = &Node> {
        self.roots.iter().map(|&i| &self.nodes[i])
    }

    /// The direct children of `path` (of the root for ""), sorted by name; `None` if unknown.
    pub fn children(&self, path: &str) -> Option<Vec<&Node>> {
        if path.is_empty() {
            return Some(self.roots().collect());
        }
        self.node(path).map(|n| n.children.iter().map(|&i| &self.nodes[i]).collect())
    }

    /// `path` and every node below it, depth-first in name order; empty if unknown. `""` is
    /// the whole tree.
    pub fn descendants(&self, path: &str) -> Vec<&Node> {
        let mut out = Vec::new();
        let mut stack: Vec<usize> = if path.is_empty() {
            self.roots.iter().rev().copied().collect()
        } else {
            self.by_path.get(path).copied().into_iter().collect()
        };
        while let Some(i) = stack.pop() {
            out.push(&self.nodes[i]);
            stack.extend(self.nodes[i].children.iter().rev());
        }
        out
    }

    /// Items in `path` and its descendants (0 if unknown; all items for "").
    pub fn item_count(&self, path: &str) -> usize {
        if path.is_empty() {
            return self.roots().map(|n| n.items).sum();
        }
        self.node(path).map_or(0, |n| n.items)
    }

    /// The number of levels: the depth of the deepest path (0 for an empty tree).
    pub fn depth(&self) -> usize {
        self.nodes.iter().map(|n| n.depth).max().unwrap_or(0)
    }

    /// The nodes at each level, level 1 first, each sorted by path.
    pub fn levels(&self) -> Vec<Vec<&Node>> {
        let mut levels: Vec<Vec<&Node>> = vec![Vec::new(); self.depth()];
        for n in &self.nodes {
            levels[n.depth - 1].push(n);
        }
        levels
    }

    /// How many categories each level has, level 1 first.
    pub fn level_sizes(&self) -> Vec<usize> {
        self.levels().iter().map(Vec::len).collect()
    }

    /// Nodes without children.
    pub fn leaves(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.children.is_empty())
    }

    /// The nested form, roots first.
    pub fn tree(&self) -> Vec<TreeNode> {
        fn build(tax: &Taxonomy, i: usize) -> TreeNode {
            let n = &tax.nodes[i];
            TreeNode {
                name: n.name.clone(),
                path: n.path.clone(),
                items: n.items,
                children: n.children.iter().map(|&c| build(tax, c)).collect(),
            }
        }
        self.roots.iter().map(|&r| build(self, r)).collect()
    }
}

/// One item per top-level category, in the order of `roots`, at most `max`: the first
/// query-role item of that category in `items` order, else its first item (the page's and
/// `GET /v1/examples`' suggestions).
pub fn example_items<'a>(items: impl IntoIterator<Item = &'a Item>, roots: &[&str], max: usize) -> Vec<&'a Item> {
    let mut first: BTreeMap<&str, (&'a Item, bool)> = BTreeMap::new();
    for it in items {
        let root = it.category.split('/').map(str::trim).find(|s| !s.is_empty()).unwrap_or("");
        let is_query = it.role == Some(crate::catalogue::Role::Query);
        match first.get(root) {
            Some(&(_, true)) => {}
            Some(&(_, false)) if !is_query => {}
            _ => {
                first.insert(root, (it, is_query));
            }
        }
    }
    roots.iter().filter_map(|r| first.get(r)).take(max).map(|&(it, _)| it).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tax(paths: &[&str]) -> Taxonomy {
        Taxonomy::from_paths(paths.iter().copied())
    }

    fn paths<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Vec<&'a str> {
        nodes.into_iter().map(|n| n.path.as_str()).collect()
    }

    const PATHS: [&str; 7] = ["a/b/c", "a/b/c", "a/b/d", "a/bc", "a b/x", "e", "a/b"];

    #[test]
    fn descendants_include_the_path_and_everything_below_only() {
        let t = tax(&PATHS);
        assert_eq!(paths(t.descendants("a/b")), vec!["a/b", "a/b/c", "a/b/d"]);
        assert_eq!(paths(t.descendants("a")), vec!["a", "a/b", "a/b/c", "a/b/d", "a/bc"]);
        assert_eq!(paths(t.descendants("a/b/c")), vec!["a/b/c"]);
        assert!(t.descendants("a/x").is_empty());
        assert_eq!(t.descendants("").len(), t.nodes().len());
        // descendants agree with the string filter
        for node in t.nodes() {
            let via_tree: Vec<_> = paths(t.descendants(&node.path));
            let mut via_filter: Vec<_> =
                t.nodes().iter().map(|n| n.path.as_str()).filter(|p| path_matches(&node.path, p)).collect();
            let mut sorted = via_tree.clone();
            sorted.sort();
            via_filter.sort();
            assert_eq!(sorted, via_filter, "{}", node.path);
        }
    }

    #[test]
    fn path_matches_respects_level_boundaries() {
        assert!(path_matches("a/b", "a/b"));
        assert!(path_matches("a/b", "a/b/c"));
        assert!(!path_matches("a/b", "a/bc"));
        assert!(!path_matches("a/b/c", "a/b"));
        assert!(path_matches("", "z"));
    }

    #[test]
    fn counts_children_depth_levels() {
        let t = tax(&PATHS);
        assert_eq!(t.item_count("a"), 5);
        assert_eq!(t.item_count("a/b"), 4);
        assert_eq!(t.node("a/b").unwrap().own_items, 1);
        assert_eq!(t.item_count("a/b/c"), 2);
        assert_eq!(t.item_count(""), PATHS.len());
        assert_eq!(t.item_count("zzz"), 0);
        assert_eq!(t.depth(), 3);
        assert_eq!(t.level_sizes(), vec![3, 3, 2]);
        assert_eq!(paths(t.children("a").unwrap()), vec!["a/b", "a/bc"]);
        assert_eq!(paths(t.children("").unwrap()), vec!["a", "a b", "e"]);
        assert!(t.children("nope").is_none());
        assert_eq!(paths(t.leaves()), vec!["a b/x", "a/b/c", "a/b/d", "a/bc", "e"]);
        let n = t.node("a/b/d").unwrap();
        assert_eq!((n.name.as_str(), n.depth), ("d", 3));
        assert_eq!(t.nodes()[n.parent.unwrap()].path, "a/b");
    }

    #[test]
    fn tree_nests_with_counts() {
        let t = tax(&["x/y", "x/z", "x/z"]);
        let tree = t.tree();
        assert_eq!(tree.len(), 1);
        assert_eq!((tree[0].name.as_str(), tree[0].items), ("x", 3));
        let kids: Vec<_> = tree[0].children.iter().map(|c| (c.path.as_str(), c.items)).collect();
        assert_eq!(kids, vec![("x/y", 1), ("x/z", 2)]);
    }

    #[test]
    fn level_name_removes_separators() {
        assert_eq!(level_name("T-shirt/top"), "T-shirt-top");
    }
}
