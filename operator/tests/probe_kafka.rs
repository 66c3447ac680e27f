#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The lag probe against the test bed's real Kafka broker.
//! Run: `make testbed-up` then `cargo test -p kpipe-operator --test probe_kafka -- --ignored`.

use std::sync::Arc;
use std::time::Duration;

use kpipe_e2e::testbed::TestBed;
use kpipe_operator::probe::{Cluster, LagProbe, ProbeError};
use kpipe_test_support::unique_name as unique;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn commit(bootstrap: &str, group: &str, topic: &str, offsets: &[(i32, i64)]) {
    let c: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o)).unwrap();
    }
    c.commit(&tpl, CommitMode::Sync).unwrap();
}

#[tokio::test]
async fn offsets_committed_missing_topic_and_unreachable_broker() {
    let bed = TestBed::connect().await.unwrap();
    let bootstrap = bed.kafka_bootstrap().to_string();
    let topic = unique("probe");
    bed.create_topic(&topic, 3).await.unwrap();
    bed.produce(&topic, 30).await.unwrap();

    let probe = Arc::new(LagProbe::new(Duration::from_secs(5)));
    let cluster = Cluster { bootstrap_servers: vec![bootstrap.clone()], ..Default::default() };
    let group = unique("probe-group");
    let offs = probe.offsets(cluster.clone(), vec![topic.clone()], group.clone()).await.unwrap();
    assert_eq!(offs.len(), 3);
    assert_eq!(offs.iter().map(|o| o.log_end).sum::<i64>(), 30);
    assert!(offs.iter().all(|o| o.log_start == 0 && o.committed.is_none()), "{offs:?}");

    let p0_end = offs.iter().find(|o| o.partition == 0).unwrap().log_end;
    commit(&bootstrap, &group, &topic, &[(0, p0_end.min(4))]);
    let offs = probe.offsets(cluster.clone(), vec![topic.clone()], group.clone()).await.unwrap();
    let p0 = offs.iter().find(|o| o.partition == 0).unwrap();
    assert_eq!(p0.committed, Some(p0_end.min(4)));
    assert!(offs.iter().filter(|o| o.partition != 0).all(|o| o.committed.is_none()));

    // Other groups on the same cluster share the cluster client and its connections.
    let before = probe.counts();
    for i in 0..20 {
        probe.offsets(cluster.clone(), vec![topic.clone()], format!("{group}-{i}")).await.unwrap();
    }
    let after = probe.counts();
    assert_eq!(after.clusters, 1);
    assert_eq!(after.groups, 0, "no per-group clients on a plaintext cluster");
    assert_eq!(after.offset_connections, before.offset_connections, "connections independent of the group count");
    assert!(after.offset_connections >= 1);

    let err = probe.offsets(cluster.clone(), vec![unique("no-such-topic")], group.clone()).await.unwrap_err();
    assert!(matches!(err, ProbeError::TopicNotFound(_)), "{err:?}");

    let dead = Cluster { bootstrap_servers: vec!["127.0.0.1:1".into()], ..Default::default() };
    let started = std::time::Instant::now();
    let err = probe.offsets(dead, vec![topic.clone()], group).await.unwrap_err();
    assert_eq!(err.reason(), "BrokerUnreachable", "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(probe.counts().clusters, 2);
}

/// The workers' retry report travels in the commit metadata: what a worker commits, the probe reads back.
#[tokio::test]
async fn retry_reports_travel_in_the_commit_metadata() {
    use kpipe_api::commit_metadata::{self, RetryReport};
    let bed = TestBed::connect().await.unwrap();
    let bootstrap = bed.kafka_bootstrap().to_string();
    let topic = unique("probe-retry");
    bed.create_topic(&topic, 2).await.unwrap();
    bed.produce(&topic, 20).await.unwrap();
    let group = unique("probe-retry-group");
    let report =
        RetryReport { offset: 3, attempts: 4, since_ms: 1_000, at_ms: 2_000, blocked: true, ..Default::default() };
    let c: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", &bootstrap).set("group.id", &group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut e = tpl.add_partition(&topic, 0);
    e.set_offset(Offset::Offset(3)).unwrap();
    e.set_metadata(commit_metadata::encode(Some(&report)));
    tpl.add_partition_offset(&topic, 1, Offset::Offset(2)).unwrap();
    c.commit(&tpl, CommitMode::Sync).unwrap();

    let probe = Arc::new(LagProbe::new(Duration::from_secs(5)));
    let cluster = Cluster { bootstrap_servers: vec![bootstrap], ..Default::default() };
    let offs = probe.offsets(cluster, vec![topic], group).await.unwrap();
    let p0 = offs.iter().find(|o| o.partition == 0).unwrap();
    let p1 = offs.iter().find(|o| o.partition == 1).unwrap();
    assert_eq!((p0.committed, p0.retry), (Some(3), Some(report)));
    assert_eq!((p1.committed, p1.retry), (Some(2), None), "no metadata, no report");
}

/// Under `latest`, a never-committed partition counts the records produced since the pipeline started (Kafka
/// offsets-for-times on the real broker), which is where the workers start (issue 13).
#[tokio::test]
async fn latest_counts_records_since_the_pipeline_started() {
    let bed = TestBed::connect().await.unwrap();
    let bootstrap = bed.kafka_bootstrap().to_string();
    let topic = unique("probe-since");
    bed.create_topic(&topic, 1).await.unwrap();
    bed.produce(&topic, 10).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    tokio::time::sleep(Duration::from_millis(100)).await;
    bed.produce(&topic, 4).await.unwrap();

    let probe = Arc::new(LagProbe::new(Duration::from_secs(5)));
    let cluster = Cluster { bootstrap_servers: vec![bootstrap.clone()], ..Default::default() };
    let group = unique("probe-since-group");
    let latest = kpipe_api::v1alpha1::StartOffset::Latest;
    let offs = probe.offsets_since(cluster.clone(), vec![topic.clone()], group.clone(), latest, Some(started)).await;
    let offs = offs.unwrap();
    assert_eq!((offs[0].log_end, offs[0].committed), (14, Some(10)), "{offs:?}");
    assert_eq!(kpipe_operator::lag::partition_lag(&offs[0], latest), 4);
    // Nothing produced since: the log end (a new pipeline does not count history).
    let later = started + 3_600_000;
    let offs = probe.offsets_since(cluster.clone(), vec![topic.clone()], group.clone(), latest, Some(later)).await;
    assert_eq!(offs.unwrap()[0].committed, Some(14));
    // A real commit wins.
    commit(&bootstrap, &group, &topic, &[(0, 12)]);
    let offs = probe.offsets_since(cluster, vec![topic], group, latest, Some(started)).await.unwrap();
    assert_eq!(offs[0].committed, Some(12));
}

/// Kafka topic IDs (Metadata v12) tell a recreated topic from the old one: the same name gets a new ID, a missing
/// topic has none (issue 13).
#[tokio::test]
async fn topic_ids_change_when_a_topic_is_recreated() {
    use kpipe_operator::group_offsets::GroupOffsets;
    let bed = TestBed::connect().await.unwrap();
    let topic = unique("topic-id");
    bed.create_topic(&topic, 2).await.unwrap();
    let go = GroupOffsets::new(vec![bed.kafka_bootstrap().to_string()], Duration::from_secs(5));
    let missing = unique("never-created");
    let ids = go.topic_ids(&[topic.clone(), missing.clone()]).unwrap();
    let first = ids.get(&topic).cloned().flatten().expect("an ID for an existing topic");
    assert_eq!(first.len(), 22, "Kafka's base64 form: {first}");
    assert_eq!(ids.get(&missing), Some(&None), "a missing topic has no ID: {ids:?}");
    assert_eq!(go.topic_ids(std::slice::from_ref(&topic)).unwrap().get(&topic), Some(&Some(first.clone())));

    let admin = bed.kafka_admin().unwrap();
    let opts = rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    admin.delete_topics(&[topic.as_str()], &opts).await.unwrap();
    // The broker may briefly refuse to recreate a topic that is still being deleted.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while bed.create_topic(&topic, 2).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "topic not recreated");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let second = go.topic_ids(std::slice::from_ref(&topic)).unwrap().get(&topic).cloned().flatten();
    assert!(second.as_ref().is_some_and(|s| *s != first), "new ID after the recreate: {first} → {second:?}");
}
