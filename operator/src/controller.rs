//! The reconciler: referenced Secrets → validate → lag probe → scaler → server-side apply of the
//! ConfigMap and Deployment (one field manager, forced) → status (only when it changed) → Events.
//!
//! The primary is watched through [`DeserializeGuard`], so one malformed object becomes an
//! `InvalidObject` error for that object only (Warning Event, await change) instead of breaking
//! the watch. Status-only updates of the primary do not retrigger reconciles (generation
//! predicate); children are watched (`owns`) so drift and deletion are repaired.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kpipe_api::v1alpha1::{ConsumerPipeline, ConsumerPipelineSpec};
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::build::{self, CONFIG_HASH_ANNOTATION, LABEL_MANAGED_BY, MANAGER, SecretKeys, WorkerDefaults};
use crate::keepalive::{OffsetBook, OffsetKeeper};
use crate::lag::LagTracker;
use crate::leader::LeaderFence;
use crate::metrics::Metrics;
use crate::probe::{Cluster, LagProbe, Sasl, Tls};
use crate::scaler::{Decision, Policy, Reason, ScalerState};
use crate::stall::{self, StallInputs, StallReason};
use crate::status::{self, Observed, Problem};
use crate::workers::{PodView, WorkerPods};

/// Reconcile errors (Degraded causes are not errors: they are reported in status and requeued).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid ConsumerPipeline object: {0}")]
    InvalidObject(String),
    #[error("object has no namespace")]
    NoNamespace,
    #[error("Kubernetes API error while {action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("timed out waiting for the Deployment cache to sync")]
    CacheNotReady,
}

impl Error {
    /// Metric label / Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidObject(_) => "InvalidObject",
            Self::NoNamespace => "NoNamespace",
            Self::Kube { .. } => "KubernetesApiError",
            Self::CacheNotReady => "CacheNotReady",
        }
    }
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

/// The shortest time without a commit before a backlog counts as stalled.
const MIN_STALL_WINDOW: Duration = Duration::from_secs(30);
/// How long a transient probe state (a group coordinator being set up) may last before it is Degraded.
const TRANSIENT_GRACE: Duration = Duration::from_secs(60);
/// How long new worker pods may take to become ready (scheduling, image pulls) before a backlog with
/// no ready worker is `NoCapacity`.
const STARTUP_GRACE: Duration = Duration::from_secs(120);

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

#[derive(Default)]
struct PipelineState {
    tracker: Option<LagTracker>,
    scaler: ScalerState,
    /// Replicas this operator last set (auto mode); None before the first decision.
    last_desired: Option<i32>,
    last_problem: Option<Problem>,
    /// The last OffsetOutOfRange message (an Event only when it changes).
    last_out_of_range: Option<String>,
    /// Offsets restored while idle, until a worker has consumed from them (the OffsetsRestored condition).
    offsets_restored: Option<String>,
    /// The stall reason last reported (Events on change).
    last_stall: Option<StallReason>,
    /// Since when (operator clock) the lag probe has failed with a transient error, if it does.
    transient_since: Option<Duration>,
    failures: u32,
    /// Last committed offsets seen (idle-offset keepalive and restore, [`crate::keepalive`]).
    offsets_book: OffsetBook,
    /// issue 13/20 (topic identity): topic IDs, recreated topics, persisted offset record.
    topics: crate::topic_identity::TopicState,
}

/// State shared by every controller (one per watched namespace) of this process.
pub struct Shared {
    pub client: Client,
    pub settings: Settings,
    pub probe: Arc<LagProbe>,
    /// Keeps idle pipelines' committed offsets alive and restores vanished ones.
    pub keeper: Arc<OffsetKeeper>,
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
            }
            keep
        });
    }

    fn forget(&self, uid: &str) {
        if let Ok(mut map) = self.pipelines.lock() {
            map.remove(uid);
        }
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

/// Whether the child `ns/name` of kind `K` may be written by the pipeline with `uid`: absent, or controlled by it.
/// `cached` are the owner references from the controller's cache, which only holds objects labelled as kpipe's;
/// without an entry the apiserver is asked (metadata only). A failed read is a `KubernetesApiError` problem.
async fn child_is_ours<K>(
    client: &Client,
    ns: &str,
    name: &str,
    uid: &str,
    cached: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]>,
) -> Result<bool, Problem>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    if let Some(owners) = cached {
        return Ok(controlled_by(owners, uid));
    }
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api.get_metadata_opt(name).await {
        Ok(found) => Ok(found.is_none_or(|o| controlled_by(o.owner_references(), uid))),
        Err(e) => Err(Problem {
            reason: "KubernetesApiError".into(),
            message: format!("reading {} {ns}/{name}: {e}", K::kind(&())),
        }),
    }
}

/// Whether `owners` make `uid` the object's controller.
fn controlled_by(owners: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference], uid: &str) -> bool {
    owners.iter().any(|o| o.controller == Some(true) && o.uid == uid)
}

/// Secrets a pipeline references: key names and versions (for validation and the config hash)
/// and the values the lag probe needs (kept in memory only).
#[derive(Default)]
struct Dereferenced {
    keys: SecretKeys,
    versions: BTreeMap<String, String>,
    data: BTreeMap<String, BTreeMap<String, String>>,
}

async fn dereference(client: &Client, ns: &str, spec: &ConsumerPipelineSpec) -> Result<Dereferenced, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut out = Dereferenced::default();
    for name in build::referenced_secrets(spec).into_keys() {
        let Some(secret) = api.get_opt(&name).await.map_err(kube_err(format!("reading Secret {ns}/{name}")))? else {
            continue;
        };
        let mut keys = BTreeSet::new();
        let mut values = BTreeMap::new();
        for (k, v) in secret.data.unwrap_or_default() {
            keys.insert(k.clone());
            values.insert(k, String::from_utf8_lossy(&v.0).into_owned());
        }
        for (k, v) in secret.string_data.unwrap_or_default() {
            keys.insert(k.clone());
            values.insert(k, v);
        }
        out.versions.insert(name.clone(), secret.metadata.resource_version.unwrap_or_default());
        out.keys.insert(name.clone(), keys);
        out.data.insert(name, values);
    }
    Ok(out)
}

fn cluster_for(spec: &ConsumerPipelineSpec, d: &Dereferenced) -> Cluster {
    let get = |secret: &str, key: &str| d.data.get(secret).and_then(|m| m.get(key)).cloned();
    let auth = spec.source.auth.as_ref();
    let sasl = auth.and_then(|a| a.sasl.as_ref()).map(|s| Sasl {
        mechanism: s.mechanism.as_str().into(),
        username: get(&s.secret_ref.name, &s.secret_ref.username_key).unwrap_or_default(),
        password: get(&s.secret_ref.name, &s.secret_ref.password_key).unwrap_or_default(),
    });
    let tls = auth.and_then(|a| a.tls.as_ref()).map(|t| Tls {
        ca_pem: t.ca_secret_ref.as_ref().and_then(|c| get(&c.name, &c.key)),
        cert_pem: t.client_cert_secret_ref.as_ref().and_then(|c| get(&c.name, "tls.crt")),
        key_pem: t.client_cert_secret_ref.as_ref().and_then(|c| get(&c.name, "tls.key")),
    });
    Cluster { bootstrap_servers: spec.source.bootstrap_servers.clone(), sasl, tls }
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

/// Events, logs and metrics for what the offset keeper did; a Degraded cause when vanished offsets
/// could not be restored.
async fn offsets_problem(
    ns: &str,
    name: &str,
    tended: &crate::keepalive::Tended,
    shared: &Shared,
    oref: &ObjectReference,
) -> Option<Problem> {
    let list = |l: &[crate::keepalive::Lost]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ");
    if !tended.restored.is_empty() {
        let note = format!(
            "committed offsets vanished while the pipeline was idle; restored the recorded positions: {}",
            list(&tended.restored)
        );
        warn!(%ns, %name, "{note}");
        shared.keeper.restored_total.with_label_values(&[ns, name]).inc_by(tended.restored.len() as u64);
        shared.event(oref, EventType::Warning, "OffsetsRestored", note, "RestoreOffsets").await;
    }
    if !tended.not_restored.is_empty() {
        let error = tended.error.as_ref().map(|e| e.to_string()).unwrap_or_default();
        return Some(Problem {
            reason: "OffsetsLost".into(),
            message: format!(
                "committed offsets vanished while the pipeline was idle and could not be restored ({error}): {}",
                list(&tended.not_restored)
            ),
        });
    }
    if let Some(e) = &tended.error {
        debug!(%ns, %name, error = %e, "idle offset refresh failed; retried next poll");
    }
    None
}

/// Reconcile one pipeline.
pub async fn reconcile(obj: Arc<DeserializeGuard<ConsumerPipeline>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let res = reconcile_inner(&obj, &ctx).await;
    let m = &ctx.shared.metrics;
    m.reconcile_duration.observe(started.elapsed().as_secs_f64());
    m.reconciles.with_label_values(&[if res.is_ok() { "ok" } else { "error" }]).inc();
    res
}

async fn reconcile_inner(obj: &DeserializeGuard<ConsumerPipeline>, ctx: &Context) -> Result<Action, Error> {
    let shared = &ctx.shared;
    let cp = match &obj.0 {
        Ok(cp) => cp,
        Err(invalid) => {
            let oref = invalid_object_ref(&invalid.metadata);
            shared
                .event(
                    &oref,
                    EventType::Warning,
                    "InvalidObject",
                    format!("cannot parse: {}", invalid.error),
                    "Reconcile",
                )
                .await;
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
    let oref = cp.object_ref(&());
    let poll: Duration = spec.scaling.poll_interval.into();
    let now = shared.origin.elapsed();
    let state_lock = shared.state(&uid, &ns, &name);
    let mut state = state_lock.lock().await;

    // Observed children.
    if tokio::time::timeout(Duration::from_secs(30), ctx.deployments.wait_until_ready()).await.is_err() {
        return Err(Error::CacheNotReady);
    }
    let child = build::child_name(&name);
    let dep = ctx.deployments.get(&ObjectRef::new(&child).within(&ns));
    let cm = ctx.config_maps.get(&ObjectRef::new(&child).within(&ns));
    let dep_replicas = dep.as_ref().and_then(|d| d.spec.as_ref()).and_then(|s| s.replicas);
    let ready = dep.as_ref().and_then(|d| d.status.as_ref()).and_then(|s| s.ready_replicas).unwrap_or(0);
    let hash_of = |annotations: Option<&BTreeMap<String, String>>| {
        annotations.and_then(|a| a.get(CONFIG_HASH_ANNOTATION)).cloned()
    };
    let dep_hash = hash_of(
        dep.as_ref()
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref()),
    );
    let cm_hash = hash_of(cm.as_ref().and_then(|c| c.metadata.annotations.as_ref()));
    // The operator owns the replica count in auto mode: its own last decision is the truth, a
    // drifted Deployment is put back.
    let current = state.last_desired.or(dep_replicas).unwrap_or(0);
    let wall = jiff::Timestamp::now();
    let workers = WorkerPods::summarize(&ctx.worker_pods(&ns, &name), wall.as_second());
    // The Deployment's ready count is what the scaler has always used; the pods add restarts and identity.
    let consumers = crate::lag::Consumers { ready, epoch: workers.epoch.wrapping_add(ready as u64) };
    let wall_ms = u64::try_from(wall.as_millisecond()).unwrap_or(0);

    let t_start = Instant::now();
    // Dereference and validate.
    let deref = dereference(&shared.client, &ns, spec).await?;
    let mut problem: Option<Problem> = None;
    let mut snapshot = None;
    let policy = Policy::from_spec(spec);
    let validated = build::validate(cp, &deref.keys, &deref.versions, &shared.settings.worker);
    let decision: Decision = match &validated {
        Err(e) => {
            problem = Some(Problem { reason: e.reason().into(), message: e.to_string() });
            Decision { desired: current, reason: Reason::ProbeUnavailable, message: "spec cannot be applied".into() }
        }
        Ok(v) => {
            let t0 = Instant::now();
            // issue 13 (offsets-lifecycle): `latest` counts the records since the pipeline's creation (probe.rs)
            let (start, since) =
                (spec.source.start_offset, cp.metadata.creation_timestamp.as_ref().map(|t| t.0.as_millisecond()));
            let probed = shared
                .probe
                .offsets_since(cluster_for(spec, &deref), spec.source.topics.clone(), v.group_id.clone(), start, since)
                .await;
            let secs = t0.elapsed().as_secs_f64();
            match probed {
                Ok(mut offsets) => {
                    shared.metrics.probe_duration.with_label_values(&["ok"]).observe(secs);
                    // Idle pipelines keep their place (keepalive.rs): refresh, or restore vanished offsets
                    // before the scaler sees the lag. Idle = no worker pod and none wanted.
                    let idle = current == 0 && dep_replicas.unwrap_or(0) == 0 && workers.pods == 0;
                    let idle = idle && shared.fence.may_act();
                    // issue 13/20 (topic identity) begin: see operator/src/topic_identity.rs
                    let (st, cluster) = (&mut *state, cluster_for(spec, &deref));
                    st.topics
                        .before_keepalive(
                            shared,
                            &cluster,
                            &v.group_id,
                            cp.status.as_ref(),
                            &mut offsets,
                            idle,
                            &mut st.offsets_book,
                            st.tracker.as_mut(),
                            &oref,
                        )
                        .await;
                    // issue 13/20 (topic identity) end
                    let tended = shared
                        .keeper
                        .tend(&cluster_for(spec, &deref), &v.group_id, &mut offsets, idle, now, &mut state.offsets_book)
                        .await;
                    if let Some(p) = offsets_problem(&ns, &name, &tended, shared, &oref).await {
                        problem = Some(p);
                    }
                    if !tended.restored.is_empty() {
                        let list = tended.restored.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ");
                        state.offsets_restored = Some(format!(
                            "committed offsets vanished while idle; restored the recorded positions: {list}"
                        ));
                    }
                    let tracker = state.tracker.get_or_insert_with(|| {
                        LagTracker::new(shared.settings.stuck_after_polls, Duration::from_secs(60))
                    });
                    let snap = tracker.update(&offsets, spec.source.start_offset, consumers, now, wall_ms);
                    // issue 13 (offsets-lifecycle): out-of-range committed offsets -> Warning Event, see operator/src/lifecycle.rs
                    // One Event per new out-of-range situation, not one per poll while it lasts.
                    let out_of_range = crate::lifecycle::out_of_range_message(&offsets);
                    if out_of_range != state.last_out_of_range
                        && let Some(msg) = out_of_range.clone()
                    {
                        shared
                            .event(&oref, EventType::Warning, crate::lifecycle::OFFSET_OUT_OF_RANGE, msg, "Reconcile")
                            .await;
                    }
                    state.last_out_of_range = out_of_range;
                    if snap.partitions < spec.scaling.min_replicas {
                        problem = Some(Problem {
                            reason: "InsufficientPartitions".into(),
                            message: format!(
                                "minReplicas is {} but the topics have only {} partitions; running {}",
                                spec.scaling.min_replicas, snap.partitions, snap.partitions
                            ),
                        });
                    }
                    snapshot = Some(snap);
                }
                Err(e) => {
                    shared.metrics.probe_duration.with_label_values(&["error"]).observe(secs);
                    shared.metrics.probe_errors.with_label_values(&[e.reason()]).inc();
                    // A coordinator that is still being set up is normal for a while: a Normal Event once, and
                    // Degraded only past TRANSIENT_GRACE.
                    let since = *state.transient_since.get_or_insert(now);
                    if !e.is_transient() || now.saturating_sub(since) >= TRANSIENT_GRACE {
                        problem = Some(Problem { reason: e.reason().into(), message: e.to_string() });
                    } else if since == now {
                        let note = format!("{e}; waiting up to {}s", TRANSIENT_GRACE.as_secs());
                        shared.event(&oref, EventType::Normal, e.reason(), note, "Probe").await;
                    }
                    if !e.is_transient() {
                        state.transient_since = None;
                    }
                }
            }
            if snapshot.is_some() {
                state.transient_since = None;
            }
            let obs = snapshot.as_ref().map(|s| s.observation());
            let decision = state.scaler.decide(&policy, obs.as_ref(), current, now);
            crate::topic_identity::hold(decision, &state.topics) // issue 13 (topic identity)
        }
    };
    let counts = shared.probe.counts();
    shared.metrics.kafka_clients.with_label_values(&["cluster"]).set(counts.clusters as i64);
    shared.metrics.kafka_clients.with_label_values(&["group"]).set(counts.groups as i64);
    shared.metrics.kafka_clients.with_label_values(&["offset_connection"]).set(counts.offset_connections as i64);

    let t_probe = t_start.elapsed();
    // Never touch a child this pipeline does not control (a controller owner reference with its uid),
    // whatever else went wrong in this reconcile: a user's same-named ConfigMap or Deployment is left
    // byte for byte as it is. The caches only hold objects labelled as ours, so an absent entry is
    // looked up directly.
    let mut conflicts = Vec::new();
    let owners = |r: Result<bool, Problem>, problem: &mut Option<Problem>| {
        r.unwrap_or_else(|p| {
            problem.get_or_insert(p);
            false
        })
    };
    let dep_owners = dep.as_ref().map(|d| d.owner_references());
    let dep_ours =
        owners(child_is_ours::<Deployment>(&shared.client, &ns, &child, &uid, dep_owners).await, &mut problem);
    let cm_owners = cm.as_ref().map(|c| c.owner_references());
    let cm_ours = owners(child_is_ours::<ConfigMap>(&shared.client, &ns, &child, &uid, cm_owners).await, &mut problem);
    if !dep_ours {
        conflicts.push(format!("Deployment {child}"));
    }
    if !cm_ours {
        conflicts.push(format!("ConfigMap {child}"));
    }
    if !conflicts.is_empty() && problem.as_ref().is_none_or(|p| p.reason != "KubernetesApiError") {
        problem = Some(Problem {
            reason: "ChildConflict".into(),
            message: format!(
                "{} already exists and is not controlled by this pipeline; kpipe does not touch it. Rename or \
                 delete it, or rename the pipeline",
                conflicts.join(" and ")
            ),
        });
    }
    // Leader fence: no child, status or Event write once leadership may have passed on.
    if !shared.fence.may_act() {
        debug!(%ns, %name, "not the leader: no writes");
        return Ok(Action::requeue(poll));
    }
    // Apply children.
    let mut configured = false;
    if let (Ok(v), true) = (&validated, dep_ours && cm_ours) {
        let pp = PatchParams::apply(&shared.settings.field_manager).force();
        let mut applied = Ok(());
        if cm.is_none() || cm_hash.as_deref() != Some(v.config_hash.as_str()) {
            let api: Api<ConfigMap> = Api::namespaced(shared.client.clone(), &ns);
            applied = api
                .patch(&child, &pp, &Patch::Apply(build::config_map(v)))
                .await
                .map(|_| debug!(%ns, %name, "applied ConfigMap"))
                .map_err(|e| format!("applying ConfigMap {ns}/{child}: {e}"));
        }
        if applied.is_ok()
            && (dep.is_none()
                || dep_hash.as_deref() != Some(v.config_hash.as_str())
                || dep_replicas != Some(decision.desired))
        {
            let api: Api<Deployment> = Api::namespaced(shared.client.clone(), &ns);
            applied = api
                .patch(&child, &pp, &Patch::Apply(build::deployment(v, decision.desired)))
                .await
                .map(|_| debug!(%ns, %name, replicas = decision.desired, "applied Deployment"))
                .map_err(|e| format!("applying Deployment {ns}/{child}: {e}"));
        }
        match applied {
            Ok(()) => {
                configured = true;
                state.last_desired = Some(decision.desired);
            }
            // Denied by admission, a quota, a webhook...: said in status, retried at the next poll.
            Err(message) => problem = Some(Problem { reason: "ChildApplyFailed".into(), message }),
        }
    }
    let previous_replicas = dep_replicas.unwrap_or(0);
    let replicas = if configured { decision.desired } else { previous_replicas };

    // Is the backlog draining? (Stalled condition, Ready=False and a Warning Event when not.)
    // A restore is news until a ready worker has committed from the restored positions.
    if ready > 0 && snapshot.as_ref().is_some_and(|s| s.no_progress_for.is_zero()) {
        state.offsets_restored = None;
    }
    // Readiness from the Deployment too: a Pod cache that lags (or an install without Pod access) must not
    // make running workers look absent.
    let stall_workers = WorkerPods { ready: workers.ready.max(ready), ..workers.clone() };
    let stall = snapshot.as_ref().and_then(|snap| {
        stall::assess(&StallInputs {
            snapshot: snap,
            workers: &stall_workers,
            replicas,
            suspended: spec.suspend,
            activation_lag: spec.scaling.activation_lag,
            window: poll.saturating_mul(shared.settings.stuck_after_polls.max(1)).max(MIN_STALL_WINDOW),
            startup_grace: STARTUP_GRACE,
            wall_ms,
        })
    });
    // A downstream that is down (circuit open) or a dead-letter topic that refuses writes is something the
    // user must fix: Degraded with the stall's reason (its Warning Event comes from the problem below).
    if let Some(st) = stall.as_ref().filter(|st| st.reason.degrades())
        && problem.is_none()
    {
        problem = Some(Problem { reason: st.reason.as_str().into(), message: st.message.clone() });
    }
    // Events and metrics for scale decisions.
    let scaled = configured && replicas != previous_replicas;
    if scaled {
        let direction = if replicas > previous_replicas { "up" } else { "down" };
        shared.metrics.scale_events.with_label_values(&[&ns, &name, direction]).inc();
        info!(%ns, %name, from = previous_replicas, to = replicas, reason = %decision.reason, "{}", decision.message);
        shared.event(&oref, EventType::Normal, decision.reason.as_str(), decision.message.clone(), "Scale").await;
    }
    // A stall-derived problem's message carries moving counts: a new Event only when its reason changes.
    let news = match (&problem, &state.last_problem) {
        (Some(a), Some(b))
            if a.reason == b.reason && StallReason::ALL.iter().any(|r| r.degrades() && r.as_str() == a.reason) =>
        {
            false
        }
        (a, b) => a != b,
    };
    if news {
        match &problem {
            Some(p) => {
                warn!(%ns, %name, reason = %p.reason, "{}", p.message);
                shared.metrics.reconcile_errors.with_label_values(&[&p.reason]).inc();
                shared.event(&oref, EventType::Warning, &p.reason, p.message.clone(), "Reconcile").await;
            }
            None => {
                shared
                    .event(&oref, EventType::Normal, "Recovered", "pipeline is healthy again".into(), "Reconcile")
                    .await;
            }
        }
    }
    state.last_problem = problem.clone();
    let stall_reason = stall.as_ref().map(|st| st.reason);
    if stall_reason != state.last_stall {
        match &stall {
            // Degrading reasons got their Warning Event as the pipeline's problem.
            Some(st) if st.reason.degrades() => {}
            Some(st) => {
                warn!(%ns, %name, reason = %st.reason, "stalled: {}", st.message);
                shared.event(&oref, EventType::Warning, st.reason.as_str(), st.message.clone(), "Stall").await;
            }
            None if snapshot.is_some() => {
                let lag = snapshot.as_ref().map(|s| s.total_lag).unwrap_or(0);
                let note = format!("backlog moving again (lag {lag})");
                shared.event(&oref, EventType::Normal, "Draining", note, "Stall").await;
            }
            None => {}
        }
        if stall.is_some() || snapshot.is_some() {
            state.last_stall = stall_reason;
        }
    }
    let labels = [ns.as_str(), name.as_str()];
    shared.metrics.worker_restarts.with_label_values(&labels).set(i64::from(workers.restarts));
    shared.metrics.crash_looping_workers.with_label_values(&labels).set(i64::from(workers.crash_looping));
    if snapshot.is_some() {
        shared.metrics.set_stalled(&ns, &name, stall_reason);
    }
    if let Some(s) = &snapshot {
        shared.metrics.lag.with_label_values(&labels).set(s.total_lag);
        shared.metrics.stuck_partitions.with_label_values(&labels).set(i64::from(s.stuck_partitions));
        shared.metrics.retrying_partitions.with_label_values(&labels).set(i64::from(s.retrying_partitions));
        shared.metrics.arrival_rate.with_label_values(&labels).set(s.arrival_rate().round() as i64);
        if let Some(capacity) = s.capacity {
            shared.metrics.capacity_per_replica.with_label_values(&labels).set(capacity.rate().round() as i64);
        }
    }
    shared.metrics.desired_replicas.with_label_values(&labels).set(i64::from(decision.desired));
    shared.metrics.replicas.with_label_values(&labels).set(i64::from(replicas));

    let t_apply = t_start.elapsed();
    // Status.
    let prev_status = cp.status.as_ref();
    let observed_lag = snapshot.as_ref().map(|s| s.summary()).or_else(|| prev_status.and_then(|s| s.lag.clone()));
    // From the lag status shows (the last measurement while a poll fails): never Ready=True beside a backlog.
    let backlog = observed_lag.as_ref().is_some_and(|l| l.total > spec.scaling.activation_lag);
    let observed = Observed {
        generation: cp.metadata.generation,
        problem: problem.clone(),
        workers_configured: configured || dep.is_some(),
        replicas,
        ready_replicas: ready,
        desired: decision.desired,
        scale_reason: decision.reason.as_str().into(),
        scale_message: decision.message.clone(),
        selector: build::selector_string(&name),
        group_id: Some(spec.source.effective_group_id(&ns, &name)),
        lag: observed_lag,
        scaled_at: scaled.then(|| Time(jiff::Timestamp::now())),
        stall: stall.map(|st| Problem { reason: st.reason.as_str().into(), message: st.message }),
        offsets_restored: state.offsets_restored.clone(),
        topics: state.topics.for_status(&state.offsets_book, prev_status), // issue 13/20 (topic identity)
        backlog,
        suspended: spec.suspend,
        workers: Some(workers.summary()),
    };
    let new_status = status::compute(prev_status, &observed, Time(jiff::Timestamp::now()));
    if prev_status != Some(&new_status) && shared.fence.may_act() {
        let api: Api<ConsumerPipeline> = Api::namespaced(shared.client.clone(), &ns);
        let patch = |status: &kpipe_api::v1alpha1::ConsumerPipelineStatus| {
            Patch::Apply(serde_json::json!({
                "apiVersion": "kpipe.io/v1alpha1",
                "kind": "ConsumerPipeline",
                "status": status,
            }))
        };
        let pp = PatchParams::apply(&shared.settings.field_manager).force();
        let mut written = api.patch_status(&name, &pp, &patch(&new_status)).await;
        // issue 13/20 (topic identity): a CRD without status.topics refuses the whole apply; write it without them
        if let Some(without) = state.topics.without_topics_if_refused(&written, &new_status) {
            written = api.patch_status(&name, &pp, &patch(&without)).await;
        }
        written.map_err(kube_err(format!("writing status of {ns}/{name}")))?;
    }

    debug!(
        %ns, %name,
        probe_ms = t_probe.as_millis() as u64,
        apply_ms = (t_apply - t_probe).as_millis() as u64,
        status_ms = (t_start.elapsed() - t_apply).as_millis() as u64,
        "reconcile phases"
    );
    // Next poll: the poll interval, or back off while Kafka or a Secret is the problem.
    let next = if problem.is_some() {
        state.failures = state.failures.saturating_add(1);
        let backoff = poll.saturating_mul(1u32 << state.failures.min(4)).min(Duration::from_secs(60));
        if snapshot.is_some() { poll } else { backoff }
    } else {
        state.failures = 0;
        poll
    };
    Ok(Action::requeue(next))
}

/// What to do after a reconcile error.
pub fn error_policy(_obj: Arc<DeserializeGuard<ConsumerPipeline>>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.shared.metrics.reconcile_errors.with_label_values(&[err.reason()]).inc();
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
    let primary = reflector::reflector(
        pipeline_writer,
        watcher(scope.api::<DeserializeGuard<ConsumerPipeline>>(&client), watcher::Config::default()).modify(
            |g: &mut DeserializeGuard<ConsumerPipeline>| match &mut g.0 {
                Ok(cp) => cp.metadata.managed_fields = None,
                Err(invalid) => invalid.metadata.managed_fields = None,
            },
        ),
    )
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());

    let (deployments, dep_writer) = reflector::store::<Deployment>();
    let dep_stream = reflector::reflector(
        dep_writer,
        watcher(scope.api::<Deployment>(&client), managed.clone()).modify(|d: &mut Deployment| {
            d.metadata.managed_fields = None;
            // Only replicas, the template's config hash and readyReplicas are read.
            if let Some(spec) = d.spec.as_mut() {
                spec.template.spec = None;
            }
        }),
    )
    .touched_objects();
    let (config_maps, cm_writer) = reflector::store::<PartialObjectMeta<ConfigMap>>();
    let cm_stream = reflector::reflector(
        cm_writer,
        watcher(scope.api::<PartialObjectMeta<ConfigMap>>(&client), managed)
            .modify(|c: &mut PartialObjectMeta<ConfigMap>| c.metadata.managed_fields = None),
    )
    .touched_objects();

    // Worker pods: readiness and restarts only (the spec is dropped). Driven by its own task: pod
    // changes do not trigger reconciles, the poll interval paces them.
    let (pods, pod_writer) = reflector::store::<Pod>();
    let pod_stream = reflector::reflector(
        pod_writer,
        watcher(
            scope.api::<Pod>(&client),
            watcher::Config::default().labels(&format!("{}=kpipe-worker", build::LABEL_NAME)),
        )
        .modify(|p: &mut Pod| {
            p.metadata.managed_fields = None;
            p.metadata.annotations = None;
            p.spec = None;
        }),
    );
    let pod_driver = tokio::spawn(pod_stream.for_each(|ev| async move {
        if let Err(e) = ev {
            debug!(error = %e, "worker pod watch");
        }
    }));

    // Referenced Secrets (metadata only, not cached): a created, fixed or rotated Secret
    // reconciles the pipelines that reference it at once instead of at the next backoff.
    let secret_stream =
        watcher(scope.api::<PartialObjectMeta<Secret>>(&client), watcher::Config::default()).touched_objects();
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
    let pruner = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if prune_store.wait_until_ready().await.is_err() {
                continue;
            }
            let live = prune_store.state().iter().filter_map(|g| g.meta().uid.clone()).collect();
            prune_shared.prune(&prune_scope, &live);
        }
    });

    let ctx = Arc::new(Context { shared, deployments, config_maps, pods });
    info!(?scope, "starting ConsumerPipeline controller");
    Controller::for_stream(primary, pipelines)
        .owns_stream(dep_stream)
        .owns_stream(cm_stream)
        .watches_stream(secret_stream, referencing)
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
    info!(?scope, "controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_credentials_come_from_the_referenced_secrets() {
        let spec: ConsumerPipelineSpec = serde_json::from_value(serde_json::json!({
            "source": {
                "bootstrapServers": ["b:9096"], "topics": ["t"],
                "auth": {
                    "sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "user", "usernameKey": "u"}},
                    "tls": {"caSecretRef": {"name": "ca"}, "clientCertSecretRef": {"name": "client"}}
                }
            },
            "processor": {"noop": {}}
        }))
        .unwrap();
        let mut d = Dereferenced::default();
        d.data.insert("user".into(), BTreeMap::from([("u".into(), "alice".into()), ("password".into(), "pw".into())]));
        d.data.insert("ca".into(), BTreeMap::from([("ca.crt".into(), "CA".into())]));
        d.data
            .insert("client".into(), BTreeMap::from([("tls.crt".into(), "C".into()), ("tls.key".into(), "K".into())]));
        let c = cluster_for(&spec, &d);
        let sasl = c.sasl.unwrap();
        assert_eq!(
            (sasl.mechanism.as_str(), sasl.username.as_str(), sasl.password.as_str()),
            ("SCRAM-SHA-512", "alice", "pw")
        );
        let tls = c.tls.unwrap();
        assert_eq!(
            (tls.ca_pem.as_deref(), tls.cert_pem.as_deref(), tls.key_pem.as_deref()),
            (Some("CA"), Some("C"), Some("K"))
        );
        let plain: ConsumerPipelineSpec = serde_json::from_value(serde_json::json!({
            "source": {"bootstrapServers": ["b:9092"], "topics": ["t"]}, "processor": {"noop": {}}
        }))
        .unwrap();
        let c = cluster_for(&plain, &Dereferenced::default());
        assert!(c.sasl.is_none() && c.tls.is_none());
    }

    #[test]
    fn error_reasons_and_policy_classes() {
        assert_eq!(Error::InvalidObject("x".into()).reason(), "InvalidObject");
        assert_eq!(Error::CacheNotReady.reason(), "CacheNotReady");
    }
}
