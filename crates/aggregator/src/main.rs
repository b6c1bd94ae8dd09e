//! `vidpulse-aggregator`: see the library docs (exact windowed metrics into
//! ClickHouse, replay-safe leaderboards in Redis). Exit codes: 0 after a
//! clean drain, 1 on a fatal error, 2 on bad flags (clap).
#![forbid(unsafe_code)]

use vidpulse_core::config::StageArgs;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = vidpulse_aggregator::Args::parse_args();
    vidpulse_core::telemetry::init(args.log.log_format);
    let shutdown = vidpulse_core::shutdown::on_signal();
    vidpulse_core::exit_code(
        "vidpulse-aggregator",
        vidpulse_aggregator::run(args, shutdown).await,
    )
}
