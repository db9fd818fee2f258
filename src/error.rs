//! The library's one error type: structured variants, grouped by the module that raises them.
//!
//! Third-party errors (`ort::Error`, `image::ImageError`, ...) are converted at the edge of the
//! module that calls them and never leak upward as-is.

use std::path::PathBuf;

/// Every failure the library reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- general ------------------------------------------------------------------------------
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument { name: &'static str, reason: String },

    // --- runtime (ONNX Runtime loading and sessions) ------------------------------------------
    #[error(
        "ONNX Runtime library not found: {searched}. Run `make ort` (CPU) or `make ort-gpu` (CUDA) in the \
         repository, or set ORT_DYLIB_PATH to a libonnxruntime.so of version {expected}"
    )]
    OrtNotFound { searched: String, expected: &'static str },

    /// A later call after loading failed once: `reason` is the first failure's message.
    #[error("{reason}")]
    OrtUnavailable { reason: String },

    #[error("ONNX Runtime library at {path} could not be loaded: {reason}")]
    OrtLoad { path: PathBuf, reason: String },

    #[error("ONNX Runtime at {path} is version {found}, hiercon needs {expected}")]
    OrtVersion { path: PathBuf, found: String, expected: &'static str },

    #[error("execution provider `{provider}` is not available: {reason}")]
    ProviderUnavailable { provider: &'static str, reason: String },

    #[error("ONNX Runtime: {context}: {message}")]
    Ort { context: String, message: String },

    // --- catalogue ------------------------------------------------------------------------------
    /// A manifest (JSON Lines) with problems; every problem names its line and field.
    #[error("manifest {path}: {}", crate::catalogue::manifest::describe_issues(.issues))]
    Manifest { path: PathBuf, issues: Vec<crate::catalogue::manifest::LineIssue> },

    /// A source CSV (`hiercon data folder`) with bad rows; every problem names its line and column.
    #[error("CSV {path}: {}", crate::catalogue::manifest::describe_issues(.issues))]
    CsvRows { path: PathBuf, issues: Vec<crate::catalogue::manifest::LineIssue> },

    /// An IDX file (Fashion-MNIST) that is not what it should be.
    #[error("{path}: not a valid IDX file: {problem}")]
    Idx { path: PathBuf, problem: String },

    #[error("{images} holds {n_images} images but {labels} holds {n_labels} labels")]
    IdxMismatch { images: PathBuf, n_images: usize, labels: PathBuf, n_labels: usize },

    /// A source's metadata file that cannot be used (bad JSON, missing package, no images).
    #[error("{path}: {problem}")]
    SourceFormat { path: PathBuf, problem: String },

    #[error("could not write image {path}: {reason}")]
    ImageWrite { path: PathBuf, reason: String },

    // --- image ----------------------------------------------------------------------------------
    #[error("unsupported image format {format}: PNG, JPEG and WebP are accepted")]
    UnsupportedImageFormat { format: String },

    #[error("image could not be decoded: {reason}")]
    ImageDecode { reason: String },

    #[error("image is {bytes} bytes, over the limit of {limit} bytes")]
    ImageTooLarge { bytes: u64, limit: u64 },

    #[error("image is {width}x{height}, over the limit of {limit}")]
    ImageTooManyPixels { width: u32, height: u32, limit: crate::image::PixelLimit },

    // --- graph ----------------------------------------------------------------------------------
    /// A builder was given operands whose shapes do not fit the op; `detail` names both shapes.
    #[error("graph: {op}: {detail}")]
    GraphShape { op: String, detail: String },

    /// A builder was given an operand of the wrong element type.
    #[error("graph: {op}: {detail}")]
    GraphType { op: String, detail: String },

    /// A graph is malformed: duplicate or unknown name, a value from another graph, a missing output.
    #[error("graph: {reason}")]
    GraphInvalid { reason: String },

    /// Autodiff met an op (or an op configuration) it has no gradient rule for.
    #[error("graph: no gradient for {op}: {reason}")]
    GraphNoGradient { op: String, reason: String },

    /// The inputs fed to a compiled graph do not match its declared inputs.
    #[error("graph: input `{name}`: {reason}")]
    GraphFeed { name: String, reason: String },

    // --- model / loss / train -------------------------------------------------------------------
    /// An ONNX model that cannot be imported: `reason` names the node, the op and what is supported.
    #[error("ONNX model {path}: {reason}")]
    OnnxImport { path: PathBuf, reason: String },

    /// A model file and a description that are not a pair: the initializers' digest differs.
    #[error(
        "{model} does not belong to {meta}: its initializers' digest is {found}, the description says {expected}. \
         Keep each .onnx with the .json written with it (re-export both: `hiercon train --resume` on the finished \
         run, `hiercon export`, or `hiercon model describe`; a pair exported before digests covered every \
         initializer: `hiercon model rehash MODEL.onnx`)"
    )]
    ModelDigestMismatch { model: PathBuf, meta: PathBuf, found: String, expected: String },

    /// A model's parameter or buffer is missing or does not fit (export, checkpoint restore).
    #[error("model state `{name}`: {reason}")]
    ModelState { name: String, reason: String },

    /// A pretrained-weights file (PyTorch legacy `.pth` or safetensors) that cannot be read or
    /// does not fit the architecture; `problem` says what was found.
    #[error("pretrained weights {path}: {problem}")]
    Pretrained { path: PathBuf, problem: String },

    /// A training checkpoint that cannot be read or does not fit the step graph.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// Training options that cannot work together or with the data.
    #[error("train: {reason}")]
    TrainConfig { reason: String },

    /// A run cannot be resumed with these options or from these files.
    #[error("train: cannot resume: {reason}")]
    TrainResume { reason: String },

    /// The loss or the parameters became NaN or infinite; nothing after the last checkpoint was saved.
    #[error(
        "train: {what} is not finite at step {step}; stopped. {}",
        match checkpoint {
            Some(p) => format!("The last good checkpoint is {} (resume with --resume and a lower --lr).", p.display()),
            None => "No checkpoint was written yet; lower --lr and start again.".to_string(),
        }
    )]
    TrainDiverged { step: usize, what: String, checkpoint: Option<PathBuf> },

    /// The run was stopped on purpose after a step (testing aid), as if killed.
    #[error("train: halted after step {step} as asked (no checkpoint written for it)")]
    TrainHalted { step: usize },

    /// The frozen-prefix view cache cannot be built or read.
    #[error("view cache {path}: {reason}")]
    ViewCache { path: PathBuf, reason: String },

    /// A loss input does not have the length its shape implies.
    #[error("loss input `{what}` has {found} values, expected {expected}")]
    LossShape { what: &'static str, expected: usize, found: usize },

    /// A loss option or label table that the chosen loss cannot work with.
    #[error("loss `{loss}`: {reason}")]
    LossConfig { loss: &'static str, reason: String },

    /// A loss graph needs at least one sample, one feature dimension and one label column.
    #[error(
        "loss `{loss}`: the batch is empty (N = {n} samples, D = {d} feature dimensions, K = {k} label columns); all must be >= 1"
    )]
    LossEmptyBatch { loss: &'static str, n: usize, d: usize, k: usize },

    /// A hierarchical loss compares label prefixes level by level: it needs K >= 2 columns.
    #[error("loss `{loss}` needs K >= 2 label columns (levels compare the first K-1, K-2, .. columns), got K = {k}")]
    LossTooFewColumns { loss: &'static str, k: usize },

    /// The `ce` baseline was asked for without its number of classes.
    #[error("loss `ce` needs the number of classes C >= 1 (`--classes C`)")]
    LossMissingClasses,

    /// A value given to the loss graph builder has the wrong type or shape.
    #[error("loss graph input `{what}`: expected {expected}, found {found}")]
    LossGraphInput { what: &'static str, expected: String, found: String },

    /// The sampler cannot be built from these labels or this configuration.
    #[error("batch sampler: {reason}")]
    SamplerConfig { reason: String },

    /// A saved sampler state does not belong to the labels or the sampler it is resumed with.
    #[error("batch sampler state cannot be resumed: {reason}")]
    SamplerState { reason: String },

    // --- index / search -------------------------------------------------------------------------
    #[error("{path}: model description: {reason}")]
    ModelMeta { path: PathBuf, reason: String },

    #[error("wrong vector dimension: expected {expected}, got {received}")]
    WrongVectorDimension { expected: usize, received: usize },

    #[error(
        "generation {generation} was built with model digest {generation_digest}, but the encoder has \
         {encoder_digest}; serve it with the model it was built with"
    )]
    ModelMismatch { generation: String, generation_digest: String, encoder_digest: String },

    #[error("index {path}: {reason}")]
    IndexCorrupt { path: PathBuf, reason: String },

    #[error("index {path} has no live generation (no CURRENT): run `hiercon index` first")]
    NoLiveGeneration { path: PathBuf },

    #[error("another `hiercon index` run holds {path}; try again when it has finished")]
    IndexLocked { path: PathBuf },

    #[error("generation {generation} failed verification, CURRENT left unchanged: {reason}")]
    IndexVerification { generation: String, reason: String },

    #[error("nothing to index: {reason}")]
    EmptyIndex { reason: String },
    // --- milvus (the scale-out backend) --------------------------------------------------------
    /// Milvus could not be reached or did not answer in time; worth retrying.
    #[error("Milvus at {address} is unavailable ({op}): {reason}")]
    MilvusUnavailable { address: String, op: &'static str, reason: String },

    /// Milvus answered a call with an error.
    #[error("Milvus {op}: {reason}")]
    Milvus { op: &'static str, reason: String },

    /// A collection that does not hold what hiercon wrote (another schema, missing metadata).
    #[error("Milvus collection {collection}: {reason}")]
    MilvusCollection { collection: String, reason: String },

    // --- eval / http ----------------------------------------------------------------------------
    /// What `eval` was given cannot be evaluated (too few items, no queries, an empty split).
    #[error("eval: {reason}")]
    EvalInput { reason: String },

    /// A run directory or evaluation file `eval --compare` cannot use.
    #[error("{path}: {reason}")]
    EvalRun { path: PathBuf, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    HttpBind {
        addr: String,
        #[source]
        source: std::io::Error,
    },

    #[error("HTTP server: {reason}")]
    HttpServe { reason: String },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// Wraps an `ort::Error` with what we were doing when it happened.
    pub fn ort(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Error::Ort { context: context.into(), message: err.to_string() }
    }
}
