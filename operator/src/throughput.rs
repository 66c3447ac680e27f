//! A small throughput model of a consumer group, learned from the same polls as the lag
//! ([`crate::lag::LagTracker`] feeds it), so the scaler can size for the load instead of the raw lag.
//!
//! - **Capacity per replica.** The commit rate of one replica, sampled on polls after the set of
//!   consumers was stable for [`STABLE_POLLS`] polls (a rebalance pauses them, and a scale-down
//!   would credit the remaining pods with what departed peers committed). A sample is *saturated*
//!   when work waited beyond the records awaiting their commit at both ends of the poll: the
//!   consumers never ran dry, so their rate was all they could do. The highest sample is a lower
//!   bound of the capacity; it is the capacity itself when a saturated sample comes close to it.
//! - **Commit delay.** On polls where the group kept up (committed what arrived, within
//!   [`KEEPING_UP`]; not while it drains a backlog, whose lag is backlog), lag ÷ commit rate. A
//!   group that keeps up still shows a lag of about `rate × delay`: records finished but not yet
//!   committed (batching, the periodic commit). More pods cannot shrink that part; a plain
//!   `lag / lagThreshold` rule (KEDA's) pays pods for it. Any backlog only adds to lag ÷ rate, so
//!   the smallest value seen is the delay itself.
//!
//! Samples are kept per minute (the highest rates, the smallest delay), so an hour of memory costs
//! about 2 KiB per pipeline whatever the poll interval.

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

/// Samples within one bucket are folded together.
const BUCKET: Duration = Duration::from_secs(60);

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

/// What one poll tells the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Poll {
    pub at: Duration,
    /// Time since the previous poll (zero for the first one).
    pub span: Duration,
    /// Records committed over all partitions since the previous poll.
    pub committed: i64,
    /// Records written to the partitions since the previous poll.
    pub arrived: i64,
    /// Ready consumers now.
    pub consumers: i32,
    /// Scalable lag now.
    pub lag: i64,
    /// The group's commit rate over the recent polls (for the awaiting-commit estimate).
    pub recent_commit_rate: Option<f64>,
}

/// The model's answer after a poll.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Estimate {
    pub capacity: Option<Capacity>,
    /// Lag that only awaits its commit (≤ the lag now).
    pub awaiting_commit: i64,
    /// The set of consumers changed within the last [`STABLE_POLLS`] polls.
    pub rebalancing: bool,
}

/// What the polls of one [`BUCKET`] showed.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    start: Duration,
    /// Highest per-replica rate, and the highest of the saturated polls.
    peak: Option<f64>,
    saturated_peak: Option<f64>,
    /// Smallest lag ÷ commit rate of the polls that kept up.
    delay: Option<f64>,
}

fn max_of(a: Option<f64>, b: f64) -> Option<f64> {
    Some(a.map_or(b, |a| a.max(b)))
}

/// Per-pipeline memory of the model.
#[derive(Clone, Debug)]
pub struct ThroughputModel {
    /// How far back samples count.
    pub window: Duration,
    buckets: VecDeque<Bucket>,
    last_consumers: i32,
    last_lag: i64,
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
        Self { window, buckets: VecDeque::new(), last_consumers: 0, last_lag: 0, stable_polls: 0, last_capacity: None }
    }

    /// Fold in one poll.
    pub fn observe(&mut self, poll: &Poll) -> Estimate {
        if poll.consumers > 0 && poll.consumers == self.last_consumers {
            self.stable_polls = self.stable_polls.saturating_add(1);
        } else {
            self.stable_polls = 0;
        }
        self.last_consumers = poll.consumers;
        let lag_before = std::mem::replace(&mut self.last_lag, poll.lag);
        let secs = poll.span.as_secs_f64();
        if self.stable_polls >= STABLE_POLLS && secs > 0.0 && poll.committed > 0 {
            let commit_rate = poll.committed as f64 / secs;
            // This poll's own rate (an average over minutes trails a ramp and would take records awaiting
            // their commit for waiting ones). Until the delay is known, assume the longest: fewer polls count
            // as saturated.
            let longest = (commit_rate * MAX_COMMIT_DELAY.as_secs_f64()).round() as i64;
            let awaiting_commit = self.awaiting_commit(commit_rate, poll.lag).unwrap_or(longest);
            let margin = (SATURATION_MARGIN * poll.committed as f64).ceil() as i64;
            let saturated = lag_before - awaiting_commit > margin && poll.lag - awaiting_commit > margin;
            let per_replica = commit_rate / f64::from(poll.consumers);
            let kept_up =
                poll.arrived > 0 && (poll.committed - poll.arrived).abs() as f64 <= KEEPING_UP * poll.arrived as f64;
            if self.buckets.back().is_none_or(|b| poll.at.saturating_sub(b.start) >= BUCKET) {
                self.buckets.push_back(Bucket { start: poll.at, peak: None, saturated_peak: None, delay: None });
            }
            if let Some(bucket) = self.buckets.back_mut() {
                bucket.peak = max_of(bucket.peak, per_replica);
                if saturated {
                    bucket.saturated_peak = max_of(bucket.saturated_peak, per_replica);
                }
                if kept_up {
                    let delay = poll.lag.max(0) as f64 / commit_rate;
                    bucket.delay = Some(bucket.delay.map_or(delay, |d| d.min(delay)));
                }
            }
        }
        while self.buckets.front().is_some_and(|b| poll.at.saturating_sub(b.start) > self.window) {
            self.buckets.pop_front();
        }

        let peak = self.buckets.iter().filter_map(|b| b.peak).max_by(f64::total_cmp);
        let saturated = self.buckets.iter().filter_map(|b| b.saturated_peak).max_by(f64::total_cmp);
        let capacity = match (peak, saturated) {
            (Some(p), Some(s)) if s >= MEASURED_WITHIN * p => Some(Capacity::Measured(s)),
            (Some(p), _) => Some(Capacity::AtLeast(p)),
            (None, _) => self.last_capacity,
        };
        self.last_capacity = capacity;

        let awaiting_commit = poll.recent_commit_rate.and_then(|rate| self.awaiting_commit(rate, poll.lag));
        let rebalancing = poll.consumers > 0 && self.stable_polls < STABLE_POLLS;
        Estimate { capacity, awaiting_commit: awaiting_commit.unwrap_or(0), rebalancing }
    }

    /// Records awaiting their commit at `commit_rate`, once a commit delay was seen (≤ `lag`).
    fn awaiting_commit(&self, commit_rate: f64, lag: i64) -> Option<i64> {
        let delay = self.buckets.iter().filter_map(|b| b.delay).min_by(f64::total_cmp)?;
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
    /// `lag` is the scalable lag at this poll (the model remembers the previous one).
    fn poll(i: u64, committed: i64, arrived: i64, consumers: i32, lag: i64) -> Poll {
        Poll {
            at: s(i * 5),
            span: s(5),
            committed,
            arrived,
            consumers,
            lag,
            recent_commit_rate: Some(committed as f64 / 5.0),
        }
    }

    #[test]
    fn keeping_up_learns_the_commit_delay_and_only_a_lower_bound_of_capacity() {
        let mut m = ThroughputModel::default();
        let mut e = Estimate::default();
        // 2 consumers keep up with 1,000 records/s; the lag is 2 s of it (finished, not yet committed).
        for i in 0..10 {
            e = m.observe(&poll(i, 5000, 5000, 2, 2000));
        }
        assert_eq!(e.awaiting_commit, 2000, "the whole lag awaits its commit");
        assert_eq!(e.capacity, Some(Capacity::AtLeast(500.0)), "unsaturated: 500/s per replica is a lower bound");
    }

    #[test]
    fn rebalances_and_the_first_stable_polls_are_not_sampled() {
        let mut m = ThroughputModel::default();
        // Consumers change every poll: no sample at all.
        for i in 0..6 {
            let e = m.observe(&poll(i, 5000, 5000, 1 + ((i + 1) % 2) as i32, 50_000));
            assert_eq!(e.capacity, None, "poll {i}");
        }
        // Stable from poll 6: the first sample comes STABLE_POLLS polls later.
        assert_eq!(m.observe(&poll(6, 5000, 5000, 2, 50_000)).capacity, None);
        assert_eq!(m.observe(&poll(7, 5000, 5000, 2, 50_000)).capacity, None);
        assert_eq!(m.observe(&poll(8, 5000, 5000, 2, 50_000)).capacity, Some(Capacity::Measured(500.0)));
    }

    #[test]
    fn a_saturated_sample_far_below_the_peak_does_not_count_as_measured() {
        let mut m = ThroughputModel::default();
        // Unsaturated at 800/s per replica (keeping up, small lag) ...
        for i in 0..5 {
            m.observe(&poll(i, 8000, 8000, 2, 3200));
        }
        // ... then a backlog on one partition that only one of the two replicas owns: 200/s per replica.
        let mut e = Estimate::default();
        for i in 5..10 {
            e = m.observe(&poll(i, 2000, 2000, 2, 60_000));
        }
        assert_eq!(e.capacity, Some(Capacity::AtLeast(800.0)));
    }

    #[test]
    fn backlog_is_not_counted_as_awaiting_commit() {
        let mut m = ThroughputModel::default();
        for i in 0..5 {
            m.observe(&poll(i, 5000, 5000, 2, 1000));
        }
        // Arrival doubles: the group falls behind and the lag grows; only 1 s of commits is in flight.
        let e = m.observe(&poll(5, 5000, 10_000, 2, 6000));
        assert_eq!(e.awaiting_commit, 1000);
    }

    #[test]
    fn draining_a_backlog_measures_capacity_and_is_not_keeping_up() {
        let mut m = ThroughputModel::default();
        let mut e = Estimate::default();
        // A burst drained by 4 consumers with nothing new arriving: all of the lag is backlog.
        for i in 0..8 {
            let lag = 100_000 - i as i64 * 10_000;
            e = m.observe(&poll(i, 10_000, 0, 4, lag));
        }
        assert_eq!(e.awaiting_commit, 0);
        assert_eq!(e.capacity, Some(Capacity::Measured(500.0)));
    }

    #[test]
    fn the_delay_is_capped() {
        let mut m = ThroughputModel::default();
        let mut e = Estimate::default();
        for i in 0..5 {
            e = m.observe(&poll(i, 500, 500, 1, 60_000));
        }
        // 100 records/s with 60,000 lag "keeping up": at most MAX_COMMIT_DELAY of it is in flight.
        assert_eq!(e.awaiting_commit, 1000);
    }

    #[test]
    fn memory_is_one_bucket_a_minute_of_the_window() {
        let mut m = ThroughputModel::default();
        // Two hours of 5 s polls, the last one at a higher rate: what the buckets fold must survive.
        for i in 0..1440 {
            m.observe(&poll(i, 5000, 5000, 2, 2000));
        }
        assert!(m.buckets.len() <= 61, "{} buckets for a 1 h window", m.buckets.len());
        let e = m.observe(&poll(1440, 6000, 6000, 2, 2000));
        assert_eq!(e.capacity, Some(Capacity::AtLeast(600.0)));
    }

    #[test]
    fn capacity_is_kept_when_samples_age_out() {
        let mut m = ThroughputModel::new(s(60));
        for i in 0..6 {
            m.observe(&poll(i, 4500, 0, 3, 95_500));
        }
        // Scaled to zero for an hour: no samples in the window, the last estimate stays.
        let e = m.observe(&poll(720, 0, 0, 0, 0));
        assert_eq!(e.capacity, Some(Capacity::Measured(300.0)));
        assert_eq!(e.awaiting_commit, 0);
    }
}
