//! Offset tracking for at-least-once delivery: an input offset becomes
//! committable only when it and every earlier offset of its partition have
//! been fully handled (all the records produced for it acknowledged). Acks
//! may arrive out of order (outputs go to different partitions); the
//! committable offset never skips an unacknowledged record.

use std::collections::BTreeMap;
use std::collections::HashMap;

/// A partition of one of the stage's input topics; topics are interned to a
/// small index by the caller.
pub type Tp = (u16, i32);

#[derive(Debug, Default)]
struct Part {
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
    pub fn begin(&mut self, tp: Tp, offset: i64, outputs: u32) -> Option<i64> {
        let part = self.parts.entry(tp).or_insert_with(|| Part {
            pending: BTreeMap::new(),
            next: offset,
            stored: offset,
        });
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
    /// committable offset when it moved.
    pub fn ack(&mut self, tp: Tp, offset: i64) -> Option<i64> {
        let part = self.parts.get_mut(&tp)?;
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const P: Tp = (0, 3);

    #[test]
    fn out_of_order_acks_never_skip_a_pending_offset() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.begin(P, 10, 1), None);
        assert_eq!(t.begin(P, 11, 2), None);
        assert_eq!(t.begin(P, 12, 1), None);
        // 12 acked first: 10 still pending, nothing moves.
        assert_eq!(t.ack(P, 12), None);
        assert_eq!(t.ack(P, 11), None);
        // 10 done: 11 still has one output pending.
        assert_eq!(t.ack(P, 10), Some(11));
        assert_eq!(t.ack(P, 11), Some(13));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.take_moved(), vec![(P, 13)]);
        assert!(t.take_moved().is_empty());
    }

    #[test]
    fn inputs_without_outputs_commit_at_once_but_not_past_pending() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.begin(P, 0, 0), Some(1));
        assert_eq!(t.begin(P, 1, 1), None);
        assert_eq!(t.begin(P, 2, 0), None, "offset 1 still pending");
        assert_eq!(t.ack(P, 1), Some(3));
    }

    #[test]
    fn partitions_are_independent_and_forget_drops_state() {
        let mut t = OffsetTracker::new();
        let q: Tp = (1, 3);
        t.begin(P, 5, 1);
        assert_eq!(t.begin(q, 7, 0), Some(8));
        t.forget(P);
        assert_eq!(t.ack(P, 5), None);
        assert_eq!(t.in_flight(), 0);
        let all: Vec<_> = t.committable().collect();
        assert_eq!(all, vec![(q, 8)]);
    }
}
