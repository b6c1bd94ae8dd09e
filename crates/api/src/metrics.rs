//! Metric names of the API (Prometheus, on `/metrics` next to the shared
//! ones). The pool follower also exports the monitor's pool gauges
//! (`vidpulse_monitor_pool_ids`, …) for the pools it holds.

/// Requests answered. Labels: `route` (the route template), `status`.
pub const REQUESTS: &str = "vidpulse_api_requests_total";
/// Time to answer a request (to the first byte of a live stream).
/// Labels: `route`.
pub const REQUEST_SECONDS: &str = "vidpulse_api_request_seconds";
/// Requests refused before any work. Labels: `reason` (`busy`,
/// `live_clients`).
pub const REJECTED: &str = "vidpulse_api_rejected_total";
/// Backend calls that failed. Labels: `backend` (`clickhouse`, `redis`,
/// `timeout`).
pub const BACKEND_ERRORS: &str = "vidpulse_api_backend_errors_total";
/// Open `/api/live` streams.
pub const LIVE_CLIENTS: &str = "vidpulse_api_live_clients";
/// Time to build one live snapshot (every panel's queries).
pub const LIVE_BUILD_SECONDS: &str = "vidpulse_api_live_build_seconds";
/// Time to build one live panel (its queries, run beside the other panels').
/// Labels: `panel`.
pub const LIVE_PANEL_SECONDS: &str = "vidpulse_api_live_panel_seconds";
/// Live panels whose query failed, per build. Labels: `panel`.
pub const LIVE_PANEL_ERRORS: &str = "vidpulse_api_live_panel_errors_total";
