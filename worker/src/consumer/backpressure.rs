//! Backpressure of one partition as a small state machine: the consumer thread stages records for the partition's
//! task; chunks that find the task's channel full wait in an overflow; a large overflow pauses the partition in
//! librdkafka, and it is resumed once the overflow is gone and the channel has room again.
//!
//! Pausing is expensive (librdkafka drops the partition's prefetched records and fetches them again on resume),
//! so it is reserved for real backlogs: the overflow must absorb a whole fetch response of a partition (up to
//! `max.partition.fetch.bytes`) without pausing, and a paused partition is only resumed once its channel is at
//! least half free (hysteresis against pause/resume churn).

/// Whether librdkafka fetches for the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    /// Fetching; records that find the channel full go to the overflow.
    Consuming,
    /// Paused in librdkafka until the overflow has drained into the task and the channel is half free.
    Paused,
}

/// What the caller must tell librdkafka (and the `kpipe_worker_paused_partitions` gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    Pause,
    Resume,
}

/// When an overflow pauses a partition: `bytes` bytes waiting in it (`Record::buffered_bytes`, which counts each
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

impl Backpressure {
    pub(super) fn new(limit: OverflowLimit) -> Self {
        Self { flow: Flow::Consuming, limit }
    }

    pub(super) fn is_paused(&self) -> bool {
        self.flow == Flow::Paused
    }

    /// The overflow grew to `bytes` bytes: pause when it reached the limit, or at once when the worker is
    /// `over_budget` (its worker-wide bound on buffered bytes).
    pub(super) fn overflowed(&mut self, bytes: u64, over_budget: bool) -> Option<Action> {
        match self.flow {
            Flow::Consuming if over_budget || bytes >= self.limit.bytes => {
                self.flow = Flow::Paused;
                Some(Action::Pause)
            }
            _ => None,
        }
    }

    /// The pause asked for by [`Backpressure::overflowed`] failed: still consuming, so the next overflow asks again.
    pub(super) fn pause_failed(&mut self) {
        self.flow = Flow::Consuming;
    }

    /// After a flush: `overflow_empty` when every overflowed chunk reached the task, `free_slots` of
    /// `max_slots` chunks free in its channel, `budget_allows` when the worker-wide buffer bound does. Resumes when
    /// all three allow it.
    pub(super) fn flushed(
        &mut self,
        overflow_empty: bool,
        free_slots: usize,
        max_slots: usize,
        budget_allows: bool,
    ) -> Option<Action> {
        match self.flow {
            Flow::Paused if overflow_empty && free_slots * 2 >= max_slots && budget_allows => {
                self.flow = Flow::Consuming;
                Some(Action::Resume)
            }
            _ => None,
        }
    }

    /// Whether the consumer thread must keep flushing this partition soon (records wait in the overflow, or
    /// it is paused and waits for room).
    pub(super) fn waiting(&self, overflow_empty: bool) -> bool {
        !overflow_empty || self.is_paused()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: OverflowLimit = OverflowLimit { bytes: 1_000 };

    #[test]
    fn a_small_overflow_keeps_consuming() {
        let mut b = Backpressure::new(LIMIT);
        assert_eq!(b.overflowed(999, false), None);
        assert!(!b.is_paused());
        assert!(b.waiting(false), "records in the overflow must be flushed soon");
        assert!(!b.waiting(true));
    }

    #[test]
    fn the_limit_pauses_once() {
        let mut b = Backpressure::new(LIMIT);
        assert_eq!(b.overflowed(1_000, false), Some(Action::Pause));
        assert!(b.is_paused());
        assert_eq!(b.overflowed(5_000, false), None, "already paused: no second pause");
    }

    #[test]
    fn a_failed_pause_is_asked_for_again() {
        let mut b = Backpressure::new(LIMIT);
        assert_eq!(b.overflowed(1_000, false), Some(Action::Pause));
        b.pause_failed();
        assert!(!b.is_paused());
        assert_eq!(b.overflowed(1_010, false), Some(Action::Pause), "the next overflow pauses again");
    }

    #[test]
    fn resumes_only_with_the_overflow_gone_and_half_the_channel_free() {
        let mut b = Backpressure::new(LIMIT);
        b.overflowed(1_000, false);
        assert_eq!(b.flushed(false, 16, 16, true), None, "overflow left");
        assert_eq!(b.flushed(true, 7, 16, true), None, "less than half free");
        assert!(b.waiting(true), "paused partitions are flushed until resumed");
        assert_eq!(b.flushed(true, 8, 16, true), Some(Action::Resume));
        assert!(!b.is_paused());
        assert_eq!(b.flushed(true, 16, 16, true), None, "already consuming: no second resume");
    }

    #[test]
    fn pause_and_resume_alternate() {
        let mut b = Backpressure::new(LIMIT);
        let mut actions = Vec::new();
        for _ in 0..3 {
            actions.extend(b.overflowed(2_000, false));
            actions.extend(b.overflowed(3_000, false));
            actions.extend(b.flushed(true, 10, 10, true));
            actions.extend(b.flushed(true, 10, 10, true));
        }
        assert_eq!(actions, [Action::Pause, Action::Resume].repeat(3));
    }

    #[test]
    fn over_the_worker_budget_the_first_overflow_pauses_and_only_the_budget_lets_it_resume() {
        let mut b = Backpressure::new(LIMIT);
        assert_eq!(b.overflowed(10, true), Some(Action::Pause), "over budget: the first overflow pauses");
        assert_eq!(b.flushed(true, 16, 16, false), None, "the partition has room, the worker does not");
        assert!(b.waiting(true), "a paused partition keeps the consumer flushing");
        assert_eq!(b.flushed(true, 16, 16, true), Some(Action::Resume));
    }
}
