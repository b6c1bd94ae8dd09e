//! vidpulse ingest: reads raw JSON topics, normalizes each record with its
//! mapping (a built-in preset or a user's TOML file) into the canonical
//! protobuf event and produces it to `vp.events.v1`, keyed by its subject
//! id; rejects go to `vp.dlq.v1` with their original bytes and a reason.
//!
//! Delivery: at-least-once through the stage runtime (`vidpulse_core::runtime`):
//! a raw record's offset is committed only after its event (or dead letter)
//! was acknowledged; event ids are deterministic, so a re-read record yields
//! the same event. Redis streams (`--redis-stream`, seed 004) are read by
//! `redis_stream` with the same guarantee: an entry is acknowledged only
//! after Kafka acknowledged it.
#![forbid(unsafe_code)]

pub mod mapping;
pub mod normalize;
pub mod presets;
pub mod redis_stream;
pub mod reject;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use clap::Parser;
use vidpulse_core::admin::{self, Health};
use vidpulse_core::config::{
    ConfigError, KafkaArgs, LogArgs, LoopArgs, LoopDefaults, LoopSettings,
};
use vidpulse_core::runtime::{self, Commit, SourceWatermarks, StageSettings, Watermarks};
use vidpulse_core::{CancellationToken, topics};

use mapping::Mapping;
use normalize::Normalizer;

/// Normalize raw JSON events into canonical vidpulse events.
///
/// With no --preset and no --mapping, every built-in preset is read from its
/// default raw topic.
#[derive(Parser, Debug, Clone)]
#[command(name = "vidpulse-ingest", version)]
pub struct Args {
    /// A built-in preset to run, optionally on another topic: `NAME` or
    /// `NAME=TOPIC`. Repeatable. Presets: video_events, video_messages,
    /// play_request, live_streaming_log, live_gift_total, live_room_events,
    /// video_production_log, video_consumption_log, user_actions.
    #[arg(
        long = "preset",
        env = "VIDPULSE_INGEST_PRESETS",
        value_delimiter = ','
    )]
    pub presets: Vec<String>,

    /// A TOML mapping file, optionally on another topic: `FILE` or
    /// `FILE=TOPIC`. Repeatable. See docs/mapping.md.
    #[arg(
        long = "mapping",
        env = "VIDPULSE_INGEST_MAPPINGS",
        value_delimiter = ','
    )]
    pub mappings: Vec<String>,

    /// Zone of zone-less times for mappings that name none (IANA name).
    #[arg(
        long,
        env = "VIDPULSE_INGEST_TIME_ZONE",
        default_value = "Asia/Shanghai"
    )]
    pub time_zone: String,

    /// Topic normalized events are written to.
    #[arg(long, env = "VIDPULSE_INGEST_EVENTS_TOPIC", default_value = topics::EVENTS)]
    pub events_topic: String,

    /// Raw records larger than this go to the DLQ as `payload_too_large`.
    #[arg(long, env = "VIDPULSE_INGEST_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,

    /// How far out of order event times may come within one source
    /// partition: its watermark trails the largest event time read by this
    /// much (a mapping may set its own `max_out_of_orderness`). An event
    /// older than its source's watermark is late.
    #[arg(long, env = "VIDPULSE_INGEST_MAX_OUT_OF_ORDERNESS", default_value = "5s", value_parser = humantime::parse_duration)]
    pub max_out_of_orderness: Duration,

    /// A source partition read to its end and without new records this long
    /// is idle: its watermark then follows the wall clock (minus the allowed
    /// disorder), so windows close when traffic stops. A source that is
    /// behind, or that no running ingest owns, never advances.
    #[arg(long, env = "VIDPULSE_INGEST_IDLE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Watermark records are written at most this often while sources
    /// progress (and every 5 s regardless).
    #[arg(long, env = "VIDPULSE_INGEST_WATERMARK_INTERVAL", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub watermark_interval: Duration,

    /// An event time more than this after its record's timestamp (the Kafka
    /// timestamp, or a Redis entry's id) is a bad clock: the record goes to
    /// the DLQ as `time_in_future`, so no clock can push a watermark ahead.
    #[arg(long, env = "VIDPULSE_INGEST_MAX_FUTURE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_future: Duration,

    /// Print the built-in presets (name and TOML) and exit.
    #[arg(long)]
    pub list_presets: bool,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub redis: redis_stream::RedisStreamArgs,

    #[command(flatten)]
    pub loop_: LoopArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

/// Ingest's defaults for the loop flags (`VIDPULSE_INGEST_*`).
pub const LOOP_DEFAULTS: LoopDefaults = LoopDefaults {
    env_prefix: "VIDPULSE_INGEST",
    group: "vidpulse-ingest",
    admin_addr: "0.0.0.0:9101",
    max_batch: 1000,
    max_wait: "0s",
    max_in_flight: 100_000,
    min_backoff: "200ms",
    max_backoff: "5s",
    drain_timeout: "30s",
};

impl vidpulse_core::config::StageArgs for Args {
    const LOOP_DEFAULTS: LoopDefaults = LOOP_DEFAULTS;
}

/// Validated settings, built once at start.
pub struct Settings {
    /// Full input topic → mapping.
    pub mappings: HashMap<String, Arc<Mapping>>,
    pub events_topic: String,
    pub dlq_topic: String,
    pub admin_addr: SocketAddr,
    pub loop_: LoopSettings,
    /// Redis streams to read (empty: none).
    pub streams: Vec<redis_stream::StreamSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Mapping(#[from] mapping::MappingError),
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    #[error(transparent)]
    RedisStream(#[from] redis_stream::StreamError),
    #[error("admin server: {0}")]
    Admin(std::io::Error),
}

fn invalid(field: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message,
    }
}

/// `VALUE` or `VALUE=TOPIC`.
fn split_topic(s: &str) -> (&str, Option<&str>) {
    match s.split_once('=') {
        Some((v, t)) => (v.trim(), Some(t.trim())),
        None => (s.trim(), None),
    }
}

impl Settings {
    pub fn from_args(args: &Args) -> Result<Settings, IngestError> {
        let zone: Tz = args.time_zone.parse().map_err(|_| {
            invalid(
                "--time-zone",
                format!(
                    "unknown zone {:?}; use an IANA name such as Asia/Shanghai",
                    args.time_zone
                ),
            )
        })?;
        let mut list: Vec<(Mapping, Option<String>)> = Vec::new();
        for p in &args.presets {
            let (name, topic) = split_topic(p);
            let names: Vec<&str> = presets::names().collect();
            let m = presets::preset(name, zone).ok_or_else(|| {
                invalid(
                    "--preset",
                    format!("unknown preset {name:?}; presets are {}", names.join(", ")),
                )
            })??;
            list.push((m, topic.map(str::to_owned)));
        }
        for f in &args.mappings {
            let (file, topic) = split_topic(f);
            let text = std::fs::read_to_string(PathBuf::from(file))
                .map_err(|e| invalid("--mapping", format!("cannot read {file}: {e}")))?;
            let m = Mapping::from_toml(&text, zone).map_err(|mut e| {
                if e.mapping == "<file>" {
                    e.mapping = file.to_owned();
                }
                e
            })?;
            list.push((m, topic.map(str::to_owned)));
        }
        let mut streams = Vec::new();
        for arg in &args.redis.streams {
            let spec = redis_stream::StreamSpec::parse(arg, zone)?;
            if streams
                .iter()
                .any(|s: &redis_stream::StreamSpec| s.key == spec.key)
            {
                return Err(invalid(
                    "--redis-stream",
                    format!("stream {} is given twice", spec.key),
                )
                .into());
            }
            streams.push(spec);
        }
        // Only Redis streams asked for: no Kafka raw topic is read.
        if list.is_empty() && streams.is_empty() {
            for name in presets::names() {
                if let Some(m) = presets::preset(name, zone) {
                    list.push((m?, None));
                }
            }
        }
        let mut mappings = HashMap::new();
        for (m, topic) in list {
            let full = args.kafka.topic(topic.as_deref().unwrap_or(&m.topic));
            if let Some(prev) = mappings.insert(full.clone(), Arc::new(m)) {
                return Err(invalid(
                    "--preset/--mapping",
                    format!("topic {full} is read by two mappings ({} and another); give one of them another topic", prev.name),
                )
                .into());
            }
        }
        Ok(Settings {
            mappings,
            events_topic: args.kafka.topic(&args.events_topic),
            dlq_topic: args.kafka.topic(&args.loop_.dlq_topic),
            admin_addr: args.loop_.admin_addr,
            loop_: args.loop_.settings()?,
            streams,
        })
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Runs ingest until `shutdown` is cancelled.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), IngestError> {
    let settings = Settings::from_args(&args)?;
    let health = Health::new();
    admin::serve(settings.admin_addr, health.clone(), shutdown.clone())
        .await
        .map_err(IngestError::Admin)?;
    vidpulse_core::metrics::register_stage("ingest");
    let mut inputs: Vec<String> = settings.mappings.keys().cloned().collect();
    inputs.sort();
    for t in &inputs {
        tracing::info!(topic = %t, mapping = %settings.mappings[t].name, "Reading raw topic.");
    }
    // Kafka topics and Redis streams run side by side; one failing stops both.
    let stop = shutdown.child_token();
    let streams = (!settings.streams.is_empty()).then(|| redis_stream::Settings {
        streams: settings.streams.clone(),
        redis_url: args.redis.server.redis_url.clone(),
        redis_cluster: args.redis.server.redis_cluster,
        group: args.redis.redis_group.clone(),
        consumer: args
            .redis
            .redis_consumer
            .clone()
            .unwrap_or_else(redis_stream::Settings::default_consumer),
        claim_idle: args.redis.redis_claim_idle,
        batch: args.redis.redis_batch.max(1),
        timeout: args.redis.redis_timeout,
        events_topic: settings.events_topic.clone(),
        dlq_topic: settings.dlq_topic.clone(),
        max_payload_bytes: args.max_payload_bytes,
        max_in_flight: settings.loop_.max_in_flight,
        drain_timeout: settings.loop_.drain_timeout,
        min_backoff: settings.loop_.min_backoff,
        max_backoff: settings.loop_.max_backoff,
        max_out_of_orderness_ms: ms(args.max_out_of_orderness),
        idle_timeout: args.idle_timeout,
        watermark_interval: args.watermark_interval,
        max_future_ms: ms(args.max_future),
        watermark_writer: format!("{}@redis", args.kafka.topic(&args.redis.redis_group)),
        events_partitions: 0,
    });
    let streams = match streams {
        Some(mut s) => {
            let probe: rdkafka::consumer::BaseConsumer =
                vidpulse_core::kafka::reader_config(&args.kafka)?
                    .create()
                    .map_err(runtime::RuntimeError::from)?;
            s.events_partitions = vidpulse_core::kafka::partition_count(
                &probe,
                &settings.events_topic,
                Duration::from_secs(10),
            )
            .map_err(runtime::RuntimeError::from)?
            .ok_or_else(|| runtime::RuntimeError::MissingTopic(settings.events_topic.clone()))?;
            Some(s)
        }
        None => None,
    };
    let kafka = async {
        if inputs.is_empty() {
            return Ok(());
        }
        let default_ooo = ms(args.max_out_of_orderness);
        let out_of_orderness_ms = inputs
            .iter()
            .map(|t| {
                settings.mappings[t]
                    .max_out_of_orderness_ms
                    .unwrap_or(default_ooo)
            })
            .collect();
        let processor = Normalizer::new(
            settings.mappings,
            settings.events_topic.clone(),
            settings.dlq_topic.clone(),
            args.max_payload_bytes,
            ms(args.max_future),
        );
        let stage = StageSettings {
            stage: "ingest",
            group: args.loop_.group.clone(),
            inputs,
            loop_: settings.loop_.clone(),
            commit: Commit::AfterOutputs,
            tick: Duration::from_millis(200),
            watermarks: Watermarks::Source(SourceWatermarks {
                output: settings.events_topic.clone(),
                out_of_orderness_ms,
                idle_timeout: args.idle_timeout,
                interval: args.watermark_interval,
            }),
        };
        let r = runtime::run(&args.kafka, stage, processor, health.clone(), stop.clone()).await;
        if r.is_err() {
            stop.cancel();
        }
        r.map_err(IngestError::from)
    };
    let redis = async {
        let Some(s) = streams else {
            return Ok(());
        };
        let r = redis_stream::run(&args.kafka, s, health.clone(), stop.clone()).await;
        if r.is_err() {
            stop.cancel();
        }
        r.map_err(IngestError::from)
    };
    let (k, r) = tokio::join!(kafka, redis);
    k?;
    r?;
    Ok(())
}
