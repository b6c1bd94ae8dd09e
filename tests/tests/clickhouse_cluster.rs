//! End-to-end on the local ClickHouse cluster (`scripts/stack up
//! --clickhouse-cluster`: ZooKeeper and 2 shards × 2 replicas, started here
//! when missing): gen → ingest → dim-builder → monitor → aggregator with
//! `--clickhouse-cluster`, and every default metric and leaderboard equals
//! gen's truth through `vidpulse query`. Meanwhile one replica is killed
//! with SIGKILL while the aggregator writes, a second aggregator instance
//! joins the group writing through a server of the other shard (partitions
//! move to it; the monitored events arrive only then, so both write), the
//! replica is started again and catches up: values are exact, through
//! either shard's servers, and both replicas of each shard end with the
//! same rows.
//!
//! Each run uses its own database, dropped `ON CLUSTER` at the end. Times
//! are printed, never asserted.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vidpulse_e2e::*;

const CLUSTER: &str = "vidpulse";
/// The nodes scripts/stack-cluster.sh starts: (service, HTTP port, shard).
const NODES: [(&str, u16, u8); 4] = [
    ("clickhouse-s1r1", 8131, 1),
    ("clickhouse-s1r2", 8132, 1),
    ("clickhouse-s2r1", 8133, 2),
    ("clickhouse-s2r2", 8134, 2),
];
const KILLED: &str = "clickhouse-s2r2";

/// HTTP port of node `i` (the script's defaults, or its environment).
fn node_port(i: usize) -> u16 {
    std::env::var("VIDPULSE_CH_CLUSTER_HTTP_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .map(|base| base + i as u16)
        .unwrap_or(NODES[i].1)
}

fn url(i: usize) -> String {
    format!("http://127.0.0.1:{}", node_port(i))
}

/// `scripts/stack ARGS`; panics with its output on failure.
fn stack(args: &[&str]) {
    let out = Command::new(repo_root().join("scripts/stack"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/stack {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SQL on node `i`; the body of a 200 answer, or the error.
fn sql(i: usize, q: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", node_port(i))).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST / HTTP/1.0\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{q}",
        q.len()
    )
    .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let (head, body) = buf.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    if head.contains(" 200 ") {
        Ok(body.to_owned())
    } else {
        Err(body.to_owned())
    }
}

/// Drops the test's database on every node when dropped.
struct DropDatabase(String);

impl Drop for DropDatabase {
    fn drop(&mut self) {
        // VIDPULSE_TEST_KEEP_DATABASE=1 keeps it for a look (or to feed its
        // rows to another ClickHouse version).
        if std::env::var("VIDPULSE_TEST_KEEP_DATABASE").is_ok_and(|v| v == "1") {
            println!("kept database {}", self.0);
            return;
        }
        // Every node up first (a failed test may leave one killed), or the
        // DROP waits for it and leaves the database there.
        let _ = Command::new(repo_root().join("scripts/stack"))
            .args(["up", "--clickhouse-cluster"])
            .output();
        let _ = sql(
            0,
            &format!("DROP DATABASE IF EXISTS `{}` ON CLUSTER {CLUSTER}", self.0),
        );
    }
}

/// A command with the test's prefix, brokers and ClickHouse cluster.
fn cmd(env: &Env, db: &str, node: usize, name: &str) -> Command {
    let mut c = env.cmd(name);
    c.env("VIDPULSE_CLICKHOUSE_URL", url(node))
        .env("VIDPULSE_CLICKHOUSE_DATABASE", db)
        .env("VIDPULSE_CLICKHOUSE_CLUSTER", CLUSTER);
    c
}

fn metrics(port: u16) -> BTreeMap<String, f64> {
    prom(
        &http_get(port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default(),
    )
}

fn aggregator(env: &Env, db: &str, node: usize, port: u16, log: &str) -> Proc {
    let mut c = cmd(env, db, node, "vidpulse-aggregator");
    c.args([
        "--admin-addr",
        &format!("127.0.0.1:{port}"),
        "--early-emit",
        "200ms",
        "--flush-interval",
        "200ms",
        "--flush-max-rows",
        "50",
        // A member that left is noticed soon.
        "--kafka-option",
        "session.timeout.ms=6000",
    ]);
    env.spawn_command(c, "vidpulse-aggregator", log)
}

/// Rows of `vidpulse query NAME` through node `node`.
fn query(env: &Env, db: &str, node: usize, name: &str) -> Result<Vec<Value>, String> {
    let out = cmd(env, db, node, "vidpulse")
        .args(["query", name, "--format", "json"])
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect())
}

fn canon(rows: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    v.sort();
    v
}

fn differences(
    env: &Env,
    db: &str,
    node: usize,
    want: &BTreeMap<String, Vec<Value>>,
) -> Vec<String> {
    let mut bad = Vec::new();
    for (name, rows) in want {
        match query(env, db, node, name) {
            Err(e) => bad.push(format!("{name}: {e}")),
            Ok(got) => {
                let (a, b) = (canon(rows), canon(&got));
                if a != b {
                    let sa: BTreeSet<&String> = a.iter().collect();
                    let sb: BTreeSet<&String> = b.iter().collect();
                    let missing: Vec<_> = sa.difference(&sb).take(2).collect();
                    let extra: Vec<_> = sb.difference(&sa).take(2).collect();
                    bad.push(format!(
                        "{name}: want {} rows, got {}; missing {missing:?}; unexpected {extra:?}",
                        a.len(),
                        b.len()
                    ));
                }
            }
        }
    }
    bad
}

fn wait_exact(env: &Env, db: &str, node: usize, want: &BTreeMap<String, Vec<Value>>, what: &str) {
    let started = Instant::now();
    let mut last = Vec::new();
    while started.elapsed() < Duration::from_secs(240) {
        last = differences(env, db, node, want);
        if last.is_empty() {
            println!(
                "{what}: every value equals the truth after {:?} ({} names, read through {})",
                started.elapsed(),
                want.len(),
                NODES[node].0
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!(
        "{what}: still different from the truth:\n{}",
        last.join("\n")
    );
}

/// Local tables of the test's database (`…_local`).
fn local_tables(db: &str) -> Vec<String> {
    sql(
        0,
        &format!(
            "SELECT name FROM system.tables WHERE database = '{db}' AND endsWith(name, '_local') ORDER BY name"
        ),
    )
    .unwrap()
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Row count and an order-independent checksum of a local table on node `i`.
fn fingerprint(i: usize, db: &str, table: &str) -> Result<String, String> {
    sql(
        i,
        &format!("SELECT count(), sum(cityHash64(*)) FROM `{db}`.`{table}` FINAL"),
    )
    .map(|s| s.trim().to_owned())
}

#[test]
fn the_pipeline_on_a_2x2_cluster_stays_exact_through_a_killed_replica_and_a_second_writer() {
    let started = Instant::now();
    stack(&["up", "--clickhouse-cluster"]);
    println!("cluster up in {:?}", started.elapsed());
    let env = Env::new("chcluster");
    let db: String = format!("vpt_{}", env.prefix)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let db = db.trim_end_matches('_').to_owned();
    let _drop = DropDatabase(db.clone());
    env.create_topics();
    // A cluster the servers do not define fails at start, saying so.
    let out = cmd(&env, &db, 0, "vidpulse-aggregator")
        .env("VIDPULSE_CLICKHOUSE_CLUSTER", "nosuch")
        .args(["--admin-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--clickhouse-cluster nosuch") && err.contains("it has vidpulse"),
        "{err}"
    );

    // Input: gen's seeds with duplicates, late and malformed records, through
    // the real stages (dim-builder first: rooms are in Redis before the
    // monitor enriches their gifts, as in production).
    let truth_path = scratch(&env.prefix).join("truth.json");
    let out = env.run(
        "vidpulse-gen",
        &[
            "--count",
            "3000",
            "--seed",
            "61",
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
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let truth = read_json(&truth_path);
    let events = truth["expected"]["events"].as_i64().unwrap();
    let _ingest = env.spawn(
        "vidpulse-ingest",
        &["--admin-addr", &format!("127.0.0.1:{}", free_port())],
        "ingest.log",
    );
    wait_for(
        &format!("{events} events"),
        Duration::from_secs(180),
        || (env.count("vp.events.v1") >= events).then_some(()),
    );
    let dims_port = free_port();
    let mut dims = env.spawn(
        "vidpulse-dim-builder",
        &[
            "--admin-addr",
            &format!("127.0.0.1:{dims_port}"),
            "--key-prefix",
            &format!("{}room:", env.prefix),
            "--viewer-key-prefix",
            &format!("{}viewer:", env.prefix),
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
    let mut want = BTreeMap::new();
    for section in ["metrics", "leaderboards"] {
        for (name, rows) in truth[section].as_object().unwrap() {
            want.insert(name.clone(), rows.as_array().unwrap().clone());
        }
    }
    let t_input = started.elapsed();

    // Aggregator A writes through shard 1's first server.
    let port_a = free_port();
    let mut a = aggregator(&env, &db, 0, port_a, "aggregator-a.log");
    let written = |port| {
        prom_sum(
            &metrics(port),
            "vidpulse_aggregator_rows_written_total",
            &[],
        )
    };
    wait_for("A's first rows", Duration::from_secs(120), || {
        (written(port_a) > 0.0).then_some(())
    });
    // The schema is ON CLUSTER: every node has the local and Distributed
    // tables and the views.
    let locals = local_tables(&db);
    assert!(locals.len() >= 10, "{locals:?}");
    for (i, (node, ..)) in NODES.iter().enumerate() {
        let n: usize = sql(
            i,
            &format!("SELECT count() FROM system.tables WHERE database = '{db}'"),
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
        assert_eq!(
            n,
            locals.len() * 3 + 1,
            "{node}: local, Distributed and view per table, and the generation registry"
        );
    }
    let engine = sql(
        0,
        &format!(
            "SELECT engine FROM system.tables WHERE database = '{db}' AND name = '{}'",
            locals[0]
        ),
    )
    .unwrap();
    assert_eq!(engine.trim(), "ReplicatedReplacingMergeTree");

    // A replica of shard 2 dies mid-run.
    let before_kill = written(port_a);
    stack(&["kill", KILLED]);
    println!("{KILLED} killed after A wrote {before_kill} rows");

    // Aggregator B joins the group writing through shard 2's other server:
    // partitions move from A to B, B re-sends their unsaved tails from there.
    let port_b = free_port();
    let mut b = aggregator(&env, &db, 2, port_b, "aggregator-b.log");
    let owned = |port| prom_sum(&metrics(port), "vidpulse_aggregator_partitions_owned", &[]);
    wait_for("B to own partitions", Duration::from_secs(120), || {
        (owned(port_b) > 0.0).then_some(())
    });
    // Only now the monitor fills vp.monitored.v1: both instances write its
    // metrics, each for its half of the partitions, through its own shard.
    let _monitor = env.spawn(
        "vidpulse-monitor",
        &[
            "--pool",
            "all",
            "--admin-addr",
            &format!("127.0.0.1:{}", free_port()),
            "--room-key",
            &format!("{}room:{{id}}", env.prefix),
            "--anchor-key",
            &format!("{}anchor:{{id}}", env.prefix),
            "--viewer-key",
            &format!("{}viewer:{{id}}", env.prefix),
        ],
        "monitor.log",
    );
    wait_for(
        &format!("{events} monitored events"),
        Duration::from_secs(120),
        || (env.count("vp.monitored.v1") >= events).then_some(()),
    );
    // Both read everything while the replica is down. (A batch that the
    // killed replica had acknowledged just before dying is invisible until
    // it returns and its shard-mate fetches it: without insert_quorum,
    // exactness is promised after the restart, checked below.)
    // Committed offsets are stored only after the rows are written. (Not
    // "lag 0": ingest keeps writing watermark records, so the end moves.)
    for topic in ["vp.events.v1", "vp.monitored.v1"] {
        env.wait_caught_up("vidpulse-aggregator", topic, Duration::from_secs(180));
    }
    let meanwhile = differences(&env, &db, 0, &want);
    println!(
        "caught up with {KILLED} down after {:?}; {} of {} names differ from the truth meanwhile",
        started.elapsed(),
        meanwhile.len(),
        want.len()
    );
    let (wa, wb) = (written(port_a), written(port_b));
    println!(
        "rows written: A {wa} ({} while {KILLED} was down), B {wb}; partitions A {}, B {}",
        wa - before_kill,
        owned(port_a),
        owned(port_b)
    );
    assert!(wb > 0.0, "B wrote through shard 2's server");
    assert!(sql(3, "SELECT 1").is_err(), "{KILLED} is down");

    // The replica comes back and catches up from the replication log.
    let restarted = Instant::now();
    stack(&["up", KILLED]);
    // Both replicas of each shard end with the same rows (the restarted one
    // fetched what it missed), and the shards differ (the data is spread,
    // not copied).
    let mut spread = 0;
    for t in &locals {
        let prints = wait_for(
            &format!("{t}: {KILLED} to hold what its shard-mate holds"),
            Duration::from_secs(120),
            || {
                let p: Vec<String> = (0..NODES.len())
                    .map(|i| fingerprint(i, &db, t))
                    .collect::<Result<_, _>>()
                    .ok()?;
                (p[0] == p[1] && p[2] == p[3]).then_some(p)
            },
        );
        if prints[0] != prints[2] {
            spread += 1;
        }
    }
    println!(
        "{KILLED} caught up {:?} after its restart ({} tables)",
        restarted.elapsed(),
        locals.len()
    );
    assert!(
        spread > 0,
        "every table is identical on both shards: not sharded"
    );
    // Exact through the restarted replica's server and the other shard's.
    for node in [3, 1] {
        wait_exact(&env, &db, node, &want, "after the replica's restart");
    }
    // The API in cluster mode answers the same, through shard 2's server.
    let api_port = free_port();
    let mut c = cmd(&env, &db, 2, "vidpulse-api");
    c.env("VIDPULSE_API_POOLS", "false").args([
        "--listen",
        &format!("127.0.0.1:{api_port}"),
        "--max-rows",
        "5000",
    ]);
    let _api = env.spawn_command(c, "vidpulse-api", "api.log");
    wait_for("vidpulse-api ready", Duration::from_secs(30), || {
        http_get(api_port, "/readyz").filter(|(s, _)| *s == 200)
    });
    let (from, to) = ("2021-08-16T00:00:00Z", "2021-08-16T02:00:00Z");
    let mut checked = 0;
    for (name, rows) in truth["metrics"].as_object().unwrap() {
        if name == "live_viewer_log" {
            continue;
        }
        let (status, body) = http_json(
            api_port,
            &format!("/api/metrics/{name}?from={from}&to={to}"),
        )
        .unwrap();
        assert_eq!(status, 200, "{name}: {body}");
        let want: Vec<Value> = rows
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| (from..to).contains(&r["window_start"].as_str().unwrap_or_default()))
            .cloned()
            .collect();
        let got = body["rows"].as_array().cloned().unwrap_or_default();
        assert_eq!(canon(&got), canon(&want), "API {name}");
        checked += 1;
    }
    println!("the API answers {checked} metrics like the truth");
    // Filters push down through the Distributed tables (a time range and a
    // group value; the log with a time range).
    let out = cmd(&env, &db, 1, "vidpulse")
        .args([
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
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let expect = want["gifts_by_type_1m"]
        .iter()
        .filter(|r| {
            let w = r["window_start"].as_str().unwrap();
            r["gift_type"] == "3" && ("2021-08-16T01:03:00Z"..="2021-08-16T01:04:00Z").contains(&w)
        })
        .count();
    assert!(expect > 0);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), expect);
    let log = cmd(&env, &db, 1, "vidpulse")
        .args([
            "query",
            "live_viewer_log",
            "--format",
            "json",
            "--from",
            "2021-08-16T01:05:00Z",
        ])
        .output()
        .unwrap();
    assert!(
        log.status.success(),
        "{}",
        String::from_utf8_lossy(&log.stderr)
    );
    let expect = want["live_viewer_log"]
        .iter()
        .filter(|r| r["event_time"].as_str().unwrap() >= "2021-08-16T01:05:00")
        .count();
    assert!(expect > 0);
    assert_eq!(String::from_utf8_lossy(&log.stdout).lines().count(), expect);
    assert!(
        a.terminate() && b.terminate(),
        "both aggregators drain and exit 0"
    );
    println!(
        "input ready after {t_input:?}; whole test {:?}",
        started.elapsed()
    );
}
