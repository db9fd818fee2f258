//! `hiercon eval --compare`: one table across training runs, seen and unseen side by side.
//!
//! # A run directory
//!
//! ```text
//! runs/NAME/
//!   model.onnx, model.json   written by `hiercon train`; model.json's `loss` names the loss
//!   eval-train.json          hiercon eval --model runs/NAME/model.onnx --manifest M --split train --report runs/NAME/eval-train
//!   eval-test.json           the same with --split test --report runs/NAME/eval-test
//! ```
//!
//! `eval-train.json` holds the seen products, `eval-test.json` the unseen ones; a run needs at
//! least one of the two. The loss comes from `model.json` (else from the report's model).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::report::{EvalReport, dec3, pct};
use crate::modelfile::ModelMeta;
use crate::{Error, Result};

/// One run's evaluations.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// The directory's name.
    pub name: String,
    pub dir: PathBuf,
    pub loss: Option<String>,
    /// `eval-train.json`: seen products.
    pub seen: Option<EvalReport>,
    /// `eval-test.json`: unseen products.
    pub unseen: Option<EvalReport>,
}

/// Reads one run directory (see the module docs).
pub fn read_run(dir: &Path) -> Result<RunSummary> {
    if !dir.is_dir() {
        return Err(Error::EvalRun { path: dir.to_path_buf(), reason: "not a directory".into() });
    }
    let read = |name: &str| {
        let p = dir.join(name);
        if p.is_file() { EvalReport::read(&p).map(Some) } else { Ok(None) }
    };
    let (seen, unseen) = (read("eval-train.json")?, read("eval-test.json")?);
    if seen.is_none() && unseen.is_none() {
        return Err(Error::EvalRun {
            path: dir.to_path_buf(),
            reason: "no eval-train.json or eval-test.json: run `hiercon eval ... --report <run>/eval-<split>` first"
                .into(),
        });
    }
    let meta_path = dir.join("model.json");
    let loss_in_meta = if meta_path.is_file() {
        ModelMeta::read(&meta_path)?.extra.get("loss").and_then(|v| v.as_str()).map(String::from)
    } else {
        None
    };
    let loss = loss_in_meta.or_else(|| seen.iter().chain(&unseen).find_map(|r| r.model.loss.clone()));
    let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    Ok(RunSummary { name, dir: dir.to_path_buf(), loss, seen, unseen })
}

/// Runs side by side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub runs: Vec<RunSummary>,
}

/// Reads every run directory.
pub fn compare(dirs: &[PathBuf]) -> Result<Comparison> {
    Ok(Comparison { runs: dirs.iter().map(|d| read_run(d)).collect::<Result<_>>()? })
}

impl Comparison {
    /// Level names in the order they first appear (coarse to fine).
    fn levels(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for r in self.runs.iter().flat_map(|r| r.seen.iter().chain(&r.unseen)) {
            for l in &r.levels {
                if seen.insert(l.name.clone()) {
                    out.push(l.name.clone());
                }
            }
        }
        out
    }

    /// The headline table (top-1 per level and product mAP, seen then unseen) and a second one
    /// with kNN accuracy and NMI per level.
    pub fn to_markdown(&self) -> String {
        let levels = self.levels();
        type Side = fn(&RunSummary) -> Option<EvalReport>;
        let sides: [(&str, Side); 2] = [("seen", |r| r.seen.clone()), ("unseen", |r| r.unseen.clone())];
        let mut s = String::new();
        let _ = writeln!(s, "## Top-1 accuracy per level (%) and product mAP\n");
        let mut head = vec!["run".to_string(), "loss".to_string()];
        for (side, _) in &sides {
            head.extend(levels.iter().map(|l| format!("{side} {l}")));
            head.push(format!("{side} mAP"));
        }
        table_head(&mut s, &head);
        for r in &self.runs {
            let mut row = vec![r.name.clone(), r.loss.clone().unwrap_or_else(|| "?".into())];
            for (_, get) in &sides {
                let rep = get(r);
                for l in &levels {
                    row.push(pct(rep.as_ref().and_then(|e| e.level(l)).and_then(|m| m.at(&e_ks(&rep), 1))));
                }
                row.push(dec3(rep.as_ref().and_then(|e| e.map_product)));
            }
            let _ = writeln!(s, "| {} |", row.join(" | "));
        }
        let _ = writeln!(s, "\n## kNN accuracy (%) and NMI per level\n");
        let mut head = vec!["run".to_string(), "loss".to_string()];
        for (side, _) in &sides {
            head.extend(levels.iter().map(|l| format!("{side} kNN {l}")));
            head.extend(levels.iter().map(|l| format!("{side} NMI {l}")));
        }
        table_head(&mut s, &head);
        for r in &self.runs {
            let mut row = vec![r.name.clone(), r.loss.clone().unwrap_or_else(|| "?".into())];
            for (_, get) in &sides {
                let rep = get(r);
                let level = |l: &str| rep.as_ref().and_then(|e| e.level(l)).cloned();
                row.extend(levels.iter().map(|l| pct(level(l).and_then(|m| m.knn))));
                row.extend(levels.iter().map(|l| dec3(level(l).and_then(|m| m.nmi))));
            }
            let _ = writeln!(s, "| {} |", row.join(" | "));
        }
        let _ = writeln!(
            s,
            "\nseen = `eval-train.json` (products shown in training), unseen = `eval-test.json` (held-out products); \
             — = not evaluated or no answerable query."
        );
        s
    }

    /// Writes `PATH.md` and `PATH.json`.
    pub fn write(&self, prefix: &Path) -> Result<Vec<PathBuf>> {
        let [json, md, _] = super::report::report_paths(prefix);
        if let Some(dir) = prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::write(&md, self.to_markdown()).map_err(|e| Error::io(&md, e))?;
        let text = serde_json::to_string_pretty(self).expect("comparison serialises") + "\n";
        std::fs::write(&json, text).map_err(|e| Error::io(&json, e))?;
        Ok(vec![md, json])
    }
}

fn e_ks(r: &Option<EvalReport>) -> Vec<usize> {
    r.as_ref().map(|r| r.ks.clone()).unwrap_or_default()
}

fn table_head(s: &mut String, head: &[String]) {
    let _ = writeln!(s, "| {} |", head.join(" | "));
    let _ = writeln!(s, "|---|---|{}", "---:|".repeat(head.len() - 2));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Subset;
    use crate::eval::report::tests::sample;

    #[test]
    fn compares_runs_from_their_directories() {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("hmce-run");
        let b = root.path().join("simclr-run");
        sample(Subset::Train, 0.9).write(&a.join("eval-train")).unwrap();
        sample(Subset::Test, 0.7).write(&a.join("eval-test")).unwrap();
        let mut only_unseen = sample(Subset::Test, 0.4);
        only_unseen.model.loss = None;
        only_unseen.write(&b.join("eval-test")).unwrap();
        // b's loss comes from its model.json.
        let meta = serde_json::json!({"format": "hiercon-model/1", "arch": "a",
            "input": {"name": "i", "size": 4, "mean": [0, 0, 0], "std": [1, 1, 1]},
            "output": {"name": "o", "dim": 8}, "digest": "d", "loss": "simclr"});
        std::fs::write(b.join("model.json"), meta.to_string()).unwrap();
        let c = compare(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(c.runs[0].loss.as_deref(), Some("hmce"));
        assert_eq!(c.runs[1].loss.as_deref(), Some("simclr"));
        assert!(c.runs[1].seen.is_none());
        let md = c.to_markdown();
        assert!(
            md.contains(
                "| run | loss | seen level1 | seen product | seen mAP | unseen level1 | unseen product | unseen mAP |"
            ),
            "{md}"
        );
        assert!(md.contains("| hmce-run | hmce | 90.00 | — | 0.250 | 70.00 | — | 0.250 |"), "{md}");
        assert!(md.contains("| simclr-run | simclr | — | — | — | 40.00 | — | 0.250 |"), "{md}");
        assert!(md.contains("| hmce-run | hmce | 80.00 | — | 0.500 | — | 80.00 | — | 0.500 | — |"), "{md}");
        let files = c.write(&root.path().join("cmp")).unwrap();
        assert!(files.iter().all(|f| f.is_file()));
        // A directory without evaluations is an error naming it.
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let err = compare(&[a, empty]).unwrap_err().to_string();
        assert!(err.contains("empty") && err.contains("eval-test.json"), "{err}");
    }
}
