//! End-to-end tests of vidpulse-monitor and `vidpulse pool` on the real
//! broker and Redis (scripts/stack up): pool edits while running, no false
//! negatives before a pool is loaded, bucketed pools split across instances,
//! graceful rescaling without loss or duplicates, kill -9 without loss,
//! Redis outages, and the partition-count check. Times are printed, never
//! asserted.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::Value;
use vidpulse_e2e::*;
use vidpulse_monitor::pool::partition_for;
use vidpulse_proto::{Event, Message as _, VideoPlayed, event};

const MONITORED: &str = "vp.monitored.v1";
const EVENTS: &str = "vp.events.v1";
const PARTITIONS: i32 = 8;

/// A video play by `user` of `video` (by `author`), keyed like ingest keys it.
fn play(id: &str, video: &str, author: &str, user: &str) -> (String, Vec<u8>) {
    let e = Event {
        event_id: id.into(),
        event_time_ms: 1_700_000_000_000,
        ingest_time_ms: 1_700_000_000_000,
        schema_version: 1,
        video_id: video.into(),
        author_id: author.into(),
        user_id: user.into(),
        payload: Some(event::Payload::VideoPlayed(VideoPlayed {
            watch_ms: Some(1000),
        })),
        ..Default::default()
    };
    (e.subject_key().to_owned(), e.encode_to_vec())
}

/// An idempotent producer (like the stages'): a retried batch is not
/// appended twice, so the input holds each event once. Tests still compare
/// the output with the input, in case a broker does not deduplicate.
fn producer() -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

/// Event id → how many times it is in `vp.events.v1`.
fn input_counts(env: &Env) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for r in env.tail_all(EVENTS) {
        if let Some(id) = r["value"]["event_id"].as_str() {
            *n.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    n
}

/// The monitor produced each event as many times as it is in the input.
fn assert_no_added_duplicates(env: &Env, out: &HashMap<String, usize>) {
    let input = input_counts(env);
    for (id, c) in out {
        assert_eq!(Some(c), input.get(id), "{id}: copies out vs. in");
    }
}

fn produce_events(env: &Env, events: &[(String, Vec<u8>)]) {
    let p = producer();
    let topic = env.topic(EVENTS);
    for (k, v) in events {
        let mut r: BaseRecord<'_, str, [u8]> =
            BaseRecord::to(&topic).key(k.as_str()).payload(v.as_slice());
        loop {
            match p.send(r) {
                Ok(()) => break,
                Err((_, back)) => {
                    r = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    p.flush(Duration::from_secs(60)).unwrap();
}

/// The monitored records: event id → how many times, and the last record.
fn monitored(env: &Env) -> (HashMap<String, usize>, HashMap<String, Value>) {
    let mut n = HashMap::new();
    let mut last = HashMap::new();
    for r in env.tail_all(MONITORED) {
        let id = r["value"]["event"]["event_id"].as_str().unwrap().to_owned();
        *n.entry(id.clone()).or_insert(0) += 1;
        last.insert(id, r);
    }
    (n, last)
}

/// Starts a monitor with Redis key patterns under this test's prefix.
fn monitor(env: &Env, port: u16, log: &str, extra: &[&str]) -> Proc {
    let room = format!("{}room:{{id}}", env.prefix);
    let anchor = format!("{}anchor:{{id}}", env.prefix);
    let viewer = format!("{}viewer:{{id}}", env.prefix);
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--admin-addr",
        &addr,
        "--room-key",
        &room,
        "--anchor-key",
        &anchor,
        "--viewer-key",
        &viewer,
    ];
    args.extend_from_slice(extra);
    env.spawn("vidpulse-monitor", &args, log)
}

fn redis_conn() -> redis::Connection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_connection()
        .unwrap()
}

fn hset(key: &str, fields: &[(&str, &str)]) {
    let mut c = redis_conn();
    let mut cmd = redis::cmd("HSET");
    cmd.arg(key);
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    let _: i64 = cmd.query(&mut c).unwrap();
    let _: i64 = redis::cmd("EXPIRE")
        .arg(key)
        .arg(3600)
        .query(&mut c)
        .unwrap();
}

/// Waits until the monitor has read and decided `n` events in total
/// (passed + filtered).
fn wait_received(port: u16, n: f64) -> BTreeMap<String, f64> {
    wait_for(
        &format!("monitor to handle {n} events"),
        Duration::from_secs(120),
        || {
            let m = metrics(port);
            let decided = prom_sum(&m, "vidpulse_monitor_events_filtered_total", &[])
                + prom_sum(&m, "vidpulse_monitor_events_passed_total", &[]);
            (decided >= n).then_some(m)
        },
    )
}

#[test]
fn pool_edits_apply_while_running_and_matches_are_enriched() {
    let env = Env::new("medit");
    env.create_topics();
    env.ctl(&["pool", "create", "vids", "--match", "video_id"]);
    env.ctl(&[
        "pool",
        "create",
        "rooms",
        "--match",
        "room_id",
        "--kinds",
        "gift_sent",
    ]);
    env.ctl(&["pool", "add", "rooms", "r1"]);
    hset(
        &format!("{}viewer:u1", env.prefix),
        &[("gender", "f"), ("age", "18-23")],
    );
    hset(&format!("{}anchor:a1", env.prefix), &[("name", "Bob")]);
    hset(&format!("{}anchor:a2", env.prefix), &[("name", "Ann")]);
    // As dim-builder writes it (docs/dims.md): `_` fields are bookkeeping.
    hset(
        &format!("{}room:r1", env.prefix),
        &[
            ("type", "game"),
            ("title", "t"),
            ("anchor_id", "a2"),
            ("module_id", "1001"),
            ("status", "live"),
            ("_v", "1"),
        ],
    );
    let port = free_port();
    let mut mon = monitor(&env, port, "monitor.log", &[]);

    // Not in the pool: filtered.
    produce_events(&env, &[play("pre-1", "v1", "a1", "u1")]);
    wait_for(
        "the first event to be filtered",
        Duration::from_secs(60),
        || {
            (prom_sum(
                &metrics(port),
                "vidpulse_monitor_events_filtered_total",
                &[],
            ) == 1.0)
                .then_some(())
        },
    );

    // Added while running: matched on the next events.
    env.ctl(&["pool", "add", "vids", "v1"]);
    let added = Instant::now();
    let mut sent = 1.0;
    let mut k = 0;
    let hit = wait_for("an added id to match", Duration::from_secs(60), || {
        k += 1;
        produce_events(&env, &[play(&format!("add-{k}"), "v1", "a1", "u1")]);
        sent += 1.0;
        wait_received(port, sent);
        std::thread::sleep(Duration::from_millis(100));
        let (_, last) = monitored(&env);
        last.into_values().next()
    });
    eprintln!(
        "added id matched after {:.2} s ({k} probes)",
        added.elapsed().as_secs_f64()
    );
    let v = &hit["value"];
    assert_eq!(v["pools"], serde_json::json!(["vids"]));
    assert_eq!(v["enrichment"]["viewer.gender"], "f", "{v}");
    assert_eq!(v["enrichment"]["viewer.age"], "18-23");
    assert_eq!(
        v["enrichment"]["anchor.name"], "Bob",
        "author = anchor without a room"
    );
    assert_eq!(v["event"]["kind"], "video_played");
    assert_eq!(hit["key"], "v1", "key unchanged");
    assert_eq!(hit["headers"]["vp.kind"], "video_played");
    let p = partition_for(b"v1", PARTITIONS) as i64;
    assert_eq!(hit["partition"], p, "co-partitioned with the input");

    // Removed while running: stops matching.
    env.ctl(&["pool", "rm", "vids", "v1"]);
    let removed = Instant::now();
    let mut probes = 0;
    wait_for(
        "a removed id to stop matching",
        Duration::from_secs(60),
        || {
            probes += 1;
            let before = prom_sum(
                &metrics(port),
                "vidpulse_monitor_events_filtered_total",
                &[],
            );
            produce_events(&env, &[play(&format!("rm-{probes}"), "v1", "a1", "u1")]);
            sent += 1.0;
            let m = wait_received(port, sent);
            (prom_sum(&m, "vidpulse_monitor_events_filtered_total", &[]) > before).then_some(())
        },
    );
    eprintln!(
        "removed id stopped matching after {:.2} s ({probes} probes)",
        removed.elapsed().as_secs_f64()
    );
    // From then on, never again.
    let tail: Vec<_> = (0..20)
        .map(|i| play(&format!("after-{i}"), "v1", "a1", "u1"))
        .collect();
    produce_events(&env, &tail);
    sent += 20.0;
    wait_received(port, sent);
    let m = wait_for("acks", Duration::from_secs(30), || {
        let m = metrics(port);
        (prom_sum(&m, "vidpulse_records_in_flight", &[]) == 0.0).then_some(m)
    });
    let (n, _) = monitored(&env);
    assert!(n.keys().all(|id| !id.starts_with("after-")), "{n:?}");
    assert_no_added_duplicates(&env, &n);
    assert_eq!(
        prom_sum(
            &m,
            "vidpulse_records_produced_total",
            &[&format!("topic=\"{}\"", env.topic(MONITORED))]
        ),
        n.len() as f64
    );

    // A pool on rooms, for gifts only: the room, its anchor (from the room
    // hash), its module and the viewer are joined in.
    let gift = Event {
        event_id: "gift-1".into(),
        event_time_ms: 1_700_000_000_000,
        user_id: "u1".into(),
        room_id: "r1".into(),
        payload: Some(event::Payload::GiftSent(vidpulse_proto::GiftSent {
            gift_type: "3".into(),
            amount: 28,
            ip: String::new(),
        })),
        ..Default::default()
    };
    let mut viewer_in_room = gift.clone();
    viewer_in_room.event_id = "arrive-1".into();
    viewer_in_room.payload = Some(event::Payload::ViewerArrived(Default::default()));
    produce_events(
        &env,
        &[
            (gift.subject_key().to_owned(), gift.encode_to_vec()),
            (
                viewer_in_room.subject_key().to_owned(),
                viewer_in_room.encode_to_vec(),
            ),
        ],
    );
    sent += 2.0;
    wait_received(port, sent);
    let last = wait_for("the gift to come out", Duration::from_secs(30), || {
        let (_, last) = monitored(&env);
        last.get("gift-1").cloned()
    });
    let e = &last["value"]["enrichment"];
    assert_eq!(last["value"]["pools"], serde_json::json!(["rooms"]));
    assert_eq!(e["room.type"], "game", "{e}");
    assert_eq!(e["room.status"], "live");
    assert_eq!(e["module_id"], "1001");
    assert_eq!(e["anchor.name"], "Ann", "anchor from the room hash");
    assert_eq!(e["viewer.age"], "18-23");
    assert!(
        e.get("room._v").is_none(),
        "bookkeeping fields are left out: {e}"
    );
    let (n, _) = monitored(&env);
    assert!(
        !n.contains_key("arrive-1"),
        "kind not covered by the rooms pool"
    );

    assert_eq!(http_get(port, "/readyz").unwrap().0, 200);
    assert!(mon.terminate(), "monitor drains and exits 0 on SIGTERM");
}

/// Ids v-0 … v-(n-1), written to a file for `pool import`.
fn id_file(env: &Env, n: usize) -> String {
    let path = scratch(&env.prefix).join("ids.txt");
    let mut s = String::with_capacity(n * 10);
    for i in 0..n {
        s.push_str(&format!("v-{i}\n"));
    }
    std::fs::write(&path, s).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn events_waiting_before_a_bucketed_pool_is_loaded_are_not_dropped() {
    let env = Env::new("mload");
    env.create_topics();
    env.ctl(&[
        "pool", "create", "big", "--match", "video_id", "--mode", "bucketed",
    ]);
    let n = 200_000;
    let file = id_file(&env, n);
    env.ctl(&["pool", "import", "big", "--file", &file]);
    // Events for the ids written last (the end of every pool partition) and
    // for non-members, all waiting before the monitor starts.
    let mut events = Vec::new();
    for i in (n - 3000)..n {
        events.push(play(&format!("in-{i}"), &format!("v-{i}"), "", ""));
    }
    for i in 0..3000 {
        events.push(play(&format!("out-{i}"), &format!("x-{i}"), "", ""));
    }
    // Not a canonical event: dead-lettered, the rest goes on.
    events.push(("junk".to_owned(), b"\xff not protobuf".to_vec()));
    produce_events(&env, &events);

    let port = free_port();
    let mut mon = monitor(&env, port, "monitor.log", &["--no-enrich"]);
    wait_received(port, 6000.0);
    let dlq = wait_for(
        "the junk record in the DLQ",
        Duration::from_secs(60),
        || {
            let d = env.tail_all("vp.dlq.v1");
            (!d.is_empty()).then_some(d)
        },
    );
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["headers"]["vp.reason"], "invalid_event");
    assert_eq!(dlq[0]["headers"]["vp.stage"], "monitor");
    assert_eq!(dlq[0]["key"], "junk");
    let m = wait_for(
        "all 3000 matches acknowledged",
        Duration::from_secs(60),
        || {
            let m = metrics(port);
            (prom_sum(
                &m,
                "vidpulse_records_produced_total",
                &["stage=\"monitor\""],
            ) >= 3000.0)
                .then_some(m)
        },
    );
    assert_eq!(
        prom_sum(&m, "vidpulse_monitor_events_filtered_total", &[]),
        3000.0
    );
    assert_eq!(
        prom_sum(&m, "vidpulse_monitor_pool_ids", &["pool=\"big\""]),
        n as f64
    );
    let (got, _) = monitored(&env);
    assert_eq!(got.len(), 3000);
    assert!(got.keys().all(|id| id.starts_with("in-")));
    assert_no_added_duplicates(&env, &got);
    assert!(mon.terminate());
}

/// Produces `total` events at about `rate`/s in a thread: every other one
/// for a pool member. Returns the ids that must come out.
struct Feed {
    handle: Option<std::thread::JoinHandle<BTreeSet<String>>>,
    sent: Arc<AtomicU64>,
}

impl Feed {
    fn start(env: &Env, tag: &str, total: u64, rate: u64, members: usize) -> Feed {
        let sent = Arc::new(AtomicU64::new(0));
        let s = sent.clone();
        let p = producer();
        let topic = env.topic(EVENTS);
        let tag = tag.to_owned();
        let handle = std::thread::spawn(move || {
            let mut want = BTreeSet::new();
            let started = Instant::now();
            for i in 0..total {
                let (id, video) = if i % 2 == 0 {
                    let v = format!("v-{}", (i as usize * 7919) % members);
                    let id = format!("{tag}-in-{i}");
                    want.insert(id.clone());
                    (id, v)
                } else {
                    (format!("{tag}-out-{i}"), format!("x-{i}"))
                };
                let (k, v) = play(&id, &video, "", "");
                let mut r: BaseRecord<'_, str, [u8]> =
                    BaseRecord::to(&topic).key(k.as_str()).payload(v.as_slice());
                loop {
                    match p.send(r) {
                        Ok(()) => break,
                        Err((_, back)) => {
                            r = back;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
                s.fetch_add(1, Ordering::Relaxed);
                let due = Duration::from_secs_f64((i + 1) as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            p.flush(Duration::from_secs(60)).unwrap();
            want
        });
        Feed {
            handle: Some(handle),
            sent,
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn join(&mut self) -> BTreeSet<String> {
        self.handle.take().unwrap().join().unwrap()
    }
}

/// Partitions whose bucket an instance holds (loaded) → ids held.
fn held(port: u16, pool: &str) -> BTreeMap<i32, f64> {
    let m = metrics(port);
    let mut out = BTreeMap::new();
    for p in 0..PARTITIONS {
        let labels = [format!("pool=\"{pool}\""), format!("partition=\"{p}\"")];
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        if prom_sum(&m, "vidpulse_monitor_pool_loaded", &l) == 1.0 {
            out.insert(p, prom_sum(&m, "vidpulse_monitor_pool_ids", &l));
        }
    }
    out
}

fn expected_buckets(members: usize) -> BTreeMap<i32, f64> {
    let mut out: BTreeMap<i32, f64> = (0..PARTITIONS).map(|p| (p, 0.0)).collect();
    for i in 0..members {
        *out.get_mut(&partition_for(format!("v-{i}").as_bytes(), PARTITIONS))
            .unwrap() += 1.0;
    }
    out
}

fn wait_all_out(env: &Env, want: &BTreeSet<String>) -> HashMap<String, usize> {
    wait_for(
        &format!("{} monitored events", want.len()),
        Duration::from_secs(180),
        || {
            let (n, _) = monitored(env);
            want.iter().all(|id| n.contains_key(id)).then_some(n)
        },
    )
}

#[test]
fn bucketed_pool_splits_across_instances_and_rescales_1_2_1_without_loss_or_duplicates() {
    let env = Env::new("mscale");
    env.create_topics();
    env.ctl(&[
        "pool", "create", "big", "--match", "video_id", "--mode", "bucketed",
    ]);
    let members = 40_000;
    let file = id_file(&env, members);
    env.ctl(&["pool", "import", "big", "--file", &file]);
    let expect = expected_buckets(members);

    let (pa, pb) = (free_port(), free_port());
    let mut a = monitor(&env, pa, "monitor-a.log", &[]);
    wait_for(
        "instance A to hold every bucket",
        Duration::from_secs(60),
        || (held(pa, "big") == expect).then_some(()),
    );

    let total = 24_000;
    let mut feed = Feed::start(&env, "s", total, 1500, members);
    wait_for("a quarter of the feed", Duration::from_secs(60), || {
        (feed.sent() > total / 4).then_some(())
    });
    let mut b = monitor(&env, pb, "monitor-b.log", &[]);
    // Each holds only its partitions' ids, together all of them.
    let (ha, hb) = wait_for(
        "the buckets to split between A and B",
        Duration::from_secs(90),
        || {
            let (ha, hb) = (held(pa, "big"), held(pb, "big"));
            let split = !ha.is_empty()
                && !hb.is_empty()
                && ha.keys().all(|p| !hb.contains_key(p))
                && ha.len() + hb.len() == PARTITIONS as usize
                && ha.iter().chain(&hb).all(|(p, n)| *n == expect[p]);
            split.then_some((ha, hb))
        },
    );
    for (p, n) in ha.iter().chain(&hb) {
        assert_eq!(*n, expect[p], "bucket {p} holds exactly its ids");
    }
    let (sa, sb): (f64, f64) = (ha.values().sum(), hb.values().sum());
    assert_eq!(sa + sb, members as f64);
    assert!(sa < members as f64 && sb < members as f64);
    eprintln!(
        "split: A holds {:?} ({sa} ids), B holds {:?} ({sb} ids)",
        ha.keys(),
        hb.keys()
    );

    wait_for(
        "three quarters of the feed",
        Duration::from_secs(60),
        || (feed.sent() > total * 3 / 4).then_some(()),
    );
    assert!(b.terminate(), "B drains and exits 0 (scale 2 → 1)");
    let want = feed.join();
    let n = wait_all_out(&env, &want);
    wait_for(
        "A to hold every bucket again",
        Duration::from_secs(60),
        || (held(pa, "big") == expect).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(2));
    let (n2, _) = monitored(&env);
    // Duplicates the monitor added: more copies out than in.
    let input = input_counts(&env);
    let dups: Vec<_> = n2
        .iter()
        .filter(|(id, c)| **c > input.get(*id).copied().unwrap_or(0))
        .collect();
    assert!(
        dups.is_empty(),
        "graceful rescale duplicated {} events: {:?}",
        dups.len(),
        &dups[..dups.len().min(5)]
    );
    let got: BTreeSet<String> = n2.keys().cloned().collect();
    assert_eq!(got, want, "exactly the matching events, none lost");
    assert_eq!(n.len(), want.len());
    assert!(a.terminate());
}

#[test]
fn kill_9_of_one_bucketed_instance_loses_nothing() {
    let env = Env::new("mkill");
    env.create_topics();
    env.ctl(&[
        "pool", "create", "big", "--match", "video_id", "--mode", "bucketed",
    ]);
    let members = 20_000;
    let file = id_file(&env, members);
    env.ctl(&["pool", "import", "big", "--file", &file]);
    let (pa, pb) = (free_port(), free_port());
    let mut a = monitor(&env, pa, "monitor-a.log", &[]);
    let mut b = monitor(&env, pb, "monitor-b.log", &[]);
    wait_for(
        "two instances sharing the buckets",
        Duration::from_secs(90),
        || {
            let (ha, hb) = (held(pa, "big"), held(pb, "big"));
            (!ha.is_empty() && !hb.is_empty() && ha.len() + hb.len() == PARTITIONS as usize)
                .then_some(())
        },
    );
    let total = 16_000;
    let mut feed = Feed::start(&env, "k", total, 2000, members);
    wait_for("half of the feed", Duration::from_secs(60), || {
        (feed.sent() > total / 2).then_some(())
    });
    b.kill9();
    let want = feed.join();
    let n = wait_all_out(&env, &want);
    let got: BTreeSet<String> = n.keys().cloned().collect();
    assert_eq!(got, want, "nothing lost, nothing extra");
    let dups: usize = n.values().map(|c| c - 1).sum();
    eprintln!("kill -9: {dups} events produced twice (allowed: at-least-once)");
    assert!(a.terminate());
}

#[test]
fn redis_outage_stops_consumption_and_loses_nothing() {
    let env = Env::new("mredis");
    env.create_topics();
    env.ctl(&["pool", "create", "vids", "--match", "video_id"]);
    env.ctl(&["pool", "add", "vids", "v1", "v2"]);
    let redis_port = free_port();
    let url = format!("redis://127.0.0.1:{redis_port}");
    let port = free_port();
    let mut mon = monitor(
        &env,
        port,
        "monitor.log",
        &["--redis-url", &url, "--max-backoff", "500ms"],
    );
    let events: Vec<_> = (0..50)
        .map(|i| {
            play(
                &format!("r-{i}"),
                if i % 2 == 0 { "v1" } else { "v2" },
                "a1",
                "u1",
            )
        })
        .collect();
    produce_events(&env, &events);
    // Redis is down: not ready, nothing produced, nothing committed.
    wait_for(
        "/readyz to report Redis down",
        Duration::from_secs(60),
        || {
            http_get(port, "/readyz")
                .filter(|(s, b)| *s == 503 && b.contains("redis"))
                .map(|_| ())
        },
    );
    assert_eq!(env.count(MONITORED), 0);
    assert!(mon.is_running());
    // Redis comes up: everything arrives, once.
    let dir = scratch(&env.prefix).join("redis");
    std::fs::create_dir_all(&dir).unwrap();
    let log = std::fs::File::create(dir.join("redis.log")).unwrap();
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &redis_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("redis-server on PATH (scripts/stack installs it)");
    let _redis = KillOnDrop(child);
    let n = wait_for(
        "all 50 events after Redis came up",
        Duration::from_secs(60),
        || {
            let (n, _) = monitored(&env);
            (n.len() == 50).then_some(n)
        },
    );
    assert_no_added_duplicates(&env, &n);
    wait_for("/readyz to recover", Duration::from_secs(30), || {
        (http_get(port, "/readyz").map(|(s, _)| s) == Some(200)).then_some(())
    });
    let m = metrics(port);
    assert!(prom_sum(&m, "vidpulse_monitor_redis_errors_total", &[]) > 0.0);
    assert!(mon.terminate());
}

#[test]
fn bucketed_pool_with_another_partition_count_fails_at_start_saying_why() {
    let env = Env::new("mmis");
    env.create_topics();
    let out = env.run(
        "vidpulse",
        &[
            "pool",
            "create",
            "odd",
            "--match",
            "author_id",
            "--mode",
            "bucketed",
            "--partitions",
            "3",
        ],
    );
    assert!(
        !out.status.success(),
        "pool create refuses a mismatch by itself"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs as many partitions"));
    env.ctl(&[
        "pool",
        "create",
        "odd",
        "--match",
        "author_id",
        "--mode",
        "bucketed",
        "--partitions",
        "3",
        "--force",
    ]);
    let addr = format!("127.0.0.1:{}", free_port());
    let out = env.run("vidpulse-monitor", &["--admin-addr", &addr, "--no-enrich"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bucketed pool odd"), "{err}");
    assert!(err.contains("has 3 partitions"), "{err}");
    assert!(
        err.contains(&format!("{} has 8", env.topic(EVENTS))),
        "{err}"
    );
    assert!(err.contains("--mode broadcast"), "names a fix: {err}");
}

/// Serves `body` to every GET on a loopback port, in a thread; the last
/// request's head goes to `seen`.
fn serve_http(body: Arc<std::sync::Mutex<String>>, seen: Arc<std::sync::Mutex<String>>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match std::io::Read::read(&mut s, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            *seen.lock().unwrap() = String::from_utf8_lossy(&req).into_owned();
            let b = body.lock().unwrap().clone();
            // Chunked, as many servers answer.
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                b.len()
            );
            let _ = std::io::Write::write_all(&mut s, resp.as_bytes());
        }
    });
    port
}

fn members(env: &Env, pool: &str) -> Vec<String> {
    env.ctl(&["pool", "ls", pool])
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn pool_sync_mirrors_a_redis_set_and_an_http_endpoint_writing_only_differences() {
    let env = Env::new("msync");
    env.create_topics();
    env.ctl(&["pool", "create", "ops", "--match", "author_id"]);
    let set = format!("{}ops:authors", env.prefix);
    let mut c = redis_conn();
    let _: i64 = redis::cmd("SADD")
        .arg(&set)
        .arg(&["a1", "a2", "a3"])
        .query(&mut c)
        .unwrap();
    let out = env.ctl(&["pool", "sync", "ops", "--redis-set", &set, "--once"]);
    assert!(out.contains("+3 -0"), "{out}");
    assert_eq!(members(&env, "ops"), vec!["a1", "a2", "a3"]);
    let _: i64 = redis::cmd("SREM")
        .arg(&set)
        .arg("a2")
        .query(&mut c)
        .unwrap();
    let _: i64 = redis::cmd("SADD")
        .arg(&set)
        .arg("a4")
        .query(&mut c)
        .unwrap();
    let before = env.count("vp.pool.ops.v1");
    let out = env.ctl(&["pool", "sync", "ops", "--redis-set", &set, "--once"]);
    assert!(out.contains("+1 -1"), "only the differences: {out}");
    assert_eq!(
        env.count("vp.pool.ops.v1"),
        before + 2,
        "two records written"
    );
    assert_eq!(members(&env, "ops"), vec!["a1", "a3", "a4"]);
    let _: i64 = redis::cmd("DEL").arg(&set).query(&mut c).unwrap();

    // HTTP: a JSON array, then lines; an empty answer removes nothing.
    let body = Arc::new(std::sync::Mutex::new(r#"["a3", 42, "a9"]"#.to_owned()));
    let seen = Arc::new(std::sync::Mutex::new(String::new()));
    let url = format!(
        "http://127.0.0.1:{}/ids",
        serve_http(body.clone(), seen.clone())
    );
    // A token from the environment goes out as a header.
    let out = env
        .cmd("vidpulse")
        .env("VIDPULSE_POOL_HTTP_HEADER", "Authorization: Bearer t0ken-9")
        .args(["pool", "sync", "ops", "--http", &url, "--once"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("+2 -2"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = seen.lock().unwrap().to_ascii_lowercase();
    assert!(head.contains("authorization: bearer t0ken-9"), "{head}");
    assert_eq!(members(&env, "ops"), vec!["42", "a3", "a9"]);
    *body.lock().unwrap() = "a9\n# comment\n\nb1\n".to_owned();
    env.ctl(&["pool", "sync", "ops", "--http", &url, "--once"]);
    assert_eq!(members(&env, "ops"), vec!["a9", "b1"]);
    body.lock().unwrap().clear();
    let out = env.run(
        "vidpulse",
        &["pool", "sync", "ops", "--http", &url, "--once"],
    );
    assert!(!out.status.success(), "an empty source is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-empty"));
    assert_eq!(
        members(&env, "ops"),
        vec!["a9", "b1"],
        "pool left as it was"
    );
    assert_eq!(env.ctl(&["pool", "ls", "ops", "--count"]).trim(), "2");
}
