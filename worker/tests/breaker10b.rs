//! Breaker tests for the per-call producer (forwarder, dead-letter writer), against the test bed's real Kafka broker
//! and the real `kpipe-worker` binary. Topics are named `brk10b-*` and deleted at the end of each test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap()
}

async fn create_topic_with_limit(bootstrap: &str, name: &str, partitions: i32, max_message_bytes: u64) {
    let limit = max_message_bytes.to_string();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1)).set("max.message.bytes", &limit);
    for r in admin(bootstrap).create_topics(&[topic], &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn delete_topics(bootstrap: &str, names: &[&str]) {
    let _ = admin(bootstrap).delete_topics(names, &AdminOptions::new()).await;
}

/// The group's committed offset of partition 0 of `topic`.
fn committed(bootstrap: &str, group: &str, topic: &str) -> Option<i64> {
    let c: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).ok()?;
    match got.elements().first()?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// The forwarder to an output topic whose `max.message.bytes` (20,000) holds each record (4,000 B) but not a
/// producer batch of them: librdkafka batches the records of one call up to its own `message.max.bytes` (1 MB), the
/// broker refuses the batch as too large, and the forwarder retries the records ("the record alone fits"). A user
/// expects every record in the output topic, in order (one key), none in the dead-letter topic, the offset committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_that_each_fit_the_output_topic_are_forwarded_in_order_even_when_batched_beyond_its_limit() {
    forward_within_a_small_limit(false).await;
}

/// Like [`records_that_each_fit_the_output_topic_are_forwarded_in_order_even_when_batched_beyond_its_limit`], with
/// the output topic's limit lowered (1,000,000 -> 20,000) after the worker started: the producer's `batch.size` was
/// capped at startup by the limit then.
///
/// Failed before `KafkaProducer::fit_batches_to` (observed): 40 records of one key, 4,000 B each, limit lowered
/// before records 1..40 arrive: after 30 s only ids [0, 1, 31, 32] reached the output topic, 124 retries, 242 `topic
/// limits` re-reads (one DescribeConfigs per refused record), the circuit breaker opened ("processor unavailable")
/// and the partition stayed stuck at offset 2 for good: every retry batched the records beyond the new limit again.
/// Now the producer is replaced by one whose batches fit, and the limit is read once per batch. The first batch
/// after the change can still be refused in part (the broker takes the message sets that fit), so the records
/// retried after it may follow later records of their key: this case asserts every record exactly once, not the
/// order (docs/api.md, "Records the output topic refuses").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_that_fit_an_output_topic_limit_lowered_at_runtime_are_forwarded() {
    forward_within_a_small_limit(true).await;
}

async fn forward_within_a_small_limit(lower_after_start: bool) {
    let bootstrap = bootstrap();
    let topic = unique("brk10b-fwdlim-in");
    let out = unique("brk10b-fwdlim-out");
    let dlq = unique("brk10b-fwdlim-dlq");
    create_topic_with_limit(&bootstrap, &topic, 1, 1_000_000).await;
    create_topic_with_limit(&bootstrap, &out, 1, if lower_after_start { 1_000_000 } else { 20_000 }).await;
    create_topic_with_limit(&bootstrap, &dlq, 1, 1_000_000).await;
    let n = 40u64;
    let group = unique("brk10b-g");
    let cfg = config(
        &bootstrap,
        "brk10b-fwdlim",
        &topic,
        &group,
        serde_json::json!({
            "processor": {"kafka": {"topic": out}},
            "onFailure": "deadLetter",
            "deadLetter": {"topic": dlq}
        }),
    );
    let mut w = Worker::start("brk10b-fwdlim", &cfg);
    w.wait_ready(Duration::from_secs(30)).await;
    if lower_after_start {
        // Forward one record first so the worker has read the old limit.
        produce_padded_ids(&bootstrap, &topic, 0..1, 1, 4_000).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let alter = AlterConfig::new(ResourceSpecifier::Topic(&out)).set("max.message.bytes", "20000");
        for r in admin(&bootstrap).alter_configs(&[alter], &AdminOptions::new()).await.unwrap() {
            r.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        produce_padded_ids(&bootstrap, &topic, 1..n, 1, 4_000).await;
    } else {
        produce_padded_ids(&bootstrap, &topic, 0..n, 1, 4_000).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while committed(&bootstrap, &group, &topic) != Some(n as i64) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let m = w.metrics().await;
    let at_end = committed(&bootstrap, &group, &topic);
    let forwarded: Vec<u64> = read_topic(&bootstrap, &out, n as usize, Duration::from_secs(5))
        .iter()
        .map(|r| first_line(&r.value).parse().unwrap())
        .collect();
    let dead = read_topic(&bootstrap, &dlq, n as usize, Duration::from_secs(2));
    w.signal(15);
    let _ = w.wait_exit(Duration::from_secs(20)).await;
    delete_topics(&bootstrap, &[&topic, &out, &dlq]).await;
    eprintln!(
        "committed {at_end:?}; forwarded {} records {:?}; dead-lettered {}; retried {:?}, too large {:?}",
        forwarded.len(),
        forwarded,
        dead.len(),
        metric(&m, "kpipe_worker_records_retried_total"),
        metric(&m, "kpipe_worker_records_too_large_total"),
    );
    assert_eq!(at_end, Some(n as i64), "the partition did not commit to the end; log {}", w.log.display());
    assert_eq!(dead.len(), 0, "records that fit the output topic were dead-lettered; log {}", w.log.display());
    if lower_after_start {
        let mut sorted = forwarded.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "every record forwarded exactly once");
    } else {
        assert_eq!(forwarded, (0..n).collect::<Vec<_>>(), "every record forwarded once, in key order");
    }
}

/// A topic name the broker cannot create (auto-creation on): `<base>.x` collides with the existing `<base>_x`
/// (Kafka refuses names that differ only in '.' and '_'). Returns (the name to write to, the colliding topic).
async fn uncreatable_topic(bootstrap: &str, base: &str) -> (String, String) {
    let existing = format!("{base}_x");
    create_topic(bootstrap, &existing, 1).await;
    (format!("{base}.x"), existing)
}

/// SIGTERM while every produce of the forwarder (`dead_letter` false) or of the dead-letter writer (true) goes to a
/// topic that does not exist and cannot be created (librdkafka holds such records until the topic appears, up to
/// `topic.metadata.propagation.max.ms`, or fails them): the worker exits within its shutdown timeout (10 s here) plus the producer's
/// 5 s flush, and commits nothing that was not written.
async fn sigterm_while_produces_hang(dead_letter: bool) {
    let bootstrap = bootstrap();
    let tag = if dead_letter { "brk10b-dlqhang" } else { "brk10b-fwdhang" };
    let topic = unique(&format!("{tag}-in"));
    create_topic(&bootstrap, &topic, 1).await;
    let (stuck, colliding) = uncreatable_topic(&bootstrap, &unique(&format!("{tag}-stuck"))).await;
    produce_ids(&bootstrap, &topic, 0..50, 5).await;
    let group = unique("brk10b-g");
    let _sink;
    let spec = if dead_letter {
        let sink = HttpSink::start(SinkBehavior { reject_all: true, ..Default::default() }).await;
        let addr = sink.addr();
        _sink = Some(sink);
        serde_json::json!({
            "processor": {"http": {"url": format!("http://{addr}/records")}},
            "onFailure": "deadLetter",
            "deadLetter": {"topic": stuck}
        })
    } else {
        _sink = None;
        serde_json::json!({"processor": {"kafka": {"topic": stuck}}})
    };
    let cfg = config(&bootstrap, tag, &topic, &group, spec);
    let mut w = Worker::start(tag, &cfg);
    w.wait_ready(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let m = w.metrics().await;
    let sent = Instant::now();
    w.signal(15);
    let exit = tokio::time::timeout(Duration::from_secs(40), w.wait_exit(Duration::from_secs(40))).await;
    let took = sent.elapsed();
    let after = committed(&bootstrap, &group, &topic);
    delete_topics(&bootstrap, &[&topic, &stuck, &colliding]).await;
    eprintln!(
        "{tag}: exit {exit:?} {took:?} after SIGTERM; committed {after:?}; processed {:?} dead-lettered {:?}; log {}",
        metric(&m, "kpipe_worker_records_processed_total"),
        metric(&m, "kpipe_worker_records_dead_lettered_total"),
        w.log.display()
    );
    assert!(matches!(exit, Ok(Some(0))), "clean exit: {exit:?}");
    assert!(took < Duration::from_secs(17), "exit took {took:?}");
    assert!(after.unwrap_or(0) == 0, "committed {after:?} with nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_while_forwarded_records_wait_in_librdkafka_exits_in_time_without_committing() {
    sigterm_while_produces_hang(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_while_dead_letters_wait_in_librdkafka_exits_in_time_without_committing() {
    sigterm_while_produces_hang(true).await;
}

/// One partition blocked for good (`onFailure: block`, its first record always failed), seven others with a
/// backlog of records of `value_bytes` each (5 MB per partition) behind a downstream slower than the fetch: the
/// worker-wide buffer budget is held by the others' backlog and the stuck partition's buffers; every record of the
/// seven healthy partitions must still be delivered, and the buffered bytes stay within the budget (24 MiB) plus a
/// chunk per partition.
async fn a_blocked_partition_and_a_backlog_elsewhere(value_bytes: usize, max_records: u32) {
    let bootstrap = bootstrap();
    let topic = unique("brk10b-budget");
    create_topic(&bootstrap, &topic, 8).await;
    let per_partition = (5_000_000 / value_bytes) as u64;
    for p in 0..8i32 {
        let from = p as u64 * 1_000_000;
        produce_padded_ids_to(&bootstrap, &topic, Some(p), from..from + per_partition, u64::MAX, value_bytes).await;
    }
    let sink = HttpSink::start(SinkBehavior {
        fail_always: ids([0u64]),
        delay: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let addr = sink.addr();
    let cfg = config(
        &bootstrap,
        "brk10b-budget",
        &topic,
        &unique("brk10b-g"),
        serde_json::json!({
            "processor": {"http": {"url": format!("http://{addr}/records")}},
            "ordering": "partition",
            "batch": {"maxRecords": max_records, "maxWait": "10ms"},
            "onFailure": "block",
            "retry": {"maxAttempts": 2, "initialBackoff": "10ms", "maxBackoff": "200ms"}
        }),
    );
    let w = Worker::start("brk10b-budget", &cfg);
    w.wait_ready(Duration::from_secs(30)).await;
    let want: Vec<u64> = (1..8u64).flat_map(|p| p * 1_000_000..p * 1_000_000 + per_partition).collect();
    let started = Instant::now();
    let mut max_buffered = 0.0f64;
    let mut max_paused = 0.0f64;
    let mut missing = want.len();
    while started.elapsed() < Duration::from_secs(25) {
        let m = w.metrics().await;
        max_buffered = max_buffered.max(metric(&m, "kpipe_worker_buffered_bytes").unwrap_or(0.0));
        max_paused = max_paused.max(metric(&m, "kpipe_worker_paused_partitions").unwrap_or(0.0));
        let accepted = accepted(&sink);
        missing = want.iter().filter(|id| !accepted.contains_key(id)).count();
        if missing == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed();
    let m = w.metrics().await;
    // SIGTERM with the blocked partition retrying and its buffers full: out within the shutdown timeout (10 s).
    let mut w = w;
    let term = Instant::now();
    w.signal(15);
    let exit = w.wait_exit(Duration::from_secs(30)).await;
    let exit_took = term.elapsed();
    delete_topics(&bootstrap, &[&topic]).await;
    eprintln!("exit {exit:?} {exit_took:?} after SIGTERM");
    assert!(exit == Some(0) && exit_took < Duration::from_secs(13), "exit {exit:?} after {exit_took:?}");
    eprintln!(
        "{value_bytes} B records: {missing} of {} healthy records missing after {took:?}; buffered max {max_buffered} \
         now {:?}; paused max {max_paused}, pauses {:?}",
        want.len(),
        metric(&m, "kpipe_worker_buffered_bytes"),
        metric(&m, "kpipe_worker_partition_pauses_total"),
    );
    assert_eq!(missing, 0, "healthy partitions stranded behind the blocked one");
    assert!(max_buffered <= (24u64 << 20) as f64 + 8.0 * 2_100_000.0, "buffered {max_buffered}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_partition_does_not_strand_a_backlog_elsewhere() {
    a_blocked_partition_and_a_backlog_elsewhere(16_000, 16).await;
}

/// The same with records larger than a chunk and than the per-partition floor (300 kB > 256 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_partition_does_not_strand_a_backlog_of_records_larger_than_the_floor() {
    a_blocked_partition_and_a_backlog_elsewhere(300_000, 1).await;
}

/// `message.max.bytes` is one of the client properties users may set in `spec.source.config` (tuning, 1000 ..
/// 1,000,000,000); the worker's producer takes it too. With 100,000 there, a 200 kB record (well within the output
/// topic's 1,048,588) is refused by librdkafka locally as too large, and the forwarder takes it for "batched beyond
/// the limit, fits alone: retryable". A user expects the record forwarded, or at worst dead-lettered, and the
/// partition to move on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_users_message_max_bytes_does_not_stall_the_forwarder() {
    let bootstrap = bootstrap();
    let topic = unique("brk10b-mmb-in");
    let out = unique("brk10b-mmb-out");
    let dlq = unique("brk10b-mmb-dlq");
    create_topic(&bootstrap, &topic, 1).await;
    create_topic(&bootstrap, &out, 1).await;
    create_topic(&bootstrap, &dlq, 1).await;
    for (id, size) in [(0u64, 1_000usize), (1, 200_000), (2, 1_000), (3, 1_000)] {
        produce_padded_ids_to(&bootstrap, &topic, Some(0), id..id + 1, u64::MAX, size).await;
    }
    let group = unique("brk10b-g");
    let mut cfg = config(
        &bootstrap,
        "brk10b-mmb",
        &topic,
        &group,
        serde_json::json!({
            "processor": {"kafka": {"topic": out}},
            "retry": {"maxAttempts": 3, "initialBackoff": "10ms", "maxBackoff": "50ms"},
            "onFailure": "deadLetter",
            "deadLetter": {"topic": dlq}
        }),
    );
    cfg["spec"]["source"]["config"]["message.max.bytes"] = serde_json::json!("100000");
    let mut w = Worker::start("brk10b-mmb", &cfg);
    w.wait_ready(Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while committed(&bootstrap, &group, &topic) != Some(4) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let at_end = committed(&bootstrap, &group, &topic);
    let m = w.metrics().await;
    let forwarded: Vec<String> = read_topic(&bootstrap, &out, 4, Duration::from_secs(4))
        .iter()
        .map(|r| first_line(&r.value).to_owned())
        .collect();
    let dead = read_topic(&bootstrap, &dlq, 1, Duration::from_secs(2));
    w.signal(15);
    let _ = w.wait_exit(Duration::from_secs(20)).await;
    delete_topics(&bootstrap, &[&topic, &out, &dlq]).await;
    eprintln!(
        "committed {at_end:?}; forwarded {forwarded:?}; dead-lettered {} (DLQ metric {:?}); retried {:?}; log {}",
        dead.len(),
        metric(&m, "kpipe_worker_records_dead_lettered_total"),
        metric(&m, "kpipe_worker_records_retried_total"),
        w.log.display()
    );
    assert_eq!(at_end, Some(4), "the partition is stuck");
    assert_eq!(forwarded.len() + dead.len(), 4, "every record forwarded or dead-lettered");
}

/// The group's committed offset metadata of partition 0 of `topic`.
fn committed_metadata(bootstrap: &str, group: &str, topic: &str) -> String {
    let c: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let Ok(got) = c.committed_offsets(tpl, Duration::from_secs(5)) else { return String::new() };
    got.elements().first().map(|e| e.metadata().to_string()).unwrap_or_default()
}

/// A dead-letter topic that does not exist and cannot be created (the test bed's broker auto-creates topics, so the
/// name collides with an existing one): the dead letter waits in librdkafka, the record is not committed, and the
/// worker reports `deadLetterFailing` (the operator's `DeadLetterFailing`) and says so on /readyz — not silently
/// healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_topic_that_cannot_exist_is_reported_and_nothing_is_committed_past_it() {
    let bootstrap = bootstrap();
    let topic = unique("brk10b-nodlq-in");
    create_topic(&bootstrap, &topic, 1).await;
    let (dlq, colliding) = uncreatable_topic(&bootstrap, &unique("brk10b-nodlq")).await;
    produce_ids(&bootstrap, &topic, 0..3, 3).await;
    let sink = HttpSink::start(SinkBehavior { reject_all: true, ..Default::default() }).await;
    let group = unique("brk10b-g");
    let cfg = config(
        &bootstrap,
        "brk10b-nodlq",
        &topic,
        &group,
        serde_json::json!({
            "processor": {"http": {"url": format!("http://{}/records", sink.addr())}},
            "onFailure": "deadLetter",
            "deadLetter": {"topic": dlq}
        }),
    );
    let w = Worker::start("brk10b-nodlq", &cfg);
    w.wait_ready(Duration::from_secs(30)).await;
    let started = Instant::now();
    let mut report = None;
    while started.elapsed() < Duration::from_secs(25) {
        let md = committed_metadata(&bootstrap, &group, &topic);
        if let Some(r) = kpipe_api::commit_metadata::decode(&md).filter(|r| r.dead_letter_failing) {
            report = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let took = started.elapsed();
    let ready = reqwest::get(format!("http://{}/readyz", w.listen)).await.unwrap().text().await.unwrap_or_default();
    let at_end = committed(&bootstrap, &group, &topic);
    let m = w.metrics().await;
    drop(w);
    delete_topics(&bootstrap, &[&topic, &colliding]).await;
    eprintln!(
        "report {report:?} after {took:?}; committed {at_end:?}; readyz {ready:?}; dead-lettered {:?}",
        metric(&m, "kpipe_worker_records_dead_lettered_total")
    );
    assert!(report.is_some(), "no deadLetterFailing report in {took:?}");
    assert!(at_end.unwrap_or(0) == 0, "committed {at_end:?} past records never dead-lettered");
}

/// Partitions paused by backpressure are revoked (a second worker joins) and come back (it leaves again): librdkafka
/// must fetch them again, so every record is delivered (none stranded paused): 8 partitions of 20,000 small records
/// behind a downstream slower than the fetch (each partition's overflow pauses it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_revoked_while_paused_are_fetched_again() {
    paused_backlog(true).await;
}

/// The control for [`partitions_revoked_while_paused_are_fetched_again`]: the same backlog, one worker throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_backlog_on_one_worker_is_delivered() {
    paused_backlog(false).await;
}

async fn paused_backlog(second_worker: bool) {
    let bootstrap = bootstrap();
    let topic = unique("brk10b-revoke");
    create_topic(&bootstrap, &topic, 8).await;
    let per_partition = 20_000u64;
    for p in 0..8i32 {
        let from = p as u64 * 1_000_000;
        produce_padded_ids_to(&bootstrap, &topic, Some(p), from..from + per_partition, u64::MAX, 20).await;
    }
    let sink = HttpSink::start(SinkBehavior { delay: Duration::from_millis(150), ..Default::default() }).await;
    let group = unique("brk10b-g");
    let cfg = config(
        &bootstrap,
        "brk10b-revoke",
        &topic,
        &group,
        serde_json::json!({
            "processor": {"http": {"url": format!("http://{}/records", sink.addr())}},
            "ordering": "partition",
            "batch": {"maxRecords": 500, "maxWait": "10ms"},
            "concurrency": {"perWorker": 4000, "perPartition": 500}
        }),
    );
    let a = Worker::start("brk10b-revoke-a", &cfg);
    a.wait_ready(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let paused_before = metric(&a.metrics().await, "kpipe_worker_paused_partitions");
    if second_worker {
        let mut b = Worker::start("brk10b-revoke-b", &cfg);
        b.wait_ready(Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        b.signal(15);
        let _ = b.wait_exit(Duration::from_secs(20)).await;
    }
    let want: Vec<u64> = (0..8u64).flat_map(|p| p * 1_000_000..p * 1_000_000 + per_partition).collect();
    let started = Instant::now();
    let mut missing = want.len();
    while started.elapsed() < Duration::from_secs(25) {
        let accepted = accepted(&sink);
        missing = want.iter().filter(|id| !accepted.contains_key(id)).count();
        if missing == 0 {
            break;
        }
        let requests = sink.requests();
        let m = a.metrics().await;
        eprintln!(
            "{:?}: missing {missing}, requests {} (last {} ids), paused {:?}, pauses {:?}, buffered {:?}, in flight {:?}",
            started.elapsed(),
            requests.len(),
            requests.last().map(|r| r.ids.len()).unwrap_or(0),
            metric(&m, "kpipe_worker_paused_partitions"),
            metric(&m, "kpipe_worker_partition_pauses_total"),
            metric(&m, "kpipe_worker_buffered_bytes"),
            metric(&m, "kpipe_worker_in_flight_records"),
        );
        tokio::time::sleep(Duration::from_millis(2_000)).await;
    }
    let m = a.metrics().await;
    drop(a);
    delete_topics(&bootstrap, &[&topic]).await;
    let accepted = accepted(&sink);
    eprintln!(
        "{missing} of {} missing {:?} after B left; duplicates {}; A paused before B {paused_before:?}, now {:?}, \
         pauses {:?}, buffered {:?}",
        want.len(),
        started.elapsed(),
        report_duplicates(&accepted),
        metric(&m, "kpipe_worker_paused_partitions"),
        metric(&m, "kpipe_worker_partition_pauses_total"),
        metric(&m, "kpipe_worker_buffered_bytes"),
    );
    assert_eq!(missing, 0, "records stranded after the partitions came back");
    assert!(
        paused_before.unwrap_or(0.0) >= 1.0,
        "no partition was paused before the rebalance: the test did not test a paused backlog"
    );
}

/// The forwarder (default concurrency) stopped with SIGTERM mid-stream and started again: every record reaches the
/// output topic (none lost between the producer's acknowledgements and the commits), each key's records in order
/// apart from re-deliveries after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarder_stopped_mid_stream_loses_nothing() {
    let bootstrap = bootstrap();
    let topic = unique("brk10b-fwdterm-in");
    let out = unique("brk10b-fwdterm-out");
    create_topic(&bootstrap, &topic, 4).await;
    create_topic(&bootstrap, &out, 4).await;
    let n = 40_000u64;
    produce_ids(&bootstrap, &topic, 0..n, 64).await;
    let cfg = config(
        &bootstrap,
        "brk10b-fwdterm",
        &topic,
        &unique("brk10b-g"),
        serde_json::json!({"processor": {"kafka": {"topic": out}}}),
    );
    let mut w = Worker::start("brk10b-fwdterm-1", &cfg);
    w.wait_ready(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = metric(&w.metrics().await, "kpipe_worker_records_processed_total");
    w.signal(15);
    let first_exit = w.wait_exit(Duration::from_secs(30)).await;
    let w2 = Worker::start("brk10b-fwdterm-2", &cfg);
    w2.wait_ready(Duration::from_secs(30)).await;
    let read = read_topic_with(&bootstrap, &out, n as usize + 2_000, Duration::from_secs(20), |m| {
        use rdkafka::message::Message;
        let id: u64 = std::str::from_utf8(m.payload().unwrap_or_default()).unwrap_or("").parse().unwrap_or(u64::MAX);
        (m.key().map(<[u8]>::to_vec), id)
    });
    drop(w2);
    delete_topics(&bootstrap, &[&topic, &out]).await;
    let mut count = std::collections::HashMap::new();
    for (_, id) in &read {
        *count.entry(*id).or_insert(0u32) += 1;
    }
    let missing: Vec<u64> = (0..n).filter(|id| !count.contains_key(id)).take(10).collect();
    let duplicates: u32 = count.values().map(|c| c - 1).sum();
    // Per key, ids must ascend except where a re-delivery starts over (a restart re-sends from the commit).
    let mut last: std::collections::HashMap<Option<Vec<u8>>, u64> = std::collections::HashMap::new();
    let mut backwards = 0;
    for (key, id) in &read {
        if let Some(prev) = last.insert(key.clone(), *id)
            && *id < prev
        {
            backwards += 1;
        }
    }
    eprintln!(
        "first worker: {before:?} processed before SIGTERM, exit {first_exit:?}; read {} of {n}, missing {} \
         (first {missing:?}), duplicates {duplicates}, key order restarts {backwards}",
        read.len(),
        (0..n).filter(|id| !count.contains_key(id)).count(),
    );
    assert_eq!(first_exit, Some(0));
    assert!(missing.is_empty(), "lost {missing:?}");
    assert!(backwards <= 64, "a key's records went back {backwards} times (at most one restart per key)");
}
