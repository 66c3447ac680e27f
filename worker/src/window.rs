//! What a crash can re-deliver from one partition: the records from the last acknowledged commit onwards that were
//! already started. A partition task keeps that under `concurrency.uncommittedPerPartition` with a horizon: only the
//! first `limit` records received from the acknowledged commit point may start. Within the horizon any order is
//! fine (key ordering lets later keys pass a waiting one); the record at the commit point is always inside it, so
//! the commit point can always advance and the horizon never deadlocks. The task asks for an early commit when half
//! the window is done but unacknowledged, and while the horizon holds records back.
//!
//! So the redelivery of a kill -9, a lost assignment or a run of rejected commits is a configured number per
//! partition, not a function of throughput, commit interval and rebalance timing. Counting is by received records,
//! not offsets: compacted topics and transaction markers leave offset gaps that hold no records.

use std::collections::VecDeque;

use crate::tracker::OffsetTracker;

/// Published commit points kept for matching acknowledgements; beyond this the oldest are dropped (an
/// acknowledgement then settles less than it could, never more).
const MAX_PUBLISHED: usize = 4096;

#[derive(Debug)]
pub struct UncommittedWindow {
    limit: u64,
    /// Received records below the last acknowledged commit, ever.
    acknowledged: u64,
    /// Commit points offered to the consumer and not yet acknowledged, with the number of received records below
    /// each (both increasing).
    published: VecDeque<(i64, u64)>,
}

impl UncommittedWindow {
    pub fn new(limit: usize) -> Self {
        Self { limit: limit.max(1) as u64, acknowledged: 0, published: VecDeque::new() }
    }

    /// The task offered `commit_point` to the consumer with `below` received records under it
    /// ([`OffsetTracker::settled`]).
    pub fn published(&mut self, commit_point: i64, below: u64) {
        if self.published.back().is_some_and(|&(point, _)| point >= commit_point) {
            return;
        }
        if self.published.len() >= MAX_PUBLISHED {
            self.published.pop_front();
        }
        self.published.push_back((commit_point, below));
    }

    /// The broker acknowledged a commit at `offset`: the records below it can no longer be re-delivered.
    pub fn acknowledged(&mut self, offset: i64) {
        while let Some(&(point, below)) = self.published.front()
            && point <= offset
        {
            self.acknowledged = self.acknowledged.max(below);
            self.published.pop_front();
        }
    }

    /// The tracker re-based (an offset regression): commit points published before it say nothing about the offsets
    /// received from now on, so the window restarts empty, with everything settled so far counted as acknowledged.
    pub fn rebased(&mut self, tracker: &OffsetTracker) {
        self.published.clear();
        self.acknowledged = tracker.settled();
    }

    /// Records done and below the commit point, but not yet below an acknowledged commit.
    pub fn unacknowledged(&self, tracker: &OffsetTracker) -> u64 {
        tracker.settled().saturating_sub(self.acknowledged)
    }

    /// The first offset that must not start yet; `None` when every received record may start.
    pub fn horizon(&self, tracker: &OffsetTracker) -> Option<i64> {
        let behind = self.unacknowledged(tracker);
        match self.limit.checked_sub(behind) {
            Some(ahead) if ahead > 0 => tracker.nth_from_commit_point(usize::try_from(ahead).unwrap_or(usize::MAX)),
            _ => tracker.committable(),
        }
    }

    /// Whether to commit before the interval is up: something acknowledgeable exists, and it fills half the window
    /// or the horizon is holding records back.
    pub fn wants_commit(&self, tracker: &OffsetTracker, held_back: bool) -> bool {
        let behind = self.unacknowledged(tracker);
        behind > 0 && (behind * 2 >= self.limit || held_back)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn tracker_with(offsets: impl IntoIterator<Item = i64>) -> OffsetTracker {
        let mut t = OffsetTracker::new();
        for o in offsets {
            assert!(t.received(o).is_none());
        }
        t
    }

    #[test]
    fn only_the_first_limit_records_from_the_acknowledged_point_may_start() {
        let mut t = tracker_with((100..120).map(|i| i * 2)); // offsets 200, 202, ..., 238
        let mut w = UncommittedWindow::new(5);
        assert_eq!(w.horizon(&t), Some(210), "200..208 (5 records) may start");
        for o in [200, 202, 204] {
            t.done(o, 0);
        }
        w.published(t.committable().unwrap(), t.settled());
        assert_eq!(w.horizon(&t), Some(210), "done but unacknowledged records still count");
        assert!(w.wants_commit(&t, false), "3 of 5 done: commit early");
        w.acknowledged(205);
        assert_eq!(w.horizon(&t), Some(210), "205 is below the published commit point 206: settles nothing");
        w.acknowledged(206);
        assert_eq!(w.horizon(&t), Some(216), "acknowledged at 206: 206..214 may start");
        assert!(!w.wants_commit(&t, true), "nothing to acknowledge");
    }

    #[test]
    fn a_full_window_of_done_records_waits_for_the_commit_only() {
        let mut t = tracker_with(0..10);
        let mut w = UncommittedWindow::new(3);
        for o in 0..3 {
            t.done(o, 0);
        }
        w.published(3, 3);
        assert_eq!(w.horizon(&t), Some(3), "nothing from the commit point on starts");
        w.acknowledged(2);
        assert_eq!(w.horizon(&t), Some(3), "an acknowledgement below every published point settles nothing");
        w.acknowledged(3);
        assert_eq!(w.horizon(&t), Some(6));
    }

    #[test]
    fn horizon_is_open_when_fewer_records_than_the_limit_arrived() {
        let t = tracker_with([7, 9]);
        assert_eq!(UncommittedWindow::new(3).horizon(&t), None);
        assert_eq!(UncommittedWindow::new(3).horizon(&OffsetTracker::new()), None);
    }

    proptest! {
        /// Any start order inside the horizon, any completion order, any pattern of acknowledged commits: the
        /// started records at or above the acknowledged commit point (what a crash re-delivers) never exceed the
        /// limit, and the partition always finishes (the horizon never deadlocks).
        #[test]
        fn bounds_what_a_crash_would_redeliver_and_never_deadlocks(
            gaps in proptest::collection::vec(1i64..4, 1..50),
            choices in proptest::collection::vec(any::<u16>(), 64),
            limit in 1usize..12,
        ) {
            let offsets: Vec<i64> = gaps.iter().scan(0, |o, g| { *o += g; Some(*o) }).collect();
            let mut t = tracker_with(offsets.iter().copied());
            let mut w = UncommittedWindow::new(limit);
            let (mut started, mut done) = (vec![false; offsets.len()], vec![false; offsets.len()]);
            let mut acked = i64::MIN;
            for step in 0..10_000usize {
                if done.iter().all(|d| *d) {
                    break;
                }
                prop_assert!(step < 9_999, "no progress");
                let c = usize::from(choices[step % choices.len()]);
                if c % 3 == 2 {
                    // A commit of the current commit point lands.
                    acked = t.committable().unwrap();
                    w.acknowledged(acked);
                }
                let horizon = w.horizon(&t);
                let startable: Vec<usize> = (0..offsets.len())
                    .filter(|&i| !started[i] && horizon.is_none_or(|h| offsets[i] < h))
                    .collect();
                let in_flight: Vec<usize> = (0..offsets.len()).filter(|&i| started[i] && !done[i]).collect();
                let prefer_start = (c / 3) % 2 == 0;
                if !startable.is_empty() && (prefer_start || in_flight.is_empty()) {
                    started[startable[c % startable.len()]] = true;
                } else if !in_flight.is_empty() {
                    let i = in_flight[c % in_flight.len()];
                    done[i] = true;
                    t.done(offsets[i], 0);
                    w.published(t.committable().unwrap(), t.settled());
                } else {
                    // Nothing may start and nothing is in flight: only a commit can help, and it must.
                    acked = t.committable().unwrap();
                    w.acknowledged(acked);
                    let horizon = w.horizon(&t);
                    prop_assert!(
                        (0..offsets.len()).any(|i| !started[i] && horizon.is_none_or(|h| offsets[i] < h)),
                        "deadlock: nothing may start after the commit point {acked} was acknowledged"
                    );
                }
                let at_risk = (0..offsets.len()).filter(|&i| started[i] && offsets[i] >= acked).count();
                prop_assert!(at_risk <= limit, "{at_risk} started records above the acknowledged commit {acked}");
            }
        }
    }
}
