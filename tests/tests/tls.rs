//! End-to-end: every Kafka client of vidpulse talks TLS to a broker that only
//! accepts TLS (a private nisshi started with `--cert/--key`), given
//! librdkafka properties from a file — the way a Kubernetes Secret is mounted.
//! The certificates are made here with the openssl CLI: a throwaway CA and a
//! server certificate for 127.0.0.1.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
    _server: KillOnDrop,
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
        wait_listening("the TLS broker to listen", port, Duration::from_secs(30));
        TlsBroker {
            _server: KillOnDrop(child),
            addr: format!("127.0.0.1:{port}"),
        }
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
        c.args(["topics", "describe", topic, "--data"]);
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

/// A Redis that only accepts TLS (Debian's redis-server is built with TLS),
/// on a spare port; killed when dropped.
struct TlsRedis {
    _server: KillOnDrop,
    port: u16,
}

impl TlsRedis {
    fn start(dir: &Path) -> TlsRedis {
        let port = free_port();
        let log = std::fs::File::create(dir.join("redis.log")).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args([
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no", "--dir", "."])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("redis-server (scripts/stack up installs it)");
        wait_listening("the TLS Redis to listen", port, Duration::from_secs(30));
        TlsRedis {
            _server: KillOnDrop(child),
            port,
        }
    }
}

#[test]
fn redis_clients_talk_tls_with_a_rediss_url() {
    let env = Env::new("rtls");
    let dir = scratch(&env.prefix);
    make_certs(&dir);
    let redis = TlsRedis::start(&dir);
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let rows = dir.join("viewers.csv");
    std::fs::write(&rows, "user_id,province,grade\n7,浙江,3\n8,四川,5\n").unwrap();
    let dims = |args: &[&str], ca: bool| {
        let mut c = env.cmd("vidpulse");
        c.env("VIDPULSE_REDIS_URL", &url).arg("dims").args(args);
        if ca {
            // OpenSSL's default trust store, pointed at the private CA.
            c.env("SSL_CERT_FILE", dir.join("ca.pem"));
        } else {
            c.env("SSL_CERT_FILE", dir.join("server.csr"));
        }
        c.output().unwrap()
    };
    let out = dims(
        &["load", "--kind", "viewer", "--file", rows.to_str().unwrap()],
        true,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = dims(&["show", "viewer", "7", "8"], true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(shown.contains("浙江") && shown.contains("四川"), "{shown}");

    // A server certificate the client cannot verify: a clear failure.
    let out = dims(&["show", "viewer", "7"], false);
    assert!(!out.status.success(), "an untrusted server was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "{err}");
}

/// A private ClickHouse serving HTTPS (and plain HTTP/native on spare ports
/// nobody uses) with the test certificate; killed when dropped.
struct TlsClickHouse {
    _server: KillOnDrop,
    https_port: u16,
}

impl TlsClickHouse {
    fn start(dir: &Path) -> TlsClickHouse {
        let (http, tcp, https) = (free_port(), free_port(), free_port());
        let d = dir.display();
        for sub in ["data", "tmp", "user_files", "format_schemas", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(
            dir.join("config.xml"),
            format!(
                r#"<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>{d}/log/server.log</log><errorlog>{d}/log/server.err.log</errorlog></logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <https_port>{https}</https_port>
    <openSSL>
        <server>
            <certificateFile>{d}/server.pem</certificateFile>
            <privateKeyFile>{d}/server.key</privateKeyFile>
            <verificationMode>none</verificationMode>
            <loadDefaultCAFile>false</loadDefaultCAFile>
            <cacheSessions>true</cacheSessions>
            <disableProtocols>sslv2,sslv3</disableProtocols>
            <preferServerCiphers>true</preferServerCiphers>
        </server>
    </openSSL>
    <max_connections>64</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <mark_cache_size>67108864</mark_cache_size>
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <format_schema_path>{d}/format_schemas/</format_schema_path>
    <users_config>{d}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
</yandex>
"#
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("users.xml"),
            r#"<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
    <users><default><password></password><networks><ip>::/0</ip></networks><profile>default</profile><quota>default</quota></default></users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
"#,
        )
        .unwrap();
        let server = ["/usr/bin/clickhouse-server", "/usr/sbin/clickhouse-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("clickhouse-server (scripts/stack up installs it)");
        let log = std::fs::File::create(dir.join("clickhouse.out")).unwrap();
        let child = Command::new(server)
            .arg(format!("--config-file={d}/config.xml"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_listening("ClickHouse to serve HTTPS", https, Duration::from_secs(60));
        TlsClickHouse {
            _server: KillOnDrop(child),
            https_port: https,
        }
    }
}

#[test]
fn clickhouse_clients_talk_https() {
    let env = Env::new("chtls");
    env.create_topics();
    let dir = scratch(&env.prefix);
    make_certs(&dir);
    let ch = TlsClickHouse::start(&dir);
    let url = format!("https://127.0.0.1:{}", ch.https_port);
    let ca = dir.join("ca.pem");

    // The aggregator creates its tables over HTTPS and reports ready.
    let port = free_port();
    let log = std::fs::File::create(dir.join("aggregator.log")).unwrap();
    let mut agg = env
        .cmd("vidpulse-aggregator")
        .env("VIDPULSE_CLICKHOUSE_URL", &url)
        .env("SSL_CERT_FILE", &ca)
        .args(["--admin-addr", &format!("127.0.0.1:{port}")])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for(
        "the aggregator ready over HTTPS",
        Duration::from_secs(90),
        || (http_get(port, "/readyz").map(|(s, _)| s) == Some(200)).then_some(()),
    );
    let _ = agg.kill();
    let _ = agg.wait();

    // `vidpulse query` reads over HTTPS (the tables exist, no rows yet).
    let query = |trusted: bool| {
        let mut c = env.cmd("vidpulse");
        c.env("VIDPULSE_CLICKHOUSE_URL", &url)
            .env(
                "SSL_CERT_FILE",
                if trusted {
                    ca.clone()
                } else {
                    dir.join("server.csr")
                },
            )
            .args(["query", "video_plays_1m", "--format", "json"]);
        c.output().unwrap()
    };
    let out = query(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");

    // A server certificate the client cannot verify: a clear failure.
    let out = query(false);
    assert!(!out.status.success(), "an untrusted server was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "{err}");
}
