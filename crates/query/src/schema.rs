//! The ClickHouse tables and final-value views a spec needs: names, column
//! types, DDL, and the start-up check that existing tables match.
//!
//! Rows are idempotent. Each table is a `ReplacingMergeTree(version)` keyed
//! by window, group key and source partition (`part`); a row re-sent after
//! a replay has the same key, version and content, so `FINAL` keeps one.
//! Final values combine partitions at query time ([`crate::sql`]). The SQL
//! runs on ClickHouse 18.16 and on current versions.

use std::fmt::Write as _;

use crate::clickhouse::{ChError, exec, fetch_json, ident};
use crate::field::FieldType;
use crate::spec::{AggFn, GroupBy, Log, Metric, Spec};

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
        let view = crate::sql::view_sql(t, &crate::read::Target::Metric(m)).unwrap_or_default();
        tables.push((m.name.clone(), metric_ddl(t, m), metric_columns(m), view));
    }
    for l in &spec.logs {
        let view = crate::sql::view_sql(t, &crate::read::Target::Log(l)).unwrap_or_default();
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
    use crate::clickhouse::literal;

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
}
