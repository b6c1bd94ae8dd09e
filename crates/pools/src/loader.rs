//! Loading and following pools, and the gate that keeps an events partition
//! closed until the pool data it needs is loaded.
//!
//! - A *registry* thread reads the compacted topic `vp.pools.v1` from the
//!   beginning and keeps following it (a GlobalKTable of pool definitions).
//!   Each pool gets a worker thread with its own group-less consumer.
//! - A *broadcast* worker reads every partition of its pool topic from the
//!   beginning and keeps following it.
//! - A *bucketed* worker reads only the partitions whose numbers are the
//!   `vp.events.v1` partitions currently assigned to this instance: it starts
//!   reading a partition from the beginning when it is assigned and drops it
//!   (and its ids) when it is revoked.
//!
//! Guarantee (no false negatives): a partition counts as loaded once the
//! worker has read it up to the high watermark observed when it started
//! reading it (or hit its end). An events partition is *ready* only when the
//! registry was read to its end and every pool is loaded for it; the stage
//! does not process a record of a partition that is not ready. Records read
//! later (edits) are applied as they arrive, within a poll interval (100 ms).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metrics::gauge;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use vidpulse_core::config::KafkaArgs;
use vidpulse_core::kafka;

use crate::metrics as mm;
use crate::pool::{Members, Mode, PoolDef, key_hash};

/// Compacted topic holding pool definitions: key = pool name, value = JSON
/// [`PoolDef`], tombstone = pool deleted.
pub const REGISTRY_TOPIC: &str = "vp.pools.v1";

/// How long a poll waits; also the delay with which a pool edit applies.
const POLL: Duration = Duration::from_millis(100);
/// Most records applied under one write lock.
const BURST: usize = 20_000;
const META_TIMEOUT: Duration = Duration::from_secs(10);

/// One pool as the stage sees it: its definition and, per partition of its
/// topic, the ids loaded.
#[derive(Debug)]
pub struct PoolHandle {
    pub def: PoolDef,
    pub members: RwLock<Vec<Members>>,
    stop: AtomicBool,
}

impl PoolHandle {
    fn new(def: PoolDef, partitions: usize) -> Self {
        let mut v = Vec::with_capacity(partitions);
        v.resize_with(partitions, Members::default);
        Self {
            def,
            members: RwLock::new(v),
            stop: AtomicBool::new(false),
        }
    }
}

/// The pools currently applied.
#[derive(Debug, Default)]
pub struct Pools {
    map: RwLock<BTreeMap<String, Arc<PoolHandle>>>,
}

impl Pools {
    /// The current pools, sorted by name.
    pub fn snapshot(&self) -> Vec<Arc<PoolHandle>> {
        self.map
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    fn insert(&self, h: Arc<PoolHandle>) -> Option<Arc<PoolHandle>> {
        self.map
            .write()
            .ok()
            .and_then(|mut m| m.insert(h.def.name.clone(), h))
    }

    fn remove(&self, name: &str) -> Option<Arc<PoolHandle>> {
        self.map.write().ok().and_then(|mut m| m.remove(name))
    }
}

#[derive(Debug, Default)]
struct PoolStatus {
    def: Option<PoolDef>,
    /// Bucketed: events partitions loaded for the current assignment.
    loaded: BTreeSet<i32>,
    /// Broadcast: every partition loaded.
    all_loaded: bool,
}

#[derive(Debug, Default)]
struct GateState {
    assigned: BTreeSet<i32>,
    /// Bumped on every assignment change, so a worker never reports a
    /// partition loaded for an assignment it has not seen.
    assign_gen: u64,
    registry_loaded: bool,
    pools: BTreeMap<String, PoolStatus>,
    ready: HashSet<i32>,
    fatal: Option<String>,
}

impl GateState {
    fn recompute(&mut self) {
        self.ready.clear();
        if !self.registry_loaded {
            return;
        }
        for &p in &self.assigned {
            let ok = self.pools.values().all(|s| match &s.def {
                None => false,
                Some(d) if !d.has_members() => true,
                Some(d) if d.mode == Mode::Broadcast => s.all_loaded,
                Some(_) => s.loaded.contains(&p),
            });
            if ok {
                self.ready.insert(p);
            }
        }
    }
}

/// Which events partitions may be processed now; shared by the stage's
/// rebalance callbacks, its loop and the pool workers.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<GateState>,
}

impl Gate {
    fn with<T>(&self, f: impl FnOnce(&mut GateState) -> T) -> Option<T> {
        self.state.lock().ok().map(|mut s| f(&mut s))
    }

    /// Events partitions newly assigned: not ready until their buckets load.
    pub fn assign(&self, partitions: &[i32]) {
        self.with(|s| {
            s.assign_gen += 1;
            for p in partitions {
                s.assigned.insert(*p);
                for st in s.pools.values_mut() {
                    st.loaded.remove(p);
                }
            }
            s.recompute();
        });
    }

    /// Events partitions revoked: their buckets are dropped.
    pub fn revoke(&self, partitions: &[i32]) {
        self.with(|s| {
            s.assign_gen += 1;
            for p in partitions {
                s.assigned.remove(p);
                for st in s.pools.values_mut() {
                    st.loaded.remove(p);
                }
            }
            s.recompute();
        });
    }

    pub fn is_ready(&self, partition: i32) -> bool {
        self.with(|s| s.ready.contains(&partition)).unwrap_or(false)
    }

    /// Assigned partitions that are not ready, and whether the registry is
    /// loaded.
    pub fn waiting(&self) -> (Vec<i32>, bool) {
        self.with(|s| {
            (
                s.assigned
                    .iter()
                    .filter(|p| !s.ready.contains(p))
                    .copied()
                    .collect(),
                s.registry_loaded,
            )
        })
        .unwrap_or_default()
    }

    pub fn registry_loaded(&self) -> bool {
        self.with(|s| s.registry_loaded).unwrap_or(false)
    }

    /// A condition the stage cannot run with (e.g. a bucketed pool whose
    /// partition count differs from the events topic's).
    pub fn fatal(&self) -> Option<String> {
        self.with(|s| s.fatal.clone()).flatten()
    }

    fn set_fatal(&self, msg: String) {
        self.with(|s| {
            s.fatal.get_or_insert(msg);
        });
    }

    fn assignment(&self) -> (BTreeSet<i32>, u64) {
        self.with(|s| (s.assigned.clone(), s.assign_gen))
            .unwrap_or_default()
    }

    fn register(&self, def: &PoolDef) {
        self.with(|s| {
            s.pools.insert(
                def.name.clone(),
                PoolStatus {
                    def: Some(def.clone()),
                    ..Default::default()
                },
            );
            s.recompute();
        });
    }

    fn unregister(&self, name: &str) {
        self.with(|s| {
            s.pools.remove(name);
            s.recompute();
        });
    }

    fn set_registry_loaded(&self) {
        self.with(|s| {
            s.registry_loaded = true;
            s.recompute();
        });
    }

    /// A worker reports what it has loaded. Bucketed reports made for an
    /// older assignment are ignored (the worker reports again).
    fn publish(
        &self,
        name: &str,
        loaded: &BTreeSet<i32>,
        all_loaded: bool,
        generation_: Option<u64>,
    ) {
        self.with(|s| {
            if generation_.is_some_and(|g| g != s.assign_gen) {
                return;
            }
            let assigned = s.assigned.clone();
            if let Some(st) = s.pools.get_mut(name) {
                st.all_loaded = all_loaded;
                st.loaded = loaded.intersection(&assigned).copied().collect();
            }
            s.recompute();
        });
    }
}

/// Everything the loader threads need.
#[derive(Clone)]
pub struct LoaderCtx {
    pub kafka: KafkaArgs,
    /// Partitions of `vp.events.v1`; bucketed pools must have as many.
    pub event_partitions: i32,
    pub events_topic: String,
    /// Only these pools (empty = every pool in the registry).
    pub only: Vec<String>,
    pub gate: Arc<Gate>,
    pub pools: Arc<Pools>,
    pub stop: Arc<AtomicBool>,
}

/// Context of the pool readers: end-of-partition is how loading ends, not
/// an error worth logging.
pub struct ReaderCtx;

impl rdkafka::ClientContext for ReaderCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(error, KafkaError::PartitionEOF(_))
            || matches!(
                error,
                KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
            );
        if !eof {
            tracing::warn!(%error, reason, "Pool reader error; it retries.");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderCtx {}

fn reader(kafka_args: &KafkaArgs) -> Result<BaseConsumer<ReaderCtx>, KafkaError> {
    let mut cfg =
        kafka::reader_config(kafka_args).map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
    // A pool record is a few bytes, and librdkafka's prefetch limits count
    // payload bytes while each queued record also costs it a few hundred
    // bytes of bookkeeping: with its defaults (100 000 records kept per
    // partition) a monitor loading 4 partitions held ~70 MB of queue, more
    // than the 2.5 M ids themselves. 20 000 per partition still keeps the
    // loader fed (the partitions load as fast as before).
    cfg.set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("queued.max.messages.kbytes", "4096")
        .set("queued.min.messages", "20000")
        .set("fetch.max.bytes", "2097152")
        .set("max.partition.fetch.bytes", "524288")
        .set("fetch.wait.max.ms", "50");
    cfg.create_with_context(ReaderCtx)
}

/// Partition count of `topic`, `None` when it does not exist.
fn partition_count<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> Result<Option<i32>, KafkaError> {
    let md = consumer.fetch_metadata(Some(topic), META_TIMEOUT)?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len() as i32))
}

/// Starts the registry thread; it starts and stops the pool workers.
pub fn start(ctx: LoaderCtx) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pool-registry".into())
        .spawn(move || {
            if let Err(error) = registry_loop(&ctx) {
                ctx.gate
                    .set_fatal(format!("reading the pool registry failed: {error}"));
            }
        })
}

/// A partition being read: load target and progress.
#[derive(Debug)]
struct PartRead {
    /// High watermark when reading started; loaded once reached.
    target: i64,
    /// Next offset to read.
    next: i64,
    loaded: bool,
    started: Instant,
}

impl PartRead {
    fn new(lo: i64, hi: i64) -> Self {
        Self {
            target: hi,
            next: lo,
            // Checked (and logged) by the first loop turn when empty.
            loaded: false,
            started: Instant::now(),
        }
    }
}

/// The registry reader, assigned to every partition from the beginning,
/// with the end offsets seen now.
fn open_registry(
    ctx: &LoaderCtx,
) -> Result<(BaseConsumer<ReaderCtx>, BTreeMap<i32, PartRead>), KafkaError> {
    let topic = ctx.kafka.topic(REGISTRY_TOPIC);
    let consumer = reader(&ctx.kafka)?;
    let n = partition_count(&consumer, &topic)?.unwrap_or(0);
    let mut parts: BTreeMap<i32, PartRead> = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..n {
        let (lo, hi) = consumer.fetch_watermarks(&topic, p, META_TIMEOUT)?;
        parts.insert(p, PartRead::new(lo, hi));
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    if n > 0 {
        consumer.assign(&tpl)?;
    }
    Ok((consumer, parts))
}

fn registry_loop(ctx: &LoaderCtx) -> Result<(), KafkaError> {
    // A slow or restarting broker is waited for, not fatal.
    let (consumer, mut parts) = loop {
        match open_registry(ctx) {
            Ok(x) => break x,
            Err(error) => {
                tracing::warn!(%error, "Cannot read the pool registry yet; retrying.");
                if ctx.stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    // Definitions read so far; applied in one go once the registry is
    // loaded, then one by one.
    let mut defs: BTreeMap<String, PoolDef> = BTreeMap::new();
    let mut workers: HashMap<String, (Arc<PoolHandle>, JoinHandle<()>)> = HashMap::new();
    let mut loaded = false;
    while !ctx.stop.load(Ordering::Relaxed) {
        let mut changed: BTreeSet<String> = BTreeSet::new();
        match consumer.poll(POLL) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if let Some(pr) = parts.get_mut(&p) {
                    pr.loaded = true;
                }
            }
            Some(Err(error)) => tracing::warn!(%error, "Pool registry read error; retrying."),
            Some(Ok(msg)) => {
                if let Some(pr) = parts.get_mut(&msg.partition()) {
                    pr.next = msg.offset() + 1;
                    pr.loaded |= pr.next >= pr.target;
                }
                let Some(name) = msg.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                    continue;
                };
                let def = match msg.payload() {
                    None => None,
                    Some(b) => match PoolDef::from_json(b) {
                        Ok(d) if d.name == name => Some(d),
                        Ok(d) => {
                            tracing::warn!(key = name, name = %d.name, "Pool definition under another name's key; ignored.");
                            continue;
                        }
                        Err(error) => {
                            tracing::warn!(pool = name, %error, "Bad pool definition; ignored.");
                            continue;
                        }
                    },
                };
                if !ctx.only.is_empty() && !ctx.only.iter().any(|o| o == name) {
                    continue;
                }
                let is_change = match def {
                    Some(d) => defs
                        .insert(name.to_owned(), d.clone())
                        .is_none_or(|o| o != d),
                    None => defs.remove(name).is_some(),
                };
                if is_change {
                    changed.insert(name.to_owned());
                }
            }
        }
        for pr in parts.values_mut() {
            pr.loaded |= pr.next >= pr.target;
        }
        if !loaded && parts.values().all(|p| p.loaded) {
            loaded = true;
            // Register every pool before opening the gate, so no partition
            // is ready before the pools that existed at start are loaded.
            for name in defs.keys() {
                changed.insert(name.clone());
            }
            apply_changes(ctx, &defs, &changed, &mut workers);
            changed.clear();
            ctx.gate.set_registry_loaded();
            tracing::info!(pools = defs.len(), "Pool registry loaded.");
        }
        if loaded && !changed.is_empty() {
            apply_changes(ctx, &defs, &changed, &mut workers);
        }
    }
    for (h, _) in workers.values() {
        h.stop.store(true, Ordering::Relaxed);
    }
    for (_, (_, j)) in workers.drain() {
        let _ = j.join();
    }
    Ok(())
}

fn apply_changes(
    ctx: &LoaderCtx,
    defs: &BTreeMap<String, PoolDef>,
    changed: &BTreeSet<String>,
    workers: &mut HashMap<String, (Arc<PoolHandle>, JoinHandle<()>)>,
) {
    for name in changed {
        if let Some((h, j)) = workers.remove(name) {
            h.stop.store(true, Ordering::Relaxed);
            let _ = j.join();
            ctx.pools.remove(name);
            ctx.gate.unregister(name);
            tracing::info!(pool = %name, "Pool removed or redefined; stopped its loader.");
        }
        let Some(def) = defs.get(name) else { continue };
        let parts = if def.has_members() {
            let topic = ctx.kafka.topic(&vidpulse_core::topics::pool(name));
            let counted = loop {
                match reader(&ctx.kafka).and_then(|c| partition_count(&c, &topic)) {
                    Ok(n) => break n,
                    Err(error) => {
                        tracing::warn!(pool = %name, %error, "Cannot read the pool topic's metadata yet; retrying.");
                        if ctx.stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            };
            match counted {
                Some(n) => n,
                None => {
                    ctx.gate.set_fatal(format!(
                        "pool {name}: topic {topic} does not exist; run `vidpulse pool create {name} --match {}` again",
                        def.match_field
                    ));
                    return;
                }
            }
        } else {
            0
        };
        if def.mode == Mode::Bucketed && def.has_members() && parts != ctx.event_partitions {
            ctx.gate.set_fatal(mismatch_message(
                name,
                &ctx.kafka.topic(&vidpulse_core::topics::pool(name)),
                parts,
                &ctx.events_topic,
                ctx.event_partitions,
            ));
            return;
        }
        let handle = Arc::new(PoolHandle::new(def.clone(), parts.max(0) as usize));
        ctx.gate.register(def);
        ctx.pools.insert(handle.clone());
        tracing::info!(pool = %name, r#match = %def.match_field, mode = %def.mode, kinds = ?def.kinds, partitions = parts, "Applying pool.");
        let wctx = ctx.clone();
        let wh = handle.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("pool-{name}"))
            .spawn(move || {
                if let Err(error) = worker_loop(&wctx, &wh) {
                    wctx.gate
                        .set_fatal(format!("loading pool {} failed: {error}", wh.def.name));
                }
            });
        match spawned {
            Ok(j) => {
                workers.insert(name.clone(), (handle, j));
            }
            Err(error) => ctx
                .gate
                .set_fatal(format!("cannot start loader thread: {error}")),
        }
    }
}

/// The error text for a bucketed pool that is not co-partitioned.
pub fn mismatch_message(
    pool: &str,
    pool_topic: &str,
    pool_partitions: i32,
    events_topic: &str,
    event_partitions: i32,
) -> String {
    format!(
        "bucketed pool {pool}: {pool_topic} has {pool_partitions} partitions but {events_topic} has \
         {event_partitions}; a bucketed pool must have exactly as many partitions as the events topic \
         so that pool partition N holds the ids of events partition N. Recreate the pool topic with \
         {event_partitions} partitions (delete it, then `vidpulse pool create {pool} --mode bucketed …` \
         and re-import the ids), or make the pool broadcast (`vidpulse pool create {pool} --mode broadcast …`)"
    )
}

fn worker_loop(ctx: &LoaderCtx, h: &PoolHandle) -> Result<(), KafkaError> {
    let name = h.def.name.as_str();
    if !h.def.has_members() {
        ctx.gate.publish(name, &BTreeSet::new(), true, None);
        while !ctx.stop.load(Ordering::Relaxed) && !h.stop.load(Ordering::Relaxed) {
            std::thread::sleep(POLL);
        }
        return Ok(());
    }
    let topic = ctx.kafka.topic(&vidpulse_core::topics::pool(name));
    let consumer = reader(&ctx.kafka)?;
    let n = h.members.read().map(|m| m.len() as i32).unwrap_or(0);
    let bucketed = h.def.mode == Mode::Bucketed;
    let mut reading: BTreeMap<i32, PartRead> = BTreeMap::new();
    let mut seen_gen: Option<u64> = None;
    let mut last_gauges = Instant::now() - Duration::from_secs(10);
    // (partition, key hash, present): hashed outside the write lock.
    let mut batch: Vec<(i32, u64, bool)> = Vec::with_capacity(BURST);
    while !ctx.stop.load(Ordering::Relaxed) && !h.stop.load(Ordering::Relaxed) {
        let mut report = false;
        // Follow the assignment (bucketed) or read everything (broadcast).
        let (want, generation_) = if bucketed {
            let (a, g) = ctx.gate.assignment();
            (
                a.into_iter().filter(|p| *p < n).collect::<BTreeSet<_>>(),
                Some(g),
            )
        } else {
            ((0..n).collect(), None)
        };
        if seen_gen.is_none() || generation_ != seen_gen {
            if let Err(error) = follow(&consumer, &topic, h, &want, &mut reading) {
                // A slow broker: try again, the partitions stay closed.
                tracing::warn!(pool = name, %error, "Following the assignment failed; retrying.");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            seen_gen = generation_.or(Some(0));
            report = true;
        }
        // Read a burst and apply it under one write lock.
        batch.clear();
        let mut eof: Vec<i32> = Vec::new();
        let mut wait = POLL;
        while batch.len() < BURST {
            match consumer.poll(wait) {
                None => break,
                Some(Err(KafkaError::PartitionEOF(p))) => eof.push(p),
                Some(Err(error)) => {
                    tracing::warn!(pool = name, %error, "Pool read error; retrying.");
                    break;
                }
                Some(Ok(msg)) => {
                    let p = msg.partition();
                    if let Some(pr) = reading.get_mut(&p) {
                        pr.next = msg.offset() + 1;
                        if let Some(k) = msg.key().and_then(key_hash) {
                            batch.push((p, k, msg.payload().is_some()));
                        }
                    }
                }
            }
            wait = Duration::ZERO;
        }
        if !batch.is_empty()
            && let Ok(mut m) = h.members.write()
        {
            for (p, k, present) in &batch {
                if let Some(s) = m.get_mut(*p as usize) {
                    s.apply_hash(*k, *present);
                }
            }
        }
        for (p, pr) in reading.iter_mut() {
            if !pr.loaded && (pr.next >= pr.target || eof.contains(p)) {
                pr.loaded = true;
                report = true;
                let ids = h
                    .members
                    .write()
                    .ok()
                    .and_then(|mut m| {
                        m.get_mut(*p as usize).map(|s| {
                            s.shrink();
                            s.len()
                        })
                    })
                    .unwrap_or(0);
                let secs = pr.started.elapsed().as_secs_f64();
                mm::pool_partition_loaded(name, *p, secs, ids);
                tracing::info!(
                    pool = name,
                    partition = *p,
                    ids,
                    seconds = secs,
                    "Pool partition loaded."
                );
            }
        }
        if report {
            let loaded: BTreeSet<i32> = reading
                .iter()
                .filter(|(_, r)| r.loaded)
                .map(|(p, _)| *p)
                .collect();
            let all = !bucketed && loaded.len() as i32 == n;
            ctx.gate.publish(name, &loaded, all, generation_);
        }
        if last_gauges.elapsed() >= Duration::from_secs(1) || report {
            last_gauges = Instant::now();
            let sizes: Vec<(i32, usize)> = h
                .members
                .read()
                .map(|m| {
                    reading
                        .keys()
                        .map(|p| (*p, m.get(*p as usize).map(Members::len).unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default();
            for (p, size) in sizes {
                // While a partition loads, its lag is what is left to its
                // target: a broker round trip per partition every second
                // stalled this thread when it had the most to read.
                let lag = reading.get(&p).map(|r| {
                    let hi = if r.loaded {
                        consumer
                            .fetch_watermarks(&topic, p, Duration::from_millis(500))
                            .map(|(_, hi)| hi)
                            .unwrap_or(r.target)
                    } else {
                        r.target
                    };
                    (hi - r.next).max(0)
                });
                gauge!(mm::POOL_IDS, "pool" => name.to_owned(), "partition" => p.to_string())
                    .set(size as f64);
                if let Some(lag) = lag {
                    gauge!(mm::POOL_LAG, "pool" => name.to_owned(), "partition" => p.to_string())
                        .set(lag as f64);
                }
            }
        }
    }
    for p in reading.keys() {
        mm::pool_partition_dropped(name, *p);
    }
    Ok(())
}

/// Starts reading the partitions in `want` not read yet (from the
/// beginning, target = today's end) and drops those no longer wanted (and
/// their ids). Nothing changes when a broker call fails.
fn follow(
    consumer: &BaseConsumer<ReaderCtx>,
    topic: &str,
    h: &PoolHandle,
    want: &BTreeSet<i32>,
    reading: &mut BTreeMap<i32, PartRead>,
) -> Result<(), KafkaError> {
    let name = h.def.name.as_str();
    let drop_: Vec<i32> = reading
        .keys()
        .filter(|p| !want.contains(p))
        .copied()
        .collect();
    if !drop_.is_empty() {
        let mut tpl = TopicPartitionList::new();
        for p in &drop_ {
            tpl.add_partition(topic, *p);
        }
        consumer.incremental_unassign(&tpl)?;
        if let Ok(mut m) = h.members.write() {
            for p in &drop_ {
                reading.remove(p);
                if let Some(s) = m.get_mut(*p as usize) {
                    s.clear();
                }
            }
        }
        for p in &drop_ {
            mm::pool_partition_dropped(name, *p);
        }
        tracing::info!(pool = name, partitions = ?drop_, "Dropped pool partitions (revoked).");
    }
    let add: Vec<i32> = want
        .iter()
        .filter(|p| !reading.contains_key(p))
        .copied()
        .collect();
    if !add.is_empty() {
        let mut tpl = TopicPartitionList::new();
        let mut marks = Vec::with_capacity(add.len());
        for p in &add {
            marks.push((*p, consumer.fetch_watermarks(topic, *p, META_TIMEOUT)?));
            tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
        }
        consumer.incremental_assign(&tpl)?;
        let mut m = h.members.write().ok();
        for (p, (lo, hi)) in marks {
            if let Some(s) = m.as_mut().and_then(|m| m.get_mut(p as usize)) {
                s.reserve(usize::try_from(hi - lo).unwrap_or(0));
            }
            reading.insert(p, PartRead::new(lo, hi));
        }
        tracing::info!(pool = name, partitions = ?add, "Loading pool partitions.");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::MatchField;

    fn def(name: &str, mode: Mode, field: MatchField) -> PoolDef {
        PoolDef {
            name: name.into(),
            match_field: field,
            kinds: vec![],
            mode,
            partitions: 4,
            created_by: String::new(),
            created_at_ms: 0,
        }
    }

    #[test]
    fn gate_opens_a_partition_only_when_every_pool_is_loaded_for_it() {
        let g = Gate::default();
        g.assign(&[0, 1]);
        assert!(!g.is_ready(0), "registry not loaded yet");
        g.register(&def("b", Mode::Bucketed, MatchField::VideoId));
        g.register(&def("w", Mode::Broadcast, MatchField::AuthorId));
        g.register(&def("all", Mode::Broadcast, MatchField::All));
        g.set_registry_loaded();
        assert!(!g.is_ready(0));
        let (_, generation_) = g.assignment();
        g.publish("b", &[0].into(), false, Some(generation_));
        assert!(!g.is_ready(0), "broadcast pool still loading");
        g.publish("w", &BTreeSet::new(), true, None);
        assert!(g.is_ready(0));
        assert!(!g.is_ready(1), "bucket 1 not loaded");
        assert_eq!(g.waiting(), (vec![1], true));
        // A report made for an older assignment is ignored.
        g.assign(&[2]);
        g.publish("b", &[0, 1, 2].into(), false, Some(generation_));
        assert!(!g.is_ready(2));
        let (_, gen2) = g.assignment();
        g.publish("b", &[0, 1, 2, 3].into(), false, Some(gen2));
        assert!(g.is_ready(1) && g.is_ready(2));
        assert!(!g.is_ready(3), "not assigned");
        // Revoke then re-assign: closed until the worker reports again.
        g.revoke(&[1]);
        assert!(!g.is_ready(1));
        g.assign(&[1]);
        assert!(!g.is_ready(1));
        // A new pool closes every partition until it is loaded.
        g.register(&def("late", Mode::Broadcast, MatchField::UserId));
        assert!(!g.is_ready(0));
        g.publish("late", &BTreeSet::new(), true, None);
        assert!(g.is_ready(0));
        g.unregister("b");
        assert!(g.is_ready(1), "only broadcast pools left, all loaded");
    }

    #[test]
    fn mismatch_message_says_why_and_what_to_do() {
        let m = mismatch_message("big", "vp.pool.big.v1", 3, "vp.events.v1", 8);
        assert!(m.contains("3 partitions"), "{m}");
        assert!(m.contains("vp.events.v1 has 8"), "{m}");
        assert!(m.contains("--mode broadcast"), "{m}");
    }

    #[test]
    fn a_partition_is_loaded_once_read_to_the_end_seen_at_start() {
        let mut r = PartRead::new(5, 5);
        assert!(r.next >= r.target, "empty: loaded on the first check");
        r = PartRead::new(0, 5);
        assert!(r.next < r.target);
        r.next = 5;
        assert!(r.next >= r.target);
    }
}
