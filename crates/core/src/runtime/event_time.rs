//! What the runtime does with event time: skip in-band watermark records,
//! hand them to the stage, or write them — as the stage where event time
//! starts (ingest: marks from the event times it reads, per source
//! partition, plus idle sources following the wall clock) or as a stage that
//! passes it on (the monitor: marks from the watermark records of its own
//! input partitions).
//!
//! Guarantee: a mark is written only from inputs that are acknowledged
//! (every output of every input below the partition's committable offset),
//! so in each output partition a watermark record comes after every record
//! it covers. A source is idle only when fresh checks of its end offset find
//! it fully read and acknowledged, with no record read, for the whole idle
//! timeout; a source that is behind, or whose checks stop (a stalled or
//! stopped process), never advances with the clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, counter, gauge};
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::task::JoinHandle;

use super::callbacks::{Shared, Ticket};
use super::{InputPartition, Record};
use crate::config::{ConfigError, KafkaArgs};
use crate::kafka;
use crate::produce::{ProduceError, Producer};
use crate::watermark::{self, CONTROL_HEADER, Idleness, InbandWatermarks, NONE, Progress, Writer};

/// Metric: watermark records read or written. Labels: `stage`, `direction`
/// (`in`, `out`).
pub const WATERMARK_RECORDS: &str = "vidpulse_watermark_records_total";
/// Metric: the mark last written for a source partition (epoch ms). Labels:
/// `stage`, `topic`, `partition`.
pub const SOURCE_WATERMARK: &str = "vidpulse_source_watermark_ms";

/// What a stage does with event time.
#[derive(Clone, Debug, Default)]
pub enum Watermarks {
    /// Control records are not handed to the stage (they count as handled).
    #[default]
    Skip,
    /// Control records are handed to the stage like data
    /// ([`Record::control`]); it keeps event time itself.
    Deliver,
    /// Event time starts here: the stage reports each input's event time
    /// ([`super::Outputs::event_time`]); the runtime writes watermark
    /// records to every partition of the output.
    Source(SourceWatermarks),
    /// The stage passes event time on: the input partitions' watermark
    /// records are read by the runtime (never handed to the stage) and each
    /// input partition's watermark is written to the output.
    Forward(ForwardWatermarks),
}

#[derive(Clone, Debug)]
pub struct SourceWatermarks {
    /// Output topic (full name).
    pub output: String,
    /// Allowed disorder per input topic (indexed like the inputs), ms: the
    /// mark trails the largest event time read by this much.
    pub out_of_orderness_ms: Vec<i64>,
    /// A source fully read and without records this long is idle: its mark
    /// follows the wall clock (minus its allowed disorder).
    pub idle_timeout: Duration,
    /// Write at most this often while marks move.
    pub interval: Duration,
}

#[derive(Clone, Debug)]
pub struct ForwardWatermarks {
    /// Output topic (full name).
    pub output: String,
    pub interval: Duration,
}

/// How often end offsets are checked (idle sources) and partition counts
/// refreshed.
const PROBE_EVERY: Duration = Duration::from_millis(250);
const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// A check slower than this does not count (its answer may be stale).
const PROBE_FRESH: Duration = Duration::from_secs(2);

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn key(p: InputPartition) -> (u16, i32) {
    (p.topic, p.partition)
}

/// A partition's offsets as one check found them.
#[derive(Clone, Copy, Debug)]
struct Ends {
    low: i64,
    high: i64,
    committed: Option<i64>,
}

/// The answer of an end-offset check.
struct Probe {
    started: Instant,
    wall_ms: i64,
    took: Duration,
    /// (input topic index, partition) → its offsets.
    ends: HashMap<(u16, i32), Ends>,
    /// Partition counts: inputs, then the output.
    counts: Option<(Vec<i32>, i32)>,
}

// One per process: the size difference between the modes costs nothing.
#[allow(clippy::large_enum_variant)]
enum Mode {
    Source {
        ooo: Vec<i64>,
        idle_timeout: Duration,
        idle: Idleness,
        /// When each partition last had a record.
        last_read: HashMap<(u16, i32), Instant>,
        /// Partitions that held no record at the latest fresh check (and
        /// never had one read).
        empty: std::collections::HashSet<(u16, i32)>,
        /// While some partition is empty: the others' marks as of the
        /// latest fresh check's start (see [`EventTime::marks`]), and the
        /// marks taken when the check in flight started.
        snapshot: HashMap<(u16, i32), i64>,
        next_snapshot: HashMap<(u16, i32), i64>,
    },
    Forward {
        inband: HashMap<(u16, i32), InbandWatermarks>,
    },
}

/// The runtime's event-time bookkeeping, for [`Watermarks::Source`] and
/// [`Watermarks::Forward`].
pub(crate) struct EventTime {
    mode: Mode,
    progress: Progress,
    writer: Writer,
    output: String,
    output_partitions: i32,
    inputs: Vec<String>,
    probe: Arc<BaseConsumer>,
    probing: Option<JoinHandle<Probe>>,
    next_probe: Instant,
    next_refresh: Instant,
    out_topic: Arc<str>,
    records_in: Counter,
    records_out: Counter,
    produced: Counter,
    gauges: HashMap<(u16, i32), Gauge>,
    stage: &'static str,
}

impl EventTime {
    /// `None` for the modes the runtime has nothing to do in.
    pub fn new(
        kafka_args: &KafkaArgs,
        stage: &'static str,
        group: &str,
        inputs: &[String],
        mode: &Watermarks,
    ) -> Result<Option<EventTime>, EventTimeError> {
        let (output, interval, mode) = match mode {
            Watermarks::Skip | Watermarks::Deliver => return Ok(None),
            Watermarks::Source(s) => (
                s.output.clone(),
                s.interval,
                Mode::Source {
                    ooo: s.out_of_orderness_ms.clone(),
                    idle_timeout: s.idle_timeout,
                    idle: Idleness::default(),
                    last_read: HashMap::new(),
                    empty: Default::default(),
                    snapshot: HashMap::new(),
                    next_snapshot: HashMap::new(),
                },
            ),
            Watermarks::Forward(f) => (
                f.output.clone(),
                f.interval,
                Mode::Forward {
                    inband: HashMap::new(),
                },
            ),
        };
        // A client of the group that never joins it: end offsets, committed
        // offsets and partition counts, off the loop's thread.
        let probe: BaseConsumer = kafka::consumer_config(kafka_args, group)?.create()?;
        let (counts, out) = partition_counts(&probe, inputs, &output)?;
        let sources = inputs.iter().cloned().zip(counts).collect();
        Ok(Some(EventTime {
            mode,
            progress: Progress::default(),
            writer: Writer::new(kafka_args.topic(group), sources, interval),
            out_topic: Arc::from(output.as_str()),
            output,
            output_partitions: out,
            inputs: inputs.to_vec(),
            probe: Arc::new(probe),
            probing: None,
            next_probe: Instant::now(),
            next_refresh: Instant::now() + REFRESH_EVERY,
            records_in: counter!(WATERMARK_RECORDS, "stage" => stage, "direction" => "in"),
            records_out: counter!(WATERMARK_RECORDS, "stage" => stage, "direction" => "out"),
            produced: counter!(crate::metrics::RECORDS_PRODUCED, "stage" => stage, "topic" => "(watermarks)"),
            gauges: HashMap::new(),
            stage,
        }))
    }

    /// A handled batch: its records (with their generations) and the event
    /// times the stage reported (by index).
    pub fn handled(&mut self, records: &[(Record<'_>, u64)], event_times: &[(u32, i64)]) {
        match &mut self.mode {
            Mode::Source { ooo, last_read, .. } => {
                let now = Instant::now();
                for (r, _) in records {
                    last_read.insert(key(r.part), now);
                }
                for (i, t) in event_times {
                    let Some((r, g)) = records.get(*i as usize) else {
                        continue;
                    };
                    let d = ooo.get(r.part.topic as usize).copied().unwrap_or(0);
                    self.progress
                        .record(key(r.part), *g, r.offset, t.saturating_sub(d));
                }
            }
            Mode::Forward { .. } => {}
        }
    }

    /// A control record of an input partition (never handed to the stage).
    pub fn control(&mut self, r: &Record<'_>, generation: u64) {
        let Mode::Forward { inband } = &mut self.mode else {
            return;
        };
        let Some(Ok(w)) = r.control().and_then(|c| watermark::decode(c, r.payload)) else {
            return;
        };
        self.records_in.increment(1);
        let state = inband.entry(key(r.part)).or_default();
        state.observe(&w);
        let mark = state.current();
        if mark != NONE {
            self.progress
                .record(key(r.part), generation, r.offset, mark);
        }
    }

    pub fn revoked(&mut self, parts: &[InputPartition]) {
        for p in parts {
            self.progress.forget(key(*p));
            match &mut self.mode {
                Mode::Source {
                    idle,
                    last_read,
                    empty,
                    ..
                } => {
                    idle.forget(key(*p));
                    last_read.remove(&key(*p));
                    empty.remove(&key(*p));
                }
                Mode::Forward { inband } => {
                    inband.remove(&key(*p));
                }
            }
        }
    }

    /// Checks end offsets in the background and takes finished answers.
    fn probe(&mut self, shared: &Shared, owned: &[(InputPartition, Option<i64>)]) {
        if let Some(job) = &self.probing
            && job.is_finished()
            && let Some(job) = self.probing.take()
            && let Some(Ok(answer)) = job.now_or_never_result()
        {
            self.take_probe(answer, owned);
        }
        let _ = shared;
        let now = Instant::now();
        if self.probing.is_some() || now < self.next_probe {
            return;
        }
        self.next_probe = now + PROBE_EVERY;
        let refresh = now >= self.next_refresh;
        if refresh {
            self.next_refresh = now + REFRESH_EVERY;
        }
        let needs_ends = matches!(self.mode, Mode::Source { .. });
        if !needs_ends && !refresh {
            return;
        }
        // (topic index, partition, topic, whether its committed offset is
        // needed: nothing read from it yet).
        let parts: Vec<(u16, i32, String, bool)> = owned
            .iter()
            .filter(|_| needs_ends)
            .filter_map(|(p, committable)| {
                self.inputs
                    .get(p.topic as usize)
                    .map(|t| (p.topic, p.partition, t.clone(), committable.is_none()))
            })
            .collect();
        if let Mode::Source { next_snapshot, .. } = &mut self.mode {
            next_snapshot.clear();
            for (p, committable) in owned {
                let k = key(*p);
                let m = committable.map_or(NONE, |c| self.progress.acknowledged(k, c));
                next_snapshot.insert(k, m);
            }
        }
        let probe = self.probe.clone();
        let inputs = self.inputs.clone();
        let output = self.output.clone();
        self.probing = Some(tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let wall = wall_ms();
            let ends = end_offsets(&probe, &parts);
            let counts = refresh
                .then(|| partition_counts(&probe, &inputs, &output).ok())
                .flatten();
            Probe {
                started,
                wall_ms: wall,
                took: started.elapsed(),
                ends,
                counts,
            }
        }));
    }

    fn take_probe(&mut self, answer: Probe, owned: &[(InputPartition, Option<i64>)]) {
        if let Some((inputs, out)) = &answer.counts {
            self.writer.sources = self.inputs.iter().cloned().zip(inputs.clone()).collect();
            self.output_partitions = *out;
        }
        let Mode::Source {
            idle,
            last_read,
            empty,
            snapshot,
            next_snapshot,
            ..
        } = &mut self.mode
        else {
            return;
        };
        tracing::debug!(stage = self.stage, took = ?answer.took, partitions = answer.ends.len(), "End offsets checked.");
        // Empty partitions and the others' marks as of the check's start:
        // right however long the check took (the marks were taken before
        // the end offsets were asked for).
        empty.clear();
        std::mem::swap(snapshot, next_snapshot);
        for (p, _) in owned {
            let k = key(*p);
            if let Some(e) = answer.ends.get(&k)
                && e.high <= e.low
                && !last_read.contains_key(&k)
                && self.progress.last(k) == NONE
            {
                // Empty: nothing in the log, and nothing ever read from it
                // under this assignment (once read, it holds like any other
                // source until its records are acknowledged).
                empty.insert(k);
            }
        }
        if answer.took > PROBE_FRESH {
            // Too slow to judge idleness: as if no check happened.
            tracing::debug!(stage = self.stage, took = ?answer.took, "End-offset check too slow for idleness; ignored.");
            return;
        }
        let mut caught_up = Vec::with_capacity(owned.len());
        for (p, committable) in owned {
            let k = key(*p);
            let ok = match answer.ends.get(&k) {
                Some(e) => {
                    let quiet = last_read.get(&k).is_none_or(|t| *t < answer.started);
                    let position = committable.or(e.committed).unwrap_or(-1);
                    quiet && (e.high <= e.low || position >= e.high)
                }
                None => false,
            };
            caught_up.push((k, ok));
        }
        idle.checked(answer.started, answer.wall_ms, caught_up);
    }

    /// Every owned partition's mark, as of what is acknowledged; a source
    /// without one is reported [`NONE`] (it holds readers back), an empty
    /// one [`EMPTY`] (readers leave it out).
    ///
    /// Leaving out an empty source is safe only for records that arrived
    /// before it was seen empty: while some source is empty, the others'
    /// marks are those of the latest check's start — records acknowledged
    /// before the empty one was found empty — so data that lands in the
    /// empty partition right after the check, as old as what the others
    /// were reading then, is still on time.
    ///
    /// An idle source follows the wall clock once every non-empty source is
    /// idle (traffic stopped: windows close). While others still bring
    /// records, an idle one moves on from its own mark only at the wall
    /// clock's pace, never past it: a partition whose producer stalled for
    /// a while, behind the others in event time (a replay, a backlog), then
    /// delivers its records on time instead of late.
    fn marks(&mut self, owned: &[(InputPartition, Option<i64>)]) -> BTreeMap<(u32, i32), i64> {
        let mut marks = BTreeMap::new();
        let all_idle = match &self.mode {
            Mode::Source {
                idle_timeout,
                idle,
                empty,
                ..
            } => owned.iter().all(|(p, _)| {
                let k = key(*p);
                empty.contains(&k) || idle.idle_until(k, *idle_timeout).is_some()
            }),
            Mode::Forward { .. } => false,
        };
        for (p, committable) in owned {
            let k = key(*p);
            let mut mark = committable.map_or(NONE, |c| self.progress.acknowledged(k, c));
            if let Mode::Source {
                ooo,
                idle_timeout,
                idle,
                empty,
                snapshot,
                ..
            } = &self.mode
            {
                if empty.contains(&k) && mark == NONE {
                    mark = watermark::EMPTY;
                } else {
                    if !empty.is_empty() {
                        mark = mark.min(snapshot.get(&k).copied().unwrap_or(NONE));
                    }
                    if let Some((wall, idle_for)) = idle.idle_for(k, *idle_timeout) {
                        let d = ooo.get(p.topic as usize).copied().unwrap_or(0);
                        mark =
                            watermark::idle_mark(mark, wall.saturating_sub(d), idle_for, all_idle);
                    }
                }
            }
            marks.insert((u32::from(p.topic), p.partition), mark);
        }
        marks
    }

    /// Called every store tick: probes, and writes a watermark record to
    /// every output partition when one is due.
    pub async fn tick(
        &mut self,
        shared: &Shared,
        producer: &Producer<Shared>,
    ) -> Result<(), ProduceError> {
        let owned: Vec<(InputPartition, Option<i64>)> = {
            let (Ok(ps), Ok(t)) = (shared.partitions.lock(), shared.tracker.lock()) else {
                return Ok(());
            };
            ps.owned().map(|p| (p, t.committable_of(p))).collect()
        };
        self.probe(shared, &owned);
        let marks = self.marks(&owned);
        for ((t, p), m) in marks
            .iter()
            .filter(|(_, m)| **m != watermark::EMPTY && **m != NONE)
        {
            let k = (*t as u16, *p);
            let topic = self.inputs.get(*t as usize).cloned().unwrap_or_default();
            self.gauges
                .entry(k)
                .or_insert_with(|| gauge!(SOURCE_WATERMARK, "stage" => self.stage, "topic" => topic, "partition" => p.to_string()))
                .set(*m as f64);
        }
        let Some(payload) = self.writer.due(Instant::now(), wall_ms(), marks) else {
            return Ok(());
        };
        let headers: [(&str, &[u8]); 1] = [(CONTROL_HEADER, watermark::WATERMARK.as_bytes())];
        for q in 0..self.output_partitions {
            shared
                .pending
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            let ticket = Ticket {
                input: None,
                topic: self.out_topic.clone(),
                produced: self.produced.clone(),
            };
            if let Err(e) = producer
                .send_to(&self.output, q, &payload, &headers, ticket)
                .await
            {
                shared
                    .pending
                    .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                return Err(e);
            }
            self.records_out.increment(1);
        }
        Ok(())
    }
}

/// Low and end offsets (and committed offsets) of `parts`, from two
/// ListOffsets and one OffsetFetch; partitions that did not answer are left
/// out.
fn end_offsets(
    probe: &BaseConsumer,
    parts: &[(u16, i32, String, bool)],
) -> HashMap<(u16, i32), Ends> {
    let mut out = HashMap::new();
    if parts.is_empty() {
        return out;
    }
    let timeout = Duration::from_secs(2);
    let names: Vec<(&str, i32)> = parts.iter().map(|(_, p, t, _)| (t.as_str(), *p)).collect();
    let Ok(bounds) = kafka::partition_bounds(probe, &names, timeout) else {
        return out;
    };
    let list = |at: Offset, only_uncommitted: bool| {
        let mut tpl = TopicPartitionList::new();
        for (_, p, t, _) in parts.iter().filter(|x| !only_uncommitted || x.3) {
            let _ = tpl.add_partition_offset(t, *p, at);
        }
        tpl
    };
    // Committed offsets only where nothing was read yet (it asks the group
    // coordinator: slower).
    let uncommitted = list(Offset::Invalid, true);
    let committed = if uncommitted.count() > 0 {
        probe.committed_offsets(uncommitted, timeout).ok()
    } else {
        None
    };
    let get = |tpl: &TopicPartitionList, t: &str, p: i32| {
        tpl.find_partition(t, p)
            .and_then(|e| e.offset().to_raw())
            .filter(|o| *o >= 0)
    };
    for (ti, p, t, _) in parts {
        let Some(&(low, high)) = bounds.get(&(t.clone(), *p)) else {
            continue;
        };
        let committed = committed.as_ref().and_then(|c| get(c, t, *p));
        out.insert(
            (*ti, *p),
            Ends {
                low,
                high,
                committed,
            },
        );
    }
    out
}

fn partition_counts(
    probe: &BaseConsumer,
    inputs: &[String],
    output: &str,
) -> Result<(Vec<i32>, i32), EventTimeError> {
    let timeout = Duration::from_secs(10);
    let mut counts = Vec::with_capacity(inputs.len());
    for t in inputs {
        counts.push(
            kafka::partition_count(probe, t, timeout)?
                .ok_or_else(|| EventTimeError::MissingTopic(t.clone()))?,
        );
    }
    let out = kafka::partition_count(probe, output, timeout)?
        .ok_or_else(|| EventTimeError::MissingTopic(output.to_owned()))?;
    Ok((counts, out))
}

#[derive(Debug, thiserror::Error)]
pub enum EventTimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kafka")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topic {0} does not exist; create it with `vidpulse topics create`")]
    MissingTopic(String),
}

trait JoinNow<T> {
    fn now_or_never_result(self) -> Option<Result<T, tokio::task::JoinError>>;
}

impl<T> JoinNow<T> for JoinHandle<T> {
    fn now_or_never_result(self) -> Option<Result<T, tokio::task::JoinError>> {
        futures::FutureExt::now_or_never(self)
    }
}
