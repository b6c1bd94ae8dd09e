//! The loop itself: gather a batch, hand it to the stage, produce its
//! outputs, store offsets; apply rebalances between batches; tick; retry
//! with back-pressure while a dependency fails; drain on shutdown.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::FutureExt;
use metrics::{Counter, Gauge, counter, gauge};
use rdkafka::Offset;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers as _, Message};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::callbacks::{Change, Ctx, ProduceFailed, Shared, Ticket};
use super::event_time::{EventTime, EventTimeError};
use super::partitions::{Admit, Hold, Partitions, Resume};
use super::{
    Headers, InputPartition, Output, Outputs, Record, Stage, StageError, StageSettings, StartAt,
    Tick, Watermarks,
};
use crate::config::{ConfigError, KafkaArgs};
use crate::health::{Component, Health};
use crate::kafka;
use crate::metrics as m;
use crate::offsets::OffsetTracker;
use crate::produce::{ProduceError, Producer};
use crate::retry::Backoff;

/// Why the runtime stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kafka")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Produce(#[from] ProduceError),
    #[error("input topic {0} does not exist; create it with `vidpulse topics create`")]
    MissingTopic(String),
    #[error("stopping before the offsets of unacknowledged records are stored")]
    ProduceFailed(#[from] ProduceFailed),
    #[error("watermarks")]
    EventTime(#[from] EventTimeError),
    #[error(
        "shutdown drain timed out with {0} records unacknowledged; they will be re-read on restart"
    )]
    DrainTimeout(usize),
    #[error("the stage failed; stopping before its offsets are stored")]
    Stage(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Runs `stage` until `shutdown` is cancelled (then drains: a last tick,
/// in-flight outputs acknowledged, offsets committed) or something fails
/// for good.
pub async fn run<S: Stage>(
    kafka_args: &KafkaArgs,
    settings: StageSettings,
    stage: S,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let shared = Arc::new(Shared {
        stage: settings.stage,
        topics: settings.inputs.clone(),
        commit: settings.commit,
        drain_timeout: settings.loop_.drain_timeout,
        tracker: Mutex::new(OffsetTracker::new()),
        partitions: Mutex::new(Partitions::default()),
        durable: Mutex::new(HashMap::new()),
        stored: Mutex::new(HashMap::new()),
        changes: Mutex::new(Vec::new()),
        changed: Notify::new(),
        permits: Semaphore::new(settings.loop_.max_in_flight.max(1)),
        pending: Default::default(),
        acked: Notify::new(),
        fatal: Mutex::new(None),
        fatal_token: CancellationToken::new(),
        producer: OnceLock::new(),
        lag: Mutex::new(HashMap::new()),
    });
    let producer = Arc::new(Producer::new(kafka_args, shared.clone())?);
    let _ = shared.producer.set(Arc::downgrade(&producer));
    let consumer: StreamConsumer<Ctx> = StreamConsumer::from_config_and_context(
        &kafka::consumer_config(kafka_args, &settings.group)?,
        Ctx(shared.clone()),
    )?;
    if let Some(t) = kafka::missing_topic(&consumer, &settings.inputs)? {
        return Err(RuntimeError::MissingTopic(t));
    }
    let event_time = EventTime::new(
        kafka_args,
        settings.stage,
        &settings.group,
        &settings.inputs,
        &settings.watermarks,
    )?;
    let inputs: Vec<&str> = settings.inputs.iter().map(String::as_str).collect();
    consumer.subscribe(&inputs)?;
    tracing::info!(stage = settings.stage, group = %kafka_args.topic(&settings.group), topics = ?inputs, "Consuming.");
    health.set_started();

    let received = settings
        .inputs
        .iter()
        .map(|t| counter!(m::RECORDS_RECEIVED, "stage" => settings.stage, "topic" => t.clone()))
        .collect();
    let mut runner = Runner {
        backoff: Backoff::new(settings.loop_.min_backoff, settings.loop_.max_backoff),
        in_flight: gauge!(m::IN_FLIGHT, "stage" => settings.stage),
        stage,
        consumer: &consumer,
        shared,
        producer,
        s: settings,
        health,
        received,
        produced: HashMap::new(),
        pending_assign: Vec::new(),
        failing: None,
        last_tick: Instant::now(),
        event_time,
    };
    let result = runner.run(&shutdown).await;
    let drained = runner.drain(result.is_ok()).await;
    match (result, drained) {
        (Err(e), _) | (Ok(()), Err(e)) => {
            runner.health.set_phase(format!("failed: {e}"));
            Err(e)
        }
        (Ok(()), Ok(())) => Ok(()),
    }
}

struct Runner<'c, S> {
    stage: S,
    consumer: &'c StreamConsumer<Ctx>,
    shared: Arc<Shared>,
    producer: Arc<Producer<Shared>>,
    s: StageSettings,
    health: Health,
    backoff: Backoff,
    received: Vec<Counter>,
    /// Output topic → its name (shared by tickets) and produced counter.
    produced: HashMap<String, (Arc<str>, Counter)>,
    in_flight: Gauge,
    /// Assigned partitions the stage has not taken yet.
    pending_assign: Vec<InputPartition>,
    /// The component whose failure the current retries are about.
    failing: Option<Component>,
    last_tick: Instant,
    /// Watermark records written by this stage (source or forwarder).
    event_time: Option<EventTime>,
}

/// Interval of offset stores and gauges.
const STORE_EVERY: Duration = Duration::from_millis(200);

impl<'c, S: Stage> Runner<'c, S> {
    async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), RuntimeError> {
        let mut store_tick = tokio::time::interval(STORE_EVERY);
        store_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if shutdown.is_cancelled() || self.shared.fatal_token.is_cancelled() {
                break;
            }
            if !self.apply_changes(shutdown).await? {
                break;
            }
            self.reopen_gated()?;
            if (self.last_tick.elapsed() >= self.s.tick || self.stage.tick_due())
                && !self.tick(false, shutdown).await?
            {
                break;
            }
            let batch = self.gather(shutdown, &mut store_tick).await;
            if !batch.is_empty() {
                self.handle(batch, shutdown).await?;
            }
        }
        if let Some(f) = self.shared.fatal_error() {
            return Err(f.into());
        }
        Ok(())
    }

    /// Waits for records and returns a batch: up to `max_batch`, waiting at
    /// most `max_wait` after the first. Returns early (maybe empty) for
    /// rebalances, ticks and shutdown.
    async fn gather(
        &mut self,
        shutdown: &CancellationToken,
        store_tick: &mut tokio::time::Interval,
    ) -> Vec<(BorrowedMessage<'c>, u64)> {
        let consumer = self.consumer;
        let max = self.s.loop_.max_batch;
        let mut batch = Vec::new();
        let mut deadline: Option<Instant> = None;
        loop {
            let msg = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = self.shared.fatal_token.cancelled() => break,
                // A rebalance: the loop applies it before reading on.
                _ = self.shared.changed.notified() => break,
                _ = store_tick.tick() => {
                    self.store_tick().await;
                    if batch.is_empty() && self.last_tick.elapsed() >= self.s.tick {
                        break;
                    }
                    continue;
                }
                _ = sleep_until(deadline) => break,
                msg = consumer.recv() => msg,
            };
            self.take(msg, &mut batch);
            // Whatever has arrived already joins the batch without waiting.
            while batch.len() < max {
                match consumer.recv().now_or_never() {
                    Some(msg) => self.take(msg, &mut batch),
                    None => break,
                }
            }
            if batch.len() >= max || (!batch.is_empty() && self.s.loop_.max_wait.is_zero()) {
                break;
            }
            if !batch.is_empty() {
                deadline.get_or_insert_with(|| Instant::now() + self.s.loop_.max_wait);
            }
        }
        batch
    }

    fn take(
        &mut self,
        msg: Result<BorrowedMessage<'c>, KafkaError>,
        batch: &mut Vec<(BorrowedMessage<'c>, u64)>,
    ) {
        match msg {
            Ok(msg) => {
                if let Some(generation) = self.admit(&msg) {
                    batch.push((msg, generation));
                }
            }
            Err(error) => tracing::warn!(stage = self.s.stage, %error, "Consume error; retrying."),
        }
    }

    /// Whether a fetched record goes to the stage (with its generation).
    fn admit(&mut self, msg: &BorrowedMessage<'_>) -> Option<u64> {
        let topic = self.shared.topic_index(msg.topic())?;
        let part = InputPartition {
            topic,
            partition: msg.partition(),
        };
        let mut parts = self.shared.partitions.lock().ok()?;
        let decision = match parts.admit(part, msg.offset()) {
            Admit::Yes(_) if !self.stage.readable(part) => {
                // The hold marks it paused: the pause it asks for must
                // still reach the consumer.
                let pause = parts.hold(part, Hold::Gate);
                match parts.admit(part, msg.offset()) {
                    Admit::Held { pause: p } => Admit::Held { pause: pause || p },
                    d => d,
                }
            }
            d => d,
        };
        drop(parts);
        match decision {
            Admit::Yes(generation) => {
                // Data records only: in-band watermarks are counted apart.
                let control = msg
                    .headers()
                    .is_some_and(|hs| hs.iter().any(|h| h.key == crate::watermark::CONTROL_HEADER));
                if !control {
                    self.received[topic as usize].increment(1);
                }
                Some(generation)
            }
            Admit::NotOwned => None,
            Admit::Held { pause } => {
                if pause {
                    self.pause(&[part]);
                }
                None
            }
        }
    }

    fn pause(&self, parts: &[InputPartition]) {
        if parts.is_empty() {
            return;
        }
        let tpl = self.shared.tpl(parts.iter().map(|p| (*p, None)));
        if let Err(error) = self.consumer.pause(&tpl) {
            tracing::warn!(%error, partitions = ?parts, "Pause failed; records that arrive are re-read later.");
        }
    }

    /// Seeks (when needed) and resumes partitions nothing holds any more.
    fn resume(&self, resumes: Vec<Resume>) -> Result<(), RuntimeError> {
        for r in resumes {
            if !self.stage.readable(r.part) {
                if let Ok(mut ps) = self.shared.partitions.lock() {
                    ps.hold(r.part, Hold::Gate);
                }
                continue;
            }
            if let Some(start) = r.seek {
                self.seek(r.part, start)?;
            }
            let tpl = self.shared.tpl([(r.part, None)]);
            tracing::debug!(stage = self.s.stage, partition = ?r.part, seek = ?r.seek, "Resuming.");
            if let Err(error) = self.consumer.resume(&tpl) {
                tracing::warn!(partition = ?r.part, %error, "Resume failed; the stage restarts to re-read.");
                return Err(error.into());
            }
            if let Ok(mut ps) = self.shared.partitions.lock() {
                ps.resumed(r.part);
            }
        }
        Ok(())
    }

    fn seek(&self, part: InputPartition, start: StartAt) -> Result<(), RuntimeError> {
        let offset = match start {
            StartAt::Committed => return Ok(()),
            StartAt::Beginning => Offset::Beginning,
            StartAt::Offset(o) => Offset::Offset(o),
        };
        let topic = self.shared.topic_name(part);
        // A partition assigned a moment ago may not take a seek yet.
        let mut attempts = 0;
        loop {
            match self
                .consumer
                .seek(topic, part.partition, offset, Duration::from_secs(5))
            {
                Ok(()) => return Ok(()),
                Err(error) if attempts < 50 => {
                    attempts += 1;
                    tracing::debug!(topic, partition = part.partition, ?offset, %error, "Seek not taken yet; retrying.");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(error) => {
                    tracing::error!(topic, partition = part.partition, ?offset, %error, "Cannot seek; stopping so a restart reads from the right place.");
                    return Err(error.into());
                }
            }
        }
    }

    /// Re-opens partitions held only by the stage's gate once it opens.
    fn reopen_gated(&mut self) -> Result<(), RuntimeError> {
        let gated = match self.shared.partitions.lock() {
            Ok(ps) => ps.held_only_by(Hold::Gate),
            Err(_) => return Ok(()),
        };
        let mut resumes = Vec::new();
        for p in gated {
            if self.stage.readable(p)
                && let Some(r) = self
                    .shared
                    .partitions
                    .lock()
                    .ok()
                    .and_then(|mut ps| ps.release(p, Hold::Gate))
            {
                tracing::info!(stage = self.s.stage, partition = ?p, "Partition readable again; resumed.");
                resumes.push(r);
            }
        }
        self.resume(resumes)
    }

    /// Finishes rebalances: `on_revoke` for revoked partitions, `on_assign`
    /// for new ones (then seek and resume). `false` when stopping.
    async fn apply_changes(&mut self, shutdown: &CancellationToken) -> Result<bool, RuntimeError> {
        self.take_revocations().await;
        while !self.pending_assign.is_empty() {
            let parts = std::mem::take(&mut self.pending_assign);
            tracing::debug!(
                stage = self.s.stage,
                partitions = parts.len(),
                "Handing assigned partitions to the stage."
            );
            match self.stage.on_assign(&parts).await {
                Ok(starts) => {
                    let resumes = match self.shared.partitions.lock() {
                        Ok(mut ps) => {
                            for (p, s) in starts {
                                ps.start_at(p, s);
                            }
                            parts
                                .iter()
                                .filter_map(|p| ps.release(*p, Hold::Assigning))
                                .collect()
                        }
                        Err(_) => Vec::new(),
                    };
                    self.succeeded();
                    self.resume(resumes)?;
                }
                Err(StageError::Retriable { component, source }) => {
                    self.pending_assign = parts;
                    if !self.wait_retry(component, &*source, shutdown).await {
                        return Ok(false);
                    }
                }
                Err(StageError::Fatal(e)) => return Err(RuntimeError::Stage(e)),
            }
        }
        Ok(true)
    }

    /// Applies queued rebalance changes: revocations now (`on_revoke`),
    /// assignments into `pending_assign`.
    async fn take_revocations(&mut self) {
        for change in self.shared.take_changes() {
            match change {
                Change::Assigned(parts) => self.pending_assign.extend(parts),
                Change::Revoked(parts) => {
                    self.pending_assign.retain(|p| !parts.contains(p));
                    if let Some(et) = self.event_time.as_mut() {
                        et.revoked(&parts);
                    }
                    self.stage.on_revoke(&parts).await;
                }
            }
        }
        // Assigned again meanwhile, or revoked: only what is still owned.
        if let Ok(ps) = self.shared.partitions.lock() {
            self.pending_assign.retain(|p| ps.generation(*p).is_some());
            self.pending_assign.sort();
            self.pending_assign.dedup();
        }
    }

    /// Back-pressure while `component` fails: every owned partition is
    /// paused (records already fetched are re-read later), the consumer
    /// keeps polling (rebalances go on), and after the backoff delay the
    /// caller tries again. `false` when stopping.
    async fn wait_retry(
        &mut self,
        component: Component,
        error: &(dyn std::error::Error + Send + Sync),
        stop: &CancellationToken,
    ) -> bool {
        let to_pause = match self.shared.partitions.lock() {
            Ok(mut ps) => ps.hold_all(Hold::Backpressure),
            Err(_) => Vec::new(),
        };
        self.pause(&to_pause);
        self.failing = Some(component);
        let text = error_chain(error);
        let delay = self.backoff.next_delay();
        counter!(m::RETRIES, "component" => component.as_str()).increment(1);
        counter!(m::SINK_ERRORS, "stage" => self.s.stage, "sink" => component.as_str())
            .increment(1);
        tracing::warn!(stage = self.s.stage, %component, error = %text, attempt = self.backoff.failures(), retry_in = ?delay, "{} call failed; retrying (nothing is read meanwhile).", component.title());
        self.health
            .set_failing(component, format!("{component} unavailable: {text}"));
        let until = Instant::now() + delay;
        let consumer = self.consumer;
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep_until(until) => return true,
                _ = self.shared.changed.notified() => self.take_revocations().await,
                msg = consumer.recv() => {
                    // Paused: a record fetched before is re-read later.
                    if let Ok(msg) = msg {
                        self.admit(&msg);
                    }
                }
            }
        }
    }

    /// After a call succeeded: the failing component is ready again and
    /// reading resumes.
    fn succeeded(&mut self) {
        if let Some(c) = self.failing.take() {
            if self.health.set_ok(c) {
                tracing::info!(stage = self.s.stage, component = %c, "Recovered; reading again.");
            }
            let resumes = match self.shared.partitions.lock() {
                Ok(mut ps) => ps.release_all(Hold::Backpressure),
                Err(_) => Vec::new(),
            };
            if let Err(error) = self.resume(resumes) {
                tracing::warn!(%error, "Resume after recovery failed.");
                self.shared.fatal_token.cancel();
            }
        }
        self.backoff.reset();
    }

    /// Takes partitions over again locally (no rebalance): a new generation,
    /// paused, nothing in flight counted; `on_revoke` and `on_assign` run at
    /// the top of the loop.
    fn restart(&mut self, parts: &[InputPartition]) {
        if parts.is_empty() {
            return;
        }
        let owned: Vec<InputPartition> = match (
            self.shared.partitions.lock(),
            self.shared.tracker.lock(),
            self.shared.durable.lock(),
            self.shared.stored.lock(),
        ) {
            (Ok(mut ps), Ok(mut t), Ok(mut d), Ok(mut st)) => {
                let owned = ps.revoke(parts);
                ps.assign(&owned);
                for p in &owned {
                    t.forget(*p);
                    d.remove(p);
                    st.remove(p);
                }
                owned
            }
            _ => Vec::new(),
        };
        self.pause(&owned);
        tracing::warn!(stage = self.s.stage, partitions = ?owned, "Taking partitions over again.");
        if let Ok(mut c) = self.shared.changes.lock() {
            c.push(Change::Revoked(owned.clone()));
            c.push(Change::Assigned(owned));
        }
    }

    /// Runs `on_tick`, retrying while it fails retriably. `false` when
    /// `stop` came first.
    async fn tick(&mut self, last: bool, stop: &CancellationToken) -> Result<bool, RuntimeError> {
        loop {
            let mut t = Tick {
                last,
                shared: &self.shared,
                durable: Vec::new(),
                restart: Vec::new(),
            };
            let result = self.stage.on_tick(&mut t).await;
            let durable = std::mem::take(&mut t.durable);
            let restart = std::mem::take(&mut t.restart);
            self.restart(&restart);
            match result {
                Ok(()) => {
                    self.last_tick = Instant::now();
                    if !durable.is_empty() {
                        if let (Ok(mut d), Ok(ps)) =
                            (self.shared.durable.lock(), self.shared.partitions.lock())
                        {
                            for (p, o) in durable {
                                if ps.generation(p).is_some() {
                                    let e = d.entry(p).or_insert(o);
                                    *e = (*e).max(o);
                                }
                            }
                        }
                        self.shared.store_positions(self.consumer, None);
                    }
                    self.succeeded();
                    return Ok(true);
                }
                Err(StageError::Retriable { component, source }) => {
                    if !self.wait_retry(component, &*source, stop).await {
                        return Ok(false);
                    }
                }
                Err(StageError::Fatal(e)) => return Err(RuntimeError::Stage(e)),
            }
        }
    }

    /// Hands a batch to the stage (again while it fails retriably), then
    /// produces its outputs.
    async fn handle(
        &mut self,
        batch: Vec<(BorrowedMessage<'c>, u64)>,
        shutdown: &CancellationToken,
    ) -> Result<(), RuntimeError> {
        let mut records: Vec<(Record<'_>, u64)> = batch
            .iter()
            .filter_map(|(msg, generation)| {
                let topic = self.shared.topic_index(msg.topic())?;
                Some((
                    Record {
                        part: InputPartition {
                            topic,
                            partition: msg.partition(),
                        },
                        topic: msg.topic(),
                        partition: msg.partition(),
                        offset: msg.offset(),
                        key: msg.key(),
                        payload: msg.payload(),
                        timestamp_ms: msg.timestamp().to_millis(),
                        headers: msg.headers().map_or(Headers::None, Headers::Kafka),
                    },
                    *generation,
                ))
            })
            .collect();
        // Revoked while the batch was gathered (the rebalance ran inside the
        // consumer's poll): the new owner reads those records.
        if let Ok(ps) = self.shared.partitions.lock() {
            records.retain(|(r, g)| ps.generation(r.part) == Some(*g));
        }
        if records.is_empty() {
            return Ok(());
        }
        let deliver_control = matches!(self.s.watermarks, Watermarks::Deliver);
        let mut out = Outputs::new();
        // The stage's batch: data records (and control records for a stage
        // that keeps event time itself), by their index in `records`.
        let mut handed: Vec<usize>;
        loop {
            out.clear();
            handed = (0..records.len())
                .filter(|i| deliver_control || records[*i].0.control().is_none())
                .collect();
            let batch: Vec<Record<'_>> = handed.iter().map(|i| records[*i].0).collect();
            let result = if batch.is_empty() {
                Ok(())
            } else {
                self.stage.process(&batch, &mut out).await
            };
            match result {
                Ok(()) => {
                    self.succeeded();
                    break;
                }
                Err(StageError::Retriable { component, source }) => {
                    if !self.wait_retry(component, &*source, shutdown).await {
                        // Stopping: nothing of this batch is stored; it is
                        // read again after the restart.
                        return Ok(());
                    }
                    let ps = self.shared.partitions.lock();
                    if let Ok(ps) = ps {
                        records.retain(|(r, g)| ps.generation(r.part) == Some(*g));
                    }
                    if records.is_empty() {
                        return Ok(());
                    }
                }
                Err(StageError::Fatal(e)) => return Err(RuntimeError::Stage(e)),
            }
        }
        if let Some(et) = self.event_time.as_mut()
            && !deliver_control
        {
            for (r, g) in records.iter().filter(|(r, _)| r.control().is_some()) {
                et.control(r, *g);
            }
        }
        let (items, event_times) = out.take();
        // Indices into the stage's batch → indices into `records`.
        let items: Vec<(usize, Output)> = items
            .into_iter()
            .filter_map(|(i, o)| handed.get(i as usize).map(|j| (*j, o)))
            .collect();
        if let Some(et) = self.event_time.as_mut() {
            let times: Vec<(u32, i64)> = event_times
                .into_iter()
                .filter_map(|(i, t)| handed.get(i as usize).map(|j| (*j as u32, t)))
                .collect();
            et.handled(&records, &times);
        }
        self.send(&records, items, shutdown).await
    }

    /// Registers the batch's inputs with the offset tracker and produces the
    /// outputs; an input's offset moves once all of its outputs are acked.
    async fn send(
        &mut self,
        records: &[(Record<'_>, u64)],
        items: Vec<(usize, Output)>,
        shutdown: &CancellationToken,
    ) -> Result<(), RuntimeError> {
        // Every input is registered, in offset order, control records too
        // (with no output): the tracker needs each partition's inputs in order.
        let mut counts = vec![0u32; records.len()];
        for (i, _) in &items {
            if let Some(c) = counts.get_mut(*i) {
                *c += 1;
            }
        }
        if let Ok(mut t) = self.shared.tracker.lock() {
            for ((r, g), n) in records.iter().zip(&counts) {
                t.begin(r.part, *g, r.offset, *n);
            }
        }
        for (i, o) in items {
            let Some((r, g)) = records.get(i) else {
                continue;
            };
            // Back-pressure: wait for room before producing more.
            match self.shared.permits.try_acquire() {
                Ok(p) => p.forget(),
                Err(_) => {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = self.shared.fatal_token.cancelled() => return Ok(()),
                        p = self.shared.permits.acquire() => match p {
                            Ok(p) => p.forget(),
                            Err(_) => return Ok(()),
                        },
                    }
                }
            }
            let (topic, produced) = match self.produced.get(&o.topic) {
                Some((t, c)) => (t.clone(), c.clone()),
                None => {
                    let t: Arc<str> = Arc::from(o.topic.as_str());
                    let c = counter!(m::RECORDS_PRODUCED, "stage" => self.s.stage, "topic" => o.topic.clone());
                    self.produced
                        .insert(o.topic.clone(), (t.clone(), c.clone()));
                    (t, c)
                }
            };
            self.shared.pending.fetch_add(1, Ordering::AcqRel);
            let ticket = Ticket {
                input: Some((r.part, *g, r.offset)),
                topic,
                produced,
            };
            if let Err(e) = self.producer.send(&o, ticket).await {
                self.shared.pending.fetch_sub(1, Ordering::AcqRel);
                self.shared.permits.add_permits(1);
                counter!(m::PRODUCE_FAILED, "stage" => self.s.stage).increment(1);
                return Err(e.into());
            }
        }
        Ok(())
    }

    async fn store_tick(&mut self) {
        self.shared.store_positions(self.consumer, None);
        if let Ok(t) = self.shared.tracker.lock() {
            self.in_flight.set(t.in_flight() as f64);
        }
        if let Some(et) = self.event_time.as_mut()
            && let Err(e) = et.tick(&self.shared, &self.producer).await
        {
            self.shared.set_fatal(ProduceFailed {
                topic: "(watermarks)".into(),
                message: error_chain(&e),
            });
        }
    }

    /// Stops: a last tick (flushes), in-flight outputs acknowledged, offsets
    /// stored and committed.
    async fn drain(&mut self, clean: bool) -> Result<(), RuntimeError> {
        self.health.set_phase("draining");
        let deadline = Instant::now() + self.s.loop_.drain_timeout;
        let stop = CancellationToken::new();
        let timer = {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                stop.cancel();
            })
        };
        if clean && !self.shared.fatal_token.is_cancelled() {
            // A call that hangs (a dependency that accepts but never
            // answers) is abandoned at the deadline like a failing one.
            let last = tokio::select! {
                r = self.tick(true, &stop) => r,
                _ = stop.cancelled() => Ok(false),
            };
            match last {
                Ok(true) => {}
                Ok(false) => tracing::warn!(
                    stage = self.s.stage,
                    "Last flush abandoned at the drain timeout; a restart re-reads what it did not cover."
                ),
                Err(error) => {
                    tracing::warn!(stage = self.s.stage, error = %error_chain(&error), "Last flush failed; a restart re-reads what it did not cover.")
                }
            }
        }
        timer.abort();
        let left = deadline.saturating_duration_since(Instant::now());
        let producer = self.producer.clone();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(left)).await;
        self.shared.store_positions(self.consumer, None);
        if let Err(error) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(%error, "Final commit failed.");
        }
        if let Some(f) = self.shared.fatal_error() {
            return Err(f.into());
        }
        if !matches!(flushed, Ok(Ok(()))) {
            let left = self
                .shared
                .tracker
                .lock()
                .map(|t| t.in_flight())
                .unwrap_or(0);
            return Err(RuntimeError::DrainTimeout(left));
        }
        if clean {
            tracing::info!(stage = self.s.stage, "Drained; offsets committed.");
        }
        Ok(())
    }
}

/// An error with its causes, for logs and `/readyz`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cause = c.source();
    }
    text
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
