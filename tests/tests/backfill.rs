//! End-to-end tests of `vidpulse backfill` on the real ClickHouse and Redis
//! (scripts/stack up): the same gen records through the streaming pipeline
//! (raw topics → ingest → aggregator, the monitor played by the harness's
//! forwarder) under one topic prefix and through `vidpulse backfill` of their
//! raw lines under another give gen's truth for every default metric and
//! leaderboard, in ClickHouse/Redis and in `--dry-run`; a rerun changes
//! nothing; bad lines are reported with their file and line, and are not
//! fatal. Times are printed, never asserted.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine as _;
use serde_json::Value;
use vidpulse_e2e::*;

/// The raw formats, room events first: a gift's module comes from its
/// room's start seen earlier in the same partition.
const FORMATS: [&str; 9] = [
    "live_room_events",
    "video_events",
    "video_messages",
    "play_request",
    "live_streaming_log",
    "live_gift_total",
    "video_production_log",
    "video_consumption_log",
    "user_actions",
];

fn gen_args(truth: &Path) -> Vec<String> {
    [
        "--count",
        "3000",
        "--seed",
        "57",
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
        truth.to_str().unwrap(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Splits gen's `--out-file` into one file of raw lines per format (the
/// archive a user would have); returns the files and how many lines were
/// left out (a payload that cannot be one line).
fn split(out_file: &Path, dir: &Path) -> (Vec<(String, PathBuf)>, usize) {
    let mut lines: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut skipped = 0;
    for l in std::fs::read_to_string(out_file).unwrap().lines() {
        let r: Value = serde_json::from_str(l).unwrap();
        let topic = r["topic"].as_str().unwrap();
        let raw = match r["payload"].as_str() {
            Some(p) => match p.strip_prefix("base64:") {
                Some(b) => base64::engine::general_purpose::STANDARD.decode(b).unwrap(),
                None => p.as_bytes().to_vec(),
            },
            None => {
                skipped += 1;
                continue;
            }
        };
        if raw.contains(&b'\n') {
            skipped += 1;
            continue;
        }
        let buf = lines.entry(topic.to_owned()).or_default();
        buf.extend_from_slice(&raw);
        buf.push(b'\n');
    }
    let mut files = Vec::new();
    for f in FORMATS {
        if let Some(bytes) = lines.get(f) {
            let path = dir.join(format!("{f}.jsonl"));
            std::fs::write(&path, bytes).unwrap();
            files.push((f.to_owned(), path));
        }
    }
    (files, skipped)
}

fn backfill(env: &Env, files: &[(String, PathBuf)], extra: &[&str]) -> (String, String) {
    let mut args: Vec<String> = vec!["backfill".into()];
    for (preset, path) in files {
        args.push("--preset".into());
        args.push(format!("{preset}={}", path.display()));
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = Instant::now();
    let out = env.run("vidpulse", &args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "vidpulse backfill failed: {stderr}");
    println!("backfill {extra:?} took {:?}: {stderr}", t.elapsed());
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

/// Every name's `vidpulse query` output, as sorted JSON texts.
fn snapshot(env: &Env, names: &BTreeSet<String>) -> BTreeMap<String, Vec<String>> {
    names
        .iter()
        .map(|n| (n.clone(), canon(&query(env, n))))
        .collect()
}

/// Rows of every table of a prefix after merging (what FINAL keeps).
fn final_counts(prefix: &str, names: &BTreeSet<String>) -> BTreeMap<String, String> {
    let stem: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut out = BTreeMap::new();
    for n in names {
        if let Some(c) = clickhouse_sql(&format!("SELECT count() FROM vidpulse.`{stem}{n}` FINAL"))
        {
            out.insert(n.clone(), c.trim().to_owned());
        }
    }
    out
}

#[test]
fn backfill_of_a_file_equals_the_stream_and_the_truth_and_a_rerun_changes_nothing() {
    // The stream: gen → raw topics → ingest → (forwarder) → aggregator.
    let stream = Env::new("bfstream");
    let _stream_tables = DropTables(stream.prefix.clone());
    stream.create_topics();
    let truth_path = scratch(&stream.prefix).join("truth.json");
    let out = stream.run(
        "vidpulse-gen",
        &gen_args(&truth_path)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        out.status.success(),
        "gen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let truth = read_json(&truth_path);
    let events = truth["expected"]["events"].as_i64().unwrap();
    let _ingest = stream.spawn_stage("vidpulse-ingest", &[], "ingest.log");
    wait_events(&stream, events);
    let mut fwd = Forwarder::start(&stream);
    fwd.finish(events as u64);
    let _agg = stream.spawn_stage(
        "vidpulse-aggregator",
        &["--early-emit", "200ms", "--flush-interval", "200ms"],
        "aggregator.log",
    );

    // The backfill: the same records (gen's output is a function of its
    // flags) as raw files, under another prefix.
    let bf = Env::new("bffile");
    let _bf_tables = DropTables(bf.prefix.clone());
    let dir = scratch(&bf.prefix);
    let bf_truth = dir.join("truth.json");
    let mut args = gen_args(&bf_truth);
    let out_file = dir.join("gen.jsonl");
    args.extend(["--out-file".to_owned(), out_file.display().to_string()]);
    let out = bf.run(
        "vidpulse-gen",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        out.status.success(),
        "gen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        read_json(&bf_truth)["metrics"],
        truth["metrics"],
        "same records"
    );
    let (files, skipped) = split(&out_file, &dir);
    assert_eq!(files.len(), FORMATS.len());
    let want = expected(&truth, &[]);
    let names: BTreeSet<String> = want.keys().cloned().collect();

    let (_, report) = backfill(&bf, &files, &["--threads", "2", "--no-progress"]);
    // Every line that is not an event is reported: gen's malformed records.
    let dlq = truth["expected"]["dlq"].as_u64().unwrap() as usize - skipped;
    assert!(dlq > 0);
    assert!(report.contains(&format!("{dlq} bad")), "{report}");
    assert!(report.contains(&format!("{events} events")), "{report}");
    assert!(report.contains("bad lines: "), "{report}");
    let bad = differences(&bf, &want);
    assert!(
        bad.is_empty(),
        "backfill differs from the truth:\n{}",
        bad.join("\n")
    );
    let first = snapshot(&bf, &names);
    let counts = final_counts(&bf.prefix, &names);

    // A rerun (other threads, same files) changes nothing.
    backfill(&bf, &files, &["--threads", "1", "--no-progress"]);
    assert_eq!(snapshot(&bf, &names), first, "a rerun changed a value");
    assert_eq!(
        final_counts(&bf.prefix, &names),
        counts,
        "a rerun added rows"
    );

    // --dry-run prints the same values, computed in memory.
    let (dry, _) = backfill(&bf, &files, &["--dry-run", "--no-progress"]);
    let mut by_name: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for l in dry.lines() {
        let mut v: Value = serde_json::from_str(l).unwrap();
        let name = v["name"].as_str().unwrap().to_owned();
        v.as_object_mut().unwrap().remove("name");
        by_name.entry(name).or_default().push(v);
    }
    for (name, rows) in &want {
        assert_eq!(
            canon(by_name.get(name).map_or(&[][..], Vec::as_slice)),
            canon(rows),
            "--dry-run {name}"
        );
    }
    // One metric alone prints exactly `vidpulse query --format json`.
    let (one, _) = backfill(
        &bf,
        &files,
        &["--dry-run", "--no-progress", "--metric", "top_gifters_1h"],
    );
    let printed = bf.ctl(&["query", "top_gifters_1h", "--format", "json"]);
    assert_eq!(one, printed);

    // The stream equals the truth (and so the backfill), its `even` pool aside.
    let mut stream_want = want.clone();
    with_even_pool(&mut stream_want);
    wait_exact(&stream, &stream_want, "stream");
    let stream_rows = snapshot(&stream, &names);
    for n in &names {
        if n != "pool_consumption_1m" {
            assert_eq!(stream_rows[n], first[n], "{n}: stream ≠ backfill");
        }
    }
}

#[test]
fn bad_lines_are_reported_with_their_line_numbers_and_are_not_fatal() {
    let env = Env::new("bfbad");
    let dir = scratch(&env.prefix);
    let gifts = dir.join("gifts.jsonl");
    let good = |user: u32, amount: u32| {
        format!(
            r#"{{"user_id":{user},"gift_type":3,"gift_total_amount":{amount},"room_id":20210813,"create_time":"2021-08-16 09:46:51"}}"#
        )
    };
    let lines = [
        good(1, 5),
        "{\"user_id\":2,".to_owned(),
        good(2, 7),
        String::new(),
        r#"{"user_id":3,"gift_type":3,"gift_total_amount":1,"create_time":"2099-01-01 00:00:00"}"#
            .to_owned(),
        "[1,2,3]".to_owned(),
        good(3, 11),
    ];
    std::fs::write(&gifts, lines.join("\n")).unwrap();
    let report = dir.join("bad.jsonl");
    let out = env.run(
        "vidpulse",
        &[
            "backfill",
            "--dry-run",
            "--no-progress",
            "--preset",
            "live_gift_total",
            "--metric",
            "gifts_by_type_1m",
            "--bad-lines",
            report.to_str().unwrap(),
            gifts.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "bad lines are not fatal: {stderr}");
    let file = gifts.display().to_string();
    for (line, reason) in [
        (2, "truncated_json"),
        (4, "empty_payload"),
        (5, "time_in_future"),
        (6, "not_an_object"),
    ] {
        assert!(
            stderr.contains(&format!("{file}:{line}: {reason}")),
            "{line} {reason}: {stderr}"
        );
    }
    assert!(
        stderr.contains("7 lines in 1 file(s), 3 events"),
        "{stderr}"
    );
    assert!(stderr.contains("4 bad"), "{stderr}");
    let written: Vec<Value> = std::fs::read_to_string(&report)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let at: Vec<(u64, &str)> = written
        .iter()
        .map(|v| (v["line"].as_u64().unwrap(), v["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        at,
        vec![
            (2, "truncated_json"),
            (4, "empty_payload"),
            (5, "time_in_future"),
            (6, "not_an_object")
        ]
    );
    assert_eq!(written[0]["text"], "{\"user_id\":2,");
    // The other lines count.
    let rows: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        rows,
        vec![serde_json::json!({
            "window_start": "2021-08-16T01:46:00Z",
            "gift_type": "3",
            "amount": 23,
            "gifts": 3,
            "givers": 3
        })]
    );
    // Gzip is told by its content, and the lines keep their numbers.
    let gz = dir.join("gifts.log");
    std::fs::write(&gz, gzip(lines.join("\n").as_bytes())).unwrap();
    let out = env.run(
        "vidpulse",
        &[
            "backfill",
            "--dry-run",
            "--no-progress",
            "--threads",
            "2",
            "--preset",
            "live_gift_total",
            "--metric",
            "gifts_by_type_1m",
            gz.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:5: time_in_future", gz.display())),
        "{stderr}"
    );
    let again: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(again, rows);
    // A bad flag fails at start, naming the flag.
    let out = env.run(
        "vidpulse",
        &[
            "backfill",
            "--preset",
            "no_such_format",
            gifts.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        stderr.contains("--preset: no preset \"no_such_format\""),
        "{stderr}"
    );
}

/// gzip of `data` by the system's `gzip` (the test crate has no deflate).
fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}
