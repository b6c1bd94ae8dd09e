//! `vidpulse-monitor`: see the library docs.
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = vidpulse_monitor::Args::parse();
    vidpulse_core::telemetry::init(args.admin.log_format);
    let shutdown = vidpulse_core::shutdown::on_signal();
    match vidpulse_monitor::run(args, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "vidpulse-monitor failed.");
            eprintln!("vidpulse-monitor: {error}");
            std::process::ExitCode::from(1)
        }
    }
}
