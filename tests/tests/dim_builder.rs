//! End-to-end tests of the dim-builder stage and the T+1 loader on the real
//! stack (scripts/stack up): the Lua scripts agree with the Rust model on
//! random histories; the stage builds room hashes with the seed's TTLs and
//! is replay- and order-safe; a Redis outage mid-run loses nothing; the
//! loader never overwrites newer live fields and reports bad rows.
//!
//! Every test uses its own topic prefix and Redis key prefix; the outage
//! test runs a private Redis (started by scripts/stack on another port) so
//! stopping it disturbs no one.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use rdkafka::producer::{BaseRecord, Producer};
use serde_json::Value;
use vidpulse_dim_builder::load::{self, DimKind, Format, LoadSettings, Rows};
use vidpulse_dim_builder::model::{self, KeyState, LoadRow, Ttl, Ttls};
use vidpulse_dim_builder::plan::{Lifecycle, Op, ROOM_SHARED, VIEWER_SHARED};
use vidpulse_dim_builder::store::{self, Store};
use vidpulse_e2e::*;
use vidpulse_proto::{
    Event, LiveRoomEnded, LiveRoomStarted, Message, PlayRequested, Room, Viewer, ViewerArrived,
    event::Payload,
};

const EVENTS: &str = "vp.events.v1";
const DAY_MS: i64 = 86_400_000;
const TTLS: Ttls = Ttls {
    live_ms: 30 * DAY_MS,
    ended_ms: 2 * DAY_MS,
    profile_ms: 10 * DAY_MS,
};

fn redis(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

fn hgetall(con: &mut redis::Connection, key: &str) -> BTreeMap<String, String> {
    redis::cmd("HGETALL").arg(key).query(con).unwrap()
}

fn pttl(con: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query(con).unwrap()
}

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Asserts Redis holds what the model says, TTL within two minutes.
fn assert_same(con: &mut redis::Connection, key: &str, want: &KeyState, ctx: &str) {
    assert_eq!(hgetall(con, key), want.fields, "{ctx}: fields of {key}");
    let got = pttl(con, key);
    match want.ttl {
        Ttl::Absent => assert_eq!(got, -2, "{ctx}: {key} should not exist"),
        Ttl::Persistent => assert_eq!(got, -1, "{ctx}: {key} should have no TTL"),
        Ttl::Ms(ms) => assert!(
            got <= ms && got > ms - 120_000,
            "{ctx}: TTL of {key} is {got} ms, model says {ms}"
        ),
    }
}

#[test]
fn lua_scripts_agree_with_the_model_on_random_histories() {
    let env = Env::new("dimmodel");
    let url = redis_url();
    let mut con = redis(&url);
    let rt = rt();
    let mut store = Store::open(&url, false, Duration::from_secs(10), Default::default()).unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let titles = ["A", "B", "C"];
    for trial in 0..150 {
        let room_key = format!("{}room:{trial}", env.prefix);
        let viewer_key = format!("{}viewer:{trial}", env.prefix);
        let mut room = KeyState::default();
        let mut viewer = KeyState::default();
        let mut history = Vec::new();
        for step in 0..10 {
            let t = 1_000_000 + rng.below(8) as i64 * 1000;
            let what = rng.below(10);
            let ctx = format!("trial {trial} step {step}: {history:?}");
            if what < 6 {
                // A room start or end; some carry a module, some repeat.
                let lifecycle = if rng.below(2) == 0 {
                    Lifecycle::Started
                } else {
                    Lifecycle::Ended
                };
                let mut profile = vec![("type", "game".to_owned())];
                profile.push(("title", titles[rng.below(3) as usize].to_owned()));
                if rng.below(2) == 0 {
                    profile.push(("module_id", format!("m{}", rng.below(3))));
                }
                let op = Op::Room {
                    key: room_key.clone(),
                    lifecycle,
                    time_ms: t,
                    event_id: format!("e{t}{}", rng.below(3)),
                    profile,
                };
                history.push(format!("{lifecycle:?}@{t}"));
                let mut pipe = redis::pipe();
                store::push_op(&mut pipe, &op, &TTLS);
                let replies = rt.block_on(store.run(&pipe)).unwrap();
                let changed = model::apply(&mut room, &op, &TTLS);
                assert_eq!(replies, vec![redis::Value::Int(changed.into())], "{ctx}");
                assert_same(&mut con, &room_key, &room, &ctx);
            } else if what < 8 {
                let op = Op::Profile {
                    key: viewer_key.clone(),
                    time_ms: t,
                    event_id: format!("v{t}"),
                    fields: vec![
                        (
                            "province",
                            ["浙江", "江苏"][rng.below(2) as usize].to_owned(),
                        ),
                        ("grade", (1 + rng.below(5)).to_string()),
                    ],
                };
                history.push(format!("viewer@{t}"));
                let mut pipe = redis::pipe();
                store::push_op(&mut pipe, &op, &TTLS);
                rt.block_on(store.run(&pipe)).unwrap();
                model::apply(&mut viewer, &op, &TTLS);
                assert_same(&mut con, &viewer_key, &viewer, &ctx);
            } else {
                // A T+1 row, for the room (module map) or the viewer.
                let as_of = t + [-500, 0, 500][rng.below(3) as usize];
                let ttl_ms = [0, 3 * DAY_MS, 40 * DAY_MS][rng.below(3) as usize];
                let (kind, key, state, fields) = if what == 8 {
                    let m = format!("load{}", rng.below(3));
                    (
                        DimKind::RoomModule,
                        &room_key,
                        &mut room,
                        vec![("module_id".to_owned(), m)],
                    )
                } else {
                    let p = ["上海", "北京"][rng.below(2) as usize].to_owned();
                    (
                        DimKind::Viewer,
                        &viewer_key,
                        &mut viewer,
                        vec![
                            ("province".to_owned(), p),
                            ("gender".to_owned(), "f".to_owned()),
                        ],
                    )
                };
                history.push(format!("{kind:?} load as of {as_of} ttl {ttl_ms}"));
                let csv = format!(
                    "id,{}\n{},{}\n",
                    fields
                        .iter()
                        .map(|(k, _)| k.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    key.rsplit(':').next().unwrap(),
                    fields
                        .iter()
                        .map(|(_, v)| v.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                );
                let settings = LoadSettings {
                    kind,
                    key_prefix: key[..key.rfind(':').unwrap() + 1].to_owned(),
                    as_of_ms: as_of,
                    ttl_ms,
                    chunk: 10,
                    rows_per_call: 10,
                    in_flight: 1,
                    strict: true,
                    retries: 0,
                };
                let mut rows = Rows::new(kind, Format::Csv, csv.as_bytes()).unwrap();
                let summary = rt
                    .block_on(load::load(&mut store, &settings, &mut rows, &mut |_| {}))
                    .unwrap();
                let (wrote, kept) = model::apply_load(
                    state,
                    &LoadRow {
                        as_of_ms: as_of,
                        ttl_ms,
                        room: kind == DimKind::RoomModule,
                        shared: if kind == DimKind::RoomModule {
                            ROOM_SHARED
                        } else {
                            VIEWER_SHARED
                        },
                        fields,
                    },
                );
                assert_eq!(
                    (summary.loaded, summary.fields_kept),
                    (u64::from(wrote), kept as u64),
                    "{ctx}"
                );
                assert_same(&mut con, key, state, &ctx);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The stage on handcrafted events.

fn room_event(id: &str, room: &str, start: bool, t: i64, title: &str) -> Event {
    let r = Room {
        r#type: "game".into(),
        client: "android".into(),
        title: title.into(),
        address: "rtmp://live/1".into(),
        anchor_id: "a-77".into(),
        module_id: "1001".into(),
    };
    Event {
        event_id: id.into(),
        event_time_ms: t,
        room_id: room.into(),
        payload: Some(if start {
            Payload::LiveRoomStarted(LiveRoomStarted { room: Some(r) })
        } else {
            Payload::LiveRoomEnded(LiveRoomEnded { room: Some(r) })
        }),
        schema_version: 1,
        ..Default::default()
    }
}

/// Produces records to `vp.events.v1` under `env`'s prefix, in order.
fn produce(env: &Env, records: &[(String, Vec<u8>)]) {
    let p = env.producer();
    let topic = env.topic(EVENTS);
    for (k, v) in records {
        p.send(BaseRecord::to(&topic).key(k.as_str()).payload(v.as_slice()))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

fn ev(e: &Event) -> (String, Vec<u8>) {
    let key = if e.room_id.is_empty() {
        e.user_id.clone()
    } else {
        e.room_id.clone()
    };
    (key, e.encode_to_vec())
}

/// Waits until the stage has handled `n` events (any outcome).
fn wait_handled(port: u16, n: f64, timeout: Duration) -> BTreeMap<String, f64> {
    wait_for(
        &format!("{n} events handled by the dim-builder"),
        timeout,
        || {
            let m = metrics(port);
            (prom_sum(&m, "vidpulse_dim_events_total", &[]) >= n).then_some(m)
        },
    )
}

#[test]
fn stage_keeps_room_hashes_with_ttls_replay_and_order_safe() {
    let env = Env::new("dimstage");
    env.create_topics();
    let rp = format!("{}room:", env.prefix);
    let vp = format!("{}viewer:", env.prefix);
    let t0 = 1_629_075_600_000; // 2021-08-16 09:00 +08:00
    let m = 60_000;
    let mut records = vec![
        // live: one start.
        ev(&room_event("a1", "r-live", true, t0, "live one")),
        // ended: start, end.
        ev(&room_event("b1", "r-ended", true, t0, "b")),
        ev(&room_event("b2", "r-ended", false, t0 + 10 * m, "b")),
        // replay: start, end, the start again (same event).
        ev(&room_event("c1", "r-replay", true, t0, "c")),
        ev(&room_event("c2", "r-replay", false, t0 + 10 * m, "c")),
        ev(&room_event("c1", "r-replay", true, t0, "c")),
        // two starts out of order: the newer fields win.
        ev(&room_event("d2", "r-order", true, t0 + 5 * m, "newer")),
        ev(&room_event("d1", "r-order", true, t0, "older")),
        // end delivered before its start.
        ev(&room_event("e2", "r-endfirst", false, t0 + 10 * m, "e")),
        ev(&room_event("e1", "r-endfirst", true, t0, "e")),
        // a new stream after an end revives the room.
        ev(&room_event("f1", "r-again", true, t0, "first")),
        ev(&room_event("f2", "r-again", false, t0 + 10 * m, "first")),
        ev(&room_event("f3", "r-again", true, t0 + 20 * m, "second")),
    ];
    let viewer = Event {
        event_id: "v1".into(),
        event_time_ms: t0,
        user_id: "3165".into(),
        room_id: "r-live".into(),
        payload: Some(Payload::ViewerArrived(ViewerArrived {
            viewer: Some(Viewer {
                province: "浙江".into(),
                region: "1122".into(),
                grade: 3,
                ip: "123.0.0.105".into(),
            }),
        })),
        ..Default::default()
    };
    records.push(ev(&viewer));
    let other = Event {
        event_id: "p1".into(),
        event_time_ms: t0,
        video_id: "v-9".into(),
        payload: Some(Payload::PlayRequested(PlayRequested {})),
        ..Default::default()
    };
    records.push(("v-9".into(), other.encode_to_vec()));
    records.push(("junk".into(), b"\xff\xfe not protobuf".to_vec()));
    let total = records.len() as f64;
    produce(&env, &records);

    let port = free_port();
    let admin = format!("127.0.0.1:{port}");
    let mut stage = env.spawn(
        "vidpulse-dim-builder",
        &[
            "--admin-addr",
            &admin,
            "--key-prefix",
            &rp,
            "--viewer-key-prefix",
            &vp,
        ],
        "dim-builder.log",
    );
    let m_after = wait_handled(port, total, Duration::from_secs(120));
    assert_eq!(readyz(port), Some(200));

    let mut con = redis(&redis_url());
    let live = hgetall(&mut con, &format!("{rp}r-live"));
    for (k, v) in [
        ("type", "game"),
        ("client", "android"),
        ("title", "live one"),
        ("address", "rtmp://live/1"),
        ("anchor_id", "a-77"),
        ("module_id", "1001"),
        ("status", "live"),
        ("started_at", &t0.to_string()),
        ("_v", &t0.to_string()),
        ("_event_id", "a1"),
    ] {
        assert_eq!(
            live.get(k).map(String::as_str),
            Some(v),
            "r-live {k}: {live:?}"
        );
    }
    assert!(!live.contains_key("ended_at"));
    let day = DAY_MS;
    let ttl = |con: &mut redis::Connection, room: &str| pttl(con, &format!("{rp}{room}"));
    let t = ttl(&mut con, "r-live");
    assert!(t > 29 * day && t <= 30 * day, "live TTL {t}");

    for room in ["r-ended", "r-replay", "r-endfirst"] {
        let h = hgetall(&mut con, &format!("{rp}{room}"));
        assert_eq!(h["status"], "ended", "{room}: {h:?}");
        assert_eq!(h["ended_at"], (t0 + 10 * m).to_string(), "{room}");
        assert_eq!(h["started_at"], t0.to_string(), "{room}");
        let t = ttl(&mut con, room);
        assert!(t > day && t <= 2 * day, "{room} TTL {t}");
    }
    // The end that came first left the start's profile (the start is older
    // but the only one).
    assert_eq!(hgetall(&mut con, &format!("{rp}r-endfirst"))["title"], "e");

    let order = hgetall(&mut con, &format!("{rp}r-order"));
    assert_eq!(order["title"], "newer");
    assert_eq!(order["started_at"], (t0 + 5 * m).to_string());
    assert_eq!(order["_event_id"], "d2");

    let again = hgetall(&mut con, &format!("{rp}r-again"));
    assert_eq!(
        (again["status"].as_str(), again["title"].as_str()),
        ("live", "second")
    );
    let t = ttl(&mut con, "r-again");
    assert!(t > 29 * day, "revived TTL {t}");

    let v = hgetall(&mut con, &format!("{vp}3165"));
    assert_eq!(
        (
            v["province"].as_str(),
            v["region"].as_str(),
            v["grade"].as_str()
        ),
        ("浙江", "1122", "3")
    );
    assert_eq!(v["_v.province"], t0.to_string());

    // Outcomes: 13 room events of which 2 are stale (the replayed start, the
    // older start), the viewer event applied, the play skipped, the junk
    // dead-lettered.
    let count = |labels: &[&str]| prom_sum(&m_after, "vidpulse_dim_events_total", labels);
    assert_eq!(count(&["outcome=\"applied\"", "target=\"room\""]), 11.0);
    assert_eq!(count(&["outcome=\"stale\""]), 2.0);
    assert_eq!(count(&["outcome=\"applied\"", "target=\"viewer\""]), 1.0);
    assert_eq!(count(&["outcome=\"other_kind\""]), 1.0);
    assert_eq!(count(&["outcome=\"failed\""]), 1.0);
    assert!(prom_sum(&m_after, "vidpulse_dim_redis_seconds_count", &[]) >= 1.0);
    let dlq = env.tail_all("vp.dlq.v1");
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["headers"]["vp.reason"], "undecodable");
    assert_eq!(dlq[0]["headers"]["vp.stage"], "dim-builder");

    // Replaying everything (a new consumer group reads from the start)
    // changes nothing, TTLs included.
    let before: Vec<_> = [
        "r-live",
        "r-ended",
        "r-replay",
        "r-order",
        "r-endfirst",
        "r-again",
    ]
    .iter()
    .map(|r| (hgetall(&mut con, &format!("{rp}{r}")), ttl(&mut con, r)))
    .collect();
    assert!(stage.terminate(), "the stage drains and exits 0");
    let port2 = free_port();
    let _replay = env.spawn(
        "vidpulse-dim-builder",
        &[
            "--admin-addr",
            &format!("127.0.0.1:{port2}"),
            "--key-prefix",
            &rp,
            "--viewer-key-prefix",
            &vp,
            "--group",
            "dim-replay",
        ],
        "dim-builder-replay.log",
    );
    let m2 = wait_handled(port2, total, Duration::from_secs(120));
    assert_eq!(
        prom_sum(&m2, "vidpulse_dim_events_total", &["outcome=\"applied\""]),
        0.0
    );
    let after: Vec<_> = [
        "r-live",
        "r-ended",
        "r-replay",
        "r-order",
        "r-endfirst",
        "r-again",
    ]
    .iter()
    .map(|r| (hgetall(&mut con, &format!("{rp}{r}")), ttl(&mut con, r)))
    .collect();
    for ((h1, t1), (h2, t2)) in before.iter().zip(&after) {
        assert_eq!(h1, h2);
        assert!(t2 <= t1, "a replay never extends a TTL ({t1} → {t2})");
    }
}

// ---------------------------------------------------------------------------
// Redis outage in the middle of a run.

#[test]
fn redis_outage_mid_run_loses_nothing() {
    let env = Env::new("dimoutage");
    env.create_topics();
    let redis_srv = PrivateRedis::start(&env);
    let rp = format!("{}room:", env.prefix);
    let vp = format!("{}viewer:", env.prefix);
    let ingest_port = free_port();
    let _ingest = env.spawn(
        "vidpulse-ingest",
        &["--admin-addr", &format!("127.0.0.1:{ingest_port}")],
        "ingest.log",
    );
    let port = free_port();
    let mut stage = env.spawn(
        "vidpulse-dim-builder",
        &[
            "--admin-addr",
            &format!("127.0.0.1:{port}"),
            "--key-prefix",
            &rp,
            "--viewer-key-prefix",
            &vp,
            "--redis-url",
            &redis_srv.url(),
            "--redis-timeout",
            "2s",
            "--max-backoff",
            "1s",
            "--max-batch",
            "200",
        ],
        "dim-builder.log",
    );

    // Phase 1: rooms start (some end) while Redis is up.
    let n1 = dims::gen_rooms(&env, "21", "2021-08-16T01:00:00Z", "3000");
    wait_for("phase 1 events", Duration::from_secs(120), || {
        (env.count(EVENTS) == n1).then_some(())
    });
    wait_handled(port, n1 as f64, Duration::from_secs(120));

    // Phase 2 (new profiles, more starts and ends, later times) arrives
    // while Redis is down: the stage stops, says not ready, and waits.
    redis_srv.stack("stop");
    let n2 = n1 + dims::gen_rooms(&env, "22", "2021-08-16T02:00:00Z", "3000");
    wait_for(
        "/readyz 503 while Redis is down",
        Duration::from_secs(60),
        || (readyz(port) == Some(503)).then_some(()),
    );
    wait_for("phase 2 events", Duration::from_secs(120), || {
        (env.count(EVENTS) == n2).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let down = metrics(port);
    assert_eq!(
        prom_sum(&down, "vidpulse_dim_events_total", &[]),
        n1 as f64,
        "nothing written while down"
    );
    assert!(prom_sum(&down, "vidpulse_sink_errors_total", &[]) >= 1.0);
    assert_eq!(readyz(port), Some(503));
    assert!(stage.is_running());

    // Redis back (with what it had: AOF): the stage resumes by itself.
    redis_srv.stack("start");
    wait_for(
        "/readyz 200 after Redis is back",
        Duration::from_secs(60),
        || (readyz(port) == Some(200)).then_some(()),
    );
    wait_handled(port, n2 as f64, Duration::from_secs(180));
    let total = n2;

    // Every room and viewer hash is exactly what the events say.
    let events = env.tail_all(EVENTS);
    assert_eq!(events.len() as i64, total);
    let (rooms, viewers) = dims::expected_hashes(&events, &rp, &vp);
    assert!(rooms.len() >= 20, "{} rooms", rooms.len());
    assert!(viewers.len() >= 50, "{} viewers", viewers.len());
    let mut con = redis(&redis_srv.url());
    dims::check_hashes(&mut con, &rooms, &viewers);
    // No other keys under the prefixes.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", env.prefix))
        .query(&mut con)
        .unwrap();
    assert_eq!(keys.len(), rooms.len() + viewers.len());

    // Scripts flushed on the server (an operator, a failover): the stage
    // reloads them on NOSCRIPT and goes on.
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut con).unwrap();
    produce(
        &env,
        &[ev(&room_event(
            "z1",
            "r-after-flush",
            true,
            1_629_090_000_000,
            "z",
        ))],
    );
    wait_handled(port, (n2 + 1) as f64, Duration::from_secs(60));
    assert_eq!(
        hgetall(&mut con, &format!("{rp}r-after-flush"))["status"],
        "live"
    );

    // Redis too slow (writes paused longer than --redis-timeout): not
    // ready, retries, then catches up by itself.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(6000)
        .arg("WRITE")
        .query(&mut con)
        .unwrap();
    produce(
        &env,
        &[ev(&room_event(
            "z2",
            "r-after-pause",
            true,
            1_629_090_000_000,
            "z",
        ))],
    );
    wait_for(
        "/readyz 503 while Redis is slow",
        Duration::from_secs(30),
        || (readyz(port) == Some(503)).then_some(()),
    );
    wait_handled(port, (n2 + 2) as f64, Duration::from_secs(60));
    assert_eq!(
        hgetall(&mut con, &format!("{rp}r-after-pause"))["status"],
        "live"
    );
    assert_eq!(readyz(port), Some(200));
    assert!(stage.terminate(), "the stage drains and exits 0");
}

// ---------------------------------------------------------------------------
// The T+1 loader.

fn dims_load(env: &Env, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut c = env.cmd("vidpulse");
    c.args(["dims", "load"])
        .args(args)
        .env("VIDPULSE_REDIS_URL", redis_url());
    if stdin.is_some() {
        c.stdin(Stdio::piped());
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

fn summary(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "dims load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn loader_keeps_newer_live_fields_and_reports_bad_rows() {
    let env = Env::new("dimload");
    let dir = scratch(&env.prefix);
    let url = redis_url();
    let mut con = redis(&url);
    let rt = rt();
    let mut store = Store::open(&url, false, Duration::from_secs(10), Default::default()).unwrap();
    let rp = format!("{}room:", env.prefix);
    let vp = format!("{}viewer:", env.prefix);
    let ap = format!("{}anchor:", env.prefix);
    let snapshot = 1_629_043_200_000; // 2021-08-16 00:00 +08:00
    let as_of = "2021-08-16T00:00:00+08:00";

    // Live data: viewer 1 changed province after the snapshot, viewer 2
    // before it; room r1 started after it with module m-live, r2 before.
    let live = [
        Op::Profile {
            key: format!("{vp}1"),
            time_ms: snapshot + 3_600_000,
            event_id: "x1".into(),
            fields: vec![("province", "浙江".into()), ("grade", "5".into())],
        },
        Op::Profile {
            key: format!("{vp}2"),
            time_ms: snapshot - 3_600_000,
            event_id: "x2".into(),
            fields: vec![("province", "浙江".into())],
        },
        Op::Room {
            key: format!("{rp}r1"),
            lifecycle: Lifecycle::Started,
            time_ms: snapshot + 3_600_000,
            event_id: "x3".into(),
            profile: vec![("title", "t".into()), ("module_id", "m-live".into())],
        },
        Op::Room {
            key: format!("{rp}r2"),
            lifecycle: Lifecycle::Started,
            time_ms: snapshot - 3_600_000,
            event_id: "x4".into(),
            profile: vec![("title", "t".into()), ("module_id", "m-live".into())],
        },
    ];
    let mut pipe = redis::pipe();
    for op in &live {
        store::push_op(&mut pipe, op, &TTLS);
    }
    rt.block_on(store.run(&pipe)).unwrap();
    // A key of another type: its row is reported, the others load.
    let _: () = redis::cmd("SET")
        .arg(format!("{vp}9"))
        .arg("x")
        .query(&mut con)
        .unwrap();

    let viewers = dir.join("viewers.csv");
    std::fs::write(
        &viewers,
        "user_id,province,grade,gender\n\
         1,江苏,1,f\n\
         2,江苏,2,m\n\
         3,上海,3,f\n\
         4,北京\n\
         ,广东,1,m\n\
         9,四川,2,f\n\
         5,,,\n",
    )
    .unwrap();
    let out = dims_load(
        &env,
        &[
            "--kind",
            "viewer",
            "--file",
            viewers.to_str().unwrap(),
            "--key-prefix",
            &vp,
            "--as-of",
            as_of,
            "--ttl",
            "3d",
            "--json",
        ],
        None,
    );
    let s = summary(&out);
    assert_eq!(s["rows"], 3, "{s}");
    assert_eq!(s["loaded"], 3, "{s}");
    assert_eq!(
        s["fields_kept"], 2,
        "viewer 1's province and grade are newer live data: {s}"
    );
    assert_eq!(s["bad"], 4, "{s}");
    let bad: Vec<(i64, String)> = s["bad_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["line"].as_i64().unwrap(),
                b["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        bad.iter().map(|b| b.0).collect::<Vec<_>>(),
        vec![5, 6, 7, 8],
        "{bad:?}"
    );
    assert!(bad[0].1.contains("fields"), "{bad:?}");
    assert!(bad[1].1.contains("no id"), "{bad:?}");
    assert!(bad[2].1.contains("not a hash"), "{bad:?}");

    let v1 = hgetall(&mut con, &format!("{vp}1"));
    assert_eq!(
        (
            v1["province"].as_str(),
            v1["grade"].as_str(),
            v1["gender"].as_str()
        ),
        ("浙江", "5", "f")
    );
    assert_eq!(
        pttl(&mut con, &format!("{vp}1")) / DAY_MS,
        9,
        "a longer live TTL is kept"
    );
    let v2 = hgetall(&mut con, &format!("{vp}2"));
    assert_eq!(
        (v2["province"].as_str(), v2["grade"].as_str()),
        ("江苏", "2"),
        "older live data is replaced"
    );
    assert_eq!(v2["_v.province"], format!("{}.5", snapshot - 1));
    let v3 = hgetall(&mut con, &format!("{vp}3"));
    assert_eq!(v3["province"], "上海");
    let t3 = pttl(&mut con, &format!("{vp}3"));
    assert!(
        t3 > 2 * DAY_MS && t3 <= 3 * DAY_MS,
        "--ttl on a new key: {t3}"
    );

    // Loading the same snapshot again changes no value; an older snapshot
    // changes nothing at all.
    let again = summary(&dims_load(
        &env,
        &[
            "--kind",
            "viewer",
            "--file",
            viewers.to_str().unwrap(),
            "--key-prefix",
            &vp,
            "--as-of",
            as_of,
            "--json",
        ],
        None,
    ));
    assert_eq!(again["fields_kept"], 2, "{again}");
    assert_eq!(hgetall(&mut con, &format!("{vp}3")), v3);
    let older = summary(&dims_load(
        &env,
        &[
            "--kind",
            "viewer",
            "--file",
            viewers.to_str().unwrap(),
            "--key-prefix",
            &vp,
            "--as-of",
            "2021-08-15T00:00:00+08:00",
            "--json",
        ],
        None,
    ));
    assert_eq!(
        (older["loaded"].as_i64(), older["skipped"].as_i64()),
        (Some(0), Some(3)),
        "{older}"
    );

    // The room → module map, JSON lines on stdin: r1's module changed live
    // after the snapshot and is kept; r2's is replaced; r3 is new.
    let out = dims_load(
        &env,
        &[
            "--kind",
            "room-module",
            "--file",
            "-",
            "--format",
            "jsonl",
            "--key-prefix",
            &rp,
            "--as-of",
            as_of,
            "--ttl",
            "7d",
            "--json",
        ],
        Some(
            "{\"room_id\":\"r1\",\"module_id\":\"m-load\"}\n{\"room_id\":\"r2\",\"module_id\":\"m-load\"}\n{\"room_id\":\"r3\",\"module_id\":1003}\n{\"room_id\":\"r4\"}\n",
        ),
    );
    let s = summary(&out);
    assert_eq!(
        (
            s["loaded"].as_i64(),
            s["skipped"].as_i64(),
            s["bad"].as_i64()
        ),
        (Some(2), Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(hgetall(&mut con, &format!("{rp}r1"))["module_id"], "m-live");
    assert_eq!(hgetall(&mut con, &format!("{rp}r2"))["module_id"], "m-load");
    assert_eq!(hgetall(&mut con, &format!("{rp}r3"))["module_id"], "1003");
    assert!(
        pttl(&mut con, &format!("{rp}r2")) > 29 * DAY_MS,
        "a live room keeps its lifecycle TTL"
    );
    assert!(pttl(&mut con, &format!("{rp}r3")) <= 7 * DAY_MS);

    // Anchors, with the text summary; --strict stops at the first bad row.
    let anchors = dir.join("anchors.jsonl");
    std::fs::write(
        &anchors,
        "{\"anchor_id\":\"a-77\",\"name\":\"Ann\",\"level\":5}\n{\"name\":\"no id\"}\n",
    )
    .unwrap();
    let out = dims_load(
        &env,
        &[
            "--kind",
            "anchor",
            "--file",
            anchors.to_str().unwrap(),
            "--key-prefix",
            &ap,
        ],
        None,
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 loaded") && text.contains("1 bad") && text.contains("line 2"),
        "{text}"
    );
    assert_eq!(hgetall(&mut con, &format!("{ap}a-77"))["name"], "Ann");
    let out = dims_load(
        &env,
        &[
            "--kind",
            "anchor",
            "--file",
            anchors.to_str().unwrap(),
            "--key-prefix",
            &ap,
            "--strict",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));

    // Usage errors.
    let out = dims_load(&env, &["--kind", "anchor", "--file", "-"], Some(""));
    assert!(!out.status.success(), "stdin needs --format");
    let out = dims_load(
        &env,
        &["--kind", "anchor", "--file", viewers.to_str().unwrap()],
        None,
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no id column"));
}
