//! In-band watermarks: event-time progress that travels with the data.
//!
//! `vp.events.v1` is re-keyed: each of its partitions interleaves events of
//! every raw partition in the order ingest handled them, so no consumer can
//! tell from the event times it sees how far the raw partitions not read yet
//! have got. Progress is known only where data enters, per source partition;
//! ingest writes it as small control records (`vp.control: watermark`, a
//! protobuf [`Watermark`]) to every partition of its output, each after the
//! events it covers were acknowledged, so in every partition a watermark
//! record comes after every event it covers. A reader's watermark for an
//! input partition is the minimum over every source every writer declares
//! ([`InbandWatermarks`]); it never moves while a source is silent.
//!
//! Writers: [`Progress`] turns "this input was handled, with this event
//! time" plus acknowledgements into a per-partition mark; [`Writer`] decides
//! when to write and builds the records. Readers: [`InbandWatermarks`].
//! Everything here is pure; the runtime does the I/O.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vidpulse_proto::{Message as _, SourceMark, SourceTopic, Watermark};

/// Header on every control record; its value names the kind.
pub const CONTROL_HEADER: &str = "vp.control";
/// The value of [`CONTROL_HEADER`] on a watermark record.
pub const WATERMARK: &str = "watermark";

/// No watermark yet.
pub const NONE: i64 = i64::MIN;
/// A source that holds no record: left out of readers' minimum.
pub const EMPTY: i64 = i64::MAX;

/// The watermark a control record carries, if it is one; `Err` for a
/// control record that cannot be read.
pub fn decode(control: &[u8], payload: Option<&[u8]>) -> Option<Result<Watermark, String>> {
    (control == WATERMARK.as_bytes()).then(|| {
        Watermark::decode(payload.unwrap_or_default())
            .map_err(|e| format!("bad watermark record: {e}"))
    })
}

/// One writer's view: its declared sources and the best mark seen per
/// source partition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct WriterState {
    /// Source topic → partition count, from the writer's latest record.
    sources: BTreeMap<String, i32>,
    /// Source topic → partition → highest watermark reported.
    marks: BTreeMap<String, BTreeMap<i32, i64>>,
}

/// Who holds a reader's watermark back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub writer: String,
    pub topic: String,
    pub partition: i32,
    /// Its mark, or [`NONE`] when it has not reported at all.
    pub at: i64,
}

/// What one input partition has learned from the watermark records read
/// from it: per writer, the declared sources and their marks. Its
/// watermark is the minimum over every declared source of every writer — a
/// function of the records read, so a replay decides the same.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InbandWatermarks {
    writers: BTreeMap<String, WriterState>,
}

impl InbandWatermarks {
    /// Takes a watermark record into account; returns whether anything
    /// changed. Marks never go back: a new owner of a source may report it
    /// lower for a while (it re-reads from its committed offset).
    pub fn observe(&mut self, w: &Watermark) -> bool {
        let state = self.writers.entry(w.writer.clone()).or_default();
        let mut changed = false;
        let sources: BTreeMap<String, i32> = w
            .sources
            .iter()
            .map(|s| (s.topic.clone(), s.partitions))
            .collect();
        if !sources.is_empty() && sources != state.sources {
            state.sources = sources;
            changed = true;
        }
        for m in &w.marks {
            let Some(topic) = w.sources.get(m.topic as usize) else {
                continue;
            };
            let slot = state
                .marks
                .entry(topic.topic.clone())
                .or_default()
                .entry(m.partition)
                .or_insert(NONE);
            let next = if m.empty {
                EMPTY
            } else if *slot == EMPTY {
                // It has records now.
                m.watermark_ms
            } else {
                (*slot).max(m.watermark_ms)
            };
            if next != *slot {
                *slot = next;
                changed = true;
            }
        }
        changed
    }

    /// Whether any writer has declared anything yet.
    pub fn is_empty(&self) -> bool {
        self.writers.is_empty()
    }

    /// The source that holds the watermark: the lowest mark (or one that
    /// never reported) over every declared source that is not empty. `None`
    /// before any record, or while every source is empty.
    pub fn holder(&self) -> Option<Holder> {
        let mut low: Option<Holder> = None;
        for (writer, st) in &self.writers {
            for (topic, n) in &st.sources {
                for p in 0..*n {
                    let at = st
                        .marks
                        .get(topic)
                        .and_then(|m| m.get(&p))
                        .copied()
                        .unwrap_or(NONE);
                    if at == EMPTY {
                        continue;
                    }
                    if low.as_ref().is_none_or(|l| at < l.at) {
                        low = Some(Holder {
                            writer: writer.clone(),
                            topic: topic.clone(),
                            partition: p,
                            at,
                        });
                    }
                }
            }
        }
        low
    }

    /// The watermark: the minimum over every declared source that is not
    /// empty ([`NONE`] when there is none, or one never reported).
    pub fn current(&self) -> i64 {
        self.holder().map_or(NONE, |h| h.at)
    }
}

/// Event-time progress of the partitions a writer reads, as of what is
/// acknowledged. The runtime records each handled input (with the mark it
/// implies once everything up to it is acknowledged) and then the
/// partition's committable offset; the mark is that of the last input below
/// it.
#[derive(Debug, Default)]
pub struct Progress {
    parts: HashMap<(u16, i32), PartProgress>,
}

#[derive(Debug)]
struct PartProgress {
    generation: u64,
    /// Inputs not yet acknowledged whose mark is higher than the previous
    /// one: (offset, mark).
    pending: VecDeque<(i64, i64)>,
    /// The highest mark recorded so far (acknowledged or not).
    last: i64,
    /// The mark of everything acknowledged.
    acked: i64,
}

impl Progress {
    /// Input `offset` of partition `p` (assignment `generation`) implies
    /// `mark` once acknowledged. Marks of a partition only grow.
    pub fn record(&mut self, p: (u16, i32), generation: u64, offset: i64, mark: i64) {
        let part = self.parts.entry(p).or_insert_with(|| PartProgress {
            generation,
            pending: VecDeque::new(),
            last: NONE,
            acked: NONE,
        });
        if part.generation != generation {
            *part = PartProgress {
                generation,
                pending: VecDeque::new(),
                last: NONE,
                acked: NONE,
            };
        }
        if mark > part.last {
            part.last = mark;
            part.pending.push_back((offset, mark));
        }
    }

    /// Everything of `p` below `committable` is acknowledged: its mark.
    pub fn acknowledged(&mut self, p: (u16, i32), committable: i64) -> i64 {
        let Some(part) = self.parts.get_mut(&p) else {
            return NONE;
        };
        while let Some(&(offset, mark)) = part.pending.front() {
            if offset >= committable {
                break;
            }
            part.acked = mark;
            part.pending.pop_front();
        }
        part.acked
    }

    /// The highest mark recorded for `p`, acknowledged or not.
    pub fn last(&self, p: (u16, i32)) -> i64 {
        self.parts.get(&p).map_or(NONE, |x| x.last)
    }

    pub fn forget(&mut self, p: (u16, i32)) {
        self.parts.remove(&p);
    }
}

/// Decides when a writer writes watermark records and builds them.
#[derive(Debug)]
pub struct Writer {
    pub writer: String,
    pub instance: String,
    /// Every source the writer's group reads (topic, partitions).
    pub sources: Vec<(String, i32)>,
    /// Write at most this often while marks move.
    pub interval: Duration,
    /// Write at least this often (readers learn the declared sources).
    pub keepalive: Duration,
    last_marks: BTreeMap<(u32, i32), i64>,
    last_write: Option<Instant>,
}

impl Writer {
    pub fn new(writer: String, sources: Vec<(String, i32)>, interval: Duration) -> Writer {
        Writer {
            writer,
            instance: host_name(),
            sources,
            interval,
            keepalive: Duration::from_secs(5),
            last_marks: BTreeMap::new(),
            last_write: None,
        }
    }

    /// The index of `topic` among the declared sources.
    pub fn source_index(&self, topic: &str) -> Option<u32> {
        self.sources
            .iter()
            .position(|(t, _)| t == topic)
            .map(|i| i as u32)
    }

    /// Given the marks of the sources this instance owns ((source index,
    /// partition) → mark, [`EMPTY`] for a source holding no record, [`NONE`]
    /// left out), the record to write to every output partition now, or
    /// `None` when nothing is due.
    pub fn due(
        &mut self,
        now: Instant,
        wall_ms: i64,
        marks: BTreeMap<(u32, i32), i64>,
    ) -> Option<Vec<u8>> {
        let since = self.last_write.map(|t| now.duration_since(t));
        let moved = marks != self.last_marks;
        let due = match since {
            None => true,
            Some(s) => (moved && s >= self.interval) || s >= self.keepalive,
        };
        if !due {
            return None;
        }
        let w = Watermark {
            writer: self.writer.clone(),
            sources: self
                .sources
                .iter()
                .map(|(t, n)| SourceTopic {
                    topic: t.clone(),
                    partitions: *n,
                })
                .collect(),
            marks: marks
                .iter()
                .map(|((t, p), m)| SourceMark {
                    topic: *t,
                    partition: *p,
                    watermark_ms: if *m == EMPTY { 0 } else { *m },
                    empty: *m == EMPTY,
                })
                .collect(),
            instance: self.instance.clone(),
            written_at_ms: wall_ms,
        };
        self.last_marks = marks;
        self.last_write = Some(now);
        Some(w.encode_to_vec())
    }
}

/// This host's name (the pod name in Kubernetes).
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Whether a source partition is idle: caught up (nothing unread) and
/// without records for the idle timeout, judged only from fresh checks of
/// its end offset. A check that comes late (the process was stopped or
/// starved) starts the count again.
#[derive(Debug, Default)]
pub struct Idleness {
    /// Per partition: since when it has been caught up without records.
    since: HashMap<(u16, i32), Instant>,
    /// The latest check: when it started, and the wall clock then.
    last_check: Option<(Instant, i64)>,
}

impl Idleness {
    /// Longest gap between two checks that still counts as continuous.
    pub const MAX_GAP: Duration = Duration::from_secs(3);

    /// A check started at `started` (wall clock `started_wall_ms`):
    /// `caught_up` says for each owned partition whether everything up to
    /// the end offset it found was handled and acknowledged, with no record
    /// read since the check started.
    pub fn checked(
        &mut self,
        started: Instant,
        started_wall_ms: i64,
        caught_up: impl IntoIterator<Item = ((u16, i32), bool)>,
    ) {
        let continuous = self
            .last_check
            .is_some_and(|(t, _)| started.saturating_duration_since(t) <= Self::MAX_GAP);
        if !continuous {
            self.since.clear();
        }
        self.last_check = Some((started, started_wall_ms));
        for (p, ok) in caught_up {
            if ok {
                self.since.entry(p).or_insert(started);
            } else {
                self.since.remove(&p);
            }
        }
    }

    /// A record of `p` was read: not idle.
    pub fn active(&mut self, p: (u16, i32)) {
        self.since.remove(&p);
    }

    /// The wall-clock time up to which `p` is complete because it has been
    /// idle for `timeout` as of the latest check: that check's start.
    pub fn idle_until(&self, p: (u16, i32), timeout: Duration) -> Option<i64> {
        self.idle_for(p, timeout).map(|(wall, _)| wall)
    }

    /// As [`Self::idle_until`], with how long `p` has been idle (from the
    /// first check that found it caught up to the latest one).
    pub fn idle_for(&self, p: (u16, i32), timeout: Duration) -> Option<(i64, Duration)> {
        let (now, wall) = self.last_check?;
        let idle = now.saturating_duration_since(*self.since.get(&p)?);
        (idle >= timeout).then_some((wall, idle))
    }

    pub fn forget(&mut self, p: (u16, i32)) {
        self.since.remove(&p);
    }
}

/// The mark of a source idle for `idle_for`, whose own mark is `mark`
/// ([`NONE`] when it has none) and for which the wall clock minus its
/// allowed disorder is `clock`. Once every source is idle (`all_idle`:
/// traffic stopped) it is the clock, so windows close. Before that it moves
/// on from its own mark at the clock's pace, never past the clock: a
/// partition whose producer stalled while the others went on, behind them
/// in event time (a replay, a backlog), still delivers its records on time.
/// Never below its own mark.
pub fn idle_mark(mark: i64, clock: i64, idle_for: Duration, all_idle: bool) -> i64 {
    let paced = if all_idle || mark == NONE {
        clock
    } else {
        let idle_ms = i64::try_from(idle_for.as_millis()).unwrap_or(i64::MAX);
        mark.saturating_add(idle_ms).min(clock)
    };
    mark.max(paced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_source_is_paced_until_every_source_is_idle() {
        let s = Duration::from_secs(1);
        let (mark, clock) = (1_000_000, 9_000_000);
        // Others still read: its own mark plus the time it has been idle.
        assert_eq!(idle_mark(mark, clock, s * 12, false), mark + 12_000);
        // Never past the wall clock (live data: the same as following it).
        assert_eq!(idle_mark(8_995_000, clock, s * 12, false), clock);
        // Every source idle: the clock, so the last windows close.
        assert_eq!(idle_mark(mark, clock, s * 12, true), clock);
        // No mark of its own yet: nothing to pace from.
        assert_eq!(idle_mark(NONE, clock, s * 12, false), clock);
        // A mark ahead of the clock (disorder larger than the lag) stays.
        assert_eq!(idle_mark(clock + 5, clock, s, true), clock + 5);
    }

    fn record(writer: &str, sources: &[(&str, i32)], marks: &[(u32, i32, i64)]) -> Watermark {
        Watermark {
            writer: writer.into(),
            sources: sources
                .iter()
                .map(|(t, n)| SourceTopic {
                    topic: (*t).into(),
                    partitions: *n,
                })
                .collect(),
            marks: marks
                .iter()
                .map(|(t, p, m)| SourceMark {
                    topic: *t,
                    partition: *p,
                    watermark_ms: if *m == EMPTY { 0 } else { *m },
                    empty: *m == EMPTY,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_watermark_is_the_minimum_over_every_declared_source_of_every_writer() {
        let mut w = InbandWatermarks::default();
        assert_eq!(w.current(), NONE);
        // Instance A owns raw/0 only: raw/1 has not reported.
        assert!(w.observe(&record("ingest", &[("raw", 2)], &[(0, 0, 1_000)])));
        assert_eq!(w.current(), NONE);
        assert_eq!(
            w.holder(),
            Some(Holder {
                writer: "ingest".into(),
                topic: "raw".into(),
                partition: 1,
                at: NONE
            })
        );
        // Instance B reports raw/1.
        w.observe(&record("ingest", &[("raw", 2)], &[(0, 1, 700)]));
        assert_eq!(w.current(), 700);
        // A mark never goes back (a new owner re-reads from its commit).
        assert!(!w.observe(&record("ingest", &[("raw", 2)], &[(0, 1, 500)])));
        assert_eq!(w.current(), 700);
        // A second writer (a Redis stream source) must report too.
        w.observe(&record("ingest@redis", &[("redis:ua", 1)], &[]));
        assert_eq!(w.current(), NONE);
        w.observe(&record("ingest@redis", &[("redis:ua", 1)], &[(0, 0, 900)]));
        assert_eq!(w.current(), 700);
        w.observe(&record("ingest", &[("raw", 2)], &[(0, 1, 1_200)]));
        assert_eq!(
            w.current(),
            900,
            "raw/0 at 1000, raw/1 at 1200, the stream at 900"
        );
        // A source added (a third partition): it holds until it reports.
        w.observe(&record("ingest", &[("raw", 3)], &[(0, 0, 2_000)]));
        assert_eq!(w.current(), NONE);
        // It holds no record: left out, like an idle split.
        w.observe(&record("ingest", &[("raw", 3)], &[(0, 2, EMPTY)]));
        assert_eq!(w.current(), 900);
        // Its first records: it counts again, from its own mark.
        w.observe(&record("ingest", &[("raw", 3)], &[(0, 2, 400)]));
        assert_eq!(w.current(), 400);
    }

    #[test]
    fn only_empty_sources_give_no_watermark() {
        let mut w = InbandWatermarks::default();
        w.observe(&record(
            "ingest",
            &[("raw", 2)],
            &[(0, 0, EMPTY), (0, 1, EMPTY)],
        ));
        assert_eq!(w.current(), NONE);
        assert_eq!(w.holder(), None);
    }

    #[test]
    fn progress_counts_only_what_is_acknowledged() {
        let mut pr = Progress::default();
        let p = (0, 3);
        pr.record(p, 1, 10, 100);
        pr.record(p, 1, 11, 90); // out of order: the mark does not go back
        pr.record(p, 1, 12, 300);
        assert_eq!(pr.acknowledged(p, 10), NONE, "offset 10 not acknowledged");
        assert_eq!(pr.acknowledged(p, 12), 100, "10 and 11 are");
        assert_eq!(pr.acknowledged(p, 13), 300);
        assert_eq!(pr.last(p), 300);
        // Assigned again: starts over.
        pr.record(p, 2, 13, 50);
        assert_eq!(pr.acknowledged(p, 14), 50);
    }

    #[test]
    fn the_writer_writes_when_marks_move_and_as_a_keepalive() {
        let mut w = Writer::new(
            "g".into(),
            vec![("raw".into(), 1)],
            Duration::from_millis(200),
        );
        let t0 = Instant::now();
        let m = |v: i64| BTreeMap::from([((0, 0), v)]);
        let first = w.due(t0, 1, m(5)).unwrap();
        let decoded = Watermark::decode(first.as_slice()).unwrap();
        assert_eq!(decoded.sources[0].topic, "raw");
        assert_eq!(decoded.marks[0].watermark_ms, 5);
        assert!(
            w.due(t0 + Duration::from_millis(100), 1, m(6)).is_none(),
            "too soon"
        );
        assert!(w.due(t0 + Duration::from_millis(300), 1, m(6)).is_some());
        assert!(
            w.due(t0 + Duration::from_secs(2), 1, m(6)).is_none(),
            "unchanged"
        );
        assert!(
            w.due(t0 + Duration::from_secs(6), 1, m(6)).is_some(),
            "keepalive"
        );
    }

    #[test]
    fn idleness_needs_continuous_fresh_checks_for_the_whole_timeout() {
        let mut id = Idleness::default();
        let p = (0, 0);
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let timeout = Duration::from_secs(3);
        for i in 0..3 {
            id.checked(t0 + s * i, 1_000 * i64::from(i), [(p, true)]);
        }
        assert_eq!(id.idle_until(p, timeout), None, "2 s so far");
        id.checked(t0 + s * 3, 3_000, [(p, true)]);
        assert_eq!(id.idle_until(p, timeout), Some(3_000));
        assert_eq!(
            id.idle_for(p, timeout),
            Some((3_000, s * 3)),
            "idle since the first check"
        );
        // A record: not idle any more.
        id.active(p);
        id.checked(t0 + s * 4, 4_000, [(p, true)]);
        assert_eq!(id.idle_until(p, timeout), None);
        // Stopped for 200 s (SIGSTOP): the first check after counts from zero.
        for i in 5..8 {
            id.checked(t0 + s * i, 1_000 * i64::from(i), [(p, true)]);
        }
        assert!(id.idle_until(p, timeout).is_some());
        id.checked(t0 + s * 208, 208_000, [(p, true)]);
        assert_eq!(id.idle_until(p, timeout), None, "a late check starts again");
        // Behind (records unread): not idle.
        id.checked(t0 + s * 209, 209_000, [(p, false)]);
        assert_eq!(id.idle_until(p, Duration::ZERO), None);
    }
}
