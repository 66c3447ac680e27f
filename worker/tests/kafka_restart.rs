//! Crash and graceful-stop behaviour of the worker binary against the test bed's Kafka broker:
//! kill -9 mid-batch loses nothing and re-delivers at most `concurrency.uncommittedPerPartition` per partition;
//! SIGTERM finishes in-flight batches, commits, and a restart re-delivers nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

const UNCOMMITTED_PER_PARTITION: u64 = 60;

fn slow_pipeline(bootstrap: &str, name: &str, topic: &str, group: &str, sink: &HttpSink) -> serde_json::Value {
    config(
        bootstrap,
        name,
        topic,
        group,
        serde_json::json!({
            "processor": {"http": {"url": sink.url()}},
            "ordering": "key",
            "batch": {"maxRecords": 20, "maxWait": "10ms"},
            "concurrency": {"perPartition": 40, "perWorker": 80, "uncommittedPerPartition": UNCOMMITTED_PER_PARTITION},
            "onFailure": "block"
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_kill_9_mid_batch_then_restart_loses_nothing() {
    let bootstrap = bootstrap();
    let topic = unique("kill9");
    let group = unique("g");
    create_topic(&bootstrap, &topic, 4).await;
    let n = 3000u64;
    produce_ids(&bootstrap, &topic, 0..n, 64).await;
    let sink = HttpSink::start(SinkBehavior { delay: Duration::from_millis(40), ..Default::default() }).await;
    let cfg = slow_pipeline(&bootstrap, "kill9", &topic, &group, &sink);
    // No periodic commit during the test: only the early commits the uncommitted bound asks for.
    let mut first = Worker::start_with_env("kill9-a", &cfg, &[("KPIPE_COMMIT_INTERVAL", "1h")]);
    assert!(
        sink.wait_for(800, Duration::from_secs(60)).await,
        "first worker made no progress; log {}",
        first.log.display()
    );
    first.signal(9);
    assert_eq!(first.wait_exit(Duration::from_secs(10)).await, None, "killed by SIGKILL");
    let before = sink.accepted_distinct();
    assert!(before < n as usize, "the kill happened mid-stream");
    let second = Worker::start_with_env("kill9-b", &cfg, &[("KPIPE_COMMIT_INTERVAL", "1h")]);
    assert!(
        sink.wait_for(n as usize, Duration::from_secs(90)).await,
        "after restart only {} of {n} ids; log {}",
        sink.accepted_distinct(),
        second.log.display()
    );
    let accepted = accepted(&sink);
    let missing: Vec<u64> = (0..n).filter(|id| !accepted.contains_key(id)).collect();
    assert!(missing.is_empty(), "missing ids: {missing:?}");
    let dups = report_duplicates(&accepted);
    let bound = 4 * UNCOMMITTED_PER_PARTITION as usize;
    eprintln!(
        "kill -9 after {before} ids: {dups} duplicate deliveries (bound: 4 partitions × {UNCOMMITTED_PER_PARTITION})"
    );
    assert!(dups <= bound, "{dups} duplicates exceed 4 partitions × uncommittedPerPartition = {bound}");
    let waits = metric(&second.metrics().await, "kpipe_worker_commit_waits_total").unwrap_or(0.0);
    eprintln!("second worker: {waits} waits at the uncommitted bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_sigterm_then_restart_has_zero_duplicates() {
    sigterm_then_restart("classic").await;
}

/// The final commit at shutdown with the consumer group protocol (KIP-848): leaving the group revokes every
/// partition after the drain, and the restart re-delivers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_consumer_protocol_sigterm_then_restart_has_zero_duplicates() {
    sigterm_then_restart("consumer").await;
}

async fn sigterm_then_restart(protocol: &str) {
    let bootstrap = bootstrap();
    let topic = unique(&format!("sigterm-{protocol}"));
    let group = unique("g");
    create_topic(&bootstrap, &topic, 4).await;
    let n = 3000u64;
    produce_ids(&bootstrap, &topic, 0..n, 64).await;
    let sink = HttpSink::start(SinkBehavior { delay: Duration::from_millis(40), ..Default::default() }).await;
    let cfg = with_group_protocol(slow_pipeline(&bootstrap, "sigterm", &topic, &group, &sink), protocol);
    let mut first = Worker::start(&format!("sigterm-{protocol}-a"), &cfg);
    assert!(
        sink.wait_for(800, Duration::from_secs(60)).await,
        "first worker made no progress; log {}",
        first.log.display()
    );
    first.signal(15);
    assert_eq!(first.wait_exit(Duration::from_secs(30)).await, Some(0), "graceful exit; log {}", first.log.display());
    let before = sink.accepted_distinct();
    assert!(before < n as usize, "the stop happened mid-stream");
    let second = Worker::start(&format!("sigterm-{protocol}-b"), &cfg);
    assert!(
        sink.wait_for(n as usize, Duration::from_secs(90)).await,
        "after restart only {} of {n} ids; log {}",
        sink.accepted_distinct(),
        second.log.display()
    );
    let accepted = accepted(&sink);
    assert!((0..n).all(|id| accepted.contains_key(&id)));
    let dups: Vec<(u64, u32)> = accepted.iter().filter(|(_, c)| **c > 1).map(|(i, c)| (*i, *c)).collect();
    assert!(
        dups.is_empty(),
        "graceful stop must not re-deliver: {} duplicated ids, e.g. {:?}",
        dups.len(),
        &dups[..dups.len().min(10)]
    );
}
