//! `hiercon eval --study DIR`: multi-seed summaries of a loss study. Runs that differ only in
//! their seed (`NAME-s<seed>`) are one *setting*; every metric is reported as the mean and the
//! sample standard deviation over its seeds, and chosen pairs of settings as the difference of
//! their means with the standard error of that difference, `sqrt(sa²/na + sb²/nb)`.
//!
//! # The study directory
//!
//! ```text
//! DIR/NAME/eval-<split>.json            the run's head (model.onnx) on a split (train, test, val)
//! DIR/NAME/eval-backbone-<split>.json   the same run's backbone feature (backbone.onnx)
//! DIR/NAME/train.json                   how it was trained (scripts/study.sh writes it)
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::report::EvalReport;
use crate::catalogue::Subset;
use crate::{Error, Result};

/// Which embedding of a run was evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Embedding {
    /// The projection head's output (`model.onnx`).
    Head,
    /// The backbone's pooled feature (`backbone.onnx`).
    Backbone,
}

impl Embedding {
    fn label(self) -> &'static str {
        match self {
            Embedding::Head => "head",
            Embedding::Backbone => "backbone",
        }
    }
}

/// One evaluation of one run.
#[derive(Debug, Clone)]
pub struct StudyEval {
    pub run: String,
    pub setting: String,
    pub seed: Option<u64>,
    pub embedding: Embedding,
    pub report: EvalReport,
}

/// `NAME-s<seed>` → (`NAME`, seed); other names are their own setting.
pub fn setting_of(run: &str) -> (String, Option<u64>) {
    if let Some(i) = run.rfind("-s")
        && let Ok(seed) = run[i + 2..].parse::<u64>()
    {
        return (run[..i].to_string(), Some(seed));
    }
    (run.to_string(), None)
}

/// Reads every `DIR/*/eval-*.json`.
pub fn read_study(dir: &Path) -> Result<Vec<StudyEval>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = Vec::new();
    let mut runs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
    runs.sort();
    for run_dir in runs {
        let run = run_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (setting, seed) = setting_of(&run);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&run_dir)
            .map_err(|e| Error::io(&run_dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                n.starts_with("eval-") && n.ends_with(".json")
            })
            .collect();
        files.sort();
        for f in files {
            let stem = f.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let embedding = if stem.starts_with("eval-backbone-") { Embedding::Backbone } else { Embedding::Head };
            out.push(StudyEval {
                run: run.clone(),
                setting: setting.clone(),
                seed,
                embedding,
                report: EvalReport::read(&f)?,
            });
        }
    }
    if out.is_empty() {
        return Err(Error::EvalRun {
            path: dir.to_path_buf(),
            reason: "no DIR/NAME/eval-*.json found (scripts/study.sh writes them)".into(),
        });
    }
    Ok(out)
}

/// Mean and sample standard deviation of some values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (n - 1); 0 for one value.
    pub std: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        Some(Stat { n, mean, std: var.sqrt() })
    }

    /// Standard error of the mean.
    pub fn se(&self) -> f64 {
        self.std / (self.n as f64).sqrt()
    }

    /// `mean ± std` in percent (two decimals for the mean).
    fn pct(&self) -> String {
        if self.n > 1 {
            format!("{:.2} ± {:.2}", 100.0 * self.mean, 100.0 * self.std)
        } else {
            format!("{:.2}", 100.0 * self.mean)
        }
    }

    fn dec3(&self) -> String {
        if self.n > 1 { format!("{:.3} ± {:.3}", self.mean, self.std) } else { format!("{:.3}", self.mean) }
    }
}

/// The metrics summarised per level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Top1,
    Top5,
    Map,
    Nmi,
}

impl Metric {
    const ALL: [Metric; 4] = [Metric::Top1, Metric::Top5, Metric::Map, Metric::Nmi];

    fn name(self) -> &'static str {
        match self {
            Metric::Top1 => "top-1",
            Metric::Top5 => "top-5",
            Metric::Map => "mAP",
            Metric::Nmi => "NMI",
        }
    }

    fn value(self, r: &EvalReport, level: &str) -> Option<f64> {
        let l = r.levels.iter().find(|l| l.name == level)?;
        match self {
            Metric::Top1 => l.at(&r.ks, 1),
            Metric::Top5 => l.at(&r.ks, 5),
            Metric::Map => l.map.or_else(|| if level == "product" { r.map_product } else { None }),
            Metric::Nmi => l.nmi,
        }
    }

    fn show(self, s: &Stat) -> String {
        match self {
            Metric::Nmi => s.dec3(),
            _ => s.pct(),
        }
    }
}

/// One row of a summary table: a setting's embedding on a split of a catalogue.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub catalogue: String,
    pub split: Subset,
    pub setting: String,
    pub embedding: Embedding,
    pub seeds: Vec<Option<u64>>,
    /// level → metric → statistic over seeds.
    pub levels: BTreeMap<String, BTreeMap<String, Stat>>,
    /// The level names in the report's order, coarse to fine.
    pub level_order: Vec<String>,
}

/// A difference between two settings on one split and level.
#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub catalogue: String,
    pub split: Subset,
    pub embedding: Embedding,
    pub level: String,
    pub a: String,
    pub b: String,
    pub a_stat: Stat,
    pub b_stat: Stat,
    /// mean(a) - mean(b), top-1.
    pub diff: f64,
    /// Standard error of the difference of the means.
    pub se: f64,
}

impl Difference {
    /// Whether both sides have 2+ seeds, so that the difference has a standard error at all.
    pub fn has_spread(&self) -> bool {
        self.a_stat.n > 1 && self.b_stat.n > 1
    }

    /// Whether |diff| exceeds twice its standard error (and both sides have 2+ seeds).
    pub fn decided(&self) -> bool {
        self.has_spread() && self.diff.abs() > 2.0 * self.se
    }
}

/// The whole summary.
#[derive(Debug, Clone, Serialize)]
pub struct StudySummary {
    pub rows: Vec<Row>,
    pub differences: Vec<Difference>,
}

/// The catalogue an evaluation belongs to: the manifest's folder name.
fn catalogue_of(r: &EvalReport) -> String {
    r.manifest
        .as_ref()
        .and_then(|m| m.parent())
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "catalogue".into())
}

/// Groups the evaluations by (catalogue, split, setting, embedding) and compares `pairs` of
/// settings (`(a, b)`: a − b, top-1 at every level both have).
pub fn summarize(evals: &[StudyEval], pairs: &[(String, String)]) -> StudySummary {
    type Key = (String, Subset, String, Embedding);
    let mut groups: BTreeMap<Key, Vec<&StudyEval>> = BTreeMap::new();
    for e in evals {
        groups.entry((catalogue_of(&e.report), e.report.split, e.setting.clone(), e.embedding)).or_default().push(e);
    }
    let rows: Vec<Row> = groups
        .into_iter()
        .map(|((catalogue, split, setting, embedding), es)| {
            let level_order: Vec<String> = es[0].report.levels.iter().map(|l| l.name.clone()).collect();
            let mut levels = BTreeMap::new();
            for level in &level_order {
                let mut metrics = BTreeMap::new();
                for m in Metric::ALL {
                    let values: Vec<f64> = es.iter().filter_map(|e| m.value(&e.report, level)).collect();
                    if let Some(s) = Stat::of(&values) {
                        metrics.insert(m.name().to_string(), s);
                    }
                }
                levels.insert(level.clone(), metrics);
            }
            Row {
                catalogue,
                split,
                setting,
                embedding,
                seeds: es.iter().map(|e| e.seed).collect(),
                levels,
                level_order,
            }
        })
        .collect();
    let mut differences = Vec::new();
    for (a, b) in pairs {
        for ra in rows.iter().filter(|r| &r.setting == a) {
            let Some(rb) = rows.iter().find(|r| {
                &r.setting == b && r.catalogue == ra.catalogue && r.split == ra.split && r.embedding == ra.embedding
            }) else {
                continue;
            };
            for level in &ra.level_order {
                let (Some(sa), Some(sb)) = (
                    ra.levels.get(level).and_then(|m| m.get("top-1")),
                    rb.levels.get(level).and_then(|m| m.get("top-1")),
                ) else {
                    continue;
                };
                differences.push(Difference {
                    catalogue: ra.catalogue.clone(),
                    split: ra.split,
                    embedding: ra.embedding,
                    level: level.clone(),
                    a: a.clone(),
                    b: b.clone(),
                    a_stat: *sa,
                    b_stat: *sb,
                    diff: sa.mean - sb.mean,
                    se: sa.se().hypot(sb.se()),
                });
            }
        }
    }
    StudySummary { rows, differences }
}

impl StudySummary {
    /// Markdown: per catalogue and split, one table per level (rows: settings and embeddings;
    /// columns: top-1, top-5, mAP, NMI as mean ± std over seeds), then the differences.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let mut sections: Vec<(String, Subset)> =
            self.rows.iter().map(|r| (r.catalogue.clone(), r.split)).collect::<Vec<_>>();
        sections.sort_by_key(|(c, sp)| (c.clone(), split_order(*sp)));
        sections.dedup();
        for (catalogue, split) in sections {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.catalogue == catalogue && r.split == split).collect();
            let _ =
                writeln!(s, "### {catalogue}, split `{}` ({})\n", split.as_str(), super::report::split_meaning(split));
            let levels =
                rows.iter().max_by_key(|r| r.level_order.len()).map(|r| r.level_order.clone()).unwrap_or_default();
            for level in levels {
                if rows.iter().all(|r| r.levels.get(&level).is_none_or(|m| m.is_empty())) {
                    continue;
                }
                let _ = writeln!(s, "**{level}**\n");
                let _ = writeln!(s, "| setting | embedding | seeds | top-1 | top-5 | mAP | NMI |");
                let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
                for r in &rows {
                    let Some(m) = r.levels.get(&level) else { continue };
                    let cell = |metric: Metric| m.get(metric.name()).map_or("—".to_string(), |st| metric.show(st));
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} |",
                        r.setting,
                        r.embedding.label(),
                        r.seeds.len(),
                        cell(Metric::Top1),
                        cell(Metric::Top5),
                        cell(Metric::Map),
                        cell(Metric::Nmi)
                    );
                }
                s.push('\n');
            }
        }
        if !self.differences.is_empty() {
            let _ = writeln!(s, "### Differences (top-1, mean of A − mean of B, ± standard error of the difference)\n");
            let _ = writeln!(s, "| catalogue | split | embedding | level | A | B | A − B | > 2 SE |");
            let _ = writeln!(s, "|---|---|---|---|---|---|---:|---|");
            for d in &self.differences {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} (n={}) | {} (n={}) | {:+.2} ± {} | {} |",
                    d.catalogue,
                    d.split.as_str(),
                    d.embedding.label(),
                    d.level,
                    d.a,
                    d.a_stat.n,
                    d.b,
                    d.b_stat.n,
                    100.0 * d.diff,
                    // One seed on a side: no spread, so no standard error and no verdict.
                    if d.has_spread() { format!("{:.2}", 100.0 * d.se) } else { "—".into() },
                    match (d.decided(), d.has_spread()) {
                        (true, _) => "yes",
                        (false, true) => "no",
                        (false, false) => "needs 2+ seeds each",
                    }
                );
            }
        }
        s
    }

    /// Writes `PREFIX.md` and `PREFIX.json`.
    pub fn write(&self, prefix: &Path) -> Result<Vec<PathBuf>> {
        let md = prefix.with_extension("md");
        let json = prefix.with_extension("json");
        std::fs::write(&md, self.to_markdown()).map_err(|e| Error::io(&md, e))?;
        let text = serde_json::to_string_pretty(self).expect("summary serialises") + "\n";
        std::fs::write(&json, text).map_err(|e| Error::io(&json, e))?;
        Ok(vec![md, json])
    }
}

fn split_order(s: Subset) -> u8 {
    match s {
        Subset::Val => 0,
        Subset::Fit => 1,
        Subset::Train => 2,
        Subset::Test => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::report::tests::sample;

    #[test]
    fn seeds_group_into_settings_with_mean_std_and_the_difference_is_judged() {
        assert_eq!(setting_of("emoji-hmce-s12"), ("emoji-hmce".to_string(), Some(12)));
        assert_eq!(setting_of("emoji-zeroshot"), ("emoji-zeroshot".to_string(), None));
        assert_eq!(setting_of("emoji-s-x"), ("emoji-s-x".to_string(), None));
        let mk = |run: &str, top1: f64| {
            let (setting, seed) = setting_of(run);
            StudyEval { run: run.into(), setting, seed, embedding: Embedding::Head, report: sample(Subset::Test, top1) }
        };
        let evals = vec![
            mk("a-s0", 0.70),
            mk("a-s1", 0.72),
            mk("a-s2", 0.74),
            mk("b-s0", 0.60),
            mk("b-s1", 0.61),
            mk("b-s2", 0.62),
        ];
        let s = summarize(&evals, &[("a".into(), "b".into())]);
        assert_eq!(s.rows.len(), 2);
        let a = &s.rows[0];
        let level = &a.level_order[0];
        let st = a.levels[level]["top-1"];
        assert_eq!(st.n, 3);
        assert!((st.mean - sample(Subset::Test, 0.72).levels[0].top_k[0].unwrap()).abs() < 0.03);
        let d = s.differences.iter().find(|d| &d.level == level).unwrap();
        // a's top-1 values spread by 0.02, b's by 0.01: the difference is far beyond 2 SE.
        assert!(d.diff > 0.0 && d.decided(), "{d:?}");
        let md = s.to_markdown();
        assert!(md.contains("| a | head | 3 |") && md.contains("> 2 SE"), "{md}");
        // One seed each: never decided.
        let one = summarize(&[mk("a-s0", 0.9), mk("b-s0", 0.1)], &[("a".into(), "b".into())]);
        assert!(one.differences.iter().all(|d| !d.decided()));
        assert!(one.to_markdown().contains("± — | needs 2+ seeds each |"), "{}", one.to_markdown());
        assert_eq!(Stat::of(&[]), None);
        let st = Stat::of(&[1.0, 3.0]).unwrap();
        assert!((st.std - 2f64.sqrt()).abs() < 1e-12 && (st.se() - 1.0).abs() < 1e-12);
    }
}
