//! Final values, the way a dashboard (or `vidpulse query`) wants them: one
//! row per window and group with the aggregates by their spec names,
//! without knowing the table layout. Windowed metrics and logs come from
//! ClickHouse (the same SQL as the `<table>_final` views, plus filters);
//! leaderboards come from their Redis sorted sets.
//!
//! Read-only: nothing here writes.

use std::collections::BTreeSet;

use chrono::{DateTime, SecondsFormat, Utc};
use redis::AsyncCommands;
use serde_json::Value;

use crate::clickhouse::{ChError, Tables, fetch_json, ident, literal};
use crate::leaderboard::{board_key, parse_window_stamp};
use crate::record::FieldType;
use crate::spec::{AggFn, GroupBy, Leaderboard, Log, Metric, Spec};

/// What to query.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    Metric(&'a Metric),
    Log(&'a Log),
    Board(&'a Leaderboard),
}

impl<'a> Target<'a> {
    pub fn find(spec: &'a Spec, name: &str) -> Option<Target<'a>> {
        spec.metric(name)
            .map(Target::Metric)
            .or_else(|| spec.log(name).map(Target::Log))
            .or_else(|| spec.leaderboard(name).map(Target::Board))
    }

    pub fn name(&self) -> &'a str {
        match self {
            Target::Metric(m) => &m.name,
            Target::Log(l) => &l.name,
            Target::Board(b) => &b.name,
        }
    }

    /// Column names of the result rows, in order.
    pub fn columns(&self) -> Vec<String> {
        match self {
            Target::Metric(m) => {
                let mut v = vec!["window_start".to_owned()];
                if m.top.is_some() {
                    v.push("rank".into());
                }
                v.extend(m.group_by.iter().map(|g| g.name.clone()));
                v.extend(m.aggregates.iter().map(|a| a.name.clone()));
                v
            }
            Target::Log(l) => {
                let mut v = vec!["event_time".to_owned(), "event_id".into(), "kind".into()];
                v.extend(l.columns.iter().map(|c| c.name.clone()));
                v
            }
            Target::Board(b) => vec![
                "window_start".to_owned(),
                "rank".into(),
                b.member.name.clone(),
                b.score_name.clone(),
            ],
        }
    }
}

/// Row filters: a half-open time range on the window start (logs: the
/// event time) and `column = value` conditions on group-by columns.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub wheres: Vec<(String, String)>,
    /// Leaderboards: keep the first N members of each window.
    pub limit: Option<usize>,
}

/// A query that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    ClickHouse(#[from] ChError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// One result row: column name → JSON value, in [`Target::columns`] order.
pub type Row = Vec<(String, Value)>;

#[derive(Clone, Debug)]
enum Out {
    /// Epoch seconds → RFC 3339.
    Window,
    /// Epoch milliseconds → RFC 3339 with milliseconds (0 → null).
    TimeMs,
    Plain,
}

/// SQL of the final values, and how to read its columns.
#[derive(Clone, Debug)]
pub struct FinalQuery {
    pub sql: String,
    /// (output name, SQL alias, conversion)
    cols: Vec<(String, String, Out)>,
    /// Top metrics: rank inside these aliases' groups (ordered already).
    rank_within: Option<Vec<String>>,
    /// Filters applied after ranking: (output name, value as text).
    post: Vec<(String, String)>,
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

fn unknown_where(name: &str, k: &str, valid: &[String]) -> QueryError {
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

fn metric_sql(t: &Tables, m: &Metric, f: &Filters) -> Result<FinalQuery, QueryError> {
    let table = t.qualified(&m.name);
    let g_alias: Vec<String> = (0..m.group_by.len()).map(|i| format!("_g{i}")).collect();
    let c_alias: Vec<String> = (0..m.aggregates.len()).map(|i| format!("_c{i}")).collect();
    let member = m.top.as_ref().map(|tp| tp.field);

    // Filters on group columns: pushed down, except the ranked member of a
    // top metric (ranking happens first).
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
    let from_s = f.from_ms.map(secs_ceil);
    let to_s = f.to_ms.map(secs_ceil);
    let groups_sel: Vec<String> = m
        .group_by
        .iter()
        .zip(&g_alias)
        .map(|(g, a)| format!("{} AS {a}", ident(&g.name)))
        .collect();
    let level = m.is_level();
    let hopping = m.window.is_hopping();

    let mut base_conds = conds.clone();
    if !level {
        let span_s = (m.window.size_ms - m.window.slide_ms) / 1000;
        if let Some(fr) = from_s {
            base_conds.push(format!(
                "window_start >= toDateTime({})",
                (fr - span_s).max(0)
            ));
        }
        if let Some(to) = to_s {
            base_conds.push(format!("window_start < toDateTime({})", to.max(0)));
        }
    }
    let where_base = if base_conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", base_conds.join(" AND "))
    };
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
    let where_time = if time_conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", time_conds.join(" AND "))
    };

    let base = if hopping {
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
        let mut sel = g_alias.clone();
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
            "SELECT {} FROM (SELECT {} FROM ({base}){group_by}) ARRAY JOIN {}{where_time} ORDER BY {order}",
            out_sel.join(", "),
            sel.join(", "),
            joins.join(", ")
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
    })
}

fn log_sql(t: &Tables, l: &Log, f: &Filters) -> Result<FinalQuery, QueryError> {
    let table = t.qualified(&l.name);
    let mut conds = Vec::new();
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
    let where_ = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    Ok(FinalQuery {
        sql: format!(
            "SELECT {} FROM {table} FINAL{where_} ORDER BY _t, _id",
            sel.join(", ")
        ),
        cols,
        rank_within: None,
        post: Vec::new(),
    })
}

/// RFC 3339 UTC of epoch milliseconds (`…Z`; milliseconds when asked).
pub fn rfc3339(ms: i64, millis: bool) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|d| {
            d.to_rfc3339_opts(
                if millis {
                    SecondsFormat::Millis
                } else {
                    SecondsFormat::Secs
                },
                true,
            )
        })
        .unwrap_or_default()
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Runs a query and returns its rows.
pub async fn run(
    ch: &clickhouse::Client,
    redis_url: &str,
    tables: &Tables,
    target: &Target<'_>,
    f: &Filters,
) -> Result<Vec<Row>, QueryError> {
    if let Target::Board(b) = target {
        return board_rows(redis_url, &tables.prefix, b, f).await;
    }
    let q = final_sql(tables, target, f)?;
    let raw = fetch_json(ch, &q.sql).await?;
    let mut out = Vec::with_capacity(raw.len());
    let mut last_group: Option<Vec<Value>> = None;
    let mut rank = 0u64;
    for r in raw {
        let mut row: Row = Vec::with_capacity(q.cols.len() + 1);
        for (name, alias, conv) in &q.cols {
            let v = r.get(alias).cloned().unwrap_or(Value::Null);
            let v = match conv {
                Out::Window => Value::String(rfc3339(v.as_i64().unwrap_or(0) * 1000, false)),
                Out::TimeMs => match v.as_i64() {
                    Some(0) | None => Value::Null,
                    Some(ms) => Value::String(rfc3339(ms, true)),
                },
                Out::Plain => v,
            };
            row.push((name.clone(), v));
        }
        if let Some(within) = &q.rank_within {
            let g: Vec<Value> = within
                .iter()
                .map(|a| r.get(a).cloned().unwrap_or(Value::Null))
                .collect();
            if last_group.as_ref() != Some(&g) {
                rank = 0;
                last_group = Some(g);
            }
            rank += 1;
            row.insert(1, ("rank".into(), Value::from(rank)));
        }
        let keep = q
            .post
            .iter()
            .all(|(k, want)| row.iter().any(|(n, v)| n == k && text_of(v) == *want));
        if keep {
            out.push(row);
        }
    }
    Ok(out)
}

async fn board_rows(
    redis_url: &str,
    prefix: &str,
    b: &Leaderboard,
    f: &Filters,
) -> Result<Vec<Row>, QueryError> {
    let client = redis::Client::open(redis_url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    for (k, _) in &f.wheres {
        if *k != b.member.name {
            return Err(unknown_where(
                &b.name,
                k,
                std::slice::from_ref(&b.member.name),
            ));
        }
    }
    // Windows: from the range when given, else every set that exists.
    let mut windows: BTreeSet<i64> = BTreeSet::new();
    match (f.from_ms, f.to_ms) {
        (Some(from), Some(to)) => {
            let mut w = from - from.rem_euclid(b.window_ms);
            let mut n = 0;
            while w < to && n < 10_000 {
                windows.insert(w);
                w += b.window_ms;
                n += 1;
            }
        }
        _ => {
            let stem: String = board_key(prefix, b, None)
                .chars()
                .flat_map(|c| {
                    let esc = matches!(c, '*' | '?' | '[' | ']' | '\\');
                    esc.then_some('\\').into_iter().chain(std::iter::once(c))
                })
                .collect();
            let pattern = format!("{stem}*");
            let mut keys: Vec<String> = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut con)
                    .await?;
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            for k in keys {
                if let Some(w) = parse_window_stamp(prefix, b, &k) {
                    windows.insert(w);
                }
            }
        }
    }
    let mut out = Vec::new();
    for w in windows {
        if f.from_ms
            .is_some_and(|fr| w < fr - fr.rem_euclid(b.window_ms))
            || f.to_ms.is_some_and(|to| w >= to)
        {
            continue;
        }
        let key = board_key(prefix, b, Some(w));
        let members: Vec<(String, f64)> = con.zrevrange_withscores(&key, 0, -1).await?;
        let mut members: Vec<(String, i64)> = members
            .into_iter()
            .map(|(m, s)| (m, s.round() as i64))
            .collect();
        members.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        for (i, (member, score)) in members.into_iter().enumerate() {
            if f.limit.is_some_and(|n| i >= n) {
                break;
            }
            if f.wheres.iter().any(|(_, v)| *v != member) {
                continue;
            }
            out.push(vec![
                ("window_start".into(), Value::String(rfc3339(w, false))),
                ("rank".into(), Value::from(i as u64 + 1)),
                (b.member.name.clone(), Value::String(member)),
                (b.score_name.clone(), Value::from(score)),
            ]);
        }
    }
    Ok(out)
}

/// Parses a `--from` / `--to` time: RFC 3339, `YYYY-MM-DD HH:MM:SS` (UTC),
/// `YYYY-MM-DD`, or epoch milliseconds.
pub fn parse_time(s: &str) -> Result<i64, QueryError> {
    let s = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(s) {
        return Ok(d.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S") {
        return Ok(d.and_utc().timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .map(|d| d.and_utc().timestamp_millis())
            .unwrap_or(0));
    }
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    Err(QueryError::Usage(format!(
        "{s:?} is not a time; use RFC 3339 (2021-08-16T01:00:00Z), \"2021-08-16 01:00:00\" (UTC), 2021-08-16 or epoch ms"
    )))
}

/// One line per metric, log and leaderboard of the spec: for `--list`.
pub fn list(spec: &Spec) -> Vec<Row> {
    let mut out = Vec::new();
    for m in &spec.metrics {
        let mut kind = m.window.describe();
        if let Some(t) = &m.top {
            kind = format!(
                "{kind}, top {} {} by {}",
                t.n, m.group_by[t.field].name, m.aggregates[t.by].name
            );
        }
        out.push(vec![
            ("name".into(), Value::from(m.name.clone())),
            ("type".into(), Value::from("metric")),
            ("window".into(), Value::from(kind)),
            ("input".into(), Value::from(m.input.topic())),
            (
                "group_by".into(),
                Value::from(
                    m.group_by
                        .iter()
                        .map(|g| g.name.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
            ),
            (
                "aggregates".into(),
                Value::from(
                    m.aggregates
                        .iter()
                        .map(|a| a.describe())
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
            ),
            ("help".into(), Value::from(m.help.clone())),
        ]);
    }
    for l in &spec.logs {
        out.push(vec![
            ("name".into(), Value::from(l.name.clone())),
            ("type".into(), Value::from("log")),
            ("window".into(), Value::from("none")),
            ("input".into(), Value::from(l.input.topic())),
            (
                "group_by".into(),
                Value::from(
                    l.columns
                        .iter()
                        .map(|g| g.name.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
            ),
            ("aggregates".into(), Value::from("")),
            ("help".into(), Value::from(l.help.clone())),
        ]);
    }
    for b in &spec.leaderboards {
        out.push(vec![
            ("name".into(), Value::from(b.name.clone())),
            ("type".into(), Value::from("leaderboard")),
            (
                "window".into(),
                Value::from(format!("tumbling {}", crate::spec::fmt_ms(b.window_ms))),
            ),
            ("input".into(), Value::from(b.input.topic())),
            ("group_by".into(), Value::from(b.member.name.clone())),
            (
                "aggregates".into(),
                Value::from(match &b.score {
                    crate::spec::Score::Count => format!("{} = count", b.score_name),
                    crate::spec::Score::Sum(f) => format!("{} = sum({})", b.score_name, f.name()),
                }),
            ),
            ("help".into(), Value::from(b.help.clone())),
        ]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_every_documented_form() {
        let t = 1_629_075_600_000;
        assert_eq!(parse_time("2021-08-16T01:00:00Z").unwrap(), t);
        assert_eq!(parse_time("2021-08-16T09:00:00+08:00").unwrap(), t);
        assert_eq!(parse_time("2021-08-16 01:00:00").unwrap(), t);
        assert_eq!(parse_time("2021-08-16").unwrap(), t - 3_600_000);
        assert_eq!(parse_time("1629075600000").unwrap(), t);
        assert!(parse_time("yesterday").is_err());
        assert_eq!(rfc3339(t, false), "2021-08-16T01:00:00Z");
        assert_eq!(rfc3339(t + 5, true), "2021-08-16T01:00:00.005Z");
    }

    #[test]
    fn where_filters_are_checked_against_the_columns() {
        let spec = Spec::default_spec();
        let t = Tables::new("vidpulse", "");
        let m = Target::Metric(spec.metric("viewers_by_province_grade_1m").unwrap());
        let f = Filters {
            wheres: vec![("grade".into(), "x".into())],
            ..Filters::default()
        };
        assert!(
            final_sql(&t, &m, &f)
                .unwrap_err()
                .to_string()
                .contains("not a whole number")
        );
        let f = Filters {
            wheres: vec![("colour".into(), "x".into())],
            ..Filters::default()
        };
        let e = final_sql(&t, &m, &f).unwrap_err().to_string();
        assert!(e.contains("filter on province, grade"), "{e}");
        let f = Filters {
            wheres: vec![("province".into(), "浙'江".into())],
            from_ms: Some(1_000),
            ..Filters::default()
        };
        let q = final_sql(&t, &m, &f).unwrap();
        assert!(q.sql.contains("`province` = '浙\\'江'"), "{}", q.sql);
        assert!(q.sql.contains("window_start >= toDateTime(1)"), "{}", q.sql);
    }
}
