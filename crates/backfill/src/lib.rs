//! `vidpulse backfill`: archived raw logs (JSON lines, plain or gzip) through
//! a mapping or preset and the metrics spec, straight into the ClickHouse
//! tables and Redis leaderboards the stream writes — no Kafka. Also the fair
//! benchmark harness: one query over a file (`--dry-run`).
//!
//! Delivery: exact and idempotent. Batch mode: nothing is late (every window
//! closes when the input ends); duplicates (same id, same key) are counted
//! once; a rerun over the same files writes identical rows and partials;
//! a backfill's rows and partials never collide with the stream's (see
//! [`sink`]). Bad lines are counted by reason with their file and line, never
//! fatal. See docs/backfill.md.
#![forbid(unsafe_code)]

pub mod finals;
pub mod input;
pub mod parse;
pub mod partitions;
pub mod run;
pub mod sink;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use vidpulse_aggregator::engine::Plan;
use vidpulse_aggregator::leaderboard;
use vidpulse_aggregator::lineage::{self, Generations};
use vidpulse_aggregator::spec::Spec;
use vidpulse_aggregator::window::ClockMode;
use vidpulse_core::config::RedisArgs;
use vidpulse_ingest::mapping::Mapping;
use vidpulse_ingest::reject::Reason;
use vidpulse_query::read::{Row, Target};
use vidpulse_query::{ClickHouseArgs, SpecArgs, generation};

use crate::input::{BytesRead, Source};
use crate::parse::{BadLine, Parser};

/// Backfill archived raw logs into the metric tables and leaderboards.
#[derive(Args, Debug, Clone)]
pub struct BackfillArgs {
    /// Files of raw records, one JSON object a line, plain or gzip (told by
    /// the content), read through the bare --preset or --mapping. Read in
    /// order, after the files given as --preset NAME=FILE / --mapping M=FILE.
    pub files: Vec<PathBuf>,

    /// The preset that reads the FILE arguments (`NAME`), or one that reads
    /// one more file (`NAME=FILE`). Repeatable. Presets: video_events,
    /// video_messages, play_request, live_streaming_log, live_gift_total,
    /// live_room_events, video_production_log, video_consumption_log,
    /// user_actions.
    #[arg(long = "preset", value_name = "NAME[=FILE]")]
    pub presets: Vec<String>,

    /// A TOML mapping (docs/mapping.md) that reads the FILE arguments
    /// (`MAPPING`), or one more file (`MAPPING=FILE`). Repeatable.
    #[arg(long = "mapping", value_name = "MAPPING[=FILE]")]
    pub mappings: Vec<String>,

    /// Compute the final values in memory and print them as `vidpulse query
    /// --format json` does (one object per row; with several metrics each
    /// row starts with "name"); write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Only these metrics, logs or leaderboards of the spec (repeatable):
    /// the others are neither computed nor written.
    #[arg(long = "metric", value_name = "NAME")]
    pub metrics: Vec<String>,

    /// The backfill's name: its rows and leaderboard partials are its own
    /// (a rerun under the same name replaces them with identical ones;
    /// another name adds to them). Letters, digits, `_`, `-`, `.`.
    #[arg(long, env = "VIDPULSE_BACKFILL_NAME", default_value = "default")]
    pub name: String,

    /// The aggregator's consumer group whose results the backfill adds to:
    /// a definition the stream has not registered yet is registered in this
    /// group's lineage, as its first start would (the topic prefix applies).
    #[arg(long, env = "VIDPULSE_BACKFILL_GROUP", default_value = vidpulse_aggregator::DEFAULT_GROUP)]
    pub group: String,

    /// Virtual partitions the events are split over by their key (as the
    /// stream's partitions; 1 to 1024). Rerun a backfill with the same
    /// number.
    #[arg(long, env = "VIDPULSE_BACKFILL_PARTITIONS", default_value_t = 16)]
    pub partitions: u32,

    /// Threads (default: the machine's cores). The result does not depend
    /// on it.
    #[arg(long, env = "VIDPULSE_BACKFILL_THREADS")]
    pub threads: Option<usize>,

    /// Metrics on vp.monitored.v1 take every event as a member of this
    /// site-wide pool (room fields from the rooms' start events).
    #[arg(long, env = "VIDPULSE_BACKFILL_POOL", default_value = "all")]
    pub pool: String,

    /// Also write every bad line here (JSON lines: file, line, reason,
    /// detail, text).
    #[arg(long, env = "VIDPULSE_BACKFILL_BAD_LINES")]
    pub bad_lines: Option<PathBuf>,

    /// Zone of zone-less times for mappings that name none (IANA name).
    #[arg(
        long,
        env = "VIDPULSE_BACKFILL_TIME_ZONE",
        default_value = "Asia/Shanghai"
    )]
    pub time_zone: String,

    /// A line longer than this is bad (`payload_too_large`).
    #[arg(long, env = "VIDPULSE_BACKFILL_MAX_LINE_BYTES", default_value_t = 1024 * 1024)]
    pub max_line_bytes: usize,

    /// An event time more than this after the backfill's start is a bad
    /// clock (`time_in_future`).
    #[arg(long, env = "VIDPULSE_BACKFILL_MAX_FUTURE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_future: Duration,

    /// No progress bar (it is drawn only when stderr is a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,

    #[command(flatten)]
    pub spec: SpecArgs,

    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,

    #[command(flatten)]
    pub redis: RedisArgs,
}

/// Why a backfill could not run or finish. Bad lines are not errors.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("{flag}: {message}")]
    Usage { flag: &'static str, message: String },
    #[error(transparent)]
    Spec(#[from] vidpulse_query::SpecError),
    #[error("cannot read {file}: {error}")]
    Read { file: String, error: std::io::Error },
    #[error("{sink}: {message}")]
    Write { sink: &'static str, message: String },
    #[error("cannot write the bad lines to {file}: {error}")]
    BadLinesFile { file: String, error: std::io::Error },
    #[error("a worker thread panicked")]
    Panicked,
}

fn usage(flag: &'static str, message: impl Into<String>) -> BackfillError {
    BackfillError::Usage {
        flag,
        message: message.into(),
    }
}

/// The validated run.
pub struct Settings {
    pub spec: Spec,
    pub mappings: Vec<Mapping>,
    pub sources: Vec<Source>,
    pub threads: usize,
}

impl Settings {
    pub fn from_args(args: &BackfillArgs) -> Result<Settings, BackfillError> {
        let zone: chrono_tz::Tz = args.time_zone.parse().map_err(|_| {
            usage(
                "--time-zone",
                format!(
                    "{:?} is not an IANA zone (e.g. Asia/Shanghai)",
                    args.time_zone
                ),
            )
        })?;
        if !(1..=sink::MAX_PARTITIONS).contains(&args.partitions) {
            return Err(usage(
                "--partitions",
                format!(
                    "{} is not between 1 and {}",
                    args.partitions,
                    sink::MAX_PARTITIONS
                ),
            ));
        }
        if args.name.is_empty()
            || !args
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(usage(
                "--name",
                format!("{:?}: use letters, digits, _, - and . only", args.name),
            ));
        }
        if args.pool.is_empty() {
            return Err(usage("--pool", "give a pool name (default: all)"));
        }
        let threads = match args.threads {
            Some(0) => return Err(usage("--threads", "must be at least 1")),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        // Mappings: a bare one reads the positional files; NAME=FILE reads one.
        let mut mappings = Vec::new();
        let mut bare: Option<usize> = None;
        let mut sources = Vec::new();
        let specs = args
            .presets
            .iter()
            .map(|v| ("--preset", v))
            .chain(args.mappings.iter().map(|v| ("--mapping", v)));
        for (flag, value) in specs {
            let (what, file) = match value.split_once('=') {
                Some((w, f)) => (w, Some(f)),
                None => (value.as_str(), None),
            };
            let mapping = if flag == "--preset" {
                match vidpulse_ingest::presets::preset(what, zone) {
                    Some(m) => m.map_err(|e| usage("--preset", e.to_string()))?,
                    None => {
                        let names: Vec<&str> = vidpulse_ingest::presets::names().collect();
                        return Err(usage(
                            "--preset",
                            format!("no preset {what:?}; presets: {}", names.join(", ")),
                        ));
                    }
                }
            } else {
                let text = std::fs::read_to_string(what)
                    .map_err(|e| usage("--mapping", format!("cannot read {what}: {e}")))?;
                Mapping::from_toml(&text, zone)
                    .map_err(|e| usage("--mapping", format!("{what}: {e}")))?
            };
            mappings.push(mapping);
            let idx = mappings.len() - 1;
            match file {
                Some(f) => sources.push(source(flag, f.into(), idx)?),
                None if bare.is_some() => {
                    return Err(usage(
                        flag,
                        "only one --preset or --mapping may read the FILE arguments; bind the others to a file with NAME=FILE",
                    ));
                }
                None => bare = Some(idx),
            }
        }
        match bare {
            Some(idx) => {
                if args.files.is_empty() {
                    return Err(usage(
                        "FILE",
                        "name the files to read after the flags (or bind them: --preset NAME=FILE)",
                    ));
                }
                for f in &args.files {
                    sources.push(source("FILE", f.clone(), idx)?);
                }
            }
            None if !args.files.is_empty() => {
                return Err(usage(
                    "--preset",
                    "say how to read the FILE arguments: --preset NAME or --mapping FILE.toml",
                ));
            }
            None if sources.is_empty() => {
                return Err(usage(
                    "--preset",
                    "nothing to read: give --preset NAME (or --mapping FILE.toml) and the files",
                ));
            }
            None => {}
        }
        let mut seen = std::collections::HashSet::new();
        for s in &sources {
            if !seen.insert(s.label.clone()) {
                return Err(usage(
                    "FILE",
                    format!("{} is given twice: its lines would count twice", s.label),
                ));
            }
        }
        let spec = only(args.spec.load()?, &args.metrics)?;
        Ok(Settings {
            spec,
            mappings,
            sources,
            threads,
        })
    }
}

fn source(flag: &'static str, path: PathBuf, mapping: usize) -> Result<Source, BackfillError> {
    let meta = std::fs::metadata(&path)
        .map_err(|e| usage(flag, format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(usage(flag, format!("{} is not a file", path.display())));
    }
    Ok(Source {
        label: path.display().to_string(),
        path,
        mapping,
    })
}

/// The spec restricted to the named entries (all of it when none is named).
pub fn only(spec: Spec, names: &[String]) -> Result<Spec, BackfillError> {
    if names.is_empty() {
        return Ok(spec);
    }
    for n in names {
        if Target::find(&spec, n).is_none() {
            let mut all: Vec<&str> = spec.metrics.iter().map(|m| m.name.as_str()).collect();
            all.extend(spec.logs.iter().map(|l| l.name.as_str()));
            all.extend(spec.leaderboards.iter().map(|l| l.name.as_str()));
            return Err(usage(
                "--metric",
                format!("no metric {n:?}; the spec has {}", all.join(", ")),
            ));
        }
    }
    let keep = |n: &String| names.contains(n);
    Ok(Spec {
        metrics: spec.metrics.into_iter().filter(|m| keep(&m.name)).collect(),
        logs: spec.logs.into_iter().filter(|l| keep(&l.name)).collect(),
        leaderboards: spec
            .leaderboards
            .into_iter()
            .filter(|l| keep(&l.name))
            .collect(),
    })
}

/// What a backfill did.
#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub lines: u64,
    pub events: u64,
    pub counts: partitions::Counts,
    /// Bad lines by reason, most frequent first.
    pub bad_by_reason: Vec<(Reason, u64)>,
    /// The first bad lines: (file, line, reason, detail).
    pub bad_sample: Vec<(String, u64, Reason, String)>,
    pub bad: u64,
    /// `--dry-run`: each entry's final rows.
    pub values: Vec<(String, Vec<Row>)>,
    pub written: sink::Written,
    /// Reading, parsing and aggregating.
    pub compute: Duration,
    /// Writing (0 with --dry-run).
    pub write: Duration,
}

/// How many bad lines the report names.
pub const BAD_SAMPLE: usize = 10;

/// Each definition's current generation, the one the stream writes and
/// `vidpulse query` reads: the registry's when the stream (or an earlier
/// backfill) registered it; else registered now in `group`'s lineage with
/// the aggregator's default flags, as the group's first start would, so
/// the stream then writes the same generation. A later change of the
/// definition (or `--reset-state`) starts a new generation without the
/// backfill's rows: rerun the backfill then.
async fn generations(
    ch: &clickhouse::Client,
    tables: &vidpulse_query::Tables,
    redis: &mut vidpulse_core::redis::RedisConn,
    spec: &Spec,
    group: &str,
) -> Result<Generations, BackfillError> {
    let ch_err = |e: vidpulse_query::ChError| BackfillError::Write {
        sink: "clickhouse",
        message: e.message,
    };
    let mut current = generation::current_all(ch, tables).await.map_err(ch_err)?;
    let entries = generation::entries(
        spec,
        generation::Defaults {
            grace_ms: AGGREGATOR_GRACE_MS,
            out_of_orderness_ms: AGGREGATOR_OUT_OF_ORDERNESS_MS,
            clock: "in-band",
        },
    );
    let key = |e: &generation::Entry| (e.kind.as_str().to_owned(), e.name.clone());
    let missing: Vec<generation::Entry> = entries
        .iter()
        .filter(|e| !current.contains_key(&key(e)))
        .cloned()
        .collect();
    if !missing.is_empty() {
        let (lineage, _) = lineage::resolve(redis, ch, tables, group, false)
            .await
            .map_err(|e| match e {
                lineage::LineageError::Redis(e) => BackfillError::Write {
                    sink: "redis",
                    message: e.to_string(),
                },
                lineage::LineageError::ClickHouse(e) => ch_err(e),
            })?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let registered = generation::register(ch, tables, group, lineage, &missing, now)
            .await
            .map_err(ch_err)?;
        for (e, (r, _)) in missing.iter().zip(registered) {
            current.insert(key(e), r);
        }
    }
    let mut g = Generations::default();
    for e in &entries {
        let r = current[&key(e)];
        match e.kind {
            generation::Kind::Metric => g.metrics.push(r.generation),
            generation::Kind::Log => g.logs.push(r.generation),
            generation::Kind::Leaderboard => g
                .boards
                .push(leaderboard::stamp(r.registered_ms, r.generation)),
        }
    }
    Ok(g)
}

/// The aggregator's defaults (`--grace`, `--out-of-orderness`), part of a
/// definition's fingerprint.
const AGGREGATOR_GRACE_MS: i64 = 60_000;
const AGGREGATOR_OUT_OF_ORDERNESS_MS: i64 = 5_000;

/// Runs a backfill. `prefix` is the pipeline's topic prefix (it names the
/// tables and leaderboard keys).
pub async fn run(args: &BackfillArgs, prefix: &str) -> Result<Report, BackfillError> {
    let settings = Settings::from_args(args)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let parser = Parser {
        mappings: settings.mappings,
        max_line_bytes: args.max_line_bytes,
        max_future_ms: i64::try_from(args.max_future.as_millis()).unwrap_or(i64::MAX),
        now_ms,
    };
    let tables = args.clickhouse.tables(prefix);
    // Connect before the work, so a wrong address fails at once.
    let mut sink = if args.dry_run {
        None
    } else {
        let ch = args.clickhouse.client();
        vidpulse_query::schema::ensure_schema(&ch, &tables, &settings.spec)
            .await
            .map_err(|e| BackfillError::Write {
                sink: "clickhouse",
                message: e.message,
            })?;
        let client = args
            .redis
            .client()
            .map_err(|e| usage("--redis-url", e.to_string()))?;
        let redis = client
            .connect_managed(vidpulse_core::redis::ConnectOptions::default())
            .await
            .map_err(|e| BackfillError::Write {
                sink: "redis",
                message: e.to_string(),
            })?;
        let mut redis = redis;
        let gens = generations(
            &ch,
            &tables,
            &mut redis,
            &settings.spec,
            &format!("{prefix}{}", args.group),
        )
        .await?;
        Some(sink::Sink {
            ch,
            tables: &tables,
            redis,
            gens,
            prefix,
            name: &args.name,
            slot: sink::slot(&args.name),
        })
    };
    let plan = Plan::with_clock(settings.spec.clone(), 0, 0, ClockMode::InBand);
    let progress = BytesRead::default();
    let total: u64 = settings
        .sources
        .iter()
        .filter_map(|s| std::fs::metadata(&s.path).ok())
        .map(|m| m.len())
        .sum();
    let job = run::Job {
        plan: &plan,
        parser: &parser,
        sources: &settings.sources,
        partitions: args.partitions,
        threads: settings.threads,
        pool: &args.pool,
        progress: progress.clone(),
    };
    let started = Instant::now();
    let out = tokio::task::block_in_place(|| {
        with_progress(&progress, total, !args.no_progress, || job.run())
    })?;
    let compute = started.elapsed();
    if let Some(path) = &args.bad_lines {
        write_bad_lines(path, &settings.sources, &out.bad)?;
    }
    let mut report = Report {
        files: settings.sources.len(),
        lines: out.lines,
        events: out.events,
        counts: out.counts,
        bad: out.bad.len() as u64,
        compute,
        ..Report::default()
    };
    let mut by: std::collections::BTreeMap<&'static str, (Reason, u64)> = Default::default();
    for b in &out.bad {
        by.entry(b.reason.code()).or_insert((b.reason, 0)).1 += 1;
    }
    report.bad_by_reason = by.into_values().collect();
    report.bad_by_reason.sort_by_key(|r| std::cmp::Reverse(r.1));
    report.bad_sample = out
        .bad
        .iter()
        .take(BAD_SAMPLE)
        .map(|b| {
            (
                settings.sources[b.source].label.clone(),
                b.line,
                b.reason,
                b.detail.clone(),
            )
        })
        .collect();
    match sink.as_mut() {
        None => {
            let spec = &plan.spec;
            let names = spec
                .metrics
                .iter()
                .map(|m| &m.name)
                .chain(spec.logs.iter().map(|l| &l.name))
                .chain(spec.leaderboards.iter().map(|l| &l.name));
            for n in names {
                if let Some(t) = Target::find(spec, n) {
                    report
                        .values
                        .push((n.clone(), finals::rows(spec, &out.emitted, &t)));
                }
            }
        }
        Some(sink) => {
            let t = Instant::now();
            report.written = sink.write(&plan.spec, &out.emitted).await?;
            report.write = t.elapsed();
        }
    }
    Ok(report)
}

/// Runs `f` with a progress bar over the bytes read (drawn only on a
/// terminal).
fn with_progress<T: Send>(
    progress: &BytesRead,
    total: u64,
    show: bool,
    f: impl FnOnce() -> T + Send,
) -> T {
    use std::sync::atomic::Ordering;
    let bar = if show {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "backfill {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let done = std::sync::atomic::AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        if !bar.is_hidden() {
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    bar.set_position(progress.0.load(Ordering::Relaxed));
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        let out = f();
        done.store(true, Ordering::Relaxed);
        out
    });
    bar.finish_and_clear();
    out
}

fn write_bad_lines(
    path: &PathBuf,
    sources: &[Source],
    bad: &[BadLine],
) -> Result<(), BackfillError> {
    use std::io::Write;
    let err = |e| BackfillError::BadLinesFile {
        file: path.display().to_string(),
        error: e,
    };
    let f = std::fs::File::create(path).map_err(err)?;
    let mut w = std::io::BufWriter::new(f);
    for b in bad {
        let v = serde_json::json!({
            "file": sources[b.source].label,
            "line": b.line,
            "reason": b.reason.code(),
            "detail": b.detail,
            "text": b.text,
        });
        writeln!(w, "{v}").map_err(err)?;
    }
    w.flush().map_err(err)
}
