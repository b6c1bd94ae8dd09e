//! End-to-end: every Kafka client of vidpulse talks TLS to a broker that only
//! accepts TLS (a private nisshi started with `--cert/--key`), given
//! librdkafka properties from a file — the way a Kubernetes Secret is mounted.
//! The certificates are made here with the openssl CLI: a throwaway CA and a
//! server certificate for 127.0.0.1.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vidpulse_e2e::*;

/// Runs openssl with `args` in `dir`; panics with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl CLI (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`) and a server certificate/key for 127.0.0.1 signed by it
/// (`server.pem`, `server.key`, PKCS#8).
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=vidpulse test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

fn nisshi() -> PathBuf {
    if let Ok(p) = std::env::var("VIDPULSE_NISSHI_BIN") {
        return p.into();
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    home.join("bin/nisshi")
}

/// A TLS-only broker on a spare port; killed when dropped.
struct TlsBroker {
    child: Child,
    addr: String,
}

impl TlsBroker {
    fn start(dir: &Path) -> TlsBroker {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("broker.log")).unwrap();
        let child = Command::new(nisshi())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://nisshi/",
                "--cert",
                "server.pem",
                "--key",
                "server.key",
            ])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nisshi (scripts/stack up installs it)");
        wait_for("the TLS broker to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        });
        TlsBroker {
            child,
            addr: format!("127.0.0.1:{port}"),
        }
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vidpulse`/stage command against the TLS broker with `props` as
/// `--kafka-options-file` (through its env twin).
fn tls_cmd(env: &Env, broker: &TlsBroker, props: &Path, name: &str) -> Command {
    let mut c = env.cmd(name);
    c.env("VIDPULSE_KAFKA_BROKERS", &broker.addr)
        .env("VIDPULSE_KAFKA_OPTIONS_FILE", props);
    c
}

fn ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn records(describe: &str) -> i64 {
    describe
        .lines()
        .next()
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1)
}

#[test]
fn every_client_talks_tls_to_a_tls_only_broker() {
    let env = Env::new("tls");
    let dir = scratch(&env.prefix);
    make_certs(&dir);
    let broker = TlsBroker::start(&dir);
    let props = dir.join("kafka-tls.properties");
    std::fs::write(
        &props,
        format!(
            "# as mounted from a Secret\nsecurity.protocol=ssl\nssl.ca.location={}\n",
            dir.join("ca.pem").display()
        ),
    )
    .unwrap();

    // Admin client (topics create), producer (gen), consumer + producer
    // (ingest), reader (topics describe, tail): all over TLS.
    let mut c = tls_cmd(&env, &broker, &props, "vidpulse");
    c.args([
        "topics",
        "create",
        "--partitions",
        "2",
        "--raw-partitions",
        "2",
    ]);
    ok(c);
    let truth = dir.join("truth.json");
    let mut c = tls_cmd(&env, &broker, &props, "vidpulse-gen");
    c.args([
        "--count",
        "600",
        "--seed",
        "11",
        "--bad-fraction",
        "0.05",
        "--truth",
        truth.to_str().unwrap(),
    ]);
    ok(c);
    let want = read_json(&truth);
    let (want_events, want_dlq) = (
        want["expected"]["events"].as_i64().unwrap(),
        want["expected"]["dlq"].as_i64().unwrap(),
    );
    let log = std::fs::File::create(dir.join("ingest.log")).unwrap();
    let port = free_port();
    let mut ingest = tls_cmd(&env, &broker, &props, "vidpulse-ingest")
        .args(["--admin-addr", &format!("127.0.0.1:{port}")])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let count = |topic: &str| {
        let mut c = tls_cmd(&env, &broker, &props, "vidpulse");
        c.args(["topics", "describe", topic]);
        records(&ok(c))
    };
    wait_for(
        "every record normalized over TLS",
        Duration::from_secs(120),
        || (count("vp.events.v1") == want_events && count("vp.dlq.v1") == want_dlq).then_some(()),
    );
    let mut c = tls_cmd(&env, &broker, &props, "vidpulse");
    c.args(["tail", "vp.events.v1", "--from-beginning", "--max", "1"]);
    let first: serde_json::Value = serde_json::from_str(ok(c).lines().next().unwrap()).unwrap();
    assert!(first["value"]["event_id"].is_string(), "{first}");
    let _ = ingest.kill();
    let _ = ingest.wait();

    // The same clients without TLS, or without the CA, fail at start and say
    // they could not reach the brokers instead of hanging.
    let plain = dir.join("plain.properties");
    std::fs::write(&plain, "# no TLS\n").unwrap();
    let untrusted = dir.join("untrusted.properties");
    std::fs::write(&untrusted, "security.protocol=ssl\n").unwrap();
    for p in [&plain, &untrusted] {
        let mut c = tls_cmd(&env, &broker, p, "vidpulse");
        c.args(["topics", "describe", "vp.events.v1"]);
        let out = c.output().unwrap();
        assert!(
            !out.status.success(),
            "{p:?}: describe succeeded without TLS trust"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.lines()
                .any(|l| l.starts_with("vidpulse: ") && l.contains("Broker transport failure"))
                && err.contains("hint: no broker at")
                && err.contains("security.protocol"),
            "{p:?}: {err}"
        );
    }
}
