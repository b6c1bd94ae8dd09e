//! The record stream: a deterministic iterator (ChaCha8 seeded from
//! `--seed`) over raw records in production order.
//!
//! Record `i` of `n` gets a base event time `start + span·i/n` plus up to a
//! second of jitter, so event times rise through the span and no in-order
//! record is more than 2 s behind any record produced before it. With
//! `wall_clock`, the base is instead the clock the caller sets before each
//! record ([`Generator::set_clock`]), minus up to a second of jitter: no
//! record is dated after the clock. Formats
//! take turns by smooth weighted round-robin. Each slot is then malformed,
//! a duplicate, late or plain valid, by the configured fractions.
//!
//! The live formats keep a little state so their stories are consistent:
//! rooms start (`live_room_events`) before they get viewers or gifts, some
//! end later, and a viewer leaves a room only after arriving in it.

use std::collections::VecDeque;

use chrono::{TimeZone, Utc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::GenConfig;
use crate::formats::{self, Draft, RoomProfile, TimeStyle, json_str, shape, time_json};
use crate::model::{Class, Event, Format, Kind, RawRecord, Reason};

/// Numeric user ids are `USER_BASE + k` (the seed's users are 2000..4000).
const USER_BASE: u64 = 2000;
/// Video ids are `VIDEO_BASE + k`, as text (`"100042"`), in every format.
const VIDEO_BASE: u64 = 100_000;
/// Room ids are `ROOM_BASE + k` (the seed's room is 20210813).
const ROOM_BASE: u64 = 20_210_813;
/// Valid records per format remembered as duplicate sources: a duplicate
/// is a re-send of one of the last few.
const RECENT: usize = 4;
/// Bound on remembered open visits (arrivals without a departure yet).
const MAX_OPEN_VISITS: usize = 10_000;
/// Share of `live_streaming_log` records that are departures, when a
/// departure is possible.
const DEPARTURE_SHARE: f64 = 0.4;
/// Depth of the extra field of `nesting_too_deep` records.
const NESTING: usize = 200;

/// Salts separating the per-entity attribute streams.
const SALT_AUTHOR: u64 = 1;
const SALT_PROVINCE: u64 = 2;
const SALT_RESOLUTION: u64 = 3;
const SALT_DURATION: u64 = 4;
const SALT_CATEGORY: u64 = 5;
const SALT_ROOM: u64 = 6;
const SALT_ROOM_END: u64 = 7;

/// Iterator over the records of a [`GenConfig`], in production order.
pub struct Generator {
    seed: u64,
    count: u64,
    start_ms: i64,
    span_ms: i64,
    /// Base event times come from `clock_ms` (set per record) instead of
    /// the span.
    wall_clock: bool,
    clock_ms: i64,
    late_ms: i64,
    bad: f64,
    dup: f64,
    late: f64,
    event_ids: bool,
    users: u64,
    videos: u64,
    rooms: u64,
    authors: u64,
    formats: Vec<Format>,
    rng: ChaCha8Rng,
    next_seq: u64,
    wrr: Vec<i64>,
    /// Whether rooms have a lifecycle (`live_room_events` is generated);
    /// without it every room counts as live all along.
    lifecycle: bool,
    room_state: Vec<RoomState>,
    /// Live rooms, in start order.
    live: Vec<usize>,
    /// Rooms start in index order; the next one to start.
    next_room: usize,
    visits: Vec<Visit>,
    recent: Vec<VecDeque<RawRecord>>,
    next_reason: usize,
    reason_uses: [u64; Reason::ALL.len()],
}

#[derive(Debug, Clone, Default)]
struct RoomState {
    started_ms: Option<i64>,
    /// Latest event time of anything in the room (its end comes after it).
    last_ms: i64,
    /// Fraction of the run after which the room ends (`None`: never).
    ends_at: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Visit {
    room: usize,
    user: u64,
    arrive_ms: i64,
}

/// A production slot: its sequence number and event-time base.
#[derive(Debug, Clone, Copy)]
struct Slot {
    seq: u64,
    /// `start + span·seq/count`.
    base_ms: i64,
    /// `base_ms` plus jitter, kept inside the span.
    raw_ms: i64,
}

/// A valid record before the event id is added.
struct Built {
    format: Format,
    key: String,
    draft: Draft,
    event: Event,
    late: bool,
}

impl Generator {
    /// A generator for `cfg`. Out-of-range settings are clamped (validate
    /// the config first to reject them instead).
    pub fn new(cfg: &GenConfig) -> Generator {
        let formats = cfg.chosen_formats();
        let lifecycle = formats.contains(&Format::LiveRoomEvents);
        let rooms = u64::from(cfg.rooms.max(1));
        let mut g = Generator {
            seed: cfg.seed,
            count: cfg.count,
            start_ms: cfg.start.timestamp() * 1000,
            span_ms: (cfg.span.as_millis() as i64).max(1),
            wall_clock: cfg.wall_clock,
            clock_ms: cfg.start.timestamp() * 1000,
            late_ms: cfg.late_by.as_millis() as i64,
            bad: cfg.bad_fraction.clamp(0.0, 1.0),
            dup: if cfg.event_ids {
                cfg.dup_fraction.clamp(0.0, 1.0)
            } else {
                0.0
            },
            late: cfg.late_fraction.clamp(0.0, 1.0),
            event_ids: cfg.event_ids,
            users: u64::from(cfg.users.max(1)),
            videos: u64::from(cfg.videos.max(1)),
            rooms,
            authors: u64::from(cfg.authors.max(1)),
            wrr: vec![0; formats.len()],
            formats,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            next_seq: 0,
            lifecycle,
            room_state: Vec::new(),
            live: Vec::new(),
            next_room: 0,
            visits: Vec::new(),
            recent: vec![VecDeque::with_capacity(RECENT); Format::ALL.len()],
            next_reason: 0,
            reason_uses: [0; Reason::ALL.len()],
        };
        g.room_state = (0..rooms)
            .map(|k| RoomState {
                started_ms: None,
                last_ms: i64::MIN,
                // A third of the rooms end, late in the run; room 0 never
                // does, so viewers always have somewhere to go.
                ends_at: (k % 3 == 2)
                    .then(|| 0.5 + (g.attr(SALT_ROOM_END, k) % 450) as f64 / 1000.0),
            })
            .collect();
        if !lifecycle {
            g.live = (0..rooms as usize).collect();
        }
        g
    }

    // ---- entities -------------------------------------------------------

    /// A stable pseudo-random attribute of entity `k` (splitmix64).
    fn attr(&self, salt: u64, k: u64) -> u64 {
        let mut z = self
            .seed
            .wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_add(k.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn pick_user(&mut self) -> u64 {
        USER_BASE + self.rng.random_range(0..self.users)
    }

    /// A video, skewed towards low ids so popular videos get several plays
    /// a minute.
    fn pick_video(&mut self) -> u64 {
        let u: f64 = self.rng.random();
        ((u * u * self.videos as f64) as u64).min(self.videos - 1)
    }

    fn video_id(k: u64) -> String {
        (VIDEO_BASE + k).to_string()
    }

    fn author_of(&self, video: u64) -> String {
        format!("a-{}", self.attr(SALT_AUTHOR, video) % self.authors)
    }

    fn room_num(k: usize) -> u64 {
        ROOM_BASE + k as u64
    }

    /// Province index and region code of a numeric user (fixed per user).
    fn province_of(&self, user: u64) -> (usize, i64) {
        let p = (self.attr(SALT_PROVINCE, user) % formats::PROVINCES.len() as u64) as usize;
        (p, 1100 + p as i64)
    }

    fn room_profile(&self, k: usize) -> RoomProfile {
        let a = self.attr(SALT_ROOM, k as u64);
        let room_type = formats::ROOM_TYPES[(a % 5) as usize];
        RoomProfile {
            room_type,
            client: formats::CLIENTS[((a >> 8) % 4) as usize],
            title: format!("{room_type} live #{}", Self::room_num(k)),
            address: formats::ADDRESSES[((a >> 16) % 6) as usize],
            anchor_id: format!("a-{}", (a >> 24) % self.authors),
            module_id: (1001 + k % 5).to_string(),
        }
    }

    // ---- time -----------------------------------------------------------

    /// With `wall_clock`: the time (epoch ms) the next records are stamped
    /// with, e.g. the wall clock just before each is sent. Ignored otherwise.
    pub fn set_clock(&mut self, now_ms: i64) {
        self.clock_ms = now_ms;
    }

    /// The latest event time a record may carry now: the end of the span,
    /// or the clock.
    fn limit_ms(&self) -> i64 {
        if self.wall_clock {
            self.clock_ms
        } else {
            self.start_ms + self.span_ms - 1
        }
    }

    fn slot(&mut self, seq: u64) -> Slot {
        let jitter = self.rng.random_range(0..1000i64);
        let (base_ms, raw_ms) = if self.wall_clock {
            (self.clock_ms, self.clock_ms - jitter)
        } else {
            let offset =
                (self.span_ms as u128 * u128::from(seq) / u128::from(self.count.max(1))) as i64;
            let base_ms = self.start_ms + offset;
            (base_ms, (base_ms + jitter).min(self.limit_ms()))
        };
        Slot {
            seq,
            base_ms,
            raw_ms,
        }
    }

    /// The event time `format` writes for `ms`, and whether it shows
    /// milliseconds. Local times are whole seconds; ISO times are half
    /// the time.
    fn shape_time(&mut self, format: Format, ms: i64) -> (i64, bool) {
        match format.time_style() {
            TimeStyle::Local => (floor_sec(ms), false),
            TimeStyle::Iso => {
                if self.rng.random_bool(0.5) {
                    (ms, true)
                } else {
                    (floor_sec(ms), false)
                }
            }
            TimeStyle::EpochMs | TimeStyle::EpochSecs => (ms, true),
        }
    }

    fn event_time(&mut self, format: Format, slot: &Slot, late: bool) -> (i64, bool) {
        let ms = if late {
            slot.raw_ms - self.late_ms
        } else {
            slot.raw_ms
        };
        self.shape_time(format, ms)
    }

    // ---- slots ----------------------------------------------------------

    /// Smooth weighted round-robin over the chosen formats.
    fn next_format(&mut self) -> Format {
        let total: i64 = self.formats.iter().map(|f| i64::from(f.weight())).sum();
        let mut best = 0;
        for (i, f) in self.formats.iter().enumerate() {
            self.wrr[i] += i64::from(f.weight());
            if self.wrr[i] > self.wrr[best] {
                best = i;
            }
        }
        self.wrr[best] -= total;
        self.formats[best]
    }

    fn valid(&mut self, format: Format, slot: &Slot, want_late: bool) -> RawRecord {
        let mut built = match format {
            Format::VideoEvents => self.video_events(slot, want_late),
            Format::VideoMessages => self.video_messages(slot, want_late),
            Format::PlayRequest => self.play_request(slot, want_late),
            Format::LiveStreamingLog => self.live_streaming(slot, want_late),
            Format::LiveGiftTotal => self.live_gift(slot, want_late),
            Format::LiveRoomEvents => self.live_room(slot, want_late),
            Format::VideoProductionLog => self.video_production(slot, want_late),
            Format::VideoConsumptionLog => self.video_consumption(slot, want_late),
            Format::UserActions => self.user_actions(slot, want_late),
        };
        if self.event_ids {
            let id = format!("g{}-{}", self.seed, slot.seq);
            built.draft = built.draft.str("event_id", &id);
            built.event.event_id = Some(id);
        }
        let record = RawRecord {
            seq: slot.seq,
            topic: built.format.topic(),
            key: Some(built.key),
            payload: built.draft.to_bytes(),
            class: if built.late {
                Class::Late
            } else {
                Class::Valid
            },
            event: Some(built.event),
        };
        if !built.late && self.dup > 0.0 {
            let recent = &mut self.recent[built.format as usize];
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(record.clone());
        }
        record
    }

    /// A re-send of one of the last few valid records of `format`.
    fn duplicate(&mut self, format: Format, seq: u64) -> Option<RawRecord> {
        let n = self.recent[format as usize].len();
        if n == 0 {
            return None;
        }
        let i = self.rng.random_range(0..n);
        let original = &self.recent[format as usize][i];
        Some(RawRecord {
            seq,
            class: Class::Duplicate { of: original.seq },
            ..original.clone()
        })
    }

    // ---- valid records, per format ----------------------------------------

    fn video_events(&mut self, slot: &Slot, late: bool) -> Built {
        let (t, millis) = self.event_time(Format::VideoEvents, slot, late);
        let video = self.pick_video();
        let user = self.pick_user();
        let played = self.rng.random_bool(0.9);
        let watch =
            (played && self.rng.random_bool(0.5)).then(|| self.rng.random_range(1_000..=600_000));
        let (vid, uid) = (Self::video_id(video), user.to_string());
        let kind = if played {
            Kind::VideoPlayed
        } else {
            Kind::VideoUploaded
        };
        let draft = formats::video_event(
            kind.name(),
            &vid,
            &uid,
            time_json(TimeStyle::Iso, t, millis),
            watch,
        );
        let mut event = Event::new(kind, t);
        event.user_id = Some(uid);
        event.video_id = Some(vid.clone());
        event.watch_ms = watch;
        Built {
            format: Format::VideoEvents,
            key: vid,
            draft,
            event,
            late,
        }
    }

    fn video_messages(&mut self, slot: &Slot, late: bool) -> Built {
        let (t, millis) = self.event_time(Format::VideoMessages, slot, late);
        let video = self.pick_video();
        let (vid, draft) = self.video_message_draft(video, t, millis);
        let mut event = Event::new(Kind::VideoMetadata, t);
        event.video_id = Some(vid.clone());
        Built {
            format: Format::VideoMessages,
            key: vid,
            draft,
            event,
            late,
        }
    }

    fn video_message_draft(&self, video: u64, t: i64, millis: bool) -> (String, Draft) {
        let vid = Self::video_id(video);
        let resolution = formats::RESOLUTIONS[(self.attr(SALT_RESOLUTION, video) % 4) as usize];
        let duration_s = 5 + (self.attr(SALT_DURATION, video) % 596) as i64;
        let draft = formats::video_message(
            &vid,
            resolution,
            duration_s,
            time_json(TimeStyle::Iso, t, millis),
        );
        (vid, draft)
    }

    fn play_request(&mut self, slot: &Slot, late: bool) -> Built {
        let (t, millis) = self.event_time(Format::PlayRequest, slot, late);
        let user = self.pick_user();
        let video = self.pick_video();
        let (vid, uid) = (Self::video_id(video), user.to_string());
        let draft = formats::play_request(&uid, &vid, time_json(TimeStyle::Iso, t, millis));
        let mut event = Event::new(Kind::PlayRequested, t);
        event.user_id = Some(uid);
        event.video_id = Some(vid.clone());
        Built {
            format: Format::PlayRequest,
            key: vid,
            draft,
            event,
            late,
        }
    }

    /// An arrival, or the departure of an earlier arrival; if no room is
    /// live yet, the slot starts one instead.
    fn live_streaming(&mut self, slot: &Slot, want_late: bool) -> Built {
        let tries: &[bool] = if want_late { &[true, false] } else { &[false] };
        if !self.visits.is_empty() && self.rng.random_bool(DEPARTURE_SHARE) {
            for &late in tries {
                let (t, _) = self.event_time(Format::LiveStreamingLog, slot, late);
                for _ in 0..4 {
                    let i = self.rng.random_range(0..self.visits.len());
                    // Second-granular times: a departure needs leave > arrive.
                    if self.visits[i].arrive_ms + 1000 <= t {
                        let visit = self.visits.swap_remove(i);
                        return self.viewer(visit, t, late, Kind::ViewerLeft);
                    }
                }
            }
        }
        for &late in tries {
            let (t, _) = self.event_time(Format::LiveStreamingLog, slot, late);
            if let Some(room) = self.pick_room(t) {
                let user = self.pick_user();
                let visit = Visit {
                    room,
                    user,
                    arrive_ms: t,
                };
                if self.visits.len() >= MAX_OPEN_VISITS {
                    let i = self.rng.random_range(0..self.visits.len());
                    self.visits.swap_remove(i);
                }
                self.visits.push(visit);
                return self.viewer(visit, t, late, Kind::ViewerArrived);
            }
        }
        self.room_start(slot, want_late)
    }

    fn viewer(&mut self, visit: Visit, t: i64, late: bool, kind: Kind) -> Built {
        let (province, region) = self.province_of(visit.user);
        let room = Self::room_num(visit.room);
        let draft = formats::live_streaming(
            visit.user,
            room,
            visit.arrive_ms,
            t,
            region,
            formats::PROVINCES[province],
        );
        self.touch_room(visit.room, t);
        let mut event = Event::new(kind, t);
        event.user_id = Some(visit.user.to_string());
        event.room_id = Some(room.to_string());
        event.province = Some(formats::PROVINCES[province].to_owned());
        event.grade = Some(formats::grade_of(visit.user) as i32);
        Built {
            format: Format::LiveStreamingLog,
            key: room.to_string(),
            draft,
            event,
            late,
        }
    }

    fn live_gift(&mut self, slot: &Slot, want_late: bool) -> Built {
        let user = self.pick_user();
        let gift_type = self.rng.random_range(1..=10i64);
        let amount = self.rng.random_range(1..=100i64);
        // The seed's own generator sends no room; most gifts here have one.
        let with_room = self.rng.random_bool(0.9);
        let (mut t, _) = self.event_time(Format::LiveGiftTotal, slot, want_late);
        let mut late = want_late;
        let mut room = None;
        if with_room {
            room = self.pick_room(t);
            if room.is_none() && late {
                late = false;
                t = self.event_time(Format::LiveGiftTotal, slot, false).0;
                room = self.pick_room(t);
            }
        }
        if let Some(k) = room {
            self.touch_room(k, t);
        }
        let room = room.map(Self::room_num);
        let draft = formats::live_gift(user, gift_type, amount, room, t);
        let mut event = Event::new(Kind::GiftSent, t);
        event.user_id = Some(user.to_string());
        event.room_id = room.map(|r| r.to_string());
        event.gift_type = Some(gift_type.to_string());
        event.amount = Some(amount);
        let key = room.unwrap_or(user).to_string();
        Built {
            format: Format::LiveGiftTotal,
            key,
            draft,
            event,
            late,
        }
    }

    /// A live room whose start is not after `t`.
    fn pick_room(&mut self, t: i64) -> Option<usize> {
        if self.live.is_empty() {
            return None;
        }
        if !self.lifecycle {
            return Some(self.rng.random_range(0..self.live.len()));
        }
        let started_by = |s: &RoomState| s.started_ms.is_some_and(|st| st <= t);
        for _ in 0..3 {
            let k = self.live[self.rng.random_range(0..self.live.len())];
            if started_by(&self.room_state[k]) {
                return Some(k);
            }
        }
        self.live
            .iter()
            .copied()
            .find(|&k| started_by(&self.room_state[k]))
    }

    fn touch_room(&mut self, k: usize, t: i64) {
        let state = &mut self.room_state[k];
        state.last_ms = state.last_ms.max(t);
    }

    /// Ends a room that is due, else starts one.
    fn live_room(&mut self, slot: &Slot, want_late: bool) -> Built {
        let progress = slot.seq as f64 / self.count.max(1) as f64;
        let due = self.live.iter().position(|&k| {
            let s = &self.room_state[k];
            s.ends_at.is_some_and(|f| f <= progress) && s.started_ms.is_some()
        });
        if let Some(pos) = due {
            let k = self.live[pos];
            let state = &self.room_state[k];
            let started = state.started_ms.unwrap_or(i64::MIN);
            // After everything that happened in the room, and strictly
            // after its start. Ends are never late: a late end could fall
            // before the viewers it should follow.
            let t = floor_sec(slot.raw_ms)
                .max(ceil_sec(state.last_ms))
                .max(started.saturating_add(1000));
            // Never dated after the span or the clock: such a room ends at
            // a later slot (or stays live).
            if t <= self.limit_ms() {
                self.live.remove(pos);
                self.visits.retain(|v| v.room != k);
                return self.room_event(k, "end", t, false);
            }
        }
        self.room_start(slot, want_late)
    }

    /// Starts the next room. Once all have started, re-announces a live
    /// room's profile (another `start`).
    fn room_start(&mut self, slot: &Slot, want_late: bool) -> Built {
        if (self.next_room as u64) < self.rooms {
            let k = self.next_room;
            self.next_room += 1;
            // No jitter: every later record's time is at or after it.
            let base = if want_late {
                slot.base_ms - self.late_ms
            } else {
                slot.base_ms
            };
            let t = floor_sec(base);
            self.room_state[k].started_ms = Some(t);
            self.room_state[k].last_ms = t;
            self.live.push(k);
            return self.room_event(k, "start", t, want_late);
        }
        let t = floor_sec(slot.raw_ms);
        let k = if self.live.is_empty() {
            // Unreachable: room 0 never ends. Kept total for safety.
            self.room_state[0].ends_at = None;
            self.live.push(0);
            0
        } else {
            self.live[self.rng.random_range(0..self.live.len())]
        };
        self.touch_room(k, t);
        self.room_event(k, "start", t, false)
    }

    fn room_event(&self, k: usize, action: &str, t: i64, late: bool) -> Built {
        let id = Self::room_num(k).to_string();
        let draft = formats::live_room(&id, action, &self.room_profile(k), t);
        let kind = if action == "end" {
            Kind::LiveRoomEnded
        } else {
            Kind::LiveRoomStarted
        };
        let mut event = Event::new(kind, t);
        event.room_id = Some(id.clone());
        Built {
            format: Format::LiveRoomEvents,
            key: id,
            draft,
            event,
            late,
        }
    }

    fn video_production(&mut self, slot: &Slot, late: bool) -> Built {
        let (t, _) = self.event_time(Format::VideoProductionLog, slot, late);
        let video = self.rng.random_range(0..self.videos);
        let (vid, author) = (Self::video_id(video), self.author_of(video));
        let category = formats::CATEGORIES[(self.attr(SALT_CATEGORY, video) % 10) as usize];
        let draft = formats::video_production(&author, &vid, category, t);
        let mut event = Event::new(Kind::VideoPublished, t);
        event.author_id = Some(author.clone());
        event.video_id = Some(vid);
        Built {
            format: Format::VideoProductionLog,
            key: author,
            draft,
            event,
            late,
        }
    }

    fn video_consumption(&mut self, slot: &Slot, late: bool) -> Built {
        let (t, _) = self.event_time(Format::VideoConsumptionLog, slot, late);
        let video = self.pick_video();
        let user = format!("u-{}", self.pick_user());
        let action = match self.rng.random_range(0..10u32) {
            0..=5 => "play",
            6 | 7 => "like",
            8 => "comment",
            _ => "share",
        };
        let watch = (action == "play").then(|| self.rng.random_range(1_000..=600_000i64));
        let (vid, author) = (Self::video_id(video), self.author_of(video));
        let draft = formats::video_consumption(&vid, &author, &user, action, watch, t);
        let kind = if action == "play" {
            Kind::VideoPlayed
        } else {
            Kind::UserAction
        };
        let mut event = Event::new(kind, t);
        event.user_id = Some(user);
        event.video_id = Some(vid.clone());
        event.author_id = Some(author);
        event.watch_ms = watch;
        if kind == Kind::UserAction {
            event.action = Some(action.to_owned());
        }
        Built {
            format: Format::VideoConsumptionLog,
            key: vid,
            draft,
            event,
            late,
        }
    }

    fn user_actions(&mut self, slot: &Slot, late: bool) -> Built {
        let (t, _) = self.event_time(Format::UserActions, slot, late);
        let action = match self.rng.random_range(0..20u32) {
            0..=7 => "like",
            8..=11 => "comment",
            12..=16 => "order",
            _ => "share",
        };
        // Like the seed, a fifth of the actions say only what and when.
        let who = if self.rng.random_bool(0.8) {
            let user = format!("u-{}", self.pick_user());
            let target = if action == "order" {
                format!("item-{}", self.rng.random_range(1..=1000u32))
            } else {
                Self::video_id(self.pick_video())
            };
            Some((user, target))
        } else {
            None
        };
        let draft = formats::user_action(
            action,
            t,
            who.as_ref().map(|(u, g)| (u.as_str(), g.as_str())),
        );
        let mut event = Event::new(Kind::UserAction, t);
        event.action = Some(action.to_owned());
        let key = match who {
            Some((user, target)) => {
                event.user_id = Some(user);
                target
            }
            None => action.to_owned(),
        };
        Built {
            format: Format::UserActions,
            key,
            draft,
            event,
            late,
        }
    }

    // ---- malformed records ------------------------------------------------

    /// The next reason in rotation that some chosen format can show.
    fn pick_reason(&mut self) -> Reason {
        let n = Reason::ALL.len();
        for step in 0..n {
            let i = (self.next_reason + step) % n;
            let reason = Reason::ALL[i];
            if self.formats.iter().any(|&f| supports(f, reason)) {
                self.next_reason = i + 1;
                return reason;
            }
        }
        Reason::EmptyPayload
    }

    fn malformed(&mut self, format: Format, slot: &Slot) -> RawRecord {
        let reason = self.pick_reason();
        let format = if supports(format, reason) {
            format
        } else {
            let able: Vec<Format> = self
                .formats
                .iter()
                .copied()
                .filter(|&f| supports(f, reason))
                .collect();
            able[self.rng.random_range(0..able.len())]
        };
        let variant = self.reason_uses[reason as usize];
        self.reason_uses[reason as usize] += 1;
        let (key, mut draft) = self.template(format, slot);
        let shape = shape(format);
        let mut keyed = true;
        let payload = match reason {
            Reason::EmptyPayload => {
                keyed = false;
                Vec::new()
            }
            Reason::InvalidUtf8 => {
                keyed = false;
                let mut p = format!("{{\"{}\":\"", shape.key_field).into_bytes();
                p.extend_from_slice(&[0xff, 0xfe]);
                p.extend_from_slice(b"\"}");
                p
            }
            Reason::TruncatedJson => {
                let mut full = draft.to_bytes();
                // Cut on a character boundary: a cut through a multi-byte
                // character would read as invalid UTF-8 instead.
                let mut cut = full.len() / 2;
                while cut > 0 && (full[cut] & 0xC0) == 0x80 {
                    cut -= 1;
                }
                full.truncate(cut);
                full
            }
            Reason::InvalidJson => {
                keyed = false;
                let k = shape.key_field;
                if variant & 1 == 0 {
                    format!("{{\"{k}\":\"1\",,}}").into_bytes()
                } else {
                    format!("{{'{k}': '1', 'note': 'python dict'}}").into_bytes()
                }
            }
            Reason::NotAnObject => {
                keyed = false;
                ["[1,2,3]", "\"text\"", "42"][(variant % 3) as usize]
                    .as_bytes()
                    .to_vec()
            }
            Reason::NestingTooDeep => {
                draft.set(
                    "x",
                    format!("{}{}", "[".repeat(NESTING), "]".repeat(NESTING)),
                );
                draft.to_bytes()
            }
            Reason::MissingField => {
                draft.remove(shape.required[(variant as usize) % shape.required.len()]);
                draft.to_bytes()
            }
            Reason::WrongType => {
                let v = ["{\"a\":1}", "true", "[1,2]"][(variant % 3) as usize];
                draft.set(shape.key_field, v.to_owned());
                draft.to_bytes()
            }
            Reason::InvalidValue => {
                if let Some(field) = shape.non_negative {
                    let v: i64 = draft.get(field).and_then(|v| v.parse().ok()).unwrap_or(1);
                    draft.set(field, (-v.max(1)).to_string());
                }
                draft.to_bytes()
            }
            Reason::InvalidId => {
                let v = if shape.numeric_ids {
                    "12.5".to_owned()
                } else {
                    json_str("")
                };
                draft.set(shape.key_field, v);
                draft.to_bytes()
            }
            Reason::UnparseableTime => {
                let bad = match format.time_style() {
                    TimeStyle::Local => "2021-13-45 99:00:00",
                    _ => "yesterday",
                };
                for &f in shape.time_fields {
                    draft.set(f, json_str(bad));
                }
                draft.to_bytes()
            }
            Reason::TimeOutOfRange => {
                let ms = if variant & 1 == 0 { 0 } else { year_2300_ms() };
                for &f in shape.time_fields {
                    draft.set(f, time_json(format.time_style(), ms, false));
                }
                draft.to_bytes()
            }
            Reason::UnknownEventType => {
                if let Some((field, value)) = shape.kind_field {
                    draft.set(field, json_str(value));
                }
                draft.to_bytes()
            }
        };
        RawRecord {
            seq: slot.seq,
            topic: format.topic(),
            key: keyed.then_some(key),
            payload,
            class: Class::Malformed { reason },
            event: None,
        }
    }

    /// A well-formed record of `format` to corrupt; touches no state.
    fn template(&mut self, format: Format, slot: &Slot) -> (String, Draft) {
        let (t, millis) = self.shape_time(format, slot.raw_ms);
        let user = self.pick_user();
        let video = self.pick_video();
        let room = self.rng.random_range(0..self.rooms) as usize;
        let (vid, uid) = (Self::video_id(video), user.to_string());
        let (key, draft) = match format {
            Format::VideoEvents => {
                let time = time_json(TimeStyle::Iso, t, millis);
                (
                    vid.clone(),
                    formats::video_event("video_played", &vid, &uid, time, None),
                )
            }
            Format::VideoMessages => self.video_message_draft(video, t, millis),
            Format::PlayRequest => (
                vid.clone(),
                formats::play_request(&uid, &vid, time_json(TimeStyle::Iso, t, millis)),
            ),
            Format::LiveStreamingLog => {
                let (p, region) = self.province_of(user);
                let r = Self::room_num(room);
                (
                    r.to_string(),
                    formats::live_streaming(user, r, t, t, region, formats::PROVINCES[p]),
                )
            }
            Format::LiveGiftTotal => {
                let r = Self::room_num(room);
                (r.to_string(), formats::live_gift(user, 3, 28, Some(r), t))
            }
            Format::LiveRoomEvents => {
                let id = Self::room_num(room).to_string();
                let draft = formats::live_room(&id, "start", &self.room_profile(room), t);
                (id, draft)
            }
            Format::VideoProductionLog => {
                let author = self.author_of(video);
                (
                    author.clone(),
                    formats::video_production(&author, &vid, "food", t),
                )
            }
            Format::VideoConsumptionLog => {
                let author = self.author_of(video);
                let user = format!("u-{user}");
                (
                    vid.clone(),
                    formats::video_consumption(&vid, &author, &user, "play", Some(15_000), t),
                )
            }
            Format::UserActions => {
                let user = format!("u-{user}");
                (
                    vid.clone(),
                    formats::user_action("like", t, Some((&user, &vid))),
                )
            }
        };
        let draft = if self.event_ids {
            draft.str("event_id", &format!("g{}-{}", self.seed, slot.seq))
        } else {
            draft
        };
        (key, draft)
    }
}

impl Iterator for Generator {
    type Item = RawRecord;

    fn next(&mut self) -> Option<RawRecord> {
        if self.next_seq >= self.count {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let format = self.next_format();
        let u: f64 = self.rng.random();
        let slot = self.slot(seq);
        if u < self.bad {
            return Some(self.malformed(format, &slot));
        }
        if u < self.bad + self.dup {
            if let Some(dup) = self.duplicate(format, seq) {
                return Some(dup);
            }
            return Some(self.valid(format, &slot, false));
        }
        let late = u < self.bad + self.dup + self.late;
        Some(self.valid(format, &slot, late))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.count - self.next_seq).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

/// Whether a record of `format` can be malformed for `reason`.
pub(crate) fn supports(format: Format, reason: Reason) -> bool {
    let s = shape(format);
    match reason {
        Reason::InvalidValue => s.non_negative.is_some(),
        Reason::InvalidId => s.has_required_id,
        // An epoch field given a word could as well read as `wrong_type`.
        Reason::UnparseableTime => matches!(format.time_style(), TimeStyle::Iso | TimeStyle::Local),
        Reason::UnknownEventType => s.kind_field.is_some(),
        _ => true,
    }
}

fn floor_sec(ms: i64) -> i64 {
    ms - ms.rem_euclid(1000)
}

fn ceil_sec(ms: i64) -> i64 {
    if ms == i64::MIN {
        return ms;
    }
    floor_sec(ms.saturating_add(999))
}

/// 2300-01-01T00:00:00Z in ms: far outside the valid event-time window.
fn year_2300_ms() -> i64 {
    Utc.with_ymd_and_hms(2300, 1, 1, 0, 0, 0)
        .single()
        .map_or(10_413_792_000_000, |t| t.timestamp_millis())
}
