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

    #[error("ONNX Runtime library at {path} could not be loaded: {reason}")]
    OrtLoad { path: PathBuf, reason: String },

    #[error("ONNX Runtime at {path} is version {found}, hiercon needs {expected}")]
    OrtVersion { path: PathBuf, found: String, expected: &'static str },

    #[error("execution provider `{provider}` is not available: {reason}")]
    ProviderUnavailable { provider: &'static str, reason: String },

    #[error("ONNX Runtime: {context}: {message}")]
    Ort { context: String, message: String },

    // --- catalogue ------------------------------------------------------------------------------

    // --- image ----------------------------------------------------------------------------------

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

    // --- index / search -------------------------------------------------------------------------

    // --- eval / http ----------------------------------------------------------------------------
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
