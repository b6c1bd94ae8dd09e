//! The flags of the Redis Streams source and the settings made from them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use vidpulse_core::config::{ConfigError, RedisArgs};

use crate::mapping::Mapping;
use crate::presets;

/// Redis Streams flags of ingest.
#[derive(clap::Args, Clone)]
pub struct RedisStreamArgs {
    /// A Redis stream to read through a consumer group, with the mapping of
    /// its entries: `STREAM`, `STREAM=PRESET` or `STREAM=FILE.toml` (default:
    /// the preset named like the stream). Repeatable. Without --preset and
    /// --mapping, only the streams are read (no Kafka raw topic).
    #[arg(
        long = "redis-stream",
        env = "VIDPULSE_INGEST_REDIS_STREAMS",
        value_delimiter = ','
    )]
    pub streams: Vec<String>,

    #[command(flatten)]
    pub server: RedisArgs,

    /// Consumer group on every stream; created at the stream's first entry
    /// (`0`) when missing, so nothing already in the stream is skipped.
    #[arg(
        long,
        env = "VIDPULSE_INGEST_REDIS_GROUP",
        default_value = "vidpulse-ingest"
    )]
    pub redis_group: String,

    /// This instance's consumer name in the group (default: the host name,
    /// i.e. the pod name in Kubernetes).
    #[arg(long, env = "VIDPULSE_INGEST_REDIS_CONSUMER")]
    pub redis_consumer: Option<String>,

    /// Entries left unacknowledged by any consumer for this long are claimed
    /// and processed again (a crashed or replaced instance).
    #[arg(long, env = "VIDPULSE_INGEST_REDIS_CLAIM_IDLE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub redis_claim_idle: Duration,

    /// Most entries per XREADGROUP / XAUTOCLAIM call.
    #[arg(long, env = "VIDPULSE_INGEST_REDIS_BATCH", default_value_t = 500)]
    pub redis_batch: usize,

    /// Timeout of a Redis call (connect, read, ack); a blocking read adds 1 s.
    #[arg(long, env = "VIDPULSE_INGEST_REDIS_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,
}

impl std::fmt::Debug for RedisStreamArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamArgs")
            .field("streams", &self.streams)
            .field("server", &self.server)
            .field("redis_group", &self.redis_group)
            .field("redis_consumer", &self.redis_consumer)
            .field("redis_claim_idle", &self.redis_claim_idle)
            .field("redis_batch", &self.redis_batch)
            .field("redis_timeout", &self.redis_timeout)
            .finish()
    }
}

/// One stream and the mapping of its entries.
#[derive(Clone, Debug)]
pub struct StreamSpec {
    pub key: String,
    pub mapping: Arc<Mapping>,
}

impl StreamSpec {
    /// Parses `STREAM`, `STREAM=PRESET` or `STREAM=FILE`.
    pub fn parse(arg: &str, zone: Tz) -> Result<StreamSpec, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            field: "--redis-stream".into(),
            message,
        };
        let (key, mapping) = match arg.split_once('=') {
            Some((k, m)) => (k.trim(), m.trim()),
            None => (arg.trim(), arg.trim()),
        };
        if key.is_empty() {
            return Err(invalid(format!("{arg:?}: the stream key is empty")));
        }
        let is_file = mapping.ends_with(".toml") || mapping.contains('/');
        let compiled = if is_file {
            let text = std::fs::read_to_string(Path::new(mapping))
                .map_err(|e| invalid(format!("cannot read {mapping}: {e}")))?;
            Mapping::from_toml(&text, zone).map_err(|e| invalid(format!("{mapping}: {e}")))?
        } else {
            match presets::preset(mapping, zone) {
                Some(m) => m.map_err(|e| invalid(e.to_string()))?,
                None => {
                    let names: Vec<&str> = presets::names().collect();
                    return Err(invalid(format!(
                        "{arg:?}: no preset {mapping:?}; name one (STREAM=PRESET: {}) or a mapping file (STREAM=FILE.toml)",
                        names.join(", ")
                    )));
                }
            }
        };
        Ok(StreamSpec {
            key: key.to_owned(),
            mapping: Arc::new(compiled),
        })
    }
}

/// Validated settings of the Redis Streams source.
#[derive(Clone, Debug)]
pub struct Settings {
    pub streams: Vec<StreamSpec>,
    pub redis_url: String,
    /// `--redis-cluster`: `redis_url` lists a cluster's seed nodes.
    pub redis_cluster: bool,
    pub group: String,
    pub consumer: String,
    pub claim_idle: Duration,
    pub batch: usize,
    pub timeout: Duration,
    pub events_topic: String,
    pub dlq_topic: String,
    pub max_payload_bytes: usize,
    pub max_in_flight: usize,
    pub drain_timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Entries stamped more than this before they were added are late.
    pub max_out_of_orderness_ms: i64,
    pub idle_timeout: Duration,
    pub watermark_interval: Duration,
    pub max_future_ms: i64,
    /// Writer name of the streams' watermark records.
    pub watermark_writer: String,
    /// Partitions of the events topic (each gets every watermark record).
    pub events_partitions: i32,
}

impl Settings {
    /// The consumer name when none is given: the host name (the pod name in
    /// Kubernetes), else `vidpulse-ingest`.
    pub fn default_consumer() -> String {
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "vidpulse-ingest".into())
    }
}
