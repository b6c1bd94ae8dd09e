//! Metric names of the monitor stage (beside the shared ones in
//! `vidpulse_core::metrics`: records received / produced / dropped / DLQ'd,
//! in-flight, consumer lag) and the pool follower's in `vidpulse_pools::metrics`.

/// Events that matched at least one pool and were produced. Labels: `pool`
/// (counted once per pool matched).
pub const EVENTS_PASSED: &str = "vidpulse_monitor_events_passed_total";
/// Events that matched no pool.
pub const EVENTS_FILTERED: &str = "vidpulse_monitor_events_filtered_total";
/// Events a bucketed pool could not check because they are not keyed by the
/// pool's field (their id lives in another instance's bucket). Labels: `pool`.
pub const EVENTS_NOT_LOCAL: &str = "vidpulse_monitor_events_not_local_total";
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
