//! Writes what the partitions emitted into the stream's own ClickHouse
//! tables and Redis leaderboards, in large batches.
//!
//! Idempotent like the stream's writes, and never mixed up with them: a
//! backfill's rows carry `part` values of their own, `BASE + slot × 1024 +
//! partition` (the stream's are Kafka partition numbers, far below `BASE`;
//! `slot` comes from `--name`), and its leaderboard partials are named
//! `backfill:<name>:<input>:<partition>`. A row's version is its record's
//! position in its virtual partition, so a rerun of the same backfill over
//! the same files writes identical rows (ReplacingMergeTree keeps one) and
//! identical partials (the leaderboard script ignores a version it has).
//! Every write is retried on retriable errors; a retried write is the same
//! write.

use std::time::Duration;

use bytes::Bytes;
use vidpulse_aggregator::leaderboard;
use vidpulse_aggregator::lineage::Generations;
use vidpulse_aggregator::rowbinary;
use vidpulse_aggregator::spec::{Input, Spec};
use vidpulse_query::Tables;
use vidpulse_query::clickhouse::{self as ch, ChError};

use crate::BackfillError;
use crate::partitions::Emitted;

/// The first `part` of backfill rows.
pub const PART_BASE: u32 = 1_000_000_000;
/// Virtual partitions a backfill may use (`--partitions`).
pub const MAX_PARTITIONS: u32 = 1024;
/// Slots for backfill names: `PART_BASE + SLOTS × MAX_PARTITIONS` stays
/// below 2³¹.
pub const SLOTS: u32 = 1_000_000;

/// Rows per ClickHouse insert.
const INSERT_ROWS: usize = 200_000;
/// Partials per leaderboard script call.
const SCRIPT_PARTIALS: usize = 5_000;
const ATTEMPTS: u32 = 6;

/// The slot of a backfill name.
pub fn slot(name: &str) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(name.as_bytes()) % u64::from(SLOTS)) as u32
}

/// The `part` of a backfill's virtual partition.
pub fn part(slot: u32, partition: u32) -> u32 {
    PART_BASE + slot * MAX_PARTITIONS + partition
}

/// What was written.
#[derive(Debug, Default, Clone)]
pub struct Written {
    /// (table, rows), in spec order.
    pub rows: Vec<(String, usize)>,
    pub partials: usize,
}

pub struct Sink<'a> {
    pub ch: clickhouse::Client,
    pub tables: &'a Tables,
    pub redis: vidpulse_core::redis::RedisConn,
    pub prefix: &'a str,
    pub name: &'a str,
    pub slot: u32,
    /// The generation of everything written, in spec order.
    pub gens: Generations,
}

impl Sink<'_> {
    pub async fn write(
        &mut self,
        spec: &Spec,
        emitted: &[Emitted],
    ) -> Result<Written, BackfillError> {
        let mut written = Written::default();
        for (i, m) in spec.metrics.iter().enumerate() {
            let mut buf = Vec::new();
            let (mut n, mut total) = (0, 0);
            for e in emitted {
                let part = part(self.slot, e.partition) as i32;
                for r in e.emission.rows.iter().filter(|r| r.metric == i) {
                    rowbinary::encode_metric_row(&mut buf, m, self.gens.metrics[i], part, r);
                    n += 1;
                    if n == INSERT_ROWS {
                        self.insert(&m.name, std::mem::take(&mut buf)).await?;
                        total += n;
                        n = 0;
                    }
                }
            }
            if n > 0 {
                self.insert(&m.name, buf).await?;
                total += n;
            }
            written.rows.push((m.name.clone(), total));
        }
        for (i, l) in spec.logs.iter().enumerate() {
            let mut buf = Vec::new();
            let (mut n, mut total) = (0, 0);
            for e in emitted {
                let part = part(self.slot, e.partition) as i32;
                for r in e.emission.logs.iter().filter(|r| r.log == i) {
                    rowbinary::encode_log_row(&mut buf, l, self.gens.logs[i], part, r);
                    n += 1;
                    if n == INSERT_ROWS {
                        self.insert(&l.name, std::mem::take(&mut buf)).await?;
                        total += n;
                        n = 0;
                    }
                }
            }
            if n > 0 {
                self.insert(&l.name, buf).await?;
                total += n;
            }
            written.rows.push((l.name.clone(), total));
        }
        let mut batches = Vec::new();
        for e in emitted.iter().filter(|e| !e.emission.boards.is_empty()) {
            let input = match e.input {
                Input::Events => "events",
                Input::Monitored => "monitored",
            };
            let part = format!("backfill:{}:{input}:{}", self.name, e.partition);
            written.partials += e.emission.boards.len();
            for b in leaderboard::batches(
                self.prefix,
                &spec.leaderboards,
                &self.gens.boards,
                &part,
                &e.emission.boards,
            ) {
                // One set's partials in several calls: each partial is
                // applied on its own version, so splitting changes nothing.
                for chunk in b.partials.chunks(SCRIPT_PARTIALS) {
                    batches.push(leaderboard::Batch {
                        set_key: b.set_key.clone(),
                        stamp: b.stamp.clone(),
                        ttl_secs: b.ttl_secs,
                        partials: chunk.to_vec(),
                    });
                }
            }
        }
        let script = leaderboard::script();
        for b in batches {
            let group = [b];
            retry("redis", || {
                let mut con = self.redis.clone();
                let script = &script;
                let group = &group;
                async move {
                    leaderboard::apply(&mut con, script, group)
                        .await
                        .map(|_| ())
                        .map_err(|e| (e.to_string(), !e.is_unrecoverable_error()))
                }
            })
            .await?;
        }
        Ok(written)
    }

    async fn insert(&self, name: &str, data: Vec<u8>) -> Result<(), BackfillError> {
        let table = self.tables.insert_target(name);
        let data = Bytes::from(data);
        retry("clickhouse", || {
            let (table, data) = (&table, data.clone());
            async move {
                ch::insert(&self.ch, table, data)
                    .await
                    .map_err(|e: ChError| (e.message, e.retriable))
            }
        })
        .await
    }
}

/// Runs `f` until it succeeds, a non-retriable error, or [`ATTEMPTS`].
async fn retry<F, Fut>(sink: &'static str, mut f: F) -> Result<(), BackfillError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), (String, bool)>>,
{
    let mut wait = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match f().await {
            Ok(()) => return Ok(()),
            Err((message, retriable)) if retriable && attempt < ATTEMPTS => {
                tracing::warn!(sink, attempt, %message, "Write failed; retrying.");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
            Err((message, _)) => return Err(BackfillError::Write { sink, message }),
        }
    }
}
