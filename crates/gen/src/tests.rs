//! Properties of the generated stream and its truth.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde_json::Value;

use crate::formats::{LOCAL_OFFSET_SECS, PROVINCES, TimeStyle};
use crate::truth::{TopGifterRow, UserVideoPlaysRow, VideoPlaysRow};
use crate::{Class, Event, Format, GenConfig, Kind, RawRecord, Reason, TruthBuilder, generate};

fn cfg(count: u64) -> GenConfig {
    GenConfig {
        count,
        ..GenConfig::default()
    }
}

fn messy(count: u64) -> GenConfig {
    GenConfig {
        count,
        bad_fraction: 0.1,
        late_fraction: 0.1,
        dup_fraction: 0.1,
        ..GenConfig::default()
    }
}

fn json(r: &RawRecord) -> serde_json::Map<String, Value> {
    match serde_json::from_slice(&r.payload) {
        Ok(Value::Object(m)) => m,
        other => panic!("record {} is not a JSON object: {other:?}", r.seq),
    }
}

/// Reads the event time of a valid payload the way ingest must.
fn payload_time(format: Format, m: &serde_json::Map<String, Value>) -> i64 {
    let field = match format {
        Format::VideoEvents | Format::VideoMessages | Format::UserActions => "timestamp",
        Format::PlayRequest => "start_time",
        Format::LiveStreamingLog => {
            if m["leave_time"] != m["arrive_time"] {
                "leave_time"
            } else {
                "arrive_time"
            }
        }
        Format::LiveGiftTotal => "create_time",
        Format::LiveRoomEvents | Format::VideoProductionLog | Format::VideoConsumptionLog => "time",
    };
    let v = &m[field];
    match format.time_style() {
        TimeStyle::Iso => DateTime::parse_from_rfc3339(v.as_str().unwrap())
            .unwrap()
            .timestamp_millis(),
        TimeStyle::Local => {
            let t =
                NaiveDateTime::parse_from_str(v.as_str().unwrap(), "%Y-%m-%d %H:%M:%S").unwrap();
            (t.and_utc().timestamp() - LOCAL_OFFSET_SECS) * 1000
        }
        TimeStyle::EpochMs => v.as_i64().unwrap(),
        TimeStyle::EpochSecs => (v.as_f64().unwrap() * 1000.0).round() as i64,
    }
}

fn id_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("not an id: {other}"),
    }
}

fn event_seq(r: &RawRecord) -> Option<u64> {
    json(r)
        .get("event_id")?
        .as_str()?
        .rsplit('-')
        .next()?
        .parse()
        .ok()
}

#[test]
fn same_seed_same_bytes_and_truth() {
    let a = generate(&messy(3000));
    let b = generate(&messy(3000));
    assert_eq!(a.records, b.records);
    assert_eq!(a.truth, b.truth);
    assert_eq!(
        serde_json::to_string_pretty(&a.truth).unwrap(),
        serde_json::to_string_pretty(&b.truth).unwrap()
    );
    let c = generate(&GenConfig {
        seed: 2,
        ..messy(3000)
    });
    assert_ne!(
        a.records.iter().map(|r| &r.payload).collect::<Vec<_>>(),
        c.records.iter().map(|r| &r.payload).collect::<Vec<_>>()
    );
    assert_ne!(a.truth.metrics, c.truth.metrics);
}

#[test]
fn fractions_are_roughly_respected() {
    let n = 20_000;
    let g = generate(&GenConfig {
        bad_fraction: 0.1,
        late_fraction: 0.15,
        dup_fraction: 0.05,
        ..cfg(n)
    });
    assert_eq!(g.records.len() as u64, n);
    let share =
        |f: fn(&Class) -> bool| g.records.iter().filter(|r| f(&r.class)).count() as f64 / n as f64;
    let bad = share(|c| matches!(c, Class::Malformed { .. }));
    let late = share(|c| matches!(c, Class::Late));
    let dup = share(|c| matches!(c, Class::Duplicate { .. }));
    assert!((bad - 0.10).abs() < 0.01, "bad {bad}");
    assert!((late - 0.15).abs() < 0.015, "late {late}");
    assert!((dup - 0.05).abs() < 0.01, "dup {dup}");

    let clean = generate(&cfg(2000));
    assert!(clean.records.iter().all(|r| r.class == Class::Valid));
}

#[test]
fn every_format_appears() {
    let g = generate(&cfg(500));
    let topics: BTreeSet<&str> = g.records.iter().map(|r| r.topic).collect();
    assert_eq!(topics.len(), 9, "{topics:?}");
    for k in Kind::ALL {
        if k != Kind::LiveRoomEnded {
            assert!(g.truth.kinds[k.name()] > 0, "no {k}");
        }
    }
    // Some rooms end in a long enough run.
    let g = generate(&cfg(5000));
    assert!(g.truth.kinds["live_room_ended"] > 0);
}

#[test]
fn every_reason_appears_with_13_bad_records() {
    let g = generate(&GenConfig {
        bad_fraction: 1.0,
        ..cfg(13)
    });
    let reasons: BTreeSet<Reason> = g
        .records
        .iter()
        .map(|r| match r.class {
            Class::Malformed { reason } => reason,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(reasons.len(), 13);
    assert!(g.truth.dlq_by_reason.values().all(|&n| n == 1));

    // And in a realistic mix.
    let g = generate(&GenConfig {
        bad_fraction: 0.02,
        ..cfg(5000)
    });
    assert!(
        g.truth.dlq_by_reason.values().all(|&n| n > 0),
        "{:?}",
        g.truth.dlq_by_reason
    );
}

#[test]
fn reasons_a_format_cannot_show_are_skipped() {
    let g = generate(&GenConfig {
        bad_fraction: 1.0,
        formats: vec![Format::PlayRequest],
        ..cfg(100)
    });
    assert!(g.records.iter().all(|r| r.topic == "play_request"));
    let d = &g.truth.dlq_by_reason;
    assert_eq!(d["unknown_event_type"], 0);
    assert_eq!(d["invalid_value"], 0);
    assert!(d["unparseable_time"] > 0 && d["invalid_id"] > 0 && d["wrong_type"] > 0);
}

/// A stand-in for ingest's first checks: the reason a payload fails with,
/// as far as it can be told without the presets.
fn first_failure(payload: &[u8]) -> Option<&'static str> {
    if payload.is_empty() {
        return Some("empty_payload");
    }
    let Ok(text) = std::str::from_utf8(payload) else {
        return Some("invalid_utf8");
    };
    match serde_json::from_str::<Value>(text) {
        Err(e) if e.is_eof() => Some("truncated_json"),
        Err(e) if e.to_string().contains("recursion limit") => Some("nesting_too_deep"),
        Err(_) => Some("invalid_json"),
        Ok(Value::Object(_)) => None,
        Ok(_) => Some("not_an_object"),
    }
}

#[test]
fn malformed_records_fail_as_labelled() {
    let g = generate(&GenConfig {
        bad_fraction: 1.0,
        ..cfg(13 * 20)
    });
    for r in &g.records {
        let Class::Malformed { reason } = r.class else {
            unreachable!()
        };
        assert!(r.event.is_none());
        let seen = first_failure(&r.payload);
        match reason {
            Reason::EmptyPayload
            | Reason::InvalidUtf8
            | Reason::TruncatedJson
            | Reason::InvalidJson
            | Reason::NotAnObject
            | Reason::NestingTooDeep => assert_eq!(seen, Some(reason.code()), "{r:?}"),
            _ => {
                assert_eq!(
                    seen,
                    None,
                    "{reason}: {}",
                    String::from_utf8_lossy(&r.payload)
                );
                assert!(r.key.is_some());
            }
        }
        let m = if seen.is_none() { Some(json(r)) } else { None };
        let format = Format::from_topic(r.topic).unwrap();
        match reason {
            Reason::UnknownEventType => {
                let m = m.unwrap();
                let bad = ["video_deleted", "dance", "pause", "teleport"];
                assert!(
                    m.values()
                        .any(|v| v.as_str().is_some_and(|s| bad.contains(&s))),
                    "{m:?}"
                );
            }
            Reason::InvalidValue => {
                let m = m.unwrap();
                let v = m.get("gift_total_amount").or(m.get("duration_s")).unwrap();
                assert!(v.as_i64().unwrap() < 0);
            }
            Reason::TimeOutOfRange => {
                let t = payload_time(format, &m.unwrap());
                let lo = Utc
                    .with_ymd_and_hms(2000, 1, 1, 0, 0, 0)
                    .unwrap()
                    .timestamp_millis();
                let hi = Utc
                    .with_ymd_and_hms(2100, 1, 1, 0, 0, 0)
                    .unwrap()
                    .timestamp_millis();
                assert!(t < lo || t >= hi, "{t}");
            }
            Reason::WrongType => {
                let m = m.unwrap();
                assert!(
                    m.values()
                        .any(|v| v.is_object() || v.is_boolean() || v.is_array())
                );
            }
            _ => {}
        }
    }
}

#[test]
fn valid_payloads_match_their_events() {
    let g = generate(&messy(5000));
    for r in g.records.iter().filter(|r| r.class.is_valid()) {
        let m = json(r);
        let e = r.event.as_ref().unwrap();
        let format = Format::from_topic(r.topic).unwrap();
        assert_eq!(payload_time(format, &m), e.time_ms, "{r:?}");
        assert_eq!(m["event_id"].as_str(), e.event_id.as_deref());
        assert_eq!(
            e.event_id.as_deref(),
            Some(format!("g1-{}", r.seq).as_str())
        );
        let id = |f: &str| m.get(f).map(id_text);
        match format {
            Format::VideoEvents => {
                assert_eq!(m["event_type"].as_str(), Some(e.kind.name()));
                assert_eq!(id("video_id"), e.video_id);
                assert_eq!(id("user_id"), e.user_id);
                assert_eq!(m.get("watch_ms").and_then(Value::as_i64), e.watch_ms);
            }
            Format::LiveStreamingLog => {
                let left = m["leave_time"] != m["arrive_time"];
                assert_eq!(
                    e.kind,
                    if left {
                        Kind::ViewerLeft
                    } else {
                        Kind::ViewerArrived
                    }
                );
                assert!(m["user_id"].is_u64() && m["room_id"].is_u64());
                let user = m["user_id"].as_u64().unwrap();
                assert_eq!(m["grade"].as_u64(), Some(user % 5 + 1));
                assert!(PROVINCES.contains(&m["province"].as_str().unwrap()));
                assert_eq!(id("room_id"), e.room_id);
                assert_eq!(e.grade, Some((user % 5 + 1) as i32));
            }
            Format::LiveGiftTotal => {
                assert_eq!(id("user_id"), e.user_id);
                assert_eq!(id("room_id"), e.room_id);
                assert_eq!(m.contains_key("ip"), m.contains_key("room_id"));
                assert_eq!(id("gift_type"), e.gift_type);
                assert_eq!(m["gift_total_amount"].as_i64(), e.amount);
            }
            Format::VideoConsumptionLog => {
                let action = m["action"].as_str().unwrap();
                assert_eq!(action == "play", m.contains_key("watch_ms"));
                assert_eq!(e.kind == Kind::VideoPlayed, action == "play");
            }
            Format::UserActions => {
                assert_eq!(m["type"].as_str(), e.action.as_deref());
                assert_eq!(m.contains_key("user_id"), m.contains_key("target_id"));
            }
            _ => {}
        }
        // Keys are the subject id.
        let key = r.key.as_deref().unwrap();
        let subject = match format {
            Format::LiveRoomEvents => id("live_stream_id"),
            Format::VideoProductionLog => id("author_id"),
            Format::LiveStreamingLog => id("room_id"),
            Format::LiveGiftTotal => id("room_id").or(id("user_id")),
            Format::UserActions => id("target_id").or(id("user_id")).or(id("type")),
            _ => id("video_id"),
        };
        assert_eq!(Some(key.to_owned()), subject);
    }
}

#[test]
fn without_event_ids_no_record_has_one() {
    let g = generate(&GenConfig {
        event_ids: false,
        bad_fraction: 0.2,
        late_fraction: 0.1,
        ..cfg(2000)
    });
    for r in &g.records {
        assert!(!String::from_utf8_lossy(&r.payload).contains("event_id"));
        assert!(r.event.as_ref().is_none_or(|e| e.event_id.is_none()));
    }
    assert!(!g.truth.event_ids);
}

#[test]
fn duplicates_copy_earlier_valid_records() {
    let g = generate(&messy(5000));
    let by_seq: HashMap<u64, &RawRecord> = g.records.iter().map(|r| (r.seq, r)).collect();
    let mut dups = 0;
    for (i, r) in g.records.iter().enumerate() {
        assert_eq!(r.seq, i as u64);
        if let Class::Duplicate { of } = r.class {
            dups += 1;
            let original = by_seq[&of];
            assert!(of < r.seq);
            assert_eq!(original.class, Class::Valid);
            assert_eq!(original.payload, r.payload);
            assert_eq!(original.key, r.key);
            assert_eq!(original.topic, r.topic);
            assert_eq!(original.event, r.event);
        }
    }
    assert!(dups > 300);
}

#[test]
fn event_times_rise_and_late_records_are_behind() {
    let c = messy(5000);
    let g = generate(&c);
    let start = c.start.timestamp_millis();
    let end = start + c.span.as_millis() as i64;
    let late_by = c.late_by.as_millis() as i64;
    let mut max_seen = i64::MIN;
    let mut lates = 0;
    for r in &g.records {
        let Some(e) = &r.event else { continue };
        match r.class {
            Class::Valid => {
                assert!(
                    e.time_ms >= max_seen.saturating_sub(2000),
                    "{r:?} behind {max_seen}"
                );
                assert!((start..end).contains(&e.time_ms), "{r:?}");
                max_seen = max_seen.max(e.time_ms);
            }
            Class::Late if max_seen > i64::MIN => {
                lates += 1;
                assert!(
                    e.time_ms <= max_seen.saturating_sub(late_by - 2000),
                    "{r:?} not behind {max_seen}"
                );
                assert!(e.time_ms >= start - late_by);
            }
            _ => {}
        }
    }
    assert!(lates > 300);
}

#[test]
fn per_key_order_follows_sequence_numbers() {
    let g = generate(&messy(5000));
    let mut last: HashMap<(&str, &str), u64> = HashMap::new();
    for r in g.records.iter().filter(|r| r.class.is_valid()) {
        let seq = event_seq(r).unwrap();
        assert_eq!(seq, r.seq);
        let key = (r.topic, r.key.as_deref().unwrap());
        if let Some(prev) = last.insert(key, seq) {
            assert!(prev < seq, "{key:?}: {prev} then {seq}");
        }
    }
}

#[test]
fn live_rooms_tell_a_consistent_story() {
    let g = generate(&messy(8000));
    let mut started: HashMap<String, i64> = HashMap::new();
    let mut ended: BTreeSet<String> = BTreeSet::new();
    let mut arrived: HashMap<(String, String), Vec<i64>> = HashMap::new();
    for r in g.records.iter().filter(|r| r.class.is_valid()) {
        let e = r.event.as_ref().unwrap();
        let room = e.room_id.clone();
        match e.kind {
            Kind::LiveRoomStarted => {
                let room = room.unwrap();
                assert!(!ended.contains(&room), "room {room} restarted");
                started.entry(room).or_insert(e.time_ms);
            }
            Kind::LiveRoomEnded => {
                let room = room.unwrap();
                assert!(started[&room] < e.time_ms);
                assert!(ended.insert(room));
            }
            Kind::ViewerArrived | Kind::ViewerLeft | Kind::GiftSent => {
                let Some(room) = room else { continue };
                assert!(started[&room] <= e.time_ms, "{r:?} before its room started");
                assert!(!ended.contains(&room), "{r:?} after its room ended");
                let who = (room, e.user_id.clone().unwrap());
                if e.kind == Kind::ViewerArrived {
                    arrived.entry(who).or_default().push(e.time_ms);
                } else if e.kind == Kind::ViewerLeft {
                    let m = json(r);
                    let arrive = {
                        let t = NaiveDateTime::parse_from_str(
                            m["arrive_time"].as_str().unwrap(),
                            "%Y-%m-%d %H:%M:%S",
                        )
                        .unwrap();
                        (t.and_utc().timestamp() - LOCAL_OFFSET_SECS) * 1000
                    };
                    assert!(arrive < e.time_ms);
                    assert!(
                        arrived.get(&who).is_some_and(|ts| ts.contains(&arrive)),
                        "{r:?} never arrived"
                    );
                }
            }
            _ => {}
        }
    }
    assert!(!ended.is_empty());
}

#[test]
fn truth_counts_add_up() {
    let g = generate(&messy(7000));
    let t = &g.truth;
    assert_eq!(t.count, 7000);
    let mut sums = (0, 0, 0, 0, 0);
    for (topic, c) in &t.topics {
        assert_eq!(c.sent, c.valid + c.duplicates + c.malformed, "{topic}");
        assert!(c.late <= c.valid);
        let n = g
            .records
            .iter()
            .filter(|r| r.topic == topic.as_str())
            .count() as u64;
        assert_eq!(c.sent, n);
        sums = (
            sums.0 + c.sent,
            sums.1 + c.valid,
            sums.2 + c.duplicates,
            sums.3 + c.malformed,
            sums.4 + c.late,
        );
    }
    assert_eq!(sums.0, t.count);
    assert_eq!(t.expected.events, sums.1 + sums.2);
    assert_eq!(t.expected.distinct_events, sums.1);
    assert_eq!(t.expected.dlq, sums.3);
    assert_eq!(t.dlq_by_reason.values().sum::<u64>(), t.expected.dlq);
    assert_eq!(t.kinds.values().sum::<u64>(), t.expected.distinct_events);
    for (kind, minutes) in &t.kinds_per_minute {
        assert_eq!(minutes.values().sum::<u64>(), t.kinds[kind], "{kind}");
    }
    let plays: u64 = t.metrics.video_plays_1m.iter().map(|r| r.plays).sum();
    assert_eq!(plays, t.kinds["video_played"]);
    let user_plays: u64 = t.metrics.user_video_plays_1m.iter().map(|r| r.plays).sum();
    assert_eq!(user_plays, plays);
    let gifts: u64 = t.metrics.gifts_by_type_1m.iter().map(|r| r.gifts).sum();
    assert_eq!(gifts, t.kinds["gift_sent"]);
    let arrivals: u64 = t
        .metrics
        .viewers_by_province_grade_1m
        .iter()
        .map(|r| r.arrivals)
        .sum();
    assert_eq!(arrivals, t.kinds["viewer_arrived"]);
    let actions: u64 = t.metrics.user_actions_1m.iter().map(|r| r.actions).sum();
    assert_eq!(actions, t.kinds["user_action"]);
    // Several plays of one video in a minute happen (the skew at work).
    assert!(t.metrics.video_plays_1m.iter().any(|r| r.plays > 1));
    // Rows come sorted.
    let keys: Vec<(&str, &str)> = t
        .metrics
        .video_plays_1m
        .iter()
        .map(|r| (r.window_start.as_str(), r.video_id.as_str()))
        .collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]));
    // And the file round-trips.
    let text = serde_json::to_string_pretty(t).unwrap();
    assert_eq!(&serde_json::from_str::<crate::Truth>(&text).unwrap(), t);
    let parsed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed.as_object().unwrap().len(), 12);
    assert!(text.starts_with(
        "{\n  \"seed\": 1,\n  \"start\": \"2021-08-16T01:00:00Z\",\n  \"count\": 7000,"
    ));
}

fn record(seq: u64, class: Class, event: Event) -> RawRecord {
    RawRecord {
        seq,
        topic: "video_events",
        key: event.video_id.clone(),
        payload: Vec::new(),
        class,
        event: Some(event),
    }
}

fn play(video: &str, user: &str, time: &str, watch_ms: Option<i64>) -> Event {
    let t = DateTime::parse_from_rfc3339(time)
        .unwrap()
        .timestamp_millis();
    let mut e = Event::new(Kind::VideoPlayed, t);
    e.video_id = Some(video.into());
    e.user_id = Some(user.into());
    e.watch_ms = watch_ms;
    e
}

fn gift(user: &str, amount: i64, time: &str) -> Event {
    let t = DateTime::parse_from_rfc3339(time)
        .unwrap()
        .timestamp_millis();
    let mut e = Event::new(Kind::GiftSent, t);
    e.user_id = Some(user.into());
    e.gift_type = Some("3".into());
    e.amount = Some(amount);
    e
}

#[test]
fn hand_checked_truth() {
    let mut b = TruthBuilder::new(&cfg(0));
    let p1 = play("100001", "2001", "2021-08-16T01:00:05Z", Some(1000));
    let events = [
        record(0, Class::Valid, p1.clone()),
        record(
            1,
            Class::Valid,
            play("100001", "2001", "2021-08-16T01:00:59.999Z", None),
        ),
        record(
            2,
            Class::Late,
            play("100001", "2002", "2021-08-16T01:00:30Z", Some(2500)),
        ),
        // A re-send: counted as sent and as an event to write, not in metrics.
        record(3, Class::Duplicate { of: 0 }, p1),
        record(
            4,
            Class::Valid,
            play("100001", "2002", "2021-08-16T01:01:00Z", Some(7)),
        ),
        record(5, Class::Valid, gift("2009", 50, "2021-08-16T01:10:00Z")),
        record(6, Class::Valid, gift("2003", 30, "2021-08-16T01:20:00Z")),
        record(7, Class::Valid, gift("2003", 20, "2021-08-16T01:59:59Z")),
        record(8, Class::Valid, gift("2004", 5, "2021-08-16T02:00:00Z")),
    ];
    for r in &events {
        b.observe(r);
    }
    b.observe(&RawRecord {
        seq: 9,
        topic: "video_events",
        key: None,
        payload: Vec::new(),
        class: Class::Malformed {
            reason: Reason::EmptyPayload,
        },
        event: None,
    });
    let t = b.finish();
    let w = |s: &str| s.to_owned();
    assert_eq!(
        t.metrics.video_plays_1m,
        vec![
            VideoPlaysRow {
                window_start: w("2021-08-16T01:00:00Z"),
                video_id: w("100001"),
                plays: 3,
                viewers: 2,
                watch_ms: 3500
            },
            VideoPlaysRow {
                window_start: w("2021-08-16T01:01:00Z"),
                video_id: w("100001"),
                plays: 1,
                viewers: 1,
                watch_ms: 7
            },
        ]
    );
    assert_eq!(
        t.metrics.user_video_plays_1m,
        vec![
            UserVideoPlaysRow {
                window_start: w("2021-08-16T01:00:00Z"),
                user_id: w("2001"),
                video_id: w("100001"),
                plays: 2
            },
            UserVideoPlaysRow {
                window_start: w("2021-08-16T01:00:00Z"),
                user_id: w("2002"),
                video_id: w("100001"),
                plays: 1
            },
            UserVideoPlaysRow {
                window_start: w("2021-08-16T01:01:00Z"),
                user_id: w("2002"),
                video_id: w("100001"),
                plays: 1
            },
        ]
    );
    // 2003 and 2009 tie at 50 in the 01:00 hour: the lower id ranks first.
    assert_eq!(
        t.metrics.top_gifters_1h,
        vec![
            TopGifterRow {
                window_start: w("2021-08-16T01:00:00Z"),
                rank: 1,
                user_id: w("2003"),
                amount: 50
            },
            TopGifterRow {
                window_start: w("2021-08-16T01:00:00Z"),
                rank: 2,
                user_id: w("2009"),
                amount: 50
            },
            TopGifterRow {
                window_start: w("2021-08-16T02:00:00Z"),
                rank: 1,
                user_id: w("2004"),
                amount: 5
            },
        ]
    );
    assert_eq!(t.metrics.gifts_by_type_1m.len(), 4);
    let vt = &t.topics["video_events"];
    assert_eq!(
        (vt.sent, vt.valid, vt.duplicates, vt.malformed, vt.late),
        (10, 8, 1, 1, 1)
    );
    assert_eq!(
        (
            t.expected.events,
            t.expected.distinct_events,
            t.expected.dlq
        ),
        (9, 8, 1)
    );
    assert_eq!(t.kinds["video_played"], 4);
    assert_eq!(t.kinds["gift_sent"], 4);
    assert_eq!(
        t.kinds_per_minute["video_played"],
        BTreeMap::from([
            (w("2021-08-16T01:00:00Z"), 3),
            (w("2021-08-16T01:01:00Z"), 1)
        ])
    );
    assert_eq!(t.dlq_by_reason["empty_payload"], 1);
}

#[test]
fn top_gifters_keep_ten_per_hour() {
    let mut b = TruthBuilder::new(&cfg(0));
    for i in 0..15 {
        b.observe(&record(
            i,
            Class::Valid,
            gift(
                &format!("{}", 3000 + i),
                10 + i as i64,
                "2021-08-16T01:30:00Z",
            ),
        ));
    }
    let rows = b.finish().metrics.top_gifters_1h;
    assert_eq!(rows.len(), 10);
    assert_eq!(rows[0].user_id, "3014");
    assert_eq!(rows[9].rank, 10);
    assert_eq!(rows[9].amount, 15);
}

#[test]
fn late_by_and_span_shape_the_times() {
    let c = GenConfig {
        late_fraction: 1.0,
        late_by: Duration::from_secs(120),
        span: Duration::from_secs(3600),
        formats: vec![Format::VideoProductionLog],
        ..cfg(100)
    };
    let g = generate(&c);
    assert!(g.records.iter().all(|r| r.class == Class::Late));
    let first = g.records[0].event.as_ref().unwrap().time_ms;
    assert_eq!(first - first % 1000, c.start.timestamp_millis() - 120_000);
    let last = g.records[99].event.as_ref().unwrap().time_ms;
    assert!(last >= c.start.timestamp_millis() + 3_564_000 - 120_000);
}

// ---- truth of the aggregator's other default metrics and leaderboards ------

fn raw(seq: u64, topic: &'static str, payload: &str, event: Event) -> RawRecord {
    RawRecord {
        seq,
        topic,
        key: None,
        payload: payload.as_bytes().to_vec(),
        class: Class::Valid,
        event: Some(event),
    }
}

fn at(time: &str) -> i64 {
    DateTime::parse_from_rfc3339(time)
        .unwrap()
        .timestamp_millis()
}

#[test]
fn hand_checked_aggregator_truth() {
    use crate::truth::{
        ActionsRankRow, Gifts6hRow, GiftsByModuleRow, OnlineUsersRow, PoolConsumptionRow,
        UserGiftsRankRow, VideoLikesRankRow,
    };
    let w = |s: &str| s.to_owned();
    let mut b = TruthBuilder::new(&cfg(0));
    let mut seq = 0;
    let mut push = |b: &mut TruthBuilder, topic: &'static str, payload: &str, e: Event| {
        b.observe(&raw(seq, topic, payload, e));
        seq += 1;
    };
    // Room 20210814 starts (module 1002); a gift in it comes first in
    // production order and still gets the module; a gift without a room
    // gets "".
    let mut g1 = gift("2001", 10, "2021-08-16T01:00:10Z");
    g1.room_id = Some("20210814".into());
    push(&mut b, "live_gift_total", "{}", g1);
    let mut start = Event::new(Kind::LiveRoomStarted, at("2021-08-16T01:00:00Z"));
    start.room_id = Some("20210814".into());
    push(
        &mut b,
        "live_room_events",
        r#"{"live_stream_id":"20210814","action":"start","module_id":"1002"}"#,
        start,
    );
    push(
        &mut b,
        "live_gift_total",
        "{}",
        gift("2002", 5, "2021-08-16T01:01:30Z"),
    );
    // Viewers: two arrive in minute 0, one leaves in minute 2.
    for (user, time, kind, arrive) in [
        (
            "2001",
            "2021-08-16T01:00:01Z",
            Kind::ViewerArrived,
            "2021-08-16 09:00:01",
        ),
        (
            "2002",
            "2021-08-16T01:00:02Z",
            Kind::ViewerArrived,
            "2021-08-16 09:00:02",
        ),
        (
            "2001",
            "2021-08-16T01:02:00Z",
            Kind::ViewerLeft,
            "2021-08-16 09:00:01",
        ),
    ] {
        let mut e = Event::new(kind, at(time));
        e.user_id = Some(user.into());
        e.room_id = Some("20210814".into());
        e.province = Some("浙江".into());
        e.grade = Some(2);
        e.event_id = Some(format!("v{user}{time}"));
        let payload = format!(r#"{{"ip":"123.0.0.1","region":1122,"arrive_time":"{arrive}"}}"#);
        push(&mut b, "live_streaming_log", &payload, e);
    }
    // Actions: consumption likes have a video; user_actions likes a target.
    let mut like = Event::new(Kind::UserAction, at("2021-08-16T01:00:03Z"));
    like.action = Some("like".into());
    like.video_id = Some("100001".into());
    push(&mut b, "video_consumption_log", "{}", like);
    let mut like2 = Event::new(Kind::UserAction, at("2021-08-16T01:00:04Z"));
    like2.action = Some("like".into());
    like2.user_id = Some("u-1".into());
    push(
        &mut b,
        "user_actions",
        r#"{"type":"like","target_id":"100002"}"#,
        like2,
    );
    let mut order = Event::new(Kind::UserAction, at("2021-08-16T01:00:05Z"));
    order.action = Some("order".into());
    push(&mut b, "user_actions", r#"{"type":"order"}"#, order);
    push(
        &mut b,
        "video_events",
        "{}",
        play("100001", "2001", "2021-08-16T01:00:06Z", None),
    );
    let t = b.finish();
    let m = &t.metrics;

    assert_eq!(
        m.gifts_by_module_1m,
        vec![
            GiftsByModuleRow {
                window_start: w("2021-08-16T01:00:00Z"),
                module_id: w("1002"),
                amount: 10
            },
            GiftsByModuleRow {
                window_start: w("2021-08-16T01:01:00Z"),
                module_id: w(""),
                amount: 5
            },
        ]
    );
    assert_eq!(
        m.online_users_1m,
        vec![
            OnlineUsersRow {
                window_start: w("2021-08-16T01:00:00Z"),
                room_id: w("20210814"),
                online: 2
            },
            OnlineUsersRow {
                window_start: w("2021-08-16T01:02:00Z"),
                room_id: w("20210814"),
                online: 1
            },
        ]
    );
    // 6-hour windows sliding by a minute: 360 hold the 01:00 gift, the one
    // starting at 01:01 holds only the second, 360 + 1 windows in all.
    assert_eq!(m.gifts_6h.len(), 361);
    assert_eq!(
        m.gifts_6h.first(),
        Some(&Gifts6hRow {
            window_start: w("2021-08-15T19:01:00Z"),
            amount: 10
        })
    );
    assert_eq!(m.gifts_6h[359].amount, 15);
    assert_eq!(
        m.gifts_6h.last(),
        Some(&Gifts6hRow {
            window_start: w("2021-08-16T01:01:00Z"),
            amount: 5
        })
    );
    // The order makes no consumption row; the user_actions like has no video.
    assert_eq!(
        m.pool_consumption_1m,
        vec![PoolConsumptionRow {
            window_start: w("2021-08-16T01:00:00Z"),
            pool: w("all"),
            video_id: w("100001"),
            plays: 1,
            likes: 1,
            comments: 0,
            shares: 0
        }]
    );
    assert_eq!(m.live_viewer_log.len(), 3);
    let left = &m.live_viewer_log[2];
    assert_eq!(left.kind, "viewer_left");
    assert_eq!(left.arrive_time, "2021-08-16T01:00:01.000Z");
    assert_eq!(left.leave_time.as_deref(), Some("2021-08-16T01:02:00.000Z"));
    assert_eq!(
        (left.ip.as_str(), left.region.as_str()),
        ("123.0.0.1", "1122")
    );
    assert_eq!(m.live_viewer_log[0].leave_time, None);

    let day = w("2021-08-16T00:00:00Z");
    assert_eq!(
        t.leaderboards.actions_daily,
        vec![
            ActionsRankRow {
                window_start: day.clone(),
                rank: 1,
                action: w("like"),
                actions: 2
            },
            ActionsRankRow {
                window_start: day.clone(),
                rank: 2,
                action: w("order"),
                actions: 1
            },
        ]
    );
    // A tie: both videos have one like, the lower id ranks first.
    assert_eq!(
        t.leaderboards.video_likes_daily,
        vec![
            VideoLikesRankRow {
                window_start: day.clone(),
                rank: 1,
                video_id: w("100001"),
                likes: 1
            },
            VideoLikesRankRow {
                window_start: day.clone(),
                rank: 2,
                video_id: w("100002"),
                likes: 1
            },
        ]
    );
    assert_eq!(
        t.leaderboards.user_gifts_daily,
        vec![
            UserGiftsRankRow {
                window_start: day.clone(),
                rank: 1,
                user_id: w("2001"),
                amount: 10
            },
            UserGiftsRankRow {
                window_start: day,
                rank: 2,
                user_id: w("2002"),
                amount: 5
            },
        ]
    );
}

#[test]
fn aggregator_truth_adds_up_on_a_messy_run() {
    let g = generate(&messy(6000));
    let t = &g.truth;
    let m = &t.metrics;
    assert_eq!(
        m.live_viewer_log.len() as u64,
        t.kinds["viewer_arrived"] + t.kinds["viewer_left"]
    );
    // The last level of each room = its arrivals − departures.
    let mut last: BTreeMap<&str, i64> = BTreeMap::new();
    for r in &m.online_users_1m {
        last.insert(&r.room_id, r.online);
    }
    assert_eq!(
        last.values().sum::<i64>(),
        t.kinds["viewer_arrived"] as i64 - t.kinds["viewer_left"] as i64
    );
    let gift_amount: i64 = m.gifts_by_type_1m.iter().map(|r| r.amount).sum();
    assert_eq!(
        m.gifts_by_module_1m.iter().map(|r| r.amount).sum::<i64>(),
        gift_amount
    );
    assert!(m.gifts_by_module_1m.iter().any(|r| r.module_id.is_empty()));
    assert!(m.gifts_by_module_1m.iter().any(|r| r.module_id == "1001"));
    assert!(m.gifts_6h.iter().all(|r| r.amount <= gift_amount));
    assert!(
        m.gifts_6h.iter().any(|r| r.amount == gift_amount),
        "one window holds the whole 10-minute run"
    );
    assert_eq!(
        m.pool_production_1m
            .iter()
            .map(|r| r.publications)
            .sum::<u64>(),
        t.kinds["video_published"]
    );
    assert_eq!(
        m.pool_consumption_1m.iter().map(|r| r.plays).sum::<u64>(),
        t.kinds["video_played"]
    );
    let l = &t.leaderboards;
    assert_eq!(
        l.actions_daily.iter().map(|r| r.actions).sum::<u64>(),
        t.kinds["user_action"]
    );
    assert_eq!(
        l.user_gifts_daily.iter().map(|r| r.amount).sum::<i64>(),
        gift_amount
    );
    let likes: u64 = l.video_likes_daily.iter().map(|r| r.likes).sum();
    assert!(
        likes > 0
            && likes
                < l.actions_daily
                    .iter()
                    .find(|r| r.action == "like")
                    .unwrap()
                    .actions
                    + 1
    );
    for w in l.user_gifts_daily.windows(2) {
        if w[0].window_start == w[1].window_start {
            assert!(
                w[0].amount > w[1].amount
                    || (w[0].amount == w[1].amount && w[0].user_id < w[1].user_id)
            );
            assert_eq!(w[1].rank, w[0].rank + 1);
        }
    }
}

/// Every time a valid, late or duplicate record carries (event and payload).
fn record_times(r: &RawRecord) -> Option<(i64, i64)> {
    let e = r.event.as_ref()?;
    let format = Format::from_topic(r.topic).unwrap();
    Some((e.time_ms, payload_time(format, &json(r))))
}

#[test]
fn start_now_never_dates_a_record_after_now() {
    // "Now" with milliseconds, so rounding the wrong way would show.
    let now =
        Utc.with_ymd_and_hms(2024, 5, 6, 7, 8, 9).unwrap() + chrono::Duration::milliseconds(750);
    let now_ms = now.timestamp_millis();
    let span = Duration::from_secs(600);
    let c = GenConfig {
        start: crate::config::parse_start("now", now, span).unwrap(),
        span,
        ..messy(6000)
    };
    c.validate().unwrap();
    let g = generate(&c);
    let mut latest = i64::MIN;
    for r in &g.records {
        if let Some((event_ms, payload_ms)) = record_times(r) {
            assert!(event_ms <= now_ms, "{r:?} is after now ({now})");
            assert!(payload_ms <= now_ms, "{r:?} says a time after now ({now})");
            latest = latest.max(event_ms);
        }
    }
    // The span ends at now, not somewhere before it.
    assert!(latest >= now_ms - 3_000, "latest {latest}, now {now_ms}");
    let last_minute = g
        .truth
        .kinds_per_minute
        .values()
        .flat_map(|m| m.keys())
        .max()
        .unwrap();
    assert!(
        DateTime::parse_from_rfc3339(last_minute)
            .unwrap()
            .timestamp_millis()
            <= now_ms,
        "{last_minute}"
    );
}

#[test]
fn wall_clock_stamps_each_record_with_the_clock_it_was_sent_at() {
    let t0 = Utc.with_ymd_and_hms(2024, 5, 6, 7, 8, 9).unwrap();
    let c = GenConfig {
        start: t0,
        wall_clock: true,
        ..messy(4000)
    };
    let late_by = c.late_by.as_millis() as i64;
    let mut g = crate::Generator::new(&c);
    let mut truth = TruthBuilder::new(&c);
    let mut lates = 0;
    for i in 0..4000i64 {
        // 137 ms apart: the run spans about 9 minutes of clock.
        let clock = t0.timestamp_millis() + i * 137 + 3;
        g.set_clock(clock);
        let r = g.next().unwrap();
        truth.observe(&r);
        let Some((event_ms, payload_ms)) = record_times(&r) else {
            continue;
        };
        assert!(
            payload_ms <= clock && event_ms <= clock,
            "{r:?} after its clock {clock}"
        );
        match r.class {
            Class::Valid => assert!(event_ms > clock - 2_000, "{r:?} far behind {clock}"),
            Class::Late => {
                lates += 1;
                assert!(event_ms <= clock - late_by + 1_000, "{r:?}");
            }
            _ => {}
        }
    }
    assert!(g.next().is_none());
    assert!(lates > 200);
    let t = truth.finish();
    let minutes: BTreeSet<&String> = t.kinds_per_minute.values().flat_map(|m| m.keys()).collect();
    assert!(minutes.len() >= 9, "times follow the clock: {minutes:?}");
}

#[test]
fn rollups_sum_counts_and_unite_distinct_sets() {
    // Few users over ten minutes: the same users come back minute after minute.
    let g = generate(&GenConfig {
        users: 40,
        ..messy(6000)
    });
    let t = &g.truth;
    let r = &t.rollups;
    let amount: i64 = t.metrics.gifts_by_type_1m.iter().map(|r| r.amount).sum();
    assert_eq!(
        r.gifts_by_type_1m.iter().map(|r| r.amount).sum::<i64>(),
        amount
    );
    for row in &r.gifts_by_type_1m {
        let minutes: Vec<_> = t
            .metrics
            .gifts_by_type_1m
            .iter()
            .filter(|m| m.gift_type == row.gift_type)
            .collect();
        assert_eq!(row.gifts, minutes.iter().map(|m| m.gifts).sum::<u64>());
        // Late records reach back a minute before the span.
        assert_eq!(row.window_start, t.metrics.gifts_by_type_1m[0].window_start);
        assert_eq!(row.window_end, "2021-08-16T01:10:00Z");
        // The union is smaller than the sum of per-minute distinct counts.
        assert!(row.givers < minutes.iter().map(|m| m.givers).sum::<u64>());
    }
    // Members per grade: the distinct arriving users, counted from the records.
    let mut users: BTreeMap<i32, BTreeSet<String>> = BTreeMap::new();
    for rec in g.records.iter().filter(|r| r.class.is_valid()) {
        let e = rec.event.as_ref().unwrap();
        if e.kind == Kind::ViewerArrived {
            users
                .entry(e.grade.unwrap())
                .or_default()
                .insert(e.user_id.clone().unwrap());
        }
    }
    let got: BTreeMap<i32, u64> = r
        .members_by_grade_1m
        .iter()
        .map(|m| (m.grade, m.members))
        .collect();
    let want: BTreeMap<i32, u64> = users.iter().map(|(g, u)| (*g, u.len() as u64)).collect();
    assert_eq!(got, want);
    let per_minute: u64 = t
        .metrics
        .members_by_grade_1m
        .iter()
        .map(|m| m.members)
        .sum();
    assert!(got.values().sum::<u64>() < per_minute);
    // Top gifters: ten, ranked on the run's totals.
    assert_eq!(r.top_gifters_1h.len(), 10);
    assert!(
        r.top_gifters_1h
            .windows(2)
            .all(|w| w[0].amount >= w[1].amount)
    );
    assert_eq!(r.top_gifters_1h[0].window_end, "2021-08-16T02:00:00Z");
}
