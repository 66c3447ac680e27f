//! The autoscaler never strands a backlog (DESIGN.md §3), on the local test bed, with `minReplicas: 0` as users
//! run it:
//! - workers killed over and over while a backlog drains (a crash loop): everything is delivered and the pipeline
//!   goes back to zero only afterwards;
//! - the processor fails every request for longer than stuck detection + cooldownToZero, then recovers: nothing is
//!   stranded, status says Retrying/Stalled meanwhile, every record is delivered after the recovery;
//! - a backlog on one hot partition of 12 wakes one pod, not the lag rule's count.
//!
//! Run: `cargo test -p kpipe-e2e --test never_strand -- --nocapture` (needs `make testbed-up` and release builds).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kpipe_api::v1alpha1::condition::{READY, STALLED};
use kpipe_e2e::scenario::{
    self, Install, Sink, apply_pipeline, condition, events_for, id_records, pipeline_manifest, pipeline_status,
    unique_topic, worker_pods, worker_replicas,
};
use kpipe_e2e::testbed::wait_for;
use kpipe_e2e::{TempNamespace, TestBed, bed};
use nix::sys::signal::Signal;
use serde_json::json;

async fn setup(bed: &TestBed, prefix: &str) -> (TempNamespace, Sink) {
    scenario::setup_with_sink(bed, prefix, &Install::default(), &[]).await.unwrap_or_else(|e| panic!("{e}"))
}

/// One look at the pipeline: seconds since the watch started, replicas on the Deployment, lag, Ready and Stalled.
#[derive(Clone, Debug)]
struct Sample {
    at: f64,
    replicas: i32,
    lag: i64,
    ready: Option<(String, String)>,
    stalled: Option<(String, String)>,
}

/// Samples the pipeline every 500 ms until aborted.
fn watch(bed: &TestBed, ns: &str, name: &str) -> (Arc<Mutex<Vec<Sample>>>, tokio::task::JoinHandle<()>) {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let (bed, ns, name, out) = (bed.clone(), ns.to_string(), name.to_string(), samples.clone());
    let task = tokio::spawn(async move {
        let start = Instant::now();
        loop {
            let replicas = worker_replicas(&bed, &ns, &name).await.unwrap_or(-1);
            if let Ok(s) = pipeline_status(&bed, &ns, &name).await {
                let sample = Sample {
                    at: start.elapsed().as_secs_f64(),
                    replicas,
                    lag: s.lag.as_ref().map(|l| l.total).unwrap_or(0),
                    ready: condition(&s, READY),
                    stalled: condition(&s, STALLED),
                };
                out.lock().unwrap().push(sample);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    (samples, task)
}

/// The longest stretch (seconds) during which the status showed lag while the Deployment had zero replicas. A
/// wake-up takes one poll (2 s here) plus the status write; anything much longer is a stranded backlog.
fn longest_backlog_at_zero(samples: &[Sample]) -> f64 {
    let (mut longest, mut since) = (0f64, None::<f64>);
    for s in samples {
        if s.replicas == 0 && s.lag > 0 {
            let start = *since.get_or_insert(s.at);
            longest = longest.max(s.at - start);
        } else {
            since = None;
        }
    }
    longest
}

async fn wait_delivered(sink: &Sink, expected: &BTreeSet<String>, timeout: Duration) -> Vec<String> {
    scenario::wait_delivered(sink, expected, timeout).await.unwrap_or_else(|e| panic!("{e}"))
}

async fn wait_back_at_zero(bed: &TestBed, ns: &str, name: &str, timeout: Duration) {
    wait_for("lag 0 and replicas back to 0", timeout, || async {
        let s = pipeline_status(bed, ns, name).await.ok()?;
        let replicas = worker_replicas(bed, ns, name).await.ok()?;
        (s.lag.as_ref()?.total == 0 && replicas == 0).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        bed.dump_pod_logs(ns);
        panic!("{e}")
    });
}

#[tokio::test]
async fn crash_looping_workers_never_strand_the_backlog() {
    let bed = bed().await;
    let (ns, sink) = setup(&bed, "e2e-crashloop").await;
    let topic = unique_topic("crashloop");
    bed.create_topic(&topic, 12).await.expect("topic");
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest(
            "crashloop",
            &bed,
            &topic,
            &sink,
            json!({"scaling": {"minReplicas": 0, "maxReplicas": 6, "lagThreshold": 2000}}),
        ),
    )
    .await
    .expect("apply");
    let n = 100_000;
    let records = id_records("crashloop", 0..n, 997);
    let expected: BTreeSet<String> = records.iter().map(|(_, v)| String::from_utf8(v.clone()).unwrap()).collect();
    let (samples, watcher) = watch(&bed, ns.name(), "crashloop");
    // Slow the drain down enough for the crashes to land mid-drain: 10 chunks, one a second.
    let producer = {
        let (bed, topic) = (bed.clone(), topic.clone());
        tokio::spawn(async move {
            for chunk in records.chunks(10_000) {
                bed.produce_records(&topic, chunk.to_vec()).await.expect("produce");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    wait_for("workers started", Duration::from_secs(60), || async {
        (!worker_pods(&bed, ns.name(), "crashloop").await.is_empty()).then_some(())
    })
    .await
    .expect("workers");
    // A crash loop: every worker process killed with SIGKILL every 3 s for 30 s.
    let chaos_start = Instant::now();
    let mut kills = 0;
    while chaos_start.elapsed() < Duration::from_secs(30) {
        for pod in worker_pods(&bed, ns.name(), "crashloop").await {
            if bed.kill_container(ns.name(), &pod, "worker", Signal::SIGKILL).await.is_ok() {
                kills += 1;
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    producer.await.expect("producer");
    let status_after_chaos = pipeline_status(&bed, ns.name(), "crashloop").await.expect("status");
    let ids = wait_delivered(&sink, &expected, Duration::from_secs(480)).await;
    let delivered_at = samples.lock().unwrap().last().map(|s| s.at).unwrap_or(0.0);
    wait_back_at_zero(&bed, ns.name(), "crashloop", Duration::from_secs(180)).await;
    // The sampler polls every 500 ms: give it time to record the state just seen, so the check below has a sample.
    tokio::time::sleep(Duration::from_secs(2)).await;
    watcher.abort();
    let samples = samples.lock().unwrap().clone();
    let first_zero_after_work = samples
        .iter()
        .skip_while(|s| s.replicas <= 0)
        .find(|s| s.replicas == 0)
        .map(|s| s.at)
        .unwrap_or_else(|| panic!("the sampler never saw the pipeline back at zero after the work: {samples:?}"));
    let stranded = longest_backlog_at_zero(&samples);
    let workers = status_after_chaos.workers.clone().unwrap_or_default();
    let events = events_for(&bed, ns.name(), "crashloop").await.expect("events");
    println!(
        "crash loop: {n} records, {kills} kills in 30 s; all delivered at {delivered_at:.0}s, first back at zero at \
         {first_zero_after_work:.0}s; longest lag-at-zero {stranded:.1}s; {} duplicates; status.workers after the \
         chaos: {workers:?}; events: {:?}",
        ids.len() - expected.len(),
        events.iter().map(|e| e.1.as_str()).collect::<Vec<_>>()
    );
    assert!(kills >= 5, "the crash loop did not run: {kills} kills");
    assert!(first_zero_after_work >= delivered_at - 1.0, "back at zero before the backlog was delivered: {samples:?}");
    assert!(stranded < 10.0, "a backlog sat at zero replicas for {stranded:.1}s: {samples:?}");
    assert!(workers.restarts > 0, "restarts are visible in status.workers: {workers:?}");
    ns.delete().await.expect("delete");
}

#[tokio::test]
async fn a_downstream_outage_longer_than_stuck_detection_and_cooldown_strands_nothing() {
    let bed = bed().await;
    let (ns, sink) = setup(&bed, "e2e-outage").await;
    let topic = unique_topic("outage");
    bed.create_topic(&topic, 4).await.expect("topic");
    // Stuck detection is 6 polls × 2 s = 12 s, cooldownToZero 15 s: the outage lasts 60 s. The retry budget outlasts
    // it (a record is retried, not dead-lettered, while the downstream is down).
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest(
            "outage",
            &bed,
            &topic,
            &sink,
            json!({
                "scaling": {"minReplicas": 0, "maxReplicas": 4},
                "retry": {"maxAttempts": 1000, "initialBackoff": "200ms", "maxBackoff": "2s"},
                "onFailure": "block",
            }),
        ),
    )
    .await
    .expect("apply");
    let (samples, watcher) = watch(&bed, ns.name(), "outage");
    sink.set_outage(true).await.expect("outage start");
    let n = 2_000;
    let records = id_records("outage", 0..n, 100);
    let expected: BTreeSet<String> = records.iter().map(|(_, v)| String::from_utf8(v.clone()).unwrap()).collect();
    bed.produce_records(&topic, records).await.expect("produce");
    let outage = Duration::from_secs(60);
    tokio::time::sleep(outage).await;
    let during = samples.lock().unwrap().clone();
    let status_during = pipeline_status(&bed, ns.name(), "outage").await.expect("status");
    sink.set_outage(false).await.expect("outage end");
    let ids = wait_delivered(&sink, &expected, Duration::from_secs(120)).await;
    wait_back_at_zero(&bed, ns.name(), "outage", Duration::from_secs(120)).await;
    watcher.abort();
    let events = events_for(&bed, ns.name(), "outage").await.expect("events");
    let reasons: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    let worst_replicas_during = during.iter().filter(|s| s.at > 10.0).map(|s| s.replicas).min().unwrap_or(-1);
    // Retrying while records fail one by one; ProcessorUnavailable once the workers' circuit breaker opens.
    let said = |r: &str| r == "Retrying" || r == "ProcessorUnavailable";
    let retrying_seen = during.iter().any(|s| {
        s.stalled.as_ref().is_some_and(|(st, r)| st == "True" && said(r))
            && s.ready.as_ref().is_some_and(|(st, _)| st == "False")
    });
    println!(
        "outage: {n} records, 60 s of 503s; replicas during the outage >= {worst_replicas_during}; status during: \
         lag {:?}, Ready {:?}, Stalled {:?}; {} delivered ({} duplicates); events {reasons:?}",
        status_during.lag.as_ref().map(|l| (l.total, l.retrying_partitions, l.stuck_partitions)),
        condition(&status_during, READY),
        condition(&status_during, STALLED),
        ids.len(),
        ids.len() - expected.len()
    );
    assert!(worst_replicas_during >= 1, "scaled to zero mid-retry: {during:?}");
    assert!(retrying_seen, "status never said Stalled=True Retrying/ProcessorUnavailable, Ready=False: {during:?}");
    assert!(reasons.iter().any(|r| said(r)), "no Retrying/ProcessorUnavailable Event: {events:?}");
    assert_eq!(status_during.lag.as_ref().map(|l| l.stuck_partitions), Some(0), "retrying is not stuck");
    assert!(longest_backlog_at_zero(&during) < 10.0, "{during:?}");
    ns.delete().await.expect("delete");
}

#[tokio::test]
async fn a_hot_partition_wakes_one_pod() {
    let bed = bed().await;
    let (ns, sink) = setup(&bed, "e2e-hot").await;
    let topic = unique_topic("hot");
    bed.create_topic(&topic, 12).await.expect("topic");
    // lagThreshold 1000: the plain lag rule would want 12 pods for 12,000 records.
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest(
            "hot",
            &bed,
            &topic,
            &sink,
            json!({"scaling": {"minReplicas": 0, "maxReplicas": 12, "lagThreshold": 1000}}),
        ),
    )
    .await
    .expect("apply");
    let (samples, watcher) = watch(&bed, ns.name(), "hot");
    // One key: every record lands on the same partition.
    let n = 12_000;
    let records = id_records("hot", 0..n, 1);
    let expected: BTreeSet<String> = records.iter().map(|(_, v)| String::from_utf8(v.clone()).unwrap()).collect();
    bed.produce_records(&topic, records).await.expect("produce");
    wait_delivered(&sink, &expected, Duration::from_secs(240)).await;
    wait_back_at_zero(&bed, ns.name(), "hot", Duration::from_secs(120)).await;
    watcher.abort();
    let samples = samples.lock().unwrap().clone();
    let most = samples.iter().map(|s| s.replicas).max().unwrap_or(0);
    let lagging: BTreeSet<i32> = bed
        .end_offsets(&topic)
        .await
        .expect("end offsets")
        .into_iter()
        .filter(|(_, end)| *end > 0)
        .map(|(p, _)| p)
        .collect();
    println!("hot partition: {n} records on partitions {lagging:?} of 12; at most {most} replicas");
    assert_eq!(lagging.len(), 1, "the records were meant for one partition");
    assert_eq!(most, 1, "lag on one partition gives work to one pod: {samples:?}");
    ns.delete().await.expect("delete");
}
