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
/// How far a partition's watermark is behind the wall clock, seconds (NaN
/// before its first watermark). A value that keeps growing means a source
/// is silent: upstream down, frozen or lagging (`/readyz` names it).
/// Labels: `topic`, `partition`.
pub const WATERMARK_LAG: &str = "vidpulse_aggregator_watermark_lag_seconds";
/// Partitions whose state came back from a checkpoint on assignment.
pub const RESTORED: &str = "vidpulse_aggregator_checkpoints_restored_total";
/// Input partitions this instance owns (restored and reading).
pub const PARTITIONS_OWNED: &str = "vidpulse_aggregator_partitions_owned";
/// Records read since the last completed flush (not yet covered by a
/// checkpoint).
pub const UNFLUSHED: &str = "vidpulse_aggregator_records_unflushed";
/// Partitions whose checkpoint write was fenced by a newer owner.
pub const FENCED: &str = "vidpulse_aggregator_fenced_total";
/// Event ids remembered to recognise duplicates (over owned partitions).
pub const REMEMBERED_IDS: &str = "vidpulse_aggregator_remembered_ids";
/// Partitions whose checkpoint the store lost (each then replayed from its
/// earliest offset).
pub const STORE_LOST: &str = "vidpulse_aggregator_store_lost_total";
/// Partitions whose checkpoint store held an older prefix of the writes
/// (a failover to a lagging replica; each then restored from what it held).
pub const STORE_BEHIND: &str = "vidpulse_aggregator_store_behind_total";
/// Estimated heap bytes of the state of the partitions this instance owns
/// (open panes, leaderboard partials, remembered ids, rooms), sampled at
/// most every 10 s.
pub const STATE_BYTES: &str = "vidpulse_aggregator_state_bytes";
/// Rooms in the room tables of owned partitions.
pub const ROOMS: &str = "vidpulse_aggregator_rooms";
/// Bytes of checkpoint deltas written to Redis (field names and values).
pub const CHECKPOINT_BYTES: &str = "vidpulse_aggregator_checkpoint_bytes_total";
/// Records that arrived past the next offset a partition expected: offsets
/// that never came (transaction markers and compaction leave such gaps
/// legitimately; on vidpulse's own topics they mean records lost upstream
/// or read from the wrong position). Labels: `topic`.
pub const OFFSET_GAPS: &str = "vidpulse_aggregator_offset_gaps_total";
