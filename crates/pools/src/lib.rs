//! ID pools, apart from the stage that applies them: a pool's definition and
//! membership rules ([`pool`]), the registry topic `vp.pools.v1` and the
//! follower that loads pool topics into memory, broadcast or bucketed
//! ([`loader`]). The monitor filters with them; `vidpulse pool` edits them;
//! the API lists them. See docs/monitor.md.
#![forbid(unsafe_code)]

pub mod loader;
pub mod metrics;
pub mod pool;

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use vidpulse_core::config::KafkaArgs;
use vidpulse_core::kafka;

pub use loader::REGISTRY_TOPIC;

/// Creates the registry topic `vp.pools.v1` (1 partition, compacted) unless
/// it exists.
pub async fn ensure_registry(
    admin: &AdminClient<DefaultClientContext>,
    kafka_args: &KafkaArgs,
) -> Result<bool, rdkafka::error::KafkaError> {
    kafka::ensure_topic(
        admin,
        &kafka_args.topic(REGISTRY_TOPIC),
        1,
        &[("cleanup.policy", "compact")],
    )
    .await
}
