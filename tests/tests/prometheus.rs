//! A real Prometheus (Debian's, installed by scripts/test) scrapes a running
//! pipeline — ingest from Kafka and from a Redis stream, dim-builder,
//! monitor, aggregator, api — fed live by vidpulse-gen, with the alert rules
//! of deploy/prometheus/vidpulse-rules.yml loaded. Every expression of every
//! Grafana panel (deploy/grafana/vidpulse-dashboard.json, Grafana's variables
//! substituted) must return data, every rule must evaluate without error on
//! the real series, and every metric the rules use must be scraped.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use vidpulse_e2e::*;

/// Debian's Prometheus (package `prometheus`).
fn prometheus_bin() -> PathBuf {
    let p = PathBuf::from(
        std::env::var("VIDPULSE_PROMETHEUS_BIN").unwrap_or_else(|_| "/usr/bin/prometheus".into()),
    );
    assert!(
        p.exists(),
        "{} missing: scripts/test installs Debian's prometheus (apt-get install prometheus)",
        p.display()
    );
    p
}

fn redis_url() -> String {
    std::env::var("VIDPULSE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn redis() -> redis::Connection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_connection()
        .unwrap()
}

/// Deletes the test's Redis keys when dropped.
struct DropKeys(String);

impl Drop for DropKeys {
    fn drop(&mut self) {
        let Ok(c) = redis::Client::open(redis_url()) else {
            return;
        };
        let Ok(mut con) = c.get_connection() else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.0))
            .query(&mut con)
            .unwrap_or_default();
        for k in keys {
            let _: Result<(), _> = redis::cmd("DEL").arg(k).query(&mut con);
        }
    }
}

/// A stage with its admin (or API) port, ready.
fn stage(env: &Env, job: &str, name: &str, args: &[&str], port: u16) -> Proc {
    let mut p = env.spawn(name, args, &format!("{job}.log"));
    wait_for(&format!("{job} ready"), Duration::from_secs(90), || {
        assert!(
            p.is_running(),
            "{job} exited; see its log in {}",
            scratch(&env.prefix).display()
        );
        http_get(port, "/readyz").filter(|(s, _)| *s == 200)
    });
    p
}

/// Prometheus' HTTP API: the `data` of a GET.
fn prom_api(port: u16, path: &str) -> Option<Value> {
    let (status, body) = http_json(port, path)?;
    (status == 200 && body["status"] == "success").then(|| body["data"].clone())
}

/// An instant query; its result vector (or scalar as one sample).
fn instant(port: u16, expr: &str) -> Option<Vec<Value>> {
    let data = prom_api(port, &format!("/api/v1/query?query={}", url_encode(expr)))?;
    match data["resultType"].as_str()? {
        "vector" => data["result"].as_array().cloned(),
        "scalar" => Some(vec![serde_json::json!({"value": data["result"]})]),
        _ => None,
    }
}

/// Whether some sample of the result is a number (NaN, e.g. 0/0 when
/// nothing happened in the window, is no data on a chart).
fn has_finite(samples: &[Value]) -> bool {
    samples.iter().any(|s| {
        s["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

/// Grafana's variables as a dashboard shows everything: `$namespace` is
/// "All" (`.*`, which matches series without the label too) and
/// `$__rate_interval` four scrape intervals and more.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("${namespace}", ".*")
        .replace("$namespace", ".*")
}

/// (panel title, expression) of every target of the dashboard.
fn panel_exprs() -> Vec<(String, String)> {
    let dash = read_json(&repo_root().join("deploy/grafana/vidpulse-dashboard.json"));
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((p["title"].as_str().unwrap_or("").to_owned(), e.to_owned()));
            }
        }
    }
    out
}

#[test]
fn prometheus_scrapes_the_pipeline_and_every_panel_and_rule_has_data() {
    let started = Instant::now();
    let prometheus = prometheus_bin();
    let env = Env::new("prom");
    let _keys = DropKeys(env.prefix.clone());
    env.create_topics();
    // A site-wide pool and a small one (so the monitor filters some events).
    env.ctl(&["pool", "create", "all"]);
    env.ctl(&["pool", "create", "vids", "--match", "video_id"]);
    let vids: Vec<String> = (0..40).map(|i| (100_000 + i).to_string()).collect();
    let mut add = vec!["pool", "add", "vids"];
    add.extend(vids.iter().map(String::as_str));
    env.ctl(&add);

    // A Redis stream with a backlog, part of it read by a consumer that then
    // died (its entries are claimed by ingest after --redis-claim-idle).
    let stream = format!("{}user_actions", env.prefix);
    let mut con = redis();
    let xadd = |con: &mut redis::Connection, i: usize| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("type")
            .arg(["like", "comment", "share", "order"][i % 4])
            .arg("timestamp")
            .arg(format!("{now:.3}"))
            .arg("user_id")
            .arg(format!("u-{}", i % 50))
            .arg("target_id")
            .arg(format!("v-{}", i % 17))
            .query(con)
            .unwrap();
    };
    for i in 0..200 {
        xadd(&mut con, i);
    }
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("vidpulse-ingest")
        .arg("0")
        .query(&mut con)
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("vidpulse-ingest")
        .arg("ghost")
        .arg("COUNT")
        .arg(50)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query(&mut con)
        .unwrap();

    // The stages, each on its own port; job names as the ServiceMonitor
    // names them (the Services' names), which the rules rely on.
    let ports: BTreeMap<&str, u16> = [
        "ingest",
        "ingest-redis",
        "dim-builder",
        "monitor",
        "aggregator",
        "api",
    ]
    .into_iter()
    .map(|j| (j, free_port()))
    .collect();
    let admin = |job: &str| format!("127.0.0.1:{}", ports[job]);
    let room_prefix = format!("{}room:", env.prefix);
    let viewer_prefix = format!("{}viewer:", env.prefix);
    let room_key = format!("{}room:{{id}}", env.prefix);
    let anchor_key = format!("{}anchor:{{id}}", env.prefix);
    let viewer_key = format!("{}viewer:{{id}}", env.prefix);
    let _ingest = stage(
        &env,
        "ingest",
        "vidpulse-ingest",
        &["--admin-addr", &admin("ingest")],
        ports["ingest"],
    );
    let _ingest_redis = stage(
        &env,
        "ingest-redis",
        "vidpulse-ingest",
        &[
            "--admin-addr",
            &admin("ingest-redis"),
            "--redis-stream",
            &format!("{stream}=user_actions"),
            "--redis-url",
            &redis_url(),
            "--redis-consumer",
            "live",
            "--redis-claim-idle",
            "1s",
        ],
        ports["ingest-redis"],
    );
    let _dims = stage(
        &env,
        "dim-builder",
        "vidpulse-dim-builder",
        &[
            "--admin-addr",
            &admin("dim-builder"),
            "--key-prefix",
            &room_prefix,
            "--viewer-key-prefix",
            &viewer_prefix,
        ],
        ports["dim-builder"],
    );
    let _monitor = stage(
        &env,
        "monitor",
        "vidpulse-monitor",
        &[
            "--pool",
            "all",
            "--pool",
            "vids",
            "--admin-addr",
            &admin("monitor"),
            "--room-key",
            &room_key,
            "--anchor-key",
            &anchor_key,
            "--viewer-key",
            &viewer_key,
        ],
        ports["monitor"],
    );
    // A short grace: gen's late records (30 s late) arrive after it.
    let _aggregator = stage(
        &env,
        "aggregator",
        "vidpulse-aggregator",
        &[
            "--admin-addr",
            &admin("aggregator"),
            "--grace",
            "5s",
            "--early-emit",
            "1s",
            "--flush-interval",
            "1s",
        ],
        ports["aggregator"],
    );
    let _api = stage(
        &env,
        "api",
        "vidpulse-api",
        &["--listen", &admin("api"), "--live-interval", "1s"],
        ports["api"],
    );

    // Prometheus: every stage every second, the rules evaluated every second.
    let dir = scratch(&env.prefix);
    let rules = repo_root().join("deploy/prometheus/vidpulse-rules.yml");
    let mut config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
        rules.display()
    );
    for (job, port) in &ports {
        config.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ));
    }
    std::fs::write(dir.join("prometheus.yml"), &config).unwrap();
    let prom_port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let _prom = KillOnDrop(
        Command::new(&prometheus)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for("Prometheus ready", Duration::from_secs(60), || {
        http_get(prom_port, "/-/ready").filter(|(s, _)| *s == 200)
    });

    // Live traffic: gen's seeds in wall-clock time, with the usual mess,
    // and Redis stream entries alongside.
    let truth = dir.join("truth.json");
    let _gen = env.spawn(
        "vidpulse-gen",
        &[
            "--start",
            "now",
            "--rate",
            "100",
            "--duration",
            "90s",
            "--span",
            "90s",
            "--seed",
            "5",
            "--bad-fraction",
            "0.03",
            "--late-fraction",
            "0.05",
            "--dup-fraction",
            "0.02",
            "--truth",
            truth.to_str().unwrap(),
        ],
        "gen.log",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let stream = stream.clone();
        std::thread::spawn(move || {
            let mut con = redis();
            let mut i = 200;
            while !stop.load(Ordering::Relaxed) && i < 20_000 {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64();
                let _: Result<String, _> = redis::cmd("XADD")
                    .arg(&stream)
                    .arg("*")
                    .arg("type")
                    .arg("like")
                    .arg("timestamp")
                    .arg(format!("{now:.3}"))
                    .query(&mut con);
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    wait_for("every target up", Duration::from_secs(60), || {
        let t = prom_api(prom_port, "/api/v1/targets")?;
        let active = t["activeTargets"].as_array()?;
        (active.len() == ports.len() && active.iter().all(|a| a["health"] == "up")).then_some(())
    });
    println!("pipeline and Prometheus up after {:?}", started.elapsed());

    // Every panel expression returns data.
    let exprs = panel_exprs();
    assert!(exprs.len() > 20, "{} expressions", exprs.len());
    let polled = Instant::now();
    let mut missing: Vec<String> = Vec::new();
    while polled.elapsed() < Duration::from_secs(150) {
        // The API's readiness gauge follows its probes.
        let _ = http_get(ports["api"], "/readyz");
        missing = exprs
            .iter()
            .filter(|(_, e)| !instant(prom_port, &substitute(e)).is_some_and(|r| has_finite(&r)))
            .map(|(title, e)| format!("{title}: {e}"))
            .collect();
        if missing.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        missing.is_empty(),
        "panel expressions without data after {:?}:\n  {}",
        polled.elapsed(),
        missing.join("\n  ")
    );
    println!(
        "all {} panel expressions returned data {:?} after the targets were up",
        exprs.len(),
        polled.elapsed()
    );

    // Every stage says it is ready, as the not-ready alert reads it.
    let ready = instant(prom_port, "vidpulse_stage_ready").unwrap();
    let ready_jobs: BTreeSet<String> = ready
        .iter()
        .filter(|s| s["value"][1] == "1")
        .filter_map(|s| s["metric"]["job"].as_str().map(str::to_owned))
        .collect();
    let jobs: BTreeSet<String> = ports.keys().map(|j| (*j).to_owned()).collect();
    assert_eq!(ready_jobs, jobs, "vidpulse_stage_ready = 1 for every stage");

    // The rules load and evaluate on the real series.
    let names: BTreeSet<String> = prom_api(prom_port, "/api/v1/label/__name__/values")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let rule_data = wait_for("rules evaluated", Duration::from_secs(30), || {
        let d = prom_api(prom_port, "/api/v1/rules")?;
        let rules: Vec<Value> = d["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        (!rules.is_empty()
            && rules.iter().all(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            }))
        .then_some(rules)
    });
    let mut used = BTreeSet::new();
    for r in &rule_data {
        let name = r["name"].as_str().unwrap();
        assert_eq!(
            r["health"], "ok",
            "rule {name} does not evaluate: {}",
            r["lastError"]
        );
        let q = r["query"].as_str().unwrap();
        for w in q
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("vidpulse_"))
        {
            used.insert(w.to_owned());
        }
    }
    assert!(rule_data.len() >= 7, "{} rules loaded", rule_data.len());
    for m in &used {
        assert!(
            names.contains(m),
            "the rules use {m}, which no stage exports"
        );
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    println!("whole test {:?}", started.elapsed());
}
