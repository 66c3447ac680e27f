//! The kafka processor forwards every record (idempotent producer, done only when acked).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_processor_forwards_every_record() {
    let bootstrap = bootstrap();
    let topic = unique("fwd-in");
    let out = unique("fwd-out");
    create_topic(&bootstrap, &topic, 4).await;
    create_topic(&bootstrap, &out, 2).await;
    let n = 4000u64;
    produce_ids(&bootstrap, &topic, 0..n, 40).await;
    let cfg = config(
        &bootstrap,
        "forward",
        &topic,
        &unique("g"),
        serde_json::json!({
            "processor": {"kafka": {"topic": out, "key": "keep", "headers": {"x-kpipe-test": "yes"}}},
            "ordering": "partition",
            "batch": {"maxRecords": 100, "maxWait": "10ms"},
            "onFailure": "block"
        }),
    );
    let w = Worker::start("forward", &cfg);
    let got = read_topic(&bootstrap, &out, n as usize, Duration::from_secs(60));
    let ids: HashSet<u64> = got.iter().map(|r| r.value.parse().unwrap()).collect();
    assert_eq!(ids.len(), n as usize, "forwarded {} of {n}; log {}", ids.len(), w.log.display());
    assert_eq!(got.len(), n as usize, "no duplicates in a clean run");
    for r in &got {
        let id: u64 = r.value.parse().unwrap();
        assert_eq!(r.key.as_deref(), Some(format!("key-{}", id % 40).as_bytes()));
        assert_eq!(r.headers.get("x-kpipe-test").map(String::as_str), Some("yes"));
    }
}

/// A record whose header key is not UTF-8 (the protocol does not check it; Go clients write any bytes) panicked the
/// consumer thread, and the worker crash-looped on that record. It is now forwarded in order, the key's invalid bytes
/// replaced with U+FFFD and counted, and the worker keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_header_key_that_is_not_utf8_is_forwarded_not_fatal() {
    let bootstrap = bootstrap();
    let (topic, out) = (unique("badkey-in"), unique("badkey-out"));
    create_topic(&bootstrap, &topic, 1).await;
    create_topic(&bootstrap, &out, 1).await;
    produce_ids(&bootstrap, &topic, 0..2, 1).await;
    let producer: rdkafka::producer::BaseProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    kpipe_rdkafka_native::testing::produce_with_raw_header(
        &producer,
        &topic,
        0,
        b"key-0",
        b"2",
        (b"bad-\xff\xfe", b"kept"),
    )
    .unwrap();
    produce_ids(&bootstrap, &topic, 3..5, 1).await;
    let cfg = config(
        &bootstrap,
        "badkey",
        &topic,
        &unique("g"),
        serde_json::json!({"processor": {"kafka": {"topic": out, "key": "keep"}}, "onFailure": "block"}),
    );
    let mut w = Worker::start("badkey", &cfg);
    let got = read_topic(&bootstrap, &out, 5, Duration::from_secs(60));
    let values: Vec<&str> = got.iter().map(|r| r.value.as_str()).collect();
    assert_eq!(values, ["0", "1", "2", "3", "4"], "every record, in order; log {}", w.log.display());
    assert_eq!(got[2].headers.get("bad-\u{fffd}\u{fffd}").map(String::as_str), Some("kept"), "{:?}", got[2]);
    let m = w.metrics().await;
    assert_eq!(metric(&m, "kpipe_worker_header_keys_replaced_total"), Some(1.0), "{m}");
    assert!(w.child.try_wait().unwrap().is_none(), "the worker is still running; log {}", w.log.display());
}
