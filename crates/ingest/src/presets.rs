//! The built-in mappings, one per raw format in the seeds. They are ordinary
//! mapping files (in `presets/`), compiled at start like a user's.

use chrono_tz::Tz;

use crate::mapping::{Mapping, MappingError};

/// `(name, TOML)` of every preset; the name is also its default raw topic.
pub const PRESETS: [(&str, &str); 9] = [
    ("video_events", include_str!("../presets/video_events.toml")),
    (
        "video_messages",
        include_str!("../presets/video_messages.toml"),
    ),
    ("play_request", include_str!("../presets/play_request.toml")),
    (
        "live_streaming_log",
        include_str!("../presets/live_streaming_log.toml"),
    ),
    (
        "live_gift_total",
        include_str!("../presets/live_gift_total.toml"),
    ),
    (
        "live_room_events",
        include_str!("../presets/live_room_events.toml"),
    ),
    (
        "video_production_log",
        include_str!("../presets/video_production_log.toml"),
    ),
    (
        "video_consumption_log",
        include_str!("../presets/video_consumption_log.toml"),
    ),
    ("user_actions", include_str!("../presets/user_actions.toml")),
];

/// Compiles preset `name`.
pub fn preset(name: &str, zone: Tz) -> Option<Result<Mapping, MappingError>> {
    PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, toml)| Mapping::from_toml(toml, zone))
}

pub fn names() -> impl Iterator<Item = &'static str> {
    PRESETS.iter().map(|(n, _)| *n)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_compiles_and_reads_its_own_topic() {
        for (name, _) in PRESETS {
            let m = preset(name, chrono_tz::Asia::Shanghai).unwrap().unwrap();
            assert_eq!(m.topic, name);
            assert_eq!(m.name, name);
        }
        let raw: Vec<&str> = names().collect();
        assert_eq!(
            raw,
            vidpulse_core::topics::RAW.to_vec(),
            "presets cover exactly the raw topics"
        );
    }
}
