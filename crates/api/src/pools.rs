//! The monitor's ID pools as the API shows them: definitions from the
//! registry topic `vp.pools.v1` and the current number of ids of each pool,
//! from its compacted topic — the same topics `vidpulse pool ls` reads.
//!
//! It runs the monitor's own loader (`vidpulse_pools::loader`) with every
//! events partition assigned, so bucketed pools are loaded whole and edits
//! show within about a second. A supervisor thread (re)starts the loader
//! when Kafka becomes reachable, when the registry or events topic appears
//! (or its partition count changes), and 30 s after the loader reports a
//! fatal condition (e.g. a pool topic that does not exist).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;
use serde::Serialize;
use vidpulse_core::config::KafkaArgs;
use vidpulse_core::{CancellationToken, kafka, topics};
use vidpulse_pools::loader::{self, Gate, LoaderCtx, Pools, REGISTRY_TOPIC};

const TICK: Duration = Duration::from_secs(2);
const RETRY_FATAL: Duration = Duration::from_secs(30);
const META: Duration = Duration::from_secs(5);

/// One pool.
#[derive(Clone, Debug, Serialize)]
pub struct PoolInfo {
    pub name: String,
    /// Event field compared with the ids (`video_id`, `author_id`, …, `all`).
    #[serde(rename = "match")]
    pub match_field: String,
    /// `broadcast` or `bucketed`.
    pub mode: String,
    /// Event kinds it applies to (empty: all).
    pub kinds: Vec<String>,
    /// Partitions of its topic.
    pub partitions: i32,
    /// Ids in the pool now; `null` for a pool matching every event.
    pub members: Option<usize>,
    pub created_by: String,
    /// RFC 3339, or null when unknown.
    pub created_at: Option<String>,
}

/// What `/api/pools` answers.
#[derive(Clone, Debug, Serialize)]
pub struct PoolsView {
    pub pools: Vec<PoolInfo>,
    /// Whether the registry and every pool were read to their end.
    pub loaded: bool,
    /// Why pools cannot be shown (Kafka unreachable, a bad pool…).
    pub error: Option<String>,
}

struct Running {
    pools: Arc<Pools>,
    gate: Arc<Gate>,
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
    event_partitions: i32,
    registry_existed: bool,
    started: Instant,
}

impl Running {
    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

#[derive(Default)]
struct State {
    running: Option<Running>,
    error: Option<String>,
}

/// Follows the pools in the background; [`PoolWatch::view`] reads them.
pub struct PoolWatch {
    state: Mutex<State>,
}

impl PoolWatch {
    /// Starts the supervisor thread; it stops with `shutdown`.
    pub fn start(kafka_args: KafkaArgs, shutdown: CancellationToken) -> Arc<PoolWatch> {
        let watch = Arc::new(PoolWatch {
            state: Mutex::new(State {
                running: None,
                error: Some("starting".into()),
            }),
        });
        let w = watch.clone();
        let spawned = std::thread::Builder::new()
            .name("pool-watch".into())
            .spawn(move || supervise(&w, &kafka_args, &shutdown));
        if let Err(e) = spawned {
            watch.set_error(Some(format!("cannot start the pool follower: {e}")));
        }
        watch
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut s) = self.state.lock() {
            s.error = e;
        }
    }

    /// The pools now.
    pub fn view(&self) -> PoolsView {
        let Ok(s) = self.state.lock() else {
            return PoolsView {
                pools: Vec::new(),
                loaded: false,
                error: Some("pool state poisoned".into()),
            };
        };
        let Some(r) = &s.running else {
            return PoolsView {
                pools: Vec::new(),
                loaded: false,
                error: s.error.clone(),
            };
        };
        let pools = r
            .pools
            .snapshot()
            .iter()
            .map(|h| {
                let d = &h.def;
                PoolInfo {
                    name: d.name.clone(),
                    match_field: d.match_field.to_string(),
                    mode: d.mode.to_string(),
                    kinds: d.kinds.clone(),
                    partitions: d.partitions,
                    members: d.has_members().then(|| {
                        h.members
                            .read()
                            .map(|m| m.iter().map(|p| p.len()).sum())
                            .unwrap_or(0)
                    }),
                    created_by: d.created_by.clone(),
                    created_at: (d.created_at_ms > 0)
                        .then(|| vidpulse_query::read::rfc3339(d.created_at_ms, false)),
                }
            })
            .collect();
        let loaded =
            r.gate.registry_loaded() && (0..r.event_partitions).all(|p| r.gate.is_ready(p));
        PoolsView {
            pools,
            loaded,
            error: r.gate.fatal().or_else(|| s.error.clone()),
        }
    }

    fn replace(&self, new: Option<Running>) {
        let old = match self.state.lock() {
            Ok(mut s) => std::mem::replace(&mut s.running, new),
            Err(_) => None,
        };
        if let Some(old) = old {
            old.stop();
        }
    }
}

/// (events partitions, registry exists)
fn probe(consumer: &BaseConsumer, kafka_args: &KafkaArgs) -> Result<(Option<i32>, bool), String> {
    let events = kafka_args.topic(topics::EVENTS);
    let n = kafka::partition_count(consumer, &events, META)
        .map_err(|e| format!("cannot reach Kafka ({}): {e}", kafka_args.brokers))?;
    let reg = kafka::partition_count(consumer, &kafka_args.topic(REGISTRY_TOPIC), META)
        .map_err(|e| format!("cannot reach Kafka ({}): {e}", kafka_args.brokers))?;
    Ok((n, reg.is_some()))
}

fn supervise(w: &PoolWatch, kafka_args: &KafkaArgs, shutdown: &CancellationToken) {
    let mut consumer: Option<BaseConsumer> = None;
    while !shutdown.is_cancelled() {
        if consumer.is_none() {
            match kafka::reader_config(kafka_args).map(|c| c.create::<BaseConsumer>()) {
                Ok(Ok(c)) => consumer = Some(c),
                Ok(Err(e)) => w.set_error(Some(format!("cannot create a Kafka client: {e}"))),
                Err(e) => w.set_error(Some(e.to_string())),
            }
        }
        if let Some(c) = &consumer {
            match probe(c, kafka_args) {
                Err(e) => w.set_error(Some(e)),
                Ok((None, _)) => {
                    w.replace(None);
                    w.set_error(Some(format!(
                        "{} does not exist; run `vidpulse topics create`",
                        kafka_args.topic(topics::EVENTS)
                    )));
                }
                Ok((Some(n), registry)) => {
                    let restart = match w.state.lock() {
                        Ok(s) => match &s.running {
                            None => true,
                            Some(r) => {
                                r.event_partitions != n
                                    || (registry && !r.registry_existed)
                                    || (r.gate.fatal().is_some()
                                        && r.started.elapsed() > RETRY_FATAL)
                            }
                        },
                        Err(_) => false,
                    };
                    if restart {
                        start_loader(w, kafka_args, n, registry);
                    }
                }
            }
        }
        let until = Instant::now() + TICK;
        while Instant::now() < until && !shutdown.is_cancelled() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    w.replace(None);
}

fn start_loader(w: &PoolWatch, kafka_args: &KafkaArgs, event_partitions: i32, registry: bool) {
    w.replace(None);
    let gate = Arc::new(Gate::default());
    // Every events partition "assigned": bucketed pools load whole.
    let all: Vec<i32> = (0..event_partitions).collect();
    gate.assign(&all);
    let pools = Arc::new(Pools::default());
    let stop = Arc::new(AtomicBool::new(false));
    let ctx = LoaderCtx {
        kafka: kafka_args.clone(),
        event_partitions,
        events_topic: kafka_args.topic(topics::EVENTS),
        only: Vec::new(),
        gate: gate.clone(),
        pools: pools.clone(),
        stop: stop.clone(),
    };
    match loader::start(ctx) {
        Ok(join) => {
            tracing::info!(event_partitions, registry, "Following the pool registry.");
            w.replace(Some(Running {
                pools,
                gate,
                stop,
                join: Some(join),
                event_partitions,
                registry_existed: registry,
                started: Instant::now(),
            }));
            w.set_error(None);
        }
        Err(e) => w.set_error(Some(format!("cannot start the pool loader: {e}"))),
    }
}
