//! A second worker joining and leaving the group (cooperative rebalances) loses no id.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_second_worker_joining_and_leaving_loses_nothing() {
    let bootstrap = bootstrap();
    let topic = unique("rebalance");
    let group = unique("g");
    create_topic(&bootstrap, &topic, 6).await;
    let n = 6000u64;
    produce_ids(&bootstrap, &topic, 0..n, 128).await;
    let sink = HttpSink::start(SinkBehavior { delay: Duration::from_millis(30), ..Default::default() }).await;
    let cfg = config(
        &bootstrap,
        "rebalance",
        &topic,
        &group,
        serde_json::json!({
            "processor": {"http": {"url": sink.url()}},
            "ordering": "key",
            "batch": {"maxRecords": 10, "maxWait": "10ms"},
            "concurrency": {"perPartition": 20, "perWorker": 60},
            "onFailure": "block"
        }),
    );
    let a = Worker::start("rebalance-a", &cfg);
    assert!(sink.wait_for(1000, Duration::from_secs(60)).await, "no progress; log {}", a.log.display());
    let mut b = Worker::start("rebalance-b", &cfg);
    // Wait until b owns partitions and processed some records.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = b.metrics().await;
        if metric(&m, "kpipe_worker_records_processed_total").unwrap_or(0.0) > 200.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "second worker got no work; log {}", b.log.display());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let a_metrics = a.metrics().await;
    assert!(
        metric(&a_metrics, "kpipe_worker_rebalances_total{kind=\"revoke\"}").unwrap_or(0.0) >= 1.0,
        "a gave partitions away:\n{a_metrics}"
    );
    b.signal(15);
    assert_eq!(b.wait_exit(Duration::from_secs(30)).await, Some(0), "b leaves gracefully; log {}", b.log.display());
    assert!(
        sink.wait_for(n as usize, Duration::from_secs(120)).await,
        "only {} of {n} ids; logs {} {}",
        sink.accepted_distinct(),
        a.log.display(),
        b.log.display()
    );
    let accepted = accepted(&sink);
    assert!((0..n).all(|id| accepted.contains_key(&id)));
    eprintln!("rebalance: {} duplicate deliveries", report_duplicates(&accepted));
}
