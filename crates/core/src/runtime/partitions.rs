//! Which input partitions this instance owns, under which assignment
//! generation, and why any of them is paused. Pure bookkeeping: the runner
//! turns its answers into librdkafka pause / seek / resume calls.

use std::collections::HashMap;

use super::{InputPartition, StartAt};

/// Why a partition is not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Assigned; the stage's `on_assign` has not answered yet.
    Assigning = 1,
    /// The stage says it cannot handle the partition's records now.
    Gate = 2,
    /// A dependency fails; nothing is read until it answers.
    Backpressure = 4,
}

#[derive(Debug)]
pub(crate) struct Part {
    pub generation: u64,
    holds: u8,
    /// Whether librdkafka has it paused.
    pub paused: bool,
    /// Where to seek before resuming: the stage's start, or the first record
    /// that arrived while held (it was not handled).
    seek: Option<StartAt>,
}

/// What to do with a record just fetched.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Hand it to the stage; it was read under this generation.
    Yes(u64),
    /// Not ours (revoked, or fetched before the assignment): drop it.
    NotOwned,
    /// Held: it will be re-read; pause the partition if it is not paused.
    Held { pause: bool },
}

/// What to do to resume a partition.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Resume {
    pub part: InputPartition,
    pub seek: Option<StartAt>,
}

#[derive(Debug, Default)]
pub(crate) struct Partitions {
    next_generation: u64,
    parts: HashMap<InputPartition, Part>,
}

impl Partitions {
    /// Takes newly assigned partitions (paused, waiting for `on_assign`).
    pub fn assign(&mut self, parts: &[InputPartition]) {
        for p in parts {
            self.next_generation += 1;
            self.parts.insert(
                *p,
                Part {
                    generation: self.next_generation,
                    holds: Hold::Assigning as u8,
                    paused: true,
                    seek: None,
                },
            );
        }
    }

    /// Forgets revoked partitions; returns those that were owned.
    pub fn revoke(&mut self, parts: &[InputPartition]) -> Vec<InputPartition> {
        parts
            .iter()
            .filter(|p| self.parts.remove(p).is_some())
            .copied()
            .collect()
    }

    pub fn owned(&self) -> impl Iterator<Item = InputPartition> + '_ {
        self.parts.keys().copied()
    }

    pub fn generation(&self, p: InputPartition) -> Option<u64> {
        self.parts.get(&p).map(|x| x.generation)
    }

    /// Decides about a fetched record of `p` at `offset`.
    pub fn admit(&mut self, p: InputPartition, offset: i64) -> Admit {
        let Some(part) = self.parts.get_mut(&p) else {
            return Admit::NotOwned;
        };
        if part.holds == 0 {
            return Admit::Yes(part.generation);
        }
        // The first record not handled is where reading resumes, unless the
        // stage chose a start (it decides where reading begins).
        match part.seek {
            Some(StartAt::Offset(o)) if o <= offset => {}
            Some(StartAt::Beginning) => {}
            _ => part.seek = Some(StartAt::Offset(offset)),
        }
        let pause = !part.paused;
        part.paused = true;
        Admit::Held { pause }
    }

    /// Sets where reading starts once `p` resumes.
    pub fn start_at(&mut self, p: InputPartition, start: StartAt) {
        if let Some(part) = self.parts.get_mut(&p) {
            part.seek = match start {
                StartAt::Committed => part.seek,
                s => Some(s),
            };
        }
    }

    /// Adds `hold` to `p`; returns whether it must be paused now.
    pub fn hold(&mut self, p: InputPartition, hold: Hold) -> bool {
        let Some(part) = self.parts.get_mut(&p) else {
            return false;
        };
        part.holds |= hold as u8;
        let pause = !part.paused;
        part.paused = true;
        pause
    }

    /// Adds `hold` to every owned partition; returns those to pause now.
    pub fn hold_all(&mut self, hold: Hold) -> Vec<InputPartition> {
        let owned: Vec<InputPartition> = self.owned().collect();
        owned.into_iter().filter(|p| self.hold(*p, hold)).collect()
    }

    /// Removes `hold` from `p`; when nothing holds it any more, says how to
    /// resume it (the runner seeks, then resumes, then calls
    /// [`Self::resumed`]).
    pub fn release(&mut self, p: InputPartition, hold: Hold) -> Option<Resume> {
        let part = self.parts.get_mut(&p)?;
        part.holds &= !(hold as u8);
        (part.holds == 0 && part.paused).then_some(Resume {
            part: p,
            seek: part.seek,
        })
    }

    /// Removes `hold` from every partition; the ones to resume.
    pub fn release_all(&mut self, hold: Hold) -> Vec<Resume> {
        let owned: Vec<InputPartition> = self.owned().collect();
        owned
            .into_iter()
            .filter_map(|p| self.release(p, hold))
            .collect()
    }

    /// `p` was resumed (after seeking to its start, if any).
    pub fn resumed(&mut self, p: InputPartition) {
        if let Some(part) = self.parts.get_mut(&p) {
            part.paused = false;
            part.seek = None;
        }
    }

    /// Partitions held only by `hold`.
    pub fn held_only_by(&self, hold: Hold) -> Vec<InputPartition> {
        self.parts
            .iter()
            .filter(|(_, x)| x.holds == hold as u8)
            .map(|(p, _)| *p)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: InputPartition = InputPartition {
        topic: 0,
        partition: 1,
    };

    #[test]
    fn assigned_partitions_wait_for_the_stage_then_start_where_it_says() {
        let mut ps = Partitions::default();
        ps.assign(&[P]);
        let g = ps.generation(P).unwrap_or(0);
        // Fetched before the pause took effect: re-read later.
        assert_eq!(ps.admit(P, 5), Admit::Held { pause: false });
        ps.start_at(P, StartAt::Offset(3));
        assert_eq!(
            ps.release(P, Hold::Assigning),
            Some(Resume {
                part: P,
                seek: Some(StartAt::Offset(3))
            })
        );
        ps.resumed(P);
        assert_eq!(ps.admit(P, 3), Admit::Yes(g));
    }

    #[test]
    fn a_held_partition_resumes_at_its_first_unhandled_record() {
        let mut ps = Partitions::default();
        ps.assign(&[P]);
        ps.release(P, Hold::Assigning);
        ps.resumed(P);
        assert!(ps.hold(P, Hold::Gate), "pause it now");
        assert!(!ps.hold(P, Hold::Backpressure), "already paused");
        assert_eq!(ps.admit(P, 40), Admit::Held { pause: false });
        assert_eq!(ps.admit(P, 41), Admit::Held { pause: false });
        assert_eq!(
            ps.release(P, Hold::Gate),
            None,
            "still held by back-pressure"
        );
        assert_eq!(ps.held_only_by(Hold::Backpressure), vec![P]);
        let r = ps.release(P, Hold::Backpressure).unwrap();
        assert_eq!(r.seek, Some(StartAt::Offset(40)));
    }

    #[test]
    fn revoked_partitions_are_not_owned_and_come_back_under_a_new_generation() {
        let mut ps = Partitions::default();
        ps.assign(&[P]);
        let g1 = ps.generation(P);
        assert_eq!(ps.revoke(&[P]), vec![P]);
        assert_eq!(ps.admit(P, 1), Admit::NotOwned);
        ps.assign(&[P]);
        assert_ne!(ps.generation(P), g1);
    }
}
