//! The aggregator's state machine for one input partition: windows, the
//! watermark, grace and late handling, duplicate suppression, aggregate
//! states, what to emit, and the checkpoint delta. No Kafka, no clock, no
//! I/O: [`PartitionState::process`] takes one record and its offset,
//! [`PartitionState::emit`] says which rows are due, and the idle advance
//! takes the wall clock as an argument, so everything is tested with fake
//! time.
//!
//! Determinism is the delivery guarantee: the state after a sequence of
//! records (and of idle advances, each of which the stage checkpoints before
//! reading on) depends on nothing else. Every emitted row carries a version,
//! the offset after the last record that changed it, and its content is a
//! function of the partition's records up to that offset. So replaying any
//! suffix from a checkpoint re-emits byte-identical rows, and the
//! ReplacingMergeTree / versioned Redis partials keep exactly one copy.
//!
//! Rules (docs/metrics.md):
//! - a pane is *fired* (first emitted) when the watermark reaches its end and
//!   *closed* (state dropped) when the watermark reaches end + grace; with
//!   early emission, open panes' changed rows are emitted on every early tick;
//! - an event whose pane is closed is late for that metric: not counted
//!   there, reported so the stage writes it to `vp.late.v1`;
//! - an event id already counted while any of its panes is open is a
//!   duplicate and counts nowhere.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use hashbrown::{HashMap, HashSet};
use smallvec::SmallVec;

use serde::{Deserialize, Serialize};
use vidpulse_proto::Kind;

use crate::record::{Field, FieldRef, FieldType, Rec, RoomInfo, RoomTable, Val, ValRef};
use crate::spec::{AggFn, GroupBy, Input, Score, Spec};
use crate::window::{Clock, ClockMode, pane_start};

/// Remembered ids are bucketed by 10 s of event time: a checkpoint appends
/// to the recent buckets only, and a bucket is forgotten whole once it is
/// past the horizon (so an id is kept up to 10 s longer than the horizon).
/// Finer buckets cost a checkpoint field per bucket touched, which is most
/// of the checkpoint when a flush covers minutes of sparse event time.
const DEDUP_BUCKET_MS: i64 = 10_000;

/// Default of how long (in event time, behind the watermark) event ids are
/// remembered to recognise duplicates.
pub const DEFAULT_DEDUP_HORIZON_MS: i64 = 10 * 60_000;

/// Default of how long (in event time) a room no event mentioned is kept
/// in the room table.
pub const DEFAULT_ROOM_IDLE_MS: i64 = 24 * 3_600_000;

/// Rooms' last-seen times are kept to the minute, and a room's times are
/// written apart from its profile (`rt:<id>`, three numbers), so an active
/// room's checkpoint changes by a few bytes once a minute and on its start
/// and end events, not by its whole profile.
const ROOM_SEEN_STEP_MS: i64 = 60_000;

/// An event id as remembered: a 64-bit hash (xxh3), so an id costs 8 bytes
/// whatever its length. Stable across builds and platforms (checkpoints
/// keep them).
pub fn id_hash(id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id.as_bytes())
}

/// The spec resolved for fast dispatch, with the stage's settings.
#[derive(Debug)]
pub struct Plan {
    pub spec: Spec,
    pub out_of_orderness_ms: i64,
    /// Grace of each metric (spec value or the stage default).
    pub metric_grace: Vec<i64>,
    pub lb_grace: Vec<i64>,
    targets: HashMap<(Input, Kind), Targets>,
    pub fingerprint: String,
    /// Where partitions' event time comes from.
    pub clock: ClockMode,
    /// How long event ids are remembered (event time behind the
    /// watermark): a duplicate within it counts once whatever its windows;
    /// one later than that counts again.
    pub dedup_horizon_ms: i64,
    /// A room no event mentioned for this long (event time behind the
    /// watermark) leaves the room table.
    pub room_idle_ms: i64,
    /// An ended room leaves the room table this long after its end: the
    /// longest window plus its grace, so every window its events can still
    /// count in finds its profile.
    pub room_after_end_ms: i64,
}

#[derive(Debug, Default)]
struct Targets {
    metrics: Vec<usize>,
    logs: Vec<usize>,
    lbs: Vec<usize>,
}

impl Plan {
    /// A plan whose partitions keep the max-event-time clock (event times
    /// alone; what tests on fake time use).
    pub fn new(spec: Spec, default_grace_ms: i64, out_of_orderness_ms: i64) -> Plan {
        Plan::with_clock(
            spec,
            default_grace_ms,
            out_of_orderness_ms,
            ClockMode::MaxEventTime,
        )
    }

    pub fn with_clock(
        spec: Spec,
        default_grace_ms: i64,
        out_of_orderness_ms: i64,
        clock: ClockMode,
    ) -> Plan {
        let metric_grace: Vec<i64> = spec
            .metrics
            .iter()
            .map(|m| m.grace_ms.unwrap_or(default_grace_ms))
            .collect();
        let lb_grace: Vec<i64> = spec
            .leaderboards
            .iter()
            .map(|l| l.grace_ms.unwrap_or(default_grace_ms))
            .collect();
        let mut targets: HashMap<(Input, Kind), Targets> = HashMap::new();
        for (i, m) in spec.metrics.iter().enumerate() {
            for k in &m.kinds {
                targets.entry((m.input, *k)).or_default().metrics.push(i);
            }
        }
        for (i, l) in spec.logs.iter().enumerate() {
            for k in &l.kinds {
                targets.entry((l.input, *k)).or_default().logs.push(i);
            }
        }
        for (i, l) in spec.leaderboards.iter().enumerate() {
            for k in &l.kinds {
                targets.entry((l.input, *k)).or_default().lbs.push(i);
            }
        }
        // A checkpoint of another clock or checkpoint format is not restored
        // (the partition replays under this one): "c4" is the format with
        // remembered ids as hashes by 10 s of event time, distinct members and
        // remembered ids in appended chunks, cells in one log per pane, and
        // one field per room.
        let fingerprint = match clock {
            ClockMode::InBand => {
                spec.fingerprint(default_grace_ms, out_of_orderness_ms) + "-c4-inband"
            }
            ClockMode::MaxEventTime => {
                spec.fingerprint(default_grace_ms, out_of_orderness_ms) + "-c4"
            }
        };
        // A day in a zone is up to 25 hours long.
        let longest =
            |w: crate::spec::Window| w.size_ms + if w.zone.is_some() { 3_600_000 } else { 0 };
        let room_after_end_ms = metric_grace
            .iter()
            .zip(&spec.metrics)
            .map(|(g, m)| longest(m.window).saturating_add(*g))
            .chain(
                lb_grace
                    .iter()
                    .zip(&spec.leaderboards)
                    .map(|(g, b)| longest(b.window()).saturating_add(*g)),
            )
            .chain([default_grace_ms])
            .max()
            .unwrap_or(0);
        Plan {
            spec,
            out_of_orderness_ms,
            metric_grace,
            lb_grace,
            targets,
            fingerprint,
            clock,
            dedup_horizon_ms: DEFAULT_DEDUP_HORIZON_MS,
            room_idle_ms: DEFAULT_ROOM_IDLE_MS.max(room_after_end_ms),
            room_after_end_ms,
        }
    }

    /// The same plan keeping rooms no event mentioned for `ms` of event
    /// time (at least as long as an ended room is kept).
    pub fn with_room_idle(mut self, ms: i64) -> Plan {
        self.room_idle_ms = ms.max(self.room_after_end_ms);
        self
    }

    /// The same plan remembering ids for `ms` of event time.
    pub fn with_dedup_horizon(mut self, ms: i64) -> Plan {
        self.dedup_horizon_ms = ms.max(0);
        self
    }
}

/// One aggregate's state in one cell.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Agg {
    Count(u64),
    Sum(i64),
    Min(Option<i64>),
    Max(Option<i64>),
    Distinct(BTreeSet<Box<str>>),
    Level(i64),
}

impl Agg {
    fn new(f: &AggFn) -> Agg {
        match f {
            AggFn::Count => Agg::Count(0),
            AggFn::Sum(_) => Agg::Sum(0),
            AggFn::Min(_) => Agg::Min(None),
            AggFn::Max(_) => Agg::Max(None),
            AggFn::Distinct(_) => Agg::Distinct(BTreeSet::new()),
            AggFn::Level { .. } => Agg::Level(0),
        }
    }
}

/// How a set that only grows (a cell's distinct members, a second's
/// remembered ids) is kept in a checkpoint: chunk fields `0..n`, chunk 0
/// the base written whole, the others what each checkpoint since added.
/// A checkpoint appends the members added since the last one as a new
/// chunk, so an unchanged set writes nothing and a growing one writes its
/// new members; once the appended chunks hold as many members as the base
/// (or there are [`Chunks::MAX`] of them) the set is written whole again as
/// the new base and the other chunks are deleted. The base at least doubles
/// each time, so every member is written a bounded number of times on
/// average, and a restore reads at most `MAX` chunks per set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Chunks {
    /// Chunk fields written.
    n: u16,
    /// Members in chunk 0.
    base: u32,
    /// Members in the chunks after it.
    tail: u32,
}

/// Where a checkpoint puts the members added to a set.
#[derive(Debug, PartialEq, Eq)]
enum ChunkWrite {
    /// As chunk `seq`.
    Append(u16),
    /// The whole set as chunk 0; chunk fields `1..stale` are deleted.
    Rewrite { stale: u16 },
}

impl Chunks {
    const MAX: u16 = 128;
    /// Log fields of a window (its cells, its partials): more than a set's
    /// chunks, since a large window changes a little at every checkpoint
    /// all day and a forced rewrite writes all of it; a restore reads them
    /// in the same `HGETALL` anyway.
    const LOG_MAX: u16 = 1024;
    /// A window's log is rewritten once its appended entries are this many
    /// times field 0's: rewrites then cost 4/3 of the window's final size in
    /// all (doubling: 2×), for up to 4× its live entries held in the store.
    const LOG_RATIO: u32 = 3;
    /// Sets up to this size stay in their cell's own field (rewritten with
    /// it: a few members cost less than a chunk field).
    const INLINE: usize = 16;

    /// Plans the write of `added` new members to a set now holding `total`.
    fn next(&mut self, added: usize, total: usize) -> ChunkWrite {
        self.next_within(added, total, Chunks::MAX, 1)
    }

    /// As [`Chunks::next`], with at most `max` fields, rewriting once the
    /// appended fields hold `ratio` times what field 0 does.
    fn next_within(&mut self, added: usize, total: usize, max: u16, ratio: u32) -> ChunkWrite {
        let added = u32::try_from(added).unwrap_or(u32::MAX);
        if self.n == 0
            || self.n >= max
            || self.tail.saturating_add(added) >= self.base.saturating_mul(ratio)
        {
            let stale = self.n;
            *self = Chunks {
                n: 1,
                base: u32::try_from(total).unwrap_or(u32::MAX),
                tail: 0,
            };
            ChunkWrite::Rewrite { stale }
        } else {
            let seq = self.n;
            self.n += 1;
            self.tail += added;
            ChunkWrite::Append(seq)
        }
    }

    /// Takes chunk `seq` of `len` members, read back from a checkpoint.
    fn restored(&mut self, seq: u16, len: usize) {
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        self.n = self.n.max(seq.saturating_add(1));
        if seq == 0 {
            self.base = len;
        } else {
            self.tail = self.tail.saturating_add(len);
        }
    }
}

/// The state of one group in one pane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    /// Offset + 1 of the last record that changed it.
    pub version: u64,
    /// Changed since last emitted.
    pub dirty: bool,
    pub aggs: Vec<Agg>,
    /// Changed since the last checkpoint (not persisted).
    ck: bool,
    /// Distinct members added since the last checkpoint: (aggregate, member).
    added: Vec<(usize, Box<str>)>,
    /// Where its distinct members are in the checkpoint.
    chunks: Chunks,
}

impl Cell {
    /// Its checkpoint field: `[version, dirty, aggregates…]` as a JSON array
    /// (the spec says which aggregate each is): numbers, `null` for an empty
    /// min or max, a distinct set's members while they are few, else `null`
    /// (its members are in chunk fields).
    fn head(&self) -> Vec<u8> {
        use std::fmt::Write as _;
        let mut out = String::with_capacity(16 + 8 * self.aggs.len());
        // Writing to a String cannot fail.
        let _ = write!(out, "[{},{}", self.version, u8::from(self.dirty));
        for a in &self.aggs {
            let _ = match a {
                Agg::Count(n) => write!(out, ",{n}"),
                Agg::Sum(n) | Agg::Level(n) | Agg::Min(Some(n)) | Agg::Max(Some(n)) => {
                    write!(out, ",{n}")
                }
                Agg::Distinct(set) if self.chunks.n == 0 => {
                    out.push(',');
                    out.push_str(&String::from_utf8_lossy(&to_json(set)));
                    Ok(())
                }
                Agg::Min(None) | Agg::Max(None) | Agg::Distinct(_) => write!(out, ",null"),
            };
        }
        out.push(']');
        out.into_bytes()
    }

    /// A cell from its head field (distinct sets empty until its chunks
    /// are read).
    fn from_head(funcs: &[AggFn], field: &str, bytes: &[u8]) -> Result<Cell, RestoreError> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum HeadVal {
            Num(i64),
            Set(BTreeSet<Box<str>>),
        }
        let mut v: Vec<Option<HeadVal>> = from_json(field, bytes)?;
        if v.len() != funcs.len() + 2 {
            return Err(corrupt(
                field,
                "the cell does not have the metric's aggregates",
            ));
        }
        let num = |v: &Option<HeadVal>| match v {
            Some(HeadVal::Num(n)) => Some(*n),
            _ => None,
        };
        let (version, dirty) = (num(&v[0]).unwrap_or(0), num(&v[1]) == Some(1));
        let aggs = funcs
            .iter()
            .zip(v.drain(2..))
            .map(|(f, x)| match Agg::new(f) {
                Agg::Count(_) => Agg::Count(u64::try_from(num(&x).unwrap_or(0)).unwrap_or(0)),
                Agg::Sum(_) => Agg::Sum(num(&x).unwrap_or(0)),
                Agg::Level(_) => Agg::Level(num(&x).unwrap_or(0)),
                Agg::Min(_) => Agg::Min(num(&x)),
                Agg::Max(_) => Agg::Max(num(&x)),
                Agg::Distinct(_) => Agg::Distinct(match x {
                    Some(HeadVal::Set(s)) => s,
                    _ => BTreeSet::new(),
                }),
            })
            .collect();
        Ok(Cell {
            version: u64::try_from(version).unwrap_or(0),
            dirty,
            aggs,
            ck: false,
            added: Vec::new(),
            chunks: Chunks::default(),
        })
    }

    fn members(&self) -> usize {
        self.aggs
            .iter()
            .map(|a| match a {
                Agg::Distinct(s) => s.len(),
                _ => 0,
            })
            .sum()
    }

    /// A chunk: per aggregate, the members it holds (empty for others).
    fn chunk<'a>(&'a self, members: impl Iterator<Item = (usize, &'a str)>) -> Vec<u8> {
        let mut lists: Vec<Vec<&str>> = vec![Vec::new(); self.aggs.len()];
        for (a, m) in members {
            if let Some(l) = lists.get_mut(a) {
                l.push(m);
            }
        }
        to_json(&lists)
    }
}

/// One event-time second's remembered event ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Bucket {
    ids: HashSet<u64>,
    /// Added since the last checkpoint.
    added: Vec<u64>,
    chunks: Chunks,
}

/// A group key: the group-by values in spec order.
pub type Key = Box<[Val]>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Pane {
    fired: bool,
    /// Its `fired` field is in the checkpoint.
    fired_written: bool,
    cells: HashMap<Key, Cell>,
    /// Where its cells are in the checkpoint: log fields `0..n`, each the
    /// cells one checkpoint changed (field 0: every cell, at the last
    /// rewrite), counted in cells like a set's members ([`Chunks`]).
    log: Chunks,
}

/// One member's score from this partition in one leaderboard window.
/// In a checkpoint it is a line of its window's log ([`board_entry`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partial {
    pub value: i64,
    pub version: u64,
    pub dirty: bool,
    /// Changed since the last checkpoint (not persisted).
    ck: bool,
}

/// Everything the partition wrote since the last checkpoint, as hash fields.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CheckpointDelta {
    pub set: Vec<(String, Vec<u8>)>,
    pub del: Vec<String>,
}

impl CheckpointDelta {
    /// Bytes sent to the store: field names and values.
    pub fn bytes(&self) -> usize {
        self.set
            .iter()
            .map(|(f, v)| f.len() + v.len())
            .sum::<usize>()
            + self.del.iter().map(String::len).sum::<usize>()
    }

    /// Puts a window's changed entries (`changed` of `total` now) into its
    /// log: appended as the next field, or `whole()` as field 0 when the log
    /// is due for a rewrite ([`Chunks::LOG_RATIO`], [`Chunks::LOG_MAX`]).
    fn put_log(
        &mut self,
        log: &mut Chunks,
        (changed, total): (usize, usize),
        field: impl Fn(u16) -> String,
        entries: Vec<u8>,
        whole: impl FnOnce() -> Vec<u8>,
    ) {
        let w = log.next_within(changed, total, Chunks::LOG_MAX, Chunks::LOG_RATIO);
        self.put_chunks(w, field, || entries, whole);
    }

    /// Puts a set's new members where `w` says: `appended()` as chunk
    /// `seq`, or `whole()` as chunk 0 with the later chunks deleted;
    /// `field(seq)` names chunk `seq`.
    fn put_chunks(
        &mut self,
        w: ChunkWrite,
        field: impl Fn(u16) -> String,
        appended: impl FnOnce() -> Vec<u8>,
        whole: impl FnOnce() -> Vec<u8>,
    ) {
        match w {
            ChunkWrite::Append(seq) => self.set.push((field(seq), appended())),
            ChunkWrite::Rewrite { stale } => {
                self.set.push((field(0), whole()));
                self.del.extend((1..stale).map(field));
            }
        }
    }
}

/// What changed since the last checkpoint. Cells and partials carry their
/// own flag; these sets say where to look.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Changed {
    panes: BTreeSet<(usize, i64)>,
    days: BTreeSet<(usize, i64)>,
    dedup: BTreeSet<i64>,
    /// Fields of closed panes and windows, of forgotten id buckets and of
    /// pruned rooms.
    gone: Vec<String>,
    /// Rooms whose profile changed (or that are new): their whole field.
    rooms: BTreeSet<String>,
    /// Rooms whose times only changed (seen a minute later, started or
    /// ended again): their small times field.
    times: BTreeSet<String>,
    meta: bool,
}

/// A row of a windowed metric, due for ClickHouse.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricRow {
    pub metric: usize,
    pub pane_start: i64,
    pub key: Key,
    pub version: u64,
    pub aggs: Vec<Agg>,
}

/// A row of a raw log.
#[derive(Clone, Debug, PartialEq)]
pub struct LogRow {
    pub log: usize,
    pub version: u64,
    pub event_time_ms: i64,
    pub event_id: Box<str>,
    pub kind: &'static str,
    pub columns: Vec<Val>,
}

/// A leaderboard partial, due for Redis.
#[derive(Clone, Debug, PartialEq)]
pub struct BoardRow {
    pub board: usize,
    pub window_start: i64,
    pub member: Box<str>,
    pub value: i64,
    pub version: u64,
}

/// What [`PartitionState::emit`] hands to the sinks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Emission {
    pub rows: Vec<MetricRow>,
    pub logs: Vec<LogRow>,
    pub boards: Vec<BoardRow>,
}

impl Emission {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.logs.is_empty() && self.boards.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rows.len() + self.logs.len() + self.boards.len()
    }

    pub fn extend(&mut self, other: Emission) {
        self.rows.extend(other.rows);
        self.logs.extend(other.logs);
        self.boards.extend(other.boards);
    }
}

/// What became of one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// At or before the partition's next offset: already in the state.
    Stale,
    /// No metric, log or leaderboard takes its kind (or its filters failed).
    Ignored,
    /// Its event id was already counted.
    Duplicate,
    /// Counted where it was on time; `late` names the metrics and
    /// leaderboards whose window had already closed (it goes to the late topic).
    Counted { late: Vec<String> },
}

#[derive(Serialize, Deserialize)]
struct Meta {
    fingerprint: String,
    next_offset: i64,
    clock: Clock,
    /// The last record read: (offset, Kafka timestamp).
    #[serde(default)]
    anchor: Option<(i64, i64)>,
}

/// A checkpoint that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("checkpoint has no meta field")]
    NoMeta,
    #[error("checkpoint was taken under another spec or settings ({found} ≠ {want})")]
    Fingerprint { found: String, want: String },
    #[error("checkpoint field {field}: {message}")]
    Corrupt { field: String, message: String },
}

/// The aggregator state of one input partition.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionState {
    pub input: Input,
    /// The next offset to read (`-1` before the first record: read from the
    /// beginning).
    pub next_offset: i64,
    /// The last record read, (offset, Kafka timestamp): a new owner checks
    /// it is still there before trusting the checkpoint (a topic deleted
    /// and recreated has other records at the same offsets).
    pub anchor: Option<(i64, i64)>,
    wm: Clock,
    metrics: Vec<BTreeMap<i64, Pane>>,
    boards: Vec<BTreeMap<i64, HashMap<Box<str>, Partial>>>,
    /// Where each open leaderboard window's partials are in the checkpoint:
    /// log fields `0..n` as for a pane's cells ([`Pane::log`]).
    board_logs: Vec<BTreeMap<i64, Chunks>>,
    /// Bucket start (10 s of event time) → hashes of the event ids counted
    /// in it, for the dedup horizon.
    dedup: BTreeMap<i64, Bucket>,
    rooms: RoomTable,
    logs: Vec<LogRow>,
    changed: Changed,
    /// Whether what changes is tracked for checkpoints (a batch run, which
    /// never checkpoints, keeps no such copies: [`Self::without_checkpoints`]).
    checkpoints: bool,
}

fn cond_ok(c: Option<&crate::spec::Cond>, rec: &Rec<'_>, rooms: &RoomTable) -> bool {
    c.is_none_or(|c| c.holds(rec.get(&c.field, rooms)))
}

fn empty_val(g: &GroupBy) -> Val {
    empty_ref(g).to_owned()
}

fn empty_ref(g: &GroupBy) -> ValRef<'static> {
    match g.ty() {
        FieldType::Str => ValRef::S(""),
        _ => ValRef::I(0),
    }
}

/// The group keys of a record (several when grouping by pool), borrowed
/// from the record and the room table; empty when a required group field is
/// absent.
fn group_keys<'r>(
    group_by: &[GroupBy],
    rec: &'r Rec<'_>,
    rooms: &'r RoomTable,
) -> SmallVec<[GroupKey<'r>; 1]> {
    let mut keys: SmallVec<[GroupKey<'r>; 1]> = smallvec::smallvec![GroupKey::new()];
    for g in group_by {
        if g.field == FieldRef::Canon(Field::Pool) {
            if rec.pools.is_empty() {
                return SmallVec::new();
            }
            let mut next = SmallVec::with_capacity(keys.len() * rec.pools.len());
            for k in &keys {
                for p in rec.pools {
                    let mut k = k.clone();
                    k.push(ValRef::S(p.as_str()));
                    next.push(k);
                }
            }
            keys = next;
            continue;
        }
        let v = match rec.get(&g.field, rooms) {
            Some(v) => v,
            None if g.allow_empty => empty_ref(g),
            None => return SmallVec::new(),
        };
        for k in &mut keys {
            k.push(v);
        }
    }
    keys
}

/// A record's group-by values (on the stack for up to four).
type GroupKey<'r> = SmallVec<[ValRef<'r>; 4]>;

/// A group key borrowed from a record: looks up its cell without building
/// the owned [`Key`] (which is made only for a new cell). Hashes and
/// compares as the owned key does.
struct KeyRef<'k, 'v>(&'k [ValRef<'v>]);

impl std::hash::Hash for KeyRef<'_, '_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `[Val]` hashes: its length, then each value as `Val` hashes.
        state.write_usize(self.0.len());
        for v in self.0 {
            v.hash(state);
        }
    }
}

impl hashbrown::Equivalent<Key> for KeyRef<'_, '_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.0.len() == key.len() && self.0.iter().zip(key.iter()).all(|(a, b)| *a == b.as_ref())
    }
}

fn owned_key(k: &[ValRef<'_>]) -> Key {
    k.iter().map(|v| ValRef::to_owned(*v)).collect()
}

/// A value as distinct-set text, borrowed when it is text already.
fn field_cow(v: ValRef<'_>) -> Cow<'_, str> {
    match v {
        ValRef::S(s) => Cow::Borrowed(s),
        ValRef::I(i) => Cow::Owned(i.to_string()),
    }
}

impl PartitionState {
    /// A fresh state (no checkpoint): reads from the beginning.
    pub fn new(plan: &Plan, input: Input) -> PartitionState {
        PartitionState {
            input,
            next_offset: -1,
            anchor: None,
            wm: Clock::new(plan.clock),
            metrics: vec![BTreeMap::new(); plan.spec.metrics.len()],
            boards: vec![BTreeMap::new(); plan.spec.leaderboards.len()],
            board_logs: vec![BTreeMap::new(); plan.spec.leaderboards.len()],
            dedup: BTreeMap::new(),
            rooms: RoomTable::new(),
            logs: Vec::new(),
            changed: Changed {
                meta: true,
                ..Changed::default()
            },
            checkpoints: true,
        }
    }

    /// A state that is never checkpointed (`vidpulse backfill`): it keeps
    /// no record of what changed since a checkpoint (new members, new ids,
    /// touched windows), which would only grow. Its
    /// [`Self::checkpoint_delta`] panics.
    pub fn without_checkpoints(mut self) -> PartitionState {
        self.checkpoints = false;
        self.changed = Changed::default();
        self
    }

    pub fn watermark(&self) -> i64 {
        self.wm.current()
    }

    pub fn max_event_time(&self) -> i64 {
        self.wm.max_ts()
    }

    /// Open panes over all metrics (for gauges and tests).
    pub fn open_panes(&self) -> usize {
        self.metrics.iter().map(BTreeMap::len).sum()
    }

    /// Open groups: cells of open panes and leaderboard partials (for the
    /// bench's bytes of state per group).
    pub fn open_groups(&self) -> usize {
        let cells: usize = self
            .metrics
            .iter()
            .flat_map(BTreeMap::values)
            .map(|p| p.cells.len())
            .sum();
        cells
            + self
                .boards
                .iter()
                .flat_map(BTreeMap::values)
                .map(HashMap::len)
                .sum::<usize>()
    }

    /// Event ids remembered for duplicate suppression.
    pub fn remembered_ids(&self) -> usize {
        self.dedup.values().map(|b| b.ids.len()).sum()
    }

    /// Rooms in the room table.
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// An estimate of the heap bytes the state holds (panes, partials,
    /// remembered ids, rooms), counting each entry's data and a fixed
    /// overhead per map entry; O(open groups + distinct members), so the
    /// stage samples it now and then.
    pub fn state_bytes(&self) -> usize {
        const ENTRY: usize = 16; // hash or tree bookkeeping per entry
        let val = |v: &Val| {
            std::mem::size_of::<Val>()
                + match v {
                    Val::S(s) => s.len(),
                    Val::I(_) => 0,
                }
        };
        let mut n = 0;
        for cell_map in self.metrics.iter().flat_map(BTreeMap::values) {
            n += std::mem::size_of::<Pane>() + ENTRY;
            for (key, cell) in &cell_map.cells {
                n += std::mem::size_of::<(Key, Cell)>() + ENTRY;
                n += key.iter().map(val).sum::<usize>();
                n += cell.aggs.capacity() * std::mem::size_of::<Agg>();
                n += cell.added.capacity() * std::mem::size_of::<(usize, Box<str>)>();
                for a in &cell.aggs {
                    if let Agg::Distinct(set) = a {
                        n += set
                            .iter()
                            .map(|m| m.len() + std::mem::size_of::<Box<str>>() + ENTRY)
                            .sum::<usize>();
                    }
                }
            }
        }
        for members in self.boards.iter().flat_map(BTreeMap::values) {
            n += members.capacity() * (std::mem::size_of::<(Box<str>, Partial)>() + 1)
                + members.keys().map(|m| m.len()).sum::<usize>();
        }
        for b in self.dedup.values() {
            n += std::mem::size_of::<Bucket>() + ENTRY;
            n += b.ids.capacity() * (8 + 1) + b.added.capacity() * 8;
        }
        for (id, r) in self.rooms.iter() {
            n += std::mem::size_of::<(String, RoomInfo)>() + ENTRY + id.len();
            n += r.room_type.len() + r.client.len() + r.title.len();
            n += r.address.len() + r.anchor_id.len() + r.module_id.len();
        }
        n
    }

    /// Whether an advancing watermark could close or fire anything.
    pub fn has_open_state(&self) -> bool {
        self.metrics.iter().any(|p| !p.is_empty())
            || self.boards.iter().any(|b| !b.is_empty())
            || !self.dedup.is_empty()
    }

    /// Moves past a record that is not an event (undecodable, unknown kind).
    pub fn skip(&mut self, offset: i64) {
        if offset >= self.next_offset {
            self.next_offset = offset + 1;
            self.changed.meta = true;
        }
    }

    /// Whether anything changed since the last checkpoint.
    pub fn dirty(&self) -> bool {
        self.changed != Changed::default()
    }

    /// Takes one record read at `offset`.
    pub fn process(&mut self, plan: &Plan, rec: &Rec<'_>, offset: i64) -> Outcome {
        if offset < self.next_offset {
            return Outcome::Stale;
        }
        self.next_offset = offset + 1;
        self.changed.meta = true;
        let version = (offset + 1) as u64;

        let t = rec.event.event_time_ms;
        self.wm.observe_event(t, plan.out_of_orderness_ms);
        let wm = self.wm.current();
        self.rooms
            .set_clock(wm, plan.room_idle_ms, plan.room_after_end_ms);
        let seen = pane_start(t, ROOM_SEEN_STEP_MS);
        if let Some((id, room)) = rec.room_profile() {
            let info = RoomInfo::from_room(room);
            let was_live = self.rooms.get(id).is_some();
            let entry = self.rooms.entry(id);
            // An end event may carry a bare profile: keep what is known.
            let ended = matches!(rec.kind, Kind::LiveRoomEnded);
            let merged = RoomInfo {
                room_type: pick(&info.room_type, &entry.room_type),
                client: pick(&info.client, &entry.client),
                title: pick(&info.title, &entry.title),
                address: pick(&info.address, &entry.address),
                anchor_id: pick(&info.anchor_id, &entry.anchor_id),
                module_id: pick(&info.module_id, &entry.module_id),
                seen_ms: entry.seen_ms.max(seen),
                // The latest of a room's starts and ends says whether it is
                // on air.
                ended_ms: if t >= entry.changed_ms {
                    ended.then_some(t)
                } else {
                    entry.ended_ms
                },
                changed_ms: entry.changed_ms.max(t),
            };
            if *entry != merged {
                let same_profile = was_live && entry.same_profile(&merged);
                *entry = merged;
                if self.checkpoints {
                    if same_profile {
                        self.changed.times.insert(id.to_owned());
                    } else {
                        self.changed.rooms.insert(id.to_owned());
                    }
                }
            }
        } else if !rec.event.room_id.is_empty()
            && let Some(entry) = self.rooms.get_mut(rec.event.room_id.as_str())
            && entry.seen_ms < seen
        {
            entry.seen_ms = seen;
            if self.checkpoints {
                self.changed.times.insert(rec.event.room_id.clone());
            }
        }

        let Some(targets) = plan.targets.get(&(self.input, rec.kind)) else {
            return Outcome::Ignored;
        };
        // Only windows need duplicate suppression (a log row is keyed by its
        // event id in ClickHouse already), and a duplicate is a duplicate
        // whether or not its windows are still open.
        let id = rec.event.event_id.as_str();
        let dedup = (!(id.is_empty() || targets.metrics.is_empty() && targets.lbs.is_empty()))
            .then(|| (pane_start(t, DEDUP_BUCKET_MS), id_hash(id)));
        // A bucket past the horizon is forgotten whether or not the last
        // emission removed it yet (what a record sees must not depend on
        // when the stage flushed).
        let remembered =
            |second: i64| second.saturating_add(DEDUP_BUCKET_MS + plan.dedup_horizon_ms) > wm;
        if let Some((second, h)) = dedup
            && remembered(second)
            && self.dedup.get(&second).is_some_and(|b| b.ids.contains(&h))
        {
            return Outcome::Duplicate;
        }

        let mut late = Vec::new();
        // Per record: on the stack (a record enters a handful of windows).
        let mut metrics: SmallVec<[(usize, i64); 8]> = SmallVec::new();
        for &m in &targets.metrics {
            let metric = &plan.spec.metrics[m];
            if !cond_ok(metric.when.as_ref(), rec, &self.rooms) {
                continue;
            }
            let pane = metric.window.start_of(t);
            if wm >= metric.window.end_of(pane) + plan.metric_grace[m] {
                late.push(metric.name.clone());
                continue;
            }
            metrics.push((m, pane));
        }
        let mut boards: SmallVec<[(usize, i64); 4]> = SmallVec::new();
        for &b in &targets.lbs {
            let board = &plan.spec.leaderboards[b];
            if !cond_ok(board.when.as_ref(), rec, &self.rooms) {
                continue;
            }
            let start = board.start_of(t);
            if wm >= board.end_of(start) + plan.lb_grace[b] {
                late.push(board.name.clone());
                continue;
            }
            boards.push((b, start));
        }
        let logs: Vec<usize> = targets
            .logs
            .iter()
            .copied()
            .filter(|l| cond_ok(plan.spec.logs[*l].when.as_ref(), rec, &self.rooms))
            .collect();
        if metrics.is_empty() && boards.is_empty() && logs.is_empty() {
            return if late.is_empty() {
                Outcome::Ignored
            } else {
                Outcome::Counted { late }
            };
        }

        let windowed = !(metrics.is_empty() && boards.is_empty());
        if let (true, Some((second, h))) = (windowed, dedup)
            // Older than the horizon: forgotten at once, not remembered.
            && remembered(second)
        {
            let bucket = self.dedup.entry(second).or_default();
            bucket.ids.insert(h);
            if self.checkpoints {
                bucket.added.push(h);
                if self.changed.dedup.last() != Some(&second) {
                    self.changed.dedup.insert(second);
                }
            }
        }

        for (m, pane) in metrics {
            self.apply_metric(plan, m, pane, rec, version);
        }
        for (b, start) in boards {
            self.apply_board(plan, b, start, rec, version);
        }
        for l in logs {
            let log = &plan.spec.logs[l];
            let columns = log
                .columns
                .iter()
                .map(|c| {
                    rec.get(&c.field, &self.rooms)
                        .map_or_else(|| empty_val(c), ValRef::to_owned)
                })
                .collect();
            self.logs.push(LogRow {
                log: l,
                version,
                event_time_ms: t,
                event_id: id.into(),
                kind: rec.kind.as_str(),
                columns,
            });
        }
        Outcome::Counted { late }
    }

    fn apply_metric(&mut self, plan: &Plan, m: usize, pane: i64, rec: &Rec<'_>, version: u64) {
        let metric = &plan.spec.metrics[m];
        let rooms = &self.rooms;
        // Which aggregates take this record, and with what input.
        let mut inputs: SmallVec<[Option<AggInput>; 4]> = SmallVec::new();
        for a in &metric.aggregates {
            let takes = (a.kinds.is_empty() || a.kinds.contains(&rec.kind))
                && cond_ok(a.when.as_ref(), rec, rooms);
            inputs.push(if !takes {
                None
            } else {
                match &a.func {
                    AggFn::Count => Some(AggInput::One),
                    AggFn::Sum(f) | AggFn::Min(f) | AggFn::Max(f) => Some(
                        rec.get(f, rooms)
                            .and_then(ValRef::as_int)
                            .map_or(AggInput::Nothing, AggInput::Num),
                    ),
                    AggFn::Distinct(f) => Some(
                        rec.get(f, rooms)
                            .map_or(AggInput::Nothing, |v| AggInput::Text(field_cow(v))),
                    ),
                    AggFn::Level { rise, fall } => {
                        let d = i64::from(rise.contains(&rec.kind))
                            - i64::from(fall.contains(&rec.kind));
                        if rise.contains(&rec.kind) || fall.contains(&rec.kind) {
                            Some(AggInput::Num(d))
                        } else {
                            None
                        }
                    }
                }
            });
        }
        if inputs.iter().all(Option::is_none) {
            return;
        }
        let keys = group_keys(&metric.group_by, rec, rooms);
        if keys.is_empty() {
            return;
        }
        let track = self.checkpoints;
        let pane_state = self.metrics[m].entry(pane).or_default();
        for key in keys {
            let (_, cell) = pane_state
                .cells
                .raw_entry_mut()
                .from_key(&KeyRef(&key))
                .or_insert_with(|| {
                    let cell = Cell {
                        version: 0,
                        dirty: false,
                        aggs: metric
                            .aggregates
                            .iter()
                            .map(|a| Agg::new(&a.func))
                            .collect(),
                        ck: false,
                        added: Vec::new(),
                        chunks: Chunks::default(),
                    };
                    (owned_key(&key), cell)
                });
            for (i, (agg, input)) in cell.aggs.iter_mut().zip(&inputs).enumerate() {
                let Some(input) = input else { continue };
                match (agg, input) {
                    (Agg::Count(n), _) => *n += 1,
                    (Agg::Sum(s), AggInput::Num(v)) => *s = s.saturating_add(*v),
                    (Agg::Min(x), AggInput::Num(v)) => *x = Some(x.map_or(*v, |x| x.min(*v))),
                    (Agg::Max(x), AggInput::Num(v)) => *x = Some(x.map_or(*v, |x| x.max(*v))),
                    (Agg::Distinct(set), AggInput::Text(v)) if !set.contains(v.as_ref()) => {
                        let v: Box<str> = v.as_ref().into();
                        if track {
                            cell.added.push((i, v.clone()));
                        }
                        set.insert(v);
                    }
                    (Agg::Level(l), AggInput::Num(d)) => *l += d,
                    _ => {}
                }
            }
            cell.version = version;
            cell.dirty = true;
            cell.ck = true;
        }
        if track {
            self.changed.panes.insert((m, pane));
        }
    }

    fn apply_board(&mut self, plan: &Plan, b: usize, start: i64, rec: &Rec<'_>, version: u64) {
        let board = &plan.spec.leaderboards[b];
        let Some(member) = rec.get(&board.member.field, &self.rooms) else {
            return;
        };
        let add = match &board.score {
            Score::Count => 1,
            Score::Sum(f) => match rec.get(f, &self.rooms).and_then(ValRef::as_int) {
                Some(v) => v,
                None => return,
            },
        };
        let member = field_cow(member);
        let p = self.boards[b]
            .entry(start)
            .or_default()
            .raw_entry_mut()
            .from_key(member.as_ref())
            .or_insert_with(|| {
                let p = Partial {
                    value: 0,
                    version: 0,
                    dirty: false,
                    ck: false,
                };
                (member.as_ref().into(), p)
            })
            .1;
        p.value = p.value.saturating_add(add);
        p.version = version;
        p.dirty = true;
        p.ck = true;
        if self.checkpoints {
            self.changed.days.insert((b, start));
        }
    }

    /// Takes a watermark record read at `offset` (in-band clock): the
    /// partition's watermark is the minimum over the sources it declares.
    /// Like an event, it is part of the partition's history: a replay reads
    /// it at the same place and decides the same.
    pub fn observe_watermark(&mut self, record: &vidpulse_proto::Watermark, offset: i64) {
        if offset < self.next_offset {
            return;
        }
        self.next_offset = offset + 1;
        self.changed.meta = true;
        self.wm.observe_watermark(record);
    }

    /// The source holding an in-band watermark back.
    pub fn watermark_holder(&self) -> Option<vidpulse_core::watermark::Holder> {
        self.wm.holder()
    }

    /// Applies an idle advance of the watermark (see
    /// [`Watermark::advance_idle`]); the stage checkpoints before reading
    /// on, so a replay sees the same watermark. Returns whether it moved.
    pub fn advance_idle(
        &mut self,
        plan: &Plan,
        idle_for_ms: i64,
        idle_timeout_ms: i64,
        wall_now_ms: i64,
    ) -> bool {
        let moved = self.wm.advance_idle(
            plan.out_of_orderness_ms,
            idle_for_ms,
            idle_timeout_ms,
            wall_now_ms,
        );
        if moved {
            self.changed.meta = true;
        }
        moved
    }

    /// The rows due now: changed cells of fired panes (and, with `early`,
    /// of open panes too), every changed leaderboard partial, new log rows.
    /// Panes and leaderboard windows past their grace are dropped afterwards,
    /// and remembered ids no longer needed are forgotten.
    pub fn emit(&mut self, plan: &Plan, early: bool) -> Emission {
        let wm = self.wm.current();
        let mut out = Emission {
            logs: std::mem::take(&mut self.logs),
            ..Emission::default()
        };
        for (m, panes) in self.metrics.iter_mut().enumerate() {
            let window = plan.spec.metrics[m].window;
            let grace = plan.metric_grace[m];
            let mut closed = Vec::new();
            for (start, pane) in panes.iter_mut() {
                let end = window.end_of(*start);
                if wm >= end && !pane.fired {
                    pane.fired = true;
                    self.changed.panes.insert((m, *start));
                }
                if pane.fired || early {
                    let mut any = false;
                    for (key, cell) in pane.cells.iter_mut().filter(|(_, c)| c.dirty) {
                        cell.dirty = false;
                        cell.ck = true;
                        any = true;
                        out.rows.push(MetricRow {
                            metric: m,
                            pane_start: *start,
                            key: key.clone(),
                            version: cell.version,
                            aggs: cell.aggs.clone(),
                        });
                    }
                    if any {
                        self.changed.panes.insert((m, *start));
                    }
                }
                if wm >= end.saturating_add(grace) {
                    closed.push(*start);
                }
            }
            let name = &plan.spec.metrics[m].name;
            for start in closed {
                if let Some(pane) = panes.remove(&start) {
                    if pane.fired_written {
                        self.changed.gone.push(fired_field(name, start));
                    }
                    for seq in 0..pane.log.n {
                        self.changed.gone.push(log_field(name, start, seq));
                    }
                    for (key, cell) in &pane.cells {
                        for seq in 0..cell.chunks.n {
                            self.changed.gone.push(chunk_field(name, start, seq, key));
                        }
                    }
                }
                self.changed.panes.remove(&(m, start));
            }
        }
        for (b, days) in self.boards.iter_mut().enumerate() {
            let board = &plan.spec.leaderboards[b];
            let mut closed = Vec::new();
            for (start, members) in days.iter_mut() {
                let mut any = false;
                for (member, p) in members.iter_mut().filter(|(_, p)| p.dirty) {
                    p.dirty = false;
                    p.ck = true;
                    any = true;
                    out.boards.push(BoardRow {
                        board: b,
                        window_start: *start,
                        member: member.clone(),
                        value: p.value,
                        version: p.version,
                    });
                }
                if any {
                    self.changed.days.insert((b, *start));
                }
                if wm >= board.end_of(*start).saturating_add(plan.lb_grace[b]) {
                    closed.push(*start);
                }
            }
            for start in closed {
                days.remove(&start);
                if let Some(log) = self.board_logs[b].remove(&start) {
                    for seq in 0..log.n {
                        self.changed.gone.push(board_field(&board.name, start, seq));
                    }
                }
                self.changed.days.remove(&(b, start));
            }
        }
        while let Some(entry) = self.dedup.first_entry() {
            let second = *entry.key();
            if wm < second.saturating_add(DEDUP_BUCKET_MS + plan.dedup_horizon_ms) {
                break;
            }
            let bucket = entry.remove();
            self.changed.dedup.remove(&second);
            for seq in 0..bucket.chunks.n {
                self.changed.gone.push(dedup_field(second, seq));
            }
        }
        self.rooms
            .set_clock(wm, plan.room_idle_ms, plan.room_after_end_ms);
        for id in self.rooms.prune() {
            self.changed.rooms.remove(&id);
            self.changed.times.remove(&id);
            self.changed.gone.push(room_field(&id));
            self.changed.gone.push(room_times_field(&id));
        }
        out
    }

    /// The checkpoint delta since the last call (hash fields to set and to
    /// delete); `meta` always goes with it. Call after the emitted rows are
    /// acknowledged; the delta is forgotten here, so a failed write must be
    /// retried with the same value.
    pub fn checkpoint_delta(&mut self, plan: &Plan) -> CheckpointDelta {
        assert!(
            self.checkpoints,
            "checkpoint_delta of a state made without_checkpoints (a batch run's)"
        );
        let changed = std::mem::take(&mut self.changed);
        let mut d = CheckpointDelta::default();
        let meta = Meta {
            fingerprint: plan.fingerprint.clone(),
            next_offset: self.next_offset,
            clock: self.wm.clone(),
            anchor: self.anchor,
        };
        d.set.push(("meta".into(), to_json(&meta)));
        d.del = changed.gone;
        // A room's profile is written whole when it changes, and deletes the
        // times field; its times, far more often, on their own (a restore
        // takes them over the profile's).
        for id in &changed.rooms {
            if let Some(r) = self.rooms.get(id) {
                d.set.push((room_field(id), to_json(r)));
                d.del.push(room_times_field(id));
            }
        }
        for id in changed.times.difference(&changed.rooms) {
            if let Some(r) = self.rooms.get(id) {
                d.set.push((room_times_field(id), r.times().into_bytes()));
            }
        }
        for (m, start) in changed.panes {
            let name = &plan.spec.metrics[m].name;
            if let Some(p) = self.metrics[m].get_mut(&start) {
                if p.fired && !p.fired_written {
                    p.fired_written = true;
                    d.set.push((fired_field(name, start), b"1".to_vec()));
                }
                // The changed cells' heads, one log entry each.
                let (mut entries, mut changed_cells) = (Vec::new(), 0);
                for (key, cell) in p.cells.iter_mut().filter(|(_, c)| c.ck) {
                    cell.ck = false;
                    changed_cells += 1;
                    let added = std::mem::take(&mut cell.added);
                    let total = cell.members();
                    // Members go to chunks unless none were added or they
                    // are few enough to stay inline.
                    if !added.is_empty() && (cell.chunks.n > 0 || total > Chunks::INLINE) {
                        let w = cell.chunks.next(added.len(), total);
                        d.put_chunks(
                            w,
                            |seq| chunk_field(name, start, seq, key),
                            || cell.chunk(added.iter().map(|(a, m)| (*a, &**m))),
                            || {
                                cell.chunk(cell.aggs.iter().enumerate().flat_map(|(i, a)| {
                                    let set = match a {
                                        Agg::Distinct(set) => Some(set),
                                        _ => None,
                                    };
                                    set.into_iter().flatten().map(move |m| (i, &**m))
                                }))
                            },
                        );
                    }
                    log_entry(&mut entries, key, cell);
                }
                if changed_cells > 0 {
                    let cells = &p.cells;
                    d.put_log(
                        &mut p.log,
                        (changed_cells, cells.len()),
                        |seq| log_field(name, start, seq),
                        entries,
                        || {
                            let mut all = Vec::new();
                            for (key, cell) in cells {
                                log_entry(&mut all, key, cell);
                            }
                            all
                        },
                    );
                }
            }
        }
        for (b, start) in changed.days {
            let name = &plan.spec.leaderboards[b].name;
            if let Some(members) = self.boards[b].get_mut(&start) {
                let (mut entries, mut changed_members) = (Vec::new(), 0);
                for (member, p) in members.iter_mut().filter(|(_, p)| p.ck) {
                    p.ck = false;
                    changed_members += 1;
                    board_entry(&mut entries, member, p);
                }
                if changed_members > 0 {
                    let members = &*members;
                    d.put_log(
                        self.board_logs[b].entry(start).or_default(),
                        (changed_members, members.len()),
                        |seq| board_field(name, start, seq),
                        entries,
                        || {
                            let mut all = Vec::new();
                            for (member, p) in members {
                                board_entry(&mut all, member, p);
                            }
                            all
                        },
                    );
                }
            }
        }
        for second in changed.dedup {
            let Some(bucket) = self.dedup.get_mut(&second) else {
                continue;
            };
            let added = std::mem::take(&mut bucket.added);
            if added.is_empty() {
                continue;
            }
            let w = bucket.chunks.next(added.len(), bucket.ids.len());
            d.put_chunks(
                w,
                |seq| dedup_field(second, seq),
                || encode_ids(added),
                || encode_ids(bucket.ids.iter().copied().collect()),
            );
        }
        d
    }

    /// Rebuilds a state from every field of its checkpoint hash.
    pub fn restore(
        plan: &Plan,
        input: Input,
        fields: &std::collections::HashMap<String, Vec<u8>>,
    ) -> Result<PartitionState, RestoreError> {
        let meta: Meta = from_json("meta", fields.get("meta").ok_or(RestoreError::NoMeta)?)?;
        if meta.fingerprint != plan.fingerprint {
            return Err(RestoreError::Fingerprint {
                found: meta.fingerprint,
                want: plan.fingerprint.clone(),
            });
        }
        let mut s = PartitionState::new(plan, input);
        s.changed = Changed::default();
        s.next_offset = meta.next_offset;
        s.anchor = meta.anchor;
        s.wm = meta.clock;
        // Chunks of distinct members, applied once their cells are known.
        let mut chunks: Vec<ChunkRead<'_>> = Vec::new();
        // Pane and leaderboard window log fields: (metric or board, window,
        // number, value, field name).
        let mut logs: Vec<LogRead<'_>> = Vec::new();
        let mut board_logs: Vec<LogRead<'_>> = Vec::new();
        let mut bucket_chunks: BTreeMap<i64, u16> = BTreeMap::new();
        let funcs: Vec<Vec<AggFn>> = plan
            .spec
            .metrics
            .iter()
            .map(|m| m.aggregates.iter().map(|a| a.func.clone()).collect())
            .collect();
        let mut times: Vec<(&str, &[u8], &str)> = Vec::new();
        for (field, value) in fields {
            if let Some(id) = field.strip_prefix("r:") {
                s.rooms.insert(id.to_owned(), from_json(field, value)?);
                continue;
            }
            if let Some(id) = field.strip_prefix("rt:") {
                times.push((id, value, field));
                continue;
            }
            let mut parts = field.splitn(4, ':');
            let (Some(tag), Some(name), Some(n)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rest = parts.next();
            match tag {
                "f" | "p" | "s" => {
                    let (Some(m), Ok(start)) = (
                        plan.spec.metrics.iter().position(|m| m.name == name),
                        n.parse::<i64>(),
                    ) else {
                        continue;
                    };
                    let pane = s.metrics[m].entry(start).or_default();
                    match (tag, rest) {
                        ("f", _) => {
                            pane.fired = true;
                            pane.fired_written = true;
                        }
                        ("p", Some(seq)) => {
                            let Ok(seq) = seq.parse::<u16>() else {
                                return Err(corrupt(field, "no log number"));
                            };
                            logs.push((m, start, seq, value, field));
                        }
                        ("s", Some(rest)) => {
                            let Some((seq, key)) = rest
                                .split_once(':')
                                .and_then(|(q, k)| Some((q.parse::<u16>().ok()?, k)))
                            else {
                                return Err(corrupt(field, "no chunk number"));
                            };
                            chunks.push((m, start, seq, key, value, field));
                        }
                        _ => {}
                    }
                }
                "w" => {
                    let (Some(b), Ok(start), Some(Ok(seq))) = (
                        plan.spec.leaderboards.iter().position(|b| b.name == name),
                        n.parse::<i64>(),
                        rest.map(str::parse::<u16>),
                    ) else {
                        continue;
                    };
                    board_logs.push((b, start, seq, value, field));
                }
                "d" => {
                    let (Ok(second), Ok(seq)) = (name.parse::<i64>(), n.parse::<u16>()) else {
                        continue;
                    };
                    let ids = decode_ids(field, value)?;
                    let bucket = s.dedup.entry(second).or_default();
                    bucket.chunks.restored(seq, ids.len());
                    bucket.ids.extend(ids);
                    *bucket_chunks.entry(second).or_insert(0) += 1;
                }
                _ => {}
            }
        }
        for (id, value, field) in times {
            s.rooms
                .set_times(id, value)
                .map_err(|e| corrupt(field, e))?;
        }
        // Each leaderboard window's log in order: a later entry of a member
        // replaces an earlier one.
        board_logs.sort_by_key(|(b, start, seq, _, _)| (*b, *start, *seq));
        for (b, start, seq, value, field) in board_logs {
            let log = s.board_logs[b].entry(start).or_default();
            if seq != log.n {
                return Err(corrupt(field, "a leaderboard window's log has a gap"));
            }
            let members = s.boards[b].entry(start).or_default();
            let mut n = 0;
            for (member, head) in log_lines(field, value)? {
                let member: Box<str> = from_json(field, member)?;
                let (value, version, dirty): (i64, u64, u8) = from_json(field, head)?;
                let p = Partial {
                    value,
                    version,
                    dirty: dirty == 1,
                    ck: false,
                };
                members.insert(member, p);
                n += 1;
            }
            log.restored(seq, n);
        }
        // Each pane's log in order: a later entry of a cell replaces an
        // earlier one.
        logs.sort_by_key(|(m, start, seq, _, _)| (*m, *start, *seq));
        for (m, start, seq, value, field) in logs {
            let Some(pane) = s.metrics[m].get_mut(&start) else {
                continue;
            };
            if seq != pane.log.n {
                return Err(corrupt(field, "a pane's log has a gap"));
            }
            let mut n = 0;
            for (key, head) in log_lines(field, value)? {
                let key: Key = from_json(field, key)?;
                pane.cells
                    .insert(key, Cell::from_head(&funcs[m], field, head)?);
                n += 1;
            }
            pane.log.restored(seq, n);
        }
        let mut cell_chunks: HashMap<(usize, i64, Key), u16> = HashMap::new();
        for (m, start, seq, key, value, field) in chunks {
            let key: Key = from_json(field, key.as_bytes())?;
            let Some(cell) = s.metrics[m]
                .get_mut(&start)
                .and_then(|p| p.cells.get_mut(&key))
            else {
                return Err(corrupt(
                    field,
                    "a chunk of distinct members without its cell",
                ));
            };
            let lists: Vec<Vec<Box<str>>> = from_json(field, value)?;
            let mut len = 0;
            for (agg, list) in cell.aggs.iter_mut().zip(lists) {
                if let Agg::Distinct(set) = agg {
                    len += list.len();
                    set.extend(list);
                }
            }
            cell.chunks.restored(seq, len);
            *cell_chunks.entry((m, start, key)).or_insert(0) += 1;
        }
        // Chunks are written as 0..n, with disjoint members: anything else
        // is a lost or mixed-up write.
        for ((m, start, key), read) in cell_chunks {
            if let Some(cell) = s.metrics[m].get(&start).and_then(|p| p.cells.get(&key))
                && (cell.chunks.n != read
                    || cell.members() != (cell.chunks.base + cell.chunks.tail) as usize)
            {
                let field = chunk_field(&plan.spec.metrics[m].name, start, 0, &key);
                return Err(corrupt(
                    &field,
                    "distinct members do not match their chunks",
                ));
            }
        }
        for (second, read) in bucket_chunks {
            if let Some(b) = s.dedup.get(&second)
                && (b.chunks.n != read || b.ids.len() != (b.chunks.base + b.chunks.tail) as usize)
            {
                let field = dedup_field(second, 0);
                return Err(corrupt(&field, "remembered ids do not match their chunks"));
            }
        }
        Ok(s)
    }
}

/// A log field read back: (metric or leaderboard, window, number, value,
/// field name).
type LogRead<'a> = (usize, i64, u16, &'a [u8], &'a str);

/// A log entry: its key and its head, as bytes.
type LogLine<'a> = (&'a [u8], &'a [u8]);

/// A log field's entries, one per line.
fn log_lines<'a>(field: &str, value: &'a [u8]) -> Result<Vec<LogLine<'a>>, RestoreError> {
    value
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|line| {
            let tab = line
                .iter()
                .position(|b| *b == b'\t')
                .ok_or_else(|| corrupt(field, "a log entry without its tab"))?;
            Ok((&line[..tab], &line[tab + 1..]))
        })
        .collect()
}

/// A chunk field read back: (metric, pane, chunk, group key as JSON, value,
/// field name).
type ChunkRead<'a> = (usize, i64, u16, &'a str, &'a [u8], &'a str);

fn corrupt(field: &str, message: &str) -> RestoreError {
    RestoreError::Corrupt {
        field: field.to_owned(),
        message: message.to_owned(),
    }
}

fn pick(new: &str, old: &str) -> String {
    if new.is_empty() { old } else { new }.to_owned()
}

enum AggInput<'a> {
    One,
    Num(i64),
    Text(Cow<'a, str>),
    Nothing,
}

// Checkpoint fields, one per unit that changes on its own: `f:<metric>:<pane>`
// (fired), `p:<metric>:<pane>:<n>` (the pane's cells, without their
// distinct members, as a log: see [`Pane::log`] and [`log_entry`]),
// `s:<metric>:<pane>:<chunk>:<group key as JSON>` (a
// chunk of its distinct members, see [`Chunks`]), `w:<board>:<window>:<n>`
// (the window's partials, as a log like a pane's), `d:<bucket>:<chunk>:` (a
// chunk of remembered ids),
// `r:<room id>` (a room), plus `meta`.

fn fired_field(metric: &str, start: i64) -> String {
    format!("f:{metric}:{start}")
}

fn log_field(metric: &str, start: i64, seq: u16) -> String {
    format!("p:{metric}:{start}:{seq}")
}

/// Appends a cell to a pane's log field: its group key and its head (both
/// compact JSON, which holds no raw tab or newline), tab-separated, one
/// line per cell.
fn log_entry(out: &mut Vec<u8>, key: &Key, cell: &Cell) {
    out.extend_from_slice(&to_json(key));
    out.push(b'\t');
    out.extend_from_slice(&cell.head());
    out.push(b'\n');
}

fn board_field(board: &str, start: i64, seq: u16) -> String {
    format!("w:{board}:{start}:{seq}")
}

/// Appends a partial to a leaderboard window's log field: the member as a
/// JSON string, a tab, `[value,version,dirty]`, a newline.
fn board_entry(out: &mut Vec<u8>, member: &str, p: &Partial) {
    use std::io::Write as _;
    out.extend_from_slice(&to_json(&member));
    // Writing to a Vec cannot fail.
    let _ = writeln!(out, "\t[{},{},{}]", p.value, p.version, u8::from(p.dirty));
}

fn chunk_field(metric: &str, start: i64, seq: u16, key: &Key) -> String {
    format!(
        "s:{metric}:{start}:{seq}:{}",
        String::from_utf8_lossy(&to_json(key))
    )
}

fn dedup_field(second: i64, seq: u16) -> String {
    format!("d:{second}:{seq}:")
}

fn room_field(id: &str) -> String {
    format!("r:{id}")
}

fn room_times_field(id: &str) -> String {
    format!("rt:{id}")
}

/// Remembered id hashes as a checkpoint value: 8 bytes each, little-endian.
fn encode_ids(mut v: Vec<u64>) -> Vec<u8> {
    v.sort_unstable();
    v.iter().flat_map(|h| h.to_le_bytes()).collect()
}

fn decode_ids(field: &str, bytes: &[u8]) -> Result<Vec<u64>, RestoreError> {
    if !bytes.len().is_multiple_of(8) {
        return Err(RestoreError::Corrupt {
            field: field.to_owned(),
            message: format!("{} bytes is not a list of 8-byte hashes", bytes.len()),
        });
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing plain data (maps with string keys, numbers, strings)
    // cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn from_json<T: for<'de> Deserialize<'de>>(field: &str, bytes: &[u8]) -> Result<T, RestoreError> {
    serde_json::from_slice(bytes).map_err(|e| RestoreError::Corrupt {
        field: field.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
