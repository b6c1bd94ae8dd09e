//! The consume → process → produce loop shared by Kafka-to-Kafka stages.
//!
//! Delivery guarantee: at-least-once. An input offset is stored (and then
//! committed, in the background every second, on revoke and on shutdown)
//! only after every record produced for it, and for every earlier input of
//! its partition, was acknowledged by the broker. In-flight records are
//! bounded; when the bound is reached the loop stops reading. A record whose
//! produce fails for good stops the stage with an error before its offset is
//! stored, so a restart re-reads it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use metrics::{Counter, counter, gauge};
use rdkafka::ClientContext;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::config::{ConfigError, KafkaArgs};
use crate::kafka;
use crate::metrics as m;
use crate::offsets::{OffsetTracker, Tp};

/// One record read from an input topic.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    /// The record's Kafka timestamp, when it has one.
    pub timestamp_ms: Option<i64>,
    /// The record's Kafka headers (key, value); raw records rarely have any.
    pub headers: &'a [(&'a str, &'a [u8])],
}

/// One record to produce.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

/// A stage's logic: turns one input into zero or more outputs. Pure and
/// synchronous, so tests call it without Kafka.
pub trait Processor: Send {
    fn process(&mut self, input: &Input<'_>, out: &mut Vec<Output>);
}

/// How the loop runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Stage name, for metrics and logs.
    pub stage: &'static str,
    /// Consumer group (the topic prefix is added).
    pub group: String,
    /// Input topics, full names (prefix already applied).
    pub inputs: Vec<String>,
    /// Most records produced but not yet acknowledged.
    pub max_in_flight: usize,
    /// How long a shutdown or revoke waits for in-flight records.
    pub drain_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("input topic {0} does not exist; create it with `vidpulse topics create`")]
    MissingTopic(String),
    #[error("produce failed for good, stopping before its offset is stored: {0}")]
    Produce(String),
    #[error(
        "shutdown drain timed out with {0} records unacknowledged; they will be re-read on restart"
    )]
    DrainTimeout(usize),
}

/// Identifies the input a produced record belongs to.
struct Ticket {
    tp: Tp,
    offset: i64,
    produced: Counter,
}

/// State shared by the loop, the delivery callback (producer thread) and the
/// rebalance callback (consumer poll).
struct Shared {
    stage: &'static str,
    topics: Vec<String>,
    tracker: Mutex<OffsetTracker>,
    assigned: Mutex<HashSet<Tp>>,
    permits: Arc<Semaphore>,
    fatal: Mutex<Option<String>>,
    fatal_token: CancellationToken,
    producer: OnceLock<Weak<ThreadedProducer<DeliveryCtx>>>,
    drain_timeout: Duration,
    lag: Mutex<HashMap<(String, i32), metrics::Gauge>>,
}

impl Shared {
    fn topic_index(&self, topic: &str) -> Option<u16> {
        self.topics
            .iter()
            .position(|t| t == topic)
            .map(|i| i as u16)
    }

    fn tp_list(&self, offsets: &[(Tp, i64)]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((t, p), off) in offsets {
            if let Some(topic) = self.topics.get(*t as usize) {
                let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*off));
            }
        }
        tpl
    }

    /// Stores every moved committable offset of assigned partitions.
    fn store_moved<C: ConsumerContext>(&self, consumer: &impl Consumer<C>) {
        let moved = match self.tracker.lock() {
            Ok(mut t) => t.take_moved(),
            Err(_) => return,
        };
        let assigned = self.assigned.lock().map(|a| a.clone()).unwrap_or_default();
        let moved: Vec<_> = moved
            .into_iter()
            .filter(|(tp, _)| assigned.contains(tp))
            .collect();
        if moved.is_empty() {
            return;
        }
        if let Err(error) = consumer.store_offsets(&self.tp_list(&moved)) {
            // A partition revoked in between: its new owner re-reads it.
            tracing::debug!(%error, "Offset store failed.");
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
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_rdkafka(level, fac, log_message);
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
                counter!(m::PRODUCE_FAILED, "stage" => self.0.stage).increment(1);
                self.0.set_fatal(format!("to {}: {error}", msg.topic()));
            }
        }
    }
}

struct ConsumerCtx(Arc<Shared>);

impl ClientContext for ConsumerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_rdkafka(level, fac, log_message);
    }

    fn stats(&self, stats: Statistics) {
        if let Ok(mut gauges) = self.0.lag.lock() {
            record_lag(self.0.stage, &stats, &mut gauges);
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
            let revoked = self.tps(tpl);
            if let (Ok(mut a), Ok(mut t)) = (self.0.assigned.lock(), self.0.tracker.lock()) {
                for tp in revoked {
                    a.remove(&tp);
                    t.forget(tp);
                }
            }
            tracing::info!(partitions = tpl.count(), "Partitions revoked.");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let tps = self.tps(tpl);
            if let (Ok(mut a), Ok(mut t)) = (self.0.assigned.lock(), self.0.tracker.lock()) {
                for tp in tps {
                    t.forget(tp);
                    a.insert(tp);
                }
            }
            tracing::info!(partitions = tpl.count(), "Partitions assigned.");
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
            counter!(m::COMMIT_FAILED, "stage" => self.0.stage).increment(1);
            tracing::warn!(%error, "Offset commit failed; it is retried on the next interval.");
        }
    }
}

impl ConsumerCtx {
    fn tps(&self, tpl: &TopicPartitionList) -> Vec<Tp> {
        tpl.elements()
            .iter()
            .filter_map(|e| self.0.topic_index(e.topic()).map(|t| (t, e.partition())))
            .collect()
    }
}

/// Sets the consumer-lag gauge of every partition in `stats`.
pub fn record_lag(
    stage: &'static str,
    stats: &Statistics,
    gauges: &mut HashMap<(String, i32), metrics::Gauge>,
) {
    for (name, topic) in &stats.topics {
        for (p, part) in &topic.partitions {
            if *p < 0 || part.consumer_lag < 0 {
                continue;
            }
            gauges
                .entry((name.clone(), *p))
                .or_insert_with(|| {
                    gauge!(m::CONSUMER_LAG, "stage" => stage, "topic" => name.clone(), "partition" => p.to_string())
                })
                .set(part.consumer_lag as f64);
        }
    }
}

/// Fails when an input topic does not exist, naming the fix.
pub fn check_topics_exist<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topics: &[String],
) -> Result<(), PipelineError> {
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let exists = md
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if !exists {
            return Err(PipelineError::MissingTopic(topic.clone()));
        }
    }
    Ok(())
}

pub fn log_rdkafka(level: RDKafkaLogLevel, fac: &str, msg: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", fac, "{msg}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{msg}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", fac, "{msg}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{msg}"),
    }
}

/// Runs the loop until `shutdown` is cancelled (then drains) or a produce
/// fails for good.
pub async fn run<P: Processor>(
    kafka_args: &KafkaArgs,
    settings: Settings,
    mut processor: P,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let stage = settings.stage;
    let shared = Arc::new(Shared {
        stage,
        topics: settings.inputs.clone(),
        tracker: Mutex::new(OffsetTracker::new()),
        assigned: Mutex::new(HashSet::new()),
        permits: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
        fatal: Mutex::new(None),
        fatal_token: CancellationToken::new(),
        producer: OnceLock::new(),
        drain_timeout: settings.drain_timeout,
        lag: Mutex::new(HashMap::new()),
    });

    let producer: Arc<ThreadedProducer<DeliveryCtx>> =
        Arc::new(ThreadedProducer::from_config_and_context(
            &kafka::producer_config(kafka_args)?,
            DeliveryCtx(shared.clone()),
        )?);
    let _ = shared.producer.set(Arc::downgrade(&producer));
    let consumer: StreamConsumer<ConsumerCtx> = StreamConsumer::from_config_and_context(
        &kafka::consumer_config(kafka_args, &settings.group)?,
        ConsumerCtx(shared.clone()),
    )?;

    check_topics_exist(&consumer, &settings.inputs)?;
    let inputs: Vec<&str> = settings.inputs.iter().map(String::as_str).collect();
    consumer.subscribe(&inputs)?;
    tracing::info!(stage, group = %kafka_args.topic(&settings.group), topics = ?inputs, "Consuming.");
    health.set_ready();

    let received: Vec<Counter> = settings
        .inputs
        .iter()
        .map(|t| counter!(m::RECORDS_RECEIVED, "stage" => stage, "topic" => t.clone()))
        .collect();
    let mut produced: HashMap<String, Counter> = HashMap::new();
    let in_flight = gauge!(m::IN_FLIGHT, "stage" => stage);
    let mut out: Vec<Output> = Vec::new();
    let mut store_tick = tokio::time::interval(Duration::from_millis(200));
    store_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    'main: loop {
        let msg = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = shared.fatal_token.cancelled() => break,
            _ = store_tick.tick() => {
                shared.store_moved(&consumer);
                if let Ok(t) = shared.tracker.lock() {
                    in_flight.set(t.in_flight() as f64);
                }
                continue;
            }
            msg = consumer.recv() => msg,
        };
        let msg = match msg {
            Ok(msg) => msg,
            Err(error) => {
                tracing::warn!(stage, %error, "Consume error; retrying.");
                continue;
            }
        };
        let Some(t) = shared.topic_index(msg.topic()) else {
            continue;
        };
        let tp = (t, msg.partition());
        // A record fetched before its partition was revoked: its new owner
        // handles it, so producing it here would only duplicate it.
        if !shared
            .assigned
            .lock()
            .map(|a| a.contains(&tp))
            .unwrap_or(false)
        {
            continue;
        }
        received[t as usize].increment(1);
        // Raw records rarely carry headers: no allocation then.
        let headers: Vec<(&str, &[u8])> = msg
            .headers()
            .map(|hs| hs.iter().filter_map(|h| Some((h.key, h.value?))).collect())
            .unwrap_or_default();
        let input = Input {
            topic: msg.topic(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key(),
            payload: msg.payload(),
            timestamp_ms: msg.timestamp().to_millis(),
            headers: &headers,
        };
        out.clear();
        processor.process(&input, &mut out);
        let n = out.len() as u32;
        if n > 0 {
            // Back-pressure: wait for room before producing more.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'main,
                _ = shared.fatal_token.cancelled() => break 'main,
                permit = shared.permits.acquire_many(n) => match permit {
                    Ok(p) => p.forget(),
                    Err(_) => break 'main,
                },
            }
        }
        if let Ok(mut tr) = shared.tracker.lock() {
            tr.begin(tp, input.offset, n);
        }
        for o in out.drain(..) {
            // The topic's counter; its name is copied only the first time.
            let produced = match produced.get(&o.topic) {
                Some(c) => c.clone(),
                None => {
                    let c =
                        counter!(m::RECORDS_PRODUCED, "stage" => stage, "topic" => o.topic.clone());
                    produced.insert(o.topic.clone(), c.clone());
                    c
                }
            };
            let ticket = Box::new(Ticket {
                tp,
                offset: input.offset,
                produced,
            });
            let mut record: BaseRecord<'_, [u8], [u8], Box<Ticket>> =
                BaseRecord::with_opaque_to(&o.topic, ticket);
            if let Some(k) = &o.key {
                record = record.key(k.as_slice());
            }
            if let Some(p) = &o.payload {
                record = record.payload(p.as_slice());
            }
            // librdkafka allocates a header list: only when there are headers.
            if !o.headers.is_empty() {
                let mut headers = OwnedHeaders::new_with_capacity(o.headers.len());
                for (k, v) in &o.headers {
                    headers = headers.insert(Header {
                        key: k,
                        value: Some(v),
                    });
                }
                record = record.headers(headers);
            }
            let mut record = record;
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) => {
                        shared.set_fatal(format!("to {}: {error}", o.topic));
                        break 'main;
                    }
                }
            }
        }
    }

    health.set_not_ready("draining");
    let flusher = producer.clone();
    let drain = settings.drain_timeout;
    let flushed = tokio::task::spawn_blocking(move || flusher.flush(drain)).await;
    shared.store_moved(&consumer);
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(%error, "Final commit failed.");
    }
    let fatal = shared.fatal.lock().ok().and_then(|f| f.clone());
    if let Some(msg) = fatal {
        health.set_not_ready(format!("failed: {msg}"));
        return Err(PipelineError::Produce(msg));
    }
    if !matches!(flushed, Ok(Ok(()))) {
        let left = shared.tracker.lock().map(|t| t.in_flight()).unwrap_or(0);
        return Err(PipelineError::DrainTimeout(left));
    }
    tracing::info!(stage, "Drained; offsets committed.");
    Ok(())
}
