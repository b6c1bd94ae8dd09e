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

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::config::GenConfig;
use crate::formats::iso_time;
use crate::model::{Class, Event, Kind, RawRecord, Reason};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
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
                    self.observe_event(event);
                }
            }
            Class::Duplicate { .. } => topic.duplicates += 1,
            Class::Malformed { reason } => {
                topic.malformed += 1;
                *self.dlq.entry(reason.code()).or_default() += 1;
            }
        }
    }

    fn observe_event(&mut self, event: &Event) {
        *self.kinds.entry(event.kind.name()).or_default() += 1;
        *self
            .per_minute
            .entry(event.kind.name())
            .or_default()
            .entry(window(event.time_ms, MINUTE_MS))
            .or_default() += 1;
        self.metrics.observe(event);
    }

    pub fn finish(self) -> Truth {
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
}

impl MetricsBuilder {
    fn observe(&mut self, e: &Event) {
        let minute = window(e.time_ms, MINUTE_MS);
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
        }
    }
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
