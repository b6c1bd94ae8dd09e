//! `vidpulse-bench`: the baselines `scripts/bench` compares stages against.
//!
//! - `passthrough`: the bare consume → produce loop every Kafka-to-Kafka
//!   stage uses, with no processing (copies key and value).
//! - `measure`: waits until a topic holds N records, then reports the
//!   throughput from the records' own timestamps (first to last produce),
//!   so process start-up and group joins are not counted.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use vidpulse_core::admin::Health;
use vidpulse_core::config::KafkaArgs;
use vidpulse_core::config::LoopSettings;
use vidpulse_core::runtime::{
    self, Commit, Output, Outputs, Record, Stage, StageError, StageSettings,
};
use vidpulse_core::{kafka, shutdown};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Copy records from input topics to an output topic through the stage runtime.
    Passthrough {
        /// Input topics (without prefix).
        #[arg(long, value_delimiter = ',', required = true)]
        input: Vec<String>,
        /// Output topic (without prefix); created with --partitions if missing.
        #[arg(long)]
        output: String,
        #[arg(long, default_value_t = 8)]
        partitions: i32,
        #[arg(long, default_value = "vidpulse-bench-passthrough")]
        group: String,
    },
    /// Wait for N records in a topic and print the produce rate.
    Measure {
        /// Topics (without prefix) whose records are counted together.
        #[arg(long, value_delimiter = ',', required = true)]
        topic: Vec<String>,
        #[arg(long)]
        expect: i64,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Label printed with the figure.
        #[arg(long, default_value = "run")]
        label: String,
    },
}

struct Copy(String);

impl Stage for Copy {
    async fn process(&mut self, batch: &[Record<'_>], out: &mut Outputs) -> Result<(), StageError> {
        for (i, r) in batch.iter().enumerate() {
            out.push(
                i,
                Output {
                    topic: self.0.clone(),
                    key: r.key.map(<[u8]>::to_vec),
                    payload: r.payload.map(<[u8]>::to_vec),
                    headers: Vec::new(),
                },
            );
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    vidpulse_core::telemetry::init(vidpulse_core::telemetry::LogFormat::Text);
    match cli.cmd {
        Cmd::Passthrough {
            input,
            output,
            partitions,
            group,
        } => {
            let admin: AdminClient<DefaultClientContext> =
                kafka::base_config(&cli.kafka)?.create()?;
            let out = cli.kafka.topic(&output);
            kafka::ensure_topic(&admin, &out, partitions, &[]).await?;
            // The same loop settings as ingest's defaults.
            let settings = StageSettings {
                stage: "passthrough",
                group,
                inputs: input.iter().map(|t| cli.kafka.topic(t)).collect(),
                loop_: LoopSettings {
                    max_batch: 1000,
                    max_wait: Duration::ZERO,
                    max_in_flight: 100_000,
                    min_backoff: Duration::from_millis(200),
                    max_backoff: Duration::from_secs(5),
                    drain_timeout: Duration::from_secs(30),
                },
                commit: Commit::AfterOutputs,
                tick: Duration::from_millis(200),
                watermarks: runtime::Watermarks::Skip,
            };
            runtime::run(
                &cli.kafka,
                settings,
                Copy(out),
                Health::new(),
                shutdown::on_signal(),
            )
            .await?;
        }
        Cmd::Measure {
            topic,
            expect,
            timeout,
            label,
        } => {
            let consumer: BaseConsumer = kafka::reader_config(&cli.kafka)?.create()?;
            let topics: Vec<String> = topic.iter().map(|t| cli.kafka.topic(t)).collect();
            let started = Instant::now();
            loop {
                let n: i64 = topics
                    .iter()
                    .map(|t| total(&consumer, t).map(|(n, _)| n))
                    .sum::<anyhow::Result<i64>>()?;
                if n >= expect {
                    break;
                }
                if started.elapsed() > timeout {
                    bail!("{label}: only {n} of {expect} records after {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            // Data records only: in-band watermark records (forwarded with
            // their original, older timestamps) are neither counted nor timed.
            let (first, last, n) = loop {
                let (mut first, mut last, mut n) = (i64::MAX, i64::MIN, 0i64);
                for t in &topics {
                    let (_, parts) = total(&consumer, t)?;
                    for (p, lo, hi) in parts {
                        for ts in data_timestamps(&consumer, t, p, lo, hi)? {
                            first = first.min(ts);
                            last = last.max(ts);
                            n += 1;
                        }
                    }
                }
                if n >= expect || started.elapsed() > timeout {
                    break (first, last, n);
                }
                std::thread::sleep(Duration::from_millis(500));
            };
            let secs = ((last - first).max(1)) as f64 / 1000.0;
            println!(
                "{label}: {n} records in {secs:.2} s = {:.0} records/s",
                n as f64 / secs
            );
        }
    }
    Ok(())
}

/// (partition, low, high) of one partition.
type Watermarks = (i32, i64, i64);

/// Records in `topic` and the watermarks of each partition.
fn total(c: &BaseConsumer, topic: &str) -> anyhow::Result<(i64, Vec<Watermarks>)> {
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .context("topic missing")?;
    let mut parts = Vec::new();
    let mut n = 0;
    for p in t.partitions() {
        let (lo, hi) = c.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        n += hi - lo;
        parts.push((p.id(), lo, hi));
    }
    Ok((n, parts))
}

/// Timestamps (ms) of the data records of `topic`/`partition` in
/// `[lo, hi)` (control records skipped).
fn data_timestamps(
    c: &BaseConsumer,
    topic: &str,
    partition: i32,
    lo: i64,
    hi: i64,
) -> anyhow::Result<Vec<i64>> {
    use rdkafka::message::Headers as _;
    let mut out = Vec::new();
    if hi <= lo {
        return Ok(out);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(lo))?;
    c.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let Some(m) = c.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m?;
        if m.partition() != partition {
            continue;
        }
        let control = m.headers().is_some_and(|hs| {
            hs.iter()
                .any(|h| h.key == vidpulse_core::watermark::CONTROL_HEADER)
        });
        if !control {
            out.push(
                m.timestamp()
                    .to_millis()
                    .context("record without timestamp")?,
            );
        }
        if m.offset() >= hi - 1 {
            return Ok(out);
        }
    }
    bail!("could not read {topic}/{partition} up to offset {hi}")
}
