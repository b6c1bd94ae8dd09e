//! Metric names of the aggregator (beside the shared ones in
//! `vidpulse_core::metrics`).

/// Events not counted because their window had closed. Labels: `metric`.
pub const LATE_EVENTS: &str = "vidpulse_aggregator_late_total";
/// Events skipped as duplicates of an event id already counted.
pub const DUPLICATES: &str = "vidpulse_aggregator_duplicates_total";
/// Rows written to ClickHouse. Labels: `table`.
pub const ROWS_WRITTEN: &str = "vidpulse_aggregator_rows_written_total";
/// Leaderboard partials written to Redis. Labels: `board`.
pub const PARTIALS_WRITTEN: &str = "vidpulse_aggregator_partials_written_total";
/// Flush duration in seconds (writes + checkpoints).
pub const FLUSH_SECONDS: &str = "vidpulse_aggregator_flush_seconds";
/// A partition's watermark, epoch ms. Labels: `topic`, `partition`.
pub const WATERMARK: &str = "vidpulse_aggregator_watermark_ms";
/// Partitions whose state came back from a checkpoint on assignment.
pub const RESTORED: &str = "vidpulse_aggregator_checkpoints_restored_total";
/// Input partitions this instance owns (restored and reading).
pub const PARTITIONS_OWNED: &str = "vidpulse_aggregator_partitions_owned";
/// Records read since the last completed flush (not yet covered by a
/// checkpoint).
pub const UNFLUSHED: &str = "vidpulse_aggregator_records_unflushed";
/// Partitions whose checkpoint write was fenced by a newer owner.
pub const FENCED: &str = "vidpulse_aggregator_fenced_total";
