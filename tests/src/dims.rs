//! Dimensions the events must leave in Redis (the dim-builder's room and
//! viewer hashes), computed from the events themselves; shared by the
//! dim-builder tests on one server and on a Redis Cluster.

use std::collections::{BTreeMap, HashMap};

use redis::Commands;
use serde_json::Value;

use crate::{Env, read_json, scratch};

const DAY_MS: i64 = 86_400_000;

/// Checks every room and viewer hash in Redis against what the events say
/// (bookkeeping fields aside), and the rooms' TTLs: live rooms about 30
/// days, ended ones at most 2. Both live and ended rooms must be
/// among them.
pub fn check_hashes(con: &mut impl redis::ConnectionLike, rooms: &Hashes, viewers: &Hashes) {
    let (mut live, mut ended) = (0, 0);
    for (key, want) in rooms {
        let mut got: BTreeMap<String, String> = con.hgetall(key).unwrap();
        assert!(got.remove("_event_id").is_some(), "{key}");
        assert_eq!(&got, want, "{key}");
        let t: i64 = con.pttl(key).unwrap();
        if want["status"] == "live" {
            live += 1;
            assert!(t > 29 * DAY_MS, "{key} live, TTL {t}");
        } else {
            ended += 1;
            assert!(t > 0 && t <= 2 * DAY_MS, "{key} ended, TTL {t}");
        }
    }
    assert!(live > 0 && ended > 0, "{live} live, {ended} ended rooms");
    for (key, want) in viewers {
        let mut got: BTreeMap<String, String> = con.hgetall(key).unwrap();
        got.remove("_v");
        got.remove("_event_id");
        assert_eq!(&got, want, "{key}");
    }
}

/// Runs gen for live rooms and viewers (30 rooms, 200 users, 5 % duplicate
/// and 5 % late records); returns how many events ingest will write for it.
pub fn gen_rooms(env: &Env, seed: &str, start: &str, count: &str) -> i64 {
    let truth = scratch(&env.prefix).join(format!("truth{seed}.json"));
    let out = env.run(
        "vidpulse-gen",
        &[
            "--formats",
            "live_room_events,live_streaming_log",
            "--rooms",
            "30",
            "--users",
            "200",
            "--count",
            count,
            "--seed",
            seed,
            "--start",
            start,
            "--dup-fraction",
            "0.05",
            "--late-fraction",
            "0.05",
            "--truth",
            truth.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "gen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    read_json(&truth)["expected"]["events"].as_i64().unwrap()
}

/// Expected hashes by key.
pub type Hashes = HashMap<String, BTreeMap<String, String>>;

/// The room and viewer hashes the events must produce, computed here from
/// the events themselves: per room the newest start's profile, the newest
/// start and end times; per viewer and field, the newest value.
pub fn expected_hashes(events: &[Value], rp: &str, vp: &str) -> (Hashes, Hashes) {
    let mut starts: HashMap<String, (i64, BTreeMap<String, String>)> = HashMap::new();
    let mut ends: HashMap<String, i64> = HashMap::new();
    let mut viewers: HashMap<String, BTreeMap<String, (i64, String)>> = HashMap::new();
    for rec in events {
        let v = &rec["value"];
        let t = v["event_time_ms"].as_i64().unwrap();
        let room = v["room_id"].as_str().unwrap_or("").to_owned();
        let payload = &v["payload"];
        if let Some(p) = payload.get("live_room_started") {
            let profile: BTreeMap<String, String> = p["room"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, x)| {
                            x.as_str()
                                .filter(|s| !s.is_empty())
                                .map(|s| (k.clone(), s.to_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let e = starts.entry(room).or_insert((i64::MIN, BTreeMap::new()));
            if t > e.0 {
                *e = (t, profile);
            }
        } else if payload.get("live_room_ended").is_some() {
            let e = ends.entry(room).or_insert(i64::MIN);
            *e = (*e).max(t);
        } else if let Some(p) = payload
            .get("viewer_arrived")
            .or_else(|| payload.get("viewer_left"))
        {
            let user = v["user_id"].as_str().unwrap().to_owned();
            let vw = &p["viewer"];
            let mut fields = Vec::new();
            for f in ["province", "region"] {
                if let Some(s) = vw[f].as_str().filter(|s| !s.is_empty()) {
                    fields.push((f, s.to_owned()));
                }
            }
            if let Some(g) = vw["grade"].as_i64().filter(|g| *g != 0) {
                fields.push(("grade", g.to_string()));
            }
            let e = viewers.entry(user).or_default();
            for (f, s) in fields {
                let slot = e.entry(f.to_owned()).or_insert((i64::MIN, String::new()));
                if t > slot.0 {
                    *slot = (t, s);
                }
            }
        }
    }
    let mut rooms = HashMap::new();
    for (room, (st, profile)) in &starts {
        let mut h = profile.clone();
        h.insert("started_at".into(), st.to_string());
        let end = ends.get(room).copied();
        if let Some(e) = end {
            h.insert("ended_at".into(), e.to_string());
        }
        if h.contains_key("module_id") {
            h.insert("_v.module_id".into(), st.to_string());
        }
        let live = end.is_none_or(|e| *st > e);
        h.insert("status".into(), if live { "live" } else { "ended" }.into());
        h.insert("_v".into(), end.map_or(*st, |e| e.max(*st)).to_string());
        rooms.insert(format!("{rp}{room}"), h);
    }
    for room in ends.keys() {
        assert!(starts.contains_key(room), "gen ends only rooms it started");
    }
    let viewers = viewers
        .into_iter()
        .map(|(u, fields)| {
            let mut h = BTreeMap::new();
            for (f, (t, s)) in fields {
                h.insert(f.clone(), s);
                h.insert(format!("_v.{f}"), t.to_string());
            }
            (format!("{vp}{u}"), h)
        })
        .collect();
    (rooms, viewers)
}
