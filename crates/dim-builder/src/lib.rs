//! vidpulse dim-builder: reads `vp.events.v1` and keeps the live-room
//! dimension table in Redis hashes (`room:{room_id}`: type, client, title,
//! address, anchor_id, module_id, started_at, ended_at, status), 30 days of
//! TTL while a room is live and 2 days once it ended (seed 003), plus viewer
//! profile fields from viewer events (`viewer:{user_id}`). The T+1 loader
//! (`vidpulse dims load`) shares this crate's scripts (see `load.rs`).
//!
//! Delivery guarantee: at-least-once into idempotent, order-safe Redis
//! writes, on the stage runtime (`vidpulse_core::runtime`). Offsets are
//! stored only after a batch's pipeline succeeded (and its dead letters were
//! acknowledged); each
//! write is an atomic compare-and-write Lua script on event times, so
//! replays and out-of-order events never overwrite newer data, never revive
//! an ended room and never shorten a live room's TTL. See docs/dims.md.
#![forbid(unsafe_code)]

pub mod load;
pub mod model;
pub mod plan;
pub mod sink;
pub mod store;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{ArgAction, Parser};
use vidpulse_core::admin::{self, Health};
use vidpulse_core::config::{
    ConfigError, KafkaArgs, LogArgs, LoopArgs, LoopDefaults, LoopSettings, RedisArgs,
    ReplicationArgs,
};
use vidpulse_core::runtime::{self, Commit, RuntimeError, StageSettings};
use vidpulse_core::{CancellationToken, topics};

use model::Ttls;
use plan::Planner;
use sink::DimSink;
use store::Store;

/// Stage name in metrics and DLQ headers.
pub const STAGE: &str = "dim-builder";

/// The dim-builder's defaults for the loop flags (`VIDPULSE_DIM_*`): a
/// batch is one Redis pipeline (one round trip).
pub const LOOP_DEFAULTS: LoopDefaults = LoopDefaults {
    env_prefix: "VIDPULSE_DIM",
    group: "vidpulse-dim-builder",
    admin_addr: "0.0.0.0:9102",
    max_batch: 1000,
    max_wait: "50ms",
    max_in_flight: 100_000,
    min_backoff: "200ms",
    max_backoff: "5s",
    drain_timeout: "30s",
};

/// Metric: events by outcome. Labels: `stage`, `outcome` (`applied`,
/// `stale` — older than what Redis holds, or a replay —, `other_kind`,
/// `no_room_id`, `no_user_id`, `no_profile_fields`, `failed` — dead-lettered),
/// `target` (`room`, `viewer`, `none`).
pub const EVENTS: &str = "vidpulse_dim_events_total";
/// Metric: Redis round-trip time of one pipeline, seconds. Labels: `stage`,
/// `op` (`events`, `load`).
pub const REDIS_SECONDS: &str = "vidpulse_dim_redis_seconds";

/// Keep live-room and viewer profiles in Redis hashes from vp.events.v1.
#[derive(Parser, Debug, Clone)]
#[command(name = "vidpulse-dim-builder", version)]
pub struct Args {
    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub replication: ReplicationArgs,

    /// Connect and response timeout of every Redis call; past it the batch
    /// is retried.
    #[arg(long, env = "VIDPULSE_DIM_REDIS_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// Prefix of room hashes: `<prefix><room_id>`.
    #[arg(long, env = "VIDPULSE_DIM_KEY_PREFIX", default_value = "room:")]
    pub key_prefix: String,

    /// TTL of a room hash while the room is live (set on start; never
    /// shortened by an older event).
    #[arg(long, env = "VIDPULSE_DIM_LIVE_TTL", default_value = "30d", value_parser = humantime::parse_duration)]
    pub live_ttl: Duration,

    /// TTL of a room hash once the room ended (cut on end).
    #[arg(long, env = "VIDPULSE_DIM_ENDED_TTL", default_value = "2d", value_parser = humantime::parse_duration)]
    pub ended_ttl: Duration,

    /// Also keep viewer profile fields (province, region, grade) from viewer
    /// events in `<viewer-key-prefix><user_id>`. `--viewer-profiles false`
    /// turns it off.
    #[arg(long, env = "VIDPULSE_DIM_VIEWER_PROFILES", default_value_t = true, action = ArgAction::Set)]
    pub viewer_profiles: bool,

    /// Prefix of viewer hashes.
    #[arg(
        long,
        env = "VIDPULSE_DIM_VIEWER_KEY_PREFIX",
        default_value = "viewer:"
    )]
    pub viewer_key_prefix: String,

    /// TTL of a viewer hash created by live events (extended by later
    /// events; a loaded profile without TTL keeps none).
    #[arg(long, env = "VIDPULSE_DIM_VIEWER_TTL", default_value = "30d", value_parser = humantime::parse_duration)]
    pub viewer_ttl: Duration,

    /// Topic read.
    #[arg(long, env = "VIDPULSE_DIM_EVENTS_TOPIC", default_value = topics::EVENTS)]
    pub events_topic: String,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub loop_: LoopArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

impl vidpulse_core::config::StageArgs for Args {
    const LOOP_DEFAULTS: LoopDefaults = LOOP_DEFAULTS;
}

/// Validated settings, built once at start.
#[derive(Clone, Debug)]
pub struct Settings {
    pub redis_url: String,
    /// `--redis-cluster`: `redis_url` lists a cluster's seed nodes.
    pub redis_cluster: bool,
    pub redis_timeout: Duration,
    pub replication: vidpulse_core::redis::Replication,
    pub planner: Planner,
    pub ttls: Ttls,
    pub admin_addr: SocketAddr,
    pub group: String,
    pub events_topic: String,
    pub loop_: LoopSettings,
    pub dlq_topic: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DimError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("admin server: {0}")]
    Admin(std::io::Error),
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A TTL in whole milliseconds, at least one second.
fn ttl_ms(field: &str, d: Duration) -> Result<i64, ConfigError> {
    let ms = i64::try_from(d.as_millis()).map_err(|_| invalid(field, "too long"))?;
    if ms < 1000 {
        return Err(invalid(
            field,
            format!("{} is shorter than a second", humantime::format_duration(d)),
        ));
    }
    Ok(ms)
}

impl Settings {
    pub fn from_args(args: &Args) -> Result<Settings, DimError> {
        let ttls = Ttls {
            live_ms: ttl_ms("--live-ttl", args.live_ttl)?,
            ended_ms: ttl_ms("--ended-ttl", args.ended_ttl)?,
            profile_ms: ttl_ms("--viewer-ttl", args.viewer_ttl)?,
        };
        if ttls.ended_ms > ttls.live_ms {
            return Err(invalid(
                "--ended-ttl",
                "is longer than --live-ttl; an ended room would outlive a live one",
            )
            .into());
        }
        if args.key_prefix.is_empty() || args.viewer_key_prefix.is_empty() {
            return Err(invalid("--key-prefix/--viewer-key-prefix", "must not be empty").into());
        }
        if args.viewer_profiles && args.key_prefix == args.viewer_key_prefix {
            return Err(invalid("--viewer-key-prefix", "must differ from --key-prefix").into());
        }
        Ok(Settings {
            redis_url: args.redis.redis_url.clone(),
            redis_cluster: args.redis.redis_cluster,
            redis_timeout: args.redis_timeout,
            replication: args.replication.replication(),
            planner: Planner {
                room_prefix: args.key_prefix.clone(),
                viewer_prefix: args.viewer_profiles.then(|| args.viewer_key_prefix.clone()),
            },
            ttls,
            admin_addr: args.loop_.admin_addr,
            group: args.loop_.group.clone(),
            events_topic: args.kafka.topic(&args.events_topic),
            loop_: args.loop_.settings()?,
            dlq_topic: args.kafka.topic(&args.loop_.dlq_topic),
        })
    }
}

/// Runs the stage until `shutdown` is cancelled.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), DimError> {
    let settings = Settings::from_args(&args)?;
    let health = Health::new();
    admin::serve(settings.admin_addr, health.clone(), shutdown.clone())
        .await
        .map_err(DimError::Admin)?;
    vidpulse_core::metrics::register_stage(STAGE);
    // Connecting is left to the first batch, so the stage starts (not
    // ready) while Redis is down and catches up when it comes back.
    let store = Store::open(
        &settings.redis_url,
        settings.redis_cluster,
        settings.redis_timeout,
        settings.replication,
    )?;
    tracing::info!(
        room_prefix = %settings.planner.room_prefix,
        viewer_prefix = ?settings.planner.viewer_prefix,
        live_ttl = ?args.live_ttl,
        ended_ttl = ?args.ended_ttl,
        "Building dimensions."
    );
    let sink = DimSink {
        store,
        planner: settings.planner,
        ttls: settings.ttls,
        dlq_topic: settings.dlq_topic,
    };
    let stage = StageSettings {
        stage: STAGE,
        group: settings.group,
        inputs: vec![settings.events_topic],
        loop_: settings.loop_,
        commit: Commit::AfterOutputs,
        tick: Duration::from_secs(1),
        // Watermark records are not dimension events.
        watermarks: runtime::Watermarks::Skip,
    };
    runtime::run(&args.kafka, stage, sink, health, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vidpulse_core::config::StageArgs;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["vidpulse-dim-builder"];
        v.extend_from_slice(extra);
        Args::try_parse_args(v).unwrap()
    }

    #[test]
    fn defaults_are_the_seeds() {
        let s = Settings::from_args(&args(&[])).unwrap();
        assert_eq!(s.ttls.live_ms, 30 * 86_400_000);
        assert_eq!(s.ttls.ended_ms, 2 * 86_400_000);
        assert_eq!(s.planner.room_prefix, "room:");
        assert_eq!(s.planner.viewer_prefix.as_deref(), Some("viewer:"));
        assert_eq!(s.events_topic, "vp.events.v1");
        assert_eq!(s.group, "vidpulse-dim-builder");
        assert_eq!(s.loop_.max_batch, 1000);
        assert_eq!(s.admin_addr.port(), 9102);
    }

    #[test]
    fn flags_validate() {
        let s = Settings::from_args(&args(&[
            "--key-prefix",
            "t1.room:",
            "--viewer-profiles",
            "false",
            "--topic-prefix",
            "x.",
        ]))
        .unwrap();
        assert_eq!(s.planner.room_prefix, "t1.room:");
        assert_eq!(s.planner.viewer_prefix, None);
        assert_eq!(s.events_topic, "x.vp.events.v1");
        assert_eq!(s.dlq_topic, "x.vp.dlq.v1");
        assert!(Settings::from_args(&args(&["--ended-ttl", "40d"])).is_err());
        assert!(Settings::from_args(&args(&["--live-ttl", "10ms"])).is_err());
        assert!(Settings::from_args(&args(&["--viewer-key-prefix", "room:"])).is_err());
    }
}
