//! The final-value SQL of metrics and logs, shared by the `<table>_final`
//! views and `vidpulse query`: counts and sums summed over partitions, min of
//! mins, max of maxes, `uniqExactArray` over per-partition value sets (never
//! a sum of distinct counts), top-N after summing per-member partials, levels
//! as running sums of per-window deltas, hopping windows as unions of panes.

use crate::clickhouse::{ident, literal};
use crate::field::FieldType;
use crate::generation::{self, Kind};
use crate::read::{Filters, QueryError, Target};
use crate::rollup::{self, Rollup};
use crate::schema::Tables;
use crate::spec::{AggFn, GroupBy, Log, Metric, Window};
use crate::zone::Zone;

/// SQL of the final values, and how to read its columns.
/// How a result column is converted for output.
#[derive(Clone, Debug)]
pub(crate) enum Out {
    /// Epoch seconds → RFC 3339.
    Window,
    /// Epoch milliseconds → RFC 3339 with milliseconds (0 → null).
    TimeMs,
    Plain,
}

#[derive(Clone, Debug)]
pub struct FinalQuery {
    pub sql: String,
    /// (output name, SQL alias, conversion)
    pub(crate) cols: Vec<(String, String, Out)>,
    /// Top metrics: rank inside these aliases' groups (ordered already).
    pub(crate) rank_within: Option<Vec<String>>,
    /// Filters applied after ranking: (output name, value as text).
    pub(crate) post: Vec<(String, String)>,
    /// A rollup's rows: how to fill `window_start` and `window_end`.
    pub(crate) rollup: Option<RollupPlan>,
}

/// How a rollup's rows get their `window_start` / `window_end`.
#[derive(Clone, Debug)]
pub(crate) struct RollupPlan {
    pub rollup: Rollup,
    pub zone: Option<Zone>,
    /// The stored pane, to end a whole-range rollup after its last window.
    pub pane: Window,
    /// `lo`, `hi`: the first and last pane start (seconds) in the range,
    /// for a whole-range rollup without `from` or `to`.
    pub span_sql: String,
}

fn secs_ceil(ms: i64) -> i64 {
    ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) != 0)
}

fn typed_literal(g: &GroupBy, v: &str) -> Result<String, QueryError> {
    match g.ty() {
        FieldType::Str => Ok(literal(v)),
        _ => v.parse::<i64>().map(|i| i.to_string()).map_err(|_| {
            QueryError::Usage(format!("--where {}: {v:?} is not a whole number", g.name))
        }),
    }
}

fn agg_expr(f: &AggFn, col: &str) -> String {
    match f {
        AggFn::Count | AggFn::Sum(_) | AggFn::Level { .. } => format!("sum({col})"),
        AggFn::Min(_) => format!("min({col})"),
        AggFn::Max(_) => format!("max({col})"),
        AggFn::Distinct(_) => format!("uniqExactArray({col})"),
    }
}

pub(crate) fn unknown_where(name: &str, k: &str, valid: &[String]) -> QueryError {
    QueryError::Usage(format!(
        "--where {k}: {name} has no such column; filter on {}",
        if valid.is_empty() {
            "nothing (it has no group-by columns)".to_owned()
        } else {
            valid.join(", ")
        }
    ))
}

/// Builds the final-value SQL of a metric or log. Leaderboards live in
/// Redis: use [`run`].
pub fn final_sql(t: &Tables, target: &Target<'_>, f: &Filters) -> Result<FinalQuery, QueryError> {
    match target {
        Target::Metric(m) => metric_sql(t, m, f),
        Target::Log(l) => log_sql(t, l, f),
        Target::Board(b) => Err(QueryError::Usage(format!(
            "{} is a leaderboard (Redis), not a table",
            b.name
        ))),
    }
}

/// The SQL of a `<table>_final` view: the final values under their result
/// column names (`window_start` as DateTime; a top metric's rows come in
/// rank order without a rank column).
pub fn view_sql(t: &Tables, target: &Target<'_>) -> Result<String, QueryError> {
    let q = final_sql(t, target, &Filters::default())?;
    let sel: Vec<String> = q
        .cols
        .iter()
        .map(|(name, alias, conv)| match conv {
            Out::Window => format!("toDateTime({alias}) AS {}", ident(name)),
            _ => format!("{alias} AS {}", ident(name)),
        })
        .collect();
    Ok(format!("SELECT {} FROM ({})", sel.join(", "), q.sql))
}

/// Filters on group columns: SQL conditions pushed down, and the
/// conditions on the ranked member of a top metric, applied after ranking.
type Conds = (Vec<String>, Vec<(String, String)>);

fn group_conds(m: &Metric, f: &Filters) -> Result<Conds, QueryError> {
    let member = m.top.as_ref().map(|tp| tp.field);
    let mut conds: Vec<String> = Vec::new();
    let mut post = Vec::new();
    let valid: Vec<String> = m.group_by.iter().map(|g| g.name.clone()).collect();
    for (k, v) in &f.wheres {
        let i = m
            .group_by
            .iter()
            .position(|g| &g.name == k)
            .ok_or_else(|| unknown_where(&m.name, k, &valid))?;
        let lit = typed_literal(&m.group_by[i], v)?;
        if Some(i) == member {
            post.push((k.clone(), v.clone()));
        } else {
            conds.push(format!("{} = {lit}", ident(k)));
        }
    }
    Ok((conds, post))
}

/// The column aliases of a metric's queries: `_g…` per group-by column,
/// `_c…` per aggregate, and the select items naming the group columns.
struct Aliases {
    g: Vec<String>,
    c: Vec<String>,
    groups_sel: Vec<String>,
}

impl Aliases {
    fn of(m: &Metric) -> Aliases {
        let g: Vec<String> = (0..m.group_by.len()).map(|i| format!("_g{i}")).collect();
        let c = (0..m.aggregates.len()).map(|i| format!("_c{i}")).collect();
        let groups_sel = m
            .group_by
            .iter()
            .zip(&g)
            .map(|(g, a)| format!("{} AS {a}", ident(&g.name)))
            .collect();
        Aliases { g, c, groups_sel }
    }
}

/// ` WHERE a AND b…`, or nothing without conditions.
fn where_of(conds: &[String]) -> String {
    if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    }
}

/// The conditions on `window_start` of windows starting in `[from, to)`.
fn window_range(from_s: Option<i64>, to_s: Option<i64>) -> Vec<String> {
    let mut range = Vec::new();
    if let Some(fr) = from_s {
        range.push(format!("window_start >= toDateTime({})", fr.max(0)));
    }
    if let Some(to) = to_s {
        range.push(format!("window_start < toDateTime({})", to.max(0)));
    }
    range
}

/// The per-window deltas of a level metric that [`level_rows`] cumulates:
/// `_ws`, `_g…`, `_c…` for the windows in `[from, to)`, and, when the range
/// has a start, one row per group at `_ws = from − 1` holding the sum of
/// every window before it. The level at a window in the range is then the
/// cumulated sum from that row on, and the windows before `from` are summed
/// in one aggregation instead of being gathered into each group's array
/// (the filter on `_ws` drops the row once cumulated).
fn level_deltas(
    table: &str,
    m: &Metric,
    conds: &[String],
    from_s: Option<i64>,
    to_s: Option<i64>,
) -> String {
    let names = Aliases::of(m);
    let sums: Vec<String> = m
        .aggregates
        .iter()
        .zip(&names.c)
        .map(|(a, c)| format!("sum({}) AS {c}", ident(&a.name)))
        .collect();
    let select = |ws: &str, range: &[String], by_window: bool| {
        let mut sel = vec![format!("{ws} AS _ws")];
        sel.extend(names.groups_sel.iter().cloned());
        sel.extend(sums.iter().cloned());
        let mut all = conds.to_vec();
        all.extend(range.iter().cloned());
        let mut by: Vec<String> = by_window.then(|| "_ws".to_owned()).into_iter().collect();
        by.extend(names.g.iter().cloned());
        let group_by = if by.is_empty() {
            String::new()
        } else {
            format!(" GROUP BY {}", by.join(", "))
        };
        format!(
            "SELECT {} FROM {table} FINAL{}{group_by}",
            sel.join(", "),
            where_of(&all)
        )
    };
    let from = from_s.filter(|&fr| fr > 0);
    let windows = select("toUInt32(window_start)", &window_range(from, to_s), true);
    match from {
        Some(fr) => format!(
            "{windows} UNION ALL {}",
            select(
                &format!("toUInt32({})", fr - 1),
                &[format!("window_start < toDateTime({fr})")],
                false
            )
        ),
        None => windows,
    }
}

/// The running levels of a level metric, one row per window and group
/// (`_ws`, `_g…`, `_c…`), cumulated from the first window, then restricted
/// to `where_time`; no ORDER BY.
fn level_rows(base: &str, g_alias: &[String], c_alias: &[String], where_time: &str) -> String {
    let tuple = {
        let mut v = vec!["_ws".to_owned()];
        v.extend(c_alias.iter().cloned());
        v.join(", ")
    };
    let mut lv = vec!["arrayMap(x -> tupleElement(x, 1), _arr) AS _wss".to_owned()];
    for (i, _) in c_alias.iter().enumerate() {
        lv.push(format!(
            "arrayCumSum(arrayMap(x -> tupleElement(x, {}), _arr)) AS _l{i}",
            i + 2
        ));
    }
    let mut sel = g_alias.to_vec();
    sel.push(format!("arraySort(groupArray(({tuple}))) AS _arr"));
    sel.extend(lv);
    let group_by = if g_alias.is_empty() {
        String::new()
    } else {
        format!(" GROUP BY {}", g_alias.join(", "))
    };
    let joins: Vec<String> = std::iter::once("_wss AS _ws".to_owned())
        .chain(
            c_alias
                .iter()
                .enumerate()
                .map(|(i, c)| format!("_l{i} AS {c}")),
        )
        .collect();
    let mut out_sel = vec!["_ws".to_owned()];
    out_sel.extend(g_alias.iter().cloned());
    out_sel.extend(c_alias.iter().cloned());
    format!(
        "SELECT {} FROM (SELECT {} FROM ({base}){group_by}) ARRAY JOIN {}{where_time}",
        out_sel.join(", "),
        sel.join(", "),
        joins.join(", ")
    )
}

fn metric_sql(t: &Tables, m: &Metric, f: &Filters) -> Result<FinalQuery, QueryError> {
    if let Some(r) = f.rollup {
        return rollup_sql(t, m, f, r);
    }
    let table = t.qualified(&m.name);
    let Aliases {
        g: g_alias,
        c: c_alias,
        groups_sel,
    } = Aliases::of(m);

    let (mut conds, post) = group_conds(m, f)?;
    conds.insert(0, generation::current_cond(t, Kind::Metric, &m.name));
    let from_s = f.from_ms.map(secs_ceil);
    let to_s = f.to_ms.map(secs_ceil);
    let level = m.is_level();
    let hopping = m.window.is_hopping();

    let mut base_conds = conds.clone();
    if !level {
        // A hopping window starting at W holds the panes W ..= W + span:
        // windows starting in [from, to) need the panes in [from, to + span).
        let span_s = (m.window.size_ms - m.window.slide_ms) / 1000;
        if let Some(fr) = from_s {
            base_conds.push(format!("window_start >= toDateTime({})", fr.max(0)));
        }
        if let Some(to) = to_s {
            base_conds.push(format!(
                "window_start < toDateTime({})",
                (to + span_s).max(0)
            ));
        }
    }
    let where_base = where_of(&base_conds);
    let group_list = |extra: &str| -> String {
        let mut v = vec![extra.to_owned()];
        v.extend(g_alias.iter().cloned());
        v.join(", ")
    };
    let mut time_conds = Vec::new();
    if let Some(fr) = from_s {
        time_conds.push(format!("_ws >= {fr}"));
    }
    if let Some(to) = to_s {
        time_conds.push(format!("_ws < {to}"));
    }
    let where_time = where_of(&time_conds);

    let base = if level {
        level_deltas(&table, m, &conds, from_s, to_s)
    } else if hopping {
        let raw_sel: Vec<String> = m
            .aggregates
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{} AS _r{i}", ident(&a.name)))
            .collect();
        let mut inner_sel = vec!["toUInt32(window_start) AS _p".to_owned()];
        inner_sel.extend(groups_sel.iter().cloned());
        inner_sel.extend(raw_sel);
        inner_sel.push(format!(
            "range({}) AS _r",
            m.window.size_ms / m.window.slide_ms
        ));
        let aggs: Vec<String> = m
            .aggregates
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{} AS {}", agg_expr(&a.func, &format!("_r{i}")), c_alias[i]))
            .collect();
        let mut mid_sel = vec![format!(
            "toInt64(_p) - toInt64(_i) * {} AS _ws",
            m.window.slide_ms / 1000
        )];
        mid_sel.extend(g_alias.iter().cloned());
        mid_sel.extend(aggs);
        format!(
            "SELECT * FROM (SELECT {} FROM (SELECT {} FROM {table} FINAL{where_base}) ARRAY JOIN _r AS _i GROUP BY {}){where_time}",
            mid_sel.join(", "),
            inner_sel.join(", "),
            group_list("_ws"),
        )
    } else {
        let aggs: Vec<String> = m
            .aggregates
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{} AS {}", agg_expr(&a.func, &ident(&a.name)), c_alias[i]))
            .collect();
        let mut sel = vec!["toUInt32(window_start) AS _ws".to_owned()];
        sel.extend(groups_sel.iter().cloned());
        sel.extend(aggs);
        format!(
            "SELECT {} FROM {table} FINAL{where_base} GROUP BY {}",
            sel.join(", "),
            group_list("_ws")
        )
    };

    let order = group_list("_ws");
    let sql = if level {
        format!(
            "{} ORDER BY {order}",
            level_rows(&base, &g_alias, &c_alias, &where_time)
        )
    } else if let Some(tp) = &m.top {
        let others: Vec<String> = g_alias
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != tp.field)
            .map(|(_, a)| a.clone())
            .collect();
        let mut ord = vec!["_ws".to_owned()];
        ord.extend(others.iter().cloned());
        let mut by = ord.clone();
        ord.push(format!("{} DESC", c_alias[tp.by]));
        ord.push(format!("{} ASC", g_alias[tp.field]));
        format!(
            "SELECT * FROM ({base}) ORDER BY {} LIMIT {} BY {}",
            ord.join(", "),
            tp.n,
            std::mem::take(&mut by).join(", ")
        )
    } else {
        format!("{base} ORDER BY {order}")
    };

    let mut cols = vec![("window_start".to_owned(), "_ws".to_owned(), Out::Window)];
    for (g, a) in m.group_by.iter().zip(&g_alias) {
        cols.push((g.name.clone(), a.clone(), Out::Plain));
    }
    for (ag, a) in m.aggregates.iter().zip(&c_alias) {
        cols.push((ag.name.clone(), a.clone(), Out::Plain));
    }
    let rank_within = m.top.as_ref().map(|tp| {
        let mut v = vec!["_ws".to_owned()];
        v.extend(
            g_alias
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != tp.field)
                .map(|(_, a)| a.clone()),
        );
        v
    });
    Ok(FinalQuery {
        sql,
        cols,
        rank_within,
        post,
        rollup: None,
    })
}

/// A rollup of a metric (see [`crate::rollup`]): one row per bucket and
/// group, over the panes starting in `[from, to)`.
fn rollup_sql(t: &Tables, m: &Metric, f: &Filters, r: Rollup) -> Result<FinalQuery, QueryError> {
    let target = Target::Metric(m);
    rollup::check(&target, r, f.zone, f.from_ms, f.to_ms)?;
    let zone = rollup::bucket_zone(&target, f.zone);
    let table = t.qualified(&m.name);
    let Aliases {
        g: g_alias,
        c: c_alias,
        groups_sel,
    } = Aliases::of(m);
    let (mut conds, post) = group_conds(m, f)?;
    conds.insert(0, generation::current_cond(t, Kind::Metric, &m.name));
    let from_s = f.from_ms.map(secs_ceil);
    let to_s = f.to_ms.map(secs_ceil);
    let range = window_range(from_s, to_s);
    let group_list = {
        let mut v = vec!["_b".to_owned()];
        v.extend(g_alias.iter().cloned());
        v.join(", ")
    };
    let sql = if m.is_level() {
        // Levels run from the first window on: the windows before the range
        // summed into one row per group, those in it cumulated after it,
        // then each bucket's last level.
        let base = level_deltas(&table, m, &conds, from_s, to_s);
        let mut time = Vec::new();
        if let Some(fr) = from_s {
            time.push(format!("_ws >= {fr}"));
        }
        if let Some(to) = to_s {
            time.push(format!("_ws < {to}"));
        }
        let rows = level_rows(&base, &g_alias, &c_alias, &where_of(&time));
        let mut sel = vec![format!(
            "{} AS _b",
            rollup::bucket_sql(r, zone, "toDateTime(_ws)")
        )];
        sel.extend(g_alias.iter().cloned());
        sel.extend(c_alias.iter().map(|c| format!("argMax({c}, _ws) AS {c}")));
        format!(
            "SELECT {} FROM ({rows}) GROUP BY {group_list} ORDER BY {group_list}",
            sel.join(", ")
        )
    } else {
        let mut sel = vec![format!(
            "{} AS _b",
            rollup::bucket_sql(r, zone, "window_start")
        )];
        sel.extend(groups_sel.iter().cloned());
        sel.extend(
            m.aggregates
                .iter()
                .enumerate()
                .map(|(i, a)| format!("{} AS {}", agg_expr(&a.func, &ident(&a.name)), c_alias[i])),
        );
        let mut all = conds.clone();
        all.extend(range.iter().cloned());
        let grouped = format!(
            "SELECT {} FROM {table} FINAL{} GROUP BY {group_list}",
            sel.join(", "),
            where_of(&all)
        );
        match &m.top {
            Some(tp) => {
                let mut by = vec!["_b".to_owned()];
                by.extend(
                    g_alias
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != tp.field)
                        .map(|(_, a)| a.clone()),
                );
                let mut ord = by.clone();
                ord.push(format!("{} DESC", c_alias[tp.by]));
                ord.push(format!("{} ASC", g_alias[tp.field]));
                // One bucket and no other group: a plain LIMIT, which
                // ClickHouse answers with a partial sort (a LIMIT BY sorts
                // every group: twice the time for a day's users).
                let limit = if r == Rollup::All && by.len() == 1 {
                    format!("LIMIT {}", tp.n)
                } else {
                    format!("LIMIT {} BY {}", tp.n, by.join(", "))
                };
                format!(
                    "SELECT * FROM ({grouped}) ORDER BY {} {limit}",
                    ord.join(", "),
                )
            }
            None => format!("{grouped} ORDER BY {group_list}"),
        }
    };
    let mut span_conds = conds;
    span_conds.extend(range);
    let span_sql = format!(
        "SELECT toUInt32(min(window_start)) AS lo, toUInt32(max(window_start)) AS hi FROM {table}{}",
        where_of(&span_conds)
    );
    let mut cols = vec![("window_start".to_owned(), "_b".to_owned(), Out::Window)];
    for (g, a) in m.group_by.iter().zip(&g_alias) {
        cols.push((g.name.clone(), a.clone(), Out::Plain));
    }
    for (ag, a) in m.aggregates.iter().zip(&c_alias) {
        cols.push((ag.name.clone(), a.clone(), Out::Plain));
    }
    let rank_within = m.top.as_ref().map(|tp| {
        let mut v = vec!["_b".to_owned()];
        v.extend(
            g_alias
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != tp.field)
                .map(|(_, a)| a.clone()),
        );
        v
    });
    let pane = rollup::pane_of(&target).unwrap_or(m.window);
    Ok(FinalQuery {
        sql,
        cols,
        rank_within,
        post,
        rollup: Some(RollupPlan {
            rollup: r,
            zone,
            pane,
            span_sql,
        }),
    })
}

fn log_sql(t: &Tables, l: &Log, f: &Filters) -> Result<FinalQuery, QueryError> {
    let table = t.qualified(&l.name);
    if f.rollup.is_some() {
        return Err(QueryError::Usage(format!(
            "--rollup: {} is a log (one row per event), it has no windows to roll up",
            l.name
        )));
    }
    let mut conds = vec![generation::current_cond(t, Kind::Log, &l.name)];
    if let Some(fr) = f.from_ms {
        conds.push(format!(
            "event_minute >= toDateTime({})",
            (fr.div_euclid(60_000) * 60).max(0)
        ));
        conds.push(format!("event_time >= {fr}"));
    }
    if let Some(to) = f.to_ms {
        conds.push(format!("event_time < {to}"));
    }
    let mut valid = vec!["event_id".to_owned(), "kind".to_owned()];
    valid.extend(l.columns.iter().map(|c| c.name.clone()));
    for (k, v) in &f.wheres {
        match l.columns.iter().find(|c| &c.name == k) {
            Some(c) => conds.push(format!("{} = {}", ident(k), typed_literal(c, v)?)),
            None if k == "event_id" || k == "kind" => {
                conds.push(format!("{} = {}", ident(k), literal(v)))
            }
            None => return Err(unknown_where(&l.name, k, &valid)),
        }
    }
    let mut sel = vec![
        "event_time AS _t".to_owned(),
        "event_id AS _id".to_owned(),
        "kind AS _k".to_owned(),
    ];
    let mut cols = vec![
        ("event_time".to_owned(), "_t".to_owned(), Out::TimeMs),
        ("event_id".to_owned(), "_id".to_owned(), Out::Plain),
        ("kind".to_owned(), "_k".to_owned(), Out::Plain),
    ];
    for (i, c) in l.columns.iter().enumerate() {
        sel.push(format!("{} AS _g{i}", ident(&c.name)));
        let out = if c.field.ty() == FieldType::Time {
            Out::TimeMs
        } else {
            Out::Plain
        };
        cols.push((c.name.clone(), format!("_g{i}"), out));
    }
    let where_ = where_of(&conds);
    // Through a Distributed table, ClickHouse 18.16 cannot apply `FINAL`
    // when the columns it merges by (the key, the version) are not selected
    // at the same level ("Cannot find column event_minute in source
    // stream"): on a cluster, `FINAL` reads whole rows in a subquery.
    let from = if t.cluster.is_some() {
        format!("(SELECT * FROM {table} FINAL{where_})")
    } else {
        format!("{table} FINAL{where_}")
    };
    Ok(FinalQuery {
        sql: format!("SELECT {} FROM {from} ORDER BY _t, _id", sel.join(", ")),
        cols,
        rank_within: None,
        post: Vec::new(),
        rollup: None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::spec::Spec;
    use crate::zone::parse_zone;

    fn rollup_of(name: &str, r: Rollup, zone: Option<&str>, from: Option<i64>) -> FinalQuery {
        let spec = Spec::default_spec();
        let t = Tables::new("vidpulse", "p.");
        let f = Filters {
            from_ms: from,
            rollup: Some(r),
            zone: zone.map(|z| parse_zone(z).unwrap()),
            ..Filters::default()
        };
        final_sql(&t, &Target::find(&spec, name).unwrap(), &f).unwrap()
    }

    #[test]
    fn a_hopping_window_near_the_range_end_keeps_all_its_panes() {
        // gifts_6h windows starting in [10:00, 10:00:01): the one window of
        // 10:00 to 16:00 needs its panes up to 15:59, not only 10:00's.
        let spec = Spec::default_spec();
        let t = Tables::new("vidpulse", "");
        let from = 1_629_108_000_000; // 2021-08-16T10:00:00Z
        let f = Filters {
            from_ms: Some(from),
            to_ms: Some(from + 1_000),
            ..Filters::default()
        };
        let q = final_sql(&t, &Target::find(&spec, "gifts_6h").unwrap(), &f).unwrap();
        let (fr, to) = (from / 1000, from / 1000 + 1);
        assert!(
            q.sql.contains(&format!("window_start >= toDateTime({fr})"))
                && q.sql.contains(&format!(
                    "window_start < toDateTime({})",
                    to + 6 * 3600 - 60
                ))
                && q.sql.contains(&format!("_ws >= {fr} AND _ws < {to}")),
            "{}",
            q.sql
        );
    }

    #[test]
    fn rollups_sum_unite_and_rank_on_totals() {
        let q = rollup_of(
            "gifts_by_type_1m",
            Rollup::All,
            None,
            Some(1_629_043_200_000),
        );
        if std::env::var_os("VIDPULSE_PRINT_SQL").is_some() {
            println!("{}\n{}", q.sql, q.rollup.as_ref().unwrap().span_sql);
        }
        assert!(q.sql.contains("sum(`amount`) AS _c0"), "{}", q.sql);
        assert!(
            q.sql.contains("uniqExactArray(`givers`) AS _c2"),
            "{}",
            q.sql
        );
        assert!(
            q.sql.contains("window_start >= toDateTime(1629043200)"),
            "{}",
            q.sql
        );
        assert!(q.sql.contains("GROUP BY _b, _g0"), "{}", q.sql);
        let q = rollup_of("top_gifters_1h", Rollup::Day, Some("Asia/Shanghai"), None);
        if std::env::var_os("VIDPULSE_PRINT_SQL").is_some() {
            println!("{}", q.sql);
        }
        assert!(
            q.sql
                .contains("toStartOfDay(window_start, 'Asia/Shanghai')")
                && q.sql
                    .contains("ORDER BY _b, _c0 DESC, _g0 ASC LIMIT 10 BY _b"),
            "{}",
            q.sql
        );
        // Over the whole range there is one bucket: a plain LIMIT.
        let q = rollup_of("top_gifters_1h", Rollup::All, None, None);
        assert!(
            q.sql.ends_with("ORDER BY _b, _c0 DESC, _g0 ASC LIMIT 10"),
            "{}",
            q.sql
        );
        let q = rollup_of(
            "online_users_1m",
            Rollup::Hour,
            None,
            Some(1_629_043_200_000),
        );
        if std::env::var_os("VIDPULSE_PRINT_SQL").is_some() {
            println!("{}", q.sql);
        }
        assert!(q.sql.contains("argMax(_c0, _ws) AS _c0"), "{}", q.sql);
        // Levels cumulate from the first window: the windows before the
        // range are summed into one row per group, just before it, and only
        // the range's windows are gathered and cumulated after that row.
        assert!(
            q.sql.contains(
                "SELECT toUInt32(1629043199) AS _ws, `room_id` AS _g0, sum(`online`) AS _c0"
            ) && q
                .sql
                .contains("window_start < toDateTime(1629043200) GROUP BY _g0")
                && q.sql
                    .contains("window_start >= toDateTime(1629043200) GROUP BY _ws, _g0")
                && q.sql.contains("WHERE _ws >= 1629043200"),
            "{}",
            q.sql
        );
        let q = rollup_of("gifts_6h", Rollup::All, None, None);
        assert!(
            !q.sql.contains("ARRAY JOIN"),
            "panes, not windows: {}",
            q.sql
        );
        let spec = Spec::default_spec();
        let t = Tables::new("vidpulse", "");
        let f = Filters {
            rollup: Some(Rollup::All),
            ..Filters::default()
        };
        let e = final_sql(&t, &Target::find(&spec, "live_viewer_log").unwrap(), &f).unwrap_err();
        assert!(e.to_string().contains("is a log"), "{e}");
    }
}
