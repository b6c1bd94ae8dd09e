//! `vidpulse-ingest`: see the library docs. Exit codes: 0 after a clean
//! drain, 1 on a fatal error, 2 on bad flags (clap).
use vidpulse_core::config::StageArgs;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = vidpulse_ingest::Args::parse_args();
    vidpulse_core::telemetry::init(args.log.log_format);
    if args.list_presets {
        for (name, toml) in vidpulse_ingest::presets::PRESETS {
            println!("# ---- preset {name} ----\n{toml}");
        }
        return std::process::ExitCode::SUCCESS;
    }
    let shutdown = vidpulse_core::shutdown::on_signal();
    vidpulse_core::exit_code(
        "vidpulse-ingest",
        vidpulse_ingest::run(args, shutdown).await,
    )
}
