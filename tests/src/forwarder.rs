//! The monitor played by the tests: events of `vp.events.v1` forwarded to
//! `vp.monitored.v1` as members of a site-wide pool `all` (and a consumption
//! pool `even`), each gift with its room's module as enrichment, so the
//! aggregator's monitored metrics can be checked against gen's truth
//! without racing the dimension tables.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::producer::{BaseRecord, Producer};
use serde_json::Value;
use vidpulse_proto::{Event, Message as _, MonitoredEvent, event};

use crate::{Env, brokers, wait_for};

const EVENTS: &str = "vp.events.v1";
const MONITORED: &str = "vp.monitored.v1";

/// A record the forwarder holds back to keep a partition's order.
enum Held {
    Event {
        key: Vec<u8>,
        event: Box<Event>,
    },
    /// A control record (a watermark), forwarded as it is.
    Control {
        key: Vec<u8>,
        payload: Vec<u8>,
        kind: Vec<u8>,
    },
}

impl Held {
    /// A gift whose room's module is not known yet.
    fn waits_for(&self, modules: &HashMap<String, String>) -> bool {
        match self {
            Held::Control { .. } => false,
            Held::Event { event: e, .. } => {
                matches!(e.payload, Some(event::Payload::GiftSent(_)))
                    && !e.room_id.is_empty()
                    && !modules.contains_key(&e.room_id)
            }
        }
    }
}

/// Plays the monitor with a site-wide pool `all` (and a consumption pool
/// `even` of the even video ids): wraps each event of vp.events.v1 into a MonitoredEvent
/// with the room's module as enrichment, on the same partition with the
/// same key. Runs until `stop` and `want` events were forwarded.
pub struct Forwarder {
    stop: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    pub fn start(env: &Env) -> Forwarder {
        let stop = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let (s, f) = (stop.clone(), forwarded.clone());
        let prefix = env.prefix.clone();
        let thread = std::thread::spawn(move || {
            let env = Env {
                prefix: prefix.clone(),
                vars: Vec::new(),
            };
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .set("group.id", format!("{prefix}forwarder"))
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .create()
                .unwrap();
            c.subscribe(&[&env.topic(EVENTS)]).unwrap();
            let p = env.producer();
            let out = env.topic(MONITORED);
            // Events are consumed in partition order; a room's gifts may come
            // before its start event, so hold events until the module is known
            // or the run ends (like a monitor whose dimension table is loaded).
            // Watermark records (ingest's) go on in their place: behind what
            // a partition holds, never ahead of it, as the monitor forwards
            // them.
            let mut modules: HashMap<String, String> = HashMap::new();
            let mut held: BTreeMap<i32, std::collections::VecDeque<Held>> = BTreeMap::new();
            let mut idle_since = Instant::now();
            let send = |p: &rdkafka::producer::ThreadedProducer<_>,
                        part: i32,
                        h: Held,
                        modules: &HashMap<String, String>| {
                let (key, bytes, control) = match h {
                    Held::Control { key, payload, kind } => (key, payload, Some(kind)),
                    Held::Event { key, event: e } => {
                        let mut enrichment = HashMap::new();
                        if let Some(m) = modules.get(&e.room_id) {
                            enrichment.insert("module_id".to_owned(), m.clone());
                        }
                        let mut pools = vec!["all".to_owned()];
                        let consumption = matches!(
                            e.payload,
                            Some(event::Payload::VideoPlayed(_) | event::Payload::UserAction(_))
                        );
                        if consumption && e.video_id.parse::<u64>().is_ok_and(|v| v % 2 == 0) {
                            pools.push("even".to_owned());
                        }
                        let me = MonitoredEvent {
                            event: Some(*e),
                            pools,
                            enrichment,
                        };
                        (key, me.encode_to_vec(), None)
                    }
                };
                let headers = control.as_ref().map(|kind| {
                    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                        key: "vp.control",
                        value: Some(kind.as_slice()),
                    })
                });
                let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&out)
                    .partition(part)
                    .key(key.as_slice())
                    .payload(bytes.as_slice());
                if let Some(h) = headers {
                    r = r.headers(h);
                }
                loop {
                    match p.send(r) {
                        Ok(()) => break,
                        Err((_, back)) => {
                            r = back;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
                control.is_none()
            };
            // Sends the front of each partition's queue while it is ready.
            let release = |held: &mut BTreeMap<i32, std::collections::VecDeque<Held>>,
                           modules: &HashMap<String, String>,
                           all: bool| {
                for (part, q) in held.iter_mut() {
                    while let Some(front) = q.front() {
                        if !all && front.waits_for(modules) {
                            break;
                        }
                        let h = q.pop_front().unwrap();
                        if send(&p, *part, h, modules) {
                            f.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            };
            loop {
                match c.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        idle_since = Instant::now();
                        let key = m.key().unwrap_or_default().to_vec();
                        let control = m.headers().and_then(|hs| {
                            hs.iter()
                                .find(|h| h.key == "vp.control")
                                .map(|h| h.value.unwrap_or_default().to_vec())
                        });
                        let item = match control {
                            Some(kind) => Held::Control {
                                key,
                                payload: m.payload().unwrap_or_default().to_vec(),
                                kind,
                            },
                            None => Held::Event {
                                key,
                                event: Box::new(
                                    Event::decode(m.payload().unwrap_or_default()).unwrap(),
                                ),
                            },
                        };
                        if let Held::Event { event: e, .. } = &item
                            && let Some(event::Payload::LiveRoomStarted(r)) = &e.payload
                            && let Some(room) = &r.room
                        {
                            modules.insert(e.room_id.clone(), room.module_id.clone());
                        }
                        held.entry(m.partition()).or_default().push_back(item);
                        release(&mut held, &modules, false);
                    }
                    Some(Err(e)) => panic!("forwarder: {e}"),
                    None => {
                        if s.load(Ordering::SeqCst) && idle_since.elapsed() > Duration::from_secs(2)
                        {
                            release(&mut held, &modules, true);
                            p.flush(Duration::from_secs(30)).unwrap();
                            return;
                        }
                    }
                }
                if idle_since.elapsed() > Duration::from_secs(1) {
                    p.flush(Duration::from_secs(30)).unwrap();
                }
            }
        });
        Forwarder {
            stop,
            forwarded,
            thread: Some(thread),
        }
    }

    /// Waits until `n` events were forwarded, then stops the thread.
    pub fn finish(&mut self, n: u64) {
        wait_for(
            &format!("{n} events forwarded to {MONITORED}"),
            Duration::from_secs(180),
            || (self.forwarded.load(Ordering::SeqCst) >= n).then_some(()),
        );
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// The `even` pool's expected rows: `all`'s rows of even videos.
pub fn with_even_pool(want: &mut BTreeMap<String, Vec<Value>>) {
    let rows = want["pool_consumption_1m"].clone();
    let even: Vec<Value> = rows
        .iter()
        .filter(|r| {
            r["video_id"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .is_ok_and(|v| v % 2 == 0)
        })
        .map(|r| {
            let mut r = r.clone();
            r["pool"] = Value::from("even");
            r
        })
        .collect();
    assert!(!even.is_empty());
    want.get_mut("pool_consumption_1m").unwrap().extend(even);
}

pub fn wait_events(env: &Env, n: i64) {
    wait_for(
        &format!("{n} events in {EVENTS}"),
        Duration::from_secs(180),
        || (env.count(EVENTS) >= n).then_some(()),
    );
}
