//! Browser test of the dashboard: a small live pipeline (gen at a steady
//! rate with event times at the wall clock → ingest → monitor with two pools
//! → aggregator with early emission) feeds vidpulse-api; headless Chromium
//! (the Debian package) opens the page, which must fill every chart and
//! table from the server-sent events on /api/live and keep refreshing. Its
//! "today" panels (seed 002's running totals: gifts by type, members per
//! grade, viewers by province × grade, top 10 gifters) must equal gen's
//! ground truth, in the snapshot and in the charts the page draws. The
//! dashboard's day is set (`--day-zone`) to Asia/Shanghai, or to a zone
//! where it is about noon when China's midnight is near, so the run never
//! crosses midnight and "today" holds all of it.
//! The page is then saved as a screenshot (scratch dir; also to
//! `$VIDPULSE_DASHBOARD_PNG` when set, which `scripts/dashboard-screenshot`
//! uses to refresh docs/dashboard.png).
//!
//! Chromium is driven over the DevTools protocol, so the test reads the
//! page's own state (the `data-rows` / `data-state` markers each panel sets
//! and each Chart.js chart's data) instead of guessing with timeouts.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};
use vidpulse_e2e::*;

fn chromium() -> PathBuf {
    if let Ok(p) = std::env::var("VIDPULSE_CHROMIUM") {
        return PathBuf::from(p);
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let p = PathBuf::from(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "no Chromium found: `apt-get install -y chromium` (scripts/test does), or set VIDPULSE_CHROMIUM"
    );
}

/// GET on Chromium's DevTools HTTP port, which keeps connections open: the
/// body is read up to its Content-Length.
fn devtools_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_owned())
            })
            .and_then(|v| v.parse().ok())?;
        if body.len() >= len {
            return head.contains(" 200 ").then(|| body.to_owned());
        }
    }
}

/// A DevTools-protocol session on one page.
struct Cdp {
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next: u64,
}

impl Cdp {
    fn attach(devtools_port: u16) -> Cdp {
        let url = wait_for("a Chromium page target", Duration::from_secs(30), || {
            let targets: Value =
                serde_json::from_str(&devtools_get(devtools_port, "/json/list")?).ok()?;
            targets
                .as_array()?
                .iter()
                .find(|t| t["type"] == json!("page"))?["webSocketDebuggerUrl"]
                .as_str()
                .map(str::to_owned)
        });
        let (mut ws, _) = tungstenite::connect(url.as_str()).unwrap();
        if let MaybeTlsStream::Plain(s) = ws.get_mut() {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        }
        Cdp { ws, next: 1 }
    }

    /// Sends a command and returns its `result` (events are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let m = self.ws.read().unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == json!(id) {
                assert!(v["error"].is_null(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// Evaluates an expression that returns a JSON string.
    fn eval_json(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        r["result"]["value"]
            .as_str()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null)
    }
}

/// What the page shows: update count, each panel's marker, each chart's
/// number of non-zero data points.
const PAGE_STATE: &str = r"(() => {
  const v = window.__vidpulse || {};
  const panels = Array.from(document.querySelectorAll('[data-panel]')).map(e =>
    [e.dataset.panel, Number(e.dataset.rows || 0), e.dataset.state || '']);
  const charts = Array.from(document.querySelectorAll('canvas')).map(c => {
    const ch = window.Chart && Chart.getChart(c);
    return [c.id, ch ? ch.data.datasets.reduce((n, d) => n + d.data.filter(x => x > 0).length, 0) : -1];
  });
  return JSON.stringify({updates: v.updates || 0, state: document.body.dataset.state, panels, charts});
})()";

/// Starts a stage with its admin port and waits until it is ready (so the
/// next free port cannot be the same one).
fn admin(env: &Env, name: &str, extra: &[&str]) -> Proc {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec!["--admin-addr", addr.as_str()];
    args.extend_from_slice(extra);
    let mut p = env.spawn(name, &args, &format!("{name}.log"));
    wait_for(&format!("{name} ready"), Duration::from_secs(60), || {
        assert!(
            p.is_running(),
            "{name} exited; see its log in {}",
            scratch(&env.prefix).display()
        );
        http_get(port, "/readyz").filter(|(s, _)| *s == 200)
    });
    p
}

#[test]
fn dashboard_fills_every_chart_from_the_live_stream() {
    let chrome = chromium();
    let env = Env::new("dash");
    env.create_topics();
    let vids: Vec<String> = (100_000..100_030).map(|i| i.to_string()).collect();
    let authors: Vec<String> = (0..20).map(|i| format!("a-{i}")).collect();
    env.ctl(&["pool", "create", "vids", "--match", "video_id"]);
    let mut add = vec!["pool", "add", "vids"];
    add.extend(vids.iter().map(String::as_str));
    env.ctl(&add);
    env.ctl(&[
        "pool",
        "create",
        "authors",
        "--match",
        "author_id",
        "--kinds",
        "video_published",
    ]);
    let mut add = vec!["pool", "add", "authors"];
    add.extend(authors.iter().map(String::as_str));
    env.ctl(&add);

    let room = format!("{}room:{{id}}", env.prefix);
    let _ingest = admin(&env, "vidpulse-ingest", &[]);
    let _monitor = admin(&env, "vidpulse-monitor", &["--room-key", &room]);
    let _agg = admin(
        &env,
        "vidpulse-aggregator",
        &["--early-emit", "1s", "--flush-interval", "1s"],
    );
    // Event times follow the wall clock: 150 records/s for 2 minutes, or
    // longer when a screenshot run lets the pipeline run first.
    let settle = std::env::var("VIDPULSE_DASHBOARD_WAIT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    let duration = format!("{}s", (settle + 60).max(120));
    let truth = scratch(&env.prefix).join("truth.json");
    let mut gen_proc = env.spawn(
        "vidpulse-gen",
        &[
            "--wall-clock",
            "--rate",
            "150",
            "--duration",
            &duration,
            "--seed",
            "3",
            "--truth",
            truth.to_str().unwrap(),
        ],
        "gen.log",
    );

    let api_port = free_port();
    let listen = format!("127.0.0.1:{api_port}");
    let zone = noon_zone();
    println!("dashboard day zone: {zone}");
    let mut api = env.spawn(
        "vidpulse-api",
        &[
            "--listen",
            &listen,
            "--live-interval",
            "1s",
            "--day-zone",
            &zone,
        ],
        "api.log",
    );
    wait_for("vidpulse-api /healthz", Duration::from_secs(30), || {
        http_get(api_port, "/healthz").filter(|(s, _)| *s == 200)
    });
    let started = Instant::now();
    let deadline = started + Duration::from_secs(240);
    loop {
        let snap = http_json(api_port, "/api/live/snapshot")
            .filter(|(s, _)| *s == 200)
            .map(|(_, v)| v)
            .unwrap_or(Value::Null);
        let mut missing: Vec<String> = Vec::new();
        if let Some(panels) = snap["panels"].as_object() {
            for (id, p) in panels {
                let rows = p["rows"].as_array().map_or(0, Vec::len);
                if !p["error"].is_null() || rows == 0 {
                    missing.push(format!("{id} (error {}, {rows} rows)", p["error"]));
                }
            }
            // The 6 h line needs a non-zero point, not just its 60 slots.
            if panels["gifts_6h"]["latest"].as_i64().unwrap_or(0) <= 0 {
                missing.push("gifts_6h (all zero)".into());
            }
        } else {
            missing.push("no snapshot".into());
        }
        if snap["pools"]["pools"]
            .as_array()
            .is_none_or(|p| p.len() != 2)
        {
            missing.push(format!("pools ({})", snap["pools"]));
        }
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "live panels still without data after {:?}: {}",
            started.elapsed(),
            missing.join("; ")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "every panel had data {:?} after the API started",
        started.elapsed()
    );
    if settle > 0 {
        println!("letting the pipeline run {settle}s more (VIDPULSE_DASHBOARD_WAIT)");
        std::thread::sleep(Duration::from_secs(settle));
    }

    // ---- today so far = gen's truth ----
    wait_for("vidpulse-gen to finish", Duration::from_secs(400), || {
        (!gen_proc.is_running()).then_some(())
    });
    let truth = read_json(&truth);
    let want = today_truth(&truth);
    let t = Instant::now();
    let snap = loop {
        let snap = http_json(api_port, "/api/live/snapshot")
            .filter(|(s, _)| *s == 200)
            .map(|(_, v)| v)
            .unwrap_or(Value::Null);
        let got = today_panels(&snap);
        if got == want {
            break snap;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "today panels still differ from the truth: {}",
            first_difference(&want, &got)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    println!(
        "today panels equal the truth {:?} after gen ended ({} gift types, {} grades, {} province × grade cells, top {})",
        t.elapsed(),
        want["gifts_by_type"].len(),
        want["members_by_grade"].len(),
        want["viewers_by_province_grade"].len(),
        want["top_gifters"].len()
    );
    for id in ["gifts_by_type", "members_by_grade"] {
        let trend = snap["panels"][id]["trend"].as_array().unwrap();
        assert!(
            trend.iter().any(|p| p["value"].as_i64().unwrap_or(0) > 0),
            "{id}: no per-minute trend: {trend:?}"
        );
    }
    assert_eq!(snap["panels"]["gifts_by_type"]["zone"], json!(zone));

    // ---- the browser ----
    let devtools = free_port();
    let profile = scratch(&env.prefix).join("chromium-profile");
    let _ = std::fs::remove_dir_all(&profile);
    let _chrome = KillOnDrop(
        Command::new(&chrome)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1920,1080",
                "--remote-allow-origins=*",
                &format!("--remote-debugging-port={devtools}"),
                &format!("--user-data-dir={}", profile.display()),
                &format!("http://127.0.0.1:{api_port}/"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut cdp = Cdp::attach(devtools);
    // A 1920×1080 viewport, the wall screen the page is laid out for.
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1920, "height": 1080, "deviceScaleFactor": 1, "mobile": false}),
    );
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    let page = loop {
        let page = cdp.eval_json(PAGE_STATE);
        let panels = page["panels"].as_array().cloned().unwrap_or_default();
        let charts = page["charts"].as_array().cloned().unwrap_or_default();
        let ok = page["updates"].as_u64().unwrap_or(0) >= 2
            && panels.len() == 12
            && charts.len() == 8
            && panels
                .iter()
                .all(|p| p[1].as_u64().unwrap_or(0) > 0 && p[2] == json!("ok"))
            && charts.iter().all(|c| c[1].as_i64().unwrap_or(0) > 0);
        if ok || Instant::now() > deadline {
            break page;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    println!("page after {:?}: {page}", t.elapsed());
    assert!(
        page["updates"].as_u64().unwrap_or(0) >= 2,
        "the page did not get two live updates: {page}"
    );
    assert_eq!(page["state"], json!("live"), "{page}");
    for p in page["panels"].as_array().unwrap() {
        assert!(
            p[1].as_u64().unwrap_or(0) > 0 && p[2] == json!("ok"),
            "panel without data: {p} in {page}"
        );
    }
    assert_eq!(page["charts"].as_array().unwrap().len(), 8, "{page}");
    for c in page["charts"].as_array().unwrap() {
        assert!(c[1].as_i64().unwrap_or(0) > 0, "chart without data: {c}");
    }
    // What the page draws for today is the truth too.
    let drawn = cdp.eval_json(DRAWN);
    check_drawn(&drawn, &want);
    println!("the page draws today's truth: {}", drawn["kpi"]);

    // ---- the screenshot ----
    let shot = cdp.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 50_000,
        "{} bytes",
        png.len()
    );
    let out = scratch(&env.prefix).join("dashboard.png");
    std::fs::write(&out, &png).unwrap();
    println!("screenshot: {} ({} bytes)", out.display(), png.len());
    if let Ok(dest) = std::env::var("VIDPULSE_DASHBOARD_PNG") {
        std::fs::write(&dest, &png).unwrap();
        println!("screenshot copied to {dest}");
    }

    // SIGTERM ends the page's open stream and the server exits 0.
    assert!(
        api.terminate(),
        "vidpulse-api did not exit cleanly with a browser attached"
    );
    drop_clickhouse_tables(&env.prefix);
}

/// Seed 002's zone, Asia/Shanghai, unless its midnight is less than an
/// hour away; then a fixed-offset zone where it is about noon now. Either
/// way a run of a few minutes stays inside one day there (`Etc/GMT-3` is
/// UTC+3).
fn noon_zone() -> String {
    let hour = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600
        % 24) as i64;
    if (1..23).contains(&((hour + 8) % 24)) {
        return "Asia/Shanghai".into();
    }
    match 12 - hour {
        0 => "UTC".into(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    }
}

/// Rows without the range columns, as sorted JSON texts.
fn rows_of(rows: &Value, keep: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = rows
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let o: serde_json::Map<String, Value> = keep
                        .iter()
                        .map(|k| ((*k).to_owned(), r[*k].clone()))
                        .collect();
                    Value::Object(o).to_string()
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

const TODAY: [(&str, &str, &[&str]); 4] = [
    (
        "gifts_by_type",
        "gifts_by_type_1m",
        &["gift_type", "amount", "gifts", "givers"],
    ),
    (
        "members_by_grade",
        "members_by_grade_1m",
        &["grade", "members"],
    ),
    (
        "viewers_by_province_grade",
        "viewers_by_province_grade_1m",
        &["province", "grade", "arrivals", "viewers"],
    ),
    (
        "top_gifters",
        "top_gifters_1h",
        &["rank", "user_id", "amount"],
    ),
];

/// The truth's whole-run rollups, by panel (the run is all "today").
fn today_truth(truth: &Value) -> BTreeMap<String, Vec<String>> {
    TODAY
        .iter()
        .map(|(panel, metric, keep)| {
            (
                (*panel).to_owned(),
                rows_of(&truth["rollups"][*metric], keep),
            )
        })
        .collect()
}

/// The snapshot's "today" panels, shaped like [`today_truth`].
fn today_panels(snap: &Value) -> BTreeMap<String, Vec<String>> {
    TODAY
        .iter()
        .map(|(panel, _, keep)| {
            (
                (*panel).to_owned(),
                rows_of(&snap["panels"][*panel]["rows"], keep),
            )
        })
        .collect()
}

fn first_difference(
    want: &BTreeMap<String, Vec<String>>,
    got: &BTreeMap<String, Vec<String>>,
) -> String {
    for (k, w) in want {
        let g = got.get(k).cloned().unwrap_or_default();
        if *w != g {
            let missing: Vec<&String> = w.iter().filter(|r| !g.contains(r)).take(2).collect();
            let extra: Vec<&String> = g.iter().filter(|r| !w.contains(r)).take(2).collect();
            return format!(
                "{k}: want {} rows, got {}; missing {missing:?}; unexpected {extra:?}",
                w.len(),
                g.len()
            );
        }
    }
    String::new()
}

/// The data of the "today" charts as Chart.js holds it, and the KPI.
const DRAWN: &str = r"(() => {
  const get = id => {
    const c = window.Chart && Chart.getChart(document.getElementById(id));
    return c ? { labels: c.data.labels, sets: c.data.datasets.map(d => ({ label: d.label, data: d.data })) } : null;
  };
  return JSON.stringify({
    gifts: get('c-gifts_by_type'), members: get('c-members_by_grade'),
    viewers: get('c-viewers_by_province_grade'), top: get('c-top_gifters'),
    kpi: document.getElementById('kpi-gifts-today').textContent
  });
})()";

/// Compares what the page draws with the truth rows of `want`.
fn check_drawn(drawn: &Value, want: &BTreeMap<String, Vec<String>>) {
    let rows = |panel: &str| -> Vec<Value> {
        want[panel]
            .iter()
            .map(|r| serde_json::from_str(r).unwrap())
            .collect()
    };
    let bars = |chart: &Value| -> Vec<(String, i64)> {
        let labels = chart["labels"].as_array().unwrap();
        let data = chart["sets"][0]["data"].as_array().unwrap();
        labels
            .iter()
            .zip(data)
            .map(|(l, d)| (l.as_str().unwrap().to_owned(), d.as_i64().unwrap()))
            .collect()
    };
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut gifts: Vec<(String, i64)> = rows("gifts_by_type")
        .iter()
        .map(|r| {
            (
                format!("type {}", text(&r["gift_type"])),
                r["amount"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut drawn_gifts = bars(&drawn["gifts"]);
    gifts.sort();
    drawn_gifts.sort();
    assert_eq!(drawn_gifts, gifts, "gift totals by type drawn");
    let total: i64 = gifts.iter().map(|(_, a)| a).sum();
    let kpi: i64 = drawn["kpi"]
        .as_str()
        .unwrap()
        .chars()
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap();
    assert_eq!(kpi, total, "gifts today KPI");
    let mut members: Vec<(String, i64)> = rows("members_by_grade")
        .iter()
        .map(|r| {
            (
                format!("grade {}", r["grade"]),
                r["members"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut drawn_members = bars(&drawn["members"]);
    members.sort();
    drawn_members.sort();
    assert_eq!(drawn_members, members, "members per grade drawn");
    let top: Vec<(String, i64)> = rows("top_gifters")
        .iter()
        .map(|r| (text(&r["user_id"]), r["amount"].as_i64().unwrap()))
        .collect();
    let mut top_sorted = top.clone();
    top_sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    assert_eq!(
        bars(&drawn["top"]),
        top_sorted,
        "top 10 gifters drawn, in rank order"
    );
    // Viewers: the page shows the 16 busiest provinces, one bar per grade.
    let cells: BTreeMap<(String, String), i64> = rows("viewers_by_province_grade")
        .iter()
        .map(|r| {
            (
                (text(&r["province"]), format!("grade {}", r["grade"])),
                r["viewers"].as_i64().unwrap(),
            )
        })
        .collect();
    let provinces = drawn["viewers"]["labels"].as_array().unwrap();
    assert!(!provinces.is_empty());
    for set in drawn["viewers"]["sets"].as_array().unwrap() {
        let grade = set["label"].as_str().unwrap().to_owned();
        for (p, v) in provinces.iter().zip(set["data"].as_array().unwrap()) {
            let want = cells
                .get(&(p.as_str().unwrap().to_owned(), grade.clone()))
                .copied()
                .unwrap_or(0);
            assert_eq!(v.as_i64().unwrap(), want, "viewers {p} {grade}");
        }
    }
}
