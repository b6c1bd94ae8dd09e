//! Benchmark of the aggregator's windowing core alone (no Kafka, no sinks):
//! reads a file of raw records written by `vidpulse-gen --out-file`,
//! normalizes them once with ingest's presets (not timed), then times the
//! built-in spec's state machines over them on one thread, the way the
//! stage runs them: each event into its `vp.events.v1` partition's state and,
//! wrapped as a monitored event of the site-wide pool, into its
//! `vp.monitored.v1` partition's state; every 500 records per partition a
//! flush (emission with early rows, then the checkpoint delta, serialized).
//!
//! ```sh
//! vidpulse-gen --count 500000 --out-file raw.jsonl --truth /dev/null
//! cargo run --release -p vidpulse-aggregator --example bench_core -- raw.jsonl
//! ```
//!
//! Prints records per second per core for processing alone and with flushes,
//! then, for each metric, log and leaderboard of the spec alone (the spec cut
//! down to it): the events it takes, its cost per event in ns (processing
//! only), the open groups (cells of open panes and leaderboard partials)
//! and the remembered ids at the end, so that a regression in one aggregate
//! shows. (Heap bytes per group need a counting allocator, which cannot sit
//! beside the mimalloc allocator every vidpulse crate installs.)

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::time::Instant;

use anyhow::Context;
use serde_json::Value;
use vidpulse_aggregator::engine::{PartitionState, Plan};
use vidpulse_aggregator::record::Rec;
use vidpulse_aggregator::spec::{Input, Spec};
use vidpulse_ingest::mapping::{Mapping, SourceRef};
use vidpulse_ingest::normalize::normalize;
use vidpulse_proto::{Event, event::Payload};

const PARTITIONS: usize = 8;
const FLUSH_EVERY: usize = 500;
/// The stage's default cadence for one instance owning every partition of
/// both inputs: a flush per 20 000 records read (`--flush-max-rows`), so
/// per 1 250 records of each of the 16 partitions.
const STAGE_FLUSH_EVERY: usize = 20_000 / (2 * PARTITIONS);

struct Input1 {
    event: Event,
    partition: usize,
    enrichment: HashMap<String, String>,
}

fn load(path: &str) -> anyhow::Result<Vec<Input1>> {
    let zone: chrono_tz::Tz = chrono_tz::Asia::Shanghai;
    let mut mappings: HashMap<String, Mapping> = HashMap::new();
    for name in vidpulse_ingest::presets::names() {
        if let Some(m) = vidpulse_ingest::presets::preset(name, zone) {
            mappings.insert(name.to_owned(), m?);
        }
    }
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {path}"))?;
    let mut out = Vec::new();
    let mut modules: HashMap<String, String> = HashMap::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        let v: Value = serde_json::from_str(&line)?;
        let topic = v["topic"].as_str().unwrap_or_default();
        let raw_topic = topic.rsplit('.').next().unwrap_or(topic);
        let Some(mapping) = mappings.get(raw_topic) else {
            continue;
        };
        let Some(payload) = v["payload"].as_str() else {
            continue;
        };
        if payload.starts_with("base64:") {
            continue;
        }
        let src = SourceRef {
            topic,
            partition: 0,
            offset: n as i64,
        };
        let Ok(event) = normalize(mapping, Some(payload.as_bytes()), src, 1 << 20, 0) else {
            continue;
        };
        if let Some(Payload::LiveRoomStarted(r)) = &event.payload
            && let Some(room) = &r.room
        {
            modules.insert(event.room_id.clone(), room.module_id.clone());
        }
        let mut enrichment = HashMap::new();
        if let Some(m) = modules.get(&event.room_id) {
            enrichment.insert("module_id".to_owned(), m.clone());
        }
        // Any stable spread of keys over partitions will do here.
        let partition = fnv(event.subject_key()) as usize % PARTITIONS;
        out.push(Input1 {
            event,
            partition,
            enrichment,
        });
    }
    Ok(out)
}

/// Fields and bytes of a delta by field kind (the tag before the first `:`).
fn tally(
    by: &mut BTreeMap<String, (usize, usize)>,
    d: &vidpulse_aggregator::engine::CheckpointDelta,
) {
    for (f, v) in &d.set {
        let e = by
            .entry(f.split(':').next().unwrap_or("").to_owned())
            .or_default();
        e.0 += 1;
        e.1 += f.len() + v.len();
    }
    for f in &d.del {
        let e = by
            .entry(format!("del {}", f.split(':').next().unwrap_or("")))
            .or_default();
        e.0 += 1;
        e.1 += f.len();
    }
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

struct Run {
    records: usize,
    rows: usize,
    checkpoint_bytes: usize,
    /// Checkpoint bytes written in each quarter of the input.
    quarters: [usize; 4],
    /// Estimated state bytes over all partitions at the end of each quarter.
    state: [usize; 4],
    secs: f64,
}

/// `flush`: `None` = process only; `Some(early)` = flushes every `every`
/// records of a partition, with or without early emission.
fn run(plan: &Plan, inputs: &[Input1], flush: Option<bool>, every: usize) -> Run {
    let pools = vec!["all".to_owned()];
    let mut events: Vec<PartitionState> = (0..PARTITIONS)
        .map(|_| PartitionState::new(plan, Input::Events))
        .collect();
    let mut monitored: Vec<PartitionState> = (0..PARTITIONS)
        .map(|_| PartitionState::new(plan, Input::Monitored))
        .collect();
    let mut offsets = [0i64; PARTITIONS];
    let (mut rows, mut bytes, mut records) = (0, 0, 0);
    let (mut quarters, mut state) = ([0usize; 4], [0usize; 4]);
    let quarter = inputs.len().div_ceil(4).max(1);
    let mut sizing = std::time::Duration::ZERO;
    let mut by_tag: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let started = Instant::now();
    for (n, i) in inputs.iter().enumerate() {
        let p = i.partition;
        let off = offsets[p];
        offsets[p] += 1;
        if let Some(rec) = Rec::new(&i.event, &[], None) {
            events[p].process(plan, &rec, off);
        }
        if let Some(rec) = Rec::new(&i.event, &pools, Some(&i.enrichment)) {
            monitored[p].process(plan, &rec, off);
        }
        records += 2;
        if let Some(early) = flush
            && ((off + 1) as usize).is_multiple_of(every)
        {
            for s in [&mut events[p], &mut monitored[p]] {
                rows += s.emit(plan, early).len();
                let d = s.checkpoint_delta(plan);
                tally(&mut by_tag, &d);
                let b = d.bytes();
                bytes += b;
                quarters[n / quarter] += b;
            }
        }
        if flush.is_some() && (n + 1) % quarter == 0 {
            // Sizing walks the state: not timed.
            let t = Instant::now();
            state[n / quarter] = events
                .iter()
                .chain(&monitored)
                .map(PartitionState::state_bytes)
                .sum();
            sizing += t.elapsed();
        }
    }
    if let Some(early) = flush {
        for s in events.iter_mut().chain(monitored.iter_mut()) {
            rows += s.emit(plan, early).len();
            let d = s.checkpoint_delta(plan);
            tally(&mut by_tag, &d);
            let b = d.bytes();
            bytes += b;
            quarters[3] += b;
        }
    }
    if std::env::var_os("BENCH_CORE_TAGS").is_some() {
        eprintln!("checkpoint bytes by field kind (fields, bytes): {by_tag:?}");
    }
    Run {
        records,
        rows,
        checkpoint_bytes: bytes,
        quarters,
        state,
        secs: (started.elapsed() - sizing).as_secs_f64(),
    }
}

/// One spec entry alone, processing only: (seconds, events taken, open
/// groups, remembered ids).
fn run_one(plan: &Plan, inputs: &[Input1]) -> (f64, u64, usize, usize) {
    use vidpulse_aggregator::engine::Outcome;
    let pools = vec!["all".to_owned()];
    let mut events: Vec<PartitionState> = (0..PARTITIONS)
        .map(|_| PartitionState::new(plan, Input::Events))
        .collect();
    let mut monitored: Vec<PartitionState> = (0..PARTITIONS)
        .map(|_| PartitionState::new(plan, Input::Monitored))
        .collect();
    let mut offsets = [0i64; PARTITIONS];
    let mut taken = 0u64;
    let started = Instant::now();
    for i in inputs {
        let p = i.partition;
        let off = offsets[p];
        offsets[p] += 1;
        let outs = [
            Rec::new(&i.event, &[], None).map(|r| events[p].process(plan, &r, off)),
            Rec::new(&i.event, &pools, Some(&i.enrichment))
                .map(|r| monitored[p].process(plan, &r, off)),
        ];
        taken += outs
            .iter()
            .filter(|o| matches!(o, Some(Outcome::Counted { .. } | Outcome::Duplicate)))
            .count() as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    let groups = events
        .iter()
        .chain(&monitored)
        .map(PartitionState::open_groups)
        .sum();
    let ids = events
        .iter()
        .chain(&monitored)
        .map(PartitionState::remembered_ids)
        .sum();
    (secs, taken, groups, ids)
}

/// The spec cut down to one entry.
fn only(spec: &Spec, name: &str) -> Spec {
    Spec {
        metrics: spec
            .metrics
            .iter()
            .filter(|m| m.name == name)
            .cloned()
            .collect(),
        logs: spec
            .logs
            .iter()
            .filter(|l| l.name == name)
            .cloned()
            .collect(),
        leaderboards: spec
            .leaderboards
            .iter()
            .filter(|l| l.name == name)
            .cloned()
            .collect(),
    }
}

fn print_checkpoints(full: &Run, how: &str) {
    let per_k = |b: usize| b as f64 / (full.records as f64 / 4.0 / 1000.0) / 1000.0;
    println!(
        "checkpoint KB per 1000 input records, by quarter of the input ({how}): {:.1} / {:.1} / {:.1} / {:.1}",
        per_k(full.quarters[0]),
        per_k(full.quarters[1]),
        per_k(full.quarters[2]),
        per_k(full.quarters[3]),
    );
    println!(
        "state MB (estimated, all partitions) at the end of each quarter: {:.1} / {:.1} / {:.1} / {:.1}",
        full.state[0] as f64 / 1e6,
        full.state[1] as f64 / 1e6,
        full.state[2] as f64 / 1e6,
        full.state[3] as f64 / 1e6,
    );
}

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: bench_core <gen --out-file JSONL>")?;
    let t = Instant::now();
    let inputs = load(&path)?;
    eprintln!(
        "bench_core: {} canonical events from {path} (normalized in {:.1}s, not timed)",
        inputs.len(),
        t.elapsed().as_secs_f64()
    );
    // Grace and out-of-orderness as in production; gen's data fits.
    let plan = Plan::new(Spec::default_spec(), 60_000, 5_000);
    if std::env::var_os("BENCH_CORE_CHECKPOINTS").is_some() {
        // Checkpoint figures only (bytes are deterministic; no timing).
        let full = run(&plan, &inputs, Some(true), FLUSH_EVERY);
        print_checkpoints(
            &full,
            "a flush per 500 records of a partition, early emission",
        );
        let stage = run(&plan, &inputs, Some(false), STAGE_FLUSH_EVERY);
        print_checkpoints(
            &stage,
            "the stage's defaults: a flush per 20 000 records over 16 partitions, no early emission",
        );
        return Ok(());
    }
    // Warm-up, then the measured runs.
    let _ = run(
        &plan,
        &inputs[..inputs.len().min(20_000)],
        Some(true),
        FLUSH_EVERY,
    );
    let bare = run(&plan, &inputs, None, FLUSH_EVERY);
    let flushed = run(&plan, &inputs, Some(false), FLUSH_EVERY);
    let full = run(&plan, &inputs, Some(true), FLUSH_EVERY);
    println!(
        "aggregator core (process only): {} records in {:.2}s = {:.0} records/s on one core",
        bare.records,
        bare.secs,
        bare.records as f64 / bare.secs
    );
    println!(
        "aggregator core (process + emit + checkpoint every {FLUSH_EVERY}): {} records in {:.2}s = {:.0} records/s on one core; {} rows emitted, {:.1} MB of checkpoint deltas",
        flushed.records,
        flushed.secs,
        flushed.records as f64 / flushed.secs,
        flushed.rows,
        flushed.checkpoint_bytes as f64 / 1e6
    );
    println!(
        "aggregator core (same, with early emission): {} records in {:.2}s = {:.0} records/s on one core; {} rows emitted, {:.1} MB of checkpoint deltas",
        full.records,
        full.secs,
        full.records as f64 / full.secs,
        full.rows,
        full.checkpoint_bytes as f64 / 1e6
    );
    print_checkpoints(&full, "with early emission");
    let spec = Spec::default_spec();
    let names: Vec<String> = spec
        .metrics
        .iter()
        .map(|m| m.name.clone())
        .chain(spec.logs.iter().map(|l| l.name.clone()))
        .chain(spec.leaderboards.iter().map(|l| l.name.clone()))
        .collect();
    println!(
        "per entry, alone (process only): events taken, ns per event, open groups at the end, remembered ids"
    );
    for name in names {
        let plan = Plan::new(only(&spec, &name), 60_000, 5_000);
        let (secs, taken, groups, ids) = run_one(&plan, &inputs);
        println!(
            "  {name:<30} {taken:>9} events {:>7.0} ns/event {groups:>8} groups {ids:>8} ids",
            secs * 1e9 / taken.max(1) as f64,
        );
    }
    Ok(())
}
