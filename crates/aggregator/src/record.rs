//! What the aggregator reads: a canonical event, with the pools it matched
//! and its enrichment when it comes from `vp.monitored.v1`, and the values
//! of the fields a metric spec names ([`vidpulse_query::field`]).
//!
//! Every value is a pure function of the record and of the room table the
//! partition learned from earlier records, so a replay of the same records
//! yields the same values (nothing here looks at a clock or a remote store).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use vidpulse_proto::{Event, Kind, Room, event::Payload};
pub use vidpulse_query::field::{Field, FieldRef, FieldType, Val, ValRef};

/// What the partition knows about a live room from its `live_room_started`
/// events (the same partition: room events and the room's viewers and gifts
/// share the room id as key). Checkpointed as JSON under short keys (the
/// long ones of earlier checkpoints are still read).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInfo {
    #[serde(
        rename = "ty",
        alias = "room_type",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub room_type: String,
    #[serde(
        rename = "cl",
        alias = "client",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub client: String,
    #[serde(
        rename = "ti",
        alias = "title",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub title: String,
    #[serde(
        rename = "ad",
        alias = "address",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub address: String,
    #[serde(
        rename = "an",
        alias = "anchor_id",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub anchor_id: String,
    #[serde(
        rename = "mo",
        alias = "module_id",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub module_id: String,
    /// Event time (to the minute) of the last event that mentioned the
    /// room: one idle longer than the plan's room timeout is pruned.
    #[serde(rename = "s", alias = "seen_ms", default)]
    pub seen_ms: i64,
    /// When the room ended, if its latest start or end event is an end:
    /// pruned once its windows can no longer take events.
    #[serde(
        rename = "e",
        alias = "ended_ms",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ended_ms: Option<i64>,
    /// Event time of its latest start or end event.
    #[serde(rename = "c", alias = "changed_ms", default)]
    pub changed_ms: i64,
}

impl RoomInfo {
    pub fn from_room(r: &Room) -> RoomInfo {
        RoomInfo {
            room_type: r.r#type.clone(),
            client: r.client.clone(),
            title: r.title.clone(),
            address: r.address.clone(),
            anchor_id: r.anchor_id.clone(),
            module_id: r.module_id.clone(),
            ..RoomInfo::default()
        }
    }

    /// Whether the profile (every text field) is the same as `other`'s.
    pub fn same_profile(&self, other: &RoomInfo) -> bool {
        (
            &self.room_type,
            &self.client,
            &self.title,
            &self.address,
            &self.anchor_id,
            &self.module_id,
        ) == (
            &other.room_type,
            &other.client,
            &other.title,
            &other.address,
            &other.anchor_id,
            &other.module_id,
        )
    }

    /// The times as a checkpoint's times field: `seen,ended,changed` (ms;
    /// `ended` empty while on air).
    pub fn times(&self) -> String {
        match self.ended_ms {
            Some(e) => format!("{},{e},{}", self.seen_ms, self.changed_ms),
            None => format!("{},,{}", self.seen_ms, self.changed_ms),
        }
    }

    fn get(&self, f: Field) -> &str {
        match f {
            Field::RoomType => &self.room_type,
            Field::Client => &self.client,
            Field::Title => &self.title,
            Field::Address => &self.address,
            Field::AnchorId => &self.anchor_id,
            Field::ModuleId => &self.module_id,
            _ => "",
        }
    }
}

/// Room id → profile, learned from room events of one partition. A room is
/// live until the watermark passes its idle timeout or its end plus the
/// longest window: from then on it is absent (whether or not
/// [`RoomTable::prune`] removed it yet), so what a record sees does not
/// depend on when the stage flushed.
#[derive(Clone, Debug, Default)]
pub struct RoomTable {
    rooms: hashbrown::HashMap<String, RoomInfo>,
    /// A room last seen at or before this is gone.
    idle_cut: i64,
    /// A room ended at or before this is gone.
    end_cut: i64,
}

impl PartialEq for RoomTable {
    fn eq(&self, other: &RoomTable) -> bool {
        self.rooms == other.rooms
    }
}

impl Eq for RoomTable {}

impl RoomTable {
    pub fn new() -> RoomTable {
        RoomTable {
            rooms: hashbrown::HashMap::new(),
            idle_cut: i64::MIN,
            end_cut: i64::MIN,
        }
    }

    fn live(&self, r: &RoomInfo) -> bool {
        r.seen_ms > self.idle_cut && r.ended_ms.is_none_or(|e| e > self.end_cut)
    }

    /// Sets the clock: at watermark `wm`, rooms idle for `idle_ms` or ended
    /// `after_end_ms` ago are gone.
    pub fn set_clock(&mut self, wm: i64, idle_ms: i64, after_end_ms: i64) {
        self.idle_cut = wm.saturating_sub(idle_ms);
        self.end_cut = wm.saturating_sub(after_end_ms);
    }

    /// A live room's profile.
    pub fn get(&self, id: &str) -> Option<&RoomInfo> {
        self.rooms.get(id).filter(|r| self.live(r))
    }

    /// A live room's profile, to update.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut RoomInfo> {
        let (idle_cut, end_cut) = (self.idle_cut, self.end_cut);
        self.rooms
            .get_mut(id)
            .filter(|r| r.seen_ms > idle_cut && r.ended_ms.is_none_or(|e| e > end_cut))
    }

    /// A live room's profile, or a fresh one in place of a gone room.
    pub fn entry(&mut self, id: &str) -> &mut RoomInfo {
        let live = self.get(id).is_some();
        let r = self.rooms.entry(id.to_owned()).or_default();
        if !live {
            *r = RoomInfo::default();
        }
        r
    }

    /// Sets a held room's times from a checkpoint's times field
    /// ([`RoomInfo::times`]), newer than its profile field's.
    pub fn set_times(&mut self, id: &str, value: &[u8]) -> Result<(), &'static str> {
        let bad = "not seen,ended,changed times in ms";
        let text = std::str::from_utf8(value).map_err(|_| bad)?;
        let mut it = text.split(',');
        let (Some(seen), Some(ended), Some(changed), None) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(bad);
        };
        let seen = seen.parse().map_err(|_| bad)?;
        let ended = match ended {
            "" => None,
            e => Some(e.parse().map_err(|_| bad)?),
        };
        let changed = changed.parse().map_err(|_| bad)?;
        if let Some(r) = self.rooms.get_mut(id) {
            (r.seen_ms, r.ended_ms, r.changed_ms) = (seen, ended, changed);
        }
        Ok(())
    }

    pub fn insert(&mut self, id: String, info: RoomInfo) {
        self.rooms.insert(id, info);
    }

    /// Removes the rooms that are gone; returns their ids.
    pub fn prune(&mut self) -> Vec<String> {
        let mut gone = Vec::new();
        let (idle_cut, end_cut) = (self.idle_cut, self.end_cut);
        self.rooms.retain(|id, r| {
            let keep = r.seen_ms > idle_cut && r.ended_ms.is_none_or(|e| e > end_cut);
            if !keep {
                gone.push(id.clone());
            }
            keep
        });
        gone
    }

    /// Rooms held, live or not yet pruned.
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &RoomInfo)> {
        self.rooms.iter()
    }
}

/// One input record as the aggregator sees it.
#[derive(Clone, Copy, Debug)]
pub struct Rec<'a> {
    pub event: &'a Event,
    /// Pools matched (monitored events only).
    pub pools: &'a [String],
    /// Enrichment fields (monitored events only).
    pub enrichment: Option<&'a HashMap<String, String>>,
    pub kind: Kind,
}

fn non_empty(s: &str) -> Option<ValRef<'_>> {
    (!s.is_empty()).then_some(ValRef::S(s))
}

impl<'a> Rec<'a> {
    /// `None` when the event has no payload (an unknown kind from a newer schema).
    pub fn new(
        event: &'a Event,
        pools: &'a [String],
        enrichment: Option<&'a HashMap<String, String>>,
    ) -> Option<Rec<'a>> {
        Some(Rec {
            event,
            pools,
            enrichment,
            kind: event.kind()?,
        })
    }

    fn enrich(&self, key: &str) -> Option<&'a str> {
        self.enrichment
            .and_then(|m| m.get(key))
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// The value of a single-valued field; `None` when absent (empty text,
    /// grade 0, no watch time, …). `pool` is multi-valued: see [`Rec::pools`].
    pub fn get<'r>(&self, f: &FieldRef, rooms: &'r RoomTable) -> Option<ValRef<'r>>
    where
        'a: 'r,
    {
        match f {
            FieldRef::Enrichment(k) => self.enrich(k).map(ValRef::S),
            FieldRef::Canon(c) => self.canon(*c).or_else(|| self.fallback(*c, rooms)),
        }
    }

    fn fallback<'r>(&self, f: Field, rooms: &'r RoomTable) -> Option<ValRef<'r>>
    where
        'a: 'r,
    {
        if f.ty() != FieldType::Str || f == Field::Pool {
            return None;
        }
        if let Some(v) = self.enrich(f.name()) {
            return Some(ValRef::S(v));
        }
        if f.is_room_field() {
            let key = format!("room.{}", f.name());
            if let Some(v) = self.enrich(&key) {
                return Some(ValRef::S(v));
            }
            return rooms
                .get(self.event.room_id.as_str())
                .and_then(|r| non_empty(r.get(f)));
        }
        None
    }

    fn canon(&self, f: Field) -> Option<ValRef<'a>> {
        let e = self.event;
        let p = e.payload.as_ref();
        let viewer = match p {
            Some(Payload::ViewerArrived(v)) => v.viewer.as_ref(),
            Some(Payload::ViewerLeft(v)) => v.viewer.as_ref(),
            _ => None,
        };
        let room = e.room();
        match f {
            Field::EventId => non_empty(&e.event_id),
            Field::Kind => Some(ValRef::S(self.kind.as_str())),
            Field::EventTime => Some(ValRef::I(e.event_time_ms)),
            Field::UserId => non_empty(&e.user_id),
            Field::VideoId => non_empty(&e.video_id),
            Field::AuthorId => non_empty(&e.author_id),
            Field::RoomId => non_empty(&e.room_id),
            Field::Action => match p {
                Some(Payload::UserAction(a)) => non_empty(&a.action),
                _ => None,
            },
            Field::TargetId => match p {
                Some(Payload::UserAction(a)) => non_empty(&a.target_id),
                _ => None,
            },
            Field::Target => match p {
                Some(Payload::UserAction(a)) => {
                    non_empty(&a.target_id).or_else(|| non_empty(&e.video_id))
                }
                _ => None,
            },
            Field::GiftType => match p {
                Some(Payload::GiftSent(g)) => non_empty(&g.gift_type),
                _ => None,
            },
            Field::Amount => match p {
                Some(Payload::GiftSent(g)) => Some(ValRef::I(g.amount)),
                _ => None,
            },
            Field::Ip => match p {
                Some(Payload::GiftSent(g)) => non_empty(&g.ip),
                _ => viewer.and_then(|v| non_empty(&v.ip)),
            },
            Field::Province => viewer.and_then(|v| non_empty(&v.province)),
            Field::Region => viewer.and_then(|v| non_empty(&v.region)),
            Field::Grade => viewer
                .map(|v| v.grade)
                .filter(|g| *g != 0)
                .map(|g| ValRef::I(i64::from(g))),
            Field::WatchMs => match p {
                Some(Payload::VideoPlayed(v)) => v.watch_ms.map(ValRef::I),
                _ => None,
            },
            Field::DurationMs => match p {
                Some(Payload::VideoMetadata(m)) => Some(ValRef::I(m.duration_ms)),
                _ => None,
            },
            Field::Url => match p {
                Some(Payload::VideoMetadata(m)) => non_empty(&m.url),
                _ => None,
            },
            Field::Resolution => match p {
                Some(Payload::VideoMetadata(m)) => non_empty(&m.resolution),
                _ => None,
            },
            Field::Title => match p {
                Some(Payload::VideoUploaded(u)) => non_empty(&u.title),
                _ => room.and_then(|r| non_empty(&r.title)),
            },
            Field::Category => match p {
                Some(Payload::VideoPublished(v)) => non_empty(&v.category),
                _ => None,
            },
            Field::RoomType => room.and_then(|r| non_empty(&r.r#type)),
            Field::Client => room.and_then(|r| non_empty(&r.client)),
            Field::Address => room.and_then(|r| non_empty(&r.address)),
            Field::AnchorId => room.and_then(|r| non_empty(&r.anchor_id)),
            Field::ModuleId => room.and_then(|r| non_empty(&r.module_id)),
            Field::ArriveTime => match p {
                Some(Payload::ViewerArrived(_)) => Some(ValRef::I(e.event_time_ms)),
                Some(Payload::ViewerLeft(v)) => {
                    (v.arrived_at_ms != 0).then_some(ValRef::I(v.arrived_at_ms))
                }
                _ => None,
            },
            Field::LeaveTime => match p {
                Some(Payload::ViewerLeft(_)) => Some(ValRef::I(e.event_time_ms)),
                _ => None,
            },
            Field::Pool => None,
        }
    }

    /// The room profile a `live_room_started` / `live_room_ended` event
    /// carries, with its room id.
    pub fn room_profile(&self) -> Option<(&'a str, &'a Room)> {
        let room = self.event.room()?;
        (!self.event.room_id.is_empty()).then_some((self.event.room_id.as_str(), room))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vidpulse_proto::{GiftSent, LiveRoomStarted, UserAction, Viewer, ViewerLeft};

    fn rec(e: &Event) -> Rec<'_> {
        Rec::new(e, &[], None).unwrap()
    }

    #[test]
    fn a_room_is_checkpointed_under_short_keys_and_read_back_from_long_ones() {
        let r = RoomInfo {
            room_type: "game".into(),
            module_id: "m1".into(),
            seen_ms: 60_000,
            ended_ms: Some(61_000),
            changed_ms: 61_000,
            ..RoomInfo::default()
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"ty":"game","mo":"m1","s":60000,"e":61000,"c":61000}"#
        );
        assert_eq!(serde_json::from_str::<RoomInfo>(&json).unwrap(), r);
        let old = r#"{"room_type":"game","module_id":"m1","seen_ms":60000,"ended_ms":61000,"changed_ms":61000}"#;
        assert_eq!(serde_json::from_str::<RoomInfo>(old).unwrap(), r);
    }

    #[test]
    fn canonical_fields_and_absence() {
        let e = Event {
            event_id: "e1".into(),
            event_time_ms: 5000,
            user_id: "u1".into(),
            room_id: "r1".into(),
            payload: Some(Payload::ViewerLeft(ViewerLeft {
                viewer: Some(Viewer {
                    province: "浙江".into(),
                    region: "1122".into(),
                    grade: 0,
                    ip: "1.2.3.4".into(),
                }),
                arrived_at_ms: 1000,
            })),
            ..Default::default()
        };
        let r = rec(&e);
        let rooms = RoomTable::new();
        let get = |n: &str| r.get(&FieldRef::parse(n).unwrap(), &rooms);
        assert_eq!(get("province"), Some(ValRef::S("浙江")));
        assert_eq!(get("grade"), None, "grade 0 means unknown");
        assert_eq!(get("arrive_time"), Some(ValRef::I(1000)));
        assert_eq!(get("leave_time"), Some(ValRef::I(5000)));
        assert_eq!(get("kind"), Some(ValRef::S("viewer_left")));
        assert_eq!(get("video_id"), None);
        assert_eq!(get("room.type"), None);
        assert!(FieldRef::parse("nonsense").is_none());
    }

    #[test]
    fn room_fields_fall_back_to_enrichment_then_room_table() {
        let gift = Event {
            event_id: "g".into(),
            room_id: "r1".into(),
            payload: Some(Payload::GiftSent(GiftSent {
                gift_type: "3".into(),
                amount: 7,
                ip: String::new(),
            })),
            ..Default::default()
        };
        let mut rooms = RoomTable::new();
        let module = FieldRef::parse("module_id").unwrap();
        assert_eq!(rec(&gift).get(&module, &rooms), None);
        let start = Event {
            room_id: "r1".into(),
            payload: Some(Payload::LiveRoomStarted(LiveRoomStarted {
                room: Some(Room {
                    module_id: "1003".into(),
                    ..Default::default()
                }),
            })),
            ..Default::default()
        };
        let (id, room) = rec(&start).room_profile().unwrap();
        rooms.insert(id.into(), RoomInfo::from_room(room));
        assert_eq!(rec(&gift).get(&module, &rooms), Some(ValRef::S("1003")));
        let mut enrichment = HashMap::new();
        enrichment.insert("module_id".to_owned(), "2001".to_owned());
        let monitored = Rec::new(&gift, &[], Some(&enrichment)).unwrap();
        assert_eq!(monitored.get(&module, &rooms), Some(ValRef::S("2001")));
    }

    #[test]
    fn target_prefers_target_id_then_video() {
        let mut e = Event {
            video_id: "v1".into(),
            payload: Some(Payload::UserAction(UserAction {
                action: "like".into(),
                target_id: String::new(),
            })),
            ..Default::default()
        };
        let rooms = RoomTable::new();
        let t = FieldRef::Canon(Field::Target);
        assert_eq!(rec(&e).get(&t, &rooms), Some(ValRef::S("v1")));
        e.payload = Some(Payload::UserAction(UserAction {
            action: "like".into(),
            target_id: "v2".into(),
        }));
        assert_eq!(rec(&e).get(&t, &rooms), Some(ValRef::S("v2")));
    }
}
