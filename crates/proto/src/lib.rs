//! The canonical vidpulse event (generated from `proto/vidpulse/v1/event.proto`)
//! plus the few rules every stage shares about it: kind names and the
//! partition key.
#![forbid(unsafe_code)]

#[allow(clippy::all, missing_docs)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/vidpulse.v1.rs"));
}

pub use generated::*;
pub use prost::Message;

mod view;
pub use view::{EventIds, EventView, ViewError};

/// Version written into `Event::schema_version` by this build.
pub const SCHEMA_VERSION: u32 = 1;

/// The payload kinds, by the names used in mappings, metric specs and docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

    pub fn as_str(self) -> &'static str {
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

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl event::Payload {
    pub fn kind(&self) -> Kind {
        use event::Payload as P;
        match self {
            P::VideoUploaded(_) => Kind::VideoUploaded,
            P::VideoMetadata(_) => Kind::VideoMetadata,
            P::PlayRequested(_) => Kind::PlayRequested,
            P::VideoPlayed(_) => Kind::VideoPlayed,
            P::UserAction(_) => Kind::UserAction,
            P::ViewerArrived(_) => Kind::ViewerArrived,
            P::ViewerLeft(_) => Kind::ViewerLeft,
            P::GiftSent(_) => Kind::GiftSent,
            P::LiveRoomStarted(_) => Kind::LiveRoomStarted,
            P::LiveRoomEnded(_) => Kind::LiveRoomEnded,
            P::VideoPublished(_) => Kind::VideoPublished,
        }
    }
}

impl Event {
    pub fn kind(&self) -> Option<Kind> {
        self.payload.as_ref().map(event::Payload::kind)
    }

    /// The room profile a live room event (started / ended) carries.
    pub fn room(&self) -> Option<&Room> {
        match &self.payload {
            Some(event::Payload::LiveRoomStarted(r)) => r.room.as_ref(),
            Some(event::Payload::LiveRoomEnded(r)) => r.room.as_ref(),
            _ => None,
        }
    }

    /// The id this event is "about", used as the Kafka key of `vp.events.v1`:
    /// the video for video events, the author for publications, the room for
    /// live events. When that id is absent (a gift without a room, a user
    /// action without a target) the user id, then the event id, is used, so
    /// the key is never empty and per-subject order is kept.
    pub fn subject_key(&self) -> &str {
        let primary = match self.kind() {
            Some(
                Kind::VideoUploaded | Kind::VideoMetadata | Kind::PlayRequested | Kind::VideoPlayed,
            ) => self.video_id.as_str(),
            Some(Kind::VideoPublished) => self.author_id.as_str(),
            Some(Kind::UserAction) => {
                if !self.video_id.is_empty() {
                    self.video_id.as_str()
                } else if let Some(event::Payload::UserAction(a)) = &self.payload {
                    a.target_id.as_str()
                } else {
                    ""
                }
            }
            Some(
                Kind::ViewerArrived
                | Kind::ViewerLeft
                | Kind::GiftSent
                | Kind::LiveRoomStarted
                | Kind::LiveRoomEnded,
            ) => self.room_id.as_str(),
            None => "",
        };
        [primary, self.user_id.as_str(), self.event_id.as_str()]
            .into_iter()
            .find(|s| !s.is_empty())
            .unwrap_or("")
    }
}

impl MonitoredEvent {
    /// This message's encoding around an event already encoded as
    /// `event_bytes` (the record the monitor read), followed by `entries`,
    /// `enrichment` entries already encoded ([`encode_enrichment_entry`]):
    /// field 1 is the event message, and a message field's encoding is its
    /// key, its length and the message's bytes, so the event is copied, not
    /// re-encoded. `self`'s own `event` should be `None`; its other fields
    /// are encoded between. Decodes as the message with `event` set and the
    /// entries in `enrichment` (fields may come in any order); unknown
    /// fields the event's writer added are kept.
    pub fn encode_around(&self, event_bytes: &[u8], entries: &[u8]) -> Vec<u8> {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
        debug_assert!(self.event.is_none(), "the event is the bytes given");
        let len = event_bytes.len() as u64;
        let mut buf = Vec::with_capacity(
            1 + encoded_len_varint(len) + event_bytes.len() + self.encoded_len() + entries.len(),
        );
        encode_key(1, WireType::LengthDelimited, &mut buf);
        encode_varint(len, &mut buf);
        buf.extend_from_slice(event_bytes);
        self.encode_raw(&mut buf);
        buf.extend_from_slice(entries);
        buf
    }
}

/// Appends one `MonitoredEvent.enrichment` entry named `prefix` + `name`
/// (a map entry: field 3, a message of key = 1 and value = 2) to `buf`:
/// entries so encoded can be concatenated after the rest of the message.
pub fn encode_enrichment_entry(prefix: &str, name: &str, value: &str, buf: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
    let key_len = prefix.len() + name.len();
    let entry_len = 1
        + encoded_len_varint(key_len as u64)
        + key_len
        + 1
        + encoded_len_varint(value.len() as u64)
        + value.len();
    encode_key(3, WireType::LengthDelimited, buf);
    encode_varint(entry_len as u64, buf);
    encode_key(1, WireType::LengthDelimited, buf);
    encode_varint(key_len as u64, buf);
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend_from_slice(name.as_bytes());
    encode_key(2, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.extend_from_slice(value.as_bytes());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_monitored_event_encoded_around_the_event_bytes_decodes_as_the_whole_message() {
        let event = Event {
            event_id: "e1".into(),
            user_id: "u1".into(),
            room_id: "r1".into(),
            event_time_ms: 1_700_000_000_123,
            payload: Some(event::Payload::GiftSent(GiftSent {
                gift_type: "rocket".into(),
                amount: 5,
                ..Default::default()
            })),
            ..Default::default()
        };
        let rest = MonitoredEvent {
            event: None,
            pools: vec!["all".into(), "vip".into()],
            enrichment: [("room.type".to_owned(), "game".to_owned())].into(),
        };
        let spliced = rest.encode_around(&event.encode_to_vec(), &[]);
        let whole = MonitoredEvent {
            event: Some(event),
            ..rest
        };
        assert_eq!(MonitoredEvent::decode(spliced.as_slice()).unwrap(), whole);
        assert_eq!(
            spliced,
            whole.encode_to_vec(),
            "same bytes as prost's own encoding"
        );
    }

    #[test]
    fn enrichment_entries_encoded_one_by_one_decode_as_the_map() {
        let mut entries = Vec::new();
        encode_enrichment_entry("anchor.", "level", "7", &mut entries);
        encode_enrichment_entry("", "module_id", "m1", &mut entries);
        encode_enrichment_entry("room.", "title", &"长".repeat(60), &mut entries);
        encode_enrichment_entry("viewer.", "city", "", &mut entries);
        let buf = MonitoredEvent {
            event: None,
            pools: vec!["all".into()],
            enrichment: Default::default(),
        }
        .encode_around(&[], &entries);
        let m = MonitoredEvent::decode(buf.as_slice()).unwrap();
        let want: std::collections::HashMap<String, String> = [
            ("anchor.level", "7".to_owned()),
            ("module_id", "m1".to_owned()),
            ("room.title", "长".repeat(60)),
            ("viewer.city", String::new()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(m.enrichment, want);
        assert_eq!(m.pools, vec!["all".to_owned()]);
        assert_eq!(m.event, Some(Event::default()), "the empty event given");
    }

    #[test]
    fn kind_names_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("nope"), None);
    }

    #[test]
    fn subject_key_follows_the_subject_then_falls_back() {
        let mut e = Event {
            event_id: "e1".into(),
            user_id: "u1".into(),
            video_id: "v1".into(),
            room_id: "r1".into(),
            payload: Some(event::Payload::VideoPlayed(VideoPlayed::default())),
            ..Default::default()
        };
        assert_eq!(e.subject_key(), "v1");
        e.payload = Some(event::Payload::GiftSent(GiftSent::default()));
        assert_eq!(e.subject_key(), "r1");
        e.room_id.clear();
        assert_eq!(e.subject_key(), "u1");
        e.user_id.clear();
        assert_eq!(e.subject_key(), "e1");
        let a = Event {
            event_id: "e2".into(),
            payload: Some(event::Payload::UserAction(UserAction {
                action: "like".into(),
                target_id: "t9".into(),
            })),
            ..Default::default()
        };
        assert_eq!(a.subject_key(), "t9");
    }
}
