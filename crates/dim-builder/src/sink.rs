//! The stage's sink: a batch of `vp.events.v1` records becomes one Redis
//! pipeline of script calls (one per room or viewer event), sent in one
//! round trip.
//!
//! Delivery guarantee: `write` returns Ok only when every event of the
//! batch is applied in Redis (or found stale, or dead-lettered and
//! acknowledged by the broker), so the core loop stores offsets only after
//! that. Redis down, slow or overloaded gives a retriable error: the loop
//! backs off, stops consuming, reports not ready, and resends the whole
//! batch later, which is safe because every script is idempotent. A record
//! that is not an event, or that Redis rejects for good (say the key holds
//! another type), goes to the DLQ with the reason.

use std::time::{Duration, Instant};

use metrics::{counter, histogram};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use redis::Value;
use vidpulse_core::dlq;
use vidpulse_core::metrics as m;
use vidpulse_core::pipeline::Input;
use vidpulse_core::sink::{Record, Sink, SinkError};
use vidpulse_proto::{Event, Message};

use crate::model::Ttls;
use crate::plan::{Op, Planner};
use crate::store::{self, Store};
use crate::{EVENTS, REDIS_SECONDS, STAGE};

/// Where dead letters go.
pub struct Dlq {
    pub producer: FutureProducer,
    pub topic: String,
}

/// Writes event batches to Redis.
pub struct DimSink {
    pub store: Store,
    pub planner: Planner,
    pub ttls: Ttls,
    pub dlq: Dlq,
}

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

impl Sink for DimSink {
    async fn write(&mut self, batch: &[Record]) -> Result<(), SinkError> {
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
        let mut ops: Vec<(usize, Op)> = Vec::new();
        for (i, r) in batch.iter().enumerate() {
            match Event::decode(r.payload.as_deref().unwrap_or_default()) {
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
            let replies = self
                .store
                .run(&pipe)
                .await
                .map_err(|e| to_sink_error(e.message, e.retriable))?;
            histogram!(REDIS_SECONDS, "stage" => STAGE, "op" => "events")
                .record(started.elapsed().as_secs_f64());
            if replies.len() != ops.len() {
                return Err(SinkError::retriable(format!(
                    "redis answered {} replies to {} commands",
                    replies.len(),
                    ops.len()
                )));
            }
            for ((i, op), reply) in ops.iter().zip(replies) {
                outcomes[*i] = Some(match reply {
                    Value::Int(0) => Outcome::Stale(op.target()),
                    Value::Int(_) => Outcome::Applied(op.target()),
                    Value::ServerError(e) if store::retriable_code(e.code()) => {
                        return Err(SinkError::retriable(format!(
                            "redis: {} {}",
                            e.code(),
                            e.details().unwrap_or("")
                        )));
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

        // Dead letters are acknowledged before the batch counts as written.
        let mut sends = Vec::new();
        for (r, o) in batch.iter().zip(&outcomes) {
            if let Some(Outcome::Rejected { reason, detail }) = o {
                tracing::warn!(
                    partition = r.partition,
                    offset = r.offset,
                    reason,
                    detail,
                    "Event dead-lettered."
                );
                sends.push(self.dead_letter(r, reason, detail));
            }
        }
        for result in futures::future::join_all(sends).await {
            result?;
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

fn to_sink_error(message: String, retriable: bool) -> SinkError {
    if retriable {
        SinkError::retriable(message)
    } else {
        SinkError::fatal(message)
    }
}

impl DimSink {
    fn dead_letter(
        &self,
        r: &Record,
        reason: &str,
        detail: &str,
    ) -> impl Future<Output = Result<(), SinkError>> + Send + 'static {
        let input = Input {
            topic: &r.topic,
            partition: r.partition,
            offset: r.offset,
            key: r.key.as_deref(),
            payload: r.payload.as_deref(),
            timestamp_ms: r.timestamp_ms,
            headers: &[],
        };
        let out = dlq::record(&self.dlq.topic, STAGE, &input, reason, detail);
        let producer = self.dlq.producer.clone();
        async move {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &out.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&out.topic).headers(headers);
            if let Some(k) = &out.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(p) = &out.payload {
                rec = rec.payload(p.as_slice());
            }
            producer
                .send(rec, Duration::from_secs(30))
                .await
                .map(|_| ())
                .map_err(|(e, _)| SinkError::retriable(format!("dead-letter produce failed: {e}")))
        }
    }
}
