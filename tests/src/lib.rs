//! Harness for end-to-end tests: runs the release binaries (built once by
//! `scripts/test`) against the local stack started by `scripts/stack up`,
//! each test under its own topic prefix so tests never collide.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)] // test harness: a failed step should panic with context

pub mod cluster;
pub mod dims;
pub mod forwarder;
pub use forwarder::{Forwarder, wait_events, with_even_pool};

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::Value;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Path of a release binary of this workspace.
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    let p = target.join("release").join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build --release --workspace --bins` (scripts/test does)",
        p.display()
    );
    p
}

pub fn brokers() -> String {
    std::env::var("VIDPULSE_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The local stack's Redis (`VIDPULSE_REDIS_URL`).
pub fn redis_url() -> String {
    std::env::var("VIDPULSE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A connection to the local stack's Redis.
pub fn redis_conn() -> redis::Connection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_connection()
        .unwrap()
}

/// The Prometheus metrics of a stage's admin port (empty when it does not
/// answer).
pub fn metrics(port: u16) -> BTreeMap<String, f64> {
    try_metrics(port).unwrap_or_default()
}

/// The Prometheus metrics of a stage's admin port, `None` when it does not
/// answer.
fn try_metrics(port: u16) -> Option<BTreeMap<String, f64>> {
    http_get(port, "/metrics").map(|(_, b)| prom(&b))
}

/// The status of a stage's `/readyz`.
pub fn readyz(port: u16) -> Option<u16> {
    http_get(port, "/readyz").map(|(s, _)| s)
}

/// A scratch directory under `.work/tests`.
pub fn scratch(prefix: &str) -> PathBuf {
    let d = repo_root()
        .join(".work/tests")
        .join(prefix.trim_end_matches('.'));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One test's isolated pipeline: every topic and group is prefixed.
#[derive(Clone)]
pub struct Env {
    pub prefix: String,
    /// Extra environment of every command (e.g. another Redis).
    pub vars: Vec<(String, String)>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Metrics of the default spec that read vp.monitored.v1.
pub const FROM_MONITORED: [&str; 3] = [
    "gifts_by_module_1m",
    "pool_production_1m",
    "pool_consumption_1m",
];

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One test at a time within a test binary (for tests that stop shared
/// services or share a consumer group).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

impl Env {
    pub fn new(name: &str) -> Env {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000;
        let prefix = format!(
            "t{}{}{}.{name}.",
            std::process::id(),
            nanos,
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        Env {
            prefix,
            vars: Vec::new(),
        }
    }

    /// The same env with `key=value` in every command's environment.
    pub fn with_var(mut self, key: &str, value: &str) -> Env {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A command for binary `name` with this env's prefix and brokers.
    pub fn cmd(&self, name: &str) -> Command {
        let mut c = Command::new(bin(name));
        c.env("VIDPULSE_TOPIC_PREFIX", &self.prefix)
            .env("VIDPULSE_KAFKA_BROKERS", brokers())
            .env(
                "VIDPULSE_LOG",
                // VIDPULSE_TEST_LOG: another level for the stages a test runs.
                std::env::var("VIDPULSE_TEST_LOG")
                    .unwrap_or_else(|_| "info,librdkafka=warn".into()),
            )
            .stdin(Stdio::null());
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    /// Runs `vidpulse <args>` and returns stdout; panics on failure.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.run("vidpulse", args);
        assert!(
            out.status.success(),
            "vidpulse {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn run(&self, name: &str, args: &[&str]) -> Output {
        self.cmd(name).args(args).output().unwrap()
    }

    /// Creates every pipeline and raw topic under this prefix.
    pub fn create_topics(&self) {
        self.ctl(&["topics", "create"]);
    }

    /// Every record of `topic` (unprefixed name), as printed by `vidpulse tail`.
    pub fn tail_all(&self, topic: &str) -> Vec<Value> {
        let out = self.ctl(&["tail", topic, "--from-beginning"]);
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Data records in `topic` (control records — in-band watermarks — not
    /// counted).
    pub fn count(&self, topic: &str) -> i64 {
        let out = self.ctl(&["topics", "describe", topic, "--data"]);
        let line = out.lines().next().unwrap_or("");
        // "<name>: N partitions, M records  ..."
        line.split(", ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(-1)
    }

    /// Waits until consumer group `group` (name without the prefix) has
    /// committed, on every partition of `topic`, the end offset the topic
    /// has now: it has read everything written so far. (Consumer lag cannot
    /// tell: ingest keeps writing watermark records while it runs.)
    pub fn wait_caught_up(&self, group: &str, topic: &str, timeout: Duration) {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let full = self.topic(topic);
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", self.topic(group))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let md = c
            .fetch_metadata(Some(&full), Duration::from_secs(10))
            .unwrap();
        let ends: Vec<(i32, i64)> = md.topics()[0]
            .partitions()
            .iter()
            .map(|p| {
                let (_, hi) = c
                    .fetch_watermarks(&full, p.id(), Duration::from_secs(10))
                    .unwrap();
                (p.id(), hi)
            })
            .collect();
        wait_for(
            &format!("{group} to read {topic} to its end"),
            timeout,
            || {
                let mut tpl = rdkafka::TopicPartitionList::new();
                for (p, _) in &ends {
                    tpl.add_partition(&full, *p);
                }
                let committed = c.committed_offsets(tpl, Duration::from_secs(10)).ok()?;
                ends.iter()
                    .all(|(p, end)| {
                        committed
                            .find_partition(&full, *p)
                            .and_then(|e| e.offset().to_raw())
                            .is_some_and(|o| o >= *end)
                    })
                    .then_some(())
            },
        );
    }

    /// Spawns a long-running binary.
    pub fn spawn(&self, name: &str, args: &[&str], log: &str) -> Proc {
        let mut c = self.cmd(name);
        c.args(args);
        self.spawn_command(c, name, log)
    }

    /// Spawns a prepared command (e.g. [`Env::cmd`] with more environment),
    /// its output to `log` in the scratch directory.
    pub fn spawn_command(&self, mut c: Command, name: &str, log: &str) -> Proc {
        let logf = std::fs::File::create(scratch(&self.prefix).join(log)).unwrap();
        let child = c
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap();
        Proc {
            child: Some(child),
            name: name.to_owned(),
            admin: None,
            log: scratch(&self.prefix).join(log),
        }
    }

    /// Spawns a stage with its admin server on a free loopback port (see
    /// [`Proc::metrics`], [`Proc::ready`]).
    pub fn spawn_stage(&self, name: &str, args: &[&str], log: &str) -> Proc {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut all = vec!["--admin-addr", addr.as_str()];
        all.extend_from_slice(args);
        let mut p = self.spawn(name, &all, log);
        p.admin = Some(port);
        p
    }

    /// A producer for crafting raw records.
    pub fn producer(&self) -> ThreadedProducer<DefaultProducerContext> {
        ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("message.max.bytes", "16777216")
            .set("partitioner", "murmur2_random")
            .create()
            .unwrap()
    }

    /// Produces `(key, payload)` records to raw topic `topic` and waits.
    pub fn produce(&self, topic: &str, records: &[(Option<&str>, Option<Vec<u8>>)]) {
        let p = self.producer();
        let full = self.topic(topic);
        for (k, v) in records {
            let mut r: BaseRecord<'_, str, [u8]> = BaseRecord::to(&full);
            if let Some(k) = k {
                r = r.key(*k);
            }
            if let Some(v) = v {
                r = r.payload(v.as_slice());
            }
            p.send(r).map_err(|(e, _)| e).unwrap();
        }
        p.flush(Duration::from_secs(30)).unwrap();
    }
}

/// Another program's process (a private server, a browser), killed when
/// dropped, also when the test fails.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until something accepts connections on loopback `port`.
pub fn wait_listening(what: &str, port: u16, timeout: Duration) {
    wait_for(what, timeout, || {
        TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    });
}

/// A spawned binary, killed when dropped.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
    /// The admin port of a stage started with [`Env::spawn_stage`].
    pub admin: Option<u16>,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    pub fn admin_port(&self) -> u16 {
        self.admin
            .unwrap_or_else(|| panic!("{} was not started with an admin port", self.name))
    }

    /// The stage's Prometheus metrics. Panics with the log's tail when the
    /// process has exited by itself (a wait on its metrics would otherwise
    /// time out without saying why).
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        try_metrics(self.admin_port()).unwrap_or_else(|| {
            assert!(
                !self.exited(),
                "{} exited by itself; its log ends:\n{}",
                self.name,
                self.log_tail(30)
            );
            BTreeMap::new()
        })
    }

    /// Whether the child is gone or a zombie (exited, not reaped yet); a
    /// process this test killed or waited for is not asked about.
    fn exited(&self) -> bool {
        let Some(c) = &self.child else { return false };
        match std::fs::read_to_string(format!("/proc/{}/stat", c.id())) {
            // `pid (comm) state …`: the state follows the last `)`.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => true,
        }
    }

    /// Sum of metric `name` over the samples whose labels contain `labels`.
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        prom_sum(&self.metrics(), name, labels)
    }

    /// `/readyz`: status and body.
    pub fn ready(&self) -> Option<(u16, String)> {
        http_get(self.admin_port(), "/readyz")
    }

    /// Waits until `/readyz` answers 200 (panics with the log's tail after
    /// `timeout`).
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.ready().is_some_and(|(s, _)| s == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "{} not ready after {timeout:?}; log:\n{}",
            self.name,
            self.log_tail(40)
        );
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, no drain.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} {pid} ({}) failed", self.name);
    }

    /// Waits for the process to exit by itself; whether it exited 0.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let Some(c) = self.child.as_mut() else {
            return false;
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                self.child = None;
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// GET `path` on a loopback port; returns (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split(' ').nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Parses Prometheus text into `name{labels}` → value.
pub fn prom(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Sum of every sample of metric `name` whose labels contain all `labels`.
pub fn prom_sum(m: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    m.iter()
        .filter(|(k, _)| k.split('{').next() == Some(name) && labels.iter().all(|l| k.contains(l)))
        .map(|(_, v)| v)
        .sum()
}

/// Reads a JSON file.
pub fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Percent-encodes a query-string component (RFC 3986 unreserved kept).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One HTTP/1.1 GET on a loopback port: (status, headers lower-cased, body),
/// with chunked bodies decoded.
pub fn http_fetch(port: u16, path: &str) -> Option<(u16, BTreeMap<String, String>, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let headers: BTreeMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n")?;
            let size_text = String::from_utf8_lossy(&rest[..eol]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
        body = out;
    }
    Some((status, headers, String::from_utf8_lossy(&body).to_string()))
}

/// GETs a JSON document: (status, parsed body; `Value::Null` if not JSON).
pub fn http_json(port: u16, path: &str) -> Option<(u16, Value)> {
    let (status, _, body) = http_fetch(port, path)?;
    Some((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

/// Opens a server-sent-events stream and returns the data of the first
/// event named `event` (within `timeout`).
pub fn sse_first(port: u16, path: &str, event: &str, timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n"
    )
    .ok()?;
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    while Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
        // Chunked framing puts size lines between parts of an event: look
        // for the event line, then its data line, in the text as a whole.
        let text = String::from_utf8_lossy(&buf).to_string();
        let want = format!("event: {event}\n");
        if let Some(at) = text.find(&want) {
            let after = &text[at + want.len()..];
            if let Some(d) = after.find("data: ") {
                let line = &after[d + 6..];
                if let Some(end) = line.find('\n') {
                    return Some(line[..end].to_owned());
                }
            }
        }
    }
    None
}

/// Runs SQL over ClickHouse's HTTP port (`VIDPULSE_CLICKHOUSE_HTTP_PORT`,
/// default 8123); the body of a 200 answer, `None` otherwise.
pub fn clickhouse_sql(q: &str) -> Option<String> {
    let port: u16 = std::env::var("VIDPULSE_CLICKHOUSE_HTTP_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8123);
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "POST / HTTP/1.0\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{q}",
        q.len()
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_owned())
}

/// Drops a test's ClickHouse tables when it ends (also when it fails).
pub struct DropTables(pub String);

impl Drop for DropTables {
    fn drop(&mut self) {
        drop_clickhouse_tables(&self.0);
    }
}

/// Drops the ClickHouse tables and views (database `vidpulse`) of a topic
/// prefix. Best effort: a test cleaning up never fails on it.
pub fn drop_clickhouse_tables(prefix: &str) {
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
    let names = clickhouse_sql(&format!(
        "SELECT name FROM system.tables WHERE database = 'vidpulse' AND startsWith(name, '{stem}')"
    ))
    .unwrap_or_default();
    for n in names.lines().filter(|n| !n.is_empty()) {
        let _ = clickhouse_sql(&format!("DROP TABLE IF EXISTS vidpulse.`{n}`"));
    }
}

// ---- the pipeline on gen's records ---------------------------------------

/// Runs vidpulse-gen — `count` records of 10 minutes from
/// 2021-08-16T01:00:00Z with 2 % malformed, 4 % duplicate and 4 % late
/// records, plus `extra` flags — and returns its truth (and where it is).
pub fn gen_truth(env: &Env, count: u64, seed: u64, extra: &[&str]) -> (Value, PathBuf) {
    gen_truth_over(env, count, seed, "10m", extra)
}

/// As [`gen_truth`], event times spread over `span` (humantime).
pub fn gen_truth_over(
    env: &Env,
    count: u64,
    seed: u64,
    span: &str,
    extra: &[&str],
) -> (Value, PathBuf) {
    let truth = scratch(&env.prefix).join(format!("truth-{seed}.json"));
    let count = count.to_string();
    let seed = seed.to_string();
    let mut args = vec![
        "--count",
        &count,
        "--seed",
        &seed,
        "--start",
        "2021-08-16T01:00:00Z",
        "--span",
        span,
        "--bad-fraction",
        "0.02",
        "--dup-fraction",
        "0.04",
        "--late-fraction",
        "0.04",
        "--truth",
        truth.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = env.run("vidpulse-gen", &args);
    assert!(
        out.status.success(),
        "gen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (read_json(&truth), truth)
}

/// gen writing `count` records at `rate` per second in the background
/// (10 minutes of event time from 2021-08-16T01:00:00Z, 4 % duplicate and
/// 4 % late records).
pub struct LiveGen {
    proc: Proc,
    truth: PathBuf,
}

impl LiveGen {
    pub fn start(env: &Env, count: u64, rate: u64, seed: u64) -> LiveGen {
        let truth = scratch(&env.prefix).join(format!("truth-{seed}.json"));
        let proc = env.spawn(
            "vidpulse-gen",
            &[
                "--count",
                &count.to_string(),
                "--rate",
                &rate.to_string(),
                "--seed",
                &seed.to_string(),
                "--start",
                "2021-08-16T01:00:00Z",
                "--span",
                "10m",
                "--dup-fraction",
                "0.04",
                "--late-fraction",
                "0.04",
                "--truth",
                truth.to_str().unwrap(),
            ],
            "gen.log",
        );
        LiveGen { proc, truth }
    }

    /// Whether gen is still writing.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Waits for gen to finish; its truth.
    pub fn truth(mut self) -> Value {
        assert!(
            self.proc.wait_exit(Duration::from_secs(300)),
            "gen did not finish"
        );
        read_json(&self.truth)
    }
}

/// vidpulse-ingest with its defaults, logging to `ingest.log`.
pub fn spawn_ingest(env: &Env) -> Proc {
    env.spawn_stage("vidpulse-ingest", &[], "ingest.log")
}

/// An aggregator that makes every window visible quickly (early emission,
/// short flushes), logging to `log`, with `extra` flags.
pub fn spawn_aggregator(env: &Env, log: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["--early-emit", "200ms", "--flush-interval", "200ms"];
    args.extend_from_slice(extra);
    env.spawn_stage("vidpulse-aggregator", &args, log)
}

// ---- final values against gen's truth -----------------------------------

/// `vidpulse query NAME --format json`, as JSON rows (empty on failure).
pub fn query(env: &Env, name: &str) -> Vec<Value> {
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

/// Rows as sorted JSON texts, to compare sets of rows.
pub fn canon(rows: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    v.sort();
    v
}

/// What the truth says for every name `vidpulse query` knows, except `skip`.
pub fn expected(truth: &Value, skip: &[&str]) -> BTreeMap<String, Vec<Value>> {
    let mut out = BTreeMap::new();
    for section in ["metrics", "leaderboards"] {
        for (name, rows) in truth[section].as_object().unwrap() {
            if !skip.contains(&name.as_str()) {
                out.insert(name.clone(), rows.as_array().unwrap().clone());
            }
        }
    }
    out
}

/// Names whose query output differs from `want`, with a sample of the diff.
pub fn differences(env: &Env, want: &BTreeMap<String, Vec<Value>>) -> Vec<String> {
    let mut bad = Vec::new();
    for (name, rows) in want {
        let got = query(env, name);
        let (a, b) = (canon(rows), canon(&got));
        if a != b {
            let sa: BTreeSet<&String> = a.iter().collect();
            let sb: BTreeSet<&String> = b.iter().collect();
            let missing: Vec<_> = sa.difference(&sb).take(2).collect();
            let extra: Vec<_> = sb.difference(&sa).take(2).collect();
            bad.push(format!(
                "{name}: want {} rows, got {}; missing {missing:?}; unexpected {extra:?}",
                a.len(),
                b.len()
            ));
        }
    }
    bad
}

/// Waits until every name in `want` queries equal to it (panics with the
/// differences after 240 s).
pub fn wait_exact(env: &Env, want: &BTreeMap<String, Vec<Value>>, what: &str) {
    let started = Instant::now();
    let mut last = Vec::new();
    let deadline = started + Duration::from_secs(240);
    while Instant::now() < deadline {
        last = differences(env, want);
        if last.is_empty() {
            println!(
                "{what}: every value equals the truth after {:?} ({} names)",
                started.elapsed(),
                want.len()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!(
        "{what}: still different from the truth:\n{}",
        last.join("\n")
    );
}

/// A Redis of the test's own (scripts/stack with another directory and
/// port), to stop, restart or wipe without touching the shared one.
pub struct PrivateRedis {
    dir: PathBuf,
    pub port: u16,
    persist: bool,
}

impl PrivateRedis {
    /// Started with persistence (AOF), as scripts/stack configures Redis.
    pub fn start(env: &Env) -> PrivateRedis {
        PrivateRedis::start_with(env, true)
    }

    /// `persist: false`: a Redis that loses everything on restart.
    pub fn start_with(env: &Env, persist: bool) -> PrivateRedis {
        let r = PrivateRedis {
            dir: scratch(&env.prefix).join("stack"),
            port: free_port(),
            persist,
        };
        r.stack("start");
        assert!(
            r.is_ours(),
            "scripts/stack did not start a private Redis under {} (is VIDPULSE_STACK_DIR supported?)",
            r.dir.display()
        );
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// The pid file in our directory names our port.
    fn is_ours(&self) -> bool {
        std::fs::read_to_string(self.dir.join("redis/redis.pid"))
            .ok()
            .and_then(|t| t.lines().nth(1).map(|p| p.trim() == self.port.to_string()))
            .unwrap_or(false)
    }

    /// `scripts/stack <cmd> redis` on this Redis (`start`, `stop`).
    pub fn stack(&self, cmd: &str) {
        if cmd == "stop" {
            assert!(
                self.is_ours(),
                "refusing to stop a Redis that is not this test's"
            );
        }
        let st = Command::new(repo_root().join("scripts/stack"))
            .args([cmd, "redis"])
            .env("VIDPULSE_STACK_DIR", &self.dir)
            .env("VIDPULSE_REDIS_PORT", self.port.to_string())
            .env(
                "VIDPULSE_REDIS_PERSIST",
                if self.persist { "1" } else { "0" },
            )
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(
            st.success(),
            "scripts/stack {cmd} redis (port {}) failed",
            self.port
        );
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if self.is_ours() {
            self.stack("stop");
        }
    }
}
