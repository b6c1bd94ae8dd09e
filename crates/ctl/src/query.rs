//! `vidpulse query <metric> [--from --to] [--where k=v] [--rollup [1h|1d]]
//! [--zone Z] [--format json|table]` and `vidpulse query --list`: the final
//! values of the aggregator's metrics (ClickHouse), logs and leaderboards
//! (Redis), per window or rolled up over a range, without knowing the
//! table layout. Read-only.

use std::io::Write;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde_json::Value;
use vidpulse_core::config::RedisArgs;
use vidpulse_core::config::{KafkaArgs, parse_kv};
use vidpulse_query::ClickHouseArgs;
use vidpulse_query::SpecArgs;
use vidpulse_query::read::{self as query, Filters, Row, Target};
use vidpulse_query::rollup::Rollup;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    /// One JSON object per row: `window_start` (RFC 3339 UTC), the group-by
    /// columns, the aggregates by their spec names.
    Json,
    /// Aligned columns for people.
    Table,
}

#[derive(Args)]
pub struct QueryArgs {
    /// A metric, log or leaderboard of the spec (see --list).
    #[arg(required_unless_present = "list")]
    metric: Option<String>,

    /// List the spec's metrics, logs and leaderboards and exit.
    #[arg(long)]
    list: bool,

    /// Only windows starting at or after this time (logs: events at or
    /// after it): RFC 3339, "YYYY-MM-DD HH:MM:SS" (UTC, or in --zone),
    /// YYYY-MM-DD (its 00:00) or epoch ms.
    #[arg(long)]
    from: Option<String>,

    /// Only windows starting before this time (same forms as --from).
    #[arg(long)]
    to: Option<String>,

    /// Only rows whose column equals the value, `column=value`. Repeatable.
    #[arg(long = "where", value_parser = parse_kv)]
    wheres: Vec<(String, String)>,

    /// Leaderboards: only the first N members of each window.
    #[arg(long)]
    top: Option<usize>,

    /// Fold the windows into one row per group over the whole range (no
    /// value), or per hour (1h) or day (1d), exactly: sums and counts
    /// summed, distinct counts as the size of the union, top-N ranked on
    /// the totals, min/max over the range, a level at the bucket's end.
    /// Rows gain `window_end`. Put it after the metric name
    /// (`vidpulse query gifts_by_type_1m --rollup --from 2021-08-16`).
    #[arg(long, num_args = 0..=1, default_missing_value = "all", value_name = "1h|1d")]
    rollup: Option<String>,

    /// Time zone of --rollup 1d/1h buckets and of --from/--to given without
    /// an offset (IANA name, e.g. Asia/Shanghai); default: the metric's own
    /// daily zone, else UTC.
    #[arg(long, env = "VIDPULSE_QUERY_ZONE")]
    zone: Option<String>,

    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,

    #[command(flatten)]
    spec: SpecArgs,

    #[command(flatten)]
    clickhouse: ClickHouseArgs,

    #[command(flatten)]
    redis: RedisArgs,
}

pub async fn run(kafka: &KafkaArgs, args: QueryArgs) -> anyhow::Result<()> {
    let spec = args.spec.load()?;
    let mut out = std::io::stdout().lock();
    if args.list {
        // The table leaves out the help text; --format json has it.
        let rows = query::list(&spec);
        return print(
            &mut out,
            &rows,
            args.format,
            &["name", "type", "window", "input", "group_by", "aggregates"],
        );
    }
    let Some(name) = args.metric.as_deref() else {
        bail!("name a metric, or use --list");
    };
    let target = Target::find(&spec, name).with_context(|| {
        let mut names: Vec<&str> = spec.metrics.iter().map(|m| m.name.as_str()).collect();
        names.extend(spec.logs.iter().map(|l| l.name.as_str()));
        names.extend(spec.leaderboards.iter().map(|l| l.name.as_str()));
        format!("no metric {name:?}; the spec has {}", names.join(", "))
    })?;
    let zone = args
        .zone
        .as_deref()
        .map(vidpulse_query::zone::parse_zone)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--zone: {e}"))?;
    let rollup = args
        .rollup
        .as_deref()
        .map(|v| {
            Rollup::parse(v).map_err(|e| {
                let hint = if Target::find(&spec, v).is_some() {
                    " (the metric name came right after --rollup: write the name first, `vidpulse query NAME --rollup`)"
                } else {
                    ""
                };
                anyhow::anyhow!("--rollup: {e}{hint}")
            })
        })
        .transpose()?;
    let time = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<i64>> {
        v.as_deref()
            .map(|s| query::parse_time_in(s, zone).map_err(|e| anyhow::anyhow!("{flag}: {e}")))
            .transpose()
    };
    let filters = Filters {
        from_ms: time("--from", &args.from)?,
        to_ms: time("--to", &args.to)?,
        wheres: args.wheres.clone(),
        limit: args.top,
        rollup,
        zone,
    };
    let tables = args.clickhouse.tables(&kafka.topic_prefix);
    let rows = query::run(
        &args.clickhouse.client(),
        &args.redis.client()?,
        &tables,
        &target,
        &filters,
    )
    .await?;
    let cols = if rollup.is_some() {
        target.rollup_columns()
    } else {
        target.columns()
    };
    let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
    print(&mut out, &rows, args.format, &cols)
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Prints rows; a closed pipe (`| head`) ends the output quietly.
fn print(out: &mut impl Write, rows: &[Row], format: Format, cols: &[&str]) -> anyhow::Result<()> {
    match write_rows(out, rows, format, cols) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn write_rows(
    out: &mut impl Write,
    rows: &[Row],
    format: Format,
    cols: &[&str],
) -> std::io::Result<()> {
    match format {
        Format::Json => {
            for r in rows {
                // Keys in column order (serde_json's map would sort them).
                let fields: Vec<String> = r
                    .iter()
                    .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), v))
                    .collect();
                writeln!(out, "{{{}}}", fields.join(","))?;
            }
        }
        Format::Table => {
            let text: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    cols.iter()
                        .map(|c| {
                            r.iter()
                                .find(|(k, _)| k == c)
                                .map_or_else(String::new, |(_, v)| cell(v))
                        })
                        .collect()
                })
                .collect();
            let width = |i: usize| {
                text.iter()
                    .map(|r| r[i].chars().count())
                    .chain(std::iter::once(cols[i].chars().count()))
                    .max()
                    .unwrap_or(0)
            };
            let widths: Vec<usize> = (0..cols.len()).map(width).collect();
            let line = |cells: Vec<&str>| -> String {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c}{}", " ".repeat(w.saturating_sub(c.chars().count()))))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_owned()
            };
            writeln!(out, "{}", line(cols.to_vec()))?;
            for r in &text {
                writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
            }
            if rows.is_empty() {
                writeln!(out, "(no rows)")?;
            }
        }
    }
    Ok(())
}
