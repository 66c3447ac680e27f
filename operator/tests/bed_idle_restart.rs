#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The idle-offsets record survives an operator restart (issue 20): a pipeline at zero replicas by
//! scale-to-zero (`minReplicas: 0`, `startOffset: earliest`) delivers 50 ids; the operator records the
//! group's committed offsets in `status.topics[].committedOffsets` and is then stopped. With no operator
//! running, the broker's offset retention (a private broker with `offsets.retention.minutes=1`) deletes
//! the empty group's offsets. A new operator process loads the record from status, restores the offsets
//! (Warning Event `OffsetsRestored`), and 10 new ids wake the pipeline: the sink holds exactly the 60 ids,
//! each once (an operator that kept the record only in memory would start the worker from `earliest` and
//! deliver the first 50 again).
//!
//! Uses the bed's apiserver and applies this tree's CRD: run under the bed lock,
//! `flock /work/bed.lock cargo test -p kpipe-operator --test bed_idle_restart -- --nocapture`.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kpipe_e2e::scenario::{self, apply_pipeline, events_for, pipeline_manifest, pipeline_status, worker_replicas};
use kpipe_e2e::testbed::{TestBed, wait_for};
use kpipe_operator::group_offsets::GroupOffsets;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

struct Process(Child);

impl Drop for Process {
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

async fn produce(producer: &FutureProducer, topic: &str, ids: &[String]) {
    for id in ids {
        producer
            .send(FutureRecord::to(topic).key(id.as_bytes()).payload(id.as_bytes()), Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
}

fn start_operator(bed: &TestBed, ns: &str, run: &str) -> Process {
    let log = std::fs::File::create(format!("{}/op-{ns}-{run}.log", std::env::temp_dir().display())).unwrap();
    Process(
        Command::new(
            std::env::var("KPIPE_TEST_OPERATOR_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kpipe-operator").into()),
        )
        .env("KUBECONFIG", bed.kubeconfig())
        .env("RUST_LOG", "info,kpipe_operator=debug")
        .args(["--namespaces", ns, "--listen", &format!("127.0.0.1:{}", free_port()), "--log-format", "text"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap(),
    )
}

async fn wait_ids(bed: &TestBed, ns: &str, sink: &scenario::Sink, expected: &[String]) {
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
async fn the_idle_offsets_record_survives_an_operator_restart() {
    let bed = TestBed::connect().await.unwrap();
    // `status.topics` must be in the bed's CRD, or the apiserver prunes it.
    scenario::install_crd(&bed).unwrap();
    let host = bed.var("KPIPE_BRIDGE_IP").unwrap_or("127.0.0.1").to_string();
    let dir = std::env::temp_dir().join(format!("kpipe-idle-restart-kafka-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (port, cport) = (free_port(), free_port());
    let _broker = Process(
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/short-retention-kafka.sh"))
            .args([dir.to_str().unwrap(), &port.to_string(), &cport.to_string(), &host])
            .env("KAFKA_HOME", bed.var("KAFKA_HOME").expect("KAFKA_HOME in the bed env"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let bootstrap = format!("{host}:{port}");
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &bootstrap);
    let admin: AdminClient<DefaultClientContext> = config.create().unwrap();
    let ns_guard = bed.temp_namespace("idle-restart").await.unwrap();
    let ns = ns_guard.name().to_string();
    let topic = format!("{ns}-in");
    wait_for("private broker up", Duration::from_secs(120), || async {
        let r = admin.create_topics(&[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))], &AdminOptions::new());
        let r = r.await.ok()?;
        r.iter()
            .all(|x| x.is_ok() || matches!(x, Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists))))
            .then_some(())
    })
    .await
    .unwrap();
    let producer: FutureProducer = config.create().unwrap();
    let sink = scenario::deploy_sink(&bed, &ns, "sink", &[]).await.unwrap();
    let first_op = start_operator(&bed, &ns, "1");

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
    produce(&producer, &topic, &first).await;
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

    let _second_op = start_operator(&bed, &ns, "2");
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
    produce(&producer, &topic, &second).await;
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
}
