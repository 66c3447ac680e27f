//! Backpressure of one partition as a small state machine: the consumer thread stages records for the partition's
//! task; chunks that find the task's channel full (or the worker's buffer budget spent) wait in an overflow; a large
//! overflow first *holds* the consumer thread, and only an overflow that does not drain pauses the partition in
//! librdkafka, which is resumed once the overflow is gone and the channel has room again.
//!
//! Pausing is expensive: librdkafka drops the partition's prefetched records, fetches them again on resume and
//! decompresses them again. One fetch response of a partition (`max.partition.fetch.bytes` of compressed records)
//! can hold more than the overflow limit once decompressed (13 MiB of 1 KiB records of the `make bench-peers` data),
//! so a task that drains at full speed would pause after every response. Holding instead stops taking records from
//! librdkafka (its queue is bounded by `queued.min.messages` / `queued.max.messages.kbytes`, so memory stays
//! bounded) until the overflow has drained, for at most [`HOLD_MAX`]: a task that keeps up never pauses, and a stuck
//! one stops the worker's other partitions for that long, once per pause. A paused partition is resumed only once its
//! channel is at least half free (hysteresis against pause/resume churn).

use std::time::{Duration, Instant};

/// Longest the consumer thread holds (takes no records) for one partition's overflow before pausing it instead.
/// Long against a task that keeps up (a noop task takes a 256 KiB chunk in well under a millisecond), short against
/// the fetch pause of the worker's other partitions it causes.
pub(super) const HOLD_MAX: Duration = Duration::from_millis(20);

/// Whether librdkafka fetches for the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    /// Fetching; records that find the channel full go to the overflow.
    Consuming,
    /// The overflow reached its limit at `since`: the consumer thread takes no records until it drains.
    Holding { since: Instant },
    /// Paused in librdkafka until the overflow has drained into the task and the channel is half free.
    Paused,
}

/// What the caller must do: stop or restart taking records, tell librdkafka (and the
/// `kpipe_worker_paused_partitions` gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// Take no records from librdkafka until this partition releases or pauses.
    Hold,
    /// The overflow drained while holding: take records again.
    Release,
    Pause,
    Resume,
}

/// When an overflow holds a partition: `bytes` bytes waiting in it (`Record::buffered_bytes`, which counts each
/// record's bookkeeping, so many tiny records weigh what they hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OverflowLimit {
    pub(super) bytes: u64,
}

/// One partition's backpressure state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Backpressure {
    flow: Flow,
    limit: OverflowLimit,
}

/// What [`Backpressure::flushed`] is told after a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct AfterFlush {
    /// Every overflowed chunk reached the task.
    pub(super) overflow_empty: bool,
    /// Free chunk slots in the task's channel, of `max_slots`.
    pub(super) free_slots: usize,
    pub(super) max_slots: usize,
    /// The worker-wide buffer bound lets the partition hand more records to its task (releases a hold).
    pub(super) may_hand_over: bool,
    /// The stricter bound for fetching again after a pause (hysteresis).
    pub(super) may_resume: bool,
    pub(super) now: Instant,
}

impl Backpressure {
    pub(super) fn new(limit: OverflowLimit) -> Self {
        Self { flow: Flow::Consuming, limit }
    }

    pub(super) fn is_paused(&self) -> bool {
        self.flow == Flow::Paused
    }

    pub(super) fn is_holding(&self) -> bool {
        matches!(self.flow, Flow::Holding { .. })
    }

    /// The overflow grew to `bytes` bytes at `now`: hold when it reached the limit, or at once when the worker is
    /// `over_budget` (its worker-wide bound on buffered bytes).
    pub(super) fn overflowed(&mut self, bytes: u64, over_budget: bool, now: Instant) -> Option<Action> {
        match self.flow {
            Flow::Consuming if over_budget || bytes >= self.limit.bytes => {
                self.flow = Flow::Holding { since: now };
                Some(Action::Hold)
            }
            _ => None,
        }
    }

    /// The pause asked for by [`Backpressure::flushed`] failed: consuming again, so the next overflow holds again.
    pub(super) fn pause_failed(&mut self) {
        self.flow = Flow::Consuming;
    }

    /// After a flush: a holding partition releases once its overflow is gone and the budget lets it hand over more,
    /// and pauses once it held for [`HOLD_MAX`]; a paused one resumes when the overflow is gone, half its channel is
    /// free and the budget's resume bound allows.
    pub(super) fn flushed(&mut self, after: AfterFlush) -> Option<Action> {
        match self.flow {
            Flow::Holding { .. } if after.overflow_empty && after.may_hand_over => {
                self.flow = Flow::Consuming;
                Some(Action::Release)
            }
            Flow::Holding { since } if after.now.saturating_duration_since(since) >= HOLD_MAX => {
                self.flow = Flow::Paused;
                Some(Action::Pause)
            }
            Flow::Paused if after.overflow_empty && after.free_slots * 2 >= after.max_slots && after.may_resume => {
                self.flow = Flow::Consuming;
                Some(Action::Resume)
            }
            _ => None,
        }
    }

    /// Whether the consumer thread must keep flushing this partition soon (records wait in the overflow, or
    /// it holds or is paused and waits for room).
    pub(super) fn waiting(&self, overflow_empty: bool) -> bool {
        !overflow_empty || self.flow != Flow::Consuming
    }
}

/// A change of the consumer thread's hold (while any partition holds, it takes no fetched records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HoldEdge {
    Started,
    /// The hold ended after this long.
    Ended(Duration),
}

/// Times the consumer thread's holds for `kpipe_worker_consumer_holds_total` and
/// `kpipe_worker_consumer_held_seconds_total`: one hold lasts from the first partition that holds to the moment none
/// does, however many partitions held meanwhile.
#[derive(Debug, Default)]
pub(super) struct HoldClock {
    since: Option<Instant>,
}

impl HoldClock {
    /// Whether some partition holds, as of `now`; returns the edge this is, if it is one.
    pub(super) fn set(&mut self, holding: bool, now: Instant) -> Option<HoldEdge> {
        match (holding, self.since) {
            (true, None) => {
                self.since = Some(now);
                Some(HoldEdge::Started)
            }
            (false, Some(since)) => {
                self.since = None;
                Some(HoldEdge::Ended(now.saturating_duration_since(since)))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_clock_reports_each_hold_once_from_its_start_to_its_end() {
        let mut clock = HoldClock::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(clock.set(false, t0), None, "not holding");
        assert_eq!(clock.set(true, t0 + ms(1)), Some(HoldEdge::Started));
        assert_eq!(clock.set(true, t0 + ms(5)), None, "another partition holding too: still the same hold");
        assert_eq!(clock.set(false, t0 + ms(21)), Some(HoldEdge::Ended(ms(20))));
        assert_eq!(clock.set(false, t0 + ms(30)), None, "the ended hold is not counted again");
        assert_eq!(clock.set(true, t0 + ms(40)), Some(HoldEdge::Started));
        assert_eq!(clock.set(false, t0 + ms(43)), Some(HoldEdge::Ended(ms(3))), "the next hold from its own start");
    }

    const LIMIT: OverflowLimit = OverflowLimit { bytes: 1_000 };

    fn after(overflow_empty: bool, free_slots: usize, budget: bool, now: Instant) -> AfterFlush {
        AfterFlush { overflow_empty, free_slots, max_slots: 16, may_hand_over: budget, may_resume: budget, now }
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_small_overflow_keeps_consuming() {
        let mut b = Backpressure::new(LIMIT);
        assert_eq!(b.overflowed(999, false, Instant::now()), None);
        assert!(!b.is_paused() && !b.is_holding());
        assert!(b.waiting(false), "records in the overflow must be flushed soon");
        assert!(!b.waiting(true));
    }

    #[test]
    fn the_limit_holds_once() {
        let t0 = Instant::now();
        let mut b = Backpressure::new(LIMIT);
        assert_eq!(b.overflowed(1_000, false, t0), Some(Action::Hold));
        assert!(b.is_holding() && !b.is_paused());
        assert!(b.waiting(true), "a holding partition keeps the consumer flushing");
        assert_eq!(b.overflowed(5_000, false, ms(t0, 1)), None, "already holding: no second hold");
    }

    #[test]
    fn a_hold_releases_when_the_overflow_drains_in_time_without_a_pause() {
        let t0 = Instant::now();
        let mut b = Backpressure::new(LIMIT);
        b.overflowed(1_000, false, t0);
        assert_eq!(b.flushed(after(false, 16, true, ms(t0, 5))), None, "overflow left, within HOLD_MAX");
        assert_eq!(b.flushed(after(true, 0, false, ms(t0, 6))), None, "the budget does not allow more yet");
        assert_eq!(b.flushed(after(true, 0, true, ms(t0, 7))), Some(Action::Release), "no channel room needed");
        assert!(!b.is_holding() && !b.is_paused());
        assert_eq!(b.flushed(after(true, 16, true, ms(t0, 8))), None, "consuming: nothing to do");
    }

    #[test]
    fn a_hold_that_does_not_drain_pauses_after_hold_max_and_resumes_with_room() {
        let t0 = Instant::now();
        let mut b = Backpressure::new(LIMIT);
        b.overflowed(1_000, false, t0);
        let just_before = t0 + HOLD_MAX - Duration::from_millis(1);
        assert_eq!(b.flushed(after(false, 0, true, just_before)), None);
        assert_eq!(b.flushed(after(false, 0, true, t0 + HOLD_MAX)), Some(Action::Pause));
        assert!(b.is_paused() && !b.is_holding());
        assert_eq!(b.flushed(after(false, 16, true, ms(t0, 100))), None, "overflow left");
        assert_eq!(b.flushed(after(true, 7, true, ms(t0, 101))), None, "less than half free");
        assert!(b.waiting(true), "paused partitions are flushed until resumed");
        assert_eq!(b.flushed(after(true, 8, true, ms(t0, 102))), Some(Action::Resume));
        assert!(!b.is_paused());
        assert_eq!(b.flushed(after(true, 16, true, ms(t0, 103))), None, "already consuming: no second resume");
    }

    #[test]
    fn a_failed_pause_holds_again_at_the_next_overflow() {
        let t0 = Instant::now();
        let mut b = Backpressure::new(LIMIT);
        b.overflowed(1_000, false, t0);
        assert_eq!(b.flushed(after(false, 0, true, t0 + HOLD_MAX)), Some(Action::Pause));
        b.pause_failed();
        assert!(!b.is_paused() && !b.is_holding());
        assert_eq!(b.overflowed(1_010, false, ms(t0, 30)), Some(Action::Hold), "the next overflow holds again");
    }

    #[test]
    fn hold_pause_resume_cycles() {
        let t0 = Instant::now();
        let mut b = Backpressure::new(LIMIT);
        let mut actions = Vec::new();
        for round in 0..3u64 {
            let t = ms(t0, round * 1_000);
            actions.extend(b.overflowed(2_000, false, t));
            actions.extend(b.overflowed(3_000, false, t));
            actions.extend(b.flushed(after(false, 0, true, t + HOLD_MAX)));
            actions.extend(b.flushed(after(true, 10, true, ms(t, 500))));
            actions.extend(b.flushed(after(true, 10, true, ms(t, 501))));
        }
        assert_eq!(actions, [Action::Hold, Action::Pause, Action::Resume].repeat(3));
    }

    #[test]
    fn over_the_worker_budget_the_first_overflow_holds_and_only_the_budget_lets_it_go_on() {
        let t0 = Instant::now();
        let mut b = Backpressure::new(LIMIT);
        assert_eq!(b.overflowed(10, true, t0), Some(Action::Hold), "over budget: the first overflow holds");
        assert_eq!(b.flushed(after(true, 16, false, ms(t0, 1))), None, "the partition has room, the worker does not");
        assert_eq!(b.flushed(after(true, 16, true, ms(t0, 2))), Some(Action::Release));
        // Paused over budget: the resume bound decides, not the hand-over bound.
        b.overflowed(10, true, ms(t0, 3));
        b.flushed(after(false, 0, false, ms(t0, 3) + HOLD_MAX));
        assert!(b.is_paused());
        let resume_blocked = AfterFlush { may_resume: false, ..after(true, 16, true, ms(t0, 50)) };
        assert_eq!(b.flushed(resume_blocked), None, "above half the budget a paused partition waits");
        assert_eq!(b.flushed(after(true, 16, true, ms(t0, 51))), Some(Action::Resume));
    }
}
