//! vidpulse-gen: writes the seeds' raw formats to the raw topics at a
//! chosen rate, with chosen fractions of malformed, late and duplicate
//! records, and a ground-truth JSON file to check the pipeline against.
//! Every produce is acknowledged before the truth is written.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser};
use tracing::error;
use vidpulse_core::config::KafkaArgs;
use vidpulse_core::telemetry::{self, LogFormat};
use vidpulse_gen::GenConfig;
use vidpulse_gen::config::{parse_formats, parse_start};
use vidpulse_gen::run::{RunError, RunSettings, Sink, run};

/// Load generator for the raw topics, deterministic for a given --seed.
#[derive(Parser, Debug)]
#[command(name = "vidpulse-gen", version, about)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,

    /// Records to send in all (valid, late, duplicate and malformed).
    #[arg(
        long,
        env = "VIDPULSE_GEN_COUNT",
        default_value_t = 10_000,
        conflicts_with = "duration"
    )]
    count: u64,

    /// Records per second; 0 sends as fast as possible.
    #[arg(long, env = "VIDPULSE_GEN_RATE", default_value_t = 0)]
    rate: u64,

    /// Send for this long at --rate (instead of --count), e.g. `5m`.
    #[arg(long, env = "VIDPULSE_GEN_DURATION", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,

    /// Seed of the record stream: same seed and flags, same bytes and truth.
    #[arg(long, env = "VIDPULSE_GEN_SEED", default_value_t = 1)]
    seed: u64,

    /// Where event times begin: `now`, or RFC 3339 (converted to UTC,
    /// whole seconds). With `now` the span ends at the current second, so
    /// event times run from now − span up to now and never into the future;
    /// only an explicit future time dates records in the future.
    #[arg(long, env = "VIDPULSE_GEN_START", default_value = "now")]
    start: String,

    /// Event times rise through [start, start + span) in production order
    /// (late records go back a further --late-by).
    #[arg(long, env = "VIDPULSE_GEN_SPAN", default_value = "10m", value_parser = humantime::parse_duration)]
    span: Duration,

    /// Stamp each record with the wall clock at the moment it is sent
    /// (minus up to 1 s of jitter; late records --late-by earlier) instead
    /// of spreading times over --start/--span: live data for dashboards.
    /// Needs --rate. The records are the same for a given --seed, the times
    /// are not.
    #[arg(long, env = "VIDPULSE_GEN_WALL_CLOCK", conflicts_with_all = ["start", "span"])]
    wall_clock: bool,

    /// Raw topics to generate, comma-separated, or `all`.
    #[arg(
        long,
        env = "VIDPULSE_GEN_FORMATS",
        value_delimiter = ',',
        default_value = "all"
    )]
    formats: Vec<String>,

    /// Fraction of records that are malformed (each with a known DLQ reason).
    #[arg(long, env = "VIDPULSE_GEN_BAD_FRACTION", default_value_t = 0.0)]
    bad_fraction: f64,

    /// Fraction of records whose event time is set back by --late-by.
    #[arg(long, env = "VIDPULSE_GEN_LATE_FRACTION", default_value_t = 0.0)]
    late_fraction: f64,

    /// How far back a late record's event time is set.
    #[arg(long, env = "VIDPULSE_GEN_LATE_BY", default_value = "30s", value_parser = humantime::parse_duration)]
    late_by: Duration,

    /// Fraction of records that re-send an earlier valid record byte for
    /// byte, with the same key.
    #[arg(long, env = "VIDPULSE_GEN_DUP_FRACTION", default_value_t = 0.0)]
    dup_fraction: f64,

    /// Put `"event_id": "g<seed>-<seq>"` in every valid record. With
    /// `false` no record has one, and --dup-fraction must be 0.
    #[arg(long, env = "VIDPULSE_GEN_EVENT_IDS", default_value_t = true, action = ArgAction::Set)]
    event_ids: bool,

    /// Where to write the ground-truth JSON.
    #[arg(long, env = "VIDPULSE_GEN_TRUTH", default_value = "gen-truth.json")]
    truth: PathBuf,

    /// Distinct users.
    #[arg(long, env = "VIDPULSE_GEN_USERS", default_value_t = 2000)]
    users: u32,

    /// Distinct videos.
    #[arg(long, env = "VIDPULSE_GEN_VIDEOS", default_value_t = 500)]
    videos: u32,

    /// Distinct live rooms.
    #[arg(long, env = "VIDPULSE_GEN_ROOMS", default_value_t = 20)]
    rooms: u32,

    /// Distinct authors (and anchors).
    #[arg(long, env = "VIDPULSE_GEN_AUTHORS", default_value_t = 100)]
    authors: u32,

    /// Write the records as JSON lines {"topic","key","payload"} to this
    /// file (`-` for stdout) instead of producing to Kafka.
    #[arg(long, env = "VIDPULSE_GEN_OUT_FILE")]
    out_file: Option<PathBuf>,

    /// Create missing raw topics before producing.
    #[arg(long, env = "VIDPULSE_GEN_CREATE_TOPICS")]
    create_topics: bool,

    /// Partitions of topics made by --create-topics.
    #[arg(long, env = "VIDPULSE_GEN_PARTITIONS", default_value_t = vidpulse_core::topics::DEFAULT_RAW_PARTITIONS)]
    partitions: i32,

    /// Log format.
    #[arg(long, env = "VIDPULSE_GEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

impl Cli {
    fn settings(self) -> Result<RunSettings, RunError> {
        let count = match self.duration {
            Some(d) if self.rate == 0 => {
                return Err(invalid(
                    "--duration",
                    format!(
                        "needs --rate > 0 (got --duration {})",
                        humantime::format_duration(d)
                    ),
                ));
            }
            Some(d) => (d.as_secs_f64() * self.rate as f64).round() as u64,
            None => self.count,
        };
        let now = chrono::Utc::now();
        let (start, span) = if self.wall_clock {
            if self.rate == 0 {
                return Err(invalid(
                    "--wall-clock",
                    "needs --rate > 0: records are stamped as they are sent, so they must be paced"
                        .into(),
                ));
            }
            // The truth's nominal start; each record takes the clock.
            let secs = (count / self.rate).max(1);
            (
                parse_start("now", now, Duration::ZERO)?,
                Duration::from_secs(secs),
            )
        } else {
            (parse_start(&self.start, now, self.span)?, self.span)
        };
        let config = GenConfig {
            seed: self.seed,
            count,
            start,
            span,
            wall_clock: self.wall_clock,
            formats: parse_formats(&self.formats)?,
            bad_fraction: self.bad_fraction,
            late_fraction: self.late_fraction,
            late_by: self.late_by,
            dup_fraction: self.dup_fraction,
            event_ids: self.event_ids,
            users: self.users,
            videos: self.videos,
            rooms: self.rooms,
            authors: self.authors,
        };
        config.validate()?;
        if self.create_topics && self.partitions < 1 {
            return Err(invalid("--partitions", "must be at least 1".into()));
        }
        let sink = match self.out_file {
            Some(path) => Sink::File(path),
            None => Sink::Kafka {
                args: self.kafka,
                create_topics: self.create_topics.then_some(self.partitions),
            },
        };
        Ok(RunSettings {
            config,
            rate: self.rate,
            sink,
            truth_path: self.truth,
            progress: std::io::stderr().is_terminal(),
        })
    }
}

fn invalid(flag: &'static str, message: String) -> RunError {
    vidpulse_gen::GenError::Invalid { flag, message }.into()
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let result = match cli.settings() {
        Ok(settings) => run(settings, vidpulse_core::shutdown::on_signal()).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "vidpulse-gen failed.");
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}
