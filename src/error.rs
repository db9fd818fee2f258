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

    // --- model / loss / train -------------------------------------------------------------------
    /// A loss input does not have the length its shape implies.
    #[error("loss input `{what}` has {found} values, expected {expected}")]
    LossShape { what: &'static str, expected: usize, found: usize },

    /// A loss option or label table that the chosen loss cannot work with.
    #[error("loss `{loss}`: {reason}")]
    LossConfig { loss: &'static str, reason: String },

    /// The sampler cannot be built from these labels or this configuration.
    #[error("batch sampler: {reason}")]
    SamplerConfig { reason: String },

    /// A saved sampler state does not belong to the labels or the sampler it is resumed with.
    #[error("batch sampler state cannot be resumed: {reason}")]
    SamplerState { reason: String },


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
