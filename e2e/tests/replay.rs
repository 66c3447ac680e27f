//! Dead-letter replay on the local test bed (issue #16 acceptance): 1 % poison records that the sink rejects go to
//! the dead-letter topic; the sink is "fixed" (the pipeline points at a sink that still rejects one of them) and a
//! `DeadLetterReplay` is applied with kubectl semantics (server-side apply): the replay Job re-delivers every dead
//! letter, the one that fails again lands in the parking topic with the replay's context, the status reaches
//! Succeeded with the right counts and Events, re-applying the same replay delivers nothing again, and a second
//! replay whose pod and operator are killed mid-way resumes and finishes with exact counts.
//!
//! (That each replayed record reaches the processor exactly as the original — key, value, headers in order,
//! coordinates — is asserted record by record against the real broker in `worker/tests/replay.rs`; the bed's sink
//! records values only.)
//!
//! Run: `cargo test -p kpipe-e2e --test replay -- --nocapture` (needs the test bed and release builds).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kpipe_api::v1alpha1::{DeadLetterReplay, ReplayPhase};
use kpipe_e2e::TestBed;
use kpipe_e2e::scenario::{
    self, Install, apply_pipeline, deploy_sink, events_for, patch_pipeline_spec, pipeline_manifest, pipeline_status,
    unique_topic, wait_delivered,
};
use kpipe_e2e::testbed::wait_for;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::json;

fn replay_manifest(name: &str, pipeline: &str, parking: &str) -> serde_json::Value {
    json!({
        "apiVersion": "kpipe.io/v1alpha1", "kind": "DeadLetterReplay", "metadata": {"name": name},
        "spec": {"pipelineRef": {"name": pipeline}, "parkingTopic": parking},
    })
}

async fn apply_replay(bed: &TestBed, ns: &str, manifest: serde_json::Value) {
    let r: DeadLetterReplay = serde_json::from_value(manifest).unwrap();
    let name = r.metadata.name.clone().unwrap();
    Api::<DeadLetterReplay>::namespaced(bed.client(), ns)
        .patch(&name, &PatchParams::apply("kpipe-e2e").force(), &Patch::Apply(&r))
        .await
        .expect("apply DeadLetterReplay");
}

async fn wait_replay_done(bed: &TestBed, ns: &str, name: &str, timeout: Duration) -> DeadLetterReplay {
    let api = Api::<DeadLetterReplay>::namespaced(bed.client(), ns);
    wait_for(&format!("replay {name} finished"), timeout, || async {
        let r = api.get(name).await.ok()?;
        let phase = r.status.as_ref()?.phase;
        matches!(phase, ReplayPhase::Succeeded | ReplayPhase::Failed).then_some(r)
    })
    .await
    .unwrap_or_else(|e| {
        let s = bed.run_kubectl(&["-n", ns, "get", "dlr", name, "-o", "yaml"]);
        bed.dump_pod_logs(ns);
        panic!("{e}; {s:?}")
    })
}

/// Every record of `topic` with its headers (as text).
fn read_all(bed: &TestBed, topic: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bed.kafka_bootstrap())
        .set("group.id", "kpipe-e2e-reader")
        .create()
        .unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut total = 0;
    for p in md.topics()[0].partitions() {
        total += c.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).unwrap().1;
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while (out.len() as i64) < total && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let headers = m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            out.push((String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(), headers));
        }
    }
    out
}

#[tokio::test]
async fn a_replay_redelivers_dead_letters_parks_refailures_and_resumes_after_kills() {
    let bed = TestBed::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let (ns, sink) = scenario::setup_with_sink(
        &bed,
        "e2e-replay",
        &Install::default(),
        &["--poison-prefix", "poison", "--poison-mode", "named"],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let topic = unique_topic("replay");
    let (dlq, parking) = (format!("{topic}-dlq"), format!("{topic}-parked"));
    bed.create_topic(&topic, 4).await.expect("topic");
    bed.create_topic(&dlq, 2).await.expect("dlq");
    bed.create_topic(&parking, 1).await.expect("parking");
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest("orders", &bed, &topic, &sink, json!({"deadLetter": {"topic": dlq}})),
    )
    .await
    .expect("apply");
    // 1,000 records, 1 % poison.
    let (records, poison, ok) = scenario::one_percent_poison(1000);
    bed.produce_records(&topic, records).await.expect("produce");
    wait_delivered(&sink, &ok, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("{e}"));
    let counted = wait_for("status.deadLetters.total = 10", Duration::from_secs(60), || async {
        pipeline_status(&bed, ns.name(), "orders").await.ok()?.dead_letters.filter(|d| d.total == 10)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    println!("dead letters in status: {counted:?}");

    // The fix: a sink that takes them, except one that still fails.
    let still_bad = "poison-00507";
    let fixed = deploy_sink(&bed, ns.name(), "fixed", &["--poison-prefix", still_bad, "--poison-mode", "named"])
        .await
        .expect("fixed sink");
    patch_pipeline_spec(&bed, ns.name(), "orders", json!({"processor": {"http": {"url": fixed.url}}}))
        .await
        .expect("point the pipeline at the fixed sink");
    apply_replay(&bed, ns.name(), replay_manifest("r1", "orders", &parking)).await;
    let r1 = wait_replay_done(&bed, ns.name(), "r1", Duration::from_secs(180)).await;
    let s = r1.status.clone().unwrap();
    println!("r1: {s:?}");
    assert_eq!(s.phase, ReplayPhase::Succeeded);
    assert_eq!((s.replayed, s.succeeded, s.failed_again, s.skipped), (10, 9, 1, 0));
    assert!(s.conditions.iter().any(|c| c.type_ == "Complete" && c.status == "True"), "{:?}", s.conditions);
    assert_eq!(s.end_offsets.values().sum::<i64>(), 10);
    let delivered = fixed.ids().await.expect("ids");
    let expected: BTreeSet<String> = poison.iter().filter(|p| *p != still_bad).cloned().collect();
    assert_eq!(delivered.iter().cloned().collect::<BTreeSet<_>>(), expected, "every dead letter but one delivered");
    assert_eq!(delivered.len(), 9, "each exactly once: {delivered:?}");
    let parked = read_all(&bed, &parking);
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].0, still_bad);
    assert_eq!(parked[0].1.get("kpipe.replay").map(String::as_str), Some(format!("{}/r1", ns.name()).as_str()));
    assert_eq!(parked[0].1.get("kpipe.replay.error.class").map(String::as_str), Some("rejected"));
    assert_eq!(bed.end_offsets(&dlq).await.unwrap().values().sum::<i64>(), 10, "nothing went back to the DLQ");
    let reasons: Vec<String> = events_for(&bed, ns.name(), "r1").await.unwrap().into_iter().map(|e| e.1).collect();
    assert!(reasons.contains(&"Started".to_string()) && reasons.contains(&"Completed".to_string()), "{reasons:?}");

    // Re-applying the same replay changes nothing and delivers nothing.
    apply_replay(&bed, ns.name(), replay_manifest("r1", "orders", &parking)).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(fixed.ids().await.unwrap().len(), 9, "re-apply delivered again");
    let again = Api::<DeadLetterReplay>::namespaced(bed.client(), ns.name()).get("r1").await.unwrap();
    assert_eq!(again.status, r1.status, "status unchanged by the re-apply");
    let jobs = Api::<Job>::namespaced(bed.client(), ns.name()).list(&ListParams::default()).await.unwrap();
    assert_eq!(jobs.items.len(), 1, "one Job for r1");

    // A second replay through a slow sink: its pod and the operator are killed mid-way; it resumes and finishes.
    let slow = deploy_sink(&bed, ns.name(), "slow", &["--delay-ms", "1500"]).await.expect("slow sink");
    patch_pipeline_spec(&bed, ns.name(), "orders", json!({"processor": {"http": {"url": slow.url}}}))
        .await
        .expect("point the pipeline at the slow sink");
    apply_replay(&bed, ns.name(), replay_manifest("r2", "orders", &parking)).await;
    wait_for("r2 delivered 3", Duration::from_secs(120), || async {
        (slow.ids().await.ok()?.len() >= 3).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let pods: Api<Pod> = Api::namespaced(bed.client(), ns.name());
    let kill = DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
    for selector in ["app.kubernetes.io/instance=r2", "app.kubernetes.io/name=kpipe-operator"] {
        for p in pods.list(&ListParams::default().labels(selector)).await.unwrap().items {
            let name = p.metadata.name.unwrap();
            println!("killing {name}");
            pods.delete(&name, &kill).await.expect("delete pod");
        }
    }
    let before = slow.ids().await.unwrap().len();
    let r2 = wait_replay_done(&bed, ns.name(), "r2", Duration::from_secs(300)).await;
    let s2 = r2.status.unwrap();
    let got = slow.ids().await.unwrap();
    let unique: BTreeSet<String> = got.iter().cloned().collect();
    println!("r2: killed after {before} deliveries; {} deliveries, {} distinct; {s2:?}", got.len(), unique.len());
    assert_eq!(s2.phase, ReplayPhase::Succeeded);
    assert_eq!((s2.replayed, s2.succeeded, s2.failed_again), (10, 10, 0), "exact counts across the kills");
    assert_eq!(unique, poison, "every dead letter delivered");
    assert!(got.len() - unique.len() <= 1, "at most the record in flight again");
    ns.delete().await.expect("delete");
}
