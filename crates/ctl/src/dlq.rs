//! `vidpulse dlq replay`: re-drives dead letters, e.g. after a mapping fix.
//!
//! Two targets:
//! - **raw** (default): each record goes back to the raw topic it was read
//!   from (`vp.source.topic`) or to `--to TOPIC`, with its original key and
//!   bytes, plus `vp.replayed-from` (`<dlq topic>/<partition>/<offset>`) and
//!   `vp.original.topic/partition/offset` headers. Ingest normalizes it again
//!   with whatever mapping it runs now; an ingest that honours the
//!   `vp.original.*` headers gives it the event id it would have had the
//!   first time.
//! - **normalized** (`--normalize PRESET|FILE`): each record is normalized
//!   here with that mapping, as if read at its original coordinates, and the
//!   event goes straight to `vp.events.v1`. The event id is the original
//!   source-derived id (or the record's own `event_id`), so replaying twice
//!   yields the same events, which downstream stages count once. Records the
//!   mapping still rejects are listed and not produced (they stay in the DLQ).
//!
//! Delivery: every produce is awaited (idempotent producer, `acks=all`); the
//! command fails if any is not acknowledged. The DLQ itself is only read
//! (no consumer group, no deletion).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use vidpulse_core::config::KafkaArgs;
use vidpulse_core::{dlq, kafka, topics};
use vidpulse_ingest::mapping::{Mapping, SourceRef};
use vidpulse_ingest::normalize::{
    H_KIND, H_ORIGINAL_OFFSET, H_ORIGINAL_PARTITION, H_ORIGINAL_TOPIC, normalize, normalize_with_id,
};
use vidpulse_ingest::presets;
use vidpulse_ingest::redis_stream::{H_SOURCE_ENTRY_ID, H_SOURCE_KIND};
use vidpulse_proto::Message as _;

/// Header on a replayed record: the DLQ record it came from.
pub const H_REPLAYED_FROM: &str = "vp.replayed-from";

#[derive(Subcommand)]
pub enum DlqCmd {
    /// Re-drive dead letters to their raw topic (default), to --to TOPIC, or
    /// normalized with --normalize to vp.events.v1. Prints a summary.
    Replay(ReplayArgs),
}

#[derive(Args)]
pub struct ReplayArgs {
    /// Only records with this reason (`vp.reason`; repeatable), e.g.
    /// unknown_event_type.
    #[arg(long = "reason")]
    reasons: Vec<String>,
    /// Only records read from this topic (without prefix; repeatable).
    #[arg(long = "source-topic")]
    source_topics: Vec<String>,
    /// Only records dead-lettered by this stage (`vp.stage`); `any` for all.
    #[arg(long, default_value = "ingest")]
    stage: String,
    /// Only this DLQ partition.
    #[arg(long)]
    partition: Option<i32>,
    /// Only DLQ offsets from this one (inclusive; per partition).
    #[arg(long)]
    from_offset: Option<i64>,
    /// Only DLQ offsets up to this one (inclusive; per partition).
    #[arg(long)]
    to_offset: Option<i64>,
    /// Send every record to this topic (without prefix) instead of the
    /// topic it was read from. Needed for records from Redis streams.
    #[arg(long, conflicts_with = "normalize")]
    to: Option<String>,
    /// Normalize here with this mapping (a preset name or a TOML file) and
    /// produce the events to --events-topic, keeping their original ids.
    #[arg(long)]
    normalize: Option<String>,
    /// Zone of zone-less times for --normalize mappings that name none.
    #[arg(long, default_value = "Asia/Shanghai")]
    time_zone: String,
    /// Topic of normalized events (with --normalize).
    #[arg(long, default_value = topics::EVENTS)]
    events_topic: String,
    /// Dead-letter topic to read.
    #[arg(long, default_value = topics::DLQ)]
    dlq_topic: String,
    /// Stop after this many matching records.
    #[arg(long)]
    max: Option<u64>,
    /// Only print what would be replayed.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(kafka_args: &KafkaArgs, cmd: DlqCmd) -> anyhow::Result<()> {
    match cmd {
        DlqCmd::Replay(args) => replay(kafka_args, &args).await,
    }
}

/// A dead letter's headers that matter here.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Letter {
    pub reason: String,
    pub stage: String,
    /// Where the record was first read (the original coordinates when the
    /// record was itself a replay).
    pub topic: String,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    /// Set when the record came from a Redis stream.
    pub entry_id: Option<String>,
}

impl Letter {
    pub fn from_headers<'a>(headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Letter {
        let mut l = Letter::default();
        let mut original: (Option<String>, Option<i32>, Option<i64>) = (None, None, None);
        for (k, v) in headers {
            let v = String::from_utf8_lossy(v).into_owned();
            match k {
                dlq::H_REASON => l.reason = v,
                dlq::H_STAGE => l.stage = v,
                dlq::H_TOPIC => l.topic = v,
                dlq::H_PARTITION => l.partition = v.parse().ok(),
                dlq::H_OFFSET => l.offset = v.parse().ok(),
                H_SOURCE_ENTRY_ID => l.entry_id = Some(v),
                H_SOURCE_KIND if v == "redis-stream" => {
                    l.entry_id.get_or_insert_with(String::new);
                }
                H_ORIGINAL_TOPIC => original.0 = Some(v),
                H_ORIGINAL_PARTITION => original.1 = v.parse().ok(),
                H_ORIGINAL_OFFSET => original.2 = v.parse().ok(),
                _ => {}
            }
        }
        // A replay rejected again keeps pointing at the first read.
        if let (Some(t), Some(p), Some(o)) = original {
            l.topic = t;
            l.partition = Some(p);
            l.offset = Some(o);
        }
        l
    }

    fn is_from_redis(&self) -> bool {
        self.entry_id.is_some()
    }
}

/// What happens to one dead letter.
#[derive(Clone, Debug, PartialEq)]
enum Plan {
    /// Produce to `topic` with `headers`.
    Send {
        topic: String,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        headers: Vec<(&'static str, Vec<u8>)>,
    },
    /// The --normalize mapping rejected it again.
    StillRejected { reason: String, detail: String },
    /// Cannot be re-driven to its source (a Redis stream) without --to.
    NeedsTo,
}

struct Settings {
    mapping: Option<Mapping>,
    to: Option<String>,
    events_topic: String,
}

fn load_mapping(spec: &str, zone: chrono_tz::Tz) -> anyhow::Result<Mapping> {
    if spec.ends_with(".toml") || spec.contains('/') {
        let text = std::fs::read_to_string(Path::new(spec))
            .with_context(|| format!("cannot read mapping {spec}"))?;
        Ok(Mapping::from_toml(&text, zone)?)
    } else {
        match presets::preset(spec, zone) {
            Some(m) => Ok(m?),
            None => bail!(
                "--normalize {spec:?}: not a preset ({}) nor a .toml file",
                presets::names().collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

/// Decides what one dead letter becomes.
fn plan(
    s: &Settings,
    letter: &Letter,
    dlq_coords: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> Plan {
    let replayed = (H_REPLAYED_FROM, dlq_coords.as_bytes().to_vec());
    if let Some(mapping) = &s.mapping {
        let src = SourceRef {
            topic: &letter.topic,
            partition: letter.partition.unwrap_or(-1),
            offset: letter.offset.unwrap_or(-1),
        };
        let now = chrono::Utc::now().timestamp_millis();
        let result = match &letter.entry_id {
            Some(id) if !id.is_empty() => {
                let fallback = format!("{}/{id}", letter.topic);
                normalize_with_id(mapping, payload, src, Some(&fallback), usize::MAX, now)
            }
            _ => normalize(mapping, payload, src, usize::MAX, now),
        };
        return match result {
            Ok(event) => Plan::Send {
                topic: s.events_topic.clone(),
                key: Some(event.subject_key().as_bytes().to_vec()),
                headers: vec![
                    (
                        H_KIND,
                        event.kind().map(|k| k.as_str()).unwrap_or("").into(),
                    ),
                    replayed,
                ],
                payload: Some(event.encode_to_vec()),
            },
            Err(r) => Plan::StillRejected {
                reason: r.reason.code().to_owned(),
                detail: r.detail,
            },
        };
    }
    let topic = match &s.to {
        Some(t) => t.clone(),
        None if letter.is_from_redis() => return Plan::NeedsTo,
        None => letter.topic.clone(),
    };
    let mut headers = vec![replayed];
    if let (Some(p), Some(o)) = (letter.partition, letter.offset)
        && !letter.is_from_redis()
    {
        headers.push((H_ORIGINAL_TOPIC, letter.topic.as_bytes().to_vec()));
        headers.push((H_ORIGINAL_PARTITION, p.to_string().into_bytes()));
        headers.push((H_ORIGINAL_OFFSET, o.to_string().into_bytes()));
    }
    Plan::Send {
        topic,
        key: key.map(<[u8]>::to_vec),
        payload: payload.map(<[u8]>::to_vec),
        headers,
    }
}

fn header_pairs<'a>(msg: &'a BorrowedMessage<'a>) -> Vec<(&'a str, &'a [u8])> {
    msg.headers()
        .map(|hs| {
            hs.iter()
                .filter_map(|h| h.value.map(|v| (h.key, v)))
                .collect()
        })
        .unwrap_or_default()
}

async fn replay(kafka_args: &KafkaArgs, args: &ReplayArgs) -> anyhow::Result<()> {
    let zone: chrono_tz::Tz = args
        .time_zone
        .parse()
        .map_err(|_| anyhow::anyhow!("unknown --time-zone {:?}", args.time_zone))?;
    let settings = Settings {
        mapping: args
            .normalize
            .as_deref()
            .map(|m| load_mapping(m, zone))
            .transpose()?,
        to: args.to.as_deref().map(|t| kafka_args.topic(t)),
        events_topic: kafka_args.topic(&args.events_topic),
    };
    let dlq_topic = kafka_args.topic(&args.dlq_topic);
    let source_topics: Vec<String> = args
        .source_topics
        .iter()
        .map(|t| kafka_args.topic(t))
        .collect();

    let consumer: BaseConsumer = kafka::reader_config(kafka_args)?
        .create()
        .context("cannot create Kafka consumer")?;
    let timeout = Duration::from_secs(10);
    let md = consumer.fetch_metadata(Some(&dlq_topic), timeout)?;
    let Some(t) = md
        .topics()
        .iter()
        .find(|t| t.name() == dlq_topic && t.error().is_none() && !t.partitions().is_empty())
    else {
        bail!("topic {dlq_topic} does not exist");
    };
    // Read each partition from the start (or --from-offset) to its end now.
    let mut tpl = TopicPartitionList::new();
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for p in t.partitions() {
        if args.partition.is_some_and(|only| only != p.id()) {
            continue;
        }
        let (lo, hi) = consumer.fetch_watermarks(&dlq_topic, p.id(), timeout)?;
        let start = args.from_offset.unwrap_or(lo).max(lo);
        let end = args.to_offset.map_or(hi, |t| (t + 1).min(hi));
        if end > start {
            tpl.add_partition_offset(&dlq_topic, p.id(), Offset::Offset(start))?;
            ends.insert(p.id(), end);
        }
    }

    let producer: Option<FutureProducer> = if args.dry_run {
        None
    } else {
        Some(kafka::producer_config(kafka_args)?.create()?)
    };
    let mut in_flight = FuturesUnordered::new();
    let mut sent: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    let mut still: BTreeMap<String, u64> = BTreeMap::new();
    let (mut matched, mut skipped, mut needs_to, mut failed) = (0u64, 0u64, 0u64, 0u64);

    if !ends.is_empty() {
        consumer.assign(&tpl)?;
    }
    let mut idle = 0;
    while !ends.is_empty() && args.max.is_none_or(|m| matched < m) {
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
            idle += 1;
            if idle > 60 {
                bail!("no record from {dlq_topic} for 30 s before its end; try again");
            }
            continue;
        };
        idle = 0;
        let msg = msg?;
        let (p, o) = (msg.partition(), msg.offset());
        let Some(end) = ends.get(&p).copied() else {
            continue;
        };
        if o + 1 >= end {
            ends.remove(&p);
        }
        if o >= end {
            continue;
        }
        let letter = Letter::from_headers(header_pairs(&msg));
        let keep = (args.reasons.is_empty() || args.reasons.contains(&letter.reason))
            && (source_topics.is_empty() || source_topics.contains(&letter.topic))
            && (args.stage == "any" || args.stage == letter.stage);
        if !keep {
            skipped += 1;
            continue;
        }
        matched += 1;
        let coords = format!("{dlq_topic}/{p}/{o}");
        match plan(&settings, &letter, &coords, msg.key(), msg.payload()) {
            Plan::NeedsTo => needs_to += 1,
            Plan::StillRejected { reason, detail } => {
                if still.values().sum::<u64>() < 5 {
                    eprintln!(
                        "still rejected: {coords} ({}): {reason}: {detail}",
                        letter.topic
                    );
                }
                *still.entry(reason).or_default() += 1;
            }
            Plan::Send {
                topic,
                key,
                payload,
                headers,
            } => {
                *sent.entry(topic.clone()).or_default() += 1;
                *by_reason.entry(letter.reason.clone()).or_default() += 1;
                let Some(producer) = &producer else {
                    continue;
                };
                let mut hs = OwnedHeaders::new_with_capacity(headers.len());
                for (k, v) in &headers {
                    hs = hs.insert(Header {
                        key: k,
                        value: Some(v),
                    });
                }
                let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(hs);
                if let Some(k) = &key {
                    record = record.key(k);
                }
                if let Some(v) = &payload {
                    record = record.payload(v);
                }
                // Enqueue, waiting for deliveries when the queue is full.
                loop {
                    match producer.send_result(record) {
                        Ok(f) => {
                            in_flight.push(f);
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            if let Some(d) = in_flight.next().await
                                && !matches!(d, Ok(Ok(_)))
                            {
                                failed += 1;
                            }
                        }
                        Err((e, _)) => {
                            eprintln!("cannot replay {coords} to {topic}: {e}");
                            failed += 1;
                            break;
                        }
                    }
                }
            }
        }
    }
    while let Some(d) = in_flight.next().await {
        if !matches!(d, Ok(Ok(_))) {
            failed += 1;
        }
    }

    let verb = if args.dry_run {
        "would replay"
    } else {
        "replayed"
    };
    let total: u64 = sent.values().sum();
    println!(
        "{verb} {total} of {matched} matching dead letters ({skipped} did not match the filters)"
    );
    for (topic, n) in &sent {
        println!("  to {topic}: {n}");
    }
    for (reason, n) in &by_reason {
        println!("  reason {reason}: {n}");
    }
    for (reason, n) in &still {
        println!("  still rejected by the --normalize mapping ({reason}): {n} (left in the DLQ)");
    }
    if needs_to > 0 {
        println!(
            "  from a Redis stream, skipped: {needs_to} (give --to TOPIC or --normalize MAPPING)"
        );
    }
    if failed > 0 {
        bail!(
            "{failed} replayed records were not acknowledged by Kafka; run the replay again (ids are kept)"
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vidpulse_proto::Event;

    fn letter_headers() -> Vec<(&'static str, &'static [u8])> {
        vec![
            (dlq::H_REASON, b"unknown_event_type"),
            (dlq::H_DETAIL, b"no rule"),
            (dlq::H_STAGE, b"ingest"),
            (dlq::H_TOPIC, b"p.user_actions"),
            (dlq::H_PARTITION, b"2"),
            (dlq::H_OFFSET, b"17"),
        ]
    }

    fn raw_settings() -> Settings {
        Settings {
            mapping: None,
            to: None,
            events_topic: "p.vp.events.v1".into(),
        }
    }

    const ORDER: &[u8] = br#"{"type":"order","timestamp":1732200000}"#;

    #[test]
    fn a_raw_replay_keeps_key_bytes_and_points_at_the_original() {
        let l = Letter::from_headers(letter_headers());
        let p = plan(
            &raw_settings(),
            &l,
            "p.vp.dlq.v1/0/3",
            Some(b"k"),
            Some(ORDER),
        );
        let Plan::Send {
            topic,
            key,
            payload,
            headers,
        } = p
        else {
            panic!("{p:?}")
        };
        assert_eq!(topic, "p.user_actions");
        assert_eq!(key.as_deref(), Some(b"k".as_slice()));
        assert_eq!(payload.as_deref(), Some(ORDER));
        let h: BTreeMap<&str, &[u8]> = headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        assert_eq!(h[H_REPLAYED_FROM], b"p.vp.dlq.v1/0/3");
        assert_eq!(h[H_ORIGINAL_TOPIC], b"p.user_actions");
        assert_eq!(h[H_ORIGINAL_PARTITION], b"2");
        assert_eq!(h[H_ORIGINAL_OFFSET], b"17");
        // Ingest derives the original id from these headers.
        let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        assert_eq!(
            vidpulse_ingest::normalize::original_id(pairs).as_deref(),
            Some("p.user_actions/2/17")
        );
    }

    #[test]
    fn a_replay_rejected_again_still_points_at_the_first_read() {
        let mut hs = letter_headers();
        hs.push((H_ORIGINAL_TOPIC, b"p.user_actions"));
        hs.push((H_ORIGINAL_PARTITION, b"0"));
        hs.push((H_ORIGINAL_OFFSET, b"4"));
        let l = Letter::from_headers(hs);
        assert_eq!(
            (l.topic.as_str(), l.partition, l.offset),
            ("p.user_actions", Some(0), Some(4))
        );
    }

    #[test]
    fn normalized_replays_keep_the_original_id_and_report_rejects() {
        let l = Letter::from_headers(letter_headers());
        let s = Settings {
            mapping: Some(load_mapping("user_actions", chrono_tz::Asia::Shanghai).unwrap()),
            ..raw_settings()
        };
        let Plan::Send {
            topic,
            payload,
            headers,
            ..
        } = plan(&s, &l, "d/0/3", None, Some(ORDER))
        else {
            panic!()
        };
        assert_eq!(topic, "p.vp.events.v1");
        let ev = Event::decode(payload.as_deref().unwrap()).unwrap();
        assert_eq!(ev.event_id, "p.user_actions/2/17");
        assert_eq!(headers[0], (H_KIND, b"user_action".to_vec()));
        // Twice: the same event.
        let Plan::Send { payload: again, .. } = plan(&s, &l, "d/0/3", None, Some(ORDER)) else {
            panic!()
        };
        let again = Event::decode(again.as_deref().unwrap()).unwrap();
        assert_eq!(again.event_id, ev.event_id);

        let bad = plan(
            &s,
            &l,
            "d/0/4",
            None,
            Some(br#"{"type":"hug","timestamp":1732200000}"#),
        );
        assert!(
            matches!(bad, Plan::StillRejected { ref reason, .. } if reason == "unknown_event_type"),
            "{bad:?}"
        );
    }

    #[test]
    fn redis_letters_need_a_target_or_a_mapping() {
        let mut hs = letter_headers();
        hs.push((H_SOURCE_KIND, b"redis-stream"));
        hs.push((H_SOURCE_ENTRY_ID, b"1732200000000-1"));
        let l = Letter::from_headers(hs);
        assert_eq!(
            plan(&raw_settings(), &l, "d/0/1", None, Some(ORDER)),
            Plan::NeedsTo
        );
        let s = Settings {
            mapping: Some(load_mapping("user_actions", chrono_tz::Asia::Shanghai).unwrap()),
            ..raw_settings()
        };
        let Plan::Send { payload, .. } = plan(&s, &l, "d/0/1", None, Some(ORDER)) else {
            panic!()
        };
        let ev = Event::decode(payload.as_deref().unwrap()).unwrap();
        assert_eq!(ev.event_id, "p.user_actions/1732200000000-1");
        let to = Settings {
            to: Some("p.user_actions".into()),
            ..raw_settings()
        };
        let Plan::Send { topic, headers, .. } = plan(&to, &l, "d/0/1", None, Some(ORDER)) else {
            panic!()
        };
        assert_eq!(topic, "p.user_actions");
        assert_eq!(
            headers.len(),
            1,
            "no original coordinates for a stream entry"
        );
    }
}
