//! Offset tracking for at-least-once delivery: an input offset becomes
//! committable only when it and every earlier offset of its partition have
//! been fully handled (all the records produced for it acknowledged). Acks
//! may arrive out of order (outputs go to different partitions); the
//! committable offset never skips an unacknowledged record.

use std::collections::BTreeMap;
// foldhash, not SipHash: two lookups per record (begin, ack).
use hashbrown::HashMap;

use crate::runtime::InputPartition as Tp;

#[derive(Debug, Default)]
struct Part {
    /// Assignment generation the entries belong to.
    generation: u64,
    /// Offset → outputs still awaiting acknowledgement.
    pending: BTreeMap<i64, u32>,
    /// One past the highest offset seen.
    next: i64,
    /// Last offset handed out as committable.
    stored: i64,
}

impl Part {
    fn committable(&self) -> i64 {
        self.pending.keys().next().copied().unwrap_or(self.next)
    }

    fn advance(&mut self) -> Option<i64> {
        let c = self.committable();
        (c > self.stored).then(|| {
            self.stored = c;
            c
        })
    }
}

/// Tracks in-flight inputs per partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<Tp, Part>,
    /// Partitions whose committable offset moved since the last `take_moved`.
    moved: HashMap<Tp, i64>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers input `offset` with `outputs` records to be acknowledged.
    /// Returns a new committable offset (the next offset to consume) when it
    /// moved, which happens at once for an input with no outputs.
    /// Inputs of another `generation` than the partition's entries start it
    /// afresh (it was revoked and assigned again).
    pub fn begin(&mut self, tp: Tp, generation: u64, offset: i64, outputs: u32) -> Option<i64> {
        let fresh = || Part {
            generation,
            pending: BTreeMap::new(),
            next: offset,
            stored: offset,
        };
        let part = self.parts.entry(tp).or_insert_with(fresh);
        if part.generation != generation {
            *part = fresh();
        }
        part.next = part.next.max(offset + 1);
        if outputs > 0 {
            *part.pending.entry(offset).or_insert(0) += outputs;
            None
        } else {
            let moved = part.advance();
            self.note(tp, moved)
        }
    }

    fn note(&mut self, tp: Tp, moved: Option<i64>) -> Option<i64> {
        if let Some(c) = moved {
            self.moved.insert(tp, c);
        }
        moved
    }

    /// The partitions whose committable offset moved since the last call,
    /// with that offset; what a stage should store next.
    pub fn take_moved(&mut self) -> Vec<(Tp, i64)> {
        self.moved.drain().collect()
    }

    /// Records one acknowledged output of input `offset`; returns the new
    /// committable offset when it moved. Acks of another generation (a
    /// revoked assignment) are ignored.
    pub fn ack(&mut self, tp: Tp, generation: u64, offset: i64) -> Option<i64> {
        let part = self
            .parts
            .get_mut(&tp)
            .filter(|p| p.generation == generation)?;
        if let Some(left) = part.pending.get_mut(&offset) {
            *left -= 1;
            if *left == 0 {
                part.pending.remove(&offset);
            }
        }
        let moved = part.advance();
        self.note(tp, moved)
    }

    /// Forgets a partition (revoked): its pending acks no longer count.
    pub fn forget(&mut self, tp: Tp) {
        self.parts.remove(&tp);
        self.moved.remove(&tp);
    }

    /// Number of inputs still awaiting acks, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.parts.values().map(|p| p.pending.len()).sum()
    }

    /// The committable offset of each partition.
    pub fn committable(&self) -> impl Iterator<Item = (Tp, i64)> + '_ {
        self.parts.iter().map(|(tp, p)| (*tp, p.committable()))
    }

    /// The committable offset of one partition: every input below it is
    /// fully acknowledged.
    pub fn committable_of(&self, tp: Tp) -> Option<i64> {
        self.parts.get(&tp).map(Part::committable)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const P: Tp = Tp {
        topic: 0,
        partition: 3,
    };

    #[test]
    fn out_of_order_acks_never_skip_a_pending_offset() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.begin(P, 1, 10, 1), None);
        assert_eq!(t.begin(P, 1, 11, 2), None);
        assert_eq!(t.begin(P, 1, 12, 1), None);
        // 12 acked first: 10 still pending, nothing moves.
        assert_eq!(t.ack(P, 1, 12), None);
        assert_eq!(t.ack(P, 1, 11), None);
        // 10 done: 11 still has one output pending.
        assert_eq!(t.ack(P, 1, 10), Some(11));
        assert_eq!(t.ack(P, 1, 11), Some(13));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.take_moved(), vec![(P, 13)]);
        assert!(t.take_moved().is_empty());
    }

    #[test]
    fn inputs_without_outputs_commit_at_once_but_not_past_pending() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.begin(P, 1, 0, 0), Some(1));
        assert_eq!(t.begin(P, 1, 1, 1), None);
        assert_eq!(t.begin(P, 1, 2, 0), None, "offset 1 still pending");
        assert_eq!(t.ack(P, 1, 1), Some(3));
    }

    #[test]
    fn acks_of_an_earlier_generation_are_ignored() {
        let mut t = OffsetTracker::new();
        t.begin(P, 1, 10, 1);
        // Revoked, assigned again, and offset 10 read again.
        t.begin(P, 2, 10, 1);
        assert_eq!(t.ack(P, 1, 10), None, "the old delivery counts for nothing");
        assert_eq!(t.committable_of(P), Some(10));
        assert_eq!(t.ack(P, 2, 10), Some(11));
    }

    #[test]
    fn partitions_are_independent_and_forget_drops_state() {
        let mut t = OffsetTracker::new();
        let q: Tp = Tp {
            topic: 1,
            partition: 3,
        };
        t.begin(P, 1, 5, 1);
        assert_eq!(t.begin(q, 1, 7, 0), Some(8));
        t.forget(P);
        assert_eq!(t.ack(P, 1, 5), None);
        assert_eq!(t.in_flight(), 0);
        let all: Vec<_> = t.committable().collect();
        assert_eq!(all, vec![(q, 8)]);
    }
}
