//! The README's first command, as a newcomer runs it: `scripts/demo` from
//! the built tree (`DEMO_NO_SERVE=1`: stop after the results, instead of
//! serving until Ctrl-C), twice in a row on one stack. Each run must exit 0
//! and print every section with real numbers — ingest counts, dead letters
//! by reason, dim-builder, monitor, aggregator, each dashboard metric and
//! leaderboard, the dashboard answering 200, what is running — and the two
//! runs must have the same shape (same sections, same table sizes): each
//! run is isolated under its own prefix, so the second does not pile onto
//! the first.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::Value;
use vidpulse_e2e::*;

/// Records per run: enough for every gift type, grade and DLQ reason, small
/// enough for CI.
const COUNT: u64 = 3000;

fn run_demo() -> String {
    let started = Instant::now();
    let mut cmd = Command::new(repo_root().join("scripts/demo"));
    cmd.env("DEMO_NO_SERVE", "1")
        .env("VIDPULSE_NO_BUILD", "1")
        .env("DEMO_COUNT", COUNT.to_string())
        .env_remove("VIDPULSE_TOPIC_PREFIX")
        .env_remove("VIDPULSE_AGGREGATOR_SPEC")
        .stdin(Stdio::null());
    // Free ports, so the test never meets a demo the user left serving.
    for var in [
        "DEMO_INGEST_ADMIN_PORT",
        "DEMO_DIM_ADMIN_PORT",
        "DEMO_MONITOR_ADMIN_PORT",
        "DEMO_AGG_ADMIN_PORT",
        "DEMO_API_PORT",
    ] {
        cmd.env(var, free_port().to_string());
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    println!("scripts/demo took {:?}", started.elapsed());
    assert!(
        out.status.success(),
        "scripts/demo exited {:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status.code()
    );
    stdout
}

/// The whole numbers of a line, in order.
fn numbers(line: &str) -> Vec<i64> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in line.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() {
            cur.push(c);
        } else if !cur.is_empty() {
            out.push(cur.parse().unwrap_or(i64::MAX));
            cur.clear();
        }
    }
    out
}

/// The lines after the line starting with `header`, up to the next header.
fn section<'a>(out: &'a str, header: &str) -> (&'a str, Vec<&'a str>) {
    let lines: Vec<&str> = out.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with(header))
        .unwrap_or_else(|| panic!("no section {header:?} in:\n{out}"));
    let body = lines[i + 1..]
        .iter()
        .take_while(|l| !l.starts_with("== ") && !l.starts_with("-- "))
        .filter(|l| !l.trim().is_empty())
        .copied()
        .collect();
    (lines[i], body)
}

/// A table: a header row naming `columns`, then at least one row, each
/// with a positive number in column `positive`.
fn table(out: &str, header: &str, columns: &[&str], positive: &str) {
    let (_, body) = section(out, header);
    let head: Vec<&str> = body
        .first()
        .map_or(Vec::new(), |h| h.split_whitespace().collect());
    for c in columns.iter().chain(std::iter::once(&positive)) {
        assert!(head.contains(c), "{header}: no column {c:?}: {body:?}");
    }
    let at = head.iter().position(|c| *c == positive).unwrap();
    let rows = &body[1..];
    assert!(
        !rows.is_empty() && !rows.iter().any(|l| l.contains("(no rows)")),
        "{header}: no rows: {body:?}"
    );
    for r in rows {
        let v: i64 = r
            .split_whitespace()
            .nth(at)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{header}: no {positive} in {r:?}"));
        assert!(v > 0, "{header}: {positive} is {v} in {r:?}");
    }
}

fn check(out: &str) {
    let (line, _) = section(out, "== ingest handled");
    assert_eq!(numbers(line), vec![COUNT as i64], "{line}");
    let (_, body) = section(out, "== ingest handled");
    let events = numbers(body[0])[1];
    assert!(events > (COUNT as i64) * 9 / 10, "{}", body[0]);
    let dlq = numbers(body[1])[1];
    let reasons: Vec<i64> = body[2..]
        .iter()
        .map(|l| {
            assert!(l.trim_start().contains(": "), "a reason line: {l}");
            *numbers(l).last().unwrap()
        })
        .collect();
    assert!(dlq > 0 && reasons.len() >= 5, "{body:?}");
    assert_eq!(reasons.iter().sum::<i64>(), dlq, "reasons add up: {body:?}");
    let (_, truth) = section(out, "== ground truth");
    let truth: Value = serde_json::from_str(truth[0]).unwrap();
    assert_eq!(truth["count"], COUNT);
    assert_eq!(truth["expected"]["events"].as_i64().unwrap(), events);
    assert_eq!(truth["expected"]["dlq"].as_i64().unwrap(), dlq);

    let (line, _) = section(out, "== dim-builder:");
    assert!(numbers(line)[0] > 0, "{line}");
    let (line, _) = section(out, "== monitor read");
    let n = numbers(line);
    assert_eq!(n[0], events, "the monitor read every event: {line}");
    assert!(n[1] > 0 && n[2] == 50 && n[3] > 0, "{line}");
    let (_, body) = section(out, "== an enriched monitored event");
    let ev: Value = serde_json::from_str(body[0]).unwrap();
    assert!(ev["enrichment"]["room.type"].is_string(), "{ev}");
    let (line, _) = section(out, "== aggregator read");
    assert_eq!(numbers(line)[0], events, "{line}");

    table(
        out,
        "-- gift totals by type",
        &["window_start", "window_end", "gift_type", "gifts", "givers"],
        "amount",
    );
    table(
        out,
        "-- members per grade",
        &["window_start", "grade"],
        "members",
    );
    table(
        out,
        "-- viewers by province",
        &["province", "grade", "arrivals"],
        "viewers",
    );
    table(
        out,
        "-- top 10 gifting users",
        &["rank", "user_id"],
        "amount",
    );
    table(
        out,
        "-- gifts in the last 6 hours",
        &["window_start"],
        "amount",
    );
    let (line, _) = section(out, "-- online users now");
    assert!(numbers(line).last().is_some_and(|n| *n > 0), "{line}");
    for (header, cols, positive) in [
        (
            "-- gift totals per minute",
            &["window_start", "gift_type"][..],
            "gifts",
        ),
        (
            "-- video plays per minute",
            &["window_start", "video_id"][..],
            "plays",
        ),
        (
            "-- user actions per minute",
            &["window_start", "type"][..],
            "actions",
        ),
        (
            "-- actions_daily",
            &["window_start", "rank", "type"][..],
            "actions",
        ),
        ("-- video_likes_daily", &["rank", "video_id"][..], "likes"),
        ("-- user_gifts_daily", &["rank", "user_id"][..], "amount"),
    ] {
        table(out, header, cols, positive);
    }
    // Ten gift types, five grades, ten gifters: today's totals are all there.
    assert_eq!(section(out, "-- gift totals by type").1.len(), 11);
    assert_eq!(section(out, "-- members per grade").1.len(), 6);
    assert_eq!(section(out, "-- top 10 gifting users").1.len(), 11);

    let (line, _) = section(out, "== dashboard: http://127.0.0.1:");
    assert!(line.contains("answered 200"), "{line}");
    let (_, running) = section(out, "== running");
    for stage in [
        "vidpulse-ingest",
        "vidpulse-dim-builder",
        "vidpulse-monitor",
        "vidpulse-aggregator",
        "vidpulse-gen",
        "vidpulse-api",
    ] {
        assert!(
            running.iter().any(|l| l.contains(stage)),
            "{stage} not listed: {running:?}"
        );
    }
    assert!(out.contains("== stopping"), "it says how it stops");
}

/// Section headers with their numbers masked, and the size of every
/// section whose size does not depend on the data's details.
fn shape(out: &str) -> Vec<String> {
    let mask = |l: &str| -> String {
        let mut s = String::new();
        let mut digit = false;
        for c in l.chars() {
            if c.is_ascii_digit() {
                if !digit {
                    s.push('N');
                }
                digit = true;
            } else {
                s.push(c);
                digit = false;
            }
        }
        s
    };
    let mut v = Vec::new();
    let lines: Vec<&str> = out.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if !(l.starts_with("== ") || l.starts_with("-- ")) {
            continue;
        }
        let body = lines[i + 1..]
            .iter()
            .take_while(|l| !l.starts_with("== ") && !l.starts_with("-- "))
            .filter(|l| !l.trim().is_empty())
            .count();
        // Room hashes and tailed records vary in length with the data.
        let sized = !(l.starts_with("== dim-builder") || l.starts_with("== last"));
        v.push(if sized {
            format!("{} [{body} lines]", mask(l))
        } else {
            mask(l)
        });
    }
    v
}

#[test]
fn the_demo_runs_to_the_end_twice_on_one_stack_with_the_same_shape() {
    let first = run_demo();
    println!("{first}");
    check(&first);
    let second = run_demo();
    check(&second);
    let (a, b) = (shape(&first), shape(&second));
    assert_eq!(
        a, b,
        "the two runs differ in shape:\n{first}\n---\n{second}"
    );
    // Each run had its own prefix (its own topics, groups and tables).
    let run_of = |out: &str| {
        section(out, "== run ")
            .0
            .split_whitespace()
            .nth(2)
            .map(str::to_owned)
    };
    assert_ne!(run_of(&first), run_of(&second));
}
