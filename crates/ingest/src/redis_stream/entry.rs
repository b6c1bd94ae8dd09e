//! One stream entry: its fields as a JSON object of strings, and the
//! record it becomes (its event, or a dead letter naming the entry).

use metrics::counter;
use redis::streams::StreamId;
use serde_json::{Map, Value};
use vidpulse_core::runtime::{Output, Record};
use vidpulse_core::{dlq, metrics as m};
use vidpulse_proto::Message as _;

use super::{H_SOURCE_ENTRY_ID, H_SOURCE_KIND, StreamSpec};
use crate::mapping::SourceRef;
use crate::normalize::{H_KIND, check_clock, normalize_with_id};

/// The record one stream entry becomes: its event, or a dead letter.
pub fn entry_output(
    spec: &StreamSpec,
    entry: &StreamId,
    events_topic: &str,
    dlq_topic: &str,
    max_payload_bytes: usize,
    max_future_ms: i64,
    now_ms: i64,
) -> Output {
    let (json, non_utf8) = entry_json(entry);
    let src = SourceRef {
        topic: &spec.key,
        partition: -1,
        offset: -1,
    };
    let fallback_id = format!("{}/{}", spec.key, entry.id);
    let result = if let Some(field) = non_utf8 {
        Err(crate::reject::Reject::new(
            crate::reject::Reason::InvalidUtf8,
            format!("field {field:?} of the stream entry is not UTF-8"),
        ))
    } else {
        normalize_with_id(
            &spec.mapping,
            Some(&json),
            src,
            Some(&fallback_id),
            max_payload_bytes,
            now_ms,
        )
        // An auto id is the time Redis added the entry: a clock far ahead
        // of it is wrong. Ids that are not times (set by hand) are not checked.
        .and_then(|e| check_clock(e, added_ms(&entry.id), max_future_ms))
    };
    match result {
        Ok(event) => {
            let kind = event.kind().map(|k| k.as_str()).unwrap_or("");
            let headers = vec![(H_KIND, kind.as_bytes().to_vec())];
            Output {
                topic: events_topic.to_owned(),
                key: Some(event.subject_key().as_bytes().to_vec()),
                payload: Some(event.encode_to_vec()),
                headers,
            }
        }
        Err(reject) => {
            counter!(m::RECORDS_DLQ, "stage" => "ingest", "reason" => reject.reason.code())
                .increment(1);
            let input = Record::detached(&spec.key, -1, -1, Some(&json));
            let mut out = dlq::record(
                dlq_topic,
                "ingest",
                &input,
                reject.reason.code(),
                &reject.detail,
            );
            out.headers.push((H_SOURCE_KIND, b"redis-stream".to_vec()));
            out.headers
                .push((H_SOURCE_ENTRY_ID, entry.id.as_bytes().to_vec()));
            out
        }
    }
}

/// When Redis added an entry, from its auto id (`<ms>-<seq>`); `None` for
/// an id that is not a time (before 2000-01-01).
pub fn added_ms(id: &str) -> Option<i64> {
    id.split('-')
        .next()?
        .parse::<i64>()
        .ok()
        .filter(|ms| *ms >= 946_684_800_000)
}

/// The entry's fields as a JSON object of strings, and the first field whose
/// value is not UTF-8 (kept lossily in the JSON for the dead letter).
pub fn entry_json(entry: &StreamId) -> (Vec<u8>, Option<String>) {
    let mut fields: Vec<(&String, &redis::Value)> = entry.map.iter().collect();
    fields.sort_by(|a, b| a.0.cmp(b.0));
    let mut obj = Map::new();
    let mut bad = None;
    for (k, v) in fields {
        let text = match v {
            redis::Value::BulkString(b) => match std::str::from_utf8(b) {
                Ok(s) => s.to_owned(),
                Err(_) => {
                    bad.get_or_insert_with(|| k.clone());
                    String::from_utf8_lossy(b).into_owned()
                }
            },
            redis::Value::SimpleString(s) => s.clone(),
            redis::Value::Int(i) => i.to_string(),
            redis::Value::Double(d) => d.to_string(),
            other => format!("{other:?}"),
        };
        obj.insert(k.clone(), Value::String(text));
    }
    // Serializing a map of strings cannot fail.
    (
        serde_json::to_vec(&Value::Object(obj)).unwrap_or_default(),
        bad,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vidpulse_proto::Event;

    fn entry(id: &str, fields: &[(&str, &[u8])]) -> StreamId {
        StreamId {
            id: id.into(),
            map: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), redis::Value::BulkString(v.to_vec())))
                .collect(),
        }
    }

    fn spec() -> StreamSpec {
        StreamSpec::parse("ua-test=user_actions", chrono_tz::Asia::Shanghai).unwrap()
    }

    fn header<'a>(out: &'a Output, name: &str) -> &'a [u8] {
        out.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_slice())
            .unwrap_or_default()
    }

    #[test]
    fn stream_args_name_a_preset_or_default_to_the_stream_name() {
        let zone = chrono_tz::Asia::Shanghai;
        assert_eq!(
            StreamSpec::parse("user_actions", zone)
                .unwrap()
                .mapping
                .name,
            "user_actions"
        );
        let s = StreamSpec::parse("actions = user_actions", zone).unwrap();
        assert_eq!(
            (s.key.as_str(), s.mapping.name.as_str()),
            ("actions", "user_actions")
        );
        let e = StreamSpec::parse("actions", zone).unwrap_err().to_string();
        assert!(e.contains("no preset \"actions\""), "{e}");
        let e = StreamSpec::parse("a=/nonexistent/m.toml", zone)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }

    #[test]
    fn an_entry_becomes_an_event_with_the_entry_id() {
        let e = entry(
            "1732200000123-0",
            &[
                ("type", b"like"),
                ("timestamp", b"1732200000.123"),
                ("user_id", b"u-5"),
                ("target_id", b"v-9"),
            ],
        );
        let out = entry_output(
            &spec(),
            &e,
            "vp.events.v1",
            "vp.dlq.v1",
            1 << 20,
            300_000,
            1,
        );
        assert_eq!(out.topic, "vp.events.v1");
        assert_eq!(header(&out, H_KIND), b"user_action");
        let ev = Event::decode(out.payload.as_deref().unwrap()).unwrap();
        assert_eq!(ev.event_id, "ua-test/1732200000123-0");
        assert_eq!(ev.event_time_ms, 1_732_200_000_123);
        assert_eq!(ev.user_id, "u-5");
        assert_eq!(out.key.as_deref(), Some(b"v-9".as_slice()));
        let src = ev.source.unwrap();
        assert_eq!((src.topic.as_str(), src.partition), ("ua-test", -1));

        // The same entry again (a replay) gives the same event.
        let again = entry_output(
            &spec(),
            &e,
            "vp.events.v1",
            "vp.dlq.v1",
            1 << 20,
            300_000,
            1,
        );
        assert_eq!(again, out);
    }

    #[test]
    fn an_entry_stamped_far_after_redis_added_it_is_a_bad_clock() {
        // Added at 1732200000123 ms; the event says 2099.
        let e = entry(
            "1732200000123-0",
            &[("type", b"like"), ("timestamp", b"4070908800")],
        );
        let out = entry_output(&spec(), &e, "ev", "dlq", 1 << 20, 300_000, 1);
        assert_eq!(out.topic, "dlq");
        assert_eq!(header(&out, dlq::H_REASON), b"time_in_future");
        assert_eq!(added_ms("7-1"), None, "an id set by hand is not a time");
    }

    #[test]
    fn an_event_id_field_wins() {
        let e = entry(
            "5-0",
            &[
                ("type", b"order"),
                ("timestamp", b"1732200000"),
                ("event_id", b"o-1"),
            ],
        );
        let out = entry_output(&spec(), &e, "ev", "dlq", 1 << 20, 300_000, 1);
        let ev = Event::decode(out.payload.as_deref().unwrap()).unwrap();
        assert_eq!(ev.event_id, "o-1");
    }

    #[test]
    fn a_bad_entry_is_dead_lettered_with_its_stream_coordinates() {
        let e = entry("7-3", &[("type", b"like")]);
        let out = entry_output(&spec(), &e, "ev", "dlq", 1 << 20, 300_000, 1);
        assert_eq!(out.topic, "dlq");
        assert_eq!(header(&out, dlq::H_REASON), b"missing_field");
        assert_eq!(header(&out, dlq::H_TOPIC), b"ua-test");
        assert_eq!(header(&out, H_SOURCE_KIND), b"redis-stream");
        assert_eq!(header(&out, H_SOURCE_ENTRY_ID), b"7-3");
        let body: Value = serde_json::from_slice(out.payload.as_deref().unwrap()).unwrap();
        assert_eq!(body, serde_json::json!({"type": "like"}));

        let e = entry("7-4", &[("type", b"like"), ("timestamp", b"\xff\xfe")]);
        let out = entry_output(&spec(), &e, "ev", "dlq", 1 << 20, 300_000, 1);
        assert_eq!(header(&out, dlq::H_REASON), b"invalid_utf8");
    }
}
