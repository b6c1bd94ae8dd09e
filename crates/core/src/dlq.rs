//! Dead-letter records: the original key and bytes, plus text headers saying
//! why, from where and which stage. Header values are UTF-8 so standard Kafka
//! console tools show them as they are.

use crate::runtime::{Output, Record};

pub const H_REASON: &str = "vp.reason";
pub const H_DETAIL: &str = "vp.detail";
pub const H_STAGE: &str = "vp.stage";
pub const H_TOPIC: &str = "vp.source.topic";
pub const H_PARTITION: &str = "vp.source.partition";
pub const H_OFFSET: &str = "vp.source.offset";

/// Builds the dead-letter record for `input`.
///
/// `reason` is a short stable code (counted in metrics, e.g.
/// `missing_field`), `detail` a sentence for humans.
pub fn record(
    dlq_topic: &str,
    stage: &str,
    input: &Record<'_>,
    reason: &str,
    detail: &str,
) -> Output {
    Output {
        topic: dlq_topic.to_owned(),
        key: input.key.map(<[u8]>::to_vec),
        payload: input.payload.map(<[u8]>::to_vec),
        headers: vec![
            (H_REASON, reason.as_bytes().to_vec()),
            (H_DETAIL, detail.as_bytes().to_vec()),
            (H_STAGE, stage.as_bytes().to_vec()),
            (H_TOPIC, input.topic.as_bytes().to_vec()),
            (H_PARTITION, input.partition.to_string().into_bytes()),
            (H_OFFSET, input.offset.to_string().into_bytes()),
        ],
    }
}
