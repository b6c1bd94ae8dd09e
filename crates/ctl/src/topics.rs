//! `vidpulse topics create|describe`: the pipeline's topics with their
//! partition counts. Creation is idempotent.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use vidpulse_core::config::KafkaArgs;
use vidpulse_core::kafka::{self, MAX_MESSAGE_BYTES};
use vidpulse_core::topics;

#[derive(Subcommand)]
pub enum TopicsCmd {
    /// Create every pipeline and raw topic that does not exist yet.
    Create(CreateArgs),
    /// Show partitions and offsets of topics (default: the pipeline's).
    Describe {
        /// Topics to describe (names without prefix).
        topics: Vec<String>,
        /// Read the records to count data and control records (in-band
        /// watermarks) apart.
        #[arg(long)]
        data: bool,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// Partitions of vp.events.v1 and everything co-partitioned with it
    /// (vp.monitored.v1, pool topics).
    #[arg(long, env = "VIDPULSE_EVENT_PARTITIONS", default_value_t = topics::DEFAULT_EVENT_PARTITIONS)]
    partitions: i32,
    /// Partitions of each raw topic.
    #[arg(long, env = "VIDPULSE_RAW_PARTITIONS", default_value_t = topics::DEFAULT_RAW_PARTITIONS)]
    raw_partitions: i32,
    /// Partitions of vp.dlq.v1 and vp.late.v1.
    #[arg(long, env = "VIDPULSE_SIDE_PARTITIONS", default_value_t = topics::DEFAULT_SIDE_PARTITIONS)]
    side_partitions: i32,
}

/// Every topic `topics create` makes, with its partition count.
fn plan(a: &CreateArgs) -> Vec<(&'static str, i32)> {
    let mut v = vec![
        (topics::EVENTS, a.partitions),
        (topics::MONITORED, a.partitions),
        (topics::DLQ, a.side_partitions),
        (topics::LATE, a.side_partitions),
    ];
    v.extend(topics::RAW.iter().map(|t| (*t, a.raw_partitions)));
    v
}

pub async fn run(kafka_args: &KafkaArgs, cmd: TopicsCmd) -> anyhow::Result<()> {
    match cmd {
        TopicsCmd::Create(a) => create(kafka_args, &a).await,
        TopicsCmd::Describe {
            topics: names,
            data,
        } => describe(kafka_args, names, data),
    }
}

async fn create(kafka_args: &KafkaArgs, a: &CreateArgs) -> anyhow::Result<()> {
    for (flag, n) in [
        ("--partitions", a.partitions),
        ("--raw-partitions", a.raw_partitions),
        ("--side-partitions", a.side_partitions),
    ] {
        if n < 1 {
            bail!("invalid {flag}: {n}; a topic needs at least 1 partition");
        }
    }
    let admin: AdminClient<DefaultClientContext> = kafka::base_config(kafka_args)?
        .create()
        .context("cannot create Kafka admin client")?;
    let probe: BaseConsumer = kafka::reader_config(kafka_args)?.create()?;
    let max_bytes = MAX_MESSAGE_BYTES.to_string();
    for (name, partitions) in plan(a) {
        let full = kafka_args.topic(name);
        let created = kafka::ensure_topic(
            &admin,
            &full,
            partitions,
            &[("max.message.bytes", &max_bytes)],
        )
        .await
        .with_context(|| format!("creating {full}"))?;
        let actual = kafka::partition_count(&probe, &full, Duration::from_secs(10))?;
        match (created, actual) {
            (true, _) => println!("created  {full} ({partitions} partitions)"),
            (false, Some(n)) if n != partitions => {
                println!("exists   {full} ({n} partitions; {partitions} requested — left as is)")
            }
            (false, n) => println!("exists   {full} ({} partitions)", n.unwrap_or(0)),
        }
    }
    Ok(())
}

/// Control records (in-band watermarks) in the given partition ranges: one
/// pass over the records' headers.
fn count_control(
    kafka_args: &KafkaArgs,
    topic: &str,
    ranges: &[(i32, i64, i64)],
) -> anyhow::Result<i64> {
    let reader: BaseConsumer = kafka::reader_config(kafka_args)?.create()?;
    let mut tpl = TopicPartitionList::new();
    let mut ends: std::collections::HashMap<i32, i64> = Default::default();
    for (p, lo, hi) in ranges {
        if hi > lo {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*lo))?;
            ends.insert(*p, *hi);
        }
    }
    if ends.is_empty() {
        return Ok(0);
    }
    reader.assign(&tpl)?;
    let mut control = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !ends.is_empty() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("counting {topic}: not all records read within 120 s");
        }
        if let Some(Ok(msg)) = reader.poll(Duration::from_millis(200)) {
            if crate::tail::is_control(&msg) {
                control += 1;
            }
            if ends
                .get(&msg.partition())
                .is_some_and(|e| msg.offset() + 1 >= *e)
            {
                ends.remove(&msg.partition());
            }
        }
    }
    Ok(control)
}

fn describe(kafka_args: &KafkaArgs, names: Vec<String>, count_data: bool) -> anyhow::Result<()> {
    let consumer: BaseConsumer = kafka::reader_config(kafka_args)?.create()?;
    let names: Vec<String> = if names.is_empty() {
        let a = CreateArgs {
            partitions: 1,
            raw_partitions: 1,
            side_partitions: 1,
        };
        plan(&a).into_iter().map(|(n, _)| n.to_owned()).collect()
    } else {
        names
    };
    for name in names {
        let full = kafka_args.topic(&name);
        let md = consumer.fetch_metadata(Some(&full), Duration::from_secs(10))?;
        let Some(t) = md
            .topics()
            .iter()
            .find(|t| t.name() == full && t.error().is_none())
        else {
            println!("{full}: does not exist");
            continue;
        };
        let mut total = 0;
        let mut parts = Vec::new();
        let mut ranges = Vec::new();
        for p in t.partitions() {
            let (lo, hi) = consumer.fetch_watermarks(&full, p.id(), Duration::from_secs(10))?;
            total += hi - lo;
            parts.push(format!("p{}=[{lo},{hi})", p.id()));
            ranges.push((p.id(), lo, hi));
        }
        if count_data {
            let control = count_control(kafka_args, &full, &ranges)?;
            println!(
                "{full}: {} partitions, {} records, {control} control records  {}",
                t.partitions().len(),
                total - control,
                parts.join(" ")
            );
        } else {
            println!(
                "{full}: {} partitions, {total} records  {}",
                t.partitions().len(),
                parts.join(" ")
            );
        }
    }
    Ok(())
}
