//! The evaluation report: its JSON form, a Markdown page and the accuracy-at-K chart.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::metrics::ProtocolKind;
use crate::catalogue::Subset;
use crate::plot::{LineChart, Series};
use crate::{Error, Result};

/// The evaluated model.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvaluatedModel {
    pub path: Option<PathBuf>,
    pub digest: String,
    pub dim: usize,
    pub arch: Option<String>,
    /// The training loss (`model.json`'s `loss`), when recorded.
    pub loss: Option<String>,
}

/// Metrics of one hierarchy level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelMetrics {
    /// The label column: `level1`.. (taxonomy, coarse first), `product`, `variation`.
    pub name: String,
    /// Classes at this level among the evaluated items.
    pub classes: usize,
    /// Answerable queries (the gallery holds another item of their class).
    pub queries: usize,
    /// Top-K accuracy for each K of [`EvalReport::ks`] (`null`: no answerable query).
    pub top_k: Vec<Option<f64>>,
    /// kNN classification accuracy.
    pub knn: Option<f64>,
    /// Mean average precision over the answerable queries (complete exact ranking).
    #[serde(default)]
    pub map: Option<f64>,
    /// NMI of k-means with k = `classes`.
    pub nmi: Option<f64>,
    /// Why `nmi` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nmi_note: Option<String>,
}

impl LevelMetrics {
    /// Top-K accuracy at `k`, if `k` was measured.
    pub fn at(&self, ks: &[usize], k: usize) -> Option<f64> {
        ks.iter().position(|&x| x == k).and_then(|i| self.top_k.get(i).copied().flatten())
    }
}

/// How the served index compares with exact search (`--index` only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedRecall {
    pub k: usize,
    /// Mean recall@k of the served answers against the exact ranking of the same gallery.
    pub served_recall: f64,
    /// Recall@k of the bare HNSW graph against exact search over the whole generation.
    pub hnsw_recall: f64,
    pub ef_search: usize,
    /// Queries the service answered with HNSW / with an exact scan.
    pub approx_answers: usize,
    pub exact_answers: usize,
}

/// Wall time in seconds.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Timing {
    pub embed: f64,
    pub rank: f64,
    pub cluster: f64,
    pub total: f64,
}

/// Everything one evaluation measured (`PATH.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// [`super::REPORT_FORMAT`].
    pub format: String,
    pub split: Subset,
    /// True for `train` (products seen in training), false for `test` (unseen).
    pub seen: bool,
    pub protocol: ProtocolKind,
    pub model: EvaluatedModel,
    pub manifest: Option<PathBuf>,
    pub index: Option<PathBuf>,
    pub generation: Option<String>,
    /// Evaluated items (readable images of the split).
    pub items: usize,
    pub skipped_images: usize,
    pub queries: usize,
    pub gallery: usize,
    pub ks: Vec<usize>,
    pub knn_k: usize,
    /// Coarse to fine.
    pub levels: Vec<LevelMetrics>,
    /// mAP at product level over `map_queries` queries with a same-product gallery item.
    pub map_product: Option<f64>,
    pub map_queries: usize,
    pub served: Option<ServedRecall>,
    pub seed: u64,
    pub seconds: Timing,
}

/// A percentage with two decimals, or `—`.
pub fn pct(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{:.2}", 100.0 * v))
}

/// A value with three decimals, or `—`.
pub fn dec3(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.3}"))
}

/// `seen` / `unseen` products, as the split means them.
pub fn split_meaning(split: Subset) -> &'static str {
    match split {
        Subset::Train => "seen products (shown in training)",
        Subset::Test => "unseen products (held out of training)",
        Subset::Fit => "seen products outside the validation hold-out (what a run choosing settings trains on)",
        Subset::Val => "the validation hold-out of seen products (not trained on while choosing settings)",
    }
}

impl EvalReport {
    /// The level named `name`.
    pub fn level(&self, name: &str) -> Option<&LevelMetrics> {
        self.levels.iter().find(|l| l.name == name)
    }

    /// The Markdown page (`PATH.md`).
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Evaluation: split `{}`, {}\n", self.split.as_str(), split_meaning(self.split));
        let m = &self.model;
        let model = m.path.as_ref().map_or("(test encoder)".into(), |p| format!("`{}`", p.display()));
        let digest: String = m.digest.chars().take(12).collect();
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| model | {model}, digest `{digest}`, dim {} |", m.dim);
        if let Some(loss) = &m.loss {
            let _ = writeln!(s, "| loss | {loss} |");
        }
        if let Some(p) = &self.manifest {
            let _ = writeln!(s, "| manifest | `{}` |", p.display());
        }
        if let (Some(i), Some(g)) = (&self.index, &self.generation) {
            let _ = writeln!(s, "| index | `{}` {g} (ranked by the serving path) |", i.display());
        }
        let _ = writeln!(
            s,
            "| protocol | {}: {} queries, gallery of {} |",
            self.protocol.as_str(),
            self.queries,
            self.gallery
        );
        let _ = writeln!(s, "| items | {} ({} unreadable images skipped) |", self.items, self.skipped_images);
        let _ = writeln!(s, "| mAP (product) | {} over {} queries |", dec3(self.map_product), self.map_queries);
        let t = &self.seconds;
        let _ = writeln!(
            s,
            "| wall time | {:.1} s (embedding {:.1}, ranking {:.1}, clustering {:.1}) |",
            t.total, t.embed, t.rank, t.cluster
        );
        let _ = writeln!(s, "\n## Accuracy per level (%)\n");
        let ks: Vec<String> = self.ks.iter().map(|k| format!("top-{k}")).collect();
        let _ = writeln!(s, "| level | classes | queries | {} | kNN@{} | NMI |", ks.join(" | "), self.knn_k);
        let _ = writeln!(s, "|---|---:|---:|{}---:|---:|", "---:|".repeat(self.ks.len()));
        for l in &self.levels {
            let acc: Vec<String> = l.top_k.iter().map(|v| pct(*v)).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                l.name,
                l.classes,
                l.queries,
                acc.join(" | "),
                pct(l.knn),
                dec3(l.nmi)
            );
        }
        let notes: Vec<String> =
            self.levels.iter().filter_map(|l| l.nmi_note.as_ref().map(|n| format!("{}: {n}", l.name))).collect();
        if !notes.is_empty() {
            let _ = writeln!(s, "\nNMI not computed — {}.", notes.join("; "));
        }
        if let Some(r) = &self.served {
            let _ = writeln!(s, "\n## Served index\n");
            let _ = writeln!(
                s,
                "recall@{k} of the served answers against exact search: {:.4}; of the bare HNSW graph at ef {}: {:.4}. \
                 The service answered {} queries with HNSW and {} with an exact scan.",
                r.served_recall,
                r.ef_search,
                r.hnsw_recall,
                r.approx_answers,
                r.exact_answers,
                k = r.k
            );
        }
        let _ = writeln!(s, "\n## Protocol\n");
        let _ = writeln!(
            s,
            "Only items of split `{}` take part. {} A query's own image is never ranked. Ranking is by cosine \
             similarity, ties by catalogue order. Top-K accuracy: share of queries with a same-class item among \
             the first K. A query counts at a level only if the gallery holds another item of its class there \
             (the `queries` column). mAP: average precision of the full ranking at product level. kNN: the first \
             {} hits vote by majority (ties: larger summed similarity, then the nearer voter). NMI: k-means \
             (k-means++ seeding, seed {}) with k = classes, over all evaluated items, arithmetic-mean \
             normalisation.",
            self.split.as_str(),
            match self.protocol {
                ProtocolKind::QueryGallery => "Items with role `query` rank the items with role `gallery`.",
                ProtocolKind::LeaveOneOut => "The split has no query/gallery roles: every item ranks all the others.",
            },
            self.knn_k,
            self.seed
        );
        s
    }

    /// Top-K accuracy against K, one line per level.
    pub fn accuracy_chart(&self) -> LineChart {
        let mut chart = LineChart::new(
            format!("Top-K accuracy, split {} ({})", self.split.as_str(), if self.seen { "seen" } else { "unseen" }),
            "K",
            "accuracy (%)",
        );
        chart.y_range = Some((0.0, 100.0));
        for l in &self.levels {
            let points = self.ks.iter().zip(&l.top_k).filter_map(|(&k, v)| v.map(|v| (k as f64, 100.0 * v))).collect();
            chart.series.push(Series::new(l.name.clone(), points));
        }
        chart
    }

    /// Writes `PATH.json`, `PATH.md` and `PATH-acc.png` (`prefix` = PATH, parent folders created).
    /// Returns the files written.
    pub fn write(&self, prefix: &Path) -> Result<Vec<PathBuf>> {
        let files = report_paths(prefix);
        if let Some(dir) = prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let json = serde_json::to_string_pretty(self).expect("report serialises") + "\n";
        std::fs::write(&files[0], json).map_err(|e| Error::io(&files[0], e))?;
        std::fs::write(&files[1], self.to_markdown()).map_err(|e| Error::io(&files[1], e))?;
        self.accuracy_chart().write_png(&files[2])?;
        Ok(files.to_vec())
    }

    /// Reads an evaluation JSON.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let r: EvalReport = serde_json::from_str(&text).map_err(|e| Error::EvalRun {
            path: path.to_path_buf(),
            reason: format!("not an evaluation report: {e}"),
        })?;
        if r.format != super::REPORT_FORMAT {
            return Err(Error::EvalRun {
                path: path.to_path_buf(),
                reason: format!("format {:?}, expected {:?}", r.format, super::REPORT_FORMAT),
            });
        }
        Ok(r)
    }
}

/// `PATH.json`, `PATH.md`, `PATH-acc.png` for `prefix` = PATH.
pub fn report_paths(prefix: &Path) -> [PathBuf; 3] {
    let with = |suffix: &str| {
        let mut s = prefix.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    };
    [with(".json"), with(".md"), with("-acc.png")]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A report with two levels, the second without answerable queries at K=1's position.
    pub(crate) fn sample(split: Subset, top1: f64) -> EvalReport {
        EvalReport {
            format: super::super::REPORT_FORMAT.into(),
            split,
            seen: split.seen(),
            protocol: ProtocolKind::QueryGallery,
            model: EvaluatedModel {
                path: Some("runs/a/model.onnx".into()),
                digest: "abcdef0123456789".into(),
                dim: 8,
                arch: None,
                loss: Some("hmce".into()),
            },
            manifest: Some("m.jsonl".into()),
            index: None,
            generation: None,
            items: 10,
            skipped_images: 1,
            queries: 5,
            gallery: 5,
            ks: vec![1, 5],
            knn_k: 10,
            levels: vec![
                LevelMetrics {
                    name: "level1".into(),
                    classes: 2,
                    queries: 5,
                    top_k: vec![Some(top1), Some(1.0)],
                    knn: Some(0.8),
                    map: Some(0.5),
                    nmi: Some(0.5),
                    nmi_note: None,
                },
                LevelMetrics {
                    name: "product".into(),
                    classes: 5,
                    queries: 0,
                    top_k: vec![None, None],
                    knn: None,
                    map: None,
                    nmi: None,
                    nmi_note: Some("x".into()),
                },
            ],
            map_product: Some(0.25),
            map_queries: 4,
            served: None,
            seed: 0,
            seconds: Timing::default(),
        }
    }

    #[test]
    fn report_round_trips_and_renders() {
        let r = sample(Subset::Test, 0.6);
        let dir = tempfile::tempdir().unwrap();
        let files = r.write(&dir.path().join("sub/eval-test")).unwrap();
        assert!(files.iter().all(|f| f.is_file()), "{files:?}");
        assert!(files[2].ends_with("eval-test-acc.png"));
        assert_eq!(EvalReport::read(&files[0]).unwrap(), r);
        let md = std::fs::read_to_string(&files[1]).unwrap();
        assert!(md.contains("unseen products"), "{md}");
        assert!(md.contains("| level1 | 2 | 5 | 60.00 | 100.00 | 80.00 | 0.500 |"), "{md}");
        assert!(md.contains("| product | 5 | 0 | — | — | — | — |"), "{md}");
        assert!(md.contains("0.250 over 4 queries"));
        let png = image::open(&files[2]).unwrap();
        assert_eq!((png.width(), png.height()), (960, 600));
        // The chart has one series per level; levels without values draw nothing.
        let chart = r.accuracy_chart();
        assert_eq!(chart.series[0].points, vec![(1.0, 60.0), (5.0, 100.0)]);
        assert!(chart.series[1].points.is_empty());
        assert_eq!(r.level("level1").unwrap().at(&r.ks, 5), Some(1.0));
        assert_eq!(r.level("level1").unwrap().at(&r.ks, 7), None);
        // A file of another format is refused.
        std::fs::write(&files[0], serde_json::to_string(&EvalReport { format: "x".into(), ..r }).unwrap()).unwrap();
        assert!(matches!(EvalReport::read(&files[0]), Err(Error::EvalRun { .. })));
    }
}
