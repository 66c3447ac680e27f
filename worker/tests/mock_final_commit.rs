//! The final commit of a stopping worker, against librdkafka's mock cluster: the one case a real broker gives only
//! by chance (the e2e scale-down saw it once: a pod stopped while a new one joined, and the coordinator refused
//! the final commit with `REBALANCE_IN_PROGRESS`). The mock refuses exactly that commit, every time. A real
//! worker process connects to the mock's brokers over TCP. `kafka_rebalance.rs` and the e2e suite cover the same
//! ground on the real broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const PARTITIONS: i32 = 3;

/// The group's committed offset of each partition (None where nothing is committed).
fn committed(bootstrap: &str, group: &str, topic: &str) -> Vec<Option<i64>> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let got = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    (0..PARTITIONS)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn mock_a_refused_final_commit_is_retried_before_the_worker_leaves() {
    let mock = MockCluster::new(1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let topic = unique("refused");
    let group = unique("g");
    mock.create_topic(&topic, PARTITIONS, 1).unwrap();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    let n = 300;
    for i in 0..n {
        let key = format!("k{}", i % 30);
        let value = i.to_string();
        producer.send(FutureRecord::to(&topic).key(&key).payload(&value), Duration::from_secs(10)).await.unwrap();
    }
    let ends: Vec<i64> = (0..PARTITIONS)
        .map(|p| producer.client().fetch_watermarks(&topic, p, Duration::from_secs(10)).unwrap().1)
        .collect();
    assert_eq!(ends.iter().sum::<i64>(), n);

    let cfg = config(&bootstrap, "refused", &topic, &group, serde_json::json!({"processor": {"noop": {}}}));
    // No periodic commit: the final commit is the only one, so a lost one leaves nothing committed.
    let mut worker = Worker::start_with_env("mock-refused", &cfg, &[("KPIPE_COMMIT_INTERVAL", "1h")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let processed = metric(&worker.metrics().await, "kpipe_worker_records_processed_total").unwrap_or(0.0);
        if processed >= n as f64 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "worker processed {processed}; log {}", worker.log.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(committed(&bootstrap, &group, &topic), vec![None; PARTITIONS as usize], "nothing committed yet");

    // The next OffsetCommit, the shutdown's final commit, is refused as it is during a rebalance.
    mock.request_errors(RDKafkaApiKey::OffsetCommit, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS]);
    worker.signal(15);
    assert_eq!(worker.wait_exit(Duration::from_secs(40)).await, Some(0), "log {}", worker.log.display());
    let log = std::fs::read_to_string(&worker.log).unwrap();
    assert!(log.contains("commit failed"), "the injected refusal never reached the worker; log:\n{log}");
    assert_eq!(
        committed(&bootstrap, &group, &topic),
        ends.iter().map(|e| Some(*e)).collect::<Vec<_>>(),
        "the final offsets must be committed after the refusal; log:\n{log}"
    );
}
