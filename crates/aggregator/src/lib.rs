//! vidpulse aggregator: reads canonical events (`vp.events.v1`) and
//! monitored events (`vp.monitored.v1`), keeps the windowed metrics, raw
//! logs and leaderboards of a spec (the built-in one reproduces the seeds'
//! dashboards), writes metric rows to ClickHouse and leaderboards to Redis
//! sorted sets, and late events to `vp.late.v1`.
//!
//! Delivery: exact results under replays, restarts, `kill -9`, rebalances
//! and duplicates. Each input partition is a deterministic state machine
//! ([`engine`]) whose state is checkpointed in Redis ([`checkpoint`]) after
//! every flush, once ClickHouse, Redis and Kafka acknowledged what it
//! emitted; a new owner restores the checkpoint and re-reads from its
//! offset, re-emitting identical rows that the idempotent sinks (versioned
//! ReplacingMergeTree rows, versioned leaderboard partials) absorb. The
//! group's committed offset only feeds lag metrics: the checkpoint is the
//! truth. See docs/metrics.md.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod engine;
pub mod leaderboard;
pub mod lineage;
pub mod record;
pub mod rowbinary;
mod stage;
pub mod window;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use vidpulse_core::CancellationToken;
use vidpulse_core::config::{
    ConfigError, KafkaArgs, LogArgs, LoopArgs, LoopDefaults, LoopSettings, RedisArgs,
    ReplicationArgs,
};
use vidpulse_core::runtime::RuntimeError;
use vidpulse_core::topics;

pub use vidpulse_query::{
    SpecArgs, spec,
    spec::{Spec, SpecError},
};

/// Default consumer group (also names the checkpoints).
pub const DEFAULT_GROUP: &str = "vidpulse-aggregator";

/// The aggregator's defaults for the loop flags (`VIDPULSE_AGGREGATOR_*`).
/// The group also names the checkpoints: a new group starts from the
/// earliest offsets with empty state (a full replay).
pub const LOOP_DEFAULTS: LoopDefaults = LoopDefaults {
    env_prefix: "VIDPULSE_AGGREGATOR",
    group: DEFAULT_GROUP,
    admin_addr: "0.0.0.0:9104",
    max_batch: 1000,
    max_wait: "0s",
    max_in_flight: 100_000,
    min_backoff: "200ms",
    max_backoff: "5s",
    drain_timeout: "30s",
};

/// Maintain windowed metrics in ClickHouse and leaderboards in Redis.
#[derive(Parser, Debug, Clone)]
#[command(name = "vidpulse-aggregator", version)]
pub struct Args {
    #[command(flatten)]
    pub spec: SpecArgs,

    /// Print the built-in spec and exit.
    #[arg(long)]
    pub print_spec: bool,

    /// Print the ClickHouse tables the spec needs and exit.
    #[arg(long)]
    pub print_ddl: bool,

    /// Grace period of metrics and leaderboards whose spec sets none: how
    /// long after its end a window still takes late events.
    #[arg(long, env = "VIDPULSE_AGGREGATOR_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub grace: Duration,

    /// Where each input partition's event time comes from: `in-band` (the
    /// watermark records ingest and the monitor write into the topics: the
    /// minimum over every source, exact through bursts, backfills and
    /// stalls) or `max-event-time` (the largest event time seen in the
    /// partition minus --out-of-orderness, moved on by the wall clock after
    /// --idle-timeout; for producers that write the topics without ingest).
    #[arg(long, env = "VIDPULSE_AGGREGATOR_WATERMARKS", value_enum, default_value_t = WatermarkSource::InBand)]
    pub watermarks: WatermarkSource,

    /// Allowed out-of-orderness (`--watermarks max-event-time` only): the
    /// watermark trails the largest event time seen in a partition by this
    /// much. In-band watermarks take ingest's --max-out-of-orderness.
    #[arg(long, env = "VIDPULSE_AGGREGATOR_OUT_OF_ORDERNESS", default_value = "5s", value_parser = humantime::parse_duration)]
    pub out_of_orderness: Duration,

    /// `--watermarks max-event-time` only: a partition with no record for
    /// this long is idle; its watermark then advances with the wall clock, so
    /// windows close when traffic stops. (In-band watermarks: ingest's
    /// --idle-timeout decides when a source is idle.)
    #[arg(long, env = "VIDPULSE_AGGREGATOR_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// How long event ids are remembered to recognise duplicates, in event
    /// time behind the watermark, whatever the windows (ids cost 8 bytes
    /// each, kept in buckets of 10 s of event time, so up to 10 s longer).
    /// A duplicate arriving later than this
    /// after its original counts again (in a window still open) or is late.
    /// The pipeline's own re-deliveries (restarts, rebalances, `kill -9`)
    /// arrive within seconds; replays of the aggregator restart from its
    /// checkpoints and stay exact whatever the horizon.
    #[arg(long, env = "VIDPULSE_AGGREGATOR_DEDUP_HORIZON", default_value = "10m", value_parser = humantime::parse_duration)]
    pub dedup_horizon: Duration,

    /// How long a live room no event mentioned stays in the room table (the
    /// room profiles learned from start events, for room fields of events
    /// that do not carry them), in event time behind the watermark. An ended
    /// room is kept until its longest window and grace are over, whatever
    /// this says; never less than that.
    #[arg(long, env = "VIDPULSE_AGGREGATOR_ROOM_IDLE_TIMEOUT", default_value = "24h", value_parser = humantime::parse_duration)]
    pub room_idle_timeout: Duration,

    /// Early emission: also write open windows' changed rows at this
    /// interval (live dashboards). 0s = only when a window ends, then on
    /// each correction within its grace.
    #[arg(long, env = "VIDPULSE_AGGREGATOR_EARLY_EMIT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub early_emit: Duration,

    /// Flush (write due rows, checkpoint, store offsets) after this many
    /// records read since the last flush (the seed's
    /// sink.buffer-flush.max-rows; a record makes at most a few rows, and
    /// ClickHouse prefers few large inserts).
    #[arg(
        long,
        env = "VIDPULSE_AGGREGATOR_FLUSH_MAX_ROWS",
        default_value_t = 20_000
    )]
    pub flush_max_rows: usize,

    /// Flush at least this often while records arrive or windows are open
    /// (the seed's sink.buffer-flush.interval).
    #[arg(long, env = "VIDPULSE_AGGREGATOR_FLUSH_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,

    /// Give up (exit 1, to be restarted) after this many failed attempts of
    /// one sink write; 0 = retry until it succeeds (the seed's
    /// sink.max-retries). Nothing is read while a write is retried.
    #[arg(
        long,
        env = "VIDPULSE_AGGREGATOR_SINK_MAX_RETRIES",
        default_value_t = 0
    )]
    pub sink_max_retries: u32,

    /// Start every result over: ignore (and delete) this group's
    /// checkpoints once at start, re-read every input from the earliest
    /// offset with empty state, in a new lineage (readers switch to the new
    /// rows and leaderboards; the old ones are no longer read). For
    /// recreated topics and deliberate rebuilds; run one instance with it,
    /// then scale up without it.
    #[arg(long, env = "VIDPULSE_AGGREGATOR_RESET_STATE")]
    pub reset_state: bool,

    /// Go on when records this lineage needed were deleted by retention: a
    /// replay into empty state (after a lost state store or a spec change)
    /// that can no longer start where it first started, or a checkpoint
    /// whose next records are gone. The windows holding deleted records
    /// (and running levels after them) become partial. Without it the
    /// aggregator stops and names them.
    #[arg(long, env = "VIDPULSE_AGGREGATOR_ALLOW_PARTIAL_REPLAY")]
    pub allow_partial_replay: bool,

    /// Topic late events are written to.
    #[arg(long, env = "VIDPULSE_AGGREGATOR_LATE_TOPIC", default_value = topics::LATE)]
    pub late_topic: String,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub clickhouse: vidpulse_query::ClickHouseArgs,

    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub replication: ReplicationArgs,

    #[command(flatten)]
    pub loop_: LoopArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

impl vidpulse_core::config::StageArgs for Args {
    const LOOP_DEFAULTS: LoopDefaults = LOOP_DEFAULTS;
}

/// Where event time comes from (`--watermarks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WatermarkSource {
    InBand,
    MaxEventTime,
}

/// Validated settings, built once at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub group: String,
    pub default_grace_ms: i64,
    pub out_of_orderness_ms: i64,
    pub clock: window::ClockMode,
    pub dedup_horizon_ms: i64,
    pub room_idle_ms: i64,
    pub idle_timeout: Duration,
    pub early_emit: Option<Duration>,
    pub flush_max_rows: usize,
    pub flush_interval: Duration,
    pub sink_max_retries: u32,
    pub loop_: LoopSettings,
    pub reset_state: bool,
    pub allow_partial_replay: bool,
    pub late_topic: String,
    pub dlq_topic: String,
    pub admin_addr: SocketAddr,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Settings {
    pub fn from_args(args: &Args) -> Result<Settings, AggError> {
        if args.flush_max_rows == 0 {
            return Err(ConfigError::Invalid {
                field: "--flush-max-rows".into(),
                message: "must be at least 1".into(),
            }
            .into());
        }
        if args.flush_interval.is_zero() {
            return Err(ConfigError::Invalid {
                field: "--flush-interval".into(),
                message: "must be more than 0".into(),
            }
            .into());
        }
        Ok(Settings {
            group: args.loop_.group.clone(),
            default_grace_ms: ms(args.grace),
            out_of_orderness_ms: ms(args.out_of_orderness),
            dedup_horizon_ms: ms(args.dedup_horizon),
            room_idle_ms: ms(args.room_idle_timeout),
            clock: match args.watermarks {
                WatermarkSource::InBand => window::ClockMode::InBand,
                WatermarkSource::MaxEventTime => window::ClockMode::MaxEventTime,
            },
            idle_timeout: args.idle_timeout,
            early_emit: (!args.early_emit.is_zero()).then_some(args.early_emit),
            flush_max_rows: args.flush_max_rows,
            flush_interval: args.flush_interval,
            sink_max_retries: args.sink_max_retries,
            loop_: args.loop_.settings()?,
            reset_state: args.reset_state,
            allow_partial_replay: args.allow_partial_replay,
            late_topic: args.kafka.topic(&args.late_topic),
            dlq_topic: args.kafka.topic(&args.loop_.dlq_topic),
            admin_addr: args.loop_.admin_addr,
        })
    }
}

/// Why the stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum AggError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    ClickHouse(#[from] vidpulse_query::ChError),
    #[error("redis")]
    Redis(#[from] redis::RedisError),
    #[error(
        "a flush failed {attempts} times in a row (--sink-max-retries); stopping before the checkpoint, so a restart re-reads: {last}"
    )]
    GaveUp { attempts: u32, last: String },
    #[error("admin server: {0}")]
    Admin(std::io::Error),
    #[error(transparent)]
    Lineage(#[from] lineage::LineageError),
    #[error(transparent)]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Runs the aggregator until `shutdown` is cancelled (then flushes what is
/// due, checkpoints and commits) or a sink fails for good.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), AggError> {
    let spec = args.spec.load()?;
    let settings = Settings::from_args(&args)?;
    if !(args.print_spec || args.print_ddl) {
        // Failure counters at 0 from the start (dashboards, alerts).
        vidpulse_core::metrics::register_stage("aggregator");
        for sink in ["clickhouse", "redis", "checkpoints"] {
            metrics::counter!(vidpulse_core::metrics::SINK_ERRORS, "stage" => "aggregator", "sink" => sink)
                .increment(0);
        }
    }
    stage::run(args, spec, settings, shutdown).await
}
