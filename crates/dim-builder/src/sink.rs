//! The stage's job: a batch of `vp.events.v1` records becomes one Redis
//! pipeline of script calls (one per room or viewer event), sent in one
//! round trip.
//!
//! Delivery guarantee: `process` returns Ok only when every event of the
//! batch is applied in Redis (or found stale, or emitted as a dead letter,
//! which the runtime has acknowledged before storing the offset). Redis
//! down, slow or overloaded gives a retriable error: the runtime backs off,
//! stops consuming, reports not ready, and hands the whole batch over again
//! later, which is safe because every script is idempotent. A record that is
//! not an event, or that Redis rejects for good (say the key holds another
//! type), goes to the DLQ with the reason.

use std::time::Instant;

use metrics::{counter, histogram};
use redis::Value;
use vidpulse_core::dlq;
use vidpulse_core::health::Component;
use vidpulse_core::metrics as m;
use vidpulse_core::runtime::{Outputs, Record, Stage, StageError};
use vidpulse_proto::{Event, Message};

use crate::model::Ttls;
use crate::plan::{Op, Planner};
use crate::store::{self, Store};
use crate::{EVENTS, REDIS_SECONDS, STAGE};

/// Writes event batches to Redis.
pub struct DimSink {
    pub store: Store,
    pub planner: Planner,
    pub ttls: Ttls,
    pub dlq_topic: String,
}

/// A failure Redis may recover from (connection, timeout, loading, busy).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RedisDown(pub String);

/// What happened to one record.
enum Outcome {
    Applied(&'static str),
    Stale(&'static str),
    Skipped(&'static str),
    Rejected {
        reason: &'static str,
        detail: String,
    },
}

impl Stage for DimSink {
    async fn process(&mut self, batch: &[Record<'_>], out: &mut Outputs) -> Result<(), StageError> {
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
        let mut ops: Vec<(usize, Op)> = Vec::new();
        for (i, r) in batch.iter().enumerate() {
            match Event::decode(r.payload.unwrap_or_default()) {
                Err(e) => outcomes.push(Some(Outcome::Rejected {
                    reason: "undecodable",
                    detail: format!("not a vidpulse.v1.Event: {e}"),
                })),
                Ok(ev) => match self.planner.plan(&ev) {
                    Ok(op) => {
                        ops.push((i, op));
                        outcomes.push(None);
                    }
                    Err(skip) => outcomes.push(Some(Outcome::Skipped(skip.as_str()))),
                },
            }
        }

        if !ops.is_empty() {
            let mut pipe = redis::pipe();
            for (_, op) in &ops {
                store::push_op(&mut pipe, op, &self.ttls);
            }
            let started = Instant::now();
            let replies = self.store.run(&pipe).await.map_err(|e| {
                if e.retriable {
                    StageError::retriable(Component::Redis, RedisDown(e.message))
                } else {
                    StageError::fatal(RedisDown(e.message))
                }
            })?;
            let took = started.elapsed().as_secs_f64();
            histogram!(REDIS_SECONDS, "stage" => STAGE, "op" => "events").record(took);
            histogram!(m::SINK_LATENCY, "stage" => STAGE).record(took);
            if replies.len() != ops.len() {
                return Err(StageError::retriable(
                    Component::Redis,
                    RedisDown(format!(
                        "redis answered {} replies to {} commands",
                        replies.len(),
                        ops.len()
                    )),
                ));
            }
            for ((i, op), reply) in ops.iter().zip(replies) {
                outcomes[*i] = Some(match reply {
                    Value::Int(0) => Outcome::Stale(op.target()),
                    Value::Int(_) => Outcome::Applied(op.target()),
                    Value::ServerError(e) if store::retriable_code(e.code()) => {
                        return Err(StageError::retriable(
                            Component::Redis,
                            RedisDown(format!("{} {}", e.code(), e.details().unwrap_or(""))),
                        ));
                    }
                    Value::ServerError(e) => Outcome::Rejected {
                        reason: "redis_rejected",
                        detail: format!(
                            "{} on {}: {}",
                            e.code(),
                            op.key(),
                            e.details().unwrap_or("")
                        ),
                    },
                    other => Outcome::Rejected {
                        reason: "redis_rejected",
                        detail: format!("unexpected script reply {other:?} on {}", op.key()),
                    },
                });
            }
        }

        // Dead letters are acknowledged before the offsets move.
        for (i, (r, o)) in batch.iter().zip(&outcomes).enumerate() {
            if let Some(Outcome::Rejected { reason, detail }) = o {
                tracing::warn!(
                    partition = r.partition,
                    offset = r.offset,
                    reason,
                    detail,
                    "Event dead-lettered."
                );
                out.push(i, dlq::record(&self.dlq_topic, STAGE, r, reason, detail));
            }
        }

        // Count only once the batch is done, so retries do not double count.
        for o in outcomes.iter().flatten() {
            match o {
                Outcome::Applied(target) => {
                    counter!(EVENTS, "stage" => STAGE, "outcome" => "applied", "target" => *target)
                        .increment(1)
                }
                Outcome::Stale(target) => {
                    counter!(EVENTS, "stage" => STAGE, "outcome" => "stale", "target" => *target)
                        .increment(1)
                }
                Outcome::Skipped(reason) => {
                    counter!(EVENTS, "stage" => STAGE, "outcome" => *reason, "target" => "none")
                        .increment(1);
                    counter!(m::RECORDS_DROPPED, "stage" => STAGE, "reason" => *reason)
                        .increment(1);
                }
                Outcome::Rejected { reason, .. } => {
                    counter!(EVENTS, "stage" => STAGE, "outcome" => "failed", "target" => "none")
                        .increment(1);
                    counter!(m::RECORDS_DLQ, "stage" => STAGE, "reason" => *reason).increment(1);
                }
            }
        }
        Ok(())
    }
}
