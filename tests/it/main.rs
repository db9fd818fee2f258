//! hiercon's integration tests, one binary (one link step): each module covers one subsystem
//! through the public library API and, where it matters, the real `hiercon` binary.

mod catalogue;
mod eval;
mod fuzz;
mod http;
mod imported;
mod index;
mod logs;
mod loss;
mod milvus;
mod pretrained;
mod quantize;
mod serve;
mod train;

/// The venv Python named by `HIERCON_PYTHON` (set by `make test`), else `.cache/venv`'s.
fn python() -> std::path::PathBuf {
    match std::env::var_os("HIERCON_PYTHON").filter(|p| !p.is_empty()) {
        Some(p) => std::path::PathBuf::from(p),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/venv/bin/python"),
    }
}
