//! `vidpulse-dim-builder`: see the library docs. Exit codes: 0 after a clean
//! drain, 1 on a fatal error, 2 on bad flags (clap).
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = vidpulse_dim_builder::Args::parse();
    vidpulse_core::telemetry::init(args.admin.log_format);
    let shutdown = vidpulse_core::shutdown::on_signal();
    match vidpulse_dim_builder::run(args, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "vidpulse-dim-builder failed.");
            eprintln!("vidpulse-dim-builder: {error}");
            std::process::ExitCode::from(1)
        }
    }
}
