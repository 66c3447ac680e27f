//! Failure handling on the local test bed, as users run it (`minReplicas: 0`, a dead-letter topic, the default
//! retry policy): a downstream that rate-limits (429 + Retry-After) or is down for minutes gets every record
//! delivered and none dead-lettered; while it is down the pipeline says `ProcessorUnavailable` and does not add
//! pods for the lag that waits for it (DESIGN.md §2 "Downstream health").
//!
//! Run: `cargo test -p kpipe-e2e --test failure_handling -- --nocapture` (needs `make testbed-up` and release
//! builds).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kpipe_api::v1alpha1::condition::{DEGRADED, STALLED};
use kpipe_e2e::TestBed;
use kpipe_e2e::scenario::{
    self, Install, apply_pipeline, condition, events_for, id_records, pipeline_manifest, pipeline_status, unique_topic,
    wait_delivered, worker_replicas,
};
use kpipe_e2e::testbed::wait_for;
use serde_json::json;

async fn bed() -> TestBed {
    TestBed::connect().await.unwrap_or_else(|e| panic!("{e}"))
}

/// `(key, value)` records.
type Records = Vec<(Vec<u8>, Vec<u8>)>;

fn ids(prefix: &str, range: std::ops::Range<usize>) -> (Records, BTreeSet<String>) {
    let records = id_records(prefix, range, 50);
    let expected = records.iter().map(|(_, v)| String::from_utf8(v.clone()).unwrap()).collect();
    (records, expected)
}

/// Records in the dead-letter topic (sum of its partitions' log ends).
async fn dead_letters(bed: &TestBed, dlq: &str) -> i64 {
    bed.end_offsets(dlq).await.expect("dlq end offsets").values().sum()
}

#[tokio::test]
async fn a_rate_limited_downstream_gets_everything_delivered_and_nothing_dead_lettered() {
    let bed = bed().await;
    let (ns, sink) =
        scenario::setup_with_sink(&bed, "e2e-429", &Install::default(), &[]).await.unwrap_or_else(|e| panic!("{e}"));
    let topic = unique_topic("ratelimited");
    let dlq = format!("{topic}-dlq");
    bed.create_topic(&topic, 4).await.expect("topic");
    bed.create_topic(&dlq, 1).await.expect("dlq");
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest("limited", &bed, &topic, &sink, json!({"deadLetter": {"topic": dlq}})),
    )
    .await
    .expect("apply");
    sink.start_rate_limit(2).await.expect("rate limit");
    let (records, expected) = ids("limited", 0..500);
    bed.produce_records(&topic, records).await.expect("produce");
    // Far longer than the default retry budget would last without Retry-After (8 attempts in ~13 s).
    tokio::time::sleep(Duration::from_secs(30)).await;
    let rejected = sink.stats().await.expect("stats")["rejected"].as_u64().unwrap_or(0);
    sink.set_outage(false).await.expect("end rate limit");
    let delivered = wait_delivered(&sink, &expected, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("{e}"));
    let dead = dead_letters(&bed, &dlq).await;
    println!(
        "429 + Retry-After: 2 for 30 s: {rejected} requests answered 429, {} of 500 delivered ({} duplicates), {dead} \
         dead-lettered",
        expected.len(),
        delivered.len() - expected.len()
    );
    assert!(rejected > 0, "the sink never rate-limited");
    assert_eq!(dead, 0, "a downstream that only asked to slow down must not fill the DLQ");
    ns.delete().await.expect("delete");
}

#[tokio::test]
async fn a_downstream_down_for_three_minutes_loses_nothing_and_buys_no_pods() {
    let bed = bed().await;
    let (ns, sink) =
        scenario::setup_with_sink(&bed, "e2e-down", &Install::default(), &[]).await.unwrap_or_else(|e| panic!("{e}"));
    let topic = unique_topic("down");
    let dlq = format!("{topic}-dlq");
    bed.create_topic(&topic, 6).await.expect("topic");
    bed.create_topic(&dlq, 1).await.expect("dlq");
    // lagThreshold 500: the plain lag rule would ask for 6 pods for the lag that builds up below.
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest(
            "down",
            &bed,
            &topic,
            &sink,
            json!({"deadLetter": {"topic": dlq}, "scaling": {"minReplicas": 0, "maxReplicas": 6, "lagThreshold": 500}}),
        ),
    )
    .await
    .expect("apply");
    sink.set_outage(true).await.expect("outage");
    let (first, mut expected) = ids("down", 0..300);
    bed.produce_records(&topic, first).await.expect("produce");
    let woke = wait_for("woken by the first records", Duration::from_secs(60), || async {
        let r = worker_replicas(&bed, ns.name(), "down").await.ok()?;
        (r > 0).then_some(r)
    })
    .await
    .expect("activation");
    let started = Instant::now();
    let (mut most, mut unavailable_seen, mut degraded_seen) = (woke, false, false);
    let mut more_produced = false;
    while started.elapsed() < Duration::from_secs(180) {
        if !more_produced && started.elapsed() > Duration::from_secs(60) {
            // More lag while the downstream is down: more pods cannot help it.
            let (more, more_ids) = ids("down", 300..3_000);
            bed.produce_records(&topic, more).await.expect("produce more");
            expected.extend(more_ids);
            more_produced = true;
        }
        most = most.max(worker_replicas(&bed, ns.name(), "down").await.unwrap_or(0));
        if let Ok(s) = pipeline_status(&bed, ns.name(), "down").await {
            unavailable_seen |= condition(&s, STALLED) == Some(("True".into(), "ProcessorUnavailable".into()));
            degraded_seen |= condition(&s, DEGRADED) == Some(("True".into(), "ProcessorUnavailable".into()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let dead_during = dead_letters(&bed, &dlq).await;
    sink.set_outage(false).await.expect("recover");
    let recovered = Instant::now();
    let delivered = wait_delivered(&sink, &expected, Duration::from_secs(180)).await.unwrap_or_else(|e| panic!("{e}"));
    let delivered_in = recovered.elapsed();
    let dead = dead_letters(&bed, &dlq).await;
    let events = events_for(&bed, ns.name(), "down").await.expect("events");
    let reasons: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    println!(
        "down 3 min: {} records, woke with {woke} pod(s), at most {most} while down; {dead_during} dead-lettered \
         during, {dead} after; all delivered {delivered_in:?} after recovery ({} duplicates); \
         ProcessorUnavailable in Stalled {unavailable_seen}, Degraded {degraded_seen}; events {reasons:?}",
        expected.len(),
        delivered.len() - expected.len()
    );
    assert_eq!(dead, 0, "a downstream outage must not fill the DLQ");
    assert!(unavailable_seen && degraded_seen, "status never said ProcessorUnavailable");
    assert!(reasons.contains(&"ProcessorUnavailable"), "no ProcessorUnavailable Event: {events:?}");
    assert_eq!(most, woke, "replicas grew while the downstream was down");
    ns.delete().await.expect("delete");
}
