//! The admin HTTP port every stage exposes: `/healthz` (the process is
//! alive), `/readyz` (it can do its job now; 503 with the reason otherwise,
//! mirrored in the `vidpulse_stage_ready` gauge) and `/metrics` (Prometheus
//! text).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

pub use crate::health::Health;

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
    let (ready, text) = s.health.report();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, text)
}

async fn metrics(State(s): State<AppState>) -> String {
    s.metrics.run_upkeep();
    s.metrics.render()
}
