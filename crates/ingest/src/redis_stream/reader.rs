//! The read loop of one stream: this consumer's own pending entries first,
//! then new ones; entries other consumers left pending are claimed; every
//! entry is normalized, produced through the core producer, and `XACK`ed
//! once Kafka acknowledged it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, counter, gauge};
use rdkafka::error::KafkaError;
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamInfoGroupsReply,
    StreamPendingReply, StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, RedisError};
use tokio::sync::Notify;
use vidpulse_core::CancellationToken;
use vidpulse_core::admin::Health;
use vidpulse_core::health::Component;
use vidpulse_core::metrics as m;
use vidpulse_core::produce::{OnDelivery, Producer};
use vidpulse_core::redis::{ConnectOptions, RedisClient, RedisConn};
use vidpulse_core::retry::Backoff;
use vidpulse_core::watermark::{self, Idleness, Writer};

use super::{
    ACKED, CLAIMED, IN_FLIGHT, LAG, PENDING, REDIS_ERRORS, Settings, StreamError, StreamSpec,
    entry_output,
};
use crate::normalize::now_ms;

/// A produced entry: (stream index, entry id, output topic); a watermark
/// record has no entry (`id` empty).
pub(crate) struct Ticket {
    stream: usize,
    id: String,
    topic: Arc<str>,
}

/// Delivery reports, per stream, for the readers to settle.
pub(crate) struct Deliveries {
    streams: Vec<(Mutex<Vec<Delivered>>, Notify)>,
}

struct Delivered {
    id: String,
    topic: Arc<str>,
    result: Result<(), String>,
}

impl Deliveries {
    pub fn new(streams: usize) -> Self {
        Deliveries {
            streams: (0..streams)
                .map(|_| (Mutex::new(Vec::new()), Notify::new()))
                .collect(),
        }
    }

    fn take(&self, stream: usize) -> Vec<Delivered> {
        self.streams
            .get(stream)
            .and_then(|(q, _)| q.lock().ok().map(|mut q| std::mem::take(&mut *q)))
            .unwrap_or_default()
    }

    async fn wait(&self, stream: usize, limit: Duration) {
        if let Some((_, n)) = self.streams.get(stream) {
            let _ = tokio::time::timeout(limit, n.notified()).await;
        }
    }
}

impl OnDelivery for Deliveries {
    type Ticket = Ticket;

    fn delivered(&self, t: Ticket, result: Result<(), &KafkaError>) {
        if let Some((q, n)) = self.streams.get(t.stream) {
            if let Ok(mut q) = q.lock() {
                q.push(Delivered {
                    id: t.id,
                    topic: t.topic,
                    result: result.map_err(|e| e.to_string()),
                });
            }
            n.notify_one();
        }
    }
}

/// Entries between read and XACK.
#[derive(Default)]
struct Work {
    /// Produced, not yet reported (a claim must not re-produce them).
    in_flight: HashSet<String>,
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
    produced: HashMap<Arc<str>, Counter>,
}

/// Where the read loop is: first this consumer's own pending entries (left by
/// a previous run under the same name), then new ones.
enum Phase {
    History(String),
    Live,
}

/// Reads one stream.
pub(crate) struct StreamReader {
    index: usize,
    spec: StreamSpec,
    settings: Arc<Settings>,
    client: RedisClient,
    producer: Arc<Producer<Deliveries>>,
    deliveries: Arc<Deliveries>,
    health: Health,
    counters: Counters,
    backoff: Backoff,
    topics: HashMap<String, Arc<str>>,
    watermarks: Watermarks,
}

/// The stream's event-time progress, written as watermark records. A
/// stream's entries are shared by the group's consumers, so its progress is
/// the group's frontier: every entry before the oldest one still pending
/// (or, with none pending, up to the last one delivered) is in Kafka. Its
/// time is the entry id's (when Redis added it), less the allowed disorder;
/// an entry stamped earlier than that is late at its source. Caught up
/// (nothing pending, nothing undelivered) for the idle timeout, it follows
/// the wall clock. Every instance reading the stream reports the same
/// frontier; readers keep the highest.
struct Watermarks {
    writer: Writer,
    output: String,
    partitions: i32,
    out_of_orderness_ms: i64,
    idle_timeout: Duration,
    idle_since: Option<Instant>,
    last_check: Option<Instant>,
    mark: i64,
}

impl StreamReader {
    pub fn new(
        index: usize,
        spec: StreamSpec,
        settings: Arc<Settings>,
        client: RedisClient,
        producer: Arc<Producer<Deliveries>>,
        deliveries: Arc<Deliveries>,
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
        let backoff = Backoff::new(settings.min_backoff, settings.max_backoff);
        let watermarks = Watermarks {
            writer: Writer::new(
                settings.watermark_writer.clone(),
                settings
                    .streams
                    .iter()
                    .map(|s| (source_name(&s.key), 1))
                    .collect(),
                settings.watermark_interval,
            ),
            output: settings.events_topic.clone(),
            partitions: settings.events_partitions,
            out_of_orderness_ms: spec
                .mapping
                .max_out_of_orderness_ms
                .unwrap_or(settings.max_out_of_orderness_ms),
            idle_timeout: settings.idle_timeout,
            idle_since: None,
            last_check: None,
            mark: watermark::NONE,
        };
        Self {
            index,
            spec,
            settings,
            client,
            producer,
            deliveries,
            health,
            counters,
            backoff,
            topics: HashMap::new(),
            watermarks,
        }
    }

    async fn connect(&self) -> Result<RedisConn, RedisError> {
        // The reader blocks up to 1 s in XREADGROUP: allow for it.
        // Reconnects after a connection is lost are quick; the first connect
        // is retried by `start` (with its own backoff, cancellable).
        // On a cluster each connection has connections of its own to the
        // nodes, so the blocking read delays no ack there either.
        let config = ConnectOptions {
            connection_timeout: Some(self.settings.timeout),
            response_timeout: Some(self.settings.timeout + Duration::from_secs(1)),
            retries: Some(1),
            backoff_factor_ms: Some(100),
            backoff_max_delay_ms: Some(2_000),
        };
        let connect = self.client.connect_managed(config);
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
    async fn start(&mut self, stop: &CancellationToken) -> Option<(RedisConn, RedisConn)> {
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
                    if !self.retry_after(&e, stop).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn ensure_group(&self, con: &mut RedisConn) -> Result<(), RedisError> {
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

    /// Counts a Redis failure, reports not-ready and waits; false when stopped.
    async fn retry_after(&mut self, error: &RedisError, stop: &CancellationToken) -> bool {
        self.counters.errors.increment(1);
        let what = format!("stream {}: {error}", self.spec.key);
        self.backoff
            .failed(&self.health, Component::Redis, &what, stop)
            .await
    }

    pub async fn run(mut self, stop: CancellationToken) -> Result<(), StreamError> {
        let Some((mut reader, mut writer)) = self.start(&stop).await else {
            return Ok(());
        };
        self.backoff.succeeded(&self.health, Component::Redis);
        self.health.set_started();
        let s = self.settings.clone();
        tracing::info!(
            stream = %self.spec.key,
            group = %s.group,
            consumer = %s.consumer,
            mapping = %self.spec.mapping.name,
            "Reading Redis stream."
        );

        let mut work = Work::default();
        let mut last_ack = Instant::now();
        let mut phase = Phase::History("0".into());
        let claim_every = (s.claim_idle / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let mut next_claim = Instant::now();
        let mut claim_cursor = "0-0".to_owned();
        let mut next_stats = Instant::now();
        let mut fatal: Option<String> = None;

        'main: while !stop.is_cancelled() {
            // Settle finished deliveries without waiting.
            if let Err(e) = self.settle(&mut work) {
                fatal = Some(e);
                break 'main;
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
                        if !self.retry_after(&e, &stop).await {
                            break;
                        }
                        continue;
                    }
                }
            }

            if Instant::now() >= next_stats {
                next_stats = Instant::now() + Duration::from_secs(1);
                match self.stats(&mut writer).await {
                    Ok(frontier) => {
                        if let Err(e) = self.write_watermark(frontier).await {
                            fatal = Some(e);
                            break 'main;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(stream = %self.spec.key, error = %e, "XINFO GROUPS failed.");
                    }
                }
            }

            // Back-pressure: nothing more is read while the bound is reached.
            if work.in_flight.len() >= s.max_in_flight {
                self.wait_delivery(&stop, Duration::from_secs(1)).await;
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
                            .filter(|e| !work.in_flight.contains(&e.id))
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
                        if !self.retry_after(&e, &stop).await {
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
                        && !self.retry_after(&e, &stop).await
                    {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    if !self.retry_after(&e, &stop).await {
                        break;
                    }
                    continue;
                }
            };
            self.backoff.succeeded(&self.health, Component::Redis);
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
                if !work.in_flight.is_empty() {
                    self.wait_delivery(&stop, Duration::from_millis(50)).await;
                }
                continue;
            }
            if let Err(e) = self.produce_all(entries, &mut work).await {
                fatal = Some(e);
                break;
            }
        }

        // Drain: wait for in-flight records, then acknowledge what Kafka has.
        self.health.set_phase("draining");
        let deadline = Instant::now() + s.drain_timeout;
        while !work.in_flight.is_empty() && Instant::now() < deadline {
            self.deliveries
                .wait(
                    self.index,
                    deadline.saturating_duration_since(Instant::now()),
                )
                .await;
            if let Err(e) = self.settle(&mut work) {
                fatal.get_or_insert(e);
            }
        }
        if !work.in_flight.is_empty() {
            tracing::warn!(stream = %self.spec.key, left = work.in_flight.len(), "Drain timed out; those entries stay pending and are read again.");
        }
        if !work.acks.is_empty()
            && let Err(e) = self.ack(&mut writer, &work.acks).await
        {
            tracing::warn!(stream = %self.spec.key, error = %e, "Final XACK failed; those entries are read again (same event ids).");
        }
        self.counters.in_flight.set(0.0);
        match fatal {
            Some(e) => Err(StreamError::Delivery(e)),
            None => {
                tracing::info!(stream = %self.spec.key, "Drained; delivered entries acknowledged.");
                Ok(())
            }
        }
    }

    /// Waits for a delivery report (at most `limit`).
    async fn wait_delivery(&self, stop: &CancellationToken, limit: Duration) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = self.deliveries.wait(self.index, limit) => {}
        }
    }

    /// Records finished deliveries: to be acknowledged in Redis, or fatal.
    fn settle(&mut self, work: &mut Work) -> Result<(), String> {
        for d in self.deliveries.take(self.index) {
            work.in_flight.remove(&d.id);
            match d.result {
                // A watermark record: nothing to acknowledge.
                Ok(()) if d.id.is_empty() => {}
                Ok(()) => {
                    self.counters
                        .produced
                        .entry(d.topic.clone())
                        .or_insert_with(|| {
                            counter!(m::RECORDS_PRODUCED, "stage" => "ingest", "topic" => d.topic.to_string())
                        })
                        .increment(1);
                    work.acks.push(d.id);
                }
                Err(e) => {
                    counter!(m::PRODUCE_FAILED, "stage" => "ingest").increment(1);
                    tracing::error!(stream = %self.spec.key, entry = %d.id, error = %e, "Produce failed for good.");
                    return Err(format!("entry {} of {}: {e}", d.id, self.spec.key));
                }
            }
        }
        Ok(())
    }

    async fn ack(&self, con: &mut RedisConn, ids: &[String]) -> Result<(), RedisError> {
        let _: usize = con.xack(&self.spec.key, &self.settings.group, ids).await?;
        self.counters.acked.increment(ids.len() as u64);
        Ok(())
    }

    async fn claim(
        &self,
        con: &mut RedisConn,
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

    /// The group's gauges, and its frontier (`None`: no group yet).
    async fn stats(&self, con: &mut RedisConn) -> Result<Option<Frontier>, RedisError> {
        // The last delivered id first, then the pending entries: an entry
        // delivered in between is above the former, so never counted done.
        let info: StreamInfoGroupsReply = con.xinfo_groups(&self.spec.key).await?;
        let Some(g) = info.groups.iter().find(|g| g.name == self.settings.group) else {
            return Ok(None);
        };
        self.counters.pending.set(g.pending as f64);
        if let Some(lag) = g.lag {
            self.counters.lag.set(lag as f64);
        }
        let delivered = super::entry::added_ms(&g.last_delivered_id);
        let oldest_pending = if g.pending > 0 {
            let reply: StreamPendingReply =
                con.xpending(&self.spec.key, &self.settings.group).await?;
            match reply {
                StreamPendingReply::Data(d) => super::entry::added_ms(&d.start_id),
                StreamPendingReply::Empty => None,
            }
        } else {
            None
        };
        let caught_up = g.pending == 0 && g.lag == Some(0);
        Ok(Some(match (caught_up, oldest_pending) {
            (true, _) if g.last_delivered_id == "0-0" => Frontier::Empty,
            (true, _) => Frontier::CaughtUp,
            (false, Some(p)) => Frontier::At(p),
            (false, None) => Frontier::At(delivered.unwrap_or(watermark::NONE)),
        }))
    }

    /// Writes the stream's mark to every partition of the events topic when
    /// one is due.
    async fn write_watermark(&mut self, frontier: Option<Frontier>) -> Result<(), String> {
        let now = Instant::now();
        let wall = wall_ms();
        let w = &mut self.watermarks;
        let continuous = w
            .last_check
            .is_some_and(|t| now.saturating_duration_since(t) <= Idleness::MAX_GAP);
        w.last_check = Some(now);
        let Some(frontier) = frontier else {
            return Ok(());
        };
        let candidate = match frontier {
            Frontier::Empty => watermark::EMPTY,
            Frontier::At(ms) => {
                w.idle_since = None;
                ms.saturating_sub(w.out_of_orderness_ms)
            }
            Frontier::CaughtUp => {
                if !continuous {
                    w.idle_since = None;
                }
                let since = *w.idle_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= w.idle_timeout {
                    wall.saturating_sub(w.out_of_orderness_ms)
                } else {
                    watermark::NONE
                }
            }
        };
        w.mark = match (w.mark, candidate) {
            (_, watermark::EMPTY) => watermark::EMPTY,
            (watermark::EMPTY, c) => c,
            (m, c) => m.max(c),
        };
        let mut marks = std::collections::BTreeMap::new();
        if w.mark != watermark::NONE
            && let Some(i) = w.writer.source_index(&source_name(&self.spec.key))
        {
            marks.insert((i, 0), w.mark);
        }
        let Some(payload) = w.writer.due(now, wall, marks) else {
            return Ok(());
        };
        let headers: [(&str, &[u8]); 1] =
            [(watermark::CONTROL_HEADER, watermark::WATERMARK.as_bytes())];
        let topic = self
            .topics
            .entry(w.output.clone())
            .or_insert_with(|| Arc::from(w.output.as_str()))
            .clone();
        for q in 0..w.partitions {
            let ticket = Ticket {
                stream: self.index,
                id: String::new(),
                topic: topic.clone(),
            };
            self.producer
                .send_to(&w.output, q, &payload, &headers, ticket)
                .await
                .map_err(|e| vidpulse_core::error_chain(&e))?;
        }
        Ok(())
    }

    /// Normalizes and produces each entry (the producer waits for room when
    /// its queue is full).
    async fn produce_all(&mut self, entries: Vec<StreamId>, work: &mut Work) -> Result<(), String> {
        for entry in entries {
            self.counters.received.increment(1);
            let out = entry_output(
                &self.spec,
                &entry,
                &self.settings.events_topic,
                &self.settings.dlq_topic,
                self.settings.max_payload_bytes,
                self.settings.max_future_ms,
                now_ms(),
            );
            let topic = self
                .topics
                .entry(out.topic.clone())
                .or_insert_with(|| Arc::from(out.topic.as_str()))
                .clone();
            work.in_flight.insert(entry.id.clone());
            let ticket = Ticket {
                stream: self.index,
                id: entry.id,
                topic,
            };
            if let Err(e) = self.producer.send(&out, ticket).await {
                return Err(vidpulse_core::error_chain(&e));
            }
        }
        Ok(())
    }
}

/// Where a stream's consumer group stands.
enum Frontier {
    /// The stream never had an entry.
    Empty,
    /// Nothing pending, nothing undelivered.
    CaughtUp,
    /// Every entry added before this time (ms) is in Kafka.
    At(i64),
}

/// The source name of a stream in watermark records.
pub(crate) fn source_name(key: &str) -> String {
    format!("redis:{key}")
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
