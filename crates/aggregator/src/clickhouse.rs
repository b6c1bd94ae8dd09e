//! The ClickHouse side: the tables and final-value views made from the spec,
//! RowBinary encoding of emitted rows, and the final-value SQL that
//! `vidpulse query` and the views share.
//!
//! Delivery: rows are idempotent. Each table is a `ReplacingMergeTree(version)`
//! keyed by window, group key and source partition (`part`); a row re-sent
//! after a replay has the same key, version and content, so `FINAL` keeps one.
//! Final values combine partitions at query time: sums of counts and sums,
//! min of mins, max of maxes, `uniqExactArray` over per-partition value sets
//! (never a sum of distinct counts), top-N after summing per-member partials,
//! levels as running sums of per-window deltas, hopping windows as unions of
//! panes. The SQL runs on ClickHouse 18.16 and on current versions.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;

use crate::engine::{Agg, LogRow, MetricRow};
use crate::record::{FieldType, Val};
use crate::spec::{AggFn, GroupBy, Log, Metric, Spec};

/// Where ClickHouse is.
#[derive(Args, Clone)]
pub struct ClickHouseArgs {
    /// ClickHouse HTTP URL.
    #[arg(
        long = "clickhouse-url",
        env = "VIDPULSE_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123"
    )]
    pub clickhouse_url: String,

    /// Database of the metric tables (created if missing).
    #[arg(
        long = "clickhouse-database",
        env = "VIDPULSE_CLICKHOUSE_DATABASE",
        default_value = "vidpulse"
    )]
    pub clickhouse_database: String,

    /// ClickHouse user.
    #[arg(long = "clickhouse-user", env = "VIDPULSE_CLICKHOUSE_USER")]
    pub clickhouse_user: Option<String>,

    /// ClickHouse password (prefer the environment variable).
    #[arg(
        long = "clickhouse-password",
        env = "VIDPULSE_CLICKHOUSE_PASSWORD",
        hide_env_values = true
    )]
    pub clickhouse_password: Option<String>,
}

impl std::fmt::Debug for ClickHouseArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseArgs")
            .field("url", &self.clickhouse_url)
            .field("database", &self.clickhouse_database)
            .field("user", &self.clickhouse_user)
            .field(
                "password",
                &self.clickhouse_password.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

impl ClickHouseArgs {
    pub fn client(&self) -> clickhouse::Client {
        let mut c = clickhouse::Client::default()
            .with_url(&self.clickhouse_url)
            .with_validation(false);
        if let Some(u) = &self.clickhouse_user {
            c = c.with_user(u);
        }
        if let Some(p) = &self.clickhouse_password {
            c = c.with_password(p);
        }
        c
    }
}

/// A ClickHouse failure; `retriable` when the server may answer later
/// (connection refused, timeout, 5xx), not for SQL the server rejects.
#[derive(Debug, thiserror::Error)]
#[error("clickhouse: {message}")]
pub struct ChError {
    pub message: String,
    pub retriable: bool,
}

impl From<clickhouse::error::Error> for ChError {
    fn from(e: clickhouse::error::Error) -> Self {
        // With its causes: "network error: client error (Connect)" alone
        // does not say that a TLS certificate failed to verify.
        let mut message = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            let text = c.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            cause = c.source();
        }
        // Server-side exceptions come back as "bad response: Code: N, ...".
        let rejected = message.contains("Code: ")
            && ![
                "Code: 159",
                "Code: 202",
                "Code: 209",
                "Code: 210",
                "Code: 241",
                "Code: 252",
            ]
            .iter()
            .any(|c| message.contains(c));
        ChError {
            message,
            retriable: !rejected,
        }
    }
}

/// How long one ClickHouse request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, clickhouse::error::Error>>,
) -> Result<T, ChError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(ChError::from),
        Err(_) => Err(ChError {
            message: format!("no answer within {REQUEST_TIMEOUT:?}"),
            retriable: true,
        }),
    }
}

/// Quotes an identifier.
pub fn ident(s: &str) -> String {
    format!("`{}`", s.replace('\\', "\\\\").replace('`', "\\`"))
}

/// Quotes a string literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The table of metric or log `name` for topic prefix `prefix`: the prefix
/// with every character outside `[A-Za-z0-9_]` turned into `_`, then the name.
pub fn table_name(prefix: &str, name: &str) -> String {
    let p: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{p}{name}")
}

/// Table names of one deployment.
#[derive(Clone, Debug)]
pub struct Tables {
    pub database: String,
    pub prefix: String,
}

impl Tables {
    pub fn new(database: &str, topic_prefix: &str) -> Tables {
        Tables {
            database: database.to_owned(),
            prefix: topic_prefix.to_owned(),
        }
    }

    /// `db`.`table` of a metric or log.
    pub fn qualified(&self, name: &str) -> String {
        format!(
            "{}.{}",
            ident(&self.database),
            ident(&table_name(&self.prefix, name))
        )
    }

    /// `db`.`table_final`: the view of final values.
    pub fn view(&self, name: &str) -> String {
        format!(
            "{}.{}",
            ident(&self.database),
            ident(&format!("{}_final", table_name(&self.prefix, name)))
        )
    }
}

fn group_type(g: &GroupBy) -> &'static str {
    match g.ty() {
        FieldType::Str => "String",
        _ => "Int64",
    }
}

fn agg_type(f: &AggFn) -> &'static str {
    match f {
        AggFn::Count => "UInt64",
        AggFn::Sum(_) | AggFn::Level { .. } => "Int64",
        AggFn::Min(_) | AggFn::Max(_) => "Nullable(Int64)",
        AggFn::Distinct(_) => "Array(String)",
    }
}

/// The columns of a metric table, in insert order.
pub fn metric_columns(m: &Metric) -> Vec<(String, &'static str)> {
    let mut v = vec![("window_start".to_owned(), "DateTime")];
    v.extend(m.group_by.iter().map(|g| (g.name.clone(), group_type(g))));
    v.push(("part".into(), "UInt32"));
    v.push(("version".into(), "UInt64"));
    v.extend(
        m.aggregates
            .iter()
            .map(|a| (a.name.clone(), agg_type(&a.func))),
    );
    v
}

/// The columns of a log table, in insert order.
pub fn log_columns(l: &Log) -> Vec<(String, &'static str)> {
    let mut v = vec![
        ("event_minute".to_owned(), "DateTime"),
        ("event_time".to_owned(), "Int64"),
        ("event_id".to_owned(), "String"),
        ("kind".to_owned(), "String"),
    ];
    v.extend(l.columns.iter().map(|c| (c.name.clone(), group_type(c))));
    v.push(("part".into(), "UInt32"));
    v.push(("version".into(), "UInt64"));
    v
}

fn create_table(
    name: &str,
    cols: &[(String, &'static str)],
    order: &[String],
    part_col: &str,
) -> String {
    let cols: Vec<String> = cols
        .iter()
        .map(|(n, t)| format!("{} {t}", ident(n)))
        .collect();
    let order: Vec<String> = order.iter().map(|c| ident(c)).collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {name} ({}) ENGINE = ReplacingMergeTree(version) PARTITION BY toYYYYMM({}) ORDER BY ({})",
        cols.join(", "),
        ident(part_col),
        order.join(", ")
    )
}

/// DDL for a metric's table.
pub fn metric_ddl(t: &Tables, m: &Metric) -> String {
    let mut order = vec!["window_start".to_owned()];
    order.extend(m.group_by.iter().map(|g| g.name.clone()));
    order.push("part".into());
    create_table(
        &t.qualified(&m.name),
        &metric_columns(m),
        &order,
        "window_start",
    )
}

/// DDL for a log's table.
pub fn log_ddl(t: &Tables, l: &Log) -> String {
    create_table(
        &t.qualified(&l.name),
        &log_columns(l),
        &["event_minute".to_owned(), "event_id".to_owned()],
        "event_minute",
    )
}

/// Creates the database, every table and every final-value view of `spec`.
/// Existing tables must have the expected columns (a spec change needs new
/// names or a new database).
pub async fn ensure_schema(
    client: &clickhouse::Client,
    t: &Tables,
    spec: &Spec,
) -> Result<(), ChError> {
    exec(
        client,
        &format!("CREATE DATABASE IF NOT EXISTS {}", ident(&t.database)),
    )
    .await?;
    // (name, table DDL, expected columns, view SQL)
    type Planned = (String, String, Vec<(String, &'static str)>, String);
    let mut tables: Vec<Planned> = Vec::new();
    for m in &spec.metrics {
        let view = crate::query::view_sql(t, &crate::query::Target::Metric(m)).unwrap_or_default();
        tables.push((m.name.clone(), metric_ddl(t, m), metric_columns(m), view));
    }
    for l in &spec.logs {
        let view = crate::query::view_sql(t, &crate::query::Target::Log(l)).unwrap_or_default();
        tables.push((l.name.clone(), log_ddl(t, l), log_columns(l), view));
    }
    for (name, ddl, cols, view) in tables {
        exec(client, &ddl).await?;
        let have = describe(client, t, &name).await?;
        let want: Vec<(String, String)> = cols
            .iter()
            .map(|(n, ty)| (n.clone(), (*ty).to_owned()))
            .collect();
        if have != want {
            return Err(ChError {
                message: format!(
                    "table {} exists with other columns ({}) than the spec needs ({}); drop it, rename the metric, or use another --clickhouse-database",
                    t.qualified(&name),
                    have.iter()
                        .map(|(n, t)| format!("{n} {t}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    want.iter()
                        .map(|(n, t)| format!("{n} {t}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                retriable: false,
            });
        }
        // Views hold no data: re-create them so they follow the spec.
        exec(client, &format!("DROP TABLE IF EXISTS {}", t.view(&name))).await?;
        exec(
            client,
            &format!("CREATE VIEW IF NOT EXISTS {} AS {view}", t.view(&name)),
        )
        .await?;
    }
    Ok(())
}

async fn exec(client: &clickhouse::Client, sql: &str) -> Result<(), ChError> {
    timed(client.query_raw(sql).execute()).await
}

async fn describe(
    client: &clickhouse::Client,
    t: &Tables,
    name: &str,
) -> Result<Vec<(String, String)>, ChError> {
    // `DESCRIBE` lists columns in table order on every version (18.16's
    // system.columns has no position).
    let sql = format!("DESCRIBE TABLE {}", t.qualified(name));
    let rows = fetch_json(client, &sql).await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or_default().to_owned(),
                r["type"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// Runs a SELECT and returns its rows as JSON objects (64-bit integers as numbers).
pub async fn fetch_json(
    client: &clickhouse::Client,
    sql: &str,
) -> Result<Vec<serde_json::Value>, ChError> {
    let fetch = async {
        let mut cursor = client
            .query_raw(sql)
            .with_setting("output_format_json_quote_64bit_integers", "0")
            .fetch_bytes("JSONEachRow")?;
        cursor.collect().await
    };
    let bytes = timed(fetch).await?;
    let mut out = Vec::new();
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        out.push(serde_json::from_slice(line).map_err(|e| ChError {
            message: format!("unreadable answer: {e}"),
            retriable: false,
        })?);
    }
    Ok(out)
}

/// Sends `INSERT INTO table FORMAT RowBinary` with pre-encoded rows.
pub async fn insert(client: &clickhouse::Client, table: &str, data: Bytes) -> Result<(), ChError> {
    let sql = format!("INSERT INTO {table} FORMAT RowBinary");
    let send = async {
        let mut ins = client.insert_formatted_with(sql);
        ins.send(data).await?;
        ins.end().await
    };
    timed(send).await
}

// ---- RowBinary -------------------------------------------------------------

fn varint(buf: &mut Vec<u8>, mut n: u64) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            buf.push(b);
            return;
        }
        buf.push(b | 0x80);
    }
}

fn string(buf: &mut Vec<u8>, s: &str) {
    varint(buf, s.len() as u64);
    buf.extend_from_slice(s.as_bytes());
}

fn datetime(buf: &mut Vec<u8>, ms: i64) {
    let secs = u32::try_from(ms.div_euclid(1000)).unwrap_or(0);
    buf.extend_from_slice(&secs.to_le_bytes());
}

fn val(buf: &mut Vec<u8>, ty: FieldType, v: &Val) {
    match (ty, v) {
        (FieldType::Str, Val::S(s)) => string(buf, s),
        (FieldType::Str, Val::I(i)) => string(buf, &i.to_string()),
        (_, Val::I(i)) => buf.extend_from_slice(&i.to_le_bytes()),
        (_, Val::S(s)) => buf.extend_from_slice(&s.parse::<i64>().unwrap_or(0).to_le_bytes()),
    }
}

/// Appends one metric row (columns as [`metric_columns`]).
pub fn encode_metric_row(buf: &mut Vec<u8>, m: &Metric, part: i32, row: &MetricRow) {
    datetime(buf, row.pane_start);
    for (g, v) in m.group_by.iter().zip(row.key.iter()) {
        val(buf, g.ty(), v);
    }
    buf.extend_from_slice(&(part.max(0) as u32).to_le_bytes());
    buf.extend_from_slice(&row.version.to_le_bytes());
    for a in &row.aggs {
        match a {
            Agg::Count(n) => buf.extend_from_slice(&n.to_le_bytes()),
            Agg::Sum(s) | Agg::Level(s) => buf.extend_from_slice(&s.to_le_bytes()),
            Agg::Min(x) | Agg::Max(x) => match x {
                None => buf.push(1),
                Some(x) => {
                    buf.push(0);
                    buf.extend_from_slice(&x.to_le_bytes());
                }
            },
            Agg::Distinct(set) => {
                varint(buf, set.len() as u64);
                for s in set {
                    string(buf, s);
                }
            }
        }
    }
}

/// Appends one log row (columns as [`log_columns`]).
pub fn encode_log_row(buf: &mut Vec<u8>, l: &Log, part: i32, row: &LogRow) {
    datetime(
        buf,
        row.event_time_ms - row.event_time_ms.rem_euclid(60_000),
    );
    buf.extend_from_slice(&row.event_time_ms.to_le_bytes());
    string(buf, &row.event_id);
    string(buf, row.kind);
    for (c, v) in l.columns.iter().zip(&row.columns) {
        val(buf, c.ty(), v);
    }
    buf.extend_from_slice(&(part.max(0) as u32).to_le_bytes());
    buf.extend_from_slice(&row.version.to_le_bytes());
}

/// A short description of the table layout, for docs and `--print-ddl`.
pub fn describe_schema(t: &Tables, spec: &Spec) -> String {
    let mut s = String::new();
    for m in &spec.metrics {
        let _ = writeln!(s, "{};", metric_ddl(t, m));
    }
    for l in &spec.logs {
        let _ = writeln!(s, "{};", log_ddl(t, l));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitized_and_quoted() {
        assert_eq!(table_name("t123.agg.", "gifts_6h"), "t123_agg_gifts_6h");
        let t = Tables::new("vidpulse", "");
        assert_eq!(t.qualified("x"), "`vidpulse`.`x`");
        assert_eq!(literal("a'b\\c"), "'a\\'b\\\\c'");
    }

    #[test]
    fn ddl_is_a_replacing_merge_tree_keyed_by_window_group_and_partition() {
        let spec = Spec::default_spec();
        let t = Tables::new("vidpulse", "");
        let ddl = metric_ddl(&t, spec.metric("gifts_by_type_1m").unwrap());
        assert_eq!(
            ddl,
            "CREATE TABLE IF NOT EXISTS `vidpulse`.`gifts_by_type_1m` (`window_start` DateTime, `gift_type` String, `part` UInt32, `version` UInt64, `amount` Int64, `gifts` UInt64, `givers` Array(String)) ENGINE = ReplacingMergeTree(version) PARTITION BY toYYYYMM(`window_start`) ORDER BY (`window_start`, `gift_type`, `part`)"
        );
        let log = log_ddl(&t, spec.log("live_viewer_log").unwrap());
        assert!(
            log.contains("ORDER BY (`event_minute`, `event_id`)"),
            "{log}"
        );
    }

    #[test]
    fn row_binary_layout() {
        let spec = Spec::default_spec();
        let m = spec.metric("gifts_by_type_1m").unwrap();
        let row = MetricRow {
            metric: 0,
            pane_start: 60_000,
            key: vec![Val::S("3".into())].into_boxed_slice(),
            version: 9,
            aggs: vec![
                Agg::Sum(-2),
                Agg::Count(1),
                Agg::Distinct(["u".into()].into_iter().collect()),
            ],
        };
        let mut b = Vec::new();
        encode_metric_row(&mut b, m, 5, &row);
        let mut want = vec![60, 0, 0, 0, 1, b'3', 5, 0, 0, 0];
        want.extend_from_slice(&9u64.to_le_bytes());
        want.extend_from_slice(&(-2i64).to_le_bytes());
        want.extend_from_slice(&1u64.to_le_bytes());
        want.extend_from_slice(&[1, 1, b'u']);
        assert_eq!(b, want);
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, vec![0xac, 0x02]);
    }
}
