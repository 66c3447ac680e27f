//! The scaler: a pure function from (lag observation, current replicas, partition count, policy,
//! clock) to the desired replica count and the reason for it (DESIGN.md §3).
//!
//! No I/O and no wall clock: the caller passes `now` as a monotonic offset (any fixed origin), so
//! the same code runs in the controller, in table-driven tests and in the trace simulation.
//!
//! Rules, in order:
//! 1. `suspend` → 0. `mode: external` → `spec.replicas` passed through (or the current count when
//!    unset); the scaler never fights an external autoscaler.
//! 2. No observation (probe failed) → hold the current count: errors never scale to zero.
//! 3. Raw recommendation: `ceil(scalable lag / lagThreshold)`, or with `targetDrainSeconds`
//!    `ceil(scalable lag / (rate per replica × targetDrainSeconds))` once a rate is known
//!    (`lagThreshold` until then). Scalable lag excludes stuck partitions: more pods cannot help a
//!    poison record, and a permanent lag of 1 from transaction markers must not keep a pod alive.
//!    With the throughput model ([`crate::throughput`]) the rule applies to the backlog only: the
//!    lag minus the records that merely await their commit. A plain lag rule pays pods for that
//!    commit delay: at 6,000 records/s and a 2 s delay it asks for 12 pods where 6 keep up. The
//!    recommendation is then the larger of that and the replicas that keep up with the arrival rate
//!    (partition-aware: a pod's load is the sum of the busiest partitions it may own), at
//!    `target_utilization` of a measured capacity or at the lower bound the replicas have shown;
//!    never more than the plain rule on the whole lag.
//! 4. Clamp to `[minReplicas, min(maxReplicas, partitions)]`. With `partitionDistribution: even`,
//!    round up to the next divisor of the partition count so every pod gets the same number of
//!    partitions (12 partitions: 5 → 6, 7 → 12). Rounding down to a "balanced" count was tried in
//!    the trace simulation: it saves pods but raises the worst-case lag, so kpipe rounds up.
//! 5. From zero: wake as soon as scalable lag > `activationLag` (or, with `activationLag` 0, as soon
//!    as a log-end offset grows, which covers `startOffset: latest` without a committed offset).
//! 6. Up: at once. Down: only to the highest recommendation seen within `scaleDownStabilization`,
//!    and at most half the current count per decision. To zero: only after the pipeline was idle
//!    (no scalable lag and no new records) for `cooldownToZero`.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use kpipe_api::v1alpha1::{ConsumerPipelineSpec, PartitionDistribution, ScalingMode};

use crate::throughput::Capacity;

/// How the lag translates into replicas.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// Records of lag per replica.
    LagThreshold(i64),
    /// Seconds to drain the backlog at the measured per-replica rate; `fallback_threshold` until a
    /// rate is known.
    DrainSeconds { seconds: i64, fallback_threshold: i64 },
}

/// Who decides the replica count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The scaler decides.
    Auto,
    /// Scale to zero and stop.
    Suspended,
    /// Something else writes `spec.replicas` through the scale subresource.
    External(Option<i32>),
}

/// The scaling policy of one pipeline (from `spec.scaling`).
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub mode: Mode,
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub target: Target,
    pub activation_lag: i64,
    pub scale_down_stabilization: Duration,
    pub cooldown_to_zero: Duration,
    pub even_distribution: bool,
    /// Largest fraction of the current replicas removed in one scale-down decision (≥ 1 pod).
    pub max_scale_down_fraction: f64,
    /// For this long after a scale-down, a scale-up needs two consecutive polls that ask for it:
    /// the rebalance a scale-down causes pauses consumption briefly, and that transient lag must
    /// not bounce the count straight back up (flapping).
    pub scale_up_settle: Duration,
    /// Share of a replica's measured capacity the keep-up rule plans to use (headroom for bursts
    /// and for a pod that owns the busier partitions).
    pub target_utilization: f64,
}

impl Policy {
    /// The policy a spec asks for.
    pub fn from_spec(spec: &ConsumerPipelineSpec) -> Self {
        let s = &spec.scaling;
        let mode = if spec.suspend {
            Mode::Suspended
        } else {
            match s.mode {
                ScalingMode::Auto => Mode::Auto,
                ScalingMode::External => Mode::External(spec.replicas),
            }
        };
        let target = match s.target_drain_seconds {
            Some(seconds) => Target::DrainSeconds { seconds, fallback_threshold: s.effective_lag_threshold() },
            None => Target::LagThreshold(s.effective_lag_threshold()),
        };
        Self {
            mode,
            min_replicas: s.min_replicas.max(0),
            max_replicas: s.max_replicas.max(1),
            target,
            activation_lag: s.activation_lag.max(0),
            scale_down_stabilization: s.scale_down_stabilization.into(),
            cooldown_to_zero: s.cooldown_to_zero.into(),
            even_distribution: s.partition_distribution == PartitionDistribution::Even,
            max_scale_down_fraction: 0.5,
            scale_up_settle: DEFAULT_SCALE_UP_SETTLE,
            target_utilization: DEFAULT_TARGET_UTILIZATION,
        }
    }
}

/// A backlog that is gone within this time at the pace it shrinks needs no more replicas.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// Default [`Policy::target_utilization`].
/// 0.7: in the trace simulation a scale-up from 6 to 12 replicas at 80 % pauses consumption (the
/// rebalance) at a rate whose backlog tops KEDA's worst-case lag; at 70 % it stays below.
pub const DEFAULT_TARGET_UTILIZATION: f64 = 0.7;

/// Default [`Policy::scale_up_settle`].
pub const DEFAULT_SCALE_UP_SETTLE: Duration = Duration::from_secs(30);

/// One lag measurement, as the scaler needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// Lag over all partitions.
    pub total_lag: i64,
    /// Lag on stuck partitions (included in `total_lag`).
    pub stuck_lag: i64,
    /// Lag on partitions whose head record a live worker is retrying (included in `total_lag`).
    pub retrying_lag: i64,
    /// Stuck or retrying partitions: each is held by a pod that must not be scaled away, since that
    /// would restart the work on the record (and a stuck flag is only a symptom).
    pub held_partitions: i32,
    /// Partitions with lag or arriving records: more pods than this get nothing to do.
    pub active_partitions: i32,
    /// Partitions of the source topics.
    pub partitions: i32,
    /// Some partition's log-end offset grew since the previous poll.
    pub log_end_advanced: bool,
    /// Records per second one replica commits, when known.
    pub rate_per_replica: Option<f64>,
    /// Records per second arriving on each partition, highest first.
    pub arrival_rates: Vec<f64>,
    /// What one replica can do, once the throughput model knows.
    pub capacity: Option<Capacity>,
    /// Part of the lag that only awaits its commit (included in `total_lag`).
    pub awaiting_commit: i64,
    /// The set of ready consumers changed within the last polls (a rebalance pauses consumption).
    pub rebalancing: bool,
}

impl Observation {
    /// Lag that more pods could work on (not the stuck or retrying partitions' lag).
    pub fn scalable_lag(&self) -> i64 {
        (self.total_lag - self.stuck_lag - self.retrying_lag).max(0)
    }
}

/// Why the scaler chose its count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Suspended,
    External,
    ProbeUnavailable,
    Activation,
    ScaleUp,
    ConfirmingScaleUp,
    Draining,
    AboveMaximum,
    BelowMinimum,
    Steady,
    StabilizingScaleDown,
    ScaleDown,
    CoolingDown,
    CooldownToZero,
    Idle,
    /// A source topic was recreated: workers held at zero while its old offsets are discarded
    /// ([`crate::topic_identity`]).
    TopicRecreated,
}

impl Reason {
    /// CamelCase reason for Events and conditions.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Suspended => "Suspended",
            Self::External => "ExternalScaling",
            Self::ProbeUnavailable => "LagUnavailable",
            Self::Activation => "Activated",
            Self::ScaleUp => "ScaledUp",
            Self::ConfirmingScaleUp => "ConfirmingScaleUp",
            Self::Draining => "Draining",
            Self::AboveMaximum => "AboveMaximum",
            Self::BelowMinimum => "BelowMinimum",
            Self::Steady => "Steady",
            Self::StabilizingScaleDown => "StabilizingScaleDown",
            Self::ScaleDown => "ScaledDown",
            Self::CoolingDown => "CoolingDown",
            Self::CooldownToZero => "ScaledToZero",
            Self::Idle => "Idle",
            Self::TopicRecreated => "TopicRecreated",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scaler's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub desired: i32,
    pub reason: Reason,
    /// Human-readable explanation (for Events).
    pub message: String,
}

impl Decision {
    fn new(desired: i32, reason: Reason, message: impl Into<String>) -> Self {
        Self { desired, reason, message: message.into() }
    }
}

/// What the scaler remembers between decisions for one pipeline.
#[derive(Clone, Debug, Default)]
pub struct ScalerState {
    /// Recent clamped recommendations (for scale-down stabilisation).
    recommendations: VecDeque<(Duration, i32)>,
    /// Last time the pipeline had scalable lag or new records.
    last_busy: Option<Duration>,
    /// Last scale-down decision.
    last_scale_down: Option<Duration>,
    /// The previous poll asked for a scale-up that the settle window held back.
    pending_up: bool,
    /// (time, backlog beyond what awaits its commit) of the previous decision.
    last_backlog: Option<(Duration, i64)>,
}

/// `ceil(a / b)` for positive `b`, saturating into `i32`.
fn ceil_div(a: i64, b: f64) -> i32 {
    if a <= 0 {
        return 0;
    }
    let v = (a as f64 / b).ceil();
    if v >= i32::MAX as f64 { i32::MAX } else { v as i32 }
}

/// The fewest replicas (at most `partitions`) whose busiest pod stays within `per_replica` records/s,
/// when partitions are spread by count: a pod owns up to `ceil(partitions / replicas)` of them, and
/// it may get the busiest ones. 0 when nothing arrives.
pub fn keep_up_replicas(arrival_desc: &[f64], per_replica: f64, partitions: i32) -> i32 {
    if partitions <= 0 || per_replica <= 0.0 || !arrival_desc.iter().any(|r| *r > 0.0) {
        return 0;
    }
    (1..=partitions)
        .find(|&c| {
            let owned = (partitions + c - 1) / c;
            arrival_desc.iter().take(owned as usize).sum::<f64>() <= per_replica
        })
        .unwrap_or(partitions)
}

/// With even distribution: the smallest replica count ≥ `n` that divides the partition count, so
/// every pod gets the same number of partitions (no pod idles while another has twice the work).
pub fn even_count(n: i32, partitions: i32) -> i32 {
    if n <= 0 || partitions <= 0 {
        return n.max(0);
    }
    if n >= partitions {
        return partitions;
    }
    (n..=partitions).find(|c| partitions % c == 0).unwrap_or(partitions)
}

impl ScalerState {
    /// Decide the replica count. `current` is the replica count currently set on the Deployment.
    pub fn decide(&mut self, policy: &Policy, obs: Option<&Observation>, current: i32, now: Duration) -> Decision {
        match policy.mode {
            Mode::Suspended => {
                *self = Self::default();
                return Decision::new(0, Reason::Suspended, "pipeline is suspended");
            }
            Mode::External(replicas) => {
                *self = Self::default();
                let desired = replicas.unwrap_or(current).max(0);
                return Decision::new(desired, Reason::External, "replicas are set through the scale subresource");
            }
            Mode::Auto => {}
        }
        let Some(obs) = obs else {
            return Decision::new(current, Reason::ProbeUnavailable, "lag unknown: keeping the current replicas");
        };
        if self.recommendations.is_empty() && current > 0 {
            // A restarted operator must not skip the stabilisation window.
            self.recommendations.push_back((now, current));
        }
        let upper = policy.max_replicas.min(obs.partitions).max(0);
        let lower = policy.min_replicas.min(upper);
        let scalable = obs.scalable_lag();
        let busy = scalable > 0 || obs.log_end_advanced;
        if busy || self.last_busy.is_none() {
            self.last_busy = Some(now);
        }
        let idle_for = now.saturating_sub(self.last_busy.unwrap_or(now));
        let cooled = lower == 0 && !busy && idle_for >= policy.cooldown_to_zero;

        // A measured capacity is planned at `target_utilization`; a lower bound as it is (the replicas
        // showed that rate, and a group that then falls behind gets its capacity measured).
        let capacity = match obs.capacity {
            Some(Capacity::Measured(k)) if k > 0.0 => Some(k * policy.target_utilization),
            Some(Capacity::AtLeast(k)) if k > 0.0 => Some(k),
            _ => None,
        };
        let keep_up = capacity.map(|k| keep_up_replicas(&obs.arrival_rates, k, obs.partitions)).unwrap_or(0);
        let backlog = scalable - obs.awaiting_commit.clamp(0, scalable);
        let (per_replica_lag, mut basis) = match policy.target {
            Target::LagThreshold(t) => (t.max(1) as f64, format!("lagThreshold {t}")),
            Target::DrainSeconds { seconds, fallback_threshold } => match obs.rate_per_replica {
                Some(rate) if rate > 0.0 => (
                    rate * seconds.max(1) as f64,
                    format!("{rate:.0} records/s per replica, targetDrainSeconds {seconds}"),
                ),
                _ => (fallback_threshold.max(1) as f64, format!("lagThreshold {fallback_threshold} (no rate yet)")),
            },
        };
        let by_lag = ceil_div(backlog, per_replica_lag);
        // Never more than the plain lag rule would ask for: the model only saves pods.
        let keep_up = keep_up.min(ceil_div(scalable, per_replica_lag));
        if obs.awaiting_commit > 0 {
            basis.push_str(&format!("; backlog {backlog} beyond {} awaiting commit", obs.awaiting_commit));
        }
        // Only when it counts: after a burst the minute's arrival average outlives the lag.
        if let Some(k) = capacity.filter(|_| keep_up > 0) {
            let arrival: f64 = obs.arrival_rates.iter().sum();
            basis.push_str(&format!(
                "; {arrival:.0} records/s arriving, planning {k:.0} records/s per replica: {keep_up} keep up"
            ));
        }
        let raw = by_lag.max(keep_up);
        // Seconds until the backlog is gone at the pace it shrank since the previous decision.
        let drains_in = match self.last_backlog {
            Some((at, prev)) if backlog < prev && now > at => {
                let pace = (prev - backlog) as f64 / (now - at).as_secs_f64();
                Some(backlog as f64 / pace)
            }
            _ => None,
        };
        self.last_backlog = Some((now, backlog));
        // Never strand: lag beyond activationLag keeps a pod, stuck or not (a stuck flag is a symptom,
        // and nothing can ever commit at zero replicas). The pods that hold stuck or retrying partitions
        // stay too: scaling them away restarts the work on those records.
        let strands = obs.total_lag > policy.activation_lag;
        let holds = obs.held_partitions.min(current).min(upper).max(0);
        let floor = if lower > 0 {
            lower
        } else if (cooled || current == 0) && !strands {
            0
        } else {
            1.min(upper)
        }
        .max(holds);
        // Useful pods only: lag or arrivals on k partitions give work to at most k pods, whatever the
        // lag rule says (one hot partition of twelve needs one pod, not twelve).
        let useful = obs.active_partitions.max(floor);
        let mut rec = raw.clamp(floor, upper.max(floor)).min(useful);
        if policy.even_distribution && rec > 0 {
            // Round up to an even spread, but not past the pods that can get work.
            rec =
                Some(even_count(rec, obs.partitions)).filter(|c| *c <= upper && *c <= useful).unwrap_or(rec).max(floor);
        }
        let mut why =
            format!("lag {} ({} stuck) over {} partitions, {basis}", obs.total_lag, obs.stuck_lag, obs.partitions);
        if obs.retrying_lag > 0 {
            why.push_str(&format!("; {} lag on partitions whose records are being retried", obs.retrying_lag));
        }
        if holds > 0 {
            why.push_str(&format!("; keeping the pods of {} stuck or retrying partitions", obs.held_partitions));
        }
        if rec < raw.min(upper) {
            why.push_str(&format!("; only {} partitions have work", obs.active_partitions));
        }

        // From zero.
        if current == 0 {
            let activate = strands || (policy.activation_lag == 0 && obs.log_end_advanced);
            if activate && upper > 0 {
                let desired = rec.max(1);
                self.record(now, desired, policy);
                return Decision::new(desired, Reason::Activation, format!("activated: {why}"));
            }
            if lower > 0 {
                self.record(now, lower, policy);
                return Decision::new(lower, Reason::BelowMinimum, format!("minReplicas {lower}"));
            }
            return Decision::new(0, Reason::Idle, format!("idle at zero: {why}"));
        }

        self.record(now, rec, policy);
        if current > upper {
            return Decision::new(
                upper,
                Reason::AboveMaximum,
                format!("at most {upper} replicas (maxReplicas/partitions)"),
            );
        }
        if current < lower {
            return Decision::new(rec.max(lower), Reason::BelowMinimum, format!("minReplicas {lower}"));
        }
        if rec > current {
            // More pods only for the backlog (the arrival alone needs no more): not while the backlog drains
            // soon anyway, and not on the first poll that sees it grow during a rebalance, which pauses
            // consumption and leaves a backlog the settled group then drains.
            let backlog_driven = keep_up <= current;
            if backlog_driven && let Some(secs) = drains_in.filter(|s| *s <= DRAIN_GRACE.as_secs_f64()) {
                self.pending_up = false;
                return Decision::new(
                    current,
                    Reason::Draining,
                    format!("backlog {backlog} drains in about {secs:.0}s with {current} replicas: {why}"),
                );
            }
            let settling = self.last_scale_down.is_some_and(|t| now.saturating_sub(t) < policy.scale_up_settle);
            if (settling || (backlog_driven && obs.rebalancing)) && !self.pending_up {
                self.pending_up = true;
                return Decision::new(
                    current,
                    Reason::ConfirmingScaleUp,
                    format!("wants {rec} right after a scale-down; confirming on the next poll: {why}"),
                );
            }
            self.pending_up = false;
            return Decision::new(rec, Reason::ScaleUp, format!("scale up {current} → {rec}: {why}"));
        }
        self.pending_up = false;
        if rec == current {
            let reason = if lower == 0 && raw == 0 && !busy && !strands { Reason::CoolingDown } else { Reason::Steady };
            return Decision::new(current, reason, why);
        }
        if rec == 0 {
            self.recommendations.clear();
            self.last_scale_down = Some(now);
            return Decision::new(
                0,
                Reason::CooldownToZero,
                format!("idle for {}s (cooldownToZero {}s)", idle_for.as_secs(), policy.cooldown_to_zero.as_secs()),
            );
        }
        let stabilized = self.recommendations.iter().map(|(_, r)| *r).max().unwrap_or(rec).max(rec);
        if stabilized >= current {
            let reason =
                if lower == 0 && raw == 0 && !busy { Reason::CoolingDown } else { Reason::StabilizingScaleDown };
            return Decision::new(
                current,
                reason,
                format!(
                    "holding {current} (wants {rec}; scaleDownStabilization {}s): {why}",
                    policy.scale_down_stabilization.as_secs()
                ),
            );
        }
        let max_step = ((current as f64 * policy.max_scale_down_fraction).ceil() as i32).max(1);
        let mut desired = stabilized.max(current - max_step).min(useful.max(rec));
        if policy.even_distribution {
            desired = Some(even_count(desired, obs.partitions))
                .filter(|c| *c <= upper && *c <= useful.max(rec))
                .unwrap_or(desired);
        }
        let desired = desired.max(floor);
        if desired >= current {
            return Decision::new(current, Reason::StabilizingScaleDown, why);
        }
        self.last_scale_down = Some(now);
        Decision::new(desired, Reason::ScaleDown, format!("scale down {current} → {desired}: {why}"))
    }

    fn record(&mut self, now: Duration, rec: i32, policy: &Policy) {
        self.recommendations.push_back((now, rec));
        while let Some(&(t, _)) = self.recommendations.front() {
            if now.saturating_sub(t) > policy.scale_down_stabilization {
                self.recommendations.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            mode: Mode::Auto,
            min_replicas: 0,
            max_replicas: 10,
            target: Target::LagThreshold(100),
            activation_lag: 0,
            scale_down_stabilization: Duration::from_secs(60),
            cooldown_to_zero: Duration::from_secs(120),
            even_distribution: false,
            max_scale_down_fraction: 0.5,
            scale_up_settle: Duration::from_secs(30),
            target_utilization: DEFAULT_TARGET_UTILIZATION,
        }
    }

    /// Lag spread over every partition.
    fn obs(lag: i64, partitions: i32) -> Observation {
        Observation {
            total_lag: lag,
            partitions,
            active_partitions: if lag > 0 { partitions } else { 0 },
            ..Default::default()
        }
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn single_decisions_table() {
        struct Case {
            name: &'static str,
            policy: Policy,
            obs: Option<Observation>,
            current: i32,
            want: i32,
            reason: Reason,
        }
        let even = Policy { even_distribution: true, max_replicas: 12, ..policy() };
        let cases = vec![
            Case {
                name: "threshold ceil",
                policy: policy(),
                obs: Some(obs(250, 10)),
                current: 1,
                want: 3,
                reason: Reason::ScaleUp,
            },
            Case {
                name: "exact multiple",
                policy: policy(),
                obs: Some(obs(300, 10)),
                current: 3,
                want: 3,
                reason: Reason::Steady,
            },
            Case {
                name: "clamp to max",
                policy: policy(),
                obs: Some(obs(5000, 20)),
                current: 1,
                want: 10,
                reason: Reason::ScaleUp,
            },
            Case {
                name: "clamp to partitions",
                policy: policy(),
                obs: Some(obs(5000, 4)),
                current: 1,
                want: 4,
                reason: Reason::ScaleUp,
            },
            Case {
                name: "above partitions drops at once",
                policy: policy(),
                obs: Some(obs(5000, 4)),
                current: 8,
                want: 4,
                reason: Reason::AboveMaximum,
            },
            Case {
                name: "below min rises",
                policy: Policy { min_replicas: 3, ..policy() },
                obs: Some(obs(0, 10)),
                current: 1,
                want: 3,
                reason: Reason::BelowMinimum,
            },
            Case {
                name: "min above partitions is clamped",
                policy: Policy { min_replicas: 8, ..policy() },
                obs: Some(obs(0, 4)),
                current: 0,
                want: 4,
                reason: Reason::BelowMinimum,
            },
            Case {
                name: "activation from zero",
                policy: policy(),
                obs: Some(obs(1, 10)),
                current: 0,
                want: 1,
                reason: Reason::Activation,
            },
            Case {
                name: "activation goes straight to need",
                policy: policy(),
                obs: Some(obs(950, 10)),
                current: 0,
                want: 10,
                reason: Reason::Activation,
            },
            Case {
                name: "below activationLag stays at zero",
                policy: Policy { activation_lag: 50, ..policy() },
                obs: Some(obs(50, 10)),
                current: 0,
                want: 0,
                reason: Reason::Idle,
            },
            Case {
                name: "above activationLag wakes",
                policy: Policy { activation_lag: 50, ..policy() },
                obs: Some(obs(51, 10)),
                current: 0,
                want: 1,
                reason: Reason::Activation,
            },
            Case {
                name: "growing log end wakes a latest group without commits",
                policy: policy(),
                obs: Some(Observation { log_end_advanced: true, ..obs(0, 10) }),
                current: 0,
                want: 1,
                reason: Reason::Activation,
            },
            Case {
                name: "idle zero stays zero",
                policy: policy(),
                obs: Some(obs(0, 10)),
                current: 0,
                want: 0,
                reason: Reason::Idle,
            },
            Case {
                name: "stuck lag does not scale up",
                policy: policy(),
                obs: Some(Observation { stuck_lag: 900, ..obs(1000, 10) }),
                current: 1,
                want: 1,
                reason: Reason::Steady,
            },
            Case {
                name: "stuck lag activates too: never strand",
                policy: policy(),
                obs: Some(Observation { stuck_lag: 3, ..obs(3, 10) }),
                current: 0,
                want: 1,
                reason: Reason::Activation,
            },
            Case {
                name: "lag up to activationLag stays at zero",
                policy: Policy { activation_lag: 3, ..policy() },
                obs: Some(Observation { stuck_lag: 3, ..obs(3, 10) }),
                current: 0,
                want: 0,
                reason: Reason::Idle,
            },
            Case {
                name: "even: 7 of 12 → 12",
                policy: even.clone(),
                obs: Some(obs(700, 12)),
                current: 1,
                want: 12,
                reason: Reason::ScaleUp,
            },
            Case {
                name: "even: 5 of 12 → 6",
                policy: even.clone(),
                obs: Some(obs(500, 12)),
                current: 1,
                want: 6,
                reason: Reason::ScaleUp,
            },
            Case {
                name: "even: maxReplicas wins over rounding",
                policy: Policy { max_replicas: 8, ..even.clone() },
                obs: Some(obs(700, 12)),
                current: 1,
                want: 7,
                reason: Reason::ScaleUp,
            },
            Case {
                name: "even: 5 of 10 stays",
                policy: even.clone(),
                obs: Some(obs(500, 10)),
                current: 1,
                want: 5,
                reason: Reason::ScaleUp,
            },
            Case {
                name: "suspend → 0",
                policy: Policy { mode: Mode::Suspended, ..policy() },
                obs: Some(obs(10_000, 10)),
                current: 5,
                want: 0,
                reason: Reason::Suspended,
            },
            Case {
                name: "external passes spec.replicas",
                policy: Policy { mode: Mode::External(Some(7)), ..policy() },
                obs: Some(obs(0, 2)),
                current: 3,
                want: 7,
                reason: Reason::External,
            },
            Case {
                name: "external without spec.replicas keeps current",
                policy: Policy { mode: Mode::External(None), ..policy() },
                obs: None,
                current: 3,
                want: 3,
                reason: Reason::External,
            },
            Case {
                name: "probe failure holds",
                policy: policy(),
                obs: None,
                current: 4,
                want: 4,
                reason: Reason::ProbeUnavailable,
            },
            Case {
                name: "probe failure at zero holds zero",
                policy: policy(),
                obs: None,
                current: 0,
                want: 0,
                reason: Reason::ProbeUnavailable,
            },
            Case {
                name: "drain seconds without rate falls back to threshold",
                policy: Policy { target: Target::DrainSeconds { seconds: 10, fallback_threshold: 100 }, ..policy() },
                obs: Some(obs(450, 10)),
                current: 1,
                want: 5,
                reason: Reason::ScaleUp,
            },
            Case {
                name: "drain seconds with rate",
                policy: Policy { target: Target::DrainSeconds { seconds: 10, fallback_threshold: 100 }, ..policy() },
                obs: Some(Observation { rate_per_replica: Some(20.0), ..obs(450, 10) }),
                current: 1,
                want: 3,
                reason: Reason::ScaleUp,
            },
        ];
        for c in cases {
            let mut st = ScalerState::default();
            let d = st.decide(&c.policy, c.obs.as_ref(), c.current, s(1000));
            assert_eq!((d.desired, d.reason), (c.want, c.reason), "case {:?}: {}", c.name, d.message);
        }
    }

    #[test]
    fn keep_up_counts_are_partition_aware() {
        let uniform = vec![500.0; 12];
        // 1,000 records/s per replica: two 500/s partitions per pod, so 6 pods.
        assert_eq!(keep_up_replicas(&uniform, 1000.0, 12), 6);
        assert_eq!(keep_up_replicas(&uniform, 499.0, 12), 12, "no count keeps up: all of them");
        // One hot partition: whoever owns it may own it with others, so few pods are not enough.
        let skewed = [900.0, 50.0, 50.0, 50.0];
        assert_eq!(keep_up_replicas(&skewed, 1000.0, 4), 2);
        assert_eq!(keep_up_replicas(&skewed, 2000.0, 4), 1);
        assert_eq!(keep_up_replicas(&[0.0; 12], 1000.0, 12), 0, "nothing arrives");
        assert_eq!(keep_up_replicas(&uniform, 0.0, 12), 0, "no capacity known");
    }

    /// A diurnal-peak observation: 12 partitions, `arrival` records/s spread evenly, the whole lag
    /// only awaiting its commit, capacity measured at 1,000 records/s per replica.
    fn keeping_up(arrival: f64, lag: i64) -> Observation {
        Observation {
            total_lag: lag,
            partitions: 12,
            log_end_advanced: true,
            arrival_rates: vec![arrival / 12.0; 12],
            active_partitions: 12,
            capacity: Some(Capacity::Measured(1000.0)),
            awaiting_commit: lag,
            ..Default::default()
        }
    }

    #[test]
    fn lag_that_only_awaits_its_commit_does_not_buy_pods() {
        let p = Policy { max_replicas: 12, even_distribution: true, ..policy() };
        // 3,000 records/s with a 2 s commit delay: a lag of 6,000, which the plain rule (lagThreshold
        // 100) answers with 12 pods. 250/s per partition at 700/s per pod: 2 partitions each, 6 pods.
        let mut st = ScalerState::default();
        let d = st.decide(&p, Some(&keeping_up(3000.0, 6000)), 6, s(100));
        assert_eq!((d.desired, d.reason), (6, Reason::Steady), "{}", d.message);
        assert!(d.message.contains("6 keep up"), "{}", d.message);
        // More arrives: 400/s per partition, one each at 700/s per pod → 12, at once.
        let d = st.decide(&p, Some(&keeping_up(4800.0, 9600)), 6, s(105));
        assert_eq!((d.desired, d.reason), (12, Reason::ScaleUp), "{}", d.message);
    }

    #[test]
    fn the_model_never_asks_for_more_than_the_plain_lag_rule() {
        let p = Policy { max_replicas: 12, ..policy() };
        // A tiny lower bound of the capacity would want every partition covered; the lag (250 at
        // lagThreshold 100) says 3.
        let o = Observation { capacity: Some(Capacity::AtLeast(1.0)), ..keeping_up(1200.0, 250) };
        let d = ScalerState::default().decide(&p, Some(&o), 1, s(100));
        assert_eq!(d.desired, 3, "{}", d.message);
    }

    #[test]
    fn a_backlog_that_drains_soon_needs_no_more_replicas() {
        let p = Policy { max_replicas: 12, ..policy() };
        // 50 records/s per partition: one pod keeps up, so any scale-up is for the backlog alone.
        let backlog = |lag: i64| Observation { awaiting_commit: 0, ..keeping_up(600.0, lag) };
        let mut st = ScalerState::default();
        let d = st.decide(&p, Some(&backlog(1000)), 5, s(100));
        assert_eq!((d.desired, d.reason), (10, Reason::ScaleUp), "a new backlog scales up at once");
        // 5 pods shrink it by 300 in 5 s: gone in about 12 s, within the grace.
        let d = st.decide(&p, Some(&backlog(700)), 5, s(105));
        assert_eq!((d.desired, d.reason), (5, Reason::Draining), "{}", d.message);
        // By 50 in 5 s: 65 s left, too slow.
        let d = st.decide(&p, Some(&backlog(650)), 5, s(110));
        assert_eq!((d.desired, d.reason), (7, Reason::ScaleUp), "{}", d.message);
        // Growing again: scale up.
        let d = st.decide(&p, Some(&backlog(800)), 5, s(115));
        assert_eq!((d.desired, d.reason), (8, Reason::ScaleUp), "{}", d.message);
    }

    #[test]
    fn backlog_growth_during_a_rebalance_is_confirmed_first() {
        let p = Policy { max_replicas: 12, ..policy() };
        let o = |lag: i64, rebalancing: bool| Observation { awaiting_commit: 0, rebalancing, ..keeping_up(600.0, lag) };
        let mut st = ScalerState::default();
        st.decide(&p, Some(&o(300, false)), 3, s(100));
        let d = st.decide(&p, Some(&o(800, true)), 3, s(105));
        assert_eq!((d.desired, d.reason), (3, Reason::ConfirmingScaleUp), "{}", d.message);
        let d = st.decide(&p, Some(&o(900, true)), 3, s(110));
        assert_eq!((d.desired, d.reason), (9, Reason::ScaleUp), "{}", d.message);
    }

    #[test]
    fn even_counts() {
        let p12: Vec<i32> = (1..=12).map(|n| even_count(n, 12)).collect();
        assert_eq!(p12, vec![1, 2, 3, 4, 6, 6, 12, 12, 12, 12, 12, 12]);
        let p10: Vec<i32> = (1..=10).map(|n| even_count(n, 10)).collect();
        assert_eq!(p10, vec![1, 2, 5, 5, 5, 10, 10, 10, 10, 10]);
        assert_eq!(even_count(2, 7), 7, "a prime partition count leaves only 1 or all");
        assert_eq!(even_count(0, 10), 0);
        assert_eq!(even_count(15, 10), 10);
    }

    #[test]
    fn scale_down_is_stabilized_then_stepped() {
        let p = policy();
        let mut st = ScalerState::default();
        assert_eq!(st.decide(&p, Some(&obs(1000, 10)), 1, s(0)).desired, 10);
        // Lag falls: hold for the stabilisation window.
        for t in (5..=60).step_by(5) {
            let d = st.decide(&p, Some(&obs(100, 10)), 10, s(t));
            assert_eq!((d.desired, d.reason), (10, Reason::StabilizingScaleDown), "t={t}");
        }
        // Window passed: at most half per decision.
        let d = st.decide(&p, Some(&obs(100, 10)), 10, s(65));
        assert_eq!((d.desired, d.reason), (5, Reason::ScaleDown));
        let d = st.decide(&p, Some(&obs(100, 10)), 5, s(70));
        assert_eq!((d.desired, d.reason), (2, Reason::ScaleDown));
        let d = st.decide(&p, Some(&obs(100, 10)), 2, s(75));
        assert_eq!((d.desired, d.reason), (1, Reason::ScaleDown));
        let d = st.decide(&p, Some(&obs(100, 10)), 1, s(80));
        assert_eq!((d.desired, d.reason), (1, Reason::Steady));
    }

    #[test]
    fn a_spike_inside_the_window_keeps_the_count() {
        let p = policy();
        let mut st = ScalerState::default();
        st.decide(&p, Some(&obs(400, 10)), 1, s(0));
        st.decide(&p, Some(&obs(100, 10)), 4, s(50));
        // Recommendation of 4 at t=0 is still inside the 60 s window at t=55.
        assert_eq!(st.decide(&p, Some(&obs(100, 10)), 4, s(55)).desired, 4);
        assert_eq!(st.decide(&p, Some(&obs(100, 10)), 4, s(61)).desired, 2);
    }

    #[test]
    fn scale_up_is_immediate_even_during_stabilization() {
        let p = policy();
        let mut st = ScalerState::default();
        st.decide(&p, Some(&obs(500, 10)), 1, s(0));
        st.decide(&p, Some(&obs(100, 10)), 5, s(5));
        let d = st.decide(&p, Some(&obs(900, 10)), 5, s(10));
        assert_eq!((d.desired, d.reason), (9, Reason::ScaleUp));
    }

    #[test]
    fn transient_lag_right_after_scale_down_needs_confirmation() {
        let p = policy();
        let mut st = ScalerState::default();
        st.decide(&p, Some(&obs(800, 10)), 1, s(0));
        assert_eq!(st.decide(&p, Some(&obs(300, 10)), 8, s(65)).desired, 4);
        // The rebalance pause spikes the lag once: hold.
        let d = st.decide(&p, Some(&obs(900, 10)), 4, s(70));
        assert_eq!((d.desired, d.reason), (4, Reason::ConfirmingScaleUp));
        // Back to normal: no scale-up.
        assert_eq!(st.decide(&p, Some(&obs(300, 10)), 4, s(75)).desired, 4);
        // A real rise persists for two polls: scale up on the second.
        assert_eq!(st.decide(&p, Some(&obs(900, 10)), 4, s(80)).desired, 4);
        assert_eq!(st.decide(&p, Some(&obs(900, 10)), 4, s(85)).desired, 9);
        // Outside the settle window scale-up is immediate again.
        assert_eq!(st.decide(&p, Some(&obs(1000, 10)), 9, s(200)).desired, 10);
    }

    #[test]
    fn cooldown_to_zero_needs_idle_for_the_whole_period() {
        let p = policy();
        let mut st = ScalerState::default();
        assert_eq!(st.decide(&p, Some(&obs(50, 10)), 0, s(0)).desired, 1);
        // Idle from t=5; a new record at t=60 restarts the clock.
        for t in (5..=55).step_by(5) {
            assert_eq!(st.decide(&p, Some(&obs(0, 10)), 1, s(t)).desired, 1);
        }
        let busy = Observation { log_end_advanced: true, ..obs(0, 10) };
        assert_eq!(st.decide(&p, Some(&busy), 1, s(60)).desired, 1);
        for t in (65..180).step_by(5) {
            let d = st.decide(&p, Some(&obs(0, 10)), 1, s(t));
            assert_eq!((d.desired, d.reason), (1, Reason::CoolingDown), "t={t}");
        }
        let d = st.decide(&p, Some(&obs(0, 10)), 1, s(180));
        assert_eq!((d.desired, d.reason), (0, Reason::CooldownToZero));
    }

    #[test]
    fn stuck_lag_never_strands_and_keeps_the_pods_that_hold_it() {
        let p = policy();
        let mut st = ScalerState::default();
        st.decide(&p, Some(&obs(600, 10)), 0, s(0));
        // Every partition looks stuck (a crash loop looks like this to commit-based evidence): hold all
        // six pods, long past scaleDownStabilization and cooldownToZero.
        let all_stuck = Observation { stuck_lag: 600, held_partitions: 10, ..obs(600, 10) };
        for t in (5..=600).step_by(5) {
            let d = st.decide(&p, Some(&all_stuck), 6, s(t));
            assert_eq!(d.desired, 6, "t={t}: {d:?}");
        }
        // One stuck partition: scale down to the pod that holds it, never to zero.
        let one_stuck = Observation { stuck_lag: 10, held_partitions: 1, active_partitions: 1, ..obs(10, 10) };
        let mut current = 6;
        for t in (605..=2000).step_by(5) {
            current = st.decide(&p, Some(&one_stuck), current, s(t)).desired;
            assert!(current >= 1, "t={t}: stranded");
        }
        assert_eq!(current, 1);
        // At zero (an operator restart, or a user's manual scale), stuck lag wakes the pipeline.
        let d = ScalerState::default().decide(&p, Some(&one_stuck), 0, s(0));
        assert_eq!((d.desired, d.reason), (1, Reason::Activation), "{}", d.message);
    }

    #[test]
    fn retrying_partitions_hold_their_pods_but_buy_none() {
        let p = policy();
        let mut st = ScalerState::default();
        // 4 pods; 3 partitions' head records are being retried (the downstream fails), lag 3,000.
        let retrying = Observation { retrying_lag: 3000, held_partitions: 3, active_partitions: 3, ..obs(3000, 10) };
        let d = st.decide(&p, Some(&retrying), 4, s(0));
        assert_eq!(d.desired, 4, "no scale-up for lag a retry holds: {}", d.message);
        let mut current = 4;
        for t in (5..=1000).step_by(5) {
            current = st.decide(&p, Some(&retrying), current, s(t)).desired;
        }
        assert_eq!(current, 3, "down to the pods that hold retrying partitions, no further");
    }

    #[test]
    fn lag_on_one_hot_partition_wakes_one_pod() {
        let even = Policy { max_replicas: 12, even_distribution: true, target: Target::LagThreshold(1000), ..policy() };
        let hot = Observation { total_lag: 12_000, partitions: 12, active_partitions: 1, ..Default::default() };
        let d = ScalerState::default().decide(&even, Some(&hot), 0, s(0));
        assert_eq!((d.desired, d.reason), (1, Reason::Activation), "{}", d.message);
        assert!(d.message.contains("only 1 partitions have work"), "{}", d.message);
        // Five busy partitions of 12: at most 5 pods, not the even count 6.
        let five = Observation { active_partitions: 5, ..hot.clone() };
        assert_eq!(ScalerState::default().decide(&even, Some(&five), 1, s(0)).desired, 5);
        // Spread over every partition: even distribution as before (7 → 12).
        let spread = Observation { total_lag: 7_000, active_partitions: 12, ..hot };
        assert_eq!(ScalerState::default().decide(&even, Some(&spread), 1, s(0)).desired, 12);
    }

    #[test]
    fn min_replicas_blocks_zero() {
        let p = Policy { min_replicas: 2, ..policy() };
        let mut st = ScalerState::default();
        for t in (0..1000).step_by(5) {
            assert_eq!(st.decide(&p, Some(&obs(0, 10)), 2, s(t)).desired, 2);
        }
    }

    #[test]
    fn restarted_operator_still_stabilizes() {
        let p = policy();
        let mut st = ScalerState::default();
        let d = st.decide(&p, Some(&obs(100, 10)), 8, s(0));
        assert_eq!((d.desired, d.reason), (8, Reason::StabilizingScaleDown));
    }

    #[test]
    fn from_spec_maps_fields() {
        let spec: ConsumerPipelineSpec = serde_json::from_value(serde_json::json!({
            "source": {"bootstrapServers": ["k:9092"], "topics": ["t"]},
            "processor": {"noop": {}},
            "scaling": {"minReplicas": 1, "maxReplicas": 4, "targetDrainSeconds": 30, "mode": "external"},
            "replicas": 3
        }))
        .unwrap();
        let p = Policy::from_spec(&spec);
        assert_eq!(p.mode, Mode::External(Some(3)));
        assert_eq!(p.target, Target::DrainSeconds { seconds: 30, fallback_threshold: 1000 });
        assert_eq!((p.min_replicas, p.max_replicas), (1, 4));
        assert!(p.even_distribution);
        assert_eq!(p.cooldown_to_zero, s(120));
    }

    /// One observation of a random walk: lag split into scalable, stuck and retrying parts.
    fn arbitrary_observation() -> impl proptest::strategy::Strategy<Value = Observation> {
        use proptest::prelude::*;
        (0i64..50_000, 0i64..2_000, 0i64..2_000, 1i32..24, 0i32..24, any::<bool>(), any::<bool>()).prop_map(
            |(free, stuck, retrying, partitions, active, advanced, rebalancing)| Observation {
                total_lag: free + stuck + retrying,
                stuck_lag: stuck,
                retrying_lag: retrying,
                held_partitions: i32::from(stuck > 0) + i32::from(retrying > 0),
                active_partitions: if free + stuck + retrying > 0 { active.max(1) } else { active },
                partitions,
                log_end_advanced: advanced,
                rebalancing,
                ..Default::default()
            },
        )
    }

    proptest::proptest! {
        /// DESIGN.md §3 "never strand": for every observation and scaler state,
        /// lag > activationLag ∧ ¬suspend ⇒ desired ≥ 1.
        #[test]
        fn never_strands(steps in proptest::collection::vec((arbitrary_observation(), 1u64..400), 1..60),
                         activation in 0i64..500, min in 0i32..2, even: bool, start in 0i32..12) {
            let p = Policy { min_replicas: min, max_replicas: 12, activation_lag: activation, even_distribution: even,
                             ..policy() };
            let mut st = ScalerState::default();
            let (mut current, mut now) = (start, 0u64);
            for (o, dt) in steps {
                now += dt;
                let d = st.decide(&p, Some(&o), current, s(now));
                if o.total_lag > activation {
                    proptest::prop_assert!(d.desired >= 1, "stranded: {o:?} at {current} -> {d:?}");
                }
                current = d.desired;
            }
        }

        #[test]
        fn desired_stays_in_bounds(lag in 0i64..1_000_000, stuck in 0i64..1000, parts in 1i32..64, cur in 0i32..80,
                                   min in 0i32..10, max in 1i32..50, even: bool, t in 0u64..10_000) {
            let max = max.max(min.max(1));
            let p = Policy { min_replicas: min, max_replicas: max, even_distribution: even, ..policy() };
            let mut st = ScalerState::default();
            let o = Observation { total_lag: lag + stuck, stuck_lag: stuck, partitions: parts, ..Default::default() };
            let d = st.decide(&p, Some(&o), cur, s(t));
            let upper = max.min(parts);
            proptest::prop_assert!(d.desired >= 0 && d.desired <= upper, "{d:?}");
            proptest::prop_assert!(d.desired >= min.min(upper), "{d:?}");
        }
    }
}
