//! The fields a metrics spec can name (group-by keys, aggregate inputs,
//! filters, log columns), their types and values. The aggregator reads them
//! out of events (`vidpulse_aggregator::record`); the read side uses their
//! types to build tables and queries.

use std::fmt;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

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
    pub fn is_room_field(self) -> bool {
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

/// An owned field value (group keys, distinct members, log cells). It
/// hashes as its [`ValRef`], so a map keyed by values can be searched with
/// borrowed ones.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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

impl Hash for Val {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_ref().hash(state);
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

impl Hash for ValRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            ValRef::I(i) => {
                state.write_u8(0);
                i.hash(state);
            }
            ValRef::S(s) => {
                state.write_u8(1);
                s.hash(state);
            }
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
