//! What the generator produces: raw records tagged with their class (valid,
//! late, duplicate, malformed with the DLQ reason ingest must give), and the
//! canonical event each non-malformed record must normalize to.

use std::fmt;

/// One raw topic format of docs/mapping.md, "Presets".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Format {
    VideoEvents,
    VideoMessages,
    PlayRequest,
    LiveStreamingLog,
    LiveGiftTotal,
    LiveRoomEvents,
    VideoProductionLog,
    VideoConsumptionLog,
    UserActions,
}

impl Format {
    /// All formats, in the order of `vidpulse_core::topics::RAW`.
    pub const ALL: [Format; 9] = [
        Format::VideoEvents,
        Format::VideoMessages,
        Format::PlayRequest,
        Format::LiveStreamingLog,
        Format::LiveGiftTotal,
        Format::LiveRoomEvents,
        Format::VideoProductionLog,
        Format::VideoConsumptionLog,
        Format::UserActions,
    ];

    /// The unprefixed raw topic name.
    pub fn topic(self) -> &'static str {
        vidpulse_core::topics::RAW[self as usize]
    }

    /// The format written to raw topic `topic` (unprefixed).
    pub fn from_topic(topic: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.topic() == topic)
    }

    /// Relative share of the records of a run that use this format.
    pub(crate) fn weight(self) -> u32 {
        match self {
            Format::VideoEvents => 5,
            Format::VideoConsumptionLog => 4,
            Format::LiveStreamingLog => 4,
            Format::LiveGiftTotal => 3,
            Format::UserActions => 3,
            Format::PlayRequest => 2,
            Format::VideoMessages => 1,
            Format::LiveRoomEvents => 1,
            Format::VideoProductionLog => 1,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.topic())
    }
}

/// The DLQ reason code ingest must give a malformed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    EmptyPayload,
    InvalidUtf8,
    TruncatedJson,
    InvalidJson,
    NotAnObject,
    NestingTooDeep,
    MissingField,
    WrongType,
    InvalidValue,
    InvalidId,
    UnparseableTime,
    TimeOutOfRange,
    UnknownEventType,
}

impl Reason {
    /// Every reason, in the order malformed records rotate through them.
    pub const ALL: [Reason; 13] = [
        Reason::EmptyPayload,
        Reason::InvalidUtf8,
        Reason::TruncatedJson,
        Reason::InvalidJson,
        Reason::NotAnObject,
        Reason::NestingTooDeep,
        Reason::MissingField,
        Reason::WrongType,
        Reason::InvalidValue,
        Reason::InvalidId,
        Reason::UnparseableTime,
        Reason::TimeOutOfRange,
        Reason::UnknownEventType,
    ];

    /// The stable code (the DLQ `vp.reason` header and metric label).
    pub fn code(self) -> &'static str {
        match self {
            Reason::EmptyPayload => "empty_payload",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::TruncatedJson => "truncated_json",
            Reason::InvalidJson => "invalid_json",
            Reason::NotAnObject => "not_an_object",
            Reason::NestingTooDeep => "nesting_too_deep",
            Reason::MissingField => "missing_field",
            Reason::WrongType => "wrong_type",
            Reason::InvalidValue => "invalid_value",
            Reason::InvalidId => "invalid_id",
            Reason::UnparseableTime => "unparseable_time",
            Reason::TimeOutOfRange => "time_out_of_range",
            Reason::UnknownEventType => "unknown_event_type",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// What the pipeline should make of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A valid event, in time.
    Valid,
    /// A valid event whose event time was set back by `--late-by`.
    Late,
    /// An exact byte copy (same key) of the earlier valid record `of`
    /// (its sequence number); ingest writes it again, with the same event id.
    Duplicate { of: u64 },
    /// Must go to the DLQ with this reason.
    Malformed { reason: Reason },
}

impl Class {
    /// A distinct valid event (in time or late).
    pub fn is_valid(self) -> bool {
        matches!(self, Class::Valid | Class::Late)
    }
}

/// One record to produce.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRecord {
    /// Position in production order, from 0. Valid records carry it in
    /// their `event_id` (`g<seed>-<seq>`); a duplicate carries its original's.
    pub seq: u64,
    /// The unprefixed raw topic.
    pub topic: &'static str,
    /// The subject id as text (see docs/mapping.md, "The canonical event"); `None` for some unparseable
    /// records.
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub class: Class,
    /// The canonical event ingest must produce; `None` for malformed records.
    pub event: Option<Event>,
}

/// Canonical event kinds (the `oneof payload` of `vidpulse.v1.Event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    VideoUploaded,
    VideoMetadata,
    PlayRequested,
    VideoPlayed,
    UserAction,
    ViewerArrived,
    ViewerLeft,
    GiftSent,
    LiveRoomStarted,
    LiveRoomEnded,
    VideoPublished,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::VideoUploaded,
        Kind::VideoMetadata,
        Kind::PlayRequested,
        Kind::VideoPlayed,
        Kind::UserAction,
        Kind::ViewerArrived,
        Kind::ViewerLeft,
        Kind::GiftSent,
        Kind::LiveRoomStarted,
        Kind::LiveRoomEnded,
        Kind::VideoPublished,
    ];

    /// The name used in the truth file (the proto field name).
    pub fn name(self) -> &'static str {
        match self {
            Kind::VideoUploaded => "video_uploaded",
            Kind::VideoMetadata => "video_metadata",
            Kind::PlayRequested => "play_requested",
            Kind::VideoPlayed => "video_played",
            Kind::UserAction => "user_action",
            Kind::ViewerArrived => "viewer_arrived",
            Kind::ViewerLeft => "viewer_left",
            Kind::GiftSent => "gift_sent",
            Kind::LiveRoomStarted => "live_room_started",
            Kind::LiveRoomEnded => "live_room_ended",
            Kind::VideoPublished => "video_published",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The canonical event a valid record normalizes to, reduced to what the
/// truth needs. Ids are text exactly as the canonical event carries them
/// (numbers in decimal); `None` where the raw record has no such field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: Kind,
    /// `g<seed>-<seq>` when `--event-ids` is on.
    pub event_id: Option<String>,
    /// Event time, UTC ms since the epoch.
    pub time_ms: i64,
    pub user_id: Option<String>,
    pub video_id: Option<String>,
    pub author_id: Option<String>,
    pub room_id: Option<String>,
    /// `video_played`: watch time when the source says.
    pub watch_ms: Option<i64>,
    /// `user_action`: like, comment, share, order.
    pub action: Option<String>,
    /// `gift_sent`: gift type as text.
    pub gift_type: Option<String>,
    /// `gift_sent`: amount.
    pub amount: Option<i64>,
    /// Viewer events: province and member grade.
    pub province: Option<String>,
    pub grade: Option<i32>,
}

impl Event {
    pub(crate) fn new(kind: Kind, time_ms: i64) -> Event {
        Event {
            kind,
            event_id: None,
            time_ms,
            user_id: None,
            video_id: None,
            author_id: None,
            room_id: None,
            watch_ms: None,
            action: None,
            gift_type: None,
            amount: None,
            province: None,
            grade: None,
        }
    }
}
