//! User mapping files: the TOML language (paths, constants, time formats and
//! zones, id types) and clear errors for bad files.

#![allow(clippy::unwrap_used)]

use vidpulse_ingest::mapping::{Mapping, SourceRef};
use vidpulse_ingest::normalize::normalize;
use vidpulse_ingest::reject::Reason;
use vidpulse_proto::{Kind, event::Payload};

const SRC: SourceRef<'static> = SourceRef {
    topic: "mine",
    partition: 0,
    offset: 5,
};

fn compile(toml: &str) -> Mapping {
    Mapping::from_toml(toml, chrono_tz::Asia::Shanghai).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn nested_paths_constants_patterns_and_id_types() {
    let m = compile(
        r#"
name = "mine"
topic = "my_topic"
event_id = "meta.id"
time_zone = "Europe/Berlin"

[[rules]]
kind = "gift_sent"
time = { path = "meta.when", format = "%d.%m.%Y %H:%M:%S" }
[rules.fields]
user_id = { path = "who.0.id", id_type = "number" }
room_id = "room"
gift_type = { const = "rose" }
amount = { path = "n", scale = 10 }
"#,
    );
    assert_eq!(m.topic, "my_topic");
    let rec = br#"{"meta":{"id":"x-1","when":"16.08.2021 10:00:00"},"who":[{"id":42}],"room":"r","n":2.5}"#;
    let e = normalize(&m, Some(rec), SRC, 1 << 20, 0).unwrap();
    assert_eq!(e.event_id, "x-1");
    assert_eq!(e.user_id, "42");
    // 10:00 CEST = 08:00 UTC
    assert_eq!(e.event_time_ms, 1_629_100_800_000);
    match e.payload {
        Some(Payload::GiftSent(g)) => assert_eq!((g.gift_type.as_str(), g.amount), ("rose", 25)),
        other => panic!("{other:?}"),
    }
    // id_type = number rejects a string id
    let rec = br#"{"meta":{"when":"16.08.2021 10:00:00"},"who":[{"id":"42"}],"room":"r","n":1}"#;
    let r = normalize(&m, Some(rec), SRC, 1 << 20, 0).unwrap_err();
    assert_eq!(r.reason, Reason::WrongType);
    // no event id in the record: derived from the source
    let rec = br#"{"meta":{"when":"16.08.2021 10:00:00"},"who":[{"id":7}],"room":"r","n":1}"#;
    assert_eq!(
        normalize(&m, Some(rec), SRC, 1 << 20, 0).unwrap().event_id,
        "mine/0/5"
    );
}

#[test]
fn rules_pick_the_kind_in_order() {
    let m = compile(
        r#"
name = "acts"
time = { path = "ts", format = "epoch_ms" }
[fields]
video_id = "v"
[[rules]]
kind = "video_played"
when = { field = "k", one_of = [1, "play"] }
[[rules]]
kind = "user_action"
when = { field = "k", present = true }
fields = { action = "k" }
"#,
    );
    let kind = |rec: &str| normalize(&m, Some(rec.as_bytes()), SRC, 1 << 20, 0).map(|e| e.kind());
    assert_eq!(
        kind(r#"{"v":"a","k":"1","ts":1629075600000}"#),
        Ok(Some(Kind::VideoPlayed))
    );
    assert_eq!(
        kind(r#"{"v":"a","k":"play","ts":1629075600000}"#),
        Ok(Some(Kind::VideoPlayed))
    );
    assert_eq!(
        kind(r#"{"v":"a","k":"like","ts":1629075600000}"#),
        Ok(Some(Kind::UserAction))
    );
    let reason = |rec: &str| kind(rec).unwrap_err().reason;
    assert_eq!(
        reason(r#"{"v":"a","ts":1629075600000}"#),
        Reason::MissingField
    );
    assert_eq!(
        reason(r#"{"v":"a","k":[1],"ts":1629075600000}"#),
        Reason::WrongType
    );
}

#[test]
fn bad_files_fail_naming_the_field_and_the_fix() {
    let cases = [
        (
            "name = \"x\"\ntime = \"t\"\n[[rules]]\nkind = \"video_exploded\"\n",
            "unknown kind",
        ),
        (
            "name = \"x\"\ntime = \"t\"\n[[rules]]\nkind = \"video_played\"\nfields = { vidoe_id = \"v\" }\n",
            "unknown field \"vidoe_id\"",
        ),
        (
            "name = \"x\"\ntime_zone = \"Mars/Base\"\ntime = \"t\"\n[[rules]]\nkind = \"video_played\"\n",
            "unknown time zone",
        ),
        (
            "name = \"x\"\n[[rules]]\nkind = \"video_played\"\n",
            "no time field",
        ),
        (
            "name = \"x\"\ntime = { path = \"t\", format = \"weird\" }\n[[rules]]\nkind = \"video_played\"\n",
            "unknown time format",
        ),
        (
            "name = \"x\"\ntime = \"t\"\n[[rules]]\nkind = \"video_played\"\nfields = { amount = \"a\" }\n",
            "video_played events have no amount",
        ),
        ("name = \"x\"\ntime = \"t\"\nrules = []\n", "at least one"),
        (
            "name = \"x\"\ntime = \"t\"\ncolour = 1\n[[rules]]\nkind = \"video_played\"\n",
            "colour",
        ),
    ];
    for (toml, want) in cases {
        let err = Mapping::from_toml(toml, chrono_tz::UTC)
            .expect_err(toml)
            .to_string();
        assert!(err.contains(want), "error {err:?} should mention {want:?}");
    }
}
