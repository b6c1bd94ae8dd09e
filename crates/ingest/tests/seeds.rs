//! Every sample event printed in the seed documents (and the docs/mapping.md
//! formats fixed for seed 001 metadata and seed 003) normalizes to the
//! expected canonical event; bad input gets the expected reason.

#![allow(clippy::unwrap_used)]

use serde_json::json;
use vidpulse_ingest::mapping::{Mapping, SourceRef};
use vidpulse_ingest::normalize::normalize;
use vidpulse_ingest::presets::preset;
use vidpulse_ingest::reject::{Reason, Reject};
use vidpulse_proto::{self as pb, Event, Kind, event::Payload};

const MAX: usize = 1024 * 1024;

fn mapping(name: &str) -> Mapping {
    preset(name, chrono_tz::Asia::Shanghai).unwrap().unwrap()
}

fn norm(name: &str, payload: &[u8]) -> Result<Event, Reject> {
    let src = SourceRef {
        topic: name,
        partition: 2,
        offset: 41,
    };
    normalize(&mapping(name), Some(payload), src, MAX, 7)
}

fn ok(name: &str, payload: &str) -> Event {
    norm(name, payload.as_bytes()).unwrap_or_else(|r| panic!("{name}: {payload} rejected: {r}"))
}

fn reason(name: &str, payload: &[u8]) -> Reason {
    match norm(name, payload) {
        Ok(e) => panic!(
            "{name}: {:?} accepted as {e:?}",
            String::from_utf8_lossy(payload)
        ),
        Err(r) => {
            assert!(!r.detail.is_empty());
            r.reason
        }
    }
}

#[test]
fn seed_000_video_uploaded() {
    // Literal from seed 000's producer.
    let e = ok(
        "video_events",
        r#"{"event_type": "video_uploaded", "video_id": "123456", "user_id": "789012", "timestamp": "2025-04-05T10:00:00Z"}"#,
    );
    assert_eq!(e.kind(), Some(Kind::VideoUploaded));
    assert_eq!(e.video_id, "123456");
    assert_eq!(e.user_id, "789012");
    assert_eq!(e.event_time_ms, 1_743_847_200_000);
    assert_eq!(e.ingest_time_ms, 7);
    assert_eq!(
        e.event_id, "video_events/2/41",
        "no id in the payload: derived from the source"
    );
    assert_eq!(e.subject_key(), "123456");
    assert_eq!(e.schema_version, pb::SCHEMA_VERSION);
    let s = e.source.unwrap();
    assert_eq!(
        (s.topic.as_str(), s.partition, s.offset, s.mapping.as_str()),
        ("video_events", 2, 41, "video_events")
    );
}

#[test]
fn seed_000_video_played_with_payload_event_id() {
    let e = ok(
        "video_events",
        r#"{"event_type":"video_played","video_id":"123456","user_id":"789012","timestamp":"2025-04-05T10:00:01.500Z","event_id":"e-1","watch_ms":4200}"#,
    );
    assert_eq!(e.event_id, "e-1");
    assert_eq!(e.event_time_ms, 1_743_847_201_500);
    assert_eq!(
        e.payload,
        Some(Payload::VideoPlayed(pb::VideoPlayed {
            watch_ms: Some(4200)
        }))
    );
    let e = ok(
        "video_events",
        r#"{"event_type":"video_played","video_id":"1","timestamp":"2025-04-05T10:00:00Z"}"#,
    );
    assert_eq!(
        e.payload,
        Some(Payload::VideoPlayed(pb::VideoPlayed { watch_ms: None }))
    );
}

#[test]
fn seed_001_play_request_and_metadata() {
    // Literal from seed 001 (the dict json.dumps'd by the producer).
    let e = ok(
        "play_request",
        r#"{"user_id": "12345", "video_id": "67890", "start_time": "2025-04-01T10:00:00Z"}"#,
    );
    assert_eq!(e.kind(), Some(Kind::PlayRequested));
    assert_eq!(
        (e.user_id.as_str(), e.video_id.as_str()),
        ("12345", "67890")
    );
    assert_eq!(e.event_time_ms, 1_743_501_600_000);
    assert_eq!(e.subject_key(), "67890");

    let e = ok(
        "video_messages",
        r#"{"video_id":"67890","url":"https://cdn.example/v/67890.mp4","resolution":"1920x1080","duration_s":63,"timestamp":"2025-04-01T10:00:00Z"}"#,
    );
    assert_eq!(
        e.payload,
        Some(Payload::VideoMetadata(pb::VideoMetadata {
            url: "https://cdn.example/v/67890.mp4".into(),
            resolution: "1920x1080".into(),
            duration_ms: 63_000,
        }))
    );
    // Seed 001 also sends plain text, which is not an event.
    assert_eq!(
        reason("video_messages", b"This is a video message"),
        Reason::InvalidJson
    );
}

#[test]
fn seed_002_live_streaming_log() {
    // Literal from seed 002 (Ckafka's stored JSON).
    let e = ok(
        "live_streaming_log",
        r#"{"user_id": 3165, "ip": "123.0.0.105", "room_id": 20210813, "arrive_time": "2021-08-16 09:48:01", "create_time": "2021-08-16 09:48:01", "leave_time": "2021-08-16 09:48:01", "region": 1122, "grade": 1, "province": "浙江"}"#,
    );
    assert_eq!(e.kind(), Some(Kind::ViewerArrived));
    assert_eq!(
        (e.user_id.as_str(), e.room_id.as_str()),
        ("3165", "20210813")
    );
    // 09:48:01 in Asia/Shanghai is 01:48:01 UTC.
    assert_eq!(e.event_time_ms, 1_629_078_481_000);
    let viewer = pb::Viewer {
        province: "浙江".into(),
        region: "1122".into(),
        grade: 1,
        ip: "123.0.0.105".into(),
    };
    assert_eq!(
        e.payload,
        Some(Payload::ViewerArrived(pb::ViewerArrived {
            viewer: Some(viewer.clone())
        }))
    );
    assert_eq!(e.subject_key(), "20210813");

    // A finished visit: leave_time after arrive_time.
    let e = ok(
        "live_streaming_log",
        r#"{"user_id":3165,"ip":"123.0.0.105","room_id":20210813,"arrive_time":"2021-08-16 09:48:01","create_time":"2021-08-16 09:48:01","leave_time":"2021-08-16 09:58:01","region":1122,"grade":1,"province":"浙江"}"#,
    );
    assert_eq!(e.event_time_ms, 1_629_079_081_000);
    assert_eq!(
        e.payload,
        Some(Payload::ViewerLeft(pb::ViewerLeft {
            viewer: Some(viewer),
            arrived_at_ms: 1_629_078_481_000
        }))
    );
}

#[test]
fn seed_002_live_gift_total() {
    // Literal from seed 002.
    let e = ok(
        "live_gift_total",
        r#"{"user_id": 3994, "gift_type": 3, "gift_total_amount": 28, "room_id": 20210813, "ip": "123.0.0.105", "create_time": "2021-08-16 09:46:51", "update_time": "2021-08-16 09:46:51"}"#,
    );
    assert_eq!(e.kind(), Some(Kind::GiftSent));
    assert_eq!(e.event_time_ms, 1_629_078_411_000);
    assert_eq!(
        e.payload,
        Some(Payload::GiftSent(pb::GiftSent {
            gift_type: "3".into(),
            amount: 28,
            ip: "123.0.0.105".into()
        }))
    );
    assert_eq!(e.subject_key(), "20210813");
    // The seed's generator: no room_id, no ip. Keyed by the user then.
    let e = ok(
        "live_gift_total",
        r#"{"user_id": 2500, "gift_type": 7, "gift_total_amount": 99, "create_time": "2021-08-16 09:46:51", "update_time": "2021-08-16 09:46:51"}"#,
    );
    assert_eq!(e.room_id, "");
    assert_eq!(e.subject_key(), "2500");
}

#[test]
fn seed_003_room_lifecycle_production_consumption() {
    let e = ok(
        "live_room_events",
        r#"{"live_stream_id":"20210813","action":"start","type":"game","client":"android","title":"t","address":"rtmp://x","anchor_id":"a-77","module_id":"1001","time":"2021-08-16 09:00:00"}"#,
    );
    let room = pb::Room {
        r#type: "game".into(),
        client: "android".into(),
        title: "t".into(),
        address: "rtmp://x".into(),
        anchor_id: "a-77".into(),
        module_id: "1001".into(),
    };
    assert_eq!(
        e.payload,
        Some(Payload::LiveRoomStarted(pb::LiveRoomStarted {
            room: Some(room)
        }))
    );
    assert_eq!(e.room_id, "20210813");
    assert_eq!(e.event_time_ms, 1_629_075_600_000);
    let e = ok(
        "live_room_events",
        r#"{"live_stream_id":20210813,"action":"end","time":"2021-08-16 11:00:00"}"#,
    );
    assert_eq!(e.kind(), Some(Kind::LiveRoomEnded));

    let e = ok(
        "video_production_log",
        r#"{"author_id":"a-77","video_id":"v-9","action":"publish","category":"food","time":1629075600123}"#,
    );
    assert_eq!(
        e.payload,
        Some(Payload::VideoPublished(pb::VideoPublished {
            category: "food".into()
        }))
    );
    assert_eq!(
        (e.author_id.as_str(), e.event_time_ms),
        ("a-77", 1_629_075_600_123)
    );
    assert_eq!(e.subject_key(), "a-77");

    let e = ok(
        "video_consumption_log",
        r#"{"video_id":"v-9","author_id":"a-77","user_id":"u-5","action":"play","watch_ms":15000,"time":1629075601.5}"#,
    );
    assert_eq!(
        e.payload,
        Some(Payload::VideoPlayed(pb::VideoPlayed {
            watch_ms: Some(15_000)
        }))
    );
    assert_eq!(e.event_time_ms, 1_629_075_601_500);
    assert_eq!(e.author_id, "a-77");
    let e = ok(
        "video_consumption_log",
        r#"{"video_id":"v-9","author_id":"a-77","user_id":"u-5","action":"like","time":1629075602.25}"#,
    );
    assert_eq!(
        e.payload,
        Some(Payload::UserAction(pb::UserAction {
            action: "like".into(),
            target_id: "v-9".into()
        }))
    );
    assert_eq!(e.subject_key(), "v-9");
}

#[test]
fn seed_004_user_actions() {
    // What seed 004's XADD sends: only type and time.time().
    let e = ok(
        "user_actions",
        r#"{"type": "like", "timestamp": 1732200000.123}"#,
    );
    assert_eq!(
        e.payload,
        Some(Payload::UserAction(pb::UserAction {
            action: "like".into(),
            target_id: String::new()
        }))
    );
    assert_eq!(e.event_time_ms, 1_732_200_000_123);
    // Redis stream fields are strings.
    let e = ok(
        "user_actions",
        r#"{"type":"order","timestamp":"1732200000.5","user_id":"u-5","target_id":"item-1"}"#,
    );
    assert_eq!(e.event_time_ms, 1_732_200_000_500);
    assert_eq!(e.subject_key(), "item-1");
    for t in ["like", "order", "comment", "share"] {
        let p = json!({"type": t, "timestamp": 1732200000.0}).to_string();
        assert_eq!(ok("user_actions", &p).kind(), Some(Kind::UserAction));
    }
}

#[test]
fn malformed_inputs_get_specific_reasons() {
    use Reason as R;
    let gift = |extra: &str| {
        format!(
            r#"{{"user_id":1,"gift_type":3,"gift_total_amount":28,"create_time":"2021-08-16 09:46:51"{extra}}}"#
        )
    };
    let deep = format!(
        r#"{{"video_id":"1","x":{}{}}}"#,
        "[".repeat(300),
        "]".repeat(300)
    );
    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        ("video_events", vec![], R::EmptyPayload),
        ("video_events", br#"{"event_type":"video_played","video_id":"1","timest"#.to_vec(), R::TruncatedJson),
        ("video_events", br#"{"video_id":"1",,}"#.to_vec(), R::InvalidJson),
        ("video_events", b"{'video_id': '1'}".to_vec(), R::InvalidJson),
        ("video_events", b"[1,2,3]".to_vec(), R::NotAnObject),
        ("video_events", b"42".to_vec(), R::NotAnObject),
        ("video_events", b"{\"video_id\":\"\xff\xfe\"}".to_vec(), R::InvalidUtf8),
        ("video_events", deep.into_bytes(), R::NestingTooDeep),
        ("video_events", vec![b' '; MAX + 1], R::PayloadTooLarge),
        (
            "video_events",
            br#"{"event_type":"video_deleted","video_id":"1","timestamp":"2025-04-05T10:00:00Z"}"#.to_vec(),
            R::UnknownEventType,
        ),
        ("video_events", br#"{"event_type":"video_played","timestamp":"2025-04-05T10:00:00Z"}"#.to_vec(), R::MissingField),
        ("video_events", br#"{"event_type":"video_played","video_id":"1"}"#.to_vec(), R::MissingField),
        (
            "video_events",
            br#"{"event_type":"video_played","video_id":{"a":1},"timestamp":"2025-04-05T10:00:00Z"}"#.to_vec(),
            R::WrongType,
        ),
        (
            "video_events",
            br#"{"event_type":"video_played","video_id":true,"timestamp":"2025-04-05T10:00:00Z"}"#.to_vec(),
            R::WrongType,
        ),
        (
            "video_events",
            br#"{"event_type":"video_played","video_id":"","timestamp":"2025-04-05T10:00:00Z"}"#.to_vec(),
            R::InvalidId,
        ),
        ("live_gift_total", gift("").replace("\"user_id\":1", "\"user_id\":12.5").into_bytes(), R::InvalidId),
        ("video_events", br#"{"event_type":"video_played","video_id":"1","timestamp":"yesterday"}"#.to_vec(), R::UnparseableTime),
        ("live_gift_total", gift("").replace("09:46:51", "99:46:51").into_bytes(), R::UnparseableTime),
        ("video_events", br#"{"event_type":"video_played","video_id":"1","timestamp":0}"#.to_vec(), R::TimeOutOfRange),
        (
            "video_events",
            br#"{"event_type":"video_played","video_id":"1","timestamp":"2300-01-01T00:00:00Z"}"#.to_vec(),
            R::TimeOutOfRange,
        ),
        ("video_events", br#"{"event_type":"video_played","video_id":"1","timestamp":[1]}"#.to_vec(), R::WrongType),
        ("live_gift_total", gift("").replace("28", "-28").into_bytes(), R::InvalidValue),
        ("live_gift_total", gift("").replace("28", "\"lots\"").into_bytes(), R::InvalidValue),
        ("live_gift_total", gift("").replace("\"gift_total_amount\":28,", "").into_bytes(), R::MissingField),
        (
            "video_consumption_log",
            br#"{"video_id":"v","action":"dance","time":1629075601.5}"#.to_vec(),
            R::UnknownEventType,
        ),
        ("user_actions", br#"{"type":"teleport","timestamp":1732200000.1}"#.to_vec(), R::UnknownEventType),
        ("user_actions", br#"{"timestamp":1732200000.1}"#.to_vec(), R::MissingField),
        ("user_actions", br#"{"type":true,"timestamp":1732200000.1}"#.to_vec(), R::WrongType),
        ("user_actions", br#"{"type":{"a":1},"timestamp":1732200000.1}"#.to_vec(), R::WrongType),
        ("live_room_events", br#"{"action":"start","time":"2021-08-16 09:00:00"}"#.to_vec(), R::MissingField),
        ("video_production_log", br#"{"video_id":"v","action":"publish","time":1629075600123}"#.to_vec(), R::MissingField),
    ];
    let mut seen = std::collections::HashSet::new();
    for (mapping, payload, want) in cases {
        let got = reason(mapping, &payload);
        assert_eq!(
            got,
            want,
            "{mapping}: {:?}",
            String::from_utf8_lossy(&payload[..payload.len().min(120)])
        );
        seen.insert(want);
    }
    assert!(seen.len() >= 14, "covers {} distinct reasons", seen.len());
}

#[test]
fn unknown_event_type_detail_names_the_discriminator() {
    let r = norm(
        "video_events",
        br#"{"event_type":"video_deleted","video_id":"1","timestamp":1}"#,
    )
    .unwrap_err();
    assert!(
        r.detail.contains("event_type = \"video_deleted\""),
        "{}",
        r.detail
    );
}

#[test]
fn same_record_same_source_same_event_id() {
    let p = br#"{"event_type":"video_played","video_id":"1","timestamp":"2025-04-05T10:00:00Z"}"#;
    let a = norm("video_events", p).unwrap();
    let b = norm("video_events", p).unwrap();
    assert_eq!(a.event_id, b.event_id);
    let src = SourceRef {
        topic: "video_events",
        partition: 2,
        offset: 42,
    };
    let c = normalize(&mapping("video_events"), Some(p), src, MAX, 7).unwrap();
    assert_ne!(a.event_id, c.event_id, "another offset is another event");
}

#[test]
fn a_time_read_in_place_equals_one_read_through_serde() {
    // Plain strings are parsed where they lie; escaped ones, numbers and
    // RFC 3339 take the general path: the same instant either way, and
    // the same reasons for bad ones.
    let gift = |t: &str| {
        format!(r#"{{"user_id": 1, "gift_type": 3, "gift_total_amount": 2, "create_time": {t}}}"#)
    };
    let at = |t: &str| ok("live_gift_total", &gift(t)).event_time_ms;
    let want = 1_629_078_411_000; // 2021-08-16 09:46:51 in Shanghai
    assert_eq!(at(r#""2021-08-16 09:46:51""#), want);
    assert_eq!(at(r#"" 2021-08-16 09:46:51 ""#), want);
    assert_eq!(at(r#""2021-08-16\u002009:46:51""#), want);
    assert_eq!(at(r#""2021-08-16T01:46:51Z""#), want);
    assert_eq!(at(r#""2021-08-16T09:46:51+08:00""#), want);
    assert_eq!(at("1629078411"), want);
    assert_eq!(at(r#""1629078411000""#), want);
    for (t, why) in [
        (r#""yesterday""#, Reason::UnparseableTime),
        (r#""y\u0065sterday""#, Reason::UnparseableTime),
        (r#""1970-01-01 08:00:00""#, Reason::TimeOutOfRange),
        (r#""2021-08-16 09:46:51+08""#, Reason::UnparseableTime),
        ("true", Reason::WrongType),
    ] {
        assert_eq!(reason("live_gift_total", gift(t).as_bytes()), why, "{t}");
    }
}
