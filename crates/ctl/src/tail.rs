//! `vidpulse tail <topic>`: prints records as JSON lines, one object per
//! record with `topic`, `partition`, `offset`, `timestamp`, `key`, `headers`
//! and `value`. Pipeline topics are decoded (protobuf events as JSON); DLQ
//! records show their original payload as text when it is UTF-8, else
//! base64 (`value_encoding` says which). Reads without a consumer group, so
//! it never disturbs a stage.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use clap::Args;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Map, Value, json};
use vidpulse_core::config::KafkaArgs;
use vidpulse_core::{kafka, topics, watermark};
use vidpulse_proto::{Event, Message as _, MonitoredEvent, Watermark};

#[derive(Args)]
pub struct TailArgs {
    /// Topic name (without the prefix).
    topic: String,
    /// Start at the earliest record; stops at the current end unless
    /// --follow. Without it, tail starts at the end and follows.
    #[arg(long)]
    from_beginning: bool,
    /// Keep waiting for new records.
    #[arg(long)]
    follow: bool,
    /// Stop after this many records.
    #[arg(long)]
    max: Option<u64>,
    /// Print only the last N records of each partition, then stop (unless
    /// --follow).
    #[arg(long, conflicts_with = "from_beginning")]
    last: Option<i64>,
    /// Only this partition.
    #[arg(long)]
    partition: Option<i32>,
    /// Print the value as stored (no decoding).
    #[arg(long)]
    raw: bool,
    /// Also print control records (in-band watermarks, header `vp.control`),
    /// decoded; by default they are skipped.
    #[arg(long)]
    control: bool,
}

#[derive(Clone, Copy)]
enum Decode {
    Event,
    Monitored,
    Text,
    Json,
}

fn decoder(topic: &str, raw: bool) -> Decode {
    if raw {
        Decode::Text
    } else if topic == topics::EVENTS || topic == topics::LATE {
        Decode::Event
    } else if topic == topics::MONITORED {
        Decode::Monitored
    } else if topic == topics::DLQ || topic.starts_with("vp.pool.") {
        Decode::Text
    } else {
        Decode::Json
    }
}

pub async fn run(kafka_args: &KafkaArgs, args: TailArgs) -> anyhow::Result<()> {
    let kafka_args = kafka_args.clone();
    tokio::task::spawn_blocking(move || tail(&kafka_args, &args)).await?
}

fn tail(kafka_args: &KafkaArgs, args: &TailArgs) -> anyhow::Result<()> {
    let full = kafka_args.topic(&args.topic);
    let consumer: BaseConsumer = kafka::reader_config(kafka_args)?
        .create()
        .context("cannot create Kafka consumer")?;
    let md = consumer.fetch_metadata(Some(&full), Duration::from_secs(10))?;
    let Some(t) = md
        .topics()
        .iter()
        .find(|t| t.name() == full && t.error().is_none() && !t.partitions().is_empty())
    else {
        bail!("topic {full} does not exist (create it with `vidpulse topics create`)");
    };
    let follow = args.follow || !(args.from_beginning || args.last.is_some());
    let mut tpl = TopicPartitionList::new();
    // Partition → end offset at start; reading stops when all are reached.
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for p in t.partitions() {
        if args.partition.is_some_and(|only| only != p.id()) {
            continue;
        }
        let (lo, hi) = consumer.fetch_watermarks(&full, p.id(), Duration::from_secs(10))?;
        let start = match args.last {
            Some(n) if args.control => (hi - n.max(0)).max(lo),
            Some(n) => last_data_start(kafka_args, &full, p.id(), lo, hi, n.max(0))?,
            None if args.from_beginning => lo,
            None => hi,
        };
        tpl.add_partition_offset(&full, p.id(), Offset::Offset(start))?;
        if hi > start {
            ends.insert(p.id(), hi);
        }
    }
    if tpl.count() == 0 {
        bail!(
            "topic {full} has no partition {}",
            args.partition.unwrap_or(-1)
        );
    }
    consumer.assign(&tpl)?;
    let decode = decoder(&args.topic, args.raw);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    let mut last_flush = Instant::now();
    loop {
        if args.max.is_some_and(|m| printed >= m) || (!follow && ends.is_empty()) {
            break;
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(msg)) => {
                if let Some(end) = ends.get(&msg.partition())
                    && msg.offset() + 1 >= *end
                {
                    ends.remove(&msg.partition());
                }
                if is_control(&msg) && !args.control {
                    continue;
                }
                let line = render(&msg, &args.topic, decode);
                if writeln!(out, "{line}").is_err() {
                    return Ok(()); // stdout closed (e.g. piped to head)
                }
                printed += 1;
            }
            Some(Err(e)) => eprintln!("vidpulse tail: {e}"),
            None => {}
        }
        if last_flush.elapsed() > Duration::from_millis(200) {
            let _ = out.flush();
            last_flush = Instant::now();
        }
    }
    let _ = out.flush();
    Ok(())
}

/// Whether a record is a control record (an in-band watermark).
pub fn is_control(msg: &BorrowedMessage<'_>) -> bool {
    msg.headers()
        .is_some_and(|hs| hs.iter().any(|h| h.key == watermark::CONTROL_HEADER))
}

/// The offset from which partition `p` holds its last `n` data records
/// (control records in between are skipped when printing): scans back in
/// growing steps.
fn last_data_start(
    kafka_args: &KafkaArgs,
    topic: &str,
    p: i32,
    lo: i64,
    hi: i64,
    n: i64,
) -> anyhow::Result<i64> {
    if n == 0 {
        return Ok(hi);
    }
    let reader: BaseConsumer = kafka::reader_config(kafka_args)?.create()?;
    let mut step = (n * 4).max(256);
    loop {
        let start = (hi - step).max(lo);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(start))?;
        reader.assign(&tpl)?;
        let mut data: Vec<i64> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut next = start;
        while next < hi && Instant::now() < deadline {
            if let Some(Ok(msg)) = reader.poll(Duration::from_millis(200)) {
                next = msg.offset() + 1;
                if !is_control(&msg) {
                    data.push(msg.offset());
                }
            }
        }
        if data.len() as i64 >= n || start == lo {
            let k = data.len().saturating_sub(n as usize);
            return Ok(data.get(k).copied().unwrap_or(hi));
        }
        step *= 4;
    }
}

fn bytes_to_value(b: &[u8]) -> (Value, &'static str) {
    match std::str::from_utf8(b) {
        Ok(s) => (Value::String(s.to_owned()), "text"),
        Err(_) => (
            Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
            "base64",
        ),
    }
}

/// Decodes a canonical event into JSON with its kind.
pub fn event_json(bytes: &[u8]) -> Result<Value, String> {
    let ev = Event::decode(bytes).map_err(|e| format!("not a vidpulse event: {e}"))?;
    let mut v = serde_json::to_value(&ev).map_err(|e| e.to_string())?;
    if let (Value::Object(m), Some(k)) = (&mut v, ev.kind()) {
        m.insert("kind".into(), Value::String(k.as_str().into()));
    }
    Ok(v)
}

/// Decodes a monitored event: the event (with its kind), pools, enrichment.
pub fn monitored_json(bytes: &[u8]) -> Result<Value, String> {
    let m = MonitoredEvent::decode(bytes).map_err(|e| format!("not a monitored event: {e}"))?;
    let mut v = serde_json::to_value(&m).map_err(|e| e.to_string())?;
    if let (Some(ev), Some(k)) = (
        v.get_mut("event").and_then(Value::as_object_mut),
        m.event.as_ref().and_then(Event::kind),
    ) {
        ev.insert("kind".into(), Value::String(k.as_str().into()));
    }
    Ok(v)
}

fn render(msg: &BorrowedMessage<'_>, topic: &str, decode: Decode) -> Value {
    let mut o = Map::new();
    o.insert("topic".into(), json!(topic));
    o.insert("partition".into(), json!(msg.partition()));
    o.insert("offset".into(), json!(msg.offset()));
    o.insert("timestamp".into(), json!(msg.timestamp().to_millis()));
    o.insert(
        "key".into(),
        msg.key()
            .map(|k| bytes_to_value(k).0)
            .unwrap_or(Value::Null),
    );
    let mut headers = Map::new();
    if let Some(hs) = msg.headers() {
        for h in hs.iter() {
            headers.insert(
                h.key.to_owned(),
                h.value.map(|v| bytes_to_value(v).0).unwrap_or(Value::Null),
            );
        }
    }
    o.insert("headers".into(), Value::Object(headers));
    let control = is_control(msg);
    let (value, encoding) = match (msg.payload(), decode) {
        (None, _) => (Value::Null, "null"),
        (Some(b), _) if control => match Watermark::decode(b) {
            Ok(w) => (serde_json::to_value(&w).unwrap_or(Value::Null), "watermark"),
            Err(_) => bytes_to_value(b),
        },
        (Some(b), Decode::Event) => match event_json(b) {
            Ok(v) => (v, "event"),
            Err(_) => bytes_to_value(b),
        },
        (Some(b), Decode::Monitored) => match monitored_json(b) {
            Ok(v) => (v, "monitored_event"),
            Err(_) => bytes_to_value(b),
        },
        (Some(b), Decode::Json) => match serde_json::from_slice::<Value>(b) {
            Ok(v) => (v, "json"),
            Err(_) => bytes_to_value(b),
        },
        (Some(b), Decode::Text) => bytes_to_value(b),
    };
    o.insert("value".into(), value);
    o.insert("value_encoding".into(), json!(encoding));
    Value::Object(o)
}
