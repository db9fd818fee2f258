//! `hiercon serve`: the HTTP API (axum) over `search::Service`, and the web page in `web/`.
//!
//! - [`router`]: the route table ([`router::router`]), the admin-key check, request metrics, the page;
//! - [`handlers`]: parse and check input, run decoding + inference + search on the blocking pool;
//! - [`dto`]: wire types (the OpenAPI document is generated from them, [`openapi`]);
//! - [`error`]: `{"error": {"code", "message"}}` and the one mapping from library errors to statuses;
//! - [`state`]: configuration, the live service, reloads; [`metrics`]: Prometheus text;
//! - [`load`]: a small HTTP/1.1 client and the load generator behind `hiercon bench-load`.
//!
//! [`Server`] binds, loads the live generation (or starts not ready when there is none yet and
//! picks it up later), watches for new generations (`POST /v1/admin/reload`, SIGHUP, a poll of
//! `CURRENT`) and shuts down gracefully: in-flight requests finish, new connections are refused.

pub mod dto;
pub mod error;
pub mod handlers;
pub mod load;
pub mod metrics;
pub mod openapi;
pub mod router;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;

pub use router::router;
pub use state::{AppState, EncoderSource, MilvusTarget, ServeConfig};

use crate::{Error, Result};

/// A bound, loaded server, ready to [`Server::run`].
pub struct Server {
    listener: tokio::net::TcpListener,
    state: AppState,
}

impl Server {
    /// Validates `config`, loads the live generation and binds the address (port 0 picks a free
    /// one; see [`Server::local_addr`]). An index without a live generation yet is not an error:
    /// the server starts not ready and loads it when one appears. Any other load failure is.
    pub async fn bind(config: ServeConfig) -> Result<Server> {
        config.validate()?;
        let addr = config.addr;
        let state = AppState::new(config);
        let s = state.clone();
        match tokio::task::spawn_blocking(move || s.reload())
            .await
            .map_err(|e| Error::HttpServe { reason: format!("loading the index: {e}") })?
        {
            Ok(r) => tracing::info!(generation = %r.current, "index loaded"),
            Err(Error::NoLiveGeneration { path }) => {
                tracing::warn!(index = %path.display(), "no live generation yet: not ready until one appears")
            }
            // Milvus down, or its alias not written yet: not ready until the poll finds it.
            Err(e @ (Error::MilvusUnavailable { .. } | Error::MilvusCollection { .. })) => {
                tracing::warn!(error = %e, "Milvus not serving this alias yet: not ready until it does")
            }
            Err(e) => return Err(e),
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::HttpBind { addr: addr.to_string(), source })?;
        Ok(Server { listener, state })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().map_err(|e| Error::HttpServe { reason: format!("local address: {e}") })
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let watchers = spawn_watchers(&self.state);
        let app = router(self.state.clone());
        tracing::info!(addr = %self.local_addr()?, "serving");
        let served = axum::serve(self.listener, app).with_graceful_shutdown(shutdown).await;
        for w in watchers {
            w.abort();
        }
        tracing::info!("server stopped");
        served.map_err(|e| Error::HttpServe { reason: e.to_string() })
    }
}

/// Reloads on SIGHUP (forced) and, if configured, whenever `CURRENT` names another generation.
fn spawn_watchers(state: &AppState) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(every) = state.config.poll {
        let s = state.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let s = s.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if s.current_changed() {
                        let _ = s.reload();
                    }
                })
                .await;
            }
        }));
    }
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                let s = state.clone();
                tasks.push(tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP: reloading");
                        let s = s.clone();
                        let _ = tokio::task::spawn_blocking(move || s.reload()).await;
                    }
                }));
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /v1/admin/reload"),
        }
    }
    tasks
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
