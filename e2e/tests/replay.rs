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
//! A pipeline that reaches Kafka only through the bed's SCRAM listener (SASL_SSL, SCRAM-SHA-512, port 9094) gets the
//! same: its dead letters counted in `status.deadLetters` and a replay that reaches Succeeded with the right counts
//! (the operator's reader and the replay Job use the pipeline's Secrets like its workers).
//!
//! Run: `cargo test -p kpipe-e2e --test replay -- --test-threads=1 --nocapture` (needs the test bed and release
//! builds).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kpipe_api::kafka_client::{self, Credentials, Material};
use kpipe_api::v1alpha1::{Auth, DeadLetterReplay, ReplayPhase};
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

/// The bed's SCRAM listener: a bed whose Kafka helpers go through it as the bed's SCRAM user, and that user's
/// credentials and CA (env file keys `KAFKA_SCRAM_BOOTSTRAP`, `KAFKA_SECURITY_DIR`; see e2e/tests/security.rs).
fn scram(bed: &TestBed) -> (TestBed, String, String, String) {
    let var = |k: &str| {
        std::env::var(k)
            .ok()
            .or_else(|| bed.var(k).map(str::to_string))
            .unwrap_or_else(|| panic!("{k} is not set: the bed predates its secured listeners"))
    };
    let dir = std::path::PathBuf::from(var("KAFKA_SECURITY_DIR"));
    let file = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
    let (user, password, ca) =
        (file("scram-user").trim().to_string(), file("scram-password").trim().to_string(), file("ca.crt"));
    let auth: Auth = serde_json::from_value(json!({
        "sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "x"}}, "tls": {"caSecretRef": {"name": "x"}}
    }))
    .unwrap();
    let creds = Credentials {
        username: Some(user.clone()),
        password: Some(password.clone()),
        ca: Some(Material::Pem(ca.clone())),
        ..Default::default()
    };
    let kafka = bed.kafka_via(&var("KAFKA_SCRAM_BOOTSTRAP"), kafka_client::properties(Some(&auth), &creds));
    (kafka, user, password, ca)
}

#[tokio::test]
async fn a_scram_pipelines_dead_letters_are_counted_and_replayed() {
    let bed = TestBed::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let (kafka, user, password, ca) = scram(&bed);
    let (ns, sink) = scenario::setup_with_sink(
        &bed,
        "e2e-replay-scram",
        &Install::default(),
        &["--poison-prefix", "poison", "--poison-mode", "named"],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let secrets = Api::<Secret>::namespaced(bed.client(), ns.name());
    for (name, data) in
        [("kafka-user", json!({"username": user, "password": password})), ("kafka-ca", json!({"ca.crt": ca}))]
    {
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque", "stringData": data,
        }))
        .unwrap();
        secrets.patch(name, &PatchParams::apply("kpipe-e2e").force(), &Patch::Apply(&secret)).await.expect("secret");
    }
    let topic = unique_topic("replayscram");
    let (dlq, parking) = (format!("{topic}-dlq"), format!("{topic}-parked"));
    kafka.create_topic(&topic, 3).await.expect("topic");
    kafka.create_topic(&dlq, 2).await.expect("dlq");
    kafka.create_topic(&parking, 1).await.expect("parking");
    let auth = json!({"sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "kafka-user"}},
                      "tls": {"caSecretRef": {"name": "kafka-ca"}}});
    apply_pipeline(
        &kafka,
        ns.name(),
        pipeline_manifest(
            "secured",
            &kafka,
            &topic,
            &sink,
            json!({"source": {"auth": auth}, "deadLetter": {"topic": dlq}}),
        ),
    )
    .await
    .expect("apply");
    // A replay of a pipeline whose dead-letter topic does not exist says so: Pending, DeadLetterTopicUnreadable, and a
    // Warning Event (before any Job exists).
    let missing = format!("{topic}-missing");
    apply_pipeline(
        &kafka,
        ns.name(),
        pipeline_manifest(
            "nodlq",
            &kafka,
            &topic,
            &sink,
            json!({"source": {"auth": auth, "groupId": "nodlq"},
            "deadLetter": {"topic": missing}, "suspend": true}),
        ),
    )
    .await
    .expect("apply nodlq");
    apply_replay(&bed, ns.name(), replay_manifest("scram-r0", "nodlq", &parking)).await;
    let dlr = Api::<DeadLetterReplay>::namespaced(bed.client(), ns.name());
    let unreadable = wait_for("scram-r0 DeadLetterTopicUnreadable", Duration::from_secs(60), || async {
        let s = dlr.get("scram-r0").await.ok()?.status?;
        let c = s.conditions.iter().find(|c| c.type_ == "Complete" && c.reason == "DeadLetterTopicUnreadable")?;
        (s.phase == ReplayPhase::Pending).then(|| c.message.clone())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    println!("replay of a missing dead-letter topic: {unreadable}");
    assert!(unreadable.contains(&missing), "the message names the topic: {unreadable}");
    let r0_events = events_for(&bed, ns.name(), "scram-r0").await.unwrap();
    assert!(r0_events.iter().any(|e| e.0 == "Warning" && e.1 == "DeadLetterTopicUnreadable"), "{r0_events:?}");
    let jobs = Api::<Job>::namespaced(bed.client(), ns.name()).list(&ListParams::default()).await.unwrap();
    assert!(jobs.items.is_empty(), "no Job without end offsets");

    let (records, poison, ok) = scenario::one_percent_poison(1000);
    kafka.produce_records(&topic, records).await.expect("produce");
    wait_delivered(&sink, &ok, Duration::from_secs(120)).await.unwrap_or_else(|e| {
        bed.dump_pod_logs(ns.name());
        panic!("{e}")
    });
    let counted = wait_for("status.deadLetters.total = 10", Duration::from_secs(60), || async {
        pipeline_status(&bed, ns.name(), "secured").await.ok()?.dead_letters.filter(|d| d.total == 10)
    })
    .await
    .unwrap_or_else(|e| {
        let s = bed.run_kubectl(&["-n", ns.name(), "get", "cpl", "secured", "-o", "jsonpath={.status}"]);
        panic!("{e}; status: {s:?}")
    });
    println!("SCRAM pipeline, status.deadLetters: {counted:?}");
    assert_eq!(counted.by_class, BTreeMap::from([("rejected".to_string(), 10)]));
    let ends = kafka.end_offsets(&dlq).await.expect("dlq end offsets");
    let read: BTreeMap<i32, i64> = counted.read_offsets.iter().map(|(p, o)| (p.parse().unwrap(), *o)).collect();
    assert_eq!(read, ends, "the whole dead-letter topic was read through the SCRAM listener");

    let fixed = deploy_sink(&bed, ns.name(), "fixed", &[]).await.expect("fixed sink");
    patch_pipeline_spec(&bed, ns.name(), "secured", json!({"processor": {"http": {"url": fixed.url}}}))
        .await
        .expect("point the pipeline at the fixed sink");
    apply_replay(&bed, ns.name(), replay_manifest("scram-r1", "secured", &parking)).await;
    let r = wait_replay_done(&bed, ns.name(), "scram-r1", Duration::from_secs(180)).await;
    let s = r.status.unwrap();
    println!("SCRAM replay: {s:?}");
    assert_eq!(s.phase, ReplayPhase::Succeeded, "{:?}", s.conditions);
    assert_eq!((s.replayed, s.succeeded, s.failed_again, s.skipped), (10, 10, 0, 0));
    assert_eq!(s.end_offsets.values().sum::<i64>(), 10);
    let delivered = fixed.ids().await.expect("ids");
    assert_eq!(delivered.iter().cloned().collect::<BTreeSet<_>>(), poison, "every dead letter delivered");
    assert_eq!(delivered.len(), 10, "each once: {delivered:?}");
    let reasons: Vec<String> =
        events_for(&bed, ns.name(), "scram-r1").await.unwrap().into_iter().map(|e| e.1).collect();
    assert!(reasons.contains(&"Started".to_string()) && reasons.contains(&"Completed".to_string()), "{reasons:?}");
    assert!(!reasons.iter().any(|r| r == "DeadLetterTopicUnreadable" || r == "JobNotCreated"), "{reasons:?}");
    ns.delete().await.expect("delete");
}
