//! Against a real broker (`scripts/stack up kafka`; `VIDPULSE_KAFKA_BROKERS`
//! or 127.0.0.1:9092): what lands on the raw topics is exactly what
//! `generate` says, per key in production order, and the truth file matches.
//! `scripts/test` starts the broker before running it.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use vidpulse_core::CancellationToken;
use vidpulse_core::config::KafkaArgs;
use vidpulse_gen::run::{RunSettings, Sink, run};
use vidpulse_gen::{Class, GenConfig, Truth, generate};

/// Partition, key and payload of a consumed record.
type Landed = (i32, Option<String>, Vec<u8>);

fn brokers() -> String {
    std::env::var("VIDPULSE_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

#[tokio::test(flavor = "multi_thread")]
async fn records_land_as_generated() {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("gen-test-{nanos}.");
    let dir = std::env::temp_dir().join(format!("vidpulse-gen-{nanos}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = GenConfig {
        count: 3000,
        seed: 42,
        bad_fraction: 0.05,
        late_fraction: 0.05,
        dup_fraction: 0.05,
        ..GenConfig::default()
    };
    let args = KafkaArgs {
        brokers: brokers(),
        topic_prefix: prefix.clone(),
        options: Vec::new(),
        options_file: None,
        group_instance_id: None,
    };
    let settings = RunSettings {
        config: config.clone(),
        rate: 0,
        sink: Sink::Kafka {
            args,
            create_topics: Some(3),
        },
        truth_path: dir.join("truth.json"),
        progress: false,
    };
    let summary = run(settings, CancellationToken::new()).await.unwrap();
    let expected = generate(&config);
    assert_eq!(summary.sent, 3000);
    assert_eq!(summary.truth, expected.truth);
    let written: Truth =
        serde_json::from_slice(&std::fs::read(dir.join("truth.json")).unwrap()).unwrap();
    assert_eq!(written, expected.truth);

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("{prefix}reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    // Everything that landed, per topic, in partition order.
    let mut landed: BTreeMap<String, Vec<Landed>> = BTreeMap::new();
    for topic in vidpulse_core::topics::RAW {
        let name = format!("{prefix}{topic}");
        let mut tpl = TopicPartitionList::new();
        let mut left = 0;
        for p in 0..3 {
            let (lo, hi) = consumer
                .fetch_watermarks(&name, p, Duration::from_secs(10))
                .unwrap();
            left += hi - lo;
            tpl.add_partition_offset(&name, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let records = landed.entry(topic.to_owned()).or_default();
        while left > 0 {
            let m = consumer.poll(Duration::from_secs(10)).unwrap().unwrap();
            let key = m.key().map(|k| String::from_utf8(k.to_vec()).unwrap());
            records.push((m.partition(), key, m.payload().unwrap_or_default().to_vec()));
            left -= 1;
        }
    }

    for topic in vidpulse_core::topics::RAW {
        let got = &landed[topic];
        let want: Vec<_> = expected
            .records
            .iter()
            .filter(|r| r.topic == topic)
            .collect();
        assert_eq!(got.len(), want.len(), "{topic}");
        assert_eq!(got.len() as u64, expected.truth.topics[topic].sent);
        // Per key (hence per partition), the records arrive in production
        // order, byte for byte.
        let mut by_key_got: HashMap<Option<&str>, Vec<&[u8]>> = HashMap::new();
        let mut partition_of: HashMap<&str, i32> = HashMap::new();
        for (p, key, payload) in got {
            if let Some(k) = key {
                assert_eq!(*partition_of.entry(k).or_insert(*p), *p, "key {k} split");
                by_key_got.entry(Some(k)).or_default().push(payload);
            }
        }
        let mut by_key_want: HashMap<Option<&str>, Vec<&[u8]>> = HashMap::new();
        for r in want.iter().filter(|r| r.key.is_some()) {
            by_key_want
                .entry(r.key.as_deref())
                .or_default()
                .push(&r.payload);
        }
        assert_eq!(by_key_got, by_key_want, "{topic}");
    }
    assert!(
        expected
            .records
            .iter()
            .any(|r| matches!(r.class, Class::Duplicate { .. }))
    );
    std::fs::remove_dir_all(dir).ok();
}

/// Every time field a raw record of the seeds' formats carries, in epoch ms
/// (ISO-8601, seed 002's Asia/Shanghai local time, epoch ms or seconds).
fn record_times(payload: &[u8]) -> Vec<i64> {
    let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(payload) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for field in [
        "timestamp",
        "start_time",
        "create_time",
        "update_time",
        "arrive_time",
        "leave_time",
        "time",
    ] {
        let t = match m.get(field) {
            Some(serde_json::Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
                .map(|d| d.timestamp_millis())
                .ok()
                .or_else(|| {
                    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
                        .ok()
                        .map(|d| (d.and_utc().timestamp() - 8 * 3600) * 1000)
                }),
            Some(serde_json::Value::Number(n)) => n.as_f64().map(|f| {
                if f.abs() > 1e11 {
                    f as i64
                } else {
                    (f * 1000.0).round() as i64
                }
            }),
            _ => None,
        };
        out.extend(t);
    }
    out
}

/// `vidpulse-gen --start now` (the binary, as a user runs it) dates no
/// record after the run: event times run from now − span up to now.
#[test]
fn start_now_dates_nothing_in_the_future() {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("gen-now-{nanos}.");
    let dir = std::env::temp_dir().join(format!("vidpulse-gen-now-{nanos}"));
    std::fs::create_dir_all(&dir).unwrap();
    let truth_path = dir.join("truth.json");
    let started = chrono::Utc::now().timestamp_millis();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vidpulse-gen"))
        .args([
            "--start",
            "now",
            "--span",
            "10m",
            "--count",
            "3000",
            "--bad-fraction",
            "0.05",
            "--late-fraction",
            "0.05",
            "--dup-fraction",
            "0.05",
            "--create-topics",
            "--partitions",
            "3",
            "--truth",
            truth_path.to_str().unwrap(),
        ])
        .env("VIDPULSE_KAFKA_BROKERS", brokers())
        .env("VIDPULSE_TOPIC_PREFIX", &prefix)
        .output()
        .unwrap();
    let ended = chrono::Utc::now().timestamp_millis();
    assert!(
        out.status.success(),
        "vidpulse-gen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("gen ran {} ms", ended - started);

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("{prefix}reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    // The ingest-invalid range (year 2100 on) is where gen's deliberately
    // out-of-range records live; nothing else may pass the end of the run.
    let year_2100 = chrono::DateTime::parse_from_rfc3339("2100-01-01T00:00:00Z")
        .unwrap()
        .timestamp_millis();
    let (mut records, mut latest) = (0, i64::MIN);
    for topic in vidpulse_core::topics::RAW {
        let name = format!("{prefix}{topic}");
        let mut tpl = TopicPartitionList::new();
        let mut left = 0;
        for p in 0..3 {
            let (lo, hi) = consumer
                .fetch_watermarks(&name, p, Duration::from_secs(10))
                .unwrap();
            left += hi - lo;
            tpl.add_partition_offset(&name, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        while left > 0 {
            let m = consumer.poll(Duration::from_secs(10)).unwrap().unwrap();
            records += 1;
            left -= 1;
            for t in record_times(m.payload().unwrap_or_default()) {
                if t >= year_2100 {
                    continue;
                }
                assert!(
                    t <= ended,
                    "{topic}: a record dated {} ms after the run ended: {}",
                    t - ended,
                    String::from_utf8_lossy(m.payload().unwrap_or_default())
                );
                latest = latest.max(t);
            }
        }
    }
    assert_eq!(records, 3000);
    // The span ends at the run, not before it.
    assert!(
        latest >= started - 3_000,
        "latest {latest}, started {started}"
    );
    let truth: Truth = serde_json::from_slice(&std::fs::read(&truth_path).unwrap()).unwrap();
    let start = chrono::DateTime::parse_from_rfc3339(&truth.start)
        .unwrap()
        .timestamp_millis();
    assert!(start + 600_000 <= ended, "{}", truth.start);
    for minutes in truth.kinds_per_minute.values() {
        for m in minutes.keys() {
            let t = chrono::DateTime::parse_from_rfc3339(m)
                .unwrap()
                .timestamp_millis();
            assert!(t <= ended, "truth has events in minute {m}");
        }
    }
    std::fs::remove_dir_all(dir).ok();
}
