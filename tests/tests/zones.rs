//! Days in a zone on the real stack: a spec whose daily leaderboard and
//! daily metric live in China time (`zone = "Asia/Shanghai"`). Gifts at
//! 23:59 and 00:01 China time — the same UTC day — land on two days: two
//! sorted sets `rankings:gifts_cn:{2021-08-16}` and `{2021-08-17}`, two
//! metric rows starting at 16:00 UTC. A full replay in a new consumer group
//! (no checkpoint) gives the same days and the same scores, not doubled.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{Value, json};
use vidpulse_e2e::*;
use vidpulse_proto::{Event, GiftSent, Message as _, event};

const SPEC: &str = r#"
[[leaderboard]]
name = "gifts_cn"
help = "Gift amount per user per China day."
kinds = ["gift_sent"]
member = "user_id"
score = { name = "amount", fn = "sum", field = "amount" }
zone = "Asia/Shanghai"

[[metric]]
name = "gifts_cn_daily"
kinds = ["gift_sent"]
window = "1d"
zone = "Asia/Shanghai"
group_by = ["user_id"]
aggregates = [{ name = "amount", fn = "sum", field = "amount" }, { name = "gifts", fn = "count" }]
"#;

fn cst(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(&format!("{s}+08:00"))
        .unwrap()
        .timestamp_millis()
}

fn gift(id: &str, t: i64, user: &str, amount: i64) -> Event {
    Event {
        event_id: id.into(),
        event_time_ms: t,
        ingest_time_ms: t,
        schema_version: 1,
        user_id: user.into(),
        room_id: "20210813".into(),
        payload: Some(event::Payload::GiftSent(GiftSent {
            gift_type: "1".into(),
            amount,
            ip: String::new(),
        })),
        ..Default::default()
    }
}

fn query(env: &Env, spec: &str, name: &str) -> Vec<Value> {
    let out = env.run(
        "vidpulse",
        &["query", name, "--spec", spec, "--format", "json"],
    );
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn sorted(mut v: Vec<Value>) -> Vec<String> {
    let mut s: Vec<String> = v.drain(..).map(|r| r.to_string()).collect();
    s.sort();
    s
}

fn redis_board(env: &Env, day: &str) -> Vec<String> {
    let out = std::process::Command::new("redis-cli")
        .args([
            "-u",
            &std::env::var("VIDPULSE_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            "ZRANGE",
            &format!("{}rankings:gifts_cn:{{{day}}}", env.prefix),
            "0",
            "-1",
            "WITHSCORES",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn china_midnight_splits_the_day_and_a_replay_keeps_it() {
    let env = Env::new("zones");
    let _tables = DropTables(env.prefix.clone());
    env.create_topics();
    let spec_path = scratch(&env.prefix).join("spec.toml");
    std::fs::write(&spec_path, SPEC).unwrap();
    let spec = spec_path.to_str().unwrap();
    let events = [
        gift("a", cst("2021-08-16T23:59:00"), "u1", 5),
        gift("b", cst("2021-08-16T23:59:40"), "u2", 2),
        gift("c", cst("2021-08-17T00:01:00"), "u1", 7),
        gift("d", cst("2021-08-17T00:02:00"), "u2", 1),
    ];
    let records: Vec<(Option<&str>, Option<Vec<u8>>)> = events
        .iter()
        .map(|e| (Some("20210813"), Some(e.encode_to_vec())))
        .collect();
    env.produce("vp.events.v1", &records);

    let want_board = vec![
        json!({"window_start": "2021-08-15T16:00:00Z", "rank": 1, "user_id": "u1", "amount": 5}),
        json!({"window_start": "2021-08-15T16:00:00Z", "rank": 2, "user_id": "u2", "amount": 2}),
        json!({"window_start": "2021-08-16T16:00:00Z", "rank": 1, "user_id": "u1", "amount": 7}),
        json!({"window_start": "2021-08-16T16:00:00Z", "rank": 2, "user_id": "u2", "amount": 1}),
    ];
    let want_daily = vec![
        json!({"window_start": "2021-08-15T16:00:00Z", "user_id": "u1", "amount": 5, "gifts": 1}),
        json!({"window_start": "2021-08-15T16:00:00Z", "user_id": "u2", "amount": 2, "gifts": 1}),
        json!({"window_start": "2021-08-16T16:00:00Z", "user_id": "u1", "amount": 7, "gifts": 1}),
        json!({"window_start": "2021-08-16T16:00:00Z", "user_id": "u2", "amount": 1, "gifts": 1}),
    ];
    for (round, group) in ["first", "replay"].iter().enumerate() {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut agg = env.spawn(
            "vidpulse-aggregator",
            &[
                "--spec",
                spec,
                "--group",
                &format!("zones-{group}"),
                "--admin-addr",
                &addr,
                // Events written straight to vp.events.v1 (no ingest, no
                // in-band watermarks).
                "--watermarks",
                "max-event-time",
                "--grace",
                "1h",
                "--early-emit",
                "200ms",
                "--flush-interval",
                "200ms",
            ],
            &format!("aggregator-{group}.log"),
        );
        wait_for(
            &format!("{group}: two China days on the board and in the metric"),
            Duration::from_secs(120),
            || {
                (sorted(query(&env, spec, "gifts_cn")) == sorted(want_board.clone())
                    && sorted(query(&env, spec, "gifts_cn_daily")) == sorted(want_daily.clone()))
                .then_some(())
            },
        );
        // The sorted sets are named by the China date.
        assert_eq!(redis_board(&env, "2021-08-16"), ["u2", "2", "u1", "5"]);
        assert_eq!(redis_board(&env, "2021-08-17"), ["u2", "1", "u1", "7"]);
        // A day's rollup is that China day.
        let out = env.ctl(&[
            "query",
            "gifts_cn_daily",
            "--spec",
            spec,
            "--rollup",
            "1d",
            "--format",
            "json",
        ]);
        assert_eq!(out.lines().count(), 4, "round {round}: {out}");
        assert!(agg.terminate(), "{group}: SIGTERM drains and exits 0");
    }
    // Nothing was filed under the UTC date alone.
    let keys = std::process::Command::new("redis-cli")
        .args([
            "--scan",
            "--pattern",
            &format!("{}rankings:gifts_cn:*", env.prefix),
        ])
        .output()
        .unwrap();
    let mut keys: Vec<String> = String::from_utf8_lossy(&keys.stdout)
        .lines()
        .map(|k| k.trim_start_matches(&env.prefix).to_owned())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "rankings:gifts_cn:{2021-08-16}",
            "rankings:gifts_cn:{2021-08-16}:parts",
            "rankings:gifts_cn:{2021-08-17}",
            "rankings:gifts_cn:{2021-08-17}:parts"
        ]
    );
}
