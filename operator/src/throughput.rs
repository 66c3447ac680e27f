//! A small throughput model of a consumer group, learned from the same polls as the lag
//! ([`crate::lag::LagTracker`] feeds it), so the scaler can size for the load instead of the raw lag.
//!
//! - **Capacity per replica.** The commit rate of one replica, sampled on polls after the set of
//!   consumers was stable for [`STABLE_POLLS`] polls (a rebalance pauses them, and a scale-down
//!   would credit the remaining pods with what departed peers committed). A sample is *saturated*
//!   when work waited beyond what was in flight at both ends of the poll: the consumers never ran
//!   dry, so their rate was all they could do. The highest sample is a lower bound of the capacity; it is
//!   the capacity itself when a saturated sample comes close to it.
//! - **Commit delay.** On polls where the group kept up (committed what arrived, within
//!   [`KEEPING_UP`]), lag ÷ commit rate. Not while it drains a backlog: then the lag is backlog. A group that keeps up still shows a lag of about `rate × delay`:
//!   records finished but not yet committed (batching, the periodic commit). More pods cannot
//!   shrink that part; a plain `lag / lagThreshold` rule (KEDA's) pays pods for it. Any backlog
//!   only adds to lag ÷ rate, so the smallest value seen is the delay itself.

use std::collections::VecDeque;
use std::time::Duration;

/// A poll in which the group committed what arrived, within this share, kept up with it.
pub const KEEPING_UP: f64 = 0.05;

/// Longest commit delay the model believes: beyond it a lag is backlog, whatever the history.
pub const MAX_COMMIT_DELAY: Duration = Duration::from_secs(10);

/// Polls with the same number of consumers before their rate says anything about one replica.
pub const STABLE_POLLS: u32 = 2;

/// Backlog, as a share of a poll's commits, that counts as "work waiting".
const SATURATION_MARGIN: f64 = 0.2;

/// A saturated sample within this share of the highest rate seen makes the capacity measured.
const MEASURED_WITHIN: f64 = 0.9;

/// What one replica can do, as far as the model knows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Capacity {
    /// Measured while the replicas had more work than they could do (records/s).
    Measured(f64),
    /// The highest rate a replica has shown without being saturated: it can do at least this.
    AtLeast(f64),
}

impl Capacity {
    /// Records per second.
    pub fn rate(&self) -> f64 {
        match self {
            Self::Measured(r) | Self::AtLeast(r) => *r,
        }
    }
}

/// What one poll tells the model, after the previous poll.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Poll {
    pub at: Duration,
    /// Time since the previous poll.
    pub span: Duration,
    /// Records committed over all partitions since the previous poll.
    pub committed: i64,
    /// Records written to the partitions since the previous poll.
    pub arrived: i64,
    /// Ready consumers now.
    pub consumers: i32,
    /// Scalable lag at the previous poll and now.
    pub lag_before: i64,
    pub lag_now: i64,
    /// The group's commit rate over the recent polls (for the in-flight estimate).
    pub recent_commit_rate: Option<f64>,
}

/// The model's answer after a poll.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Estimate {
    pub capacity: Option<Capacity>,
    /// Lag that only awaits its commit (≤ the lag now).
    pub in_flight: i64,
    /// The set of consumers changed within the last [`STABLE_POLLS`] polls.
    pub rebalancing: bool,
}

#[derive(Clone, Copy, Debug)]
struct RateSample {
    at: Duration,
    per_replica: f64,
    saturated: bool,
}

/// Per-pipeline memory of the model.
#[derive(Clone, Debug)]
pub struct ThroughputModel {
    /// How far back samples count.
    pub window: Duration,
    rates: VecDeque<RateSample>,
    delays: VecDeque<(Duration, f64)>,
    last_consumers: i32,
    stable_polls: u32,
    /// The last estimate, kept when every sample has aged out (a quiet pipeline keeps what it knew).
    last_capacity: Option<Capacity>,
}

impl Default for ThroughputModel {
    fn default() -> Self {
        Self::new(Duration::from_secs(3600))
    }
}

impl ThroughputModel {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            rates: VecDeque::new(),
            delays: VecDeque::new(),
            last_consumers: 0,
            stable_polls: 0,
            last_capacity: None,
        }
    }

    /// Fold in one poll.
    pub fn observe(&mut self, poll: &Poll) -> Estimate {
        if poll.consumers > 0 && poll.consumers == self.last_consumers {
            self.stable_polls = self.stable_polls.saturating_add(1);
        } else {
            self.stable_polls = 0;
        }
        self.last_consumers = poll.consumers;
        let secs = poll.span.as_secs_f64();
        if self.stable_polls >= STABLE_POLLS && secs > 0.0 && poll.committed > 0 {
            let commit_rate = poll.committed as f64 / secs;
            // This poll's own rate (an average over minutes trails a ramp and would take in-flight records
            // for waiting ones). Until the delay is known, assume the longest: fewer polls count as saturated.
            let longest = (commit_rate * MAX_COMMIT_DELAY.as_secs_f64()).round() as i64;
            let in_flight_now = self.in_flight(commit_rate, poll.lag_now).unwrap_or(longest);
            let margin = (SATURATION_MARGIN * poll.committed as f64).ceil() as i64;
            let waited_before = poll.lag_before - in_flight_now > margin;
            let waits_now = poll.lag_now - in_flight_now > margin;
            self.rates.push_back(RateSample {
                at: poll.at,
                per_replica: commit_rate / f64::from(poll.consumers),
                saturated: waited_before && waits_now,
            });
            let kept_up = (poll.committed - poll.arrived).abs() as f64 <= KEEPING_UP * poll.arrived as f64;
            if poll.arrived > 0 && kept_up {
                self.delays.push_back((poll.at, poll.lag_now.max(0) as f64 / commit_rate));
            }
        }
        while self.rates.front().is_some_and(|s| poll.at.saturating_sub(s.at) > self.window) {
            self.rates.pop_front();
        }
        while self.delays.front().is_some_and(|(t, _)| poll.at.saturating_sub(*t) > self.window) {
            self.delays.pop_front();
        }

        let peak = self.rates.iter().map(|s| s.per_replica).max_by(f64::total_cmp);
        let saturated = self.rates.iter().filter(|s| s.saturated).map(|s| s.per_replica).max_by(f64::total_cmp);
        let capacity = match (peak, saturated) {
            (Some(p), Some(s)) if s >= MEASURED_WITHIN * p => Some(Capacity::Measured(s)),
            (Some(p), _) => Some(Capacity::AtLeast(p)),
            (None, _) => self.last_capacity,
        };
        self.last_capacity = capacity;

        let in_flight = poll.recent_commit_rate.and_then(|rate| self.in_flight(rate, poll.lag_now));
        let rebalancing = poll.consumers > 0 && self.stable_polls < STABLE_POLLS;
        Estimate { capacity, in_flight: in_flight.unwrap_or(0), rebalancing }
    }

    /// Records awaiting their commit at `commit_rate`, once a commit delay was seen (≤ `lag`).
    fn in_flight(&self, commit_rate: f64, lag: i64) -> Option<i64> {
        let delay = self.delays.iter().map(|(_, d)| *d).min_by(f64::total_cmp)?;
        let records = commit_rate * delay.min(MAX_COMMIT_DELAY.as_secs_f64());
        Some((records.round() as i64).clamp(0, lag.max(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// Polls every 5 s with the given per-poll numbers.
    fn poll(i: u64, committed: i64, arrived: i64, consumers: i32, lag_before: i64, lag_now: i64) -> Poll {
        Poll {
            at: s(i * 5),
            span: s(5),
            committed,
            arrived,
            consumers,
            lag_before,
            lag_now,
            recent_commit_rate: Some(committed as f64 / 5.0),
        }
    }

    #[test]
    fn keeping_up_learns_the_commit_delay_and_only_a_lower_bound_of_capacity() {
        let mut m = ThroughputModel::default();
        let mut e = Estimate::default();
        // 2 consumers keep up with 1,000 records/s; the lag is 2 s of it (finished, not yet committed).
        for i in 0..10 {
            e = m.observe(&poll(i, 5000, 5000, 2, 2000, 2000));
        }
        assert_eq!(e.in_flight, 2000, "the whole lag awaits its commit");
        assert_eq!(e.capacity, Some(Capacity::AtLeast(500.0)), "unsaturated: 500/s per replica is a lower bound");
    }

    #[test]
    fn rebalances_and_the_first_stable_polls_are_not_sampled() {
        let mut m = ThroughputModel::default();
        // Consumers change every poll: no sample at all.
        for i in 0..6 {
            let e = m.observe(&poll(i, 5000, 5000, 1 + ((i + 1) % 2) as i32, 50_000, 50_000));
            assert_eq!(e.capacity, None, "poll {i}");
        }
        // Stable from poll 6: the first sample comes STABLE_POLLS polls later.
        assert_eq!(m.observe(&poll(6, 5000, 5000, 2, 50_000, 50_000)).capacity, None);
        assert_eq!(m.observe(&poll(7, 5000, 5000, 2, 50_000, 50_000)).capacity, None);
        assert_eq!(m.observe(&poll(8, 5000, 5000, 2, 50_000, 50_000)).capacity, Some(Capacity::Measured(500.0)));
    }

    #[test]
    fn a_saturated_sample_far_below_the_peak_does_not_count_as_measured() {
        let mut m = ThroughputModel::default();
        // Unsaturated at 800/s per replica (keeping up, small lag) ...
        for i in 0..5 {
            m.observe(&poll(i, 8000, 8000, 2, 3200, 3200));
        }
        // ... then a backlog on one partition that only one of the two replicas owns: 200/s per replica.
        let mut e = Estimate::default();
        for i in 5..10 {
            e = m.observe(&poll(i, 2000, 2000, 2, 60_000, 60_000));
        }
        assert_eq!(e.capacity, Some(Capacity::AtLeast(800.0)));
    }

    #[test]
    fn backlog_is_not_counted_as_in_flight() {
        let mut m = ThroughputModel::default();
        for i in 0..5 {
            m.observe(&poll(i, 5000, 5000, 2, 1000, 1000));
        }
        // Arrival doubles: the group falls behind and the lag grows; only 1 s of commits is in flight.
        let e = m.observe(&poll(5, 5000, 10_000, 2, 1000, 6000));
        assert_eq!(e.in_flight, 1000);
    }

    #[test]
    fn draining_a_backlog_measures_capacity_and_is_not_keeping_up() {
        let mut m = ThroughputModel::default();
        let mut e = Estimate::default();
        // A burst drained by 4 consumers with nothing new arriving: all of the lag is backlog.
        for i in 0..8 {
            let lag = 100_000 - i as i64 * 10_000;
            e = m.observe(&poll(i, 10_000, 0, 4, lag + 10_000, lag));
        }
        assert_eq!(e.in_flight, 0);
        assert_eq!(e.capacity, Some(Capacity::Measured(500.0)));
    }

    #[test]
    fn the_delay_is_capped() {
        let mut m = ThroughputModel::default();
        let mut e = Estimate::default();
        for i in 0..5 {
            e = m.observe(&poll(i, 500, 500, 1, 60_000, 60_000));
        }
        // 100 records/s with 60,000 lag "keeping up": at most MAX_COMMIT_DELAY of it is in flight.
        assert_eq!(e.in_flight, 1000);
    }

    #[test]
    fn capacity_is_kept_when_samples_age_out() {
        let mut m = ThroughputModel::new(s(60));
        for i in 0..6 {
            m.observe(&poll(i, 4500, 0, 3, 100_000, 95_500));
        }
        // Scaled to zero for an hour: no samples in the window, the last estimate stays.
        let e = m.observe(&poll(720, 0, 0, 0, 0, 0));
        assert_eq!(e.capacity, Some(Capacity::Measured(300.0)));
        assert_eq!(e.in_flight, 0);
    }
}
