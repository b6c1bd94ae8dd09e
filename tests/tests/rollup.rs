//! Rollups on the real stack: gen (few users, so the same users come back
//! minute after minute, in every partition) → ingest → aggregator, then
//! `vidpulse query <metric> --rollup` and the API's `rollup=` against the
//! minute rows and gen's ground truth: sums and counts are the sums of the
//! minute rows, distinct counts the size of the union (smaller than the sum
//! of per-minute counts), the top 10 ranked on the totals; hour and China-day
//! buckets; bad values refused with the flag's name.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use vidpulse_e2e::*;

fn query(env: &Env, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["query"];
    all.extend_from_slice(args);
    all.extend(["--format", "json"]);
    let out = env.run("vidpulse", &all);
    assert!(
        out.status.success(),
        "vidpulse {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn canon(rows: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    v.sort();
    v
}

fn num(r: &Value, k: &str) -> i64 {
    r[k].as_i64().unwrap_or_else(|| panic!("{k} in {r}"))
}

/// Sums a column of the minute rows per group column.
fn sum_by(rows: &[Value], group: &str, col: &str) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for r in rows {
        *m.entry(r[group].to_string()).or_default() += num(r, col);
    }
    m
}

#[test]
fn rollups_equal_the_minute_rows_and_the_truth() {
    let env = Env::new("rollup");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let truth_path = scratch(&env.prefix).join("truth.json");
    let out = env.run(
        "vidpulse-gen",
        &[
            "--count",
            "6000",
            "--seed",
            "11",
            "--users",
            "40",
            "--formats",
            "live_gift_total,live_streaming_log,live_room_events",
            "--start",
            "2021-08-16T01:00:00Z",
            "--span",
            "10m",
            "--dup-fraction",
            "0.03",
            "--late-fraction",
            "0.03",
            "--bad-fraction",
            "0.01",
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
    let admin = |log: &str, bin: &str, extra: &[&str]| {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["--admin-addr", addr.as_str()];
        args.extend_from_slice(extra);
        env.spawn(bin, &args, log)
    };
    let _ingest = admin("ingest.log", "vidpulse-ingest", &[]);
    let mut agg = admin(
        "aggregator.log",
        "vidpulse-aggregator",
        &["--early-emit", "200ms", "--flush-interval", "200ms"],
    );
    // Every minute row equals the truth first.
    let names = [
        "gifts_by_type_1m",
        "members_by_grade_1m",
        "viewers_by_province_grade_1m",
        "top_gifters_1h",
    ];
    let started = Instant::now();
    wait_for(
        "the minute rows to equal the truth",
        Duration::from_secs(240),
        || {
            names
                .iter()
                .all(|n| {
                    let got = env.run("vidpulse", &["query", n, "--format", "json"]);
                    let got: Vec<Value> = String::from_utf8_lossy(&got.stdout)
                        .lines()
                        .filter_map(|l| serde_json::from_str(l).ok())
                        .collect();
                    canon(&got) == canon(truth["metrics"][*n].as_array().unwrap())
                })
                .then_some(())
        },
    );
    println!("minute rows exact after {:?}", started.elapsed());

    // Gift totals by type since the day began: sums and counts are the sums
    // of the minute rows; givers the union, fewer than the per-minute sum.
    let minutes = query(&env, &["gifts_by_type_1m"]);
    let day = query(
        &env,
        &["gifts_by_type_1m", "--rollup", "--from", "2021-08-16"],
    );
    assert!(!day.is_empty());
    let (amount, gifts, givers) = (
        sum_by(&minutes, "gift_type", "amount"),
        sum_by(&minutes, "gift_type", "gifts"),
        sum_by(&minutes, "gift_type", "givers"),
    );
    for r in &day {
        let g = r["gift_type"].to_string();
        assert_eq!(num(r, "amount"), amount[&g], "{r}");
        assert_eq!(num(r, "gifts"), gifts[&g], "{r}");
        assert!(num(r, "givers") < givers[&g], "a union, not a sum: {r}");
        assert_eq!(r["window_start"], "2021-08-16T00:00:00Z", "{r}");
        assert_eq!(r["window_end"], "2021-08-16T01:10:00Z", "{r}");
    }
    assert_eq!(day.len(), amount.len());
    // ... and equal the truth's rollup (its range is the data's: no --from).
    for name in names {
        let got = query(&env, &[name, "--rollup"]);
        let want = truth["rollups"][name].as_array().unwrap();
        assert_eq!(canon(&got), canon(want), "{name} --rollup");
    }
    let members = query(&env, &["members_by_grade_1m", "--rollup"]);
    let per_minute: i64 = query(&env, &["members_by_grade_1m"])
        .iter()
        .map(|r| num(r, "members"))
        .sum();
    let union: i64 = members.iter().map(|r| num(r, "members")).sum();
    println!("members per grade: {union} distinct, {per_minute} summed over minutes");
    assert!(union < per_minute && union <= 40);

    // Hour buckets sum the minute rows of each hour (late records fall in
    // the hour before 01:00).
    let hours = query(&env, &["gifts_by_type_1m", "--rollup", "1h"]);
    let mut want: BTreeMap<(String, String), i64> = BTreeMap::new();
    for r in &minutes {
        let hour = format!("{}00:00Z", &r["window_start"].as_str().unwrap()[..14]);
        *want.entry((hour, r["gift_type"].to_string())).or_default() += num(r, "amount");
    }
    let got: BTreeMap<(String, String), i64> = hours
        .iter()
        .map(|r| {
            (
                (
                    r["window_start"].as_str().unwrap().to_owned(),
                    r["gift_type"].to_string(),
                ),
                num(r, "amount"),
            )
        })
        .collect();
    assert_eq!(got, want);
    // A China day: 09:00 there, all of it on 2021-08-16 (starting 16:00 UTC
    // the day before).
    let cn = query(
        &env,
        &[
            "gifts_by_type_1m",
            "--rollup",
            "1d",
            "--zone",
            "Asia/Shanghai",
        ],
    );
    assert!(
        cn.iter()
            .all(|r| r["window_start"] == "2021-08-15T16:00:00Z"
                && r["window_end"] == "2021-08-16T16:00:00Z")
    );
    let whole = query(&env, &["gifts_by_type_1m", "--rollup"]);
    let strip = |rows: &[Value]| -> Vec<String> {
        let mut v: Vec<String> = rows
            .iter()
            .map(|r| {
                let mut r = r.clone();
                let o = r.as_object_mut().unwrap();
                o.remove("window_start");
                o.remove("window_end");
                r.to_string()
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(strip(&cn), strip(&whole));

    // Bad values fail with the flag and the fix.
    for (args, says) in [
        (
            vec!["query", "gifts_by_type_1m", "--rollup", "2h"],
            "--rollup",
        ),
        (
            vec!["query", "user_gifts_daily", "--rollup", "1h"],
            "does not divide",
        ),
        (vec!["query", "live_viewer_log", "--rollup"], "is a log"),
        (
            vec![
                "query",
                "gifts_by_type_1m",
                "--rollup",
                "1d",
                "--zone",
                "Mars/Base",
            ],
            "--zone",
        ),
    ] {
        let out = env.run("vidpulse", &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
    }

    // The API says the same, with the same validation.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut api = env.spawn(
        "vidpulse-api",
        &["--listen", &listen, "--pools", "false"],
        "api.log",
    );
    wait_for("vidpulse-api", Duration::from_secs(30), || {
        http_get(port, "/healthz").filter(|(s, _)| *s == 200)
    });
    let (status, body) = http_json(
        port,
        "/api/metrics/gifts_by_type_1m?rollup=&from=2021-08-16&to=2021-08-17",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rollup"], "all");
    let rows: Vec<Value> = body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r["window_end"] = Value::from("2021-08-16T01:10:00Z");
            r
        })
        .collect();
    assert_eq!(canon(&rows), canon(&day));
    let (status, body) = http_json(port, "/api/metrics/gifts_by_type_1m?rollup=2h").unwrap();
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("`rollup`"),
        "{body}"
    );
    assert!(api.terminate());
    assert!(agg.terminate());
}

/// `--top N` of one leaderboard window reads its first N members (and the
/// members tied with the N-th), not the whole set, and ranks them as the
/// whole set is ranked: score descending, then member ascending, also when
/// the tie straddles the cut (Redis itself orders a tie by member
/// descending).
#[test]
fn a_leaderboard_s_first_n_are_ranked_like_the_whole_set_across_a_tie() {
    let env = Env::new("boardtop");
    let key = format!("{}rankings:user_gifts:{{2021-08-16}}", env.prefix);
    let mut r = redis_conn();
    let scores: [(i64, &str); 7] = [
        (10, "u_a"),
        (7, "u_b"),
        (5, "u_c"),
        (5, "u_d"),
        (5, "u_e"),
        (5, "u_f"),
        (3, "u_g"),
    ];
    let _: () = redis::cmd("ZADD")
        .arg(&key)
        .arg(&scores[..])
        .query(&mut r)
        .unwrap();
    let day = ["--from", "2021-08-16", "--to", "2021-08-16T00:00:01Z"];
    let members = |top: Option<&str>| -> Vec<(String, i64, i64)> {
        let mut args = vec!["user_gifts_daily"];
        args.extend(day);
        if let Some(n) = top {
            args.extend(["--top", n]);
        }
        query(&env, &args)
            .iter()
            .map(|v| {
                (
                    v["user_id"].as_str().unwrap().to_owned(),
                    num(v, "amount"),
                    num(v, "rank"),
                )
            })
            .collect()
    };
    let all = members(None);
    let names: Vec<&str> = all.iter().map(|m| m.0.as_str()).collect();
    assert_eq!(names, ["u_a", "u_b", "u_c", "u_d", "u_e", "u_f", "u_g"]);
    for n in 1..=8usize {
        let got = members(Some(&n.to_string()));
        assert_eq!(got, all[..n.min(all.len())], "--top {n}");
    }
    let _: () = redis::cmd("DEL").arg(&key).query(&mut r).unwrap();
}
