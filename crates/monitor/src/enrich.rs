//! Enrichment from the Redis dimensions written by dim-builder and the T+1
//! loader: the live room (`room:{id}`), the anchor (`anchor:{id}`), the
//! viewer (`viewer:{id}`) and the room's module.
//!
//! Lookups are made per batch of events: the keys the batch needs are
//! de-duplicated, those not in the local cache are fetched with one
//! pipelined round trip of `HGETALL`s (a second one only for anchors and
//! module-map entries learnt from room hashes). The cache is bounded (entries)
//! with a TTL; absent hashes are cached for a shorter time. A Redis error is
//! returned to the caller, which retries the same batch with backoff and
//! reads nothing meanwhile (back-pressure, no loss).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{Counter, counter, gauge, histogram};
use moka::sync::Cache;
use vidpulse_core::redis::{ConnectOptions, RedisClient, RedisConn};
use vidpulse_proto::EventIds;

use crate::metrics as mm;

/// One Redis hash, as read.
pub type Hash = HashMap<String, String>;

/// Where the dimensions live. Patterns contain `{id}`.
#[derive(Clone, Debug)]
pub struct KeyPatterns {
    pub room: String,
    pub anchor: String,
    pub viewer: String,
    /// A separate room→module map: a hash per room whose `module_field`
    /// field holds the module id, read when neither the event nor the room
    /// hash says. Empty (the default) = none: `vidpulse dims load --kind
    /// room-module` writes the module into the room hash (docs/dims.md).
    pub module_map: String,
    pub module_field: String,
}

impl Default for KeyPatterns {
    fn default() -> Self {
        Self {
            room: "room:{id}".into(),
            anchor: "anchor:{id}".into(),
            viewer: "viewer:{id}".into(),
            module_map: String::new(),
            module_field: "module_id".into(),
        }
    }
}

/// A key pattern split at its `{id}`s, so that a key is built with one
/// allocation and no search.
#[derive(Clone, Debug)]
struct Pattern(Vec<String>);

impl Pattern {
    fn new(pattern: &str) -> Self {
        Self(pattern.split("{id}").map(str::to_owned).collect())
    }

    fn key(&self, id: &str) -> String {
        let fixed: usize = self.0.iter().map(String::len).sum();
        let mut k = String::with_capacity(fixed + id.len() * (self.0.len() - 1));
        for (i, part) in self.0.iter().enumerate() {
            if i > 0 {
                k.push_str(id);
            }
            k.push_str(part);
        }
        k
    }
}

/// What to do with an event when a dimension it refers to is not in Redis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MissPolicy {
    /// Produce it without those fields (counted in
    /// `vidpulse_monitor_enrich_misses_total`).
    #[default]
    Pass,
    /// Do not produce it (counted as dropped, reason `enrich_miss`).
    Drop,
}

/// The ids an event refers to, and where anchor / module still have to come
/// from.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan<'a> {
    pub room: Option<&'a str>,
    pub viewer: Option<&'a str>,
    /// The anchor when the event itself says (live room payload); else it
    /// comes from the room hash's `anchor_id`, else the author.
    pub anchor: Option<&'a str>,
    pub author: Option<&'a str>,
    /// The module when the event itself says; else the room hash's
    /// `module_id`, else the room→module map.
    pub module: Option<&'a str>,
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// Which dimensions `event` needs.
pub fn plan<E: EventIds + ?Sized>(event: &E) -> Plan<'_> {
    let room = event.room_anchor_module();
    Plan {
        room: non_empty(event.room_id()),
        viewer: non_empty(event.user_id()),
        anchor: room.and_then(|(anchor, _)| non_empty(anchor)),
        author: non_empty(event.author_id()),
        module: room.and_then(|(_, module)| non_empty(module)),
    }
}

/// The enrichment of one event, and the dimensions that were missing.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Enrichment {
    /// The `MonitoredEvent.enrichment` entries, encoded (field 3 of the
    /// message): appended to the rest of the message as they are.
    pub encoded: Vec<u8>,
    pub missing: Vec<&'static str>,
}

/// What a dimension's hash adds to the events that refer to it, by the
/// name its fields take there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum As {
    Room = 0,
    Anchor = 1,
    Viewer = 2,
}

impl As {
    const PREFIX: [&'static str; 3] = ["room.", "anchor.", "viewer."];
}

/// One dimension hash as read, with its visible fields encoded once per
/// name prefix it is used under (not once per event).
#[derive(Debug, Default)]
pub struct Dim {
    hash: Hash,
    encoded: [std::sync::OnceLock<Box<[u8]>>; 3],
}

impl Dim {
    fn new(hash: Hash) -> Self {
        Self {
            hash,
            encoded: Default::default(),
        }
    }

    fn is_empty(&self) -> bool {
        self.hash.is_empty()
    }

    fn get(&self, field: &str) -> Option<&str> {
        self.hash.get(field).map(String::as_str).and_then(non_empty)
    }

    /// The visible fields as enrichment entries named `<prefix><field>`,
    /// sorted by field.
    fn encoded(&self, as_: As) -> &[u8] {
        self.encoded[as_ as usize].get_or_init(|| {
            let mut fields: Vec<(&String, &String)> = visible(&self.hash).collect();
            fields.sort_unstable();
            let mut buf = Vec::new();
            for (k, v) in fields {
                vidpulse_proto::encode_enrichment_entry(As::PREFIX[as_ as usize], k, v, &mut buf);
            }
            buf.into_boxed_slice()
        })
    }
}

/// Lookup settings.
#[derive(Clone, Debug)]
pub struct EnrichSettings {
    /// The server or cluster (`--redis-url`, `--redis-cluster`).
    pub redis: RedisClient,
    pub keys: KeyPatterns,
    pub cache_capacity: u64,
    pub cache_ttl: Duration,
    pub negative_ttl: Duration,
    pub redis_timeout: Duration,
}

/// A Redis failure; the caller retries the batch.
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct EnrichError(pub String);

/// Looks dimensions up, batched and cached.
pub struct Enricher {
    settings: EnrichSettings,
    room: Pattern,
    anchor: Pattern,
    viewer: Pattern,
    module_map: Option<Pattern>,
    conn: Option<RedisConn>,
    cache: Cache<String, Arc<Dim>>,
    hits: u64,
    misses: u64,
    /// `vidpulse_monitor_enrich_misses_total` by dimension, in [`DIMS`]'
    /// order.
    missing: [Counter; 4],
}

/// The dimensions an event can miss, as the miss counter labels them.
const DIMS: [&str; 4] = ["room", "anchor", "viewer", "module"];

/// A batch's distinct keys, each with its slot in the round trip.
#[derive(Default)]
struct Slots(hashbrown::HashMap<String, u32>);

impl Slots {
    fn slot(&mut self, pattern: &Pattern, id: &str) -> u32 {
        let n = self.0.len() as u32;
        *self.0.entry(pattern.key(id)).or_insert(n)
    }

    /// The keys in slot order.
    fn into_keys(self) -> Vec<String> {
        let mut keys = vec![String::new(); self.0.len()];
        for (k, i) in self.0 {
            keys[i as usize] = k;
        }
        keys
    }
}

/// Where one event's dimensions are in the batch's round trips.
struct Needs<'a> {
    room: Option<u32>,
    viewer: Option<u32>,
    /// In the first round trip when the event has no room, else the second.
    anchor: Option<(u32, bool)>,
    module: Option<&'a str>,
    module_map: Option<u32>,
}

impl Enricher {
    pub fn new(settings: EnrichSettings) -> Result<Self, EnrichError> {
        let cache = Cache::builder()
            .max_capacity(settings.cache_capacity)
            .expire_after(Ttl {
                hit: settings.cache_ttl,
                miss: settings.negative_ttl,
            })
            .build();
        let keys = &settings.keys;
        Ok(Self {
            room: Pattern::new(&keys.room),
            anchor: Pattern::new(&keys.anchor),
            viewer: Pattern::new(&keys.viewer),
            module_map: (!keys.module_map.is_empty()).then(|| Pattern::new(&keys.module_map)),
            settings,
            conn: None,
            cache,
            hits: 0,
            misses: 0,
            missing: DIMS.map(|dim| counter!(mm::ENRICH_MISSES, "dim" => dim)),
        })
    }

    async fn conn(&mut self) -> Result<RedisConn, EnrichError> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let c = self
            .settings
            .redis
            .connect_managed(ConnectOptions::timeouts(self.settings.redis_timeout))
            .await
            .map_err(|e| {
                counter!(mm::REDIS_ERRORS).increment(1);
                EnrichError(e.to_string())
            })?;
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// The hashes of `keys` (distinct), in order: from the cache, the rest
    /// in one pipelined round trip.
    async fn fetch(&mut self, keys: &[String]) -> Result<Vec<Arc<Dim>>, EnrichError> {
        let mut out: Vec<Option<Arc<Dim>>> = Vec::with_capacity(keys.len());
        let mut todo: Vec<usize> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let got = self.cache.get(k);
            if got.is_none() {
                todo.push(i);
            }
            out.push(got);
        }
        self.hits += (keys.len() - todo.len()) as u64;
        self.misses += todo.len() as u64;
        counter!(mm::CACHE_HITS).absolute(self.hits);
        counter!(mm::CACHE_MISSES).absolute(self.misses);
        let total = self.hits + self.misses;
        if total > 0 {
            gauge!(mm::CACHE_HIT_RATIO).set(self.hits as f64 / total as f64);
        }
        if !todo.is_empty() {
            let mut conn = self.conn().await?;
            let mut pipe = redis::pipe();
            for &i in &todo {
                pipe.cmd("HGETALL").arg(&keys[i]);
            }
            let started = Instant::now();
            let res: Result<Vec<Hash>, _> = pipe.query_async(&mut conn).await;
            histogram!(mm::REDIS_SECONDS).record(started.elapsed().as_secs_f64());
            let hashes = res.map_err(|e| {
                counter!(mm::REDIS_ERRORS).increment(1);
                EnrichError(e.to_string())
            })?;
            for (i, h) in todo.into_iter().zip(hashes) {
                let d = Arc::new(Dim::new(h));
                self.cache.insert(keys[i].clone(), d.clone());
                out[i] = Some(d);
            }
        }
        // Every slot is filled: from the cache or the round trip.
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Enriches `events` (in order). At most two pipelined round trips.
    pub async fn enrich<E: EventIds>(
        &mut self,
        events: &[&E],
    ) -> Result<Vec<Enrichment>, EnrichError> {
        let plans: Vec<Plan<'_>> = events.iter().map(|e| plan(*e)).collect();
        // First step: rooms, viewers, and anchors known without a room.
        let mut first = Slots::default();
        let early: Vec<(Option<u32>, Option<u32>, Option<u32>)> = plans
            .iter()
            .map(|p| {
                let room = p.room.map(|r| first.slot(&self.room, r));
                let viewer = p.viewer.map(|v| first.slot(&self.viewer, v));
                let anchor = match p.room {
                    None => p.anchor.or(p.author).map(|a| first.slot(&self.anchor, a)),
                    Some(_) => None,
                };
                (room, viewer, anchor)
            })
            .collect();
        let got = self.fetch(&first.into_keys()).await?;

        // Second step: anchors and modules learnt from room hashes.
        let mut second = Slots::default();
        let needs: Vec<Needs<'_>> = plans
            .iter()
            .zip(&early)
            .map(|(p, &(room, viewer, anchor))| {
                let hash = room.map(|i| &*got[i as usize]);
                let anchor = match (anchor, p.room) {
                    (Some(i), _) => Some((i, true)),
                    (None, Some(_)) => p
                        .anchor
                        .or_else(|| hash.and_then(|h| h.get("anchor_id")))
                        .or(p.author)
                        .map(|a| (second.slot(&self.anchor, a), false)),
                    (None, None) => None,
                };
                let module = p.module.or_else(|| hash.and_then(|h| h.get("module_id")));
                let module_map = match (&self.module_map, module, p.room) {
                    (Some(pattern), None, Some(r)) => Some(second.slot(pattern, r)),
                    _ => None,
                };
                Needs {
                    room,
                    viewer,
                    anchor,
                    module,
                    module_map,
                }
            })
            .collect();
        let second = second.into_keys();
        let late = if second.is_empty() {
            Vec::new()
        } else {
            self.fetch(&second).await?
        };

        let module_field = self.settings.keys.module_field.as_str();
        let mut missed = [0u64; 4];
        let mut out = Vec::with_capacity(needs.len());
        for n in &needs {
            let room = n.room.map(|i| &*got[i as usize]);
            let viewer = n.viewer.map(|i| &*got[i as usize]);
            let anchor = n.anchor.map(|(i, early)| {
                if early {
                    &*got[i as usize]
                } else {
                    &*late[i as usize]
                }
            });
            let module = n
                .module
                .or_else(|| late.get(n.module_map? as usize)?.get(module_field));
            // Entries in name order: anchor., module_id, room., viewer.
            let mut e = Enrichment::default();
            if let Some(a) = anchor {
                e.encoded.extend_from_slice(a.encoded(As::Anchor));
            }
            if let Some(m) = module {
                vidpulse_proto::encode_enrichment_entry("", "module_id", m, &mut e.encoded);
            }
            if let Some(r) = room {
                e.encoded.extend_from_slice(r.encoded(As::Room));
            }
            if let Some(v) = viewer {
                e.encoded.extend_from_slice(v.encoded(As::Viewer));
            }
            let misses = [
                room.is_some_and(Dim::is_empty),
                anchor.is_some_and(Dim::is_empty),
                viewer.is_some_and(Dim::is_empty),
                module.is_none() && n.room.is_some(),
            ];
            for (d, m) in misses.into_iter().enumerate() {
                if m {
                    missed[d] += 1;
                    e.missing.push(DIMS[d]);
                }
            }
            out.push(e);
        }
        for (c, n) in self.missing.iter().zip(missed) {
            if n > 0 {
                c.increment(n);
            }
        }
        Ok(out)
    }
}

/// The fields of a dimension hash meant for readers: those starting with
/// `_` are the writers' bookkeeping (versions, event ids; docs/dims.md).
fn visible(h: &Hash) -> impl Iterator<Item = (&String, &String)> {
    h.iter().filter(|(k, _)| !k.starts_with('_'))
}

/// Cache expiry: present hashes live `hit`, absent ones `miss` (a room that
/// just started may appear in a moment).
struct Ttl {
    hit: Duration,
    miss: Duration,
}

impl moka::Expiry<String, Arc<Dim>> for Ttl {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<Dim>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(if value.is_empty() {
            self.miss
        } else {
            self.hit
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vidpulse_proto::{Event, LiveRoomStarted, Room, event};

    #[test]
    fn plan_takes_ids_from_the_envelope_and_the_room_payload() {
        let e = Event {
            user_id: "u1".into(),
            room_id: "r1".into(),
            payload: Some(event::Payload::GiftSent(Default::default())),
            ..Default::default()
        };
        assert_eq!(
            plan(&e),
            Plan {
                room: Some("r1"),
                viewer: Some("u1"),
                ..Default::default()
            }
        );
        let s = Event {
            room_id: "r2".into(),
            payload: Some(event::Payload::LiveRoomStarted(LiveRoomStarted {
                room: Some(Room {
                    anchor_id: "a7".into(),
                    module_id: "m1".into(),
                    ..Default::default()
                }),
            })),
            ..Default::default()
        };
        let p = plan(&s);
        assert_eq!(p.anchor, Some("a7"));
        assert_eq!(p.module, Some("m1"));
        assert_eq!(p.viewer, None, "empty ids are not looked up");
    }

    #[test]
    fn bookkeeping_fields_are_not_enrichment() {
        let h: Hash = [("type", "game"), ("_v", "1"), ("_v.module_id", "2")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let shown: Vec<_> = visible(&h).map(|(k, _)| k.as_str()).collect();
        assert_eq!(shown, vec!["type"]);
    }

    #[test]
    fn key_patterns_substitute_the_id() {
        let k = KeyPatterns::default();
        assert_eq!(Pattern::new(&k.room).key("20210813"), "room:20210813");
        assert_eq!(
            Pattern::new("t1.viewer:{id}:v2").key("u5"),
            "t1.viewer:u5:v2"
        );
    }
}
