//! The rules of the dimension hashes, in plain Rust: what one live event or
//! one loaded row does to a key (its fields and TTL), given what is there.
//!
//! This is the specification of the Lua scripts in `src/lua/` (which apply
//! the same rules atomically inside Redis); it is not on the data path. Unit
//! tests below check the rules, including that the final state does not
//! depend on the order or repetition of events; the end-to-end tests check
//! that the scripts and this model agree on real Redis.
//!
//! Delivery guarantee it encodes: every operation is idempotent and every
//! field is last-writer-wins by event time, so at-least-once delivery,
//! replays and out-of-order events all converge to the same hash.

use std::collections::BTreeMap;

use crate::plan::{Lifecycle, Op};

/// A Redis key as the scripts see it: its hash fields and its TTL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyState {
    pub fields: BTreeMap<String, String>,
    pub ttl: Ttl,
}

/// A key's TTL, as `PTTL` reports it (the model does not let time pass).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ttl {
    /// No such key (`PTTL` = -2).
    #[default]
    Absent,
    /// The key has no TTL (`PTTL` = -1).
    Persistent,
    /// Milliseconds left.
    Ms(i64),
}

impl Ttl {
    /// `PTTL`'s number: -2, -1 or the milliseconds left.
    pub fn pttl(self) -> i64 {
        match self {
            Ttl::Absent => -2,
            Ttl::Persistent => -1,
            Ttl::Ms(ms) => ms,
        }
    }
}

/// TTLs of the stage, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ttls {
    /// A room whose newest lifecycle event is a start (the seed's 30 days).
    pub live_ms: i64,
    /// A room whose newest lifecycle event is an end (the seed's 2 days).
    pub ended_ms: i64,
    /// A profile hash created by live events (0: none).
    pub profile_ms: i64,
}

/// What a loaded row does: see [`apply_load`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadRow {
    /// The load's version: its as-of time, ms.
    pub as_of_ms: i64,
    /// TTL in ms (0: leave TTLs alone).
    pub ttl_ms: i64,
    /// Room hashes: their lifecycle owns the TTL.
    pub room: bool,
    /// Fields that live events also write (versioned per field).
    pub shared: &'static [&'static str],
    pub fields: Vec<(String, String)>,
}

/// Prefix of a per-field version: `_v.<field>` holds the time (ms) of the
/// value of `<field>`, for fields both live events and loads write.
pub const FIELD_VERSION_PREFIX: &str = "_v.";

/// A numeric field (times in ms; a load's field version is a half ms
/// below its as-of). Exact in f64 for any realistic time.
fn num(state: &KeyState, field: &str) -> Option<f64> {
    state.fields.get(field).and_then(|v| v.parse().ok())
}

/// The version a load at `as_of_ms` gives a shared field, as text: half a
/// millisecond earlier, so a live event at exactly `as_of_ms` wins the tie
/// and a later row of the same as-of replaces an earlier one.
pub fn load_field_version(as_of_ms: i64) -> String {
    format!("{:.1}", as_of_ms as f64 - 0.5)
}

/// Applies a live operation (what `room.lua` / `profile.lua` do). Returns
/// whether anything changed.
pub fn apply(state: &mut KeyState, op: &Op, ttls: &Ttls) -> bool {
    match op {
        Op::Room {
            lifecycle,
            time_ms,
            event_id,
            profile,
            ..
        } => apply_room(state, *lifecycle, *time_ms, event_id, profile, ttls),
        Op::Profile {
            time_ms,
            event_id,
            fields,
            ..
        } => apply_profile(state, *time_ms, event_id, fields, ttls.profile_ms) > 0,
    }
}

/// A room lifecycle event.
///
/// - `started_at` / `ended_at` hold the newest start / end seen; the room
///   is live while `started_at > ended_at`. A start older than the recorded
///   end never revives the room; a newer one is a new stream.
/// - Profile fields come from the newest start; an end fills only fields
///   nobody set (an end that arrives before its start). `module_id` also
///   comes from T+1 loads, so it carries its own version.
/// - TTL: a start that leaves the room live sets the live TTL unless a
///   longer one is left; an end that is the newest lifecycle change cuts it
///   to the ended TTL; anything else leaves it alone.
pub fn apply_room(
    state: &mut KeyState,
    lifecycle: Lifecycle,
    time_ms: i64,
    event_id: &str,
    profile: &[(&'static str, String)],
    ttls: &Ttls,
) -> bool {
    let is_start = lifecycle == Lifecycle::Started;
    let ts = time_ms.to_string();
    let t = time_ms as f64;
    let mut sa = num(state, "started_at");
    let mut ea = num(state, "ended_at");
    let v = num(state, "_v");
    let mv = num(state, "_v.module_id");
    let mut set: Vec<(String, String)> = Vec::new();
    let mut changed_lifecycle = false;
    if is_start {
        if sa.is_none_or(|sa| t > sa) {
            sa = Some(t);
            changed_lifecycle = true;
            set.push(("started_at".into(), ts.clone()));
            for (f, val) in profile {
                if *f == "module_id" {
                    if mv.is_none_or(|mv| t > mv) {
                        set.push(((*f).into(), val.clone()));
                        set.push(("_v.module_id".into(), ts.clone()));
                    }
                } else {
                    set.push(((*f).into(), val.clone()));
                }
            }
        }
    } else {
        if ea.is_none_or(|ea| t > ea) {
            ea = Some(t);
            changed_lifecycle = true;
            set.push(("ended_at".into(), ts.clone()));
        }
        for (f, val) in profile {
            if !state.fields.contains_key(*f) {
                set.push(((*f).into(), val.clone()));
            }
        }
    }
    if set.is_empty() {
        return false;
    }
    let live = match (sa, ea) {
        (Some(sa), Some(ea)) => sa > ea,
        (Some(_), None) => true,
        _ => false,
    };
    let pttl = state.ttl.pttl();
    if changed_lifecycle {
        set.push(("status".into(), if live { "live" } else { "ended" }.into()));
    }
    if v.is_none_or(|v| t > v) {
        set.push(("_v".into(), ts));
        set.push(("_event_id".into(), event_id.into()));
    }
    for (f, val) in set {
        state.fields.insert(f, val);
    }
    if state.ttl == Ttl::Absent {
        state.ttl = Ttl::Persistent;
    }
    if changed_lifecycle {
        if live {
            if is_start && pttl < ttls.live_ms {
                state.ttl = Ttl::Ms(ttls.live_ms);
            }
        } else if !is_start || pttl < 0 {
            state.ttl = Ttl::Ms(ttls.ended_ms);
        }
    }
    true
}

/// Profile fields carried by a live event (a viewer's province, grade,
/// region): per field, the newest event time wins (`_v.<field>`); a loaded
/// value carries its load's as-of time there, so it is only replaced by a
/// newer event. TTL: `ttl_ms` on a key this creates, extending a shorter
/// one; a key without TTL (a loaded profile) keeps none. Returns the number
/// of fields written.
pub fn apply_profile(
    state: &mut KeyState,
    time_ms: i64,
    event_id: &str,
    fields: &[(&'static str, String)],
    ttl_ms: i64,
) -> usize {
    let ts = time_ms.to_string();
    let t = time_ms as f64;
    let mut set: Vec<(String, String)> = Vec::new();
    let mut n = 0;
    for (f, val) in fields {
        let vf = format!("{FIELD_VERSION_PREFIX}{f}");
        if num(state, &vf).is_none_or(|fv| t > fv) {
            set.push(((*f).into(), val.clone()));
            set.push((vf, ts.clone()));
            n += 1;
        }
    }
    if n == 0 {
        return 0;
    }
    if num(state, "_v").is_none_or(|v| t > v) {
        set.push(("_v".into(), ts));
        set.push(("_event_id".into(), event_id.into()));
    }
    let pttl = state.ttl.pttl();
    for (f, val) in set {
        state.fields.insert(f, val);
    }
    if state.ttl == Ttl::Absent {
        state.ttl = Ttl::Persistent;
    }
    if ttl_ms > 0 && (pttl == -2 || (pttl >= 0 && pttl < ttl_ms)) {
        state.ttl = Ttl::Ms(ttl_ms);
    }
    n
}

/// A T+1 row (what `load.lua` does per key). Returns (whether anything was
/// written, fields kept because newer data was there).
///
/// - A row older than the newest load applied to the key (`_ld`) changes
///   nothing.
/// - A shared field (also written by live events) is written only if the
///   row is newer than the field's version; the row's version is half a
///   millisecond below its as-of ([`load_field_version`]): a tie goes to
///   live data, and a later row of the same as-of wins.
/// - Other fields are written (a later row of the same as-of wins).
/// - TTL (when given): set on keys without one or with a shorter one; room
///   hashes that have a lifecycle keep theirs.
pub fn apply_load(state: &mut KeyState, row: &LoadRow) -> (bool, usize) {
    let ts = row.as_of_ms.to_string();
    let as_of = row.as_of_ms as f64;
    let fvs = load_field_version(row.as_of_ms);
    let fver = as_of - 0.5;
    let ld = num(state, "_ld");
    let mut set: Vec<(String, String)> = Vec::new();
    let mut kept = 0;
    if ld.is_none_or(|ld| as_of >= ld) {
        for (f, val) in &row.fields {
            if row.shared.contains(&f.as_str()) {
                let vf = format!("{FIELD_VERSION_PREFIX}{f}");
                if num(state, &vf).is_none_or(|fv| fver >= fv) {
                    set.push((f.clone(), val.clone()));
                    set.push((vf, fvs.clone()));
                } else {
                    kept += 1;
                }
            } else {
                set.push((f.clone(), val.clone()));
            }
        }
    } else {
        kept += row.fields.len();
    }
    if set.is_empty() {
        return (false, kept);
    }
    if ld.is_none_or(|ld| as_of > ld) {
        set.push(("_ld".into(), ts));
    }
    let has_lifecycle =
        state.fields.contains_key("started_at") || state.fields.contains_key("ended_at");
    let pttl = state.ttl.pttl();
    for (f, val) in set {
        state.fields.insert(f, val);
    }
    if state.ttl == Ttl::Absent {
        state.ttl = Ttl::Persistent;
    }
    if row.ttl_ms > 0 && pttl < row.ttl_ms && !(row.room && has_lifecycle) {
        state.ttl = Ttl::Ms(row.ttl_ms);
    }
    (true, kept)
}

/// Whether a room hash says the room is live.
pub fn is_live(state: &KeyState) -> bool {
    state.fields.get("status").map(String::as_str) == Some("live")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TTLS: Ttls = Ttls {
        live_ms: 30 * 86_400_000,
        ended_ms: 2 * 86_400_000,
        profile_ms: 30 * 86_400_000,
    };

    fn room(lc: Lifecycle, t: i64, title: &str, module: &str) -> Op {
        let mut profile = vec![("type", "game".to_owned()), ("title", title.to_owned())];
        if !module.is_empty() {
            profile.push(("module_id", module.to_owned()));
        }
        Op::Room {
            key: "room:1".into(),
            lifecycle: lc,
            time_ms: t,
            event_id: format!("e{t}{lc:?}"),
            profile,
        }
    }
    fn start(t: i64, title: &str) -> Op {
        room(Lifecycle::Started, t, title, "")
    }
    fn end(t: i64) -> Op {
        room(Lifecycle::Ended, t, "from-end", "")
    }
    fn run(ops: &[&Op]) -> KeyState {
        let mut s = KeyState::default();
        for op in ops {
            apply(&mut s, op, &TTLS);
        }
        s
    }
    fn f<'a>(s: &'a KeyState, k: &str) -> Option<&'a str> {
        s.fields.get(k).map(String::as_str)
    }

    #[test]
    fn start_writes_profile_and_live_ttl() {
        let s = run(&[&start(1000, "A")]);
        assert_eq!(f(&s, "title"), Some("A"));
        assert_eq!(f(&s, "type"), Some("game"));
        assert_eq!(f(&s, "started_at"), Some("1000"));
        assert_eq!(f(&s, "status"), Some("live"));
        assert_eq!(f(&s, "_v"), Some("1000"));
        assert_eq!(f(&s, "_event_id"), Some("e1000Started"));
        assert_eq!(s.ttl, Ttl::Ms(TTLS.live_ms));
    }

    #[test]
    fn end_cuts_ttl_and_keeps_profile() {
        let s = run(&[&start(1000, "A"), &end(2000)]);
        assert_eq!(f(&s, "status"), Some("ended"));
        assert_eq!(f(&s, "ended_at"), Some("2000"));
        assert_eq!(
            f(&s, "title"),
            Some("A"),
            "an end does not replace a start's profile"
        );
        assert_eq!(s.ttl, Ttl::Ms(TTLS.ended_ms));
    }

    #[test]
    fn replayed_start_after_end_does_not_revive() {
        let mut s = run(&[&start(1000, "A"), &end(2000)]);
        let before = s.clone();
        assert!(!apply(&mut s, &start(1000, "A"), &TTLS));
        assert_eq!(s, before);
    }

    #[test]
    fn end_before_start_out_of_order_stays_ended() {
        let s = run(&[&end(2000), &start(1000, "A")]);
        assert_eq!(f(&s, "status"), Some("ended"));
        assert_eq!(
            f(&s, "title"),
            Some("A"),
            "the start's profile replaces the end's fill-in"
        );
        assert_eq!(f(&s, "started_at"), Some("1000"));
        assert_eq!(s.ttl, Ttl::Ms(TTLS.ended_ms));
        assert_eq!(s, run(&[&start(1000, "A"), &end(2000)]));
    }

    #[test]
    fn newer_start_is_a_new_stream() {
        let s = run(&[&start(1000, "A"), &end(2000), &start(3000, "B")]);
        assert_eq!(f(&s, "status"), Some("live"));
        assert_eq!(f(&s, "title"), Some("B"));
        assert_eq!(s.ttl, Ttl::Ms(TTLS.live_ms));
    }

    #[test]
    fn start_at_the_same_time_as_the_end_does_not_revive() {
        let s = run(&[&end(2000), &start(2000, "A")]);
        assert_eq!(f(&s, "status"), Some("ended"));
    }

    #[test]
    fn starts_out_of_order_newer_fields_win() {
        let s = run(&[&start(2000, "new"), &start(1000, "old")]);
        assert_eq!(f(&s, "title"), Some("new"));
        assert_eq!(f(&s, "started_at"), Some("2000"));
        assert_eq!(s, run(&[&start(1000, "old"), &start(2000, "new")]));
    }

    #[test]
    fn old_end_on_live_room_keeps_ttl() {
        let mut s = run(&[&start(3000, "A")]);
        s.ttl = Ttl::Ms(TTLS.live_ms + 5);
        assert!(apply(&mut s, &end(2000), &TTLS));
        assert_eq!(f(&s, "status"), Some("live"));
        assert_eq!(s.ttl, Ttl::Ms(TTLS.live_ms + 5));
    }

    #[test]
    fn restart_never_shortens_a_longer_live_ttl() {
        let mut s = run(&[&start(1000, "A")]);
        s.ttl = Ttl::Ms(TTLS.live_ms * 2);
        apply(&mut s, &start(2000, "B"), &TTLS);
        assert_eq!(s.ttl, Ttl::Ms(TTLS.live_ms * 2));
        // A shorter one (time has passed) is reset to the live TTL.
        s.ttl = Ttl::Ms(1000);
        apply(&mut s, &start(3000, "C"), &TTLS);
        assert_eq!(s.ttl, Ttl::Ms(TTLS.live_ms));
    }

    #[test]
    fn room_final_state_is_order_independent() {
        let ops = [
            start(1000, "A"),
            end(1500),
            start(2000, "B"),
            room(Lifecycle::Started, 2500, "C", "m7"),
            end(3000),
            start(2200, "late"),
        ];
        let reference = {
            let refs: Vec<&Op> = ops.iter().collect();
            run(&refs)
        };
        // Every permutation of the six (and each event twice) gives the same
        // fields; only the TTL may differ (an out-of-order history may leave
        // a TTL the ordered one would have replaced).
        let mut idx: Vec<usize> = (0..ops.len()).collect();
        let mut count = 0;
        permute(&mut idx, 0, &mut |order| {
            let refs: Vec<&Op> = order.iter().chain(order.iter()).map(|&i| &ops[i]).collect();
            let s = run(&refs);
            assert_eq!(s.fields, reference.fields, "order {order:?}");
            assert_eq!(s.ttl, Ttl::Ms(TTLS.ended_ms), "order {order:?}");
            count += 1;
        });
        assert_eq!(count, 720);
        assert_eq!(f(&reference, "title"), Some("C"));
        assert_eq!(f(&reference, "module_id"), Some("m7"));
        assert_eq!(f(&reference, "status"), Some("ended"));
    }

    fn permute(v: &mut Vec<usize>, k: usize, visit: &mut dyn FnMut(&[usize])) {
        if k == v.len() {
            visit(v);
            return;
        }
        for i in k..v.len() {
            v.swap(k, i);
            permute(v, k + 1, visit);
            v.swap(k, i);
        }
    }

    fn viewer(t: i64, province: &str, grade: &str) -> Op {
        Op::Profile {
            key: "viewer:1".into(),
            time_ms: t,
            event_id: format!("v{t}"),
            fields: vec![("province", province.into()), ("grade", grade.into())],
        }
    }

    #[test]
    fn profile_fields_newest_wins_per_field() {
        let s = run(&[&viewer(2000, "浙江", "3"), &viewer(1000, "江苏", "1")]);
        assert_eq!(f(&s, "province"), Some("浙江"));
        assert_eq!(f(&s, "_v.province"), Some("2000"));
        assert_eq!(
            s,
            run(&[&viewer(1000, "江苏", "1"), &viewer(2000, "浙江", "3")])
        );
        assert_eq!(s.ttl, Ttl::Ms(TTLS.profile_ms));
    }

    fn load(as_of: i64, fields: &[(&str, &str)]) -> LoadRow {
        LoadRow {
            as_of_ms: as_of,
            ttl_ms: 0,
            room: false,
            shared: &["province", "grade", "region"],
            fields: fields
                .iter()
                .map(|(a, b)| ((*a).into(), (*b).into()))
                .collect(),
        }
    }

    #[test]
    fn load_never_overwrites_newer_live_fields() {
        let mut s = run(&[&viewer(5000, "浙江", "3")]);
        let (wrote, kept) = apply_load(
            &mut s,
            &load(4000, &[("province", "江苏"), ("gender", "f")]),
        );
        assert!(wrote);
        assert_eq!(kept, 1);
        assert_eq!(f(&s, "province"), Some("浙江"), "live data is newer");
        assert_eq!(f(&s, "gender"), Some("f"), "loader-only field written");
        // A newer load wins over the older live value.
        apply_load(&mut s, &load(6000, &[("province", "江苏")]));
        assert_eq!(f(&s, "province"), Some("江苏"));
        // ...and a live event older than that load no longer replaces it.
        apply(&mut s, &viewer(5500, "上海", "3"), &TTLS);
        assert_eq!(f(&s, "province"), Some("江苏"));
    }

    #[test]
    fn older_load_changes_nothing_same_as_of_rows_last_wins() {
        let mut s = KeyState::default();
        apply_load(&mut s, &load(2000, &[("gender", "f"), ("province", "A")]));
        let (wrote, kept) = apply_load(&mut s, &load(1000, &[("gender", "m")]));
        assert!(!wrote);
        assert_eq!(kept, 1);
        assert_eq!(f(&s, "gender"), Some("f"));
        apply_load(&mut s, &load(2000, &[("gender", "x"), ("province", "B")]));
        assert_eq!(f(&s, "gender"), Some("x"));
        assert_eq!(f(&s, "province"), Some("B"));
        assert_eq!(s.ttl, Ttl::Persistent);
    }

    #[test]
    fn live_wins_a_tie_with_a_load() {
        let mut a = run(&[&viewer(3000, "live", "1")]);
        apply_load(&mut a, &load(3000, &[("province", "loaded")]));
        let mut b = KeyState::default();
        apply_load(&mut b, &load(3000, &[("province", "loaded")]));
        apply(&mut b, &viewer(3000, "live", "1"), &TTLS);
        // Live wins the tie both ways round.
        for s in [&a, &b] {
            assert_eq!(f(s, "province"), Some("live"));
            assert_eq!(f(s, "_v.province"), Some("3000"));
        }
        // Two loads of one as-of: the later row wins.
        apply_load(&mut b, &load(4000, &[("province", "x")]));
        assert_eq!(f(&b, "_v.province"), Some("3999.5"));
        apply_load(&mut b, &load(4000, &[("province", "y")]));
        assert_eq!(f(&b, "province"), Some("y"));
    }

    #[test]
    fn load_ttl_rules() {
        let mut row = load(1000, &[("gender", "f")]);
        row.ttl_ms = 3 * 86_400_000;
        let mut s = KeyState::default();
        apply_load(&mut s, &row);
        assert_eq!(s.ttl, Ttl::Ms(row.ttl_ms));
        // A longer TTL (a live profile's) is kept.
        s.ttl = Ttl::Ms(TTLS.profile_ms);
        row.as_of_ms = 2000;
        apply_load(&mut s, &row);
        assert_eq!(s.ttl, Ttl::Ms(TTLS.profile_ms));
        // A room with a lifecycle keeps its TTL.
        let mut r = run(&[&start(1000, "A"), &end(2000)]);
        let mut mrow = load(5000, &[("module_id", "m9")]);
        mrow.room = true;
        mrow.shared = &["module_id"];
        mrow.ttl_ms = 10 * 86_400_000;
        apply_load(&mut r, &mrow);
        assert_eq!(f(&r, "module_id"), Some("m9"));
        assert_eq!(r.ttl, Ttl::Ms(TTLS.ended_ms));
    }

    #[test]
    fn room_module_live_vs_load() {
        let mut s = run(&[&room(Lifecycle::Started, 5000, "A", "m-live")]);
        let mut mrow = load(4000, &[("module_id", "m-load")]);
        mrow.room = true;
        mrow.shared = &["module_id"];
        apply_load(&mut s, &mrow);
        assert_eq!(f(&s, "module_id"), Some("m-live"));
        mrow.as_of_ms = 6000;
        apply_load(&mut s, &mrow);
        assert_eq!(f(&s, "module_id"), Some("m-load"));
        // A re-announced start older than the load keeps the loaded module
        // but still updates the rest of the profile.
        apply(&mut s, &room(Lifecycle::Started, 5500, "B", "m-old"), &TTLS);
        assert_eq!(f(&s, "module_id"), Some("m-load"));
        assert_eq!(f(&s, "title"), Some("B"));
    }
}
