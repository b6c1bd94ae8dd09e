//! The consume → batch → sink loop for stages that write to a store (Redis,
//! ClickHouse) instead of a topic.
//!
//! Delivery guarantee: at-least-once into an idempotent sink. Records are
//! gathered into a batch (up to `max_batch` records or `max_wait` after the
//! first, whichever comes first), written with retries and exponential
//! backoff, and only then are their offsets stored. While the sink fails the
//! loop stops consuming (back-pressure: one batch in hand at most), reports
//! not-ready on `/readyz`, and resumes by itself when the sink recovers. A
//! shutdown during retries exits without storing the unwritten batch's
//! offsets, so it is read again on restart.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{Counter, counter, gauge};
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::config::KafkaArgs;
use crate::kafka;
use crate::metrics as m;
use crate::pipeline::PipelineError;

/// One consumed record, owned.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
}

/// A sink failure; `retriable` ones are retried with backoff, others stop
/// the stage (before the batch's offsets are stored).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    pub message: String,
    pub retriable: bool,
}

impl SinkError {
    pub fn retriable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retriable: true,
        }
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retriable: false,
        }
    }
}

/// Where a batch goes. `write` must be idempotent: after a crash the same
/// records may be written again.
pub trait Sink: Send {
    fn write(&mut self, batch: &[Record]) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// How the loop runs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub stage: &'static str,
    /// Consumer group (the topic prefix is added).
    pub group: String,
    /// Input topics, full names.
    pub inputs: Vec<String>,
    pub max_batch: usize,
    pub max_wait: Duration,
    /// First retry delay; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

/// Metric: sink write failures (each retry counts). Labels: `stage`.
pub const SINK_ERRORS: &str = "vidpulse_sink_errors_total";
/// Metric: sink write latency in seconds. Labels: `stage`.
pub const SINK_LATENCY: &str = "vidpulse_sink_write_seconds";

struct Ctx {
    stage: &'static str,
    assigned: Arc<Mutex<HashSet<(String, i32)>>>,
    lag: Mutex<HashMap<(String, i32), metrics::Gauge>>,
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        crate::pipeline::log_rdkafka(level, fac, msg);
    }

    fn stats(&self, stats: Statistics) {
        if let Ok(mut gauges) = self.lag.lock() {
            crate::pipeline::record_lag(self.stage, &stats, &mut gauges);
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Offsets of written batches are already stored: commit them so
            // the next owner starts after them.
            if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(%error, "Commit on revoke failed.");
            }
            if let Ok(mut a) = self.assigned.lock() {
                for e in tpl.elements() {
                    a.remove(&(e.topic().to_owned(), e.partition()));
                }
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance
            && let Ok(mut a) = self.assigned.lock()
        {
            for e in tpl.elements() {
                a.insert((e.topic().to_owned(), e.partition()));
            }
            tracing::info!(partitions = tpl.count(), "Partitions assigned.");
        }
    }
}

/// Runs the loop until `shutdown` is cancelled or the sink fails for good.
pub async fn run<S: Sink>(
    kafka_args: &KafkaArgs,
    settings: Settings,
    mut sink: S,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let stage = settings.stage;
    let assigned = Arc::new(Mutex::new(HashSet::new()));
    let ctx = Ctx {
        stage,
        assigned: assigned.clone(),
        lag: Mutex::new(HashMap::new()),
    };
    let consumer: StreamConsumer<Ctx> = StreamConsumer::from_config_and_context(
        &kafka::consumer_config(kafka_args, &settings.group)?,
        ctx,
    )?;
    crate::pipeline::check_topics_exist(&consumer, &settings.inputs)?;
    let inputs: Vec<&str> = settings.inputs.iter().map(String::as_str).collect();
    consumer.subscribe(&inputs)?;
    tracing::info!(stage, topics = ?inputs, "Consuming.");
    health.set_ready();

    let received: HashMap<String, Counter> = settings
        .inputs
        .iter()
        .map(|t| {
            (
                t.clone(),
                counter!(m::RECORDS_RECEIVED, "stage" => stage, "topic" => t.clone()),
            )
        })
        .collect();
    let errors = counter!(SINK_ERRORS, "stage" => stage);
    let latency = metrics::histogram!(SINK_LATENCY, "stage" => stage);
    let mut batch: Vec<Record> = Vec::with_capacity(settings.max_batch);
    let result = 'main: loop {
        // Gather a batch: wait for the first record, then up to max_wait.
        let mut deadline: Option<tokio::time::Instant> = None;
        while batch.len() < settings.max_batch {
            let recv = consumer.recv();
            let msg = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'main Ok(()),
                _ = sleep_until(deadline) => break,
                msg = recv => msg,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(error) => {
                    tracing::warn!(stage, %error, "Consume error; retrying.");
                    continue;
                }
            };
            let key = (msg.topic().to_owned(), msg.partition());
            if !assigned.lock().map(|a| a.contains(&key)).unwrap_or(false) {
                continue;
            }
            if let Some(c) = received.get(msg.topic()) {
                c.increment(1);
            }
            batch.push(Record {
                topic: key.0,
                partition: key.1,
                offset: msg.offset(),
                key: msg.key().map(<[u8]>::to_vec),
                payload: msg.payload().map(<[u8]>::to_vec),
                timestamp_ms: msg.timestamp().to_millis(),
            });
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + settings.max_wait);
        }
        if batch.is_empty() {
            continue;
        }
        // Write with retries; nothing more is consumed meanwhile.
        let mut backoff = settings.min_backoff;
        loop {
            let started = Instant::now();
            match sink.write(&batch).await {
                Ok(()) => {
                    latency.record(started.elapsed().as_secs_f64());
                    if health.not_ready_reason().is_some() {
                        tracing::info!(stage, "Sink recovered.");
                        health.set_ready();
                    }
                    break;
                }
                Err(e) if e.retriable => {
                    errors.increment(1);
                    tracing::warn!(stage, error = %e, retry_in = ?backoff, "Sink write failed; retrying.");
                    health.set_not_ready(format!("sink unavailable: {e}"));
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'main Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(settings.max_backoff);
                }
                Err(e) => {
                    errors.increment(1);
                    health.set_not_ready(format!("failed: {e}"));
                    break 'main Err(PipelineError::Produce(format!("sink: {e}")));
                }
            }
        }
        store_batch(&consumer, &batch, &assigned);
        gauge!(m::IN_FLIGHT, "stage" => stage).set(0.0);
        batch.clear();
    };
    health.set_not_ready("draining");
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(%error, "Final commit failed.");
    }
    if result.is_ok() {
        tracing::info!(stage, "Stopped; written batches committed.");
    }
    result
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Stores, per partition, the offset after the batch's last record.
fn store_batch<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    batch: &[Record],
    assigned: &Mutex<HashSet<(String, i32)>>,
) {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for r in batch {
        let e = next.entry((r.topic.as_str(), r.partition)).or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    let assigned = assigned.lock().map(|a| a.clone()).unwrap_or_default();
    let mut tpl = TopicPartitionList::new();
    for ((t, p), off) in next {
        if assigned.contains(&(t.to_owned(), p)) {
            let _ = tpl.add_partition_offset(t, p, Offset::Offset(off));
        }
    }
    if tpl.count() > 0
        && let Err(error) = consumer.store_offsets(&tpl)
    {
        tracing::debug!(%error, "Offset store failed (partition revoked?).");
    }
}
