//! Retrieval evaluation (DESIGN §3): embed a split, rank its gallery through the search path `serve` uses, and measure each hierarchy level.
//!
//! # Protocol
//!
//! - **Seen / unseen.** `--split train` evaluates the products the model was trained on (seen);
//!   `--split test` the held-out products (unseen; the catalogue's split puts unseen products in
//!   `test`). Only items of the chosen split take part, as queries and as gallery.
//! - **Queries and gallery** ([`metrics::Protocol`]). When the split has items with role `query`
//!   and items with role `gallery` (emoji: one vendor's drawings are the queries, the other's
//!   the gallery), each query ranks the gallery (In-shop protocol). Otherwise leave-one-out:
//!   every item is a query ranking all the others. A query's own image is never in its ranking.
//! - **Ranking** is by cosine similarity, best first, ties by row. Without `--index` the
//!   embeddings are scanned exactly with [`ExactIndex`] — the scan `search::Service` answers
//!   small or selective queries with. With `--index` every query goes through
//!   [`Service::search_embedding`] with a `split` + `role` filter: what is measured is what is
//!   served. Query embeddings then come from the index (they were made by the same model: the
//!   service checks the digest).
//! - **Levels** are the catalogue's label columns ([`Labels`]) except the image: each taxonomy
//!   level (`level1` = the coarsest), `product`, `variation`. A query is *answerable* at a level
//!   when the gallery holds another item of its class there; per-query metrics average over
//!   answerable queries only, and the report gives their number.
//! - **Top-K accuracy** ([`TOP_K`]): share of queries with a same-class item among the first K.
//! - **mAP** at every level (and, as before, `map_product`): mean over answerable queries of the
//!   average precision of the complete exact ranking of the gallery.
//! - **kNN accuracy** ([`KNN_K`] = 10): the first 10 hits vote by majority; ties go to the
//!   larger summed cosine similarity, then the better-ranked voter ([`metrics::knn_predict`]).
//! - **NMI**: k-means ([`cluster::kmeans`], k-means++ seeding from `--seed`, k = the number of
//!   classes at the level among the split's items) over all the split's embeddings, scored by
//!   NMI with the arithmetic-mean normaliser (scikit-learn's default). Levels with fewer than 2
//!   or more than `nmi_max_classes` classes are left out (say so in the report).
//! - **Served recall** (with `--index`): recall@10 of the served answers against the exact
//!   ranking of the same gallery (tie-aware), and recall@10 of the bare HNSW graph against
//!   exact search at the generation's `ef_search` ([`verify::recall_at_k`]).
//!
//! # Outputs
//!
//! [`report::EvalReport`] is written as `PATH.json` (format [`REPORT_FORMAT`]), `PATH.md` and
//! `PATH-acc.png` (top-K accuracy against K, one line per level). [`compare`] reads run
//! directories (`runs/NAME/{model.json, eval-train.json, eval-test.json}`) into one table.

pub mod cluster;
pub mod compare;
pub mod metrics;
pub mod report;
pub mod study;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ndarray::Array2;
use rayon::prelude::*;

use crate::catalogue::{Item, Labels, Manifest, ReadOptions, Role, Subset};
use crate::encoder::Encoder;
use crate::image::Limits;
use crate::index::build::{EmbeddingCache, embed_items};
use crate::index::exact::top_k;
use crate::index::store::Generation;
use crate::index::{Answer, ExactIndex, Hit, verify};
use crate::progress::Progress;
use crate::search::{Filter, SearchRequest, Service};
use crate::{Error, Result};
use metrics::{Protocol, ProtocolKind};
pub use report::{EvalReport, EvaluatedModel, LevelMetrics, ServedRecall, Timing};

/// The K of top-K accuracy.
pub const TOP_K: [usize; 6] = [1, 5, 10, 20, 30, 40];
/// Neighbours voting in kNN classification.
pub const KNN_K: usize = 10;
/// The k of served-vs-exact recall.
pub const RECALL_K: usize = 10;
/// The `format` of an evaluation JSON.
pub const REPORT_FORMAT: &str = "hiercon-eval/1";

/// Evaluation settings besides the data.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalConfig {
    pub split: Subset,
    /// Evaluate a seeded random sample of at most this many queries (the gallery stays whole).
    pub max_queries: Option<usize>,
    /// Seed of the query sample and of k-means.
    pub seed: u64,
    /// Levels with more classes than this get no NMI (k-means costs items × classes × dim per iteration).
    pub nmi_max_classes: usize,
    pub kmeans_max_iter: usize,
}

impl EvalConfig {
    pub fn new(split: Subset) -> Self {
        EvalConfig { split, max_queries: None, seed: 0, nmi_max_classes: 2000, kmeans_max_iter: 50 }
    }
}

/// The evaluated items of one split and their embeddings (row `i` = item `i`).
#[derive(Debug, Clone)]
pub struct EvalData {
    pub items: Vec<Item>,
    /// Unit-norm rows.
    pub embeddings: Arc<Array2<f32>>,
    /// Items whose image could not be read or embedded (left out).
    pub skipped: usize,
    pub embed_seconds: f64,
    pub manifest: Option<PathBuf>,
    /// `index/<name>` and the generation, when the data came from an index.
    pub index: Option<(PathBuf, String)>,
}

fn in_split(items: impl IntoIterator<Item = Item>, split: Subset) -> Result<Vec<Item>> {
    let all: Vec<Item> = items.into_iter().collect();
    let items: Vec<Item> = split.select(&all).into_iter().cloned().collect();
    let mut seen = HashSet::new();
    if let Some(dup) = items.iter().find(|it| !seen.insert(it.id.as_str())) {
        return Err(Error::EvalInput { reason: format!("duplicate item id {:?}", dup.id) });
    }
    if items.is_empty() {
        return Err(Error::EvalInput { reason: format!("no items in split `{}`", split.as_str()) });
    }
    Ok(items)
}

/// Reads `manifest`, keeps `split` and embeds its images (progress bar while embedding; images
/// that cannot be read are skipped and counted, as `hiercon index` does).
pub fn embed_manifest(
    manifest: &Path,
    split: Subset,
    encoder: &dyn Encoder,
    batch_size: usize,
    limits: &Limits,
) -> Result<EvalData> {
    if batch_size == 0 {
        return Err(Error::InvalidArgument { name: "batch-size", reason: "must be at least 1".into() });
    }
    let started = Instant::now();
    let m = Manifest::read_with(manifest, &ReadOptions { check_images: false })?;
    let items = in_split(m.items, split)?;
    tracing::info!(items = items.len(), split = split.as_str(), "embedding the split");
    let (records, embeddings, stats) =
        embed_items(&items, &m.dir, encoder, &EmbeddingCache::empty(), batch_size, limits)?;
    Ok(EvalData {
        items: records.into_iter().map(|r| r.item).collect(),
        embeddings: Arc::new(embeddings),
        skipped: stats.skipped,
        embed_seconds: started.elapsed().as_secs_f64(),
        manifest: Some(manifest.to_path_buf()),
        index: None,
    })
}

/// The items of `split` in a loaded generation, with the embeddings stored there.
///
/// Only whole splits (`train`, `test`): the served search behind `--index` filters by the
/// manifest's split, so it cannot rank within the validation hold-out.
pub fn data_from_generation(g: &Generation, split: Subset) -> Result<EvalData> {
    if !matches!(split, Subset::Train | Subset::Test) {
        return Err(Error::EvalInput {
            reason: format!(
                "an index answers over whole splits (train, test); evaluate `{split}` from the manifest instead of --index"
            ),
        });
    }
    let rows: Vec<usize> = (0..g.items.len()).filter(|&r| g.items[r].item.split == split.split()).collect();
    let items = in_split(rows.iter().map(|&r| g.items[r].item.clone()), split)?;
    let mut emb = Array2::zeros((rows.len(), g.meta.dim));
    for (i, &r) in rows.iter().enumerate() {
        emb.row_mut(i).assign(&ndarray::ArrayView1::from(g.exact.vector(r as u32)));
    }
    Ok(EvalData {
        items,
        embeddings: Arc::new(emb),
        skipped: 0,
        embed_seconds: 0.0,
        manifest: Some(g.meta.manifest.clone()),
        index: Some((g.dir.parent().map(Path::to_path_buf).unwrap_or_default(), g.name())),
    })
}

/// The items of `split` in the collection a Milvus backend's alias names, with their stored
/// embeddings (as [`data_from_generation`] for a local index).
pub fn data_from_milvus(m: &crate::milvus::MilvusBackend, split: Subset) -> Result<EvalData> {
    if !matches!(split, Subset::Train | Subset::Test) {
        return Err(Error::EvalInput {
            reason: format!("an index answers over whole splits (train, test); evaluate `{split}` from the manifest"),
        });
    }
    let live = m.live(true)?;
    let (records, vectors) = m.rows(&live, &format!("split == \"{}\"", split.split().as_str()))?;
    let items = in_split(records.into_iter().map(|r| r.item), split)?;
    let emb = Array2::from_shape_vec((items.len(), live.meta.dim), vectors)
        .map_err(|_| Error::EvalInput { reason: "Milvus returned vectors of another width".into() })?;
    Ok(EvalData {
        items,
        embeddings: Arc::new(emb),
        skipped: 0,
        embed_seconds: 0.0,
        manifest: Some(live.meta.manifest.clone()),
        index: Some((PathBuf::from(format!("milvus://{}/{}", m.address(), m.alias())), live.collection)),
    })
}

/// Which path ranks the gallery.
#[derive(Clone, Copy)]
pub enum Retrieval<'a> {
    /// An exact scan of the embeddings ([`ExactIndex`]).
    Exact,
    /// The serving path: [`Service::search_embedding`] over its live generation, which must hold
    /// the evaluated items (see [`data_from_generation`]).
    Served(&'a Service),
}

/// One query's outcome.
struct QueryOutcome {
    ranking: Vec<Hit>,
    /// Average precision at each label level (`None`: not answerable there).
    aps: Vec<Option<f64>>,
    ap: Option<f64>,
    recall: Option<f64>,
    answer: Option<Answer>,
}

/// The served ranking of one query, mapped back to eval rows, own row left out.
fn served_ranking(
    svc: &Service,
    query: &[f32],
    own: &str,
    filter: &Filter,
    depth: usize,
    rows: &HashMap<&str, u32>,
) -> Result<(Vec<Hit>, Answer)> {
    let req = SearchRequest { k: depth + 1, filter: filter.clone(), group_by: None, ef: None };
    let res = svc.search_embedding(query, &req)?;
    let mut hits = Vec::with_capacity(depth);
    for h in res.hits.iter().filter(|h| h.id != own) {
        let row = *rows.get(h.id.as_str()).ok_or_else(|| Error::EvalInput {
            reason: format!("the index answered item {:?}, which is not among the evaluated items", h.id),
        })?;
        hits.push(Hit { row, score: h.score });
    }
    hits.truncate(depth);
    Ok((hits, res.answered_by))
}

/// Runs the whole evaluation (see the [module docs](self)).
#[tracing::instrument(skip_all, fields(split = cfg.split.as_str(), items = data.items.len()))]
pub fn evaluate(
    data: &EvalData,
    retrieval: Retrieval<'_>,
    cfg: &EvalConfig,
    model: EvaluatedModel,
) -> Result<EvalReport> {
    let started = Instant::now();
    let n = data.items.len();
    if data.embeddings.nrows() != n {
        return Err(Error::EvalInput { reason: format!("{n} items but {} embeddings", data.embeddings.nrows()) });
    }
    let labels = Labels::encode(&data.items);
    let mut protocol = Protocol::from_items(&data.items)?;
    if let Some(max) = cfg.max_queries {
        protocol.sample_queries(max, cfg.seed);
    }
    let exact = ExactIndex::new(data.embeddings.clone());
    let depth = TOP_K[TOP_K.len() - 1].max(KNN_K);
    let product = labels.rows.column(labels.product_column());
    let row_of: HashMap<&str, u32> = data.items.iter().enumerate().map(|(i, it)| (it.id.as_str(), i as u32)).collect();
    let filter = Filter {
        split: Some(cfg.split.split()),
        role: (protocol.kind == ProtocolKind::QueryGallery).then_some(Role::Gallery),
        ..Filter::default()
    };
    tracing::info!(
        queries = protocol.queries.len(),
        gallery = protocol.gallery.len(),
        protocol = protocol.kind.as_str(),
        "ranking"
    );
    let progress = Progress::new("ranking", protocol.queries.len() as u64, "queries");
    // The complete ranking is needed for average precision only; a query without a same-class
    // gallery item at any level gets the first `depth` hits.
    let has_product_match = metrics::answerable(product, &protocol);
    let level_columns: Vec<usize> = (0..labels.image_column()).collect();
    let answerable_somewhere: Vec<bool> = {
        let per_level: Vec<Vec<bool>> =
            level_columns.iter().map(|&c| metrics::answerable(labels.rows.column(c), &protocol)).collect();
        (0..protocol.queries.len()).map(|i| per_level.iter().any(|a| a[i])).collect()
    };
    let outcomes: Vec<QueryOutcome> = protocol
        .queries
        .par_iter()
        .zip(has_product_match.par_iter().zip(&answerable_somewhere))
        .map(|(&q, (&product_match, &full_needed))| {
            let v = exact.vector(q);
            let want = if full_needed { protocol.gallery.len() } else { depth };
            let full = top_k(exact.scores(v, Some(&protocol.gallery)).filter(|h| h.row != q), want);
            let aps: Vec<Option<f64>> = level_columns
                .iter()
                .map(|&c| full_needed.then(|| metrics::average_precision(labels.rows.column(c), q, &full)).flatten())
                .collect();
            let ap = if product_match { metrics::average_precision(product, q, &full) } else { None };
            let out = match retrieval {
                Retrieval::Exact => QueryOutcome {
                    ranking: full[..depth.min(full.len())].to_vec(),
                    aps,
                    ap,
                    recall: None,
                    answer: None,
                },
                Retrieval::Served(svc) => {
                    let (ranking, answer) =
                        served_ranking(svc, v, &data.items[q as usize].id, &filter, depth, &row_of)?;
                    let recall = metrics::recall_against_exact(&ranking, &full, RECALL_K);
                    QueryOutcome { ranking, aps, ap, recall: Some(recall), answer: Some(answer) }
                }
            };
            progress.inc(1);
            Ok(out)
        })
        .collect::<Result<_>>()?;
    progress.finish();
    let rank_seconds = started.elapsed().as_secs_f64();
    let rankings: Vec<Vec<Hit>> = outcomes.iter().map(|o| o.ranking.clone()).collect();

    let cluster_started = Instant::now();
    let mut levels = Vec::new();
    for c in 0..labels.image_column() {
        let column = labels.rows.column(c);
        let answerable = metrics::answerable(column, &protocol);
        let classes = labels.classes(c);
        let (nmi, nmi_note) = if classes < 2 {
            (None, Some("one class: nothing to cluster".to_string()))
        } else if classes > cfg.nmi_max_classes {
            (None, Some(format!("{classes} classes exceed nmi_max_classes = {}", cfg.nmi_max_classes)))
        } else {
            let km = cluster::kmeans(
                data.embeddings.view(),
                &cluster::KMeansConfig { k: classes, seed: cfg.seed, max_iter: cfg.kmeans_max_iter },
            );
            let truth: Vec<usize> = column.iter().map(|&v| v as usize).collect();
            (Some(cluster::nmi(&truth, &km.assignment)), None)
        };
        levels.push(LevelMetrics {
            name: labels.columns[c].name.clone(),
            classes,
            queries: answerable.iter().filter(|&&a| a).count(),
            top_k: metrics::top_k_accuracy(column, &protocol.queries, &rankings, &answerable, &TOP_K),
            knn: metrics::knn_accuracy(column, &protocol.queries, &rankings, &answerable, KNN_K),
            map: {
                let v: Vec<f64> = outcomes.iter().filter_map(|o| o.aps[c]).collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            },
            nmi,
            nmi_note,
        });
    }
    let cluster_seconds = cluster_started.elapsed().as_secs_f64();

    let aps: Vec<f64> = outcomes.iter().filter_map(|o| o.ap).collect();
    let served = match retrieval {
        Retrieval::Exact => None,
        Retrieval::Served(svc) => {
            let recalls: Vec<f64> = outcomes.iter().filter_map(|o| o.recall).collect();
            let served_recall = recalls.iter().sum::<f64>() / recalls.len().max(1) as f64;
            // Locally the graph's own recall (no filter) beside the served one; in Milvus the
            // served ranking is its HNSW search, so the two are one figure.
            let (hnsw_recall, ef_search) = match svc.live()? {
                crate::search::LiveIndex::Local(g) => {
                    let query_rows: Vec<u32> =
                        protocol.queries.iter().filter_map(|&q| g.row_of(&data.items[q as usize].id)).collect();
                    (verify::recall_at_k(&g, &query_rows, RECALL_K, g.meta.ef_search), g.meta.ef_search)
                }
                crate::search::LiveIndex::Milvus(l) => (served_recall, l.ef_search),
            };
            Some(ServedRecall {
                k: RECALL_K,
                served_recall,
                hnsw_recall,
                ef_search,
                approx_answers: outcomes.iter().filter(|o| o.answer == Some(Answer::Approx)).count(),
                exact_answers: outcomes.iter().filter(|o| o.answer == Some(Answer::Exact)).count(),
            })
        }
    };
    Ok(EvalReport {
        format: REPORT_FORMAT.into(),
        split: cfg.split,
        seen: cfg.split.seen(),
        protocol: protocol.kind,
        model,
        manifest: data.manifest.clone(),
        index: data.index.as_ref().map(|i| i.0.clone()),
        generation: data.index.as_ref().map(|i| i.1.clone()),
        items: n,
        skipped_images: data.skipped,
        queries: protocol.queries.len(),
        gallery: protocol.gallery.len(),
        ks: TOP_K.to_vec(),
        knn_k: KNN_K,
        levels,
        map_product: (!aps.is_empty()).then(|| aps.iter().sum::<f64>() / aps.len() as f64),
        map_queries: aps.len(),
        served,
        seed: cfg.seed,
        seconds: Timing {
            embed: data.embed_seconds,
            rank: rank_seconds,
            cluster: cluster_seconds,
            total: data.embed_seconds + started.elapsed().as_secs_f64(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Items on the unit circle at `deg` degrees (2-d embeddings), all in split `test`.
    fn data(spec: &[(&str, &str, &str, Option<Role>, f32)]) -> EvalData {
        let items: Vec<Item> = spec
            .iter()
            .map(|&(id, cat, product, role, _)| Item {
                role,
                split: crate::catalogue::Split::Test,
                ..Item::new(id, cat, product, "v")
            })
            .collect();
        let emb: Vec<f32> = spec.iter().flat_map(|s| [s.4.to_radians().cos(), s.4.to_radians().sin()]).collect();
        EvalData {
            embeddings: Arc::new(Array2::from_shape_vec((items.len(), 2), emb).unwrap()),
            items,
            skipped: 0,
            embed_seconds: 0.0,
            manifest: None,
            index: None,
        }
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-12)
    }

    #[test]
    fn query_gallery_evaluation_by_hand() {
        let (q, g) = (Some(Role::Query), Some(Role::Gallery));
        // Gallery at 0°, 90°, 180°; queries at 10°, 40°, 100°.
        let d = data(&[
            ("g0", "a/x", "p1", g, 0.0),
            ("g1", "a/y", "p2", g, 90.0),
            ("g2", "b/z", "p3", g, 180.0),
            ("q0", "a/x", "p1", q, 10.0),       // ranks g0, g1, g2
            ("q1", "a/y", "p2", q, 40.0),       // ranks g0, g1, g2
            ("q2", "b/z", "p3", q, 100.0),      // ranks g1, g2, g0
            ("other", "a/x", "p1", None, 10.0), // no role: not a query, not in the gallery
        ]);
        let r = evaluate(&d, Retrieval::Exact, &EvalConfig::new(Subset::Test), EvaluatedModel::default()).unwrap();
        assert_eq!((r.protocol, r.queries, r.gallery, r.items), (ProtocolKind::QueryGallery, 3, 3, 7));
        let names: Vec<&str> = r.levels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["level1", "level2", "product", "variation"]);
        let (l1, l2, p) = (&r.levels[0], &r.levels[1], &r.levels[2]);
        // First-match ranks — level1 (a, a, b): 1, 1, 2; level2 and product: 1, 2, 2.
        assert!(close(l1.at(&r.ks, 1), 2.0 / 3.0) && close(l1.at(&r.ks, 5), 1.0));
        assert!(close(l2.at(&r.ks, 1), 1.0 / 3.0) && close(l2.at(&r.ks, 5), 1.0));
        assert!(close(p.at(&r.ks, 1), 1.0 / 3.0) && close(p.at(&r.ks, 40), 1.0));
        assert_eq!(r.levels[3].top_k, p.top_k);
        // mAP: one relevant item each, at ranks 1, 2, 2.
        assert!(close(r.map_product, (1.0 + 0.5 + 0.5) / 3.0));
        assert_eq!(r.map_queries, 3);
        // kNN over all three gallery items. Product: one vote each, the most similar wins:
        // q0 -> p1 (right), q1 -> p1 (wrong), q2 -> p2 (wrong). Level1: q0 a, q1 a (right),
        // q2: a, b, a -> a (wrong).
        assert!(close(p.knn, 1.0 / 3.0));
        assert!(close(l1.knn, 2.0 / 3.0));
        // Classes are counted over all evaluated items; every level gets an NMI in [0, 1].
        assert_eq!((l1.classes, l2.classes, p.classes), (2, 3, 3));
        assert!(r.levels.iter().all(|l| l.nmi.is_some_and(|v| (0.0..=1.0 + 1e-12).contains(&v))));
        assert!(r.served.is_none());
    }

    #[test]
    fn leave_one_out_excludes_the_query_itself() {
        // Two products of two images each; each image's nearest other image is its twin,
        // except "b2", whose nearest is "a1" (identical vectors would tie; these do not).
        let d = data(&[
            ("a1", "c", "A", None, 0.0),
            ("a2", "c", "A", None, 20.0),
            ("b1", "c", "B", None, 90.0),
            ("b2", "c", "B", None, -30.0),
            ("solo", "d", "S", None, 200.0),
        ]);
        let mut cfg = EvalConfig::new(Subset::Test);
        cfg.nmi_max_classes = 2; // product has 3 classes: no NMI there
        let r = evaluate(&d, Retrieval::Exact, &cfg, EvaluatedModel::default()).unwrap();
        assert_eq!((r.protocol, r.queries, r.gallery), (ProtocolKind::LeaveOneOut, 5, 5));
        let p = r.level("product").unwrap();
        // (With itself ranked, every query would match at rank 1.) "solo" has no other S: 4 answerable. a1 -> a2 (rank 1), a2 -> a1 (1),
        // b1: a2 (70°), a1 (90°), solo (110°), b2 (120°) -> rank 4;
        // b2: a1 (30°), a2 (50°), b1 (120°), solo (130°) -> rank 3.
        assert_eq!(p.queries, 4);
        assert!(close(p.at(&r.ks, 1), 0.5) && close(p.at(&r.ks, 5), 1.0));
        assert!(close(r.map_product, (1.0 + 1.0 + 1.0 / 4.0 + 1.0 / 3.0) / 4.0));
        assert!(p.nmi.is_none() && p.nmi_note.as_deref().is_some_and(|n| n.contains("3 classes")));
        // A sample of queries keeps the gallery whole.
        cfg.max_queries = Some(2);
        let r = evaluate(&d, Retrieval::Exact, &cfg, EvaluatedModel::default()).unwrap();
        assert_eq!((r.queries, r.gallery), (2, 5));
    }

    #[test]
    fn mismatched_or_empty_input_is_refused() {
        let mut d = data(&[("a", "c", "A", None, 0.0), ("b", "c", "A", None, 1.0)]);
        d.embeddings = Arc::new(Array2::zeros((1, 2)));
        let err = evaluate(&d, Retrieval::Exact, &EvalConfig::new(Subset::Test), EvaluatedModel::default());
        assert!(matches!(err, Err(Error::EvalInput { .. })));
        assert!(matches!(in_split(vec![Item::new("a", "c", "p", "v")], Subset::Test), Err(Error::EvalInput { .. })));
    }
}
