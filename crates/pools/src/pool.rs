//! ID pools, the pure part: a pool's definition (which event field it
//! matches, for which kinds, broadcast or bucketed), the membership record
//! written to its compacted topic, the in-memory membership state (last value
//! per key wins, a tombstone removes), and Kafka's default partitioner so the
//! bucket of an id can be computed exactly as every producer computes it.
//!
//! Nothing here talks to Kafka; the loaders in `loader.rs` feed it records.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use vidpulse_proto::{EventIds, Kind};

/// The event field a pool's ids are compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchField {
    /// Production monitoring: the publishing author.
    AuthorId,
    /// Consumption monitoring: the video played, liked, shared, …
    VideoId,
    /// Live rooms.
    RoomId,
    /// The acting user (viewer, gifter, player).
    UserId,
    /// Every event passes (site-wide enrichment); the pool has no members.
    All,
}

impl MatchField {
    pub const NAMES: [&'static str; 5] = ["author_id", "video_id", "room_id", "user_id", "all"];

    pub fn parse(s: &str) -> Option<MatchField> {
        Some(match s {
            "author_id" | "author" => MatchField::AuthorId,
            "video_id" | "video" => MatchField::VideoId,
            "room_id" | "room" => MatchField::RoomId,
            "user_id" | "user" => MatchField::UserId,
            "all" => MatchField::All,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MatchField::AuthorId => "author_id",
            MatchField::VideoId => "video_id",
            MatchField::RoomId => "room_id",
            MatchField::UserId => "user_id",
            MatchField::All => "all",
        }
    }

    /// The id of `event` this field selects; `None` when the event does not
    /// carry it (an event without the id never matches an id pool).
    ///
    /// `video_id` also takes a user action's `target_id` when the envelope
    /// has no video id: that is the video liked / shared (and the id the
    /// event is keyed by, see `Event::subject_key`).
    pub fn select<E: EventIds + ?Sized>(self, event: &E) -> Option<&str> {
        let id = match self {
            MatchField::AuthorId => event.author_id(),
            MatchField::VideoId => {
                if event.video_id().is_empty() {
                    event.target_id()
                } else {
                    event.video_id()
                }
            }
            MatchField::RoomId => event.room_id(),
            MatchField::UserId => event.user_id(),
            MatchField::All => return None,
        };
        (!id.is_empty()).then_some(id)
    }

    /// Kinds whose Kafka key (`Event::subject_key`) is this field, i.e. the
    /// kinds a bucketed pool on this field can check locally.
    pub fn keyed_kinds(self) -> &'static [Kind] {
        match self {
            MatchField::AuthorId => &[Kind::VideoPublished],
            MatchField::VideoId => &[
                Kind::VideoUploaded,
                Kind::VideoMetadata,
                Kind::PlayRequested,
                Kind::VideoPlayed,
                Kind::UserAction,
            ],
            MatchField::RoomId => &[
                Kind::ViewerArrived,
                Kind::ViewerLeft,
                Kind::GiftSent,
                Kind::LiveRoomStarted,
                Kind::LiveRoomEnded,
            ],
            MatchField::UserId | MatchField::All => &[],
        }
    }
}

impl fmt::Display for MatchField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How monitor instances share a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every instance loads the whole pool (a GlobalKTable). For pools up to
    /// a few hundred thousand ids.
    #[default]
    Broadcast,
    /// Each instance loads only the pool partitions whose numbers equal its
    /// assigned `vp.events.v1` partitions (co-partitioned by id). For
    /// millions of ids.
    Bucketed,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "broadcast" => Some(Mode::Broadcast),
            "bucketed" => Some(Mode::Bucketed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Broadcast => "broadcast",
            Mode::Bucketed => "bucketed",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pool's definition, the value of its record in the registry topic
/// `vp.pools.v1` (key = the pool name; a tombstone deletes the pool).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolDef {
    pub name: String,
    #[serde(rename = "match")]
    pub match_field: MatchField,
    /// Event kinds the pool applies to (names as in `Kind::as_str`); empty =
    /// every kind.
    #[serde(default)]
    pub kinds: Vec<String>,
    #[serde(default)]
    pub mode: Mode,
    /// Partitions of the pool topic when it was created.
    #[serde(default)]
    pub partitions: i32,
    #[serde(default)]
    pub created_by: String,
    #[serde(default)]
    pub created_at_ms: i64,
}

/// A pool definition that makes no sense; the message says which part.
#[derive(Debug, thiserror::Error)]
pub enum PoolDefError {
    #[error(
        "invalid pool name {0:?}: use 1-100 characters from a-z A-Z 0-9 . _ - (it becomes part of a topic name)"
    )]
    Name(String),
    #[error("unknown event kind {0:?}; kinds are {1}")]
    Kind(String, String),
    #[error("not a pool definition: {0}")]
    Json(String),
}

/// Whether `name` can be a pool name (it goes into a topic name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl PoolDef {
    pub fn validate(&self) -> Result<(), PoolDefError> {
        if !valid_name(&self.name) {
            return Err(PoolDefError::Name(self.name.clone()));
        }
        for k in &self.kinds {
            if Kind::parse(k).is_none() {
                let all: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                return Err(PoolDefError::Kind(k.clone(), all.join(", ")));
            }
        }
        Ok(())
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<PoolDef, PoolDefError> {
        let def: PoolDef =
            serde_json::from_slice(bytes).map_err(|e| PoolDefError::Json(e.to_string()))?;
        def.validate()?;
        Ok(def)
    }

    /// Whether the pool applies to events of `kind`.
    pub fn applies_to(&self, kind: Option<Kind>) -> bool {
        self.kinds.is_empty() || kind.is_some_and(|k| self.kinds.iter().any(|n| n == k.as_str()))
    }

    /// Whether the pool has members to load (every pool but `match all`).
    pub fn has_members(&self) -> bool {
        self.match_field != MatchField::All
    }
}

/// The value of a pool record: who added the id, and when (UTC ms). The
/// monitor only looks at presence; the fields are for operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub by: String,
    pub at: i64,
}

impl Membership {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Why an event did or did not match a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Match,
    /// Kind not covered, id absent or not a member.
    NoMatch,
    /// Bucketed pool, but the event is not keyed by the pool's field: its id
    /// lives in another instance's bucket, so it cannot be checked here.
    NotLocal,
}

/// Matches `event` (whose Kafka key is `key`) against a pool with
/// definition `def`, asking `contains` for membership.
pub fn check<E: EventIds + ?Sized>(
    def: &PoolDef,
    event: &E,
    key: Option<&[u8]>,
    contains: impl FnOnce(&str) -> bool,
) -> Verdict {
    if !def.applies_to(event.kind()) {
        return Verdict::NoMatch;
    }
    if def.match_field == MatchField::All {
        return Verdict::Match;
    }
    let Some(id) = def.match_field.select(event) else {
        return Verdict::NoMatch;
    };
    if def.mode == Mode::Bucketed && key != Some(id.as_bytes()) {
        return Verdict::NotLocal;
    }
    if contains(id) {
        Verdict::Match
    } else {
        Verdict::NoMatch
    }
}

/// Membership of one pool partition: the set of keys whose last record is
/// not a tombstone.
///
/// Compact: an id is kept as its 64-bit XXH3 hash in a flat open-addressing
/// table (about 10 bytes per id instead of a string's 40 to 90), so a
/// bucketed pool of millions of ids fits in a small container. Two distinct
/// ids share a hash with probability 2⁻⁶⁴: among 10 M members, an event id
/// outside the pool is taken for a member with probability about 5 × 10⁻¹³.
#[derive(Debug, Default)]
pub struct Members {
    ids: HashSet<u64, BuildIdentity>,
}

/// The hash of an id as [`Members`] keeps it.
pub fn id_hash(id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id.as_bytes())
}

/// The hash of a pool record's key, as [`Members`] keeps it: `None` for a
/// key that is not UTF-8 or is blank (it cannot equal an event id).
pub fn key_hash(key: &[u8]) -> Option<u64> {
    let key = std::str::from_utf8(key).ok()?.trim();
    (!key.is_empty()).then(|| id_hash(key))
}

/// The keys are hashes already: the table uses them as they are.
#[derive(Clone, Copy, Debug, Default)]
struct BuildIdentity;

impl std::hash::BuildHasher for BuildIdentity {
    type Hasher = Identity;
    fn build_hasher(&self) -> Identity {
        Identity(0)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Identity(u64);

impl std::hash::Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; fold anything else in anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

impl Members {
    /// Applies one record of the compacted topic: a value adds (or keeps)
    /// the key, a tombstone (`None`) removes it. Keys that are not UTF-8 or
    /// are empty are ignored (they cannot equal an event id). Returns whether
    /// the set changed.
    pub fn apply(&mut self, key: Option<&[u8]>, value: Option<&[u8]>) -> bool {
        match key.and_then(key_hash) {
            Some(h) => self.apply_hash(h, value.is_some()),
            None => false,
        }
    }

    /// [`Self::apply`] of a key already hashed with [`key_hash`]: `present`
    /// adds it, a tombstone removes it.
    pub fn apply_hash(&mut self, h: u64, present: bool) -> bool {
        if present {
            self.ids.insert(h)
        } else {
            self.ids.remove(&h)
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(&id_hash(id))
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Makes room for `additional` more ids at once. A partition about to be
    /// read from the start reserves its record count: the table is then
    /// allocated once at its final size, where growing by doubling left the
    /// smaller generations freed but still resident while the pool loaded.
    pub fn reserve(&mut self, additional: usize) {
        self.ids.reserve(additional);
    }

    /// Gives back what [`Self::reserve`] took beyond the ids present, when
    /// that is more than the table's own slack (a partition with many
    /// tombstones has more records than ids).
    pub fn shrink(&mut self) {
        if self.ids.capacity() > 2 * self.ids.len().max(1024) {
            self.ids.shrink_to_fit();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn clear(&mut self) {
        self.ids = HashSet::default();
    }
}

/// Kafka's murmur2 hash (the Java client's `Utils.murmur2`), used by the
/// `murmur2_random` partitioner every vidpulse producer is configured with.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match tail.len() {
        3 => {
            h ^= u32::from(tail[2]) << 16;
            h ^= u32::from(tail[1]) << 8;
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= u32::from(tail[1]) << 8;
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition (= bucket) a record keyed `key` lands in among
/// `partitions`, as Kafka's default partitioner (and librdkafka's
/// `murmur2_random` for non-empty keys) computes it.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    if partitions <= 0 {
        return 0;
    }
    ((murmur2(key) & 0x7fff_ffff) as i64 % partitions as i64) as i32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vidpulse_proto::{Event, event};

    fn def(field: MatchField, mode: Mode, kinds: &[&str]) -> PoolDef {
        PoolDef {
            name: "p".into(),
            match_field: field,
            kinds: kinds.iter().map(|s| s.to_string()).collect(),
            mode,
            partitions: 8,
            created_by: "t".into(),
            created_at_ms: 1,
        }
    }

    fn played(video: &str, author: &str, user: &str) -> Event {
        Event {
            event_id: "e".into(),
            video_id: video.into(),
            author_id: author.into(),
            user_id: user.into(),
            payload: Some(event::Payload::VideoPlayed(Default::default())),
            ..Default::default()
        }
    }

    #[test]
    fn membership_follows_the_last_record_per_key() {
        let mut m = Members::default();
        assert!(m.apply(Some(b"a"), Some(b"{}")));
        assert!(
            !m.apply(Some(b"a"), Some(b"{}")),
            "re-adding changes nothing"
        );
        assert!(m.apply(Some(b"b"), Some(b"{}")));
        assert!(m.apply(Some(b"a"), None), "tombstone removes");
        assert!(!m.apply(Some(b"a"), None), "tombstone of an absent key");
        assert!(
            m.apply(Some(b"a"), Some(b"{}")),
            "added again after removal"
        );
        assert!(!m.apply(None, Some(b"{}")), "keyless record ignored");
        assert!(
            !m.apply(Some(b"\xff"), Some(b"{}")),
            "non-UTF-8 key ignored"
        );
        assert!(!m.apply(Some(b"  "), Some(b"{}")), "blank key ignored");
        assert!(m.contains("a") && m.contains("b") && !m.contains("c"));
        assert_eq!(m.len(), 2);
        m.clear();
        assert!(m.is_empty());
    }

    #[test]
    fn a_partition_reserved_for_its_records_gives_back_what_tombstones_left_unused() {
        let mut m = Members::default();
        m.reserve(100_000);
        let reserved = m.ids.capacity();
        assert!(reserved >= 100_000);
        for i in 0..100_000 {
            m.apply(Some(format!("v-{i}").as_bytes()), Some(b"{}"));
        }
        assert_eq!(m.ids.capacity(), reserved, "no growth while loading");
        // Most of the records were tombstones of ids added earlier.
        for i in 0..99_000 {
            m.apply(Some(format!("v-{i}").as_bytes()), None);
        }
        m.shrink();
        assert_eq!(m.len(), 1_000);
        assert!(m.ids.capacity() < 10_000, "{}", m.ids.capacity());
        assert!(m.contains("v-99999") && !m.contains("v-0"));
        // A full table keeps its slack.
        let mut full = Members::default();
        full.reserve(50_000);
        for i in 0..50_000 {
            full.apply(Some(format!("v-{i}").as_bytes()), Some(b"{}"));
        }
        let cap = full.ids.capacity();
        full.shrink();
        assert_eq!(full.ids.capacity(), cap);
    }

    #[test]
    fn a_key_hashed_before_the_lock_is_the_member_its_record_makes() {
        // The loader hashes keys outside the write lock (key_hash, then
        // apply_hash): the same set as applying the records themselves.
        assert_eq!(
            key_hash(b" v-7 "),
            Some(id_hash("v-7")),
            "trimmed as ids are"
        );
        assert_eq!(key_hash(b"\xff"), None, "non-UTF-8 key");
        assert_eq!(key_hash(b"  "), None, "blank key");
        let mut by_record = Members::default();
        let mut by_hash = Members::default();
        for (k, present) in [("v-1", true), ("v-2", true), ("v-1", false), ("v-3", true)] {
            let changed = by_record.apply(Some(k.as_bytes()), present.then_some(b"{}".as_slice()));
            let h = key_hash(k.as_bytes()).expect("a plain id hashes");
            assert_eq!(by_hash.apply_hash(h, present), changed, "{k}");
        }
        for id in ["v-1", "v-2", "v-3"] {
            assert_eq!(by_hash.contains(id), by_record.contains(id), "{id}");
        }
        assert!(!by_hash.contains("v-1") && by_hash.contains("v-3"));
        assert_eq!(by_hash.len(), 2);
    }

    #[test]
    fn replaying_a_compacted_log_gives_the_same_state() {
        // Full log vs. what compaction keeps (the last record per key).
        let log: Vec<(&str, Option<&str>)> = vec![
            ("x", Some("1")),
            ("y", Some("1")),
            ("x", None),
            ("z", Some("1")),
            ("y", None),
            ("y", Some("2")),
        ];
        let mut full = Members::default();
        for (k, v) in &log {
            full.apply(Some(k.as_bytes()), v.map(str::as_bytes));
        }
        let mut compacted = Members::default();
        for (k, v) in [("x", None), ("z", Some("1")), ("y", Some("2"))] {
            compacted.apply(Some(k.as_bytes()), v.map(str::as_bytes));
        }
        for m in [&full, &compacted] {
            assert_eq!(m.len(), 2);
            assert!(m.contains("y") && m.contains("z") && !m.contains("x"));
        }
    }

    #[test]
    fn murmur2_matches_the_java_client() {
        // Vectors from Kafka's UtilsTest.testMurmur2.
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (s, want) in cases {
            assert_eq!(murmur2(s.as_bytes()), want, "{s}");
        }
    }

    #[test]
    fn bucket_is_stable_in_range_and_spreads() {
        let n = 8;
        let mut seen = [0usize; 8];
        for i in 0..8000 {
            let id = format!("v-{i}");
            let p = partition_for(id.as_bytes(), n);
            assert!((0..n).contains(&p));
            assert_eq!(p, partition_for(id.as_bytes(), n), "deterministic");
            seen[p as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 700), "{seen:?}");
        // Same id, same partition count → same bucket in the pool topic and
        // in vp.events.v1: that is the whole of co-partitioning.
        assert_eq!(
            partition_for(b"21", 8),
            ((-973_932_308i32 & 0x7fff_ffff) % 8)
        );
        assert_eq!(partition_for(b"x", 0), 0);
    }

    #[test]
    fn match_field_selects_the_right_id() {
        let e = played("v1", "a1", "u1");
        assert_eq!(MatchField::VideoId.select(&e), Some("v1"));
        assert_eq!(MatchField::AuthorId.select(&e), Some("a1"));
        assert_eq!(MatchField::UserId.select(&e), Some("u1"));
        assert_eq!(
            MatchField::RoomId.select(&e),
            None,
            "empty id never matches"
        );
        assert_eq!(MatchField::All.select(&e), None);
        let like = Event {
            payload: Some(event::Payload::UserAction(vidpulse_proto::UserAction {
                action: "like".into(),
                target_id: "v9".into(),
            })),
            ..Default::default()
        };
        assert_eq!(
            MatchField::VideoId.select(&like),
            Some("v9"),
            "target of an action"
        );
        for f in MatchField::NAMES {
            assert_eq!(MatchField::parse(f).unwrap().as_str(), f);
        }
        assert_eq!(MatchField::parse("author"), Some(MatchField::AuthorId));
        assert_eq!(MatchField::parse("nope"), None);
    }

    #[test]
    fn keyed_kinds_agree_with_subject_key() {
        for f in [
            MatchField::AuthorId,
            MatchField::VideoId,
            MatchField::RoomId,
        ] {
            for k in f.keyed_kinds() {
                let mut e = Event {
                    event_id: "e".into(),
                    user_id: "u".into(),
                    video_id: "v".into(),
                    author_id: "a".into(),
                    room_id: "r".into(),
                    ..Default::default()
                };
                e.payload = Some(payload_of(*k));
                assert_eq!(Some(e.subject_key()), f.select(&e), "{f} {k}");
            }
        }
    }

    fn payload_of(k: Kind) -> event::Payload {
        use event::Payload as P;
        match k {
            Kind::VideoUploaded => P::VideoUploaded(Default::default()),
            Kind::VideoMetadata => P::VideoMetadata(Default::default()),
            Kind::PlayRequested => P::PlayRequested(Default::default()),
            Kind::VideoPlayed => P::VideoPlayed(Default::default()),
            Kind::UserAction => P::UserAction(Default::default()),
            Kind::ViewerArrived => P::ViewerArrived(Default::default()),
            Kind::ViewerLeft => P::ViewerLeft(Default::default()),
            Kind::GiftSent => P::GiftSent(Default::default()),
            Kind::LiveRoomStarted => P::LiveRoomStarted(Default::default()),
            Kind::LiveRoomEnded => P::LiveRoomEnded(Default::default()),
            Kind::VideoPublished => P::VideoPublished(Default::default()),
        }
    }

    #[test]
    fn check_applies_kinds_membership_and_locality() {
        let e = played("v1", "a1", "u1");
        let yes = |_: &str| true;
        let no = |_: &str| false;
        let d = def(MatchField::VideoId, Mode::Broadcast, &[]);
        assert_eq!(check(&d, &e, None, yes), Verdict::Match);
        assert_eq!(check(&d, &e, None, no), Verdict::NoMatch);
        let d = def(MatchField::VideoId, Mode::Broadcast, &["video_published"]);
        assert_eq!(check(&d, &e, None, yes), Verdict::NoMatch, "kind filtered");
        let d = def(MatchField::All, Mode::Broadcast, &[]);
        assert_eq!(
            check(&d, &e, None, no),
            Verdict::Match,
            "all passes everything"
        );
        // Bucketed: only events keyed by the pool's field can be checked.
        let d = def(MatchField::VideoId, Mode::Bucketed, &[]);
        assert_eq!(check(&d, &e, Some(b"v1"), yes), Verdict::Match);
        let d = def(MatchField::AuthorId, Mode::Bucketed, &[]);
        assert_eq!(check(&d, &e, Some(b"v1"), yes), Verdict::NotLocal);
        // Broadcast pools check any field wherever the event is keyed.
        let d = def(MatchField::AuthorId, Mode::Broadcast, &[]);
        assert_eq!(check(&d, &e, Some(b"v1"), yes), Verdict::Match);
    }

    #[test]
    fn definitions_round_trip_and_validate() {
        let d = def(MatchField::AuthorId, Mode::Bucketed, &["video_published"]);
        let back = PoolDef::from_json(&d.to_json()).unwrap();
        assert_eq!(back, d);
        let text = String::from_utf8(d.to_json()).unwrap();
        assert!(text.contains(r#""match":"author_id""#), "{text}");
        assert!(text.contains(r#""mode":"bucketed""#), "{text}");
        let mut bad = d.clone();
        bad.kinds = vec!["video_deleted".into()];
        assert!(matches!(bad.validate(), Err(PoolDefError::Kind(..))));
        bad.name = "a/b".into();
        assert!(matches!(bad.validate(), Err(PoolDefError::Name(_))));
        assert!(PoolDef::from_json(b"{").is_err());
        // Minimal definitions written by hand are accepted.
        let min = PoolDef::from_json(br#"{"name":"x","match":"video_id"}"#).unwrap();
        assert_eq!(min.mode, Mode::Broadcast);
        assert!(min.kinds.is_empty());
        assert!(valid_name("vertical.food-1_a"));
        assert!(!valid_name(""));
    }
}
