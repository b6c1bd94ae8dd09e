//! The seeds' raw JSON formats (docs/mapping.md, "Presets"), built field by
//! field in the seeds' order, and the per-format facts the malformed-record
//! builder needs (which fields are ids, times, event types).
//!
//! Records are assembled as ordered `(name, json text)` pairs rather than
//! through `serde_json::Map`, so field order matches the seeds and corrupt
//! values (raw bytes, deep nesting) can be spliced in.

use std::fmt::Write as _;

use chrono::{DateTime, Datelike, Timelike};
use serde_json::Value;

use crate::model::Format;

/// The seed's province list (seed 002), in its order.
pub const PROVINCES: [&str; 34] = [
    "北京",
    "广东",
    "山东",
    "江苏",
    "河南",
    "上海",
    "河北",
    "浙江",
    "香港",
    "陕西",
    "湖南",
    "重庆",
    "福建",
    "天津",
    "云南",
    "四川",
    "广西",
    "安徽",
    "海南",
    "江西",
    "湖北",
    "山西",
    "辽宁",
    "台湾",
    "黑龙江",
    "内蒙古",
    "澳门",
    "贵州",
    "甘肃",
    "青海",
    "新疆",
    "西藏",
    "吉林",
    "宁夏",
];

/// Video categories of the production log.
pub const CATEGORIES: [&str; 10] = [
    "food",
    "game",
    "music",
    "travel",
    "pets",
    "sports",
    "tech",
    "beauty",
    "comedy",
    "education",
];

pub const RESOLUTIONS: [&str; 4] = ["1920x1080", "1280x720", "3840x2160", "720x1280"];
pub const ROOM_TYPES: [&str; 5] = ["game", "show", "music", "outdoor", "education"];
pub const CLIENTS: [&str; 4] = ["android", "ios", "web", "pc"];
pub const ADDRESSES: [&str; 6] = [
    "杭州市西湖区",
    "北京市朝阳区",
    "上海市浦东新区",
    "广州市天河区",
    "成都市武侯区",
    "深圳市南山区",
];

/// Offset of the seeds' local times (Asia/Shanghai). The zone has had no
/// daylight saving since 1991, so a fixed +08:00 is exact for the whole
/// range of valid event times (2000..2100).
pub const LOCAL_OFFSET_SECS: i64 = 8 * 3600;

/// How a format writes its event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeStyle {
    /// `"2025-04-05T10:00:00Z"` or `"2025-04-05T10:00:00.250Z"`.
    Iso,
    /// `"2021-08-16 09:48:01"`, Asia/Shanghai, whole seconds.
    Local,
    /// `1629075600123`.
    EpochMs,
    /// `1629075601.5`.
    EpochSecs,
}

impl Format {
    /// How this format writes its times.
    pub fn time_style(self) -> TimeStyle {
        match self {
            Format::VideoEvents | Format::VideoMessages | Format::PlayRequest => TimeStyle::Iso,
            Format::LiveStreamingLog | Format::LiveGiftTotal | Format::LiveRoomEvents => {
                TimeStyle::Local
            }
            Format::VideoProductionLog => TimeStyle::EpochMs,
            Format::VideoConsumptionLog | Format::UserActions => TimeStyle::EpochSecs,
        }
    }
}

/// `2025-04-05T10:00:00Z`, with `.250` milliseconds when `millis`.
pub fn iso_time(ms: i64, millis: bool) -> String {
    let mut out = civil(ms.div_euclid(1000), 'T');
    if millis {
        let _ = write!(out, ".{:03}", ms.rem_euclid(1000));
    }
    out.push('Z');
    out
}

/// `2021-08-16 09:48:01` in Asia/Shanghai (sub-second part dropped).
pub fn local_time(ms: i64) -> String {
    civil(ms.div_euclid(1000) + LOCAL_OFFSET_SECS, ' ')
}

/// `YYYY-MM-DD<sep>HH:MM:SS` of epoch seconds `secs` read as UTC.
/// (Written by hand: strftime parsing dominated the generator's profile.)
fn civil(secs: i64, sep: char) -> String {
    let mut out = String::with_capacity(24);
    if let Some(t) = DateTime::from_timestamp(secs, 0) {
        let _ = write!(
            out,
            "{:04}-{:02}-{:02}{sep}{:02}:{:02}:{:02}",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
    }
    out
}

/// Epoch seconds as a JSON float with the milliseconds written exactly:
/// `1629075601.5`, `1629075601.0`, `1732200000.123`.
pub fn epoch_secs_text(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let frac = format!("{:03}", ms.rem_euclid(1000));
    let frac = frac.trim_end_matches('0');
    format!("{secs}.{}", if frac.is_empty() { "0" } else { frac })
}

/// The JSON value of an event time in `style`.
pub fn time_json(style: TimeStyle, ms: i64, millis: bool) -> String {
    match style {
        TimeStyle::Iso => json_str(&iso_time(ms, millis)),
        TimeStyle::Local => json_str(&local_time(ms)),
        TimeStyle::EpochMs => ms.to_string(),
        TimeStyle::EpochSecs => epoch_secs_text(ms),
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        let mut out = String::with_capacity(s.len() + 2);
        out.push('"');
        out.push_str(s);
        out.push('"');
        out
    } else {
        Value::from(s).to_string()
    }
}

/// A JSON object under construction: ordered `(field, json text)` pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draft {
    fields: Vec<(&'static str, String)>,
}

impl Draft {
    pub fn new() -> Draft {
        Draft::default()
    }

    /// Adds a string field.
    pub fn str(mut self, name: &'static str, v: &str) -> Draft {
        self.fields.push((name, json_str(v)));
        self
    }

    /// Adds an integer field.
    pub fn int(mut self, name: &'static str, v: i64) -> Draft {
        self.fields.push((name, v.to_string()));
        self
    }

    /// Adds a field whose value is already JSON text.
    pub fn raw(mut self, name: &'static str, json: String) -> Draft {
        self.fields.push((name, json));
        self
    }

    /// Replaces `name`'s value, or appends the field.
    pub fn set(&mut self, name: &'static str, json: String) {
        match self.fields.iter_mut().find(|(n, _)| *n == name) {
            Some(field) => field.1 = json,
            None => self.fields.push((name, json)),
        }
    }

    /// Removes `name`; whether it was there.
    pub fn remove(&mut self, name: &'static str) -> bool {
        let before = self.fields.len();
        self.fields.retain(|(n, _)| *n != name);
        self.fields.len() != before
    }

    /// The JSON text of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The compact JSON object.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = String::with_capacity(
            16 + self
                .fields
                .iter()
                .map(|(n, v)| n.len() + v.len() + 4)
                .sum::<usize>(),
        );
        out.push('{');
        for (i, (name, value)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            out.push_str(name);
            out.push_str("\":");
            out.push_str(value);
        }
        out.push('}');
        out.into_bytes()
    }
}

/// Seed 000: `video_events`.
pub fn video_event(
    event_type: &str,
    video_id: &str,
    user_id: &str,
    time: String,
    watch_ms: Option<i64>,
) -> Draft {
    let d = Draft::new()
        .str("event_type", event_type)
        .str("video_id", video_id)
        .str("user_id", user_id)
        .raw("timestamp", time);
    match watch_ms {
        Some(w) => d.int("watch_ms", w),
        None => d,
    }
}

/// Seed 001: `video_messages` (metadata only).
pub fn video_message(video_id: &str, resolution: &str, duration_s: i64, time: String) -> Draft {
    Draft::new()
        .str("video_id", video_id)
        .str("url", &format!("https://cdn.example/v/{video_id}.mp4"))
        .str("resolution", resolution)
        .int("duration_s", duration_s)
        .raw("timestamp", time)
}

/// Seed 001: `play_request`.
pub fn play_request(user_id: &str, video_id: &str, time: String) -> Draft {
    Draft::new()
        .str("user_id", user_id)
        .str("video_id", video_id)
        .raw("start_time", time)
}

/// The seed's ip for a numeric user id.
pub fn ip_of(user: u64) -> String {
    format!("123.0.0.{}", user % 255)
}

/// The seed's member grade for a numeric user id.
pub fn grade_of(user: u64) -> i64 {
    (user % 5 + 1) as i64
}

/// Seed 002: `live_streaming_log`. `leave_ms == arrive_ms` is an arrival,
/// `leave_ms > arrive_ms` a departure.
pub fn live_streaming(
    user: u64,
    room: u64,
    arrive_ms: i64,
    leave_ms: i64,
    region: i64,
    province: &str,
) -> Draft {
    let arrive = json_str(&local_time(arrive_ms));
    Draft::new()
        .int("user_id", user as i64)
        .str("ip", &ip_of(user))
        .int("room_id", room as i64)
        .raw("arrive_time", arrive.clone())
        .raw("create_time", arrive)
        .raw("leave_time", json_str(&local_time(leave_ms)))
        .int("region", region)
        .int("grade", grade_of(user))
        .str("province", province)
}

/// Seed 002: `live_gift_total`; the seed's own generator omits `room_id`
/// and `ip`, so `room` is optional.
pub fn live_gift(user: u64, gift_type: i64, amount: i64, room: Option<u64>, time_ms: i64) -> Draft {
    let mut d = Draft::new()
        .int("user_id", user as i64)
        .int("gift_type", gift_type)
        .int("gift_total_amount", amount);
    if let Some(room) = room {
        d = d.int("room_id", room as i64).str("ip", &ip_of(user));
    }
    let t = json_str(&local_time(time_ms));
    d.raw("create_time", t.clone()).raw("update_time", t)
}

/// A live room's profile (seed 003's CommonModel fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomProfile {
    pub room_type: &'static str,
    pub client: &'static str,
    pub title: String,
    pub address: &'static str,
    pub anchor_id: String,
    pub module_id: String,
}

/// Seed 003: `live_room_events`.
pub fn live_room(room_id: &str, action: &str, p: &RoomProfile, time_ms: i64) -> Draft {
    Draft::new()
        .str("live_stream_id", room_id)
        .str("action", action)
        .str("type", p.room_type)
        .str("client", p.client)
        .str("title", &p.title)
        .str("address", p.address)
        .str("anchor_id", &p.anchor_id)
        .str("module_id", &p.module_id)
        .raw("time", json_str(&local_time(time_ms)))
}

/// Seed 003: `video_production_log`.
pub fn video_production(author_id: &str, video_id: &str, category: &str, time_ms: i64) -> Draft {
    Draft::new()
        .str("author_id", author_id)
        .str("video_id", video_id)
        .str("action", "publish")
        .str("category", category)
        .int("time", time_ms)
}

/// Seed 003: `video_consumption_log`; `watch_ms` only on plays.
pub fn video_consumption(
    video_id: &str,
    author_id: &str,
    user_id: &str,
    action: &str,
    watch_ms: Option<i64>,
    time_ms: i64,
) -> Draft {
    let mut d = Draft::new()
        .str("video_id", video_id)
        .str("author_id", author_id)
        .str("user_id", user_id)
        .str("action", action);
    if let Some(w) = watch_ms {
        d = d.int("watch_ms", w);
    }
    d.raw("time", epoch_secs_text(time_ms))
}

/// Seed 004: `user_actions`; the seed sends only `type` and `timestamp`.
pub fn user_action(action: &str, time_ms: i64, who: Option<(&str, &str)>) -> Draft {
    let d = Draft::new()
        .str("type", action)
        .raw("timestamp", epoch_secs_text(time_ms));
    match who {
        Some((user, target)) => d.str("user_id", user).str("target_id", target),
        None => d,
    }
}

/// What the malformed-record builder needs to know about a format.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// Every field holding the event time (all are corrupted together, so
    /// no fallback field can rescue the record).
    pub time_fields: &'static [&'static str],
    /// A field the record cannot do without (an id, or `type`).
    pub key_field: &'static str,
    /// Whether the format's ids are JSON numbers.
    pub numeric_ids: bool,
    /// Required fields, removed in turn for `missing_field`.
    pub required: &'static [&'static str],
    /// The event-type field and a value no preset knows.
    pub kind_field: Option<(&'static str, &'static str)>,
    /// A field that must not be negative.
    pub non_negative: Option<&'static str>,
    /// Whether `key_field` is an id that `invalid_id` can break (the ids of
    /// `user_actions` are optional, so an empty one may read as absent).
    pub has_required_id: bool,
}

pub(crate) fn shape(f: Format) -> Shape {
    match f {
        Format::VideoEvents => Shape {
            time_fields: &["timestamp"],
            key_field: "video_id",
            numeric_ids: false,
            required: &["video_id", "timestamp"],
            kind_field: Some(("event_type", "video_deleted")),
            non_negative: None,
            has_required_id: true,
        },
        Format::VideoMessages => Shape {
            time_fields: &["timestamp"],
            key_field: "video_id",
            numeric_ids: false,
            required: &["video_id", "timestamp"],
            kind_field: None,
            non_negative: Some("duration_s"),
            has_required_id: true,
        },
        Format::PlayRequest => Shape {
            time_fields: &["start_time"],
            key_field: "video_id",
            numeric_ids: false,
            required: &["video_id", "start_time"],
            kind_field: None,
            non_negative: None,
            has_required_id: true,
        },
        Format::LiveStreamingLog => Shape {
            time_fields: &["arrive_time", "create_time", "leave_time"],
            key_field: "room_id",
            numeric_ids: true,
            required: &["user_id", "room_id"],
            kind_field: None,
            non_negative: None,
            has_required_id: true,
        },
        Format::LiveGiftTotal => Shape {
            time_fields: &["create_time", "update_time"],
            key_field: "user_id",
            numeric_ids: true,
            required: &["user_id", "gift_type", "gift_total_amount"],
            kind_field: None,
            non_negative: Some("gift_total_amount"),
            has_required_id: true,
        },
        Format::LiveRoomEvents => Shape {
            time_fields: &["time"],
            key_field: "live_stream_id",
            numeric_ids: false,
            required: &["live_stream_id", "time"],
            kind_field: Some(("action", "pause")),
            non_negative: None,
            has_required_id: true,
        },
        Format::VideoProductionLog => Shape {
            time_fields: &["time"],
            key_field: "author_id",
            numeric_ids: false,
            required: &["author_id", "video_id", "time"],
            kind_field: None,
            non_negative: None,
            has_required_id: true,
        },
        Format::VideoConsumptionLog => Shape {
            time_fields: &["time"],
            key_field: "video_id",
            numeric_ids: false,
            // The template is always a play, which needs its video id.
            required: &["video_id", "time"],
            kind_field: Some(("action", "dance")),
            non_negative: None,
            has_required_id: true,
        },
        Format::UserActions => Shape {
            time_fields: &["timestamp"],
            key_field: "type",
            numeric_ids: false,
            required: &["type", "timestamp"],
            kind_field: Some(("type", "teleport")),
            non_negative: None,
            has_required_id: false,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    // 2021-08-16T01:48:01Z
    const T: i64 = 1_629_078_481_000;

    #[test]
    fn time_texts() {
        assert_eq!(iso_time(T, false), "2021-08-16T01:48:01Z");
        assert_eq!(iso_time(T + 250, true), "2021-08-16T01:48:01.250Z");
        assert_eq!(local_time(T + 999), "2021-08-16 09:48:01");
        assert_eq!(iso_time(0, true), "1970-01-01T00:00:00.000Z");
        assert_eq!(local_time(0), "1970-01-01 08:00:00");
        assert_eq!(json_str("浙江"), "\"浙江\"");
        assert_eq!(json_str("a\"b\\\n"), r#""a\"b\\\n""#);
        assert_eq!(epoch_secs_text(1_629_075_601_500), "1629075601.5");
        assert_eq!(epoch_secs_text(1_629_075_601_000), "1629075601.0");
        assert_eq!(epoch_secs_text(1_732_200_000_123), "1732200000.123");
        assert_eq!(
            time_json(TimeStyle::EpochMs, 1_629_075_600_123, false),
            "1629075600123"
        );
    }

    #[test]
    fn seed_shapes() {
        let d = live_streaming(3165, 20210813, T, T, 1122, "浙江");
        assert_eq!(
            String::from_utf8(d.to_bytes()).unwrap(),
            r#"{"user_id":3165,"ip":"123.0.0.105","room_id":20210813,"arrive_time":"2021-08-16 09:48:01","create_time":"2021-08-16 09:48:01","leave_time":"2021-08-16 09:48:01","region":1122,"grade":1,"province":"浙江"}"#
        );
        let d = live_gift(3994, 3, 28, None, T);
        assert_eq!(
            String::from_utf8(d.to_bytes()).unwrap(),
            r#"{"user_id":3994,"gift_type":3,"gift_total_amount":28,"create_time":"2021-08-16 09:48:01","update_time":"2021-08-16 09:48:01"}"#
        );
        let d = user_action("like", 1_732_200_000_123, Some(("u-5", "100009")));
        assert_eq!(
            String::from_utf8(d.to_bytes()).unwrap(),
            r#"{"type":"like","timestamp":1732200000.123,"user_id":"u-5","target_id":"100009"}"#
        );
    }

    #[test]
    fn draft_edits() {
        let mut d = play_request("1", "2", json_str("x"));
        d.set("video_id", "{\"a\":1}".into());
        assert!(d.remove("user_id"));
        assert!(!d.remove("user_id"));
        assert_eq!(d.get("start_time"), Some("\"x\""));
        assert_eq!(
            d.to_bytes(),
            br#"{"video_id":{"a":1},"start_time":"x"}"#.to_vec()
        );
    }
}
