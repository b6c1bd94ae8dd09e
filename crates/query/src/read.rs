//! Final values, the way a dashboard (or `vidpulse query`) wants them: one
//! row per window and group with the aggregates by their spec names,
//! without knowing the table layout. Windowed metrics and logs come from
//! ClickHouse (the same SQL as the `<table>_final` views, plus filters);
//! leaderboards come from their Redis sorted sets.
//!
//! Read-only: nothing here writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, SecondsFormat, Utc};
use redis::AsyncCommands;
use serde_json::Value;

use crate::boards::{board_key, parse_window_stamp};
use crate::clickhouse::{ChError, fetch_json};
use crate::rollup::{self, Rollup};
use crate::schema::Tables;
use crate::spec::{Leaderboard, Log, Metric, Spec};
use crate::sql::{Out, final_sql, unknown_where};
use crate::zone::{self, Zone};

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

    /// Column names of rollup rows: `window_start`, `window_end`, then as
    /// [`Target::columns`].
    pub fn rollup_columns(&self) -> Vec<String> {
        let mut v = self.columns();
        if matches!(self, Target::Log(_)) {
            return v;
        }
        v.insert(1, "window_end".into());
        v
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
    /// Fold the windows: one row per group over the range, hour or day.
    pub rollup: Option<Rollup>,
    /// The zone of day and hour buckets (default: the target's own daily
    /// zone, else UTC).
    pub zone: Option<Zone>,
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
    redis: &vidpulse_core::redis::RedisClient,
    tables: &Tables,
    target: &Target<'_>,
    f: &Filters,
) -> Result<Vec<Row>, QueryError> {
    if let Target::Board(b) = target {
        return board_rows(redis, &tables.prefix, b, f).await;
    }
    let q = final_sql(tables, target, f)?;
    let raw = fetch_json(ch, &q.sql).await?;
    // A whole-range rollup covers the windows starting in [from, to): it
    // starts at the first window boundary at or after `from`, and without
    // `from` or `to` it spans the windows found.
    let mut span = (
        f.from_ms
            .zip(q.rollup.as_ref())
            .map(|(fr, plan)| align_up(&plan.pane, fr)),
        f.to_ms,
    );
    if let Some(plan) = &q.rollup
        && plan.rollup == Rollup::All
        && (span.0.is_none() || span.1.is_none())
        && !raw.is_empty()
    {
        let s = fetch_json(ch, &plan.span_sql).await?;
        let secs = |k: &str| s.first().and_then(|r| r[k].as_i64()).unwrap_or(0) * 1000;
        span.0 = span.0.or(Some(secs("lo")));
        span.1 = span.1.or(Some(plan.pane.end_of(secs("hi"))));
    }
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
        if let Some(plan) = &q.rollup {
            let (ws, we) = match plan.rollup {
                Rollup::All => (span.0.unwrap_or(0), span.1.unwrap_or(0)),
                kind => {
                    let b = r.get("_b").and_then(Value::as_i64).unwrap_or(0) * 1000;
                    (b, rollup::bucket_end(kind, plan.zone, b))
                }
            };
            row[0].1 = Value::String(rfc3339(ws, false));
            row.insert(1, ("window_end".into(), Value::String(rfc3339(we, false))));
        }
        let rank_at = if q.rollup.is_some() { 2 } else { 1 };
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
            row.insert(rank_at, ("rank".into(), Value::from(rank)));
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

/// Enough of one leaderboard set to rank its first `n` members as a whole
/// read would (score descending, then member ascending): the members Redis
/// ranks first, those scoring above the `n`-th, and every member tied with
/// it (Redis orders a tie by member descending, so the cut could fall
/// elsewhere in it). Reads `n` members and the tie, not the whole set.
async fn board_top(
    con: &mut vidpulse_core::redis::RedisConn,
    key: &str,
    n: usize,
) -> Result<Vec<(String, f64)>, QueryError> {
    let Some(last) = n.checked_sub(1) else {
        return Ok(Vec::new());
    };
    let top: Vec<(String, f64)> = con
        .zrevrange_withscores(key, 0, isize::try_from(last).unwrap_or(isize::MAX))
        .await?;
    if top.len() < n {
        return Ok(top);
    }
    let cut = top[last].1;
    let mut out: Vec<(String, f64)> = top.into_iter().filter(|(_, s)| *s > cut).collect();
    let tied: Vec<(String, f64)> = con.zrangebyscore_withscores(key, cut, cut).await?;
    out.extend(tied);
    Ok(out)
}

/// The first window boundary at or after `t`.
fn align_up(pane: &crate::spec::Window, t: i64) -> i64 {
    let s = pane.start_of(t);
    if s == t { t } else { pane.end_of(s) }
}

async fn board_rows(
    redis: &vidpulse_core::redis::RedisClient,
    prefix: &str,
    b: &Leaderboard,
    f: &Filters,
) -> Result<Vec<Row>, QueryError> {
    let mut con = redis
        .connect(vidpulse_core::redis::ConnectOptions::default())
        .await?;
    for (k, _) in &f.wheres {
        if *k != b.member.name {
            return Err(unknown_where(
                &b.name,
                k,
                std::slice::from_ref(&b.member.name),
            ));
        }
    }
    if let Some(r) = f.rollup {
        rollup::check(&Target::Board(b), r, f.zone, f.from_ms, f.to_ms)?;
    }
    // Windows: from the range when given, else every set that exists.
    let mut windows: BTreeSet<i64> = BTreeSet::new();
    match (f.from_ms, f.to_ms) {
        (Some(from), Some(to)) => {
            let mut w = b.start_of(from);
            let mut n = 0;
            while w < to && n < 10_000 {
                windows.insert(w);
                w = b.end_of(w);
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
            // On a Redis Cluster the windows' sets are spread over the
            // masters (one slot per window): every master is scanned.
            let keys = con.scan_match(&format!("{stem}*")).await?;
            for k in keys {
                if let Some(w) = parse_window_stamp(prefix, b, &k) {
                    windows.insert(w);
                }
            }
        }
    }
    // (window or bucket start, its end) → member → score.
    let mut sets: BTreeMap<(i64, i64), HashMap<String, i64>> = BTreeMap::new();
    let zone = rollup::bucket_zone(&Target::Board(b), f.zone);
    let (mut first, mut last_end) = (i64::MAX, i64::MIN);
    for w in windows {
        if f.from_ms.is_some_and(|fr| w < b.start_of(fr)) || f.to_ms.is_some_and(|to| w >= to) {
            continue;
        }
        let key = board_key(prefix, b, Some(w));
        let members = match f.limit {
            // One window's first `n`: read only them (and their ties).
            Some(n) if f.rollup.is_none() && f.wheres.is_empty() => {
                board_top(&mut con, &key, n).await?
            }
            _ => con.zrevrange_withscores(&key, 0, -1).await?,
        };
        if members.is_empty() {
            continue;
        }
        (first, last_end) = (first.min(w), last_end.max(b.end_of(w)));
        let slot = match f.rollup {
            None => (w, b.end_of(w)),
            Some(Rollup::All) => (0, 0),
            Some(r) => {
                let s = rollup::bucket_start(r, zone, w);
                (s, rollup::bucket_end(r, zone, s))
            }
        };
        let set = sets.entry(slot).or_default();
        for (m, score) in members {
            // Scores are sums of integers: summing them is exact.
            *set.entry(m).or_default() += score.round() as i64;
        }
    }
    let mut out = Vec::new();
    for ((ws, we), members) in sets {
        let mut members: Vec<(String, i64)> = members.into_iter().collect();
        members.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let (ws, we) = if f.rollup == Some(Rollup::All) {
            (
                f.from_ms.map_or(first, |fr| align_up(&b.window(), fr)),
                f.to_ms.unwrap_or(last_end),
            )
        } else {
            (ws, we)
        };
        for (i, (member, score)) in members.into_iter().enumerate() {
            if f.limit.is_some_and(|n| i >= n) {
                break;
            }
            if f.wheres.iter().any(|(_, v)| *v != member) {
                continue;
            }
            let mut row = vec![("window_start".into(), Value::String(rfc3339(ws, false)))];
            if f.rollup.is_some() {
                row.push(("window_end".into(), Value::String(rfc3339(we, false))));
            }
            row.extend([
                ("rank".into(), Value::from(i as u64 + 1)),
                (b.member.name.clone(), Value::String(member)),
                (b.score_name.clone(), Value::from(score)),
            ]);
            out.push(row);
        }
    }
    Ok(out)
}

/// Parses a `--from` / `--to` time: RFC 3339, `YYYY-MM-DD HH:MM:SS` (UTC),
/// `YYYY-MM-DD`, or epoch milliseconds.
pub fn parse_time(s: &str) -> Result<i64, QueryError> {
    parse_time_in(s, None)
}

/// [`parse_time`], reading `YYYY-MM-DD HH:MM:SS` and `YYYY-MM-DD` (its
/// first instant) in `zone` when given.
pub fn parse_time_in(s: &str, zone: Option<Zone>) -> Result<i64, QueryError> {
    use chrono::TimeZone as _;
    let s = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(s) {
        return Ok(d.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S") {
        return Ok(match zone {
            None => d.and_utc().timestamp_millis(),
            Some(z) => z
                .from_local_datetime(&d)
                .earliest()
                .map_or_else(|| d.and_utc().timestamp_millis(), |t| t.timestamp_millis()),
        });
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(z) = zone {
            return Ok(zone::day_start(z, d).unwrap_or(0));
        }
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
