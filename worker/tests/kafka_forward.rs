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
