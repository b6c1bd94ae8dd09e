//! `vidpulse lag`: consumer lag per stage group and partition — the group's
//! committed offset against the partition's high watermark. Reads committed
//! offsets without joining the group, so it never disturbs a stage.
//!
//! The stages' groups are known (`vidpulse-ingest`, `vidpulse-dim-builder`,
//! `vidpulse-monitor`, `vidpulse-aggregator`, with the topic prefix); their
//! input topics are always shown (a partition with nothing committed counts
//! every record as lag), and any other pipeline or raw topic where the group
//! has committed offsets is shown too.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use vidpulse_core::config::KafkaArgs;
use vidpulse_core::{kafka, topics};

/// The stage groups and the topics each reads.
pub const STAGES: [(&str, &[&str]); 4] = [
    ("vidpulse-ingest", &topics::RAW),
    ("vidpulse-dim-builder", &[topics::EVENTS]),
    ("vidpulse-monitor", &[topics::EVENTS]),
    ("vidpulse-aggregator", &[topics::EVENTS, topics::MONITORED]),
];

#[derive(Args)]
pub struct LagArgs {
    /// Only these consumer groups (names without prefix; repeatable).
    /// Default: every stage group.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Also look at these topics (names without prefix; repeatable).
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// One JSON object per partition instead of a table.
    #[arg(long)]
    json: bool,
    /// Exit 1 when a group's total lag is above this (for scripts and
    /// alerts).
    #[arg(long)]
    max_lag: Option<i64>,
}

/// A partition's id, low and high watermarks.
type Watermarks = (i32, i64, i64);

/// One partition's lag in one group.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    /// `None`: the group has committed nothing there.
    pub committed: Option<i64>,
    pub low: i64,
    pub high: i64,
}

impl Row {
    /// Records not yet processed by the group: from the committed offset (or
    /// the earliest record, when nothing is committed: stages start at the
    /// earliest offset) to the high watermark.
    pub fn lag(&self) -> i64 {
        let from = self.committed.unwrap_or(self.low).max(self.low);
        (self.high - from).max(0)
    }
}

pub async fn run(kafka_args: &KafkaArgs, args: LagArgs) -> anyhow::Result<()> {
    let kafka_args = kafka_args.clone();
    tokio::task::spawn_blocking(move || lag(&kafka_args, &args)).await?
}

fn lag(kafka_args: &KafkaArgs, args: &LagArgs) -> anyhow::Result<()> {
    let groups: Vec<String> = if args.groups.is_empty() {
        STAGES.iter().map(|(g, _)| (*g).to_owned()).collect()
    } else {
        args.groups.clone()
    };
    let probe: BaseConsumer = kafka::reader_config(kafka_args)?
        .create()
        .context("cannot create Kafka consumer")?;
    let timeout = Duration::from_secs(10);
    // Every topic any group might read, with its partitions and watermarks.
    let mut candidates: Vec<String> = vec![
        topics::EVENTS.into(),
        topics::MONITORED.into(),
        topics::LATE.into(),
        topics::DLQ.into(),
    ];
    candidates.extend(topics::RAW.iter().map(|t| (*t).to_owned()));
    candidates.extend(args.topics.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    candidates.retain(|t| seen.insert(t.clone()));
    // Topic → (partition, low, high) of each partition.
    let mut known: Vec<(String, Vec<Watermarks>)> = Vec::new();
    for name in &candidates {
        let full = kafka_args.topic(name);
        let md = probe.fetch_metadata(Some(&full), timeout)?;
        let Some(t) = md
            .topics()
            .iter()
            .find(|t| t.name() == full && t.error().is_none() && !t.partitions().is_empty())
        else {
            continue;
        };
        let mut parts = Vec::new();
        for p in t.partitions() {
            let (lo, hi) = probe.fetch_watermarks(&full, p.id(), timeout)?;
            parts.push((p.id(), lo, hi));
        }
        known.push((name.clone(), parts));
    }
    if known.is_empty() {
        bail!("no pipeline topic exists (create them with `vidpulse topics create`)");
    }

    let mut rows = Vec::new();
    for group in &groups {
        let full_group = kafka_args.topic(group);
        let inputs: &[&str] = STAGES
            .iter()
            .find(|(g, _)| g == group)
            .map(|(_, t)| *t)
            .unwrap_or(&[]);
        let mut cfg = kafka::reader_config(kafka_args)?;
        cfg.set("group.id", &full_group);
        let consumer: BaseConsumer = cfg.create()?;
        let mut tpl = TopicPartitionList::new();
        for (name, parts) in &known {
            for (p, _, _) in parts {
                tpl.add_partition(&kafka_args.topic(name), *p);
            }
        }
        let committed = consumer
            .committed_offsets(tpl, timeout)
            .with_context(|| format!("reading committed offsets of group {full_group}"))?;
        for (name, parts) in &known {
            let full = kafka_args.topic(name);
            let group_rows: Vec<Row> = parts
                .iter()
                .map(|(p, lo, hi)| Row {
                    group: full_group.clone(),
                    topic: name.clone(),
                    partition: *p,
                    committed: committed
                        .find_partition(&full, *p)
                        .and_then(|e| match e.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        }),
                    low: *lo,
                    high: *hi,
                })
                .collect();
            let reads = inputs.contains(&name.as_str())
                || args.topics.contains(name)
                || group_rows.iter().any(|r| r.committed.is_some());
            if reads {
                rows.extend(group_rows);
            }
        }
    }

    let mut over = Vec::new();
    for group in &groups {
        let full_group = kafka_args.topic(group);
        let total: i64 = rows
            .iter()
            .filter(|r| r.group == full_group)
            .map(Row::lag)
            .sum();
        if args.max_lag.is_some_and(|m| total > m) {
            over.push(format!("{full_group} ({total})"));
        }
    }
    if args.json {
        for r in &rows {
            println!(
                "{}",
                json!({
                    "group": r.group,
                    "topic": r.topic,
                    "partition": r.partition,
                    "committed": r.committed,
                    "low": r.low,
                    "high": r.high,
                    "lag": r.lag(),
                })
            );
        }
    } else {
        print!("{}", table(&rows));
    }
    if !over.is_empty() {
        bail!(
            "lag above --max-lag {}: {}",
            args.max_lag.unwrap_or(0),
            over.join(", ")
        );
    }
    Ok(())
}

/// A table: one line per partition, then one total line per group.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<28} {:<24} {:>9} {:>12} {:>12} {:>10}\n",
        "GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG"
    );
    let mut i = 0;
    while i < rows.len() {
        let group = &rows[i].group;
        let mut total = 0;
        let mut n = 0;
        while i < rows.len() && &rows[i].group == group {
            let r = &rows[i];
            let committed = r.committed.map_or("-".to_owned(), |c| c.to_string());
            out.push_str(&format!(
                "{:<28} {:<24} {:>9} {:>12} {:>12} {:>10}\n",
                r.group,
                r.topic,
                r.partition,
                committed,
                r.high,
                r.lag()
            ));
            total += r.lag();
            n += 1;
            i += 1;
        }
        out.push_str(&format!(
            "{group:<28} total lag {total} over {n} partitions\n"
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(committed: Option<i64>, low: i64, high: i64) -> Row {
        Row {
            group: "g".into(),
            topic: "t".into(),
            partition: 0,
            committed,
            low,
            high,
        }
    }

    #[test]
    fn lag_counts_from_the_committed_offset_or_the_earliest_record() {
        assert_eq!(row(Some(7), 0, 10).lag(), 3);
        assert_eq!(row(Some(10), 0, 10).lag(), 0);
        assert_eq!(row(None, 4, 10).lag(), 6, "nothing committed: all unread");
        assert_eq!(row(Some(2), 4, 10).lag(), 6, "committed below retention");
        assert_eq!(row(Some(12), 0, 10).lag(), 0);
    }

    #[test]
    fn table_totals_each_group() {
        let mut rows = vec![row(Some(7), 0, 10), row(None, 0, 5)];
        rows.push(Row {
            group: "h".into(),
            ..row(Some(1), 0, 1)
        });
        let t = table(&rows);
        assert!(
            t.contains("g                            total lag 8 over 2 partitions"),
            "{t}"
        );
        assert!(
            t.contains("h                            total lag 0 over 1 partitions"),
            "{t}"
        );
        assert!(t.lines().nth(2).unwrap().contains(" - "), "{t}");
    }

    #[test]
    fn every_stage_group_is_known() {
        let names: Vec<&str> = STAGES.iter().map(|(g, _)| *g).collect();
        assert_eq!(
            names,
            [
                "vidpulse-ingest",
                "vidpulse-dim-builder",
                "vidpulse-monitor",
                "vidpulse-aggregator"
            ]
        );
    }
}
