//! vidpulse monitor: passes the events of `vp.events.v1` that match one or
//! more ID pools, enriched from the Redis dimensions, to `vp.monitored.v1`
//! (key unchanged; value a `MonitoredEvent` with the pools matched and the
//! enrichment fields).
//!
//! Pools are compacted topics `vp.pool.<name>.v1` (key = id, tombstone =
//! removal) registered in `vp.pools.v1`; each is *broadcast* (every instance
//! loads all of it) or *bucketed* (an instance loads only the pool partitions
//! matching its assigned events partitions). See docs/monitor.md.
//!
//! Delivery: at-least-once. An events partition is not processed before the
//! pool data it needs is loaded (no false negatives); an input offset is
//! stored only after its output was acknowledged; offsets are committed on
//! revoke after flushing, so a graceful rescale duplicates nothing. Redis
//! failures stop consumption and are retried (back-pressure, no loss).
#![forbid(unsafe_code)]

pub mod enrich;
pub mod metrics;
mod stage;

pub use vidpulse_pools::{loader, pool};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::BaseConsumer;
use vidpulse_core::admin::{self, Health};
use vidpulse_core::config::{ConfigError, KafkaArgs, LogArgs, LoopArgs, LoopDefaults, RedisArgs};
use vidpulse_core::runtime::{self, Commit, RuntimeError, StageSettings};
use vidpulse_core::{CancellationToken, kafka, topics};

use enrich::{EnrichSettings, KeyPatterns, MissPolicy};
use loader::{Gate, LoaderCtx, Pools};
use pool::Mode;

/// Filter events through ID pools and enrich the matches from Redis.
///
/// With no arguments every pool registered in vp.pools.v1 is applied, and
/// pools created later are picked up while running.
#[derive(Parser, Debug, Clone)]
#[command(name = "vidpulse-monitor", version)]
pub struct Args {
    /// Apply only these pools (repeatable; default: every pool).
    #[arg(long = "pool", env = "VIDPULSE_MONITOR_POOLS", value_delimiter = ',')]
    pub pools: Vec<String>,

    /// Topic of canonical events to read.
    #[arg(long, env = "VIDPULSE_MONITOR_EVENTS_TOPIC", default_value = topics::EVENTS)]
    pub events_topic: String,

    /// Topic matched, enriched events are written to.
    #[arg(long, env = "VIDPULSE_MONITOR_OUTPUT_TOPIC", default_value = topics::MONITORED)]
    pub output_topic: String,

    #[command(flatten)]
    pub redis: RedisArgs,

    /// Skip enrichment (pools only; no Redis needed).
    #[arg(long, env = "VIDPULSE_MONITOR_NO_ENRICH")]
    pub no_enrich: bool,

    /// Key of a live room's hash (`{id}` = room id).
    #[arg(long, env = "VIDPULSE_MONITOR_ROOM_KEY", default_value = "room:{id}")]
    pub room_key: String,

    /// Key of an anchor's profile hash (`{id}` = anchor id).
    #[arg(
        long,
        env = "VIDPULSE_MONITOR_ANCHOR_KEY",
        default_value = "anchor:{id}"
    )]
    pub anchor_key: String,

    /// Key of a viewer's profile hash (`{id}` = user id).
    #[arg(
        long,
        env = "VIDPULSE_MONITOR_VIEWER_KEY",
        default_value = "viewer:{id}"
    )]
    pub viewer_key: String,

    /// Key of a separate room→module map hash (`{id}` = room id), read when
    /// neither the event nor the room hash names the module. Default: none
    /// (the loader writes `module_id` into the room hash, docs/dims.md).
    #[arg(long, env = "VIDPULSE_MONITOR_MODULE_MAP_KEY", default_value = "")]
    pub module_map_key: String,

    /// Field of the room→module map entry holding the module id.
    #[arg(
        long,
        env = "VIDPULSE_MONITOR_MODULE_MAP_FIELD",
        default_value = "module_id"
    )]
    pub module_map_field: String,

    /// What to do when a dimension an event refers to is not in Redis.
    #[arg(long, env = "VIDPULSE_MONITOR_MISS_POLICY", value_enum, default_value_t = MissPolicy::Pass)]
    pub miss_policy: MissPolicy,

    /// Most Redis hashes kept in the local cache.
    #[arg(
        long,
        env = "VIDPULSE_MONITOR_CACHE_CAPACITY",
        default_value_t = 200_000
    )]
    pub cache_capacity: u64,

    /// How long a cached hash is used before it is read again.
    #[arg(long, env = "VIDPULSE_MONITOR_CACHE_TTL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub cache_ttl: Duration,

    /// How long an absent hash is remembered as absent.
    #[arg(long, env = "VIDPULSE_MONITOR_NEGATIVE_CACHE_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub negative_cache_ttl: Duration,

    /// Timeout of one Redis round trip (and of connecting).
    #[arg(long, env = "VIDPULSE_MONITOR_REDIS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub loop_: LoopArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

/// The monitor's defaults for the loop flags (`VIDPULSE_MONITOR_*`): a batch
/// is enriched in one Redis round trip.
pub const LOOP_DEFAULTS: LoopDefaults = LoopDefaults {
    env_prefix: "VIDPULSE_MONITOR",
    group: "vidpulse-monitor",
    admin_addr: "0.0.0.0:9103",
    max_batch: 2000,
    max_wait: "20ms",
    max_in_flight: 100_000,
    min_backoff: "200ms",
    max_backoff: "5s",
    drain_timeout: "30s",
};

impl vidpulse_core::config::StageArgs for Args {
    const LOOP_DEFAULTS: LoopDefaults = LOOP_DEFAULTS;
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topic {0} does not exist; create it with `vidpulse topics create`")]
    MissingTopic(String),
    /// The stage cannot run as configured (e.g. a bucketed pool that is not
    /// co-partitioned with the events); not retriable.
    #[error("{0}")]
    Fatal(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("admin server: {0}")]
    Admin(std::io::Error),
    #[error(transparent)]
    Enrich(#[from] enrich::EnrichError),
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Runs the monitor until `shutdown` is cancelled (then drains) or it fails.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), MonitorError> {
    let loop_ = args.loop_.settings()?;
    for (flag, p) in [
        ("--room-key", &args.room_key),
        ("--anchor-key", &args.anchor_key),
        ("--viewer-key", &args.viewer_key),
    ] {
        if !p.contains("{id}") {
            return Err(invalid(flag, format!("{p:?} has no {{id}} placeholder")).into());
        }
    }
    for name in &args.pools {
        if !pool::valid_name(name) {
            return Err(invalid("--pool", format!("{name:?} is not a pool name")).into());
        }
    }
    let admin_addr: SocketAddr = args.loop_.admin_addr;
    let health = Health::new();
    admin::serve(admin_addr, health.clone(), shutdown.clone())
        .await
        .map_err(MonitorError::Admin)?;
    vidpulse_core::metrics::register_stage("monitor");

    let events_topic = args.kafka.topic(&args.events_topic);
    let output_topic = args.kafka.topic(&args.output_topic);
    let probe: BaseConsumer = kafka::reader_config(&args.kafka)?.create()?;
    let meta = Duration::from_secs(10);
    let event_partitions = kafka::partition_count(&probe, &events_topic, meta)?
        .ok_or_else(|| MonitorError::MissingTopic(events_topic.clone()))?;
    kafka::partition_count(&probe, &output_topic, meta)?
        .ok_or_else(|| MonitorError::MissingTopic(output_topic.clone()))?;
    // The registry may not exist yet on a fresh cluster: it is ours to make.
    let admin_client: AdminClient<DefaultClientContext> =
        kafka::base_config(&args.kafka)?.create()?;
    ensure_registry(&admin_client, &args.kafka).await?;

    let gate = Arc::new(Gate::default());
    let pools = Arc::new(Pools::default());
    let stop = Arc::new(AtomicBool::new(false));
    let registry = loader::start(LoaderCtx {
        kafka: args.kafka.clone(),
        event_partitions,
        events_topic: events_topic.clone(),
        only: args.pools.clone(),
        gate: gate.clone(),
        pools: pools.clone(),
        stop: stop.clone(),
    })
    .map_err(|e| MonitorError::Fatal(format!("cannot start the pool loader: {e}")))?;
    let stop_loader = || {
        stop.store(true, Ordering::Relaxed);
    };

    // Refuse to start with a pool that cannot work (checked by the loader
    // once the registry is read), before joining the group.
    health.set_phase("reading the pool registry");
    let started = Instant::now();
    loop {
        if let Some(msg) = gate.fatal() {
            stop_loader();
            return Err(MonitorError::Fatal(msg));
        }
        if gate.registry_loaded() {
            break;
        }
        if shutdown.is_cancelled() {
            stop_loader();
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let defs: Vec<_> = pools.snapshot().iter().map(|h| h.def.clone()).collect();
    tracing::info!(
        pools = ?defs.iter().map(|d| format!("{}({},{})", d.name, d.match_field, d.mode)).collect::<Vec<_>>(),
        seconds = started.elapsed().as_secs_f64(),
        "Pool registry read."
    );
    for d in &defs {
        if d.mode == Mode::Bucketed && d.match_field == pool::MatchField::UserId {
            tracing::warn!(pool = %d.name, "Bucketed pool on user_id: events are keyed by their subject, not the user, so only events whose key is the user id can match.");
        }
    }
    for missing in args
        .pools
        .iter()
        .filter(|n| !defs.iter().any(|d| &d.name == *n))
    {
        tracing::warn!(pool = %missing, "Pool named with --pool is not registered (yet); it applies once created.");
    }

    let enricher = if args.no_enrich {
        None
    } else {
        Some(enrich::Enricher::new(EnrichSettings {
            redis: args.redis.client()?,
            keys: KeyPatterns {
                room: args.room_key.clone(),
                anchor: args.anchor_key.clone(),
                viewer: args.viewer_key.clone(),
                module_map: args.module_map_key.clone(),
                module_field: args.module_map_field.clone(),
            },
            cache_capacity: args.cache_capacity,
            cache_ttl: args.cache_ttl,
            negative_ttl: args.negative_cache_ttl,
            redis_timeout: args.redis_timeout,
        })?)
    };
    tracing::info!(topic = %events_topic, output = %output_topic, enrich = enricher.is_some(), "Monitoring.");
    let monitor = stage::Monitor::new(
        stage::Topics {
            output: output_topic.clone(),
            dlq: args.kafka.topic(&args.loop_.dlq_topic),
        },
        gate,
        pools,
        enricher,
        args.miss_policy,
    );
    let output_topic_full = output_topic;
    let settings = StageSettings {
        stage: stage::STAGE,
        group: args.loop_.group.clone(),
        inputs: vec![events_topic],
        loop_,
        commit: Commit::AfterOutputs,
        tick: Duration::from_millis(100),
        // Event time passes through: each events partition's watermark is
        // written to every partition of the output.
        watermarks: runtime::Watermarks::Forward(runtime::ForwardWatermarks {
            output: output_topic_full,
            interval: Duration::from_millis(200),
        }),
    };
    let result = runtime::run(&args.kafka, settings, monitor, health, shutdown)
        .await
        .map_err(MonitorError::from);
    stop_loader();
    let _ = tokio::task::spawn_blocking(move || registry.join()).await;
    result
}

pub use vidpulse_pools::ensure_registry;
