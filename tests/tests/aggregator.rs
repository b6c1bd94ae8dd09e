//! End-to-end tests of vidpulse-aggregator and `vidpulse query` on the real
//! broker, Redis and ClickHouse (scripts/stack up): gen's ground truth equals
//! the query output for every default metric and leaderboard, with
//! duplicates, late and malformed records mixed in; and stays equal under
//! kill -9 at random moments, a rebalance between two instances, a full
//! replay in a new group, and a 30 s ClickHouse outage. Late events,
//! duplicates, dead letters and idle windows on hand-made events. Times are
//! printed, never asserted.
//!
//! The tests share ClickHouse (one of them stops it), so they run one at a
//! time.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;
use vidpulse_e2e::*;
use vidpulse_proto::{Event, Message as _, event};

const EVENTS: &str = "vp.events.v1";
const MONITORED: &str = "vp.monitored.v1";
const LATE: &str = "vp.late.v1";
const DLQ: &str = "vp.dlq.v1";

/// Drops a test's ClickHouse tables and views when dropped (also when the
/// test fails).
fn run_gen(env: &Env, count: u64, seed: u64, extra: &[&str]) -> (Value, std::path::PathBuf) {
    gen_truth(env, count, seed, extra)
}

fn ingest(env: &Env) -> Proc {
    spawn_ingest(env)
}

/// An aggregator that makes every window visible quickly: early emission,
/// short flushes. Default grace and watermarks: ingest's in-band watermarks
/// keep the burst of historical records gen writes on time, and gen's late
/// records (30 s behind their source) within the 60 s grace.
fn aggregator(env: &Env, port: u16, log: &str, extra: &[&str]) -> Proc {
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--admin-addr",
        &addr,
        "--early-emit",
        "200ms",
        "--flush-interval",
        "200ms",
    ];
    args.extend_from_slice(extra);
    env.spawn("vidpulse-aggregator", &args, log)
}

fn consumer(env: &Env) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", env.topic("test-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// Every record of a topic, from the beginning to the current end:
/// (partition, key, value, headers).
type Rec = (i32, Option<Vec<u8>>, Vec<u8>, Vec<(String, String)>);

fn read_all(env: &Env, topic: &str) -> Vec<Rec> {
    let c = consumer(env);
    let full = env.topic(topic);
    let md = c
        .fetch_metadata(Some(&full), Duration::from_secs(10))
        .unwrap();
    let parts: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in &parts {
        let (lo, hi) = c
            .fetch_watermarks(&full, *p, Duration::from_secs(10))
            .unwrap();
        if hi > lo {
            ends.insert(*p, hi);
            tpl.add_partition_offset(&full, *p, Offset::Offset(lo))
                .unwrap();
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return out;
    }
    c.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() && Instant::now() < deadline {
        let Some(m) = c.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m.unwrap();
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| {
                        (
                            x.key.to_owned(),
                            String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            m.partition(),
            m.key().map(<[u8]>::to_vec),
            m.payload().unwrap_or_default().to_vec(),
            headers,
        ));
        if ends
            .get(&m.partition())
            .is_some_and(|e| m.offset() + 1 >= *e)
        {
            ends.remove(&m.partition());
        }
    }
    out
}

/// A day of event time (gen over 24 h: rooms start and end through it, the
/// daily windows and leaderboards stay open all day, duplicates are
/// remembered only for the dedup horizon): kill -9 at 80 % of the input,
/// then a restart from the checkpoints (no replay from scratch), and every
/// metric and leaderboard equals gen's truth. The state stayed bounded:
/// fewer ids remembered than the day had events.
#[test]
fn a_day_long_run_killed_at_80_percent_restores_exactly() {
    let _serial = serial();
    let env = Env::new("aggday");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let (truth, _) = gen_truth_over(&env, 16000, 24, "24h", &[]);
    let events = truth["expected"]["events"].as_i64().unwrap();
    let _ingest = ingest(&env);
    wait_events(&env, events);
    let mut fwd = Forwarder::start(&env);
    fwd.finish(events as u64);
    let input = (events + env.count(MONITORED)) as f64;
    let mut want = expected(&truth, &[]);
    with_even_pool(&mut want);

    let read = |p: &Proc| p.metric("vidpulse_records_received_total", &[]);
    let mut a = spawn_aggregator(&env, "aggregator-1.log", &["--flush-max-rows", "200"]);
    let mut remembered = 0.0_f64;
    wait_for("80 % of the input read", Duration::from_secs(300), || {
        remembered = remembered.max(a.metric("vidpulse_aggregator_remembered_ids", &[]));
        (read(&a) >= 0.8 * input).then_some(())
    });
    println!("kill -9 at {} of {input} records read", read(&a));
    a.kill9();
    let b = spawn_aggregator(&env, "aggregator-2.log", &[]);
    wait_exact(&env, &want, "a day-long run, kill -9 at 80 %");
    let restored = b.metric("vidpulse_aggregator_checkpoints_restored_total", &[]);
    assert!(restored > 0.0, "the restart restored checkpoints");
    assert_eq!(
        b.metric("vidpulse_aggregator_store_lost_total", &[]),
        0.0,
        "nothing replayed from scratch"
    );
    remembered = remembered.max(b.metric("vidpulse_aggregator_remembered_ids", &[]));
    println!("at most {remembered} ids remembered for {events} events");
    assert!(
        remembered > 0.0 && remembered < events as f64 / 4.0,
        "remembered ids bounded by the dedup horizon: {remembered} of {events}"
    );
}

#[test]
fn every_default_metric_and_leaderboard_equals_the_ground_truth() {
    let _serial = serial();
    let env = Env::new("aggtruth");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let (truth, _) = run_gen(&env, 4000, 21, &[]);
    let events = truth["expected"]["events"].as_i64().unwrap();
    let _ingest = ingest(&env);
    wait_events(&env, events);
    let mut fwd = Forwarder::start(&env);
    fwd.finish(events as u64);

    let port = free_port();
    let mut agg = aggregator(&env, port, "aggregator.log", &[]);
    let mut want = expected(&truth, &[]);
    with_even_pool(&mut want);
    // Every name `vidpulse query --list` knows has a truth to meet.
    let listed = env.ctl(&["query", "--list", "--format", "json"]);
    let names: BTreeSet<String> = listed
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["name"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(names, want.keys().cloned().collect::<BTreeSet<_>>());
    assert!(truth["topics"]["live_gift_total"]["late"].as_u64().unwrap() > 0);
    assert!(
        truth["topics"]["video_events"]["duplicates"]
            .as_u64()
            .unwrap()
            > 0
    );
    wait_exact(&env, &want, "single aggregator");

    let m = metrics(port);
    let dups = prom_sum(&m, "vidpulse_aggregator_duplicates_total", &[]);
    println!("duplicates skipped: {dups}");
    assert!(dups > 0.0, "gen's duplicates were seen and skipped");
    assert_eq!(prom_sum(&m, "vidpulse_aggregator_late_total", &[]), 0.0);
    assert_eq!(readyz(port), Some(200));
    // The human format prints the same rows.
    let table = env.ctl(&["query", "top_gifters_1h"]);
    assert!(table.starts_with("window_start"), "{table}");
    assert_eq!(table.lines().count(), 1 + want["top_gifters_1h"].len());
    // Filters: a time range and a group value.
    let some = env.ctl(&[
        "query",
        "gifts_by_type_1m",
        "--format",
        "json",
        "--from",
        "2021-08-16T01:03:00Z",
        "--to",
        "2021-08-16 01:05:00",
        "--where",
        "gift_type=3",
    ]);
    let expect: Vec<&Value> = want["gifts_by_type_1m"]
        .iter()
        .filter(|r| {
            let w = r["window_start"].as_str().unwrap();
            r["gift_type"] == "3" && ("2021-08-16T01:03:00Z"..="2021-08-16T01:04:00Z").contains(&w)
        })
        .collect();
    assert_eq!(some.lines().count(), expect.len());
    assert!(agg.terminate(), "SIGTERM: drains, checkpoints, exits 0");
}

/// Static membership (`--group-instance-id`, the StatefulSet's pod name): an
/// instance killed with -9 and restarted under its own name gets its own
/// partitions back from its checkpoints without a rebalance, so the other
/// instance never stops reading (no partition taken from it or given to it),
/// and every value stays exact.
#[test]
fn a_static_member_restarted_under_its_name_takes_its_partitions_back_alone() {
    let _serial = serial();
    let env = Env::new("aggstatic");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let generator = LiveGen::start(&env, 5000, 200, 35);
    let _ingest = ingest(&env);
    let mut fwd = Forwarder::start(&env);
    let counter = |port, name| prom_sum(&metrics(port), name, &["stage=\"aggregator\""]);
    let owned = |port| prom_sum(&metrics(port), "vidpulse_aggregator_partitions_owned", &[]);
    let (port_a, port_b) = (free_port(), free_port());
    let id_a = ["--flush-max-rows", "100", "--group-instance-id", "agg-a"];
    let mut a = aggregator(&env, port_a, "a-0.log", &id_a);
    wait_for("A to own partitions", Duration::from_secs(90), || {
        (owned(port_a) > 0.0).then_some(())
    });
    let b = aggregator(
        &env,
        port_b,
        "b.log",
        &["--flush-max-rows", "100", "--group-instance-id", "agg-b"],
    );
    wait_for(
        "the group to split between A and B, A to checkpoint",
        Duration::from_secs(90),
        || {
            let (na, nb) = (owned(port_a), owned(port_b));
            let ck = prom_sum(
                &metrics(port_a),
                "vidpulse_aggregator_checkpoint_bytes_total",
                &[],
            );
            (na > 0.0 && nb > 0.0 && na + nb == 16.0 && ck > 0.0).then_some(())
        },
    );
    let (a_owned, b_owned) = (owned(port_a), owned(port_b));
    let b_assigned = counter(port_b, "vidpulse_partitions_assigned_total");
    let b_revoked = counter(port_b, "vidpulse_partitions_revoked_total");
    println!(
        "split: A owns {a_owned}, B owns {b_owned}; B assigned {b_assigned}, revoked {b_revoked}"
    );
    a.kill9();
    let t = Instant::now();
    let _a_again = aggregator(&env, port_a, "a-1.log", &id_a);
    wait_for(
        "A to own its partitions again",
        Duration::from_secs(90),
        || (owned(port_a) == a_owned).then_some(()),
    );
    println!("A owns {a_owned} again {:?} after the kill", t.elapsed());
    assert!(
        prom_sum(
            &metrics(port_a),
            "vidpulse_aggregator_checkpoints_restored_total",
            &[]
        ) > 0.0,
        "the restarted A restored its checkpoints"
    );
    let truth = generator.truth();
    let events = truth["expected"]["events"].as_i64().unwrap();
    wait_events(&env, events);
    fwd.finish(events as u64);
    let mut want = expected(&truth, &[]);
    with_even_pool(&mut want);
    wait_exact(&env, &want, "after a static member's kill -9 and restart");
    assert_eq!(
        (
            owned(port_b),
            counter(port_b, "vidpulse_partitions_assigned_total"),
            counter(port_b, "vidpulse_partitions_revoked_total")
        ),
        (b_owned, b_assigned, b_revoked),
        "B kept its partitions through A's restart: no rebalance (owned, assigned, revoked)"
    );
    drop(b);
}

/// A tiny deterministic generator for the kill moments (its seed is printed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

#[test]
fn kill_9_rebalance_and_full_replay_keep_every_value_exact() {
    let _serial = serial();
    let env = Env::new("aggfault");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    // Produced at a rate, so the aggregator is killed while it works.
    let truth_path = scratch(&env.prefix).join("truth.json");
    let mut generator = env.spawn(
        "vidpulse-gen",
        &[
            "--count",
            "6000",
            "--rate",
            "150",
            "--seed",
            "33",
            "--start",
            "2021-08-16T01:00:00Z",
            "--span",
            "10m",
            "--bad-fraction",
            "0.02",
            "--dup-fraction",
            "0.04",
            "--late-fraction",
            "0.04",
            "--truth",
            truth_path.to_str().unwrap(),
        ],
        "gen.log",
    );
    let _ingest = ingest(&env);
    let mut fwd = Forwarder::start(&env);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("kill schedule seed {seed}");
    let mut rnd = Lcg(seed);
    // Dead members leave the group after the session timeout: keep it short.
    let small = [
        "--flush-max-rows",
        "100",
        "--kafka-option",
        "session.timeout.ms=6000",
    ];
    let owned = |port| prom_sum(&metrics(port), "vidpulse_aggregator_partitions_owned", &[]);
    let read = |port| {
        prom_sum(
            &metrics(port),
            "vidpulse_records_received_total",
            &["stage=\"aggregator\""],
        )
    };
    let restored = |port| {
        prom_sum(
            &metrics(port),
            "vidpulse_aggregator_checkpoints_restored_total",
            &[],
        )
    };
    let checkpointed = |port| {
        prom_sum(
            &metrics(port),
            "vidpulse_aggregator_checkpoint_bytes_total",
            &[],
        )
    };
    let port_a = free_port();
    let mut a = aggregator(&env, port_a, "a-0.log", &small);
    let mut kills = 0;
    // Whether the instance killed last had written a checkpoint (one killed
    // before its first flush leaves nothing to restore).
    let mut left_checkpoints = false;
    while kills < 4 {
        // Kill while it works: once it owns partitions and reads, at a
        // random moment within the next 1.5 s.
        wait_for(
            "A to own partitions and read",
            Duration::from_secs(90),
            || {
                (owned(port_a) > 0.0 && (read(port_a) > 0.0 || !generator.is_running()))
                    .then_some(())
            },
        );
        if left_checkpoints {
            assert!(restored(port_a) > 0.0, "a restart restores checkpoints");
        }
        std::thread::sleep(Duration::from_millis(rnd.next(1500)));
        left_checkpoints = left_checkpoints || checkpointed(port_a) > 0.0;
        a.kill9();
        kills += 1;
        a = aggregator(&env, port_a, &format!("a-{kills}.log"), &small);
    }
    println!("aggregator killed with -9 {kills} times while reading");
    // A second instance joins: the group rebalances between A and B.
    wait_for("A to own partitions", Duration::from_secs(90), || {
        (owned(port_a) > 0.0).then_some(())
    });
    let port_b = free_port();
    let mut b = aggregator(&env, port_b, "b.log", &small);
    wait_for(
        "the group to split between A and B",
        Duration::from_secs(90),
        || {
            let (na, nb) = (owned(port_a), owned(port_b));
            (na > 0.0 && nb > 0.0 && na + nb == 16.0).then_some(())
        },
    );
    println!(
        "split: A owns {}, B owns {}; gen still running: {}",
        owned(port_a),
        owned(port_b),
        generator.is_running()
    );
    // A dies with -9 after the rebalance: B takes everything over.
    std::thread::sleep(Duration::from_millis(rnd.next(1500)));
    a.kill9();
    wait_for("gen to finish", Duration::from_secs(120), || {
        (!generator.is_running()).then_some(())
    });
    let truth = read_json(&truth_path);
    let events = truth["expected"]["events"].as_i64().unwrap();
    wait_events(&env, events);
    fwd.finish(events as u64);
    wait_for("B to own every partition", Duration::from_secs(90), || {
        (owned(port_b) == 16.0).then_some(())
    });
    let mut want = expected(&truth, &[]);
    with_even_pool(&mut want);
    wait_exact(&env, &want, "after kill -9s and rebalances");

    // A full replay from the earliest offsets in a new group, over the rows
    // already written: every final value stays the same.
    let table = "vidpulse.`".to_owned() + &env.prefix.replace('.', "_") + "video_plays_1m`";
    let rows_before: u64 = clickhouse_sql(&format!("SELECT count() FROM {table}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    b.terminate();
    let port_c = free_port();
    let mut c = aggregator(&env, port_c, "c.log", &["--group", "replay"]);
    let monitored = env.count(MONITORED) as f64;
    wait_for(
        "the replay to read everything",
        Duration::from_secs(180),
        || {
            let m = metrics(port_c);
            (prom_sum(
                &m,
                "vidpulse_records_received_total",
                &["stage=\"aggregator\""],
            ) >= events as f64 + monitored
                && prom_sum(&m, "vidpulse_aggregator_flush_seconds_count", &[]) > 0.0)
                .then_some(())
        },
    );
    wait_for("the replay's rows to land", Duration::from_secs(60), || {
        let n: u64 = clickhouse_sql(&format!("SELECT count() FROM {table}"))?
            .trim()
            .parse()
            .ok()?;
        (n > rows_before).then_some(())
    });
    // A new group is a new lineage: its generation is current from its
    // start, so its results replace the old ones once its windows close.
    wait_exact(&env, &want, "the full replay in a new group");
    // Let its last flush complete, then compare again.
    c.terminate();
    assert!(
        differences(&env, &want).is_empty(),
        "{:?}",
        differences(&env, &want)
    );
    println!("full replay in a new group: every value unchanged");
}

/// Restarts ClickHouse when dropped, so a failing test leaves it running.
struct ClickHouseBack;

impl Drop for ClickHouseBack {
    fn drop(&mut self) {
        let _ = std::process::Command::new(repo_root().join("scripts/stack"))
            .args(["start", "clickhouse"])
            .status();
    }
}

#[test]
fn clickhouse_outage_stops_consumption_and_loses_nothing() {
    let _serial = serial();
    let env = Env::new("aggch");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let mut generator = LiveGen::start(&env, 3000, 100, 44);
    let _ingest = ingest(&env);
    let port = free_port();
    let mut agg = aggregator(&env, port, "aggregator.log", &["--flush-max-rows", "50"]);
    wait_for("the aggregator to read", Duration::from_secs(60), || {
        (prom_sum(&metrics(port), "vidpulse_records_received_total", &[]) > 100.0).then_some(())
    });

    let back = ClickHouseBack;
    let stack = repo_root().join("scripts/stack");
    let stopped = Instant::now();
    assert!(
        std::process::Command::new(&stack)
            .args(["stop", "clickhouse"])
            .status()
            .unwrap()
            .success()
    );
    wait_for("readyz to say 503", Duration::from_secs(60), || {
        (readyz(port) == Some(503)).then_some(())
    });
    let body = http_get(port, "/readyz").unwrap().1;
    assert!(body.contains("clickhouse unavailable"), "{body}");
    let read_at_503 = prom_sum(&metrics(port), "vidpulse_records_received_total", &[]);
    // The outage lasts about 30 s; records keep arriving meanwhile.
    while stopped.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let read_at_end = prom_sum(&metrics(port), "vidpulse_records_received_total", &[]);
    println!("read {read_at_503} records before, {read_at_end} at the end of the outage");
    assert!(
        read_at_end - read_at_503 <= 50.0,
        "back-pressure: nothing more than one flush batch is read while ClickHouse is down"
    );
    assert!(agg.is_running());
    drop(back);
    wait_for("readyz to say 200", Duration::from_secs(120), || {
        (readyz(port) == Some(200)).then_some(())
    });
    wait_for("gen to finish", Duration::from_secs(120), || {
        (!generator.is_running()).then_some(())
    });
    let truth = generator.truth();
    let want = expected(&truth, &FROM_MONITORED);
    wait_exact(&env, &want, "after a 30 s ClickHouse outage");
    let m = metrics(port);
    assert!(prom_sum(&m, "vidpulse_sink_errors_total", &["sink=\"clickhouse\""]) > 0.0);
    assert!(agg.terminate());
}

fn canonical(id: &str, t: i64, video: &str, user: &str) -> Event {
    Event {
        event_id: id.into(),
        event_time_ms: t,
        ingest_time_ms: t,
        schema_version: 1,
        video_id: video.into(),
        user_id: user.into(),
        payload: Some(event::Payload::VideoPlayed(vidpulse_proto::VideoPlayed {
            watch_ms: Some(100),
        })),
        ..Default::default()
    }
}

#[test]
fn late_events_duplicates_dead_letters_and_idle_windows() {
    let _serial = serial();
    let env = Env::new("agglate");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    const T0: i64 = 1_629_075_600_000; // 2021-08-16T01:00:00Z
    let a = canonical("a", T0 + 1_000, "v1", "u1");
    let b = canonical("b", T0 + 2_000, "v1", "u2");
    let c = canonical("c", T0 + 118_000, "v1", "u1");
    let late = canonical("d", T0 + 30_000, "v1", "u3");
    let mut records: Vec<(Option<&str>, Option<Vec<u8>>)> = vec![
        (Some("v1"), Some(a.encode_to_vec())),
        (Some("v1"), Some(b.encode_to_vec())),
        (Some("v1"), Some(b.encode_to_vec())), // a duplicate
        (Some("v1"), Some(c.encode_to_vec())),
        (Some("v1"), Some(late.encode_to_vec())),
    ];
    records.push((Some("v1"), Some(b"\xff not protobuf".to_vec())));
    env.produce(EVENTS, &records);

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // No early emission: a window shows once the watermark passes its end.
    // The last one only closes when the partition idles. These events are
    // written straight to vp.events.v1, without ingest (and so without
    // in-band watermarks): the max-event-time clock.
    let mut agg = env.spawn(
        "vidpulse-aggregator",
        &[
            "--admin-addr",
            &addr,
            "--watermarks",
            "max-event-time",
            "--grace",
            "10s",
            "--out-of-orderness",
            "0s",
            "--idle-timeout",
            "1s",
            "--flush-interval",
            "200ms",
        ],
        "aggregator.log",
    );
    let want = vec![
        serde_json::json!({"window_start": "2021-08-16T01:00:00Z", "video_id": "v1", "plays": 2, "viewers": 2, "watch_ms": 200}),
        serde_json::json!({"window_start": "2021-08-16T01:01:00Z", "video_id": "v1", "plays": 1, "viewers": 1, "watch_ms": 100}),
    ];
    wait_for(
        "both windows, the second closed by the idle advance",
        Duration::from_secs(120),
        || (canon(&query(&env, "video_plays_1m")) == canon(&want)).then_some(()),
    );
    let late_records = wait_for("the late record", Duration::from_secs(60), || {
        let r = read_all(&env, LATE);
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(late_records.len(), 1);
    let (_, key, value, headers) = &late_records[0];
    assert_eq!(key.as_deref(), Some(&b"v1"[..]));
    assert_eq!(Event::decode(value.as_slice()).unwrap().event_id, "d");
    let h: HashMap<&str, &str> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert!(h["vp.late.for"].contains("video_plays_1m"), "{h:?}");
    assert_eq!(h["vp.source.topic"], env.topic(EVENTS));
    let dead = read_all(&env, DLQ);
    assert_eq!(dead.len(), 1);
    let h: HashMap<&str, &str> = dead[0]
        .3
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        (h["vp.reason"], h["vp.stage"]),
        ("invalid_protobuf", "aggregator")
    );
    let m = metrics(port);
    assert_eq!(
        prom_sum(&m, "vidpulse_aggregator_duplicates_total", &[]),
        1.0
    );
    assert!(
        prom_sum(
            &m,
            "vidpulse_aggregator_late_total",
            &["metric=\"video_plays_1m\""]
        ) >= 1.0
    );
    // The leaderboard and the log stay empty: no such kinds here.
    assert!(query(&env, "live_viewer_log").is_empty());
    assert!(agg.terminate());
}

/// The real pipeline: ingest → dim-builder (room hashes in Redis) → monitor
/// (site-wide pool `all`, enrichment from those hashes) → aggregator. The
/// stages run one after the other so every gift's room is in Redis before the
/// monitor looks it up, as in production where a room starts long before
/// its gifts.
#[test]
fn ingest_dims_monitor_aggregator_pipeline_equals_the_ground_truth() {
    let _serial = serial();
    let env = Env::new("aggpipe");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let (truth, _) = run_gen(&env, 3000, 55, &[]);
    let events = truth["expected"]["events"].as_i64().unwrap();
    let _ingest = ingest(&env);
    wait_events(&env, events);

    let dims_port = free_port();
    let room_prefix = format!("{}room:", env.prefix);
    let viewer_prefix = format!("{}viewer:", env.prefix);
    let mut dims = env.spawn(
        "vidpulse-dim-builder",
        &[
            "--admin-addr",
            &format!("127.0.0.1:{dims_port}"),
            "--key-prefix",
            &room_prefix,
            "--viewer-key-prefix",
            &viewer_prefix,
        ],
        "dim-builder.log",
    );
    env.wait_caught_up(
        "vidpulse-dim-builder",
        "vp.events.v1",
        Duration::from_secs(120),
    );
    dims.terminate();

    env.ctl(&["pool", "create", "all"]);
    let mon_port = free_port();
    let room_key = format!("{}room:{{id}}", env.prefix);
    let anchor_key = format!("{}anchor:{{id}}", env.prefix);
    let viewer_key = format!("{}viewer:{{id}}", env.prefix);
    let _monitor = env.spawn(
        "vidpulse-monitor",
        &[
            "--pool",
            "all",
            "--admin-addr",
            &format!("127.0.0.1:{mon_port}"),
            "--room-key",
            &room_key,
            "--anchor-key",
            &anchor_key,
            "--viewer-key",
            &viewer_key,
        ],
        "monitor.log",
    );
    wait_for(
        &format!("{events} monitored events"),
        Duration::from_secs(120),
        || (env.count(MONITORED) >= events).then_some(()),
    );

    let port = free_port();
    let mut agg = aggregator(&env, port, "aggregator.log", &[]);
    let want = expected(&truth, &[]);
    wait_exact(&env, &want, "ingest → dim-builder → monitor → aggregator");
    assert!(agg.terminate());
}

/// Two instances that registered one generation at the same moment hold
/// stamps that differ only in the registration time (ClickHouse keeps the
/// later row, each instance its own). Their partials are one generation's:
/// both add up in the sorted set, neither empties it nor is skipped. A
/// newer generation still replaces an older one. On the real Redis, with
/// the aggregator's own script (found with `scripts/bench scale`: two
/// instances started together, half of every daily leaderboard missing).
#[test]
fn one_generation_registered_twice_at_once_adds_up_in_the_leaderboards() {
    use vidpulse_aggregator::leaderboard::{Batch, invocation, script, stamp};
    let mut con = redis_conn();
    let set = format!("t{}.board:{{2021-08-16}}", std::process::id());
    let parts = format!("{set}:parts");
    let () = redis::cmd("DEL")
        .arg(&set)
        .arg(&parts)
        .query(&mut con)
        .unwrap();
    let script = script();
    let apply =
        |con: &mut redis::Connection, stamp: &str, field: &str, version: u64, value: i64| {
            let b = Batch {
                set_key: set.clone(),
                stamp: stamp.to_owned(),
                ttl_secs: 600,
                partials: vec![(format!("{field}|m"), "m".to_owned(), version, value)],
            };
            invocation(&script, &[b]).invoke::<i64>(con).unwrap()
        };
    let score = |con: &mut redis::Connection| -> Option<i64> {
        redis::cmd("ZSCORE").arg(&set).arg("m").query(con).unwrap()
    };
    let (a, b) = (stamp(1_000, 7), stamp(1_005, 7));
    assert_eq!(apply(&mut con, &a, "events:0", 1, 5), 1);
    assert_eq!(
        apply(&mut con, &b, "events:4", 1, 7),
        1,
        "the other instance's partial applies"
    );
    assert_eq!(
        apply(&mut con, &a, "events:0", 2, 6),
        1,
        "and so does the first one's next"
    );
    assert_eq!(
        score(&mut con),
        Some(13),
        "6 + 7: both partitions' partials"
    );
    // A generation registered later (a new spec) empties the set and the
    // older one's writers change nothing.
    let newer = stamp(2_000, 8);
    assert_eq!(apply(&mut con, &newer, "events:0", 3, 1), 1);
    assert_eq!(
        apply(&mut con, &a, "events:4", 2, 9),
        0,
        "an older generation is skipped"
    );
    assert_eq!(score(&mut con), Some(1));
    let () = redis::cmd("DEL")
        .arg(&set)
        .arg(&parts)
        .query(&mut con)
        .unwrap();
}
