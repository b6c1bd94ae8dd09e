//! Redis Streams source (seed 004 sends user actions with `XADD user_actions`).
//!
//! Each `--redis-stream` is read through a consumer group (`--redis-group`,
//! created at the stream's start if missing). An entry's fields become a JSON
//! object whose values are all strings (the presets accept numeric strings for
//! times and counts), which is normalized with the stream's mapping exactly
//! like a Kafka record and produced to `vp.events.v1`, or to `vp.dlq.v1` with
//! a reason. Without an `event_id` field the event id is `<stream>/<entry id>`,
//! so a re-read entry yields the same event.
//!
//! Delivery guarantee: at-least-once into Kafka, exact downstream. An entry is
//! `XACK`ed only after Kafka acknowledged the record it produced. Entries read
//! but not acknowledged stay pending in the group: at start this consumer first
//! re-reads its own pending entries, and every instance claims (`XAUTOCLAIM`)
//! entries that another consumer left pending for `--redis-claim-idle` (a
//! crashed or replaced instance). At most `--max-in-flight` entries per stream
//! are produced and not yet acknowledged; past that the stream is not read.
//! While Redis fails the loop retries with backoff and reports not-ready.

mod args;
mod entry;
mod reader;

use std::sync::Arc;

use vidpulse_core::CancellationToken;
use vidpulse_core::admin::Health;
use vidpulse_core::config::{ConfigError, KafkaArgs};
use vidpulse_core::produce::{ProduceError, Producer};

pub use args::{RedisStreamArgs, Settings, StreamSpec};
pub use entry::{entry_json, entry_output};

/// Header on a dead letter from a Redis stream: `redis-stream`.
pub const H_SOURCE_KIND: &str = "vp.source.kind";
/// Header on a dead letter from a Redis stream: the entry id.
pub const H_SOURCE_ENTRY_ID: &str = "vp.source.entry-id";

/// Metric: entries this instance claimed from other consumers. Labels: `stream`.
pub const CLAIMED: &str = "vidpulse_ingest_redis_claimed_total";
/// Metric: entries acknowledged (`XACK`) after Kafka acknowledged them. Labels: `stream`.
pub const ACKED: &str = "vidpulse_ingest_redis_acked_total";
/// Metric: entries delivered to the group and not yet acknowledged (whole group). Labels: `stream`.
pub const PENDING: &str = "vidpulse_ingest_redis_pending";
/// Metric: entries not yet delivered to the group (Redis 7+). Labels: `stream`.
pub const LAG: &str = "vidpulse_ingest_redis_lag";
/// Metric: entries of this instance produced, not yet acknowledged by Kafka. Labels: `stream`.
pub const IN_FLIGHT: &str = "vidpulse_ingest_redis_in_flight";
/// Metric: failed Redis calls (each retry counts). Labels: `stream`.
pub const REDIS_ERRORS: &str = "vidpulse_ingest_redis_errors_total";

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Produce(#[from] ProduceError),
    #[error("produce failed for good, stopping before the entry is acknowledged in Redis: {0}")]
    Delivery(String),
    #[error("stream reader task")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs every stream until `shutdown` is cancelled (then drains: waits up to
/// the drain timeout for Kafka acks and acknowledges those entries) or a
/// produce fails for good.
pub async fn run(
    kafka_args: &KafkaArgs,
    settings: Settings,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), StreamError> {
    let client =
        vidpulse_core::redis::RedisClient::from_url(&settings.redis_url, settings.redis_cluster)?;
    let deliveries = Arc::new(reader::Deliveries::new(settings.streams.len()));
    let producer = Arc::new(Producer::new(kafka_args, deliveries.clone())?);
    let settings = Arc::new(settings);
    // One failing stream stops the others.
    let stop = shutdown.child_token();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, spec) in settings.streams.clone().into_iter().enumerate() {
        let reader = reader::StreamReader::new(
            index,
            spec,
            settings.clone(),
            client.clone(),
            producer.clone(),
            deliveries.clone(),
            health.clone(),
        );
        let stop = stop.clone();
        tasks.spawn(async move {
            let result = reader.run(stop.clone()).await;
            if result.is_err() {
                stop.cancel();
            }
            result
        });
    }
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.map_err(StreamError::from).and_then(|r| r);
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => {
            health.set_phase(format!("failed: {e}"));
            Err(e)
        }
        None => Ok(()),
    }
}
