//! The aggregator's Kafka loop: partition ownership with checkpoint restore
//! on assignment, record decoding, flushes (idle advance → emit → write
//! ClickHouse, Redis, late records → checkpoint → store offsets) and
//! shutdown.
//!
//! Delivery guarantee: a partition's checkpoint is written only after every
//! row, leaderboard partial and late record its state emitted was
//! acknowledged, and its offset is stored only after the checkpoint. While a
//! sink fails, the loop retries with backoff, reads nothing (back-pressure)
//! and reports not-ready. On assignment a partition's state comes from its
//! checkpoint (or is empty, reading from the earliest offset) and reading
//! starts at the checkpoint's offset, whatever the group committed. On
//! revoke the state since the last checkpoint is dropped: the next owner
//! re-reads that suffix and, the state machine being deterministic, emits
//! the same rows again, which the idempotent sinks absorb.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use metrics::{Counter, counter, gauge, histogram};
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use vidpulse_core::admin::{self, Health};
use vidpulse_core::metrics as m;
use vidpulse_core::{CancellationToken, dlq, kafka, pipeline};
use vidpulse_proto::{Event, Message as _, MonitoredEvent};

use crate::engine::{Emission, Outcome, PartitionState, Plan};
use crate::record::Rec;
use crate::rowbinary;
use crate::spec::{Input, Spec};
use crate::{AggError, Args, Settings, checkpoint, leaderboard};
use vidpulse_query::clickhouse as ch;
use vidpulse_query::schema::{self, Tables};

const STAGE: &str = "aggregator";

/// Metric: events not counted because their window had closed. Labels: `metric`.
pub const LATE_EVENTS: &str = "vidpulse_aggregator_late_total";
/// Metric: events skipped as duplicates of an event id already counted.
pub const DUPLICATES: &str = "vidpulse_aggregator_duplicates_total";
/// Metric: rows written to ClickHouse. Labels: `table`.
pub const ROWS_WRITTEN: &str = "vidpulse_aggregator_rows_written_total";
/// Metric: leaderboard partials written to Redis. Labels: `board`.
pub const PARTIALS_WRITTEN: &str = "vidpulse_aggregator_partials_written_total";
/// Metric: flush duration in seconds (writes + checkpoints).
pub const FLUSH_SECONDS: &str = "vidpulse_aggregator_flush_seconds";
/// Metric: sink write failures (each retry counts). Labels: `stage`, `sink`.
pub const SINK_ERRORS: &str = "vidpulse_sink_errors_total";
/// Metric: a partition's watermark, epoch ms. Labels: `topic`, `partition`.
pub const WATERMARK: &str = "vidpulse_aggregator_watermark_ms";
/// Metric: partitions whose state came back from a checkpoint on assignment.
pub const RESTORED: &str = "vidpulse_aggregator_checkpoints_restored_total";
/// Metric: input partitions this instance owns (restored and reading).
pub const PARTITIONS_OWNED: &str = "vidpulse_aggregator_partitions_owned";
/// Metric: records read since the last completed flush (not yet covered by
/// a checkpoint).
pub const UNFLUSHED: &str = "vidpulse_aggregator_records_unflushed";
/// Metric: partitions whose checkpoint write was fenced by a newer owner.
pub const FENCED: &str = "vidpulse_aggregator_fenced_total";

/// (input topic index, partition)
type Tp = (usize, i32);

/// A partition handed over by the rebalance callback.
enum Change {
    Assigned {
        tp: Tp,
        epoch: i64,
        state: Box<PartitionState>,
    },
    Revoked(Tp),
}

/// What the rebalance callback needs.
struct Shared {
    group: String,
    /// Full input topic names and what they carry.
    topics: Vec<(String, Input)>,
    plan: Arc<Plan>,
    redis: redis::Client,
    reset_state: bool,
    /// Checkpoints already reset by this process (reset happens once).
    reset_done: Mutex<std::collections::HashSet<String>>,
    changes: Mutex<Vec<Change>>,
    shutdown: CancellationToken,
    health: Health,
    lag: Mutex<HashMap<(String, i32), metrics::Gauge>>,
}

impl Shared {
    fn topic_index(&self, topic: &str) -> Option<usize> {
        self.topics.iter().position(|(t, _)| t == topic)
    }

    /// Takes ownership of a partition and restores its state; blocks (Redis)
    /// and retries until it succeeds or the stage shuts down.
    fn restore(&self, ti: usize, partition: i32) -> Option<(i64, PartitionState)> {
        let (topic, input) = &self.topics[ti];
        let key = checkpoint::key(&self.group, topic, partition);
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.try_restore(&key, *input) {
                Ok(r) => return Some(r),
                Err(error) => {
                    if self.shutdown.is_cancelled() {
                        return None;
                    }
                    tracing::warn!(topic, partition, %error, "Checkpoint restore failed; retrying.");
                    self.health
                        .set_not_ready(format!("checkpoint store unavailable: {error}"));
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn try_restore(&self, key: &str, input: Input) -> redis::RedisResult<(i64, PartitionState)> {
        let mut con = self
            .redis
            .get_connection_with_timeout(Duration::from_secs(5))?;
        let loaded = checkpoint::load(&mut con, key)?;
        let reset = self.reset_state
            && self
                .reset_done
                .lock()
                .map(|mut d| d.insert(key.to_owned()))
                .unwrap_or(false);
        if loaded.fields.is_empty() {
            return Ok((loaded.epoch, PartitionState::new(&self.plan, input)));
        }
        if !reset {
            match PartitionState::restore(&self.plan, input, &loaded.fields) {
                Ok(s) => {
                    counter!(RESTORED, "stage" => STAGE).increment(1);
                    tracing::info!(
                        key,
                        next_offset = s.next_offset,
                        watermark = s.watermark(),
                        open_panes = s.open_panes(),
                        "Restored checkpoint."
                    );
                    return Ok((loaded.epoch, s));
                }
                Err(error) => {
                    tracing::warn!(key, %error, "Checkpoint unusable; starting this partition from the earliest offset with empty state.");
                }
            }
        } else {
            tracing::info!(
                key,
                "--reset-state: dropping the checkpoint; re-reading from the earliest offset."
            );
        }
        checkpoint::clear(&mut con, key, loaded.epoch)?;
        Ok((loaded.epoch, PartitionState::new(&self.plan, input)))
    }

    fn push(&self, c: Change) {
        if let Ok(mut v) = self.changes.lock() {
            v.push(c);
        }
    }
}

struct Ctx(Arc<Shared>);

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        vidpulse_core::pipeline::log_rdkafka(level, fac, msg);
    }

    fn stats(&self, stats: Statistics) {
        if let Ok(mut gauges) = self.0.lag.lock() {
            vidpulse_core::pipeline::record_lag(STAGE, &stats, &mut gauges);
        }
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                for (topic, partition) in parts {
                    let Some(ti) = self.0.topic_index(&topic) else {
                        continue;
                    };
                    let offset = match self.0.restore(ti, partition) {
                        Some((epoch, state)) => {
                            let offset = if state.next_offset >= 0 {
                                Offset::Offset(state.next_offset)
                            } else {
                                Offset::Beginning
                            };
                            self.0.push(Change::Assigned {
                                tp: (ti, partition),
                                epoch,
                                state: Box::new(state),
                            });
                            offset
                        }
                        // Shutting down: take it, read nothing from it.
                        None => Offset::End,
                    };
                    if let Err(error) = tpl.set_partition_offset(&topic, partition, offset) {
                        tracing::warn!(topic, partition, %error, "Cannot set the start offset.");
                    }
                }
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(error) = r {
                    tracing::error!(%error, "Assign failed.");
                }
                tracing::info!(
                    partitions = tpl.count(),
                    "Partitions assigned; state restored from checkpoints."
                );
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                for e in tpl.elements() {
                    if let Some(ti) = self.0.topic_index(e.topic()) {
                        self.0.push(Change::Revoked((ti, e.partition())));
                    }
                }
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(error) = r {
                    tracing::warn!(%error, "Unassign failed.");
                }
                tracing::info!(
                    partitions = tpl.count(),
                    "Partitions revoked; their unflushed state is dropped (the next owner re-reads it)."
                );
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::error!(error = %code, "Rebalance error; dropping the assignment.");
                for e in tpl.elements() {
                    if let Some(ti) = self.0.topic_index(e.topic()) {
                        self.0.push(Change::Revoked((ti, e.partition())));
                    }
                }
                let _ = consumer.unassign();
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(error) = result
            && !matches!(
                error,
                KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)
            )
        {
            counter!(m::COMMIT_FAILED, "stage" => STAGE).increment(1);
            tracing::debug!(%error, "Offset commit failed (offsets only feed lag metrics; checkpoints are the truth).");
        }
    }
}

/// A partition this instance owns.
struct Owned {
    epoch: i64,
    key: String,
    state: PartitionState,
    last_record: Instant,
    watermark: metrics::Gauge,
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Backoff between attempts of one sink write.
struct Retry<'a> {
    what: &'static str,
    attempts: u32,
    backoff: Duration,
    settings: &'a Settings,
    health: &'a Health,
    shutdown: &'a CancellationToken,
}

/// Why a flush did not complete.
enum FlushError {
    /// The stage is stopping; the checkpoint stays where it was.
    Stopping,
    Fatal(AggError),
}

impl From<AggError> for FlushError {
    fn from(e: AggError) -> Self {
        FlushError::Fatal(e)
    }
}

impl<'a> Retry<'a> {
    fn new(
        what: &'static str,
        settings: &'a Settings,
        health: &'a Health,
        shutdown: &'a CancellationToken,
    ) -> Self {
        Retry {
            what,
            attempts: 0,
            backoff: settings.min_backoff,
            settings,
            health,
            shutdown,
        }
    }

    async fn failed(&mut self, error: &dyn std::fmt::Display) -> Result<(), FlushError> {
        self.attempts += 1;
        counter!(SINK_ERRORS, "stage" => STAGE, "sink" => self.what).increment(1);
        if self.settings.sink_max_retries > 0 && self.attempts >= self.settings.sink_max_retries {
            return Err(FlushError::Fatal(AggError::GaveUp {
                what: self.what,
                attempts: self.attempts,
                last: error.to_string(),
            }));
        }
        tracing::warn!(sink = self.what, attempt = self.attempts, retry_in = ?self.backoff, %error, "Sink write failed; retrying (nothing is read meanwhile).");
        self.health
            .set_not_ready(format!("{} unavailable: {error}", self.what));
        tokio::select! {
            _ = self.shutdown.cancelled() => return Err(FlushError::Stopping),
            _ = tokio::time::sleep(self.backoff) => {}
        }
        self.backoff = (self.backoff * 2).min(self.settings.max_backoff);
        Ok(())
    }
}

struct Stage {
    plan: Arc<Plan>,
    settings: Settings,
    shared: Arc<Shared>,
    producer: FutureProducer,
    deliveries: Vec<Delivery>,
    ch: clickhouse::Client,
    tables: Tables,
    redis: redis::aio::ConnectionManager,
    board_script: redis::Script,
    ckpt_script: redis::Script,
    prefix: String,
    parts: HashMap<Tp, Owned>,
    health: Health,
    shutdown: CancellationToken,
    since_flush: usize,
    last_flush: Instant,
    last_early: Instant,
    received: Vec<Counter>,
    duplicates: Counter,
}

pub(crate) async fn run(
    args: Args,
    spec: Spec,
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<(), AggError> {
    let tables = args.clickhouse.tables(&args.kafka.topic_prefix);
    if args.print_spec {
        print!("{}", crate::spec::DEFAULT_SPEC);
        return Ok(());
    }
    if args.print_ddl {
        print!("{}", schema::describe_schema(&tables, &spec));
        return Ok(());
    }
    let health = Health::new();
    admin::serve(settings.admin_addr, health.clone(), shutdown.clone())
        .await
        .map_err(AggError::Admin)?;
    vidpulse_core::metrics::install();

    let plan = Arc::new(Plan::new(
        spec,
        settings.default_grace_ms,
        settings.out_of_orderness_ms,
    ));
    let client = args.clickhouse.client();

    // Tables first: retried while ClickHouse is unreachable.
    {
        let mut retry = Retry::new("clickhouse", &settings, &health, &shutdown);
        loop {
            match schema::ensure_schema(&client, &tables, &plan.spec).await {
                Ok(()) => break,
                Err(e) if e.retriable => match retry.failed(&e).await {
                    Ok(()) => {}
                    Err(FlushError::Stopping) => return Ok(()),
                    Err(FlushError::Fatal(e)) => return Err(e),
                },
                Err(e) => return Err(e.into()),
            }
        }
    }
    tracing::info!(database = %tables.database, metrics = plan.spec.metrics.len(), logs = plan.spec.logs.len(), "ClickHouse tables and views ready.");

    let redis_client = redis::Client::open(args.redis.redis_url.as_str())?;
    let redis = loop {
        match redis::aio::ConnectionManager::new(redis_client.clone()).await {
            Ok(c) => break c,
            Err(error) => {
                tracing::warn!(%error, "Redis unavailable; retrying.");
                health.set_not_ready(format!("redis unavailable: {error}"));
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };

    let topics: Vec<(String, Input)> = plan
        .spec
        .inputs()
        .into_iter()
        .map(|i| (args.kafka.topic(i.topic()), i))
        .collect();
    let group = args.kafka.topic(&settings.group);
    let shared = Arc::new(Shared {
        group: group.clone(),
        topics: topics.clone(),
        plan: plan.clone(),
        redis: redis_client,
        reset_state: settings.reset_state,
        reset_done: Mutex::new(Default::default()),
        changes: Mutex::new(Vec::new()),
        shutdown: shutdown.clone(),
        health: health.clone(),
        lag: Mutex::new(HashMap::new()),
    });
    let consumer: StreamConsumer<Ctx> = StreamConsumer::from_config_and_context(
        &kafka::consumer_config(&args.kafka, &settings.group)?,
        Ctx(shared.clone()),
    )?;
    for (t, _) in &topics {
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
        let ok = md
            .topics()
            .iter()
            .any(|x| x.name() == t && x.error().is_none() && !x.partitions().is_empty());
        if !ok {
            return Err(AggError::MissingTopic(t.clone()));
        }
    }
    let producer: FutureProducer = kafka::producer_config(&args.kafka)?.create()?;
    let names: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();
    consumer.subscribe(&names)?;
    tracing::info!(group, topics = ?names, "Consuming.");
    health.set_ready();

    let received = topics
        .iter()
        .map(|(t, _)| counter!(m::RECORDS_RECEIVED, "stage" => STAGE, "topic" => t.clone()))
        .collect();
    let mut stage = Stage {
        plan,
        settings,
        shared,
        producer,
        deliveries: Vec::new(),
        ch: client,
        tables,
        redis,
        board_script: leaderboard::script(),
        ckpt_script: checkpoint::write_script(),
        prefix: args.kafka.topic_prefix.clone(),
        parts: HashMap::new(),
        health,
        shutdown,
        since_flush: 0,
        last_flush: Instant::now(),
        last_early: Instant::now(),
        received,
        duplicates: counter!(DUPLICATES, "stage" => STAGE),
    };
    stage.run(&consumer).await
}

impl Stage {
    async fn run(&mut self, consumer: &StreamConsumer<Ctx>) -> Result<(), AggError> {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            let msg = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break Ok(()),
                _ = tick.tick() => {
                    self.apply_changes();
                    gauge!(UNFLUSHED, "stage" => STAGE).set(self.since_flush as f64);
                    if self.flush_due() {
                        match self.flush(consumer).await {
                            Ok(()) => {}
                            Err(FlushError::Stopping) => break Ok(()),
                            Err(FlushError::Fatal(e)) => break Err(e),
                        }
                    }
                    continue;
                }
                msg = consumer.recv() => msg,
            };
            self.apply_changes();
            match msg {
                Ok(msg) => self.handle(&msg).await,
                Err(error) => {
                    tracing::warn!(%error, "Consume error; retrying.");
                    continue;
                }
            }
            if self.since_flush >= self.settings.flush_max_rows {
                match self.flush(consumer).await {
                    Ok(()) => {}
                    Err(FlushError::Stopping) => break Ok(()),
                    Err(FlushError::Fatal(e)) => break Err(e),
                }
            }
        };
        self.health.set_not_ready("draining");
        if result.is_ok() && !self.parts.is_empty() {
            // A last flush so a restart re-reads as little as possible; if
            // a sink is down it is abandoned at once (a second signal) or
            // when the shutdown token is already cancelled: the checkpoint
            // then stays where it was, which is just as exact.
            let stop = CancellationToken::new();
            let shutdown = std::mem::replace(&mut self.shutdown, stop.clone());
            let guard = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                stop.cancel();
            });
            match self.flush(consumer).await {
                Ok(()) => tracing::info!("Final flush done; checkpoints written."),
                Err(FlushError::Stopping) => tracing::warn!(
                    "Final flush abandoned; a restart re-reads from the last checkpoint."
                ),
                Err(FlushError::Fatal(e)) => {
                    tracing::warn!(error = %e, "Final flush failed; a restart re-reads from the last checkpoint.")
                }
            }
            guard.abort();
            self.shutdown = shutdown;
        }
        if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(%error, "Final commit failed.");
        }
        if let Err(e) = &result {
            self.health.set_not_ready(format!("failed: {e}"));
        }
        result
    }

    fn apply_changes(&mut self) {
        let changes = match self.shared.changes.lock() {
            Ok(mut c) if !c.is_empty() => std::mem::take(&mut *c),
            _ => return,
        };
        for c in changes {
            match c {
                Change::Assigned { tp, epoch, state } => {
                    let (topic, _) = &self.shared.topics[tp.0];
                    let key = checkpoint::key(&self.shared.group, topic, tp.1);
                    let watermark = gauge!(WATERMARK, "topic" => topic.clone(), "partition" => tp.1.to_string());
                    self.parts.insert(
                        tp,
                        Owned {
                            epoch,
                            key,
                            state: *state,
                            last_record: Instant::now(),
                            watermark,
                        },
                    );
                    if self
                        .health
                        .not_ready_reason()
                        .is_some_and(|r| r.starts_with("checkpoint store"))
                    {
                        self.health.set_ready();
                    }
                }
                Change::Revoked(tp) => {
                    self.parts.remove(&tp);
                }
            }
        }
        gauge!(PARTITIONS_OWNED, "stage" => STAGE).set(self.parts.len() as f64);
    }

    fn flush_due(&self) -> bool {
        if self.last_flush.elapsed() < self.settings.flush_interval {
            return false;
        }
        if self.since_flush > 0 {
            return true;
        }
        if self
            .settings
            .early_emit
            .is_some_and(|e| self.last_early.elapsed() >= e)
            && self.parts.values().any(|p| p.state.open_panes() > 0)
        {
            return true;
        }
        // Idle partitions whose watermark may close something.
        self.parts.values().any(|p| {
            p.last_record.elapsed() >= self.settings.idle_timeout && p.state.has_open_state()
        })
    }

    async fn handle(&mut self, msg: &BorrowedMessage<'_>) {
        let Some(ti) = self.shared.topic_index(msg.topic()) else {
            return;
        };
        let tp = (ti, msg.partition());
        let Some(owned) = self.parts.get_mut(&tp) else {
            // Fetched before a revoke, or not restored: not ours to count.
            return;
        };
        self.received[ti].increment(1);
        owned.last_record = Instant::now();
        let offset = msg.offset();
        if offset < owned.state.next_offset {
            return;
        }
        self.since_flush += 1;
        let input = self.shared.topics[ti].1;
        let payload = msg.payload().unwrap_or_default();
        let decoded = match input {
            Input::Events => Event::decode(payload)
                .map(|e| Decoded {
                    event: e,
                    pools: Vec::new(),
                    enrichment: None,
                })
                .map_err(|e| e.to_string()),
            Input::Monitored => MonitoredEvent::decode(payload)
                .map_err(|e| e.to_string())
                .and_then(|me| match me.event {
                    Some(event) => Ok(Decoded {
                        event,
                        pools: me.pools,
                        enrichment: Some(me.enrichment),
                    }),
                    None => Err("monitored record without an event".into()),
                }),
        };
        let Decoded {
            event,
            pools,
            enrichment,
        } = match decoded {
            Ok(d) => d,
            Err(detail) => {
                owned.state.skip(offset);
                counter!(m::RECORDS_DLQ, "stage" => STAGE, "reason" => "invalid_protobuf")
                    .increment(1);
                let input = pipeline::Input {
                    topic: msg.topic(),
                    partition: msg.partition(),
                    offset,
                    key: msg.key(),
                    payload: msg.payload(),
                    timestamp_ms: msg.timestamp().to_millis(),
                    headers: &[],
                };
                let what = input_kind(&self.shared.topics[ti].1);
                let out = dlq::record(
                    &self.settings.dlq_topic,
                    STAGE,
                    &input,
                    "invalid_protobuf",
                    &format!("not a {what}: {detail}"),
                );
                self.produce(out.topic, out.key, out.payload, out.headers)
                    .await;
                return;
            }
        };
        let Some(rec) = Rec::new(&event, &pools, enrichment.as_ref()) else {
            owned.state.skip(offset);
            counter!(m::RECORDS_DROPPED, "stage" => STAGE, "reason" => "unknown_kind").increment(1);
            return;
        };
        match owned.state.process(&self.plan, &rec, offset) {
            Outcome::Stale | Outcome::Ignored => {}
            Outcome::Duplicate => self.duplicates.increment(1),
            Outcome::Counted { late } => {
                if !late.is_empty() {
                    for name in &late {
                        counter!(LATE_EVENTS, "metric" => name.clone()).increment(1);
                    }
                    let watermark = owned.state.watermark();
                    let headers = vec![
                        ("vp.late.for", late.join(",").into_bytes()),
                        ("vp.watermark", watermark.to_string().into_bytes()),
                        ("vp.kind", rec.kind.as_str().as_bytes().to_vec()),
                        (dlq::H_STAGE, STAGE.as_bytes().to_vec()),
                        (dlq::H_TOPIC, msg.topic().as_bytes().to_vec()),
                        (dlq::H_PARTITION, msg.partition().to_string().into_bytes()),
                        (dlq::H_OFFSET, offset.to_string().into_bytes()),
                    ];
                    self.produce(
                        self.settings.late_topic.clone(),
                        msg.key().map(<[u8]>::to_vec),
                        msg.payload().map(<[u8]>::to_vec),
                        headers,
                    )
                    .await;
                }
            }
        }
    }

    /// Produces a side record (late or dead letter); its delivery is awaited
    /// before the next checkpoint.
    async fn produce(
        &mut self,
        topic: String,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        headers: Vec<(&'static str, Vec<u8>)>,
    ) {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in &headers {
            h = h.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(h);
        if let Some(k) = &key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = &payload {
            record = record.payload(p.as_slice());
        }
        loop {
            match self.producer.send_result(record) {
                Ok(f) => {
                    self.deliveries.push(Delivery::Pending(topic, f));
                    return;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => {
                    // The delivery check at the next flush stops the stage
                    // before its checkpoint.
                    self.deliveries
                        .push(Delivery::Refused(topic, error.to_string()));
                    return;
                }
            }
        }
    }

    async fn flush(&mut self, consumer: &StreamConsumer<Ctx>) -> Result<(), FlushError> {
        let started = Instant::now();
        let early = self
            .settings
            .early_emit
            .is_some_and(|e| self.last_early.elapsed() >= e);
        if early {
            self.last_early = Instant::now();
        }
        let wall = wall_ms();
        let idle_timeout_ms =
            i64::try_from(self.settings.idle_timeout.as_millis()).unwrap_or(i64::MAX);

        // 1. Idle advance and emission.
        let mut emitted: Vec<(Tp, Emission)> = Vec::with_capacity(self.parts.len());
        for (tp, owned) in self.parts.iter_mut() {
            let idle_for =
                i64::try_from(owned.last_record.elapsed().as_millis()).unwrap_or(i64::MAX);
            if owned.state.has_open_state() {
                owned
                    .state
                    .advance_idle(&self.plan, idle_for, idle_timeout_ms, wall);
            }
            let e = owned.state.emit(&self.plan, early);
            owned.watermark.set(owned.state.watermark().max(0) as f64);
            if !e.is_empty() {
                emitted.push((*tp, e));
            }
        }

        // 2. ClickHouse: one insert per table, every partition's rows in it.
        let spec = &self.plan.spec;
        let mut metric_bufs: Vec<(Vec<u8>, usize)> = vec![(Vec::new(), 0); spec.metrics.len()];
        let mut log_bufs: Vec<(Vec<u8>, usize)> = vec![(Vec::new(), 0); spec.logs.len()];
        for ((_, partition), e) in &emitted {
            for r in &e.rows {
                let (buf, n) = &mut metric_bufs[r.metric];
                rowbinary::encode_metric_row(buf, &spec.metrics[r.metric], *partition, r);
                *n += 1;
            }
            for r in &e.logs {
                let (buf, n) = &mut log_bufs[r.log];
                rowbinary::encode_log_row(buf, &spec.logs[r.log], *partition, r);
                *n += 1;
            }
        }
        let mut inserts: Vec<(String, Bytes, usize)> = Vec::new();
        for (i, (buf, n)) in metric_bufs.into_iter().enumerate() {
            if n > 0 {
                inserts.push((spec.metrics[i].name.clone(), Bytes::from(buf), n));
            }
        }
        for (i, (buf, n)) in log_bufs.into_iter().enumerate() {
            if n > 0 {
                inserts.push((spec.logs[i].name.clone(), Bytes::from(buf), n));
            }
        }
        let t_emit = started.elapsed();
        // Tables are written concurrently; each insert retries on its own.
        let writes = inserts.into_iter().map(|(name, data, n)| {
            let table = self.tables.insert_target(&name);
            let client = &self.ch;
            let (settings, health, shutdown) = (&self.settings, &self.health, &self.shutdown);
            async move {
                let mut retry = Retry::new("clickhouse", settings, health, shutdown);
                loop {
                    match ch::insert(client, &table, data.clone()).await {
                        Ok(()) => break,
                        Err(e) if e.retriable => retry.failed(&e).await?,
                        Err(e) => return Err(FlushError::Fatal(e.into())),
                    }
                }
                counter!(ROWS_WRITTEN, "table" => name).increment(n as u64);
                Ok::<(), FlushError>(())
            }
        });
        futures::future::try_join_all(writes).await?;
        let t_ch = started.elapsed();

        // 3. Leaderboards: one atomic script per window (its sets share a
        // hash slot), every partition's partials in it.
        let mut rows = Vec::new();
        for ((ti, partition), e) in &emitted {
            if e.boards.is_empty() {
                continue;
            }
            let part = format!("{}:{partition}", self.shared.topics[*ti].1.name());
            rows.extend(leaderboard::batches(
                &self.prefix,
                &spec.leaderboards,
                &part,
                &e.boards,
            ));
            for r in &e.boards {
                counter!(PARTIALS_WRITTEN, "board" => spec.leaderboards[r.board].name.clone())
                    .increment(1);
            }
        }
        let groups = leaderboard::by_slot(rows);
        let writes = groups.iter().map(|group| {
            let mut con = self.redis.clone();
            let script = &self.board_script;
            let (settings, health, shutdown) = (&self.settings, &self.health, &self.shutdown);
            async move {
                let mut retry = Retry::new("redis", settings, health, shutdown);
                loop {
                    match leaderboard::apply(&mut con, script, group).await {
                        Ok(_) => return Ok::<(), FlushError>(()),
                        Err(e) => retry.failed(&e).await?,
                    }
                }
            }
        });
        futures::future::try_join_all(writes).await?;
        let t_boards = started.elapsed();

        // 4. Late records and dead letters.
        for d in std::mem::take(&mut self.deliveries) {
            let (topic, result) = match d {
                Delivery::Pending(topic, f) => match f.await {
                    Ok(Ok(_)) => (topic, Ok(())),
                    Ok(Err((error, _))) => (topic, Err(error.to_string())),
                    Err(_) => (topic, Err("delivery report lost".to_owned())),
                },
                Delivery::Refused(topic, message) => (topic, Err(message)),
            };
            match result {
                Ok(()) => {
                    counter!(m::RECORDS_PRODUCED, "stage" => STAGE, "topic" => topic).increment(1)
                }
                Err(message) => {
                    counter!(m::PRODUCE_FAILED, "stage" => STAGE).increment(1);
                    return Err(FlushError::Fatal(AggError::Produce { topic, message }));
                }
            }
        }

        let t_late = started.elapsed();

        // 5. Checkpoints (concurrently, one atomic script per partition),
        // then offsets.
        let mut deltas = Vec::new();
        for (tp, owned) in self.parts.iter_mut() {
            if owned.state.dirty() {
                let delta = owned.state.checkpoint_delta(&self.plan);
                deltas.push((
                    *tp,
                    owned.key.clone(),
                    owned.epoch,
                    owned.state.next_offset,
                    delta,
                ));
            }
        }
        let writes = deltas.iter().map(|(_, key, epoch, _, delta)| {
            let mut con = self.redis.clone();
            let script = &self.ckpt_script;
            let (settings, health, shutdown) = (&self.settings, &self.health, &self.shutdown);
            async move {
                let mut retry = Retry::new("redis", settings, health, shutdown);
                loop {
                    match checkpoint::write(&mut con, script, key, *epoch, delta).await {
                        Ok(w) => return Ok::<bool, FlushError>(w),
                        Err(e) => retry.failed(&e).await?,
                    }
                }
            }
        });
        let written = futures::future::try_join_all(writes).await?;
        let mut fenced = Vec::new();
        let mut tpl = TopicPartitionList::new();
        for ((tp, _, _, next_offset, _), ok) in deltas.iter().zip(written) {
            if !ok {
                fenced.push(*tp);
            } else if *next_offset >= 0 {
                let _ = tpl.add_partition_offset(
                    &self.shared.topics[tp.0].0,
                    tp.1,
                    Offset::Offset(*next_offset),
                );
            }
        }
        for tp in fenced {
            counter!(FENCED, "stage" => STAGE).increment(1);
            tracing::warn!(topic = %self.shared.topics[tp.0].0, partition = tp.1, "Checkpoint fenced: another instance owns this partition now; dropping it here.");
            self.parts.remove(&tp);
            gauge!(PARTITIONS_OWNED, "stage" => STAGE).set(self.parts.len() as f64);
        }
        if tpl.count() > 0
            && let Err(error) = consumer.store_offsets(&tpl)
        {
            tracing::debug!(%error, "Offset store failed (partition revoked?).");
        }

        if self.health.not_ready_reason().is_some() {
            tracing::info!("Sinks answer again; consuming.");
            self.health.set_ready();
        }
        // Time spent flushing does not count as idleness.
        let took = started.elapsed();
        for owned in self.parts.values_mut() {
            owned.last_record += took;
        }
        histogram!(FLUSH_SECONDS).record(took.as_secs_f64());
        tracing::debug!(
            records = self.since_flush,
            emit_ms = t_emit.as_millis(),
            clickhouse_ms = (t_ch - t_emit).as_millis(),
            leaderboards_ms = (t_boards - t_ch).as_millis(),
            late_ms = (t_late - t_boards).as_millis(),
            checkpoints_ms = (took - t_late).as_millis(),
            checkpoint_fields = deltas
                .iter()
                .map(|d| d.4.set.len() + d.4.del.len())
                .sum::<usize>(),
            "Flushed."
        );
        self.since_flush = 0;
        gauge!(UNFLUSHED, "stage" => STAGE).set(0.0);
        self.last_flush = Instant::now();
        Ok(())
    }
}

fn input_kind(i: &Input) -> &'static str {
    match i {
        Input::Events => "vidpulse.v1.Event",
        Input::Monitored => "vidpulse.v1.MonitoredEvent",
    }
}

/// An input record's event, with what the monitor added.
struct Decoded {
    event: Event,
    pools: Vec<String>,
    enrichment: Option<HashMap<String, String>>,
}

/// A side record on its way.
enum Delivery {
    Pending(String, DeliveryFuture),
    Refused(String, String),
}
