//! The aggregator on the stage runtime: partition ownership with checkpoint
//! restore on assignment ([`restore`]), record decoding into the per-
//! partition state machines (`process`), and flushes on a tick ([`flush`]):
//! emit → write ClickHouse and Redis → await the late records and dead
//! letters → checkpoint → report the durable offset.
//!
//! Delivery guarantee: a partition's checkpoint is written only after every
//! row, leaderboard partial and side record its state emitted was
//! acknowledged, and its offset is committed only after the checkpoint
//! ([`Commit::WhenDurable`]). While a sink fails, the runtime retries the
//! same flush with backoff, reads nothing (back-pressure) and reports
//! not-ready. On assignment a partition's state comes from its checkpoint (or
//! is empty, reading from the earliest offset) and reading starts at the
//! checkpoint's offset, whatever the group committed. On revoke the state
//! since the last checkpoint is dropped: the next owner re-reads that suffix
//! and, the state machine being deterministic, emits the same rows again,
//! which the idempotent sinks absorb.

mod flush;
mod metrics;
mod report;
mod restore;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::metrics::{Counter, Gauge, counter, gauge, histogram};
use vidpulse_core::admin::{self, Health};
use vidpulse_core::health::Component;
use vidpulse_core::retry::{Backoff, retry};
use vidpulse_core::runtime::{
    self, Commit, InputPartition, Output, Outputs, Record, Stage, StageError, StageSettings,
    StartAt, Tick,
};
use vidpulse_core::{CancellationToken, dlq, metrics as m, watermark};
use vidpulse_proto::{Event, Message as _, MonitoredEvent};
use vidpulse_query::schema::{self, Tables};
use vidpulse_query::spec::{Input, Spec};

use crate::engine::{Outcome, PartitionState, Plan};
use crate::lineage::{self, Generations};
use crate::record::Rec;
use crate::{AggError, Args, Settings, checkpoint, leaderboard};
use flush::Pending;
pub use metrics::*;
use restore::{Gap, TakeOver};

pub(crate) const STAGE: &str = "aggregator";
/// Longest wait for the state store to connect or answer one call (a
/// leaderboard script of thousands of partials included).
const REDIS_TIMEOUT: Duration = Duration::from_secs(20);

/// A partition this instance owns.
struct Owned {
    epoch: i64,
    /// The record the checkpoint was taken after, (offset, timestamp), to
    /// check once reading resumes there.
    verify: Option<(i64, i64)>,
    key: String,
    /// Its checkpoint hash exists in the store (restored or written).
    existing: bool,
    /// Writes the hash holds: restored count plus acknowledged writes.
    seq: u64,
    state: PartitionState,
    last_record: Instant,
    watermark: Gauge,
    watermark_lag: Gauge,
}

/// Where results go.
pub(crate) struct Sinks {
    ch: clickhouse::Client,
    tables: Tables,
    redis: vidpulse_core::redis::RedisConn,
    /// Replicas that must hold the leaderboard partials before the
    /// checkpoint marking them written goes out.
    replication: vidpulse_core::redis::Replication,
    board_script: redis::Script,
    ckpt_script: redis::Script,
    prefix: String,
    /// The generation of every row and partial written.
    gens: Generations,
}

struct Aggregator {
    plan: Arc<Plan>,
    settings: Settings,
    /// Input topics (full names) and what they carry, in the runtime's order.
    topics: Vec<(String, Input)>,
    /// Consumer group, full name (it names the checkpoints).
    group: String,
    /// This state's lineage ([`crate::lineage`]).
    lineage: u64,
    /// Partition bounds (ListOffsets), and the reader config for the first
    /// record kept (messages).
    probe: Arc<rdkafka::consumer::BaseConsumer>,
    reader: rdkafka::ClientConfig,
    parts: HashMap<InputPartition, Owned>,
    sinks: Sinks,
    /// A flush that is not acknowledged yet; nothing new is flushed (or
    /// read: the runtime retries) before it is.
    pending: Option<Pending>,
    /// Checkpoints `--reset-state` already dropped (once per process).
    reset_done: HashSet<String>,
    since_flush: usize,
    last_flush: Instant,
    last_early: Instant,
    /// When the state's size was last sampled.
    last_sized: Option<Instant>,
    duplicates: Counter,
    owned_gauge: Gauge,
    unflushed: Gauge,
    health: Health,
    /// The source last reported as holding the watermark back.
    held_by: Option<String>,
    last_report: Instant,
    /// Partitions replayed after the store lost their state, with the
    /// offset they had reached: not ready until they are back there.
    recovering: HashMap<InputPartition, i64>,
    recovering_reported: bool,
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Starts the aggregator: tables, Redis, then the runtime.
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

    let plan = Arc::new(
        Plan::with_clock(
            spec,
            settings.default_grace_ms,
            settings.out_of_orderness_ms,
            settings.clock,
        )
        .with_dedup_horizon(settings.dedup_horizon_ms)
        .with_room_idle(settings.room_idle_ms),
    );
    let client = args.clickhouse.client();
    let mut backoff = Backoff::new(settings.loop_.min_backoff, settings.loop_.max_backoff);

    // Tables first: retried while ClickHouse is unreachable.
    let created = retry(
        &mut backoff,
        &health,
        Component::ClickHouse,
        &shutdown,
        |e: &vidpulse_query::ChError| e.retriable,
        || schema::ensure_schema(&client, &tables, &plan.spec),
    )
    .await;
    match created {
        None => return Ok(()),
        Some(r) => r?,
    }
    tracing::info!(database = %tables.database, metrics = plan.spec.metrics.len(), logs = plan.spec.logs.len(), "ClickHouse tables and views ready.");

    let redis_client = args.redis.client()?;
    let redis = retry(
        &mut backoff,
        &health,
        Component::Redis,
        &shutdown,
        // Not the wrong mode (a cluster node without --redis-cluster).
        |e: &redis::RedisError| !vidpulse_core::redis::is_mode_error(e),
        || {
            // Bounded calls: a store that hangs is a failing store (retried
            // with back-pressure), never a stage that stops answering.
            redis_client.connect_managed(vidpulse_core::redis::ConnectOptions::timeouts(
                REDIS_TIMEOUT,
            ))
        },
    )
    .await;
    let mut redis = match redis {
        None => return Ok(()),
        Some(r) => r?,
    };
    let replication = args.replication.replication();
    replication.check(&mut redis).await?;
    // Checkpoints must survive the store: say loudly when they cannot.
    match checkpoint::durability(&mut redis).await {
        Ok(None) => {}
        Ok(Some(why)) => {
            tracing::error!(%why, "The checkpoint store (Redis) may lose data: a loss is detected and replayed from the earliest offsets, which is exact but slow. Turn on persistence (appendonly yes) and maxmemory-policy noeviction.");
            health.set_detail("checkpoint store", Some(format!("may lose data: {why}")));
        }
        Err(error) => {
            tracing::warn!(%error, "Cannot read the checkpoint store's configuration (CONFIG GET refused?); make sure it persists data and never evicts keys.");
        }
    }

    // The lineage, then the generation of everything written.
    let group = args.kafka.topic(&settings.group);
    let resolved =
        retry(
            &mut backoff,
            &health,
            Component::Checkpoints,
            &shutdown,
            |e: &lineage::LineageError| match e {
                lineage::LineageError::Redis(_) => true,
                lineage::LineageError::ClickHouse(c) => c.retriable,
            },
            || {
                let mut con = redis.clone();
                let (client, tables, group) = (&client, &tables, &group);
                async move {
                    lineage::resolve(&mut con, client, tables, group, settings.reset_state).await
                }
            },
        )
        .await;
    let (lineage_id, origin) = match resolved {
        None => return Ok(()),
        Some(r) => r?,
    };
    let clock = match settings.clock {
        crate::window::ClockMode::InBand => "in-band",
        crate::window::ClockMode::MaxEventTime => "max-event-time",
    };
    let defaults = vidpulse_query::generation::Defaults {
        grace_ms: settings.default_grace_ms,
        out_of_orderness_ms: settings.out_of_orderness_ms,
        clock,
    };
    let registered = retry(
        &mut backoff,
        &health,
        Component::ClickHouse,
        &shutdown,
        |e: &vidpulse_query::ChError| e.retriable,
        || lineage::register(&client, &tables, &plan.spec, defaults, &group, lineage_id),
    )
    .await;
    let (gens, new) = match registered {
        None => return Ok(()),
        Some(r) => r?,
    };
    tracing::info!(
        lineage = format!("{lineage_id:016x}"),
        ?origin,
        new_generations = %if new.is_empty() { "none".to_owned() } else { new.join(", ") },
        "Lineage and generations settled."
    );
    let reader = vidpulse_core::kafka::reader_config(&args.kafka)?;
    let probe: rdkafka::consumer::BaseConsumer = reader.create()?;

    let topics: Vec<(String, Input)> = plan
        .spec
        .inputs()
        .into_iter()
        .map(|i| (args.kafka.topic(i.topic()), i))
        .collect();
    let stage_settings = StageSettings {
        stage: STAGE,
        group: settings.group.clone(),
        inputs: topics.iter().map(|(t, _)| t.clone()).collect(),
        loop_: settings.loop_.clone(),
        commit: Commit::WhenDurable,
        tick: Duration::from_millis(100),
        // The engine keeps event time: watermark records go into it.
        watermarks: runtime::Watermarks::Deliver,
    };
    let aggregator = Aggregator {
        plan,
        group,
        lineage: lineage_id,
        probe: Arc::new(probe),
        reader,
        topics,
        parts: HashMap::new(),
        sinks: Sinks {
            ch: client,
            tables,
            redis,
            replication,
            board_script: leaderboard::script(),
            ckpt_script: checkpoint::write_script(),
            prefix: args.kafka.topic_prefix.clone(),
            gens,
        },
        pending: None,
        reset_done: HashSet::new(),
        since_flush: 0,
        last_flush: Instant::now(),
        last_early: Instant::now(),
        last_sized: None,
        duplicates: counter!(DUPLICATES, "stage" => STAGE),
        owned_gauge: gauge!(PARTITIONS_OWNED, "stage" => STAGE),
        unflushed: gauge!(UNFLUSHED, "stage" => STAGE),
        health: health.clone(),
        held_by: None,
        last_report: Instant::now(),
        recovering: HashMap::new(),
        recovering_reported: false,
        settings,
    };
    runtime::run(&args.kafka, stage_settings, aggregator, health, shutdown).await?;
    Ok(())
}

impl Stage for Aggregator {
    async fn process(&mut self, batch: &[Record<'_>], out: &mut Outputs) -> Result<(), StageError> {
        for (i, r) in batch.iter().enumerate() {
            self.handle(i, r, out)?;
        }
        self.unflushed.set(self.since_flush as f64);
        Ok(())
    }

    async fn on_assign(
        &mut self,
        parts: &[InputPartition],
    ) -> Result<Vec<(InputPartition, StartAt)>, StageError> {
        let bounds = self.bounds(parts).await?;
        let mut starts = Vec::with_capacity(parts.len());
        for p in parts {
            let (topic, input) = self.topics[p.topic as usize].clone();
            let key = checkpoint::key(&self.group, &topic, p.partition);
            let reset = self.settings.reset_state && !self.reset_done.contains(&key);
            let restore::Restored {
                epoch,
                state,
                existing,
                seq,
            } = restore::restore(&mut self.sinks.redis, &self.plan, &key, input, reset)
                .await
                .map_err(|e| StageError::retriable(Component::Checkpoints, e))?;
            if reset {
                self.reset_done.insert(key.clone());
            }
            let Some(&(low, end)) = bounds.get(&(topic.clone(), p.partition)) else {
                return Err(StageError::retriable(
                    Component::Kafka,
                    format!("no offsets for {topic}/{}", p.partition),
                ));
            };
            let mut verify = None;
            let start = if existing && state.next_offset >= 0 {
                match restore::check_resume(&state, (low, end), self.settings.allow_partial_replay)
                {
                    Ok(true) => {
                        verify = state.anchor;
                        StartAt::Offset(state.next_offset - 1)
                    }
                    Ok(false) => StartAt::Offset(state.next_offset),
                    Err(Gap::BeyondEnd { next, end }) => {
                        return Err(StageError::fatal(TakeOver::BeyondEnd {
                            topic,
                            partition: p.partition,
                            next,
                            end,
                        }));
                    }
                    Err(Gap::Deleted { from, low }) => {
                        let windows = self.spoiled(&topic, p.partition, low).await;
                        return Err(StageError::fatal(TakeOver::DeletedUnread {
                            topic,
                            partition: p.partition,
                            from,
                            low,
                            windows,
                        }));
                    }
                }
            } else {
                self.check_replay(&topic, p.partition, low).await?;
                StartAt::Beginning
            };
            starts.push((*p, start));
            let labels = [
                ("topic", topic.clone()),
                ("partition", p.partition.to_string()),
            ];
            self.parts.insert(
                *p,
                Owned {
                    epoch,
                    verify,
                    key,
                    existing,
                    seq,
                    state,
                    last_record: Instant::now(),
                    watermark: gauge!(WATERMARK, &labels),
                    watermark_lag: gauge!(WATERMARK_LAG, &labels),
                },
            );
        }
        self.owned_gauge.set(self.parts.len() as f64);
        tracing::info!(
            partitions = parts.len(),
            "Partitions assigned; state restored from checkpoints."
        );
        Ok(starts)
    }

    fn tick_due(&self) -> bool {
        self.since_flush >= self.settings.flush_max_rows
    }

    async fn on_tick(&mut self, tick: &mut Tick<'_>) -> Result<(), StageError> {
        if self.last_report.elapsed() >= Duration::from_secs(1) {
            self.last_report = Instant::now();
            self.report_watermarks();
            self.report_recovery();
        }
        if self.pending.is_none() {
            let due = self.flush_due() || (tick.last && !self.parts.is_empty());
            if !due {
                return Ok(());
            }
            self.pending = Some(self.prepare_flush());
        }
        self.write_pending(tick).await
    }

    async fn on_revoke(&mut self, parts: &[InputPartition]) {
        for p in parts {
            self.parts.remove(p);
        }
        if let Some(pending) = &mut self.pending {
            pending.forget(parts);
        }
        self.owned_gauge.set(self.parts.len() as f64);
        tracing::info!(
            partitions = parts.len(),
            "Partitions revoked; their unflushed state is dropped (the next owner re-reads it)."
        );
    }
}

impl Aggregator {
    fn flush_due(&self) -> bool {
        if self.since_flush >= self.settings.flush_max_rows {
            return true;
        }
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

    /// One record into its partition's state machine; late records and
    /// dead letters go out tied to it.
    fn handle(&mut self, i: usize, r: &Record<'_>, out: &mut Outputs) -> Result<(), StageError> {
        let Some(owned) = self.parts.get_mut(&r.part) else {
            // Not restored: not ours to count.
            return Ok(());
        };
        owned.last_record = Instant::now();
        let offset = r.offset;
        if let Some((at, want)) = owned.verify.take()
            && offset == at
            && r.timestamp_ms != Some(want)
        {
            return Err(StageError::fatal(TakeOver::Recreated {
                topic: r.topic.to_owned(),
                partition: r.partition,
                offset,
                found: r
                    .timestamp_ms
                    .map_or_else(|| "none".to_owned(), |t| t.to_string()),
                want,
            }));
        }
        if offset < owned.state.next_offset {
            return Ok(());
        }
        if offset > owned.state.next_offset && owned.state.next_offset > 0 {
            // Not an error by itself (transaction markers take offsets), but
            // the records in between were never read here.
            counter!(OFFSET_GAPS, "topic" => r.topic.to_owned()).increment(1);
            tracing::warn!(
                topic = r.topic,
                partition = r.partition,
                offset,
                expected = owned.state.next_offset,
                "Offsets skipped: the records between were never read (transaction markers or compaction, or records lost upstream)."
            );
        }
        owned.state.anchor = r.timestamp_ms.map(|t| (offset, t));
        self.since_flush += 1;
        if let Some(control) = r.control() {
            // A watermark record (or a control record of a newer kind,
            // skipped): part of the partition's history like an event.
            match watermark::decode(control, r.payload) {
                Some(Ok(w)) => owned.state.observe_watermark(&w, offset),
                Some(Err(detail)) => {
                    tracing::warn!(topic = r.topic, partition = r.partition, offset, %detail, "Unreadable watermark record skipped.");
                    owned.state.skip(offset);
                }
                None => owned.state.skip(offset),
            }
            return Ok(());
        }
        let input = self.topics[r.part.topic as usize].1;
        let payload = r.payload.unwrap_or_default();
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
                out.push(
                    i,
                    dlq::record(
                        &self.settings.dlq_topic,
                        STAGE,
                        r,
                        "invalid_protobuf",
                        &format!("not a {}: {detail}", input_kind(&input)),
                    ),
                );
                return Ok(());
            }
        };
        let Some(rec) = Rec::new(&event, &pools, enrichment.as_ref()) else {
            owned.state.skip(offset);
            counter!(m::RECORDS_DROPPED, "stage" => STAGE, "reason" => "unknown_kind").increment(1);
            return Ok(());
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
                    out.push(
                        i,
                        Output {
                            topic: self.settings.late_topic.clone(),
                            key: r.key.map(<[u8]>::to_vec),
                            payload: r.payload.map(<[u8]>::to_vec),
                            headers: vec![
                                ("vp.late.for", late.join(",").into_bytes()),
                                ("vp.watermark", watermark.to_string().into_bytes()),
                                ("vp.kind", rec.kind.as_str().as_bytes().to_vec()),
                                (dlq::H_STAGE, STAGE.as_bytes().to_vec()),
                                (dlq::H_TOPIC, r.topic.as_bytes().to_vec()),
                                (dlq::H_PARTITION, r.partition.to_string().into_bytes()),
                                (dlq::H_OFFSET, offset.to_string().into_bytes()),
                            ],
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Low and end offsets of `parts` (ListOffsets, off the loop's thread).
    async fn bounds(
        &self,
        parts: &[InputPartition],
    ) -> Result<vidpulse_core::kafka::Bounds, StageError> {
        let names: Vec<(String, i32)> = parts
            .iter()
            .map(|p| (self.topics[p.topic as usize].0.clone(), p.partition))
            .collect();
        let probe = self.probe.clone();
        tokio::task::spawn_blocking(move || {
            let refs: Vec<(&str, i32)> = names.iter().map(|(t, p)| (t.as_str(), *p)).collect();
            vidpulse_core::kafka::partition_bounds(&probe, &refs, Duration::from_secs(10))
        })
        .await
        .map_err(|e| StageError::retriable(Component::Kafka, e))?
        .map_err(|e| StageError::retriable(Component::Kafka, e))
    }

    /// The windows records before `low` were in, for messages: from the
    /// event time of the first data record kept.
    async fn spoiled(&self, topic: &str, partition: i32, low: i64) -> String {
        let (cfg, topic_owned) = (self.reader.clone(), topic.to_owned());
        let input = self
            .topics
            .iter()
            .find(|(t, _)| t == topic)
            .map_or(Input::Events, |(_, i)| *i);
        let first = tokio::task::spawn_blocking(move || {
            vidpulse_core::kafka::scan_from(
                &cfg,
                &topic_owned,
                partition,
                low,
                Duration::from_secs(5),
                |payload, control| {
                    let payload = payload.filter(|_| !control)?;
                    match input {
                        Input::Events => Event::decode(payload).ok().map(|e| e.event_time_ms),
                        Input::Monitored => MonitoredEvent::decode(payload)
                            .ok()
                            .and_then(|m| m.event)
                            .map(|e| e.event_time_ms),
                    }
                },
            )
        })
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
        restore::spoiled_windows(&self.plan, first)
    }

    /// A partition replayed into empty state must start where this lineage
    /// first read it (else the windows of deleted records are rewritten
    /// partial); the first time, that start is recorded.
    async fn check_replay(&self, topic: &str, partition: i32, low: i64) -> Result<(), StageError> {
        let (ch, t) = (&self.sinks.ch, &self.sinks.tables);
        let retriable = |e: vidpulse_query::ChError| {
            if e.retriable {
                StageError::retriable(Component::ClickHouse, e)
            } else {
                StageError::fatal(e)
            }
        };
        let input = vidpulse_query::generation::LineageInput {
            group: &self.group,
            lineage: self.lineage,
            topic,
            partition,
        };
        let first = vidpulse_query::generation::first_read(ch, t, input)
            .await
            .map_err(retriable)?;
        match first {
            None => vidpulse_query::generation::record_first_read(
                ch,
                t,
                input,
                low,
                u64::try_from(wall_ms()).unwrap_or(0),
            )
            .await
            .map_err(retriable),
            Some(start) if start < low && !self.settings.allow_partial_replay => {
                Err(StageError::fatal(TakeOver::PartialReplay {
                    topic: topic.to_owned(),
                    partition,
                    start,
                    low,
                    windows: self.spoiled(topic, partition, low).await,
                }))
            }
            Some(start) => {
                if start < low {
                    tracing::warn!(topic, partition, start, low, windows = %self.spoiled(topic, partition, low).await, "--allow-partial-replay: replaying from the records retention kept; these windows become partial.");
                }
                Ok(())
            }
        }
    }

    /// Idle advance, emission and checkpoint deltas of every owned
    /// partition: the next flush, to be written until acknowledged.
    fn prepare_flush(&mut self) -> Pending {
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
        let mut emitted = Vec::with_capacity(self.parts.len());
        let mut checkpoints = Vec::new();
        let mut remembered = 0;
        for (p, owned) in self.parts.iter_mut() {
            let idle_for =
                i64::try_from(owned.last_record.elapsed().as_millis()).unwrap_or(i64::MAX);
            if owned.state.has_open_state() {
                owned
                    .state
                    .advance_idle(&self.plan, idle_for, idle_timeout_ms, wall);
            }
            let e = owned.state.emit(&self.plan, early);
            let wm = owned.state.watermark();
            remembered += owned.state.remembered_ids();
            owned.watermark.set(wm.max(0) as f64);
            owned.watermark_lag.set(if wm == watermark::NONE {
                f64::NAN
            } else {
                (wall - wm) as f64 / 1000.0
            });
            if !e.is_empty() {
                emitted.push((*p, self.topics[p.topic as usize].1.name(), e));
            }
            if owned.state.dirty() {
                checkpoints.push(flush::Checkpoint {
                    part: *p,
                    key: owned.key.clone(),
                    epoch: owned.epoch,
                    existing: owned.existing,
                    seq: owned.seq,
                    next_offset: owned.state.next_offset,
                    delta: owned.state.checkpoint_delta(&self.plan),
                    done: false,
                });
            }
        }
        self.since_flush = 0;
        self.unflushed.set(0.0);
        gauge!(REMEMBERED_IDS, "stage" => STAGE).set(remembered as f64);
        if self
            .last_sized
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.last_sized = Some(Instant::now());
            let (bytes, rooms) = self.parts.values().fold((0, 0), |(b, r), o| {
                (b + o.state.state_bytes(), r + o.state.rooms())
            });
            gauge!(STATE_BYTES, "stage" => STAGE).set(bytes as f64);
            gauge!(ROOMS, "stage" => STAGE).set(rooms as f64);
        }
        self.report_watermarks();
        Pending::new(
            &self.plan,
            &self.sinks.prefix,
            &self.sinks.gens,
            &emitted,
            checkpoints,
        )
    }

    /// Writes the pending flush; on success reports the checkpointed
    /// positions as durable. A retriable failure keeps it for the next try.
    async fn write_pending(&mut self, tick: &mut Tick<'_>) -> Result<(), StageError> {
        let Some(pending) = self.pending.as_mut() else {
            return Ok(());
        };
        let result = async {
            pending.write_results(&self.sinks).await?;
            // Late records and dead letters of the batches it covers.
            tick.outputs_acked().await?;
            pending.write_checkpoints(&self.sinks).await
        }
        .await;
        if let Err(e) = result {
            pending.attempts += 1;
            let max = self.settings.sink_max_retries;
            if max > 0 && pending.attempts >= max && matches!(e, StageError::Retriable { .. }) {
                return Err(StageError::fatal(AggError::GaveUp {
                    attempts: pending.attempts,
                    last: vidpulse_core::error_chain(&e),
                }));
            }
            return Err(e);
        }
        let Some(done) = self.pending.take() else {
            return Ok(());
        };
        let lost: Vec<InputPartition> = done.lost.iter().map(|(p, _)| *p).collect();
        for c in &done.checkpoints {
            if done.fenced.contains(&c.part)
                || lost.contains(&c.part)
                || done.behind.contains(&c.part)
            {
                continue;
            }
            if let Some(owned) = self.parts.get_mut(&c.part) {
                owned.existing = true;
                owned.seq = c.seq + 1;
            }
            if c.next_offset >= 0 {
                tick.durable(c.part, c.next_offset);
            }
        }
        if !done.lost.is_empty()
            && let Err(error) =
                lineage::remember(&mut self.sinks.redis, &self.group, self.lineage).await
        {
            tracing::warn!(%error, "Cannot write the lineage back to the state store; the next start reads it from ClickHouse.");
        }
        for (p, reached) in &done.lost {
            // Its state is gone from the store (and maybe the leaderboards
            // with it): replay the partition from its earliest offset into
            // empty state. Rows come out identical; partials the store lost
            // are written again.
            tracing::error!(topic = %self.topics[p.topic as usize].0, partition = p.partition, reached, "The checkpoint store lost this partition's state (FLUSHALL, a restart without persistence, or eviction); replaying it from its earliest offset.");
            counter!(STORE_LOST, "stage" => STAGE).increment(1);
            self.recovering.insert(*p, *reached);
            self.parts.remove(p);
            tick.restart(*p);
        }
        for p in &done.behind {
            // The store failed over to a replica that had not received this
            // owner's last writes: take the partition over again from what
            // it holds and replay from there (the rows come out the same).
            tracing::error!(topic = %self.topics[p.topic as usize].0, partition = p.partition, "The checkpoint store holds fewer of this partition's checkpoint writes than were acknowledged (a failover to a replica that lacked the last ones); restoring from what it holds and replaying from there.");
            counter!(STORE_BEHIND, "stage" => STAGE).increment(1);
            self.parts.remove(p);
            tick.restart(*p);
        }
        for p in &done.fenced {
            counter!(FENCED, "stage" => STAGE).increment(1);
            tracing::warn!(topic = %self.topics[p.topic as usize].0, partition = p.partition, "Checkpoint fenced: another instance owns this partition now; dropping it here.");
            self.parts.remove(p);
        }
        self.owned_gauge.set(self.parts.len() as f64);
        // Time spent flushing does not count as idleness.
        let took = done.started.elapsed();
        for owned in self.parts.values_mut() {
            owned.last_record += took;
        }
        histogram!(FLUSH_SECONDS).record(took.as_secs_f64());
        tracing::debug!(
            ms = took.as_millis(),
            checkpoint_fields = done.checkpoint_fields(),
            "Flushed."
        );
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
