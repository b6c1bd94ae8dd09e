//! Which dimension write a canonical event makes, if any: pure, no Redis.
//!
//! Room lifecycle events (`live_room_started`, `live_room_ended`) update the
//! room hash; viewer events carrying profile fields (`viewer_arrived`,
//! `viewer_left`) update the viewer hash when viewer profiles are on; every
//! other event is skipped with a reason that is counted. Delivery is the
//! caller's business (see `sink.rs`).

use vidpulse_proto::{Event, Room, Viewer, event::Payload};

/// A room stream started or ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    Started,
    Ended,
}

/// One conditional write, applied by a Lua script (see `model.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `room.lua` on the room hash.
    Room {
        key: String,
        lifecycle: Lifecycle,
        time_ms: i64,
        event_id: String,
        /// Non-empty profile fields only ("when known").
        profile: Vec<(&'static str, String)>,
    },
    /// `profile.lua` on a profile hash (viewer).
    Profile {
        key: String,
        time_ms: i64,
        event_id: String,
        fields: Vec<(&'static str, String)>,
    },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Room { key, .. } | Op::Profile { key, .. } => key,
        }
    }

    /// Metric label: which kind of hash it writes.
    pub fn target(&self) -> &'static str {
        match self {
            Op::Room { .. } => "room",
            Op::Profile { .. } => "viewer",
        }
    }
}

/// Why an event makes no write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Not a room lifecycle event (nor a viewer event, when viewer profiles
    /// are on).
    OtherKind,
    /// A room event without a room id.
    NoRoomId,
    /// A viewer event without a user id.
    NoUserId,
    /// A viewer event without any profile field.
    NoProfile,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::OtherKind => "other_kind",
            Skip::NoRoomId => "no_room_id",
            Skip::NoUserId => "no_user_id",
            Skip::NoProfile => "no_profile_fields",
        }
    }
}

/// Profile fields of a room hash, in the order they are written.
pub const ROOM_FIELDS: [&str; 6] = [
    "type",
    "client",
    "title",
    "address",
    "anchor_id",
    "module_id",
];
/// Room fields that T+1 loads also write (the room → module map).
pub const ROOM_SHARED: &[&str] = &["module_id"];
/// Viewer fields live events write (and T+1 loads may too).
pub const VIEWER_SHARED: &[&str] = &["province", "region", "grade"];

/// Turns events into writes.
#[derive(Clone, Debug)]
pub struct Planner {
    /// Prefix of room hashes (`room:`).
    pub room_prefix: String,
    /// Prefix of viewer hashes (`viewer:`); `None` turns viewer profiles off.
    pub viewer_prefix: Option<String>,
}

impl Planner {
    pub fn plan(&self, ev: &Event) -> Result<Op, Skip> {
        match &ev.payload {
            Some(Payload::LiveRoomStarted(p)) => self.room(ev, Lifecycle::Started, p.room.as_ref()),
            Some(Payload::LiveRoomEnded(p)) => self.room(ev, Lifecycle::Ended, p.room.as_ref()),
            Some(Payload::ViewerArrived(p)) => self.viewer(ev, p.viewer.as_ref()),
            Some(Payload::ViewerLeft(p)) => self.viewer(ev, p.viewer.as_ref()),
            _ => Err(Skip::OtherKind),
        }
    }

    fn room(&self, ev: &Event, lifecycle: Lifecycle, room: Option<&Room>) -> Result<Op, Skip> {
        let id = ev.room_id.trim();
        if id.is_empty() {
            return Err(Skip::NoRoomId);
        }
        let mut profile = Vec::new();
        if let Some(r) = room {
            let values = [
                &r.r#type,
                &r.client,
                &r.title,
                &r.address,
                &r.anchor_id,
                &r.module_id,
            ];
            for (name, value) in ROOM_FIELDS.iter().zip(values) {
                if !value.is_empty() {
                    profile.push((*name, value.clone()));
                }
            }
        }
        Ok(Op::Room {
            key: format!("{}{id}", self.room_prefix),
            lifecycle,
            time_ms: ev.event_time_ms,
            event_id: ev.event_id.clone(),
            profile,
        })
    }

    fn viewer(&self, ev: &Event, viewer: Option<&Viewer>) -> Result<Op, Skip> {
        let Some(prefix) = &self.viewer_prefix else {
            return Err(Skip::OtherKind);
        };
        let id = ev.user_id.trim();
        if id.is_empty() {
            return Err(Skip::NoUserId);
        }
        let mut fields = Vec::new();
        if let Some(v) = viewer {
            if !v.province.is_empty() {
                fields.push(("province", v.province.clone()));
            }
            if !v.region.is_empty() {
                fields.push(("region", v.region.clone()));
            }
            if v.grade != 0 {
                fields.push(("grade", v.grade.to_string()));
            }
        }
        if fields.is_empty() {
            return Err(Skip::NoProfile);
        }
        Ok(Op::Profile {
            key: format!("{prefix}{id}"),
            time_ms: ev.event_time_ms,
            event_id: ev.event_id.clone(),
            fields,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vidpulse_proto::{LiveRoomEnded, LiveRoomStarted, PlayRequested, ViewerArrived};

    fn planner(viewers: bool) -> Planner {
        Planner {
            room_prefix: "room:".into(),
            viewer_prefix: viewers.then(|| "viewer:".into()),
        }
    }

    fn ev(payload: Payload) -> Event {
        Event {
            event_id: "id-1".into(),
            event_time_ms: 1_629_075_600_000,
            room_id: "20210813".into(),
            user_id: "3165".into(),
            payload: Some(payload),
            ..Default::default()
        }
    }

    #[test]
    fn room_start_carries_known_fields_only() {
        let room = Room {
            r#type: "game".into(),
            client: "android".into(),
            title: "t".into(),
            anchor_id: "a-77".into(),
            ..Default::default()
        };
        let op = planner(false)
            .plan(&ev(Payload::LiveRoomStarted(LiveRoomStarted {
                room: Some(room),
            })))
            .unwrap();
        assert_eq!(
            op,
            Op::Room {
                key: "room:20210813".into(),
                lifecycle: Lifecycle::Started,
                time_ms: 1_629_075_600_000,
                event_id: "id-1".into(),
                profile: vec![
                    ("type", "game".into()),
                    ("client", "android".into()),
                    ("title", "t".into()),
                    ("anchor_id", "a-77".into()),
                ],
            }
        );
        assert_eq!(op.target(), "room");
    }

    #[test]
    fn room_end_without_room_id_is_skipped() {
        let mut e = ev(Payload::LiveRoomEnded(LiveRoomEnded { room: None }));
        let op = planner(false).plan(&e).unwrap();
        assert!(
            matches!(op, Op::Room { lifecycle: Lifecycle::Ended, ref profile, .. } if profile.is_empty())
        );
        e.room_id = " ".into();
        assert_eq!(planner(false).plan(&e), Err(Skip::NoRoomId));
    }

    #[test]
    fn viewer_events_only_when_enabled() {
        let v = Viewer {
            province: "浙江".into(),
            region: "1122".into(),
            grade: 3,
            ip: "1.2.3.4".into(),
        };
        let e = ev(Payload::ViewerArrived(ViewerArrived { viewer: Some(v) }));
        assert_eq!(planner(false).plan(&e), Err(Skip::OtherKind));
        let op = planner(true).plan(&e).unwrap();
        assert_eq!(
            op,
            Op::Profile {
                key: "viewer:3165".into(),
                time_ms: 1_629_075_600_000,
                event_id: "id-1".into(),
                fields: vec![
                    ("province", "浙江".into()),
                    ("region", "1122".into()),
                    ("grade", "3".into())
                ],
            }
        );
        let empty = ev(Payload::ViewerArrived(ViewerArrived {
            viewer: Some(Viewer::default()),
        }));
        assert_eq!(planner(true).plan(&empty), Err(Skip::NoProfile));
    }

    #[test]
    fn other_kinds_are_skipped() {
        let e = ev(Payload::PlayRequested(PlayRequested {}));
        assert_eq!(planner(true).plan(&e), Err(Skip::OtherKind));
        assert_eq!(planner(true).plan(&Event::default()), Err(Skip::OtherKind));
    }
}
