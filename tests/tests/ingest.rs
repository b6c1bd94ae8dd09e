//! End-to-end tests of vidpulse-ingest on the real broker (scripts/stack up).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use vidpulse_e2e::*;

const EVENTS: &str = "vp.events.v1";
const DLQ: &str = "vp.dlq.v1";

fn admin(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn header<'a>(rec: &'a Value, name: &str) -> &'a str {
    rec["headers"][name].as_str().unwrap_or("")
}

/// Original bytes of a DLQ record's value.
fn dlq_bytes(rec: &Value) -> Vec<u8> {
    match (rec["value"].as_str(), rec["value_encoding"].as_str()) {
        (Some(s), Some("base64")) => base64::engine::general_purpose::STANDARD.decode(s).unwrap(),
        (Some(s), _) => s.as_bytes().to_vec(),
        (None, _) => vec![],
    }
}

fn wait_counts(env: &Env, events: i64, dlq: i64) {
    wait_for(
        &format!("{events} events and {dlq} DLQ records"),
        Duration::from_secs(180),
        || (env.count(EVENTS) >= events && env.count(DLQ) >= dlq).then_some(()),
    );
}

#[test]
fn gen_run_matches_ground_truth_with_per_key_order() {
    let env = Env::new("truth");
    env.create_topics();
    let truth_path = scratch(&env.prefix).join("truth.json");
    let out = env.run(
        "vidpulse-gen",
        &[
            "--count",
            "6000",
            "--seed",
            "11",
            "--bad-fraction",
            "0.05",
            "--dup-fraction",
            "0.03",
            "--late-fraction",
            "0.03",
            "--start",
            "2021-08-16T01:00:00Z",
            "--truth",
            truth_path.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "gen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let truth = read_json(&truth_path);
    let want_events = truth["expected"]["events"].as_i64().unwrap();
    let want_dlq = truth["expected"]["dlq"].as_i64().unwrap();
    assert!(
        want_events > 5000 && want_dlq > 100,
        "{want_events} {want_dlq}"
    );

    let port = free_port();
    let mut ingest = env.spawn(
        "vidpulse-ingest",
        &["--admin-addr", &admin(port)],
        "ingest.log",
    );
    wait_counts(&env, want_events, want_dlq);

    // Exactly every valid record (duplicates included: ingest does not
    // deduplicate, the aggregator does), exactly every bad one.
    let events = env.tail_all(EVENTS);
    let dlq = env.tail_all(DLQ);
    assert_eq!(events.len() as i64, want_events);
    assert_eq!(dlq.len() as i64, want_dlq);

    // Kinds over distinct event ids equal the truth.
    let mut seen = HashSet::new();
    let mut kinds: BTreeMap<String, i64> = BTreeMap::new();
    for e in &events {
        let v = &e["value"];
        assert_eq!(e["value_encoding"], "event", "{e}");
        assert_eq!(header(e, "vp.kind"), v["kind"].as_str().unwrap());
        assert!(!e["key"].as_str().unwrap().is_empty());
        if seen.insert(v["event_id"].as_str().unwrap().to_owned()) {
            *kinds
                .entry(v["kind"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    let want_kinds: BTreeMap<String, i64> = truth["kinds"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_i64().unwrap()))
        .collect();
    assert_eq!(kinds, want_kinds);
    assert_eq!(
        seen.len() as i64,
        truth["expected"]["distinct_events"].as_i64().unwrap()
    );

    // Per-key order: within one raw source and key, events appear in the
    // order gen produced them (event ids are g<seed>-<sequence>).
    let mut last: HashMap<(String, String), u64> = HashMap::new();
    let mut checked = 0;
    for e in &events {
        let v = &e["value"];
        let id = v["event_id"].as_str().unwrap();
        let seq: u64 = id.rsplit('-').next().unwrap().parse().unwrap();
        let src = v["source"]["topic"].as_str().unwrap().to_owned();
        let k = (src, e["key"].as_str().unwrap().to_owned());
        if let Some(prev) = last.get(&k) {
            // A duplicate re-sends an earlier record; it may sit later.
            if seq > *prev {
                checked += 1;
            } else {
                assert!(
                    seen.contains(id),
                    "order broken for {k:?}: {seq} after {prev}"
                );
            }
        }
        let entry = last.entry(k).or_insert(seq);
        *entry = (*entry).max(seq);
    }
    assert!(checked > 1000, "only {checked} ordered pairs checked");
    // Events are partitioned by key: one key, one partition.
    let mut part_of: HashMap<String, i64> = HashMap::new();
    for e in &events {
        let p = e["partition"].as_i64().unwrap();
        assert_eq!(
            *part_of
                .entry(e["key"].as_str().unwrap().to_owned())
                .or_insert(p),
            p
        );
    }

    // DLQ reasons equal the truth, with source headers.
    let mut reasons: BTreeMap<String, i64> = BTreeMap::new();
    for d in &dlq {
        *reasons
            .entry(header(d, "vp.reason").to_owned())
            .or_default() += 1;
        assert_eq!(header(d, "vp.stage"), "ingest");
        assert!(header(d, "vp.source.topic").starts_with(&env.prefix));
        assert!(header(d, "vp.source.offset").parse::<i64>().is_ok());
        assert!(!header(d, "vp.detail").is_empty());
    }
    let want_reasons: BTreeMap<String, i64> = truth["dlq_by_reason"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_i64().unwrap()))
        .collect();
    assert_eq!(reasons, want_reasons);

    // /metrics: received, produced, dlq by reason, consumer lag.
    let m = wait_for("consumer lag in /metrics", Duration::from_secs(30), || {
        let m = metrics(port);
        (prom_sum(&m, "vidpulse_consumer_lag", &[]) == 0.0
            && m.keys().any(|k| k.starts_with("vidpulse_consumer_lag")))
        .then_some(m)
    });
    let sent = truth["count"].as_f64().unwrap();
    assert_eq!(
        prom_sum(&m, "vidpulse_records_received_total", &["stage=\"ingest\""]),
        sent
    );
    assert_eq!(
        prom_sum(
            &m,
            "vidpulse_records_produced_total",
            &[&format!("topic=\"{}\"", env.topic(EVENTS))]
        ),
        want_events as f64
    );
    assert_eq!(
        prom_sum(&m, "vidpulse_records_dlq_total", &[]),
        want_dlq as f64
    );
    for (reason, n) in &want_reasons {
        assert_eq!(
            prom_sum(
                &m,
                "vidpulse_records_dlq_total",
                &[&format!("reason=\"{reason}\"")]
            ),
            *n as f64,
            "{reason}"
        );
    }
    assert_eq!(http_get(port, "/readyz").unwrap().0, 200);
    assert!(
        ingest.terminate(),
        "ingest should drain and exit 0 on SIGTERM"
    );
}

#[test]
fn malformed_records_land_in_the_dlq_with_specific_reasons() {
    let env = Env::new("bad");
    env.create_topics();
    let port = free_port();
    let mut ingest = env.spawn(
        "vidpulse-ingest",
        &["--admin-addr", &admin(port)],
        "ingest.log",
    );

    let play = |extra: &str| {
        format!(
            r#"{{"event_type":"video_played","video_id":"v1","timestamp":"2025-04-05T10:00:00Z"{extra}}}"#
        )
    };
    let deep = format!(
        r#"{{"event_type":"video_played","video_id":"v1","x":{}{}}}"#,
        "[".repeat(500),
        "]".repeat(500)
    );
    let huge = format!(
        r#"{{"event_type":"video_played","video_id":"v1","pad":"{}"}}"#,
        "x".repeat(5 * 1024 * 1024)
    );
    let cases: Vec<(&str, Option<Vec<u8>>, &str)> = vec![
        (
            "truncated",
            Some(play("").as_bytes()[..30].to_vec()),
            "truncated_json",
        ),
        (
            "syntax",
            Some(br#"{"video_id":"v1",,}"#.to_vec()),
            "invalid_json",
        ),
        (
            "pydict",
            Some(b"{'video_id': 'v1'}".to_vec()),
            "invalid_json",
        ),
        (
            "plaintext",
            Some(b"This is a video message".to_vec()),
            "invalid_json",
        ),
        ("array", Some(b"[1,2,3]".to_vec()), "not_an_object"),
        ("empty", Some(vec![]), "empty_payload"),
        ("null", None, "empty_payload"),
        (
            "utf8",
            Some(b"{\"video_id\":\"\xff\xfe\"}".to_vec()),
            "invalid_utf8",
        ),
        ("huge", Some(huge.into_bytes()), "payload_too_large"),
        ("deep", Some(deep.into_bytes()), "nesting_too_deep"),
        (
            "unknown",
            Some(
                play("")
                    .replace("video_played", "video_deleted")
                    .into_bytes(),
            ),
            "unknown_event_type",
        ),
        (
            "noid",
            Some(play("").replace(r#""video_id":"v1","#, "").into_bytes()),
            "missing_field",
        ),
        (
            "notime",
            Some(br#"{"event_type":"video_played","video_id":"v1"}"#.to_vec()),
            "missing_field",
        ),
        (
            "objid",
            Some(play("").replace(r#""v1""#, r#"{"a":1}"#).into_bytes()),
            "wrong_type",
        ),
        (
            "emptyid",
            Some(play("").replace(r#""v1""#, r#""""#).into_bytes()),
            "invalid_id",
        ),
        (
            "floatid",
            Some(play("").replace(r#""v1""#, "12.5").into_bytes()),
            "invalid_id",
        ),
        (
            "badtime",
            Some(
                play("")
                    .replace("2025-04-05T10:00:00Z", "yesterday")
                    .into_bytes(),
            ),
            "unparseable_time",
        ),
        (
            "epoch0",
            Some(
                play("")
                    .replace(r#""2025-04-05T10:00:00Z""#, "0")
                    .into_bytes(),
            ),
            "time_out_of_range",
        ),
        (
            "future",
            Some(play("").replace("2025", "2300").into_bytes()),
            "time_out_of_range",
        ),
        (
            "negwatch",
            Some(play(r#","watch_ms":-5"#).into_bytes()),
            "invalid_value",
        ),
    ];
    let records: Vec<(Option<&str>, Option<Vec<u8>>)> = cases
        .iter()
        .map(|(k, v, _)| (Some(*k), v.clone()))
        .collect();
    env.produce("video_events", &records);
    // A good record after all of them: ingest kept going.
    env.produce(
        "video_events",
        &[(
            Some("good"),
            Some(play(r#","event_id":"good-1""#).into_bytes()),
        )],
    );

    wait_counts(&env, 1, cases.len() as i64);
    let dlq = env.tail_all(DLQ);
    assert_eq!(dlq.len(), cases.len());
    let by_key: HashMap<&str, &Value> = dlq
        .iter()
        .map(|d| (d["key"].as_str().unwrap(), d))
        .collect();
    let mut reasons = HashSet::new();
    for (key, payload, reason) in &cases {
        let d = by_key
            .get(key)
            .unwrap_or_else(|| panic!("{key} not in the DLQ"));
        assert_eq!(
            header(d, "vp.reason"),
            *reason,
            "{key}: {}",
            header(d, "vp.detail")
        );
        assert_eq!(
            dlq_bytes(d),
            payload.clone().unwrap_or_default(),
            "{key}: original bytes kept"
        );
        assert_eq!(header(d, "vp.source.topic"), env.topic("video_events"));
        assert_eq!(header(d, "vp.stage"), "ingest");
        reasons.insert(*reason);
    }
    assert!(reasons.len() >= 13, "{} distinct reasons", reasons.len());
    let events = env.tail_all(EVENTS);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["value"]["event_id"], "good-1");
    assert!(ingest.is_running());
    let m = metrics(port);
    assert_eq!(
        prom_sum(&m, "vidpulse_records_dlq_total", &[]),
        cases.len() as f64
    );
    assert_eq!(
        prom_sum(
            &m,
            "vidpulse_records_dlq_total",
            &["reason=\"invalid_json\""]
        ),
        3.0
    );
}

#[test]
fn kill_9_mid_run_loses_nothing_and_reproduces_the_same_ids() {
    let env = Env::new("kill");
    env.create_topics();
    let truth_path = scratch(&env.prefix).join("truth.json");
    let count = 40_000;
    // Source-derived ids (no event_id in the payload), produced over ~8 s.
    let mut generator = env.spawn(
        "vidpulse-gen",
        &[
            "--count",
            &count.to_string(),
            "--rate",
            "5000",
            "--seed",
            "5",
            "--bad-fraction",
            "0.02",
            "--event-ids=false",
            "--truth",
            truth_path.to_str().unwrap(),
        ],
        "gen.log",
    );
    let port = free_port();
    let mut ingest = env.spawn(
        "vidpulse-ingest",
        &["--admin-addr", &admin(port)],
        "ingest-1.log",
    );
    wait_for("ingest to be under way", Duration::from_secs(60), || {
        (env.count(EVENTS) > 3000).then_some(())
    });
    ingest.kill9();
    let at_kill = env.count(EVENTS) + env.count(DLQ);
    std::thread::sleep(Duration::from_millis(500));
    let mut ingest = env.spawn(
        "vidpulse-ingest",
        &["--admin-addr", &admin(free_port())],
        "ingest-2.log",
    );
    wait_for("gen to finish", Duration::from_secs(120), || {
        (!generator.is_running()).then_some(())
    });
    let truth = read_json(&truth_path);
    let want_events = truth["expected"]["events"].as_i64().unwrap();
    let want_dlq = truth["expected"]["dlq"].as_i64().unwrap();
    assert_eq!(want_events + want_dlq, count);
    assert!(
        at_kill < count,
        "the kill happened mid-run ({at_kill} of {count} done)"
    );
    wait_counts(&env, want_events, want_dlq);
    std::thread::sleep(Duration::from_secs(2));

    // Every raw record is accounted for, exactly once by source coordinates;
    // a record re-produced after the crash carries the same id and content.
    let events = env.tail_all(EVENTS);
    let mut by_id: HashMap<String, Value> = HashMap::new();
    let mut reproduced = 0;
    for e in &events {
        let mut v = e["value"].clone();
        let s = &v["source"];
        let coord = format!(
            "{}/{}/{}",
            s["topic"].as_str().unwrap(),
            s["partition"],
            s["offset"]
        );
        assert_eq!(v["event_id"].as_str().unwrap(), coord, "source-derived id");
        v.as_object_mut().unwrap().remove("ingest_time_ms");
        if let Some(prev) = by_id.insert(coord, v.clone()) {
            assert_eq!(prev, v, "a re-produced event must be identical");
            reproduced += 1;
        }
    }
    assert_eq!(
        by_id.len() as i64,
        want_events,
        "every valid record normalized"
    );
    let dlq = env.tail_all(DLQ);
    let coords: HashSet<String> = dlq
        .iter()
        .map(|d| {
            format!(
                "{}/{}/{}",
                header(d, "vp.source.topic"),
                header(d, "vp.source.partition"),
                header(d, "vp.source.offset")
            )
        })
        .collect();
    assert_eq!(
        coords.len() as i64,
        want_dlq,
        "every bad record dead-lettered"
    );
    eprintln!(
        "kill -9 at {at_kill}/{count}: {reproduced} events re-produced after restart, all identical"
    );
    assert!(ingest.terminate());
}
