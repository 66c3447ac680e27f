//! Trace simulation: kpipe's scaler (with the real [`LagTracker`] and [`ScalerState`]) versus a
//! model of KEDA's Kafka scaler driving an HPA with default settings, on the same simulated
//! consumer group.
//!
//! The KEDA + HPA model follows reference/prior-art-scaling-and-delivery.md §1:
//! - KEDA polls every 30 s (`pollingInterval`); active = total lag > `activationLagThreshold` (0);
//!   at 0 replicas an active poll scales to 1; inactive for `cooldownPeriod` (300 s) → 0.
//! - lag per partition = log end − committed (whole log end without a commit, `earliest`); the
//!   metric is capped at partitions × `lagThreshold`.
//! - the HPA syncs every 15 s from 1..N: `AverageValue` target, ratio = metric / (threshold ×
//!   current), inside 10 % tolerance → keep, else ceil(metric / threshold); scale-up limited to
//!   max(2×, +4) pods per sync; scale-down to the highest recommendation of the last 300 s;
//!   min 1 (HPA), max `maxReplicaCount`.
//!
//! The simulated world: `partitions` partitions with even arrival, each pod consumes up to
//! `capacity_per_pod` records/s split over its assigned partitions (round robin), a new pod starts
//! consuming `startup_secs` after it is requested, every change of the ready set pauses consumption
//! for `rebalance_secs`, and workers commit what they finished
//! `commit_delay_secs` earlier (in-flight records, batching, periodic commit). Replica-seconds integrate
//! the Deployment's replica count; worst lag is the maximum of Σ(log end − committed).

use std::collections::VecDeque;
use std::time::Duration;

use kpipe_api::v1alpha1::StartOffset;

use crate::lag::{Consumers, LagTracker, PartitionOffsets};
use crate::scaler::{Policy, ScalerState};

/// The simulated consumer group and cluster.
#[derive(Clone, Debug)]
pub struct World {
    pub partitions: usize,
    pub capacity_per_pod: f64,
    pub startup_secs: u64,
    pub rebalance_secs: u64,
    pub commit_delay_secs: u64,
    /// Every write ends in a transaction marker, so log end − committed ≥ 1 for consumers that commit
    /// one past their last record (kpipe's worker commits its fetch position instead once a partition is
    /// caught up, see [`Autoscaler::commits_past_markers`]).
    pub transaction_markers: bool,
    /// A crash loop: from `from` to `until` (seconds), every ready pod crashes every `every` seconds. A
    /// crashed pod is back `startup_secs` later and its group re-reads from the committed offsets (what it
    /// had consumed but not committed is consumed again).
    pub crash_loop: Option<CrashLoop>,
}

/// See [`World::crash_loop`].
#[derive(Clone, Copy, Debug)]
pub struct CrashLoop {
    pub from: u64,
    pub until: u64,
    pub every: u64,
}

/// A load trace: records/s produced (over all partitions) at each second.
pub struct Trace {
    pub name: &'static str,
    pub seconds: u64,
    pub rate: Box<dyn Fn(u64) -> f64>,
    /// Every record goes to partition 0 (a hot key), instead of an even spread.
    pub hot_partition: bool,
}

/// Outcome of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub replica_seconds: u64,
    pub worst_lag: i64,
    pub scale_changes: u32,
    pub final_replicas: i32,
    /// Σ(log end − committed) at the end of the trace: a backlog left behind.
    pub final_lag: i64,
    /// (second, replicas, lag) every 30 s, for plots and debugging.
    pub series: Vec<(u64, i32, i64)>,
}

/// Something that sets the replica count once per simulated second.
pub trait Autoscaler {
    /// `consumers`: the ready pods, with an epoch that changes whenever the set changes or a pod restarts.
    fn tick(&mut self, t: u64, offsets: &[PartitionOffsets], replicas: i32, consumers: Consumers) -> i32;

    /// Whether the consumers this autoscaler runs with commit past a transaction marker at the log
    /// end once they have caught up (kpipe's worker commits its fetch position; a consumer that commits
    /// one past its last record does not).
    fn commits_past_markers(&self) -> bool {
        false
    }
}

/// kpipe: the real tracker and scaler, polled every `poll_secs`.
pub struct Kpipe {
    pub policy: Policy,
    pub poll_secs: u64,
    pub start: StartOffset,
    tracker: LagTracker,
    state: ScalerState,
}

impl Kpipe {
    pub fn new(policy: Policy, poll_secs: u64) -> Self {
        Self {
            policy,
            poll_secs: poll_secs.max(1),
            start: StartOffset::Earliest,
            tracker: LagTracker::default(),
            state: ScalerState::default(),
        }
    }
}

impl Autoscaler for Kpipe {
    fn tick(&mut self, t: u64, offsets: &[PartitionOffsets], replicas: i32, consumers: Consumers) -> i32 {
        if !t.is_multiple_of(self.poll_secs) {
            return replicas;
        }
        let now = Duration::from_secs(t);
        let snap = self.tracker.update(offsets, self.start, consumers, now, t * 1000);
        self.state.decide(&self.policy, Some(&snap.observation()), replicas, now).desired
    }

    fn commits_past_markers(&self) -> bool {
        true
    }
}

/// KEDA's Kafka scaler + HPA defaults.
pub struct KedaHpa {
    pub lag_threshold: i64,
    pub activation_lag_threshold: i64,
    pub max_replica_count: i32,
    pub polling_interval: u64,
    pub cooldown_period: u64,
    pub hpa_sync_period: u64,
    pub tolerance: f64,
    pub scale_down_stabilization: u64,
    last_active: u64,
    recommendations: VecDeque<(u64, i32)>,
}

impl KedaHpa {
    /// Defaults from the reference (lagThreshold and maxReplicaCount as given).
    pub fn defaults(lag_threshold: i64, max_replica_count: i32) -> Self {
        Self {
            lag_threshold,
            activation_lag_threshold: 0,
            max_replica_count,
            polling_interval: 30,
            cooldown_period: 300,
            hpa_sync_period: 15,
            tolerance: 0.1,
            scale_down_stabilization: 300,
            last_active: 0,
            recommendations: VecDeque::new(),
        }
    }

    fn total_lag(offsets: &[PartitionOffsets]) -> i64 {
        offsets
            .iter()
            .map(|p| match p.committed {
                Some(c) => (p.log_end - c).max(0),
                None => p.log_end,
            })
            .sum()
    }
}

impl Autoscaler for KedaHpa {
    fn tick(&mut self, t: u64, offsets: &[PartitionOffsets], replicas: i32, _consumers: Consumers) -> i32 {
        let lag = Self::total_lag(offsets);
        let mut replicas = replicas;
        if t.is_multiple_of(self.polling_interval) {
            let active = lag > self.activation_lag_threshold;
            if active {
                self.last_active = t;
                if replicas == 0 {
                    return 1;
                }
            } else if replicas > 0 && t >= self.last_active + self.cooldown_period {
                self.recommendations.clear();
                return 0;
            }
        }
        if replicas == 0 || !t.is_multiple_of(self.hpa_sync_period) {
            return replicas;
        }
        let partitions = offsets.len() as i64;
        let metric = lag.min(partitions * self.lag_threshold) as f64;
        let target = self.lag_threshold as f64;
        let ratio = metric / (target * replicas as f64);
        let rec = if (1.0 - ratio).abs() <= self.tolerance { replicas } else { (metric / target).ceil() as i32 };
        let rec = rec.clamp(1, self.max_replica_count);
        self.recommendations.push_back((t, rec));
        while let Some(&(at, _)) = self.recommendations.front() {
            if t - at > self.scale_down_stabilization {
                self.recommendations.pop_front();
            } else {
                break;
            }
        }
        let down = self.recommendations.iter().map(|(_, r)| *r).max().unwrap_or(rec);
        let desired = if rec > replicas {
            rec.min((replicas * 2).max(replicas + 4))
        } else if down < replicas {
            down
        } else {
            replicas
        };
        replicas = desired.clamp(1, self.max_replica_count);
        replicas
    }
}

/// Run one trace through one autoscaler.
pub fn run(world: &World, trace: &Trace, scaler: &mut dyn Autoscaler) -> Outcome {
    let p = world.partitions.max(1);
    let mut produced = vec![0f64; p];
    let mut consumed = vec![0f64; p];
    let mut committed: Vec<Option<i64>> = vec![None; p];
    let mut history: VecDeque<Vec<f64>> = VecDeque::new();
    // Ready time of each requested pod, oldest first.
    let mut pods: Vec<u64> = Vec::new();
    let mut last_ready = 0usize;
    let mut paused_until = 0u64;
    let mut out = Outcome {
        replica_seconds: 0,
        worst_lag: 0,
        scale_changes: 0,
        final_replicas: 0,
        final_lag: 0,
        series: Vec::new(),
    };
    let mut epoch = 0u64;
    let marker = i64::from(world.transaction_markers);
    let past_markers = world.transaction_markers && scaler.commits_past_markers();

    for t in 0..trace.seconds {
        let rate = (trace.rate)(t).max(0.0);
        if trace.hot_partition {
            produced[0] += rate;
        } else {
            for v in produced.iter_mut() {
                *v += rate / p as f64;
            }
        }
        if let Some(c) = world.crash_loop
            && (c.from..c.until).contains(&t)
            && (t - c.from).is_multiple_of(c.every.max(1))
            && pods.iter().any(|r| *r <= t)
        {
            // Every running pod dies and restarts; the group re-reads from its committed offsets.
            for r in pods.iter_mut().filter(|r| **r <= t) {
                *r = t + world.startup_secs;
            }
            for (c, done) in consumed.iter_mut().zip(&committed) {
                *c = c.min(done.unwrap_or(0) as f64);
            }
            history.clear();
            epoch += 1;
        }
        let ready = pods.iter().filter(|r| **r <= t).count();
        if ready != last_ready {
            paused_until = t + world.rebalance_secs;
            last_ready = ready;
            epoch += 1;
        }
        if ready > 0 && t >= paused_until {
            for pod in 0..ready {
                let mine: Vec<usize> = (pod..p).step_by(ready).collect();
                let mut budget = world.capacity_per_pod;
                let mut open: Vec<usize> = mine.into_iter().filter(|&i| produced[i] - consumed[i] > 0.0).collect();
                // Water-fill the pod's capacity over its partitions with a backlog.
                while budget > 1e-9 && !open.is_empty() {
                    let share = budget / open.len() as f64;
                    let mut next = Vec::new();
                    for i in open {
                        let avail = produced[i] - consumed[i];
                        let take = avail.min(share);
                        consumed[i] += take;
                        budget -= take;
                        if avail - take > 1e-9 {
                            next.push(i);
                        }
                    }
                    open = next;
                }
            }
        }
        // Workers commit what they finished `commit_delay_secs` ago (records in flight, batching,
        // the periodic commit), so a busy group always shows a small lag.
        // A consumer that caught up on a partition commits its fetch position, past the trailing marker, if
        // it does that at all.
        let positions: Vec<f64> = (0..p)
            .map(|i| {
                let caught_up = ready > 0 && consumed[i] >= produced[i] - 1e-9 && produced[i] >= 1.0;
                match committed[i] {
                    // Nobody consumes: nothing new is committed (the last commit may be past a marker).
                    Some(c) if ready == 0 => c as f64,
                    _ if past_markers && caught_up => (produced[i].floor() as i64 + marker) as f64,
                    _ => consumed[i],
                }
            })
            .collect();
        history.push_back(positions);
        if history.len() > world.commit_delay_secs as usize
            && let Some(done) = history.pop_front()
        {
            for (c, d) in committed.iter_mut().zip(done) {
                if d >= 1.0 || c.is_some() {
                    *c = Some(d.floor() as i64);
                }
            }
        }
        let offsets: Vec<PartitionOffsets> = (0..p)
            .map(|i| {
                let end = produced[i].floor() as i64;
                PartitionOffsets {
                    topic: "t".into(),
                    partition: i as i32,
                    log_start: 0,
                    log_end: if end > 0 { end + marker } else { 0 },
                    committed: committed[i],
                    retry: None,
                    start_position: false,
                }
            })
            .collect();
        let lag: i64 = offsets.iter().map(|o| o.log_end - o.committed.unwrap_or(0)).sum();
        out.worst_lag = out.worst_lag.max(lag);
        out.final_lag = lag;

        let replicas = pods.len() as i32;
        let desired = scaler.tick(t, &offsets, replicas, Consumers { ready: ready as i32, epoch }).max(0) as usize;
        if desired != pods.len() {
            out.scale_changes += 1;
        }
        while pods.len() < desired {
            pods.push(t + world.startup_secs);
        }
        pods.truncate(desired);
        out.replica_seconds += pods.len() as u64;
        if t.is_multiple_of(30) {
            out.series.push((t, pods.len() as i32, lag));
        }
    }
    out.final_replicas = pods.len() as i32;
    out
}

/// The default world of the comparison.
pub fn default_world() -> World {
    World {
        partitions: 12,
        capacity_per_pod: 1000.0,
        startup_secs: 10,
        rebalance_secs: 3,
        commit_delay_secs: 2,
        transaction_markers: false,
        crash_loop: None,
    }
}

/// The three traces of the comparison.
pub fn standard_traces() -> Vec<Trace> {
    vec![
        Trace {
            name: "step",
            seconds: 3600,
            rate: Box::new(|t| match t {
                120..720 => 6000.0,
                1800..2400 => 3000.0,
                _ => 0.0,
            }),
            hot_partition: false,
        },
        Trace {
            name: "diurnal",
            seconds: 7200,
            rate: Box::new(|t| {
                if t < 5400 {
                    let x = (std::f64::consts::PI * t as f64 / 5400.0).sin();
                    8000.0 * x * x
                } else {
                    0.0
                }
            }),
            hot_partition: false,
        },
        Trace {
            name: "spiky",
            seconds: 3600,
            rate: Box::new(|t| {
                let base = 200.0;
                if t % 600 >= 60 && t % 600 < 70 { base + 30_000.0 } else { base }
            }),
            hot_partition: false,
        },
    ]
}

/// The failure traces of the never-strand rules (DESIGN.md §3), run in their own worlds:
/// - `hot-partition`: 800 records/s for 20 minutes, then a burst of 12,000, all on one partition of 12
///   (one hot key): one pod can do all there is to do;
/// - `crash-loop`: a backlog of 100,000 records while every pod crashes every 12 s for two minutes (an
///   OOM-kill loop: each pod lives about 2 s past its 10 s start-up); the backlog must drain to 0
///   afterwards.
pub fn failure_traces() -> Vec<(World, Trace)> {
    let hot = Trace {
        name: "hot-partition",
        seconds: 3600,
        rate: Box::new(|t| match t {
            120..1320 => 800.0,
            1800..1810 => 1200.0,
            _ => 0.0,
        }),
        hot_partition: true,
    };
    let crash = Trace {
        name: "crash-loop",
        seconds: 1800,
        rate: Box::new(|t| if (60..70).contains(&t) { 10_000.0 } else { 0.0 }),
        hot_partition: false,
    };
    let crashing = World { crash_loop: Some(CrashLoop { from: 70, until: 190, every: 12 }), ..default_world() };
    vec![(default_world(), hot), (crashing, crash)]
}
