//! `vidpulse query <metric> [--from --to] [--where k=v] [--format json|table]`
//! and `vidpulse query --list`: the final values of the aggregator's
//! metrics (ClickHouse), logs and leaderboards (Redis), without knowing the
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
    /// after it): RFC 3339, "YYYY-MM-DD HH:MM:SS" (UTC), YYYY-MM-DD or epoch ms.
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
    let filters = Filters {
        from_ms: args.from.as_deref().map(query::parse_time).transpose()?,
        to_ms: args.to.as_deref().map(query::parse_time).transpose()?,
        wheres: args.wheres.clone(),
        limit: args.top,
    };
    let tables = args.clickhouse.tables(&kafka.topic_prefix);
    let rows = query::run(
        &args.clickhouse.client(),
        &args.redis.redis_url,
        &tables,
        &target,
        &filters,
    )
    .await?;
    let cols = target.columns();
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
