//! End-to-end: credentials given to ingest — librdkafka properties from
//! `--kafka-option`, `VIDPULSE_KAFKA_OPTIONS` and `--kafka-options-file`, and
//! a Redis URL with a password — never appear in its logs (at debug level,
//! librdkafka's own debug output included) nor on its admin port.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use vidpulse_e2e::*;

const FLAG_SECRET: &str = "flag-S3cret-7f3a";
const ENV_SECRET: &str = "env-S3cret-91c2";
const FILE_SECRET: &str = "file-S3cret-d40e";
const REDIS_SECRET: &str = "redis-S3cret-5b18";

#[test]
fn secrets_never_reach_logs_or_the_admin_port() {
    let env = Env::new("secrets");
    env.create_topics();
    let dir = scratch(&env.prefix);
    let props = dir.join("client.properties");
    std::fs::write(
        &props,
        format!("# mounted from a Secret\nsasl.username=svc\nsasl.password={FILE_SECRET}\n"),
    )
    .unwrap();
    let redis_port = std::env::var("VIDPULSE_REDIS_PORT").unwrap_or_else(|_| "6379".into());
    let port = free_port();
    let log = "ingest.log";
    let stream = format!("{}user_actions", env.prefix);
    let mut ingest = {
        let mut c = env.cmd("vidpulse-ingest");
        c.env("VIDPULSE_LOG", "debug,librdkafka=debug")
            .env(
                "VIDPULSE_KAFKA_OPTIONS",
                format!("sasl.oauthbearer.config=principal={ENV_SECRET}"),
            )
            .args([
                "--preset",
                "video_events",
                "--kafka-option",
                &format!("sasl.password={FLAG_SECRET}"),
                "--kafka-option",
                "debug=all",
                "--kafka-options-file",
                props.to_str().unwrap(),
                // A Redis that refuses the password: failures are logged.
                "--redis-stream",
                &format!("{stream}=user_actions"),
                "--redis-url",
                &format!("redis://:{REDIS_SECRET}@127.0.0.1:{redis_port}"),
                "--admin-addr",
                &format!("127.0.0.1:{port}"),
            ]);
        let f = std::fs::File::create(dir.join(log)).unwrap();
        c.stdout(f.try_clone().unwrap()).stderr(f);
        c.spawn().unwrap()
    };
    // Work through the Kafka path: an event and a dead letter.
    env.produce(
        "video_events",
        &[
            (
                Some("v1"),
                Some(
                    br#"{"event_type":"video_played","video_id":"v1","timestamp":"2025-04-05T10:00:00Z"}"#
                        .to_vec(),
                ),
            ),
            (Some("v2"), Some(b"not json".to_vec())),
        ],
    );
    wait_for(
        "an event and a dead letter",
        Duration::from_secs(60),
        || (env.count("vp.events.v1") >= 1 && env.count("vp.dlq.v1") >= 1).then_some(()),
    );
    // Let the Redis source fail and retry a few times.
    std::thread::sleep(Duration::from_secs(3));
    let metrics = http_get(port, "/metrics").unwrap().1;
    let ready = http_get(port, "/readyz").unwrap().1;
    let health = http_get(port, "/healthz").unwrap().1;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &ingest.id().to_string()])
        .status();
    let _ = ingest.wait();
    let logs = std::fs::read_to_string(dir.join(log)).unwrap();

    // The run really exercised what could leak.
    assert!(
        metrics.contains("vidpulse_records_received_total"),
        "{metrics}"
    );
    assert!(
        logs.contains("sasl.password") || logs.contains("Redis"),
        "debug logs were written"
    );
    assert!(
        logs.contains("Redis call failed"),
        "the refused Redis password was retried and logged"
    );
    for secret in [FLAG_SECRET, ENV_SECRET, FILE_SECRET, REDIS_SECRET] {
        for (what, text) in [
            ("logs", &logs),
            ("/metrics", &metrics),
            ("/readyz", &ready),
            ("/healthz", &health),
        ] {
            assert!(
                !text.contains(secret),
                "{secret} leaked into {what}:\n{}",
                text.lines()
                    .filter(|l| l.contains(secret))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query(
            &mut redis::Client::open(format!("redis://127.0.0.1:{redis_port}"))
                .unwrap()
                .get_connection()
                .unwrap(),
        )
        .unwrap();
}
