//! End-to-end: records rejected under a wrong mapping are re-driven with
//! `vidpulse dlq replay` after the fix and accepted, each counted once; and
//! `vidpulse lag` shows a stage group's lag per partition.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use vidpulse_e2e::*;

const EVENTS: &str = "vp.events.v1";
const DLQ: &str = "vp.dlq.v1";

/// A mapping for `user_actions` that knows `like`/`comment` only (wrong) or
/// every action (fixed).
fn mapping(env: &Env, fixed: bool) -> PathBuf {
    let actions = if fixed {
        r#"["like", "comment", "share", "order"]"#
    } else {
        r#"["like", "comment"]"#
    };
    let text = format!(
        r#"name = "actions"
topic = "user_actions"
time = "timestamp"

[[rules]]
kind = "user_action"
when = {{ field = "type", one_of = {actions} }}
fields = {{ action = "type", user_id = "user_id", target_id = "target_id" }}
"#
    );
    let path = scratch(&env.prefix).join(if fixed { "fixed.toml" } else { "wrong.toml" });
    std::fs::write(&path, text).unwrap();
    path
}

fn record(kind: &str, user: &str, time: bool) -> Option<Vec<u8>> {
    let t = if time {
        r#","timestamp":1732200000.5"#
    } else {
        ""
    };
    Some(format!(r#"{{"type":"{kind}","user_id":"{user}","target_id":"v-1"{t}}}"#).into_bytes())
}

/// Two accepted, two `order`s the wrong mapping rejects as
/// `unknown_event_type`, one truly bad record (`missing_field`).
fn produce_records(env: &Env) {
    env.produce(
        "user_actions",
        &[
            (Some("v-1"), record("like", "u-1", true)),
            (Some("v-1"), record("order", "u-2", true)),
            (Some("v-1"), record("comment", "u-3", true)),
            (Some("v-1"), record("order", "u-4", true)),
            (Some("v-1"), record("like", "u-5", false)),
        ],
    );
}

fn wait_counts(env: &Env, events: i64, dlq: i64) {
    wait_for(
        &format!("{events} events and {dlq} dead letters"),
        Duration::from_secs(120),
        || (env.count(EVENTS) >= events && env.count(DLQ) >= dlq).then_some(()),
    );
}

/// Runs ingest with `mapping` until the counts are reached, then stops it.
fn ingest_until(env: &Env, mapping: &std::path::Path, events: i64, dlq: i64) {
    let mut ingest = env.spawn(
        "vidpulse-ingest",
        &[
            "--mapping",
            mapping.to_str().unwrap(),
            "--admin-addr",
            &format!("127.0.0.1:{}", free_port()),
        ],
        "ingest-wrong.log",
    );
    wait_counts(env, events, dlq);
    assert!(ingest.terminate());
}

/// `<topic>/<partition>/<offset>` of where each `order` dead letter was read.
fn original_ids(env: &Env) -> HashSet<String> {
    env.tail_all(DLQ)
        .iter()
        .filter(|d| d["headers"]["vp.reason"] == "unknown_event_type")
        .map(|d| {
            let h = &d["headers"];
            format!(
                "{}/{}/{}",
                h["vp.source.topic"].as_str().unwrap(),
                h["vp.source.partition"].as_str().unwrap(),
                h["vp.source.offset"].as_str().unwrap()
            )
        })
        .collect()
}

fn orders(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["value"]["payload"]["user_action"]["action"] == "order")
        .collect()
}

fn distinct_ids(events: &[Value]) -> HashSet<String> {
    events
        .iter()
        .map(|e| e["value"]["event_id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn dlq_replay_after_a_mapping_fix_counts_each_record_once() {
    let env = Env::new("replaynorm");
    env.create_topics();
    produce_records(&env);
    let (wrong, fixed) = (mapping(&env, false), mapping(&env, true));
    ingest_until(&env, &wrong, 2, 3);
    let originals = original_ids(&env);
    assert_eq!(originals.len(), 2);

    // The wrong mapping still rejects them: nothing is produced.
    let out = env.ctl(&[
        "dlq",
        "replay",
        "--reason",
        "unknown_event_type",
        "--normalize",
        wrong.to_str().unwrap(),
    ]);
    assert!(out.contains("replayed 0 of 2"), "{out}");
    assert!(
        out.contains("still rejected by the --normalize mapping (unknown_event_type): 2"),
        "{out}"
    );
    // A dry run says what it would do and produces nothing.
    let out = env.ctl(&[
        "dlq",
        "replay",
        "--normalize",
        fixed.to_str().unwrap(),
        "--dry-run",
    ]);
    assert!(out.contains("would replay 2 of 3"), "{out}");
    assert_eq!(env.count(EVENTS), 2);

    // After the fix: accepted, with the ids they would have had at first.
    let replay = || {
        env.ctl(&[
            "dlq",
            "replay",
            "--reason",
            "unknown_event_type",
            "--normalize",
            fixed.to_str().unwrap(),
        ])
    };
    let out = replay();
    assert!(out.contains("replayed 2 of 2"), "{out}");
    assert!(
        out.contains(&format!("to {}: 2", env.topic(EVENTS))),
        "{out}"
    );
    let events = env.tail_all(EVENTS);
    assert_eq!(events.len(), 4);
    let replayed = orders(&events);
    assert_eq!(replayed.len(), 2);
    let ids: HashSet<String> = replayed
        .iter()
        .map(|e| e["value"]["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, originals, "replayed events keep their original ids");
    for e in &replayed {
        assert_eq!(e["headers"]["vp.kind"], "user_action");
        assert!(
            e["headers"]["vp.replayed-from"]
                .as_str()
                .unwrap()
                .starts_with(&env.topic(DLQ)),
            "{e}"
        );
    }

    // A second replay re-sends the same events: still 4 distinct ids, so
    // every downstream stage (deduplicating on event_id) counts each once.
    let out = replay();
    assert!(out.contains("replayed 2 of 2"), "{out}");
    let events = env.tail_all(EVENTS);
    assert_eq!(events.len(), 6);
    assert_eq!(distinct_ids(&events).len(), 4, "counted once");
    let users: BTreeMap<String, usize> =
        orders(&events).iter().fold(BTreeMap::new(), |mut m, e| {
            *m.entry(e["value"]["user_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
            m
        });
    assert_eq!(users.keys().collect::<Vec<_>>(), ["u-2", "u-4"]);
    // The DLQ is only read: the letters are still there.
    assert_eq!(env.count(DLQ), 3);
}

#[test]
fn dlq_replay_to_the_raw_topic_is_accepted_by_a_fixed_ingest_and_lag_shows_it() {
    let env = Env::new("replayraw");
    env.create_topics();
    produce_records(&env);
    let (wrong, fixed) = (mapping(&env, false), mapping(&env, true));
    ingest_until(&env, &wrong, 2, 3);
    let originals = original_ids(&env);

    let port = free_port();
    let mut ingest = env.spawn(
        "vidpulse-ingest",
        &[
            "--mapping",
            fixed.to_str().unwrap(),
            "--admin-addr",
            &format!("127.0.0.1:{port}"),
        ],
        "ingest-fixed.log",
    );
    let out = env.ctl(&["dlq", "replay", "--reason", "unknown_event_type"]);
    assert!(out.contains("replayed 2 of 2"), "{out}");
    assert!(
        out.contains(&format!("to {}: 2", env.topic("user_actions"))),
        "{out}"
    );
    wait_counts(&env, 4, 3);
    std::thread::sleep(Duration::from_secs(2));

    // Accepted once each; nothing new in the DLQ.
    let events = env.tail_all(EVENTS);
    assert_eq!(events.len(), 4);
    assert_eq!(distinct_ids(&events).len(), 4);
    assert_eq!(orders(&events).len(), 2);
    assert_eq!(env.count(DLQ), 3);
    // The re-driven raw records keep key and bytes and say where from.
    let raw = env.tail_all("user_actions");
    assert_eq!(raw.len(), 7);
    let replays: Vec<&Value> = raw
        .iter()
        .filter(|r| r["headers"]["vp.replayed-from"].is_string())
        .collect();
    assert_eq!(replays.len(), 2);
    let mut pointed = HashSet::new();
    for r in replays {
        assert_eq!(r["key"], "v-1");
        assert_eq!(r["value"]["type"], "order");
        let h = &r["headers"];
        pointed.insert(format!(
            "{}/{}/{}",
            h["vp.original.topic"].as_str().unwrap(),
            h["vp.original.partition"].as_str().unwrap(),
            h["vp.original.offset"].as_str().unwrap()
        ));
    }
    assert_eq!(pointed, originals);

    // `vidpulse lag`: the ingest group has caught up on every partition.
    let lag = |env: &Env| -> Vec<Value> {
        env.ctl(&["lag", "--group", "vidpulse-ingest", "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let rows = wait_for("ingest lag 0", Duration::from_secs(30), || {
        let rows = lag(&env);
        rows.iter()
            .filter(|r| r["topic"] == "user_actions")
            .all(|r| r["lag"] == 0)
            .then_some(rows)
    });
    let ua: Vec<&Value> = rows
        .iter()
        .filter(|r| r["topic"] == "user_actions")
        .collect();
    assert_eq!(ua.len(), 4, "one row per partition of user_actions");
    assert!(
        ua.iter()
            .all(|r| r["group"] == env.topic("vidpulse-ingest"))
    );
    assert_eq!(
        ua.iter().map(|r| r["high"].as_i64().unwrap()).sum::<i64>(),
        7
    );
    // Every raw topic is an input of ingest and is listed.
    assert!(rows.iter().any(|r| r["topic"] == "video_events"));

    // Stopped, with 3 new records: lag 3, and --max-lag fails.
    assert!(ingest.terminate());
    env.produce(
        "user_actions",
        &[
            (Some("a"), record("like", "u-9", true)),
            (Some("b"), record("like", "u-9", true)),
            (Some("c"), record("like", "u-9", true)),
        ],
    );
    let rows = lag(&env);
    let total: i64 = rows
        .iter()
        .filter(|r| r["topic"] == "user_actions")
        .map(|r| r["lag"].as_i64().unwrap())
        .sum();
    assert_eq!(total, 3);
    let out = env.run(
        "vidpulse",
        &["lag", "--group", "vidpulse-ingest", "--max-lag", "2"],
    );
    assert!(!out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("total lag 3"), "{table}");
}

/// With the core change that hands record headers to the processor
/// (`Processor::process_with_headers`, not in vidpulse-core yet),
/// a raw replay keeps the original id too, so a second raw replay is
/// counted once.
#[test]

fn a_raw_replay_twice_keeps_the_original_ids() {
    let env = Env::new("replayraw2");
    env.create_topics();
    produce_records(&env);
    let (wrong, fixed) = (mapping(&env, false), mapping(&env, true));
    ingest_until(&env, &wrong, 2, 3);
    let originals = original_ids(&env);
    let _ingest = env.spawn(
        "vidpulse-ingest",
        &[
            "--mapping",
            fixed.to_str().unwrap(),
            "--admin-addr",
            &format!("127.0.0.1:{}", free_port()),
        ],
        "ingest-fixed.log",
    );
    env.ctl(&["dlq", "replay", "--reason", "unknown_event_type"]);
    env.ctl(&["dlq", "replay", "--reason", "unknown_event_type"]);
    wait_counts(&env, 6, 3);
    let events = env.tail_all(EVENTS);
    assert_eq!(distinct_ids(&events).len(), 4, "counted once");
    let ids: HashSet<String> = orders(&events)
        .iter()
        .map(|e| e["value"]["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, originals);
}
