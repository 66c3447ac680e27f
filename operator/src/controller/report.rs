//! Step 5, report: what the reconcile tells — the status (conditions with observedGeneration), Events for
//! decisions and for problems that are news, and the pipeline's metrics. [`assess`] is pure (table-tested
//! with the plan); [`publish`] does the writes.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kpipe_api::v1alpha1::{ConsumerPipeline, ConsumerPipelineStatus, DeadLetterSummary};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::observe::Children;
use super::plan::{Plan, PlannedEvent};
use super::{PipelineState, Shared};
use crate::build;
use crate::metrics::PipelineGauges;
use crate::stall::{self, Stall, StallInputs};
use crate::status::{self, Observed, Problem};
use crate::topic_identity::TopicState;
use crate::workers::WorkerPods;

/// The shortest time without a commit before a backlog counts as stalled.
pub const MIN_STALL_WINDOW: Duration = Duration::from_secs(30);
/// How long new worker pods may take to become ready (scheduling, image pulls) before a backlog with no
/// ready worker is `NoCapacity`.
pub const STARTUP_GRACE: Duration = Duration::from_secs(120);

/// What [`assess`] looks at.
pub struct ReportInputs<'a> {
    pub cp: &'a ConsumerPipeline,
    pub plan: Plan,
    /// The apply step's result (`None`: no child was to be touched).
    pub applied: Option<Result<(), Problem>>,
    pub children: &'a Children,
    pub workers: &'a WorkerPods,
    pub stuck_after_polls: u32,
    /// Wall clock (Unix ms, and as a timestamp for `lastScaleTime`).
    pub wall_ms: u64,
    pub wall: jiff::Timestamp,
    /// `status.deadLetters` ([`crate::deadletters::for_status`]).
    pub dead_letters: Option<DeadLetterSummary>,
}

/// What to tell, and when to look again.
#[derive(Debug)]
pub struct Report {
    pub problem: Option<Problem>,
    pub stall: Option<Stall>,
    /// The plan's Events, then the scale, problem and stall Events, in that order.
    pub events: Vec<PlannedEvent>,
    pub observed: Observed,
    /// "up" or "down" when the replica count changed.
    pub scaled: Option<&'static str>,
    /// `None`: nothing measured (the gauges keep their values).
    pub gauges: Option<PipelineGauges>,
    /// The problem is new (or gone): counted in `kpipe_operator_reconcile_errors_total`.
    pub problem_is_news: bool,
    /// Partitions whose vanished offsets were restored this poll.
    pub restored: usize,
    pub requeue: Duration,
}

/// Turn the plan and the apply result into status, Events and metrics. Updates what `state` remembers
/// (the last replica count set, problem and stall announced, failure backoff).
pub fn assess(i: ReportInputs<'_>, state: &mut PipelineState) -> Report {
    let spec = &i.cp.spec;
    let plan = i.plan;
    let restored = plan.restored;
    let decision = &plan.decision;
    let mut problem = plan.problem;
    let mut events = plan.events;
    let configured = matches!(i.applied, Some(Ok(())));
    if configured {
        state.last_desired = Some(decision.desired);
    }
    if let Some(Err(p)) = i.applied {
        problem = Some(p);
    }
    let previous_replicas = i.children.replicas().unwrap_or(0);
    let replicas = if configured { decision.desired } else { previous_replicas };
    let ready = i.children.ready();
    let snapshot = plan.snapshot.as_ref();

    // A restore is news until a ready worker has committed from the restored positions.
    if ready > 0 && snapshot.is_some_and(|s| s.no_progress_for.is_zero()) {
        state.offsets_restored = None;
    }
    // Readiness from the Deployment too: a Pod cache that lags (or an install without Pod access) must not
    // make running workers look absent.
    let stall_workers = WorkerPods { ready: i.workers.ready.max(ready), ..i.workers.clone() };
    let poll: Duration = spec.scaling.poll_interval.into();
    let stall = snapshot.and_then(|snap| {
        stall::assess(&StallInputs {
            snapshot: snap,
            workers: &stall_workers,
            replicas,
            suspended: spec.suspend,
            activation_lag: spec.scaling.activation_lag,
            window: poll.saturating_mul(i.stuck_after_polls.max(1)).max(MIN_STALL_WINDOW),
            startup_grace: STARTUP_GRACE,
            wall_ms: i.wall_ms,
        })
    });
    // A downstream that is down (circuit open) or a dead-letter topic that refuses writes is something the
    // user must fix: Degraded with the stall's reason.
    if let Some(st) = stall.as_ref().filter(|st| st.reason.degrades())
        && problem.is_none()
    {
        problem = Some(Problem::Stalled { reason: st.reason, message: st.message.clone() });
    }

    let scaled = (configured && replicas != previous_replicas).then_some(if replicas > previous_replicas {
        "up"
    } else {
        "down"
    });
    if scaled.is_some() {
        events.push(PlannedEvent::normal(decision.reason.as_str(), decision.message.clone(), "Scale"));
    }
    let news = match (&problem, &state.last_problem) {
        (Some(a), Some(b)) => !a.same_news(b),
        (a, b) => a.is_some() != b.is_some(),
    };
    if news {
        events.push(match &problem {
            Some(p) => PlannedEvent::warning(p.reason(), p.message(), "Reconcile"),
            None => PlannedEvent::normal("Recovered", "pipeline is healthy again".into(), "Reconcile"),
        });
    }
    state.last_problem = problem.clone();
    let stall_reason = stall.as_ref().map(|st| st.reason);
    if stall_reason != state.last_stall {
        match &stall {
            // Degrading reasons got their Warning Event as the pipeline's problem.
            Some(st) if st.reason.degrades() => {}
            Some(st) => events.push(PlannedEvent::warning(st.reason.as_str(), st.message.clone(), "Stall")),
            None if snapshot.is_some() => {
                let lag = snapshot.map(|s| s.total_lag).unwrap_or(0);
                events.push(PlannedEvent::normal("Draining", format!("backlog moving again (lag {lag})"), "Stall"));
            }
            None => {}
        }
        if stall.is_some() || snapshot.is_some() {
            state.last_stall = stall_reason;
        }
    }

    let prev_status = i.cp.status.as_ref();
    let observed_lag = snapshot.map(|s| s.summary()).or_else(|| prev_status.and_then(|s| s.lag.clone()));
    // From the lag status shows (the last measurement while a poll fails): never Ready=True beside a backlog.
    let backlog = observed_lag.as_ref().is_some_and(|l| l.total > spec.scaling.activation_lag);
    let name = i.cp.name_any();
    let observed = Observed {
        generation: i.cp.metadata.generation,
        problem: problem.clone(),
        workers_configured: configured || i.children.deployment.is_some(),
        replicas,
        ready_replicas: ready,
        desired: decision.desired,
        scale_reason: decision.reason.as_str().into(),
        scale_message: decision.message.clone(),
        selector: build::selector_string(&name),
        group_id: Some(spec.source.effective_group_id(&i.cp.namespace().unwrap_or_default(), &name)),
        lag: observed_lag,
        scaled_at: scaled.map(|_| Time(i.wall)),
        stall: stall.as_ref().map(|st| Problem::Stalled { reason: st.reason, message: st.message.clone() }),
        offsets_restored: state.offsets_restored.clone(),
        topics: state.topics.for_status(&state.offsets_book, prev_status),
        backlog,
        suspended: spec.suspend,
        workers: Some(i.workers.summary()),
        dead_letters: i.dead_letters,
    };
    let gauges = PipelineGauges {
        worker_restarts: i.workers.restarts,
        crash_looping_workers: i.workers.crash_looping,
        snapshot: plan.snapshot.clone(),
        stall: snapshot.map(|_| stall_reason),
        desired_replicas: decision.desired,
        replicas,
    };
    // Next poll: the poll interval, or back off while Kafka or a Secret is the problem.
    let requeue = if problem.is_some() {
        state.failures = state.failures.saturating_add(1);
        let backoff = poll.saturating_mul(1u32 << state.failures.min(4)).min(Duration::from_secs(60));
        if snapshot.is_some() { poll } else { backoff }
    } else {
        state.failures = 0;
        poll
    };
    Report { problem, stall, events, observed, scaled, gauges: Some(gauges), problem_is_news: news, restored, requeue }
}

/// One `kpipe_operator_pipeline_condition` series: (type, status, reason).
pub type ConditionSeries = (String, String, String);

/// The condition series of a pipeline's status (pure): one per condition, its current status and reason.
pub fn condition_series(status: Option<&ConsumerPipelineStatus>) -> Vec<ConditionSeries> {
    status
        .map(|s| s.conditions.iter().map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone())).collect())
        .unwrap_or_default()
}

/// Publish the report: Events (each also logged), metrics, and the status when it changed (server-side
/// apply of `status` with the operator's field manager). Events and the status are leader-fenced. A failed
/// status write is the reconcile's error (there is nowhere else to say it).
pub async fn publish(
    shared: &Shared,
    cp: &ConsumerPipeline,
    report: &Report,
    topics: &mut TopicState,
) -> Result<(), kube::Error> {
    let (ns, name) = (cp.namespace().unwrap_or_default(), cp.name_any());
    let oref = cp.object_ref(&());
    for ev in &report.events {
        match ev.type_ {
            EventType::Warning => warn!(reason = ev.reason, "{}", ev.note),
            EventType::Normal => info!(reason = ev.reason, "{}", ev.note),
        }
        shared.event(&oref, ev.type_, ev.reason, ev.note.clone(), ev.action).await;
    }
    if report.restored > 0 {
        shared.keeper.record_restored(&ns, &name, report.restored);
    }
    if let Some(direction) = report.scaled {
        shared.metrics.record_scale(&ns, &name, direction);
    }
    if let Some(p) = report.problem.as_ref().filter(|_| report.problem_is_news) {
        shared.metrics.record_problem(p.reason());
    }
    if let Some(g) = &report.gauges {
        shared.metrics.set_pipeline(&ns, &name, g);
    }

    let prev_status = cp.status.as_ref();
    let new_status = status::compute(prev_status, &report.observed, Time(jiff::Timestamp::now()));
    shared.metrics.set_conditions(&ns, &name, &condition_series(Some(&new_status)));
    shared.metrics.pipeline_suspended.with_label_values(&[&ns, &name]).set(i64::from(cp.spec.suspend));
    let unchanged = prev_status == Some(&new_status);
    if !unchanged && shared.fence.may_act() {
        let api: Api<ConsumerPipeline> = Api::namespaced(shared.client.clone(), &ns);
        let patch = |status: &ConsumerPipelineStatus| {
            Patch::Apply(serde_json::json!({
                "apiVersion": "kpipe.io/v1alpha1",
                "kind": "ConsumerPipeline",
                "status": status,
            }))
        };
        let pp = PatchParams::apply(&shared.settings.field_manager).force();
        // An apply that omits a field removes it only when this manager owns it: `deadLetters` written under the
        // dead-letter reader's former field manager (`kpipe-operator-dead-letters`) is taken over, then dropped.
        if let (Some(old), None) = (prev_status.and_then(|p| p.dead_letters.as_ref()), &new_status.dead_letters) {
            let take = ConsumerPipelineStatus { dead_letters: Some(old.clone()), ..new_status.clone() };
            api.patch_status(&name, &pp, &patch(&take)).await?;
        }
        let mut written = api.patch_status(&name, &pp, &patch(&new_status)).await;
        // An installed CRD older than this operator refuses the whole apply for status.topics: write without them.
        if let Some(without) = topics.without_topics_if_refused(&written, &new_status) {
            written = api.patch_status(&name, &pp, &patch(&without)).await;
        }
        written?;
    }
    Ok(())
}

/// The status for a reconcile that could not get as far as a plan (the children cannot be read): the
/// previous status with `problem` as Degraded/Ready=False, so `kubectl get cpl` says why.
pub fn blocked(cp: &ConsumerPipeline, problem: Problem, state: &mut PipelineState) -> Report {
    let prev = cp.status.as_ref();
    let name = cp.name_any();
    let news = state.last_problem.as_ref().is_none_or(|b| !problem.same_news(b));
    state.last_problem = Some(problem.clone());
    state.failures = state.failures.saturating_add(1);
    let poll: Duration = cp.spec.scaling.poll_interval.into();
    let observed = Observed {
        generation: cp.metadata.generation,
        problem: Some(problem.clone()),
        workers_configured: prev.is_some_and(|s| s.replicas > 0 || s.ready_replicas > 0),
        replicas: prev.map_or(0, |s| s.replicas),
        ready_replicas: prev.map_or(0, |s| s.ready_replicas),
        desired: prev.map_or(0, |s| s.desired_replicas),
        scale_reason: "ProbeUnavailable".into(),
        scale_message: "children cannot be read".into(),
        selector: build::selector_string(&name),
        group_id: Some(cp.spec.source.effective_group_id(&cp.namespace().unwrap_or_default(), &name)),
        lag: prev.and_then(|s| s.lag.clone()),
        dead_letters: prev.and_then(|s| s.dead_letters.clone()),
        backlog: prev.and_then(|s| s.lag.as_ref()).is_some_and(|l| l.total > cp.spec.scaling.activation_lag),
        suspended: cp.spec.suspend,
        offsets_restored: state.offsets_restored.clone(),
        ..Default::default()
    };
    let events =
        if news { vec![PlannedEvent::warning(problem.reason(), problem.message(), "Reconcile")] } else { vec![] };
    Report {
        problem: Some(problem),
        stall: None,
        events,
        observed,
        scaled: None,
        gauges: None,
        problem_is_news: news,
        restored: 0,
        requeue: poll.saturating_mul(1u32 << state.failures.min(4)).min(Duration::from_secs(60)),
    }
}
