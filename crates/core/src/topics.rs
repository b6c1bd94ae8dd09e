//! The fixed topic names of the pipeline and their default partition counts.

/// Normalized canonical events (protobuf `vidpulse.v1.Event`).
pub const EVENTS: &str = "vp.events.v1";
/// Records a stage could not handle, with their original bytes and reason headers.
pub const DLQ: &str = "vp.dlq.v1";
/// Events that passed a monitor pool, enriched.
pub const MONITORED: &str = "vp.monitored.v1";
/// Events that arrived after their window's grace period.
pub const LATE: &str = "vp.late.v1";

/// Name of the compacted topic holding pool `name`.
pub fn pool(name: &str) -> String {
    format!("vp.pool.{name}.v1")
}

/// The raw topics of the built-in presets (docs/mapping.md, "Presets").
pub const RAW: [&str; 9] = [
    "video_events",
    "video_messages",
    "play_request",
    "live_streaming_log",
    "live_gift_total",
    "live_room_events",
    "video_production_log",
    "video_consumption_log",
    "user_actions",
];

/// Default partition count of `vp.events.v1` and of everything that must be
/// co-partitioned with it (`vp.monitored.v1`, pool topics).
pub const DEFAULT_EVENT_PARTITIONS: i32 = 8;
/// Default partition count of raw topics.
pub const DEFAULT_RAW_PARTITIONS: i32 = 4;
/// Default partition count of the DLQ and late topics.
pub const DEFAULT_SIDE_PARTITIONS: i32 = 2;
