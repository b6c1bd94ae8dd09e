//! The ingest processor: raw bytes → canonical protobuf event keyed by its
//! subject id, or → the dead-letter topic with the original key and bytes
//! and a reason. Every input yields exactly one output, so nothing is lost.

use std::collections::HashMap;
use std::sync::Arc;

use metrics::{Counter, counter};
use serde_json::Value;
use serde_json::error::Category;
use vidpulse_core::pipeline::{Input, Output, Processor};
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

/// The ingest stage's `Processor`.
pub struct Normalizer {
    /// Full (prefixed) raw topic → mapping.
    mappings: HashMap<String, Arc<Mapping>>,
    events_topic: String,
    dlq_topic: String,
    max_payload_bytes: usize,
    dlq_counters: HashMap<Reason, Counter>,
}

impl Normalizer {
    pub fn new(
        mappings: HashMap<String, Arc<Mapping>>,
        events_topic: String,
        dlq_topic: String,
        max_payload_bytes: usize,
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
            dlq_counters,
        }
    }
}

impl Processor for Normalizer {
    fn process(&mut self, input: &Input<'_>, out: &mut Vec<Output>) {
        let src = SourceRef {
            topic: input.topic,
            partition: input.partition,
            offset: input.offset,
        };
        let result = match self.mappings.get(input.topic) {
            Some(mapping) => normalize(
                mapping,
                input.payload,
                src,
                self.max_payload_bytes,
                now_ms(),
            ),
            None => Err(Reject::new(
                Reason::NoMapping,
                format!("no mapping for topic {}", input.topic),
            )),
        };
        match result {
            Ok(event) => {
                let mut buf = Vec::with_capacity(event.encoded_len());
                // Encoding into a Vec cannot fail (it grows as needed).
                let _ = event.encode(&mut buf);
                let kind = event.kind().map(|k| k.as_str()).unwrap_or("");
                out.push(Output {
                    topic: self.events_topic.clone(),
                    key: Some(event.subject_key().as_bytes().to_vec()),
                    payload: Some(buf),
                    headers: vec![(H_KIND, kind.as_bytes().to_vec())],
                });
            }
            Err(reject) => {
                if let Some(c) = self.dlq_counters.get(&reject.reason) {
                    c.increment(1);
                }
                tracing::debug!(topic = input.topic, partition = input.partition, offset = input.offset, %reject, "Rejected.");
                out.push(dlq::record(
                    &self.dlq_topic,
                    "ingest",
                    input,
                    reject.reason.code(),
                    &reject.detail,
                ));
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
