//! `vidpulse-api`: see the library docs (rankings and metrics API, live
//! server-sent events, pools, and the dashboard page).
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = vidpulse_api::Args::parse();
    vidpulse_core::telemetry::init(args.log_format);
    let shutdown = vidpulse_core::shutdown::on_signal();
    match vidpulse_api::run(args, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "vidpulse-api failed.");
            eprintln!("vidpulse-api: {error}");
            std::process::ExitCode::from(if error.is_usage() { 2 } else { 1 })
        }
    }
}
