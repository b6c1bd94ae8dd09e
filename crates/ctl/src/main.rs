//! `vidpulse`: the operator CLI. Thin: parses flags, runs one command, maps
//! errors to exit codes (1 = failed, 2 = bad usage, from clap).
#![forbid(unsafe_code)]

mod backfill;
mod dims;
mod dlq;
mod lag;
mod mapping_check;
mod pool;
mod query;
mod tail;
mod topics;

use clap::{Parser, Subcommand};
use vidpulse_core::config::KafkaArgs;

/// Operate a vidpulse pipeline.
#[derive(Parser)]
#[command(name = "vidpulse", version)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or inspect the pipeline's topics.
    #[command(subcommand)]
    Topics(topics::TopicsCmd),
    /// Print records of any topic as JSON lines (protobuf decoded, DLQ
    /// records with their headers and original payload).
    Tail(tail::TailArgs),
    /// Check mappings offline.
    #[command(subcommand)]
    Mapping(mapping_check::MappingCmd),
    /// Dimension tables in Redis: bulk-load T+1 anchor / viewer profiles and
    /// the room → module map; show room, anchor and viewer hashes.
    #[command(subcommand)]
    Dims(dims::DimsCmd),
    /// Edit the monitor's ID pools: create, delete, add, rm, import, ls, sync.
    #[command(subcommand)]
    Pool(pool::PoolCmd),
    /// Final values of the aggregator's metrics, logs and leaderboards
    /// (`--list` names them).
    Query(query::QueryArgs),
    /// Consumer lag per stage group and partition: committed offset against
    /// the high watermark (without joining the groups).
    Lag(lag::LagArgs),
    /// Dead letters: re-drive them after a fix (`dlq replay`).
    #[command(subcommand)]
    Dlq(dlq::DlqCmd),
    /// Archived raw logs (JSON lines, plain or gzip) through a preset or
    /// mapping and the metrics spec into the metric tables and leaderboards,
    /// without Kafka: exact, idempotent, nothing late (every window closes
    /// when the input ends). `--dry-run` prints the final values instead.
    Backfill(vidpulse_backfill::BackfillArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    vidpulse_core::telemetry::init(vidpulse_core::telemetry::LogFormat::Text);
    let result = match cli.command {
        Command::Topics(cmd) => topics::run(&cli.kafka, cmd).await,
        Command::Tail(args) => tail::run(&cli.kafka, args).await,
        Command::Mapping(cmd) => mapping_check::run(cmd),
        Command::Dims(cmd) => dims::run(cmd).await,
        Command::Pool(cmd) => pool::run(&cli.kafka, cmd).await,
        Command::Query(args) => query::run(&cli.kafka, args).await,
        Command::Lag(args) => lag::run(&cli.kafka, args).await,
        Command::Dlq(cmd) => dlq::run(&cli.kafka, cmd).await,
        Command::Backfill(args) => backfill::run(&cli.kafka, args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("vidpulse: {error:#}");
            let text = format!("{error:#}");
            if text.contains("BrokerTransportFailure") || text.contains("AllBrokersDown") {
                eprintln!(
                    "vidpulse: hint: no broker at {} answered; check --kafka-brokers / VIDPULSE_KAFKA_BROKERS, \
                     and, for a TLS or SASL listener, security.protocol, ssl.ca.location and sasl.* \
                     (--kafka-option or --kafka-options-file)",
                    cli.kafka.brokers
                );
            }
            std::process::ExitCode::from(1)
        }
    }
}
