//! The ClickHouse tables and final-value views a spec needs: names, column
//! types, DDL, and the start-up check that existing tables match.
//!
//! Rows are idempotent. Each table is a `ReplacingMergeTree(version)` keyed
//! by generation ([`crate::generation`]), window, group key and source
//! partition (`part`); a row re-sent after a replay has the same key,
//! version and content, so `FINAL` keeps one. Final values combine
//! partitions at query time ([`crate::sql`]), from the current generation
//! only. The SQL
//! runs on ClickHouse 18.16 and on current versions.
//!
//! On a cluster (`--clickhouse-cluster`) every statement runs `ON CLUSTER`.
//! Each shard holds `<table>_local`, a `ReplicatedReplacingMergeTree` (same
//! columns, key and version) replicated through ZooKeeper or ClickHouse
//! Keeper; `<table>` itself is a `Distributed` table over them, sharded by a
//! hash of the window and group key (logs: the event id). Every version of
//! a row therefore lands on one shard, whichever server an insert reaches
//! and whichever aggregator instance sends it, so each shard's `FINAL`
//! keeps the one row and the sums over shards are exact. Inserts, views
//! and queries all go through the `Distributed` table, so readers use the
//! same names and SQL as on one server.

use std::fmt::Write as _;

use crate::clickhouse::{ChError, exec, fetch_json, ident, literal};
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

/// Suffix of a shard's own table in cluster mode.
pub const LOCAL_SUFFIX: &str = "_local";

/// Table names of one deployment.
#[derive(Clone, Debug)]
pub struct Tables {
    pub database: String,
    pub prefix: String,
    /// The ClickHouse cluster (`--clickhouse-cluster`); `None`: one server.
    pub cluster: Option<String>,
}

impl Tables {
    /// The tables of one server.
    pub fn new(database: &str, topic_prefix: &str) -> Tables {
        Tables {
            database: database.to_owned(),
            prefix: topic_prefix.to_owned(),
            cluster: None,
        }
    }

    /// The same names on cluster `cluster` (`None` or empty: one server).
    pub fn with_cluster(mut self, cluster: Option<&str>) -> Tables {
        self.cluster = cluster
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned);
        self
    }

    /// `db`.`table` of a metric or log: what readers query. On a cluster
    /// it is the `Distributed` table over every shard.
    pub fn qualified(&self, name: &str) -> String {
        format!(
            "{}.{}",
            ident(&self.database),
            ident(&table_name(&self.prefix, name))
        )
    }

    /// Where the rows of metric or log `name` are inserted: the table, on
    /// a cluster its `Distributed` table, never a shard's local table (the
    /// sharding key, not the server an insert reaches, must choose the
    /// shard, or a replayed row could land beside its earlier version's
    /// shard and be counted twice).
    pub fn insert_target(&self, name: &str) -> String {
        self.qualified(name)
    }

    /// `db`.`table_local`: a shard's own replicated table (cluster mode).
    pub fn local(&self, name: &str) -> String {
        format!(
            "{}.{}",
            ident(&self.database),
            ident(&format!("{}{LOCAL_SUFFIX}", table_name(&self.prefix, name)))
        )
    }

    /// ` ON CLUSTER `name`` in cluster mode, else nothing.
    pub fn on_cluster(&self) -> String {
        match &self.cluster {
            Some(c) => format!(" ON CLUSTER {}", ident(c)),
            None => String::new(),
        }
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
    let mut v = vec![
        ("generation".to_owned(), "UInt64"),
        ("window_start".to_owned(), "DateTime"),
    ];
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
        ("generation".to_owned(), "UInt64"),
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

/// The layout of one metric's or log's table.
struct Layout {
    cols: Vec<(String, &'static str)>,
    /// The row key (`ORDER BY`): rows with equal keys are versions of one row.
    order: Vec<String>,
    /// The `DateTime` column the table is partitioned by (month).
    part_col: &'static str,
    /// Columns of the sharding hash on a cluster: part of the row key, so
    /// every version of a row goes to the same shard.
    shard_by: Vec<String>,
}

fn metric_layout(m: &Metric) -> Layout {
    let groups: Vec<String> = m.group_by.iter().map(|g| g.name.clone()).collect();
    let mut order = vec!["generation".to_owned(), "window_start".to_owned()];
    order.extend(groups.iter().cloned());
    order.push("part".into());
    let mut shard_by = vec!["window_start".to_owned()];
    shard_by.extend(groups);
    Layout {
        cols: metric_columns(m),
        order,
        part_col: "window_start",
        shard_by,
    }
}

fn log_layout(l: &Log) -> Layout {
    Layout {
        cols: log_columns(l),
        order: vec![
            "generation".to_owned(),
            "event_minute".to_owned(),
            "event_id".to_owned(),
        ],
        part_col: "event_minute",
        shard_by: vec!["event_id".to_owned()],
    }
}

/// The statements creating one table: on one server the table; on a
/// cluster the shards' replicated tables, then the `Distributed` table.
fn table_ddl(t: &Tables, name: &str, l: &Layout) -> Vec<String> {
    let cols: Vec<String> = l
        .cols
        .iter()
        .map(|(n, ty)| format!("{} {ty}", ident(n)))
        .collect();
    let cols = cols.join(", ");
    let order: Vec<String> = l.order.iter().map(|c| ident(c)).collect();
    let keys = format!(
        "PARTITION BY toYYYYMM({}) ORDER BY ({})",
        ident(l.part_col),
        order.join(", ")
    );
    let Some(cluster) = &t.cluster else {
        return vec![format!(
            "CREATE TABLE IF NOT EXISTS {} ({cols}) ENGINE = ReplacingMergeTree(version) {keys}",
            t.qualified(name)
        )];
    };
    let table = table_name(&t.prefix, name);
    // `{shard}` and `{replica}` are the servers' macros; the path names
    // the database and table so that tables never share a replication log.
    let path = literal(&format!(
        "/clickhouse/tables/{{shard}}/{}/{table}",
        t.database
    ));
    let shard_by: Vec<String> = l.shard_by.iter().map(|c| ident(c)).collect();
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {}{} ({cols}) ENGINE = ReplicatedReplacingMergeTree({path}, '{{replica}}', version) {keys}",
            t.local(name),
            t.on_cluster()
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {}{} ({cols}) ENGINE = Distributed({}, {}, {}, cityHash64({}))",
            t.qualified(name),
            t.on_cluster(),
            literal(cluster),
            literal(&t.database),
            literal(&format!("{table}{LOCAL_SUFFIX}")),
            shard_by.join(", ")
        ),
    ]
}

/// DDL for a metric's table (on a cluster: its local and Distributed tables).
pub fn metric_ddl(t: &Tables, m: &Metric) -> Vec<String> {
    table_ddl(t, &m.name, &metric_layout(m))
}

/// DDL for a log's table (on a cluster: its local and Distributed tables).
pub fn log_ddl(t: &Tables, l: &Log) -> Vec<String> {
    table_ddl(t, &l.name, &log_layout(l))
}

/// Creates the database, every table and every final-value view of `spec`
/// (on a cluster: `ON CLUSTER`, after checking the server knows the
/// cluster). Existing tables must have the expected columns (a spec change
/// needs new names or a new database).
///
/// On a cluster, statements run only for what the server we talk to lacks
/// or has in another form: an `ON CLUSTER` statement waits for every
/// server, so an aggregator (re)starting while one replica is down must not
/// need one when the schema is already there.
pub async fn ensure_schema(
    client: &clickhouse::Client,
    t: &Tables,
    spec: &Spec,
) -> Result<(), ChError> {
    check_names(t, spec)?;
    // name → CREATE statement as this server stored it (cluster mode).
    let mut have: std::collections::HashMap<String, String> = Default::default();
    if let Some(cluster) = &t.cluster {
        check_cluster(client, cluster).await?;
        let rows = fetch_json(
            client,
            &format!(
                "SELECT name, create_table_query FROM system.tables WHERE database = {}",
                literal(&t.database)
            ),
        )
        .await?;
        for r in rows {
            if let (Some(n), Some(q)) = (r["name"].as_str(), r["create_table_query"].as_str()) {
                have.insert(n.to_owned(), q.to_owned());
            }
        }
    }
    let cluster = t.cluster.is_some();
    let exists = |name: &str| have.contains_key(name);
    let db_exists = cluster
        && !fetch_json(
            client,
            &format!(
                "SELECT name FROM system.databases WHERE name = {}",
                literal(&t.database)
            ),
        )
        .await?
        .is_empty();
    if !db_exists {
        exec(
            client,
            &format!(
                "CREATE DATABASE IF NOT EXISTS {}{}",
                ident(&t.database),
                t.on_cluster()
            ),
        )
        .await?;
    }
    let registry = table_name(&t.prefix, crate::generation::REGISTRY);
    if !exists(&registry) {
        crate::generation::ensure_registry(client, t).await?;
    }
    let want: Vec<(String, String)> = crate::generation::REGISTRY_COLUMNS
        .iter()
        .map(|(n, ty)| ((*n).to_owned(), (*ty).to_owned()))
        .collect();
    check_columns(client, &crate::generation::registry(t), &want).await?;
    // (name, table DDL, expected columns, view SQL)
    type Planned = (String, Vec<String>, Vec<(String, &'static str)>, String);
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
        let table = table_name(&t.prefix, &name);
        let created = exists(&table) && exists(&format!("{table}{LOCAL_SUFFIX}"));
        if !created {
            for statement in &ddl {
                exec(client, statement).await?;
            }
        }
        let want: Vec<(String, String)> = cols
            .iter()
            .map(|(n, ty)| (n.clone(), (*ty).to_owned()))
            .collect();
        let mut check = vec![t.qualified(&name)];
        if t.cluster.is_some() {
            check.push(t.local(&name));
        }
        for table in check {
            check_columns(client, &table, &want).await?;
        }
        // Views hold no data: re-create them so they follow the spec (on a
        // cluster only when the stored one differs).
        let view_name = format!("{table}_final");
        if let Some(stored) = have.get(&view_name)
            && *stored == probe_view(client, t, &view_name, &view).await?
        {
            continue;
        }
        exec(
            client,
            &format!("DROP TABLE IF EXISTS {}{}", t.view(&name), t.on_cluster()),
        )
        .await?;
        exec(
            client,
            &format!(
                "CREATE VIEW IF NOT EXISTS {}{} AS {view}",
                t.view(&name),
                t.on_cluster()
            ),
        )
        .await?;
    }
    Ok(())
}

/// How this server stores view `view_name` defined as `select`: made under
/// a scratch name on this server only (no `ON CLUSTER`), read back, dropped.
/// Comparing the two stored texts tells whether the view must change,
/// whatever the server's formatting.
async fn probe_view(
    client: &clickhouse::Client,
    t: &Tables,
    view_name: &str,
    select: &str,
) -> Result<String, ChError> {
    let probe = format!("_vidpulse_probe_{}", std::process::id());
    let qualified = format!("{}.{}", ident(&t.database), ident(&probe));
    exec(client, &format!("DROP TABLE IF EXISTS {qualified}")).await?;
    exec(client, &format!("CREATE VIEW {qualified} AS {select}")).await?;
    let rows = fetch_json(
        client,
        &format!(
            "SELECT create_table_query FROM system.tables WHERE database = {} AND name = {}",
            literal(&t.database),
            literal(&probe)
        ),
    )
    .await;
    exec(client, &format!("DROP TABLE IF EXISTS {qualified}")).await?;
    let text = rows?
        .first()
        .and_then(|r| r["create_table_query"].as_str())
        .unwrap_or_default()
        .to_owned();
    // The stored text names the view: put the real name in.
    Ok(text.replacen(&probe, view_name, 1))
}

/// Refuses a spec whose names collide once suffixed (`x_final` the view
/// of `x` and the table of metric `x_final`; on a cluster also `_local`).
fn check_names(t: &Tables, spec: &Spec) -> Result<(), ChError> {
    let names: Vec<&str> = spec
        .metrics
        .iter()
        .map(|m| m.name.as_str())
        .chain(spec.logs.iter().map(|l| l.name.as_str()))
        .collect();
    let mut seen: std::collections::BTreeMap<String, &str> = Default::default();
    for n in &names {
        if crate::generation::is_reserved(n) {
            return Err(ChError {
                message: format!(
                    "{n:?}: the name of vidpulse's generation registry; rename it in the spec"
                ),
                retriable: false,
            });
        }
        let mut made = vec![(t.qualified(n), "table"), (t.view(n), "view")];
        if t.cluster.is_some() {
            made.push((t.local(n), "local table"));
        }
        for (table, what) in made {
            if let Some(other) = seen.insert(table.clone(), n) {
                return Err(ChError {
                    message: format!(
                        "metrics {other:?} and {n:?} both need the ClickHouse name {table} ({what} of {n:?}); rename one in the spec"
                    ),
                    retriable: false,
                });
            }
        }
    }
    Ok(())
}

/// The server must define `cluster` (in `remote_servers`) and the macros
/// the replicated tables' paths use.
async fn check_cluster(client: &clickhouse::Client, cluster: &str) -> Result<(), ChError> {
    let rows = fetch_json(client, "SELECT DISTINCT cluster FROM system.clusters").await?;
    let known: Vec<String> = rows
        .iter()
        .filter_map(|r| r["cluster"].as_str().map(str::to_owned))
        .collect();
    if !known.iter().any(|c| c == cluster) {
        return Err(ChError {
            message: format!(
                "--clickhouse-cluster {cluster}: the server has no such cluster in remote_servers ({}); define it in the servers' config, or fix the flag (VIDPULSE_CLICKHOUSE_CLUSTER)",
                if known.is_empty() {
                    "it defines none".to_owned()
                } else {
                    format!("it has {}", known.join(", "))
                }
            ),
            retriable: false,
        });
    }
    let rows = fetch_json(client, "SELECT macro FROM system.macros").await?;
    let macros: Vec<&str> = rows.iter().filter_map(|r| r["macro"].as_str()).collect();
    let missing: Vec<&str> = ["shard", "replica"]
        .into_iter()
        .filter(|m| !macros.contains(m))
        .collect();
    if !missing.is_empty() {
        return Err(ChError {
            message: format!(
                "--clickhouse-cluster {cluster}: the server defines no macro {} (its replicated tables are created with '{{shard}}' and '{{replica}}'); add <macros><shard>…</shard><replica>…</replica></macros> to every server's config (docs/deploy.md)",
                missing.join(" or ")
            ),
            retriable: false,
        });
    }
    Ok(())
}

/// Table `table` must have exactly the columns `want`.
async fn check_columns(
    client: &clickhouse::Client,
    table: &str,
    want: &[(String, String)],
) -> Result<(), ChError> {
    let have = describe(client, table).await?;
    if have == want {
        return Ok(());
    }
    let list = |c: &[(String, String)]| {
        c.iter()
            .map(|(n, t)| format!("{n} {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(ChError {
        message: format!(
            "table {table} exists with other columns ({}) than this version needs ({}): tables made by an older vidpulse or another spec; drop it, rename the metric, or use another --clickhouse-database",
            list(&have),
            list(want)
        ),
        retriable: false,
    })
}

async fn describe(
    client: &clickhouse::Client,
    table: &str,
) -> Result<Vec<(String, String)>, ChError> {
    // `DESCRIBE` lists columns in table order on every version (18.16's
    // system.columns has no position).
    let sql = format!("DESCRIBE TABLE {table}");
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

/// The schema's DDL (database, tables, final-value views), for docs and
/// `--print-ddl`.
pub fn describe_schema(t: &Tables, spec: &Spec) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "CREATE DATABASE IF NOT EXISTS {}{};",
        ident(&t.database),
        t.on_cluster()
    );
    let _ = writeln!(s, "{};", crate::generation::registry_ddl(t));
    let targets = spec
        .metrics
        .iter()
        .map(|m| {
            (
                m.name.as_str(),
                metric_ddl(t, m),
                crate::read::Target::Metric(m),
            )
        })
        .chain(
            spec.logs
                .iter()
                .map(|l| (l.name.as_str(), log_ddl(t, l), crate::read::Target::Log(l))),
        );
    for (name, ddl, target) in targets {
        for statement in ddl {
            let _ = writeln!(s, "{statement};");
        }
        if let Ok(view) = crate::sql::view_sql(t, &target) {
            let _ = writeln!(
                s,
                "CREATE VIEW IF NOT EXISTS {}{} AS {view};",
                t.view(name),
                t.on_cluster()
            );
        }
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
            ddl[..],
            [
                "CREATE TABLE IF NOT EXISTS `vidpulse`.`gifts_by_type_1m` (`generation` UInt64, `window_start` DateTime, `gift_type` String, `part` UInt32, `version` UInt64, `amount` Int64, `gifts` UInt64, `givers` Array(String)) ENGINE = ReplacingMergeTree(version) PARTITION BY toYYYYMM(`window_start`) ORDER BY (`generation`, `window_start`, `gift_type`, `part`)"
            ]
        );
        let log = log_ddl(&t, spec.log("live_viewer_log").unwrap());
        assert!(
            log[0].contains("ORDER BY (`generation`, `event_minute`, `event_id`)"),
            "{log:?}"
        );
        assert_eq!(t.insert_target("x"), t.qualified("x"));
    }

    #[test]
    fn on_a_cluster_shards_replicate_and_a_distributed_table_keeps_the_name() {
        let spec = Spec::default_spec();
        let t = Tables::new("vidpulse", "p.").with_cluster(Some("c1"));
        let ddl = metric_ddl(&t, spec.metric("gifts_by_type_1m").unwrap());
        assert_eq!(
            ddl[..],
            [
                "CREATE TABLE IF NOT EXISTS `vidpulse`.`p_gifts_by_type_1m_local` ON CLUSTER `c1` (`generation` UInt64, `window_start` DateTime, `gift_type` String, `part` UInt32, `version` UInt64, `amount` Int64, `gifts` UInt64, `givers` Array(String)) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/vidpulse/p_gifts_by_type_1m', '{replica}', version) PARTITION BY toYYYYMM(`window_start`) ORDER BY (`generation`, `window_start`, `gift_type`, `part`)",
                "CREATE TABLE IF NOT EXISTS `vidpulse`.`p_gifts_by_type_1m` ON CLUSTER `c1` (`generation` UInt64, `window_start` DateTime, `gift_type` String, `part` UInt32, `version` UInt64, `amount` Int64, `gifts` UInt64, `givers` Array(String)) ENGINE = Distributed('c1', 'vidpulse', 'p_gifts_by_type_1m_local', cityHash64(`window_start`, `gift_type`))",
            ]
        );
        // Inserts and reads use the Distributed table; the sharding key is
        // part of the row key (never `part` alone, never the version).
        assert_eq!(t.insert_target("x"), "`vidpulse`.`p_x`");
        assert_eq!(t.local("x"), "`vidpulse`.`p_x_local`");
        let log = log_ddl(&t, spec.log("live_viewer_log").unwrap());
        assert!(log[1].ends_with("cityHash64(`event_id`))"), "{log:?}");
        for m in &spec.metrics {
            let l = metric_layout(m);
            assert!(l.shard_by.iter().all(|c| l.order.contains(c)), "{}", m.name);
        }
        let one = Tables::new("vidpulse", "").with_cluster(Some(" "));
        assert!(one.cluster.is_none() && one.on_cluster().is_empty());
    }

    #[test]
    fn names_that_collide_once_suffixed_are_refused() {
        let text = crate::spec::DEFAULT_SPEC
            .replace("name = \"gifts_6h\"", "name = \"gifts_by_type_1m_local\"");
        let spec = Spec::parse(&text).unwrap();
        let t = Tables::new("vidpulse", "").with_cluster(Some("c"));
        let e = check_names(&t, &spec).unwrap_err();
        assert!(e.message.contains("rename one"), "{}", e.message);
        assert!(check_names(&Tables::new("vidpulse", ""), &spec).is_ok());
    }
}
