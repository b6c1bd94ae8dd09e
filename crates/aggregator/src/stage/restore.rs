//! Taking a partition over: a new epoch in the checkpoint store, the state
//! from its checkpoint (or empty), and where reading starts. Runs in the
//! runtime's loop (`on_assign`), never in a librdkafka callback.
//!
//! A checkpoint is used only when the partition still holds what it was
//! taken over: its offset must lie within the partition (not beyond its
//! end: the topic was recreated or truncated), the records after it must
//! not have been deleted unread, and the last record it covers must still
//! be the same record (checked when reading resumes one record early). A
//! replay into empty state must start where this lineage first started
//! reading the partition: if retention deleted records since, the windows
//! they were in would be rewritten with partial values. Each of these stops
//! the aggregator with a message naming the partition and the way out
//! (`--reset-state`, `--allow-partial-replay`), rather than count wrong.

use metrics::counter;
use vidpulse_core::redis::RedisConn;
use vidpulse_query::spec::Input;

use super::STAGE;
use super::metrics::RESTORED;
use crate::checkpoint;
use crate::engine::{PartitionState, Plan};

/// A partition taken over.
pub(crate) struct Restored {
    pub epoch: i64,
    pub state: PartitionState,
    /// Its checkpoint hash exists (restored, not started afresh).
    pub existing: bool,
    /// Writes the hash holds (the next write must find this many).
    pub seq: u64,
}

/// Takes ownership of the checkpoint `key` and rebuilds its state. A
/// checkpoint written under another spec (or one `--reset-state` drops) is
/// cleared: the partition starts from its earliest offset with empty state.
pub(crate) async fn restore(
    con: &mut RedisConn,
    plan: &Plan,
    key: &str,
    input: Input,
    reset: bool,
) -> redis::RedisResult<Restored> {
    let loaded = checkpoint::load(con, key).await?;
    let fresh = |epoch, seq| Restored {
        epoch,
        state: PartitionState::new(plan, input),
        existing: false,
        seq,
    };
    if loaded.fields.is_empty() {
        return Ok(fresh(loaded.epoch, loaded.seq));
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
                    writes = loaded.seq,
                    "Restored checkpoint."
                );
                return Ok(Restored {
                    epoch: loaded.epoch,
                    state: s,
                    existing: true,
                    seq: loaded.seq,
                });
            }
            Err(error) => {
                tracing::warn!(key, %error, "Checkpoint unusable; starting this partition from the earliest offset with empty state.");
            }
        }
    }
    checkpoint::clear(con, key, loaded.epoch).await?;
    Ok(fresh(loaded.epoch, 0))
}

/// Why a partition cannot be taken over as it is.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TakeOver {
    #[error(
        "{topic}/{partition}: its checkpoint says reading reached offset {next}, but the partition ends at offset {end}: the topic was deleted and recreated, truncated, or this is another Kafka cluster. Results of the old topic would mix with the new one's. Restart once with --reset-state to rebuild every result from the topics as they are now (a new lineage: the old rows are no longer read), or point --kafka-brokers back at the cluster the checkpoints belong to"
    )]
    BeyondEnd {
        topic: String,
        partition: i32,
        next: i64,
        end: i64,
    },
    #[error(
        "{topic}/{partition}: the record at offset {offset} is not the one its checkpoint was taken after (Kafka timestamp {found} where the checkpoint saw {want}): the topic was deleted and recreated, or this is another Kafka cluster. Restart once with --reset-state to rebuild every result from the topics as they are now (a new lineage: the old rows are no longer read), or point --kafka-brokers back at the original cluster"
    )]
    Recreated {
        topic: String,
        partition: i32,
        offset: i64,
        found: String,
        want: i64,
    },
    #[error(
        "{topic}/{partition}: records {from}..{low} were deleted (retention) before this aggregator read them; counting on would leave them out of {windows}. Make retention longer than the aggregator can fall behind; to accept the gap, restart with --allow-partial-replay"
    )]
    DeletedUnread {
        topic: String,
        partition: i32,
        from: i64,
        low: i64,
        windows: String,
    },
    #[error(
        "{topic}/{partition} must be replayed from the start (no usable checkpoint: the state store lost it, or the spec changed), but retention deleted its records {start}..{low} since this lineage first read it; the replay would rewrite with partial values {windows}. Restore the state store, or restart with --allow-partial-replay to accept those windows partial, or with --reset-state to start every result over from the records that are left (a new lineage)"
    )]
    PartialReplay {
        topic: String,
        partition: i32,
        start: i64,
        low: i64,
        windows: String,
    },
}

/// Which windows a gap before offset `low` spoils, for the messages: those
/// holding events from before (about: events arrive out of order) the
/// event time of the first record kept (`first_ms`), and every later window
/// of running levels.
pub(crate) fn spoiled_windows(plan: &Plan, first_ms: Option<i64>) -> String {
    let before = match first_ms {
        Some(ms) => format!(
            "every window holding events from before about {} (the first record kept)",
            vidpulse_query::read::rfc3339(ms, true)
        ),
        None => "every window holding events from before the first record kept".to_owned(),
    };
    let levels: Vec<&str> = plan
        .spec
        .metrics
        .iter()
        .filter(|m| m.is_level())
        .map(|m| m.name.as_str())
        .collect();
    if levels.is_empty() {
        before
    } else {
        format!(
            "{before}, and every window of running levels from then on ({})",
            levels.join(", ")
        )
    }
}

/// What a restored checkpoint's position allows, against the partition's
/// bounds `(low, end)`: `Ok(true)` resume one record early to check the
/// anchor, `Ok(false)` resume at the offset.
pub(crate) fn check_resume(
    state: &PartitionState,
    (low, end): (i64, i64),
    allow_gap: bool,
) -> Result<bool, Gap> {
    let next = state.next_offset;
    if next > end {
        return Err(Gap::BeyondEnd { next, end });
    }
    if next < low && !allow_gap {
        return Err(Gap::Deleted { from: next, low });
    }
    Ok(state.anchor.is_some_and(|(o, _)| o == next - 1 && o >= low))
}

/// A checkpoint position that does not fit the partition.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Gap {
    BeyondEnd { next: i64, end: i64 },
    Deleted { from: i64, low: i64 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Spec;

    fn state(next: i64, anchor: Option<(i64, i64)>) -> PartitionState {
        let plan = Plan::new(Spec::default_spec(), 60_000, 5_000);
        let mut s = PartitionState::new(&plan, Input::Events);
        s.next_offset = next;
        s.anchor = anchor;
        s
    }

    #[test]
    fn a_checkpoint_must_fit_its_partition() {
        // Within bounds, the last record known: resume one early to check it.
        assert_eq!(
            check_resume(&state(10, Some((9, 5))), (0, 20), false),
            Ok(true)
        );
        assert_eq!(check_resume(&state(10, None), (0, 10), false), Ok(false));
        // Beyond the end: recreated or truncated.
        assert_eq!(
            check_resume(&state(30, Some((29, 5))), (0, 20), true),
            Err(Gap::BeyondEnd { next: 30, end: 20 })
        );
        // Records after the checkpoint deleted unread.
        assert_eq!(
            check_resume(&state(10, Some((9, 5))), (15, 20), false),
            Err(Gap::Deleted { from: 10, low: 15 })
        );
        assert_eq!(
            check_resume(&state(10, Some((9, 5))), (15, 20), true),
            Ok(false)
        );
        // The anchor itself deleted, nothing unread lost: resume, unchecked.
        assert_eq!(
            check_resume(&state(10, Some((9, 5))), (10, 20), false),
            Ok(false)
        );
    }

    #[test]
    fn messages_name_the_spoiled_windows() {
        let plan = Plan::new(Spec::default_spec(), 60_000, 5_000);
        let w = spoiled_windows(&plan, Some(1_629_072_000_000));
        assert!(w.contains("2021-08-16T00:00:00"), "{w}");
        assert!(w.contains("online_users_1m"), "{w}");
    }
}
