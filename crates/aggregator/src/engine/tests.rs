//! State-machine tests on fake time: windows, watermark, idle advance,
//! grace and late handling, duplicates, checkpoints and replays.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};

use vidpulse_proto::event::Payload;
use vidpulse_proto::{Event, GiftSent, UserAction, VideoPlayed, Viewer, ViewerArrived, ViewerLeft};

use super::*;
use crate::spec::Spec;

const MIN: i64 = 60_000;
const T0: i64 = 1_629_075_600_000; // 2021-08-16T01:00:00Z

fn plan(spec: &str, grace_ms: i64, ooo_ms: i64) -> Plan {
    Plan::new(Spec::parse(spec).unwrap(), grace_ms, ooo_ms)
}

const PLAYS: &str = r#"
[[metric]]
name = "plays"
kinds = ["video_played"]
window = "1m"
group_by = ["video_id"]
aggregates = [
  { name = "plays", fn = "count" },
  { name = "viewers", fn = "distinct", field = "user_id" },
  { name = "watch_ms", fn = "sum", field = "watch_ms" },
  { name = "longest", fn = "max", field = "watch_ms" },
]
"#;

fn play(id: &str, t: i64, video: &str, user: &str, watch: Option<i64>) -> Event {
    Event {
        event_id: id.into(),
        event_time_ms: t,
        video_id: video.into(),
        user_id: user.into(),
        payload: Some(Payload::VideoPlayed(VideoPlayed { watch_ms: watch })),
        ..Default::default()
    }
}

fn gift(id: &str, t: i64, user: &str, amount: i64) -> Event {
    Event {
        event_id: id.into(),
        event_time_ms: t,
        user_id: user.into(),
        room_id: "r1".into(),
        payload: Some(Payload::GiftSent(GiftSent {
            gift_type: "1".into(),
            amount,
            ip: String::new(),
        })),
        ..Default::default()
    }
}

fn feed(s: &mut PartitionState, p: &Plan, e: &Event, offset: i64) -> Outcome {
    s.process(p, &Rec::new(e, &[], None).unwrap(), offset)
}

fn count_of(row: &MetricRow) -> u64 {
    match row.aggs[0] {
        Agg::Count(n) => n,
        _ => panic!("not a count"),
    }
}

#[test]
fn tumbling_window_fires_when_the_watermark_passes_its_end() {
    let p = plan(PLAYS, 30_000, 5_000);
    let mut s = PartitionState::new(&p, Input::Events);
    feed(&mut s, &p, &play("a", T0 + 1_000, "v1", "u1", Some(10)), 0);
    feed(&mut s, &p, &play("b", T0 + 2_000, "v1", "u2", None), 1);
    feed(&mut s, &p, &play("c", T0 + 3_000, "v1", "u1", Some(5)), 2);
    // Watermark T0 - 2s: nothing fired, nothing emitted without early emission.
    assert!(s.emit(&p, false).rows.is_empty());
    // An event at T0 + 65s moves the watermark to T0 + 60s = the window end.
    feed(
        &mut s,
        &p,
        &play("d", T0 + MIN + 5_000, "v2", "u1", None),
        3,
    );
    let e = s.emit(&p, false);
    assert_eq!(e.rows.len(), 1);
    let r = &e.rows[0];
    assert_eq!((r.metric, r.pane_start), (0, T0));
    assert_eq!(&*r.key, &[Val::S("v1".into())]);
    assert_eq!(
        r.version, 3,
        "offset + 1 of the last record that changed it"
    );
    assert_eq!(r.aggs[0], Agg::Count(3));
    assert_eq!(
        r.aggs[1],
        Agg::Distinct(["u1".into(), "u2".into()].into_iter().collect())
    );
    assert_eq!(r.aggs[2], Agg::Sum(15));
    assert_eq!(r.aggs[3], Agg::Max(Some(10)));
    // Emitted once: nothing changed since.
    assert!(s.emit(&p, false).rows.is_empty());
}

#[test]
fn early_emission_shows_open_windows_and_only_changed_rows() {
    let p = plan(PLAYS, 30_000, 5_000);
    let mut s = PartitionState::new(&p, Input::Events);
    feed(&mut s, &p, &play("a", T0 + 1_000, "v1", "u1", None), 0);
    feed(&mut s, &p, &play("b", T0 + 2_000, "v2", "u1", None), 1);
    let e = s.emit(&p, true);
    assert_eq!(e.rows.len(), 2);
    feed(&mut s, &p, &play("c", T0 + 3_000, "v1", "u3", None), 2);
    let e = s.emit(&p, true);
    assert_eq!(e.rows.len(), 1, "only the changed group");
    assert_eq!(e.rows[0].version, 3);
    assert_eq!(count_of(&e.rows[0]), 2);
}

#[test]
fn events_within_grace_correct_the_window_later_ones_are_late() {
    let p = plan(PLAYS, 30_000, 0);
    let mut s = PartitionState::new(&p, Input::Events);
    feed(&mut s, &p, &play("a", T0 + 1_000, "v1", "u1", None), 0);
    feed(
        &mut s,
        &p,
        &play("b", T0 + MIN + 10_000, "v1", "u1", None),
        1,
    );
    let first = s.emit(&p, false);
    assert_eq!(first.rows.len(), 1);
    assert_eq!(count_of(&first.rows[0]), 1);
    // Watermark T0 + 70s < end + grace = T0 + 90s: a correction.
    let out = feed(&mut s, &p, &play("c", T0 + 50_000, "v1", "u2", None), 2);
    assert_eq!(out, Outcome::Counted { late: vec![] });
    let fix = s.emit(&p, false);
    assert_eq!(fix.rows.len(), 1);
    assert_eq!(count_of(&fix.rows[0]), 2);
    assert!(
        fix.rows[0].version > first.rows[0].version,
        "re-emitted with a higher version"
    );
    // Watermark reaches T0 + 90s: the window closes and its state goes.
    feed(
        &mut s,
        &p,
        &play("d", T0 + MIN + 30_000, "v9", "u1", None),
        3,
    );
    s.emit(&p, false);
    assert_eq!(s.open_panes(), 1, "only the second minute is open");
    let out = feed(&mut s, &p, &play("e", T0 + 59_000, "v1", "u3", None), 4);
    assert_eq!(
        out,
        Outcome::Counted {
            late: vec!["plays".into()]
        }
    );
    assert!(
        s.emit(&p, false).rows.is_empty(),
        "a late event changes nothing"
    );
}

#[test]
fn duplicates_count_once_even_across_emissions() {
    let p = plan(PLAYS, 60_000, 0);
    let mut s = PartitionState::new(&p, Input::Events);
    let e = play("same", T0 + 1_000, "v1", "u1", Some(7));
    assert_eq!(feed(&mut s, &p, &e, 0), Outcome::Counted { late: vec![] });
    let first = s.emit(&p, true).rows;
    assert_eq!(count_of(&first[0]), 1);
    assert_eq!(feed(&mut s, &p, &e, 1), Outcome::Duplicate);
    feed(
        &mut s,
        &p,
        &play("x", T0 + MIN + 1_000, "v1", "u1", None),
        2,
    );
    let rows = s.emit(&p, false).rows;
    assert!(
        rows.iter().all(|r| r.pane_start != T0),
        "the duplicate changed nothing, so nothing is re-emitted"
    );
    assert!(s.dirty());
    // Re-reading an offset already in the state is a no-op.
    assert_eq!(feed(&mut s, &p, &e, 0), Outcome::Stale);
}

#[test]
fn remembered_ids_are_kept_for_the_dedup_horizon_whatever_the_windows() {
    // Minute windows with 10 s of grace, a 2-minute horizon.
    let p = plan(PLAYS, 10_000, 0).with_dedup_horizon(120_000);
    let mut s = PartitionState::new(&p, Input::Events);
    feed(&mut s, &p, &play("a", T0 + 1_000, "v1", "u1", None), 0);
    assert_eq!(s.remembered_ids(), 1);
    // The watermark passes the end of a's window and its grace (T0+70s).
    feed(
        &mut s,
        &p,
        &play("b", T0 + MIN + 10_000, "v1", "u1", None),
        1,
    );
    s.emit(&p, false);
    assert_eq!(s.remembered_ids(), 2, "a's window closed, its id is kept");
    // A duplicate of "a" whose window has closed is a duplicate, not late.
    let out = feed(&mut s, &p, &play("a", T0 + 1_000, "v1", "u1", None), 2);
    assert_eq!(out, Outcome::Duplicate);
    // Past the horizon (a's bucket T0 + its 10 s + 120 s < the watermark
    // at T0 + 180 s): a is forgotten; a copy arriving now is a new, late
    // event.
    feed(&mut s, &p, &play("c", T0 + 3 * MIN, "v1", "u1", None), 3);
    s.emit(&p, false);
    assert_eq!(s.remembered_ids(), 2, "b's and c's ids are left");
    let out = feed(&mut s, &p, &play("a", T0 + 1_000, "v1", "u1", None), 4);
    assert_eq!(
        out,
        Outcome::Counted {
            late: vec!["plays".into()]
        }
    );
}

#[test]
fn a_duplicate_later_than_the_horizon_counts_again_in_a_window_still_open() {
    // A day-long window and a 1-minute horizon: the documented trade-off.
    let p = plan(
        r#"
[[leaderboard]]
name = "gifts_daily"
kinds = ["gift_sent"]
member = "user_id"
score = { name = "amount", fn = "sum", field = "amount" }
"#,
        60_000,
        0,
    )
    .with_dedup_horizon(60_000);
    let mut s = PartitionState::new(&p, Input::Events);
    feed(&mut s, &p, &gift("g", T0 + 1_000, "u1", 5), 0);
    assert_eq!(
        feed(&mut s, &p, &gift("g", T0 + 1_000, "u1", 5), 1),
        Outcome::Duplicate
    );
    feed(&mut s, &p, &gift("h", T0 + 10 * MIN, "u2", 1), 2);
    s.emit(&p, false);
    assert_eq!(
        feed(&mut s, &p, &gift("g", T0 + 1_000, "u1", 5), 3),
        Outcome::Counted { late: vec![] },
        "ten minutes later the id is forgotten: it counts again"
    );
}

#[test]
fn remembered_ids_cost_eight_bytes_in_the_checkpoint() {
    let p = plan(PLAYS, 10_000, 0);
    let mut s = PartitionState::new(&p, Input::Events);
    let long_id = "x".repeat(200);
    feed(&mut s, &p, &play(&long_id, T0 + 1_000, "v1", "u1", None), 0);
    let d = s.checkpoint_delta(&p);
    let (_, ids) = d.set.iter().find(|(f, _)| f.starts_with("d:")).unwrap();
    assert_eq!(ids.len(), 8, "a 200-character id is remembered as a hash");
    let restored =
        PartitionState::restore(&p, Input::Events, &d.set.iter().cloned().collect()).unwrap();
    assert_eq!(restored.remembered_ids(), 1);
}

#[test]
fn idle_partition_closes_its_windows_by_wall_clock() {
    let p = plan(PLAYS, 5_000, 2_000);
    let mut s = PartitionState::new(&p, Input::Events);
    feed(&mut s, &p, &play("a", T0 + 50_000, "v1", "u1", None), 0);
    assert!(s.emit(&p, false).rows.is_empty());
    let wall = T0 + 10 * 86_400_000; // data from long ago
    assert!(
        !s.advance_idle(&p, 4_000, 5_000, wall),
        "not idle long enough"
    );
    // 12 s idle: watermark = T0+50s − 2s + 12s = T0+60s → the window fires.
    assert!(s.advance_idle(&p, 12_000, 5_000, wall));
    assert_eq!(s.watermark(), T0 + MIN);
    let e = s.emit(&p, false);
    assert_eq!(e.rows.len(), 1);
    assert_eq!(s.open_panes(), 1, "fired but within grace");
    assert!(s.advance_idle(&p, 17_000, 5_000, wall));
    s.emit(&p, false);
    assert_eq!(s.open_panes(), 0, "closed after end + grace");
}

const HOP: &str = r#"
[[metric]]
name = "gifts_3m"
kinds = ["gift_sent"]
window = { size = "3m", slide = "1m" }
aggregates = [{ name = "amount", fn = "sum", field = "amount" }]
"#;

#[test]
fn hopping_windows_keep_panes_and_an_event_is_late_once_its_pane_closed() {
    let p = plan(HOP, 0, 0);
    let mut s = PartitionState::new(&p, Input::Events);
    feed(&mut s, &p, &gift("a", T0 + 10_000, "u1", 5), 0);
    feed(&mut s, &p, &gift("b", T0 + MIN + 10_000, "u2", 7), 1);
    let rows = s.emit(&p, true).rows;
    let panes: BTreeMap<i64, &Agg> = rows.iter().map(|r| (r.pane_start, &r.aggs[0])).collect();
    assert_eq!(panes[&T0], &Agg::Sum(5));
    assert_eq!(panes[&(T0 + MIN)], &Agg::Sum(7));
    // Watermark T0+70s ≥ end of pane T0: an event in it is late for every
    // window, even those still open (its lateness is decided once).
    let out = feed(&mut s, &p, &gift("c", T0 + 20_000, "u3", 1), 2);
    assert_eq!(
        out,
        Outcome::Counted {
            late: vec!["gifts_3m".into()]
        }
    );
}

const LEVEL: &str = r#"
[[metric]]
name = "online"
kinds = ["viewer_arrived", "viewer_left"]
window = "1m"
group_by = ["room_id"]
aggregates = [{ name = "online", fn = "level", rise = ["viewer_arrived"], fall = ["viewer_left"] }]
"#;

#[test]
fn level_cells_hold_arrivals_minus_departures_per_window() {
    let p = plan(LEVEL, 60_000, 0);
    let mut s = PartitionState::new(&p, Input::Events);
    let arrive = |id: &str, t: i64| Event {
        event_id: id.into(),
        event_time_ms: t,
        user_id: id.into(),
        room_id: "r".into(),
        payload: Some(Payload::ViewerArrived(ViewerArrived {
            viewer: Some(Viewer::default()),
        })),
        ..Default::default()
    };
    let leave = |id: &str, t: i64| Event {
        event_id: format!("{id}-l"),
        event_time_ms: t,
        user_id: id.into(),
        room_id: "r".into(),
        payload: Some(Payload::ViewerLeft(ViewerLeft {
            viewer: None,
            arrived_at_ms: T0,
        })),
        ..Default::default()
    };
    feed(&mut s, &p, &arrive("u1", T0 + 1_000), 0);
    feed(&mut s, &p, &arrive("u2", T0 + 2_000), 1);
    feed(&mut s, &p, &leave("u1", T0 + MIN + 1_000), 2);
    let rows = s.emit(&p, true).rows;
    let deltas: BTreeMap<i64, &Agg> = rows.iter().map(|r| (r.pane_start, &r.aggs[0])).collect();
    assert_eq!(deltas[&T0], &Agg::Level(2));
    assert_eq!(deltas[&(T0 + MIN)], &Agg::Level(-1));
}

const POOLS: &str = r#"
[[metric]]
name = "pool_consumption"
input = "monitored"
kinds = ["video_played", "user_action"]
window = "1m"
group_by = ["pool", "video_id"]
aggregates = [
  { name = "plays", fn = "count", kinds = ["video_played"] },
  { name = "likes", fn = "count", kinds = ["user_action"], when = { field = "action", equals = "like" } },
]
"#;

#[test]
fn pool_metrics_fan_out_per_matched_pool_and_skip_untaken_events() {
    let p = plan(POOLS, 60_000, 0);
    let mut s = PartitionState::new(&p, Input::Monitored);
    let pools = vec!["all".to_owned(), "hot".to_owned()];
    let e = play("a", T0, "v1", "u1", None);
    s.process(&p, &Rec::new(&e, &pools, None).unwrap(), 0);
    let order = Event {
        event_id: "o".into(),
        event_time_ms: T0,
        video_id: "v1".into(),
        payload: Some(Payload::UserAction(UserAction {
            action: "order".into(),
            target_id: "v1".into(),
        })),
        ..Default::default()
    };
    s.process(&p, &Rec::new(&order, &pools, None).unwrap(), 1);
    let none: Vec<String> = vec![];
    let e = play("b", T0, "v2", "u1", None);
    assert_eq!(
        s.process(&p, &Rec::new(&e, &none, None).unwrap(), 2),
        Outcome::Counted { late: vec![] }
    );
    let rows = s.emit(&p, true).rows;
    let mut got: Vec<(String, Vec<Agg>)> = rows
        .iter()
        .map(|r| (format!("{}/{}", r.key[0], r.key[1]), r.aggs.clone()))
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            ("all/v1".to_owned(), vec![Agg::Count(1), Agg::Count(0)]),
            ("hot/v1".to_owned(), vec![Agg::Count(1), Agg::Count(0)]),
        ],
        "an order creates no row; an event without pools none either"
    );
}

const BOARD: &str = r#"
[[leaderboard]]
name = "gifts"
kinds = ["gift_sent"]
member = "user_id"
score = { name = "amount", fn = "sum", field = "amount" }
"#;

#[test]
fn leaderboard_partials_are_cumulative_and_versioned() {
    let p = plan(BOARD, 60_000, 0);
    let mut s = PartitionState::new(&p, Input::Events);
    feed(&mut s, &p, &gift("a", T0, "u1", 5), 10);
    feed(&mut s, &p, &gift("b", T0 + 1, "u1", 6), 11);
    feed(&mut s, &p, &gift("b", T0 + 1, "u1", 6), 12);
    let b = s.emit(&p, false).boards;
    assert_eq!(b.len(), 1);
    assert_eq!((b[0].value, b[0].version), (11, 12));
    assert_eq!(b[0].window_start, T0 - T0.rem_euclid(86_400_000));
}

// ---- checkpoints and replays -----------------------------------------------

const ALL: &str = concat!(
    include_str!("../../../query/src/default_spec.toml"),
    r#"
[[metric]]
name = "extremes"
kinds = ["gift_sent"]
window = { size = "2m", slide = "1m" }
group_by = ["gift_type"]
aggregates = [
  { name = "smallest", fn = "min", field = "amount" },
  { name = "largest", fn = "max", field = "amount" },
]
"#
);

/// ClickHouse's ReplacingMergeTree(version) and the leaderboard script, in
/// memory: the highest version per key wins.
/// (metric, pane, group key) → (version, aggregates)
type Rows = BTreeMap<(usize, i64, Vec<Val>), (u64, Vec<Agg>)>;

#[derive(Default, Debug, PartialEq)]
struct Store {
    rows: Rows,
    logs: BTreeMap<(usize, String), (u64, Vec<Val>)>,
    boards: BTreeMap<(usize, i64, String), (u64, i64)>,
    ckpt: HashMap<String, Vec<u8>>,
}

impl Store {
    fn write(&mut self, e: Emission) {
        for r in e.rows {
            let k = (r.metric, r.pane_start, r.key.to_vec());
            let v = (r.version, r.aggs);
            match self.rows.get(&k) {
                Some(old) if old.0 > v.0 => {}
                Some(old) if old.0 == v.0 => assert_eq!(old, &v, "same version, other content"),
                _ => {
                    self.rows.insert(k, v);
                }
            }
        }
        for l in e.logs {
            self.logs
                .insert((l.log, l.event_id.to_string()), (l.version, l.columns));
        }
        for b in e.boards {
            let k = (b.board, b.window_start, b.member.to_string());
            if self.boards.get(&k).is_none_or(|old| b.version > old.0) {
                self.boards.insert(k, (b.version, b.value));
            }
        }
    }

    fn checkpoint(&mut self, d: CheckpointDelta) {
        for f in d.del {
            self.ckpt.remove(&f);
        }
        for (f, v) in d.set {
            self.ckpt.insert(f, v);
        }
    }

    /// Final values: rows (aggregate content) and board values, without versions.
    fn values(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        let rows = self
            .rows
            .iter()
            .map(|(k, (_, a))| format!("{k:?}={a:?}"))
            .collect();
        let logs = self.logs.keys().map(|k| format!("{k:?}")).collect();
        let boards = self
            .boards
            .iter()
            .map(|(k, (_, v))| format!("{k:?}={v}"))
            .collect();
        (rows, logs, boards)
    }
}

/// A deterministic mixed stream: every default metric's kinds, duplicates,
/// out-of-order and late events.
fn stream(n: usize, seed: u64) -> Vec<Event> {
    let mut x = seed;
    let mut rnd = move |m: u64| {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (x >> 33) % m
    };
    let mut out: Vec<Event> = Vec::with_capacity(n);
    for i in 0..n {
        if i > 5 && rnd(10) == 0 {
            let back = rnd(5) as usize + 1;
            let dup = out[out.len() - back].clone();
            out.push(dup);
            continue;
        }
        let mut t = T0 + (i as i64) * 700 + rnd(1_500) as i64;
        if rnd(20) == 0 {
            t -= 100_000; // late by 100 s
        }
        let id = format!("e{i}");
        let user = format!("u{}", rnd(7));
        let e = match rnd(5) {
            0 => play(
                &id,
                t,
                &format!("v{}", rnd(4)),
                &user,
                Some(rnd(1000) as i64),
            ),
            1 => gift(&id, t, &user, rnd(100) as i64 + 1),
            2 => Event {
                event_id: id,
                event_time_ms: t,
                user_id: user,
                video_id: format!("v{}", rnd(4)),
                payload: Some(Payload::UserAction(UserAction {
                    action: ["like", "comment", "share", "order"][rnd(4) as usize].into(),
                    target_id: String::new(),
                })),
                ..Default::default()
            },
            3 => Event {
                event_id: id,
                event_time_ms: t,
                user_id: user,
                room_id: format!("r{}", rnd(3)),
                payload: Some(Payload::ViewerArrived(ViewerArrived {
                    viewer: Some(Viewer {
                        province: ["浙江", "北京"][rnd(2) as usize].into(),
                        region: "1122".into(),
                        grade: rnd(5) as i32 + 1,
                        ip: "1.2.3.4".into(),
                    }),
                })),
                ..Default::default()
            },
            _ => Event {
                event_id: id,
                event_time_ms: t,
                user_id: user,
                room_id: format!("r{}", rnd(3)),
                payload: Some(Payload::ViewerLeft(ViewerLeft {
                    viewer: Some(Viewer::default()),
                    arrived_at_ms: t - 5_000,
                })),
                ..Default::default()
            },
        };
        out.push(e);
    }
    out
}

/// Runs `events` from `from`, flushing every `flush_every` records and at
/// idle points, and returns the state; when `crash_at` is reached it stops
/// without flushing (kill -9).
fn run(
    p: &Plan,
    s: &mut PartitionState,
    store: &mut Store,
    events: &[Event],
    flush_every: usize,
    crash_at: Option<usize>,
) {
    let from = usize::try_from(s.next_offset.max(0)).unwrap();
    for (i, e) in events.iter().enumerate().skip(from) {
        if crash_at == Some(i) {
            return;
        }
        s.process(p, &Rec::new(e, &[], None).unwrap(), i as i64);
        if (i + 1) % flush_every == 0 {
            // An idle advance now and then, applied only at a flush (as
            // the stage does), checkpointed with it.
            if i % (flush_every * 7) == 0 {
                s.advance_idle(p, 20_000, 10_000, i64::MAX / 2);
            }
            let early = i % (flush_every * 3) == 0;
            store.write(s.emit(p, early));
            let d = s.checkpoint_delta(p);
            store.checkpoint(d);
        }
    }
    if crash_at.is_none() {
        store.write(s.emit(p, true));
        let d = s.checkpoint_delta(p);
        store.checkpoint(d);
    }
}

#[test]
fn checkpoint_round_trip_restores_an_identical_state() {
    let p = Plan::new(Spec::parse(ALL).unwrap(), 120_000, 3_000);
    let events = stream(400, 7);
    let mut s = PartitionState::new(&p, Input::Events);
    let mut store = Store::default();
    run(&p, &mut s, &mut store, &events[..300], 50, None);
    let back = PartitionState::restore(&p, Input::Events, &store.ckpt).unwrap();
    assert_eq!(back, s);
    assert!(s.open_panes() > 0 && s.remembered_ids() > 0);
    // Taken under another spec: refused.
    let other = Plan::new(Spec::parse(ALL).unwrap(), 60_000, 3_000);
    assert!(matches!(
        PartitionState::restore(&other, Input::Events, &store.ckpt),
        Err(RestoreError::Fingerprint { .. })
    ));
}

#[test]
fn crashes_at_any_point_replay_to_the_same_final_values() {
    let p = Plan::new(Spec::parse(ALL).unwrap(), 60_000, 3_000);
    let events = stream(600, 42);
    let mut reference = Store::default();
    let mut s = PartitionState::new(&p, Input::Events);
    run(&p, &mut s, &mut reference, &events, 40, None);
    assert!(!reference.rows.is_empty() && !reference.boards.is_empty());
    // The stream really has duplicates and late events.
    let (mut dups, mut late) = (0, 0);
    let mut t = PartitionState::new(&p, Input::Events);
    for (i, e) in events.iter().enumerate() {
        match t.process(&p, &Rec::new(e, &[], None).unwrap(), i as i64) {
            Outcome::Duplicate => dups += 1,
            Outcome::Counted { late: l } if !l.is_empty() => late += 1,
            _ => {}
        }
        if i % 280 == 0 {
            t.advance_idle(&p, 20_000, 10_000, i64::MAX / 2);
            t.emit(&p, false);
        }
    }
    assert!(dups > 20 && late > 5, "{dups} duplicates, {late} late");

    for crashes in [
        vec![13],
        vec![39, 40, 41],
        vec![77, 200, 201, 333, 599],
        vec![1, 2, 3],
    ] {
        let mut store = Store::default();
        let mut s = PartitionState::new(&p, Input::Events);
        for c in &crashes {
            run(&p, &mut s, &mut store, &events, 40, Some(*c));
            // Restart: the state comes back from the checkpoint only.
            s = if store.ckpt.is_empty() {
                PartitionState::new(&p, Input::Events)
            } else {
                PartitionState::restore(&p, Input::Events, &store.ckpt).unwrap()
            };
        }
        run(&p, &mut s, &mut store, &events, 40, None);
        assert_eq!(store.values(), reference.values(), "crashes at {crashes:?}");
    }

    // A full replay with a fresh state (new group, no checkpoint) over the
    // rows already written leaves every final value unchanged.
    let mut again = Store {
        rows: reference.rows.clone(),
        logs: reference.logs.clone(),
        boards: reference.boards.clone(),
        ckpt: HashMap::new(),
    };
    let mut s = PartitionState::new(&p, Input::Events);
    run(&p, &mut s, &mut again, &events, 40, None);
    assert_eq!(again.values(), reference.values());
}

// ---- days in a zone ----------------------------------------------------------

const CHINA_DAYS: &str = r#"
[[leaderboard]]
name = "gifts"
kinds = ["gift_sent"]
member = "user_id"
score = { name = "amount", fn = "sum", field = "amount" }
zone = "Asia/Shanghai"

[[metric]]
name = "gifts_daily"
kinds = ["gift_sent"]
window = "1d"
zone = "Asia/Shanghai"
aggregates = [{ name = "amount", fn = "sum", field = "amount" }]
"#;

/// Epoch ms of a China-time wall clock reading.
fn cst(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(&format!("{s}+08:00"))
        .unwrap()
        .timestamp_millis()
}

#[test]
fn a_china_day_ends_at_china_midnight_for_boards_and_metrics() {
    let p = plan(CHINA_DAYS, 60_000, 0);
    let mut s = PartitionState::new(&p, Input::Events);
    // 23:59 and 00:01 China time: 15:59 and 16:01 UTC, the same UTC day.
    feed(
        &mut s,
        &p,
        &gift("a", cst("2021-08-16T23:59:00"), "u1", 5),
        0,
    );
    feed(
        &mut s,
        &p,
        &gift("b", cst("2021-08-17T00:01:00"), "u1", 7),
        1,
    );
    let e = s.emit(&p, true);
    let days: BTreeMap<i64, i64> = e.boards.iter().map(|b| (b.window_start, b.value)).collect();
    let (d16, d17) = (cst("2021-08-16T00:00:00"), cst("2021-08-17T00:00:00"));
    assert_eq!(days, BTreeMap::from([(d16, 5), (d17, 7)]));
    let keys: Vec<String> = crate::leaderboard::batches(
        "",
        &p.spec.leaderboards,
        &vec![String::new(); p.spec.leaderboards.len()],
        "0",
        &e.boards,
    )
    .into_iter()
    .map(|b| b.set_key)
    .collect();
    assert_eq!(
        keys,
        vec!["rankings:gifts:{2021-08-16}", "rankings:gifts:{2021-08-17}"]
    );
    let panes: Vec<i64> = e.rows.iter().map(|r| r.pane_start).collect();
    assert_eq!(panes, vec![d16, d17]);
    // The watermark passes 00:00 + 1 min grace China time: the 16th has
    // closed, so an event from 23:59:30 is late there (in UTC it would
    // still be on time, the UTC day ends eight hours later).
    feed(
        &mut s,
        &p,
        &gift("c", cst("2021-08-17T00:01:01"), "u2", 1),
        2,
    );
    s.emit(&p, false);
    let out = feed(
        &mut s,
        &p,
        &gift("d", cst("2021-08-16T23:59:30"), "u2", 1),
        3,
    );
    assert_eq!(
        out,
        Outcome::Counted {
            late: vec!["gifts_daily".into(), "gifts".into()]
        }
    );
    let utc = plan(&CHINA_DAYS.replace("Asia/Shanghai", "UTC"), 60_000, 0);
    let mut u = PartitionState::new(&utc, Input::Events);
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        let t = [
            cst("2021-08-16T23:59:00"),
            cst("2021-08-17T00:01:00"),
            cst("2021-08-17T00:01:01"),
        ][i];
        feed(&mut u, &utc, &gift(id, t, "u1", 1), i as i64);
    }
    let out = feed(
        &mut u,
        &utc,
        &gift("d", cst("2021-08-16T23:59:30"), "u2", 1),
        3,
    );
    assert_eq!(out, Outcome::Counted { late: vec![] });
}

#[test]
fn china_days_replay_to_the_same_days() {
    let p = plan(CHINA_DAYS, 60_000, 0);
    // Gifts every 20 s around China midnight (23:50 to 00:10), one user in
    // three, checkpointed every 7 records.
    let events: Vec<Event> = (0..60)
        .map(|i| {
            gift(
                &format!("e{i}"),
                cst("2021-08-16T23:50:00") + i * 20_000,
                &format!("u{}", i % 3),
                i + 1,
            )
        })
        .collect();
    let mut reference = Store::default();
    let mut s = PartitionState::new(&p, Input::Events);
    run(&p, &mut s, &mut reference, &events, 7, None);
    let days: std::collections::BTreeSet<i64> =
        reference.boards.keys().map(|(_, w, _)| *w).collect();
    assert_eq!(
        days.into_iter().collect::<Vec<_>>(),
        vec![cst("2021-08-16T00:00:00"), cst("2021-08-17T00:00:00")]
    );
    for crash in [3, 29, 30, 31, 58] {
        let mut store = Store::default();
        let mut s = PartitionState::new(&p, Input::Events);
        run(&p, &mut s, &mut store, &events, 7, Some(crash));
        let mut s = if store.ckpt.is_empty() {
            PartitionState::new(&p, Input::Events)
        } else {
            PartitionState::restore(&p, Input::Events, &store.ckpt).unwrap()
        };
        run(&p, &mut s, &mut store, &events, 7, None);
        assert_eq!(store.values(), reference.values(), "crash at {crash}");
    }
    // A full replay over what is written changes nothing.
    let mut again = Store {
        rows: reference.rows.clone(),
        logs: reference.logs.clone(),
        boards: reference.boards.clone(),
        ckpt: HashMap::new(),
    };
    let mut s = PartitionState::new(&p, Input::Events);
    run(&p, &mut s, &mut again, &events, 7, None);
    assert_eq!(again.values(), reference.values());
}

// ---- in-band watermarks --------------------------------------------------

fn mark(marks: &[(i32, i64)]) -> vidpulse_proto::Watermark {
    vidpulse_proto::Watermark {
        writer: "ingest".into(),
        sources: vec![vidpulse_proto::SourceTopic {
            topic: "raw".into(),
            partitions: 2,
        }],
        marks: marks
            .iter()
            .map(|(p, m)| vidpulse_proto::SourceMark {
                topic: 0,
                partition: *p,
                watermark_ms: *m,
                empty: false,
            })
            .collect(),
        ..Default::default()
    }
}

#[test]
fn in_band_watermarks_decide_windows_not_the_event_times_seen() {
    let p = Plan::with_clock(
        Spec::parse(PLAYS).unwrap(),
        10_000,
        5_000,
        ClockMode::InBand,
    );
    let mut s = PartitionState::new(&p, Input::Events);
    // An event an hour ahead of the others (one raw partition read in a
    // burst before the other): it moves nothing.
    feed(
        &mut s,
        &p,
        &play("ahead", T0 + 60 * MIN, "v1", "u1", None),
        0,
    );
    assert_eq!(
        s.watermark(),
        crate::window::Clock::new(ClockMode::InBand).current()
    );
    feed(&mut s, &p, &play("a", T0 + 1_000, "v1", "u1", None), 1);
    assert_eq!(
        feed(&mut s, &p, &play("b", T0 + 2_000, "v1", "u2", None), 2),
        Outcome::Counted { late: vec![] },
        "no source has said anything: nothing is late"
    );
    assert!(s.emit(&p, false).rows.is_empty());
    // Partition 0 is at T0 + 90 s, partition 1 has not reported: nothing fires.
    s.observe_watermark(&mark(&[(0, T0 + 90_000)]), 3);
    assert!(s.emit(&p, false).rows.is_empty());
    // Both report: the watermark is the minimum, T0 + 65 s: the first
    // minute fires (within its grace, it still takes corrections).
    s.observe_watermark(&mark(&[(1, T0 + 65_000)]), 4);
    assert_eq!(s.watermark(), T0 + 65_000);
    let rows = s.emit(&p, false).rows;
    assert_eq!(rows.len(), 1);
    assert_eq!(count_of(&rows[0]), 2);
    assert_eq!(
        feed(&mut s, &p, &play("c", T0 + 3_000, "v1", "u3", None), 5),
        Outcome::Counted { late: vec![] }
    );
    // Past end + grace: late.
    s.observe_watermark(&mark(&[(0, T0 + 80_000), (1, T0 + 80_000)]), 6);
    assert_eq!(
        feed(&mut s, &p, &play("d", T0 + 4_000, "v1", "u4", None), 7),
        Outcome::Counted {
            late: vec!["plays".into()]
        }
    );
    // A checkpoint taken here and replayed decides the same.
    let mut restored = PartitionState::restore(
        &p,
        Input::Events,
        &s.clone().checkpoint_delta(&p).set.into_iter().collect(),
    )
    .unwrap();
    assert_eq!(restored.watermark(), s.watermark());
    assert_eq!(
        feed(
            &mut restored,
            &p,
            &play("e", T0 + 5_000, "v1", "u5", None),
            8
        ),
        feed(&mut s, &p, &play("e", T0 + 5_000, "v1", "u5", None), 8),
    );
}

// ---- checkpoints proportional to change ---------------------------------------

const GIVERS: &str = r#"
[[metric]]
name = "givers"
kinds = ["gift_sent"]
window = "1h"
aggregates = [
  { name = "gifts", fn = "count" },
  { name = "givers", fn = "distinct", field = "user_id" },
]
"#;

/// The checkpoint bytes of one more gift by a known giver and one by a new
/// giver, after `n` givers are checkpointed.
fn delta_after(n: usize) -> (usize, usize) {
    let p = plan(GIVERS, 60_000, 0);
    let mut s = PartitionState::new(&p, Input::Events);
    for i in 0..n {
        let e = gift(&format!("e{i}"), T0 + 1_000, &format!("u{i}"), 1);
        feed(&mut s, &p, &e, i as i64);
    }
    s.checkpoint_delta(&p);
    feed(&mut s, &p, &gift("again", T0 + 2_000, "u0", 1), n as i64);
    let unchanged = s.checkpoint_delta(&p).bytes();
    feed(
        &mut s,
        &p,
        &gift("new", T0 + 3_000, "newcomer", 1),
        n as i64 + 1,
    );
    let grown = s.checkpoint_delta(&p).bytes();
    (unchanged, grown)
}

#[test]
fn a_checkpoint_writes_what_changed_not_the_whole_distinct_set() {
    let (small_same, small_grown) = delta_after(100);
    let (big_same, big_grown) = delta_after(10_000);
    // Only the cell's head (counts, version) and the new member: the same
    // size whatever the set holds, give or take the digits of the counts.
    assert!(big_same <= small_same + 16, "{big_same} vs {small_same}");
    assert!(
        big_grown <= small_grown + 16,
        "{big_grown} vs {small_grown}"
    );
    assert!(big_grown < 600, "{big_grown} bytes for one new member");
    // The remembered ids: 8 bytes for the new id, not the second's set.
    assert!(big_grown < small_grown + 100);
}

#[test]
fn a_growing_set_is_written_a_bounded_number_of_times_per_member() {
    let p = plan(GIVERS, 60_000, 0);
    let mut s = PartitionState::new(&p, Input::Events);
    let mut store = HashMap::new();
    let (mut written, mut most_fields) = (0usize, 0usize);
    for i in 0..5_000usize {
        let e = gift(&format!("e{i}"), T0 + 1_000, &format!("u{i}"), 1);
        feed(&mut s, &p, &e, i as i64);
        if i % 7 == 0 {
            let d = s.checkpoint_delta(&p);
            written += d
                .set
                .iter()
                .filter(|(f, _)| f.starts_with("s:"))
                .map(|(_, v)| v.len())
                .sum::<usize>();
            for f in &d.del {
                store.remove(f);
            }
            store.extend(d.set);
            most_fields = most_fields.max(store.keys().filter(|f| f.starts_with("s:")).count());
        }
    }
    let d = s.checkpoint_delta(&p);
    for f in &d.del {
        store.remove(f);
    }
    store.extend(d.set);
    // 5 000 members of ~8 bytes as JSON: written whole each checkpoint
    // that would be ~15 MB; appended with doubling rewrites it is a few
    // times the set.
    let set_bytes = 5_000 * 8;
    assert!(
        written < 6 * set_bytes,
        "{written} bytes written for a {set_bytes}-byte set"
    );
    assert!(
        most_fields <= usize::from(Chunks::MAX),
        "{most_fields} chunk fields"
    );
    let back = PartitionState::restore(&p, Input::Events, &store).unwrap();
    assert_eq!(back, s);
}

const BY_USER: &str = r#"
[[metric]]
name = "by_user"
kinds = ["gift_sent"]
window = "1h"
group_by = ["user_id"]
aggregates = [{ name = "amount", fn = "sum", field = "amount" }]

[[leaderboard]]
name = "gifts_daily"
kinds = ["gift_sent"]
member = "user_id"
score = { name = "amount", fn = "sum", field = "amount" }
"#;

/// Applies a delta to a stand-in for the checkpoint hash.
fn apply(store: &mut HashMap<String, Vec<u8>>, d: CheckpointDelta) {
    for f in &d.del {
        store.remove(f);
    }
    store.extend(d.set);
}

#[test]
fn a_windows_cells_and_partials_go_to_its_log_as_they_change() {
    let p = plan(BY_USER, 60_000, 0);
    let mut s = PartitionState::new(&p, Input::Events);
    let mut store = HashMap::new();
    let mut off = 0;
    for u in 0..1_000 {
        feed(
            &mut s,
            &p,
            &gift(&format!("a{u}"), T0 + 1_000, &format!("u{u}"), 1),
            off,
        );
        off += 1;
    }
    let d = s.checkpoint_delta(&p);
    let logs = |d: &CheckpointDelta, tag: &str| -> Vec<(String, usize)> {
        d.set
            .iter()
            .filter(|(f, _)| f.starts_with(tag))
            .map(|(f, v)| (f.clone(), v.iter().filter(|b| **b == b'\n').count()))
            .collect()
    };
    // One field per window, a line per cell or member.
    assert_eq!(logs(&d, "p:").len(), 1);
    assert_eq!(logs(&d, "p:")[0].1, 1_000);
    assert_eq!(logs(&d, "w:").len(), 1);
    assert_eq!(logs(&d, "w:")[0].1, 1_000);
    apply(&mut store, d);
    // Then each checkpoint writes the cells that changed, not the window.
    let mut most_fields = 0;
    for round in 0..200 {
        let u = round % 10;
        feed(
            &mut s,
            &p,
            &gift(&format!("b{round}"), T0 + 2_000, &format!("u{u}"), 2),
            off,
        );
        off += 1;
        let d = s.checkpoint_delta(&p);
        let (cells, members) = (logs(&d, "p:"), logs(&d, "w:"));
        assert_eq!(cells.len(), 1, "round {round}");
        assert_eq!(members.len(), 1, "round {round}");
        assert_eq!(cells[0].1, 1, "{cells:?}");
        assert_eq!(members[0].1, 1, "{members:?}");
        let logged: usize = d
            .set
            .iter()
            .filter(|(f, _)| f.starts_with("p:") || f.starts_with("w:"))
            .map(|(f, v)| f.len() + v.len())
            .sum();
        assert!(logged < 120, "{logged} bytes of logs for one change");
        apply(&mut store, d);
        most_fields = most_fields.max(store.keys().filter(|f| f.starts_with("p:")).count());
        if round % 50 == 0 {
            let back = PartitionState::restore(&p, Input::Events, &store).unwrap();
            assert_eq!(back, s, "restored after round {round}");
        }
    }
    // 200 single changes on a 1 000-cell window: appended, never rewritten.
    assert_eq!(most_fields, 201, "the first write and 200 appended");
    let back = PartitionState::restore(&p, Input::Events, &store).unwrap();
    assert_eq!(back, s);
    // The window closes: its log fields go, nothing of it is left.
    feed(&mut s, &p, &gift("later", T0 + 48 * 60 * MIN, "u1", 1), off);
    s.emit(&p, false);
    apply(&mut store, s.checkpoint_delta(&p));
    assert!(
        !store
            .keys()
            .any(|f| f.starts_with(&format!("p:by_user:{T0}:"))),
        "{:?}",
        store.keys().collect::<Vec<_>>()
    );
    let back = PartitionState::restore(&p, Input::Events, &store).unwrap();
    assert_eq!(back, s);
}

#[test]
fn chunks_append_until_the_tail_matches_the_base_then_rewrite() {
    let mut c = Chunks::default();
    assert_eq!(c.next(10, 10), ChunkWrite::Rewrite { stale: 0 });
    assert_eq!(c.next(3, 13), ChunkWrite::Append(1));
    assert_eq!(c.next(3, 16), ChunkWrite::Append(2));
    // 3 + 3 + 4 ≥ 10: the whole set as the new base, chunks 1 and 2 gone.
    assert_eq!(c.next(4, 20), ChunkWrite::Rewrite { stale: 3 });
    assert_eq!(
        c,
        Chunks {
            n: 1,
            base: 20,
            tail: 0
        }
    );
    // Never more than MAX chunks, however slowly the set grows.
    let mut c = Chunks::default();
    c.next(1_000_000, 1_000_000);
    let mut seen = 1;
    while let ChunkWrite::Append(seq) = c.next(1, 0) {
        seen = seq + 1;
    }
    assert_eq!(seen, Chunks::MAX);
}

fn room_event(id: &str, t: i64, room: &str, started: bool) -> Event {
    use vidpulse_proto::{LiveRoomEnded, LiveRoomStarted, Room};
    let r = Some(Room {
        r#type: "game".into(),
        module_id: "m1".into(),
        ..Default::default()
    });
    Event {
        event_id: id.into(),
        event_time_ms: t,
        room_id: room.into(),
        payload: Some(if started {
            Payload::LiveRoomStarted(LiveRoomStarted { room: r })
        } else {
            Payload::LiveRoomEnded(LiveRoomEnded { room: r })
        }),
        ..Default::default()
    }
}

#[test]
fn the_room_table_forgets_ended_and_idle_rooms() {
    const HOUR: i64 = 3_600_000;
    // Longest window: 1 h, grace 1 min: an ended room is kept 61 min.
    let p = plan(GIVERS, MIN, 0).with_room_idle(3 * HOUR);
    assert_eq!(p.room_after_end_ms, HOUR + MIN);
    let mut s = PartitionState::new(&p, Input::Events);
    let mut store = HashMap::new();
    let mut ckpt = |s: &mut PartitionState| {
        let d = s.checkpoint_delta(&p);
        for f in &d.del {
            store.remove(f);
        }
        store.extend(d.set);
        store
            .keys()
            .filter(|f| f.starts_with("r:"))
            .cloned()
            .collect::<BTreeSet<_>>()
    };
    feed(&mut s, &p, &room_event("s1", T0, "ended", true), 0);
    feed(&mut s, &p, &room_event("s2", T0, "idle", true), 1);
    feed(&mut s, &p, &room_event("s3", T0, "busy", true), 2);
    feed(&mut s, &p, &room_event("e1", T0 + MIN, "ended", false), 3);
    assert_eq!(s.rooms(), 3);
    assert_eq!(ckpt(&mut s).len(), 3, "one field per room");
    // An hour later the ended room's windows are still open; gifts keep
    // "busy" seen.
    let mut off = 4;
    for h in 1..=4 {
        let e = Event {
            room_id: "busy".into(),
            ..gift(&format!("g{h}"), T0 + h * HOUR, "u1", 1)
        };
        feed(&mut s, &p, &e, off);
        off += 1;
        s.emit(&p, false);
        let fields = ckpt(&mut s);
        let rooms: Vec<&str> = fields.iter().map(|f| &f[2..]).collect();
        match h {
            1 => assert_eq!(rooms, ["busy", "ended", "idle"]),
            2 => assert_eq!(rooms, ["busy", "idle"], "ended 61 min ago: pruned"),
            3 => assert_eq!(rooms, ["busy"], "not seen for 3 h: pruned"),
            _ => assert_eq!(rooms, ["busy"]),
        }
    }
    let back = PartitionState::restore(&p, Input::Events, &store).unwrap();
    assert_eq!(back, s);
    // A room that starts again is back.
    feed(
        &mut s,
        &p,
        &room_event("s4", T0 + 4 * HOUR, "idle", true),
        off,
    );
    assert_eq!(s.rooms(), 2);
}

#[test]
fn a_room_s_times_are_checkpointed_without_its_profile() {
    let p = plan(GIVERS, MIN, 0);
    let mut s = PartitionState::new(&p, Input::Events);
    let mut store: HashMap<String, Vec<u8>> = HashMap::new();
    let mut start = room_event("s1", T0, "busy", true);
    if let Some(Payload::LiveRoomStarted(st)) = &mut start.payload {
        let r = st.room.as_mut().unwrap();
        r.title = "一个很长的直播间标题，主播今晚带来新歌首唱".into();
        r.address = "浙江省杭州市西湖区文三路".into();
    }
    feed(&mut s, &p, &start, 0);
    let d = s.checkpoint_delta(&p);
    let profile = d.set.iter().find(|(f, _)| f == "r:busy").unwrap().1.len();
    store.extend(d.set);
    for m in 1..=30 {
        let e = Event {
            room_id: "busy".into(),
            ..gift(&format!("g{m}"), T0 + m * MIN, "u1", 1)
        };
        feed(&mut s, &p, &e, m);
        let d = s.checkpoint_delta(&p);
        let room: Vec<&(String, Vec<u8>)> =
            d.set.iter().filter(|(f, _)| f.starts_with('r')).collect();
        assert_eq!(room.len(), 1, "minute {m}: one room field: {room:?}");
        assert_eq!(room[0].0, "rt:busy", "minute {m}: the times field only");
        assert!(room[0].1.len() < profile / 4, "minute {m}: {room:?}");
        for f in &d.del {
            store.remove(f);
        }
        store.extend(d.set);
    }
    // The restore takes the later times over the profile's.
    let back = PartitionState::restore(&p, Input::Events, &store).unwrap();
    assert_eq!(back, s);

    // An end (a bare profile) and a start again with the same profile change
    // its times only; a new title writes the profile and drops the times.
    let end = room_event("e1", T0 + 31 * MIN, "busy", false);
    let mut again = start.clone();
    again.event_id = "s2".into();
    again.event_time_ms = T0 + 32 * MIN;
    let mut retitled = again.clone();
    retitled.event_id = "s3".into();
    retitled.event_time_ms = T0 + 33 * MIN;
    if let Some(Payload::LiveRoomStarted(st)) = &mut retitled.payload {
        st.room.as_mut().unwrap().title = "新标题".into();
    }
    for (off, e, set, del) in [
        (40, &end, "rt:busy", None),
        (41, &again, "rt:busy", None),
        (42, &retitled, "r:busy", Some("rt:busy")),
    ] {
        feed(&mut s, &p, e, off);
        let d = s.checkpoint_delta(&p);
        let room: Vec<&str> = d
            .set
            .iter()
            .map(|(f, _)| f.as_str())
            .filter(|f| f.starts_with('r'))
            .collect();
        assert_eq!(room, [set], "{}", e.event_id);
        assert_eq!(
            d.del
                .iter()
                .find(|f| f.starts_with('r'))
                .map(String::as_str),
            del,
            "{}",
            e.event_id
        );
        for f in &d.del {
            store.remove(f);
        }
        store.extend(d.set);
        let back = PartitionState::restore(&p, Input::Events, &store).unwrap();
        assert_eq!(back, s, "restored after {}", e.event_id);
    }
}

/// The state a restart finds in `store`'s checkpoint.
fn restored(p: &Plan, store: &Store) -> PartitionState {
    if store.ckpt.is_empty() {
        PartitionState::new(p, Input::Events)
    } else {
        PartitionState::restore(p, Input::Events, &store.ckpt).unwrap()
    }
}

#[test]
fn a_store_that_went_back_to_an_older_checkpoint_replays_to_the_same_final_values() {
    let p = Plan::new(Spec::parse(ALL).unwrap(), 60_000, 3_000);
    let events = stream(600, 42);
    for every in [7, 13, 40] {
        let mut reference = Store::default();
        let mut s = PartitionState::new(&p, Input::Events);
        run(&p, &mut s, &mut reference, &events, every, None);
        for (snap, behind, crash) in [
            (50, 120, 130),
            (100, 101, 400),
            (200, 350, 351),
            (33, 500, 560),
            (300, 320, 599),
        ] {
            let mut store = Store::default();
            let mut s = PartitionState::new(&p, Input::Events);
            // Up to the snapshot the failover goes back to.
            run(&p, &mut s, &mut store, &events, every, Some(snap));
            let old = store.ckpt.clone();
            // Ahead of it, then the store holds the older hash: the rows stay,
            // the next checkpoint is refused, the state comes from the store.
            run(&p, &mut s, &mut store, &events, every, Some(behind));
            store.write(s.emit(&p, false));
            let _refused = s.checkpoint_delta(&p);
            store.ckpt = old;
            s = restored(&p, &store);
            run(&p, &mut s, &mut store, &events, every, Some(crash));
            s = restored(&p, &store);
            run(&p, &mut s, &mut store, &events, every, None);
            assert_eq!(
                store.values(),
                reference.values(),
                "every {every}, snapshot {snap}, behind at {behind}, crash at {crash}"
            );
        }
    }
}

#[test]
fn a_borrowed_group_key_finds_its_owned_cell() {
    use std::hash::BuildHasher;
    let mut cells: hashbrown::HashMap<Key, u32> = hashbrown::HashMap::new();
    let keys: [&[ValRef<'_>]; 4] = [
        &[ValRef::S("rose"), ValRef::I(3)],
        &[ValRef::S("3"), ValRef::I(3)],
        &[ValRef::I(3), ValRef::S("rose")],
        &[ValRef::S("")],
    ];
    for (n, k) in keys.iter().enumerate() {
        let owned = owned_key(k);
        assert_eq!(
            cells.hasher().hash_one(&owned),
            cells.hasher().hash_one(KeyRef(k)),
            "{k:?}"
        );
        cells.insert(owned, n as u32);
    }
    for (n, k) in keys.iter().enumerate() {
        assert_eq!(cells.get(&KeyRef(k)), Some(&(n as u32)), "{k:?}");
    }
    // Text "3" and number 3 are different keys; so are other lengths.
    assert_eq!(cells.get(&KeyRef(&[ValRef::S("3"), ValRef::S("3")])), None);
    assert_eq!(cells.get(&KeyRef(&[ValRef::S("rose")])), None);
}

/// An emission's rows in a fixed order (a pane's cells come out in hash
/// order).
fn sorted(mut e: Emission) -> Emission {
    e.rows
        .sort_by(|a, b| (a.metric, a.pane_start, &a.key).cmp(&(b.metric, b.pane_start, &b.key)));
    e
}

#[test]
fn a_state_without_checkpoints_emits_the_same_and_keeps_less() {
    let p = plan(PLAYS, 30_000, 5_000);
    let mut tracked = PartitionState::new(&p, Input::Events);
    let mut batch = PartitionState::new(&p, Input::Events).without_checkpoints();
    let mut events: Vec<Event> = (0..200)
        .map(|i| {
            let t = T0 + i * 1_000;
            play(
                &format!("e{i}"),
                t,
                &format!("v{}", i % 3),
                &format!("u{}", i % 17),
                Some(i),
            )
        })
        .collect();
    events.push(play("e5", T0 + 5_000, "v2", "u1", Some(1))); // a duplicate
    events.push(play("late", T0, "v1", "u99", None)); // late by then
    for (offset, e) in events.iter().enumerate() {
        let offset = offset as i64;
        assert_eq!(
            feed(&mut tracked, &p, e, offset),
            feed(&mut batch, &p, e, offset)
        );
        if offset % 50 == 49 {
            assert_eq!(
                sorted(tracked.emit(&p, false)),
                sorted(batch.emit(&p, false))
            );
        }
    }
    assert_eq!(sorted(tracked.emit(&p, true)), sorted(batch.emit(&p, true)));
    assert!(
        batch.state_bytes() < tracked.state_bytes(),
        "{} vs {}",
        batch.state_bytes(),
        tracked.state_bytes()
    );
}

#[test]
#[should_panic(expected = "without_checkpoints")]
fn a_state_without_checkpoints_refuses_to_checkpoint() {
    let p = plan(PLAYS, 30_000, 5_000);
    let mut s = PartitionState::new(&p, Input::Events).without_checkpoints();
    feed(&mut s, &p, &play("a", T0, "v1", "u1", None), 0);
    s.checkpoint_delta(&p);
}
