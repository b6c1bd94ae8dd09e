//! `vidpulse dims`: the T+1 profile loader (`load`: anchor and viewer
//! profiles and the room → module map from CSV or JSON lines into Redis
//! hashes, pipelined, with a progress bar and a summary) and `show` (print
//! dimension hashes as JSON). The loading rules live in the dim-builder
//! crate (`vidpulse_dim_builder::load`); this file is the command line.
//!
//! Delivery guarantee: every row is written, skipped because Redis holds
//! newer data, or reported as bad with its line number; a load can be run
//! again safely (it is idempotent).

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use redis::AsyncCommands;
use serde_json::{Map, Value, json};
use vidpulse_core::config::{RedisArgs, ReplicationArgs};
use vidpulse_dim_builder::load::{self, DimKind, Format, LoadSettings, Rows};
use vidpulse_dim_builder::store::Store;

#[derive(Subcommand)]
pub enum DimsCmd {
    /// Bulk-load T+1 anchor or viewer profiles, or the room → module map,
    /// into Redis hashes. Never overwrites a field live events changed after
    /// --as-of. Bad rows are reported with their line numbers.
    Load(LoadArgs),
    /// Print dimension hashes as JSON lines (fields, and the TTL in seconds).
    Show(ShowArgs),
}

#[derive(Args)]
pub struct LoadArgs {
    /// What the file holds.
    #[arg(long, value_enum)]
    kind: DimKind,
    /// Input file; `-` reads stdin.
    #[arg(long)]
    file: String,
    /// Input format; by default from the file's extension (.csv; .jsonl,
    /// .ndjson, .json). Required for stdin.
    #[arg(long, value_enum, env = "VIDPULSE_DIMS_FORMAT")]
    format: Option<Format>,
    /// Key prefix; default by kind: `anchor:`, `viewer:`, `room:`.
    #[arg(long, env = "VIDPULSE_DIMS_KEY_PREFIX")]
    key_prefix: Option<String>,
    /// The rows' version: when the snapshot was taken. A field live events
    /// changed after it is kept. `now`, epoch ms, or RFC 3339 with an offset.
    #[arg(long, env = "VIDPULSE_DIMS_AS_OF", default_value = "now")]
    as_of: String,
    /// TTL for the loaded hashes (set when a key has none or a shorter one;
    /// rooms with a stream lifecycle keep theirs), so profiles do not live
    /// forever if the daily job stops. Default: none.
    #[arg(long, env = "VIDPULSE_DIMS_TTL", value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Rows per Redis pipeline (one round trip).
    #[arg(long, env = "VIDPULSE_DIMS_CHUNK", default_value_t = 1000)]
    chunk: usize,
    /// Rows per script call inside a pipeline (1 for a Redis Cluster proxy
    /// that refuses multi-key scripts; with --redis-cluster a call holds
    /// rows of one hash slot only).
    #[arg(long, env = "VIDPULSE_DIMS_ROWS_PER_CALL", default_value_t = 100)]
    rows_per_call: usize,
    /// Pipelines in flight at once.
    #[arg(long, env = "VIDPULSE_DIMS_IN_FLIGHT", default_value_t = 4)]
    in_flight: usize,
    /// Stop at the first bad row (exit 1) instead of reporting it.
    #[arg(long)]
    strict: bool,
    /// Resends of a chunk after a Redis connection error.
    #[arg(long, env = "VIDPULSE_DIMS_RETRIES", default_value_t = 5)]
    retries: u32,
    /// Print the summary as one JSON object (every bad row included, up to
    /// 1000) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    redis: DimsRedisArgs,
}

#[derive(Args)]
struct DimsRedisArgs {
    #[command(flatten)]
    server: RedisArgs,
    #[command(flatten)]
    replication: ReplicationArgs,
    /// Connect and response timeout of each Redis call.
    #[arg(long, env = "VIDPULSE_DIMS_REDIS_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    redis_timeout: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum ShowKind {
    Room,
    Anchor,
    Viewer,
}

#[derive(Args)]
pub struct ShowArgs {
    /// Which hashes.
    #[arg(value_enum)]
    kind: ShowKind,
    /// Ids to show.
    #[arg(required = true)]
    ids: Vec<String>,
    /// Key prefix; default by kind: `room:`, `anchor:`, `viewer:`.
    #[arg(long, env = "VIDPULSE_DIMS_KEY_PREFIX")]
    key_prefix: Option<String>,
    /// Also show bookkeeping fields (`_v`, `_v.<field>`, `_ld`, `_event_id`).
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    redis: DimsRedisArgs,
}

pub async fn run(cmd: DimsCmd) -> anyhow::Result<()> {
    match cmd {
        DimsCmd::Load(a) => run_load(a).await,
        DimsCmd::Show(a) => run_show(a).await,
    }
}

async fn run_load(a: LoadArgs) -> anyhow::Result<()> {
    let stdin = a.file == "-";
    let format = match a.format {
        Some(f) => f,
        None if stdin => bail!("--format csv|jsonl is required when reading stdin"),
        None => Format::detect(Path::new(&a.file)).with_context(|| {
            format!(
                "cannot tell the format of {} from its extension; give --format csv|jsonl",
                a.file
            )
        })?,
    };
    let as_of_ms =
        load::parse_as_of(&a.as_of).map_err(|e| anyhow::anyhow!("invalid --as-of: {e}"))?;
    let ttl_ms = match a.ttl {
        None => 0,
        Some(d) if d < Duration::from_secs(1) => bail!("invalid --ttl: shorter than a second"),
        Some(d) => i64::try_from(d.as_millis()).context("invalid --ttl: too long")?,
    };
    if a.chunk == 0 || a.rows_per_call == 0 || a.in_flight == 0 {
        bail!("--chunk, --rows-per-call and --in-flight must be at least 1");
    }
    let settings = LoadSettings {
        kind: a.kind,
        key_prefix: a
            .key_prefix
            .unwrap_or_else(|| a.kind.default_prefix().to_owned()),
        as_of_ms,
        ttl_ms,
        chunk: a.chunk,
        rows_per_call: a.rows_per_call,
        in_flight: a.in_flight,
        strict: a.strict,
        retries: a.retries,
    };
    let (reader, size): (Box<dyn BufRead>, Option<u64>) = if stdin {
        (Box::new(std::io::stdin().lock()), None)
    } else {
        let f = std::fs::File::open(&a.file).with_context(|| format!("open {}", a.file))?;
        let size = f.metadata().ok().map(|m| m.len());
        (
            Box::new(std::io::BufReader::with_capacity(1 << 20, f)),
            size,
        )
    };
    let mut rows = Rows::new(settings.kind, format, reader)?;
    let mut store = Store::open(
        &a.redis.server.redis_url,
        a.redis.server.redis_cluster,
        a.redis.redis_timeout,
        a.redis.replication.replication(),
    )?;

    let bar = progress_bar(size);
    let mut on_progress = |p: load::Progress| {
        if let Some(b) = &bar {
            if size.is_some() {
                b.set_position(p.bytes_read);
            } else {
                b.tick();
            }
            b.set_message(format!("{} rows", p.rows_done));
        }
    };
    let result = load::load(&mut store, &settings, &mut rows, &mut on_progress).await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let summary = result?;

    let mut out = std::io::stdout().lock();
    if a.json {
        let mut v = serde_json::to_value(&summary)?;
        if let Value::Object(m) = &mut v {
            m.insert("kind".into(), serde_json::to_value(settings.kind)?);
            m.insert("key_prefix".into(), json!(settings.key_prefix));
            m.insert("as_of_ms".into(), json!(settings.as_of_ms));
        }
        writeln!(out, "{v}")?;
        return Ok(());
    }
    let rate = if summary.seconds > 0.0 {
        summary.rows as f64 / summary.seconds
    } else {
        0.0
    };
    writeln!(
        out,
        "{} rows into {}*: {} loaded, {} skipped (Redis held newer data; {} fields kept), {} bad, in {:.1} s ({:.0} rows/s)",
        summary.rows,
        settings.key_prefix,
        summary.loaded,
        summary.skipped,
        summary.fields_kept,
        summary.bad,
        summary.seconds,
        rate
    )?;
    const SHOWN: usize = 20;
    for b in summary.bad_rows.iter().take(SHOWN) {
        writeln!(out, "  bad row, line {}: {}", b.line, b.reason)?;
    }
    if summary.bad > SHOWN as u64 {
        writeln!(
            out,
            "  … and {} more bad rows (--json lists up to 1000)",
            summary.bad - SHOWN as u64
        )?;
    }
    Ok(())
}

fn progress_bar(size: Option<u64>) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match size {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {msg} ({elapsed}, eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

async fn run_show(a: ShowArgs) -> anyhow::Result<()> {
    let prefix = a.key_prefix.unwrap_or_else(|| {
        match a.kind {
            ShowKind::Room => "room:",
            ShowKind::Anchor => "anchor:",
            ShowKind::Viewer => "viewer:",
        }
        .to_owned()
    });
    let mut store = Store::open(
        &a.redis.server.redis_url,
        a.redis.server.redis_cluster,
        a.redis.redis_timeout,
        a.redis.replication.replication(),
    )?;
    let mut conn = store.connection().await?;
    let mut out = std::io::stdout().lock();
    for id in &a.ids {
        let key = format!("{prefix}{id}");
        let fields: std::collections::BTreeMap<String, String> = conn.hgetall(&key).await?;
        let pttl: i64 = conn.pttl(&key).await?;
        let mut m = Map::new();
        for (k, v) in fields {
            if a.all || !k.starts_with('_') {
                m.insert(k, Value::String(v));
            }
        }
        let ttl = match pttl {
            -2 => Value::Null,
            -1 => json!("none"),
            ms => json!(ms / 1000),
        };
        let exists = pttl != -2;
        writeln!(
            out,
            "{}",
            json!({ "key": key, "exists": exists, "ttl_s": ttl, "fields": m })
        )?;
    }
    Ok(())
}
