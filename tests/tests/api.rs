//! End-to-end tests of vidpulse-api on the real broker, Redis and ClickHouse
//! (scripts/stack up): a pipeline (gen → ingest → aggregator) fills the
//! metric tables and leaderboards, then the API must answer what gen's
//! ground truth (and `vidpulse query`) says, refuse bad input with 400/404
//! and a reason, keep answers bounded, stream live snapshots, follow pool
//! edits, and say which backend is down when one is.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vidpulse_e2e::*;

const FROM: &str = "2021-08-16T00:00:00Z";
const TO: &str = "2021-08-16T02:00:00Z";

fn api(env: &Env, port: u16, extra: &[&str]) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--listen", listen.as_str(), "--live-interval", "500ms"];
    args.extend_from_slice(extra);
    let p = env.spawn("vidpulse-api", &args, &format!("api-{port}.log"));
    wait_for("vidpulse-api /healthz", Duration::from_secs(30), || {
        http_get(port, "/healthz").filter(|(s, _)| *s == 200)
    });
    p
}

fn get(port: u16, path: &str) -> (u16, Value) {
    http_json(port, path).unwrap_or_else(|| panic!("GET {path}: no answer"))
}

/// Asserts a status and returns the `error` text.
fn refused(port: u16, path: &str, status: u16) -> String {
    let (s, body) = get(port, path);
    assert_eq!(s, status, "GET {path}: {body}");
    assert_eq!(body["status"], json!(status), "{body}");
    body["error"].as_str().unwrap_or_default().to_owned()
}

fn canon(rows: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = rows.iter().map(Value::to_string).collect();
    v.sort();
    v
}

fn truth_rows(truth: &Value, section: &str, name: &str) -> Vec<Value> {
    truth[section][name].as_array().cloned().unwrap_or_default()
}

/// `vidpulse query <name> --format json` rows.
fn query(env: &Env, name: &str) -> Vec<Value> {
    let out = env.run("vidpulse", &["query", name, "--format", "json"]);
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn rows_of(body: &Value) -> Vec<Value> {
    body["rows"].as_array().cloned().unwrap_or_default()
}

#[test]
fn api_answers_like_the_truth_and_refuses_bad_input() {
    let env = Env::new("api");
    env.create_topics();
    env.ctl(&["pool", "create", "vids", "--match", "video_id"]);
    env.ctl(&["pool", "add", "vids", "100000", "100001", "100002"]);

    let truth_file = scratch(&env.prefix).join("truth.json");
    let out = env.run(
        "vidpulse-gen",
        &[
            "--count",
            "3000",
            "--seed",
            "5",
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
            truth_file.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "gen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let truth = read_json(&truth_file);

    let ingest_port = free_port().to_string();
    let _ingest = env.spawn(
        "vidpulse-ingest",
        &["--admin-addr", &format!("127.0.0.1:{ingest_port}")],
        "ingest.log",
    );
    let agg_port = free_port();
    let _agg = env.spawn(
        "vidpulse-aggregator",
        &[
            "--admin-addr",
            &format!("127.0.0.1:{agg_port}"),
            "--early-emit",
            "200ms",
            "--flush-interval",
            "200ms",
            "--flush-max-rows",
            "500",
        ],
        "aggregator.log",
    );
    let checked = [
        ("metrics", "gifts_by_type_1m"),
        ("metrics", "viewers_by_province_grade_1m"),
        ("metrics", "members_by_grade_1m"),
        ("metrics", "top_gifters_1h"),
        ("metrics", "gifts_6h"),
        ("metrics", "online_users_1m"),
        ("metrics", "live_viewer_log"),
        ("leaderboards", "user_gifts_daily"),
        ("leaderboards", "actions_daily"),
    ];
    wait_for(
        "the aggregator's results to equal the truth",
        Duration::from_secs(240),
        || {
            checked
                .iter()
                .filter(|(s, n)| truth[*s].get(*n).is_some())
                .all(|(s, n)| canon(&query(&env, n)) == canon(&truth_rows(&truth, s, n)))
                .then_some(())
        },
    );

    let port = free_port();
    let mut api_proc = api(
        &env,
        port,
        &["--max-rows", "5000", "--live-at", "2021-08-16T01:05:30Z"],
    );

    // ---- final values: the same rows as the truth (and `vidpulse query`) ----
    for (section, name) in checked {
        if section != "metrics" || name == "live_viewer_log" || truth[section].get(name).is_none() {
            continue;
        }
        let (s, body) = get(port, &format!("/api/metrics/{name}?from={FROM}&to={TO}"));
        assert_eq!(s, 200, "{name}: {body}");
        assert_eq!(body["metric"], json!(name));
        assert_eq!(body["truncated"], json!(false), "{name}");
        let want: Vec<Value> = truth_rows(&truth, section, name)
            .into_iter()
            .filter(|r| {
                let w = r["window_start"].as_str().unwrap_or_default();
                (FROM..TO).contains(&w)
            })
            .collect();
        assert_eq!(canon(&rows_of(&body)), canon(&want), "{name}");
        // Columns in result order, as `vidpulse query` prints them.
        let cols: Vec<String> = serde_json::from_value(body["columns"].clone()).unwrap();
        assert_eq!(cols[0], "window_start", "{name}");
    }
    println!("final values equal the truth for every checked metric");

    // A filter (Chinese text, percent-encoded) keeps the matching rows only.
    let all = truth_rows(&truth, "metrics", "viewers_by_province_grade_1m");
    let province = all[0]["province"].as_str().unwrap().to_owned();
    let (s, body) = get(
        port,
        &format!(
            "/api/metrics/viewers_by_province_grade_1m?from={FROM}&to={TO}&province={}",
            url_encode(&province)
        ),
    );
    assert_eq!(s, 200, "{body}");
    let want: Vec<Value> = all
        .iter()
        .filter(|r| r["province"] == json!(province))
        .cloned()
        .collect();
    assert!(!want.is_empty());
    assert_eq!(canon(&rows_of(&body)), canon(&want));

    // Values are escaped, never SQL: a quote is just a character.
    for evil in ["x' OR '1'='1", "x\\' OR 1=1 --", "'; DROP TABLE x; --"] {
        let (s, body) = get(
            port,
            &format!(
                "/api/metrics/viewers_by_province_grade_1m?from={FROM}&to={TO}&province={}",
                url_encode(evil)
            ),
        );
        assert_eq!(s, 200, "{evil}: {body}");
        assert_eq!(rows_of(&body).len(), 0, "{evil}");
    }

    // ---- rankings ----
    let want: Vec<Value> = truth_rows(&truth, "leaderboards", "user_gifts_daily")
        .into_iter()
        .filter(|r| r["window_start"] == json!("2021-08-16T00:00:00Z"))
        .take(5)
        .collect();
    let (s, body) = get(
        port,
        "/api/rankings/user_gifts_daily?limit=5&at=2021-08-16T01:03:00Z",
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["window_start"], json!("2021-08-16T00:00:00Z"));
    let got: Vec<Value> = body["entries"].as_array().unwrap().clone();
    assert_eq!(got.len(), 5);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["rank"], w["rank"]);
        assert_eq!(g["member"], w["user_id"]);
        assert_eq!(g["score"], w["amount"]);
    }
    let (_, body) = get(
        port,
        "/api/rankings/user_gifts_daily?limit=100000&at=2021-08-16",
    );
    assert_eq!(body["limit"], json!(100));
    assert_eq!(body["limit_capped"], json!(true));
    assert!(body["entries"].as_array().unwrap().len() <= 100);
    let (s, body) = get(port, "/api/metrics");
    assert_eq!(s, 200);
    let v = body["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == json!("viewers_by_province_grade_1m"))
        .unwrap()
        .clone();
    assert_eq!(
        v["columns"],
        json!(["window_start", "province", "grade", "arrivals", "viewers"])
    );
    assert_eq!(v["filters"], json!(["province", "grade"]));
    let (s, body) = get(port, "/api/rankings");
    assert_eq!(s, 200);
    assert_eq!(body["boards"].as_array().unwrap().len(), 3);

    // ---- bad input: 404 with the list, 400 saying why ----
    let e = refused(port, "/api/metrics/no_such_metric", 404);
    assert!(e.contains("no metric \"no_such_metric\""), "{e}");
    let (_, body) = get(port, "/api/metrics/no_such_metric");
    let names: Vec<String> = serde_json::from_value(body["metrics"].clone()).unwrap();
    assert!(names.contains(&"gifts_6h".to_owned()) && names.contains(&"actions_daily".to_owned()));
    let (_, body) = get(port, "/api/rankings/nope");
    assert_eq!(body["status"], json!(404));
    assert_eq!(
        body["boards"],
        json!(["actions_daily", "video_likes_daily", "user_gifts_daily"])
    );

    let g = "/api/metrics/gifts_by_type_1m";
    let e = refused(port, &format!("{g}?from=yesterday"), 400);
    assert!(e.contains("`from`") && e.contains("not a time"), "{e}");
    let e = refused(port, &format!("{g}?from={TO}&to={FROM}"), 400);
    assert!(e.contains("must be before"), "{e}");
    let e = refused(port, &format!("{g}?from=2021-01-01&to=2021-08-16"), 400);
    assert!(e.contains("too long") && e.contains("at most 7days"), "{e}");
    let e = refused(port, &format!("{g}?from={FROM}"), 400);
    assert!(e.contains("too long") && e.contains("(now)"), "{e}");
    let e = refused(port, &format!("{g}?colour=red"), 400);
    assert!(
        e.contains("unknown parameter `colour`") && e.contains("filter on gift_type"),
        "{e}"
    );
    let e = refused(port, "/api/metrics/members_by_grade_1m?grade=gold", 400);
    assert!(
        e.contains("grade") && e.contains("not a whole number"),
        "{e}"
    );
    let e = refused(port, &format!("{g}?limit=0"), 400);
    assert!(e.contains("at least 1"), "{e}");
    let e = refused(port, &format!("{g}?limit=many"), 400);
    assert!(e.contains("not a whole number"), "{e}");
    let e = refused(port, "/api/rankings/actions_daily?top=3", 400);
    assert!(e.contains("unknown parameter `top`"), "{e}");
    let e = refused(port, "/api/rankings/actions_daily?at=soon", 400);
    assert!(e.contains("`at`"), "{e}");
    let e = refused(port, &format!("{g}?limit=1&limit=2"), 400);
    assert!(e.contains("more than once"), "{e}");
    let e = refused(port, "/api/nothing/here", 404);
    assert!(e.contains("see GET /api"), "{e}");

    // ---- bounded answers ----
    let (s, body) = get(port, &format!("{g}?from={FROM}&to={TO}&limit=3"));
    assert_eq!(s, 200);
    assert_eq!(rows_of(&body).len(), 3);
    assert_eq!(body["truncated"], json!(true));
    let (_, body) = get(
        port,
        &format!("/api/metrics/live_viewer_log?from={FROM}&to={TO}&limit=999999999"),
    );
    assert_eq!(body["limit"], json!(5000));
    assert_eq!(body["limit_capped"], json!(true));
    assert!(rows_of(&body).len() <= 5000);
    let (_, body) = get(
        port,
        &format!("/api/metrics/live_viewer_log?from={FROM}&to={TO}&limit=20"),
    );
    assert_eq!(rows_of(&body).len(), 20);
    assert_eq!(body["truncated"], json!(true));
    // Default range: the last hour before now (nothing in 2021 data).
    let (s, body) = get(port, g);
    assert_eq!(s, 200, "{body}");
    assert_eq!(rows_of(&body).len(), 0);

    // ---- the live snapshot, pinned to 01:05:30 ----
    let snap: Value = wait_for("a live snapshot", Duration::from_secs(30), || {
        http_json(port, "/api/live/snapshot")
            .filter(|(s, _)| *s == 200)
            .map(|(_, v)| v)
    });
    assert_eq!(snap["pinned"], json!(true));
    let p = &snap["panels"];
    for id in [
        "gifts_6h",
        "gifts_by_type",
        "members_by_grade",
        "viewers_by_province_grade",
        "top_gifters",
        "online_users",
        "board_actions",
        "board_user_gifts",
    ] {
        assert!(p[id]["error"].is_null(), "{id}: {}", p[id]);
        assert!(!rows_of(&p[id]).is_empty(), "{id} has no rows: {}", p[id]);
    }
    // Today so far (a UTC day): the minutes from 00:00 to the one holding
    // 01:05:30, rolled up. Sums and counts add the truth's minute rows;
    // distinct givers are at most their sum.
    let today = &p["gifts_by_type"];
    assert_eq!(today["window_start"], json!("2021-08-16T00:00:00Z"));
    assert_eq!(
        (today["day"].clone(), today["zone"].clone()),
        (json!("2021-08-16"), json!("UTC"))
    );
    let mut sums: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    for r in truth_rows(&truth, "metrics", "gifts_by_type_1m") {
        if r["window_start"].as_str().unwrap() <= "2021-08-16T01:05:00Z" {
            let e = sums.entry(r["gift_type"].to_string()).or_default();
            e.0 += r["amount"].as_i64().unwrap();
            e.1 += r["gifts"].as_i64().unwrap();
            e.2 += r["givers"].as_i64().unwrap();
        }
    }
    let rows = rows_of(today);
    assert_eq!(rows.len(), sums.len());
    for r in &rows {
        let (amount, gifts, givers) = sums[&r["gift_type"].to_string()];
        assert_eq!(
            (r["amount"].as_i64(), r["gifts"].as_i64()),
            (Some(amount), Some(gifts)),
            "{r}"
        );
        assert!((1..=givers).contains(&r["givers"].as_i64().unwrap()), "{r}");
    }
    assert_eq!(
        today["total"].as_i64(),
        Some(sums.values().map(|s| s.0).sum())
    );
    // The same rows as `vidpulse query --rollup` over that range.
    let cli = |name: &str| -> Vec<Value> {
        env.ctl(&[
            "query",
            name,
            "--rollup",
            "--from",
            "2021-08-16",
            "--to",
            "2021-08-16T01:05:30.001Z",
            "--format",
            "json",
        ])
        .lines()
        .map(|l| {
            let mut r: Value = serde_json::from_str(l).unwrap();
            r.as_object_mut().unwrap().remove("window_end");
            r
        })
        .collect()
    };
    let without_end = |rows: Vec<Value>| -> Vec<Value> {
        rows.into_iter()
            .map(|mut r| {
                r.as_object_mut().unwrap().remove("window_end");
                r
            })
            .collect()
    };
    for (panel, metric) in [
        ("gifts_by_type", "gifts_by_type_1m"),
        ("members_by_grade", "members_by_grade_1m"),
        ("viewers_by_province_grade", "viewers_by_province_grade_1m"),
        ("top_gifters", "top_gifters_1h"),
    ] {
        assert_eq!(
            canon(&without_end(rows_of(&p[panel]))),
            canon(&cli(metric)),
            "{panel}"
        );
    }
    // A per-minute trend of today: minutes 00:00 to 01:05, the first
    // aggregate summed over groups.
    let trend = p["gifts_by_type"]["trend"].as_array().unwrap();
    assert_eq!(trend.len(), 60);
    assert_eq!(trend[59]["window_start"], json!("2021-08-16T01:05:00Z"));
    // Gifts over the 6 h ending 01:06 (the window holding 01:05:30 ends then).
    let six = truth_rows(&truth, "metrics", "gifts_6h")
        .into_iter()
        .find(|r| r["window_start"] == json!("2021-08-15T19:06:00Z"))
        .map(|r| r["amount"].clone())
        .unwrap_or(json!(0));
    assert_eq!(p["gifts_6h"]["latest"], six);
    assert_eq!(rows_of(&p["gifts_6h"]).len(), 60);
    // Top gifters of today: ten, ranked on the day's totals.
    let top = rows_of(&p["top_gifters"]);
    assert_eq!(top.len(), 10);
    assert!(
        top.windows(2)
            .all(|w| w[0]["amount"].as_i64() >= w[1]["amount"].as_i64())
    );
    // Online users: each room's newest level at or before 01:05.
    let mut newest: BTreeMap<String, Value> = BTreeMap::new();
    for r in truth_rows(&truth, "metrics", "online_users_1m") {
        let w = r["window_start"].as_str().unwrap().to_owned();
        if w.as_str() <= "2021-08-16T01:05:00Z" {
            newest.insert(r["room_id"].to_string(), r);
        }
    }
    assert_eq!(
        canon(&rows_of(&p["online_users"])),
        canon(&newest.into_values().collect::<Vec<_>>())
    );
    println!("live snapshot panels equal the truth");

    // Server-sent events: the snapshot is pushed at once on connect.
    let data = sse_first(port, "/api/live", "snapshot", Duration::from_secs(20))
        .expect("no snapshot event on /api/live");
    let ev: Value = serde_json::from_str(&data).unwrap();
    assert!(ev["version"].as_u64().unwrap() >= 1);
    assert!(
        ev["panels"]["gifts_by_type"]["rows"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    );

    // ---- pools follow edits ----
    let members = |port: u16| -> Option<u64> {
        let (s, v) = http_json(port, "/api/pools")?;
        (s == 200 && v["loaded"] == json!(true)).then_some(())?;
        v["pools"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == json!("vids"))?["members"]
            .as_u64()
    };
    wait_for("pool vids with 3 ids", Duration::from_secs(30), || {
        members(port).filter(|n| *n == 3)
    });
    let (_, v) = get(port, "/api/pools");
    let vids = v["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == json!("vids"))
        .unwrap()
        .clone();
    assert_eq!(vids["match"], json!("video_id"));
    assert_eq!(vids["mode"], json!("broadcast"));
    env.ctl(&["pool", "add", "vids", "100003", "100004"]);
    env.ctl(&["pool", "rm", "vids", "100000"]);
    let t = Instant::now();
    wait_for("pool vids with 4 ids", Duration::from_secs(30), || {
        members(port).filter(|n| *n == 4)
    });
    println!("pool edit visible on /api/pools after {:?}", t.elapsed());

    // ---- the page, its assets, operations ----
    let (s, h, body) = http_fetch(port, "/").unwrap();
    assert_eq!(s, 200);
    assert!(h["content-type"].starts_with("text/html"));
    assert!(h["content-security-policy"].contains("default-src 'self'"));
    assert!(body.contains("assets/vendor/chart.umd.min.js") && !body.contains("https://"));
    let (s, h, js) = http_fetch(port, "/assets/vendor/chart.umd.min.js").unwrap();
    assert_eq!(s, 200);
    assert!(h["content-type"].starts_with("text/javascript"));
    assert!(js.len() > 100_000 && js.contains("Chart.js v4"));
    assert_eq!(http_fetch(port, "/assets/nope.js").unwrap().0, 404);
    assert_eq!(http_get(port, "/readyz").unwrap().0, 200);
    let m = prom(&http_get(port, "/metrics").unwrap().1);
    assert!(
        prom_sum(
            &m,
            "vidpulse_api_requests_total",
            &["route=\"/api/metrics/{metric}\"", "status=\"400\""]
        ) >= 8.0
    );
    assert!(
        prom_sum(
            &m,
            "vidpulse_api_requests_total",
            &["route=\"/api/metrics/{metric}\"", "status=\"200\""]
        ) >= 6.0
    );

    // SIGTERM with a live stream open: the stream ends and the server exits 0.
    let mut held = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(held, "GET /api/live HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    assert!(
        api_proc.terminate(),
        "vidpulse-api did not exit cleanly on SIGTERM"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "drain took {:?}",
        t.elapsed()
    );
    drop(held);
    drop_clickhouse_tables(&env.prefix);
}

#[test]
fn api_says_which_backend_is_down() {
    let env = Env::new("apidown");
    let port = free_port();
    let dead_ch = format!("http://127.0.0.1:{}", free_port());
    let dead_redis = format!("redis://127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{port}");
    let _api = {
        let logf = std::fs::File::create(scratch(&env.prefix).join("api.log")).unwrap();
        let child = env
            .cmd("vidpulse-api")
            .args([
                "--listen",
                &listen,
                "--pools",
                "false",
                "--query-timeout",
                "3s",
            ])
            .env("VIDPULSE_CLICKHOUSE_URL", &dead_ch)
            .env("VIDPULSE_REDIS_URL", &dead_redis)
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap();
        KillOnDrop(child)
    };
    wait_for("vidpulse-api /healthz", Duration::from_secs(30), || {
        http_get(port, "/healthz").filter(|(s, _)| *s == 200)
    });
    let (s, h, body) = http_fetch(port, "/api/metrics/gifts_by_type_1m").unwrap();
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("ClickHouse"), "{body}");
    assert_eq!(h.get("retry-after").map(String::as_str), Some("2"));
    let e = refused(port, "/api/rankings/actions_daily", 503);
    assert!(e.contains("Redis"), "{e}");
    let (s, text) = http_get(port, "/readyz").unwrap();
    assert_eq!(s, 503);
    assert!(
        text.contains("redis") && text.contains("clickhouse"),
        "{text}"
    );
    let e = refused(port, "/api/pools", 404);
    assert!(e.contains("--pools false"), "{e}");
    // The dashboard still gets a snapshot, each panel saying what failed.
    let snap = wait_for("a snapshot", Duration::from_secs(30), || {
        http_json(port, "/api/live/snapshot")
            .filter(|(s, _)| *s == 200)
            .map(|(_, v)| v)
    });
    assert!(
        snap["panels"]["gifts_by_type"]["error"]
            .as_str()
            .unwrap()
            .contains("ClickHouse")
    );
    assert!(
        snap["panels"]["board_actions"]["error"]
            .as_str()
            .unwrap()
            .contains("Redis")
    );

    // Real ClickHouse, but no aggregator has made this prefix's tables yet.
    let port2 = free_port();
    let _api2 = api(&env, port2, &["--pools", "false"]);
    let e = refused(port2, "/api/metrics/gifts_by_type_1m", 503);
    assert!(
        e.contains("does not exist yet") && e.contains("vidpulse-aggregator"),
        "{e}"
    );
}

#[test]
fn api_refuses_bad_flags() {
    let env = Env::new("apiflags");
    for (args, want) in [
        (&["--max-rows", "0"][..], "--max-rows"),
        (&["--live-at", "yesterday"][..], "--live-at"),
        (
            &["--default-rows", "20", "--max-rows", "10"][..],
            "--default-rows",
        ),
        (&["--spec", "/nonexistent/spec.toml"][..], "--spec"),
    ] {
        let out = env.run("vidpulse-api", args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
