//! The aggregator under operational faults, on the real broker, Redis and
//! ClickHouse (scripts/stack up): a SIGTERM while ClickHouse or Redis is
//! down, the state store wiped (FLUSHALL) or restarted without persistence
//! mid-run, a narrowed spec, topics deleted and recreated under kept Redis
//! and ClickHouse, lost leaderboard sets and parts, records deleted by
//! retention. After recovery every value equals gen's truth (or, for the
//! narrowed spec, the same spec run into a fresh database).
//!
//! Redis faults use a Redis of the test's own (scripts/stack on another
//! port); the ClickHouse outage stops the shared one, so the tests run one
//! at a time. Times are printed, never asserted.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use serde_json::Value;
use vidpulse_e2e::*;

/// Waits for gen to finish; its truth, every name but the monitor's.
fn want(generator: LiveGen) -> BTreeMap<String, Vec<Value>> {
    expected(&generator.truth(), &FROM_MONITORED)
}

fn received(p: &Proc) -> f64 {
    prom_sum(&p.metrics(), "vidpulse_records_received_total", &[])
}

fn wait_received(p: &Proc, n: f64) {
    wait_for(
        &format!("the aggregator to read {n} records"),
        Duration::from_secs(120),
        || (received(p) >= n).then_some(()),
    );
}

/// Waits until `/readyz` answers 503 and returns its body.
fn wait_not_ready(p: &Proc, timeout: Duration) -> String {
    wait_for("readyz to say 503", timeout, || match p.ready() {
        Some((503, body)) => Some(body),
        _ => None,
    })
}

/// SIGTERM, then the process must exit by itself within the drain timeout
/// (whatever it could not write stays unacknowledged: re-read on restart).
fn sigterm(p: &mut Proc) {
    p.signal("TERM");
    assert!(
        p.wait_exit(Duration::from_secs(90)),
        "the aggregator did not stop after SIGTERM: {}",
        p.log_tail(20)
    );
}

/// Restarts ClickHouse when dropped, so a failing test leaves it running.
struct ClickHouseBack;

impl Drop for ClickHouseBack {
    fn drop(&mut self) {
        stack(&["start", "clickhouse"]);
    }
}

fn stack(args: &[&str]) {
    let st = std::process::Command::new(repo_root().join("scripts/stack"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "scripts/stack {args:?} failed");
}

#[test]
fn sigterm_while_clickhouse_is_down_then_restart_is_exact() {
    let _serial = serial();
    let env = Env::new("fch");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    // Long enough that records still arrive once ClickHouse is down (its
    // stop takes up to 20 s).
    let generator = LiveGen::start(&env, 6000, 150, 61);
    let _ingest = spawn_ingest(&env);
    let mut agg = spawn_aggregator(&env, "aggregator-1.log", &["--flush-max-rows", "50"]);
    wait_received(&agg, 300.0);
    wait_for("a first write", Duration::from_secs(60), || {
        (agg.metric("vidpulse_aggregator_rows_written_total", &[]) > 0.0).then_some(())
    });

    let back = ClickHouseBack;
    stack(&["stop", "clickhouse"]);
    let body = wait_not_ready(&agg, Duration::from_secs(60));
    assert!(body.contains("clickhouse"), "{body}");
    // A rollout while ClickHouse is away: the pod is told to stop.
    sigterm(&mut agg);
    let log = agg.log_tail(40);
    assert!(
        !log.contains("Final flush done"),
        "nothing may be checkpointed past the unwritten rows: {log}"
    );
    drop(back);
    let _agg = spawn_aggregator(&env, "aggregator-2.log", &[]);
    let want = want(generator);
    wait_exact(
        &env,
        &want,
        "SIGTERM during a ClickHouse outage, then restarted",
    );
}

#[test]
fn sigterm_while_redis_is_down_then_restart_is_exact() {
    let _serial = serial();
    let base = Env::new("fredis");
    let _tables = DropTables(base.prefix.clone());
    let redis = PrivateRedis::start(&base);
    let env = base.with_var("VIDPULSE_REDIS_URL", &redis.url());
    env.create_topics();
    let generator = LiveGen::start(&env, 6000, 150, 62);
    let _ingest = spawn_ingest(&env);
    let mut agg = spawn_aggregator(&env, "aggregator-1.log", &["--flush-max-rows", "50"]);
    wait_received(&agg, 300.0);

    redis.stack("stop");
    let body = wait_not_ready(&agg, Duration::from_secs(60));
    assert!(
        body.contains("redis") || body.contains("checkpoint"),
        "{body}"
    );
    sigterm(&mut agg);
    // Redis comes back with its data (persistence on).
    redis.stack("start");
    let _agg = spawn_aggregator(&env, "aggregator-2.log", &[]);
    let want = want(generator);
    wait_exact(&env, &want, "SIGTERM during a Redis outage, then restarted");
}

/// A pipeline on a Redis of the test's own: gen writing 3000 records at
/// 150/s with `seed`, ingest, and an aggregator flushing every 100 records.
struct OwnRedisRun {
    // Dropped in this order: the processes, then the tables and Redis.
    agg: Proc,
    _ingest: Proc,
    generator: LiveGen,
    env: Env,
    redis: PrivateRedis,
    _tables: DropTables,
}

impl OwnRedisRun {
    fn start(name: &str, seed: u64) -> OwnRedisRun {
        let base = Env::new(name);
        let tables = DropTables(base.prefix.clone());
        let redis = PrivateRedis::start(&base);
        let env = base.with_var("VIDPULSE_REDIS_URL", &redis.url());
        env.create_topics();
        let generator = LiveGen::start(&env, 3000, 150, seed);
        let ingest = spawn_ingest(&env);
        let agg = spawn_aggregator(&env, "aggregator-1.log", &["--flush-max-rows", "100"]);
        OwnRedisRun {
            agg,
            _ingest: ingest,
            generator,
            env,
            redis,
            _tables: tables,
        }
    }
}

#[test]
fn flushall_mid_run_is_detected_and_replayed_exactly() {
    let _serial = serial();
    let mut run = OwnRedisRun::start("fflush", 63);
    let (redis, agg) = (&run.redis, &run.agg);
    wait_received(agg, 800.0);

    let mut con = redis.conn();
    let () = redis::cmd("FLUSHALL").query(&mut con).unwrap();
    println!("FLUSHALL after {} records read", received(agg));
    let lost = wait_for("the loss to be detected", Duration::from_secs(60), || {
        let n = agg.metric("vidpulse_aggregator_store_lost_total", &[]);
        (n > 0.0).then_some(n)
    });
    println!("{lost} partitions replayed from their earliest offset");
    let want = want(run.generator);
    wait_exact(&run.env, &want, "after FLUSHALL mid-run");
    assert!(run.agg.is_running(), "recovered without a restart");
    assert_eq!(run.agg.ready().map(|r| r.0), Some(200));
}

/// A failover to a replica that had not received the last checkpoint
/// writes, played on one Redis: the checkpoint hashes (and epoch keys) are
/// put back as they were a while ago, under the running aggregator. Its
/// next write finds fewer writes than it made, restores the partition from
/// what the store holds and replays from there; a kill -9 later and a
/// restart from the store still come out exact.
#[test]
fn a_checkpoint_store_that_failed_over_behind_is_restored_from_what_it_holds() {
    let _serial = serial();
    let mut run = OwnRedisRun::start("fbehind", 65);
    wait_received(&run.agg, 600.0);

    let mut con = run.redis.conn();
    // The writes each checkpoint hash has taken (`#seq`); a partition that
    // was assigned but not yet written has only its epoch key.
    let seqs = |con: &mut redis::Connection| -> BTreeMap<String, u64> {
        let keys: Vec<String> = redis::cmd("KEYS").arg("vp:ckpt:*").query(con).unwrap();
        keys.into_iter()
            .filter(|k| !k.ends_with(":epoch"))
            .filter_map(|k| {
                let n: Option<u64> = redis::cmd("HGET").arg(&k).arg("#seq").query(con).unwrap();
                Some((k, n?))
            })
            .collect()
    };
    // Copy only once a checkpoint was written: copying epoch keys alone
    // would put nothing back behind.
    wait_for("a first checkpoint write", Duration::from_secs(120), || {
        (!seqs(&mut con).is_empty()).then_some(())
    });
    let keys: Vec<String> = redis::cmd("KEYS").arg("vp:ckpt:*").query(&mut con).unwrap();
    let snapshot: Vec<(String, Vec<u8>)> = keys
        .iter()
        .map(|k| {
            (
                k.clone(),
                redis::cmd("DUMP").arg(k).query(&mut con).unwrap(),
            )
        })
        .collect();
    // Put back only once some hash took more writes than it had when
    // copied, else nothing would be behind.
    let copied = seqs(&mut con);
    let at = received(&run.agg);
    wait_for(
        "a checkpoint written after the copy",
        Duration::from_secs(60),
        || {
            let now = seqs(&mut con);
            copied
                .iter()
                .any(|(k, c)| now.get(k).is_some_and(|n| n > c))
                .then_some(())
        },
    );
    for (k, dump) in &snapshot {
        let () = redis::cmd("RESTORE")
            .arg(k)
            .arg(0)
            .arg(dump.as_slice())
            .arg("REPLACE")
            .query(&mut con)
            .unwrap();
    }
    println!(
        "{} checkpoint keys put back to {at} records read, at {} read",
        snapshot.len(),
        received(&run.agg)
    );
    let behind = wait_for(
        "the store to be found behind",
        Duration::from_secs(60),
        || {
            let n = run
                .agg
                .metric("vidpulse_aggregator_store_behind_total", &[]);
            (n > 0.0).then_some(n)
        },
    );
    println!("{behind} partitions restored from what the store held");
    wait_received(&run.agg, received(&run.agg) + 300.0);
    // Records never read (a take-over reading from the wrong position)
    // would make the totals short: say so before they are compared.
    let gaps = |p: &Proc| p.metric("vidpulse_aggregator_offset_gaps_total", &[]);
    let before = gaps(&run.agg);
    println!("offset gaps before the kill: {before}");
    // What it wrote since must restore consistently.
    run.agg.kill9();
    let agg = spawn_aggregator(&run.env, "aggregator-2.log", &[]);
    let want = want(run.generator);
    wait_exact(&run.env, &want, "after the store fell behind, then kill -9");
    assert_eq!((before, gaps(&agg)), (0.0, 0.0), "offsets skipped");
}

#[test]
fn redis_restarted_without_persistence_mid_run_is_replayed_exactly() {
    let _serial = serial();
    let base = Env::new("fnopersist");
    let _tables = DropTables(base.prefix.clone());
    let redis = PrivateRedis::start_with(&base, false);
    let env = base.with_var("VIDPULSE_REDIS_URL", &redis.url());
    env.create_topics();
    let generator = LiveGen::start(&env, 3000, 150, 64);
    let _ingest = spawn_ingest(&env);
    let agg = spawn_aggregator(&env, "aggregator.log", &["--flush-max-rows", "100"]);
    // It says loudly that this store may lose its checkpoints.
    wait_for("the durability warning", Duration::from_secs(30), || {
        agg.log_tail(200)
            .contains("The checkpoint store (Redis) may lose data")
            .then_some(())
    });
    wait_received(&agg, 800.0);
    redis.stack("stop");
    wait_not_ready(&agg, Duration::from_secs(60));
    redis.stack("start");
    wait_for("the loss to be detected", Duration::from_secs(90), || {
        (agg.metric("vidpulse_aggregator_store_lost_total", &[]) > 0.0).then_some(())
    });
    let want = want(generator);
    wait_exact(&env, &want, "after a Redis restart without persistence");
}

/// The default spec, narrowed: fewer gift types in one metric, a tighter
/// `when` on another, fewer kinds on a third.
fn narrowed_spec() -> String {
    let spec = String::from_utf8(
        std::process::Command::new(bin("vidpulse-aggregator"))
            .arg("--print-spec")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let mut s = spec.clone();
    for (from, to) in [
        (
            "name = \"gifts_6h\"\n",
            "name = \"gifts_6h\"\nwhen = { field = \"gift_type\", one_of = [\"1\", \"2\", \"3\"] }\n",
        ),
        (
            "name = \"user_actions_1m\"\n",
            "name = \"user_actions_1m\"\nwhen = { field = \"action\", equals = \"like\" }\n",
        ),
        (
            "kinds = [\"viewer_arrived\", \"viewer_left\"]",
            "kinds = [\"viewer_arrived\"]",
        ),
    ] {
        assert!(s.contains(from), "the default spec has no {from:?}");
        s = s.replacen(from, to, 1);
    }
    assert_ne!(s, spec);
    s
}

/// Every name's rows as `vidpulse query` prints them.
fn all_rows(env: &Env, names: &[String]) -> BTreeMap<String, Vec<String>> {
    names
        .iter()
        .map(|n| (n.clone(), canon(&query(env, n))))
        .collect()
}

/// Drops a ClickHouse database when dropped.
struct DropDatabase(String);

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let _ = clickhouse_sql(&format!("DROP DATABASE IF EXISTS `{}`", self.0));
    }
}

#[test]
fn a_narrowed_spec_replaces_its_results_like_a_fresh_run() {
    let _serial = serial();
    let env = Env::new("fspec");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let (truth, _) = gen_truth(&env, 2500, 65, &[]);
    let _ingest = spawn_ingest(&env);
    let mut agg = spawn_aggregator(&env, "aggregator-wide.log", &[]);
    let want = expected(&truth, &FROM_MONITORED);
    wait_exact(&env, &want, "the default spec");
    assert!(agg.terminate());

    let spec = scratch(&env.prefix).join("narrow.toml");
    std::fs::write(&spec, narrowed_spec()).unwrap();
    let spec = spec.to_str().unwrap();
    let names: Vec<String> = want.keys().cloned().collect();
    // The same group, database and Redis: its checkpoints and rows were
    // made under the wider spec.
    let _narrow = spawn_aggregator(&env, "aggregator-narrow.log", &["--spec", spec]);
    // The same spec into a fresh database, a fresh group and a fresh Redis.
    let fresh_db = format!("vpt_{}", env.prefix.trim_end_matches('.').replace('.', "_"));
    let _drop_db = DropDatabase(fresh_db.clone());
    let redis = PrivateRedis::start(&env);
    let fresh = env
        .clone()
        .with_var("VIDPULSE_CLICKHOUSE_DATABASE", &fresh_db)
        .with_var("VIDPULSE_REDIS_URL", &redis.url());
    let _fresh = spawn_aggregator(
        &fresh,
        "aggregator-fresh.log",
        &["--spec", spec, "--group", "fresh"],
    );
    let started = Instant::now();
    loop {
        let a = all_rows(&env, &names);
        let b = all_rows(&fresh, &names);
        if a == b && a.values().all(|rows| !rows.is_empty()) {
            // Settled: it stays equal.
            std::thread::sleep(Duration::from_secs(3));
            if all_rows(&env, &names) == a && all_rows(&fresh, &names) == b {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the narrowed spec's results differ from a fresh run's: {:?}",
            names
                .iter()
                .filter(|n| a.get(*n) != b.get(*n))
                .map(|n| format!("{n}: {} rows here, {} fresh", a[n].len(), b[n].len()))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "narrowed spec equals a fresh run after {:?}",
        started.elapsed()
    );
    let now = all_rows(&env, &names);
    let changed: Vec<&String> = names
        .iter()
        .filter(|n| canon(&want[*n]) != now[*n])
        .collect();
    println!("changed by the narrowing: {changed:?}");
    for n in ["gifts_6h", "user_actions_1m"] {
        assert!(changed.contains(&&n.to_owned()), "{n} did not change");
    }
    // The others were rewritten identically.
    for n in names.iter().filter(|n| !changed.contains(n)) {
        assert_eq!(now[n], canon(&want[n]), "{n}");
    }
}

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap()
}

fn topic_exists(topic: &str) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    c.fetch_metadata(Some(topic), Duration::from_secs(10))
        .is_ok_and(|md| {
            md.topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        })
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn recreated_topics_are_refused_then_rebuilt_with_reset_state() {
    let _serial = serial();
    let env = Env::new("frecreate");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let (truth, _) = gen_truth(&env, 2500, 66, &[]);
    let mut ingest = spawn_ingest(&env);
    let mut agg = spawn_aggregator(&env, "aggregator-1.log", &[]);
    wait_exact(&env, &expected(&truth, &FROM_MONITORED), "the first topics");
    assert!(agg.terminate() && ingest.terminate());

    // A dev stack restarted: the topics are gone and made again, Redis and
    // ClickHouse keep the checkpoints and rows.
    let names: Vec<String> = ["vp.events.v1", "vp.monitored.v1", "vp.late.v1", "vp.dlq.v1"]
        .into_iter()
        .chain(vidpulse_core::topics::RAW)
        .map(|t| env.topic(t))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let deleted = block_on(admin().delete_topics(&refs, &AdminOptions::new())).unwrap();
    for r in deleted {
        if let Err((t, code)) = r {
            assert_eq!(
                code,
                rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
                "deleting {t}"
            );
        }
    }
    wait_for("the topics to be gone", Duration::from_secs(60), || {
        (!topic_exists(&env.topic("vp.events.v1"))).then_some(())
    });
    env.create_topics();
    let (truth, _) = gen_truth(&env, 1200, 67, &[]);
    let _ingest = spawn_ingest(&env);
    let want = expected(&truth, &FROM_MONITORED);
    wait_for("the new events", Duration::from_secs(120), || {
        (env.count("vp.events.v1") >= truth["expected"]["events"].as_i64().unwrap()).then_some(())
    });

    let mut refused = spawn_aggregator(&env, "aggregator-2.log", &[]);
    assert!(
        !refused.wait_exit(Duration::from_secs(90)),
        "the aggregator exited 0 over recreated topics"
    );
    let log = refused.log_tail(30);
    assert!(
        log.contains("--reset-state") && log.contains("recreated"),
        "{log}"
    );
    println!(
        "refused: {}",
        log.lines()
            .rev()
            .find(|l| l.contains("recreated"))
            .unwrap_or_default()
    );

    let _agg = spawn_aggregator(&env, "aggregator-3.log", &["--reset-state"]);
    wait_exact(&env, &want, "recreated topics after --reset-state");
}

/// Deletes the consumer group's checkpoints (hashes and epochs), as a state
/// store that lost them would: the next start replays every partition.
fn delete_checkpoints(env: &Env) {
    let mut con = redis_conn();
    let pattern = format!("vp:ckpt:{{{}vidpulse-aggregator|*", env.prefix);
    let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(&mut con).unwrap();
    assert!(!keys.is_empty(), "no checkpoints under {pattern}");
    let () = redis::cmd("DEL").arg(&keys).query(&mut con).unwrap();
}

fn board_keys(env: &Env, stem: &str) -> Vec<String> {
    let mut con = redis_conn();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}{stem}*", env.prefix))
        .query(&mut con)
        .unwrap();
    keys.sort();
    keys
}

#[test]
fn leaderboards_are_rebuilt_whatever_part_was_lost() {
    let _serial = serial();
    let env = Env::new("fboards");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let (truth, _) = gen_truth(&env, 2500, 68, &[]);
    let _ingest = spawn_ingest(&env);
    let mut agg = spawn_aggregator(&env, "aggregator-1.log", &[]);
    let want = expected(&truth, &FROM_MONITORED);
    wait_exact(&env, &want, "first run");

    // gifts_6h over a range: the windows of the unfiltered output.
    let (from, to) = ("2021-08-16T01:03:00Z", "2021-08-16T01:07:00Z");
    let ranged = env.ctl(&[
        "query", "gifts_6h", "--format", "json", "--from", from, "--to", to,
    ]);
    let ranged: Vec<Value> = ranged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let inside: Vec<Value> = query(&env, "gifts_6h")
        .into_iter()
        .filter(|r| {
            let w = r["window_start"].as_str().unwrap();
            ("2021-08-16T01:03:00".."2021-08-16T01:07:00").contains(&w)
        })
        .collect();
    assert_eq!(inside.len(), 4, "four one-minute slides in the range");
    assert_eq!(canon(&ranged), canon(&inside), "gifts_6h --from/--to");
    assert!(agg.terminate());

    // The sorted set lost, its parts kept; then a replay of every partition
    // (the checkpoints lost too).
    let sets: Vec<String> = board_keys(&env, "rankings")
        .into_iter()
        .filter(|k| !k.ends_with(":parts"))
        .collect();
    assert!(!sets.is_empty());
    let mut con = redis_conn();
    let () = redis::cmd("DEL").arg(&sets).query(&mut con).unwrap();
    delete_checkpoints(&env);
    let mut agg = spawn_aggregator(&env, "aggregator-2.log", &[]);
    wait_exact(&env, &want, "sorted sets deleted, then replayed");
    assert!(agg.terminate());

    // The parts lost, the sets kept; then the same replay.
    let parts: Vec<String> = board_keys(&env, "rankings")
        .into_iter()
        .filter(|k| k.ends_with(":parts"))
        .collect();
    assert!(!parts.is_empty());
    let () = redis::cmd("DEL").arg(&parts).query(&mut con).unwrap();
    delete_checkpoints(&env);
    let mut agg = spawn_aggregator(&env, "aggregator-3.log", &[]);
    wait_exact(&env, &want, "parts deleted, then replayed");
    assert!(agg.terminate());

    // Both lost, with a deliberate start-over.
    let all = board_keys(&env, "rankings");
    let () = redis::cmd("DEL").arg(&all).query(&mut con).unwrap();
    let _agg = spawn_aggregator(&env, "aggregator-4.log", &["--reset-state"]);
    wait_exact(&env, &want, "everything lost, --reset-state");
}

#[test]
fn a_replay_that_retention_cut_short_is_refused_unless_allowed() {
    let _serial = serial();
    let env = Env::new("fretention");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let (truth, _) = gen_truth(&env, 1500, 69, &[]);
    let _ingest = spawn_ingest(&env);
    let mut agg = spawn_aggregator(&env, "aggregator-1.log", &[]);
    wait_exact(&env, &expected(&truth, &FROM_MONITORED), "first run");
    assert!(agg.terminate());

    // Retention deletes the first half of one partition, and the state
    // store loses the checkpoints: a replay can no longer start where this
    // lineage started.
    let topic = env.topic("vp.events.v1");
    let mut tpl = rdkafka::TopicPartitionList::new();
    let c: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let (_, hi) =
        rdkafka::consumer::Consumer::fetch_watermarks(&c, &topic, 0, Duration::from_secs(10))
            .unwrap();
    assert!(hi > 10);
    tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(hi / 2))
        .unwrap();
    let cut = block_on(admin().delete_records(&tpl, &AdminOptions::new())).unwrap();
    assert_eq!(
        cut.find_partition(&topic, 0).unwrap().offset(),
        rdkafka::Offset::Offset(hi / 2)
    );
    delete_checkpoints(&env);

    let mut refused = spawn_aggregator(&env, "aggregator-2.log", &[]);
    assert!(
        !refused.wait_exit(Duration::from_secs(90)),
        "a replay missing deleted records exited 0"
    );
    let log = refused.log_tail(30);
    for want in [
        "retention",
        "vp.events.v1/0",
        "--allow-partial-replay",
        "online_users_1m",
        "2021-08-16T01:",
    ] {
        assert!(log.contains(want), "no {want:?} in: {log}");
    }

    // Accepted deliberately: it runs, and says which windows are partial.
    let allowed = spawn_aggregator(&env, "aggregator-3.log", &["--allow-partial-replay"]);
    allowed.wait_ready(Duration::from_secs(120));
    wait_for(
        "the partial-replay warning",
        Duration::from_secs(30),
        || {
            allowed
                .log_tail(300)
                .contains("--allow-partial-replay: replaying from the records retention kept")
                .then_some(())
        },
    );
}
