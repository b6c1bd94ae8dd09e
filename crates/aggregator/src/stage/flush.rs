//! A flush: what the partitions' states emitted (ClickHouse rows,
//! leaderboard partials) and their checkpoint deltas, written in that order.
//!
//! Delivery guarantee: a flush is built once and kept until every part of
//! it is acknowledged — ClickHouse inserts, leaderboard scripts, the late
//! records and dead letters the batch emitted, then the checkpoints — so a
//! failing write is retried with the same rows and the same delta, and
//! nothing is checkpointed past a write that was not acknowledged, on any
//! path (retries, the last flush at shutdown, a shutdown in the middle of an
//! outage). Parts already acknowledged are not written again on a retry;
//! writing them again would be harmless anyway (idempotent sinks).

use std::time::Instant;

use bytes::Bytes;
use futures::future::join_all;
use metrics::counter;
use vidpulse_core::health::Component;
use vidpulse_core::runtime::{InputPartition, StageError};
use vidpulse_query::clickhouse as ch;

use super::STAGE;
use super::Sinks;
use super::metrics::{CHECKPOINT_BYTES, PARTIALS_WRITTEN, ROWS_WRITTEN};
use crate::checkpoint;
use crate::engine::{CheckpointDelta, Emission, Plan};
use crate::leaderboard;
use crate::lineage::Generations;
use crate::rowbinary;

/// One table's insert.
pub(crate) struct Insert {
    pub name: String,
    pub data: Bytes,
    pub rows: usize,
    pub done: bool,
}

/// One partition's checkpoint write.
pub(crate) struct Checkpoint {
    pub part: InputPartition,
    pub key: String,
    pub epoch: i64,
    /// The hash must exist already (restored or written under this epoch).
    pub existing: bool,
    /// Writes the hash holds before this one.
    pub seq: u64,
    pub next_offset: i64,
    pub delta: CheckpointDelta,
    pub done: bool,
}

/// A flush in progress.
pub(crate) struct Pending {
    pub started: Instant,
    pub inserts: Vec<Insert>,
    /// Leaderboard script calls, one per hash slot; `true` once applied.
    pub boards: Vec<(Vec<leaderboard::Batch>, bool)>,
    /// The replicas asked for (`--redis-wait-replicas`) hold the partials.
    pub boards_replicated: bool,
    pub checkpoints: Vec<Checkpoint>,
    /// Partitions whose checkpoint was refused: another owner has them.
    pub fenced: Vec<InputPartition>,
    /// Partitions whose checkpoint the store lost (with the next offset
    /// they had reached): replayed from their earliest offset.
    pub lost: Vec<(InputPartition, i64)>,
    /// Partitions whose checkpoint store is behind (failed over to a replica
    /// lacking the last writes): taken over again from what it holds.
    pub behind: Vec<InputPartition>,
    /// Failed attempts so far (for `--sink-max-retries`).
    pub attempts: u32,
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    #[error(transparent)]
    ClickHouse(#[from] ch::ChError),
    #[error("redis")]
    Redis(#[from] redis::RedisError),
}

impl WriteError {
    fn into_stage_error(self, component: Component) -> StageError {
        match &self {
            WriteError::ClickHouse(e) if !e.retriable => StageError::fatal(self),
            _ => StageError::retriable(component, self),
        }
    }
}

impl Pending {
    /// Encodes what the partitions emitted. `deltas` are their checkpoint
    /// deltas, taken after emission.
    pub fn new(
        plan: &Plan,
        prefix: &str,
        gens: &Generations,
        emitted: &[(InputPartition, &'static str, Emission)],
        checkpoints: Vec<Checkpoint>,
    ) -> Pending {
        let spec = &plan.spec;
        // One insert per table, every partition's rows in it.
        let mut metric_bufs: Vec<(Vec<u8>, usize)> = vec![(Vec::new(), 0); spec.metrics.len()];
        let mut log_bufs: Vec<(Vec<u8>, usize)> = vec![(Vec::new(), 0); spec.logs.len()];
        for (p, _, e) in emitted {
            for r in &e.rows {
                let (buf, n) = &mut metric_bufs[r.metric];
                rowbinary::encode_metric_row(
                    buf,
                    &spec.metrics[r.metric],
                    gens.metrics[r.metric],
                    p.partition,
                    r,
                );
                *n += 1;
            }
            for r in &e.logs {
                let (buf, n) = &mut log_bufs[r.log];
                rowbinary::encode_log_row(buf, &spec.logs[r.log], gens.logs[r.log], p.partition, r);
                *n += 1;
            }
        }
        let mut inserts = Vec::new();
        for (i, (buf, n)) in metric_bufs.into_iter().enumerate() {
            if n > 0 {
                inserts.push(Insert {
                    name: spec.metrics[i].name.clone(),
                    data: Bytes::from(buf),
                    rows: n,
                    done: false,
                });
            }
        }
        for (i, (buf, n)) in log_bufs.into_iter().enumerate() {
            if n > 0 {
                inserts.push(Insert {
                    name: spec.logs[i].name.clone(),
                    data: Bytes::from(buf),
                    rows: n,
                    done: false,
                });
            }
        }
        // Leaderboards: one atomic script per window (its sets share a hash
        // slot), every partition's partials in it.
        let mut rows = Vec::new();
        for (p, input_name, e) in emitted {
            if e.boards.is_empty() {
                continue;
            }
            let part = format!("{input_name}:{}", p.partition);
            rows.extend(leaderboard::batches(
                prefix,
                &spec.leaderboards,
                &gens.boards,
                &part,
                &e.boards,
            ));
            for r in &e.boards {
                counter!(PARTIALS_WRITTEN, "board" => spec.leaderboards[r.board].name.clone())
                    .increment(1);
            }
        }
        let boards: Vec<_> = leaderboard::by_slot(rows)
            .into_iter()
            .map(|g| (g, false))
            .collect();
        Pending {
            started: Instant::now(),
            inserts,
            boards_replicated: boards.is_empty(),
            boards,
            checkpoints,
            fenced: Vec::new(),
            lost: Vec::new(),
            behind: Vec::new(),
            attempts: 0,
        }
    }

    /// Writes ClickHouse rows and leaderboard partials that are not written
    /// yet (concurrently); the first failure is returned once every write
    /// of this round has finished.
    pub async fn write_results(&mut self, sinks: &Sinks) -> Result<(), StageError> {
        let writes = self.inserts.iter_mut().filter(|i| !i.done).map(|ins| {
            let table = sinks.tables.insert_target(&ins.name);
            async move {
                let r = ch::insert(&sinks.ch, &table, ins.data.clone()).await;
                if r.is_ok() {
                    ins.done = true;
                    counter!(ROWS_WRITTEN, "table" => ins.name.clone()).increment(ins.rows as u64);
                }
                r
            }
        });
        let failed = join_all(writes).await.into_iter().find_map(Result::err);
        if let Some(e) = failed {
            return Err(WriteError::from(e).into_stage_error(Component::ClickHouse));
        }
        let writes = self
            .boards
            .iter_mut()
            .filter(|(_, done)| !*done)
            .map(|(group, done)| {
                let mut con = sinks.redis.clone();
                async move {
                    let r = leaderboard::apply(&mut con, &sinks.board_script, group).await;
                    if r.is_ok() {
                        *done = true;
                    }
                    r
                }
            });
        let failed = join_all(writes).await.into_iter().find_map(Result::err);
        if let Some(e) = failed {
            return Err(WriteError::from(e).into_stage_error(Component::Redis));
        }
        // The checkpoint that follows marks these partials written: they
        // must survive a failover first (a lost one would never be
        // written again).
        if !self.boards_replicated {
            let mut con = sinks.redis.clone();
            sinks
                .replication
                .wait(&mut con)
                .await
                .map_err(|e| WriteError::from(e).into_stage_error(Component::Redis))?;
            self.boards_replicated = true;
        }
        Ok(())
    }

    /// Writes the checkpoints not written yet (concurrently, one atomic
    /// script per partition). Call once everything they cover is
    /// acknowledged.
    pub async fn write_checkpoints(&mut self, sinks: &Sinks) -> Result<(), StageError> {
        let (fenced, lost, behind) = (&mut self.fenced, &mut self.lost, &mut self.behind);
        let writes = self.checkpoints.iter_mut().filter(|c| !c.done).map(|c| {
            let mut con = sinks.redis.clone();
            async move {
                let r = checkpoint::write(
                    &mut con,
                    &sinks.ckpt_script,
                    &c.key,
                    c.epoch,
                    c.existing,
                    c.seq,
                    &c.delta,
                )
                .await;
                if r.is_ok() {
                    c.done = true;
                    counter!(CHECKPOINT_BYTES, "stage" => STAGE).increment(c.delta.bytes() as u64);
                }
                (c.part, c.next_offset, r)
            }
        });
        let mut first = None;
        for (part, next, r) in join_all(writes).await {
            match r {
                Ok(checkpoint::Written::Written) => {}
                Ok(checkpoint::Written::Fenced) => fenced.push(part),
                Ok(checkpoint::Written::Lost) => lost.push((part, next)),
                Ok(checkpoint::Written::Behind) => behind.push(part),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        match first {
            Some(e) => Err(WriteError::from(e).into_stage_error(Component::Checkpoints)),
            None => Ok(()),
        }
    }

    /// Forgets the checkpoints of partitions this instance no longer owns
    /// (their new owner re-reads from the last checkpoint). Their rows stay:
    /// written twice they are the same rows.
    pub fn forget(&mut self, parts: &[InputPartition]) {
        self.checkpoints.retain(|c| !parts.contains(&c.part));
    }

    pub fn checkpoint_fields(&self) -> usize {
        self.checkpoints
            .iter()
            .map(|c| c.delta.set.len() + c.delta.del.len())
            .sum()
    }
}
