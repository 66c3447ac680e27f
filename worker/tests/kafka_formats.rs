//! The HTTP processor's protobuf and CloudEvents wire formats end to end (worker binary, real
//! broker, in-test sinks).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::*;
use kpipe_worker::proto;
use prost::Message;

type Seen = Arc<Mutex<HashMap<u64, u32>>>;

/// Serves `app` on a free loopback port (the shared test endpoint server); returns its `/records` URL.
async fn serve_records(app: Router) -> String {
    format!("http://{}/records", serve(free_addr(), app).await)
}

/// Accepts protobuf batches; names every id ending in 5 as failed the first time it is seen.
async fn protobuf_sink(State(seen): State<Seen>, headers: HeaderMap, body: Bytes) -> (StatusCode, Vec<u8>) {
    assert_eq!(headers["content-type"], "application/x-protobuf");
    let batch = proto::RecordBatch::decode(body).unwrap();
    assert_eq!(batch.pipeline, "formats-pb");
    let mut seen = seen.lock().unwrap();
    let mut failed = Vec::new();
    for r in batch.records {
        let id: u64 = String::from_utf8(r.value.unwrap()).unwrap().parse().unwrap();
        assert!(r.key.is_some() && r.timestamp_ms > 0);
        let n = seen.entry(id).or_insert(0);
        *n += 1;
        if id % 10 == 5 && *n == 1 {
            failed.push(proto::FailedRecord {
                topic: r.topic,
                partition: r.partition,
                offset: r.offset,
                error: "later".into(),
                permanent: false,
            });
        }
    }
    (StatusCode::OK, proto::BatchResult { failed }.encode_to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_protobuf_batches_with_partial_failure() {
    let bootstrap = bootstrap();
    let topic = unique("pb");
    create_topic(&bootstrap, &topic, 3).await;
    let n = 1000u64;
    produce_ids(&bootstrap, &topic, 0..n, 20).await;
    let seen: Seen = Arc::default();
    let url = serve_records(Router::new().route("/records", post(protobuf_sink)).with_state(seen.clone())).await;
    let cfg = config(
        &bootstrap,
        "formats-pb",
        &topic,
        &unique("g"),
        serde_json::json!({
            "processor": {"http": {"url": url, "format": "protobuf"}},
            "batch": {"maxRecords": 30, "maxWait": "10ms"},
            "retry": {"initialBackoff": "10ms", "maxBackoff": "50ms"},
            "onFailure": "block"
        }),
    );
    let w = Worker::start("formats-pb", &cfg);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let done = {
            let s = seen.lock().unwrap();
            (0..n).all(|id| s.get(&id).copied().unwrap_or(0) >= if id % 10 == 5 { 2 } else { 1 })
        };
        if done {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not all ids delivered; log {}", w.log.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = seen.lock().unwrap();
    for id in 0..n {
        let expected = if id % 10 == 5 { 2 } else { 1 };
        assert_eq!(s[&id], expected, "id {id}: only records named in BatchResult are retried");
    }
}

async fn cloudevents_sink(State(seen): State<Seen>, headers: HeaderMap, body: Bytes) -> StatusCode {
    assert_eq!(headers["ce-specversion"], "1.0");
    assert_eq!(headers["ce-type"], "io.kpipe.record");
    assert_eq!(headers["ce-source"], "/kpipe/test/formats-ce");
    assert!(headers.contains_key("ce-id") && headers.contains_key("ce-time"));
    let id: u64 = std::str::from_utf8(&body).unwrap().parse().unwrap();
    assert_eq!(headers["ce-partitionkey"].to_str().unwrap(), format!("key-{}", id % 20));
    *seen.lock().unwrap().entry(id).or_insert(0) += 1;
    StatusCode::ACCEPTED
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_cloudevents_binary_mode_one_record_per_request() {
    let bootstrap = bootstrap();
    let topic = unique("ce");
    create_topic(&bootstrap, &topic, 3).await;
    let n = 500u64;
    produce_ids(&bootstrap, &topic, 0..n, 20).await;
    let seen: Seen = Arc::default();
    let url = serve_records(Router::new().route("/records", post(cloudevents_sink)).with_state(seen.clone())).await;
    let cfg = config(
        &bootstrap,
        "formats-ce",
        &topic,
        &unique("g"),
        serde_json::json!({
            "processor": {"http": {"url": url, "format": "cloudevents"}},
            "batch": {"maxRecords": 10, "maxWait": "10ms"},
            "onFailure": "block"
        }),
    );
    let w = Worker::start("formats-ce", &cfg);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < n as usize {
        assert!(std::time::Instant::now() < deadline, "not all ids delivered; log {}", w.log.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen.lock().unwrap().values().all(|&c| c == 1));
}
