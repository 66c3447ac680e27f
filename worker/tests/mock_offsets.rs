//! Start offsets against librdkafka's mock cluster (issue 13): a committed offset beyond the log end — what a topic
//! deleted and recreated leaves when the group's old offset survives — resets to the earliest retained record, not
//! to the end, even under `startOffset: latest`; the reset is counted; the group ends at the new log end. A real
//! worker process connects to the mock's brokers over TCP. `e2e/tests/lifecycle.rs` covers the same rule on the real
//! broker (with topic deletion, added partitions and retention, which the mock cannot do).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn committed(bootstrap: &str, group: &str, topic: &str) -> Option<i64> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    match got.find_partition(topic, 0).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => Some(o),
        _ => None,
    }
}

#[tokio::test]
async fn mock_a_commit_beyond_the_log_end_resets_to_the_earliest_record_even_under_latest() {
    let mock = MockCluster::new(1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let topic = unique("beyond-end");
    let group = unique("g");
    mock.create_topic(&topic, 1, 1).unwrap();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    let n = 100u64;
    for i in 0..n {
        let value = i.to_string();
        producer
            .send(FutureRecord::to(&topic).key("k").payload(&value).partition(0), Duration::from_secs(10))
            .await
            .unwrap();
    }
    // The group's offset of an older, longer incarnation of the topic.
    let old: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", &bootstrap).set("group.id", &group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(1000)).unwrap();
    old.commit(&tpl, CommitMode::Sync).unwrap();
    drop(old);
    assert_eq!(committed(&bootstrap, &group, &topic), Some(1000));

    let sink = HttpSink::start(SinkBehavior::default()).await;
    let cfg = config(
        &bootstrap,
        "beyond-end",
        &topic,
        &group,
        serde_json::json!({"processor": {"http": {"url": sink.url()}}, "source": {
            "bootstrapServers": [bootstrap], "topics": [topic], "startOffset": "latest",
            "config": {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}}}),
    );
    let mut worker = Worker::start("mock-beyond-end", &cfg);
    assert!(
        sink.wait_for(n as usize, Duration::from_secs(60)).await,
        "delivered {}; log {}",
        sink.accepted_distinct(),
        worker.log.display()
    );
    let accepted = accepted(&sink);
    assert!((0..n).all(|id| accepted.contains_key(&id)), "every record of the new log is delivered");
    let metrics = worker.metrics().await;
    assert_eq!(metric(&metrics, "kpipe_worker_offset_resets_total{reason=\"above_log_end\"}"), Some(1.0), "{metrics}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while committed(&bootstrap, &group, &topic) != Some(n as i64) {
        assert!(std::time::Instant::now() < deadline, "committed {:?}", committed(&bootstrap, &group, &topic));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.signal(15);
    assert_eq!(worker.wait_exit(Duration::from_secs(30)).await, Some(0), "log {}", worker.log.display());
    assert_eq!(committed(&bootstrap, &group, &topic), Some(n as i64), "never beyond the log end");
}
