//! A worker whose partitions backpressure paused fetches again as soon as it resumes them.
//!
//! Two ways a resumed partition used to wait with records ready on the broker:
//! - librdkafka does not wake the broker thread when a partition is resumed; with every partition of that broker paused
//!   the thread sleeps up to 1 s before it fetches again (`kpipe_worker::consumer` wakes it: `consumer/waker.rs`);
//! - with other partitions of that broker still fetching and at the end of their logs, the broker thread has a fetch
//!   in flight for them that the broker holds until `fetch.wait.max.ms` (librdkafka's default 500 ms) for lack of new
//!   records, and librdkafka sends no second fetch to a broker before that one returns. The worker's default is 100 ms
//!   (`kpipe_worker::kafka_config::CONSUMER_TUNING`).
//!
//! A worker that pauses its backlog's partition again and again idled after every resume: the first test (2 KiB
//! records on one partition of two, an HTTP sink that answers at once) saw a gap of more than 300 ms after most
//! resumes without the wake-up. A noop processor behind fetches larger than a partition may buffer (an empty second
//! partition) stalled for 460-510 ms after each of its 14 pauses with librdkafka's 500 ms long-poll; since the
//! consumer holds instead of pausing a partition whose task keeps up (`kpipe_worker::consumer::backpressure`), the
//! second test asserts that such a drain neither pauses nor stalls.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const RECORDS: u64 = 45_000;
const VALUE_BYTES: usize = 2048;

/// Gaps between consecutive answered requests longer than this count as the worker idling.
const IDLE_GAP: Duration = Duration::from_millis(300);

/// Every partition of the broker paused: its thread sleeps until woken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_paused_for_backpressure_is_fetched_again_at_once_after_its_resume() {
    let name = "resume-latency";
    let bootstrap = bootstrap();
    let topic = unique(name);
    // Records on partition 0 only: partition 1 is at its end, so the broker holds each fetch for it for
    // `fetch.wait.max.ms`, and a resumed partition 0 waits for that fetch to return.
    create_topic(&bootstrap, &topic, 2).await;
    produce_padded_ids_to(&bootstrap, &topic, Some(0), 0..RECORDS, 100, VALUE_BYTES).await;
    let sink = HttpSink::start(SinkBehavior::default()).await;
    let cfg = config(
        &bootstrap,
        name,
        &topic,
        &unique(name),
        serde_json::json!({"processor": {"http": {"url": sink.url()}}}),
    );
    let w = Worker::start(name, &cfg);
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

/// What a noop worker's drain of a topic did: partition pauses, and the stalls (over [`IDLE_GAP`] without a processed
/// record) while records waited, in milliseconds.
struct Drain {
    pauses: f64,
    /// `kpipe_worker_consumer_holds_total` and `kpipe_worker_consumer_held_seconds_total` at the end.
    holds: f64,
    held_seconds: f64,
    stalls: Vec<u128>,
    log: std::path::PathBuf,
}

/// Produces `records` highly compressible records of `value_bytes` (the id padded with `x`; lz4, large batches) to
/// partition 0 of a new 2-partition topic and drains it with a noop worker, sampling
/// `kpipe_worker_records_processed_total` every 10 ms.
async fn drain_compressible(name: &str, records: u64, value_bytes: usize) -> Drain {
    let bootstrap = bootstrap();
    let topic = unique(name);
    create_topic(&bootstrap, &topic, 2).await;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .create()
        .unwrap();
    let mut value = vec![b'x'; value_bytes];
    for id in 0..records {
        let digits = id.to_string();
        value[..digits.len()].copy_from_slice(digits.as_bytes());
        while producer.send(BaseRecord::<(), [u8]>::to(&topic).partition(0).payload(&value[..])).is_err() {
            producer.poll(Duration::from_millis(10));
        }
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    let cfg = config(&bootstrap, name, &topic, &unique(name), serde_json::json!({"processor": {"noop": {}}}));
    let w = Worker::start(name, &cfg);
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut last_progress, mut last_count) = (None::<Instant>, 0.0);
    let mut stalls: Vec<u128> = Vec::new();
    loop {
        let processed = metric(&w.metrics().await, "kpipe_worker_records_processed_total").unwrap_or(0.0);
        let now = Instant::now();
        if processed > last_count {
            if let Some(at) = last_progress {
                let stalled = now.duration_since(at);
                if stalled > IDLE_GAP {
                    stalls.push(stalled.as_millis());
                }
            }
            (last_progress, last_count) = (Some(now), processed);
        }
        if processed >= records as f64 {
            break;
        }
        assert!(now < deadline, "{processed} of {records} records processed in 120 s; log {}", w.log.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = w.metrics().await;
    let pauses = metric(&metrics, "kpipe_worker_partition_pauses_total").unwrap_or(0.0);
    let holds = metric(&metrics, "kpipe_worker_consumer_holds_total").unwrap_or(0.0);
    let held_seconds = metric(&metrics, "kpipe_worker_consumer_held_seconds_total").unwrap_or(0.0);
    println!(
        "{name}: {records} records of {value_bytes} B, {pauses} pauses, {holds} holds ({held_seconds:.3} s held), \
         stalls over {IDLE_GAP:?}: {stalls:?} (ms)"
    );
    Drain { pauses, holds, held_seconds, stalls, log: w.log.clone() }
}

/// A fast processor (noop) behind fetch responses larger than a partition may buffer: with highly compressible
/// records one fetch of `max.partition.fetch.bytes` (256 KiB compressed) decompresses to tens of MiB, more than a
/// partition's overflow or the worker's buffer budget may hold. Pausing the partition there drops librdkafka's
/// prefetch, which is fetched and decompressed again; the consumer holds instead until the task has taken the
/// overflow, and pauses only a task that does not take it within `HOLD_MAX` (20 ms). Records of 64 KiB, so that even
/// the unoptimised test build of the worker takes an overflow in time. Measured on this drain: 62 pauses in every run
/// when every full overflow paused; with the hold 1-5 on a quiet machine and 20-22 with two busy loops competing for
/// the two cores (a hold times out when the task gets no CPU), hence the bound of half the old count. Partition 1 is
/// empty, so a fetch for it alone is in flight whenever partition 0 waits. The drain must never stall either: no 300
/// ms without a processed record while records wait on the broker (with librdkafka's 500 ms `fetch.wait.max.ms` a
/// resumed partition waited for that fetch: 10 stalls of 436-542 ms in 10 pauses).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fast_processor_behind_large_fetches_holds_instead_of_pausing_and_never_stalls() {
    let drain = drain_compressible("resume-fast", 16_000, 64 << 10).await;
    // The holds are what this scenario is about, and they are visible: counted, and timed while they last. A hold
    // ends when the task has taken the overflow or after 20 ms with a pause; 100 ms each on average leaves room for
    // a loaded machine's scheduling, not for a hold that is never timed out.
    assert!(drain.holds >= 1.0, "no hold counted: the scenario did not fill an overflow; log {}", drain.log.display());
    assert!(
        drain.held_seconds > 0.0 && drain.held_seconds <= drain.holds * 0.1,
        "{} s held in {} holds; log {}",
        drain.held_seconds,
        drain.holds,
        drain.log.display()
    );
    assert!(
        drain.pauses <= 31.0,
        "a noop partition was paused {} times: a full overflow of a task that keeps up must hold, not pause; log {}",
        drain.pauses,
        drain.log.display()
    );
    assert!(
        drain.stalls.is_empty(),
        "the drain stalled {} times for over {IDLE_GAP:?} ({:?} ms) in {} pauses; log {}",
        drain.stalls.len(),
        drain.stalls,
        drain.pauses,
        drain.log.display()
    );
}
