//! Pure status computation: conditions per Kubernetes API conventions (`lastTransitionTime` moves
//! only when a condition's status changes; reason/message/observedGeneration are refreshed).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kpipe_api::v1alpha1::{ConsumerPipelineStatus, LagSummary, WorkerSummary, condition};

use crate::stall::StallReason;

/// Something wrong that the user or the cluster must fix: the `Degraded` (and `Ready=False`) condition's
/// reason and message, and the Warning Event that announces it. One variant per kind of cause, so
/// the reconcile's precedence rules match on causes, not on reason strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The spec and its Secrets cannot be turned into children; `reason` is
    /// [`crate::build::ValidationError::reason`] (`InvalidSpec`, `SecretNotFound`, ...).
    InvalidSpec { reason: &'static str, message: String },
    /// A Kubernetes API read this reconcile needs failed (Secrets, child ownership, caches).
    KubernetesApi { message: String },
    /// Same-named children exist that this pipeline does not control (e.g. `Deployment orders-worker`).
    ChildConflict { objects: Vec<String> },
    /// The apiserver refused a child (admission webhook, quota, invalid object).
    ChildApplyFailed { message: String },
    /// Kafka could not be read; `reason` is [`crate::probe::ProbeError::reason`].
    Kafka { reason: &'static str, message: String },
    /// `minReplicas` is above the topics' partition count.
    InsufficientPartitions { min_replicas: i32, partitions: i32 },
    /// Committed offsets vanished while idle and could not be restored ([`crate::keepalive`]).
    OffsetsLost { message: String },
    /// A backlog that does not drain ([`crate::stall`]): the `Stalled` condition; also `Degraded` for
    /// reasons that [`StallReason::degrades`].
    Stalled { reason: StallReason, message: String },
}

impl Problem {
    /// CamelCase reason for conditions, Events and the `reason` metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidSpec { reason, .. } | Self::Kafka { reason, .. } => reason,
            Self::KubernetesApi { .. } => "KubernetesApiError",
            Self::ChildConflict { .. } => "ChildConflict",
            Self::ChildApplyFailed { .. } => "ChildApplyFailed",
            Self::InsufficientPartitions { .. } => "InsufficientPartitions",
            Self::OffsetsLost { .. } => "OffsetsLost",
            Self::Stalled { reason, .. } => reason.as_str(),
        }
    }

    /// A message a user can act on.
    pub fn message(&self) -> String {
        match self {
            Self::InvalidSpec { message, .. }
            | Self::KubernetesApi { message }
            | Self::ChildApplyFailed { message }
            | Self::Kafka { message, .. }
            | Self::OffsetsLost { message }
            | Self::Stalled { message, .. } => message.clone(),
            Self::ChildConflict { objects } => format!(
                "{} already exists and is not controlled by this pipeline; kpipe does not touch it. Rename or \
                 delete it, or rename the pipeline",
                objects.join(" and ")
            ),
            Self::InsufficientPartitions { min_replicas, partitions } => format!(
                "minReplicas is {min_replicas} but the topics have only {partitions} partitions; running {partitions}"
            ),
        }
    }

    /// Whether `other` is the same situation as far as announcing it goes: a stall's message carries moving
    /// counts, so a stall with the same reason is no news; anything else is news when it differs at all.
    pub fn same_news(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Stalled { reason: a, .. }, Self::Stalled { reason: b, .. }) => a == b,
            (a, b) => a == b,
        }
    }
}

/// What the reconcile observed and decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub generation: Option<i64>,
    pub problem: Option<Problem>,
    /// The Deployment exists with our current template.
    pub workers_configured: bool,
    /// Replicas set on the Deployment.
    pub replicas: i32,
    pub ready_replicas: i32,
    /// Replicas the scaler wants.
    pub desired: i32,
    /// Scaler reason and message.
    pub scale_reason: String,
    pub scale_message: String,
    pub selector: String,
    pub group_id: Option<String>,
    /// The last lag measurement (kept from the previous status when this poll failed).
    pub lag: Option<LagSummary>,
    /// When the replica count was last changed (None: keep the previous value).
    pub scaled_at: Option<Time>,
    /// Why the backlog is not draining, if it is not ([`crate::stall`]).
    pub stall: Option<Problem>,
    /// Lag beyond `activationLag` (a backlog the workers should be draining).
    pub backlog: bool,
    /// `spec.suspend`.
    pub suspended: bool,
    /// The worker pods (None: not observed).
    pub workers: Option<WorkerSummary>,
    /// The operator restored vanished committed offsets (which, and why) and no worker has consumed
    /// from them yet.
    pub offsets_restored: Option<String>,
    /// `status.topics` and the TopicRecreated condition ([`crate::topic_identity`]).
    pub topics: crate::topic_identity::ForStatus,
    /// `status.deadLetters` as it is to be written ([`crate::deadletters::for_status`]).
    pub dead_letters: Option<kpipe_api::v1alpha1::DeadLetterSummary>,
}

fn cond(type_: &str, status: bool, reason: &str, message: &str, generation: Option<i64>, now: &Time) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.chars().take(1024).collect(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// Merge new conditions into the previous ones: keep `lastTransitionTime` when the status is
/// unchanged.
pub fn merge_conditions(previous: &[Condition], new: Vec<Condition>) -> Vec<Condition> {
    new.into_iter()
        .map(|mut c| {
            if let Some(old) = previous.iter().find(|o| o.type_ == c.type_)
                && old.status == c.status
            {
                c.last_transition_time = old.last_transition_time.clone();
            }
            c
        })
        .collect()
}

/// The status to write. `now` stamps conditions that change.
pub fn compute(previous: Option<&ConsumerPipelineStatus>, obs: &Observed, now: Time) -> ConsumerPipelineStatus {
    let g = obs.generation;
    let degraded = match &obs.problem {
        Some(p) => cond(condition::DEGRADED, true, p.reason(), &p.message(), g, &now),
        None => cond(condition::DEGRADED, false, "AsExpected", "", g, &now),
    };
    // Ready=True only while the pipeline does its work: never with a stalled backlog, never with a
    // backlog at zero replicas (DESIGN.md §3).
    let lag_total = obs.lag.as_ref().map(|l| l.total).unwrap_or(0);
    let ready = match (&obs.problem, &obs.stall) {
        (Some(p), _) | (None, Some(p)) => cond(condition::READY, false, p.reason(), &p.message(), g, &now),
        (None, None) if !obs.workers_configured => {
            cond(condition::READY, false, "Reconciling", "worker Deployment not applied yet", g, &now)
        }
        (None, None) if obs.replicas == 0 && obs.backlog && obs.suspended => cond(
            condition::READY,
            false,
            "Suspended",
            &format!("suspended with a backlog of {lag_total} records; set spec.suspend to false to drain it"),
            g,
            &now,
        ),
        (None, None) if obs.replicas == 0 && obs.backlog => cond(
            condition::READY,
            false,
            "BacklogAtZero",
            &format!("lag {lag_total} and no worker replicas yet: {}", obs.scale_message),
            g,
            &now,
        ),
        (None, None) if obs.suspended && obs.replicas == 0 => {
            cond(condition::READY, true, "Suspended", "suspended; no backlog", g, &now)
        }
        (None, None) if obs.desired == 0 && obs.replicas == 0 => {
            cond(condition::READY, true, "ScaledToZero", "no lag: no workers needed", g, &now)
        }
        (None, None) if obs.ready_replicas > 0 => cond(
            condition::READY,
            true,
            "WorkersReady",
            &format!("{} of {} workers ready", obs.ready_replicas, obs.replicas),
            g,
            &now,
        ),
        (None, None) => cond(condition::READY, false, "WaitingForWorkers", "no worker is ready yet", g, &now),
    };
    let scaling_now = obs.desired != obs.replicas || obs.ready_replicas != obs.replicas;
    let scaling = cond(
        condition::SCALING,
        scaling_now,
        if obs.scale_reason.is_empty() { "Steady" } else { &obs.scale_reason },
        &if obs.desired != obs.replicas {
            format!("{} → {} replicas: {}", obs.replicas, obs.desired, obs.scale_message)
        } else if scaling_now {
            format!("{} of {} workers ready: {}", obs.ready_replicas, obs.replicas, obs.scale_message)
        } else {
            obs.scale_message.clone()
        },
        g,
        &now,
    );
    let active = if obs.desired > 0 {
        cond(condition::ACTIVE, true, "Active", &format!("{} workers wanted", obs.desired), g, &now)
    } else {
        cond(condition::ACTIVE, false, "ScaledToZero", "no workers wanted", g, &now)
    };
    let stalled = match &obs.stall {
        Some(p) => cond(condition::STALLED, true, p.reason(), &p.message(), g, &now),
        None if obs.backlog && !obs.suspended => {
            cond(condition::STALLED, false, "Draining", &format!("lag {lag_total} is being worked on"), g, &now)
        }
        None => cond(condition::STALLED, false, "NoBacklog", "", g, &now),
    };
    let restored = match &obs.offsets_restored {
        Some(m) => cond(condition::OFFSETS_RESTORED, true, "OffsetsRestored", m, g, &now),
        None => cond(condition::OFFSETS_RESTORED, false, "AsCommitted", "", g, &now),
    };
    let recreated = match &obs.topics.recreated {
        Some(m) => cond(condition::TOPIC_RECREATED, true, crate::topic_identity::TOPIC_RECREATED, m, g, &now),
        None => cond(condition::TOPIC_RECREATED, false, "SameTopic", "", g, &now),
    };
    let prev_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    ConsumerPipelineStatus {
        observed_generation: g,
        conditions: merge_conditions(
            prev_conditions,
            vec![ready, scaling, degraded, active, stalled, restored, recreated],
        ),
        replicas: obs.replicas,
        desired_replicas: obs.desired,
        ready_replicas: obs.ready_replicas,
        selector: Some(obs.selector.clone()),
        group_id: obs.group_id.clone(),
        lag: obs.lag.clone(),
        last_scale_time: obs.scaled_at.clone().or_else(|| previous.and_then(|p| p.last_scale_time.clone())),
        workers: obs.workers.clone().or_else(|| previous.and_then(|p| p.workers.clone())),
        topics: obs.topics.records.clone().unwrap_or_else(|| previous.map(|p| p.topics.clone()).unwrap_or_default()),
        dead_letters: obs.dead_letters.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    fn observed() -> Observed {
        Observed {
            generation: Some(1),
            workers_configured: true,
            replicas: 2,
            ready_replicas: 2,
            desired: 2,
            scale_reason: "Steady".into(),
            selector: "a=b".into(),
            ..Default::default()
        }
    }

    fn status_of<'a>(s: &'a ConsumerPipelineStatus, type_: &str) -> &'a Condition {
        s.condition(type_).unwrap()
    }

    #[test]
    fn condition_table() {
        type Want = [(&'static str, &'static str, &'static str); 4];
        let cases: Vec<(&str, Observed, Want)> = vec![
            (
                "healthy",
                observed(),
                [
                    ("Ready", "True", "WorkersReady"),
                    ("Scaling", "False", "Steady"),
                    ("Degraded", "False", "AsExpected"),
                    ("Active", "True", "Active"),
                ],
            ),
            (
                "scaled to zero",
                Observed { replicas: 0, ready_replicas: 0, desired: 0, ..observed() },
                [
                    ("Ready", "True", "ScaledToZero"),
                    ("Scaling", "False", "Steady"),
                    ("Degraded", "False", "AsExpected"),
                    ("Active", "False", "ScaledToZero"),
                ],
            ),
            (
                "scaling up",
                Observed { desired: 4, scale_reason: "ScaledUp".into(), ..observed() },
                [
                    ("Ready", "True", "WorkersReady"),
                    ("Scaling", "True", "ScaledUp"),
                    ("Degraded", "False", "AsExpected"),
                    ("Active", "True", "Active"),
                ],
            ),
            (
                "waking from zero",
                Observed { replicas: 1, ready_replicas: 0, desired: 1, scale_reason: "Activated".into(), ..observed() },
                [
                    ("Ready", "False", "WaitingForWorkers"),
                    ("Scaling", "True", "Activated"),
                    ("Degraded", "False", "AsExpected"),
                    ("Active", "True", "Active"),
                ],
            ),
            (
                "degraded",
                Observed {
                    problem: Some(Problem::InvalidSpec {
                        reason: "SecretNotFound",
                        message: "Secret \"x\" not found".into(),
                    }),
                    ..observed()
                },
                [
                    ("Ready", "False", "SecretNotFound"),
                    ("Scaling", "False", "Steady"),
                    ("Degraded", "True", "SecretNotFound"),
                    ("Active", "True", "Active"),
                ],
            ),
        ];
        for (name, obs, want) in cases {
            let s = compute(None, &obs, t(100));
            for (type_, status, reason) in want {
                let c = status_of(&s, type_);
                assert_eq!((c.status.as_str(), c.reason.as_str()), (status, reason), "{name}: {type_}");
                assert_eq!(c.observed_generation, Some(1));
            }
        }
    }

    #[test]
    fn ready_is_never_true_with_a_backlog_that_does_not_drain() {
        let lag = |total| Some(LagSummary { total, ..Default::default() });
        let stall =
            Some(Problem::Stalled { reason: StallReason::CrashLoopingWorkers, message: "2 of 2 crash-looping".into() });
        type Case = (&'static str, Observed, (&'static str, &'static str), (&'static str, &'static str));
        let cases: Vec<Case> = vec![
            (
                "stalled",
                Observed { stall: stall.clone(), backlog: true, lag: lag(500), ..observed() },
                ("False", "CrashLoopingWorkers"),
                ("True", "CrashLoopingWorkers"),
            ),
            (
                "draining",
                Observed { backlog: true, lag: lag(500), ..observed() },
                ("True", "WorkersReady"),
                ("False", "Draining"),
            ),
            (
                "backlog at zero replicas",
                Observed { backlog: true, lag: lag(500), replicas: 0, ready_replicas: 0, desired: 1, ..observed() },
                ("False", "BacklogAtZero"),
                ("False", "Draining"),
            ),
            (
                "suspended with a backlog",
                Observed {
                    backlog: true,
                    suspended: true,
                    lag: lag(110),
                    replicas: 0,
                    ready_replicas: 0,
                    desired: 0,
                    ..observed()
                },
                ("False", "Suspended"),
                ("False", "NoBacklog"),
            ),
            (
                "offsets restored while idle",
                Observed {
                    lag: lag(0),
                    replicas: 0,
                    ready_replicas: 0,
                    desired: 0,
                    offsets_restored: Some("restored t/0 (was 37, found none)".into()),
                    ..observed()
                },
                ("True", "ScaledToZero"),
                ("False", "NoBacklog"),
            ),
            (
                "at zero without backlog",
                Observed { lag: lag(0), replicas: 0, ready_replicas: 0, desired: 0, ..observed() },
                ("True", "ScaledToZero"),
                ("False", "NoBacklog"),
            ),
        ];
        for (name, obs, ready, stalled) in cases {
            let s = compute(None, &obs, t(100));
            let r = status_of(&s, "Ready");
            assert_eq!((r.status.as_str(), r.reason.as_str()), ready, "{name}: Ready");
            let st = status_of(&s, "Stalled");
            assert_eq!((st.status.as_str(), st.reason.as_str()), stalled, "{name}: Stalled");
            let restored = status_of(&s, "OffsetsRestored");
            assert_eq!(restored.status == "True", obs.offsets_restored.is_some(), "{name}: OffsetsRestored");
        }
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let first = compute(None, &observed(), t(100));
        // Same statuses, new message: time kept, whole status identical when nothing else changed.
        let again = compute(Some(&first), &observed(), t(200));
        assert_eq!(again, first, "identical observation → identical status (no rewrite)");
        let scaling = compute(Some(&first), &Observed { desired: 3, ..observed() }, t(300));
        assert_eq!(status_of(&scaling, "Scaling").last_transition_time, t(300));
        assert_eq!(status_of(&scaling, "Ready").last_transition_time, t(100));
        let bad =
            Observed { problem: Some(Problem::Kafka { reason: "TopicNotFound", message: "m".into() }), ..observed() };
        let degraded = compute(Some(&scaling), &bad, t(400));
        assert_eq!(status_of(&degraded, "Degraded").last_transition_time, t(400));
        let still = compute(
            Some(&degraded),
            &Observed {
                problem: Some(Problem::Kafka { reason: "BrokerUnreachable", message: "n".into() }),
                ..observed()
            },
            t(500),
        );
        let d = status_of(&still, "Degraded");
        assert_eq!((d.reason.as_str(), d.last_transition_time.clone()), ("BrokerUnreachable", t(400)));
        let healed = compute(Some(&still), &observed(), t(600));
        assert_eq!(status_of(&healed, "Degraded").status, "False");
        assert_eq!(status_of(&healed, "Degraded").last_transition_time, t(600));
    }

    #[test]
    fn last_scale_time_is_kept_until_the_next_scale() {
        let first = compute(None, &Observed { scaled_at: Some(t(10)), ..observed() }, t(10));
        let later = compute(Some(&first), &observed(), t(50));
        assert_eq!(later.last_scale_time, Some(t(10)));
    }
}
