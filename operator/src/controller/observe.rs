//! Step 2, observe: the pipeline's children (from the controller's caches, and the apiserver for
//! same-named objects the caches cannot hold), its worker pods, and Kafka (the lag probe, with the
//! idle-offset keeper tending the group before anyone reads its lag).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kpipe_api::v1alpha1::ConsumerPipeline;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use tracing::Instrument;

use super::{Context, PipelineState, Shared};
use crate::build::{self, CONFIG_HASH_ANNOTATION, ValidatedPipeline};
use crate::keepalive::Tended;
use crate::lag::PartitionOffsets;
use crate::probe::{Cluster, ProbeError};
use crate::status::Problem;

/// What the caches say about one child (Deployment or ConfigMap) of the pipeline's name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChildView {
    /// `spec.replicas` (Deployments only).
    pub replicas: Option<i32>,
    /// `status.readyReplicas` (Deployments only; 0 when unset).
    pub ready: i32,
    /// The config hash the object carries (the pod template's, for the Deployment).
    pub config_hash: Option<String>,
    /// Its owner references.
    pub owners: Vec<OwnerReference>,
}

/// The pipeline's children as the caches have them (`None`: not in the cache, which only holds objects
/// labelled as kpipe's).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Children {
    /// Name shared by the Deployment and the ConfigMap ([`build::child_name`]).
    pub name: String,
    pub deployment: Option<ChildView>,
    pub config_map: Option<ChildView>,
}

impl Children {
    /// `spec.replicas` of the Deployment, if there is one.
    pub fn replicas(&self) -> Option<i32> {
        self.deployment.as_ref().and_then(|d| d.replicas)
    }

    /// Ready replicas of the Deployment (0 without one).
    pub fn ready(&self) -> i32 {
        self.deployment.as_ref().map_or(0, |d| d.ready)
    }
}

/// May the pipeline write each child? `Ok(true)`: absent or controlled by it; `Ok(false)`: someone
/// else's; `Err`: the apiserver could not tell.
#[derive(Clone, Debug, PartialEq)]
pub struct Ownership {
    pub deployment: Result<bool, Problem>,
    pub config_map: Result<bool, Problem>,
}

impl Ownership {
    /// Both children may be written.
    pub fn both_ours(&self) -> bool {
        matches!((&self.deployment, &self.config_map), (Ok(true), Ok(true)))
    }
}

/// What Kafka said this poll.
#[derive(Debug)]
pub enum KafkaObservation {
    /// Not asked: the spec cannot be applied.
    NotProbed,
    /// The group's offsets (already corrected by what the keeper restored) and what the keeper did.
    Probed { offsets: Vec<PartitionOffsets>, tended: Tended },
    /// The probe failed.
    Failed(ProbeError),
}

/// Read the children of `name` in `ns` from the caches. A cache (Deployments, ConfigMaps, worker Pods) without a
/// complete first list within 30 s is a [`Problem::KubernetesApi`] naming it (nothing is decided or written without
/// knowing what exists).
pub async fn children(ctx: &Context, ns: &str, name: &str) -> Result<Children, Problem> {
    let caches = &ctx.children_ready;
    let all = [&caches.deployments, &caches.config_maps, &caches.pods];
    if let Err(missing) = crate::cache_ready::wait_all(&all, Duration::from_secs(30)).await {
        return Err(Problem::KubernetesApi {
            message: format!(
                "the {} cache has not synced within 30s (see the operator's log); nothing is written until it has",
                missing.join(", ")
            ),
        });
    }
    let child = build::child_name(name);
    let hash_of = |annotations: Option<&BTreeMap<String, String>>| {
        annotations.and_then(|a| a.get(CONFIG_HASH_ANNOTATION)).cloned()
    };
    let deployment = ctx.deployments.get(&ObjectRef::new(&child).within(ns)).map(|d| ChildView {
        replicas: d.spec.as_ref().and_then(|s| s.replicas),
        ready: d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0),
        config_hash: hash_of(
            d.spec.as_ref().and_then(|s| s.template.metadata.as_ref()).and_then(|m| m.annotations.as_ref()),
        ),
        owners: d.owner_references().to_vec(),
    });
    let config_map = ctx.config_maps.get(&ObjectRef::new(&child).within(ns)).map(|c| ChildView {
        config_hash: hash_of(c.metadata.annotations.as_ref()),
        owners: c.owner_references().to_vec(),
        ..Default::default()
    });
    Ok(Children { name: child, deployment, config_map })
}

/// Who controls each child. Never touch a child this pipeline does not control (a controller owner
/// reference with its uid), whatever else goes wrong: a user's same-named ConfigMap or Deployment is left
/// byte for byte as it is. The caches only hold objects labelled as ours, so an absent entry is looked up
/// directly.
pub async fn ownership(client: &Client, ns: &str, uid: &str, children: &Children) -> Ownership {
    let deployment = child_is_ours::<Deployment>(client, ns, &children.name, uid, children.deployment.as_ref()).await;
    let config_map = child_is_ours::<ConfigMap>(client, ns, &children.name, uid, children.config_map.as_ref()).await;
    Ownership { deployment, config_map }
}

/// Whether the child `ns/name` of kind `K` may be written by the pipeline with `uid`: absent, or controlled
/// by it. `cached` is the cache's view; without one the apiserver is asked (metadata only). A failed read is
/// a [`Problem::KubernetesApi`].
async fn child_is_ours<K>(
    client: &Client,
    ns: &str,
    name: &str,
    uid: &str,
    cached: Option<&ChildView>,
) -> Result<bool, Problem>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    if let Some(view) = cached {
        return Ok(controlled_by(&view.owners, uid));
    }
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api.get_metadata_opt(name).await {
        Ok(found) => Ok(found.is_none_or(|o| controlled_by(o.owner_references(), uid))),
        Err(e) => Err(Problem::KubernetesApi { message: format!("reading {} {ns}/{name}: {e}", K::kind(&())) }),
    }
}

/// Whether `owners` make `uid` the object's controller.
pub fn controlled_by(owners: &[OwnerReference], uid: &str) -> bool {
    owners.iter().any(|o| o.controller == Some(true) && o.uid == uid)
}

/// Probe the group's lag; tell a recreated topic apart by its topic ID (discarding the old topic's offsets,
/// [`crate::topic_identity`]); then let the keeper tend an idle group (refresh its offsets, or restore vanished
/// ones before the scaler sees the lag). `idle`: no worker pod and none wanted, and this replica leads.
pub async fn kafka(
    shared: &Shared,
    cp: &ConsumerPipeline,
    v: &ValidatedPipeline,
    cluster: Cluster,
    idle: bool,
    now: Duration,
    state: &mut PipelineState,
) -> KafkaObservation {
    let spec = &cp.spec;
    let started = Instant::now();
    // `latest` counts the records since the pipeline's creation (issue 13, probe.rs).
    let since = cp.metadata.creation_timestamp.as_ref().map(|t| t.0.as_millisecond());
    let probed = shared
        .probe
        .offsets_since(cluster.clone(), spec.source.topics.clone(), v.group_id.clone(), spec.source.start_offset, since)
        .instrument(tracing::debug_span!("probe", group = %v.group_id))
        .await;
    shared.metrics.observe_probe(probed.as_ref().err().map(ProbeError::reason), started.elapsed());
    let observation = match probed {
        Ok(mut offsets) => {
            let PipelineState { topics, offsets_book, tracker, .. } = state;
            let oref = cp.object_ref(&());
            topics
                .before_keepalive(
                    shared,
                    &cluster,
                    &v.group_id,
                    cp.status.as_ref(),
                    &mut offsets,
                    idle,
                    offsets_book,
                    tracker.as_mut(),
                    &oref,
                )
                .await;
            let tended = shared.keeper.tend(&cluster, &v.group_id, &mut offsets, idle, now, offsets_book).await;
            KafkaObservation::Probed { offsets, tended }
        }
        Err(e) => KafkaObservation::Failed(e),
    };
    shared.metrics.set_kafka_clients(&shared.probe.counts());
    observation
}
