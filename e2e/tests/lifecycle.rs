//! Topic and offset lifecycle on the local test bed (issue 13): a topic recreated under a running pipeline,
//! partitions added under `latest` and `earliest`, a committed offset trimmed away under `latest`, and a topic
//! deleted and left deleted. Every pipeline uses the users' configuration (`minReplicas: 0`), and every scenario
//! checks the exact ids delivered: each id produced after the event reaches the sink within the stated bound.
//!
//! Run: `cargo test -p kpipe-e2e --test lifecycle -- --test-threads=1 --nocapture` on a running bed. The operator
//! and worker images can be pointed at other builds with `KPIPE_E2E_OPERATOR_IMAGE` / `KPIPE_E2E_WORKER_IMAGE`
//! (see `kpipe_e2e::scenario`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kpipe_api::v1alpha1::ConsumerPipelineStatus;
use kpipe_api::v1alpha1::condition::DEGRADED;
use kpipe_e2e::scenario::{
    self, Install, Sink, apply_pipeline, await_pipeline_status, condition, events_for, pipeline_manifest,
    pipeline_status, unique_topic, worker_replicas,
};
use kpipe_e2e::testbed::wait_for;
use kpipe_e2e::{TempNamespace, TestBed, bed};
use rdkafka::admin::{AdminOptions, NewPartitions};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Scaling of every pipeline here: the users' `minReplicas: 0`, a 2 s poll.
const POLL: Duration = Duration::from_secs(2);

async fn setup(bed: &TestBed, prefix: &str) -> (TempNamespace, Sink) {
    scenario::setup_with_sink(bed, prefix, &Install::default(), &[]).await.unwrap_or_else(|e| panic!("{e}"))
}

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i:08}")).collect()
}

/// Produces each id as a record (key = id) to `partition` (or by key when `None`), waiting for every ack.
async fn produce_ids(bed: &TestBed, topic: &str, partition: Option<i32>, ids: &[String]) {
    let producer = bed.producer().expect("producer");
    let mut pending = Vec::with_capacity(ids.len());
    for id in ids {
        let mut record = FutureRecord::to(topic).key(id.as_bytes()).payload(id.as_bytes());
        if let Some(p) = partition {
            record = record.partition(p);
        }
        pending.push(producer.send(record, Duration::from_secs(30)));
    }
    for p in pending {
        p.await.unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
    }
}

/// Waits until the sink has every id of `expected`; returns how long that took. Panics naming missing ids.
async fn wait_delivered(bed: &TestBed, ns: &str, sink: &Sink, expected: &[String], timeout: Duration) -> Duration {
    let started = Instant::now();
    let expected: BTreeSet<&String> = expected.iter().collect();
    loop {
        let got = sink.ids().await.unwrap_or_default();
        let got: BTreeSet<&String> = got.iter().collect();
        let missing: Vec<&&String> = expected.iter().filter(|id| !got.contains(**id)).collect();
        if missing.is_empty() {
            return started.elapsed();
        }
        if started.elapsed() > timeout {
            bed.dump_pod_logs(ns);
            panic!(
                "{} of {} ids not delivered after {timeout:?}, e.g. {:?}",
                missing.len(),
                expected.len(),
                &missing[..missing.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn kafka_config(bed: &TestBed) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", bed.kafka_bootstrap()).set("allow.auto.create.topics", "false");
    c
}

async fn delete_topic(bed: &TestBed, topic: &str) {
    let admin = bed.kafka_admin().expect("admin");
    let res =
        admin.delete_topics(&[topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))).await;
    for r in res.expect("delete topic") {
        r.unwrap_or_else(|(t, code)| panic!("delete topic {t}: {code}"));
    }
    // Gone from the metadata (an empty partition list or an error).
    let cfg = kafka_config(bed);
    let topic = topic.to_string();
    wait_for(&format!("topic {topic} gone"), Duration::from_secs(60), || {
        let (cfg, topic) = (cfg.clone(), topic.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let c: BaseConsumer = cfg.create().ok()?;
                let md = c.fetch_metadata(Some(&topic), Duration::from_secs(5)).ok()?;
                let t = md.topics().first()?;
                (t.error().is_some() || t.partitions().is_empty()).then_some(())
            })
            .await
            .ok()
            .flatten()
        }
    })
    .await
    .expect("topic deleted");
}

async fn add_partitions(bed: &TestBed, topic: &str, total: usize) {
    let admin = bed.kafka_admin().expect("admin");
    let res = admin
        .create_partitions(
            &[NewPartitions::new(topic, total)],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create partitions");
    for r in res {
        r.unwrap_or_else(|(t, code)| panic!("add partitions to {t}: {code}"));
    }
    let cfg = kafka_config(bed);
    let topic = topic.to_string();
    wait_for(&format!("{topic} has {total} partitions"), Duration::from_secs(30), || {
        let (cfg, topic) = (cfg.clone(), topic.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let c: BaseConsumer = cfg.create().ok()?;
                let md = c.fetch_metadata(Some(&topic), Duration::from_secs(5)).ok()?;
                (md.topics().first()?.partitions().len() == total).then_some(())
            })
            .await
            .ok()
            .flatten()
        }
    })
    .await
    .expect("partitions visible");
}

/// Moves the log start of `topic`/`partition` to `offset` with DeleteRecords: what retention does to the log start
/// (the bed's broker checks retention every 5 minutes, so waiting for it would dominate the test).
async fn trim_log(bed: &TestBed, topic: &str, partition: i32, offset: i64) {
    let admin = bed.kafka_admin().expect("admin");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset)).expect("tpl");
    let res = admin.delete_records(&tpl, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))).await;
    let res = res.expect("delete records");
    for e in res.elements() {
        e.error().unwrap_or_else(|err| panic!("delete records {topic} [{partition}]: {err}"));
        assert_eq!(e.offset(), Offset::Offset(offset), "new log start");
    }
}

/// Asserts that no committed offset of the pipeline's group is beyond its partition's log end.
async fn assert_commits_within_log_end(bed: &TestBed, topic: &str, group: &str) {
    let committed = bed.committed_offsets(topic, group).await.expect("committed offsets");
    let ends = bed.end_offsets(topic).await.expect("end offsets");
    for (p, c) in committed {
        if let (Some(c), Some(end)) = (c, ends.get(&p)) {
            assert!(c <= *end, "{topic} [{p}]: committed {c} beyond the log end {end}");
        }
    }
}

/// Waits until the pipeline's `TopicRecreated` condition is False again (the old offsets were discarded and the
/// new topic ID recorded).
async fn wait_topic_recreated_done(bed: &TestBed, ns: &str, pipeline: &str) {
    let done = |s: &ConsumerPipelineStatus| condition(s, "TopicRecreated").is_some_and(|c| c.0 == "False");
    await_pipeline_status(bed, ns, pipeline, "TopicRecreated=False again", Duration::from_secs(90), done)
        .await
        .unwrap_or_else(|e| {
            bed.dump_pod_logs(ns);
            panic!("{e}")
        });
}

fn group(ns: &TempNamespace, pipeline: &str) -> String {
    format!("{}.{pipeline}", ns.name())
}

/// Issue 13, item 1: 1,000 records consumed, the topic deleted and recreated with the same name, 100 new records.
/// All 100 arrive (they used to be dropped as "out of order"), and the group never commits the old offset 1000 to
/// the new topic.
#[tokio::test]
async fn recreated_topic_under_a_running_pipeline_delivers_every_new_record() {
    let _serial = SERIAL.lock().await;
    let bed = bed().await;
    let (ns, sink) = setup(&bed, "e2e-recreate").await;
    let topic = unique_topic("recreate");
    bed.create_topic(&topic, 1).await.expect("topic");
    // A long cooldown keeps the worker running through the event (minReplicas stays 0).
    let manifest = pipeline_manifest("rc", &bed, &topic, &sink, json!({"scaling": {"cooldownToZero": "600s"}}));
    apply_pipeline(&bed, ns.name(), manifest).await.expect("apply");
    let before = ids("old", 0..1000);
    produce_ids(&bed, &topic, Some(0), &before).await;
    wait_delivered(&bed, ns.name(), &sink, &before, Duration::from_secs(120)).await;
    assert!(worker_replicas(&bed, ns.name(), "rc").await.unwrap() >= 1, "the worker runs through the event");

    delete_topic(&bed, &topic).await;
    bed.create_topic(&topic, 1).await.expect("recreate");
    let after = ids("new", 0..100);
    let produced = Instant::now();
    produce_ids(&bed, &topic, Some(0), &after).await;
    let took = wait_delivered(&bed, ns.name(), &sink, &after, Duration::from_secs(120)).await;
    println!("recreated topic: 100/100 new records delivered {:.1}s after they were produced", took.as_secs_f64());
    // The operator sees the new topic ID, holds the workers at zero and moves the group to the new log start (the
    // 100 records are delivered again: at least once); then the group's offset must settle on the new topic's
    // scale, never the old 1000.
    wait_for("Warning TopicRecreated Event", Duration::from_secs(30), || async {
        let events = events_for(&bed, ns.name(), "rc").await.ok()?;
        events.iter().any(|(ty, reason, _)| ty == "Warning" && reason == "TopicRecreated").then_some(())
    })
    .await
    .expect("TopicRecreated Event");
    wait_topic_recreated_done(&bed, ns.name(), "rc").await;
    wait_for("committed at the new log end", Duration::from_secs(90), || async {
        assert_commits_within_log_end(&bed, &topic, &group(&ns, "rc")).await;
        let committed = bed.committed_offsets(&topic, &group(&ns, "rc")).await.ok()?;
        (committed.get(&0).copied().flatten() == Some(100)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e} ({produced:?})"));
    ns.delete().await.ok();
}

/// Issue 13, recreated topic at zero replicas (`minReplicas: 0`): 300 records consumed and committed, the pipeline
/// scaled to zero; the topic deleted and recreated with the same name and partition count, and 500 records (more
/// than the old committed offset 300) produced while at zero. Kafka deletes the old topic's offsets with it, and the
/// operator's record of the old position (300) must not be restored onto the new topic: the topic ID tells the two
/// apart. Every id produced after the recreate is delivered, and a Warning Event `TopicRecreated` says what happened.
#[tokio::test]
async fn recreated_topic_at_zero_replicas_refilled_past_the_old_offset_delivers_every_new_record() {
    let _serial = SERIAL.lock().await;
    let bed = bed().await;
    let (ns, sink) = setup(&bed, "e2e-recreate-zero").await;
    let topic = unique_topic("recreate-zero");
    bed.create_topic(&topic, 1).await.expect("topic");
    apply_pipeline(&bed, ns.name(), pipeline_manifest("rz", &bed, &topic, &sink, json!({}))).await.expect("apply");
    let before = ids("old", 0..300);
    produce_ids(&bed, &topic, Some(0), &before).await;
    wait_delivered(&bed, ns.name(), &sink, &before, Duration::from_secs(120)).await;
    wait_for("committed at 300", Duration::from_secs(30), || async {
        let c = bed.committed_offsets(&topic, &group(&ns, "rz")).await.ok()?;
        (c.get(&0).copied().flatten() == Some(300)).then_some(())
    })
    .await
    .expect("commit");
    wait_for("back to zero replicas, no worker pod", Duration::from_secs(90), || async {
        let zero = worker_replicas(&bed, ns.name(), "rz").await.ok()? == 0;
        (zero && scenario::worker_pods(&bed, ns.name(), "rz").await.is_empty()).then_some(())
    })
    .await
    .expect("scaled to zero");
    let recorded = |s: &ConsumerPipelineStatus| s.topics.first().is_some_and(|t| t.topic_id.is_some());
    let status = await_pipeline_status(&bed, ns.name(), "rz", "topic ID recorded", Duration::from_secs(30), recorded)
        .await
        .expect("topic ID in status");
    let old_id = status.topics.first().and_then(|t| t.topic_id.clone()).expect("topic ID in status");
    // Give the operator a few idle polls to record the position (what a restore would put back).
    tokio::time::sleep(POLL * 3).await;

    delete_topic(&bed, &topic).await;
    bed.create_topic(&topic, 1).await.expect("recreate");
    let after = ids("new", 0..500);
    let produced = Instant::now();
    produce_ids(&bed, &topic, Some(0), &after).await;
    let took = wait_delivered(&bed, ns.name(), &sink, &after, Duration::from_secs(120)).await;
    println!(
        "recreated topic at zero replicas: 500/500 records of the new topic delivered {:.1}s after they were produced",
        took.as_secs_f64()
    );
    assert!(took <= Duration::from_secs(60), "delivered within 60 s of produce: {took:?}");
    let delivered = sink.ids().await.unwrap();
    let delivered_new: BTreeSet<&String> = delivered.iter().filter(|id| id.starts_with("new-")).collect();
    assert_eq!(delivered_new.len(), after.len(), "exactly the new ids, each of them");
    let events = events_for(&bed, ns.name(), "rz").await.unwrap();
    let warned = events.iter().find(|(ty, reason, _)| ty == "Warning" && reason == "TopicRecreated");
    let (_, _, note) = warned.unwrap_or_else(|| panic!("Warning TopicRecreated Event in {events:?}"));
    assert!(note.contains(&topic) && note.contains(&old_id), "{note}");
    let status = pipeline_status(&bed, ns.name(), "rz").await.unwrap();
    let new_id = status.topics.first().and_then(|t| t.topic_id.clone());
    assert!(new_id.is_some() && new_id.as_ref() != Some(&old_id), "new topic ID recorded: {new_id:?} vs {old_id}");
    wait_for("committed at the new log end", Duration::from_secs(30), || async {
        let c = bed.committed_offsets(&topic, &group(&ns, "rz")).await.ok()?;
        (c.get(&0).copied().flatten() == Some(500)).then_some(())
    })
    .await
    .expect("commit on the new topic");
    assert_commits_within_log_end(&bed, &topic, &group(&ns, "rz")).await;
    println!("(produced → all delivered {:?})", produced.elapsed());
    ns.delete().await.ok();
}

/// Issue 13, item 2: partitions added to a running pipeline's topic (2 → 4) with records produced to the new
/// ones right away. Under `latest` they used to start at their log end (0 of 100 delivered); under `earliest` they
/// arrived after ~4.5 minutes. Now both deliver every record within a few poll intervals.
async fn added_partitions(start: &str) {
    let bed = bed().await;
    let (ns, sink) = setup(&bed, &format!("e2e-addpart-{start}")).await;
    let topic = unique_topic(&format!("addpart-{start}"));
    bed.create_topic(&topic, 2).await.expect("topic");
    // History produced before the pipeline exists: `latest` never replays it, `earliest` does.
    let history = ids("history", 0..50);
    produce_ids(&bed, &topic, None, &history).await;
    // creationTimestamp has a resolution of one second: keep the history clearly before it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let manifest = pipeline_manifest(
        "ap",
        &bed,
        &topic,
        &sink,
        json!({"source": {"startOffset": start}, "scaling": {"cooldownToZero": "600s", "activationLag": 0}}),
    );
    apply_pipeline(&bed, ns.name(), manifest).await.expect("apply");
    let first = ids("first", 0..100);
    produce_ids(&bed, &topic, None, &first).await;
    wait_delivered(&bed, ns.name(), &sink, &first, Duration::from_secs(120)).await;

    add_partitions(&bed, &topic, 4).await;
    let added = Instant::now();
    let mut on_new = ids("p2", 0..50);
    produce_ids(&bed, &topic, Some(2), &on_new).await;
    let p3 = ids("p3", 0..50);
    produce_ids(&bed, &topic, Some(3), &p3).await;
    on_new.extend(p3);
    let took = wait_delivered(&bed, ns.name(), &sink, &on_new, Duration::from_secs(60)).await;
    let since_added = added.elapsed();
    println!(
        "added partitions ({start}): 100/100 records on the new partitions delivered {:.1}s after produce, {:.1}s \
         after the partitions were added (pollInterval {POLL:?})",
        took.as_secs_f64(),
        since_added.as_secs_f64()
    );
    assert!(since_added <= Duration::from_secs(30), "new partitions picked up in {since_added:?}");
    let delivered = sink.ids().await.unwrap();
    let history_delivered = history.iter().filter(|id| delivered.contains(id)).count();
    match start {
        "latest" => assert_eq!(history_delivered, 0, "latest never replays records produced before the pipeline"),
        _ => assert_eq!(history_delivered, history.len(), "earliest delivers the history"),
    }
    assert_commits_within_log_end(&bed, &topic, &group(&ns, "ap")).await;
    ns.delete().await.ok();
}

#[tokio::test]
async fn added_partitions_under_latest_deliver_every_record() {
    let _serial = SERIAL.lock().await;
    added_partitions("latest").await;
}

#[tokio::test]
async fn added_partitions_under_earliest_deliver_every_record() {
    let _serial = SERIAL.lock().await;
    added_partitions("earliest").await;
}

/// Partitions added while the pipeline is scaled to zero (`latest`): the records on them must wake it and be
/// delivered.
#[tokio::test]
async fn added_partitions_while_at_zero_replicas_under_latest_wake_the_pipeline() {
    let _serial = SERIAL.lock().await;
    let bed = bed().await;
    let (ns, sink) = setup(&bed, "e2e-addpart-zero").await;
    let topic = unique_topic("addpart-zero");
    bed.create_topic(&topic, 2).await.expect("topic");
    let manifest = pipeline_manifest("az", &bed, &topic, &sink, json!({"source": {"startOffset": "latest"}}));
    apply_pipeline(&bed, ns.name(), manifest).await.expect("apply");
    let first = ids("first", 0..100);
    produce_ids(&bed, &topic, None, &first).await;
    wait_delivered(&bed, ns.name(), &sink, &first, Duration::from_secs(120)).await;
    wait_for("back to zero replicas", Duration::from_secs(90), || async {
        (worker_replicas(&bed, ns.name(), "az").await.ok()? == 0).then_some(())
    })
    .await
    .expect("scaled to zero");
    add_partitions(&bed, &topic, 4).await;
    let added = Instant::now();
    let on_new = ids("p3", 0..100);
    produce_ids(&bed, &topic, Some(3), &on_new).await;
    wait_delivered(&bed, ns.name(), &sink, &on_new, Duration::from_secs(60)).await;
    println!(
        "added partitions at zero replicas (latest): 100/100 delivered {:.1}s after the partitions were added",
        added.elapsed().as_secs_f64()
    );
    ns.delete().await.ok();
}

/// Issue 13, item 3: under `latest`, the group committed at 200 and the log start moved to 500 while the pipeline
/// was at zero replicas. The worker used to reset to the log END and skip everything; now it starts at the earliest
/// retained record (500), the operator counts exactly that lag, and a Warning Event says what happened.
#[tokio::test]
async fn committed_offset_trimmed_by_retention_under_latest_resumes_at_the_earliest_retained_record() {
    let _serial = SERIAL.lock().await;
    let bed = bed().await;
    let (ns, sink) = setup(&bed, "e2e-trimmed").await;
    let topic = unique_topic("trimmed");
    bed.create_topic(&topic, 1).await.expect("topic");
    let manifest = pipeline_manifest("tr", &bed, &topic, &sink, json!({"source": {"startOffset": "latest"}}));
    apply_pipeline(&bed, ns.name(), manifest).await.expect("apply");
    let committed_part = ids("c", 0..200);
    produce_ids(&bed, &topic, Some(0), &committed_part).await;
    wait_delivered(&bed, ns.name(), &sink, &committed_part, Duration::from_secs(120)).await;
    wait_for("committed at 200", Duration::from_secs(30), || async {
        let c = bed.committed_offsets(&topic, &group(&ns, "tr")).await.ok()?;
        (c.get(&0).copied().flatten() == Some(200)).then_some(())
    })
    .await
    .expect("commit");
    // Suspend: zero replicas while the backlog arrives and is trimmed.
    scenario::patch_pipeline_spec(&bed, ns.name(), "tr", json!({"suspend": true})).await.expect("suspend");
    wait_for("zero replicas", Duration::from_secs(60), || async {
        (worker_replicas(&bed, ns.name(), "tr").await.ok()? == 0).then_some(())
    })
    .await
    .expect("suspended");
    // The pods too: on a real kubelet (kind) the worker keeps committing until its SIGTERM arrives.
    scenario::wait_workers_gone(&bed, ns.name(), "tr", Duration::from_secs(90)).await.expect("workers gone");
    let backlog = ids("b", 200..700);
    produce_ids(&bed, &topic, Some(0), &backlog).await;
    trim_log(&bed, &topic, 0, 500).await;
    // The operator sees the out-of-range commit and counts lag from the log start.
    let lag_200 = |s: &ConsumerPipelineStatus| s.lag.as_ref().is_some_and(|l| l.total == 200);
    await_pipeline_status(
        &bed,
        ns.name(),
        "tr",
        "lag 200 counted from the log start",
        Duration::from_secs(30),
        lag_200,
    )
    .await
    .expect("lag from the log start");
    let events = events_for(&bed, ns.name(), "tr").await.unwrap();
    let event = events.iter().find(|(_, reason, _)| reason == "OffsetOutOfRange");
    let (ty, _, note) = event.unwrap_or_else(|| panic!("OffsetOutOfRange Event in {events:?}"));
    assert_eq!(ty, "Warning");
    assert!(note.contains("committed 200") && note.contains("reset to 500"), "{note}");

    let resumed = Instant::now();
    scenario::patch_pipeline_spec(&bed, ns.name(), "tr", json!({"suspend": false})).await.expect("resume");
    let retained = ids("b", 500..700);
    let took = wait_delivered(&bed, ns.name(), &sink, &retained, Duration::from_secs(120)).await;
    println!(
        "trimmed commit (latest): 200/200 retained records delivered {:.1}s after resuming from zero replicas",
        took.as_secs_f64()
    );
    let after = ids("after", 0..50);
    produce_ids(&bed, &topic, Some(0), &after).await;
    wait_delivered(&bed, ns.name(), &sink, &after, Duration::from_secs(60)).await;
    let delivered = sink.ids().await.unwrap();
    let trimmed_delivered = ids("b", 200..500).iter().filter(|id| delivered.contains(id)).count();
    assert_eq!(trimmed_delivered, 0, "records deleted before anyone read them cannot be delivered");
    assert_commits_within_log_end(&bed, &topic, &group(&ns, "tr")).await;
    println!("(resume → delivered {:?})", resumed.elapsed());
    ns.delete().await.ok();
}

/// A topic deleted and left deleted: the pipeline says so (Degraded, reason TopicNotFound, and a Warning Event)
/// while it is gone.
#[tokio::test]
async fn deleted_topic_shows_topic_not_found() {
    let _serial = SERIAL.lock().await;
    let bed = bed().await;
    let (ns, sink) = setup(&bed, "e2e-deleted").await;
    let topic = unique_topic("deleted");
    bed.create_topic(&topic, 1).await.expect("topic");
    apply_pipeline(&bed, ns.name(), pipeline_manifest("dl", &bed, &topic, &sink, json!({}))).await.expect("apply");
    let some = ids("d", 0..100);
    produce_ids(&bed, &topic, Some(0), &some).await;
    wait_delivered(&bed, ns.name(), &sink, &some, Duration::from_secs(120)).await;
    let deleted = Instant::now();
    delete_topic(&bed, &topic).await;
    let not_found = |s: &ConsumerPipelineStatus| {
        condition(s, DEGRADED).is_some_and(|(status, reason)| status == "True" && reason == "TopicNotFound")
    };
    await_pipeline_status(&bed, ns.name(), "dl", "Degraded TopicNotFound", Duration::from_secs(60), not_found)
        .await
        .unwrap_or_else(|e| {
            bed.dump_pod_logs(ns.name());
            panic!("{e}")
        });
    let seen_after = deleted.elapsed();
    let events = events_for(&bed, ns.name(), "dl").await.unwrap();
    assert!(
        events.iter().any(|(ty, reason, _)| ty == "Warning" && reason == "TopicNotFound"),
        "Warning TopicNotFound Event in {events:?}"
    );
    println!("deleted topic: Degraded/TopicNotFound {:.1}s after the deletion", seen_after.as_secs_f64());
    ns.delete().await.ok();
}
