//! The one Kafka producer of every stage: idempotent, `acks=all`,
//! `murmur2_random` (see [`crate::kafka::producer_config`]), with each
//! record's delivery report handed to the owner's [`OnDelivery`] together
//! with the ticket it was sent with. The owner decides what an
//! acknowledgement means (an input offset becomes committable, a Redis
//! stream entry may be acknowledged); this module only sends, retries a full
//! local queue, and flushes.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};

use crate::config::{ConfigError, KafkaArgs};
use crate::kafka;

/// One record to produce.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

/// What the owner of a producer does with delivery reports. Called on
/// librdkafka's producer thread: keep it short, never block.
pub trait OnDelivery: Send + Sync + 'static {
    /// What each record carries to its report.
    type Ticket: Send + Sync + 'static;

    /// `result` is `Ok` once the broker acknowledged the record, else the
    /// error after librdkafka gave up on it (its retries are built in).
    fn delivered(&self, ticket: Self::Ticket, result: Result<(), &KafkaError>);
}

/// The producer's librdkafka context: logs and delivery reports.
pub struct DeliveryCtx<D: OnDelivery>(Arc<D>);

impl<D: OnDelivery> ClientContext for DeliveryCtx<D> {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        kafka::log_rdkafka(level, fac, log_message);
    }
}

impl<D: OnDelivery> ProducerContext for DeliveryCtx<D> {
    type DeliveryOpaque = Box<D::Ticket>;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: Box<D::Ticket>) {
        match result {
            Ok(_) => self.0.delivered(*ticket, Ok(())),
            Err((error, _)) => self.0.delivered(*ticket, Err(error)),
        }
    }
}

/// Errors of the producer.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kafka producer")]
    Kafka(#[from] KafkaError),
    #[error("produce to {topic} refused")]
    Refused {
        topic: String,
        #[source]
        source: KafkaError,
    },
}

/// A producer whose deliveries go to `D`.
pub struct Producer<D: OnDelivery> {
    inner: ThreadedProducer<DeliveryCtx<D>>,
}

impl<D: OnDelivery> Producer<D> {
    pub fn new(kafka_args: &KafkaArgs, on_delivery: Arc<D>) -> Result<Self, ProduceError> {
        let inner = ThreadedProducer::from_config_and_context(
            &kafka::producer_config(kafka_args)?,
            DeliveryCtx(on_delivery),
        )?;
        Ok(Producer { inner })
    }

    /// Hands `out` to librdkafka; its report reaches `D` with `ticket`. When
    /// librdkafka's local queue is full this waits for room (the queue is
    /// bounded: back-pressure). An error means the record was refused for
    /// good before being queued (unknown topic, record too large).
    pub async fn send(&self, out: &Output, ticket: D::Ticket) -> Result<(), ProduceError> {
        let mut record: BaseRecord<'_, [u8], [u8], Box<D::Ticket>> =
            BaseRecord::with_opaque_to(&out.topic, Box::new(ticket));
        if let Some(k) = &out.key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = &out.payload {
            record = record.payload(p.as_slice());
        }
        // librdkafka allocates a header list: only when there are headers.
        if !out.headers.is_empty() {
            let mut headers = OwnedHeaders::new_with_capacity(out.headers.len());
            for (k, v) in &out.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            record = record.headers(headers);
        }
        loop {
            match self.inner.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((source, _)) => {
                    return Err(ProduceError::Refused {
                        topic: out.topic.clone(),
                        source,
                    });
                }
            }
        }
    }

    /// Sends a record to an explicit partition (control records written to
    /// every partition of a topic).
    pub async fn send_to(
        &self,
        topic: &str,
        partition: i32,
        payload: &[u8],
        headers: &[(&str, &[u8])],
        ticket: D::Ticket,
    ) -> Result<(), ProduceError> {
        let mut hs = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8], Box<D::Ticket>> =
            BaseRecord::with_opaque_to(topic, Box::new(ticket))
                .partition(partition)
                .payload(payload)
                .headers(hs);
        loop {
            match self.inner.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((source, _)) => {
                    return Err(ProduceError::Refused {
                        topic: topic.to_owned(),
                        source,
                    });
                }
            }
        }
    }

    /// Waits (blocking) until every queued record is reported, at most
    /// `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)
    }

    /// Records queued and not yet reported.
    pub fn in_flight(&self) -> i32 {
        self.inner.in_flight_count()
    }
}
