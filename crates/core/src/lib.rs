//! Shared pieces of every vidpulse stage: the config blocks each binary
//! flattens into its flags, Kafka client setup, the offset tracker and the
//! consume→process→produce loop, shutdown on SIGTERM/SIGINT, the admin HTTP
//! port (`/healthz`, `/readyz`, `/metrics`), metric names and DLQ headers.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod dlq;
pub mod kafka;
pub mod metrics;
pub mod offsets;
pub mod pipeline;
pub mod shutdown;
pub mod sink;
pub mod telemetry;
pub mod topics;

pub use tokio_util::sync::CancellationToken;

/// Every vidpulse binary links this crate, so this sets the allocator for all
/// of them: mimalloc, which with its `override` feature also serves the C
/// code in the process (librdkafka, OpenSSL). With glibc's malloc the
/// consume → produce loop spent half of its waits on the arena lock:
/// librdkafka frees on its broker thread what our thread allocated.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
