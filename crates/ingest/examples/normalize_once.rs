//! Normalizes 20 000 generated records once; for instruction counting with
//! `valgrind --tool=callgrind` (repeatable whatever the machine's load).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;

use vidpulse_core::runtime::Record;
use vidpulse_ingest::{normalize::Normalizer, presets};

fn main() {
    let cfg = vidpulse_gen::GenConfig {
        count: 20_000,
        ..Default::default()
    };
    let records = vidpulse_gen::generate(&cfg).records;
    let mut mappings = HashMap::new();
    for name in presets::names() {
        mappings.insert(
            name.to_owned(),
            Arc::new(
                presets::preset(name, chrono_tz::Asia::Shanghai)
                    .unwrap()
                    .unwrap(),
            ),
        );
    }
    let mut n = Normalizer::new(
        mappings,
        "vp.events.v1".into(),
        "vp.dlq.v1".into(),
        1 << 20,
        300_000,
    );
    let mut out = Vec::new();
    let start = std::time::Instant::now();
    for (i, r) in records.iter().enumerate() {
        let input = Record {
            key: r.key.as_deref().map(str::as_bytes),
            ..Record::detached(r.topic, 0, i as i64, Some(&r.payload))
        };
        out.push(n.normalize_record(&input));
    }
    eprintln!("{} outputs in {:?}", out.len(), start.elapsed());
}
