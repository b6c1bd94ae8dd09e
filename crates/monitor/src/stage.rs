//! The monitor's Kafka loop: consume `vp.events.v1` in batches, keep each
//! partition closed (paused) until its pool data is loaded, match, enrich
//! with one Redis round trip per batch, produce `vp.monitored.v1`.
//!
//! Delivery guarantee: at-least-once, duplicate-free across graceful
//! rebalances. An input offset is stored only after its output (or its DLQ
//! record) was acknowledged, or at once for a filtered event, and never past
//! an earlier unacknowledged one (`OffsetTracker`). On revoke the producer is
//! flushed and offsets committed before the partition moves, and records
//! already fetched for a partition that was revoked meanwhile are skipped
//! (their new owner handles them). A record that arrives for a partition
//! whose pools are not loaded is not processed: the partition is paused and
//! later resumed from that record. A Redis failure is retried with backoff
//! while nothing more is read; a shutdown then exits without storing the
//! unwritten batch's offsets.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use metrics::{Counter, counter, gauge};
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::Semaphore;
use vidpulse_core::CancellationToken;
use vidpulse_core::admin::Health;
use vidpulse_core::config::KafkaArgs;
use vidpulse_core::kafka;
use vidpulse_core::metrics as m;
use vidpulse_core::offsets::{OffsetTracker, Tp};
use vidpulse_proto::{Event, Message as _, MonitoredEvent};

use crate::enrich::{Enricher, MissPolicy};
use crate::loader::{Gate, Pools};
use crate::metrics as mm;
use crate::pool::{self, Verdict};
use crate::{LoopSettings, MonitorError};

const STAGE: &str = "monitor";

/// The input a produced record belongs to.
struct Ticket {
    tp: Tp,
    offset: i64,
    produced: Counter,
}

/// State shared by the loop, the delivery callback (producer thread) and the
/// rebalance callbacks (inside `recv`).
struct Shared {
    topic: String,
    tracker: Mutex<OffsetTracker>,
    /// Assigned events partitions → generation of their assignment.
    assigned: Mutex<HashMap<i32, u64>>,
    next_gen: Mutex<u64>,
    /// Paused partitions waiting for pool data → first offset to re-read
    /// (None when paused before anything was delivered).
    gated: Mutex<HashMap<i32, Option<i64>>>,
    gate: Arc<Gate>,
    permits: Arc<Semaphore>,
    fatal: Mutex<Option<String>>,
    fatal_token: CancellationToken,
    producer: OnceLock<Weak<ThreadedProducer<DeliveryCtx>>>,
    drain_timeout: Duration,
    lag: Mutex<HashMap<(String, i32), metrics::Gauge>>,
}

impl Shared {
    fn tpl(&self, parts: impl IntoIterator<Item = (i32, Option<i64>)>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (p, off) in parts {
            match off {
                Some(o) => {
                    let _ = tpl.add_partition_offset(&self.topic, p, Offset::Offset(o));
                }
                None => {
                    tpl.add_partition(&self.topic, p);
                }
            }
        }
        tpl
    }

    fn generation(&self, p: i32) -> Option<u64> {
        self.assigned.lock().ok().and_then(|a| a.get(&p).copied())
    }

    fn store_moved<C: ConsumerContext>(&self, consumer: &impl Consumer<C>) {
        let moved = match self.tracker.lock() {
            Ok(mut t) => t.take_moved(),
            Err(_) => return,
        };
        let assigned: HashSet<i32> = self
            .assigned
            .lock()
            .map(|a| a.keys().copied().collect())
            .unwrap_or_default();
        let moved: Vec<(i32, Option<i64>)> = moved
            .into_iter()
            .filter(|((_, p), _)| assigned.contains(p))
            .map(|((_, p), o)| (p, Some(o)))
            .collect();
        if moved.is_empty() {
            return;
        }
        if let Err(error) = consumer.store_offsets(&self.tpl(moved)) {
            tracing::debug!(%error, "Offset store failed (partition revoked?).");
        }
    }

    fn set_fatal(&self, msg: String) {
        if let Ok(mut f) = self.fatal.lock() {
            f.get_or_insert(msg);
        }
        self.fatal_token.cancel();
    }

    fn flush_producer(&self) -> Result<(), KafkaError> {
        match self.producer.get().and_then(Weak::upgrade) {
            Some(p) => p.flush(self.drain_timeout),
            None => Ok(()),
        }
    }
}

struct DeliveryCtx(Arc<Shared>);

impl ClientContext for DeliveryCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        vidpulse_core::pipeline::log_rdkafka(level, fac, msg);
    }
}

impl ProducerContext for DeliveryCtx {
    type DeliveryOpaque = Box<Ticket>;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: Box<Ticket>) {
        self.0.permits.add_permits(1);
        match result {
            Ok(_) => {
                ticket.produced.increment(1);
                if let Ok(mut t) = self.0.tracker.lock() {
                    t.ack(ticket.tp, ticket.offset);
                }
            }
            Err((error, msg)) => {
                counter!(m::PRODUCE_FAILED, "stage" => STAGE).increment(1);
                self.0.set_fatal(format!("to {}: {error}", msg.topic()));
            }
        }
    }
}

struct ConsumerCtx(Arc<Shared>);

impl ClientContext for ConsumerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        vidpulse_core::pipeline::log_rdkafka(level, fac, msg);
    }

    fn stats(&self, stats: Statistics) {
        if let Ok(mut gauges) = self.0.lag.lock() {
            vidpulse_core::pipeline::record_lag(STAGE, &stats, &mut gauges);
        }
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Commit on revoke: finish what is in flight so the next owner
            // starts exactly after it.
            if let Err(error) = self.0.flush_producer() {
                tracing::warn!(%error, "Flush on revoke incomplete; the next owner re-reads the rest.");
            }
            self.0.store_moved(consumer);
            if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(%error, "Commit on revoke failed.");
            }
            let parts = self.parts(tpl);
            if let (Ok(mut a), Ok(mut t), Ok(mut g)) = (
                self.0.assigned.lock(),
                self.0.tracker.lock(),
                self.0.gated.lock(),
            ) {
                for p in &parts {
                    a.remove(p);
                    t.forget((0, *p));
                    g.remove(p);
                }
            }
            self.0.gate.revoke(&parts);
            tracing::info!(partitions = ?parts, "Partitions revoked; in-flight records flushed and offsets committed.");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts = self.parts(tpl);
            if parts.is_empty() {
                return;
            }
            if let (Ok(mut a), Ok(mut t), Ok(mut n)) = (
                self.0.assigned.lock(),
                self.0.tracker.lock(),
                self.0.next_gen.lock(),
            ) {
                for p in &parts {
                    *n += 1;
                    t.forget((0, *p));
                    a.insert(*p, *n);
                }
            }
            self.0.gate.assign(&parts);
            // Closed until the pools are loaded for them.
            let closed: Vec<i32> = parts
                .iter()
                .copied()
                .filter(|p| !self.0.gate.is_ready(*p))
                .collect();
            if !closed.is_empty() {
                if let Err(error) = consumer.pause(&self.0.tpl(closed.iter().map(|p| (*p, None)))) {
                    tracing::warn!(%error, "Pausing newly assigned partitions failed; records that arrive early are rewound.");
                }
                if let Ok(mut g) = self.0.gated.lock() {
                    for p in &closed {
                        g.entry(*p).or_insert(None);
                    }
                }
            }
            tracing::info!(partitions = ?parts, waiting_for_pools = ?closed, "Partitions assigned.");
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
            tracing::warn!(%error, "Offset commit failed; it is retried on the next interval.");
        }
    }
}

impl ConsumerCtx {
    fn parts(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements()
            .iter()
            .filter(|e| e.topic() == self.0.topic)
            .map(|e| e.partition())
            .collect()
    }
}

/// One consumed record, owned, with the assignment generation it was read
/// under.
struct Rec {
    partition: i32,
    offset: i64,
    generation: u64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
}

/// What the batch makes of one record.
enum Outcome {
    Filtered,
    Pass {
        event: Box<Event>,
        pools: Vec<String>,
    },
    Dlq {
        detail: String,
    },
}

/// Counters resolved once.
struct Counters {
    received: Counter,
    produced_out: Counter,
    produced_dlq: Counter,
    filtered: Counter,
    dlq: Counter,
    dropped_miss: Counter,
    passed: HashMap<String, Counter>,
    not_local: HashMap<String, Counter>,
}

impl Counters {
    fn passed(&mut self, pool: &str) -> &Counter {
        self.passed
            .entry(pool.to_owned())
            .or_insert_with(|| counter!(mm::EVENTS_PASSED, "pool" => pool.to_owned()))
    }

    fn not_local(&mut self, pool: &str) -> &Counter {
        self.not_local
            .entry(pool.to_owned())
            .or_insert_with(|| counter!(mm::EVENTS_NOT_LOCAL, "pool" => pool.to_owned()))
    }
}

pub(crate) async fn run(
    kafka_args: &KafkaArgs,
    s: LoopSettings,
    gate: Arc<Gate>,
    pools: Arc<Pools>,
    mut enricher: Option<Enricher>,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), MonitorError> {
    let shared = Arc::new(Shared {
        topic: s.events_topic.clone(),
        tracker: Mutex::new(OffsetTracker::new()),
        assigned: Mutex::new(HashMap::new()),
        next_gen: Mutex::new(0),
        gated: Mutex::new(HashMap::new()),
        gate: gate.clone(),
        permits: Arc::new(Semaphore::new(s.max_in_flight.max(1))),
        fatal: Mutex::new(None),
        fatal_token: CancellationToken::new(),
        producer: OnceLock::new(),
        drain_timeout: s.drain_timeout,
        lag: Mutex::new(HashMap::new()),
    });
    let producer: Arc<ThreadedProducer<DeliveryCtx>> =
        Arc::new(ThreadedProducer::from_config_and_context(
            &kafka::producer_config(kafka_args)?,
            DeliveryCtx(shared.clone()),
        )?);
    let _ = shared.producer.set(Arc::downgrade(&producer));
    let consumer: StreamConsumer<ConsumerCtx> = StreamConsumer::from_config_and_context(
        &kafka::consumer_config(kafka_args, &s.group)?,
        ConsumerCtx(shared.clone()),
    )?;
    consumer.subscribe(&[s.events_topic.as_str()])?;
    tracing::info!(group = %kafka_args.topic(&s.group), topic = %s.events_topic, output = %s.output_topic, enrich = s.enrich, "Consuming.");
    health.set_ready();

    let mut c = Counters {
        received: counter!(m::RECORDS_RECEIVED, "stage" => STAGE, "topic" => s.events_topic.clone()),
        produced_out: counter!(m::RECORDS_PRODUCED, "stage" => STAGE, "topic" => s.output_topic.clone()),
        produced_dlq: counter!(m::RECORDS_PRODUCED, "stage" => STAGE, "topic" => s.dlq_topic.clone()),
        filtered: counter!(mm::EVENTS_FILTERED),
        dlq: counter!(m::RECORDS_DLQ, "stage" => STAGE, "reason" => "invalid_event"),
        dropped_miss: counter!(m::RECORDS_DROPPED, "stage" => STAGE, "reason" => "enrich_miss"),
        passed: HashMap::new(),
        not_local: HashMap::new(),
    };
    let in_flight = gauge!(m::IN_FLIGHT, "stage" => STAGE);
    let waiting = gauge!(mm::PARTITIONS_WAITING);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<Rec> = Vec::with_capacity(s.max_batch);

    let result: Result<(), MonitorError> = 'main: loop {
        // Gather a batch: wait for the first record, then up to max_wait.
        batch.clear();
        let mut deadline: Option<tokio::time::Instant> = None;
        while batch.len() < s.max_batch {
            let msg = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'main Ok(()),
                _ = shared.fatal_token.cancelled() => break 'main Ok(()),
                _ = tick.tick() => {
                    shared.store_moved(&consumer);
                    if let Ok(t) = shared.tracker.lock() {
                        in_flight.set(t.in_flight() as f64);
                    }
                    if let Some(msg) = gate.fatal() {
                        break 'main Err(MonitorError::Fatal(msg));
                    }
                    open_ready(&shared, &consumer);
                    waiting.set(gate.waiting().0.len() as f64);
                    continue;
                }
                _ = sleep_until(deadline) => break,
                msg = consumer.recv() => msg,
            };
            let msg = match msg {
                Ok(msg) => msg,
                Err(error) => {
                    tracing::warn!(%error, "Consume error; retrying.");
                    continue;
                }
            };
            let p = msg.partition();
            // Fetched before its partition was revoked: the new owner has it.
            let Some(generation_) = shared.generation(p) else {
                continue;
            };
            // Pools not loaded for it (or it is still closed): not processed
            // now; the partition is paused and later re-read from here.
            if !gate.is_ready(p)
                || shared
                    .gated
                    .lock()
                    .map(|g| g.contains_key(&p))
                    .unwrap_or(true)
            {
                close(&shared, &consumer, p, msg.offset());
                continue;
            }
            c.received.increment(1);
            batch.push(Rec {
                partition: p,
                offset: msg.offset(),
                generation: generation_,
                key: msg.key().map(<[u8]>::to_vec),
                payload: msg.payload().map(<[u8]>::to_vec),
            });
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + s.max_wait);
        }
        if batch.is_empty() {
            continue;
        }
        // Revoked while the batch was gathered: the new owner re-reads them
        // from the offsets committed on revoke.
        batch.retain(|r| shared.generation(r.partition) == Some(r.generation));

        let outcomes = decide(&batch, &pools, &mut c);

        // Enrich the events that pass, retrying Redis failures in place.
        let mut enrichments: Vec<Option<crate::enrich::Enrichment>> = Vec::new();
        enrichments.resize_with(outcomes.len(), || None);
        if let Some(en) = enricher.as_mut() {
            let idx: Vec<usize> = outcomes
                .iter()
                .enumerate()
                .filter(|(_, o)| matches!(o, Outcome::Pass { .. }))
                .map(|(i, _)| i)
                .collect();
            if !idx.is_empty() {
                let events: Vec<&Event> = idx
                    .iter()
                    .filter_map(|i| match &outcomes[*i] {
                        Outcome::Pass { event, .. } => Some(&**event),
                        _ => None,
                    })
                    .collect();
                let mut backoff = s.min_backoff;
                let got = loop {
                    match en.enrich(&events).await {
                        Ok(v) => {
                            if health
                                .not_ready_reason()
                                .is_some_and(|r| r.starts_with("redis"))
                            {
                                tracing::info!("Redis recovered.");
                                health.set_ready();
                            }
                            break v;
                        }
                        Err(error) => {
                            tracing::warn!(%error, retry_in = ?backoff, "Enrichment lookup failed; retrying (not consuming meanwhile).");
                            health.set_not_ready(format!("redis unavailable: {error}"));
                            tokio::select! {
                                _ = shutdown.cancelled() => break 'main Ok(()),
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(s.max_backoff);
                        }
                    }
                };
                for (i, e) in idx.into_iter().zip(got) {
                    enrichments[i] = Some(e);
                }
            }
        }

        // Produce in input order; offsets follow the acks.
        let outputs: usize = outcomes
            .iter()
            .zip(&enrichments)
            .filter(|(o, e)| produces(o, e.as_ref(), s.miss_policy))
            .count();
        if outputs > 0 {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'main Ok(()),
                _ = shared.fatal_token.cancelled() => break 'main Ok(()),
                permit = shared.permits.acquire_many(outputs as u32) => match permit {
                    Ok(p) => p.forget(),
                    Err(_) => break 'main Ok(()),
                },
            }
        }
        for ((rec, outcome), enrichment) in batch.iter().zip(outcomes).zip(enrichments) {
            let tp: Tp = (0, rec.partition);
            let out = match outcome {
                Outcome::Filtered => None,
                Outcome::Dlq { detail } => {
                    c.dlq.increment(1);
                    Some((
                        s.dlq_topic.as_str(),
                        rec.payload.clone(),
                        dlq_headers(rec, &s.events_topic, &detail),
                        c.produced_dlq.clone(),
                    ))
                }
                Outcome::Pass { event, pools } => {
                    let e = enrichment.unwrap_or_default();
                    if s.miss_policy == MissPolicy::Drop && !e.missing.is_empty() {
                        c.dropped_miss.increment(1);
                        None
                    } else {
                        let kind = event
                            .kind()
                            .map(|k| k.as_str())
                            .unwrap_or("")
                            .as_bytes()
                            .to_vec();
                        let headers = vec![
                            ("vp.kind", kind),
                            ("vp.pools", pools.join(",").into_bytes()),
                        ];
                        let value = MonitoredEvent {
                            event: Some(*event),
                            pools,
                            enrichment: e.fields.into_iter().collect(),
                        }
                        .encode_to_vec();
                        Some((
                            s.output_topic.as_str(),
                            Some(value),
                            headers,
                            c.produced_out.clone(),
                        ))
                    }
                }
            };
            if let Ok(mut t) = shared.tracker.lock() {
                t.begin(tp, rec.offset, u32::from(out.is_some()));
            }
            let Some((topic, payload, headers, produced)) = out else {
                continue;
            };
            let ticket = Box::new(Ticket {
                tp,
                offset: rec.offset,
                produced,
            });
            let mut hs = OwnedHeaders::new_with_capacity(headers.len());
            for (k, v) in &headers {
                hs = hs.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let mut record: BaseRecord<'_, [u8], [u8], Box<Ticket>> =
                BaseRecord::with_opaque_to(topic, ticket).headers(hs);
            if let Some(k) = &rec.key {
                record = record.key(k.as_slice());
            }
            if let Some(p) = &payload {
                record = record.payload(p.as_slice());
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) => {
                        shared.set_fatal(format!("to {topic}: {error}"));
                        break 'main Ok(());
                    }
                }
            }
        }
    };

    health.set_not_ready("draining");
    let flusher = producer.clone();
    let drain = s.drain_timeout;
    let flushed = tokio::task::spawn_blocking(move || flusher.flush(drain)).await;
    shared.store_moved(&consumer);
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(%error, "Final commit failed.");
    }
    result?;
    let fatal = shared.fatal.lock().ok().and_then(|f| f.clone());
    if let Some(msg) = fatal {
        health.set_not_ready(format!("failed: {msg}"));
        return Err(MonitorError::Produce(msg));
    }
    if !matches!(flushed, Ok(Ok(()))) {
        let left = shared.tracker.lock().map(|t| t.in_flight()).unwrap_or(0);
        return Err(MonitorError::DrainTimeout(left));
    }
    tracing::info!("Drained; offsets committed.");
    Ok(())
}

/// Whether an outcome produces a record.
fn produces(o: &Outcome, e: Option<&crate::enrich::Enrichment>, policy: MissPolicy) -> bool {
    match o {
        Outcome::Filtered => false,
        Outcome::Dlq { .. } => true,
        Outcome::Pass { .. } => {
            policy == MissPolicy::Pass || e.is_none_or(|e| e.missing.is_empty())
        }
    }
}

/// Decodes and matches a batch under one read lock per pool.
fn decide(batch: &[Rec], pools: &Pools, c: &mut Counters) -> Vec<Outcome> {
    let handles = pools.snapshot();
    let guards: Vec<_> = handles.iter().map(|h| (h, h.members.read().ok())).collect();
    let mut out = Vec::with_capacity(batch.len());
    for rec in batch {
        let Some(payload) = rec.payload.as_deref() else {
            out.push(Outcome::Dlq {
                detail: "empty record on the events topic".into(),
            });
            continue;
        };
        let event = match Event::decode(payload) {
            Ok(e) => e,
            Err(e) => {
                out.push(Outcome::Dlq {
                    detail: format!("not a vidpulse event: {e}"),
                });
                continue;
            }
        };
        let mut matched: Vec<String> = Vec::new();
        for (h, members) in &guards {
            let verdict = pool::check(&h.def, &event, rec.key.as_deref(), |id| {
                let Some(m) = members else { return false };
                match h.def.mode {
                    // Co-partitioned: the id's bucket is this event's partition.
                    pool::Mode::Bucketed => m
                        .get(rec.partition as usize)
                        .is_some_and(|s| s.contains(id)),
                    pool::Mode::Broadcast => m.iter().any(|s| s.contains(id)),
                }
            });
            match verdict {
                Verdict::Match => matched.push(h.def.name.clone()),
                Verdict::NoMatch => {}
                Verdict::NotLocal => c.not_local(&h.def.name).increment(1),
            }
        }
        if matched.is_empty() {
            c.filtered.increment(1);
            out.push(Outcome::Filtered);
        } else {
            for name in &matched {
                c.passed(name).increment(1);
            }
            out.push(Outcome::Pass {
                event: Box::new(event),
                pools: matched,
            });
        }
    }
    out
}

fn dlq_headers(rec: &Rec, topic: &str, detail: &str) -> Vec<(&'static str, Vec<u8>)> {
    use vidpulse_core::dlq::*;
    vec![
        (H_REASON, b"invalid_event".to_vec()),
        (H_DETAIL, detail.as_bytes().to_vec()),
        (H_STAGE, STAGE.as_bytes().to_vec()),
        (H_TOPIC, topic.as_bytes().to_vec()),
        (H_PARTITION, rec.partition.to_string().into_bytes()),
        (H_OFFSET, rec.offset.to_string().into_bytes()),
    ]
}

/// Closes partition `p` (pools not loaded): pause it and remember to re-read
/// from `offset`, the first record not processed.
fn close<C: ConsumerContext>(shared: &Shared, consumer: &impl Consumer<C>, p: i32, offset: i64) {
    let Ok(mut g) = shared.gated.lock() else {
        return;
    };
    let entry = g.entry(p).or_insert(None);
    let first = entry.is_none();
    *entry = Some(entry.map_or(offset, |o| o.min(offset)));
    drop(g);
    if first {
        if let Err(error) = consumer.pause(&shared.tpl([(p, None)])) {
            tracing::warn!(partition = p, %error, "Pause failed.");
        }
        tracing::info!(
            partition = p,
            offset,
            "Partition waits for pool data; paused."
        );
    }
}

/// Re-opens closed partitions whose pools are loaded: seek back to the first
/// record not processed (if any arrived), then resume.
fn open_ready<C: ConsumerContext>(shared: &Shared, consumer: &impl Consumer<C>) {
    let ready: Vec<(i32, Option<i64>)> = match shared.gated.lock() {
        Ok(g) => g
            .iter()
            .filter(|(p, _)| shared.gate.is_ready(**p))
            .map(|(p, o)| (*p, *o))
            .collect(),
        Err(_) => return,
    };
    for (p, rewind) in ready {
        if let Some(o) = rewind
            && let Err(error) =
                consumer.seek(&shared.topic, p, Offset::Offset(o), Duration::from_secs(5))
        {
            tracing::warn!(partition = p, offset = o, %error, "Seek back failed; retrying.");
            continue;
        }
        if let Err(error) = consumer.resume(&shared.tpl([(p, None)])) {
            tracing::warn!(partition = p, %error, "Resume failed; retrying.");
            continue;
        }
        if let Ok(mut g) = shared.gated.lock() {
            g.remove(&p);
        }
        tracing::info!(partition = p, from = ?rewind, "Pool data loaded; partition resumed.");
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
