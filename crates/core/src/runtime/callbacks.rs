//! The state the loop shares with librdkafka's callbacks, and the only
//! `ConsumerContext` of the workspace. Callbacks do bookkeeping only: a
//! delivery report acknowledges its input in the offset tracker; a revoke
//! flushes the producer (bounded by the drain timeout), stores and commits
//! what is done and forgets the partitions; an assignment pauses the new
//! partitions and queues them for the stage's `on_assign` in the loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use metrics::{Counter, counter};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::partitions::Partitions;
use super::{Commit, InputPartition, StageError};
use crate::kafka;
use crate::metrics as m;
use crate::offsets::OffsetTracker;
use crate::produce::{OnDelivery, Producer};

/// A rebalance, for the loop to finish.
#[derive(Debug)]
pub(crate) enum Change {
    Assigned(Vec<InputPartition>),
    Revoked(Vec<InputPartition>),
}

/// What a produced record belongs to.
pub(crate) struct Ticket {
    /// The input whose offset waits for it: (partition, generation, offset).
    pub input: Option<(InputPartition, u64, i64)>,
    pub topic: Arc<str>,
    pub produced: Counter,
}

/// A record the broker refused for good (after librdkafka's retries).
#[derive(Debug, thiserror::Error)]
#[error("produce to {topic} failed for good: {message}")]
pub struct ProduceFailed {
    pub topic: String,
    pub message: String,
}

/// Shared by the loop, the delivery callback (producer thread) and the
/// rebalance callbacks (inside the consumer's poll).
pub(crate) struct Shared {
    pub stage: &'static str,
    pub topics: Vec<String>,
    pub commit: Commit,
    pub drain_timeout: Duration,
    pub tracker: Mutex<OffsetTracker>,
    pub partitions: Mutex<Partitions>,
    /// Positions the stage reported durable ([`Commit::WhenDurable`]).
    pub durable: Mutex<HashMap<InputPartition, i64>>,
    /// The last offset stored per partition.
    pub stored: Mutex<HashMap<InputPartition, i64>>,
    pub changes: Mutex<Vec<Change>>,
    pub changed: Notify,
    pub permits: Semaphore,
    /// Outputs sent and not yet reported.
    pub pending: AtomicUsize,
    pub acked: Notify,
    pub fatal: Mutex<Option<ProduceFailed>>,
    pub fatal_token: CancellationToken,
    pub producer: OnceLock<Weak<Producer<Shared>>>,
    pub lag: Mutex<HashMap<(String, i32), metrics::Gauge>>,
}

impl Shared {
    pub fn topic_index(&self, topic: &str) -> Option<u16> {
        self.topics
            .iter()
            .position(|t| t == topic)
            .map(|i| i as u16)
    }

    pub fn topic_name(&self, p: InputPartition) -> &str {
        self.topics
            .get(p.topic as usize)
            .map(String::as_str)
            .unwrap_or("")
    }

    pub fn parts_of(&self, tpl: &TopicPartitionList) -> Vec<InputPartition> {
        tpl.elements()
            .iter()
            .filter_map(|e| {
                self.topic_index(e.topic()).map(|topic| InputPartition {
                    topic,
                    partition: e.partition(),
                })
            })
            .collect()
    }

    pub fn tpl(
        &self,
        parts: impl IntoIterator<Item = (InputPartition, Option<Offset>)>,
    ) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (p, off) in parts {
            let topic = self.topic_name(p);
            match off {
                Some(o) => {
                    let _ = tpl.add_partition_offset(topic, p.partition, o);
                }
                None => {
                    tpl.add_partition(topic, p.partition);
                }
            }
        }
        tpl
    }

    pub fn set_fatal(&self, f: ProduceFailed) {
        if let Ok(mut slot) = self.fatal.lock() {
            slot.get_or_insert(f);
        }
        self.fatal_token.cancel();
    }

    pub fn fatal_error(&self) -> Option<ProduceFailed> {
        self.fatal.lock().ok().and_then(|f| {
            f.as_ref().map(|f| ProduceFailed {
                topic: f.topic.clone(),
                message: f.message.clone(),
            })
        })
    }

    fn flush_producer(&self) -> Result<(), KafkaError> {
        match self.producer.get().and_then(Weak::upgrade) {
            Some(p) => p.flush(self.drain_timeout),
            None => Ok(()),
        }
    }

    /// The offsets to store now: per owned partition (or only `only`), the
    /// tracker's committable offset, capped by the durable position for
    /// stages that report one; only those that moved since last stored.
    fn positions(&self, only: Option<&[InputPartition]>) -> Vec<(InputPartition, i64)> {
        let (Ok(tracker), Ok(durable), Ok(parts), Ok(mut stored)) = (
            self.tracker.lock(),
            self.durable.lock(),
            self.partitions.lock(),
            self.stored.lock(),
        ) else {
            return Vec::new();
        };
        let candidates: Vec<InputPartition> = match only {
            Some(o) => o.to_vec(),
            None => parts.owned().collect(),
        };
        let mut out = Vec::new();
        for p in candidates {
            let done = tracker.committable_of(p);
            let position = match self.commit {
                Commit::AfterOutputs => done,
                Commit::WhenDurable => durable.get(&p).map(|d| done.map_or(*d, |c| c.min(*d))),
            };
            if let Some(o) = position
                && stored.get(&p) != Some(&o)
            {
                stored.insert(p, o);
                out.push((p, o));
            }
        }
        out
    }

    /// Stores the offsets that may be committed (librdkafka commits stored
    /// offsets in the background).
    pub fn store_positions<C: ConsumerContext>(
        &self,
        consumer: &impl Consumer<C>,
        only: Option<&[InputPartition]>,
    ) {
        let positions = self.positions(only);
        if positions.is_empty() {
            return;
        }
        let tpl = self.tpl(
            positions
                .into_iter()
                .map(|(p, o)| (p, Some(Offset::Offset(o)))),
        );
        if let Err(error) = consumer.store_offsets(&tpl) {
            // A partition revoked in between: its new owner re-reads it.
            tracing::debug!(%error, "Offset store failed.");
        }
    }

    /// Waits until every output sent so far is reported.
    pub async fn outputs_acked(&self) -> Result<(), StageError> {
        loop {
            if let Some(f) = self.fatal_error() {
                return Err(StageError::fatal(f));
            }
            if self.pending.load(Ordering::Acquire) == 0 {
                return Ok(());
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.acked.notified()).await;
        }
    }

    fn push(&self, c: Change) {
        if let Ok(mut v) = self.changes.lock() {
            v.push(c);
        }
        self.changed.notify_one();
    }

    pub fn take_changes(&self) -> Vec<Change> {
        self.changes
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    fn revoke<C: ConsumerContext>(&self, consumer: &impl Consumer<C>, parts: Vec<InputPartition>) {
        // Finish what is in flight, so the next owner starts right after it.
        if let Err(error) = self.flush_producer() {
            tracing::warn!(%error, "Flush on revoke incomplete; the next owner re-reads the rest.");
        }
        self.store_positions(consumer, Some(&parts));
        if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(%error, "Commit on revoke failed.");
        }
        let revoked = match (
            self.partitions.lock(),
            self.tracker.lock(),
            self.durable.lock(),
            self.stored.lock(),
        ) {
            (Ok(mut ps), Ok(mut t), Ok(mut d), Ok(mut st)) => {
                let revoked = ps.revoke(&parts);
                for p in &revoked {
                    t.forget(*p);
                    d.remove(p);
                    st.remove(p);
                }
                revoked
            }
            _ => Vec::new(),
        };
        tracing::info!(stage = self.stage, partitions = ?revoked, "Partitions revoked; in-flight records flushed and offsets committed.");
        if !revoked.is_empty() {
            counter!(m::PARTITIONS_REVOKED, "stage" => self.stage).increment(revoked.len() as u64);
            self.push(Change::Revoked(revoked));
        }
    }
}

impl OnDelivery for Shared {
    type Ticket = Ticket;

    fn delivered(&self, ticket: Ticket, result: Result<(), &KafkaError>) {
        self.permits.add_permits(1);
        match result {
            Ok(()) => {
                ticket.produced.increment(1);
                if let Some((p, generation, offset)) = ticket.input
                    && let Ok(mut t) = self.tracker.lock()
                {
                    t.ack(p, generation, offset);
                }
            }
            Err(error) => {
                counter!(m::PRODUCE_FAILED, "stage" => self.stage).increment(1);
                self.set_fatal(ProduceFailed {
                    topic: ticket.topic.to_string(),
                    message: error.to_string(),
                });
            }
        }
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.acked.notify_waiters();
        }
    }
}

/// The consumer's librdkafka context.
pub(crate) struct Ctx(pub Arc<Shared>);

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        kafka::log_rdkafka(level, fac, log_message);
    }

    fn stats(&self, stats: Statistics) {
        if let Ok(mut gauges) = self.0.lag.lock() {
            kafka::record_lag(self.0.stage, &stats, &mut gauges);
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => self.0.revoke(consumer, self.0.parts_of(tpl)),
            Rebalance::Error(error) => {
                tracing::error!(stage = self.0.stage, %error, "Rebalance error; dropping the assignment.");
                let owned: Vec<InputPartition> = self
                    .0
                    .partitions
                    .lock()
                    .map(|p| p.owned().collect())
                    .unwrap_or_default();
                self.0.revoke(consumer, owned);
            }
            Rebalance::Assign(_) => {}
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts = self.0.parts_of(tpl);
            if parts.is_empty() {
                return;
            }
            if let Ok(mut ps) = self.0.partitions.lock() {
                ps.assign(&parts);
            }
            // Nothing is read before the stage has taken them.
            if let Err(error) = consumer.pause(tpl) {
                tracing::warn!(%error, "Pausing newly assigned partitions failed; records that arrive early are re-read.");
            }
            tracing::info!(stage = self.0.stage, partitions = ?parts, "Partitions assigned.");
            counter!(m::PARTITIONS_ASSIGNED, "stage" => self.0.stage).increment(parts.len() as u64);
            self.0.push(Change::Assigned(parts));
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
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
