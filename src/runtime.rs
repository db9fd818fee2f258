//! ONNX Runtime: find and load the shared library once, check its version, build sessions
//! with the chosen execution provider (CPU or CUDA) and thread count.
//!
//! The library is looked up in this order: `ORT_DYLIB_PATH`; the project's vendored copy
//! (`.ort/lib/libonnxruntime.so.1.31.1`, written by `make ort`) next to the working directory,
//! above the running executable, or in the source tree this crate was built from. Anything else
//! is an [`Error::OrtNotFound`] that says what to run.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};

use crate::{Error, Result};

/// The ONNX Runtime release hiercon is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";
/// File name of the vendored library inside `.ort/lib/`.
pub const ORT_LIB_NAME: &str = "libonnxruntime.so.1.31.1";

/// Where inference and training graphs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// ONNX Runtime's CPU execution provider.
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA execution provider (build with `--features cuda`, `make ort-gpu`).
    Cuda,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

/// How sessions are created: device and CPU threads (0 = ONNX Runtime's default, one per core).
#[derive(Debug, Clone, Copy, Default)]
pub struct RuntimeOptions {
    pub device: Device,
    pub threads: usize,
    /// CPU training steps: write dense convolutions on ORT's NCHWc kernels
    /// (`graph::GradOptions::cpu_nchwc`; not standard ONNX, so off by default).
    pub cpu_nchwc: bool,
    /// ONNX Runtime's worker threads sleep when a call ends instead of spinning for more work:
    /// the cores go to whatever runs beside the model (image preparation while indexing).
    pub no_spinning: bool,
}

/// The loaded library: where it came from and its version.
#[derive(Debug)]
pub struct Runtime {
    pub path: PathBuf,
    pub version: String,
    environment: Environment,
}

static RUNTIME: OnceLock<std::result::Result<Runtime, String>> = OnceLock::new();

/// The machine benchmarks ran on, for their reports: the CPU model (from `/proc/cpuinfo`) and
/// the number of cores this process may use.
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// Candidate locations of the library, in search order, each with where it came from.
pub fn library_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
        // An explicit path is the only candidate: never silently use another library.
        return out;
    }
    let rel = Path::new(".ort").join("lib").join(ORT_LIB_NAME);
    if let Ok(cwd) = std::env::current_dir() {
        out.push(cwd.join(&rel));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            out.push(dir.join(&rel));
        }
    }
    out.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(&rel));
    out.dedup();
    out
}

/// Finds the library file without loading it.
pub fn locate_library() -> Result<PathBuf> {
    let candidates = library_candidates();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let searched = if std::env::var_os("ORT_DYLIB_PATH").is_some_and(|p| !p.is_empty()) {
        format!("ORT_DYLIB_PATH={} does not exist", candidates[0].display())
    } else {
        format!(
            "ORT_DYLIB_PATH is not set and none of {} exists",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    };
    Err(Error::OrtNotFound { searched, expected: ORT_VERSION })
}

/// Loads the library (once per process) and returns it. Later calls return the same runtime.
pub fn init() -> Result<&'static Runtime> {
    let loaded = RUNTIME.get_or_init(|| load().map_err(|e| e.to_string()));
    // The first failure is kept as text (`Error` is not `Clone`) and repeated word for word.
    loaded.as_ref().map_err(|msg| Error::OrtUnavailable { reason: msg.clone() })
}

fn load() -> Result<Runtime> {
    let path = locate_library()?;
    let version = library_version(&path)?;
    if !version_matches(&version) {
        return Err(Error::OrtVersion { path, found: version, expected: ORT_VERSION });
    }
    let builder = ort::init_from(&path).map_err(|e| Error::OrtLoad { path: path.clone(), reason: e.to_string() })?;
    let environment = builder
        .with_name("hiercon")
        .build()
        .map_err(|e| Error::OrtLoad { path: path.clone(), reason: e.to_string() })?;
    tracing::debug!(path = %path.display(), %version, "loaded ONNX Runtime");
    Ok(Runtime { path, version, environment })
}

/// Same major.minor as [`ORT_VERSION`]; patch releases are compatible.
fn version_matches(found: &str) -> bool {
    let mm = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
    mm(found) == mm(ORT_VERSION)
}

/// Reads the library's own version string (`OrtGetApiBase()->GetVersionString()`) before ort
/// takes the library over, so a wrong version is reported as such rather than as a crash.
fn library_version(path: &Path) -> Result<String> {
    let fail = |reason: String| Error::OrtLoad { path: path.to_path_buf(), reason };
    // SAFETY: loading a shared library runs its initialisers; this is the ONNX Runtime library
    // the user pointed us at, which is what we are about to load anyway.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| fail(e.to_string()))?;
    // SAFETY: `OrtGetApiBase` has this signature in every ONNX Runtime release.
    let get_base: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
        unsafe { lib.get(b"OrtGetApiBase") }
            .map_err(|_| fail("does not export OrtGetApiBase: not an ONNX Runtime library".into()))?;
    // SAFETY: the API base is a static struct inside the library; the version string is a static C string.
    let version = unsafe {
        let base = get_base();
        if base.is_null() {
            return Err(fail("OrtGetApiBase returned null".into()));
        }
        let s = ((*base).GetVersionString)();
        std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned()
    };
    Ok(version)
}

impl Runtime {
    /// A session builder on this runtime with the device's execution provider registered and
    /// the thread count applied. Asking for CUDA where it cannot load is an error, never a
    /// silent fall-back to CPU.
    pub fn session_builder(&self, opts: &RuntimeOptions) -> Result<SessionBuilder> {
        let mut b = Session::builder(&self.environment).map_err(|e| Error::ort("creating session options", e))?;
        b = b
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| Error::ort("setting optimization level", e))?;
        if opts.threads > 0 {
            b = b.with_intra_threads(opts.threads).map_err(|e| Error::ort("setting intra-op threads", e))?;
        }
        if opts.no_spinning {
            b = b.with_intra_op_spinning(false).map_err(|e| Error::ort("turning off intra-op spinning", e))?;
            b = b.with_inter_op_spinning(false).map_err(|e| Error::ort("turning off inter-op spinning", e))?;
        }
        match opts.device {
            Device::Cpu => Ok(b),
            Device::Cuda => register_cuda(b),
        }
    }

    /// Builds a session from an in-memory ONNX model.
    pub fn session_from_bytes(&self, opts: &RuntimeOptions, model: &[u8]) -> Result<Session> {
        self.session_builder(opts)?.commit_from_memory(model).map_err(|e| Error::ort("loading model", e))
    }

    /// Builds a session from an ONNX file.
    pub fn session_from_file(&self, opts: &RuntimeOptions, path: &Path) -> Result<Session> {
        if !path.is_file() {
            return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "model file not found")));
        }
        self.session_builder(opts)?
            .commit_from_file(path)
            .map_err(|e| Error::ort(format!("loading model {}", path.display()), e))
    }
}

#[cfg(feature = "cuda")]
fn register_cuda(mut b: SessionBuilder) -> Result<SessionBuilder> {
    use ort::ep::ExecutionProvider;
    let cuda = ort::ep::CUDA::default();
    cuda.register(&mut b).map_err(|e| Error::ProviderUnavailable {
        provider: "cuda",
        reason: format!(
            "{e}. The CUDA provider needs `make ort-gpu` (onnxruntime-gpu {ORT_VERSION}), CUDA 13 and cuDNN 9 on \
             the library path"
        ),
    })?;
    Ok(b)
}

#[cfg(not(feature = "cuda"))]
fn register_cuda(_b: SessionBuilder) -> Result<SessionBuilder> {
    Err(Error::ProviderUnavailable {
        provider: "cuda",
        reason:
            "this hiercon was built without the `cuda` feature; rebuild with `cargo build --release --features cuda` \
                 and fetch the GPU library with `make ort-gpu`"
                .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_match_ignores_patch() {
        assert!(version_matches("1.31.1"));
        assert!(version_matches("1.31.0"));
        assert!(!version_matches("1.30.1"));
        assert!(!version_matches("1.3.1"));
    }

    #[test]
    fn loads_the_vendored_library_and_runs_on_cpu() {
        let rt = init().expect("ONNX Runtime should load (run `make ort`)");
        assert!(version_matches(&rt.version), "loaded {}", rt.version);
        let b = rt.session_builder(&RuntimeOptions { device: Device::Cpu, threads: 1, ..Default::default() });
        assert!(b.is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let rt = init().expect("ONNX Runtime should load");
        let err = rt
            .session_builder(&RuntimeOptions { device: Device::Cuda, ..Default::default() })
            .err()
            .expect("must fail");
        let msg = err.to_string();
        assert!(msg.contains("cuda") && msg.contains("--features cuda"), "{msg}");
    }
}
