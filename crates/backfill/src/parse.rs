//! One line → one canonical event, through the file's mapping, exactly as
//! ingest normalizes a raw record — or a bad line, with its reason.
//!
//! A line's event id is the payload's own (`event_id` in the mapping), else
//! `<file>/0/<line>`: the form ingest gives a record without one
//! (`<topic>/<partition>/<offset>`), with the file as given standing for
//! the topic. So a rerun over the same files yields the same ids.

use vidpulse_ingest::mapping::{Mapping, SourceRef};
use vidpulse_ingest::normalize::{check_clock, normalize};
use vidpulse_ingest::reject::{Reason, Reject};
use vidpulse_proto::Event;

use crate::input::Source;

/// A line that is not an event.
#[derive(Clone, Debug, PartialEq)]
pub struct BadLine {
    /// Index of its file in the run's sources.
    pub source: usize,
    pub line: u64,
    pub reason: Reason,
    pub detail: String,
    /// The line itself (lossy UTF-8, at most [`KEEP_BYTES`]).
    pub text: String,
}

/// How much of a bad line is kept for the report.
pub const KEEP_BYTES: usize = 4096;

/// Turns lines into events.
#[derive(Debug)]
pub struct Parser {
    pub mappings: Vec<Mapping>,
    pub max_line_bytes: usize,
    /// An event time more than this after the run's start is a bad clock
    /// (`time_in_future`).
    pub max_future_ms: i64,
    /// The run's start (epoch ms): the events' ingest time and the clock
    /// `time_in_future` is judged by.
    pub now_ms: i64,
}

impl Parser {
    pub fn line(&self, src: &Source, line: u64, bytes: &[u8]) -> Result<Event, Reject> {
        let at = SourceRef {
            topic: &src.label,
            partition: 0,
            offset: line as i64,
        };
        let event = normalize(
            &self.mappings[src.mapping],
            Some(bytes),
            at,
            self.max_line_bytes,
            self.now_ms,
        )?;
        check_clock(event, Some(self.now_ms), self.max_future_ms)
    }

    /// A bad line as reported.
    pub fn bad(source: usize, line: u64, bytes: &[u8], reject: Reject) -> BadLine {
        let keep = &bytes[..bytes.len().min(KEEP_BYTES)];
        BadLine {
            source,
            line,
            reason: reject.reason,
            detail: reject.detail,
            text: String::from_utf8_lossy(keep).into_owned(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parser() -> Parser {
        let m = vidpulse_ingest::presets::preset("live_gift_total", chrono_tz::Asia::Shanghai)
            .unwrap()
            .unwrap();
        Parser {
            mappings: vec![m],
            max_line_bytes: 1 << 20,
            max_future_ms: 300_000,
            now_ms: 1_700_000_000_000,
        }
    }

    fn src() -> Source {
        Source {
            path: "g.jsonl".into(),
            label: "logs/g.jsonl".into(),
            mapping: 0,
        }
    }

    #[test]
    fn ids_come_from_the_payload_else_from_file_and_line() {
        let p = parser();
        let with = br#"{"user_id":1,"gift_type":3,"gift_total_amount":5,"room_id":7,"create_time":"2021-08-16 09:46:51","event_id":"x-1"}"#;
        let e = p.line(&src(), 12, with).unwrap();
        assert_eq!(e.event_id, "x-1");
        assert_eq!(
            e.event_time_ms, 1_629_078_411_000,
            "Asia/Shanghai local time"
        );
        let without = br#"{"user_id":1,"gift_type":3,"gift_total_amount":5,"create_time":"2021-08-16 09:46:51"}"#;
        assert_eq!(
            p.line(&src(), 13, without).unwrap().event_id,
            "logs/g.jsonl/0/13"
        );
    }

    #[test]
    fn bad_lines_say_why() {
        let p = parser();
        let cases: [(&[u8], Reason); 4] = [
            (b"", Reason::EmptyPayload),
            (b"{\"user_id\":1", Reason::TruncatedJson),
            (b"[1,2]", Reason::NotAnObject),
            (
                br#"{"user_id":1,"gift_type":3,"gift_total_amount":5,"create_time":"2099-01-01 00:00:00"}"#,
                Reason::TimeInFuture,
            ),
        ];
        for (line, reason) in cases {
            let r = p.line(&src(), 1, line).unwrap_err();
            assert_eq!(r.reason, reason, "{}", String::from_utf8_lossy(line));
        }
    }
}
