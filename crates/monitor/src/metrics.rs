//! Metric names of the monitor stage (beside the shared ones in
//! `vidpulse_core::metrics`: records received / produced / dropped / DLQ'd,
//! in-flight, consumer lag).

use metrics::gauge;

/// Events that matched at least one pool and were produced. Labels: `pool`
/// (counted once per pool matched).
pub const EVENTS_PASSED: &str = "vidpulse_monitor_events_passed_total";
/// Events that matched no pool.
pub const EVENTS_FILTERED: &str = "vidpulse_monitor_events_filtered_total";
/// Events a bucketed pool could not check because they are not keyed by the
/// pool's field (their id lives in another instance's bucket). Labels: `pool`.
pub const EVENTS_NOT_LOCAL: &str = "vidpulse_monitor_events_not_local_total";
/// Ids loaded, per pool and pool partition. Labels: `pool`, `partition`.
pub const POOL_IDS: &str = "vidpulse_monitor_pool_ids";
/// 1 once a pool partition is loaded up to the end seen at assignment.
/// Labels: `pool`, `partition`.
pub const POOL_LOADED: &str = "vidpulse_monitor_pool_loaded";
/// Seconds it took to load a pool partition. Labels: `pool`, `partition`.
pub const POOL_LOAD_SECONDS: &str = "vidpulse_monitor_pool_load_seconds";
/// Pool records not yet read (high watermark − position). Labels: `pool`,
/// `partition`.
pub const POOL_LAG: &str = "vidpulse_monitor_pool_lag";
/// Events partitions assigned to this instance and waiting for pool data.
pub const PARTITIONS_WAITING: &str = "vidpulse_monitor_partitions_waiting";
/// Enrichment lookups answered by the local cache / by Redis.
pub const CACHE_HITS: &str = "vidpulse_monitor_cache_hits_total";
pub const CACHE_MISSES: &str = "vidpulse_monitor_cache_misses_total";
/// hits / (hits + misses) since start.
pub const CACHE_HIT_RATIO: &str = "vidpulse_monitor_cache_hit_ratio";
/// Redis round-trip time of one pipelined lookup (seconds).
pub const REDIS_SECONDS: &str = "vidpulse_monitor_redis_seconds";
/// Redis lookups that failed (each retry counts).
pub const REDIS_ERRORS: &str = "vidpulse_monitor_redis_errors_total";
/// A dimension the event refers to was not in Redis. Labels: `dim`
/// (room, anchor, viewer, module).
pub const ENRICH_MISSES: &str = "vidpulse_monitor_enrich_misses_total";

pub(crate) fn pool_partition_loaded(pool: &str, partition: i32, seconds: f64, ids: usize) {
    let labels = [
        ("pool", pool.to_owned()),
        ("partition", partition.to_string()),
    ];
    // Sizes first: a scrape that sees loaded=1 sees the loaded size.
    gauge!(POOL_IDS, &labels).set(ids as f64);
    gauge!(POOL_LOADED, &labels).set(1.0);
    gauge!(POOL_LOAD_SECONDS, &labels).set(seconds);
}

pub(crate) fn pool_partition_dropped(pool: &str, partition: i32) {
    let labels = [
        ("pool", pool.to_owned()),
        ("partition", partition.to_string()),
    ];
    gauge!(POOL_LOADED, &labels).set(0.0);
    gauge!(POOL_IDS, &labels).set(0.0);
    gauge!(POOL_LAG, &labels).set(0.0);
}
