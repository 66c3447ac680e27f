//! The reconciler, as named steps in the shape of Stackable's operators (DESIGN.md §7):
//!
//! 1. [`dereference`]: the Secrets the spec references;
//! 2. [`observe`]: the children (caches), worker pods, Kafka (lag probe and idle-offset keeper);
//! 3. [`plan`]: a pure function from observations to the scaling decision, the children to write, the
//!    problem and Events;
//! 4. [`apply`]: server-side apply of the children (one field manager, forced; only children this
//!    pipeline controls);
//! 5. [`report`]: status (only when it changed), Events and metrics.
//!
//! Every reconcile of a parseable object ends with a status write that says what is wrong, whatever step
//! found it; only a failed status write (or an object without namespace) is an [`Error`]. The primary is
//! watched through [`DeserializeGuard`], so one malformed object becomes an `InvalidObject` error for that
//! object only (Warning Event, await change) instead of breaking the watch. Status-only updates of the
//! primary do not retrigger reconciles (generation predicate); children are watched (`owns`) so drift and
//! deletion are repaired. Each reconcile runs in a `reconcile` span carrying the pipeline's namespace and
//! name.

pub mod apply;
pub mod dereference;
pub mod observe;
pub mod plan;
pub mod report;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Secret};
use kpipe_api::v1alpha1::ConsumerPipeline;
use kube::api::{Api, PartialObjectMeta};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{Instrument, debug, info, warn};

use crate::build::{self, LABEL_MANAGED_BY, MANAGER, WorkerDefaults};
use crate::cache_ready::{self, CacheReady};
use crate::deadletters::{self, DeadLetterReader, Trigger};
use crate::keepalive::{OffsetBook, OffsetKeeper};
use crate::lag::LagTracker;
use crate::leader::LeaderFence;
use crate::metrics::Metrics;
use crate::probe::LagProbe;
use crate::scaler::ScalerState;
use crate::stall::StallReason;
use crate::status::Problem;
use crate::workers::{PodView, WorkerPods};

use self::observe::KafkaObservation;
use self::plan::PlanInputs;
use self::report::ReportInputs;

/// Reconcile errors: only what cannot be reported in the pipeline's status (every other failure is a
/// [`Problem`] in status, with an Event).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid ConsumerPipeline object: {0}")]
    InvalidObject(String),
    #[error("object has no namespace")]
    NoNamespace,
    #[error("writing the status of {namespace}/{name}: {source}")]
    StatusWrite {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// Metric label / Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidObject(_) => "InvalidObject",
            Self::NoNamespace => "NoNamespace",
            Self::StatusWrite { .. } => "StatusWriteFailed",
        }
    }
}

/// Operator settings that reach the reconciler.
#[derive(Clone, Debug)]
pub struct Settings {
    pub field_manager: String,
    pub worker: WorkerDefaults,
    pub probe_timeout: Duration,
    pub stuck_after_polls: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            field_manager: MANAGER.into(),
            worker: WorkerDefaults { image: "kpipe/worker:0.1.0".into(), ..Default::default() },
            probe_timeout: Duration::from_secs(5),
            stuck_after_polls: 6,
        }
    }
}

/// What the operator remembers of one pipeline between reconciles (lost on restart or a new leadership
/// term: everything here is rebuilt from observed state).
#[derive(Default)]
pub struct PipelineState {
    pub tracker: Option<LagTracker>,
    pub scaler: ScalerState,
    /// Replicas this operator last set (auto mode); None before the first decision.
    pub last_desired: Option<i32>,
    /// The problem last announced (Events on news only).
    pub last_problem: Option<Problem>,
    /// The last OffsetOutOfRange message (an Event only when it changes).
    pub last_out_of_range: Option<String>,
    /// Offsets restored while idle, until a worker has consumed from them (the OffsetsRestored condition).
    pub offsets_restored: Option<String>,
    /// The stall reason last reported (Events on change).
    pub last_stall: Option<StallReason>,
    /// Since when (operator clock) the lag probe has failed with a transient error, if it does.
    pub transient_since: Option<Duration>,
    /// Consecutive reconciles with a problem (requeue backoff).
    pub failures: u32,
    /// Last committed offsets seen (idle-offset keepalive and restore, [`crate::keepalive`]).
    pub offsets_book: OffsetBook,
    /// Topic IDs, recreated topics and the persisted offset record ([`crate::topic_identity`]).
    pub topics: crate::topic_identity::TopicState,
}

/// State shared by every controller (one per watched namespace) of this process.
pub struct Shared {
    pub client: Client,
    pub settings: Settings,
    pub probe: Arc<LagProbe>,
    /// Keeps idle pipelines' committed offsets alive and restores vanished ones.
    pub keeper: Arc<OffsetKeeper>,
    /// Counts the dead letters of the pipelines the reconciles register ([`crate::deadletters`]); its loop runs
    /// while this replica leads.
    pub dead_letters: Arc<DeadLetterReader>,
    /// Asked before every write (children, status, Events, offset commits): false once this
    /// replica may no longer be the leader ([`crate::leader`]).
    pub fence: LeaderFence,
    pub metrics: Metrics,
    pub recorder: Recorder,
    origin: Instant,
    /// uid → (namespace, name, state).
    pipelines: Mutex<HashMap<String, Tracked>>,
}

struct Tracked {
    namespace: String,
    name: String,
    state: Arc<tokio::sync::Mutex<PipelineState>>,
}

impl Shared {
    pub fn new(client: Client, settings: Settings, metrics: Metrics, instance: Option<String>) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter { controller: MANAGER.into(), instance });
        Self {
            probe: Arc::new(LagProbe::new(settings.probe_timeout)),
            keeper: Arc::new(OffsetKeeper::new(settings.probe_timeout, &metrics.registry)),
            dead_letters: Arc::new(DeadLetterReader::new(metrics.clone(), settings.probe_timeout)),
            fence: LeaderFence::always(),
            client,
            settings,
            metrics,
            recorder,
            origin: Instant::now(),
            pipelines: Mutex::new(HashMap::new()),
        }
    }

    /// Guard every write with `fence` (leader election; the default fence is always open).
    pub fn with_fence(mut self, fence: LeaderFence) -> Self {
        // The keeper has no other owner yet (called right after `new`).
        match Arc::get_mut(&mut self.keeper) {
            Some(keeper) => keeper.set_fence(fence.clone()),
            None => warn!("the offset keeper is already shared: its commits are not leader-fenced"),
        }
        self.fence = fence;
        self
    }

    /// Forget every pipeline's in-memory state: a new leadership term starts from observed state.
    pub fn reset(&self) {
        if let Ok(mut map) = self.pipelines.lock() {
            map.clear();
        }
        self.dead_letters.reset();
    }

    fn state(&self, uid: &str, namespace: &str, name: &str) -> Arc<tokio::sync::Mutex<PipelineState>> {
        match self.pipelines.lock() {
            Ok(mut map) => map
                .entry(uid.to_string())
                .or_insert_with(|| Tracked {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    state: Arc::default(),
                })
                .state
                .clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Forget pipelines of `scope` that no longer exist (deleted objects are not reconciled:
    /// there is no finalizer), with their metric series.
    fn prune(&self, scope: &Scope, live: &std::collections::HashSet<String>) {
        let Ok(mut map) = self.pipelines.lock() else { return };
        map.retain(|uid, t| {
            let in_scope = match scope {
                Scope::All => true,
                Scope::Namespace(ns) => &t.namespace == ns,
            };
            let keep = !in_scope || live.contains(uid);
            if !keep {
                self.metrics.forget(&t.namespace, &t.name);
                self.keeper.forget(&t.namespace, &t.name);
                self.dead_letters.watch(uid, None);
            }
            keep
        });
    }

    fn forget(&self, uid: &str) {
        if let Ok(mut map) = self.pipelines.lock() {
            map.remove(uid);
        }
        self.dead_letters.watch(uid, None);
    }

    pub(crate) async fn event(
        &self,
        oref: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        if !self.fence.may_act() {
            debug!(reason, "not the leader: Event not published");
            return;
        }
        let ev = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        if let Err(e) = self.recorder.publish(&ev, oref).await {
            warn!(error = %e, reason, "cannot publish Event");
        }
    }
}

/// Per-controller context.
pub struct Context {
    pub shared: Arc<Shared>,
    deployments: Store<Deployment>,
    config_maps: Store<PartialObjectMeta<ConfigMap>>,
    /// Worker pods (status only), for restarts, readiness and the consumer set.
    pods: Store<Pod>,
    /// Whether the three caches above have their first complete list (awaited before anything is decided).
    children_ready: ChildCaches,
    /// Reconciles a pipeline of this controller on request (the dead-letter reader's new counts).
    trigger: Trigger,
}

/// Readiness of the caches of a pipeline's children and worker pods ([`cache_ready`]).
#[derive(Clone, Debug)]
pub struct ChildCaches {
    deployments: CacheReady,
    config_maps: CacheReady,
    pods: CacheReady,
}

impl Context {
    /// The worker pods of pipeline `ns/name`, as the Pod cache has them.
    fn worker_pods(&self, ns: &str, name: &str) -> Vec<PodView> {
        self.pods
            .state()
            .iter()
            .filter(|p| {
                p.metadata.namespace.as_deref() == Some(ns)
                    && p.metadata.labels.as_ref().and_then(|l| l.get(build::LABEL_INSTANCE)).map(String::as_str)
                        == Some(name)
            })
            .map(|p| PodView::from_pod(p))
            .collect()
    }
}

fn invalid_object_ref(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectReference {
    ObjectReference {
        api_version: Some("kpipe.io/v1alpha1".into()),
        kind: Some("ConsumerPipeline".into()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..Default::default()
    }
}

/// Reconcile one pipeline, inside a `reconcile` span carrying its namespace and name.
pub async fn reconcile(obj: Arc<DeserializeGuard<ConsumerPipeline>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let meta = match &obj.0 {
        Ok(cp) => &cp.metadata,
        Err(invalid) => &invalid.metadata,
    };
    let span = tracing::info_span!(
        "reconcile",
        namespace = meta.namespace.as_deref().unwrap_or_default(),
        name = meta.name.as_deref().unwrap_or_default()
    );
    let res = reconcile_steps(&obj, &ctx).instrument(span).await;
    ctx.shared.metrics.observe_reconcile(res.is_ok(), started.elapsed());
    res
}

async fn reconcile_steps(obj: &DeserializeGuard<ConsumerPipeline>, ctx: &Context) -> Result<Action, Error> {
    let shared = &ctx.shared;
    let cp = match &obj.0 {
        Ok(cp) => cp,
        Err(invalid) => {
            let oref = invalid_object_ref(&invalid.metadata);
            let note = format!("cannot parse: {}", invalid.error);
            shared.event(&oref, EventType::Warning, "InvalidObject", note, "Reconcile").await;
            return Err(Error::InvalidObject(invalid.error.clone()));
        }
    };
    let ns = cp.namespace().ok_or(Error::NoNamespace)?;
    let name = cp.name_any();
    let uid = cp.uid().unwrap_or_default();
    if cp.metadata.deletion_timestamp.is_some() {
        // Children go through owner-reference garbage collection.
        shared.forget(&uid);
        shared.metrics.forget(&ns, &name);
        shared.keeper.forget(&ns, &name);
        return Ok(Action::await_change());
    }
    let spec = &cp.spec;
    let now = shared.origin.elapsed();
    let state_lock = shared.state(&uid, &ns, &name);
    let mut state = state_lock.lock().await;
    let status_err = |source| Error::StatusWrite { namespace: ns.clone(), name: name.clone(), source };

    // Observe the children first: without knowing what exists, nothing is decided or written.
    let children = match observe::children(ctx, &ns, &name).await {
        Ok(c) => c,
        Err(problem) => {
            let report = report::blocked(cp, problem, &mut state);
            report::publish(shared, cp, &report, &mut state.topics).await.map_err(status_err)?;
            return Ok(Action::requeue(report.requeue));
        }
    };
    // The operator owns the replica count in auto mode: its own last decision is the truth, a drifted
    // Deployment is put back.
    let current = state.last_desired.or(children.replicas()).unwrap_or(0);
    let wall = jiff::Timestamp::now();
    let wall_ms = u64::try_from(wall.as_millisecond()).unwrap_or(0);
    let workers = WorkerPods::summarize(&ctx.worker_pods(&ns, &name), wall.as_second());
    // The Deployment's ready count is what the scaler has always used; the pods add restarts and identity.
    let ready = children.ready();
    let consumers = crate::lag::Consumers { ready, epoch: workers.epoch.wrapping_add(ready as u64) };

    // Dereference and validate.
    let deref = dereference::dereference(&shared.client, &ns, spec).await;
    let validated = deref.as_ref().map_err(Clone::clone).and_then(|d| {
        build::validate(cp, &d.keys, &d.versions, &shared.settings.worker)
            .map_err(|e| Problem::InvalidSpec { reason: e.reason(), message: e.to_string() })
    });
    // The dead-letter reader counts with the connection settings the lag probe uses; a failed Secret read keeps
    // the previous registration.
    match (&spec.dead_letter, &deref) {
        (None, _) => shared.dead_letters.watch(&uid, None),
        (Some(dl), Ok(d)) => shared.dead_letters.watch(
            &uid,
            Some(deadletters::Watch {
                namespace: ns.clone(),
                name: name.clone(),
                topic: dl.topic.clone(),
                cluster: dereference::cluster_for(spec, d),
                seed: cp.status.as_ref().and_then(|s| s.dead_letters.clone()),
                trigger: ctx.trigger.clone(),
            }),
        ),
        (Some(_), Err(_)) => {}
    }
    let dead_letters = deadletters::for_status(
        spec.dead_letter.as_ref().map(|d| d.topic.as_str()),
        shared.dead_letters.summary(&uid),
        cp.status.as_ref().and_then(|s| s.dead_letters.as_ref()),
    );
    let kafka = match (&validated, &deref) {
        (Ok(v), Ok(d)) => {
            // Idle = no worker pod and none wanted (the keeper keeps such a group's offsets alive).
            let idle = current == 0 && children.replicas().unwrap_or(0) == 0 && workers.pods == 0;
            let idle = idle && shared.fence.may_act();
            let cluster = dereference::cluster_for(spec, d);
            observe::kafka(shared, cp, v, cluster, idle, now, &mut state).await
        }
        _ => KafkaObservation::NotProbed,
    };
    let ownership = observe::ownership(&shared.client, &ns, &uid, &children).await;

    let plan = plan::plan(
        PlanInputs {
            spec,
            validated: validated.as_ref().map_err(Clone::clone),
            kafka,
            children: &children,
            ownership: &ownership,
            current,
            consumers,
            now,
            wall_ms,
            stuck_after_polls: shared.settings.stuck_after_polls,
        },
        &mut state,
    );

    // Leader fence: no child, status or Event write once leadership may have passed on.
    if !shared.fence.may_act() {
        debug!("not the leader: no writes");
        return Ok(Action::requeue(spec.scaling.poll_interval.into()));
    }
    let applied = match (&validated, plan.writes) {
        (Ok(v), Some(writes)) => {
            Some(apply::apply(&shared.client, &shared.settings.field_manager, v, writes, plan.decision.desired).await)
        }
        _ => None,
    };

    let report = report::assess(
        ReportInputs {
            cp,
            plan,
            applied,
            children: &children,
            workers: &workers,
            stuck_after_polls: shared.settings.stuck_after_polls,
            wall_ms,
            wall,
            dead_letters,
        },
        &mut state,
    );
    report::publish(shared, cp, &report, &mut state.topics).await.map_err(status_err)?;
    Ok(Action::requeue(report.requeue))
}

/// What to do after a reconcile error.
pub fn error_policy(_obj: Arc<DeserializeGuard<ConsumerPipeline>>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.shared.metrics.record_problem(err.reason());
    warn!(error = %err, "reconcile failed");
    match err {
        // Permanent until the object changes.
        Error::InvalidObject(_) | Error::NoNamespace => Action::await_change(),
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

/// Where to watch: every namespace, or one.
#[derive(Clone, Debug)]
pub enum Scope {
    All,
    Namespace(String),
}

impl Scope {
    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match self {
            Self::All => Api::all(client.clone()),
            Self::Namespace(ns) => Api::namespaced(client.clone(), ns),
        }
    }
}

/// After this long without a complete first list of a cache, [`report_cache_sync`] warns (a new leader that does not
/// act is a problem a user must see in the log, not only as a late reconcile).
pub const CACHE_SYNC_WARN_AFTER: Duration = Duration::from_secs(10);

/// Logs, per cache, how long its first complete list took after the controller started (`info`), and warns every
/// [`CACHE_SYNC_WARN_AFTER`] naming the caches still without one: until then no pipeline of the scope is reconciled.
/// Returns when every cache has synced, or one stopped (the controller stopped).
pub async fn report_cache_sync(scope: Scope, caches: Vec<CacheReady>) {
    let started = Instant::now();
    let mut pending: futures::stream::FuturesUnordered<_> =
        caches.iter().cloned().map(|c| async move { (c.name(), c.wait().await) }).collect();
    loop {
        match tokio::time::timeout(CACHE_SYNC_WARN_AFTER, pending.next()).await {
            Ok(Some((name, Ok(())))) => {
                let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                info!(?scope, cache = name, elapsed_ms, "cache synced");
            }
            Ok(Some((_, Err(_)))) | Ok(None) => return,
            Err(_) => {
                let waiting: Vec<&str> = caches.iter().filter(|c| !c.is_ready()).map(CacheReady::name).collect();
                warn!(
                    ?scope,
                    caches = ?waiting,
                    elapsed_s = started.elapsed().as_secs(),
                    "caches without a complete first list: no pipeline of this scope is reconciled until they have one"
                );
            }
        }
    }
}

/// Run the controller for one scope until `shutdown` resolves.
pub async fn run(
    shared: Arc<Shared>,
    scope: Scope,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = shared.client.clone();
    let managed = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));

    let (pipelines, pipeline_writer) = reflector::store::<DeserializeGuard<ConsumerPipeline>>();
    // managedFields are dropped from the caches: they are most of an object's size and never read.
    let (primary, pipelines_ready) = cache_ready::mark_ready(
        "ConsumerPipeline",
        reflector::reflector(
            pipeline_writer,
            watcher(scope.api::<DeserializeGuard<ConsumerPipeline>>(&client), watcher::Config::default())
                .default_backoff()
                .modify(|g: &mut DeserializeGuard<ConsumerPipeline>| match &mut g.0 {
                    Ok(cp) => cp.metadata.managed_fields = None,
                    Err(invalid) => invalid.metadata.managed_fields = None,
                }),
        ),
    );
    let primary = primary.applied_objects().predicate_filter(predicates::generation, Default::default());

    let (deployments, dep_writer) = reflector::store::<Deployment>();
    let (dep_stream, deployments_ready) = cache_ready::mark_ready(
        "Deployment",
        reflector::reflector(
            dep_writer,
            watcher(scope.api::<Deployment>(&client), managed.clone()).default_backoff().modify(
                |d: &mut Deployment| {
                    d.metadata.managed_fields = None;
                    // Only replicas, the template's config hash and readyReplicas are read.
                    if let Some(spec) = d.spec.as_mut() {
                        spec.template.spec = None;
                    }
                },
            ),
        ),
    );
    let dep_stream = dep_stream.touched_objects();
    let (config_maps, cm_writer) = reflector::store::<PartialObjectMeta<ConfigMap>>();
    let (cm_stream, config_maps_ready) = cache_ready::mark_ready(
        "ConfigMap",
        reflector::reflector(
            cm_writer,
            watcher(scope.api::<PartialObjectMeta<ConfigMap>>(&client), managed)
                .default_backoff()
                .modify(|c: &mut PartialObjectMeta<ConfigMap>| c.metadata.managed_fields = None),
        ),
    );
    let cm_stream = cm_stream.touched_objects();

    // Worker pods: readiness and restarts only (the spec is dropped). Driven by its own task: pod
    // changes do not trigger reconciles, the poll interval paces them.
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (pod_stream, pods_ready) = cache_ready::mark_ready(
        "Pod",
        reflector::reflector(
            pod_writer,
            watcher(
                scope.api::<Pod>(&client),
                watcher::Config::default().labels(&format!("{}=kpipe-worker", build::LABEL_NAME)),
            )
            .default_backoff()
            .modify(|p: &mut Pod| {
                p.metadata.managed_fields = None;
                p.metadata.annotations = None;
                p.spec = None;
            }),
        ),
    );
    let pod_driver = tokio::spawn(pod_stream.for_each(|ev| async move {
        if let Err(e) = ev {
            debug!(error = %e, "worker pod watch");
        }
    }));

    // Referenced Secrets (metadata only, not cached): a created, fixed or rotated Secret
    // reconciles the pipelines that reference it at once instead of at the next backoff.
    let secret_stream = watcher(scope.api::<PartialObjectMeta<Secret>>(&client), watcher::Config::default())
        .default_backoff()
        .touched_objects();
    let pipeline_index = pipelines.clone();
    let referencing = move |secret: PartialObjectMeta<Secret>| {
        let (name, ns) = (secret.name_any(), secret.namespace().unwrap_or_default());
        pipeline_index
            .state()
            .into_iter()
            .filter(|g| {
                g.0.as_ref().is_ok_and(|cp| {
                    cp.namespace().as_deref() == Some(ns.as_str())
                        && build::referenced_secrets(&cp.spec).contains_key(&name)
                })
            })
            .map(|g| ObjectRef::from_obj(&*g))
            .collect::<Vec<_>>()
    };

    let prune_store = pipelines.clone();
    let prune_shared = shared.clone();
    let prune_scope = scope.clone();
    let prune_ready = pipelines_ready.clone();
    let pruner = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            // Before its first complete list the cache would call every pipeline gone.
            if prune_ready.wait().await.is_err() {
                return;
            }
            let live = prune_store.state().iter().filter_map(|g| g.meta().uid.clone()).collect();
            prune_shared.prune(&prune_scope, &live);
        }
    });

    // Reconcile requests from the dead-letter reader (bounded: a full queue drops requests, the next poll catches up).
    let (trigger, requests) = tokio::sync::mpsc::channel(256);
    let requests = futures::stream::unfold(requests, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let sync_report = tokio::spawn(report_cache_sync(
        scope.clone(),
        vec![pipelines_ready, deployments_ready.clone(), config_maps_ready.clone(), pods_ready.clone()],
    ));
    let children_ready =
        ChildCaches { deployments: deployments_ready, config_maps: config_maps_ready, pods: pods_ready };
    let ctx = Arc::new(Context { shared, deployments, config_maps, pods, children_ready, trigger });
    info!(?scope, "starting ConsumerPipeline controller");
    Controller::for_stream(primary, pipelines)
        .owns_stream(dep_stream)
        .owns_stream(cm_stream)
        .watches_stream(secret_stream, referencing)
        .reconcile_on(requests)
        .with_config(ControllerConfig::default().concurrency(32))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "controller event");
            }
        })
        .await;
    pruner.abort();
    pod_driver.abort();
    sync_report.abort();
    info!(?scope, "controller stopped");
}

#[cfg(test)]
mod tests;
