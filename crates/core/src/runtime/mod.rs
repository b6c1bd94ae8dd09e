//! The stage runtime: the one Kafka loop every stage runs on. A stage
//! implements [`Stage`] — its job, one required method, and the lifecycle
//! hooks it needs — and [`run`] does the rest: the consumer group and its
//! rebalances, partition ownership with generations, batching on size or
//! time, pause / seek / resume, producing outputs, the offset tracker, one
//! retry policy with typed health, flush and commit on revoke, drain on
//! SIGTERM, and the final commit.
//!
//! Delivery guarantee: at-least-once. An input's offset is stored (and then
//! committed, in the background every second, on revoke and on shutdown)
//! only after every output the stage emitted for it, and for every earlier
//! input of its partition, was acknowledged by the broker — or, for a stage
//! whose results become durable elsewhere ([`Commit::WhenDurable`]), only up
//! to the position the stage reports as durable. While a dependency fails
//! the runtime retries the same call with backoff and reads nothing more
//! (every owned partition is paused; records already fetched are re-read
//! after resuming), so memory stays bounded. Records fetched for a
//! partition that was revoked meanwhile are dropped: their new owner reads
//! them. librdkafka's callbacks do no stage work: the revoke callback only
//! flushes the producer (bounded by the drain timeout) and commits, like a
//! Java `onPartitionsRevoked`; every stage hook runs in the loop.

mod callbacks;
mod event_time;
mod partitions;
mod run;

use std::future::Future;

use rdkafka::message::{BorrowedHeaders, Headers as _};

pub use crate::produce::Output;
pub use callbacks::ProduceFailed;
pub use event_time::{ForwardWatermarks, SourceWatermarks, Watermarks};
pub use run::{RuntimeError, error_chain, run};

use crate::config::LoopSettings;
use crate::health::Component;

/// A partition of one of the stage's input topics (`topic` indexes
/// [`StageSettings::inputs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InputPartition {
    pub topic: u16,
    pub partition: i32,
}

/// A record's Kafka headers.
#[derive(Clone, Copy)]
pub enum Headers<'a> {
    None,
    Kafka(&'a BorrowedHeaders),
    Pairs(&'a [(&'a str, &'a [u8])]),
}

impl std::fmt::Debug for Headers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|(k, v)| (k, String::from_utf8_lossy(v))))
            .finish()
    }
}

impl<'a> Headers<'a> {
    /// The value of the first header called `key`.
    pub fn get(&self, key: &str) -> Option<&'a [u8]> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Every header with a value, in order.
    pub fn iter(&self) -> Box<dyn Iterator<Item = (&'a str, &'a [u8])> + 'a> {
        match *self {
            Headers::None => Box::new(std::iter::empty()),
            Headers::Kafka(h) => Box::new(h.iter().filter_map(|h| Some((h.key, h.value?)))),
            Headers::Pairs(p) => Box::new(p.iter().copied()),
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            Headers::None => true,
            Headers::Kafka(h) => h.count() == 0,
            Headers::Pairs(p) => p.is_empty(),
        }
    }
}

/// One record read from an input topic.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    pub part: InputPartition,
    /// Full topic name (prefix included).
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    /// The record's Kafka timestamp, when it has one.
    pub timestamp_ms: Option<i64>,
    pub headers: Headers<'a>,
}

impl<'a> Record<'a> {
    /// The kind of a control record (`vp.control` header), `None` for data.
    pub fn control(&self) -> Option<&'a [u8]> {
        match self.headers {
            Headers::None => None,
            h => h.get(crate::watermark::CONTROL_HEADER),
        }
    }

    /// A record outside Kafka (tests, other sources).
    pub fn detached(
        topic: &'a str,
        partition: i32,
        offset: i64,
        payload: Option<&'a [u8]>,
    ) -> Self {
        Record {
            part: InputPartition {
                topic: 0,
                partition,
            },
            topic,
            partition,
            offset,
            key: None,
            payload,
            timestamp_ms: None,
            headers: Headers::None,
        }
    }
}

/// What a stage emits while handling a batch: each output tied to the input
/// (its index in the batch) whose offset must wait for it, and — in a stage
/// where event time starts ([`Watermarks::Source`]) — each input's event
/// time.
#[derive(Debug, Default)]
pub struct Outputs {
    items: Vec<(u32, Output)>,
    event_times: Vec<(u32, i64)>,
}

impl Outputs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Emits `out` for the batch's input number `input`.
    pub fn push(&mut self, input: usize, out: Output) {
        self.items.push((input as u32, out));
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The outputs in emission order, with their input's index.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &Output)> {
        self.items.iter().map(|(i, o)| (*i as usize, o))
    }

    /// The batch's input number `input` carries an event of time `t`
    /// (epoch ms): its source has been read up to there once it is
    /// acknowledged.
    pub fn event_time(&mut self, input: usize, t: i64) {
        self.event_times.push((input as u32, t));
    }

    pub fn clear(&mut self) {
        self.items.clear();
        self.event_times.clear();
    }

    /// The outputs (by batch index) and event times (by input) gathered.
    pub(crate) fn take(&mut self) -> (Vec<(u32, Output)>, EventTimes) {
        (
            std::mem::take(&mut self.items),
            std::mem::take(&mut self.event_times),
        )
    }
}

/// Event times a batch's outputs carry: (input index, event time).
pub(crate) type EventTimes = Vec<(u32, i64)>;

/// Where reading a newly assigned partition starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// The group's committed offset (or `auto.offset.reset` without one).
    Committed,
    Beginning,
    Offset(i64),
}

/// Why a stage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A dependency failed and may answer later: the runtime marks
    /// `component` failing on `/readyz`, pauses reading, waits with backoff
    /// and makes the same call again.
    #[error("{component} unavailable")]
    Retriable {
        component: Component,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The stage cannot go on: the runtime stops without storing the
    /// offsets of what was not done.
    #[error("stage failed")]
    Fatal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StageError {
    pub fn retriable(
        component: Component,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StageError::Retriable {
            component,
            source: source.into(),
        }
    }

    pub fn fatal(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        StageError::Fatal(source.into())
    }
}

/// When a stage's inputs count as done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Once `process` returned and every output of the input was
    /// acknowledged.
    AfterOutputs,
    /// Only up to what the stage reports durable from `on_tick` (it keeps
    /// state and writes it elsewhere, like the aggregator's checkpoints).
    WhenDurable,
}

/// How the runtime runs one stage.
#[derive(Clone, Debug)]
pub struct StageSettings {
    /// Stage name, for metrics and logs.
    pub stage: &'static str,
    /// Consumer group, full name (prefix applied).
    pub group: String,
    /// Input topics, full names.
    pub inputs: Vec<String>,
    pub loop_: LoopSettings,
    pub commit: Commit,
    /// How often `on_tick` runs.
    pub tick: std::time::Duration,
    /// What the stage does with event time (in-band watermark records).
    pub watermarks: Watermarks,
}

/// What `on_tick` may ask of the runtime.
pub struct Tick<'r> {
    /// The last tick before the stage stops (SIGTERM): flush what can be.
    pub last: bool,
    pub(crate) shared: &'r callbacks::Shared,
    pub(crate) durable: Vec<(InputPartition, i64)>,
    pub(crate) restart: Vec<InputPartition>,
}

impl Tick<'_> {
    /// Waits until every output emitted so far was acknowledged by the
    /// broker; an error if one failed for good.
    pub async fn outputs_acked(&self) -> Result<(), StageError> {
        self.shared.outputs_acked().await
    }

    /// Everything of `part` before `next_offset` is durable: its offset may
    /// be committed ([`Commit::WhenDurable`]).
    pub fn durable(&mut self, part: InputPartition, next_offset: i64) {
        self.durable.push((part, next_offset));
    }

    /// Takes `part` over again, as if it had been revoked and assigned: the
    /// stage's `on_revoke` and `on_assign` run for it, records in flight for
    /// it are dropped, and reading starts where `on_assign` says (say, after
    /// the stage's state store lost it).
    pub fn restart(&mut self, part: InputPartition) {
        self.restart.push(part);
    }
}

/// A stage's job. Only `process` is required; the hooks have no-op
/// defaults. Every method runs in the runtime's loop (never in a librdkafka
/// callback), one at a time.
pub trait Stage {
    /// Handles a batch of records (in offset order within each partition),
    /// emitting outputs through `out`. On `Err(Retriable)` the outputs are
    /// discarded and the same batch (minus records of partitions revoked
    /// meanwhile) is handed over again later, so the call must be safe to
    /// repeat.
    fn process(
        &mut self,
        batch: &[Record<'_>],
        out: &mut Outputs,
    ) -> impl Future<Output = Result<(), StageError>>;

    /// Partitions were assigned; they stay paused until this returns. Say
    /// where reading starts for those that should not start at the
    /// committed offset.
    fn on_assign(
        &mut self,
        parts: &[InputPartition],
    ) -> impl Future<Output = Result<Vec<(InputPartition, StartAt)>, StageError>> {
        let _ = parts;
        async { Ok(Vec::new()) }
    }

    /// Whether records of `part` may be handled now (say, the pool data
    /// they are matched against is loaded). A partition that is not is
    /// paused, and re-read from its first unhandled record once it is.
    fn readable(&self, part: InputPartition) -> bool {
        let _ = part;
        true
    }

    /// Whether `on_tick` should run now rather than at the next interval
    /// (checked after each batch).
    fn tick_due(&self) -> bool {
        false
    }

    /// Time-driven work (flushes), every [`StageSettings::tick`] and once
    /// more before stopping. Report durable positions through `tick`.
    fn on_tick(&mut self, tick: &mut Tick<'_>) -> impl Future<Output = Result<(), StageError>> {
        let _ = tick;
        async { Ok(()) }
    }

    /// Partitions were revoked (their offsets are already committed): drop
    /// their state.
    fn on_revoke(&mut self, parts: &[InputPartition]) -> impl Future<Output = ()> {
        let _ = parts;
        async {}
    }
}
