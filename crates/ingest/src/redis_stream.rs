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

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono_tz::Tz;
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use metrics::{Counter, Gauge, counter, gauge};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamInfoGroupsReply,
    StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, RedisError};
use serde_json::{Map, Value};
use vidpulse_core::admin::Health;
use vidpulse_core::config::{ConfigError, KafkaArgs, RedisArgs, redact_url};
use vidpulse_core::pipeline::{Input, Output};
use vidpulse_core::{CancellationToken, dlq, kafka, metrics as m};
use vidpulse_proto::Message as _;

use crate::mapping::{Mapping, SourceRef};
use crate::normalize::{H_KIND, normalize_with_id, now_ms};
use crate::presets;

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

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("redis: {0}")]
    Redis(String),
    #[error("produce failed for good, stopping before the entry is acknowledged in Redis: {0}")]
    Produce(String),
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
    let client = redis::Client::open(settings.redis_url.as_str()).map_err(|e| {
        StreamError::Config(ConfigError::Invalid {
            field: "--redis-url".into(),
            message: format!("{} ({})", e, redact_url(&settings.redis_url)),
        })
    })?;
    let producer: FutureProducer = kafka::producer_config(kafka_args)?.create()?;
    let settings = Arc::new(settings);
    // One failing stream stops the others.
    let stop = shutdown.child_token();
    let mut tasks = tokio::task::JoinSet::new();
    for spec in settings.streams.clone() {
        let reader = StreamReader::new(
            spec,
            settings.clone(),
            client.clone(),
            producer.clone(),
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
        let result = joined.unwrap_or_else(|e| Err(StreamError::Redis(format!("task: {e}"))));
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => {
            health.set_not_ready(format!("failed: {e}"));
            Err(e)
        }
        None => Ok(()),
    }
}

/// The outcome of one entry's produce.
struct Delivered {
    id: String,
    topic: String,
    result: Result<(), String>,
}

/// One entry's produce in flight.
struct Pending {
    id: String,
    topic: String,
    future: DeliveryFuture,
}

impl std::future::Future for Pending {
    type Output = Delivered;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Delivered> {
        let this = &mut *self;
        std::pin::Pin::new(&mut this.future).poll(cx).map(|r| {
            let result = match r {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e.to_string()),
                Err(_) => Err("producer dropped the record".into()),
            };
            Delivered {
                id: std::mem::take(&mut this.id),
                topic: std::mem::take(&mut this.topic),
                result,
            }
        })
    }
}

/// Entries between read and XACK.
#[derive(Default)]
struct Work {
    in_flight: FuturesUnordered<Pending>,
    /// Ids in `in_flight` (a claim must not re-produce them).
    ids: HashSet<String>,
    /// Delivered, not yet acknowledged in Redis.
    acks: Vec<String>,
}

struct Counters {
    received: Counter,
    claimed: Counter,
    acked: Counter,
    errors: Counter,
    in_flight: Gauge,
    pending: Gauge,
    lag: Gauge,
    produced: HashMap<String, Counter>,
}

/// Reads one stream.
struct StreamReader {
    spec: StreamSpec,
    settings: Arc<Settings>,
    client: redis::Client,
    producer: FutureProducer,
    health: Health,
    counters: Counters,
}

/// Where the read loop is: first this consumer's own pending entries (left by
/// a previous run under the same name), then new ones.
enum Phase {
    History(String),
    Live,
}

impl StreamReader {
    fn new(
        spec: StreamSpec,
        settings: Arc<Settings>,
        client: redis::Client,
        producer: FutureProducer,
        health: Health,
    ) -> Self {
        let label = spec.key.clone();
        let counters = Counters {
            received: counter!(m::RECORDS_RECEIVED, "stage" => "ingest", "topic" => format!("redis:{label}")),
            claimed: counter!(CLAIMED, "stream" => label.clone()),
            acked: counter!(ACKED, "stream" => label.clone()),
            errors: counter!(REDIS_ERRORS, "stream" => label.clone()),
            in_flight: gauge!(IN_FLIGHT, "stream" => label.clone()),
            pending: gauge!(PENDING, "stream" => label.clone()),
            lag: gauge!(LAG, "stream" => label),
            produced: HashMap::new(),
        };
        Self {
            spec,
            settings,
            client,
            producer,
            health,
            counters,
        }
    }

    async fn connect(&self) -> Result<ConnectionManager, RedisError> {
        // The reader blocks up to 1 s in XREADGROUP: allow for it.
        // Reconnects after a connection is lost are quick; the first connect
        // is retried by `start` (with its own backoff, cancellable).
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.settings.timeout)
            .set_response_timeout(self.settings.timeout + Duration::from_secs(1))
            .set_number_of_retries(1)
            .set_factor(100)
            .set_max_delay(2_000);
        let connect = ConnectionManager::new_with_config(self.client.clone(), config);
        match tokio::time::timeout(self.settings.timeout * 2, connect).await {
            Ok(r) => r,
            Err(_) => Err(RedisError::from((
                redis::ErrorKind::IoError,
                "connect timed out",
            ))),
        }
    }

    /// Connects (two connections: the blocking read must not delay acks) and
    /// creates the group, retrying until it works or `stop`.
    async fn start(
        &self,
        stop: &CancellationToken,
    ) -> Option<(ConnectionManager, ConnectionManager)> {
        let mut backoff = Backoff::new();
        loop {
            let attempt = async {
                let reader = self.connect().await?;
                let mut writer = self.connect().await?;
                self.ensure_group(&mut writer).await?;
                Ok::<_, RedisError>((reader, writer))
            };
            let result = tokio::select! {
                _ = stop.cancelled() => return None,
                r = attempt => r,
            };
            match result {
                Ok(conns) => return Some(conns),
                Err(e) => {
                    if !self.retry_after(&e, &mut backoff, stop).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn ensure_group(&self, con: &mut ConnectionManager) -> Result<(), RedisError> {
        let created: Result<(), RedisError> = con
            .xgroup_create_mkstream(&self.spec.key, &self.settings.group, "0")
            .await;
        match created {
            Ok(()) => {
                tracing::info!(stream = %self.spec.key, group = %self.settings.group, "Created consumer group at the stream's start.");
                Ok(())
            }
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Logs a Redis failure, reports not-ready and waits; false when stopped.
    async fn retry_after(
        &self,
        error: &RedisError,
        backoff: &mut Backoff,
        stop: &CancellationToken,
    ) -> bool {
        self.counters.errors.increment(1);
        let delay = backoff.next();
        tracing::warn!(stream = %self.spec.key, %error, retry_in = ?delay, "Redis call failed; retrying.");
        self.health
            .set_not_ready(format!("redis unavailable for stream {}", self.spec.key));
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    async fn run(mut self, stop: CancellationToken) -> Result<(), StreamError> {
        let Some((mut reader, mut writer)) = self.start(&stop).await else {
            return Ok(());
        };
        let s = self.settings.clone();
        tracing::info!(
            stream = %self.spec.key,
            group = %s.group,
            consumer = %s.consumer,
            mapping = %self.spec.mapping.name,
            "Reading Redis stream."
        );
        self.health.set_ready();

        let mut work = Work::default();
        let mut last_ack = Instant::now();
        let mut phase = Phase::History("0".into());
        let claim_every = (s.claim_idle / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let mut next_claim = Instant::now();
        let mut claim_cursor = "0-0".to_owned();
        let mut next_stats = Instant::now();
        let mut backoff = Backoff::new();
        let mut fatal: Option<String> = None;

        'main: while !stop.is_cancelled() {
            // Collect finished deliveries without waiting.
            while let Some(Some(d)) = work.in_flight.next().now_or_never() {
                if let Err(e) = self.settle(d, &mut work) {
                    fatal = Some(e);
                    break 'main;
                }
            }
            self.counters.in_flight.set(work.in_flight.len() as f64);

            let ack_due = last_ack.elapsed() >= Duration::from_millis(100);
            if !work.acks.is_empty() && (ack_due || work.acks.len() >= s.batch) {
                match self.ack(&mut writer, &work.acks).await {
                    Ok(()) => {
                        work.acks.clear();
                        last_ack = Instant::now();
                    }
                    Err(e) => {
                        if !self.retry_after(&e, &mut backoff, &stop).await {
                            break;
                        }
                        continue;
                    }
                }
            }

            if Instant::now() >= next_stats {
                next_stats = Instant::now() + Duration::from_secs(5);
                if let Err(e) = self.stats(&mut writer).await {
                    tracing::debug!(stream = %self.spec.key, error = %e, "XINFO GROUPS failed.");
                }
            }

            // Back-pressure: nothing more is read while the bound is reached.
            if work.in_flight.len() >= s.max_in_flight {
                if let Err(e) = self.wait_delivery(&mut work, &stop, None).await {
                    fatal = Some(e);
                    break;
                }
                continue;
            }

            // Claim entries other consumers left pending (crashed instances).
            if matches!(phase, Phase::Live) && Instant::now() >= next_claim {
                match self.claim(&mut writer, &claim_cursor).await {
                    Ok(reply) => {
                        // Trimmed away while pending: nothing to produce.
                        work.acks.extend(reply.deleted_ids);
                        let fresh: Vec<StreamId> = reply
                            .claimed
                            .into_iter()
                            .filter(|e| !work.ids.contains(&e.id))
                            .collect();
                        if !fresh.is_empty() {
                            self.counters.claimed.increment(fresh.len() as u64);
                            tracing::info!(stream = %self.spec.key, entries = fresh.len(), "Claimed entries left pending by another consumer.");
                        }
                        if let Err(e) = self.produce_all(fresh, &mut work).await {
                            fatal = Some(e);
                            break;
                        }
                        claim_cursor = reply.next_stream_id;
                        if claim_cursor == "0-0" {
                            next_claim = Instant::now() + claim_every;
                        }
                    }
                    Err(e) => {
                        if !self.retry_after(&e, &mut backoff, &stop).await {
                            break;
                        }
                        continue;
                    }
                }
            }

            // Read: own pending history first, then new entries. Block only
            // when nothing waits for an ack, so acks are never held back.
            let idle = work.in_flight.is_empty() && work.acks.is_empty();
            let start_id = match &phase {
                Phase::History(after) => after.clone(),
                Phase::Live => ">".to_owned(),
            };
            let mut opts = StreamReadOptions::default()
                .group(&s.group, &s.consumer)
                .count(s.batch);
            if idle && matches!(phase, Phase::Live) {
                opts = opts.block(1000);
            }
            let keys = [self.spec.key.as_str()];
            let ids = [start_id.as_str()];
            let read = reader.xread_options::<_, _, StreamReadReply>(&keys, &ids, &opts);
            let reply = tokio::select! {
                // A read cut short may leave entries delivered to this
                // consumer; they stay pending and are re-read or claimed.
                _ = stop.cancelled() => break,
                r = read => r,
            };
            let entries: Vec<StreamId> = match reply {
                Ok(r) => r.keys.into_iter().flat_map(|k| k.ids).collect(),
                Err(e) if e.code() == Some("NOGROUP") => {
                    tracing::warn!(stream = %self.spec.key, "Consumer group vanished; creating it again.");
                    if let Err(e) = self.ensure_group(&mut writer).await
                        && !self.retry_after(&e, &mut backoff, &stop).await
                    {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    if !self.retry_after(&e, &mut backoff, &stop).await {
                        break;
                    }
                    continue;
                }
            };
            if backoff.failed() {
                tracing::info!(stream = %self.spec.key, "Redis recovered.");
                self.health.set_ready();
                backoff = Backoff::new();
            }
            if let Phase::History(after) = &mut phase {
                match entries.last() {
                    Some(last) => last.id.clone_into(after),
                    None => {
                        phase = Phase::Live;
                        continue;
                    }
                }
            }
            if entries.is_empty() {
                if !work.in_flight.is_empty()
                    && let Err(e) = self
                        .wait_delivery(&mut work, &stop, Some(Duration::from_millis(50)))
                        .await
                {
                    fatal = Some(e);
                    break;
                }
                continue;
            }
            if let Err(e) = self.produce_all(entries, &mut work).await {
                fatal = Some(e);
                break;
            }
        }

        // Drain: wait for in-flight records, then acknowledge what Kafka has.
        self.health.set_not_ready("draining");
        let deadline = tokio::time::Instant::now() + s.drain_timeout;
        while !work.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, work.in_flight.next()).await {
                Ok(Some(d)) => {
                    if let Err(e) = self.settle(d, &mut work) {
                        fatal.get_or_insert(e);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(stream = %self.spec.key, left = work.in_flight.len(), "Drain timed out; those entries stay pending and are read again.");
                    break;
                }
            }
        }
        if !work.acks.is_empty()
            && let Err(e) = self.ack(&mut writer, &work.acks).await
        {
            tracing::warn!(stream = %self.spec.key, error = %e, "Final XACK failed; those entries are read again (same event ids).");
        }
        self.counters.in_flight.set(0.0);
        match fatal {
            Some(e) => Err(StreamError::Produce(e)),
            None => {
                tracing::info!(stream = %self.spec.key, "Drained; delivered entries acknowledged.");
                Ok(())
            }
        }
    }

    /// Waits for one delivery (at most `limit`, when given) and settles it.
    async fn wait_delivery(
        &mut self,
        work: &mut Work,
        stop: &CancellationToken,
        limit: Option<Duration>,
    ) -> Result<(), String> {
        let limit = limit.unwrap_or(Duration::from_secs(1));
        let d = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(limit) => return Ok(()),
            d = work.in_flight.next() => d,
        };
        match d {
            Some(d) => self.settle(d, work),
            None => Ok(()),
        }
    }

    /// Records a finished delivery: to be acknowledged in Redis, or fatal.
    fn settle(&mut self, d: Delivered, work: &mut Work) -> Result<(), String> {
        work.ids.remove(&d.id);
        match d.result {
            Ok(()) => {
                self.counters
                    .produced
                    .entry(d.topic.clone())
                    .or_insert_with(|| {
                        counter!(m::RECORDS_PRODUCED, "stage" => "ingest", "topic" => d.topic.clone())
                    })
                    .increment(1);
                work.acks.push(d.id);
                Ok(())
            }
            Err(e) => {
                counter!(m::PRODUCE_FAILED, "stage" => "ingest").increment(1);
                tracing::error!(stream = %self.spec.key, entry = %d.id, error = %e, "Produce failed for good.");
                Err(format!("entry {} of {}: {e}", d.id, self.spec.key))
            }
        }
    }

    async fn ack(&self, con: &mut ConnectionManager, ids: &[String]) -> Result<(), RedisError> {
        let _: usize = con.xack(&self.spec.key, &self.settings.group, ids).await?;
        self.counters.acked.increment(ids.len() as u64);
        Ok(())
    }

    async fn claim(
        &self,
        con: &mut ConnectionManager,
        cursor: &str,
    ) -> Result<StreamAutoClaimReply, RedisError> {
        let s = &self.settings;
        con.xautoclaim_options(
            &self.spec.key,
            &s.group,
            &s.consumer,
            s.claim_idle.as_millis() as u64,
            cursor,
            StreamAutoClaimOptions::default().count(s.batch),
        )
        .await
    }

    async fn stats(&self, con: &mut ConnectionManager) -> Result<(), RedisError> {
        let info: StreamInfoGroupsReply = con.xinfo_groups(&self.spec.key).await?;
        if let Some(g) = info.groups.iter().find(|g| g.name == self.settings.group) {
            self.counters.pending.set(g.pending as f64);
            if let Some(lag) = g.lag {
                self.counters.lag.set(lag as f64);
            }
        }
        Ok(())
    }

    /// Normalizes and produces each entry; when the producer queue is full,
    /// waits for deliveries to make room.
    async fn produce_all(&mut self, entries: Vec<StreamId>, work: &mut Work) -> Result<(), String> {
        for entry in entries {
            self.counters.received.increment(1);
            let out = entry_output(
                &self.spec,
                &entry,
                &self.settings.events_topic,
                &self.settings.dlq_topic,
                self.settings.max_payload_bytes,
                now_ms(),
            );
            let mut headers = OwnedHeaders::new_with_capacity(out.headers.len());
            for (k, v) in &out.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            loop {
                let mut record: FutureRecord<'_, [u8], [u8]> =
                    FutureRecord::to(&out.topic).headers(headers.clone());
                if let Some(k) = &out.key {
                    record = record.key(k.as_slice());
                }
                if let Some(p) = &out.payload {
                    record = record.payload(p.as_slice());
                }
                match self.producer.send_result(record) {
                    Ok(future) => {
                        work.ids.insert(entry.id.clone());
                        work.in_flight.push(Pending {
                            id: entry.id.clone(),
                            topic: out.topic.clone(),
                            future,
                        });
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        match work.in_flight.next().await {
                            Some(d) => self.settle(d, work)?,
                            None => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    Err((e, _)) => return Err(format!("to {}: {e}", out.topic)),
                }
            }
        }
        Ok(())
    }
}

/// The record one stream entry becomes: its event, or a dead letter.
pub fn entry_output(
    spec: &StreamSpec,
    entry: &StreamId,
    events_topic: &str,
    dlq_topic: &str,
    max_payload_bytes: usize,
    now_ms: i64,
) -> Output {
    let (json, non_utf8) = entry_json(entry);
    let src = SourceRef {
        topic: &spec.key,
        partition: -1,
        offset: -1,
    };
    let fallback_id = format!("{}/{}", spec.key, entry.id);
    let result = if let Some(field) = non_utf8 {
        Err(crate::reject::Reject::new(
            crate::reject::Reason::InvalidUtf8,
            format!("field {field:?} of the stream entry is not UTF-8"),
        ))
    } else {
        normalize_with_id(
            &spec.mapping,
            Some(&json),
            src,
            Some(&fallback_id),
            max_payload_bytes,
            now_ms,
        )
    };
    match result {
        Ok(event) => {
            let kind = event.kind().map(|k| k.as_str()).unwrap_or("");
            let headers = vec![(H_KIND, kind.as_bytes().to_vec())];
            Output {
                topic: events_topic.to_owned(),
                key: Some(event.subject_key().as_bytes().to_vec()),
                payload: Some(event.encode_to_vec()),
                headers,
            }
        }
        Err(reject) => {
            counter!(m::RECORDS_DLQ, "stage" => "ingest", "reason" => reject.reason.code())
                .increment(1);
            let input = Input {
                topic: &spec.key,
                partition: -1,
                offset: -1,
                key: None,
                payload: Some(&json),
                timestamp_ms: None,
                headers: &[],
            };
            let mut out = dlq::record(
                dlq_topic,
                "ingest",
                &input,
                reject.reason.code(),
                &reject.detail,
            );
            out.headers.push((H_SOURCE_KIND, b"redis-stream".to_vec()));
            out.headers
                .push((H_SOURCE_ENTRY_ID, entry.id.as_bytes().to_vec()));
            out
        }
    }
}

/// The entry's fields as a JSON object of strings, and the first field whose
/// value is not UTF-8 (kept lossily in the JSON for the dead letter).
pub fn entry_json(entry: &StreamId) -> (Vec<u8>, Option<String>) {
    let mut fields: Vec<(&String, &redis::Value)> = entry.map.iter().collect();
    fields.sort_by(|a, b| a.0.cmp(b.0));
    let mut obj = Map::new();
    let mut bad = None;
    for (k, v) in fields {
        let text = match v {
            redis::Value::BulkString(b) => match std::str::from_utf8(b) {
                Ok(s) => s.to_owned(),
                Err(_) => {
                    bad.get_or_insert_with(|| k.clone());
                    String::from_utf8_lossy(b).into_owned()
                }
            },
            redis::Value::SimpleString(s) => s.clone(),
            redis::Value::Int(i) => i.to_string(),
            redis::Value::Double(d) => d.to_string(),
            other => format!("{other:?}"),
        };
        obj.insert(k.clone(), Value::String(text));
    }
    // Serializing a map of strings cannot fail.
    (
        serde_json::to_vec(&Value::Object(obj)).unwrap_or_default(),
        bad,
    )
}

/// Exponential backoff from 100 ms to 5 s.
struct Backoff {
    next: Duration,
    failures: u32,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: Duration::from_millis(100),
            failures: 0,
        }
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        self.failures += 1;
        d
    }

    fn failed(&self) -> bool {
        self.failures > 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vidpulse_proto::Event;

    fn entry(id: &str, fields: &[(&str, &[u8])]) -> StreamId {
        StreamId {
            id: id.into(),
            map: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), redis::Value::BulkString(v.to_vec())))
                .collect(),
        }
    }

    fn spec() -> StreamSpec {
        StreamSpec::parse("ua-test=user_actions", chrono_tz::Asia::Shanghai).unwrap()
    }

    fn header<'a>(out: &'a Output, name: &str) -> &'a [u8] {
        out.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_slice())
            .unwrap_or_default()
    }

    #[test]
    fn stream_args_name_a_preset_or_default_to_the_stream_name() {
        let zone = chrono_tz::Asia::Shanghai;
        assert_eq!(
            StreamSpec::parse("user_actions", zone)
                .unwrap()
                .mapping
                .name,
            "user_actions"
        );
        let s = StreamSpec::parse("actions = user_actions", zone).unwrap();
        assert_eq!(
            (s.key.as_str(), s.mapping.name.as_str()),
            ("actions", "user_actions")
        );
        let e = StreamSpec::parse("actions", zone).unwrap_err().to_string();
        assert!(e.contains("no preset \"actions\""), "{e}");
        let e = StreamSpec::parse("a=/nonexistent/m.toml", zone)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }

    #[test]
    fn an_entry_becomes_an_event_with_the_entry_id() {
        let e = entry(
            "1732200000123-0",
            &[
                ("type", b"like"),
                ("timestamp", b"1732200000.123"),
                ("user_id", b"u-5"),
                ("target_id", b"v-9"),
            ],
        );
        let out = entry_output(&spec(), &e, "vp.events.v1", "vp.dlq.v1", 1 << 20, 1);
        assert_eq!(out.topic, "vp.events.v1");
        assert_eq!(header(&out, H_KIND), b"user_action");
        let ev = Event::decode(out.payload.as_deref().unwrap()).unwrap();
        assert_eq!(ev.event_id, "ua-test/1732200000123-0");
        assert_eq!(ev.event_time_ms, 1_732_200_000_123);
        assert_eq!(ev.user_id, "u-5");
        assert_eq!(out.key.as_deref(), Some(b"v-9".as_slice()));
        let src = ev.source.unwrap();
        assert_eq!((src.topic.as_str(), src.partition), ("ua-test", -1));

        // The same entry again (a replay) gives the same event.
        let again = entry_output(&spec(), &e, "vp.events.v1", "vp.dlq.v1", 1 << 20, 1);
        assert_eq!(again, out);
    }

    #[test]
    fn an_event_id_field_wins() {
        let e = entry(
            "5-0",
            &[
                ("type", b"order"),
                ("timestamp", b"1732200000"),
                ("event_id", b"o-1"),
            ],
        );
        let out = entry_output(&spec(), &e, "ev", "dlq", 1 << 20, 1);
        let ev = Event::decode(out.payload.as_deref().unwrap()).unwrap();
        assert_eq!(ev.event_id, "o-1");
    }

    #[test]
    fn a_bad_entry_is_dead_lettered_with_its_stream_coordinates() {
        let e = entry("7-3", &[("type", b"like")]);
        let out = entry_output(&spec(), &e, "ev", "dlq", 1 << 20, 1);
        assert_eq!(out.topic, "dlq");
        assert_eq!(header(&out, dlq::H_REASON), b"missing_field");
        assert_eq!(header(&out, dlq::H_TOPIC), b"ua-test");
        assert_eq!(header(&out, H_SOURCE_KIND), b"redis-stream");
        assert_eq!(header(&out, H_SOURCE_ENTRY_ID), b"7-3");
        let body: Value = serde_json::from_slice(out.payload.as_deref().unwrap()).unwrap();
        assert_eq!(body, serde_json::json!({"type": "like"}));

        let e = entry("7-4", &[("type", b"like"), ("timestamp", b"\xff\xfe")]);
        let out = entry_output(&spec(), &e, "ev", "dlq", 1 << 20, 1);
        assert_eq!(header(&out, dlq::H_REASON), b"invalid_utf8");
    }
}
