//! Pure lag accounting: per-partition lag from watermarks and committed offsets, the consume rate
//! from committed-offset deltas, stuck-partition detection (DESIGN.md §3), and the arrival rate
//! per partition from log-end deltas. Each poll also feeds the group's [`ThroughputModel`]
//! (capacity per replica, and the part of the lag that only awaits its commit).
//!
//! The Kafka I/O lives in [`crate::probe`]; this module only sees numbers, so the trace simulation
//! drives the very same tracker the controller uses.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use kpipe_api::commit_metadata::RetryReport;
use kpipe_api::v1alpha1::{LagSummary, StartOffset};

use crate::scaler::Observation;
use crate::throughput::{Capacity, Poll, ThroughputModel};

/// Offsets of one partition, as read from the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub topic: String,
    pub partition: i32,
    /// Low watermark (first retained offset).
    pub log_start: i64,
    /// High watermark (next offset to be written).
    pub log_end: i64,
    /// The group's committed offset, if any.
    pub committed: Option<i64>,
    /// A worker's report, in the commit metadata, that the record at the committed offset is being
    /// retried ([`kpipe_api::commit_metadata`]); it may be stale (see [`RetryReport::is_current`]).
    pub retry: Option<RetryReport>,
    /// `committed` is not a commit but where the workers will start (a never-committed partition under
    /// `startOffset: latest`, see `probe::apply_latest_start`): it counts for the lag, never as a commit to keep.
    pub start_position: bool,
}

/// How long a worker's retry report stays believable, in milliseconds of the operator's clock. Workers
/// re-report on every commit interval (1 s by default); the margin absorbs missed commits and clock skew
/// between nodes.
pub const RETRY_REPORT_FRESH_MS: u64 = 60_000;

/// Who consumes the group, as the controller sees the worker pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Consumers {
    /// Ready worker pods.
    pub ready: i32,
    /// Changes whenever the consumer set may have changed: a pod added, removed or restarted, or its
    /// readiness flipped. Every such change rebalances the group, and commits pause meanwhile, so
    /// stuck evidence gathered before it says nothing about the partitions' new owners.
    pub epoch: u64,
}

/// Lag of one partition: the records from where the workers start to the log end, by the rule the workers use
/// themselves ([`kpipe_api::offsets::start_point`], one function for both):
///
/// - Committed offset inside the retained log: `log_end − committed`.
/// - Committed offset out of range (deleted by retention, or beyond the log end after the topic was recreated or
///   truncated): the workers reset to the earliest retained record, so `log_end − log_start`, whatever
///   `startOffset` says ([`crate::lifecycle`] raises the Event).
/// - No committed offset: `earliest` → `log_end − log_start`; `latest` → 0. (The controller probes with
///   [`crate::probe::LagProbe::offsets_since`], which reports a never-committed partition under `latest` as committed
///   where the workers will start, its first record since the pipeline's creation, so only partitions without that
///   lookup reach this case.)
pub fn partition_lag(p: &PartitionOffsets, start: StartOffset) -> i64 {
    kpipe_api::offsets::start_point(&crate::lifecycle::position(p), start, None).lag(p.log_end)
}

#[derive(Clone, Debug)]
struct PartitionState {
    committed: Option<i64>,
    log_end: i64,
    /// Polls in a row with lag, a stable consumer set, no retry report and the same committed offset.
    unchanged_polls: u32,
    stuck: bool,
    /// (poll time, log end) within the rate window, oldest first: the arrival rate.
    log_ends: VecDeque<(Duration, i64)>,
}

impl PartitionState {
    fn new(p: &PartitionOffsets, now: Duration) -> Self {
        Self {
            committed: p.committed,
            log_end: p.log_end,
            unchanged_polls: 0,
            stuck: false,
            log_ends: VecDeque::from([(now, p.log_end)]),
        }
    }

    /// Records per second written to the partition over the window.
    fn arrival_rate(&self) -> f64 {
        match (self.log_ends.front(), self.log_ends.back()) {
            (Some(&(t0, e0)), Some(&(t1, e1))) if t1 > t0 && e1 > e0 => (e1 - e0) as f64 / (t1 - t0).as_secs_f64(),
            _ => 0.0,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct RateSample {
    at: Duration,
    span: Duration,
    committed_delta: i64,
    consumers: i32,
    busy: bool,
}

/// Result of one poll.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub total_lag: i64,
    pub stuck_lag: i64,
    pub partitions: i32,
    pub partitions_with_lag: i32,
    pub stuck_partitions: i32,
    /// Partitions whose head record a live worker reports it is retrying (not stuck).
    pub retrying_partitions: i32,
    /// Lag on retrying partitions (included in `total_lag`).
    pub retrying_lag: i64,
    /// The longest-running current retry: (first failure, Unix ms of the worker's clock; attempts).
    pub oldest_retry: Option<(u64, u32)>,
    /// Some retrying record exhausted its attempts and is retried until it succeeds (`onFailure:
    /// block`, or a dead-letter write that keeps failing).
    pub blocked: bool,
    /// Retrying partitions whose worker reports its processor circuit breaker open (the processor is
    /// unavailable; counted in `retrying_partitions`, so their lag never adds pods).
    pub circuit_open_partitions: i32,
    /// Some worker reports that the dead-letter write of its head record keeps failing.
    pub dead_letter_failing: bool,
    /// Partitions with lag or with records arriving: the most pods that can have work.
    pub active_partitions: i32,
    /// How long the group has had lag without committing anything (zero while it progresses or has
    /// no lag).
    pub no_progress_for: Duration,
    /// Some partition's log end grew since the previous poll.
    pub log_end_advanced: bool,
    /// Records committed per second by the whole group over the recent polls.
    pub records_per_second: Option<f64>,
    /// Records committed per second by one consumer while there was a backlog.
    pub rate_per_replica: Option<f64>,
    /// Records per second arriving on each partition, highest first.
    pub arrival_rates: Vec<f64>,
    /// What one replica can do, as far as the throughput model knows.
    pub capacity: Option<Capacity>,
    /// Lag that only awaits its commit.
    pub awaiting_commit: i64,
    /// The set of ready consumers changed within the last polls.
    pub rebalancing: bool,
}

impl Snapshot {
    /// The scaler's view.
    pub fn observation(&self) -> Observation {
        Observation {
            total_lag: self.total_lag,
            stuck_lag: self.stuck_lag,
            retrying_lag: self.retrying_lag,
            held_partitions: self.stuck_partitions + self.retrying_partitions,
            active_partitions: self.active_partitions,
            partitions: self.partitions,
            log_end_advanced: self.log_end_advanced,
            rate_per_replica: self.rate_per_replica,
            arrival_rates: self.arrival_rates.clone(),
            capacity: self.capacity,
            awaiting_commit: self.awaiting_commit,
            rebalancing: self.rebalancing,
        }
    }

    /// Records per second arriving on all partitions together.
    pub fn arrival_rate(&self) -> f64 {
        self.arrival_rates.iter().sum()
    }

    /// The status summary.
    pub fn summary(&self) -> LagSummary {
        let rate = self.records_per_second.filter(|r| *r > 0.0);
        LagSummary {
            total: self.total_lag,
            partitions: self.partitions,
            partitions_with_lag: self.partitions_with_lag,
            stuck_partitions: self.stuck_partitions,
            retrying_partitions: Some(self.retrying_partitions),
            records_per_second: rate.map(|r| r.round() as i64),
            estimated_drain_seconds: rate.map(|r| (self.total_lag as f64 / r).ceil() as i64),
            arrival_records_per_second: Some(self.arrival_rate().round() as i64),
            awaiting_commit: Some(self.awaiting_commit),
            capacity_per_replica: self.capacity.map(|c| c.rate().round() as i64),
            capacity_measured: self.capacity.map(|c| matches!(c, Capacity::Measured(_))),
        }
    }
}

/// Per-pipeline memory of previous polls.
#[derive(Clone, Debug)]
pub struct LagTracker {
    partitions: HashMap<(String, i32), PartitionState>,
    samples: VecDeque<RateSample>,
    last_poll: Option<Duration>,
    last_busy: bool,
    /// The consumer set of the previous poll.
    last_epoch: Option<u64>,
    /// Last poll that saw the group commit something, or no lag at all.
    last_progress: Option<Duration>,
    model: ThroughputModel,
    /// Polls with lag and an unchanged committed offset (while consumers run) before a partition
    /// counts as stuck.
    pub stuck_after_polls: u32,
    /// How far back the rate looks.
    pub rate_window: Duration,
}

impl Default for LagTracker {
    fn default() -> Self {
        Self::new(6, Duration::from_secs(60))
    }
}

impl LagTracker {
    pub fn new(stuck_after_polls: u32, rate_window: Duration) -> Self {
        Self {
            partitions: HashMap::new(),
            samples: VecDeque::new(),
            last_poll: None,
            last_busy: false,
            last_epoch: None,
            last_progress: None,
            model: ThroughputModel::default(),
            stuck_after_polls: stuck_after_polls.max(1),
            rate_window,
        }
    }

    /// Forget what earlier polls saw of `topic`'s partitions: the topic was deleted and recreated, its
    /// offsets start over and must not count as arrivals, commits or stuck evidence.
    pub fn forget_topic(&mut self, topic: &str) {
        self.partitions.retain(|(t, _), _| t != topic);
    }

    /// Fold in one poll. `now` is a monotonic offset (any fixed origin); `wall_ms` the wall clock in
    /// Unix milliseconds, to judge the workers' retry reports.
    ///
    /// Stuck evidence (DESIGN.md §3, "stuck is a symptom"): a partition counts as stuck after
    /// `stuck_after_polls` polls in a row with lag and the same committed offset, while ready consumers
    /// run, the consumer set stays the same and no worker reports a retry of its head record. Any change
    /// of the consumer set resets the evidence of every partition; with no ready consumer nothing
    /// accrues and nothing is stuck.
    pub fn update(
        &mut self,
        offsets: &[PartitionOffsets],
        start: StartOffset,
        consumers: Consumers,
        now: Duration,
        wall_ms: u64,
    ) -> Snapshot {
        let mut snap = Snapshot { partitions: offsets.len() as i32, ..Default::default() };
        let mut committed_delta = 0i64;
        let mut arrived = 0i64;
        let mut seen = HashMap::with_capacity(offsets.len());
        let set_changed = self.last_epoch.is_some_and(|e| e != consumers.epoch);
        self.last_epoch = Some(consumers.epoch);
        let ready = consumers.ready;
        for p in offsets {
            let lag = partition_lag(p, start);
            let key = (p.topic.clone(), p.partition);
            let retry =
                p.retry.filter(|r| ready > 0 && lag > 0 && r.is_current(p.committed, wall_ms, RETRY_REPORT_FRESH_MS));
            let state = match self.partitions.remove(&key) {
                Some(mut prev) => {
                    if p.log_end > prev.log_end {
                        snap.log_end_advanced = true;
                        arrived += p.log_end - prev.log_end;
                    }
                    if let (Some(now_c), Some(prev_c)) = (p.committed, prev.committed)
                        && now_c > prev_c
                    {
                        committed_delta += now_c - prev_c;
                    }
                    let no_evidence =
                        prev.committed != p.committed || lag == 0 || ready == 0 || set_changed || retry.is_some();
                    if no_evidence {
                        prev.unchanged_polls = 0;
                        prev.stuck = false;
                    } else {
                        prev.unchanged_polls += 1;
                        if prev.unchanged_polls >= self.stuck_after_polls {
                            prev.stuck = true;
                        }
                    }
                    prev.committed = p.committed;
                    prev.log_end = p.log_end;
                    prev.log_ends.push_back((now, p.log_end));
                    while prev.log_ends.front().is_some_and(|(t, _)| now.saturating_sub(*t) > self.rate_window) {
                        prev.log_ends.pop_front();
                    }
                    prev
                }
                None => PartitionState::new(p, now),
            };
            let arrival = state.arrival_rate();
            snap.arrival_rates.push(arrival);
            snap.total_lag += lag;
            if lag > 0 {
                snap.partitions_with_lag += 1;
            }
            if lag > 0 || arrival > 0.0 {
                snap.active_partitions += 1;
            }
            if state.stuck {
                snap.stuck_partitions += 1;
                snap.stuck_lag += lag;
            } else if let Some(r) = retry {
                snap.retrying_partitions += 1;
                snap.retrying_lag += lag;
                snap.blocked |= r.blocked;
                snap.dead_letter_failing |= r.dead_letter_failing;
                if r.circuit_open {
                    snap.circuit_open_partitions += 1;
                }
                if snap.oldest_retry.is_none_or(|(since, _)| r.since_ms < since) {
                    snap.oldest_retry = Some((r.since_ms, r.attempts));
                }
            }
            seen.insert(key, state);
        }
        self.partitions = seen;
        snap.arrival_rates.sort_by(|a, b| b.total_cmp(a));
        let scalable = snap.total_lag - snap.stuck_lag - snap.retrying_lag;
        if committed_delta > 0 || snap.total_lag == 0 || self.last_progress.is_none() {
            self.last_progress = Some(now);
        }
        snap.no_progress_for = now.saturating_sub(self.last_progress.unwrap_or(now));

        let since_last = self.last_poll.filter(|prev| now > *prev).map(|prev| now - prev);
        if let Some(span) = since_last {
            self.samples.push_back(RateSample {
                at: now,
                span,
                committed_delta,
                consumers: ready,
                busy: self.last_busy && ready > 0,
            });
        }
        while let Some(s) = self.samples.front() {
            if now.saturating_sub(s.at) > self.rate_window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
        self.last_poll = Some(now);
        self.last_busy = scalable > 0;

        let span: f64 = self.samples.iter().map(|s| s.span.as_secs_f64()).sum();
        if span > 0.0 {
            let delta: i64 = self.samples.iter().map(|s| s.committed_delta).sum();
            snap.records_per_second = Some(delta as f64 / span);
        }
        let (busy_delta, busy_pod_secs) =
            self.samples.iter().filter(|s| s.busy).fold((0i64, 0f64), |(d, ps), s| {
                (d + s.committed_delta, ps + s.span.as_secs_f64() * s.consumers as f64)
            });
        if busy_pod_secs > 0.0 && busy_delta > 0 {
            snap.rate_per_replica = Some(busy_delta as f64 / busy_pod_secs);
        }
        let estimate = self.model.observe(&Poll {
            at: now,
            span: since_last.unwrap_or_default(),
            committed: committed_delta,
            arrived,
            consumers: ready,
            lag: scalable,
            recent_commit_rate: snap.records_per_second,
        });
        snap.capacity = estimate.capacity;
        snap.awaiting_commit = estimate.awaiting_commit;
        snap.rebalancing = estimate.rebalancing;
        snap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn po(partition: i32, log_start: i64, log_end: i64, committed: Option<i64>) -> PartitionOffsets {
        PartitionOffsets { topic: "t".into(), partition, log_start, log_end, committed, ..Default::default() }
    }

    /// One poll of an `earliest` pipeline with `ready` consumers of a stable set, wall clock 0.
    fn upd(t: &mut LagTracker, offsets: &[PartitionOffsets], ready: i32, at: Duration) -> Snapshot {
        t.update(offsets, StartOffset::Earliest, Consumers { ready, epoch: 0 }, at, 0)
    }

    #[test]
    fn partition_lag_table() {
        use StartOffset::*;
        let cases = [
            ("committed", po(0, 0, 100, Some(40)), Earliest, 60),
            ("committed at end", po(0, 0, 100, Some(100)), Earliest, 0),
            ("no commit earliest counts retained only", po(0, 70, 100, None), Earliest, 30),
            ("no commit latest", po(0, 70, 100, None), Latest, 0),
            ("retention trimmed commit counts from log start", po(0, 80, 100, Some(10)), Latest, 20),
            ("commit beyond end (recreated, truncated) resets to the log start", po(0, 0, 100, Some(150)), Latest, 100),
            ("empty partition", po(0, 0, 0, None), Earliest, 0),
        ];
        for (name, p, start, want) in cases {
            assert_eq!(partition_lag(&p, start), want, "{name}");
        }
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn totals_and_growth() {
        let mut t = LagTracker::default();
        let a = upd(&mut t, &[po(0, 0, 100, Some(50)), po(1, 0, 10, Some(10))], 1, s(0));
        assert_eq!((a.total_lag, a.partitions, a.partitions_with_lag, a.log_end_advanced), (50, 2, 1, false));
        let b = upd(&mut t, &[po(0, 0, 100, Some(50)), po(1, 0, 11, Some(10))], 1, s(5));
        assert!(b.log_end_advanced);
        assert_eq!(b.total_lag, 51);
    }

    #[test]
    fn rate_from_committed_deltas() {
        let mut t = LagTracker::default();
        upd(&mut t, &[po(0, 0, 1000, Some(0)), po(1, 0, 1000, Some(0))], 2, s(0));
        let snap = upd(&mut t, &[po(0, 0, 1000, Some(100)), po(1, 0, 1000, Some(100))], 2, s(5));
        assert_eq!(snap.records_per_second, Some(40.0));
        assert_eq!(snap.rate_per_replica, Some(20.0));
        let sum = snap.summary();
        assert_eq!((sum.total, sum.records_per_second, sum.estimated_drain_seconds), (1800, Some(40), Some(45)));
    }

    #[test]
    fn rate_per_replica_ignores_idle_samples() {
        let mut t = LagTracker::default();
        upd(&mut t, &[po(0, 0, 10, Some(10))], 1, s(0));
        // No backlog before this poll: the 5 records committed say nothing about capacity.
        let snap = upd(&mut t, &[po(0, 0, 15, Some(15))], 1, s(5));
        assert_eq!(snap.records_per_second, Some(1.0));
        assert_eq!(snap.rate_per_replica, None);
    }

    #[test]
    fn stuck_after_n_polls_with_consumers_and_unstuck_on_progress() {
        let mut t = LagTracker::new(3, s(60));
        let p = |c| [po(0, 0, 100, Some(c)), po(1, 0, 100, Some(100))];
        for (i, want) in [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1)] {
            let snap = upd(&mut t, &p(40), 1, s(i * 5));
            assert_eq!(snap.stuck_partitions, want, "poll {i}");
        }
        let snap = upd(&mut t, &p(40), 1, s(25));
        assert_eq!(snap.stuck_lag, 60);
        let snap = upd(&mut t, &p(41), 1, s(30));
        assert_eq!((snap.stuck_partitions, snap.stuck_lag), (0, 0));
    }

    #[test]
    fn stuck_never_accrues_or_persists_without_consumers() {
        let mut t = LagTracker::new(2, s(60));
        for i in 0..5 {
            let snap = upd(&mut t, &[po(0, 0, 100, Some(40))], 0, s(i * 5));
            assert_eq!(snap.stuck_partitions, 0, "nobody consumes at zero replicas");
        }
        for i in 5..8 {
            upd(&mut t, &[po(0, 0, 100, Some(40))], 2, s(i * 5));
        }
        let snap = upd(&mut t, &[po(0, 0, 100, Some(40))], 2, s(40));
        assert_eq!(snap.stuck_partitions, 1);
        // Nothing commits at zero replicas, so nothing could ever clear a flag kept there: it goes.
        let snap = upd(&mut t, &[po(0, 0, 100, Some(40))], 0, s(45));
        assert_eq!((snap.stuck_partitions, snap.stuck_lag), (0, 0));
    }

    #[test]
    fn a_changing_consumer_set_resets_stuck_evidence() {
        // A crash loop: pods restart every poll or two, commits pause while the group rebalances.
        let mut t = LagTracker::new(3, s(60));
        let offsets = [po(0, 0, 1000, Some(10)), po(1, 0, 1000, Some(20))];
        let mut epoch = 0;
        for i in 0..30u64 {
            if i % 2 == 0 {
                epoch += 1; // a restart or a rebalance
            }
            let snap = t.update(&offsets, StartOffset::Earliest, Consumers { ready: 2, epoch }, s(i * 5), 0);
            assert_eq!(snap.stuck_partitions, 0, "poll {i}: restarts are not a poison record");
        }
        // Once the set is stable, the same evidence does count.
        let mut last = Snapshot::default();
        for i in 30..34u64 {
            last = t.update(&offsets, StartOffset::Earliest, Consumers { ready: 2, epoch }, s(i * 5), 0);
        }
        assert_eq!(last.stuck_partitions, 2);
    }

    #[test]
    fn circuit_open_lag_is_held_and_buys_no_pods() {
        let mut t = LagTracker::new(2, s(60));
        // The processor is down: every partition reports circuitOpen, the head records never failed.
        let report =
            |offset| RetryReport { offset, since_ms: 1_000, at_ms: 10_000, circuit_open: true, ..Default::default() };
        let parts = [
            PartitionOffsets { retry: Some(report(40)), ..po(0, 0, 1_000, Some(40)) },
            PartitionOffsets { retry: Some(report(10)), ..po(1, 0, 5_000, Some(10)) },
        ];
        let snap = t.update(&parts, StartOffset::Earliest, Consumers { ready: 1, epoch: 1 }, s(0), 10_000);
        assert_eq!((snap.circuit_open_partitions, snap.retrying_partitions), (2, 2));
        assert_eq!(snap.total_lag, 960 + 4_990);
        assert_eq!(snap.observation().scalable_lag(), 0, "more pods cannot help a dead downstream");
        assert_eq!(snap.observation().held_partitions, 2, "and the pods holding it are kept");
        assert!(!snap.dead_letter_failing);
    }

    #[test]
    fn a_live_retry_report_is_retrying_not_stuck() {
        let mut t = LagTracker::new(2, s(60));
        let report = |at_ms| RetryReport { offset: 40, attempts: 5, since_ms: 1_000, at_ms, ..Default::default() };
        let with = |at_ms| [PartitionOffsets { retry: Some(report(at_ms)), ..po(0, 0, 100, Some(40)) }];
        let c = Consumers { ready: 1, epoch: 7 };
        for i in 0..6u64 {
            let wall = 10_000 + i * 5_000;
            let snap = t.update(&with(wall), StartOffset::Earliest, c, s(i * 5), wall);
            assert_eq!((snap.stuck_partitions, snap.retrying_partitions, snap.retrying_lag), (0, 1, 60), "poll {i}");
            assert_eq!(snap.oldest_retry, Some((1_000, 5)));
            assert_eq!(snap.observation().scalable_lag(), 0, "more pods cannot speed up a retry");
            assert_eq!(snap.observation().held_partitions, 1);
        }
        // The worker stopped re-reporting (it died): the stale report is evidence of nothing.
        let mut snap = Snapshot::default();
        for i in 6..9u64 {
            let wall = 10_000 + i * 5_000 + RETRY_REPORT_FRESH_MS;
            snap = t.update(&with(10_000), StartOffset::Earliest, c, s(i * 5), wall);
        }
        assert_eq!((snap.stuck_partitions, snap.retrying_partitions), (1, 0));
    }

    #[test]
    fn progress_and_active_partitions() {
        let mut t = LagTracker::default();
        let a = upd(&mut t, &[po(0, 0, 100, Some(0)), po(1, 0, 0, None), po(2, 0, 50, Some(50))], 1, s(0));
        assert_eq!((a.active_partitions, a.no_progress_for), (1, s(0)));
        let b = upd(&mut t, &[po(0, 0, 100, Some(0)), po(1, 0, 0, None), po(2, 0, 60, Some(50))], 1, s(5));
        assert_eq!(b.active_partitions, 2, "lag on 0, arrival and lag on 2");
        assert_eq!(b.no_progress_for, s(5));
        let c = upd(&mut t, &[po(0, 0, 100, Some(30)), po(1, 0, 0, None), po(2, 0, 60, Some(50))], 1, s(10));
        assert_eq!(c.no_progress_for, s(0));
    }

    #[test]
    fn arrival_per_partition_and_capacity_from_a_backlog() {
        let mut t = LagTracker::default();
        let mut snap = Snapshot::default();
        // Partition 0 receives 100 records/s, partition 1 20/s; 2 consumers work through a large backlog
        // committing 150 records/s each (750 per partition per 5 s poll).
        for i in 0..6 {
            let committed = Some(750 * i);
            let offsets = [po(0, 0, 100_000 + 500 * i, committed), po(1, 0, 50_000 + 100 * i, committed)];
            snap = upd(&mut t, &offsets, 2, s(i as u64 * 5));
        }
        assert_eq!(snap.arrival_rates, vec![100.0, 20.0], "highest first");
        assert_eq!(snap.capacity, Some(Capacity::Measured(150.0)));
        assert_eq!(snap.awaiting_commit, 0, "a group draining a backlog is not keeping up: no commit delay yet");
        let obs = snap.observation();
        assert_eq!((obs.capacity, obs.arrival_rates.len()), (snap.capacity, 2));
        let sum = snap.summary();
        assert_eq!(
            (sum.arrival_records_per_second, sum.awaiting_commit, sum.capacity_per_replica, sum.capacity_measured),
            (Some(120), Some(0), Some(150), Some(true))
        );
    }

    #[test]
    fn vanished_partitions_are_forgotten() {
        let mut t = LagTracker::default();
        upd(&mut t, &[po(0, 0, 10, Some(0)), po(1, 0, 10, Some(0))], 1, s(0));
        let snap = upd(&mut t, &[po(0, 0, 10, Some(0))], 1, s(5));
        assert_eq!((snap.partitions, snap.total_lag), (1, 10));
    }
}
