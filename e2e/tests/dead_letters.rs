//! Dead-letter inspection on the local test bed (issue #16, part 2): 1 % poison records that the sink rejects
//! permanently go to the dead-letter topic, and the pipeline's `status.deadLetters` counts them, in total and by
//! error class, from the topic itself — including a record of another pipeline in the same topic, which is not
//! counted. The reconciler writes the counts (one field manager on the status), later dead letters are added on top,
//! and removing `spec.deadLetter` removes `status.deadLetters`.
//!
//! Run: `cargo test -p kpipe-e2e --test dead_letters -- --nocapture` (needs the test bed and release builds).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kpipe_api::v1alpha1::ConsumerPipeline;
use kpipe_e2e::TestBed;
use kpipe_e2e::scenario::{
    self, Install, apply_pipeline, patch_pipeline_spec, pipeline_manifest, pipeline_status, unique_topic,
    wait_delivered,
};
use kpipe_e2e::testbed::wait_for;
use kube::Api;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

#[tokio::test]
async fn status_counts_the_pipelines_dead_letters_by_class() {
    let bed = TestBed::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let (ns, sink) = scenario::setup_with_sink(
        &bed,
        "e2e-dlq",
        &Install::default(),
        &["--poison-prefix", "poison", "--poison-mode", "named"],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let topic = unique_topic("dlqcount");
    let dlq = format!("{topic}-dlq");
    bed.create_topic(&topic, 4).await.expect("topic");
    bed.create_topic(&dlq, 2).await.expect("dlq");
    // A dead letter of another pipeline sharing the topic: never counted for this one.
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", bed.kafka_bootstrap()).create().expect("producer");
    let headers = OwnedHeaders::new()
        .insert(Header { key: "kpipe.pipeline", value: Some("someone-else") })
        .insert(Header { key: "kpipe.error.class", value: Some("http_400") });
    producer
        .send(FutureRecord::to(&dlq).key("k").payload("foreign").headers(headers), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("foreign dead letter");

    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest("counted", &bed, &topic, &sink, json!({"deadLetter": {"topic": dlq}})),
    )
    .await
    .expect("apply");
    // 1,000 records, every hundredth a poison record (1 %).
    let (records, _, expected) = scenario::one_percent_poison(1000);
    bed.produce_records(&topic, records).await.expect("produce");
    wait_delivered(&sink, &expected, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("{e}"));

    let summary = wait_for("status.deadLetters counts 10", Duration::from_secs(60), || async {
        let s = pipeline_status(&bed, ns.name(), "counted").await.ok()?;
        s.dead_letters.filter(|d| d.total == 10)
    })
    .await
    .unwrap_or_else(|e| {
        let s = bed.run_kubectl(&["-n", ns.name(), "get", "cpl", "counted", "-o", "jsonpath={.status}"]);
        bed.dump_pod_logs(ns.name());
        panic!("{e}; status: {s:?}")
    });
    println!("status.deadLetters: {summary:?}");
    assert_eq!(summary.topic, dlq);
    assert_eq!(
        summary.by_class,
        BTreeMap::from([("rejected".to_string(), 10)]),
        "class of the sink's permanent rejection"
    );
    let ends = bed.end_offsets(&dlq).await.expect("dlq end offsets");
    assert_eq!(ends.values().sum::<i64>(), 11, "10 dead letters and the foreign one");
    let read: BTreeMap<i32, i64> = summary.read_offsets.iter().map(|(p, o)| (p.parse().unwrap(), *o)).collect();
    assert_eq!(read, ends, "the whole topic was read");
    assert!(summary.observed_at.is_some());
    // One field manager writes the status: the reconciler (the reader only counts, in memory).
    let cp = Api::<ConsumerPipeline>::namespaced(bed.client(), ns.name()).get("counted").await.expect("pipeline");
    let status_managers: BTreeSet<String> = cp
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(status_managers, BTreeSet::from(["kpipe-operator".to_string()]), "status field managers");
    // More dead letters are counted on top: the reconciles the reader triggers write them.
    let more: Vec<(Vec<u8>, Vec<u8>)> =
        (0..3).map(|i| (b"k".to_vec(), format!("poison-late-{i}").into_bytes())).collect();
    bed.produce_records(&topic, more).await.expect("produce");
    let later = wait_for("status.deadLetters counts 13", Duration::from_secs(60), || async {
        pipeline_status(&bed, ns.name(), "counted").await.ok()?.dead_letters.filter(|d| d.total == 13)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(later.observed_at >= summary.observed_at, "observedAt moves with the counts");
    // Without spec.deadLetter the field goes.
    patch_pipeline_spec(&bed, ns.name(), "counted", json!({"deadLetter": null})).await.expect("remove deadLetter");
    wait_for("status.deadLetters cleared", Duration::from_secs(60), || async {
        pipeline_status(&bed, ns.name(), "counted").await.ok()?.dead_letters.is_none().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    ns.delete().await.expect("delete");
}
