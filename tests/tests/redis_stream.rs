//! End-to-end: ingest reads a Redis stream (seed 004's `XADD user_actions`)
//! through a consumer group into Kafka. `kill -9` mid-stream loses nothing:
//! entries a dead consumer left pending are claimed by another one, and a
//! consumer restarted under its own name re-reads its pending entries.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use vidpulse_e2e::*;

const EVENTS: &str = "vp.events.v1";
const DLQ: &str = "vp.dlq.v1";
const GROUP: &str = "vidpulse-ingest";

/// Pending entries of the group, in all or of one consumer.
fn pending(con: &mut redis::Connection, stream: &str, consumer: Option<&str>) -> usize {
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(GROUP)
        .query(con)
        .unwrap();
    // [count, first, last, [[consumer, count], ...]]
    let redis::Value::Array(parts) = reply else {
        return 0;
    };
    let total = match &parts[0] {
        redis::Value::Int(n) => *n as usize,
        _ => 0,
    };
    let Some(name) = consumer else {
        return total;
    };
    match parts.get(3) {
        Some(redis::Value::Array(cs)) => cs
            .iter()
            .filter_map(|c| match c {
                redis::Value::Array(pair) => {
                    let n: String = redis::from_redis_value(&pair[0]).ok()?;
                    let k: String = redis::from_redis_value(&pair[1]).ok()?;
                    (n == name).then(|| k.parse().unwrap_or(0))
                }
                _ => None,
            })
            .sum(),
        _ => 0,
    }
}

/// `XADD`s `total` entries at about `rate`/s in a thread, or fewer if `stop`
/// is raised first; every 97th has no timestamp (a dead letter). Returns the
/// good and bad entry ids.
fn writer(
    stream: String,
    total: usize,
    rate: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<String>, Vec<String>)> {
    std::thread::spawn(move || {
        let mut con = redis_conn();
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        let started = Instant::now();
        let batch = 100;
        let mut i = 0;
        while i < total && !stop.load(Ordering::Relaxed) {
            let mut pipe = redis::pipe();
            let mut kinds = Vec::new();
            for _ in 0..batch.min(total - i) {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(&stream)
                    .arg("*")
                    .arg("type")
                    .arg(["like", "comment", "share", "order"][i % 4])
                    .arg("user_id")
                    .arg(format!("u-{}", i % 50))
                    .arg("target_id")
                    .arg(format!("v-{}", i % 17));
                let is_bad = i % 97 == 5;
                if !is_bad {
                    cmd.arg("timestamp")
                        .arg(format!("{}.{:03}", 1_732_200_000 + i / 10, i % 1000));
                }
                pipe.add_command(cmd);
                kinds.push(is_bad);
                i += 1;
            }
            let ids: Vec<String> = pipe.query(&mut con).unwrap();
            for (id, is_bad) in ids.into_iter().zip(kinds) {
                if is_bad {
                    bad.push(id);
                } else {
                    good.push(id);
                }
            }
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        (good, bad)
    })
}

fn spawn_ingest(env: &Env, stream: &str, consumer: &str, port: u16, log: &str) -> Proc {
    env.spawn(
        "vidpulse-ingest",
        &[
            "--redis-stream",
            &format!("{stream}=user_actions"),
            "--redis-url",
            &redis_url(),
            "--redis-consumer",
            consumer,
            "--redis-claim-idle",
            "2s",
            "--redis-batch",
            "200",
            "--admin-addr",
            &format!("127.0.0.1:{port}"),
        ],
        log,
    )
}

fn distinct_event_ids(env: &Env) -> Vec<Value> {
    env.tail_all(EVENTS)
}

/// Entries delivered to the group so far (XINFO GROUPS entries-read).
fn entries_read(con: &mut redis::Connection, stream: &str) -> usize {
    use redis::Commands;
    let info: redis::streams::StreamInfoGroupsReply = con.xinfo_groups(stream).unwrap();
    info.groups
        .iter()
        .find(|g| g.name == GROUP)
        .and_then(|g| g.entries_read)
        .unwrap_or(0)
}

/// Kills `proc` mid-stream: once the group has read past `after` entries
/// and `consumer` holds entries read but not acknowledged. Returns how many
/// it left pending. The stream must still be growing (or hold a backlog)
/// while this waits, or the consumer may be caught up with nothing pending.
fn kill_mid_stream(
    proc: &mut Proc,
    con: &mut redis::Connection,
    stream: &str,
    consumer: &str,
    after: usize,
) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "{consumer} never got under way");
        if entries_read(con, stream) > after && pending(con, stream, Some(consumer)) > 0 {
            proc.kill9();
            return pending(con, stream, Some(consumer));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn redis_stream_kill_9_loses_nothing_and_pending_entries_are_reclaimed() {
    let env = Env::new("rstream");
    env.create_topics();
    let stream = format!("{}user_actions", env.prefix);
    let mut con = redis_conn();
    let _: () = redis::cmd("DEL").arg(&stream).query(&mut con).unwrap();
    // A backlog (so a kill lands mid-batch), then live traffic meanwhile.
    let never = Arc::new(AtomicBool::new(false));
    let (backlog_good, backlog_bad) = writer(stream.clone(), 40_000, 1_000_000, never)
        .join()
        .unwrap();

    // c1 runs, then dies mid-stream with entries read but not acknowledged.
    let p1 = free_port();
    let mut c1 = spawn_ingest(&env, &stream, "c1", p1, "ingest-c1.log");
    let left_by_c1 = kill_mid_stream(&mut c1, &mut con, &stream, "c1", 5_000);
    assert!(
        left_by_c1 > 0,
        "c1 was killed with entries pending (read, not acknowledged)"
    );
    // Live traffic until c2 has died and its successor is up, so c2 is
    // never caught up with nothing pending when it is killed.
    let stop = Arc::new(AtomicBool::new(false));
    let write = writer(stream.clone(), usize::MAX, 5_000, stop.clone());

    // c2 (a replacement pod: another name) claims what c1 left pending.
    let p2 = free_port();
    let mut c2 = spawn_ingest(&env, &stream, "c2", p2, "ingest-c2a.log");
    let claimed = wait_for("c2 to claim c1's entries", Duration::from_secs(60), || {
        let m = metrics(p2);
        let n = prom_sum(&m, "vidpulse_ingest_redis_claimed_total", &[]);
        (n > 0.0).then_some(n)
    });
    wait_for(
        "nothing left with the dead consumer",
        Duration::from_secs(60),
        || (pending(&mut con, &stream, Some("c1")) == 0).then_some(()),
    );
    // c2 dies too and comes back under its own name: it re-reads its own
    // pending entries first.
    let read_so_far = entries_read(&mut con, &stream);
    let left_by_c2 = kill_mid_stream(&mut c2, &mut con, &stream, "c2", read_so_far + 2_000);
    let p3 = free_port();
    let mut c2b = spawn_ingest(&env, &stream, "c2", p3, "ingest-c2b.log");
    wait_for("c2 back under way", Duration::from_secs(60), || {
        let m = metrics(p3);
        (prom_sum(&m, "vidpulse_ingest_redis_acked_total", &[]) > 0.0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);

    let (live_good, live_bad) = write.join().unwrap();
    let good: Vec<String> = backlog_good.into_iter().chain(live_good).collect();
    let bad: Vec<String> = backlog_bad.into_iter().chain(live_bad).collect();
    assert!(good.len() + bad.len() > 42_000, "live traffic was written");
    wait_for(
        "every entry in Kafka and acknowledged",
        Duration::from_secs(180),
        || {
            (env.count(EVENTS) >= good.len() as i64
                && env.count(DLQ) >= bad.len() as i64
                && pending(&mut con, &stream, None) == 0)
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(1));

    // Every good entry became exactly one distinct event, id = stream/entry.
    let events = distinct_event_ids(&env);
    let mut ids = HashSet::new();
    for e in &events {
        let v = &e["value"];
        assert_eq!(v["kind"], "user_action");
        assert_eq!(v["source"]["topic"], stream.as_str());
        ids.insert(v["event_id"].as_str().unwrap().to_owned());
    }
    let want: HashSet<String> = good.iter().map(|id| format!("{stream}/{id}")).collect();
    assert_eq!(ids.len(), want.len(), "distinct events");
    assert!(
        ids == want,
        "event ids are exactly stream/entry-id of every good entry"
    );
    let dup = events.len() - ids.len();

    // Every bad entry is dead-lettered with its entry id.
    let dlq = env.tail_all(DLQ);
    let dead: HashSet<String> = dlq
        .iter()
        .map(|d| {
            assert_eq!(d["headers"]["vp.reason"], "missing_field");
            assert_eq!(d["headers"]["vp.source.kind"], "redis-stream");
            d["headers"]["vp.source.entry-id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(dead, bad.iter().cloned().collect::<HashSet<_>>());

    // Acknowledged: nothing pending; the restarted consumer drains cleanly.
    assert_eq!(pending(&mut con, &stream, None), 0);
    let m = metrics(p3);
    assert!(prom_sum(&m, "vidpulse_ingest_redis_acked_total", &[]) > 0.0);
    assert!(c2b.terminate(), "ingest drains and exits 0 on SIGTERM");
    eprintln!(
        "kill -9 twice: c1 left {left_by_c1} pending (c2 claimed {claimed}), c2 left {left_by_c2}; {dup} events re-produced with the same ids"
    );
    let _: () = redis::cmd("DEL").arg(&stream).query(&mut con).unwrap();
}

#[test]
fn a_new_group_reads_the_stream_from_its_start_and_bad_urls_fail_clearly() {
    let env = Env::new("rstart");
    env.create_topics();
    let stream = format!("{}user_actions", env.prefix);
    let mut con = redis_conn();
    // Entries written before ingest ever ran are not skipped.
    let id: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("type")
        .arg("like")
        .arg("timestamp")
        .arg("1732200000.123")
        .query(&mut con)
        .unwrap();
    let port = free_port();
    let mut ingest = spawn_ingest(&env, &stream, "solo", port, "ingest.log");
    wait_for("the event", Duration::from_secs(60), || {
        (env.count(EVENTS) >= 1).then_some(())
    });
    let events = env.tail_all(EVENTS);
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0]["value"]["event_id"].as_str().unwrap(),
        format!("{stream}/{id}")
    );
    assert_eq!(events[0]["value"]["event_time_ms"], 1_732_200_000_123i64);
    assert_eq!(http_get(port, "/readyz").unwrap().0, 200);
    assert!(ingest.terminate());

    // An unknown preset is a start-up error naming the fix.
    let out = env.run(
        "vidpulse-ingest",
        &["--redis-stream", "whatever", "--admin-addr", "127.0.0.1:0"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--redis-stream") && err.contains("STREAM=PRESET"),
        "{err}"
    );
    let _: () = redis::cmd("DEL").arg(&stream).query(&mut con).unwrap();
}
