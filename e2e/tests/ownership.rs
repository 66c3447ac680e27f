//! The operator never touches what it does not own (DESIGN.md §5 "ownership"), on the local test bed: a user's
//! ConfigMap or Deployment named like a pipeline's children stays byte for byte as it was while the pipeline is
//! created, reconciled and deleted, with the broker reachable and unreachable, and the pipeline says
//! `Ready=False ChildConflict`. A Deployment the apiserver refuses (a quota) is reported within a poll.
//!
//! Run: `cargo test -p kpipe-e2e --test ownership -- --nocapture` (needs `make testbed-up` and release builds).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ResourceQuota};
use kpipe_api::v1alpha1::ConsumerPipeline;
use kpipe_api::v1alpha1::condition::READY;
use kpipe_e2e::scenario::{
    self, Install, Sink, apply_pipeline, await_pipeline_status, condition, events_for, pipeline_manifest, unique_topic,
};
use kpipe_e2e::testbed::await_condition;
use kpipe_e2e::{TestBed, TestImage, bed};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;

/// The user's object as the apiserver stores it, without what the apiserver and the cluster's own controllers move
/// (resourceVersion, status, managedFields — checked separately). Fails if the operator's field manager ever wrote
/// to it.
fn fingerprint<K: serde::Serialize>(obj: &K) -> serde_json::Value {
    let mut v = serde_json::to_value(obj).unwrap();
    let managers: Vec<String> = v["metadata"]["managedFields"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["manager"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    assert!(!managers.iter().any(|m| m.contains("kpipe")), "kpipe wrote to the user's object: {managers:?}");
    if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
    }
    v
}

fn user_config_map(name: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"team": "payments"}},
        "data": {"settings.yaml": "retries: 3\n", "owner": "the user"},
    }))
    .unwrap()
}

fn user_deployment(bed: &TestBed, name: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": "users-own"}},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "users-own"}},
            "template": {
                "metadata": {"labels": {"app": "users-own"}},
                "spec": {"containers": [{"name": "app", "image": bed.test_image(TestImage::Sink)}]},
            },
        },
    }))
    .unwrap()
}

/// Creates the user's object, applies a pipeline whose child has its name, lets the operator reconcile for a while,
/// deletes the pipeline, and checks the object never changed and the pipeline said ChildConflict.
async fn user_object_survives<K>(bed: &TestBed, ns: &str, sink: &Sink, pipeline: &str, broker: &str, object: K)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(bed.client(), ns);
    let child = format!("{pipeline}-worker");
    api.create(&PostParams::default(), &object).await.expect("create the user's object");
    // The cluster's own controllers settle first (the Deployment controller stamps its revision annotation).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = fingerprint(&api.get(&child).await.expect("the user's object"));
    let topic = unique_topic("own");
    bed.create_topic(&topic, 2).await.expect("topic");
    let mut manifest = pipeline_manifest(pipeline, bed, &topic, sink, json!({}));
    manifest["spec"]["source"]["bootstrapServers"] = json!([broker]);
    apply_pipeline(bed, ns, manifest).await.expect("apply pipeline");
    let what = format!("{pipeline}: Ready=False ChildConflict");
    let status = await_pipeline_status(bed, ns, pipeline, &what, Duration::from_secs(60), |s| {
        condition(s, READY) == Some(("False".into(), "ChildConflict".into()))
    })
    .await
    .unwrap_or_else(|e| {
        bed.dump_pod_logs(ns);
        panic!("{e}")
    });
    // A few more polls (pollInterval 2 s): still nothing touched.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = fingerprint(&api.get(&child).await.expect("user's object still there"));
    assert_eq!(during, before, "{pipeline}: the operator changed the user's object");
    let events = events_for(bed, ns, pipeline).await.expect("events");
    assert!(
        events.iter().any(|(t, r, note)| t == "Warning" && r == "ChildConflict" && note.contains(&child)),
        "{pipeline}: no Warning Event naming {child}: {events:?}"
    );
    Api::<ConsumerPipeline>::namespaced(bed.client(), ns)
        .delete(pipeline, &DeleteParams::default())
        .await
        .expect("delete pipeline");
    // Garbage collection would have removed an object the pipeline owned by now.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = fingerprint(&api.get(&child).await.expect("the user's object survives the pipeline's deletion"));
    assert_eq!(after, before, "{pipeline}: the user's object changed after the pipeline was deleted");
    println!(
        "ownership: {} {child} with broker {broker}: unchanged; status {:?}",
        K::kind(&()),
        condition(&status, READY)
    );
    api.delete(&child, &DeleteParams::default()).await.expect("clean up");
}

#[tokio::test]
async fn user_objects_named_like_children_are_never_touched() {
    let bed = bed().await;
    let (ns, sink) =
        scenario::setup_with_sink(&bed, "e2e-own", &Install::default(), &[]).await.unwrap_or_else(|e| panic!("{e}"));
    let reachable = bed.kafka_bootstrap_pods().to_string();
    // Nothing listens on port 1: the lag probe fails (BrokerUnreachable) in the same reconcile.
    let unreachable = "127.0.0.1:1";
    for (i, broker) in [reachable.as_str(), unreachable].into_iter().enumerate() {
        let cm = format!("cm{i}");
        user_object_survives(&bed, ns.name(), &sink, &cm, broker, user_config_map(&format!("{cm}-worker"))).await;
        let dep = format!("dep{i}");
        user_object_survives(&bed, ns.name(), &sink, &dep, broker, user_deployment(&bed, &format!("{dep}-worker")))
            .await;
    }
    ns.delete().await.expect("delete");
}

#[tokio::test]
async fn a_deployment_the_apiserver_refuses_is_reported_within_a_poll() {
    let bed = bed().await;
    let (ns, sink) =
        scenario::setup_with_sink(&bed, "e2e-quota", &Install::default(), &[]).await.unwrap_or_else(|e| panic!("{e}"));
    // The quota admits the operator's and the sink's Deployments (2) and no more.
    let quota: ResourceQuota = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": "no-more-deployments"},
        "spec": {"hard": {"count/deployments.apps": "2"}},
    }))
    .unwrap();
    Api::<ResourceQuota>::namespaced(bed.client(), ns.name())
        .create(&PostParams::default(), &quota)
        .await
        .expect("quota");
    let in_force = |q: Option<&ResourceQuota>| q.and_then(|q| q.status.as_ref()).is_some_and(|s| s.hard.is_some());
    let quotas = Api::<ResourceQuota>::namespaced(bed.client(), ns.name());
    await_condition(quotas, "no-more-deployments", "quota in force", Duration::from_secs(60), in_force)
        .await
        .expect("quota status");
    let topic = unique_topic("quota");
    bed.create_topic(&topic, 2).await.expect("topic");
    apply_pipeline(&bed, ns.name(), pipeline_manifest("refused", &bed, &topic, &sink, json!({}))).await.expect("apply");
    let started = std::time::Instant::now();
    let status = await_pipeline_status(
        &bed,
        ns.name(),
        "refused",
        "Ready=False ChildApplyFailed",
        Duration::from_secs(30),
        |s| condition(s, READY).map(|c| c.1).as_deref() == Some("ChildApplyFailed"),
    )
    .await
    .unwrap_or_else(|e| {
        bed.dump_pod_logs(ns.name());
        panic!("{e}")
    });
    let message = status.condition(READY).map(|c| c.message.clone()).unwrap_or_default();
    println!("quota: reported in {:?}: {message}", started.elapsed());
    assert!(message.contains("refused-worker") && message.contains("quota"), "{message}");
    ns.delete().await.expect("delete");
}
