//! Metric names of the pool follower (every process that loads pools: the
//! monitor, the API).

use metrics::gauge;

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
