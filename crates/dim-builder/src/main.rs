//! `vidpulse-dim-builder`: see the library docs. Exit codes: 0 after a clean
//! drain, 1 on a fatal error, 2 on bad flags (clap).
use vidpulse_core::config::StageArgs;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = vidpulse_dim_builder::Args::parse_args();
    vidpulse_core::telemetry::init(args.log.log_format);
    let shutdown = vidpulse_core::shutdown::on_signal();
    vidpulse_core::exit_code(
        "vidpulse-dim-builder",
        vidpulse_dim_builder::run(args, shutdown).await,
    )
}
