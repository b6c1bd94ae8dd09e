//! Runs the input through the partitions, on one thread or several.
//!
//! One thread: read, parse and aggregate each line in turn. Several: a
//! reader cuts the files into chunks (in order), parse workers turn chunks
//! into events and send each partition owner its share, and each owner
//! takes its chunks in the run's order (a reorder buffer), so every
//! partition sees its records in the same order as with one thread: the
//! result does not depend on `--threads`. At most a few chunks per thread
//! are in flight (tokens), so memory stays bounded whatever the input size.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};

use vidpulse_aggregator::engine::Plan;
use vidpulse_proto::Event;

use crate::BackfillError;
use crate::input::{BytesRead, Chunk, Chunker, Source, open};
use crate::parse::{BadLine, Parser};
use crate::partitions::{Counts, Emitted, Partitions, partition_of};

/// Bytes per chunk.
const CHUNK_BYTES: usize = 1 << 20;

/// What the input became.
#[derive(Debug, Default)]
pub struct Output {
    pub emitted: Vec<Emitted>,
    pub lines: u64,
    pub events: u64,
    pub counts: Counts,
    /// In file and line order.
    pub bad: Vec<BadLine>,
}

/// How to run.
pub struct Job<'a> {
    pub plan: &'a Plan,
    pub parser: &'a Parser,
    pub sources: &'a [Source],
    pub partitions: u32,
    pub threads: usize,
    pub pool: &'a str,
    pub progress: BytesRead,
}

impl Job<'_> {
    pub fn run(&self) -> Result<Output, BackfillError> {
        if self.threads <= 1 {
            self.run_inline()
        } else {
            self.run_parallel()
        }
    }

    fn run_inline(&self) -> Result<Output, BackfillError> {
        let mut parts = Partitions::new(self.plan, self.pool, self.partitions, 0, 1);
        let mut out = Output::default();
        for (i, src) in self.sources.iter().enumerate() {
            let mut chunker = self.chunker(src)?;
            while let Some((first, data)) = next(&mut chunker, src)? {
                let chunk = Chunk {
                    seq: 0,
                    source: i,
                    first_line: first,
                    data,
                };
                for (n, line) in chunk.lines() {
                    out.lines += 1;
                    match self.parser.line(src, n, line) {
                        Ok(e) => {
                            out.events += 1;
                            parts.take(partition_of(&e, self.partitions), &e);
                        }
                        Err(r) => out.bad.push(Parser::bad(i, n, line, r)),
                    }
                }
            }
        }
        let (emitted, counts) = parts.finish();
        out.emitted = emitted;
        out.counts = counts;
        Ok(out)
    }

    fn chunker(
        &self,
        src: &Source,
    ) -> Result<Chunker<Box<dyn std::io::Read + Send>>, BackfillError> {
        let r = open(&src.path, self.progress.clone()).map_err(|e| BackfillError::Read {
            file: src.label.clone(),
            error: e,
        })?;
        Ok(Chunker::new(r, CHUNK_BYTES))
    }

    fn run_parallel(&self) -> Result<Output, BackfillError> {
        let threads = self.threads;
        let owners = threads.min(self.partitions as usize).max(1);
        let in_flight = 4 * threads;
        // Tokens bound the chunks between the reader and the last owner.
        let (token_tx, token_rx) = sync_channel::<()>(in_flight);
        for _ in 0..in_flight {
            let _ = token_tx.send(());
        }
        let (work_tx, work_rx) = sync_channel::<Chunk>(in_flight);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let (bad_tx, bad_rx) = channel::<(u64, u64, Vec<BadLine>)>();
        let mut owner_txs = Vec::with_capacity(owners);
        let mut owner_rxs = Vec::with_capacity(owners);
        for _ in 0..owners {
            let (tx, rx) = channel::<(u64, Vec<(u32, Event)>)>();
            owner_txs.push(tx);
            owner_rxs.push(rx);
        }
        std::thread::scope(|s| -> Result<Output, BackfillError> {
            let reader = s.spawn(move || self.read_all(&work_tx, &token_rx));
            let mut workers = Vec::new();
            for _ in 0..threads {
                let work_rx = work_rx.clone();
                let owner_txs = owner_txs.clone();
                let bad_tx = bad_tx.clone();
                workers.push(s.spawn(move || {
                    self.parse_worker(&work_rx, &owner_txs, &bad_tx);
                }));
            }
            drop(owner_txs);
            drop(bad_tx);
            let done = Arc::new(Mutex::new(BTreeMap::<u64, usize>::new()));
            let mut owned = Vec::new();
            for (a, rx) in owner_rxs.into_iter().enumerate() {
                let token_tx = token_tx.clone();
                let done = done.clone();
                owned.push(s.spawn(move || {
                    let mut parts = Partitions::new(
                        self.plan,
                        self.pool,
                        self.partitions,
                        a as u32,
                        owners as u32,
                    );
                    take_in_order(&rx, &mut parts, owners, &done, &token_tx);
                    parts.finish()
                }));
            }
            drop(token_tx);
            let mut out = Output::default();
            for (lines, events, bad) in bad_rx {
                out.lines += lines;
                out.events += events;
                out.bad.extend(bad);
            }
            let read = reader.join().map_err(|_| BackfillError::Panicked)?;
            for w in workers {
                w.join().map_err(|_| BackfillError::Panicked)?;
            }
            for o in owned {
                let (emitted, counts) = o.join().map_err(|_| BackfillError::Panicked)?;
                out.emitted.extend(emitted);
                out.counts.add(counts);
            }
            read?;
            out.bad.sort_by_key(|b| (b.source, b.line));
            out.emitted.sort_by_key(|e| (e.partition, e.input));
            Ok(out)
        })
    }

    /// The reader: every file's chunks in order, each after a token.
    fn read_all(
        &self,
        work: &SyncSender<Chunk>,
        tokens: &Receiver<()>,
    ) -> Result<(), BackfillError> {
        let mut seq = 0;
        for (i, src) in self.sources.iter().enumerate() {
            let mut chunker = self.chunker(src)?;
            while let Some((first, data)) = next(&mut chunker, src)? {
                if tokens.recv().is_err() {
                    return Ok(());
                }
                let chunk = Chunk {
                    seq,
                    source: i,
                    first_line: first,
                    data,
                };
                seq += 1;
                if work.send(chunk).is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn parse_worker(
        &self,
        work: &Mutex<Receiver<Chunk>>,
        owners: &[std::sync::mpsc::Sender<Parsed>],
        bad_tx: &std::sync::mpsc::Sender<(u64, u64, Vec<BadLine>)>,
    ) {
        loop {
            let chunk = {
                let Ok(rx) = work.lock() else { return };
                match rx.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                }
            };
            let src = &self.sources[chunk.source];
            let mut shares: Vec<Vec<(u32, Event)>> = vec![Vec::new(); owners.len()];
            let (mut lines, mut events, mut bad) = (0, 0, Vec::new());
            for (n, line) in chunk.lines() {
                lines += 1;
                match self.parser.line(src, n, line) {
                    Ok(e) => {
                        events += 1;
                        let p = partition_of(&e, self.partitions);
                        shares[p as usize % owners.len()].push((p, e));
                    }
                    Err(r) => bad.push(Parser::bad(chunk.source, n, line, r)),
                }
            }
            let _ = bad_tx.send((lines, events, bad));
            for (tx, share) in owners.iter().zip(shares) {
                let _ = tx.send((chunk.seq, share));
            }
        }
    }
}

/// An owner's loop: its share of each chunk, in chunk order. The last
/// owner done with a chunk gives its token back.
fn take_in_order(
    rx: &Receiver<(u64, Vec<(u32, Event)>)>,
    parts: &mut Partitions<'_>,
    owners: usize,
    done: &Mutex<BTreeMap<u64, usize>>,
    tokens: &SyncSender<()>,
) {
    let mut waiting: BTreeMap<u64, Vec<(u32, Event)>> = BTreeMap::new();
    let mut expect = 0u64;
    for (seq, share) in rx {
        waiting.insert(seq, share);
        while let Some(share) = waiting.remove(&expect) {
            for (p, e) in &share {
                parts.take(*p, e);
            }
            let last = {
                let Ok(mut d) = done.lock() else { return };
                let n = d.entry(expect).or_insert(0);
                *n += 1;
                let last = *n == owners;
                if last {
                    d.remove(&expect);
                }
                last
            };
            if last {
                let _ = tokens.send(());
            }
            expect += 1;
        }
    }
}

fn next<R: std::io::Read>(
    c: &mut Chunker<R>,
    src: &Source,
) -> Result<Option<(u64, Vec<u8>)>, BackfillError> {
    c.next_chunk().map_err(|e| BackfillError::Read {
        file: src.label.clone(),
        error: e,
    })
}

/// A parsed chunk for one owner: (chunk sequence, (virtual partition, event)).
type Parsed = (u64, Vec<(u32, Event)>);
