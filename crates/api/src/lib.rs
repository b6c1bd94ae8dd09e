//! vidpulse API and live dashboard: serves the final values the aggregator
//! keeps (ClickHouse metrics and logs, Redis leaderboards) over HTTP, pushes
//! the latest window values of the dashboard metrics as server-sent events,
//! lists the monitor's pools, and serves the seeds' "real-time big screen"
//! (a static page with its chart library embedded in the binary).
//!
//! Read-only: nothing here writes to ClickHouse (queries run with
//! `readonly=2`), Redis or Kafka. Every answer is bounded: time ranges and
//! row counts are capped, ClickHouse stops a result at the cap
//! (`max_result_rows`, `result_overflow_mode=break`) and each backend call
//! has a deadline. Queries come from `vidpulse_query::read`, the code
//! behind `vidpulse query`, so the API and the CLI always agree.
#![forbid(unsafe_code)]

pub mod assets;
pub mod error;
pub mod live;
pub mod metrics;
pub mod params;
pub mod pools;
pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Parser};
use vidpulse_core::CancellationToken;
use vidpulse_core::config::KafkaArgs;
use vidpulse_core::config::RedisArgs;
use vidpulse_core::telemetry::LogFormat;
use vidpulse_query::read as query;
use vidpulse_query::{ClickHouseArgs, Tables};
use vidpulse_query::{Spec, SpecArgs};

pub use error::ApiError;

/// Serve the rankings and metrics API and the live dashboard.
#[derive(Parser, Debug, Clone)]
#[command(name = "vidpulse-api", version)]
pub struct Args {
    /// Address of the HTTP server: the dashboard (`/`), the API (`/api/…`),
    /// `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "VIDPULSE_API_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Rows of a /api/metrics answer when the request gives no `limit`.
    #[arg(long, env = "VIDPULSE_API_DEFAULT_ROWS", default_value_t = 1000)]
    pub default_rows: usize,

    /// Most rows of one /api/metrics answer; a larger `limit` is capped
    /// (the answer says so with `limit_capped`).
    #[arg(long, env = "VIDPULSE_API_MAX_ROWS", default_value_t = 10_000)]
    pub max_rows: usize,

    /// Time range of /api/metrics when the request gives no `from`: the
    /// windows starting in the last this-long before `to` (default now).
    #[arg(long, env = "VIDPULSE_API_DEFAULT_RANGE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub default_range: Duration,

    /// Longest time range one /api/metrics request may ask for; a longer
    /// one is refused with 400.
    #[arg(long, env = "VIDPULSE_API_MAX_RANGE", default_value = "7days", value_parser = humantime::parse_duration)]
    pub max_range: Duration,

    /// Entries of a /api/rankings answer when the request gives no `limit`.
    #[arg(long, env = "VIDPULSE_API_DEFAULT_RANKING", default_value_t = 10)]
    pub default_ranking: usize,

    /// Most entries of one /api/rankings answer; a larger `limit` is capped.
    #[arg(long, env = "VIDPULSE_API_MAX_RANKING", default_value_t = 100)]
    pub max_ranking: usize,

    /// Most /api/metrics and /api/rankings requests served at once; more
    /// are answered 503 at once instead of queueing.
    #[arg(
        long,
        env = "VIDPULSE_API_MAX_CONCURRENT_QUERIES",
        default_value_t = 16
    )]
    pub max_concurrent_queries: usize,

    /// Deadline of one backend call (ClickHouse query, Redis read); also
    /// ClickHouse's `max_execution_time` for API queries.
    #[arg(long, env = "VIDPULSE_API_QUERY_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub query_timeout: Duration,

    /// How often the live snapshot (/api/live) is rebuilt from ClickHouse
    /// and Redis while anyone is watching.
    #[arg(long, env = "VIDPULSE_API_LIVE_INTERVAL", default_value = "3s", value_parser = humantime::parse_duration)]
    pub live_interval: Duration,

    /// Show the dashboard as of this time instead of now (to look at
    /// replayed or generated data from the past): RFC 3339,
    /// "YYYY-MM-DD HH:MM:SS" (UTC), YYYY-MM-DD or epoch ms.
    #[arg(long, env = "VIDPULSE_API_LIVE_AT")]
    pub live_at: Option<String>,

    /// Where the dashboard's day starts: its "today" panels (gift totals by
    /// type, members per grade, viewers by province × grade, top gifters)
    /// count from 00:00 in this zone (IANA name, e.g. Asia/Shanghai for
    /// seed 002's platform). Leaderboards keep the zone of their spec.
    #[arg(long, env = "VIDPULSE_API_DAY_ZONE", default_value = "UTC")]
    pub day_zone: String,

    /// Most /api/live streams open at once; more are answered 503.
    #[arg(long, env = "VIDPULSE_API_MAX_LIVE_CLIENTS", default_value_t = 256)]
    pub max_live_clients: usize,

    /// Follow the monitor's pool registry (vp.pools.v1) and pool topics for
    /// /api/pools and the dashboard's pool panel. This holds every pool's
    /// ids in memory, like one broadcast monitor instance; `false` turns it
    /// off (no Kafka needed then).
    #[arg(long, env = "VIDPULSE_API_POOLS", default_value_t = true, action = ArgAction::Set)]
    pub pools: bool,

    /// Log format.
    #[arg(long, env = "VIDPULSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub spec: SpecArgs,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,

    #[command(flatten)]
    pub redis: RedisArgs,
}

/// Bounds of what one request may ask for.
#[derive(Clone, Debug)]
pub struct Limits {
    pub default_rows: usize,
    pub max_rows: usize,
    pub default_range_ms: i64,
    pub max_range_ms: i64,
    pub default_ranking: usize,
    pub max_ranking: usize,
}

/// Validated settings, built once at start.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub limits: Limits,
    pub max_concurrent_queries: usize,
    pub query_timeout: Duration,
    pub live: live::LiveConfig,
    pub pools: bool,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn invalid(field: &str, message: impl Into<String>) -> StartError {
    StartError::Config(vidpulse_core::config::ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    })
}

impl Settings {
    pub fn from_args(args: &Args) -> Result<Settings, StartError> {
        if args.max_rows == 0 {
            return Err(invalid("--max-rows", "must be at least 1"));
        }
        if args.default_rows == 0 || args.default_rows > args.max_rows {
            return Err(invalid(
                "--default-rows",
                format!("must be between 1 and --max-rows ({})", args.max_rows),
            ));
        }
        if args.max_ranking == 0 {
            return Err(invalid("--max-ranking", "must be at least 1"));
        }
        if args.default_ranking == 0 || args.default_ranking > args.max_ranking {
            return Err(invalid(
                "--default-ranking",
                format!("must be between 1 and --max-ranking ({})", args.max_ranking),
            ));
        }
        if args.default_range.is_zero() || args.default_range > args.max_range {
            return Err(invalid(
                "--default-range",
                "must be more than 0 and at most --max-range",
            ));
        }
        if args.max_concurrent_queries == 0 {
            return Err(invalid("--max-concurrent-queries", "must be at least 1"));
        }
        if args.query_timeout < Duration::from_secs(1) {
            return Err(invalid("--query-timeout", "must be at least 1s"));
        }
        if args.live_interval < Duration::from_millis(200) {
            return Err(invalid("--live-interval", "must be at least 200ms"));
        }
        let day_zone = vidpulse_query::zone::parse_zone(&args.day_zone)
            .map_err(|e| invalid("--day-zone", e))?;
        let at = match &args.live_at {
            None => None,
            Some(s) if s.trim() == "now" => None,
            Some(s) => Some(query::parse_time(s).map_err(|e| invalid("--live-at", e.to_string()))?),
        };
        Ok(Settings {
            listen: args.listen,
            limits: Limits {
                default_rows: args.default_rows,
                max_rows: args.max_rows,
                default_range_ms: ms(args.default_range),
                max_range_ms: ms(args.max_range),
                default_ranking: args.default_ranking,
                max_ranking: args.max_ranking,
            },
            max_concurrent_queries: args.max_concurrent_queries,
            query_timeout: args.query_timeout,
            live: live::LiveConfig {
                interval: args.live_interval,
                at_ms: at,
                max_clients: args.max_live_clients,
                day_zone: (!vidpulse_query::zone::is_utc(day_zone)).then_some(day_zone),
            },
            pools: args.pools,
        })
    }
}

/// Why the server could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] vidpulse_core::config::ConfigError),
    #[error(transparent)]
    Spec(#[from] vidpulse_query::SpecError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("http server: {0}")]
    Serve(std::io::Error),
}

impl StartError {
    /// Whether the operator's flags are at fault (exit 2) rather than the
    /// environment (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, StartError::Config(_) | StartError::Spec(_))
    }
}

/// What every handler shares.
pub struct Inner {
    pub spec: Spec,
    pub tables: Tables,
    /// ClickHouse client with the API's guards (read-only, deadline).
    pub ch: clickhouse::Client,
    /// The server or cluster (`--redis-url`, `--redis-cluster`).
    pub redis: vidpulse_core::redis::RedisClient,
    pub settings: Settings,
    pub permits: tokio::sync::Semaphore,
    pub live: Arc<live::Live>,
    pub pools: Option<Arc<pools::PoolWatch>>,
    pub prom: metrics_exporter_prometheus::PrometheusHandle,
    /// Cancelled at shutdown: live streams end then.
    pub shutdown: CancellationToken,
}

/// Cheap to clone: one `Arc`.
pub type AppState = Arc<Inner>;

/// The ClickHouse client of the API: read-only queries with a server-side
/// deadline. Result-size caps are added per request.
pub fn clickhouse_client(args: &ClickHouseArgs, timeout: Duration) -> clickhouse::Client {
    args.client()
        .with_setting("readonly", "2")
        .with_setting("max_execution_time", timeout.as_secs().max(1).to_string())
}

/// Builds the shared state (spec, clients, live poller, pool follower).
pub fn state(args: &Args, shutdown: &CancellationToken) -> Result<AppState, StartError> {
    let spec = args.spec.load()?;
    let settings = Settings::from_args(args)?;
    live::check_day_zone(&spec, settings.live.day_zone).map_err(|e| invalid("--day-zone", e))?;
    let pools = settings
        .pools
        .then(|| pools::PoolWatch::start(args.kafka.clone(), shutdown.clone()));
    Ok(Arc::new(Inner {
        tables: args.clickhouse.tables(&args.kafka.topic_prefix),
        ch: clickhouse_client(&args.clickhouse, settings.query_timeout),
        redis: args.redis.client()?,
        permits: tokio::sync::Semaphore::new(settings.max_concurrent_queries),
        live: Arc::new(live::Live::new(settings.live.clone())),
        pools,
        prom: vidpulse_core::metrics::install(),
        shutdown: shutdown.clone(),
        spec,
        settings,
    }))
}

/// Serves until `shutdown` is cancelled; open live streams end then, so the
/// server drains at once.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), StartError> {
    let state = state(&args, &shutdown)?;
    let listener = tokio::net::TcpListener::bind(state.settings.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: state.settings.listen,
            source,
        })?;
    serve(listener, state, shutdown).await
}

/// Serves on a bound listener (tests bind port 0).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let bound = listener.local_addr().map_err(StartError::Serve)?;
    let poller = tokio::spawn(live::poll(state.clone(), shutdown.clone()));
    tracing::info!(
        %bound,
        database = %state.tables.database,
        prefix = %state.tables.prefix,
        pools = state.pools.is_some(),
        pinned_at = state.settings.live.at_ms.map(|t| query::rfc3339(t, false)),
        day_zone = state.settings.live.day_zone.map_or("UTC", |z| z.name()),
        "vidpulse-api listening; dashboard at http://{bound}/"
    );
    let app = routes::router(state);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .map_err(StartError::Serve);
    shutdown.cancel();
    let _ = poller.await;
    result
}
