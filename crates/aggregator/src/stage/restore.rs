//! Taking a partition over: a new epoch in the checkpoint store, the state
//! from its checkpoint (or empty), and where reading starts. Runs in the
//! runtime's loop (`on_assign`), never in a librdkafka callback.

use metrics::counter;
use redis::aio::ConnectionManager;
use vidpulse_query::spec::Input;

use super::STAGE;
use super::metrics::RESTORED;
use crate::checkpoint;
use crate::engine::{PartitionState, Plan};

/// Takes ownership of the checkpoint `key` and rebuilds its state. A
/// checkpoint written under another spec (or one `--reset-state` drops) is
/// cleared: the partition starts from its earliest offset with empty state.
pub(crate) async fn restore(
    con: &mut ConnectionManager,
    plan: &Plan,
    key: &str,
    input: Input,
    reset: bool,
) -> redis::RedisResult<(i64, PartitionState)> {
    let loaded = checkpoint::load(con, key).await?;
    if loaded.fields.is_empty() {
        return Ok((loaded.epoch, PartitionState::new(plan, input)));
    }
    if reset {
        tracing::info!(
            key,
            "--reset-state: dropping the checkpoint; re-reading from the earliest offset."
        );
    } else {
        match PartitionState::restore(plan, input, &loaded.fields) {
            Ok(s) => {
                counter!(RESTORED, "stage" => STAGE).increment(1);
                tracing::info!(
                    key,
                    next_offset = s.next_offset,
                    watermark = s.watermark(),
                    open_panes = s.open_panes(),
                    "Restored checkpoint."
                );
                return Ok((loaded.epoch, s));
            }
            Err(error) => {
                tracing::warn!(key, %error, "Checkpoint unusable; starting this partition from the earliest offset with empty state.");
            }
        }
    }
    checkpoint::clear(con, key, loaded.epoch).await?;
    Ok((loaded.epoch, PartitionState::new(plan, input)))
}
