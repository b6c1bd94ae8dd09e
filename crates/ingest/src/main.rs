//! `vidpulse-ingest`: see the library docs.
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = vidpulse_ingest::Args::parse();
    vidpulse_core::telemetry::init(args.admin.log_format);
    if args.list_presets {
        for (name, toml) in vidpulse_ingest::presets::PRESETS {
            println!("# ---- preset {name} ----\n{toml}");
        }
        return std::process::ExitCode::SUCCESS;
    }
    let shutdown = vidpulse_core::shutdown::on_signal();
    match vidpulse_ingest::run(args, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "vidpulse-ingest failed.");
            eprintln!("vidpulse-ingest: {error}");
            std::process::ExitCode::from(1)
        }
    }
}
