//! The ingest processor: raw bytes → canonical protobuf event keyed by its
//! subject id, or → the dead-letter topic with the original key and bytes
//! and a reason. Every input yields exactly one output, so nothing is lost.
//!
//! A record re-driven from the DLQ by `vidpulse dlq replay` carries
//! `vp.original.topic/partition/offset` headers; its source-derived event id
//! is then taken from those coordinates, so it keeps the id it would have had
//! the first time and a second replay does not count it twice.

use std::collections::HashMap;
use std::sync::Arc;

use metrics::{Counter, counter};
use serde_json::Value;
use serde_json::error::Category;
use vidpulse_core::runtime::{Output, Outputs, Record, Stage, StageError};
use vidpulse_core::{dlq, metrics as m};
use vidpulse_proto::{Event, Message};

use crate::mapping::{Doc, Mapping, SourceRef, doc};
use crate::reject::{Reason, Reject};

/// Header on every normalized event naming its kind (readable in console tools).
pub const H_KIND: &str = "vp.kind";

/// JSON nested deeper than this is rejected (`nesting_too_deep`).
pub const MAX_NESTING: usize = 128;

/// Checks a raw payload and parses it as a JSON object.
pub fn parse_payload(payload: Option<&[u8]>, max_bytes: usize) -> Result<Doc<'_>, Reject> {
    let bytes = match payload {
        None | Some([]) => return Err(Reject::new(Reason::EmptyPayload, "record has no value")),
        Some(b) => b,
    };
    if bytes.len() > max_bytes {
        return Err(Reject::new(
            Reason::PayloadTooLarge,
            format!(
                "payload is {} bytes, over the {max_bytes}-byte limit (--max-payload-bytes)",
                bytes.len()
            ),
        ));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Reject::new(Reason::InvalidUtf8, format!("payload is not UTF-8: {e}")))?;
    if doc::nesting_exceeds(bytes, MAX_NESTING) {
        return Err(Reject::new(
            Reason::NestingTooDeep,
            format!("payload nests arrays/objects deeper than {MAX_NESTING} levels"),
        ));
    }
    if !text.trim_start().starts_with('{') {
        // Not an object: say what it is, or why it is not JSON.
        return Err(match serde_json::from_str::<Value>(text) {
            Ok(v) => {
                let what = match v {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    Value::Bool(_) => "a boolean",
                    _ => "null",
                };
                Reject::new(
                    Reason::NotAnObject,
                    format!("payload is {what}, not a JSON object"),
                )
            }
            Err(e) => json_error(&e),
        });
    }
    Doc::parse(text).map_err(|e| json_error(&e))
}

fn json_error(e: &serde_json::Error) -> Reject {
    let reason = if e.classify() == Category::Eof {
        Reason::TruncatedJson
    } else {
        Reason::InvalidJson
    };
    Reject::new(reason, format!("payload is not valid JSON: {e}"))
}

/// Header of a replayed raw record: the topic it was first read from.
pub const H_ORIGINAL_TOPIC: &str = "vp.original.topic";
/// Header of a replayed raw record: the partition it was first read from.
pub const H_ORIGINAL_PARTITION: &str = "vp.original.partition";
/// Header of a replayed raw record: the offset it was first read from.
pub const H_ORIGINAL_OFFSET: &str = "vp.original.offset";

/// The event id derived from where a record was read (used when the record
/// carries no id of its own): `<topic>/<partition>/<offset>`.
pub fn source_id(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}/{partition}/{offset}")
}

/// The source-derived id a replayed record keeps: `<topic>/<partition>/<offset>`
/// from its `vp.original.*` headers, when all three are present and well
/// formed (else `None`: the record is treated as a new one).
pub fn original_id<'a>(headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Option<String> {
    let (mut topic, mut partition, mut offset) = (None, None, None);
    for (k, v) in headers {
        let v = std::str::from_utf8(v).ok();
        match k {
            H_ORIGINAL_TOPIC => topic = v.filter(|t| !t.is_empty()),
            H_ORIGINAL_PARTITION => partition = v.and_then(|p| p.parse::<i32>().ok()),
            H_ORIGINAL_OFFSET => offset = v.and_then(|o| o.parse::<i64>().ok()),
            _ => {}
        }
    }
    Some(source_id(topic?, partition?, offset?))
}

/// Normalizes one raw record with `mapping`.
pub fn normalize(
    mapping: &Mapping,
    payload: Option<&[u8]>,
    src: SourceRef<'_>,
    max_bytes: usize,
    now_ms: i64,
) -> Result<Event, Reject> {
    let doc = parse_payload(payload, max_bytes)?;
    mapping.apply(&doc, src, now_ms)
}

/// Like [`normalize`], but a record without an id of its own gets
/// `fallback_id` instead of the id derived from `src` (a replayed record's
/// original coordinates, a Redis stream entry id). An id the record carries
/// always wins.
pub fn normalize_with_id(
    mapping: &Mapping,
    payload: Option<&[u8]>,
    src: SourceRef<'_>,
    fallback_id: Option<&str>,
    max_bytes: usize,
    now_ms: i64,
) -> Result<Event, Reject> {
    let mut event = normalize(mapping, payload, src, max_bytes, now_ms)?;
    if let Some(id) = fallback_id
        && event.event_id == source_id(src.topic, src.partition, src.offset)
    {
        id.clone_into(&mut event.event_id);
    }
    Ok(event)
}

/// The ingest stage: every raw record becomes exactly one output, its
/// event or its dead letter.
pub struct Normalizer {
    /// Full (prefixed) raw topic → mapping.
    mappings: HashMap<String, Arc<Mapping>>,
    events_topic: String,
    dlq_topic: String,
    max_payload_bytes: usize,
    /// An event time further than this after its record's Kafka timestamp
    /// is a bad clock: `time_in_future`.
    max_future_ms: i64,
    dlq_counters: HashMap<Reason, Counter>,
}

impl Normalizer {
    pub fn new(
        mappings: HashMap<String, Arc<Mapping>>,
        events_topic: String,
        dlq_topic: String,
        max_payload_bytes: usize,
        max_future_ms: i64,
    ) -> Self {
        let dlq_counters = Reason::ALL
            .into_iter()
            .map(|r| {
                (
                    r,
                    counter!(m::RECORDS_DLQ, "stage" => "ingest", "reason" => r.code()),
                )
            })
            .collect();
        Self {
            mappings,
            events_topic,
            dlq_topic,
            max_payload_bytes,
            max_future_ms,
            dlq_counters,
        }
    }
}

impl Normalizer {
    /// Normalizes one raw record: its event, or its dead letter. A record
    /// replayed from the DLQ (`vp.original.*` headers) keeps its original
    /// source-derived id.
    pub fn normalize_record(&mut self, input: &Record<'_>) -> Output {
        self.normalize_timed(input).0
    }

    /// [`Self::normalize_record`], with the event's time when it is one.
    pub fn normalize_timed(&mut self, input: &Record<'_>) -> (Output, Option<i64>) {
        let headers = input.headers;
        let original = if headers.is_empty() {
            None
        } else {
            original_id(headers.iter())
        };
        let (mut out, time) = self.normalize_as(input, original.as_deref());
        // Rejected again: the dead letter keeps pointing at the first read,
        // so a later replay still gets the original id.
        if original.is_some() && out.topic == self.dlq_topic {
            for (k, v) in headers.iter() {
                if let Some(name) = [H_ORIGINAL_TOPIC, H_ORIGINAL_PARTITION, H_ORIGINAL_OFFSET]
                    .into_iter()
                    .find(|n| *n == k)
                {
                    out.headers.push((name, v.to_vec()));
                }
            }
        }
        (out, time)
    }

    fn normalize_as(
        &mut self,
        input: &Record<'_>,
        fallback_id: Option<&str>,
    ) -> (Output, Option<i64>) {
        let src = SourceRef {
            topic: input.topic,
            partition: input.partition,
            offset: input.offset,
        };
        let result = match self.mappings.get(input.topic) {
            Some(mapping) => normalize_with_id(
                mapping,
                input.payload,
                src,
                fallback_id,
                self.max_payload_bytes,
                now_ms(),
            ),
            None => Err(Reject::new(
                Reason::NoMapping,
                format!("no mapping for topic {}", input.topic),
            )),
        };
        let result = result.and_then(|e| check_clock(e, input.timestamp_ms, self.max_future_ms));
        match result {
            Ok(event) => {
                let mut buf = Vec::with_capacity(event.encoded_len());
                // Encoding into a Vec cannot fail (it grows as needed).
                let _ = event.encode(&mut buf);
                let kind = event.kind().map(|k| k.as_str()).unwrap_or("");
                let out = Output {
                    topic: self.events_topic.clone(),
                    key: Some(event.subject_key().as_bytes().to_vec()),
                    payload: Some(buf),
                    headers: vec![(H_KIND, kind.as_bytes().to_vec())],
                };
                (out, Some(event.event_time_ms))
            }
            Err(reject) => {
                if let Some(c) = self.dlq_counters.get(&reject.reason) {
                    c.increment(1);
                }
                tracing::debug!(topic = input.topic, partition = input.partition, offset = input.offset, %reject, "Rejected.");
                let out = dlq::record(
                    &self.dlq_topic,
                    "ingest",
                    input,
                    reject.reason.code(),
                    &reject.detail,
                );
                (out, None)
            }
        }
    }
}

/// A clock gone wrong: an event time more than `max_future_ms` after the
/// time its record was written (its Kafka timestamp, or a Redis stream
/// entry's id), so that a replay decides the same. Records without a
/// timestamp are not checked.
pub fn check_clock(
    event: Event,
    written_ms: Option<i64>,
    max_future_ms: i64,
) -> Result<Event, Reject> {
    match written_ms {
        Some(w) if w > 0 && event.event_time_ms > w.saturating_add(max_future_ms) => {
            Err(Reject::new(
                Reason::TimeInFuture,
                format!(
                    "event time {} ms is {} s after the record was written ({} ms); more than --max-future allows",
                    event.event_time_ms,
                    (event.event_time_ms - w) / 1000,
                    w
                ),
            ))
        }
        _ => Ok(event),
    }
}

impl Stage for Normalizer {
    async fn process(&mut self, batch: &[Record<'_>], out: &mut Outputs) -> Result<(), StageError> {
        for (i, r) in batch.iter().enumerate() {
            let (o, time) = self.normalize_timed(r);
            out.push(i, o);
            if let Some(t) = time {
                out.event_time(i, t);
            }
        }
        Ok(())
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::presets::preset;
    use vidpulse_core::runtime::Headers;

    const LIKE: &[u8] = br#"{"type":"like","timestamp":"1732200000.5","user_id":"u-5"}"#;

    fn normalizer() -> Normalizer {
        let m = Arc::new(
            preset("user_actions", chrono_tz::Asia::Shanghai)
                .unwrap()
                .unwrap(),
        );
        let mut mappings = HashMap::new();
        mappings.insert("p.user_actions".to_owned(), m);
        Normalizer::new(
            mappings,
            "p.vp.events.v1".into(),
            "p.vp.dlq.v1".into(),
            1 << 20,
            300_000,
        )
    }

    fn input(payload: &[u8], offset: i64) -> Record<'_> {
        Record {
            key: Some(b"k"),
            ..Record::detached("p.user_actions", 3, offset, Some(payload))
        }
    }

    fn event_id(out: &Output) -> String {
        assert_eq!(out.topic, "p.vp.events.v1", "{out:?}");
        Event::decode(out.payload.as_deref().unwrap())
            .unwrap()
            .event_id
    }

    #[test]
    fn original_id_needs_all_three_well_formed_headers() {
        let h = |t: &'static str, p: &'static str, o: &'static str| {
            vec![
                (H_ORIGINAL_TOPIC, t.as_bytes()),
                (H_ORIGINAL_PARTITION, p.as_bytes()),
                (H_ORIGINAL_OFFSET, o.as_bytes()),
                ("other", b"x".as_slice()),
            ]
        };
        assert_eq!(original_id(h("raw", "1", "7")).as_deref(), Some("raw/1/7"));
        assert_eq!(original_id(h("raw", "x", "7")), None);
        assert_eq!(original_id(h("raw", "1", "")), None);
        assert_eq!(original_id(h("", "1", "7")), None);
        assert_eq!(original_id(h("raw", "1", "7").into_iter().skip(1)), None);
    }

    #[test]
    fn a_replayed_record_keeps_its_original_source_derived_id() {
        let mut n = normalizer();
        let out = n.normalize_record(&input(LIKE, 40));
        assert_eq!(event_id(&out), "p.user_actions/3/40");

        // The same bytes re-driven to offset 90 with replay headers.
        let headers: Vec<(&str, &[u8])> = vec![
            ("vp.replayed-from", b"p.vp.dlq.v1/0/5"),
            (H_ORIGINAL_TOPIC, b"p.user_actions"),
            (H_ORIGINAL_PARTITION, b"1"),
            (H_ORIGINAL_OFFSET, b"12"),
        ];
        let out = n.normalize_record(&Record {
            headers: Headers::Pairs(&headers),
            ..input(LIKE, 90)
        });
        assert_eq!(event_id(&out), "p.user_actions/1/12");
        let ev = Event::decode(out.payload.as_deref().unwrap()).unwrap();
        assert_eq!(
            ev.source.unwrap().offset,
            90,
            "source says where it was read"
        );

        // Without the headers it is a new record.
        let out = n.normalize_record(&input(LIKE, 90));
        assert_eq!(event_id(&out), "p.user_actions/3/90");
    }

    #[test]
    fn an_event_time_far_after_its_records_timestamp_is_a_bad_clock() {
        let mut n = normalizer();
        // 1732200000.5 s: on time for a record written then, or a minute later.
        let written = 1_732_200_000_000;
        let rec = |ts: i64| Record {
            timestamp_ms: Some(ts),
            ..input(LIKE, 7)
        };
        let (out, t) = n.normalize_timed(&rec(written + 60_000));
        assert_eq!(out.topic, "p.vp.events.v1");
        assert_eq!(t, Some(1_732_200_000_500));
        // Written 10 minutes before its event time says: a clock gone wrong.
        let (out, t) = n.normalize_timed(&rec(written - 600_000));
        assert_eq!(out.topic, "p.vp.dlq.v1");
        assert_eq!(t, None, "a dead letter moves no watermark");
        let reason = out
            .headers
            .iter()
            .find(|(k, _)| *k == dlq::H_REASON)
            .unwrap();
        assert_eq!(reason.1, b"time_in_future");
        // Replayed, it is judged by the same timestamp: the same verdict.
        let (again, _) = n.normalize_timed(&rec(written - 600_000));
        assert_eq!(again, out);
    }

    #[test]
    fn an_id_in_the_payload_wins_over_replay_headers() {
        let mut n = normalizer();
        let own = br#"{"type":"like","timestamp":1732200000,"event_id":"e-1"}"#;
        let headers: Vec<(&str, &[u8])> = vec![
            (H_ORIGINAL_TOPIC, b"p.user_actions"),
            (H_ORIGINAL_PARTITION, b"1"),
            (H_ORIGINAL_OFFSET, b"12"),
        ];
        let out = n.normalize_record(&Record {
            headers: Headers::Pairs(&headers),
            ..input(own, 90)
        });
        assert_eq!(event_id(&out), "e-1");
    }

    #[test]
    fn a_rejected_replay_goes_to_the_dlq_with_its_new_coordinates() {
        let mut n = normalizer();
        let headers: Vec<(&str, &[u8])> = vec![
            (H_ORIGINAL_TOPIC, b"p.user_actions"),
            (H_ORIGINAL_PARTITION, b"1"),
            (H_ORIGINAL_OFFSET, b"12"),
        ];
        let out = n.normalize_record(&Record {
            headers: Headers::Pairs(&headers),
            ..input(b"{}", 90)
        });
        assert_eq!(out.topic, "p.vp.dlq.v1");
        let h = |name: &str| {
            out.headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            h(vidpulse_core::dlq::H_OFFSET).as_deref(),
            Some(b"90".as_slice())
        );
        assert_eq!(h(H_ORIGINAL_OFFSET).as_deref(), Some(b"12".as_slice()));
        assert_eq!(
            h(H_ORIGINAL_TOPIC).as_deref(),
            Some(b"p.user_actions".as_slice())
        );
    }
}
