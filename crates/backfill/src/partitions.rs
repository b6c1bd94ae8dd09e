//! The aggregator's state machines, one per virtual partition and input, in
//! batch mode.
//!
//! Events are split over `n` virtual partitions by the key the stream uses
//! (`Event::subject_key`, Kafka's murmur2 partitioner), so duplicates (same
//! id, same key) meet in one state and are counted once, and a room's
//! events share a state with its start (room fields). Each partition's
//! records are taken in the run's order (files in order, lines in order)
//! whatever the threads, so a partition's state — and every row's version,
//! the record's position in its partition — is a function of the files.
//!
//! Batch mode: the partitions keep the in-band clock and hear no watermark
//! while the input lasts, so nothing is late; at the end of the input one
//! watermark record past every time closes every window at once (Flink's
//! end-of-input watermark), and [`Partitions::finish`] hands over what they
//! emit.
//!
//! Metrics on `vp.monitored.v1` take every event as a member of one
//! site-wide pool (`--pool`, default `all`), without enrichment: a room's
//! fields come from its `live_room_started` events in the same partition,
//! as the stage does when the enrichment has none.

use vidpulse_aggregator::engine::{Emission, Outcome, PartitionState, Plan};
use vidpulse_aggregator::record::Rec;
use vidpulse_aggregator::spec::Input;
use vidpulse_proto::{Event, SourceMark, SourceTopic, Watermark};

/// The virtual partition of an event among `n`.
pub fn partition_of(event: &Event, n: u32) -> u32 {
    vidpulse_pools::pool::partition_for(event.subject_key().as_bytes(), n as i32) as u32
}

/// What a partition's state emitted at the end, for one input.
#[derive(Debug)]
pub struct Emitted {
    pub input: Input,
    pub partition: u32,
    pub emission: Emission,
}

/// Counts of what became of the events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Events taken by at least one metric, log or leaderboard.
    pub counted: u64,
    /// Events whose id was already counted (in their partition).
    pub duplicates: u64,
    /// Events no entry of the spec takes.
    pub ignored: u64,
}

impl Counts {
    pub fn add(&mut self, o: Counts) {
        self.counted += o.counted;
        self.duplicates += o.duplicates;
        self.ignored += o.ignored;
    }
}

struct Owned {
    partition: u32,
    /// One state per input the spec reads (events, monitored).
    states: Vec<PartitionState>,
    next_offset: i64,
}

/// Some of the virtual partitions (all of them with one thread; a thread's
/// share otherwise): partition `p` is owned by thread `p % threads`.
pub struct Partitions<'p> {
    plan: &'p Plan,
    inputs: Vec<Input>,
    pools: Vec<String>,
    stride: u32,
    owned: Vec<Owned>,
    pub counts: Counts,
}

impl<'p> Partitions<'p> {
    /// The partitions `first, first + stride, …` below `n`.
    pub fn new(plan: &'p Plan, pool: &str, n: u32, first: u32, stride: u32) -> Partitions<'p> {
        let inputs = plan.spec.inputs();
        let owned = (first..n)
            .step_by(stride.max(1) as usize)
            .map(|partition| Owned {
                partition,
                states: inputs
                    .iter()
                    .map(|i| PartitionState::new(plan, *i).without_checkpoints())
                    .collect(),
                next_offset: 0,
            })
            .collect();
        Partitions {
            plan,
            inputs,
            pools: vec![pool.to_owned()],
            stride: stride.max(1),
            owned,
            counts: Counts::default(),
        }
    }

    /// Takes an event of partition `p` (one this instance owns).
    pub fn take(&mut self, p: u32, event: &Event) {
        let Some(owned) = self.owned.get_mut((p / self.stride) as usize) else {
            return;
        };
        let offset = owned.next_offset;
        owned.next_offset += 1;
        let mut counted = false;
        let mut duplicate = false;
        for (input, state) in self.inputs.iter().zip(owned.states.iter_mut()) {
            let rec = match input {
                Input::Events => Rec::new(event, &[], None),
                Input::Monitored => Rec::new(event, &self.pools, None),
            };
            let Some(rec) = rec else { continue };
            match state.process(self.plan, &rec, offset) {
                Outcome::Counted { .. } => counted = true,
                Outcome::Duplicate => duplicate = true,
                Outcome::Stale | Outcome::Ignored => {}
            }
        }
        if counted {
            self.counts.counted += 1;
        } else if duplicate {
            self.counts.duplicates += 1;
        } else {
            self.counts.ignored += 1;
        }
    }

    /// Ends the input: every window closes, and what every state emits is
    /// returned.
    pub fn finish(self) -> (Vec<Emitted>, Counts) {
        let mut out = Vec::new();
        let end = end_of_input();
        for mut owned in self.owned {
            for (input, state) in self.inputs.iter().zip(owned.states.iter_mut()) {
                state.observe_watermark(&end, owned.next_offset);
                out.push(Emitted {
                    input: *input,
                    partition: owned.partition,
                    emission: state.emit(self.plan, false),
                });
            }
        }
        (out, self.counts)
    }
}

/// A watermark record past every event time: one source, complete.
/// (`i64::MAX` itself means "empty source" to the in-band clock.)
fn end_of_input() -> Watermark {
    Watermark {
        writer: "vidpulse-backfill".into(),
        sources: vec![SourceTopic {
            topic: "end-of-input".into(),
            partitions: 1,
        }],
        marks: vec![SourceMark {
            topic: 0,
            partition: 0,
            watermark_ms: i64::MAX - 1,
            empty: false,
        }],
        instance: String::new(),
        written_at_ms: 0,
    }
}
