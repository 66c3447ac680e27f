//! Failure handling against the test bed's real Kafka broker and a real HTTP endpoint: records
//! just under and over the dead-letter topic's `max.message.bytes`, a forward to an output topic
//! that refuses a record's size, an endpoint throttling with 429 + Retry-After, and an endpoint that
//! is down and comes back (circuit breaker).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::*;
use kpipe_api::commit_metadata;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};

async fn create_topic_with_limit(bootstrap: &str, name: &str, max_message_bytes: u64) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
    let limit = max_message_bytes.to_string();
    let topic = NewTopic::new(name, 1, TopicReplication::Fixed(1)).set("max.message.bytes", &limit);
    for r in admin.create_topics(&[topic], &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
    // Metadata settles like create_topic's (same wait).
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Produces (key, value of `size` bytes whose first line is `id`) records in order.
async fn produce_sized(bootstrap: &str, topic: &str, records: &[(u64, usize)]) {
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("message.max.bytes", "4000000").create().unwrap();
    for (id, size) in records {
        let mut value = format!("{id}\n").into_bytes();
        value.resize(*size, b'x');
        let key = format!("key-{id}");
        producer.send(FutureRecord::to(topic).key(&key).payload(&value), Duration::from_secs(30)).await.unwrap();
    }
}

/// (key bytes, offset) of CloudEvents in arrival order.
type Seen = Arc<Mutex<Vec<(Vec<u8>, i64)>>>;

async fn wait_metric(w: &Worker, name: &str, want: f64, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let m = w.metrics().await;
        if metric(&m, name) == Some(want) {
            return m;
        }
        assert!(Instant::now() < deadline, "{name} never reached {want}: {m}\nlog {}", w.log.display());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// HTTP processor rejecting every record (400): records around the dead-letter topic's 20,000-byte
/// limit, and one over librdkafka's 1,000,000-byte producer default (the case), all end in
/// the DLQ — whole when they fit, as reference records when not — and the partition commits past
/// every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_records_over_the_dead_letter_topics_limit_are_dead_lettered_as_references() {
    let bootstrap = bootstrap();
    let topic = unique("dlq-size");
    let dlq = unique("dlq-size-dlq");
    create_topic_with_limit(&bootstrap, &topic, 4_000_000).await;
    create_topic_with_limit(&bootstrap, &dlq, 20_000).await;
    // Under: 19,000-byte values fit with their headers; over: 20,000 and more do not.
    let records = [(0u64, 100usize), (1, 19_000), (2, 20_000), (3, 25_000), (4, 1_100_000), (5, 10)];
    produce_sized(&bootstrap, &topic, &records).await;
    let addr = HttpSink::start(SinkBehavior { reject_all: true, ..Default::default() }).await.addr();
    let group = unique("g");
    let cfg = config(
        &bootstrap,
        "dlq-size",
        &topic,
        &group,
        serde_json::json!({
            "processor": {"http": {"url": format!("http://{addr}/records")}},
            "batch": {"maxRecords": 1, "maxWait": "1ms"},
            "retry": {"maxAttempts": 2, "initialBackoff": "10ms", "maxBackoff": "50ms"},
            "deadLetter": {"topic": dlq}
        }),
    );
    let w = Worker::start("dlq-size", &cfg);
    w.wait_ready(Duration::from_secs(30)).await;
    let m = wait_metric(&w, "kpipe_worker_records_dead_lettered_total", 6.0, Duration::from_secs(60)).await;
    assert_eq!(metric(&m, "kpipe_worker_dead_letter_truncated_total"), Some(3.0), "{m}");
    assert_eq!(metric(&m, "kpipe_worker_dead_letter_errors_total"), Some(0.0), "sized before producing: {m}");
    let got = read_topic(&bootstrap, &dlq, 6, Duration::from_secs(20));
    assert_eq!(got.len(), 6);
    let by_offset: HashMap<String, &ReadRecord> =
        got.iter().map(|r| (r.headers["kpipe.original.offset"].clone(), r)).collect();
    for (id, size) in records {
        let r = by_offset[&id.to_string()];
        assert_eq!(r.key.as_deref(), Some(format!("key-{id}").as_bytes()), "key kept");
        assert_eq!(r.headers["kpipe.error.class"], "http_400");
        if size <= 19_000 {
            assert_eq!(r.value.len(), size, "offset {id} fits: whole");
            assert!(!r.headers.contains_key("kpipe.payload.truncated"));
        } else {
            assert!(r.value.is_empty(), "offset {id}: reference record without the value");
            assert_eq!(r.headers["kpipe.payload.truncated"], "true");
            assert_eq!(r.headers["kpipe.payload.omitted"], "value");
            assert_eq!(r.headers["kpipe.payload.bytes"], size.to_string());
            assert_eq!(r.headers["kpipe.original.topic"], topic);
        }
    }
    // The partition moved on: everything committed.
    wait_committed(&bootstrap, &group, &topic, 6).await;
}

async fn wait_committed(bootstrap: &str, group: &str, topic: &str, offset: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (committed, _) = committed_with_metadata(bootstrap, group, topic);
        if committed == Some(offset) {
            return;
        }
        assert!(Instant::now() < deadline, "committed {committed:?}, want {offset}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The forward processor: a record too large for the output topic is a permanent failure, dead-
/// lettered at once (one attempt), not retried; the others are forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_forwarding_a_record_too_large_for_the_output_topic_dead_letters_it() {
    let bootstrap = bootstrap();
    let topic = unique("fwd-size");
    let out = unique("fwd-size-out");
    let dlq = unique("fwd-size-dlq");
    create_topic_with_limit(&bootstrap, &topic, 4_000_000).await;
    create_topic_with_limit(&bootstrap, &out, 20_000).await;
    create_topic_with_limit(&bootstrap, &dlq, 4_000_000).await;
    let records = [(0u64, 100usize), (1, 30_000), (2, 19_000), (3, 1_100_000)];
    produce_sized(&bootstrap, &topic, &records).await;
    let group = unique("g");
    let cfg = config(
        &bootstrap,
        "fwd-size",
        &topic,
        &group,
        serde_json::json!({
            "processor": {"kafka": {"topic": out}},
            "retry": {"maxAttempts": 5, "initialBackoff": "10ms", "maxBackoff": "50ms"},
            "deadLetter": {"topic": dlq}
        }),
    );
    let w = Worker::start("fwd-size", &cfg);
    w.wait_ready(Duration::from_secs(30)).await;
    let m = wait_metric(&w, "kpipe_worker_records_dead_lettered_total", 2.0, Duration::from_secs(60)).await;
    assert_eq!(metric(&m, "kpipe_worker_records_too_large_total"), Some(2.0), "{m}");
    assert_eq!(metric(&m, "kpipe_worker_records_retried_total"), Some(0.0), "too large is permanent: {m}");
    let forwarded = read_topic(&bootstrap, &out, 2, Duration::from_secs(20));
    let mut ids: Vec<_> = forwarded.iter().map(|r| first_line(&r.value).to_owned()).collect();
    ids.sort();
    assert_eq!(ids, ["0", "2"]);
    let dead = read_topic(&bootstrap, &dlq, 2, Duration::from_secs(20));
    let mut dead: Vec<_> =
        dead.iter().map(|r| (first_line(&r.value).to_owned(), r.value.len(), r.headers.clone())).collect();
    dead.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!((dead[0].0.as_str(), dead[0].1), ("1", 30_000), "whole copy in the DLQ");
    assert_eq!((dead[1].0.as_str(), dead[1].1), ("3", 1_100_000));
    assert_eq!(dead[0].2["kpipe.attempts"], "1");
    assert_eq!(dead[0].2["kpipe.error.class"], "produce");
    wait_committed(&bootstrap, &group, &topic, 4).await;
}

/// An endpoint that answers the first requests with 429 + `Retry-After: 2`: with 2 attempts
/// allowed, nothing is dead-lettered, every record is delivered, and each throttled record is sent
/// again only after the 2 s asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_429_with_retry_after_is_waited_for_and_nothing_is_dead_lettered() {
    let bootstrap = bootstrap();
    let topic = unique("throttle");
    let dlq = unique("throttle-dlq");
    create_topic(&bootstrap, &topic, 3).await;
    create_topic(&bootstrap, &dlq, 1).await;
    let n = 300u64;
    produce_ids(&bootstrap, &topic, 0..n, 30).await;
    let sink = HttpSink::start(SinkBehavior { throttle: 12, retry_after: "2".into(), ..Default::default() }).await;
    let addr = sink.addr();
    let cfg = config(
        &bootstrap,
        "throttle",
        &topic,
        &unique("g"),
        serde_json::json!({
            "processor": {"http": {"url": format!("http://{addr}/records")}},
            "batch": {"maxRecords": 20, "maxWait": "10ms"},
            "retry": {"maxAttempts": 2, "initialBackoff": "10ms", "maxBackoff": "50ms"},
            "deadLetter": {"topic": dlq}
        }),
    );
    let w = Worker::start("throttle", &cfg);
    w.wait_ready(Duration::from_secs(30)).await;
    let started = Instant::now();
    let m = wait_metric(&w, "kpipe_worker_records_processed_total", n as f64, Duration::from_secs(90)).await;
    eprintln!("delivered {n} records through 12 throttled requests in {:?}", started.elapsed());
    // A labelled counter (by class) has no series before its first dead letter.
    assert_eq!(metric(&m, "kpipe_worker_records_dead_lettered_total").unwrap_or(0.0), 0.0, "{m}");
    assert!(metric(&m, "kpipe_worker_records_throttled_total").unwrap_or(0.0) > 0.0, "{m}");
    let limit = metric(&m, "kpipe_worker_concurrency_limit").unwrap();
    eprintln!("concurrency limit after throttling: {limit} (perWorker 256)");
    assert!(limit < 256.0, "429s lowered the adaptive limit: {m}");
    let accepted = sink.accepted();
    assert!((0..n).all(|id| accepted.contains_key(&id.to_string())), "every record delivered");
    let min_gap = throttled_gap(&sink.requests());
    eprintln!("shortest wait after a 429 with Retry-After: 2 → {min_gap:?}");
    assert!(min_gap >= Duration::from_millis(1990), "retried {min_gap:?} after a Retry-After of 2 s");
    assert!(read_topic(&bootstrap, &dlq, 1, Duration::from_secs(3)).is_empty(), "the DLQ stays empty");
}

/// The shortest time from a 429 until the next request carrying any of its ids.
fn throttled_gap(requests: &[SinkRequest]) -> Duration {
    let mut min_gap = Duration::MAX;
    for (i, throttled) in requests.iter().enumerate() {
        if throttled.status != 429 {
            continue;
        }
        let next = requests[i + 1..].iter().find(|later| later.ids.iter().any(|x| throttled.ids.contains(x)));
        let next = next.expect("a throttled record is sent again");
        min_gap = min_gap.min(next.at - throttled.at);
    }
    min_gap
}

/// The endpoint is down (connection refused) for 10 s, then comes back: far beyond 3 attempts at
/// 10–50 ms backoff, yet nothing is dead-lettered; the circuit opened, the commit metadata said so
/// (the operator's `ProcessorUnavailable`), and every record is delivered after recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_a_downstream_outage_opens_the_circuit_and_nothing_is_dead_lettered() {
    let bootstrap = bootstrap();
    let topic = unique("outage");
    let dlq = unique("outage-dlq");
    create_topic(&bootstrap, &topic, 1).await;
    create_topic(&bootstrap, &dlq, 1).await;
    let n = 200u64;
    produce_ids(&bootstrap, &topic, 0..n, 20).await;
    let addr = free_addr(); // nothing listens yet: connection refused
    let group = unique("g");
    let cfg = config(
        &bootstrap,
        "outage",
        &topic,
        &group,
        serde_json::json!({
            "processor": {"http": {"url": format!("http://{addr}/records"), "timeout": "1s"}},
            "batch": {"maxRecords": 20, "maxWait": "10ms"},
            "retry": {"maxAttempts": 3, "initialBackoff": "10ms", "maxBackoff": "50ms"},
            "deadLetter": {"topic": dlq}
        }),
    );
    let w = Worker::start("outage", &cfg);
    w.wait_ready(Duration::from_secs(30)).await;
    let down_at = Instant::now();
    wait_metric(&w, "kpipe_worker_circuit_state", 1.0, Duration::from_secs(20)).await;
    // The operator sees it in the commit metadata.
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let (_, md) = committed_with_metadata(&bootstrap, &group, &topic);
        if let Some(r) = commit_metadata::decode(&md).filter(|r| r.circuit_open) {
            break r;
        }
        assert!(Instant::now() < deadline, "no circuitOpen report in the commit metadata: {md:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(report.attempts < 3, "attempts stop while the circuit is open: {report:?}");
    let m = w.metrics().await;
    // A labelled counter (by class) has no series before its first dead letter.
    assert_eq!(metric(&m, "kpipe_worker_records_dead_lettered_total").unwrap_or(0.0), 0.0, "{m}");
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed())).await;
    let sink = HttpSink::start_on(addr, SinkBehavior::default()).await;
    let back_at = Instant::now();
    let m = wait_metric(&w, "kpipe_worker_records_processed_total", n as f64, Duration::from_secs(90)).await;
    eprintln!("all {n} delivered {:?} after the endpoint came back", back_at.elapsed());
    // A labelled counter (by class) has no series before its first dead letter.
    assert_eq!(metric(&m, "kpipe_worker_records_dead_lettered_total").unwrap_or(0.0), 0.0, "{m}");
    assert_eq!(metric(&m, "kpipe_worker_circuit_state"), Some(0.0), "closed again: {m}");
    assert!(metric(&m, "kpipe_worker_circuit_opened_total").unwrap_or(0.0) >= 1.0);
    let accepted = sink.accepted();
    assert!((0..n).all(|id| accepted.contains_key(&id.to_string())), "every record delivered");
    wait_committed(&bootstrap, &group, &topic, n as i64).await;
    let (_, md) = committed_with_metadata(&bootstrap, &group, &topic);
    assert_eq!(commit_metadata::decode(&md), None, "no report once it drained: {md:?}");
    assert!(read_topic(&bootstrap, &dlq, 1, Duration::from_secs(3)).is_empty(), "the DLQ stays empty");
}

/// `spec.processor.circuitBreaker.enabled: false` reaches the worker: an endpoint refusing connections is then an
/// ordinary retryable failure, the records spend their attempts and are dead-lettered, and the circuit never opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_a_circuit_breaker_turned_off_in_the_spec_never_opens() {
    let bootstrap = bootstrap();
    let topic = unique("nobreaker");
    let dlq = unique("nobreaker-dlq");
    create_topic(&bootstrap, &topic, 1).await;
    create_topic(&bootstrap, &dlq, 1).await;
    let n = 30u64;
    produce_ids(&bootstrap, &topic, 0..n, 5).await;
    let addr = free_addr(); // nothing listens: connection refused
    let group = unique("g");
    let cfg = config(
        &bootstrap,
        "nobreaker",
        &topic,
        &group,
        serde_json::json!({
            "processor": {"http": {"url": format!("http://{addr}/records"), "timeout": "1s"},
                          "circuitBreaker": {"enabled": false}},
            "batch": {"maxRecords": 5, "maxWait": "10ms"},
            "retry": {"maxAttempts": 3, "initialBackoff": "10ms", "maxBackoff": "50ms"},
            "deadLetter": {"topic": dlq}
        }),
    );
    let w = Worker::start("nobreaker", &cfg);
    w.wait_ready(Duration::from_secs(30)).await;
    let m = wait_metric(&w, "kpipe_worker_records_dead_lettered_total", n as f64, Duration::from_secs(60)).await;
    assert_eq!(metric(&m, "kpipe_worker_circuit_opened_total").unwrap_or(0.0), 0.0, "{m}");
    assert_eq!(metric(&m, "kpipe_worker_circuit_state").unwrap_or(0.0), 0.0, "{m}");
    wait_committed(&bootstrap, &group, &topic, n as i64).await;
    let dead = read_topic(&bootstrap, &dlq, n as usize, Duration::from_secs(30));
    assert_eq!(dead.len(), n as usize);
}

/// A record's attempt budget survives a worker being killed and replaced: the replacement continues
/// from the attempts the first worker reported in the commit metadata, and the dead letter says
/// `kpipe.attempts: 5` (maxAttempts), not 5 + what was spent before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_attempt_budgets_survive_a_restart() {
    let bootstrap = bootstrap();
    let topic = unique("budget");
    let dlq = unique("budget-dlq");
    create_topic(&bootstrap, &topic, 1).await;
    create_topic(&bootstrap, &dlq, 1).await;
    produce_ids(&bootstrap, &topic, 0..10, 10).await;
    let sink = HttpSink::start(SinkBehavior { fail_always: ids([5]), ..Default::default() }).await;
    let addr = sink.addr();
    let group = unique("g");
    let cfg = config(
        &bootstrap,
        "budget",
        &topic,
        &group,
        serde_json::json!({
            "processor": {"http": {"url": format!("http://{addr}/records")}},
            "ordering": "partition",
            "batch": {"maxRecords": 1, "maxWait": "1ms"},
            "retry": {"maxAttempts": 5, "initialBackoff": "2s", "maxBackoff": "2s", "multiplier": 1},
            "deadLetter": {"topic": dlq}
        }),
    );
    let first = Worker::start("budget", &cfg);
    first.wait_ready(Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, md) = committed_with_metadata(&bootstrap, &group, &topic);
        if commit_metadata::decode(&md).is_some_and(|r| r.offset == 5 && r.attempts >= 2) {
            break;
        }
        assert!(Instant::now() < deadline, "no retry report with 2 attempts: {md:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(first); // kill -9
    let (_, md) = committed_with_metadata(&bootstrap, &group, &topic);
    let inherited = commit_metadata::decode(&md).unwrap();
    assert!(inherited.attempts >= 2 && inherited.attempts < 5, "{inherited:?}");
    let restarted_at = Instant::now();
    let second = Worker::start("budget", &cfg);
    let dead = read_topic(&bootstrap, &dlq, 1, Duration::from_secs(60));
    assert_eq!(dead.len(), 1, "log {}", second.log.display());
    assert_eq!(dead[0].headers["kpipe.attempts"], "5", "the budget continued");
    let requests = sink.requests();
    let after = requests.iter().filter(|r| r.at > restarted_at && r.ids.contains(&"5".to_string())).count();
    eprintln!("previous owner reported {} attempts; the replacement made {after}", inherited.attempts);
    assert_eq!(after as u32, 5 - inherited.attempts, "the replacement spent only what was left");
    // The records behind 5 (partition ordering) go out once its dead-letter write is acknowledged, which may be
    // after the test read that write back.
    assert!(sink.wait_for(9, Duration::from_secs(30)).await, "log {}", second.log.display());
    let accepted = sink.accepted();
    assert!((0..10).filter(|i| *i != 5).all(|i| accepted.contains_key(&i.to_string())));
}

/// CloudEvents binary mode with binary (Confluent wire-format-like) keys and non-ASCII UTF-8 keys:
/// every request is built and delivered; `ce-partitionkey` decodes back to the key (percent-decoded
/// per HTTP binding §3.1.3.2, or base64 when `ce-kpipekeyencoding: base64`); records of one key
/// arrive in offset order although keys run in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_cloudevents_binary_and_non_ascii_keys_are_delivered_in_key_order() {
    use base64::Engine;
    let bootstrap = bootstrap();
    let topic = unique("ce-keys");
    create_topic(&bootstrap, &topic, 1).await;
    let keys: Vec<Vec<u8>> =
        vec![vec![0, 0, 0, 1, 0xff], vec![0, 0, 0, 2, 0x80], "käse €".as_bytes().to_vec(), b"plain \"%".to_vec()];
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    let n = 80usize;
    for i in 0..n {
        let key = &keys[i % keys.len()];
        let value = i.to_string();
        producer.send(FutureRecord::to(&topic).key(key).payload(&value), Duration::from_secs(30)).await.unwrap();
    }
    // (key bytes, offset) in arrival order.
    let seen: Seen = Arc::default();
    let app = Router::new()
        .route(
            "/ce",
            post(|State(seen): State<Seen>, headers: HeaderMap, _body: Bytes| async move {
                let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                let raw = h("ce-partitionkey");
                let key = if h("ce-kpipekeyencoding") == "base64" {
                    base64::engine::general_purpose::STANDARD.decode(raw).unwrap()
                } else {
                    percent_encoding::percent_decode_str(&raw).collect::<Vec<u8>>()
                };
                let offset: i64 = h("ce-id").rsplit('-').next().unwrap().parse().unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                seen.lock().unwrap().push((key, offset));
                StatusCode::OK
            }),
        )
        .with_state(seen.clone());
    let addr = serve(free_addr(), app).await;
    let cfg = config(
        &bootstrap,
        "ce-keys",
        &topic,
        &unique("g"),
        serde_json::json!({
            "processor": {"http": {"url": format!("http://{addr}/ce"), "format": "cloudevents"}},
            "ordering": "key",
            "batch": {"maxRecords": 40, "maxWait": "50ms"},
            "retry": {"maxAttempts": 2, "initialBackoff": "10ms", "maxBackoff": "50ms"},
            "onFailure": "drop"
        }),
    );
    let w = Worker::start("ce-keys", &cfg);
    w.wait_ready(Duration::from_secs(30)).await;
    let m = wait_metric(&w, "kpipe_worker_records_processed_total", n as f64, Duration::from_secs(60)).await;
    assert_eq!(metric(&m, "kpipe_worker_records_dropped_total"), Some(0.0), "{m}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), n);
    for (key, offset) in seen.iter() {
        assert_eq!(key, &keys[*offset as usize % keys.len()], "offset {offset}: key decoded");
    }
    for k in &keys {
        let order: Vec<i64> = seen.iter().filter(|(key, _)| key == k).map(|(_, o)| *o).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "key {k:?} out of order: {order:?}");
    }
}

/// A dead-letter topic that cannot take even a reference record (`max.message.bytes` 10): the
/// write fails every time, the record is reported `deadLetterFailing` + blocked in the commit
/// metadata (the operator's `DeadLetterFailing`) and on `/readyz`; once the topic is fixed the write
/// completes and the partition commits past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_a_dead_letter_topic_that_refuses_writes_is_reported_then_recovers() {
    use rdkafka::admin::AlterConfig;
    let bootstrap = bootstrap();
    let topic = unique("dlq-down");
    let dlq = unique("dlq-down-dlq");
    create_topic(&bootstrap, &topic, 1).await;
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    let new = NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "10");
    for r in admin.create_topics(&[new], &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
    produce_ids(&bootstrap, &topic, 0..1, 1).await;
    let addr = HttpSink::start(SinkBehavior { reject_all: true, ..Default::default() }).await.addr();
    let group = unique("g");
    let cfg = config(
        &bootstrap,
        "dlq-down",
        &topic,
        &group,
        serde_json::json!({
            "processor": {"http": {"url": format!("http://{addr}/records")}},
            "retry": {"maxAttempts": 2, "initialBackoff": "10ms", "maxBackoff": "50ms"},
            "deadLetter": {"topic": dlq}
        }),
    );
    let w = Worker::start("dlq-down", &cfg);
    w.wait_ready(Duration::from_secs(30)).await;
    let started = Instant::now();
    let report = loop {
        let (_, md) = committed_with_metadata(&bootstrap, &group, &topic);
        if let Some(r) = commit_metadata::decode(&md).filter(|r| r.dead_letter_failing) {
            break r;
        }
        assert!(started.elapsed() < Duration::from_secs(40), "no deadLetterFailing report: {md:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("deadLetterFailing reported {:?} after start: {report:?}", started.elapsed());
    assert!(report.blocked && report.offset == 0, "{report:?}");
    let ready = reqwest::get(format!("http://{}/readyz", w.listen)).await.unwrap().text().await.unwrap();
    assert!(ready.contains("dead-letter write"), "{ready}");
    let fix = AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&dlq)).set("max.message.bytes", "1048588");
    for r in admin.alter_configs(&[fix], &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
    let fixed_at = Instant::now();
    wait_committed(&bootstrap, &group, &topic, 1).await;
    eprintln!("committed past the record {:?} after the DLQ topic was fixed", fixed_at.elapsed());
    let dead = read_topic(&bootstrap, &dlq, 1, Duration::from_secs(10));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].headers["kpipe.error.class"], "http_400");
    // Whole or as a reference record, depending on which limit the broker showed at the moment of the fix.
    assert_eq!(dead[0].headers["kpipe.original.offset"], "0");
}

/// The group's committed offset of partition 0 and its metadata, as the operator reads them.
fn committed_with_metadata(bootstrap: &str, group: &str, topic: &str) -> (Option<i64>, String) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", group).create().unwrap();
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

/// A poison batch that takes every permit of the worker (`perPartition` = `perWorker` = 8, eight poison records on
/// partition 0, `onFailure: block`) must not stop partition 1: a blocked batch gives its permits back while it waits
/// out its back-off. Before, it held them through every back-off and partition 1's records waited for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_a_blocked_batch_holding_every_permit_does_not_stop_the_other_partitions() {
    let bootstrap = bootstrap();
    let topic = unique("fh-blocked-permits");
    create_topic(&bootstrap, &topic, 2).await;
    produce_padded_ids_to(&bootstrap, &topic, Some(0), 0..8, 8, 0).await;
    let sink = HttpSink::start(SinkBehavior { poison: ids(0..8), ..Default::default() }).await;
    let cfg = config(
        &bootstrap,
        "fh-blocked-permits",
        &topic,
        &unique("fh-blocked-permits"),
        serde_json::json!({
            "processor": {"http": {"url": sink.url()}},
            "ordering": "partition",
            "batch": {"maxRecords": 8, "maxWait": "50ms"},
            "concurrency": {"perPartition": 8, "perWorker": 8},
            "retry": {"maxAttempts": 2, "initialBackoff": "100ms", "maxBackoff": "1s"},
            "onFailure": "block"
        }),
    );
    let w = Worker::start("fh-blocked-permits", &cfg);
    wait_metric(&w, "kpipe_worker_blocked_records", 8.0, Duration::from_secs(60)).await;
    produce_padded_ids_to(&bootstrap, &topic, Some(1), 100..200, 100, 0).await;
    let healthy = ids(100..200);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let accepted = sink.accepted();
        let done = healthy.iter().filter(|id| accepted.contains_key(*id)).count();
        if done == healthy.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {} records of partition 1 delivered in 30 s next to the blocked batch; log {}",
            healthy.len(),
            w.log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let accepted = sink.accepted();
    assert!((0..8).all(|id| !accepted.contains_key(&id.to_string())), "the poison records are still blocked");
}
