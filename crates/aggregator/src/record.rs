//! What the aggregator reads: a canonical event, with the pools it matched
//! and its enrichment when it comes from `vp.monitored.v1`, and the fields a
//! metric spec can name (group-by keys, aggregate inputs, filters, log
//! columns).
//!
//! Every value is a pure function of the record and of the room table the
//! partition learned from earlier records, so a replay of the same records
//! yields the same values (nothing here looks at a clock or a remote store).

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use vidpulse_proto::{Event, Kind, Room, event::Payload};

/// A field of the canonical event (or derived from it) that a spec can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    EventId,
    Kind,
    EventTime,
    UserId,
    VideoId,
    AuthorId,
    RoomId,
    Action,
    TargetId,
    /// `target_id`, else `video_id`: what a user action is about.
    Target,
    GiftType,
    Amount,
    Ip,
    Province,
    Region,
    Grade,
    WatchMs,
    DurationMs,
    Url,
    Resolution,
    Title,
    Category,
    /// The live room's type (`Room.type`).
    RoomType,
    Client,
    Address,
    AnchorId,
    ModuleId,
    /// Viewer events: when the visit began (the event time of an arrival).
    ArriveTime,
    /// Viewer events: when the visit ended (departures only).
    LeaveTime,
    /// The pools a monitored event matched: one value per pool.
    Pool,
}

/// The type of a field's values, which fixes its ClickHouse column type and
/// its JSON form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum FieldType {
    /// Text (`String`).
    Str,
    /// A whole number (`Int64`).
    Int,
    /// UTC milliseconds (`Int64`), printed as RFC 3339.
    Time,
}

impl Field {
    pub const ALL: [Field; 30] = [
        Field::EventId,
        Field::Kind,
        Field::EventTime,
        Field::UserId,
        Field::VideoId,
        Field::AuthorId,
        Field::RoomId,
        Field::Action,
        Field::TargetId,
        Field::Target,
        Field::GiftType,
        Field::Amount,
        Field::Ip,
        Field::Province,
        Field::Region,
        Field::Grade,
        Field::WatchMs,
        Field::DurationMs,
        Field::Url,
        Field::Resolution,
        Field::Title,
        Field::Category,
        Field::RoomType,
        Field::Client,
        Field::Address,
        Field::AnchorId,
        Field::ModuleId,
        Field::ArriveTime,
        Field::LeaveTime,
        Field::Pool,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Field::EventId => "event_id",
            Field::Kind => "kind",
            Field::EventTime => "event_time",
            Field::UserId => "user_id",
            Field::VideoId => "video_id",
            Field::AuthorId => "author_id",
            Field::RoomId => "room_id",
            Field::Action => "action",
            Field::TargetId => "target_id",
            Field::Target => "target",
            Field::GiftType => "gift_type",
            Field::Amount => "amount",
            Field::Ip => "ip",
            Field::Province => "province",
            Field::Region => "region",
            Field::Grade => "grade",
            Field::WatchMs => "watch_ms",
            Field::DurationMs => "duration_ms",
            Field::Url => "url",
            Field::Resolution => "resolution",
            Field::Title => "title",
            Field::Category => "category",
            Field::RoomType => "type",
            Field::Client => "client",
            Field::Address => "address",
            Field::AnchorId => "anchor_id",
            Field::ModuleId => "module_id",
            Field::ArriveTime => "arrive_time",
            Field::LeaveTime => "leave_time",
            Field::Pool => "pool",
        }
    }

    pub fn parse(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == name)
    }

    pub fn ty(self) -> FieldType {
        match self {
            Field::Amount | Field::Grade | Field::WatchMs | Field::DurationMs => FieldType::Int,
            Field::EventTime | Field::ArriveTime | Field::LeaveTime => FieldType::Time,
            _ => FieldType::Str,
        }
    }

    /// Room profile fields, which fall back to enrichment `room.<name>` and
    /// to the partition's room table.
    fn is_room_field(self) -> bool {
        matches!(
            self,
            Field::RoomType
                | Field::Client
                | Field::Title
                | Field::Address
                | Field::AnchorId
                | Field::ModuleId
        )
    }
}

/// A field as named in a spec: canonical, or an enrichment key (any name
/// with a dot, e.g. `room.type`, `anchor.gender`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FieldRef {
    Canon(Field),
    Enrichment(Box<str>),
}

impl FieldRef {
    /// Parses a spec name; `None` for an unknown name without a dot.
    pub fn parse(name: &str) -> Option<FieldRef> {
        match Field::parse(name) {
            Some(f) => Some(FieldRef::Canon(f)),
            None if name.contains('.') && !name.starts_with('.') && !name.ends_with('.') => {
                Some(FieldRef::Enrichment(name.into()))
            }
            None => None,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            FieldRef::Canon(f) => f.name(),
            FieldRef::Enrichment(k) => k,
        }
    }

    pub fn ty(&self) -> FieldType {
        match self {
            FieldRef::Canon(f) => f.ty(),
            FieldRef::Enrichment(_) => FieldType::Str,
        }
    }
}

/// An owned field value (group keys, distinct members, log cells).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Val {
    I(i64),
    S(Box<str>),
}

impl Val {
    pub fn as_ref(&self) -> ValRef<'_> {
        match self {
            Val::I(i) => ValRef::I(*i),
            Val::S(s) => ValRef::S(s),
        }
    }
}

impl fmt::Display for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_ref().fmt(f)
    }
}

/// A borrowed field value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValRef<'a> {
    I(i64),
    S(&'a str),
}

impl ValRef<'_> {
    pub fn to_owned(self) -> Val {
        match self {
            ValRef::I(i) => Val::I(i),
            ValRef::S(s) => Val::S(s.into()),
        }
    }

    pub fn as_int(self) -> Option<i64> {
        match self {
            ValRef::I(i) => Some(i),
            ValRef::S(s) => s.parse().ok(),
        }
    }

    /// Compares with a spec literal as text (`3` equals `"3"`).
    pub fn matches_text(self, text: &str) -> bool {
        match self {
            ValRef::I(i) => text.parse::<i64>().is_ok_and(|t| t == i),
            ValRef::S(s) => s == text,
        }
    }
}

impl fmt::Display for ValRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValRef::I(i) => write!(f, "{i}"),
            ValRef::S(s) => f.write_str(s),
        }
    }
}

/// What the partition knows about a live room from its `live_room_started`
/// events (the same partition: room events and the room's viewers and gifts
/// share the room id as key).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInfo {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub room_type: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub title: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub anchor_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub module_id: String,
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

/// Room id → profile, learned from room events of one partition.
pub type RoomTable = HashMap<String, RoomInfo>;

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
        let room = match p {
            Some(Payload::LiveRoomStarted(r)) => r.room.as_ref(),
            Some(Payload::LiveRoomEnded(r)) => r.room.as_ref(),
            _ => None,
        };
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
        let room = match self.event.payload.as_ref() {
            Some(Payload::LiveRoomStarted(r)) => r.room.as_ref(),
            Some(Payload::LiveRoomEnded(r)) => r.room.as_ref(),
            _ => None,
        }?;
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
