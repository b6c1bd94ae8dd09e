//! Event-time windows and the per-partition watermark, as pure functions of
//! event times and (for idle partitions) a wall clock passed in, so they are
//! tested with fake time.
//!
//! Windows are aligned to the epoch (UTC). State is kept per *pane*, a
//! slide-long bucket: a tumbling window is one pane, a hopping window of
//! `size` sliding by `slide` is the union of `size / slide` consecutive panes.

use serde::{Deserialize, Serialize};
use vidpulse_core::watermark::{Holder, InbandWatermarks, NONE};
use vidpulse_proto::Watermark as WatermarkRecord;

use crate::spec::Window;

/// Start of the pane (or tumbling window) of length `pane_ms` containing `t`.
pub fn pane_start(t: i64, pane_ms: i64) -> i64 {
    t - t.rem_euclid(pane_ms)
}

/// Starts of every window of `w` that contains `t`, latest first.
pub fn windows_of(t: i64, w: &Window) -> impl Iterator<Item = i64> {
    let p = pane_start(t, w.slide_ms);
    let n = w.size_ms / w.slide_ms;
    (0..n).map(move |i| p - i * w.slide_ms)
}

/// Starts of the windows of `w` that contain pane `pane` (same as
/// [`windows_of`] for any time inside the pane).
pub fn windows_of_pane(pane: i64, w: &Window) -> impl Iterator<Item = i64> {
    windows_of(pane, w)
}

/// The watermark of one input partition: the largest event time seen minus
/// the allowed out-of-orderness, moved on by the wall clock while the
/// partition is idle. It never goes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    /// Largest event time seen (`i64::MIN` before the first event).
    pub max_ts: i64,
    /// Current watermark (`i64::MIN` before the first event): every event
    /// older than this is presumed to have arrived.
    pub wm: i64,
}

impl Default for Watermark {
    fn default() -> Self {
        Watermark {
            max_ts: i64::MIN,
            wm: i64::MIN,
        }
    }
}

impl Watermark {
    /// Takes an event's time into account.
    pub fn observe(&mut self, t: i64, out_of_orderness_ms: i64) {
        if t > self.max_ts {
            self.max_ts = t;
        }
        self.wm = self.wm.max(self.max_ts.saturating_sub(out_of_orderness_ms));
    }

    pub fn current(&self) -> i64 {
        self.wm
    }

    /// Idle advance: once no record arrived for `idle_timeout_ms` (wall
    /// clock), the watermark moves as if time went on from the last event:
    /// `max_ts − out_of_orderness + idle_for`, never past `wall_now −
    /// out_of_orderness`. Returns whether it moved. Before any event there is
    /// nothing to advance.
    pub fn advance_idle(
        &mut self,
        out_of_orderness_ms: i64,
        idle_for_ms: i64,
        idle_timeout_ms: i64,
        wall_now_ms: i64,
    ) -> bool {
        if self.max_ts == i64::MIN || idle_for_ms < idle_timeout_ms {
            return false;
        }
        let candidate = self
            .max_ts
            .saturating_sub(out_of_orderness_ms)
            .saturating_add(idle_for_ms);
        let cap = wall_now_ms.saturating_sub(out_of_orderness_ms).max(self.wm);
        let next = candidate.min(cap);
        if next > self.wm {
            self.wm = next;
            true
        } else {
            false
        }
    }
}

/// Where a partition's event time comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClockMode {
    /// The in-band watermark records upstream writes into the partition:
    /// the minimum over every source that must report (the default).
    InBand,
    /// The largest event time seen in the partition minus the
    /// out-of-orderness, moved on by the wall clock when idle: for producers
    /// that write the input topics without ingest (no watermark records).
    MaxEventTime,
}

/// A partition's event-time clock: its watermark, and what it is made of.
/// It never goes back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Clock {
    InBand { sources: InbandWatermarks, wm: i64 },
    MaxEventTime(Watermark),
}

impl Clock {
    pub fn new(mode: ClockMode) -> Clock {
        match mode {
            ClockMode::InBand => Clock::InBand {
                sources: InbandWatermarks::default(),
                wm: NONE,
            },
            ClockMode::MaxEventTime => Clock::MaxEventTime(Watermark::default()),
        }
    }

    pub fn current(&self) -> i64 {
        match self {
            Clock::InBand { wm, .. } => *wm,
            Clock::MaxEventTime(w) => w.current(),
        }
    }

    /// An event's time (only the max-event-time clock learns from it).
    pub fn observe_event(&mut self, t: i64, out_of_orderness_ms: i64) {
        if let Clock::MaxEventTime(w) = self {
            w.observe(t, out_of_orderness_ms);
        }
    }

    /// A watermark record read from the partition (only the in-band clock
    /// learns from it). Returns whether anything changed.
    pub fn observe_watermark(&mut self, r: &WatermarkRecord) -> bool {
        let Clock::InBand { sources, wm } = self else {
            return false;
        };
        let changed = sources.observe(r);
        *wm = (*wm).max(sources.current());
        changed
    }

    /// The idle advance of the max-event-time clock (see
    /// [`Watermark::advance_idle`]); the in-band clock never moves by itself.
    pub fn advance_idle(
        &mut self,
        out_of_orderness_ms: i64,
        idle_for_ms: i64,
        idle_timeout_ms: i64,
        wall_now_ms: i64,
    ) -> bool {
        match self {
            Clock::MaxEventTime(w) => w.advance_idle(
                out_of_orderness_ms,
                idle_for_ms,
                idle_timeout_ms,
                wall_now_ms,
            ),
            Clock::InBand { .. } => false,
        }
    }

    /// Largest event time seen (max-event-time clock only).
    pub fn max_ts(&self) -> i64 {
        match self {
            Clock::MaxEventTime(w) => w.max_ts,
            Clock::InBand { .. } => i64::MIN,
        }
    }

    /// The source holding an in-band clock back.
    pub fn holder(&self) -> Option<Holder> {
        match self {
            Clock::InBand { sources, .. } => sources.holder(),
            Clock::MaxEventTime(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn tumbling_assignment_is_epoch_aligned_and_half_open() {
        assert_eq!(pane_start(0, MIN), 0);
        assert_eq!(pane_start(59_999, MIN), 0);
        assert_eq!(pane_start(60_000, MIN), 60_000);
        assert_eq!(pane_start(-1, MIN), -MIN, "before the epoch still aligns");
        let w = Window::tumbling(MIN);
        assert_eq!(windows_of(125_000, &w).collect::<Vec<_>>(), vec![120_000]);
    }

    #[test]
    fn hopping_assignment_covers_size_over_slide_windows() {
        let w = Window {
            size_ms: 6 * 3_600_000,
            slide_ms: MIN,
            zone: None,
        };
        let t = 10 * 3_600_000 + 30_500;
        let starts: Vec<i64> = windows_of(t, &w).collect();
        assert_eq!(starts.len(), 360);
        assert_eq!(starts[0], 10 * 3_600_000);
        assert_eq!(*starts.last().unwrap(), 10 * 3_600_000 - 359 * MIN);
        for s in &starts {
            assert!(*s <= t && t < s + w.size_ms, "{s} does not contain {t}");
        }
        // The windows just outside do not contain t.
        assert!(t >= starts.last().unwrap() - MIN + w.size_ms);
        let small = Window {
            size_ms: 3 * MIN,
            slide_ms: MIN,
            zone: None,
        };
        assert_eq!(
            windows_of_pane(2 * MIN, &small).collect::<Vec<_>>(),
            vec![2 * MIN, MIN, 0]
        );
    }

    #[test]
    fn watermark_trails_the_largest_time_and_never_goes_back() {
        let mut w = Watermark::default();
        assert_eq!(w.current(), i64::MIN);
        w.observe(100_000, 5_000);
        assert_eq!(w.current(), 95_000);
        w.observe(50_000, 5_000);
        assert_eq!(w.current(), 95_000, "an old event does not move it back");
        w.observe(103_000, 5_000);
        assert_eq!(w.current(), 98_000);
        assert_eq!(w.max_ts, 103_000);
    }

    #[test]
    fn idle_partition_advances_with_the_wall_clock_after_the_timeout() {
        let ooo = 5_000;
        let mut w = Watermark::default();
        // No event yet: nothing to advance.
        assert!(!w.advance_idle(ooo, 60_000, 10_000, 2_000_000_000_000));
        w.observe(1_000_000, ooo);
        let wall = 1_700_000_000_000; // historical data, far behind the wall clock
        assert!(!w.advance_idle(ooo, 9_999, 10_000, wall), "not idle yet");
        assert_eq!(w.current(), 995_000);
        assert!(w.advance_idle(ooo, 10_000, 10_000, wall));
        assert_eq!(w.current(), 1_005_000);
        assert!(w.advance_idle(ooo, 70_000, 10_000, wall));
        assert_eq!(w.current(), 1_065_000);
        // A new event behind the advanced watermark does not pull it back.
        w.observe(1_001_000, ooo);
        assert_eq!(w.current(), 1_065_000);
    }

    #[test]
    fn idle_advance_never_passes_the_wall_clock() {
        let ooo = 2_000;
        let mut w = Watermark::default();
        let now = 1_000_000;
        w.observe(now - 1_000, ooo);
        // Idle 30 s by the partition's clock, but the wall clock says only
        // 20 s passed since `now`: capped at wall − out-of-orderness.
        assert!(w.advance_idle(ooo, 30_000, 10_000, now + 20_000));
        assert_eq!(w.current(), now + 20_000 - ooo);
        // A clock behind the events: stays where it is.
        let mut v = Watermark::default();
        v.observe(now, ooo);
        assert!(!v.advance_idle(ooo, 30_000, 10_000, now - 60_000));
        assert_eq!(v.current(), now - ooo);
    }
}
