//! Is the backlog draining, and if not, why (DESIGN.md §3: "a backlog that is not draining is a
//! `Stalled` condition with a Warning Event, never `Ready=True`"). Pure: the controller passes the
//! lag snapshot, the worker pods and the replica count.

use std::fmt;
use std::time::Duration;

use crate::lag::Snapshot;
use crate::workers::WorkerPods;

/// Why a backlog does not drain, most specific first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StallReason {
    /// Worker containers keep restarting (OOM kills, crashes, failing probes).
    CrashLoopingWorkers,
    /// Workers are wanted but none is ready (pending, unschedulable, image pulls).
    NoCapacity,
    /// No worker runs at all (suspended with a backlog is reported as such; an external
    /// autoscaler that holds zero replicas lands here).
    NoWorkers,
    /// Partitions with lag whose commits stopped while their consumers are stable and report no
    /// retry: likely a hung processor call or a worker bug.
    PartitionStuck,
    /// Workers report their processor circuit breaker open: the processor is unavailable, partitions
    /// wait for it without spending attempts (more pods cannot help).
    ProcessorUnavailable,
    /// A record exhausted its attempts and its dead-letter write keeps failing (the DLQ topic is
    /// missing, not writable, or the brokers refuse it): the partition cannot move on.
    DeadLetterFailing,
    /// A live worker retries the head record of some partitions (the processor fails).
    Retrying,
    /// Nothing was committed for the stall window although workers run.
    NotDraining,
}

impl StallReason {
    /// Every reason, for metric series bookkeeping.
    pub const ALL: [Self; 8] = [
        Self::CrashLoopingWorkers,
        Self::NoCapacity,
        Self::NoWorkers,
        Self::PartitionStuck,
        Self::ProcessorUnavailable,
        Self::DeadLetterFailing,
        Self::Retrying,
        Self::NotDraining,
    ];

    /// CamelCase reason for conditions and Events.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::CrashLoopingWorkers => "CrashLoopingWorkers",
            Self::NoCapacity => "NoCapacity",
            Self::NoWorkers => "NoWorkers",
            Self::PartitionStuck => "PartitionStuck",
            Self::ProcessorUnavailable => "ProcessorUnavailable",
            Self::DeadLetterFailing => "DeadLetterFailing",
            Self::Retrying => "Retrying",
            Self::NotDraining => "NotDraining",
        }
    }
}

impl StallReason {
    /// Reasons that are a fault outside the workers the user must act on (the processor is down, the
    /// dead-letter topic refuses writes): the pipeline is `Degraded` with this reason, not only
    /// `Stalled`. Raised as soon as a worker reports it, without the stall window.
    pub fn degrades(&self) -> bool {
        matches!(self, Self::ProcessorUnavailable | Self::DeadLetterFailing)
    }
}

impl fmt::Display for StallReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stalled backlog: the reason and a message a user can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    pub reason: StallReason,
    pub message: String,
}

/// What [`assess`] looks at.
#[derive(Clone, Debug)]
pub struct StallInputs<'a> {
    pub snapshot: &'a Snapshot,
    pub workers: &'a WorkerPods,
    /// Replicas set on the Deployment.
    pub replicas: i32,
    /// `spec.suspend`.
    pub suspended: bool,
    /// `spec.scaling.activationLag`: lag up to this is no backlog.
    pub activation_lag: i64,
    /// How long a backlog may go without a commit before it is stalled (the stuck-detection window:
    /// `stuckAfterPolls × pollInterval`).
    pub window: Duration,
    /// How long new workers may take to become ready before that is `NoCapacity`.
    pub startup_grace: Duration,
    /// Wall clock, Unix milliseconds (the workers' retry reports use it).
    pub wall_ms: u64,
}

/// `None` when there is no backlog or it drains; otherwise why not. A suspended pipeline is not
/// stalled (it is paused on purpose; its Ready condition says so).
pub fn assess(i: &StallInputs<'_>) -> Option<Stall> {
    let s = i.snapshot;
    if s.total_lag <= i.activation_lag || i.suspended {
        return None;
    }
    let idle = s.no_progress_for;
    let not_draining = idle >= i.window;
    let w = i.workers;
    let lag = s.total_lag;
    let stall = |reason, message: String| Some(Stall { reason, message });
    if not_draining && w.crash_looping > 0 {
        let why = w.last_termination_reason.as_deref().map(|r| format!(", last termination: {r}")).unwrap_or_default();
        return stall(
            StallReason::CrashLoopingWorkers,
            format!(
                "lag {lag} not draining for {}s: {} of {} worker pods are crash-looping ({} restarts{why}); \
                 see `kubectl logs --previous` and the pods' resources",
                idle.as_secs(),
                w.crash_looping,
                w.pods,
                w.restarts
            ),
        );
    }
    if i.replicas == 0 {
        return (idle >= i.window).then(|| Stall {
            reason: StallReason::NoWorkers,
            message: format!("lag {lag} and no worker replicas for {}s", idle.as_secs()),
        });
    }
    if w.ready == 0 {
        // Workers starting (scheduling, image pulls) are not a stall until the grace is up.
        if idle < i.startup_grace {
            return None;
        }
        return stall(
            StallReason::NoCapacity,
            format!(
                "lag {lag}: {} worker replicas wanted, none ready for {}s (pending, unschedulable or failing \
                 readiness); see `kubectl describe pod`",
                i.replicas,
                idle.as_secs()
            ),
        );
    }
    if s.stuck_partitions > 0 {
        return stall(
            StallReason::PartitionStuck,
            format!(
                "{} partitions with {} records of lag have not committed for {}s while their workers run and \
                 report no retry (a hung processor call?)",
                s.stuck_partitions,
                s.stuck_lag,
                i.window.as_secs()
            ),
        );
    }
    if s.dead_letter_failing {
        return stall(
            StallReason::DeadLetterFailing,
            format!(
                "a record exhausted its attempts and its dead-letter write keeps failing ({} partitions wait, {} \
                 records of lag); check that the dead-letter topic exists and the workers may write to it \
                 (kpipe_worker_dead_letter_errors_total, worker logs)",
                s.retrying_partitions, s.retrying_lag
            ),
        );
    }
    if s.circuit_open_partitions > 0 {
        return stall(
            StallReason::ProcessorUnavailable,
            format!(
                "the processor is unavailable: workers opened the circuit breaker and wait for it to recover \
                 ({} partitions, {} records of lag held, no attempts spent, nothing dead-lettered; \
                 replicas are not added for this lag)",
                s.circuit_open_partitions, s.retrying_lag
            ),
        );
    }
    if let Some((since_ms, attempts)) = s.oldest_retry {
        let retrying_for = Duration::from_millis(i.wall_ms.saturating_sub(since_ms));
        if retrying_for >= i.window {
            let blocked =
                if s.blocked { "; attempts exhausted, retried until it succeeds (onFailure: block)" } else { "" };
            return stall(
                StallReason::Retrying,
                format!(
                    "{} partitions wait for a record the processor keeps failing ({} records of lag): the oldest \
                     has failed {attempts} times over {}s{blocked}",
                    s.retrying_partitions,
                    s.retrying_lag,
                    retrying_for.as_secs()
                ),
            );
        }
    }
    if not_draining {
        return stall(
            StallReason::NotDraining,
            format!("lag {lag}: nothing committed for {}s with {} ready workers", idle.as_secs(), w.ready),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn inputs<'a>(snapshot: &'a Snapshot, workers: &'a WorkerPods, replicas: i32) -> StallInputs<'a> {
        StallInputs {
            snapshot,
            workers,
            replicas,
            suspended: false,
            activation_lag: 0,
            window: secs(30),
            startup_grace: secs(120),
            wall_ms: 1_000_000,
        }
    }

    #[test]
    fn verdict_table() {
        let healthy = WorkerPods { pods: 2, ready: 2, ..Default::default() };
        let crashing = WorkerPods {
            pods: 2,
            ready: 0,
            restarts: 9,
            crash_looping: 2,
            last_termination_reason: Some("OOMKilled".into()),
            ..Default::default()
        };
        let pending = WorkerPods { pods: 2, ..Default::default() };
        let backlog = |idle: u64| Snapshot { total_lag: 5_000, no_progress_for: secs(idle), ..Default::default() };
        let stuck = Snapshot { stuck_partitions: 1, stuck_lag: 40, ..backlog(40) };
        let retrying = |since_ms| Snapshot {
            retrying_partitions: 3,
            retrying_lag: 300,
            oldest_retry: Some((since_ms, 7)),
            ..backlog(0)
        };
        let r = retrying(1_000_000 - 45_000);
        let young = retrying(1_000_000 - 5_000);
        let none = Snapshot::default();
        let open = Snapshot { circuit_open_partitions: 3, ..young.clone() };
        let dlq = Snapshot { dead_letter_failing: true, blocked: true, ..young.clone() };
        let cases: Vec<(&str, Snapshot, WorkerPods, i32, Option<StallReason>)> = vec![
            ("no backlog", none, healthy.clone(), 2, None),
            ("draining", backlog(5), healthy.clone(), 2, None),
            ("crash loop", backlog(40), crashing.clone(), 2, Some(StallReason::CrashLoopingWorkers)),
            ("crash loop that still drains", backlog(5), crashing.clone(), 2, None),
            ("no replicas", backlog(40), WorkerPods::default(), 0, Some(StallReason::NoWorkers)),
            ("pods pending, within grace", backlog(60), pending.clone(), 2, None),
            ("pods pending too long", backlog(200), pending, 2, Some(StallReason::NoCapacity)),
            ("stuck partition", stuck, healthy.clone(), 2, Some(StallReason::PartitionStuck)),
            ("retrying for 45 s", r, healthy.clone(), 2, Some(StallReason::Retrying)),
            ("retrying for 5 s: a normal retry", young, healthy.clone(), 2, None),
            ("circuit open: at once", open, healthy.clone(), 2, Some(StallReason::ProcessorUnavailable)),
            ("dead-letter writes failing: at once", dlq, healthy.clone(), 2, Some(StallReason::DeadLetterFailing)),
            ("not draining", backlog(31), healthy, 2, Some(StallReason::NotDraining)),
        ];
        for (name, snap, workers, replicas, want) in &cases {
            let got = assess(&inputs(snap, workers, *replicas));
            assert_eq!(got.as_ref().map(|s| s.reason), *want, "{name}: {got:?}");
        }
        let msg = assess(&inputs(&backlog(40), &crashing, 2)).unwrap().message;
        assert!(msg.contains("OOMKilled") && msg.contains("9 restarts"), "{msg}");
        assert!(StallReason::ProcessorUnavailable.degrades() && StallReason::DeadLetterFailing.degrades());
        assert!(!StallReason::Retrying.degrades());
    }

    #[test]
    fn suspended_and_activation_lag_are_not_stalls() {
        let healthy = WorkerPods::default();
        let snap = Snapshot { total_lag: 10, no_progress_for: secs(999), ..Default::default() };
        assert_eq!(assess(&StallInputs { suspended: true, ..inputs(&snap, &healthy, 0) }), None);
        assert_eq!(assess(&StallInputs { activation_lag: 10, ..inputs(&snap, &healthy, 0) }), None);
        assert!(assess(&inputs(&snap, &healthy, 0)).is_some());
    }
}
