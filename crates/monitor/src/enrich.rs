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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use moka::sync::Cache;
use vidpulse_core::redis::{ConnectOptions, RedisClient, RedisConn};
use vidpulse_proto::{Event, event};

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

fn key(pattern: &str, id: &str) -> String {
    pattern.replace("{id}", id)
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
pub struct Plan {
    pub room: Option<String>,
    pub viewer: Option<String>,
    /// The anchor when the event itself says (live room payload); else it
    /// comes from the room hash's `anchor_id`, else the author.
    pub anchor: Option<String>,
    pub author: Option<String>,
    /// The module when the event itself says; else the room hash's
    /// `module_id`, else the room→module map.
    pub module: Option<String>,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// Which dimensions `event` needs.
pub fn plan(event: &Event) -> Plan {
    let room_payload = match &event.payload {
        Some(event::Payload::LiveRoomStarted(r)) => r.room.as_ref(),
        Some(event::Payload::LiveRoomEnded(r)) => r.room.as_ref(),
        _ => None,
    };
    Plan {
        room: non_empty(&event.room_id),
        viewer: non_empty(&event.user_id),
        anchor: room_payload.and_then(|r| non_empty(&r.anchor_id)),
        author: non_empty(&event.author_id),
        module: room_payload.and_then(|r| non_empty(&r.module_id)),
    }
}

/// The enrichment of one event, and the dimensions that were missing.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Enrichment {
    pub fields: BTreeMap<String, String>,
    pub missing: Vec<&'static str>,
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
    conn: Option<RedisConn>,
    cache: Cache<String, Arc<Hash>>,
    hits: u64,
    misses: u64,
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
        Ok(Self {
            settings,
            conn: None,
            cache,
            hits: 0,
            misses: 0,
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

    /// Hashes for `keys` (duplicates allowed): from the cache, the rest in
    /// one pipelined round trip.
    async fn fetch(
        &mut self,
        keys: Vec<String>,
    ) -> Result<HashMap<String, Arc<Hash>>, EnrichError> {
        let mut out: HashMap<String, Arc<Hash>> = HashMap::with_capacity(keys.len());
        let mut todo: Vec<String> = Vec::new();
        let mut asked: HashSet<&str> = HashSet::with_capacity(keys.len());
        for k in &keys {
            if !asked.insert(k.as_str()) {
                continue;
            }
            let k = k.clone();
            match self.cache.get(&k) {
                Some(h) => {
                    self.hits += 1;
                    out.insert(k, h);
                }
                None => {
                    self.misses += 1;
                    todo.push(k);
                }
            }
        }
        counter!(mm::CACHE_HITS).absolute(self.hits);
        counter!(mm::CACHE_MISSES).absolute(self.misses);
        let total = self.hits + self.misses;
        if total > 0 {
            gauge!(mm::CACHE_HIT_RATIO).set(self.hits as f64 / total as f64);
        }
        if todo.is_empty() {
            return Ok(out);
        }
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        for k in &todo {
            pipe.cmd("HGETALL").arg(k);
        }
        let started = Instant::now();
        let res: Result<Vec<Hash>, _> = pipe.query_async(&mut conn).await;
        histogram!(mm::REDIS_SECONDS).record(started.elapsed().as_secs_f64());
        let hashes = res.map_err(|e| {
            counter!(mm::REDIS_ERRORS).increment(1);
            EnrichError(e.to_string())
        })?;
        for (k, h) in todo.into_iter().zip(hashes) {
            let h = Arc::new(h);
            self.cache.insert(k.clone(), h.clone());
            out.insert(k, h);
        }
        Ok(out)
    }

    /// Enriches `events` (in order). At most two pipelined round trips.
    pub async fn enrich(&mut self, events: &[&Event]) -> Result<Vec<Enrichment>, EnrichError> {
        let keys = self.settings.keys.clone();
        let plans: Vec<Plan> = events.iter().map(|e| plan(e)).collect();
        let mut first: Vec<String> = Vec::new();
        for p in &plans {
            if let Some(r) = &p.room {
                first.push(key(&keys.room, r));
            }
            if let Some(v) = &p.viewer {
                first.push(key(&keys.viewer, v));
            }
            // Without a room, the anchor is known now.
            if p.room.is_none()
                && let Some(a) = p.anchor.as_ref().or(p.author.as_ref())
            {
                first.push(key(&keys.anchor, a));
            }
        }
        let got = self.fetch(first).await?;
        let empty = Arc::new(Hash::new());
        let rooms: Vec<Option<Arc<Hash>>> = plans
            .iter()
            .map(|p| {
                p.room.as_ref().map(|r| {
                    got.get(&key(&keys.room, r))
                        .cloned()
                        .unwrap_or_else(|| empty.clone())
                })
            })
            .collect();
        // Second step: anchors and modules learnt from room hashes.
        let mut anchors: Vec<Option<String>> = Vec::with_capacity(plans.len());
        let mut modules: Vec<Option<String>> = Vec::with_capacity(plans.len());
        let mut second: Vec<String> = Vec::new();
        for (p, room) in plans.iter().zip(&rooms) {
            let from_room = |f: &str| {
                room.as_ref()
                    .and_then(|h| h.get(f))
                    .and_then(|s| non_empty(s))
            };
            let anchor = p
                .anchor
                .clone()
                .or_else(|| from_room("anchor_id"))
                .or_else(|| p.author.clone());
            if p.room.is_some()
                && let Some(a) = &anchor
            {
                second.push(key(&keys.anchor, a));
            }
            let module = p.module.clone().or_else(|| from_room("module_id"));
            if module.is_none()
                && !keys.module_map.is_empty()
                && let Some(r) = &p.room
            {
                second.push(key(&keys.module_map, r));
            }
            anchors.push(anchor);
            modules.push(module);
        }
        let mut got = got;
        if !second.is_empty() {
            got.extend(self.fetch(second).await?);
        }
        let mut out = Vec::with_capacity(plans.len());
        for (i, p) in plans.iter().enumerate() {
            let mut e = Enrichment::default();
            if let Some(room) = &rooms[i] {
                if room.is_empty() {
                    e.missing.push("room");
                }
                for (k, v) in visible(room) {
                    e.fields.insert(format!("room.{k}"), v.clone());
                }
            }
            if let Some(a) = &anchors[i] {
                match got.get(&key(&keys.anchor, a)) {
                    Some(h) if !h.is_empty() => {
                        for (k, v) in visible(h) {
                            e.fields.insert(format!("anchor.{k}"), v.clone());
                        }
                    }
                    _ => e.missing.push("anchor"),
                }
            }
            if let Some(v) = &p.viewer {
                match got.get(&key(&keys.viewer, v)) {
                    Some(h) if !h.is_empty() => {
                        for (k, val) in visible(h) {
                            e.fields.insert(format!("viewer.{k}"), val.clone());
                        }
                    }
                    _ => e.missing.push("viewer"),
                }
            }
            let module = modules[i].clone().or_else(|| {
                let r = p.room.as_ref()?;
                got.get(&key(&keys.module_map, r))?
                    .get(&keys.module_field)
                    .and_then(|s| non_empty(s))
            });
            match module {
                Some(m) => {
                    e.fields.insert("module_id".into(), m);
                }
                None if p.room.is_some() => e.missing.push("module"),
                None => {}
            }
            for dim in &e.missing {
                counter!(mm::ENRICH_MISSES, "dim" => *dim).increment(1);
            }
            out.push(e);
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

impl moka::Expiry<String, Arc<Hash>> for Ttl {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<Hash>,
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
    use vidpulse_proto::{LiveRoomStarted, Room};

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
                room: Some("r1".into()),
                viewer: Some("u1".into()),
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
        assert_eq!(p.anchor.as_deref(), Some("a7"));
        assert_eq!(p.module.as_deref(), Some("m1"));
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
        assert_eq!(key(&k.room, "20210813"), "room:20210813");
        assert_eq!(key("t1.viewer:{id}:v2", "u5"), "t1.viewer:u5:v2");
    }
}
