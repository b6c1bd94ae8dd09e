//! Normalization alone (no Kafka): raw JSON bytes → canonical event →
//! protobuf bytes, over a deterministic mix of the seeds' formats from
//! vidpulse-gen. `cargo bench -p vidpulse-ingest`.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vidpulse_core::runtime::Record;
use vidpulse_ingest::normalize::Normalizer;
use vidpulse_ingest::presets;

fn bench(c: &mut Criterion) {
    let cfg = vidpulse_gen::GenConfig {
        count: 20_000,
        ..Default::default()
    };
    let records = vidpulse_gen::generate(&cfg).records;
    let mut mappings = HashMap::new();
    for name in presets::names() {
        let m = presets::preset(name, chrono_tz::Asia::Shanghai)
            .unwrap()
            .unwrap();
        mappings.insert(name.to_owned(), Arc::new(m));
    }
    let mut normalizer = Normalizer::new(
        mappings,
        "vp.events.v1".into(),
        "vp.dlq.v1".into(),
        1 << 20,
        300_000,
    );
    let mut out = Vec::with_capacity(1);
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(records.len() as u64));
    g.bench_function("normalize_mixed_formats", |b| {
        b.iter(|| {
            for (i, r) in records.iter().enumerate() {
                out.clear();
                let input = Record {
                    key: r.key.as_deref().map(str::as_bytes),
                    ..Record::detached(r.topic, 0, i as i64, Some(&r.payload))
                };
                out.push(normalizer.normalize_record(&input));
            }
        })
    });
    g.bench_function("parse_json_value_only", |b| {
        b.iter(|| {
            let mut n = 0;
            for r in &records {
                n += serde_json::from_slice::<serde_json::Value>(&r.payload)
                    .map(|v| v.is_object() as usize)
                    .unwrap_or(0);
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
