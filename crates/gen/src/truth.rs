//! The ground truth of a run: what the pipeline must report, computed from
//! the records as they are produced.
//!
//! Record counts cover every record; kinds and metrics cover the *valid,
//! distinct* events (duplicates excluded, late events included), grouped in
//! tumbling UTC windows of event time. Every map is a `BTreeMap` and every
//! row list is sorted (window, then group fields), so the JSON is stable.
//!
//! Adding a metric: a field in [`Metrics`] (the rows) and in
//! `MetricsBuilder` (the accumulator), an arm in `MetricsBuilder::observe`,
//! and a line in `MetricsBuilder::finish`.
//!
//! `metrics` and `leaderboards` have exactly the names and row shapes that
//! `vidpulse query <name> --format json` prints for the aggregator's
//! built-in spec (docs/metrics.md), so a test compares them directly. The
//! metrics that read `vp.monitored.v1` (`gifts_by_module_1m`, `pool_*`) are
//! given for a site-wide monitor pool named `all` whose enrichment carries
//! each room's `module_id`; for another pool keep the rows of its members.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use chrono::NaiveDateTime;
use serde_json::Value;

use crate::config::GenConfig;
use crate::formats::{LOCAL_OFFSET_SECS, iso_time};
use crate::model::{Class, Event, Kind, RawRecord, Reason};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;
/// `gifts_6h`: a 6-hour window sliding by one minute.
const GIFTS_6H_PANES: i64 = 360;
/// The site-wide monitor pool the `pool_*` rows are given for.
pub const ALL_POOL: &str = "all";
/// Rows per window of `top_gifters_1h`.
pub const TOP_GIFTERS: usize = 10;

/// The truth file (`--truth`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Truth {
    pub seed: u64,
    /// Event time of the first record, RFC 3339 UTC.
    pub start: String,
    /// Records sent.
    pub count: u64,
    pub event_ids: bool,
    /// Per raw topic (unprefixed), for each generated format.
    pub topics: BTreeMap<String, TopicCounts>,
    pub expected: Expected,
    /// Malformed records per DLQ reason code (every code, 0 included).
    pub dlq_by_reason: BTreeMap<String, u64>,
    /// Valid distinct events per canonical kind (every kind, 0 included).
    pub kinds: BTreeMap<String, u64>,
    /// Valid distinct events per kind per event-time minute (non-zero only).
    pub kinds_per_minute: BTreeMap<String, BTreeMap<String, u64>>,
    pub metrics: Metrics,
    pub leaderboards: Leaderboards,
    /// The seed-002 dashboard metrics rolled up over the whole run.
    #[serde(default)]
    pub rollups: Rollups,
}

/// Records of one raw topic. `sent = valid + duplicates + malformed`;
/// `late` is the part of `valid` whose event time was set back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicCounts {
    pub sent: u64,
    pub valid: u64,
    pub duplicates: u64,
    pub malformed: u64,
    pub late: u64,
}

/// What ingest must write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    /// Records on `vp.events.v1`: valid + duplicates (a duplicate is
    /// normalized again, with the same event id).
    pub events: u64,
    /// Distinct event ids among them.
    pub distinct_events: u64,
    /// Records on `vp.dlq.v1`: the malformed ones.
    pub dlq: u64,
}

/// Windowed metrics over valid distinct events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// `video_played` from `video_events` and `video_consumption_log`.
    pub video_plays_1m: Vec<VideoPlaysRow>,
    pub user_video_plays_1m: Vec<UserVideoPlaysRow>,
    /// `gift_sent`.
    pub gifts_by_type_1m: Vec<GiftsByTypeRow>,
    /// `viewer_arrived`.
    pub viewers_by_province_grade_1m: Vec<ViewersByProvinceGradeRow>,
    /// Distinct arriving users per grade.
    pub members_by_grade_1m: Vec<MembersByGradeRow>,
    /// `user_action` from `user_actions` and `video_consumption_log`.
    pub user_actions_1m: Vec<UserActionsRow>,
    /// Top gifting users per hour by summed amount (ties: user id ascending,
    /// as text).
    pub top_gifters_1h: Vec<TopGifterRow>,
    /// Every distinct viewer arrival and departure (the seed's raw log).
    pub live_viewer_log: Vec<ViewerLogRow>,
    /// Viewers online per room at the end of each minute that had viewer
    /// events in that room: arrivals minus departures since the start.
    pub online_users_1m: Vec<OnlineUsersRow>,
    /// Gift amount per module per minute; a gift's module is its room's
    /// (from the room's start records), `""` without a room or start.
    pub gifts_by_module_1m: Vec<GiftsByModuleRow>,
    /// Gift amount per 6-hour window sliding by a minute: every window that
    /// holds a gift.
    pub gifts_6h: Vec<Gifts6hRow>,
    /// Publications per author per minute, pool `all`.
    pub pool_production_1m: Vec<PoolProductionRow>,
    /// Plays and consumption-log likes / comments / shares per video per
    /// minute, pool `all`.
    pub pool_consumption_1m: Vec<PoolConsumptionRow>,
}

/// The Redis leaderboards, every member of every UTC day, ranked by score
/// descending, ties by member ascending (as text).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Leaderboards {
    /// User actions per type (the seed's `rankings`).
    pub actions_daily: Vec<ActionsRankRow>,
    /// Likes per liked video (`target_id`, else `video_id`).
    pub video_likes_daily: Vec<VideoLikesRankRow>,
    /// Gift amount per user.
    pub user_gifts_daily: Vec<UserGiftsRankRow>,
}

/// One row per group over every window of the run, exactly as `vidpulse
/// query <name> --rollup --format json` prints it without `--from`/`--to`:
/// `window_start` is the metric's first window, `window_end` the end of
/// its last; sums and counts are summed, distinct counts are the size of
/// the union over windows (never a sum of per-window counts), the top-N is
/// ranked on the totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollups {
    pub gifts_by_type_1m: Vec<GiftsByTypeRollupRow>,
    pub members_by_grade_1m: Vec<MembersByGradeRollupRow>,
    pub viewers_by_province_grade_1m: Vec<ViewersByProvinceGradeRollupRow>,
    pub top_gifters_1h: Vec<TopGifterRollupRow>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GiftsByTypeRollupRow {
    pub window_start: String,
    pub window_end: String,
    pub gift_type: String,
    pub amount: i64,
    pub gifts: u64,
    /// Distinct givers over the whole range.
    pub givers: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersByGradeRollupRow {
    pub window_start: String,
    pub window_end: String,
    pub grade: i32,
    /// Distinct arriving members over the whole range.
    pub members: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewersByProvinceGradeRollupRow {
    pub window_start: String,
    pub window_end: String,
    pub province: String,
    pub grade: i32,
    pub arrivals: u64,
    pub viewers: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopGifterRollupRow {
    pub window_start: String,
    pub window_end: String,
    pub rank: u32,
    pub user_id: String,
    pub amount: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewerLogRow {
    /// RFC 3339 with milliseconds.
    pub event_time: String,
    /// `None` when records carry no event id (`--event-ids false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// `viewer_arrived` or `viewer_left`.
    pub kind: String,
    pub user_id: String,
    pub room_id: String,
    pub ip: String,
    pub region: String,
    pub grade: i32,
    pub province: String,
    /// When the visit began, RFC 3339 with milliseconds.
    pub arrive_time: String,
    /// Departures: when the visit ended; arrivals: null.
    pub leave_time: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnlineUsersRow {
    pub window_start: String,
    pub room_id: String,
    pub online: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GiftsByModuleRow {
    pub window_start: String,
    pub module_id: String,
    pub amount: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gifts6hRow {
    pub window_start: String,
    pub amount: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolProductionRow {
    pub window_start: String,
    pub pool: String,
    pub author_id: String,
    pub publications: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConsumptionRow {
    pub window_start: String,
    pub pool: String,
    pub video_id: String,
    pub plays: u64,
    pub likes: u64,
    pub comments: u64,
    pub shares: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionsRankRow {
    /// The UTC day, `…T00:00:00Z`.
    pub window_start: String,
    pub rank: u32,
    #[serde(rename = "type")]
    pub action: String,
    pub actions: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoLikesRankRow {
    pub window_start: String,
    pub rank: u32,
    pub video_id: String,
    pub likes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserGiftsRankRow {
    pub window_start: String,
    pub rank: u32,
    pub user_id: String,
    pub amount: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoPlaysRow {
    pub window_start: String,
    pub video_id: String,
    pub plays: u64,
    /// Distinct user ids.
    pub viewers: u64,
    /// Sum of `watch_ms` (plays without it add 0).
    pub watch_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserVideoPlaysRow {
    pub window_start: String,
    pub user_id: String,
    pub video_id: String,
    pub plays: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GiftsByTypeRow {
    pub window_start: String,
    pub gift_type: String,
    pub amount: i64,
    pub gifts: u64,
    /// Distinct user ids.
    pub givers: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewersByProvinceGradeRow {
    pub window_start: String,
    pub province: String,
    pub grade: i32,
    pub arrivals: u64,
    /// Distinct user ids.
    pub viewers: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersByGradeRow {
    pub window_start: String,
    pub grade: i32,
    pub members: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserActionsRow {
    pub window_start: String,
    #[serde(rename = "type")]
    pub action: String,
    pub actions: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopGifterRow {
    pub window_start: String,
    /// 1-based position in the window.
    pub rank: u32,
    pub user_id: String,
    pub amount: i64,
}

/// Accumulates the truth record by record, in production order.
#[derive(Debug)]
pub struct TruthBuilder {
    seed: u64,
    start: String,
    event_ids: bool,
    count: u64,
    topics: BTreeMap<&'static str, TopicCounts>,
    dlq: BTreeMap<&'static str, u64>,
    kinds: BTreeMap<&'static str, u64>,
    per_minute: BTreeMap<&'static str, BTreeMap<i64, u64>>,
    metrics: MetricsBuilder,
}

impl TruthBuilder {
    pub fn new(cfg: &GenConfig) -> TruthBuilder {
        TruthBuilder {
            seed: cfg.seed,
            start: iso_time(cfg.start.timestamp_millis(), false),
            event_ids: cfg.event_ids,
            count: 0,
            topics: cfg
                .chosen_formats()
                .into_iter()
                .map(|f| (f.topic(), TopicCounts::default()))
                .collect(),
            dlq: Reason::ALL.into_iter().map(|r| (r.code(), 0)).collect(),
            kinds: Kind::ALL.into_iter().map(|k| (k.name(), 0)).collect(),
            per_minute: BTreeMap::new(),
            metrics: MetricsBuilder::default(),
        }
    }

    /// Accounts for one record that was sent.
    pub fn observe(&mut self, record: &RawRecord) {
        self.count += 1;
        let topic = self.topics.entry(record.topic).or_default();
        topic.sent += 1;
        match record.class {
            Class::Valid | Class::Late => {
                topic.valid += 1;
                if record.class == Class::Late {
                    topic.late += 1;
                }
                if let Some(event) = &record.event {
                    self.observe_event(record, event);
                }
            }
            Class::Duplicate { .. } => topic.duplicates += 1,
            Class::Malformed { reason } => {
                topic.malformed += 1;
                *self.dlq.entry(reason.code()).or_default() += 1;
            }
        }
    }

    fn observe_event(&mut self, record: &RawRecord, event: &Event) {
        *self.kinds.entry(event.kind.name()).or_default() += 1;
        *self
            .per_minute
            .entry(event.kind.name())
            .or_default()
            .entry(window(event.time_ms, MINUTE_MS))
            .or_default() += 1;
        self.metrics.observe(record, event);
    }

    pub fn finish(mut self) -> Truth {
        let (valid, duplicates, malformed) = self.topics.values().fold((0, 0, 0), |acc, t| {
            (acc.0 + t.valid, acc.1 + t.duplicates, acc.2 + t.malformed)
        });
        Truth {
            seed: self.seed,
            start: self.start,
            count: self.count,
            event_ids: self.event_ids,
            topics: self
                .topics
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            expected: Expected {
                events: valid + duplicates,
                distinct_events: valid,
                dlq: malformed,
            },
            dlq_by_reason: self
                .dlq
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            kinds: self
                .kinds
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            kinds_per_minute: self
                .per_minute
                .into_iter()
                .map(|(k, minutes)| {
                    let minutes = minutes.into_iter().map(|(w, n)| (stamp(w), n)).collect();
                    (k.to_owned(), minutes)
                })
                .collect(),
            leaderboards: self.metrics.finish_leaderboards(),
            rollups: self.metrics.finish_rollups(),
            metrics: self.metrics.finish(),
        }
    }
}

fn window(ms: i64, size: i64) -> i64 {
    ms - ms.rem_euclid(size)
}

fn stamp(window_ms: i64) -> String {
    iso_time(window_ms, false)
}

#[derive(Debug, Default)]
struct PlaysAcc {
    plays: u64,
    viewers: BTreeSet<String>,
    watch_ms: i64,
}

#[derive(Debug, Default)]
struct GiftsAcc {
    amount: i64,
    gifts: u64,
    givers: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct ArrivalsAcc {
    arrivals: u64,
    viewers: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct ConsumptionAcc {
    plays: u64,
    likes: u64,
    comments: u64,
    shares: u64,
}

/// One accumulator per metric, keyed by (window start ms, group fields).
#[derive(Debug, Default)]
struct MetricsBuilder {
    video_plays: BTreeMap<(i64, String), PlaysAcc>,
    user_video_plays: BTreeMap<(i64, String, String), u64>,
    gifts_by_type: BTreeMap<(i64, String), GiftsAcc>,
    viewers_by_province_grade: BTreeMap<(i64, String, i32), ArrivalsAcc>,
    members_by_grade: BTreeMap<(i64, i32), BTreeSet<String>>,
    user_actions: BTreeMap<(i64, String), u64>,
    gifted_1h: BTreeMap<(i64, String), i64>,
    /// (event time, event id) → row, to sort by time.
    viewer_log: BTreeMap<(i64, String, u64), ViewerLogRow>,
    /// (room, minute) → arrivals − departures.
    online_delta: BTreeMap<(String, i64), i64>,
    /// (minute, room or None) → amount; rooms get their module at the end.
    gifts_by_room: BTreeMap<(i64, Option<String>), i64>,
    /// Room → module, from every valid room start.
    room_module: BTreeMap<String, String>,
    /// Minute → amount, expanded into 6-hour windows at the end.
    gifts_per_minute: BTreeMap<i64, i64>,
    publications: BTreeMap<(i64, String), u64>,
    consumption: BTreeMap<(i64, String), ConsumptionAcc>,
    actions_daily: BTreeMap<(i64, String), u64>,
    likes_daily: BTreeMap<(i64, String), u64>,
    gifts_daily: BTreeMap<(i64, String), i64>,
}

/// The raw JSON of a valid record (its payload is always a JSON object).
fn payload(record: &RawRecord) -> serde_json::Map<String, Value> {
    match serde_json::from_slice(&record.payload) {
        Ok(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    }
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// A seed-002 local time (`2021-08-16 09:48:01`, Asia/Shanghai) as UTC ms.
fn local_ms(v: Option<&Value>) -> Option<i64> {
    let t = NaiveDateTime::parse_from_str(v?.as_str()?, "%Y-%m-%d %H:%M:%S").ok()?;
    Some((t.and_utc().timestamp() - LOCAL_OFFSET_SECS) * 1000)
}

impl MetricsBuilder {
    fn observe(&mut self, record: &RawRecord, e: &Event) {
        let minute = window(e.time_ms, MINUTE_MS);
        let day = window(e.time_ms, DAY_MS);
        match e.kind {
            Kind::ViewerArrived | Kind::ViewerLeft => {
                let arrived = e.kind == Kind::ViewerArrived;
                if let Some(room) = &e.room_id {
                    *self.online_delta.entry((room.clone(), minute)).or_default() +=
                        if arrived { 1 } else { -1 };
                }
                let raw = payload(record);
                let arrive_ms = local_ms(raw.get("arrive_time")).unwrap_or(e.time_ms);
                self.viewer_log.insert(
                    (
                        e.time_ms,
                        e.event_id.clone().unwrap_or_default(),
                        record.seq,
                    ),
                    ViewerLogRow {
                        event_time: iso_time(e.time_ms, true),
                        event_id: e.event_id.clone(),
                        kind: e.kind.name().to_owned(),
                        user_id: e.user_id.clone().unwrap_or_default(),
                        room_id: e.room_id.clone().unwrap_or_default(),
                        ip: text(raw.get("ip")),
                        region: text(raw.get("region")),
                        grade: e.grade.unwrap_or(0),
                        province: e.province.clone().unwrap_or_default(),
                        arrive_time: iso_time(arrive_ms, true),
                        leave_time: (!arrived).then(|| iso_time(e.time_ms, true)),
                    },
                );
            }
            Kind::LiveRoomStarted => {
                let raw = payload(record);
                let module = text(raw.get("module_id"));
                if let (Some(room), false) = (&e.room_id, module.is_empty()) {
                    self.room_module.insert(room.clone(), module);
                }
            }
            Kind::VideoPublished => {
                if let Some(author) = &e.author_id {
                    *self
                        .publications
                        .entry((minute, author.clone()))
                        .or_default() += 1;
                }
            }
            _ => {}
        }
        match e.kind {
            Kind::VideoPlayed => {
                if let Some(video) = &e.video_id {
                    self.consumption
                        .entry((minute, video.clone()))
                        .or_default()
                        .plays += 1;
                }
            }
            Kind::UserAction => {
                let Some(action) = &e.action else { return };
                // Rows only for what an aggregate counts (an order makes none).
                if let (Some(video), true) = (
                    &e.video_id,
                    matches!(action.as_str(), "like" | "comment" | "share"),
                ) {
                    let acc = self.consumption.entry((minute, video.clone())).or_default();
                    match action.as_str() {
                        "like" => acc.likes += 1,
                        "comment" => acc.comments += 1,
                        _ => acc.shares += 1,
                    }
                }
                *self.actions_daily.entry((day, action.clone())).or_default() += 1;
                if action == "like" {
                    let target = match text(payload(record).get("target_id")) {
                        t if !t.is_empty() => Some(t),
                        _ => e.video_id.clone(),
                    };
                    if let Some(t) = target {
                        *self.likes_daily.entry((day, t)).or_default() += 1;
                    }
                }
            }
            Kind::GiftSent => {
                if let Some(amount) = e.amount {
                    *self
                        .gifts_by_room
                        .entry((minute, e.room_id.clone()))
                        .or_default() += amount;
                    *self.gifts_per_minute.entry(minute).or_default() += amount;
                    if let Some(user) = &e.user_id {
                        *self.gifts_daily.entry((day, user.clone())).or_default() += amount;
                    }
                }
            }
            _ => {}
        }
        match e.kind {
            Kind::VideoPlayed => {
                let Some(video) = &e.video_id else { return };
                let acc = self.video_plays.entry((minute, video.clone())).or_default();
                acc.plays += 1;
                acc.watch_ms += e.watch_ms.unwrap_or(0);
                if let Some(user) = &e.user_id {
                    acc.viewers.insert(user.clone());
                    *self
                        .user_video_plays
                        .entry((minute, user.clone(), video.clone()))
                        .or_default() += 1;
                }
            }
            Kind::GiftSent => {
                let (Some(gift_type), Some(amount)) = (&e.gift_type, e.amount) else {
                    return;
                };
                let acc = self
                    .gifts_by_type
                    .entry((minute, gift_type.clone()))
                    .or_default();
                acc.amount += amount;
                acc.gifts += 1;
                if let Some(user) = &e.user_id {
                    acc.givers.insert(user.clone());
                    *self
                        .gifted_1h
                        .entry((window(e.time_ms, HOUR_MS), user.clone()))
                        .or_default() += amount;
                }
            }
            Kind::ViewerArrived => {
                let (Some(province), Some(grade)) = (&e.province, e.grade) else {
                    return;
                };
                let acc = self
                    .viewers_by_province_grade
                    .entry((minute, province.clone(), grade))
                    .or_default();
                acc.arrivals += 1;
                if let Some(user) = &e.user_id {
                    acc.viewers.insert(user.clone());
                    self.members_by_grade
                        .entry((minute, grade))
                        .or_default()
                        .insert(user.clone());
                }
            }
            Kind::UserAction => {
                let Some(action) = &e.action else { return };
                *self
                    .user_actions
                    .entry((minute, action.clone()))
                    .or_default() += 1;
            }
            _ => {}
        }
    }

    fn finish(self) -> Metrics {
        Metrics {
            video_plays_1m: self
                .video_plays
                .into_iter()
                .map(|((w, video_id), a)| VideoPlaysRow {
                    window_start: stamp(w),
                    video_id,
                    plays: a.plays,
                    viewers: a.viewers.len() as u64,
                    watch_ms: a.watch_ms,
                })
                .collect(),
            user_video_plays_1m: self
                .user_video_plays
                .into_iter()
                .map(|((w, user_id, video_id), plays)| UserVideoPlaysRow {
                    window_start: stamp(w),
                    user_id,
                    video_id,
                    plays,
                })
                .collect(),
            gifts_by_type_1m: self
                .gifts_by_type
                .into_iter()
                .map(|((w, gift_type), a)| GiftsByTypeRow {
                    window_start: stamp(w),
                    gift_type,
                    amount: a.amount,
                    gifts: a.gifts,
                    givers: a.givers.len() as u64,
                })
                .collect(),
            viewers_by_province_grade_1m: self
                .viewers_by_province_grade
                .into_iter()
                .map(|((w, province, grade), a)| ViewersByProvinceGradeRow {
                    window_start: stamp(w),
                    province,
                    grade,
                    arrivals: a.arrivals,
                    viewers: a.viewers.len() as u64,
                })
                .collect(),
            members_by_grade_1m: self
                .members_by_grade
                .into_iter()
                .map(|((w, grade), users)| MembersByGradeRow {
                    window_start: stamp(w),
                    grade,
                    members: users.len() as u64,
                })
                .collect(),
            user_actions_1m: self
                .user_actions
                .into_iter()
                .map(|((w, action), actions)| UserActionsRow {
                    window_start: stamp(w),
                    action,
                    actions,
                })
                .collect(),
            top_gifters_1h: top_n(self.gifted_1h, TOP_GIFTERS),
            live_viewer_log: self.viewer_log.into_values().collect(),
            online_users_1m: {
                let mut rows = Vec::new();
                let mut level: BTreeMap<&str, i64> = BTreeMap::new();
                for ((room, w), delta) in &self.online_delta {
                    let l = level.entry(room.as_str()).or_default();
                    *l += delta;
                    rows.push(OnlineUsersRow {
                        window_start: stamp(*w),
                        room_id: room.clone(),
                        online: *l,
                    });
                }
                rows.sort_by(|a, b| {
                    (&a.window_start, &a.room_id).cmp(&(&b.window_start, &b.room_id))
                });
                rows
            },
            gifts_by_module_1m: {
                let mut by: BTreeMap<(i64, String), i64> = BTreeMap::new();
                for ((w, room), amount) in &self.gifts_by_room {
                    let module = room
                        .as_ref()
                        .and_then(|r| self.room_module.get(r))
                        .cloned()
                        .unwrap_or_default();
                    *by.entry((*w, module)).or_default() += amount;
                }
                by.into_iter()
                    .map(|((w, module_id), amount)| GiftsByModuleRow {
                        window_start: stamp(w),
                        module_id,
                        amount,
                    })
                    .collect()
            },
            gifts_6h: {
                let mut by: BTreeMap<i64, i64> = BTreeMap::new();
                for (m, amount) in &self.gifts_per_minute {
                    for i in 0..GIFTS_6H_PANES {
                        *by.entry(m - i * MINUTE_MS).or_default() += amount;
                    }
                }
                by.into_iter()
                    .map(|(w, amount)| Gifts6hRow {
                        window_start: stamp(w),
                        amount,
                    })
                    .collect()
            },
            pool_production_1m: self
                .publications
                .into_iter()
                .map(|((w, author_id), publications)| PoolProductionRow {
                    window_start: stamp(w),
                    pool: ALL_POOL.to_owned(),
                    author_id,
                    publications,
                })
                .collect(),
            pool_consumption_1m: self
                .consumption
                .into_iter()
                .map(|((w, video_id), a)| PoolConsumptionRow {
                    window_start: stamp(w),
                    pool: ALL_POOL.to_owned(),
                    video_id,
                    plays: a.plays,
                    likes: a.likes,
                    comments: a.comments,
                    shares: a.shares,
                })
                .collect(),
        }
    }

    /// Call before [`MetricsBuilder::finish`] (which consumes the builder).
    fn finish_rollups(&self) -> Rollups {
        /// First window start and last window end of a metric's windows.
        fn span<'a>(starts: impl Iterator<Item = &'a i64>, size: i64) -> (String, String) {
            let (lo, hi) =
                starts.fold((i64::MAX, i64::MIN), |(lo, hi), w| (lo.min(*w), hi.max(*w)));
            if lo > hi {
                return (String::new(), String::new());
            }
            (stamp(lo), stamp(hi + size))
        }
        let (ws, we) = span(self.gifts_by_type.keys().map(|(w, _)| w), MINUTE_MS);
        let mut gifts: BTreeMap<&str, GiftsAcc> = BTreeMap::new();
        for ((_, gift_type), a) in &self.gifts_by_type {
            let acc = gifts.entry(gift_type).or_default();
            acc.amount += a.amount;
            acc.gifts += a.gifts;
            acc.givers.extend(a.givers.iter().cloned());
        }
        let gifts_by_type_1m = gifts
            .into_iter()
            .map(|(gift_type, a)| GiftsByTypeRollupRow {
                window_start: ws.clone(),
                window_end: we.clone(),
                gift_type: gift_type.to_owned(),
                amount: a.amount,
                gifts: a.gifts,
                givers: a.givers.len() as u64,
            })
            .collect();
        let (ws, we) = span(self.members_by_grade.keys().map(|(w, _)| w), MINUTE_MS);
        let mut members: BTreeMap<i32, BTreeSet<&str>> = BTreeMap::new();
        for ((_, grade), users) in &self.members_by_grade {
            members
                .entry(*grade)
                .or_default()
                .extend(users.iter().map(String::as_str));
        }
        let members_by_grade_1m = members
            .into_iter()
            .map(|(grade, users)| MembersByGradeRollupRow {
                window_start: ws.clone(),
                window_end: we.clone(),
                grade,
                members: users.len() as u64,
            })
            .collect();
        let (ws, we) = span(
            self.viewers_by_province_grade.keys().map(|(w, _, _)| w),
            MINUTE_MS,
        );
        let mut viewers: BTreeMap<(&str, i32), ArrivalsAcc> = BTreeMap::new();
        for ((_, province, grade), a) in &self.viewers_by_province_grade {
            let acc = viewers.entry((province, *grade)).or_default();
            acc.arrivals += a.arrivals;
            acc.viewers.extend(a.viewers.iter().cloned());
        }
        let viewers_by_province_grade_1m = viewers
            .into_iter()
            .map(|((province, grade), a)| ViewersByProvinceGradeRollupRow {
                window_start: ws.clone(),
                window_end: we.clone(),
                province: province.to_owned(),
                grade,
                arrivals: a.arrivals,
                viewers: a.viewers.len() as u64,
            })
            .collect();
        let (ws, we) = span(self.gifted_1h.keys().map(|(w, _)| w), HOUR_MS);
        let mut totals: BTreeMap<(i64, String), i64> = BTreeMap::new();
        for ((_, user), amount) in &self.gifted_1h {
            *totals.entry((0, user.clone())).or_default() += amount;
        }
        let top_gifters_1h = top_n(totals, TOP_GIFTERS)
            .into_iter()
            .map(|r| TopGifterRollupRow {
                window_start: ws.clone(),
                window_end: we.clone(),
                rank: r.rank,
                user_id: r.user_id,
                amount: r.amount,
            })
            .collect();
        Rollups {
            gifts_by_type_1m,
            members_by_grade_1m,
            viewers_by_province_grade_1m,
            top_gifters_1h,
        }
    }

    /// Call before [`MetricsBuilder::finish`] (which consumes the builder).
    fn finish_leaderboards(&mut self) -> Leaderboards {
        Leaderboards {
            actions_daily: ranked(std::mem::take(&mut self.actions_daily))
                .into_iter()
                .map(|(w, rank, action, actions)| ActionsRankRow {
                    window_start: stamp(w),
                    rank,
                    action,
                    actions,
                })
                .collect(),
            video_likes_daily: ranked(std::mem::take(&mut self.likes_daily))
                .into_iter()
                .map(|(w, rank, video_id, likes)| VideoLikesRankRow {
                    window_start: stamp(w),
                    rank,
                    video_id,
                    likes,
                })
                .collect(),
            user_gifts_daily: ranked(std::mem::take(&mut self.gifts_daily))
                .into_iter()
                .map(|(w, rank, user_id, amount)| UserGiftsRankRow {
                    window_start: stamp(w),
                    rank,
                    user_id,
                    amount,
                })
                .collect(),
        }
    }
}

/// Every member of every window, ranked: score descending, member ascending.
fn ranked<V: Ord + Copy>(scores: BTreeMap<(i64, String), V>) -> Vec<(i64, u32, String, V)> {
    let mut by_window: BTreeMap<i64, Vec<(String, V)>> = BTreeMap::new();
    for ((w, member), v) in scores {
        by_window.entry(w).or_default().push((member, v));
    }
    let mut rows = Vec::new();
    for (w, mut members) in by_window {
        members.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        for (i, (member, v)) in members.into_iter().enumerate() {
            rows.push((w, i as u32 + 1, member, v));
        }
    }
    rows
}

/// The `n` largest amounts per window; ties by user id ascending.
fn top_n(sums: BTreeMap<(i64, String), i64>, n: usize) -> Vec<TopGifterRow> {
    let mut by_window: BTreeMap<i64, Vec<(String, i64)>> = BTreeMap::new();
    for ((w, user), amount) in sums {
        by_window.entry(w).or_default().push((user, amount));
    }
    let mut rows = Vec::new();
    for (w, mut users) in by_window {
        users.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        for (i, (user_id, amount)) in users.into_iter().take(n).enumerate() {
            rows.push(TopGifterRow {
                window_start: stamp(w),
                rank: i as u32 + 1,
                user_id,
                amount,
            });
        }
    }
    rows
}
