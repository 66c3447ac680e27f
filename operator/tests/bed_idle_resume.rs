#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Idle pipelines keep their place, end to end on the test bed: the operator process from this
//! build, real worker pods (the bed's process kubelet), the HTTP test sink, the bed's Kafka. A
//! pipeline delivers 100 ids, is suspended (group empty), an admin deletes its group, new ids are
//! produced and the pipeline resumed: the sink must hold exactly the 110 ids, each once (nothing
//! delivered again from `startOffset: earliest`), and the operator must say what it restored.
//!
//! The retention variant runs against a private broker with `offsets.retention.minutes=1` (a
//! read-only broker config; the shared bed broker keeps 7 days), listening on the bed's bridge IP so
//! worker pods reach it: a suspended `earliest` pipeline and a scaled-to-zero `latest` pipeline sit
//! idle for 100 s, well past retention, then get new records: exact ids, each once, for both.
//!
//! The restart variant stops the operator while its idle pipeline's offsets expire and checks that a new
//! operator process restores them from the record in status.
//!
//! `make testbed-up`, then `cargo test -p kpipe-operator --test bed_idle_resume -- --nocapture --test-threads 1`
//! (under the bed lock: the restart variant applies this tree's CRD).

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Operator;
use kpipe_e2e::scenario::{
    self, Sink, apply_pipeline, events_for, patch_pipeline_spec, pipeline_manifest, pipeline_status, worker_replicas,
};
use kpipe_e2e::testbed::{TestBed, wait_for};
use kpipe_operator::group_offsets::GroupOffsets;
use kpipe_test_support::free_port;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i:08}")).collect()
}

async fn produce_ids(bed: &TestBed, topic: &str, ids: &[String]) {
    produce_with(&bed.producer().unwrap(), topic, ids).await;
}

async fn produce_with(producer: &FutureProducer, topic: &str, ids: &[String]) {
    for id in ids {
        producer
            .send(FutureRecord::to(topic).key(id.as_bytes()).payload(id.as_bytes()), Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
}

fn start_operator(bed: &TestBed, ns: &str) -> Operator {
    Operator::start(&bed.kubeconfig(), ns, &[])
}

/// The sink's ids starting with `prefix`, sorted, and how many were delivered more than once.
async fn delivered(sink: &Sink, prefix: &str) -> (Vec<String>, usize) {
    let mut got: Vec<String> = sink.ids().await.unwrap().into_iter().filter(|i| i.starts_with(prefix)).collect();
    got.sort();
    let dups = got.len() - got.iter().collect::<BTreeSet<_>>().len();
    got.dedup();
    (got, dups)
}

async fn wait_workers_gone(bed: &TestBed, ns: &str, pipeline: &str) {
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(bed.client(), ns);
    let selector = format!("app.kubernetes.io/name=kpipe-worker,app.kubernetes.io/instance={pipeline}");
    wait_for("workers gone", Duration::from_secs(120), || async {
        let list = pods.list(&kube::api::ListParams::default().labels(&selector)).await;
        list.ok()?.items.is_empty().then_some(())
    })
    .await
    .unwrap();
}

async fn wait_ids(bed: &TestBed, ns: &str, sink: &Sink, expected: &[String]) {
    let want: BTreeSet<&String> = expected.iter().collect();
    let res = wait_for("every id delivered", Duration::from_secs(120), || async {
        let got = sink.ids().await.ok()?;
        let got: BTreeSet<&String> = got.iter().collect();
        want.iter().all(|id| got.contains(*id)).then_some(())
    })
    .await;
    if res.is_err() {
        bed.dump_pod_logs(ns);
        panic!("not delivered: {:?}", res.err());
    }
}

#[tokio::test]
async fn a_suspended_pipeline_whose_group_was_deleted_resumes_where_it_stopped() {
    let bed = TestBed::connect().await.unwrap();
    let ns_guard = bed.temp_namespace("idle-resume").await.unwrap();
    let ns = ns_guard.name().to_string();
    let sink = scenario::deploy_sink(&bed, &ns, "sink", &[]).await.unwrap();
    let topic = format!("{ns}-in");
    bed.create_topic(&topic, 3).await.unwrap();
    let group = format!("{ns}.p");

    let _op = start_operator(&bed, &ns);

    let first = ids("a", 0..100);
    produce_ids(&bed, &topic, &first).await;
    let manifest = pipeline_manifest(
        "p",
        &bed,
        &topic,
        &sink,
        json!({"source": {"groupId": group}, "scaling": {"pollInterval": "1s", "maxReplicas": 2}}),
    );
    apply_pipeline(&bed, &ns, manifest).await.unwrap();
    wait_ids(&bed, &ns, &sink, &first).await;

    // Suspend; once the worker pods are gone the group is empty.
    patch_pipeline_spec(&bed, &ns, "p", json!({"suspend": true})).await.unwrap();
    wait_workers_gone(&bed, &ns, "p").await;
    // The committed offsets are at the log end; let the operator see the idle group for a few polls.
    tokio::time::sleep(Duration::from_secs(4)).await;

    // An admin deletes the group (retried: the broker may still hold the members' session).
    let admin = bed.kafka_admin().unwrap();
    wait_for("group deleted", Duration::from_secs(60), || async {
        let r = admin.delete_groups(&[group.as_str()], &AdminOptions::new()).await.ok()?;
        r.iter().all(|x| x.is_ok()).then_some(())
    })
    .await
    .unwrap();
    let deleted = Instant::now();
    let note = wait_for("OffsetsRestored Event", Duration::from_secs(30), || async {
        let events = events_for(&bed, &ns, "p").await.ok()?;
        events.into_iter().find(|(_, reason, _)| reason == "OffsetsRestored").map(|(t, _, note)| (t, note))
    })
    .await
    .unwrap();
    println!("restored {:?} after the deletion: {note:?}", deleted.elapsed());
    assert_eq!(note.0, "Warning");
    for p in 0..3 {
        assert!(note.1.contains(&format!("{topic}/{p} (was ")), "{note:?}");
    }

    // New records, then resume: exactly the 10 new ids arrive, nothing from before again.
    let second = ids("b", 0..10);
    produce_ids(&bed, &topic, &second).await;
    patch_pipeline_spec(&bed, &ns, "p", json!({"suspend": false})).await.unwrap();
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    wait_ids(&bed, &ns, &sink, &all).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut got = sink.ids().await.unwrap();
    got.sort();
    let mut want = all.clone();
    want.sort();
    let dups = got.len() - got.iter().collect::<BTreeSet<_>>().len();
    assert_eq!(dups, 0, "{dups} ids delivered twice");
    assert_eq!(got, want, "exactly the produced ids, each once");
}

struct Broker {
    child: Child,
    bootstrap: String,
    dir: std::path::PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Broker {
    /// The private short-retention broker (`tests/support/short-retention-kafka.sh`) in a fresh directory named
    /// after `name`, listening on the bed's bridge IP so worker pods reach it.
    fn start(bed: &TestBed, name: &str) -> Self {
        let host = bed.var("KPIPE_BRIDGE_IP").unwrap_or("127.0.0.1").to_string();
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (port, cport) = (free_port(), free_port());
        Broker {
            child: Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/short-retention-kafka.sh"))
                .args([dir.to_str().unwrap(), &port.to_string(), &cport.to_string(), &host])
                .env("KAFKA_HOME", bed.var("KAFKA_HOME").expect("KAFKA_HOME in the bed env"))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
            bootstrap: format!("{host}:{port}"),
            dir,
        }
    }
}

/// Creates `topics` (2 partitions each) on the private broker, waiting up to 2 minutes for it to come up.
async fn create_topics(admin: &AdminClient<DefaultClientContext>, topics: &[&str]) {
    wait_for("private broker up", Duration::from_secs(120), || async {
        let new: Vec<NewTopic> = topics.iter().map(|t| NewTopic::new(t, 2, TopicReplication::Fixed(1))).collect();
        let r = admin.create_topics(&new, &AdminOptions::new()).await.ok()?;
        r.iter()
            .all(|x| x.is_ok() || matches!(x, Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists))))
            .then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn idle_pipelines_survive_offset_retention_suspended_and_at_zero() {
    let bed = TestBed::connect().await.unwrap();
    let broker = Broker::start(&bed, "kpipe-idle-resume-kafka");
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &broker.bootstrap);
    let admin: AdminClient<DefaultClientContext> = config.create().unwrap();
    let ns_guard = bed.temp_namespace("idle-retention").await.unwrap();
    let ns = ns_guard.name().to_string();
    let (t_susp, t_zero) = (format!("{ns}-susp"), format!("{ns}-zero"));
    create_topics(&admin, &[&t_susp, &t_zero]).await;
    let producer: FutureProducer = config.create().unwrap();
    let sink = scenario::deploy_sink(&bed, &ns, "sink", &[]).await.unwrap();
    let _op = start_operator(&bed, &ns);

    let manifest = |name: &str, topic: &str, start: &str| {
        let mut m = pipeline_manifest(
            name,
            &bed,
            topic,
            &sink,
            json!({"source": {"startOffset": start}, "scaling": {"pollInterval": "1s", "maxReplicas": 1,
                   "scaleDownStabilization": "3s", "cooldownToZero": "5s"}}),
        );
        m["spec"]["source"]["bootstrapServers"] = json!([broker.bootstrap]);
        m
    };
    // susp: earliest, 50 ids before creation; zero: latest, 50 ids after creation.
    let (s1, z1) = (ids("s1", 0..50), ids("z1", 0..50));
    produce_with(&producer, &t_susp, &s1).await;
    apply_pipeline(&bed, &ns, manifest("susp", &t_susp, "earliest")).await.unwrap();
    apply_pipeline(&bed, &ns, manifest("zero", &t_zero, "latest")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    produce_with(&producer, &t_zero, &z1).await;
    wait_ids(&bed, &ns, &sink, &s1.iter().chain(&z1).cloned().collect::<Vec<_>>()).await;

    patch_pipeline_spec(&bed, &ns, "susp", json!({"suspend": true})).await.unwrap();
    wait_workers_gone(&bed, &ns, "susp").await;
    wait_workers_gone(&bed, &ns, "zero").await;
    // Idle well past offsets.retention.minutes=1 (expiry checked every 2 s).
    let idle = Instant::now();
    tokio::time::sleep(Duration::from_secs(100)).await;
    println!("idle for {:?}", idle.elapsed());

    let (s2, z2) = (ids("s2", 0..10), ids("z2", 0..10));
    produce_with(&producer, &t_susp, &s2).await;
    produce_with(&producer, &t_zero, &z2).await;
    patch_pipeline_spec(&bed, &ns, "susp", json!({"suspend": false})).await.unwrap();
    let all: Vec<String> = s1.iter().chain(&s2).chain(&z1).chain(&z2).cloned().collect();
    wait_ids(&bed, &ns, &sink, &all).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (prefix, want) in [("s", s1.iter().chain(&s2)), ("z", z1.iter().chain(&z2))] {
        let (got, dups) = delivered(&sink, prefix).await;
        let mut want: Vec<String> = want.cloned().collect();
        want.sort();
        assert_eq!(dups, 0, "{prefix}: {dups} ids delivered twice");
        assert_eq!(got, want, "{prefix}: exactly the produced ids");
    }
    for name in ["susp", "zero"] {
        let events = events_for(&bed, &ns, name).await.unwrap();
        let restored: Vec<&String> =
            events.iter().filter(|(_, r, _)| r == "OffsetsRestored").map(|(_, _, n)| n).collect();
        println!("{name}: {restored:?}");
        assert!(!restored.is_empty(), "{name}: the offsets never expired, the scenario proved nothing");
    }
    drop(broker);
}

/// The idle-offsets record survives an operator restart (issue 20): a pipeline at zero replicas by
/// scale-to-zero (`minReplicas: 0`, `startOffset: earliest`) on the private short-retention broker delivers 50
/// ids; the operator records the group's committed offsets in `status.topics[].committedOffsets` and is then
/// stopped. With no operator running, retention deletes the empty group's offsets. A new operator process loads
/// the record from status and restores the offsets (Warning Event `OffsetsRestored`), and 10 new ids wake the
/// pipeline: exactly the 60 ids, each once (an operator that kept the record only in memory starts the worker
/// from `earliest` and delivers the first 50 again). Applies this tree's CRD (`status.topics` must not be pruned):
/// run under the bed lock.
#[tokio::test]
async fn the_idle_offsets_record_survives_an_operator_restart() {
    let bed = TestBed::connect().await.unwrap();
    // `status.topics` must be in the bed's CRD, or the apiserver prunes it.
    scenario::install_crd(&bed).unwrap();
    let broker = Broker::start(&bed, "kpipe-idle-restart-kafka");
    let bootstrap = broker.bootstrap.clone();
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &bootstrap);
    let admin: AdminClient<DefaultClientContext> = config.create().unwrap();
    let ns_guard = bed.temp_namespace("idle-restart").await.unwrap();
    let ns = ns_guard.name().to_string();
    let topic = format!("{ns}-in");
    create_topics(&admin, &[&topic]).await;
    let producer: FutureProducer = config.create().unwrap();
    let sink = scenario::deploy_sink(&bed, &ns, "sink", &[]).await.unwrap();
    let first_op = start_operator(&bed, &ns);

    let mut m = pipeline_manifest(
        "p",
        &bed,
        &topic,
        &sink,
        json!({"scaling": {"pollInterval": "1s", "maxReplicas": 1, "scaleDownStabilization": "3s",
               "cooldownToZero": "5s"}}),
    );
    m["spec"]["source"]["bootstrapServers"] = json!([bootstrap]);
    apply_pipeline(&bed, &ns, m).await.unwrap();
    let first = ids("a", 0..50);
    produce_with(&producer, &topic, &first).await;
    wait_ids(&bed, &ns, &sink, &first).await;

    // Back at zero, the record of the idle offsets (50 in total) lands in status.
    let recorded = wait_for("idle offsets recorded in status", Duration::from_secs(120), || async {
        if worker_replicas(&bed, &ns, "p").await.ok()? != 0 {
            return None;
        }
        let status = pipeline_status(&bed, &ns, "p").await.ok()?;
        let offsets = status.topics.first()?.committed_offsets.clone();
        (offsets.iter().filter(|o| **o >= 0).sum::<i64>() == 50).then_some(offsets)
    })
    .await
    .unwrap();
    println!("recorded in status: {recorded:?}");
    drop(first_op);
    let stopped = Instant::now();

    // No operator runs while the empty group's offsets expire (retention 1 min, checked every 2 s).
    let go = GroupOffsets::new(vec![bootstrap.clone()], Duration::from_secs(5));
    let parts: Vec<(String, i32)> = (0..2).map(|p| (topic.clone(), p)).collect();
    wait_for("offsets expired", Duration::from_secs(180), || async {
        let got = go.committed(&format!("{ns}.p"), &parts).ok()?;
        parts.iter().all(|k| got.get(k).is_none_or(|c| c.is_none())).then_some(())
    })
    .await
    .unwrap();
    println!("offsets expired {:?} after the operator stopped", stopped.elapsed());

    let _second_op = start_operator(&bed, &ns);
    let note = wait_for("OffsetsRestored Event", Duration::from_secs(60), || async {
        let events = events_for(&bed, &ns, "p").await.ok()?;
        events.into_iter().find(|(_, reason, _)| reason == "OffsetsRestored").map(|(t, _, note)| (t, note))
    })
    .await
    .unwrap();
    println!("restored by the new operator: {note:?}");
    assert_eq!(note.0, "Warning");
    for (p, offset) in recorded.iter().enumerate().filter(|(_, o)| **o > 0) {
        assert!(note.1.contains(&format!("{topic}/{p} (was {offset}, found none)")), "{note:?}");
    }

    let second = ids("b", 0..10);
    produce_with(&producer, &topic, &second).await;
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    wait_ids(&bed, &ns, &sink, &all).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut got = sink.ids().await.unwrap();
    got.sort();
    let dups = got.len() - got.iter().collect::<BTreeSet<_>>().len();
    let mut want = all.clone();
    want.sort();
    got.dedup();
    assert_eq!(dups, 0, "{dups} ids delivered twice");
    assert_eq!(got, want, "exactly the produced ids (0 skipped)");
    println!("60/60 ids delivered, 0 duplicates, 0 skipped");
    drop(broker);
}
