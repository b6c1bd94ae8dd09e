//! End-to-end on a Redis Cluster (`scripts/stack up --redis-cluster`: 3
//! masters + 3 replicas; every binary with `--redis-cluster`): the
//! dim-builder's room and viewer hashes equal what the events say, the T+1
//! loader writes (and keeps newer live fields) across slots, the monitor
//! enriches from hashes on every master, the aggregator's metrics and
//! leaderboards equal gen's truth with its checkpoints on the cluster — and
//! stay exact when the master holding a checkpoint is killed mid-run (its
//! replica takes over; the node is restarted at the end).
//!
//! Each test says clearly when the cluster is not up. They run one at a
//! time: one of them kills a master.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use redis::Commands;
use serde_json::Value;
use vidpulse_e2e::*;

const EVENTS: &str = "vp.events.v1";
const MONITORED: &str = "vp.monitored.v1";

fn hgetall(con: &mut redis::cluster::ClusterConnection, key: &str) -> BTreeMap<String, String> {
    con.hgetall(key).unwrap()
}

fn dims_load(env: &Env, args: &[&str]) -> Value {
    let mut all = vec!["dims", "load", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(env.ctl(&all).trim()).unwrap()
}

#[test]
fn dimensions_loader_and_enrichment_on_a_cluster() {
    let _serial = serial();
    cluster::require();
    let env = cluster::env(Env::new("rcdims"));
    let _clean = cluster::CleanKeys(env.prefix.clone());
    env.create_topics();
    let (rp, vp, ap) = (
        format!("{}room:", env.prefix),
        format!("{}viewer:", env.prefix),
        format!("{}anchor:", env.prefix),
    );
    let _ingest = spawn_ingest(&env);
    let mut dim = env.spawn_stage(
        "vidpulse-dim-builder",
        &[
            "--key-prefix",
            &rp,
            "--viewer-key-prefix",
            &vp,
            "--max-batch",
            "200",
            // Each batch waits until a replica holds it (Redis WAIT).
            "--redis-wait-replicas",
            "1",
        ],
        "dim-builder.log",
    );
    let n = dims::gen_rooms(&env, "31", "2021-08-16T01:00:00Z", "3000");
    wait_events(&env, n);
    wait_for(
        &format!("{n} events handled by the dim-builder"),
        Duration::from_secs(120),
        || (dim.metric("vidpulse_dim_events_total", &[]) >= n as f64).then_some(()),
    );
    assert_eq!(
        dim.metric("vidpulse_dim_events_total", &["outcome=\"failed\""]),
        0.0
    );

    // Every room and viewer hash is exactly what the events say, wherever
    // its slot lives.
    let events = env.tail_all(EVENTS);
    assert_eq!(events.len() as i64, n);
    let (rooms, viewers) = dims::expected_hashes(&events, &rp, &vp);
    assert!(rooms.len() >= 20, "{} rooms", rooms.len());
    let mut con = cluster::conn();
    dims::check_hashes(&mut con, &rooms, &viewers);
    // Spread over every master, and nothing else under the prefix.
    let per_master = cluster::scan_each(&format!("{}*", env.prefix));
    assert_eq!(per_master.len(), 3, "{per_master:?}");
    assert!(
        per_master.iter().all(|(_, k)| !k.is_empty()),
        "keys on every master: {:?}",
        per_master
            .iter()
            .map(|(p, k)| (p, k.len()))
            .collect::<Vec<_>>()
    );
    let total: usize = per_master.iter().map(|(_, k)| k.len()).sum();
    assert_eq!(total, rooms.len() + viewers.len());

    // The T+1 loader: the anchors of the events and rooms plus 2000 more
    // (chunks of many rows, calls of one slot each), and viewer profiles
    // older than the live data (shared fields kept, the others written).
    let payload_anchor = |v: &Value| -> Option<String> {
        let p = &v["payload"];
        p.get("live_room_started")
            .or_else(|| p.get("live_room_ended"))
            .and_then(|r| r["room"]["anchor_id"].as_str())
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
    };
    let by_id: HashMap<String, Option<String>> = events
        .iter()
        .map(|r| {
            let v = &r["value"];
            (
                v["event_id"].as_str().unwrap().to_owned(),
                payload_anchor(v),
            )
        })
        .collect();
    let anchors: Vec<String> = {
        let mut a: Vec<String> = rooms
            .values()
            .filter_map(|h| h.get("anchor_id").cloned())
            .chain(by_id.values().flatten().cloned())
            .collect();
        a.sort();
        a.dedup();
        a
    };
    assert!(!anchors.is_empty());
    let dir = scratch(&env.prefix);
    let mut csv = String::from("anchor_id,name,level\n");
    for a in &anchors {
        csv.push_str(&format!("{a},name-{a},7\n"));
    }
    for i in 0..2000 {
        csv.push_str(&format!("x-{i},extra-{i},1\n"));
    }
    let file = dir.join("anchors.csv");
    std::fs::write(&file, csv).unwrap();
    let s = dims_load(
        &env,
        &[
            "--kind",
            "anchor",
            "--file",
            file.to_str().unwrap(),
            "--key-prefix",
            &ap,
            "--redis-wait-replicas",
            "1",
        ],
    );
    let rows = anchors.len() as u64 + 2000;
    assert_eq!(s["rows"], rows, "{s}");
    assert_eq!(s["loaded"], rows, "{s}");
    assert_eq!(s["bad"], 0, "{s}");
    for a in &anchors {
        let h = hgetall(&mut con, &format!("{ap}{a}"));
        assert_eq!(h["name"], format!("name-{a}"));
        assert_eq!(h["level"], "7");
    }
    for i in [0, 999, 1999] {
        assert_eq!(
            hgetall(&mut con, &format!("{ap}x-{i}"))["name"],
            format!("extra-{i}")
        );
    }
    let mut csv = String::from("user_id,province,gender\n");
    for key in viewers.keys() {
        csv.push_str(&format!(
            "{},old-province,f\n",
            key.strip_prefix(&vp).unwrap()
        ));
    }
    let file = dir.join("viewers.csv");
    std::fs::write(&file, csv).unwrap();
    let s = dims_load(
        &env,
        &[
            "--kind",
            "viewer",
            "--file",
            file.to_str().unwrap(),
            "--key-prefix",
            &vp,
            "--as-of",
            "2021-08-16T00:00:00Z",
        ],
    );
    assert_eq!(s["bad"], 0, "{s}");
    assert!(s["fields_kept"].as_u64().unwrap() > 0, "{s}");
    for (key, want) in &viewers {
        let got = hgetall(&mut con, key);
        assert_eq!(got["gender"], "f", "{key}");
        if let Some(p) = want.get("province") {
            assert_eq!(&got["province"], p, "{key}: newer live data kept");
        }
    }

    // The monitor: every room in a pool; each event comes out enriched
    // with its room, the room's anchor and its viewer as they are now.
    env.ctl(&["pool", "create", "rooms", "--match", "room_id"]);
    let ids: Vec<String> = rooms
        .keys()
        .map(|k| k.strip_prefix(&rp).unwrap().to_owned())
        .collect();
    let pool_file = dir.join("rooms.txt");
    std::fs::write(&pool_file, ids.join("\n") + "\n").unwrap();
    env.ctl(&[
        "pool",
        "import",
        "rooms",
        "--file",
        pool_file.to_str().unwrap(),
    ]);
    let room_key = format!("{rp}{{id}}");
    let anchor_key = format!("{ap}{{id}}");
    let viewer_key = format!("{vp}{{id}}");
    let mut mon = env.spawn_stage(
        "vidpulse-monitor",
        &[
            "--room-key",
            &room_key,
            "--anchor-key",
            &anchor_key,
            "--viewer-key",
            &viewer_key,
        ],
        "monitor.log",
    );
    let with_room = events
        .iter()
        .filter(|e| {
            e["value"]["room_id"]
                .as_str()
                .is_some_and(|r| !r.is_empty())
        })
        .count() as i64;
    assert!(with_room > 0);
    wait_for(
        &format!("{with_room} monitored events"),
        Duration::from_secs(120),
        || (env.count(MONITORED) >= with_room).then_some(()),
    );
    let out = env.tail_all(MONITORED);
    let mut checked: HashMap<&str, usize> = HashMap::new();
    let visible = |h: BTreeMap<String, String>| -> Vec<(String, String)> {
        h.into_iter().filter(|(f, _)| !f.starts_with('_')).collect()
    };
    for r in &out {
        let v = &r["value"];
        let e = &v["enrichment"];
        let id = v["event"]["event_id"].as_str().unwrap();
        let room = v["event"]["room_id"].as_str().unwrap();
        let hash = hgetall(&mut con, &format!("{rp}{room}"));
        for (f, want) in visible(hash.clone()) {
            assert_eq!(e[format!("room.{f}")], want, "{f} of {room}: {v}");
        }
        *checked.entry("room").or_default() += 1;
        // The anchor: the event's own, else the room's.
        let anchor = by_id[id].clone().or_else(|| hash.get("anchor_id").cloned());
        if let Some(a) = anchor {
            assert_eq!(e["anchor.name"], format!("name-{a}"), "{v}");
            *checked.entry("anchor").or_default() += 1;
        }
        let user = v["event"]["user_id"].as_str().unwrap_or("");
        if !user.is_empty() {
            let h = visible(hgetall(&mut con, &format!("{vp}{user}")));
            for (f, want) in &h {
                assert_eq!(e[format!("viewer.{f}")], *want, "{f} of {user}: {v}");
            }
            if !h.is_empty() {
                *checked.entry("viewer").or_default() += 1;
            }
        }
    }
    println!("enrichment checked: {checked:?}");
    assert!(checked.get("anchor").copied().unwrap_or(0) > 0);
    assert!(checked.get("viewer").copied().unwrap_or(0) > 0);
    assert_eq!(
        mon.metric("vidpulse_monitor_redis_errors_total", &[]),
        0.0,
        "no Redis errors"
    );
    assert!(mon.terminate(), "monitor drains and exits 0");
    assert!(dim.terminate(), "dim-builder drains and exits 0");
}

/// The checkpoint keys of the aggregator group's partitions of `topic`.
fn checkpoint_keys(env: &Env, topic: &str) -> Vec<String> {
    let group = env.topic("vidpulse-aggregator");
    let topic = env.topic(topic);
    cluster::scan_all(&format!("vp:ckpt:{{{group}|{topic}|*"))
}

#[test]
fn aggregator_on_a_cluster_stays_exact_when_a_master_is_killed() {
    let _serial = serial();
    cluster::require();
    let env = cluster::env(Env::new("rcagg"));
    let _clean = cluster::CleanKeys(env.prefix.clone());
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let (truth, _) = gen_truth(&env, 12000, 41, &[]);
    let events = truth["expected"]["events"].as_i64().unwrap();
    let _ingest = spawn_ingest(&env);
    wait_events(&env, events);
    let mut fwd = Forwarder::start(&env);
    fwd.finish(events as u64);
    let mut want = expected(&truth, &[]);
    with_even_pool(&mut want);

    // Slow flushes and small batches, so the kill lands mid-run.
    let mut agg = spawn_aggregator(&env, "aggregator.log", &["--max-batch", "100"]);
    let killed = wait_for(
        "the first checkpoints on the cluster",
        Duration::from_secs(120),
        || {
            let keys = checkpoint_keys(&env, EVENTS);
            keys.iter().find(|k| !k.ends_with(":epoch")).cloned()
        },
    );
    let rows_before = agg.metric("vidpulse_aggregator_rows_written_total", &[]);
    let master = cluster::master_of(&killed);
    println!(
        "killing master 127.0.0.1:{master} (holds {killed}); {rows_before} rows written so far"
    );
    let down = cluster::KilledMaster::kill(master);
    wait_exact(
        &env,
        &want,
        "aggregator on a cluster, a master killed mid-run",
    );
    // The failover was seen: the aggregator kept writing after it.
    assert!(
        agg.metric("vidpulse_aggregator_rows_written_total", &[]) > rows_before,
        "rows written after the kill"
    );
    let log = std::fs::read_to_string(&agg.log).unwrap();
    assert!(
        !log.contains("Cannot read the checkpoint store's configuration"),
        "CONFIG GET asked on every master: {}",
        agg.log_tail(20)
    );
    assert!(!log.contains("may lose data"), "{}", agg.log_tail(20));
    assert!(agg.terminate(), "SIGTERM: drains, checkpoints, exits 0");

    // Every partition's checkpoint (hash and epoch, one slot) is there.
    let keys = checkpoint_keys(&env, EVENTS);
    let hashes: Vec<&String> = keys.iter().filter(|k| !k.ends_with(":epoch")).collect();
    assert!(!hashes.is_empty());
    let mut con = cluster::conn();
    for k in &hashes {
        assert!(keys.contains(&format!("{k}:epoch")), "{k}");
        let meta: Option<Vec<u8>> = con.hget(k.as_str(), "meta").unwrap();
        assert!(meta.is_some(), "{k} has no meta");
        assert_eq!(
            vidpulse_core::redis::slot(k.as_bytes()),
            vidpulse_core::redis::slot(format!("{k}:epoch").as_bytes())
        );
    }

    // A restart restores every partition from the cluster (none replayed
    // from scratch) and the results stay exact.
    let agg2 = spawn_aggregator(&env, "aggregator2.log", &[]);
    wait_for("checkpoints restored", Duration::from_secs(90), || {
        (agg2.metric("vidpulse_aggregator_checkpoints_restored_total", &[]) >= hashes.len() as f64)
            .then_some(())
    });
    wait_exact(
        &env,
        &want,
        "after a restart from the cluster's checkpoints",
    );
    drop(down);
    assert_eq!(cluster::masters().len(), 3, "the killed node rejoined");
}

/// Flags that do not fit the Redis found stop the stage at start, naming
/// the flag: more replicas to wait for than a master has, and a cluster
/// node given without `--redis-cluster` (which would otherwise answer with
/// bare MOVED errors, retried forever).
#[test]
fn redis_flags_that_do_not_fit_the_cluster_fail_at_start() {
    let _serial = serial();
    cluster::require();
    let env = cluster::env(Env::new("rcflags"));
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let fails = |env: &Env, args: &[&str], log: &str, says: &[&str]| {
        let mut p = env.spawn("vidpulse-aggregator", args, log);
        assert!(
            !p.wait_exit(Duration::from_secs(90)),
            "{log}: exited 0: {}",
            p.log_tail(10)
        );
        let tail = p.log_tail(20);
        for s in says {
            assert!(tail.contains(s), "{log}: {s:?} not in: {tail}");
        }
    };
    fails(
        &env,
        &["--redis-wait-replicas", "2"],
        "aggregator-wait.log",
        &["--redis-wait-replicas", "has 1"],
    );
    let single = env.with_var(
        "VIDPULSE_REDIS_URL",
        &format!("redis://127.0.0.1:{}", cluster::node_port(1)),
    );
    let single = single.with_var("VIDPULSE_REDIS_CLUSTER", "false");
    fails(&single, &[], "aggregator-mode.log", &["--redis-cluster"]);
}

/// The Redis Streams source on a cluster: entries XADDed to a stream (on
/// whichever master its slot lives) all reach vp.events.v1, acknowledged.
#[test]
fn redis_stream_source_on_a_cluster() {
    let _serial = serial();
    cluster::require();
    let env = cluster::env(Env::new("rcstream"));
    let _clean = cluster::CleanKeys(env.prefix.clone());
    env.create_topics();
    let stream = format!("{}user_actions", env.prefix);
    let mut con = cluster::conn();
    let n = 500;
    for i in 0..n {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("type")
            .arg("like")
            .arg("timestamp")
            .arg(1_629_075_600 + i)
            .arg("user_id")
            .arg(format!("u-{i}"))
            .arg("target_id")
            .arg(format!("v-{}", i % 7))
            .query(&mut con)
            .unwrap();
    }
    let spec = format!("{stream}=user_actions");
    let mut ingest = env.spawn_stage(
        "vidpulse-ingest",
        &["--redis-stream", &spec, "--redis-group", "vp-ingest"],
        "ingest.log",
    );
    wait_events(&env, n);
    wait_for("every entry acknowledged", Duration::from_secs(60), || {
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(&stream)
            .arg("vp-ingest")
            .query(&mut con)
            .unwrap();
        match pending {
            redis::Value::Array(v) if matches!(v.first(), Some(redis::Value::Int(0))) => Some(()),
            _ => None,
        }
    });
    assert_eq!(env.count(EVENTS), n);
    assert!(ingest.terminate(), "ingest drains and exits 0");
}
