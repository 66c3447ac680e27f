//! Step 3, plan: a pure function from what the reconcile observed to what it should do — the scaling
//! decision, which children to write, the problem to report and the Events to raise before anything is
//! written. It mutates only the pipeline's in-memory [`PipelineState`] (lag history, scaler, what was
//! already announced), never the cluster, so every combination of faults is a table test.

use std::time::Duration;

use kpipe_api::v1alpha1::ConsumerPipelineSpec;
use kube::runtime::events::EventType;
use tracing::debug;

use super::PipelineState;
use super::observe::{Children, KafkaObservation, Ownership};
use crate::build::ValidatedPipeline;
use crate::keepalive::Lost;
use crate::lag::{Consumers, LagTracker, Snapshot};
use crate::scaler::{Decision, Policy, Reason};
use crate::status::Problem;

/// How long a transient probe state (a group coordinator being set up) may last before it is Degraded.
pub const TRANSIENT_GRACE: Duration = Duration::from_secs(60);

/// An Event to publish on the pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    pub type_: EventType,
    pub reason: &'static str,
    pub note: String,
    /// What the operator was doing (the Event's `action`).
    pub action: &'static str,
}

impl PlannedEvent {
    pub fn warning(reason: &'static str, note: String, action: &'static str) -> Self {
        Self { type_: EventType::Warning, reason, note, action }
    }

    pub fn normal(reason: &'static str, note: String, action: &'static str) -> Self {
        Self { type_: EventType::Normal, reason, note, action }
    }
}

/// Which children to server-side apply (the Deployment only after the ConfigMap succeeded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Writes {
    pub config_map: bool,
    pub deployment: bool,
}

/// What [`plan`] looks at.
pub struct PlanInputs<'a> {
    pub spec: &'a ConsumerPipelineSpec,
    /// The pipeline ready to build children from, or why there is none (a Secret read failed, the spec or its
    /// Secrets are invalid).
    pub validated: Result<&'a ValidatedPipeline, Problem>,
    pub kafka: KafkaObservation,
    pub children: &'a Children,
    pub ownership: &'a Ownership,
    /// The replica count in force: this operator's last decision, else the Deployment's.
    pub current: i32,
    pub consumers: Consumers,
    /// Operator clock.
    pub now: Duration,
    /// Wall clock, Unix milliseconds.
    pub wall_ms: u64,
    /// `--stuck-after-polls`.
    pub stuck_after_polls: u32,
}

/// What to do this reconcile, before writing anything.
#[derive(Debug)]
pub struct Plan {
    /// The problem status reports (the apply step may still replace it with `ChildApplyFailed`).
    pub problem: Option<Problem>,
    pub decision: Decision,
    /// This poll's lag measurement (`None` when Kafka was not read).
    pub snapshot: Option<Snapshot>,
    /// `None`: touch no child (invalid spec, a conflict, ownership unknown).
    pub writes: Option<Writes>,
    pub events: Vec<PlannedEvent>,
    /// Partitions whose vanished offsets were restored this poll (for the metric).
    pub restored: usize,
}

/// Decide. Problem precedence, most important first: a child conflict (unless ownership itself could not be
/// read, then that API error); an API error reading ownership when nothing else is wrong; a spec that
/// cannot be applied (or its Secrets unreadable); then Kafka: too few partitions for `minReplicas`,
/// offsets lost, or the probe's error (a transient one only after [`TRANSIENT_GRACE`]).
pub fn plan(i: PlanInputs<'_>, state: &mut PipelineState) -> Plan {
    let mut events = Vec::new();
    let mut problem = None;
    let mut snapshot = None;
    let mut restored = 0;
    match (&i.validated, i.kafka) {
        (Err(p), _) => problem = Some(p.clone()),
        (Ok(_), KafkaObservation::NotProbed) => {}
        (Ok(_), KafkaObservation::Probed { offsets, tended }) => {
            let list = |l: &[Lost]| l.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            if !tended.restored.is_empty() {
                restored = tended.restored.len();
                let list = list(&tended.restored);
                events.push(PlannedEvent::warning(
                    "OffsetsRestored",
                    format!("committed offsets vanished while the pipeline was idle; restored the recorded positions: {list}"),
                    "RestoreOffsets",
                ));
                state.offsets_restored =
                    Some(format!("committed offsets vanished while idle; restored the recorded positions: {list}"));
            }
            if !tended.not_restored.is_empty() {
                let error = tended.error.as_ref().map(ToString::to_string).unwrap_or_default();
                problem = Some(Problem::OffsetsLost {
                    message: format!(
                        "committed offsets vanished while the pipeline was idle and could not be restored ({error}): {}",
                        list(&tended.not_restored)
                    ),
                });
            } else if let Some(e) = &tended.error {
                debug!(error = %e, "idle offset refresh failed; retried next poll");
            }
            let tracker =
                state.tracker.get_or_insert_with(|| LagTracker::new(i.stuck_after_polls, Duration::from_secs(60)));
            let snap = tracker.update(&offsets, i.spec.source.start_offset, i.consumers, i.now, i.wall_ms);
            // One Event per new out-of-range situation (issue 13, lifecycle.rs), not one per poll while it lasts.
            let out_of_range = crate::lifecycle::out_of_range_message(&offsets);
            if out_of_range != state.last_out_of_range
                && let Some(msg) = out_of_range.clone()
            {
                events.push(PlannedEvent::warning(crate::lifecycle::OFFSET_OUT_OF_RANGE, msg, "Reconcile"));
            }
            state.last_out_of_range = out_of_range;
            if snap.partitions < i.spec.scaling.min_replicas {
                problem = Some(Problem::InsufficientPartitions {
                    min_replicas: i.spec.scaling.min_replicas,
                    partitions: snap.partitions,
                });
            }
            state.transient_since = None;
            snapshot = Some(snap);
        }
        (Ok(_), KafkaObservation::Failed(e)) => {
            // A coordinator that is still being set up is normal for a while: a Normal Event once, and
            // Degraded only past TRANSIENT_GRACE.
            let since = *state.transient_since.get_or_insert(i.now);
            if !e.is_transient() || i.now.saturating_sub(since) >= TRANSIENT_GRACE {
                problem = Some(Problem::Kafka { reason: e.reason(), message: e.to_string() });
            } else if since == i.now {
                let note = format!("{e}; waiting up to {}s", TRANSIENT_GRACE.as_secs());
                events.push(PlannedEvent::normal(e.reason(), note, "Probe"));
            }
            if !e.is_transient() {
                state.transient_since = None;
            }
        }
    }
    let decision = match &i.validated {
        Err(_) => {
            Decision { desired: i.current, reason: Reason::ProbeUnavailable, message: "spec cannot be applied".into() }
        }
        Ok(_) => {
            let obs = snapshot.as_ref().map(Snapshot::observation);
            let decision = state.scaler.decide(&Policy::from_spec(i.spec), obs.as_ref(), i.current, i.now);
            // A recreated topic holds the workers at zero until the group's offsets are moved (issue 13).
            crate::topic_identity::hold(decision, &state.topics)
        }
    };

    // Ownership: an unreadable owner is reported only when nothing else is; a conflict wins over anything
    // but an API error.
    let mut conflicts = Vec::new();
    for (kind, owned) in [("Deployment", &i.ownership.deployment), ("ConfigMap", &i.ownership.config_map)] {
        match owned {
            Ok(true) => {}
            Ok(false) => conflicts.push(format!("{kind} {}", i.children.name)),
            Err(p) => {
                problem.get_or_insert_with(|| p.clone());
            }
        }
    }
    if !conflicts.is_empty() && !matches!(problem, Some(Problem::KubernetesApi { .. })) {
        problem = Some(Problem::ChildConflict { objects: conflicts });
    }

    let writes = match &i.validated {
        Ok(v) if i.ownership.both_ours() => {
            let hash = Some(v.config_hash.as_str());
            let cm = i.children.config_map.as_ref();
            let dep = i.children.deployment.as_ref();
            Some(Writes {
                config_map: cm.is_none_or(|c| c.config_hash.as_deref() != hash),
                deployment: dep
                    .is_none_or(|d| d.config_hash.as_deref() != hash || d.replicas != Some(decision.desired)),
            })
        }
        _ => None,
    };
    Plan { problem, decision, snapshot, writes, events, restored }
}
