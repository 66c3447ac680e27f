//! The worker binary against the test bed's Kafka broker with the HTTP processor: normal
//! delivery, poison records to the dead-letter topic, partial batch failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use kpipe_api::commit_metadata;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_every_id_is_delivered() {
    let bootstrap = bootstrap();
    let topic = unique("deliver");
    create_topic(&bootstrap, &topic, 6).await;
    let n = 5000u64;
    produce_ids(&bootstrap, &topic, 0..n, 100).await;
    let sink = HttpSink::start(SinkBehavior::default()).await;
    let cfg = config(
        &bootstrap,
        "deliver",
        &topic,
        &unique("g"),
        serde_json::json!({
            "processor": {"http": {"url": sink.url()}},
            "ordering": "key",
            "batch": {"maxRecords": 50, "maxWait": "10ms"},
            "onFailure": "block"
        }),
    );
    let w = Worker::start("deliver", &cfg);
    w.wait_ready(Duration::from_secs(30)).await;
    assert!(
        sink.wait_for(n as usize, Duration::from_secs(60)).await,
        "only {} of {n} ids delivered; log {}",
        sink.accepted_distinct(),
        w.log.display()
    );
    let accepted = accepted(&sink);
    assert!((0..n).all(|id| accepted.contains_key(&id)));
    assert_eq!(report_duplicates(&accepted), 0, "a clean run delivers each id once");
    // Commits catch up with the end of every partition.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = w.metrics().await;
        let consumed = metric(&m, "kpipe_worker_records_consumed_total").unwrap_or(0.0);
        let processed = metric(&m, "kpipe_worker_records_processed_total").unwrap_or(0.0);
        let in_flight = metric(&m, "kpipe_worker_in_flight_records").unwrap_or(-1.0);
        if consumed == n as f64 && processed == n as f64 && in_flight == 0.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "metrics did not settle: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_poison_records_go_to_the_dead_letter_topic_with_context() {
    let bootstrap = bootstrap();
    let topic = unique("poison");
    let dlq = unique("poison-dlq");
    create_topic(&bootstrap, &topic, 3).await;
    create_topic(&bootstrap, &dlq, 1).await;
    let n = 1000u64;
    produce_ids(&bootstrap, &topic, 0..n, 50).await;
    let poison: HashSet<u64> = (0..n).filter(|id| id % 100 == 7).collect();
    let sink = HttpSink::start(SinkBehavior { poison: ids(&poison), ..Default::default() }).await;
    let cfg = config(
        &bootstrap,
        "poison",
        &topic,
        &unique("g"),
        serde_json::json!({
            "processor": {"http": {"url": sink.url()}},
            "batch": {"maxRecords": 20, "maxWait": "10ms"},
            "retry": {"maxAttempts": 3, "initialBackoff": "10ms", "maxBackoff": "100ms"},
            "deadLetter": {"topic": dlq}
        }),
    );
    let w = Worker::start("poison", &cfg);
    let good = (n as usize) - poison.len();
    assert!(
        sink.wait_for(good, Duration::from_secs(60)).await,
        "only {} of {good} delivered; log {}",
        sink.accepted_distinct(),
        w.log.display()
    );
    let dead = read_topic(&bootstrap, &dlq, poison.len(), Duration::from_secs(30));
    let dead_ids: HashSet<u64> = dead.iter().map(|r| r.value.parse().unwrap()).collect();
    assert_eq!(dead_ids, poison, "exactly the poison records are dead-lettered");
    assert_eq!(dead.len(), poison.len(), "each poison record dead-lettered once");
    for r in &dead {
        let id: u64 = r.value.parse().unwrap();
        assert_eq!(r.key.as_deref(), Some(format!("key-{}", id % 50).as_bytes()), "original key kept");
        assert_eq!(r.headers["kpipe.original.topic"], topic);
        assert!(r.headers["kpipe.original.partition"].parse::<i32>().is_ok());
        assert!(r.headers["kpipe.original.offset"].parse::<i64>().is_ok());
        assert!(r.headers["kpipe.original.timestamp"].parse::<i64>().is_ok());
        assert_eq!(r.headers["kpipe.error.class"], "http_400");
        assert!(r.headers["kpipe.error.message"].contains("400"));
        assert_eq!(r.headers["kpipe.attempts"], "1", "a 400 is not retried");
        assert_eq!(r.headers["kpipe.pipeline"], "poison");
    }
    let accepted = accepted(&sink);
    assert!(poison.iter().all(|id| !accepted.contains_key(id)));
    let m = w.metrics().await;
    assert_eq!(metric(&m, "kpipe_worker_records_dead_lettered_total"), Some(poison.len() as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_partial_batch_failure_retries_only_the_named_records() {
    let bootstrap = bootstrap();
    let topic = unique("partial");
    create_topic(&bootstrap, &topic, 2).await;
    let n = 600u64;
    produce_ids(&bootstrap, &topic, 0..n, 30).await;
    let flaky: HashSet<u64> = (0..n).filter(|id| id % 10 == 3).collect();
    let sink = HttpSink::start(SinkBehavior { fail_once: ids(&flaky), ..Default::default() }).await;
    let cfg = config(
        &bootstrap,
        "partial",
        &topic,
        &unique("g"),
        serde_json::json!({
            "processor": {"http": {"url": sink.url()}},
            "ordering": "unordered",
            "batch": {"maxRecords": 25, "maxWait": "20ms"},
            "retry": {"maxAttempts": 5, "initialBackoff": "10ms", "maxBackoff": "50ms"},
            "onFailure": "block"
        }),
    );
    let w = Worker::start("partial", &cfg);
    assert!(
        sink.wait_for(n as usize, Duration::from_secs(60)).await,
        "only {} of {n}; log {}",
        sink.accepted_distinct(),
        w.log.display()
    );
    let requests: Vec<Vec<u64>> =
        sink.requests().into_iter().map(|r| r.ids.iter().map(|id| id.parse().unwrap()).collect()).collect();
    let mut sent: std::collections::HashMap<u64, u32> = Default::default();
    for req in &requests {
        for id in req {
            *sent.entry(*id).or_default() += 1;
        }
    }
    for id in 0..n {
        let expected = if flaky.contains(&id) { 2 } else { 1 };
        assert_eq!(sent.get(&id).copied(), Some(expected), "id {id} sent {:?} times", sent.get(&id));
    }
    // Retry requests carry only named records.
    let retry_requests = requests.iter().filter(|r| r.iter().all(|id| flaky.contains(id))).count();
    assert!(retry_requests > 0);
    assert_eq!(report_duplicates(&accepted(&sink)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_block_policy_stalls_visibly_then_recovers() {
    let bootstrap = bootstrap();
    let topic = unique("block");
    create_topic(&bootstrap, &topic, 1).await;
    let n = 200u64;
    produce_ids(&bootstrap, &topic, 0..n, 10).await;
    let sink = HttpSink::start(SinkBehavior { poison: ids([50]), ..Default::default() }).await;
    let group = unique("g");
    let cfg = config(
        &bootstrap,
        "block",
        &topic,
        &group,
        serde_json::json!({
            "processor": {"http": {"url": sink.url()}},
            "ordering": "key",
            "batch": {"maxRecords": 10, "maxWait": "10ms"},
            "retry": {"maxAttempts": 2, "initialBackoff": "10ms", "maxBackoff": "200ms"},
            "onFailure": "block"
        }),
    );
    let w = Worker::start("block", &cfg);
    // Records of other keys get through; id 50 (key-0) is stuck, and with `key` ordering so are
    // the later key-0 records (60, 70, ..., 190): 15 in all.
    assert!(sink.wait_for(n as usize - 15, Duration::from_secs(60)).await, "log {}", w.log.display());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = accepted(&sink);
    for id in (50..n).step_by(10) {
        assert!(!accepted.contains_key(&id), "id {id} overtook the blocked record of its key");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = w.metrics().await;
        let ready = reqwest::get(format!("http://{}/readyz", w.listen)).await.unwrap();
        let status = ready.status();
        let detail = ready.text().await.unwrap();
        let blocked = metric(&m, "kpipe_worker_blocked_records").unwrap_or(0.0);
        let committed = metric(&m, "kpipe_worker_committed_offset").unwrap_or(-1.0);
        if blocked == 1.0 && detail.contains(&format!("blocked: {topic}/0@50")) && committed == 50.0 {
            assert!(status.is_success(), "a blocked record does not make the worker unready");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "block not visible: blocked={blocked} committed={committed} (expected the commit to stop at 50) readyz={detail}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The operator learns of the retry from the commit metadata: the worker re-commits offset 50 with a fresh report
    // on every commit interval.
    let report = |at_least_ms: u64| {
        let (offset, metadata) = committed_with_metadata(&bootstrap, &group, &topic);
        (offset, commit_metadata::decode(&metadata).filter(|r| r.at_ms >= at_least_ms))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let (Some(50), Some(r)) = report(0) {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "no retry report in the commit metadata: {:?}", report(0));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(first.offset == 50 && first.blocked && first.attempts >= 2, "{first:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while report(first.at_ms + 1).1.is_none() {
        assert!(std::time::Instant::now() < deadline, "the retry report is not refreshed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The handler is fixed: the record goes through and the commit reaches the end.
    sink.update(|b| b.poison.clear());
    assert!(sink.wait_for(n as usize, Duration::from_secs(20)).await, "log {}", w.log.display());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = w.metrics().await;
        if metric(&m, "kpipe_worker_blocked_records") == Some(0.0)
            && metric(&m, "kpipe_worker_committed_offset") == Some(n as f64)
        {
            assert_eq!(committed_with_metadata(&bootstrap, &group, &topic), (Some(n as i64), String::new()));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "did not recover:\n{m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The group's committed offset of partition 0 and its metadata, as an outsider (the operator) reads them.
fn committed_with_metadata(bootstrap: &str, group: &str, topic: &str) -> (Option<i64>, String) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", group).create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = c.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
    let e = got.elements_for_topic(topic).into_iter().next().unwrap();
    let offset = match e.offset() {
        rdkafka::Offset::Offset(o) => Some(o),
        _ => None,
    };
    (offset, e.metadata().to_string())
}
