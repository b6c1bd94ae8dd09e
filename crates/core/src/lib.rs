//! Shared pieces of every vidpulse stage: the config blocks each binary
//! flattens into its flags, Kafka client setup, the stage runtime (the one
//! consume → process → produce loop, with the offset tracker, rebalances,
//! retries and drain), shutdown on SIGTERM/SIGINT, typed health and the
//! admin HTTP port (`/healthz`, `/readyz`, `/metrics`), metric names and DLQ
//! headers.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod dlq;
pub mod health;
pub mod kafka;
pub mod metrics;
pub mod offsets;
pub mod produce;
pub mod redis;
pub mod retry;
pub mod runtime;
pub mod shutdown;
pub mod telemetry;
pub mod topics;
pub mod watermark;

pub use runtime::error_chain;

/// The end of a binary's `main`: a failure is logged and printed with its
/// causes and exits 1; success exits 0.
pub fn exit_code<E: std::error::Error>(
    binary: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let error = error_chain(&error);
            tracing::error!(%error, "{binary} failed.");
            eprintln!("{binary}: {error}");
            std::process::ExitCode::from(1)
        }
    }
}

pub use tokio_util::sync::CancellationToken;

/// Every vidpulse binary links this crate, so this sets the allocator for all
/// of them: mimalloc, which with its `override` feature also serves the C
/// code in the process (librdkafka, OpenSSL). With glibc's malloc the
/// consume → produce loop spent half of its waits on the arena lock:
/// librdkafka frees on its broker thread what our thread allocated.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
