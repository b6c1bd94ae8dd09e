//! vidpulse-gen: a deterministic load generator for the raw topics.
//!
//! [`generate`] (or the streaming [`Generator`]) turns a [`GenConfig`] into
//! raw records in the seeds' JSON formats, in production order, each tagged
//! with what the pipeline should make of it ([`Class`]), together with a
//! ground-truth summary ([`Truth`]) computed from the valid, distinct events.
//! The same config (seed included) always yields the same bytes and truth.
//! [`run`](run::run) sends the records to Kafka (or to a JSON-lines file) and
//! writes the truth; delivery is at-least-once per record, awaited before
//! the truth is written.
#![forbid(unsafe_code)]

pub mod config;
pub mod formats;
pub mod generator;
pub mod model;
pub mod run;
pub mod truth;

pub use config::{GenConfig, GenError};
pub use generator::Generator;
pub use model::{Class, Event, Format, Kind, RawRecord, Reason};
pub use truth::{Truth, TruthBuilder};

/// Every record of a run, in production order, and the truth about them.
#[derive(Debug, Clone)]
pub struct Generated {
    pub records: Vec<RawRecord>,
    pub truth: Truth,
}

/// Generates every record of `cfg` in memory. Call [`GenConfig::validate`]
/// first; out-of-range values are clamped rather than rejected here.
pub fn generate(cfg: &GenConfig) -> Generated {
    let mut truth = TruthBuilder::new(cfg);
    let records: Vec<RawRecord> = Generator::new(cfg).inspect(|r| truth.observe(r)).collect();
    Generated {
        records,
        truth: truth.finish(),
    }
}

#[cfg(test)]
mod tests;
