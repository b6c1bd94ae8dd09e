//! `vidpulse-aggregator`: see the library docs (exact windowed metrics into
//! ClickHouse, replay-safe leaderboards in Redis).
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = vidpulse_aggregator::Args::parse();
    vidpulse_core::telemetry::init(args.admin.log_format);
    let shutdown = vidpulse_core::shutdown::on_signal();
    match vidpulse_aggregator::run(args, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "vidpulse-aggregator failed.");
            eprintln!("vidpulse-aggregator: {error}");
            std::process::ExitCode::from(1)
        }
    }
}
