#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Idle pipelines keep their place, end to end on the test bed: the operator process from this
//! build, real worker pods (the bed's process kubelet), the HTTP test sink, the bed's Kafka. A
//! pipeline delivers 100 ids, is suspended (group empty), an admin deletes its group, new ids are
//! produced and the pipeline resumed: the sink must hold exactly the 110 ids, each once (nothing
//! delivered again from `startOffset: earliest`), and the operator must say what it restored.
//!
//! The variant where the offsets expire by `offsets.retention.minutes` is measured against a private
//! broker in `idle_offsets_kafka.rs` (a read-only broker config; the shared bed broker keeps 7 days).
//!
//! `make testbed-up`, then `cargo test -p kpipe-operator --test bed_idle_resume -- --nocapture`.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kpipe_e2e::scenario::{self, Sink, apply_pipeline, events_for, patch_pipeline_spec, pipeline_manifest};
use kpipe_e2e::testbed::{TestBed, wait_for};
use rdkafka::admin::AdminOptions;
use rdkafka::producer::FutureRecord;
use serde_json::json;

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i:08}")).collect()
}

async fn produce_ids(bed: &TestBed, topic: &str, ids: &[String]) {
    let producer = bed.producer().unwrap();
    for id in ids {
        producer
            .send(FutureRecord::to(topic).key(id.as_bytes()).payload(id.as_bytes()), Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
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

    let port = free_port();
    let log_path = format!("{}/op-{ns}.log", std::env::temp_dir().display());
    let log = std::fs::File::create(&log_path).unwrap();
    let _op = Operator(
        Command::new(env!("CARGO_BIN_EXE_kpipe-operator"))
            .env("KUBECONFIG", bed.kubeconfig())
            .env("RUST_LOG", "info,kpipe_operator=debug")
            .args(["--namespaces", &ns, "--listen", &format!("127.0.0.1:{port}"), "--log-format", "text"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );

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
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(bed.client(), &ns);
    wait_for("workers gone", Duration::from_secs(60), || async {
        let list = pods.list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=kpipe-worker")).await;
        list.ok()?.items.is_empty().then_some(())
    })
    .await
    .unwrap();
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
