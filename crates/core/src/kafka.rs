//! Kafka client configuration shared by every stage. All producers use
//! `murmur2_random` (Kafka's Java default) so topics with equal partition
//! counts are co-partitioned, and are idempotent with `acks=all`.

use std::collections::HashMap;
use std::time::Duration;

use metrics::gauge;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::{ConfigError, KafkaArgs};

/// Largest record (bytes) producers accept; raw records up to this size are
/// carried to the DLQ intact when a stage rejects them.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The base config: brokers plus every user-supplied property.
pub fn base_config(args: &KafkaArgs) -> Result<ClientConfig, ConfigError> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &args.brokers);
    for (k, v) in args.all_options()? {
        cfg.set(k, v);
    }
    Ok(cfg)
}

/// Producer settings: idempotent, ordered per partition, Java-compatible
/// partitioner. User options given with `--kafka-option producer.<key>=…`
/// are not special-cased: plain options apply to every client.
pub fn producer_config(args: &KafkaArgs) -> Result<ClientConfig, ConfigError> {
    let mut cfg = ClientConfig::new();
    cfg.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("compression.type", "none")
        .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string())
        .set("queue.buffering.max.messages", "200000")
        .set("queue.buffering.max.kbytes", "1048576");
    overlay(&mut cfg, base_config(args)?);
    Ok(cfg)
}

/// How long librdkafka postpones the next fetch of a partition once its
/// local queue holds `queued.min.messages` (librdkafka's default: 1 s). With
/// the default a stage that drains its queue faster than a second sits idle
/// until the next fetch: ingest spent 45 % of a 500 k-record run waiting for
/// records at 145 k records/s, and reads 200 k/s with 10 ms. A
/// `--kafka-option` overrides it.
const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// Consumer settings for a group member that stores offsets only after the
/// records are handled (`enable.auto.offset.store=false`); stored offsets
/// are committed in the background and on shutdown / revoke.
pub fn consumer_config(args: &KafkaArgs, group: &str) -> Result<ClientConfig, ConfigError> {
    let mut cfg = ClientConfig::new();
    cfg.set("group.id", args.topic(group))
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("fetch.message.max.bytes", "1048576")
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
        .set("statistics.interval.ms", "5000");
    if let Some(id) = &args.group_instance_id {
        if id.trim().is_empty() {
            return Err(ConfigError::Invalid {
                field: "--group-instance-id".into(),
                message: "empty; give a name stable across restarts (the pod name) or leave it out"
                    .into(),
            });
        }
        cfg.set("group.instance.id", id);
    }
    overlay(&mut cfg, base_config(args)?);
    Ok(cfg)
}

/// Consumer settings without a group (tail, loaders that assign partitions
/// themselves).
pub fn reader_config(args: &KafkaArgs) -> Result<ClientConfig, ConfigError> {
    let mut cfg = ClientConfig::new();
    cfg.set("group.id", args.topic("vidpulse-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
    overlay(&mut cfg, base_config(args)?);
    Ok(cfg)
}

fn overlay(cfg: &mut ClientConfig, top: ClientConfig) {
    for (k, v) in top.config_map() {
        cfg.set(k, v);
    }
}

/// Creates `topic` with `partitions` partitions unless it exists. Returns
/// whether it was created. Idempotent.
pub async fn ensure_topic(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    partitions: i32,
    config: &[(&str, &str)],
) -> Result<bool, rdkafka::error::KafkaError> {
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for (k, v) in config {
        new = new.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics([&new], &opts).await?;
    // One topic asked, one result.
    match results.into_iter().next() {
        Some(Ok(_)) => Ok(true),
        Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) | None => Ok(false),
        Some(Err((_, code))) => Err(rdkafka::error::KafkaError::AdminOp(code)),
    }
}

/// Partition count of `topic`, or `None` when it does not exist.
pub fn partition_count(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i32>, rdkafka::error::KafkaError> {
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .and_then(|t| {
            if t.error().is_some() || t.partitions().is_empty() {
                None
            } else {
                Some(t.partitions().len() as i32)
            }
        }))
}

/// (topic, partition) → (low, end) offsets.
pub type Bounds = HashMap<(String, i32), (i64, i64)>;

/// Low (first retained) and end offsets of each (topic, partition), from
/// two ListOffsets requests; partitions that did not answer are left out.
pub fn partition_bounds(
    consumer: &BaseConsumer,
    parts: &[(&str, i32)],
    timeout: Duration,
) -> Result<Bounds, rdkafka::error::KafkaError> {
    let list = |at: rdkafka::Offset| {
        let mut tpl = rdkafka::TopicPartitionList::new();
        for (t, p) in parts {
            let _ = tpl.add_partition_offset(t, *p, at);
        }
        tpl
    };
    let highs = consumer.offsets_for_times(list(rdkafka::Offset::End), timeout)?;
    let lows = consumer.offsets_for_times(list(rdkafka::Offset::Beginning), timeout)?;
    let get = |tpl: &rdkafka::TopicPartitionList, t: &str, p: i32| {
        tpl.find_partition(t, p)
            .and_then(|e| e.offset().to_raw())
            .filter(|o| *o >= 0)
    };
    let mut out = HashMap::new();
    for (t, p) in parts {
        if let (Some(low), Some(high)) = (get(&lows, t, *p), get(&highs, t, *p)) {
            out.insert(((*t).to_owned(), *p), (low, high));
        }
    }
    Ok(out)
}

/// Reads `topic`/`partition` from `offset` (blocking, up to `timeout`)
/// until `pick` returns something for a record: that. `pick` sees each
/// record's payload and whether it is a control record (an in-band
/// watermark).
pub fn scan_from<T>(
    cfg: &ClientConfig,
    topic: &str,
    partition: i32,
    offset: i64,
    timeout: Duration,
    mut pick: impl FnMut(Option<&[u8]>, bool) -> Option<T>,
) -> Result<Option<T>, rdkafka::error::KafkaError> {
    use rdkafka::Message as _;
    use rdkafka::message::Headers as _;
    let consumer: BaseConsumer = cfg.create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    let until = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < until {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let control = m
                    .headers()
                    .is_some_and(|hs| hs.iter().any(|h| h.key == crate::watermark::CONTROL_HEADER));
                if let Some(v) = pick(m.payload(), control) {
                    return Ok(Some(v));
                }
            }
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    Ok(None)
}

/// Fails when an input topic does not exist (`Err(Some(topic))`), naming it.
pub fn missing_topic<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topics: &[String],
) -> Result<Option<String>, rdkafka::error::KafkaError> {
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let exists = md
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if !exists {
            return Ok(Some(topic.clone()));
        }
    }
    Ok(None)
}

/// librdkafka's log lines as `tracing` events (target `librdkafka`).
pub fn log_rdkafka(level: RDKafkaLogLevel, fac: &str, msg: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", fac, "{msg}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{msg}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", fac, "{msg}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{msg}"),
    }
}

/// Sets the consumer-lag gauge of every partition in `stats`.
pub fn record_lag(
    stage: &'static str,
    stats: &Statistics,
    gauges: &mut HashMap<(String, i32), metrics::Gauge>,
) {
    for (name, topic) in &stats.topics {
        for (p, part) in &topic.partitions {
            if *p < 0 || part.consumer_lag < 0 {
                continue;
            }
            gauges
                .entry((name.clone(), *p))
                .or_insert_with(|| {
                    gauge!(crate::metrics::CONSUMER_LAG, "stage" => stage, "topic" => name.clone(), "partition" => p.to_string())
                })
                .set(part.consumer_lag as f64);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(instance: Option<&str>) -> KafkaArgs {
        KafkaArgs {
            brokers: "b:1".into(),
            topic_prefix: "t1.".into(),
            options: Vec::new(),
            options_file: None,
            group_instance_id: instance.map(str::to_owned),
        }
    }

    #[test]
    fn a_group_instance_id_makes_the_group_consumer_a_static_member_and_nothing_else() {
        let cfg = consumer_config(&args(Some("aggregator-1")), "g").unwrap();
        assert_eq!(cfg.get("group.id"), Some("t1.g"));
        assert_eq!(cfg.get("group.instance.id"), Some("aggregator-1"));
        // Producers and group-less readers never carry it.
        assert_eq!(
            producer_config(&args(Some("a")))
                .unwrap()
                .get("group.instance.id"),
            None
        );
        assert_eq!(
            reader_config(&args(Some("a")))
                .unwrap()
                .get("group.instance.id"),
            None
        );
        // Without one, a dynamic member.
        assert_eq!(
            consumer_config(&args(None), "g")
                .unwrap()
                .get("group.instance.id"),
            None
        );
        let e = consumer_config(&args(Some(" ")), "g")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--group-instance-id"), "{e}");
    }
}
