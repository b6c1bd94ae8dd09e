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
        .set("statistics.interval.ms", "5000");
    overlay(&mut cfg, base_config(args)?);
    Ok(cfg)
}

/// Consumer settings without a group (tail, loaders that assign partitions
/// themselves).
pub fn reader_config(args: &KafkaArgs) -> Result<ClientConfig, ConfigError> {
    let mut cfg = ClientConfig::new();
    cfg.set("group.id", args.topic("vidpulse-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
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
