//! Final values in memory (`--dry-run`), computed from the rows the
//! partitions emitted exactly as the `<table>_final` SQL computes them from
//! the stored rows (crates/query/src/sql.rs), and shaped like
//! `vidpulse query --format json`: counts and sums summed over partitions,
//! min of mins and max of maxes, distinct counts as the size of the union of
//! the partitions' value sets, hopping windows as sums of their panes,
//! levels as running sums of per-window deltas, top-N ranked after summing
//! (ties by member ascending), leaderboards as sums of partials ranked the
//! same way, logs one row per event id.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;
use vidpulse_aggregator::engine::Agg;
use vidpulse_aggregator::record::{FieldType, Val};
use vidpulse_aggregator::spec::{Leaderboard, Log, Metric, Spec};
use vidpulse_query::read::{Row, Target, rfc3339};

use crate::partitions::Emitted;

/// The final rows of `target`, in the order `vidpulse query` prints them.
pub fn rows(spec: &Spec, emitted: &[Emitted], target: &Target<'_>) -> Vec<Row> {
    match target {
        Target::Metric(m) => {
            let Some(i) = spec.metrics.iter().position(|x| x.name == m.name) else {
                return Vec::new();
            };
            metric_rows(
                m,
                emitted
                    .iter()
                    .flat_map(|e| &e.emission.rows)
                    .filter(|r| r.metric == i)
                    .map(|r| (r.pane_start, &r.key, &r.aggs)),
            )
        }
        Target::Log(l) => {
            let Some(i) = spec.logs.iter().position(|x| x.name == l.name) else {
                return Vec::new();
            };
            log_rows(l, i, emitted)
        }
        Target::Board(b) => {
            let Some(i) = spec.leaderboards.iter().position(|x| x.name == b.name) else {
                return Vec::new();
            };
            board_rows(b, i, emitted)
        }
    }
}

/// An aggregate summed over partitions.
#[derive(Clone, Debug)]
enum Acc {
    Count(u64),
    Sum(i64),
    Min(Option<i64>),
    Max(Option<i64>),
    Distinct(BTreeSet<Box<str>>),
}

impl Acc {
    fn of(a: &Agg) -> Acc {
        match a {
            Agg::Count(n) => Acc::Count(*n),
            Agg::Sum(s) | Agg::Level(s) => Acc::Sum(*s),
            Agg::Min(x) => Acc::Min(*x),
            Agg::Max(x) => Acc::Max(*x),
            Agg::Distinct(set) => Acc::Distinct(set.clone()),
        }
    }

    fn add(&mut self, a: &Agg) {
        match (self, a) {
            (Acc::Count(n), Agg::Count(m)) => *n += m,
            (Acc::Sum(s), Agg::Sum(t) | Agg::Level(t)) => *s = s.saturating_add(*t),
            (Acc::Min(x), Agg::Min(y)) => *x = min_opt(*x, *y),
            (Acc::Max(x), Agg::Max(y)) => *x = max_opt(*x, *y),
            (Acc::Distinct(s), Agg::Distinct(t)) => s.extend(t.iter().cloned()),
            _ => {}
        }
    }

    fn merge(&mut self, o: &Acc) {
        match (self, o) {
            (Acc::Count(n), Acc::Count(m)) => *n += m,
            (Acc::Sum(s), Acc::Sum(t)) => *s = s.saturating_add(*t),
            (Acc::Min(x), Acc::Min(y)) => *x = min_opt(*x, *y),
            (Acc::Max(x), Acc::Max(y)) => *x = max_opt(*x, *y),
            (Acc::Distinct(s), Acc::Distinct(t)) => s.extend(t.iter().cloned()),
            _ => {}
        }
    }

    /// The value as ClickHouse answers it (JSON, 64-bit integers unquoted).
    fn json(&self) -> Value {
        match self {
            Acc::Count(n) => Value::from(*n),
            Acc::Sum(s) => Value::from(*s),
            Acc::Min(x) | Acc::Max(x) => x.map_or(Value::Null, Value::from),
            Acc::Distinct(s) => Value::from(s.len() as u64),
        }
    }

    /// Ordering key of a top-N `by` aggregate (count, sum, min or max).
    fn rank_key(&self) -> i128 {
        match self {
            Acc::Count(n) => i128::from(*n),
            Acc::Sum(s) => i128::from(*s),
            Acc::Min(x) | Acc::Max(x) => x.map_or(i128::MIN, i128::from),
            Acc::Distinct(s) => s.len() as i128,
        }
    }
}

fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn val_json(v: &Val, ty: FieldType) -> Value {
    match (v, ty) {
        (Val::S(s), _) => Value::from(s.as_ref()),
        (Val::I(i), FieldType::Str) => Value::from(i.to_string()),
        (Val::I(i), _) => Value::from(*i),
    }
}

type Cells = BTreeMap<(i64, Box<[Val]>), Vec<Acc>>;

fn metric_rows<'a>(
    m: &Metric,
    rows: impl Iterator<Item = (i64, &'a Box<[Val]>, &'a Vec<Agg>)>,
) -> Vec<Row> {
    // (pane, group) → aggregates over partitions.
    let mut panes: Cells = BTreeMap::new();
    for (pane, key, aggs) in rows {
        match panes.get_mut(&(pane, key.clone())) {
            Some(acc) => acc.iter_mut().zip(aggs).for_each(|(a, b)| a.add(b)),
            None => {
                panes.insert((pane, key.clone()), aggs.iter().map(Acc::of).collect());
            }
        }
    }
    // Hopping: a window is the union of its panes.
    let windows: Cells = if m.window.is_hopping() {
        let n = m.window.size_ms / m.window.slide_ms;
        let mut w: Cells = BTreeMap::new();
        for ((pane, key), acc) in &panes {
            for i in 0..n {
                let ws = pane - i * m.window.slide_ms;
                match w.get_mut(&(ws, key.clone())) {
                    Some(x) => x.iter_mut().zip(acc).for_each(|(a, b)| a.merge(b)),
                    None => {
                        w.insert((ws, key.clone()), acc.clone());
                    }
                }
            }
        }
        w
    } else {
        panes
    };
    // Levels: running sums over each group's windows.
    /// A group's windows: (window start, accumulators).
    type GroupWindows = Vec<(i64, Vec<Acc>)>;
    let windows = if m.is_level() {
        let mut running: HashMap<Box<[Val]>, Vec<i64>> = HashMap::new();
        let mut by_group: BTreeMap<Box<[Val]>, GroupWindows> = BTreeMap::new();
        for ((ws, key), acc) in windows {
            by_group.entry(key).or_default().push((ws, acc));
        }
        let mut out: Cells = BTreeMap::new();
        for (key, list) in by_group {
            let sums = running
                .entry(key.clone())
                .or_insert_with(|| vec![0; m.aggregates.len()]);
            for (ws, acc) in list {
                let lv: Vec<Acc> = acc
                    .iter()
                    .zip(sums.iter_mut())
                    .map(|(a, s)| {
                        if let Acc::Sum(d) = a {
                            *s += d;
                        }
                        Acc::Sum(*s)
                    })
                    .collect();
                out.insert((ws, key.clone()), lv);
            }
        }
        out
    } else {
        windows
    };
    let row_of = |ws: i64, key: &[Val], acc: &[Acc], rank: Option<u64>| -> Row {
        let mut row: Row = vec![("window_start".into(), Value::from(rfc3339(ws, false)))];
        if let Some(r) = rank {
            row.push(("rank".into(), Value::from(r)));
        }
        for (g, v) in m.group_by.iter().zip(key) {
            row.push((g.name.clone(), val_json(v, g.ty())));
        }
        for (a, v) in m.aggregates.iter().zip(acc) {
            row.push((a.name.clone(), v.json()));
        }
        row
    };
    let Some(top) = &m.top else {
        return windows
            .iter()
            .map(|((ws, key), acc)| row_of(*ws, key, acc, None))
            .collect();
    };
    // Top-N within (window, other group columns).
    type Ranked<'a> = BTreeMap<(i64, Vec<&'a Val>), Vec<(&'a Box<[Val]>, &'a Vec<Acc>)>>;
    let mut groups: Ranked<'_> = BTreeMap::new();
    for ((ws, key), acc) in &windows {
        let others: Vec<&Val> = key
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != top.field)
            .map(|(_, v)| v)
            .collect();
        groups.entry((*ws, others)).or_default().push((key, acc));
    }
    let mut out = Vec::new();
    for ((ws, _), mut members) in groups {
        members.sort_by(|a, b| {
            b.1[top.by]
                .rank_key()
                .cmp(&a.1[top.by].rank_key())
                .then_with(|| a.0[top.field].cmp(&b.0[top.field]))
        });
        for (i, (key, acc)) in members.into_iter().take(top.n).enumerate() {
            out.push(row_of(ws, key, acc, Some(i as u64 + 1)));
        }
    }
    out
}

fn log_rows(l: &Log, i: usize, emitted: &[Emitted]) -> Vec<Row> {
    // Keyed like the table (event minute, event id): the newest version stays.
    let mut latest: BTreeMap<(i64, &str), (u64, &vidpulse_aggregator::engine::LogRow)> =
        BTreeMap::new();
    for r in emitted
        .iter()
        .flat_map(|e| &e.emission.logs)
        .filter(|r| r.log == i)
    {
        let k = (r.event_time_ms.div_euclid(60_000), r.event_id.as_ref());
        if latest.get(&k).is_none_or(|(v, _)| r.version > *v) {
            latest.insert(k, (r.version, r));
        }
    }
    let mut rows: Vec<&vidpulse_aggregator::engine::LogRow> =
        latest.into_values().map(|(_, r)| r).collect();
    rows.sort_by(|a, b| (a.event_time_ms, &a.event_id).cmp(&(b.event_time_ms, &b.event_id)));
    rows.into_iter()
        .map(|r| {
            let mut row: Row = vec![
                (
                    "event_time".into(),
                    Value::from(rfc3339(r.event_time_ms, true)),
                ),
                ("event_id".into(), Value::from(r.event_id.as_ref())),
                ("kind".into(), Value::from(r.kind)),
            ];
            for (c, v) in l.columns.iter().zip(&r.columns) {
                let v = match (c.field.ty(), v) {
                    (FieldType::Time, Val::I(0)) => Value::Null,
                    (FieldType::Time, Val::I(ms)) => Value::from(rfc3339(*ms, true)),
                    (ty, v) => val_json(v, ty),
                };
                row.push((c.name.clone(), v));
            }
            row
        })
        .collect()
}

fn board_rows(b: &Leaderboard, i: usize, emitted: &[Emitted]) -> Vec<Row> {
    // Window → member → (score, whether any partial moved it): a member
    // whose partials are all 0 never enters the sorted set.
    let mut sets: BTreeMap<i64, HashMap<&str, (i64, bool)>> = BTreeMap::new();
    for r in emitted
        .iter()
        .flat_map(|e| &e.emission.boards)
        .filter(|r| r.board == i)
    {
        let m = sets
            .entry(r.window_start)
            .or_default()
            .entry(r.member.as_ref())
            .or_insert((0, false));
        m.0 += r.value;
        m.1 |= r.value != 0;
    }
    let mut out = Vec::new();
    for (ws, members) in sets {
        let mut members: Vec<(&str, i64)> = members
            .into_iter()
            .filter(|(_, (_, moved))| *moved)
            .map(|(m, (s, _))| (m, s))
            .collect();
        members.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        for (rank, (member, score)) in members.into_iter().enumerate() {
            out.push(vec![
                ("window_start".into(), Value::from(rfc3339(ws, false))),
                ("rank".into(), Value::from(rank as u64 + 1)),
                (b.member.name.clone(), Value::from(member)),
                (b.score_name.clone(), Value::from(score)),
            ]);
        }
    }
    out
}
