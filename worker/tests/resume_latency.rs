//! A worker whose partitions backpressure paused fetches again as soon as it resumes them.
//!
//! librdkafka does not wake the broker thread when a partition is resumed; with every partition of that broker paused
//! the thread sleeps up to 1 s before it fetches again (`kpipe_worker::consumer` wakes it: `consumer/waker.rs`). A
//! worker that pauses all its partitions again and again (a downstream slower than the fetches) then idled up to a
//! second after every resume. Here: one partition (so every pause pauses everything), 2 KiB records (the overflow
//! reaches its 2 MiB bound after about a thousand), the default concurrency and an HTTP sink that answers at once.
//! Without the wake-up the sink saw a gap of more than 300 ms after most resumes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

const RECORDS: u64 = 30_000;
const VALUE_BYTES: usize = 2048;

/// Gaps between consecutive answered requests longer than this count as the worker idling.
const IDLE_GAP: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_paused_for_backpressure_is_fetched_again_at_once_after_its_resume() {
    let bootstrap = bootstrap();
    let topic = unique("resume-latency");
    create_topic(&bootstrap, &topic, 1).await;
    produce_padded_ids(&bootstrap, &topic, 0..RECORDS, 100, VALUE_BYTES).await;
    let sink = HttpSink::start(SinkBehavior::default()).await;
    let cfg = config(
        &bootstrap,
        "resume-latency",
        &topic,
        &unique("resume-latency"),
        serde_json::json!({"processor": {"http": {"url": sink.url()}}}),
    );
    let w = Worker::start("resume-latency", &cfg);
    let deadline = Instant::now() + Duration::from_secs(180);
    while sink.accepted_distinct() < RECORDS as usize {
        assert!(
            Instant::now() < deadline,
            "{} of {RECORDS} records delivered in 180 s; log {}",
            sink.accepted_distinct(),
            w.log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = w.metrics().await;
    let pauses = metric(&metrics, "kpipe_worker_partition_pauses_total").unwrap_or(0.0);
    let mut answered: Vec<Instant> = sink.requests().iter().map(|r| r.at).collect();
    answered.sort();
    let gaps: Vec<u128> = answered
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .filter(|g| *g > IDLE_GAP)
        .map(|g| g.as_millis())
        .collect();
    let took = answered.last().unwrap().duration_since(answered[0]);
    println!("{RECORDS} records in {took:?}, {pauses} pauses, gaps over {IDLE_GAP:?}: {gaps:?} (ms)");
    // The scenario must pause the partition repeatedly, or it tests nothing.
    assert!(pauses >= 5.0, "only {pauses} pauses: the scenario did not saturate the worker");
    assert!(
        gaps.len() <= 1,
        "the worker idled after resumes: {} gaps over {IDLE_GAP:?} ({gaps:?} ms) in {pauses} pauses; log {}",
        gaps.len(),
        w.log.display()
    );
}
