//! Image encoders: the [`Encoder`] trait, the ONNX Runtime model encoder and a deterministic test encoder.
//!
//! An exported model is `X.onnx` with its description `X.json` beside it ([`ModelMeta`]):
//!
//! ```json
//! {"format": "hiercon-model/1", "arch": "resnet-mini",
//!  "input": {"name": "images", "size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
//!  "output": {"name": "embeddings", "dim": 128},
//!  "digest": "<model_digest: hex sha256 over the .onnx file's initializers>"}
//! ```
//!
//! [`OrtEncoder`] recomputes the digest from the `.onnx` file and refuses a description that
//! belongs to another model ([`Error::ModelDigestMismatch`]).
//!
//! Input is NCHW f32 `[batch, 3, size, size]` (dynamic batch), output `[batch, dim]`. Other fields
//! are allowed and kept in [`ModelMeta::extra`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, TryLockError};

use ndarray::{Array2, ArrayView4, Axis};
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};
use rand::SeedableRng;
use rand_distr_free::standard_normal;

use crate::image::Preprocess;
use crate::runtime::{self, RuntimeOptions};
use crate::{Error, Result};

pub use crate::modelfile::{InputMeta, MODEL_FORMAT, ModelMeta, OutputMeta};

/// Turns a batch of preprocessed images into L2-normalised embeddings, one row per image.
///
/// Implementations:
/// - [`OrtEncoder`]: an exported model run by ONNX Runtime (what `index`, `serve` and `eval` use);
/// - [`TestEncoder`]: a fixed seeded random projection of average-pooled pixels — deterministic,
///   instant, and similar images get similar vectors; for tests and benchmarks.
pub trait Encoder: Send + Sync {
    /// Embedding width.
    fn dim(&self) -> usize;
    /// Fingerprint of the model's parameters; equal digests give equal embeddings.
    fn digest(&self) -> &str;
    /// How images must be preprocessed before [`Encoder::embed`].
    fn preprocess(&self) -> &Preprocess;
    /// Embeds an NCHW batch `[n, 3, size, size]`; returns `[n, dim]` with unit-norm rows.
    fn embed(&self, batch: ArrayView4<f32>) -> Result<Array2<f32>>;
}

/// Divides each row by its L2 norm (all-zero rows stay zero).
pub fn l2_normalize_rows(a: &mut Array2<f32>) {
    for mut row in a.axis_iter_mut(Axis(0)) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.mapv_inplace(|v| v / norm);
        }
    }
}

fn check_batch(batch: &ArrayView4<f32>, p: &Preprocess) -> Result<()> {
    let s = p.size as usize;
    let sh = batch.shape();
    if sh[1] != 3 || sh[2] != s || sh[3] != s {
        return Err(Error::InvalidArgument {
            name: "batch",
            reason: format!("expected shape [n, 3, {s}, {s}], got {sh:?}"),
        });
    }
    Ok(())
}

/// An exported model run by ONNX Runtime, on a small pool of sessions: an `ort` session needs
/// `&mut` to run, so each is behind its own mutex and concurrent [`Encoder::embed`] calls take
/// whichever is free (one session, the default, serialises them; ONNX Runtime's intra-op threads
/// still parallelise each batch). A server answering many small queries at once is faster with a
/// few sessions of a few threads each than with one session of all cores.
pub struct OrtEncoder {
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
    meta: ModelMeta,
    preprocess: Preprocess,
    path: PathBuf,
}

impl std::fmt::Debug for OrtEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtEncoder").field("path", &self.path).field("meta", &self.meta).finish()
    }
}

impl OrtEncoder {
    /// Loads `model_path` and the `.json` beside it, and checks that the session's input and
    /// output names, element types and static dimensions agree with the description.
    pub fn load(model_path: &Path, opts: &RuntimeOptions) -> Result<Self> {
        Self::load_pool(model_path, opts, 1)
    }

    /// As [`OrtEncoder::load`] with `sessions` (at least 1) sessions of the model, each created
    /// with `opts` (so `opts.threads` is per session).
    pub fn load_pool(model_path: &Path, opts: &RuntimeOptions, sessions: usize) -> Result<Self> {
        if sessions == 0 {
            return Err(Error::InvalidArgument { name: "sessions", reason: "must be at least 1".into() });
        }
        let meta_path = ModelMeta::path_for(model_path);
        let (meta, _) = ModelMeta::read_verified(model_path)?;
        let rt = runtime::init()?;
        let mut pool = Vec::with_capacity(sessions);
        for _ in 0..sessions {
            let session = rt.session_from_file(opts, model_path)?;
            check_outlets(&session, &meta).map_err(|reason| Error::ModelMeta { path: meta_path.clone(), reason })?;
            pool.push(Mutex::new(session));
        }
        tracing::info!(model = %model_path.display(), arch = %meta.arch, dim = meta.output.dim, digest = %meta.digest, sessions, "loaded encoder");
        Ok(OrtEncoder {
            preprocess: meta.preprocess(),
            sessions: pool,
            next: AtomicUsize::new(0),
            meta,
            path: model_path.to_path_buf(),
        })
    }

    /// Sessions in the pool.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// A free session if there is one (trying from a rotating start), else waits for one.
    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        let n = self.sessions.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            match self.sessions[(start + i) % n].try_lock() {
                Ok(s) => return s,
                Err(TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        self.sessions[start].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The model's description.
    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }
}

/// Checks one outlet: f32 tensor of the given rank whose static dims match `want` (None = any).
fn check_tensor(kind: &str, name: &str, dtype: &ValueType, want: &[Option<i64>]) -> std::result::Result<(), String> {
    let ValueType::Tensor { ty, shape, .. } = dtype else {
        return Err(format!("{kind} `{name}` is not a tensor"));
    };
    if *ty != TensorElementType::Float32 {
        return Err(format!("{kind} `{name}` is {ty:?}, expected float32"));
    }
    if shape.len() != want.len() {
        return Err(format!("{kind} `{name}` has rank {}, expected {}", shape.len(), want.len()));
    }
    for (i, (have, want)) in shape.iter().zip(want).enumerate() {
        if let Some(w) = want
            && *have >= 0
            && have != w
        {
            return Err(format!("{kind} `{name}` dimension {i} is {have}, the description says {w}"));
        }
    }
    Ok(())
}

fn check_outlets(session: &Session, meta: &ModelMeta) -> std::result::Result<(), String> {
    let inputs = session.inputs();
    let names = |o: &[ort::value::Outlet]| o.iter().map(|o| o.name().to_string()).collect::<Vec<_>>().join(", ");
    if inputs.len() != 1 {
        return Err(format!("the model has inputs [{}], expected exactly one", names(inputs)));
    }
    let input = &inputs[0];
    if input.name() != meta.input.name {
        return Err(format!("the model's input is `{}`, the description says `{}`", input.name(), meta.input.name));
    }
    let s = meta.input.size as i64;
    check_tensor("input", input.name(), input.dtype(), &[None, Some(3), Some(s), Some(s)])?;
    let outputs = session.outputs();
    let output = outputs.iter().find(|o| o.name() == meta.output.name).ok_or_else(|| {
        format!("the model has outputs [{}], the description names `{}`", names(outputs), meta.output.name)
    })?;
    check_tensor("output", output.name(), output.dtype(), &[None, Some(meta.output.dim as i64)])
}

impl Encoder for OrtEncoder {
    fn dim(&self) -> usize {
        self.meta.output.dim
    }

    fn digest(&self) -> &str {
        &self.meta.digest
    }

    fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    fn embed(&self, batch: ArrayView4<f32>) -> Result<Array2<f32>> {
        check_batch(&batch, &self.preprocess)?;
        let n = batch.shape()[0];
        if n == 0 {
            return Ok(Array2::zeros((0, self.dim())));
        }
        let contiguous = batch.as_standard_layout();
        let input = TensorRef::from_array_view(&contiguous).map_err(|e| Error::ort("wrapping the input batch", e))?;
        let mut session = self.session();
        let outputs = session
            .run(ort::inputs![self.meta.input.name.as_str() => input])
            .map_err(|e| Error::ort(format!("running {}", self.path.display()), e))?;
        let out = outputs[self.meta.output.name.as_str()]
            .try_extract_array::<f32>()
            .map_err(|e| Error::ort("reading the embeddings", e))?;
        if out.shape() != [n, self.dim()] {
            return Err(Error::ort(
                "reading the embeddings",
                format!("output shape {:?}, expected [{n}, {}]", out.shape(), self.dim()),
            ));
        }
        let mut rows = out.into_dimensionality::<ndarray::Ix2>().expect("rank checked").to_owned();
        l2_normalize_rows(&mut rows);
        Ok(rows)
    }
}

/// A deterministic encoder for tests and benchmarks: average-pools each channel over a
/// `POOL`×`POOL` grid, appends a constant 1 (so no image maps to zero), multiplies by a fixed
/// Gaussian matrix drawn from `seed`, and L2-normalises. Nearby pixel averages give nearby vectors.
#[derive(Debug, Clone)]
pub struct TestEncoder {
    dim: usize,
    digest: String,
    preprocess: Preprocess,
    projection: Array2<f32>,
}

impl TestEncoder {
    /// Grid cells per side of the average pooling.
    pub const POOL: usize = 4;
    /// Input side in pixels.
    pub const SIZE: u32 = 16;

    /// A test encoder of width `dim` whose projection is drawn from `seed`.
    pub fn new(dim: usize, seed: u64) -> Self {
        let features = 3 * Self::POOL * Self::POOL + 1;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let projection = Array2::from_shape_fn((features, dim), |_| standard_normal(&mut rng));
        TestEncoder {
            dim,
            digest: format!("test-encoder-dim{dim}-seed{seed}"),
            preprocess: Preprocess { size: Self::SIZE, mean: [0.5; 3], std: [0.25; 3] },
            projection,
        }
    }

    /// The pooled features of one CHW image, with the trailing constant.
    fn features(&self, img: ndarray::ArrayView3<f32>) -> Vec<f32> {
        let (p, s) = (Self::POOL, img.shape()[1]);
        let mut f = Vec::with_capacity(3 * p * p + 1);
        for c in 0..3 {
            for gy in 0..p {
                for gx in 0..p {
                    let (y0, y1, x0, x1) = (gy * s / p, (gy + 1) * s / p, gx * s / p, (gx + 1) * s / p);
                    let cell = img.slice(ndarray::s![c, y0..y1, x0..x1]);
                    f.push(cell.sum() / cell.len().max(1) as f32);
                }
            }
        }
        f.push(1.0);
        f
    }
}

impl Encoder for TestEncoder {
    fn dim(&self) -> usize {
        self.dim
    }

    fn digest(&self) -> &str {
        &self.digest
    }

    fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    fn embed(&self, batch: ArrayView4<f32>) -> Result<Array2<f32>> {
        check_batch(&batch, &self.preprocess)?;
        let mut out = Array2::zeros((batch.shape()[0], self.dim));
        for (img, mut row) in batch.axis_iter(Axis(0)).zip(out.axis_iter_mut(Axis(0))) {
            let f = ndarray::Array1::from(self.features(img));
            row.assign(&f.dot(&self.projection));
        }
        l2_normalize_rows(&mut out);
        Ok(out)
    }
}

/// A standard normal sample by Box–Muller (keeps us off an extra distributions crate).
mod rand_distr_free {
    use rand::Rng;

    pub fn standard_normal(rng: &mut impl Rng) -> f32 {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::proto::{
        GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
        ValueInfoProto, tensor_shape_proto, type_proto,
    };
    use ndarray::Array4;
    use prost::Message;
    use rand::Rng;

    const F32: i32 = 1; // TensorProto.DataType.FLOAT

    fn value_info(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
        let dim = dims
            .iter()
            .map(|d| tensor_shape_proto::Dimension {
                value: Some(match d {
                    Some(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                    None => tensor_shape_proto::dimension::Value::DimParam("batch".into()),
                }),
                ..Default::default()
            })
            .collect();
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(F32),
                    shape: Some(TensorShapeProto { dim }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            name: Some(format!("{op}_{output}")),
            ..Default::default()
        }
    }

    /// images [n,3,s,s] -> GlobalAveragePool -> Flatten -> MatMul(w [3, dim]) -> embeddings.
    fn pooled_projection_model(size: i64, w: &Array2<f32>) -> Vec<u8> {
        let dim = w.shape()[1] as i64;
        let graph = GraphProto {
            name: Some("pooled-projection".into()),
            node: vec![
                node("GlobalAveragePool", &["images"], "pooled"),
                node("Flatten", &["pooled"], "flat"),
                node("MatMul", &["flat", "w"], "embeddings"),
            ],
            initializer: vec![TensorProto {
                name: Some("w".into()),
                dims: vec![3, dim],
                data_type: Some(F32),
                float_data: w.iter().copied().collect(),
                ..Default::default()
            }],
            input: vec![value_info("images", &[None, Some(3), Some(size), Some(size)])],
            output: vec![value_info("embeddings", &[None, Some(dim)])],
            ..Default::default()
        };
        let model = ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
            producer_name: Some("hiercon-test".into()),
            graph: Some(graph),
            ..Default::default()
        };
        model.encode_to_vec()
    }

    fn meta(size: u32, dim: usize) -> ModelMeta {
        ModelMeta {
            format: MODEL_FORMAT.into(),
            arch: "pooled-projection".into(),
            input: InputMeta { name: "images".into(), size, mean: [0.5; 3], std: [0.25; 3] },
            output: OutputMeta { name: "embeddings".into(), dim },
            digest: "00ff".into(),
            extra: Default::default(),
        }
    }

    /// Writes the model and `meta` with the model's real digest.
    fn write_model(dir: &Path, size: u32, w: &Array2<f32>, meta: &ModelMeta) -> PathBuf {
        let path = dir.join("model.onnx");
        let bytes = pooled_projection_model(size as i64, w);
        std::fs::write(&path, &bytes).unwrap();
        let meta = ModelMeta { digest: crate::modelfile::model_digest(&path, &bytes).unwrap(), ..meta.clone() };
        meta.write(&ModelMeta::path_for(&path)).unwrap();
        path
    }

    fn random_batch(n: usize, size: usize, seed: u64) -> Array4<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Array4::from_shape_fn((n, 3, size, size), |_| rng.random_range(-2.0..2.0))
    }

    #[test]
    fn ort_encoder_matches_plain_rust_pooled_projection() {
        let (size, dim) = (8usize, 5usize);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let w = Array2::from_shape_fn((3, dim), |_| rng.random_range(-1.0f32..1.0));
        let dir = tempfile::tempdir().unwrap();
        let path = write_model(dir.path(), size as u32, &w, &meta(size as u32, dim));
        let enc = OrtEncoder::load(&path, &RuntimeOptions::default()).expect("model loads");
        assert_eq!(enc.dim(), dim);
        assert_eq!(enc.digest().len(), 64, "the real sha256 of the initializers");
        let batch = random_batch(3, size, 1);
        let got = enc.embed(batch.view()).unwrap();
        // Reference in f64: channel means, times w, divided by the norm.
        for b in 0..3 {
            let means: Vec<f64> = (0..3)
                .map(|c| {
                    batch.slice(ndarray::s![b, c, .., ..]).iter().map(|&v| v as f64).sum::<f64>() / (size * size) as f64
                })
                .collect();
            let e: Vec<f64> = (0..dim).map(|j| (0..3).map(|c| means[c] * w[[c, j]] as f64).sum()).collect();
            let norm = e.iter().map(|v| v * v).sum::<f64>().sqrt();
            for j in 0..dim {
                let want = e[j] / norm;
                assert!((got[[b, j]] as f64 - want).abs() < 1e-5, "row {b} col {j}: {} vs {want}", got[[b, j]]);
            }
        }
        // Empty batches and wrong shapes.
        assert_eq!(enc.embed(Array4::zeros((0, 3, size, size)).view()).unwrap().shape(), [0, dim]);
        assert!(enc.embed(Array4::zeros((1, 3, size + 1, size)).view()).is_err());
    }

    #[test]
    fn a_session_pool_gives_the_same_embeddings_under_concurrent_calls() {
        let (size, dim) = (8usize, 4usize);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let w = Array2::from_shape_fn((3, dim), |_| rng.random_range(-1.0f32..1.0));
        let dir = tempfile::tempdir().unwrap();
        let path = write_model(dir.path(), size as u32, &w, &meta(size as u32, dim));
        let one = OrtEncoder::load(&path, &RuntimeOptions::default()).unwrap();
        let pool = OrtEncoder::load_pool(&path, &RuntimeOptions { threads: 1, ..Default::default() }, 3).unwrap();
        assert_eq!((one.sessions(), pool.sessions()), (1, 3));
        assert!(OrtEncoder::load_pool(&path, &RuntimeOptions::default(), 0).is_err());
        let batches: Vec<Array4<f32>> = (0..8).map(|i| random_batch(2, size, 100 + i)).collect();
        let want: Vec<Array2<f32>> = batches.iter().map(|b| one.embed(b.view()).unwrap()).collect();
        std::thread::scope(|s| {
            for _ in 0..6 {
                s.spawn(|| {
                    for _ in 0..5 {
                        for (b, w) in batches.iter().zip(&want) {
                            let got = pool.embed(b.view()).unwrap();
                            let diff = (&got - w).iter().fold(0f32, |m, v| m.max(v.abs()));
                            assert!(diff < 1e-6, "max |diff| {diff}");
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn ort_encoder_rejects_a_description_that_disagrees_with_the_graph() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let w = Array2::from_shape_fn((3, 4), |_| rng.random_range(-1.0f32..1.0));
        type Edit = Box<dyn Fn(&mut ModelMeta)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|m| m.input.name = "pixels".into()), "input"),
            (Box::new(|m| m.output.name = "features".into()), "features"),
            (Box::new(|m| m.output.dim = 7), "dimension 1"),
            (Box::new(|m| m.input.size = 9), "dimension 2"),
            (Box::new(|m| m.format = "other/1".into()), "format"),
        ];
        for (edit, needle) in cases {
            let dir = tempfile::tempdir().unwrap();
            let mut m = meta(8, 4);
            let path = write_model(dir.path(), 8, &w, &m);
            m.digest = ModelMeta::read(&ModelMeta::path_for(&path)).unwrap().digest;
            edit(&mut m);
            m.write(&ModelMeta::path_for(&path)).unwrap();
            let err = OrtEncoder::load(&path, &RuntimeOptions::default()).expect_err(needle).to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lonely.onnx");
        std::fs::write(&path, pooled_projection_model(8, &w)).unwrap();
        assert!(matches!(OrtEncoder::load(&path, &RuntimeOptions::default()), Err(Error::Io { .. })));
    }

    #[test]
    fn a_description_of_another_model_is_refused_with_what_to_do() {
        // Two models of the same shape; model A's description beside model B's weights.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let (wa, wb) = (
            Array2::from_shape_fn((3, 4), |_| rng.random_range(-1.0f32..1.0)),
            Array2::from_shape_fn((3, 4), |_| rng.random_range(-1.0f32..1.0)),
        );
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = write_model(da.path(), 8, &wa, &meta(8, 4));
        let b = write_model(db.path(), 8, &wb, &meta(8, 4));
        assert!(OrtEncoder::load(&a, &RuntimeOptions::default()).is_ok());
        std::fs::copy(ModelMeta::path_for(&a), ModelMeta::path_for(&b)).unwrap();
        let err = OrtEncoder::load(&b, &RuntimeOptions::default()).unwrap_err();
        assert!(matches!(err, Error::ModelDigestMismatch { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("does not belong to") && text.contains("re-export both"), "{text}");
    }

    #[test]
    fn model_meta_keeps_extra_fields() {
        let text = r#"{"format":"hiercon-model/1","arch":"a","input":{"name":"i","size":4,"mean":[0,0,0],"std":[1,1,1]},
            "output":{"name":"o","dim":2},"digest":"ab","loss":"hmce"}"#;
        let m: ModelMeta = serde_json::from_str(text).unwrap();
        assert_eq!(m.extra["loss"], "hmce");
        assert!(m.validate().is_ok());
    }

    #[test]
    fn test_encoder_is_deterministic_normalised_and_smooth() {
        let s = TestEncoder::SIZE as usize;
        let a = TestEncoder::new(16, 1);
        let batch = random_batch(4, s, 2);
        let e1 = a.embed(batch.view()).unwrap();
        let e2 = TestEncoder::new(16, 1).embed(batch.view()).unwrap();
        assert_eq!(e1, e2);
        assert_ne!(e1, TestEncoder::new(16, 2).embed(batch.view()).unwrap());
        for row in e1.rows() {
            assert!((row.dot(&row) - 1.0).abs() < 1e-5);
        }
        // A slightly perturbed image is closer to its original than another random image is.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let noisy = &batch + &Array4::from_shape_fn(batch.raw_dim(), |_| rng.random_range(-0.05f32..0.05));
        let en = a.embed(noisy.view()).unwrap();
        for i in 0..4 {
            let near = e1.row(i).dot(&en.row(i));
            let far = e1.row(i).dot(&e1.row((i + 1) % 4));
            assert!(near > 0.99 && near > far, "image {i}: near {near}, far {far}");
        }
    }

    #[test]
    fn l2_normalize_rows_matches_f64() {
        let mut a = Array2::from_shape_vec((3, 2), vec![3.0f32, 4.0, 0.0, 0.0, -1e-3, 2e-3]).unwrap();
        let want: Vec<f64> = vec![0.6, 0.8, 0.0, 0.0, -1.0 / 5f64.sqrt(), 2.0 / 5f64.sqrt()];
        l2_normalize_rows(&mut a);
        for (g, w) in a.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{g} vs {w}");
        }
    }
}
