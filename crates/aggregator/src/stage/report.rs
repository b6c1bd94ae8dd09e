//! What the aggregator says about itself while it runs: the watermark
//! gauges and, on `/readyz`, which source holds each input topic back; and
//! the replay after a lost state store, as not-ready until it caught up.

use super::{Aggregator, wall_ms};
use vidpulse_core::health::Component;
use vidpulse_core::watermark;

impl Aggregator {
    /// While partitions replay after the store lost them: not ready, saying
    /// how far they are; ready again once every one is back where it was.
    pub(super) fn report_recovery(&mut self) {
        let parts = &self.parts;
        self.recovering.retain(|p, reached| {
            // A partition revoked meanwhile is its new owner's to report.
            parts.get(p).is_some_and(|o| o.state.next_offset < *reached)
        });
        if self.recovering.is_empty() {
            if self.health.is_failing(Component::Checkpoints) && self.recovering_reported {
                tracing::info!("Partitions whose state the store lost are replayed; ready.");
                self.health.set_ok(Component::Checkpoints);
            }
            self.recovering_reported = false;
            return;
        }
        let behind: i64 = self
            .recovering
            .iter()
            .map(|(p, reached)| {
                reached - self.parts.get(p).map_or(0, |o| o.state.next_offset.max(0))
            })
            .sum();
        self.recovering_reported = true;
        self.health.set_failing(
            Component::Checkpoints,
            format!(
                "the checkpoint store lost its data (FLUSHALL, a restart without persistence, or eviction): {} partitions are replayed from their earliest offset, {behind} records to go",
                self.recovering.len()
            ),
        );
    }

    /// The watermark gauges (and how far behind the wall clock each is),
    /// and on `/readyz` (in the log, when it changes), for each input
    /// topic, which source holds back its partition furthest behind.
    pub(super) fn report_watermarks(&mut self) {
        let wall = wall_ms();
        for owned in self.parts.values() {
            let wm = owned.state.watermark();
            owned.watermark.set(wm.max(0) as f64);
            owned.watermark_lag.set(if wm == watermark::NONE {
                f64::NAN
            } else {
                (wall - wm) as f64 / 1000.0
            });
        }
        let mut lines = Vec::new();
        let mut sources = Vec::new();
        for (ti, (topic, _)) in self.topics.iter().enumerate() {
            let furthest = self
                .parts
                .iter()
                .filter(|(p, _)| p.topic as usize == ti)
                .map(|(p, o)| (p, o.state.watermark(), o.state.watermark_holder()))
                .min_by_key(|(_, wm, _)| *wm);
            let Some((p, wm, Some(holder))) = furthest else {
                continue;
            };
            let behind = if wm == watermark::NONE {
                "no watermark yet".to_owned()
            } else {
                format!("{} s behind the wall clock", (wall - wm) / 1000)
            };
            let at = if holder.at == watermark::NONE {
                "has not reported".to_owned()
            } else {
                format!("is at {}", vidpulse_query::read::rfc3339(holder.at, true))
            };
            let source = format!("{}/{} of {}", holder.topic, holder.partition, holder.writer);
            lines.push(format!(
                "{topic}/{} is {behind}; held by source {source} (it {at})",
                p.partition
            ));
            sources.push(source);
        }
        let text = (!lines.is_empty()).then(|| lines.join("; "));
        let source = (!sources.is_empty()).then(|| sources.join(", "));
        if source != self.held_by {
            if let Some(t) = &text {
                tracing::info!(watermark = %t, "Watermark holder changed.");
            }
            self.held_by = source;
        }
        self.health.set_detail("watermark", text);
    }
}
