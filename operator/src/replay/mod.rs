//! The DeadLetterReplay controller: runs each replay as a Job of `kpipe-worker` in replay mode and reports its
//! progress (docs/api.md, "Dead-letter replay").
//!
//! Every [`INTERVAL`] it lists the replays it watches and, for each one not finished:
//! 1. resolves the pipeline (`spec.pipelineRef`, same namespace) and its dead-letter topic (Pending otherwise);
//! 2. the first time, records the dead-letter topic's end offsets in `status.endOffsets` (the replay never reads
//!    beyond them, so dead letters written meanwhile are not part of it) and the consumer group that holds its
//!    progress, `kpipe-replay.<namespace>.<name>`;
//! 3. creates the Job `<name>-replay` (owned by the replay) from the pipeline's worker pod template, with the plan
//!    in `KPIPE_REPLAY_PLAN`, once — a re-applied replay finds it and creates nothing;
//! 4. reads the replay group's committed offsets and progress ([`kpipe_api::replay::Progress`] in the commit
//!    metadata) into `status` and follows the Job to Succeeded or Failed, with Events.
//!
//! Decisions ([`phase`], [`plan`]) are pure and unit-tested. Limits: pipelines with `source.auth` (SASL/TLS) are
//! not replayed yet (the replay stays Pending with reason `AuthNotSupported`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobSpec, JobStatus};
use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};
use kpipe_api::replay::{self as rp, Progress, ReplayPlan, Selection};
use kpipe_api::v1alpha1::{ConsumerPipeline, DeadLetterReplay, DeadLetterReplayStatus, ReplayPhase};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::build::{self, MANAGER, WorkerDefaults};
use crate::controller::Scope;
use crate::leader::LeaderFence;
use crate::probe::Cluster;

/// `client.id` of the replay controller's Kafka clients.
const REPLAY_CLIENT_ID: &str = "kpipe-operator-replay";

/// How often replays are reconciled.
pub const INTERVAL: Duration = Duration::from_secs(3);
/// Pod failures before a replay Job gives up (each new pod resumes from the committed progress).
pub const BACKOFF_LIMIT: i32 = 6;
/// Condition types.
pub const COMPLETE: &str = "Complete";
pub const FAILED: &str = "Failed";

/// Why a replay could not be reconciled this round (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("reading {what} of {topic:?}: {detail}")]
    Kafka { what: &'static str, topic: String, detail: String },
    #[error("a blocking Kafka task failed: {0}")]
    Task(String),
    #[error("cannot encode the replay plan: {0}")]
    Plan(#[from] serde_json::Error),
}

/// The consumer group of a replay.
pub fn group_id(namespace: &str, name: &str) -> String {
    format!("kpipe-replay.{namespace}.{name}")
}

/// Name of a replay's Job.
pub fn job_name(replay: &str) -> String {
    format!("{replay}-replay")
}

/// The plan a replay's worker runs (pure).
pub fn plan(r: &DeadLetterReplay, dead_letter_topic: &str, end_offsets: &BTreeMap<i32, i64>) -> ReplayPlan {
    let (ns, name) = (r.namespace().unwrap_or_default(), r.name_any());
    let s = &r.spec.selection;
    ReplayPlan {
        replay: format!("{ns}/{name}"),
        dead_letter_topic: dead_letter_topic.to_string(),
        parking_topic: r.spec.parking_topic.clone(),
        group_id: group_id(&ns, &name),
        end_offsets: end_offsets.clone(),
        selection: Selection {
            pipeline: r.spec.pipeline_ref.name.clone(),
            from_offset: s.from_offset,
            to_offset: s.to_offset,
            since_ms: s.since.as_ref().map(|t| t.0.as_millisecond()),
            until_ms: s.until.as_ref().map(|t| t.0.as_millisecond()),
            error_classes: s.error_classes.clone(),
        },
    }
}

/// The phase a replay is in, from its Job (pure): Succeeded once the Job completed, Failed once it failed for
/// good, Running while it exists.
pub fn phase(job: Option<&JobStatus>) -> ReplayPhase {
    let Some(s) = job else { return ReplayPhase::Pending };
    let has = |t: &str| s.conditions.iter().flatten().any(|c| c.type_ == t && c.status == "True");
    if has("Complete") || s.succeeded.unwrap_or(0) > 0 {
        ReplayPhase::Succeeded
    } else if has("Failed") {
        ReplayPhase::Failed
    } else {
        ReplayPhase::Running
    }
}

/// Whether a parking topic is allowed for the pipeline (pure): not its dead-letter or a source topic.
pub fn parking_topic_problem(parking: &str, p: &ConsumerPipeline) -> Option<String> {
    let dlq = p.spec.dead_letter.as_ref().map(|d| d.topic.as_str());
    if Some(parking) == dlq {
        return Some(format!("parkingTopic {parking:?} is the pipeline's dead-letter topic"));
    }
    if p.spec.source.topics.iter().any(|t| t == parking) {
        return Some(format!("parkingTopic {parking:?} is a source topic of the pipeline"));
    }
    None
}

/// The replay Job: the pipeline's worker pod template, replay labels, the plan in the environment, no probes
/// (a replay pod serves nothing), restartPolicy Never with [`BACKOFF_LIMIT`] (pure).
pub fn replay_job(
    r: &DeadLetterReplay,
    p: &ConsumerPipeline,
    plan: &ReplayPlan,
    worker: &WorkerDefaults,
) -> Result<Job, ReplayError> {
    let v = build::validate(p, &Default::default(), &BTreeMap::new(), worker)
        .map_err(|e| ReplayError::Task(format!("pipeline cannot run: {e}")))?;
    let mut template = build::deployment(&v, 1).spec.map(|s| s.template).unwrap_or_default();
    let name = r.name_any();
    let labels = BTreeMap::from([
        (build::LABEL_NAME.to_string(), "kpipe-replay".to_string()),
        (build::LABEL_INSTANCE.to_string(), name.clone()),
        (build::LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (build::LABEL_PART_OF.to_string(), "kpipe".to_string()),
        ("kpipe.io/pipeline".to_string(), p.name_any()),
    ]);
    let meta = template.metadata.get_or_insert_with(Default::default);
    meta.labels = Some(labels.clone());
    if let Some(spec) = template.spec.as_mut() {
        spec.restart_policy = Some("Never".into());
        for c in &mut spec.containers {
            c.liveness_probe = None;
            c.readiness_probe = None;
            c.env.get_or_insert_with(Vec::new).push(EnvVar {
                name: rp::ENV_REPLAY_PLAN.into(),
                value: Some(serde_json::to_string(plan)?),
                value_from: None,
            });
        }
    }
    let owner = OwnerReference {
        api_version: DeadLetterReplay::api_version(&()).into_owned(),
        kind: DeadLetterReplay::kind(&()).into_owned(),
        name: name.clone(),
        uid: r.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(job_name(&name)),
            namespace: r.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec { backoff_limit: Some(BACKOFF_LIMIT), template, ..Default::default() }),
        status: None,
    })
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    previous: &[Condition],
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(jiff::Timestamp::now()));
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Runs replays to completion.
pub struct ReplayController {
    client: Client,
    fence: LeaderFence,
    timeout: Duration,
    worker: WorkerDefaults,
    recorder: Recorder,
}

impl ReplayController {
    /// A controller writing through `client` while `fence` allows it; Jobs use the operator's worker defaults.
    pub fn new(client: Client, fence: LeaderFence, timeout: Duration, worker: WorkerDefaults) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter { controller: MANAGER.into(), instance: None });
        Self { client, fence, timeout, worker, recorder }
    }

    /// Reconciles every replay each [`INTERVAL`] until `stop` turns true.
    pub async fn run(self: Arc<Self>, scopes: Vec<Scope>, mut stop: watch::Receiver<bool>) {
        loop {
            for scope in &scopes {
                let api: Api<DeadLetterReplay> = match scope {
                    Scope::All => Api::all(self.client.clone()),
                    Scope::Namespace(ns) => Api::namespaced(self.client.clone(), ns),
                };
                match api.list(&ListParams::default()).await {
                    Ok(list) => {
                        for r in list.items {
                            if let Err(e) = self.reconcile(&r).await {
                                tracing::warn!(namespace = ?r.namespace(), replay = %r.name_any(), error = %e,
                                    "replay reconcile failed; retrying");
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot list DeadLetterReplays (CRD installed?)"),
                }
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(INTERVAL) => {}
            }
        }
    }

    async fn reconcile(&self, r: &DeadLetterReplay) -> Result<(), ReplayError> {
        let old = r.status.clone().unwrap_or_default();
        if matches!(old.phase, ReplayPhase::Succeeded | ReplayPhase::Failed) && old.completion_time.is_some() {
            return Ok(());
        }
        let (ns, name) = (r.namespace().unwrap_or_default(), r.name_any());
        let mut st = old.clone();
        st.observed_generation = r.metadata.generation;
        let pipelines: Api<ConsumerPipeline> = Api::namespaced(self.client.clone(), &ns);
        let pipeline = pipelines.get_opt(&r.spec.pipeline_ref.name).await?;
        let waiting = match &pipeline {
            None => Some(("PipelineNotFound", format!("ConsumerPipeline {:?} not found", r.spec.pipeline_ref.name))),
            Some(p) if p.spec.dead_letter.is_none() => {
                Some(("NoDeadLetterTopic", format!("pipeline {:?} has no deadLetter.topic", p.name_any())))
            }
            Some(p) if p.spec.source.auth.is_some() => {
                Some(("AuthNotSupported", "replays of pipelines with source.auth are not supported yet".to_string()))
            }
            Some(p) => parking_topic_problem(&r.spec.parking_topic, p).map(|m| ("InvalidParkingTopic", m)),
        };
        let (Some(p), None) = (pipeline, waiting.clone()) else {
            let (reason, message) = waiting.unwrap_or_default();
            st.phase = ReplayPhase::Pending;
            st.conditions = vec![condition(COMPLETE, false, reason, &message, r.metadata.generation, &old.conditions)];
            if st != old {
                self.event(r, EventType::Warning, reason, &message).await;
                self.write_status(&ns, &name, &st).await?;
            }
            return Ok(());
        };
        let dlq = p.spec.dead_letter.as_ref().map(|d| d.topic.clone()).unwrap_or_default();
        let cluster = Cluster::plaintext(p.spec.source.bootstrap_servers.clone());
        let group = group_id(&ns, &name);
        if st.end_offsets.is_empty() {
            let ends = self.end_offsets(&cluster, &dlq).await?;
            st.end_offsets = ends.iter().map(|(p, o)| (p.to_string(), *o)).collect();
            st.group_id = Some(group.clone());
            st.dead_letter_topic = Some(dlq.clone());
            st.start_time = Some(Time(jiff::Timestamp::now()));
            st.phase = ReplayPhase::Running;
            // Recorded before the Job exists: a Job always runs against the recorded end offsets.
            self.write_status(&ns, &name, &st).await?;
        }
        let ends: BTreeMap<i32, i64> =
            st.end_offsets.iter().filter_map(|(p, o)| p.parse::<i32>().ok().map(|p| (p, *o))).collect();
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &ns);
        let job = match jobs.get_opt(&job_name(&name)).await? {
            // A same-named Job this replay does not control is someone else's: never adopted, read or touched.
            Some(j)
                if !j
                    .owner_references()
                    .iter()
                    .any(|o| o.controller == Some(true) && Some(&o.uid) == r.uid().as_ref()) =>
            {
                let message = format!(
                    "Job {ns}/{} already exists and is not controlled by this replay; kpipe does not touch it. Rename \
                     or delete it, or rename the replay",
                    job_name(&name)
                );
                st.conditions =
                    vec![condition(COMPLETE, false, "JobConflict", &message, r.metadata.generation, &old.conditions)];
                if st != old {
                    self.event(r, EventType::Warning, "JobConflict", &message).await;
                    self.write_status(&ns, &name, &st).await?;
                }
                return Ok(());
            }
            Some(j) => j,
            None => {
                let job = replay_job(r, &p, &plan(r, &dlq, &ends), &self.worker)?;
                if !self.fence.may_act() {
                    return Ok(());
                }
                // Server-side apply of an absent Job creates it; the Job is never applied again (its template is
                // immutable and the replay's plan is fixed).
                // Created, not applied: a same-named Job that appeared since the read is a conflict (409), not taken over.
                let created = jobs
                    .create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &job)
                    .await?;
                let total: i64 = ends.values().sum();
                self.event(
                    r,
                    EventType::Normal,
                    "Started",
                    &format!("Job {} replays {dlq} up to {total} records (end offsets {ends:?})", job_name(&name)),
                )
                .await;
                created
            }
        };
        let progress = self.progress(&cluster, &group, &dlq, &ends).await?;
        st.replayed = progress.replayed;
        st.succeeded = progress.succeeded;
        st.failed_again = progress.failed_again;
        st.skipped = progress.skipped;
        // A Job that exists runs, even before the Job controller wrote its first status.
        st.phase = phase(Some(&job.status.clone().unwrap_or_default()));
        let g = r.metadata.generation;
        let counts = format!(
            "replayed {}, succeeded {}, failed again {} (parked in {}), skipped {}",
            st.replayed, st.succeeded, st.failed_again, r.spec.parking_topic, st.skipped
        );
        st.conditions = match st.phase {
            ReplayPhase::Succeeded => vec![
                condition(COMPLETE, true, "Replayed", &counts, g, &old.conditions),
                condition(FAILED, false, "Replayed", "", g, &old.conditions),
            ],
            ReplayPhase::Failed => vec![
                condition(COMPLETE, false, "JobFailed", &counts, g, &old.conditions),
                condition(
                    FAILED,
                    true,
                    "JobFailed",
                    &format!("Job {} failed {BACKOFF_LIMIT} times; {counts}", job_name(&name)),
                    g,
                    &old.conditions,
                ),
            ],
            _ => vec![condition(COMPLETE, false, "Running", &counts, g, &old.conditions)],
        };
        if matches!(st.phase, ReplayPhase::Succeeded | ReplayPhase::Failed) {
            st.completion_time = Some(Time(jiff::Timestamp::now()));
            let (kind, reason) = if st.phase == ReplayPhase::Succeeded {
                (EventType::Normal, "Completed")
            } else {
                (EventType::Warning, "Failed")
            };
            self.event(r, kind, reason, &counts).await;
        }
        if st != old {
            self.write_status(&ns, &name, &st).await?;
        }
        Ok(())
    }

    async fn end_offsets(&self, cluster: &Cluster, topic: &str) -> Result<BTreeMap<i32, i64>, ReplayError> {
        let (cluster, topic, timeout) = (cluster.clone(), topic.to_string(), self.timeout);
        tokio::task::spawn_blocking(move || {
            let err = |what: &'static str| {
                let topic = topic.clone();
                move |e: rdkafka::error::KafkaError| ReplayError::Kafka { what, topic, detail: e.to_string() }
            };
            let consumer: BaseConsumer =
                cluster.client_config(REPLAY_CLIENT_ID, timeout).create().map_err(err("client"))?;
            let md = consumer.fetch_metadata(Some(&topic), timeout).map_err(err("metadata"))?;
            let partitions: Vec<i32> = md
                .topics()
                .iter()
                .filter(|t| t.name() == topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                return Err(ReplayError::Kafka { what: "metadata", topic, detail: "topic not found".into() });
            }
            let mut ends = BTreeMap::new();
            for p in partitions {
                ends.insert(p, consumer.fetch_watermarks(&topic, p, timeout).map_err(err("end offsets"))?.1);
            }
            Ok(ends)
        })
        .await
        .map_err(|e| ReplayError::Task(e.to_string()))?
    }

    async fn progress(
        &self,
        cluster: &Cluster,
        group: &str,
        topic: &str,
        ends: &BTreeMap<i32, i64>,
    ) -> Result<Progress, ReplayError> {
        let (cluster, group, topic, timeout) = (cluster.clone(), group.to_string(), topic.to_string(), self.timeout);
        let partitions: Vec<i32> = ends.keys().copied().collect();
        tokio::task::spawn_blocking(move || {
            let err = |e: rdkafka::error::KafkaError| ReplayError::Kafka {
                what: "committed offsets",
                topic: topic.clone(),
                detail: e.to_string(),
            };
            let consumer: BaseConsumer =
                cluster.client_config(REPLAY_CLIENT_ID, timeout).set("group.id", &group).create().map_err(err)?;
            let mut tpl = TopicPartitionList::new();
            for p in partitions {
                tpl.add_partition(&topic, p);
            }
            let committed = consumer.committed_offsets(tpl, timeout).map_err(err)?;
            Ok(committed
                .elements_for_topic(&topic)
                .iter()
                .filter(|e| matches!(e.offset(), Offset::Offset(_)))
                .filter_map(|e| rp::decode_progress(e.metadata()))
                .fold(Progress::default(), Progress::plus))
        })
        .await
        .map_err(|e| ReplayError::Task(e.to_string()))?
    }

    async fn write_status(&self, ns: &str, name: &str, st: &DeadLetterReplayStatus) -> Result<(), ReplayError> {
        if !self.fence.may_act() {
            return Ok(());
        }
        let api: Api<DeadLetterReplay> = Api::namespaced(self.client.clone(), ns);
        let patch = serde_json::json!({"apiVersion": "kpipe.io/v1alpha1", "kind": "DeadLetterReplay", "status": st});
        api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await?;
        Ok(())
    }

    async fn event(&self, r: &DeadLetterReplay, type_: EventType, reason: &str, note: &str) {
        if !self.fence.may_act() {
            return;
        }
        let ev =
            Event { type_, reason: reason.into(), note: Some(note.into()), action: "Replay".into(), secondary: None };
        if let Err(e) = self.recorder.publish(&ev, &r.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot publish Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::JobCondition;
    use kpipe_api::v1alpha1::{DeadLetterReplaySpec, PipelineRef, ReplaySelection};

    fn replay() -> DeadLetterReplay {
        let mut r = DeadLetterReplay::new(
            "r1",
            DeadLetterReplaySpec {
                pipeline_ref: PipelineRef { name: "orders".into() },
                selection: ReplaySelection {
                    error_classes: vec!["http_503".into()],
                    since: Some(Time(jiff::Timestamp::from_second(100).unwrap())),
                    ..Default::default()
                },
                parking_topic: "orders-parked".into(),
            },
        );
        r.metadata.namespace = Some("shop".into());
        r
    }

    #[test]
    fn the_plan_carries_the_selection_and_a_group_of_its_own() {
        let p = plan(&replay(), "orders-dlq", &BTreeMap::from([(0, 12), (1, 3)]));
        assert_eq!(p.replay, "shop/r1");
        assert_eq!(p.group_id, "kpipe-replay.shop.r1");
        assert_eq!((p.dead_letter_topic.as_str(), p.parking_topic.as_str()), ("orders-dlq", "orders-parked"));
        assert_eq!(p.selection.pipeline, "orders");
        assert_eq!(p.selection.since_ms, Some(100_000));
        assert_eq!(p.selection.error_classes, ["http_503"]);
        assert_eq!(p.end_offsets, BTreeMap::from([(0, 12), (1, 3)]));
    }

    #[test]
    fn the_job_runs_the_pipelines_worker_in_replay_mode() {
        let mut p: ConsumerPipeline = serde_json::from_value(serde_json::json!({
            "apiVersion": "kpipe.io/v1alpha1", "kind": "ConsumerPipeline",
            "metadata": {"name": "orders", "namespace": "shop", "uid": "u-p"},
            "spec": {"source": {"bootstrapServers": ["k:9092"], "topics": ["orders"]},
                     "processor": {"http": {"url": "http://sink/records"}}, "deadLetter": {"topic": "orders-dlq"}}
        }))
        .unwrap();
        p.spec.retry.max_attempts = 3;
        let mut r = replay();
        r.metadata.uid = Some("u-r".into());
        let plan = plan(&r, "orders-dlq", &BTreeMap::from([(0, 4)]));
        let defaults = WorkerDefaults { image: "kpipe/worker:1".into(), ..Default::default() };
        let job = replay_job(&r, &p, &plan, &defaults).unwrap();
        assert_eq!(job.metadata.name.as_deref(), Some("r1-replay"));
        let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("DeadLetterReplay", "u-r", Some(true))
        );
        let spec = job.spec.unwrap();
        assert_eq!(spec.backoff_limit, Some(BACKOFF_LIMIT));
        let labels = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(labels.get(build::LABEL_NAME).map(String::as_str), Some("kpipe-replay"), "not counted as a worker");
        assert_eq!(labels.get(build::LABEL_INSTANCE).map(String::as_str), Some("r1"));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("kpipe/worker:1"));
        assert!(c.liveness_probe.is_none() && c.readiness_probe.is_none());
        let env = c.env.as_ref().unwrap();
        let plan_env = env.iter().find(|e| e.name == rp::ENV_REPLAY_PLAN).unwrap();
        let back: ReplayPlan = serde_json::from_str(plan_env.value.as_deref().unwrap()).unwrap();
        assert_eq!(back, plan);
        assert!(env.iter().any(|e| e.name == kpipe_api::worker_contract::ENV_CONFIG), "reads the pipeline's config");
    }

    #[test]
    fn phase_follows_the_job() {
        assert_eq!(phase(None), ReplayPhase::Pending);
        assert_eq!(phase(Some(&JobStatus::default())), ReplayPhase::Running);
        let cond = |t: &str| JobStatus {
            conditions: Some(vec![JobCondition { type_: t.into(), status: "True".into(), ..Default::default() }]),
            ..Default::default()
        };
        assert_eq!(phase(Some(&cond("Complete"))), ReplayPhase::Succeeded);
        assert_eq!(phase(Some(&cond("Failed"))), ReplayPhase::Failed);
        assert_eq!(phase(Some(&JobStatus { succeeded: Some(1), ..Default::default() })), ReplayPhase::Succeeded);
    }

    #[test]
    fn the_parking_topic_is_neither_the_dlq_nor_a_source() {
        let p: ConsumerPipeline = serde_json::from_value(serde_json::json!({
            "apiVersion": "kpipe.io/v1alpha1", "kind": "ConsumerPipeline", "metadata": {"name": "orders"},
            "spec": {"source": {"bootstrapServers": ["k:9092"], "topics": ["orders"]}, "processor": {"noop": {}},
                     "deadLetter": {"topic": "orders-dlq"}}
        }))
        .unwrap();
        assert!(parking_topic_problem("orders-dlq", &p).is_some());
        assert!(parking_topic_problem("orders", &p).is_some());
        assert_eq!(parking_topic_problem("orders-parked", &p), None);
    }
}
