//! Event time through bursts, backfills, stalls and bad clocks, on the real
//! stack with default flags: ingest writes in-band watermark records, the
//! monitor forwards them, and the aggregator's watermark is the minimum over
//! every source. Every case compares `vidpulse query` with gen's (or the
//! test's own) ground truth and requires zero late events.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use vidpulse_e2e::*;

const DLQ: &str = "vp.dlq.v1";

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Runs gen to completion with `args`; returns its truth.
fn run_gen(env: &Env, args: &[&str]) -> Value {
    let truth = scratch(&env.prefix).join("truth.json");
    let mut all = args.to_vec();
    all.extend_from_slice(&["--truth", truth.to_str().unwrap()]);
    let out = env.run("vidpulse-gen", &all);
    assert!(
        out.status.success(),
        "gen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    read_json(&truth)
}

/// gen stamping records with the wall clock, in the background.
fn gen_live(env: &Env, rate: u32, duration: &str, formats: &str, seed: u32) -> Proc {
    let truth = scratch(&env.prefix).join("truth.json");
    let rate = rate.to_string();
    let seed = seed.to_string();
    env.spawn(
        "vidpulse-gen",
        &[
            "--wall-clock",
            "--rate",
            &rate,
            "--duration",
            duration,
            "--formats",
            formats,
            "--seed",
            &seed,
            "--truth",
            truth.to_str().unwrap(),
        ],
        "gen.log",
    )
}

fn truth_of(env: &Env) -> Value {
    read_json(&scratch(&env.prefix).join("truth.json"))
}

/// The truth's rows of `names`.
fn want(truth: &Value, names: &[&str]) -> BTreeMap<String, Vec<Value>> {
    names
        .iter()
        .map(|n| {
            let rows = truth["metrics"][*n]
                .as_array()
                .or_else(|| truth["leaderboards"][*n].as_array())
                .unwrap_or_else(|| panic!("no {n} in the truth"))
                .clone();
            ((*n).to_owned(), rows)
        })
        .collect()
}

fn late(agg: &Proc) -> f64 {
    agg.metric("vidpulse_aggregator_late_total", &[])
}

fn ingest(env: &Env, log: &str) -> Proc {
    let p = env.spawn_stage("vidpulse-ingest", &[], log);
    p.wait_ready(Duration::from_secs(60));
    p
}

fn aggregator(env: &Env) -> Proc {
    let p = env.spawn_stage("vidpulse-aggregator", &[], "aggregator.log");
    p.wait_ready(Duration::from_secs(120));
    p
}

/// The aggregator's watermark of every partition of `topic` (unprefixed).
fn watermarks(env: &Env, agg: &Proc, topic: &str) -> BTreeMap<String, f64> {
    let t = format!("topic=\"{}\"", env.topic(topic));
    agg.metrics()
        .into_iter()
        .filter(|(k, _)| k.starts_with("vidpulse_aggregator_watermark_ms{") && k.contains(&t))
        .collect()
}

#[test]
fn a_burst_of_historical_records_into_a_running_pipeline_is_exact() {
    let env = Env::new("burst");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let _ingest = ingest(&env, "ingest.log");
    let agg = aggregator(&env);
    // A pipeline that has been running, idle, for longer than ingest's
    // --idle-timeout: its raw partitions hold no record.
    std::thread::sleep(Duration::from_secs(12));
    // 30 000 gifts and viewer visits of 2021, in order per raw partition
    // (at most 2 s of disorder), produced at once.
    let truth = run_gen(
        &env,
        &[
            "--formats",
            "live_gift_total,live_streaming_log",
            "--count",
            "30000",
            "--start",
            "2021-08-16T01:00:00Z",
            "--span",
            "20m",
            "--seed",
            "12",
        ],
    );
    println!("gen: {}", truth["kinds"]);
    let names = [
        "gifts_by_type_1m",
        "members_by_grade_1m",
        "viewers_by_province_grade_1m",
        "top_gifters_1h",
    ];
    wait_exact(&env, &want(&truth, &names), "a burst of 2021 records");
    assert_eq!(late(&agg), 0.0, "no event may be late");
}

#[test]
fn ingest_stopped_for_three_minutes_while_traffic_arrives_loses_nothing() {
    let env = Env::new("stop3");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let mut first = ingest(&env, "ingest-1.log");
    let agg = aggregator(&env);
    let started = Instant::now();
    let mut g = gen_live(&env, 40, "280s", "live_gift_total", 31);
    std::thread::sleep(Duration::from_secs(40));
    assert!(first.terminate(), "ingest drains and exits 0");
    // Gifts keep arriving in the raw topic for three minutes.
    std::thread::sleep(Duration::from_secs(180));
    let _second = ingest(&env, "ingest-2.log");
    assert!(g.wait_exit(Duration::from_secs(120)), "gen failed");
    println!("traffic for {:?}", started.elapsed());
    let truth = truth_of(&env);
    wait_exact(
        &env,
        &want(&truth, &["gifts_by_type_1m", "user_gifts_daily"]),
        "ingest down for 3 minutes",
    );
    assert_eq!(late(&agg), 0.0, "the backlog is on time");
}

#[test]
fn frozen_ingest_and_monitor_hold_the_watermark_and_lose_nothing() {
    let env = Env::new("freeze");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    env.ctl(&["pool", "create", "all"]);
    let ingest = ingest(&env, "ingest.log");
    let monitor = env.spawn_stage(
        "vidpulse-monitor",
        &["--pool", "all", "--no-enrich"],
        "monitor.log",
    );
    monitor.wait_ready(Duration::from_secs(60));
    let agg = aggregator(&env);
    let t0 = Instant::now();
    let at = |s: u64| {
        let until = t0 + Duration::from_secs(s);
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
    };
    let mut g = gen_live(
        &env,
        40,
        "330s",
        "live_gift_total,video_production_log,video_consumption_log",
        47,
    );

    at(20);
    ingest.signal("STOP");
    // Ingest is frozen with records waiting: the aggregator's watermark on
    // vp.events.v1 stands still, and says why.
    at(45);
    let before = watermarks(&env, &agg, "vp.events.v1");
    assert!(before.values().any(|w| *w > 0.0), "{before:?}");
    at(80);
    let after = watermarks(&env, &agg, "vp.events.v1");
    assert_eq!(before, after, "the watermark moved while ingest was frozen");
    let lag = agg.metric(
        "vidpulse_aggregator_watermark_lag_seconds",
        &[&format!("topic=\"{}\"", env.topic("vp.events.v1"))],
    );
    let partitions = after.len() as f64;
    assert!(
        lag / partitions > 45.0,
        "the lag metric shows the stall: {lag} over {partitions} partitions"
    );
    let (_, ready) = agg.ready().unwrap();
    let group = env.topic("vidpulse-ingest");
    assert!(
        ready.contains("held by source") && ready.contains(&group),
        "/readyz names the silent source: {ready}"
    );

    at(100);
    monitor.signal("STOP");
    at(220);
    ingest.signal("CONT");
    at(300);
    monitor.signal("CONT");
    assert!(g.wait_exit(Duration::from_secs(120)), "gen failed");
    let truth = truth_of(&env);
    wait_exact(
        &env,
        &want(
            &truth,
            &[
                "gifts_by_type_1m",
                "gifts_by_module_1m",
                "pool_production_1m",
                "pool_consumption_1m",
            ],
        ),
        "ingest and the monitor frozen for 200 s each",
    );
    assert_eq!(late(&agg), 0.0, "nothing is late");
}

#[test]
fn ingest_scaled_1_3_1_with_a_kill_9_during_a_burst_is_exact() {
    let env = Env::new("scale");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let agg = aggregator(&env);
    let a = ingest(&env, "ingest-a.log");
    // 45 000 records of 2021 over about 30 s of production.
    let truth = scratch(&env.prefix).join("truth.json");
    let mut g = env.spawn(
        "vidpulse-gen",
        &[
            "--formats",
            "live_gift_total,live_streaming_log",
            "--count",
            "45000",
            "--rate",
            "1500",
            "--start",
            "2021-08-16T05:00:00Z",
            "--span",
            "30m",
            "--seed",
            "5",
            "--truth",
            truth.to_str().unwrap(),
        ],
        "gen.log",
    );
    std::thread::sleep(Duration::from_secs(6));
    let mut b = env.spawn_stage("vidpulse-ingest", &[], "ingest-b.log");
    let mut c = env.spawn_stage("vidpulse-ingest", &[], "ingest-c.log");
    b.wait_ready(Duration::from_secs(60));
    c.wait_ready(Duration::from_secs(60));
    // Wait until all three share the raw partitions and b is working.
    wait_for("b to handle records", Duration::from_secs(60), || {
        (b.metric("vidpulse_records_received_total", &[]) > 500.0).then_some(())
    });
    b.kill9();
    std::thread::sleep(Duration::from_secs(5));
    assert!(c.terminate(), "c drains and exits 0");
    assert!(g.wait_exit(Duration::from_secs(120)), "gen failed");
    assert!(a.metric("vidpulse_records_received_total", &[]) > 0.0);
    let truth = read_json(&truth);
    wait_exact(
        &env,
        &want(
            &truth,
            &["gifts_by_type_1m", "members_by_grade_1m", "top_gifters_1h"],
        ),
        "ingest 1 → 3 → 1 with a kill -9",
    );
    assert_eq!(late(&agg), 0.0);
    let dups = agg.metric("vidpulse_aggregator_duplicates_total", &[]);
    println!("duplicates re-produced after the kill -9, dropped by event id: {dups}");
}

/// A seed-002 gift as its raw JSON, at China time `local`.
fn gift(user: u32, gift_type: u32, amount: u32, room: u32, local: &str) -> Vec<u8> {
    json!({
        "user_id": user,
        "gift_type": gift_type,
        "gift_total_amount": amount,
        "room_id": room,
        "create_time": local,
        "update_time": local,
    })
    .to_string()
    .into_bytes()
}

fn china_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms + 8 * 3_600_000)
        .unwrap()
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// gifts_by_type_1m of `(event time ms, user, type, amount)`, as
/// `vidpulse query --format json` prints it.
fn gift_rows(gifts: &[(i64, u32, u32, u32)]) -> Vec<Value> {
    let mut cells: BTreeMap<(i64, u32), (i64, u64, std::collections::BTreeSet<u32>)> =
        BTreeMap::new();
    for (t, user, ty, amount) in gifts {
        let w = (t - t.rem_euclid(60_000)) / 1000;
        let c = cells.entry((w, *ty)).or_default();
        c.0 += i64::from(*amount);
        c.1 += 1;
        c.2.insert(*user);
    }
    cells
        .into_iter()
        .map(|((w, ty), (amount, gifts, givers))| {
            json!({
                "window_start": chrono::DateTime::from_timestamp(w, 0).unwrap().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                "gift_type": ty.to_string(),
                "amount": amount,
                "gifts": gifts,
                "givers": givers.len(),
            })
        })
        .collect()
}

#[test]
fn gifts_dated_2099_are_dead_letters_and_move_no_watermark() {
    let env = Env::new("clock");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let _ingest = ingest(&env, "ingest.log");
    let agg = aggregator(&env);
    let mut gifts = Vec::new();
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    let mut n = 0u32;
    let mut ordinary = |count: u32, records: &mut Vec<(String, Vec<u8>)>| {
        for _ in 0..count {
            n += 1;
            let t = wall_ms() / 1000 * 1000;
            let (user, ty, amount, room) = (n % 97, n % 5, 1 + n % 9, 1 + n % 20);
            gifts.push((t, user, ty, amount));
            records.push((
                room.to_string(),
                gift(user, ty, amount, room, &china_time(t)),
            ));
        }
    };
    // 500 ordinary gifts, then one dated 2099 for every room, then 3000 more.
    ordinary(500, &mut records);
    env.produce(
        "live_gift_total",
        &records
            .iter()
            .map(|(k, v)| (Some(k.as_str()), Some(v.clone())))
            .collect::<Vec<_>>(),
    );
    records.clear();
    let future: Vec<(String, Vec<u8>)> = (1..=20)
        .map(|room| {
            (
                room.to_string(),
                gift(7, 1, 100, room, "2099-01-01 00:00:00"),
            )
        })
        .collect();
    env.produce(
        "live_gift_total",
        &future
            .iter()
            .map(|(k, v)| (Some(k.as_str()), Some(v.clone())))
            .collect::<Vec<_>>(),
    );
    for _ in 0..6 {
        ordinary(500, &mut records);
        env.produce(
            "live_gift_total",
            &records
                .iter()
                .map(|(k, v)| (Some(k.as_str()), Some(v.clone())))
                .collect::<Vec<_>>(),
        );
        records.clear();
        std::thread::sleep(Duration::from_millis(500));
    }
    let dead = wait_for("20 dead letters", Duration::from_secs(60), || {
        let all = env.tail_all(DLQ);
        (all.len() >= 20).then_some(all)
    });
    assert_eq!(dead.len(), 20);
    assert!(
        dead.iter()
            .all(|r| r["headers"]["vp.reason"] == "time_in_future"),
        "{dead:?}"
    );
    let mut want = BTreeMap::new();
    want.insert("gifts_by_type_1m".to_owned(), gift_rows(&gifts));
    wait_exact(&env, &want, "3500 gifts around 20 dated 2099");
    assert_eq!(late(&agg), 0.0, "no gift after the 2099 ones is late");
}

#[test]
fn an_idle_pipeline_closes_its_last_window() {
    let env = Env::new("idle");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let _ingest = ingest(&env, "ingest.log");
    let agg = aggregator(&env);
    // Gifts stamped with the wall clock for 10 s, then nothing.
    let mut gifts = Vec::new();
    for i in 0..20u32 {
        let t = wall_ms() / 1000 * 1000;
        let recs: Vec<(String, Vec<u8>)> = (0..10u32)
            .map(|j| {
                let (user, ty, amount, room) = (i * 10 + j, j % 3, 1 + j, 1 + j % 4);
                gifts.push((t, user, ty, amount));
                (
                    room.to_string(),
                    gift(user, ty, amount, room, &china_time(t)),
                )
            })
            .collect();
        env.produce(
            "live_gift_total",
            &recs
                .iter()
                .map(|(k, v)| (Some(k.as_str()), Some(v.clone())))
                .collect::<Vec<_>>(),
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let last = gifts.iter().map(|g| g.0).max().unwrap();
    let end = last - last.rem_euclid(60_000) + 60_000;
    // Defaults: ingest --idle-timeout 10 s, the aggregator's grace 60 s.
    let deadline_ms = end + 10_000 + 60_000 + 2_000;
    let want = gift_rows(&gifts);
    let events = env.topic("vp.events.v1");
    loop {
        let rows = query(&env, "gifts_by_type_1m");
        let closed = watermarks(&env, &agg, "vp.events.v1")
            .values()
            .all(|w| *w as i64 >= end + 60_000);
        if canon(&rows) == canon(&want) && closed {
            println!(
                "last window final {:.1} s after its end",
                (wall_ms() - end) as f64 / 1000.0
            );
            break;
        }
        assert!(
            wall_ms() < deadline_ms,
            "the last window of {events} is not final within idle-timeout + grace + 2 s of its end: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(late(&agg), 0.0);
}
