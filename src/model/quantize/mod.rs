//! `hiercon model quantize`: an int8 copy of a servable model, written by hiercon itself.
//!
//! The float model is rewritten at the protobuf level into ONNX's QDQ form, which ONNX Runtime
//! fuses into its int8 kernels (QLinearConv, QLinearAdd, QGemm, ...):
//!
//! 1. **Fold.** A BatchNormalization whose input is a Conv's only use is folded into that Conv's
//!    weights and bias (in f64), so the weights that get per-channel scales are the ones that run.
//! 2. **Plan.** Every Conv, Gemm and MatMul with a constant weight is quantised, except the ones
//!    named in [`QuantizeOptions::keep_float`]. Its activation input and its output get a
//!    QuantizeLinear → DequantizeLinear pair; when the output's only use is a Clip or Relu, the
//!    pair goes after that instead (the quantised range starts at 0 and ends at the clip's
//!    bound at the latest, so ORT drops the Clip and the Conv's output feeds the Q directly). An
//!    Add whose two inputs are quantised gets its output quantised too (residuals run as
//!    QLinearAdd). Graph outputs stay float: the embedding is never rounded to 8 bits.
//! 3. **Calibrate.** ORT runs the folded float model, with every tensor of the plan as an extra
//!    output, on images of a *seen* split of the catalogue; each tensor's range is its min/max,
//!    or the central `p` % of its values (a 4,096-bin histogram between min and max, second
//!    pass). Ranges always include 0, so zero is exact (padding).
//! 4. **Write.** Activations are uint8 with a zero point; weights are int8, symmetric, one scale
//!    per output channel (`DequantizeLinear` with `axis`); biases are int32 at scale
//!    `x_scale · w_scale[c]`, as the integer kernels need. `reduce_range` keeps weights in 7 bits
//!    (±63) for CPUs whose int8 dot product (AVX2 `vpmaddubsw`, no VNNI) saturates 16-bit sums.
//!
//! The result is checked before it is written: ORT must load it, and its embeddings are compared
//! with the float model's on check images of the same split that calibration did not use (mean
//! and worst cosine, recorded in the `.json`).

mod qdq;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::{Array4, Axis};
use ort::value::TensorRef;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::catalogue::split::stable_hash;
use crate::catalogue::{Manifest, Subset};
use crate::graph::import::{OnnxFile, import_err};
use crate::graph::proto::{GraphProto, ModelProto};
use crate::image::{Limits, Preprocess, batch_from_files, stack};
use crate::modelfile::ModelMeta;
use crate::runtime::RuntimeOptions;
use crate::{Error, Result};
use qdq::{activation_params, float_output, fold_batchnorms, fold_pads, op, plan, rewrite, share_pass_through_params};

/// How an activation's range is chosen from the calibration images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RangeMethod {
    /// The smallest and largest value seen.
    MinMax,
    /// The central `p` percent of the values (`p` in (50, 100]): outliers saturate instead of
    /// stretching the scale.
    Percentile(f64),
}

impl RangeMethod {
    /// How the `.json` and messages name it.
    pub fn describe(self) -> String {
        match self {
            RangeMethod::MinMax => "minmax".into(),
            RangeMethod::Percentile(p) => format!("percentile {p}"),
        }
    }
}

/// What to quantise and how.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeOptions {
    pub method: RangeMethod,
    /// Nodes left in float, by node name or by the name of an output.
    pub keep_float: Vec<String>,
    /// 7-bit weights (±63) for CPUs without VNNI.
    pub reduce_range: bool,
    /// Images per ORT run during calibration and the check.
    pub batch: usize,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions { method: RangeMethod::MinMax, keep_float: Vec::new(), reduce_range: false, batch: 16 }
    }
}

/// Images of the catalogue that calibrate and check the quantised model.
#[derive(Debug, Clone)]
pub struct CalibrationSet {
    pub manifest: PathBuf,
    pub subset: Subset,
    pub seed: u64,
    /// Item ids used for the ranges.
    pub calibration: Vec<String>,
    pub calibration_paths: Vec<PathBuf>,
    /// Other item ids of the same subset, for the float-vs-int8 check.
    pub check: Vec<String>,
    pub check_paths: Vec<PathBuf>,
}

impl CalibrationSet {
    /// `images` items of `subset` (a seen one: train, fit or val) for calibration and up to
    /// `check` others for the check, chosen by a seeded hash of their ids (the same on every
    /// machine).
    pub fn sample(manifest_path: &Path, subset: Subset, images: usize, check: usize, seed: u64) -> Result<Self> {
        if !subset.seen() {
            return Err(Error::InvalidArgument {
                name: "split",
                reason: format!(
                    "calibration images must come from seen products (train, fit or val), not `{}`: \
                     a model tuned on the unseen split would report optimistic unseen figures",
                    subset.as_str()
                ),
            });
        }
        if images == 0 {
            return Err(Error::InvalidArgument { name: "calibration-images", reason: "must be at least 1".into() });
        }
        let manifest = Manifest::read(manifest_path)?;
        let mut items = subset.select(&manifest.items);
        if items.is_empty() {
            return Err(Error::InvalidArgument {
                name: "split",
                reason: format!("{} has no items in `{}`", manifest_path.display(), subset.as_str()),
            });
        }
        items.sort_by_cached_key(|it| (stable_hash(seed, &["calibration", &it.id]), it.id.clone()));
        let n = images.min(items.len());
        let (cal, rest) = items.split_at(n);
        let rest = &rest[..check.min(rest.len())];
        Ok(CalibrationSet {
            manifest: manifest_path.to_path_buf(),
            subset,
            seed,
            calibration: cal.iter().map(|it| it.id.clone()).collect(),
            calibration_paths: cal.iter().map(|it| manifest.image_path(it)).collect(),
            check: rest.iter().map(|it| it.id.clone()).collect(),
            check_paths: rest.iter().map(|it| manifest.image_path(it)).collect(),
        })
    }

    /// sha256 over the calibration ids, one per line: which images, in the `.json`.
    fn ids_digest(&self) -> String {
        let mut h = Sha256::new();
        for id in &self.calibration {
            h.update(id.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }
}

/// What quantisation did, and how close the int8 model stays to the float one.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeReport {
    pub folded_batchnorms: usize,
    /// Conv / Gemm / MatMul nodes that run in int8.
    pub quantized_nodes: usize,
    /// Activations with a Q/DQ pair.
    pub quantized_tensors: usize,
    /// Nodes left in float on request.
    pub kept_float: Vec<String>,
    pub check_images: usize,
    /// Cosine between the float and the int8 embedding of each check image: mean and worst.
    pub cosine_mean: f64,
    pub cosine_min: f64,
}

// ---------------------------------------------------------------------------------------------
// 3. Calibration.

/// Per-tensor range statistics over the calibration images.
#[derive(Debug, Clone)]
struct Stats {
    min: f32,
    max: f32,
    hist: Vec<u64>,
}

const BINS: usize = 4096;

impl Stats {
    fn new() -> Self {
        Stats { min: f32::INFINITY, max: f32::NEG_INFINITY, hist: Vec::new() }
    }

    fn bin(&self, x: f32) -> usize {
        let w = (self.max - self.min).max(f32::MIN_POSITIVE);
        (((x - self.min) / w * BINS as f32) as usize).min(BINS - 1)
    }

    /// The `[lo, hi]` range to quantise, always containing 0.
    fn range(&self, method: RangeMethod) -> (f32, f32) {
        let (lo, hi) = match method {
            RangeMethod::MinMax => (self.min, self.max),
            RangeMethod::Percentile(p) => {
                let total: u64 = self.hist.iter().sum();
                let tail = ((1.0 - p / 100.0) * total as f64).floor() as u64;
                let w = (self.max - self.min) / BINS as f32;
                let (mut acc, mut lo_bin) = (0u64, 0usize);
                for (i, &c) in self.hist.iter().enumerate() {
                    if acc + c > tail {
                        lo_bin = i;
                        break;
                    }
                    acc += c;
                }
                let (mut acc, mut hi_bin) = (0u64, BINS - 1);
                for (i, &c) in self.hist.iter().enumerate().rev() {
                    if acc + c > tail {
                        hi_bin = i;
                        break;
                    }
                    acc += c;
                }
                (self.min + lo_bin as f32 * w, (self.min + (hi_bin + 1) as f32 * w).min(self.max))
            }
        };
        (lo.min(0.0), hi.max(0.0))
    }
}

fn load_batches(paths: &[PathBuf], pre: &Preprocess, batch: usize) -> Result<Vec<Array4<f32>>> {
    let limits = Limits::default();
    let mut out = Vec::new();
    for chunk in paths.chunks(batch.max(1)) {
        let tensors: Vec<_> = batch_from_files(chunk, pre, &limits).into_iter().collect::<Result<_>>()?;
        out.push(stack(&tensors));
    }
    Ok(out)
}

fn calibrate(
    g: &GraphProto,
    base: &ModelProto,
    input: &str,
    tensors: &[String],
    batches: &[Array4<f32>],
    method: RangeMethod,
) -> Result<HashMap<String, Stats>> {
    let mut m = base.clone();
    let mut cg = g.clone();
    cg.output.extend(tensors.iter().map(|t| float_output(t)));
    m.graph = Some(cg);
    let bytes = m.encode_to_vec();
    let rt = crate::runtime::init()?;
    let mut session = rt.session_from_bytes(&RuntimeOptions::default(), &bytes)?;
    let mut stats: HashMap<String, Stats> = tensors.iter().map(|t| (t.clone(), Stats::new())).collect();
    let passes = if matches!(method, RangeMethod::Percentile(_)) { 2 } else { 1 };
    for pass in 0..passes {
        if pass == 1 {
            for s in stats.values_mut() {
                s.hist = vec![0; BINS];
            }
        }
        for x in batches {
            let t =
                TensorRef::from_array_view(x.view()).map_err(|e| Error::ort("wrapping the calibration batch", e))?;
            let out = session
                .run(ort::inputs![input => t])
                .map_err(|e| Error::ort("running the float model on calibration images", e))?;
            for name in tensors {
                let y = out[name.as_str()]
                    .try_extract_array::<f32>()
                    .map_err(|e| Error::ort(format!("reading calibration tensor `{name}`"), e))?;
                let s = stats.get_mut(name).expect("every tensor has stats");
                if pass == 0 {
                    for &v in y.iter().filter(|v| v.is_finite()) {
                        s.min = s.min.min(v);
                        s.max = s.max.max(v);
                    }
                } else {
                    for &v in y.iter().filter(|v| v.is_finite()) {
                        let b = s.bin(v);
                        s.hist[b] += 1;
                    }
                }
            }
        }
    }
    for (name, s) in &stats {
        if !s.min.is_finite() || !s.max.is_finite() {
            return Err(Error::InvalidArgument {
                name: "model",
                reason: format!("calibration saw no finite value of `{name}`"),
            });
        }
    }
    Ok(stats)
}

// ---------------------------------------------------------------------------------------------
// The command.

fn run_embeddings(bytes: &[u8], meta: &ModelMeta, batches: &[Array4<f32>]) -> Result<Vec<Vec<f32>>> {
    let rt = crate::runtime::init()?;
    let mut session = rt.session_from_bytes(&RuntimeOptions::default(), bytes)?;
    let mut rows = Vec::new();
    for x in batches {
        let t = TensorRef::from_array_view(x.view()).map_err(|e| Error::ort("wrapping the check batch", e))?;
        let out = session
            .run(ort::inputs![meta.input.name.as_str() => t])
            .map_err(|e| Error::ort("running a model on the check images", e))?;
        let y = out[meta.output.name.as_str()]
            .try_extract_array::<f32>()
            .map_err(|e| Error::ort("reading the embeddings", e))?;
        let y = y.to_owned().into_dimensionality::<ndarray::Ix2>().map_err(|e| Error::InvalidArgument {
            name: "model",
            reason: format!("the embedding output is not [batch, dim]: {e}"),
        })?;
        rows.extend(y.axis_iter(Axis(0)).map(|r| r.to_vec()));
    }
    Ok(rows)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na * nb) }
}

/// Writes `out` (+ `out.json`): the int8 copy of the servable model at `src`, calibrated on
/// `set`. See the module docs.
pub fn quantize(
    src: &Path,
    out: &Path,
    set: &CalibrationSet,
    o: &QuantizeOptions,
) -> Result<(ModelMeta, QuantizeReport)> {
    if let RangeMethod::Percentile(p) = o.method
        && !(p > 50.0 && p <= 100.0)
    {
        return Err(Error::InvalidArgument { name: "percentile", reason: format!("{p} is not in (50, 100]") });
    }
    let (meta, bytes) = ModelMeta::read_verified(src)?;
    let file = OnnxFile::from_bytes(src, &bytes)?;
    if file.opset < 13 {
        return Err(import_err(
            src,
            format!(
                "opset {} is too old: per-channel QuantizeLinear/DequantizeLinear need opset 13 or later",
                file.opset
            ),
        ));
    }
    let dir = src.parent().unwrap_or(Path::new("."));
    let mut g = file.proto.graph.clone().ok_or_else(|| import_err(src, "the model has no graph"))?;
    if g.node.iter().any(|n| matches!(op(n), "QuantizeLinear" | "DequantizeLinear" | "QLinearConv")) {
        return Err(import_err(src, "the model is quantised already"));
    }
    let unknown: Vec<&String> = o
        .keep_float
        .iter()
        .filter(|k| !g.node.iter().any(|n| n.name.as_deref() == Some(k.as_str()) || n.output.iter().any(|x| x == *k)))
        .collect();
    if !unknown.is_empty() {
        return Err(Error::InvalidArgument {
            name: "keep-float",
            reason: format!("no node or node output is named {unknown:?}"),
        });
    }
    let folded = fold_batchnorms(&mut g, dir);
    let folded_pads = fold_pads(&mut g, dir);
    let p = plan(&g, dir, &o.keep_float);
    if p.targets.is_empty() {
        return Err(import_err(
            src,
            "nothing to quantise: no Conv, Gemm or MatMul with a constant weight (all kept float or none in the model)",
        ));
    }
    tracing::info!(folded, folded_pads, nodes = p.targets.len(), tensors = p.tensors.len(), "quantisation plan");
    let pre = meta.preprocess();
    let cal = load_batches(&set.calibration_paths, &pre, o.batch)?;
    let stats = calibrate(&g, &file.proto, &meta.input.name, &p.tensors, &cal, o.method)?;
    let mut params: HashMap<String, (f32, u8)> = stats
        .iter()
        .map(|(t, s)| {
            let (lo, hi) = s.range(o.method);
            (t.clone(), activation_params(lo, hi))
        })
        .collect();
    share_pass_through_params(&g, &mut params);
    let qmax = if o.reduce_range { 63.0 } else { 127.0 };
    let qg = rewrite(&g, dir, &p, &params, qmax)?;
    let mut model = file.proto.clone();
    model.graph = Some(qg);
    let qbytes = model.encode_to_vec();

    // Check: the float and the int8 model on images calibration did not use.
    let check_paths = if set.check_paths.is_empty() { &set.calibration_paths } else { &set.check_paths };
    let check = load_batches(check_paths, &pre, o.batch)?;
    let a = run_embeddings(&bytes, &meta, &check)?;
    let b = run_embeddings(&qbytes, &meta, &check)
        .map_err(|e| import_err(out, format!("ONNX Runtime does not run the quantised model: {e}")))?;
    let cos: Vec<f64> = a.iter().zip(&b).map(|(x, y)| cosine(x, y)).collect();
    let cosine_mean = cos.iter().sum::<f64>() / cos.len().max(1) as f64;
    let cosine_min = cos.iter().copied().fold(f64::INFINITY, f64::min);
    if !cosine_mean.is_finite() {
        return Err(import_err(out, "the quantised model's embeddings are not finite"));
    }
    let report = QuantizeReport {
        folded_batchnorms: folded,
        quantized_nodes: p.targets.len(),
        quantized_tensors: p.tensors.len(),
        kept_float: p.kept_float.clone(),
        check_images: cos.len(),
        cosine_mean,
        cosine_min,
    };

    let digest = crate::modelfile::model_digest(out, &qbytes)?;
    let mut qmeta = meta.clone();
    qmeta.digest = digest;
    qmeta.extra.insert(
        "quantization".into(),
        serde_json::json!({
            "source": src,
            "source_digest": meta.digest,
            "format": "QDQ",
            "weights": if o.reduce_range { "int8 (7-bit range), symmetric, per output channel" } else { "int8, symmetric, per output channel" },
            "activations": "uint8, asymmetric, per tensor",
            "method": o.method.describe(),
            "calibration": {
                "manifest": set.manifest,
                "split": set.subset.as_str(),
                "seed": set.seed,
                "images": set.calibration.len(),
                "ids_sha256": set.ids_digest(),
                "ids": set.calibration,
            },
            "folded_batchnorms": folded,
            "folded_pads": folded_pads,
            "quantized_nodes": p.targets.len(),
            "quantized_tensors": p.tensors.len(),
            "kept_float": p.kept_float,
            "check": { "images": cos.len(), "cosine_mean": cosine_mean, "cosine_min": cosine_min },
        }),
    );
    crate::modelfile::write_model(out, &qbytes, &qmeta)?;
    Ok((qmeta, report))
}

#[cfg(test)]
mod tests {
    use super::qdq::*;
    use super::*;
    use ndarray::{ArrayD, IxDyn};
    use std::collections::HashSet;

    fn shipped() -> (PathBuf, ModelMeta, OnnxFile) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/emoji-lite0-hmce.onnx");
        let meta = ModelMeta::read(&ModelMeta::path_for(&path)).unwrap();
        let file = OnnxFile::read(&path).unwrap();
        (path, meta, file)
    }

    fn batch(n: usize, size: usize) -> Array4<f32> {
        Array4::from_shape_fn((n, 3, size, size), |(b, c, y, x)| ((b * 5 + c * 7 + y * 3 + x) % 13) as f32 / 6.0 - 1.0)
    }

    #[test]
    fn folding_batchnorm_and_pads_keeps_the_model_s_output() {
        // ORT runs the original BatchNormalization nodes; the folded Convs must agree with them.
        let (path, meta, file) = shipped();
        let mut g = file.proto.graph.clone().unwrap();
        let before = g.node.iter().filter(|n| op(n) == "BatchNormalization").count();
        let folded = fold_batchnorms(&mut g, path.parent().unwrap());
        assert_eq!(folded, before);
        assert!(folded > 40, "{folded}");
        assert!(!g.node.iter().any(|n| op(n) == "BatchNormalization"));
        // The SAME-padding Pads before stride-2 convolutions go into the Convs' pads too.
        let pads = g.node.iter().filter(|n| op(n) == "Pad").count();
        assert!(pads >= 4, "{pads}");
        assert_eq!(fold_pads(&mut g, path.parent().unwrap()), pads);
        assert!(!g.node.iter().any(|n| op(n) == "Pad"));
        let mut m = file.proto.clone();
        m.graph = Some(g);
        let x = vec![batch(2, meta.input.size as usize)];
        let a = run_embeddings(&std::fs::read(&path).unwrap(), &meta, &x).unwrap();
        let b = run_embeddings(&m.encode_to_vec(), &meta, &x).unwrap();
        let diff = a.iter().flatten().zip(b.iter().flatten()).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "folded model differs by {diff}");
    }

    #[test]
    fn the_plan_quantises_every_conv_and_puts_pairs_after_clips() {
        let (path, _, file) = shipped();
        let dir = path.parent().unwrap();
        let mut g = file.proto.graph.clone().unwrap();
        fold_batchnorms(&mut g, dir);
        let p = plan(&g, dir, &[]);
        let convs = g.node.iter().filter(|n| op(n) == "Conv").count();
        let gemms = g.node.iter().filter(|n| op(n) == "Gemm").count();
        assert_eq!(p.targets.len(), convs + gemms);
        let chosen: HashSet<&str> = p.tensors.iter().map(String::as_str).collect();
        let uses = consumers(&g);
        for n in g.node.iter().filter(|n| op(n) == "Conv") {
            let o = n.output[0].as_str();
            let only_clip = uses[o].len() == 1 && op(&g.node[uses[o][0]]) == "Clip";
            // The pair follows the Clip, never sits between Conv and Clip.
            assert_eq!(chosen.contains(o), !only_clip, "{o}");
            if only_clip {
                assert!(chosen.contains(g.node[uses[o][0]].output[0].as_str()));
            }
        }
        assert!(!chosen.contains("embeddings"));
        // Keeping a node in float removes it from the plan.
        let first = g.node.iter().find(|n| op(n) == "Conv").unwrap().output[0].clone();
        let kept = plan(&g, dir, std::slice::from_ref(&first));
        assert_eq!(kept.targets.len(), p.targets.len() - 1);
        assert_eq!(kept.kept_float.len(), 1);
    }

    #[test]
    fn activation_params_make_zero_exact_and_cover_the_range() {
        let (s, z) = activation_params(-1.0, 3.0);
        assert!((s - 4.0 / 255.0).abs() < 1e-7);
        // zero maps to an integer exactly
        assert_eq!(z, 64);
        assert!(((0.0 - z as f32) * s - -1.0).abs() < s);
        assert!(((255.0 - z as f32) * s - 3.0).abs() < s);
        // clipped activations: zero point 0, the top at the clip bound
        assert_eq!(activation_params(0.0, 6.0), (6.0 / 255.0, 0));
        // degenerate ranges still give a usable scale
        assert_eq!(activation_params(0.0, 0.0), (1.0, 0));
    }

    #[test]
    fn percentile_ranges_drop_outliers_minmax_keeps_them() {
        let mut s = Stats::new();
        let values: Vec<f32> = (0..100_000).map(|i| (i % 1000) as f32 / 1000.0).chain([50.0, -20.0]).collect();
        for &v in &values {
            s.min = s.min.min(v);
            s.max = s.max.max(v);
        }
        s.hist = vec![0; BINS];
        for &v in &values {
            let b = s.bin(v);
            s.hist[b] += 1;
        }
        assert_eq!(s.range(RangeMethod::MinMax), (-20.0, 50.0));
        let (lo, hi) = s.range(RangeMethod::Percentile(99.99));
        // 10 values in each tail may be dropped; the two outliers are.
        assert!(lo <= 0.0 && lo > -0.1, "lo {lo}");
        assert!((0.99..1.1).contains(&hi), "hi {hi}");
        // The bulk of the values stays inside, at the histogram's resolution.
        let bin = 70.0 / BINS as f32;
        assert!(hi + bin >= 0.999);
    }

    #[test]
    fn weights_are_symmetric_per_channel() {
        let w = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.5, -1.0, 0.25, 0.0, 0.0, 0.0]).unwrap();
        let (q, s) = quantize_weight(&w, 0, 127.0);
        assert_eq!(s, vec![1.0 / 127.0, 1.0]);
        assert_eq!(q, vec![64, -127, 32, 0, 0, 0]);
        let (q1, s1) = quantize_weight(&w, 1, 63.0);
        assert_eq!(s1, vec![0.5 / 63.0, 1.0 / 63.0, 0.25 / 63.0]);
        assert_eq!(q1, vec![63, -63, 63, 0, 0, 0]);
    }
}
