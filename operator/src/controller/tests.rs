//! Table tests of the plan and report steps: every ownership/failure combination of issue 14 (a user's
//! child, an unreachable broker, an invalid spec, unreadable Secrets or owners, a denied apply).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kpipe_api::v1alpha1::ConsumerPipeline;
use kube::runtime::events::EventType;

use super::PipelineState;
use super::observe::{ChildView, Children, KafkaObservation, Ownership, controlled_by};
use super::plan::{self, Plan, PlanInputs, TRANSIENT_GRACE, Writes};
use super::report::{self, ReportInputs};
use crate::build::{self, ValidatedPipeline, WorkerDefaults};
use crate::keepalive::{Lost, Tended};
use crate::lag::{Consumers, PartitionOffsets};
use crate::probe::ProbeError;
use crate::status::{self, Problem};
use crate::workers::WorkerPods;

const UID: &str = "11111111-2222-3333-4444-555555555555";

fn pipeline(extra_scaling: serde_json::Value) -> ConsumerPipeline {
    let mut scaling = serde_json::json!({"minReplicas": 0, "maxReplicas": 4});
    if let (Some(s), Some(extra)) = (scaling.as_object_mut(), extra_scaling.as_object()) {
        s.extend(extra.clone());
    }
    let mut cp: ConsumerPipeline = serde_json::from_value(serde_json::json!({
        "apiVersion": "kpipe.io/v1alpha1",
        "kind": "ConsumerPipeline",
        "metadata": {"name": "orders", "namespace": "shop", "uid": UID, "generation": 3},
        "spec": {
            "source": {"bootstrapServers": ["kafka:9092"], "topics": ["orders"]},
            "processor": {"noop": {}},
            "scaling": scaling,
        }
    }))
    .unwrap();
    cp.metadata.uid = Some(UID.into());
    cp
}

fn validated(cp: &ConsumerPipeline) -> ValidatedPipeline {
    build::validate(cp, &BTreeMap::new(), &BTreeMap::new(), &WorkerDefaults::default()).unwrap()
}

fn offsets(lag_per_partition: &[i64]) -> Vec<PartitionOffsets> {
    lag_per_partition
        .iter()
        .enumerate()
        .map(|(p, lag)| PartitionOffsets {
            topic: "orders".into(),
            partition: p as i32,
            log_start: 0,
            log_end: 1000,
            committed: Some(1000 - lag),
            ..Default::default()
        })
        .collect()
}

fn probed(lag_per_partition: &[i64]) -> KafkaObservation {
    KafkaObservation::Probed { offsets: offsets(lag_per_partition), tended: Tended::default() }
}

fn unreachable() -> KafkaObservation {
    KafkaObservation::Failed(ProbeError::BrokerUnreachable { servers: "kafka:9092".into(), detail: "refused".into() })
}

fn ours() -> OwnerReference {
    OwnerReference { controller: Some(true), uid: UID.into(), ..Default::default() }
}

/// A child cached as ours, carrying `hash` and (Deployment) `replicas`.
fn our_child(hash: &str, replicas: Option<i32>) -> ChildView {
    ChildView { replicas, ready: replicas.unwrap_or(0), config_hash: Some(hash.into()), owners: vec![ours()] }
}

fn api_error() -> Problem {
    Problem::KubernetesApi { message: "reading ConfigMap shop/orders-worker: 503".into() }
}

/// Plan inputs for `cp` at operator time `now_secs` (everything else at rest: no ready consumer, wall clock 0).
fn inputs<'a>(
    cp: &'a ConsumerPipeline,
    validated: Result<&'a ValidatedPipeline, Problem>,
    kafka: KafkaObservation,
    children: &'a Children,
    ownership: &'a Ownership,
    current: i32,
    now_secs: u64,
) -> PlanInputs<'a> {
    PlanInputs {
        spec: &cp.spec,
        validated,
        kafka,
        children,
        ownership,
        current,
        consumers: Consumers::default(),
        now: Duration::from_secs(now_secs),
        wall_ms: 0,
        stuck_after_polls: 6,
    }
}

struct Case {
    name: &'static str,
    /// `None`: the spec is valid; `Some(p)`: dereference/validation failed with `p`.
    invalid: Option<Problem>,
    kafka: fn() -> KafkaObservation,
    deployment: Result<bool, Problem>,
    config_map: Result<bool, Problem>,
    want_reason: Option<&'static str>,
    want_writes: Option<Writes>,
}

fn run(case: Case, state: &mut PipelineState) -> Plan {
    let cp = pipeline(serde_json::json!({}));
    let v = validated(&cp);
    let children = Children { name: "orders-worker".into(), ..Default::default() };
    let ownership = Ownership { deployment: case.deployment, config_map: case.config_map };
    let validated = match &case.invalid {
        None => Ok(&v),
        Some(p) => Err(p.clone()),
    };
    plan::plan(inputs(&cp, validated, (case.kafka)(), &children, &ownership, 0, 100), state)
}

#[test]
fn conflicts_win_over_every_other_failure_and_nothing_is_written() {
    let invalid = || Some(Problem::InvalidSpec { reason: "InvalidSpec", message: "bad".into() });
    let both = Some(Writes { config_map: true, deployment: true });
    let cases = vec![
        Case {
            name: "healthy, nothing exists yet",
            invalid: None,
            kafka: || probed(&[0, 0]),
            deployment: Ok(true),
            config_map: Ok(true),
            want_reason: None,
            want_writes: both,
        },
        Case {
            name: "user's ConfigMap, broker reachable",
            invalid: None,
            kafka: || probed(&[0, 0]),
            deployment: Ok(true),
            config_map: Ok(false),
            want_reason: Some("ChildConflict"),
            want_writes: None,
        },
        Case {
            name: "user's ConfigMap, broker unreachable",
            invalid: None,
            kafka: unreachable,
            deployment: Ok(true),
            config_map: Ok(false),
            want_reason: Some("ChildConflict"),
            want_writes: None,
        },
        Case {
            name: "user's Deployment, broker unreachable",
            invalid: None,
            kafka: unreachable,
            deployment: Ok(false),
            config_map: Ok(true),
            want_reason: Some("ChildConflict"),
            want_writes: None,
        },
        Case {
            name: "user's Deployment, invalid spec",
            invalid: invalid(),
            kafka: || KafkaObservation::NotProbed,
            deployment: Ok(false),
            config_map: Ok(true),
            want_reason: Some("ChildConflict"),
            want_writes: None,
        },
        Case {
            name: "owner unreadable beside a conflict: the API error (the conflict may be a misread)",
            invalid: None,
            kafka: || probed(&[0]),
            deployment: Ok(false),
            config_map: Err(api_error()),
            want_reason: Some("KubernetesApiError"),
            want_writes: None,
        },
        Case {
            name: "owner unreadable, otherwise healthy",
            invalid: None,
            kafka: || probed(&[0]),
            deployment: Ok(true),
            config_map: Err(api_error()),
            want_reason: Some("KubernetesApiError"),
            want_writes: None,
        },
        Case {
            name: "owner unreadable and broker unreachable: the first cause stays",
            invalid: None,
            kafka: unreachable,
            deployment: Err(api_error()),
            config_map: Ok(true),
            want_reason: Some("BrokerUnreachable"),
            want_writes: None,
        },
        Case {
            name: "Secrets unreadable",
            invalid: Some(Problem::KubernetesApi { message: "reading Secret shop/creds: 403".into() }),
            kafka: || KafkaObservation::NotProbed,
            deployment: Ok(true),
            config_map: Ok(true),
            want_reason: Some("KubernetesApiError"),
            want_writes: None,
        },
        Case {
            name: "invalid spec, children ours",
            invalid: invalid(),
            kafka: || KafkaObservation::NotProbed,
            deployment: Ok(true),
            config_map: Ok(true),
            want_reason: Some("InvalidSpec"),
            want_writes: None,
        },
        Case {
            name: "broker unreachable, children ours: children still kept up to date",
            invalid: None,
            kafka: unreachable,
            deployment: Ok(true),
            config_map: Ok(true),
            want_reason: Some("BrokerUnreachable"),
            want_writes: both,
        },
    ];
    for case in cases {
        let name = case.name;
        let (want_reason, want_writes) = (case.want_reason, case.want_writes);
        let p = run(case, &mut PipelineState::default());
        assert_eq!(p.problem.as_ref().map(Problem::reason), want_reason, "{name}: problem {:?}", p.problem);
        assert_eq!(p.writes, want_writes, "{name}: writes");
    }
}

#[test]
fn a_conflict_shows_in_status_and_is_announced_once() {
    let cp = pipeline(serde_json::json!({}));
    let mut state = PipelineState::default();
    let children = Children { name: "orders-worker".into(), ..Default::default() };
    let workers = WorkerPods::default();
    let mut warnings = 0;
    for _ in 0..3 {
        let plan = run(
            Case {
                name: "conflict",
                invalid: None,
                kafka: unreachable,
                deployment: Ok(true),
                config_map: Ok(false),
                want_reason: None,
                want_writes: None,
            },
            &mut state,
        );
        let r = report::assess(
            ReportInputs {
                cp: &cp,
                plan,
                applied: None,
                children: &children,
                workers: &workers,
                stuck_after_polls: 6,
                wall_ms: 0,
                wall: jiff::Timestamp::UNIX_EPOCH,
                dead_letters: None,
            },
            &mut state,
        );
        warnings += r.events.iter().filter(|e| e.type_ == EventType::Warning && e.reason == "ChildConflict").count();
        let s = status::compute(None, &r.observed, k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(r_time()));
        let ready = s.condition("Ready").unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "ChildConflict"));
        assert!(ready.message.contains("ConfigMap orders-worker"), "{}", ready.message);
        assert_eq!(ready.observed_generation, Some(3));
        assert!(r.problem_is_news == (warnings == 1 && r.events.iter().any(|e| e.reason == "ChildConflict")));
    }
    assert_eq!(warnings, 1, "one Warning Event for a conflict that lasts");
}

fn r_time() -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_700_000_000).unwrap()
}

#[test]
fn a_denied_apply_is_reported_and_keeps_the_old_replica_count() {
    let cp = pipeline(serde_json::json!({}));
    let v = validated(&cp);
    let mut state = PipelineState::default();
    let children = Children {
        name: "orders-worker".into(),
        deployment: Some(our_child("old-hash", Some(1))),
        config_map: Some(our_child("old-hash", None)),
    };
    let ownership = Ownership { deployment: Ok(true), config_map: Ok(true) };
    let running = PlanInputs {
        consumers: Consumers { ready: 1, epoch: 1 },
        ..inputs(&cp, Ok(&v), probed(&[500, 500, 500]), &children, &ownership, 1, 100)
    };
    let plan = plan::plan(running, &mut state);
    assert_eq!(plan.writes, Some(Writes { config_map: true, deployment: true }), "stale hash: both rewritten");
    let denied = Problem::ChildApplyFailed { message: "applying Deployment shop/orders-worker: quota exceeded".into() };
    let r = report::assess(
        ReportInputs {
            cp: &cp,
            plan,
            applied: Some(Err(denied)),
            children: &children,
            workers: &WorkerPods::default(),
            stuck_after_polls: 6,
            wall_ms: 0,
            wall: r_time(),
            dead_letters: None,
        },
        &mut state,
    );
    assert_eq!(r.problem.as_ref().map(Problem::reason), Some("ChildApplyFailed"));
    assert_eq!(r.observed.replicas, 1, "status shows what runs, not what was refused");
    assert_eq!(r.scaled, None);
    assert_eq!(state.last_desired, None, "a refused decision is not remembered as in force");
    assert!(r.events.iter().any(|e| e.type_ == EventType::Warning && e.note.contains("quota exceeded")));
}

#[test]
fn an_applied_scale_up_is_an_event_and_remembered() {
    let cp = pipeline(serde_json::json!({}));
    let v = validated(&cp);
    let mut state = PipelineState::default();
    let children = Children {
        name: "orders-worker".into(),
        deployment: Some(our_child(&v.config_hash, Some(0))),
        config_map: Some(our_child(&v.config_hash, None)),
    };
    let ownership = Ownership { deployment: Ok(true), config_map: Ok(true) };
    let plan = plan::plan(inputs(&cp, Ok(&v), probed(&[500, 500]), &children, &ownership, 0, 100), &mut state);
    assert_eq!(plan.writes, Some(Writes { config_map: false, deployment: true }), "only the replica count moves");
    let desired = plan.decision.desired;
    assert!(desired >= 1, "never strand a backlog");
    let r = report::assess(
        ReportInputs {
            cp: &cp,
            plan,
            applied: Some(Ok(())),
            children: &children,
            workers: &WorkerPods::default(),
            stuck_after_polls: 6,
            wall_ms: 0,
            wall: r_time(),
            dead_letters: None,
        },
        &mut state,
    );
    assert_eq!((r.scaled, r.observed.replicas, state.last_desired), (Some("up"), desired, Some(desired)));
    assert!(r.events.iter().any(|e| e.type_ == EventType::Normal && e.action == "Scale"));
    assert!(r.problem.is_none() && r.observed.scaled_at.is_some());
}

#[test]
fn a_pending_coordinator_is_normal_until_the_grace_runs_out() {
    let cp = pipeline(serde_json::json!({}));
    let v = validated(&cp);
    let children = Children { name: "orders-worker".into(), ..Default::default() };
    let ownership = Ownership { deployment: Ok(true), config_map: Ok(true) };
    let mut state = PipelineState::default();
    let at = |secs: u64, state: &mut PipelineState| {
        plan::plan(
            inputs(
                &cp,
                Ok(&v),
                KafkaObservation::Failed(ProbeError::CoordinatorPending("error 15".into())),
                &children,
                &ownership,
                0,
                secs,
            ),
            state,
        )
    };
    let first = at(10, &mut state);
    assert!(first.problem.is_none());
    assert_eq!(first.events.len(), 1);
    assert_eq!((first.events[0].type_, first.events[0].reason), (EventType::Normal, "CoordinatorPending"));
    let later = at(20, &mut state);
    assert!(later.problem.is_none() && later.events.is_empty(), "one Normal Event, not one per poll");
    let past = at(10 + TRANSIENT_GRACE.as_secs(), &mut state);
    assert_eq!(past.problem.as_ref().map(Problem::reason), Some("CoordinatorPending"));
}

#[test]
fn kafka_side_problems() {
    let lost = || Lost { topic: "orders".into(), partition: 0, recorded: 37, found: None };
    type Check = fn(&Plan);
    let cases: Vec<(&str, serde_json::Value, KafkaObservation, Check)> = vec![
        ("minReplicas above the partition count", serde_json::json!({"minReplicas": 3}), probed(&[0, 0]), |p| {
            assert_eq!(p.problem.as_ref().map(Problem::reason), Some("InsufficientPartitions"))
        }),
        (
            "vanished offsets restored: a Warning Event, no problem",
            serde_json::json!({}),
            KafkaObservation::Probed {
                offsets: offsets(&[0]),
                tended: Tended { restored: vec![lost()], ..Default::default() },
            },
            |p| {
                assert!(p.problem.is_none());
                assert_eq!(p.restored, 1);
                assert!(p.events.iter().any(|e| e.reason == "OffsetsRestored" && e.note.contains("orders/0")));
            },
        ),
        (
            "vanished offsets not restored: OffsetsLost",
            serde_json::json!({}),
            KafkaObservation::Probed {
                offsets: offsets(&[0]),
                tended: Tended { not_restored: vec![lost()], ..Default::default() },
            },
            |p| assert_eq!(p.problem.as_ref().map(Problem::reason), Some("OffsetsLost")),
        ),
        (
            "committed offset below the log start: OffsetOutOfRange Event",
            serde_json::json!({}),
            KafkaObservation::Probed {
                offsets: vec![PartitionOffsets {
                    topic: "orders".into(),
                    partition: 0,
                    log_start: 500,
                    log_end: 1000,
                    committed: Some(200),
                    ..Default::default()
                }],
                tended: Tended::default(),
            },
            |p| assert!(p.events.iter().any(|e| e.reason == crate::lifecycle::OFFSET_OUT_OF_RANGE)),
        ),
    ];
    for (name, scaling, kafka, check) in cases {
        let cp = pipeline(scaling);
        let v = validated(&cp);
        let children = Children { name: "orders-worker".into(), ..Default::default() };
        let ownership = Ownership { deployment: Ok(true), config_map: Ok(true) };
        let p = plan::plan(inputs(&cp, Ok(&v), kafka, &children, &ownership, 0, 100), &mut PipelineState::default());
        eprintln!("case: {name}");
        check(&p);
    }
}

#[test]
fn unreadable_children_still_say_why() {
    let cp = pipeline(serde_json::json!({}));
    let mut state = PipelineState::default();
    let problem = Problem::KubernetesApi { message: "the Deployment cache has not synced within 30s".into() };
    let first = report::blocked(&cp, problem.clone(), &mut state);
    assert_eq!(first.events.len(), 1, "announced");
    let s = status::compute(None, &first.observed, k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(r_time()));
    let degraded = s.condition("Degraded").unwrap();
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "KubernetesApiError"));
    let again = report::blocked(&cp, problem, &mut state);
    assert!(again.events.is_empty(), "not re-announced every poll");
    assert!(again.requeue > first.requeue, "backs off");
}

#[test]
fn controller_owner_reference_with_the_uid_only() {
    let theirs = OwnerReference { controller: Some(true), uid: "other".into(), ..Default::default() };
    let not_controller = OwnerReference { controller: None, uid: UID.into(), ..Default::default() };
    assert!(controlled_by(&[theirs.clone(), ours()], UID));
    assert!(!controlled_by(&[theirs], UID));
    assert!(!controlled_by(&[not_controller], UID));
    assert!(!controlled_by(&[], UID));
}

#[test]
fn error_reasons_and_policy_classes() {
    use super::Error;
    assert_eq!(Error::InvalidObject("x".into()).reason(), "InvalidObject");
    assert_eq!(Error::NoNamespace.reason(), "NoNamespace");
}

#[test]
fn dead_letter_counts_reach_the_status_and_condition_series_mirror_it() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kpipe_api::v1alpha1::DeadLetterSummary;
    let cp = pipeline(serde_json::json!({}));
    let v = validated(&cp);
    let children = Children { name: "orders-worker".into(), ..Default::default() };
    let ownership = Ownership { deployment: Ok(true), config_map: Ok(true) };
    let mut state = PipelineState::default();
    let plan = plan::plan(inputs(&cp, Ok(&v), probed(&[0]), &children, &ownership, 0, 100), &mut state);
    let counts = DeadLetterSummary { topic: "dlq".into(), total: 3, ..Default::default() };
    let r = report::assess(
        ReportInputs {
            cp: &cp,
            plan,
            applied: None,
            children: &children,
            workers: &WorkerPods::default(),
            stuck_after_polls: 6,
            wall_ms: 0,
            wall: r_time(),
            dead_letters: Some(counts.clone()),
        },
        &mut state,
    );
    let s = status::compute(None, &r.observed, Time(r_time()));
    assert_eq!(s.dead_letters, Some(counts), "written by the reconciler's own status apply");
    let series = report::condition_series(Some(&s));
    assert_eq!(series.len(), s.conditions.len());
    let ready = s.condition("Ready").unwrap();
    assert!(series.contains(&("Ready".to_string(), ready.status.clone(), ready.reason.clone())));
    assert!(report::condition_series(None).is_empty());
}
