//! The ids of an encoded [`Event`], read in place: what the monitor needs
//! to match an event against its pools and to plan its enrichment, without
//! decoding (allocating and validating) the whole message.
//!
//! The whole envelope is walked, so a record that is not a well-formed
//! protobuf message is an error, as with a full decode; the string fields
//! read are checked to be UTF-8. The other fields are skipped unchecked: a
//! stage that uses them decodes the record fully (the aggregator does).

use crate::{Event, Kind, event};

/// The ids an event carries, however it is held: decoded ([`Event`]) or in
/// place ([`EventView`]).
pub trait EventIds {
    fn kind(&self) -> Option<Kind>;
    fn user_id(&self) -> &str;
    fn video_id(&self) -> &str;
    fn author_id(&self) -> &str;
    fn room_id(&self) -> &str;
    /// A user action's target ("" for other kinds).
    fn target_id(&self) -> &str;
    /// A live room event's room payload as (anchor id, module id).
    fn room_anchor_module(&self) -> Option<(&str, &str)>;
}

impl EventIds for Event {
    fn kind(&self) -> Option<Kind> {
        Event::kind(self)
    }
    fn user_id(&self) -> &str {
        &self.user_id
    }
    fn video_id(&self) -> &str {
        &self.video_id
    }
    fn author_id(&self) -> &str {
        &self.author_id
    }
    fn room_id(&self) -> &str {
        &self.room_id
    }
    fn target_id(&self) -> &str {
        match &self.payload {
            Some(event::Payload::UserAction(a)) => &a.target_id,
            _ => "",
        }
    }
    fn room_anchor_module(&self) -> Option<(&str, &str)> {
        let room = self.room()?;
        Some((&room.anchor_id, &room.module_id))
    }
}

/// An encoded event's ids, borrowed from its bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventView<'a> {
    kind: Option<Kind>,
    user_id: &'a str,
    video_id: &'a str,
    author_id: &'a str,
    room_id: &'a str,
    target_id: &'a str,
    room: Option<(&'a str, &'a str)>,
}

/// Why bytes are not an event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("a varint longer than 10 bytes at byte {0}")]
    Varint(usize),
    #[error("wire type {wire} of field {field} is not supported")]
    WireType { field: u64, wire: u64 },
    #[error("field {0} is not UTF-8")]
    Utf8(u64),
}

/// A protobuf wire reader over a slice.
struct Wire<'a> {
    buf: &'a [u8],
    at: usize,
    /// Offset of `buf` in the record, for error positions.
    base: usize,
}

/// A field's value as read.
enum Value<'a> {
    Scalar,
    Bytes(&'a [u8], usize),
}

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Result<u64, ViewError> {
        let mut v = 0u64;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.at) else {
                return Err(ViewError::Truncated(self.base + self.at));
            };
            self.at += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(ViewError::Varint(self.base + self.at))
    }

    fn skip(&mut self, n: usize) -> Result<(), ViewError> {
        if self.buf.len() - self.at < n {
            return Err(ViewError::Truncated(self.base + self.buf.len()));
        }
        self.at += n;
        Ok(())
    }

    /// The next field: its number and value; `None` at the end.
    fn field(&mut self) -> Result<Option<(u64, Value<'a>)>, ViewError> {
        if self.at == self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (field, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => {
                self.varint()?;
                Value::Scalar
            }
            1 => {
                self.skip(8)?;
                Value::Scalar
            }
            5 => {
                self.skip(4)?;
                Value::Scalar
            }
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| ViewError::Truncated(self.base + self.buf.len()))?;
                let start = self.at;
                self.skip(len)?;
                Value::Bytes(&self.buf[start..self.at], self.base + start)
            }
            _ => return Err(ViewError::WireType { field, wire }),
        };
        Ok(Some((field, value)))
    }
}

fn utf8(field: u64, b: &[u8]) -> Result<&str, ViewError> {
    std::str::from_utf8(b).map_err(|_| ViewError::Utf8(field))
}

/// Walks a message, handing each length-delimited field to `f`.
fn walk<'a>(
    buf: &'a [u8],
    base: usize,
    mut f: impl FnMut(u64, &'a [u8], usize) -> Result<(), ViewError>,
) -> Result<(), ViewError> {
    let mut w = Wire { buf, at: 0, base };
    while let Some((field, value)) = w.field()? {
        if let Value::Bytes(b, at) = value {
            f(field, b, at)?;
        }
    }
    Ok(())
}

/// The payload kinds by their field number in `Event`.
fn payload_kind(field: u64) -> Option<Kind> {
    let i = field.checked_sub(20)?;
    Kind::ALL.get(usize::try_from(i).ok()?).copied()
}

impl<'a> EventView<'a> {
    /// Reads an encoded `Event`. Fields appearing more than once follow
    /// protobuf's rules: the last string wins, a repeated payload message
    /// merges into the one before, another payload kind replaces it.
    pub fn parse(buf: &'a [u8]) -> Result<Self, ViewError> {
        let mut v = EventView::default();
        let mut payload_field = 0u64;
        walk(buf, 0, |field, b, at| {
            match field {
                6 => v.user_id = utf8(field, b)?,
                7 => v.video_id = utf8(field, b)?,
                8 => v.author_id = utf8(field, b)?,
                9 => v.room_id = utf8(field, b)?,
                20..=30 => {
                    if field != payload_field {
                        payload_field = field;
                        v.target_id = "";
                        v.room = None;
                    }
                    v.kind = payload_kind(field);
                    v.payload(field, b, at)?;
                }
                _ => {}
            }
            Ok(())
        })?;
        Ok(v)
    }

    fn payload(&mut self, field: u64, b: &'a [u8], base: usize) -> Result<(), ViewError> {
        match payload_kind(field) {
            Some(Kind::UserAction) => walk(b, base, |f, s, _| {
                if f == 2 {
                    self.target_id = utf8(f, s)?;
                }
                Ok(())
            }),
            Some(Kind::LiveRoomStarted | Kind::LiveRoomEnded) => walk(b, base, |f, room, at| {
                if f == 1 {
                    let (mut anchor, mut module) = self.room.unwrap_or_default();
                    walk(room, at, |rf, s, _| {
                        match rf {
                            5 => anchor = utf8(rf, s)?,
                            6 => module = utf8(rf, s)?,
                            _ => {}
                        }
                        Ok(())
                    })?;
                    self.room = Some((anchor, module));
                }
                Ok(())
            }),
            // Walked for its structure only.
            _ => walk(b, base, |_, _, _| Ok(())),
        }
    }
}

impl EventIds for EventView<'_> {
    fn kind(&self) -> Option<Kind> {
        self.kind
    }
    fn user_id(&self) -> &str {
        self.user_id
    }
    fn video_id(&self) -> &str {
        self.video_id
    }
    fn author_id(&self) -> &str {
        self.author_id
    }
    fn room_id(&self) -> &str {
        self.room_id
    }
    fn target_id(&self) -> &str {
        self.target_id
    }
    fn room_anchor_module(&self) -> Option<(&str, &str)> {
        self.room
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{
        GiftSent, LiveRoomEnded, LiveRoomStarted, Message as _, Room, Source, UserAction,
        VideoPlayed, Viewer, ViewerArrived,
    };

    fn ids(e: &dyn EventIds) -> (Option<Kind>, [&str; 6], Option<(&str, &str)>) {
        (
            e.kind(),
            [
                e.user_id(),
                e.video_id(),
                e.author_id(),
                e.room_id(),
                e.target_id(),
                "",
            ],
            e.room_anchor_module(),
        )
    }

    fn events() -> Vec<Event> {
        let base = Event {
            event_id: "e1".into(),
            event_time_ms: 1_700_000_000_000,
            ingest_time_ms: 1_700_000_000_500,
            source: Some(Source {
                topic: "raw".into(),
                partition: 3,
                offset: 1 << 40,
                mapping: "preset:seed-001".into(),
            }),
            schema_version: 1,
            user_id: "u-用户".into(),
            video_id: "v1".into(),
            author_id: "a1".into(),
            room_id: "r1".into(),
            payload: None,
        };
        let room = Room {
            r#type: "game".into(),
            anchor_id: "a9".into(),
            module_id: "m3".into(),
            ..Default::default()
        };
        let payloads = [
            None,
            Some(event::Payload::VideoPlayed(VideoPlayed {
                watch_ms: Some(-5),
            })),
            Some(event::Payload::UserAction(UserAction {
                action: "like".into(),
                target_id: "t7".into(),
            })),
            Some(event::Payload::GiftSent(GiftSent {
                gift_type: "rocket".into(),
                amount: 100,
                ip: "10.0.0.1".into(),
            })),
            Some(event::Payload::ViewerArrived(ViewerArrived {
                viewer: Some(Viewer {
                    grade: -1,
                    ..Default::default()
                }),
            })),
            Some(event::Payload::LiveRoomStarted(LiveRoomStarted {
                room: Some(room.clone()),
            })),
            Some(event::Payload::LiveRoomEnded(LiveRoomEnded { room: None })),
        ];
        payloads
            .into_iter()
            .map(|payload| Event {
                payload,
                ..base.clone()
            })
            .chain([Event::default()])
            .collect()
    }

    #[test]
    fn the_view_reads_the_ids_a_full_decode_reads() {
        for e in events() {
            let bytes = e.encode_to_vec();
            let view = EventView::parse(&bytes).unwrap();
            assert_eq!(ids(&view), ids(&e), "{e:?}");
            assert_eq!(ids(&view), ids(&Event::decode(bytes.as_slice()).unwrap()));
        }
    }

    #[test]
    fn repeated_fields_follow_protobuf_merge_rules() {
        let a = Event {
            user_id: "u1".into(),
            payload: Some(event::Payload::LiveRoomStarted(LiveRoomStarted {
                room: Some(Room {
                    anchor_id: "a1".into(),
                    module_id: "m1".into(),
                    ..Default::default()
                }),
            })),
            ..Default::default()
        };
        let b = Event {
            user_id: "u2".into(),
            payload: Some(event::Payload::LiveRoomStarted(LiveRoomStarted {
                room: Some(Room {
                    anchor_id: "a2".into(),
                    ..Default::default()
                }),
            })),
            ..Default::default()
        };
        let mut bytes = a.encode_to_vec();
        bytes.extend(b.encode_to_vec());
        let full = Event::decode(bytes.as_slice()).unwrap();
        assert_eq!(ids(&EventView::parse(&bytes).unwrap()), ids(&full));
        assert_eq!(full.room_anchor_module(), Some(("a2", "m1")));

        let c = Event {
            payload: Some(event::Payload::GiftSent(GiftSent::default())),
            ..Default::default()
        };
        bytes.extend(c.encode_to_vec());
        let full = Event::decode(bytes.as_slice()).unwrap();
        assert_eq!(ids(&EventView::parse(&bytes).unwrap()), ids(&full));
        assert_eq!(
            full.room_anchor_module(),
            None,
            "another kind replaces the room"
        );
    }

    #[test]
    fn what_a_full_decode_rejects_in_the_envelope_the_view_rejects() {
        let bytes = events()[5].encode_to_vec();
        for cut in 1..bytes.len() {
            let truncated = &bytes[..cut];
            if Event::decode(truncated).is_err() {
                assert!(EventView::parse(truncated).is_err(), "cut at {cut}");
            }
        }
        assert!(EventView::parse(b"not a vidpulse event").is_err());
        // user_id (field 6) that is not UTF-8.
        let bad = [0x32, 0x02, 0xff, 0xfe];
        assert!(Event::decode(&bad[..]).is_err());
        assert_eq!(EventView::parse(&bad), Err(ViewError::Utf8(6)));
        // a group (wire type 3), which proto3 events never carry.
        assert!(matches!(
            EventView::parse(&[0x0b]),
            Err(ViewError::WireType { field: 1, wire: 3 })
        ));
    }
}
