//! Metric names (Prometheus) shared by the stages, and the recorder setup.
//! Every stage counts records received, produced and dead-lettered (by
//! reason), and exposes consumer lag per partition.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Data records read from an input topic (in-band watermark records are
/// not counted here). Labels: `stage`, `topic`.
pub const RECORDS_RECEIVED: &str = "vidpulse_records_received_total";
/// Records produced and acknowledged. Labels: `stage`, `topic`.
pub const RECORDS_PRODUCED: &str = "vidpulse_records_produced_total";
/// Records sent to the dead-letter topic. Labels: `stage`, `reason`.
pub const RECORDS_DLQ: &str = "vidpulse_records_dlq_total";
/// Records deliberately not forwarded. Labels: `stage`, `reason`.
pub const RECORDS_DROPPED: &str = "vidpulse_records_dropped_total";
/// Records whose produce failed for good. Labels: `stage`.
pub const PRODUCE_FAILED: &str = "vidpulse_produce_failed_total";
/// Inputs read but not yet fully acknowledged downstream. Labels: `stage`.
pub const IN_FLIGHT: &str = "vidpulse_records_in_flight";
/// Consumer lag (records) per partition, from librdkafka statistics.
/// Labels: `stage`, `topic`, `partition`.
pub const CONSUMER_LAG: &str = "vidpulse_consumer_lag";
/// Offset commits that failed. Labels: `stage`.
pub const COMMIT_FAILED: &str = "vidpulse_commit_failed_total";
/// Failed calls to a dependency that were retried. Labels: `component`
/// (kafka, redis, clickhouse, checkpoints).
pub const RETRIES: &str = "vidpulse_retries_total";
/// Sink write failures (each retry counts). Labels: `stage`, `sink`.
pub const SINK_ERRORS: &str = "vidpulse_sink_errors_total";
/// Sink write latency in seconds. Labels: `stage`.
pub const SINK_LATENCY: &str = "vidpulse_sink_write_seconds";
/// Input partitions this instance was given by a group rebalance, and
/// those taken from it (every rebalance revokes all of an instance's
/// partitions first: the eager protocol). A static member restarted under
/// its own name is handed its partitions back without either moving on the
/// other instances. Labels: `stage`.
pub const PARTITIONS_ASSIGNED: &str = "vidpulse_partitions_assigned_total";
pub const PARTITIONS_REVOKED: &str = "vidpulse_partitions_revoked_total";
/// 1 while the stage's `/readyz` answers 200, else 0 (alerts on not-ready
/// stages). No labels: Prometheus' `job` and `instance` name the stage.
pub const STAGE_READY: &str = "vidpulse_stage_ready";

/// Installs the recorder and registers stage `stage`'s failure counters at
/// 0, so that dashboards and alerts see a series before the first failure
/// (and `increase()` counts that first one). Call at start.
pub fn register_stage(stage: &'static str) {
    install();
    for name in [
        PRODUCE_FAILED,
        COMMIT_FAILED,
        PARTITIONS_ASSIGNED,
        PARTITIONS_REVOKED,
    ] {
        metrics::counter!(name, "stage" => stage).increment(0);
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(h) => h,
            // A recorder is already installed (tests running several stages in
            // one process): render from a detached one instead of failing.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        })
        .clone()
}
