//! The monitor's job on the stage runtime: decode a batch of
//! `vp.events.v1` records, match them against the pools, enrich the matches
//! with one Redis round trip per batch, and emit `vp.monitored.v1` records
//! (or dead letters).
//!
//! Delivery guarantee: at-least-once, duplicate-free across graceful
//! rebalances (the runtime's). An events partition is not read before its
//! pool data is loaded: `readable` is the pool gate, so a partition whose
//! pools are not ready stays paused and is re-read from its first unhandled
//! record once they are (no false negatives). A Redis failure makes the
//! batch retriable: the runtime backs off, reads nothing meanwhile and hands
//! the same batch over again; counters move only once a batch is done.

use std::collections::HashMap;
use std::sync::Arc;

use metrics::{Counter, Gauge, counter, gauge};
use vidpulse_core::health::Component;
use vidpulse_core::runtime::{
    InputPartition, Output, Outputs, Record, Stage, StageError, StartAt, Tick,
};
use vidpulse_core::{dlq, metrics as m};
use vidpulse_proto::{EventIds as _, EventView, MonitoredEvent};

use crate::MonitorError;
use crate::enrich::{Enricher, Enrichment, MissPolicy};
use crate::loader::{Gate, Pools};
use crate::metrics as mm;
use crate::pool::{self, Verdict};

pub(crate) const STAGE: &str = "monitor";

/// Where the monitor writes.
#[derive(Clone, Debug)]
pub(crate) struct Topics {
    pub output: String,
    pub dlq: String,
}

/// What the batch makes of one record.
enum Verdicts<'a> {
    Filtered,
    Pass {
        event: EventView<'a>,
        pools: Vec<String>,
    },
    Dlq {
        detail: String,
    },
}

/// Counts of one batch, applied once it is done.
#[derive(Default)]
struct Tally {
    filtered: u64,
    dlq: u64,
    dropped_miss: u64,
    passed: HashMap<String, u64>,
    not_local: HashMap<String, u64>,
}

/// Counters resolved once.
struct Counters {
    filtered: Counter,
    dlq: Counter,
    dropped_miss: Counter,
    passed: HashMap<String, Counter>,
    not_local: HashMap<String, Counter>,
    waiting: Gauge,
}

impl Counters {
    fn apply(&mut self, t: Tally) {
        self.filtered.increment(t.filtered);
        self.dlq.increment(t.dlq);
        self.dropped_miss.increment(t.dropped_miss);
        for (pool, n) in t.passed {
            self.passed
                .entry(pool.clone())
                .or_insert_with(|| counter!(mm::EVENTS_PASSED, "pool" => pool))
                .increment(n);
        }
        for (pool, n) in t.not_local {
            self.not_local
                .entry(pool.clone())
                .or_insert_with(|| counter!(mm::EVENTS_NOT_LOCAL, "pool" => pool))
                .increment(n);
        }
    }
}

pub(crate) struct Monitor {
    topics: Topics,
    gate: Arc<Gate>,
    pools: Arc<Pools>,
    enricher: Option<Enricher>,
    miss_policy: MissPolicy,
    counters: Counters,
}

impl Monitor {
    pub fn new(
        topics: Topics,
        gate: Arc<Gate>,
        pools: Arc<Pools>,
        enricher: Option<Enricher>,
        miss_policy: MissPolicy,
    ) -> Monitor {
        Monitor {
            topics,
            gate,
            pools,
            enricher,
            miss_policy,
            counters: Counters {
                filtered: counter!(mm::EVENTS_FILTERED),
                dlq: counter!(m::RECORDS_DLQ, "stage" => STAGE, "reason" => "invalid_event"),
                dropped_miss: counter!(m::RECORDS_DROPPED, "stage" => STAGE, "reason" => "enrich_miss"),
                passed: HashMap::new(),
                not_local: HashMap::new(),
                waiting: gauge!(mm::PARTITIONS_WAITING),
            },
        }
    }
}

impl Stage for Monitor {
    async fn process(&mut self, batch: &[Record<'_>], out: &mut Outputs) -> Result<(), StageError> {
        let mut tally = Tally::default();
        let verdicts = decide(batch, &self.pools, &mut tally);

        // Enrich the events that pass: one round trip for the batch.
        let mut enrichments: Vec<Option<Enrichment>> = Vec::new();
        enrichments.resize_with(verdicts.len(), || None);
        if let Some(en) = self.enricher.as_mut() {
            let (idx, events): (Vec<usize>, Vec<&EventView<'_>>) = verdicts
                .iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    Verdicts::Pass { event, .. } => Some((i, event)),
                    _ => None,
                })
                .unzip();
            if !events.is_empty() {
                let got = en
                    .enrich(&events)
                    .await
                    .map_err(|e| StageError::retriable(Component::Redis, e))?;
                for (i, e) in idx.into_iter().zip(got) {
                    enrichments[i] = Some(e);
                }
            }
        }

        for (i, ((rec, verdict), enrichment)) in
            batch.iter().zip(verdicts).zip(enrichments).enumerate()
        {
            match verdict {
                Verdicts::Filtered => {}
                Verdicts::Dlq { detail } => {
                    tally.dlq += 1;
                    out.push(
                        i,
                        dlq::record(&self.topics.dlq, STAGE, rec, "invalid_event", &detail),
                    );
                }
                Verdicts::Pass { event, pools } => {
                    let e = enrichment.unwrap_or_default();
                    if self.miss_policy == MissPolicy::Drop && !e.missing.is_empty() {
                        tally.dropped_miss += 1;
                        continue;
                    }
                    let kind = event.kind().map(|k| k.as_str()).unwrap_or("");
                    let headers = vec![
                        ("vp.kind", kind.as_bytes().to_vec()),
                        ("vp.pools", pools.join(",").into_bytes()),
                    ];
                    // The event goes out as it came in (no re-encoding),
                    // the enrichment entries as the enricher encoded them.
                    let value = MonitoredEvent {
                        event: None,
                        pools,
                        enrichment: Default::default(),
                    }
                    .encode_around(rec.payload.unwrap_or_default(), &e.encoded);
                    out.push(
                        i,
                        Output {
                            topic: self.topics.output.clone(),
                            key: rec.key.map(<[u8]>::to_vec),
                            payload: Some(value),
                            headers,
                        },
                    );
                }
            }
        }
        self.counters.apply(tally);
        Ok(())
    }

    async fn on_assign(
        &mut self,
        parts: &[InputPartition],
    ) -> Result<Vec<(InputPartition, StartAt)>, StageError> {
        let partitions: Vec<i32> = parts.iter().map(|p| p.partition).collect();
        self.gate.assign(&partitions);
        let waiting: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| !self.gate.is_ready(*p))
            .collect();
        if !waiting.is_empty() {
            tracing::info!(partitions = ?waiting, "Partitions wait for their pool data (paused).");
        }
        Ok(Vec::new())
    }

    /// The pool gate: a partition is read only once every pool it needs is
    /// loaded for it.
    fn readable(&self, part: InputPartition) -> bool {
        self.gate.is_ready(part.partition)
    }

    async fn on_tick(&mut self, _tick: &mut Tick<'_>) -> Result<(), StageError> {
        if let Some(msg) = self.gate.fatal() {
            return Err(StageError::fatal(MonitorError::Fatal(msg)));
        }
        self.counters
            .waiting
            .set(self.gate.waiting().0.len() as f64);
        Ok(())
    }

    async fn on_revoke(&mut self, parts: &[InputPartition]) {
        let partitions: Vec<i32> = parts.iter().map(|p| p.partition).collect();
        self.gate.revoke(&partitions);
    }
}

/// Decodes and matches a batch under one read lock per pool.
fn decide<'a>(batch: &[Record<'a>], pools: &Pools, tally: &mut Tally) -> Vec<Verdicts<'a>> {
    let handles = pools.snapshot();
    let guards: Vec<_> = handles.iter().map(|h| (h, h.members.read().ok())).collect();
    let mut out = Vec::with_capacity(batch.len());
    for rec in batch {
        let Some(payload) = rec.payload else {
            out.push(Verdicts::Dlq {
                detail: "empty record on the events topic".into(),
            });
            continue;
        };
        // Read in place: the event goes out as its bytes came in.
        let event = match EventView::parse(payload) {
            Ok(e) => e,
            Err(e) => {
                out.push(Verdicts::Dlq {
                    detail: format!("not a vidpulse event: {e}"),
                });
                continue;
            }
        };
        let mut matched: Vec<String> = Vec::new();
        for (h, members) in &guards {
            let verdict = pool::check(&h.def, &event, rec.key, |id| {
                let Some(m) = members else { return false };
                match h.def.mode {
                    // Co-partitioned: the id's bucket is this event's partition.
                    pool::Mode::Bucketed => m
                        .get(rec.partition as usize)
                        .is_some_and(|s| s.contains(id)),
                    pool::Mode::Broadcast => m.iter().any(|s| s.contains(id)),
                }
            });
            match verdict {
                Verdict::Match => matched.push(h.def.name.clone()),
                Verdict::NoMatch => {}
                Verdict::NotLocal => *tally.not_local.entry(h.def.name.clone()).or_default() += 1,
            }
        }
        if matched.is_empty() {
            tally.filtered += 1;
            out.push(Verdicts::Filtered);
        } else {
            for name in &matched {
                *tally.passed.entry(name.clone()).or_default() += 1;
            }
            out.push(Verdicts::Pass {
                event,
                pools: matched,
            });
        }
    }
    out
}
