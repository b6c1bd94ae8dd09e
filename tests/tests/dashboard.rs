//! Browser test of the dashboard: a small live pipeline (gen at a steady
//! rate with event times at the wall clock → ingest → monitor with two pools
//! → aggregator with early emission) feeds vidpulse-api; headless Chromium
//! (the Debian package) opens the page, which must fill every chart and
//! table from the server-sent events on /api/live and keep refreshing.
//! The page is then saved as a screenshot (scratch dir; also to
//! `$VIDPULSE_DASHBOARD_PNG` when set, which `scripts/dashboard-screenshot`
//! uses to refresh docs/dashboard.png).
//!
//! Chromium is driven over the DevTools protocol, so the test reads the
//! page's own state (the `data-rows` / `data-state` markers each panel sets
//! and each Chart.js chart's data) instead of guessing with timeouts.
#![allow(clippy::unwrap_used)]

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
    let _gen = env.spawn(
        "vidpulse-gen",
        &[
            "--start",
            "now",
            "--rate",
            "150",
            "--duration",
            &duration,
            "--span",
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
    let mut api = env.spawn(
        "vidpulse-api",
        &["--listen", &listen, "--live-interval", "1s"],
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
            && charts.len() == 6
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
    assert_eq!(page["charts"].as_array().unwrap().len(), 6, "{page}");
    for c in page["charts"].as_array().unwrap() {
        assert!(c[1].as_i64().unwrap_or(0) > 0, "chart without data: {c}");
    }

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
