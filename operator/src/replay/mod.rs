//! The DeadLetterReplay controller: runs each replay as a Job of `kpipe-worker` in replay mode and reports its
//! progress (docs/api.md, "Dead-letter replay").
//!
//! It keeps caches (watches) of the replays, the pipelines and the replay Jobs of each scope and, every
//! [`INTERVAL`], reconciles each replay that has not finished from them:
//! 1. resolves the pipeline (`spec.pipelineRef`, same namespace), its dead-letter topic and its Kafka settings — the
//!    pipeline's `source.auth` with the values of the Secrets it references, the same [`Cluster`] the lag probe uses
//!    ([`kpipe_api::kafka_client::properties`]) — Pending with a reason otherwise;
//! 2. the first time, records the dead-letter topic's end offsets in `status.endOffsets` (the replay never reads
//!    beyond them, so dead letters written meanwhile are not part of it) and the consumer group that holds its
//!    progress, `kpipe-replay.<namespace>.<name>` — still Pending: Running is written only once the Job exists;
//! 3. creates the Job `<name>-replay` (owned by the replay) from the pipeline's worker pod template — the worker
//!    Deployment's builder, so the Job gets the same Secret environment and volumes as the workers — with the plan
//!    in `KPIPE_REPLAY_PLAN`, once: a re-applied replay finds it and creates nothing;
//! 4. reads the replay group's committed offsets and progress ([`kpipe_api::replay::Progress`] in the commit
//!    metadata) into `status` and follows the Job to Succeeded or Failed.
//!
//! Whatever stops a replay is a condition with a reason and a Warning Event ([`decide`]): `PipelineNotFound`,
//! `NoDeadLetterTopic`, `InvalidParkingTopic`, the pipeline's Secret problems (`SecretNotFound`, ...),
//! `DeadLetterTopicUnreadable` (missing topic, authentication, brokers), `JobConflict`, `JobNotCreated` (the API
//! error). Kafka clients are kept per cluster and group while their replay runs.
//!
//! Decisions ([`phase`], [`plan`], [`decide`]) are pure and unit-tested; the apiserver and Kafka I/O is in
//! [`ReplayController`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::{Job, JobSpec, JobStatus};
use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};
use kpipe_api::replay::{self as rp, Progress, ReplayPlan, Selection};
use kpipe_api::v1alpha1::{ConsumerPipeline, DeadLetterReplay, DeadLetterReplayStatus, ReplayPhase};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::build::{self, MANAGER, ValidatedPipeline, WorkerDefaults};
use crate::cache_ready::{CacheReady, mark_ready};
use crate::controller::Scope;
use crate::controller::dereference;
use crate::leader::LeaderFence;
use crate::probe::Cluster;

/// `client.id` of the replay controller's Kafka clients.
const REPLAY_CLIENT_ID: &str = "kpipe-operator-replay";

/// How often replays are reconciled from the caches (and a running replay's progress read from Kafka).
pub const INTERVAL: Duration = Duration::from_secs(3);
/// Pod failures before a replay Job gives up (each new pod resumes from the committed progress).
pub const BACKOFF_LIMIT: i32 = 6;
/// Condition types.
pub const COMPLETE: &str = "Complete";
pub const FAILED: &str = "Failed";
/// Condition/Event reasons of [`decide`] that are not a [`Finding::Waiting`] reason.
pub const TOPIC_UNREADABLE: &str = "DeadLetterTopicUnreadable";
pub const JOB_NOT_CREATED: &str = "JobNotCreated";
pub const JOB_CONFLICT: &str = "JobConflict";
pub const CREATING_JOB: &str = "CreatingJob";

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

/// The replay Job: the pipeline's worker pod template ([`build::deployment`]: the same image, configuration volume,
/// and SASL/TLS Secret environment and volumes as the workers), replay labels, the plan in the environment, no
/// probes (a replay pod serves nothing), restartPolicy Never with [`BACKOFF_LIMIT`] (pure).
pub fn replay_job(r: &DeadLetterReplay, v: &ValidatedPipeline, plan: &ReplayPlan) -> Result<Job, ReplayError> {
    let mut template = build::deployment(v, 1).spec.map(|s| s.template).unwrap_or_default();
    let name = r.name_any();
    let labels = BTreeMap::from([
        (build::LABEL_NAME.to_string(), REPLAY_APP.to_string()),
        (build::LABEL_INSTANCE.to_string(), name.clone()),
        (build::LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (build::LABEL_PART_OF.to_string(), "kpipe".to_string()),
        ("kpipe.io/pipeline".to_string(), v.name.clone()),
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

/// `app.kubernetes.io/name` of replay Jobs and pods (not `kpipe-worker`: they are not counted as workers).
pub const REPLAY_APP: &str = "kpipe-replay";

/// Whether `job` is controlled by replay `r` (a controller owner reference with its uid).
pub fn controls(r: &DeadLetterReplay, job: &Job) -> bool {
    job.owner_references().iter().any(|o| o.controller == Some(true) && Some(&o.uid) == r.uid().as_ref())
}

/// What one reconcile of a replay found, in the order it looks.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    /// The replay cannot start: the pipeline is missing, has no dead-letter topic or cannot run (its Secrets), or
    /// the parking topic is not allowed. `reason` is the condition's and the Warning Event's.
    Waiting { reason: &'static str, message: String },
    /// The dead-letter topic cannot be read (missing, authentication, brokers): its end offsets before the Job
    /// exists (`job` None), or the replay's progress while the Job exists (`job`: its status).
    TopicUnreadable { message: String, job: Option<JobStatus> },
    /// The end offsets are recorded and the Job is to be created next.
    Starting,
    /// A same-named Job this replay does not control exists.
    JobConflict { message: String },
    /// Creating the Job failed with an API error.
    JobNotCreated { message: String },
    /// The Job exists (`created`: by this reconcile) and the replay's progress was read.
    Job { status: JobStatus, progress: Progress, created: bool },
}

/// A status to write (when it differs from the old one) and Events to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: DeadLetterReplayStatus,
    /// (type, reason, note).
    pub events: Vec<(EventType, &'static str, String)>,
}

/// The status and Events for what a reconcile found (pure). `old` is the current status (with the end offsets,
/// group and start time already recorded when the replay got that far); `now` stamps new transitions and the
/// completion. Rules: Running only while the Job exists; every reason that stops a replay is a `Complete=False`
/// condition with that reason and a Warning Event when the condition is news (its reason or message changed);
/// Started/Completed/Failed are Events of the Job's life.
pub fn decide(r: &DeadLetterReplay, old: &DeadLetterReplayStatus, finding: Finding, now: &Time) -> Decision {
    let g = r.metadata.generation;
    let job = job_name(&r.name_any());
    let mut st = DeadLetterReplayStatus { observed_generation: g, ..old.clone() };
    let mut events = Vec::new();
    let news = |reason: &str, message: &str| {
        !old.conditions.iter().any(|c| c.type_ == COMPLETE && c.reason == reason && c.message == message)
    };
    let mut blocked = |st: &mut DeadLetterReplayStatus, phase: ReplayPhase, reason: &'static str, message: String| {
        st.phase = phase;
        st.conditions = vec![condition(COMPLETE, false, reason, &message, g, &old.conditions, now)];
        if news(reason, &message) {
            events.push((EventType::Warning, reason, message));
        }
    };
    match finding {
        Finding::Waiting { reason, message } => blocked(&mut st, ReplayPhase::Pending, reason, message),
        Finding::TopicUnreadable { message, job: None } => blocked(
            &mut st,
            ReplayPhase::Pending,
            TOPIC_UNREADABLE,
            format!("cannot read the dead-letter topic's end offsets: {message}"),
        ),
        // The Job runs (or ran): Running until its progress can be read, so the final counts are exact.
        Finding::TopicUnreadable { message, job: Some(_) } => blocked(
            &mut st,
            ReplayPhase::Running,
            TOPIC_UNREADABLE,
            format!("cannot read the replay's progress (consumer group {}): {message}", group_id_of(r)),
        ),
        Finding::JobConflict { message } => blocked(&mut st, ReplayPhase::Pending, JOB_CONFLICT, message),
        Finding::JobNotCreated { message } => {
            blocked(&mut st, ReplayPhase::Pending, JOB_NOT_CREATED, format!("cannot create Job {job}: {message}"))
        }
        Finding::Starting => {
            st.phase = ReplayPhase::Pending;
            let message = format!("end offsets recorded; creating Job {job}");
            st.conditions = vec![condition(COMPLETE, false, CREATING_JOB, &message, g, &old.conditions, now)];
        }
        Finding::Job { status, progress, created } => {
            st.replayed = progress.replayed;
            st.succeeded = progress.succeeded;
            st.failed_again = progress.failed_again;
            st.skipped = progress.skipped;
            st.phase = phase(Some(&status));
            if created {
                let total: i64 = st.end_offsets.values().sum();
                let topic = st.dead_letter_topic.clone().unwrap_or_default();
                events.push((
                    EventType::Normal,
                    "Started",
                    format!("Job {job} replays {topic} up to {total} records (end offsets {:?})", st.end_offsets),
                ));
            }
            let counts = format!(
                "replayed {}, succeeded {}, failed again {} (parked in {}), skipped {}",
                st.replayed, st.succeeded, st.failed_again, r.spec.parking_topic, st.skipped
            );
            let c = |t: &str, s: bool, reason: &str, m: &str| condition(t, s, reason, m, g, &old.conditions, now);
            st.conditions = match st.phase {
                ReplayPhase::Succeeded => {
                    vec![c(COMPLETE, true, "Replayed", &counts), c(FAILED, false, "Replayed", "")]
                }
                ReplayPhase::Failed => vec![
                    c(COMPLETE, false, "JobFailed", &counts),
                    c(FAILED, true, "JobFailed", &format!("Job {job} failed {BACKOFF_LIMIT} times; {counts}")),
                ],
                _ => vec![c(COMPLETE, false, "Running", &counts)],
            };
            if matches!(st.phase, ReplayPhase::Succeeded | ReplayPhase::Failed) {
                st.completion_time = Some(now.clone());
                events.push(if st.phase == ReplayPhase::Succeeded {
                    (EventType::Normal, "Completed", counts)
                } else {
                    (EventType::Warning, "Failed", counts)
                });
            }
        }
    }
    Decision { status: st, events }
}

fn group_id_of(r: &DeadLetterReplay) -> String {
    group_id(&r.namespace().unwrap_or_default(), &r.name_any())
}

/// A replay that has finished for good (its status is final).
pub fn finished(st: &DeadLetterReplayStatus) -> bool {
    matches!(st.phase, ReplayPhase::Succeeded | ReplayPhase::Failed) && st.completion_time.is_some()
}

/// Why replay `r` cannot start on pipeline `p` (pure): (reason, message), or None.
pub fn waiting(r: &DeadLetterReplay, p: Option<&ConsumerPipeline>) -> Option<(&'static str, String)> {
    match p {
        None => Some(("PipelineNotFound", format!("ConsumerPipeline {:?} not found", r.spec.pipeline_ref.name))),
        Some(p) if p.spec.dead_letter.is_none() => {
            Some(("NoDeadLetterTopic", format!("pipeline {:?} has no deadLetter.topic", p.name_any())))
        }
        Some(p) => parking_topic_problem(&r.spec.parking_topic, p).map(|m| ("InvalidParkingTopic", m)),
    }
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The caches of one scope: replays, pipelines and replay Jobs.
struct Caches {
    replays: Store<DeadLetterReplay>,
    pipelines: Store<DeserializeGuard<ConsumerPipeline>>,
    jobs: Store<Job>,
    /// Whether the three caches above have their first complete list ([`crate::cache_ready`]).
    ready: [CacheReady; 3],
}

/// Runs replays to completion.
pub struct ReplayController {
    client: Client,
    fence: LeaderFence,
    timeout: Duration,
    worker: WorkerDefaults,
    recorder: Recorder,
    /// Replay uid → the pipeline's cluster as dereferenced when the replay was last read (refreshed after a failure).
    clusters: Mutex<HashMap<String, Cluster>>,
    /// `<cluster key>|<group>` → a never-subscribed consumer (end offsets with no group, progress with the
    /// replay's group), kept while a replay uses it.
    clients: Mutex<HashMap<String, Arc<BaseConsumer>>>,
    /// Replay uid → the status this controller last wrote (it is the only writer): newer than a cache that has not
    /// seen the write yet, so recorded end offsets are never recorded again.
    written: Mutex<HashMap<String, DeadLetterReplayStatus>>,
}

impl ReplayController {
    /// A controller writing through `client` while `fence` allows it; Jobs use the operator's worker defaults.
    pub fn new(client: Client, fence: LeaderFence, timeout: Duration, worker: WorkerDefaults) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter { controller: MANAGER.into(), instance: None });
        Self {
            client,
            fence,
            timeout,
            worker,
            recorder,
            clusters: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            written: Mutex::new(HashMap::new()),
        }
    }

    fn caches(&self, scope: &Scope) -> (Caches, Vec<tokio::task::JoinHandle<()>>) {
        let api = |client: &Client| match scope {
            Scope::All => (Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone())),
            Scope::Namespace(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
        };
        let (replay_api, pipeline_api, job_api): (
            Api<DeadLetterReplay>,
            Api<DeserializeGuard<ConsumerPipeline>>,
            Api<Job>,
        ) = api(&self.client);
        let (replays, w) = reflector::store();
        let (r, replays_ready) = mark_ready(
            "DeadLetterReplay",
            reflector::reflector(
                w,
                watcher(replay_api, watcher::Config::default())
                    .default_backoff()
                    .modify(|r: &mut DeadLetterReplay| r.metadata.managed_fields = None),
            ),
        );
        let (pipelines, w) = reflector::store();
        let (p, pipelines_ready) = mark_ready(
            "ConsumerPipeline",
            reflector::reflector(
                w,
                watcher(pipeline_api, watcher::Config::default()).default_backoff().modify(
                    |g: &mut DeserializeGuard<ConsumerPipeline>| {
                        if let Ok(cp) = &mut g.0 {
                            cp.metadata.managed_fields = None;
                        }
                    },
                ),
            ),
        );
        let (jobs, w) = reflector::store();
        let (j, jobs_ready) = mark_ready(
            "Job",
            reflector::reflector(
                w,
                watcher(job_api, watcher::Config::default().labels(&format!("{}={REPLAY_APP}", build::LABEL_NAME)))
                    .default_backoff()
                    .modify(|j: &mut Job| {
                        j.metadata.managed_fields = None;
                        if let Some(spec) = j.spec.as_mut() {
                            spec.template.spec = None;
                        }
                    }),
            ),
        );
        let drive = |name: &'static str, s: futures::stream::BoxStream<'static, Result<(), watcher::Error>>| {
            tokio::spawn(s.for_each(move |ev| async move {
                if let Err(e) = ev {
                    tracing::debug!(error = %e, watch = name, "replay controller watch");
                }
            }))
        };
        let tasks = vec![
            drive("deadletterreplays", r.applied_objects().map(|e| e.map(|_| ())).boxed()),
            drive("consumerpipelines", p.applied_objects().map(|e| e.map(|_| ())).boxed()),
            drive("jobs", j.applied_objects().map(|e| e.map(|_| ())).boxed()),
        ];
        (Caches { replays, pipelines, jobs, ready: [replays_ready, pipelines_ready, jobs_ready] }, tasks)
    }

    /// Reconciles every unfinished replay of `scopes` from the caches each [`INTERVAL`] until `stop` turns true.
    pub async fn run(self: Arc<Self>, scopes: Vec<Scope>, mut stop: watch::Receiver<bool>) {
        let (caches, tasks): (Vec<Caches>, Vec<Vec<_>>) = scopes.iter().map(|s| self.caches(s)).unzip();
        loop {
            let mut active = HashSet::new();
            for c in &caches {
                // Nothing is decided before the caches hold what exists (a Job of a replay, its pipeline).
                if !c.ready.iter().all(CacheReady::is_ready) {
                    for r in c.replays.state() {
                        active.extend(r.uid());
                    }
                    continue;
                }
                for r in c.replays.state() {
                    if self.status_of(&r).as_ref().is_some_and(finished) {
                        continue;
                    }
                    active.extend(r.uid());
                    if let Err(e) = self.reconcile(&r, c).await {
                        tracing::warn!(namespace = ?r.namespace(), replay = %r.name_any(), error = %e,
                            "replay reconcile failed; retrying");
                    }
                }
            }
            self.keep_clients_of(&active);
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(INTERVAL) => {}
            }
        }
        for t in tasks.into_iter().flatten() {
            t.abort();
        }
    }

    /// The replay's status: what this controller last wrote, else the cache's.
    fn status_of(&self, r: &DeadLetterReplay) -> Option<DeadLetterReplayStatus> {
        let uid = r.uid().unwrap_or_default();
        self.written.lock().ok().and_then(|w| w.get(&uid).cloned()).or_else(|| r.status.clone())
    }

    /// Closes the clients and forgets the clusters of replays that finished or are gone.
    fn keep_clients_of(&self, active: &HashSet<String>) {
        if let Ok(mut w) = self.written.lock() {
            w.retain(|uid, _| active.contains(uid));
        }
        let keys: HashSet<String> = match self.clusters.lock() {
            Ok(mut clusters) => {
                clusters.retain(|uid, _| active.contains(uid));
                clusters.values().map(Cluster::key).collect()
            }
            Err(_) => return,
        };
        if let Ok(mut clients) = self.clients.lock() {
            clients.retain(|k, _| k.split_once('|').is_some_and(|(cluster, _)| keys.contains(cluster)));
        }
    }

    /// Forgets the cluster and clients of replay `uid` (a Kafka read failed: the Secrets are read again and new
    /// connections made next round).
    fn drop_clients(&self, uid: &str) {
        let key = self.clusters.lock().ok().and_then(|mut c| c.remove(uid)).map(|c| c.key());
        if let (Some(key), Ok(mut clients)) = (key, self.clients.lock()) {
            clients.retain(|k, _| !k.starts_with(&format!("{key}|")));
        }
    }

    async fn reconcile(&self, r: &DeadLetterReplay, caches: &Caches) -> Result<(), ReplayError> {
        let (ns, name) = (r.namespace().unwrap_or_default(), r.name_any());
        let uid = r.uid().unwrap_or_default();
        let now = Time(jiff::Timestamp::now());
        let pipeline = caches.pipelines.get(&ObjectRef::new(&r.spec.pipeline_ref.name).within(&ns));
        let pipeline = pipeline.as_ref().and_then(|g| g.0.as_ref().ok());
        // The status as it stands; `find` adds the end offsets when it records them.
        let mut base = self.status_of(r).unwrap_or_default();
        let finding = self.find(r, &mut base, pipeline, caches, &ns, &name, &uid, &now).await?;
        let d = decide(r, &base, finding, &now);
        for (type_, reason, note) in &d.events {
            self.event(r, *type_, reason, note).await;
        }
        if d.status != base {
            self.write_status(&ns, &name, &uid, &d.status).await?;
        }
        Ok(())
    }

    /// What stands between replay `r` and its completion, doing each step that can be done (recording the end
    /// offsets into `st`, creating the Job, reading the progress).
    #[allow(clippy::too_many_arguments)]
    async fn find(
        &self,
        r: &DeadLetterReplay,
        st: &mut DeadLetterReplayStatus,
        pipeline: Option<&ConsumerPipeline>,
        caches: &Caches,
        ns: &str,
        name: &str,
        uid: &str,
        now: &Time,
    ) -> Result<Finding, ReplayError> {
        if let Some((reason, message)) = waiting(r, pipeline) {
            return Ok(Finding::Waiting { reason, message });
        }
        let Some(p) = pipeline else {
            return Ok(Finding::Waiting { reason: "PipelineNotFound", message: name.into() });
        };
        let dlq = p.spec.dead_letter.as_ref().map(|d| d.topic.clone()).unwrap_or_default();
        let group = group_id(ns, name);
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), ns);
        let cached = caches.jobs.get(&ObjectRef::new(&job_name(name)).within(ns));
        let (job, created) = match cached {
            Some(j) if !controls(r, &j) => return Ok(conflict(ns, name)),
            Some(j) => (j.as_ref().clone(), false),
            None => {
                // The Job is built from the pipeline as it is now, with its Secrets (as the worker Deployment is).
                let deref = match dereference::dereference(&self.client, ns, &p.spec).await {
                    Ok(d) => d,
                    Err(problem) => {
                        return Ok(Finding::Waiting { reason: problem.reason(), message: problem.message() });
                    }
                };
                let v = match build::validate(p, &deref.keys, &deref.versions, &self.worker) {
                    Ok(v) => v,
                    Err(e) => {
                        let message = format!("pipeline {:?} cannot run: {e}", p.name_any());
                        return Ok(Finding::Waiting { reason: e.reason(), message });
                    }
                };
                let cluster = dereference::cluster_for(&p.spec, &deref);
                if let Ok(mut c) = self.clusters.lock() {
                    c.insert(uid.to_string(), cluster.clone());
                }
                if st.end_offsets.is_empty() {
                    let ends = match self.end_offsets(&cluster, &dlq).await {
                        Ok(ends) => ends,
                        Err(e) => {
                            self.drop_clients(uid);
                            return Ok(Finding::TopicUnreadable { message: e.to_string(), job: None });
                        }
                    };
                    st.end_offsets = ends.iter().map(|(p, o)| (p.to_string(), *o)).collect();
                    st.group_id = Some(group.clone());
                    st.dead_letter_topic = Some(dlq.clone());
                    st.start_time = Some(now.clone());
                    // Recorded before the Job exists: a Job always runs against the recorded end offsets.
                    let starting = decide(r, st, Finding::Starting, now).status;
                    self.write_status(ns, name, uid, &starting).await?;
                    *st = starting;
                }
                if !self.fence.may_act() {
                    return Ok(Finding::Starting);
                }
                let ends = end_offsets_of(st);
                let job = replay_job(r, &v, &plan(r, &dlq, &ends))?;
                // Created, not applied: a same-named Job that appeared since the cache was read is a conflict
                // (409), never taken over.
                let pp = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
                match jobs.create(&pp, &job).await {
                    Ok(j) => (j, true),
                    Err(kube::Error::Api(e)) if e.code == 409 => match jobs.get_opt(&job_name(name)).await {
                        Ok(Some(j)) if controls(r, &j) => (j, false),
                        Ok(_) => return Ok(conflict(ns, name)),
                        Err(e) => return Ok(Finding::JobNotCreated { message: e.to_string() }),
                    },
                    Err(e) => return Ok(Finding::JobNotCreated { message: e.to_string() }),
                }
            }
        };
        let job_status = job.status.clone().unwrap_or_default();
        let cluster = match self.clusters.lock().ok().and_then(|c| c.get(uid).cloned()) {
            Some(c) => c,
            None => match dereference::dereference(&self.client, ns, &p.spec).await {
                Ok(d) => {
                    let c = dereference::cluster_for(&p.spec, &d);
                    if let Ok(mut m) = self.clusters.lock() {
                        m.insert(uid.to_string(), c.clone());
                    }
                    c
                }
                Err(problem) => {
                    return Ok(Finding::TopicUnreadable { message: problem.message(), job: Some(job_status) });
                }
            },
        };
        let dlq = st.dead_letter_topic.clone().unwrap_or(dlq);
        match self.progress(&cluster, &group, &dlq, &end_offsets_of(st)).await {
            Ok(progress) => Ok(Finding::Job { status: job_status, progress, created }),
            Err(e) => {
                self.drop_clients(uid);
                Ok(Finding::TopicUnreadable { message: e.to_string(), job: Some(job_status) })
            }
        }
    }

    /// The consumer for `cluster` and `group` ("" for none), created on first use and kept.
    fn client(&self, cluster: &Cluster, group: &str) -> Result<Arc<BaseConsumer>, rdkafka::error::KafkaError> {
        let key = format!("{}|{group}", cluster.key());
        if let Some(c) = self.clients.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(c);
        }
        let mut config = cluster.client_config(REPLAY_CLIENT_ID, self.timeout);
        if !group.is_empty() {
            config.set("group.id", group);
        }
        let consumer: Arc<BaseConsumer> = Arc::new(config.create()?);
        if let Ok(mut c) = self.clients.lock() {
            c.insert(key, consumer.clone());
        }
        Ok(consumer)
    }

    async fn end_offsets(&self, cluster: &Cluster, topic: &str) -> Result<BTreeMap<i32, i64>, ReplayError> {
        let err = |what: &'static str, topic: &str| {
            let topic = topic.to_string();
            move |e: rdkafka::error::KafkaError| ReplayError::Kafka { what, topic, detail: e.to_string() }
        };
        let consumer = self.client(cluster, "").map_err(err("client", topic))?;
        let (topic, timeout) = (topic.to_string(), self.timeout);
        tokio::task::spawn_blocking(move || {
            let md = consumer.fetch_metadata(Some(&topic), timeout).map_err(err("metadata", &topic))?;
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
                ends.insert(p, consumer.fetch_watermarks(&topic, p, timeout).map_err(err("end offsets", &topic))?.1);
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
        let err = |topic: &str| {
            let topic = topic.to_string();
            move |e: rdkafka::error::KafkaError| ReplayError::Kafka {
                what: "committed offsets",
                topic,
                detail: e.to_string(),
            }
        };
        let consumer = self.client(cluster, group).map_err(err(topic))?;
        let (topic, timeout) = (topic.to_string(), self.timeout);
        let partitions: Vec<i32> = ends.keys().copied().collect();
        tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in partitions {
                tpl.add_partition(&topic, p);
            }
            let committed = consumer.committed_offsets(tpl, timeout).map_err(err(&topic))?;
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

    async fn write_status(
        &self,
        ns: &str,
        name: &str,
        uid: &str,
        st: &DeadLetterReplayStatus,
    ) -> Result<(), ReplayError> {
        if !self.fence.may_act() {
            return Ok(());
        }
        let api: Api<DeadLetterReplay> = Api::namespaced(self.client.clone(), ns);
        let patch = serde_json::json!({"apiVersion": "kpipe.io/v1alpha1", "kind": "DeadLetterReplay", "status": st});
        api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await?;
        if let Ok(mut w) = self.written.lock() {
            w.insert(uid.to_string(), st.clone());
        }
        Ok(())
    }

    async fn event(&self, r: &DeadLetterReplay, type_: EventType, reason: &str, note: &str) {
        if !self.fence.may_act() {
            return;
        }
        match type_ {
            EventType::Warning => tracing::warn!(namespace = ?r.namespace(), replay = %r.name_any(), reason, "{note}"),
            EventType::Normal => tracing::info!(namespace = ?r.namespace(), replay = %r.name_any(), reason, "{note}"),
        }
        let ev =
            Event { type_, reason: reason.into(), note: Some(note.into()), action: "Replay".into(), secondary: None };
        if let Err(e) = self.recorder.publish(&ev, &r.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot publish Event");
        }
    }
}

/// The end offsets recorded in a replay's status, by partition.
fn end_offsets_of(st: &DeadLetterReplayStatus) -> BTreeMap<i32, i64> {
    st.end_offsets.iter().filter_map(|(p, o)| p.parse::<i32>().ok().map(|p| (p, *o))).collect()
}

fn conflict(ns: &str, name: &str) -> Finding {
    Finding::JobConflict {
        message: format!(
            "Job {ns}/{} already exists and is not controlled by this replay; kpipe does not touch it. Rename or \
             delete it, or rename the replay",
            job_name(name)
        ),
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
        let v = build::validate(&p, &Default::default(), &BTreeMap::new(), &defaults).unwrap();
        let job = replay_job(&r, &v, &plan).unwrap();
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
    fn a_secured_pipelines_job_gets_the_workers_secret_env_and_volumes() {
        let p: ConsumerPipeline = serde_json::from_value(serde_json::json!({
            "apiVersion": "kpipe.io/v1alpha1", "kind": "ConsumerPipeline",
            "metadata": {"name": "orders", "namespace": "shop", "uid": "u-p"},
            "spec": {"source": {"bootstrapServers": ["k:9094"], "topics": ["orders"], "auth": {
                        "sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "kafka-user"}},
                        "tls": {"caSecretRef": {"name": "kafka-ca"}}}},
                     "processor": {"noop": {}}, "deadLetter": {"topic": "orders-dlq"}}
        }))
        .unwrap();
        let defaults = WorkerDefaults { image: "kpipe/worker:1".into(), ..Default::default() };
        let keys = build::referenced_secrets(&p.spec);
        let v = build::validate(&p, &keys, &BTreeMap::new(), &defaults).unwrap();
        let job = replay_job(&replay(), &v, &plan(&replay(), "orders-dlq", &BTreeMap::from([(0, 4)]))).unwrap();
        let worker = build::deployment(&v, 1).spec.unwrap().template.spec.unwrap();
        let pod = job.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.volumes, worker.volumes, "the workers' volumes: configuration and the CA Secret");
        assert!(
            pod.volumes
                .iter()
                .flatten()
                .any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("kafka-ca"))
        );
        assert_eq!(pod.containers[0].volume_mounts, worker.containers[0].volume_mounts);
        let env = pod.containers[0].env.clone().unwrap();
        for e in worker.containers[0].env.iter().flatten() {
            assert!(env.contains(e), "worker env {} missing from the replay Job", e.name);
        }
        let from_secret: Vec<&str> = env
            .iter()
            .filter_map(|e| e.value_from.as_ref()?.secret_key_ref.as_ref().map(|s| s.name.as_str()))
            .collect();
        assert_eq!(from_secret, ["kafka-user", "kafka-user"], "SASL username and password from the Secret");
        // Without the Secrets the pipeline does not validate: the replay waits with the validation's reason.
        let missing = build::validate(&p, &Default::default(), &BTreeMap::new(), &defaults).unwrap_err();
        assert_eq!(missing.reason(), "SecretNotFound");
    }

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    fn started() -> DeadLetterReplayStatus {
        DeadLetterReplayStatus {
            end_offsets: BTreeMap::from([("0".into(), 6), ("1".into(), 4)]),
            group_id: Some("kpipe-replay.shop.r1".into()),
            dead_letter_topic: Some("orders-dlq".into()),
            start_time: Some(t(10)),
            ..Default::default()
        }
    }

    fn complete(st: &DeadLetterReplayStatus) -> (&str, &str, &str) {
        let c = st.conditions.iter().find(|c| c.type_ == COMPLETE).unwrap();
        (c.status.as_str(), c.reason.as_str(), c.message.as_str())
    }

    #[test]
    fn what_stops_a_replay_is_a_condition_and_a_warning_once() {
        let r = replay();
        let cases = [
            (Finding::Waiting { reason: "PipelineNotFound", message: "m".into() }, "PipelineNotFound"),
            (
                Finding::TopicUnreadable { message: "Broker: Topic authorization failed".into(), job: None },
                TOPIC_UNREADABLE,
            ),
            (Finding::JobConflict { message: "someone's Job".into() }, JOB_CONFLICT),
            (Finding::JobNotCreated { message: "jobs.batch is forbidden".into() }, JOB_NOT_CREATED),
        ];
        for (finding, reason) in cases {
            let d = decide(&r, &DeadLetterReplayStatus::default(), finding.clone(), &t(20));
            assert_eq!(d.status.phase, ReplayPhase::Pending, "{reason}: Pending until the Job exists");
            assert_eq!(complete(&d.status).0, "False");
            assert_eq!(complete(&d.status).1, reason);
            assert_eq!(d.events.len(), 1, "{reason}");
            assert_eq!((d.events[0].0, d.events[0].1), (EventType::Warning, reason));
            assert_eq!(d.events[0].2, complete(&d.status).2, "the Event says what the condition says");
            // The same finding again: no new Event, no change.
            let again = decide(&r, &d.status, finding, &t(30));
            assert!(again.events.is_empty(), "{reason}: announced once");
            assert_eq!(again.status, d.status, "{reason}: nothing to write");
        }
        let d = decide(&r, &started(), Finding::JobNotCreated { message: "quota exceeded".into() }, &t(20));
        assert!(complete(&d.status).2.contains("quota exceeded"), "the API error is in the condition");
        assert!(d.status.end_offsets == started().end_offsets, "recorded offsets kept");
    }

    #[test]
    fn running_is_written_only_once_the_job_exists() {
        let r = replay();
        let d = decide(&r, &started(), Finding::Starting, &t(20));
        assert_eq!(d.status.phase, ReplayPhase::Pending);
        assert_eq!(complete(&d.status).1, CREATING_JOB);
        assert!(d.events.is_empty());
        let progress = Progress { replayed: 2, succeeded: 2, ..Default::default() };
        let running =
            decide(&r, &d.status, Finding::Job { status: JobStatus::default(), progress, created: true }, &t(21));
        assert_eq!(running.status.phase, ReplayPhase::Running);
        assert_eq!((running.status.replayed, running.status.succeeded), (2, 2));
        assert_eq!(running.events.iter().map(|e| e.1).collect::<Vec<_>>(), ["Started"]);
        assert!(running.events[0].2.contains("up to 10 records"), "{}", running.events[0].2);
        // Progress that cannot be read while the Job runs: still Running, counts kept, the reason shown.
        let blind = decide(
            &r,
            &running.status,
            Finding::TopicUnreadable { message: "SASL authentication failed".into(), job: Some(JobStatus::default()) },
            &t(22),
        );
        assert_eq!(blind.status.phase, ReplayPhase::Running);
        assert_eq!(blind.status.replayed, 2);
        assert_eq!(complete(&blind.status).1, TOPIC_UNREADABLE);
        assert_eq!(blind.events.len(), 1);
        assert!(blind.status.completion_time.is_none(), "never final without the final counts");
        // The Job completes and its progress is read: Succeeded, with the counts and a Completed Event.
        let done_job = JobStatus { succeeded: Some(1), ..Default::default() };
        let progress = Progress { replayed: 10, succeeded: 9, failed_again: 1, skipped: 0 };
        let done = decide(&r, &blind.status, Finding::Job { status: done_job, progress, created: false }, &t(30));
        assert_eq!(done.status.phase, ReplayPhase::Succeeded);
        assert_eq!(done.status.completion_time, Some(t(30)));
        assert_eq!(complete(&done.status), ("True", "Replayed", complete(&done.status).2));
        assert_eq!(done.events.iter().map(|e| e.1).collect::<Vec<_>>(), ["Completed"]);
        assert!(finished(&done.status));
    }

    #[test]
    fn a_replay_waits_for_its_pipeline_dead_letter_topic_and_a_valid_parking_topic() {
        let r = replay();
        assert_eq!(waiting(&r, None).map(|w| w.0), Some("PipelineNotFound"));
        let mut p: ConsumerPipeline = serde_json::from_value(serde_json::json!({
            "apiVersion": "kpipe.io/v1alpha1", "kind": "ConsumerPipeline", "metadata": {"name": "orders"},
            "spec": {"source": {"bootstrapServers": ["k:9092"], "topics": ["orders"]}, "processor": {"noop": {}}}
        }))
        .unwrap();
        assert_eq!(waiting(&r, Some(&p)).map(|w| w.0), Some("NoDeadLetterTopic"));
        p.spec.dead_letter = serde_json::from_value(serde_json::json!({"topic": "orders-parked"})).unwrap();
        assert_eq!(waiting(&r, Some(&p)).map(|w| w.0), Some("InvalidParkingTopic"));
        p.spec.dead_letter = serde_json::from_value(serde_json::json!({"topic": "orders-dlq"})).unwrap();
        assert_eq!(waiting(&r, Some(&p)), None);
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
