//! End-to-end scenarios on the local test bed: kpipe installed with Helm (the operator runs as a pod under the
//! chart's ServiceAccount and RBAC), pipelines applied with the API, workers run as real processes against the
//! real Kafka broker, records delivered to an HTTP sink pod. Each scenario prints a short timing/result summary.
//!
//! Run: `cargo test -p kpipe-e2e --test pipeline -- --nocapture` (needs `make testbed-up` and release builds of
//! kpipe-operator and kpipe-worker, which `make test` does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kpipe_api::v1alpha1::condition::{DEGRADED, READY};
use kpipe_e2e::scenario::{
    self, Install, Sink, apply_pipeline, condition, events_for, id_records, install_kpipe, patch_pipeline_spec,
    pipeline_manifest, pipeline_status, unique_topic, worker_pods, worker_replicas,
};
use kpipe_e2e::testbed::wait_for;
use kpipe_e2e::{TempNamespace, TestBed, bed};
use kube::Api;
use kube::api::{ListParams, PostParams};
use nix::sys::signal::Signal;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use serde_json::json;

/// The scenarios load the two cores heavily (workers, broker, control plane); running them one at a time keeps
/// their timing meaningful.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A namespace with kpipe installed (namespaced mode) and an HTTP sink.
async fn setup(bed: &TestBed, prefix: &str, install: Install, sink_args: &[&str]) -> (TempNamespace, Sink) {
    scenario::setup_with_sink(bed, prefix, &install, sink_args).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until the sink has every id of `expected` (returns all delivered ids, duplicates included).
async fn wait_delivered(sink: &Sink, expected: &BTreeSet<String>, timeout: Duration) -> Vec<String> {
    scenario::wait_delivered(sink, expected, timeout).await.unwrap_or_else(|e| panic!("{e}"))
}

fn duplicates(ids: &[String]) -> usize {
    ids.len() - ids.iter().collect::<BTreeSet<_>>().len()
}

#[tokio::test]
async fn pipeline_happy_path_scales_from_zero_delivers_everything_and_returns_to_zero() {
    let _serial = SERIAL.lock().await;
    let bed = bed().await;
    let t0 = Instant::now();
    let (ns, sink) = setup(&bed, "e2e-happy", Install::default(), &[]).await;
    let topic = unique_topic("orders");
    bed.create_topic(&topic, 12).await.expect("topic");
    bed.create_topic(&format!("{topic}-dlq"), 1).await.expect("dlq topic");
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest("orders", &bed, &topic, &sink, json!({"deadLetter": {"topic": format!("{topic}-dlq")}})),
    )
    .await
    .expect("apply");
    // Idle pipeline: Ready at zero replicas.
    wait_for("pipeline Ready at 0 replicas", Duration::from_secs(60), || async {
        let s = pipeline_status(&bed, ns.name(), "orders").await.ok()?;
        (condition(&s, READY).map(|c| c.0).as_deref() == Some("True") && s.replicas == 0).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        bed.dump_pod_logs(ns.name());
        panic!("{e}")
    });
    let n = 100_000;
    let records = id_records("happy", 0..n, 1000);
    let expected: BTreeSet<String> = records.iter().map(|(_, v)| String::from_utf8(v.clone()).unwrap()).collect();
    // Watch replicas from before the burst until it drained: (max replicas seen, time of the first scale-up after the
    // burst began). Producing 100,000 records can take longer than the whole scale-up (on kind, through Docker's
    // network, it did: 0 → 3 → 6 → 3 all before the producer returned), so the watch must not start after it.
    let seen = std::sync::Arc::new(std::sync::Mutex::new((0i32, None::<Duration>)));
    let watcher = {
        let (bed, ns, seen) = (bed.clone(), ns.name().to_string(), seen.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            loop {
                let r = worker_replicas(&bed, &ns, "orders").await.unwrap_or(0);
                if let Ok(mut s) = seen.lock() {
                    s.0 = s.0.max(r);
                    if r > 0 && s.1.is_none() {
                        s.1 = Some(start.elapsed());
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let produced_at = Instant::now();
    bed.produce_records(&topic, records).await.expect("produce");
    println!("happy path: produced {n} records in {:?}", produced_at.elapsed());
    let ids = wait_delivered(&sink, &expected, Duration::from_secs(420)).await;
    let drained_in = produced_at.elapsed();
    // The operator and the workers ran from the images under test (on kind: the ones `make images` built and loaded).
    let images = bed.run_kubectl(&["get", "pods", "-n", ns.name(), "-o", "jsonpath={..image}"]).expect("pod images");
    println!("happy path: pod images {images}");
    for var in [scenario::ENV_OPERATOR_IMAGE, scenario::ENV_WORKER_IMAGE] {
        if let Some(image) = bed.image_override(var) {
            assert!(images.split_whitespace().any(|i| i == image), "no pod ran {image} ({var}): {images}");
        }
    }
    // Lag back to 0, then replicas back to 0 after the cooldown.
    wait_for("lag back to 0", Duration::from_secs(60), || async {
        let s = pipeline_status(&bed, ns.name(), "orders").await.ok()?;
        (s.lag.as_ref()?.total == 0).then_some(())
    })
    .await
    .expect("lag 0");
    wait_for("replicas back to 0", Duration::from_secs(120), || async {
        (worker_replicas(&bed, ns.name(), "orders").await.ok()? == 0).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        bed.dump_pod_logs(ns.name());
        panic!("{e}")
    });
    watcher.abort();
    let (max_replicas, first_up) = *seen.lock().unwrap();
    let status = pipeline_status(&bed, ns.name(), "orders").await.expect("status");
    let events = events_for(&bed, ns.name(), "orders").await.expect("events");
    println!(
        "happy path: {n} records, 0 -> {max_replicas} -> 0 replicas, first scale-up {first_up:?} after produce, \
         drained in {drained_in:?}, {} duplicates, total {:?}; events: {events:?}",
        duplicates(&ids),
        t0.elapsed()
    );
    assert!(
        max_replicas > 1 && max_replicas <= 6,
        "replicas must go above 1 and never above maxReplicas 6: saw {max_replicas}"
    );
    assert_eq!(condition(&status, READY).map(|c| c.0).as_deref(), Some("True"));
    assert!(status.observed_generation.is_some());
    // The Events tell the story in order: woken from zero by the burst, ... , back to zero after the cooldown.
    let reasons: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    let activated = reasons.iter().position(|r| *r == "Activated");
    let to_zero = reasons.iter().rposition(|r| *r == "ScaledToZero");
    assert!(matches!((activated, to_zero), (Some(a), Some(z)) if a < z), "scale Events out of order: {events:?}");
    // The operator ran as a pod under the chart's ServiceAccount: its RBAC was sufficient (no denial in its log).
    // An apiserver denial always carries reason "Forbidden" and a message "... is forbidden: User ..."; a bare
    // "403" is not searched for because timestamps and durations contain it.
    let operator_log: String =
        bed.pod_logs(ns.name()).split("===== ").filter(|part| part.contains("kpipe-operator")).collect();
    assert!(!operator_log.is_empty(), "no operator log found");
    assert!(
        !operator_log.contains("Forbidden")
            && !operator_log.contains("forbidden")
            && !operator_log.contains("code: 403"),
        "the operator hit an RBAC denial:\n{operator_log}"
    );
    let table = bed.kubectl_cmd().args(["get", "cpl", "-n", ns.name()]).output().expect("kubectl");
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(table.starts_with("NAME") && table.contains("DESIRED") && table.contains("orders"), "{table}");
    ns.delete().await.expect("delete");
}

#[tokio::test]
async fn pipeline_poison_records_go_to_the_dead_letter_topic_with_context() {
    let _serial = SERIAL.lock().await;
    let bed = bed().await;
    let (ns, sink) = setup(&bed, "e2e-poison", Install::default(), &["--poison-prefix", "poison-"]).await;
    let topic = unique_topic("payments");
    let dlq = format!("{topic}-dlq");
    bed.create_topic(&topic, 6).await.expect("topic");
    bed.create_topic(&dlq, 1).await.expect("dlq");
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest(
            "payments",
            &bed,
            &topic,
            &sink,
            json!({
                "ordering": "unordered",
                "batch": {"maxRecords": 1},
                "retry": {"maxAttempts": 2, "initialBackoff": "10ms", "maxBackoff": "50ms"},
                "onFailure": "deadLetter", "deadLetter": {"topic": dlq},
                "scaling": {"minReplicas": 1, "maxReplicas": 3},
            }),
        ),
    )
    .await
    .expect("apply");
    wait_for("payments Ready with its worker", Duration::from_secs(90), || async {
        let s = pipeline_status(&bed, ns.name(), "payments").await.ok()?;
        (condition(&s, READY).map(|c| c.0).as_deref() == Some("True")).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        bed.dump_pod_logs(ns.name());
        panic!("{e}")
    });
    let n = 10_000;
    let records: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
        .map(|i| {
            let v = if i % 100 == 7 { format!("poison-{i:06}") } else { format!("good-{i:06}") };
            (format!("k{}", i % 50).into_bytes(), v.into_bytes())
        })
        .collect();
    let poison: BTreeSet<String> = records
        .iter()
        .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        .filter(|v| v.starts_with("poison-"))
        .collect();
    let good: BTreeSet<String> =
        records.iter().map(|(_, v)| String::from_utf8(v.clone()).unwrap()).filter(|v| v.starts_with("good-")).collect();
    bed.produce_records(&topic, records).await.expect("produce");
    let ids = wait_delivered(&sink, &good, Duration::from_secs(300)).await;
    let dead =
        bed.consume(&dlq, &format!("check-{}", rand::random::<u32>()), poison.len(), Duration::from_secs(120)).await;
    let dead = dead.unwrap_or_else(|e| {
        bed.dump_pod_logs(ns.name());
        panic!("{e}")
    });
    let dead_ids: BTreeSet<String> = dead.iter().map(|r| String::from_utf8_lossy(&r.value).into_owned()).collect();
    assert_eq!(dead_ids, poison, "exactly the poison records must be dead-lettered");
    assert!(ids.iter().all(|id| id.starts_with("good-")), "no poison record reaches the sink");
    // Context headers on a dead-lettered record.
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bed.kafka_bootstrap())
        .set("group.id", format!("headers-{}", rand::random::<u32>()))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&dlq]).expect("subscribe");
    let msg =
        tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.expect("a DLQ record").expect("recv");
    let headers: BTreeMap<String, String> = msg
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                .collect()
        })
        .unwrap_or_default();
    for key in [
        "kpipe.original.topic",
        "kpipe.original.partition",
        "kpipe.original.offset",
        "kpipe.original.timestamp",
        "kpipe.error.class",
        "kpipe.error.message",
        "kpipe.attempts",
        "kpipe.pipeline",
    ] {
        assert!(headers.contains_key(key), "DLQ record lacks header {key}: {headers:?}");
    }
    assert_eq!(headers["kpipe.original.topic"], topic);
    assert!(msg.key().is_some(), "the original key is kept");
    let status = pipeline_status(&bed, ns.name(), "payments").await.expect("status");
    assert_eq!(
        condition(&status, READY).map(|c| c.0).as_deref(),
        Some("True"),
        "a poison record must not make the pipeline unready: {:#?}",
        status.conditions
    );
    println!(
        "poison: {} poison records dead-lettered with context headers, {} good delivered, {} duplicates",
        dead_ids.len(),
        good.len(),
        duplicates(&ids)
    );
    ns.delete().await.expect("delete");
}

/// Waits for Degraded=True with a reason/message containing `needle`; returns the condition message.
async fn wait_degraded(bed: &TestBed, ns: &str, name: &str, needle: &str) -> String {
    wait_for(&format!("{name} Degraded about {needle:?}"), Duration::from_secs(90), || async {
        let s = pipeline_status(bed, ns, name).await.ok()?;
        let c = s.condition(DEGRADED)?;
        let text = format!("{} {}", c.reason, c.message);
        (c.status == "True" && text.to_lowercase().contains(&needle.to_lowercase())).then_some(text)
    })
    .await
    .unwrap_or_else(|e| {
        bed.dump_pod_logs(ns);
        panic!("{e}")
    })
}

async fn wait_recovered(bed: &TestBed, ns: &str, name: &str) {
    wait_for(&format!("{name} recovered (Degraded=False, Ready=True)"), Duration::from_secs(120), || async {
        let s = pipeline_status(bed, ns, name).await.ok()?;
        let degraded = s.condition(DEGRADED).map(|c| c.status.as_str()) == Some("False");
        let ready = s.condition(READY).map(|c| c.status.as_str()) == Some("True");
        (degraded && ready).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        bed.dump_pod_logs(ns);
        panic!("{e}")
    })
}

#[tokio::test]
async fn pipeline_runtime_errors_degrade_with_a_reason_and_recover_when_fixed() {
    let _serial = SERIAL.lock().await;
    let bed = bed().await;
    let (ns, sink) = setup(&bed, "e2e-bad", Install::default(), &[]).await;
    let n = ns.name();
    let t0 = Instant::now();

    // Missing topic -> Degraded; creating it recovers the pipeline.
    let missing_topic = unique_topic("not-yet");
    apply_pipeline(&bed, n, pipeline_manifest("missing-topic", &bed, &missing_topic, &sink, json!({})))
        .await
        .expect("apply");
    let said = wait_degraded(&bed, n, "missing-topic", "topic").await;
    bed.create_topic(&missing_topic, 3).await.expect("topic");
    wait_recovered(&bed, n, "missing-topic").await;
    println!("missing topic: Degraded ({said}) and recovered");

    // Unreachable broker -> Degraded; pointing at the real broker recovers.
    let topic = unique_topic("reachable");
    bed.create_topic(&topic, 3).await.expect("topic");
    let mut p = pipeline_manifest("unreachable", &bed, &topic, &sink, json!({}));
    p["spec"]["source"]["bootstrapServers"] = json!(["10.244.0.1:1"]);
    apply_pipeline(&bed, n, p).await.expect("apply");
    let said = wait_degraded(&bed, n, "unreachable", "").await;
    patch_pipeline_spec(&bed, n, "unreachable", json!({"source": {"bootstrapServers": [bed.kafka_bootstrap_pods()]}}))
        .await
        .expect("patch");
    wait_recovered(&bed, n, "unreachable").await;
    println!("unreachable broker: Degraded ({said}) and recovered");

    // Missing Secret -> Degraded naming the Secret; creating it clears that reason.
    let mut p = pipeline_manifest("missing-secret", &bed, &topic, &sink, json!({}));
    p["spec"]["source"]["auth"] = json!({"sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "kafka-user"}}});
    apply_pipeline(&bed, n, p).await.expect("apply");
    let said = wait_degraded(&bed, n, "missing-secret", "kafka-user").await;
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kafka-user"},
        "stringData": {"username": "u", "password": "p"},
    }))
    .unwrap();
    Api::<Secret>::namespaced(bed.client(), n).create(&PostParams::default(), &secret).await.expect("secret");
    wait_for("missing-secret no longer degraded because of the Secret", Duration::from_secs(90), || async {
        let s = pipeline_status(&bed, n, "missing-secret").await.ok()?;
        let c = s.condition(DEGRADED)?;
        (!format!("{} {}", c.reason, c.message).contains("kafka-user") || c.status == "False").then_some(())
    })
    .await
    .expect("secret reason cleared");
    println!("missing secret: Degraded ({said}) and the reason cleared once the Secret exists");

    // Fewer partitions than minReplicas -> Degraded; lowering minReplicas recovers.
    let small = unique_topic("small");
    bed.create_topic(&small, 2).await.expect("topic");
    apply_pipeline(
        &bed,
        n,
        pipeline_manifest("too-few-partitions", &bed, &small, &sink, json!({"scaling": {"minReplicas": 3}})),
    )
    .await
    .expect("apply");
    let said = wait_degraded(&bed, n, "too-few-partitions", "partition").await;
    patch_pipeline_spec(&bed, n, "too-few-partitions", json!({"scaling": {"minReplicas": 1}})).await.expect("patch");
    wait_recovered(&bed, n, "too-few-partitions").await;
    println!("too few partitions: Degraded ({said}) and recovered");

    // Every error was a Warning Event, and the healthy pipelines were served meanwhile.
    for name in ["missing-topic", "unreachable", "missing-secret", "too-few-partitions"] {
        let events = events_for(&bed, n, name).await.expect("events");
        assert!(events.iter().any(|e| e.0 == "Warning"), "{name}: no Warning Event: {events:?}");
    }
    println!("runtime errors: 4 cases degraded and recovered in {:?}", t0.elapsed());
    ns.delete().await.expect("delete");
}

/// The group protocols the rebalance scenarios run with (`spec.source.groupProtocol`).
const CLASSIC: &str = "classic";
const CONSUMER: &str = "consumer";

/// `extra` with `source.groupProtocol: protocol`.
fn with_protocol(protocol: &str, mut extra: serde_json::Value) -> serde_json::Value {
    scenario::merge_json(&mut extra, json!({"source": {"groupProtocol": protocol}}));
    extra
}

#[tokio::test]
async fn pipeline_scale_down_loses_nothing_and_duplicates_nothing() {
    scale_down_loses_nothing_and_duplicates_nothing(CLASSIC).await;
}

#[tokio::test]
async fn pipeline_consumer_protocol_scale_down_loses_nothing_and_duplicates_nothing() {
    scale_down_loses_nothing_and_duplicates_nothing(CONSUMER).await;
}

async fn scale_down_loses_nothing_and_duplicates_nothing(protocol: &str) {
    let _serial = SERIAL.lock().await;
    let bed = bed().await;
    let (ns, sink) = setup(&bed, "e2e-down", Install::default(), &[]).await;
    let topic = unique_topic("steady");
    bed.create_topic(&topic, 8).await.expect("topic");
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest(
            "steady",
            &bed,
            &topic,
            &sink,
            with_protocol(protocol, json!({"scaling": {"minReplicas": 4, "maxReplicas": 4}, "onFailure": "block"})),
        ),
    )
    .await
    .expect("apply");
    wait_for("4 workers ready", Duration::from_secs(120), || async {
        let s = pipeline_status(&bed, ns.name(), "steady").await.ok()?;
        (s.ready_replicas == 4).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        bed.dump_pod_logs(ns.name());
        panic!("{e}")
    });
    let mut expected = BTreeSet::new();
    for round in 0..20 {
        let batch = id_records("steady", round * 1000..(round + 1) * 1000, 64);
        expected.extend(batch.iter().map(|(_, v)| String::from_utf8(v.clone()).unwrap()));
        bed.produce_records(&topic, batch).await.expect("produce");
        if round == 8 {
            // Forced scale-down while records flow: an incremental rebalance (cooperative-sticky under classic,
            // the broker's under consumer) + graceful SIGTERM.
            patch_pipeline_spec(&bed, ns.name(), "steady", json!({"scaling": {"minReplicas": 1, "maxReplicas": 1}}))
                .await
                .expect("patch");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ids = wait_delivered(&sink, &expected, Duration::from_secs(240)).await;
    assert_eq!(worker_replicas(&bed, ns.name(), "steady").await.expect("replicas"), 1);
    let dups = duplicates(&ids);
    println!(
        "scale-down 4 -> 1 under traffic (groupProtocol {protocol}): {} records, 0 lost, {dups} duplicates",
        expected.len()
    );
    assert_eq!(dups, 0, "a graceful scale-down must not redeliver records");
    ns.delete().await.expect("delete");
}

#[tokio::test]
async fn pipeline_chaos_loses_nothing() {
    chaos_loses_nothing(CLASSIC).await;
}

#[tokio::test]
async fn pipeline_consumer_protocol_chaos_loses_nothing() {
    chaos_loses_nothing(CONSUMER).await;
}

async fn chaos_loses_nothing(protocol: &str) {
    let _serial = SERIAL.lock().await;
    let bed = bed().await;
    let (ns, sink) = setup(&bed, "e2e-chaos", Install { replicas: 2, ..Install::default() }, &[]).await;
    let topic = unique_topic("chaos");
    let partitions = 12;
    let uncommitted_per_partition = 64;
    bed.create_topic(&topic, partitions).await.expect("topic");
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest(
            "chaos",
            &bed,
            &topic,
            &sink,
            with_protocol(
                protocol,
                json!({"onFailure": "block",
                       "concurrency": {"perWorker": 256, "perPartition": 32,
                                       "uncommittedPerPartition": uncommitted_per_partition},
                       "scaling": {"minReplicas": 0, "maxReplicas": 6, "lagThreshold": 2000}}),
            ),
        ),
    )
    .await
    .expect("apply");
    let n = 200_000;
    let records = id_records("chaos", 0..n, 997);
    let expected: BTreeSet<String> = records.iter().map(|(_, v)| String::from_utf8(v.clone()).unwrap()).collect();
    let producer = {
        let (bed, topic) = (bed.clone(), topic.clone());
        tokio::spawn(async move {
            for chunk in records.chunks(20_000) {
                bed.produce_records(&topic, chunk.to_vec()).await.expect("produce");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    // Crashes (kill -9, broker restart) may redeliver what was done but not yet committed; graceful rescales and the
    // operator failover must not.
    let (mut crashes, mut rescales) = (0usize, 0usize);
    let start = Instant::now();
    let mut broker_restarted = false;
    let mut operator_killed = false;
    let mut step = 0;
    while start.elapsed() < Duration::from_secs(60) {
        step += 1;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let pods = worker_pods(&bed, ns.name(), "chaos").await;
        if let Some(pod) = pods.get(step % pods.len().max(1))
            && bed.kill_container(ns.name(), pod, "worker", Signal::SIGKILL).await.is_ok()
        {
            println!("chaos: kill -9 worker {pod}");
            crashes += 1;
        }
        if step % 3 == 0 {
            let max = if step % 6 == 0 { 6 } else { 3 };
            patch_pipeline_spec(&bed, ns.name(), "chaos", json!({"scaling": {"maxReplicas": max}}))
                .await
                .expect("rescale");
            rescales += 1;
        }
        if step == 5 && !broker_restarted {
            println!("chaos: restarting the Kafka broker");
            bed.restart_kafka().await.expect("restart kafka");
            broker_restarted = true;
            crashes += 1;
        }
        if step == 8 && !operator_killed {
            let lease =
                Api::<Lease>::namespaced(bed.client(), ns.name()).list(&ListParams::default()).await.expect("leases");
            let holder = lease.items.iter().find_map(|l| l.spec.as_ref()?.holder_identity.clone());
            if let Some(holder) = holder
                && bed.kill_container(ns.name(), &holder, "operator", Signal::SIGKILL).await.is_ok()
            {
                println!("chaos: kill -9 operator leader {holder}");
                operator_killed = true;
            }
        }
    }
    producer.await.expect("producer");
    let ids = wait_delivered(&sink, &expected, Duration::from_secs(600)).await;
    let dups = duplicates(&ids);
    // At-least-once: a crash re-delivers what its worker had started from the last acknowledged commit on, and the
    // worker never lets that exceed concurrency.uncommittedPerPartition per partition it owns. A kill -9 or the
    // broker restart can affect at most every partition of the topic once.
    let bound = crashes * partitions as usize * uncommitted_per_partition;
    println!(
        "chaos (groupProtocol {protocol}): {n} records, {crashes} crashes (kill -9 of workers, broker restart), {rescales} forced rescales, \
         operator leader killed: {operator_killed}; 0 lost, {dups} duplicates (bound {bound} = {crashes} crashes × \
         {partitions} partitions × uncommittedPerPartition {uncommitted_per_partition}) in {:?}",
        start.elapsed()
    );
    assert!(broker_restarted && operator_killed, "the chaos schedule did not run fully");
    assert!(dups <= bound, "{dups} duplicates exceed the configured bound {bound}");
    ns.delete().await.expect("delete");
}

#[tokio::test]
async fn pipeline_helm_upgrade_and_uninstall_leave_the_cluster_consistent() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let _serial = SERIAL.lock().await;
    let bed = bed().await;
    let (ns, sink) = setup(&bed, "e2e-helm", Install::default(), &[]).await;
    let topic = unique_topic("upgrade");
    bed.create_topic(&topic, 3).await.expect("topic");
    apply_pipeline(
        &bed,
        ns.name(),
        pipeline_manifest("up", &bed, &topic, &sink, json!({"scaling": {"minReplicas": 1}})),
    )
    .await
    .expect("apply");
    let ready = || async {
        let s = pipeline_status(&bed, ns.name(), "up").await.ok()?;
        (condition(&s, READY).map(|c| c.0).as_deref() == Some("True") && s.ready_replicas >= 1).then_some(())
    };
    wait_for("pipeline Ready before the upgrade", Duration::from_secs(120), ready).await.unwrap_or_else(|e| {
        bed.dump_pod_logs(ns.name());
        panic!("{e}")
    });
    // Upgrade with a changed value: the operator restarts with new default worker resources and re-renders workers.
    let install = Install { sets: vec!["worker.resources.limits.memory=300Mi".into()], ..Install::default() };
    install_kpipe(&bed, ns.name(), &install).expect("helm upgrade");
    let workers: Api<Deployment> = Api::namespaced(bed.client(), ns.name());
    wait_for("worker Deployment carries the upgraded default resources", Duration::from_secs(120), || async {
        let d = workers.get("up-worker").await.ok()?;
        let limits = d.spec?.template.spec?.containers.first()?.resources.clone()?.limits?;
        (limits.get("memory").map(|q| q.0.as_str()) == Some("300Mi")).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        bed.dump_pod_logs(ns.name());
        panic!("{e}")
    });
    wait_for("pipeline Ready after the upgrade", Duration::from_secs(120), ready).await.expect("ready after upgrade");
    // Uninstall: the operator, its RBAC and Service go; user pipelines (and their workers) stay, untouched.
    scenario::uninstall_kpipe(&bed, ns.name()).expect("helm uninstall");
    wait_for("operator Deployment removed", Duration::from_secs(60), || async {
        workers.get_opt("kpipe-operator").await.ok()?.is_none().then_some(())
    })
    .await
    .expect("operator removed");
    let roles = Api::<Role>::namespaced(bed.client(), ns.name()).list(&ListParams::default()).await.expect("roles");
    let bindings =
        Api::<RoleBinding>::namespaced(bed.client(), ns.name()).list(&ListParams::default()).await.expect("bindings");
    let leftovers: Vec<String> = roles
        .items
        .iter()
        .filter_map(|r| r.metadata.name.clone())
        .chain(bindings.items.iter().filter_map(|b| b.metadata.name.clone()))
        .filter(|n| n.starts_with("kpipe"))
        .collect();
    assert!(leftovers.is_empty(), "helm uninstall left RBAC behind: {leftovers:?}");
    let cp = Api::<kpipe_api::v1alpha1::ConsumerPipeline>::namespaced(bed.client(), ns.name()).get("up").await;
    assert!(cp.is_ok(), "uninstalling kpipe must not delete user pipelines");
    let crd = bed.kubectl_cmd().args(["get", "crd", "consumerpipelines.kpipe.io"]).output().expect("kubectl");
    assert!(crd.status.success(), "the CRD must survive an uninstall");
    println!(
        "helm: upgrade re-rendered the workers with the new defaults; uninstall removed operator + RBAC, kept pipelines and CRD"
    );
    ns.delete().await.expect("delete");
}

/// Records per second the rebalance-pause scenario produces (in ticks of 100 ms).
const PAUSE_RATE: u64 = 2_000;
const PAUSE_TICK: Duration = Duration::from_millis(100);

/// One observation of the pause sampler: time since the start, records the broker acknowledged, distinct records the
/// sink received.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    produced: u64,
    delivered: u64,
}

/// What the sampler saw of one phase (`from..to`, times since the start).
#[derive(Debug)]
struct Phase {
    /// The longest time between two observations that saw new records delivered (a full stop of the pipeline).
    longest_stop: Duration,
    /// The largest backlog (produced − delivered) in the phase, in records.
    peak_backlog: u64,
}

/// The longest stop and peak backlog in `from..to`. Pure: samples in, numbers out.
fn phase(samples: &[Sample], from: Duration, to: Duration) -> Phase {
    let mut longest_stop = Duration::ZERO;
    let mut last_progress: Option<(Duration, u64)> = None;
    let mut peak_backlog = 0;
    for s in samples.iter().filter(|s| s.at >= from && s.at < to) {
        peak_backlog = peak_backlog.max(s.produced.saturating_sub(s.delivered));
        match last_progress {
            None => last_progress = Some((s.at, s.delivered)),
            Some((at, delivered)) if s.delivered > delivered => {
                longest_stop = longest_stop.max(s.at - at);
                last_progress = Some((s.at, s.delivered));
            }
            Some(_) => {}
        }
    }
    // A stop still running at the end of the phase counts up to the end.
    if let Some((at, _)) = last_progress
        && let Some(last) = samples.iter().rfind(|s| s.at >= from && s.at < to)
    {
        longest_stop = longest_stop.max(last.at - at);
    }
    Phase { longest_stop, peak_backlog }
}

#[test]
fn phase_finds_the_longest_stop_and_the_peak_backlog() {
    let s = |ms: u64, produced: u64, delivered: u64| Sample { at: Duration::from_millis(ms), produced, delivered };
    let samples = [s(0, 10, 10), s(100, 20, 15), s(200, 30, 15), s(300, 40, 15), s(400, 50, 48), s(500, 60, 60)];
    let p = phase(&samples, Duration::ZERO, Duration::from_secs(1));
    assert_eq!(p.longest_stop, Duration::from_millis(300));
    assert_eq!(p.peak_backlog, 25);
    let tail = phase(&samples[..4], Duration::from_millis(100), Duration::from_secs(1));
    assert_eq!(tail.longest_stop, Duration::from_millis(200), "a stop running at the end counts");
}

#[tokio::test]
async fn pipeline_rebalance_pauses_scale_up_3_to_6_and_back() {
    rebalance_pauses(CLASSIC).await;
}

#[tokio::test]
async fn pipeline_consumer_protocol_rebalance_pauses_scale_up_3_to_6_and_back() {
    rebalance_pauses(CONSUMER).await;
}

/// Processing pauses while workers join and leave: a steady 2,000 records/s over 12 partitions, the sink sampled
/// every 100 ms; 3 workers, then 6 (scale-up), then 3 again (scale-down). Reports, per phase, the longest full stop
/// and the backlog peak above the steady state (partitions that stall while moving show as backlog even when others
/// keep delivering; divided by the rate it is the equivalent whole-pipeline pause).
async fn rebalance_pauses(protocol: &str) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let _serial = SERIAL.lock().await;
    let bed = bed().await;
    let (ns, sink) = setup(&bed, "e2e-pause", Install::default(), &[]).await;
    let topic = unique_topic("pause");
    bed.create_topic(&topic, 12).await.expect("topic");
    let fixed = |n: i32| json!({"scaling": {"minReplicas": n, "maxReplicas": n}});
    let mut extra = json!({"onFailure": "block", "batch": {"maxWait": "10ms"}});
    scenario::merge_json(&mut extra, fixed(3));
    apply_pipeline(&bed, ns.name(), pipeline_manifest("pause", &bed, &topic, &sink, with_protocol(protocol, extra)))
        .await
        .expect("apply");
    let ready = |n: i32| {
        let (bed, ns) = (bed.clone(), ns.name().to_string());
        async move {
            wait_for(&format!("{n} workers ready"), Duration::from_secs(180), || async {
                let s = pipeline_status(&bed, &ns, "pause").await.ok()?;
                (s.ready_replicas == n && s.replicas == n).then_some(())
            })
            .await
        }
    };
    ready(3).await.unwrap_or_else(|e| {
        bed.dump_pod_logs(ns.name());
        panic!("{e}")
    });
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let producer = {
        let (bed, topic, stop, produced) = (bed.clone(), topic.clone(), stop.clone(), produced.clone());
        tokio::spawn(async move {
            let per_tick = (PAUSE_RATE * PAUSE_TICK.as_millis() as u64 / 1000) as usize;
            let mut tick = tokio::time::interval(PAUSE_TICK);
            let mut expected = BTreeSet::new();
            let mut next = 0;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let batch = id_records("pause", next..next + per_tick, 997);
                next += per_tick;
                expected.extend(batch.iter().map(|(_, v)| String::from_utf8(v.clone()).unwrap()));
                bed.produce_records(&topic, batch).await.expect("produce");
                produced.fetch_add(per_tick as u64, Ordering::Relaxed);
            }
            expected
        })
    };
    let sampler = {
        let (sink, stop, produced) = (sink.clone(), stop.clone(), produced.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(PAUSE_TICK);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let produced = produced.load(Ordering::Relaxed);
                if let Some(delivered) = sink.stats().await.ok().and_then(|s| s["unique"].as_u64()) {
                    samples.push(Sample { at: t0.elapsed(), produced, delivered });
                }
            }
            samples
        })
    };
    // Steady state first, then 3 -> 6 and 6 -> 3, each followed by 20 s of traffic.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let up_at = t0.elapsed();
    patch_pipeline_spec(&bed, ns.name(), "pause", fixed(6)).await.expect("scale up");
    ready(6).await.unwrap_or_else(|e| panic!("{e}"));
    let up_ready = t0.elapsed() - up_at;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let down_at = t0.elapsed();
    patch_pipeline_spec(&bed, ns.name(), "pause", fixed(3)).await.expect("scale down");
    ready(3).await.unwrap_or_else(|e| panic!("{e}"));
    let down_ready = t0.elapsed() - down_at;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let end = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let expected = producer.await.expect("producer");
    let samples = sampler.await.expect("sampler");
    let ids = wait_delivered(&sink, &expected, Duration::from_secs(180)).await;
    // The first seconds fill the pipeline; the steady state is measured after them.
    let steady = phase(&samples, Duration::from_secs(5), up_at);
    let up = phase(&samples, up_at, down_at);
    let down = phase(&samples, down_at, end);
    let seconds = |p: &Phase| p.peak_backlog.saturating_sub(steady.peak_backlog) as f64 / PAUSE_RATE as f64;
    println!(
        "rebalance pauses (groupProtocol {protocol}, {PAUSE_RATE} rec/s, 12 partitions, {} records, {} duplicates): \
         steady: longest stop {:?}, backlog peak {}; scale-up 3 -> 6 (6 ready after {up_ready:.1?}): longest stop \
         {:?}, backlog peak {} (+{:.2} s of traffic); scale-down 6 -> 3 (3 ready after {down_ready:.1?}): longest \
         stop {:?}, backlog peak {} (+{:.2} s of traffic)",
        expected.len(),
        duplicates(&ids),
        steady.longest_stop,
        steady.peak_backlog,
        up.longest_stop,
        up.peak_backlog,
        seconds(&up),
        down.longest_stop,
        down.peak_backlog,
        seconds(&down),
    );
    assert!(samples.len() > 100, "the sampler saw too little: {} samples", samples.len());
    ns.delete().await.expect("delete");
}
