//! Generations: which run of a metric's results readers see.
//!
//! Every row carries a `generation`: a hash of the definition that made it
//! (the metric, log or leaderboard as the spec states it, with the stage's
//! defaults that decide its values) and of the **lineage** — one life of the
//! aggregator's state over one life of its input topics, renewed by
//! `--reset-state` (recreated topics, a deliberate start-over). Changing one
//! metric gives that metric a new generation; every other one keeps its own,
//! so a replay rewrites their rows identically.
//!
//! The registry table (`<prefix>vp_generations`) records when each
//! generation was first used; readers (the final-value views, `vidpulse
//! query`, the API) read only the latest one of each metric, so rows of an
//! older spec or of the topics' previous life are never mixed in, whatever
//! their versions. Leaderboards keep the same stamp in their `:parts` hash.

use crate::clickhouse::{ChError, exec, fetch_json, ident, literal};
use crate::schema::{LOCAL_SUFFIX, Tables, table_name};
use crate::spec::Spec;

/// Name of the registry table (after the topic prefix).
pub const REGISTRY: &str = "vp_generations";

/// What a generation belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Metric,
    Log,
    Leaderboard,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Metric => "metric",
            Kind::Log => "log",
            Kind::Leaderboard => "leaderboard",
        }
    }
}

/// FNV-1a, 64 bits: stable across builds and platforms.
pub fn fnv64(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The generation of a definition (its fingerprint) in a lineage; never 0
/// (0 is what readers get when nothing is registered).
pub fn generation(fingerprint: &str, lineage: u64) -> u64 {
    fnv64(&format!("{fingerprint}|{lineage:016x}")).max(1)
}

/// The registry table, `db`.`<prefix>vp_generations`.
pub fn registry(t: &Tables) -> String {
    t.qualified(REGISTRY)
}

/// Columns of the registry, in table order.
pub const REGISTRY_COLUMNS: [(&str, &str); 7] = [
    ("kind", "String"),
    ("name", "String"),
    ("generation", "UInt64"),
    ("lineage", "UInt64"),
    ("group_name", "String"),
    ("fingerprint", "String"),
    ("registered_ms", "UInt64"),
];

/// DDL of the registry: tiny, so on a cluster every server holds all of it
/// (one replication log across shards, replicas named by shard and
/// replica), and readers' sub-queries read it locally wherever they run.
pub fn registry_ddl(t: &Tables) -> String {
    let cols: Vec<String> = REGISTRY_COLUMNS
        .iter()
        .map(|(n, ty)| format!("{} {ty}", ident(n)))
        .collect();
    let keys = "ORDER BY (`kind`, `name`, `generation`)";
    match &t.cluster {
        None => format!(
            "CREATE TABLE IF NOT EXISTS {} ({}) ENGINE = ReplacingMergeTree(registered_ms) {keys}",
            registry(t),
            cols.join(", ")
        ),
        Some(_) => {
            let path = literal(&format!(
                "/clickhouse/tables/all/{}/{}",
                t.database,
                table_name(&t.prefix, REGISTRY)
            ));
            format!(
                "CREATE TABLE IF NOT EXISTS {}{} ({}) ENGINE = ReplicatedReplacingMergeTree({path}, '{{shard}}-{{replica}}', registered_ms) {keys}",
                registry(t),
                t.on_cluster(),
                cols.join(", ")
            )
        }
    }
}

/// Whether `name` (a table name without the prefix) is the registry's: the
/// spec may not use it, nor its `_local` twin.
pub fn is_reserved(name: &str) -> bool {
    name == REGISTRY || name == format!("{REGISTRY}{LOCAL_SUFFIX}")
}

/// SQL of the current generation of `name`: the one registered last (0 when
/// none is: no rows match).
pub fn current_sql(t: &Tables, kind: Kind, name: &str) -> String {
    format!(
        "(SELECT argMax(generation, registered_ms) FROM {} WHERE kind = {} AND name = {})",
        registry(t),
        literal(kind.as_str()),
        literal(name)
    )
}

/// The `WHERE` condition keeping the current generation's rows.
pub fn current_cond(t: &Tables, kind: Kind, name: &str) -> String {
    format!("generation = {}", current_sql(t, kind, name))
}

/// What decides a definition's values besides the spec: the stage's
/// defaults and where event time comes from.
#[derive(Clone, Copy, Debug)]
pub struct Defaults<'a> {
    pub grace_ms: i64,
    pub out_of_orderness_ms: i64,
    /// The watermark source (`in-band`, `max-event-time`).
    pub clock: &'a str,
}

/// Every metric, log and leaderboard of `spec` with its fingerprint: what
/// decides its values (help texts and expiries do not).
pub fn entries(spec: &Spec, d: Defaults<'_>) -> Vec<Entry> {
    let timing = format!("{}|{}", d.out_of_orderness_ms, d.clock);
    let mut out = Vec::new();
    for m in &spec.metrics {
        let mut m = m.clone();
        m.help.clear();
        m.grace_ms = Some(m.grace_ms.unwrap_or(d.grace_ms));
        out.push(Entry {
            kind: Kind::Metric,
            name: m.name.clone(),
            fingerprint: format!("{:016x}", fnv64(&format!("{m:?}|{timing}"))),
        });
    }
    for l in &spec.logs {
        // One row per event whatever its time: no timing.
        let mut l = l.clone();
        l.help.clear();
        out.push(Entry {
            kind: Kind::Log,
            name: l.name.clone(),
            fingerprint: format!("{:016x}", fnv64(&format!("{l:?}"))),
        });
    }
    for b in &spec.leaderboards {
        let mut b = b.clone();
        b.help.clear();
        b.ttl_ms = 0;
        b.grace_ms = Some(b.grace_ms.unwrap_or(d.grace_ms));
        out.push(Entry {
            kind: Kind::Leaderboard,
            name: b.name.clone(),
            fingerprint: format!("{:016x}", fnv64(&format!("{b:?}|{timing}"))),
        });
    }
    out
}

/// A definition to register.
#[derive(Clone, Debug)]
pub struct Entry {
    pub kind: Kind,
    pub name: String,
    pub fingerprint: String,
}

/// A generation as registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registered {
    pub generation: u64,
    /// When it was first (or last re-) registered; a newer registration
    /// wins over an older one everywhere (leaderboards included).
    pub registered_ms: u64,
}

/// The latest lineage group `group` registered, if any (the fallback when
/// the state store lost its copy).
pub async fn lineage_of(
    client: &clickhouse::Client,
    t: &Tables,
    group: &str,
) -> Result<Option<u64>, ChError> {
    let rows = fetch_json(
        client,
        &format!(
            "SELECT toString(argMax(lineage, registered_ms)) AS l, count() AS n FROM {} WHERE group_name = {}",
            registry(t),
            literal(group)
        ),
    )
    .await?;
    Ok(value_if_any(&rows, "l"))
}

/// Column `column` (a number as text) of an aggregate's single row, when
/// its count `n` says any row matched.
fn value_if_any<T: std::str::FromStr>(rows: &[serde_json::Value], column: &str) -> Option<T> {
    let r = rows.first()?;
    let n = r["n"]
        .as_u64()
        .or_else(|| r["n"].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0);
    if n == 0 {
        return None;
    }
    r[column].as_str().and_then(|s| s.parse().ok())
}

/// Makes `entries` current in lineage `lineage`: each one whose latest
/// registered generation differs is registered now. Returns every entry's
/// generation and registration time, in order, and whether it is new.
pub async fn register(
    client: &clickhouse::Client,
    t: &Tables,
    group: &str,
    lineage: u64,
    entries: &[Entry],
    now_ms: u64,
) -> Result<Vec<(Registered, bool)>, ChError> {
    let current = current_all(client, t).await?;
    let mut out = Vec::with_capacity(entries.len());
    let mut rows = Vec::new();
    for e in entries {
        let generation = generation(&e.fingerprint, lineage);
        let key = (e.kind.as_str().to_owned(), e.name.clone());
        match current.get(&key) {
            Some(r) if r.generation == generation => out.push((*r, false)),
            _ => {
                rows.push(format!(
                    "({}, {}, {generation}, {lineage}, {}, {}, {now_ms})",
                    literal(e.kind.as_str()),
                    literal(&e.name),
                    literal(group),
                    literal(&e.fingerprint)
                ));
                out.push((
                    Registered {
                        generation,
                        registered_ms: now_ms,
                    },
                    true,
                ));
            }
        }
    }
    if !rows.is_empty() {
        exec(
            client,
            &format!(
                "INSERT INTO {} ({}) VALUES {}",
                registry(t),
                REGISTRY_COLUMNS
                    .iter()
                    .map(|(n, _)| ident(n))
                    .collect::<Vec<_>>()
                    .join(", "),
                rows.join(", ")
            ),
        )
        .await?;
    }
    Ok(out)
}

/// The current generation of everything registered: (kind, name) → latest.
pub async fn current_all(
    client: &clickhouse::Client,
    t: &Tables,
) -> Result<std::collections::HashMap<(String, String), Registered>, ChError> {
    let rows = fetch_json(
        client,
        &format!(
            "SELECT kind, name, toString(argMax(generation, registered_ms)) AS g, toString(max(registered_ms)) AS r FROM {} GROUP BY kind, name",
            registry(t)
        ),
    )
    .await?;
    let num = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse::<u64>().ok());
    Ok(rows
        .iter()
        .filter_map(|r| {
            Some((
                (
                    r["kind"].as_str()?.to_owned(),
                    r["name"].as_str()?.to_owned(),
                ),
                Registered {
                    generation: num(&r["g"])?,
                    registered_ms: num(&r["r"])?,
                },
            ))
        })
        .collect())
}

/// Kind of the registry rows that record, per lineage and input partition,
/// the first offset the lineage read (in the `generation` column): a replay
/// into empty state must start there to rewrite exactly what was written.
pub const FIRST_READ: &str = "first_read";

fn input_name(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// One input partition of one lineage.
#[derive(Clone, Copy, Debug)]
pub struct LineageInput<'a> {
    pub group: &'a str,
    pub lineage: u64,
    pub topic: &'a str,
    pub partition: i32,
}

/// The first offset `input`'s lineage read of its partition, if it read any.
pub async fn first_read(
    client: &clickhouse::Client,
    t: &Tables,
    input: LineageInput<'_>,
) -> Result<Option<i64>, ChError> {
    let rows = fetch_json(
        client,
        &format!(
            "SELECT toString(min(generation)) AS o, count() AS n FROM {} WHERE kind = {} AND name = {} AND lineage = {}",
            registry(t),
            literal(FIRST_READ),
            literal(&input_name(input.topic, input.partition)),
            input.lineage
        ),
    )
    .await?;
    Ok(value_if_any(&rows, "o"))
}

/// Records that `input`'s lineage starts reading its partition at `offset`
/// (kept: the smallest recorded wins).
pub async fn record_first_read(
    client: &clickhouse::Client,
    t: &Tables,
    input: LineageInput<'_>,
    offset: i64,
    now_ms: u64,
) -> Result<(), ChError> {
    exec(
        client,
        &format!(
            "INSERT INTO {} ({}) VALUES ({}, {}, {}, {}, {}, '', {now_ms})",
            registry(t),
            REGISTRY_COLUMNS
                .iter()
                .map(|(n, _)| ident(n))
                .collect::<Vec<_>>()
                .join(", "),
            literal(FIRST_READ),
            literal(&input_name(input.topic, input.partition)),
            offset.max(0),
            input.lineage,
            literal(input.group),
        ),
    )
    .await
}

/// Creates the registry (after the database).
pub async fn ensure_registry(client: &clickhouse::Client, t: &Tables) -> Result<(), ChError> {
    exec(client, &registry_ddl(t)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_follow_the_definition_and_the_lineage() {
        let a = generation("fp-a", 1);
        assert_eq!(a, generation("fp-a", 1), "stable");
        assert_ne!(a, generation("fp-a", 2), "a new lineage");
        assert_ne!(a, generation("fp-b", 1), "another definition");
        assert_ne!(generation("", 0), 0);
    }

    #[test]
    fn a_changed_metric_changes_alone() {
        let d = Defaults {
            grace_ms: 60_000,
            out_of_orderness_ms: 5_000,
            clock: "in-band",
        };
        let base = Spec::default_spec();
        let narrowed = Spec::parse(&crate::spec::DEFAULT_SPEC.replacen(
            "name = \"gifts_6h\"",
            "name = \"gifts_6h\"\ngrace = \"1s\"",
            1,
        ))
        .unwrap();
        let (a, b) = (entries(&base, d), entries(&narrowed, d));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.name, y.name);
            assert_eq!(
                x.fingerprint == y.fingerprint,
                x.name != "gifts_6h",
                "{}",
                x.name
            );
        }
        // The default grace matters only where the spec sets none.
        let longer = entries(
            &base,
            Defaults {
                grace_ms: 120_000,
                ..d
            },
        );
        assert!(
            a.iter()
                .zip(&longer)
                .any(|(x, y)| x.fingerprint != y.fingerprint)
        );
        assert!(
            a.iter()
                .zip(&longer)
                .filter(|(x, _)| x.kind == Kind::Log)
                .all(|(x, y)| x.fingerprint == y.fingerprint)
        );
    }

    #[test]
    fn readers_take_the_latest_registration() {
        let t = Tables::new("vidpulse", "p.");
        assert_eq!(
            current_cond(&t, Kind::Metric, "gifts_6h"),
            "generation = (SELECT argMax(generation, registered_ms) FROM `vidpulse`.`p_vp_generations` WHERE kind = 'metric' AND name = 'gifts_6h')"
        );
        assert!(registry_ddl(&t).contains("ReplacingMergeTree(registered_ms)"));
        let c = Tables::new("vidpulse", "").with_cluster(Some("c1"));
        let ddl = registry_ddl(&c);
        assert!(
            ddl.contains("'/clickhouse/tables/all/vidpulse/vp_generations', '{shard}-{replica}'"),
            "one replication log across shards: {ddl}"
        );
        assert!(is_reserved("vp_generations") && !is_reserved("gifts_6h"));
    }
}
