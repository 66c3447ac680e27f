#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The operator process on the test bed (real apiserver, real Kafka) restores the committed offsets
//! of an idle pipeline after an admin deletes its group: Warning Event `OffsetsRestored` naming the
//! partitions, the offsets and their metadata back, no worker started, the metric counted.
//!
//! `make testbed-up`, then `cargo test -p kpipe-operator --test bed_idle_offsets -- --nocapture`.

mod common;

use std::time::Duration;

use common::Operator;
use k8s_openapi::api::apps::v1::Deployment;
use kpipe_api::v1alpha1::ConsumerPipeline;
use kpipe_e2e::testbed::{TestBed, await_condition, wait_for};
use kpipe_operator::group_offsets::{Commit, GroupOffsets};
use kube::Api;
use kube::api::PostParams;
use rdkafka::admin::AdminOptions;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

#[tokio::test]
async fn admin_deleted_offsets_of_an_idle_pipeline_are_restored_loudly() {
    let bed = TestBed::connect().await.unwrap();
    let ns = bed.temp_namespace("op-idle").await.unwrap();
    let ns = ns.name().to_string();
    let topic = format!("{ns}-in");
    bed.create_topic(&topic, 3).await.unwrap();
    bed.produce(&topic, 30).await.unwrap();
    let ends = bed.end_offsets(&topic).await.unwrap();
    let group = format!("{ns}.idle");

    // The group has consumed everything (as workers would have) and left: lag 0, pipeline at zero.
    let meta = "{\"kpipe\":1}\u{1}report";
    let c: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bed.kafka_bootstrap()).set("group.id", &group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for (p, end) in &ends {
        tpl.add_partition_offset(&topic, *p, Offset::Offset(*end)).unwrap();
        tpl.find_partition(&topic, *p).unwrap().set_metadata(meta);
    }
    c.commit(&tpl, CommitMode::Sync).unwrap();
    drop(c);

    let op = Operator::start(&bed.kubeconfig(), &ns, &[]);
    let client = bed.client();
    let cps: Api<ConsumerPipeline> = Api::namespaced(client.clone(), &ns);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let cp: ConsumerPipeline = serde_json::from_value(serde_json::json!({
        "apiVersion": "kpipe.io/v1alpha1", "kind": "ConsumerPipeline",
        "metadata": {"name": "idle", "namespace": ns},
        "spec": {
            "source": {"bootstrapServers": [bed.kafka_bootstrap()], "topics": [topic], "groupId": group},
            "processor": {"noop": {}},
            "scaling": {"pollInterval": "1s"},
        }
    }))
    .unwrap();
    cps.create(&PostParams::default(), &cp).await.unwrap();
    // Idle and recorded: a few polls at lag 0.
    let idle = |cp: Option<&ConsumerPipeline>| {
        cp.and_then(|cp| cp.status.as_ref()?.lag.as_ref()).is_some_and(|lag| lag.total == 0)
    };
    await_condition(cps.clone(), "idle", "pipeline idle at lag 0", Duration::from_secs(60), idle).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // An admin deletes the group: every committed offset is gone at once.
    let admin = bed.kafka_admin().unwrap();
    let r = admin.delete_groups(&[group.as_str()], &AdminOptions::new()).await.unwrap();
    assert!(r.iter().all(|x| x.is_ok()), "{r:?}");

    let go = GroupOffsets::new(vec![bed.kafka_bootstrap().to_string()], Duration::from_secs(5));
    let parts: Vec<(String, i32)> = ends.keys().map(|p| (topic.clone(), *p)).collect();
    wait_for("offsets restored", Duration::from_secs(30), || async {
        let got = go.committed(&group, &parts).ok()?;
        ends.iter()
            .all(|(p, end)| {
                got.get(&(topic.clone(), *p)) == Some(&Some(Commit { offset: *end, metadata: meta.into() }))
            })
            .then_some(())
    })
    .await
    .unwrap();

    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, &ns);
    let note = wait_for("OffsetsRestored Event", Duration::from_secs(30), || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.into_iter().find(|e| e.reason.as_deref() == Some("OffsetsRestored")).and_then(|e| e.note)
    })
    .await
    .unwrap();
    println!("{note}");
    for (p, end) in &ends {
        assert!(note.contains(&format!("{topic}/{p} (was {end}, found none)")), "{note}");
    }
    let restored = op.metric("kpipe_operator_offsets_restored_total").await;
    assert_eq!(restored, Some(ends.len() as f64));
    // The lag never jumped: no worker was started for records that were already processed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let d = deps.get("idle-worker").await.unwrap();
    assert_eq!(d.spec.and_then(|s| s.replicas), Some(0));
    let status = cps.get("idle").await.unwrap().status.unwrap();
    assert_eq!(status.lag.as_ref().unwrap().total, 0);
    // The condition says it too, naming the partitions, until a worker consumes from the restored positions.
    let cond = status.condition("OffsetsRestored").expect("OffsetsRestored condition");
    assert_eq!(cond.status, "True", "{cond:?}");
    assert!(cond.message.contains(&format!("{topic}/")), "{cond:?}");
    let reasons: Vec<String> =
        events.list(&Default::default()).await.unwrap().items.into_iter().filter_map(|e| e.reason).collect();
    assert!(!reasons.iter().any(|r| r == "Activated"), "a worker was woken for processed records: {reasons:?}");
}
