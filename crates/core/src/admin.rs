//! The admin HTTP port every stage exposes: `/healthz` (the process is
//! alive), `/readyz` (it can do its job now; 503 with the reason otherwise,
//! mirrored in the `vidpulse_stage_ready` gauge) and `/metrics` (Prometheus
//! text).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

/// Readiness shared between a stage and its admin server.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Mutex<Option<String>>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Starts not ready ("starting").
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Some("starting".into()))),
        }
    }

    pub fn set_ready(&self) {
        if let Ok(mut g) = self.inner.lock() {
            *g = None;
        }
        self.publish();
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        if let Ok(mut g) = self.inner.lock() {
            *g = Some(reason.into());
        }
        self.publish();
    }

    /// Mirrors readiness into the `vidpulse_stage_ready` gauge.
    fn publish(&self) {
        let ready = self.not_ready_reason().is_none();
        metrics::gauge!(crate::metrics::STAGE_READY).set(if ready { 1.0 } else { 0.0 });
    }

    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self) -> Option<String> {
        self.inner
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|_| Some("poisoned".into()))
    }
}

#[derive(Clone)]
struct AppState {
    health: Health,
    metrics: PrometheusHandle,
}

/// Binds the admin server; returns the bound address (useful with port 0)
/// and serves until `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let state = AppState {
        metrics: crate::metrics::install(),
        health,
    };
    // The recorder exists now: export the readiness set before it.
    state.health.publish();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "Admin HTTP listening.");
    tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(error) = server.await {
            tracing::error!(%error, "Admin HTTP server failed.");
        }
    });
    Ok(bound)
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    match s.health.not_ready_reason() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn metrics(State(s): State<AppState>) -> String {
    s.metrics.run_upkeep();
    s.metrics.render()
}
